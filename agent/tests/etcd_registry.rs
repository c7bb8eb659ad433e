//! The etcd registry and the subnet manager against a real etcd (Debian's etcd-server), started by
//! each test on free ports in its own data dir. No root needed.

use ipnetwork::Ipv4Network;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tweed_agent::registry::{EtcdOptions, EtcdRegistry, Registry, RegistryError, WatchEvent};
use tweed_agent::subnet::{acquire, renew_interval, OwnLease};
use tweed_config::{LeaseAttrs, NetworkConfig, SubnetKey};
use tweed_lab::etcd::{etcdctl, EtcdProcess};

const P: &str = "/coreos.com/network";

struct Env {
    _dir: tempfile::TempDir,
    etcd: EtcdProcess,
}

impl Env {
    fn start() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let etcd =
            EtcdProcess::start_local(dir.path()).expect("start etcd (apt-get install etcd-server)");
        Env { _dir: dir, etcd }
    }

    /// An etcd and one registry client on it: what most tests start from.
    async fn with_registry() -> (Env, Registry) {
        let env = Env::start();
        let reg = env.registry().await;
        (env, reg)
    }

    async fn registry(&self) -> Registry {
        Registry::etcd(
            EtcdRegistry::connect(EtcdOptions {
                endpoints: self.etcd.endpoints(),
                prefix: P.into(),
                request_timeout: Duration::from_secs(5),
                ..Default::default()
            })
            .await
            .unwrap(),
        )
    }

    fn ctl(&self, args: &[&str]) -> String {
        etcdctl(None, &self.etcd.endpoints(), args).unwrap()
    }
}

fn cfg() -> NetworkConfig {
    NetworkConfig::parse(
        r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.0","SubnetMax":"10.244.100.0"}"#,
    )
    .unwrap()
}

fn attrs(i: u32) -> LeaseAttrs {
    LeaseAttrs::new(
        format!("198.18.0.{i}").parse().unwrap(),
        "vxlan",
        Some(&serde_json::json!({"VNI":1,"VtepMAC":format!("aa:bb:cc:dd:ee:{i:02x}")})),
    )
}

/// Node `i` (public IP 198.18.0.i) takes a lease in [`cfg`], preferring `previous`.
async fn node(reg: &Registry, i: u32, previous: Option<Ipv4Network>, ttl: Duration) -> OwnLease {
    acquire(reg, &cfg(), &attrs(i), previous.map(SubnetKey::new), ttl)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_agents_get_twenty_distinct_subnets() {
    let env = Env::start();
    // One client per agent, as 20 nodes would have.
    let mut regs = Vec::new();
    for _ in 0..20 {
        regs.push(Arc::new(env.registry().await));
    }
    let tasks: Vec<_> = regs
        .into_iter()
        .enumerate()
        .map(|(i, reg)| {
            tokio::spawn(async move {
                // All start from the same previous subnet to force creation races.
                node(
                    &reg,
                    i as u32 + 1,
                    Some("10.244.7.0/24".parse().unwrap()),
                    Duration::from_secs(60),
                )
                .await
            })
        })
        .collect();
    let mut subnets = HashSet::new();
    for t in tasks {
        assert!(subnets.insert(t.await.unwrap().subnet()));
    }
    assert_eq!(subnets.len(), 20);
    let listed = env.ctl(&["get", "--prefix", "--keys-only", &format!("{P}/subnets/")]);
    assert_eq!(listed.lines().filter(|l| !l.is_empty()).count(), 20);
}

/// Dual-stack agents asking for distinct IPv4 subnets but the same IPv6 one: their keys have
/// different names, so etcd's create-if-absent lets every one in, and only the re-check after
/// creating (older claim wins, the younger deletes its key) keeps the IPv6 halves distinct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_dual_stack_agents_never_share_an_ipv6_subnet() {
    let env = Env::start();
    let cfg = NetworkConfig::parse(
        r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/60","IPv6SubnetLen":64}"#,
    )
    .unwrap();
    let mut regs = Vec::new();
    for _ in 0..12 {
        regs.push(Arc::new(env.registry().await));
    }
    let tasks: Vec<_> = regs
        .into_iter()
        .enumerate()
        .map(|(i, reg)| {
            let cfg = cfg.clone();
            tokio::spawn(async move {
                let mut a = attrs(i as u32 + 1);
                a.public_ipv6 = Some(format!("2001:db8::{}", i + 1).parse().unwrap());
                let previous = SubnetKey {
                    ipv4: format!("10.244.{}.0/24", i + 10).parse().unwrap(),
                    ipv6: Some("fd00:10:244:5::/64".parse().unwrap()),
                };
                acquire(&reg, &cfg, &a, Some(previous), Duration::from_secs(60))
                    .await
                    .unwrap()
                    .key
            })
        })
        .collect();
    let (mut v4, mut v6) = (HashSet::new(), HashSet::new());
    for t in tasks {
        let k = t.await.unwrap();
        assert!(v4.insert(k.ipv4), "{k}");
        assert!(v6.insert(k.ipv6.expect("dual stack")), "{k}");
    }
    assert!(v6.contains(&"fd00:10:244:5::/64".parse().unwrap()));
    // The losers' keys are gone: one key per node.
    let listed = env.ctl(&["get", "--prefix", "--keys-only", &format!("{P}/subnets/")]);
    assert_eq!(
        listed.lines().filter(|l| !l.is_empty()).count(),
        12,
        "{listed}"
    );
}

