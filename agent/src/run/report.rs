//! What the agent tells operators: the state the HTTP and gRPC servers show, the Prometheus
//! metrics, the lease event stream and the log. Every part of the agent reports through here, so
//! the parts themselves only decide.

use super::dataplane::Repaired;
use super::deps::Clock;
use crate::backend::udp::io::Stats as UdpStats;
use crate::backend::{ReconcileStats, Remote};
use crate::registry::RegistryError;
use crate::state::{AgentState, EventKind, LeaseEventView, LeaseView, PeerView};
use crate::subnet::{OwnLease, SubnetError};
use crate::watch::{Applied, Lease, LeaseChange, LeaseTable};
use ipnetwork::Ipv4Network;
use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};
use tweed_config::NetworkConfig;

/// Cheap to clone; clones report into the same state.
#[derive(Clone)]
pub(super) struct Report {
    state: AgentState,
    clock: Clock,
    /// What was warned about already, so a bad lease or an unreachable peer is logged once
    /// rather than on every resync.
    warned: Arc<Mutex<HashSet<String>>>,
}

impl Report {
    pub(super) fn new(state: AgentState, clock: Clock) -> Report {
        Report {
            state,
            clock,
            warned: Arc::default(),
        }
    }

    fn first_time(&self, what: String) -> bool {
        self.warned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(what)
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

    /// Every lease the table holds, ours marked.
    pub(super) fn leases(&self, table: &LeaseTable, own: Ipv4Network) {
        let leases = table
            .leases()
            .map(|l| lease_view(l, l.key.ipv4 == own))
            .collect();
        self.state.update(|s| s.leases = leases);
    }

    /// How long it took from receiving lease events to a programmed data plane.
    pub(super) fn reconciled_in(&self, since: Instant) {
        self.state
            .metrics
            .reconcile_seconds
            .observe(since.elapsed().as_secs_f64());
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
        let programmed = remotes.len() - stats.skipped.len();
        m.peers.with_label_values(&[backend]).set(programmed as i64);
        let failed: HashSet<Ipv4Network> = stats.failures.iter().filter_map(|f| f.subnet).collect();
        let peers: Vec<PeerView> = remotes
            .iter()
            .map(|r| {
                let skip = stats.skipped.iter().find(|s| s.subnet == r.subnet);
                let error = skip.map(|s| s.reason.clone()).or_else(|| {
                    failed
                        .contains(&r.subnet)
                        .then(|| "netlink programming failed (see log)".to_string())
                });
                PeerView {
                    subnet: r.subnet.to_string(),
                    public_ip: r.attrs.public_ip.to_string(),
                    backend: r.attrs.effective_backend_type().to_string(),
                    programmed: error.is_none(),
                    error,
                }
            })
            .collect();
        let clean = stats.is_clean();
        self.state.update(|s| {
            s.peers = peers;
            s.backend_programmed = clean;
        });
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
                        .find(|v| v.public_key == key)
                        .map_or(now_ms, |v| v.since_unix_ms);
                    crate::state::WgPeerView {
                        subnet: p.subnet.map(|s| s.to_string()).unwrap_or_default(),
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
                .with_label_values(&[&subnet, &key])
                .set(age);
            for (dir, n) in [("tx", p.tx_bytes), ("rx", p.rx_bytes)] {
                m.wg_peer_bytes
                    .with_label_values(&[&subnet, &key, dir])
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
