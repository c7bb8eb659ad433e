//! A container's cgroup on a v1 host (one hierarchy per controller, or co-mounted ones as on
//! hybrid hosts): which file gets which value, and the manager over those directories.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::files::{keyed, mkdir, read, read_procs, rmdir_retry, under, write};
use super::{
    CgroupError, CgroupManager, CgroupRecord, DevicePolicy, Hierarchy, Stats, DEVICE_ALLOW,
};
use crate::units::{Limits, CPU_PERIOD_US};

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

    fn devices(&self, policy: DevicePolicy) -> Result<(), CgroupError> {
        let Some(d) = self.dirs.get("devices") else {
            return Ok(());
        };
        let rules: &[&str] = match policy {
            DevicePolicy::Default => DEVICE_ALLOW,
            DevicePolicy::All => &["a"],
        };
        write(&d.join("devices.deny"), "a")?;
        // One rule per write(2), through one open file.
        let p = d.join("devices.allow");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(|source| CgroupError::Write {
                path: p.clone(),
                value: rules[0].to_string(),
                source,
            })?;
        for rule in rules {
            use std::io::Write;
            f.write_all(rule.as_bytes())
                .map_err(|source| CgroupError::Write {
                    path: p.clone(),
                    value: rule.to_string(),
                    source,
                })?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::{detect, parse_mountinfo, Layout, SelfJoin};

    const HYBRID: &str = "\
25 30 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:25 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
30 25 0:28 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,cpu,cpuacct
31 25 0:29 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,memory
32 25 0:30 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,pids
33 25 0:31 / /sys/fs/cgroup/freezer rw,nosuid,nodev,noexec,relatime shared:17 - cgroup cgroup rw,freezer
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
}
