//! Issue 18: the wireguard backend on the userspace path (this host has no wireguard module):
//! a lab passes its all-pairs check through encrypted tunnels, the leases carry flannel's
//! BackendData, the key persists with mode 0400, and the underlay never sees a pod's payload.

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;
use tweed_e2e::*;
use tweed_lab::{Backend, LabSpec};

/// The packets in a pcap capture (its records), or 0 for an empty or foreign file.
fn pcap_packets(cap: &[u8]) -> usize {
    let le = match cap.get(..4) {
        Some([0xd4, 0xc3, 0xb2, 0xa1]) | Some([0x4d, 0x3c, 0xb2, 0xa1]) => true,
        Some([0xa1, 0xb2, 0xc3, 0xd4]) | Some([0xa1, 0xb2, 0x3c, 0x4d]) => false,
        _ => return 0,
    };
    let (mut off, mut n) = (24, 0);
    while let Some(h) = cap.get(off..off + 16) {
        let len = [h[8], h[9], h[10], h[11]];
        let len = if le {
            u32::from_le_bytes(len)
        } else {
            u32::from_be_bytes(len)
        } as usize;
        off += 16 + len;
        if off > cap.len() {
            break;
        }
        n += 1;
    }
    n
}

/// WireGuard datagrams (UDP to port 51820) on the underlay while `h1/p1` pings `dst`.
fn wireguard_datagrams_during_ping(lab: &tweed_lab::Lab, dst: &str, v6: bool) -> usize {
    let cap = capture_while(lab, "underlay", "udp dst port 51820", || {
        let mut args = vec!["ping", "-c", "5", "-i", "0.2", "-W", "2", dst];
        if v6 {
            args.insert(1, "-6");
        }
        let out = lab
            .exec("h1/p1", &args)
            .unwrap_or_else(|e| panic!("ping {dst}: {e}"));
        let (tx, rx) = ping_summary(&out);
        assert_eq!((tx, rx), (5, 5), "{out}");
    });
    pcap_packets(&cap)
}

/// Captures on `target` (all interfaces) while `h1/p1` pings `dst` with the marker; the raw
/// capture bytes.
fn capture_during_ping(lab: &tweed_lab::Lab, target: &str, dst: &str) -> Vec<u8> {
    capture_while(lab, target, "udp or icmp", || {
        let out = lab
            .exec(
                "h1/p1",
                &[
                    "ping", "-c", "5", "-i", "0.2", "-W", "2", "-p", MARKER_HEX, dst,
                ],
            )
            .unwrap_or_else(|e| panic!("ping {dst}: {e}"));
        let (tx, rx) = ping_summary(&out);
        assert_eq!((tx, rx), (5, 5), "{out}");
    })
}

#[test]
fn wireguard_lab_passes_check_encrypted_with_flannels_lease_format() {
    require_root!(NEEDS_ROOT);
    let mut spec = LabSpec::new(per_process("wg"), 3);
    spec.backend = Backend::Wireguard;
    let lab = up(spec);
    let report = lab.check_until(Duration::from_secs(20)).expect("check");
    assert_eq!(report.summary(), "24 passed, 0 failed");

    let leases = etcdctl(&lab, &["get", "--prefix", "/coreos.com/network/subnets/"]);
    for h in &lab.state().hosts {
        let link = in_ns(&h.netns, &["ip", "-d", "link", "show", "tweed-wg"]);
        assert!(link.contains("tun") && link.contains("mtu 1420"), "{link}");
        let env = std::fs::read_to_string(&h.subnet_file).unwrap();
        assert!(env.contains("TWEED_MTU=1420"), "{env}");
        // The key: base64 of 32 bytes, mode 0400, and its public half in this host's lease.
        let key_file = h.agent_state_dir.join("wgkey");
        let meta = std::fs::metadata(&key_file).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o400);
        let text = std::fs::read_to_string(&key_file).unwrap();
        let wg_pub = std::process::Command::new("wg")
            .arg("pubkey")
            .stdin(std::fs::File::open(&key_file).unwrap())
            .output()
            .unwrap();
        let public = String::from_utf8(wg_pub.stdout).unwrap().trim().to_string();
        assert_eq!(public.len(), 44, "{text:?}");
        let want = format!(
            r#""BackendType":"wireguard","BackendData":{{"PublicKey":"{public}","Port":51820}}"#
        );
        assert!(leases.contains(&want), "{want} not in\n{leases}");
    }

    // Underlay: WireGuard datagrams, never the marker. In the destination pod: the marker, so
    // the capture would have shown it had it crossed the underlay in clear.
    let h2 = &lab.state().hosts[1];
    let dst = ipv4_of(&h2.pods[0]).to_string();
    let underlay = capture_during_ping(&lab, "underlay", &dst);
    assert!(underlay.len() > 200, "empty capture on the underlay");
    assert_eq!(
        count(&underlay, MARKER),
        0,
        "pod payload in clear on the underlay"
    );
    let wg_data_to_51820 = wireguard_datagrams_during_ping(&lab, &dst, false);
    assert!(
        wg_data_to_51820 >= 10,
        "too few WireGuard datagrams captured ({wg_data_to_51820})"
    );
    let in_pod = capture_during_ping(&lab, "h2/p1", &dst);
    assert!(
        count(&in_pod, MARKER) >= 5,
        "the control capture missed the marker"
    );

    // Per-peer figures on h1 for h2 (the pings above went that way): a handshake happened and
    // bytes went both ways; the worker counters are exported under the udp families.
    let h2_key = std::process::Command::new("wg")
        .arg("pubkey")
        .stdin(std::fs::File::open(h2.agent_state_dir.join("wgkey")).unwrap())
        .output()
        .unwrap();
    let h2_key = String::from_utf8(h2_key.stdout).unwrap().trim().to_string();
    let url = format!("http://{}:9867/metrics", lab.state().hosts[0].public_ip);
    let value = |body: &str, family: &str, also: &str| {
        body.lines()
            .find(|l| l.starts_with(family) && l.contains(&h2_key) && l.contains(also))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    let mut body = String::new();
    wait_for(
        Duration::from_secs(12),
        "wireguard peer figures in /metrics",
        || {
            body = lab
                .exec("h2", &["curl", "-sf", "--max-time", "2", &url])
                .unwrap_or_default();
            let age = value(&body, "tweed_wireguard_peer_handshake_age_seconds{", "");
            let tx = value(&body, "tweed_wireguard_peer_bytes{", "direction=\"tx\"");
            let rx = value(&body, "tweed_wireguard_peer_bytes{", "direction=\"rx\"");
            matches!(age, Some(a) if (0.0..180.0).contains(&a))
                && tx.unwrap_or(0.0) > 0.0
                && rx.unwrap_or(0.0) > 0.0
                && body.contains("tweed_udp_packets_total{direction=\"tx\"}")
        },
    );

    // The key survives a restart: same public key in the lease, pods still reach each other.
    let before =
        std::fs::read_to_string(lab.state().hosts[0].agent_state_dir.join("wgkey")).unwrap();
    let stopped = stop_agent(&lab, "h1", libc::SIGTERM);
    start_agent(&stopped);
    let after =
        std::fs::read_to_string(lab.state().hosts[0].agent_state_dir.join("wgkey")).unwrap();
    assert_eq!(before, after);
    let report = lab
        .check_until(Duration::from_secs(20))
        .expect("check after restart");
    assert_eq!(report.summary(), "24 passed, 0 failed");
}

/// A binary built beside the test's own target dir (target/debug).
fn tweed_lab_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join(name)
}

/// `tweedctl net --socket SOCK -o json ARGS...`: its stdout as JSON (panics with stderr).
fn tweedctl_json(sock: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(tweed_lab_bin("tweedctl"))
        .args([
            "net",
            "--socket",
            sock.to_str().unwrap(),
            "--output",
            "json",
        ])
        .args(args)
        .output()
        .expect("run tweedctl");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "tweedctl {args:?}: {e}; stdout {:?} stderr {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn pubkey_of(file: &std::path::Path) -> String {
    let out = std::process::Command::new("wg")
        .arg("pubkey")
        .stdin(std::fs::File::open(file).unwrap())
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// WireGuard's REKEY_TIMEOUT: a handshake that goes unanswered is retried after this long. A
/// rotation whose first handshake is lost shows a pause of at least this; one that takes a
/// single handshake stays below it.
const REKEY_TIMEOUT: Duration = Duration::from_secs(5);

/// Issue 18 item 3: `tweedctl net wireguard rotate-key` under a 50/s ping. The key file, the
/// lease and every peer's view change to the new key (the old entry is gone, not left stale),
/// and the ping pauses for less than one handshake attempt.
#[test]
fn wireguard_key_rotation_under_ping_pauses_one_handshake_and_drops_the_old_peer() {
    require_root!(NEEDS_ROOT);
    let mut spec = LabSpec::new(per_process("wgrot"), 3);
    spec.backend = Backend::Wireguard;
    let lab = up(spec);
    let report = lab.check_until(Duration::from_secs(20)).expect("check");
    assert_eq!(report.summary(), "24 passed, 0 failed");
    let hosts = lab.state().hosts.clone();
    let sock = |i: usize| hosts[i].log.with_file_name("tweedd.sock");
    let h1_ip = hosts[0].public_ip.to_string();
    let key_file = hosts[0].agent_state_dir.join("wgkey");
    let before = pubkey_of(&key_file);

    let interval = Duration::from_millis(20);
    let count = 400; // 8 s
    let dst = ipv4_of(&hosts[1].pods[0]).to_string();
    let ping = lab
        .command(
            "h1/p1",
            &[
                "ping",
                "-n",
                "-i",
                "0.02",
                "-c",
                &count.to_string(),
                "-W",
                "1",
                &dst,
            ],
        )
        .unwrap()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ping");
    std::thread::sleep(Duration::from_secs(3));
    let r = tweedctl_json(&sock(0), &["wireguard", "rotate-key"]);
    let out = ping.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(r["old_public_key"], before.as_str(), "{r}");
    let new = r["new_public_key"].as_str().unwrap().to_string();
    assert_ne!(new, before);
    assert_eq!(r["published"], true, "{r}");

    let (tx, rx) = ping_summary(&out);
    let lost = tx - rx;
    let pause = interval * lost;
    println!(
        "rotation under ping: {tx} sent every {interval:?}, {lost} lost = {pause:?} paused \
         (one handshake attempt: {REKEY_TIMEOUT:?})"
    );
    assert!(tx as usize == count && rx > 0, "{out}");
    assert!(
        pause < REKEY_TIMEOUT,
        "the rotation paused traffic {pause:?}, more than one handshake ({REKEY_TIMEOUT:?}):\n{out}"
    );

    // The file holds the new key, mode 0400; the lease advertises it.
    assert_eq!(pubkey_of(&key_file), new);
    let meta = std::fs::metadata(&key_file).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o400);
    let leases = etcdctl(&lab, &["get", "--prefix", "/coreos.com/network/subnets/"]);
    assert!(
        leases.contains(&new) && !leases.contains(&before),
        "{leases}"
    );

    // Every peer's view: h1's subnet under the new key, the old key nowhere.
    let mut seen = String::new();
    let start = std::time::Instant::now();
    let mut views = || {
        seen.clear();
        (1..hosts.len()).all(|i| {
            let peers = tweedctl_json(&sock(i), &["peers"]);
            seen.push_str(&format!("{}: {peers:#}\n", hosts[i].name));
            let text = peers.to_string();
            let h1 = peers
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["public_ip"] == h1_ip.as_str());
            !text.contains(&before)
                && h1.is_some_and(|p| {
                    p["public_key"] == new.as_str() && p["handshake_age_seconds"].is_number()
                })
        })
    };
    let mut ok = views();
    while !ok && start.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(500));
        ok = views();
    }
    assert!(ok, "old key {before} / new key {new}:\n{seen}");
    let report = lab
        .check_until(Duration::from_secs(20))
        .expect("check after rotation");
    assert_eq!(report.summary(), "24 passed, 0 failed");
}

