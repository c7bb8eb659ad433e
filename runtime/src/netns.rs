//! Persistent network namespaces: a bind mount of a namespace onto a file (as `ip netns add`
//! does), so the namespace outlives its processes until CNI DEL has run.

use std::io;
use std::path::{Path, PathBuf};

use crate::syscall::{Mount, Syscall};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("creating network namespace {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("removing network namespace {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
}

/// Creates a new network namespace (loopback up) pinned at `path`.
pub fn create(sys: &dyn Syscall, path: &Path) -> Result<(), NetnsError> {
    let err = |source| NetnsError::Create {
        path: path.to_path_buf(),
        source,
    };
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(err)?;
    // unshare(CLONE_NEWNET) moves only the calling thread: do it in a throwaway one.
    let r = std::thread::scope(|s| {
        s.spawn(|| -> io::Result<()> {
            sys.unshare(libc::CLONE_NEWNET)?;
            sys.loopback_up()?;
            sys.mount(
                &Mount::new(path)
                    .source("/proc/thread-self/ns/net")
                    .flags(libc::MS_BIND),
            )
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
    });
    if let Err(e) = r {
        let _ = std::fs::remove_file(path);
        return Err(err(e));
    }
    Ok(())
}

/// Unpins and deletes a namespace file; a missing one is fine.
pub fn remove(sys: &dyn Syscall, path: &Path) -> Result<(), NetnsError> {
    match sys.umount2(path, libc::MNT_DETACH) {
        Ok(()) => {}
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) => {}
        Err(source) => {
            return Err(NetnsError::Remove {
                path: path.to_path_buf(),
                source,
            })
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NetnsError::Remove {
            path: path.to_path_buf(),
            source,
        }),
    }
}
