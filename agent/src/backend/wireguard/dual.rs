//! The wireguard backend over both address families (issues 18 and 19), as a pure plan: for
//! flannel's `Mode`, which WireGuard devices a dual-stack node runs, their ports, addresses,
//! routes and MTU, and each device's peers (allowed IPs and endpoint) from the peers' leases.
//!
//! flannel v0.28.9's layout, which this follows so mixed clusters agree:
//! - `separate` (the default): `flannel-wg` on `ListenPort` for IPv4 and a second device
//!   `flannel-wg-v6` on `ListenPortV6` for IPv6, both with the node's one key. A peer's v4 half
//!   is a peer of the first (allowed IPs its v4 subnet, endpoint `PublicIP:Port`), its v6 half a
//!   peer of the second (its v6 subnet, `[PublicIPv6]:Port` from `BackendV6Data`).
//! - `ipv4` | `ipv6` | `auto`: one device on `ListenPort` carrying both families; each peer's
//!   allowed IPs are both of its subnets, its endpoint on the IPv4 underlay (`ipv4`), the IPv6
//!   one (`ipv6`), or per peer by flannel's rule (`auto`, [`auto_endpoint`]).
//! - Each device holds its subnet's network address (/32, /128) and one scope-link route for the
//!   whole network of its family (IPv4 `Network`, `IPv6Network`); MTU is MTU − 80 for both (80
//!   is already the IPv6-underlay figure).
//!
//! tweed's device names are `tweed-wg` ([`super::DEVICE`]) and `tweed-wg-v6` ([`DEVICE_V6`]).
//! The lease advertises the v6 half as `BackendV6Data {"PublicKey","Port"}` where `Port` is the
//! port IPv6 peers are actually served on: `ListenPortV6` in `separate` mode, `ListenPort` in
//! the single-device modes (where flannel's own device listens on `ListenPort` only).
//!
//! [`device_spec`] turns a planned device into what the kernel path's reconcile writes over
//! generic netlink (IPv6 endpoints and allowed IPs included). [`super::WgBackend::reconcile_dual`]
//! runs every mode on both paths: the single-device modes on one device (the userspace path's
//! socket is IPv6 in `ipv6` mode, IPv4 otherwise), `separate`'s two devices as a kernel link or
//! a second userspace device with an IPv6 socket (docs/wireguard.md).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use ipnetwork::{IpNetwork, Ipv6Network};
use tweed_config::{Ipv6Config, LeaseAttrs, PeerIpv6, SubnetKey, WireguardMode};

use super::key::PublicKey;
use super::plan::{backend_data, desired_peers, read_backend_data, Local, WgPeer};
use crate::backend::PeerSkip;

/// The IPv6 device of `separate` mode (flannel's `flannel-wg-v6`).
pub const DEVICE_V6: &str = "tweed-wg-v6";

/// This node's IPv6 half.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local6 {
    pub network: Ipv6Network,
    pub own_subnet: Ipv6Network,
    pub public_ipv6: Ipv6Addr,
}

/// This node, for the dual-stack plan. `v6: None` is a node running IPv4 only (the network has
/// no IPv6 half, or this node has no IPv6 underlay address): every mode is then one IPv4 device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DualLocal {
    pub mode: WireguardMode,
    pub v4: Local,
    pub v6: Option<Local6>,
    pub listen_port: u16,
    pub listen_port_v6: u16,
    /// The devices' MTU (configured or underlay MTU − 80).
    pub mtu: u32,
}

impl DualLocal {
    /// Whether this node runs a second device for IPv6.
    pub fn separate(&self) -> bool {
        self.mode == WireguardMode::Separate && self.v6.is_some()
    }

    /// Whether peers' IPv6 halves are reached at their `PublicIPv6` (rather than riding the
    /// IPv4 endpoint of a shared device).
    pub fn ipv6_endpoints(&self) -> bool {
        matches!(self.mode, WireguardMode::Separate | WireguardMode::Ipv6)
    }

    /// The port this node serves IPv6 peers on (what its `BackendV6Data.Port` says).
    pub fn v6_port(&self) -> u16 {
        v6_port(self.mode, self.listen_port, self.listen_port_v6)
    }
}

/// The port a node in `mode` serves IPv6 peers on: `ListenPortV6` on `separate`'s second
/// device, else the one device's `ListenPort`.
pub fn v6_port(mode: WireguardMode, listen_port: u16, listen_port_v6: u16) -> u16 {
    if mode == WireguardMode::Separate {
        listen_port_v6
    } else {
        listen_port
    }
}

