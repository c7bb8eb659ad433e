//! cargo +nightly fuzz run lease_value: a lease key or value another node wrote (or garbage) is
//! parsed or refused, never a panic; what parses re-serialises to something that parses the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tweed_config::{LeaseAttrs, LeaseKey, SubnetKey};

fuzz_target!(|data: &[u8]| {
    if let Ok(a) = LeaseAttrs::parse(data) {
        let again = LeaseAttrs::parse(a.to_json().as_bytes()).expect("own output parses");
        assert_eq!(again, a);
        let _ = a.vxlan_data();
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(k) = text.parse::<SubnetKey>() {
            assert_eq!(k.to_string().parse::<SubnetKey>().unwrap(), k);
        }
        // Both key forms: one spelling per key, and an IPv6-only key is never also a flannel key.
        if let Ok(k) = text.parse::<LeaseKey>() {
            assert_eq!(k.to_string(), text);
            assert_eq!(text.parse::<SubnetKey>().is_ok(), k.ipv4().is_some());
        }
    }
});
