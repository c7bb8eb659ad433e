//! The vxlan backend: one kernel vxlan device `tweed.<VNI>` without learning, and per remote lease
//! three static entries that replace what learning and ARP would otherwise have to discover:
//!
//! - neighbour `<peer subnet address> lladdr <peer VtepMAC>` (permanent),
//! - FDB `<peer VtepMAC> dst <peer PublicIP>` (permanent),
//! - route `<peer subnet> via <peer subnet address> dev tweed.<VNI> onlink`.
//!
//! This is flannel's layout, so tweed and flannel nodes interoperate.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnetwork::Ipv4Network;

use super::hostgw::{self, HostGwConfig, HostGwPeer};
use super::route::canonical;
use super::{apply_plan, check_mtu, device_addr, diff_routes, MtuError, ReconcileStats};
use crate::netlink::model::Tables;
use crate::netlink::{
    Addr, FdbEntry, Link, MacAddr, Neighbour, Netlink, NetlinkError, Op, Route, VxlanSpec,
};

mod inc;
use inc::Kept;

/// IANA assigned 4789, but the Linux default and flannel's is 8472; interoperating with flannel
/// matters more.
pub const DEFAULT_PORT: u16 = 8472;
/// Outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
pub const VXLAN_OVERHEAD: u32 = 50;

#[derive(Debug, thiserror::Error)]
pub enum VxlanError {
    #[error("VTEP MAC file {}: {source}", path.display())]
    MacFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("setting up {device}: {source}")]
    Device {
        device: String,
        #[source]
        source: NetlinkError,
    },

    /// The device disappeared (deleted behind our back); the backend must be set up again.
    #[error("{device} no longer exists; the vxlan backend must be set up again")]
    DeviceGone { device: String },

    #[error("reading the entries of {device}: {source}")]
    Observe {
        device: String,
        #[source]
        source: NetlinkError,
    },

    #[error("vxlan lease for {subnet}: {reason}")]
    PeerData { subnet: Ipv4Network, reason: String },

    #[error(transparent)]
    Mtu(#[from] MtuError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanConfig {
    pub vni: u32,
    pub port: u16,
    /// The node's public IP: the outer source address, and what peers send to.
    pub local_ip: Ipv4Addr,
    pub underlay_ifindex: u32,
    pub underlay_mtu: u32,
    /// This node's lease; its network address goes on the device as a /32.
    pub own_subnet: Ipv4Network,
    /// Where the VTEP MAC survives a device deletion (reboot, incompatible config).
    pub mac_file: PathBuf,
    pub mtu_override: Option<u32>,
    /// `DirectRouting: true`: peers on this node's L2 segment get a plain host-gw route instead
    /// of the tunnel (no encapsulation cost); the others stay on vxlan.
    pub direct_routing: Option<DirectRouting>,
}

/// What DirectRouting needs beyond the vxlan device: where host-gw routes go and which routes
/// can be ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectRouting {
    pub network: Ipv4Network,
    pub underlay_name: String,
}

impl VxlanConfig {
    /// A config with the default port and the MTU derived from the underlay.
    pub fn new(
        vni: u32,
        local_ip: Ipv4Addr,
        underlay_ifindex: u32,
        underlay_mtu: u32,
        own_subnet: Ipv4Network,
        mac_file: PathBuf,
    ) -> VxlanConfig {
        VxlanConfig {
            vni,
            port: DEFAULT_PORT,
            local_ip,
            underlay_ifindex,
            underlay_mtu,
            own_subnet,
            mac_file,
            mtu_override: None,
            direct_routing: None,
        }
    }

    fn hostgw(&self) -> Option<HostGwConfig> {
        self.direct_routing.as_ref().map(|d| HostGwConfig {
            network: d.network,
            own_subnet: self.own_subnet,
            local_ip: self.local_ip,
            underlay_ifindex: self.underlay_ifindex,
            underlay_name: d.underlay_name.clone(),
            underlay_mtu: self.underlay_mtu,
        })
    }

    pub fn device_name(&self) -> String {
        device_name(self.vni)
    }

    /// The device MTU: the override if any, else what fits in one underlay packet.
    pub fn mtu(&self) -> u32 {
        self.mtu_override
            .unwrap_or(self.underlay_mtu.saturating_sub(VXLAN_OVERHEAD))
    }

    /// The address the device carries: the subnet's network address, which is also the
    /// gateway address peers route this subnet through.
    pub fn device_addr(&self) -> Ipv4Network {
        device_addr(self.own_subnet)
    }

    fn spec(&self, mac: Option<MacAddr>) -> VxlanSpec {
        VxlanSpec {
            name: self.device_name(),
            vni: self.vni,
            port: self.port,
            local: self.local_ip.into(),
            underlay: self.underlay_ifindex,
            learning: false,
            mtu: Some(self.mtu()),
            mac,
        }
    }
}

pub fn device_name(vni: u32) -> String {
    format!("tweed.{vni}")
}

/// A remote node as its lease describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VxlanPeer {
    pub subnet: Ipv4Network,
    pub public_ip: Ipv4Addr,
    pub vtep_mac: MacAddr,
}

impl VxlanPeer {
    /// Reads a vxlan lease (flannel's or ours).
    pub fn from_lease(
        subnet: Ipv4Network,
        attrs: &tweed_config::LeaseAttrs,
    ) -> Result<VxlanPeer, VxlanError> {
        let bad = |reason: String| VxlanError::PeerData { subnet, reason };
        let data = attrs.vxlan_data().map_err(|e| bad(e.to_string()))?;
        let vtep_mac: MacAddr = data.vtep_mac.parse().map_err(|e| bad(format!("{e}")))?;
        if !vtep_mac.is_valid_unicast() {
            return Err(bad(format!("VtepMAC {vtep_mac} is not a unicast address")));
        }
        Ok(VxlanPeer {
            subnet,
            public_ip: attrs.public_ip,
            vtep_mac,
        })
    }

    /// Where the peer's subnet is reached: its network address, held by the peer's vxlan device.
    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet.network()
    }
}

/// The vxlan device's entries as the kernel holds them (or as this backend last left them), plus
/// who this node is, which decides which peers must never be programmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedState {
    pub ifindex: u32,
    pub local_ip: Ipv4Addr,
    pub own_subnet: Ipv4Network,
    pub neighbours: Vec<Neighbour>,
    pub fdb: Vec<FdbEntry>,
    pub routes: Vec<Route>,
}

impl ObservedState {
    pub fn empty(ifindex: u32, local_ip: Ipv4Addr, own_subnet: Ipv4Network) -> ObservedState {
        ObservedState {
            ifindex,
            local_ip,
            own_subnet,
            neighbours: Vec::new(),
            fdb: Vec::new(),
            routes: Vec::new(),
        }
    }

    /// Lists the device's neighbours, FDB entries and routes.
    pub async fn observe(
        nl: &Netlink,
        ifindex: u32,
        local_ip: Ipv4Addr,
        own_subnet: Ipv4Network,
    ) -> Result<ObservedState, NetlinkError> {
        Ok(ObservedState {
            neighbours: nl.neighbours(ifindex).await?,
            fdb: nl.fdb(ifindex).await?,
            routes: nl.routes(ifindex).await?,
            ..ObservedState::empty(ifindex, local_ip, own_subnet)
        })
    }

    /// [`after`](Self::after), consuming the state: when it is in the order `after` leaves it
    /// (the backend's kept view always is, a fresh kernel dump need not be), each op is applied
    /// in place by binary search, so a lease event's few ops cost O(ops log n) plus one ordered
    /// pass instead of rebuilding 30,000 entries through maps. Same result either way (tested).
    pub fn into_after(mut self, ops: &[Op]) -> ObservedState {
        if !self.is_ordered() {
            return self.after(ops);
        }
        for op in ops {
            self.apply_ordered(op);
        }
        self
    }

