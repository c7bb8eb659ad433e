//! Root only: the guard makes a namespace with loopback up, runs commands and code in it, and on
//! drop kills what still runs there and deletes it.

use std::process::Stdio;
use std::time::Duration;

use tweed_testkit::{cmd, netns, require_root, NetnsGuard};

#[test]
fn a_guard_runs_things_inside_and_leaves_nothing() {
    require_root!("network namespaces");
    let ns = NetnsGuard::unique("twk");
    let name = ns.name().to_string();
    assert!(ns.ip(&["link", "show", "lo"]).unwrap().contains("UP"));
    let links = ns.json("ip", &["link", "show"]);
    assert_eq!(links.as_array().map(Vec::len), Some(1), "{links}");
    // Code on a thread inside sees the namespace's links only.
    let inside = ns.enter(|| std::fs::read_to_string("/proc/thread-self/net/dev").unwrap());
    assert_eq!(inside.lines().count(), 3, "{inside}");
    let err = ns.exec(&["false"]).unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("`ip netns exec {name} false` failed")),
        "{err}"
    );
    let mut sleeper = cmd::spawn_in(&name, &["sleep", "600"], Stdio::null());
    // `ip netns exec` enters the namespace after it starts: until then the guard cannot see it
    // (a loaded machine made that window long enough to lose the sleeper).
    let pid = sleeper.id().to_string();
    tweed_testkit::wait_for(
        Duration::from_secs(10),
        "the sleeper in the namespace",
        || {
            cmd::ip(&["netns", "pids", &name])
                .split_whitespace()
                .any(|p| p == pid)
        },
    );
    drop(ns);
    assert!(!netns::path_of(&name).exists());
    // Killed with the namespace: reaped at once, by a signal.
    assert!(sleeper.wait().unwrap().code().is_none());
}

#[test]
fn a_leftover_of_the_same_name_is_replaced() {
    require_root!("network namespaces");
    let name = tweed_testkit::unique("twk");
    cmd::ip(&["netns", "add", &name]);
    cmd::ip(&[
        "-n", &name, "link", "add", "stale", "type", "veth", "peer", "name", "stale1",
    ]);
    let ns = NetnsGuard::new(&name).unwrap();
    assert!(ns.ip(&["link", "show", "stale"]).is_err());
}