/// Why `ip` cannot be a peer's WireGuard endpoint on the IPv6 underlay, if it cannot: a
/// link-local address needs an interface the lease does not name, an IPv4-mapped one is an
/// IPv4 peer in disguise (its IPv4 half has the endpoint), and multicast, loopback or
/// unspecified addresses reach no peer.
pub fn endpoint6_unusable(ip: Ipv6Addr) -> Option<&'static str> {
    let seg = ip.segments();
    if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if seg[0] & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else if seg[..5] == [0; 5] && seg[5] == 0xffff {
        Some("IPv4-mapped")
    } else {
        None
    }
}

/// A peer's IPv6 half as the wireguard backend needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WgPeer6 {
    pub subnet: Ipv6Network,
    pub public_ipv6: Ipv6Addr,
    pub public_key: PublicKey,
    /// `BackendV6Data.Port`, or our own v6 port when the lease has none.
    pub port: u16,
}

/// One peer lease, both halves. The IPv4 half is required (tweedd runs IPv4 in every network);
/// the IPv6 half carries why it is missing, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DualPeer {
    pub v4: WgPeer,
    pub v6: Result<WgPeer6, String>,
}

impl DualPeer {
    /// Reads a peer's lease (`key` names both its subnets); `ipv6` is this node's view of the
    /// network's IPv6 half (`None`: it runs IPv4 only). A bad v6 half never rejects the lease:
    /// the peer is then reached over IPv4 only.
    pub fn from_lease(
        key: &SubnetKey,
        attrs: &LeaseAttrs,
        ipv6: Option<&Ipv6Config>,
        local: &DualLocal,
    ) -> Result<DualPeer, String> {
        let v4 = WgPeer::from_lease(key.ipv4, attrs, local.listen_port)?;
        let v6 = match attrs.peer_ipv6(key, ipv6) {
            PeerIpv6::Skipped(why) => Err(why.to_string()),
            PeerIpv6::Usable { public_ipv6, .. }
                if local.ipv6_endpoints() && endpoint6_unusable(public_ipv6).is_some() =>
            {
                Err(format!(
                    "its PublicIPv6 {public_ipv6} is {}: not an endpoint for {DEVICE_V6}",
                    endpoint6_unusable(public_ipv6).expect("checked")
                ))
            }
            PeerIpv6::Usable {
                subnet,
                public_ipv6,
            } => read_backend_data(
                attrs.backend_v6_data.as_deref(),
                "BackendV6Data",
                local.v6_port(),
            )
            .map(|(public_key, port)| WgPeer6 {
                subnet,
                public_ipv6,
                public_key,
                port,
            }),
        };
        Ok(DualPeer { v4, v6 })
    }
}

/// This node's lease value: `BackendData {"PublicKey","Port":ListenPort}` and, on a dual-stack
/// node, `PublicIPv6` and `BackendV6Data {"PublicKey","Port":<v6 port>}` ([`DualLocal::v6_port`]).
pub fn lease_attrs(local: &DualLocal) -> LeaseAttrs {
    let mut a =
        super::plan::lease_attrs(local.v4.public_ip, &local.v4.public_key, local.listen_port);
    if let Some(v6) = &local.v6 {
        a.public_ipv6 = Some(v6.public_ipv6);
        a.backend_v6_data = Some(backend_data(&local.v4.public_key, local.v6_port()));
    }
    a
}

/// One peer as a device of the dual plan holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DualPeerSpec {
    pub public_key: PublicKey,
    pub endpoint: SocketAddr,
    /// The peer node's IPv4 endpoint (`PublicIP:Port`), whatever device and endpoint this
    /// entry is for: the userspace path's peer table knows nodes by it, so `tweed-wg-v6`'s
    /// workers route a peer's IPv6 subnet to the entry under it.
    pub node: std::net::SocketAddrV4,
    /// v4 first, then v6; each canonical.
    pub allowed_ips: Vec<IpNetwork>,
    pub psk: Option<[u8; 32]>,
    pub keepalive: u16,
}

/// One WireGuard device of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePlan {
    pub name: &'static str,
    pub listen_port: u16,
    pub mtu: u32,
    /// The subnet network address of each family the device carries (/32, /128).
    pub addrs: Vec<IpNetwork>,
    /// Scope-link routes through the device: the whole network of each family it carries.
    pub routes: Vec<IpNetwork>,
    pub peers: Vec<DualPeerSpec>,
}

