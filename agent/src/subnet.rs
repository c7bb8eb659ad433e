//! The subnet manager: acquires this node's lease, renews it, and re-acquires it when it is lost.

use crate::alloc::{self, AllocError, Decision};
use crate::registry::{
    holder_of, CreateOutcome, RawLease, Registry, RegistryError, ReserveOutcome,
};
use crate::watch::{Lease, LeaseTable};
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
///
/// With an IPv6 half in the network (`EnableIPv6`) and a `PublicIPv6` in `attrs`, the lease is
/// dual stack: one key naming both subnets, as flannel writes it. Without a `PublicIPv6` it is
/// IPv4 only. `previous` is the key we had (both halves are asked back).
pub async fn acquire(
    registry: &Registry,
    cfg: &NetworkConfig,
    attrs: &LeaseAttrs,
    previous: Option<SubnetKey>,
    ttl: Duration,
) -> Result<OwnLease, SubnetError> {
    let mut lost = HashSet::new();
    let mut lost_v6 = HashSet::new();
    let mut previous = previous;
    let v6cfg = cfg.ipv6.as_ref().filter(|_| attrs.public_ipv6.is_some());
    let prefix = registry.prefix().to_string();
    for _ in 0..MAX_RACE_RETRIES {
        let snap = registry.list_leases().await?;
        let mut table = LeaseTable::new(&prefix, cfg.network, cfg.subnet_len)
            .with_ipv6_subnet_len(cfg.ipv6.as_ref().map(|c| c.subnet_len));
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
            previous.map(|k| k.ipv4),
            &lost,
            &mut rand::rng(),
        )?;
        match decision {
            Decision::Reuse(l) => {
                if remove_leftovers(registry, &snap.leases, &l).await? {
                    continue;
                }
                // The IPv6 half we keep: the lease's own while it is still a node subnet of
                // IPv6Network, else a new one (the network gained an IPv6 half, or it changed).
                // Also a new one when an older key claims it: our key lost that race, but the
                // agent stopped before removing it (the IPv4 half, which the table accepted,
                // is ours).
                let own_key = l.key.etcd_key(&prefix);
                let lost_race = |v6| {
                    snap.leases
                        .iter()
                        .find(|r| r.key == own_key)
                        .is_some_and(|own| {
                            older_claim(&snap.leases, own, None, |k| table.blocks_v6(k, v6))
                        })
                };
                let v6 = match v6cfg {
                    None => None,
                    Some(c) => match l
                        .key
                        .ipv6
                        .filter(|s| c.is_allocatable(*s) && !lost_race(*s))
                    {
                        Some(s) => Some(s),
                        None => Some(alloc::choose_v6(
                            c,
                            &table.occupied_v6(Some(&l.key.etcd_key(&prefix))),
                            previous.and_then(|k| k.ipv6),
                            &lost_v6,
                            &mut rand::rng(),
                        )?),
                    },
                };
                if v6 != l.key.ipv6 {
                    let key = SubnetKey {
                        ipv4: l.key.ipv4,
                        ipv6: v6,
                    };
                    match rename(registry, cfg, &l, key, attrs, ttl).await? {
                        Renamed::Done(own) => return Ok(own),
                        Renamed::Taken => lost_v6.extend(v6),
                        Renamed::Again => {}
                    }
                    continue;
                }
                if l.lease_id != 0 && registry.renew(l.lease_id).await?.is_none() {
                    // Expired between list and renew; its key is gone or going: choose again.
                    previous = Some(l.key);
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
                let v6 = v6cfg
                    .map(|c| {
                        alloc::choose_v6(
                            c,
                            &table.occupied_v6(None),
                            previous.and_then(|k| k.ipv6),
                            &lost_v6,
                            &mut rand::rng(),
                        )
                    })
                    .transpose()?;
                let key = SubnetKey {
                    ipv4: subnet,
                    ipv6: v6,
                };
                let won = match registry.create_lease(&key, attrs, ttl).await? {
                    CreateOutcome::Created { lease_id } => {
                        match race(registry, cfg, &key, None).await? {
                            Race::Won => {
                                return Ok(OwnLease {
                                    key,
                                    lease_id,
                                    reused: false,
                                })
                            }
                            Race::Lost { mod_revision } => {
                                // Ours is the younger claim: every reader ignores it; remove it.
                                registry.delete_lease(&key, mod_revision).await?;
                                release(registry, lease_id).await;
                                false
                            }
                            Race::Gone => {
                                release(registry, lease_id).await;
                                false
                            }
                        }
                    }
                    CreateOutcome::Taken => false,
                };
                if !won {
                    tracing::info!(%key, "subnet taken by another node first; choosing another");
                    lost.insert(subnet);
                    lost_v6.extend(v6);
                    previous = previous.filter(|p| p.ipv4 != subnet).map(|p| SubnetKey {
                        ipv4: p.ipv4,
                        ipv6: p.ipv6.filter(|p6| Some(*p6) != v6),
                    });
                }
            }
        }
    }
    Err(SubnetError::Contended {
        attempts: MAX_RACE_RETRIES,
    })
}

