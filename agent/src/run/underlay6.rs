//! Following this node's `PublicIPv6` at run time (issue 19): an address notification on the
//! underlay interface (or lost notifications) schedules one check, a debounce window later, of
//! whether the advertised address is still there ([`crate::ipv6::public_ipv6_change`]). When it
//! was removed or replaced, the main loop moves the lease's `PublicIPv6` and the IPv6 VTEP to
//! the address the configured flags choose now, so peers follow through the lease watch.
//!
//! A node that started IPv4 only in a dual-stack network (no usable IPv6 address on the
//! underlay, no `--public-ipv6`) has the same watcher with no current address: the first usable
//! one to appear (global, not deprecated, temporary or still in DAD) makes it
//! [`Check6::Appeared`], and the main loop turns the node dual stack.
//!
//! Every backend turns dual so, wireguard included: its IPv6 half (`WgConfig.dual`, the
//! lease's `BackendV6Data`) is set on the prepared config and the running backend when the
//! address appears, and the backend follows the lease's IPv6 half as it does after a loss of it
//! (`separate` makes `tweed-wg-v6`, the single-device modes start `tweed-wg`'s userspace workers
//! again with IPv6 on, the kernel path plans it at the next reconcile). The node counts as dual
//! only once its lease's key has the IPv6 half ([`Underlay6::turned_dual`]); an attempt that
//! ends without it leaves the watcher waiting, so the next address notification tries again.
//!
//! The reverse switch: a vxlan or host-gw node whose last usable IPv6 address left the underlay
//! interface and stayed away for [`GRACE`] turns IPv4 only ([`Check6::Gone`]): its IPv6 plane
//! needs an IPv6 underlay, so advertising the IPv6 half would only blackhole what peers send to
//! it. wireguard's `separate` mode likewise (`tweed-wg-v6` reaches peers at their IPv6
//! endpoints). An address that comes back within the grace cancels it (a flap, DAD replacing an
//! address). udp and wireguard's `ipv4` and `auto` carry IPv6 over the IPv4 underlay and never
//! need `PublicIPv6` after the start; wireguard's `ipv6` reaches every peer, IPv4 pods' too,
//! over the IPv6 underlay, and its peers skip a lease without a usable IPv6 half, so turning
//! IPv4 only would reach no one either: these stay as they are, and an address back (or a
//! new one, [`Check6::Moved`]) serves again at once ([`turns_v4_only_at_run_time`]). Once IPv4
//! only, the node waits for an address like one that started so, and turns dual again when one
//! appears.
//!
//! IPv4 has no such follower: its public IP is chosen once at start (a change between starts is
//! only logged). IPv6 addresses come and go on their own (SLAAC renumbering, privacy and
//! deprecated addresses), so the IPv6 half needs one.

use super::repair::DEBOUNCE;
use crate::ipv6::{public_ipv6, public_ipv6_change, Inet6Addr, Ipv6Addrs, PublicIpv6Change};
use crate::netlink::Event;
use std::net::Ipv6Addr;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{info, warn};

/// How long a dual-stack node goes without a usable IPv6 address on the underlay before it
/// turns IPv4 only: longer than a renumbering's remove-then-add or DAD on a replacement address
/// (about a second), short enough that peers stop sending IPv6 into a dead VTEP soon.
pub(super) const GRACE: Duration = Duration::from_secs(3);

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Check6 {
    /// The advertised address left; advertise this one instead.
    Moved(Ipv6Addr),
    /// A node running IPv4 only has a usable address now: turn dual stack on it.
    Appeared(Ipv6Addr),
    /// The advertised address (this one) left, none replaced it for [`GRACE`]: turn IPv4 only.
    Gone(Ipv6Addr),
}

/// DAD sets this flag until the address is unique; `/proc/net/if_inet6`'s flags.
const IFA_F_TENTATIVE: u32 = 0x40;
const IFA_F_DADFAILED: u32 = 0x08;

/// A failed read of the addresses is tried again after this, doubling up to
/// [`READ_RETRY_MAX`]: a check that never runs would leave a lost address unnoticed.
const READ_RETRY_MAX: Duration = Duration::from_secs(30);

