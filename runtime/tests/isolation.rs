//! What a container sees: pid 1, its hostname, its own mounts (invisible from the host),
//! masked /proc, read-only /sys, Docker's capabilities, no_new_privs, the honest /proc, and
//! exec joining every namespace and the cgroup. Also memory and pids limits.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn pid_one_hostname_and_private_mounts() {
    require_root!(NEEDS_ROOT);
    let e = Env::with_busybox();
    let out = e.sh(
        &["--hostname", "box1"],
        "echo $$; hostname; cat /etc/hostname; ps -o pid,comm; exit 0",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..3], ["1", "box1", "box1"], "{out}");
    // Only the container's own processes: the shell as pid 1 and ps.
    let procs: Vec<(u32, &str)> = lines[4..]
        .iter()
        .map(|l| {
            let mut w = l.split_whitespace();
            (w.next().unwrap().parse().unwrap(), w.next().unwrap())
        })
        .collect();
    assert_eq!(procs.len(), 2, "{out}");
    assert_eq!(procs[0], (1, "sh"));
    assert_eq!(procs[1].1, "ps");

    // Mounts made for the container exist only in its mount namespace.
    e.start(&["--name", "m", "busybox", "sleep", "1000"]);
    let pid = e.init_pid("m");
    let inside = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    assert!(
        inside.contains(" / ") && inside.contains("overlay"),
        "{inside}"
    );
    assert!(inside.contains("/proc") && inside.contains("devpts"));
    let merged = e.image_root.to_string_lossy().into_owned();
    let host = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !host.contains(&merged),
        "container mounts leaked to the host:\n{host}"
    );
    assert!(!host.contains("box1"));
    // The host's hostname is untouched.
    let hn = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_ne!(hn.trim(), "box1");
    e.ok(&["rm", "-f", "m"]);
    e.assert_nothing_left();
}

#[test]
fn proc_sys_dev_and_privileges_as_docker() {
    require_root!(NEEDS_ROOT);
    let e = Env::with_busybox();
    let out = e.sh(
        &[],
        "cat /proc/keys 2>/dev/null | wc -c; cat /proc/timer_list 2>/dev/null | wc -c; \
         touch /sys/x 2>/dev/null && echo sys-rw || echo sys-ro; \
         echo 1 > /proc/sys/kernel/hostname 2>/dev/null && echo procsys-rw || echo procsys-ro; \
         grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; ls /dev | tr '\\n' ' '",
    );
    let l: Vec<&str> = out.lines().collect();
    // Masked (both exist on any kernel with keys and timers; the host shows content).
    assert!(!std::fs::read_to_string("/proc/timer_list")
        .unwrap()
        .is_empty());
    assert_eq!(l[0].trim(), "0", "/proc/keys masked");
    assert_eq!(l[1].trim(), "0", "/proc/timer_list masked");
    assert_eq!(l[2], "sys-ro");
    assert_eq!(l[3], "procsys-ro");
    assert_eq!(l[4], "CapEff:\t00000000a80425fb");
    assert_eq!(l[5], "CapBnd:\t00000000a80425fb");
    assert_eq!(l[6], "NoNewPrivs:\t1");
    for d in [
        "null", "zero", "full", "random", "urandom", "tty", "pts", "shm", "ptmx",
    ] {
        assert!(
            l[7].split(' ').any(|x| x == d),
            "/dev/{d} missing: {}",
            l[7]
        );
    }
    assert!(!l[7].contains("sda") && !l[7].contains("kmsg"));
    // CAP_SYS_ADMIN is gone: mounting fails.
    let o = e.run(&[
        "run", "--rm", "busybox", "mount", "-t", "tmpfs", "t", "/mnt",
    ]);
    assert!(!o.status.success());
}

