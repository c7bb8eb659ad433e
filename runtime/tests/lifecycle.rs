//! Container lifecycle through tweedctl: run, ps, logs, exec, stop, kill, wait, inspect, rm;
//! bad input leaves nothing behind; the supervisor outlives tweedctl.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn attached_run_streams_output_and_returns_the_exit_code() {
    require_root!(NEEDS_ROOT);
    let e = Env::with_busybox();
    let o = e.run(&[
        "run",
        "--rm",
        "busybox",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    assert_eq!(o.status.code(), Some(7));
    assert_eq!(stdout(&o), "out\n");
    assert!(String::from_utf8_lossy(&o.stderr).contains("err\n"));
    e.assert_nothing_left();
}

#[test]
fn detached_lifecycle() {
    require_root!(NEEDS_ROOT);
    let e = Env::with_busybox();
    let id = e.start(&[
        "--name",
        "web",
        "busybox",
        "sh",
        "-c",
        "echo started; exec sleep 1000",
    ]);
    assert_eq!(id.len(), 64);
    let ps = e.ok(&["ps"]);
    assert!(ps.contains("web") && ps.contains("running"), "{ps}");
    e.wait_until("log output", Duration::from_secs(5), || {
        e.ok(&["logs", "web"]) == "started\n"
    });
    // exec
    assert_eq!(e.ok(&["exec", "web", "echo", "hi"]), "hi\n");
    assert_eq!(
        e.run(&["exec", "web", "sh", "-c", "exit 5"]).status.code(),
        Some(5)
    );
    assert_eq!(e.run(&["exec", "web", "nope"]).status.code(), Some(127));
    // rm of a running container is refused
    assert!(e.fails(&["rm", "web"]).contains("is running"));
    // stop: sleep as pid 1 ignores SIGTERM, so the grace period ends in SIGKILL
    e.ok(&["stop", "-t", "1", "web"]);
    let st = &e.inspect("web")["State"];
    assert_eq!(st["Running"], false);
    assert_eq!(st["ExitCode"], 137);
    assert_eq!(st["OOMKilled"], false);
    assert!(e.ok(&["ps"]).contains("exited (137)"));
    assert_eq!(e.ok(&["wait", "web"]).trim(), "137");
    e.ok(&["rm", "web"]);
    assert!(e.fails(&["inspect", "web"]).contains("no such container"));
    e.assert_nothing_left();
}

#[test]
fn kill_and_force_remove() {
    require_root!(NEEDS_ROOT);
    let e = Env::with_busybox();
    // A shell with a TERM trap exits 143 on SIGTERM. It is the pid namespace's init, for
    // which the kernel drops a signal it has no handler for: `run -d` returns at its exec,
    // before the shell has set the trap, so the test waits for the shell to say it has.
    e.start(&[
        "--name",
        "t",
        "busybox",
        "sh",
        "-c",
        "trap 'exit 143' TERM; echo trapped; while true; do sleep 0.1; done",
    ]);
    e.wait_until("the TERM trap is set", Duration::from_secs(10), || {
        e.ok(&["logs", "t"]).contains("trapped")
    });
    e.ok(&["kill", "-s", "TERM", "t"]);
    assert_eq!(e.ok(&["wait", "t"]).trim(), "143");
    e.ok(&["rm", "t"]);
    e.start(&["--name", "f", "busybox", "sleep", "1000"]);
    e.ok(&["rm", "-f", "f"]);
    e.assert_nothing_left();
}

#[test]
fn bad_input_is_refused_and_leaves_nothing() {
    require_root!(NEEDS_ROOT);
    let e = Env::with_busybox();
    // Each refusal names its cause.
    let refusals: &[(&[&str], &str)] = &[
        (&["run", "nosuchimage", "true"], "unknown image"),
        (&["run", "--memory", "1m", "busybox", "true"], "too small"),
        (
            &["run", "--memory", "lots", "busybox", "true"],
            "invalid memory",
        ),
        (&["run", "--cpus", "999", "busybox", "true"], "out of range"),
        (&["run", "--pids", "0", "busybox", "true"], "pids"),
        (&["run", "--entrypoint", "", "busybox"], "no command"),
        (&["run", "busybox", "/no/such/binary"], "not found"),
        (
            &["run", "--net", "carrier-pigeon", "busybox", "true"],
            "network mode",
        ),
        (
            &["run", "-v", "relative:/x", "busybox", "true"],
            "invalid volume",
        ),
        (
            &["run", "--net", "container:nope", "busybox", "true"],
            "no such container",
        ),
        (
            &["run", "-w", "/etc/passwd", "busybox", "true"],
            "working directory",
        ),
    ];
    for (args, cause) in refusals {
        let err = e.fails(args);
        assert!(err.contains(cause), "{args:?}: {err}");
    }
    e.assert_nothing_left();
    // A busy name.
    e.start(&["--name", "taken", "busybox", "sleep", "1000"]);
    assert!(e
        .fails(&["run", "--name", "taken", "busybox", "true"])
        .contains("already in use"));
    assert_eq!(e.state_entries().len(), 1);
    e.ok(&["rm", "-f", "taken"]);
    e.assert_nothing_left();
}

#[test]
fn supervisor_survives_tweedctl_being_killed() {
    require_root!(NEEDS_ROOT);
    let e = Env::with_busybox();
    // An attached run: tweedctl waits for the container; kill tweedctl, the container goes on.
    let mut child = e
        .cmd(&[
            "run",
            "--name",
            "keep",
            "busybox",
            "sh",
            "-c",
            "echo up; exec sleep 1000",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    e.wait_until("the container", Duration::from_secs(10), || {
        e.ok(&["ps"]).contains("running")
    });
    let tweedctl_pid = child.id();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let ps = e.ok(&["ps"]);
    assert!(ps.contains("keep") && ps.contains("running"), "{ps}");
    assert_eq!(e.ok(&["exec", "keep", "echo", "alive"]), "alive\n");
    let pid = e.init_pid("keep");
    let shim = e.inspect("keep")["State"]["SupervisorPid"]
        .as_i64()
        .unwrap() as i32;
    // The supervisor outlived its parent, tweedctl: the kernel reparented it. It leads its
    // own session, so the signals of tweedctl's terminal never reached it.
    let stat = std::fs::read_to_string(format!("/proc/{shim}/stat")).unwrap();
    let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    let ppid: u32 = f[1].parse().unwrap();
    assert_ne!(ppid, tweedctl_pid);
    assert_eq!(f[3], shim.to_string(), "the supervisor's session");
    // Now kill the supervisor itself: the container dies with it and ps says so.
    // SAFETY: killing the supervisor this test started.
    unsafe {
        libc::kill(shim, libc::SIGKILL);
    }
    e.wait_until("the init to die", Duration::from_secs(5), || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    });
    let ps = e.ok(&["ps"]);
    assert!(ps.contains("dead (supervisor killed"), "{ps}");
    assert_eq!(e.inspect("keep")["State"]["Dead"], true);
    e.ok(&["rm", "keep"]);
    e.assert_nothing_left();
}

#[test]
fn detached_auto_remove() {
    require_root!(NEEDS_ROOT);
    let e = Env::with_busybox();
    e.start(&["--rm", "--name", "gone", "busybox", "true"]);
    e.wait_until("auto removal", Duration::from_secs(10), || {
        e.state_entries().is_empty()
    });
    e.assert_nothing_left();
}

#[test]
fn logs_follow_until_exit() {
    require_root!(NEEDS_ROOT);
    let e = Env::with_busybox();
    e.start(&[
        "--name",
        "l",
        "busybox",
        "sh",
        "-c",
        "for i in 1 2 3; do echo $i; sleep 0.2; done",
    ]);
    assert_eq!(e.ok(&["logs", "-f", "l"]), "1\n2\n3\n");
    e.ok(&["rm", "l"]);
}
