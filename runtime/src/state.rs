//! On-disk container state under the run root (default `/run/tweed`), readable by any later
//! `tweedctl`, and the pure status logic over it.
//!
//! ```text
//! <run>/containers/<id>/config.json   what to run (written once by tweedctl)
//! <run>/containers/<id>/shim.json     the supervisor's pid and start time
//! <run>/containers/<id>/init.json     the container init's pid, start time, start date
//! <run>/containers/<id>/exit.json     how it ended (written by the supervisor)
//! <run>/containers/<id>/cni.json      the CNI attachment and cached result
//! <run>/containers/<id>/log           stdout/stderr records
//! <run>/containers/<id>/netns         the container's network namespace (bind mount)
//! <run>/names/<name> -> <id>          name reservations (created atomically)
//! <image-root>/containers/<id>/       upper and work dirs of the overlay
//! <image-root>/scratch/               empty; each init mounts its own tmpfs there (init layer,
//!                                     overlay mount point), seen only in its mount namespace
//! ```

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::caps::CapSet;
use crate::cgroup::CgroupRecord;
use crate::cni::{Attachment, NetworkList};
use crate::fsutil;
use crate::units::Limits;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: corrupt state: {what}")]
    Corrupt { path: PathBuf, what: String },
}

/// The short form of a container id shown by `ps` and used for default names: its first 12
/// characters, or all of an id that is shorter (a state directory someone made by hand).
pub fn short_id(id: &str) -> &str {
    id.char_indices().nth(12).map_or(id, |(i, _)| &id[..i])
}

/// Where things live.
#[derive(Debug, Clone)]
pub struct Paths {
    pub run_root: PathBuf,
    pub image_root: PathBuf,
}

impl Paths {
    pub fn containers(&self) -> PathBuf {
        self.run_root.join("containers")
    }
    pub fn names(&self) -> PathBuf {
        self.run_root.join("names")
    }
    pub fn state_dir(&self, id: &str) -> PathBuf {
        self.containers().join(id)
    }
    pub fn data_dir(&self, id: &str) -> PathBuf {
        self.image_root.join("containers").join(id)
    }
    /// See [`crate::rootfs::RootfsSpec::scratch`].
    pub fn scratch(&self) -> PathBuf {
        self.image_root.join("scratch")
    }
    pub fn name_link(&self, name: &str) -> PathBuf {
        self.names().join(name)
    }
    /// An overlay container's pinned network namespace.
    pub fn netns(&self, id: &str) -> PathBuf {
        self.state_dir(id).join("netns")
    }
}

/// Network mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetMode {
    /// Own namespace, attached by the CNI plugin(s).
    Overlay,
    /// Own namespace with only loopback.
    None,
    /// The host's namespace (or `--host-netns`).
    Host,
    /// Another container's namespace (its id).
    Container(String),
}

impl NetMode {
    pub fn parse(s: &str) -> Option<NetMode> {
        match s {
            "overlay" | "bridge" | "default" => Some(NetMode::Overlay),
            "none" => Some(NetMode::None),
            "host" => Some(NetMode::Host),
            _ => s
                .strip_prefix("container:")
                .filter(|r| !r.is_empty())
                .map(|r| NetMode::Container(r.to_string())),
        }
    }
    pub fn show(&self) -> String {
        match self {
            NetMode::Overlay => "overlay".into(),
            NetMode::None => "none".into(),
            NetMode::Host => "host".into(),
            NetMode::Container(c) => format!("container:{c}"),
        }
    }
}

/// `-v HOST:CTR[:ro]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub host: PathBuf,
    pub container: PathBuf,
    pub readonly: bool,
}

impl Volume {
    pub fn parse(s: &str) -> Option<Volume> {
        let parts: Vec<&str> = s.split(':').collect();
        let (h, c, ro) = match parts.as_slice() {
            [h, c] => (*h, *c, false),
            [h, c, "ro"] => (*h, *c, true),
            [h, c, "rw"] => (*h, *c, false),
            _ => return None,
        };
        if !h.starts_with('/') || !c.starts_with('/') || c.split('/').any(|p| p == "..") {
            return None;
        }
        Some(Volume {
            host: h.into(),
            container: c.into(),
            readonly: ro,
        })
    }
}

/// Everything about a container decided at creation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerConfig {
    pub id: String,
    pub name: String,
    pub image: String,
    pub image_id: String,
    /// Diff ids, bottom first.
    pub layers: Vec<String>,
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub user: String,
    pub hostname: String,
    pub limits: Limits,
    /// CPUs the container is pinned to (empty: all).
    pub cpus: Vec<usize>,
    pub net: NetMode,
    pub volumes: Vec<Volume>,
    pub cgroup: CgroupRecord,
    pub caps: CapSet,
    /// seccomp, no_new_privs, privileged (absent in configs older than these options).
    #[serde(default)]
    pub security: crate::security::Security,
    pub created: String,
    pub auto_remove: bool,
    /// The namespace treated as the host's (CNI plugins and `--net host` use it).
    pub host_netns: Option<PathBuf>,
    /// Path of the container's network namespace when it has a persistent one.
    pub netns_path: Option<PathBuf>,
    /// `--userns`: the host ids of the container's uid/gid 0.. (none: no user namespace).
    #[serde(default)]
    pub userns: Option<crate::userns::Mapping>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcInfo {
    pub pid: i32,
    /// Field 22 of /proc/PID/stat: tells a reused pid from ours.
    pub start_time: u64,
    pub started: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Shell-style: the exit status, or 128 + signal.
    pub code: i32,
    pub signal: Option<i32>,
    pub oom_killed: bool,
    pub finished: String,
}

