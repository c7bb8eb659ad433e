//! The subnet manager: acquires this node's lease, renews it, and re-acquires it when it is lost.

use crate::alloc::{self, AllocError, Decision};
use crate::registry::{CreateOutcome, Registry, RegistryError};
use crate::watch::LeaseTable;
use ipnetwork::Ipv4Network;
use std::collections::HashSet;
use std::time::Duration;
use tweed_config::{LeaseAttrs, NetworkConfig, SubnetKey};

#[derive(Debug, thiserror::Error)]
pub enum SubnetError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Alloc(#[from] AllocError),
    #[error(
        "gave up after {attempts} attempts: every chosen subnet was taken by another node first"
    )]
    Contended { attempts: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnLease {
    pub key: SubnetKey,
    /// 0 for a lease without TTL (written by an operator): nothing to renew.
    pub lease_id: i64,
    /// True when an existing lease was kept rather than a new one created.
    pub reused: bool,
}

impl OwnLease {
    pub fn subnet(&self) -> Ipv4Network {
        self.key.ipv4
    }
}

/// When to renew: `margin` before expiry as flannel does, but never later than two thirds of the
/// TTL, so a short test TTL with the default 60-minute margin still renews in time.
pub fn renew_interval(ttl: Duration, margin: Duration) -> Duration {
    let by_margin = ttl.saturating_sub(margin);
    let cap = ttl * 2 / 3;
    if by_margin.is_zero() {
        cap.max(Duration::from_secs(1))
    } else {
        by_margin.min(cap).max(Duration::from_secs(1))
    }
}

const MAX_RACE_RETRIES: u32 = 64;

/// Acquires a lease following design order (own lease, previous subnet, random free). A lost
/// creation race moves on to another subnet instead of exiting, which is where flannel gives up.
pub async fn acquire(
    registry: &Registry,
    cfg: &NetworkConfig,
    attrs: &LeaseAttrs,
    previous: Option<Ipv4Network>,
    ttl: Duration,
) -> Result<OwnLease, SubnetError> {
    let mut lost = HashSet::new();
    let mut previous = previous;
    for _ in 0..MAX_RACE_RETRIES {
        let snap = registry.list_leases().await?;
        let mut table = LeaseTable::new(registry.prefix(), cfg.network, cfg.subnet_len);
        let applied = table.resync(&snap.leases);
        for s in &applied.skipped {
            tracing::warn!(key = %s.key, reason = %s.reason, "skipping unusable lease");
        }
        let mine: Vec<_> = table
            .leases()
            .filter(|l| l.attrs.public_ip == attrs.public_ip)
            .cloned()
            .collect();
        let decision = alloc::choose(
            cfg,
            &mine,
            &table.occupied(),
            attrs.public_ip,
            previous,
            &lost,
            &mut rand::rng(),
        )?;
        match decision {
            Decision::Reuse(l) => {
                if l.lease_id != 0 && registry.renew(l.lease_id).await?.is_none() {
                    // Expired between list and renew; its key is gone or going: choose again.
                    previous = Some(l.key.ipv4);
                    continue;
                }
                if l.attrs != *attrs
                    && !registry
                        .update_lease(&l.key, attrs, l.lease_id, l.mod_revision)
                        .await?
                {
                    continue;
                }
                return Ok(OwnLease {
                    key: l.key,
                    lease_id: l.lease_id,
                    reused: true,
                });
            }
            Decision::Take(subnet) => {
                let key = SubnetKey::new(subnet);
                match registry.create_lease(&key, attrs, ttl).await? {
                    CreateOutcome::Created { lease_id } => {
                        return Ok(OwnLease {
                            key,
                            lease_id,
                            reused: false,
                        })
                    }
                    CreateOutcome::Taken => {
                        tracing::info!(%subnet, "subnet taken by another node first; choosing another");
                        lost.insert(subnet);
                        if previous == Some(subnet) {
                            previous = None;
                        }
                    }
                }
            }
        }
    }
    Err(SubnetError::Contended {
        attempts: MAX_RACE_RETRIES,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::MemRegistry;

    const P: &str = "/coreos.com/network";

    fn cfg() -> NetworkConfig {
        NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.0","SubnetMax":"10.244.40.0"}"#,
        )
        .unwrap()
    }

    fn attrs(ip: &str) -> LeaseAttrs {
        LeaseAttrs::new(
            ip.parse().unwrap(),
            "vxlan",
            Some(&serde_json::json!({"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:01"})),
        )
    }

    const TTL: Duration = Duration::from_secs(60);

    /// An empty in-memory registry, and the handle the agent code takes.
    fn mem_registry() -> (MemRegistry, Registry) {
        let mem = MemRegistry::new(P);
        (mem.clone(), Registry::Mem(mem))
    }

    /// Acquires for the node `ip` (asking for `prev` back, as a restarted agent does).
    async fn acquire_as(
        reg: &Registry,
        ip: &str,
        prev: Option<Ipv4Network>,
        ttl: Duration,
    ) -> OwnLease {
        acquire(reg, &cfg(), &attrs(ip), prev, ttl).await.unwrap()
    }

    #[test]
    fn renew_interval_rules() {
        let h = Duration::from_secs(3600);
        assert_eq!(renew_interval(24 * h, h), 16 * h); // capped at 2/3
        assert_eq!(renew_interval(3 * h, h), 2 * h);
        assert_eq!(
            renew_interval(Duration::from_secs(9), h),
            Duration::from_secs(6)
        );
        assert_eq!(
            renew_interval(Duration::from_secs(1), h),
            Duration::from_secs(1)
        );
    }

    #[tokio::test]
    async fn concurrent_agents_get_distinct_subnets() {
        let mem = MemRegistry::new(P);
        let mut tasks = Vec::new();
        for i in 0..40 {
            let reg = Registry::Mem(mem.clone());
            tasks.push(tokio::spawn(async move {
                acquire(
                    &reg,
                    &cfg(),
                    &attrs(&format!("198.18.0.{}", i + 1)),
                    None,
                    TTL,
                )
                .await
                .unwrap()
                .subnet()
            }));
        }
        let mut got = HashSet::new();
        for t in tasks {
            assert!(got.insert(t.await.unwrap()));
        }
        assert_eq!(got.len(), 40);
        // The range holds exactly 40: the 41st node gets a clear error.
        let err = acquire(&Registry::Mem(mem), &cfg(), &attrs("198.18.1.1"), None, TTL)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("out of subnets") && err.contains("10.244.0.0/16"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn restart_reuses_the_lease_and_rewrites_changed_attrs() {
        let (_, reg) = mem_registry();
        let first = acquire_as(&reg, "198.18.0.1", None, TTL).await;
        assert!(!first.reused);
        let again = acquire_as(&reg, "198.18.0.1", None, TTL).await;
        assert_eq!(again.key, first.key);
        assert!(again.reused);
        let rev_before = reg.list_leases().await.unwrap().revision;
        // Unchanged attrs: no write at all (peers see nothing).
        acquire_as(&reg, "198.18.0.1", None, TTL).await;
        assert_eq!(reg.list_leases().await.unwrap().revision, rev_before);
        // New VTEP MAC: same subnet, value rewritten.
        let mut changed = attrs("198.18.0.1");
        changed.backend_data = Some(
            serde_json::value::RawValue::from_string(
                r#"{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:99"}"#.into(),
            )
            .unwrap(),
        );
        let third = acquire(&reg, &cfg(), &changed, None, TTL).await.unwrap();
        assert_eq!(third.key, first.key);
        let snap = reg.list_leases().await.unwrap();
        assert!(String::from_utf8_lossy(&snap.leases[0].value).contains("ee:99"));
    }

    #[tokio::test]
    async fn expired_or_deleted_lease_is_reacquired_on_the_same_subnet() {
        let (mem, reg) = mem_registry();
        let first = acquire_as(&reg, "198.18.0.1", None, TTL).await;
        mem.expire_lease(first.lease_id);
        assert_eq!(reg.renew(first.lease_id).await.unwrap(), None);
        assert!(reg.list_leases().await.unwrap().leases.is_empty());
        let back = acquire_as(&reg, "198.18.0.1", Some(first.subnet()), TTL).await;
        assert_eq!(back.subnet(), first.subnet());
        assert_ne!(back.lease_id, first.lease_id);
        // Someone else grabbed it while we were away: we get another one, not an error.
        mem.delete_raw(&back.key.etcd_key(P));
        acquire_as(&reg, "198.18.0.2", Some(first.subnet()), TTL).await;
        let other = acquire_as(&reg, "198.18.0.1", Some(first.subnet()), TTL).await;
        assert_ne!(other.subnet(), first.subnet());
    }

    #[tokio::test]
    async fn a_corrupt_lease_blocks_its_subnet_but_nothing_else() {
        let (mem, reg) = mem_registry();
        let prev: Ipv4Network = "10.244.5.0/24".parse().unwrap();
        mem.put_raw(&format!("{P}/subnets/10.244.5.0-24"), b"{garbage");
        let got = acquire(&reg, &cfg(), &attrs("198.18.0.1"), Some(prev), TTL)
            .await
            .unwrap();
        assert_ne!(got.subnet(), prev);
    }

    #[tokio::test]
    async fn a_reservation_is_taken_only_by_its_public_ip_and_keeps_no_ttl() {
        let (_, reg) = mem_registry();
        let reserved: Ipv4Network = "10.244.9.0/24".parse().unwrap();
        let key = SubnetKey::new(reserved);
        reg.reserve(&key, "198.18.0.77".parse().unwrap())
            .await
            .unwrap();
        // Another node never gets it, even when it asks for it as its previous subnet.
        let other = acquire(&reg, &cfg(), &attrs("198.18.0.5"), Some(reserved), TTL)
            .await
            .unwrap();
        assert_ne!(other.subnet(), reserved);
        // The node with that IP takes it, keeps it without a TTL and writes its backend data.
        let own = acquire_as(&reg, "198.18.0.77", None, TTL).await;
        assert_eq!(own.subnet(), reserved);
        assert_eq!(own.lease_id, 0);
        assert!(own.reused);
        let snap = reg.list_leases().await.unwrap();
        let l = snap
            .leases
            .iter()
            .find(|l| l.key == key.etcd_key(P))
            .unwrap();
        assert_eq!(l.lease_id, 0);
        assert_eq!(LeaseAttrs::parse(&l.value).unwrap(), attrs("198.18.0.77"));
    }
}
