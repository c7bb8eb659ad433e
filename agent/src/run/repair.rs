//! Event-driven repair of what the data plane owns, as pure logic: which kernel notifications
//! concern this node ([`Watched::trigger`]), when to act on them ([`Schedule`]: one debounce
//! window, then retries with backoff) and what a repair's ops say was wrong ([`kind_of`]).
//!
//! A notification is only a hint that something owned may have drifted: the repair re-reads the
//! backend's tables and writes what differs from the plan, and a lost notification is caught by
//! the periodic relist. The kernel also announces every write the agent itself makes; those
//! echoes are told apart by [`Echoes`] and schedule nothing, since a re-read of 10,000 peers'
//! tables on every lease event is what would delay the next one.

use crate::netlink::{Change, Event, MacAddr, Op};
use ipnetwork::{Ipv4Network, Ipv6Network};
use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;
use tokio::time::Instant;

/// How long notifications are gathered before one repair handles them all: `ip link del` alone
/// sends a dozen (the link, each of its routes, neighbours and FDB entries).
pub(super) const DEBOUNCE: Duration = Duration::from_millis(100);
/// First retry after a failed repair; doubles up to [`MAX_RETRY`].
pub(super) const FIRST_RETRY: Duration = Duration::from_millis(200);
pub(super) const MAX_RETRY: Duration = Duration::from_secs(5);

/// What a notification touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Trigger {
    /// The backend's device: deleted, set down, renamed, MTU or flags changed.
    Device,
    /// An address on the backend's device.
    Address,
    /// A route into the overlay network.
    Route,
    Neigh,
    Fdb,
    /// The underlay device: its MTU or state changed, or one of its addresses.
    Underlay,
    /// The kernel dropped notifications: everything is re-read.
    Lost,
}

impl Trigger {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Trigger::Device => "device",
            Trigger::Address => "address",
            Trigger::Route => "route",
            Trigger::Neigh => "neigh",
            Trigger::Fdb => "fdb",
            Trigger::Underlay => "underlay",
            Trigger::Lost => "lost",
        }
    }
}

/// What this node owns in the kernel, to tell its notifications from everyone else's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Watched {
    /// The backend's device (vxlan `tweed.<VNI>`, udp `tweed0`); host-gw has none.
    pub(super) device: Option<(u32, String)>,
    pub(super) underlay: u32,
    /// The overlay: every route into it is owned by some node's agent, this one's included.
    pub(super) network: Ipv4Network,
    /// The IPv6 plane's, when this node runs dual stack.
    pub(super) v6: Option<Watched6>,
}

/// What the IPv6 plane owns: vxlan's `tweed-v6.<VNI>` (host-gw has no device) and the routes
/// into the overlay's IPv6 network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Watched6 {
    pub(super) device: Option<(u32, String)>,
    pub(super) network: Ipv6Network,
}

impl Watched {
    /// Whether `event` may concern what this node owns, and how.
    pub(super) fn trigger(&self, event: &Event) -> Option<Trigger> {
        let dev_index = self.device.as_ref().map(|(i, _)| *i);
        let dev6 = self.v6.as_ref().and_then(|w| w.device.as_ref());
        // The IPv6 device's FDB entries arrive as IPv4-view FDB events (no destination).
        let ours =
            |ifindex: u32| dev_index == Some(ifindex) || dev6.is_some_and(|(i, _)| *i == ifindex);
        match event {
            Event::Link(_, l) => {
                let by_name = self.device.as_ref().is_some_and(|(_, n)| *n == l.name)
                    || dev6.is_some_and(|(_, n)| *n == l.name);
                if ours(l.index) || by_name {
                    Some(Trigger::Device)
                } else if l.index == self.underlay {
                    Some(Trigger::Underlay)
                } else {
                    None
                }
            }
            Event::Addr(_, a) if ours(a.ifindex) => Some(Trigger::Address),
            Event::Addr(_, a) if a.ifindex == self.underlay => Some(Trigger::Underlay),
            Event::Route(_, r) if self.in_overlay(r.dst) => Some(Trigger::Route),
            Event::Neigh(_, n) if ours(n.ifindex) => Some(Trigger::Neigh),
            Event::Fdb(_, f) if ours(f.ifindex) => Some(Trigger::Fdb),
            Event::Route6(_, r) if self.in_overlay6(r.dst) => Some(Trigger::Route),
            Event::Neigh6(_, n) if dev6.is_some_and(|(i, _)| *i == n.ifindex) => {
                Some(Trigger::Neigh)
            }
            // The IPv6 device's subnet address (/128). Its link-local address is the kernel's
            // (made and dropped with the link state, which the link's own event reports).
            Event::Addr6(_, a)
                if dev6.is_some_and(|(i, _)| *i == a.ifindex) && !is_link_local(a.net.ip()) =>
            {
                Some(Trigger::Address)
            }
            Event::Lost => Some(Trigger::Lost),
            _ => None,
        }
    }

