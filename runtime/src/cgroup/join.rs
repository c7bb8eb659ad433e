//! How a process moves itself into its container's cgroups.

use std::path::PathBuf;

use super::{CgroupError, CgroupRecord};

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