/// Removes the keys a rename cut short left beside our lease `own` (an etcd error, or the agent
/// killed, after its new key was created): the same IPv4 subnet under our PublicIP. Younger than
/// `own`, every reader skips them as overlaps, and a new rename would lose its race to them every
/// time (until their TTL, or for good when the rename was of a reservation). True when there was
/// one: the caller lists again.
async fn remove_leftovers(
    registry: &Registry,
    listing: &[RawLease],
    own: &Lease,
) -> Result<bool, SubnetError> {
    let prefix = registry.prefix();
    let mut found = false;
    for raw in listing {
        let Some(Ok(key)) = SubnetKey::from_etcd_key(prefix, &raw.key) else {
            continue;
        };
        if key.ipv4 != own.key.ipv4
            || key == own.key
            || holder_of(&raw.value) != Ok(own.attrs.public_ip)
        {
            continue;
        }
        found = true;
        if registry.delete_lease(&key, raw.mod_revision).await? {
            tracing::info!(%key, lease = %own.key, "removed the key of an unfinished rename");
        }
    }
    Ok(found)
}

/// Whether a key we just created holds its subnets. Create-if-absent guards one key name only,
/// and with dual-stack keys two names can claim one subnet (`10.244.3.0-24` and
/// `10.244.3.0-24&fd00::-64`, or two IPv6 halves in one key each): the older claim wins, as
/// every reader's lease table decides.
enum Race {
    Won,
    Lost {
        mod_revision: i64,
    },
    /// Our key vanished meanwhile (expired, or deleted by an operator).
    Gone,
}

/// `replacing`: our own older key that the new one renames, which is no rival.
async fn race(
    registry: &Registry,
    cfg: &NetworkConfig,
    key: &SubnetKey,
    replacing: Option<&str>,
) -> Result<Race, SubnetError> {
    let snap = registry.list_leases().await?;
    let k = key.etcd_key(registry.prefix());
    let Some(ours) = snap.leases.iter().find(|l| l.key == k) else {
        return Ok(Race::Gone);
    };
    let mut table = LeaseTable::new(registry.prefix(), cfg.network, cfg.subnet_len)
        .with_ipv6_subnet_len(cfg.ipv6.as_ref().map(|c| c.subnet_len));
    table.resync(&snap.leases);
    let beaten = older_claim(&snap.leases, ours, replacing, |l| {
        table.blocks(l, key.ipv4, key.ipv6)
    });
    Ok(if beaten {
        Race::Lost {
            mod_revision: ours.mod_revision,
        }
    } else {
        Race::Won
    })
}

/// Whether a key of `listing` older than `ours` (but `except`) claims a subnet of it, as
/// `blocks` tells from the etcd key: the older claim wins, as in every reader's lease table.
fn older_claim(
    listing: &[RawLease],
    ours: &RawLease,
    except: Option<&str>,
    blocks: impl Fn(&str) -> bool,
) -> bool {
    listing.iter().any(|l| {
        l.key != ours.key
            && Some(l.key.as_str()) != except
            && (l.create_revision, &l.key) < (ours.create_revision, &ours.key)
            && blocks(&l.key)
    })
}

