//! DEL's detached link delete (root only): when DEL returns, both veth ends are gone and the
//! attachment can be added again at once, even while the forked child is still inside the
//! kernel's teardown; that child holds neither stdout nor stderr; when it fails, DEL deletes
//! synchronously; and a child killed at any point leaves nothing that GC or the next DEL does
//! not collect.
//!
//! The child is held where a test needs it from outside the plugin, by tracing it (see
//! `common/trace.rs`): the binary under test has no hooks.

mod common;

use std::time::{Duration, Instant};

use common::trace::{Children, Stop, Traced};
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

    /// DEL, with the plugin and its teardown child both killed at the fork: nothing deleted
    /// or released yet.
    fn del_killed_at_the_fork(&self) {
        let mut t = self.del_traced(Children::HoldAtStart);
        let Stop::Forked(child) =
            t.run_until(|s| matches!(s, Stop::Forked(_)), Duration::from_secs(60))
        else {
            unreachable!("run_until returns only the stop asked for")
        };
        t.kill(child);
        t.kill(t.pid);
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
        // The plugin and its forked child are named after the binary: a cheap filter before
        // reading environments, so that a just-returned DEL's child is found while it is
        // still at work.
        if std::fs::read(e.path().join("comm")).is_ok_and(|c| c != b"tweed\n") {
            continue;
        }
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

/// The syscall `pid` is blocked in, from `/proc/<pid>/syscall`; `None` when it runs in user
/// space or is gone.
fn blocked_in(pid: i32) -> Option<i64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/syscall")).ok()?;
    s.split_whitespace()
        .next()?
        .parse()
        .ok()
        .filter(|&nr| nr >= 0)
}

/// The detached child of a DEL of `id` that has just returned, if it is still inside its
/// `send` of the `RTM_DELLINK`: the kernel's teardown of the veth is still running.
fn child_tearing_down(id: &str) -> Option<i32> {
    plugin_processes(id)
        .into_iter()
        .find(|&p| blocked_in(p) == Some(libc::SYS_sendto))
}

