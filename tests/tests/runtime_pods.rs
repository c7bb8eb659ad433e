//! Issue 5: pods as tweedctl containers (`--pods-via runtime`): busybox containers on two lab
//! hosts, attached through the tweed CNI plugin by tweedctl, reach each other over the overlay.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;
use tweed_e2e::*;
use tweed_lab::{LabSpec, PodsVia};

#[test]
fn containers_on_two_hosts_reach_each_other_over_the_overlay() {
    require_root!(NEEDS_ROOT);
    let mut spec = LabSpec::new(per_process("rt"), 2);
    spec.pods_via = PodsVia::Runtime;
    let lab = up(spec);
    let report = lab.check_until(Duration::from_secs(10)).expect("check");
    assert_eq!(report.summary(), "8 passed, 0 failed");

    let rt = lab.tweedctl().expect("a runtime lab has tweedctl");
    let h2p1 = ipv4_of(&host_state(&lab, "h2").pods[0]).to_string();
    for h in &lab.state().hosts {
        for p in &h.pods {
            let id = p.container_id.clone().expect("container id");
            // The pod's namespace is the container's.
            let inspect: serde_json::Value = serde_json::from_str(
                &tweed_lab::cmd::run(&mut rt.command(&["inspect", &id])).unwrap(),
            )
            .unwrap();
            let sandbox = inspect[0]["NetworkSettings"]["SandboxKey"]
                .as_str()
                .expect("SandboxKey");
            assert_eq!(
                std::fs::metadata(sandbox).unwrap().ino(),
                std::fs::metadata(format!("/run/netns/{}", p.netns))
                    .unwrap()
                    .ino()
            );
            assert_eq!(
                inspect[0]["NetworkSettings"]["IPAddresses"][0],
                ipv4_of(p).to_string()
            );
            assert_eq!(inspect[0]["NetworkSettings"]["CniNetwork"], "tweed");
        }
    }
    // From inside the container itself (busybox's ping, the container's rootfs).
    let out = tweed_lab::cmd::run(
        &mut rt.command(&["exec", "h1-p1", "ping", "-c", "2", "-W", "2", &h2p1]),
    )
    .expect("container ping");
    assert!(out.contains("2 packets received"), "{out}");

    // down removes the containers: no mounts or processes left.
    let dir = lab.dir().to_path_buf();
    let pids: Vec<u32> = lab
        .state()
        .hosts
        .iter()
        .flat_map(|h| h.pods.iter())
        .flat_map(|p| tweed_lab::netns::pids(&p.netns))
        .collect();
    assert!(!pids.is_empty());
    let report = lab.down().expect("down");
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&dir.display().to_string()),
        "mounts left under {}",
        dir.display()
    );
    for pid in pids {
        assert!(!tweed_lab::cmd::pid_alive(pid), "pid {pid} survived down");
    }
}
