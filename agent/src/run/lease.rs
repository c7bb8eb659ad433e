//! This node's lease: acquiring it (retried until done or stopped), renewing it in a task of its
//! own so a slow reconcile never delays a renewal, and following what an operator does to it
//! (`reserve` detaches it from its TTL, `unreserve` attaches a fresh one).

use super::report::Report;
use super::stop::{next_backoff, Stop};
use super::AgentError;
use crate::registry::Registry;
use crate::subnet::{self, OwnLease};
use crate::watch::LeaseTable;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::warn;
use tweed_config::{LeaseAttrs, NetworkConfig, SubnetKey};

/// How soon a renewal that failed (etcd unreachable) is tried again.
const RENEW_RETRY: Duration = Duration::from_secs(2);

/// How often our key is written back after being overwritten before we give the subnet up: a
/// writer that keeps overwriting it would otherwise fight us for ever, with the data plane of
/// every peer flapping between the two values.
const MAX_RESTORES: u32 = 3;

/// What was done when our own key no longer said what we wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ConflictAction {
    /// Our lease was still alive: the overwrite was not a protocol write (a node only ever
    /// creates absent keys), so our value was written back.
    Restored,
    /// Our lease was gone (someone may hold the subnet rightfully) or the key was overwritten
    /// again and again: we took another subnet.
    Moved,
    /// Nothing to do (resolved meanwhile, or etcd unreachable: the next event retries).
    None,
}

impl ConflictAction {
    pub(super) fn label(self) -> &'static str {
        match self {
            ConflictAction::Restored => "restored",
            ConflictAction::Moved => "moved",
            ConflictAction::None => "none",
        }
    }
}

/// Acquires a lease, retrying with backoff; `None` when stopped first.
pub(super) async fn acquire(
    registry: &Registry,
    cfg: &NetworkConfig,
    attrs: &LeaseAttrs,
    previous: Option<SubnetKey>,
    ttl: Duration,
    stop: &mut Stop,
    report: &Report,
) -> Option<OwnLease> {
    let mut backoff = Duration::from_millis(500);
    loop {
        match subnet::acquire(registry, cfg, attrs, previous, ttl).await {
            Ok(own) => {
                report.lease_acquired(&own, ttl);
                return Some(own);
            }
            Err(e) => report.acquire_failed(&e),
        }
        if stop.sleep(backoff).await {
            return None;
        }
        backoff = next_backoff(backoff);
    }
}

/// The lease held, and the task renewing it.
pub(super) struct LeaseKeeper {
    registry: Arc<Registry>,
    cfg: NetworkConfig,
    attrs: LeaseAttrs,
    ttl: Duration,
    report: Report,
    /// The lease held; the renewal task renews whatever this says (nothing for lease 0).
    own: watch::Sender<OwnLease>,
    /// Lease ids the renewal task found gone (expired or revoked).
    expired: mpsc::Receiver<i64>,
    task: JoinHandle<()>,
    /// Times our key was written back since we took it.
    restores: u32,
    /// `attrs` changed (a rotated wireguard key) and etcd does not have them yet.
    unpublished: bool,
    /// The IPv6 subnet a turn to IPv4 only gave up.
    dropped_v6: Option<ipnetwork::Ipv6Network>,
}

impl LeaseKeeper {
    /// Keeps `own`, renewing it every `every`.
    pub(super) fn start(
        registry: Arc<Registry>,
        cfg: NetworkConfig,
        attrs: LeaseAttrs,
        ttl: Duration,
        every: Duration,
        own: OwnLease,
        report: Report,
    ) -> LeaseKeeper {
        let (own, watched) = watch::channel(own);
        let (expired_tx, expired) = mpsc::channel(4);
        let task = tokio::spawn(renew(
            registry.clone(),
            watched,
            every,
            expired_tx,
            report.clone(),
        ));
        LeaseKeeper {
            registry,
            cfg,
            attrs,
            ttl,
            report,
            own,
            expired,
            task,
            restores: 0,
            unpublished: false,
            dropped_v6: None,
        }
    }

