//! Process plumbing over libc: pipes, fork and namespace clone, pidfds, waiting, fd hygiene.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Makes a raw call until a signal does not interrupt it (EINTR): its non-negative result, or
/// the error. Allocates nothing, so forked children may use it.
pub fn retry<T: PartialOrd + Default>(mut call: impl FnMut() -> T) -> io::Result<T> {
    loop {
        let r = call();
        if r >= T::default() {
            return Ok(r);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A close-on-exec pipe: (read, write).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

pub enum Fork {
    Child,
    Parent(i32),
}

/// fork(2).
///
/// # Safety
///
/// The child is a copy of the caller's memory with only the calling thread in it. A lock that
/// another thread held at the time of the call (the allocator's, stdio's, the environment's)
/// stays locked in the child forever, so the caller must either
/// - be single-threaded at the call (every thread it started has been joined), or
/// - make the child do only async-signal-safe work (raw syscalls, no allocation, no locks)
///   until it execs or exits.
///
/// The child must leave through `execve` or [`exit_now`] (e.g. by running in [`child`]), never
/// by returning into the caller's code: that would run the parent's destructors and flush its
/// buffers a second time.
pub unsafe fn fork() -> io::Result<Fork> {
    // SAFETY: the caller upholds the contract above; fork itself takes no pointers.
    match cvt(unsafe { libc::fork() })? {
        0 => Ok(Fork::Child),
        pid => Ok(Fork::Parent(pid)),
    }
}

/// clone(2) with namespace flags and fork semantics (no new stack: the child continues on a
/// copy of this one).
///
/// # Safety
///
/// The contract of [`fork`]: a single-threaded caller or a child that does only
/// async-signal-safe work, and a child that leaves only through `execve` or [`exit_now`].
/// `flags` must not contain `CLONE_VM`, `CLONE_SETTLS` or any flag that needs the pointer
/// arguments, which are null.
pub unsafe fn clone_ns(flags: libc::c_int) -> io::Result<Fork> {
    // SAFETY: without CLONE_VM and with a null stack the raw clone behaves like fork, whose
    // contract the caller upholds.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
            0 as libc::c_ulong,
        )
    };
    match r {
        r if r < 0 => Err(io::Error::last_os_error()),
        0 => Ok(Fork::Child),
        pid => Ok(Fork::Parent(pid as i32)),
    }
}

pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd owned by us.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

pub fn pidfd_send_signal(pidfd: &OwnedFd, sig: i32) -> io::Result<()> {
    // SAFETY: plain syscall on our fd.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Waits until `fd` is readable (a pidfd: the process exited); false on timeout.
pub fn wait_readable(fd: RawFd, timeout: Option<Duration>) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    // SAFETY: one valid pollfd.
    retry(|| unsafe { libc::poll(&mut p, 1, ms) }).map(|r| r > 0)
}

/// How a process ended, shell-style.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub code: i32,
    pub signal: Option<i32>,
}

pub fn decode_status(status: libc::c_int) -> Exit {
    if libc::WIFSIGNALED(status) {
        let s = libc::WTERMSIG(status);
        Exit {
            code: 128 + s,
            signal: Some(s),
        }
    } else {
        Exit {
            code: libc::WEXITSTATUS(status),
            signal: None,
        }
    }
}

/// Supervisors this process forked and has not reaped yet, as pidfds. A supervisor is a
/// direct child of `tweedctl` (one fork, no middle process that exits at once to orphan it),
/// so the process that started it must reap it or it lingers as a zombie while that process
/// lives. `tweedctl` itself exits soon after; a long-lived caller of the library reaps at
/// its next [`reap_exited_children`] (every start and every wait).
static UNREAPED: std::sync::Mutex<Vec<OwnedFd>> = std::sync::Mutex::new(Vec::new());

/// Records a child just forked so that [`reap_exited_children`] reaps it once it has exited.
/// The pidfd is opened while the child is still unreaped, so its pid cannot have been reused:
/// the descriptor names exactly that child, and reaping through it can never take another
/// child of the caller (a pid-based `waitpid` could, had the pid been recycled).
pub fn reap_later(pid: i32) -> io::Result<()> {
    let fd = pidfd_open(pid)?;
    UNREAPED.lock().unwrap_or_else(|e| e.into_inner()).push(fd);
    Ok(())
}

