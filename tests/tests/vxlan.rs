//! End to end, as root, in namespaces: a 3-host vxlan lab with real etcd and real tweedd agents.

use std::process::Stdio;
use std::time::Duration;
use tweed_e2e::*;
use tweed_lab::LabSpec;

const DEV: &str = "tweed.1";

#[test]
fn three_hosts_all_pairs_reach_each_other() {
    require_root!(NEEDS_ROOT);
    let lab = up(LabSpec::new(per_process("vx"), 3));
    let report = lab.check_until(Duration::from_secs(10)).expect("check");
    // 3 hosts x 2 pods, each pod pings the 4 pods on the other hosts.
    assert_eq!(report.passed(), 24, "{}", report.summary());
    assert_eq!(report.failed(), 0, "{}", report.summary());
    // Each host programmed exactly two peers: 2 routes, 2 neighbours, 2 FDB entries.
    for h in &lab.state().hosts {
        let s = vxlan_state(&h.netns, DEV);
        assert_eq!(s.routes.lines().count(), 2, "{}: {}", h.name, s.routes);
        assert_eq!(
            s.neigh.lines().filter(|l| l.contains("PERMANENT")).count(),
            2,
            "{}",
            s.neigh
        );
        assert_eq!(
            s.fdb
                .lines()
                .filter(|l| l.contains("dst 198.18.0."))
                .count(),
            2,
            "{}",
            s.fdb
        );
    }
}

#[test]
fn a_deleted_lease_removes_its_routes_neighbours_and_fdb_entries_everywhere() {
    require_root!(NEEDS_ROOT);
    let lab = up(LabSpec::new(per_process("dl"), 3));
    let h3 = host_state(&lab, "h3");
    let subnet = h3.subnet.clone().expect("h3 subnet"); // e.g. 10.244.7.1/24
    let net_addr = subnet_network(&subnet);
    let mac = in_ns(
        &h3.netns,
        &["cat", &format!("/sys/class/net/{DEV}/address")],
    )
    .trim()
    .to_string();
    for h in ["h1", "h2"] {
        let s = vxlan_state(&host_state(&lab, h).netns, DEV);
        assert!(
            s.routes.contains(&format!("{net_addr}/24 via {net_addr}")),
            "{h}: {}",
            s.routes
        );
        assert!(s.fdb.contains(&mac), "{h}: {}", s.fdb);
    }
    // The node goes away for good: its agent dies without a word, then its lease is deleted.
    stop_agent(&lab, "h3", libc::SIGKILL);
    let key = format!("/coreos.com/network/subnets/{net_addr}-24");
    assert_eq!(etcdctl(&lab, &["del", &key]).trim(), "1");
    for h in ["h1", "h2"] {
        let ns = host_state(&lab, h).netns;
        wait_for(Duration::from_secs(5), "peer entries to disappear", || {
            let s = vxlan_state(&ns, DEV);
            !s.routes.contains(&net_addr) && !s.neigh.contains(&net_addr) && !s.fdb.contains(&mac)
        });
        // The remaining peer is untouched.
        let s = vxlan_state(&ns, DEV);
        assert_eq!(s.routes.lines().count(), 1, "{h}: {}", s.routes);
    }
}

