//! The container's init: what the cloned child does between `clone` (new mount, pid, uts, ipc
//! and maybe net namespaces) and `execve` of the user's command.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::caps::CapSet;
use crate::process;
use crate::rootfs::{self, RootfsError, RootfsSpec};
use crate::syscall::Syscall;

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("joining network namespace {path}: {source}")]
    Netns { path: PathBuf, source: io::Error },
    #[error("setting sysctl {key}: {source}")]
    Sysctl { key: String, source: io::Error },
    #[error("entering a new cgroup namespace: {0}")]
    CgroupNs(io::Error),
    /// Joining the user namespace the supervisor made, or becoming its root.
    #[error("--userns: entering the container's user namespace: {0}")]
    Userns(io::Error),
    #[error("bringing up loopback: {0}")]
    Loopback(io::Error),
    #[error("setting hostname {name:?}: {source}")]
    Hostname { name: String, source: io::Error },
    #[error("{0}")]
    Rootfs(#[from] RootfsError),
    #[error("working directory {path}: {source}")]
    Cwd { path: String, source: io::Error },
    #[error("user {user:?}: {what}")]
    User { user: String, what: String },
    #[error("setting CPU affinity {cpus:?}: {source}")]
    Affinity { cpus: Vec<usize>, source: io::Error },
    #[error("no_new_privs: {0}")]
    NoNewPrivs(io::Error),
    #[error("dropping capabilities: {0}")]
    Caps(io::Error),
    #[error("switching to uid {uid} gid {gid}: {source}")]
    Ids {
        uid: u32,
        gid: u32,
        source: io::Error,
    },
    #[error("the supervisor did not place the container in its cgroups")]
    NotPlaced,
    #[error("joining the container's cgroups: {0}")]
    Cgroup(String),
    #[error("installing the sysinfo filter: {0}")]
    Seccomp(io::Error),
    #[error("installing the seccomp filter: {0}")]
    Filter(io::Error),
    #[error("handing the sysinfo listener to the supervisor: {0}")]
    Handoff(io::Error),
    #[error("exec: {cmd:?}: executable file not found in $PATH")]
    NotFound { cmd: String },
    #[error("exec {cmd:?}: {source}")]
    Exec { cmd: String, source: io::Error },
}

/// Everything the init does, decided by the runtime before `clone`.
#[derive(Debug, Clone)]
pub struct InitSpec {
    pub rootfs: RootfsSpec,
    pub hostname: String,
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub user: String,
    pub caps: CapSet,
    pub cpus: Vec<usize>,
    /// A network namespace to join (overlay, container:ID, or --host-netns for host).
    pub join_netns: Option<PathBuf>,
    /// The init got a fresh network namespace from clone: bring up its loopback.
    pub new_netns: bool,
    /// Answer `sysinfo` with the container's limits (the supervisor serves the notifications).
    pub virtual_sysinfo: bool,
    /// The compiled seccomp filters (none: unconfined).
    pub seccomp: Option<crate::seccomp::Programs>,
    pub no_new_privs: bool,
    /// `--userns`: the ids the container runs as on the host.
    pub userns: Option<crate::userns::Mapping>,
    /// The user namespace with those maps, made by the supervisor right before the clone (the
    /// fd is inherited). None until then.
    pub userns_fd: Option<RawFd>,
    /// With `--userns` and a network namespace of the container's own: the namespace stays
    /// the host user namespace's, so the container's root holds no CAP_NET_RAW or
    /// CAP_NET_BIND_SERVICE over it. [`USERNS_NET_SYSCTLS`] give back ping and low ports
    /// without them, as Docker's defaults do for every container.
    pub userns_net_sysctls: bool,
}

/// Written in the container's network namespace when [`InitSpec::userns_net_sysctls`].
pub const USERNS_NET_SYSCTLS: &[(&str, &str)] = &[
    ("net.ipv4.ping_group_range", "0 2147483647"),
    ("net.ipv4.ip_unprivileged_port_start", "0"),
];

/// Namespaces the init is cloned with.
pub fn clone_flags(spec: &InitSpec) -> libc::c_int {
    let mut f = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    if spec.new_netns {
        f |= libc::CLONE_NEWNET;
    }
    f
}

