//! Root-only: real namespaces, a real etcd, the real tweed CNI plugin (`target/*/tweed`: build
//! the workspace's binaries first) and `fake-tweedd` in place of the agent. These test the lab's
//! plumbing; the multi-host e2e tests with the real tweedd live in the tests/ crate.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tweed_lab::{netns, Lab, LabError, LabGuard, LabSpec, PodsVia};
use tweed_testkit::{per_process, require_root};

/// Why these tests need root, for `require_root!`.
const NEEDS_ROOT: &str = "network namespaces, a real etcd and the CNI plugin";

fn fake_tweedd() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake-tweedd")
}

fn spec(name: &str, hosts: usize, root: &Path) -> LabSpec {
    let mut s = LabSpec::new(name, hosts);
    s.tweedd = Some(fake_tweedd());
    s.root = Some(root.to_path_buf());
    s.agent_timeout = Duration::from_secs(15);
    s
}

/// `tweed-lab ARGS...` with labs under `root`.
fn cli(root: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tweed-lab"))
        .args(args)
        .env("TWEED_LAB_ROOT", root)
        .output()
        .unwrap()
}

fn namespaces_of(name: &str) -> Vec<String> {
    let names = tweed_lab::names::Names::new(name).unwrap();
    netns::list()
        .unwrap()
        .into_iter()
        .filter(|ns| names.owns_netns(ns))
        .collect()
}

fn has_link(ns: &str, link: &str) -> bool {
    netns::ip(ns, &["link", "show", link]).is_ok()
}

#[test]
fn two_host_lab_comes_up_and_goes_away() {
    require_root!(NEEDS_ROOT);
    let root = tempfile::tempdir().unwrap();
    let name = per_process("pl");
    let lab = LabGuard::up(spec(&name, 2, root.path())).unwrap();

    let mut got = namespaces_of(&name);
    got.sort();
    let mut want: Vec<String> = ["u", "o", "h1", "h2", "h1-p1", "h1-p2", "h2-p1", "h2-p2"]
        .iter()
        .map(|s| format!("twl-{name}-{s}"))
        .collect();
    want.sort();
    assert_eq!(got, want);

    let u = format!("twl-{name}-u");
    assert!(has_link(&u, "br0"));
    assert!(has_link(&u, "veth-h1") && has_link(&u, "veth-h2"));
    for h in ["h1", "h2"] {
        let ns = format!("twl-{name}-{h}");
        assert!(has_link(&ns, "eth0") && has_link(&ns, "cni0"), "{ns}");
        let fwd = lab
            .exec(h, &["cat", "/proc/sys/net/ipv4/ip_forward"])
            .unwrap();
        assert_eq!(fwd.trim(), "1");
    }
    let cni0 = netns::ip(&format!("twl-{name}-h1"), &["-o", "addr", "show", "cni0"]).unwrap();
    assert!(cni0.contains("10.244.1.1/24"), "{cni0}");
    let mtu = netns::ip(&format!("twl-{name}-h1-p1"), &["link", "show", "eth0"]).unwrap();
    assert!(mtu.contains("mtu 1450"), "{mtu}");

    // Underlay: hosts reach each other, etcd and the outside namespace; outside knows no route
    // into the overlay.
    lab.exec("h1", &["ping", "-c", "1", "-W", "2", "198.18.0.2"])
        .unwrap();
    lab.exec("outside", &["ping", "-c", "1", "-W", "2", "198.18.0.1"])
        .unwrap();
    assert!(lab
        .exec("outside", &["ping", "-c", "1", "-W", "1", "10.244.1.2"])
        .is_err());
    // The agents got a per-host API socket, metrics on every address and --ip-masq (the fake
    // refuses flags a real tweedd would refuse).
    for h in &lab.state().hosts {
        let cmdline = std::fs::read_to_string(&h.log).unwrap();
        let sock = root
            .path()
            .join(&name)
            .join("hosts")
            .join(&h.name)
            .join("tweedd.sock");
        assert!(
            cmdline.contains(&format!("--api-socket {}", sock.display())),
            "{cmdline}"
        );
        assert!(cmdline.contains("--ip-masq"), "{cmdline}");
        assert!(cmdline.contains("--metrics-addr 0.0.0.0:9867"), "{cmdline}");
        assert_eq!(h.api_socket.as_deref(), Some(sock.as_path()));
        assert_eq!(
            h.metrics.as_deref(),
            Some(format!("http://{}:9867/metrics", h.public_ip).as_str())
        );
        // Pods came through the CNI plugin: its IPAM store holds their addresses.
        let ipam = root
            .path()
            .join(&name)
            .join("hosts")
            .join(&h.name)
            .join("ipam/tweed");
        for p in &h.pods {
            let ip = p.ip.expect("an IPv4 lab's pod has an IPv4 address");
            assert!(ipam.join(ip.to_string()).is_file(), "{ip}");
        }
        let conflist = root
            .path()
            .join(&name)
            .join("hosts")
            .join(&h.name)
            .join("net.d/10-tweed.conflist");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(conflist).unwrap()).unwrap();
        assert_eq!(v["plugins"][0]["type"], "tweed");
    }
    let st = lab.status();
    assert_eq!(st.etcd.endpoints, ["http://198.18.0.254:2379"]);
    assert!(st.etcd.alive);
    assert_eq!(st.hosts.len(), 2);
    for h in &st.hosts {
        assert!(h.agent_alive, "{h:?}");
        assert_eq!(h.pods.len(), 2);
    }
    assert_eq!(st.hosts[0].subnet.as_deref(), Some("10.244.1.0/24"));
    assert_eq!(st.hosts[1].pods[1].ip.as_deref(), Some("10.244.2.3"));

    // Same-host pods talk over cni0; the pods' default route goes via the bridge.
    lab.exec(
        "h1/p1",
        &["ping", "-c", "2", "-W", "2", "-i", "0.2", "10.244.1.3"],
    )
    .unwrap();
    lab.exec("h2/p2", &["ping", "-c", "1", "-W", "2", "10.244.2.1"])
        .unwrap();
    let route = lab
        .exec("h1/p2", &["ip", "route", "show", "default"])
        .unwrap();
    assert!(route.contains("via 10.244.1.1"), "{route}");

    // The fake agent builds no overlay, so every cross-host ping fails...
    let report = lab.check().unwrap();
    assert_eq!((report.passed(), report.failed()), (0, 8), "{report:?}");
    let t = std::time::Instant::now();
    let report = lab.check_until(Duration::from_millis(600)).unwrap();
    assert_eq!(report.failed(), 8);
    assert!(t.elapsed() >= Duration::from_millis(600));
    // ...until routes stand in for one.
    lab.exec(
        "h1",
        &["ip", "route", "add", "10.244.2.0/24", "via", "198.18.0.2"],
    )
    .unwrap();
    lab.exec(
        "h2",
        &["ip", "route", "add", "10.244.1.0/24", "via", "198.18.0.1"],
    )
    .unwrap();
    let report = lab.check_until(Duration::from_secs(10)).unwrap();
    assert_eq!(report.summary(), "8 passed, 0 failed", "{report:?}");

    // Another process's view: state.json.
    let loaded = Lab::load_in(root.path(), &name).unwrap();
    assert_eq!(loaded.status().hosts, st.hosts);
    let agent_pids: Vec<u32> = st.hosts.iter().filter_map(|h| h.agent_pid).collect();
    let etcd_pid = st.etcd.pid.unwrap();

    let report = lab.down().unwrap();
    assert_eq!(report.namespaces.len(), 8);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    assert_gone(root.path(), &name, agent_pids.into_iter().chain([etcd_pid]));
    // Idempotent.
    tweed_lab::down_in(root.path(), &name).unwrap();
}

