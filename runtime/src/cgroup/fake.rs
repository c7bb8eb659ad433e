//! An in-memory cgroup for unit tests. Compiled for tests only, so no fake ever reaches a
//! container's saved state: its record names a v2 directory that does not exist.

use std::io;
use std::path::PathBuf;
use std::sync::Mutex;

use super::{v2_writes, CgroupError, CgroupManager, CgroupRecord, DevicePolicy, Stats};
use crate::journal::Journal;
use crate::units::Limits;

/// The operations a [`FakeCgroup`] can be told to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Create,
    Apply,
}

/// Records what is done to it (in `journal` as `cgroup <op>`), reports `stats`.
#[derive(Debug)]
pub struct FakeCgroup {
    pub writes: Mutex<Vec<(String, String)>>,
    pub pids: Mutex<Vec<i32>>,
    pub stats: Stats,
    /// This operation fails with EPERM (after being journaled).
    pub fail_on: Option<Op>,
    pub journal: Journal,
    /// The directory `record()` names.
    pub dir: PathBuf,
}

impl Default for FakeCgroup {
    fn default() -> Self {
        FakeCgroup {
            writes: Mutex::default(),
            pids: Mutex::default(),
            stats: Stats::default(),
            fail_on: None,
            journal: Journal::default(),
            dir: "/nonexistent/tweed-fake-cgroup".into(),
        }
    }
}

impl FakeCgroup {
    fn op(&self, op: Op, name: &str) -> Result<(), CgroupError> {
        self.journal.note(format!("cgroup {name}"));
        if self.fail_on != Some(op) {
            return Ok(());
        }
        let source = io::Error::from_raw_os_error(libc::EPERM);
        Err(match op {
            Op::Create => CgroupError::Create {
                path: self.dir.clone(),
                source,
            },
            Op::Apply => CgroupError::Write {
                path: self.dir.join("pids.max"),
                value: "limits".into(),
                source,
            },
        })
    }
}

impl CgroupManager for FakeCgroup {
    fn create(&self) -> Result<(), CgroupError> {
        self.op(Op::Create, "create")
    }
    fn apply(&self, limits: &Limits) -> Result<(), CgroupError> {
        self.op(Op::Apply, "apply")?;
        let mut w = self.writes.lock().unwrap();
        for (f, v) in v2_writes(limits) {
            w.push((f.to_string(), v));
        }
        Ok(())
    }
    fn devices(&self, policy: DevicePolicy) -> Result<(), CgroupError> {
        self.journal.note(format!("cgroup devices {policy:?}"));
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
        self.journal.note("cgroup remove");
        Ok(())
    }
    fn record(&self) -> CgroupRecord {
        CgroupRecord::V2 {
            dir: self.dir.clone(),
        }
    }
}

mod tests {
    use super::*;

    #[test]
    fn fake_records() {
        let f = FakeCgroup::default();
        f.apply(&Limits {
            pids: Some(5),
            ..Default::default()
        })
        .unwrap();
        f.add_pid(42).unwrap();
        assert_eq!(f.writes.lock().unwrap()[0], ("pids.max".into(), "5".into()));
        assert_eq!(f.procs().unwrap(), vec![42]);
        assert_eq!(f.journal.lines(), ["cgroup apply"]);
        let failing = FakeCgroup {
            fail_on: Some(Op::Create),
            ..Default::default()
        };
        assert!(matches!(failing.create(), Err(CgroupError::Create { .. })));
    }
}
