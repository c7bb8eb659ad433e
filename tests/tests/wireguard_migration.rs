//! Issue 18 item 3: a running vxlan cluster migrated to wireguard (docs/wireguard.md, "Migrating
//! from vxlan"): the network config switched in etcd, then the agents restarted node by node
//! (or all at once), under a numbered UDP stream between the pods of every pair of hosts. Nodes
//! of different backends cannot reach each other, so a pair is cut off from the first of its two
//! restarts until the second one is up: measured per pair, bounded by the time between the two
//! restarts plus the later agent's start-up and a margin. Afterwards no vxlan device or route is
//! left and every pair reaches each other. A table is printed (`--nocapture`):
//!
//! ```sh
//! cargo build -p tweed-agent -p tweed-cni -p tweed-runtime --bins
//! sudo cargo test -p tweed-e2e --test wireguard_migration -- --nocapture
//! ```

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tweed_e2e::*;
use tweed_lab::{Backend, Lab, LabSpec};
use tweed_testkit::netns;

const PORT: u16 = 9478;
/// Datagrams per second from each pod to each other pod.
const RATE_HZ: u64 = 200;
/// What the bound allows beyond the restarts themselves: the first handshake, the watch
/// delivering the later lease, and this test's own polling on a loaded machine.
const MARGIN: Duration = Duration::from_secs(1);

/// Received datagrams: (source pod index, sequence number, arrival).
type Arrivals = Arc<Mutex<Vec<(usize, u64, Instant)>>>;

/// From every pod to every other pod, `RATE_HZ` numbered datagrams a second, sent and received
/// by threads that entered the pods' namespaces.
struct Mesh {
    stop: Arc<AtomicBool>,
    senders: Vec<JoinHandle<Vec<Instant>>>,
    receivers: Vec<JoinHandle<()>>,
    arrivals: Vec<Arrivals>,
}

