//! The agent loop with an in-memory etcd, a fake kernel and fake rules, on tokio's paused clock:
//! hours of leases and outages run in milliseconds, without root.

use super::*;
use crate::netlink::{Addr, Fake, Op, Route};
use crate::registry::{MemOp, MemRegistry};
use crate::rules::{FakeCall, FakeFirewall, RuleSpec};
use crate::state::Snapshot;
use ipnetwork::Ipv4Network;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tweed_config::{LeaseAttrs, SubnetEnv, SubnetKey};

const PREFIX: &str = "/coreos.com/network";
const NETWORK: &str = "10.244.0.0/16";
const OUR_IP: &str = "198.18.0.1";
/// The tests write peers in 10.244.7-9.0/24 after the node has chosen its subnet at random: keep
/// its choice above them, or a test fails whenever the draw lands on one of theirs.
const SUBNET_MIN: &str = r#""SubnetMin":"10.244.16.0""#;

use crate::testutil::{ip, net};

fn key(subnet: &str) -> String {
    SubnetKey::new(net(subnet)).etcd_key(PREFIX)
}

/// etcd with a host-gw network config.
fn etcd() -> MemRegistry {
    let mem = MemRegistry::new(PREFIX);
    mem.put_raw(
        &format!("{PREFIX}/config"),
        format!(r#"{{"Network":"{NETWORK}",{SUBNET_MIN},"Backend":{{"Type":"host-gw"}}}}"#)
            .as_bytes(),
    );
    mem
}

/// Another node's host-gw lease, without TTL.
fn put_peer(mem: &MemRegistry, subnet: &str, public_ip: &str) {
    let value = format!(r#"{{"PublicIP":"{public_ip}","BackendType":"host-gw"}}"#);
    mem.put_raw(&key(subnet), value.as_bytes());
}

/// One agent on `eth0` (198.18.0.1/24), run by [`run_with`] with fakes, lease TTL 1 h (renewed
/// every 40 min).
struct Node {
    mem: MemRegistry,
    kernel: Fake,
    rules: FakeFirewall,
    state: AgentState,
    eth0: u32,
    dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    agent: JoinHandle<Result<(), AgentError>>,
}

impl Node {
    fn start(mem: &MemRegistry) -> Node {
        Node::start_with_v6(mem, "")
    }

    /// [`start`](Self::start), with these IPv6 addresses in the namespace: lines of
    /// `/proc/net/if_inet6`, `IDX` standing for eth0's index.
    fn start_with_v6(mem: &MemRegistry, if_inet6: &str) -> Node {
        let if_inet6 = if_inet6.to_string();
        Node::start_with_addrs(mem, move |eth0| {
            crate::ipv6::Ipv6Addrs::Fixed(crate::ipv6::parse_if_inet6(
                &if_inet6.replace("IDX", &format!("{eth0:02x}")),
            ))
        })
    }

    /// [`start`](Self::start), with the IPv6 addresses `addrs` makes of eth0's index.
    fn start_with_addrs(
        mem: &MemRegistry,
        addrs: impl FnOnce(u32) -> crate::ipv6::Ipv6Addrs,
    ) -> Node {
        let kernel = Fake::new();
        let eth0 = kernel.add_link("eth0", 1500, Some("02:00:00:00:00:01".parse().unwrap()));
        kernel.add_addr(Addr {
            ifindex: eth0,
            net: format!("{OUR_IP}/24").parse().unwrap(),
        });
        kernel.add_route(Route {
            dst: net("198.18.0.0/24"),
            gateway: None,
            oif: Some(eth0),
            onlink: false,
            metric: 0,
            protocol: Route::PROTO_KERNEL,
        });
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
        let settings = crate::settings::for_test(&[
            "tweedd",
            "--iface",
            "eth0",
            "--subnet-file",
            &path("subnet.env"),
            "--state-dir",
            &path("state"),
            "--lease-ttl",
            "1h",
            "--ip-masq",
        ]);
        let rules = FakeFirewall::default();
        let state = AgentState::new();
        let deps = Deps {
            registry: Arc::new(Registry::Mem(mem.clone())),
            netlink: Netlink::from(kernel.clone()),
            firewall: Firewall::Fake(rules.clone()),
            clock: Clock::tokio(1_700_000_000),
            state: state.clone(),
            control: crate::api::ControlSlot::default(),
            notifier: crate::notify::Notifier::default(),
            ipv6_addrs: addrs(eth0),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let agent = tokio::spawn(run_with(deps, settings, async {
            let _ = stopped.await;
        }));
        Node {
            mem: mem.clone(),
            kernel,
            rules,
            state,
            eth0,
            dir,
            stop: Some(stop),
            agent,
        }
    }

    /// Started, with its lease, its rules and every peer programmed.
    async fn ready(mem: &MemRegistry) -> Node {
        let n = Node::start(mem);
        n.until("the agent to be ready", |s| s.not_ready().is_empty())
            .await;
        n
    }

    /// Ready, with one peer (10.244.7.0/24 at 198.18.0.2) programmed and the ops so far taken;
    /// also our subnet and its lease id.
    async fn with_a_peer() -> (MemRegistry, Node, Ipv4Network, i64) {
        let mem = etcd();
        put_peer(&mem, "10.244.7.0/24", "198.18.0.2");
        let n = Node::ready(&mem).await;
        let subnet = n.subnet();
        let lease = n.lease_id(subnet).await.unwrap();
        n.kernel.take_ops();
        (mem, n, subnet, lease)
    }

    /// Whether the peer of [`with_a_peer`](Self::with_a_peer) is still routed.
    async fn peer_routed(&self) -> bool {
        let nl = Netlink::from(self.kernel.clone());
        let want = self.route("10.244.7.0/24", "198.18.0.2");
        nl.all_routes().await.unwrap().contains(&want)
    }

    /// Waits (in tokio time) until `f` holds, at most 10 minutes.
    async fn until(&self, what: &str, f: impl Fn(&Snapshot) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(600);
        while !f(&self.state.snapshot()) {
            assert!(!self.agent.is_finished(), "the agent ended before {what}");
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                self.state.snapshot()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn subnet(&self) -> Ipv4Network {
        net(&self.state.snapshot().subnet)
    }

    /// Our key's lease id in etcd, `None` when the key is gone.
    async fn lease_id(&self, subnet: Ipv4Network) -> Option<i64> {
        let k = SubnetKey::new(subnet).etcd_key(PREFIX);
        let reg = Registry::Mem(self.mem.clone());
        let snap = reg.list_leases().await.unwrap();
        snap.leases.iter().find(|l| l.key == k).map(|l| l.lease_id)
    }

    fn subnet_env(&self) -> SubnetEnv {
        SubnetEnv::read(&self.dir.path().join("subnet.env")).unwrap()
    }

    fn route(&self, subnet: &str, via: &str) -> Route {
        Route::via(net(subnet), ip(via), Some(self.eth0))
    }

    fn rules_for(&self, subnet: Ipv4Network) -> RuleSpec {
        RuleSpec {
            network: net(NETWORK),
            subnet,
            ip_masq: true,
            ipv6: None,
        }
    }

    fn counter(&self, name: &str, label: &str) -> u64 {
        let m = &self.state.metrics;
        match name {
            "lease_failures" => m.lease_failures.with_label_values(&[label]).get(),
            "etcd_errors" => m.etcd_errors.with_label_values(&[label]).get(),
            "lease_acquisitions" => m.lease_acquisitions.get(),
            "lease_renewals" => m.lease_renewals.get(),
            "repairs" => m.repairs.with_label_values(&[label]).get(),
            other => panic!("no counter {other}"),
        }
    }

    /// Sends the shutdown signal and returns what the agent returned.
    async fn shut_down(mut self) -> (Result<(), AgentError>, Node) {
        self.stop.take().unwrap().send(()).unwrap();
        let r = (&mut self.agent).await.unwrap();
        (r, self)
    }

    /// Waits for the agent to end on its own.
    async fn ended(&mut self) -> Result<(), AgentError> {
        tokio::time::timeout(Duration::from_secs(3600), &mut self.agent)
            .await
            .expect("the agent to end")
            .unwrap()
    }
}

#[tokio::test(start_paused = true)]
async fn start_up_leases_a_subnet_writes_subnet_env_and_installs_the_rules() {
    let mem = etcd();
    let n = Node::ready(&mem).await;
    let subnet = n.subnet();
    assert!(net(NETWORK).contains(subnet.network()) && subnet.prefix() == 24);
    assert!(n.lease_id(subnet).await.unwrap() != 0, "a TTL lease");
    let env = n.subnet_env();
    assert_eq!(
        (env.node_subnet(), env.mtu, env.ipmasq),
        (Some(subnet), 1500, true)
    );
    assert_eq!(n.rules.applied(), vec![n.rules_for(subnet)]);
    let s = n.state.snapshot();
    assert_eq!(
        (
            s.public_ip.as_str(),
            s.backend.as_str(),
            s.backend_implementation.as_str()
        ),
        (OUR_IP, "host-gw", "kernel")
    );
    assert!(n
        .state
        .metrics
        .render()
        .contains("tweed_backend_info{backend=\"host-gw\",implementation=\"kernel\"} 1"));
    // The clock the deps hand in is the one expiry is reported on.
    assert_eq!(s.lease_expiry_unix, 1_700_000_000 + 3600);
    // host-gw has no device: nothing to program without peers.
    assert_eq!(n.kernel.take_ops(), vec![]);
}

#[tokio::test(start_paused = true)]
async fn peers_added_and_removed_are_exactly_their_routes() {
    let mem = etcd();
    let n = Node::ready(&mem).await;
    n.kernel.take_ops();

    put_peer(&mem, "10.244.7.0/24", "198.18.0.2");
    n.until("the peer to be programmed", |s| {
        s.peers.len() == 1 && s.peers.first().is_some_and(|p| p.programmed)
    })
    .await;
    let route = n.route("10.244.7.0/24", "198.18.0.2");
    assert_eq!(n.kernel.take_ops(), vec![Op::RouteReplace(route)]);

    // A peer of another backend is reported, not programmed.
    let vx = r#"{"PublicIP":"198.18.0.3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:03"}}"#;
    mem.put_raw(&key("10.244.8.0/24"), vx.as_bytes());
    n.until("the vxlan peer to be reported", |s| s.peers.len() == 2)
        .await;
    let s = n.state.snapshot();
    let skipped = s
        .peers
        .iter()
        .find(|p| p.subnet == "10.244.8.0/24")
        .unwrap();
    assert!(!skipped.programmed && skipped.error.as_deref().unwrap().contains("vxlan"));
    assert_eq!(n.kernel.take_ops(), vec![]);

    // Periodic resyncs re-read the kernel and change nothing that is right.
    tokio::time::sleep(Duration::from_secs(150)).await;
    assert_eq!(n.kernel.take_ops(), vec![]);

    mem.delete_raw(&key("10.244.7.0/24"));
    n.until("the peer to be gone", |s| s.peers.len() == 1).await;
    assert_eq!(n.kernel.take_ops(), vec![Op::RouteDel(route)]);
}

#[tokio::test(start_paused = true)]
async fn a_deleted_lease_is_acquired_again_with_the_same_subnet() {
    let (mem, n, subnet, old) = Node::with_a_peer().await;

    assert!(mem.delete_raw(&SubnetKey::new(subnet).etcd_key(PREFIX)));
    n.until("a second lease", |_| {
        n.counter("lease_acquisitions", "") == 2
    })
    .await;
    let new = n.lease_id(subnet).await.expect("our key is back");
    assert!(new != 0 && new != old, "a fresh TTL lease: {old} -> {new}");
    assert_eq!(n.subnet(), subnet);
    assert_eq!(n.subnet_env().node_subnet(), Some(subnet));
    // Same subnet: the data plane and the rules had nothing to change.
    assert_eq!(n.kernel.take_ops(), vec![]);
    assert_eq!(n.rules.applied(), vec![n.rules_for(subnet)]);
}

#[tokio::test(start_paused = true)]
async fn a_lease_taken_while_lost_moves_us_to_another_subnet() {
    let mem = etcd();
    let n = Node::ready(&mem).await;
    let old = n.subnet();
    n.kernel.take_ops();

    // Deleted, and another node takes the subnet before we can.
    let k = SubnetKey::new(old).etcd_key(PREFIX);
    mem.delete_raw(&k);
    mem.put_raw(&k, br#"{"PublicIP":"198.18.0.9","BackendType":"host-gw"}"#);
    n.until("a lease elsewhere", |s| s.subnet != old.to_string())
        .await;
    let new = n.subnet();
    n.until("the new neighbour programmed", |s| {
        s.peers
            .iter()
            .any(|p| p.subnet == old.to_string() && p.programmed)
    })
    .await;
    assert_eq!(n.subnet_env().node_subnet(), Some(new));
    assert_eq!(n.rules.applied(), vec![n.rules_for(old), n.rules_for(new)]);
    // The old subnet is a peer's now: routed to it, not ours.
    assert_eq!(
        n.kernel.take_ops(),
        vec![Op::RouteReplace(n.route(&old.to_string(), "198.18.0.9"))]
    );
}

#[tokio::test(start_paused = true)]
async fn an_etcd_outage_keeps_the_lease_and_the_data_plane() {
    let (mem, n, subnet, lease) = Node::with_a_peer().await;

    mem.set_reachable(false);
    n.until("the watch to be down", |s| !s.watch_live).await;
    // 50 minutes: the renewal at 40 fails and is retried; the lease (1 h) has not run out.
    tokio::time::sleep(Duration::from_secs(50 * 60)).await;
    assert!(n.counter("lease_failures", "renew") > 0);
    assert!(n.counter("etcd_errors", "watch") > 0);
    let s = n.state.snapshot();
    assert!(
        s.lease_held && s.backend_programmed && s.peers.first().is_some_and(|p| p.programmed),
        "{s:?}"
    );
    assert_eq!(n.kernel.take_ops(), vec![], "nothing torn down or redone");
    assert!(n.peer_routed().await);

    mem.set_reachable(true);
    n.until("the watch to be back", |s| s.watch_live).await;
    n.until("a renewal", |_| n.counter("lease_renewals", "") > 0)
        .await;
    assert_eq!(
        n.lease_id(subnet).await,
        Some(lease),
        "the same lease, renewed"
    );
    assert_eq!(n.counter("lease_acquisitions", ""), 1);
    assert_eq!(n.kernel.take_ops(), vec![]);
}

#[tokio::test(start_paused = true)]
async fn an_outage_longer_than_the_ttl_loses_the_lease_and_takes_it_again() {
    let (mem, n, subnet, old) = Node::with_a_peer().await;

    mem.set_reachable(false);
    tokio::time::sleep(Duration::from_secs(90 * 60)).await;
    mem.set_reachable(true);
    n.until("a second lease", |_| {
        n.counter("lease_acquisitions", "") >= 2
    })
    .await;
    n.until("ready again", |s| s.not_ready().is_empty()).await;
    let new = n.lease_id(subnet).await.expect("the same subnet again");
    assert!(new != old, "a fresh lease");
    assert_eq!(n.subnet(), subnet);
    // Programmed all along: the peer's route was never withdrawn.
    assert_eq!(n.kernel.take_ops(), vec![]);
    assert!(n.peer_routed().await);
}

#[tokio::test(start_paused = true)]
async fn shutdown_leaves_the_lease_and_the_data_plane_in_place() {
    let (_mem, n, subnet, lease) = Node::with_a_peer().await;

    let (result, n) = n.shut_down().await;
    result.expect("a clean shutdown");
    assert_eq!(
        n.lease_id(subnet).await,
        Some(lease),
        "the lease is not revoked"
    );
    assert_eq!(n.kernel.take_ops(), vec![], "nothing deleted");
    assert!(n.peer_routed().await);
    assert_eq!(n.subnet_env().node_subnet(), Some(subnet));
    assert_eq!(n.rules.applied(), vec![n.rules_for(subnet)]);
}

/// A task the agent cannot work without dies: the agent ends with an error naming it (so the
/// process exits non-zero), leaving the lease in place for the restart.
#[tokio::test(start_paused = true)]
async fn a_dead_task_ends_the_agent_with_an_error_naming_it() {
    for (op, task) in [
        (MemOp::WatchNext, "lease watch"),
        (MemOp::Renew, "lease renewal"),
    ] {
        let mem = etcd();
        let mut n = Node::ready(&mem).await;
        mem.panic_next(op);
        let e = n.ended().await.unwrap_err().to_string();
        assert!(e.contains(task) && e.contains("injected panic"), "{e}");
        assert!(n.lease_id(n.subnet()).await.is_some());
    }
}

#[tokio::test(start_paused = true)]
async fn a_deleted_peer_route_is_put_back_a_debounce_window_after_its_notification() {
    let (_mem, n, _, _) = Node::with_a_peer().await;
    let nl = Netlink::from(n.kernel.clone());
    let route = n.route("10.244.7.0/24", "198.18.0.2");
    // The echoes of the start-up's own writes have been read by then: no window is open.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(n.kernel.take_ops(), vec![]);
    let t0 = Instant::now();
    nl.apply(&Op::RouteDel(route)).await.unwrap();
    while !n.peer_routed().await {
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "not repaired within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = t0.elapsed();
    assert!(
        took >= super::repair::DEBOUNCE && took < super::repair::DEBOUNCE * 2,
        "{took:?}"
    );
    assert_eq!(
        n.kernel.take_ops(),
        vec![Op::RouteDel(route), Op::RouteReplace(route)],
        "exactly the deleted route is written back"
    );
    assert_eq!(n.counter("repairs", "route"), 1);
    assert_eq!(n.state.metrics.repair_seconds.get_sample_count(), 1);
    // The echo of the repair's own write is read and changes nothing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(n.kernel.take_ops(), vec![]);
    assert_eq!(n.counter("repairs", "route"), 1);
}

#[tokio::test(start_paused = true)]
async fn the_periodic_relist_writes_nothing_without_drift_and_repairs_unnoticed_drift() {
    let (_mem, n, _, _) = Node::with_a_peer().await;
    tokio::time::sleep(Duration::from_secs(3 * 60 + 1)).await;
    assert_eq!(n.kernel.take_ops(), vec![], "three relists, zero writes");
    assert_eq!(n.state.metrics.repair_seconds.get_sample_count(), 0);
    // A stray route into the overlay that no notification told about (the fake's add_route
    // is silent, like a notification the kernel dropped): the next relist removes it.
    let stray = n.route("10.244.9.0/24", "198.18.0.9");
    n.kernel.add_route(stray);
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(n.kernel.take_ops(), vec![Op::RouteDel(stray)]);
    assert_eq!(n.counter("repairs", "route"), 1);
    assert!(n.peer_routed().await);
}

#[tokio::test(start_paused = true)]
async fn a_repair_the_kernel_refuses_is_retried_with_backoff_until_it_holds() {
    let (_mem, n, _, _) = Node::with_a_peer().await;
    let nl = Netlink::from(n.kernel.clone());
    let route = n.route("10.244.7.0/24", "198.18.0.2");
    n.kernel
        .fail_when(|op| matches!(op, Op::RouteReplace(_)).then_some(libc::ENETDOWN));
    nl.apply(&Op::RouteDel(route)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tries = n
        .kernel
        .take_ops()
        .iter()
        .filter(|o| matches!(o, Op::RouteReplace(_)))
        .count();
    // 0.1 s, then 0.2, 0.4 and 0.8 s later: four tries in two seconds, not a busy loop.
    assert_eq!(tries, 4);
    assert!(!n.peer_routed().await);
    assert!(
        !n.state.snapshot().not_ready().is_empty(),
        "not ready meanwhile"
    );
    n.kernel.clear_failures();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(n.peer_routed().await);
    assert!(n.state.snapshot().not_ready().is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_underlay_mtu_change_reaches_subnet_env_and_the_metrics() {
    let (_mem, n, _, _) = Node::with_a_peer().await;
    assert_eq!(n.subnet_env().mtu, 1500);
    let nl = Netlink::from(n.kernel.clone());
    let mut eth0 = nl.link_by_index(n.eth0).await.unwrap().unwrap();
    eth0.mtu = 9000;
    // Changed behind the agent's back (put_link is silent), then announced as the kernel would.
    n.kernel.put_link(eth0.clone());
    n.kernel.announce(crate::netlink::Event::Link(
        crate::netlink::Change::New,
        eth0,
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    // host-gw: pods get the underlay's MTU itself.
    assert_eq!(n.subnet_env().mtu, 9000);
    assert_eq!(n.state.snapshot().mtu, 9000);
    assert_eq!(n.counter("repairs", "mtu"), 1);
    assert!(n.peer_routed().await);
}

/// etcd with a dual-stack host-gw network config.
fn dual_etcd() -> MemRegistry {
    dual_etcd_with("host-gw")
}

/// etcd with a dual-stack network config for `backend`.
fn dual_etcd_with(backend: &str) -> MemRegistry {
    let mem = MemRegistry::new(PREFIX);
    mem.put_raw(
        &format!("{PREFIX}/config"),
        format!(
            r#"{{"Network":"{NETWORK}",{SUBNET_MIN},"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{{"Type":"{backend}"}}}}"#
        )
        .as_bytes(),
    );
    mem
}

/// Dual-stack vxlan: pods are told the smaller of `tweed.1` (underlay - 50) and `tweed-v6.1`
/// (underlay - 70), also after the underlay's MTU changes; each device keeps its own MTU.
#[tokio::test(start_paused = true)]
async fn dual_stack_vxlan_pods_get_the_ipv6_device_mtu_and_it_follows_the_underlay() {
    let mem = dual_etcd_with("vxlan");
    let n = Node::start_with_v6(&mem, "20010db8000000000000000000000001 IDX 40 00 80 eth0\n");
    n.until("the agent to be ready", |s| s.not_ready().is_empty())
        .await;
    let nl = Netlink::from(n.kernel.clone());
    let device_mtus = || async {
        let v4 = nl.link_by_name("tweed.1").await.unwrap().unwrap().mtu;
        let v6 = nl.link_by_name("tweed-v6.1").await.unwrap().unwrap().mtu;
        (v4, v6)
    };
    assert_eq!(n.state.snapshot().ipv6, "dual-stack");
    assert_eq!(device_mtus().await, (1450, 1430));
    assert_eq!(n.subnet_env().mtu, 1430);
    assert_eq!(n.state.snapshot().mtu, 1430);
    let mut eth0 = nl.link_by_index(n.eth0).await.unwrap().unwrap();
    eth0.mtu = 9000;
    n.kernel.put_link(eth0.clone());
    n.kernel.announce(crate::netlink::Event::Link(
        crate::netlink::Change::New,
        eth0,
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(device_mtus().await, (8950, 8930));
    assert_eq!(n.subnet_env().mtu, 8930);
    assert_eq!(n.state.snapshot().mtu, 8930);
    assert_eq!(n.counter("repairs", "mtu"), 1);
}

/// Our key in etcd and its value, whatever its form.
async fn own_key(mem: &MemRegistry) -> (String, LeaseAttrs) {
    let snap = Registry::Mem(mem.clone()).list_leases().await.unwrap();
    let l = snap
        .leases
        .iter()
        .find(|l| LeaseAttrs::parse(&l.value).is_ok_and(|a| a.public_ip == ip(OUR_IP)))
        .expect("our lease");
    let name = l.key.rsplit('/').next().unwrap().to_string();
    (name, LeaseAttrs::parse(&l.value).unwrap())
}

#[tokio::test(start_paused = true)]
async fn a_node_with_a_global_ipv6_address_takes_a_dual_stack_lease() {
    let mem = dual_etcd();
    // A link-local address is passed over, and so is another interface's global one.
    let n = Node::start_with_v6(
        &mem,
        "fe800000000000000000000000000001 IDX 40 20 80 eth0\n\
         20010db80000000000000000000000ff 7f 40 00 80 eth9\n\
         20010db8000000000000000000000001 IDX 40 00 80 eth0\n",
    );
    n.until("the agent to be ready", |s| s.not_ready().is_empty())
        .await;
    let (key, attrs) = own_key(&mem).await;
    let parsed: SubnetKey = key.parse().unwrap();
    let v6_subnet = parsed.ipv6.expect("a dual-stack key");
    assert_eq!(attrs.public_ipv6, Some("2001:db8::1".parse().unwrap()));
    let s = n.state.snapshot();
    assert_eq!(
        (s.ipv6.as_str(), s.public_ipv6.as_str(), s.subnet_v6),
        ("dual-stack", "2001:db8::1", v6_subnet.to_string())
    );
    // subnet.env: the IPv6 pair in flannel's form (first address/len), read back as such.
    let env = n.subnet_env();
    let env6 = env.ipv6.expect("TWEED_IPV6_* written");
    assert_eq!(env6.network.to_string(), "fd00:10:244::/56");
    assert_eq!(env6.node_subnet(), v6_subnet);
    assert_eq!(
        u128::from(env6.subnet.ip()),
        u128::from(v6_subnet.network()) + 1
    );
    let text = std::fs::read_to_string(n.dir.path().join("subnet.env")).unwrap();
    assert!(
        text.contains(&format!("TWEED_IPV6_SUBNET={}1/64\n", v6_subnet.ip())),
        "{text}"
    );
    assert!(n.state.metrics.render().contains(&format!(
        "tweed_lease_ipv6_info{{subnet=\"{v6_subnet}\"}} 1"
    )));
    // The IPv6 rules follow the lease's IPv6 half.
    let rules = n.rules.applied();
    assert_eq!(
        rules.last().and_then(|r| r.ipv6),
        Some(crate::rules::RuleSpecV6 {
            network: "fd00:10:244::/56".parse().unwrap(),
            subnet: v6_subnet,
        })
    );
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        n.rules.v6_removals(),
        0,
        "a dual-stack node keeps its IPv6 rules"
    );
}

#[tokio::test(start_paused = true)]
async fn a_node_without_ipv6_in_a_dual_stack_network_runs_ipv4_only_and_says_so() {
    let mem = dual_etcd();
    let n = Node::start_with_v6(
        &mem,
        "fe800000000000000000000000000001 IDX 40 20 80 eth0\n\
         20010db80000000000000000000000ff 7f 40 00 80 eth9\n",
    );
    n.until("the agent to be ready", |s| s.not_ready().is_empty())
        .await;
    let (key, attrs) = own_key(&mem).await;
    assert_eq!(key.parse::<SubnetKey>().unwrap().ipv6, None, "{key}");
    assert_eq!(attrs.public_ipv6, None);
    let s = n.state.snapshot();
    assert!(
        s.ipv6.starts_with("IPv4 only") && s.ipv6.contains("eth0"),
        "{}",
        s.ipv6
    );
    assert_eq!((s.public_ipv6.as_str(), s.subnet_v6.as_str()), ("", ""));
    assert_eq!(n.subnet_env().ipv6, None);
    assert!(!n.state.metrics.render().contains("tweed_lease_ipv6_info{"));
    assert!(n.rules.applied().iter().all(|r| r.ipv6.is_none()));
    // IPv6 rules an earlier dual-stack run may have left are looked for once, not at every
    // rule check (a host without IPv6 may have no working ip6tables).
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(n.rules.v6_removals(), 1);
}

/// Review finding 1 of issue 19: a peer renames its lease (it restarted with an IPv6 address, then
/// without one): its new key is created while the old one stands, the old one deleted, and the
/// new one written again, as `subnet::rename` does. Its IPv4 route is never deleted: the rename
/// is an update, not a remove and an add.
#[tokio::test(start_paused = true)]
async fn a_peer_renaming_its_lease_keeps_its_ipv4_route() {
    let (mem, n, _, _) = Node::with_a_peer().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(n.kernel.take_ops(), vec![]);
    let v4 = key("10.244.7.0/24");
    let dual = format!("{PREFIX}/subnets/10.244.7.0-24&fd00:10:244:7::-64");
    let v4_value = r#"{"PublicIP":"198.18.0.2","BackendType":"host-gw"}"#;
    let dual_value =
        r#"{"PublicIP":"198.18.0.2","PublicIPv6":"2001:db8::2","BackendType":"host-gw"}"#;
    for (from, to, value) in [(&v4, &dual, dual_value), (&dual, &v4, v4_value)] {
        mem.put_raw(to, value.as_bytes());
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(mem.delete_raw(from));
        tokio::time::sleep(Duration::from_secs(1)).await;
        mem.put_raw(to, value.as_bytes());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let ops = n.kernel.take_ops();
        assert!(
            !ops.iter().any(|o| matches!(o, Op::RouteDel(_))),
            "{from} -> {to}: the route was deleted: {ops:?}"
        );
        assert!(n.peer_routed().await, "{from} -> {to}");
        let s = n.state.snapshot();
        assert_eq!(s.peers.len(), 1, "{:?}", s.peers);
        assert!(
            s.peers.first().is_some_and(|p| p.programmed),
            "{:?}",
            s.peers
        );
    }
}

/// Issue 19: a node that started IPv4 only in a dual-stack network (no global IPv6 address on
/// eth0) turns dual stack when one appears: its lease takes the IPv6 half under flannel's
/// `v4&v6` key (the IPv4 subnet kept), advertises the address as `PublicIPv6`, subnet.env and
/// the rules gain the IPv6 pair, and the peer's IPv6 subnet is routed; the IPv4 route to the
/// peer is never withdrawn on the way.
#[tokio::test(start_paused = true)]
async fn an_ipv4_only_node_turns_dual_stack_when_an_ipv6_address_appears() {
    let mem = dual_etcd();
    let peer = format!("{PREFIX}/subnets/10.244.7.0-24&fd00:10:244:7::-64");
    mem.put_raw(
        &peer,
        br#"{"PublicIP":"198.18.0.2","PublicIPv6":"2001:db8::2","BackendType":"host-gw"}"#,
    );
    let listed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let shared = listed.clone();
    let n = Node::start_with_addrs(&mem, move |_| crate::ipv6::Ipv6Addrs::Shared(shared));
    n.until("the agent to be ready", |s| s.not_ready().is_empty())
        .await;
    assert!(n.state.snapshot().ipv6.starts_with("IPv4 only"));
    let (key, _) = own_key(&mem).await;
    let v4 = key.parse::<SubnetKey>().unwrap().ipv4;
    assert_eq!(n.subnet_env().ipv6, None);
    n.kernel.take_ops();

    // A tentative address (DAD running) is not used yet.
    let addr = |flags: u32| crate::ipv6::Inet6Addr {
        ifindex: n.eth0,
        addr: "2001:db8::1".parse().unwrap(),
        prefix: 64,
        scope: 0,
        flags,
    };
    let announce = |tentative| {
        n.kernel.announce(crate::netlink::Event::Addr6(
            crate::netlink::Change::New,
            crate::netlink::Addr6 {
                ifindex: n.eth0,
                net: "2001:db8::1/64".parse().unwrap(),
                tentative,
            },
        ))
    };
    *listed.lock().unwrap() = vec![addr(0x80 | 0x40)];
    announce(true);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(n.state.snapshot().ipv6.starts_with("IPv4 only"));
    assert_eq!(own_key(&mem).await.0, key, "the lease is left alone");

    // DAD done; the kernel has the address's connected route (host-gw's same-segment check).
    let nl = Netlink::from(n.kernel.clone());
    nl.apply(&Op::Route6Replace(crate::netlink::Route6 {
        dst: "2001:db8::/64".parse().unwrap(),
        gateway: None,
        oif: Some(n.eth0),
        onlink: false,
        metric: 256,
        protocol: Route::PROTO_KERNEL,
    }))
    .await
    .unwrap();
    *listed.lock().unwrap() = vec![addr(0x80)];
    announce(false);
    n.until("dual stack", |s| s.ipv6 == "dual-stack").await;
    n.until("the IPv6 half in subnet.env", |_| {
        n.subnet_env().ipv6.is_some()
    })
    .await;
    let (key, attrs) = own_key(&mem).await;
    let parsed: SubnetKey = key.parse().unwrap();
    assert_eq!(parsed.ipv4, v4, "the IPv4 half is kept: {key}");
    let v6 = parsed.ipv6.expect("flannel's v4&v6 key");
    assert_eq!(attrs.public_ipv6, Some("2001:db8::1".parse().unwrap()));
    assert_eq!(n.subnet_env().ipv6.unwrap().node_subnet(), v6);
    assert_eq!(n.subnet_env().node_subnet(), Some(v4));
    let s = n.state.snapshot();
    assert_eq!(
        (s.public_ipv6.as_str(), s.subnet_v6.clone()),
        ("2001:db8::1", v6.to_string())
    );
    n.until("the IPv6 rules", |_| {
        n.rules.applied().last().and_then(|r| r.ipv6)
            == Some(crate::rules::RuleSpecV6 {
                network: "fd00:10:244::/56".parse().unwrap(),
                subnet: v6,
            })
    })
    .await;
    let routes6 = nl.all_routes6().await.unwrap();
    assert!(
        routes6
            .iter()
            .any(|r| r.dst.to_string() == "fd00:10:244:7::/64"
                && r.gateway == Some("2001:db8::2".parse().unwrap())),
        "{routes6:?}"
    );
    let ops = n.kernel.take_ops();
    assert!(
        !ops.iter().any(|o| matches!(o, Op::RouteDel(_))),
        "an IPv4 route was withdrawn: {ops:?}"
    );
    assert!(nl
        .all_routes()
        .await
        .unwrap()
        .contains(&n.route("10.244.7.0/24", "198.18.0.2")));
    // Only our renamed key and the peer's remain: the IPv4-only key is gone.
    let snap = Registry::Mem(mem.clone()).list_leases().await.unwrap();
    assert_eq!(
        snap.leases.len(),
        2,
        "{:?}",
        snap.leases.iter().map(|l| &l.key).collect::<Vec<_>>()
    );
}

/// A dual-stack host-gw node with eth0's address 2001:db8::1 listed in `listed` (the test
/// changes it), its connected route, and one dual-stack peer (10.244.7.0/24 at 198.18.0.2,
/// 2001:db8::2) routed over both families.
async fn dual_node_with_a_peer(
    mem: &MemRegistry,
) -> (
    Node,
    std::sync::Arc<std::sync::Mutex<Vec<crate::ipv6::Inet6Addr>>>,
) {
    let peer = format!("{PREFIX}/subnets/10.244.7.0-24&fd00:10:244:7::-64");
    mem.put_raw(
        &peer,
        br#"{"PublicIP":"198.18.0.2","PublicIPv6":"2001:db8::2","BackendType":"host-gw"}"#,
    );
    let listed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let shared = listed.clone();
    let n = Node::start_with_addrs(mem, move |eth0| {
        *shared.lock().unwrap() = vec![eth0_addr6(eth0)];
        crate::ipv6::Ipv6Addrs::Shared(shared)
    });
    Netlink::from(n.kernel.clone())
        .apply(&Op::Route6Replace(crate::netlink::Route6 {
            dst: "2001:db8::/64".parse().unwrap(),
            gateway: None,
            oif: Some(n.eth0),
            onlink: false,
            metric: 256,
            protocol: Route::PROTO_KERNEL,
        }))
        .await
        .unwrap();
    n.until("the agent to be ready", |s| s.not_ready().is_empty())
        .await;
    n.until("the route to the peer's IPv6 subnet", |_| {
        n.kernel
            .ops()
            .iter()
            .any(|o| matches!(o, Op::Route6Replace(r) if r.dst.to_string() == "fd00:10:244:7::/64"))
    })
    .await;
    assert_eq!(n.state.snapshot().ipv6, "dual-stack");
    (n, listed)
}

fn eth0_addr6(eth0: u32) -> crate::ipv6::Inet6Addr {
    crate::ipv6::Inet6Addr {
        ifindex: eth0,
        addr: "2001:db8::1".parse().unwrap(),
        prefix: 64,
        scope: 0,
        flags: 0x80,
    }
}

impl Node {
    /// eth0's IPv6 address 2001:db8::1 removed (`present` false) or added again, with the
    /// kernel's notification.
    fn set_addr6(&self, listed: &std::sync::Mutex<Vec<crate::ipv6::Inet6Addr>>, present: bool) {
        *listed.lock().unwrap() = if present {
            vec![eth0_addr6(self.eth0)]
        } else {
            Vec::new()
        };
        let change = if present {
            crate::netlink::Change::New
        } else {
            crate::netlink::Change::Del
        };
        self.kernel.announce(crate::netlink::Event::Addr6(
            change,
            crate::netlink::Addr6 {
                ifindex: self.eth0,
                net: "2001:db8::1/64".parse().unwrap(),
                tentative: false,
            },
        ));
    }

    async fn routes6_to(&self, dst: &str) -> Vec<crate::netlink::Route6> {
        let nl = Netlink::from(self.kernel.clone());
        nl.all_routes6()
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.dst.to_string() == dst)
            .collect()
    }

    /// Whether the node is IPv4 only in every place that says so: status, metrics, subnet.env.
    fn says_ipv4_only(&self) -> bool {
        let s = self.state.snapshot();
        s.ipv6.starts_with("IPv4 only")
            && s.public_ipv6.is_empty()
            && s.subnet_v6.is_empty()
            && self.subnet_env().ipv6.is_none()
            && !self
                .state
                .metrics
                .render()
                .contains("tweed_lease_ipv6_info{")
    }
}

/// Issue 19, the reverse switch: a dual-stack host-gw node whose only IPv6 address on eth0
/// goes away. Back within the grace period, nothing changes. Gone for longer, the node turns
/// IPv4 only without a restart: its key is renamed to the IPv4-only form (the IPv4 subnet and
/// the peer's IPv4 route kept), the lease no longer advertises a `PublicIPv6`, subnet.env, the
/// status and the metrics say IPv4 only, the IPv6 route to the peer and the IPv6 rules are
/// removed. The address back, it turns dual stack again.
#[tokio::test(start_paused = true)]
async fn a_dual_stack_node_whose_ipv6_address_goes_turns_ipv4_only_and_back() {
    let mem = dual_etcd();
    let (n, listed) = dual_node_with_a_peer(&mem).await;
    let (dual_key, _) = own_key(&mem).await;
    let v4 = dual_key.parse::<SubnetKey>().unwrap().ipv4;
    let dual_lease = lease_of(&mem, &dual_key).await;
    assert_ne!(dual_lease, 0);
    assert_eq!(n.rules.v6_removals(), 0);
    n.kernel.take_ops();

    // A flap: back within the grace.
    n.set_addr6(&listed, false);
    tokio::time::sleep(super::underlay6::GRACE / 2).await;
    n.set_addr6(&listed, true);
    tokio::time::sleep(super::underlay6::GRACE * 3).await;
    assert_eq!(own_key(&mem).await.0, dual_key, "a flap renames nothing");
    assert_eq!(n.state.snapshot().ipv6, "dual-stack");
    assert!(n.subnet_env().ipv6.is_some());
    assert_eq!(n.kernel.take_ops(), vec![], "a flap changes nothing");

    // Gone for good.
    let gone_at = Instant::now();
    n.set_addr6(&listed, false);
    tokio::time::sleep(super::underlay6::GRACE - Duration::from_millis(200)).await;
    assert_eq!(own_key(&mem).await.0, dual_key, "not within the grace");
    n.until("IPv4 only", |_| n.says_ipv4_only()).await;
    assert!(gone_at.elapsed() >= super::underlay6::GRACE);
    let (key, attrs) = own_key(&mem).await;
    let parsed: SubnetKey = key.parse().unwrap();
    assert_eq!((parsed.ipv4, parsed.ipv6), (v4, None), "{key}");
    assert_eq!(attrs.public_ipv6, None);
    assert!(attrs.backend_v6_data.is_none());
    let snap = Registry::Mem(mem.clone()).list_leases().await.unwrap();
    let keys: Vec<&str> = snap.leases.iter().map(|l| l.key.as_str()).collect();
    assert_eq!(keys.len(), 2, "the dual key is gone: {keys:?}");
    assert_eq!(n.subnet_env().node_subnet(), Some(v4));
    assert_eq!(n.state.snapshot().subnet, v4.to_string());
    n.until("the IPv6 route to the peer removed", |_| {
        futures::executor::block_on(n.routes6_to("fd00:10:244:7::/64")).is_empty()
    })
    .await;
    n.until("the IPv6 rules removed", |_| n.rules.v6_removals() == 1)
        .await;
    assert_eq!(n.rules.applied().last().and_then(|r| r.ipv6), None);
    let ops = n.kernel.take_ops();
    assert!(
        !ops.iter().any(|o| matches!(o, Op::RouteDel(_))),
        "an IPv4 route was withdrawn: {ops:?}"
    );
    assert!(n.peer_routed().await, "the peer's IPv4 route is kept");
    // Settled: no more removals, renames or writes.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(n.rules.v6_removals(), 1);
    assert_eq!(own_key(&mem).await.0, key);
    let v4_lease = lease_of(&mem, &key).await;
    assert!(
        mem.lease_alive(v4_lease),
        "the IPv4-only key's lease is renewed"
    );
    assert!(
        !mem.lease_alive(dual_lease),
        "the dual key's lease is revoked, not left to its TTL"
    );
    assert_eq!(n.kernel.take_ops(), vec![]);

    // Back: dual stack again, on the same IPv4 subnet.
    n.set_addr6(&listed, true);
    n.until("dual stack again", |s| s.ipv6 == "dual-stack")
        .await;
    n.until("subnet.env's IPv6 half", |_| n.subnet_env().ipv6.is_some())
        .await;
    let (key, attrs) = own_key(&mem).await;
    assert_eq!(key, dual_key, "both halves taken back");
    assert_eq!(attrs.public_ipv6, Some("2001:db8::1".parse().unwrap()));
    n.until("the IPv6 route to the peer back", |_| {
        !futures::executor::block_on(n.routes6_to("fd00:10:244:7::/64")).is_empty()
    })
    .await;
    assert!(n.peer_routed().await);
    n.until("the IPv4-only key's lease revoked", |_| {
        !mem.lease_alive(v4_lease)
    })
    .await;
    assert!(mem.lease_alive(lease_of(&mem, &dual_key).await));
}

/// The TTL lease id etcd holds our key `key` (as `own_key` names it) under.
async fn lease_of(mem: &MemRegistry, key: &str) -> i64 {
    let full = format!("{PREFIX}/subnets/{key}");
    let snap = Registry::Mem(mem.clone()).list_leases().await.unwrap();
    snap.leases.iter().find(|l| l.key == full).unwrap().lease_id
}

/// Issue 19, review pitfalls 2 and 3: the rename to the IPv4-only key waits out an etcd outage
/// without holding the main loop (a deleted peer route is put back meanwhile), the node stays
/// dual stack in every place until the rename is done, and a lease that expired meanwhile is
/// taken back IPv4 only on its subnet, with the lease, subnet.env and the plane agreeing.
#[tokio::test(start_paused = true)]
async fn turning_ipv4_only_waits_out_an_etcd_outage_and_a_lost_lease() {
    let mem = dual_etcd();
    let (n, listed) = dual_node_with_a_peer(&mem).await;
    let (dual_key, _) = own_key(&mem).await;
    let v4 = dual_key.parse::<SubnetKey>().unwrap().ipv4;
    let lease = n.lease_id(v4).await;
    assert_eq!(lease, None, "the dual key is not the IPv4-only one");
    let snap = Registry::Mem(mem.clone()).list_leases().await.unwrap();
    let lease = snap
        .leases
        .iter()
        .find(|l| l.key.ends_with(&dual_key))
        .unwrap()
        .lease_id;
    mem.set_reachable(false);
    n.set_addr6(&listed, false);
    tokio::time::sleep(super::underlay6::GRACE * 4).await;
    n.until("failed rename attempts", |_| {
        n.counter("lease_failures", "ipv4_only") >= 2
    })
    .await;
    let s = n.state.snapshot();
    assert_eq!(s.ipv6, "dual-stack", "dual until the rename is done");
    assert!(n.subnet_env().ipv6.is_some());
    assert_eq!(n.rules.v6_removals(), 0);

    // The main loop still serves the kernel: a deleted IPv4 route is put back.
    let nl = Netlink::from(n.kernel.clone());
    let route = n.route("10.244.7.0/24", "198.18.0.2");
    nl.apply(&Op::RouteDel(route)).await.unwrap();
    n.kernel.announce(crate::netlink::Event::Route(
        crate::netlink::Change::Del,
        route,
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(n.peer_routed().await, "repaired while etcd is away");

    // The lease expires meanwhile; etcd comes back.
    mem.expire_lease(lease);
    mem.set_reachable(true);
    n.until("IPv4 only", |_| n.says_ipv4_only()).await;
    let (key, attrs) = own_key(&mem).await;
    let parsed: SubnetKey = key.parse().unwrap();
    assert_eq!((parsed.ipv4, parsed.ipv6), (v4, None), "{key}");
    assert_eq!(attrs.public_ipv6, None);
    assert_eq!(n.subnet_env().node_subnet(), Some(v4));
    let snap = Registry::Mem(mem.clone()).list_leases().await.unwrap();
    assert_eq!(snap.leases.len(), 2, "{:?}", snap.leases);
    n.until("the IPv6 route removed", |_| {
        futures::executor::block_on(n.routes6_to("fd00:10:244:7::/64")).is_empty()
    })
    .await;
    assert!(n.peer_routed().await);
    // Held from now on: the renewal follows the new lease.
    let id = n.lease_id(v4).await.expect("the IPv4-only key");
    assert!(mem.lease_alive(id));
    tokio::time::sleep(Duration::from_secs(3 * 3600)).await;
    assert_eq!(n.lease_id(v4).await, Some(id), "renewed, not lost");
}

/// Issue 19, review pitfall 4: removing the IPv6 half is retried step by step until it holds:
/// an IPv6 route the kernel refuses to delete and ip6tables failing twice.
#[tokio::test(start_paused = true)]
async fn a_failed_ipv6_teardown_is_retried_until_it_holds() {
    let mem = dual_etcd();
    let (n, listed) = dual_node_with_a_peer(&mem).await;
    let refusals = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = refusals.clone();
    n.kernel.fail_when(move |op| {
        use std::sync::atomic::Ordering::SeqCst;
        (matches!(op, Op::Route6Del(_))
            && counted
                .fetch_update(SeqCst, SeqCst, |k| (k < 3).then_some(k + 1))
                .is_ok())
        .then_some(libc::EBUSY)
    });
    n.rules.fail_v6_removals(2);
    n.set_addr6(&listed, false);
    n.until("IPv4 only", |_| n.says_ipv4_only()).await;
    n.until("the IPv6 route removed", |_| {
        futures::executor::block_on(n.routes6_to("fd00:10:244:7::/64")).is_empty()
    })
    .await;
    n.until("the IPv6 rules removed", |_| n.rules.v6_removals() == 3)
        .await;
    assert_eq!(refusals.load(std::sync::atomic::Ordering::SeqCst), 3);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(n.rules.v6_removals(), 3, "done: not tried again");
    assert!(n.peer_routed().await);
}

/// Issue 19, review pitfall 3: our key is taken by another node while the rename to the
/// IPv4-only key waits for etcd (our lease expired meanwhile). The rename's acquisition takes
/// another subnet, IPv4 only, and the lease, subnet.env, the status and the backend all move to
/// it; the other node's key is left alone.
#[tokio::test(start_paused = true)]
async fn a_key_taken_during_the_switch_leaves_the_node_ipv4_only_on_another_subnet() {
    let mem = dual_etcd();
    let (n, listed) = dual_node_with_a_peer(&mem).await;
    let (dual_key, _) = own_key(&mem).await;
    let v4 = dual_key.parse::<SubnetKey>().unwrap().ipv4;
    let full = format!("{PREFIX}/subnets/{dual_key}");
    let snap = Registry::Mem(mem.clone()).list_leases().await.unwrap();
    let lease = snap.leases.iter().find(|l| l.key == full).unwrap().lease_id;
    mem.set_reachable(false);
    n.set_addr6(&listed, false);
    n.until("a failed rename attempt", |_| {
        n.counter("lease_failures", "ipv4_only") >= 1
    })
    .await;
    mem.expire_lease(lease);
    let thief = br#"{"PublicIP":"198.18.0.66","BackendType":"host-gw"}"#;
    mem.put_raw(&full, thief);
    mem.set_reachable(true);
    n.until("IPv4 only", |_| n.says_ipv4_only()).await;
    let (key, attrs) = own_key(&mem).await;
    let parsed: SubnetKey = key.parse().unwrap();
    assert_eq!(parsed.ipv6, None, "{key}");
    assert_ne!(parsed.ipv4, v4, "the taken subnet is not ours");
    assert_eq!(attrs.public_ipv6, None);
    n.until("subnet.env on the new subnet", |s| {
        s.subnet == parsed.ipv4.to_string() && n.subnet_env().node_subnet() == Some(parsed.ipv4)
    })
    .await;
    n.until("the rules for the new subnet", |_| {
        n.rules.applied().last() == Some(&n.rules_for(parsed.ipv4))
    })
    .await;
    let snap = Registry::Mem(mem.clone()).list_leases().await.unwrap();
    let held = snap.leases.iter().find(|l| l.key == full).unwrap();
    assert_eq!(
        held.value,
        thief.to_vec(),
        "the other node's key is left alone"
    );
    assert!(n.peer_routed().await);
    n.until("the IPv6 route removed", |_| {
        futures::executor::block_on(n.routes6_to("fd00:10:244:7::/64")).is_empty()
    })
    .await;
}

/// Issue 19, review pitfall 2: with a slow etcd (each listing takes 1 s) the rename to the
/// IPv4-only key is under way for seconds; meanwhile the main loop still repairs a deleted peer
/// route at once and the node says dual stack everywhere. A shutdown in the middle lets the
/// rename finish and commits it: etcd holds exactly the IPv4-only key and subnet.env agrees,
/// with no half-renamed key left.
#[tokio::test(start_paused = true)]
async fn a_slow_etcd_never_holds_the_main_loop_and_a_shutdown_lets_the_rename_finish() {
    let mem = dual_etcd();
    let (n, listed) = dual_node_with_a_peer(&mem).await;
    let (dual_key, _) = own_key(&mem).await;
    let v4 = dual_key.parse::<SubnetKey>().unwrap().ipv4;
    mem.set_list_delay(Duration::from_secs(1));
    n.set_addr6(&listed, false);
    n.until("the rename under way", |_| mem.keys().len() == 3)
        .await;
    // Both keys stand: the new one is created, the old one not deleted yet.
    let started = Instant::now();
    let nl = Netlink::from(n.kernel.clone());
    let route = n.route("10.244.7.0/24", "198.18.0.2");
    nl.apply(&Op::RouteDel(route)).await.unwrap();
    n.kernel.announce(crate::netlink::Event::Route(
        crate::netlink::Change::Del,
        route,
    ));
    n.until("the peer route put back", |_| {
        futures::executor::block_on(n.peer_routed())
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "the repair waited for etcd: {:?}",
        started.elapsed()
    );
    assert_eq!(n.state.snapshot().ipv6, "dual-stack");
    assert!(
        n.subnet_env().ipv6.is_some(),
        "dual until the rename is done"
    );

    let (end, n) = n.shut_down().await;
    end.unwrap();
    mem.set_list_delay(Duration::ZERO);
    let snap = Registry::Mem(mem.clone()).list_leases().await.unwrap();
    let keys: Vec<&str> = snap.leases.iter().map(|l| l.key.as_str()).collect();
    assert_eq!(keys.len(), 2, "no half-renamed key left: {keys:?}");
    let (key, _) = own_key(&mem).await;
    assert_eq!(key.parse::<SubnetKey>().unwrap(), SubnetKey::new(v4));
    let env = n.subnet_env();
    assert_eq!(
        (env.node_subnet(), env.ipv6),
        (Some(v4), None),
        "subnet.env agrees"
    );
}

/// Issue 20: the rules check (iptables/nft forked, 7.7-26 ms, seconds behind another program's
/// xtables lock) runs off the main loop. With a periodic check stuck (the fake holds it), the
/// node programs a new peer's route at once and keeps beating; the check's outcome (the rules
/// put back, `tweed_rules_resyncs_total`) comes when it ends, and a shutdown waits for the
/// check under way. Real time: a held check keeps tokio's paused clock from advancing.
#[tokio::test]
async fn a_lease_event_is_handled_while_a_slow_rules_check_runs() {
    let mem = etcd();
    let n = Node::ready(&mem).await;
    let subnet = n.subnet();
    // The first check ran before the node said ready, as before.
    assert_eq!(n.rules.applied(), vec![n.rules_for(subnet)]);
    assert_eq!(n.state.metrics.rules_resyncs.get(), 1);
    // The rules are deleted behind the agent's back; the next periodic check (every 5 s) is
    // to put them back, and is slow.
    n.rules.hold();
    n.rules.until_held(1, "no periodic check").await;
    // While it waits at the gate, before it reads the rules.
    n.rules.flush();
    let calls = n.rules.calls().len();
    put_peer(&mem, "10.244.7.0/24", "198.18.0.2");
    let put = std::time::Instant::now();
    while !n.peer_routed().await {
        assert!(
            put.elapsed() < Duration::from_secs(5),
            "the peer's route waited for the rules check"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(n.rules.held_syncs(), 1, "still under way");
    assert_eq!(n.rules.calls().len(), calls);
    // The loop kept beating (/healthz) behind the check.
    let beat = n.state.snapshot().loop_beat;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = n.state.snapshot();
    assert_eq!(s.not_alive(std::time::Instant::now()), None);
    assert!(s.loop_beat > beat, "the loop did not beat during the check");
    assert_eq!(n.rules.held_syncs(), 1);

    n.rules.release();
    n.until("the check's outcome counted", |_| {
        n.state.metrics.rules_resyncs.get() == 2
    })
    .await;
    assert_eq!(n.rules.calls()[calls], FakeCall::Sync(n.rules_for(subnet)));

    // The next periodic check (every 5 s) held, then a shutdown: it waits for that check.
    n.rules.hold();
    n.rules.until_held(1, "no periodic check").await;
    let calls = n.rules.calls().len();
    let release = {
        let rules = n.rules.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            rules.release();
        })
    };
    let began = std::time::Instant::now();
    let (end, n) = n.shut_down().await;
    release.join().unwrap();
    end.unwrap();
    assert!(
        began.elapsed() >= Duration::from_millis(250),
        "the shutdown did not wait for the check: {:?}",
        began.elapsed()
    );
    assert_eq!(n.rules.calls().len(), calls + 1, "the held check finished");
}