    fn in_overlay(&self, dst: Ipv4Network) -> bool {
        dst.prefix() >= self.network.prefix() && self.network.contains(dst.network())
    }

    fn in_overlay6(&self, dst: Ipv6Network) -> bool {
        self.v6.as_ref().is_some_and(|w| {
            dst.prefix() >= w.network.prefix() && w.network.contains(dst.network())
        })
    }
}

/// `fe80::/10`.
fn is_link_local(ip: Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

/// How long the kernel's echo of one of our writes is expected: it arrives within milliseconds
/// (the socket is read by the same loop); a second leaves room for a loop busy with a big batch.
pub(super) const ECHO_TTL: Duration = Duration::from_secs(1);

/// The identity and content of a route, neighbour or FDB entry one of our writes set or removed,
/// as its notification will show it. A new entry is matched on its content (an entry someone
/// else changed right after our write differs from ours and still repairs); a removal on the
/// entry's identity alone, since the kernel's notification of it carries whatever was there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum EchoKey {
    RouteNew {
        dst: Ipv4Network,
        gateway: Option<Ipv4Addr>,
    },
    RouteDel(Ipv4Network),
    NeighNew {
        ifindex: u32,
        ip: Ipv4Addr,
        mac: MacAddr,
    },
    NeighDel {
        ifindex: u32,
        ip: Ipv4Addr,
    },
    FdbNew {
        ifindex: u32,
        mac: MacAddr,
        dst: Ipv4Addr,
    },
    FdbDel {
        ifindex: u32,
        mac: MacAddr,
    },
    Route6New {
        dst: Ipv6Network,
        gateway: Option<Ipv6Addr>,
    },
    Route6Del(Ipv6Network),
    Neigh6New {
        ifindex: u32,
        ip: Ipv6Addr,
        mac: MacAddr,
    },
    Neigh6Del {
        ifindex: u32,
        ip: Ipv6Addr,
    },
    /// An FDB entry to an IPv6 VTEP, as the IPv4-view notification shows it (no destination).
    Fdb6New {
        ifindex: u32,
        mac: MacAddr,
    },
    Addr6New {
        ifindex: u32,
        net: Ipv6Network,
    },
    Addr6Del {
        ifindex: u32,
        net: Ipv6Network,
    },
}

impl EchoKey {
    /// What the kernel will announce after `op`; nothing for ops without a watched echo.
    fn of_op(op: &Op) -> Option<(EchoKey, Option<u32>)> {
        Some(match *op {
            Op::RouteReplace(ref r) => (
                EchoKey::RouteNew {
                    dst: r.dst,
                    gateway: r.gateway,
                },
                r.oif,
            ),
            Op::RouteDel(ref r) => (EchoKey::RouteDel(r.dst), None),
            Op::NeighReplace { ifindex, ip, mac } => (EchoKey::NeighNew { ifindex, ip, mac }, None),
            Op::NeighDel { ifindex, ip } => (EchoKey::NeighDel { ifindex, ip }, None),
            Op::FdbReplace { ifindex, mac, dst } => (EchoKey::FdbNew { ifindex, mac, dst }, None),
            Op::FdbDel { ifindex, mac, .. } => (EchoKey::FdbDel { ifindex, mac }, None),
            Op::Route6Replace(ref r) => (
                EchoKey::Route6New {
                    dst: r.dst,
                    gateway: r.gateway,
                },
                r.oif,
            ),
            Op::Route6Del(ref r) => (EchoKey::Route6Del(r.dst), None),
            Op::Neigh6Replace { ifindex, ip, mac } => {
                (EchoKey::Neigh6New { ifindex, ip, mac }, None)
            }
            Op::Neigh6Del { ifindex, ip } => (EchoKey::Neigh6Del { ifindex, ip }, None),
            Op::Fdb6Replace { ifindex, mac, .. } => (EchoKey::Fdb6New { ifindex, mac }, None),
            Op::Fdb6Del { ifindex, mac, .. } => (EchoKey::FdbDel { ifindex, mac }, None),
            Op::Addr6Add { ifindex, addr, .. } => (EchoKey::Addr6New { ifindex, net: addr }, None),
            Op::Addr6Del { ifindex, addr } => (EchoKey::Addr6Del { ifindex, net: addr }, None),
            _ => return None,
        })
    }

