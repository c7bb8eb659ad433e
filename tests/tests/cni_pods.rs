//! Issue 4: the lab's pods come through the tweed CNI plugin, run by the CNI protocol inside each
//! host namespace, as a container runtime would run it.

use std::time::Duration;
use tweed_e2e::*;
use tweed_lab::LabSpec;

#[test]
fn pods_attached_by_the_cni_plugin_reach_every_other_host() {
    require_root!(NEEDS_ROOT);
    let lab = up(LabSpec::new(per_process("cn"), 2));
    assert_eq!(lab.state().pods_via, tweed_lab::PodsVia::Cni);
    let report = lab.check_until(Duration::from_secs(10)).expect("check");
    assert_eq!(report.summary(), "8 passed, 0 failed");

    for h in &lab.state().hosts {
        let dir = h.log.parent().unwrap().to_path_buf();
        let conflist: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("net.d/10-tweed.conflist")).unwrap(),
        )
        .unwrap();
        assert_eq!(conflist["name"], "tweed");
        assert_eq!(
            conflist["plugins"][0]["subnetFile"],
            h.subnet_file.display().to_string()
        );
        let env = tweed_config::SubnetEnv::read(&h.subnet_file).unwrap();
        for p in &h.pods {
            // The plugin's marks: IPAM record, MAC from the address, the attachment alias, and
            // its routes (the overlay via the gateway, and the default route).
            let record =
                std::fs::read_to_string(dir.join("ipam/tweed").join(ipv4_of(p).to_string()))
                    .expect("IPAM record");
            assert!(record.starts_with(&p.netns), "{record:?}");
            let link = in_ns(&p.netns, &["ip", "-d", "link", "show", "eth0"]);
            let o = ipv4_of(p).octets();
            let mac = format!("0a:58:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]);
            assert!(link.contains(&mac), "{link}");
            assert!(
                link.contains(&format!("alias tweed/tweed/{}/eth0", p.netns)),
                "{link}"
            );
            assert!(link.contains(&format!("mtu {}", env.mtu)), "{link}");
            let routes = in_ns(&p.netns, &["ip", "route"]);
            let gw = env.ipv4.expect("IPv4 pair").subnet.ip().to_string();
            assert!(routes.contains(&format!("default via {gw}")), "{routes}");
            assert!(
                routes.contains(&format!("10.244.0.0/16 via {gw}")),
                "{routes}"
            );
        }
        // Host ends are the plugin's `tw…` veths on cni0.
        let ports = in_ns(&h.netns, &["ip", "-o", "link", "show", "master", "cni0"]);
        assert_eq!(
            ports.lines().filter(|l| l.contains(": tw")).count(),
            h.pods.len(),
            "{ports}"
        );
    }

    // `down` runs DEL for every pod first; none of them failed.
    let report = lab.down().expect("down");
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
}

#[test]
fn status_names_each_hosts_cni_pods_and_exec_reaches_them() {
    require_root!(NEEDS_ROOT);
    let lab = up(LabSpec::new(per_process("cs"), 1));
    let st = lab.status();
    assert_eq!(st.hosts[0].pods.len(), 2);
    let p2_ip = st.hosts[0].pods[1].ip.as_deref().expect("pod p2's IPv4");
    let out = lab
        .exec("h1/p2", &["ip", "-4", "-o", "addr", "show", "eth0"])
        .unwrap();
    assert!(out.contains(p2_ip), "{out}");
    // Same-host pods meet on cni0.
    lab.exec("h1/p1", &["ping", "-c", "1", "-W", "2", p2_ip])
        .unwrap();
}
