//! cargo +nightly fuzz run lease_key: every lease key form (flannel's IPv4 and dual-stack key,
//! tweed's IPv6-only key) from hostile text: parsed or refused, never a panic; what parses is in
//! its one canonical spelling, has no host bits and no IPv4-mapped IPv6 part, and is read by
//! exactly one of the two forms.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tweed_config::{Ipv6OnlyKey, LeaseKey, SubnetKey};

const P: &str = "/coreos.com/network";

fn v6_ok<N: std::fmt::Display>(n: N, ip: std::net::Ipv6Addr, network: std::net::Ipv6Addr) {
    assert_eq!(ip, network, "host bits in {n}");
    assert!(ip.to_ipv4_mapped().is_none(), "IPv4-mapped {n}");
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let flannel = text.parse::<SubnetKey>();
    let v6only = text.parse::<Ipv6OnlyKey>();
    assert!(
        !(flannel.is_ok() && v6only.is_ok()),
        "{text:?} read by both key forms"
    );
    if let Ok(k) = flannel {
        assert_eq!(k.to_string(), text, "not canonical");
        assert_eq!(k.ipv4.ip(), k.ipv4.network(), "host bits in {}", k.ipv4);
        if let Some(n) = k.ipv6 {
            v6_ok(n, n.ip(), n.network());
        }
        let etcd = k.etcd_key(P);
        assert_eq!(SubnetKey::from_etcd_key(P, &etcd).unwrap().unwrap(), k);
    }
    if let Ok(k) = v6only {
        assert_eq!(k.to_string(), text, "not canonical");
        v6_ok(k.ipv6, k.ipv6.ip(), k.ipv6.network());
    }
    match text.parse::<LeaseKey>() {
        Ok(k) => {
            assert_eq!(k.to_string(), text);
            assert_eq!(k.ipv4(), flannel.as_ref().ok().map(|f| f.ipv4));
            assert_eq!(
                k.ipv6(),
                flannel
                    .as_ref()
                    .ok()
                    .and_then(|f| f.ipv6)
                    .or(v6only.as_ref().ok().map(|v| v.ipv6))
            );
        }
        Err(_) => assert!(flannel.is_err() && v6only.is_err(), "{text:?}"),
    }
});
