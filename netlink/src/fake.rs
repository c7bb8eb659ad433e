//! An in-memory kernel for tests that must run without root: it keeps links, addresses,
//! neighbours, FDB entries and routes, answers the same queries as the real socket, records every
//! op it is asked to apply and can be told to fail chosen ops. One `Fake` is one network
//! namespace; [`Fake::add_netns`] lets a veth's peer land in another one, as a CNI plugin creates
//! a container's end.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use super::error::NetlinkError;
use super::events::{Change, Event, Events};
use super::model::Tables;
use super::op::Op;
use super::types::{Addr, Addr6, FdbEntry, Link, MacAddr, Neighbour, Neighbour6, Route, VethSpec};

type FailRule = Box<dyn Fn(&Op) -> Option<i32> + Send>;

#[derive(Default)]
struct State {
    links: BTreeMap<u32, Link>,
    addrs: Vec<Addr>,
    addrs6: Vec<Addr6>,
    tables: Tables,
    next_index: u32,
    log: Vec<Op>,
    fail: Vec<FailRule>,
    /// Other fake namespaces, by the fd number a `VethSpec::peer_netns` names them with.
    netns: BTreeMap<i32, Fake>,
    /// Veth ends whose peer is in another fake namespace: deleting either end deletes both.
    peers: BTreeMap<u32, (Weak<Mutex<State>>, u32)>,
    /// Whether this kernel has the wireguard module (`Op::LinkAddWireguard` else fails with
    /// `EOPNOTSUPP`, as a kernel without it does); see [`Fake::with_wireguard`].
    wireguard: bool,
    /// [`Fake::subscribe`]rs; each successful op is announced to them, as the kernel would.
    subscribers: Vec<tokio::sync::mpsc::UnboundedSender<Event>>,
}

/// Cheap to clone; clones share one kernel, so a test keeps a clone to inspect what the code under
/// test did through its [`super::Netlink`].
#[derive(Clone, Default)]
pub struct Fake {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for Fake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("Fake")
            .field("links", &s.links.len())
            .field("ops", &s.log.len())
            .finish()
    }
}

impl Fake {
    pub fn new() -> Fake {
        let fake = Fake::default();
        fake.add_link("lo", 65536, None);
        fake
    }

    /// A kernel that can create `wireguard` devices.
    pub fn with_wireguard() -> Fake {
        let fake = Fake::new();
        fake.lock().wireguard = true;
        fake
    }

