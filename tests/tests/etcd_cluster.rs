//! Issue 7: a lab on a real 3-member etcd cluster keeps working when the leader dies.

use std::time::Duration;
use tweed_e2e::*;
use tweed_lab::LabSpec;

#[test]
fn three_member_cluster_survives_losing_its_leader() {
    require_root!(NEEDS_ROOT);
    let mut spec = LabSpec::new(per_process("ec"), 3);
    spec.etcd_members = 3;
    spec.pods_per_host = 1;
    // Short enough that renewals must go through the surviving members during the test, long
    // enough that a leader election (etcd keeps leases alive across it) never lets one lapse.
    spec.lease_ttl = Duration::from_secs(15);
    let lab = up(spec);
    let members = lab.etcd_members();
    assert_eq!(members.len(), 3);
    assert!(members.iter().all(|m| m.alive), "{members:?}");
    let endpoints: Vec<String> = members.iter().map(|m| m.endpoint.clone()).collect();
    assert_eq!(
        endpoints,
        [
            "http://198.18.0.251:2379",
            "http://198.18.0.252:2379",
            "http://198.18.0.253:2379"
        ]
    );
    assert_eq!(lab.status().etcd.endpoints, endpoints);
    // Every agent knows every member.
    for h in ["h1", "h2", "h3"] {
        let argv = agent_cmdline(&lab, h);
        assert_eq!(
            flag_value(&argv, "--etcd-endpoints"),
            Some(endpoints.join(",").as_str())
        );
    }
    let list = etcdctl(&lab, &["member", "list"]);
    assert_eq!(list.lines().count(), 3, "{list}");
    assert_eq!(
        lab.check_until(Duration::from_secs(10)).unwrap().summary(),
        "6 passed, 0 failed"
    );

    // Pod-to-pod traffic across the failover: the data plane never waits on etcd.
    let target = ipv4_of(&host_state(&lab, "h2").pods[0]).to_string();
    let pinger = ns_command(&host_state(&lab, "h1").pods[0].netns, &[])
        .args(["ping", "-q", "-i", "0.01", "-c", "800", "-W", "1", &target])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ping");
    std::thread::sleep(Duration::from_millis(500));
    let leader = lab.etcd_leader().unwrap().expect("a leader");
    lab.kill_etcd_member(&leader).unwrap();
    assert!(
        !lab.etcd_members()
            .iter()
            .find(|m| m.name == leader)
            .unwrap()
            .alive
    );
    let mut new_leader = None;
    wait_for(Duration::from_secs(15), "a new etcd leader", || {
        new_leader = lab.etcd_leader().ok().flatten();
        new_leader.is_some()
    });
    assert_ne!(new_leader.as_deref(), Some(leader.as_str()));
    let out = pinger.wait_with_output().expect("ping output");
    assert_eq!(
        ping_summary(&String::from_utf8_lossy(&out.stdout)),
        (800, 800),
        "packets lost while the etcd leader died"
    );
    // Renewing: a TTL after the failover every node still holds its original lease (renewed
    // through the survivors, never lapsed and re-acquired).
    std::thread::sleep(Duration::from_secs(16));
    for h in &lab.state().hosts {
        let log = std::fs::read_to_string(&h.log).unwrap();
        assert!(
            !log.contains("lease expired"),
            "{}: a lease lapsed:\n{log}",
            h.name
        );
    }
    let keys = etcdctl(
        &lab,
        &[
            "get",
            "--prefix",
            "--keys-only",
            "/coreos.com/network/subnets/",
        ],
    );
    assert_eq!(keys.lines().filter(|l| !l.is_empty()).count(), 3, "{keys}");
    // Watching: a lease written now reaches every agent's data plane.
    let net = free_subnet(&lab, &[]);
    let key = format!("/coreos.com/network/subnets/{net}-24");
    let route = format!("{net}/24");
    etcdctl(
        &lab,
        &[
            "put",
            &key,
            r#"{"PublicIP":"198.18.0.99","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:00:00:99"}}"#,
        ],
    );
    for h in ["h1", "h2", "h3"] {
        let ns = host_state(&lab, h).netns;
        wait_for(
            Duration::from_secs(5),
            "the new lease to be programmed",
            || vxlan_state(&ns, "tweed.1").routes.contains(&route),
        );
    }
    etcdctl(&lab, &["del", &key]);
    assert_eq!(
        lab.check_until(Duration::from_secs(10)).unwrap().summary(),
        "6 passed, 0 failed"
    );

    // The agents still use etcd: a restarted agent gets its lease back from the survivors and
    // the data plane is whole again.
    let h2 = host_state(&lab, "h2");
    let before = tweed_config::SubnetEnv::read(&h2.subnet_file).unwrap();
    let stopped = stop_agent(&lab, "h2", libc::SIGTERM);
    std::fs::remove_file(&h2.subnet_file).unwrap();
    start_agent(&stopped);
    wait_for(Duration::from_secs(30), "h2's subnet.env again", || {
        h2.subnet_file.exists()
    });
    let after = tweed_config::SubnetEnv::read(&h2.subnet_file).unwrap();
    assert_eq!(after.ipv4, before.ipv4);
    assert_eq!(
        lab.check_until(Duration::from_secs(15)).unwrap().summary(),
        "6 passed, 0 failed"
    );
    // A new lease write lands too: the etcd cluster still has a quorum.
    etcdctl(&lab, &["put", "/tweed-lab-test/after-failover", "ok"]);
}
