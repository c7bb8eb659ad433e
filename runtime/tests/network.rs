//! Network modes: none, host (a test namespace plays the host), container:ID, and overlay via
//! a CNI chain (Debian's bridge + host-local + tuning) in a test namespace. Nothing here
//! touches the root network namespace.

mod common;

use std::path::Path;

use common::*;
use tweed_testkit::NetnsGuard;

/// `net:[inode]` of a namespace file (a /proc link or a bind-mounted file).
fn netns_ino(p: &str) -> String {
    use std::os::unix::fs::MetadataExt;
    format!("net:[{}]", std::fs::metadata(p).unwrap().ino())
}

fn cni_plugin_dir() -> &'static str {
    for d in ["/usr/lib/cni", "/opt/cni/bin"] {
        if Path::new(d).join("bridge").exists() {
            return d;
        }
    }
    panic!("CNI plugins missing: install Debian's containernetworking-plugins")
}

/// A runtime whose containers' host side is a namespace of the test's own, not the root one.
fn env_with_host_netns() -> (Env, NetnsGuard) {
    let mut e = Env::with_busybox();
    let host = NetnsGuard::unique("twt");
    e.extra
        .push(("TWEED_HOST_NETNS".into(), host.name().to_string()));
    (e, host)
}

/// [`env_with_host_netns`] with `--net overlay` through a bridge + host-local chain on a bridge
/// of its own (`extra` is appended to the chain's plugins); returns the bridge's name too.
fn overlay_env(extra: &str) -> (Env, NetnsGuard, String) {
    let (mut e, host) = env_with_host_netns();
    let br = unique("twb");
    let conf = conflist(&e, &br, extra);
    e.extra
        .push(("TWEED_CNI_CONF".into(), conf.display().to_string()));
    e.extra
        .push(("TWEED_CNI_PATH".into(), cni_plugin_dir().into()));
    (e, host, br)
}

/// How many veths the host namespace holds: one per attached container.
fn veths(host: &NetnsGuard) -> usize {
    host.ip(&["-o", "link", "show", "type", "veth"])
        .unwrap()
        .lines()
        .count()
}

#[test]
fn none_host_and_container_modes() {
    require_root!(NEEDS_ROOT);
    let (e, host) = env_with_host_netns();
    let dummy = unique("twd");
    let peer = unique("twp");
    host.ip(&["link", "add", &dummy, "type", "veth", "peer", "name", &peer])
        .unwrap();

    // none: a fresh namespace with only loopback, up.
    let out = e.sh(
        &["--net", "none"],
        "ls /sys/class/net; ping -c1 -W1 127.0.0.1 >/dev/null && echo lo-ok",
    );
    assert_eq!(out, "lo\nlo-ok\n");

    // host: the (test) host's namespace, sharing its interfaces; traffic to loopback only.
    let out = e.sh(
        &["--net", "host"],
        "readlink /proc/self/ns/net; ls /sys/class/net",
    );
    let mut l = out.lines();
    assert_eq!(l.next().unwrap(), netns_ino(host.path().to_str().unwrap()));
    let ifs: Vec<&str> = l.collect();
    assert!(ifs.contains(&dummy.as_str()), "{ifs:?}");
    assert_ne!(
        netns_ino("/proc/self/ns/net"),
        netns_ino(host.path().to_str().unwrap())
    );

    // container:ID shares another container's namespace.
    e.start(&["--name", "a", "--net", "none", "busybox", "sleep", "1000"]);
    let pid = e.init_pid("a");
    let out = e.ok(&[
        "run",
        "--rm",
        "--net",
        "container:a",
        "busybox",
        "readlink",
        "/proc/self/ns/net",
    ]);
    assert_eq!(out.trim(), netns_ino(&format!("/proc/{pid}/ns/net")));
    e.ok(&["rm", "-f", "a"]);
    e.assert_nothing_left();
}

fn conflist(e: &Env, br: &str, extra_plugin: &str) -> std::path::PathBuf {
    let ipam = e.dir.path().join("ipam");
    let conf = format!(
        r#"{{"cniVersion":"1.0.0","name":"{br}","plugins":[
        {{"type":"bridge","bridge":"{br}","isGateway":true,"ipMasq":false,
          "ipam":{{"type":"host-local","subnet":"10.244.250.0/24","dataDir":"{}"}}}},
        {{"type":"tuning","sysctl":{{"net.ipv4.conf.eth0.accept_local":"1"}}}}{extra_plugin}]}}"#,
        ipam.display()
    );
    let p = e.dir.path().join(format!("{br}.conflist"));
    std::fs::write(&p, conf).unwrap();
    p
}

fn ipam_ips(e: &Env, net: &str) -> Vec<String> {
    list(&e.dir.path().join("ipam").join(net))
        .into_iter()
        .filter(|f| f.starts_with("10."))
        .collect()
}

#[test]
fn overlay_through_a_cni_chain() {
    require_root!(NEEDS_ROOT);
    let (e, host, br) = overlay_env("");

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
    let a_ip = a["NetworkSettings"]["IPAddresses"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert!(a_ip.starts_with("10.244.250."), "{a}");
    // tuning ran after bridge with bridge's result (prevResult), in the container's namespace.
    assert_eq!(
        e.ok(&[
            "exec",
            "a",
            "cat",
            "/proc/sys/net/ipv4/conf/eth0/accept_local"
        ])
        .trim(),
        "1"
    );
    assert!(e
        .ok(&["exec", "a", "cat", "/etc/hosts"])
        .contains(&format!("{a_ip}\talpha")));
    let out = e.ok(&[
        "run",
        "--rm",
        "--net",
        "overlay",
        "busybox",
        "sh",
        "-c",
        &format!(
            "ip -4 -o addr show eth0 | wc -l; ping -c 2 -W 2 {a_ip} >/dev/null && echo reached"
        ),
    ]);
    assert_eq!(out, "1\nreached\n", "{out}");
    // The removed container's address went back to the pool: only a's is taken.
    assert_eq!(ipam_ips(&e, &br), vec![a_ip.clone()]);
    assert_eq!(veths(&host), 1);
    // The root namespace never saw any of it.
    let root_links = std::process::Command::new("ip")
        .args(["-o", "link"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&root_links.stdout).contains(&br));

    e.ok(&["rm", "-f", "a"]);
    assert!(ipam_ips(&e, &br).is_empty(), "address leaked");
    assert_eq!(veths(&host), 0);
    e.assert_nothing_left();
}

#[test]
fn failed_cni_add_leaves_nothing() {
    require_root!(NEEDS_ROOT);
    let (mut e, host, br) = overlay_env(r#",{"type":"no-such-plugin"}"#);
    let err = e.fails(&["run", "--net", "overlay", "busybox", "true"]);
    assert!(
        err.contains("no-such-plugin") && err.contains("not found"),
        "{err}"
    );
    assert!(ipam_ips(&e, &br).is_empty(), "address leaked");
    assert_eq!(veths(&host), 0, "veth leaked");
    e.assert_nothing_left();
    // A missing conflist is refused before anything is made.
    e.extra
        .push(("TWEED_CNI_CONF".into(), "/nonexistent.conflist".into()));
    assert!(e
        .fails(&["run", "--net", "overlay", "busybox", "true"])
        .contains("CNI config"));
    e.assert_nothing_left();
}