/// Reaps, without blocking, every child recorded by [`reap_later`] that has exited; returns
/// how many are still running.
pub fn reap_exited_children() -> usize {
    let mut list = UNREAPED.lock().unwrap_or_else(|e| e.into_inner());
    list.retain(|fd| {
        // SAFETY: zeroed siginfo is a valid out buffer for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own pidfd with a valid out pointer.
        let r = retry(|| unsafe {
            libc::waitid(
                libc::P_PIDFD,
                fd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        });
        // SAFETY: si_pid is valid to read after waitid (0 when nothing was reaped).
        let reaped = r.is_ok() && unsafe { info.si_pid() } != 0;
        // ECHILD: no longer ours to wait for (reaped elsewhere): forget it too.
        !reaped && r.is_ok()
    });
    list.len()
}

/// Blocking waitpid for a child.
pub fn waitpid(pid: i32) -> io::Result<Exit> {
    let mut status = 0;
    // SAFETY: plain waitpid with a valid out pointer.
    retry(|| unsafe { libc::waitpid(pid, &mut status, 0) })?;
    Ok(decode_status(status))
}

pub fn write_all(fd: RawFd, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        // SAFETY: pointer/len describe `data`.
        let n =
            retry(|| unsafe { libc::write(fd, data.as_ptr() as *const libc::c_void, data.len()) })?;
        data = &data[n as usize..];
    }
    Ok(())
}

/// Reads until EOF.
pub fn read_to_end(fd: RawFd) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: pointer/len describe `buf`.
        let n =
            retry(|| unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) })?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n as usize]);
    }
}

pub fn dup2(from: RawFd, to: RawFd) -> io::Result<()> {
    // SAFETY: plain dup2.
    cvt(unsafe { libc::dup2(from, to) }).map(drop)
}

/// Closes every fd >= 3 except `keep`.
pub fn close_fds_except(keep: &[RawFd]) {
    // close_range over the gaps between the kept fds: a few syscalls, no allocation and no
    // /proc walk. It runs twice on every start (supervisor, init).
    let mut kept: [RawFd; 16] = [0; 16];
    let n = keep.iter().filter(|&&k| k > 2).count();
    if n <= kept.len() {
        for (slot, &k) in kept.iter_mut().zip(keep.iter().filter(|&&k| k > 2)) {
            *slot = k;
        }
        let kept = &mut kept[..n];
        kept.sort_unstable();
        let mut from: RawFd = 3;
        let mut ok = true;
        for &k in kept.iter() {
            if k > from {
                ok &= close_range(from, k - 1);
            }
            from = from.max(k + 1);
        }
        if ok && close_range(from, RawFd::MAX) {
            return;
        }
    }
    // Kernels before 5.9, or more fds to keep than fit: walk /proc/self/fd.
    let fds: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
        Ok(d) => d
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => (3..1024).collect(),
    };
    for fd in fds {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: closing fds we do not use; the read_dir fd is already closed.
            unsafe {
                libc::close(fd);
            }
        }
    }
}

/// close_range(first, last, 0); false if the kernel has none.
fn close_range(first: RawFd, last: RawFd) -> bool {
    // SAFETY: plain syscall closing our own fds in the range.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            last as libc::c_uint,
            0 as libc::c_uint,
        )
    };
    r == 0
}