#[tokio::test]
async fn the_lease_is_written_in_flannels_exact_format_with_a_ttl() {
    let (env, reg) = Env::with_registry().await;
    let own = node(&reg, 3, None, Duration::from_secs(120)).await;
    let key = own.key.etcd_key(P);
    let out = env.ctl(&["get", &key, "--print-value-only"]);
    assert_eq!(
        out.trim(),
        r#"{"PublicIP":"198.18.0.3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:03"}}"#
    );
    let ttl = env.ctl(&["lease", "timetolive", &format!("{:x}", own.lease_id)]);
    assert!(ttl.contains("granted with TTL(120s)"), "{ttl}");
}

#[tokio::test]
async fn ttl_expiry_frees_the_subnet_and_renewal_keeps_it() {
    let (_env, reg) = Env::with_registry().await;
    let ttl = Duration::from_secs(2);
    let lapsed = node(&reg, 1, None, ttl).await;
    let kept = node(&reg, 2, None, ttl).await;
    let interval = renew_interval(ttl, Duration::from_secs(3600));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        assert!(
            reg.renew(kept.lease_id).await.unwrap().is_some(),
            "renewal failed"
        );
        tokio::time::sleep(interval).await;
    }
    let snap = reg.list_leases().await.unwrap();
    let keys: Vec<_> = snap.leases.iter().map(|l| l.key.clone()).collect();
    assert_eq!(
        keys,
        vec![kept.key.etcd_key(P)],
        "only the renewed lease survives"
    );
    assert_eq!(reg.renew(lapsed.lease_id).await.unwrap(), None);
    // The freed subnet can be taken by another node.
    let other = node(&reg, 9, Some(lapsed.subnet()), ttl).await;
    assert_eq!(other.subnet(), lapsed.subnet());
}

#[tokio::test]
async fn revoke_drops_the_lease_with_its_key_and_a_second_revoke_is_no_error() {
    let (_env, reg) = Env::with_registry().await;
    let own = node(&reg, 1, None, Duration::from_secs(60)).await;
    reg.revoke(own.lease_id).await.unwrap();
    assert_eq!(reg.renew(own.lease_id).await.unwrap(), None);
    assert!(reg.list_leases().await.unwrap().leases.is_empty());
    reg.revoke(own.lease_id).await.unwrap();
}

#[tokio::test]
async fn reacquire_after_an_operator_deletes_the_lease() {
    let (env, reg) = Env::with_registry().await;
    let ttl = Duration::from_secs(60);
    let first = node(&reg, 1, None, ttl).await;
    env.ctl(&["del", &first.key.etcd_key(P)]);
    let again = node(&reg, 1, Some(first.subnet()), ttl).await;
    assert_eq!(again.subnet(), first.subnet());
    assert!(!again.reused);
    // Restart with the lease in place: reused, no new write.
    let rev = reg.list_leases().await.unwrap().revision;
    let third = node(&reg, 1, None, ttl).await;
    assert!(third.reused && third.key == again.key);
    assert_eq!(reg.list_leases().await.unwrap().revision, rev);
}

