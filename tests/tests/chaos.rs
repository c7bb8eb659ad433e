//! Issue 17: drift repaired within a second, and agent restarts under load, per backend.
//!
//! A two-host lab; a pod on h2 sends 1,000 UDP datagrams a second (numbered) to a pod on h1,
//! from threads that entered the pods' network namespaces. On h2, the sender's host, each owned
//! object is deleted or changed in turn (`ip route del`, `ip link del`, `ip link set down`,
//! `bridge fdb del`, `ip neigh del`, `iptables -F`, `iptables -t nat -F`). For each: the time from
//! just before the command to the object being back (polled in the kernel), the traffic outage
//! (from the command to the first datagram through after the last lost one) and the datagrams
//! lost. Each fault is repeated `TWEED_CHAOS_REPS` times (default 5); the p99 of the repair time
//! must be under 1 s (rules with iptables-legacy: under the rule check interval, 5 s, plus 1 s:
//! it has no notifications; iptables-nft's are heard through `nft monitor`, so 1 s). A table of the figures is printed (`--nocapture`). The restart tests copy
//! both agents' logs into `$TWEED_CHAOS_LOGS` when it names a directory.
//!
//! ```sh
//! cargo build --workspace --bins
//! sudo TWEED_CHAOS_REPS=20 cargo test -p tweed-e2e --test chaos -- --test-threads=1 --nocapture
//! ```

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tweed_e2e::*;
use tweed_lab::{Backend, Lab, LabSpec};
use tweed_testkit::netns;

const PORT: u16 = 9477;
const RATE_HZ: u64 = 1000;

fn reps() -> usize {
    std::env::var("TWEED_CHAOS_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(5)
}

/// A numbered UDP stream from one pod to another.
struct Stream {
    stop: Arc<AtomicBool>,
    sender: JoinHandle<Vec<Instant>>,
    receiver: JoinHandle<()>,
    received: Arc<Mutex<Vec<(u64, Instant)>>>,
}

/// What a stream saw around one moment.
#[derive(Debug)]
struct Loss {
    lost: usize,
    /// From the moment to the first datagram through after the last one lost (zero: none lost).
    outage: Duration,
}

impl Stream {
    fn start(from_ns: &str, to_ns: &str, to: Ipv4Addr) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let receiver = {
            let (stop, received, ns) = (stop.clone(), received.clone(), to_ns.to_string());
            std::thread::spawn(move || {
                netns::enter(&ns, move || {
                    let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PORT))
                        .expect("bind in pod");
                    sock.set_read_timeout(Some(Duration::from_millis(50)))
                        .unwrap();
                    ready_tx.send(()).unwrap();
                    let mut buf = [0u8; 64];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok(n) = sock.recv(&mut buf) {
                            if n >= 8 {
                                let seq = u64::from_be_bytes(buf[..8].try_into().unwrap());
                                received.lock().unwrap().push((seq, Instant::now()));
                            }
                        }
                    }
                })
            })
        };
        ready_rx.recv().expect("receiver up");
        let sender = {
            let (stop, ns) = (stop.clone(), from_ns.to_string());
            std::thread::spawn(move || {
                netns::enter(&ns, move || {
                    let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
                    let dst = SocketAddrV4::new(to, PORT);
                    let start = Instant::now();
                    let mut sent = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let seq = sent.len() as u64;
                        let at = start + Duration::from_micros(seq * 1_000_000 / RATE_HZ);
                        if let Some(d) = at.checked_duration_since(Instant::now()) {
                            std::thread::sleep(d);
                        }
                        // A route that is gone makes send fail (ENETUNREACH): that datagram is lost.
                        let _ = sock.send_to(&seq.to_be_bytes(), dst);
                        sent.push(Instant::now());
                    }
                    sent
                })
            })
        };
        Stream {
            stop,
            sender,
            receiver,
            received,
        }
    }

    /// Waits until datagrams flow (the first ones may meet an unresolved path).
    fn wait_flowing(&self) {
        wait_for(Duration::from_secs(10), "the stream to flow", || {
            self.received.lock().unwrap().len() > 100
        });
    }

    /// Stops the stream; returns the send times and what arrived. Datagrams sent in the last
    /// 200 ms are left out: they may still be in flight when the receiver stops.
    fn finish(self) -> (Vec<Instant>, Vec<(u64, Instant)>) {
        let cutoff = Instant::now();
        std::thread::sleep(Duration::from_millis(200));
        self.stop.store(true, Ordering::Relaxed);
        let mut sent = self.sender.join().unwrap();
        sent.retain(|t| *t < cutoff);
        self.receiver.join().unwrap();
        let received = std::mem::take(&mut *self.received.lock().unwrap());
        (sent, received)
    }
}

