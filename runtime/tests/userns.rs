//! `--userns`: the container's root is an unprivileged uid on the host, its image still reads
//! as root's inside (idmapped lowers), and what it writes lands on the host as the mapped ids.
//! The subid files are the test's own (TWEED_SUBUID/TWEED_SUBGID); /etc is not touched.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// An env whose subid files delegate `count` ids from `start` to tweed.
fn env_with_subids(start: u32, count: u32) -> Env {
    let mut e = Env::with_busybox();
    let line = format!("# test delegation\nsomeone:100000:65536\ntweed:{start}:{count}\n");
    for (var, name) in [("TWEED_SUBUID", "subuid"), ("TWEED_SUBGID", "subgid")] {
        let p = e.dir.path().join(name);
        std::fs::write(&p, &line).unwrap();
        e.extra.push((var.into(), p.display().to_string()));
    }
    e
}

fn upper_of(e: &Env, id: &str) -> PathBuf {
    e.image_root.join("containers").join(id).join("upper")
}

fn host_ids(p: &Path) -> (u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.uid(), m.gid())
}

/// Files called `name` under `dir`, not looking into `skip`.
fn find(dir: &Path, name: &str, skip: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        let ft = e.file_type().unwrap();
        if ft.is_dir() && p != skip {
            out.extend(find(&p, name, skip));
        } else if ft.is_file() && e.file_name() == name {
            out.push(p);
        }
    }
    out
}

#[test]
fn auto_root_is_a_mapped_uid_and_the_rootfs_works() {
    require_root!(NEEDS_ROOT);
    let base = 3_000_000;
    let e = env_with_subids(base, 2 * 65536);
    let id = e.start(&[
        "--userns",
        "auto",
        "busybox",
        "sh",
        "-c",
        // Inside: the map, root as usual, the image's files root's (idmapped), the init
        // layer's too (written owned by the mapped root), writes to new and existing files
        // (copy-up, from an image layer and from the init layer), then wait to be looked at
        // from the host.
        "cat /proc/self/uid_map /proc/self/gid_map; id -u; id -g; \
         stat -c '%u:%g' / /bin/busybox /etc/passwd /etc/hosts; \
         touch /made-by-root && mkdir /dir && echo x >> /etc/passwd && echo y >> /etc/hosts \
         && echo writes-ok; \
         exec sleep 1000",
    ]);
    let pid = e.init_pid(&id);
    e.wait_until("the writes", std::time::Duration::from_secs(20), || {
        e.ok(&["logs", &id]).contains("writes-ok")
    });
    let out = e.ok(&["logs", &id]);
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let b = base.to_string();
    assert_eq!(lines[0], ["0", b.as_str(), "65536"], "{out}");
    assert_eq!(lines[1], ["0", b.as_str(), "65536"], "{out}");
    assert_eq!(
        &lines[2..8],
        [["0"], ["0"], ["0:0"], ["0:0"], ["0:0"], ["0:0"]],
        "{out}"
    );

    // From the host: the init runs as the mapped uid, not as root.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(
        uid_line.split_whitespace().skip(1).collect::<Vec<_>>(),
        [b.as_str(); 4],
        "{status}"
    );
    // What root made inside belongs to the mapped ids on the host's upper dir; the image's
    // own files (lowers) are unchanged.
    let upper = upper_of(&e, &id);
    for f in ["made-by-root", "dir", "etc/passwd", "etc/hosts", "."] {
        assert_eq!(host_ids(&upper.join(f)), (base, base), "{f}");
    }
    let stored = find(&e.image_root, "passwd", &e.image_root.join("containers"));
    assert!(!stored.is_empty());
    for f in stored {
        assert_eq!(host_ids(&f), (0, 0), "{}", f.display());
    }

    // exec joins the same user namespace: not host root inside.
    let out = e.ok(&["exec", &id, "sh", "-c", "cat /proc/self/uid_map; id -u"]);
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["0", b.as_str(), "65536", "0"]
    );
    let exec_status = e.ok(&["exec", &id, "cat", "/proc/self/status"]);
    // The confinement is unchanged: the default seccomp filter and capability set.
    assert!(exec_status.contains("Seccomp:\t2"), "{exec_status}");

    // A second auto container gets the next block, never the first's.
    let id2 = e.start(&["--userns", "auto", "busybox", "sleep", "1000"]);
    let pid2 = e.init_pid(&id2);
    let map2 = std::fs::read_to_string(format!("/proc/{pid2}/uid_map")).unwrap();
    assert_eq!(
        map2.split_whitespace().collect::<Vec<_>>(),
        ["0", (base + 65536).to_string().as_str(), "65536"]
    );
    // The delegation is full now: a third is refused, naming the file, and leaves nothing.
    let err = e.fails(&["run", "--userns", "auto", "busybox", "true"]);
    assert!(err.contains("subuid") && err.contains("in use"), "{err}");

    e.ok(&["rm", "-f", &id, &id2]);
    e.assert_nothing_left();
}

