//! The masquerade and forward rules, checked and repaired off the main loop.
//!
//! A check forks iptables or nft (7.7-26 ms measured, seconds while another program holds the
//! xtables lock); awaited in the main loop, it held up a lease event arriving meanwhile (issue
//! 20). The loop now only asks ([`RuleCheck::want`], [`RuleCheck::remove_v6`]) and is told how
//! it went as a message ([`RuleCheck::finished`]), between any two of its turns.
//!
//! One job runs at a time, in the order asked. What is asked while one runs is merged into a
//! single next job, and that job reads the rules wanted when it starts, not when it was asked
//! for. So a check under way when the rule set changes (a new subnet, the IPv6 half gone) is
//! followed by one with the new set, and no check with the old set starts after the IPv6 rules
//! were removed (it would write them back).

use crate::rules::{Firewall, RuleSpec, RuleSpecV6, RulesError};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tracing::warn;

/// How long a check may run before a request for another one reports it (iptables waits
/// up to 5 s per command for the xtables lock; a check is a few commands).
const STUCK_AFTER: Duration = Duration::from_secs(30);

/// The rules a check brings the kernel to: the main loop's [`RuleSpec`] (IPv4, with an IPv6
/// half or not) or an IPv6-only network's [`V6OnlyRules`], which share the queue's semantics.
pub(super) trait RuleSet: std::fmt::Debug + Copy + Send + 'static {
    /// Blocking: forks iptables or nft.
    fn sync(&self, fw: &Firewall) -> Result<bool, RulesError>;
    /// Whether the set has IPv6 rules (a removal of them is then skipped).
    fn has_v6(&self) -> bool;
    /// The set without its IPv6 half.
    fn drop_v6(&mut self);
}

impl RuleSet for RuleSpec {
    fn sync(&self, fw: &Firewall) -> Result<bool, RulesError> {
        fw.sync(self)
    }

    fn has_v6(&self) -> bool {
        self.ipv6.is_some()
    }

    fn drop_v6(&mut self) {
        self.ipv6 = None;
    }
}

/// An IPv6-only network's rules ([`Firewall::sync_v6_only`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct V6OnlyRules {
    pub(super) spec: RuleSpecV6,
    pub(super) ip_masq: bool,
}

impl RuleSet for V6OnlyRules {
    fn sync(&self, fw: &Firewall) -> Result<bool, RulesError> {
        fw.sync_v6_only(&self.spec, self.ip_masq)
    }

    fn has_v6(&self) -> bool {
        true
    }

    /// Never asked: these rules are all IPv6, and an IPv6-only node has no IPv4-only mode.
    fn drop_v6(&mut self) {}
}

/// What a job does besides the check.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Extra {
    /// Remove IPv6 rules an earlier dual-stack run may have left (a start IPv4 only).
    pub(super) leftover_v6: bool,
    /// Remove the IPv6 rules of a node that turned IPv4 only (retried by the caller): the
    /// latest [`remove_v6`](RuleCheck::remove_v6) ticket merged into the job, so that an
    /// outcome answers the removals asked for up to it, not one asked for after it started.
    pub(super) teardown_v6: Option<u64>,
}

impl Extra {
    fn merge(self, other: Extra) -> Extra {
        Extra {
            leftover_v6: self.leftover_v6 || other.leftover_v6,
            teardown_v6: self.teardown_v6.max(other.teardown_v6),
        }
    }
}

/// How a job went.
#[derive(Debug)]
pub(super) struct Done<S = RuleSpec> {
    /// The rules the job brought the kernel to.
    pub(super) spec: S,
    /// Whether the check had to change anything.
    pub(super) synced: Result<bool, RulesError>,
    /// What was asked besides the check.
    pub(super) extra: Extra,
    /// The IPv6 rules' removal, when asked for; `None` also when the rules wanted by then had an
    /// IPv6 half again (nothing to remove).
    pub(super) removed_v6: Option<Result<bool, RulesError>>,
}

pub(super) struct RuleCheck<S: RuleSet = RuleSpec> {
    firewall: Arc<Firewall>,
    /// The rules wanted now; `None` until the first [`want`](Self::want).
    desired: Option<S>,
    /// Asked for while a job ran (or before any rules were wanted).
    queued: Option<Extra>,
    running: Option<JoinHandle<Done<S>>>,
    /// When the job under way started, and whether it was reported as stuck: a check that
    /// never returns (nft on a wedged netlink socket) no longer stalls the loop, so without
    /// this nothing would show that the rules are not being checked any more.
    started: Option<(std::time::Instant, bool)>,
    /// The last [`remove_v6`](Self::remove_v6) ticket handed out.
    tickets: u64,
}

