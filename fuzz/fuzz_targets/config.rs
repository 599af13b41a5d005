//! Operator input: gateway and redirector configuration files.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let _ = causeway::config::parse(s);
    let _ = causeway::redirect::parse(s);
});
