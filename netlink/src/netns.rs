//! Network namespaces as file descriptors, and the one safe way to do something inside one.
//!
//! A namespace is held open as an fd (from `/run/netns/NAME`, `/proc/PID/ns/net`, or the path a
//! container runtime hands a CNI plugin). Work that must happen inside it (opening a netlink
//! socket, writing a per-namespace sysctl) runs in a short-lived thread that `setns`es and then
//! ends, so no thread of the caller ever changes namespace: a socket keeps the namespace it was
//! opened in for its whole life, wherever it is used afterwards.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("opening network namespace {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a network namespace ({detail})", path.display())]
    NotNetns { path: PathBuf, detail: String },
    #[error("entering network namespace {}: {source}", path.display())]
    Enter {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("spawning a thread to enter network namespace {}: {source}", path.display())]
    Thread {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the thread working in network namespace {} panicked", path.display())]
    Panicked { path: PathBuf },
}

impl NetnsError {
    /// True when the namespace file does not exist (a container that is already gone).
    pub fn is_not_found(&self) -> bool {
        matches!(self, NetnsError::Open { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

/// An open network namespace. The namespace lives at least as long as this value.
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    path: PathBuf,
}

impl Netns {
    /// Opens a namespace file and checks that it is one (a plain file or a directory there
    /// would otherwise only fail later, at `setns`, with a vaguer error).
    pub fn open(path: impl AsRef<Path>) -> Result<Netns, NetnsError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| NetnsError::Open {
            path: path.clone(),
            source,
        })?;
        let ns = Netns {
            fd: file.into(),
            path,
        };
        ns.check_type()?;
        Ok(ns)
    }

    /// The calling thread's namespace.
    pub fn current() -> Result<Netns, NetnsError> {
        Netns::open("/proc/thread-self/ns/net")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn check_type(&self) -> Result<(), NetnsError> {
        let not = |detail: String| NetnsError::NotNetns {
            path: self.path.clone(),
            detail,
        };
        // NS_GET_NSTYPE (_IO(0xb7, 0x3), Linux 4.11) says which kind of namespace an nsfs file
        // is, and fails with ENOTTY on anything else.
        const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
        // SAFETY: the ioctl takes no argument and only reads the fd.
        let kind = unsafe { libc::ioctl(self.fd.as_raw_fd(), NS_GET_NSTYPE as _) };
        if kind < 0 {
            return Err(not(io::Error::last_os_error().to_string()));
        }
        if kind != libc::CLONE_NEWNET {
            return Err(not(format!("a namespace of another type ({kind:#x})")));
        }
        Ok(())
    }

    /// Whether two handles name the same namespace (same nsfs inode).
    pub fn same_as(&self, other: &Netns) -> bool {
        match (self.ident(), other.ident()) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        }
    }

    fn ident(&self) -> Option<(u64, u64)> {
        let f = File::from(self.fd.try_clone().ok()?);
        let m = f.metadata().ok()?;
        Some((m.dev(), m.ino()))
    }

    /// Runs `f` on a fresh thread inside this namespace and returns its result. The thread ends
    /// with `f`, so the namespace switch never outlives the call and never touches the caller's
    /// threads. `f` must not spawn work that expects to outlive it in that namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
        let fd = self.fd.as_fd();
        std::thread::scope(|s| {
            let handle = std::thread::Builder::new()
                .name("netns".into())
                .spawn_scoped(s, move || -> Result<T, NetnsError> {
                    enter(fd).map_err(|source| NetnsError::Enter {
                        path: self.path.clone(),
                        source,
                    })?;
                    Ok(f())
                })
                .map_err(|source| NetnsError::Thread {
                    path: self.path.clone(),
                    source,
                })?;
            handle.join().map_err(|_| NetnsError::Panicked {
                path: self.path.clone(),
            })?
        })
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// `setns(fd, CLONE_NEWNET)` for the calling thread. Only for threads that end right after (as
/// in [`Netns::run`]) or for a child between fork and exec (`Command::pre_exec`).
pub fn enter(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: setns only reads the fd; CLONE_NEWNET makes the kernel check its type.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_file_is_not_a_namespace() {
        let err = Netns::open("/proc/self/status").unwrap_err();
        assert!(matches!(err, NetnsError::NotNetns { .. }), "{err}");
        assert!(err.to_string().contains("/proc/self/status"), "{err}");
    }

    #[test]
    fn a_missing_file_says_so() {
        let err = Netns::open("/nonexistent/netns/x").unwrap_err();
        assert!(err.is_not_found(), "{err}");
    }

    #[test]
    fn current_namespace_is_itself_and_runs_closures() {
        let a = Netns::current().unwrap();
        let b = Netns::current().unwrap();
        assert!(a.same_as(&b));
        // Entering one's own namespace needs CAP_SYS_ADMIN; without it the error names the path.
        match a.run(|| 42) {
            Ok(v) => assert_eq!(v, 42),
            Err(e) => assert!(matches!(e, NetnsError::Enter { .. }), "{e}"),
        }
    }
}