    /// Every entry on our device, neighbours and routes strictly ordered by their keys, FDB
    /// entries grouped by MAC in MAC order: the shape [`after`](Self::after) returns.
    fn is_ordered(&self) -> bool {
        let dev = self.ifindex;
        self.neighbours.iter().all(|n| n.ifindex == dev)
            && self.neighbours.windows(2).all(|w| w[0].ip < w[1].ip)
            && self.fdb.iter().all(|e| e.ifindex == dev)
            && self.fdb.windows(2).all(|w| w[0].mac <= w[1].mac)
            && self.routes.iter().all(|r| r.oif == Some(dev))
            && self
                .routes
                .windows(2)
                .all(|w| (w[0].dst, w[0].metric) < (w[1].dst, w[1].metric))
    }

    /// One op on an ordered state, as [`Tables::apply`] and then the per-device listing would
    /// leave it. Ops the model rejects, and ops on other devices or tables, change nothing.
    fn apply_ordered(&mut self, op: &Op) {
        let dev = self.ifindex;
        match *op {
            Op::NeighReplace { ifindex, ip, mac } if ifindex == dev => {
                let n = Neighbour::permanent(dev, ip, Some(mac));
                match self.neighbours.binary_search_by_key(&ip, |n| n.ip) {
                    Ok(i) => self.neighbours[i] = n,
                    Err(i) => self.neighbours.insert(i, n),
                }
            }
            Op::NeighDel { ifindex, ip } if ifindex == dev => {
                if let Ok(i) = self.neighbours.binary_search_by_key(&ip, |n| n.ip) {
                    self.neighbours.remove(i);
                }
            }
            Op::FdbReplace { ifindex, mac, dst } if ifindex == dev => {
                let lo = self.fdb.partition_point(|e| e.mac < mac);
                let hi = self.fdb.partition_point(|e| e.mac <= mac);
                let new = FdbEntry::permanent(dev, mac, Some(dst));
                let group = &mut self.fdb[lo..hi];
                // vxlan's replace rewrites the remote it names, else the first one.
                match group.iter().position(|e| e.dst == Some(dst)) {
                    Some(i) => group[i] = new,
                    None if group.is_empty() => self.fdb.insert(lo, new),
                    None => group[0] = new,
                }
                for e in &mut self.fdb[lo..hi.max(lo + 1)] {
                    e.permanent = true;
                }
            }
            Op::FdbDel { ifindex, mac, dst } if ifindex == dev => {
                let lo = self.fdb.partition_point(|e| e.mac < mac);
                let hi = self.fdb.partition_point(|e| e.mac <= mac);
                match dst {
                    None => {
                        self.fdb.drain(lo..hi);
                    }
                    Some(d) => {
                        if let Some(i) = self.fdb[lo..hi].iter().position(|e| e.dst == Some(d)) {
                            self.fdb.remove(lo + i);
                        }
                    }
                }
            }
            Op::RouteReplace(r) => {
                let mut r = r;
                if r.protocol == 0 {
                    r.protocol = Route::PROTO_STATIC;
                }
                let found = self
                    .routes
                    .binary_search_by_key(&(r.dst, r.metric), |x| (x.dst, x.metric));
                // The main table's key is (dst, metric): a replace through another device
                // takes the route off ours.
                match (found, r.oif == Some(dev)) {
                    (Ok(i), true) => self.routes[i] = r,
                    (Err(i), true) => self.routes.insert(i, r),
                    (Ok(i), false) => {
                        self.routes.remove(i);
                    }
                    (Err(_), false) => {}
                }
            }
            Op::RouteDel(r) => {
                if let Ok(i) = self
                    .routes
                    .binary_search_by_key(&(r.dst, r.metric), |x| (x.dst, x.metric))
                {
                    let found = self.routes[i];
                    let oif_ok = r.oif.is_none() || r.oif == found.oif;
                    let gw_ok = r.gateway.is_none() || r.gateway == found.gateway;
                    if oif_ok && gw_ok {
                        self.routes.remove(i);
                    }
                }
            }
            _ => {}
        }
    }

    /// The state once `ops` have all succeeded: lets the backend keep an exact view without
    /// re-listing thousands of entries after every lease event.
    pub fn after(&self, ops: &[Op]) -> ObservedState {
        let mut t = Tables::from_entries(&self.neighbours, &self.fdb, &self.routes);
        for op in ops {
            // An op the model rejects (e.g. deleting something absent) leaves it unchanged,
            // exactly as the idempotent kernel apply did.
            let _ = t.apply(op);
        }
        ObservedState {
            neighbours: t.neighbours(self.ifindex),
            fdb: t.fdb_entries(self.ifindex),
            routes: t.routes_via(self.ifindex),
            ..ObservedState::empty(self.ifindex, self.local_ip, self.own_subnet)
        }
    }
}

/// The peers that are actually programmed: never ourselves, subnets without host bits (the
/// kernel reports routes that way, so anything else would be rewritten forever), and one owner
/// per subnet, subnet address and VTEP MAC. Sorted by subnet so plans are deterministic.
fn effective_peers(observed: &ObservedState, desired: &[VxlanPeer]) -> Vec<VxlanPeer> {
    let mut by_subnet: BTreeMap<Ipv4Network, VxlanPeer> = BTreeMap::new();
    for p in desired {
        let subnet = Ipv4Network::new(p.subnet.network(), p.subnet.prefix())
            .expect("prefix of a valid network");
        if subnet.overlaps(observed.own_subnet) || p.public_ip == observed.local_ip {
            continue;
        }
        if !p.vtep_mac.is_valid_unicast() {
            tracing::warn!(subnet = %p.subnet, mac = %p.vtep_mac, "vxlan: ignoring peer with a non-unicast VTEP MAC");
            continue;
        }
        by_subnet
            .entry(subnet)
            .or_insert(VxlanPeer { subnet, ..*p });
    }
    let mut gateways = HashSet::new();
    let mut macs: HashMap<MacAddr, Ipv4Addr> = HashMap::new();
    by_subnet
        .into_values()
        .filter(|p| {
            if !gateways.insert(p.gateway()) {
                tracing::warn!(subnet = %p.subnet, "vxlan: ignoring peer whose subnet address another peer already uses");
                return false;
            }
            // One MAC can reach only one VTEP; two nodes sharing a MAC is a cloned machine.
            match macs.entry(p.vtep_mac) {
                std::collections::hash_map::Entry::Occupied(o) if *o.get() != p.public_ip => {
                    tracing::warn!(subnet = %p.subnet, mac = %p.vtep_mac, other = %o.get(), "vxlan: ignoring peer whose VTEP MAC another node already uses");
                    false
                }
                e => {
                    e.or_insert(p.public_ip);
                    true
                }
            }
        })
        .collect()
}

