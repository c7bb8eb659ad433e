//! Real CNI callers (root only): containerd (`ctr run --cni`, a private daemon) and podman (CNI
//! backend, `--rootfs`) attach a busybox container through `tweed` on host h1 of a two-host
//! tweed-lab; the container gets a tweed address and pings a pod on host h2 across the overlay.
//!
//! Everything runs inside the lab's namespaces: the daemons and clients are started with
//! `nsenter --net` into h1 (only the network namespace changes, so cgroup mounts stay visible to
//! runc). `ctr` reads its CNI configuration from the fixed paths `/etc/cni/net.d` and
//! `/opt/cni/bin`, so it runs in a private mount namespace (`unshare -m`) where those paths are
//! bind mounts of this test's own directories; nothing on the machine's filesystem changes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TWEED;
use serde_json::json;
use tweed_lab::{LabGuard, LabSpec};

const NEEDED: &[(&str, &str)] = &[
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("containerd-shim-runc-v2", "containerd"),
    ("runc", "runc"),
    ("podman", "podman"),
    ("busybox", "busybox-static"),
    ("nsenter", "util-linux"),
    ("unshare", "util-linux"),
    ("etcd", "etcd-server"),
];

fn which(p: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(p))
            .find(|f| f.is_file())
    })
}

/// The agent binary the lab starts: built beside this test binary by a workspace build, else
/// built here.
fn tweedd() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let p = dir.join("tweedd");
    if !p.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "-p", "tweed-agent", "--bin", "tweedd"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("running cargo to build tweedd");
        assert!(st.success(), "building tweedd failed");
    }
    p
}

/// Kills a daemon this test started, on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn output(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

/// A busybox rootfs: the static binary and the applets the container command uses.
fn rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "run"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(which("busybox").unwrap(), root.join("bin/busybox")).unwrap();
    for applet in ["sh", "ip", "ping", "sleep", "cat", "seq"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    root
}