/// An IPv6 half left out, and why (its IPv4 half may still be served).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip6 {
    pub v4_subnet: ipnetwork::Ipv4Network,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DualPlan {
    pub devices: Vec<DevicePlan>,
    pub skipped: Vec<PeerSkip>,
    pub skipped_v6: Vec<Skip6>,
}

/// flannel's `auto` endpoint rule, for a peer with both underlay addresses: IPv4 when the peer's
/// `PublicIP` is not private (RFC 1918) and this node has an IPv4 address (a tweed node always
/// has); else IPv6 when both the peer's and this node's `PublicIPv6` are not private (ULA
/// fc00::/7); else IPv4.
pub fn auto_endpoint(peer_v4: Ipv4Addr, peer_v6: Ipv6Addr, own_v6: Ipv6Addr) -> IpAddr {
    let ula = |a: Ipv6Addr| a.segments()[0] & 0xfe00 == 0xfc00;
    if !peer_v4.is_private() {
        IpAddr::V4(peer_v4)
    } else if !ula(peer_v6) && !ula(own_v6) {
        IpAddr::V6(peer_v6)
    } else {
        IpAddr::V4(peer_v4)
    }
}

fn v6_socket(ip: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0))
}

/// The devices this node runs and what each holds. Peers are chosen by their IPv4 half exactly
/// as on an IPv4-only node ([`desired_peers`]: never ourselves, nothing outside the network, one
/// owner per subnet, one entry per key); a chosen peer's IPv6 half is added when it is usable,
/// inside `IPv6Network`, not ours, overlapping no other peer's, and (on a shared device) under
/// the same key as its IPv4 half. What is left out comes back with the reason.
pub fn plan_dual(local: &DualLocal, peers: &[DualPeer]) -> DualPlan {
    let v4_peers: Vec<WgPeer> = peers.iter().map(|p| p.v4).collect();
    let (specs, skipped) = desired_peers(&local.v4, &v4_peers);
    let mut plan = DualPlan {
        skipped,
        ..Default::default()
    };
    let v4_dev = |peers| DevicePlan {
        name: super::DEVICE,
        listen_port: local.listen_port,
        mtu: local.mtu,
        addrs: vec![IpNetwork::V4(crate::backend::device_addr(
            local.v4.own_subnet,
        ))],
        routes: vec![IpNetwork::V4(crate::backend::route::canonical(
            local.v4.network,
        ))],
        peers,
    };
    let Some(l6) = &local.v6 else {
        let peers = specs
            .iter()
            .map(|s| DualPeerSpec {
                public_key: s.public_key,
                endpoint: s.endpoint.expect("desired peers have endpoints"),
                node: s.endpoint_v4().expect("desired peers have IPv4 endpoints"),
                allowed_ips: s.allowed_ips.clone(),
                psk: s.psk,
                keepalive: s.keepalive,
            })
            .collect();
        plan.devices.push(v4_dev(peers));
        return plan;
    };

    // The chosen peers' leases, in the chosen order.
    let by_v4: BTreeMap<(PublicKey, ipnetwork::Ipv4Network), &DualPeer> = peers
        .iter()
        .map(|p| {
            (
                (
                    p.v4.public_key,
                    crate::backend::route::canonical(p.v4.subnet),
                ),
                p,
            )
        })
        .collect();
    let own6 = Ipv6Network::new(l6.own_subnet.network(), l6.own_subnet.prefix())
        .expect("a valid prefix stays valid");
    let mut taken6: Vec<Ipv6Network> = Vec::new();
    let mut keys6: BTreeSet<PublicKey> = BTreeSet::new();
    // Each chosen peer with its usable v6 half (if any).
    let mut chosen: Vec<(&super::plan::PeerSpec, Option<WgPeer6>)> = Vec::new();
    for s in &specs {
        let v4_subnet = s.subnet_v4().expect("desired peers have an IPv4 subnet");
        let p = by_v4[&(s.public_key, v4_subnet)];
        let skip = |reason: String| Skip6 { v4_subnet, reason };
        let half = match &p.v6 {
            Err(why) => {
                plan.skipped_v6.push(skip(why.clone()));
                None
            }
            Ok(h) => {
                let subnet = Ipv6Network::new(h.subnet.network(), h.subnet.prefix())
                    .expect("a valid prefix stays valid");
                if subnet.overlaps(own6) || h.public_ipv6 == l6.public_ipv6 {
                    plan.skipped_v6
                        .push(skip(format!("its IPv6 subnet {subnet} is this node's")));
                    None
                } else if subnet.prefix() < l6.network.prefix()
                    || !l6.network.contains(subnet.network())
                {
                    plan.skipped_v6.push(skip(format!(
                        "its IPv6 subnet {subnet} is outside {}",
                        l6.network
                    )));
                    None
                } else if let Some(t) = taken6.iter().find(|t| t.overlaps(subnet)) {
                    plan.skipped_v6.push(skip(format!(
                        "its IPv6 subnet {subnet} overlaps {t}, served already"
                    )));
                    None
                } else if h.public_key == local.v4.public_key {
                    plan.skipped_v6.push(skip(format!(
                        "its BackendV6Data advertises this node's own public key {}",
                        h.public_key
                    )));
                    None
                } else if !local.separate() && h.public_key != s.public_key {
                    plan.skipped_v6.push(skip(format!(
                        "its BackendV6Data.PublicKey {} is not its BackendData.PublicKey {}; \
                         one device holds one key per peer",
                        h.public_key, s.public_key
                    )));
                    None
                } else if local.separate() && !keys6.insert(h.public_key) {
                    plan.skipped_v6.push(skip(format!(
                        "its BackendV6Data.PublicKey {} is another peer's too",
                        h.public_key
                    )));
                    None
                } else {
                    taken6.push(subnet);
                    Some(WgPeer6 { subnet, ..*h })
                }
            }
        };
        chosen.push((s, half));
    }

    let v4_entry = |s: &super::plan::PeerSpec| DualPeerSpec {
        public_key: s.public_key,
        endpoint: s.endpoint.expect("desired peers have endpoints"),
        node: s.endpoint_v4().expect("desired peers have IPv4 endpoints"),
        allowed_ips: s.allowed_ips.clone(),
        psk: s.psk,
        keepalive: s.keepalive,
    };
    if local.separate() {
        plan.devices
            .push(v4_dev(chosen.iter().map(|(s, _)| v4_entry(s)).collect()));
        let peers6 = chosen
            .iter()
            .filter_map(|(s, h)| {
                let h = h.as_ref()?;
                Some(DualPeerSpec {
                    public_key: h.public_key,
                    endpoint: v6_socket(h.public_ipv6, h.port),
                    node: s.endpoint_v4().expect("desired peers have IPv4 endpoints"),
                    allowed_ips: vec![IpNetwork::V6(h.subnet)],
                    psk: s.psk,
                    keepalive: s.keepalive,
                })
            })
            .collect();
        plan.devices.push(DevicePlan {
            name: DEVICE_V6,
            listen_port: local.listen_port_v6,
            mtu: local.mtu,
            addrs: vec![IpNetwork::V6(crate::backend::v6::device_addr6(
                l6.own_subnet,
            ))],
            routes: vec![IpNetwork::V6(l6.network)],
            peers: peers6,
        });
        return plan;
    }

    // One device for both families.
    let mut peers_out = Vec::new();
    for (s, h) in &chosen {
        let mut e = v4_entry(s);
        let v4_ep = e.endpoint;
        // The shared device listens on ListenPort only: the v6 endpoint uses the peer's
        // BackendData port, whatever its BackendV6Data says.
        let v6_ep = h.map(|h| v6_socket(h.public_ipv6, v4_ep.port()));
        e.endpoint = match (local.mode, v6_ep) {
            (WireguardMode::Ipv6, Some(ep)) => ep,
            (WireguardMode::Ipv6, None) => {
                plan.skipped.push(PeerSkip {
                    subnet: s.subnet_v4().expect("desired peers have an IPv4 subnet"),
                    public_ip: *s.endpoint_v4().expect("desired peers have endpoints").ip(),
                    reason: "Mode ipv6 reaches peers over the IPv6 underlay and its IPv6 half \
                             is not usable"
                        .into(),
                });
                continue;
            }
            (WireguardMode::Auto, Some(ep)) => {
                let SocketAddr::V4(v4) = v4_ep else {
                    unreachable!("the v4 entry's endpoint is IPv4")
                };
                let SocketAddr::V6(v6) = ep else {
                    unreachable!("built as IPv6 above")
                };
                match auto_endpoint(*v4.ip(), *v6.ip(), l6.public_ipv6) {
                    IpAddr::V4(_) => v4_ep,
                    IpAddr::V6(_) => ep,
                }
            }
            _ => v4_ep,
        };
        if let Some(h) = h {
            e.allowed_ips.push(IpNetwork::V6(h.subnet));
        }
        peers_out.push(e);
    }
    let mut dev = v4_dev(peers_out);
    dev.addrs
        .push(IpNetwork::V6(crate::backend::v6::device_addr6(
            l6.own_subnet,
        )));
    dev.routes.push(IpNetwork::V6(l6.network));
    plan.devices.push(dev);
    plan
}