/// `/proc/PID/uid_map` or `gid_map` as the kernel has it: (inside, host start, count).
fn kernel_map(pid: i32, which: &str) -> (u32, u32, u32) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{which}")).unwrap();
    let f: Vec<u32> = text
        .split_whitespace()
        .map(|w| w.parse().unwrap())
        .collect();
    assert_eq!(f.len(), 3, "one line expected: {text}");
    (f[0], f[1], f[2])
}

/// Six `auto` runs started at once each get a block of their own: the choice and the record
/// of the block happen under the run root's lock.
#[test]
fn concurrent_auto_runs_never_share_a_block() {
    require_root!(NEEDS_ROOT);
    const RUNS: u32 = 6;
    let base = 4_000_000;
    let e = env_with_subids(base, RUNS * 65536);
    let children: Vec<_> = (0..RUNS)
        .map(|_| {
            e.cmd(&["run", "-d", "--userns", "auto", "busybox", "sleep", "1000"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut ids = Vec::new();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "a concurrent run failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        ids.push(stdout(&o).trim().to_string());
    }
    let mut blocks = Vec::new();
    for id in &ids {
        let pid = e.init_pid(id);
        let (uid_in, uid_start, uid_count) = kernel_map(pid, "uid_map");
        let (gid_in, gid_start, gid_count) = kernel_map(pid, "gid_map");
        assert_eq!((uid_in, uid_count, gid_in, gid_count), (0, 65536, 0, 65536));
        assert!(
            (base..base + RUNS * 65536).contains(&uid_start),
            "{uid_start}"
        );
        blocks.push((uid_start, gid_start));
    }
    for (i, a) in blocks.iter().enumerate() {
        for b in &blocks[i + 1..] {
            // Aligned blocks of one size: distinct starts are disjoint blocks.
            assert!(a.0 != b.0 && a.1 != b.1, "shared block: {blocks:?}");
        }
    }
    let mut refs: Vec<&str> = vec!["rm", "-f"];
    refs.extend(ids.iter().map(String::as_str));
    e.ok(&refs);
    e.assert_nothing_left();
}

/// `commit` of a `--userns` container: the layer records the ids the container saw (its root
/// as 0, its uid 1000 as 1000), not the mapped host ids its upper dir holds on disk, so the
/// image runs the same without a user namespace. The upper dir itself is not chowned.
#[test]
fn commit_shifts_owners_back_to_container_ids() {
    require_root!(NEEDS_ROOT);
    let base = 4_500_000;
    let e = env_with_subids(base, 65536);
    let id = e.start(&[
        "--name",
        "src",
        "--userns",
        "auto",
        "busybox",
        "sh",
        "-c",
        "echo r > /by-root && mkdir -m 777 /w && mkdir /d1000 && chown 1000:1000 /d1000 && \
         ln -s /by-root /link1000 && chown -h 1000:1000 /link1000 && echo made; \
         exec sleep 1000",
    ]);
    e.wait_until("the files", Duration::from_secs(20), || {
        e.ok(&["logs", "src"]).contains("made")
    });
    e.ok(&[
        "exec",
        "-u",
        "1000:1000",
        "src",
        "sh",
        "-c",
        "echo u > /w/by-1000",
    ]);
    let upper = upper_of(&e, &id);
    let (b, b1000) = (base, base + 1000);
    assert_eq!(host_ids(&upper.join("by-root")), (b, b));
    assert_eq!(host_ids(&upper.join("w/by-1000")), (b1000, b1000));

    let out = e.ok(&["commit", "src", "shifted:v1"]);
    assert!(out.starts_with("shifted:v1 sha256:"), "{out}");
    // Only the tar headers are shifted: the upper dir keeps its host owners.
    assert_eq!(host_ids(&upper.join("by-root")), (b, b));
    assert_eq!(host_ids(&upper.join("link1000")), (b1000, b1000));

    // Without a user namespace, the committed image shows the container's ids.
    let out = e.ok(&[
        "run",
        "--rm",
        "shifted:v1",
        "stat",
        "-c",
        "%n %u:%g",
        "/by-root",
        "/w",
        "/w/by-1000",
        "/d1000",
        "/link1000",
    ]);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "/by-root 0:0",
            "/w 0:0",
            "/w/by-1000 1000:1000",
            "/d1000 1000:1000",
            "/link1000 1000:1000",
        ],
        "{out}"
    );
    e.ok(&["rm", "-f", "src"]);
    e.ok(&["image", "rm", "shifted:v1"]);
    e.assert_nothing_left();
}

/// A volume under `--userns` is an idmapped mount through the container's namespace: host
/// uid N reads as N inside and the container's uid N writes host uid N, as without a user
/// namespace; `:ro` still holds. A volume on a filesystem without idmapped mounts (ramfs)
/// fails the run, naming the volume, and leaves nothing.
#[test]
fn volumes_are_idmapped_through_the_containers_namespace() {
    require_root!(NEEDS_ROOT);
    use std::os::unix::fs::PermissionsExt;
    let base = 4_600_000;
    let e = env_with_subids(base, 65536);
    let vol = e.mkdir("vol");
    std::fs::set_permissions(&vol, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::write(vol.join("host-root"), "r").unwrap();
    std::fs::write(vol.join("host-1000"), "u").unwrap();
    std::os::unix::fs::chown(vol.join("host-1000"), Some(1000), Some(1000)).unwrap();
    let rw = format!("{}:/v", vol.display());
    let ro = format!("{}:/ro:ro", vol.display());
    e.start(&[
        "--name", "c", "--userns", "auto", "-v", &rw, "-v", &ro, "busybox", "sleep", "1000",
    ]);
    let out = e.ok(&[
        "exec",
        "c",
        "sh",
        "-c",
        "stat -c '%n %u:%g' /v/host-root /v/host-1000 /ro/host-1000; \
         echo x > /v/by-root && echo root-wrote; \
         mkdir /v/d && chown 1000:1000 /v/d && echo chowned; \
         echo y > /ro/nope 2>/dev/null || echo ro-refused",
    ]);
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "/v/host-root 0:0",
            "/v/host-1000 1000:1000",
            "/ro/host-1000 1000:1000",
            "root-wrote",
            "chowned",
            "ro-refused",
        ],
        "{out}"
    );
    e.ok(&[
        "exec",
        "-u",
        "1000:1000",
        "c",
        "sh",
        "-c",
        "echo z > /v/by-1000",
    ]);
    // On the host: the ids the container used, not the mapped block.
    assert_eq!(host_ids(&vol.join("by-root")), (0, 0));
    assert_eq!(host_ids(&vol.join("d")), (1000, 1000));
    assert_eq!(host_ids(&vol.join("by-1000")), (1000, 1000));
    assert!(!vol.join("nope").exists());
    e.ok(&["rm", "-f", "c"]);
    e.assert_nothing_left();

    // A volume whose filesystem cannot be idmapped: refused, no fallback to a plain bind.
    let ram = e.mkdir("ramvol");
    let st = std::process::Command::new("mount")
        .args(["-t", "ramfs", "ramfs"])
        .arg(&ram)
        .status()
        .unwrap();
    assert!(st.success(), "mount ramfs");
    let guard = Mounted(ram.clone());
    let spec = format!("{}:/r", ram.display());
    // Without --userns the same volume is a plain bind and works.
    e.ok(&["run", "--rm", "-v", &spec, "busybox", "true"]);
    let err = e.fails(&[
        "run", "--rm", "--userns", "auto", "-v", &spec, "busybox", "true",
    ]);
    assert!(
        err.contains("cannot be idmapped") && err.contains(&ram.display().to_string()),
        "{err}"
    );
    assert_eq!(e.state_entries(), Vec::<String>::new());
    assert_eq!(e.layer_entries(), Vec::<String>::new());
    drop(guard);
    e.assert_nothing_left();
}

