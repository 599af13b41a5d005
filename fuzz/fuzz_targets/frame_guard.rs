//! HTTP/3 stream bytes from a peer, as the frame guard sees them between quinn and h3.
#![no_main]
use causeway_overlay::transport::frame_guard::{FrameGuard, StreamKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let split = (split as usize).min(rest.len());
    for kind in [StreamKind::Request, StreamKind::Unidirectional] {
        let mut g = FrameGuard::new(kind);
        if g.inspect(&rest[..split]).is_ok() {
            let _ = g.inspect(&rest[split..]);
        }
    }
});