    /// The `wireguard` module loaded or unloaded from now on (later link creations follow).
    pub fn set_wireguard(&self, loaded: bool) {
        self.lock().wireguard = loaded;
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not hide the state from the assertion that follows.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a plain (non-vxlan) device, returning its index. Not recorded as an op.
    pub fn add_link(&self, name: &str, mtu: u32, mac: Option<MacAddr>) -> u32 {
        self.lock().insert_new(Link {
            name: name.to_string(),
            mtu,
            mac,
            up: true,
            ..Default::default()
        })
    }

    /// The index of the link named `name`, if there is one.
    pub fn link_index(&self, name: &str) -> Option<u32> {
        self.lock()
            .links
            .values()
            .find(|l| l.name == name)
            .map(|l| l.index)
    }

    /// Inserts or overwrites a link as given (index included). Not recorded as an op.
    pub fn put_link(&self, link: Link) {
        let mut s = self.lock();
        s.next_index = s.next_index.max(link.index);
        s.links.insert(link.index, link);
    }

    pub fn add_addr(&self, addr: Addr) {
        self.lock().addrs.push(addr);
    }

    pub fn add_route(&self, route: Route) {
        self.lock()
            .tables
            .routes
            .insert((route.dst, route.metric), route);
    }

    pub fn add_neighbour(&self, n: Neighbour) {
        self.lock().tables.neigh.insert((n.ifindex, n.ip), n);
    }

    pub fn add_fdb(&self, e: FdbEntry) {
        self.lock()
            .tables
            .fdb
            .entry((e.ifindex, e.mac))
            .or_default()
            .push(e);
    }

    /// Makes `other` the namespace that the fd number `fd` stands for in a
    /// `VethSpec::peer_netns`: the peer is created there, and deleting either end of the pair
    /// (here or there) deletes both, as the kernel does. A peer sent to an fd that was never
    /// added stays out of sight.
    pub fn add_netns(&self, fd: i32, other: &Fake) {
        self.lock().netns.insert(fd, other.clone());
    }

    /// Makes every later op for which `rule` returns `Some(errno)` fail with that errno.
    pub fn fail_when(&self, rule: impl Fn(&Op) -> Option<i32> + Send + 'static) {
        self.lock().fail.push(Box::new(rule));
    }

    pub fn clear_failures(&self) {
        self.lock().fail.clear();
    }

    /// Notifications for every op applied from now on that changed something (a link's state
    /// after the op, or before it for a deletion; the route, neighbour or FDB entry written or
    /// removed), plus whatever [`Fake::announce`] sends.
    pub fn subscribe(&self) -> Events {
        let (tx, events) = Events::channel();
        self.lock().subscribers.push(tx);
        events
    }

    /// Sends `event` to every subscriber, e.g. [`Event::Lost`] or a change made behind the
    /// fake's back with [`Fake::put_link`].
    pub fn announce(&self, event: Event) {
        self.lock()
            .subscribers
            .retain(|tx| tx.send(event.clone()).is_ok());
    }

    /// Every op applied so far, failed ones included, in order.
    pub fn ops(&self) -> Vec<Op> {
        self.lock().log.clone()
    }

    pub fn take_ops(&self) -> Vec<Op> {
        std::mem::take(&mut self.lock().log)
    }

    pub(crate) fn link_by_name(&self, name: &str) -> Option<Link> {
        self.lock().links.values().find(|l| l.name == name).cloned()
    }

    pub(crate) fn link_by_index(&self, index: u32) -> Option<Link> {
        self.lock().links.get(&index).cloned()
    }

    pub(crate) fn links(&self) -> Vec<Link> {
        self.lock().links.values().cloned().collect()
    }

    pub(crate) fn addresses(&self, ifindex: Option<u32>) -> Vec<Addr> {
        let s = self.lock();
        s.addrs
            .iter()
            .filter(|a| ifindex.is_none_or(|i| a.ifindex == i))
            .copied()
            .collect()
    }

    pub(crate) fn addresses6(&self, ifindex: Option<u32>) -> Vec<Addr6> {
        let s = self.lock();
        s.addrs6
            .iter()
            .filter(|a| ifindex.is_none_or(|i| a.ifindex == i))
            .copied()
            .collect()
    }

    pub(crate) fn neighbours(&self, ifindex: u32) -> Vec<Neighbour> {
        self.lock().tables.neighbours(ifindex)
    }

    pub(crate) fn fdb(&self, ifindex: u32) -> Vec<FdbEntry> {
        self.lock().tables.fdb_entries(ifindex)
    }

    pub(crate) fn routes(&self) -> Vec<Route> {
        self.lock().tables.routes.values().copied().collect()
    }

    pub(crate) fn neighbours6(&self, ifindex: u32) -> Vec<crate::Neighbour6> {
        self.lock().tables.neighbours6(ifindex)
    }

    pub(crate) fn fdb6(&self, ifindex: u32) -> Vec<crate::FdbEntry6> {
        self.lock().tables.fdb6_entries(ifindex)
    }

    pub(crate) fn routes6(&self) -> Vec<crate::Route6> {
        self.lock().tables.routes6.values().copied().collect()
    }

    pub(crate) fn apply(&self, op: &Op) -> Result<(), NetlinkError> {
        let before = self.link_of(op);
        let res = self.apply_quiet(op);
        if res.is_ok() {
            for e in self.events_of(op, before) {
                self.announce(e);
            }
        }
        res
    }

    /// The link an op names, as it is now.
    fn link_of(&self, op: &Op) -> Option<Link> {
        let s = self.lock();
        match op {
            Op::LinkSetUp { name }
            | Op::LinkSetDown { name }
            | Op::LinkSetMtu { name, .. }
            | Op::LinkDel { name }
            | Op::LinkSetMac { name, .. } => s.links.values().find(|l| &l.name == name).cloned(),
            Op::LinkAddVxlan(spec) => s.links.values().find(|l| l.name == spec.name).cloned(),
            Op::LinkAddWireguard { name } => s.links.values().find(|l| &l.name == name).cloned(),
            Op::LinkDelIndex { ifindex } | Op::LinkRename { ifindex, .. } => {
                s.links.get(ifindex).cloned()
            }
            _ => None,
        }
    }

    fn events_of(&self, op: &Op, before: Option<Link>) -> Vec<Event> {
        if self.lock().subscribers.is_empty() {
            return Vec::new();
        }
        let link_now = |index: u32| self.lock().links.get(&index).cloned();
        let link = |before: Option<Link>| match before {
            Some(b) => match link_now(b.index) {
                Some(now) if now != b => Some(Event::Link(Change::New, now)),
                Some(_) => None,
                None => Some(Event::Link(Change::Del, b)),
            },
            None => None,
        };
        match op {
            Op::LinkAddVxlan(spec) => match before {
                Some(_) => link(before).into_iter().collect(),
                None => self
                    .link_by_name(&spec.name)
                    .map(|l| vec![Event::Link(Change::New, l)])
                    .unwrap_or_default(),
            },
            Op::LinkAddWireguard { name } => match before {
                Some(_) => link(before).into_iter().collect(),
                None => self
                    .link_by_name(name)
                    .map(|l| vec![Event::Link(Change::New, l)])
                    .unwrap_or_default(),
            },
            Op::LinkSetUp { .. }
            | Op::LinkSetDown { .. }
            | Op::LinkSetMtu { .. }
            | Op::LinkDel { .. }
            | Op::LinkSetMac { .. }
            | Op::LinkDelIndex { .. }
            | Op::LinkRename { .. } => link(before).into_iter().collect(),
            Op::AddrAdd { ifindex, addr } => vec![Event::Addr(
                Change::New,
                Addr {
                    ifindex: *ifindex,
                    net: *addr,
                },
            )],
            Op::AddrDel { ifindex, addr } => vec![Event::Addr(
                Change::Del,
                Addr {
                    ifindex: *ifindex,
                    net: *addr,
                },
            )],
            Op::Addr6Add {
                ifindex,
                addr,
                nodad,
            } => vec![Event::Addr6(
                Change::New,
                Addr6 {
                    ifindex: *ifindex,
                    net: *addr,
                    tentative: !*nodad,
                },
            )],
            Op::Addr6Del { ifindex, addr } => vec![Event::Addr6(
                Change::Del,
                Addr6 {
                    ifindex: *ifindex,
                    net: *addr,
                    tentative: false,
                },
            )],
            Op::RouteReplace(r) => vec![Event::Route(Change::New, *r)],
            Op::RouteDel(r) => vec![Event::Route(Change::Del, *r)],
            Op::Route6Replace(r) => vec![Event::Route6(Change::New, *r)],
            Op::Route6Del(r) => vec![Event::Route6(Change::Del, *r)],
            Op::Neigh6Replace { ifindex, ip, mac } => vec![Event::Neigh6(
                Change::New,
                Neighbour6 {
                    ifindex: *ifindex,
                    ip: *ip,
                    mac: Some(*mac),
                    permanent: true,
                },
            )],
            Op::Neigh6Del { ifindex, ip } => vec![Event::Neigh6(
                Change::Del,
                Neighbour6 {
                    ifindex: *ifindex,
                    ip: *ip,
                    mac: None,
                    permanent: true,
                },
            )],
            // The IPv4 view of an FDB entry to an IPv6 VTEP: no destination it can spell.
            Op::Fdb6Replace { ifindex, mac, .. } => vec![Event::Fdb(
                Change::New,
                FdbEntry::permanent(*ifindex, *mac, None),
            )],
            Op::Fdb6Del { ifindex, mac, .. } => vec![Event::Fdb(
                Change::Del,
                FdbEntry::permanent(*ifindex, *mac, None),
            )],
            Op::NeighReplace { ifindex, ip, mac } => vec![Event::Neigh(
                Change::New,
                Neighbour::permanent(*ifindex, *ip, Some(*mac)),
            )],
            Op::NeighDel { ifindex, ip } => vec![Event::Neigh(
                Change::Del,
                Neighbour::permanent(*ifindex, *ip, None),
            )],
            Op::FdbReplace { ifindex, mac, dst } => vec![Event::Fdb(
                Change::New,
                FdbEntry::permanent(*ifindex, *mac, Some(*dst)),
            )],
            Op::FdbDel { ifindex, mac, dst } => vec![Event::Fdb(
                Change::Del,
                FdbEntry::permanent(*ifindex, *mac, *dst),
            )],
            _ => Vec::new(),
        }
    }

    fn apply_quiet(&self, op: &Op) -> Result<(), NetlinkError> {
        let mut s = self.lock();
        s.log.push(op.clone());
        let injected = s.fail.iter().find_map(|rule| rule(op));
        let res = match injected {
            Some(errno) => Err(errno),
            None => match op {
                Op::LinkAddVeth(spec)
                    if spec.peer_netns.is_some_and(|fd| s.netns.contains_key(&fd)) =>
                {
                    let other = s.netns[&spec.peer_netns.expect("checked")].clone();
                    drop(s);
                    if Arc::ptr_eq(&self.state, &other.state) {
                        // Its own namespace: as without a peer namespace.
                        let local = VethSpec {
                            peer_netns: None,
                            ..spec.clone()
                        };
                        self.lock().apply(&Op::LinkAddVeth(local))
                    } else {
                        self.add_veth_across(spec, &other)
                    }
                }
                _ => {
                    let before: Vec<u32> = s.peers.keys().copied().collect();
                    let res = s.apply(op);
                    // The ends this op deleted take their peers along, one lock at a time.
                    let gone: Vec<u32> = before
                        .into_iter()
                        .filter(|i| !s.links.contains_key(i))
                        .collect();
                    let gone: Vec<(Weak<Mutex<State>>, u32)> =
                        gone.iter().filter_map(|i| s.peers.remove(i)).collect();
                    drop(s);
                    for (other, index) in gone {
                        if let Some(other) = other.upgrade() {
                            let mut o = other.lock().unwrap_or_else(|e| e.into_inner());
                            o.peers.remove(&index);
                            o.remove_link(index);
                        }
                    }
                    res
                }
            },
        };
        match res {
            Ok(()) => Ok(()),
            Err(errno) if op.gone_errnos().contains(&errno) => Ok(()),
            Err(errno) => Err(NetlinkError::op(op, errno)),
        }
    }
}

impl Fake {
    /// A veth pair whose peer goes into `other` (another namespace): both names are checked
    /// before either end exists.
    fn add_veth_across(&self, spec: &VethSpec, other: &Fake) -> Result<(), i32> {
        let mut s = self.lock();
        let mut o = other.lock();
        if s.link_named(&spec.name).is_ok() || o.link_named(&spec.peer).is_ok() {
            return Err(libc::EEXIST);
        }
        check_macs(spec)?;
        let mtu = spec.mtu.unwrap_or(1500);
        let index = s.new_link(&spec.name, "veth", mtu, spec.mac, None);
        let peer = o.new_link(&spec.peer, "veth", mtu, spec.peer_mac, None);
        s.peers.insert(index, (Arc::downgrade(&other.state), peer));
        o.peers.insert(peer, (Arc::downgrade(&self.state), index));
        Ok(())
    }
}

/// The kernel refuses a multicast or all-zero device address.
fn check_macs(spec: &VethSpec) -> Result<(), i32> {
    if [spec.mac, spec.peer_mac]
        .iter()
        .flatten()
        .any(|m| !m.is_valid_unicast())
    {
        return Err(libc::EADDRNOTAVAIL);
    }
    Ok(())
}

impl State {
    fn link_named(&mut self, name: &str) -> Result<&mut Link, i32> {
        self.links
            .values_mut()
            .find(|l| l.name == name)
            .ok_or(libc::ENODEV)
    }

