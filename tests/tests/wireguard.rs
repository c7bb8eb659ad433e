//! Issue 18: the wireguard backend on the userspace path (this host has no wireguard module):
//! a lab passes its all-pairs check through encrypted tunnels, the leases carry flannel's
//! BackendData, the key persists with mode 0400, and the underlay never sees a pod's payload.

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::Duration;
use tweed_e2e::*;
use tweed_lab::{Backend, LabSpec};

/// A payload no protocol header contains by chance; `ping -p` repeats it through the packet.
const MARKER_HEX: &str = "7477656564706c61696e746578742121"; // "tweedplaintext!!"
const MARKER: &[u8] = b"tweedplaintext!!";

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// Captures on `target` (all interfaces) while `h1/p1` pings `dst` with the marker; the raw
/// capture bytes.
fn capture_during_ping(lab: &tweed_lab::Lab, target: &str, dst: &str) -> Vec<u8> {
    let file = std::env::temp_dir().join(format!(
        "tweed-wg-cap-{}-{}.pcap",
        std::process::id(),
        target.replace('/', "_")
    ));
    let file_s = file.to_str().unwrap().to_string();
    let mut dump = lab
        .command(
            target,
            &[
                "tcpdump",
                "-i",
                "any",
                "-U",
                "-s",
                "0",
                "-w",
                &file_s,
                "udp or icmp",
            ],
        )
        .unwrap()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tcpdump");
    std::thread::sleep(Duration::from_millis(1500));
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
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(dump.id() as i32, libc::SIGTERM) };
    let _ = dump.wait();
    let bytes = std::fs::read(&file).unwrap_or_default();
    let _ = std::fs::remove_file(&file);
    bytes
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
    let dst = h2.pods[0].ip.to_string();
    let underlay = capture_during_ping(&lab, "underlay", &dst);
    assert!(underlay.len() > 200, "empty capture on the underlay");
    assert_eq!(
        count(&underlay, MARKER),
        0,
        "pod payload in clear on the underlay"
    );
    let wg_data_to_51820 = count(&underlay, &[0xca, 0x6c]); // port 51820 big-endian
    assert!(
        wg_data_to_51820 >= 5,
        "no WireGuard traffic captured ({wg_data_to_51820})"
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
