//! The IPv6 half of the vxlan and host-gw data planes, as pure plans (issue 19 item 2).
//!
//! vxlan: a second device `tweed-v6.<VNI>` (same VNI and port as `tweed.<VNI>`, local VTEP the
//! node's `PublicIPv6`) and per peer with a usable IPv6 half the IPv6 twins of the v4 entries:
//! FDB `<peer VtepMAC> dst <peer PublicIPv6>`, NDP `<peer v6 subnet address> lladdr <VtepMAC>`,
//! route `<peer v6 subnet> via <peer v6 subnet address> dev tweed-v6.<VNI> onlink` (flannel's
//! layout and field names, `BackendV6Data {"VNI","VtepMAC"}`). host-gw: `<peer v6 subnet> via
//! <peer PublicIPv6>` on the underlay, only for peers on a directly connected IPv6 network.
//!
//! [`V6Plane`] runs these plans beside the IPv4 backend: the agent's data plane sets it up after
//! the backend and reconciles it after every IPv4 reconcile and repair. It re-reads the kernel
//! each time (no cached view), so a drifted v6 entry is put back on the next reconcile.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv6Addr;

use ipnetwork::Ipv6Network;
use tweed_config::lease::VxlanLeaseData;
use tweed_config::{Ipv6Config, LeaseAttrs, PeerIpv6, SubnetKey};

use super::{DataPlane, Remote};
use crate::netlink::{
    Addr6, FdbEntry6, Link, MacAddr, Neighbour6, Netlink, NetlinkError, Op, Route, Route6,
    VxlanSpec,
};

/// Outer IPv6 (40) + UDP (8) + VXLAN (8) + inner Ethernet (14): an IPv6 underlay costs 20 bytes
/// more than flannel's 50, which assumes an IPv4 outer header; 50 would make full-size inner
/// packets 20 bytes too big for the underlay.
pub const VXLAN6_OVERHEAD: u32 = 70;

/// The IPv6 vxlan device's MTU for an underlay of `underlay_mtu`.
pub fn device_mtu6(underlay_mtu: u32) -> u32 {
    underlay_mtu.saturating_sub(VXLAN6_OVERHEAD)
}

/// The MTU pods get (subnet.env's `TWEED_MTU`, status, metrics): the IPv4 backend's device MTU,
/// or, when the node runs the IPv6 vxlan device (`v6_device_mtu`), the smaller of the two, so a
/// full-size IPv6 packet fits `tweed-v6.<VNI>` without a Packet Too Big round first. An MTU
/// override in the network config is what the operator asked pods to get: it wins as for IPv4.
/// Each device keeps its own MTU; only what pods are told changes.
pub fn pod_mtu(v4_device_mtu: u32, mtu_override: bool, v6_device_mtu: Option<u32>) -> u32 {
    match v6_device_mtu {
        Some(v6) if !mtu_override => v4_device_mtu.min(v6),
        _ => v4_device_mtu,
    }
}

pub fn device_name(vni: u32) -> String {
    format!("tweed-v6.{vni}")
}

/// The IPv6 vxlan device: same VNI and port as the IPv4 one, so a flannel dual-stack node (which
/// does the same) interoperates; MTU from the underlay minus [`VXLAN6_OVERHEAD`].
pub fn device_spec(
    vni: u32,
    port: u16,
    public_ipv6: Ipv6Addr,
    underlay: u32,
    underlay_mtu: u32,
    mac: MacAddr,
) -> VxlanSpec {
    VxlanSpec {
        name: device_name(vni),
        vni,
        port,
        local: public_ipv6.into(),
        underlay,
        learning: false,
        mtu: Some(device_mtu6(underlay_mtu)),
        mac: Some(mac),
    }
}

/// A peer's IPv6 half as the vxlan backend programs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vxlan6Peer {
    pub subnet: Ipv6Network,
    pub public_ipv6: Ipv6Addr,
    pub vtep_mac: MacAddr,
}

impl Vxlan6Peer {
    /// The peer's IPv6 half, or why there is none (the peer then gets IPv4 programming only).
    pub fn from_lease(
        key: &SubnetKey,
        attrs: &LeaseAttrs,
        ipv6: Option<&Ipv6Config>,
    ) -> Result<Vxlan6Peer, String> {
        let (subnet, public_ipv6) = match attrs.peer_ipv6(key, ipv6) {
            PeerIpv6::Usable {
                subnet,
                public_ipv6,
            } => (subnet, public_ipv6),
            PeerIpv6::Skipped(reason) => return Err(reason.to_string()),
        };
        let raw = attrs
            .backend_v6_data
            .as_ref()
            .ok_or("the peer's lease has no BackendV6Data")?;
        let data: VxlanLeaseData =
            serde_json::from_str(raw.get()).map_err(|e| format!("BackendV6Data: {e}"))?;
        let vtep_mac: MacAddr = data
            .vtep_mac
            .parse()
            .map_err(|e| format!("BackendV6Data: {e}"))?;
        if !vtep_mac.is_valid_unicast() {
            return Err(format!("BackendV6Data: VtepMAC {vtep_mac} is not unicast"));
        }
        Ok(Vxlan6Peer {
            subnet,
            public_ipv6,
            vtep_mac,
        })
    }

    /// The peer's subnet address, held by its IPv6 vxlan device.
    pub fn gateway(&self) -> Ipv6Addr {
        self.subnet.network()
    }
}

/// What the IPv6 device holds (or as this node last left it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed6 {
    pub ifindex: u32,
    pub own_subnet: Option<Ipv6Network>,
    pub local: Option<Ipv6Addr>,
    pub neighbours: Vec<Neighbour6>,
    pub fdb: Vec<FdbEntry6>,
    pub routes: Vec<Route6>,
}

fn canonical6(n: Ipv6Network) -> Ipv6Network {
    Ipv6Network::new(n.network(), n.prefix()).expect("prefix of a valid network")
}

/// Ops turning `observed` into exactly `desired` on the IPv6 device: only what is missing or
/// different is written, only permanent entries and non-kernel routes on the device are removed
/// (what this plan would have made). Deletes first; per peer FDB, NDP, route, so a route never
/// points at an unresolvable next hop. Never ourselves, one owner per subnet and per MAC.
pub fn plan_vxlan6(observed: &Observed6, desired: &[Vxlan6Peer]) -> Vec<Op> {
    let dev = observed.ifindex;
    let mut by_subnet: BTreeMap<Ipv6Network, Vxlan6Peer> = BTreeMap::new();
    for p in desired {
        let subnet = canonical6(p.subnet);
        if observed.own_subnet.is_some_and(|o| o.overlaps(subnet))
            || Some(p.public_ipv6) == observed.local
            || !p.vtep_mac.is_valid_unicast()
        {
            continue;
        }
        by_subnet
            .entry(subnet)
            .or_insert(Vxlan6Peer { subnet, ..*p });
    }
    let mut macs = HashSet::new();
    let peers: Vec<Vxlan6Peer> = by_subnet
        .into_values()
        .filter(|p| macs.insert(p.vtep_mac))
        .collect();

    let want_routes: Vec<Route6> = peers
        .iter()
        .map(|p| Route6::onlink(p.subnet, p.gateway(), dev))
        .collect();
    let want_neigh: HashSet<Ipv6Addr> = peers.iter().map(|p| p.gateway()).collect();
    let our_routes: Vec<&Route6> = observed
        .routes
        .iter()
        .filter(|r| r.oif == Some(dev) && r.protocol != Route::PROTO_KERNEL)
        .collect();

    let mut ops = Vec::new();
    for r in &our_routes {
        if !want_routes
            .iter()
            .any(|w| w.dst == r.dst && w.metric == r.metric)
        {
            ops.push(Op::Route6Del(**r));
        }
    }
    for n in &observed.neighbours {
        if n.ifindex == dev && n.permanent && !want_neigh.contains(&n.ip) {
            ops.push(Op::Neigh6Del {
                ifindex: dev,
                ip: n.ip,
            });
        }
    }
    for e in &observed.fdb {
        let wanted = peers
            .iter()
            .any(|p| p.vtep_mac == e.mac && e.dst == Some(p.public_ipv6));
        if e.ifindex == dev && e.permanent && e.mac.is_valid_unicast() && !wanted {
            ops.push(Op::Fdb6Del {
                ifindex: dev,
                mac: e.mac,
                dst: e.dst,
            });
        }
    }
    for (p, want) in peers.iter().zip(&want_routes) {
        let fdb_ok = observed.fdb.iter().any(|e| {
            e.ifindex == dev && e.permanent && e.mac == p.vtep_mac && e.dst == Some(p.public_ipv6)
        });
        if !fdb_ok {
            ops.push(Op::Fdb6Replace {
                ifindex: dev,
                mac: p.vtep_mac,
                dst: p.public_ipv6,
            });
        }
        let neigh_ok = observed.neighbours.iter().any(|n| {
            n.ifindex == dev && n.ip == p.gateway() && n.permanent && n.mac == Some(p.vtep_mac)
        });
        if !neigh_ok {
            ops.push(Op::Neigh6Replace {
                ifindex: dev,
                ip: p.gateway(),
                mac: p.vtep_mac,
            });
        }
        if !our_routes.iter().any(|r| r.same_path(want)) {
            ops.push(Op::Route6Replace(*want));
        }
    }
    ops
}

