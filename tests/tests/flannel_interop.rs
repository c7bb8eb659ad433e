//! A node set up exactly the way flannel sets one up (a `flannel.1` device, a lease in flannel's
//! JSON with an etcd TTL lease, neighbour/FDB/route entries in flannel's shape for its peers) joins
//! a tweed lab: traffic flows both ways, so tweed and flannel nodes can share one cluster.

use std::time::Duration;
use tweed_e2e::*;
use tweed_lab::LabSpec;

#[test]
fn a_flannel_configured_node_interoperates_with_tweed_nodes() {
    require_root!(NEEDS_ROOT);
    let lab = up(LabSpec::new(per_process("fl"), 2));
    let fl = flannel::Node::up(&lab, "twf", "1450");
    let (node, pod, subnet, pod_ip) = (&*fl.node, &*fl.pod, &*fl.subnet, &*fl.pod_ip);
    let public_ip = flannel::PUBLIC_IP;

    // flannel's vxlan device: VNI 1, port 8472, learning off, the subnet's address as /32.
    ip(&[
        "-n",
        node,
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
    ip(&["-n", node, "link", "set", "flannel.1", "mtu", "1450", "up"]);
    fl.address_device("flannel.1");
    let mac = in_ns(node, &["cat", "/sys/class/net/flannel.1/address"])
        .trim()
        .to_string();

    // The lease, written by flannel's rules: a TTL lease, its exact JSON.
    let value = format!(
        r#"{{"PublicIP":"{public_ip}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    );
    fl.write_lease(&lab, 600, &value);

    // flannel programs its peers from their leases: tweed's leases must be readable by its rules.
    let listing = etcdctl(&lab, &["get", "--prefix", flannel::SUBNETS]);
    let mut peers = 0;
    for (_, peer_net, val) in flannel::leases(&listing) {
        if peer_net == subnet {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(val).expect("tweed lease is flannel JSON");
        assert_eq!(v["BackendType"], "vxlan");
        let peer_ip = v["PublicIP"].as_str().unwrap();
        let peer_mac = v["BackendData"]["VtepMAC"].as_str().unwrap();
        assert_eq!(v["BackendData"]["VNI"], 1);
        flannel::program_vxlan_peer(
            node,
            "-4",
            "flannel.1",
            &peer_net,
            peer_mac,
            peer_ip,
            &format!("{peer_net}/24"),
        );
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
            in_ns(
                pod,
                &["ping", "-c", "2", "-W", "2", &ipv4_of(p).to_string()],
            );
            in_ns(&p.netns, &["ping", "-c", "2", "-W", "2", pod_ip]);
        }
    }
}