    /// Whether etcd's latest word on our key is a conflict: another node's PublicIP under our
    /// key, or a value the table refused written over it. Never adopted either way.
    pub(super) fn conflicts(&self, table: &LeaseTable, applied: &crate::watch::Applied) -> bool {
        let own = self.own();
        let key = own.key.etcd_key(self.registry.prefix());
        table
            .get(&own.key)
            .is_some_and(|l| l.attrs.public_ip != self.attrs.public_ip)
            || applied.skipped.iter().any(|s| s.key == key)
    }

    /// Someone else's value is under our key. Restore ours while our lease lives (a node only
    /// ever creates absent keys, so this was no node's protocol write), up to [`MAX_RESTORES`]
    /// times; otherwise move to another subnet. Never adopt the foreign value.
    pub(super) async fn resolve_conflict(&mut self, stop: &mut Stop) -> ConflictAction {
        let own = self.own();
        let key = own.key.etcd_key(self.registry.prefix());
        let current = match self.registry.list_leases().await {
            Ok(snap) => snap.leases.into_iter().find(|l| l.key == key),
            Err(e) => {
                self.report.conflict_check_failed(own.subnet(), &e);
                return ConflictAction::None;
            }
        };
        // Deleted: the lost-lease path re-acquires. Ours again: resolved meanwhile.
        let Some(current) = current else {
            return ConflictAction::None;
        };
        let holder = LeaseAttrs::parse(&current.value).ok();
        if holder.as_ref().map(|a| a.public_ip) == Some(self.attrs.public_ip) {
            return ConflictAction::None;
        }
        let found = holder
            .map(|a| format!("PublicIP {}", a.public_ip))
            .unwrap_or_else(|| format!("{:?}", String::from_utf8_lossy(&current.value)));
        let alive =
            own.lease_id == 0 || matches!(self.registry.renew(own.lease_id).await, Ok(Some(_)));
        if alive && self.restores < MAX_RESTORES {
            match self
                .registry
                .update_lease(&own.key, &self.attrs, own.lease_id, current.mod_revision)
                .await
            {
                Ok(true) => {
                    self.restores += 1;
                    self.report
                        .lease_conflict(ConflictAction::Restored, own.subnet(), &found);
                    return ConflictAction::Restored;
                }
                // Written again meanwhile: its watch event brings us back here.
                Ok(false) => return ConflictAction::None,
                Err(e) => {
                    self.report.conflict_check_failed(own.subnet(), &e);
                    return ConflictAction::None;
                }
            }
        }
        self.report
            .lease_conflict(ConflictAction::Moved, own.subnet(), &found);
        // The foreign value keeps the key occupied, so acquisition chooses another subnet.
        if self.reacquire(stop).await {
            self.restores = 0;
            ConflictAction::Moved
        } else {
            ConflictAction::None
        }
    }

    /// Advertises `attrs` from now on: written over our lease's value (same TTL lease), and used
    /// by any later acquisition. False when etcd did not take it yet; [`republish`] retries.
    ///
    /// [`republish`]: Self::republish
    pub(super) async fn publish(&mut self, attrs: LeaseAttrs) -> bool {
        self.attrs = attrs;
        self.unpublished = true;
        self.republish().await
    }

    /// Writes attributes [`publish`](Self::publish) could not write yet; true when etcd has
    /// ours.
    pub(super) async fn republish(&mut self) -> bool {
        if !self.unpublished {
            return true;
        }
        let own = self.own();
        let key = own.key.etcd_key(self.registry.prefix());
        // Compare-and-swap on the value we read: a write racing ours (an operator, a conflict)
        // is read again, a few times.
        for _ in 0..3 {
            let current = match self.registry.list_leases().await {
                Ok(snap) => snap.leases.into_iter().find(|l| l.key == key),
                Err(e) => {
                    warn!(subnet = %own.subnet(), "publishing new lease attributes: {e}; retried later");
                    return false;
                }
            };
            // Gone: the lost-lease path acquires again, with the new attributes.
            let Some(current) = current else {
                return false;
            };
            match self
                .registry
                .update_lease(&own.key, &self.attrs, own.lease_id, current.mod_revision)
                .await
            {
                Ok(true) => {
                    self.unpublished = false;
                    return true;
                }
                Ok(false) => continue,
                Err(e) => {
                    warn!(subnet = %own.subnet(), "publishing new lease attributes: {e}; retried later");
                    return false;
                }
            }
        }
        false
    }

