//! Control groups, v1 (one hierarchy per controller or co-mounted ones, as on hybrid hosts) and v2.
//!
//! Pure parts: where the hierarchies are ([`parse_mountinfo`], [`detect`]), which file gets which
//! value ([`v1_writes`], [`v2_writes`]), and stat parsing. Side effects live behind
//! [`CgroupManager`], implemented by [`V1Cgroup`], [`V2Cgroup`] and [`FakeCgroup`]; [`Cgroup`]
//! dispatches between them.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::units::{Limits, CPU_PERIOD_US};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup filesystem is mounted (read {0})")]
    NoHierarchy(PathBuf),
    #[error(
        "the cgroup controller {0:?} is not available on this host, so its limit cannot be applied"
    )]
    MissingController(String),
    #[error("creating cgroup {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("the kernel refused {value:?} for {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        source: io::Error,
    },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("removing cgroup {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("cgroup {path} did not freeze within 5 s")]
    FreezeTimeout { path: PathBuf },
}

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    pub mount_point: PathBuf,
    /// The hierarchy path that is the mount's root (`/` unless the host itself is nested).
    pub root: String,
    /// v1 controllers bound to it (`name=systemd` style names excluded); empty for v2.
    pub controllers: Vec<String>,
    pub v2: bool,
}

/// Every cgroup mount in a `/proc/self/mountinfo` text.
pub fn parse_mountinfo(text: &str) -> Vec<Hierarchy> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let lf: Vec<&str> = left.split_whitespace().collect();
        let rf: Vec<&str> = right.split_whitespace().collect();
        if lf.len() < 5 || rf.len() < 3 {
            continue;
        }
        let fstype = rf[0];
        let (v2, controllers) = match fstype {
            "cgroup2" => (true, Vec::new()),
            "cgroup" => (
                false,
                rf[2]
                    .split(',')
                    .filter(|o| {
                        !o.contains('=')
                            && !matches!(
                                *o,
                                "rw" | "ro"
                                    | "relatime"
                                    | "noatime"
                                    | "nosuid"
                                    | "nodev"
                                    | "noexec"
                            )
                            && !o.starts_with("clone_children")
                            && *o != "xattr"
                    })
                    .map(str::to_string)
                    .collect(),
            ),
            _ => continue,
        };
        out.push(Hierarchy {
            mount_point: PathBuf::from(unescape_mountinfo(lf[4])),
            root: unescape_mountinfo(lf[3]),
            controllers,
            v2,
        });
    }
    out
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x"), 8)
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Which cgroup flavour a host runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// v1 hierarchies (legacy or hybrid hosts); a hybrid's cgroup2 mount is ignored.
    V1(Vec<Hierarchy>),
    /// The unified hierarchy mounted at `mount_point`.
    V2 { mount_point: PathBuf },
}

/// Picks the layout: v2 when the unified hierarchy is the main one (or the only one), else v1.
pub fn detect(hierarchies: &[Hierarchy]) -> Option<Layout> {
    let v1: Vec<Hierarchy> = hierarchies
        .iter()
        .filter(|h| !h.v2 && !h.controllers.is_empty())
        .cloned()
        .collect();
    let v2 = hierarchies.iter().find(|h| h.v2);
    if let Some(h) = v2 {
        if h.mount_point == Path::new("/sys/fs/cgroup") || v1.is_empty() {
            return Some(Layout::V2 {
                mount_point: h.mount_point.clone(),
            });
        }
    }
    if v1.is_empty() {
        None
    } else {
        // Deduplicate hierarchies mounted twice.
        let mut seen: Vec<Hierarchy> = Vec::new();
        for h in v1 {
            if !seen.iter().any(|s| s.controllers == h.controllers) {
                seen.push(h);
            }
        }
        Some(Layout::V1(seen))
    }
}

