//! SPEC.md's test vectors, checked against the code: every hex string here must also appear, byte
//! for byte, in `SPEC.md` (§4.6 control messages, §8 virtual IPs), so the document and the
//! reference code cannot drift apart. A second implementation can run the same vectors.
//!
//! `PRINT_VECTORS=1 cargo test -p causeway-protocol --test vectors -- --nocapture` prints what the
//! code writes now instead of checking it. Bytes that change are a new protocol version (§4.7).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use causeway_protocol::control::{
    self, features, Catalog, Decoder, ErrorMsg, Event, Goodbye, Hello, Load, Message, Ping, Protocol, ServiceAd,
    ServiceUpdate, ServiceWithdraw,
};
use causeway_protocol::vip::{VipRange, VipTable};
use causeway_protocol::{ErrorCode, GatewayId, ServiceName, ZoneName};

const SPEC: &str = include_str!("../SPEC.md");

fn print() -> bool {
    std::env::var_os("PRINT_VECTORS").is_some()
}

/// `"00 0a ff"` → bytes.
fn unhex(s: &str) -> Vec<u8> {
    s.split_whitespace().map(|b| u8::from_str_radix(b, 16).unwrap()).collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

fn svc(s: &str) -> ServiceName {
    ServiceName::new(s).unwrap()
}

/// Each control message with fixed field values, and its whole frame (length prefix and body).
fn control_vectors() -> Vec<(&'static str, Message, &'static str)> {
    vec![
        (
            "Hello",
            Message::Hello(Hello {
                zone: ZoneName::new("eu").unwrap(),
                gateway: GatewayId::new("gw-1").unwrap(),
                features: features::REVERSE_REQUESTS,
            }),
            "00 00 00 0a 00 02 65 75 04 67 77 2d 31 01",
        ),
        (
            "Catalog (empty snapshot)",
            Message::Catalog(Catalog { version: 1, services: vec![], more: false }),
            "00 00 00 04 01 01 00 00",
        ),
        (
            "Catalog",
            Message::Catalog(Catalog {
                version: 300,
                services: vec![ServiceAd {
                    name: svc("orders.shop"),
                    protocol: Protocol::Http,
                    port: 8080,
                    healthy_endpoints: 2,
                    labels: vec![("version".into(), "v2".into())],
                }],
                more: true,
            }),
            concat!(
                "00 00 00 21 01 ac 02 01 0b 6f 72 64 65 72 73 2e 73 68 6f 70 01 90 3f 02 ",
                "01 07 76 65 72 73 69 6f 6e 02 76 32 01"
            ),
        ),
        (
            "ServiceUpdate",
            Message::ServiceUpdate(ServiceUpdate {
                version: 301,
                service: ServiceAd {
                    name: svc("db"),
                    protocol: Protocol::Tcp,
                    port: 5432,
                    healthy_endpoints: 0,
                    labels: vec![],
                },
            }),
            "00 00 00 0b 02 ad 02 02 64 62 00 b8 2a 00 00",
        ),
        (
            "ServiceWithdraw",
            Message::ServiceWithdraw(ServiceWithdraw { version: 302, name: svc("db") }),
            "00 00 00 06 03 ae 02 02 64 62",
        ),
        ("Load", Message::Load(Load { active_flows: 1000, draining: true }), "00 00 00 04 04 e8 07 01"),
        ("Ping", Message::Ping(Ping { nonce: 1 }), "00 00 00 02 05 01"),
        ("Pong", Message::Pong(Ping { nonce: u64::MAX }), "00 00 00 0b 06 ff ff ff ff ff ff ff ff ff 01"),
        (
            "Goodbye",
            Message::Goodbye(Goodbye { drain_ms: 5000, reason: "draining".into() }),
            "00 00 00 0c 07 88 27 08 64 72 61 69 6e 69 6e 67",
        ),
        (
            "Error",
            Message::Error(ErrorMsg { code: ErrorCode::PEER_MISMATCH, reason: "zone".into() }),
            "00 00 00 0b 08 85 80 dc 9a 04 04 7a 6f 6e 65",
        ),
    ]
}

#[test]
fn control_messages_encode_to_the_spec_bytes_and_back() {
    for (name, msg, want) in control_vectors() {
        let frame = control::encode(&msg).unwrap();
        if print() {
            println!("{name}: {}", hex(&frame));
            continue;
        }
        assert_eq!(hex(&frame), want, "{name}: encoding differs from the vector");
        assert!(SPEC.contains(want), "{name}: vector missing from SPEC.md: {want}");
        let bytes = unhex(want);
        let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        assert_eq!(len, bytes.len() - 4, "{name}: length prefix");
        assert_eq!(control::decode_body(&bytes[4..]), Ok(msg), "{name}: decoding the vector");
    }
}

/// The SPEC's formula, written out independently of `vip.rs`: FNV-1a-64 over the name's bytes and
/// the probe number as a big-endian u32.
fn fnv1a64(name: &str, probe: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes().chain(probe.to_be_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// (range, names, expected `name → VIP` lines as SPEC.md §8 lists them).
fn vip_vectors() -> Vec<(&'static str, Vec<&'static str>, Vec<&'static str>)> {
    vec![
        (
            "240.240.0.0/16",
            vec!["orders.shop", "db", "payments.shop"],
            vec![
                "db: h0 = 1d64fc4837a86593, mod 65534 = 45357 -> 240.240.177.46",
                "orders.shop: h0 = 13404939f64cdbca, mod 65534 = 34638 -> 240.240.135.79",
                "payments.shop: h0 = ad98763d8cf31084, mod 65534 = 28718 -> 240.240.112.47",
            ],
        ),
        // A three-way collision in a /24: all three names hash to the same first candidate, so
        // the second probes once and the third twice (its second candidate is the second's).
        (
            "10.9.0.0/24",
            vec!["svc-46", "svc-35", "svc-28"],
            vec![
                "svc-28: h0 = 930897fa4adcb8ea, mod 254 = 8 -> 10.9.0.9",
                "svc-35: h0 = c610f1a8702eb794, mod 254 = 8; h1 = c610f2a8702eb947, mod 254 = 221 -> 10.9.0.222",
                concat!(
                    "svc-46: h0 = f9194b569580b63e, mod 254 = 8; h1 = f9194c569580b7f1, mod 254 = 221; ",
                    "h2 = f91949569580b2d8, mod 254 = 90 -> 10.9.0.91"
                ),
            ],
        ),
    ]
}

#[test]
fn vips_are_derived_as_the_spec_says() {
    for (range, names, want) in vip_vectors() {
        let r = VipRange::parse(range).unwrap();
        let base = u32::from(range.split('/').next().unwrap().parse::<std::net::Ipv4Addr>().unwrap());
        let n = u64::from(r.capacity());
        let names: Vec<ServiceName> = names.iter().map(|s| svc(s)).collect();
        let table = VipTable::assign(r, &names);
        let mut got = vec![];
        for (name, ip) in table.iter() {
            // Which probe the name ended on, by the SPEC's formula.
            let probe = (0..64)
                .find(|k| base + 1 + (fnv1a64(name.as_str(), *k) % n) as u32 == u32::from(*ip))
                .expect("the VIP is one of the name's candidates");
            let probes: Vec<String> = (0..=probe)
                .map(|k| {
                    let h = fnv1a64(name.as_str(), k);
                    format!("h{k} = {h:016x}, mod {n} = {}", h % n)
                })
                .collect();
            got.push(format!("{name}: {} -> {ip}", probes.join("; ")));
        }
        if print() {
            println!("{range}:\n  {}", got.join("\n  "));
            continue;
        }
        assert_eq!(got, want, "{range}");
        for line in &want {
            assert!(SPEC.contains(line), "vector missing from SPEC.md: {line}");
        }
    }
}

/// The first bytes a gateway writes on a control stream: preface, Hello, an empty snapshot.
const STREAM_START: &str =
    concat!("43 57 41 59 00 01 00 00 ", "00 00 00 0a 00 02 65 75 04 67 77 2d 31 01 ", "00 00 00 04 01 01 00 00");

#[test]
fn a_stream_start_decodes_event_by_event() {
    let mut bytes = control::preface(control::VERSION).to_vec();
    for m in &control_vectors()[..2] {
        bytes.extend_from_slice(&control::encode(&m.1).unwrap());
    }
    if print() {
        println!("stream start: {}", hex(&bytes));
        return;
    }
    assert_eq!(hex(&bytes), STREAM_START);
    assert!(SPEC.contains(STREAM_START), "stream vector missing from SPEC.md");
    let mut d = Decoder::new();
    let mut events = vec![];
    for b in unhex(STREAM_START) {
        d.feed(&[b][..]).unwrap();
        while let Some(e) = d.next_event().unwrap() {
            events.push(e);
        }
    }
    d.finish().unwrap();
    let want: Vec<Event> = std::iter::once(Event::Preface)
        .chain(control_vectors()[..2].iter().map(|v| Event::Message(v.1.clone())))
        .collect();
    assert_eq!(events, want);
}

/// SPEC.md §4.7: v1's types are closed. A receiver refuses, as `CONTROL_MALFORMED`, an unknown
/// message variant, an unknown `Protocol`, and a field appended to a message; it ignores unknown
/// feature bits. These are why extensions are gated by a feature bit.
#[test]
fn v1_refuses_what_it_does_not_know_except_feature_bits() {
    let malformed = |body: &[u8]| {
        let e = control::decode_body(body).unwrap_err();
        assert_eq!(e.code(), ErrorCode::CONTROL_MALFORMED, "{body:02x?}: {e}");
    };
    // Message variant 11 (none in v1 or its extensions), with a body.
    malformed(&[0x0b, 0x00]);
    // ServiceUpdate whose ad has `protocol` 2 (none in v1).
    let mut upd = unhex("02 ad 02 02 64 62 00 b8 2a 00 00");
    upd[6] = 0x02;
    malformed(&upd);
    // Ping with one more field (a u64 varint 5) appended: trailing bytes.
    malformed(&[0x05, 0x01, 0x05]);
    // Hello with every feature bit set: decodes.
    let hello = control::decode_body(&unhex("00 02 65 75 04 67 77 2d 31 ff ff ff ff ff ff ff ff ff 01")).unwrap();
    assert!(matches!(hello, Message::Hello(Hello { features: u64::MAX, .. })));
    // An unknown error code still decodes (an open newtype).
    let err = control::decode_body(&unhex("08 ff ff 03 00")).unwrap();
    assert_eq!(err, Message::Error(ErrorMsg { code: ErrorCode(0xffff), reason: String::new() }));
}
