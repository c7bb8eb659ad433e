//! Reading and writing cgroupfs files, shared by the v1 and v2 managers: every error names
//! the file and, for writes, the value the kernel refused.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::CgroupError;

/// The value of `key` in a flat keyed file (`key value` per line), e.g. memory.stat.
pub fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == key).then_some(())?;
        it.next()?.parse().ok()
    })
}

pub(super) fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

pub(super) fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

pub(super) fn read_procs(dir: &Path) -> Result<Vec<i32>, CgroupError> {
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
pub(super) fn rmdir_retry(dir: &Path) -> Result<(), CgroupError> {
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

pub(super) fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir_all(path) {
        Ok(()) => Ok(()),
        Err(source) => Err(CgroupError::Create {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Joins a hierarchy's mount point with an absolute cgroup path.
pub(super) fn under(mount_point: &Path, cgroup_path: &str) -> PathBuf {
    mount_point.join(cgroup_path.trim_start_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_files() {
        let stat = "cache 4096\nrss 100\ntotal_cache 8192\n";
        assert_eq!(keyed(stat, "cache"), Some(4096));
        assert_eq!(keyed(stat, "total_cache"), Some(8192));
        assert_eq!(keyed(stat, "nope"), None);
        let oom = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n";
        assert_eq!(keyed(oom, "oom_kill"), Some(2));
    }
}