/// Datagrams sent from `from` on that never arrived, and the outage they make.
fn loss_after(sent: &[Instant], received: &[(u64, Instant)], from: Instant) -> Loss {
    let got: HashSet<u64> = received.iter().map(|(s, _)| *s).collect();
    // The datagram in flight at the moment counts too.
    let first = sent.partition_point(|t| *t < from).saturating_sub(1);
    let lost: Vec<u64> = (first as u64..sent.len() as u64)
        .filter(|s| !got.contains(s))
        .collect();
    let outage = match lost.last() {
        None => Duration::ZERO,
        Some(last) => received
            .iter()
            .filter(|(s, _)| s > last)
            .map(|(_, t)| *t)
            .min()
            .map(|t| t.saturating_duration_since(from))
            .unwrap_or(Duration::MAX),
    };
    Loss {
        lost: lost.len(),
        outage,
    }
}

fn sh(netns: &str, cmd: &str) {
    let argv: Vec<&str> = cmd.split_whitespace().collect();
    in_ns(netns, &argv);
}

fn out(netns: &str, cmd: &str) -> String {
    let argv: Vec<&str> = cmd.split_whitespace().collect();
    ns_command(netns, &argv)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// One fault: the command that makes it, and the check that it is repaired.
struct Fault {
    name: &'static str,
    cmd: String,
    repaired: Box<dyn Fn(&str) -> bool>,
    /// Rules are checked every 5 s, not notified.
    bound: Duration,
}

impl Fault {
    /// A fault the agent is notified of: repaired within [`SECOND`] (but see [`Fault::in_rules`]).
    fn new(
        name: &'static str,
        cmd: impl Into<String>,
        repaired: impl Fn(&str) -> bool + 'static,
    ) -> Fault {
        Fault {
            name,
            cmd: cmd.into(),
            repaired: Box::new(repaired),
            bound: SECOND,
        }
    }

    /// A fault in iptables' rules. iptables-legacy announces nothing and is checked every 5 s:
    /// repaired within [`RULES`]. iptables-nft's changes are announced by `nft monitor`, which
    /// the agent follows: within a second, as any other object.
    fn in_rules(self) -> Fault {
        Fault {
            bound: if iptables_is_nft() { SECOND } else { RULES },
            ..self
        }
    }
}

#[derive(Default)]
struct Figures {
    repair: Vec<Duration>,
    outage: Vec<Duration>,
    lost: Vec<usize>,
}

fn p99(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[((v.len() * 99).div_ceil(100))
        .saturating_sub(1)
        .min(v.len() - 1)]
}

fn ms(d: Duration) -> String {
    if d == Duration::MAX {
        "never".into()
    } else {
        format!("{:.0}", d.as_secs_f64() * 1000.0)
    }
}

fn run_faults(lab: &Lab, backend: &str, faults: Vec<Fault>) {
    let h1 = host_state(lab, "h1");
    let h2 = host_state(lab, "h2");
    let (to, to_ns, from_ns) = (ipv4_of(&h1.pods[0]), &h1.pods[0].netns, &h2.pods[0].netns);
    let mut table = Vec::new();
    for f in &faults {
        let mut fig = Figures::default();
        for rep in 0..reps() {
            assert!(
                (f.repaired)(&h2.netns),
                "{}: not in place before rep {rep}",
                f.name
            );
            let stream = Stream::start(from_ns, to_ns, to);
            stream.wait_flowing();
            std::thread::sleep(Duration::from_millis(200));
            let t0 = Instant::now();
            sh(&h2.netns, &f.cmd);
            let deadline = t0 + f.bound + Duration::from_secs(5);
            while !(f.repaired)(&h2.netns) {
                assert!(
                    Instant::now() < deadline,
                    "{backend} {}: not repaired within {:?}",
                    f.name,
                    deadline - t0
                );
                std::thread::sleep(Duration::from_millis(2));
            }
            fig.repair.push(t0.elapsed());
            // Long enough for the traffic to show whether it recovered.
            std::thread::sleep(Duration::from_millis(500));
            let (sent, received) = stream.finish();
            let loss = loss_after(&sent, &received, t0);
            fig.outage.push(loss.outage);
            fig.lost.push(loss.lost);
        }
        let row = format!(
            "| {backend} | {} | {} | {} | {} | {} | {} |",
            f.name,
            fig.repair.len(),
            ms(p99(&fig.repair)),
            ms(*fig.repair.iter().max().unwrap()),
            ms(p99(&fig.outage)),
            fig.lost.iter().max().unwrap(),
        );
        eprintln!("{row}");
        table.push(row);
        assert!(
            p99(&fig.repair) < f.bound,
            "{backend} {}: repair p99 {:?} (bound {:?}); all {:?}",
            f.name,
            p99(&fig.repair),
            f.bound,
            fig.repair
        );
        assert!(
            p99(&fig.outage) < f.bound + Duration::from_millis(500),
            "{backend} {}: traffic outage p99 {:?}; all {:?}, lost {:?}",
            f.name,
            p99(&fig.outage),
            fig.outage,
            fig.lost
        );
    }
    eprintln!(
        "| backend | fault | reps | repair p99 ms | repair max ms | outage p99 ms | max lost |"
    );
    for r in table {
        eprintln!("{r}");
    }
    assert_eq!(
        lab.check_until(Duration::from_secs(10)).unwrap().failed(),
        0
    );
}

fn subnet_of(lab: &Lab, host: &str) -> String {
    let env = tweed_config::SubnetEnv::read(&host_state(lab, host).subnet_file).unwrap();
    env.node_subnet().expect("IPv4 pair").to_string()
}

const SECOND: Duration = Duration::from_secs(1);
const RULES: Duration = Duration::from_secs(6);

/// Whether this host's `iptables` is iptables-nft (Debian 12's default), whose rule changes the
/// agent hears of at once.
fn iptables_is_nft() -> bool {
    let out = std::process::Command::new("iptables")
        .arg("-V")
        .output()
        .expect("iptables -V");
    String::from_utf8_lossy(&out.stdout).contains("(nf_tables)")
}

fn rule_faults() -> Vec<Fault> {
    vec![
        Fault::new("iptables -F", "iptables -w 5 -F", |ns| {
            out(ns, "iptables -w 5 -S FORWARD").contains("-j TWEED-FWD")
                && out(ns, "iptables -w 5 -S TWEED-FWD").lines().count() > 1
        })
        .in_rules(),
        Fault::new("iptables -t nat -F", "iptables -w 5 -t nat -F", |ns| {
            out(ns, "iptables -w 5 -t nat -S POSTROUTING").contains("-j TWEED-POSTRTG")
                && out(ns, "iptables -w 5 -t nat -S TWEED-POSTRTG")
                    .lines()
                    .count()
                    > 1
        })
        .in_rules(),
    ]
}

fn link_up(ns: &str, dev: &str) -> bool {
    let l = out(ns, &format!("ip -o link show {dev}"));
    l.split_once('<')
        .and_then(|(_, r)| r.split_once('>'))
        .is_some_and(|(flags, _)| flags.split(',').any(|f| f == "UP"))
}

#[test]
fn vxlan_drift_is_repaired_within_a_second() {
    require_root!(NEEDS_ROOT);
    let lab = up(LabSpec::new(per_process("cv"), 2));
    let h1 = host_state(&lab, "h1");
    let peer = subnet_of(&lab, "h1");
    let gw = peer.split('/').next().unwrap().to_string();
    let h1ip = h1.public_ip.to_string();
    let mac = in_ns(&h1.netns, &["cat", "/sys/class/net/tweed.1/address"])
        .trim()
        .to_string();
    let routed = {
        let peer = peer.clone();
        move |ns: &str| out(ns, &format!("ip route show {peer}")).contains("tweed.1")
    };
    let whole = {
        let routed = routed.clone();
        move |ns: &str| link_up(ns, "tweed.1") && routed(ns)
    };
    let mut faults = vec![
        Fault::new(
            "ip route del",
            format!("ip route del {peer}"),
            routed.clone(),
        ),
        Fault::new("ip link del", "ip link del tweed.1", whole.clone()),
        Fault::new("ip link set down", "ip link set tweed.1 down", whole),
        Fault::new(
            "bridge fdb del",
            format!("bridge fdb del {mac} dev tweed.1 dst {h1ip}"),
            {
                let (mac, h1ip) = (mac.clone(), h1ip.clone());
                move |ns: &str| {
                    out(ns, "bridge fdb show dev tweed.1")
                        .lines()
                        .any(|l| l.starts_with(&mac) && l.contains(&format!("dst {h1ip}")))
                }
            },
        ),
        Fault::new(
            "ip neigh del",
            format!("ip neigh del {gw} dev tweed.1"),
            move |ns: &str| {
                out(ns, &format!("ip neigh show {gw} dev tweed.1")).contains("PERMANENT")
            },
        ),
    ];
    faults.extend(rule_faults());
    run_faults(&lab, "vxlan", faults);
}

#[test]
fn nft_rules_flushed_are_repaired_within_a_second() {
    require_root!(NEEDS_ROOT);
    let mut spec = LabSpec::new(per_process("cn"), 2);
    spec.agent_args = vec!["--nftables".into()];
    let lab = up(spec);
    let present = |ns: &str| out(ns, "nft list table ip tweed").contains("masquerade");
    let faults = vec![
        Fault::new("nft flush ruleset", "nft flush ruleset", present),
        Fault::new(
            "nft delete table ip tweed",
            "nft delete table ip tweed",
            present,
        ),
    ];
    run_faults(&lab, "vxlan+nft", faults);
}

#[test]
fn host_gw_drift_is_repaired_within_a_second() {
    require_root!(NEEDS_ROOT);
    let mut spec = LabSpec::new(per_process("ch"), 2);
    spec.backend = Backend::HostGw;
    let lab = up(spec);
    let peer = subnet_of(&lab, "h1");
    let via = host_state(&lab, "h1").public_ip.to_string();
    let mut faults = vec![Fault::new(
        "ip route del",
        format!("ip route del {peer}"),
        move |ns: &str| out(ns, &format!("ip route show {peer}")).contains(&format!("via {via}")),
    )];
    faults.extend(rule_faults());
    run_faults(&lab, "host-gw", faults);
}

#[test]
fn udp_drift_is_repaired_within_a_second() {
    require_root!(NEEDS_ROOT);
    let mut spec = LabSpec::new(per_process("cu"), 2);
    spec.backend = Backend::Udp;
    let lab = up(spec);
    let routed = |ns: &str| out(ns, "ip route show 10.244.0.0/16").contains("tweed0");
    let faults = vec![
        Fault::new(
            "ip route del",
            "ip route del 10.244.0.0/16 dev tweed0",
            routed,
        ),
        Fault::new(
            "ip link set down",
            "ip link set tweed0 down",
            move |ns: &str| link_up(ns, "tweed0") && routed(ns),
        ),
    ];
    run_faults(&lab, "udp", faults);
}

/// A file of the test's, removed however the test ends.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Stops and starts each host's agent in turn under the stream, h2's from a copy of the binary
/// (an upgrade); returns the datagrams lost.
fn restart_under_load(lab: &Lab) -> (usize, Duration) {
    let h1 = host_state(lab, "h1");
    let h2 = host_state(lab, "h2");
    let stream = Stream::start(&h2.pods[0].netns, &h1.pods[0].netns, ipv4_of(&h1.pods[0]));
    stream.wait_flowing();
    std::thread::sleep(Duration::from_millis(300));
    // h2's agent comes back from another file, as after a package upgrade: the new binary
    // takes over what the old one left.
    let upgrade = RemoveOnDrop(std::env::temp_dir().join(format!("{}-tweedd-new", h2.netns)));
    let t0 = Instant::now();
    let mut starts = Vec::new();
    for host in ["h1", "h2"] {
        starts.push(Instant::now());
        // As `systemctl restart` does: the new agent starts as soon as the old one is gone.
        let mut stopped = stop_agent(lab, host, libc::SIGTERM);
        if host == "h2" {
            std::fs::copy(&stopped.argv[0], &upgrade.0).expect("copy of tweedd");
            stopped.argv[0] = upgrade.0.to_str().unwrap().to_string();
        }
        start_agent(&stopped);
        wait_for(Duration::from_secs(10), "the agent to serve again", || {
            std::fs::read_to_string(&stopped.log)
                .unwrap_or_default()
                .matches("lease acquired")
                .count()
                >= 2
        });
        std::thread::sleep(Duration::from_millis(700));
    }
    let (sent, received) = stream.finish();
    let l = loss_after(&sent, &received, t0);
    let second = loss_after(&sent, &received, starts[1]);
    eprintln!(
        "restart under {RATE_HZ} datagrams/s: {} sent, {} lost (h1's restart {}, h2's {}), \
         outage {} ms",
        sent.len(),
        l.lost,
        l.lost - second.lost,
        second.lost,
        ms(l.outage)
    );
    // For a look at an outlier: the agents' logs, kept where this names.
    if let Ok(dir) = std::env::var("TWEED_CHAOS_LOGS") {
        for h in [&h1, &h2] {
            let to =
                std::path::Path::new(&dir).join(format!("{}-{}.log", h.netns, std::process::id()));
            let _ = std::fs::copy(&h.log, to);
        }
    }
    (l.lost, l.outage)
}

#[test]
fn vxlan_restart_under_load_loses_nothing() {
    require_root!(NEEDS_ROOT);
    let lab = up(LabSpec::new(per_process("rv"), 2));
    assert_eq!(restart_under_load(&lab).0, 0);
}

#[test]
fn host_gw_restart_under_load_loses_nothing() {
    require_root!(NEEDS_ROOT);
    let mut spec = LabSpec::new(per_process("rh"), 2);
    spec.backend = Backend::HostGw;
    let lab = up(spec);
    assert_eq!(restart_under_load(&lab).0, 0);
}

#[test]
fn udp_restart_under_load_is_reported() {
    require_root!(NEEDS_ROOT);
    let mut spec = LabSpec::new(per_process("ru"), 2);
    spec.backend = Backend::Udp;
    let lab = up(spec);
    let (lost, _) = restart_under_load(&lab);
    // Two restarts (each host's agent once); the userspace backend drops what arrives while no
    // agent reads the TUN device and the socket: at most 200 ms of traffic per restart.
    let bound = 2 * RATE_HZ as usize / 5;
    assert!(
        lost <= bound,
        "{lost} lost over two restarts (bound {bound})"
    );
}

#[test]
fn vxlan_tx_checksum_offload_switch_is_set_and_kept_across_recreation() {
    require_root!(NEEDS_ROOT);
    let mut spec = LabSpec::new(per_process("co"), 2);
    spec.agent_args = vec!["--vxlan-tx-checksum-offload=false".into()];
    let lab = up(spec);
    // Only h1 gets the switch: the lab passes agent_args to every host, so h2's agent is
    // restarted with the default.
    let h2_agent = stop_agent(&lab, "h2", libc::SIGTERM);
    let argv: Vec<String> = h2_agent
        .argv
        .iter()
        .filter(|a| !a.starts_with("--vxlan-tx-checksum-offload"))
        .cloned()
        .collect();
    start_agent(&StoppedAgent { argv, ..h2_agent });
    let h1 = host_state(&lab, "h1");
    let off = |ns: &str| {
        out(ns, "ethtool -k tweed.1")
            .lines()
            .any(|l| l.trim().starts_with("tx-checksum-ip-generic: off"))
    };
    wait_for(Duration::from_secs(5), "the feature to be off", || {
        off(&h1.netns)
    });
    // A re-created device starts with the kernel's default (on); the repair turns it off again.
    sh(&h1.netns, "ip link del tweed.1");
    wait_for(
        Duration::from_secs(5),
        "the device back, offload off",
        || link_up(&h1.netns, "tweed.1") && off(&h1.netns),
    );
    assert_eq!(
        lab.check_until(Duration::from_secs(10)).unwrap().failed(),
        0
    );
    // The other host runs with the default, which leaves the feature as the kernel makes it: a
    // device re-created there has it on.
    let h2 = host_state(&lab, "h2");
    sh(&h2.netns, "ip link del tweed.1");
    wait_for(Duration::from_secs(5), "h2's device back", || {
        link_up(&h2.netns, "tweed.1")
    });
    assert!(out(&h2.netns, "ethtool -k tweed.1").contains("tx-checksum-ip-generic: on"));
}

#[test]
fn an_underlay_mtu_change_at_run_time_reaches_the_device_and_subnet_env() {
    require_root!(NEEDS_ROOT);
    let lab = up(LabSpec::new(per_process("cm"), 2));
    let h1 = host_state(&lab, "h1");
    let mtu_of = |dev: &str| {
        in_ns(&h1.netns, &["cat", &format!("/sys/class/net/{dev}/mtu")])
            .trim()
            .parse::<u32>()
            .unwrap()
    };
    assert_eq!(mtu_of("tweed.1"), 1450);
    sh(&h1.netns, "ip link set eth0 mtu 9000");
    wait_for(Duration::from_secs(3), "tweed.1 at 9000 - 50", || {
        mtu_of("tweed.1") == 8950
    });
    wait_for(Duration::from_secs(3), "subnet.env at 8950", || {
        tweed_config::SubnetEnv::read(&h1.subnet_file)
            .map(|e| e.mtu == 8950)
            .unwrap_or(false)
    });
    // Logged right after the change is applied.
    wait_for(Duration::from_secs(3), "the MTU change in the log", || {
        let log = std::fs::read_to_string(&h1.log).unwrap_or_default();
        log.contains("MTU changed from 1500 to 9000") && log.contains("running pods keep 1450")
    });
    // Back down: the device follows, so full-size overlay packets fit the underlay again.
    sh(&h1.netns, "ip link set eth0 mtu 1500");
    wait_for(Duration::from_secs(3), "tweed.1 back at 1450", || {
        mtu_of("tweed.1") == 1450
    });
    assert_eq!(
        lab.check_until(Duration::from_secs(10)).unwrap().failed(),
        0
    );
}

#[test]
fn wireguard_restart_under_load_is_reported() {
    require_root!(NEEDS_ROOT);
    let mut spec = LabSpec::new(per_process("rw"), 2);
    spec.backend = Backend::Wireguard;
    // The host kernel has no wireguard module; say so rather than rely on `auto`.
    spec.agent_args = vec!["--wireguard-impl=userspace".into()];
    let lab = up(spec);
    let (lost, _) = restart_under_load(&lab);
    // Two restarts, as for udp: a restarted agent has lost its sessions too, so each restart
    // costs a handshake on top of the time no agent reads the TUN device and the socket. At
    // most 200 ms of traffic per restart.
    let bound = 2 * RATE_HZ as usize / 5;
    assert!(
        lost <= bound,
        "{lost} lost over two restarts (bound {bound})"
    );
}
