//! Issue 19, item 5: IPv6-only networks (`EnableIPv4: false`) end to end. A lab with
//! `--ip-family v6` (hosts with only an IPv6 underlay address, etcd on the bridge's IPv6
//! address, the network config without any IPv4 key) runs the vxlan and the host-gw backend:
//! every agent's lease is under the IPv6-only key with `PublicIP` 0.0.0.0, a flannel-format reader
//! refuses every key, each host has the routes (and for vxlan the FDB entries) to each peer, no
//! IPv4 device or rule exists, and IPv6 traffic crosses between the hosts' pods.
//!
//! The lab attaches its default pods (two per host) there too: through the real CNI plugin in
//! the backend tests (each pod only an IPv6 address, recorded without any IPv4 key in
//! state.json), as tweedctl containers in the runtime test, wired by the lab itself in the
//! lease-loss test; `check` pings every pod on the other hosts over IPv6 and must pass.

use std::net::{IpAddr, Ipv6Addr};
use std::process::Stdio;
use std::time::Duration;

use ipnetwork::Ipv6Network;
use tweed_config::{LeaseAttrs, LeaseKey, SubnetKey};
use tweed_e2e::*;
use tweed_lab::spec::IpFamily;
use tweed_lab::{Backend, Lab, LabGuard, LabSpec, PodsVia};

const HOSTS: usize = 3;
const SUBNETS: &str = "/coreos.com/network/subnets/";

/// An IPv6-only lab with the default number of pods, attached `via`.
fn v6_lab(tag: &str, backend: Backend, via: PodsVia) -> LabGuard {
    let mut spec = LabSpec::new(per_process(tag), HOSTS);
    spec.backend = backend;
    spec.pods_via = via;
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
            backend == "vxlan" || backend == "wireguard",
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
        assert_api_lists(h, subnet, ip6, backend);
    }
}

