//! What the agent tells operators: the state the HTTP and gRPC servers show, the Prometheus
//! metrics, the lease event stream and the log. Every part of the agent reports through here, so
//! the parts themselves only decide.

use super::dataplane::Repaired;
use super::deps::Clock;
use crate::backend::udp::io::Stats as UdpStats;
use crate::backend::{ReconcileStats, Remote};
use crate::registry::RegistryError;
use crate::state::{AgentState, EventKind, Keyed, LeaseEventView, LeaseView, PeerView};
use crate::subnet::{OwnLease, SubnetError};
use crate::watch::{Applied, Lease, LeaseChange, LeaseTable};
use ipnetwork::Ipv4Network;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};
use tweed_config::NetworkConfig;
use tweed_config::SubnetKey;

/// The status' `ipv6` in an IPv6-only network.
pub const IPV6_ONLY: &str = "IPv6 only (EnableIPv4: false)";

/// Cheap to clone; clones report into the same state.
#[derive(Clone)]
pub(super) struct Report {
    state: AgentState,
    clock: Clock,
    /// What was warned about already, so a bad lease or an unreachable peer is logged once
    /// rather than on every resync.
    warned: Arc<Mutex<Seen>>,
    /// What the kept views were made of, to update them by key (see [`Report::leases`] and
    /// [`Report::programmed`]).
    views: Arc<Mutex<ViewInputs>>,
}

/// How many warnings [`Seen`] remembers: far more than the distinct bad leases and unreachable
/// peers of a real cluster, so those are still said once.
const SEEN_CAP: usize = 4096;

/// The "said once" memory, bounded: its entries are named by etcd keys and values anyone with
/// write access to the prefix chooses, so remembering every one (rev35 L7) let a writer churning
/// key names grow the agent without limit. It keeps the last [`SEEN_CAP`] as 64-bit keyed hashes
/// (a key name may be up to etcd's request size), forgetting the oldest first; a forgotten
/// warning still true is said (and counted) once more, which costs a log line, not memory.
struct Seen {
    /// Seeded per process: a writer cannot craft names that collide and silence a warning.
    hasher: std::collections::hash_map::RandomState,
    set: HashSet<u64>,
    order: std::collections::VecDeque<u64>,
    cap: usize,
}

impl Default for Seen {
    fn default() -> Seen {
        Seen::with_cap(SEEN_CAP)
    }
}

impl Seen {
    fn with_cap(cap: usize) -> Seen {
        Seen {
            hasher: Default::default(),
            set: HashSet::new(),
            order: Default::default(),
            cap: cap.max(1),
        }
    }

    /// True when `what` is not remembered (and remembers it).
    fn insert(&mut self, what: &str) -> bool {
        use std::hash::BuildHasher;
        let h = self.hasher.hash_one(what);
        if !self.set.insert(h) {
            return false;
        }
        self.order.push_back(h);
        if self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        debug_assert_eq!(self.set.len(), self.order.len());
        self.set.len()
    }
}

/// Inputs of the kept lease and peer views that the views themselves hold only as strings.
#[derive(Default)]
struct ViewInputs {
    /// The own subnet the lease views were marked with; `None` before the first full build.
    lease_own: Option<Ipv4Network>,
    /// Each peer view's public IP, compared without formatting it; the views' keys.
    peer_ips: BTreeMap<Ipv4Network, Ipv4Addr>,
    /// The peer views that show an error: the only unchanged remotes whose view a reconcile
    /// can change (the error may be gone).
    peer_errored: BTreeSet<Ipv4Network>,
    /// What changed among the remotes since the peer views were last made.
    peers_stale: PeersStale,
    /// The own subnet the last [`Report::peers_changed`] was told: the remotes leave it out, so
    /// a new one changes them at two keys nobody listed.
    peers_own: Option<Ipv4Network>,
    /// How many reconciles walked every remote for the peer views (the tests' check that
    /// events take the short way).
    peer_full_walks: usize,
}

/// Which peer views may be out of date, apart from their errors.
#[derive(Default)]
enum PeersStale {
    /// Any: the remotes were never seen, or were made anew (a resync, a moved subnet).
    #[default]
    All,
    /// The remotes of these subnets only (lease events since the last reconcile; empty: none).
    Keys(Vec<Ipv4Network>),
}

impl Report {
    pub(super) fn new(state: AgentState, clock: Clock) -> Report {
        Report {
            state,
            clock,
            warned: Arc::default(),
            views: Arc::default(),
        }
    }

    fn first_time(&self, what: String) -> bool {
        self.warned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(&what)
    }

    /// True the first time `what` is seen: a log line said once, not at every resync.
    pub(super) fn once(&self, what: String) -> bool {
        self.first_time(what)
    }

    /// When a lease of `ttl` renewed now expires; 0 for a lease without TTL.
    fn expiry(&self, lease_id: i64, ttl: Duration) -> i64 {
        if lease_id == 0 {
            0
        } else {
            self.clock.unix_now() + ttl.as_secs() as i64
        }
    }

    fn set_expiry(&self, expiry: i64) {
        self.state.metrics.lease_expiry.set(expiry);
        self.state.update(|s| s.lease_expiry_unix = expiry);
    }

    pub(super) fn network(&self, cfg: &NetworkConfig, public_ip: Ipv4Addr) {
        self.state.update(|s| {
            s.public_ip = public_ip.to_string();
            s.network = cfg.network.to_string();
            s.backend = cfg.backend.type_name().to_string();
        });
    }

    /// What the node does with the network's IPv6 half (status `ipv6`, `public_ipv6`).
    pub(super) fn ipv6_mode(&self, mode: &crate::ipv6::Ipv6Mode) {
        self.state.update(|s| {
            s.ipv6 = mode.status();
            s.public_ipv6 = match mode {
                crate::ipv6::Ipv6Mode::DualStack { public_ipv6 } => public_ipv6.to_string(),
                _ => String::new(),
            };
        });
    }

    /// A data plane was set up (start, or again after a repair): which one, and which
    /// implementation carries it, for `/metrics` and the API's status.
    pub(super) fn backend_running(&self, backend: &str, implementation: &str) {
        let m = &self.state.metrics.backend_info;
        m.reset();
        m.with_label_values(&[backend, implementation]).set(1);
        self.state
            .update(|s| s.backend_implementation = implementation.to_string());
    }

    pub(super) fn mtu(&self, mtu: u32) {
        self.state.update(|s| s.mtu = mtu);
    }

    pub(super) fn lease_acquired(&self, own: &OwnLease, ttl: Duration) {
        info!(subnet = %own.subnet(), subnet_v6 = ?own.key.ipv6, lease = format!("{:x}", own.lease_id), reused = own.reused, "lease acquired");
        let m = &self.state.metrics;
        m.lease_acquisitions.inc();
        m.lease_info.reset();
        m.lease_info
            .with_label_values(&[&own.subnet().to_string()])
            .set(1);
        m.lease_ipv6_info.reset();
        if let Some(v6) = own.key.ipv6 {
            m.lease_ipv6_info
                .with_label_values(&[&v6.to_string()])
                .set(1);
        }
        let expiry = self.expiry(own.lease_id, ttl);
        self.set_expiry(expiry);
        self.state.update(|s| {
            s.subnet = own.subnet().to_string();
            s.subnet_v6 = own.key.ipv6.map(|n| n.to_string()).unwrap_or_default();
            s.lease_held = true;
        });
    }

