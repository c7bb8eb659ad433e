//! tweed first in a conflist, followed by the reference portmap, bandwidth, firewall and tuning
//! plugins (Debian `containernetworking-plugins`): ADD, CHECK and DEL all succeed, run the way
//! libcni runs a list (each plugin gets the previous result as `prevResult`, DEL in reverse).

mod common;

use std::path::{Path, PathBuf};

use common::{have_reference_plugins, links, node, Node, NEEDS_ROOT, REF_DIR, TWEED};
use serde_json::{json, Map, Value};
use tweed_testkit::cni::Call;
use tweed_testkit::require_root;

fn plugin_path(kind: &str) -> PathBuf {
    if kind == "tweed" {
        PathBuf::from(TWEED)
    } else {
        Path::new(REF_DIR).join(kind)
    }
}

/// libcni's per-plugin config: the list's name and version, the plugin's keys, the
/// runtimeConfig entries its capabilities ask for, and prevResult.
fn plugin_conf(list: &Value, plugin: &Value, runtime: &Value, prev: Option<&Value>) -> String {
    let mut c: Map<String, Value> = plugin.as_object().unwrap().clone();
    c.insert("name".into(), list["name"].clone());
    c.insert("cniVersion".into(), list["cniVersion"].clone());
    if let Some(caps) = plugin.get("capabilities").and_then(Value::as_object) {
        let mut rc = Map::new();
        for (k, on) in caps {
            if on == &Value::Bool(true) {
                if let Some(v) = runtime.get(k) {
                    rc.insert(k.clone(), v.clone());
                }
            }
        }
        if !rc.is_empty() {
            c.insert("runtimeConfig".into(), Value::Object(rc));
        }
    }
    if let Some(p) = prev {
        c.insert("prevResult".into(), p.clone());
    }
    Value::Object(c).to_string()
}

/// A PATH whose `ip6tables` fails. The reference portmap of containernetworking-plugins 1.1.x
/// (Debian 12) fails CHECK on every IPv4-only attachment, whatever plugin comes first, because
/// it looks for IPv6 DNAT rules it never created (upstream issue #819, fixed after 1.1.1); with
/// ip6tables unusable it checks IPv4 only, as the fixed versions do.
fn path_without_ip6tables(n: &Node) -> String {
    let shim = n.dir.path().join("shim");
    std::fs::create_dir_all(&shim).unwrap();
    let f = shim.join("ip6tables");
    std::fs::write(&f, "#!/bin/sh\nexit 1\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
    format!(
        "{}:{}",
        shim.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn run_list(
    n: &Node,
    verb: &str,
    list: &Value,
    runtime: &Value,
    id: &str,
    netns: &str,
    prev: Option<&Value>,
) -> Option<Value> {
    let path = path_without_ip6tables(n);
    let plugins = list["plugins"].as_array().unwrap();
    let order: Vec<&Value> = if verb == "DEL" {
        plugins.iter().rev().collect()
    } else {
        plugins.iter().collect()
    };
    let mut result = prev.cloned();
    for p in order {
        let kind = p["type"].as_str().unwrap();
        let conf = plugin_conf(list, p, runtime, result.as_ref());
        let mut call = Call::new(verb, id, netns);
        if kind == "portmap" && verb == "CHECK" {
            call.extra_env = vec![("PATH".into(), path.clone())];
        }
        let run = n.run(&plugin_path(kind), &call, &conf);
        assert!(
            run.ok(),
            "{verb} {kind} failed: {} {}\nconfig: {conf}",
            run.stdout,
            run.stderr
        );
        if verb == "ADD" {
            result = Some(run.json());
        }
    }
    result
}

#[test]
fn tweed_then_portmap_bandwidth_firewall_tuning() {
    require_root!(NEEDS_ROOT);
    let n = node("ch");
    assert!(
        have_reference_plugins(),
        "reference plugins missing in {REF_DIR}: install the Debian package \
         containernetworking-plugins (and iptables)"
    );
    let c = n.container(1);
    let tweed = n.conf_value("1.0.0", json!({"hairpinMode": true}));
    let list = json!({
        "cniVersion": "1.0.0",
        "name": "tnet",
        "plugins": [
            {"type": "tweed", "subnetFile": tweed["subnetFile"], "dataDir": tweed["dataDir"],
             "hairpinMode": true},
            {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
            {"type": "bandwidth", "capabilities": {"bandwidth": true}},
            {"type": "firewall", "backend": "iptables"},
            {"type": "tuning", "sysctl": {"net.core.somaxconn": "512"}}
        ]
    });
    let runtime = json!({
        "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}],
        "bandwidth": {"ingressRate": 1000000, "ingressBurst": 100000,
                      "egressRate": 1000000, "egressBurst": 100000}
    });
    let ns = c.path_str();
    let result = run_list(&n, "ADD", &list, &runtime, "chain1", &ns, None).unwrap();
    assert_eq!(result["ips"][0]["address"], "10.244.7.2/24");
    let nat = n.host.exec(&["iptables", "-w", "-t", "nat", "-S"]).unwrap();
    assert!(nat.contains("--dport 8080"), "portmap DNAT missing:\n{nat}");
    let filter = n
        .host
        .exec(&["iptables", "-w", "-S", "CNI-FORWARD"])
        .unwrap();
    assert!(
        filter.contains("10.244.7.2"),
        "firewall rule missing:\n{filter}"
    );
    let somaxconn = c.exec(&["cat", "/proc/sys/net/core/somaxconn"]).unwrap();
    assert_eq!(somaxconn.trim(), "512");
    let hv = result["interfaces"][1]["name"].as_str().unwrap();
    let qdisc = n.host.exec(&["tc", "qdisc", "show", "dev", hv]).unwrap();
    assert!(qdisc.contains("tbf"), "bandwidth qdisc missing: {qdisc}");

    run_list(&n, "CHECK", &list, &runtime, "chain1", &ns, Some(&result));
    run_list(&n, "DEL", &list, &runtime, "chain1", &ns, Some(&result));
    assert_eq!(links(&c), ["lo"]);
    assert!(n.records("tnet").is_empty());
    let nat = n.host.exec(&["iptables", "-w", "-t", "nat", "-S"]).unwrap();
    assert!(!nat.contains("--dport 8080"), "portmap rule left:\n{nat}");
    // DEL of the whole list again, as a runtime retrying would: still fine.
    run_list(&n, "DEL", &list, &runtime, "chain1", &ns, Some(&result));
}
