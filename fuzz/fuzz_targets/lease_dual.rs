//! cargo +nightly fuzz run lease_dual: a dual-stack peer lease (key line, then value) as a
//! dual-stack node judges it: the value with `PublicIPv6` and `BackendV6Data` round-trips, the
//! IPv4 half is validated, and an IPv6 half judged usable is one that can be routed: a node
//! subnet of `IPv6Network` via a `PublicIPv6` outside the overlay that is neither unspecified,
//! loopback nor multicast. Never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use tweed_config::{LeaseAttrs, NetworkConfig, PeerIpv6, SubnetKey};

fn cfg() -> &'static NetworkConfig {
    static CFG: OnceLock<NetworkConfig> = OnceLock::new();
    CFG.get_or_init(|| {
        NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}"#,
        )
        .unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let (key, value) = (&data[..split], data.get(split + 1..).unwrap_or_default());
    let Ok(attrs) = LeaseAttrs::parse(value) else {
        return;
    };
    let json = attrs.to_json();
    assert_eq!(LeaseAttrs::parse(json.as_bytes()).unwrap(), attrs);
    let Some(key) = std::str::from_utf8(key)
        .ok()
        .and_then(|k| k.parse::<SubnetKey>().ok())
    else {
        return;
    };
    let cfg = cfg();
    let _ = attrs.validate(&key, cfg.network, cfg.subnet_len);
    assert!(matches!(
        attrs.peer_ipv6(&key, None),
        PeerIpv6::Skipped(_)
    ));
    let v6 = cfg.ipv6.as_ref().unwrap();
    if let PeerIpv6::Usable {
        subnet,
        public_ipv6,
    } = attrs.peer_ipv6(&key, Some(v6))
    {
        assert_eq!(Some(subnet), key.ipv6);
        assert_eq!(Some(public_ipv6), attrs.public_ipv6);
        assert!(v6.network.contains(subnet.network()) && subnet.prefix() == v6.subnet_len);
        assert!(!v6.network.contains(public_ipv6));
        assert!(
            !public_ipv6.is_unspecified()
                && !public_ipv6.is_loopback()
                && !public_ipv6.is_multicast()
        );
    }
});
