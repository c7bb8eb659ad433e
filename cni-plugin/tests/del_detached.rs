//! DEL's detached link delete (root only): when DEL returns, both veth ends are gone and the
//! attachment can be added again at once; the forked child that finishes the kernel's teardown
//! holds neither stdout nor stderr; when the child fails, DEL deletes synchronously.
//!
//! The child is held where a test needs it from outside the plugin, by tracing it (see
//! `common/trace.rs`): the binary under test has no hooks.

mod common;

use std::time::{Duration, Instant};

use common::trace::{Children, Traced};
use common::{links, node, wait_ok, Containers, Node, NEEDS_ROOT};
use serde_json::json;
use tweed_testkit::cni::{Call, PluginRun};
use tweed_testkit::{require_root, NetnsGuard};

/// One attachment, added, whose DEL the test runs.
struct Added {
    // Before `n`, so that the container namespace goes first, as a runtime removes it.
    c: NetnsGuard,
    n: Node,
    conf: String,
    id: String,
    path: String,
}

fn added(tag: &str) -> Added {
    let n = node(tag);
    let conf = n.conf("1.0.0", json!({}));
    let c = n.container(1);
    let id = format!("{}-{tag}", n.prefix);
    let path = c.path_str();
    let add = n.tweed("ADD", &id, &path, &conf);
    assert!(add.ok(), "{}", add.stdout);
    Added {
        c,
        n,
        conf,
        id,
        path,
    }
}

impl Added {
    /// DEL, traced, its forked children handled as `children` says.
    fn del_traced(&self, children: Children) -> Traced {
        let call = Call::new("DEL", &self.id, &self.path);
        self.n.traced(&call, &self.conf, false, children)
    }
}

/// What every DEL must leave: the container end, the host end and the address record gone.
fn assert_gone(n: &Node, c: &NetnsGuard, what: &str) {
    assert_eq!(links(c), ["lo"], "{what}: the container end is gone");
    assert!(n.tw_links().is_empty(), "{what}: {:?}", n.tw_links());
    assert!(n.records("tnet").is_empty(), "{what}");
}

/// Waits for the traced DEL `t` and asserts what every DEL must give: success, nothing on
/// stdout, both ends and the record gone. The trace and the run, for what the test checks more.
fn del_ok(n: &Node, c: &NetnsGuard, mut t: Traced) -> (Traced, PluginRun) {
    let del = t.wait(Duration::from_secs(60));
    assert!(del.ok(), "{} {}", del.stdout, del.stderr);
    assert!(del.stdout.trim().is_empty(), "{:?}", del.stdout);
    assert_gone(n, c, "DEL");
    (t, del)
}

