//! Issue 19, item 5: IPv6-only networks (`EnableIPv4: false`) end to end. A lab with
//! `--ip-family v6` (hosts with only an IPv6 underlay address, etcd on the bridge's IPv6
//! address, the network config without any IPv4 key) runs the vxlan and the host-gw backend:
//! every agent's lease is under the IPv6-only key with `PublicIP` 0.0.0.0, a flannel-format reader
//! refuses every key, each host has the routes (and for vxlan the FDB entries) to each peer, no
//! IPv4 device or rule exists, and IPv6 traffic crosses between the hosts' overlay addresses.
//!
//! The lab attaches no pods in an IPv6-only network yet (its pods need an IPv4 subnet), so the
//! backend tests attach one pod per host themselves with the real CNI plugin (IPv6-only, v6cni's)
//! and ping6 between the pods; the lease-loss test pings between a test veth per host holding
//! the first address of the host's IPv6 subnet, sourced from there.

use std::net::Ipv6Addr;
use std::process::Stdio;
use std::time::Duration;

use ipnetwork::Ipv6Network;
use tweed_config::{LeaseAttrs, LeaseKey, SubnetKey};
use tweed_e2e::*;
use tweed_lab::spec::IpFamily;
use tweed_lab::{Backend, Lab, LabGuard, LabSpec};

const HOSTS: usize = 3;
const SUBNETS: &str = "/coreos.com/network/subnets/";
/// The device each test host gets to hold its subnet's first address (a pod gateway's place).
const PROBE_DEV: &str = "tv6probe";
const PROBE_PEER: &str = "tv6probe-p";

fn v6_lab(tag: &str, backend: Backend) -> LabGuard {
    let mut spec = LabSpec::new(per_process(tag), HOSTS);
    spec.backend = backend;
    spec.pods_per_host = 0;
    spec.ip_family = IpFamily::V6;
    up(spec)
}

/// subnet.env's `TWEED_IPV6_SUBNET` (the subnet's first address with its length).
fn subnet_env(lab: &Lab, host: &str) -> String {
    std::fs::read_to_string(host_state(lab, host).subnet_file).expect("subnet.env")
}

fn subnet6_of(lab: &Lab, host: &str) -> (Ipv6Network, Ipv6Addr) {
    let env = subnet_env(lab, host);
    let first: Ipv6Network = env
        .lines()
        .find_map(|l| l.strip_prefix("TWEED_IPV6_SUBNET="))
        .unwrap_or_else(|| panic!("{host}: no TWEED_IPV6_SUBNET in {env}"))
        .parse()
        .unwrap();
    (
        Ipv6Network::new(first.network(), first.prefix()).unwrap(),
        first.ip(),
    )
}

/// The lease listing as (key after `subnets/`, value) pairs.
fn leases(lab: &Lab) -> Vec<(String, String)> {
    let out = etcdctl(lab, &["get", "--prefix", SUBNETS]);
    let lines: Vec<&str> = out.lines().collect();
    lines
        .chunks(2)
        .map(|kv| {
            (
                kv[0].strip_prefix(SUBNETS).unwrap().to_string(),
                kv.get(1).unwrap_or(&"").to_string(),
            )
        })
        .collect()
}

