//! The wireguard backend's decisions, without I/O: what a lease advertises and what a peer's
//! lease means, which WireGuard peers the device must hold, the ops that take a device from what
//! it holds to that (none when nothing changed), and the link's address, route and MTU.
//!
//! The same plan serves the kernel device (ops become generic-netlink requests) and the
//! userspace one (ops update its peer table).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use ipnetwork::{IpNetwork, Ipv4Network};
use serde_json::Value;
use tweed_config::network::decode_wg_key;
use tweed_config::LeaseAttrs;

use super::key::{encode, PublicKey};
use crate::backend::route::canonical;
use crate::backend::{device_addr, overlay_route, plan_l3_device, PeerSkip};
use crate::netlink::{Addr, Link, Op, Route};

/// flannel's overhead for the device MTU: outer IPv6 (40) + UDP (8) + WireGuard (32), rounded
/// so IPv4 and IPv6 underlays get one figure.
pub const WG_OVERHEAD: u32 = 80;

/// The lease's `BackendData`: `{"PublicKey":"<base64>","Port":<ListenPort>}`, in flannel's
/// field order (a JSON value would sort the keys), so both write the same bytes.
pub fn backend_data(public: &PublicKey, port: u16) -> Box<serde_json::value::RawValue> {
    serde_json::value::RawValue::from_string(format!(r#"{{"PublicKey":"{public}","Port":{port}}}"#))
        .expect("base64 and a number make valid JSON")
}

/// This node's lease value.
pub fn lease_attrs(public_ip: Ipv4Addr, public: &PublicKey, port: u16) -> LeaseAttrs {
    let mut a = LeaseAttrs::new(public_ip, "wireguard", None);
    a.backend_data = Some(backend_data(public, port));
    a
}

/// A remote node as the wireguard backend needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WgPeer {
    pub subnet: Ipv4Network,
    pub public_ip: Ipv4Addr,
    pub public_key: PublicKey,
    pub port: u16,
}

impl WgPeer {
    /// Reads a peer's lease. A lease without `Port` (flannel before it was added) means our own
    /// listen port, as flannel reads it; so does 0, which no peer can listen on.
    pub fn from_lease(
        subnet: Ipv4Network,
        attrs: &LeaseAttrs,
        local_port: u16,
    ) -> Result<WgPeer, String> {
        let (public_key, port) =
            read_backend_data(attrs.backend_data.as_deref(), "BackendData", local_port)?;
        Ok(WgPeer {
            subnet,
            public_ip: attrs.public_ip,
            public_key,
            port,
        })
    }

    pub fn endpoint(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.public_ip, self.port)
    }
}

/// Reads a wireguard lease's `BackendData` or `BackendV6Data` (`field`, named in every error):
/// `{"PublicKey":"<base64>","Port":<port>}`. A missing, null or 0 `Port` means `local_port`.
pub fn read_backend_data(
    raw: Option<&serde_json::value::RawValue>,
    field: &str,
    local_port: u16,
) -> Result<(PublicKey, u16), String> {
    let raw = raw.ok_or_else(|| format!("its lease has no {field} (no WireGuard public key)"))?;
    let v: Value =
        serde_json::from_str(raw.get()).map_err(|e| format!("its {field} is not JSON: {e}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| format!("its {field} is not a JSON object"))?;
    let key = match obj.get("PublicKey") {
        Some(Value::String(s)) => {
            decode_wg_key(s).map_err(|e| format!("its {field}.PublicKey: {e}"))?
        }
        Some(other) => return Err(format!("its {field}.PublicKey is not a string: {other}")),
        None => return Err(format!("its {field} has no PublicKey")),
    };
    let port = match obj.get("Port") {
        None | Some(Value::Null) => local_port,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(0) => local_port,
            Some(p) if p <= u16::MAX as u64 => p as u16,
            _ => return Err(format!("its {field}.Port {n} is not a UDP port")),
        },
        Some(other) => return Err(format!("its {field}.Port is not a number: {other}")),
    };
    Ok((PublicKey(key), port))
}

/// One peer as a WireGuard device holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub public_key: PublicKey,
    /// `None` on an observed peer that never had one. IPv6 only on a device of the dual-stack
    /// plan ([`super::dual`]).
    pub endpoint: Option<SocketAddr>,
    /// Sorted (IPv4 before IPv6), canonical.
    pub allowed_ips: Vec<IpNetwork>,
    pub psk: Option<[u8; 32]>,
    /// Seconds; 0 is off.
    pub keepalive: u16,
}