#[test]
fn two_labs_at_once() {
    require_root!(NEEDS_ROOT);
    let root = tempfile::tempdir().unwrap();
    let (a, b) = (per_process("pa"), per_process("pb"));
    // One through the CNI plugin, one wired directly: the same addresses either way.
    let mut sb = spec(&b, 1, root.path());
    sb.pods_via = PodsVia::Direct;
    let (la, lb) = std::thread::scope(|s| {
        let ta = s.spawn(|| LabGuard::up(spec(&a, 2, root.path())));
        let tb = s.spawn(|| LabGuard::up(sb));
        (ta.join().unwrap().unwrap(), tb.join().unwrap().unwrap())
    });
    assert_eq!(namespaces_of(&a).len(), 8);
    assert_eq!(namespaces_of(&b).len(), 5);
    assert_eq!(lb.state().pods_via, PodsVia::Direct);
    assert!(!root.path().join(&b).join("hosts/h1/ipam").exists());
    // Same addresses, separate worlds.
    la.exec("h1/p1", &["ping", "-c", "1", "-W", "2", "10.244.1.3"])
        .unwrap();
    lb.exec("h1/p1", &["ping", "-c", "1", "-W", "2", "10.244.1.3"])
        .unwrap();
    drop(la);
    assert!(namespaces_of(&a).is_empty());
    assert_eq!(
        namespaces_of(&b).len(),
        5,
        "downing one lab touched the other"
    );
    drop(lb);
    assert!(namespaces_of(&b).is_empty());
}