/// Marks every fd from `first` up close-on-exec (`close_range(CLOSE_RANGE_CLOEXEC)`, falling
/// back to walking /proc/self/fd on kernels before 5.11).
pub fn cloexec_from(first: RawFd) {
    // SAFETY: plain syscall; it only sets flags on our own fds.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r == 0 {
        return;
    }
    let fds: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
        Ok(d) => d
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => (first..1024).collect(),
    };
    for fd in fds.into_iter().filter(|fd| *fd >= first) {
        // SAFETY: setting FD_CLOEXEC on an fd number; a closed one fails harmlessly.
        unsafe {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
}

/// Opens /dev/null for reading and writing.
pub fn dev_null() -> io::Result<OwnedFd> {
    let p = CString::new("/dev/null").expect("no NUL");
    // SAFETY: valid C string.
    let fd = cvt(unsafe { libc::open(p.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })?;
    // SAFETY: new fd owned by us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Default dispositions for every signal and an empty mask (Rust ignores SIGPIPE; children
/// must not inherit that).
pub fn reset_signals() {
    // SAFETY: plain signal-mask and disposition syscalls.
    unsafe {
        for s in 1..32 {
            if s != libc::SIGKILL && s != libc::SIGSTOP {
                libc::signal(s, libc::SIG_DFL);
            }
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// Kills this process when its parent thread dies.
pub fn set_pdeathsig(sig: i32) -> io::Result<()> {
    // SAFETY: plain prctl.
    cvt(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) }).map(drop)
}

/// Leaves the process immediately, without running destructors or atexit handlers (for forked
/// children, which must not unwind into the parent's code).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns.
    unsafe { libc::_exit(code) }
}

/// Runs `f` in a forked child context: a panic becomes exit code 125 instead of unwinding.
pub fn child<F: FnOnce() -> i32>(f: F) -> ! {
    let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(125);
    exit_now(code)
}

pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: plain kill.
    cvt(unsafe { libc::kill(pid, sig) }).map(drop)
}

pub fn signal_number(name: &str) -> Option<i32> {
    let n = name.trim().to_ascii_uppercase();
    let n = n.strip_prefix("SIG").unwrap_or(&n);
    if let Ok(v) = n.parse::<i32>() {
        return (1..65).contains(&v).then_some(v);
    }
    Some(match n {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "STOP" => libc::SIGSTOP,
        "CONT" => libc::SIGCONT,
        "WINCH" => libc::SIGWINCH,
        _ => return None,
    })
}

/// With `TWEED_TIMING` set, prints `label` and the monotonic clock (µs) to stderr: a cheap
/// phase tracer for the start path (the supervisor's stderr is its shim.log).
pub fn mark(label: &str) {
    if std::env::var_os("TWEED_TIMING").is_some() {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime fills a valid timespec.
        unsafe {
            libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
        }
        eprintln!(
            "timing {} {} {label}",
            ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000,
            std::process::id()
        );
    }
}

/// A user namespace with `m`'s maps, as an fd: a child is cloned into a new user namespace,
/// we (its parent, root in ours) write its `uid_map` and `gid_map`, keep a handle on the
/// namespace and let the child go. The init uses the fd for idmapped layers and joins it last.
///
/// The caller must be single-threaded (see [`fork`]).
pub fn userns_fd(m: &crate::userns::Mapping) -> io::Result<OwnedFd> {
    let (hold_r, hold_w) = pipe()?;
    // SAFETY: the caller is single-threaded; the child only reads a pipe and exits.
    match unsafe { clone_ns(libc::CLONE_NEWUSER) }? {
        Fork::Child => child(|| {
            drop(hold_w);
            // Blocks until the parent closes its end: EOF or error, either way we are done.
            let _ = read_to_end(hold_r.as_raw_fd());
            0
        }),
        Fork::Parent(pid) => {
            drop(hold_r);
            let r = (|| {
                let dir = std::path::PathBuf::from(format!("/proc/{pid}"));
                // One write each: the kernel takes a map only whole and only once.
                std::fs::write(dir.join("uid_map"), m.uid_map())
                    .map_err(|e| io::Error::new(e.kind(), format!("writing uid_map: {e}")))?;
                std::fs::write(dir.join("gid_map"), m.gid_map())
                    .map_err(|e| io::Error::new(e.kind(), format!("writing gid_map: {e}")))?;
                let f = std::fs::File::open(dir.join("ns/user"))?;
                Ok(OwnedFd::from(f))
            })();
            drop(hold_w);
            waitpid(pid)?;
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zombie_of(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
    }

    fn listed(fd_of: i32) -> bool {
        UNREAPED
            .lock()
            .unwrap()
            .iter()
            .any(|fd| fd.as_raw_fd() == fd_of)
    }

    #[test]
    fn recorded_children_are_reaped_once_exited_and_others_are_never_taken() {
        // A child that exits at once (only _exit after the fork: safe in a threaded harness).
        // SAFETY: the child makes one async-signal-safe call.
        let pid = match unsafe { fork() }.unwrap() {
            Fork::Child => exit_now(0),
            Fork::Parent(pid) => pid,
        };
        // A second child, not recorded: reaping must never take it.
        // SAFETY: as above.
        let other = match unsafe { fork() }.unwrap() {
            Fork::Child => exit_now(3),
            Fork::Parent(pid) => pid,
        };
        reap_later(pid).unwrap();
        let fd = UNREAPED.lock().unwrap().last().unwrap().as_raw_fd();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !zombie_of(other) || listed(fd) {
            reap_exited_children();
            assert!(
                std::time::Instant::now() < deadline,
                "child {pid} not reaped"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // Reaped: the pid is gone (or a stranger's now), and it left the list.
        assert!(!zombie_of(pid));
        // The unrecorded child is still a zombie, for its owner to reap.
        assert!(zombie_of(other));
        assert_eq!(waitpid(other).unwrap().code, 3);
        // A process that is not our child (pid 1) is dropped from the list, never waited on.
        reap_later(1).unwrap();
        let fd1 = UNREAPED.lock().unwrap().last().unwrap().as_raw_fd();
        reap_exited_children();
        assert!(!listed(fd1));
    }

    fn open_fds() -> Vec<RawFd> {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    }

    #[test]
    fn close_fds_except_keeps_exactly_the_listed_fds() {
        // In a forked child (closing fds in the test process would break the harness); the
        // child reports through its exit code.
        let (r, w) = pipe().unwrap();
        let (a, b) = pipe().unwrap();
        // Above every kept fd: the last range must close these too.
        let (x, y) = pipe().unwrap();
        let keep = [w.as_raw_fd(), b.as_raw_fd(), 1, 2];
        // What must stay: stdio as it is open here (the harness may run without stdin), and
        // the two kept pipe ends; r and a and whatever else the harness holds must go.
        let mut want: Vec<RawFd> = open_fds()
            .into_iter()
            .filter(|&fd| fd <= 2 || fd == w.as_raw_fd() || fd == b.as_raw_fd())
            .collect();
        want.sort_unstable();
        assert!(want.contains(&w.as_raw_fd()) && want.contains(&b.as_raw_fd()));
        // SAFETY: the child only makes raw syscalls until it leaves (read_dir of /proc/self/fd
        // allocates, which is why the check runs after the close, in the single-threaded
        // child, and reports only through the exit code).
        match unsafe { fork() }.unwrap() {
            Fork::Child => {
                close_fds_except(&keep);
                // fcntl, not /proc/self/fd: a listing would show its own directory fd.
                // SAFETY: F_GETFD on any number only reads the fd's flags.
                let open: Vec<RawFd> = (0..4096)
                    .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0)
                    .collect();
                exit_now(if open == want { 0 } else { 1 })
            }
            Fork::Parent(pid) => {
                drop((w, b));
                assert_eq!(waitpid(pid).unwrap().code, 0, "fds left open or closed");
                drop((r, a, x, y));
            }
        }
    }

    #[test]
    fn signals_by_name() {
        assert_eq!(signal_number("KILL"), Some(9));
        assert_eq!(signal_number("sigterm"), Some(15));
        assert_eq!(signal_number("15"), Some(15));
        assert_eq!(signal_number("NOPE"), None);
        assert_eq!(signal_number("0"), None);
    }

    #[test]
    fn status_decoding() {
        assert_eq!(
            decode_status(3 << 8),
            Exit {
                code: 3,
                signal: None
            }
        );
        assert_eq!(
            decode_status(9),
            Exit {
                code: 137,
                signal: Some(9)
            }
        );
    }
}
