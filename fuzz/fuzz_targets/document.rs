//! A mesh-wide document: the signed envelope from a peer or an admin POST (postcard), and its
//! YAML content merged with a gateway's file.
#![no_main]
use libfuzzer_sys::fuzz_target;

const FILE: &str = "zone: east\ngateway: gw-1\ntrust_domain: td\ntls: { cert: c, key: k, bundle: b }\n\
listen: { overlay: \"127.0.0.1:4433\" }\nexports:\n  - { name: reviews.shop, port: 80, protocol: http, endpoints: [\"127.0.0.1:9\"] }\n\
imports:\n  - { service: reviews.shop, listen: \"127.0.0.1:9\", protocol: http }\n";

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = postcard::from_bytes::<causeway_protocol::document::SignedDocument>(data) {
        let _ = d.decode_body();
    }
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(doc) = causeway::control::parse_document(s) {
        if let Ok(file) = causeway::config::parse(FILE) {
            let _ = causeway::control::compose(&file, &doc);
        }
    }
});