/// host-gw's IPv6 half: a peer whose `PublicIPv6` lies on a directly connected IPv6 network of
/// the underlay (a connected route without gateway covers it: the same L2 check as IPv4) gets
/// `<v6 subnet> via <PublicIPv6> dev <underlay>`; others are skipped with the reason. `routes` is
/// the IPv6 main table; routes inside `network` are the overlay's and never count as connected.
pub fn plan_hostgw6(
    network: Ipv6Network,
    own_subnet: Ipv6Network,
    underlay: u32,
    routes: &[Route6],
    peers: &[(Ipv6Network, Ipv6Addr)],
) -> (Vec<Op>, Vec<(Ipv6Network, &'static str)>) {
    let mut skipped = Vec::new();
    let mut want: BTreeMap<Ipv6Network, Route6> = BTreeMap::new();
    for (subnet, ip) in peers {
        let subnet = canonical6(*subnet);
        if subnet.overlaps(own_subnet) {
            continue;
        }
        match on_segment6(network, underlay, routes, *ip) {
            Ok(()) => {
                want.entry(subnet)
                    .or_insert(Route6::via(subnet, *ip, Some(underlay)));
            }
            Err(why) => skipped.push((subnet, why)),
        }
    }
    let ours: Vec<&Route6> = routes
        .iter()
        .filter(|r| {
            r.oif == Some(underlay)
                && r.gateway.is_some()
                && !r.onlink
                && r.protocol != Route::PROTO_KERNEL
                && network.contains(r.dst.network())
                && r.dst.prefix() >= network.prefix()
                && !r.dst.overlaps(own_subnet)
        })
        .collect();
    let mut ops: Vec<Op> = ours
        .iter()
        .filter(|r| !want.contains_key(&r.dst))
        .map(|r| Op::Route6Del(**r))
        .collect();
    for w in want.values() {
        if !ours.iter().any(|r| r.same_path(w)) {
            ops.push(Op::Route6Replace(*w));
        }
    }
    (ops, skipped)
}

/// Whether `ip` is on a directly connected IPv6 network of the underlay `underlay`: the most
/// specific route covering it (lowest metric among equals) has no gateway and leaves through the
/// underlay. Routes inside the overlay `network` never count. flannel asks the kernel the same
/// question (a route lookup without gateway); the table is what tweed already holds, so the
/// answer is a pure function. `Err` says why not, for host-gw's log.
pub fn on_segment6(
    network: Ipv6Network,
    underlay: u32,
    routes: &[Route6],
    ip: Ipv6Addr,
) -> Result<(), &'static str> {
    let best = routes
        .iter()
        .filter(|r| r.dst.contains(ip) && !network.contains(r.dst.network()))
        .max_by(|a, b| {
            a.dst
                .prefix()
                .cmp(&b.dst.prefix())
                .then(b.metric.cmp(&a.metric))
        });
    match best {
        Some(r) if r.gateway.is_none() && r.oif == Some(underlay) => Ok(()),
        Some(r) if r.gateway.is_none() => Err("its PublicIPv6 is on another interface's network"),
        Some(_) => Err("its PublicIPv6 is behind a router"),
        None => Err("no route covers its PublicIPv6"),
    }
}

/// vxlan's IPv6 `DirectRouting`: where the direct routes go and whether the option is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Direct6 {
    /// The overlay's IPv6 network: which underlay routes can be ours.
    pub network: Ipv6Network,
    /// The underlay device (the one `PublicIPv6` is on).
    pub underlay: u32,
    /// `"DirectRouting": true` in the backend config.
    pub enabled: bool,
}

/// The IPv6 vxlan plan with `DirectRouting` (flannel's behaviour for IPv6 as for IPv4): a peer
/// whose `PublicIPv6` is on this node's IPv6 underlay segment ([`on_segment6`]) gets host-gw's
/// `<v6 subnet> via <PublicIPv6> dev <underlay>` and no FDB/NDP entry; the others get the
/// `tweed-v6.<VNI>` entries of [`plan_vxlan6`]. `observed.routes` is the whole IPv6 main table
/// (the segment check needs the underlay's routes; the vxlan half only looks at the device's).
///
/// A peer switching sides keeps its route key (dst, metric: both kinds use the default metric),
/// so the replace on the new side moves the route in place and the delete the old side would
/// plan is dropped: its traffic never finds no route. Host-gw ops come first, so a peer leaving
/// the tunnel has its direct route before its FDB and NDP entries go. With `enabled` false every
/// peer is tunnelled and a direct route left by an earlier run with the option on is replaced in
/// place by the peer's vxlan route (or deleted when the peer is gone): switching the option off
/// with a restart drops nothing either.
pub fn plan_direct6(d: &Direct6, observed: &Observed6, peers: &[Vxlan6Peer]) -> Vec<Op> {
    let Some(own) = observed.own_subnet else {
        // Without our subnet nothing tells a peer's routes from ours: tunnel only.
        return plan_vxlan6(observed, peers);
    };
    let (direct, tunnelled): (Vec<Vxlan6Peer>, Vec<Vxlan6Peer>) = peers.iter().partition(|p| {
        d.enabled
            && Some(p.public_ipv6) != observed.local
            && !canonical6(p.subnet).overlaps(own)
            && on_segment6(d.network, d.underlay, &observed.routes, p.public_ipv6).is_ok()
    });
    let direct_pairs: Vec<(Ipv6Network, Ipv6Addr)> =
        direct.iter().map(|p| (p.subnet, p.public_ipv6)).collect();
    let direct_set: HashSet<Ipv6Network> = direct.iter().map(|p| canonical6(p.subnet)).collect();
    let tunnel_set: HashSet<Ipv6Network> = tunnelled.iter().map(|p| canonical6(p.subnet)).collect();
    // Every peer of the direct half is on the segment: nothing is skipped there.
    let (hostgw_ops, _) = plan_hostgw6(d.network, own, d.underlay, &observed.routes, &direct_pairs);
    let mut ops: Vec<Op> = hostgw_ops
        .into_iter()
        .filter(|op| !matches!(op, Op::Route6Del(r) if tunnel_set.contains(&r.dst)))
        .collect();
    ops.extend(
        plan_vxlan6(observed, &tunnelled)
            .into_iter()
            .filter(|op| !matches!(op, Op::Route6Del(r) if direct_set.contains(&r.dst))),
    );
    ops
}

