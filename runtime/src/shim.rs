//! The per-container supervisor. `tweedctl run` forks it into its own session (so it belongs
//! to no terminal); it clones the container init into the namespaces (the init joins its
//! cgroups itself before it execs), relays its stdout/stderr into the log, keeps the honest
//! `/proc/meminfo` fresh, and records the exit status (and OOM kills) when the init ends.
//! The init dies with its supervisor (`PR_SET_PDEATHSIG`), so a killed supervisor never leaves
//! an unsupervised container behind; `tweedctl ps` reports it as dead.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cgroup::{self, Cgroup, CgroupManager, CgroupRecord};
use crate::init::{self, InitSpec};
use crate::process::{self, Fork};
use crate::state::{self, ExitInfo, ProcInfo};
use crate::syscall::LinuxSyscall;
use crate::{fsutil, logs, procview, timefmt};

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("starting the supervisor: {0}")]
    Spawn(io::Error),
    /// The init's cgroup files could not be opened.
    #[error("{0}")]
    Cgroup(cgroup::CgroupError),
    #[error("cloning the container init: {0}")]
    Clone(io::Error),
    /// EINVAL/ENOSPC from the clone: the kernel has no user namespaces (CONFIG_USER_NS) or
    /// `user.max_user_namespaces` is 0; EPERM writing a map: not root on the host.
    #[error(
        "--userns: making the container's user namespace: {0} (needs CONFIG_USER_NS, \
         user.max_user_namespaces > 0, and tweedctl running as root)"
    )]
    Userns(io::Error),
    #[error("watching the container init: {0}")]
    Watch(io::Error),
    /// The init's own report of why it could not exec.
    #[error("{0}")]
    Init(String),
    /// What the supervisor reported to `tweedctl`.
    #[error("{0}")]
    Start(String),
    /// A record could not be made durable (see [`ShimSpec::sync_meanwhile`]).
    #[error("{path}: making it durable: {source}")]
    Sync { path: PathBuf, source: io::Error },
}

/// What the supervisor needs.
pub struct ShimSpec {
    pub state_dir: PathBuf,
    pub init: InitSpec,
    pub cgroup: CgroupRecord,
    /// The host's /proc/meminfo, when the container has a memory limit (template).
    pub meminfo_template: Option<String>,
    pub memory_limit: Option<u64>,
    /// Run after the exit is recorded (`--rm`).
    pub on_exit: Option<Box<dyn FnOnce()>>,
    /// Files already in place (renamed into their directory) but not yet durable: `spawn`
    /// fsyncs each and its directory while the supervisor starts the container, so the wait
    /// for the disk overlaps the clone and mounts instead of preceding them. `spawn` returns
    /// only once they are durable, and fails (the caller's undo then kills the container)
    /// if they cannot be made so.
    pub sync_meanwhile: Vec<PathBuf>,
}

/// fsync of each file and of its directory (see [`ShimSpec::sync_meanwhile`]).
pub fn sync_durable(files: &[PathBuf]) -> Result<(), ShimError> {
    open_durable(files)?.sync()
}

/// The files of [`ShimSpec::sync_meanwhile`] and their directories, opened before the supervisor
/// starts: a `--rm` container that exits at once has its state directory removed by the
/// supervisor, maybe before the fsyncs run, and an fsync through a descriptor opened earlier
/// still works (there is then nothing left to make durable, and no error).
pub struct PendingSync(Vec<(PathBuf, File, File)>);

pub fn open_durable(files: &[PathBuf]) -> Result<PendingSync, ShimError> {
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        let opened = File::open(f).and_then(|file| {
            let dir = File::open(f.parent().unwrap_or_else(|| Path::new(".")))?;
            Ok((f.clone(), file, dir))
        });
        out.push(opened.map_err(|source| ShimError::Sync {
            path: f.clone(),
            source,
        })?);
    }
    Ok(PendingSync(out))
}

impl PendingSync {
    pub fn sync(self) -> Result<(), ShimError> {
        for (path, file, dir) in self.0 {
            file.sync_all()
                .and_then(|()| dir.sync_all())
                .map_err(|source| ShimError::Sync { path, source })?;
        }
        Ok(())
    }
}

