//! An in-memory registry with etcd's semantics, for tests of everything above the registry. TTLs
//! run on tokio's clock, so a test that pauses time decides when leases expire; a test can also
//! take the store out of reach (an etcd outage) or make a call panic (a bug in a client library).

use super::{
    holder_like, reservation_value, CreateOutcome, RawLease, RegistryError, ReserveOutcome,
    Snapshot, UnreserveOutcome, WatchEvent,
};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tweed_config::LeaseAttrs;

#[derive(Default)]
struct Store {
    revision: i64,
    compacted: i64,
    kvs: BTreeMap<String, RawLease>,
    leases: HashMap<i64, (Instant, Duration)>,
    next_lease: i64,
    history: Vec<WatchEvent>,
    /// Set while the store is out of reach: every call fails.
    unreachable: bool,
    /// Calls that panic the next time they are made.
    panic_next: Vec<MemOp>,
    /// How long each listing takes (a slow etcd); zero by default.
    list_delay: Duration,
    /// How many listings were answered.
    lists: u64,
}

/// A registry call a test can make panic ([`MemRegistry::panic_next`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemOp {
    Renew,
    /// Deleting a lease key (`delete_lease`).
    Delete,
    /// Reading the next batch of a watch.
    WatchNext,
}

impl Store {
    fn expire(&mut self) {
        let now = Instant::now();
        let dead: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, (deadline, _))| *deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            self.revoke(id);
        }
    }

    fn revoke(&mut self, id: i64) {
        self.leases.remove(&id);
        let keys: Vec<String> = self
            .kvs
            .values()
            .filter(|l| l.lease_id == id)
            .map(|l| l.key.clone())
            .collect();
        for k in keys {
            self.delete(&k);
        }
    }

    fn put(&mut self, key: &str, value: Vec<u8>, lease_id: i64) {
        self.revision += 1;
        let created = self.kvs.get(key).map(|l| l.create_revision);
        let l = RawLease {
            key: key.to_string(),
            value,
            lease_id,
            mod_revision: self.revision,
            create_revision: created.unwrap_or(self.revision),
        };
        self.kvs.insert(key.to_string(), l.clone());
        self.history.push(WatchEvent::Put(l));
    }

    fn delete(&mut self, key: &str) -> bool {
        if self.kvs.remove(key).is_none() {
            return false;
        }
        self.revision += 1;
        self.history.push(WatchEvent::Delete {
            key: key.to_string(),
            revision: self.revision,
        });
        true
    }
}

/// Clones share one store, like several clients of one etcd.
#[derive(Clone)]
pub struct MemRegistry {
    prefix: String,
    store: Arc<Mutex<Store>>,
    changed: Arc<Notify>,
}

impl MemRegistry {
    pub fn new(prefix: &str) -> Self {
        MemRegistry {
            prefix: prefix.trim_end_matches('/').to_string(),
            store: Arc::default(),
            changed: Arc::default(),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Store) -> T) -> T {
        let mut s = self.store.lock().unwrap_or_else(|p| p.into_inner());
        s.expire();
        let before = s.revision;
        let out = f(&mut s);
        if s.revision != before {
            self.changed.notify_waiters();
        }
        out
    }

    /// [`with`](Self::with) for a client's call: fails as etcd does when no member answers, or
    /// panics when the test asked for it.
    fn call<T>(
        &self,
        op: &'static str,
        key: &str,
        panics: Option<MemOp>,
        f: impl FnOnce(&mut Store) -> T,
    ) -> Result<T, RegistryError> {
        let (down, panic) = {
            let mut s = self.store.lock().unwrap_or_else(|p| p.into_inner());
            let at = panics.and_then(|p| s.panic_next.iter().position(|q| *q == p));
            (s.unreachable, at.map(|i| s.panic_next.remove(i)))
        };
        if let Some(p) = panic {
            panic!("mem registry: injected panic in {p:?}");
        }
        if down {
            let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
            let source = etcd_client::Error::IoError(refused);
            return Err(RegistryError::Etcd {
                op,
                key: key.to_string(),
                detail: source.to_string(),
                source: Box::new(source),
            });
        }
        Ok(self.with(f))
    }