    fn new_link(
        &mut self,
        name: &str,
        kind: &str,
        mtu: u32,
        mac: Option<MacAddr>,
        alias: Option<String>,
    ) -> u32 {
        self.insert_new(Link {
            index: 0,
            name: name.to_string(),
            mtu,
            mac: Some(mac.unwrap_or_else(MacAddr::random_local)),
            kind: Some(kind.into()),
            up: false,
            vxlan: None,
            master: None,
            alias,
        })
    }

    /// Inserts `link` under the next free index (as the kernel numbers new links) and returns it.
    fn insert_new(&mut self, mut link: Link) -> u32 {
        self.next_index += 1;
        link.index = self.next_index;
        self.links.insert(link.index, link);
        self.next_index
    }

    fn remove_link(&mut self, index: u32) {
        self.links.remove(&index);
        self.addrs.retain(|a| a.ifindex != index);
        self.addrs6.retain(|a| a.ifindex != index);
        self.tables.drop_device(index);
    }

    fn need_link(&self, ifindex: u32) -> Result<(), i32> {
        if self.links.contains_key(&ifindex) {
            Ok(())
        } else {
            Err(libc::ENODEV)
        }
    }

    fn apply(&mut self, op: &Op) -> Result<(), i32> {
        match op {
            Op::LinkAddVxlan(spec) => {
                if let Ok(l) = self.link_named(&spec.name) {
                    // As the real handle settles EEXIST: same vxlan attributes is success.
                    return if l.vxlan == Some(spec.attrs()) {
                        Ok(())
                    } else {
                        Err(libc::EEXIST)
                    };
                }
                self.need_link(spec.underlay)?;
                self.next_index += 1;
                let index = self.next_index;
                self.links.insert(
                    index,
                    Link {
                        index,
                        name: spec.name.clone(),
                        mtu: spec.mtu.unwrap_or(1450),
                        mac: Some(spec.mac.unwrap_or_else(MacAddr::random_local)),
                        kind: Some("vxlan".into()),
                        vxlan: Some(spec.attrs()),
                        ..Default::default()
                    },
                );
                Ok(())
            }
            Op::LinkSetUp { name } => {
                self.link_named(name)?.up = true;
                Ok(())
            }
            Op::LinkSetMtu { name, mtu } => {
                self.link_named(name)?.mtu = *mtu;
                Ok(())
            }
            Op::LinkDel { name } => {
                let index = self.link_named(name)?.index;
                self.links.remove(&index);
                self.addrs.retain(|a| a.ifindex != index);
                self.tables.drop_device(index);
                Ok(())
            }
            Op::LinkAddBridge(spec) => {
                if let Ok(l) = self.link_named(&spec.name) {
                    return if l.kind.as_deref() == Some("bridge") {
                        Ok(())
                    } else {
                        Err(libc::EEXIST)
                    };
                }
                self.new_link(
                    &spec.name,
                    "bridge",
                    spec.mtu.unwrap_or(1500),
                    spec.mac,
                    None,
                );
                Ok(())
            }
            Op::LinkAddWireguard { name } => {
                if let Ok(l) = self.link_named(name) {
                    return if l.kind.as_deref() == Some("wireguard") {
                        Ok(())
                    } else {
                        Err(libc::EEXIST)
                    };
                }
                if !self.wireguard {
                    return Err(libc::EOPNOTSUPP);
                }
                // The kernel's default for a new wireguard device.
                self.new_link(name, "wireguard", 1420, None, None);
                Ok(())
            }
            Op::LinkAddVeth(spec) => {
                let taken = |s: &mut State, n: &str| s.link_named(n).is_ok();
                if taken(self, &spec.name) || (spec.peer_netns.is_none() && taken(self, &spec.peer))
                {
                    return Err(libc::EEXIST);
                }
                check_macs(spec)?;
                let mtu = spec.mtu.unwrap_or(1500);
                self.new_link(&spec.name, "veth", mtu, spec.mac, None);
                // A peer in another namespace is out of this fake kernel's sight.
                if spec.peer_netns.is_none() {
                    self.new_link(&spec.peer, "veth", mtu, spec.peer_mac, None);
                }
                Ok(())
            }
            Op::LinkSetDown { name } => {
                self.link_named(name)?.up = false;
                Ok(())
            }
            Op::LinkSetMaster { name, master } => {
                if let Some(m) = master {
                    self.need_link(*m)?;
                }
                self.link_named(name)?.master = *master;
                Ok(())
            }
            Op::LinkSetMac { name, mac } => {
                if !mac.is_valid_unicast() {
                    return Err(libc::EADDRNOTAVAIL);
                }
                self.link_named(name)?.mac = Some(*mac);
                Ok(())
            }
            Op::LinkSetAlias { name, alias } => {
                self.link_named(name)?.alias = Some(alias.clone()).filter(|a| !a.is_empty());
                Ok(())
            }
            Op::LinkSetHairpin { name, .. } => {
                let link = self.link_named(name)?;
                if link.master.is_none() {
                    return Err(libc::EOPNOTSUPP);
                }
                Ok(())
            }
            Op::LinkSetNetns { name, .. } => {
                let index = self.link_named(name)?.index;
                self.remove_link(index);
                Ok(())
            }
            Op::LinkRename { ifindex, new_name } => {
                self.need_link(*ifindex)?;
                if self.link_named(new_name).is_ok() {
                    return Err(libc::EEXIST);
                }
                let link = self.links.get_mut(ifindex).expect("checked");
                if link.up {
                    return Err(libc::EBUSY);
                }
                link.name = new_name.clone();
                Ok(())
            }
            Op::LinkDelIndex { ifindex } => {
                self.need_link(*ifindex)?;
                self.remove_link(*ifindex);
                Ok(())
            }
            Op::AddrAdd { ifindex, addr } => {
                self.need_link(*ifindex)?;
                let a = Addr {
                    ifindex: *ifindex,
                    net: *addr,
                };
                if !self.addrs.contains(&a) {
                    self.addrs.push(a);
                }
                Ok(())
            }
            Op::AddrDel { ifindex, addr } => {
                let before = self.addrs.len();
                self.addrs
                    .retain(|a| !(a.ifindex == *ifindex && a.net == *addr));
                if self.addrs.len() == before {
                    Err(libc::EADDRNOTAVAIL)
                } else {
                    Ok(())
                }
            }
            Op::Addr6Add {
                ifindex,
                addr,
                nodad,
            } => {
                self.need_link(*ifindex)?;
                self.addrs6
                    .retain(|a| !(a.ifindex == *ifindex && a.net.ip() == addr.ip()));
                self.addrs6.push(Addr6 {
                    ifindex: *ifindex,
                    net: *addr,
                    // This kernel runs no DAD: an address added without `nodad` stays
                    // tentative, so a caller that forgets it is caught by its tests.
                    tentative: !*nodad,
                });
                Ok(())
            }
            Op::Addr6Del { ifindex, addr } => {
                let before = self.addrs6.len();
                self.addrs6
                    .retain(|a| !(a.ifindex == *ifindex && a.net == *addr));
                if self.addrs6.len() == before {
                    Err(libc::EADDRNOTAVAIL)
                } else {
                    Ok(())
                }
            }
            Op::NeighReplace { ifindex, .. } | Op::FdbReplace { ifindex, .. } => {
                self.need_link(*ifindex)?;
                self.tables.apply(op)
            }
            Op::RouteReplace(r) => {
                if let Some(oif) = r.oif {
                    self.need_link(oif)?;
                }
                self.tables.apply(op)
            }
            Op::NeighDel { .. } | Op::FdbDel { .. } | Op::RouteDel(_) => self.tables.apply(op),
            Op::Neigh6Replace { ifindex, .. } | Op::Fdb6Replace { ifindex, .. } => {
                self.need_link(*ifindex)?;
                self.tables.apply(op)
            }
            Op::Route6Replace(r) => {
                if let Some(oif) = r.oif {
                    self.need_link(oif)?;
                }
                // The kernel wants a gateway it can reach (unless told `onlink`): inside the
                // prefix of an address of the device, or of a connected route.
                if let Some(gw) = r.gateway.filter(|_| !r.onlink) {
                    let by_addr = self
                        .addrs6
                        .iter()
                        .any(|a| r.oif.is_none_or(|o| a.ifindex == o) && a.net.contains(gw));
                    let by_route = self.tables.routes6.values().any(|c| {
                        c.gateway.is_none()
                            && r.oif.is_none_or(|o| c.oif == Some(o))
                            && c.dst.contains(gw)
                    });
                    if !(by_addr || by_route) {
                        return Err(libc::ENETUNREACH);
                    }
                }
                self.tables.apply(op)
            }
            Op::Neigh6Del { .. } | Op::Fdb6Del { .. } | Op::Route6Del(_) => self.tables.apply(op),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{BridgeSpec, VethSpec};

    fn veth(name: &str, peer: &str) -> Op {
        Op::LinkAddVeth(VethSpec {
            name: name.into(),
            peer: peer.into(),
            peer_netns: None,
            mtu: Some(1450),
            mac: None,
            peer_mac: None,
        })
    }

    #[test]
    fn cni_link_ops() {
        let f = Fake::new();
        let br = Op::LinkAddBridge(BridgeSpec {
            name: "cni0".into(),
            mtu: Some(1450),
            mac: None,
        });
        f.apply(&br).unwrap();
        f.apply(&br).unwrap();
        let bi = f.link_by_name("cni0").unwrap().index;
        f.apply(&veth("tw0", "eth0")).unwrap();
        assert_eq!(
            f.apply(&veth("tw0", "x")).unwrap_err().errno(),
            Some(libc::EEXIST)
        );
        assert_eq!(
            f.apply(&veth("tw1", "eth0")).unwrap_err().errno(),
            Some(libc::EEXIST)
        );
        f.apply(&Op::LinkSetMaster {
            name: "tw0".into(),
            master: Some(bi),
        })
        .unwrap();
        f.apply(&Op::LinkSetHairpin {
            name: "tw0".into(),
            on: true,
        })
        .unwrap();
        f.apply(&Op::LinkSetAlias {
            name: "tw0".into(),
            alias: "tweed/x".into(),
        })
        .unwrap();
        let l = f.link_by_name("tw0").unwrap();
        assert_eq!((l.master, l.alias.as_deref()), (Some(bi), Some("tweed/x")));
        // A device that is not a bridge under the bridge's name is refused.
        let dup = Op::LinkAddBridge(BridgeSpec {
            name: "tw0".into(),
            mtu: None,
            mac: None,
        });
        assert_eq!(f.apply(&dup).unwrap_err().errno(), Some(libc::EEXIST));
        let e = f.link_by_name("eth0").unwrap();
        f.apply(&Op::LinkSetUp {
            name: "eth0".into(),
        })
        .unwrap();
        let rename = Op::LinkRename {
            ifindex: e.index,
            new_name: "net1".into(),
        };
        assert_eq!(f.apply(&rename).unwrap_err().errno(), Some(libc::EBUSY));
        f.apply(&Op::LinkSetDown {
            name: "eth0".into(),
        })
        .unwrap();
        f.apply(&rename).unwrap();
        f.apply(&Op::LinkDelIndex { ifindex: l.index }).unwrap();
        f.apply(&Op::LinkDelIndex { ifindex: l.index }).unwrap();
        f.apply(&Op::LinkSetNetns {
            name: "net1".into(),
            netns: 3,
        })
        .unwrap();
        assert!(f.link_by_name("net1").is_none() && f.link_by_name("tw0").is_none());
    }

    #[test]
    fn wireguard_links_need_the_module_and_are_adopted_only_as_wireguard() {
        let wg = Op::LinkAddWireguard {
            name: "tweed-wg".into(),
        };
        let none = Fake::new();
        assert_eq!(none.apply(&wg).unwrap_err().errno(), Some(libc::EOPNOTSUPP));
        let f = Fake::with_wireguard();
        f.apply(&wg).unwrap();
        f.apply(&wg).unwrap();
        let l = f.link_by_name("tweed-wg").unwrap();
        assert_eq!(
            (l.kind.as_deref(), l.mtu, l.up),
            (Some("wireguard"), 1420, false)
        );
        f.add_link("tw1", 1500, None);
        let other = Op::LinkAddWireguard { name: "tw1".into() };
        assert_eq!(f.apply(&other).unwrap_err().errno(), Some(libc::EEXIST));
    }

    #[test]
    fn a_veth_peer_lands_in_another_namespace_and_goes_with_its_pair() {
        let host = Fake::new();
        let ctr = Fake::new();
        host.add_netns(7, &ctr);
        let across = |name: &str, peer: &str, peer_mac: Option<MacAddr>| {
            Op::LinkAddVeth(VethSpec {
                name: name.into(),
                peer: peer.into(),
                peer_netns: Some(7),
                mtu: Some(1450),
                mac: None,
                peer_mac,
            })
        };
        host.apply(&across("tw0", "eth0", None)).unwrap();
        assert!(host.link_by_name("eth0").is_none());
        assert_eq!(ctr.link_by_name("eth0").unwrap().mtu, 1450);
        // The peer's name is taken in the other namespace only; a multicast MAC is refused.
        let dup = across("tw1", "eth0", None);
        assert_eq!(host.apply(&dup).unwrap_err().errno(), Some(libc::EEXIST));
        let mcast = across("tw2", "eth1", Some(MacAddr([1, 0, 0x5e, 0, 0, 1])));
        assert_eq!(
            host.apply(&mcast).unwrap_err().errno(),
            Some(libc::EADDRNOTAVAIL)
        );
        assert!(host.link_by_name("tw2").is_none() && ctr.link_by_name("eth1").is_none());
        // Deleting the container's end deletes the host's, and the other way round.
        let e = ctr.link_by_name("eth0").unwrap().index;
        ctr.apply(&Op::LinkDelIndex { ifindex: e }).unwrap();
        assert!(host.link_by_name("tw0").is_none());
        host.apply(&across("tw0", "eth0", None)).unwrap();
        host.apply(&Op::LinkDel { name: "tw0".into() }).unwrap();
        assert!(ctr.link_by_name("eth0").is_none());
    }

    #[tokio::test]
    async fn subscribers_hear_every_change_and_nothing_for_a_no_op() {
        let f = Fake::new();
        let eth0 = f.add_link("eth0", 1500, None);
        let mut ev = f.subscribe();
        let r = Route::onlink(
            "10.244.2.0/24".parse().unwrap(),
            "10.244.2.0".parse().unwrap(),
            eth0,
        );
        f.apply(&Op::RouteReplace(r)).unwrap();
        f.apply(&Op::LinkSetDown {
            name: "eth0".into(),
        })
        .unwrap();
        // Already down: the kernel sends nothing for a change that changes nothing.
        f.apply(&Op::LinkSetDown {
            name: "eth0".into(),
        })
        .unwrap();
        f.apply(&Op::LinkDel {
            name: "eth0".into(),
        })
        .unwrap();
        f.announce(Event::Lost);
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(ev.next().await.unwrap().unwrap());
        }
        assert_eq!(got[0], Event::Route(Change::New, r));
        assert!(matches!(&got[1], Event::Link(Change::New, l) if !l.up && l.name == "eth0"));
        assert!(matches!(&got[2], Event::Link(Change::Del, l) if l.index == eth0));
        assert_eq!(got[3], Event::Lost);
    }
}