/// Whether `addr` still serves as interface `ifindex`'s underlay address for the IPv4-only
/// trigger: present and unique. A deprecated address (preferred lifetime over, valid lifetime
/// not) still sends and receives, so it keeps the node dual stack until the kernel removes it;
/// only one in DAD or that failed it carries nothing.
fn still_serves(addr: Ipv6Addr, ifindex: u32, addrs: &[Inet6Addr]) -> bool {
    addrs.iter().any(|a| {
        a.addr == addr && a.ifindex == ifindex && a.flags & (IFA_F_DADFAILED | IFA_F_TENTATIVE) == 0
    })
}

/// The address an IPv4-only node turns dual stack on: the one the start-up would have chosen,
/// but only once DAD is done (a VTEP on a tentative address sends nothing; the notification of
/// DAD's end schedules another check).
pub(super) fn appeared(ifindex: u32, addrs: &[Inet6Addr]) -> Option<Ipv6Addr> {
    let done: Vec<Inet6Addr> = addrs
        .iter()
        .filter(|a| a.flags & IFA_F_TENTATIVE == 0)
        .cloned()
        .collect();
    public_ipv6(None, ifindex, &done)
}

/// Whether a dual-stack node of `backend_type` (`wg_mode`: wireguard's `Backend.Mode`) turns
/// IPv4 only when its IPv6 underlay address is gone: vxlan (its IPv6 VTEP is that address),
/// host-gw (peers route to it) and wireguard `separate` (`tweed-wg-v6`'s peers send to it),
/// whose IPv6 half cannot work without it. Not udp, nor wireguard `ipv4`/`auto`, which carry
/// IPv6 over the IPv4 underlay (peers never read udp's `PublicIPv6`:
/// [`crate::backend::v6::udp6_peer`]; tweed plans `auto` as `ipv4`); nor wireguard `ipv6`,
/// whose IPv4 pods ride the IPv6 underlay as well: its peers drop a lease without a usable
/// IPv6 half altogether, so turning IPv4 only would not make it reachable over IPv4 and would
/// only cost the rename back when the address returns.
pub(super) fn turns_v4_only_at_run_time(
    backend_type: &str,
    wg_mode: Option<tweed_config::WireguardMode>,
) -> bool {
    match backend_type {
        "vxlan" | "host-gw" => true,
        "wireguard" => wg_mode == Some(tweed_config::WireguardMode::Separate),
        _ => false,
    }
}

/// The watcher a node of `backend_type` starting in mode `ipv6` runs (none when the network has
/// no IPv6 half): a dual-stack node turns IPv4 only when its address is gone if
/// [`turns_v4_only_at_run_time`] says so, a node waiting IPv4 only turns dual when one
/// appears (every backend); once turned dual, it turns IPv4 only again like a dual start.
/// `explicit`: `--public-ipv6`.
pub(super) fn watcher(
    ipv6: &crate::ipv6::Ipv6Mode,
    backend_type: &str,
    wg_mode: Option<tweed_config::WireguardMode>,
    explicit: Option<Ipv6Addr>,
    ifindex: u32,
    iface: String,
    addrs: Ipv6Addrs,
) -> Option<Underlay6> {
    let current = match ipv6 {
        crate::ipv6::Ipv6Mode::DualStack { public_ipv6 } => Some(*public_ipv6),
        // `--public-ipv6` would have made the node dual from the start.
        crate::ipv6::Ipv6Mode::V4Only { .. } => None,
        crate::ipv6::Ipv6Mode::Off => return None,
    };
    let explicit = current.and(explicit);
    let mut u = Underlay6::new(current, explicit, ifindex, iface, addrs);
    if turns_v4_only_at_run_time(backend_type, wg_mode) {
        u = u.turn_v4_only_when_lost();
    }
    Some(u)
}

