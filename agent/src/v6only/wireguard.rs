//! wireguard in an IPv6-only network, the decisions: whether this node can run it, the port it
//! listens on and publishes, its lease value, and the peers read from validated leases. The
//! device itself is `backend::wireguard::v6only`'s.

use std::net::{Ipv4Addr, Ipv6Addr};

use tweed_config::{LeaseAttrs, WireguardConfig, WireguardMode};

use super::Peer;
use crate::backend::wireguard::dual::WgPeer6;
use crate::backend::wireguard::plan::{backend_data, read_backend_data};
use crate::backend::wireguard::{PublicKey, WgImpl};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WgV6OnlyError {
    #[error(
        "network config field Backend.Mode: \"ipv4\" puts the WireGuard endpoints on the IPv4 \
         underlay, which an IPv6-only network (EnableIPv4: false) has not; use \"ipv6\" (or \
         leave Mode out)"
    )]
    Ipv4Mode,
    #[error(
        "--wireguard-impl kernel: an IPv6-only network (EnableIPv4: false) runs wireguard on the \
         userspace path only for now; use --wireguard-impl userspace or auto"
    )]
    Kernel,
}

/// Whether this node can run `w` in an IPv6-only network with `implementation`: every mode but
/// `ipv4` (there is no IPv4 underlay), on the userspace path (`auto` picks it here).
pub fn check(w: &WireguardConfig, implementation: WgImpl) -> Result<(), WgV6OnlyError> {
    if w.mode == WireguardMode::Ipv4 {
        return Err(WgV6OnlyError::Ipv4Mode);
    }
    if implementation == WgImpl::Kernel {
        return Err(WgV6OnlyError::Kernel);
    }
    Ok(())
}

/// The port the node listens on and publishes as `BackendV6Data.Port`: the port the IPv6 peers
/// of a dual-stack node of the same `Mode` are served on, so a network switched to IPv6 only
/// keeps its firewall holes: `ListenPortV6` in `separate` (the default, flannel's
/// `flannel-wg-v6`), `ListenPort` in `ipv6` and `auto`.
pub fn port(w: &WireguardConfig) -> u16 {
    crate::backend::wireguard::dual::v6_port(w.mode, w.listen_port, w.listen_port_v6)
}

/// This node's lease value: `PublicIP` 0.0.0.0, the `PublicIPv6`, and `BackendV6Data`
/// `{"PublicKey","Port"}`; no `BackendData` (no IPv4 half to serve).
pub fn lease_attrs(public_ipv6: Ipv6Addr, key: &PublicKey, port: u16) -> LeaseAttrs {
    let mut attrs = LeaseAttrs::new(Ipv4Addr::UNSPECIFIED, "wireguard", None);
    attrs.public_ipv6 = Some(public_ipv6);
    attrs.backend_v6_data = Some(backend_data(key, port));
    attrs
}

