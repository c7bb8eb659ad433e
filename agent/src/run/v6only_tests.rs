//! The IPv6-only loop with an in-memory etcd, a fake kernel and fake rules, on tokio's paused
//! clock: the lease, a peer's route, an expired lease taken back, renewal.

use super::*;
use crate::ipv6::{Inet6Addr, Ipv6Addrs};
use crate::netlink::{Fake, Op, Route, Route6};
use crate::registry::MemRegistry;
use crate::rules::FakeFirewall;
use ipnetwork::Ipv6Network;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tweed_config::{LeaseAttrs, LeaseKey, SubnetEnv};

const PREFIX: &str = "/coreos.com/network";
const OUR_IP6: &str = "fd00:198:18::1";

fn etcd(backend: &str) -> MemRegistry {
    let mem = MemRegistry::new(PREFIX);
    mem.put_raw(
        &format!("{PREFIX}/config"),
        format!(
            r#"{{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{{"Type":"{backend}"}}}}"#
        )
        .as_bytes(),
    );
    mem
}

struct V6Node {
    mem: MemRegistry,
    kernel: Fake,
    state: AgentState,
    rules: FakeFirewall,
    eth0: u32,
    dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    agent: tokio::task::JoinHandle<Result<(), AgentError>>,
}

impl V6Node {
    async fn start(mem: &MemRegistry) -> V6Node {
        V6Node::start_with(mem, FakeFirewall::default(), &[]).await
    }

    /// With these fake rules (a test holds their checks) and `args` added to tweedd's.
    async fn start_with(mem: &MemRegistry, rules: FakeFirewall, args: &[&str]) -> V6Node {
        V6Node::start_notifying(mem, rules, args, crate::notify::Notifier::default()).await
    }

    async fn start_notifying(
        mem: &MemRegistry,
        rules: FakeFirewall,
        args: &[&str],
        notifier: crate::notify::Notifier,
    ) -> V6Node {
        let fixed = |eth0| {
            Ipv6Addrs::Fixed(vec![Inet6Addr {
                ifindex: eth0,
                addr: OUR_IP6.parse().unwrap(),
                prefix: 64,
                scope: 0,
                flags: 0,
            }])
        };
        V6Node::start_full(mem, rules, args, notifier, fixed, |_, _| {}).await
    }