#[test]
fn explicit_range_and_a_non_root_user() {
    require_root!(NEEDS_ROOT);
    let base = 3_200_000;
    let e = env_with_subids(base, 65536);
    let start = base + 100;
    let id = e.start(&[
        "--name",
        "u",
        "--userns",
        &format!("{start}:{start}:2000"),
        "-u",
        "1000:1000",
        "busybox",
        "sleep",
        "1000",
    ]);
    let out = e.ok(&["exec", "u", "sh", "-c", "cat /proc/self/uid_map; id -u"]);
    let words: Vec<&str> = out.split_whitespace().collect();
    let s = start.to_string();
    assert_eq!(words, ["0", s.as_str(), "2000", "1000"], "{out}");
    // Container uid 1000 is host uid start+1000.
    let status = std::fs::read_to_string(format!("/proc/{}/status", e.init_pid("u"))).unwrap();
    let want = (start + 1000).to_string();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some(want.as_str())),
        "{status}"
    );
    // Root inside hands a directory to uid 1000: on the host it is start+1000's.
    e.ok(&[
        "exec",
        "-u",
        "0",
        "u",
        "sh",
        "-c",
        "mkdir /tmp/d && chown 1000:1000 /tmp/d",
    ]);
    assert_eq!(
        host_ids(&upper_of(&e, &id).join("tmp/d")),
        (start + 1000, start + 1000)
    );
    // A uid outside the map cannot be given away.
    let err = e.fails(&["exec", "-u", "0", "u", "chown", "5000", "/tmp/d"]);
    assert!(
        err.contains("Invalid argument") || err.contains("not permitted"),
        "{err}"
    );
    e.ok(&["rm", "-f", "u"]);
    e.assert_nothing_left();
}