    /// What `event` announces, with the route's device (an op may leave it to the kernel).
    fn of_event(event: &Event) -> Option<(EchoKey, Option<u32>)> {
        Some(match event {
            Event::Route(Change::New, r) => (
                EchoKey::RouteNew {
                    dst: r.dst,
                    gateway: r.gateway,
                },
                r.oif,
            ),
            Event::Route(Change::Del, r) => (EchoKey::RouteDel(r.dst), None),
            Event::Neigh(Change::New, n) if n.permanent => (
                EchoKey::NeighNew {
                    ifindex: n.ifindex,
                    ip: n.ip,
                    mac: n.mac?,
                },
                None,
            ),
            // The kernel deletes a neighbour in two steps and announces both: first the entry
            // marked failed (a "new" without an address), then its removal.
            Event::Neigh(Change::New, n) if n.mac.is_none() => (
                EchoKey::NeighDel {
                    ifindex: n.ifindex,
                    ip: n.ip,
                },
                None,
            ),
            Event::Neigh(Change::Del, n) => (
                EchoKey::NeighDel {
                    ifindex: n.ifindex,
                    ip: n.ip,
                },
                None,
            ),
            Event::Fdb(Change::New, f) if f.permanent => (
                match f.dst {
                    Some(dst) => EchoKey::FdbNew {
                        ifindex: f.ifindex,
                        mac: f.mac,
                        dst,
                    },
                    None => EchoKey::Fdb6New {
                        ifindex: f.ifindex,
                        mac: f.mac,
                    },
                },
                None,
            ),
            Event::Route6(Change::New, r) => (
                EchoKey::Route6New {
                    dst: r.dst,
                    gateway: r.gateway,
                },
                r.oif,
            ),
            Event::Route6(Change::Del, r) => (EchoKey::Route6Del(r.dst), None),
            Event::Neigh6(Change::New, n) if n.permanent => (
                EchoKey::Neigh6New {
                    ifindex: n.ifindex,
                    ip: n.ip,
                    mac: n.mac?,
                },
                None,
            ),
            Event::Neigh6(Change::New, n) if n.mac.is_none() => (
                EchoKey::Neigh6Del {
                    ifindex: n.ifindex,
                    ip: n.ip,
                },
                None,
            ),
            Event::Neigh6(Change::Del, n) => (
                EchoKey::Neigh6Del {
                    ifindex: n.ifindex,
                    ip: n.ip,
                },
                None,
            ),
            Event::Fdb(Change::Del, f) => (
                EchoKey::FdbDel {
                    ifindex: f.ifindex,
                    mac: f.mac,
                },
                None,
            ),
            Event::Addr6(c, a) => (
                match c {
                    Change::New => EchoKey::Addr6New {
                        ifindex: a.ifindex,
                        net: a.net,
                    },
                    Change::Del => EchoKey::Addr6Del {
                        ifindex: a.ifindex,
                        net: a.net,
                    },
                },
                None,
            ),
            _ => return None,
        })
    }
}

/// The writes the agent made in the last [`ECHO_TTL`], to tell the kernel's echoes of them from
/// drift. Pure: the caller passes the time. A notification that matches no recent write (someone
/// else's, or ours announced after the TTL) is still drift and still repairs.
#[derive(Debug, Default)]
pub(super) struct Echoes {
    /// Each write's key: when its echo stops counting, and the route's device if the op named one.
    recent: HashMap<EchoKey, (Instant, Option<u32>)>,
    /// When expired entries were last dropped (at most once a TTL, so recording stays O(ops)).
    pruned: Option<Instant>,
}