/// The host's layout, from `/proc/self/mountinfo`.
pub fn host_layout() -> Result<Layout, CgroupError> {
    let p = PathBuf::from("/proc/self/mountinfo");
    let text = std::fs::read_to_string(&p).map_err(|source| CgroupError::Read {
        path: p.clone(),
        source,
    })?;
    detect(&parse_mountinfo(&text)).ok_or(CgroupError::NoHierarchy(p))
}

/// v1 files and values for `limits`: (controller, file, value), in the order they must be written.
pub fn v1_writes(limits: &Limits, has_memsw: bool) -> Vec<(&'static str, &'static str, String)> {
    let mut w = Vec::new();
    if let Some(m) = limits.memory {
        w.push(("memory", "memory.limit_in_bytes", m.to_string()));
        if has_memsw {
            // No swap beyond the limit: the limit is the limit (Docker would allow as much swap).
            w.push(("memory", "memory.memsw.limit_in_bytes", m.to_string()));
        }
    }
    if let Some(q) = limits.cpu_quota_us() {
        w.push(("cpu", "cpu.cfs_period_us", CPU_PERIOD_US.to_string()));
        w.push(("cpu", "cpu.cfs_quota_us", q.to_string()));
    }
    if let Some(p) = limits.pids {
        w.push(("pids", "pids.max", p.to_string()));
    }
    w
}

/// v2 files and values for `limits`.
pub fn v2_writes(limits: &Limits) -> Vec<(&'static str, String)> {
    let mut w = Vec::new();
    if let Some(m) = limits.memory {
        w.push(("memory.max", m.to_string()));
        w.push(("memory.swap.max", "0".to_string()));
    }
    if let Some(q) = limits.cpu_quota_us() {
        w.push(("cpu.max", format!("{q} {CPU_PERIOD_US}")));
    }
    if let Some(p) = limits.pids {
        w.push(("pids.max", p.to_string()));
    }
    w
}

/// Docker's default device allow-list (v1 `devices` controller).
pub const DEVICE_ALLOW: &[&str] = &[
    "c *:* m",
    "b *:* m",
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
    "c 5:0 rwm",
    "c 5:1 rwm",
    "c 5:2 rwm",
    "c 136:* rwm",
    "c 10:200 rwm",
];

/// The value of `key` in a flat keyed file (`key value` per line), e.g. memory.stat.
pub fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == key).then_some(())?;
        it.next()?.parse().ok()
    })
}

/// What the runtime reads back from a container's cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub memory_usage: u64,
    /// None when unlimited.
    pub memory_limit: Option<u64>,
    /// Page cache charged to the cgroup.
    pub cache: u64,
    pub inactive_file: u64,
    pub oom_kills: u64,
    pub cpu_usage_ns: u64,
    pub pids_current: u64,
}

/// Where a container's cgroup lives, saved in its state so that any later `tweedctl` finds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "version", rename_all = "lowercase")]
pub enum CgroupRecord {
    V1 { dirs: BTreeMap<String, PathBuf> },
    V2 { dir: PathBuf },
    Fake,
}

impl CgroupRecord {
    pub fn paths(&self) -> Vec<PathBuf> {
        match self {
            CgroupRecord::V1 { dirs } => {
                let mut v: Vec<PathBuf> = dirs.values().cloned().collect();
                v.dedup();
                v
            }
            CgroupRecord::V2 { dir } => vec![dir.clone()],
            CgroupRecord::Fake => vec![],
        }
    }
}

/// A process's way into its cgroups without the global migration lock: on v1, a
/// single-threaded process writing "0" to `tasks` moves itself and the kernel skips
/// `cgroup_threadgroup_rwsem` (whose write side waits for an RCU grace period, 5 to 15 ms);
/// on v2 it writes "0" to `cgroup.procs`. The files are opened beforehand, so the join can
/// happen after `pivot_root`.
#[derive(Debug)]
pub struct SelfJoin {
    files: Vec<(PathBuf, std::fs::File)>,
}