    /// What the lease advertises (or will, once [`publish`](Self::publish) got through).
    pub(super) fn attrs(&self) -> &LeaseAttrs {
        &self.attrs
    }

    pub(super) fn own(&self) -> OwnLease {
        self.own.borrow().clone()
    }

    /// Waits until the renewal finds our lease gone; an error when the renewal task died.
    pub(super) async fn expired(&mut self) -> Result<i64, AgentError> {
        match self.expired.recv().await {
            Some(id) => Ok(id),
            // The task holds the only sender: it ended.
            None => Err(AgentError::task_died(
                "lease renewal",
                (&mut self.task).await,
            )),
        }
    }

    /// The renewal found lease `id` gone: takes a lease again. True when it did; false when `id`
    /// is not ours any more (the watch saw the loss first and we hold a new one) or when stopped
    /// first.
    pub(super) async fn on_expired(&mut self, id: i64, stop: &mut Stop) -> bool {
        if id != self.own.borrow().lease_id {
            return false;
        }
        self.report.lease_expired(self.own().subnet());
        self.reacquire(stop).await
    }

    /// Takes a lease again, preferring the subnet we had. False when stopped first.
    pub(super) async fn reacquire(&mut self, stop: &mut Stop) -> bool {
        let previous = Some(self.own().key);
        let Some(own) = acquire(
            &self.registry,
            &self.cfg,
            &self.attrs,
            previous,
            self.ttl,
            stop,
            &self.report,
        )
        .await
        else {
            return false;
        };
        self.own.send_replace(own);
        true
    }

    /// Advertises `attrs` (which gained a `PublicIPv6`) and takes the lease again with them:
    /// `subnet::acquire` keeps our IPv4 half and renames the key to name an IPv6 subnet too.
    /// False when stopped first (the attributes stay for the next acquisition).
    /// The IPv6 half given up by a turn to IPv4 only is asked back first, so pods that kept
    /// addresses of it are reachable again.
    pub(super) async fn take_ipv6_half(&mut self, attrs: LeaseAttrs, stop: &mut Stop) -> bool {
        self.attrs = attrs;
        let mut previous = self.own().key;
        previous.ipv6 = previous.ipv6.or(self.dropped_v6);
        let Some(own) = acquire(
            &self.registry,
            &self.cfg,
            &self.attrs,
            Some(previous),
            self.ttl,
            stop,
            &self.report,
        )
        .await
        else {
            return false;
        };
        let old = self.own.send_replace(own);
        self.release_replaced(old.lease_id);
        true
    }

    /// Revokes the TTL lease of the key a rename gave up (deleted, so the lease holds nothing),
    /// rather than leave it to its TTL: every dual stack -> IPv4 only -> dual stack round trip
    /// would leave two behind for 24 hours. In a task, best effort: an orphan lease expires anyway.
    /// The renewer may still find it gone once; that id is no longer ours, so it is ignored.
    fn release_replaced(&self, old_id: i64) {
        if old_id == 0 || old_id == self.own().lease_id {
            return;
        }
        let registry = self.registry.clone();
        tokio::spawn(async move {
            if let Err(e) = registry.revoke(old_id).await {
                tracing::debug!(lease_id = old_id, error = %e, "could not revoke the renamed key's old lease; it will expire");
            }
        });
    }

    /// One attempt at taking our lease again with `attrs` (which lost the `PublicIPv6`):
    /// `subnet::acquire` keeps our IPv4 half and renames the key to its IPv4-only form. In a task
    /// of its own, so an etcd that is slow or away never holds the main loop, and never cancelled:
    /// a rename is two writes (new key, then the old one deleted), and one cut between them is
    /// only cleaned up by the next acquisition. The main loop commits the result with
    /// [`switched`](Self::switched), or tries again later; nothing here changes what we hold.
    pub(super) fn spawn_acquire(
        &self,
        attrs: LeaseAttrs,
    ) -> JoinHandle<Result<OwnLease, subnet::SubnetError>> {
        let (registry, cfg, ttl) = (self.registry.clone(), self.cfg.clone(), self.ttl);
        let previous = Some(self.own().key);
        tokio::spawn(async move { subnet::acquire(&registry, &cfg, &attrs, previous, ttl).await })
    }

