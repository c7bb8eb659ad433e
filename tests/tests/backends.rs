//! Issue 3: the host-gw and udp backends, and vxlan's DirectRouting on a lab with two routed
//! underlay segments.

use std::time::Duration;
use tweed_e2e::*;
use tweed_lab::{Backend, LabSpec};

fn subnet_of(lab: &tweed_lab::Lab, host: &str) -> String {
    let env = tweed_config::SubnetEnv::read(&host_state(lab, host).subnet_file).unwrap();
    env.node_subnet().expect("IPv4 pair").to_string()
}

#[test]
fn host_gw_lab_passes_check_with_routes_via_the_peers() {
    require_root!(NEEDS_ROOT);
    let mut spec = LabSpec::new(per_process("hg"), 3);
    spec.backend = Backend::HostGw;
    let lab = up(spec);
    let report = lab.check_until(Duration::from_secs(15)).expect("check");
    assert_eq!(report.summary(), "24 passed, 0 failed");
    for h in &lab.state().hosts {
        let routes = in_ns(&h.netns, &["ip", "route"]);
        for peer in lab.state().hosts.iter().filter(|p| p.name != h.name) {
            let want = format!(
                "{} via {} dev eth0",
                subnet_of(&lab, &peer.name),
                peer.public_ip
            );
            assert!(
                routes.contains(&want),
                "{}: no {want:?} in\n{routes}",
                h.name
            );
        }
        assert!(!routes.contains("tweed.1"), "{routes}");
    }
}

#[test]
fn udp_lab_passes_check() {
    require_root!(NEEDS_ROOT);
    let mut spec = LabSpec::new(per_process("ud"), 3);
    spec.backend = Backend::Udp;
    let lab = up(spec);
    let report = lab.check_until(Duration::from_secs(15)).expect("check");
    assert_eq!(report.summary(), "24 passed, 0 failed");
    for h in &lab.state().hosts {
        let link = in_ns(&h.netns, &["ip", "-d", "link", "show", "tweed0"]);
        assert!(link.contains("tun"), "{link}");
    }
    // The pings crossed h1's udp workers: its packet and byte counters reach /metrics (exported
    // every rule resync, 5 s).
    let h1 = &lab.state().hosts[0];
    let url = format!("http://{}:9867/metrics", h1.public_ip);
    let counted = |body: &str, series: &str| {
        body.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    wait_for(Duration::from_secs(12), "udp counters in /metrics", || {
        let body = lab
            .exec("h2", &["curl", "-sf", "--max-time", "2", &url])
            .unwrap_or_default();
        counted(&body, "tweed_udp_packets_total{direction=\"tx\"}") > 0.0
            && counted(&body, "tweed_udp_bytes_total{direction=\"rx\"}") > 0.0
    });
}

#[test]
fn direct_routing_uses_plain_routes_on_the_segment_and_vxlan_across_it() {
    require_root!(NEEDS_ROOT);
    let mut spec = LabSpec::new(per_process("dr"), 4);
    spec.direct_routing = true;
    spec.segments = 2;
    spec.pods_per_host = 1;
    let lab = up(spec);
    // h1, h3 on segment A (198.18.0.0/24); h2, h4 on segment B (198.18.1.0/24).
    assert_eq!(
        lab.state().public_ips(),
        ["198.18.0.1", "198.18.1.2", "198.18.0.3", "198.18.1.4"]
    );
    let report = lab.check_until(Duration::from_secs(15)).expect("check");
    assert_eq!(report.summary(), "12 passed, 0 failed");

    for h in &lab.state().hosts {
        let routes = in_ns(&h.netns, &["ip", "route"]);
        for peer in lab.state().hosts.iter().filter(|p| p.name != h.name) {
            let net = subnet_of(&lab, &peer.name);
            let addr = net.split('/').next().unwrap().to_string();
            let line = routes
                .lines()
                .find(|l| l.starts_with(&format!("{net} ")))
                .unwrap_or_else(|| panic!("{}: no route to {net} in\n{routes}", h.name));
            if peer.segment == h.segment {
                assert!(
                    line.contains(&format!("via {} dev eth0", peer.public_ip)),
                    "{} -> {} (same segment): {line}",
                    h.name,
                    peer.name
                );
            } else {
                assert!(
                    line.contains(&format!("via {addr} dev tweed.1")) && line.contains("onlink"),
                    "{} -> {} (other segment): {line}",
                    h.name,
                    peer.name
                );
            }
        }
        // vxlan entries only for the peers behind the router.
        let s = vxlan_state(&h.netns, "tweed.1");
        assert_eq!(s.routes.lines().count(), 2, "{}: {}", h.name, s.routes);
    }
}
