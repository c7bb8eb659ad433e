//! Containers attached through tweed's own CNI plugin on a dual-stack node (subnet.env with
//! the IPv6 pair): both addresses in `inspect` and in `/etc/hosts`, IPv6 between containers,
//! nothing left after `rm`; and on an IPv6-only node (no IPv4 pair): the IPv6 address alone.
//! A test namespace plays the host; the root namespace is not touched.

mod common;

use std::path::PathBuf;

use common::*;
use tweed_testkit::NetnsGuard;

/// The plugin binary, built beside this test's own (target/debug/tweed): `cargo test
/// --workspace` builds it; a run of this crate alone needs `cargo build -p tweed-cni` first.
fn tweed_plugin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join("tweed");
    assert!(
        p.exists(),
        "{} is missing: build the CNI plugin first (cargo build -p tweed-cni)",
        p.display()
    );
    p
}

/// The runtime wired to the plugin on a node whose subnet.env is `subnet_env_text`, in a
/// fresh host namespace: (host namespace, the plugin's IPAM data dir).
fn node(e: &mut Env, subnet_env_text: &str) -> (NetnsGuard, PathBuf) {
    let host = NetnsGuard::unique("twt");
    let br = unique("twb");
    let d = e.dir.path().to_path_buf();
    let bin = d.join("cnibin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(tweed_plugin(), bin.join("tweed")).unwrap();
    let subnet_env = d.join("subnet.env");
    std::fs::write(&subnet_env, subnet_env_text).unwrap();
    let data = d.join("ipam");
    let conf = d.join("tweed.conflist");
    std::fs::write(
        &conf,
        serde_json::json!({"cniVersion": "1.0.0", "name": "tnet", "plugins": [
            {"type": "tweed", "bridge": br, "subnetFile": subnet_env, "dataDir": data}]})
        .to_string(),
    )
    .unwrap();
    for (k, v) in [
        ("TWEED_HOST_NETNS", host.name().to_string()),
        ("TWEED_CNI_CONF", conf.display().to_string()),
        ("TWEED_CNI_PATH", bin.display().to_string()),
    ] {
        e.extra.push((k.into(), v));
    }
    (host, data)
}

#[test]
fn containers_get_both_addresses_and_hosts_lists_them() {
    require_root!(NEEDS_ROOT);
    let mut e = Env::with_busybox();
    let (host, data) = node(
        &mut e,
        "TWEED_NETWORK=10.244.0.0/16\nTWEED_SUBNET=10.244.7.1/24\nTWEED_MTU=1450\n\
         TWEED_IPV6_NETWORK=fd00:10:244::/56\nTWEED_IPV6_SUBNET=fd00:10:244:7::1/64\n",
    );

    e.start(&[
        "--name",
        "a",
        "--net",
        "overlay",
        "--hostname",
        "alpha",
        "busybox",
        "sleep",
        "1000",
    ]);
    let a = e.inspect("a");
    assert_eq!(
        a["NetworkSettings"]["IPAddresses"],
        serde_json::json!(["10.244.7.2", "fd00:10:244:7::2"]),
        "{a}"
    );
    let hosts = e.ok(&["exec", "a", "cat", "/etc/hosts"]);
    assert!(hosts.contains("\n10.244.7.2\talpha\n"), "{hosts}");
    assert!(hosts.contains("\nfd00:10:244:7::2\talpha\n"), "{hosts}");
    assert!(
        hosts.contains("::1\tlocalhost ip6-localhost ip6-loopback"),
        "{hosts}"
    );
    let eth0 = e.ok(&["exec", "a", "ip", "-6", "-o", "addr", "show", "dev", "eth0"]);
    assert!(eth0.contains("fd00:10:244:7::2/64"), "{eth0}");
    // A second container reaches the first over IPv6, and its own gateway, from its rootfs.
    let out = e.ok(&[
        "run", "--rm", "--net", "overlay", "busybox", "sh", "-c",
        "ping -6 -c 1 -W 2 fd00:10:244:7::1 >/dev/null && ping -6 -c 1 -W 2 fd00:10:244:7::2 >/dev/null && echo reached",
    ]);
    assert_eq!(out, "reached\n", "{out}");

    e.ok(&["rm", "-f", "a"]);
    let left: Vec<String> = list(&data.join("tnet"))
        .into_iter()
        .filter(|f| f.parse::<std::net::IpAddr>().is_ok())
        .collect();
    assert!(left.is_empty(), "addresses leaked: {left:?}");
    let veths = host.ip(&["-o", "link", "show", "type", "veth"]).unwrap();
    assert!(veths.trim().is_empty(), "{veths}");
    e.assert_nothing_left();
}

/// An IPv6-only node (flannel's subnet.env with EnableIPv4 false): the container gets its IPv6
/// address and no IPv4 one, `inspect` lists just that, `/etc/hosts` names the hostname at it.
#[test]
fn ipv6_only_node_gives_the_container_its_ipv6_address_alone() {
    require_root!(NEEDS_ROOT);
    let mut e = Env::with_busybox();
    let (host, data) = node(
        &mut e,
        "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:7::1/64\n\
         FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
    );
    e.start(&[
        "--name",
        "a",
        "--net",
        "overlay",
        "--hostname",
        "alpha",
        "busybox",
        "sleep",
        "1000",
    ]);
    let a = e.inspect("a");
    assert_eq!(
        a["NetworkSettings"]["IPAddresses"],
        serde_json::json!(["fd00:10:244:7::2"]),
        "{a}"
    );
    let hosts = e.ok(&["exec", "a", "cat", "/etc/hosts"]);
    assert!(hosts.ends_with("\nfd00:10:244:7::2\talpha\n"), "{hosts}");
    assert!(!hosts.contains("10.244."), "{hosts}");
    let eth0 = e.ok(&["exec", "a", "ip", "-o", "addr", "show", "dev", "eth0"]);
    assert!(eth0.contains("fd00:10:244:7::2/64"), "{eth0}");
    assert!(!eth0.contains("inet "), "no IPv4 address: {eth0}");
    let out = e.ok(&[
        "run", "--rm", "--net", "overlay", "busybox", "sh", "-c",
        "ping -6 -c 1 -W 2 fd00:10:244:7::1 >/dev/null && ping -6 -c 1 -W 2 fd00:10:244:7::2 >/dev/null && echo reached",
    ]);
    assert_eq!(out, "reached\n", "{out}");

    e.ok(&["rm", "-f", "a"]);
    let left: Vec<String> = list(&data.join("tnet"))
        .into_iter()
        .filter(|f| f.parse::<std::net::IpAddr>().is_ok())
        .collect();
    assert!(left.is_empty(), "addresses leaked: {left:?}");
    let veths = host.ip(&["-o", "link", "show", "type", "veth"]).unwrap();
    assert!(veths.trim().is_empty(), "{veths}");
    e.assert_nothing_left();
}