/// A started container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub shim_pid: i32,
    pub init_pid: i32,
}

pub const MEMINFO_REFRESH: Duration = Duration::from_secs(1);

/// Starts the supervisor and, through it, the container. Returns once the container's command
/// has been exec'd (or failed to start: then nothing of the process side is left).
pub fn spawn(spec: ShimSpec) -> Result<Started, ShimError> {
    let (rr, rw) = process::pipe().map_err(ShimError::Spawn)?;
    let sync = open_durable(&spec.sync_meanwhile)?;
    // Zombies of supervisors this process started earlier (a long-lived library caller).
    process::reap_exited_children();
    // One fork: the supervisor is this process's child in its own session. The middle process
    // of a double fork (fork, setsid, fork, exit) cost a third process creation on the start
    // path, ~1-3 ms under load. What it bought, not being our child, is not needed: a zombie
    // reads as dead to `state::alive`, `Runtime::wait` and the next start reap it, and when
    // tweedctl exits the kernel reparents a running supervisor as it did the grandchild.
    // SAFETY: tweedctl is single-threaded here (the thread that made a network namespace has
    // been joined; CNI plugins ran as child processes), and the child leaves through
    // `process::child`.
    match unsafe { process::fork() }.map_err(ShimError::Spawn)? {
        Fork::Child => process::child(move || {
            drop(rr);
            // SAFETY: setsid in a fresh child, which is never a process group leader: the
            // supervisor belongs to no terminal, and signals to tweedctl's group (^C) miss it.
            unsafe {
                libc::setsid();
            }
            supervise(spec, rw)
        }),
        Fork::Parent(pid) => {
            drop(rw);
            // Cannot fail for our own unreaped child short of running out of descriptors;
            // then the supervisor stays a zombie until this process exits, as before.
            let _ = process::reap_later(pid);
            // While the supervisor clones and sets up the init.
            let synced = sync.sync();
            let msg = process::read_to_end(rr.as_raw_fd()).map_err(ShimError::Spawn)?;
            let started = parse_report(&String::from_utf8_lossy(&msg))?;
            synced.map(|()| started)
        }
    }
}

fn parse_report(s: &str) -> Result<Started, ShimError> {
    if let Some(rest) = s.strip_prefix("ok ") {
        let mut it = rest.split_whitespace().map(|x| x.parse::<i32>());
        if let (Some(Ok(shim_pid)), Some(Ok(init_pid))) = (it.next(), it.next()) {
            return Ok(Started { shim_pid, init_pid });
        }
    }
    match s.strip_prefix("err ") {
        Some(m) => Err(ShimError::Start(m.to_string())),
        None if s.is_empty() => Err(ShimError::Start(
            "the supervisor died before starting the container".into(),
        )),
        None => Err(ShimError::Start(s.to_string())),
    }
}

/// The supervisor process: never returns to the caller's code.
fn supervise(spec: ShimSpec, report: OwnedFd) -> i32 {
    let me = std::process::id() as i32;
    if let Ok(null) = process::dev_null() {
        let _ = process::dup2(null.as_raw_fd(), 0);
    }
    // Logs carry the container's output, which may hold secrets: root only.
    if let Ok(f) = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(spec.state_dir.join("shim.log"))
    {
        let _ = process::dup2(f.as_raw_fd(), 1);
        let _ = process::dup2(f.as_raw_fd(), 2);
    }
    process::close_fds_except(&[report.as_raw_fd()]);
    let info = ProcInfo {
        pid: me,
        start_time: state::proc_start_time(me).unwrap_or(0),
        started: timefmt::now(),
    };
    process::mark("shim: supervisor up");
    let _ = state::write_process_record(&spec.state_dir.join("shim.json"), &info);
    process::mark("shim: shim.json written");
    match run(spec, report) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("supervisor: {e}");
            1
        }
    }
}

fn report_err(report: &OwnedFd, msg: &str) {
    let _ = process::write_all(report.as_raw_fd(), format!("err {msg}").as_bytes());
}

