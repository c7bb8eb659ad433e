//! Holding a real plugin process at a chosen moment, from outside it: the test traces the
//! plugin with ptrace (as strace does) and keeps it, or a child it forks, stopped at a syscall,
//! at its start or at its exit. The plugin has no test hooks: what is held is the binary that
//! ships.
//!
//! A tracee is tied to the thread that attached it, so a [`Traced`] stays on the test's
//! thread. Only the plugin's main thread and its forked children are traced (the threads it
//! starts are not), and every tracee is waited for by pid, never with `waitpid(-1)`, so other
//! tests' children in the same process are left alone. The tracees die with the tracer
//! (`PTRACE_O_EXITKILL`) and on drop.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tweed_testkit::cni::{self, Call, PluginRun};
use tweed_testkit::NetnsGuard;

/// What the tracer does with the children the plugin forks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Children {
    /// They run freely.
    Run,
    /// They stay stopped before their first instruction after `fork`.
    HoldAtStart,
    /// They run until they call `_exit`, and stay stopped there: alive, descriptors still open.
    HoldAtExit,
}

/// A stop of the plugin, as [`Traced::run_until`] shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Entering syscall `nr` (only when syscalls are traced).
    Syscall(i64),
    /// It forked this child.
    Forked(i32),
    /// It is calling `_exit`.
    Exiting,
    /// It has ended and been reaped: the raw wait status.
    Gone(i32),
    /// Anything else: an attach stop, a signal (passed on when resumed).
    Other(i32),
}

struct Tracee {
    /// Syscall stops wanted (the plugin only).
    syscalls: bool,
    /// Held, not to be resumed until the test says so.
    held: bool,
}

pub struct Traced {
    pub pid: i32,
    children: Children,
    tracees: BTreeMap<i32, Tracee>,
    forks: Vec<i32>,
    status: Option<i32>,
    output: mpsc::Receiver<(bool, Vec<u8>)>,
    start: Instant,
}

const SYSCALL_STOP: i32 = libc::SIGTRAP | 0x80;
const EVENT_STOP: i32 = 128;

/// `struct ptrace_syscall_info` up to the entry's number.
#[repr(C)]
#[derive(Default)]
struct SyscallInfo {
    op: u8,
    pad: [u8; 3],
    arch: u32,
    instruction_pointer: u64,
    stack_pointer: u64,
    nr: u64,
    args: [u64; 6],
}

fn check(r: libc::c_long, what: &str) {
    assert!(r >= 0, "ptrace {what}: {}", io::Error::last_os_error());
}

