//! Each verb and each rejection, run as a runtime runs the plugin, in namespaces (root only).

mod common;

use std::path::Path;

use common::{assert_error, links, node, NEEDS_ROOT, TWEED};
use serde_json::{json, Value};
use tweed_testkit::cni::{self, Call};
use tweed_testkit::{require_root, NetnsGuard};

fn with_prev(conf: &str, prev: &Value) -> String {
    let mut c: Value = serde_json::from_str(conf).unwrap();
    c["prevResult"] = prev.clone();
    c.to_string()
}

#[test]
fn add_check_del_round_trip() {
    require_root!(NEEDS_ROOT);
    let n = node("rt");
    let c = n.container(1);
    let conf = n.conf(
        "1.0.0",
        json!({"hairpinMode": true, "dns": {"nameservers": ["10.96.0.10"]}}),
    );
    let add = n.tweed("ADD", "c1", &c.path_str(), &conf);
    assert!(add.ok(), "{} {}", add.stdout, add.stderr);
    let r = add.json();
    assert_eq!(r["cniVersion"], "1.0.0");
    assert_eq!(r["ips"][0]["address"], "10.244.7.2/24");
    assert_eq!(r["ips"][0]["gateway"], "10.244.7.1");
    assert_eq!(r["ips"][0]["interface"], 2);
    assert_eq!(r["interfaces"][0]["name"], "cni0");
    assert_eq!(r["interfaces"][0]["mac"], "0a:58:0a:f4:07:01");
    assert_eq!(r["interfaces"][2]["name"], "eth0");
    assert_eq!(r["interfaces"][2]["sandbox"], c.path_str());
    assert_eq!(r["interfaces"][2]["mac"], "0a:58:0a:f4:07:02");
    assert_eq!(r["routes"][0]["dst"], "10.244.0.0/16");
    assert_eq!(r["routes"][1]["dst"], "0.0.0.0/0");
    assert_eq!(r["dns"]["nameservers"][0], "10.96.0.10");

    let addr = c.ip(&["-o", "-4", "addr", "show", "eth0"]).unwrap();
    assert!(addr.contains("10.244.7.2/24"), "{addr}");
    let link = c.ip(&["link", "show", "eth0"]).unwrap();
    assert!(link.contains("mtu 1450") && link.contains(",UP"), "{link}");
    let routes = c.ip(&["route"]).unwrap();
    assert!(
        routes.contains("default via 10.244.7.1 dev eth0"),
        "{routes}"
    );
    assert!(
        routes.contains("10.244.0.0/16 via 10.244.7.1 dev eth0"),
        "{routes}"
    );
    let br = n.host.ip(&["-o", "-4", "addr", "show", "cni0"]).unwrap();
    assert!(br.contains("10.244.7.1/24"), "{br}");
    let hv = r["interfaces"][1]["name"].as_str().unwrap().to_string();
    let port = n.host.ip(&["-d", "link", "show", &hv]).unwrap();
    assert!(
        port.contains("master cni0") && port.contains("hairpin on"),
        "{port}"
    );
    assert!(port.contains("alias tweed/tnet/c1/eth0"), "{port}");
    c.exec(&["ping", "-c1", "-W2", "10.244.7.1"])
        .expect("container reaches its gateway");
    assert_eq!(n.records("tnet"), ["10.244.7.2"]);

    let check = n.tweed("CHECK", "c1", &c.path_str(), &with_prev(&conf, &r));
    assert!(check.ok(), "{}", check.stdout);
    assert!(check.stdout.trim().is_empty());

    // CHECK notices a removed route, then a removed address.
    c.ip(&["route", "del", "default"]).unwrap();
    let check = n.tweed("CHECK", "c1", &c.path_str(), &with_prev(&conf, &r));
    assert_error(&check, 102, "route to 0.0.0.0/0 via 10.244.7.1 is missing");
    c.ip(&[
        "route",
        "add",
        "default",
        "via",
        "10.244.7.1",
        "dev",
        "eth0",
    ])
    .unwrap();
    assert!(n
        .tweed("CHECK", "c1", &c.path_str(), &with_prev(&conf, &r))
        .ok());
    c.ip(&["addr", "del", "10.244.7.2/24", "dev", "eth0"])
        .unwrap();
    let check = n.tweed("CHECK", "c1", &c.path_str(), &with_prev(&conf, &r));
    assert_error(&check, 102, "address 10.244.7.2/24 is missing");

    for _ in 0..2 {
        let del = n.tweed("DEL", "c1", &c.path_str(), &conf);
        assert!(del.ok(), "{}", del.stdout);
        assert!(del.stdout.trim().is_empty());
    }
    assert_eq!(links(&c), ["lo"]);
    assert_eq!(n.host_links(), ["lo", "cni0"]);
    assert!(n.records("tnet").is_empty());
}

