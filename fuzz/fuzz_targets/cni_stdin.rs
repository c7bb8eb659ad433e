//! cargo +nightly fuzz run cni_stdin: whatever a runtime writes to the plugin's stdin (and in
//! CNI_ARGS) is parsed or refused with an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tweed_cni::conf::NetConf::parse(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = tweed_cni::env::CniArgs::parse(text);
    }
});