/// Computes the ops turning `observed` into "exactly `desired`" on the vxlan device.
///
/// Only what is missing or different is (re)written and only entries this backend would have
/// made are deleted: permanent neighbours, permanent unicast FDB entries, and non-kernel routes
/// on the device. Deletes come first so a replace never collides with a stale entry; each
/// peer's entries are added FDB, neighbour, route, so a route never points at an unresolvable
/// next hop.
pub fn plan(observed: &ObservedState, desired: &[VxlanPeer]) -> Vec<Op> {
    let dev = observed.ifindex;
    let peers = effective_peers(observed, desired);

    let want_neigh: HashSet<Ipv4Addr> = peers.iter().map(|p| p.gateway()).collect();
    let want_fdb: HashSet<MacAddr> = peers.iter().map(|p| p.vtep_mac).collect();
    let want_routes: Vec<Route> = peers
        .iter()
        .map(|p| Route::onlink(p.subnet, p.gateway(), dev))
        .collect();

    let neigh: HashMap<Ipv4Addr, &Neighbour> = observed
        .neighbours
        .iter()
        .filter(|n| n.ifindex == dev)
        .map(|n| (n.ip, n))
        .collect();
    let mut fdb: BTreeMap<MacAddr, Vec<&FdbEntry>> = BTreeMap::new();
    for e in &observed.fdb {
        if e.ifindex == dev && e.mac.is_valid_unicast() {
            fdb.entry(e.mac).or_default().push(e);
        }
    }
    let our_routes: Vec<Route> = observed
        .routes
        .iter()
        .filter(|r| r.oif == Some(dev) && r.protocol != Route::PROTO_KERNEL)
        .copied()
        .collect();
    let routes = diff_routes(&our_routes, &want_routes);

    let mut dels = Vec::new();
    dels.extend(routes.delete.iter().map(|r| Op::RouteDel(*r)));
    let mut stale_neigh: Vec<&Neighbour> = neigh
        .values()
        .filter(|n| n.permanent && !want_neigh.contains(&n.ip))
        .copied()
        .collect();
    stale_neigh.sort_by_key(|n| n.ip);
    dels.extend(stale_neigh.iter().map(|n| Op::NeighDel {
        ifindex: dev,
        ip: n.ip,
    }));
    for (mac, entries) in &fdb {
        if !want_fdb.contains(mac) {
            dels.extend(entries.iter().filter(|e| e.permanent).map(|e| Op::FdbDel {
                ifindex: dev,
                mac: *mac,
                dst: e.dst,
            }));
        }
    }

    let replace_routes: HashSet<Ipv4Network> = routes.replace.iter().map(|r| r.dst).collect();
    let mut fdb_done = HashSet::new();
    let mut adds = Vec::new();
    for p in &peers {
        let mac = p.vtep_mac;
        let dst = p.public_ip;
        if fdb_done.insert(mac) {
            match fdb.get(&mac) {
                None => adds.push(Op::FdbReplace {
                    ifindex: dev,
                    mac,
                    dst,
                }),
                Some(entries) => {
                    let exact = entries.iter().any(|e| e.dst == Some(dst) && e.permanent);
                    if exact {
                        // Extra remotes would make the kernel flood a copy to each of them.
                        // Each delete names its remote: without one the whole entry would go.
                        dels.extend(
                            entries
                                .iter()
                                .filter_map(|e| e.dst.filter(|d| *d != dst))
                                .map(|d| Op::FdbDel {
                                    ifindex: dev,
                                    mac,
                                    dst: Some(d),
                                }),
                        );
                    } else {
                        // A replace rewrites the first remote in place, which is all a single
                        // remote needs (no gap in forwarding); several must go first.
                        if entries.len() > 1 {
                            dels.push(Op::FdbDel {
                                ifindex: dev,
                                mac,
                                dst: None,
                            });
                        }
                        adds.push(Op::FdbReplace {
                            ifindex: dev,
                            mac,
                            dst,
                        });
                    }
                }
            }
        }
        let ip = p.gateway();
        if !neigh
            .get(&ip)
            .is_some_and(|n| n.permanent && n.mac == Some(mac))
        {
            adds.push(Op::NeighReplace {
                ifindex: dev,
                ip,
                mac,
            });
        }
        if replace_routes.contains(&p.subnet) {
            adds.push(Op::RouteReplace(Route::onlink(p.subnet, ip, dev)));
        }
    }
    dels.extend(adds);
    dels
}

/// DirectRouting: peers whose PublicIP is on this node's segment get a host-gw route on the
/// underlay, the others the usual vxlan entries. A peer switching sides keeps its route key
/// (dst, metric), so the replace on the new side moves the route in place and the delete the
/// old side would plan is dropped: traffic never finds no route. Host-gw ops come first, so a
/// peer leaving the tunnel has its direct route before its vxlan entries go.
pub fn plan_direct(
    hg: &HostGwConfig,
    routes: &[Route],
    observed: &ObservedState,
    peers: &[VxlanPeer],
) -> Vec<Op> {
    let hpeers: Vec<HostGwPeer> = peers
        .iter()
        .map(|p| HostGwPeer {
            subnet: p.subnet,
            public_ip: p.public_ip,
        })
        .collect();
    // Peers behind a router are exactly what the tunnel is for: no report.
    let (direct, _tunnelled) = hostgw::classify(hg, routes, &hpeers);
    let direct_set: HashSet<Ipv4Network> = direct.iter().map(|p| p.subnet).collect();
    let tunnelled: Vec<VxlanPeer> = peers
        .iter()
        .filter(|p| !direct_set.contains(&canonical(p.subnet)))
        .copied()
        .collect();
    let tunnel_set: HashSet<Ipv4Network> = tunnelled.iter().map(|p| canonical(p.subnet)).collect();
    let mut ops: Vec<Op> = hostgw::plan_routes(hg, routes, &direct)
        .into_iter()
        .filter(|op| !matches!(op, Op::RouteDel(r) if tunnel_set.contains(&r.dst)))
        .collect();
    ops.extend(
        plan(observed, &tunnelled)
            .into_iter()
            .filter(|op| !matches!(op, Op::RouteDel(r) if direct_set.contains(&r.dst))),
    );
    ops
}

/// Which peer an op served, for failure reports.
fn owner(op: &Op, peers: &[VxlanPeer]) -> Option<Ipv4Network> {
    match op {
        Op::RouteReplace(r) | Op::RouteDel(r) => Some(r.dst),
        Op::NeighReplace { ip, .. } | Op::NeighDel { ip, .. } => {
            peers.iter().find(|p| p.gateway() == *ip).map(|p| p.subnet)
        }
        Op::FdbReplace { mac, .. } | Op::FdbDel { mac, .. } => {
            peers.iter().find(|p| p.vtep_mac == *mac).map(|p| p.subnet)
        }
        _ => None,
    }
}

/// What to do about the device itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePlan {
    pub ops: Vec<Op>,
    /// The VTEP MAC the device has (or will have) once `ops` ran.
    pub mac: MacAddr,
}