/// A test that fails before [`Mesh::finish`] stops the threads too (the lab goes after them).
impl Drop for Mesh {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What the mesh saw from one pod to another.
struct Flow {
    lost: usize,
    /// The longest run of lost datagrams, from the send time of its first to that of the next
    /// one that arrived (`Duration::MAX`: none arrived after it).
    cut: Duration,
    /// When that run began.
    cut_from: Option<Instant>,
}

impl Mesh {
    fn start(pods: &[(String, Ipv4Addr)]) -> Mesh {
        let stop = Arc::new(AtomicBool::new(false));
        let mut receivers = Vec::new();
        let mut arrivals = Vec::new();
        for (ns, _) in pods {
            let got: Arrivals = Arc::default();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let (stop, got2, ns) = (stop.clone(), got.clone(), ns.clone());
            receivers.push(std::thread::spawn(move || {
                netns::enter(&ns, move || {
                    let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT))
                        .expect("bind in pod");
                    sock.set_read_timeout(Some(Duration::from_millis(50)))
                        .unwrap();
                    ready_tx.send(()).unwrap();
                    let mut buf = [0u8; 64];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok(9) = sock.recv(&mut buf) {
                            let seq = u64::from_be_bytes(buf[1..9].try_into().unwrap());
                            got2.lock()
                                .unwrap()
                                .push((buf[0] as usize, seq, Instant::now()));
                        }
                    }
                })
            }));
            ready_rx.recv().expect("receiver up");
            arrivals.push(got);
        }
        let senders = (0..pods.len())
            .map(|i| {
                let (stop, ns) = (stop.clone(), pods[i].0.clone());
                let dsts: Vec<SocketAddrV4> = pods
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, (_, ip))| SocketAddrV4::new(*ip, PORT))
                    .collect();
                std::thread::spawn(move || {
                    netns::enter(&ns, move || {
                        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
                        let start = Instant::now();
                        let mut sent = Vec::new();
                        while !stop.load(Ordering::Relaxed) {
                            let seq = sent.len() as u64;
                            let at = start + Duration::from_micros(seq * 1_000_000 / RATE_HZ);
                            if let Some(d) = at.checked_duration_since(Instant::now()) {
                                std::thread::sleep(d);
                            }
                            let mut msg = [i as u8; 9];
                            msg[1..].copy_from_slice(&seq.to_be_bytes());
                            // A missing route fails the send (ENETUNREACH): that datagram is lost.
                            for dst in &dsts {
                                let _ = sock.send_to(&msg, dst);
                            }
                            sent.push(Instant::now());
                        }
                        sent
                    })
                })
            })
            .collect();
        Mesh {
            stop,
            senders,
            receivers,
            arrivals,
        }
    }

    /// Waits until datagrams arrive on every flow.
    fn wait_flowing(&self) {
        let n = self.arrivals.len();
        wait_for(
            Duration::from_secs(10),
            "every flow to carry datagrams",
            || {
                self.arrivals.iter().enumerate().all(|(j, a)| {
                    let a = a.lock().unwrap();
                    (0..n).filter(|i| *i != j).all(|i| {
                        a.iter().filter(|(src, _, _)| *src == i).count() > 2 * RATE_HZ as usize / 10
                    })
                })
            },
        );
    }

    /// Stops the mesh; per (from, to): what it saw after `from_time`. Datagrams sent in the last
    /// 200 ms are left out: they may still be in flight when the receivers stop.
    fn finish(mut self, from_time: Instant) -> HashMap<(usize, usize), Flow> {
        let cutoff = Instant::now();
        std::thread::sleep(Duration::from_millis(200));
        self.stop.store(true, Ordering::Relaxed);
        let sent: Vec<Vec<Instant>> = std::mem::take(&mut self.senders)
            .into_iter()
            .map(|s| {
                let mut v = s.join().unwrap();
                v.retain(|t| *t < cutoff);
                v
            })
            .collect();
        for r in std::mem::take(&mut self.receivers) {
            r.join().unwrap();
        }
        let mut flows = HashMap::new();
        for (to, got) in self.arrivals.iter().enumerate() {
            let got = got.lock().unwrap();
            for (from, sent) in sent.iter().enumerate().filter(|(i, _)| *i != to) {
                let mut arrived = vec![false; sent.len()];
                for (_, seq, _) in got.iter().filter(|(src, _, _)| *src == from) {
                    if let Some(a) = arrived.get_mut(*seq as usize) {
                        *a = true;
                    }
                }
                let first = sent.partition_point(|t| *t < from_time);
                flows.insert((from, to), flow(&sent[first..], &arrived[first..]));
            }
        }
        flows
    }
}

