//! Following this node's `PublicIPv6` at run time (issue 19): an address notification on the
//! underlay interface (or lost notifications) schedules one check, a debounce window later, of
//! whether the advertised address is still there ([`crate::ipv6::public_ipv6_change`]). When it
//! was removed or replaced, the main loop moves the lease's `PublicIPv6` and the IPv6 VTEP to
//! the address the configured flags choose now, so peers follow through the lease watch.
//!
//! IPv4 has no such follower: its public IP is chosen once at start (a change between starts is
//! only logged). IPv6 addresses come and go on their own (SLAAC renumbering, privacy and
//! deprecated addresses), so the IPv6 half needs one.

use super::repair::DEBOUNCE;
use crate::ipv6::{public_ipv6_change, Ipv6Addrs, PublicIpv6Change};
use crate::netlink::Event;
use std::net::Ipv6Addr;
use tokio::time::Instant;
use tracing::warn;

/// The advertised `PublicIPv6` and what is needed to choose it again.
pub(super) struct Underlay6 {
    /// What the lease advertises.
    current: Ipv6Addr,
    /// `--public-ipv6`: never replaced.
    explicit: Option<Ipv6Addr>,
    /// The underlay interface the address is chosen from (the IPv4 flags' choice).
    ifindex: u32,
    iface: String,
    addrs: Ipv6Addrs,
    /// When the next check is due.
    due: Option<Instant>,
    /// The loss was logged (once per loss, not per notification).
    lost_said: bool,
}

impl Underlay6 {
    pub(super) fn new(
        current: Ipv6Addr,
        explicit: Option<Ipv6Addr>,
        ifindex: u32,
        iface: String,
        addrs: Ipv6Addrs,
    ) -> Underlay6 {
        Underlay6 {
            current,
            explicit,
            ifindex,
            iface,
            addrs,
            due: None,
            lost_said: false,
        }
    }

    /// Schedules a check for an IPv6 address change on the underlay, or lost notifications;
    /// a burst (a renumbering removes and adds) is one check.
    pub(super) fn note(&mut self, event: &Event, now: Instant) {
        let concerns = match event {
            Event::Addr6(_, a) => a.ifindex == self.ifindex,
            Event::Lost => true,
            _ => false,
        };
        if concerns && self.explicit.is_none() {
            self.due.get_or_insert(now + DEBOUNCE);
        }
    }

    pub(super) fn due(&self) -> Option<Instant> {
        self.due
    }

    /// The check: the new address to advertise, if the current one must go and another can
    /// replace it. A loss without replacement is logged once and changes nothing.
    pub(super) fn check(&mut self) -> Option<Ipv6Addr> {
        self.due = None;
        let addrs = match self.addrs.list() {
            Ok(a) => a,
            Err(e) => {
                warn!("checking the PublicIPv6: {e}");
                return None;
            }
        };
        match public_ipv6_change(self.current, self.explicit, self.ifindex, &addrs) {
            PublicIpv6Change::Keep => {
                self.lost_said = false;
                None
            }
            PublicIpv6Change::Move { from, to } => {
                warn!(
                    iface = %self.iface, %from, %to,
                    "the PublicIPv6 left the underlay interface; advertising the new address in the lease and moving the IPv6 VTEP to it"
                );
                self.current = to;
                self.lost_said = false;
                Some(to)
            }
            PublicIpv6Change::Lost { from } => {
                if !self.lost_said {
                    self.lost_said = true;
                    warn!(
                        iface = %self.iface, %from,
                        "the PublicIPv6 left the underlay interface and no other usable global IPv6 address is there: backends that carry IPv6 over the IPv6 underlay (vxlan, host-gw) cannot reach this node until one is added (udp carries it over IPv4 and is unaffected; the lease keeps the old address meanwhile)"
                    );
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipv6::Inet6Addr;
    use crate::netlink::{Addr6, Change};

    fn a6(ifindex: u32, addr: &str) -> Event {
        Event::Addr6(
            Change::Del,
            Addr6 {
                ifindex,
                net: format!("{addr}/64").parse().unwrap(),
                tentative: false,
            },
        )
    }

    fn listed(addr: &str) -> Inet6Addr {
        Inet6Addr {
            ifindex: 2,
            addr: addr.parse().unwrap(),
            prefix: 64,
            scope: 0,
            flags: 0x80,
        }
    }

    fn u(explicit: Option<&str>, addrs: Vec<Inet6Addr>) -> Underlay6 {
        Underlay6::new(
            "2001:db8::1".parse().unwrap(),
            explicit.map(|e| e.parse().unwrap()),
            2,
            "eth0".into(),
            Ipv6Addrs::Fixed(addrs),
        )
    }

    #[test]
    fn only_underlay_address_events_and_losses_schedule_one_check() {
        let t0 = Instant::now();
        let mut w = u(None, vec![]);
        w.note(&a6(9, "fd00:10:244:7::"), t0);
        assert_eq!(w.due(), None, "another interface's address");
        w.note(&a6(2, "2001:db8::1"), t0);
        assert_eq!(w.due(), Some(t0 + DEBOUNCE));
        // A burst is one check, at the first one's deadline.
        w.note(&a6(2, "2001:db8::5"), t0 + DEBOUNCE / 2);
        assert_eq!(w.due(), Some(t0 + DEBOUNCE));
        let mut l = u(None, vec![]);
        l.note(&Event::Lost, t0);
        assert!(l.due().is_some());
        // --public-ipv6: nothing to follow.
        let mut e = u(Some("2001:db8::77"), vec![]);
        e.note(&a6(2, "2001:db8::1"), t0);
        assert_eq!(e.due(), None);
    }

    #[test]
    fn a_replaced_address_moves_once_and_a_lost_one_waits() {
        let mut w = u(None, vec![listed("2001:db8::5")]);
        assert_eq!(w.check(), Some("2001:db8::5".parse().unwrap()));
        assert_eq!(w.due(), None);
        // Now advertising ::5, which is there: nothing more.
        assert_eq!(w.check(), None);
        let mut lost = u(None, vec![]);
        assert_eq!(lost.check(), None);
        assert!(lost.lost_said);
        assert_eq!(lost.current, "2001:db8::1".parse::<Ipv6Addr>().unwrap());
        let mut kept = u(None, vec![listed("2001:db8::9"), listed("2001:db8::1")]);
        assert_eq!(kept.check(), None);
    }
}