impl Echoes {
    /// Remembers that `ops` were just applied.
    pub(super) fn record<'a>(&mut self, ops: impl IntoIterator<Item = &'a Op>, now: Instant) {
        self.prune(now);
        let until = now + ECHO_TTL;
        for op in ops {
            if let Some((key, oif)) = EchoKey::of_op(op) {
                self.recent.insert(key, (until, oif));
            }
        }
    }

    /// Whether `event` is the echo of a recent write of ours.
    pub(super) fn is_echo(&mut self, event: &Event, now: Instant) -> bool {
        let Some((key, oif)) = EchoKey::of_event(event) else {
            return false;
        };
        match self.recent.get(&key) {
            Some(&(until, want_oif)) if now <= until => want_oif.is_none() || want_oif == oif,
            _ => false,
        }
    }

    fn prune(&mut self, now: Instant) {
        if self.pruned.is_some_and(|p| now < p + ECHO_TTL) {
            return;
        }
        self.pruned = Some(now);
        self.recent.retain(|_, (until, _)| *until >= now);
        // A start-up batch of 30,000 entries must not keep its table's memory for good.
        if self.recent.capacity() > 4 * self.recent.len().max(256) {
            self.recent.shrink_to_fit();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.recent.len()
    }
}

/// The kind of object an op repairs, the label of `tweed_repairs_total`.
pub(super) fn kind_of(op: &Op) -> &'static str {
    match op {
        // The IPv6 plane's twins count as their IPv4 kind: the label says what drifted.
        Op::RouteReplace(_) | Op::RouteDel(_) | Op::Route6Replace(_) | Op::Route6Del(_) => "route",
        Op::NeighReplace { .. }
        | Op::NeighDel { .. }
        | Op::Neigh6Replace { .. }
        | Op::Neigh6Del { .. } => "neigh",
        Op::FdbReplace { .. } | Op::FdbDel { .. } | Op::Fdb6Replace { .. } | Op::Fdb6Del { .. } => {
            "fdb"
        }
        Op::AddrAdd { .. } | Op::AddrDel { .. } | Op::Addr6Add { .. } | Op::Addr6Del { .. } => {
            "address"
        }
        _ => "device",
    }
}

/// The kinds among `ops`, each once, in a stable order.
pub(super) fn kinds(ops: &[Op]) -> BTreeSet<&'static str> {
    ops.iter().map(kind_of).collect()
}

/// When to repair: the first notification opens a [`DEBOUNCE`] window (later ones join it
/// without moving it, so a stream of notifications cannot postpone the repair); a repair that
/// failed is retried after [`FIRST_RETRY`], doubling up to [`MAX_RETRY`], until one succeeds.
#[derive(Debug)]
pub(super) struct Schedule {
    pending: BTreeSet<Trigger>,
    /// When the oldest unhandled notification arrived (what the repair time is measured from).
    since: Option<Instant>,
    due: Option<Instant>,
    retry: Duration,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            pending: BTreeSet::new(),
            since: None,
            due: None,
            retry: FIRST_RETRY,
        }
    }
}

/// One repair to run now.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Due {
    pub(super) triggers: BTreeSet<Trigger>,
    pub(super) since: Instant,
}

impl Schedule {
    pub(super) fn note(&mut self, t: Trigger, now: Instant) {
        self.pending.insert(t);
        self.since.get_or_insert(now);
        let window = now + DEBOUNCE;
        self.due = Some(self.due.map_or(window, |d| d.min(window)));
    }

    /// When the next repair is due, if one is.
    pub(super) fn due(&self) -> Option<Instant> {
        self.due
    }

    /// Takes the repair that is due at `now`.
    pub(super) fn take(&mut self, now: Instant) -> Option<Due> {
        if self.due.is_none_or(|d| d > now) {
            return None;
        }
        self.due = None;
        Some(Due {
            triggers: std::mem::take(&mut self.pending),
            since: self.since.take().unwrap_or(now),
        })
    }

    /// `done` failed: try it again after the current backoff, keeping what it was for.
    pub(super) fn failed(&mut self, done: Due, now: Instant) {
        self.pending.extend(done.triggers);
        self.since = Some(self.since.map_or(done.since, |s| s.min(done.since)));
        let at = now + self.retry;
        self.due = Some(self.due.map_or(at, |d| d.min(at)));
        self.retry = (self.retry * 2).min(MAX_RETRY);
    }