/// The advertised `PublicIPv6` and what is needed to choose it again.
pub(super) struct Underlay6 {
    /// What the lease advertises; `None`: the node runs IPv4 only and waits for an address.
    current: Option<Ipv6Addr>,
    /// The appeared address whose failed attempt was logged: once per address, not per
    /// notification.
    appeared_said: Option<Ipv6Addr>,
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
    /// A loss turns the node IPv4 only after [`GRACE`] ([`turns_v4_only_at_run_time`]).
    drops_v6: bool,
    /// When the advertised address was first found gone with nothing to replace it.
    lost_since: Option<Instant>,
    /// The wait before a check whose read failed is tried again.
    read_retry: Duration,
    /// A deprecated advertised address keeping the node dual was logged (once per address).
    deprecated_said: Option<Ipv6Addr>,
}

impl Underlay6 {
    pub(super) fn new(
        current: Option<Ipv6Addr>,
        explicit: Option<Ipv6Addr>,
        ifindex: u32,
        iface: String,
        addrs: Ipv6Addrs,
    ) -> Underlay6 {
        Underlay6 {
            current,
            appeared_said: None,
            explicit,
            ifindex,
            iface,
            addrs,
            // A node waiting for an address checks once at start too: one added between the
            // start-up's look and the notification subscription would otherwise go unseen.
            due: current.is_none().then(|| Instant::now() + DEBOUNCE),
            lost_said: false,
            drops_v6: false,
            lost_since: None,
            read_retry: DEBOUNCE,
            deprecated_said: None,
        }
    }

    /// A node of this backend turns IPv4 only when its address is gone for [`GRACE`].
    pub(super) fn turn_v4_only_when_lost(mut self) -> Underlay6 {
        self.drops_v6 = true;
        self
    }

    pub(super) fn iface(&self) -> &str {
        &self.iface
    }