impl PeerSpec {
    /// The IPv4 endpoint (the userspace path's underlay is IPv4).
    pub fn endpoint_v4(&self) -> Option<SocketAddrV4> {
        match self.endpoint? {
            SocketAddr::V4(e) => Some(e),
            SocketAddr::V6(_) => None,
        }
    }

    /// The first IPv4 allowed network: the peer's IPv4 subnet.
    pub fn subnet_v4(&self) -> Option<Ipv4Network> {
        self.allowed_ips.iter().find_map(|n| match n {
            IpNetwork::V4(n) => Some(*n),
            IpNetwork::V6(_) => None,
        })
    }
}

/// A device's WireGuard configuration: its key, port and peers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceSpec {
    pub private_key: Option<[u8; 32]>,
    pub listen_port: u16,
    pub peers: BTreeMap<PublicKey, PeerSpec>,
}

/// One change to a device. Applied in plan order: the device first, then new and changed
/// peers, then removals, so a key rotated under a subnet is served by the new entry before the
/// old one goes.
#[derive(Clone, PartialEq, Eq)]
pub enum WgOp {
    SetDevice {
        private_key: [u8; 32],
        listen_port: u16,
    },
    /// Create or update a peer; its allowed IPs are replaced, not added to.
    SetPeer(PeerSpec),
    RemovePeer(PublicKey),
}

impl std::fmt::Debug for WgOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WgOp::SetDevice { listen_port, .. } => {
                write!(
                    f,
                    "SetDevice {{ private_key: <redacted>, listen_port: {listen_port} }}"
                )
            }
            WgOp::SetPeer(p) => write!(
                f,
                "SetPeer {{ {}, endpoint {:?}, allowed {:?}, psk {}, keepalive {} }}",
                p.public_key,
                p.endpoint,
                p.allowed_ips,
                if p.psk.is_some() { "set" } else { "none" },
                p.keepalive
            ),
            WgOp::RemovePeer(k) => write!(f, "RemovePeer({k})"),
        }
    }
}

impl WgOp {
    /// The subnet an op serves, for failure reports.
    pub fn subnet(&self) -> Option<Ipv4Network> {
        match self {
            WgOp::SetPeer(p) => p.subnet_v4(),
            _ => None,
        }
    }
}

/// What this node is, for choosing its peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    pub network: Ipv4Network,
    pub own_subnet: Ipv4Network,
    pub public_ip: Ipv4Addr,
    pub public_key: PublicKey,
    pub psk: Option<[u8; 32]>,
    pub keepalive: u16,
}