/// A device of the plan as the kernel path's reconcile takes it ([`super::kernel::reconcile`]):
/// the same key on every device, the device's port and peers.
pub fn device_spec(dev: &DevicePlan, private_key: [u8; 32]) -> super::plan::DeviceSpec {
    super::plan::device_spec(
        private_key,
        dev.listen_port,
        dev.peers
            .iter()
            .map(|p| {
                let mut allowed_ips = p.allowed_ips.clone();
                allowed_ips.sort();
                super::plan::PeerSpec {
                    public_key: p.public_key,
                    endpoint: Some(p.endpoint),
                    allowed_ips,
                    psk: p.psk,
                    keepalive: p.keepalive,
                }
            })
            .collect(),
    )
}

/// The IPv6 side of a planned device's link, against what it holds now: its IPv6 subnet
/// address (/128, nodad, stale global ones removed; link-local left to the kernel) and the
/// scope-link route for `IPv6Network` through it (any other non-kernel IPv6 route through the
/// device goes). Nothing when the device carries no IPv6 or already matches. The IPv4 side is
/// [`crate::backend::plan_l3_device`], as on an IPv4-only node.
pub fn plan_link6(
    dev: &DevicePlan,
    ifindex: u32,
    addrs: &[crate::netlink::Addr6],
    routes: &[crate::netlink::Route6],
) -> Vec<crate::netlink::Op> {
    use crate::netlink::{Op, Route, Route6};
    let Some(addr) = dev.addrs.iter().find_map(|a| match a {
        IpNetwork::V6(a) => Some(*a),
        IpNetwork::V4(_) => None,
    }) else {
        return Vec::new();
    };
    let mut ops = crate::backend::v6::plan_addresses6(ifindex, addrs, addr);
    let want: Vec<Route6> = dev
        .routes
        .iter()
        .filter_map(|r| match r {
            IpNetwork::V6(n) => Some(Route6 {
                dst: Ipv6Network::new(n.network(), n.prefix()).expect("a valid prefix"),
                gateway: None,
                oif: Some(ifindex),
                onlink: false,
                metric: Route6::DEFAULT_METRIC,
                protocol: Route::PROTO_STATIC,
            }),
            IpNetwork::V4(_) => None,
        })
        .collect();
    let ours: Vec<&Route6> = routes
        .iter()
        .filter(|r| r.oif == Some(ifindex) && r.protocol != Route::PROTO_KERNEL)
        .collect();
    ops.extend(
        want.iter()
            .filter(|w| !ours.contains(w))
            .map(|w| Op::Route6Replace(*w)),
    );
    ops.extend(
        ours.iter()
            .filter(|r| !want.contains(r))
            .map(|r| Op::Route6Del(**r)),
    );
    ops
}

/// WireGuard's receive-side check (allowed IPs as a source filter): whether the decrypted
/// `inner` packet's source address lies in one of the sending peer's `allowed` networks. Anything
/// that is not a whole enough IPv4 or IPv6 header is refused, and an IPv4-mapped IPv6 source
/// (`::ffff:a.b.c.d`) is matched as IPv6, so it never passes for an allowed IPv4 address.
pub fn source_allowed(allowed: &[IpNetwork], inner: &[u8]) -> bool {
    let src: IpAddr = match inner.first().map(|b| b >> 4) {
        Some(4) if inner.len() >= 20 => {
            IpAddr::V4(Ipv4Addr::new(inner[12], inner[13], inner[14], inner[15]))
        }
        Some(6) if inner.len() >= 40 => {
            let b: [u8; 16] = inner[8..24].try_into().expect("16 bytes");
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return false,
    };
    allowed.iter().any(|n| match (n, src) {
        (IpNetwork::V4(n), IpAddr::V4(a)) => n.contains(a),
        (IpNetwork::V6(n), IpAddr::V6(a)) => n.contains(a),
        _ => false,
    })
}

#[cfg(test)]
mod tests;