/// What every IPv6-only lab must show, whatever the backend.
fn assert_ipv6_only_lab(lab: &Lab, backend: &str) {
    let hosts: Vec<_> = lab.state().hosts.clone();
    let listing = leases(lab);
    assert_eq!(listing.len(), HOSTS, "{listing:?}");
    for h in &hosts {
        let ip6 = h.public_ip6.expect("an IPv6 underlay address");
        // An IPv6-only underlay: the host has no IPv4 address outside loopback.
        let v4 = in_ns(
            &h.netns,
            &["ip", "-4", "-o", "addr", "show", "scope", "global"],
        );
        assert!(v4.trim().is_empty(), "{}: {v4}", h.name);
        let (subnet, first) = subnet6_of(lab, &h.name);
        let env = subnet_env(lab, &h.name);
        for absent in ["TWEED_NETWORK=", "TWEED_SUBNET="] {
            assert!(!env.contains(absent), "{}: {env}", h.name);
        }
        assert!(env.contains("TWEED_IPV6_NETWORK=fd00:10:244::/56"), "{env}");
        assert!(
            env.contains("TWEED_IPMASQ=true") && env.contains("TWEED_MTU="),
            "{env}"
        );
        assert_eq!(u128::from(first), u128::from(subnet.network()) + 1);
        // The file's reader (the CNI plugin's, the lab's) takes it as IPv6 only.
        let parsed = tweed_config::SubnetEnv::read(&h.subnet_file).unwrap();
        assert!(parsed.ipv4.is_none(), "{parsed:?}");
        assert_eq!(parsed.ipv6.map(|v6| v6.node_subnet()), Some(subnet));
        // Its lease: the IPv6-only key, the value with PublicIP 0.0.0.0.
        let key = format!("{}-{}", subnet.network(), subnet.prefix());
        let value = &listing
            .iter()
            .find(|(k, _)| *k == key)
            .unwrap_or_else(|| panic!("{}: no lease {key} in {listing:?}", h.name))
            .1;
        assert!(
            matches!(key.parse::<LeaseKey>(), Ok(LeaseKey::Ipv6Only(k)) if k.ipv6 == subnet),
            "{key}"
        );
        // A flannel-format reader (tweed's SubnetKey, as an IPv4 or dual node's watch) skips it.
        let refused = key.parse::<SubnetKey>().unwrap_err().to_string();
        assert!(refused.contains("IPv6-only lease"), "{refused}");
        let attrs = LeaseAttrs::parse(value.as_bytes()).unwrap();
        assert_eq!(attrs.public_ip.to_string(), "0.0.0.0", "{value}");
        assert_eq!(attrs.public_ipv6, Some(ip6), "{value}");
        assert_eq!(attrs.backend_type, backend, "{value}");
        assert_eq!(
            attrs.backend_v6_data.is_some(),
            backend == "vxlan",
            "{value}"
        );
        assert!(attrs.backend_data.is_none(), "{value}");
        // IPv6 rules only.
        in_ns(&h.netns, &["ip6tables", "-S", "TWEED-FWD"]);
        in_ns(&h.netns, &["ip6tables", "-t", "nat", "-S", "TWEED-POSTRTG"]);
        assert!(
            !ok_in(&h.netns, &["iptables", "-S", "TWEED-FWD"]),
            "{}",
            h.name
        );
        assert!(
            !ok_in(&h.netns, &["ip", "link", "show", "tweed.1"]),
            "{}",
            h.name
        );
        // The status says so.
        let status = in_ns(
            &h.netns,
            &[
                "curl",
                "-s",
                &format!("http://[{ip6}]:{}/readyz", tweed_lab::names::METRICS_PORT),
            ],
        );
        assert!(status.contains(r#""ready":true"#), "{}: {status}", h.name);
    }
}

/// Each host's route (vxlan: and FDB entry) to each peer.
fn assert_routes_to_every_peer(lab: &Lab, backend: &str) {
    let hosts: Vec<_> = lab.state().hosts.clone();
    for h in &hosts {
        let routes = in_ns(&h.netns, &["ip", "-6", "route", "show"]);
        let fdb = if backend == "vxlan" {
            in_ns(&h.netns, &["bridge", "fdb", "show", "dev", "tweed-v6.1"])
        } else {
            String::new()
        };
        for p in hosts.iter().filter(|p| p.name != h.name) {
            let (subnet, _) = subnet6_of(lab, &p.name);
            let ip6 = p.public_ip6.unwrap();
            let want = match backend {
                "vxlan" => format!("{subnet} via {} dev tweed-v6.1", subnet.network()),
                _ => format!("{subnet} via {ip6} dev eth0"),
            };
            assert!(
                routes.lines().any(|l| l.starts_with(&want)),
                "{} -> {}: no `{want}` in\n{routes}",
                h.name,
                p.name
            );
            if backend == "vxlan" {
                assert!(
                    fdb.contains(&format!("dst {ip6} self permanent")),
                    "{} -> {}: {fdb}",
                    h.name,
                    p.name
                );
            }
        }
    }
}

/// Every ordered pair of hosts: ping6 from the first address of one host's subnet to the
/// other's (both on a test veth, as a pod gateway would hold them).
fn assert_traffic_crosses(lab: &Lab) {
    let hosts: Vec<_> = lab.state().hosts.clone();
    for h in &hosts {
        let (subnet, first) = subnet6_of(lab, &h.name);
        // A veth pair (no dummy module needed), both ends up so the address has a carrier.
        in_ns(
            &h.netns,
            &[
                "ip", "link", "add", PROBE_DEV, "type", "veth", "peer", "name", PROBE_PEER,
            ],
        );
        in_ns(&h.netns, &["ip", "link", "set", PROBE_PEER, "up"]);
        in_ns(
            &h.netns,
            &[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{first}/{}", subnet.prefix()),
                "dev",
                PROBE_DEV,
                "nodad",
            ],
        );
        in_ns(&h.netns, &["ip", "link", "set", PROBE_DEV, "up"]);
    }
    for h in &hosts {
        let (_, from) = subnet6_of(lab, &h.name);
        for p in hosts.iter().filter(|p| p.name != h.name) {
            let (_, to) = subnet6_of(lab, &p.name);
            let out = in_ns(
                &h.netns,
                &[
                    "ping",
                    "-6",
                    "-c",
                    "3",
                    "-i",
                    "0.2",
                    "-W",
                    "2",
                    "-I",
                    &from.to_string(),
                    &to.to_string(),
                ],
            );
            assert_eq!(
                ping_summary(&out),
                (3, 3),
                "{} -> {}: {out}",
                h.name,
                p.name
            );
        }
    }
}

/// One pod per host attached by the real CNI plugin (the lab attaches none in an IPv6-only
/// network): a namespace named like the lab's pods (so `down` deletes it), ADD with the host's
/// conflist; its address read from the plugin's result. Then ping6 between every pair of pods
/// on different hosts.
fn assert_pods_reach_each_other(lab: &Lab) {
    let plugin = lab
        .state()
        .cni_plugin
        .clone()
        .expect("the lab's CNI plugin");
    let cni_path = plugin.parent().unwrap().to_path_buf();
    let mut pods: Vec<(String, String, Ipv6Addr)> = Vec::new();
    for h in lab.state().hosts.clone() {
        let pod_ns = format!("{}-p1", h.netns);
        ip(&["netns", "add", &pod_ns]);
        let conf = tweed_lab::cni::read_plugin_conf(h.cni_conf.as_ref().expect("conflist"))
            .expect("plugin conf");
        let result = tweed_lab::cni::cni_add_result(&tweed_lab::cni::CniCall {
            plugin: &plugin,
            cni_path: &cni_path,
            host_ns: &h.netns,
            container_id: &pod_ns,
            pod_ns: &pod_ns,
            conf: &conf,
        })
        .unwrap_or_else(|e| panic!("{}: CNI ADD: {e}", h.name));
        let v: serde_json::Value = serde_json::from_str(&result).unwrap();
        let addrs: Vec<Ipv6Network> = v["ips"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["address"].as_str().unwrap().parse().unwrap())
            .collect();
        assert_eq!(
            addrs.len(),
            1,
            "{}: one IPv6 address, no IPv4: {result}",
            h.name
        );
        let (subnet, _) = subnet6_of(lab, &h.name);
        assert!(subnet.contains(addrs[0].ip()), "{}: {result}", h.name);
        let v4 = in_ns(
            &pod_ns,
            &["ip", "-4", "-o", "addr", "show", "scope", "global"],
        );
        assert!(v4.trim().is_empty(), "{}'s pod: {v4}", h.name);
        pods.push((h.name.clone(), pod_ns, addrs[0].ip()));
    }
    for (from_host, from_ns, _) in &pods {
        for (to_host, _, to) in pods.iter().filter(|p| &p.0 != from_host) {
            let out = in_ns(
                from_ns,
                &[
                    "ping",
                    "-6",
                    "-c",
                    "3",
                    "-i",
                    "0.2",
                    "-W",
                    "2",
                    &to.to_string(),
                ],
            );
            assert_eq!(
                ping_summary(&out),
                (3, 3),
                "{from_host}'s pod -> {to_host}'s pod: {out}"
            );
        }
    }
}

/// Runs tweedd in `host`'s namespace under its own etcd prefix holding `config`, with `extra`
/// flags, and returns what it printed once it exited (it must, within 20 s).
fn agent_refusing(lab: &Lab, host: &str, tag: &str, config: &str, extra: &[&str]) -> String {
    let prefix = format!("/tweed-test/{tag}");
    etcdctl(lab, &["put", &format!("{prefix}/config"), config]);
    let argv = agent_cmdline(lab, host);
    let dir = host_state(lab, host)
        .log
        .with_file_name(format!("refuse-{tag}"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut args: Vec<String> = vec![
        argv[0].clone(),
        "--etcd-endpoints".into(),
        flag_value(&argv, "--etcd-endpoints").unwrap().to_string(),
        "--etcd-prefix".into(),
        prefix,
        "--subnet-file".into(),
        dir.join("subnet.env").display().to_string(),
        "--state-dir".into(),
        dir.join("lib").display().to_string(),
        "--api-socket".into(),
        dir.join("api.sock").display().to_string(),
        "--metrics-addr".into(),
        "off".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = ns_command(&host_state(lab, host).netns, &["timeout", "20"])
        .args(&argv)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tweedd");
    let status = child.wait().expect("wait");
    let mut out = String::new();
    use std::io::Read;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(
        !status.success() && status.code() != Some(124),
        "tweedd should have refused to start (exit {status}): {out}"
    );
    out
}

#[test]
fn vxlan_ipv6_only_lab_programs_every_peer_and_carries_ipv6() {
    require_root!(NEEDS_ROOT);
    let lab = v6_lab("v6o-vx", Backend::Vxlan);
    assert_ipv6_only_lab(&lab, "vxlan");
    assert_routes_to_every_peer(&lab, "vxlan");
    assert_pods_reach_each_other(&lab);

    // Refused at start, naming why: a backend that needs an IPv4 underlay, and a node without
    // a usable IPv6 address (its underlay interface is `lo`, whose only address is ::1).
    for ty in ["udp", "wireguard"] {
        let out = agent_refusing(
            &lab,
            "h1",
            &format!("be-{ty}"),
            &format!(
                r#"{{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:77::/56","Backend":{{"Type":"{ty}"}}}}"#
            ),
            &[],
        );
        assert!(
            out.contains("Backend.Type") && out.contains(ty),
            "{ty}: {out}"
        );
    }
    let out = agent_refusing(
        &lab,
        "h1",
        "no-v6",
        r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:77::/56","Backend":{"Type":"vxlan"}}"#,
        &["--iface", "lo"],
    );
    assert!(
        out.contains("no usable global IPv6 address") && out.contains("lo"),
        "{out}"
    );
}

#[test]
fn host_gw_ipv6_only_lab_programs_every_peer_and_carries_ipv6() {
    require_root!(NEEDS_ROOT);
    let lab = v6_lab("v6o-hg", Backend::HostGw);
    assert_ipv6_only_lab(&lab, "host-gw");
    assert_routes_to_every_peer(&lab, "host-gw");
    assert_pods_reach_each_other(&lab);
}

#[test]
fn a_lost_ipv6_only_lease_is_taken_again_and_peers_follow() {
    require_root!(NEEDS_ROOT);
    let lab = v6_lab("v6o-re", Backend::Vxlan);
    let (subnet, _) = subnet6_of(&lab, "h2");
    let key = format!("{SUBNETS}{}-{}", subnet.network(), subnet.prefix());
    // Someone deletes h2's key: h2 takes the same subnet back (its subnet.env asks for it), and
    // the others keep (or put back) their route to it.
    etcdctl(&lab, &["del", &key]);
    wait_for(Duration::from_secs(20), "h2's key back", || {
        leases(&lab)
            .iter()
            .any(|(k, _)| format!("{SUBNETS}{k}") == key)
    });
    assert_eq!(subnet6_of(&lab, "h2").0, subnet);
    wait_for(Duration::from_secs(20), "h1's route to h2 back", || {
        in_ns(
            &host_state(&lab, "h1").netns,
            &["ip", "-6", "route", "show"],
        )
        .contains(&format!("{subnet} via"))
    });
    assert_routes_to_every_peer(&lab, "vxlan");
    assert_traffic_crosses(&lab);
}