impl<S: RuleSet> RuleCheck<S> {
    pub(super) fn new(firewall: Arc<Firewall>) -> RuleCheck<S> {
        RuleCheck {
            firewall,
            desired: None,
            queued: None,
            running: None,
            started: None,
            tickets: 0,
        }
    }

    pub(super) fn firewall(&self) -> &Arc<Firewall> {
        &self.firewall
    }

    /// A check bringing the rules to `spec` (which replaces whatever was wanted before), with
    /// `extra`; started now when none runs, else after the one running.
    pub(super) fn want(&mut self, spec: S, extra: Extra) {
        self.desired = Some(spec);
        self.ask(extra);
    }

    /// The rules wanted lose their IPv6 half at once, so that no job started from now on
    /// writes it, also before the next [`want`](Self::want).
    pub(super) fn drop_v6(&mut self) {
        if let Some(d) = self.desired.as_mut() {
            d.drop_v6();
        }
    }

    /// Removes the IPv6 rules (after the job running, if any), then checks the rest; the
    /// ticket a [`Done`] answers it with (in `extra.teardown_v6`, that or a later one).
    pub(super) fn remove_v6(&mut self) -> u64 {
        self.tickets += 1;
        self.ask(Extra {
            teardown_v6: Some(self.tickets),
            ..Extra::default()
        });
        self.tickets
    }

    fn ask(&mut self, extra: Extra) {
        self.queued = Some(self.queued.unwrap_or_default().merge(extra));
        if let Some((t0, reported)) = self.started.as_mut() {
            if !*reported && t0.elapsed() >= STUCK_AFTER {
                *reported = true;
                warn!(
                    running = ?t0.elapsed(),
                    firewall = self.firewall.name(),
                    "the rules check under way has not returned; later checks wait for it"
                );
            }
        }
        self.start_queued();
    }

    fn start_queued(&mut self) {
        if self.running.is_some() {
            return;
        }
        let Some(spec) = self.desired else {
            return;
        };
        let Some(extra) = self.queued.take() else {
            return;
        };
        let fw = self.firewall.clone();
        self.started = Some((std::time::Instant::now(), false));
        self.running = Some(tokio::task::spawn_blocking(move || {
            let synced = spec.sync(&fw);
            // Only rules nobody wants: a removal asked for before the node turned dual
            // stack again would take the IPv6 half just written.
            let removed_v6 = (!spec.has_v6() && (extra.leftover_v6 || extra.teardown_v6.is_some()))
                .then(|| fw.remove_v6());
            Done {
                spec,
                synced,
                extra,
                removed_v6,
            }
        }));
    }

    /// Whether a job is under way.
    #[cfg(test)]
    pub(super) fn running(&self) -> bool {
        self.running.is_some()
    }

    /// The end of the job under way, the next one (what was asked meanwhile) started before
    /// this returns; never, with none under way. Cancel-safe: dropped before the end, the job
    /// keeps running and a later call returns its end.
    pub(super) async fn finished(&mut self) -> Done<S> {
        let Some(job) = self.running.as_mut() else {
            return std::future::pending().await;
        };
        let done = job.await.expect("the rules job does not panic");
        self.running = None;
        self.started = None;
        self.start_queued();
        done
    }