/// `tweedctl net <args> -o json` against the host's agent, parsed.
fn tweedctl_net(h: &tweed_lab::state::HostState, args: &[&str]) -> serde_json::Value {
    let exe = std::env::current_exe().unwrap();
    let tweedctl = exe.parent().unwrap().parent().unwrap().join("tweedctl");
    let sock = h.log.with_file_name("tweedd.sock");
    let out = std::process::Command::new(tweedctl)
        .args(["net", "--socket", sock.to_str().unwrap()])
        .args(args)
        .args(["--output", "json"])
        .output()
        .expect("run tweedctl");
    assert!(
        out.status.success(),
        "{}: tweedctl net {args:?}: {}",
        h.name,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{}: tweedctl net {args:?}: {e}: {}",
            h.name,
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `tweedctl net leases` and `peers` on an IPv6-only node: every host's lease (ours marked),
/// with its IPv6 subnet and PublicIPv6, and every other host as a programmed peer.
fn assert_api_lists(
    h: &tweed_lab::state::HostState,
    subnet: Ipv6Network,
    ip6: Ipv6Addr,
    backend: &str,
) {
    // The last host up may not be programmed on the others yet.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tweedctl_net(h, &["peers"])
        .as_array()
        .is_none_or(|p| p.len() != HOSTS - 1 || p.iter().any(|p| p["programmed"] != true))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let leases = tweedctl_net(h, &["leases"]);
    let leases = leases.as_array().expect("a JSON list");
    assert_eq!(leases.len(), HOSTS, "{}: {leases:?}", h.name);
    let own: Vec<_> = leases.iter().filter(|l| l["own"] == true).collect();
    assert_eq!(own.len(), 1, "{}: {leases:?}", h.name);
    assert_eq!(own[0]["subnet"], subnet.to_string(), "{}", h.name);
    assert_eq!(own[0]["public_ip"], ip6.to_string(), "{}", h.name);
    assert!(
        leases.iter().all(|l| l["backend_type"] == backend
            && l["subnet"]
                .as_str()
                .is_some_and(|s| s.parse::<Ipv6Network>().is_ok())),
        "{}: {leases:?}",
        h.name
    );
    let peers = tweedctl_net(h, &["peers"]);
    let peers = peers.as_array().expect("a JSON list");
    assert_eq!(peers.len(), HOSTS - 1, "{}: {peers:?}", h.name);
    for p in peers {
        assert_ne!(p["subnet"], subnet.to_string(), "{}: {peers:?}", h.name);
        assert_eq!(p["programmed"], true, "{}: {p}", h.name);
        assert!(
            leases
                .iter()
                .any(|l| l["subnet"] == p["subnet"] && l["public_ip"] == p["public_ip"]),
            "{}: peer {p} not among the leases",
            h.name
        );
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

/// The lab's pods: each has only an IPv6 address, in its host's subnet (and, attached by the
/// plugin, the plugin's IPAM record of it); state.json records it without an `ip` key, status
/// shows `ip` null; and `check` pings every pod on the other hosts over IPv6, all passing.
fn assert_pods_reach_each_other(lab: &Lab, via: PodsVia) {
    let pods_per_host = LabSpec::new("x", 1).pods_per_host;
    assert!(pods_per_host > 0);
    let hosts: Vec<_> = lab.state().hosts.clone();
    let saved: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(lab.dir().join("state.json")).expect("state.json"),
    )
    .unwrap();
    let status = lab.status();
    for (i, h) in hosts.iter().enumerate() {
        assert_eq!(h.pods.len(), pods_per_host, "{}: {:?}", h.name, h.pods);
        let (subnet, _) = subnet6_of(lab, &h.name);
        for (j, p) in h.pods.iter().enumerate() {
            let ip6 = p
                .ip6
                .unwrap_or_else(|| panic!("{}/{}: no IPv6", h.name, p.name));
            assert_eq!(p.ip, None, "{}/{}", h.name, p.name);
            assert!(
                subnet.contains(ip6),
                "{}/{}: {ip6} not in {subnet}",
                h.name,
                p.name
            );
            let v4 = in_ns(
                &p.netns,
                &["ip", "-4", "-o", "addr", "show", "scope", "global"],
            );
            assert!(v4.trim().is_empty(), "{}/{}: {v4}", h.name, p.name);
            let addrs = in_ns(&p.netns, &["ip", "-6", "-o", "addr", "show", "dev", "eth0"]);
            assert!(
                addrs.contains(&format!("{ip6}/{}", subnet.prefix())),
                "{addrs}"
            );
            if via.uses_plugin() {
                let record = h.agent_state_dir.parent().unwrap().join("ipam/tweed");
                assert!(
                    record.join(ip6.to_string()).is_file(),
                    "{}/{}: no IPAM record {ip6} in {}",
                    h.name,
                    p.name,
                    record.display()
                );
            }
            let rec = &saved["hosts"][i]["pods"][j];
            assert!(rec.get("ip").is_none(), "state.json: {rec}");
            assert_eq!(rec["ip6"], ip6.to_string(), "state.json: {rec}");
            assert_eq!(
                p.container_id.is_some(),
                via == PodsVia::Runtime,
                "{}/{}",
                h.name,
                p.name
            );
            let st = &status.hosts[i].pods[j];
            assert_eq!(
                (st.ip.as_deref(), st.ip6.clone()),
                (None, Some(ip6.to_string())),
                "status: {st:?}"
            );
        }
    }
    let report = lab.check_until(Duration::from_secs(30)).expect("check");
    let failures: Vec<_> = report.failures().collect();
    assert!(failures.is_empty(), "{}: {failures:?}", report.summary());
    let pods = HOSTS * pods_per_host;
    assert_eq!(report.results.len(), pods * (pods - pods_per_host));
    assert!(
        report
            .results
            .iter()
            .all(|r| matches!(r.to_ip, IpAddr::V6(_))),
        "{:?}",
        report.results
    );
    assert_eq!(
        report.summary(),
        format!("{} passed, 0 failed", report.results.len())
    );
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
    let lab = v6_lab("v6o-vx", Backend::Vxlan, PodsVia::Cni);
    assert_ipv6_only_lab(&lab, "vxlan");
    assert_routes_to_every_peer(&lab, "vxlan");
    assert_pods_reach_each_other(&lab, PodsVia::Cni);

    // Refused at start, naming why: a backend that needs an IPv4 underlay, and a node without
    // a usable IPv6 address (its underlay interface is `lo`, whose only address is ::1).
    let out = agent_refusing(
        &lab,
        "h1",
        "be-udp",
        r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:77::/56","Backend":{"Type":"udp"}}"#,
        &[],
    );
    assert!(out.contains("Backend.Type") && out.contains("udp"), "{out}");
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
    // --iface-regex and --iface-can-reach choose the IPv6 underlay, as for IPv4 (the choice
    // itself: v6only::tests); loopback never matches a regex, so `^lo$` matches nothing.
    let v6_vxlan = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:77::/56","Backend":{"Type":"vxlan"}}"#;
    let out = agent_refusing(&lab, "h1", "re-lo", v6_vxlan, &["--iface-regex", "^lo$"]);
    assert!(out.contains("tried, in order: --iface-regex ^lo$"), "{out}");
    // Nothing matching is refused, naming what was tried (a --iface-can-reach address would
    // match: the lab's hosts have an IPv6 default route).
    let out = agent_refusing(
        &lab,
        "h1",
        "re-none",
        v6_vxlan,
        &["--iface-regex", "^nomatch$"],
    );
    assert!(
        out.contains("tried, in order: --iface-regex ^nomatch$"),
        "{out}"
    );
    let out = agent_refusing(
        &lab,
        "h1",
        "reach-v4",
        v6_vxlan,
        &["--iface-can-reach", "198.18.0.254"],
    );
    assert!(
        out.contains("--iface-can-reach 198.18.0.254") && out.contains("no IPv4 routes"),
        "{out}"
    );
}

#[test]
fn host_gw_ipv6_only_lab_programs_every_peer_and_carries_ipv6() {
    require_root!(NEEDS_ROOT);
    let lab = v6_lab("v6o-hg", Backend::HostGw, PodsVia::Cni);
    assert_ipv6_only_lab(&lab, "host-gw");
    assert_routes_to_every_peer(&lab, "host-gw");
    assert_pods_reach_each_other(&lab, PodsVia::Cni);
}

#[test]
fn tweedctl_containers_in_an_ipv6_only_lab_reach_each_other() {
    require_root!(NEEDS_ROOT);
    let lab = v6_lab("v6o-rt", Backend::HostGw, PodsVia::Runtime);
    assert_pods_reach_each_other(&lab, PodsVia::Runtime);
}

#[test]
fn a_lost_ipv6_only_lease_is_taken_again_and_peers_follow() {
    require_root!(NEEDS_ROOT);
    // Pods wired by the lab itself: the lab's own IPv6-only path, no plugin involved.
    let lab = v6_lab("v6o-re", Backend::Vxlan, PodsVia::Direct);
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
    // Every peer's, not h1's alone: each follows on its own event (or resync).
    wait_for(
        Duration::from_secs(20),
        "h1's and h3's route to h2 back",
        || {
            ["h1", "h3"].iter().all(|h| {
                in_ns(&host_state(&lab, h).netns, &["ip", "-6", "route", "show"])
                    .contains(&format!("{subnet} via"))
            })
        },
    );
    assert_routes_to_every_peer(&lab, "vxlan");
    assert_pods_reach_each_other(&lab, PodsVia::Direct);
}

/// Longer than the IPv6-only loop's resync (10 s): every agent listed and programmed again.
const RESYNC_AND_A_BIT: Duration = Duration::from_secs(11);

/// `from` pings `dst` 5 times with the marker as payload; all must come back.
fn ping6_marked(lab: &Lab, from: &str, dst: &str) {
    let out = lab
        .exec(
            from,
            &[
                "ping", "-6", "-c", "5", "-i", "0.2", "-W", "2", "-p", MARKER_HEX, dst,
            ],
        )
        .unwrap_or_else(|e| panic!("ping6 {dst}: {e}"));
    assert_eq!(ping_summary(&out), (5, 5), "{out}");
}

/// wireguard in an IPv6-only network, on the userspace path (this host has no kernel module;
/// `--wireguard-impl auto`): each lease carries `BackendV6Data {"PublicKey","Port"}` with the
/// node's key and `ListenPortV6` (Mode left out: `separate`), `tweed-wg` holds the subnet's
/// /128 and the `IPv6Network` route and no IPv4 address, one IPv6-only socket on
/// `[::]:51821`; every pod reaches every pod on the other hosts over IPv6, the underlay
/// carries only WireGuard datagrams (the payload never in clear, and in clear inside the
/// pod); a restarted agent changes no address or route and its pods are reached again; Mode
/// `ipv4` and `--wireguard-impl kernel` are refused at start, naming the field or flag.
#[test]
fn wireguard_ipv6_only_lab_reaches_every_peer_encrypted_over_the_ipv6_underlay() {
    require_root!(NEEDS_ROOT);
    let lab = v6_lab("v6o-wg", Backend::Wireguard, PodsVia::Cni);
    assert_ipv6_only_lab(&lab, "wireguard");
    assert_pods_reach_each_other(&lab, PodsVia::Cni);
    let hosts: Vec<_> = lab.state().hosts.clone();
    let listing = leases(&lab);
    let mut keys = std::collections::BTreeMap::new();
    for h in &hosts {
        let (subnet, _) = subnet6_of(&lab, &h.name);
        let out = std::process::Command::new("wg")
            .arg("pubkey")
            .stdin(std::fs::File::open(h.agent_state_dir.join("wgkey")).expect("the key file"))
            .output()
            .expect("wg pubkey");
        let public = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert_eq!(public.len(), 44, "{}: {public}", h.name);
        keys.insert(subnet.to_string(), public.clone());
        let value = &listing
            .iter()
            .find(|(k, _)| *k == format!("{}-{}", subnet.network(), subnet.prefix()))
            .expect("our lease")
            .1;
        let v: serde_json::Value = serde_json::from_str(value).unwrap();
        assert_eq!(
            v["BackendV6Data"],
            serde_json::json!({"PublicKey": public, "Port": 51821}),
            "{}",
            h.name
        );
        let link = in_ns(&h.netns, &["ip", "-d", "link", "show", "tweed-wg"]);
        assert!(link.contains("tun") && link.contains("mtu 1420"), "{link}");
        let v4 = in_ns(&h.netns, &["ip", "-4", "addr", "show", "dev", "tweed-wg"]);
        assert!(v4.trim().is_empty(), "{}: {v4}", h.name);
        let addr = in_ns(&h.netns, &["ip", "-6", "addr", "show", "dev", "tweed-wg"]);
        let own = format!("{}/128", subnet.network());
        assert!(addr.contains(&own), "{}: no {own} in {addr}", h.name);
        let r6 = in_ns(&h.netns, &["ip", "-6", "route", "show", "dev", "tweed-wg"]);
        assert!(r6.contains("fd00:10:244::/56"), "{}: {r6}", h.name);
        let socks = in_ns(&h.netns, &["ss", "-Huln", "sport", "= :51821"]);
        assert!(
            socks.lines().count() >= 1 && socks.lines().all(|l| l.contains("[::]:51821")),
            "{}: {socks}",
            h.name
        );
    }

    // `tweedctl net peers`: each peer with its lease's key on tweed-wg and a handshake (the
    // figures are taken at each listing: within a resync of `check`'s pings).
    for h in &hosts {
        wait_for(
            Duration::from_secs(15),
            &format!(
                "{}: every peer's key and handshake in tweedctl net peers",
                h.name
            ),
            || {
                let peers = tweedctl_net(h, &["peers"]);
                peers.as_array().is_some_and(|l| {
                    l.len() == HOSTS - 1
                        && l.iter().all(|p| {
                            p["device"] == "tweed-wg"
                                && p["subnet"].as_str().and_then(|s| keys.get(s))
                                    == p["public_key"].as_str().map(String::from).as_ref()
                                && p["handshake_age_seconds"].as_i64().is_some_and(|a| a >= 0)
                        })
                })
            },
        );
    }

    // The underlay: WireGuard datagrams over IPv6 to 51821 only, never the payload in clear
    // (and the marker is there inside the destination pod, so the capture would have seen it).
    let dst = hosts[1].pods[0].ip6.expect("pod IPv6").to_string();
    let mut wg = Vec::new();
    let cap = capture_while(&lab, "underlay", "udp or icmp6", || {
        wg = capture_while(&lab, "underlay", "ip6 and udp dst port 51821", || {
            ping6_marked(&lab, "h1/p1", &dst)
        });
    });
    assert!(cap.len() > 200, "empty capture on the underlay");
    assert_eq!(
        count(&cap, MARKER),
        0,
        "pod payload in clear on the underlay"
    );
    assert!(wg.len() > 200, "no WireGuard datagram over IPv6 to 51821");
    let in_pod = capture_while(&lab, "h2/p1", "icmp6", || ping6_marked(&lab, "h1/p1", &dst));
    assert!(
        count(&in_pod, MARKER) >= 5,
        "the control capture missed the marker"
    );

    // Hostile leases: two that validation refuses (a key that is no key, a dual-stack
    // PublicIP under an IPv6-only key), logged by key; two that pass it but that the device's
    // plan must leave out (h2's key under another subnet and PublicIPv6, one of them without
    // Port, which means our own port), logged as left out. Had the plan programmed either, it
    // would be a new entry, which counts and logs as a device update. h2's pods stay reached,
    // and an unchanged listing (the 10 s resync included) writes nothing.
    let h1_log = || std::fs::read_to_string(&hosts[0].log).unwrap();
    let updates = |log: &str| {
        log.matches("wireguard device updated").count() + log.matches("peers updated").count()
    };
    let before = updates(&h1_log());
    let (h2_subnet, _) = subnet6_of(&lab, "h2");
    let good = leases(&lab)
        .into_iter()
        .find(|(k, _)| *k == format!("{}-{}", h2_subnet.network(), h2_subnet.prefix()))
        .unwrap()
        .1;
    let v: serde_json::Value = serde_json::from_str(&good).unwrap();
    let h2_key = v["BackendV6Data"]["PublicKey"]
        .as_str()
        .unwrap()
        .to_string();
    let refused = [
        ("fd00:10:244:f0::-64", good.replace(&h2_key, "AAEC")),
        ("fd00:10:244:f2::-64", good.replace("0.0.0.0", "198.18.0.9")),
    ];
    let left_out = [
        ("fd00:10:244:f1::-64", good.replace(",\"Port\":51821", "")),
        ("fd00:10:244:f3::-64", good.clone()),
    ];
    let hostile: Vec<_> = refused.iter().chain(&left_out).collect();
    // h1's figure for h2's entry: taken at each listing only, so a new figure after traffic
    // means a listing ran after that traffic.
    let h2_tx = || {
        tweedctl_net(&hosts[0], &["peers"])
            .as_array()
            .and_then(|l| {
                l.iter()
                    .find(|p| p["subnet"] == h2_subnet.to_string())
                    .and_then(|p| p["tx_bytes"].as_u64())
            })
            .unwrap_or(0)
    };
    for (k, v) in &hostile {
        let v = v.replace("fd00:198:18::2", "fd00:198:18::99");
        etcdctl(&lab, &["put", &format!("{SUBNETS}{k}"), &v]);
    }
    wait_for(
        Duration::from_secs(15),
        "h1 skipping the refused leases and leaving out the others",
        || {
            let log = h1_log();
            refused.iter().all(|(k, _)| {
                log.lines()
                    .any(|l| l.contains("skipping a lease") && l.contains(k))
            }) && left_out.iter().all(|(k, _)| {
                let subnet = k.replace('-', "/");
                log.lines()
                    .any(|l| l.contains("peer left out") && l.contains(&subnet))
            })
        },
    );
    // Past the listings the puts set off (they coalesce within 250 ms), traffic, then wait
    // for a listing after it: only the resync lists then.
    std::thread::sleep(Duration::from_secs(1));
    let tx = h2_tx();
    ping6_marked(&lab, "h1/p1", &dst);
    wait_for(
        RESYNC_AND_A_BIT + Duration::from_secs(10),
        "a resync listing on h1 (h2's figures refreshed)",
        || h2_tx() > tx,
    );
    assert_eq!(
        updates(&h1_log()),
        before,
        "h1 wrote for an unchanged set of peers"
    );
    ping6_marked(&lab, "h1/p1", &dst);
    for (k, _) in &hostile {
        etcdctl(&lab, &["del", &format!("{SUBNETS}{k}")]);
    }

    // A restart: the device, its address and route are right, so nothing changes there.
    let logged = std::fs::metadata(&hosts[1].log).map_or(0, |m| m.len() as usize);
    let (stopped, events) = restart_watching_addresses_and_routes(&lab, "h2");
    assert_eq!(events.trim(), "", "address or route changes at a restart");
    let h1p1 = hosts[0].pods[0].netns.clone();
    wait_for(
        Duration::from_secs(15),
        "h1/p1 ping6 to h2/p1 after h2's restart",
        || ok_in(&h1p1, &["ping", "-6", "-n", "-c", "1", "-W", "2", &dst]),
    );
    // Nor any other netlink write: neither the set-up (the TUN device re-attached) nor a
    // programming pass logs one (each says how many ops it applied, and only when it did).
    let log = std::fs::read(&stopped.log).unwrap();
    let since = String::from_utf8_lossy(&log[logged..]);
    assert!(since.contains("IPv6-only data plane running"), "{since}");
    for write in ["device set up", "wireguard device updated", "peers updated"] {
        assert!(
            !since.contains(write),
            "a restart wrote ({write}):\n{since}"
        );
    }
    // And back: h2's pod reaches h1's.
    let back = hosts[0].pods[0].ip6.expect("pod IPv6").to_string();
    ping6_marked(&lab, "h2/p1", &back);

    // The device deleted under a running agent: set up again (address, route, entries) at the
    // next listing, and the pods reached again. What another backend of the network would have
    // left (a host-gw route via the underlay, a `tweed-v6.*` vxlan device) goes at that set-up:
    // more specific than the overlay route, it would carry pods' packets in clear.
    let h2ns = hosts[1].netns.clone();
    let leftover_route = "fd00:10:244:77::/64";
    let gw = "fd00:198:18::254";
    in_ns(
        &h2ns,
        &[
            "ip",
            "-6",
            "route",
            "add",
            leftover_route,
            "via",
            gw,
            "dev",
            "eth0",
            "proto",
            "static",
        ],
    );
    in_ns(
        &h2ns,
        &[
            "ip",
            "link",
            "add",
            "tweed-v6.9",
            "type",
            "vxlan",
            "id",
            "9",
            "dstport",
            "4789",
            "dev",
            "eth0",
        ],
    );
    // Dual stack's IPv6 device (`separate` mode), as a node switched from it keeps it: it would
    // hold our /128 and route and, on the kernel path, our port.
    in_ns(
        &h2ns,
        &["ip", "tuntap", "add", "dev", "tweed-wg-v6", "mode", "tun"],
    );
    in_ns(&h2ns, &["ip", "link", "del", "tweed-wg"]);
    wait_for(
        Duration::from_secs(20),
        "h1/p1 ping6 to h2/p1 after h2's tweed-wg was deleted",
        || ok_in(&h1p1, &["ping", "-6", "-n", "-c", "1", "-W", "2", &dst]),
    );
    let r6 = in_ns(&h2ns, &["ip", "-6", "route", "show", "dev", "tweed-wg"]);
    assert!(r6.contains("fd00:10:244::/56"), "{r6}");
    let all = in_ns(&h2ns, &["ip", "-6", "route", "show"]);
    assert!(
        !all.contains(leftover_route),
        "a leftover route stayed:\n{all}"
    );
    assert!(
        !ok_in(&h2ns, &["ip", "link", "show", "tweed-v6.9"]),
        "tweed-v6.9 stayed"
    );
    assert!(
        !ok_in(&h2ns, &["ip", "link", "show", "tweed-wg-v6"]),
        "tweed-wg-v6 stayed"
    );
    ping6_marked(&lab, "h2/p1", &back);

    // Refused at start, naming the field or flag.
    let v6_wg = |mode: &str| {
        format!(
            r#"{{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:77::/56","Backend":{{"Type":"wireguard"{mode}}}}}"#
        )
    };
    let out = agent_refusing(&lab, "h1", "wg-v4", &v6_wg(r#","Mode":"ipv4""#), &[]);
    assert!(
        out.contains("Backend.Mode") && out.contains("ipv4"),
        "{out}"
    );
    let out = agent_refusing(
        &lab,
        "h1",
        "wg-kernel",
        &v6_wg(""),
        &["--wireguard-impl", "kernel"],
    );
    assert!(out.contains("--wireguard-impl kernel"), "{out}");
    // An MTU that leaves the device below IPv6's 1280: refused before any lease or
    // subnet.env, so no peer is handed an endpoint that carries nothing.
    let out = agent_refusing(&lab, "h1", "wg-mtu", &v6_wg(r#","MTU":1300"#), &[]);
    assert!(out.contains("1280") && out.contains("1220"), "{out}");
    let taken = etcdctl(
        &lab,
        &[
            "get",
            "--prefix",
            "--keys-only",
            "/tweed-test/wg-mtu/subnets/",
        ],
    );
    assert!(taken.trim().is_empty(), "a lease was taken: {taken}");
    let env = host_state(&lab, "h1")
        .log
        .with_file_name("refuse-wg-mtu")
        .join("subnet.env");
    assert!(!env.exists(), "subnet.env written: {}", env.display());
}

/// `etcdctl get KEY -w fields`' `"Lease"` (0: none, a reservation).
fn lease_id_of(lab: &Lab, key: &str) -> i64 {
    let out = etcdctl(lab, &["get", key, "-w", "fields"]);
    out.lines()
        .find_map(|l| l.trim().strip_prefix("\"Lease\" : "))
        .unwrap_or_else(|| panic!("no Lease for {key} in {out}"))
        .trim()
        .parse()
        .unwrap()
}

/// What `cmd` prints in `netns` within `secs` seconds (it runs until killed by `timeout`).
fn monitor(netns: &str, secs: &str, cmd: &[&str]) -> Monitor {
    let mut argv = vec!["timeout", secs];
    argv.extend_from_slice(cmd);
    let mut child = ns_command(netns, &argv)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("monitor");
    let out = child.stdout.take().expect("monitor stdout");
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    Monitor { child, lines }
}

/// A monitor whose lines are read as they come, so that a test can wait until it is listening.
struct Monitor {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Monitor {
    fn saw(&self, what: &str) -> bool {
        self.lines.lock().unwrap().iter().any(|l| l.contains(what))
    }

    /// Every line from `from` on (0: all), once the monitor ended: `timeout` passes the SIGTERM
    /// on to the monitor it runs.
    fn output_from(mut self, from: usize) -> Vec<String> {
        // SAFETY: plain kill(2) on a pid this test started and has not reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        // The reader thread drains the pipe after the exit; give it a moment.
        std::thread::sleep(Duration::from_millis(200));
        self.lines.lock().unwrap().split_off(from)
    }

    fn len(&self) -> usize {
        self.lines.lock().unwrap().len()
    }
}

/// Issue 19: an IPv6-only node's underlay address is renumbered at run time (a new global
/// address added, the advertised one removed, as SLAAC renumbering does). h1's lease in etcd
/// advertises the new `PublicIPv6` on the same key and TTL lease, h1's `tweed-v6.1` is
/// re-created on it, h2's FDB entry for h1 follows, the pods ping6 each other again, and
/// once settled h1's agent writes nothing to the kernel (no change on `tweed-v6.1` over a
/// resync period and more).
#[test]
fn a_renumbered_ipv6_only_node_moves_its_lease_and_vtep_and_stays_reachable() {
    require_root!(NEEDS_ROOT);
    let mut spec = LabSpec::new(per_process("v6o-mv"), 2);
    spec.backend = Backend::Vxlan;
    spec.pods_via = PodsVia::Direct;
    spec.pods_per_host = 1;
    spec.ip_family = IpFamily::V6;
    let lab = up(spec);
    let report = lab.check_until(Duration::from_secs(30)).expect("check");
    assert_eq!(report.summary(), "2 passed, 0 failed");
    let h1 = host_state(&lab, "h1");
    let h2 = host_state(&lab, "h2");
    let old = h1.public_ip6.unwrap();
    let (subnet, _) = subnet6_of(&lab, "h1");
    let key = format!("{SUBNETS}{}-{}", subnet.network(), subnet.prefix());
    let value = |lab: &Lab| {
        let out = etcdctl(lab, &["get", &key, "--print-value-only"]);
        LeaseAttrs::parse(out.trim().as_bytes()).unwrap_or_else(|e| panic!("{key}: {e}: {out}"))
    };
    assert_eq!(value(&lab).public_ipv6, Some(old));
    let lease = lease_id_of(&lab, &key);
    assert_ne!(lease, 0);

    let new: Ipv6Addr = "fd00:198:18::101".parse().unwrap();
    let addr = |op: &str, a: Ipv6Addr| {
        let a = format!("{a}/64");
        let mut argv = vec!["ip", "-6", "addr", op, a.as_str(), "dev", "eth0"];
        if op == "add" {
            argv.push("nodad");
        }
        in_ns(&h1.netns, &argv);
    };
    addr("add", new);
    addr("del", old);
    let moved = std::time::Instant::now();
    // Seconds, not the 15 s HTTP/2 keepalive would take to notice that the connection to etcd
    // (made from the old address) is dead: the agent reconnects at the move.
    wait_for(
        Duration::from_secs(5),
        "h1's lease advertises the new PublicIPv6",
        || value(&lab).public_ipv6 == Some(new),
    );
    eprintln!("the lease followed in {:?}", moved.elapsed());
    assert_eq!(lease_id_of(&lab, &key), lease, "the same TTL lease");
    assert_eq!(subnet6_of(&lab, "h1").0, subnet, "the same subnet");
    wait_for(
        Duration::from_secs(10),
        "h1's tweed-v6.1 on the new address",
        || {
            tweed_testkit::cmd::try_in_ns(&h1.netns, &["ip", "-d", "link", "show", "tweed-v6.1"])
                .is_ok_and(|l| l.contains(&format!("local {new} ")))
        },
    );
    wait_for(
        Duration::from_secs(10),
        "h2's FDB entry for h1 on the new address",
        || {
            tweed_testkit::cmd::try_in_ns(
                &h2.netns,
                &["bridge", "fdb", "show", "dev", "tweed-v6.1"],
            )
            .is_ok_and(|f| {
                f.contains(&format!("dst {new} ")) && !f.contains(&format!("dst {old} "))
            })
        },
    );
    let log = std::fs::read_to_string(&h1.log).unwrap();
    assert!(
        log.contains("the PublicIPv6 left the underlay interface; advertising")
            && log.contains("IPv6-only lease rewritten"),
        "{log}"
    );
    let report = lab.check_until(Duration::from_secs(30)).expect("check");
    assert_eq!(report.summary(), "2 passed, 0 failed", "after the move");
    eprintln!(
        "pods reach each other again {:?} after the move",
        moved.elapsed()
    );
    let to_h1 = h1.pods[0].ip6.unwrap().to_string();
    let to_h2 = h2.pods[0].ip6.unwrap().to_string();
    let ping6 = |ns: &str, to: &str| ok_in(ns, &["ping", "-6", "-n", "-c", "2", "-W", "2", to]);
    assert!(ping6(&h2.pods[0].netns, &to_h1), "h2/p1 -> h1/p1");
    assert!(ping6(&h1.pods[0].netns, &to_h2), "h1/p1 -> h2/p1");

    // Reserved through the API (issue 19): the IPv6-only key, held by the new PublicIPv6, loses
    // its TTL lease; unreserved, it gets a fresh one, which h1's loop follows (its own lease in
    // `tweedctl net leases` names it).
    let r = tweedctl_net(&h1, &["reserve", &subnet.to_string(), &new.to_string()]);
    assert_eq!(r["created"], false, "{r}");
    assert_eq!(lease_id_of(&lab, &key), 0, "reserved");
    assert_eq!(value(&lab).public_ipv6, Some(new));
    let u = tweedctl_net(&h1, &["unreserve", &subnet.to_string()]);
    let fresh = i64::from_str_radix(u["lease_id"].as_str().unwrap(), 16).unwrap();
    assert_eq!(lease_id_of(&lab, &key), fresh, "unreserved");
    wait_for(
        Duration::from_secs(15),
        "h1 following the fresh lease",
        || {
            tweedctl_net(&h1, &["leases"])
                .as_array()
                .unwrap()
                .iter()
                .any(|l| l["own"] == true && l["lease_id"] == u["lease_id"])
        },
    );

    // Settled: over more than one resync period (10 s), nothing on h1's tweed-v6.1 changes.
    std::thread::sleep(Duration::from_secs(2));
    // Controls: a change of our own on the device (the agent leaves link-local addresses and
    // unknown FDB entries of a MAC no peer has alone) is repeated until each monitor has shown
    // it, so that the window below starts with both listening: an empty capture then means no
    // change, not a monitor that saw nothing.
    let links = monitor(
        &h1.netns,
        "30",
        &["ip", "-6", "monitor", "link", "address", "route", "neigh"],
    );
    let fdb = monitor(&h1.netns, "30", &["bridge", "monitor", "fdb"]);
    let control = ["fe80::dead/64", "dev", "tweed-v6.1"];
    let fdb_control = [
        "02:00:00:00:de:ad",
        "dev",
        "tweed-v6.1",
        "dst",
        "fd00:198:18::dead",
    ];
    wait_for(Duration::from_secs(10), "both monitors listening", || {
        in_ns(
            &h1.netns,
            &[&["ip", "-6", "addr", "add"][..], &control].concat(),
        );
        in_ns(
            &h1.netns,
            &[&["ip", "-6", "addr", "del"][..], &control].concat(),
        );
        in_ns(
            &h1.netns,
            &[&["bridge", "fdb", "add"][..], &fdb_control].concat(),
        );
        in_ns(
            &h1.netns,
            &[&["bridge", "fdb", "del"][..], &fdb_control].concat(),
        );
        std::thread::sleep(Duration::from_millis(200));
        links.saw("fe80::dead") && fdb.saw("02:00:00:00:de:ad")
    });
    let (from_links, from_fdb) = (links.len(), fdb.len());
    // Over more than one resync period (10 s), nothing on h1's tweed-v6.1 changes.
    std::thread::sleep(Duration::from_secs(12));
    let (links, fdb) = (links.output_from(0), fdb.output_from(0));
    let ours: Vec<&String> = links[from_links..]
        .iter()
        .chain(fdb[from_fdb..].iter())
        .filter(|l| {
            l.contains("tweed-v6.1")
                && !l.contains("fe80::dead")
                && !l.contains("02:00:00:00:de:ad")
        })
        .collect();
    assert_eq!(
        ours,
        Vec::<&String>::new(),
        "kernel changes in a settled state"
    );
}

/// Starts a stopped agent again, waits (up to 15 s) until its log says `ready: lease held` once
/// more than before, and returns its pid.
fn start_ready(a: &StoppedAgent) -> u32 {
    let readies = || {
        std::fs::read_to_string(&a.log)
            .map(|l| l.matches("ready: lease held").count())
            .unwrap_or(0)
    };
    let before = readies();
    let pid = start_agent(a);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while readies() <= before {
        if std::time::Instant::now() > deadline {
            let log = std::fs::read_to_string(&a.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            panic!(
                "the restarted agent not ready in 15 s; its log ends:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    pid
}

/// Issue 19: the underlay address changes while the agent is down (a reboot with a new SLAAC
/// address). At its next start h1 takes back its key (subnet.env's subnet, naming the address
/// the last run recorded), rewrites it with the new `PublicIPv6` on the same subnet, h2's FDB
/// entry for h1 follows, and the pods ping6 each other again.
#[test]
fn an_ipv6_only_node_renumbered_while_down_keeps_its_subnet() {
    require_root!(NEEDS_ROOT);
    let mut spec = LabSpec::new(per_process("v6o-rs"), 2);
    spec.backend = Backend::Vxlan;
    spec.pods_via = PodsVia::Direct;
    spec.pods_per_host = 1;
    spec.ip_family = IpFamily::V6;
    let lab = up(spec);
    let report = lab.check_until(Duration::from_secs(30)).expect("check");
    assert_eq!(report.summary(), "2 passed, 0 failed");
    let h1 = host_state(&lab, "h1");
    let h2 = host_state(&lab, "h2");
    let old = h1.public_ip6.unwrap();
    let (subnet, _) = subnet6_of(&lab, "h1");
    let key = format!("{SUBNETS}{}-{}", subnet.network(), subnet.prefix());
    let value = |lab: &Lab| {
        let out = etcdctl(lab, &["get", &key, "--print-value-only"]);
        LeaseAttrs::parse(out.trim().as_bytes()).unwrap_or_else(|e| panic!("{key}: {e}: {out}"))
    };
    let lease = lease_id_of(&lab, &key);

    let stopped = stop_agent(&lab, "h1", libc::SIGTERM);
    let new: Ipv6Addr = "fd00:198:18::101".parse().unwrap();
    in_ns(
        &h1.netns,
        &[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{new}/64"),
            "dev",
            "eth0",
            "nodad",
        ],
    );
    in_ns(
        &h1.netns,
        &[
            "ip",
            "-6",
            "addr",
            "del",
            &format!("{old}/64"),
            "dev",
            "eth0",
        ],
    );
    let pid = start_ready(&stopped);
    assert_eq!(subnet6_of(&lab, "h1").0, subnet, "the same subnet");
    assert_eq!(value(&lab).public_ipv6, Some(new));
    assert_eq!(lease_id_of(&lab, &key), lease, "the same TTL lease");
    assert_eq!(
        leases(&lab).len(),
        2,
        "no second key for h1: {:?}",
        leases(&lab)
    );
    let log = std::fs::read_to_string(&h1.log).unwrap();
    assert!(
        log.contains("the PublicIPv6 changed since the last run"),
        "{log}"
    );
    wait_for(
        Duration::from_secs(10),
        "h2's FDB entry for h1 on the new address",
        || {
            tweed_testkit::cmd::try_in_ns(
                &h2.netns,
                &["bridge", "fdb", "show", "dev", "tweed-v6.1"],
            )
            .is_ok_and(|f| {
                f.contains(&format!("dst {new} ")) && !f.contains(&format!("dst {old} "))
            })
        },
    );
    let report = lab.check_until(Duration::from_secs(30)).expect("check");
    assert_eq!(report.summary(), "2 passed, 0 failed", "after the restart");

    // Once more without the record (a wiped state dir). Nothing local proves the old key is
    // h1's (its VTEP MAC is public and cloned VMs share one), so h1 takes a new subnet with a
    // fresh VTEP MAC and leaves the old key alone (it expires with its TTL). h1 must still get
    // ready: no route or FDB entry of a peer carrying our own MAC.
    // The lab knows only the first agent's pid: this one is stopped by its own.
    // SAFETY: plain kill(2) on a pid this test started.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    wait_for(Duration::from_secs(10), "h1's agent gone", || {
        std::fs::read(format!("/proc/{pid}/cmdline")).map_or(true, |c| c.is_empty())
    });
    std::fs::remove_file(h1.agent_state_dir.join("ipv6-only-public-ipv6")).expect("the record");
    let newer: Ipv6Addr = "fd00:198:18::102".parse().unwrap();
    in_ns(
        &h1.netns,
        &[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{newer}/64"),
            "dev",
            "eth0",
            "nodad",
        ],
    );
    in_ns(
        &h1.netns,
        &[
            "ip",
            "-6",
            "addr",
            "del",
            &format!("{new}/64"),
            "dev",
            "eth0",
        ],
    );
    let old_value = value(&lab);
    start_ready(&stopped);
    let (fresh, _) = subnet6_of(&lab, "h1");
    assert_ne!(fresh, subnet, "a new subnet without the record");
    assert_eq!(value(&lab), old_value, "the old key is left alone");
    assert_eq!(lease_id_of(&lab, &key), lease, "on its own TTL lease");
    let fresh_key = format!("{SUBNETS}{}-{}", fresh.network(), fresh.prefix());
    let out = etcdctl(&lab, &["get", &fresh_key, "--print-value-only"]);
    let fresh_value = LeaseAttrs::parse(out.trim().as_bytes()).unwrap();
    assert_eq!(fresh_value.public_ipv6, Some(newer));
    let vtep = |a: &LeaseAttrs| a.backend_v6_data.as_ref().map(|d| d.get().to_string());
    assert_ne!(
        vtep(&fresh_value),
        vtep(&old_value),
        "a fresh VTEP MAC, not the old key's"
    );
    assert_eq!(leases(&lab).len(), 3, "{:?}", leases(&lab));
}
