//! Pod input to mesh DNS: any datagram a pod sends to the node's resolver. Never panics; a reply
//! it produces is a DNS response to the same query ID, and NXDOMAIN or one A record of the table.
#![no_main]
use std::net::Ipv4Addr;

use causeway::redirect::dns::{handle, Handling};
use causeway_protocol::ServiceName;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let table = |s: &ServiceName| (s.as_str() == "orders.shop").then_some(Ipv4Addr::new(240, 240, 0, 7));
    match handle(data, ".mesh.", 5, table) {
        Handling::Malformed | Handling::Forward(_) => {}
        Handling::Answer(reply, _) => {
            assert!(reply.len() >= 12, "a reply shorter than a DNS header");
            assert_eq!(reply[..2], data[..2], "the reply carries another ID");
            assert!(reply[2] & 0x80 != 0, "the reply is not a response");
        }
    }
});