#[test]
fn results_in_every_version() {
    require_root!(NEEDS_ROOT);
    let n = node("ver");
    for (i, v) in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
        .iter()
        .enumerate()
    {
        let c = n.container(i);
        let conf = n.conf(v, json!({}));
        let id = format!("v{i}");
        let add = n.tweed("ADD", &id, &c.path_str(), &conf);
        assert!(add.ok(), "{v}: {}", add.stdout);
        let r = add.json();
        assert_eq!(r["cniVersion"], *v);
        let old = *v < "1.0.0";
        assert_eq!(r["ips"][0].get("version").is_some(), old, "{v}: {r}");
        if old {
            assert_eq!(r["ips"][0]["version"], "4");
        }
        assert_eq!(
            r["interfaces"][2].get("mtu").is_some(),
            *v == "1.1.0",
            "{v}: {r}"
        );
        if *v >= "0.4.0" {
            let check = n.tweed("CHECK", &id, &c.path_str(), &with_prev(&conf, &r));
            assert!(check.ok(), "{v}: {}", check.stdout);
        } else {
            // CHECK came with 0.4.0.
            let check = n.tweed("CHECK", &id, &c.path_str(), &with_prev(&conf, &r));
            assert_error(&check, 1, "CHECK needs cniVersion 0.4.0");
        }
        assert!(n.tweed("DEL", &id, &c.path_str(), &conf).ok());
    }
}