#[tokio::test]
async fn watch_sees_puts_and_deletes_and_reports_compaction() {
    let (env, reg) = Env::with_registry().await;
    let snap = reg.list_leases().await.unwrap();
    let mut w = reg.watch(snap.revision + 1).await.unwrap();
    let key = SubnetKey::new("10.244.9.0/24".parse().unwrap()).etcd_key(P);
    env.ctl(&["put", &key, r#"{"PublicIP":"198.18.0.9"}"#]);
    env.ctl(&["del", &key]);
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen.extend(
            tokio::time::timeout(Duration::from_secs(5), w.next())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert!(
        matches!(&seen[0], WatchEvent::Put(l) if l.key == key && l.value == br#"{"PublicIP":"198.18.0.9"}"#)
    );
    assert!(matches!(&seen[1], WatchEvent::Delete { key: k, .. } if *k == key));
    // Compact past the watch start: the next watch from the old revision must say so.
    for i in 0..3 {
        env.ctl(&[
            "put",
            &format!("{P}/subnets/10.244.{}.0-24", 20 + i),
            r#"{"PublicIP":"198.18.0.1"}"#,
        ]);
    }
    let rev = reg.list_leases().await.unwrap().revision;
    env.ctl(&["compact", &rev.to_string()]);
    let mut old = reg.watch(snap.revision + 1).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), old.next())
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, RegistryError::Compacted { .. }), "{err}");
}

#[tokio::test]
async fn config_is_read_verbatim() {
    let (env, reg) = Env::with_registry().await;
    assert_eq!(reg.get_config().await.unwrap(), None);
    let json = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
    env.ctl(&["put", &format!("{P}/config"), json]);
    assert_eq!(reg.get_config().await.unwrap().as_deref(), Some(json));
}