    /// An IPv6-only network (`EnableIPv4: false`): no IPv4 network, no `PublicIP`.
    pub(super) fn ipv6_only_network(
        &self,
        network: ipnetwork::Ipv6Network,
        backend: &str,
        public_ipv6: std::net::Ipv6Addr,
    ) {
        self.state.update(|s| {
            s.public_ip = String::new();
            s.network = network.to_string();
            s.backend = backend.to_string();
            s.ipv6 = IPV6_ONLY.to_string();
            s.public_ipv6 = public_ipv6.to_string();
        });
    }

    /// Our IPv6-only lease was acquired (or taken again).
    pub(super) fn ipv6_only_lease(
        &self,
        subnet: ipnetwork::Ipv6Network,
        lease_id: i64,
        ttl: Duration,
    ) {
        info!(subnet_v6 = %subnet, lease = format!("{lease_id:x}"), "IPv6-only lease acquired");
        let m = &self.state.metrics;
        m.lease_acquisitions.inc();
        m.lease_info.reset();
        m.lease_ipv6_info.reset();
        m.lease_ipv6_info
            .with_label_values(&[&subnet.to_string()])
            .set(1);
        self.set_expiry(self.expiry(lease_id, ttl));
        self.state.update(|s| {
            s.subnet = String::new();
            s.subnet_v6 = subnet.to_string();
            s.lease_held = true;
        });
    }

    /// An IPv6-only lease renewed, or failing to be.
    pub(super) fn ipv6_only_renewed(&self, lease_id: i64, ttl: Duration) {
        self.state.metrics.lease_renewals.inc();
        self.set_expiry(self.expiry(lease_id, ttl));
    }

    pub(super) fn ipv6_only_lease_lost(&self) {
        let m = &self.state.metrics;
        m.lease_failures.with_label_values(&["renew"]).inc();
        self.state.update(|s| s.lease_held = false);
    }

    /// The IPv6-only data plane as last reconciled: programmed or not, the peers' count.
    pub(super) fn ipv6_only_programmed(&self, ok: bool) {
        self.state.update(|s| s.backend_programmed = ok);
    }

    /// The leases and peers of an IPv6-only network as last listed and programmed, for the
    /// API's lease and peer lists; a lease added, changed or gone since the last listing is
    /// published to the API's watchers (a listing sees no intermediate states).
    pub(super) fn ipv6_only_views(&self, leases: Vec<LeaseView>, peers: Vec<PeerView>) {
        let leases: Keyed<String, LeaseView> =
            leases.into_iter().map(|l| (l.subnet.clone(), l)).collect();
        let peers: Keyed<String, PeerView> =
            peers.into_iter().map(|p| (p.subnet.clone(), p)).collect();
        let mut events = Vec::new();
        self.state.update(|s| {
            let old = &s.v6only_leases;
            for l in leases.iter() {
                match old.get(&l.subnet) {
                    None => events.push((EventKind::Added, l.clone())),
                    Some(o) if o != l => events.push((EventKind::Updated, l.clone())),
                    Some(_) => {}
                }
            }
            for o in old.iter() {
                if leases.get(&o.subnet).is_none() {
                    events.push((EventKind::Removed, o.clone()));
                }
            }
            s.v6only_leases = leases;
            s.v6only_peers = peers;
        });
        let unix_millis = self.clock.unix_now() * 1000;
        for (kind, lease) in events {
            self.state.publish(LeaseEventView {
                kind,
                lease,
                unix_millis,
            });
        }
    }

    /// A peer lease an IPv6-only node refused (`label` as `tweed_leases_rejected_total`'s).
    pub(super) fn ipv6_only_rejected(&self, key: &str, why: &str, label: &'static str) {
        if self.first_time(format!("v6only-reject {key} {why}")) {
            warn!(%key, "skipping a lease: {why}");
            self.state
                .metrics
                .leases_rejected
                .with_label_values(&[label])
                .inc();
        }
    }

    /// Renaming the lease to its IPv4-only key failed (logged by the caller); retried.
    pub(super) fn v4_only_attempt_failed(&self) {
        self.state
            .metrics
            .lease_failures
            .with_label_values(&["ipv4_only"])
            .inc();
    }

    pub(super) fn acquire_failed(&self, e: &SubnetError) {
        let m = &self.state.metrics;
        m.lease_failures.with_label_values(&["acquire"]).inc();
        if let SubnetError::Alloc(e) = e {
            error!("{e}; retrying")
        } else {
            m.etcd_errors.with_label_values(&["acquire"]).inc();
            warn!("acquiring a lease: {e}; retrying")
        }
    }

    pub(super) fn lease_renewed(&self, subnet: Ipv4Network, lease_id: i64, ttl: Duration) {
        debug!(%subnet, ?ttl, "lease renewed");
        self.state.metrics.lease_renewals.inc();
        self.set_expiry(self.expiry(lease_id, ttl));
    }

    pub(super) fn lease_expired(&self, subnet: Ipv4Network) {
        warn!(%subnet, "lease expired; re-acquiring");
        let m = &self.state.metrics;
        m.lease_failures.with_label_values(&["renew"]).inc();
        self.state.update(|s| s.lease_held = false);
    }

    pub(super) fn renew_failed(&self, e: &RegistryError, retry: Duration) {
        let m = &self.state.metrics;
        m.lease_failures.with_label_values(&["renew"]).inc();
        m.etcd_errors.with_label_values(&["renew"]).inc();
        warn!("renewing lease: {e}; retrying in {retry:?}");
    }

    /// An operator's `reserve` (lease 0) or `unreserve` (a fresh TTL lease) changed our lease.
    pub(super) fn lease_id_changed(&self, subnet: Ipv4Network, old: i64, new: i64, ttl: Duration) {
        if new == 0 {
            info!(%subnet, old = format!("{old:x}"), "our lease is reserved now: no TTL, nothing to renew");
        } else {
            info!(%subnet, lease = format!("{new:x}"), "our lease has a TTL now; renewing it");
        }
        self.set_expiry(self.expiry(new, ttl));
    }

    /// Our own key held someone else's value; `found` says whose.
    pub(super) fn lease_conflict(
        &self,
        action: super::lease::ConflictAction,
        subnet: Ipv4Network,
        found: &str,
    ) {
        self.state
            .metrics
            .lease_conflicts
            .with_label_values(&[action.label()])
            .inc();
        match action {
            super::lease::ConflictAction::Restored => {
                error!(%subnet, %found, "CONFLICT: our lease was overwritten by someone else while we hold it; wrote our value back (check who writes to etcd)")
            }
            _ => {
                error!(%subnet, %found, "CONFLICT: our lease is held by someone else; moving to another subnet (local pods need new addresses)")
            }
        }
    }