    /// Shutting down: nothing more is started, and the job under way is let finish (iptables
    /// interrupted halfway would leave a chain without its jump) for up to `wait`.
    pub(super) async fn stop(&mut self, wait: Duration) -> Option<Done<S>> {
        if let Some(Extra {
            teardown_v6: Some(_),
            ..
        }) = self.queued.take()
        {
            // The next start removes IPv6 rules an IPv4-only node does not want.
            warn!("shutting down: the IPv6 rules' removal was not started; the next start removes them");
        }
        let job = self.running.take()?;
        match tokio::time::timeout(wait, job).await {
            Ok(done) => Some(done.expect("the rules job does not panic")),
            Err(_) => {
                warn!(
                    ?wait,
                    firewall = self.firewall.name(),
                    "shutting down: the rules check under way did not finish; it runs on until the process ends"
                );
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{FakeCall, FakeFirewall, RuleSpecV6};
    use crate::testutil::net;

    fn v4(subnet: &str) -> RuleSpec {
        RuleSpec {
            network: net("10.244.0.0/16"),
            subnet: net(subnet),
            ip_masq: true,
            ipv6: None,
        }
    }

    fn dual(subnet: &str) -> RuleSpec {
        RuleSpec {
            ipv6: Some(RuleSpecV6 {
                network: "fd00:10:244::/56".parse().unwrap(),
                subnet: "fd00:10:244:3::/64".parse().unwrap(),
            }),
            ..v4(subnet)
        }
    }

    fn checker() -> (RuleCheck, FakeFirewall) {
        let fake = FakeFirewall::default();
        let rc = RuleCheck::new(Arc::new(Firewall::Fake(fake.clone())));
        (rc, fake)
    }

    /// Waits (real time) until `n` syncs are held at the fake's gate.
    async fn until_held(fake: &FakeFirewall, n: usize) {
        fake.until_held(n, "waiting for held syncs").await;
    }

    /// Every job's end until none runs.
    async fn drain(rc: &mut RuleCheck) -> Vec<Done> {
        let mut out = Vec::new();
        while rc.running() {
            out.push(
                tokio::time::timeout(Duration::from_secs(10), rc.finished())
                    .await
                    .expect("the job ends"),
            );
        }
        out
    }

    #[tokio::test]
    async fn checks_asked_for_while_one_runs_are_merged_into_one_more_with_the_latest_rules() {
        let (mut rc, fake) = checker();
        fake.hold();
        rc.want(v4("10.244.3.0/24"), Extra::default());
        until_held(&fake, 1).await;
        // A burst of nft notifications and timer ticks while the slow check runs, the subnet
        // changing in the middle.
        for _ in 0..5 {
            rc.want(v4("10.244.3.0/24"), Extra::default());
        }
        rc.want(v4("10.244.9.0/24"), Extra::default());
        rc.want(v4("10.244.9.0/24"), Extra::default());
        assert_eq!(fake.held_syncs(), 1, "no second check alongside");
        assert_eq!(fake.calls(), vec![]);
        fake.release();
        let done = drain(&mut rc).await;
        let specs: Vec<RuleSpec> = done.iter().map(|d| d.spec).collect();
        assert_eq!(specs, [v4("10.244.3.0/24"), v4("10.244.9.0/24")]);
        assert!(done.iter().all(|d| matches!(d.synced, Ok(true))));
        assert_eq!(
            fake.calls(),
            [
                FakeCall::Sync(v4("10.244.3.0/24")),
                FakeCall::Sync(v4("10.244.9.0/24"))
            ]
        );
        // Idle: a request starts at once, and nothing is left over.
        rc.want(v4("10.244.9.0/24"), Extra::default());
        let done = drain(&mut rc).await;
        assert_eq!(done.len(), 1);
        assert!(matches!(done[0].synced, Ok(false)), "{:?}", done[0].synced);
    }

    /// The race of a dual-stack node turning IPv4 only while a check with the dual rules is
    /// under way: that check writes the IPv6 rules (it started before the switch); the switch's
    /// removal runs after it, and every later check has the IPv4-only rules, so the IPv6 rules
    /// stay removed.
    #[tokio::test]
    async fn a_check_under_way_when_the_ipv6_half_goes_never_brings_the_ipv6_rules_back() {
        let (mut rc, fake) = checker();
        rc.want(dual("10.244.3.0/24"), Extra::default());
        drain(&mut rc).await;
        assert!(fake.v6_present());
        // The IPv6 rules are deleted by someone else; the periodic check is to put them back
        // and is slow.
        Firewall::Fake(fake.clone()).remove_v6().unwrap();
        assert!(!fake.v6_present());
        let before = fake.calls().len();
        fake.hold();
        rc.want(dual("10.244.3.0/24"), Extra::default());
        until_held(&fake, 1).await;
        // The switch to IPv4 only, in the main loop's order: the IPv6 half dropped, the rules
        // asked for again (after_reacquire), the teardown's removal; a timer tick after.
        rc.drop_v6();
        rc.want(v4("10.244.3.0/24"), Extra::default());
        rc.remove_v6();
        rc.want(v4("10.244.3.0/24"), Extra::default());
        fake.release();
        let done = drain(&mut rc).await;
        assert_eq!(done.len(), 2, "{done:?}");
        assert_eq!(done[1].spec, v4("10.244.3.0/24"));
        assert!(done[1].extra.teardown_v6.is_some());
        assert!(
            matches!(done[1].removed_v6, Some(Ok(true))),
            "the stale check had put them back, and they are removed: {:?}",
            done[1].removed_v6
        );
        assert_eq!(
            fake.calls()[before..],
            [
                FakeCall::Sync(dual("10.244.3.0/24")),
                FakeCall::Sync(v4("10.244.3.0/24")),
                FakeCall::RemoveV6
            ]
        );
        assert!(!fake.v6_present());
        // Later checks (timer, nft) leave them removed.
        for _ in 0..3 {
            rc.want(v4("10.244.3.0/24"), Extra::default());
            drain(&mut rc).await;
        }
        assert!(!fake.v6_present());
    }

    /// Without a new `want` after the IPv6 half went, the job queued behind the running one
    /// still has the IPv4-only rules: it reads them when it starts.
    #[tokio::test]
    async fn a_queued_check_reads_the_rules_wanted_when_it_starts_not_when_asked() {
        let (mut rc, fake) = checker();
        fake.hold();
        rc.want(dual("10.244.3.0/24"), Extra::default());
        until_held(&fake, 1).await;
        // Queued with the dual rules...
        rc.want(dual("10.244.3.0/24"), Extra::default());
        // ...which go before it starts.
        rc.drop_v6();
        rc.remove_v6();
        fake.release();
        let done = drain(&mut rc).await;
        assert_eq!(done.len(), 2);
        assert_eq!(done[1].spec, v4("10.244.3.0/24"));
        assert_eq!(
            fake.calls(),
            [
                FakeCall::Sync(dual("10.244.3.0/24")),
                FakeCall::Sync(v4("10.244.3.0/24")),
                FakeCall::RemoveV6
            ]
        );
        assert!(!fake.v6_present());
    }

    /// A removal still queued when the node turned dual stack again is dropped: the IPv6 rules
    /// are wanted again and are not removed behind the check's back.
    #[tokio::test]
    async fn a_removal_overtaken_by_the_ipv6_half_coming_back_removes_nothing() {
        let (mut rc, fake) = checker();
        fake.hold();
        rc.want(v4("10.244.3.0/24"), Extra::default());
        until_held(&fake, 1).await;
        rc.remove_v6();
        rc.want(dual("10.244.3.0/24"), Extra::default());
        fake.release();
        let done = drain(&mut rc).await;
        assert_eq!(done.len(), 2);
        assert!(done[1].extra.teardown_v6.is_some());
        assert!(done[1].removed_v6.is_none(), "{:?}", done[1].removed_v6);
        assert!(!fake.calls().contains(&FakeCall::RemoveV6));
        assert!(fake.v6_present());
    }

    /// A removal asked for while another runs is answered by the next job, not the running one
    /// (which may have started before the IPv6 rules were written again).
    #[tokio::test]
    async fn each_removal_is_answered_by_a_job_that_started_after_it_was_asked() {
        let (mut rc, fake) = checker();
        rc.want(v4("10.244.3.0/24"), Extra::default());
        drain(&mut rc).await;
        fake.hold();
        let first = rc.remove_v6();
        until_held(&fake, 1).await;
        let second = rc.remove_v6();
        let third = rc.remove_v6();
        assert!(first < second && second < third);
        fake.release();
        let done = drain(&mut rc).await;
        let answered: Vec<Option<u64>> = done.iter().map(|d| d.extra.teardown_v6).collect();
        assert_eq!(answered, [Some(first), Some(third)]);
    }

    #[tokio::test]
    async fn shutdown_lets_the_job_under_way_finish_and_drops_what_was_queued() {
        let (mut rc, fake) = checker();
        fake.hold();
        rc.want(v4("10.244.3.0/24"), Extra::default());
        until_held(&fake, 1).await;
        rc.want(v4("10.244.9.0/24"), Extra::default());
        let release = {
            let fake = fake.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                fake.release();
            })
        };
        let done = rc.stop(Duration::from_secs(10)).await.expect("waited for");
        release.join().unwrap();
        assert_eq!(done.spec, v4("10.244.3.0/24"));
        assert!(!rc.running());
        assert_eq!(fake.calls(), [FakeCall::Sync(v4("10.244.3.0/24"))]);

        // One that does not finish in time is left behind, not waited for forever.
        fake.hold();
        rc.want(v4("10.244.3.0/24"), Extra::default());
        until_held(&fake, 1).await;
        let began = std::time::Instant::now();
        assert!(rc.stop(Duration::from_millis(50)).await.is_none());
        assert!(began.elapsed() < Duration::from_secs(5));
        assert!(!rc.running());
        // The blocking thread must end before the test's runtime can.
        fake.release();
    }
}