#[test]
fn restarting_an_agent_under_traffic_loses_no_packet_and_keeps_its_subnet() {
    require_root!(NEEDS_ROOT);
    let lab = up(LabSpec::new(per_process("rs"), 2));
    let h1 = host_state(&lab, "h1");
    let target = ipv4_of(&h1.pods[0]).to_string();
    let mac_before = in_ns(
        &h1.netns,
        &["cat", &format!("/sys/class/net/{DEV}/address")],
    );
    let pinger = ns_command(&host_state(&lab, "h2").pods[0].netns, &[])
        .args(["ping", "-q", "-i", "0.01", "-c", "500", "-W", "1", &target])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("ping");
    std::thread::sleep(Duration::from_millis(1000));
    let stopped = stop_agent(&lab, "h1", libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    start_agent(&stopped);
    let out = pinger.wait_with_output().expect("ping output");
    let (sent, received) = ping_summary(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        (sent, received),
        (500, 500),
        "packets lost across the restart"
    );
    // Same subnet (the restarted agent rewrites subnet.env only with what it leased) and MAC.
    wait_for(
        Duration::from_secs(5),
        "restarted agent to log its lease",
        || {
            std::fs::read_to_string(&h1.log)
                .unwrap_or_default()
                .matches("lease acquired")
                .count()
                >= 2
        },
    );
    let log = std::fs::read_to_string(&h1.log).unwrap();
    assert!(
        log.contains("reused=true"),
        "restart must reuse the lease:\n{log}"
    );
    let env = tweed_config::SubnetEnv::read(&h1.subnet_file).unwrap();
    assert_eq!(
        Some(env.ipv4.expect("IPv4 pair").subnet.to_string()),
        h1.subnet
    );
    let mac_after = in_ns(
        &h1.netns,
        &["cat", &format!("/sys/class/net/{DEV}/address")],
    );
    assert_eq!(mac_before, mac_after);
    assert_eq!(lab.check().unwrap().failed(), 0);
}

#[test]
fn an_agent_whose_lease_is_deleted_takes_the_same_subnet_back() {
    require_root!(NEEDS_ROOT);
    let lab = up(LabSpec::new(per_process("rq"), 2));
    let h1 = host_state(&lab, "h1");
    let net_addr = subnet_network(h1.subnet.as_ref().unwrap());
    let key = format!("/coreos.com/network/subnets/{net_addr}-24");
    let before = etcdctl(&lab, &["get", &key, "--print-value-only"]);
    assert_eq!(etcdctl(&lab, &["del", &key]).trim(), "1");
    wait_for(
        Duration::from_secs(10),
        "the lease to be re-created",
        || {
            !etcdctl(&lab, &["get", &key, "--print-value-only"])
                .trim()
                .is_empty()
        },
    );
    assert_eq!(etcdctl(&lab, &["get", &key, "--print-value-only"]), before);
    assert_eq!(
        lab.check_until(Duration::from_secs(10)).unwrap().failed(),
        0
    );
}

/// A node down longer than its lease TTL, rebooted (/run emptied, so no subnet.env), takes its old
/// subnet back from the copy in its state dir, as long as nobody took it meanwhile.
#[test]
fn an_agent_back_after_its_lease_expired_and_run_was_emptied_gets_the_same_subnet() {
    require_root!(NEEDS_ROOT);
    let ttl = Duration::from_secs(5);
    let mut spec = LabSpec::new(per_process("rb"), 2);
    spec.lease_ttl = ttl;
    let lab = up(spec);
    let h1 = host_state(&lab, "h1");
    let before = h1.subnet.clone().expect("h1 subnet");
    let key = format!("/coreos.com/network/subnets/{}-24", subnet_network(&before));
    // Power cut: no word to etcd, the lease is left to expire.
    let stopped = stop_agent(&lab, "h1", libc::SIGKILL);
    wait_for(ttl * 3, "h1's lease to expire in etcd", || {
        etcdctl(&lab, &["get", &key, "--print-value-only"])
            .trim()
            .is_empty()
    });
    // The reboot empties /run: subnet.env is gone, only the state dir's copy is left.
    std::fs::remove_file(&h1.subnet_file).expect("remove subnet.env");
    start_agent(&stopped);
    wait_for(
        Duration::from_secs(15),
        "h1 to write subnet.env again",
        || tweed_config::SubnetEnv::read(&h1.subnet_file).is_ok(),
    );
    let env = tweed_config::SubnetEnv::read(&h1.subnet_file).unwrap();
    assert_eq!(
        env.ipv4.expect("IPv4 pair").subnet.to_string(),
        before,
        "h1 came back on another subnet"
    );
    let log = std::fs::read_to_string(&h1.log).unwrap();
    assert!(
        log.matches("lease acquired").count() >= 2 && !log.contains("reused=true"),
        "a new lease for the old subnet, not a reused one:\n{log}"
    );
    assert_eq!(
        lab.check_until(Duration::from_secs(10)).unwrap().failed(),
        0
    );
}
