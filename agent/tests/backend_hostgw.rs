//! Root-only: host-gw, and vxlan with DirectRouting, end to end with real `tweedd` agents in
//! namespaces (see `backend_common`). Hosts 1 and 2 share an L2 segment; host 3 sits on a second
//! segment behind a router, which host-gw must report and skip, and DirectRouting must tunnel.

mod backend_common;

use std::time::Duration;

use backend_common::*;

const HOSTGW: &str = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"host-gw"}}"#;
const DIRECT: &str =
    r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","DirectRouting":true}}"#;

#[test]
fn hostgw_routes_same_segment_peers_and_reports_the_routed_one() {
    require_root!(NEEDS_ROOT);
    let mut c = Cluster::up("g1", HOSTGW, &[0, 0, 1]);
    c.assert_all_pairs(&[(0, 1), (1, 0)], Duration::from_secs(10));
    let h2 = c.hosts[1].clone();
    let h3 = c.hosts[2].clone();
    assert_eq!(
        h2.env.as_ref().unwrap().mtu,
        1500,
        "host-gw adds nothing to packets"
    );

    // h1: a plain route to h2's subnet via h2's public IP, none for h3's.
    let r = c
        .route_to(0, &h2.subnet().to_string())
        .expect("route to h2's subnet");
    assert_eq!(r["gateway"], h2.public_ip.to_string());
    assert_eq!(r["dev"], "eth0");
    assert!(
        c.route_to(0, &h3.subnet().to_string()).is_none(),
        "{:?}",
        c.routes(0)
    );

    // The routed peer is named, with the reason, in the log of both same-segment hosts, and h3
    // reports both of them.
    wait_for(Duration::from_secs(5), "the skip report", || {
        c.hosts[0]
            .log_text()
            .contains("not on this node's L2 segment")
    });
    for (i, peer) in [(0, &h3), (1, &h3), (2, &c.hosts[0].clone()), (2, &h2)] {
        let log = c.hosts[i].log_text();
        let line = log
            .lines()
            .find(|l| l.contains("not programmed") && l.contains(&peer.subnet().to_string()))
            .unwrap_or_else(|| panic!("{} does not report {}:\n{log}", c.hosts[i].name, peer.name));
        assert!(line.contains(&peer.public_ip.to_string()), "{line}");
    }
    // Reported once, not on every resync.
    let n = c.hosts[0]
        .log_text()
        .matches(&format!("peer {} (PublicIP", h3.subnet()))
        .count();
    assert_eq!(n, 1);

    // The lease is the truth: h2 goes away (agent stopped, lease deleted) and its route follows.
    c.stop_agent(1, libc::SIGTERM);
    let key = format!(
        "/coreos.com/network/subnets/{}-{}",
        h2.subnet().network(),
        h2.subnet().prefix()
    );
    c.etcdctl(&["del", &key]);
    wait_for(Duration::from_secs(5), "h2's route to go", || {
        c.route_to(0, &h2.subnet().to_string()).is_none()
    });
}

#[test]
fn hostgw_restart_loses_nothing_and_reconciles_stale_routes() {
    require_root!(NEEDS_ROOT);
    let mut c = Cluster::up("g2", HOSTGW, &[0, 0]);
    c.assert_all_pairs(&[(0, 1), (1, 0)], Duration::from_secs(10));
    let from = c.hosts[0].pod_ns.clone();
    let to = c.hosts[1].pod_ip();
    let pinger = std::thread::spawn(move || ping_gaps(&from, to, "0.01", 300));
    std::thread::sleep(Duration::from_millis(700));
    c.stop_agent(0, libc::SIGTERM);
    // While it is down, a stale route of a peer that no longer exists appears (as if a lease
    // vanished while the agent was away): the restarted agent removes it.
    ip_in(
        &c.hosts[0].ns,
        &[
            "route",
            "add",
            "10.244.99.0/24",
            "via",
            "198.18.0.2",
            "proto",
            "static",
        ],
    );
    c.start_agent(0);
    let (sent, received, gap) = pinger.join().unwrap();
    assert_eq!(
        received, sent,
        "host-gw lost packets across a restart (largest gap {gap:.3}s)"
    );
    wait_for(
        Duration::from_secs(10),
        "the stale route to be reconciled away",
        || c.route_to(0, "10.244.99.0/24").is_none(),
    );
    c.assert_all_pairs(&[(0, 1)], Duration::from_secs(5));
}

#[test]
fn vxlan_direct_routing_mixes_plain_routes_and_the_tunnel() {
    require_root!(NEEDS_ROOT);
    let mut c = Cluster::up("d1", DIRECT, &[0, 0, 1]);
    c.assert_all_pairs(
        &[(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)],
        Duration::from_secs(10),
    );
    let h2 = c.hosts[1].clone();
    let h3 = c.hosts[2].clone();
    // Same segment: a plain route via the peer; behind the router: the vxlan route.
    let direct = c.route_to(0, &h2.subnet().to_string()).unwrap();
    assert_eq!(direct["gateway"], h2.public_ip.to_string());
    assert_eq!(direct["dev"], "eth0");
    let tunnel = c.route_to(0, &h3.subnet().to_string()).unwrap();
    assert_eq!(tunnel["dev"], "tweed.1");
    assert_eq!(tunnel["gateway"], h3.subnet().network().to_string());
    // h3 tunnels to both.
    for peer in [&c.hosts[0].clone(), &h2] {
        let r = c.route_to(2, &peer.subnet().to_string()).unwrap();
        assert_eq!(r["dev"], "tweed.1", "{r}");
    }
    // No skip reports: the routed peer is what the tunnel is for.
    assert!(!c.hosts[0].log_text().contains("not programmed"));

    // A restart under traffic loses nothing, on the direct and on the tunnelled path.
    for to in [h2.pod_ip(), h3.pod_ip()] {
        let from = c.hosts[0].pod_ns.clone();
        let pinger = std::thread::spawn(move || ping_gaps(&from, to, "0.01", 250));
        std::thread::sleep(Duration::from_millis(600));
        c.stop_agent(0, libc::SIGTERM);
        c.start_agent(0);
        let (sent, received, gap) = pinger.join().unwrap();
        assert_eq!(
            received, sent,
            "lost packets to {to} across a restart (gap {gap:.3}s)"
        );
    }
}
