//! A container's cgroup on a v2 (unified) host: which file gets which value, and the manager
//! over its one directory.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::files::{keyed, mkdir, read, read_procs, rmdir_retry, under, write};
use super::{CgroupError, CgroupManager, CgroupRecord, DevicePolicy, Stats};
use crate::units::{Limits, CPU_PERIOD_US};

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

    /// v2 has no devices files: Docker's list becomes an eBPF program on the cgroup. `All`
    /// attaches nothing (no program: every device).
    fn devices(&self, policy: DevicePolicy) -> Result<(), CgroupError> {
        if policy == DevicePolicy::All {
            return Ok(());
        }
        super::devices::install_v2(&self.dir).map_err(|source| CgroupError::Devices {
            path: self.dir.clone(),
            source,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