#[test]
fn honest_proc_and_sysinfo() {
    require_root!(NEEDS_ROOT);
    let e = Env::with_busybox();
    let out = e.sh(
        &["--memory", "64m", "--cpus", "0.5"],
        "grep -E '^(MemTotal|MemFree):' /proc/meminfo; free | grep Mem:; nproc; \
         grep -c ^processor /proc/cpuinfo; cat /sys/devices/system/cpu/online",
    );
    let l: Vec<&str> = out.lines().collect();
    let kb = |s: &str| s.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap();
    assert_eq!(kb(l[0]), 65536, "{out}");
    let free_kb = kb(l[1]);
    assert!(free_kb > 40_000 && free_kb <= 65536, "MemFree {free_kb}");
    // busybox free asks sysinfo(2): answered by the supervisor.
    assert_eq!(l[2].split_whitespace().nth(1), Some("65536"), "{out}");
    let used: u64 = l[2].split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!(used < 65536);
    assert_eq!(l[3], "1");
    assert_eq!(l[4], "1");
    assert_eq!(l[5], "0");
    // MemFree follows usage: fill 24 MiB of tmpfs-free memory (a shell variable) and look again.
    e.start(&[
        "--name", "mf", "--memory", "64m", "busybox", "sleep", "1000",
    ]);
    let before = e.ok(&["exec", "mf", "free"]);
    assert!(before.contains("65536"), "{before}");
    let out = e.ok(&["exec", "mf", "sh", "-c", "dd if=/dev/zero of=/dev/shm/f bs=1M count=24 2>/dev/null; sleep 1.5; grep MemFree /proc/meminfo; free | grep Mem:"]);
    let l: Vec<&str> = out.lines().collect();
    assert!(kb(l[0]) < 65536 - 20_000, "MemFree did not drop: {out}");
    let free_col: u64 = l[1].split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!(
        free_col < 65536 - 20_000,
        "sysinfo free did not drop: {out}"
    );
    // The views are read by any uid of the container (they are 0444, like /proc's own), and
    // written by none, root included (read-only bind mounts).
    let out = e.sh(
        &["--memory", "64m", "--cpus", "0.5", "-u", "65534:65534"],
        "id -u; grep ^MemTotal: /proc/meminfo; grep -c ^processor /proc/cpuinfo; \
         cat /sys/devices/system/cpu/online",
    );
    let l: Vec<&str> = out.lines().collect();
    assert_eq!(l[0], "65534", "{out}");
    assert_eq!(kb(l[1]), 65536, "{out}");
    assert_eq!(&l[2..], ["1", "0"], "{out}");
    let out = e.sh(
        &["--memory", "64m", "--cpus", "0.5"],
        "for f in /proc/meminfo /proc/cpuinfo /sys/devices/system/cpu/online; do \
         (echo x > $f) 2>/dev/null && echo wrote $f; done; echo done",
    );
    assert_eq!(out.trim(), "done", "{out}");
    // Without limits the host's view is shown unchanged.
    let out = e.ok(&[
        "run",
        "--rm",
        "busybox",
        "grep",
        "MemTotal",
        "/proc/meminfo",
    ]);
    let host = std::fs::read_to_string("/proc/meminfo").unwrap();
    assert_eq!(out.trim(), host.lines().next().unwrap());
}

#[test]
fn exec_joins_every_namespace_and_the_cgroup() {
    require_root!(NEEDS_ROOT);
    let e = Env::with_busybox();
    e.start(&[
        "--name", "x", "--memory", "64m", "--cpus", "0.5", "busybox", "sleep", "1000",
    ]);
    let pid = e.init_pid("x");
    let script = "for n in cgroup ipc mnt net pid uts; do readlink /proc/self/ns/$n; done; cat /proc/self/cgroup; echo $$; nproc";
    let out = e.ok(&["exec", "x", "sh", "-c", script]);
    let lines: Vec<&str> = out.lines().collect();
    for (i, n) in ["cgroup", "ipc", "mnt", "net", "pid", "uts"]
        .iter()
        .enumerate()
    {
        let want = std::fs::read_link(format!("/proc/{pid}/ns/{n}")).unwrap();
        assert_eq!(lines[i], want.to_string_lossy(), "namespace {n}");
    }
    // Seen from inside its cgroup namespace, the exec'd shell is at the root of every
    // hierarchy, exactly like the init.
    let init_view = e.ok(&["exec", "x", "cat", "/proc/1/cgroup"]);
    let n = init_view.lines().count();
    assert_eq!(lines[6..6 + n].join("\n"), init_view.trim_end());
    // Seen from the host, the exec'd process is in the container's cgroups.
    let cg = cgroup_dir(&e, "x", "memory");
    let out = e.ok(&["exec", "x", "sh", "-c", "echo $$; sleep 0.5"]);
    let _ = out;
    let procs = std::fs::read_to_string(format!("{cg}/cgroup.procs")).unwrap();
    assert!(procs.lines().any(|p| p == pid.to_string()));
    let mut child = e.cmd(&["exec", "x", "sleep", "3"]).spawn().unwrap();
    e.wait_until("exec'd sleep in the cgroup", Duration::from_secs(5), || {
        std::fs::read_to_string(format!("{cg}/cgroup.procs"))
            .unwrap()
            .lines()
            .count()
            >= 3
    });
    child.kill().unwrap();
    child.wait().unwrap();
    // The exec'd process is a pid of the container's namespace and has the same CPU view.
    assert!(lines[6 + n].parse::<u32>().unwrap() > 1);
    assert_eq!(lines[7 + n], "1");
    e.ok(&["rm", "-f", "x"]);
    e.assert_nothing_left();
}

