//! Shared harness of the root tests: a private runtime (state, images, cgroup parent) per
//! test, torn down on drop even when the test panics; a busybox rootfs. Netns guards, names and
//! the root rule come from tweed-testkit.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

// Only the image tests write tars; every test target includes this module.
#[allow(unused_imports)]
pub use tweed_testkit::tar::{finish_tar, raw_entry};
pub use tweed_testkit::{require_root, unique};

/// Why these tests need root, for `require_root!`.
pub const NEEDS_ROOT: &str = "namespaces, mounts and cgroups for containers";

pub fn tweedctl_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tweedctl"))
}

/// One isolated runtime.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub run_root: PathBuf,
    pub image_root: PathBuf,
    pub cgroup_parent: String,
    pub extra: Vec<(String, String)>,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("tweedtest")
            .tempdir()
            .unwrap();
        let run_root = dir.path().join("run");
        let image_root = dir.path().join("lib");
        Env {
            run_root,
            image_root,
            cgroup_parent: format!("/{}", unique("tweedtest")),
            extra: vec![],
            dir,
        }
    }

    /// With the busybox image imported as `busybox`.
    pub fn with_busybox() -> Env {
        let e = Env::new();
        e.import_busybox();
        e
    }

    /// Imports the busybox rootfs as image `busybox` (for an env whose image root or
    /// environment the test set first).
    pub fn import_busybox(&self) {
        let rootfs = busybox_rootfs(self.dir.path());
        self.ok(&[
            "image",
            "import",
            "--rootfs",
            rootfs.to_str().unwrap(),
            "busybox",
        ]);
    }

    /// A new directory `name` in this env's temporary directory.
    pub fn mkdir(&self, name: &str) -> PathBuf {
        let d = self.dir.path().join(name);
        std::fs::create_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        d
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(tweedctl_bin());
        c.env("TWEED_ROOT", &self.run_root)
            .env("TWEED_IMAGE_ROOT", &self.image_root)
            .env("TWEED_CGROUP_PARENT", &self.cgroup_parent)
            .envs(self.extra.iter().map(|(k, v)| (k, v)))
            .args(args)
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("running tweedctl")
    }

    /// Runs tweedctl and requires success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "tweedctl {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs `script` under busybox's sh in a throwaway container (`run --rm`) given the `run`
    /// options `opts`; requires success, returns stdout.
    pub fn sh(&self, opts: &[&str], script: &str) -> String {
        let mut args = vec!["run", "--rm"];
        args.extend_from_slice(opts);
        args.extend(["busybox", "sh", "-c", script]);
        self.ok(&args)
    }

    /// Runs tweedctl and requires failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            !o.status.success(),
            "tweedctl {args:?} should have failed:\nstdout: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    /// `run -d`: the container id.
    pub fn start(&self, args: &[&str]) -> String {
        let mut a = vec!["run", "-d"];
        a.extend_from_slice(args);
        self.ok(&a).trim().to_string()
    }

    pub fn inspect(&self, c: &str) -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(&self.ok(&["inspect", c])).unwrap();
        v[0].clone()
    }

    pub fn init_pid(&self, c: &str) -> i32 {
        self.inspect(c)["State"]["Pid"]
            .as_i64()
            .expect("running container has a pid") as i32
    }

    /// Waits until `f` holds (polling), or panics with `what`.
    pub fn wait_until(&self, what: &str, timeout: Duration, f: impl FnMut() -> bool) {
        tweed_testkit::wait_for_every(timeout, Duration::from_millis(50), what, f)
    }

    pub fn state_entries(&self) -> Vec<String> {
        list(&self.run_root.join("containers"))
    }

    pub fn layer_entries(&self) -> Vec<String> {
        list(&self.image_root.join("containers"))
    }

    /// Container cgroup directories still present under this env's parent.
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for h in cgroup_mounts() {
            let p = h.join(self.cgroup_parent.trim_start_matches('/'));
            for e in list(&p) {
                let d = p.join(e);
                if d.is_dir() {
                    out.push(d);
                }
            }
        }
        out
    }

    /// Mounts (in this, the host's, namespace) whose path mentions this env.
    pub fn host_mounts(&self) -> Vec<String> {
        let me = self.dir.path().to_string_lossy().into_owned();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&me))
            .map(str::to_string)
            .collect()
    }

    /// Everything a removed/failed container could leave behind: must all be empty.
    pub fn assert_nothing_left(&self) {
        assert_eq!(
            self.state_entries(),
            Vec::<String>::new(),
            "state dirs left"
        );
        // `rm` renames a layer directory to `.gone.<id>` and a detached child removes it:
        // no live one may be left, and the set-aside ones must go within a bounded time.
        let live: Vec<String> = self
            .layer_entries()
            .into_iter()
            .filter(|e| !e.starts_with(".gone."))
            .collect();
        assert_eq!(live, Vec::<String>::new(), "container layers left");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !self.layer_entries().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(
            self.layer_entries(),
            Vec::<String>::new(),
            "container layers set aside but not swept"
        );
        assert_eq!(self.cgroup_dirs(), Vec::<PathBuf>::new(), "cgroups left");
        assert_eq!(self.host_mounts(), Vec::<String>::new(), "mounts left");
        assert_eq!(
            list(&self.run_root.join("names")),
            Vec::<String>::new(),
            "names left"
        );
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Ok(o) = self.cmd(&["ps", "-q"]).output() {
            for id in String::from_utf8_lossy(&o.stdout).lines() {
                let _ = self.cmd(&["rm", "-f", id]).output();
            }
        }
        // Whatever a crashed test left: netns bind mounts, cgroups, files.
        for m in self.host_mounts() {
            if let Some(p) = m.split_whitespace().nth(4) {
                let c = std::ffi::CString::new(p).unwrap();
                // SAFETY: lazy unmount of a path this test created.
                unsafe {
                    libc::umount2(c.as_ptr(), libc::MNT_DETACH);
                }
            }
        }
        for h in cgroup_mounts() {
            let p = h.join(self.cgroup_parent.trim_start_matches('/'));
            for e in list(&p) {
                let d = p.join(e);
                if !d.is_dir() {
                    continue;
                }
                if let Ok(procs) = std::fs::read_to_string(d.join("cgroup.procs")) {
                    for pid in procs.lines().filter_map(|l| l.parse::<i32>().ok()) {
                        // SAFETY: killing processes left in this test's cgroup.
                        unsafe {
                            libc::kill(pid, libc::SIGKILL);
                        }
                    }
                }
                for _ in 0..100 {
                    if std::fs::remove_dir(&d).is_ok() || !d.exists() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let _ = std::fs::remove_dir(&p);
        }
    }
}

pub fn list(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Mount points of cgroup hierarchies (v1 controllers, or the v2 root).
pub fn cgroup_mounts() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let fs = right.split_whitespace().next()?;
            (fs == "cgroup" || fs == "cgroup2")
                .then(|| PathBuf::from(left.split_whitespace().nth(4).unwrap()))
        })
        .collect()
}

/// A busybox rootfs (static busybox + applet links + passwd/group) under `dir`.
pub fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("bbroot");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    let bb = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox is installed (Debian package busybox-static)");
    std::fs::copy(bb, root.join("bin/busybox")).unwrap();
    let applets = Command::new(bb).arg("--list").output().unwrap();
    for a in String::from_utf8_lossy(&applets.stdout).lines() {
        if a != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(a));
        }
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    root
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