/// A container's status, derived from its files and live processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Status {
    Created,
    Running,
    Exited {
        code: i32,
        oom_killed: bool,
    },
    /// The supervisor is gone without recording an exit.
    Dead {
        reason: String,
    },
}

impl Status {
    pub fn show(&self) -> String {
        match self {
            Status::Created => "created".into(),
            Status::Running => "running".into(),
            Status::Exited {
                code,
                oom_killed: true,
            } => format!("exited ({code}, OOM killed)"),
            Status::Exited { code, .. } => format!("exited ({code})"),
            Status::Dead { reason } => format!("dead ({reason})"),
        }
    }
    pub fn is_running(&self) -> bool {
        matches!(self, Status::Running | Status::Created)
    }
}

/// The status from what is on disk and which processes are alive.
pub fn status(
    init: Option<&ProcInfo>,
    exit: Option<&ExitInfo>,
    shim_alive: bool,
    init_alive: bool,
) -> Status {
    if let Some(e) = exit {
        return Status::Exited {
            code: e.code,
            oom_killed: e.oom_killed,
        };
    }
    match (init, shim_alive, init_alive) {
        (Some(_), true, _) => Status::Running,
        (Some(_), false, true) => Status::Dead {
            reason: "supervisor killed; the container runs unsupervised".into(),
        },
        (Some(_), false, false) => Status::Dead {
            reason: "supervisor killed; exit code lost".into(),
        },
        (None, true, _) => Status::Created,
        (None, false, _) => Status::Dead {
            reason: "supervisor died while starting the container".into(),
        },
    }
}

/// (state, start time) from the text of /proc/PID/stat.
pub fn parse_stat(text: &str) -> Option<(char, u64)> {
    // comm (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); starttime is field 22.
    let state = f.first()?.chars().next()?;
    let start = f.get(19)?.parse().ok()?;
    Some((state, start))
}

/// The start time of a live (non-zombie) process.
pub fn proc_start_time(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    match parse_stat(&text)? {
        ('Z', _) | ('X', _) => None,
        (_, t) => Some(t),
    }
}

/// Whether the process `info` describes is still the same live process.
pub fn alive(pid: i32, start_time: u64) -> bool {
    pid > 0 && proc_start_time(pid) == Some(start_time)
}

/// The CNI attachment of a container, recorded before ADD so that DEL and GC always know it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CniRecord {
    pub list: NetworkList,
    pub attachment: Attachment,
    pub result: Option<serde_json::Value>,
}

