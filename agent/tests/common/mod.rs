//! A network namespace per test for the rule syncs against the real iptables and nft (root): the
//! root namespace is never touched.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;

/// Deletes the namespace (and with it every rule in it) however the test ends.
pub struct Netns(String);

impl Netns {
    /// `prefix` tells the tests' namespaces apart; the pid, concurrent test runs.
    pub fn new(prefix: &str) -> Netns {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "this test needs root (network namespaces)"
        );
        let ns = Netns(format!("{prefix}-{}", std::process::id()));
        assert!(Command::new("ip")
            .args(["netns", "add", &ns.0])
            .status()
            .unwrap()
            .success());
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs `f` on a thread that has entered `ns`; children it spawns (nft, iptables) inherit the
/// thread's netns.
pub fn in_netns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{}", ns.0);
    std::thread::spawn(move || {
        let fd = File::open(&path).expect("netns file");
        // SAFETY: setns on a valid namespace fd affects only this thread.
        assert_eq!(
            unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns"
        );
        f()
    })
    .join()
    .expect("netns thread")
}
