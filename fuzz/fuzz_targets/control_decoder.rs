//! Control-stream bytes from a peer: the decoder must never panic, and must refuse or decode.
#![no_main]
use causeway_protocol::control::Decoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks where the stream is split into two reads.
    let Some((&split, rest)) = data.split_first() else { return };
    let split = (split as usize).min(rest.len());
    let mut d = Decoder::new();
    for part in [&rest[..split], &rest[split..]] {
        if d.feed(part).is_err() {
            return;
        }
        while let Ok(Some(_)) = d.next_event() {}
    }
    let _ = d.finish();
    let _ = causeway_protocol::control::decode_body(rest);
});