    pub(super) fn conflict_check_failed(&self, subnet: Ipv4Network, e: &RegistryError) {
        self.state
            .metrics
            .etcd_errors
            .with_label_values(&["conflict"])
            .inc();
        warn!(%subnet, "checking a conflict over our lease: {e}; retrying on the next event");
    }

    pub(super) fn subnet_moved(&self, old: Ipv4Network, new: Ipv4Network) {
        error!(%old, %new, "our subnet was taken while the lease was lost; moved to a new one (local pods need new addresses)");
    }

    pub(super) fn watch_live(&self, live: bool) {
        self.state.update(|s| s.watch_live = live);
    }

    pub(super) fn watch_reconnect(&self) {
        self.state.metrics.watch_reconnects.inc();
    }

    pub(super) fn watch_failed(&self, what: &str, e: &RegistryError, retry: Duration) {
        self.state
            .metrics
            .etcd_errors
            .with_label_values(&["watch"])
            .inc();
        warn!("{what}: {e}; retrying in {retry:?}");
    }

    /// Counts, publishes and logs what the lease table made of a batch; `own` is our subnet.
    pub(super) fn lease_changes(&self, applied: &Applied, own: Ipv4Network) {
        let m = &self.state.metrics;
        for s in &applied.skipped {
            // Once per key and revision: a resync re-reads the same bad value and must not
            // count or log it again, but a new hostile write to the same key is news.
            if !self.first_time(format!("{}|{}|{}", s.key, s.mod_revision, s.reason)) {
                continue;
            }
            m.leases_rejected.with_label_values(&[s.kind]).inc();
            // Our exact key is the lease keeper's business (restore or move); another key
            // covering our subnet is refused by everyone, so we keep ours.
            let covers_own = s.subnet.is_some_and(|n| n != own && n.overlaps(own));
            if covers_own {
                m.lease_conflicts.with_label_values(&["ignored"]).inc();
                error!(key = %s.key, reason = s.kind, own = %own, "rejecting lease: {} (CONFLICT: it covers our subnet; ours is kept)", s.reason);
            } else {
                warn!(key = %s.key, reason = s.kind, revision = s.mod_revision, "rejecting lease: {}", s.reason);
            }
        }
        for c in &applied.changes {
            let is_own = c.subnet() == own;
            let (kind, label, lease) = match c {
                LeaseChange::Added(l) => {
                    info!(subnet = %l.key.ipv4, peer = %l.attrs.public_ip, own = is_own, "lease added");
                    (EventKind::Added, "added", l)
                }
                LeaseChange::Updated { old, new } => {
                    info!(subnet = %new.key.ipv4, peer = %new.attrs.public_ip, old_peer = %old.attrs.public_ip, own = is_own, "lease updated");
                    (EventKind::Updated, "updated", new)
                }
                LeaseChange::Removed(l) => {
                    info!(subnet = %l.key.ipv4, peer = %l.attrs.public_ip, own = is_own, "lease removed");
                    (EventKind::Removed, "removed", l)
                }
            };
            m.lease_events.with_label_values(&[label]).inc();
            self.state.publish(LeaseEventView {
                kind,
                lease: lease_view(lease, is_own),
                unix_millis: self.clock.unix_now() * 1000,
            });
        }
    }

    /// Every lease the table holds, ours marked. With `changes` (what the table just applied),
    /// only their keys are rewritten; without them, or when our subnet changed since the last
    /// call, every view is built again (a resync, a move).
    pub(super) fn leases(
        &self,
        table: &LeaseTable,
        own: Ipv4Network,
        changes: Option<&[LeaseChange]>,
    ) {
        let mut inputs = self.views.lock().unwrap_or_else(|p| p.into_inner());
        let changes = changes.filter(|_| inputs.lease_own == Some(own));
        inputs.lease_own = Some(own);
        self.state.update(|s| match changes {
            None => s.leases = full_lease_views(table, own),
            Some(changes) => update_lease_views(s.leases.make_mut(), changes, own),
        });
    }

    /// A lease event received at `received`, taken up by the main loop at `taken`, is in the
    /// data plane now.
    pub(super) fn reconciled_in(&self, received: Instant, taken: Instant) {
        let m = &self.state.metrics;
        m.reconcile_seconds
            .observe(received.elapsed().as_secs_f64());
        m.lease_event_wait_seconds
            .observe(taken.saturating_duration_since(received).as_secs_f64());
    }

    /// The remotes of the next reconcile (made for our subnet `own`) differ from the last
    /// one's at `changed` (lease subnets) only; `None`: anywhere. Accumulates until a reconcile
    /// is reported, so a failed one does not lose what its event changed. Without a call the
    /// next reconcile's remotes are taken to be the last one's: every change of the lease
    /// table must be told here first.
    pub(super) fn peers_changed(&self, own: Ipv4Network, changed: Option<&[Ipv4Network]>) {
        let mut inputs = self.views.lock().unwrap_or_else(|p| p.into_inner());
        let moved = inputs.peers_own.replace(own).is_some_and(|o| o != own);
        let changed = changed.filter(|_| !moved);
        match (&mut inputs.peers_stale, changed) {
            (PeersStale::All, _) => {}
            (PeersStale::Keys(keys), Some(c)) => keys.extend_from_slice(c),
            (stale, None) => *stale = PeersStale::All,
        }
    }