impl SelfJoin {
    pub fn targets(rec: &CgroupRecord) -> Vec<PathBuf> {
        match rec {
            CgroupRecord::V1 { .. } => rec.paths().iter().map(|d| d.join("tasks")).collect(),
            CgroupRecord::V2 { dir } => vec![dir.join("cgroup.procs")],
            CgroupRecord::Fake => vec![],
        }
    }

    pub fn open(rec: &CgroupRecord) -> Result<SelfJoin, CgroupError> {
        let mut files = Vec::new();
        for p in Self::targets(rec) {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .map_err(|source| CgroupError::Write {
                    path: p.clone(),
                    value: "0".into(),
                    source,
                })?;
            files.push((p, f));
        }
        Ok(SelfJoin { files })
    }

    /// The fds to keep open across fd cleanup in a child.
    pub fn fds(&self) -> Vec<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.files.iter().map(|(_, f)| f.as_raw_fd()).collect()
    }

    /// Moves the calling (single-threaded) process into every hierarchy.
    pub fn join(&mut self) -> Result<(), CgroupError> {
        use std::io::Write;
        for (p, f) in &mut self.files {
            f.write_all(b"0").map_err(|source| CgroupError::Write {
                path: p.clone(),
                value: "0".into(),
                source,
            })?;
        }
        Ok(())
    }
}