    /// What [`spawn_acquire`](Self::spawn_acquire) got for a turn to IPv4 only: the lease held
    /// from now on, under which the task wrote `written`. Attributes published while the task
    /// ran (a wireguard key rotated meanwhile) went to the old key, which the rename deleted, or
    /// were overwritten by the task's stale copy: they are kept, without the IPv6 half, and
    /// written over the task's value (compare-and-swap; [`republish`](Self::republish) retries),
    /// or peers would handshake with a key the device no longer has. False when etcd did not
    /// take them yet.
    pub(super) async fn switched_v4_only(&mut self, own: OwnLease, written: LeaseAttrs) -> bool {
        self.report.lease_acquired(&own, self.ttl);
        let want = crate::ipv6::without_ipv6(std::mem::replace(&mut self.attrs, written));
        self.unpublished = false;
        self.restores = 0;
        let old = self.own.send_replace(own);
        self.dropped_v6 = old.key.ipv6.or(self.dropped_v6);
        self.release_replaced(old.lease_id);
        if want.to_json() == self.attrs.to_json() {
            return true;
        }
        self.publish(want).await
    }

    /// Follows what etcd says about our key's lease: an operator's `reserve` detaches it from its
    /// TTL (lease 0: nothing to renew, it never expires) and `unreserve` attaches it to a fresh
    /// TTL lease, which we must renew from then on.
    pub(super) fn follow(&mut self, table: &LeaseTable) {
        let own = self.own();
        let Some(l) = table.get(&own.key) else {
            return;
        };
        if l.attrs.public_ip != self.attrs.public_ip || l.lease_id == own.lease_id {
            return;
        }
        let new = l.lease_id;
        self.report
            .lease_id_changed(own.subnet(), own.lease_id, new, self.ttl);
        self.own.send_modify(|o| o.lease_id = new);
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        // Shutting down leaves the lease to its TTL: a restart takes it back.
        self.task.abort();
    }
}

