//! `tweedctl exec`: a new process in a running container. It joins the init's cgroups and all
//! its namespaces (ipc, uts, net, cgroup, pid, mount), gets the same CPU set, capabilities and
//! no_new_privs, and optionally a pseudo-terminal allocated inside the container's devpts.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use crate::init::{self, InitError};
use crate::process::{self, Fork};
use crate::state::ContainerConfig;
use crate::syscall::{LinuxSyscall, Syscall};

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("opening namespace {path}: {source}")]
    OpenNs { path: PathBuf, source: io::Error },
    #[error("opening the container's root {path}: {source}")]
    OpenRoot { path: PathBuf, source: io::Error },
    #[error("starting the exec process: {0}")]
    Fork(io::Error),
    #[error("terminal: {0}")]
    Tty(io::Error),
}

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    /// Extra `K=V` on top of the container's environment.
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub tty: bool,
    pub interactive: bool,
}

/// Namespaces joined, in order (mount last: afterwards /proc is the container's).
pub const NAMESPACES: &[(&str, libc::c_int)] = &[
    ("ipc", libc::CLONE_NEWIPC),
    ("uts", libc::CLONE_NEWUTS),
    ("net", libc::CLONE_NEWNET),
    ("cgroup", libc::CLONE_NEWCGROUP),
    ("pid", libc::CLONE_NEWPID),
    ("mnt", libc::CLONE_NEWNS),
];

/// Merges extra `K=V` pairs into an environment (later wins).
pub fn merge_env(base: &[String], extra: &[String]) -> Vec<String> {
    let mut out: Vec<String> = base.to_vec();
    for e in extra {
        let key = e.split('=').next().unwrap_or(e);
        out.retain(|x| x.split('=').next() != Some(key));
        out.push(e.clone());
    }
    out
}

struct RawTerm {
    saved: Option<libc::termios>,
}

impl RawTerm {
    fn enter() -> RawTerm {
        // SAFETY: termios calls on fd 0 with valid structs.
        unsafe {
            if libc::isatty(0) == 0 {
                return RawTerm { saved: None };
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return RawTerm { saved: None };
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(0, libc::TCSANOW, &t);
            RawTerm { saved: Some(saved) }
        }
    }
}

impl Drop for RawTerm {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            // SAFETY: restoring the saved termios of fd 0.
            unsafe {
                libc::tcsetattr(0, libc::TCSANOW, t);
            }
        }
    }
}

/// Runs `spec` in the container whose init is `init_pid`; returns the exit code.
pub fn exec(
    cfg: &ContainerConfig,
    init_pid: i32,
    spec: &ExecSpec,
    seccomp: Option<&crate::seccomp::Programs>,
) -> Result<i32, ExecError> {
    // Non-dumpable until the command's execve: a process of the container cannot open
    // /proc/PID/exe of this tweedctl (the CVE-2019-5736 class) nor ptrace it while it is
    // inside the container's namespaces. Forks inherit it; execve resets it.
    // SAFETY: plain prctl on ourselves.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    let mut nsfds: Vec<(File, libc::c_int)> = Vec::new();
    for (name, flag) in NAMESPACES {
        let path = PathBuf::from(format!("/proc/{init_pid}/ns/{name}"));
        let f = File::open(&path).map_err(|source| ExecError::OpenNs { path, source })?;
        nsfds.push((f, *flag));
    }
    // Joining a mount namespace puts us at the namespace's root, which is the container's
    // root only when the container was pivoted onto it. A tweedctl started inside a chroot
    // leaves the container's root below that (the host's real root): enter the init's root
    // itself, as it is seen from here.
    let root = {
        use std::os::unix::fs::OpenOptionsExt;
        let path = PathBuf::from(format!("/proc/{init_pid}/root"));
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(&path)
            .map_err(|source| ExecError::OpenRoot { path, source })?
    };
    // With --userns the command joins the container's user namespace last, as the init did:
    // without it, it would be host root inside the container.
    let userns = match cfg.userns {
        Some(_) => {
            let path = PathBuf::from(format!("/proc/{init_pid}/ns/user"));
            Some(File::open(&path).map_err(|source| ExecError::OpenNs { path, source })?)
        }
        None => None,
    };
    let _raw = if spec.tty {
        Some(RawTerm::enter())
    } else {
        None
    };
    // SAFETY: `tweedctl exec` is single-threaded, and the child leaves through `process::child`.
    match unsafe { process::fork() }.map_err(ExecError::Fork)? {
        Fork::Child => process::child(|| {
            let ns = (root.as_raw_fd(), userns.as_ref().map(|f| f.as_raw_fd()));
            joiner(cfg, &nsfds, ns, spec, seccomp)
        }),
        Fork::Parent(pid) => {
            drop((nsfds, root, userns));
            let e = process::waitpid(pid).map_err(ExecError::Fork)?;
            Ok(e.code)
        }
    }
}