    /// What one reconcile with `remotes` did: per-peer state, counters, skipped peers once.
    pub(super) fn programmed(
        &self,
        backend: &str,
        remotes: &[Remote<'_>],
        stats: &ReconcileStats,
        started: Instant,
    ) {
        let m = &self.state.metrics;
        m.netlink_ops.inc_by(stats.ops_applied as u64);
        m.netlink_failures.inc_by(stats.failures.len() as u64);
        m.peers.reset();
        let programmed = remotes.len().saturating_sub(stats.skipped.len());
        m.peers.with_label_values(&[backend]).set(programmed as i64);
        let clean = stats.is_clean();
        let mut guard = self.views.lock().unwrap_or_else(|p| p.into_inner());
        let inputs = &mut *guard;
        let stale = std::mem::replace(&mut inputs.peers_stale, PeersStale::Keys(Vec::new()));
        let errors = PeerErrors::new(stats);
        self.state.update(|s| {
            let views = s.peers.make_mut();
            let mut ins = PeerInputs {
                ips: &mut inputs.peer_ips,
                errored: &mut inputs.peer_errored,
            };
            let done = match stale {
                PeersStale::Keys(changed) => {
                    update_peer_views_at(views, &mut ins, remotes, &errors, changed)
                }
                PeersStale::All => false,
            };
            if !done {
                update_peer_views(views, &mut ins, remotes, &errors);
                inputs.peer_full_walks += 1;
            }
            s.backend_programmed = clean;
        });
        drop(guard);
        for s in &stats.skipped {
            if self.first_time(format!("{}|{}|{}", s.subnet, s.public_ip, s.reason)) {
                warn!(subnet = %s.subnet, peer = %s.public_ip, "{s}");
            }
        }
        if stats.ops_applied > 0 || !clean {
            info!(
                peers = remotes.len(),
                skipped = stats.skipped.len(),
                ops = stats.ops_applied,
                failures = stats.failures.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "data plane programmed"
            );
        }
    }

    pub(super) fn subnet_env_written(&self, ok: bool) {
        self.state.update(|s| s.subnet_env_written = ok);
    }

    /// The backend could not be programmed at all (device gone and not re-made, unreadable).
    pub(super) fn backend_failed(&self) {
        self.state.update(|s| s.backend_programmed = false);
    }

    /// The main loop runs; whether the node is ready now.
    pub(super) fn beat(&self) -> bool {
        let mut ready = false;
        self.state.update(|s| {
            s.loop_beat = Some(std::time::Instant::now());
            ready = s.not_ready().is_empty();
        });
        ready
    }

    /// A repair that found drift: counted per kind, timed from the first notification, logged
    /// with what it had to write. Repairs that found nothing leave no trace.
    pub(super) fn repaired(&self, cause: &str, r: &Repaired, elapsed: Duration) {
        if r.ops.is_empty() && r.notes.is_empty() {
            return;
        }
        let m = &self.state.metrics;
        let mut kinds = super::repair::kinds(&r.ops);
        if !r.notes.is_empty() {
            kinds.insert("mtu");
        }
        for k in &kinds {
            m.repairs.with_label_values(&[k]).inc();
        }
        m.repair_seconds.observe(elapsed.as_secs_f64());
        let what: Vec<String> = r
            .notes
            .iter()
            .cloned()
            .chain(r.ops.iter().map(|o| o.to_string()))
            .collect();
        warn!(
            cause,
            kinds = ?kinds,
            elapsed_ms = elapsed.as_millis() as u64,
            clean = r.clean,
            "repaired drift, put back: {}",
            what.join("; ")
        );
    }

    pub(super) fn rules_synced(
        &self,
        firewall: &str,
        ip_masq: bool,
        result: &Result<bool, crate::rules::RulesError>,
    ) {
        match result {
            Ok(true) => {
                self.state.metrics.rules_resyncs.inc();
                info!(firewall, ip_masq, "rules (re)installed");
            }
            Ok(false) => {}
            Err(e) => {
                self.state.metrics.rules_errors.inc();
                warn!("syncing {firewall} rules: {e}");
            }
        }
    }

    /// Adds what the udp workers counted between `last` and `now` to the Prometheus counters.
    /// Replaces the per-peer wireguard gauges with `peers`: reset first, so a removed or
    /// rotated-away key stops being exported.
    pub(super) fn wireguard_peers(&self, peers: &[crate::backend::wireguard::PeerStats]) {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        self.state.update(|s| {
            let views = peers
                .iter()
                .map(|p| {
                    let key = p.public_key.to_string();
                    let since = s
                        .wg_peers
                        .iter()
                        .find(|v| v.public_key == key && v.device == p.device)
                        .map_or(now_ms, |v| v.since_unix_ms);
                    crate::state::WgPeerView {
                        device: p.device.to_string(),
                        subnet: p.subnet.map(|s| s.to_string()).unwrap_or_default(),
                        lease_subnet: p.lease_subnet.map(|s| s.to_string()).unwrap_or_default(),
                        public_key: key,
                        handshake_unix_ms: p.last_handshake.map(|d| now_ms - d.as_millis() as i64),
                        since_unix_ms: since,
                        tx_bytes: p.tx_bytes,
                        rx_bytes: p.rx_bytes,
                    }
                })
                .collect();
            s.wg_peers = views;
        });
        let m = &self.state.metrics;
        m.wg_handshake_age.reset();
        m.wg_peer_bytes.reset();
        for p in peers {
            let subnet = p.subnet.map(|s| s.to_string()).unwrap_or_default();
            let key = p.public_key.to_string();
            let age = p.last_handshake.map_or(-1, |d| d.as_secs() as i64);
            m.wg_handshake_age
                .with_label_values(&[&subnet, &key, p.device])
                .set(age);
            for (dir, n) in [("tx", p.tx_bytes), ("rx", p.rx_bytes)] {
                m.wg_peer_bytes
                    .with_label_values(&[&subnet, &key, dir, p.device])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }

    pub(super) fn udp_traffic(&self, now: &UdpStats, last: &UdpStats) {
        let m = &self.state.metrics;
        let d = |a: u64, b: u64| a.saturating_sub(b);
        for (dir, packets, bytes) in [
            (
                "tx",
                d(now.tx_packets, last.tx_packets),
                d(now.tx_bytes, last.tx_bytes),
            ),
            (
                "rx",
                d(now.rx_datagrams, last.rx_datagrams),
                d(now.rx_bytes, last.rx_bytes),
            ),
        ] {
            m.udp_packets.with_label_values(&[dir]).inc_by(packets);
            m.udp_bytes.with_label_values(&[dir]).inc_by(bytes);
        }
        for (reason, a, b) in [
            (
                "unknown_peer",
                now.drop_unknown_peer,
                last.drop_unknown_peer,
            ),
            (
                "spoofed_inner",
                now.drop_spoofed_inner,
                last.drop_spoofed_inner,
            ),
            ("wrong_port", now.drop_wrong_port, last.drop_wrong_port),
            ("not_for_us", now.drop_not_for_us, last.drop_not_for_us),
            ("malformed", now.drop_malformed, last.drop_malformed),
            ("not_remote", now.drop_not_remote, last.drop_not_remote),
            ("not_ready", now.drop_not_ready, last.drop_not_ready),
            // wireguard: failed authentication (unknown key, wrong PSK, replay, garbage).
            (
                "unauthenticated",
                now.drop_unauthenticated,
                last.drop_unauthenticated,
            ),
        ] {
            m.udp_drops.with_label_values(&[reason]).inc_by(d(a, b));
        }
    }
}

/// Every lease's view, built from scratch.
fn full_lease_views(table: &LeaseTable, own: Ipv4Network) -> Keyed<SubnetKey, LeaseView> {
    table
        .leases()
        .map(|l| (l.key, lease_view(l, l.key.ipv4 == own)))
        .collect()
}

/// Rewrites the views of the keys `changes` touched, in the order the table applied them.
fn update_lease_views(
    views: &mut BTreeMap<SubnetKey, LeaseView>,
    changes: &[LeaseChange],
    own: Ipv4Network,
) {
    for c in changes {
        match c {
            LeaseChange::Added(l) => {
                views.insert(l.key, lease_view(l, l.key.ipv4 == own));
            }
            LeaseChange::Updated { old, new } => {
                views.remove(&old.key);
                views.insert(new.key, lease_view(new, new.key.ipv4 == own));
            }
            LeaseChange::Removed(l) => {
                views.remove(&l.key);
            }
        }
    }
}

/// The inputs of the peer views kept beside them (see [`ViewInputs`]).
struct PeerInputs<'a> {
    ips: &'a mut BTreeMap<Ipv4Network, Ipv4Addr>,
    errored: &'a mut BTreeSet<Ipv4Network>,
}

/// A reconcile's errors by subnet, looked up once per remote instead of a scan of every skip.
struct PeerErrors<'a> {
    /// The first skip of each subnet, as a scan in order would find it.
    skipped: HashMap<Ipv4Network, &'a str>,
    failed: HashSet<Ipv4Network>,
}

impl<'a> PeerErrors<'a> {
    fn new(stats: &'a ReconcileStats) -> Self {
        let mut skipped = HashMap::with_capacity(stats.skipped.len());
        for s in &stats.skipped {
            skipped.entry(s.subnet).or_insert(s.reason.as_str());
        }
        PeerErrors {
            skipped,
            failed: stats.failures.iter().filter_map(|f| f.subnet).collect(),
        }
    }