/// `wireguard-go` run by a test, killed (and its interface with it) when dropped.
struct WgGo(std::process::Child);

impl Drop for WgGo {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

impl WgGo {
    /// `wireguard-go` in the foreground in namespace `ns`, once its control socket is up. Its
    /// sockets live in `/var/run/wireguard`, shared by every namespace: `dev` must be unique.
    fn start(ns: &str, dev: &str) -> WgGo {
        let wg_go = WgGo(
            ns_command(ns, &["wireguard-go", "-f", dev])
                .env("WG_PROCESS_FOREGROUND", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("wireguard-go"),
        );
        let sock = std::path::PathBuf::from(format!("/var/run/wireguard/{dev}.sock"));
        wait_for(Duration::from_secs(5), "wireguard-go's socket", || {
            sock.exists()
        });
        wg_go
    }
}

/// h1's `tweed_udp_drops_total{reason="unauthenticated"}`.
fn unauthenticated_drops(lab: &tweed_lab::Lab) -> f64 {
    let url = format!("http://{}:9867/metrics", lab.state().hosts[0].public_ip);
    let body = lab
        .exec("h2", &["curl", "-sf", "--max-time", "2", &url])
        .unwrap_or_default();
    body.lines()
        .find(|l| l.starts_with("tweed_udp_drops_total{reason=\"unauthenticated\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Pings h1's pod from the outsider's WireGuard address while capturing in that pod: (pings
/// answered, bytes the pod capture holds beyond the pcap file header).
fn outsider_ping(lab: &tweed_lab::Lab, dst: &str, src: &str) -> (u32, usize) {
    let mut out = String::new();
    let bytes = capture_while(lab, "h1/p1", &format!("src host {src}"), || {
        out = lab
            .exec(
                "outside",
                &["ping", "-n", "-c", "6", "-i", "0.5", "-W", "1", dst],
            )
            .unwrap_or_else(|e| e.to_string());
    });
    assert!(bytes.len() >= 24, "no pcap written in h1/p1");
    let answered = out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .map(|_| ping_summary(&out).1)
        .unwrap_or(0);
    (answered, bytes.len() - 24)
}

/// Issue 18 item 4: a WireGuard peer outside the cluster's keys gets nothing into a pod and its
/// datagrams are counted. An independent implementation (Debian's wireguard-go) in the lab's
/// outside namespace: first with a key the leases know but a PSK the network does not use, then
/// with a key no lease advertises. A control capture shows the filter would see its packets.
#[test]
fn wireguard_peer_with_wrong_psk_or_key_gets_nothing_through_and_is_counted() {
    require_root!(NEEDS_ROOT);
    // scripts/test installs it (scripts/setup.sh's test list): missing is a failure, not a skip.
    assert!(
        which("wireguard-go").is_some(),
        "wireguard-go is not installed: apt-get install wireguard-go wireguard-tools"
    );
    let mut spec = LabSpec::new(per_process("wgbad"), 3);
    spec.backend = Backend::Wireguard;
    let lab = up(spec);
    let report = lab.check_until(Duration::from_secs(20)).expect("check");
    assert_eq!(report.summary(), "24 passed, 0 failed");
    let h1 = lab.state().hosts[0].clone();
    let h1_key = pubkey_of(&h1.agent_state_dir.join("wgkey"));
    let dst = ipv4_of(&h1.pods[0]).to_string();

    // The outsider's keys and PSK, in files `wg set` reads.
    let dir = TempDir(std::env::temp_dir().join(format!("tweed-wgbad-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let genkey = || {
        let out = std::process::Command::new("wg")
            .arg("genkey")
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let write = |name: &str, text: &str| {
        let p = dir.0.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let known = write("known", &genkey());
    let unknown = write("unknown", &genkey());
    let psk = write("psk", &genkey());
    let known_pub = pubkey_of(std::path::Path::new(&known));

    // A lease for the outsider, as flannel would write it: every node makes it a peer.
    let subnet = free_subnet(&lab, &[]);
    let key = format!("/coreos.com/network/subnets/{subnet}-24");
    let lease = format!(
        r#"{{"PublicIP":"198.18.0.250","BackendType":"wireguard","BackendData":{{"PublicKey":"{known_pub}","Port":51820}}}}"#
    );
    etcdctl(&lab, &["put", &key, &lease]);
    let src = format!("{}.1", &subnet[..subnet.rfind('.').unwrap()]);

    let dev = format!("wgb{}", std::process::id() % 100_000);
    let outside = lab.state().outside_netns.clone().expect("outside netns");
    let wg_go = WgGo::start(&outside, &dev);
    let sh = |cmd: &str| {
        let out = lab
            .exec("outside", &["sh", "-c", cmd])
            .unwrap_or_else(|e| panic!("{cmd}: {e}"));
        out
    };
    sh(&format!(
        "wg set {dev} listen-port 51820 private-key {known} peer {h1_key} preshared-key {psk} \
         endpoint {}:51820 allowed-ips 10.244.0.0/16 && ip addr add {src}/32 dev {dev} && \
         ip link set {dev} up && ip route add 10.244.0.0/16 dev {dev}",
        h1.public_ip
    ));

    // Nothing of the outsider's reaches the pod, and h1 counts what it refused.
    let refused = |what: &str| {
        let before = unauthenticated_drops(&lab);
        let (answered, captured) = outsider_ping(&lab, &dst, &src);
        assert_eq!((answered, captured), (0, 0), "{what} got through");
        let mut after = before;
        wait_for(
            Duration::from_secs(12),
            &format!("h1 counts the {what} datagrams"),
            || {
                after = unauthenticated_drops(&lab);
                after > before
            },
        );
        println!(
            "{what}: 0 of 6 pings through; h1 counted {} unauthenticated datagrams",
            after - before
        );
    };

    // Wrong PSK: the handshake never completes.
    refused("wrong PSK");

    // Wrong key: no lease advertises it.
    sh(&format!(
        "wg set {dev} private-key {unknown} peer {h1_key} preshared-key /dev/null"
    ));
    refused("wrong key");

    // Control: the same outsider with the key its lease advertises and no PSK is a peer like
    // any other, so the capture and the ping above would have shown what got through.
    sh(&format!("wg set {dev} private-key {known}"));
    let (answered, captured) = outsider_ping(&lab, &dst, &src);
    assert!(
        answered > 0 && captured > 0,
        "control: the right key got nothing through ({answered}, {captured})"
    );
    drop(wg_go);

    // The cluster's own traffic was never disturbed.
    let report = lab.check_until(Duration::from_secs(20)).expect("check");
    assert_eq!(report.summary(), "24 passed, 0 failed");
}

/// A directory of the test's, removed when dropped.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn which(bin: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(bin))
            .find(|f| f.is_file())
    })
}

/// flannel's wireguard MTU rule on the lab's 1500-byte underlay: MTU − 80.
const WG_MTU: u32 = 1420;
/// Bytes of each checksummed TCP transfer.
const BULK_BYTES: usize = 4 << 20;
const BULK_PORT: u16 = 5991;

/// Sends `BULK_BYTES` random bytes over one TCP connection from namespace `from` to `to_ip` in
/// namespace `to`; asserts the receiver got the same count and sha256 the sender sent.
fn tcp_transfer_checked(from: &str, to: &str, to_ip: &str) {
    use std::io::BufRead;
    let server = format!(
        "import socket,hashlib\n\
         s=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         s.bind(('{to_ip}',{BULK_PORT}))\ns.listen(1)\nprint('ready',flush=True)\n\
         s.settimeout(30)\nc,_=s.accept()\nc.settimeout(30)\nh=hashlib.sha256()\nn=0\n\
         while True:\n    d=c.recv(1<<20)\n    if not d: break\n    h.update(d)\n    n+=len(d)\n\
         print(n,h.hexdigest(),flush=True)\nc.close()\n"
    );
    let client = format!(
        "import socket,hashlib,os\nd=os.urandom({BULK_BYTES})\n\
         c=socket.create_connection(('{to_ip}',{BULK_PORT}),timeout=30)\n\
         c.sendall(d)\nc.shutdown(socket.SHUT_WR)\nc.recv(1)\n\
         print(len(d),hashlib.sha256(d).hexdigest(),flush=True)\n"
    );
    let mut srv = spawn_in(to, &["python3", "-c", &server], Stdio::piped());
    let mut out = std::io::BufReader::new(srv.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).expect("receiver output");
    assert_eq!(line.trim(), "ready", "receiver in {to} did not start");
    let sent = in_ns(from, &["timeout", "60", "python3", "-c", &client]);
    line.clear();
    out.read_line(&mut line).expect("receiver result");
    let _ = srv.kill();
    let _ = srv.wait();
    assert!(sent.starts_with(&format!("{BULK_BYTES} ")), "{sent}");
    assert_eq!(
        line.trim(),
        sent.trim(),
        "bytes and sha256 received in {to} (left) differ from those sent from {from} (right)"
    );
}

/// `ping -c 3` from `netns` to `dst`, with `extra` flags; panics unless every ping is answered
/// but the first (which may wait for the handshake).
fn ping_ok(netns: &str, dst: &str, extra: &[&str]) {
    let mut argv = vec!["ping", "-n", "-c", "3", "-i", "0.3", "-W", "3"];
    argv.extend_from_slice(extra);
    argv.push(dst);
    let out = ns_command(netns, &argv).output().expect("ping");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (tx, rx) = ping_summary(&text);
    assert!(
        tx == 3 && rx >= 2,
        "ping {extra:?} {dst} from {netns}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issue 18 item 4: a node configured exactly as flannel configures one, from the documented
/// lease JSON only, on an independent WireGuard implementation (Debian's wireguard-go), joins a
/// tweed lab running the wireguard backend: a key pair, its lease in flannel's format, the device
/// with the subnet's network address /32, one route for the whole network, MTU − 80, and a peer
/// per other lease (allowed IPs = its subnet, endpoint = `PublicIP:Port`). Pods on both sides
/// reach each other (full-size pings with DF, checksummed TCP both ways), both sides report the
/// handshakes, and tweed lists the node as a peer.
#[test]
fn a_wireguard_go_node_configured_as_flannel_does_interoperates_with_tweed_nodes() {
    require_root!(NEEDS_ROOT);
    // scripts/test installs it (scripts/setup.sh's test list): missing is a failure, not a skip.
    assert!(
        which("wireguard-go").is_some(),
        "wireguard-go is not installed: apt-get install wireguard-go wireguard-tools"
    );
    let mut spec = LabSpec::new(per_process("wgi"), 2);
    spec.backend = Backend::Wireguard;
    spec.pods_per_host = 1;
    let lab = up(spec);
    let fl = flannel::Node::up(&lab, "twg", &WG_MTU.to_string());
    let (node, pod, subnet, pod_ip) = (&*fl.node, &*fl.pod, &*fl.subnet, &*fl.pod_ip);
    let public_ip = flannel::PUBLIC_IP;
    let hosts = lab.state().hosts.clone();

    // The node's key pair, generated once as flannel does.
    let dir = TempDir(std::env::temp_dir().join(format!("tweed-wgi-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let key_file = dir.0.join("wgkey");
    let genkey = std::process::Command::new("wg")
        .arg("genkey")
        .output()
        .unwrap();
    std::fs::write(&key_file, &genkey.stdout).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o400)).unwrap();
    let public_key = pubkey_of(&key_file);

    // The device. flannel names it `flannel-wg`, but wireguard-go's control socket
    // (/var/run/wireguard/<dev>.sock) is not per namespace: a name per test run.
    let dev = format!("fwg{}", std::process::id() % 100_000);
    let _wg_go = WgGo::start(node, &dev);

    // flannel's device set-up: key and listen port, the subnet's network address as /32, the MTU,
    // and one route for the whole network (from the network config) through the device.
    let config: serde_json::Value = serde_json::from_str(&etcdctl(
        &lab,
        &["get", "--print-value-only", tweed_lab::spec::CONFIG_KEY],
    ))
    .expect("network config JSON");
    let network = config["Network"].as_str().expect("Network").to_string();
    in_ns(
        node,
        &[
            "wg",
            "set",
            &dev,
            "listen-port",
            "51820",
            "private-key",
            key_file.to_str().unwrap(),
        ],
    );
    fl.address_device(&dev);
    ip(&[
        "-n",
        node,
        "link",
        "set",
        &dev,
        "mtu",
        &WG_MTU.to_string(),
        "up",
    ]);
    ip(&[
        "-n", node, "route", "add", &network, "dev", &dev, "scope", "link",
    ]);

    // Its lease, byte for byte flannel's attrs for a wireguard node.
    let value = format!(
        r#"{{"PublicIP":"{public_ip}","BackendType":"wireguard","BackendData":{{"PublicKey":"{public_key}","Port":51820}}}}"#
    );
    fl.write_lease(&lab, 86400, &value);

    // A peer per other lease, read by flannel's rules: allowed IPs = the lease's subnet,
    // endpoint = PublicIP:Port (the local listen port when a lease has no Port).
    let mut peers = Vec::new();
    for (peer_net, v) in fl.peer_leases(&lab, &value, "wireguard") {
        let peer_key = v["BackendData"]["PublicKey"].as_str().expect("PublicKey");
        let port = v["BackendData"]["Port"].as_u64().unwrap_or(51820);
        let endpoint = format!("{}:{port}", v["PublicIP"].as_str().expect("PublicIP"));
        in_ns(
            node,
            &[
                "wg",
                "set",
                &dev,
                "peer",
                peer_key,
                "endpoint",
                &endpoint,
                "allowed-ips",
                &format!("{peer_net}/24"),
            ],
        );
        peers.push(peer_key.to_string());
    }
    assert_eq!(peers.len(), 2, "{peers:?}");

    // Both directions, every tweed pod, also full-size with DF at the MTU (IP 20 + ICMP 8).
    let full = (WG_MTU - 28).to_string();
    for h in &hosts {
        for p in &h.pods {
            let ip = ipv4_of(p).to_string();
            ping_ok(pod, &ip, &[]);
            ping_ok(&p.netns, pod_ip, &[]);
            ping_ok(pod, &ip, &["-M", "do", "-s", &full]);
            ping_ok(&p.netns, pod_ip, &["-M", "do", "-s", &full]);
        }
    }
    // TCP, checksummed, each way.
    let (h1_pod, h2_pod) = (&hosts[0].pods[0], &hosts[1].pods[0]);
    tcp_transfer_checked(pod, &h1_pod.netns, &ipv4_of(h1_pod).to_string());
    tcp_transfer_checked(&h2_pod.netns, pod, pod_ip);

    // wireguard-go's side: a handshake with each tweed node.
    let handshakes = in_ns(node, &["wg", "show", &dev, "latest-handshakes"]);
    for k in &peers {
        let at: u64 = handshakes
            .lines()
            .find_map(|l| l.strip_prefix(k.as_str()))
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        assert!(at > 0, "no handshake with {k}:\n{handshakes}");
    }
    // ... and the transfers counted on the right peers: to h1, from h2.
    let transfer = in_ns(node, &["wg", "show", &dev, "transfer"]);
    let bytes = |key: &str, col: usize| -> u64 {
        transfer
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|t| t.split_whitespace().nth(col)?.parse().ok())
            .unwrap_or(0)
    };
    let key_of = |h: &tweed_lab::state::HostState| pubkey_of(&h.agent_state_dir.join("wgkey"));
    let (h1_key, h2_key) = (key_of(&hosts[0]), key_of(&hosts[1]));
    assert!(
        bytes(&h1_key, 1) >= BULK_BYTES as u64 && bytes(&h2_key, 0) >= BULK_BYTES as u64,
        "wireguard-go's transfer (rx tx per peer):\n{transfer}"
    );
    // tweed's side: each node lists the wireguard-go node as a peer under its key, with a
    // handshake and bytes both ways, h1 having received and h2 sent a transfer's worth (figures
    // refresh every 5 s).
    for (i, h) in hosts.iter().enumerate() {
        let sock = h.api_socket.clone().expect("the lab's agent socket");
        let listed = |peers: &serde_json::Value| {
            peers.as_array().into_iter().flatten().any(|p| {
                p["public_ip"] == public_ip
                    && p["subnet"].as_str().is_some_and(|s| s.starts_with(subnet))
                    && p["public_key"] == public_key.as_str()
                    && p["handshake_age_seconds"].is_number()
                    && p["tx_bytes"].as_u64().unwrap_or(0) > 0
                    && p["rx_bytes"].as_u64().unwrap_or(0) > 0
                    && p[["rx_bytes", "tx_bytes"][i]].as_u64().unwrap_or(0) >= BULK_BYTES as u64
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(12);
        let mut seen = tweedctl_json(&sock, &["peers"]);
        while !listed(&seen) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
            seen = tweedctl_json(&sock, &["peers"]);
        }
        assert!(
            listed(&seen),
            "{} does not list the wireguard-go node {public_key} with its handshake and \
             transfer:\n{seen:#}",
            h.name
        );
        println!("{}: {seen}", h.name);
    }
}

/// Captures on `target` while `h1/p1` pings the IPv6 address `dst` with the marker.
fn capture_during_ping6(lab: &tweed_lab::Lab, target: &str, dst: &str) -> Vec<u8> {
    capture_while(lab, target, "udp or icmp6", || {
        let out = lab
            .exec(
                "h1/p1",
                &[
                    "ping", "-6", "-c", "5", "-i", "0.2", "-W", "2", "-p", MARKER_HEX, dst,
                ],
            )
            .unwrap_or_else(|e| panic!("ping6 {dst}: {e}"));
        let (tx, rx) = ping_summary(&out);
        assert_eq!((tx, rx), (5, 5), "{out}");
    })
}

/// Issues 18/19: a dual-stack lab on the wireguard backend (userspace path, `Mode` auto: one
/// device for both families over the IPv4 underlay). Every pod pair across the 3 hosts pings
/// over IPv4 and IPv6; each lease advertises `PublicIPv6` and `BackendV6Data
/// {"PublicKey","Port"}` with the node's one key and `ListenPort`; `tweed-wg` holds the IPv6
/// subnet address and the `IPv6Network` route; the underlay carries IPv6 pod traffic only as
/// WireGuard datagrams, never the payload in clear; an inner IPv6 source outside the sending
/// peer's allowed IPs is dropped and counted. IPv6 comes back after an agent restart.
#[test]
fn wireguard_dual_stack_pods_reach_each_other_over_ipv4_and_ipv6_encrypted() {
    require_root!(NEEDS_ROOT);
    let mut spec = LabSpec::new(per_process("wgd"), 3);
    spec.backend = Backend::Wireguard;
    spec.ip_family = tweed_lab::spec::IpFamily::Dual;
    let lab = up(spec);
    let report = lab.check_until(Duration::from_secs(20)).expect("check");
    let failures: Vec<String> = report
        .failures()
        .map(|f| format!("{} -> {} ({}): {}", f.from, f.to, f.to_ip, f.detail))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // 3 hosts x 2 pods, each to the 4 pods elsewhere, per family.
    let v6 = report.results.iter().filter(|r| r.to_ip.is_ipv6()).count();
    assert_eq!((report.results.len(), v6), (48, 24));

    let listing = etcdctl(&lab, &["get", "--prefix", "/coreos.com/network/subnets/"]);
    let lines: Vec<&str> = listing.lines().collect();
    for (i, h) in lab.state().hosts.iter().enumerate() {
        let public = pubkey_of(&h.agent_state_dir.join("wgkey"));
        let env = tweed_config::SubnetEnv::read(&h.subnet_file).unwrap();
        let sub6 = env.ipv6.expect("subnet.env IPv6 half").node_subnet();
        // flannel's dual key, and the IPv6 half of the value.
        let key_at = lines
            .iter()
            .position(|l| l.ends_with(&format!("&{}-{}", sub6.network(), sub6.prefix())))
            .unwrap_or_else(|| panic!("{}: no dual-stack key for {sub6} in\n{listing}", h.name));
        let v: serde_json::Value = serde_json::from_str(lines[key_at + 1]).unwrap();
        assert_eq!(v["BackendType"], "wireguard");
        assert_eq!(
            v["PublicIPv6"],
            tweed_lab::names::host_public_ip6(i + 1, 1).to_string()
        );
        let want = serde_json::json!({"PublicKey": public, "Port": 51820});
        assert_eq!(v["BackendData"], want, "{}", h.name);
        assert_eq!(v["BackendV6Data"], want, "{}", h.name);
        // The device: the IPv6 subnet address and one route for the IPv6 overlay.
        let addr = in_ns(&h.netns, &["ip", "-6", "addr", "show", "dev", "tweed-wg"]);
        let own = format!("{}/128", sub6.network());
        assert!(addr.contains(&own), "{}: no {own} in {addr}", h.name);
        let routes = in_ns(&h.netns, &["ip", "-6", "route", "show", "dev", "tweed-wg"]);
        assert!(
            routes.contains(tweed_lab::names::OVERLAY6_NETWORK),
            "{}: {routes}",
            h.name
        );
    }

    // Underlay: WireGuard datagrams, never the marker; in the destination pod: the marker.
    let h2 = &lab.state().hosts[1];
    let dst = h2.pods[0].ip6.expect("pod IPv6").to_string();
    let underlay = capture_during_ping6(&lab, "underlay", &dst);
    assert!(underlay.len() > 200, "empty capture on the underlay");
    assert_eq!(
        count(&underlay, MARKER),
        0,
        "IPv6 pod payload in clear on the underlay"
    );
    // 5 requests and 5 replies, each a datagram to port 51820 (both nodes listen there).
    let wg = wireguard_datagrams_during_ping(&lab, &dst, true);
    assert!(wg >= 10, "too few WireGuard datagrams captured ({wg})");
    let in_pod = capture_during_ping6(&lab, "h2/p1", &dst);
    assert!(
        count(&in_pod, MARKER) >= 5,
        "the control capture missed the marker"
    );

    // The receive filter for IPv6: h2/p1 sends inner IPv6 packets with a source in h3's
    // subnet to h1/p1. h2 seals them (its pod's packets are not checked on the way out), h1
    // opens them, finds the source outside h2's allowed IPs and drops them, counted.
    let metric = |series: &str| -> f64 {
        let url = format!("http://{}:9867/metrics", lab.state().hosts[0].public_ip);
        lab.exec("h2", &["curl", "-sf", "--max-time", "2", &url])
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let spoofed_series = "tweed_udp_drops_total{reason=\"spoofed_inner\"}";
    let before = metric(spoofed_series);
    let h1p1_ip6 = lab.state().hosts[0].pods[0].ip6.unwrap().to_string();
    let h3_src = lab.state().hosts[2].pods[0].ip6.unwrap().to_string();
    let inject = format!(
        "import socket,struct\n\
         s=socket.socket(socket.AF_INET6,socket.SOCK_RAW,socket.IPPROTO_RAW)\n\
         src=socket.inet_pton(socket.AF_INET6,'{h3_src}')\n\
         dst=socket.inet_pton(socket.AF_INET6,'{h1p1_ip6}')\n\
         p=b'spoofed'\nu=struct.pack('!HHHH',5999,5999,8+len(p),0)+p\n\
         h=struct.pack('!IHBB',6<<28,len(u),17,64)+src+dst\n\
         for i in range(20): s.sendto(h+u,('{h1p1_ip6}',0))\n"
    );
    lab.exec("h2/p1", &["python3", "-c", &inject])
        .expect("inject from h2/p1");
    wait_for(
        Duration::from_secs(10),
        "h1 counting 20 spoofed inner IPv6 sources from h2",
        || metric(spoofed_series) >= before + 20.0,
    );

    // A restarted agent carries IPv6 again (device, address and route stay; peers reloaded).
    let stopped = stop_agent(&lab, "h2", libc::SIGTERM);
    restart_agent_ready(&stopped, "h2");
    let h1p1 = lab.state().hosts[0].pods[0].netns.clone();
    wait_for(
        Duration::from_secs(15),
        "h1/p1 ping6 to h2/p1 after h2's restart",
        || ok_in(&h1p1, &["ping", "-6", "-n", "-c", "1", "-W", "2", &dst]),
    );
}

/// Issues 18/19: a dual-stack node configured by hand as flannel's wireguard backend configures
/// one in a single-device mode (`auto`/`ipv4`), on wireguard-go, from the documented formats
/// only: its lease under flannel's dual key `<v4>-24&<v6>-64` with `PublicIPv6`, `BackendData`
/// and `BackendV6Data {"PublicKey","Port"}`; its device with the v4 /32 and the v6 subnet
/// address /128 and a route for each network; a peer per tweed lease with both subnets as
/// allowed IPs at `PublicIP:Port`. tweed reads the lease into a peer with both allowed IPs: its
/// pod and the tweed pods reach each other over IPv4 and IPv6, both ways (a missing IPv6
/// allowed IP on either side would drop the IPv6 pings).
#[test]
fn a_flannel_configured_dual_stack_wireguard_go_node_reaches_tweed_pods_over_both_families() {
    require_root!(NEEDS_ROOT);
    assert!(
        which("wireguard-go").is_some(),
        "wireguard-go is not installed: apt-get install wireguard-go wireguard-tools"
    );
    let mut spec = LabSpec::new(per_process("wgf6"), 2);
    spec.backend = Backend::Wireguard;
    spec.pods_per_host = 1;
    spec.ip_family = tweed_lab::spec::IpFamily::Dual;
    let lab = up(spec);
    let fl = flannel::Node::up(&lab, "twgf6", &WG_MTU.to_string());
    let (node, pod, subnet, pod_ip) = (&*fl.node, &*fl.pod, &*fl.subnet, &*fl.pod_ip);
    let public_ip = flannel::PUBLIC_IP;
    let public_ip6 = tweed_lab::names::host_public_ip6(200, 1);
    let hosts = lab.state().hosts.clone();

    let (subnet6, pod_ip6) = flannel_ipv6(&lab, &fl, public_ip6);

    // Key and device, as flannel does.
    let dir = TempDir(std::env::temp_dir().join(format!("tweed-wgf6-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let key_file = dir.0.join("wgkey");
    let genkey = std::process::Command::new("wg")
        .arg("genkey")
        .output()
        .unwrap();
    std::fs::write(&key_file, &genkey.stdout).unwrap();
    let public_key = pubkey_of(&key_file);
    let dev = format!("fw6{}", std::process::id() % 100_000);
    let _wg_go = WgGo::start(node, &dev);
    in_ns(
        node,
        &[
            "wg",
            "set",
            &dev,
            "listen-port",
            "51820",
            "private-key",
            key_file.to_str().unwrap(),
        ],
    );
    fl.address_device(&dev);
    addr6(node, format!("{}/128", subnet6.network()), &dev);
    ip(&[
        "-n",
        node,
        "link",
        "set",
        &dev,
        "mtu",
        &WG_MTU.to_string(),
        "up",
    ]);
    ip(&[
        "-n",
        node,
        "route",
        "add",
        tweed_lab::names::OVERLAY_NETWORK,
        "dev",
        &dev,
        "scope",
        "link",
    ]);
    ip(&[
        "-n",
        node,
        "-6",
        "route",
        "add",
        tweed_lab::names::OVERLAY6_NETWORK,
        "dev",
        &dev,
    ]);

    // Its lease under flannel's dual key.
    let value = format!(
        r#"{{"PublicIP":"{public_ip}","PublicIPv6":"{public_ip6}","BackendType":"wireguard","BackendData":{{"PublicKey":"{public_key}","Port":51820}},"BackendV6Data":{{"PublicKey":"{public_key}","Port":51820}}}}"#
    );
    let key = format!("{subnet}-24&{}-64", subnet6.network());
    fl.write_lease_at(&lab, &key, 86400, &value);

    // A peer per tweed lease, read from etcd: allowed IPs both subnets of its key, endpoint
    // PublicIP:BackendData.Port (flannel's single-device modes, IPv4 endpoint).
    let listing = etcdctl(&lab, &["get", "--prefix", "/coreos.com/network/subnets/"]);
    let lines: Vec<&str> = listing.lines().collect();
    let mut peers = 0;
    for kv in lines.chunks(2) {
        let [k, v] = kv else { continue };
        let name = k.rsplit('/').next().unwrap();
        let Some((v4, v6)) = name.split_once('&') else {
            panic!("tweed's dual-stack lease has a dual key: {k}")
        };
        let attrs: serde_json::Value = serde_json::from_str(v).unwrap();
        if attrs["BackendData"]["PublicKey"] == public_key.as_str() {
            continue;
        }
        assert_eq!(
            attrs["BackendV6Data"], attrs["BackendData"],
            "tweed's v6 half: same key and port on one device"
        );
        let cidr = |s: &str| {
            let (a, l) = s.rsplit_once('-').unwrap();
            format!("{a}/{l}")
        };
        let endpoint = format!(
            "{}:{}",
            attrs["PublicIP"].as_str().unwrap(),
            attrs["BackendData"]["Port"]
        );
        in_ns(
            node,
            &[
                "wg",
                "set",
                &dev,
                "peer",
                attrs["BackendData"]["PublicKey"].as_str().unwrap(),
                "endpoint",
                &endpoint,
                "allowed-ips",
                &format!("{},{}", cidr(v4), cidr(v6)),
            ],
        );
        peers += 1;
    }
    assert_eq!(peers, 2, "{listing}");

    // Both families, both directions, every tweed pod.
    let pod_ip6 = pod_ip6.to_string();
    for h in &hosts {
        for p in &h.pods {
            let ip4 = ipv4_of(p).to_string();
            let ip6 = p.ip6.expect("pod IPv6").to_string();
            ping_ok(pod, &ip4, &[]);
            ping_ok(&p.netns, pod_ip, &[]);
            ping_ok(pod, &ip6, &["-6"]);
            ping_ok(&p.netns, &pod_ip6, &["-6"]);
        }
    }
}

/// Every pod pair of a 3-host dual-stack lab answers (48 pairs, 24 of them IPv6).
fn all_pairs_dual(lab: &tweed_lab::Lab) {
    let report = lab.check_until(Duration::from_secs(20)).expect("check");
    let failures: Vec<String> = report
        .failures()
        .map(|f| format!("{} -> {} ({}): {}", f.from, f.to, f.to_ip, f.detail))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let v6 = report.results.iter().filter(|r| r.to_ip.is_ipv6()).count();
    assert_eq!((report.results.len(), v6), (48, 24));
}

/// WireGuard datagrams over the IPv6 underlay to `ListenPortV6` (51821) while `h1/p1` pings
/// the IPv6 address `dst` 10 times (20 datagrams: a capture that starts late on a busy host
/// may miss a few of the first).
fn wireguard_v6_datagrams_during_ping6(lab: &tweed_lab::Lab, dst: &str) -> usize {
    let cap = capture_while(lab, "underlay", "ip6 and udp dst port 51821", || {
        let out = lab
            .exec(
                "h1/p1",
                &["ping", "-6", "-c", "10", "-i", "0.2", "-W", "2", dst],
            )
            .unwrap_or_else(|e| panic!("ping6 {dst}: {e}"));
        let (tx, rx) = ping_summary(&out);
        assert_eq!((tx, rx), (10, 10), "{out}");
    });
    pcap_packets(&cap)
}

/// Issues 18/19: flannel's default `Mode: separate` on the userspace path. Each of 3 dual-stack
/// hosts runs `tweed-wg` (IPv4 halves, port 51820) and a second userspace device
/// `tweed-wg-v6` (a TUN device with an IPv6 socket on `ListenPortV6` 51821, the same key, the
/// IPv6 subnet's /128 and the `IPv6Network` route); leases advertise `BackendV6Data
/// {"PublicKey","Port":51821}`. Every pod pair pings over both families; IPv6 pod traffic
/// crosses the underlay as UDP over IPv6 to port 51821, never the payload in clear; an inner
/// IPv6 source outside the sending peer's allowed IPs is dropped and counted; a restarted
/// agent carries both families again.
#[test]
fn wireguard_userspace_separate_mode_carries_ipv6_pods_on_a_second_device_over_the_ipv6_underlay() {
    require_root!(NEEDS_ROOT);
    let mut spec = LabSpec::new(per_process("wgus"), 3);
    spec.backend = Backend::Wireguard;
    spec.ip_family = tweed_lab::spec::IpFamily::Dual;
    spec.wireguard_mode = Some("separate".into());
    spec.agent_args = vec!["--wireguard-impl=userspace".into()];
    let lab = up(spec);
    let all_pairs = all_pairs_dual;
    all_pairs(&lab);

    // Per-peer figures of the userspace tweed-wg-v6: each peer's IPv6 entry in `tweedctl net
    // peers` (its own device, IPv6 subnet, handshake and bytes after the all-pairs pings) and
    // in the metrics with the device label.
    let h1 = &lab.state().hosts[0];
    let sock = h1.log.with_file_name("tweedd.sock");
    let entries6_ok = |peers: &serde_json::Value| {
        let list = peers.as_array().cloned().unwrap_or_default();
        list.len() == 2
            && list.iter().all(|p| {
                let e = &p["v6_entry"];
                p["device"] == "tweed-wg"
                    && e["device"] == "tweed-wg-v6"
                    && e["subnet"].as_str().is_some_and(|s| s.contains(':'))
                    && e["public_key"] == p["public_key"]
                    && e["handshake_age_seconds"].is_number()
                    && e["tx_bytes"].as_u64().unwrap_or(0) > 0
                    && e["rx_bytes"].as_u64().unwrap_or(0) > 0
            })
    };
    // Figures are refreshed every 5 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(12);
    let mut peers = tweedctl_json(&sock, &["peers"]);
    while !entries6_ok(&peers) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        peers = tweedctl_json(&sock, &["peers"]);
    }
    assert!(entries6_ok(&peers), "h1's peers:\n{peers:#}");
    println!("userspace separate, h1's peers: {peers}");
    let url = format!("http://{}:9867/metrics", h1.public_ip);
    let body = lab
        .exec("h2", &["curl", "-sf", "--max-time", "2", &url])
        .expect("h1's metrics");
    let ages6 = body
        .lines()
        .filter(|l| {
            l.starts_with("tweed_wireguard_peer_handshake_age_seconds{")
                && l.contains("device=\"tweed-wg-v6\"")
                && !l.ends_with(" -1")
        })
        .count();
    let bytes6 = body
        .lines()
        .filter(|l| {
            l.starts_with("tweed_wireguard_peer_bytes{") && l.contains("device=\"tweed-wg-v6\"")
        })
        .count();
    assert_eq!((ages6, bytes6), (2, 4), "{body}");

    let listing = etcdctl(&lab, &["get", "--prefix", "/coreos.com/network/subnets/"]);
    let lines: Vec<&str> = listing.lines().collect();
    for (i, h) in lab.state().hosts.iter().enumerate() {
        let public = pubkey_of(&h.agent_state_dir.join("wgkey"));
        let env = tweed_config::SubnetEnv::read(&h.subnet_file).unwrap();
        let sub6 = env.ipv6.expect("subnet.env IPv6 half").node_subnet();
        let key_at = lines
            .iter()
            .position(|l| l.ends_with(&format!("&{}-{}", sub6.network(), sub6.prefix())))
            .unwrap_or_else(|| panic!("{}: no dual-stack key for {sub6} in\n{listing}", h.name));
        let v: serde_json::Value = serde_json::from_str(lines[key_at + 1]).unwrap();
        assert_eq!(
            v["PublicIPv6"],
            tweed_lab::names::host_public_ip6(i + 1, 1).to_string()
        );
        assert_eq!(
            v["BackendData"],
            serde_json::json!({"PublicKey": public, "Port": 51820}),
            "{}",
            h.name
        );
        assert_eq!(
            v["BackendV6Data"],
            serde_json::json!({"PublicKey": public, "Port": 51821}),
            "{}",
            h.name
        );
        // The IPv6 device: a TUN device with the /128 and the IPv6 overlay route; its socket
        // on [::]:51821. tweed-wg keeps IPv4 only.
        let link = in_ns(&h.netns, &["ip", "-d", "link", "show", "tweed-wg-v6"]);
        assert!(link.contains("tun") && link.contains("mtu 1420"), "{link}");
        let addr = in_ns(
            &h.netns,
            &["ip", "-6", "addr", "show", "dev", "tweed-wg-v6"],
        );
        let own = format!("{}/128", sub6.network());
        assert!(addr.contains(&own), "{}: no {own} in {addr}", h.name);
        let routes = in_ns(
            &h.netns,
            &["ip", "-6", "route", "show", "dev", "tweed-wg-v6"],
        );
        assert!(
            routes.contains(tweed_lab::names::OVERLAY6_NETWORK),
            "{}: {routes}",
            h.name
        );
        let v4dev = in_ns(&h.netns, &["ip", "-6", "route", "show", "dev", "tweed-wg"]);
        assert!(
            !v4dev.contains(tweed_lab::names::OVERLAY6_NETWORK),
            "{}: tweed-wg still routes IPv6: {v4dev}",
            h.name
        );
        let socks = in_ns(&h.netns, &["ss", "-uln"]);
        assert!(socks.contains("[::]:51821"), "{}: {socks}", h.name);
    }

    // Underlay: IPv6 pod traffic as WireGuard datagrams over IPv6 to 51821, never the marker
    // in clear; in the destination pod the marker is there (the capture works).
    let h2 = &lab.state().hosts[1];
    let dst = h2.pods[0].ip6.expect("pod IPv6").to_string();
    let underlay = capture_during_ping6(&lab, "underlay", &dst);
    assert!(underlay.len() > 200, "empty capture on the underlay");
    assert_eq!(
        count(&underlay, MARKER),
        0,
        "IPv6 pod payload in clear on the underlay"
    );
    let wg6 = wireguard_v6_datagrams_during_ping6(&lab, &dst);
    assert!(
        wg6 >= 10,
        "too few WireGuard datagrams to [v6]:51821 ({wg6})"
    );
    let in_pod = capture_during_ping6(&lab, "h2/p1", &dst);
    assert!(
        count(&in_pod, MARKER) >= 5,
        "the control capture missed the marker"
    );

    // The receive filter on tweed-wg-v6: h2/p1 sends inner IPv6 packets with a source in h3's
    // subnet to h1/p1; h1 opens them, finds the source outside h2's allowed IPs, drops them,
    // counted with the rest of the userspace drops.
    let metric = |series: &str| -> f64 {
        let url = format!("http://{}:9867/metrics", lab.state().hosts[0].public_ip);
        lab.exec("h2", &["curl", "-sf", "--max-time", "2", &url])
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let spoofed_series = "tweed_udp_drops_total{reason=\"spoofed_inner\"}";
    let before = metric(spoofed_series);
    let h1p1_ip6 = lab.state().hosts[0].pods[0].ip6.unwrap().to_string();
    let h3_src = lab.state().hosts[2].pods[0].ip6.unwrap().to_string();
    let inject = format!(
        "import socket,struct\n\
         s=socket.socket(socket.AF_INET6,socket.SOCK_RAW,socket.IPPROTO_RAW)\n\
         src=socket.inet_pton(socket.AF_INET6,'{h3_src}')\n\
         dst=socket.inet_pton(socket.AF_INET6,'{h1p1_ip6}')\n\
         p=b'spoofed'\nu=struct.pack('!HHHH',5999,5999,8+len(p),0)+p\n\
         h=struct.pack('!IHBB',6<<28,len(u),17,64)+src+dst\n\
         for i in range(20): s.sendto(h+u,('{h1p1_ip6}',0))\n"
    );
    lab.exec("h2/p1", &["python3", "-c", &inject])
        .expect("inject from h2/p1");
    wait_for(
        Duration::from_secs(10),
        "h1 counting 20 spoofed inner IPv6 sources from h2",
        || metric(spoofed_series) >= before + 20.0,
    );

    // Drift: tweed-wg-v6's /128 deleted behind the agent's back comes back; the device
    // deleted is set up again (new TUN device, workers, address, route, peers).
    let h1 = &lab.state().hosts[0];
    let sub6 = tweed_config::SubnetEnv::read(&h1.subnet_file)
        .unwrap()
        .ipv6
        .unwrap()
        .node_subnet();
    let own = format!("{}/128", sub6.network());
    in_ns(
        &h1.netns,
        &["ip", "-6", "addr", "del", &own, "dev", "tweed-wg-v6"],
    );
    wait_for(
        Duration::from_secs(10),
        "h1's tweed-wg-v6 /128 repaired",
        || {
            in_ns(
                &h1.netns,
                &["ip", "-6", "addr", "show", "dev", "tweed-wg-v6"],
            )
            .contains(&own)
        },
    );
    let h1p1 = h1.pods[0].netns.clone();
    in_ns(&h1.netns, &["ip", "link", "del", "tweed-wg-v6"]);
    wait_for(
        Duration::from_secs(20),
        "h1/p1 ping6 to h2/p1 after h1's tweed-wg-v6 was deleted",
        || ok_in(&h1p1, &["ping", "-6", "-n", "-c", "1", "-W", "2", &dst]),
    );

    // A restarted agent re-attaches both devices and carries both families again.
    let stopped = stop_agent(&lab, "h2", libc::SIGTERM);
    restart_agent_ready(&stopped, "h2");
    wait_for(
        Duration::from_secs(15),
        "h1/p1 ping6 to h2/p1 after h2's restart",
        || ok_in(&h1p1, &["ping", "-6", "-n", "-c", "1", "-W", "2", &dst]),
    );
    all_pairs(&lab);
}

/// Issue 18: flannel's `Mode: ipv6` with the default `--wireguard-impl=auto`, which lands on
/// the userspace path on this host (no wireguard module). Each of 3 dual-stack hosts runs one
/// userspace device `tweed-wg` carrying both families, its socket IPv6 only on `ListenPort`;
/// every peer is reached at `[PublicIPv6]:51820`. Leases carry `BackendData` and
/// `BackendV6Data`, both `{"PublicKey","Port":51820}`. Every pod pair answers over both
/// families; while pods ping over both, the underlay carries WireGuard as UDP over IPv6 to
/// 51820 and no IPv4 WireGuard datagram, and never a payload in clear; a restarted agent
/// changes no address or route and carries both families again.
#[test]
fn wireguard_ipv6_mode_on_the_default_implementation_reaches_every_peer_over_the_ipv6_underlay() {
    require_root!(NEEDS_ROOT);
    let mut spec = LabSpec::new(per_process("wg6m"), 3);
    spec.backend = Backend::Wireguard;
    spec.ip_family = tweed_lab::spec::IpFamily::Dual;
    spec.wireguard_mode = Some("ipv6".into());
    let lab = up(spec);
    all_pairs_dual(&lab);

    let listing = etcdctl(&lab, &["get", "--prefix", "/coreos.com/network/subnets/"]);
    let lines: Vec<&str> = listing.lines().collect();
    for (i, h) in lab.state().hosts.iter().enumerate() {
        let public = pubkey_of(&h.agent_state_dir.join("wgkey"));
        let env = tweed_config::SubnetEnv::read(&h.subnet_file).unwrap();
        let sub6 = env.ipv6.expect("subnet.env IPv6 half").node_subnet();
        let sub4 = env.node_subnet().expect("subnet.env IPv4 half");
        let key_at = lines
            .iter()
            .position(|l| l.ends_with(&format!("&{}-{}", sub6.network(), sub6.prefix())))
            .unwrap_or_else(|| panic!("{}: no dual-stack key for {sub6} in\n{listing}", h.name));
        let v: serde_json::Value = serde_json::from_str(lines[key_at + 1]).unwrap();
        assert_eq!(
            v["PublicIPv6"],
            tweed_lab::names::host_public_ip6(i + 1, 1).to_string()
        );
        let want = serde_json::json!({"PublicKey": public, "Port": 51820});
        assert_eq!(v["BackendData"], want, "{}", h.name);
        assert_eq!(v["BackendV6Data"], want, "{}", h.name);
        let sock = h.log.with_file_name("tweedd.sock");
        let status = tweedctl_json(&sock, &["status"]);
        assert_eq!(status["backend_implementation"], "userspace", "{status}");
        // One TUN device with both families; no second device; one IPv6-only socket.
        let link = in_ns(&h.netns, &["ip", "-d", "link", "show", "tweed-wg"]);
        assert!(link.contains("tun") && link.contains("mtu 1420"), "{link}");
        let links = in_ns(&h.netns, &["ip", "-o", "link", "show"]);
        assert!(!links.contains("tweed-wg-v6"), "{}: {links}", h.name);
        let addr = in_ns(&h.netns, &["ip", "addr", "show", "dev", "tweed-wg"]);
        for own in [
            format!("{}/32", sub4.network()),
            format!("{}/128", sub6.network()),
        ] {
            assert!(addr.contains(&own), "{}: no {own} in {addr}", h.name);
        }
        let r6 = in_ns(&h.netns, &["ip", "-6", "route", "show", "dev", "tweed-wg"]);
        assert!(
            r6.contains(tweed_lab::names::OVERLAY6_NETWORK),
            "{}: {r6}",
            h.name
        );
        let socks = in_ns(&h.netns, &["ss", "-Huln", "sport", "= :51820"]);
        // One socket per worker (a SO_REUSEPORT group), every one IPv6.
        assert!(
            socks.lines().count() >= 1 && socks.lines().all(|l| l.contains("[::]:51820")),
            "{}: {socks}",
            h.name
        );
        // Each peer one entry on tweed-wg, at its IPv6 endpoint (the figures name it), with
        // a handshake after the all-pairs pings. The figures are read from the device
        // periodically, so a peer programmed a moment ago may not have its entry yet.
        wait_for(
            Duration::from_secs(30),
            "every peer's tweed-wg entry",
            || {
                let p = tweedctl_json(&sock, &["peers"]);
                p.as_array()
                    .is_some_and(|l| l.len() == 2 && l.iter().all(|p| p["device"] == "tweed-wg"))
            },
        );
        let peers = tweedctl_json(&sock, &["peers"]);
        let list = peers.as_array().cloned().unwrap_or_default();
        assert_eq!(list.len(), 2, "{peers:#}");
        for p in &list {
            assert_eq!(p["device"], "tweed-wg", "{peers:#}");
            assert!(p["v6_entry"].is_null(), "{peers:#}");
        }
    }

    // Underlay: while h1/p1 pings h2/p1 over both families, UDP over IPv6 to 51820 and no
    // IPv4 WireGuard datagram at all (a capture of each, one inside the other).
    let h2 = &lab.state().hosts[1];
    let dst4 = ipv4_of(&h2.pods[0]).to_string();
    let dst6 = h2.pods[0].ip6.expect("pod IPv6").to_string();
    let mut wg6 = 0;
    let v4cap = capture_while(
        &lab,
        "underlay",
        "ip and (udp port 51820 or udp port 51821)",
        || {
            let cap = capture_while(&lab, "underlay", "ip6 and udp dst port 51820", || {
                for dst in [&dst4, &dst6] {
                    let out = lab
                        .exec("h1/p1", &["ping", "-c", "10", "-i", "0.2", "-W", "2", dst])
                        .unwrap_or_else(|e| panic!("ping {dst}: {e}"));
                    assert_eq!(ping_summary(&out), (10, 10), "{out}");
                }
            });
            wg6 = pcap_packets(&cap);
        },
    );
    let wg4 = pcap_packets(&v4cap);
    println!("ipv6 mode underlay: {wg6} UDP-over-IPv6 datagrams to 51820, {wg4} over IPv4");
    assert!(wg6 >= 20, "too few WireGuard datagrams over IPv6 ({wg6})");
    assert_eq!(wg4, 0, "WireGuard datagrams over the IPv4 underlay");
    for (cap, what) in [
        (capture_during_ping(&lab, "underlay", &dst4), "IPv4"),
        (capture_during_ping6(&lab, "underlay", &dst6), "IPv6"),
    ] {
        assert!(cap.len() > 200, "empty capture on the underlay");
        assert_eq!(count(&cap, MARKER), 0, "{what} pod payload in clear");
    }
    let in_pod = capture_during_ping(&lab, "h2/p1", &dst4);
    assert!(
        count(&in_pod, MARKER) >= 5,
        "the control capture missed the marker"
    );

    // A restart: the agent re-attaches its device, whose addresses and routes are right, so
    // nothing changes there (`ip monitor` sees no address or route event); then both families
    // run again.
    let (_, events) = restart_watching_addresses_and_routes(&lab, "h2");
    assert_eq!(events.trim(), "", "address or route changes at a restart");
    let h1p1 = lab.state().hosts[0].pods[0].netns.clone();
    wait_for(
        Duration::from_secs(15),
        "h1/p1 ping6 to h2/p1 after h2's restart",
        || ok_in(&h1p1, &["ping", "-6", "-n", "-c", "1", "-W", "2", &dst6]),
    );
    all_pairs_dual(&lab);
}

/// Adds the IPv6 address `a` to `dev` in `ns`, without DAD.
fn addr6(ns: &str, a: String, dev: &str) {
    ip(&["-n", ns, "-6", "addr", "add", &a, "dev", dev, "nodad"]);
}

/// Gives the hand-made flannel node `fl` its IPv6 half as flannel's dual-stack node has it:
/// `public_ip6` on its underlay interface, an IPv6 /64 of the overlay no tweed host holds with
/// its gateway on the bridge and the pod's address and default route in it (no DAD: a
/// tentative address is unusable for a while). Returns that /64 and the pod's address.
fn flannel_ipv6(
    lab: &tweed_lab::Lab,
    fl: &flannel::Node,
    public_ip6: std::net::Ipv6Addr,
) -> (ipnetwork::Ipv6Network, std::net::Ipv6Addr) {
    let (node, pod) = (&*fl.node, &*fl.pod);
    let hosts = lab.state().hosts.clone();
    // An IPv6 /64 of the overlay no tweed host holds.
    let overlay6: ipnetwork::Ipv6Network = tweed_lab::names::OVERLAY6_NETWORK.parse().unwrap();
    let taken: Vec<ipnetwork::Ipv6Network> = hosts
        .iter()
        .map(|h| {
            tweed_config::SubnetEnv::read(&h.subnet_file)
                .unwrap()
                .ipv6
                .expect("IPv6 half")
                .node_subnet()
        })
        .collect();
    let subnet6 = (0xc8u16..=0xff)
        .map(|g| {
            let s = overlay6.network().segments();
            let a = std::net::Ipv6Addr::new(s[0], s[1], s[2], g, 0, 0, 0, 0);
            ipnetwork::Ipv6Network::new(a, 64).unwrap()
        })
        .find(|s| !taken.contains(s))
        .expect("a free IPv6 /64");
    let gw6 = std::net::Ipv6Addr::from(u128::from(subnet6.network()) + 1);
    let pod_ip6 = std::net::Ipv6Addr::from(u128::from(subnet6.network()) + 2);

    for ns in [node, pod] {
        for scope in ["all", "default"] {
            in_ns(
                ns,
                &[
                    "sysctl",
                    "-qw",
                    &format!("net.ipv6.conf.{scope}.accept_dad=0"),
                ],
            );
        }
    }
    in_ns(node, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    addr6(node, format!("{public_ip6}/64"), "eth0");
    addr6(node, format!("{gw6}/64"), "cni0");
    addr6(pod, format!("{pod_ip6}/64"), "eth0");
    ip(&[
        "-n",
        pod,
        "-6",
        "route",
        "add",
        "default",
        "via",
        &gw6.to_string(),
    ]);

    (subnet6, pod_ip6)
}

/// Issues 18/19: a dual-stack node configured by hand as flannel's wireguard backend configures
/// one in its default `Mode: separate`, on wireguard-go: `flannel-wg` on 51820 (its IPv4 /32,
/// the `Network` route, each tweed lease's IPv4 subnet at `PublicIP:BackendData.Port`) and
/// `flannel-wg-v6` on 51821 with the same key (its IPv6 subnet /128, the `IPv6Network` route,
/// each tweed lease's IPv6 subnet at `[PublicIPv6]:BackendV6Data.Port`); its lease under
/// flannel's dual key with `BackendV6Data {"PublicKey","Port":51821}`. The tweed nodes run
/// `separate` with the default `--wireguard-impl=auto` (userspace on a host without the
/// module). Pods ping each other over both families, both ways, and the IPv6 peer entry on
/// `flannel-wg-v6` has a handshake with the tweed node's IPv6 endpoint on 51821.
#[test]
fn a_flannel_configured_separate_mode_wireguard_go_node_reaches_tweed_pods_over_both_families() {
    require_root!(NEEDS_ROOT);
    assert!(
        which("wireguard-go").is_some(),
        "wireguard-go is not installed: apt-get install wireguard-go wireguard-tools"
    );
    let mut spec = LabSpec::new(per_process("wgs6"), 2);
    spec.backend = Backend::Wireguard;
    spec.pods_per_host = 1;
    spec.ip_family = tweed_lab::spec::IpFamily::Dual;
    spec.wireguard_mode = Some("separate".into());
    let lab = up(spec);
    let fl = flannel::Node::up(&lab, "twgs6", &WG_MTU.to_string());
    let (node, pod, subnet, pod_ip) = (&*fl.node, &*fl.pod, &*fl.subnet, &*fl.pod_ip);
    let public_ip = flannel::PUBLIC_IP;
    let public_ip6 = tweed_lab::names::host_public_ip6(201, 1);
    let hosts = lab.state().hosts.clone();
    let (subnet6, pod_ip6) = flannel_ipv6(&lab, &fl, public_ip6);

    // Key and the two devices, as flannel's separate mode makes them.
    let dir = TempDir(std::env::temp_dir().join(format!("tweed-wgs6-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let key_file = dir.0.join("wgkey");
    let genkey = std::process::Command::new("wg")
        .arg("genkey")
        .output()
        .unwrap();
    std::fs::write(&key_file, &genkey.stdout).unwrap();
    let public_key = pubkey_of(&key_file);
    let dev4 = format!("fs4{}", std::process::id() % 100_000);
    let dev6 = format!("fs6{}", std::process::id() % 100_000);
    let _wg_go4 = WgGo::start(node, &dev4);
    let _wg_go6 = WgGo::start(node, &dev6);
    for (dev, port) in [(&dev4, "51820"), (&dev6, "51821")] {
        in_ns(
            node,
            &[
                "wg",
                "set",
                dev,
                "listen-port",
                port,
                "private-key",
                key_file.to_str().unwrap(),
            ],
        );
        ip(&[
            "-n",
            node,
            "link",
            "set",
            dev,
            "mtu",
            &WG_MTU.to_string(),
            "up",
        ]);
    }
    fl.address_device(&dev4);
    ip(&[
        "-n",
        node,
        "route",
        "add",
        tweed_lab::names::OVERLAY_NETWORK,
        "dev",
        &dev4,
        "scope",
        "link",
    ]);
    addr6(node, format!("{}/128", subnet6.network()), &dev6);
    ip(&[
        "-n",
        node,
        "-6",
        "route",
        "add",
        tweed_lab::names::OVERLAY6_NETWORK,
        "dev",
        &dev6,
    ]);

    let value = format!(
        r#"{{"PublicIP":"{public_ip}","PublicIPv6":"{public_ip6}","BackendType":"wireguard","BackendData":{{"PublicKey":"{public_key}","Port":51820}},"BackendV6Data":{{"PublicKey":"{public_key}","Port":51821}}}}"#
    );
    let key = format!("{subnet}-24&{}-64", subnet6.network());
    fl.write_lease_at(&lab, &key, 86400, &value);

    // A peer per tweed lease on each device, read from etcd.
    let listing = etcdctl(&lab, &["get", "--prefix", "/coreos.com/network/subnets/"]);
    let lines: Vec<&str> = listing.lines().collect();
    let mut endpoints6 = Vec::new();
    for kv in lines.chunks(2) {
        let [k, v] = kv else { continue };
        let name = k.rsplit('/').next().unwrap();
        let Some((v4, v6)) = name.split_once('&') else {
            panic!("tweed's dual-stack lease has a dual key: {k}")
        };
        let attrs: serde_json::Value = serde_json::from_str(v).unwrap();
        if attrs["BackendData"]["PublicKey"] == public_key.as_str() {
            continue;
        }
        assert_eq!(
            attrs["BackendV6Data"],
            serde_json::json!({"PublicKey": attrs["BackendData"]["PublicKey"], "Port": 51821}),
            "tweed's v6 half in separate mode: its key, ListenPortV6"
        );
        let cidr = |s: &str| {
            let (a, l) = s.rsplit_once('-').unwrap();
            format!("{a}/{l}")
        };
        let peer = attrs["BackendData"]["PublicKey"].as_str().unwrap();
        let endpoint4 = format!(
            "{}:{}",
            attrs["PublicIP"].as_str().unwrap(),
            attrs["BackendData"]["Port"]
        );
        let endpoint6 = format!(
            "[{}]:{}",
            attrs["PublicIPv6"].as_str().unwrap(),
            attrs["BackendV6Data"]["Port"]
        );
        for (dev, ep, allowed) in [(&dev4, &endpoint4, cidr(v4)), (&dev6, &endpoint6, cidr(v6))] {
            in_ns(
                node,
                &[
                    "wg",
                    "set",
                    dev,
                    "peer",
                    peer,
                    "endpoint",
                    ep,
                    "allowed-ips",
                    &allowed,
                ],
            );
        }
        endpoints6.push((peer.to_string(), endpoint6));
    }
    assert_eq!(endpoints6.len(), 2, "{listing}");

    let pod_ip6 = pod_ip6.to_string();
    for h in &hosts {
        for p in &h.pods {
            let ip4 = ipv4_of(p).to_string();
            let ip6 = p.ip6.expect("pod IPv6").to_string();
            ping_ok(pod, &ip4, &[]);
            ping_ok(&p.netns, pod_ip, &[]);
            ping_ok(pod, &ip6, &["-6"]);
            ping_ok(&p.netns, &pod_ip6, &["-6"]);
        }
    }
    // The IPv6 traffic went through flannel-wg-v6's peers at the tweed nodes' [v6]:51821.
    let dump = in_ns(node, &["wg", "show", &dev6, "dump"]);
    for (peer, endpoint6) in &endpoints6 {
        let line = dump
            .lines()
            .find(|l| l.starts_with(peer.as_str()))
            .unwrap_or_else(|| panic!("no {peer} on {dev6}:\n{dump}"));
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(f[2], endpoint6, "{line}");
        let handshake: u64 = f[4].parse().unwrap();
        let rx: u64 = f[5].parse().unwrap();
        assert!(
            handshake > 0 && rx > 0,
            "{dev6}: no handshake/traffic with {peer}: {line}"
        );
    }
}

/// Issue 18: a dual-stack node configured by hand as flannel's wireguard backend configures one
/// in `Mode: ipv6`, on wireguard-go: one device on 51820 (its IPv4 /32 and IPv6 /128, a route
/// for each network), each tweed lease a peer with both subnets as allowed IPs at
/// `[PublicIPv6]:BackendData.Port`; its lease under flannel's dual key with `BackendData` and
/// `BackendV6Data` both `{"PublicKey","Port":51820}`. The tweed nodes run `ipv6` with the
/// default `--wireguard-impl=auto` (userspace here). Pods ping each other over both families,
/// both ways, and wireguard-go lists each tweed node at `[PublicIPv6]:51820` with a handshake
/// and received bytes: the userspace path's IPv6 socket speaks WireGuard with an independent
/// implementation.
#[test]
fn a_flannel_configured_ipv6_mode_wireguard_go_node_reaches_tweed_pods_over_both_families() {
    require_root!(NEEDS_ROOT);
    assert!(
        which("wireguard-go").is_some(),
        "wireguard-go is not installed: apt-get install wireguard-go wireguard-tools"
    );
    let mut spec = LabSpec::new(per_process("wgi6"), 2);
    spec.backend = Backend::Wireguard;
    spec.pods_per_host = 1;
    spec.ip_family = tweed_lab::spec::IpFamily::Dual;
    spec.wireguard_mode = Some("ipv6".into());
    let lab = up(spec);
    let fl = flannel::Node::up(&lab, "twgi6", &WG_MTU.to_string());
    let (node, pod, subnet, pod_ip) = (&*fl.node, &*fl.pod, &*fl.subnet, &*fl.pod_ip);
    let public_ip = flannel::PUBLIC_IP;
    let public_ip6 = tweed_lab::names::host_public_ip6(201, 1);
    let hosts = lab.state().hosts.clone();
    let (subnet6, pod_ip6) = flannel_ipv6(&lab, &fl, public_ip6);

    let dir = TempDir(std::env::temp_dir().join(format!("tweed-wgi6-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let key_file = dir.0.join("wgkey");
    let genkey = std::process::Command::new("wg")
        .arg("genkey")
        .output()
        .unwrap();
    std::fs::write(&key_file, &genkey.stdout).unwrap();
    let public_key = pubkey_of(&key_file);
    let dev = format!("fi6{}", std::process::id() % 100_000);
    let _wg_go = WgGo::start(node, &dev);
    in_ns(
        node,
        &[
            "wg",
            "set",
            &dev,
            "listen-port",
            "51820",
            "private-key",
            key_file.to_str().unwrap(),
        ],
    );
    ip(&[
        "-n",
        node,
        "link",
        "set",
        &dev,
        "mtu",
        &WG_MTU.to_string(),
        "up",
    ]);
    fl.address_device(&dev);
    addr6(node, format!("{}/128", subnet6.network()), &dev);
    for (family, net) in [
        ("-4", tweed_lab::names::OVERLAY_NETWORK),
        ("-6", tweed_lab::names::OVERLAY6_NETWORK),
    ] {
        ip(&["-n", node, family, "route", "add", net, "dev", &dev]);
    }
    let value = format!(
        r#"{{"PublicIP":"{public_ip}","PublicIPv6":"{public_ip6}","BackendType":"wireguard","BackendData":{{"PublicKey":"{public_key}","Port":51820}},"BackendV6Data":{{"PublicKey":"{public_key}","Port":51820}}}}"#
    );
    let key = format!("{subnet}-24&{}-64", subnet6.network());
    fl.write_lease_at(&lab, &key, 86400, &value);

    // A peer per tweed lease, read from etcd: both subnets, the IPv6 endpoint.
    let listing = etcdctl(&lab, &["get", "--prefix", "/coreos.com/network/subnets/"]);
    let lines: Vec<&str> = listing.lines().collect();
    let mut endpoints6 = Vec::new();
    for kv in lines.chunks(2) {
        let [k, v] = kv else { continue };
        let name = k.rsplit('/').next().unwrap();
        let Some((v4, v6)) = name.split_once('&') else {
            panic!("tweed's dual-stack lease has a dual key: {k}")
        };
        let attrs: serde_json::Value = serde_json::from_str(v).unwrap();
        if attrs["BackendData"]["PublicKey"] == public_key.as_str() {
            continue;
        }
        assert_eq!(
            attrs["BackendV6Data"], attrs["BackendData"],
            "tweed's lease in ipv6 mode: one key, ListenPort"
        );
        assert_eq!(attrs["BackendData"]["Port"], 51820);
        let cidr = |s: &str| {
            let (a, l) = s.rsplit_once('-').unwrap();
            format!("{a}/{l}")
        };
        let peer = attrs["BackendData"]["PublicKey"].as_str().unwrap();
        let endpoint6 = format!(
            "[{}]:{}",
            attrs["PublicIPv6"].as_str().unwrap(),
            attrs["BackendData"]["Port"]
        );
        in_ns(
            node,
            &[
                "wg",
                "set",
                &dev,
                "peer",
                peer,
                "endpoint",
                &endpoint6,
                "allowed-ips",
                &format!("{},{}", cidr(v4), cidr(v6)),
            ],
        );
        endpoints6.push((peer.to_string(), endpoint6));
    }
    assert_eq!(endpoints6.len(), 2, "{listing}");

    let pod_ip6 = pod_ip6.to_string();
    for h in &hosts {
        for p in &h.pods {
            let ip4 = ipv4_of(p).to_string();
            let ip6 = p.ip6.expect("pod IPv6").to_string();
            ping_ok(pod, &ip4, &[]);
            ping_ok(&p.netns, pod_ip, &[]);
            ping_ok(pod, &ip6, &["-6"]);
            ping_ok(&p.netns, &pod_ip6, &["-6"]);
        }
    }
    let dump = in_ns(node, &["wg", "show", &dev, "dump"]);
    for (peer, endpoint6) in &endpoints6 {
        let line = dump
            .lines()
            .find(|l| l.starts_with(peer.as_str()))
            .unwrap_or_else(|| panic!("no {peer} on {dev}:\n{dump}"));
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(f[2], endpoint6, "{line}");
        let handshake: u64 = f[4].parse().unwrap();
        let rx: u64 = f[5].parse().unwrap();
        assert!(
            handshake > 0 && rx > 0,
            "{dev}: no handshake/traffic with {peer}: {line}"
        );
    }
    println!("wireguard-go in ipv6 mode:\n{dump}");
}

/// Twice the agent's 3 s grace (`underlay6::GRACE`): past it a `separate` node has turned IPv4
/// only (3.25 s measured), so a node still dual then keeps its IPv6 half.
const SEPARATE_TURN_WINDOW: Duration = Duration::from_secs(6);

/// Issues 18/19, a wireguard node turning dual stack at run time on the userspace path: h2's
/// IPv6 underlay address is removed before its agent starts, so it runs IPv4 only (lease,
/// subnet.env); the address comes back while the agent runs. Without a restart h2's lease
/// takes its IPv6 half (flannel's `v4&v6` key, `PublicIPv6`, `BackendV6Data
/// {"PublicKey","Port"}` with h2's key and `port6`), subnet.env gets the IPv6 subnet,
/// `device6` its /128 (`tweed-wg-v6` in `separate`, `tweed-wg` in the single-device modes),
/// h1 learns the half from the lease, ping6 between h1's pod and h2's overlay address works
/// both ways, and IPv4 between the pods keeps working.
fn assert_wireguard_turns_dual_without_restart(tag: &str, mode: &str, device6: &str, port6: u16) {
    let mut spec = LabSpec::new(per_process(tag), 2);
    spec.backend = Backend::Wireguard;
    spec.pods_per_host = 1;
    spec.ip_family = tweed_lab::spec::IpFamily::Dual;
    spec.wireguard_mode = Some(mode.into());
    spec.agent_args = vec!["--wireguard-impl=userspace".into()];
    let lab = up(spec);
    assert_eq!(
        lab.check_until(Duration::from_secs(20)).unwrap().failed(),
        0
    );
    let h1 = host_state(&lab, "h1");
    let h2 = host_state(&lab, "h2");
    let addr = format!("{}/64", h2.public_ip6.unwrap());
    let stopped = stop_agent(&lab, "h2", libc::SIGTERM);
    in_ns(
        &h2.netns,
        &["ip", "-6", "addr", "del", &addr, "dev", "eth0"],
    );
    start_agent(&stopped);
    wait_for(
        Duration::from_secs(15),
        "h2's subnet.env without an IPv6 half",
        || {
            std::fs::read_to_string(&h2.log).is_ok_and(|l| l.contains("IPv4 only"))
                && tweed_config::SubnetEnv::read(&h2.subnet_file).is_ok_and(|e| e.ipv6.is_none())
        },
    );
    let starts_before = std::fs::read_to_string(&h2.log)
        .unwrap()
        .matches("network config")
        .count();
    let added = std::time::Instant::now();
    in_ns(
        &h2.netns,
        &["ip", "-6", "addr", "add", &addr, "dev", "eth0"],
    );
    wait_for(
        Duration::from_secs(20),
        "h2's subnet.env with an IPv6 half",
        || tweed_config::SubnetEnv::read(&h2.subnet_file).is_ok_and(|e| e.ipv6.is_some()),
    );
    let log = std::fs::read_to_string(&h2.log).unwrap();
    assert!(log.contains("turning dual stack"), "{log}");
    assert_eq!(
        log.matches("network config").count(),
        starts_before,
        "no restart"
    );
    let sub6 = tweed_config::SubnetEnv::read(&h2.subnet_file)
        .unwrap()
        .ipv6
        .unwrap()
        .node_subnet();
    let listing = etcdctl(&lab, &["get", "--prefix", "/coreos.com/network/subnets/"]);
    let lines: Vec<&str> = listing.lines().collect();
    let at = lines
        .iter()
        .position(|k| key_subnet6(k) == Some(sub6))
        .unwrap_or_else(|| panic!("no v4&v6 key for h2 ({sub6}) in\n{listing}"));
    let value: serde_json::Value = serde_json::from_str(lines[at + 1]).unwrap();
    let public = pubkey_of(&h2.agent_state_dir.join("wgkey"));
    assert_eq!(
        value["PublicIPv6"],
        h2.public_ip6.unwrap().to_string(),
        "{value}"
    );
    assert_eq!(
        value["BackendV6Data"],
        serde_json::json!({"PublicKey": public, "Port": port6}),
        "{value}"
    );
    let dev_addr = sub6.network().to_string();
    wait_for(Duration::from_secs(10), "h2's IPv6 device /128", || {
        in_ns(&h2.netns, &["ip", "-6", "addr", "show", "dev", device6])
            .contains(&format!("{dev_addr}/128"))
    });
    // h1's pod reaches h2's device over IPv6 (h1 learns the IPv6 half from the renamed
    // lease); h2 reaches h1's pod (its replies and its own pings leave through `device6`).
    wait_for(
        Duration::from_secs(20),
        "ping6 h1/p1 -> h2's device",
        || {
            ok_in(
                &h1.pods[0].netns,
                &["ping", "-6", "-n", "-c", "1", "-W", "1", &dev_addr],
            )
        },
    );
    eprintln!(
        "{tag} ({mode}): ping6 h1/p1 -> h2's {device6} answered {:?} after the address was added",
        added.elapsed()
    );
    let h1_pod6 = h1.pods[0].ip6.expect("h1's pod has IPv6").to_string();
    assert!(
        ok_in(
            &h2.netns,
            &["ping", "-6", "-n", "-c", "2", "-W", "2", &h1_pod6]
        ),
        "h2 -> h1/p1 over IPv6"
    );
    let v4 = ipv4_of(&h2.pods[0]).to_string();
    assert!(
        ok_in(
            &h1.pods[0].netns,
            &["ping", "-n", "-c", "2", "-W", "2", &v4]
        ),
        "h1/p1 -> h2/p1 over IPv4"
    );
    let ping6_dev = || {
        ok_in(
            &h1.pods[0].netns,
            &["ping", "-6", "-n", "-c", "2", "-W", "2", &dev_addr],
        )
    };
    let keys = || {
        etcdctl(
            &lab,
            &[
                "get",
                "--prefix",
                "--keys-only",
                "/coreos.com/network/subnets/",
            ],
        )
    };
    // The address goes again (as underlay6.rs decides per backend).
    let gone_at = std::time::Instant::now();
    in_ns(
        &h2.netns,
        &["ip", "-6", "addr", "del", &addr, "dev", "eth0"],
    );
    if mode != "separate" {
        // `auto`/`ipv4` carry IPv6 over the IPv4 underlay: like udp, the node stays dual.
        // The watcher's branch for a node that keeps its IPv6 half (no grace timer is set).
        wait_for(Duration::from_secs(5), "h2 logs the lost address", || {
            std::fs::read_to_string(&h2.log).is_ok_and(|l| {
                l.contains(
                    "udp and wireguard Mode ipv4/auto carry IPv6 over IPv4 and are unaffected",
                )
            })
        });
        // And IPv6 keeps crossing past the window in which separate would have turned.
        while gone_at.elapsed() < SEPARATE_TURN_WINDOW {
            assert!(
                ping6_dev(),
                "h1/p1 -> h2's {device6} {:?} after h2's IPv6 underlay address went",
                gone_at.elapsed()
            );
        }
        let log = std::fs::read_to_string(&h2.log).unwrap();
        assert!(!log.contains("turning IPv4 only"), "{log}");
        assert!(
            tweed_config::SubnetEnv::read(&h2.subnet_file).is_ok_and(|e| e.ipv6.is_some()),
            "subnet.env keeps the IPv6 half"
        );
        assert!(keys().lines().any(|k| key_subnet6(k) == Some(sub6)));
        assert!(
            ping6_dev(),
            "h1/p1 -> h2's {device6} without h2's IPv6 underlay address"
        );
        return;
    }
    // `separate`: tweed-wg-v6's peers send to the address, so after the grace h2 turns IPv4
    // only, as vxlan does: v4 key, no IPv6 device, IPv4 still through.
    wait_for(
        Duration::from_secs(20),
        "h2's subnet.env without an IPv6 half again",
        || tweed_config::SubnetEnv::read(&h2.subnet_file).is_ok_and(|e| e.ipv6.is_none()),
    );
    let after = gone_at.elapsed();
    eprintln!("{tag}: h2 turned IPv4 only {after:?} after its address was deleted");
    assert!(
        after >= Duration::from_secs(3),
        "before the grace: {after:?}"
    );
    wait_for(Duration::from_secs(10), "h2 logs the switch", || {
        std::fs::read_to_string(&h2.log).is_ok_and(|l| l.contains("turned IPv4 only"))
    });
    assert!(
        !keys().lines().any(|k| key_subnet6(k) == Some(sub6)),
        "{}",
        keys()
    );
    wait_for(Duration::from_secs(10), "h2's tweed-wg-v6 removed", || {
        tweed_testkit::cmd::try_in_ns(&h2.netns, &["ip", "link", "show", device6]).is_err()
    });
    assert!(
        ok_in(
            &h1.pods[0].netns,
            &["ping", "-n", "-c", "2", "-W", "2", &v4]
        ),
        "h1/p1 -> h2/p1 over IPv4 with h2 IPv4 only"
    );
    // Back: dual again on the same IPv6 subnet, without a restart.
    in_ns(
        &h2.netns,
        &["ip", "-6", "addr", "add", &addr, "dev", "eth0", "nodad"],
    );
    wait_for(
        Duration::from_secs(20),
        "h2's subnet.env with an IPv6 half again",
        || {
            tweed_config::SubnetEnv::read(&h2.subnet_file)
                .is_ok_and(|e| e.ipv6.is_some_and(|v| v.node_subnet() == sub6))
        },
    );
    wait_for(
        Duration::from_secs(20),
        "ping6 h1/p1 -> h2's tweed-wg-v6 again",
        ping6_dev,
    );
    let log = std::fs::read_to_string(&h2.log).unwrap();
    let turned = "a usable IPv6 address appeared on the underlay interface: turning dual stack";
    assert_eq!(log.matches(turned).count(), 2, "{log}");
    assert_eq!(
        log.matches("network config").count(),
        starts_before,
        "no restart"
    );
    // The IPv6 pods' traffic crosses the IPv6 underlay as WireGuard to ListenPortV6.
    let n = wireguard_v6_datagrams_during_ping6(&lab, &dev_addr);
    assert!(n >= 10, "{n} WireGuard datagrams to 51821 over IPv6");
}

#[test]
fn wireguard_separate_node_turns_dual_stack_when_its_ipv6_address_appears_without_restart() {
    require_root!(NEEDS_ROOT);
    assert_wireguard_turns_dual_without_restart("wgd6s", "separate", "tweed-wg-v6", 51821);
}

#[test]
fn wireguard_auto_node_turns_dual_stack_when_its_ipv6_address_appears_without_restart() {
    require_root!(NEEDS_ROOT);
    assert_wireguard_turns_dual_without_restart("wgd6a", "auto", "tweed-wg", 51820);
}