/// The node's IPv6 half: the network's IPv6 config, this node's IPv6 subnet and `PublicIPv6`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V6Params {
    pub cfg: Ipv6Config,
    pub own_subnet: Ipv6Network,
    pub public_ipv6: Ipv6Addr,
}

#[derive(Debug, Clone)]
enum Kind {
    Vxlan {
        spec: VxlanSpec,
        ifindex: u32,
        direct_routing: bool,
    },
    HostGw {
        underlay: u32,
    },
    /// udp's TUN device carries IPv6 too (over the IPv4 underlay): it holds the /128 address
    /// and the route for `IPv6Network`, and the workers' table holds the peers' IPv6 halves.
    Udp {
        ifindex: u32,
    },
    /// wireguard's device carrying both families (userspace, `auto`/`ipv4`): the same address
    /// and route as udp's; the peers' IPv6 halves are the backend's own (allowed IPs).
    Wireguard {
        ifindex: u32,
    },
    /// wireguard's `Mode: separate` (either path): the IPv6 pods ride `tweed-wg-v6`,
    /// whose address, route and peers the backend keeps itself; this plane only names the
    /// device for drift repair (and cleared `tweed-wg` of an earlier IPv6 half at set-up).
    WireguardV6 {
        ifindex: u32,
    },
}

/// What a udp lease advertises as `BackendV6Data` (tweed's own: flannel's udp backend has no
/// IPv6): `{"Underlay":"ipv4"}`, "my IPv6 subnet is reached through my udp endpoint, the
/// lease's `PublicIP` and the network's port, over IPv4". A peer takes a udp lease's IPv6 half
/// only with exactly this, so a udp node without IPv6 support in its workers (which would drop
/// every inner IPv6 packet) is never sent any.
pub const UDP_V6_DATA: &str = r#"{"Underlay":"ipv4"}"#;

/// A udp lease's IPv6 half, or why there is none. `PublicIPv6` is not used (the underlay is
/// IPv4), only the key's IPv6 subnet and the `BackendV6Data` marker.
pub fn udp6_peer(
    key: &SubnetKey,
    attrs: &LeaseAttrs,
    ipv6: &Ipv6Config,
    port: u16,
) -> Result<super::UdpPeer6, &'static str> {
    let subnet = key.ipv6.ok_or("the peer's lease has no IPv6 subnet")?;
    if !ipv6.network.contains(subnet.network()) || subnet.prefix() != ipv6.subnet_len {
        return Err("the peer's IPv6 subnet is not a node subnet of IPv6Network");
    }
    let data = attrs
        .backend_v6_data
        .as_ref()
        .ok_or("the peer's lease has no BackendV6Data (its udp backend carries IPv4 only)")?;
    let v: serde_json::Value =
        serde_json::from_str(data.get()).map_err(|_| "BackendV6Data is not JSON")?;
    if v != serde_json::json!({"Underlay": "ipv4"}) {
        return Err("BackendV6Data is not udp's {\"Underlay\":\"ipv4\"}");
    }
    Ok(super::UdpPeer6 {
        subnet,
        public_ip: attrs.public_ip,
        port,
    })
}

/// The route udp's TUN device gets for the whole IPv6 overlay (the IPv6 twin of IPv4's
/// [`super::overlay_route`]; pod bridges' more specific routes keep local traffic local).
pub fn udp_route6(network: Ipv6Network, ifindex: u32) -> Route6 {
    Route6 {
        dst: canonical6(network),
        gateway: None,
        oif: Some(ifindex),
        onlink: false,
        metric: Route6::DEFAULT_METRIC,
        protocol: Route::PROTO_STATIC,
    }
}

/// Ops putting exactly the one overlay route on udp's device among the IPv6 routes tweed could
/// have written there (non-kernel routes through it), plus the /128 address.
pub fn plan_udp6(
    ifindex: u32,
    network: Ipv6Network,
    own_subnet: Ipv6Network,
    addrs: &[Addr6],
    routes: &[Route6],
) -> Vec<Op> {
    let mut ops = plan_addresses6(ifindex, addrs, device_addr6(own_subnet));
    let want = udp_route6(network, ifindex);
    let ours: Vec<&Route6> = routes
        .iter()
        .filter(|r| r.oif == Some(ifindex) && r.protocol != Route::PROTO_KERNEL)
        .collect();
    ops.extend(
        ours.iter()
            .filter(|r| !r.same_path(&want))
            .map(|r| Op::Route6Del(**r)),
    );
    if !ours.iter().any(|r| r.same_path(&want)) {
        ops.push(Op::Route6Replace(want));
    }
    ops
}

/// The IPv6 data plane beside a vxlan or host-gw backend.
#[derive(Debug, Clone)]
pub struct V6Plane {
    params: V6Params,
    kind: Kind,
    /// What set-up had to write (device and address ops): a repair reports these as what it
    /// put back, and records them as echoes.
    setup_ops: Vec<Op>,
}

/// The device decision, as for IPv4: a device with the wanted vxlan attributes and MAC is kept
/// (only its MTU and up state corrected, so a restart drops nothing); anything else is replaced.
pub fn plan_device6(spec: &VxlanSpec, existing: Option<&Link>) -> Vec<Op> {
    let name = spec.name.clone();
    let compatible = existing.filter(|l| {
        l.kind.as_deref() == Some("vxlan") && l.vxlan == Some(spec.attrs()) && l.mac == spec.mac
    });
    let mut ops = Vec::new();
    match compatible {
        Some(l) => {
            if let Some(mtu) = spec.mtu.filter(|m| *m != l.mtu) {
                ops.push(Op::LinkSetMtu {
                    name: name.clone(),
                    mtu,
                });
            }
            if !l.up {
                ops.push(Op::LinkSetUp { name });
            }
        }
        None => {
            if existing.is_some() {
                ops.push(Op::LinkDel { name: name.clone() });
            }
            ops.push(Op::LinkAddVxlan(spec.clone()));
            ops.push(Op::LinkSetUp { name });
        }
    }
    ops
}

/// The address `tweed-v6.<VNI>` holds: our IPv6 subnet's network address as a /128 (flannel
/// puts the same on `flannel-v6.<VNI>`). It gives the host an address inside the overlay to send
/// from, so a reply to the host's own IPv6 traffic into a remote pod comes back through the
/// overlay even on a node with no pod bridge, and it is the address peers' NDP entries name.
pub fn device_addr6(own_subnet: Ipv6Network) -> Ipv6Network {
    Ipv6Network::new(own_subnet.network(), 128).expect("128 is a valid prefix")
}

/// Puts exactly `want` among the device's global addresses: the new one first (nodad: the lease
/// makes it unique, and DAD would leave it unusable for a second or two), then stale ones (an
/// old lease's). Link-local addresses are the kernel's and are left alone.
pub fn plan_addresses6(ifindex: u32, observed: &[Addr6], want: Ipv6Network) -> Vec<Op> {
    let link_local: Ipv6Network = "fe80::/10".parse().expect("valid");
    let mine: Vec<&Addr6> = observed
        .iter()
        .filter(|a| a.ifindex == ifindex && !link_local.contains(a.net.ip()))
        .collect();
    let mut ops = Vec::new();
    if !mine.iter().any(|a| a.net == want) {
        ops.push(Op::Addr6Add {
            ifindex,
            addr: want,
            nodad: true,
        });
    }
    ops.extend(mine.iter().filter(|a| a.net != want).map(|a| Op::Addr6Del {
        ifindex,
        addr: a.net,
    }));
    ops
}