/// Issue 6: a reservation is a key without an etcd lease (flannel's layout), made and undone with
/// guarded transactions.
#[tokio::test]
async fn reserve_detaches_the_ttl_and_unreserve_attaches_a_fresh_one() {
    use tweed_agent::registry::{ReserveOutcome, UnreserveOutcome};
    let (env, reg) = Env::with_registry().await;
    let ttl = Duration::from_secs(2);
    // A held lease, pinned by its own IP: the old TTL lapses, the key stays.
    let own = node(&reg, 1, None, ttl).await;
    let key = own.key.etcd_key(P);
    assert_eq!(
        reg.reserve(&own.key, "198.18.0.2".parse().unwrap())
            .await
            .unwrap(),
        ReserveOutcome::HeldBy("198.18.0.1".into())
    );
    assert_eq!(
        reg.reserve(&own.key, attrs(1).public_ip.into())
            .await
            .unwrap(),
        ReserveOutcome::Reserved { created: false }
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let snap = reg.list_leases().await.unwrap();
    let l = snap.leases.iter().find(|l| l.key == key).expect("kept");
    assert_eq!(l.lease_id, 0);
    assert_eq!(LeaseAttrs::parse(&l.value).unwrap(), attrs(1));

    // A free subnet reserved for a new IP: flannel's exact value, no lease.
    let free = SubnetKey::new("10.244.77.0/24".parse().unwrap());
    assert_eq!(
        reg.reserve(&free, "198.18.0.77".parse().unwrap())
            .await
            .unwrap(),
        ReserveOutcome::Reserved { created: true }
    );
    let fk = free.etcd_key(P);
    assert_eq!(
        env.ctl(&["get", &fk, "--print-value-only"]).trim(),
        r#"{"PublicIP":"198.18.0.77"}"#
    );
    assert!(env
        .ctl(&["get", &fk, "-w", "json"])
        .find("\"lease\"")
        .is_none());

    // Unreserved, it has a TTL and lapses unless renewed.
    let UnreserveOutcome::Released { lease_id } = reg.unreserve(&free, ttl).await.unwrap() else {
        panic!("not released")
    };
    let out = env.ctl(&["lease", "timetolive", &format!("{lease_id:x}"), "--keys"]);
    assert!(
        out.contains("granted with TTL(2s)") && out.contains(&fk),
        "{out}"
    );
    assert_eq!(
        reg.unreserve(&free, ttl).await.unwrap(),
        UnreserveOutcome::NotReserved { lease_id }
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(env
        .ctl(&["get", &fk, "--print-value-only"])
        .trim()
        .is_empty());
    assert_eq!(
        reg.unreserve(&free, ttl).await.unwrap(),
        UnreserveOutcome::NotFound
    );
}

/// A redial (after the node's address moved) replaces the connection; requests go on.
#[tokio::test]
async fn redial_replaces_the_connection_and_requests_go_on() {
    let (_env, reg) = Env::with_registry().await;
    let own = node(&reg, 1, None, Duration::from_secs(30)).await;
    reg.redial().await.unwrap();
    let snap = reg.list_leases().await.unwrap();
    assert!(snap.leases.iter().any(|l| l.key == own.key.etcd_key(P)));
    assert!(reg.renew(own.lease_id).await.unwrap().is_some());
}

/// Issue 19: an IPv6-only key is reserved for a `PublicIPv6` in real etcd: a node's TTL key is
/// held by its `PublicIPv6` (not by the PublicIP 0.0.0.0 of every IPv6-only value), detached
/// by it, and unreserved onto a fresh TTL lease; a free one gets flannel's field set.
#[tokio::test]
async fn an_ipv6_only_key_is_reserved_for_its_public_ipv6_and_unreserved() {
    use tweed_agent::registry::{CreateOutcome, ReserveOutcome, UnreserveOutcome};
    let (env, reg) = Env::with_registry().await;
    let ttl = Duration::from_secs(2);
    let key: tweed_config::LeaseKey = "fd00:10:244:9::-64".parse().unwrap();
    let value = r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198:18::8","BackendType":"host-gw"}"#;
    let attrs = LeaseAttrs::parse(value.as_bytes()).unwrap();
    let CreateOutcome::Created { .. } = reg.create_lease(&key, &attrs, ttl).await.unwrap() else {
        panic!("not created")
    };
    for other in ["fd00:198:18::7", "0.0.0.0"] {
        assert!(
            matches!(
                reg.reserve(&key, other.parse().unwrap()).await.unwrap(),
                ReserveOutcome::HeldBy(_)
            ),
            "{other}"
        );
    }
    assert_eq!(
        reg.reserve(&key, "fd00:198:18::8".parse().unwrap())
            .await
            .unwrap(),
        ReserveOutcome::Reserved { created: false }
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let k = format!("{P}/subnets/fd00:10:244:9::-64");
    assert_eq!(env.ctl(&["get", &k, "--print-value-only"]).trim(), value);
    let UnreserveOutcome::Released { lease_id } = reg.unreserve(&key, ttl).await.unwrap() else {
        panic!("not released")
    };
    let out = env.ctl(&["lease", "timetolive", &format!("{lease_id:x}"), "--keys"]);
    assert!(out.contains(&k), "{out}");

    let free: tweed_config::LeaseKey = "fd00:10:244:a::-64".parse().unwrap();
    assert_eq!(
        reg.reserve(&free, "fd00:198:18::7".parse().unwrap())
            .await
            .unwrap(),
        ReserveOutcome::Reserved { created: true }
    );
    assert_eq!(
        env.ctl(&[
            "get",
            &format!("{P}/subnets/fd00:10:244:a::-64"),
            "--print-value-only"
        ])
        .trim(),
        r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198:18::7"}"#
    );
}

/// A dual-stack lease written by a flannel node (key and value in flannel's exact format) is
/// listed with both halves, its v4 subnet blocks allocation, and a v4-only tweed node reads it
/// without touching it.
#[tokio::test]
async fn a_flannel_dual_stack_lease_is_read_and_avoided_by_a_v4_only_node() {
    let (env, reg) = Env::with_registry().await;
    let key = format!("{P}/subnets/10.244.7.0-24&fd00:10:244:7::-64");
    let value = r#"{"PublicIP":"198.18.0.9","PublicIPv6":"2001:db8::9","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:09"},"BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:0a"}}"#;
    env.ctl(&["put", &key, value]);
    let snap = reg.list_leases().await.unwrap();
    // The watch's table: the same parse and validation the running agent applies.
    let mut table = tweed_agent::watch::LeaseTable::new(P, cfg().network, 24);
    let applied = table.resync(&snap.leases);
    assert!(applied.skipped.is_empty(), "{:?}", applied.skipped);
    let theirs = table
        .leases()
        .find(|l| l.key.ipv4 == "10.244.7.0/24".parse().unwrap())
        .expect("the flannel lease is listed");
    assert_eq!(theirs.key.ipv6, Some("fd00:10:244:7::/64".parse().unwrap()));
    assert_eq!(
        theirs.attrs.public_ipv6,
        Some("2001:db8::9".parse().unwrap())
    );
    assert_eq!(theirs.attrs.to_json(), value);
    assert_eq!(
        theirs.attrs.validate(&theirs.key, cfg().network, 24),
        Ok(())
    );
    // Our previous subnet was the one flannel now holds: we must take another.
    let own = node(
        &reg,
        3,
        Some("10.244.7.0/24".parse().unwrap()),
        Duration::from_secs(60),
    )
    .await;
    assert_ne!(own.subnet(), "10.244.7.0/24".parse().unwrap());
    assert_eq!(own.key.ipv6, None, "a v4-only node writes a v4-only key");
    let out = env.ctl(&["get", &key, "--print-value-only"]);
    assert_eq!(out.trim(), value, "the foreign lease is left untouched");
}

/// A dual-stack tweed node against real etcd: one key in flannel's form holding both halves,
/// its value with `PublicIPv6` and `BackendV6Data` in flannel's field order, read back by a
/// reader written from flannel's documented key format (not tweed's parser); a flannel node's
/// dual-stack key and a tweed IPv6-only key both keep their IPv6 subnets from being taken.
#[tokio::test]
async fn a_dual_stack_lease_is_written_in_flannels_format_and_avoids_every_key_form() {
    let (env, reg) = Env::with_registry().await;
    let cfg = NetworkConfig::parse(
        r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/62","IPv6SubnetLen":64}"#,
    )
    .unwrap();
    // fd00:10:244:1::/64 is flannel's, :2::/64 an IPv6-only tweed node's: :3:: is what is left.
    env.ctl(&[
        "put",
        &format!("{P}/subnets/10.244.7.0-24&fd00:10:244:1::-64"),
        r#"{"PublicIP":"198.18.0.9","PublicIPv6":"2001:db8::9","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:09"},"BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:0a"}}"#,
    ]);
    env.ctl(&[
        "put",
        &format!("{P}/subnets/fd00:10:244:2::-64"),
        r#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::8","BackendType":"vxlan"}"#,
    ]);
    let mut a = attrs(3);
    a.public_ipv6 = Some("2001:db8::3".parse().unwrap());
    a.backend_v6_data = Some(
        serde_json::value::RawValue::from_string(
            r#"{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:03"}"#.into(),
        )
        .unwrap(),
    );
    let own = acquire(&reg, &cfg, &a, None, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(own.key.ipv6, Some("fd00:10:244:3::/64".parse().unwrap()));
    let key = own.key.etcd_key(P);
    let value = env.ctl(&["get", &key, "--print-value-only"]);
    assert_eq!(
        value.trim(),
        r#"{"PublicIP":"198.18.0.3","PublicIPv6":"2001:db8::3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:03"},"BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:03"}}"#
    );
    // flannel's key pattern: dotted IPv4 "-" length, then optionally "&" IPv6 (hex digits and
    // colons) "-" length.
    let flannel =
        regex::Regex::new(r"^(\d+\.\d+\.\d+\.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?$").unwrap();
    let keys = env.ctl(&["get", &format!("{P}/subnets/"), "--prefix", "--keys-only"]);
    let names: Vec<&str> = keys
        .lines()
        .filter_map(|k| k.strip_prefix(&format!("{P}/subnets/")))
        .collect();
    assert_eq!(names.len(), 3, "{keys}");
    let ours = names
        .iter()
        .find_map(|n| flannel.captures(n).filter(|c| &c[1] != "10.244.7.0"))
        .expect("our key matches flannel's pattern");
    assert_eq!(&ours[1], own.subnet().ip().to_string());
    assert_eq!(&ours[2], "24");
    assert_eq!(&ours[3], "fd00:10:244:3::");
    assert_eq!(&ours[4], "64");
    // The IPv6-only key is one flannel's pattern skips.
    assert!(!flannel.is_match("fd00:10:244:2::-64"));
    // Renewed: the key and both halves stay.
    assert!(reg.renew(own.lease_id).await.unwrap().is_some());
    let again = acquire(&reg, &cfg, &a, None, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!((again.key, again.lease_id), (own.key, own.lease_id));
    // The node lost its IPv6 address: the same IPv4 subnet under a v4-only key, the old key
    // deleted (a compare-and-delete on etcd).
    let v4 = acquire(&reg, &cfg, &attrs(3), None, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(v4.key, SubnetKey::new(own.subnet()));
    assert_eq!(env.ctl(&["get", &key, "--print-value-only"]).trim(), "");
}

#[tokio::test]
async fn a_list_of_many_pages_returns_every_lease_and_nothing_outside_the_directory() {
    let env = Env::start();
    let mut kv = etcd_client::Client::connect(env.etcd.endpoints(), None)
        .await
        .unwrap();
    const N: u32 = 2_345;
    let mut want = HashSet::new();
    for i in 0..N {
        let key = format!("{P}/subnets/10.{}.{}.0-24", 1 + i / 256, i % 256);
        kv.put(key.as_str(), format!("{{\"n\":{i}}}"), None)
            .await
            .unwrap();
        want.insert(key);
    }
    // Keys that sort right next to the directory must stay out of it.
    kv.put(format!("{P}/subnets0"), "x", None).await.unwrap();
    kv.put(format!("{P}/config"), "{}", None).await.unwrap();
    let reg = EtcdRegistry::connect(EtcdOptions {
        endpoints: env.etcd.endpoints(),
        prefix: P.into(),
        request_timeout: Duration::from_secs(5),
        ..Default::default()
    })
    .await
    .unwrap();
    let whole = reg.list_leases_paged(i64::MAX).await.unwrap();
    for page in [1_000, 7, 1] {
        let snap = reg.list_leases_paged(page).await.unwrap();
        let got: Vec<_> = snap.leases.iter().map(|l| l.key.clone()).collect();
        assert_eq!(got.len(), N as usize, "page {page}");
        assert_eq!(
            got.iter().cloned().collect::<HashSet<_>>(),
            want,
            "page {page}"
        );
        assert_eq!(snap.revision, whole.revision, "page {page}");
    }
    assert_eq!(reg.list_leases().await.unwrap().leases.len(), N as usize);
}

/// Review finding 4 of issue 19: a rename (the node gained an IPv6 address) cut short at each
/// point, on a real etcd, with a peer's lease table following the watch. Killed after creating
/// the new key: the peer keeps the old one. Killed after deleting the old key, before the
/// rename's rewrite of the new one: the peer reads the new key at once (an update of the same
/// node, never a removal), not only at its next resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rename_cut_short_at_any_point_leaves_a_lease_peers_read() {
    let (_env, reg) = Env::with_registry().await;
    let cfg = NetworkConfig::parse(
        r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}"#,
    )
    .unwrap();
    let ttl = Duration::from_secs(60);
    // First start without an IPv6 address: a v4-only key.
    let old = acquire(&reg, &cfg, &attrs(3), None, ttl).await.unwrap();
    assert_eq!(old.key.ipv6, None);
    let snap = reg.list_leases().await.unwrap();
    let mut peer = tweed_agent::watch::LeaseTable::new(P, cfg.network, 24);
    peer.resync(&snap.leases);
    let mut watch = reg.watch(snap.revision + 1).await.unwrap();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .expect("a watch event")
            .unwrap()
    };
    // The rename's steps, by hand: create the new key (same IPv4 subnet, an IPv6 half) ...
    let mut dual = attrs(3);
    dual.public_ipv6 = Some("2001:db8::3".parse().unwrap());
    let new = SubnetKey {
        ipv4: old.subnet(),
        ipv6: Some("fd00:10:244:3::/64".parse().unwrap()),
    };
    assert!(matches!(
        reg.create_lease(&new, &dual, ttl).await.unwrap(),
        tweed_agent::registry::CreateOutcome::Created { .. }
    ));
    let a = peer.apply(&next().await);
    assert!(a.changes.is_empty(), "{a:?}");
    assert_eq!(
        peer.leases().map(|l| l.key).collect::<Vec<_>>(),
        [old.key],
        "cut here, the old key is the lease"
    );
    // ... then delete the old one, and the agent is killed before it rewrites the new key.
    let rev = snap
        .leases
        .iter()
        .find(|l| l.key == old.key.etcd_key(P))
        .unwrap()
        .mod_revision;
    assert!(reg.delete_lease(&old.key, rev).await.unwrap());
    let a = peer.apply(&next().await);
    assert!(
        matches!(a.changes.as_slice(), [tweed_agent::watch::LeaseChange::Updated { old: o, new: n }]
            if o.key == old.key && n.key == new),
        "{a:?}"
    );
    assert_eq!(peer.leases().map(|l| l.key).collect::<Vec<_>>(), [new]);
    // A resync reads the same.
    let mut fresh = tweed_agent::watch::LeaseTable::new(P, cfg.network, 24);
    fresh.resync(&reg.list_leases().await.unwrap().leases);
    assert_eq!(fresh.leases().map(|l| l.key).collect::<Vec<_>>(), [new]);
    // The next start keeps the new key.
    let back = acquire(&reg, &cfg, &dual, None, ttl).await.unwrap();
    assert_eq!(back.key, new);
}