/// Waits until no process of `id` is alive any more.
fn until_no_process(id: &str) {
    let start = Instant::now();
    while !plugin_processes(id).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{id}: a process still running"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The attachment in `c` works: the container end is up with its address and reaches the
/// gateway on the bridge, and the host holds exactly one tweed veth end and one record.
fn assert_works(n: &Node, c: &NetnsGuard, add: &PluginRun, what: &str) {
    let v = add.json();
    let gw = v["ips"][0]["gateway"]
        .as_str()
        .expect("a gateway")
        .to_string();
    assert!(
        links(c).contains(&"eth0".to_string()),
        "{what}: {:?}",
        links(c)
    );
    assert_eq!(n.tw_links().len(), 1, "{what}: {:?}", n.tw_links());
    assert_eq!(n.records("tnet").len(), 1, "{what}");
    let ping = c.exec(&["ping", "-c1", "-W2", &gw]);
    assert!(ping.is_ok(), "{what}: ping {gw}: {ping:?}");
}

#[test]
fn an_add_right_after_del_is_not_raced_by_the_teardown_still_running() {
    require_root!(NEEDS_ROOT);
    let n = node("drc");
    let conf = n.conf("1.0.0", json!({"hairpinMode": true}));
    let c = n.container(1);
    let id = format!("{}-rc", n.prefix);
    let path = c.path_str();
    let add = n.tweed("ADD", &id, &path, &conf);
    assert!(add.ok(), "{}", add.stdout);
    // How many of the ADDs started while the previous DEL's child was still in the kernel's
    // teardown, and how many of those were over before it finished.
    let (mut overlapped, mut inside) = (0, 0);
    const ROUNDS: usize = 10;
    let mut last = add;
    for i in 0..ROUNDS {
        let del = n.tweed("DEL", &id, &path, &conf);
        assert!(del.ok(), "DEL {i}: {}", del.stdout);
        let child = child_tearing_down(&id);
        let add = n.tweed("ADD", &id, &path, &conf);
        assert!(add.ok(), "ADD {i} right after DEL: {}", add.stdout);
        if let Some(p) = child {
            overlapped += 1;
            inside += usize::from(blocked_in(p) == Some(libc::SYS_sendto));
        }
        assert_works(&n, &c, &add, &format!("ADD {i}"));
        last = add;
    }
    eprintln!(
        "{overlapped} of {ROUNDS} ADDs started while the teardown ran, {inside} ended before it"
    );
    assert!(
        overlapped > 0,
        "no DEL's child was seen inside the teardown: the race was never exercised"
    );
    // Every teardown is over now: none of them touched the new attachment.
    until_no_process(&id);
    assert_works(&n, &c, &last, "after every teardown ended");
    let del = n.tweed("DEL", &id, &path, &conf);
    assert!(del.ok(), "{}", del.stdout);
    assert_gone(&n, &c, "the last DEL");
}

/// After a crash somewhere in DEL: GC with no valid attachment, then the DEL the runtime
/// retries, leave nothing; the attachment can then be added and deleted again.
fn collected_after_crash(a: &Added, what: &str) {
    let n = &a.n;
    let gc_conf = n.conf("1.1.0", json!({"cni.dev/valid-attachments": []}));
    let gc = n.tweed("GC", "", "", &gc_conf);
    assert!(gc.ok(), "{what}: GC: {}", gc.stdout);
    let del = n.tweed("DEL", &a.id, &a.path, &a.conf);
    assert!(del.ok(), "{what}: DEL again: {}", del.stdout);
    until_no_process(&a.id);
    assert_gone(n, &a.c, what);
    let add = n.tweed("ADD", &a.id, &a.path, &a.conf);
    assert!(add.ok(), "{what}: ADD again: {}", add.stdout);
    assert_works(n, &a.c, &add, what);
    assert!(n.tweed("DEL", &a.id, &a.path, &a.conf).ok());
    until_no_process(&a.id);
    assert_gone(n, &a.c, &format!("{what}, after ADD and DEL again"));
}

#[test]
fn a_teardown_child_killed_at_any_point_leaves_nothing_uncollected() {
    require_root!(NEEDS_ROOT);

    // Before it sends: the plugin sees it die with the veth still listed and deletes it.
    let a = added("dk1");
    let mut t = a.del_traced(Children::HoldAtStart);
    let Stop::Forked(child) =
        t.run_until(|s| matches!(s, Stop::Forked(_)), Duration::from_secs(60))
    else {
        unreachable!("run_until returns only the stop asked for")
    };
    t.kill(child);
    t.go_on(Stop::Forked(child));
    del_ok(&a.n, &a.c, t);
    collected_after_crash(&a, "child killed before sending");

    // Inside the kernel's teardown, after DEL returned: the kernel finishes the delete all
    // the same (the wait there is not interruptible); the record went with DEL.
    let a = added("dk2");
    let mut caught = 0;
    for i in 0..5 {
        let del = a.n.tweed("DEL", &a.id, &a.path, &a.conf);
        assert!(del.ok(), "{}", del.stdout);
        if let Some(p) = child_tearing_down(&a.id) {
            // SAFETY: kill has no memory preconditions; p is a live tweed child found above.
            unsafe { libc::kill(p, libc::SIGKILL) };
            caught += 1;
        }
        until_no_process(&a.id);
        assert_gone(
            &a.n,
            &a.c,
            &format!("child killed in the teardown, round {i}"),
        );
        assert!(a.n.tweed("ADD", &a.id, &a.path, &a.conf).ok());
    }
    assert!(caught > 0, "no child was caught inside the teardown");
    assert!(a.n.tweed("DEL", &a.id, &a.path, &a.conf).ok());
    collected_after_crash(&a, "child killed in the teardown");

    // After the kernel's ACK, as it exits.
    let a = added("dk3");
    let (mut t, _) = del_ok(&a.n, &a.c, a.del_traced(Children::HoldAtExit));
    let child = t.forks()[0];
    t.kill(child);
    collected_after_crash(&a, "child killed at its exit");

    // The plugin and its child both killed at the fork: nothing was deleted or released,
    // and GC collects both the veth and the record.
    let a = added("dk4");
    a.del_killed_at_the_fork();
    assert_eq!(a.n.tw_links().len(), 1, "the veth outlived the crash");
    assert_eq!(
        a.n.records("tnet").len(),
        1,
        "the record outlived the crash"
    );
    let gc_conf = a.n.conf("1.1.0", json!({"cni.dev/valid-attachments": []}));
    assert!(a.n.tweed("GC", "", "", &gc_conf).ok());
    assert!(a.n.tw_links().is_empty(), "GC: {:?}", a.n.tw_links());
    assert!(a.n.records("tnet").is_empty(), "GC");
    collected_after_crash(&a, "plugin and child killed at the fork");

    // The same crash, collected by the runtime's retried DEL alone.
    let a = added("dk5");
    a.del_killed_at_the_fork();
    let del = a.n.tweed("DEL", &a.id, &a.path, &a.conf);
    assert!(del.ok(), "{}", del.stdout);
    until_no_process(&a.id);
    assert_gone(&a.n, &a.c, "DEL after the plugin was killed at the fork");
}