#[test]
fn failed_up_tears_down_and_shows_the_agent_log() {
    require_root!(NEEDS_ROOT);
    let root = tempfile::tempdir().unwrap();
    let name = per_process("pf");
    let mut s = spec(&name, 2, root.path());
    s.agent_args = vec!["--fake-fail".into()];
    let err = Lab::up(s).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, LabError::Agent { .. }), "{msg}");
    assert!(msg.contains("failing on purpose"), "{msg}");
    assert!(msg.contains(&format!("twl-{name}-h")), "{msg}");
    assert!(namespaces_of(&name).is_empty());
    assert!(!root.path().join(&name).exists());

    let mut s = spec(&name, 1, root.path());
    s.agent_args = vec!["--fake-mute".into()];
    s.agent_timeout = Duration::from_secs(1);
    let msg = Lab::up(s).unwrap_err().to_string();
    assert!(
        msg.contains("subnet.env") && msg.contains("after 1s"),
        "{msg}"
    );
    assert!(namespaces_of(&name).is_empty());
}

#[test]
fn down_works_without_state_and_up_refuses_an_existing_lab() {
    require_root!(NEEDS_ROOT);
    let root = tempfile::tempdir().unwrap();
    let name = per_process("pd");
    let lab = Lab::up(spec(&name, 1, root.path())).unwrap();
    let err = Lab::up(spec(&name, 1, root.path())).unwrap_err();
    assert!(matches!(err, LabError::Exists { .. }), "{err}");
    let etcd_pid = lab.status().etcd.pid.unwrap();
    // As if `up` had died before writing any state.
    std::fs::remove_file(root.path().join(&name).join("state.json")).unwrap();
    let err = Lab::load_in(root.path(), &name).unwrap_err().to_string();
    assert!(err.contains("tweed-lab down"), "{err}");
    drop(lab);
    let report = tweed_lab::down_in(root.path(), &name).unwrap();
    assert_eq!(report.namespaces.len(), 5);
    assert_gone(root.path(), &name, [etcd_pid]);
}