/// What an earlier IPv6 plane left that the current one does not own: a `tweed-v6.*` vxlan device
/// other than `keep_device` (the backend changed from vxlan, the VNI changed, or this node no
/// longer runs dual stack: its entries go with it), and, unless host-gw's IPv6 half runs now
/// (`hostgw6`), host-gw's IPv6 routes: static routes into `network` via a gateway outside it,
/// which no other backend writes. Without a known `network` (the config dropped IPv6) no route is
/// judged, since nothing tells an old overlay route from an operator's.
pub fn leftovers6(
    keep_device: Option<&str>,
    hostgw6: bool,
    network: Option<Ipv6Network>,
    links: &[Link],
    routes: &[Route6],
) -> Vec<Op> {
    let mut ops: Vec<Op> = links
        .iter()
        .filter(|l| {
            l.kind.as_deref() == Some("vxlan")
                && l.name.starts_with("tweed-v6.")
                && keep_device != Some(l.name.as_str())
        })
        .map(|l| Op::LinkDel {
            name: l.name.clone(),
        })
        .collect();
    if let (false, Some(net)) = (hostgw6, network) {
        ops.extend(
            routes
                .iter()
                .filter(|r| {
                    r.protocol == Route::PROTO_STATIC
                        && r.dst.prefix() > net.prefix()
                        && net.contains(r.dst.network())
                        && r.gateway.is_some_and(|gw| !net.contains(gw))
                })
                .map(|r| Op::Route6Del(*r)),
        );
    }
    ops
}

/// What the wireguard device `ifindex` keeps of an IPv6 half this node no longer serves (the
/// kernel device outlives the agent; `Mode: separate` now, no IPv6 underlay address, the
/// lease's IPv6 half gone): its global addresses (the /128) and the non-kernel IPv6 routes
/// through it (`IPv6Network`). Left there, `IPv6Network` would stay routed into a device whose
/// peers carry no IPv6, silently dropping what should be unreachable. Link-local addresses
/// and kernel routes are the kernel's.
pub fn wireguard_leftovers6(ifindex: u32, addrs: &[Addr6], routes: &[Route6]) -> Vec<Op> {
    let link_local: Ipv6Network = "fe80::/10".parse().expect("valid");
    let mut ops: Vec<Op> = routes
        .iter()
        .filter(|r| r.oif == Some(ifindex) && r.protocol != Route::PROTO_KERNEL)
        .map(|r| Op::Route6Del(*r))
        .collect();
    ops.extend(
        addrs
            .iter()
            .filter(|a| a.ifindex == ifindex && !link_local.contains(a.net.ip()))
            .map(|a| Op::Addr6Del {
                ifindex,
                addr: a.net,
            }),
    );
    ops
}

/// Removes [`wireguard_leftovers6`] from the device `ifindex`; the ops applied.
pub async fn remove_wireguard6(nl: &Netlink, ifindex: u32) -> Result<Vec<Op>, NetlinkError> {
    let ops = wireguard_leftovers6(
        ifindex,
        &nl.addresses6(Some(ifindex)).await?,
        &nl.all_routes6().await?,
    );
    first_error(nl.apply_all(&ops).await)?;
    Ok(ops)
}

fn first_error(results: Vec<Result<(), NetlinkError>>) -> Result<(), NetlinkError> {
    results.into_iter().collect()
}

impl V6Plane {
    /// Sets the IPv6 half up next to `backend`: for vxlan the device `tweed-v6.<VNI>` (same VNI,
    /// port and VTEP MAC as the IPv4 device, which is what the lease's `BackendV6Data` says);
    /// host-gw needs no device. Other backends carry no IPv6 yet: `None`.
    pub async fn setup(
        nl: &Netlink,
        params: V6Params,
        backend: &DataPlane,
    ) -> Result<Option<V6Plane>, NetlinkError> {
        let mut setup_ops = Vec::new();
        let kind = match backend {
            DataPlane::Vxlan(b) => {
                let c = b.config();
                let spec = device_spec(
                    c.vni,
                    c.port,
                    params.public_ipv6,
                    c.underlay_ifindex,
                    c.underlay_mtu,
                    b.vtep_mac(),
                );
                let existing = nl.link_by_name(&spec.name).await?;
                let ops = plan_device6(&spec, existing.as_ref());
                first_error(nl.apply_all(&ops).await)?;
                if !ops.is_empty() {
                    tracing::info!(device = %spec.name, local = %params.public_ipv6, ops = ops.len(), "vxlan: IPv6 device set up");
                }
                let ifindex = nl
                    .link_by_name(&spec.name)
                    .await?
                    .map(|l| l.index)
                    .ok_or(NetlinkError::NoSuchLink { ifindex: 0 })?;
                let want = device_addr6(params.own_subnet);
                let addrs = nl.addresses6(Some(ifindex)).await?;
                let addr_ops = plan_addresses6(ifindex, &addrs, want);
                first_error(nl.apply_all(&addr_ops).await)?;
                if !addr_ops.is_empty() {
                    tracing::info!(device = %spec.name, addr = %want, "vxlan: IPv6 device address set");
                }
                setup_ops.extend(ops);
                setup_ops.extend(addr_ops);
                Kind::Vxlan {
                    spec,
                    ifindex,
                    direct_routing: c.direct_routing.is_some(),
                }
            }
            DataPlane::HostGw(b) => Kind::HostGw {
                underlay: b.config().underlay_ifindex,
            },
            DataPlane::Udp(b) => {
                let ifindex = b.ifindex();
                let ops = plan_udp6(
                    ifindex,
                    params.cfg.network,
                    params.own_subnet,
                    &nl.addresses6(Some(ifindex)).await?,
                    &nl.all_routes6().await?,
                );
                first_error(nl.apply_all(&ops).await)?;
                if !ops.is_empty() {
                    tracing::info!(device = crate::backend::udp::DEVICE, addr = %device_addr6(params.own_subnet), network = %params.cfg.network, "udp: IPv6 address and route set");
                }
                setup_ops.extend(ops);
                Kind::Udp { ifindex }
            }
            DataPlane::Wireguard(b) if b.ifindex_v6().is_some() => {
                // tweed-wg carries IPv4 only in this mode: an earlier single-device IPv6 half
                // (its /128, its `IPv6Network` route) must not shadow tweed-wg-v6's.
                setup_ops.extend(remove_wireguard6(nl, b.ifindex()).await?);
                Kind::WireguardV6 {
                    ifindex: b.ifindex_v6().expect("checked"),
                }
            }
            DataPlane::Wireguard(b) if b.carries_v6() => {
                let ifindex = b.ifindex();
                let ops = plan_udp6(
                    ifindex,
                    params.cfg.network,
                    params.own_subnet,
                    &nl.addresses6(Some(ifindex)).await?,
                    &nl.all_routes6().await?,
                );
                first_error(nl.apply_all(&ops).await)?;
                if !ops.is_empty() {
                    tracing::info!(device = crate::backend::wireguard::DEVICE, addr = %device_addr6(params.own_subnet), network = %params.cfg.network, "wireguard: IPv6 address and route set");
                }
                setup_ops.extend(ops);
                Kind::Wireguard { ifindex }
            }
            _ => return Ok(None),
        };
        Ok(Some(V6Plane {
            params,
            kind,
            setup_ops,
        }))
    }

    /// What the last set-up wrote (nothing when the device and its address were in place).
    pub fn setup_ops(&self) -> &[Op] {
        &self.setup_ops
    }

    /// The vxlan device's index (drift repair's way to tell its notifications apart).
    pub fn device(&self) -> Option<(u32, String)> {
        match &self.kind {
            Kind::Vxlan { spec, ifindex, .. } => Some((*ifindex, spec.name.clone())),
            // udp's device is the IPv4 backend's, watched as such.
            Kind::WireguardV6 { ifindex } => Some((
                *ifindex,
                crate::backend::wireguard::dual::DEVICE_V6.to_string(),
            )),
            Kind::HostGw { .. } | Kind::Udp { .. } | Kind::Wireguard { .. } => None,
        }
    }