    /// eth0's IPv6 addresses as `addrs(eth0's index)` lists them (a test may change them at
    /// run time).
    async fn start_full(
        mem: &MemRegistry,
        rules: FakeFirewall,
        args: &[&str],
        notifier: crate::notify::Notifier,
        addrs: impl FnOnce(u32) -> Ipv6Addrs,
        before: impl FnOnce(&Fake, &std::path::Path),
    ) -> V6Node {
        let kernel = Fake::new();
        let eth0 = kernel.add_link("eth0", 1500, Some("02:00:00:00:00:01".parse().unwrap()));
        let nl = Netlink::from(kernel.clone());
        nl.apply(&Op::Route6Replace(Route6 {
            dst: "fd00:198:18::/64".parse().unwrap(),
            gateway: None,
            oif: Some(eth0),
            onlink: false,
            metric: 256,
            protocol: Route::PROTO_KERNEL,
        }))
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        // What a previous run left: devices in the kernel, files in the state dir.
        before(&kernel, &dir.path().join("state"));
        let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
        let subnet_file = path("subnet.env");
        let state_dir = path("state");
        let mut argv = vec![
            "tweedd",
            "--iface",
            "eth0",
            "--subnet-file",
            &subnet_file,
            "--state-dir",
            &state_dir,
            "--lease-ttl",
            "1h",
            "--ip-masq",
        ];
        argv.extend_from_slice(args);
        let settings = crate::settings::for_test(&argv);
        let state = AgentState::new();
        let deps = Deps {
            registry: Arc::new(Registry::Mem(mem.clone())),
            netlink: nl,
            firewall: Firewall::Fake(rules.clone()),
            clock: Clock::tokio(1_700_000_000),
            state: state.clone(),
            control: crate::api::ControlSlot::default(),
            notifier,
            ipv6_addrs: addrs(eth0),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let agent = tokio::spawn(run_with(deps, settings, async {
            let _ = stopped.await;
        }));
        V6Node {
            mem: mem.clone(),
            kernel,
            state,
            rules,
            eth0,
            dir,
            stop: Some(stop),
            agent,
        }
    }

    async fn until(&self, what: &str, f: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(600);
        while !f(self) {
            assert!(!self.agent.is_finished(), "the agent ended before {what}");
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Our IPv6-only key in etcd and its lease id.
    fn own_key(&self) -> Option<(String, i64)> {
        let snap = futures_lite(&self.mem);
        snap.into_iter().find_map(|l| {
            let attrs = LeaseAttrs::parse(&l.value).ok()?;
            (attrs.public_ipv6 == Some(OUR_IP6.parse().unwrap())).then_some((l.key, l.lease_id))
        })
    }

    fn routes6(&self) -> Vec<Route6> {
        // The fake kernel answers without waiting on anything.
        futures::executor::block_on(Netlink::from(self.kernel.clone()).all_routes6()).unwrap()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.agent.await.unwrap().unwrap();
    }

    /// Waits (real time) until a rules check waits at the fake's gate.
    async fn until_a_check_is_held(&self) {
        self.rules.until_held(1, "no rules check came").await;
    }
}

/// The mem registry's listing, synchronously (its calls never wait on I/O).
fn futures_lite(mem: &MemRegistry) -> Vec<crate::registry::RawLease> {
    let reg = Registry::Mem(mem.clone());
    futures::executor::block_on(reg.list_leases())
        .map(|s| s.leases)
        .unwrap_or_default()
}

#[tokio::test(start_paused = true)]
async fn an_ipv6_only_node_leases_routes_its_peers_and_takes_an_expired_lease_back() {
    let mem = etcd("host-gw");
    let n = V6Node::start(&mem).await;
    n.until("ready", |n| n.state.snapshot().not_ready().is_empty())
        .await;
    let (key, lease) = n.own_key().expect("our lease");
    let short = key.strip_prefix(&format!("{PREFIX}/subnets/")).unwrap();
    let Ok(LeaseKey::Ipv6Only(k)) = short.parse::<LeaseKey>() else {
        panic!("{key} is not an IPv6-only key")
    };
    assert_ne!(lease, 0);
    let s = n.state.snapshot();
    assert_eq!(s.ipv6, super::report::IPV6_ONLY);
    assert_eq!(s.subnet_v6, k.ipv6.to_string());
    assert_eq!((s.subnet.as_str(), s.public_ip.as_str()), ("", ""));
    let env = SubnetEnv::read(&n.dir.path().join("subnet.env")).unwrap();
    assert!(env.ipv4.is_none());
    assert_eq!(env.ipv6.unwrap().node_subnet(), k.ipv6);

    // A peer: its route via its PublicIPv6 on eth0.
    let peer: Ipv6Network = if k.ipv6.to_string() == "fd00:10:244:7::/64" {
        "fd00:10:244:8::/64".parse().unwrap()
    } else {
        "fd00:10:244:7::/64".parse().unwrap()
    };
    mem.put_raw(
        &format!("{PREFIX}/subnets/{}-64", peer.network()),
        br#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198:18::2","BackendType":"host-gw"}"#,
    );
    let want = Route6::via(peer, "fd00:198:18::2".parse().unwrap(), Some(n.eth0));
    n.until("the peer's route", |n| {
        n.routes6().iter().any(|r| r.same_path(&want))
    })
    .await;

    // Our lease expires (etcd lost it): taken back, the same subnet, a new TTL lease.
    mem.expire_lease(lease);
    n.until("the lease taken back", |n| {
        n.own_key().is_some_and(|(k2, l2)| k2 == key && l2 != lease)
    })
    .await;

    // Renewed: after two renewal periods the same lease still holds the key.
    let (_, lease) = n.own_key().unwrap();
    tokio::time::sleep(Duration::from_secs(2 * 3600)).await;
    assert_eq!(
        n.own_key().map(|(_, l)| l),
        Some(lease),
        "the lease was lost"
    );
    n.stop().await;
}

#[tokio::test(start_paused = true)]
async fn udp_in_an_ipv6_only_network_ends_the_agent_naming_backend_type() {
    let n = V6Node::start(&etcd("udp")).await;
    let e = n.agent.await.unwrap().unwrap_err().to_string();
    assert!(e.contains("Backend.Type") && e.contains("udp"), "{e}");
}

const OUR_VALUE: &str =
    r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198:18::1","BackendType":"host-gw"}"#;

/// Our IPv6-only key on `subnet` in `mem`, on a TTL lease of `ttl` (as a previous run left it).
async fn left_by_a_previous_run(mem: &MemRegistry, subnet: &str, ttl: Duration) -> i64 {
    let key: LeaseKey = subnet.parse().unwrap();
    let attrs = LeaseAttrs::parse(OUR_VALUE.as_bytes()).unwrap();
    match Registry::Mem(mem.clone())
        .create_lease(&key, &attrs, ttl)
        .await
        .unwrap()
    {
        crate::registry::CreateOutcome::Created { lease_id } => lease_id,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_restart_does_not_reuse_our_key_that_lost_its_race_it_removes_it() {
    let mem = etcd("host-gw");
    // An older dual-stack key claims fd00:10:244:5::/64; ours there lost the race, but the
    // previous run died before deleting it.
    mem.put_raw(
        &format!("{PREFIX}/subnets/10.244.5.0-24&fd00:10:244:5::-64"),
        br#"{"PublicIP":"198.18.0.9","PublicIPv6":"fd00:198:18::9","BackendType":"host-gw"}"#,
    );
    let stale = left_by_a_previous_run(&mem, "fd00:10:244:5::-64", Duration::from_secs(3600)).await;
    let n = V6Node::start(&mem).await;
    n.until("a lease on another subnet", |n| {
        n.own_key()
            .is_some_and(|(k, _)| !k.ends_with("/fd00:10:244:5::-64"))
    })
    .await;
    assert!(
        !mem.lease_alive(stale),
        "the stale key's lease was not revoked"
    );
    assert!(
        !mem.keys()
            .iter()
            .any(|k| k.ends_with("/fd00:10:244:5::-64")),
        "{:?}",
        mem.keys()
    );
    n.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_key_under_our_name_that_another_node_wrote_is_not_ours_we_move() {
    let mem = etcd("host-gw");
    let n = V6Node::start(&mem).await;
    n.until("ready", |n| n.state.snapshot().not_ready().is_empty())
        .await;
    let (key, lease) = n.own_key().unwrap();
    // Cut off longer than the TTL: our lease expires and another node takes the subnet.
    mem.set_reachable(false);
    tokio::time::sleep(Duration::from_secs(5)).await;
    mem.expire_lease(lease);
    mem.put_raw(
        &key,
        br#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198:18::3","BackendType":"host-gw"}"#,
    );
    mem.set_reachable(true);
    n.until("our lease on another subnet", |n| {
        n.own_key().is_some_and(|(k, _)| k != key)
    })
    .await;
    let (moved, _) = n.own_key().unwrap();
    let env = SubnetEnv::read(&n.dir.path().join("subnet.env")).unwrap();
    let short = moved.strip_prefix(&format!("{PREFIX}/subnets/")).unwrap();
    let Ok(LeaseKey::Ipv6Only(k)) = short.parse::<LeaseKey>() else {
        panic!("{moved}")
    };
    assert_eq!(env.ipv6.unwrap().node_subnet(), k.ipv6);
    n.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_reused_lease_is_renewed_at_once() {
    let mem = etcd("host-gw");
    // A previous run's lease with 5 s left; the node's own renewal period is far longer.
    let lease = left_by_a_previous_run(&mem, "fd00:10:244:5::-64", Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let n = V6Node::start(&mem).await;
    n.until("ready", |n| n.state.snapshot().not_ready().is_empty())
        .await;
    assert_eq!(n.own_key().map(|(_, l)| l), Some(lease));
    // Past the old deadline: renewed on reuse, so still the same lease.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        n.own_key().map(|(_, l)| l),
        Some(lease),
        "the reused lease was not renewed"
    );
    n.stop().await;
}

/// rev35 L6: a burst of lease events is answered with a few listings, not one per event, and
/// the last listing still programs every peer of the burst.
#[tokio::test(start_paused = true)]
async fn a_burst_of_lease_events_costs_a_few_listings_not_one_each() {
    let mem = etcd("host-gw");
    let n = V6Node::start(&mem).await;
    n.until("ready", |n| n.state.snapshot().not_ready().is_empty())
        .await;
    let (own, _) = n.own_key().unwrap();
    // Clear of the start's listings and their window.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = mem.lists();
    const N: u32 = 40;
    let mut want = Vec::new();
    // Peers on N subnets other than ours (which is chosen at random).
    let subnets = (0x80..)
        .map(|i: u32| {
            format!("fd00:10:244:{i:x}::/64")
                .parse::<Ipv6Network>()
                .unwrap()
        })
        .filter(|s| format!("{PREFIX}/subnets/{}-64", s.network()) != own)
        .take(N as usize);
    for (i, subnet) in (0..N).zip(subnets) {
        let key = format!("{PREFIX}/subnets/{}-64", subnet.network());
        let via = format!("fd00:198:18::{:x}", 0x100 + i);
        mem.put_raw(
            &key,
            format!(r#"{{"PublicIP":"0.0.0.0","PublicIPv6":"{via}","BackendType":"host-gw"}}"#)
                .as_bytes(),
        );
        want.push(Route6::via(subnet, via.parse().unwrap(), Some(n.eth0)));
        // A burst spread over 200 ms, each event seen by the loop on its own.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    n.until("every peer's route", |n| {
        let routes = n.routes6();
        want.iter().all(|w| routes.iter().any(|r| r.same_path(w)))
    })
    .await;
    let lists = mem.lists() - before;
    assert!(
        lists <= 4,
        "{N} events cost {lists} listings; a burst should cost about two"
    );
    n.stop().await;
}

/// The IPv6-only loop's rules checks run beside it, as the main loop's (issue 20): the first is
/// awaited (no readiness before the rules are in place), a slow periodic one does not hold up a
/// lease event or the loop's beat, its outcome is counted when it ends, and a shutdown waits
/// for the one under way. Real time: a held check keeps tokio's paused clock from advancing.
#[tokio::test]
async fn a_lease_event_is_handled_while_a_slow_ipv6_only_rules_check_runs() {
    use crate::rules::FakeCall;
    let mem = etcd("host-gw");
    let rules = FakeFirewall::default();
    // A failed assertion must not leave a check held: the runtime's drop would wait for it.
    struct ReleaseOnDrop(FakeFirewall);
    impl Drop for ReleaseOnDrop {
        fn drop(&mut self) {
            self.0.release();
        }
    }
    let _release = ReleaseOnDrop(rules.clone());
    rules.hold();
    let n = V6Node::start_with(&mem, rules, &["--iptables-resync", "1s"]).await;
    n.until_a_check_is_held().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !n.state.snapshot().not_ready().is_empty(),
        "ready before the first rules check ended"
    );
    n.rules.release();
    n.until("ready", |n| n.state.snapshot().not_ready().is_empty())
        .await;
    let (key, _) = n.own_key().unwrap();
    let short = key.strip_prefix(&format!("{PREFIX}/subnets/")).unwrap();
    let Ok(LeaseKey::Ipv6Only(k)) = short.parse::<LeaseKey>() else {
        panic!("{key}")
    };
    let ours = FakeCall::SyncV6Only(
        crate::rules::RuleSpecV6 {
            network: "fd00:10:244::/56".parse().unwrap(),
            subnet: k.ipv6,
        },
        true,
    );
    assert_eq!(n.rules.calls(), vec![ours]);
    assert_eq!(n.state.metrics.rules_resyncs.get(), 1);

    // The rules are deleted behind the agent's back; the next periodic check is slow.
    n.rules.hold();
    n.until_a_check_is_held().await;
    n.rules.flush();
    let calls = n.rules.calls().len();
    let peer: Ipv6Network = if k.ipv6.to_string() == "fd00:10:244:7::/64" {
        "fd00:10:244:8::/64".parse().unwrap()
    } else {
        "fd00:10:244:7::/64".parse().unwrap()
    };
    mem.put_raw(
        &format!("{PREFIX}/subnets/{}-64", peer.network()),
        br#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198:18::2","BackendType":"host-gw"}"#,
    );
    let want = Route6::via(peer, "fd00:198:18::2".parse().unwrap(), Some(n.eth0));
    let put = std::time::Instant::now();
    while !n.routes6().iter().any(|r| r.same_path(&want)) {
        assert!(
            put.elapsed() < Duration::from_secs(5),
            "the peer's route waited for the rules check"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(n.rules.held_syncs(), 1, "still under way");
    assert_eq!(n.rules.calls().len(), calls);
    let beat = n.state.snapshot().loop_beat;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = n.state.snapshot();
    assert_eq!(s.not_alive(std::time::Instant::now()), None);
    assert!(s.loop_beat > beat, "the loop did not beat during the check");

    n.rules.release();
    n.until("the check's outcome counted", |n| {
        n.state.metrics.rules_resyncs.get() == 2
    })
    .await;
    assert_eq!(n.rules.calls()[calls], ours);

    // A shutdown during a held check waits for it.
    n.rules.hold();
    n.until_a_check_is_held().await;
    let calls = n.rules.calls().len();
    let release = {
        let rules = n.rules.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            rules.release();
        })
    };
    let began = std::time::Instant::now();
    let rules = n.rules.clone();
    n.stop().await;
    release.join().unwrap();
    assert!(
        began.elapsed() >= Duration::from_millis(250),
        "the shutdown did not wait for the check: {:?}",
        began.elapsed()
    );
    assert_eq!(rules.calls().len(), calls + 1, "the held check finished");
}

/// The API's lease and peer lists (`tweedctl net leases/peers`) and its watch stream are
/// filled in an IPv6-only network too, from the loop's listings.
#[tokio::test(start_paused = true)]
async fn the_api_views_show_ipv6_only_leases_and_peers_and_watchers_see_them_come_and_go() {
    use crate::state::EventKind;
    let mem = etcd("host-gw");
    let n = V6Node::start(&mem).await;
    n.until("ready", |n| n.state.snapshot().not_ready().is_empty())
        .await;
    let mut events = n.state.subscribe();
    let s = n.state.snapshot();
    let own = s
        .v6only_leases
        .first()
        .expect("our lease in the view")
        .clone();
    assert!(own.own, "{own:?}");
    assert_eq!(own.subnet, s.subnet_v6);
    assert_eq!(own.public_ip, OUR_IP6);
    assert_ne!(own.lease_id, 0);
    assert!(s.v6only_peers.is_empty());

    let peer = if own.subnet == "fd00:10:244:7::/64" {
        "fd00:10:244:8::"
    } else {
        "fd00:10:244:7::"
    };
    let key = format!("{PREFIX}/subnets/{peer}-64");
    mem.put_raw(
        &key,
        br#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198:18::2","BackendType":"host-gw"}"#,
    );
    let subnet = format!("{peer}/64");
    n.until("the peer in the views", |n| {
        n.state.snapshot().v6only_peers.get(&subnet).is_some()
    })
    .await;
    let s = n.state.snapshot();
    let p = s.v6only_peers.get(&subnet).unwrap();
    assert_eq!(
        (p.public_ip.as_str(), p.backend.as_str(), p.programmed),
        ("fd00:198:18::2", "host-gw", true)
    );
    let l = s.v6only_leases.get(&subnet).unwrap();
    assert!(!l.own);
    assert_eq!(s.v6only_leases.len(), 2);
    let ev = events.recv().await.unwrap();
    assert_eq!(
        (ev.kind, ev.lease.subnet.as_str()),
        (EventKind::Added, subnet.as_str())
    );

    mem.delete_raw(&key);
    n.until("the peer gone from the views", |n| {
        n.state.snapshot().v6only_peers.is_empty()
    })
    .await;
    let ev = events.recv().await.unwrap();
    assert_eq!(
        (ev.kind, ev.lease.subnet.as_str()),
        (EventKind::Removed, subnet.as_str())
    );
    assert_eq!(n.state.snapshot().v6only_leases.len(), 1);
    n.stop().await;
}

/// The shipped unit is `Type=notify` with `WatchdogSec`: an IPv6-only node says READY=1 once
/// ready, and WATCHDOG=1 while its loop runs.
#[tokio::test(start_paused = true)]
async fn an_ipv6_only_node_tells_systemd_it_is_ready_and_alive() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    server.set_nonblocking(true).unwrap();
    let notifier = crate::notify::Notifier::to(crate::notify::Target::Path(path));
    let n = V6Node::start_notifying(&etcd("host-gw"), FakeFirewall::default(), &[], notifier).await;
    n.until("ready", |n| n.state.snapshot().not_ready().is_empty())
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while let Ok(len) = server.recv(&mut buf) {
        got.push(String::from_utf8_lossy(&buf[..len]).into_owned());
    }
    assert_eq!(
        got.iter().filter(|m| m.starts_with("READY=1\n")).count(),
        1,
        "{got:?}"
    );
    assert!(
        got.iter().filter(|m| *m == "WATCHDOG=1").count() >= 2,
        "{got:?}"
    );
    n.stop().await;
}

/// eth0's address `addr` as /proc/net/if_inet6 lists it (permanent, global).
fn eth0_addr(eth0: u32, addr: &str) -> Inet6Addr {
    Inet6Addr {
        ifindex: eth0,
        addr: addr.parse().unwrap(),
        prefix: 64,
        scope: 0,
        flags: 0x80,
    }
}

impl V6Node {
    /// A vxlan node whose eth0 addresses a test replaces with [`V6Node::renumber`].
    async fn start_renumbered(
        mem: &MemRegistry,
        args: &[&str],
    ) -> (V6Node, std::sync::Arc<std::sync::Mutex<Vec<Inet6Addr>>>) {
        let listed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let shared = listed.clone();
        let n = V6Node::start_full(
            mem,
            FakeFirewall::default(),
            args,
            crate::notify::Notifier::default(),
            move |eth0| {
                *shared.lock().unwrap() = vec![eth0_addr(eth0, OUR_IP6)];
                Ipv6Addrs::Shared(shared)
            },
            |_, _| {},
        )
        .await;
        (n, listed)
    }

    /// eth0's only global address becomes `to` (a SLAAC renumbering), with the kernel's
    /// notification of the old one's removal.
    fn renumber(&self, listed: &std::sync::Mutex<Vec<Inet6Addr>>, from: &str, to: &str) {
        *listed.lock().unwrap() = vec![eth0_addr(self.eth0, to)];
        self.kernel.announce(crate::netlink::Event::Addr6(
            crate::netlink::Change::Del,
            crate::netlink::Addr6 {
                ifindex: self.eth0,
                net: format!("{from}/64").parse().unwrap(),
                tentative: false,
            },
        ));
    }

    /// The raw lease under `key`.
    fn lease(&self, key: &str) -> crate::registry::RawLease {
        futures_lite(&self.mem)
            .into_iter()
            .find(|l| l.key == key)
            .unwrap_or_else(|| panic!("no {key} in {:?}", self.mem.keys()))
    }

    fn vxlan6(&self) -> crate::netlink::Link {
        futures::executor::block_on(
            Netlink::from(self.kernel.clone()).link_by_name(&crate::backend::v6::device_name(1)),
        )
        .unwrap()
        .expect("tweed-v6.1")
    }
}

fn public_ipv6_of(l: &crate::registry::RawLease) -> Option<std::net::Ipv6Addr> {
    LeaseAttrs::parse(&l.value).ok()?.public_ipv6
}

/// Issue 19: the node's `PublicIPv6` is replaced at run time (eth0's address removed and
/// another global one there). Within a notification's debounce the lease is rewritten in place
/// (same key, same TTL lease, compare-and-swap) with the new `PublicIPv6` and the same VTEP MAC,
/// `tweed-v6.1` is re-created on the new local address with its MAC kept, the peer is
/// programmed again, and the status says so. Settled, two resyncs and the rewrite's own
/// watch event make no netlink write and no further etcd write. A reserved key (no TTL) is
/// rewritten by the next move and stays reserved.
#[tokio::test(start_paused = true)]
async fn a_moved_public_ipv6_rewrites_the_lease_in_place_and_moves_the_vxlan_device() {
    let mem = etcd("vxlan");
    let (n, listed) = V6Node::start_renumbered(&mem, &[]).await;
    n.until("ready", |n| n.state.snapshot().not_ready().is_empty())
        .await;
    let (key, lease) = n.own_key().unwrap();
    let mac = n.vxlan6().mac.expect("a MAC");
    let vtep = |l: &crate::registry::RawLease| {
        LeaseAttrs::parse(&l.value)
            .unwrap()
            .backend_v6_data
            .map(|d| d.get().to_string())
    };
    let data = vtep(&n.lease(&key));
    assert!(
        data.as_deref()
            .is_some_and(|d| d.contains(&mac.to_string())),
        "{data:?}"
    );
    let peer = if key.ends_with("/fd00:10:244:7::-64") {
        "fd00:10:244:8::"
    } else {
        "fd00:10:244:7::"
    };
    mem.put_raw(
        &format!("{PREFIX}/subnets/{peer}-64"),
        br#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198:18::2","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:00:22"}}"#,
    );
    let peer_route = |n: &V6Node| {
        let dev = n.vxlan6().index;
        n.routes6()
            .iter()
            .any(|r| r.dst.to_string() == format!("{peer}/64") && r.oif == Some(dev))
    };
    n.until("the peer's route", peer_route).await;
    n.kernel.take_ops();

    const NEW: &str = "fd00:198:18::101";
    n.renumber(&listed, OUR_IP6, NEW);
    n.until("the lease advertising the new PublicIPv6", |n| {
        public_ipv6_of(&n.lease(&key)) == Some(NEW.parse().unwrap())
    })
    .await;
    let l = n.lease(&key);
    assert_eq!(l.lease_id, lease, "rewritten on the same TTL lease");
    assert_eq!(vtep(&l), data, "the same VTEP MAC");
    n.until("tweed-v6.1 on the new address", |n| {
        n.vxlan6().vxlan.and_then(|v| v.local) == Some(NEW.parse().unwrap())
    })
    .await;
    assert_eq!(n.vxlan6().mac, Some(mac), "the MAC is kept");
    n.until("the peer's route again", peer_route).await;
    let ops = n.kernel.take_ops();
    assert!(
        ops.iter().any(|o| matches!(o, Op::LinkDel { .. }))
            && ops.iter().any(|o| matches!(o, Op::LinkAddVxlan(_))),
        "{ops:?}"
    );
    assert_eq!(n.state.snapshot().public_ipv6, NEW);
    assert!(n.state.snapshot().not_ready().is_empty());

    // Settled: nothing more is written, to the kernel or to etcd.
    tokio::time::sleep(Duration::from_secs(1)).await;
    n.kernel.take_ops();
    let revision = n.lease(&key).mod_revision;
    tokio::time::sleep(Duration::from_secs(25)).await;
    assert_eq!(
        n.kernel.take_ops(),
        vec![],
        "netlink writes in a settled state"
    );
    assert_eq!(
        n.lease(&key).mod_revision,
        revision,
        "the lease was written again"
    );

    // Reserved by hand (the same value without a TTL lease): the next move rewrites it, and it
    // stays reserved.
    mem.put_raw(&key, &n.lease(&key).value);
    tokio::time::sleep(Duration::from_secs(11)).await;
    const NEWER: &str = "fd00:198:18::102";
    n.renumber(&listed, NEW, NEWER);
    n.until("the reservation advertising the newer PublicIPv6", |n| {
        public_ipv6_of(&n.lease(&key)) == Some(NEWER.parse().unwrap())
    })
    .await;
    assert_eq!(n.lease(&key).lease_id, 0, "still reserved");
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(n.own_key(), None, "no key with the old address");
    assert_eq!(
        public_ipv6_of(&n.lease(&key)),
        Some(NEWER.parse().unwrap()),
        "the subnet was kept"
    );
    n.stop().await;
}

/// `--public-ipv6` is pinned: the same renumbering changes neither the lease nor the device.
#[tokio::test(start_paused = true)]
async fn an_explicit_public_ipv6_never_moves() {
    let mem = etcd("vxlan");
    let (n, listed) = V6Node::start_renumbered(&mem, &["--public-ipv6", OUR_IP6]).await;
    n.until("ready", |n| n.state.snapshot().not_ready().is_empty())
        .await;
    let (key, _) = n.own_key().unwrap();
    let revision = n.lease(&key).mod_revision;
    tokio::time::sleep(Duration::from_secs(1)).await;
    n.kernel.take_ops();
    n.renumber(&listed, OUR_IP6, "fd00:198:18::101");
    tokio::time::sleep(Duration::from_secs(25)).await;
    assert_eq!(n.lease(&key).mod_revision, revision);
    assert_eq!(
        public_ipv6_of(&n.lease(&key)),
        Some(OUR_IP6.parse().unwrap())
    );
    assert_eq!(
        n.vxlan6().vxlan.and_then(|v| v.local),
        Some(OUR_IP6.parse().unwrap())
    );
    assert_eq!(n.kernel.take_ops(), vec![]);
    n.stop().await;
}

/// A renumbering often cuts the node off etcd for a while (its connections came from the old
/// address): the move is not lost, the lease and the device follow once etcd answers again.
#[tokio::test(start_paused = true)]
async fn a_move_while_etcd_is_out_of_reach_is_carried_out_once_it_answers() {
    let mem = etcd("vxlan");
    let (n, listed) = V6Node::start_renumbered(&mem, &[]).await;
    n.until("ready", |n| n.state.snapshot().not_ready().is_empty())
        .await;
    let (key, lease) = n.own_key().unwrap();
    const NEW: &str = "fd00:198:18::101";
    mem.set_reachable(false);
    n.renumber(&listed, OUR_IP6, NEW);
    tokio::time::sleep(Duration::from_secs(5)).await;
    mem.set_reachable(true);
    n.until("the lease advertising the new PublicIPv6", |n| {
        public_ipv6_of(&n.lease(&key)) == Some(NEW.parse().unwrap())
    })
    .await;
    assert_eq!(n.lease(&key).lease_id, lease);
    n.until("tweed-v6.1 on the new address", |n| {
        n.vxlan6().vxlan.and_then(|v| v.local) == Some(NEW.parse().unwrap())
    })
    .await;
    n.stop().await;
}

/// Review H1: a VTEP MAC is public in every lease and cloned VMs share one. Another node's
/// older key carrying our device's MAC (kept: the state dir has a record of our key) is neither
/// reused (renewed, rewritten with our attributes) nor removed: the node takes its own subnet.
#[tokio::test(start_paused = true)]
async fn another_nodes_key_with_our_vtep_mac_is_left_alone() {
    let mem = etcd("vxlan");
    const MAC: &str = "02:00:00:00:00:66";
    let theirs = format!(
        r#"{{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198:18::9","BackendType":"vxlan","BackendV6Data":{{"VNI":1,"VtepMAC":"{MAC}"}}}}"#
    );
    let key: LeaseKey = "fd00:10:244:5::-64".parse().unwrap();
    let full = key.etcd_key(PREFIX);
    let attrs = LeaseAttrs::parse(theirs.as_bytes()).unwrap();
    let crate::registry::CreateOutcome::Created { lease_id } = Registry::Mem(mem.clone())
        .create_lease(&key, &attrs, Duration::from_secs(3600))
        .await
        .unwrap()
    else {
        panic!("not created")
    };
    let before = futures_lite(&mem)
        .into_iter()
        .find(|l| l.key == full)
        .unwrap();
    let n = V6Node::start_full(
        &mem,
        FakeFirewall::default(),
        &[],
        crate::notify::Notifier::default(),
        |eth0| {
            Ipv6Addrs::Fixed(vec![Inet6Addr {
                ifindex: eth0,
                addr: OUR_IP6.parse().unwrap(),
                prefix: 64,
                scope: 0,
                flags: 0,
            }])
        },
        |kernel, state| {
            kernel.add_link("tweed-v6.1", 1450, Some(MAC.parse().unwrap()));
            std::fs::create_dir_all(state).unwrap();
            std::fs::write(
                state.join("ipv6-only-public-ipv6"),
                format!("subnet fd00:10:244:9::/64\nlease 1234\naddress {OUR_IP6}\n"),
            )
            .unwrap();
        },
    )
    .await;
    n.until("ready", |n| n.state.snapshot().not_ready().is_empty())
        .await;
    assert_eq!(n.vxlan6().mac, Some(MAC.parse().unwrap()), "the MAC kept");
    let (ours, _) = n.own_key().unwrap();
    assert_ne!(ours, full, "their key was taken over");
    let after = futures_lite(&mem)
        .into_iter()
        .find(|l| l.key == full)
        .expect("their key removed");
    assert_eq!(
        (after.value, after.lease_id, after.mod_revision),
        (before.value, before.lease_id, before.mod_revision),
        "their key was written"
    );
    assert!(mem.lease_alive(lease_id));
    n.stop().await;
}

/// Review rev37e M1: the first start of this version finds no state-dir record; our key in etcd
/// names our address and carries the device's MAC, as the previous version left them. The MAC
/// is kept (no device re-created) and the lease is not rewritten.
#[tokio::test(start_paused = true)]
async fn an_upgrade_without_the_record_keeps_the_vtep_mac_and_the_lease() {
    let mem = etcd("vxlan");
    const MAC: &str = "02:00:00:00:00:77";
    let ours = format!(
        r#"{{"PublicIP":"0.0.0.0","PublicIPv6":"{OUR_IP6}","BackendType":"vxlan","BackendV6Data":{{"VNI":1,"VtepMAC":"{MAC}"}}}}"#
    );
    let key: LeaseKey = "fd00:10:244:5::-64".parse().unwrap();
    let full = key.etcd_key(PREFIX);
    let attrs = LeaseAttrs::parse(ours.as_bytes()).unwrap();
    Registry::Mem(mem.clone())
        .create_lease(&key, &attrs, Duration::from_secs(3600))
        .await
        .unwrap();
    let before = futures_lite(&mem)
        .into_iter()
        .find(|l| l.key == full)
        .unwrap();
    let n = V6Node::start_full(
        &mem,
        FakeFirewall::default(),
        &[],
        crate::notify::Notifier::default(),
        |eth0| {
            Ipv6Addrs::Fixed(vec![Inet6Addr {
                ifindex: eth0,
                addr: OUR_IP6.parse().unwrap(),
                prefix: 64,
                scope: 0,
                flags: 0,
            }])
        },
        |kernel, _state| {
            // As the previous version left it: the device of this node's spec, up.
            let eth0 = kernel.link_index("eth0").unwrap();
            kernel.put_link(crate::netlink::Link {
                index: 40,
                name: "tweed-v6.1".into(),
                mtu: 1430,
                mac: Some(MAC.parse().unwrap()),
                kind: Some("vxlan".into()),
                up: true,
                vxlan: Some(crate::netlink::VxlanAttrs {
                    vni: 1,
                    port: 8472,
                    local: Some(OUR_IP6.parse().unwrap()),
                    learning: false,
                    underlay: Some(eth0),
                }),
                master: None,
                alias: None,
            });
        },
    )
    .await;
    n.until("ready", |n| n.state.snapshot().not_ready().is_empty())
        .await;
    assert_eq!(n.vxlan6().mac, Some(MAC.parse().unwrap()), "the MAC kept");
    let ops = n.kernel.take_ops();
    assert!(
        !ops.iter()
            .any(|o| matches!(o, Op::LinkDel { .. } | Op::LinkAddVxlan(_))),
        "the device was re-created: {ops:?}"
    );
    let (own, _) = n.own_key().unwrap();
    assert_eq!(own, full, "our key reused");
    let after = futures_lite(&mem)
        .into_iter()
        .find(|l| l.key == full)
        .unwrap();
    assert_eq!(
        (after.value, after.mod_revision),
        (before.value, before.mod_revision),
        "the lease was rewritten"
    );
    n.stop().await;
}