/// Pure device decision. A compatible device is kept as is (recreating it would drop traffic on
/// every restart); only its MTU and up state are corrected. Anything else is deleted and
/// recreated. The MAC prefers, in order: the existing device's (what peers have in our lease
/// right now), the stored one, `fresh`.
pub fn plan_device(
    cfg: &VxlanConfig,
    existing: Option<&Link>,
    stored_mac: Option<MacAddr>,
    fresh: MacAddr,
) -> DevicePlan {
    let name = cfg.device_name();
    let existing_mac = existing
        .and_then(|l| l.mac)
        .filter(MacAddr::is_valid_unicast);
    let mac = existing_mac.or(stored_mac).unwrap_or(fresh);
    let mut ops = Vec::new();
    let compatible = existing.filter(|l| {
        l.kind.as_deref() == Some("vxlan")
            && l.vxlan == Some(cfg.spec(None).attrs())
            && existing_mac.is_some()
    });
    match compatible {
        Some(l) => {
            if l.mtu != cfg.mtu() {
                ops.push(Op::LinkSetMtu {
                    name: name.clone(),
                    mtu: cfg.mtu(),
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
            ops.push(Op::LinkAddVxlan(cfg.spec(Some(mac))));
            ops.push(Op::LinkSetUp { name });
        }
    }
    DevicePlan { ops, mac }
}

/// Puts exactly `want` on the device: the new address first so the node never has none, then
/// stale ones (an old lease's subnet address) go.
pub fn plan_addresses(ifindex: u32, observed: &[Addr], want: Ipv4Network) -> Vec<Op> {
    let mine: Vec<&Addr> = observed.iter().filter(|a| a.ifindex == ifindex).collect();
    let mut ops = Vec::new();
    if !mine.iter().any(|a| a.net == want) {
        ops.push(Op::AddrAdd {
            ifindex,
            addr: want,
        });
    }
    ops.extend(mine.iter().filter(|a| a.net != want).map(|a| Op::AddrDel {
        ifindex,
        addr: a.net,
    }));
    ops
}

fn read_mac_file(path: &Path) -> Result<Option<MacAddr>, VxlanError> {
    match fs::read_to_string(path) {
        Ok(s) => match s.trim().parse::<MacAddr>() {
            Ok(m) if m.is_valid_unicast() => Ok(Some(m)),
            _ => {
                tracing::warn!(path = %path.display(), "vxlan: ignoring unusable VTEP MAC file; it will be rewritten");
                Ok(None)
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(VxlanError::MacFile {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Temp file + rename in the same directory: a crash leaves the old MAC or the new one, never a
/// torn file that would give the node a new MAC at the next start.
fn write_mac_file(path: &Path, mac: MacAddr) -> Result<(), VxlanError> {
    let err = |source| VxlanError::MacFile {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(err)?;
    let file_name = path
        .file_name()
        .ok_or_else(|| err(io::Error::new(io::ErrorKind::InvalidInput, "no file name")))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let write = || -> io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        writeln!(f, "{mac}")?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        err(e)
    })
}

/// The set-up vxlan device plus this backend's view of what it programmed.
#[derive(Debug)]
pub struct VxlanBackend {
    cfg: VxlanConfig,
    name: String,
    ifindex: u32,
    mac: MacAddr,
    setup_ops: Vec<Op>,
    /// What the device holds, as far as we know; `None` forces a re-list at the next reconcile.
    view: Option<ObservedState>,
    /// DirectRouting only: the main table as far as we know (same rule as `view`).
    underlay_view: Option<Vec<Route>>,
    /// The peers `view` was last planned for, for planning a lease event's changed peers
    /// alone ([`inc`]); `None` whenever `view` may not match them.
    kept: Option<Kept>,
}

impl VxlanBackend {
    /// The VTEP MAC this node will use, known before the lease is: the lease advertises it, and
    /// the lease decides the subnet that [`setup`](Self::setup) needs. Same order as setup (the
    /// existing device's, the stored one, a fresh one) and stored, so setup then agrees.
    pub async fn prepare_mac(nl: &Netlink, cfg: &VxlanConfig) -> Result<MacAddr, VxlanError> {
        let name = cfg.device_name();
        let existing = nl
            .link_by_name(&name)
            .await
            .map_err(|source| VxlanError::Device {
                device: name.clone(),
                source,
            })?;
        let stored = read_mac_file(&cfg.mac_file)?;
        let mac = plan_device(cfg, existing.as_ref(), stored, MacAddr::random_local()).mac;
        if stored != Some(mac) {
            write_mac_file(&cfg.mac_file, mac)?;
        }
        Ok(mac)
    }

    /// Ensures the device (see [`plan_device`]), its address and up state. Safe to call on every
    /// start: with an unchanged config and device it changes nothing.
    pub async fn setup(nl: &Netlink, cfg: VxlanConfig) -> Result<VxlanBackend, VxlanError> {
        let name = cfg.device_name();
        let device_err = |source| VxlanError::Device {
            device: name.clone(),
            source,
        };
        check_mtu(
            &name,
            cfg.mtu(),
            cfg.underlay_mtu,
            ("vxlan", VXLAN_OVERHEAD),
        )?;
        let existing = nl.link_by_name(&name).await.map_err(device_err)?;
        let stored = read_mac_file(&cfg.mac_file)?;
        let dev = plan_device(&cfg, existing.as_ref(), stored, MacAddr::random_local());
        // Stored before the device exists, so a crash in between cannot lose the MAC peers may
        // already have been told about.
        if stored != Some(dev.mac) {
            write_mac_file(&cfg.mac_file, dev.mac)?;
        }
        apply_strict(nl, &dev.ops).await.map_err(device_err)?;

        let link = nl
            .link_by_name(&name)
            .await
            .map_err(device_err)?
            .ok_or_else(|| VxlanError::DeviceGone {
                device: name.clone(),
            })?;
        if link.mac != Some(dev.mac) {
            // Something (udev's MACAddressPolicy, an operator) changed it behind our back; the
            // device is what peers must be told about.
            tracing::warn!(device = %name, want = %dev.mac, have = ?link.mac, "vxlan: device MAC differs from the chosen VTEP MAC");
        }
        let mac = link.mac.unwrap_or(dev.mac);
        if stored != Some(mac) && mac != dev.mac {
            write_mac_file(&cfg.mac_file, mac)?;
        }

        let addrs = nl.addresses(Some(link.index)).await.map_err(device_err)?;
        let addr_ops = plan_addresses(link.index, &addrs, cfg.device_addr());
        apply_strict(nl, &addr_ops).await.map_err(device_err)?;

        let mut setup_ops = dev.ops;
        setup_ops.extend(addr_ops);
        if !setup_ops.is_empty() {
            tracing::info!(device = %name, mac = %mac, ops = setup_ops.len(), "vxlan: device set up");
        }
        Ok(VxlanBackend {
            cfg,
            name,
            ifindex: link.index,
            mac,
            setup_ops,
            view: None,
            underlay_view: None,
            kept: None,
        })
    }

    pub fn vtep_mac(&self) -> MacAddr {
        self.mac
    }

    pub fn device_name(&self) -> &str {
        &self.name
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    pub fn mtu(&self) -> u32 {
        self.cfg.mtu()
    }

    pub fn config(&self) -> &VxlanConfig {
        &self.cfg
    }

    /// The ops `setup` had to apply; empty when it found everything in place.
    pub fn setup_ops(&self) -> &[Op] {
        &self.setup_ops
    }

    /// The lease's BackendData, spelled as flannel spells it.
    pub fn backend_data(&self) -> serde_json::Value {
        serde_json::json!({ "VNI": self.cfg.vni, "VtepMAC": self.mac.to_string() })
    }

    /// Makes the next [`reconcile`](Self::reconcile) re-list the device instead of trusting the
    /// in-memory view (periodic safety net, or after someone else may have touched it).
    pub fn resync(&mut self) {
        self.view = None;
        self.underlay_view = None;
        self.kept = None;
    }

    /// Makes the device hold exactly the entries for `peers`. The first call, and the first after
    /// [`resync`](Self::resync) or after any failure, lists the kernel's entries; otherwise the
    /// view left by the previous call is trusted. Failing ops are reported per peer and do not
    /// stop the others; an `Err` means the device could not be read at all or is gone
    /// ([`VxlanError::DeviceGone`]: call [`setup`](Self::setup) again).
    pub async fn reconcile(
        &mut self,
        nl: &Netlink,
        peers: &[VxlanPeer],
    ) -> Result<ReconcileStats, VxlanError> {
        // Whoever plans all peers decides what is kept (the caller that keeps them sets it
        // again after this returns).
        self.kept = None;
        let view = match self.view.take() {
            Some(v) => v,
            None => {
                ObservedState::observe(nl, self.ifindex, self.cfg.local_ip, self.cfg.own_subnet)
                    .await
                    .map_err(|source| VxlanError::Observe {
                        device: self.name.clone(),
                        source,
                    })?
            }
        };
        let (ops, underlay_routes) = match self.cfg.hostgw() {
            None => (plan(&view, peers), None),
            Some(hg) => {
                let routes = match self.underlay_view.take() {
                    Some(v) => v,
                    None => nl
                        .all_routes()
                        .await
                        .map_err(|source| VxlanError::Observe {
                            device: self.name.clone(),
                            source,
                        })?,
                };
                (plan_direct(&hg, &routes, &view, peers), Some(routes))
            }
        };
        let stats = apply_plan(nl, &ops, |op| owner(op, peers)).await;
        self.after_apply(view, &ops, underlay_routes, stats)
    }

    /// Keeps the model of what `ops` left (only when all of them succeeded).
    fn after_apply(
        &mut self,
        view: ObservedState,
        ops: &[Op],
        underlay_routes: Option<Vec<Route>>,
        stats: ReconcileStats,
    ) -> Result<ReconcileStats, VxlanError> {
        for f in &stats.failures {
            tracing::warn!(device = %self.name, "vxlan: {f}");
        }
        // Retrying cannot help then: every later op would fail the same way.
        if stats
            .failures
            .iter()
            .any(|f| f.error.errno() == Some(libc::ENODEV))
        {
            self.kept = None;
            return Err(VxlanError::DeviceGone {
                device: self.name.clone(),
            });
        }
        // After a failure the kernel's state is not what the model says; read it next time.
        let clean = stats.failures.is_empty();
        self.view = clean.then(|| view.into_after(ops));
        self.underlay_view = underlay_routes
            .filter(|_| clean)
            .map(|r| hostgw::routes_after(&r, ops));
        if !clean {
            self.kept = None;
        }
        Ok(stats)
    }
}

/// Applies setup ops; the first failure is the error, since a half-made device is useless.
async fn apply_strict(nl: &Netlink, ops: &[Op]) -> Result<(), NetlinkError> {
    for op in ops {
        nl.apply(op).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::Fake;

    const DEV: u32 = 9;

    use crate::testutil::{ip, net};

    fn mac(last: u8) -> MacAddr {
        MacAddr([0x02, 0, 0, 0, 0, last])
    }

    fn peer(n: u8) -> VxlanPeer {
        VxlanPeer {
            subnet: net(&format!("10.244.{n}.0/24")),
            public_ip: ip(&format!("198.18.0.{n}")),
            vtep_mac: mac(n),
        }
    }

    fn observed() -> ObservedState {
        ObservedState::empty(DEV, ip("198.18.0.1"), net("10.244.1.0/24"))
    }

    /// A neighbour entry on the device, as the kernel lists it.
    fn neigh(ip: Ipv4Addr, mac: Option<MacAddr>, permanent: bool) -> Neighbour {
        Neighbour {
            ifindex: DEV,
            ip,
            mac,
            permanent,
        }
    }

    /// An FDB entry on `ifindex`, as the kernel lists it.
    fn fdb(ifindex: u32, mac: MacAddr, dst: Option<Ipv4Addr>, permanent: bool) -> FdbEntry {
        FdbEntry {
            ifindex,
            mac,
            dst,
            permanent,
        }
    }

    /// The observed state a correct kernel would show after programming `peers`.
    fn programmed(peers: &[VxlanPeer]) -> ObservedState {
        let o = observed();
        o.after(&plan(&o, peers))
    }

    fn entries_for(p: &VxlanPeer) -> Vec<Op> {
        vec![
            Op::FdbReplace {
                ifindex: DEV,
                mac: p.vtep_mac,
                dst: p.public_ip,
            },
            Op::NeighReplace {
                ifindex: DEV,
                ip: p.gateway(),
                mac: p.vtep_mac,
            },
            Op::RouteReplace(Route::onlink(p.subnet, p.gateway(), DEV)),
        ]
    }

    #[test]
    fn adds_three_entries_per_peer() {
        let ops = plan(&observed(), &[peer(3), peer(2)]);
        let mut want = entries_for(&peer(2));
        want.extend(entries_for(&peer(3)));
        assert_eq!(ops, want);
    }

    #[test]
    fn restart_with_the_same_peers_plans_nothing() {
        let peers = [peer(2), peer(3), peer(4)];
        assert_eq!(plan(&programmed(&peers), &peers), vec![]);
    }

    #[test]
    fn own_subnet_and_own_ip_are_never_programmed() {
        let own_subnet = VxlanPeer {
            subnet: net("10.244.1.0/24"),
            ..peer(7)
        };
        let own_ip = VxlanPeer {
            public_ip: ip("198.18.0.1"),
            ..peer(8)
        };
        let overlapping = VxlanPeer {
            subnet: net("10.244.0.0/16"),
            ..peer(9)
        };
        assert_eq!(
            plan(&observed(), &[own_subnet, own_ip, overlapping]),
            vec![]
        );
    }

    #[test]
    fn a_gone_peer_loses_exactly_its_entries() {
        let before = programmed(&[peer(2), peer(3)]);
        let p = peer(3);
        assert_eq!(
            plan(&before, &[peer(2)]),
            vec![
                Op::RouteDel(Route::onlink(p.subnet, p.gateway(), DEV)),
                Op::NeighDel {
                    ifindex: DEV,
                    ip: p.gateway()
                },
                Op::FdbDel {
                    ifindex: DEV,
                    mac: p.vtep_mac,
                    dst: Some(p.public_ip)
                },
            ]
        );
    }

    #[test]
    fn new_vtep_mac_rewrites_fdb_and_neighbour_only() {
        let before = programmed(&[peer(2)]);
        let moved = VxlanPeer {
            vtep_mac: mac(0x42),
            ..peer(2)
        };
        assert_eq!(
            plan(&before, &[moved]),
            vec![
                Op::FdbDel {
                    ifindex: DEV,
                    mac: mac(2),
                    dst: Some(ip("198.18.0.2"))
                },
                Op::FdbReplace {
                    ifindex: DEV,
                    mac: mac(0x42),
                    dst: ip("198.18.0.2")
                },
                Op::NeighReplace {
                    ifindex: DEV,
                    ip: ip("10.244.2.0"),
                    mac: mac(0x42)
                },
            ]
        );
    }

    #[test]
    fn new_public_ip_rewrites_fdb_in_place() {
        let before = programmed(&[peer(2)]);
        let moved = VxlanPeer {
            public_ip: ip("198.18.7.7"),
            ..peer(2)
        };
        let ops = plan(&before, &[moved]);
        assert_eq!(
            ops,
            vec![Op::FdbReplace {
                ifindex: DEV,
                mac: mac(2),
                dst: ip("198.18.7.7")
            }]
        );
        assert_eq!(plan(&before.after(&ops), &[moved]), vec![]);
    }

    #[test]
    fn stale_entries_from_a_previous_run_are_cleaned_but_kernel_ones_kept() {
        let mut o = programmed(&[peer(2)]);
        let old = peer(5);
        o.neighbours
            .push(neigh(old.gateway(), Some(old.vtep_mac), true));
        o.fdb
            .push(fdb(DEV, old.vtep_mac, Some(old.public_ip), true));
        o.routes.push(Route::onlink(old.subnet, old.gateway(), DEV));
        // Kernel-made: a resolved ARP entry, a multicast FDB entry, a protocol-kernel route,
        // and other devices' entries.
        o.neighbours
            .push(neigh(ip("10.244.99.9"), Some(mac(99)), false));
        o.fdb
            .push(fdb(DEV, "33:33:00:00:00:01".parse().unwrap(), None, true));
        o.fdb.push(fdb(DEV + 1, mac(77), Some(ip("1.2.3.4")), true));
        o.routes.push(Route {
            protocol: Route::PROTO_KERNEL,
            ..Route::via(net("10.244.98.0/24"), ip("10.244.98.1"), Some(DEV))
        });
        o.routes.push(Route::via(
            net("0.0.0.0/0"),
            ip("198.18.0.254"),
            Some(DEV + 1),
        ));

        let ops = plan(&o, &[peer(2)]);
        assert_eq!(
            ops,
            vec![
                Op::RouteDel(Route::onlink(old.subnet, old.gateway(), DEV)),
                Op::NeighDel {
                    ifindex: DEV,
                    ip: old.gateway()
                },
                Op::FdbDel {
                    ifindex: DEV,
                    mac: old.vtep_mac,
                    dst: Some(old.public_ip)
                },
            ]
        );
        assert_eq!(plan(&o.after(&ops), &[peer(2)]), vec![]);
    }

    #[test]
    fn non_permanent_or_wrong_entries_for_a_peer_are_replaced() {
        let p = peer(2);
        let mut o = observed();
        o.neighbours
            .push(neigh(p.gateway(), Some(p.vtep_mac), false));
        o.fdb.push(fdb(DEV, p.vtep_mac, Some(p.public_ip), true));
        o.fdb
            .push(fdb(DEV, p.vtep_mac, Some(ip("198.18.0.200")), true));
        o.routes
            .push(Route::via(p.subnet, ip("198.18.0.2"), Some(DEV)));
        let ops = plan(&o, &[p]);
        assert_eq!(
            ops,
            vec![
                Op::FdbDel {
                    ifindex: DEV,
                    mac: p.vtep_mac,
                    dst: Some(ip("198.18.0.200"))
                },
                Op::NeighReplace {
                    ifindex: DEV,
                    ip: p.gateway(),
                    mac: p.vtep_mac
                },
                Op::RouteReplace(Route::onlink(p.subnet, p.gateway(), DEV)),
            ]
        );
        assert_eq!(plan(&o.after(&ops), &[p]), vec![]);
    }

    #[test]
    fn duplicate_and_conflicting_peers_are_programmed_once() {
        let clone = VxlanPeer {
            subnet: net("10.244.9.0/24"),
            public_ip: ip("198.18.0.9"),
            vtep_mac: mac(2),
        };
        let ops = plan(&observed(), &[peer(2), peer(2), clone]);
        assert_eq!(ops, entries_for(&peer(2)));
    }

    fn cfg(dir: &Path, underlay: u32) -> VxlanConfig {
        VxlanConfig::new(
            1,
            ip("198.18.0.1"),
            underlay,
            1500,
            net("10.244.1.0/24"),
            dir.join("state/vtep-mac"),
        )
    }

    /// A state directory and a fake kernel with `eth0`, as the backend's tests start from.
    fn fake_host() -> (tempfile::TempDir, Fake, Netlink, u32) {
        let fake = Fake::new();
        let eth0 = fake.add_link("eth0", 1500, Some(mac(0xee)));
        let tmp = tempfile::tempdir().unwrap();
        (tmp, fake.clone(), Netlink::from(fake), eth0)
    }

    /// [`fake_host`] and the backend set up there with the default [`cfg`].
    async fn set_up_host() -> (tempfile::TempDir, Fake, Netlink, u32, VxlanBackend) {
        let (tmp, fake, nl, eth0) = fake_host();
        let b = set_up(&nl, &tmp, eth0).await;
        (tmp, fake, nl, eth0, b)
    }

    /// Deletes the device behind the backend's back.
    async fn delete_device(nl: &Netlink) {
        nl.apply(&Op::LinkDel {
            name: "tweed.1".into(),
        })
        .await
        .unwrap();
    }

    /// The backend set up with the default [`cfg`].
    async fn set_up(nl: &Netlink, tmp: &tempfile::TempDir, eth0: u32) -> VxlanBackend {
        set_up_with(nl, tmp, eth0, |_| {}).await
    }

    /// The backend set up with the default [`cfg`] as `change` leaves it.
    async fn set_up_with(
        nl: &Netlink,
        tmp: &tempfile::TempDir,
        eth0: u32,
        change: impl FnOnce(&mut VxlanConfig),
    ) -> VxlanBackend {
        let mut c = cfg(tmp.path(), eth0);
        change(&mut c);
        VxlanBackend::setup(nl, c).await.unwrap()
    }

    #[tokio::test]
    async fn setup_creates_the_device_and_stores_the_mac() {
        let (tmp, fake, nl, eth0, b) = set_up_host().await;
        assert_eq!(b.device_name(), "tweed.1");
        let link = nl.link_by_name("tweed.1").await.unwrap().unwrap();
        assert_eq!(link.mtu, 1450);
        assert!(link.up);
        let v = link.vxlan.unwrap();
        assert_eq!(
            (v.vni, v.port, v.learning, v.underlay),
            (1, 8472, false, Some(eth0))
        );
        assert_eq!(v.local, Some(ip("198.18.0.1").into()));
        assert_eq!(link.mac, Some(b.vtep_mac()));
        let stored = fs::read_to_string(tmp.path().join("state/vtep-mac")).unwrap();
        assert_eq!(stored.trim(), b.vtep_mac().to_string());
        let addrs = nl.addresses(Some(link.index)).await.unwrap();
        assert_eq!(addrs.len(), 1);
        assert_eq!(addrs[0].net, net("10.244.1.0/32"));
        assert_eq!(
            b.backend_data().to_string(),
            format!(r#"{{"VNI":1,"VtepMAC":"{}"}}"#, b.vtep_mac())
        );
        assert_eq!(fake.ops(), b.setup_ops());
    }

    #[tokio::test]
    async fn second_setup_and_reconcile_touch_nothing() {
        let (tmp, fake, nl, eth0) = fake_host();
        let peers = [peer(2), peer(3), peer(4)];
        let mut b = set_up(&nl, &tmp, eth0).await;
        let stats = b.reconcile(&nl, &peers).await.unwrap();
        assert_eq!((stats.ops_applied, stats.failures.len()), (9, 0));
        let first_mac = b.vtep_mac();
        fake.take_ops();

        let mut b = set_up(&nl, &tmp, eth0).await;
        assert_eq!(b.setup_ops(), &[]);
        assert_eq!(b.vtep_mac(), first_mac);
        let stats = b.reconcile(&nl, &peers).await.unwrap();
        assert_eq!(stats.ops_applied, 0);
        assert_eq!(fake.ops(), vec![]);
    }

    #[tokio::test]
    async fn recreated_device_keeps_the_stored_mac() {
        let (tmp, _fake, nl, eth0, first) = set_up_host().await;
        delete_device(&nl).await;
        let again = set_up(&nl, &tmp, eth0).await;
        assert_eq!(again.vtep_mac(), first.vtep_mac());
        assert_ne!(again.ifindex(), first.ifindex());
    }

    #[tokio::test]
    async fn incompatible_device_is_recreated_and_compatible_one_only_fixed() {
        let (tmp, fake, nl, eth0, first) = set_up_host().await;

        fake.take_ops();
        set_up_with(&nl, &tmp, eth0, |c| c.mtu_override = Some(1400)).await;
        assert_eq!(
            fake.take_ops(),
            vec![Op::LinkSetMtu {
                name: "tweed.1".into(),
                mtu: 1400
            }]
        );

        let b = set_up_with(&nl, &tmp, eth0, |c| c.port = 4789).await;
        let ops = fake.take_ops();
        assert_eq!(
            ops[0],
            Op::LinkDel {
                name: "tweed.1".into()
            }
        );
        assert!(
            matches!(&ops[1], Op::LinkAddVxlan(s) if s.port == 4789 && s.mac == Some(first.vtep_mac()))
        );
        assert_eq!(b.vtep_mac(), first.vtep_mac());
    }

    #[tokio::test]
    async fn stale_address_from_an_old_lease_is_replaced() {
        let (tmp, fake, nl, eth0, old) = set_up_host().await;
        fake.take_ops();
        let b = set_up_with(&nl, &tmp, eth0, |c| c.own_subnet = net("10.244.7.0/24")).await;
        assert_eq!(b.ifindex(), old.ifindex());
        assert_eq!(
            fake.take_ops(),
            vec![
                Op::AddrAdd {
                    ifindex: b.ifindex(),
                    addr: net("10.244.7.0/32")
                },
                Op::AddrDel {
                    ifindex: b.ifindex(),
                    addr: net("10.244.1.0/32")
                },
            ]
        );
    }

    #[tokio::test]
    async fn unusable_mac_file_is_replaced() {
        let (tmp, _fake, nl, eth0) = fake_host();
        let c = cfg(tmp.path(), eth0);
        fs::create_dir_all(c.mac_file.parent().unwrap()).unwrap();
        fs::write(&c.mac_file, "ff:ff:ff:ff:ff:ff\n").unwrap();
        let b = VxlanBackend::setup(&nl, c.clone()).await.unwrap();
        assert!(b.vtep_mac().is_valid_unicast());
        assert_eq!(
            fs::read_to_string(&c.mac_file).unwrap().trim(),
            b.vtep_mac().to_string()
        );
    }

    #[tokio::test]
    async fn too_small_mtu_is_refused() {
        let (tmp, _fake, nl, eth0) = fake_host();
        let mut c = cfg(tmp.path(), eth0);
        c.underlay_mtu = 100;
        let e = VxlanBackend::setup(&nl, c).await.unwrap_err();
        assert!(
            matches!(e, VxlanError::Mtu(MtuError { mtu: 50, .. })),
            "{e}"
        );
    }

    #[tokio::test]
    async fn incremental_reconcile_uses_the_view_and_resync_relists() {
        let (_tmp, fake, nl, _eth0, mut b) = set_up_host().await;
        b.reconcile(&nl, &[peer(2), peer(3)]).await.unwrap();
        fake.take_ops();

        let stats = b.reconcile(&nl, &[peer(2)]).await.unwrap();
        assert_eq!(stats.ops_applied, 3);
        fake.take_ops();

        // Someone deletes an entry behind our back: the view does not know, a resync does.
        let p = peer(2);
        nl.apply(&Op::NeighDel {
            ifindex: b.ifindex(),
            ip: p.gateway(),
        })
        .await
        .unwrap();
        fake.take_ops();
        assert_eq!(b.reconcile(&nl, &[p]).await.unwrap().ops_applied, 0);
        b.resync();
        assert_eq!(b.reconcile(&nl, &[p]).await.unwrap().ops_applied, 1);
    }

    #[tokio::test]
    async fn failures_are_per_peer_and_retried() {
        let (_tmp, fake, nl, _eth0, mut b) = set_up_host().await;
        let bad = peer(3);
        fake.fail_when(move |op| match op {
            Op::FdbReplace { mac, .. } if *mac == bad.vtep_mac => Some(libc::EINVAL),
            _ => None,
        });
        let peers = [peer(2), peer(3), peer(4)];
        let stats = b.reconcile(&nl, &peers).await.unwrap();
        assert_eq!(stats.ops_applied, 8);
        assert_eq!(stats.failures.len(), 1);
        let f = &stats.failures[0];
        assert_eq!(f.subnet, Some(bad.subnet));
        assert_eq!(f.error.errno(), Some(libc::EINVAL));
        assert!(f.to_string().contains("10.244.3.0/24"), "{f}");

        fake.clear_failures();
        fake.take_ops();
        let stats = b.reconcile(&nl, &peers).await.unwrap();
        assert_eq!((stats.ops_applied, stats.failures.len()), (1, 0));
        assert!(matches!(fake.ops()[..], [Op::FdbReplace { .. }]));
    }

    #[tokio::test]
    async fn a_deleted_device_is_reported_as_gone() {
        let (_tmp, _fake, nl, _eth0, mut b) = set_up_host().await;
        delete_device(&nl).await;
        let e = b.reconcile(&nl, &[peer(2)]).await.unwrap_err();
        assert!(matches!(e, VxlanError::DeviceGone { .. }), "{e}");
    }

    fn hg() -> HostGwConfig {
        HostGwConfig {
            network: net("10.244.0.0/16"),
            own_subnet: net("10.244.1.0/24"),
            local_ip: ip("198.18.0.1"),
            underlay_ifindex: 2,
            underlay_name: "eth0".into(),
            underlay_mtu: 1500,
        }
    }

    /// The underlay: 198.18.0.0/24 connected, everything else via a router.
    fn underlay_routes() -> Vec<Route> {
        vec![
            Route {
                dst: net("198.18.0.0/24"),
                gateway: None,
                oif: Some(2),
                onlink: false,
                metric: 0,
                protocol: Route::PROTO_KERNEL,
            },
            Route::via(net("0.0.0.0/0"), ip("198.18.0.254"), Some(2)),
        ]
    }

    #[test]
    fn direct_routing_splits_peers_by_segment() {
        let near = peer(2);
        let far = VxlanPeer {
            public_ip: ip("198.18.1.3"),
            ..peer(3)
        };
        let ops = plan_direct(&hg(), &underlay_routes(), &observed(), &[near, far]);
        let mut want = vec![Op::RouteReplace(Route::via(
            near.subnet,
            near.public_ip,
            Some(2),
        ))];
        want.extend(entries_for(&far));
        assert_eq!(ops, want);
        let routes = hostgw::routes_after(&underlay_routes(), &ops);
        assert_eq!(
            plan_direct(&hg(), &routes, &observed().after(&ops), &[near, far]),
            vec![]
        );
    }

    #[test]
    fn direct_routing_moves_a_peer_between_sides_without_deleting_its_route() {
        let near = peer(2);
        // Tunnelled first (as if it was behind the router), then on our segment.
        let far = VxlanPeer {
            public_ip: ip("198.18.1.2"),
            ..near
        };
        let ops1 = plan_direct(&hg(), &underlay_routes(), &observed(), &[far]);
        let view = observed().after(&ops1);
        let routes = hostgw::routes_after(&underlay_routes(), &ops1);
        let ops2 = plan_direct(&hg(), &routes, &view, &[near]);
        assert!(
            !ops2
                .iter()
                .any(|o| matches!(o, Op::RouteDel(r) if r.dst == near.subnet)),
            "{ops2:?}"
        );
        assert_eq!(
            ops2[0],
            Op::RouteReplace(Route::via(near.subnet, near.public_ip, Some(2)))
        );
        // ...and back: the vxlan route replaces the direct one in place.
        let view = view.after(&ops2);
        let routes = hostgw::routes_after(&routes, &ops2);
        let ops3 = plan_direct(&hg(), &routes, &view, &[far]);
        assert!(
            !ops3.iter().any(|o| matches!(o, Op::RouteDel(_))),
            "{ops3:?}"
        );
        assert!(ops3.contains(&Op::RouteReplace(Route::onlink(
            far.subnet,
            far.gateway(),
            DEV
        ))));
    }

    #[test]
    fn host_bits_in_a_peer_subnet_are_dropped() {
        let sloppy = VxlanPeer {
            subnet: net("10.244.2.7/24"),
            ..peer(2)
        };
        let o = observed();
        let ops = plan(&o, &[sloppy]);
        assert_eq!(ops, entries_for(&peer(2)));
        assert_eq!(plan(&o.after(&ops), &[sloppy]), vec![]);
    }

    #[test]
    fn futures_are_send() {
        // The run loop spawns these on a multi-thread runtime.
        fn send<T: Send>(_: &T) {}
        let tmp = tempfile::tempdir().unwrap();
        let nl = Netlink::from(Fake::new());
        send(&VxlanBackend::setup(&nl, cfg(tmp.path(), 1)));
        let mut b = VxlanBackend {
            cfg: cfg(tmp.path(), 1),
            name: "tweed.1".into(),
            ifindex: 2,
            mac: mac(1),
            setup_ops: vec![],
            view: None,
            underlay_view: None,
            kept: None,
        };
        send(&b.reconcile(&nl, &[]));
        send(&b.reconcile_changed(&nl, &[], &[]));
        send(&nl.apply_all(&[]));
        // One future type covers both Netlink arms, so this checks the real socket's too.
        send(&crate::netlink::select_iface(&nl, None));
    }

    #[test]
    fn peer_from_a_flannel_lease() {
        let attrs = tweed_config::LeaseAttrs::parse(
            br#"{"PublicIP":"198.18.0.3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:f0"}}"#,
        )
        .unwrap();
        let p = VxlanPeer::from_lease(net("10.244.3.0/24"), &attrs).unwrap();
        assert_eq!(p.public_ip, ip("198.18.0.3"));
        assert_eq!(p.vtep_mac.to_string(), "aa:bb:cc:dd:ee:f0");
        let bad = tweed_config::LeaseAttrs::parse(
            br#"{"PublicIP":"198.18.0.3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"nope"}}"#,
        )
        .unwrap();
        let e = VxlanPeer::from_lease(net("10.244.3.0/24"), &bad).unwrap_err();
        assert!(e.to_string().contains("10.244.3.0/24"), "{e}");
    }
}

#[cfg(test)]
mod in_place_tests {
    use super::*;

    const DEV: u32 = 9;

    /// xorshift64*: reproducible random sequences without a crate.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
        }
    }

    /// One op over a small key space, so replaces, deletes of absent entries, several FDB
    /// remotes per MAC, other devices, other metrics and mismatched route deletes all occur.
    fn op(rng: &mut Rng) -> Op {
        let dev = [DEV, DEV, DEV, 4][rng.below(4) as usize];
        let ip = Ipv4Addr::new(10, 244, rng.below(6) as u8, 0);
        let mac = MacAddr([2, 0, 0, 0, 0, rng.below(4) as u8]);
        let dst = Ipv4Addr::new(198, 18, 0, rng.below(4) as u8);
        let net = Ipv4Network::new(ip, 24).unwrap();
        let mut route = Route::onlink(net, ip, dev);
        route.metric = [0, 0, 0, 100][rng.below(4) as usize];
        if rng.below(4) == 0 {
            route.protocol = 0;
        }
        match rng.below(8) {
            0 | 1 => Op::FdbReplace {
                ifindex: dev,
                mac,
                dst,
            },
            2 => Op::FdbDel {
                ifindex: dev,
                mac,
                dst: (rng.below(3) != 0).then_some(dst),
            },
            3 => Op::NeighReplace {
                ifindex: dev,
                ip,
                mac,
            },
            4 => Op::NeighDel { ifindex: dev, ip },
            5 => Op::RouteReplace(route),
            6 => {
                // A delete naming no device, the right one, or another gateway.
                match rng.below(3) {
                    0 => route.oif = None,
                    1 => route.gateway = Some(Ipv4Addr::new(10, 1, 1, 1)),
                    _ => {}
                }
                Op::RouteDel(route)
            }
            _ => Op::LinkSetUp { name: "x".into() },
        }
    }

    #[test]
    fn ops_applied_in_place_equal_the_model_rebuilt_from_scratch() {
        let own = "10.244.200.0/24".parse().unwrap();
        let mut fast_steps = 0;
        for seed in 1..=200u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            // The kept view is always `after`'s output; start from one with some entries.
            let start: Vec<Op> = (0..rng.below(12)).map(|_| op(&mut rng)).collect();
            let mut view =
                ObservedState::empty(DEV, "198.18.0.100".parse().unwrap(), own).after(&start);
            for step in 0..40 {
                assert!(view.is_ordered(), "seed {seed} step {step}: {view:?}");
                let ops: Vec<Op> = (0..1 + rng.below(4)).map(|_| op(&mut rng)).collect();
                let want = view.after(&ops);
                let got = view.clone().into_after(&ops);
                assert_eq!(got, want, "seed {seed} step {step}: {ops:?}");
                fast_steps += 1;
                view = got;
            }
        }
        assert_eq!(fast_steps, 200 * 40);
    }

    #[test]
    fn an_unordered_kernel_dump_takes_the_rebuild() {
        let own = "10.244.200.0/24".parse().unwrap();
        let mut dump = ObservedState::empty(DEV, "198.18.0.100".parse().unwrap(), own);
        let n = |last: u8| Neighbour::permanent(DEV, Ipv4Addr::new(10, 244, last, 0), None);
        // As a dump may list them: out of order, and an entry of another device.
        dump.neighbours = vec![
            n(2),
            n(1),
            Neighbour::permanent(4, Ipv4Addr::new(10, 244, 3, 0), None),
        ];
        assert!(!dump.is_ordered());
        let got = dump.clone().into_after(&[Op::NeighDel {
            ifindex: DEV,
            ip: Ipv4Addr::new(10, 244, 2, 0),
        }]);
        assert_eq!(got.neighbours, vec![n(1)]);
        assert!(got.is_ordered());
    }
}

/// What keeping the view in place saves per lease event at 10,000 peers, side by side in one run
/// (printed, never asserted): `cargo test --release -p tweed-agent --lib -- --ignored
/// view_update_per_event_at_10000_peers --nocapture`.
#[cfg(test)]
mod in_place_cost {
    use super::*;
    use std::time::Instant;

    #[test]
    #[ignore = "timing figures for docs/performance.md, not a check"]
    fn view_update_per_event_at_10000_peers() {
        const DEV: u32 = 9;
        let own = "10.244.0.0/24".parse().unwrap();
        let local = "198.18.0.1".parse().unwrap();
        let peer = |i: u32| VxlanPeer {
            subnet: Ipv4Network::new(
                Ipv4Addr::new(10, 1 + (i / 256) as u8, (i % 256) as u8, 0),
                24,
            )
            .unwrap(),
            public_ip: Ipv4Addr::new(198, 19, (i / 256) as u8, (i % 256) as u8),
            vtep_mac: MacAddr([2, 0, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8]),
        };
        let mut peers: Vec<VxlanPeer> = (0..10_000).map(peer).collect();
        let empty = ObservedState::empty(DEV, local, own);
        let mut view = empty.after(&plan(&empty, &peers));
        let (mut rebuilt, mut in_place, mut planned) = (0u128, 0u128, 0u128);
        let rounds = 50u32;
        for k in 0..rounds {
            peers.push(peer(20_000 + k));
            let t = Instant::now();
            let ops = plan(&view, &peers);
            planned += t.elapsed().as_nanos();
            assert_eq!(ops.len(), 3);
            let t = Instant::now();
            let want = view.after(&ops);
            rebuilt += t.elapsed().as_nanos();
            let t = Instant::now();
            view = view.into_after(&ops);
            in_place += t.elapsed().as_nanos();
            assert_eq!(view, want);
        }
        let ms = |ns: u128| ns as f64 / f64::from(rounds) / 1e6;
        println!(
            "10,000 vxlan peers, one added per event, mean of {rounds}: plan {:.3} ms; view rebuilt through Tables {:.3} ms, updated in place {:.3} ms ({:.1}x)",
            ms(planned),
            ms(rebuilt),
            ms(in_place),
            rebuilt as f64 / in_place as f64
        );
    }
}