impl Traced {
    /// Starts `plugin` inside `host` as [`cni::spawn`] does, traced from before it reads
    /// `stdin`. With `syscalls`, [`Traced::run_until`] sees every syscall the plugin's main
    /// thread enters.
    pub fn spawn(
        host: &NetnsGuard,
        plugin: &Path,
        call: &Call<'_>,
        stdin: &[u8],
        syscalls: bool,
        children: Children,
    ) -> Traced {
        let mut child = cni::command(host, plugin, call)
            .spawn()
            .expect("spawning the plugin");
        let pid = child.id() as i32;
        let opts = libc::PTRACE_O_TRACESYSGOOD
            | libc::PTRACE_O_TRACEFORK
            | libc::PTRACE_O_TRACEVFORK
            | libc::PTRACE_O_TRACEEXIT
            | libc::PTRACE_O_EXITKILL;
        // SAFETY: ptrace on our own child; no memory is passed.
        check(
            unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0, opts as libc::c_long) },
            "seize",
        );
        // Stopped once, so that the first resume can ask for syscall stops.
        // SAFETY: as above.
        check(
            unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, pid, 0, 0) },
            "interrupt",
        );
        let (tx, rx) = mpsc::channel();
        read_to_end(child.stdout.take().expect("piped"), true, tx.clone());
        read_to_end(child.stderr.take().expect("piped"), false, tx);
        let mut input = child.stdin.take().expect("piped");
        input.write_all(stdin).expect("writing the plugin's stdin");
        drop(input);
        // The std handle is never waited on: this tracer reaps the plugin.
        drop(child);
        Traced {
            pid,
            children,
            tracees: [(
                pid,
                Tracee {
                    syscalls,
                    held: false,
                },
            )]
            .into(),
            forks: Vec::new(),
            status: None,
            output: rx,
            start: Instant::now(),
        }
    }

    /// Lets the plugin go on from `at`, the stop [`Traced::run_until`] left it in, after the
    /// test acted there (e.g. killed the child it just forked).
    pub fn go_on(&mut self, at: Stop) {
        self.resume(self.pid, at);
    }

    /// The children the plugin forked so far.
    pub fn forks(&self) -> &[i32] {
        &self.forks
    }

    /// Children held now (see [`Children`]).
    pub fn held(&self) -> Vec<i32> {
        self.tracees
            .iter()
            .filter(|(_, t)| t.held)
            .map(|(p, _)| *p)
            .collect()
    }

    /// Runs everything traced until the plugin stops somewhere `here` accepts, and leaves it
    /// stopped there; children are handled as [`Children`] says meanwhile. Panics after
    /// `timeout`.
    pub fn run_until(&mut self, mut here: impl FnMut(Stop) -> bool, timeout: Duration) -> Stop {
        let deadline = Instant::now() + timeout;
        loop {
            let (pid, status) = self.wait_any(deadline);
            let stop = self.classify(pid, status);
            if pid == self.pid {
                if here(stop) {
                    return stop;
                }
                if !matches!(stop, Stop::Gone(_)) {
                    self.resume(pid, stop);
                }
                continue;
            }
            self.child_stopped(pid, stop);
        }
    }

    fn child_stopped(&mut self, pid: i32, stop: Stop) {
        match stop {
            Stop::Gone(_) => {}
            Stop::Other(EVENT_STOP) if self.children == Children::HoldAtStart => self.hold(pid),
            Stop::Exiting if self.children == Children::HoldAtExit => self.hold(pid),
            _ => self.resume(pid, stop),
        }
    }

    /// Runs until the plugin has exited and each child it forked has ended or is held;
    /// returns how the plugin ended, with its stdout and stderr, which must reach EOF within
    /// `timeout` too (a held child that kept either would show here).
    pub fn wait(&mut self, timeout: Duration) -> PluginRun {
        let deadline = Instant::now() + timeout;
        if self.status.is_none() {
            self.run_until(|s| matches!(s, Stop::Gone(_)), timeout);
        }
        while self.tracees.values().any(|t| !t.held) {
            let (pid, status) = self.wait_any(deadline);
            let stop = self.classify(pid, status);
            self.child_stopped(pid, stop);
        }
        let (mut stdout, mut stderr) = (None, None);
        while stdout.is_none() || stderr.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let (is_out, bytes) = self.output.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "the plugin exited but its stdout or stderr did not reach EOF (held: {:?})",
                    self.held()
                )
            });
            *(if is_out { &mut stdout } else { &mut stderr }) = Some(bytes);
        }
        let status = self.status.expect("reaped");
        PluginRun {
            code: if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                -1
            },
            stdout: String::from_utf8_lossy(&stdout.unwrap()).into_owned(),
            stderr: String::from_utf8_lossy(&stderr.unwrap()).into_owned(),
            elapsed: self.start.elapsed(),
        }
    }

    /// SIGKILLs `pid` (the plugin or a child) and reaps it.
    pub fn kill(&mut self, pid: i32) {
        kill_stopped(pid);
        if let Some(t) = self.tracees.get_mut(&pid) {
            t.held = false;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.tracees.contains_key(&pid) {
            let (p, status) = self.wait_any(deadline);
            let stop = self.classify(p, status);
            // The killed one may still report a stop on its way out: resumed, it dies.
            if !matches!(stop, Stop::Gone(_)) && !self.tracees[&p].held {
                self.resume(p, stop);
            }
        }
    }

    fn hold(&mut self, pid: i32) {
        self.tracees.get_mut(&pid).expect("traced").held = true;
    }

    /// The next status change of any tracee, by pid.
    fn wait_any(&mut self, deadline: Instant) -> (i32, i32) {
        loop {
            for &pid in self.tracees.keys() {
                let mut status = 0;
                // SAFETY: status is a live int; the pid is a tracee of this thread.
                let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) };
                if r == pid {
                    return (pid, status);
                }
                assert!(r == 0, "waitpid {pid}: {}", io::Error::last_os_error());
            }
            assert!(
                Instant::now() < deadline,
                "timed out tracing the plugin (tracees {:?})",
                self.tracees.keys().collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn classify(&mut self, pid: i32, status: i32) -> Stop {
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            self.tracees.remove(&pid);
            if pid == self.pid {
                self.status = Some(status);
            }
            return Stop::Gone(status);
        }
        let sig = libc::WSTOPSIG(status);
        let event = (status >> 16) & 0xff;
        if event == libc::PTRACE_EVENT_FORK || event == libc::PTRACE_EVENT_VFORK {
            let mut child: libc::c_ulong = 0;
            // SAFETY: the tracee is in an event stop; child is a live c_ulong.
            check(
                unsafe { libc::ptrace(libc::PTRACE_GETEVENTMSG, pid, 0, &mut child) },
                "geteventmsg",
            );
            let child = child as i32;
            self.forks.push(child);
            self.tracees.insert(
                child,
                Tracee {
                    syscalls: false,
                    held: false,
                },
            );
            return Stop::Forked(child);
        }
        if event == libc::PTRACE_EVENT_EXIT {
            return Stop::Exiting;
        }
        if event != 0 {
            return Stop::Other(event);
        }
        if sig == SYSCALL_STOP {
            let mut info = SyscallInfo::default();
            // SAFETY: info is a live buffer of the size passed.
            check(
                unsafe {
                    libc::ptrace(
                        libc::PTRACE_GET_SYSCALL_INFO,
                        pid,
                        std::mem::size_of::<SyscallInfo>(),
                        &mut info,
                    )
                },
                "get_syscall_info",
            );
            if info.op == libc::PTRACE_SYSCALL_INFO_ENTRY {
                return Stop::Syscall(info.nr as i64);
            }
            // A syscall's exit: nothing to decide there.
            return Stop::Other(0);
        }
        Stop::Other(sig)
    }

    fn resume(&mut self, pid: i32, stop: Stop) {
        let t = &self.tracees[&pid];
        let req = if t.syscalls {
            libc::PTRACE_SYSCALL
        } else {
            libc::PTRACE_CONT
        };
        // A signal-delivery stop passes its signal on; event and syscall stops pass none.
        let sig = match stop {
            Stop::Other(s) if s > 0 && s < 64 => s,
            _ => 0,
        };
        // SAFETY: a stopped tracee of this thread; no memory is passed.
        check(
            unsafe { libc::ptrace(req, pid, 0, sig as libc::c_long) },
            "resume",
        );
    }
}

/// SIGKILL for a tracee that may be stopped anywhere. One stopped at its exit (the exit
/// stop) is past taking signals, so it is also let go on: it then ends as it was ending.
fn kill_stopped(pid: i32) {
    // SAFETY: kill and ptrace on a tracee of ours, not reaped yet, so the pid is still its.
    // PTRACE_CONT fails harmlessly (ESRCH) when it is not in a stop.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::ptrace(libc::PTRACE_CONT, pid, 0, 0);
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        for &pid in self.tracees.keys() {
            kill_stopped(pid);
        }
        for &pid in self.tracees.keys() {
            // SAFETY: as above; blocks until the killed tracee is gone.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::__WALL) };
        }
    }
}

/// Reads `from` to EOF on a thread, then sends what it read, tagged `is_out` (stdout).
fn read_to_end(
    mut from: impl Read + Send + 'static,
    is_out: bool,
    tx: mpsc::Sender<(bool, Vec<u8>)>,
) {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = from.read_to_end(&mut buf);
        let _ = tx.send((is_out, buf));
    });
}
