//! Load and crash behaviour (root only): parallel ADDs, ADD/DEL churn, a plugin killed mid-ADD.

mod common;

use std::time::Duration;

use common::trace::{Children, Stop};
use common::{links, node, wait_ok, Containers, NEEDS_ROOT};
use serde_json::json;
use tweed_testkit::cni::Call;
use tweed_testkit::require_root;

#[test]
fn two_hundred_parallel_adds_get_distinct_addresses() {
    require_root!(NEEDS_ROOT);
    let n = node("par");
    const N: usize = 200;
    let conf = n.conf("1.0.0", json!({}));
    let Containers {
        netns: containers,
        paths,
        ids,
    } = n.containers(N, "par");
    let children = n.spawn_all("ADD", &ids, &paths, &conf);
    let mut addrs = std::collections::BTreeSet::new();
    for (i, child) in children.into_iter().enumerate() {
        let stdout = wait_ok(child, &format!("ADD {i}"));
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        addrs.insert(v["ips"][0]["address"].as_str().unwrap().to_string());
    }
    assert_eq!(addrs.len(), N, "every ADD got its own address");
    assert_eq!(n.records("tnet").len(), N);
    for (i, c) in containers.iter().enumerate().step_by(37) {
        let a = c.ip(&["-o", "-4", "addr", "show", "eth0"]).unwrap();
        assert!(a.contains("10.244.7."), "container {i}: {a}");
    }
    let dels = n.spawn_all("DEL", &ids, &paths, &conf);
    for (i, child) in dels.into_iter().enumerate() {
        wait_ok(child, &format!("DEL {i}"));
    }
    assert!(n.records("tnet").is_empty());
    assert!(n.tw_links().is_empty(), "{:?}", n.tw_links());
}

#[test]
fn hundred_add_del_cycles_leave_nothing() {
    require_root!(NEEDS_ROOT);
    let n = node("cyc");
    let conf = n.conf("1.0.0", json!({"hairpinMode": true}));
    let c = n.container(1);
    for i in 0..100 {
        let id = format!("cyc{i}");
        let add = n.tweed("ADD", &id, &c.path_str(), &conf);
        assert!(add.ok(), "cycle {i}: {}", add.stdout);
        let del = n.tweed("DEL", &id, &c.path_str(), &conf);
        assert!(del.ok(), "cycle {i}: {}", del.stdout);
    }
    assert!(n.records("tnet").is_empty());
    assert_eq!(links(&c), ["lo"]);
    assert!(n.tw_links().is_empty(), "{:?}", n.tw_links());
}

#[test]
fn plugin_killed_mid_add_leaks_nothing_after_gc() {
    require_root!(NEEDS_ROOT);
    let n = node("kil");
    let conf = n.conf("1.1.0", json!({}));
    // Killed while holding the IPAM lock, its address record just made: the kernel drops the
    // lock, the next ADD goes on. The plugin is held at the first syscall it enters once the
    // record exists (it holds the lock until the record is complete and last_reserved_ip.0
    // written).
    let c0 = n.container(0);
    let p0 = c0.path_str();
    let mut t = n.traced(&Call::new("ADD", "k0", &p0), &conf, true, Children::Run);
    let at = t.run_until(
        |s| matches!(s, Stop::Syscall(_)) && n.records("tnet").len() == 1,
        Duration::from_secs(30),
    );
    assert!(matches!(at, Stop::Syscall(_)), "{at:?}");
    t.kill(t.pid);
    assert!(n.tw_links().is_empty(), "killed before any device existed");

    // Killed after the veth pair exists, before the container side is configured: held as it
    // first enters the container's namespace (`setns`, to open its netlink socket there; the
    // host side is all one netlink batch before that).
    let c1 = n.container(1);
    let p1 = c1.path_str();
    let mut t = n.traced(&Call::new("ADD", "k1", &p1), &conf, true, Children::Run);
    t.run_until(
        |s| matches!(s, Stop::Syscall(nr) if nr == libc::SYS_setns),
        Duration::from_secs(30),
    );
    assert_eq!(n.tw_links().len(), 1, "the pair exists: {:?}", n.tw_links());
    let addrs = c1.ip(&["-o", "-4", "addr", "show"]).unwrap();
    assert!(
        !addrs.contains("10.244."),
        "the container side is not done yet: {addrs}"
    );
    t.kill(t.pid);
    assert_eq!(n.records("tnet").len(), 2);

    // A live container, which GC must keep.
    let c2 = n.container(2);
    let add = n.tweed("ADD", "live", &c2.path_str(), &conf);
    assert!(add.ok(), "{}", add.stdout);
    let live_ip = add.json()["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();

    let gc_conf = n.conf(
        "1.1.0",
        json!({"cni.dev/valid-attachments": [{"containerID": "live", "ifname": "eth0"}]}),
    );
    let gc = n.tweed("GC", "", "", &gc_conf);
    assert!(gc.ok(), "{}", gc.stdout);
    assert_eq!(n.records("tnet"), [live_ip]);
    assert_eq!(
        n.tw_links().len(),
        1,
        "only the live container's veth: {:?}",
        n.tw_links()
    );
    assert_eq!(
        links(&c1),
        ["lo"],
        "the killed ADD's container end went with its pair"
    );
    assert!(n.tweed("DEL", "live", &c2.path_str(), &conf).ok());
    assert!(n.tw_links().is_empty());
}
