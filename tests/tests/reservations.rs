//! Issue 6: subnet reservations (`tweedctl net reserve/unreserve`) in a 2-host lab with a short
//! lease TTL: a reserved subnet has no TTL, outlives it, and is held only by its public IP; an
//! unreserved one gets a TTL again, which its node renews and nobody else does.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tweed_e2e::*;
use tweed_lab::state::HostState;
use tweed_lab::{LabGuard, LabSpec};

const TTL: Duration = Duration::from_secs(5);
const SUBNETS: &str = "/coreos.com/network/subnets";

/// `tweedctl net --socket SOCK ARGS...`: (success, stdout, stderr).
fn net(sock: &Path, args: &[&str]) -> (bool, String, String) {
    let exe = std::env::current_exe().unwrap();
    let tweedctl = exe.parent().unwrap().parent().unwrap().join("tweedctl");
    let out = Command::new(tweedctl)
        .args(["net", "--socket", sock.to_str().unwrap()])
        .args(args)
        .output()
        .expect("run tweedctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `tweedctl net status -o json`; `None` while the agent does not answer with JSON.
fn status(sock: &Path) -> Option<serde_json::Value> {
    let (_, out, _) = net(sock, &["status", "--output", "json"]);
    serde_json::from_str(&out).ok()
}

/// The lease of `subnet` as `tweedctl net leases -o json` shows it.
fn lease(sock: &Path, subnet: &str) -> Option<serde_json::Value> {
    let (ok, out, err) = net(sock, &["leases", "--output", "json"]);
    assert!(ok, "{err}");
    let v: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    v.into_iter().find(|l| l["subnet"] == subnet)
}

fn network_of(subnet: &str) -> String {
    let (addr, len) = subnet.split_once('/').unwrap();
    let mut o: Vec<&str> = addr.split('.').collect();
    o[3] = "0";
    format!("{}/{len}", o.join("."))
}

fn key_of(subnet: &str) -> String {
    format!("{SUBNETS}/{}", subnet.replace('/', "-"))
}

/// A 2-host lab with the short TTL and a pod per host, its agents' API sockets and subnets, and a
/// subnet neither host holds.
struct TwoHosts {
    lab: LabGuard,
    h1: HostState,
    h2: HostState,
    sock1: PathBuf,
    sock2: PathBuf,
    s1: String,
    s2: String,
    spare: String,
}

/// `tag` names the lab: tests running side by side each need their own.
fn two_hosts(tag: &str) -> TwoHosts {
    let mut spec = LabSpec::new(per_process(tag), 2);
    spec.lease_ttl = TTL;
    spec.pods_per_host = 1;
    let lab = up(spec);
    let h1 = host_state(&lab, "h1");
    let h2 = host_state(&lab, "h2");
    let s1 = network_of(h1.subnet.as_deref().unwrap());
    let s2 = network_of(h2.subnet.as_deref().unwrap());
    let spare = format!("{}/24", free_subnet(&lab, &[]));
    TwoHosts {
        lab,
        sock1: h1.log.with_file_name("tweedd.sock"),
        sock2: h2.log.with_file_name("tweedd.sock"),
        h1,
        h2,
        s1,
        s2,
        spare,
    }
}

#[test]
fn reserve_pins_a_subnet_to_an_ip_without_ttl_and_unreserve_gives_it_back_a_ttl() {
    require_root!(NEEDS_ROOT);
    let TwoHosts {
        lab,
        h1,
        h2,
        sock1,
        sock2,
        s1,
        s2,
        spare: free,
    } = two_hosts("rs");
    let ip1 = h1.public_ip.to_string();
    wait_for(
        Duration::from_secs(10),
        "both agents to list both leases",
        || lease(&sock1, &s2).is_some() && lease(&sock2, &s1).is_some(),
    );

    // A free subnet for a node that does not exist yet.
    let (ok, out, err) = net(&sock1, &["reserve", &free, "198.18.0.77"]);
    assert!(ok && out.contains("reserved"), "{out}{err}");
    wait_for(Duration::from_secs(10), "the reservation on h2", || {
        lease(&sock2, &free)
            .is_some_and(|l| l["public_ip"] == "198.18.0.77" && l["lease_id"] == "0")
    });
    let (_, table, _) = net(&sock2, &["leases"]);
    let line = table.lines().find(|l| l.starts_with(&free)).unwrap();
    assert!(
        line.contains("198.18.0.77") && line.contains("reserved"),
        "{table}"
    );
    // In etcd: flannel's value, no lease.
    let kv = etcdctl(&lab, &["get", &key_of(&free), "-w", "json"]);
    assert!(kv.contains("\"kvs\"") && !kv.contains("\"lease\""), "{kv}");
    // Idempotent for the same IP; refused for another, naming the holder.
    assert!(net(&sock2, &["reserve", &free, "198.18.0.77"]).0);
    let (ok, _, err) = net(&sock2, &["reserve", &free, "198.18.0.78"]);
    assert!(!ok && err.contains("held by 198.18.0.77"), "{err}");
    // Not a subnet of the network, or not a node subnet: refused, naming it.
    let (ok, _, err) = net(&sock1, &["reserve", "10.99.0.0/24", "198.18.0.78"]);
    assert!(
        !ok && err.contains("10.99.0.0/24") && err.contains("allocatable"),
        "{err}"
    );
    let (ok, _, err) = net(&sock1, &["reserve", "10.244.7.0/25", "198.18.0.78"]);
    assert!(!ok && err.contains("10.244.7.0/25"), "{err}");
    // A subnet a running node holds cannot be reserved for another IP.
    let (ok, _, err) = net(&sock1, &["reserve", &s2, "198.18.0.78"]);
    assert!(
        !ok && err.contains(&format!("held by {}", h2.public_ip)),
        "{err}"
    );

    // A running node's lease pinned to its own IP: no TTL from now on, the node keeps working.
    let (ok, out, err) = net(&sock2, &["reserve", &s1, &ip1]);
    assert!(ok, "{out}{err}");
    wait_for(Duration::from_secs(10), "h1's lease to be reserved", || {
        lease(&sock1, &s1).is_some_and(|l| l["lease_id"] == "0" && l["own"] == true)
    });
    wait_for(Duration::from_secs(5), "h1 to report no expiry", || {
        status(&sock1).is_some_and(|s| s["lease_expiry_unix"] == 0 && s["ready"] == true)
    });

    // Well past the TTL: both reservations are still there, the cluster still works.
    std::thread::sleep(TTL + Duration::from_secs(3));
    for sock in [&sock1, &sock2] {
        assert_eq!(lease(sock, &free).unwrap()["lease_id"], "0");
        assert_eq!(lease(sock, &s1).unwrap()["lease_id"], "0");
        assert!(lease(sock, &s2).is_some());
    }
    assert_eq!(
        lab.check_until(Duration::from_secs(10)).unwrap().failed(),
        0
    );

    // Unreserved, the free subnet gets a TTL; nobody renews it, so it goes.
    let (ok, out, err) = net(&sock1, &["unreserve", &free]);
    assert!(ok && out.contains("expires in 5s"), "{out}{err}");
    let (ok, _, err) = net(&sock1, &["unreserve", &free]);
    assert!(!ok && err.contains("not reserved"), "{err}");
    wait_for(
        Duration::from_secs(5),
        "the unreserved subnet to get a TTL",
        || lease(&sock2, &free).is_some_and(|l| l["lease_id"] != "0"),
    );
    wait_for(
        TTL + Duration::from_secs(5),
        "the unreserved subnet to expire",
        || lease(&sock1, &free).is_none() && lease(&sock2, &free).is_none(),
    );

    // Unreserved, h1's own lease gets a TTL that h1 renews from then on.
    let (ok, out, err) = net(&sock2, &["unreserve", &s1]);
    assert!(ok, "{out}{err}");
    wait_for(Duration::from_secs(5), "h1 to adopt the TTL lease", || {
        status(&sock1).is_some_and(|s| s["lease_expiry_unix"].as_i64().unwrap_or(0) > 0)
    });
    std::thread::sleep(TTL * 2);
    let l = lease(&sock2, &s1).expect("h1's lease survives: h1 renews it");
    assert_ne!(l["lease_id"], "0");
    assert_eq!(
        lab.check_until(Duration::from_secs(10)).unwrap().failed(),
        0
    );
}

/// A node restarted with the reserved public IP takes the reserved subnet, keeps it without a TTL
/// and writes its backend data into it.
#[test]
fn an_agent_with_the_reserved_public_ip_takes_the_reservation() {
    require_root!(NEEDS_ROOT);
    let TwoHosts {
        lab,
        h2,
        sock1,
        sock2,
        s2,
        spare: reserved,
        ..
    } = two_hosts("rp");
    let (ok, out, err) = net(&sock1, &["reserve", &reserved, "198.18.0.77"]);
    assert!(ok, "{out}{err}");

    // h2 comes back advertising 198.18.0.77 (an extra address on its underlay interface).
    let mut agent = stop_agent(&lab, "h2", libc::SIGTERM);
    in_ns(
        &h2.netns,
        &["ip", "addr", "add", "198.18.0.77/24", "dev", "eth0"],
    );
    agent
        .argv
        .extend(["--public-ip".into(), "198.18.0.77".into()]);
    start_agent(&agent);
    wait_for(Duration::from_secs(15), "h2 on the reserved subnet", || {
        status(&sock2).is_some_and(|s| {
            s["subnet"] == reserved.as_str()
                && s["lease_expiry_unix"] == 0
                && s["public_ip"] == "198.18.0.77"
        })
        // The lease list comes from the watch, which may see the reservation taken a moment
        // after the status does.
        && lease(&sock2, &reserved).is_some()
    });
    let l = lease(&sock2, &reserved).unwrap();
    assert_eq!(
        (l["lease_id"].as_str(), l["own"].as_bool()),
        (Some("0"), Some(true))
    );
    let value = etcdctl(&lab, &["get", &key_of(&reserved), "--print-value-only"]);
    assert!(
        value.contains("198.18.0.77") && value.contains("VtepMAC"),
        "{value}"
    );
    // h1 programs it as a peer; past the TTL it is still there (h2's old lease is not).
    wait_for(
        Duration::from_secs(10),
        "h1 to program the reserved peer",
        || {
            let (_, out, _) = net(&sock1, &["peers"]);
            out.lines()
                .any(|l| l.starts_with(&reserved) && l.contains("198.18.0.77") && l.contains("yes"))
        },
    );
    std::thread::sleep(TTL + Duration::from_secs(3));
    assert_eq!(lease(&sock1, &reserved).unwrap()["lease_id"], "0");
    assert!(lease(&sock1, &s2).is_none(), "h2's old TTL lease expired");
}
