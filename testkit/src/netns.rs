//! Named network namespaces for tests (`ip netns add`, so `ip -n` and `ip netns exec` reach
//! them), deleted however the test ends; and running code on a thread inside one.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::cmd::{self, CmdError};

/// Where `ip netns` keeps the namespace `name`.
pub fn path_of(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Creates namespace `name` with loopback up. A leftover of that name (a crashed earlier run of
/// the same test) is deleted first.
pub fn create(name: &str) -> Result<(), CmdError> {
    delete(name);
    cmd::try_run("ip", &["netns", "add", name])?;
    cmd::try_run("ip", &["-n", name, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Deletes namespace `name` if it exists. Processes still in it (a stray ping, an agent the test
/// started) are killed first: a namespace with a live process in it would outlive its name.
pub fn delete(name: &str) {
    if !path_of(name).exists() {
        return;
    }
    let pids = Command::new("ip")
        .args(["netns", "pids", name])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for pid in pids
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        // SAFETY: kill(2) of a process inside a namespace this test made.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status();
}

/// Runs `f` on a fresh thread that has entered namespace `name`: sockets and netlink handles it
/// opens, and children it spawns, live there; the calling thread never moves. A panic in `f` is
/// the caller's panic.
pub fn enter<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = path_of(name);
    std::thread::spawn(move || {
        let fd = File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // SAFETY: `fd` is an open namespace file; setns changes only this thread.
        let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "setns {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        f()
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// A namespace made by the test, deleted (with whatever runs in it) on drop, also on panic. Its
/// file stays open, so the guard can be handed to `setns` (it is [`AsFd`]).
#[derive(Debug)]
pub struct NetnsGuard {
    name: String,
    file: Option<File>,
}

impl NetnsGuard {
    /// Namespace `name`, loopback up (see [`create`]).
    pub fn new(name: &str) -> Result<NetnsGuard, CmdError> {
        create(name)?;
        // From here on the guard owns the name: a failure below still deletes it.
        let mut guard = NetnsGuard {
            name: name.to_string(),
            file: None,
        };
        let file = File::open(guard.path()).map_err(|e| CmdError {
            line: format!("open {}", guard.path().display()),
            why: e.to_string(),
            stdout: String::new(),
            stderr: String::new(),
        })?;
        guard.file = Some(file);
        Ok(guard)
    }

    /// A namespace named [`crate::unique`]`(prefix)`; panics when it cannot be made.
    pub fn unique(prefix: &str) -> NetnsGuard {
        NetnsGuard::new(&crate::unique(prefix)).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        path_of(&self.name)
    }

    pub fn path_str(&self) -> String {
        self.path().display().to_string()
    }

    /// `ip -n NAME ARGS...`: stdout, or the error naming the command.
    pub fn ip(&self, args: &[&str]) -> Result<String, CmdError> {
        let mut a = vec!["-n", &self.name];
        a.extend_from_slice(args);
        cmd::try_run("ip", &a)
    }

    /// `argv` inside the namespace (`ip netns exec`): stdout, or the error naming the command.
    pub fn exec(&self, argv: &[&str]) -> Result<String, CmdError> {
        cmd::try_in_ns(&self.name, argv)
    }

    /// `ip -n NAME -j ARGS...` (or another iproute2 `tool`), parsed; empty output is `[]`.
    pub fn json(&self, tool: &str, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["-n", &self.name, "-j"];
        a.extend_from_slice(args);
        let out = cmd::run(tool, &a);
        if out.trim().is_empty() {
            return serde_json::Value::Array(vec![]);
        }
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{tool} {a:?}: {e}: {out}"))
    }

    /// Runs `f` on a thread inside the namespace; see [`enter`].
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        enter(&self.name, f)
    }
}

impl AsFd for NetnsGuard {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_ref().expect("opened in new").as_fd()
    }
}

impl AsRawFd for NetnsGuard {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        self.file = None;
        delete(&self.name);
    }
}