    /// Test control: takes the store out of reach (every call fails) or brings it back. TTLs keep
    /// running meanwhile, as etcd's do.
    pub fn set_reachable(&self, reachable: bool) {
        self.with(|s| s.unreachable = !reachable);
    }

    /// Test control: every listing from now on answers only after `delay` (an etcd that is slow
    /// rather than away).
    pub fn set_list_delay(&self, delay: Duration) {
        self.with(|s| s.list_delay = delay);
    }

    /// Test control: how many listings were answered so far (all clients of this store).
    pub fn lists(&self) -> u64 {
        self.with(|s| s.lists)
    }

    /// Test control: the lease keys as they are now, however slow listings are.
    pub fn keys(&self) -> Vec<String> {
        let dir = format!("{}/subnets/", self.prefix);
        self.with(|s| {
            s.kvs
                .keys()
                .filter(|k| k.starts_with(&dir))
                .cloned()
                .collect()
        })
    }

    /// Test control: the next `op` panics.
    pub fn panic_next(&self, op: MemOp) {
        self.with(|s| s.panic_next.push(op));
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Test control: write any value under any key (an operator, flannel, or a corrupt writer).
    pub fn put_raw(&self, key: &str, value: &[u8]) {
        self.with(|s| s.put(key, value.to_vec(), 0));
    }

    pub fn delete_raw(&self, key: &str) -> bool {
        self.with(|s| s.delete(key))
    }

    /// Test control: drop a TTL lease now, as if it expired.
    pub fn expire_lease(&self, lease_id: i64) {
        self.with(|s| s.revoke(lease_id));
    }

    /// Test control: forget history up to the current revision.
    pub fn compact(&self) {
        self.with(|s| {
            s.compacted = s.revision;
            s.history.clear();
        });
    }

    pub async fn get_config(&self) -> Result<Option<String>, RegistryError> {
        let key = format!("{}/config", self.prefix);
        self.call("get", &key, None, |s| {
            s.kvs
                .get(&key)
                .map(|l| String::from_utf8_lossy(&l.value).into_owned())
        })
    }

    pub async fn list_leases(&self) -> Result<Snapshot, RegistryError> {
        let delay = self.with(|s| s.list_delay);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let dir = format!("{}/subnets/", self.prefix);
        self.call("list", &dir, None, |s| {
            s.lists += 1;
            Snapshot {
                leases: s
                    .kvs
                    .range(dir.clone()..)
                    .take_while(|(k, _)| k.starts_with(&dir))
                    .map(|(_, v)| v.clone())
                    .collect(),
                revision: s.revision,
            }
        })
    }

    pub async fn create_lease(
        &self,
        key: &dyn super::KeyName,
        attrs: &LeaseAttrs,
        ttl: Duration,
    ) -> Result<CreateOutcome, RegistryError> {
        let k = key.etcd_key(&self.prefix);
        self.call("create", &k, None, |s| {
            if s.kvs.contains_key(&k) {
                return CreateOutcome::Taken;
            }
            s.next_lease += 1;
            let id = s.next_lease;
            s.leases.insert(id, (Instant::now() + ttl, ttl));
            s.put(&k, attrs.to_json().into_bytes(), id);
            CreateOutcome::Created { lease_id: id }
        })
    }

    pub async fn update_lease(
        &self,
        key: &dyn super::KeyName,
        attrs: &LeaseAttrs,
        lease_id: i64,
        mod_revision: i64,
    ) -> Result<bool, RegistryError> {
        let k = key.etcd_key(&self.prefix);
        self.call("update", &k, None, |s| match s.kvs.get(&k) {
            Some(l) if l.mod_revision == mod_revision => {
                s.put(&k, attrs.to_json().into_bytes(), lease_id);
                true
            }
            _ => false,
        })
    }

    pub async fn delete_lease(
        &self,
        key: &dyn super::KeyName,
        mod_revision: i64,
    ) -> Result<bool, RegistryError> {
        let k = key.etcd_key(&self.prefix);
        self.call("delete", &k, Some(MemOp::Delete), |s| match s.kvs.get(&k) {
            Some(l) if l.mod_revision == mod_revision => s.delete(&k),
            _ => false,
        })
    }

    /// Nothing to redial in memory.
    pub async fn redial(&self) -> Result<(), RegistryError> {
        Ok(())
    }

    pub async fn revoke(&self, lease_id: i64) -> Result<(), RegistryError> {
        let id = format!("{lease_id:x}");
        self.call("revoke", &id, None, |s| s.revoke(lease_id))
    }

    /// Test control: whether the TTL lease `lease_id` is still granted.
    pub fn lease_alive(&self, lease_id: i64) -> bool {
        self.with(|s| s.leases.contains_key(&lease_id))
    }

    pub async fn renew(&self, lease_id: i64) -> Result<Option<Duration>, RegistryError> {
        let id = format!("{lease_id:x}");
        self.call("renew", &id, Some(MemOp::Renew), |s| {
            s.leases.get_mut(&lease_id).map(|(deadline, ttl)| {
                *deadline = Instant::now() + *ttl;
                *ttl
            })
        })
    }

    pub async fn reserve(
        &self,
        key: &dyn super::KeyName,
        holder: IpAddr,
    ) -> Result<ReserveOutcome, RegistryError> {
        let k = key.etcd_key(&self.prefix);
        self.call("reserve", &k, None, |s| match s.kvs.get(&k).cloned() {
            None => {
                s.put(&k, reservation_value(holder), 0);
                ReserveOutcome::Reserved { created: true }
            }
            Some(l) => match holder_like(&l.value, holder) {
                Ok(ip) if ip == holder => {
                    if l.lease_id != 0 {
                        s.put(&k, l.value, 0);
                    }
                    ReserveOutcome::Reserved { created: false }
                }
                Ok(ip) => ReserveOutcome::HeldBy(ip.to_string()),
                Err(v) => ReserveOutcome::HeldBy(v),
            },
        })
    }

    pub async fn unreserve(
        &self,
        key: &dyn super::KeyName,
        ttl: Duration,
    ) -> Result<UnreserveOutcome, RegistryError> {
        let k = key.etcd_key(&self.prefix);
        self.call("unreserve", &k, None, |s| match s.kvs.get(&k).cloned() {
            None => UnreserveOutcome::NotFound,
            Some(l) if l.lease_id != 0 => UnreserveOutcome::NotReserved {
                lease_id: l.lease_id,
            },
            Some(l) => {
                s.next_lease += 1;
                let id = s.next_lease;
                s.leases.insert(id, (Instant::now() + ttl, ttl));
                s.put(&k, l.value, id);
                UnreserveOutcome::Released { lease_id: id }
            }
        })
    }

    pub fn watch(&self, from_revision: i64) -> Result<MemWatch, RegistryError> {
        let compacted = self.call("watch", &self.prefix, None, |s| s.compacted)?;
        if from_revision <= compacted {
            return Err(RegistryError::Compacted {
                requested: from_revision,
                compacted,
            });
        }
        Ok(MemWatch {
            reg: self.clone(),
            next: from_revision,
        })
    }
}

pub struct MemWatch {
    reg: MemRegistry,
    next: i64,
}

impl MemWatch {
    pub async fn next(&mut self) -> Result<Vec<WatchEvent>, RegistryError> {
        let dir = format!("{}/subnets/", self.reg.prefix);
        loop {
            let notified = self.reg.changed.notified();
            let batch = self.reg.call("watch", &dir, Some(MemOp::WatchNext), |s| {
                if self.next <= s.compacted {
                    return Err(RegistryError::Compacted {
                        requested: self.next,
                        compacted: s.compacted,
                    });
                }
                Ok(s.history
                    .iter()
                    .filter(|e| e.revision() >= self.next)
                    .cloned()
                    .collect::<Vec<_>>())
            })??;
            if let Some(last) = batch.last() {
                self.next = last.revision() + 1;
            }
            let batch: Vec<_> = batch
                .into_iter()
                .filter(|e| match e {
                    WatchEvent::Put(l) => l.key.starts_with(&dir),
                    WatchEvent::Delete { key, .. } => key.starts_with(&dir),
                })
                .collect();
            if !batch.is_empty() {
                return Ok(batch);
            }
            // Lease expiry happens on access; a bounded wait makes expiries visible to watchers.
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;
    use tweed_config::SubnetKey;

    const P: &str = "/coreos.com/network";

    fn key(s: &str) -> SubnetKey {
        SubnetKey::new(s.parse().unwrap())
    }

    fn attrs(ip: &str) -> LeaseAttrs {
        LeaseAttrs::new(ip.parse().unwrap(), "vxlan", None)
    }

    async fn get(reg: &Registry, k: &SubnetKey) -> Option<RawLease> {
        let key = k.etcd_key(P);
        reg.list_leases()
            .await
            .unwrap()
            .leases
            .into_iter()
            .find(|l| l.key == key)
    }

    /// Issue 19: an IPv6-only key is reserved for a `PublicIPv6`: a new one gets flannel's field
    /// set with PublicIP 0.0.0.0, an existing one is held by its `PublicIPv6` (not by the
    /// PublicIP 0.0.0.0 every IPv6-only value has).
    #[tokio::test]
    async fn an_ipv6_only_key_is_reserved_for_its_public_ipv6() {
        let mem = MemRegistry::new(P);
        let reg = Registry::Mem(mem.clone());
        let k: tweed_config::LeaseKey = "fd00:10:244:9::-64".parse().unwrap();
        let ip: IpAddr = "fd00:198:18::7".parse().unwrap();
        assert_eq!(
            reg.reserve(&k, ip).await.unwrap(),
            ReserveOutcome::Reserved { created: true }
        );
        let full = format!("{P}/subnets/fd00:10:244:9::-64");
        let l = mem_get(&mem, &full);
        assert_eq!(
            (l.lease_id, l.value.as_slice()),
            (
                0,
                br#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198:18::7"}"#.as_slice()
            )
        );
        // A node's TTL lease on it: its holder detaches it, another PublicIPv6 or an IPv4
        // address cannot.
        let attrs = LeaseAttrs::parse(
            br#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198:18::8","BackendType":"host-gw"}"#,
        )
        .unwrap();
        let k2: tweed_config::LeaseKey = "fd00:10:244:a::-64".parse().unwrap();
        assert!(matches!(
            reg.create_lease(&k2, &attrs, Duration::from_secs(60))
                .await
                .unwrap(),
            CreateOutcome::Created { .. }
        ));
        for other in ["fd00:198:18::7", "0.0.0.0", "198.18.0.8"] {
            assert!(
                matches!(
                    reg.reserve(&k2, other.parse().unwrap()).await.unwrap(),
                    ReserveOutcome::HeldBy(_)
                ),
                "{other}"
            );
        }
        assert_eq!(
            reg.reserve(&k2, "fd00:198:18::8".parse().unwrap())
                .await
                .unwrap(),
            ReserveOutcome::Reserved { created: false }
        );
        let l = mem_get(&mem, &format!("{P}/subnets/fd00:10:244:a::-64"));
        assert_eq!(l.lease_id, 0);
        assert_eq!(l.value, attrs.to_json().as_bytes());
    }

    fn mem_get(mem: &MemRegistry, key: &str) -> RawLease {
        let reg = Registry::Mem(mem.clone());
        futures::executor::block_on(reg.list_leases())
            .unwrap()
            .leases
            .into_iter()
            .find(|l| l.key == key)
            .unwrap()
    }

    #[tokio::test]
    async fn reserve_creates_a_key_without_ttl_that_never_expires() {
        let mem = MemRegistry::new(P);
        let reg = Registry::Mem(mem.clone());
        let k = key("10.244.9.0/24");
        let ip: IpAddr = "198.18.0.77".parse().unwrap();
        assert_eq!(
            reg.reserve(&k, ip).await.unwrap(),
            ReserveOutcome::Reserved { created: true }
        );
        let l = get(&reg, &k).await.unwrap();
        assert_eq!(l.lease_id, 0);
        assert_eq!(l.value, br#"{"PublicIP":"198.18.0.77"}"#);
        // Idempotent, and nothing is rewritten.
        assert_eq!(
            reg.reserve(&k, ip).await.unwrap(),
            ReserveOutcome::Reserved { created: false }
        );
        assert_eq!(get(&reg, &k).await.unwrap().mod_revision, l.mod_revision);
        // Nobody can create it, another IP cannot reserve it.
        assert_eq!(
            reg.create_lease(&k, &attrs("198.18.0.5"), Duration::from_secs(1))
                .await
                .unwrap(),
            CreateOutcome::Taken
        );
        assert_eq!(
            reg.reserve(&k, "198.18.0.5".parse().unwrap())
                .await
                .unwrap(),
            ReserveOutcome::HeldBy("198.18.0.77".into())
        );
    }

    #[tokio::test]
    async fn reserve_detaches_a_held_lease_from_its_ttl_keeping_its_value() {
        let mem = MemRegistry::new(P);
        let reg = Registry::Mem(mem.clone());
        let k = key("10.244.3.0/24");
        let a = attrs("198.18.0.1");
        let CreateOutcome::Created { lease_id } = reg
            .create_lease(&k, &a, Duration::from_millis(100))
            .await
            .unwrap()
        else {
            panic!("not created")
        };
        assert_eq!(
            reg.reserve(&k, "198.18.0.2".parse().unwrap())
                .await
                .unwrap(),
            ReserveOutcome::HeldBy("198.18.0.1".into())
        );
        assert_eq!(
            reg.reserve(&k, a.public_ip.into()).await.unwrap(),
            ReserveOutcome::Reserved { created: false }
        );
        // The old TTL lease expiring takes nothing with it.
        mem.expire_lease(lease_id);
        tokio::time::sleep(Duration::from_millis(150)).await;
        let l = get(&reg, &k)
            .await
            .expect("reserved key survives its old lease");
        assert_eq!(l.lease_id, 0);
        assert_eq!(LeaseAttrs::parse(&l.value).unwrap(), a);
        assert_eq!(reg.renew(lease_id).await.unwrap(), None);
    }

    #[tokio::test]
    async fn unreserve_attaches_a_fresh_ttl() {
        let mem = MemRegistry::new(P);
        let reg = Registry::Mem(mem.clone());
        let k = key("10.244.9.0/24");
        assert_eq!(
            reg.unreserve(&k, Duration::from_secs(1)).await.unwrap(),
            UnreserveOutcome::NotFound
        );
        reg.reserve(&k, "198.18.0.77".parse().unwrap())
            .await
            .unwrap();
        let UnreserveOutcome::Released { lease_id } =
            reg.unreserve(&k, Duration::from_millis(200)).await.unwrap()
        else {
            panic!("not released")
        };
        assert_ne!(lease_id, 0);
        let l = get(&reg, &k).await.unwrap();
        assert_eq!(l.lease_id, lease_id);
        assert_eq!(l.value, br#"{"PublicIP":"198.18.0.77"}"#);
        assert_eq!(
            reg.unreserve(&k, Duration::from_secs(1)).await.unwrap(),
            UnreserveOutcome::NotReserved { lease_id }
        );
        // Renewed, it stays; left alone, it expires.
        assert!(reg.renew(lease_id).await.unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(get(&reg, &k).await.is_none());
    }

    #[tokio::test]
    async fn an_unreadable_holder_is_named() {
        let mem = MemRegistry::new(P);
        let reg = Registry::Mem(mem.clone());
        let k = key("10.244.4.0/24");
        mem.put_raw(&k.etcd_key(P), b"garbage");
        match reg
            .reserve(&k, "198.18.0.1".parse().unwrap())
            .await
            .unwrap()
        {
            ReserveOutcome::HeldBy(h) => assert!(h.contains("garbage"), "{h}"),
            o => panic!("{o:?}"),
        }
    }
}
