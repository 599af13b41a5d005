//! Certificate bytes from a peer's handshake: SVID parsing must refuse, never panic.
#![no_main]
use causeway_overlay::transport::tls::{spiffe_id, spiffe_id_any};
use libfuzzer_sys::fuzz_target;
use rustls_pki_types::CertificateDer;

fuzz_target!(|data: &[u8]| {
    let der = CertificateDer::from(data);
    let _ = spiffe_id(&der);
    let _ = spiffe_id_any(&der);
});