/// Every step from a fresh clone to just before `execve`. Returns the sysinfo listener fd when
/// the spec asks for one (last: the filter needs no_new_privs).
///
/// The root filesystem is built while the supervisor moves us into our cgroups (a cgroup v1
/// migration waits for an RCU grace period: overlapping it with the mounts hides most of it);
/// `placed` returns once that is done, before anything that must happen inside the cgroups.
pub fn prepare(
    sys: &dyn Syscall,
    spec: &InitSpec,
    placed: &mut dyn FnMut() -> Result<(), InitError>,
) -> Result<Option<RawFd>, InitError> {
    if spec.userns.is_some() && spec.userns_fd.is_none() {
        return Err(InitError::Userns(io::Error::other(
            "the supervisor made no user namespace",
        )));
    }
    if let Some(p) = &spec.join_netns {
        let f = std::fs::File::open(p).map_err(|source| InitError::Netns {
            path: p.clone(),
            source,
        })?;
        sys.setns(f.as_raw_fd(), libc::CLONE_NEWNET)
            .map_err(|source| InitError::Netns {
                path: p.clone(),
                source,
            })?;
    }
    if spec.new_netns {
        sys.loopback_up().map_err(InitError::Loopback)?;
    }
    if spec.userns_net_sysctls {
        for (key, value) in USERNS_NET_SYSCTLS {
            sys.sysctl(key, value).map_err(|source| InitError::Sysctl {
                key: key.to_string(),
                source,
            })?;
        }
    }
    sys.sethostname(&spec.hostname)
        .map_err(|source| InitError::Hostname {
            name: spec.hostname.clone(),
            source,
        })?;
    crate::process::mark("init: namespaces set");
    rootfs::setup(sys, &spec.rootfs, spec.userns_fd)?;
    crate::process::mark("init: rootfs mounted");
    let cwd = Path::new(if spec.cwd.is_empty() { "/" } else { &spec.cwd });
    if !sys.is_dir(cwd) {
        sys.mkdir_all(cwd, 0o755).map_err(|source| InitError::Cwd {
            path: spec.cwd.clone(),
            source,
        })?;
    }
    sys.chdir(cwd).map_err(|source| InitError::Cwd {
        path: spec.cwd.clone(),
        source,
    })?;
    if !spec.cpus.is_empty() {
        sys.set_affinity(&spec.cpus)
            .map_err(|source| InitError::Affinity {
                cpus: spec.cpus.clone(),
                source,
            })?;
    }
    placed()?;
    crate::process::mark("init: in cgroups");
    // In our cgroups now: they become the root of our cgroup namespace.
    sys.unshare(libc::CLONE_NEWCGROUP)
        .map_err(InitError::CgroupNs)?;
    // The user namespace comes last: every other namespace, mount and the cgroup placement
    // above needed host root, and stay owned by the host's user namespace, so the
    // container's root cannot undo any of them. Joining gives every capability in the new
    // namespace (dropped below as usual); becoming its uid 0 makes us the mapped host uid.
    if let Some(fd) = spec.userns_fd {
        sys.setns(fd, libc::CLONE_NEWUSER)
            .map_err(InitError::Userns)?;
        sys.set_ids(0, 0, &[]).map_err(InitError::Userns)?;
    }
    let (uid, gid) = resolve_user(&spec.user)?;
    drop_privileges(
        sys,
        &spec.caps,
        (uid, gid),
        spec.no_new_privs,
        spec.seccomp.as_ref(),
        spec.virtual_sysinfo,
    )
}