    /// The lease lost its IPv6 half ([`Check6::Gone`] done): the node waits for an address like
    /// one that started IPv4 only. Checked soon, for an address that came back meanwhile.
    pub(super) fn went_v4_only(&mut self) {
        self.current = None;
        self.lost_since = None;
        self.lost_said = false;
        self.appeared_said = None;
        self.due = Some(Instant::now() + DEBOUNCE);
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
            // The earlier of the two: a check waiting for the grace's end comes sooner, since
            // an address added meanwhile may replace the lost one at once.
            let t = now + DEBOUNCE;
            self.due = Some(self.due.map_or(t, |d| d.min(t)));
        }
    }

    pub(super) fn due(&self) -> Option<Instant> {
        self.due
    }

    /// The lease's key has its IPv6 half for `to`: the node runs dual stack and follows `to`.
    pub(super) fn turned_dual(&mut self, to: Ipv6Addr) {
        self.current = Some(to);
        self.appeared_said = None;
    }

    /// Turning dual on `to` ended without the lease's IPv6 half (stopped, or the key came back
    /// IPv4 only): the node still waits, and the next address notification tries again. Logged
    /// once per address.
    pub(super) fn stayed_ipv4_only(&mut self, to: Ipv6Addr) {
        self.current = None;
        if self.appeared_said != Some(to) {
            self.appeared_said = Some(to);
            warn!(
                iface = %self.iface, public_ipv6 = %to,
                "turning dual stack ended without the lease's IPv6 half: the node stays IPv4 only and tries again at the next address change on the underlay interface"
            );
        }
    }

    /// The check: the new address to advertise, if the current one must go and another can
    /// replace it, or the first usable one of a node running IPv4 only. A loss without
    /// replacement is logged once and changes nothing.
    pub(super) fn check(&mut self) -> Option<Check6> {
        self.due = None;
        let addrs = match self.addrs.list() {
            Ok(a) => a,
            Err(e) => {
                warn!(retry_in = ?self.read_retry, "checking the PublicIPv6: {e}");
                let next = Instant::now() + self.read_retry;
                // A notification meanwhile may bring it forward; a grace's end is not postponed
                // further than the retry.
                self.due = Some(next);
                self.read_retry = (self.read_retry * 2).min(READ_RETRY_MAX);
                return None;
            }
        };
        self.read_retry = DEBOUNCE;
        let Some(current) = self.current else {
            let to = appeared(self.ifindex, &addrs)?;
            // Committed by `turned_dual` once the lease agrees.
            return Some(Check6::Appeared(to));
        };
        match public_ipv6_change(current, self.explicit, self.ifindex, &addrs) {
            PublicIpv6Change::Keep => {
                self.lost_said = false;
                self.deprecated_said = None;
                if self.lost_since.take().is_some() {
                    info!(
                        iface = %self.iface, public_ipv6 = %current,
                        "the PublicIPv6 is back within the grace period: staying dual stack"
                    );
                }
                None
            }
            PublicIpv6Change::Move { from, to } => {
                warn!(
                    iface = %self.iface, %from, %to,
                    "the PublicIPv6 left the underlay interface; advertising the new address in the lease and moving the IPv6 VTEP to it"
                );
                self.current = Some(to);
                self.lost_said = false;
                self.lost_since = None;
                Some(Check6::Moved(to))
            }
            PublicIpv6Change::Lost { from }
                if self.drops_v6 && still_serves(from, self.ifindex, &addrs) =>
            {
                // Deprecated with nothing to replace it: still valid, so still dual stack.
                if self.deprecated_said != Some(from) {
                    self.deprecated_said = Some(from);
                    warn!(
                        iface = %self.iface, public_ipv6 = %from,
                        "the PublicIPv6 is deprecated and no other usable global IPv6 address is there: staying dual stack on it until the kernel removes it (its valid lifetime ends)"
                    );
                }
                if self.lost_since.take().is_some() {
                    info!(
                        iface = %self.iface, public_ipv6 = %current,
                        "the PublicIPv6 is back (deprecated) within the grace period: staying dual stack"
                    );
                }
                None
            }
            PublicIpv6Change::Lost { from } if self.drops_v6 => {
                self.deprecated_said = None;
                let now = Instant::now();
                let since = *self.lost_since.get_or_insert_with(|| {
                    warn!(
                        iface = %self.iface, %from, grace = ?GRACE,
                        "the PublicIPv6 left the underlay interface and no other usable global IPv6 address is there: turning IPv4 only unless one is back within the grace period"
                    );
                    now
                });
                if now >= since + GRACE {
                    // Committed by `went_v4_only` once the lease agrees; until then the node
                    // stays dual and this is asked again.
                    return Some(Check6::Gone(from));
                }
                self.due = Some(since + GRACE);
                None
            }
            PublicIpv6Change::Lost { from } => {
                if !self.lost_said {
                    self.lost_said = true;
                    warn!(
                        iface = %self.iface, %from,
                        "the PublicIPv6 left the underlay interface and no other usable global IPv6 address is there: what reaches this node over the IPv6 underlay (wireguard Mode ipv6) stops until one is added; udp and wireguard Mode ipv4/auto carry IPv6 over IPv4 and are unaffected; the lease keeps the old address meanwhile"
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
            Some("2001:db8::1".parse().unwrap()),
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
        assert_eq!(
            w.check(),
            Some(Check6::Moved("2001:db8::5".parse().unwrap()))
        );
        assert_eq!(w.due(), None);
        // Now advertising ::5, which is there: nothing more.
        assert_eq!(w.check(), None);
        let mut lost = u(None, vec![]);
        assert_eq!(lost.check(), None);
        assert!(lost.lost_said);
        assert_eq!(
            lost.current,
            Some("2001:db8::1".parse::<Ipv6Addr>().unwrap())
        );
        let mut kept = u(None, vec![listed("2001:db8::9"), listed("2001:db8::1")]);
        assert_eq!(kept.check(), None);
    }

    fn with_flags(ifindex: u32, addr: &str, scope: u8, flags: u32) -> Inet6Addr {
        Inet6Addr {
            ifindex,
            addr: addr.parse().unwrap(),
            prefix: 64,
            scope,
            flags,
        }
    }

    #[test]
    fn an_ipv4_only_node_turns_dual_on_the_first_usable_address_once() {
        let waiting = |addrs: Vec<Inet6Addr>| {
            Underlay6::new(None, None, 2, "eth0".into(), Ipv6Addrs::Fixed(addrs))
        };
        // Nothing usable: link-local, another interface's, deprecated, temporary, in DAD.
        let mut w = waiting(vec![
            with_flags(2, "fe80::1", 0x20, 0x80),
            with_flags(9, "2001:db8::9", 0, 0x80),
            with_flags(2, "2001:db8::d", 0, 0x80 | 0x20),
            with_flags(2, "2001:db8::7", 0, 0x01),
            with_flags(2, "2001:db8::5", 0, 0x80 | IFA_F_TENTATIVE),
        ]);
        assert_eq!(w.check(), None);
        assert_eq!(w.current, None, "still waiting");
        // DAD done: that address.
        let mut w = waiting(vec![
            with_flags(2, "fe80::1", 0x20, 0x80),
            with_flags(2, "2001:db8::5", 0, 0x80),
        ]);
        assert!(w.due().is_some(), "a waiting node checks once at start");
        w.due = None;
        let t0 = Instant::now();
        w.note(&a6(2, "2001:db8::5"), t0);
        assert_eq!(w.due(), Some(t0 + DEBOUNCE), "a waiting node watches too");
        assert_eq!(
            w.check(),
            Some(Check6::Appeared("2001:db8::5".parse().unwrap()))
        );
        // The lease took its IPv6 half (the main loop's `turn_dual`).
        w.turned_dual("2001:db8::5".parse().unwrap());
        // From then on it follows that address like a node that started dual stack.
        assert_eq!(w.check(), None);
        assert_eq!(w.current, Some("2001:db8::5".parse().unwrap()));
    }

    /// wireguard turns dual at run time like the other backends (its watcher asks the main loop
    /// to take the lease's IPv6 half, whatever the `Backend.Mode`; `ipv6` never waits in
    /// practice, being refused at start without an address), and a `separate` node turns IPv4
    /// only again when the address is gone, as vxlan's does; the other modes only log the loss.
    #[tokio::test(start_paused = true)]
    async fn a_waiting_wireguard_node_turns_dual_and_only_separate_turns_ipv4_only_again() {
        use tweed_config::WireguardMode as M;
        let to: Ipv6Addr = "2001:db8::5".parse().unwrap();
        let v4 = crate::ipv6::Ipv6Mode::V4Only {
            iface: "eth0".into(),
        };
        for mode in [M::Separate, M::Auto, M::Ipv4, M::Ipv6] {
            let shared = std::sync::Arc::new(std::sync::Mutex::new(vec![listed("2001:db8::5")]));
            let mut w = watcher(
                &v4,
                "wireguard",
                Some(mode),
                None,
                2,
                "eth0".into(),
                Ipv6Addrs::Shared(shared.clone()),
            )
            .expect("a dual-stack network has a watcher");
            assert_eq!(w.check(), Some(Check6::Appeared(to)), "{mode:?}");
            w.turned_dual(to);
            assert_eq!(w.check(), None, "{mode:?}: follows the address now");
            shared.lock().unwrap().clear();
            let mut got = Vec::new();
            for _ in 0..4 {
                got.extend(w.check());
                tokio::time::sleep(GRACE / 2).await;
            }
            if mode == M::Separate {
                assert_eq!(got.first(), Some(&Check6::Gone(to)), "{mode:?}");
            } else {
                assert_eq!(got, vec![], "{mode:?}: never turns IPv4 only");
                assert_eq!(w.current, Some(to), "{mode:?}");
            }
        }
    }

    /// Review finding 4 (s32-int): the watcher commits to an address only once the lease's key
    /// has its IPv6 half; an attempt that ends without it (stopped, key IPv4 only) leaves it
    /// waiting, and the next notification tries again instead of following a `PublicIPv6` the
    /// node does not serve.
    #[test]
    fn turning_dual_commits_only_once_the_lease_has_its_ipv6_half() {
        let to: Ipv6Addr = "2001:db8::5".parse().unwrap();
        let mut w = Underlay6::new(
            None,
            None,
            2,
            "eth0".into(),
            Ipv6Addrs::Fixed(vec![with_flags(2, "2001:db8::5", 0, 0x80)]),
        );
        assert_eq!(w.check(), Some(Check6::Appeared(to)));
        assert_eq!(w.current, None, "not before the lease agrees");
        w.stayed_ipv4_only(to);
        assert_eq!((w.current, w.appeared_said), (None, Some(to)));
        assert_eq!(w.due(), None, "only a notification tries again");
        let t0 = Instant::now();
        w.note(&a6(2, "2001:db8::5"), t0);
        assert_eq!(w.due(), Some(t0 + DEBOUNCE));
        // Tried again: the same address, not a `Moved` on a lease without an IPv6 half.
        assert_eq!(w.check(), Some(Check6::Appeared(to)));
        w.stayed_ipv4_only(to);
        assert_eq!(w.check(), Some(Check6::Appeared(to)));
        w.turned_dual(to);
        assert_eq!((w.current, w.appeared_said), (Some(to), None));
        // From then on it follows the address like a node that started dual stack.
        assert_eq!(w.check(), None);
    }

    /// Issue 19, the reverse switch: a vxlan/host-gw watcher whose address is gone says so at
    /// once, asks to turn IPv4 only only after [`GRACE`], and an address back (or a
    /// replacement) within the grace cancels it.
    #[tokio::test(start_paused = true)]
    async fn a_lost_address_turns_ipv4_only_after_the_grace_unless_one_comes_back() {
        let from: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let shared = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut w = Underlay6::new(
            Some(from),
            None,
            2,
            "eth0".into(),
            Ipv6Addrs::Shared(shared.clone()),
        )
        .turn_v4_only_when_lost();
        let t0 = Instant::now();
        assert_eq!(w.check(), None, "not at the first look");
        assert_eq!(
            w.due(),
            Some(t0 + GRACE),
            "looked at again when the grace ends"
        );
        // A notification within the grace brings the check forward, not back.
        tokio::time::sleep(Duration::from_secs(1)).await;
        w.note(&a6(2, "2001:db8::1"), Instant::now());
        assert_eq!(w.due(), Some(Instant::now() + DEBOUNCE));
        assert_eq!(w.check(), None, "still within the grace");
        assert_eq!(w.due(), Some(t0 + GRACE), "the grace counts from the loss");
        // Back (a flap, DAD on a re-added address done): cancelled, the grace starts afresh.
        *shared.lock().unwrap() = vec![listed("2001:db8::1")];
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(w.check(), None);
        assert_eq!((w.lost_since, w.due()), (None, None));
        *shared.lock().unwrap() = vec![];
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(w.check(), None, "a new loss has its own grace");
        let t1 = Instant::now();
        tokio::time::sleep(GRACE - Duration::from_millis(1)).await;
        assert_eq!(w.check(), None);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(w.check(), Some(Check6::Gone(from)));
        assert_eq!(
            w.lost_since,
            Some(t1),
            "not committed before the lease agrees"
        );
        // The lease went IPv4 only: the watcher waits like an IPv4-only start...
        w.went_v4_only();
        assert_eq!(w.current, None);
        assert!(w.due().is_some(), "an address back meanwhile is looked for");
        assert_eq!(w.check(), None);
        // ...and turns dual again when an address appears.
        *shared.lock().unwrap() = vec![listed("2001:db8::1")];
        assert_eq!(w.check(), Some(Check6::Appeared(from)));
    }

    /// Review Medium 1: a deprecated address (preferred lifetime 0, valid lifetime left) still
    /// carries the VTEP, so with nothing to replace it the node stays dual however long; one
    /// that failed DAD counts as gone and turns the node IPv4 only after the grace.
    #[tokio::test(start_paused = true)]
    async fn a_deprecated_address_keeps_the_node_dual_and_a_dad_failed_one_does_not() {
        const DEPRECATED: u32 = 0x20;
        let from: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let shared = std::sync::Arc::new(std::sync::Mutex::new(vec![with_flags(
            2,
            "2001:db8::1",
            0,
            0x80 | DEPRECATED,
        )]));
        let mut w = Underlay6::new(
            Some(from),
            None,
            2,
            "eth0".into(),
            Ipv6Addrs::Shared(shared.clone()),
        )
        .turn_v4_only_when_lost();
        for _ in 0..3 {
            assert_eq!(w.check(), None);
            assert_eq!((w.lost_since, w.due()), (None, None), "no grace started");
            tokio::time::sleep(GRACE * 2).await;
        }
        assert_eq!(w.deprecated_said, Some(from));
        // A preferred address appearing next to it still moves the lease to that one.
        *shared.lock().unwrap() = vec![
            with_flags(2, "2001:db8::1", 0, 0x80 | DEPRECATED),
            with_flags(2, "2001:db8::5", 0, 0x80),
        ];
        assert_eq!(
            w.check(),
            Some(Check6::Moved("2001:db8::5".parse().unwrap()))
        );
        for flags in [0x80 | IFA_F_DADFAILED, IFA_F_DADFAILED | DEPRECATED] {
            let shared = std::sync::Arc::new(std::sync::Mutex::new(vec![with_flags(
                2,
                "2001:db8::1",
                0,
                flags,
            )]));
            let mut w = Underlay6::new(
                Some(from),
                None,
                2,
                "eth0".into(),
                Ipv6Addrs::Shared(shared),
            )
            .turn_v4_only_when_lost();
            assert_eq!(w.check(), None, "flags {flags:#x}");
            assert!(w.lost_since.is_some(), "flags {flags:#x}: the grace starts");
            tokio::time::sleep(GRACE).await;
            assert_eq!(w.check(), Some(Check6::Gone(from)), "flags {flags:#x}");
        }
    }

    /// Review Low 5: a failed read of the addresses (during the grace or not) schedules another
    /// check, backing off, so a loss still turns the node IPv4 only once reads work again.
    #[tokio::test(start_paused = true)]
    async fn a_failed_address_read_is_checked_again_with_backoff() {
        let from: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let flaky = std::sync::Arc::new(std::sync::Mutex::new(Some(Vec::new())));
        let mut w = Underlay6::new(
            Some(from),
            None,
            2,
            "eth0".into(),
            Ipv6Addrs::Flaky(flaky.clone()),
        )
        .turn_v4_only_when_lost();
        let t0 = Instant::now();
        assert_eq!(w.check(), None);
        assert_eq!(w.due(), Some(t0 + GRACE));
        *flaky.lock().unwrap() = None;
        tokio::time::sleep(GRACE).await;
        let mut waits = Vec::new();
        for _ in 0..10 {
            let now = Instant::now();
            assert_eq!(w.check(), None, "nothing decided on a failed read");
            let due = w.due().expect("another check after a failed read");
            waits.push(due - now);
            tokio::time::sleep_until(due).await;
        }
        assert_eq!(waits[0], DEBOUNCE);
        assert_eq!(waits[1], DEBOUNCE * 2, "backing off");
        assert_eq!(*waits.last().unwrap(), READ_RETRY_MAX, "capped");
        *flaky.lock().unwrap() = Some(Vec::new());
        assert_eq!(w.check(), Some(Check6::Gone(from)));
        assert_eq!(w.read_retry, DEBOUNCE, "a good read resets the backoff");
    }

    /// Within the grace, a replacement address moves the lease instead (a renumbering).
    #[tokio::test(start_paused = true)]
    async fn a_replacement_within_the_grace_moves_and_never_turns_ipv4_only() {
        let shared = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut w = Underlay6::new(
            Some("2001:db8::1".parse().unwrap()),
            None,
            2,
            "eth0".into(),
            Ipv6Addrs::Shared(shared.clone()),
        )
        .turn_v4_only_when_lost();
        assert_eq!(w.check(), None);
        tokio::time::sleep(GRACE / 2).await;
        *shared.lock().unwrap() = vec![listed("2001:db8::5")];
        assert_eq!(
            w.check(),
            Some(Check6::Moved("2001:db8::5".parse().unwrap()))
        );
        *shared.lock().unwrap() = vec![listed("2001:db8::5")];
        tokio::time::sleep(GRACE * 2).await;
        assert_eq!(w.check(), None);
        assert_eq!((w.lost_since, w.due()), (None, None));
    }

    /// udp and wireguard `ipv4`/`auto` carry IPv6 over the IPv4 underlay, wireguard `ipv6`
    /// gains nothing from IPv4 only: their watchers (built without `turn_v4_only_when_lost`)
    /// only log a loss, however long.
    #[tokio::test(start_paused = true)]
    async fn udp_and_wireguard_but_separate_never_turn_ipv4_only() {
        use tweed_config::WireguardMode as M;
        for b in ["udp", "wireguard", "alloc"] {
            assert!(!turns_v4_only_at_run_time(b, None), "{b}");
        }
        for m in [M::Auto, M::Ipv4, M::Ipv6] {
            assert!(!turns_v4_only_at_run_time("wireguard", Some(m)), "{m:?}");
        }
        assert!(turns_v4_only_at_run_time("wireguard", Some(M::Separate)));
        for b in ["vxlan", "host-gw"] {
            assert!(turns_v4_only_at_run_time(b, None), "{b}");
        }
        let mut w = u(None, vec![]);
        for _ in 0..5 {
            assert_eq!(w.check(), None);
            assert_eq!(w.due(), None, "no grace to wait for");
            tokio::time::sleep(GRACE * 2).await;
        }
        assert!(w.lost_said);
        assert_eq!(w.current, Some("2001:db8::1".parse().unwrap()));
    }

    /// Review Low 6: the watchers the main loop builds. A dual-stack udp or wireguard (`auto`)
    /// node whose address is gone only logs it, however long (its key stays dual: the main loop
    /// turns IPv4 only on `Gone` alone); vxlan and host-gw turn IPv4 only after the grace.
    #[tokio::test(start_paused = true)]
    async fn the_main_loops_watchers_turn_only_vxlan_and_host_gw_ipv4_only() {
        let from: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let dual = crate::ipv6::Ipv6Mode::DualStack { public_ipv6: from };
        let auto = Some(tweed_config::WireguardMode::Auto);
        for b in ["udp", "wireguard", "vxlan", "host-gw"] {
            let mode = (b == "wireguard").then_some(auto).flatten();
            let mut w = watcher(
                &dual,
                b,
                mode,
                None,
                2,
                "eth0".into(),
                Ipv6Addrs::Fixed(vec![]),
            )
            .expect("a dual-stack node has a watcher");
            let mut got = Vec::new();
            for _ in 0..4 {
                got.extend(w.check());
                tokio::time::sleep(GRACE / 2).await;
            }
            if turns_v4_only_at_run_time(b, mode) {
                assert_eq!(got.first(), Some(&Check6::Gone(from)), "{b}");
            } else {
                assert_eq!(got, vec![], "{b}: never turns IPv4 only");
                assert_eq!(w.current, Some(from), "{b}");
            }
        }
        // `--public-ipv6` is never second-guessed.
        let mut w = watcher(
            &dual,
            "vxlan",
            None,
            Some(from),
            2,
            "eth0".into(),
            Ipv6Addrs::Fixed(vec![]),
        )
        .unwrap();
        tokio::time::sleep(GRACE * 2).await;
        assert_eq!(w.check(), None);
        // Waiting IPv4 only: every backend turns dual.
        let v4 = crate::ipv6::Ipv6Mode::V4Only {
            iface: "eth0".into(),
        };
        for b in ["udp", "wireguard", "vxlan", "host-gw"] {
            let mut w = watcher(
                &v4,
                b,
                (b == "wireguard").then_some(tweed_config::WireguardMode::Separate),
                None,
                2,
                "eth0".into(),
                Ipv6Addrs::Fixed(vec![listed("2001:db8::5")]),
            )
            .unwrap();
            let want = Some(Check6::Appeared("2001:db8::5".parse().unwrap()));
            assert_eq!(w.check(), want, "{b}");
        }
        assert!(watcher(
            &crate::ipv6::Ipv6Mode::Off,
            "vxlan",
            None,
            None,
            2,
            "eth0".into(),
            Ipv6Addrs::Fixed(vec![])
        )
        .is_none());
    }

    #[test]
    fn hostile_address_lists_never_turn_a_node_dual() {
        let bad = [
            with_flags(2, "::1", 0, 0x80),
            with_flags(2, "::", 0, 0x80),
            with_flags(2, "ff02::1", 0, 0x80),
            with_flags(2, "::ffff:198.18.0.1", 0, 0x80),
            with_flags(2, "2001:db8::66", 0, 0x08), // DADFAILED
            with_flags(2, "2001:db8::67", 0x20, 0x80), // link scope
        ];
        assert_eq!(appeared(2, &bad), None);
        assert_eq!(appeared(2, &[]), None);
    }
}
