//! Names and identities from peers and operators: SPIFFE IDs, service and zone names, trace
//! context, VIP ranges and CONNECT authorities.
#![no_main]
use causeway_protocol::{trace::TraceParent, vip::VipRange, Identity, ServiceName, ZoneName};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(id) = Identity::parse(s) {
        assert_eq!(Identity::parse(id.as_str()).as_ref(), Ok(&id));
    }
    let _ = ServiceName::new(s);
    let _ = ZoneName::new(s);
    if let Some(t) = TraceParent::parse(s) {
        assert_eq!(TraceParent::parse(&t.to_string()), Some(t));
    }
    let _ = VipRange::parse(s);
    // A CONNECT authority as the destination gateway parses it.
    if let Ok(a) = s.parse::<http::uri::Authority>() {
        let _ = ServiceName::new(a.host());
        let _ = a.port_u16();
    }
});