/// The first child: joins cgroups and namespaces, forks the command (which is then inside the
/// container's pid namespace), relays the terminal, and exits with the command's code.
fn joiner(
    cfg: &ContainerConfig,
    nsfds: &[(File, libc::c_int)],
    (root, userns): (RawFd, Option<RawFd>),
    spec: &ExecSpec,
    seccomp: Option<&crate::seccomp::Programs>,
) -> i32 {
    let sys = LinuxSyscall;
    // Single-threaded: moving ourselves through `tasks` avoids the global migration lock.
    if let Err(e) = crate::cgroup::SelfJoin::open(&cfg.cgroup).and_then(|mut j| j.join()) {
        eprintln!("tweedctl exec: joining the container's cgroups: {e}");
        return 126;
    }
    // The mount namespace is joined by the command only: this process stays where the cgroup
    // files are, to answer sysinfo.
    let (mnt, others) = nsfds.split_last().expect("namespaces listed");
    for (f, flag) in others {
        if let Err(e) = sys.setns(f.as_raw_fd(), *flag) {
            eprintln!("tweedctl exec: joining namespace {flag:#x}: {e}");
            return 126;
        }
    }
    let (rep_r, rep_w, ack_r, ack_w) = match (process::pipe(), process::pipe()) {
        (Ok((a, b)), Ok((c, d))) => (a, b, c, d),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("tweedctl exec: {e}");
            return 126;
        }
    };
    // SAFETY: this forked child has a single thread; the command leaves through
    // `process::child`.
    let pid = match unsafe { process::fork() } {
        Ok(Fork::Child) => process::child(|| {
            command(
                cfg,
                spec,
                seccomp,
                (mnt.0.as_raw_fd(), root, userns),
                (rep_w.as_raw_fd(), ack_r.as_raw_fd()),
            )
        }),
        Ok(Fork::Parent(pid)) => pid,
        Err(e) => {
            eprintln!("tweedctl exec: {e}");
            return 126;
        }
    };
    drop((rep_w, ack_r));
    let pidfd = match process::pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("tweedctl exec: {e}");
            return 126;
        }
    };
    // The command's sysinfo calls are answered from here (a joiner of a pid namespace cannot
    // start threads, so one poll loop serves the listener, the terminal and the exit).
    let mut fds = init::read_child_report(rep_r.as_raw_fd(), pidfd.as_raw_fd(), ack_w.as_raw_fd())
        .unwrap_or_default();
    drop(ack_w);
    let mut take = |tag: u8| {
        fds.iter()
            .position(|(t, _)| *t == tag)
            .map(|i| fds.remove(i).1)
    };
    let listener = take(init::TAG_LISTENER);
    let master = take(init::TAG_PTY);
    serve(cfg, pidfd.as_raw_fd(), listener, master, spec.interactive);
    process::waitpid(pid).map(|e| e.code).unwrap_or(126)
}