#[test]
fn cli_round_trip() {
    require_root!(NEEDS_ROOT);
    let root = tempfile::tempdir().unwrap();
    let name = per_process("pc");
    let run = |args: &[&str]| cli(root.path(), args);
    struct Down<'a>(&'a dyn Fn(&[&str]) -> std::process::Output, &'a str);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            (self.0)(&["down", "--name", self.1]);
        }
    }
    let _down = Down(&run, &name);
    let fake = fake_tweedd();
    let out = run(&[
        "up",
        "--name",
        &name,
        "--hosts",
        "2",
        "--pods-per-host",
        "1",
        "--backend",
        "vxlan",
        "--lease-ttl",
        "2m",
        "--tweedd",
        fake.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(
        progress.contains("etcd http://198.18.0.254:2379"),
        "{progress}"
    );

    let out = run(&["status", "--name", &name, "--output", "json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["hosts"][1]["public_ip"], "198.18.0.2");
    assert_eq!(
        v["hosts"][0]["pods"][0]["netns"],
        format!("twl-{name}-h1-p1")
    );
    let out = run(&["status", "--name", &name]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("PUBLIC_IP"));

    let out = run(&[
        "exec", "--name", &name, "h2/p1", "--", "sh", "-c", "exit 42",
    ]);
    assert_eq!(out.status.code(), Some(42));
    let log = run(&[
        "exec",
        "--name",
        &name,
        "h1",
        "--",
        "cat",
        &format!("{}/{name}/hosts/h1/tweedd.log", root.path().display()),
    ]);
    assert!(String::from_utf8_lossy(&log.stdout).contains("fake-tweedd"));

    let out = run(&["check", "--name", &name]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().last(), Some("0 passed, 2 failed"), "{text}");

    let out = run(&[
        "up",
        "--name",
        &name,
        "--hosts",
        "1",
        "--backend",
        "udp",
        "--direct-routing",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("vxlan option"));
    let out = run(&["up", "--name", "x", "--hosts", "1", "--pods-via", "cri"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected cni, runtime or direct"));

    let out = run(&["down", "--name", &name]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(namespaces_of(&name).is_empty());
    let out = run(&["down", "--name", &name]);
    assert!(out.status.success());
    let out = run(&["up", "--name", "Bad_Name", "--hosts", "1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid lab name"));
}

#[test]
fn two_segments_are_routed_by_the_underlay() {
    require_root!(NEEDS_ROOT);
    let root = tempfile::tempdir().unwrap();
    let name = per_process("ps");
    let mut s = spec(&name, 3, root.path());
    s.segments = 2;
    s.pods_per_host = 1;
    let lab = LabGuard::up(s).unwrap();
    assert_eq!(
        lab.state().public_ips(),
        ["198.18.0.1", "198.18.1.2", "198.18.0.3"]
    );
    let u = format!("twl-{name}-u");
    assert!(has_link(&u, "br0") && has_link(&u, "br1"));
    // h2 (segment B) reaches h1 through the underlay router, and etcd on segment A.
    let route = lab
        .exec("h2", &["ip", "route", "get", "198.18.0.1"])
        .unwrap();
    assert!(route.contains("via 198.18.1.254"), "{route}");
    lab.exec("h2", &["ping", "-c", "1", "-W", "2", "198.18.0.1"])
        .unwrap();
    lab.exec(
        "h2",
        &[
            "etcdctl",
            "--endpoints=http://198.18.0.254:2379",
            "--dial-timeout=2s",
            "endpoint",
            "health",
        ],
    )
    .unwrap();
    // Same segment: no router in between.
    let route = lab
        .exec("h1", &["ip", "route", "get", "198.18.0.3"])
        .unwrap();
    assert!(!route.contains("via"), "{route}");
}

/// What `down` leaves of lab `name`: no namespaces, no state directory, none of `pids`.
fn assert_gone(root: &Path, name: &str, pids: impl IntoIterator<Item = u32>) {
    assert!(namespaces_of(name).is_empty());
    assert!(!root.join(name).exists());
    for pid in pids {
        assert!(!tweed_lab::cmd::pid_alive(pid), "pid {pid} survived down");
    }
}

/// A lab with one pod per host; its name, the pids of its agents and etcd, and its state.json.
fn one_pod_lab(
    root: &Path,
    tag: &str,
    hosts: usize,
    pods_via: PodsVia,
) -> (String, LabGuard, Vec<u32>, PathBuf) {
    let name = per_process(tag);
    let mut s = spec(&name, hosts, root);
    s.pods_via = pods_via;
    s.pods_per_host = 1;
    let lab = LabGuard::up(s).unwrap();
    let st = lab.status();
    let pids = st
        .hosts
        .iter()
        .filter_map(|h| h.agent_pid)
        .chain(st.etcd.pid)
        .collect();
    let path = root.join(&name).join("state.json");
    (name, lab, pids, path)
}

/// An operator with a lab up across an upgrade of tweed-lab must still be able to take it down:
/// a state.json in the first release's shape (no pods_via, segments, outside namespace, etcd
/// members, API socket, ...) is read as it is, by `status` and by `down`.
#[test]
fn down_takes_down_a_lab_whose_state_an_older_tweed_lab_wrote() {
    require_root!(NEEDS_ROOT);
    let root = tempfile::tempdir().unwrap();
    let (name, lab, pids, path) = one_pod_lab(root.path(), "po", 2, PodsVia::Direct);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let first_release = |v: &mut serde_json::Value, keep: &[&str]| {
        v.as_object_mut()
            .unwrap()
            .retain(|k, _| keep.contains(&k.as_str()));
    };
    first_release(
        &mut v,
        &[
            "name",
            "phase",
            "backend",
            "network",
            "pods_per_host",
            "tweedd",
            "lease_ttl",
            "underlay_netns",
            "etcd",
            "hosts",
        ],
    );
    first_release(&mut v["etcd"], &["pid", "endpoints", "data_dir", "log"]);
    for h in v["hosts"].as_array_mut().unwrap() {
        first_release(
            h,
            &[
                "name",
                "netns",
                "public_ip",
                "agent_pid",
                "log",
                "subnet_file",
                "agent_state_dir",
                "subnet",
                "mtu",
                "pods",
            ],
        );
        for p in h["pods"].as_array_mut().unwrap() {
            first_release(p, &["name", "netns", "ip"]);
        }
    }
    std::fs::write(&path, v.to_string()).unwrap();

    let out = cli(
        root.path(),
        &["status", "--name", &name, "--output", "json"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        st["hosts"][1]["pods"][0]["netns"],
        format!("twl-{name}-h2-p1")
    );
    assert!(st["hosts"][0]["api_socket"].is_null());

    let out = cli(root.path(), &["down", "--name", &name]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("warning"), "{err}");
    assert_gone(root.path(), &name, pids);
    drop(lab);
}

/// A state.json this tweed-lab cannot read: `status` names the file and the field, and `down`
/// still takes everything down (by the namespaces' names), saying what it could not do.
#[test]
fn a_state_with_a_bad_field_is_named_and_down_still_works() {
    require_root!(NEEDS_ROOT);
    let root = tempfile::tempdir().unwrap();
    let (name, lab, pids, path) = one_pod_lab(root.path(), "pv", 1, PodsVia::Cni);
    let text = std::fs::read_to_string(&path).unwrap();
    let bad = text.replace(r#""backend": "vxlan""#, r#""backend": "ipip""#);
    assert_ne!(bad, text);
    std::fs::write(&path, bad).unwrap();

    let out = cli(root.path(), &["status", "--name", &name]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("field `backend`"), "{err}");

    let out = cli(root.path(), &["down", "--name", &name]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning") && err.contains("field `backend`"),
        "{err}"
    );
    assert_gone(root.path(), &name, pids);
    drop(lab);
}