/// The last steps before `execve`, shared by the init and `exec`: no_new_privs, capabilities,
/// ids, the sysinfo listener, and the seccomp filter. With no_new_privs the filter goes last (so
/// the profile need not allow what the runtime does before), without it the filter must go in
/// while we still hold CAP_SYS_ADMIN, before the capabilities are dropped.
pub fn drop_privileges(
    sys: &dyn Syscall,
    caps: &CapSet,
    (uid, gid): (u32, u32),
    no_new_privs: bool,
    seccomp: Option<&crate::seccomp::Programs>,
    virtual_sysinfo: bool,
) -> Result<Option<RawFd>, InitError> {
    if no_new_privs {
        sys.set_no_new_privs().map_err(InitError::NoNewPrivs)?;
    } else if let Some(p) = seccomp {
        sys.seccomp(p).map_err(InitError::Filter)?;
    }
    sys.set_capabilities(caps).map_err(InitError::Caps)?;
    if uid != 0 || gid != 0 {
        sys.set_ids(uid, gid, &[])
            .map_err(|source| InitError::Ids { uid, gid, source })?;
    }
    let listener = if virtual_sysinfo {
        Some(sys.sysinfo_listener().map_err(InitError::Seccomp)?)
    } else {
        None
    };
    if no_new_privs {
        if let Some(p) = seccomp {
            sys.seccomp(p).map_err(InitError::Filter)?;
        }
    }
    Ok(listener)
}

/// Tag of the sysinfo listener in the start handshake.
pub const TAG_LISTENER: u8 = b'L';
/// Tag of a pty master (exec -t).
pub const TAG_PTY: u8 = b'P';

/// Child side of the sysinfo listener handoff.
pub fn hand_off_listener(fd: RawFd, to_parent: RawFd, from_parent: RawFd) -> Result<(), InitError> {
    hand_off_fd(TAG_LISTENER, fd, to_parent, from_parent)
}

/// Child side of an fd handoff: announce `tag` and the fd number on `to_parent`, wait for the
/// parent's ack on `from_parent` (it has copied the fd with pidfd_getfd by then), close ours.
pub fn hand_off_fd(
    tag: u8,
    fd: RawFd,
    to_parent: RawFd,
    from_parent: RawFd,
) -> Result<(), InitError> {
    let mut msg = vec![tag];
    msg.extend_from_slice(&fd.to_le_bytes());
    process::write_all(to_parent, &msg).map_err(InitError::Handoff)?;
    let mut b = [0u8; 1];
    // SAFETY: reading one byte into a local buffer.
    let n = unsafe { libc::read(from_parent, b.as_mut_ptr() as *mut libc::c_void, 1) };
    if n != 1 {
        return Err(InitError::Handoff(io::Error::other(
            "the supervisor went away",
        )));
    }
    // SAFETY: our own copy of the listener is no longer needed.
    unsafe {
        libc::close(fd);
    }
    Ok(())
}

/// Parent side of the start handshake on the child's report pipe: `E<text>` is a failure,
/// `L<fd>`/`P<fd>` an fd to copy (then ack on `ack`), EOF a successful exec. Returns the
/// copied fds by tag.
pub fn read_child_report(
    report: RawFd,
    pidfd: RawFd,
    ack: RawFd,
) -> Result<Vec<(u8, std::os::fd::OwnedFd)>, String> {
    let mut fds = Vec::new();
    loop {
        let mut b = [0u8; 1];
        // SAFETY: reading into a local buffer.
        let n = unsafe { libc::read(report, b.as_mut_ptr() as *mut libc::c_void, 1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(io::Error::last_os_error().to_string());
        }
        match (n, b[0]) {
            (0, _) => return Ok(fds),
            (_, tag @ (TAG_LISTENER | TAG_PTY)) => {
                let mut nb = [0u8; 4];
                // SAFETY: reading four bytes into a local buffer.
                let k = unsafe { libc::read(report, nb.as_mut_ptr() as *mut libc::c_void, 4) };
                if k != 4 {
                    return Err("short listener handoff".into());
                }
                let fd = RawFd::from_le_bytes(nb);
                fds.push((
                    tag,
                    crate::sysinfo::pidfd_getfd(pidfd, fd)
                        .map_err(|e| format!("copying fd {fd} of the child: {e}"))?,
                ));
                process::write_all(ack, b"A").map_err(|e| e.to_string())?;
            }
            _ => {
                let rest = process::read_to_end(report).unwrap_or_default();
                return Err(String::from_utf8_lossy(&rest).into_owned());
            }
        }
    }
}

/// `user[:group]` by number or by name from the container's /etc/passwd and /etc/group.
pub fn resolve_user(user: &str) -> Result<(u32, u32), InitError> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    lookup_user(user, &passwd, &group).map_err(|what| InitError::User {
        user: user.to_string(),
        what,
    })
}