    /// Why the remote of `subnet` is not programmed: the backend skipped it, or its netlink
    /// ops failed.
    fn of(&self, subnet: Ipv4Network) -> Option<String> {
        self.skipped
            .get(&subnet)
            .map(|r| r.to_string())
            .or_else(|| {
                self.failed
                    .contains(&subnet)
                    .then(|| "netlink programming failed (see log)".to_string())
            })
    }

    fn subnets(&self) -> impl Iterator<Item = Ipv4Network> + '_ {
        self.skipped.keys().chain(&self.failed).copied()
    }
}

/// Whether the view `v` of public IP `ip` still describes `r` with `error`.
fn view_holds(v: &PeerView, ip: Ipv4Addr, r: &Remote<'_>, error: &Option<String>) -> bool {
    ip == r.attrs.public_ip && v.error == *error && v.backend == r.attrs.effective_backend_type()
}

/// [`update_peer_views`] when the remotes differ from the last reconcile's at `keys` only: a
/// lease event's path, O(changed + errors) instead of a walk over every peer (issue 20: the
/// walk was three quarters of an event's time in the agent at 10,000 peers). Only those
/// remotes, and the ones with an error before or now, are looked at. `false`: the remotes are
/// not in strict subnet order (not the lease table's; nothing changed then), or their count
/// shows a change nobody told (`Report::peers_changed`); the caller walks them all.
fn update_peer_views_at(
    views: &mut BTreeMap<Ipv4Network, PeerView>,
    ins: &mut PeerInputs<'_>,
    remotes: &[Remote<'_>],
    errors: &PeerErrors<'_>,
    mut keys: Vec<Ipv4Network>,
) -> bool {
    if !remotes.windows(2).all(|w| w[0].subnet < w[1].subnet) {
        return false;
    }
    keys.extend(ins.errored.iter().copied());
    keys.extend(errors.subnets());
    keys.sort_unstable();
    keys.dedup();
    for k in keys {
        let Ok(i) = remotes.binary_search_by_key(&k, |r| r.subnet) else {
            views.remove(&k);
            ins.ips.remove(&k);
            ins.errored.remove(&k);
            continue;
        };
        let r = &remotes[i];
        let error = errors.of(k);
        if error.is_some() {
            ins.errored.insert(k);
        } else {
            ins.errored.remove(&k);
        }
        let holds = match (views.get(&k), ins.ips.get(&k)) {
            (Some(v), Some(&ip)) => view_holds(v, ip, r, &error),
            _ => false,
        };
        if !holds {
            views.insert(k, peer_view(r, error));
            ins.ips.insert(k, r.attrs.public_ip);
        }
    }
    if views.len() != remotes.len() {
        warn!(
            views = views.len(),
            remotes = remotes.len(),
            "peer views out of step with the remotes (a change not told first); made again"
        );
        return false;
    }
    true
}

/// Makes `views` one per remote, as [`peer_view`] describes it, keeping the view (no string
/// formatting) of every peer whose public IP, backend type and error are unchanged. One
/// ordered walk: the remotes come in the lease table's order, which is the subnets' order;
/// other orders are sorted first.
fn update_peer_views(
    views: &mut BTreeMap<Ipv4Network, PeerView>,
    ins: &mut PeerInputs<'_>,
    remotes: &[Remote<'_>],
    errors: &PeerErrors<'_>,
) {
    let mut sorted: Vec<&Remote<'_>> = remotes.iter().collect();
    if !sorted.windows(2).all(|w| w[0].subnet < w[1].subnet) {
        // Stable, then the last of equal subnets wins, as inserting them in turn would do.
        sorted.sort_by_key(|r| r.subnet);
        sorted.reverse();
        sorted.dedup_by_key(|r| r.subnet);
        sorted.reverse();
    }
    // A view without its IP (only after the two went out of step) is made again.
    let mut old_ips = std::mem::take(ins.ips).into_iter().peekable();
    let mut old = std::mem::take(views).into_iter().peekable();
    let mut new_views = Vec::with_capacity(sorted.len());
    let mut new_ips = Vec::with_capacity(sorted.len());
    ins.errored.clear();
    for r in sorted {
        // Views of remotes gone are dropped on the way.
        while old.next_if(|(k, _)| *k < r.subnet).is_some() {}
        while old_ips.next_if(|(k, _)| *k < r.subnet).is_some() {}
        let error = errors.of(r.subnet);
        if error.is_some() {
            ins.errored.insert(r.subnet);
        }
        let ip = old_ips.next_if(|(k, _)| *k == r.subnet).map(|(_, ip)| ip);
        let view = match (old.next_if(|(k, _)| *k == r.subnet), ip) {
            (Some((_, v)), Some(ip)) if view_holds(&v, ip, r, &error) => v,
            _ => peer_view(r, error),
        };
        new_views.push((r.subnet, view));
        new_ips.push((r.subnet, r.attrs.public_ip));
    }
    // From sorted input: a linear build, no lookups.
    *views = new_views.into_iter().collect();
    *ins.ips = new_ips.into_iter().collect();
}

/// Why a remote is not programmed, the plain way: the reference [`PeerErrors`] is tested
/// against.
#[cfg(test)]
fn peer_error(
    r: &Remote<'_>,
    stats: &ReconcileStats,
    failed: &HashSet<Ipv4Network>,
) -> Option<String> {
    let skip = stats.skipped.iter().find(|s| s.subnet == r.subnet);
    skip.map(|s| s.reason.clone()).or_else(|| {
        failed
            .contains(&r.subnet)
            .then(|| "netlink programming failed (see log)".to_string())
    })
}

fn peer_view(r: &Remote<'_>, error: Option<String>) -> PeerView {
    PeerView {
        subnet: r.subnet.to_string(),
        public_ip: r.attrs.public_ip.to_string(),
        backend: r.attrs.effective_backend_type().to_string(),
        programmed: error.is_none(),
        error,
    }
}

fn lease_view(l: &Lease, own: bool) -> LeaseView {
    LeaseView {
        subnet: l.key.ipv4.to_string(),
        public_ip: l.attrs.public_ip.to_string(),
        backend_type: l.attrs.effective_backend_type().to_string(),
        backend_data: l
            .attrs
            .backend_data
            .as_ref()
            .map(|d| d.get().to_string())
            .unwrap_or_default(),
        lease_id: l.lease_id,
        own,
    }
}

#[cfg(test)]
mod view_tests {
    use super::*;
    use crate::backend::{PeerFailure, PeerSkip};
    use crate::netlink::{NetlinkError, Op};
    use crate::registry::{RawLease, WatchEvent};
    use tweed_config::LeaseAttrs;

    const P: &str = "/coreos.com/network";

    /// A small deterministic generator (xorshift64*): reproducible sequences without a crate.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
        }
    }

    fn report() -> Report {
        Report::new(AgentState::new(), Clock::System)
    }

    /// One random etcd event on 8 subnets: an IPv4 or dual-stack key (so renames happen), a
    /// vxlan or host-gw value from one of 4 nodes, a lease id of 0 or 7, or a delete.
    fn event(rng: &mut Rng, rev: i64) -> WatchEvent {
        let i = rng.below(8);
        let key = if rng.below(2) == 0 {
            format!("{P}/subnets/10.244.{i}.0-24")
        } else {
            format!("{P}/subnets/10.244.{i}.0-24&fd00:10:244:{i}::-64")
        };
        if rng.below(4) == 0 {
            return WatchEvent::Delete { key, revision: rev };
        }
        let n = rng.below(4);
        let value = if rng.below(3) == 0 {
            format!(r#"{{"PublicIP":"198.18.0.{n}","BackendType":"host-gw"}}"#)
        } else {
            format!(
                r#"{{"PublicIP":"198.18.0.{n}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"aa:aa:aa:aa:aa:0{n}"}}}}"#
            )
        };
        WatchEvent::Put(RawLease {
            key,
            value: value.into_bytes(),
            lease_id: [0, 7][rng.below(2) as usize],
            mod_revision: rev,
            create_revision: rev,
        })
    }

    #[test]
    fn lease_views_updated_by_key_equal_a_full_rebuild_after_every_batch() {
        for seed in 1..=40u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut table = LeaseTable::new(P, "10.244.0.0/16".parse().unwrap(), 24)
                .with_ipv6_subnet_len(Some(64));
            let r = report();
            let mut own: Ipv4Network = "10.244.0.0/24".parse().unwrap();
            let mut incremental_steps = 0;
            for step in 0..60i64 {
                let batch: Vec<WatchEvent> = (0..1 + rng.below(3))
                    .map(|k| event(&mut rng, step * 4 + k as i64 + 1))
                    .collect();
                let applied = table.apply(&batch);
                // Now and then our own subnet moves: the next call must rebuild, not patch.
                if rng.below(10) == 0 {
                    own = format!("10.244.{}.0/24", rng.below(8)).parse().unwrap();
                }
                let before = r.views.lock().unwrap().lease_own;
                r.leases(&table, own, Some(&applied.changes));
                if before == Some(own) {
                    incremental_steps += 1;
                }
                let got = r.state.snapshot().leases;
                let want = full_lease_views(&table, own);
                assert_eq!(got, want, "seed {seed} step {step}: {batch:?}");
            }
            assert!(incremental_steps > 30, "seed {seed}: {incremental_steps}");
        }
    }

    /// `Mode: separate`: a peer's entries on both devices are exported side by side, told
    /// apart by the `device` label (and their subnets); the views keep each entry's own
    /// "since" across refreshes; a refresh without the IPv6 entry drops its series.
    #[test]
    fn wireguard_figures_of_both_devices_are_exported_with_their_device() {
        use crate::backend::wireguard::{dual::DEVICE_V6, PeerStats, PrivateKey, DEVICE};
        let r = report();
        let key = PrivateKey::from_bytes([2; 32]).public();
        let v4 = PeerStats {
            device: DEVICE,
            public_key: key,
            endpoint: Some("198.51.100.2:51820".parse().unwrap()),
            subnet: Some("10.5.2.0/24".parse().unwrap()),
            lease_subnet: Some("10.5.2.0/24".parse().unwrap()),
            last_handshake: Some(std::time::Duration::from_secs(4)),
            tx_bytes: 100,
            rx_bytes: 200,
        };
        let v6 = PeerStats {
            device: DEVICE_V6,
            endpoint: Some("[2001:db8::2]:51821".parse().unwrap()),
            subnet: Some("fd00:5:0:2::/64".parse().unwrap()),
            last_handshake: None,
            tx_bytes: 300,
            rx_bytes: 400,
            ..v4.clone()
        };
        r.wireguard_peers(&[v4.clone(), v6.clone()]);
        let page = r.state.metrics.render();
        let line = |name: &str, subnet: &str, device: &str, also: &str| {
            page.lines()
                .find(|l| {
                    l.starts_with(name)
                        && l.contains(&format!("subnet=\"{subnet}\""))
                        && l.contains(&format!("device=\"{device}\""))
                        && l.contains(&format!("public_key=\"{key}\""))
                        && l.contains(also)
                })
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_string)
        };
        let age = "tweed_wireguard_peer_handshake_age_seconds{";
        let bytes = "tweed_wireguard_peer_bytes{";
        assert_eq!(
            line(age, "10.5.2.0/24", DEVICE, "").as_deref(),
            Some("4"),
            "{page}"
        );
        assert_eq!(
            line(age, "fd00:5:0:2::/64", DEVICE_V6, "").as_deref(),
            Some("-1"),
            "{page}"
        );
        assert_eq!(
            line(bytes, "fd00:5:0:2::/64", DEVICE_V6, "direction=\"rx\"").as_deref(),
            Some("400"),
            "{page}"
        );
        assert_eq!(
            line(bytes, "10.5.2.0/24", DEVICE, "direction=\"tx\"").as_deref(),
            Some("100"),
            "{page}"
        );
        let views = r.state.snapshot().wg_peers;
        assert_eq!(views.len(), 2);
        assert_eq!(
            (views[1].device.as_str(), views[1].lease_subnet.as_str()),
            (DEVICE_V6, "10.5.2.0/24")
        );
        // Each entry keeps its own "since" (the IPv6 one is not taken for the IPv4 one).
        let since6 = views[1].since_unix_ms;
        r.state.update(|s| s.wg_peers[0].since_unix_ms = 1);
        r.wireguard_peers(&[v4.clone(), v6]);
        let views = r.state.snapshot().wg_peers;
        assert_eq!(
            (views[0].since_unix_ms, views[1].since_unix_ms),
            (1, since6)
        );
        r.wireguard_peers(&[v4]);
        let page = r.state.metrics.render();
        assert!(!page.contains(DEVICE_V6), "{page}");
    }

    #[test]
    fn a_held_snapshot_is_not_changed_by_a_later_update() {
        let mut table = LeaseTable::new(P, "10.244.0.0/16".parse().unwrap(), 24);
        let r = report();
        let own: Ipv4Network = "10.244.0.0/24".parse().unwrap();
        let put = |i: u8| {
            WatchEvent::Put(RawLease {
                key: format!("{P}/subnets/10.244.{i}.0-24"),
                value: br#"{"PublicIP":"198.18.0.1","BackendType":"host-gw"}"#.to_vec(),
                lease_id: 0,
                mod_revision: i as i64,
                create_revision: i as i64,
            })
        };
        let a = table.apply(&[put(1)]);
        r.leases(&table, own, None);
        let held = r.state.snapshot();
        let a2 = table.apply(&[put(2)]);
        assert_eq!(a.changes.len() + a2.changes.len(), 2);
        r.leases(&table, own, Some(&a2.changes));
        assert_eq!(held.leases.len(), 1, "the API's copy stays as it was read");
        assert_eq!(r.state.snapshot().leases.len(), 2);
    }

    /// The event path's peer views (`Report::peers_changed` + `programmed`, looking at the
    /// changed subnets and the errored ones only) against a full rebuild, after every reconcile
    /// of random lease batches through the real `LeaseTable` and the main loop's `remotes`:
    /// renames, backend and public IP changes, a lease of our own public IP, skips and netlink
    /// failures coming and going, reconciles that failed (their changes told but never
    /// reported), repairs (nothing changed), full reconciles and our subnet moving. Fails when
    /// the errored views are not looked at again, or a failed reconcile's changes are dropped.
    #[test]
    fn peer_views_updated_at_the_changed_keys_equal_a_full_rebuild_after_every_reconcile() {
        use super::super::main_loop::remotes;
        let public_ip: Ipv4Addr = "198.18.0.3".parse().unwrap();
        let (mut short, mut failed_between) = (0, 0);
        for seed in 1..=60u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut table = LeaseTable::new(P, "10.244.0.0/16".parse().unwrap(), 24);
            let r = report();
            let mut own: Ipv4Network = "10.244.200.0/24".parse().unwrap();
            // The first reconcile walks every remote: nothing was seen before.
            let (mut full_walks, mut pending_all, mut untold) = (0, true, false);
            for step in 0..80i64 {
                let batch: Vec<WatchEvent> =
                    (0..=rng.below(3)).map(|_| event(&mut rng, step)).collect();
                let applied = table.apply(&batch);
                let changed: Vec<Ipv4Network> = applied
                    .changes
                    .iter()
                    .flat_map(|c| [Some(c.subnet()), c.key_gone().map(|k| k.ipv4)])
                    .flatten()
                    .collect();
                match rng.below(10) {
                    0 => {
                        r.peers_changed(own, None);
                        pending_all = true;
                    }
                    1 => {
                        let i = rng.below(9);
                        let moved: Ipv4Network = format!("10.244.{i}.0/24").parse().unwrap();
                        pending_all |= moved != own;
                        own = moved;
                        r.peers_changed(own, Some(&changed));
                    }
                    _ => r.peers_changed(own, Some(&changed)),
                }
                let rs = remotes(&table, own, public_ip);
                if rng.below(5) == 0 {
                    // The reconcile failed before it was reported: its changes stay to do.
                    untold = true;
                    continue;
                }
                if rng.below(4) == 0 {
                    // A repair right after, with nothing changed in between.
                    r.peers_changed(own, Some(&[]));
                }
                let mut stats = ReconcileStats::default();
                for x in &rs {
                    match rng.below(8) {
                        0 => stats.skipped.push(PeerSkip {
                            subnet: x.subnet,
                            public_ip: x.attrs.public_ip,
                            reason: format!("reason {}", rng.below(2)),
                        }),
                        1 => stats.failures.push(PeerFailure {
                            subnet: Some(x.subnet),
                            op: Op::RouteDel(crate::backend::overlay_route(x.subnet, 9)),
                            error: NetlinkError::Closed {
                                what: "test".into(),
                            },
                        }),
                        _ => {}
                    }
                }
                // A subnet skipped twice: the first reason counts, as before.
                if let Some(x) = rs.first().filter(|_| rng.below(6) == 0) {
                    for reason in ["first", "second"] {
                        stats.skipped.push(PeerSkip {
                            subnet: x.subnet,
                            public_ip: x.attrs.public_ip,
                            reason: reason.into(),
                        });
                    }
                }
                r.programmed("vxlan", &rs, &stats, Instant::now());
                let failed = stats.failures.iter().filter_map(|f| f.subnet).collect();
                let want: Keyed<Ipv4Network, PeerView> = rs
                    .iter()
                    .map(|x| (x.subnet, peer_view(x, peer_error(x, &stats, &failed))))
                    .collect();
                assert_eq!(r.state.snapshot().peers, want, "seed {seed} step {step}");
                if std::mem::take(&mut pending_all) {
                    full_walks += 1;
                } else {
                    short += 1;
                    failed_between += usize::from(untold);
                }
                untold = false;
                let walks = r.views.lock().unwrap().peer_full_walks;
                assert_eq!(walks, full_walks, "seed {seed} step {step}: full walks");
            }
        }
        assert!(
            short > 2000,
            "reconciles updated at the changed keys: {short}"
        );
        assert!(
            failed_between > 300,
            "after failed reconciles: {failed_between}"
        );
    }

    #[test]
    fn peer_views_updated_in_place_equal_a_full_rebuild_after_every_reconcile() {
        let attrs: Vec<LeaseAttrs> = (0..12u8)
            .map(|n| {
                let v = if n % 3 == 0 {
                    format!(r#"{{"PublicIP":"198.18.0.{}","BackendType":"host-gw"}}"#, n % 4)
                } else {
                    format!(
                        r#"{{"PublicIP":"198.18.0.{}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"aa:aa:aa:aa:aa:01"}}}}"#,
                        n % 4
                    )
                };
                LeaseAttrs::parse(v.as_bytes()).unwrap()
            })
            .collect();
        for seed in 1..=40u64 {
            let mut rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
            let r = report();
            for step in 0..60 {
                // A random set of subnets, each with one of the 12 values.
                let mut remotes: Vec<Remote<'_>> = Vec::new();
                for i in 0..8u8 {
                    if rng.below(4) != 0 {
                        remotes.push(Remote {
                            subnet: format!("10.244.{i}.0/24").parse().unwrap(),
                            subnet_v6: None,
                            attrs: &attrs[rng.below(12) as usize],
                        });
                    }
                }
                // Other callers' orders, and a subnet given twice (the later one counts, as a
                // map built from the list would have it).
                if step % 3 == 0 {
                    remotes.reverse();
                }
                if step % 5 == 0 && !remotes.is_empty() {
                    remotes.push(Remote {
                        attrs: &attrs[rng.below(12) as usize],
                        ..remotes[0]
                    });
                }
                // Any remotes may change: the full walk's contract.
                r.peers_changed("10.244.200.0/24".parse().unwrap(), None);
                let mut stats = ReconcileStats::default();
                for r in &remotes {
                    match rng.below(6) {
                        0 => stats.skipped.push(PeerSkip {
                            subnet: r.subnet,
                            public_ip: r.attrs.public_ip,
                            reason: format!("reason {}", rng.below(2)),
                        }),
                        1 => stats.failures.push(PeerFailure {
                            subnet: Some(r.subnet),
                            op: Op::RouteDel(crate::backend::overlay_route(r.subnet, 9)),
                            error: NetlinkError::Closed {
                                what: "test".into(),
                            },
                        }),
                        _ => {}
                    }
                }
                r.programmed("vxlan", &remotes, &stats, Instant::now());
                let failed = stats.failures.iter().filter_map(|f| f.subnet).collect();
                let want: Keyed<Ipv4Network, PeerView> = remotes
                    .iter()
                    .map(|x| (x.subnet, peer_view(x, peer_error(x, &stats, &failed))))
                    .collect();
                assert_eq!(r.state.snapshot().peers, want, "seed {seed} step {step}");
            }
        }
    }
}

