//! The test kit every tweed test crate shares, as a dev-dependency only (nothing here is in a
//! release binary):
//!
//! - [`root`]: the one rule for tests that need root: they skip, saying so loudly
//!   (`skip: <test> needs root: <why>`), instead of failing or passing silently;
//! - [`cmd`]: running a program (in a namespace or not) and, when it fails, an error that carries
//!   the whole command line, its exit status and its stderr;
//! - [`netns`]: a named network namespace that is deleted (its processes killed first) on drop,
//!   also when the test panics, and a way to run code on a thread inside one;
//! - [`cni`]: calling a CNI plugin the way a container runtime does, from inside a chosen "host"
//!   namespace;
//! - [`tar`]: archives with hostile names, made by hand;
//! - [`unique`] names and [`wait_for`] polling.
//!
//! Nothing here touches the root namespace: commands run in namespaces the tests made.

pub mod cmd;
pub mod cni;
pub mod netns;
pub mod root;
pub mod sabotage;
pub mod tar;

pub use cmd::{in_ns, ip, ip_in, ok_in, probe_in, run, try_in_ns, try_run, CmdError};
pub use netns::NetnsGuard;
pub use root::is_root;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A short name unique to this test process and call, `<prefix><pid>x<n>`: tests of one run and
/// concurrent runs never share a namespace, cgroup or lab name.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// `tag` followed by this process's id (mod 100000): short names (a lab's is at most 12
/// characters) that concurrent runs of a suite never share. Tags tell one process's tests apart.
pub fn per_process(tag: &str) -> String {
    format!("{tag}{}", std::process::id() % 100_000)
}

/// Polls `f` every `every` until it holds; panics naming `what` after `timeout`.
pub fn wait_for_every(timeout: Duration, every: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(every);
    }
}

/// [`wait_for_every`] at 100 ms.
pub fn wait_for(timeout: Duration, what: &str, f: impl FnMut() -> bool) {
    wait_for_every(timeout, Duration::from_millis(100), what, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ_within_a_process() {
        let (a, b) = (unique("t"), unique("t"));
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("t{}x", std::process::id() % 100_000)));
    }

    #[test]
    fn wait_for_returns_once_true_and_names_what_timed_out() {
        let mut n = 0;
        wait_for_every(
            Duration::from_secs(5),
            Duration::ZERO,
            "three polls",
            || {
                n += 1;
                n == 3
            },
        );
        assert_eq!(n, 3);
        let err = std::panic::catch_unwind(|| {
            wait_for_every(Duration::ZERO, Duration::ZERO, "never", || false)
        })
        .unwrap_err();
        let msg = err.downcast_ref::<String>().unwrap();
        assert!(msg.contains("waiting for never"), "{msg}");
    }
}