/// Renders and writes the container's /proc/meminfo in place (same length every time).
pub fn refresh_meminfo(file: &File, template: &str, cg: &Cgroup, limit: u64) {
    if let Ok(stats) = cg.stats() {
        let text = procview::render_meminfo(template, &stats, limit);
        let _ = file.write_all_at(text.as_bytes(), 0);
    }
}

fn run(mut spec: ShimSpec, report: OwnedFd) -> io::Result<()> {
    let cg = Cgroup::from_record(&spec.cgroup);
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(spec.state_dir.join("log"))?;
    let meminfo = match (&spec.meminfo_template, spec.memory_limit) {
        (Some(t), Some(limit)) => {
            let path = spec.state_dir.join("proc/meminfo");
            // Rendered by tweedctl a moment ago; refreshed from the first poll timeout on.
            let f = OpenOptions::new().write(true).open(&path)?;
            Some((f, t.clone(), limit))
        }
        _ => None,
    };
    let null = process::dev_null()?;
    let (out_r, out_w) = process::pipe()?;
    let (err_r, err_w) = process::pipe()?;
    let cloned = clone_init(
        &spec,
        [null.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()],
    );
    drop((null, out_w, err_w));
    let started = cloned.and_then(handshake);
    let Running {
        pid,
        pidfd,
        listener,
    } = match started {
        Ok(r) => r,
        Err(e) => {
            report_err(&report, &e.to_string());
            return Err(io::Error::other(e));
        }
    };
    process::mark("shim: exec'd");
    let init_info = ProcInfo {
        pid,
        start_time: state::proc_start_time(pid).unwrap_or(0),
        started: timefmt::now(),
    };
    state::write_process_record(&spec.state_dir.join("init.json"), &init_info)
        .map_err(io::Error::other)?;
    process::mark("shim: init.json written");
    process::write_all(
        report.as_raw_fd(),
        format!("ok {} {}", std::process::id(), pid).as_bytes(),
    )?;
    drop(report);

    let mut pipes: Vec<(OwnedFd, u8)> = vec![(out_r, logs::STDOUT), (err_r, logs::STDERR)];
    let mut listener = listener;
    let limit = spec.memory_limit.unwrap_or(u64::MAX);
    let view = || (cg.stats().unwrap_or_default(), limit);
    let mut exited = None;
    let mut drain_deadline: Option<Instant> = None;
    let mut buf = vec![0u8; 65536];
    loop {
        if exited.is_some()
            && (pipes.is_empty() || drain_deadline.is_some_and(|d| Instant::now() > d))
        {
            break;
        }
        let mut pfds: Vec<libc::pollfd> = pipes
            .iter()
            .map(|(fd, _)| libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        if exited.is_none() {
            pfds.push(libc::pollfd {
                fd: pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        if let Some(l) = &listener {
            pfds.push(libc::pollfd {
                fd: l.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let timeout = if exited.is_some() {
            50
        } else if meminfo.is_some() {
            MEMINFO_REFRESH.as_millis() as i32
        } else {
            -1
        };
        // SAFETY: pfds is a valid array of pollfd.
        let n = process::retry(|| unsafe {
            libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout)
        })?;
        if n == 0 {
            if let Some((f, t, limit)) = &meminfo {
                refresh_meminfo(f, t, &cg, *limit);
            }
            continue;
        }
        let mut closed: Vec<RawFd> = Vec::new();
        for p in &pfds {
            if p.revents == 0 {
                continue;
            }
            if let Some(l) = listener.as_ref().filter(|l| l.as_raw_fd() == p.fd) {
                if p.revents & libc::POLLIN != 0 && serve_one_logged(l, &view) {
                    continue;
                }
                // POLLHUP: no process uses the filter any more.
                listener = None;
                continue;
            }
            if p.fd == pidfd.as_raw_fd() {
                exited = Some(process::waitpid(pid)?);
                drain_deadline = Some(Instant::now() + Duration::from_millis(500));
                continue;
            }
            let stream = pipes
                .iter()
                .find(|(fd, _)| fd.as_raw_fd() == p.fd)
                .map(|(_, s)| *s);
            // SAFETY: reading into our buffer from a pipe we own.
            let r = unsafe { libc::read(p.fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
            if r > 0 {
                let _ = log.write_all(&logs::encode(
                    stream.unwrap_or(logs::STDOUT),
                    &buf[..r as usize],
                ));
            } else if r == 0
                || (r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted)
            {
                closed.push(p.fd);
            }
        }
        pipes.retain(|(fd, _)| !closed.contains(&fd.as_raw_fd()));
    }
    let exit = exited.expect("loop ends after the exit");
    process::mark("shim: init exited");
    let oom = cg.stats().map(|s| s.oom_kills > 0).unwrap_or(false);
    let info = ExitInfo {
        code: exit.code,
        signal: exit.signal,
        oom_killed: oom,
        finished: timefmt::now(),
    };
    state::write_process_record(&spec.state_dir.join("exit.json"), &info)
        .map_err(io::Error::other)?;
    process::mark("shim: exit recorded");
    if let Some(f) = spec.on_exit.take() {
        f();
    }
    Ok(())
}

/// A cloned init before its exec: its pid and the supervisor's ends of the start handshake.
struct Cloned {
    pid: i32,
    /// The init's reports: an error, fds to copy, or EOF once it has exec'd.
    report: OwnedFd,
    /// The supervisor's acks of copied fds.
    ack: OwnedFd,
}

/// An init that has exec'd the container's command.
struct Running {
    pid: i32,
    pidfd: OwnedFd,
    /// The sysinfo notification listener it handed over, if it installed the filter.
    listener: Option<OwnedFd>,
}

/// Stage "namespaces/clone": clones the init into new namespaces with `stdio` as its fds 0, 1
/// and 2; the child builds its world, moves itself into its cgroups and execs
/// ([`init::child_main`]). A failure leaves no process behind.
fn clone_init(spec: &ShimSpec, stdio: [RawFd; 3]) -> Result<Cloned, ShimError> {
    let (go_r, go_w) = process::pipe().map_err(ShimError::Clone)?;
    let (e_r, e_w) = process::pipe().map_err(ShimError::Clone)?;
    let mut join = cgroup::SelfJoin::open(&spec.cgroup).map_err(ShimError::Cgroup)?;
    let flags = init::clone_flags(&spec.init);
    // The supervisor is root in the host's user namespace, so it may write any map; the init
    // joins the namespace only at the end of its setup.
    let userns = match &spec.init.userns {
        Some(m) => Some(process::userns_fd(m).map_err(ShimError::Userns)?),
        None => None,
    };
    process::mark("shim: cloning");
    // SAFETY: the supervisor is single-threaded (a forked child that starts no thread), the
    // flags are namespace flags only, and the init leaves through `process::child`.
    match unsafe { process::clone_ns(flags) }.map_err(ShimError::Clone)? {
        Fork::Child => process::child(|| {
            let _ = process::set_pdeathsig(libc::SIGKILL);
            for (from, to) in stdio.into_iter().zip(0..) {
                let _ = process::dup2(from, to);
            }
            // The init moves itself into its cgroups (see SelfJoin): keep those files.
            let mut keep = join.fds();
            keep.extend([go_r.as_raw_fd(), e_w.as_raw_fd()]);
            let mut init_spec = spec.init.clone();
            init_spec.userns_fd = userns.as_ref().map(|f| f.as_raw_fd());
            keep.extend(init_spec.userns_fd);
            process::close_fds_except(&keep);
            init::child_main(
                &LinuxSyscall,
                &init_spec,
                &mut join,
                go_r.as_raw_fd(),
                e_w.as_raw_fd(),
            )
        }),
        // Our copies of the init's ends close here, so its exec reads as EOF.
        Fork::Parent(pid) => Ok(Cloned {
            pid,
            report: e_r,
            ack: go_w,
        }),
    }
}

/// Stage "init handshake": waits until the init has exec'd or reported why it could not,
/// copying the fds it hands over. On failure the init is killed and reaped: nothing is left.
fn handshake(c: Cloned) -> Result<Running, ShimError> {
    let r = process::pidfd_open(c.pid)
        .map_err(ShimError::Watch)
        .and_then(|pidfd| {
            init::read_child_report(c.report.as_raw_fd(), pidfd.as_raw_fd(), c.ack.as_raw_fd())
                .map(|fds| (pidfd, fds))
                .map_err(ShimError::Init)
        });
    match r {
        Ok((pidfd, fds)) => Ok(Running {
            pid: c.pid,
            pidfd,
            listener: fds
                .into_iter()
                .find(|(t, _)| *t == init::TAG_LISTENER)
                .map(|(_, f)| f),
        }),
        Err(e) => {
            let _ = process::kill(c.pid, libc::SIGKILL);
            let _ = process::waitpid(c.pid);
            Err(e)
        }
    }
}

fn serve_one_logged(l: &OwnedFd, view: &dyn Fn() -> (crate::cgroup::Stats, u64)) -> bool {
    match crate::sysinfo::serve_one(l, view) {
        Ok(more) => more,
        Err(e) => {
            eprintln!("supervisor: sysinfo notification: {e}");
            false
        }
    }
}

/// Creates the files the init bind-mounts over /proc and /sys before it exists.
pub fn prepare_proc_files(
    state_dir: &Path,
    meminfo: Option<&str>,
    cpuinfo: Option<&str>,
    cpu_online: Option<&str>,
) -> io::Result<(Option<PathBuf>, Option<PathBuf>, Option<PathBuf>)> {
    let mut out = (None, None, None);
    // 0700 like the state dir around it; the files themselves are 0444 (see
    // `fsutil::write_atomic_view`): the container reads them through its bind mounts, which do
    // not pass through this directory.
    let dir = state_dir.join("proc");
    fsutil::create_private_dir(&dir)?;
    for (content, name, slot) in [
        (meminfo, "meminfo", &mut out.0),
        (cpuinfo, "cpuinfo", &mut out.1),
        (cpu_online, "cpu-online", &mut out.2),
    ] {
        if let Some(c) = content {
            let p = dir.join(name);
            // Atomic but not fsynced: a view is rendered afresh at every start and means
            // nothing once the container's mount namespace is gone, which a crash ends.
            fsutil::write_atomic_view(&p, c.as_bytes())?;
            *slot = Some(p);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_views_are_world_readable_files_in_a_private_dir() {
        use std::fs;
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        // Rendered twice, as a second `start` of the same state dir does: replaced whole.
        for text in ["MemTotal: 1 kB\n", "MemTotal: 2 kB\n"] {
            let (m, c, o) = prepare_proc_files(t.path(), Some(text), None, Some("0\n")).unwrap();
            let (m, o) = (m.unwrap(), o.unwrap());
            assert!(c.is_none());
            assert_eq!(fs::read_to_string(&m).unwrap(), text);
            assert_eq!(mode(&m), 0o444);
            assert_eq!(mode(&o), 0o444);
            assert_eq!(mode(&t.path().join("proc")), 0o700);
            assert_eq!(fs::read_dir(t.path().join("proc")).unwrap().count(), 2);
        }
    }

    #[test]
    fn reports() {
        assert_eq!(
            parse_report("ok 10 11").unwrap(),
            Started {
                shim_pid: 10,
                init_pid: 11
            }
        );
        assert_eq!(
            parse_report("err exec: \"nope\": executable file not found in $PATH")
                .unwrap_err()
                .to_string(),
            "exec: \"nope\": executable file not found in $PATH"
        );
        assert!(parse_report("").is_err());
    }

    #[test]
    fn pending_records_are_synced_or_the_error_names_them() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("config.json");
        std::fs::write(&p, b"{}").unwrap();
        sync_durable(std::slice::from_ref(&p)).unwrap();
        let gone = t.path().join("gone.json");
        let e = sync_durable(&[p, gone.clone()]).unwrap_err();
        assert!(
            matches!(&e, ShimError::Sync { path, .. } if *path == gone),
            "{e}"
        );
        assert!(e.to_string().contains("gone.json"), "{e}");
        // Opened before the supervisor starts, synced after a `--rm` container's state directory
        // is gone: the descriptors still sync, and nothing fails.
        let d = t.path().join("c1");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("config.json"), b"{}").unwrap();
        let pending = open_durable(&[d.join("config.json")]).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
        pending.sync().unwrap();
    }
}
