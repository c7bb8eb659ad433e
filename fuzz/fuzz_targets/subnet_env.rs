//! cargo +nightly fuzz run subnet_env: a hand-edited or truncated subnet.env is parsed or refused
//! naming the key, never a panic; what parses renders back to the same values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use tweed_config::SubnetEnv;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(env) = SubnetEnv::parse(Path::new("subnet.env"), text) {
            let again = SubnetEnv::parse(Path::new("subnet.env"), &env.render()).unwrap();
            assert_eq!(again, env);
        }
    }
});