    /// Programs exactly the usable IPv6 halves of `remotes`; returns the ops applied and the
    /// ones that failed. Peers whose IPv6 half is skipped get nothing here (their IPv4 half is
    /// the backend's), and whatever this plane programmed for them before is removed.
    pub async fn reconcile(
        &mut self,
        nl: &Netlink,
        remotes: &[Remote<'_>],
        backend: &mut DataPlane,
    ) -> Result<(Vec<Op>, Vec<(Op, NetlinkError)>), NetlinkError> {
        let ops = match &self.kind {
            Kind::WireguardV6 { ifindex } => match backend {
                // The backend programmed the device before this (its reconcile runs first).
                DataPlane::Wireguard(b) if b.ifindex_v6() == Some(*ifindex) => Vec::new(),
                // The device was made again, or this node runs no IPv6 device now.
                _ => return Err(NetlinkError::NoSuchLink { ifindex: *ifindex }),
            },
            Kind::Wireguard { ifindex } => {
                match backend {
                    DataPlane::Wireguard(b) if b.ifindex() == *ifindex && b.carries_v6() => {}
                    // The backend changed under us: the data plane sets everything up again.
                    _ => return Err(NetlinkError::NoSuchLink { ifindex: *ifindex }),
                }
                plan_udp6(
                    *ifindex,
                    self.params.cfg.network,
                    self.params.own_subnet,
                    &nl.addresses6(Some(*ifindex)).await?,
                    &nl.all_routes6().await?,
                )
            }
            Kind::Udp { ifindex } => {
                let DataPlane::Udp(b) = backend else {
                    // The backend changed under us: the data plane sets everything up again.
                    return Err(NetlinkError::NoSuchLink { ifindex: *ifindex });
                };
                if b.ifindex() != *ifindex {
                    return Err(NetlinkError::NoSuchLink { ifindex: *ifindex });
                }
                let port = b.port();
                let peers: Vec<super::UdpPeer6> = remotes
                    .iter()
                    .filter(|r| r.attrs.effective_backend_type() == "udp")
                    .filter_map(|r| {
                        let key = SubnetKey {
                            ipv4: r.subnet,
                            ipv6: r.subnet_v6,
                        };
                        udp6_peer(&key, r.attrs, &self.params.cfg, port)
                            .map_err(|why| tracing::debug!(subnet = %r.subnet, "udp: no IPv6 half: {why}"))
                            .ok()
                    })
                    .collect();
                b.set_v6(Some(super::V6Spec {
                    network: self.params.cfg.network,
                    own_subnet: self.params.own_subnet,
                    peers,
                }));
                plan_udp6(
                    *ifindex,
                    self.params.cfg.network,
                    self.params.own_subnet,
                    &nl.addresses6(Some(*ifindex)).await?,
                    &nl.all_routes6().await?,
                )
            }
            Kind::Vxlan {
                ifindex,
                spec,
                direct_routing,
            } => {
                let peers: Vec<Vxlan6Peer> = remotes
                    .iter()
                    .filter(|r| r.attrs.effective_backend_type() == "vxlan")
                    .filter_map(|r| {
                        let key = SubnetKey {
                            ipv4: r.subnet,
                            ipv6: r.subnet_v6,
                        };
                        Vxlan6Peer::from_lease(&key, r.attrs, Some(&self.params.cfg))
                            .map_err(|why| tracing::debug!(subnet = %r.subnet, "vxlan: no IPv6 half programmed: {why}"))
                            .ok()
                    })
                    .collect();
                let dev = *ifindex;
                let routes = nl.all_routes6().await?;
                let observed = Observed6 {
                    ifindex: dev,
                    own_subnet: Some(self.params.own_subnet),
                    local: Some(self.params.public_ipv6),
                    neighbours: nl.neighbours6(dev).await?,
                    fdb: nl.fdb6(dev).await?,
                    routes,
                };
                let direct = Direct6 {
                    network: self.params.cfg.network,
                    underlay: spec.underlay,
                    enabled: *direct_routing,
                };
                plan_direct6(&direct, &observed, &peers)
            }
            Kind::HostGw { underlay } => {
                let peers: Vec<(Ipv6Network, Ipv6Addr)> = remotes
                    .iter()
                    .filter(|r| r.attrs.effective_backend_type() == "host-gw")
                    .filter_map(|r| {
                        let key = SubnetKey {
                            ipv4: r.subnet,
                            ipv6: r.subnet_v6,
                        };
                        match r.attrs.peer_ipv6(&key, Some(&self.params.cfg)) {
                            PeerIpv6::Usable {
                                subnet,
                                public_ipv6,
                            } => Some((subnet, public_ipv6)),
                            PeerIpv6::Skipped(_) => None,
                        }
                    })
                    .collect();
                let routes = nl.all_routes6().await?;
                let (ops, skipped) = plan_hostgw6(
                    self.params.cfg.network,
                    self.params.own_subnet,
                    *underlay,
                    &routes,
                    &peers,
                );
                for (subnet, why) in skipped {
                    tracing::warn!(%subnet, "host-gw: no IPv6 route: {why}");
                }
                ops
            }
        };
        let mut applied = Vec::new();
        let mut failed = Vec::new();
        for (op, res) in ops.iter().zip(nl.apply_all(&ops).await) {
            match res {
                Ok(()) => applied.push(op.clone()),
                Err(e) => failed.push((op.clone(), e)),
            }
        }
        Ok((applied, failed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::model::Tables;

    fn cfg6() -> Ipv6Config {
        Ipv6Config {
            network: "fd00:10:244::/56".parse().unwrap(),
            subnet_len: 64,
            subnet_min: "fd00:10:244:1::".parse().unwrap(),
            subnet_max: "fd00:10:244:ff::".parse().unwrap(),
        }
    }

    fn lease(key: &str, v6: Option<&str>) -> (SubnetKey, LeaseAttrs) {
        let mut json = String::from(
            r#"{"PublicIP":"198.18.0.5","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0a:58:0a:00:00:05"}"#,
        );
        if let Some(ip6) = v6 {
            json.push_str(&format!(
                r#","PublicIPv6":"{ip6}","BackendV6Data":{{"VNI":1,"VtepMAC":"0a:58:0a:00:00:06"}}"#
            ));
        }
        json.push('}');
        (key.parse().unwrap(), serde_json::from_str(&json).unwrap())
    }

    fn observed() -> Observed6 {
        Observed6 {
            ifindex: 9,
            own_subnet: Some("fd00:10:244:3::/64".parse().unwrap()),
            local: Some("2001:db8::3".parse().unwrap()),
            ..Default::default()
        }
    }

    fn after(o: &Observed6, ops: &[Op]) -> Observed6 {
        let mut t = Tables::default();
        for op in o
            .fdb
            .iter()
            .map(|e| Op::Fdb6Replace {
                ifindex: e.ifindex,
                mac: e.mac,
                dst: e.dst.unwrap(),
            })
            .chain(o.neighbours.iter().map(|n| Op::Neigh6Replace {
                ifindex: n.ifindex,
                ip: n.ip,
                mac: n.mac.unwrap(),
            }))
            .chain(o.routes.iter().map(|r| Op::Route6Replace(*r)))
            .chain(ops.iter().cloned())
        {
            let _ = t.apply(&op);
        }
        Observed6 {
            neighbours: t.neighbours6(o.ifindex),
            fdb: t.fdb6_entries(o.ifindex),
            routes: t.routes6.values().copied().collect(),
            ..o.clone()
        }
    }

    #[test]
    fn dual_stack_lease_gives_fdb_ndp_and_onlink_route() {
        let (k, a) = lease("10.244.5.0-24&fd00:10:244:5::-64", Some("2001:db8::5"));
        let p = Vxlan6Peer::from_lease(&k, &a, Some(&cfg6())).unwrap();
        assert_eq!(p.vtep_mac.to_string(), "0a:58:0a:00:00:06");
        let ops = plan_vxlan6(&observed(), &[p]);
        let text: Vec<String> = ops.iter().map(|o| o.to_string()).collect();
        assert_eq!(
            text,
            [
                "fdb replace 0a:58:0a:00:00:06 dst 2001:db8::5 dev #9 self permanent",
                "-6 neigh replace fd00:10:244:5:: lladdr 0a:58:0a:00:00:06 dev #9 nud permanent",
                "-6 route replace fd00:10:244:5::/64 via fd00:10:244:5:: dev #9 onlink metric 1024",
            ]
        );
        // Applied, the same plan is empty: a restart writes nothing.
        let now = after(&observed(), &ops);
        assert!(plan_vxlan6(&now, &[p]).is_empty());
        // The lease goes: everything it had is removed.
        let dels = plan_vxlan6(&now, &[]);
        assert_eq!(dels.len(), 3, "{dels:?}");
        assert!(dels.iter().all(Op::is_delete));
        let gone = after(&now, &dels);
        assert!(gone.fdb.is_empty() && gone.neighbours.is_empty() && gone.routes.is_empty());
    }

    fn udp_lease(key: &str, v6_data: Option<&str>) -> (SubnetKey, LeaseAttrs) {
        let mut json = String::from(r#"{"PublicIP":"198.18.0.5","BackendType":"udp""#);
        if let Some(d) = v6_data {
            json.push_str(&format!(
                r#","PublicIPv6":"2001:db8::5","BackendV6Data":{d}"#
            ));
        }
        json.push('}');
        (key.parse().unwrap(), serde_json::from_str(&json).unwrap())
    }

    #[test]
    fn udp_lease_v6_half_needs_the_marker_and_a_node_subnet() {
        let (k, a) = udp_lease("10.244.5.0-24&fd00:10:244:5::-64", Some(UDP_V6_DATA));
        let p = udp6_peer(&k, &a, &cfg6(), 8285).unwrap();
        assert_eq!(
            (p.subnet.to_string(), p.public_ip.to_string(), p.port),
            ("fd00:10:244:5::/64".into(), "198.18.0.5".into(), 8285)
        );
        // The lease tweed writes parses back to the same half (round trip through the JSON).
        assert_eq!(
            a.to_json().matches(UDP_V6_DATA).count(),
            1,
            "{}",
            a.to_json()
        );
        for (key, data, why) in [
            ("10.244.5.0-24", Some(UDP_V6_DATA), "no IPv6 subnet"),
            ("10.244.5.0-24&fd00:10:244:5::-64", None, "no BackendV6Data"),
            ("10.244.5.0-24&fd00:10:244:5::-64", Some("{}"), "not udp's"),
            (
                "10.244.5.0-24&fd00:10:244:5::-64",
                Some(r#"{"Underlay":"ipv6"}"#),
                "not udp's",
            ),
            (
                "10.244.5.0-24&fd00:10:244:5::-64",
                Some(r#"{"VNI":1,"VtepMAC":"0a:58:0a:00:00:06"}"#),
                "not udp's",
            ),
            (
                "10.244.5.0-24&fd00:99:244:5::-64",
                Some(UDP_V6_DATA),
                "not a node subnet",
            ),
            (
                "10.244.5.0-24&fd00:10:244:5::-80",
                Some(UDP_V6_DATA),
                "not a node subnet",
            ),
        ] {
            let (k, a) = udp_lease(key, data);
            let e = udp6_peer(&k, &a, &cfg6(), 8285).unwrap_err();
            assert!(e.contains(why), "{key} {data:?}: {e}");
        }
    }

    #[test]
    fn udp_device_gets_the_address_and_one_overlay_route() {
        let net: Ipv6Network = "fd00:10:244::/56".parse().unwrap();
        let own: Ipv6Network = "fd00:10:244:3::/64".parse().unwrap();
        let ops = plan_udp6(7, net, own, &[], &[]);
        let text: Vec<String> = ops.iter().map(|o| o.to_string()).collect();
        assert_eq!(text.len(), 2, "{text:?}");
        assert_eq!(
            ops[0],
            Op::Addr6Add {
                ifindex: 7,
                addr: "fd00:10:244:3::/128".parse().unwrap(),
                nodad: true
            }
        );
        assert_eq!(ops[1], Op::Route6Replace(udp_route6(net, 7)));
        // In place: nothing; a stray route through the device (another network's) goes, a
        // kernel route and another device's routes stay.
        let addrs = [Addr6 {
            ifindex: 7,
            net: "fd00:10:244:3::/128".parse().unwrap(),
            tentative: false,
        }];
        let stray = udp_route6("fd00:99::/48".parse().unwrap(), 7);
        let kernel = Route6 {
            protocol: Route::PROTO_KERNEL,
            ..udp_route6("fe80::/64".parse().unwrap(), 7)
        };
        let other = udp_route6("fd00:10:244:9::/64".parse().unwrap(), 8);
        assert!(plan_udp6(7, net, own, &addrs, &[udp_route6(net, 7), kernel, other]).is_empty());
        assert_eq!(
            plan_udp6(7, net, own, &addrs, &[udp_route6(net, 7), stray]),
            vec![Op::Route6Del(stray)]
        );
    }

    #[test]
    fn skipped_v6_half_gives_no_v6_ops() {
        // No PublicIPv6: the IPv4 half stays, the v6 half is skipped with peer_ipv6's reason.
        let (k, a) = lease("10.244.5.0-24&fd00:10:244:5::-64", None);
        let e = Vxlan6Peer::from_lease(&k, &a, Some(&cfg6())).unwrap_err();
        assert!(e.contains("no PublicIPv6"), "{e}");
        // A v4-only key, and this node running v4 only.
        let (k, a) = lease("10.244.5.0-24", Some("2001:db8::5"));
        assert!(Vxlan6Peer::from_lease(&k, &a, Some(&cfg6())).is_err());
        let (k, a) = lease("10.244.5.0-24&fd00:10:244:5::-64", Some("2001:db8::5"));
        assert!(Vxlan6Peer::from_lease(&k, &a, None).is_err());
        // PublicIPv6 inside the overlay.
        let (k, a) = lease("10.244.5.0-24&fd00:10:244:5::-64", Some("fd00:10:244:9::1"));
        assert!(Vxlan6Peer::from_lease(&k, &a, Some(&cfg6())).is_err());
        // The v6 half dropping out removes what it had programmed.
        let (k, a) = lease("10.244.5.0-24&fd00:10:244:5::-64", Some("2001:db8::5"));
        let p = Vxlan6Peer::from_lease(&k, &a, Some(&cfg6())).unwrap();
        let now = after(&observed(), &plan_vxlan6(&observed(), &[p]));
        let dels = plan_vxlan6(&now, &[]);
        assert!(!dels.is_empty() && dels.iter().all(Op::is_delete));
    }

    #[test]
    fn bad_backend_v6_data_is_a_skip() {
        let (k, mut a) = lease("10.244.5.0-24&fd00:10:244:5::-64", Some("2001:db8::5"));
        for bad in [
            r#"{"VNI":1,"VtepMAC":"01:00:5e:00:00:01"}"#,
            r#"{"VNI":1,"VtepMAC":"nope"}"#,
            r#"{"VNI":1}"#,
            r#"[1,2]"#,
        ] {
            a.backend_v6_data = Some(serde_json::value::RawValue::from_string(bad.into()).unwrap());
            assert!(
                Vxlan6Peer::from_lease(&k, &a, Some(&cfg6())).is_err(),
                "{bad}"
            );
        }
        a.backend_v6_data = None;
        assert!(Vxlan6Peer::from_lease(&k, &a, Some(&cfg6())).is_err());
    }

    #[test]
    fn own_subnet_own_vtep_and_duplicate_mac_are_not_programmed() {
        let mac: MacAddr = "0a:58:0a:00:00:06".parse().unwrap();
        let peers = [
            Vxlan6Peer {
                subnet: "fd00:10:244:3::/64".parse().unwrap(),
                public_ipv6: "2001:db8::9".parse().unwrap(),
                vtep_mac: mac,
            },
            Vxlan6Peer {
                subnet: "fd00:10:244:4::/64".parse().unwrap(),
                public_ipv6: "2001:db8::3".parse().unwrap(),
                vtep_mac: "0a:58:0a:00:00:07".parse().unwrap(),
            },
            Vxlan6Peer {
                subnet: "fd00:10:244:5::/64".parse().unwrap(),
                public_ipv6: "2001:db8::5".parse().unwrap(),
                vtep_mac: mac,
            },
            Vxlan6Peer {
                subnet: "fd00:10:244:6::/64".parse().unwrap(),
                public_ipv6: "2001:db8::6".parse().unwrap(),
                vtep_mac: mac,
            },
        ];
        let ops = plan_vxlan6(&observed(), &peers);
        assert_eq!(ops.len(), 3, "{ops:?}");
        assert!(ops
            .iter()
            .all(|o| o.to_string().contains("fd00:10:244:5::")
                || o.to_string().contains("2001:db8::5")));
    }

    #[test]
    fn leftovers6_are_other_ipv6_planes_devices_and_host_gw_routes_only() {
        let link = |name: &str, kind: &str| Link {
            index: 1,
            name: name.into(),
            mtu: 1430,
            mac: None,
            kind: Some(kind.into()),
            up: true,
            vxlan: None,
            master: None,
            alias: None,
        };
        let links = [
            link("tweed-v6.1", "vxlan"),
            link("tweed-v6.2", "vxlan"),
            link("tweed.1", "vxlan"),
            link("tweed-v6.9", "dummy"),
            link("eth0", "veth"),
        ];
        let net: Ipv6Network = "fd00:10:244::/56".parse().unwrap();
        let hostgw = Route6::via(
            "fd00:10:244:3::/64".parse().unwrap(),
            "2001:db8::3".parse().unwrap(),
            Some(2),
        );
        let vxlan = Route6::onlink(
            "fd00:10:244:4::/64".parse().unwrap(),
            "fd00:10:244:4::".parse().unwrap(),
            5,
        );
        let operator = Route6::via(
            "2001:db8:99::/64".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
            Some(2),
        );
        let mut kernel = Route6 {
            protocol: Route::PROTO_KERNEL,
            ..hostgw
        };
        kernel.dst = "fd00:10:244:5::/64".parse().unwrap();
        let whole = Route6::via(net, "2001:db8::1".parse().unwrap(), Some(2));
        let routes = [hostgw, vxlan, operator, kernel, whole];
        let del = |n: &str| Op::LinkDel { name: n.into() };
        // vxlan dual stack, VNI 1: the VNI-2 device and host-gw's route go; nothing else.
        assert_eq!(
            leftovers6(Some("tweed-v6.1"), false, Some(net), &links, &routes),
            vec![del("tweed-v6.2"), Op::Route6Del(hostgw)]
        );
        // host-gw dual stack: every tweed-v6 device goes, its own routes stay.
        assert_eq!(
            leftovers6(None, true, Some(net), &links, &routes),
            vec![del("tweed-v6.1"), del("tweed-v6.2")]
        );
        // The network dropped IPv6: devices go, no route is judged without a network.
        assert_eq!(
            leftovers6(None, false, None, &links, &routes),
            vec![del("tweed-v6.1"), del("tweed-v6.2")]
        );
    }

    #[test]
    fn vxlan6_device_holds_exactly_its_subnet_address() {
        let own: Ipv6Network = "fd00:10:244:7e::/64".parse().unwrap();
        let want = device_addr6(own);
        assert_eq!(want.to_string(), "fd00:10:244:7e::/128");
        let a = |ifindex, net: &str| Addr6 {
            ifindex,
            net: net.parse().unwrap(),
            tentative: false,
        };
        // A fresh device (only the kernel's link-local): add, nodad.
        let fresh = [a(4, "fe80::1/64")];
        assert_eq!(
            plan_addresses6(4, &fresh, want),
            vec![Op::Addr6Add {
                ifindex: 4,
                addr: want,
                nodad: true
            }]
        );
        // Already there: nothing (a restart changes nothing).
        let there = [a(4, "fe80::1/64"), a(4, "fd00:10:244:7e::/128")];
        assert!(plan_addresses6(4, &there, want).is_empty());
        // An old lease's address goes after the new one is added; other devices are not ours.
        let old = [a(4, "fd00:10:244:9::/128"), a(5, "fd00:10:244:1::/128")];
        assert_eq!(
            plan_addresses6(4, &old, want),
            vec![
                Op::Addr6Add {
                    ifindex: 4,
                    addr: want,
                    nodad: true
                },
                Op::Addr6Del {
                    ifindex: 4,
                    addr: "fd00:10:244:9::/128".parse().unwrap()
                },
            ]
        );
    }

    #[test]
    fn vxlan6_device_mtu_is_underlay_minus_70() {
        let s = device_spec(
            1,
            8472,
            "2001:db8::3".parse().unwrap(),
            2,
            1500,
            "0a:58:0a:00:00:03".parse().unwrap(),
        );
        assert_eq!(s.name, "tweed-v6.1");
        assert_eq!(s.mtu, Some(1430));
        assert_eq!(s.attrs().local, Some("2001:db8::3".parse().unwrap()));
    }

    #[test]
    fn hostgw6_routes_only_directly_connected_peers() {
        let network: Ipv6Network = "fd00:10:244::/56".parse().unwrap();
        let own: Ipv6Network = "fd00:10:244:3::/64".parse().unwrap();
        let connected = Route6 {
            dst: "2001:db8::/64".parse().unwrap(),
            gateway: None,
            oif: Some(2),
            onlink: false,
            metric: 256,
            protocol: Route::PROTO_KERNEL,
        };
        let default = Route6::via(
            "::/0".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
            Some(2),
        );
        let routes = vec![connected, default];
        let peers = [
            (
                "fd00:10:244:5::/64".parse().unwrap(),
                "2001:db8::5".parse().unwrap(),
            ),
            (
                "fd00:10:244:6::/64".parse().unwrap(),
                "2001:db9::6".parse().unwrap(),
            ),
            (own, "2001:db8::3".parse().unwrap()),
        ];
        let (ops, skipped) = plan_hostgw6(network, own, 2, &routes, &peers);
        assert_eq!(
            ops.iter().map(|o| o.to_string()).collect::<Vec<_>>(),
            ["-6 route replace fd00:10:244:5::/64 via 2001:db8::5 dev #2 metric 1024"]
        );
        assert_eq!(
            skipped,
            [(
                "fd00:10:244:6::/64".parse().unwrap(),
                "its PublicIPv6 is behind a router"
            )]
        );
        // Applied: nothing more to do; the peer gone: its route is removed.
        let mut now = routes.clone();
        if let Op::Route6Replace(r) = ops[0] {
            now.push(r);
        }
        assert!(plan_hostgw6(network, own, 2, &now, &peers).0.is_empty());
        let (dels, _) = plan_hostgw6(network, own, 2, &now, &[]);
        assert_eq!(dels.len(), 1);
        assert!(dels[0].is_delete());
    }

    /// The underlay (ifindex 2): 2001:db8::/64 connected, everything else via a router.
    fn underlay6() -> Vec<Route6> {
        vec![
            Route6 {
                dst: "2001:db8::/64".parse().unwrap(),
                gateway: None,
                oif: Some(2),
                onlink: false,
                metric: 256,
                protocol: Route::PROTO_KERNEL,
            },
            Route6::via(
                "::/0".parse().unwrap(),
                "2001:db8::1".parse().unwrap(),
                Some(2),
            ),
        ]
    }

    fn direct6(enabled: bool) -> Direct6 {
        Direct6 {
            network: cfg6().network,
            underlay: 2,
            enabled,
        }
    }

    fn peer6(n: u16, public: &str) -> Vxlan6Peer {
        Vxlan6Peer {
            subnet: format!("fd00:10:244:{n:x}::/64").parse().unwrap(),
            public_ipv6: public.parse().unwrap(),
            vtep_mac: format!("0a:58:0a:00:00:{n:02x}").parse().unwrap(),
        }
    }

    /// The device's observed state on top of the underlay routes (the whole main table, as
    /// the plane reads it for DirectRouting).
    fn observed_dr() -> Observed6 {
        Observed6 {
            routes: underlay6(),
            ..observed()
        }
    }

    fn routes_of(o: &Observed6, dst: Ipv6Network) -> Vec<Route6> {
        o.routes.iter().filter(|r| r.dst == dst).copied().collect()
    }

    #[test]
    fn direct_routing6_peer_on_segment_gets_a_direct_route_others_the_tunnel() {
        let near = peer6(5, "2001:db8::5");
        let far = peer6(6, "2001:db9::6");
        let ops = plan_direct6(&direct6(true), &observed_dr(), &[near, far]);
        let text: Vec<String> = ops.iter().map(|o| o.to_string()).collect();
        assert_eq!(
            text,
            [
                "-6 route replace fd00:10:244:5::/64 via 2001:db8::5 dev #2 metric 1024",
                "fdb replace 0a:58:0a:00:00:06 dst 2001:db9::6 dev #9 self permanent",
                "-6 neigh replace fd00:10:244:6:: lladdr 0a:58:0a:00:00:06 dev #9 nud permanent",
                "-6 route replace fd00:10:244:6::/64 via fd00:10:244:6:: dev #9 onlink metric 1024",
            ]
        );
        // No FDB or NDP entry names the direct peer.
        assert!(!text.iter().any(|t| t.contains("2001:db8::5 dev #9")));
        // Applied: the same plan is empty, and the peers going removes everything.
        let now = after(&observed_dr(), &ops);
        assert!(plan_direct6(&direct6(true), &now, &[near, far]).is_empty());
        let dels = plan_direct6(&direct6(true), &now, &[]);
        assert_eq!(dels.len(), 4, "{dels:?}");
        assert!(dels.iter().all(Op::is_delete));
        let gone = after(&now, &dels);
        assert_eq!(gone.routes.len(), underlay6().len());
        assert!(gone.fdb.is_empty() && gone.neighbours.is_empty());
    }

    #[test]
    fn direct_routing6_never_routes_ourselves_or_via_another_interface() {
        let mut routes = underlay6();
        // A connected network on another interface (ifindex 3).
        routes.push(Route6 {
            dst: "2001:db8:77::/64".parse().unwrap(),
            oif: Some(3),
            ..routes[0]
        });
        let o = Observed6 {
            routes,
            ..observed()
        };
        // Our own PublicIPv6 and our own subnet: nothing; another interface's peer: tunnelled.
        let me = peer6(7, "2001:db8::3");
        let own = peer6(3, "2001:db8::33");
        let other_if = peer6(8, "2001:db8:77::8");
        let ops = plan_direct6(&direct6(true), &o, &[me, own, other_if]);
        assert_eq!(ops.len(), 3, "{ops:?}");
        assert!(ops
            .iter()
            .all(|op| !matches!(op, Op::Route6Replace(r) if r.oif == Some(2))));
        assert!(ops.contains(&Op::Route6Replace(Route6::onlink(
            other_if.subnet,
            other_if.gateway(),
            9
        ))));
    }

    #[test]
    fn direct_routing6_moves_a_peer_between_sides_in_place() {
        let near = peer6(5, "2001:db8::5");
        let far = Vxlan6Peer {
            public_ipv6: "2001:db9::5".parse().unwrap(),
            ..near
        };
        // Tunnelled first (behind the router)...
        let o1 = after(
            &observed_dr(),
            &plan_direct6(&direct6(true), &observed_dr(), &[far]),
        );
        assert_eq!(
            routes_of(&o1, near.subnet),
            [Route6::onlink(near.subnet, near.gateway(), 9)]
        );
        // ...then its PublicIPv6 moves onto our segment: the direct route replaces the vxlan
        // one in place (no delete of the route), first; the FDB and NDP entries go after.
        let ops = plan_direct6(&direct6(true), &o1, &[near]);
        assert_eq!(
            ops[0],
            Op::Route6Replace(Route6::via(near.subnet, near.public_ipv6, Some(2)))
        );
        assert!(
            !ops.iter().any(|o| matches!(o, Op::Route6Del(_))),
            "{ops:?}"
        );
        assert!(ops.iter().any(|o| matches!(o, Op::Fdb6Del { .. })));
        assert!(ops.iter().any(|o| matches!(o, Op::Neigh6Del { .. })));
        let o2 = after(&o1, &ops);
        assert_eq!(
            routes_of(&o2, near.subnet),
            [Route6::via(near.subnet, near.public_ipv6, Some(2))]
        );
        assert!(o2.fdb.is_empty() && o2.neighbours.is_empty());
        assert!(plan_direct6(&direct6(true), &o2, &[near]).is_empty());
        // ...and back behind the router: the vxlan route replaces the direct one in place.
        let ops = plan_direct6(&direct6(true), &o2, &[far]);
        assert!(
            !ops.iter().any(|o| matches!(o, Op::Route6Del(_))),
            "{ops:?}"
        );
        let o3 = after(&o2, &ops);
        assert_eq!(
            routes_of(&o3, near.subnet),
            [Route6::onlink(near.subnet, near.gateway(), 9)]
        );
        assert_eq!(o3.fdb.len(), 1);
        assert_eq!(o3.neighbours.len(), 1);
    }

    #[test]
    fn switching_direct_routing6_on_and_off_keeps_every_route() {
        let near = peer6(5, "2001:db8::5");
        let far = peer6(6, "2001:db9::6");
        let peers = [near, far];
        // Off: both tunnelled, exactly as without DirectRouting.
        let off = plan_direct6(&direct6(false), &observed_dr(), &peers);
        assert_eq!(off, plan_vxlan6(&observed_dr(), &peers));
        let o1 = after(&observed_dr(), &off);
        // Switched on: the near peer's route moves to the underlay in place, its entries go;
        // the far peer is untouched.
        let on = plan_direct6(&direct6(true), &o1, &peers);
        assert!(!on.iter().any(|o| matches!(o, Op::Route6Del(_))), "{on:?}");
        assert!(on
            .iter()
            .all(|o| !o.to_string().contains("fd00:10:244:6::")));
        let o2 = after(&o1, &on);
        assert_eq!(
            routes_of(&o2, near.subnet),
            [Route6::via(near.subnet, near.public_ipv6, Some(2))]
        );
        // Switched off again: the direct route is replaced by the vxlan one, never deleted.
        let off2 = plan_direct6(&direct6(false), &o2, &peers);
        assert!(
            !off2.iter().any(|o| matches!(o, Op::Route6Del(_))),
            "{off2:?}"
        );
        let o3 = after(&o2, &off2);
        assert_eq!(
            routes_of(&o3, near.subnet),
            [Route6::onlink(near.subnet, near.gateway(), 9)]
        );
        assert!(plan_direct6(&direct6(false), &o3, &peers).is_empty());
        // A direct route whose peer is gone is removed when the option is off too.
        let stale = plan_direct6(&direct6(false), &o2, &[far]);
        assert!(stale.contains(&Op::Route6Del(Route6::via(
            near.subnet,
            near.public_ipv6,
            Some(2)
        ))));
    }
}