/// Pure part of [`resolve_user`].
pub fn lookup_user(spec: &str, passwd: &str, group: &str) -> Result<(u32, u32), String> {
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let entry = |text: &str, name: &str| -> Option<Vec<String>> {
        text.lines()
            .map(|l| l.split(':').map(str::to_string).collect::<Vec<_>>())
            .find(|f| f.len() >= 4 && f[0] == name)
    };
    let (uid, mut gid) = match u.parse::<u32>() {
        Ok(n) => (n, 0),
        Err(_) => {
            let f = entry(passwd, u).ok_or("no such user in the image's /etc/passwd")?;
            (
                f[2].parse().map_err(|_| "bad uid in /etc/passwd")?,
                f[3].parse().map_err(|_| "bad gid in /etc/passwd")?,
            )
        }
    };
    if let Ok(n) = u.parse::<u32>() {
        // A numeric user takes its primary group from /etc/passwd when listed there.
        if let Some(f) = passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() >= 4 && f[2].parse::<u32>().ok() == Some(n))
        {
            gid = f[3].parse().unwrap_or(0);
        }
    }
    if let Some(g) = g {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => entry(group, g).ok_or("no such group in the image's /etc/group")?[2]
                .parse()
                .map_err(|_| "bad gid in /etc/group")?,
        };
    }
    Ok((uid, gid))
}

/// Finds `cmd` the way execvp does, in the container's PATH.
pub fn resolve_command(cmd: &str, env: &[String]) -> Result<PathBuf, InitError> {
    if cmd.contains('/') {
        return Ok(PathBuf::from(cmd));
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let p = Path::new(dir).join(cmd);
        if let Ok(m) = std::fs::metadata(&p) {
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return Ok(p);
            }
        }
    }
    Err(InitError::NotFound {
        cmd: cmd.to_string(),
    })
}

/// execve; returns only on failure.
pub fn exec(argv: &[String], env: &[String]) -> InitError {
    let cmd = argv.first().cloned().unwrap_or_default();
    let path = match resolve_command(&cmd, env) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let c = |s: &[u8]| CString::new(s).unwrap_or_default();
    let cpath = c(path.as_os_str().as_bytes());
    let cargv: Vec<CString> = argv.iter().map(|a| c(a.as_bytes())).collect();
    let cenv: Vec<CString> = env.iter().map(|a| c(a.as_bytes())).collect();
    let mut pargv: Vec<*const libc::c_char> = cargv.iter().map(|a| a.as_ptr()).collect();
    pargv.push(std::ptr::null());
    let mut penv: Vec<*const libc::c_char> = cenv.iter().map(|a| a.as_ptr()).collect();
    penv.push(std::ptr::null());
    process::reset_signals();
    // Nothing of the runtime's may reach the command: whatever fd was inherited or opened on
    // the way (and not already close-on-exec) closes at the exec.
    process::cloexec_from(3);
    // SAFETY: NUL-terminated arrays of valid C strings that outlive the call.
    unsafe {
        libc::execve(cpath.as_ptr(), pargv.as_ptr(), penv.as_ptr());
    }
    let source = io::Error::last_os_error();
    if source.kind() == io::ErrorKind::NotFound {
        InitError::NotFound { cmd }
    } else {
        InitError::Exec { cmd, source }
    }
}