/// Revokes a TTL lease granted for a key we gave up, rather than leave it to its TTL (24 hours
/// by default). Best effort: an orphan lease holds nothing and expires anyway.
async fn release(registry: &Registry, lease_id: i64) {
    if let Err(e) = registry.revoke(lease_id).await {
        tracing::debug!(lease_id, error = %e, "could not revoke an unused lease; it will expire");
    }
}

enum Renamed {
    Done(OwnLease),
    /// The new key is taken, or lost its race: its IPv6 half is another node's.
    Taken,
    /// Our old key changed since it was read and still stands: decide again on a fresh listing.
    Again,
}

/// Moves our lease `old` to `key`, the same IPv4 subnet with another IPv6 half (or none): the
/// key's name holds both, so the value cannot just be rewritten. The new key is created first
/// and the old one deleted after, so the IPv4 subnet is never free in between. An operator's
/// reservation (no TTL) stays a reservation.
async fn rename(
    registry: &Registry,
    cfg: &NetworkConfig,
    old: &Lease,
    key: SubnetKey,
    attrs: &LeaseAttrs,
    ttl: Duration,
) -> Result<Renamed, SubnetError> {
    let CreateOutcome::Created { mut lease_id } = registry.create_lease(&key, attrs, ttl).await?
    else {
        return Ok(Renamed::Taken);
    };
    let old_key = old.key.etcd_key(registry.prefix());
    match race(registry, cfg, &key, Some(&old_key)).await? {
        Race::Won => {}
        Race::Lost { mod_revision } => {
            registry.delete_lease(&key, mod_revision).await?;
            release(registry, lease_id).await;
            return Ok(Renamed::Taken);
        }
        Race::Gone => {
            release(registry, lease_id).await;
            return Ok(Renamed::Taken);
        }
    }
    if old.lease_id == 0
        && matches!(
            registry.reserve(&key, attrs.public_ip.into()).await?,
            ReserveOutcome::Reserved { .. }
        )
    {
        // The key no longer hangs on the TTL lease we were granted.
        release(registry, lease_id).await;
        lease_id = 0;
    }
    let deleted = registry.delete_lease(&old.key, old.mod_revision).await?;
    let k = key.etcd_key(registry.prefix());
    let snap = registry.list_leases().await?;
    let now = snap.leases.iter().find(|l| l.key == k);
    if !deleted && snap.leases.iter().any(|l| l.key == old_key) {
        // Rewritten since we read it (an operator's reserve or unreserve, say): older, it keeps
        // the IPv4 subnet and every reader skips the new key. (Gone instead, expired, the new
        // key stands alone and is kept.)
        tracing::warn!(old = %old.key, "the lease's old key changed meanwhile; renaming again");
        if let Some(now) = now {
            registry.delete_lease(&key, now.mod_revision).await?;
        }
        if lease_id != 0 {
            release(registry, lease_id).await;
        }
        return Ok(Renamed::Again);
    }
    // Watchers skipped the new key as an overlap while the old one (older, same IPv4 subnet)
    // stood. This tweed's lease table reads it again when the old key goes (an update: the route
    // is kept), so a crash before this line loses nothing; the rewrite is for older readers.
    if let Some(now) = now {
        registry
            .update_lease(&key, attrs, now.lease_id, now.mod_revision)
            .await?;
    }
    tracing::info!(old = %old.key, new = %key, "lease renamed: its IPv6 half changed");
    Ok(Renamed::Done(OwnLease {
        key,
        lease_id,
        reused: true,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{MemOp, MemRegistry};

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
        acquire(reg, &cfg(), &attrs(ip), prev.map(SubnetKey::new), ttl)
            .await
            .unwrap()
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
        let got = acquire(
            &reg,
            &cfg(),
            &attrs("198.18.0.1"),
            Some(SubnetKey::new(prev)),
            TTL,
        )
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
        let other = acquire(
            &reg,
            &cfg(),
            &attrs("198.18.0.5"),
            Some(SubnetKey::new(reserved)),
            TTL,
        )
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

    /// A dual-stack network whose IPv6 half holds three node subnets (fd00:10:244:1::/64 to
    /// :3::/64; the first is skipped as always).
    fn dual_cfg() -> NetworkConfig {
        NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.0","SubnetMax":"10.244.40.0",
                "EnableIPv6":true,"IPv6Network":"fd00:10:244::/62","IPv6SubnetLen":64}"#,
        )
        .unwrap()
    }

    fn dual_attrs(ip: &str, ip6: &str) -> LeaseAttrs {
        let mut a = attrs(ip);
        a.public_ipv6 = Some(ip6.parse().unwrap());
        a
    }

    /// The newest TTL lease still granted in the in-memory store behind `reg` (0: none).
    fn mem_leases(reg: &Registry) -> i64 {
        let Registry::Mem(mem) = reg else {
            unreachable!("the tests use the in-memory registry")
        };
        (1..=64)
            .filter(|id| mem.lease_alive(*id))
            .max()
            .unwrap_or(0)
    }

    /// Every key under subnets/, as the part after the directory.
    async fn keys(reg: &Registry) -> Vec<String> {
        let dir = format!("{P}/subnets/");
        let mut k: Vec<String> = reg
            .list_leases()
            .await
            .unwrap()
            .leases
            .iter()
            .map(|l| l.key.strip_prefix(&dir).unwrap().to_string())
            .collect();
        k.sort();
        k
    }

    #[tokio::test]
    async fn a_dual_stack_node_writes_one_key_with_both_subnets_in_flannels_form() {
        let (_, reg) = mem_registry();
        let a = dual_attrs("198.18.0.1", "2001:db8::1");
        let own = acquire(&reg, &dual_cfg(), &a, None, TTL).await.unwrap();
        let v6 = own.key.ipv6.expect("a dual-stack lease");
        assert!(dual_cfg().ipv6.unwrap().is_allocatable(v6));
        let snap = reg.list_leases().await.unwrap();
        assert_eq!(snap.leases.len(), 1);
        let name = &snap.leases[0].key;
        assert_eq!(
            name,
            &format!("{P}/subnets/{}-{}&{}-64", own.subnet().ip(), 24, v6.ip())
        );
        let value = String::from_utf8_lossy(&snap.leases[0].value).into_owned();
        assert!(value.contains(r#""PublicIPv6":"2001:db8::1""#), "{value}");
        // Restarted: the same key, both halves, no write.
        let again = acquire(&reg, &dual_cfg(), &a, None, TTL).await.unwrap();
        assert_eq!((again.key, again.reused), (own.key, true));
        assert_eq!(reg.list_leases().await.unwrap().revision, snap.revision);
        // Without a PublicIPv6 the same network gives an IPv4-only lease.
        let v4 = acquire(&reg, &dual_cfg(), &attrs("198.18.0.2"), None, TTL)
            .await
            .unwrap();
        assert_eq!(v4.key.ipv6, None);
    }

    #[tokio::test]
    async fn every_key_form_blocks_its_ipv6_subnet() {
        let (mem, reg) = mem_registry();
        let v = br#"{"PublicIP":"198.18.0.50","PublicIPv6":"2001:db8::50"}"#;
        // A flannel dual-stack lease, a tweed IPv6-only lease, and a v4-only one.
        mem.put_raw(&format!("{P}/subnets/10.244.2.0-24&fd00:10:244:1::-64"), v);
        mem.put_raw(&format!("{P}/subnets/fd00:10:244:2::-64"), v);
        mem.put_raw(&format!("{P}/subnets/10.244.3.0-24"), v);
        let own = acquire(
            &reg,
            &dual_cfg(),
            &dual_attrs("198.18.0.1", "2001:db8::1"),
            Some(SubnetKey {
                ipv4: "10.244.9.0/24".parse().unwrap(),
                // Asked back, but a flannel node holds it now.
                ipv6: Some("fd00:10:244:1::/64".parse().unwrap()),
            }),
            TTL,
        )
        .await
        .unwrap();
        assert_eq!(own.key.to_string(), "10.244.9.0-24&fd00:10:244:3::-64");
        // Every IPv6 subnet is held now: the next dual-stack node is told so, naming the network.
        let err = acquire(
            &reg,
            &dual_cfg(),
            &dual_attrs("198.18.0.2", "2001:db8::2"),
            None,
            TTL,
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("fd00:10:244::/62"), "{err}");
    }

    #[tokio::test]
    async fn concurrent_dual_stack_agents_get_distinct_halves() {
        let mem = MemRegistry::new(P);
        let cfg = NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/120",
                "IPv6SubnetLen":124}"#,
        )
        .unwrap();
        let mut tasks = Vec::new();
        for i in 0..15 {
            let (reg, cfg) = (Registry::Mem(mem.clone()), cfg.clone());
            tasks.push(tokio::spawn(async move {
                let a = dual_attrs(&format!("198.18.0.{}", i + 1), &format!("2001:db8::{i}"));
                acquire(&reg, &cfg, &a, None, TTL).await.unwrap().key
            }));
        }
        let (mut v4, mut v6) = (HashSet::new(), HashSet::new());
        for t in tasks {
            let k = t.await.unwrap();
            assert!(v4.insert(k.ipv4) && v6.insert(k.ipv6.unwrap()), "{k}");
        }
        // 15 of the 15 /124s past the first: all taken, each once.
        assert_eq!(v6.len(), 15);
    }

    #[tokio::test]
    async fn a_younger_key_claiming_an_older_keys_subnet_loses_and_is_removed() {
        let (mem, reg) = mem_registry();
        let cfg = dual_cfg();
        // Another node's key names the same IPv4 subnet under another IPv6 half: created first,
        // it wins, though create-if-absent let both names in.
        mem.put_raw(
            &format!("{P}/subnets/10.244.7.0-24&fd00:10:244:1::-64"),
            br#"{"PublicIP":"198.18.0.9","PublicIPv6":"2001:db8::9"}"#,
        );
        let ours = SubnetKey {
            ipv4: "10.244.7.0/24".parse().unwrap(),
            ipv6: Some("fd00:10:244:2::/64".parse().unwrap()),
        };
        let a = dual_attrs("198.18.0.1", "2001:db8::1");
        reg.create_lease(&ours, &a, TTL).await.unwrap();
        let Race::Lost { mod_revision } = race(&reg, &cfg, &ours, None).await.unwrap() else {
            panic!("the older key wins");
        };
        assert!(reg.delete_lease(&ours, mod_revision).await.unwrap());
        // An IPv6 half held by an older IPv6-only key loses the same way.
        mem.put_raw(&format!("{P}/subnets/fd00:10:244:3::-64"), b"{}");
        let mine = SubnetKey {
            ipv4: "10.244.8.0/24".parse().unwrap(),
            ipv6: Some("fd00:10:244:3::/64".parse().unwrap()),
        };
        reg.create_lease(&mine, &a, TTL).await.unwrap();
        assert!(matches!(
            race(&reg, &cfg, &mine, None).await.unwrap(),
            Race::Lost { .. }
        ));
        // A key around the whole network blocks nobody (every reader skips it), older or not.
        let free = SubnetKey {
            ipv4: "10.244.9.0/24".parse().unwrap(),
            ipv6: None,
        };
        mem.put_raw(
            &format!("{P}/subnets/10.0.0.0-8"),
            br#"{"PublicIP":"198.18.0.3"}"#,
        );
        reg.create_lease(&free, &a, TTL).await.unwrap();
        assert!(matches!(
            race(&reg, &cfg, &free, None).await.unwrap(),
            Race::Won
        ));
    }

    #[tokio::test]
    async fn a_lease_whose_ipv6_half_changed_is_renamed_keeping_its_ipv4_subnet() {
        let (_, reg) = mem_registry();
        // Leased while the network (or the node) was IPv4 only.
        let first = acquire_as(&reg, "198.18.0.1", None, TTL).await;
        assert_eq!(first.key.ipv6, None);
        // A peer's lease table, following the watch through the rename.
        let snap = reg.list_leases().await.unwrap();
        let mut peer = LeaseTable::new(P, cfg().network, 24);
        peer.resync(&snap.leases);
        let mut watch = reg.watch(snap.revision + 1).await.unwrap();
        let dual = dual_attrs("198.18.0.1", "2001:db8::1");
        let second = acquire(&reg, &dual_cfg(), &dual, None, TTL).await.unwrap();
        assert_eq!(second.subnet(), first.subnet());
        assert!(second.key.ipv6.is_some());
        assert_eq!(
            keys(&reg).await,
            vec![second.key.to_string()],
            "the old key is gone"
        );
        peer.apply(&watch.next().await.unwrap());
        assert_eq!(
            peer.leases().map(|l| l.key).collect::<Vec<_>>(),
            vec![second.key],
            "the peer sees the new key, not an overlap skipped for good"
        );
        // The node lost its IPv6 address: back to an IPv4-only key, same IPv4 subnet.
        let third = acquire(&reg, &dual_cfg(), &attrs("198.18.0.1"), None, TTL)
            .await
            .unwrap();
        assert_eq!(third.key, first.key);
        assert_eq!(keys(&reg).await, vec![first.key.to_string()]);
    }

    #[tokio::test]
    async fn a_rename_cut_short_leaves_a_key_that_the_next_start_removes() {
        for reserved in [false, true] {
            let (mem, reg) = mem_registry();
            let v4: Ipv4Network = "10.244.9.0/24".parse().unwrap();
            if reserved {
                reg.reserve(&SubnetKey::new(v4), "198.18.0.1".parse().unwrap())
                    .await
                    .unwrap();
            } else {
                acquire_as(&reg, "198.18.0.1", Some(v4), TTL).await;
            }
            let dual = dual_attrs("198.18.0.1", "2001:db8::1");
            // Killed after the new key was created and checked, before the old one was deleted.
            mem.panic_next(MemOp::Delete);
            let (r, d) = (Registry::Mem(mem.clone()), dual.clone());
            let killed = tokio::spawn(async move { acquire(&r, &dual_cfg(), &d, None, TTL).await });
            assert!(killed.await.is_err(), "the injected kill");
            let left = keys(&reg).await;
            assert_eq!(left.len(), 2, "the old key and the new one: {left:?}");
            // The next start removes the leftover and renames the lease once more.
            let back = acquire(&reg, &dual_cfg(), &dual, None, TTL).await.unwrap();
            assert_eq!(back.subnet(), v4);
            assert!(back.key.ipv6.is_some());
            assert_eq!(back.lease_id == 0, reserved);
            assert_eq!(keys(&reg).await, vec![back.key.to_string()]);
        }
    }

    #[tokio::test]
    async fn a_rename_whose_old_key_changed_meanwhile_removes_its_new_key() {
        let (_, reg) = mem_registry();
        let first = acquire_as(&reg, "198.18.0.1", None, TTL).await;
        let mut table = LeaseTable::new(P, cfg().network, 24);
        table.resync(&reg.list_leases().await.unwrap().leases);
        let old = table.get(&first.key).unwrap().clone();
        // An operator reserves the subnet after the agent read the lease: the old key is
        // rewritten, and the agent's compare-and-delete of it fails.
        reg.reserve(&first.key, "198.18.0.1".parse().unwrap())
            .await
            .unwrap();
        let dual = dual_attrs("198.18.0.1", "2001:db8::1");
        let new = SubnetKey {
            ipv4: first.subnet(),
            ipv6: Some("fd00:10:244:2::/64".parse().unwrap()),
        };
        let r = rename(&reg, &dual_cfg(), &old, new, &dual, TTL)
            .await
            .unwrap();
        assert!(matches!(r, Renamed::Again));
        assert_eq!(
            mem_leases(&reg),
            first.lease_id,
            "the new key's lease is revoked"
        );
        assert_eq!(
            keys(&reg).await,
            vec![first.key.to_string()],
            "the new key is removed; the old one stands"
        );
        // Deciding again on what the old key holds now: renamed, and still a reservation.
        let own = acquire(&reg, &dual_cfg(), &dual, None, TTL).await.unwrap();
        assert_eq!((own.subnet(), own.lease_id), (first.subnet(), 0));
        assert!(own.key.ipv6.is_some());
        assert_eq!(keys(&reg).await, vec![own.key.to_string()]);
    }

    #[tokio::test]
    async fn a_kept_lease_whose_ipv6_half_lost_to_an_older_key_is_renamed() {
        let (mem, reg) = mem_registry();
        let other = "10.244.2.0-24&fd00:10:244:1::-64";
        mem.put_raw(
            &format!("{P}/subnets/{other}"),
            br#"{"PublicIP":"198.18.0.9","PublicIPv6":"2001:db8::9"}"#,
        );
        // Ours claimed the same IPv6 half later and lost its race, but the agent stopped before
        // removing it: the restart must not keep that half.
        let ours = SubnetKey {
            ipv4: "10.244.7.0/24".parse().unwrap(),
            ipv6: Some("fd00:10:244:1::/64".parse().unwrap()),
        };
        let dual = dual_attrs("198.18.0.1", "2001:db8::1");
        reg.create_lease(&ours, &dual, TTL).await.unwrap();
        let own = acquire(&reg, &dual_cfg(), &dual, Some(ours), TTL)
            .await
            .unwrap();
        assert_eq!(own.subnet(), ours.ipv4, "the IPv4 half is ours and kept");
        assert!(
            own.key.ipv6.is_some() && own.key.ipv6 != ours.ipv6,
            "{}",
            own.key
        );
        assert_eq!(
            keys(&reg).await,
            vec![other.to_string(), own.key.to_string()]
        );
        // Restarted once more: kept as it is now.
        let again = acquire(&reg, &dual_cfg(), &dual, Some(own.key), TTL)
            .await
            .unwrap();
        assert_eq!((again.key, again.reused), (own.key, true));
    }

    #[tokio::test]
    async fn a_reservation_keeps_its_ipv6_half_and_stays_reserved_when_renamed() {
        let (_, reg) = mem_registry();
        let dual = dual_attrs("198.18.0.77", "2001:db8::77");
        // Reserved while IPv4 only: taking the IPv6 half keeps it a reservation.
        let reserved = SubnetKey::new("10.244.9.0/24".parse().unwrap());
        reg.reserve(&reserved, "198.18.0.77".parse().unwrap())
            .await
            .unwrap();
        let own = acquire(&reg, &dual_cfg(), &dual, None, TTL).await.unwrap();
        assert_eq!(own.subnet(), reserved.ipv4);
        assert!(own.key.ipv6.is_some());
        assert_eq!(own.lease_id, 0, "still without a TTL");
        assert_eq!(
            mem_leases(&reg),
            0,
            "the lease granted for the new key is revoked"
        );
        let snap = reg.list_leases().await.unwrap();
        assert_eq!(snap.leases.len(), 1);
        assert_eq!(snap.leases[0].lease_id, 0);
        assert_eq!(LeaseAttrs::parse(&snap.leases[0].value).unwrap(), dual);
        // Expired and re-taken later: both halves asked back and given.
        let (mem2, reg2) = mem_registry();
        let a = acquire(&reg2, &dual_cfg(), &dual, None, TTL).await.unwrap();
        mem2.expire_lease(a.lease_id);
        let b = acquire(&reg2, &dual_cfg(), &dual, Some(a.key), TTL)
            .await
            .unwrap();
        assert_eq!(b.key, a.key);
        assert_ne!(b.lease_id, a.lease_id);
    }
}