/// The /proc views are root's files on the host, which an unprivileged host uid can only
/// read because they are 0444: the container's root and its other users both see the limits.
#[test]
fn proc_views_are_readable_by_a_mapped_root_and_user() {
    require_root!(NEEDS_ROOT);
    let e = env_with_subids(3_300_000, 65536);
    for user in ["0:0", "1000:1000"] {
        let out = e.ok(&[
            "run",
            "--rm",
            "--userns",
            "auto",
            "-u",
            user,
            "--memory",
            "64m",
            "--cpus",
            "0.5",
            "busybox",
            "sh",
            "-c",
            "id -u; grep ^MemTotal: /proc/meminfo; grep -c ^processor /proc/cpuinfo; \
             cat /sys/devices/system/cpu/online",
        ]);
        let l: Vec<&str> = out.split_whitespace().collect();
        let uid = user.split(':').next().unwrap();
        assert_eq!(
            l,
            [uid, "MemTotal:", "65536", "kB", "1", "0"],
            "{user}: {out}"
        );
    }
    e.assert_nothing_left();
}

#[test]
fn refusals_name_their_cause_and_leave_nothing() {
    require_root!(NEEDS_ROOT);
    let base = 3_400_000;
    let e = env_with_subids(base, 65536);
    let cases: &[(&[&str], &str)] = &[
        (&["--userns", "0:0:65536"], "host root"),
        (&["--userns", "host"], "expected auto or UID:GID:COUNT"),
        (&["--userns", "1:1:10"], "not delegated"),
        (&["--userns", "auto", "--privileged"], "--privileged"),
    ];
    for (args, want) in cases {
        let mut a = vec!["run", "--rm"];
        a.extend_from_slice(args);
        a.extend(["busybox", "true"]);
        let err = e.fails(&a);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // A hostile delegation that would map host root is skipped with a warning, and then there
    // is nothing to use.
    for name in ["subuid", "subgid"] {
        std::fs::write(
            e.dir.path().join(name),
            "tweed:0:4294967295\ntweed:4294967295:2\n",
        )
        .unwrap();
    }
    let err = e.fails(&["run", "--rm", "--userns", "auto", "busybox", "true"]);
    assert!(
        err.contains("subuid:1:") && err.contains("host id 0") && err.contains("no usable range"),
        "{err}"
    );
    e.assert_nothing_left();
}

fn cni_plugin_dir() -> &'static str {
    for d in ["/usr/lib/cni", "/opt/cni/bin"] {
        if Path::new(d).join("bridge").exists() {
            return d;
        }
    }
    panic!("CNI plugins missing: install Debian's containernetworking-plugins")
}

