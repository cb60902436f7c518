//! The relay configuration parser must never panic, whatever the text, and
//! every error must name what is wrong.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outboxkv::config::RelayConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = RelayConfig::from_toml(text) {
        assert!(!e.to_string().is_empty());
    }
});
