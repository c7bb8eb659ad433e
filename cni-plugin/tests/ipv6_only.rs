//! IPv6-only attachments on a real bridge, veths and namespaces (root only): a node whose
//! subnet.env has no IPv4 pair gives each container one IPv6 address and nothing of IPv4;
//! CHECK, DEL and GC work, and a failed ADD leaves nothing behind.

mod common;

use common::{assert_error, links, node, Node, NEEDS_ROOT};
use serde_json::{json, Value};
use tweed_testkit::require_root;

fn v6_only(tag: &str) -> Node {
    node(tag).ipv6_only("fd00:10:244::/56", "fd00:10:244:7::1/64")
}

fn with_prev(conf: &str, prev: &Value) -> String {
    let mut c: Value = serde_json::from_str(conf).unwrap();
    c["prevResult"] = prev.clone();
    c.to_string()
}

#[test]
fn ipv6_only_add_check_del_and_ping6() {
    require_root!(NEEDS_ROOT);
    let n = v6_only("v6o");
    let conf = n.conf("1.1.0", json!({}));
    let (c1, c2) = (n.container(1), n.container(2));
    let r1 = n.tweed("ADD", "c1", &c1.path_str(), &conf);
    assert!(r1.ok(), "{} {}", r1.stdout, r1.stderr);
    let r1 = r1.json();
    // Straight after ADD: the address is not tentative and answers.
    let a6 = c1
        .ip(&["-o", "-6", "addr", "show", "dev", "eth0", "scope", "global"])
        .unwrap();
    assert!(a6.contains("fd00:10:244:7::2/64"), "{a6}");
    assert!(!a6.contains("tentative"), "ADD returned too early: {a6}");
    c1.exec(&["ping", "-6", "-c1", "-W2", "fd00:10:244:7::1"])
        .expect("container reaches its IPv6 gateway right after ADD");
    // No IPv4 at all: no address, no route, in the container or on the bridge.
    let a4 = c1.ip(&["-o", "-4", "addr", "show", "dev", "eth0"]).unwrap();
    assert!(a4.trim().is_empty(), "{a4}");
    let r4 = c1.ip(&["-4", "route"]).unwrap();
    assert!(r4.trim().is_empty(), "{r4}");
    let br4 = n.host.ip(&["-o", "-4", "addr", "show", "cni0"]).unwrap();
    assert!(br4.trim().is_empty(), "{br4}");
    let br6 = n.host.ip(&["-o", "-6", "addr", "show", "cni0"]).unwrap();
    assert!(br6.contains("fd00:10:244:7::1/64"), "{br6}");

    assert_eq!(
        r1["ips"],
        json!([{"address": "fd00:10:244:7::2/64", "gateway": "fd00:10:244:7::1", "interface": 2}])
    );
    assert_eq!(
        r1["routes"],
        json!([
            {"dst": "fd00:10:244::/56", "gw": "fd00:10:244:7::1"},
            {"dst": "::/0", "gw": "fd00:10:244:7::1"}
        ])
    );
    let routes6 = c1.ip(&["-6", "route"]).unwrap();
    assert!(
        routes6.contains("fd00:10:244::/56 via fd00:10:244:7::1 dev eth0")
            && routes6.contains("default via fd00:10:244:7::1 dev eth0"),
        "{routes6}"
    );

    let r2 = n.tweed("ADD", "c2", &c2.path_str(), &conf);
    assert!(r2.ok(), "{}", r2.stdout);
    c1.exec(&["ping", "-6", "-c1", "-W2", "fd00:10:244:7::3"])
        .expect("c1 reaches c2 over IPv6");
    assert_eq!(n.records("tnet"), ["fd00:10:244:7::2", "fd00:10:244:7::3"]);

    let check = n.tweed("CHECK", "c1", &c1.path_str(), &with_prev(&conf, &r1));
    assert!(check.ok(), "{}", check.stdout);
    c1.ip(&["-6", "route", "del", "default"]).unwrap();
    let check = n.tweed("CHECK", "c1", &c1.path_str(), &with_prev(&conf, &r1));
    assert_error(&check, 102, "route to ::/0 via fd00:10:244:7::1 is missing");

    for (id, c) in [("c1", &c1), ("c2", &c2)] {
        let del = n.tweed("DEL", id, &c.path_str(), &conf);
        assert!(del.ok(), "{}", del.stdout);
        assert_eq!(links(c), ["lo"]);
    }
    assert!(n.records("tnet").is_empty(), "{:?}", n.records("tnet"));
    assert_eq!(n.host_links(), ["lo", "cni0"]);
}

/// The IPv6 pool exhausted: the second ADD fails with code 101 and leaves no veth and no
/// record; GC then releases the dead container's address and veth.
#[test]
fn ipv6_only_failure_and_gc_leave_nothing() {
    require_root!(NEEDS_ROOT);
    let n = v6_only("v6f");
    let conf = n.conf(
        "1.1.0",
        json!({"ranges": [[{"subnet": "fd00:10:244:7::/64", "rangeStart": "fd00:10:244:7::2", "rangeEnd": "fd00:10:244:7::2"}]]}),
    );
    let (c1, c2) = (n.container(1), n.container(2));
    assert!(n.tweed("ADD", "c1", &c1.path_str(), &conf).ok());
    let add = n.tweed("ADD", "c2", &c2.path_str(), &conf);
    assert_error(&add, 101, "fd00:10:244:7::2-fd00:10:244:7::2");
    assert_eq!(links(&c2), ["lo"]);
    assert_eq!(n.tw_links().len(), 1, "only c1's host end");
    assert_eq!(n.records("tnet"), ["fd00:10:244:7::2"]);
    // `ranges` asking for IPv4 on this node: refused (code 7) before anything is made.
    let asks4 = n.conf("1.1.0", json!({"ranges": [[{"subnet": "10.244.7.0/24"}]]}));
    let add = n.tweed("ADD", "c2", &c2.path_str(), &asks4);
    assert_error(&add, 7, "no IPv4 subnet");
    assert_eq!(links(&c2), ["lo"]);

    let mut gc: Value = serde_json::from_str(&conf).unwrap();
    gc["cni.dev/valid-attachments"] = json!([]);
    let run = n.tweed("GC", "", "", &gc.to_string());
    assert!(run.ok(), "{}", run.stdout);
    assert!(n.records("tnet").is_empty(), "{:?}", n.records("tnet"));
    assert!(n.tw_links().is_empty());
}
