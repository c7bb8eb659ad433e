//! The supervisor is the direct child of the process that starts the container (one fork,
//! no middle process), in a session of its own. A library caller that runs containers
//! in-process reaps it: no zombie supervisor is left behind once the container's exit is
//! waited for. (One test in this binary: it forks from the test process, so no other test
//! thread may be running at the fork.)

mod common;

use std::time::Duration;

use common::*;
use tweed_runtime::plan::RunSpec;
use tweed_runtime::runtime::{Options, Runtime};
use tweed_runtime::state::Status;

/// (state, ppid, pgrp, session) from /proc/<pid>/stat; None once the pid is gone.
fn stat(pid: i32) -> Option<(char, u32, i32, i32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut f = s[s.rfind(')')? + 2..].split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgrp = f.next()?.parse().ok()?;
    let sid = f.next()?.parse().ok()?;
    Some((state, ppid, pgrp, sid))
}

#[test]
fn in_process_caller_owns_and_reaps_its_supervisor() {
    require_root!(NEEDS_ROOT);
    let e = Env::with_busybox();
    let rt = Runtime::new(Options {
        run_root: e.run_root.clone(),
        image_root: e.image_root.clone(),
        cgroup_parent: e.cgroup_parent.clone(),
        ..Options::default()
    })
    .unwrap();
    let spec = RunSpec {
        image: "busybox".into(),
        cmd: vec!["sleep".into(), "1000".into()],
        net: Some("none".into()),
        ..RunSpec::default()
    };
    let id = rt.run(&spec).unwrap();
    let shim = rt.inspect(&id).unwrap()["State"]["SupervisorPid"]
        .as_i64()
        .unwrap() as i32;
    let me = std::process::id();
    let (state, ppid, pgrp, sid) = stat(shim).expect("the supervisor runs");
    assert_ne!(state, 'Z');
    // Our child, not a grandchild orphaned by a middle process ...
    assert_eq!(ppid, me, "the supervisor's parent");
    // ... yet in its own session and process group: no terminal, no ^C of ours reaches it.
    assert_eq!((pgrp, sid), (shim, shim));
    assert_ne!(stat(me as i32).unwrap().3, shim);

    rt.kill(&id, libc::SIGKILL).unwrap();
    let exit = rt.wait(&id, Some(Duration::from_secs(20))).unwrap();
    assert_eq!(exit.code, 137);
    // The supervisor ended after recording the exit and `wait` reaped it: no zombie child.
    // (The pid is gone, or already someone else's: not a child of ours.)
    let left = stat(shim);
    assert!(
        !matches!(left, Some((_, ppid, _, _)) if ppid == me),
        "supervisor {shim} left behind: {left:?}"
    );
    assert!(matches!(rt.status(&id).unwrap(), Status::Exited { .. }));
    rt.remove(&id, false).unwrap();
    e.assert_nothing_left();
}