/// The cloned child: prepares (joining its cgroups half way), execs. Any failure is written to
/// `err_fd` (close-on-exec: a successful exec closes it with nothing written).
pub fn child_main(
    sys: &dyn Syscall,
    spec: &InitSpec,
    join: &mut crate::cgroup::SelfJoin,
    go_fd: RawFd,
    err_fd: RawFd,
) -> i32 {
    let mut placed = || join.join().map_err(|e| InitError::Cgroup(e.to_string()));
    crate::process::mark("init: cloned");
    let e = match prepare(sys, spec, &mut placed) {
        Ok(x) => {
            crate::process::mark("init: confined");
            Ok(x)
        }
        e => e,
    };
    let e = match e {
        Ok(None) => exec(&spec.argv, &spec.env),
        Ok(Some(l)) => match hand_off_listener(l, err_fd, go_fd) {
            Ok(()) => exec(&spec.argv, &spec.env),
            Err(e) => e,
        },
        Err(e) => e,
    };
    let _ = process::write_all(err_fd, format!("E{e}").as_bytes());
    127
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscall::fake::{Call, FakeSyscall};

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nwww:x:33:34:www:/var/www:/bin/false\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:\nwww:x:34:\n";

    #[test]
    fn users() {
        assert_eq!(lookup_user("www", PASSWD, GROUP), Ok((33, 34)));
        assert_eq!(lookup_user("33", PASSWD, GROUP), Ok((33, 34)));
        assert_eq!(lookup_user("1000", PASSWD, GROUP), Ok((1000, 0)));
        assert_eq!(lookup_user("1000:1000", PASSWD, GROUP), Ok((1000, 1000)));
        assert_eq!(lookup_user("www:staff", PASSWD, GROUP), Ok((33, 50)));
        assert!(lookup_user("nobody", PASSWD, GROUP).is_err());
        assert!(lookup_user("www:nogroup", PASSWD, GROUP).is_err());
    }

    fn spec() -> InitSpec {
        InitSpec {
            rootfs: RootfsSpec {
                scratch: "/s".into(),
                init_layer: Default::default(),
                init_owner: (0, 0),
                lowers: vec!["/l".into()],
                upper: "/u".into(),
                work: "/w".into(),
                volumes: vec![],
                meminfo: None,
                cpuinfo: None,
                cpu_online: None,
                privileged: false,
            },
            hostname: "box".into(),
            argv: vec!["sh".into()],
            env: vec![],
            cwd: "/srv".into(),
            user: String::new(),
            caps: CapSet::docker_default(),
            cpus: vec![1],
            join_netns: None,
            new_netns: true,
            virtual_sysinfo: true,
            seccomp: Some(vec![vec![]]),
            no_new_privs: true,
            userns: None,
            userns_fd: None,
            userns_net_sysctls: false,
        }
    }

    #[test]
    fn userns_is_joined_after_everything_that_needs_host_root() {
        let mut s = spec();
        s.userns = Some(crate::userns::Mapping {
            uid: crate::userns::IdRange::new(100000, 65536).unwrap(),
            gid: crate::userns::IdRange::new(100000, 65536).unwrap(),
        });
        // No fd from the supervisor: refuse rather than run as host root.
        let sys = FakeSyscall::new();
        let e = prepare(&sys, &s, &mut || Ok(())).unwrap_err();
        assert!(matches!(e, InitError::Userns(_)), "{e}");
        assert!(sys.calls().is_empty());

        s.userns_fd = Some(7);
        s.userns_net_sysctls = true;
        let sys = FakeSyscall::new();
        prepare(&sys, &s, &mut || Ok(())).unwrap();
        let calls = sys.calls();
        let pos = |c: &Call| calls.iter().position(|x| x == c).unwrap();
        let join = pos(&Call::Setns(7, libc::CLONE_NEWUSER));
        assert!(pos(&Call::IdmapMount("/l".into(), "/s/idmap/0".into(), 7)) < join);
        assert!(pos(&Call::Sethostname("box".into())) < join);
        let sysctl = pos(&Call::Sysctl(
            "net.ipv4.ping_group_range".into(),
            "0 2147483647".into(),
        ));
        assert!(pos(&Call::LoopbackUp) < sysctl && sysctl < join);
        assert!(pos(&Call::PivotRoot(".".into(), ".".into())) < join);
        assert!(pos(&Call::Unshare(libc::CLONE_NEWCGROUP)) < join);
        // Root of the namespace right away, then the usual drop.
        assert_eq!(calls[join + 1], Call::SetIds(0, 0));
        assert!(join + 1 < pos(&Call::NoNewPrivs));
        assert!(join + 1 < pos(&Call::Caps(CapSet::docker_default())));
        // Without --userns nothing of it happens.
        let sys = FakeSyscall::new();
        prepare(&sys, &spec(), &mut || Ok(())).unwrap();
        assert!(!sys.calls().iter().any(|c| matches!(
            c,
            Call::Setns(_, libc::CLONE_NEWUSER) | Call::IdmapMount(..) | Call::Sysctl(..)
        )));
    }

    #[test]
    fn prepare_order() {
        let sys = FakeSyscall::new();
        let mut placed_at = None;
        prepare(&sys, &spec(), &mut || {
            placed_at = Some(sys.calls().len());
            Ok(())
        })
        .unwrap();
        let calls = sys.calls();
        assert_eq!(calls[0], Call::LoopbackUp);
        assert_eq!(calls[1], Call::Sethostname("box".into()));
        let pos = |c: &Call| calls.iter().position(|x| x == c).unwrap();
        let pivot = pos(&Call::PivotRoot(".".into(), ".".into()));
        // The cgroup namespace is made right after the supervisor reports the placement, after
        // the filesystem work, before any privilege change.
        let cgns = pos(&Call::Unshare(libc::CLONE_NEWCGROUP));
        assert_eq!(Some(cgns), placed_at);
        assert!(cgns > pivot);
        // The working directory is made and entered inside the new root.
        assert!(pos(&Call::MkdirAll("/srv".into())) > pivot);
        assert!(pos(&Call::Chdir("/srv".into())) > pivot);
        assert!(pos(&Call::Affinity(vec![1])) > pivot);
        // Privileges go last, capabilities after no_new_privs.
        let nnp = pos(&Call::NoNewPrivs);
        assert_eq!(calls[nnp + 1], Call::Caps(CapSet::docker_default()));
        // The filters come last: they need no_new_privs, and the profile need not allow the
        // runtime's own calls.
        assert_eq!(calls[nnp + 2], Call::SysinfoFilter);
        assert_eq!(calls[nnp + 3], Call::Seccomp(1));
        assert_eq!(nnp + 4, calls.len());
        assert_eq!(
            clone_flags(&spec()) & libc::CLONE_NEWNET,
            libc::CLONE_NEWNET
        );
    }

    #[test]
    fn without_no_new_privs_the_filter_goes_in_before_the_capabilities_drop() {
        let mut s = spec();
        s.no_new_privs = false;
        let sys = FakeSyscall::new();
        prepare(&sys, &s, &mut || Ok(())).unwrap();
        let calls = sys.calls();
        assert!(!calls.contains(&Call::NoNewPrivs));
        let f = calls.iter().position(|c| *c == Call::Seccomp(1)).unwrap();
        assert_eq!(calls[f + 1], Call::Caps(CapSet::docker_default()));
        // Unconfined: no filter at all.
        let mut s = spec();
        s.seccomp = None;
        let sys = FakeSyscall::new();
        prepare(&sys, &s, &mut || Ok(())).unwrap();
        assert!(!sys.calls().iter().any(|c| matches!(c, Call::Seccomp(_))));
    }

    #[test]
    fn host_network_gets_no_loopback_setup() {
        let mut s = spec();
        s.new_netns = false;
        s.virtual_sysinfo = false;
        let sys = FakeSyscall::new();
        assert_eq!(prepare(&sys, &s, &mut || Ok(())).unwrap(), None);
        assert!(!sys.calls().contains(&Call::SysinfoFilter));
        assert!(!sys.calls().contains(&Call::LoopbackUp));
        assert_eq!(clone_flags(&s) & libc::CLONE_NEWNET, 0);
    }

    #[test]
    fn no_placement_means_no_exec_and_no_privilege_changes() {
        let sys = FakeSyscall::new();
        let e = prepare(&sys, &spec(), &mut || Err(InitError::NotPlaced)).unwrap_err();
        assert!(matches!(e, InitError::NotPlaced));
        let calls = sys.calls();
        assert!(!calls.contains(&Call::Unshare(libc::CLONE_NEWCGROUP)));
        assert!(!calls.contains(&Call::NoNewPrivs));
        assert!(!calls.contains(&Call::SysinfoFilter));
    }

    #[test]
    fn command_lookup() {
        assert_eq!(
            resolve_command("/bin/x", &[]).unwrap(),
            PathBuf::from("/bin/x")
        );
        assert!(matches!(
            resolve_command("definitely-not-a-command", &["PATH=/nonexistent".into()]),
            Err(InitError::NotFound { .. })
        ));
        assert!(resolve_command("sh", &["PATH=/bin:/usr/bin".into()]).is_ok());
    }
}