#[test]
fn version_and_status() {
    require_root!(NEEDS_ROOT);
    let n = node("st");
    let v = n.tweed("VERSION", "", "", r#"{"cniVersion":"1.0.0"}"#);
    assert!(v.ok());
    let doc = v.json();
    assert_eq!(doc["cniVersion"], "1.0.0");
    assert_eq!(
        doc["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
    let st = n.tweed("STATUS", "", "", &n.conf("1.1.0", json!({})));
    assert!(st.ok(), "{}", st.stdout);
    assert!(st.stdout.trim().is_empty());
    let missing = n.conf(
        "1.1.0",
        json!({"subnetFile": n.dir.path().join("nope.env")}),
    );
    let st = n.tweed("STATUS", "", "", &missing);
    assert_error(&st, 50, "nope.env is missing");
    let st = n.tweed("STATUS", "", "", &n.conf("1.0.0", json!({})));
    assert_error(&st, 1, "STATUS needs cniVersion 1.1.0");
}

#[test]
fn rejections() {
    require_root!(NEEDS_ROOT);
    let n = node("rej");
    let c = n.container(1);
    let ns = c.path_str();
    assert_error(&n.tweed("ADD", "c1", &ns, "{nope"), 6, "not valid JSON");
    assert_error(
        &n.tweed("ADD", "c1", &ns, &n.conf("0.9.9", json!({}))),
        1,
        "cniVersion \"0.9.9\" is not supported",
    );
    let missing = n.conf(
        "1.0.0",
        json!({"subnetFile": n.dir.path().join("gone.env")}),
    );
    assert_error(
        &n.tweed("ADD", "c1", &ns, &missing),
        11,
        "gone.env is missing",
    );
    let mut call = Call::new("ADD", "c1", &ns);
    call.ifname = "";
    let run = n.run(Path::new(TWEED), &call, &n.conf("1.0.0", json!({})));
    assert_error(&run, 4, "CNI_IFNAME");
    let run = n.tweed(
        "ADD",
        "c1",
        "/run/netns/does-not-exist-tweed",
        &n.conf("1.0.0", json!({})),
    );
    assert_error(&run, 3, "does-not-exist-tweed");
    // The plugin's own namespace is not a container's.
    let run = n.tweed("ADD", "c1", &n.host.path_str(), &n.conf("1.0.0", json!({})));
    assert_error(&run, 3, "not a container's");
    assert!(n.records("tnet").is_empty());

    // Exhaustion: a one-address range.
    let one = n.conf(
        "1.0.0",
        json!({"rangeStart": "10.244.7.9", "rangeEnd": "10.244.7.9"}),
    );
    assert!(n.tweed("ADD", "c1", &ns, &one).ok());
    let c2 = n.container(2);
    assert_error(
        &n.tweed("ADD", "c2", &c2.path_str(), &one),
        101,
        "no free address",
    );
    assert_eq!(links(&c2), ["lo"]);
    assert_eq!(n.records("tnet"), ["10.244.7.9"]);

    // An eth0 that is already there is refused, kept, and nothing is left behind.
    c2.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "other",
    ])
    .unwrap();
    let run = n.tweed("ADD", "c2", &c2.path_str(), &n.conf("1.0.0", json!({})));
    assert_error(&run, 100, "eth0 already exists");
    assert_eq!(n.records("tnet"), ["10.244.7.9"]);
    assert!(links(&c2).contains(&"eth0".to_string()));
    assert_eq!(
        n.host_links().len(),
        3,
        "lo, cni0 and c1's veth: {:?}",
        n.host_links()
    );
    assert!(n.tweed("DEL", "c1", &ns, &one).ok());
}

#[test]
fn failed_add_rolls_back_completely() {
    require_root!(NEEDS_ROOT);
    let n = node("rb");
    // A failure after everything is wired: ipMasq on a node without iptables. The pair, the
    // record and the rule go again. (Failures at every other step are unit tests of the
    // command layer, on a fake host.)
    let c = n.container(1);
    let path = c.path_str();
    let call = Call::new("ADD", "c1", &path).env("PATH", "/nonexistent");
    let run = n.run(
        Path::new(TWEED),
        &call,
        &n.conf("1.0.0", json!({"ipMasq": true})),
    );
    assert_error(&run, 5, "running iptables");
    assert_eq!(links(&c), ["lo"], "veth left in the container");
    assert_eq!(n.host_links(), ["lo", "cni0"]);
    assert!(n.records("tnet").is_empty(), "record left");
    // A bad MAC fails before anything exists; the address is given back.
    let c = n.container(2);
    let conf = n.conf(
        "1.0.0",
        json!({"runtimeConfig": {"mac": "01:00:5e:00:00:01"}}),
    );
    let run = n.tweed("ADD", "c2", &c.path_str(), &conf);
    assert!(!run.ok());
    assert!(n.records("tnet").is_empty());
    assert_eq!(links(&c), ["lo"]);
}

#[test]
fn del_without_netns_or_prev_result() {
    require_root!(NEEDS_ROOT);
    let n = node("dv");
    let conf = n.conf("1.0.0", json!({}));
    let c = n.container(1);
    let path = c.path_str();
    assert!(n.tweed("ADD", "c1", &path, &conf).ok());
    assert_eq!(n.records("tnet").len(), 1);
    // The runtime already removed the namespace (and with it the veth pair).
    drop(c);
    let del = n.tweed("DEL", "c1", &path, &conf);
    assert!(del.ok(), "{}", del.stdout);
    assert!(n.records("tnet").is_empty());
    // Empty CNI_NETNS, nothing ever added: still fine.
    assert!(n.tweed("DEL", "c9", "", &conf).ok());
    assert_eq!(n.host_links(), ["lo", "cni0"]);
}

#[test]
fn del_leaves_other_containers_interfaces() {
    require_root!(NEEDS_ROOT);
    let n = node("own");
    let conf = n.conf("1.0.0", json!({}));
    let c = n.container(1);
    assert!(n.tweed("ADD", "a", &c.path_str(), &conf).ok());
    // DEL for another container ID pointing at the same namespace and interface name.
    assert!(n.tweed("DEL", "b", &c.path_str(), &conf).ok());
    assert!(links(&c).contains(&"eth0".to_string()));
    assert_eq!(n.records("tnet").len(), 1);
    // A foreign eth0 (not made by tweed) survives a DEL naming it.
    let f = n.container(2);
    f.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "x0"])
        .unwrap();
    assert!(n.tweed("DEL", "f", &f.path_str(), &conf).ok());
    assert!(links(&f).contains(&"eth0".to_string()));
    assert!(n.tweed("DEL", "a", &c.path_str(), &conf).ok());
    assert_eq!(links(&c), ["lo"]);
}

