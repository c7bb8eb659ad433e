//! Issue 6: the lab gives each agent its own API socket and `--ip-masq`, `status` shows the
//! metrics URL and the socket, and an "outside" namespace shows masquerading.

use std::time::Duration;
use tweed_e2e::*;
use tweed_lab::{LabGuard, LabSpec};

#[test]
fn status_shows_metrics_and_api_socket_and_both_answer() {
    require_root!(NEEDS_ROOT);
    let lab = up(LabSpec::new(per_process("ob"), 2));
    let st = lab.status();
    let v: serde_json::Value = serde_json::from_str(&st.to_json()).unwrap();
    for (i, h) in lab.state().hosts.iter().enumerate() {
        let metrics = format!("http://{}:9867/metrics", h.public_ip);
        assert_eq!(v["hosts"][i]["metrics"], metrics);
        let sock = h.log.with_file_name("tweedd.sock");
        assert_eq!(v["hosts"][i]["api_socket"], sock.display().to_string());
        let argv = agent_cmdline(&lab, &h.name);
        assert_eq!(
            flag_value(&argv, "--api-socket"),
            Some(sock.to_str().unwrap())
        );
        assert!(argv.iter().any(|a| a == "--ip-masq"), "{argv:?}");

        // The metrics endpoint answers from another host, over the underlay.
        let other = if h.name == "h1" { "h2" } else { "h1" };
        let mut body = String::new();
        wait_for(Duration::from_secs(10), "metrics to answer", || {
            match lab.exec(other, &["curl", "-sf", "--max-time", "2", &metrics]) {
                Ok(b) => {
                    body = b;
                    true
                }
                Err(_) => false,
            }
        });
        assert!(body.contains("tweed"), "{body}");
        // The API socket is a socket.
        wait_for(Duration::from_secs(10), "the API socket", || {
            use std::os::unix::fs::FileTypeExt;
            std::fs::metadata(&sock)
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false)
        });
    }
}

#[test]
fn traffic_to_the_outside_is_masqueraded_and_pod_to_pod_is_not() {
    require_root!(NEEDS_ROOT);
    let lab = up(LabSpec::new(per_process("mq"), 2));
    assert_eq!(
        lab.check_until(Duration::from_secs(10)).unwrap().failed(),
        0
    );
    let h1 = host_state(&lab, "h1");
    let h2 = host_state(&lab, "h2");
    // The outside knows no route to the overlay: only masqueraded traffic can be answered.
    let seen = udp_source_seen(
        &lab,
        "h1/p1",
        "outside",
        "198.18.0.250",
        Duration::from_secs(5),
    );
    assert_eq!(seen, h1.public_ip.to_string(), "source seen outside");
    lab.exec("h2/p1", &["ping", "-c", "1", "-W", "2", "198.18.0.250"])
        .expect("masqueraded ping to the outside");
    // Inside the overlay, pods see each other's own addresses.
    let seen = udp_source_seen(
        &lab,
        "h1/p1",
        "h2/p1",
        &ipv4_of(&h2.pods[0]).to_string(),
        Duration::from_secs(5),
    );
    assert_eq!(
        seen,
        ipv4_of(&h1.pods[0]).to_string(),
        "source seen by a pod"
    );
}

/// Readiness, the metric series an operator alerts on, `tweedctl net` over the API socket, and
/// the rules coming back after someone deletes them.
#[test]
fn ready_metrics_tweedctl_net_and_rules_resync() {
    require_root!(NEEDS_ROOT);
    let lab = up(LabSpec::new(per_process("op"), 2));
    let h1 = host_state(&lab, "h1");
    let base = format!("http://{}:9867", h1.public_ip);
    wait_for(Duration::from_secs(10), "h1 to be ready", || {
        lab.exec(
            "h2",
            &["curl", "-sf", "--max-time", "2", &format!("{base}/readyz")],
        )
        .is_ok()
    });
    let body = lab
        .exec(
            "h2",
            &["curl", "-sf", "--max-time", "2", &format!("{base}/metrics")],
        )
        .unwrap();
    for series in [
        format!("tweed_lease_info{{subnet=\"{}\"}} 1", subnet_of(&h1)),
        "tweed_peers{backend=\"vxlan\"} 1".to_string(),
        "tweed_lease_acquisitions_total 1".to_string(),
        "tweed_reconcile_seconds_count".to_string(),
        "tweed_rules_resyncs_total".to_string(),
    ] {
        assert!(body.contains(&series), "missing {series} in\n{body}");
    }

    // tweedctl net, as an operator on h1 would run it (the socket is a file: no netns needed).
    let tweedctl = tweed_lab_bin("tweedctl");
    let sock = h1.log.with_file_name("tweedd.sock");
    let out = std::process::Command::new(&tweedctl)
        .args([
            "net",
            "--socket",
            sock.to_str().unwrap(),
            "status",
            "--output",
            "json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["ready"], true, "{st}");
    assert_eq!(st["subnet"], subnet_of(&h1));
    let out = std::process::Command::new(&tweedctl)
        .args(["net", "--socket", sock.to_str().unwrap(), "peers"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    let h2 = host_state(&lab, "h2");
    assert!(
        table.contains(&subnet_of(&h2)) && table.contains("yes"),
        "{table}"
    );

    let resyncs_before = resyncs(&lab, &base).expect("the agent's /metrics");
    // Someone deletes the masquerade chain: back within the 5 s resync period. In one
    // iptables-restore transaction: as three commands, the agent (told by `nft monitor` on
    // iptables-nft hosts) could put the jump back between them, and `-X` then fails (EBUSY).
    let restore: String = tweed_testkit::sabotage::DELETE_MASQUERADE_CHAIN
        .iter()
        .map(|argv| {
            assert_eq!(argv[..3], ["iptables", "-t", "nat"], "{argv:?}");
            format!("{}\n", argv[3..].join(" "))
        })
        .collect();
    in_ns(
        &h1.netns,
        &[
            "sh",
            "-c",
            &format!("printf '*nat\\n{restore}COMMIT\\n' | iptables-restore --noflush"),
        ],
    );
    wait_for(Duration::from_secs(8), "the chain to be restored", || {
        in_ns(&h1.netns, &["iptables", "-t", "nat", "-S"]).contains("-j TWEED-POSTRTG")
    });
    // Put back by the agent, not left standing: its rule check counted a reinstall.
    wait_for(
        Duration::from_secs(8),
        "the reinstall to be counted",
        || resyncs(&lab, &base).is_some_and(|n| n > resyncs_before),
    );
}

/// `tweed_rules_resyncs_total` of the agent at `base`, asked from h2; `None` when the fetch
/// fails (a caller polling it asks again).
fn resyncs(lab: &LabGuard, base: &str) -> Option<u64> {
    let body = lab
        .exec(
            "h2",
            &["curl", "-sf", "--max-time", "2", &format!("{base}/metrics")],
        )
        .ok()?;
    let n = body
        .lines()
        .find_map(|l| l.strip_prefix("tweed_rules_resyncs_total "))
        .and_then(|v| v.trim().parse().ok());
    assert!(n.is_some(), "no tweed_rules_resyncs_total in\n{body}");
    n
}

fn subnet_of(h: &tweed_lab::state::HostState) -> String {
    let s = h.subnet.as_ref().expect("subnet");
    let (addr, len) = s.split_once('/').unwrap();
    let mut o: Vec<&str> = addr.split('.').collect();
    o[3] = "0";
    format!("{}/{len}", o.join("."))
}

/// A binary built beside the test's own target dir (target/debug).
fn tweed_lab_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join(name)
}