/// What the kept views save per lease event at 10,000 peers, side by side in one run (timings
/// are printed, never asserted): `cargo test --release -p tweed-agent --lib -- --ignored
/// views_per_event_at_10000_peers --nocapture`.
#[cfg(test)]
mod view_cost {
    use super::*;
    use crate::registry::{RawLease, WatchEvent};
    use std::time::Instant;
    use tweed_config::LeaseAttrs;

    const P: &str = "/coreos.com/network";

    fn put(i: u32, rev: i64) -> WatchEvent {
        let value = format!(
            r#"{{"PublicIP":"198.19.{}.{}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"02:00:00:00:{:02x}:{:02x}"}}}}"#,
            i / 256,
            i % 256,
            i / 256,
            i % 256
        );
        WatchEvent::Put(RawLease {
            key: format!("{P}/subnets/10.{}.{}.0-24", 1 + i / 256, i % 256),
            value: value.into_bytes(),
            lease_id: 7,
            mod_revision: rev,
            create_revision: rev,
        })
    }

    #[test]
    #[ignore = "timing figures for docs/performance.md, not a check"]
    fn views_per_event_at_10000_peers() {
        let mut table = LeaseTable::new(P, "10.0.0.0/8".parse().unwrap(), 24);
        let all: Vec<WatchEvent> = (0..10_000).map(|i| put(i, 1)).collect();
        table.apply(&all);
        let own: Ipv4Network = "10.244.0.0/24".parse().unwrap();
        let r = report();
        r.leases(&table, own, None);
        let remotes = |t: &LeaseTable| -> Vec<(Ipv4Network, LeaseAttrs)> {
            t.leases().map(|l| (l.key.ipv4, l.attrs.clone())).collect()
        };
        let stats = ReconcileStats::default();
        let owned = remotes(&table);
        let rs: Vec<Remote<'_>> = owned
            .iter()
            .map(|(s, a)| Remote {
                subnet: *s,
                subnet_v6: None,
                attrs: a,
            })
            .collect();
        r.programmed("vxlan", &rs, &stats, Instant::now());
        let (mut full, mut kept, mut full_peers, mut kept_peers) = (0u128, 0u128, 0u128, 0u128);
        let rounds = 50u32;
        for k in 0..rounds {
            // One lease added, as in bench/controlplane's latency phase.
            let applied = table.apply(&[put(20_000 + k, 2 + k as i64)]);
            let t = Instant::now();
            let views = full_lease_views(&table, own);
            full += t.elapsed().as_nanos();
            let t = Instant::now();
            r.leases(&table, own, Some(&applied.changes));
            kept += t.elapsed().as_nanos();
            assert_eq!(r.state.snapshot().leases, views);

            let owned = remotes(&table);
            let rs: Vec<Remote<'_>> = owned
                .iter()
                .map(|(s, a)| Remote {
                    subnet: *s,
                    subnet_v6: None,
                    attrs: a,
                })
                .collect();
            let t = Instant::now();
            let failed = HashSet::new();
            let want: Keyed<Ipv4Network, PeerView> = rs
                .iter()
                .map(|x| (x.subnet, peer_view(x, peer_error(x, &stats, &failed))))
                .collect();
            full_peers += t.elapsed().as_nanos();
            let t = Instant::now();
            r.programmed("vxlan", &rs, &stats, Instant::now());
            kept_peers += t.elapsed().as_nanos();
            assert_eq!(r.state.snapshot().peers, want);
        }
        let ms = |ns: u128| ns as f64 / f64::from(rounds) / 1e6;
        println!(
            "10,000 leases, one added per event, mean of {rounds}: lease views rebuilt {:.3} ms, kept by key {:.3} ms ({:.1}x); peer views rebuilt {:.3} ms, updated in place {:.3} ms ({:.1}x)",
            ms(full),
            ms(kept),
            full as f64 / kept as f64,
            ms(full_peers),
            ms(kept_peers),
            full_peers as f64 / kept_peers as f64
        );
    }