/// Live (not zombie) processes whose environment holds `CNI_CONTAINERID=<id>`.
fn plugin_processes(id: &str) -> Vec<i32> {
    let needle = format!("CNI_CONTAINERID={id}");
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // A zombie's environment reads empty.
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|v| v == needle.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn del_returns_with_both_ends_gone_and_the_same_attachment_adds_again_at_once() {
    require_root!(NEEDS_ROOT);
    let n = node("dre");
    let conf = n.conf("1.0.0", json!({"hairpinMode": true}));
    let c = n.container(1);
    let id = format!("{}-re", n.prefix);
    for i in 0..20 {
        let add = n.tweed("ADD", &id, &c.path_str(), &conf);
        assert!(add.ok(), "ADD {i} right after DEL: {}", add.stdout);
        let del = n.tweed("DEL", &id, &c.path_str(), &conf);
        assert!(del.ok(), "DEL {i}: {}", del.stdout);
        assert!(del.stdout.trim().is_empty(), "{:?}", del.stdout);
        assert_gone(&n, &c, &format!("DEL {i}"));
    }
    // A DEL of what is already gone still succeeds.
    assert!(n.tweed("DEL", &id, &c.path_str(), &conf).ok());
}

#[test]
fn the_detached_child_holds_neither_stdout_nor_stderr() {
    require_root!(NEEDS_ROOT);
    let a = added("dso");
    let n = &a.n;

    // The child is held alive as it exits, after its ACK, until killed. `wait` returns once
    // the plugin exited and both pipes reached EOF, and fails if they do not.
    let (mut t, out) = del_ok(n, &a.c, a.del_traced(Children::HoldAtExit));
    assert!(out.stdout.is_empty() && out.stderr.is_empty());

    // The pipes reached EOF while the child was still alive, and it holds one descriptor: the
    // netlink socket.
    assert_eq!(t.forks().len(), 1, "one detached child");
    let child = t.forks()[0];
    assert_eq!(t.held(), [child], "alive and held at its exit");
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{child}/fd"))
        .unwrap()
        .flatten()
        .map(|e| {
            std::fs::read_link(e.path())
                .map(|t| t.display().to_string())
                .unwrap_or_default()
        })
        .collect();
    t.kill(child);
    assert_eq!(fds.len(), 1, "{fds:?}");
    assert!(fds[0].starts_with("socket:"), "{fds:?}");
    assert_eq!(plugin_processes(&a.id), Vec::<i32>::new());
}

#[test]
fn a_child_that_never_sends_makes_del_delete_synchronously() {
    require_root!(NEEDS_ROOT);
    let a = added("dfb");
    let n = &a.n;

    // Held before its first instruction after fork: it never sends its request.
    let (t, _) = del_ok(n, &a.c, a.del_traced(Children::HoldAtStart));
    assert_eq!(t.forks().len(), 1, "one detached child");
    // The plugin killed and reaped its child before deleting: nothing of it is left.
    assert!(t.held().is_empty());
    assert_eq!(plugin_processes(&a.id), Vec::<i32>::new());
}

#[test]
fn detached_delete_off_deletes_in_the_plugin_and_forks_nothing() {
    require_root!(NEEDS_ROOT);
    let n = node("dsy");
    let conf = n.conf("1.0.0", json!({"detachedDelete": false}));
    let c = n.container(1);
    let id = format!("{}-sy", n.prefix);
    let add = n.tweed("ADD", &id, &c.path_str(), &conf);
    assert!(add.ok(), "{}", add.stdout);
    // Traced, every fork the plugin makes is seen; off, there must be none.
    let path = c.path_str();
    let call = Call::new("DEL", &id, &path);
    let (t, _) = del_ok(&n, &c, n.traced(&call, &conf, false, Children::Run));
    assert_eq!(t.forks(), &[] as &[i32], "a child was forked");
    // With it on (the default), the same DEL forks its one child.
    let on = n.conf("1.0.0", json!({}));
    assert!(n.tweed("ADD", &id, &path, &on).ok());
    let mut t = n.traced(&Call::new("DEL", &id, &path), &on, false, Children::Run);
    assert!(t.wait(Duration::from_secs(60)).ok());
    assert_eq!(t.forks().len(), 1);
    assert_gone(&n, &c, "DEL");
}

#[test]
fn parallel_dels_leave_no_device_record_or_process() {
    require_root!(NEEDS_ROOT);
    let n = node("dpa");
    const N: usize = 50;
    let conf = n.conf("1.0.0", json!({}));
    let Containers {
        netns: containers,
        paths,
        ids,
    } = n.containers(N, &format!("{}-p", n.prefix));
    for i in 0..N {
        let add = n.tweed("ADD", &ids[i], &paths[i], &conf);
        assert!(add.ok(), "ADD {i}: {}", add.stdout);
    }
    let dels = n.spawn_all("DEL", &ids, &paths, &conf);
    for (i, d) in dels.into_iter().enumerate() {
        wait_ok(d, &format!("DEL {i}"));
        assert_eq!(links(&containers[i]), ["lo"], "DEL {i}");
    }
    assert!(n.tw_links().is_empty(), "{:?}", n.tw_links());
    assert!(n.records("tnet").is_empty());
    // Every detached child finishes on its own.
    let start = Instant::now();
    while ids.iter().any(|id| !plugin_processes(id).is_empty()) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "detached children still running a minute later"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