/// The loss and longest cut of one flow, from its send times and which of them arrived.
fn flow(sent: &[Instant], arrived: &[bool]) -> Flow {
    let mut f = Flow {
        lost: arrived.iter().filter(|a| !**a).count(),
        cut: Duration::ZERO,
        cut_from: None,
    };
    let mut run_start: Option<usize> = None;
    for (k, a) in arrived.iter().enumerate() {
        match (a, run_start) {
            (false, None) => run_start = Some(k),
            (true, Some(s)) => {
                let cut = sent[k] - sent[s];
                if cut > f.cut {
                    (f.cut, f.cut_from) = (cut, Some(sent[s]));
                }
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = run_start {
        (f.cut, f.cut_from) = (Duration::MAX, Some(sent[s]));
    }
    f
}

/// When a host's agent was stopped, started again, and seen switched: its vxlan device gone, its
/// wireguard device there, and its lease in etcd saying wireguard.
#[derive(Debug, Clone, Copy)]
struct Restart {
    stop: Instant,
    start: Instant,
    up: Instant,
}

fn lease_key(lab: &Lab, host: &str) -> String {
    let env = tweed_config::SubnetEnv::read(&host_state(lab, host).subnet_file).unwrap();
    let net = env.node_subnet().expect("IPv4 pair");
    format!("{}{}-{}", flannel::SUBNETS, net.network(), net.prefix())
}

fn switched(lab: &Lab, host: &str, key: &str) -> bool {
    let ns = host_state(lab, host).netns;
    let links = in_ns(&ns, &["ip", "-o", "link", "show"]);
    links.contains("tweed-wg")
        && !links.contains("tweed.1")
        && etcdctl(lab, &["get", "--print-value-only", key])
            .contains(r#""BackendType":"wireguard""#)
}

/// Up a 3-host vxlan lab, stream between every pair, switch the config to wireguard, restart the
/// agents in `groups` (the hosts of one group stopped and started together, `pause` between
/// groups); then check the result and print the table.
fn migrate(tag: &str, groups: &[&[&str]], pause: Duration) {
    let mut spec = LabSpec::new(per_process(tag), 3);
    spec.backend = Backend::Vxlan;
    spec.pods_per_host = 1;
    let lab = up(spec);
    let report = lab.check_until(Duration::from_secs(20)).expect("check");
    assert_eq!(report.failed(), 0, "{}", report.summary());
    let hosts = lab.state().hosts.clone();
    let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
    let keys: Vec<String> = names.iter().map(|h| lease_key(&lab, h)).collect();
    let pods: Vec<(String, Ipv4Addr)> = hosts
        .iter()
        .map(|h| (h.pods[0].netns.clone(), ipv4_of(&h.pods[0])))
        .collect();

    let mesh = Mesh::start(&pods);
    mesh.wait_flowing();
    etcdctl(
        &lab,
        &[
            "put",
            tweed_lab::spec::CONFIG_KEY,
            &tweed_lab::spec::network_config_json(
                Backend::Wireguard,
                false,
                tweed_lab::spec::IpFamily::V4,
            ),
        ],
    );
    // Nothing changes before a restart: the agents read the config once, at start.
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let mut restarts: Vec<Option<Restart>> = vec![None; hosts.len()];
    for (g, group) in groups.iter().enumerate() {
        if g > 0 {
            std::thread::sleep(pause);
        }
        let idx: Vec<usize> = group
            .iter()
            .map(|h| names.iter().position(|n| n == h).unwrap())
            .collect();
        // All of a group are stopped before any is started again.
        let stopped: Vec<(Instant, StoppedAgent)> = idx
            .iter()
            .map(|&i| (Instant::now(), stop_agent(&lab, names[i], libc::SIGTERM)))
            .collect();
        let started: Vec<Instant> = stopped
            .iter()
            .map(|(_, s)| {
                let t = Instant::now();
                start_agent(s);
                t
            })
            .collect();
        for (k, &i) in idx.iter().enumerate() {
            let deadline = started[k] + Duration::from_secs(20);
            while !switched(&lab, names[i], &keys[i]) {
                assert!(Instant::now() < deadline, "{} did not switch", names[i]);
                std::thread::sleep(Duration::from_millis(5));
            }
            restarts[i] = Some(Restart {
                stop: stopped[k].0,
                start: started[k],
                up: Instant::now(),
            });
        }
    }
    // Long enough for every pair to show it is back.
    std::thread::sleep(Duration::from_secs(2));
    let flows = mesh.finish(t0);
    let restarts: Vec<Restart> = restarts.into_iter().map(Option::unwrap).collect();

    // Per pair: the longer of its two directions' cuts, against the time between its restarts.
    let secs = |d: Duration| {
        if d == Duration::MAX {
            "never".to_string()
        } else {
            format!("{:.2}", d.as_secs_f64())
        }
    };
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for a in 0..hosts.len() {
        for b in a + 1..hosts.len() {
            let (ab, ba) = (&flows[&(a, b)], &flows[&(b, a)]);
            let cut = ab.cut.max(ba.cut);
            let (first, later) = if restarts[a].start <= restarts[b].start {
                (restarts[a], restarts[b])
            } else {
                (restarts[b], restarts[a])
            };
            let between = later.start - first.start;
            // Upper: the pair cannot be cut before the first restart nor stay cut once the
            // later agent is up (plus a handshake). Lower: from the first one's switch to the
            // later one's stop, neither backend carries the pair.
            let upper = later.up - first.stop + MARGIN;
            let lower = later.stop.saturating_duration_since(first.up);
            let slack = Duration::from_millis(2 * 1000 / RATE_HZ);
            rows.push(format!(
                "| {}-{} | {} | {} | {} | {:+.2} | {}/{} |",
                names[a],
                names[b],
                secs(between),
                secs(later.up - later.start),
                secs(cut),
                cut.as_secs_f64() - between.as_secs_f64(),
                ab.lost,
                ba.lost,
            ));
            if cut > upper || cut + slack < lower {
                failures.push(format!(
                    "{}-{}: cut off {} s, expected {} to {} s",
                    names[a],
                    names[b],
                    secs(cut),
                    secs(lower),
                    secs(upper)
                ));
            }
            for f in [ab, ba] {
                if let Some(from) = f.cut_from {
                    assert!(
                        from + slack >= first.stop,
                        "{}-{}: cut off at {:?} before either restart",
                        names[a],
                        names[b],
                        from - t0
                    );
                }
            }
        }
    }
    println!(
        "{tag}: vxlan -> wireguard, restarts {groups:?}\n\
         | pair | between restarts s | later agent up after s | cut off s | cut - between s | lost a->b/b->a |\n\
         |---|---|---|---|---|---|"
    );
    for r in &rows {
        println!("{r}");
    }
    assert!(failures.is_empty(), "{failures:#?}");

    // No vxlan device nor route left; every pair reaches each other on wireguard.
    for h in &hosts {
        let vxlan = in_ns(
            &h.netns,
            &["ip", "-d", "-o", "link", "show", "type", "vxlan"],
        );
        assert!(vxlan.trim().is_empty(), "{}: {vxlan}", h.name);
        let routes = in_ns(&h.netns, &["ip", "-4", "route", "show"]);
        assert!(
            !routes.contains("tweed.1") && !routes.contains("onlink"),
            "{}: {routes}",
            h.name
        );
        assert!(
            routes.contains("10.244.0.0/16 dev tweed-wg"),
            "{}: {routes}",
            h.name
        );
    }
    let report = lab.check_until(Duration::from_secs(20)).expect("check");
    assert_eq!(report.failed(), 0, "{}", report.summary());

    // Pods made under vxlan keep its MTU (1450) until they are made again; the wireguard device
    // has 1420. A full-size packet still gets through (the host fragments it), and one with DF
    // gets the host's "fragmentation needed, mtu 1420" (path MTU discovery works).
    let (pod, dst) = (&pods[0].0, pods[1].1.to_string());
    let mtu = in_ns(pod, &["cat", "/sys/class/net/eth0/mtu"]);
    assert_eq!(mtu.trim(), "1450", "pod MTU");
    let full = ns_command(
        pod,
        &["ping", "-n", "-c", "2", "-W", "3", "-s", "1422", &dst],
    )
    .output()
    .expect("ping");
    let text = String::from_utf8_lossy(&full.stdout);
    assert!(ping_summary(&text).1 >= 1, "{text}");
    let df = ns_command(
        pod,
        &[
            "ping", "-n", "-c", "2", "-W", "3", "-M", "do", "-s", "1422", &dst,
        ],
    )
    .output()
    .expect("ping");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&df.stdout),
        String::from_utf8_lossy(&df.stderr)
    );
    assert!(
        text.contains("mtu = 1420") || text.contains("mtu=1420"),
        "a DF packet above the wireguard MTU: {text}"
    );
}

#[test]
fn vxlan_to_wireguard_node_by_node_cuts_each_pair_off_only_between_its_restarts() {
    require_root!(NEEDS_ROOT);
    migrate(
        "wgmig",
        &[&["h1"], &["h2"], &["h3"]],
        Duration::from_secs(2),
    );
}

#[test]
fn vxlan_to_wireguard_all_at_once_cuts_pairs_off_only_during_the_restarts() {
    require_root!(NEEDS_ROOT);
    migrate("wgall", &[&["h1", "h2", "h3"]], Duration::ZERO);
}