/// The side effects on one container's cgroup.
pub trait CgroupManager {
    /// Creates the directories.
    fn create(&self) -> Result<(), CgroupError>;
    /// Writes the limits (before the container's command runs).
    fn apply(&self, limits: &Limits) -> Result<(), CgroupError>;
    fn add_pid(&self, pid: i32) -> Result<(), CgroupError>;
    fn stats(&self) -> Result<Stats, CgroupError>;
    fn procs(&self) -> Result<Vec<i32>, CgroupError>;
    fn freeze(&self, frozen: bool) -> Result<(), CgroupError>;
    /// Kills what is left and removes the directories; a missing cgroup is fine.
    fn remove(&self) -> Result<(), CgroupError>;
    fn record(&self) -> CgroupRecord;
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_procs(dir: &Path) -> Result<Vec<i32>, CgroupError> {
    match std::fs::read_to_string(dir.join("cgroup.procs")) {
        Ok(s) => Ok(s.lines().filter_map(|l| l.trim().parse().ok()).collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(vec![]),
        Err(source) => Err(CgroupError::Read {
            path: dir.join("cgroup.procs"),
            source,
        }),
    }
}

/// rmdir with retries: processes that were just killed leave the cgroup asynchronously.
fn rmdir_retry(dir: &Path) -> Result<(), CgroupError> {
    for i in 0..400 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && i < 399 => {
                if let Ok(pids) = read_procs(dir) {
                    for p in pids {
                        // SAFETY: plain kill of a process still in the cgroup being removed.
                        unsafe {
                            libc::kill(p, libc::SIGKILL);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(source) => {
                return Err(CgroupError::Remove {
                    path: dir.to_path_buf(),
                    source,
                })
            }
        }
    }
    unreachable!("the last iteration returns")
}

fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir_all(path) {
        Ok(()) => Ok(()),
        Err(source) => Err(CgroupError::Create {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Joins a hierarchy's mount point with an absolute cgroup path.
fn under(mount_point: &Path, cgroup_path: &str) -> PathBuf {
    mount_point.join(cgroup_path.trim_start_matches('/'))
}

/// A container's cgroup on a v1 host: one directory per hierarchy it uses.
#[derive(Debug, Clone)]
pub struct V1Cgroup {
    /// controller -> directory (co-mounted controllers share one).
    pub dirs: BTreeMap<String, PathBuf>,
}

/// Controllers a v1 container joins when the host has them.
const V1_CONTROLLERS: &[&str] = &["memory", "cpu", "cpuacct", "pids", "freezer", "devices"];

impl V1Cgroup {
    pub fn new(hierarchies: &[Hierarchy], cgroup_path: &str) -> V1Cgroup {
        let mut dirs = BTreeMap::new();
        for c in V1_CONTROLLERS {
            if let Some(h) = hierarchies
                .iter()
                .find(|h| h.controllers.iter().any(|x| x == c))
            {
                dirs.insert(c.to_string(), under(&h.mount_point, cgroup_path));
            }
        }
        V1Cgroup { dirs }
    }
    fn dir(&self, controller: &str) -> Result<&PathBuf, CgroupError> {
        self.dirs
            .get(controller)
            .ok_or_else(|| CgroupError::MissingController(controller.to_string()))
    }
    fn unique_dirs(&self) -> Vec<&PathBuf> {
        let mut v: Vec<&PathBuf> = self.dirs.values().collect();
        v.sort();
        v.dedup();
        v
    }
}

impl CgroupManager for V1Cgroup {
    fn create(&self) -> Result<(), CgroupError> {
        for d in self.unique_dirs() {
            mkdir(d)?;
        }
        if let Some(d) = self.dirs.get("devices") {
            write(&d.join("devices.deny"), "a")?;
            // One rule per write(2), through one open file.
            let p = d.join("devices.allow");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .map_err(|source| CgroupError::Write {
                    path: p.clone(),
                    value: DEVICE_ALLOW[0].to_string(),
                    source,
                })?;
            for rule in DEVICE_ALLOW {
                use std::io::Write;
                f.write_all(rule.as_bytes())
                    .map_err(|source| CgroupError::Write {
                        path: p.clone(),
                        value: rule.to_string(),
                        source,
                    })?;
            }
        }
        Ok(())
    }

    fn apply(&self, limits: &Limits) -> Result<(), CgroupError> {
        let has_memsw = self
            .dirs
            .get("memory")
            .is_some_and(|d| d.join("memory.memsw.limit_in_bytes").exists());
        for (ctrl, file, value) in v1_writes(limits, has_memsw) {
            write(&self.dir(ctrl)?.join(file), &value)?;
        }
        Ok(())
    }

    fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        for d in self.unique_dirs() {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    fn stats(&self) -> Result<Stats, CgroupError> {
        let mut s = Stats::default();
        if let Some(d) = self.dirs.get("memory") {
            s.memory_usage = read(&d.join("memory.usage_in_bytes"))?
                .trim()
                .parse()
                .unwrap_or(0);
            let lim: u64 = read(&d.join("memory.limit_in_bytes"))?
                .trim()
                .parse()
                .unwrap_or(u64::MAX);
            // "Unlimited" is PAGE_COUNTER_MAX pages, about 2^63.
            s.memory_limit = (lim < (1 << 62)).then_some(lim);
            let stat = read(&d.join("memory.stat"))?;
            s.cache = keyed(&stat, "total_cache")
                .or(keyed(&stat, "cache"))
                .unwrap_or(0);
            s.inactive_file = keyed(&stat, "total_inactive_file")
                .or(keyed(&stat, "inactive_file"))
                .unwrap_or(0);
            s.oom_kills = keyed(&read(&d.join("memory.oom_control"))?, "oom_kill").unwrap_or(0);
        }
        if let Some(d) = self.dirs.get("cpuacct") {
            s.cpu_usage_ns = read(&d.join("cpuacct.usage"))?.trim().parse().unwrap_or(0);
        }
        if let Some(d) = self.dirs.get("pids") {
            s.pids_current = read(&d.join("pids.current"))?.trim().parse().unwrap_or(0);
        }
        Ok(s)
    }

    fn procs(&self) -> Result<Vec<i32>, CgroupError> {
        let d = self
            .dirs
            .get("memory")
            .or_else(|| self.dirs.values().next())
            .ok_or_else(|| CgroupError::MissingController("memory".into()))?;
        read_procs(d)
    }

    fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        let d = self.dir("freezer")?;
        let want = if frozen { "FROZEN" } else { "THAWED" };
        write(&d.join("freezer.state"), want)?;
        for _ in 0..1000 {
            if read(&d.join("freezer.state"))?.trim() == want {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Err(CgroupError::FreezeTimeout { path: d.clone() })
    }

    fn remove(&self) -> Result<(), CgroupError> {
        if let Some(d) = self.dirs.get("freezer") {
            // A frozen cgroup's processes cannot die.
            let _ = std::fs::write(d.join("freezer.state"), "THAWED");
        }
        for d in self.unique_dirs() {
            rmdir_retry(d)?;
        }
        Ok(())
    }

    fn record(&self) -> CgroupRecord {
        CgroupRecord::V1 {
            dirs: self.dirs.clone(),
        }
    }
}

/// A container's cgroup on a v2 host.
#[derive(Debug, Clone)]
pub struct V2Cgroup {
    pub mount_point: PathBuf,
    pub dir: PathBuf,
}

const V2_CONTROLLERS: &[&str] = &["memory", "cpu", "pids"];

impl V2Cgroup {
    pub fn new(mount_point: &Path, cgroup_path: &str) -> V2Cgroup {
        V2Cgroup {
            mount_point: mount_point.to_path_buf(),
            dir: under(mount_point, cgroup_path),
        }
    }
}

impl CgroupManager for V2Cgroup {
    fn create(&self) -> Result<(), CgroupError> {
        // Enable the controllers on every ancestor, from the root down (the root is exempt
        // from the no-internal-processes rule; tweed's parent cgroup holds no processes).
        let rel = self
            .dir
            .strip_prefix(&self.mount_point)
            .unwrap_or(&self.dir);
        let mut cur = self.mount_point.clone();
        for comp in rel.components() {
            let available =
                std::fs::read_to_string(cur.join("cgroup.controllers")).unwrap_or_default();
            let enable: Vec<String> = V2_CONTROLLERS
                .iter()
                .filter(|c| available.split_whitespace().any(|a| a == **c))
                .map(|c| format!("+{c}"))
                .collect();
            if !enable.is_empty() {
                write(&cur.join("cgroup.subtree_control"), &enable.join(" "))?;
            }
            cur.push(comp);
            if cur != self.dir {
                mkdir(&cur)?;
            }
        }
        match std::fs::create_dir(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(source) => Err(CgroupError::Create {
                path: self.dir.clone(),
                source,
            }),
        }
    }

    fn apply(&self, limits: &Limits) -> Result<(), CgroupError> {
        for (file, value) in v2_writes(limits) {
            let p = self.dir.join(file);
            if file == "memory.swap.max" && !p.exists() {
                continue; // swap accounting off: nothing to limit
            }
            if !p.exists() {
                let ctrl = file.split('.').next().unwrap_or(file);
                return Err(CgroupError::MissingController(ctrl.to_string()));
            }
            write(&p, &value)?;
        }
        Ok(())
    }

    fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        write(&self.dir.join("cgroup.procs"), &pid.to_string())
    }

    fn stats(&self) -> Result<Stats, CgroupError> {
        let d = &self.dir;
        let mut s = Stats::default();
        if d.join("memory.current").exists() {
            s.memory_usage = read(&d.join("memory.current"))?.trim().parse().unwrap_or(0);
            s.memory_limit = read(&d.join("memory.max"))?.trim().parse().ok();
            let stat = read(&d.join("memory.stat"))?;
            s.cache = keyed(&stat, "file").unwrap_or(0);
            s.inactive_file = keyed(&stat, "inactive_file").unwrap_or(0);
            s.oom_kills = keyed(&read(&d.join("memory.events"))?, "oom_kill").unwrap_or(0);
        }
        if let Ok(cpu) = std::fs::read_to_string(d.join("cpu.stat")) {
            s.cpu_usage_ns = keyed(&cpu, "usage_usec").unwrap_or(0) * 1000;
        }
        if d.join("pids.current").exists() {
            s.pids_current = read(&d.join("pids.current"))?.trim().parse().unwrap_or(0);
        }
        Ok(s)
    }

    fn procs(&self) -> Result<Vec<i32>, CgroupError> {
        read_procs(&self.dir)
    }

    fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        write(
            &self.dir.join("cgroup.freeze"),
            if frozen { "1" } else { "0" },
        )?;
        let want = if frozen { 1 } else { 0 };
        for _ in 0..1000 {
            if keyed(&read(&self.dir.join("cgroup.events"))?, "frozen") == Some(want) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Err(CgroupError::FreezeTimeout {
            path: self.dir.clone(),
        })
    }

    fn remove(&self) -> Result<(), CgroupError> {
        if !self.dir.exists() {
            return Ok(());
        }
        let _ = std::fs::write(self.dir.join("cgroup.freeze"), "0");
        let _ = std::fs::write(self.dir.join("cgroup.kill"), "1");
        rmdir_retry(&self.dir)
    }

    fn record(&self) -> CgroupRecord {
        CgroupRecord::V2 {
            dir: self.dir.clone(),
        }
    }
}

/// In-memory cgroup for tests: records writes, reports `stats`.
#[derive(Debug, Default)]
pub struct FakeCgroup {
    pub writes: Mutex<Vec<(String, String)>>,
    pub pids: Mutex<Vec<i32>>,
    pub stats: Stats,
    pub created: Mutex<bool>,
    pub removed: Mutex<bool>,
}

impl CgroupManager for FakeCgroup {
    fn create(&self) -> Result<(), CgroupError> {
        *self.created.lock().unwrap() = true;
        Ok(())
    }
    fn apply(&self, limits: &Limits) -> Result<(), CgroupError> {
        let mut w = self.writes.lock().unwrap();
        for (f, v) in v2_writes(limits) {
            w.push((f.to_string(), v));
        }
        Ok(())
    }
    fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        self.pids.lock().unwrap().push(pid);
        Ok(())
    }
    fn stats(&self) -> Result<Stats, CgroupError> {
        Ok(self.stats.clone())
    }
    fn procs(&self) -> Result<Vec<i32>, CgroupError> {
        Ok(self.pids.lock().unwrap().clone())
    }
    fn freeze(&self, _frozen: bool) -> Result<(), CgroupError> {
        Ok(())
    }
    fn remove(&self) -> Result<(), CgroupError> {
        *self.removed.lock().unwrap() = true;
        Ok(())
    }
    fn record(&self) -> CgroupRecord {
        CgroupRecord::Fake
    }
}

/// Enum dispatch over the implementations.
#[derive(Debug)]
pub enum Cgroup {
    V1(V1Cgroup),
    V2(V2Cgroup),
    Fake(FakeCgroup),
}

impl Cgroup {
    /// The cgroup `<parent>/<id>` on this host's layout.
    pub fn for_container(layout: &Layout, parent: &str, id: &str) -> Cgroup {
        let path = format!("{}/{}", parent.trim_end_matches('/'), id);
        match layout {
            Layout::V1(h) => Cgroup::V1(V1Cgroup::new(h, &path)),
            Layout::V2 { mount_point } => Cgroup::V2(V2Cgroup::new(mount_point, &path)),
        }
    }

    /// Reopens a cgroup from its saved record.
    pub fn from_record(rec: &CgroupRecord) -> Cgroup {
        match rec {
            CgroupRecord::V1 { dirs } => Cgroup::V1(V1Cgroup { dirs: dirs.clone() }),
            CgroupRecord::V2 { dir } => {
                // The mount point is only needed by create(); derive it for completeness.
                let mp = dir
                    .ancestors()
                    .find(|a| {
                        a.join("cgroup.controllers").exists()
                            && a.parent()
                                .is_some_and(|p| !p.join("cgroup.controllers").exists())
                    })
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"));
                Cgroup::V2(V2Cgroup {
                    mount_point: mp,
                    dir: dir.clone(),
                })
            }
            CgroupRecord::Fake => Cgroup::Fake(FakeCgroup::default()),
        }
    }

    fn inner(&self) -> &dyn CgroupManager {
        match self {
            Cgroup::V1(c) => c,
            Cgroup::V2(c) => c,
            Cgroup::Fake(c) => c,
        }
    }
}

impl CgroupManager for Cgroup {
    fn create(&self) -> Result<(), CgroupError> {
        self.inner().create()
    }
    fn apply(&self, limits: &Limits) -> Result<(), CgroupError> {
        self.inner().apply(limits)
    }
    fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        self.inner().add_pid(pid)
    }
    fn stats(&self) -> Result<Stats, CgroupError> {
        self.inner().stats()
    }
    fn procs(&self) -> Result<Vec<i32>, CgroupError> {
        self.inner().procs()
    }
    fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        self.inner().freeze(frozen)
    }
    fn remove(&self) -> Result<(), CgroupError> {
        self.inner().remove()
    }
    fn record(&self) -> CgroupRecord {
        self.inner().record()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:25 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
30 25 0:28 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,cpu,cpuacct
31 25 0:29 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,memory
32 25 0:30 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,pids
33 25 0:31 / /sys/fs/cgroup/freezer rw,nosuid,nodev,noexec,relatime shared:17 - cgroup cgroup rw,freezer
";

    const UNIFIED: &str = "\
25 30 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn hybrid_host_with_comounted_controllers_is_v1() {
        let h = parse_mountinfo(HYBRID);
        assert_eq!(h.len(), 6);
        let Some(Layout::V1(v1)) = detect(&h) else {
            panic!("expected v1")
        };
        // name=systemd has no controllers and is ignored; cgroup2 on unified is ignored.
        assert_eq!(v1.len(), 4);
        let cg = V1Cgroup::new(&v1, "/tweed/abc");
        assert_eq!(
            cg.dirs["cpu"],
            PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/tweed/abc")
        );
        assert_eq!(cg.dirs["cpu"], cg.dirs["cpuacct"]);
        assert_eq!(
            cg.dirs["memory"],
            PathBuf::from("/sys/fs/cgroup/memory/tweed/abc")
        );
        assert!(!cg.dirs.contains_key("devices"));
        // cpu and cpuacct share one directory: created and joined once, through `tasks`.
        assert_eq!(cg.unique_dirs().len(), 4);
        let t = SelfJoin::targets(&cg.record());
        assert_eq!(t.len(), 4);
        assert!(t.iter().all(|p| p.ends_with("tasks")));
        assert_eq!(
            SelfJoin::targets(&CgroupRecord::V2 {
                dir: "/sys/fs/cgroup/t/c".into()
            }),
            vec![PathBuf::from("/sys/fs/cgroup/t/c/cgroup.procs")]
        );
    }

    #[test]
    fn separately_mounted_cpu_and_cpuacct() {
        let text = "\
1 0 0:1 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
2 0 0:2 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct
";
        let Some(Layout::V1(v1)) = detect(&parse_mountinfo(text)) else {
            panic!()
        };
        let cg = V1Cgroup::new(&v1, "/t/x");
        assert_ne!(cg.dirs["cpu"], cg.dirs["cpuacct"]);
    }

    #[test]
    fn unified_host_is_v2() {
        assert_eq!(
            detect(&parse_mountinfo(UNIFIED)),
            Some(Layout::V2 {
                mount_point: "/sys/fs/cgroup".into()
            })
        );
        assert_eq!(detect(&[]), None);
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }

    #[test]
    fn v1_values() {
        let l = Limits {
            memory: Some(64 << 20),
            millicpus: Some(500),
            pids: Some(100),
        };
        assert_eq!(
            v1_writes(&l, true),
            vec![
                ("memory", "memory.limit_in_bytes", "67108864".to_string()),
                (
                    "memory",
                    "memory.memsw.limit_in_bytes",
                    "67108864".to_string()
                ),
                ("cpu", "cpu.cfs_period_us", "100000".to_string()),
                ("cpu", "cpu.cfs_quota_us", "50000".to_string()),
                ("pids", "pids.max", "100".to_string()),
            ]
        );
        assert_eq!(v1_writes(&l, false).len(), 4);
        assert!(v1_writes(&Limits::default(), true).is_empty());
    }

    #[test]
    fn v2_values() {
        let l = Limits {
            memory: Some(64 << 20),
            millicpus: Some(1500),
            pids: Some(7),
        };
        assert_eq!(
            v2_writes(&l),
            vec![
                ("memory.max", "67108864".to_string()),
                ("memory.swap.max", "0".to_string()),
                ("cpu.max", "150000 100000".to_string()),
                ("pids.max", "7".to_string()),
            ]
        );
    }

    #[test]
    fn keyed_files() {
        let stat = "cache 4096\nrss 100\ntotal_cache 8192\n";
        assert_eq!(keyed(stat, "cache"), Some(4096));
        assert_eq!(keyed(stat, "total_cache"), Some(8192));
        assert_eq!(keyed(stat, "nope"), None);
        let oom = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n";
        assert_eq!(keyed(oom, "oom_kill"), Some(2));
    }

    #[test]
    fn v2_manager_writes_files_in_a_fake_tree() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::fs::write(root.join("cgroup.controllers"), "cpuset cpu io memory pids").unwrap();
        std::fs::write(root.join("cgroup.subtree_control"), "").unwrap();
        let cg = V2Cgroup::new(root, "/tweed/c1");
        // Pre-create the parent with its files as the kernel would.
        std::fs::create_dir(root.join("tweed")).unwrap();
        std::fs::write(root.join("tweed/cgroup.controllers"), "cpu memory pids").unwrap();
        std::fs::write(root.join("tweed/cgroup.subtree_control"), "").unwrap();
        cg.create().unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("cgroup.subtree_control")).unwrap(),
            "+memory +cpu +pids"
        );
        assert!(root.join("tweed/c1").is_dir());
        for f in ["memory.max", "cpu.max", "pids.max"] {
            std::fs::write(root.join("tweed/c1").join(f), "max").unwrap();
        }
        cg.apply(&Limits {
            memory: Some(32 << 20),
            millicpus: Some(250),
            pids: Some(10),
        })
        .unwrap();
        let rd = |f: &str| std::fs::read_to_string(root.join("tweed/c1").join(f)).unwrap();
        assert_eq!(rd("memory.max"), "33554432");
        assert_eq!(rd("cpu.max"), "25000 100000");
        assert_eq!(rd("pids.max"), "10");
        assert_eq!(
            cg.record(),
            CgroupRecord::V2 {
                dir: root.join("tweed/c1")
            }
        );
    }

    #[test]
    fn v2_missing_controller_is_reported() {
        let t = tempfile::tempdir().unwrap();
        let cg = V2Cgroup::new(t.path(), "/c");
        std::fs::create_dir(t.path().join("c")).unwrap();
        let e = cg
            .apply(&Limits {
                pids: Some(3),
                ..Default::default()
            })
            .unwrap_err();
        assert!(
            matches!(e, CgroupError::MissingController(ref c) if c == "pids"),
            "{e}"
        );
    }

    #[test]
    fn fake_records() {
        let f = Cgroup::Fake(FakeCgroup::default());
        f.apply(&Limits {
            pids: Some(5),
            ..Default::default()
        })
        .unwrap();
        f.add_pid(42).unwrap();
        let Cgroup::Fake(inner) = &f else { panic!() };
        assert_eq!(
            inner.writes.lock().unwrap()[0],
            ("pids.max".into(), "5".into())
        );
        assert_eq!(f.procs().unwrap(), vec![42]);
    }
}