/// Until the command exits: answers sysinfo notifications, relays the terminal.
fn serve(
    cfg: &ContainerConfig,
    pidfd: RawFd,
    mut listener: Option<OwnedFd>,
    master: Option<OwnedFd>,
    interactive: bool,
) {
    use crate::cgroup::CgroupManager;
    let cg = crate::cgroup::Cgroup::from_record(&cfg.cgroup);
    let limit = cfg.limits.memory.unwrap_or(u64::MAX);
    let view = || (cg.stats().unwrap_or_default(), limit);
    let mut master = master;
    let mut stdin_open = interactive && master.is_some();
    let mut exited = false;
    let mut buf = [0u8; 8192];
    loop {
        let mut fds = Vec::new();
        let mut push = |fd: RawFd| {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
        };
        if !exited {
            push(pidfd);
        }
        if let Some(l) = &listener {
            push(l.as_raw_fd());
        }
        if let Some(m) = &master {
            push(m.as_raw_fd());
        }
        if stdin_open {
            push(0);
        }
        if fds.is_empty() || (exited && master.is_none()) {
            return;
        }
        let timeout = if exited { 100 } else { -1 };
        // SAFETY: valid pollfd array.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if n == 0 {
            return; // exited and the terminal went quiet
        }
        for p in fds {
            if p.revents == 0 {
                continue;
            }
            if p.fd == pidfd {
                exited = true;
            } else if listener.as_ref().is_some_and(|l| l.as_raw_fd() == p.fd) {
                let more = p.revents & libc::POLLIN != 0
                    && matches!(
                        crate::sysinfo::serve_one(listener.as_ref().expect("checked"), &view),
                        Ok(true)
                    );
                if !more {
                    listener = None;
                }
            } else if master.as_ref().is_some_and(|m| m.as_raw_fd() == p.fd) {
                // SAFETY: reading into our buffer.
                let r =
                    unsafe { libc::read(p.fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
                if r <= 0 {
                    master = None; // EIO: the slave side is closed
                    stdin_open = false;
                } else {
                    let _ = process::write_all(1, &buf[..r as usize]);
                }
            } else if p.fd == 0 {
                // SAFETY: reading into our buffer.
                let r = unsafe { libc::read(0, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
                if let Some(m) = &master {
                    if r <= 0 {
                        stdin_open = false;
                        // End of input: send EOF (^D) to the terminal.
                        let _ = process::write_all(m.as_raw_fd(), &[4]);
                    } else {
                        let _ = process::write_all(m.as_raw_fd(), &buf[..r as usize]);
                    }
                }
            }
        }
    }
}

/// Makes the directory `root` (an fd opened on `/proc/<init>/root`) this process's root.
fn enter_root(root: RawFd) -> io::Result<()> {
    let dot = std::ffi::CString::new(".").expect("no NUL");
    // SAFETY: fchdir on an fd we hold; chroot with a valid C string.
    unsafe {
        if libc::fchdir(root) != 0 || libc::chroot(dot.as_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn open_pty() -> io::Result<(OwnedFd, PathBuf)> {
    let p = std::ffi::CString::new("/dev/ptmx").expect("no NUL");
    // SAFETY: opening the container's ptmx; ioctls with valid out pointers.
    unsafe {
        let fd = libc::open(p.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let master = OwnedFd::from_raw_fd(fd);
        let mut unlock: libc::c_int = 0;
        if libc::ioctl(fd, libc::TIOCSPTLCK, &mut unlock) < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut n: libc::c_uint = 0;
        if libc::ioctl(fd, libc::TIOCGPTN, &mut n) < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut ws: libc::winsize = std::mem::zeroed();
        if libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) == 0 {
            libc::ioctl(fd, libc::TIOCSWINSZ, &ws);
        }
        Ok((master, PathBuf::from(format!("/dev/pts/{n}"))))
    }
}

/// The second child, inside the container's pid namespace: becomes the command.
fn command(
    cfg: &ContainerConfig,
    spec: &ExecSpec,
    seccomp: Option<&crate::seccomp::Programs>,
    (mnt, root, userns): (RawFd, RawFd, Option<RawFd>),
    (report, ack): (RawFd, RawFd),
) -> i32 {
    let sys = LinuxSyscall;
    if let Err(e) = sys.setns(mnt, libc::CLONE_NEWNS) {
        eprintln!("tweedctl exec: joining the mount namespace: {e}");
        return 126;
    }
    if let Err(e) = enter_root(root) {
        eprintln!("tweedctl exec: entering the container's root: {e}");
        return 126;
    }
    let slave = if spec.tty {
        let r = open_pty().and_then(|(master, path)| {
            init::hand_off_fd(init::TAG_PTY, master.as_raw_fd(), report, ack)
                .map_err(|e| io::Error::other(e.to_string()))?;
            std::mem::forget(master); // closed by hand_off_fd
            Ok(path)
        });
        match r {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("tweedctl exec: {}", ExecError::Tty(e));
                return 126;
            }
        }
    } else {
        None
    };
    if let Some(path) = slave {
        // SAFETY: new session, open the pty slave as controlling terminal, wire stdio to it.
        unsafe {
            libc::setsid();
            let p = std::ffi::CString::new(path.to_string_lossy().as_bytes()).unwrap_or_default();
            let fd = libc::open(p.as_ptr(), libc::O_RDWR);
            if fd < 0 {
                eprintln!(
                    "tweedctl exec: opening {}: {}",
                    path.display(),
                    io::Error::last_os_error()
                );
                return 126;
            }
            libc::ioctl(fd, libc::TIOCSCTTY, 0);
            for t in 0..3 {
                libc::dup2(fd, t);
            }
            if fd > 2 {
                libc::close(fd);
            }
        }
    } else if !spec.interactive {
        if let Ok(null) = process::dev_null() {
            let _ = process::dup2(null.as_raw_fd(), 0);
        }
    }
    let cwd = spec.workdir.clone().unwrap_or_else(|| cfg.cwd.clone());
    let cwd = if cwd.is_empty() { "/".to_string() } else { cwd };
    let r = (|| -> Result<(), InitError> {
        if let Some(fd) = userns {
            sys.setns(fd, libc::CLONE_NEWUSER)
                .map_err(InitError::Userns)?;
            sys.set_ids(0, 0, &[]).map_err(InitError::Userns)?;
        }
        sys.chdir(std::path::Path::new(&cwd))
            .map_err(|source| InitError::Cwd {
                path: cwd.clone(),
                source,
            })?;
        if !cfg.cpus.is_empty() {
            sys.set_affinity(&cfg.cpus)
                .map_err(|source| InitError::Affinity {
                    cpus: cfg.cpus.clone(),
                    source,
                })?;
        }
        let ids = init::resolve_user(spec.user.as_deref().unwrap_or(&cfg.user))?;
        let listener = init::drop_privileges(
            &sys,
            &cfg.caps,
            ids,
            cfg.security.no_new_privs,
            seccomp,
            cfg.limits.memory.is_some(),
        )?;
        if let Some(l) = listener {
            init::hand_off_listener(l, report, ack)?;
        }
        Ok(())
    })();
    let e = match r {
        Ok(()) => init::exec(&spec.argv, &merge_env(&cfg.env, &spec.env)),
        Err(e) => e,
    };
    eprintln!("tweedctl exec: {e}");
    if matches!(e, InitError::NotFound { .. }) {
        127
    } else {
        126
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_merge_overrides_by_key() {
        let base = vec!["PATH=/bin".to_string(), "A=1".to_string()];
        assert_eq!(
            merge_env(&base, &["A=2".into(), "B=3".into()]),
            vec!["PATH=/bin", "A=2", "B=3"]
        );
    }

    #[test]
    fn mount_namespace_is_joined_last() {
        assert_eq!(NAMESPACES.last().unwrap().0, "mnt");
        assert_eq!(NAMESPACES.len(), 6);
    }
}
