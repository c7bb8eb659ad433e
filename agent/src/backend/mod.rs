//! Backends turn the set of remote leases into kernel state. Each one has the same shape, which
//! host-gw and udp reuse:
//!
//! 1. `setup`: make sure the backend's device exists (idempotent, reuses what a previous run left);
//! 2. desired state: one peer value per remote lease (e.g. [`vxlan::VxlanPeer`]);
//! 3. a pure `plan(observed, desired) -> Vec<Op>` producing only the missing, different and stale
//!    entries, so an unchanged world costs zero syscalls beyond the first observation;
//! 4. [`apply_plan`]: batched, idempotent, failures reported per peer in [`ReconcileStats`].

use std::collections::{HashMap, HashSet};
use std::fmt;

use ipnetwork::Ipv4Network;

use crate::netlink::{Netlink, NetlinkError, Op, Route};

pub mod vxlan;

pub use vxlan::{ObservedState, VxlanBackend, VxlanConfig, VxlanError, VxlanPeer};

/// Outcome of one reconcile pass.
#[derive(Debug, Default)]
pub struct ReconcileStats {
    /// Ops the kernel accepted (deletes of already-gone entries included).
    pub ops_applied: usize,
    pub failures: Vec<PeerFailure>,
}

impl ReconcileStats {
    pub fn is_clean(&self) -> bool {
        self.failures.is_empty()
    }
}

/// One op the kernel refused, with the peer it was for, so one broken peer is reported and
/// retried without holding back the others.
#[derive(Debug, thiserror::Error)]
pub struct PeerFailure {
    /// The peer's subnet; for cleanup of entries no current peer owns, the subnet the entry
    /// served when it can be told, else `None`.
    pub subnet: Option<Ipv4Network>,
    pub op: Op,
    #[source]
    pub error: NetlinkError,
}

impl fmt::Display for PeerFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.subnet {
            Some(s) => write!(f, "peer {s}: {}", self.error),
            None => write!(f, "stale entry cleanup: {}", self.error),
        }
    }
}

/// Applies a plan and attributes each failure with `owner`.
pub async fn apply_plan(
    nl: &Netlink,
    ops: &[Op],
    owner: impl Fn(&Op) -> Option<Ipv4Network>,
) -> ReconcileStats {
    let mut stats = ReconcileStats::default();
    if ops.is_empty() {
        return stats;
    }
    for (op, res) in ops.iter().zip(nl.apply_all(ops).await) {
        match res {
            Ok(()) => stats.ops_applied += 1,
            Err(error) => stats.failures.push(PeerFailure {
                subnet: owner(op),
                op: op.clone(),
                error,
            }),
        }
    }
    stats
}

/// The route part of a plan.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RouteDiff {
    /// Observed routes no desired route accounts for.
    pub delete: Vec<Route>,
    /// Desired routes that are missing or differ, in desired order.
    pub replace: Vec<Route>,
}

/// Diffs the routes a backend owns (`observed`, already narrowed to its device and protocol)
/// against the ones it wants. Routes are keyed by (dst, metric) like the kernel keys them, so a
/// differing route with a desired key is replaced in place rather than deleted and re-added,
/// which would drop traffic in between.
pub fn diff_routes(observed: &[Route], desired: &[Route]) -> RouteDiff {
    let have: HashMap<(Ipv4Network, u32), &Route> =
        observed.iter().map(|r| ((r.dst, r.metric), r)).collect();
    let want: HashSet<(Ipv4Network, u32)> = desired.iter().map(|r| (r.dst, r.metric)).collect();
    RouteDiff {
        delete: observed
            .iter()
            .filter(|r| !want.contains(&(r.dst, r.metric)))
            .copied()
            .collect(),
        replace: desired
            .iter()
            .filter(|d| !have.get(&(d.dst, d.metric)).is_some_and(|o| o.same_path(d)))
            .copied()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_diff_replaces_in_place_and_deletes_strays() {
        let net = |s: &str| s.parse::<Ipv4Network>().unwrap();
        let gw = |s: &str| s.parse().unwrap();
        let keep = Route::onlink(net("10.244.1.0/24"), gw("10.244.1.0"), 5);
        let changed_old = Route::onlink(net("10.244.2.0/24"), gw("10.244.2.0"), 5);
        let changed_new = Route::via(net("10.244.2.0/24"), gw("198.18.0.2"), Some(5));
        let stray = Route::onlink(net("10.244.3.0/24"), gw("10.244.3.0"), 5);
        let other_metric = Route {
            metric: 100,
            ..keep
        };
        let new = Route::onlink(net("10.244.4.0/24"), gw("10.244.4.0"), 5);
        let d = diff_routes(
            &[keep, changed_old, stray, other_metric],
            &[keep, changed_new, new],
        );
        assert_eq!(d.delete, vec![stray, other_metric]);
        assert_eq!(d.replace, vec![changed_new, new]);
        assert_eq!(diff_routes(&[keep], &[keep]), RouteDiff::default());
    }
}
