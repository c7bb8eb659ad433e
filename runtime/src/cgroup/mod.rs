//! Control groups, v1 (one hierarchy per controller or co-mounted ones, as on hybrid hosts) and v2.
//!
//! Pure parts: where the hierarchies are ([`layout`]), which file gets which value
//! ([`v1_writes`], [`v2_writes`]), and stat parsing. Side effects live behind
//! [`CgroupManager`], implemented by [`V1Cgroup`] ([`v1`]), [`V2Cgroup`] ([`v2`]) and, in unit
//! tests, `fake::FakeCgroup`; [`Cgroup`] dispatches between the host's two. What a container
//! saves is a [`CgroupRecord`]: only real hierarchies can be recorded.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::units::Limits;

pub mod devices;
#[cfg(test)]
pub mod fake;
mod files;
mod join;
pub mod layout;
pub mod v1;
pub mod v2;

pub use devices::{DevicePolicy, DEVICE_ALLOW};
pub use files::keyed;
pub use join::SelfJoin;
pub use layout::{detect, host_layout, parse_mountinfo, Hierarchy, Layout};
pub use v1::{v1_writes, V1Cgroup};
pub use v2::{v2_writes, V2Cgroup};

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
    #[error("device rules of cgroup {path}: {source}")]
    Devices {
        path: PathBuf,
        source: devices::DeviceError,
    },
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
        }
    }
}

/// The side effects on one container's cgroup.
pub trait CgroupManager {
    /// Creates the directories.
    fn create(&self) -> Result<(), CgroupError>;
    /// Writes the limits (before the container's command runs).
    fn apply(&self, limits: &Limits) -> Result<(), CgroupError>;
    /// Restricts device access (v1 `devices.deny`/`devices.allow`, v2 an eBPF program).
    fn devices(&self, policy: DevicePolicy) -> Result<(), CgroupError>;
    fn add_pid(&self, pid: i32) -> Result<(), CgroupError>;
    fn stats(&self) -> Result<Stats, CgroupError>;
    fn procs(&self) -> Result<Vec<i32>, CgroupError>;
    fn freeze(&self, frozen: bool) -> Result<(), CgroupError>;
    /// Kills what is left and removes the directories; a missing cgroup is fine.
    fn remove(&self) -> Result<(), CgroupError>;
    fn record(&self) -> CgroupRecord;
}

/// Enum dispatch over the host implementations (unit tests use `fake::FakeCgroup` directly).
#[derive(Debug)]
pub enum Cgroup {
    V1(V1Cgroup),
    V2(V2Cgroup),
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
        }
    }

    fn inner(&self) -> &dyn CgroupManager {
        match self {
            Cgroup::V1(c) => c,
            Cgroup::V2(c) => c,
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
    fn devices(&self, policy: DevicePolicy) -> Result<(), CgroupError> {
        self.inner().devices(policy)
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