fn records(data: &Path, net: &str) -> Vec<String> {
    std::fs::read_dir(data.join(net))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.parse::<std::net::Ipv4Addr>().is_ok())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn containerd_and_podman_attach_through_tweed_and_reach_another_host() {
    tweed_testkit::require_root!(common::NEEDS_ROOT);
    let missing: Vec<String> = NEEDED
        .iter()
        .filter(|(p, _)| which(p).is_none())
        .map(|(p, pkg)| format!("{p} (Debian package {pkg})"))
        .collect();
    assert!(
        missing.is_empty(),
        "missing programs: {} (scripts/setup.sh installs them)",
        missing.join(", ")
    );

    let mut spec = LabSpec::new(format!("rc{}", std::process::id() % 100_000), 2);
    // The lab's own pods wired directly, so every `tw…` veth on h1 belongs to the callers here.
    spec.pods_via = tweed_lab::PodsVia::Direct;
    spec.pods_per_host = 1;
    spec.tweedd = Some(tweedd());
    let lab = LabGuard::up(spec).expect("lab up");
    let h1 = lab.netns_of("h1").unwrap();
    let host = &lab.state().hosts[0];
    let target = lab.state().hosts[1].pods[0].ip.expect("an IPv4 lab's pod");
    let subnet_file = host.subnet_file.clone();
    let env = tweed_config::SubnetEnv::read(&subnet_file).unwrap();
    let base = u32::from(env.ipv4.expect("IPv4 pair").subnet.network());
    let range_start = std::net::Ipv4Addr::from(base + 100);
    // The overlay itself works before any container is involved.
    assert_eq!(
        lab.check_until(Duration::from_secs(30)).unwrap().failed(),
        0
    );

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let root = rootfs(dir);
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(TWEED, bin.join("tweed")).unwrap();
    std::fs::copy("/usr/lib/cni/loopback", bin.join("loopback")).ok();
    let data = dir.join("data");
    // The lab's own pods hold the low addresses; the plugin takes them from .100 on.
    let conflist = |name: &str| {
        json!({"cniVersion": "1.0.0", "name": name, "plugins": [{
            "type": "tweed", "subnetFile": subnet_file, "dataDir": data,
            "rangeStart": range_start.to_string(), "hairpinMode": true}]})
        .to_string()
    };
    let probe = format!(
        "ip -4 -o addr show eth0; for i in 1 2 3 4 5 6 7 8 9 10; do \
         ping -c1 -W1 {target} && exit 0; done; exit 1"
    );
    let netns_path = format!("/run/netns/{h1}");

    // containerd: a private daemon inside h1.
    let cd = dir.join("containerd");
    std::fs::create_dir_all(cd.join("net.d")).unwrap();
    std::fs::write(cd.join("net.d/10-tweed.conflist"), conflist("tweed-ctr")).unwrap();
    let sock = cd.join("containerd.sock");
    std::fs::write(
        cd.join("config.toml"),
        format!(
            "version = 2\nroot = \"{r}/root\"\nstate = \"{r}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{s}\"\n[ttrpc]\n  address = \"{s}.ttrpc\"\n\
             [debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n",
            r = cd.display(),
            s = sock.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(cd.join("containerd.log")).unwrap();
    let daemon = Daemon(
        Command::new("nsenter")
            .arg(format!("--net={netns_path}"))
            .args(["containerd", "--config"])
            .arg(cd.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting containerd"),
    );
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "containerd did not start:\n{}",
            std::fs::read_to_string(cd.join("containerd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let script = format!(
        "mount --make-rprivate / && mount --bind {netd} /etc/cni/net.d && \
         mount -t tmpfs tweed-test /opt && mkdir -p /opt/cni/bin && mount --bind {bin} /opt/cni/bin && \
         exec ctr --address {sock} run --rm --cni --rootfs {root} tweed-ctr-{pid} /bin/sh -c '{probe}'",
        netd = cd.join("net.d").display(),
        bin = bin.display(),
        sock = sock.display(),
        root = root.display(),
        pid = std::process::id(),
    );
    let out = output(
        Command::new("nsenter")
            .arg(format!("--net={netns_path}"))
            .args(["unshare", "-m", "sh", "-c", &script]),
        "ctr run --cni",
    );
    let prefix = format!("{}", range_start)
        .rsplit_once('.')
        .unwrap()
        .0
        .to_string();
    assert!(
        out.contains(&format!("inet {prefix}.100/")),
        "the container has no tweed address:\n{out}"
    );
    assert!(
        out.contains("1 packets received"),
        "no reply from {target}:\n{out}"
    );
    assert!(
        records(&data, "tweed-ctr").is_empty(),
        "ctr's DEL released the address"
    );
    drop(daemon);

    // podman: CNI backend, its own storage, everything under this test's directory.
    let pd = dir.join("podman");
    std::fs::create_dir_all(pd.join("net.d")).unwrap();
    std::fs::write(pd.join("net.d/tweed.conflist"), conflist("tweed-podman")).unwrap();
    std::fs::write(
        pd.join("containers.conf"),
        format!(
            "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{bin}\"]\n\
             network_config_dir = \"{netd}\"\n\
             [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
             events_logfile_path = \"{pd}/events.log\"\nruntime = \"runc\"\n",
            bin = bin.display(),
            netd = pd.join("net.d").display(),
            pd = pd.display()
        ),
    )
    .unwrap();
    let out = output(
        Command::new("nsenter")
            .arg(format!("--net={netns_path}"))
            .arg("podman")
            .env("CONTAINERS_CONF", pd.join("containers.conf"))
            .arg("--root")
            .arg(pd.join("root"))
            .arg("--runroot")
            .arg(pd.join("runroot"))
            .arg("--tmpdir")
            .arg(pd.join("tmp"))
            // podman's default limits (nofile 1048576, nproc) can exceed the hard limits of a
            // sandboxed machine, and runc then fails to set them; modest ones always fit.
            .args([
                "run",
                "--rm",
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=1024:1024",
            ])
            .args(["--network", "tweed-podman", "--rootfs"])
            .arg(&root)
            .args(["/bin/sh", "-c", &probe]),
        "podman run",
    );
    assert!(
        out.contains(&format!("inet {prefix}.10")),
        "the container has no tweed address:\n{out}"
    );
    assert!(
        out.contains("1 packets received"),
        "no reply from {target}:\n{out}"
    );
    assert!(
        records(&data, "tweed-podman").is_empty(),
        "podman's DEL released the address"
    );
    let left = lab.exec("h1", &["ip", "-o", "link", "show"]).unwrap();
    let veths: Vec<&str> = left
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n))
        .filter(|n| tweed_cni::plan::is_host_veth_name(n))
        .collect();
    assert!(veths.is_empty(), "tweed veths left on h1: {veths:?}");
}