pub fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<(), StateError> {
    let data = serde_json::to_vec_pretty(v).expect("state serializes");
    fsutil::write_atomic(path, &data).map_err(|source| StateError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes a process record (`shim.json`, `init.json`, `exit.json`): atomically (tmp file 0600,
/// rename) but without fsync, unlike [`write_json`]. Each fsync pair cost ~0.8 ms on ext4 and
/// three sat on the path every `run` waits for. Nothing is lost by it: these records describe
/// processes, and a host crash kills those processes anyway. After a crash a record may be
/// missing, empty or garbage; [`read_process_record`] reads all three as "no record", so the container shows as dead
/// (no live supervisor) and `rm` still works. What names resources that outlive a crash
/// (`config.json`: cgroup, layers, name; `cni.json`: the CNI attachment and its address) stays
/// durable through [`write_json`].
pub fn write_process_record<T: Serialize>(path: &Path, v: &T) -> Result<(), StateError> {
    let data = serde_json::to_vec_pretty(v).expect("state serializes");
    fsutil::write_atomic_volatile(path, &data).map_err(|source| StateError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a process record written by [`write_process_record`]. Besides missing and empty, a
/// record that does not parse is "no record" too: without fsync, a crash on a file system that
/// writes data after metadata (ext4 `data=writeback`, for one) can leave NULs or stale bytes in
/// it, and a process it described died with the host. `status`, `list` and `rm` keep working.
pub fn read_process_record<T: for<'de> Deserialize<'de>>(
    path: &Path,
) -> Result<Option<T>, StateError> {
    match read_json(path) {
        Err(StateError::Corrupt { .. }) => Ok(None),
        other => other,
    }
}

/// Writes a record atomically but leaves the fsyncs of [`write_json`] to the caller
/// (`shim::sync_durable`), who overlaps them with other work and must finish them before
/// reporting success: `config.json`, synced while the supervisor starts the container.
pub fn write_json_pending<T: Serialize>(path: &Path, v: &T) -> Result<(), StateError> {
    write_process_record(path, v)
}

/// Reads a state file; a missing file, or an empty one (what a crash can leave of a process
/// record, see [`write_process_record`]), is `None`.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, StateError> {
    match std::fs::read(path) {
        Ok(d) if d.is_empty() => Ok(None),
        Ok(d) => serde_json::from_slice(&d)
            .map(Some)
            .map_err(|e| StateError::Corrupt {
                path: path.to_path_buf(),
                what: e.to_string(),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_ids_never_cut_past_the_end_or_inside_a_character() {
        assert_eq!(short_id("0123456789abcdef"), "0123456789ab");
        assert_eq!(short_id("0123456789ab"), "0123456789ab");
        assert_eq!(short_id("abc"), "abc");
        assert_eq!(short_id(""), "");
        assert_eq!(short_id("ééééééééééééé"), "éééééééééééé");
    }

    #[test]
    fn a_process_record_a_crash_left_empty_reads_as_none() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("init.json");
        let info = ProcInfo {
            pid: 42,
            start_time: 7,
            started: "now".into(),
        };
        write_process_record(&p, &info).unwrap();
        let back: ProcInfo = read_json(&p).unwrap().unwrap();
        assert_eq!((back.pid, back.start_time), (42, 7));
        // What a crash can leave of an unsynced new file: the name with no content.
        std::fs::write(&p, b"").unwrap();
        assert!(read_json::<ProcInfo>(&p).unwrap().is_none());
        // Damage is still reported, naming the file, where the file must be durable...
        std::fs::write(&p, b"{\"pid\":").unwrap();
        let e = read_json::<ProcInfo>(&p).unwrap_err().to_string();
        assert!(e.contains("init.json"), "{e}");
        // ...while a process record that a crash filled with NULs or cut short is no record.
        assert!(read_process_record::<ProcInfo>(&p).unwrap().is_none());
        std::fs::write(&p, [0u8; 64]).unwrap();
        assert!(read_process_record::<ProcInfo>(&p).unwrap().is_none());
        write_process_record(&p, &info).unwrap();
        let back: ProcInfo = read_process_record(&p).unwrap().unwrap();
        assert_eq!(back.pid, 42);
    }

    #[test]
    fn net_modes() {
        assert_eq!(NetMode::parse("overlay"), Some(NetMode::Overlay));
        assert_eq!(NetMode::parse("none"), Some(NetMode::None));
        assert_eq!(NetMode::parse("host"), Some(NetMode::Host));
        assert_eq!(
            NetMode::parse("container:abc"),
            Some(NetMode::Container("abc".into()))
        );
        assert_eq!(NetMode::parse("container:"), None);
        assert_eq!(NetMode::parse("macvlan"), None);
        assert_eq!(NetMode::Container("x".into()).show(), "container:x");
    }

    #[test]
    fn volumes() {
        assert_eq!(
            Volume::parse("/h:/c:ro"),
            Some(Volume {
                host: "/h".into(),
                container: "/c".into(),
                readonly: true
            })
        );
        assert!(!Volume::parse("/h:/c").unwrap().readonly);
        assert_eq!(Volume::parse("rel:/c"), None);
        assert_eq!(Volume::parse("/h:/../etc"), None);
        assert_eq!(Volume::parse("/h:/c:zz"), None);
        assert_eq!(Volume::parse("/h"), None);
    }

    #[test]
    fn stat_parsing_survives_odd_comm() {
        let s =
            "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 987654 1000 100";
        assert_eq!(parse_stat(s), Some(('S', 987654)));
        assert_eq!(parse_stat("garbage"), None);
        let me = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(parse_stat(&me).is_some());
        assert!(alive(std::process::id() as i32, parse_stat(&me).unwrap().1));
        assert!(!alive(std::process::id() as i32, 1));
    }

    #[test]
    fn statuses() {
        let p = ProcInfo {
            pid: 5,
            start_time: 1,
            started: "t".into(),
        };
        let e = ExitInfo {
            code: 137,
            signal: Some(9),
            oom_killed: true,
            finished: "t".into(),
        };
        assert_eq!(status(Some(&p), None, true, true), Status::Running);
        assert_eq!(
            status(Some(&p), Some(&e), false, false),
            Status::Exited {
                code: 137,
                oom_killed: true
            }
        );
        assert!(matches!(
            status(Some(&p), None, false, false),
            Status::Dead { .. }
        ));
        assert!(matches!(
            status(Some(&p), None, false, true),
            Status::Dead { .. }
        ));
        assert_eq!(status(None, None, true, false), Status::Created);
        assert!(matches!(
            status(None, None, false, false),
            Status::Dead { .. }
        ));
        assert_eq!(
            status(Some(&p), Some(&e), false, false).show(),
            "exited (137, OOM killed)"
        );
    }
}