#[test]
fn gc_releases_what_is_not_valid() {
    require_root!(NEEDS_ROOT);
    let n = node("gc");
    let conf = n.conf("1.1.0", json!({}));
    let cs: Vec<_> = (0..3).map(|i| n.container(i)).collect();
    for (i, c) in cs.iter().enumerate() {
        assert!(n.tweed("ADD", &format!("g{i}"), &c.path_str(), &conf).ok());
    }
    assert_eq!(n.records("tnet").len(), 3);
    let gc_conf = n.conf(
        "1.1.0",
        json!({
            "cni.dev/valid-attachments": [{"containerID": "g0", "ifname": "eth0"}],
            "cni.dev/attachments": [{"containerID": "g1", "ifname": "eth0"}],
        }),
    );
    let gc = n.tweed("GC", "", "", &gc_conf);
    assert!(gc.ok(), "{}", gc.stdout);
    assert_eq!(n.records("tnet"), ["10.244.7.2", "10.244.7.3"]);
    assert_eq!(links(&cs[2]), ["lo"], "g2's veth pair is gone");
    assert!(links(&cs[0]).contains(&"eth0".to_string()));
    assert_eq!(n.host_links().len(), 4, "{:?}", n.host_links());
    assert_error(&n.tweed("GC", "", "", &conf), 7, "valid attachments");
    let empty = n.conf("1.1.0", json!({"cni.dev/valid-attachments": []}));
    assert!(n.tweed("GC", "", "", &empty).ok());
    assert!(n.records("tnet").is_empty());
    assert_eq!(n.host_links(), ["lo", "cni0"]);
}

#[test]
fn leftover_bridge_gets_its_mac_mtu_and_address() {
    require_root!(NEEDS_ROOT);
    let n = node("br");
    // What an interrupted first ADD of another plugin may leave: a bare bridge, kernel MAC.
    n.host
        .ip(&[
            "link",
            "add",
            "cni0",
            "address",
            "02:11:22:33:44:55",
            "type",
            "bridge",
        ])
        .unwrap();
    let c = n.container(1);
    let conf = n.conf("1.0.0", json!({}));
    assert!(n.tweed("ADD", "c1", &c.path_str(), &conf).ok());
    let br = n.host.ip(&["addr", "show", "cni0"]).unwrap();
    assert!(br.contains("0a:58:0a:f4:07:01"), "{br}");
    assert!(
        br.contains("mtu 1450") && br.contains("10.244.7.1/24"),
        "{br}"
    );
    // A device of that name that is no bridge is refused.
    let m = NetnsGuard::new(&format!("{}m", n.prefix)).unwrap();
    m.ip(&["link", "add", "cni0", "type", "veth", "peer", "name", "p"])
        .unwrap();
    let run = cni::run(
        &m,
        Path::new(TWEED),
        &Call::new("ADD", "c2", &n.container(2).path_str()),
        conf.as_bytes(),
    )
    .unwrap();
    assert_error(&run, 100, "not a bridge");
    assert!(n.tweed("DEL", "c1", &c.path_str(), &conf).ok());
}