/// The peers the device must hold. Never ourselves (our subnet, our PublicIP or our key), nothing
/// outside the overlay, one owner per subnet and one entry per key (first wins in subnet order,
/// so every node decides the same way); the others come back named, with the reason.
pub fn desired_peers(local: &Local, peers: &[WgPeer]) -> (Vec<PeerSpec>, Vec<PeerSkip>) {
    let own = canonical(local.own_subnet);
    let mut sorted: Vec<WgPeer> = peers
        .iter()
        .map(|p| WgPeer {
            subnet: canonical(p.subnet),
            ..*p
        })
        .collect();
    sorted.sort();
    sorted.dedup();
    let mut taken: Vec<Ipv4Network> = Vec::new();
    let mut keys: BTreeMap<PublicKey, Ipv4Network> = BTreeMap::new();
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for p in sorted {
        let skip = |reason: String| PeerSkip {
            subnet: p.subnet,
            public_ip: p.public_ip,
            reason,
        };
        if p.subnet.overlaps(own) || p.public_ip == local.public_ip {
            continue;
        }
        if p.public_key == local.public_key {
            skipped.push(skip(format!(
                "it advertises this node's own public key {}",
                p.public_key
            )));
            continue;
        }
        if p.subnet.prefix() < local.network.prefix() || !local.network.contains(p.subnet.network())
        {
            skipped.push(skip(format!(
                "its subnet is outside the network {}",
                local.network
            )));
            continue;
        }
        if let Some(t) = taken.iter().find(|t| t.overlaps(p.subnet)) {
            skipped.push(skip(format!("its subnet overlaps {t}, served already")));
            continue;
        }
        if let Some(other) = keys.get(&p.public_key) {
            skipped.push(skip(format!(
                "its public key {} is the one of {other} too; one key is one peer",
                p.public_key
            )));
            continue;
        }
        taken.push(p.subnet);
        keys.insert(p.public_key, p.subnet);
        out.push(PeerSpec {
            public_key: p.public_key,
            endpoint: Some(SocketAddr::V4(p.endpoint())),
            allowed_ips: vec![IpNetwork::V4(p.subnet)],
            psk: local.psk,
            keepalive: local.keepalive,
        });
    }
    (out, skipped)
}

/// The ops taking `observed` to `desired`: nothing when they are equal. An observed endpoint
/// different from the lease's (kernel WireGuard moves it to wherever the last authenticated
/// packet came from) is a difference, so the endpoint is set back.
pub fn plan(observed: &DeviceSpec, desired: &DeviceSpec) -> Vec<WgOp> {
    let mut ops = Vec::new();
    if let Some(k) = desired.private_key {
        if observed.private_key != Some(k) || observed.listen_port != desired.listen_port {
            ops.push(WgOp::SetDevice {
                private_key: k,
                listen_port: desired.listen_port,
            });
        }
    }
    for (k, want) in &desired.peers {
        if observed.peers.get(k) != Some(want) {
            ops.push(WgOp::SetPeer(want.clone()));
        }
    }
    let want: BTreeSet<&PublicKey> = desired.peers.keys().collect();
    ops.extend(
        observed
            .peers
            .keys()
            .filter(|k| !want.contains(k))
            .map(|k| WgOp::RemovePeer(*k)),
    );
    ops
}

/// The device as it is after `ops` succeeded.
pub fn apply_to(spec: &mut DeviceSpec, ops: &[WgOp]) {
    for op in ops {
        match op {
            WgOp::SetDevice {
                private_key,
                listen_port,
            } => {
                spec.private_key = Some(*private_key);
                spec.listen_port = *listen_port;
            }
            WgOp::SetPeer(p) => {
                spec.peers.insert(p.public_key, p.clone());
            }
            WgOp::RemovePeer(k) => {
                spec.peers.remove(k);
            }
        }
    }
}

pub fn device_spec(private_key: [u8; 32], listen_port: u16, peers: Vec<PeerSpec>) -> DeviceSpec {
    DeviceSpec {
        private_key: Some(private_key),
        listen_port,
        peers: peers.into_iter().map(|p| (p.public_key, p)).collect(),
    }
}

/// The link side of the device: MTU, up, the subnet's network address as /32, and one route
/// for the whole overlay through it (the pod bridge's more specific route keeps local traffic
/// local).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSpec {
    pub network: Ipv4Network,
    pub own_subnet: Ipv4Network,
    pub mtu: u32,
}

/// flannel's device MTU: the configured MTU (or the underlay's) minus [`WG_OVERHEAD`].
pub fn device_mtu(configured: u32, underlay_mtu: u32) -> u32 {
    let base = if configured != 0 {
        configured
    } else {
        underlay_mtu
    };
    base.saturating_sub(WG_OVERHEAD)
}

impl LinkSpec {
    pub fn addr(&self) -> Ipv4Network {
        device_addr(self.own_subnet)
    }

