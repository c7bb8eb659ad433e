//! A node set up the way flannel's udp backend sets one up joins a tweed lab that runs the udp
//! backend: a plain TUN device `flannel0` (no virtio-net header, no offloads) with the subnet's
//! address as /32 and the overlay's route, a relay putting each bare inner IPv4 packet in one UDP
//! datagram to the peer's PublicIP:8285 (bench/udp-relay, flannel's udp design), and a lease in
//! flannel's JSON under an etcd TTL lease. Pings and TCP transfers cross both ways.
//!
//! The TCP transfers are the point: tweed cuts the kernel's 64 KB TSO super-packets into MSS
//! segments and computes their checksums in user space, and the relay writes them to a TUN
//! without offloads, so the flannel-side kernel verifies every checksum; one wrong checksum
//! would stall a transfer or show in `Tcp: InCsumErrors`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tweed_e2e::*;
use tweed_lab::{Backend, LabSpec};

/// Bytes of each byte-exact bulk transfer (one per direction).
const BULK_BYTES: u64 = 24 << 20;
/// flannel's udp port, and tweed's default.
const UDP_PORT: u16 = 8285;
/// flannel's udp backend: underlay MTU 1500 - 20 (IPv4) - 8 (UDP).
const MTU: &str = "1472";
const BULK_PORT: u16 = 5990;
const IPERF_PORT: u16 = 5201;