#[test]
fn requested_addresses_mac_and_chained_prev_result() {
    require_root!(NEEDS_ROOT);
    let n = node("req");
    let c = n.container(1);
    let conf = n.conf(
        "1.0.0",
        json!({"runtimeConfig": {"ips": ["10.244.7.50/24"], "mac": "0a:58:00:00:00:99"}}),
    );
    let add = n.tweed("ADD", "r1", &c.path_str(), &conf);
    assert!(add.ok(), "{}", add.stdout);
    assert_eq!(add.json()["ips"][0]["address"], "10.244.7.50/24");
    assert!(c
        .ip(&["link", "show", "eth0"])
        .unwrap()
        .contains("0a:58:00:00:00:99"));
    // CNI_ARGS IP=, and a prevResult from a plugin before tweed in the chain.
    let c2 = n.container(2);
    let prev = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "lo", "sandbox": c2.path_str()}],
                      "ips": [{"address": "127.0.0.1/8", "interface": 0}]});
    let conf2 = with_prev(&n.conf("1.0.0", json!({})), &prev);
    let p2 = c2.path_str();
    let mut call = Call::new("ADD", "r2", &p2);
    call.args = "IgnoreUnknown=1;K8S_POD_NAME=x;IP=10.244.7.60";
    let add = n.run(Path::new(TWEED), &call, &conf2);
    assert!(add.ok(), "{}", add.stdout);
    let r = add.json();
    assert_eq!(r["interfaces"][0]["name"], "lo");
    assert_eq!(r["ips"][1]["address"], "10.244.7.60/24");
    assert_eq!(r["ips"][1]["interface"], 3);
    // The same address for another container is refused.
    let c3 = n.container(3);
    let p3 = c3.path_str();
    let mut call = Call::new("ADD", "r3", &p3);
    call.args = "IP=10.244.7.60";
    assert_error(
        &n.run(Path::new(TWEED), &call, &n.conf("1.0.0", json!({}))),
        103,
        "held by container r2",
    );
    for (id, ns) in [("r1", c.path_str()), ("r2", c2.path_str())] {
        assert!(n.tweed("DEL", id, &ns, &conf).ok());
    }
    assert!(n.records("tnet").is_empty());
}

#[test]
fn ip_masq_adds_and_removes_its_rule() {
    require_root!(NEEDS_ROOT);
    let n = node("mq");
    if std::process::Command::new("iptables")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: iptables missing (Debian package iptables)");
        return;
    }
    let c = n.container(1);
    let conf = n.conf("1.0.0", json!({"ipMasq": true}));
    let add = n.tweed("ADD", "m1", &c.path_str(), &conf);
    assert!(add.ok(), "{}", add.stdout);
    let rules = n
        .host
        .exec(&["iptables", "-w", "-t", "nat", "-S", "POSTROUTING"])
        .unwrap();
    assert!(
        rules.contains("10.244.7.2/32") && rules.contains("tweed/tnet/m1/eth0"),
        "{rules}"
    );
    assert!(n.tweed("DEL", "m1", &c.path_str(), &conf).ok());
    let rules = n
        .host
        .exec(&["iptables", "-w", "-t", "nat", "-S", "POSTROUTING"])
        .unwrap();
    assert!(!rules.contains("10.244.7.2/32"), "{rules}");
}