    pub fn route(&self, ifindex: u32) -> Route {
        overlay_route(self.network, ifindex)
    }
}

/// What the link needs to match `spec`; `routes` are the main-table routes through it.
pub fn plan_link(spec: &LinkSpec, link: &Link, addrs: &[Addr], routes: &[Route]) -> Vec<Op> {
    plan_l3_device(
        link,
        addrs,
        routes,
        spec.mtu,
        spec.addr(),
        spec.route(link.index),
    )
}

/// For logs: a key as `wg show` prints it.
pub fn show_key(k: &[u8; 32]) -> String {
    encode(k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::wireguard::key::PrivateKey;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }
    fn key(n: u8) -> PublicKey {
        PublicKey([n; 32])
    }
    fn lease(json: &str) -> LeaseAttrs {
        LeaseAttrs::parse(json.as_bytes()).unwrap()
    }
    fn local() -> Local {
        Local {
            network: net("10.244.0.0/16"),
            own_subnet: net("10.244.1.0/24"),
            public_ip: "198.18.0.1".parse().unwrap(),
            public_key: key(1),
            psk: None,
            keepalive: 0,
        }
    }
    fn peer(subnet: &str, ip: &str, k: u8) -> WgPeer {
        WgPeer {
            subnet: net(subnet),
            public_ip: ip.parse().unwrap(),
            public_key: key(k),
            port: 51820,
        }
    }

    #[test]
    fn lease_data_is_flannels_and_reads_back() {
        let k = PrivateKey::generate().public();
        let attrs = lease_attrs("198.18.0.1".parse().unwrap(), &k, 51820);
        assert_eq!(
            attrs.to_json(),
            format!(
                r#"{{"PublicIP":"198.18.0.1","BackendType":"wireguard","BackendData":{{"PublicKey":"{k}","Port":51820}}}}"#
            )
        );
        let p = WgPeer::from_lease(net("10.244.2.0/24"), &attrs, 1).unwrap();
        assert_eq!(p.public_key, k);
        assert_eq!(p.endpoint().to_string(), "198.18.0.1:51820");
    }

    #[test]
    fn a_lease_without_port_means_our_port() {
        let k = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
        for data in [
            format!(r#"{{"PublicKey":"{k}"}}"#),
            format!(r#"{{"PublicKey":"{k}","Port":null}}"#),
            format!(r#"{{"PublicKey":"{k}","Port":0}}"#),
        ] {
            let a = lease(&format!(
                r#"{{"PublicIP":"198.18.0.2","BackendType":"wireguard","BackendData":{data}}}"#
            ));
            let p = WgPeer::from_lease(net("10.244.2.0/24"), &a, 51999).unwrap();
            assert_eq!(p.port, 51999, "{data}");
        }
    }

    #[test]
    fn hostile_backend_data_is_refused_with_a_reason() {
        let k = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
        for (data, want) in [
            ("null".to_string(), "no BackendData"),
            ("[]".to_string(), "not a JSON object"),
            ("{}".to_string(), "no PublicKey"),
            (r#"{"PublicKey":7}"#.to_string(), "not a string"),
            (r#"{"PublicKey":"short"}"#.to_string(), "PublicKey"),
            (
                r#"{"PublicKey":"AAECAwQFBgcICQoLDA0ODw=="}"#.to_string(),
                "16",
            ),
            (
                format!(r#"{{"PublicKey":"{}"}}"#, "A".repeat(10_000)),
                "PublicKey",
            ),
            (
                format!(r#"{{"PublicKey":"{k}","Port":65536}}"#),
                "not a UDP port",
            ),
            (
                format!(r#"{{"PublicKey":"{k}","Port":-5}}"#),
                "not a UDP port",
            ),
            (
                format!(r#"{{"PublicKey":"{k}","Port":1.5}}"#),
                "not a UDP port",
            ),
            (
                format!(r#"{{"PublicKey":"{k}","Port":"51820"}}"#),
                "not a number",
            ),
        ] {
            let a = lease(&format!(
                r#"{{"PublicIP":"198.18.0.2","BackendType":"wireguard","BackendData":{data}}}"#
            ));
            let e = WgPeer::from_lease(net("10.244.2.0/24"), &a, 51820).unwrap_err();
            assert!(e.contains(want), "{data}: {e}");
        }
        let a = lease(r#"{"PublicIP":"198.18.0.2","BackendType":"wireguard"}"#);
        assert!(WgPeer::from_lease(net("10.244.2.0/24"), &a, 51820).is_err());
    }

    #[test]
    fn peers_are_subnet_and_endpoint_from_the_lease() {
        let (peers, skipped) = desired_peers(
            &local(),
            &[
                peer("10.244.3.0/24", "198.18.0.3", 3),
                peer("10.244.2.0/24", "198.18.0.2", 2),
            ],
        );
        assert!(skipped.is_empty());
        assert_eq!(
            peers,
            vec![
                PeerSpec {
                    public_key: key(2),
                    endpoint: Some("198.18.0.2:51820".parse().unwrap()),
                    allowed_ips: vec![net("10.244.2.0/24").into()],
                    psk: None,
                    keepalive: 0,
                },
                PeerSpec {
                    public_key: key(3),
                    endpoint: Some("198.18.0.3:51820".parse().unwrap()),
                    allowed_ips: vec![net("10.244.3.0/24").into()],
                    psk: None,
                    keepalive: 0,
                },
            ]
        );
        let l = Local {
            psk: Some([9; 32]),
            keepalive: 25,
            ..local()
        };
        let (peers, _) = desired_peers(&l, &[peer("10.244.2.0/24", "198.18.0.2", 2)]);
        assert_eq!((peers[0].psk, peers[0].keepalive), (Some([9; 32]), 25));
    }

    #[test]
    fn ourselves_strangers_and_conflicts_are_left_out() {
        let (peers, skipped) = desired_peers(
            &local(),
            &[
                // Our own lease.
                peer("10.244.1.0/24", "198.18.0.1", 1),
                // Someone claiming our key.
                peer("10.244.4.0/24", "198.18.0.4", 1),
                // Outside the overlay.
                peer("10.9.0.0/24", "198.18.0.9", 9),
                // Two subnets with one key: the first (in subnet order) wins.
                peer("10.244.5.0/24", "198.18.0.5", 5),
                peer("10.244.6.0/24", "198.18.0.6", 5),
                // Overlapping subnets.
                peer("10.244.7.0/24", "198.18.0.7", 7),
                peer("10.244.7.0/25", "198.18.0.8", 8),
            ],
        );
        let got: Vec<_> = peers.iter().map(|p| p.allowed_ips[0].to_string()).collect();
        assert_eq!(got, ["10.244.5.0/24", "10.244.7.0/24"]);
        let reasons: Vec<_> = skipped
            .iter()
            .map(|s| (s.subnet.to_string(), &s.reason))
            .collect();
        assert_eq!(reasons.len(), 4, "{reasons:?}");
        assert!(reasons[0].1.contains("outside"), "{reasons:?}");
        assert!(reasons[1].1.contains("own public key"), "{reasons:?}");
        assert!(reasons[2].1.contains("one key is one peer"), "{reasons:?}");
        assert!(reasons[3].1.contains("overlaps"), "{reasons:?}");
    }

    #[test]
    fn an_unchanged_device_costs_nothing_and_changes_are_minimal() {
        let (peers, _) = desired_peers(
            &local(),
            &[
                peer("10.244.2.0/24", "198.18.0.2", 2),
                peer("10.244.3.0/24", "198.18.0.3", 3),
            ],
        );
        let want = device_spec([1; 32], 51820, peers.clone());
        let empty = DeviceSpec::default();
        let ops = plan(&empty, &want);
        assert_eq!(ops.len(), 3);
        assert!(matches!(
            ops[0],
            WgOp::SetDevice {
                listen_port: 51820,
                ..
            }
        ));
        let mut have = empty.clone();
        apply_to(&mut have, &ops);
        assert_eq!(have, want);
        assert_eq!(plan(&have, &want), vec![], "a second pass writes nothing");

        // The kernel roamed peer 2's endpoint: it is set back from the lease, nothing else.
        let mut roamed = have.clone();
        roamed.peers.get_mut(&key(2)).unwrap().endpoint = Some("203.0.113.9:4444".parse().unwrap());
        assert_eq!(plan(&roamed, &want), vec![WgOp::SetPeer(peers[0].clone())]);

        // A stale peer no lease names goes; a new port changes only the device.
        let mut stale = have.clone();
        stale.peers.insert(
            key(8),
            PeerSpec {
                public_key: key(8),
                ..peers[0].clone()
            },
        );
        assert_eq!(plan(&stale, &want), vec![WgOp::RemovePeer(key(8))]);
        let moved = DeviceSpec {
            listen_port: 51000,
            ..want.clone()
        };
        assert_eq!(
            plan(&have, &moved),
            vec![WgOp::SetDevice {
                private_key: [1; 32],
                listen_port: 51000
            }]
        );
    }

    #[test]
    fn a_rotated_key_replaces_the_old_peer_entry() {
        // flannel keeps the old entry (k3s#5216); here the new key is set first, then the old
        // one goes, so the subnet is never without a peer.
        let (before, _) = desired_peers(&local(), &[peer("10.244.2.0/24", "198.18.0.2", 2)]);
        let (after, _) = desired_peers(&local(), &[peer("10.244.2.0/24", "198.18.0.2", 22)]);
        let have = device_spec([1; 32], 51820, before);
        let want = device_spec([1; 32], 51820, after.clone());
        assert_eq!(
            plan(&have, &want),
            vec![WgOp::SetPeer(after[0].clone()), WgOp::RemovePeer(key(2))]
        );
        // Our own rotation: only the device's key changes.
        let rotated = DeviceSpec {
            private_key: Some([7; 32]),
            ..want.clone()
        };
        assert_eq!(
            plan(&want, &rotated),
            vec![WgOp::SetDevice {
                private_key: [7; 32],
                listen_port: 51820
            }]
        );
        assert!(!format!("{:?}", plan(&want, &rotated)).contains("[7"));
    }

    #[test]
    fn device_mtu_and_link_plan_follow_flannel() {
        assert_eq!(device_mtu(0, 1500), 1420);
        assert_eq!(device_mtu(1400, 1500), 1320);
        assert_eq!(device_mtu(0, 9001), 8921);
        let spec = LinkSpec {
            network: net("10.244.0.0/16"),
            own_subnet: net("10.244.1.0/24"),
            mtu: 1420,
        };
        let link = |mtu, up| Link {
            index: 9,
            name: "tweed-wg".into(),
            mtu,
            kind: Some("wireguard".into()),
            up,
            ..Default::default()
        };
        let ops = plan_link(&spec, &link(1420, false), &[], &[]);
        assert_eq!(
            ops,
            vec![
                Op::LinkSetUp {
                    name: "tweed-wg".into()
                },
                Op::AddrAdd {
                    ifindex: 9,
                    addr: net("10.244.1.0/32")
                },
                Op::RouteReplace(spec.route(9)),
            ]
        );
        let addrs = [Addr {
            ifindex: 9,
            net: net("10.244.1.0/32"),
        }];
        assert_eq!(
            plan_link(&spec, &link(1420, true), &addrs, &[spec.route(9)]),
            vec![]
        );
        assert_eq!(
            plan_link(&spec, &link(1500, true), &addrs, &[spec.route(9)]),
            vec![Op::LinkSetMtu {
                name: "tweed-wg".into(),
                mtu: 1420
            }]
        );
        assert_eq!(spec.route(9).gateway, None);
        assert_eq!(spec.route(9).dst, net("10.244.0.0/16"));
    }
}