/// The container's network still works from inside a user namespace: an overlay attachment
/// through a bridge + host-local chain, in a namespace of the test's own playing the host.
#[test]
fn network_reaches_out_and_low_ports_bind() {
    require_root!(NEEDS_ROOT);
    let mut e = env_with_subids(3_600_000, 65536);
    let host = tweed_testkit::NetnsGuard::unique("twu");
    let br = unique("twub");
    let conf = e.dir.path().join("net.conflist");
    std::fs::write(
        &conf,
        format!(
            r#"{{"cniVersion":"1.0.0","name":"{br}","plugins":[
            {{"type":"bridge","bridge":"{br}","isGateway":true,"ipMasq":false,
              "ipam":{{"type":"host-local","subnet":"10.244.251.0/24","dataDir":"{}"}}}}]}}"#,
            e.dir.path().join("ipam").display()
        ),
    )
    .unwrap();
    e.extra
        .push(("TWEED_HOST_NETNS".into(), host.name().to_string()));
    e.extra
        .push(("TWEED_CNI_CONF".into(), conf.display().to_string()));
    e.extra
        .push(("TWEED_CNI_PATH".into(), cni_plugin_dir().into()));
    // A listener in the test's host namespace, reached through the bridge's gateway address.
    // A socket of our own rather than `nc -l`: busybox's listener exits as soon as its stdin
    // reads EOF, which raced the data it was meant to print. busybox's ping wants a raw
    // socket, which needs CAP_NET_RAW over the namespace: TCP proves the path.
    let listener = host.enter(|| std::net::TcpListener::bind("0.0.0.0:8081").unwrap());
    let received = std::thread::spawn(move || read_one_connection(listener));
    // Port 80 binds without CAP_NET_BIND_SERVICE (ip_unprivileged_port_start).
    let out = e.sh(
        &["--net", "overlay", "--userns", "auto"],
        "id -u; for i in 1 2 3 4 5 6 7 8 9 10; do \
           echo hello-from-userns | nc 10.244.251.1 8081 && echo sent && break; sleep 0.2; done; \
         nc -l -p 80 & sleep 0.3; kill $! && echo bound",
    );
    assert_eq!(out, "0\nsent\nbound\n", "{out}");
    assert_eq!(received.join().unwrap(), "hello-from-userns\n");
    // The host namespace's own sysctls are untouched.
    assert_eq!(
        host.exec(&["cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start"])
            .unwrap()
            .trim(),
        "1024"
    );
    e.assert_nothing_left();
}

/// The bytes of the first connection to `listener`, up to its close; bounded, so a run whose
/// container never connects fails instead of waiting forever.
fn read_one_connection(listener: std::net::TcpListener) -> String {
    use std::io::Read;
    listener.set_nonblocking(true).unwrap();
    let mut accepted = None;
    tweed_testkit::wait_for(
        Duration::from_secs(30),
        "the container's connection",
        || {
            match listener.accept() {
                Ok((conn, _)) => accepted = Some(conn),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept: {e}"),
            }
            accepted.is_some()
        },
    );
    let mut conn = accepted.unwrap();
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut got = String::new();
    conn.read_to_string(&mut got).unwrap();
    got
}

/// Unmounts on drop, also when the test panics.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Layers on a filesystem that cannot be idmapped (ramfs): the run fails, saying which layer
/// and why, and leaves nothing behind; without --userns the same image runs.
#[test]
fn layers_without_idmap_support_fail_clearly() {
    require_root!(NEEDS_ROOT);
    let mut e = Env::new();
    let ram = e.mkdir("ram");
    let st = std::process::Command::new("mount")
        .args(["-t", "ramfs", "ramfs"])
        .arg(&ram)
        .status()
        .unwrap();
    assert!(st.success(), "mount ramfs");
    let guard = Mounted(ram.clone());
    e.image_root = ram.join("lib");
    for (var, name) in [("TWEED_SUBUID", "subuid"), ("TWEED_SUBGID", "subgid")] {
        let p = e.dir.path().join(name);
        std::fs::write(&p, "tweed:3800000:65536\n").unwrap();
        e.extra.push((var.into(), p.display().to_string()));
    }
    e.import_busybox();
    assert_eq!(
        e.ok(&["run", "--rm", "busybox", "echo", "plain"]),
        "plain\n"
    );
    let err = e.fails(&["run", "--rm", "--userns", "auto", "busybox", "true"]);
    assert!(
        err.contains("idmapped mount of layer") && err.contains(&ram.display().to_string()),
        "{err}"
    );
    assert_eq!(e.state_entries(), Vec::<String>::new());
    assert_eq!(e.layer_entries(), Vec::<String>::new());
    assert_eq!(e.cgroup_dirs(), Vec::<PathBuf>::new());
    drop(guard);
    e.assert_nothing_left();
}