/// The renewal task: renews the lease `own` names every `every`; tells the main loop when it is
/// gone and then waits for the next one.
async fn renew(
    registry: Arc<Registry>,
    mut own: watch::Receiver<OwnLease>,
    every: Duration,
    expired: mpsc::Sender<i64>,
    report: Report,
) {
    let mut wait = every;
    loop {
        tokio::time::sleep(wait).await;
        let lease = own.borrow_and_update().clone();
        if lease.lease_id == 0 {
            wait = every;
            continue;
        }
        wait = match registry.renew(lease.lease_id).await {
            Ok(Some(ttl)) => {
                report.lease_renewed(lease.subnet(), lease.lease_id, ttl);
                every
            }
            Ok(None) => {
                if expired.send(lease.lease_id).await.is_err() || own.changed().await.is_err() {
                    return;
                }
                every
            }
            Err(e) => {
                report.renew_failed(&e, RENEW_RETRY);
                RENEW_RETRY
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::MemRegistry;
    use crate::run::Clock;
    use crate::state::AgentState;

    const PREFIX: &str = "/coreos.com/network";
    const TTL: Duration = Duration::from_secs(60);
    const EVERY: Duration = Duration::from_secs(40);

    /// An empty registry and the keeper of a lease freshly acquired in it, renewing every 40 s.
    async fn keeper() -> (MemRegistry, LeaseKeeper, AgentState, Stop) {
        let mem = MemRegistry::new(PREFIX);
        let registry = Arc::new(Registry::Mem(mem.clone()));
        let cfg = NetworkConfig::parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap();
        let attrs = LeaseAttrs::new("198.18.0.1".parse().unwrap(), "host-gw", None);
        let state = AgentState::new();
        let report = Report::new(state.clone(), Clock::tokio(0));
        let mut stop = Stop::new(std::future::pending());
        let own = acquire(&registry, &cfg, &attrs, None, TTL, &mut stop, &report)
            .await
            .unwrap();
        let k = LeaseKeeper::start(registry, cfg, attrs, TTL, EVERY, own, report);
        (mem, k, state, stop)
    }

    async fn lease_of(mem: &MemRegistry, own: &OwnLease) -> Option<i64> {
        let snap = Registry::Mem(mem.clone()).list_leases().await.unwrap();
        let k = own.key.etcd_key(PREFIX);
        snap.leases.iter().find(|l| l.key == k).map(|l| l.lease_id)
    }

    #[tokio::test(start_paused = true)]
    async fn the_renewal_keeps_the_lease_and_says_when_it_is_gone() {
        let (mem, mut k, state, mut stop) = keeper().await;
        let first = k.own();
        // Ten TTLs: only the renewals (every 40 s) keep it; the last at 600 s.
        tokio::time::sleep(TTL * 10 + Duration::from_secs(1)).await;
        assert_eq!(lease_of(&mem, &first).await, Some(first.lease_id));
        assert_eq!(state.metrics.lease_renewals.get(), 15);
        assert_eq!(state.snapshot().lease_expiry_unix, 600 + 60);

        // Gone between two renewals: the next one says so, and the keeper takes a new lease.
        mem.expire_lease(first.lease_id);
        let gone = tokio::time::timeout(EVERY * 2, k.expired()).await;
        assert_eq!(gone.unwrap().unwrap(), first.lease_id);
        assert!(k.on_expired(first.lease_id, &mut stop).await);
        let second = k.own();
        assert_eq!(second.subnet(), first.subnet(), "the subnet we had");
        assert_ne!(second.lease_id, first.lease_id);
        // News of the old lease, late (the watch was first): nothing to do.
        assert!(!k.on_expired(first.lease_id, &mut stop).await);
        assert_eq!(
            (k.own(), state.metrics.lease_acquisitions.get()),
            (second.clone(), 2)
        );
        // The renewal follows the new lease.
        tokio::time::sleep(TTL * 3).await;
        assert_eq!(lease_of(&mem, &second).await, Some(second.lease_id));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reserved_lease_is_not_renewed_and_an_unreserved_one_is() {
        let (mem, mut k, state, _stop) = keeper().await;
        let own = k.own();
        let reg = Registry::Mem(mem.clone());
        let mut table = LeaseTable::new(PREFIX, "10.244.0.0/16".parse().unwrap(), 24);

        reg.reserve(&own.key, "198.18.0.1".parse().unwrap())
            .await
            .unwrap();
        table.resync(&reg.list_leases().await.unwrap().leases);
        k.follow(&table);
        assert_eq!(k.own().lease_id, 0);
        assert_eq!(state.snapshot().lease_expiry_unix, 0);
        let renewals = state.metrics.lease_renewals.get();
        let quiet = tokio::time::timeout(TTL * 10, k.expired()).await;
        assert!(quiet.is_err(), "nothing to renew, nothing lost");
        assert_eq!(state.metrics.lease_renewals.get(), renewals);

        reg.unreserve(&own.key, TTL).await.unwrap();
        table.resync(&reg.list_leases().await.unwrap().leases);
        k.follow(&table);
        let id = k.own().lease_id;
        assert_ne!(id, 0);
        tokio::time::sleep(TTL * 3).await;
        assert_eq!(lease_of(&mem, &own).await, Some(id), "kept by renewals");
    }

    #[tokio::test(start_paused = true)]
    async fn published_attributes_replace_the_value_under_the_same_lease() {
        let (mem, mut k, _state, mut stop) = keeper().await;
        let own = k.own();
        let key = own.key.etcd_key(PREFIX);
        let key_b64 = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
        let attrs = crate::backend::wireguard::plan::lease_attrs(
            "198.18.0.1".parse().unwrap(),
            &crate::backend::wireguard::PublicKey(
                tweed_config::network::decode_wg_key(key_b64).unwrap(),
            ),
            51820,
        );
        assert!(k.publish(attrs.clone()).await);
        let snap = Registry::Mem(mem.clone()).list_leases().await.unwrap();
        let l = snap.leases.iter().find(|l| l.key == key).unwrap();
        assert_eq!(l.lease_id, own.lease_id, "the TTL lease is kept");
        let text = String::from_utf8_lossy(&l.value).into_owned();
        assert!(text.contains("hSDwCYkwp1R0i33ctD73Wg2"), "{text}");
        // Nothing left to write.
        assert!(k.republish().await);

        // A lease lost later is taken again with the new attributes, not the old ones.
        mem.expire_lease(own.lease_id);
        assert!(k.reacquire(&mut stop).await);
        let snap = Registry::Mem(mem.clone()).list_leases().await.unwrap();
        let l = snap.leases.iter().find(|l| l.key == key).unwrap();
        assert!(String::from_utf8_lossy(&l.value).contains("wireguard"));
    }

    /// A dual-stack wireguard lease naming key `k` (one byte repeated) and the keeper holding it.
    async fn dual_wireguard_keeper(k: u8) -> (MemRegistry, LeaseKeeper, Stop) {
        let mem = MemRegistry::new(PREFIX);
        let registry = Arc::new(Registry::Mem(mem.clone()));
        let cfg = NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"wireguard","Mode":"separate"}}"#,
        )
        .unwrap();
        let attrs = wg_dual_attrs(k);
        let report = Report::new(AgentState::new(), Clock::tokio(0));
        let mut stop = Stop::new(std::future::pending());
        let own = acquire(&registry, &cfg, &attrs, None, TTL, &mut stop, &report)
            .await
            .unwrap();
        assert!(own.key.ipv6.is_some(), "a dual key: {}", own.key);
        let keeper = LeaseKeeper::start(registry, cfg, attrs, TTL, EVERY, own, report);
        (mem, keeper, stop)
    }

    /// A `separate` node's dual-stack lease value naming key `k` in both halves.
    fn wg_dual_attrs(k: u8) -> LeaseAttrs {
        use crate::backend::wireguard::{plan, PrivateKey};
        let key = PrivateKey::from_bytes([k; 32]).public();
        let mut a = plan::lease_attrs("198.18.0.1".parse().unwrap(), &key, 51820);
        a = crate::ipv6::with_public_ipv6(a, "2001:db8::1".parse().unwrap());
        a.backend_v6_data = Some(plan::backend_data(&key, 51821));
        a
    }

    /// Review rev37a finding 1: a wireguard key rotated while the rename to the IPv4-only key
    /// runs (before its writes, or after them and before the main loop commits it) ends up in
    /// etcd under the IPv4-only key, without the IPv6 half; the task's copy names the old key.
    #[tokio::test(start_paused = true)]
    async fn a_key_rotated_during_the_turn_to_ipv4_only_is_the_one_published() {
        let old_key = wg_dual_attrs(1).backend_data.unwrap().get().to_string();
        let new_key = wg_dual_attrs(2).backend_data.unwrap().get().to_string();
        for rotate_before_the_writes in [true, false] {
            let (mem, mut k, _stop) = dual_wireguard_keeper(1).await;
            let written = crate::ipv6::without_ipv6(k.attrs().clone());
            let task = k.spawn_acquire(written.clone());
            if !rotate_before_the_writes {
                // The rename's writes are done; the main loop has not seen the result yet.
                while !task.is_finished() {
                    tokio::task::yield_now().await;
                }
            }
            // The rotation: the keeper's `publish`, to the key it still holds.
            k.publish(wg_dual_attrs(2)).await;
            let own = task.await.unwrap().unwrap();
            assert_eq!(own.key.ipv6, None);
            assert!(
                k.switched_v4_only(own.clone(), written).await,
                "rotated before the writes: {rotate_before_the_writes}"
            );
            let snap = Registry::Mem(mem.clone()).list_leases().await.unwrap();
            assert_eq!(snap.leases.len(), 1, "{:?}", snap.leases);
            let l = &snap.leases[0];
            assert_eq!(l.key, own.key.etcd_key(PREFIX));
            let held = LeaseAttrs::parse(&l.value).unwrap();
            let what = format!(
                "rotated before the writes: {rotate_before_the_writes}: {}",
                held.to_json()
            );
            assert_eq!(
                held.backend_data.as_ref().map(|d| d.get().to_string()),
                Some(new_key.clone()),
                "{what}; the old one was {old_key}"
            );
            assert_eq!(
                (held.public_ipv6, held.backend_v6_data.is_none()),
                (None, true),
                "{what}"
            );
            assert_eq!(k.attrs().to_json(), held.to_json());
            assert!(k.republish().await, "nothing left to write");
        }
    }

    /// The value under `subnet`'s key: (PublicIP or the raw text, lease id).
    async fn value_at(mem: &MemRegistry, key: &str) -> (String, i64) {
        let snap = Registry::Mem(mem.clone()).list_leases().await.unwrap();
        let l = snap
            .leases
            .iter()
            .find(|l| l.key == key)
            .expect("key present");
        let v = LeaseAttrs::parse(&l.value)
            .map(|a| a.public_ip.to_string())
            .unwrap_or_else(|_| String::from_utf8_lossy(&l.value).into_owned());
        (v, l.lease_id)
    }

    #[tokio::test(start_paused = true)]
    async fn an_overwritten_own_lease_is_restored_then_given_up_never_adopted() {
        let (mem, mut k, state, mut stop) = keeper().await;
        let own = k.own();
        let reg = Registry::Mem(mem.clone());
        let key = own.key.etcd_key(PREFIX);
        let mut table = LeaseTable::new(PREFIX, "10.244.0.0/16".parse().unwrap(), 24);
        let conflicts = |action: &str| {
            state
                .metrics
                .lease_conflicts
                .with_label_values(&[action])
                .get()
        };
        let applied = table.resync(&reg.list_leases().await.unwrap().leases);
        assert!(
            !k.conflicts(&table, &applied),
            "our own value is no conflict"
        );

        // Another node's address, then garbage: both restored while our lease lives.
        let thief: &[u8] = br#"{"PublicIP":"198.18.0.66","BackendType":"host-gw"}"#;
        for (round, value) in [thief, b"{garbage", thief].into_iter().enumerate() {
            mem.put_raw(&key, value);
            let applied = table.resync(&reg.list_leases().await.unwrap().leases);
            assert!(k.conflicts(&table, &applied), "round {round}");
            assert_eq!(
                k.resolve_conflict(&mut stop).await,
                ConflictAction::Restored
            );
            assert_eq!(
                value_at(&mem, &key).await,
                ("198.18.0.1".to_string(), own.lease_id),
                "our value, attached to our lease again"
            );
            assert_eq!(k.own(), own);
            assert_eq!(conflicts("restored"), round as u64 + 1);
            let applied = table.resync(&reg.list_leases().await.unwrap().leases);
            assert!(!k.conflicts(&table, &applied));
        }
        // A fourth time: we stop fighting, move, and leave the foreign value alone.
        mem.put_raw(&key, thief);
        let applied = table.resync(&reg.list_leases().await.unwrap().leases);
        assert!(k.conflicts(&table, &applied));
        assert_eq!(k.resolve_conflict(&mut stop).await, ConflictAction::Moved);
        let moved = k.own();
        assert_ne!(moved.subnet(), own.subnet());
        assert_eq!(conflicts("moved"), 1);
        assert_eq!(value_at(&mem, &key).await.0, "198.18.0.66");
        let new_key = moved.key.etcd_key(PREFIX);
        assert_eq!(value_at(&mem, &new_key).await.0, "198.18.0.1");
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_taken_after_our_lease_expired_is_given_up_at_once() {
        let (mem, mut k, state, mut stop) = keeper().await;
        let own = k.own();
        let key = own.key.etcd_key(PREFIX);
        mem.expire_lease(own.lease_id);
        // Someone took the free key meanwhile: rightfully, as far as we can tell.
        mem.put_raw(
            &key,
            br#"{"PublicIP":"198.18.0.7","BackendType":"host-gw"}"#,
        );
        assert_eq!(k.resolve_conflict(&mut stop).await, ConflictAction::Moved);
        assert_ne!(k.own().subnet(), own.subnet());
        assert_eq!(value_at(&mem, &key).await.0, "198.18.0.7");
        assert_eq!(
            state
                .metrics
                .lease_conflicts
                .with_label_values(&["restored"])
                .get(),
            0
        );
    }
}
