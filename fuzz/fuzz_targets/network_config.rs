//! cargo +nightly fuzz run network_config: any text as `<prefix>/config` must parse or be refused
//! with a field error, never panic (an operator's typo must not crash every agent).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(cfg) = tweed_config::NetworkConfig::parse(text) {
            // Derived values must be usable: every listed subnet is allocatable.
            let n = cfg.subnet_count();
            for i in [0, n / 2, n.saturating_sub(1)] {
                if let Some(s) = cfg.nth_subnet(i) {
                    assert!(cfg.is_allocatable(s), "{s} from {text}");
                }
            }
        }
        // IPv6-only configs too: every listed IPv6 subnet is allocatable and its key reads back.
        if let Ok(tweed_config::ParsedNetwork::Ipv6Only(n)) =
            tweed_config::NetworkConfig::parse_any(text)
        {
            let c = n.ipv6.subnet_count();
            for i in [0, c / 2, c.saturating_sub(1)] {
                if let Some(s) = n.ipv6.nth_subnet(i) {
                    assert!(n.ipv6.is_allocatable(s), "{s} from {text}");
                    let k = tweed_config::Ipv6OnlyKey { ipv6: s };
                    assert_eq!(k.to_string().parse::<tweed_config::Ipv6OnlyKey>(), Ok(k));
                }
            }
        }
    }
});