#[test]
fn memory_hog_is_oom_killed_and_inspect_says_so() {
    require_root!(NEEDS_ROOT);
    let e = Env::with_busybox();
    let o = e.run(&[
        "run",
        "--name",
        "hog",
        "--memory",
        "16m",
        "busybox",
        "sh",
        "-c",
        "x=a; while true; do x=$x$x; done",
    ]);
    assert_eq!(o.status.code(), Some(137));
    let st = &e.inspect("hog")["State"];
    assert_eq!(st["OOMKilled"], true);
    assert_eq!(st["ExitCode"], 137);
    assert!(e.ok(&["ps"]).contains("OOM killed"));
    e.ok(&["rm", "hog"]);
    e.assert_nothing_left();
}

#[test]
fn fork_bomb_stops_at_the_pids_limit() {
    require_root!(NEEDS_ROOT);
    let e = Env::with_busybox();
    // The bomb runs in a subshell (ash gives up when a fork fails); the init then execs.
    e.start(&[
        "--name",
        "fb",
        "--pids",
        "20",
        "busybox",
        "sh",
        "-c",
        "(for i in $(seq 1 100); do sleep 30 & done); exec sleep 1000",
    ]);
    let cg = cgroup_dir(&e, "fb", "pids");
    std::thread::sleep(Duration::from_secs(2));
    let current: u64 = std::fs::read_to_string(format!("{cg}/pids.current"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(current <= 20, "pids.current {current}");
    assert!(current >= 15, "the bomb did fork: {current}");
    let events = std::fs::read_to_string(format!("{cg}/pids.events")).unwrap();
    assert!(
        events.contains("max") && !events.contains("max 0"),
        "{events}"
    );
    assert!(e.ok(&["logs", "fb"]).is_empty());
    let o = e.run(&["logs", "fb"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("can't fork"));
    e.ok(&["rm", "-f", "fb"]);
    e.assert_nothing_left();
}

#[test]
fn volumes_and_workdir_and_env() {
    require_root!(NEEDS_ROOT);
    let e = Env::with_busybox();
    let host = e.mkdir("vol");
    std::fs::write(host.join("in"), "from host\n").unwrap();
    let rw = format!("{}:/data", host.display());
    let ro = format!("{}:/ro:ro", host.display());
    let out = e.sh(
        &["-v", &rw, "-v", &ro, "-w", "/data", "-e", "GREETING=hi"],
        "pwd; cat in; echo out > out; echo x > /ro/y 2>/dev/null || echo ro; echo $GREETING",
    );
    assert_eq!(out, "/data\nfrom host\nro\nhi\n");
    assert_eq!(std::fs::read_to_string(host.join("out")).unwrap(), "out\n");
    e.assert_nothing_left();
}

/// The container's directory for `controller`: v1 keeps one per hierarchy, v2 one for all
/// (the VM test runs these on a unified host, `scripts/vm-test`).
fn cgroup_dir(e: &Env, name: &str, controller: &str) -> String {
    let cg = &e.inspect(name)["Cgroup"];
    cg["dirs"][controller]
        .as_str()
        .or_else(|| cg["dir"].as_str())
        .unwrap_or_else(|| panic!("no {controller} cgroup in {cg}"))
        .to_string()
}

/// The init layer (hostname, hosts, resolv.conf, volume mount points) and the overlay's mount
/// point live on a tmpfs the init mounts in its own mount namespace: the host's mount table
/// never shows it, the disk holds only the overlay's upper and work dirs, and what the
/// container writes over an init-layer file is copied up to disk like any other write.
#[test]
fn the_init_layer_lives_on_a_scratch_tmpfs_nobody_sees() {
    require_root!(NEEDS_ROOT);
    let e = Env::with_busybox();
    let host_before = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let vol = e.mkdir("vol");
    let v = format!("{}:/srv/data", vol.display());
    let id = e.start(&[
        "--name",
        "s",
        "--hostname",
        "scratchy",
        "-v",
        &v,
        "busybox",
        "sleep",
        "1000",
    ]);
    let out = e.ok(&[
        "exec",
        "s",
        "sh",
        "-c",
        "cat /etc/hostname; grep -c localhost /etc/hosts; test -d /srv/data && echo dir; \
         stat -c '%a %u' /etc /etc/hosts; echo '10.1.2.3 extra' >> /etc/hosts",
    ]);
    assert_eq!(out, "scratchy\n2\ndir\n755 0\n644 0\n", "{out}");
    // While it runs: the container's root is the overlay whose topmost lower (the init layer it
    // just read its hostname from) lies under the scratch mount point, yet on the host that
    // mount point is an empty directory with nothing mounted on or under it. So the init layer
    // is on a filesystem (the tmpfs) mounted only in the container's namespace.
    let scratch = e.image_root.join("scratch");
    let scratch = scratch.to_string_lossy();
    let pid = e.init_pid("s");
    let inside = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root = inside
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .unwrap_or_else(|| panic!("no root mount in the container:\n{inside}"));
    let (_, sb) = root.split_once(" - ").unwrap();
    assert!(sb.starts_with("overlay "), "{root}");
    let lower = sb
        .split([' ', ','])
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap_or_else(|| panic!("no lowerdir in {root}"));
    let top = lower.split(':').next().unwrap();
    assert!(
        top.starts_with(&format!("{scratch}/")),
        "the init layer {top} is not under {scratch}"
    );
    assert!(
        !std::path::Path::new(top).exists(),
        "{top} visible on the host"
    );
    assert!(list(&e.image_root.join("scratch")).is_empty());
    let host = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let under_scratch: Vec<&str> = host
        .lines()
        .filter(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|mp| mp == scratch || mp.starts_with(&format!("{scratch}/")))
        })
        .collect();
    assert!(under_scratch.is_empty(), "{under_scratch:?}");
    // Inside, no mount point lies under the scratch path either: the tmpfs went with the old
    // root at the pivot, kept alive only by the overlay.
    let mount_points: Vec<&str> = inside.lines().filter_map(|l| l.split(' ').nth(4)).collect();
    assert!(
        !mount_points.iter().any(|mp| mp.starts_with(&*scratch)),
        "{mount_points:?}"
    );
    // On disk: the overlay's writable dirs and nothing else; the host's scratch mount point
    // stays empty, and no mount of the container reached the host's table.
    let data = e.image_root.join("containers").join(&id);
    assert_eq!(list(&data), ["upper", "work"]);
    let copied = std::fs::read_to_string(data.join("upper/etc/hosts")).unwrap();
    assert!(copied.ends_with("10.1.2.3 extra\n"), "{copied}");
    assert!(list(&e.image_root.join("scratch")).is_empty());
    assert_eq!(e.host_mounts(), Vec::<String>::new());
    let host_after = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let ours = |t: &str| {
        t.lines()
            .filter(|l| l.contains(&*e.dir.path().to_string_lossy()))
            .count()
    };
    assert_eq!(ours(&host_before), ours(&host_after));
    e.ok(&["rm", "-f", "s"]);
    e.assert_nothing_left();
    assert!(list(&e.image_root.join("scratch")).is_empty());
}

/// The init writes the init layer now: when it cannot (a volume target under one of its
/// files), `run` fails naming the layer and the path, and nothing of the container is left.
#[test]
fn a_failed_init_layer_is_reported_and_leaves_nothing() {
    require_root!(NEEDS_ROOT);
    let e = Env::with_busybox();
    let vol = e.mkdir("vol");
    let v = format!("{}:/etc/hostname/x", vol.display());
    let err = e.fails(&["run", "--rm", "-v", &v, "busybox", "true"]);
    assert!(
        err.contains("init layer") && err.contains("/etc/hostname in the container"),
        "{err}"
    );
    e.assert_nothing_left();
    let err = e.fails(&[
        "run", "-d", "--name", "f", "-v", &v, "busybox", "sleep", "9",
    ]);
    assert!(err.contains("init layer"), "{err}");
    e.assert_nothing_left();
}