/// Processes started by this test (relay, servers); killed and reaped on drop.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Builds bench/udp-relay (a no-op when it is up to date) where bench/dataplane builds it.
fn udp_relay() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the repository");
    let target = repo.join("target").join("udp-relay");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--quiet",
            "--locked",
            "--manifest-path",
        ])
        .arg(repo.join("bench/udp-relay/Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target)
        .stdin(Stdio::null())
        .output()
        .expect("cargo");
    assert!(
        out.status.success(),
        "building bench/udp-relay: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.join("release").join("udp-relay")
}

/// One series' value in a Prometheus text body; 0 when absent (a counter never incremented).
fn series(body: &str, name: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

fn metrics(netns: &str, url: &str) -> String {
    in_ns(netns, &["curl", "-sf", "--max-time", "2", url])
}

/// The drop reasons a well-behaved peer must never cause: tweed's udp backend drops and counts
/// what it does not let in.
const PEER_DROPS: [&str; 3] = ["unknown_peer", "spoofed_inner", "not_for_us"];

fn drop_count(body: &str, reason: &str) -> f64 {
    series(
        body,
        &format!("tweed_udp_drops_total{{reason=\"{reason}\"}}"),
    )
}

fn peer_drops(body: &str) -> Vec<(&'static str, f64)> {
    PEER_DROPS.map(|r| (r, drop_count(body, r))).to_vec()
}

/// IPv6 packets the kernel has sent into `dev` (router solicitations and MLD reports from the
/// link-local address a device gets while IPv6 is on): the udp workers would read them from
/// `tweed0` and count them as `malformed` (not IPv4). 0 without IPv6 on the device.
fn ipv6_out(netns: &str, dev: &str) -> f64 {
    let out = ns_command(netns, &["cat", &format!("/proc/net/dev_snmp6/{dev}")])
        .stderr(Stdio::null())
        .output()
        .expect("ip netns exec");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Ip6OutRequests"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// `Tcp: InCsumErrors` and `Ip: InHdrErrors` of a namespace (from its /proc/net/snmp).
fn csum_errors(netns: &str) -> (u64, u64) {
    let snmp = in_ns(netns, &["cat", "/proc/net/snmp"]);
    let field = |proto: &str, name: &str| -> u64 {
        let mut rows = snmp.lines().filter(|l| l.starts_with(proto));
        let (names, values) = (rows.next().unwrap(), rows.next().unwrap());
        let i = names
            .split_whitespace()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("no {proto} {name} in {snmp}"));
        values.split_whitespace().nth(i).unwrap().parse().unwrap()
    };
    (field("Tcp:", "InCsumErrors"), field("Ip:", "InHdrErrors"))
}

/// Sends `BULK_BYTES` random bytes over one TCP connection from `from` to `to_ip` in `to`; the
/// receiver counts and hashes what arrives until EOF (the sender waits for its close). Returns
/// how long the sender's process took (its start and the generating of the bytes included).
fn bulk(from: &str, to: &str, to_ip: &str) -> Duration {
    let server = format!(
        "import socket,hashlib\n\
         s=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         s.bind(('{to_ip}',{BULK_PORT}))\ns.listen(1)\nprint('ready',flush=True)\n\
         s.settimeout(60)\nc,_=s.accept()\nc.settimeout(60)\nh=hashlib.sha256()\nn=0\n\
         while True:\n    d=c.recv(1<<20)\n    if not d: break\n    h.update(d)\n    n+=len(d)\n\
         c.close()\nprint(n,h.hexdigest(),flush=True)\n"
    );
    let client = format!(
        "import socket,hashlib,os\n\
         d=os.urandom({BULK_BYTES})\n\
         c=socket.create_connection(('{to_ip}',{BULK_PORT}),timeout=60)\n\
         c.sendall(d)\nc.shutdown(socket.SHUT_WR)\nc.recv(1)\n\
         print(len(d),hashlib.sha256(d).hexdigest(),flush=True)\n"
    );
    let mut srv = Procs(vec![spawn_in(
        to,
        &["python3", "-c", &server],
        Stdio::piped(),
    )]);
    let mut out = BufReader::new(srv.0[0].stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).expect("bulk receiver output");
    assert_eq!(line.trim(), "ready", "bulk receiver in {to} did not start");
    let t = Instant::now();
    let sent = in_ns(from, &["timeout", "90", "python3", "-c", &client]);
    let took = t.elapsed();
    line.clear();
    out.read_line(&mut line).expect("bulk receiver result");
    assert_eq!(
        line.trim(),
        sent.trim(),
        "bytes and sha256 received in {to} (left) differ from those sent from {from} (right)"
    );
    assert!(sent.starts_with(&format!("{BULK_BYTES} ")), "{sent}");
    took
}

/// `iperf3 -t 2` from `client` to the server at `server_ip` (`-R`: the server sends): the bytes
/// sent and received.
fn iperf(client: &str, server_ip: &str, reverse: bool) -> (f64, f64) {
    let port = IPERF_PORT.to_string();
    let mut argv = vec![
        "timeout", "30", "iperf3", "-c", server_ip, "-p", &port, "-t", "2", "-J",
    ];
    if reverse {
        argv.push("-R");
    }
    // The server takes a moment after one test before it accepts the next ("the server is busy
    // running a test"): an iperf3 error is retried a few times, then reported as it is.
    let mut last = String::new();
    for _ in 0..5 {
        let out = in_ns(client, &argv);
        let v: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("iperf3 output is not JSON ({e}): {out}"));
        if let (Some(sent), Some(received)) = (
            v["end"]["sum_sent"]["bytes"].as_f64(),
            v["end"]["sum_received"]["bytes"].as_f64(),
        ) {
            return (sent, received);
        }
        last = v["error"].as_str().unwrap_or(&out).to_string();
        std::thread::sleep(Duration::from_secs(1));
    }
    panic!("iperf3 -c {server_ip} (reverse: {reverse}) failed 5 times: {last}");
}

#[test]
fn a_flannel_udp_node_interoperates_with_tweed_udp_nodes() {
    require_root!(NEEDS_ROOT);
    let mut spec = LabSpec::new(per_process("fu"), 2);
    spec.backend = Backend::Udp;
    spec.pods_per_host = 1;
    let lab = up(spec);
    let relay = udp_relay();

    // Before any flannel traffic: tweed's drop counters.
    let hosts: Vec<_> = ["h1", "h2"].iter().map(|h| host_state(&lab, h)).collect();
    let metrics_url: Vec<String> = hosts
        .iter()
        .map(|h| {
            h.metrics
                .clone()
                .expect("the lab's tweedd has --metrics-addr")
        })
        .collect();
    let before: Vec<String> = hosts
        .iter()
        .zip(&metrics_url)
        .map(|(h, url)| metrics(&h.netns, url))
        .collect();

    // flannel's udp MTU from its subnet.env for the pod.
    let fl = flannel::Node::up(&lab, "twu", MTU);
    let (node, pod, pod_ip) = (&*fl.node, &*fl.pod, &*fl.pod_ip);
    let public_ip = flannel::PUBLIC_IP;
    let mut procs = Procs(Vec::new());

    // The lease, as flannel's udp backend writes it: its attrs carry only the PublicIP (Go's
    // encoding of flannel's LeaseAttrs: no BackendType, a null PublicIPv6), under a 24 h TTL
    // lease (flannel's subnet lease TTL).
    let value = format!(r#"{{"PublicIP":"{public_ip}","PublicIPv6":null}}"#);
    fl.write_lease(&lab, 86400, &value);

    // flannel's udp proxy learns its peers from their leases (subnet from the key, PublicIP from
    // the value): tweed's leases must be readable by those rules.
    let mut peers = Vec::new();
    for (peer_net, v) in fl.peer_leases(&lab, &value, "udp") {
        let peer_ip = v["PublicIP"].as_str().expect("PublicIP").to_string();
        assert!(
            hosts.iter().any(|h| h.public_ip.to_string() == peer_ip),
            "{peer_net} {v}"
        );
        peers.push(format!("{peer_net}/24={peer_ip}"));
    }
    assert_eq!(peers.len(), 2, "{peers:?}");

    // flannel's udp device: flannel0, a plain TUN; the subnet's address as /32, MTU 1472, up, and
    // a route for the whole overlay network into it (cni0's /24 keeps local traffic local).
    let listen = format!("{public_ip}:{UDP_PORT}");
    let mut argv = vec![relay.to_str().unwrap(), "flannel0", &listen];
    argv.extend(peers.iter().map(String::as_str));
    // Its stderr is piped and read only when it dies: it writes nothing else.
    let relay_proc = ns_command(node, &argv)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("udp-relay");
    procs.0.push(relay_proc);
    let mut relay_alive = || {
        if let Ok(Some(status)) = procs.0[0].try_wait() {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(procs.0[0].stderr.as_mut().unwrap(), &mut err);
            panic!("udp-relay {argv:?} exited ({status}): {err}");
        }
    };
    wait_for(Duration::from_secs(5), "udp-relay's flannel0", || {
        relay_alive();
        ok_in(node, &["ip", "link", "show", "flannel0"])
    });
    fl.address_device("flannel0");
    ip(&["-n", node, "link", "set", "flannel0", "mtu", MTU, "up"]);
    ip(&[
        "-n",
        node,
        "route",
        "add",
        "10.244.0.0/16",
        "dev",
        "flannel0",
    ]);
    let link = in_ns(node, &["ip", "-d", "link", "show", "flannel0"]);
    assert!(link.contains("tun") && link.contains("mtu 1472"), "{link}");
    relay_alive();

    // The tweed agents pick the flannel node up from its lease: a tweed pod's ping is only
    // answered once its host tunnels to the node and lets the node's packets in.
    let tweed_pods: Vec<(String, String)> = hosts
        .iter()
        .flat_map(|h| {
            h.pods
                .iter()
                .map(|p| (p.netns.clone(), ipv4_of(p).to_string()))
        })
        .collect();
    assert_eq!(tweed_pods.len(), 2);
    for (ns, _) in &tweed_pods {
        wait_for(
            Duration::from_secs(15),
            "tweed to tunnel to the flannel node",
            || ok_in(ns, &["ping", "-c", "1", "-W", "1", pod_ip]),
        );
    }

    // Both directions, every tweed pod; also full-size packets (1444 + 28 = the 1472 MTU).
    for (ns, ip_) in &tweed_pods {
        for (from, to) in [(ns.as_str(), pod_ip), (pod, ip_.as_str())] {
            for size in ["56", "1444"] {
                let out = in_ns(
                    from,
                    &[
                        "ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "2", "-s", size, "-M",
                        "do", to,
                    ],
                );
                assert_eq!(
                    ping_summary(&out),
                    (3, 3),
                    "{from} -> {to} -s {size}: {out}"
                );
            }
        }
    }

    // TCP, byte-exact, both directions between h1's pod and the flannel pod.
    let (p1_ns, p1_ip) = tweed_pods[0].clone();
    let csum0 = (csum_errors(pod), csum_errors(&p1_ns));
    let out = bulk(&p1_ns, pod, pod_ip);
    eprintln!("bulk {BULK_BYTES} bytes tweed h1/p1 -> flannel pod: {out:?}");
    let back = bulk(pod, &p1_ns, &p1_ip);
    eprintln!("bulk {BULK_BYTES} bytes flannel pod -> tweed h1/p1: {back:?}");
    let csum1 = (csum_errors(pod), csum_errors(&p1_ns));
    assert_eq!(
        csum0, csum1,
        "(Tcp InCsumErrors, Ip InHdrErrors) of (flannel pod, tweed pod) before vs after"
    );

    // iperf3 -t 2 both directions between h2's pod and the flannel pod.
    let (p2_ns, _) = tweed_pods[1].clone();
    let port = IPERF_PORT.to_string();
    procs.0.push(spawn_in(
        pod,
        &["iperf3", "-s", "-p", &port, "-B", pod_ip],
        Stdio::null(),
    ));
    wait_for(Duration::from_secs(5), "iperf3 server", || {
        !in_ns(pod, &["ss", "-Hltn", &format!("sport = :{port}")])
            .trim()
            .is_empty()
    });
    for reverse in [false, true] {
        let (sent, received) = iperf(&p2_ns, pod_ip, reverse);
        let dir = if reverse {
            "flannel -> tweed"
        } else {
            "tweed -> flannel"
        };
        eprintln!(
            "iperf3 -t 2 {dir} (h2/p1): sent {sent} received {received} bytes, {:.0} Mbit/s",
            received * 8.0 / 2e6
        );
        // What is still in the sender's socket buffer when the 2 s end counts as sent, not
        // received: a stalled connection shows as far less than half.
        assert!(received >= 1e6, "{dir}: only {received} bytes in 2 s");
        assert!(
            received >= sent * 0.5,
            "{dir}: {sent} bytes sent, {received} received"
        );
    }
    let csum2 = (csum_errors(pod), csum_errors(&p2_ns));
    assert_eq!(
        csum2.0, csum1.0,
        "flannel pod's checksum errors after iperf3"
    );
    assert_eq!(csum2.1, (0, 0), "tweed h2/p1's checksum errors");

    // tweed let all of it in: its rx counters (exported every 5 s) cover the transfer to h1's pod,
    // and none of the drops a spoofed, stale or broken sender would cause went up.
    wait_for(
        Duration::from_secs(15),
        "h1's udp rx counters to cover the bulk transfer",
        || {
            let body = metrics(&hosts[0].netns, &metrics_url[0]);
            series(&body, "tweed_udp_bytes_total{direction=\"rx\"}")
                - series(&before[0], "tweed_udp_bytes_total{direction=\"rx\"}")
                >= BULK_BYTES as f64
        },
    );
    for (i, h) in hosts.iter().enumerate() {
        let body = metrics(&h.netns, &metrics_url[i]);
        let rx = series(&body, "tweed_udp_packets_total{direction=\"rx\"}");
        // TUN reads: with TSO one read carries up to 64 KB, which the workers cut into segments.
        let tx_reads = series(&body, "tweed_udp_packets_total{direction=\"tx\"}");
        let tx_bytes = series(&body, "tweed_udp_bytes_total{direction=\"tx\"}");
        let malformed = drop_count(&body, "malformed");
        let v6 = ipv6_out(&h.netns, "tweed0");
        eprintln!(
            "{}: udp rx {rx} datagrams, tx {tx_bytes} bytes in {tx_reads} TUN reads, drops \
             {:?}, malformed {malformed} (IPv6 packets the kernel sent into tweed0: {v6})",
            h.name,
            peer_drops(&body)
        );
        assert!(rx > 0.0, "{}: no udp datagrams received", h.name);
        assert_eq!(
            peer_drops(&body),
            peer_drops(&before[i]),
            "{}'s udp drops",
            h.name
        );
        // tweed0 is created down and gets IPv6 switched off before it comes up, so the kernel
        // never sends its own IPv6 control packets into it, and nothing here is malformed.
        assert_eq!(v6, 0.0, "{}: IPv6 packets sent into tweed0", h.name);
        assert_eq!(malformed, 0.0, "{}: malformed drops", h.name);
    }
}