    fn report() -> Report {
        Report::new(AgentState::new(), Clock::System)
    }
}

#[cfg(test)]
mod seen_tests {
    use super::*;

    #[test]
    fn the_said_once_memory_forgets_the_oldest_past_its_cap() {
        let mut seen = Seen::with_cap(8);
        for i in 0..8 {
            assert!(seen.insert(&format!("k{i}")));
        }
        assert!(!seen.insert("k0"), "remembered while under the cap");
        for i in 8..108 {
            assert!(seen.insert(&format!("k{i}")));
            assert!(seen.len() <= 8, "{} remembered past a cap of 8", seen.len());
        }
        assert!(!seen.insert("k107"), "the newest is remembered");
        assert!(!seen.insert("k100"), "the last 8 are remembered");
        assert!(seen.insert("k0"), "the oldest is forgotten, so news again");
    }

    /// rev35 L7: a writer churning IPv6-only key names (and host-gw peers without a route) no
    /// longer grows the agent; a bad lease that stays is still counted once.
    #[test]
    fn churned_rejections_keep_the_memory_bounded_and_a_steady_one_is_counted_once() {
        let r = Report::new(AgentState::new(), Clock::System);
        let rejected = || {
            r.state
                .metrics
                .leases_rejected
                .with_label_values(&["bad_value"])
                .get()
        };
        r.ipv6_only_rejected("/p/subnets/fd00::-64", "bad", "bad_value");
        r.ipv6_only_rejected("/p/subnets/fd00::-64", "bad", "bad_value");
        assert_eq!(rejected(), 1);
        for i in 0..3 * SEEN_CAP {
            r.ipv6_only_rejected(&format!("/p/subnets/fd00:{i:x}::-64"), "bad", "bad_value");
            r.once(format!("hostgw6 fd00:{i:x}::/64 no route"));
        }
        let len = r.warned.lock().unwrap().len();
        assert!(len <= SEEN_CAP, "{len} warnings remembered, cap {SEEN_CAP}");
        assert_eq!(rejected(), 1 + 3 * SEEN_CAP as u64, "each new key counted");
        // The last ones are still remembered: a resync does not count them again.
        let last = format!("/p/subnets/fd00:{:x}::-64", 3 * SEEN_CAP - 1);
        r.ipv6_only_rejected(&last, "bad", "bad_value");
        assert_eq!(rejected(), 1 + 3 * SEEN_CAP as u64);
    }
}