/// The wireguard peers among `peers` (validated: their `BackendV6Data` holds a key), oldest
/// claim first; a lease without `Port` (older flannel) means `own_port`, as in dual stack. A
/// wireguard lease whose data cannot be read after all is returned with why, not dropped
/// silently: validation should have refused it, so this is where the two would disagree.
pub fn peers(
    peers: &[Peer],
    own_port: u16,
) -> (Vec<WgPeer6>, Vec<(ipnetwork::Ipv6Network, String)>) {
    let mut out = Vec::new();
    let mut dropped = Vec::new();
    for p in peers
        .iter()
        .filter(|p| p.attrs.effective_backend_type() == "wireguard")
    {
        match read_backend_data(
            p.attrs.backend_v6_data.as_deref(),
            "BackendV6Data",
            own_port,
        ) {
            Ok((public_key, port)) => out.push(WgPeer6 {
                subnet: p.peer.subnet,
                public_ipv6: p.peer.public_ipv6,
                public_key,
                port,
            }),
            Err(why) => dropped.push((p.peer.subnet, why)),
        }
    }
    (out, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v6only::tests::{lease, PREFIX};
    use tweed_config::{BackendConfig, NetworkConfig, ParsedNetwork};

    fn config(backend: &str) -> tweed_config::Ipv6OnlyNetwork {
        let json = format!(
            r#"{{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{backend}}}"#
        );
        match NetworkConfig::parse_any(&json).unwrap() {
            ParsedNetwork::Ipv6Only(n) => n,
            _ => panic!("an IPv6-only config"),
        }
    }

    fn wg(backend: &str) -> WireguardConfig {
        match config(backend).backend {
            BackendConfig::Wireguard(w) => w,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_mode_but_ipv4_runs_on_the_userspace_path_with_its_ipv6_port() {
        let default = wg(r#"{"Type":"wireguard"}"#);
        assert_eq!(check(&default, WgImpl::Auto), Ok(()));
        assert_eq!(check(&default, WgImpl::Userspace), Ok(()));
        assert_eq!(check(&default, WgImpl::Kernel), Err(WgV6OnlyError::Kernel));
        // `separate` (the default): the IPv6 device's port, as a dual-stack node serves IPv6.
        assert_eq!(port(&default), 51821);
        let ports = r#""ListenPort":40000,"ListenPortV6":40001"#;
        for (mode, want) in [("separate", 40001), ("ipv6", 40000), ("auto", 40000)] {
            let w = wg(&format!(
                r#"{{"Type":"wireguard","Mode":"{mode}",{ports}}}"#
            ));
            assert_eq!(check(&w, WgImpl::Auto), Ok(()), "{mode}");
            assert_eq!(port(&w), want, "{mode}");
        }
        let v4 = wg(r#"{"Type":"wireguard","Mode":"ipv4"}"#);
        let e = check(&v4, WgImpl::Auto).unwrap_err();
        assert_eq!(e, WgV6OnlyError::Ipv4Mode);
        assert!(e.to_string().contains("Backend.Mode"), "{e}");
        assert!(crate::v6only::check_backend(&config(r#"{"Type":"wireguard"}"#).backend).is_ok());
    }

    #[test]
    fn our_lease_round_trips_into_a_peer_and_hostile_ones_never_become_peers() {
        let cfg = config(r#"{"Type":"wireguard"}"#);
        let key = crate::backend::wireguard::PrivateKey::from_bytes([7; 32]).public();
        let theirs = lease_attrs("2001:db8::2".parse().unwrap(), &key, 51821);
        let json = theirs.to_json();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["PublicIP"], "0.0.0.0");
        assert_eq!(v["BackendType"], "wireguard");
        assert_eq!(
            v["BackendV6Data"],
            serde_json::json!({"PublicKey": key.to_string(), "Port": 51821})
        );
        let other = |s: &str| s.replace("2001:db8::2", "2001:db8::3");
        let mut bare = LeaseAttrs::new(Ipv4Addr::UNSPECIFIED, "wireguard", None);
        bare.public_ipv6 = Some("2001:db8::6".parse().unwrap());
        let listing = [
            lease("fd00:10:244:2::-64", &json, 1),
            // Hostile: a key that is no key, a dual-stack PublicIP, no key at all; and a lease
            // without Port, which means our own port.
            lease(
                "fd00:10:244:3::-64",
                &other(&json.replace(&key.to_string(), "AAEC")),
                2,
            ),
            lease(
                "fd00:10:244:4::-64",
                &other(&json.replace(",\"Port\":51821", "")),
                3,
            ),
            lease(
                "fd00:10:244:5::-64",
                &other(&json.replace("0.0.0.0", "198.18.0.3")),
                4,
            ),
            lease("fd00:10:244:6::-64", &bare.to_json(), 5),
        ];
        let (found, skipped) = super::super::peers(
            &cfg.ipv6,
            PREFIX,
            &listing,
            Some("fd00:10:244:9::/64".parse().unwrap()),
            "2001:db8::9".parse().unwrap(),
        );
        let (wg, dropped) = peers(&found, 40000);
        assert!(dropped.is_empty(), "{dropped:?}");
        assert_eq!(
            wg,
            vec![
                WgPeer6 {
                    subnet: "fd00:10:244:2::/64".parse().unwrap(),
                    public_ipv6: "2001:db8::2".parse().unwrap(),
                    public_key: key,
                    port: 51821,
                },
                // Its key is the older lease's: the device's plan leaves it out.
                WgPeer6 {
                    subnet: "fd00:10:244:4::/64".parse().unwrap(),
                    public_ipv6: "2001:db8::3".parse().unwrap(),
                    public_key: key,
                    port: 40000,
                },
            ]
        );
        // Should validation and this reading ever disagree, the lease is named, not lost.
        let mut unread = found[0].clone();
        unread.attrs.backend_v6_data = None;
        let (wg, dropped) = peers(&[unread], 40000);
        assert!(wg.is_empty());
        assert_eq!(dropped.len(), 1);
        assert!(dropped[0].1.contains("no BackendV6Data"), "{dropped:?}");
        let rejected: Vec<&str> = skipped.iter().map(|(k, _, _)| k.as_str()).collect();
        assert_eq!(rejected.len(), 3, "{skipped:?}");
        for (k, why, _) in &skipped {
            assert!(
                why.contains("BackendV6Data") || why.contains("PublicIP"),
                "{k}: {why}"
            );
        }
    }
}