    pub(super) fn succeeded(&mut self) {
        self.retry = FIRST_RETRY;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::{Addr, Change, FdbEntry, Link, Neighbour, Route};

    fn watched() -> Watched {
        Watched {
            device: Some((7, "tweed.1".into())),
            underlay: 2,
            network: "10.244.0.0/16".parse().unwrap(),
            v6: None,
        }
    }

    fn link(index: u32, name: &str) -> Link {
        Link {
            index,
            name: name.into(),
            mtu: 1450,
            up: true,
            ..Default::default()
        }
    }

    fn route(dst: &str, oif: u32) -> Route {
        Route::onlink(dst.parse().unwrap(), "10.244.2.0".parse().unwrap(), oif)
    }

    #[test]
    fn only_what_this_node_owns_triggers_a_repair() {
        use Change::{Del, New};
        let addr = |ifindex, net: &str| Addr {
            ifindex,
            net: net.parse().unwrap(),
        };
        let neigh = |ifindex| Neighbour {
            ifindex,
            ip: "10.244.2.0".parse().unwrap(),
            mac: None,
            permanent: true,
        };
        let fdb = |ifindex| FdbEntry {
            ifindex,
            mac: "02:00:00:00:00:02".parse().unwrap(),
            dst: None,
            permanent: true,
        };
        let cases = [
            (Event::Link(Del, link(7, "tweed.1")), Some(Trigger::Device)),
            // Recreated by someone else under our name, or renamed away from it: ours either way.
            (Event::Link(New, link(9, "tweed.1")), Some(Trigger::Device)),
            (Event::Link(New, link(7, "renamed")), Some(Trigger::Device)),
            (Event::Link(New, link(2, "eth0")), Some(Trigger::Underlay)),
            (Event::Link(New, link(3, "veth123")), None),
            (
                Event::Addr(Del, addr(7, "10.244.1.0/32")),
                Some(Trigger::Address),
            ),
            (
                Event::Addr(New, addr(2, "198.18.0.9/24")),
                Some(Trigger::Underlay),
            ),
            (Event::Addr(New, addr(4, "172.17.0.1/16")), None),
            // Routes into the overlay, whatever their device (host-gw's go through the underlay);
            // the overlay route itself too (udp's); nothing outside it, nothing wider.
            (
                Event::Route(Del, route("10.244.2.0/24", 7)),
                Some(Trigger::Route),
            ),
            (
                Event::Route(New, route("10.244.2.0/24", 2)),
                Some(Trigger::Route),
            ),
            (
                Event::Route(Del, route("10.244.0.0/16", 9)),
                Some(Trigger::Route),
            ),
            (Event::Route(Del, route("10.0.0.0/8", 7)), None),
            (Event::Route(New, route("192.168.0.0/24", 2)), None),
            (Event::Neigh(Del, neigh(7)), Some(Trigger::Neigh)),
            // The underlay's ARP entries churn all the time and are the kernel's.
            (Event::Neigh(New, neigh(2)), None),
            (Event::Fdb(Del, fdb(7)), Some(Trigger::Fdb)),
            (Event::Fdb(Del, fdb(5)), None),
            (Event::Route6(New, route6("fd00:10:244:2::/64", 7)), None),
            (Event::Lost, Some(Trigger::Lost)),
        ];
        let w = watched();
        for (event, want) in &cases {
            assert_eq!(w.trigger(event), *want, "{event:?}");
        }

        // host-gw: no device of its own.
        let hg = Watched {
            device: None,
            ..watched()
        };
        assert_eq!(hg.trigger(&Event::Link(Del, link(7, "tweed.1"))), None);
        assert_eq!(hg.trigger(&Event::Neigh(Del, neigh(7))), None);
        assert_eq!(
            hg.trigger(&Event::Route(Del, route("10.244.2.0/24", 2))),
            Some(Trigger::Route)
        );
    }

    #[test]
    fn a_burst_is_one_repair_a_debounce_window_after_its_first_notification() {
        let t0 = Instant::now();
        let mut s = Schedule::default();
        assert_eq!(s.due(), None);
        assert_eq!(s.take(t0 + Duration::from_secs(9)), None);
        s.note(Trigger::Device, t0);
        // Notifications keep arriving: the repair is not postponed by them.
        for ms in [10, 50, 99] {
            s.note(Trigger::Route, t0 + Duration::from_millis(ms));
        }
        assert_eq!(s.due(), Some(t0 + DEBOUNCE));
        assert_eq!(s.take(t0 + Duration::from_millis(99)), None);
        let due = s.take(t0 + DEBOUNCE).unwrap();
        assert_eq!(
            due.triggers,
            BTreeSet::from([Trigger::Device, Trigger::Route])
        );
        assert_eq!(due.since, t0);
        assert_eq!(s.due(), None);
        // The next notification opens a new window.
        let t1 = t0 + Duration::from_secs(1);
        s.note(Trigger::Fdb, t1);
        assert_eq!(s.take(t1 + DEBOUNCE).unwrap().since, t1);
    }

    #[test]
    fn failed_repairs_are_retried_with_doubling_backoff_until_one_succeeds() {
        let t0 = Instant::now();
        let mut s = Schedule::default();
        s.note(Trigger::Route, t0);
        let mut now = t0 + DEBOUNCE;
        let mut waits = Vec::new();
        for _ in 0..7 {
            let due = s.take(now).expect("due");
            assert_eq!(due.since, t0, "measured from the first notification");
            assert_eq!(due.triggers, BTreeSet::from([Trigger::Route]));
            s.failed(due, now);
            let next = s.due().unwrap();
            waits.push((next - now).as_millis());
            now = next;
        }
        assert_eq!(waits, [200, 400, 800, 1600, 3200, 5000, 5000]);
        let due = s.take(now).unwrap();
        s.succeeded();
        drop(due);
        s.note(Trigger::Neigh, now);
        let due = s.take(now + DEBOUNCE).unwrap();
        s.failed(due, now + DEBOUNCE);
        assert_eq!(s.due(), Some(now + DEBOUNCE + FIRST_RETRY), "backoff reset");
        // A notification during a backoff does not wait for it longer than a debounce window.
        let mut s = Schedule::default();
        s.note(Trigger::Route, t0);
        let due = s.take(t0 + DEBOUNCE).unwrap();
        s.failed(due, t0 + DEBOUNCE);
        s.note(Trigger::Fdb, t0 + DEBOUNCE);
        assert_eq!(s.due(), Some(t0 + DEBOUNCE + DEBOUNCE));
        let due = s.take(t0 + DEBOUNCE + DEBOUNCE).unwrap();
        assert_eq!(due.triggers, BTreeSet::from([Trigger::Route, Trigger::Fdb]));
    }

    fn route6(dst: &str, oif: u32) -> crate::netlink::Route6 {
        let dst: Ipv6Network = dst.parse().unwrap();
        crate::netlink::Route6::onlink(dst, dst.network(), oif)
    }

    /// Dual stack: the IPv6 plane's device, routes into the IPv6 overlay and NDP/FDB entries on
    /// its device trigger repairs like their IPv4 twins; everything else IPv6 does not.
    #[test]
    fn the_ipv6_planes_objects_trigger_repairs() {
        use Change::{Del, New};
        let w = Watched {
            v6: Some(Watched6 {
                device: Some((9, "tweed-v6.1".into())),
                network: "fd00:10:244::/56".parse().unwrap(),
            }),
            ..watched()
        };
        let n6 = |ifindex| crate::netlink::Neighbour6 {
            ifindex,
            ip: "fd00:10:244:2::".parse().unwrap(),
            mac: Some(MacAddr([2, 0, 0, 0, 0, 2])),
            permanent: true,
        };
        let fdb6 = |ifindex| FdbEntry {
            ifindex,
            mac: MacAddr([2, 0, 0, 0, 0, 2]),
            dst: None,
            permanent: true,
        };
        let cases = [
            (
                Event::Link(Del, link(9, "tweed-v6.1")),
                Some(Trigger::Device),
            ),
            // Re-made under the same name (new index): still ours.
            (
                Event::Link(New, link(12, "tweed-v6.1")),
                Some(Trigger::Device),
            ),
            (
                Event::Route6(Del, route6("fd00:10:244:2::/64", 9)),
                Some(Trigger::Route),
            ),
            // host-gw's IPv6 routes go through the underlay.
            (
                Event::Route6(Del, route6("fd00:10:244:3::/64", 2)),
                Some(Trigger::Route),
            ),
            (Event::Route6(Del, route6("fd00:10:244::/48", 9)), None),
            (Event::Route6(New, route6("2001:db8::/64", 2)), None),
            (Event::Neigh6(Del, n6(9)), Some(Trigger::Neigh)),
            (Event::Neigh6(Del, n6(2)), None),
            (Event::Fdb(Del, fdb6(9)), Some(Trigger::Fdb)),
            (Event::Fdb(Del, fdb6(5)), None),
            // The device's subnet address: removed (or another one added) is drift; the
            // kernel's link-local address and addresses elsewhere are not ours.
            (
                Event::Addr6(Del, addr6(9, "fd00:10:244:7::/128")),
                Some(Trigger::Address),
            ),
            (
                Event::Addr6(New, addr6(9, "2001:db8::1/64")),
                Some(Trigger::Address),
            ),
            (Event::Addr6(Del, addr6(9, "fe80::1/64")), None),
            (Event::Addr6(New, addr6(9, "febf::1/64")), None),
            (Event::Addr6(Del, addr6(2, "fd00:198:18::1/64")), None),
            (Event::Addr6(Del, addr6(7, "fd00:10:244:7::/128")), None),
        ];
        for (event, want) in &cases {
            assert_eq!(w.trigger(event), *want, "{event:?}");
        }
        assert_eq!(
            watched().trigger(&Event::Addr6(Del, addr6(9, "fd00:10:244:7::/128"))),
            None,
            "no IPv6 plane"
        );
        // Without an IPv6 plane none of them concern this node.
        let v4 = watched();
        assert_eq!(v4.trigger(&cases[2].0), None);
        assert_eq!(v4.trigger(&cases[6].0), None);
        assert_eq!(v4.trigger(&cases[8].0), None);

        // Our own IPv6 writes are echoes; someone else's change of the same route is not.
        let t0 = Instant::now();
        let mut e = Echoes::default();
        let r = route6("fd00:10:244:2::/64", 9);
        let mac = MacAddr([2, 0, 0, 0, 0, 2]);
        e.record(
            &[
                Op::Route6Replace(r),
                Op::Neigh6Replace {
                    ifindex: 9,
                    ip: "fd00:10:244:2::".parse().unwrap(),
                    mac,
                },
                Op::Fdb6Replace {
                    ifindex: 9,
                    mac,
                    dst: "fd00:198:18::2".parse().unwrap(),
                },
            ],
            t0,
        );
        assert!(e.is_echo(&Event::Route6(New, r), t0));
        assert!(e.is_echo(&Event::Neigh6(New, n6(9)), t0));
        assert!(e.is_echo(&Event::Fdb(New, fdb6(9)), t0));
        let mut moved = r;
        moved.oif = Some(2);
        assert!(!e.is_echo(&Event::Route6(New, moved), t0));
        assert!(!e.is_echo(&Event::Route6(Del, r), t0));
        assert!(!e.is_echo(&Event::Route6(New, r), t0 + ECHO_TTL * 2));

        // The device address the agent (re)sets is an echo; its removal by someone else is
        // not, nor is a different address, nor the echo after its TTL.
        let own = addr6(9, "fd00:10:244:7::/128");
        e.record(
            &[Op::Addr6Add {
                ifindex: 9,
                addr: own.net,
                nodad: true,
            }],
            t0,
        );
        assert!(e.is_echo(&Event::Addr6(New, own), t0));
        assert!(!e.is_echo(&Event::Addr6(Del, own), t0));
        assert!(!e.is_echo(&Event::Addr6(New, addr6(9, "fd00:10:244:8::/128")), t0));
        assert!(!e.is_echo(&Event::Addr6(New, own), t0 + ECHO_TTL * 2));
        e.record(
            &[Op::Addr6Del {
                ifindex: 9,
                addr: "2001:db8::1/64".parse().unwrap(),
            }],
            t0,
        );
        assert!(e.is_echo(&Event::Addr6(Del, addr6(9, "2001:db8::1/64")), t0));
    }

    fn addr6(ifindex: u32, net: &str) -> crate::netlink::Addr6 {
        crate::netlink::Addr6 {
            ifindex,
            net: net.parse().unwrap(),
            tentative: false,
        }
    }

    #[test]
    fn own_writes_are_echoes_until_they_expire_and_drift_still_repairs() {
        use Change::{Del, New};
        let t0 = Instant::now();
        let mac = |b: u8| MacAddr([2, 0, 0, 0, 0, b]);
        let gw: std::net::Ipv4Addr = "10.244.2.0".parse().unwrap();
        let public: std::net::Ipv4Addr = "198.18.0.2".parse().unwrap();
        let neigh = |ip, m, permanent| Neighbour {
            ifindex: 7,
            ip,
            mac: m,
            permanent,
        };
        let fdb = |m, dst| FdbEntry {
            ifindex: 7,
            mac: m,
            dst,
            permanent: true,
        };
        let added = [
            Op::FdbReplace {
                ifindex: 7,
                mac: mac(2),
                dst: public,
            },
            Op::NeighReplace {
                ifindex: 7,
                ip: gw,
                mac: mac(2),
            },
            Op::RouteReplace(route("10.244.2.0/24", 7)),
            Op::RouteDel(route("10.244.9.0/24", 7)),
            Op::NeighDel {
                ifindex: 7,
                ip: "10.244.9.0".parse().unwrap(),
            },
            Op::FdbDel {
                ifindex: 7,
                mac: mac(9),
                dst: None,
            },
            // No echo is watched for the device's own ops.
            Op::LinkSetUp {
                name: "tweed.1".into(),
            },
        ];
        let mut e = Echoes::default();
        e.record(&added, t0);
        assert_eq!(e.len(), 6);
        let soon = t0 + Duration::from_millis(5);
        // What the kernel announces after those writes.
        let echoes = [
            Event::Fdb(New, fdb(mac(2), Some(public))),
            Event::Neigh(New, neigh(gw, Some(mac(2)), true)),
            Event::Route(New, route("10.244.2.0/24", 7)),
            Event::Route(Del, route("10.244.9.0/24", 7)),
            Event::Neigh(New, neigh("10.244.9.0".parse().unwrap(), None, false)),
            Event::Neigh(
                Del,
                neigh("10.244.9.0".parse().unwrap(), Some(mac(9)), true),
            ),
            Event::Fdb(Del, fdb(mac(9), Some("198.18.0.9".parse().unwrap()))),
        ];
        for ev in &echoes {
            assert!(e.is_echo(ev, soon), "{ev:?}");
            // Announced twice (a replace of an existing entry can be): still ours.
            assert!(e.is_echo(ev, soon), "{ev:?}");
        }
        // Drift right after our writes: someone deleted what we added, re-added what we
        // removed, or changed it to something else.
        let drift = [
            Event::Route(Del, route("10.244.2.0/24", 7)),
            Event::Route(New, route("10.244.9.0/24", 7)),
            Event::Route(New, route("10.244.2.0/24", 8)),
            Event::Route(
                New,
                Route::onlink(
                    "10.244.2.0/24".parse().unwrap(),
                    "10.244.2.1".parse().unwrap(),
                    7,
                ),
            ),
            Event::Neigh(Del, neigh(gw, Some(mac(2)), true)),
            Event::Neigh(New, neigh(gw, Some(mac(3)), true)),
            Event::Neigh(New, neigh(gw, None, false)),
            Event::Fdb(Del, fdb(mac(2), Some(public))),
            Event::Fdb(New, fdb(mac(2), Some("198.18.0.3".parse().unwrap()))),
            Event::Fdb(New, fdb(mac(9), Some(public))),
            Event::Route(Del, route("10.244.3.0/24", 7)),
            Event::Link(Del, link(7, "tweed.1")),
            Event::Lost,
        ];
        for ev in &drift {
            assert!(!e.is_echo(ev, soon), "{ev:?}");
        }
        // Past the TTL an announcement of the same content is no longer taken for ours.
        let late = t0 + ECHO_TTL + Duration::from_millis(1);
        for ev in &echoes {
            assert!(!e.is_echo(ev, late), "{ev:?}");
        }
        // Expired writes are forgotten on the next record.
        e.record(&[Op::RouteReplace(route("10.244.4.0/24", 7))], late);
        assert_eq!(e.len(), 1);
        assert!(e.is_echo(&Event::Route(New, route("10.244.4.0/24", 7)), late));
        // A route written without a device matches whatever device the kernel picked.
        let mut r = route("10.244.5.0/24", 7);
        r.oif = None;
        e.record(&[Op::RouteReplace(r)], late);
        assert!(e.is_echo(&Event::Route(New, route("10.244.5.0/24", 3)), late));
    }

    #[test]
    fn repair_kinds_come_from_the_ops() {
        let ops = [
            Op::LinkSetUp {
                name: "tweed.1".into(),
            },
            Op::RouteReplace(route("10.244.2.0/24", 7)),
            Op::RouteReplace(route("10.244.3.0/24", 7)),
            Op::FdbDel {
                ifindex: 7,
                mac: "02:00:00:00:00:02".parse().unwrap(),
                dst: None,
            },
        ];
        assert_eq!(kinds(&ops), BTreeSet::from(["device", "route", "fdb"]));
        assert!(kinds(&[]).is_empty());
        // The IPv6 plane's repairs are labelled like their IPv4 twins (not "device").
        let v6 = [Op::Route6Replace(crate::netlink::Route6::onlink(
            "fd00:10:244:2::/64".parse().unwrap(),
            "fd00:10:244:2::".parse().unwrap(),
            4,
        ))];
        assert_eq!(kinds(&v6), BTreeSet::from(["route"]));
    }
}
