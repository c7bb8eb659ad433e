//! Dual-stack attachments on a real bridge, veths and namespaces (root only): one address per
//! family, usable when ADD returns, CHECK of both, DEL and failures leaving nothing behind.

mod common;

use common::{assert_error, links, node, Node, NEEDS_ROOT};
use serde_json::{json, Value};
use tweed_testkit::require_root;

fn dual(tag: &str) -> Node {
    node(tag).dual_stack("fd00:10:244::/56", "fd00:10:244:7::1/64")
}

fn with_prev(conf: &str, prev: &Value) -> String {
    let mut c: Value = serde_json::from_str(conf).unwrap();
    c["prevResult"] = prev.clone();
    c.to_string()
}

#[test]
fn dual_stack_add_check_del_and_ping6() {
    require_root!(NEEDS_ROOT);
    let n = dual("ds");
    let conf = n.conf("1.0.0", json!({}));
    let (c1, c2) = (n.container(1), n.container(2));
    let r1 = n.tweed("ADD", "c1", &c1.path_str(), &conf);
    assert!(r1.ok(), "{} {}", r1.stdout, r1.stderr);
    let r1 = r1.json();
    // Straight after ADD, before anything else: the address is not tentative and answers.
    let a6 = c1
        .ip(&["-o", "-6", "addr", "show", "dev", "eth0", "scope", "global"])
        .unwrap();
    assert!(a6.contains("fd00:10:244:7::2/64"), "{a6}");
    assert!(
        !a6.contains("tentative"),
        "ADD returned before the address was usable: {a6}"
    );
    c1.exec(&["ping", "-6", "-c1", "-W2", "fd00:10:244:7::1"])
        .expect("container reaches its IPv6 gateway right after ADD");
    c1.exec(&["ping", "-4", "-c1", "-W2", "10.244.7.1"])
        .expect("and its IPv4 gateway");

    assert_eq!(
        r1["ips"],
        json!([
            {"address": "10.244.7.2/24", "gateway": "10.244.7.1", "interface": 2},
            {"address": "fd00:10:244:7::2/64", "gateway": "fd00:10:244:7::1", "interface": 2}
        ])
    );
    let dsts: Vec<&str> = r1["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["dst"].as_str().unwrap())
        .collect();
    assert_eq!(
        dsts,
        ["10.244.0.0/16", "0.0.0.0/0", "fd00:10:244::/56", "::/0"]
    );
    let routes6 = c1.ip(&["-6", "route"]).unwrap();
    assert!(
        routes6.contains("fd00:10:244::/56 via fd00:10:244:7::1 dev eth0"),
        "{routes6}"
    );
    assert!(
        routes6.contains("default via fd00:10:244:7::1 dev eth0"),
        "{routes6}"
    );
    let br = n.host.ip(&["-o", "addr", "show", "cni0"]).unwrap();
    assert!(
        br.contains("10.244.7.1/24") && br.contains("fd00:10:244:7::1/64"),
        "{br}"
    );

    let r2 = n.tweed("ADD", "c2", &c2.path_str(), &conf);
    assert!(r2.ok(), "{}", r2.stdout);
    // Container to container over the bridge, both families.
    c1.exec(&["ping", "-6", "-c1", "-W2", "fd00:10:244:7::3"])
        .expect("c1 reaches c2 over IPv6");
    c2.exec(&["ping", "-4", "-c1", "-W2", "10.244.7.2"])
        .expect("c2 reaches c1 over IPv4");
    assert_eq!(
        n.records("tnet"),
        [
            "10.244.7.2",
            "10.244.7.3",
            "fd00:10:244:7::2",
            "fd00:10:244:7::3"
        ]
    );

    let check = n.tweed("CHECK", "c1", &c1.path_str(), &with_prev(&conf, &r1));
    assert!(check.ok(), "{}", check.stdout);
    c1.ip(&["-6", "route", "del", "default"]).unwrap();
    let check = n.tweed("CHECK", "c1", &c1.path_str(), &with_prev(&conf, &r1));
    assert_error(&check, 102, "route to ::/0 via fd00:10:244:7::1 is missing");
    c1.ip(&["addr", "del", "fd00:10:244:7::2/64", "dev", "eth0"])
        .unwrap();
    let check = n.tweed("CHECK", "c1", &c1.path_str(), &with_prev(&conf, &r1));
    assert_error(&check, 102, "address fd00:10:244:7::2/64 is missing");

    for (id, c) in [("c1", &c1), ("c2", &c2)] {
        let del = n.tweed("DEL", id, &c.path_str(), &conf);
        assert!(del.ok(), "{}", del.stdout);
        assert_eq!(links(c), ["lo"]);
    }
    assert!(n.records("tnet").is_empty(), "{:?}", n.records("tnet"));
    assert_eq!(n.host_links(), ["lo", "cni0"]);
}

/// The IPv6 pool exhausted after the IPv4 allocation: the ADD fails with code 101 and leaves
/// no veth and no record of either family; GC then releases both families of a dead container.
#[test]
fn dual_stack_failure_and_gc_leave_nothing() {
    require_root!(NEEDS_ROOT);
    let n = dual("dsf");
    let conf = n.conf(
        "1.1.0",
        json!({"ranges": [[{"subnet": "10.244.7.0/24"}],
            [{"subnet": "fd00:10:244:7::/64", "rangeStart": "fd00:10:244:7::2", "rangeEnd": "fd00:10:244:7::2"}]]}),
    );
    let (c1, c2) = (n.container(1), n.container(2));
    assert!(n.tweed("ADD", "c1", &c1.path_str(), &conf).ok());
    let add = n.tweed("ADD", "c2", &c2.path_str(), &conf);
    assert_error(&add, 101, "fd00:10:244:7::2-fd00:10:244:7::2");
    assert_eq!(links(&c2), ["lo"]);
    assert_eq!(n.tw_links().len(), 1, "only c1's host end");
    assert_eq!(n.records("tnet"), ["10.244.7.2", "fd00:10:244:7::2"]);

    // c1 is gone from the runtime's list: GC releases both of its addresses and its veth.
    let mut gc: Value = serde_json::from_str(&conf).unwrap();
    gc["cni.dev/valid-attachments"] = json!([]);
    let run = n.tweed("GC", "", "", &gc.to_string());
    assert!(run.ok(), "{}", run.stdout);
    assert!(n.records("tnet").is_empty(), "{:?}", n.records("tnet"));
    assert!(n.tw_links().is_empty());
}

/// Review L5: pods made while the node was dual-stack keep their IPv4 masquerade rule after
/// the node turns IPv6-only (subnet.env names no IPv4 network any more); DEL and GC must
/// still remove it, found by address and mark in the real nat table.
#[test]
fn ip_masq_rules_of_dual_stack_pods_go_after_the_node_turns_ipv6_only() {
    require_root!(NEEDS_ROOT);
    if std::process::Command::new("iptables")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: iptables missing (Debian package iptables)");
        return;
    }
    let n = dual("dmq");
    let conf = n.conf("1.1.0", json!({"ipMasq": true}));
    let (c1, c2) = (n.container(1), n.container(2));
    for (id, c) in [("m1", &c1), ("m2", &c2)] {
        let add = n.tweed("ADD", id, &c.path_str(), &conf);
        assert!(add.ok(), "{} {}", add.stdout, add.stderr);
    }
    let nat = |n: &Node| {
        n.host
            .exec(&["iptables", "-w", "-t", "nat", "-S", "POSTROUTING"])
            .unwrap()
    };
    let rules = nat(&n);
    for (ip, mark) in [
        ("10.244.7.2/32", "tweed/tnet/m1/eth0"),
        ("10.244.7.3/32", "tweed/tnet/m2/eth0"),
    ] {
        assert!(rules.contains(ip) && rules.contains(mark), "{rules}");
    }
    let n = n.ipv6_only("fd00:10:244::/56", "fd00:10:244:7::1/64");

    // DEL of m1: its IPv4 record and its rule go, though subnet.env has no IPv4 half.
    let del = n.tweed("DEL", "m1", &c1.path_str(), &conf);
    assert!(del.ok(), "{} {}", del.stdout, del.stderr);
    let rules = nat(&n);
    assert!(
        !rules.contains("tweed/tnet/m1/eth0"),
        "DEL left m1's rule: {rules}"
    );
    assert!(
        rules.contains("tweed/tnet/m2/eth0"),
        "DEL took m2's rule: {rules}"
    );

    // GC with m2 gone from the runtime's list: the same for m2.
    let mut gc: Value = serde_json::from_str(&conf).unwrap();
    gc["cni.dev/valid-attachments"] = json!([]);
    let run = n.tweed("GC", "", "", &gc.to_string());
    assert!(run.ok(), "{} {}", run.stdout, run.stderr);
    assert!(n.records("tnet").is_empty(), "{:?}", n.records("tnet"));
    let rules = nat(&n);
    assert!(!rules.contains("MASQUERADE"), "GC left m2's rule: {rules}");
}
