//! A node set up exactly the way flannel sets one up (a `flannel.1` device, a lease in flannel's
//! JSON with an etcd TTL lease, neighbour/FDB/route entries in flannel's shape for its peers) joins
//! a tweed lab: traffic flows both ways, so tweed and flannel nodes can share one cluster.

use std::time::Duration;
use tweed_e2e::*;
use tweed_lab::LabSpec;

/// Namespaces this test makes outside the lab's own; deleted on drop, also when the test fails.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .status();
        }
    }
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_flannel_configured_node_interoperates_with_tweed_nodes() {
    let lab = up(LabSpec::new(lab_name("fl"), 2));
    let name = lab.name().to_string();
    let node = format!("twf-{name}");
    let pod = format!("twf-{name}-p");
    let _guard = Namespaces(vec![pod.clone(), node.clone()]);
    let underlay = lab.state().underlay_netns.clone();
    let public_ip = "198.18.0.200";

    // Subnet: one the tweed nodes did not take.
    let taken: Vec<String> = lab
        .state()
        .hosts
        .iter()
        .filter_map(|h| h.subnet.clone())
        .collect();
    let third = (200..250)
        .find(|o| !taken.iter().any(|t| t.starts_with(&format!("10.244.{o}."))))
        .unwrap();
    let subnet = format!("10.244.{third}.0");

    // The host, on the lab's underlay bridge.
    ip(&["netns", "add", &node]);
    ip(&[
        "-n", &underlay, "link", "add", "flv", "type", "veth", "peer", "name", "eth0", "netns",
        &node,
    ]);
    ip(&["-n", &underlay, "link", "set", "flv", "master", "br0", "up"]);
    in_ns(&node, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    ip(&["-n", &node, "link", "set", "lo", "up"]);
    ip(&[
        "-n",
        &node,
        "addr",
        "add",
        &format!("{public_ip}/24"),
        "dev",
        "eth0",
    ]);
    ip(&["-n", &node, "link", "set", "eth0", "up"]);

    // flannel's vxlan device: VNI 1, port 8472, learning off, the subnet's address as /32.
    ip(&[
        "-n",
        &node,
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        public_ip,
        "dev",
        "eth0",
        "dstport",
        "8472",
        "nolearning",
    ]);
    ip(&["-n", &node, "link", "set", "flannel.1", "mtu", "1450", "up"]);
    ip(&[
        "-n",
        &node,
        "addr",
        "add",
        &format!("{subnet}/32"),
        "dev",
        "flannel.1",
    ]);
    let mac = in_ns(&node, &["cat", "/sys/class/net/flannel.1/address"])
        .trim()
        .to_string();

    // A pod behind a cni0 bridge, as flannel's CNI chain (bridge + host-local) would make it.
    let gw = format!("10.244.{third}.1");
    let pod_ip = format!("10.244.{third}.2");
    ip(&["-n", &node, "link", "add", "cni0", "type", "bridge"]);
    ip(&[
        "-n",
        &node,
        "addr",
        "add",
        &format!("{gw}/24"),
        "dev",
        "cni0",
    ]);
    ip(&["-n", &node, "link", "set", "cni0", "mtu", "1450", "up"]);
    ip(&["netns", "add", &pod]);
    ip(&[
        "-n", &node, "link", "add", "vp", "mtu", "1450", "type", "veth", "peer", "name", "eth0",
        "netns", &pod,
    ]);
    ip(&["-n", &node, "link", "set", "vp", "master", "cni0", "up"]);
    ip(&["-n", &pod, "link", "set", "lo", "up"]);
    ip(&[
        "-n",
        &pod,
        "addr",
        "add",
        &format!("{pod_ip}/24"),
        "dev",
        "eth0",
    ]);
    ip(&["-n", &pod, "link", "set", "eth0", "mtu", "1450", "up"]);
    ip(&["-n", &pod, "route", "add", "default", "via", &gw]);

    // The lease, written by flannel's rules: a TTL lease, its exact JSON.
    let grant = etcdctl(&lab, &["lease", "grant", "600"]);
    let lease_id = grant
        .split_whitespace()
        .nth(1)
        .expect("lease id")
        .to_string();
    let value = format!(
        r#"{{"PublicIP":"{public_ip}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    );
    etcdctl(
        &lab,
        &[
            "put",
            &format!("--lease={lease_id}"),
            &format!("/coreos.com/network/subnets/{subnet}-24"),
            &value,
        ],
    );

    // flannel programs its peers from their leases: tweed's leases must be readable by its rules.
    let listing = etcdctl(&lab, &["get", "--prefix", "/coreos.com/network/subnets/"]);
    let lines: Vec<&str> = listing.lines().collect();
    let mut peers = 0;
    for pair in lines.chunks(2) {
        let (key, val) = (pair[0], pair[1]);
        let peer_net = key
            .rsplit('/')
            .next()
            .unwrap()
            .split('-')
            .next()
            .unwrap()
            .to_string();
        if peer_net == subnet {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(val).expect("tweed lease is flannel JSON");
        assert_eq!(v["BackendType"], "vxlan");
        let peer_ip = v["PublicIP"].as_str().unwrap();
        let peer_mac = v["BackendData"]["VtepMAC"].as_str().unwrap();
        assert_eq!(v["BackendData"]["VNI"], 1);
        ip(&[
            "-n",
            &node,
            "neigh",
            "replace",
            &peer_net,
            "lladdr",
            peer_mac,
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ]);
        in_ns(
            &node,
            &[
                "bridge",
                "fdb",
                "replace",
                peer_mac,
                "dev",
                "flannel.1",
                "dst",
                peer_ip,
                "self",
                "permanent",
            ],
        );
        ip(&[
            "-n",
            &node,
            "route",
            "replace",
            &format!("{peer_net}/24"),
            "via",
            &peer_net,
            "dev",
            "flannel.1",
            "onlink",
        ]);
        peers += 1;
    }
    assert_eq!(peers, 2);

    // The tweed agents pick the flannel node up from its lease.
    for h in ["h1", "h2"] {
        let ns = host_state(&lab, h).netns;
        wait_for(
            Duration::from_secs(5),
            "tweed to program the flannel peer",
            || {
                let s = vxlan_state(&ns, "tweed.1");
                s.routes.contains(&format!("{subnet}/24 via {subnet}")) && s.fdb.contains(&mac)
            },
        );
    }
    // Both directions, every tweed pod.
    for h in ["h1", "h2"] {
        for p in &host_state(&lab, h).pods {
            in_ns(&pod, &["ping", "-c", "2", "-W", "2", &p.ip.to_string()]);
            in_ns(&p.netns, &["ping", "-c", "2", "-W", "2", &pod_ip]);
        }
    }
}
