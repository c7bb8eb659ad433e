//! Every kernel call that changes a container's world goes through [`Syscall`]: the real
//! [`LinuxSyscall`] and, in unit tests, the recording `fake::FakeSyscall`, so mount plans, the
//! init's steps and the runtime's start sequence can be checked without root.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::caps::CapSet;
use crate::shim::{ShimError, ShimSpec, Started};

#[cfg(test)]
pub mod fake;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_paths_never_leave_the_root() {
        use std::os::fd::AsRawFd;
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("real")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../../../etc", root.join("rel")).unwrap();
        std::fs::create_dir(root.join("etc")).unwrap();
        let real = |p: &str| {
            let fd = open_in_root(&root, p).unwrap();
            std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap()
        };
        let canon = root.canonicalize().unwrap();
        // Absolute and climbing links resolve to the root's own /etc, never the host's.
        assert_eq!(real("/abs"), canon.join("etc"));
        assert_eq!(real("rel"), canon.join("etc"));
        assert_eq!(real("/../../real"), canon.join("real"));
        assert_eq!(real("/"), canon);
        assert!(open_in_root(&root, "/missing").is_err());
    }
}

/// One mount(2) call, as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub source: Option<PathBuf>,
    pub target: PathBuf,
    pub fstype: Option<String>,
    pub flags: libc::c_ulong,
    pub data: Option<String>,
}

impl Mount {
    pub fn new(target: impl Into<PathBuf>) -> Self {
        Mount {
            source: None,
            target: target.into(),
            fstype: None,
            flags: 0,
            data: None,
        }
    }
    pub fn source(mut self, s: impl Into<PathBuf>) -> Self {
        self.source = Some(s.into());
        self
    }
    pub fn fstype(mut self, t: &str) -> Self {
        self.fstype = Some(t.to_string());
        self
    }
    pub fn flags(mut self, f: libc::c_ulong) -> Self {
        self.flags = f;
        self
    }
    pub fn data(mut self, d: impl Into<String>) -> Self {
        self.data = Some(d.into());
        self
    }
}

/// The side effects of setting up a container's namespaces, filesystem and credentials.
/// `Sync`: a network namespace is made in a helper thread (see `netns::create`).
pub trait Syscall: Sync {
    fn mount(&self, m: &Mount) -> io::Result<()>;
    fn umount2(&self, target: &Path, flags: i32) -> io::Result<()>;
    /// `pivot_root(new_root, put_old)`.
    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> io::Result<()>;
    fn chdir(&self, path: &Path) -> io::Result<()>;
    fn mkdir_all(&self, path: &Path, mode: u32) -> io::Result<()>;
    /// Creates an empty file if nothing is there (a bind mount target).
    fn touch(&self, path: &Path) -> io::Result<()>;
    /// Creates or truncates the file `path` with `content` (no symlink followed at the end).
    fn write_file(&self, path: &Path, content: &[u8]) -> io::Result<()>;
    /// Sets the owner (uid, gid) and the permission bits of `path` (no symlink followed).
    fn set_owner(&self, path: &Path, owner: (u32, u32), mode: u32) -> io::Result<()>;
    fn mknod(&self, path: &Path, mode: u32, dev: u64) -> io::Result<()>;
    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()>;
    fn sethostname(&self, name: &str) -> io::Result<()>;
    fn setns(&self, fd: RawFd, nstype: i32) -> io::Result<()>;
    fn unshare(&self, flags: i32) -> io::Result<()>;
    fn set_no_new_privs(&self) -> io::Result<()>;
    /// Drops every capability outside `caps` from the bounding set, then sets the permitted,
    /// effective and inheritable sets to `caps` and clears the ambient set.
    fn set_capabilities(&self, caps: &CapSet) -> io::Result<()>;
    fn set_affinity(&self, cpus: &[usize]) -> io::Result<()>;
    fn set_ids(&self, uid: u32, gid: u32, groups: &[u32]) -> io::Result<()>;
    /// Mounts a copy of the directory `src` on `target`, its file owners shifted through the
    /// user namespace `userns` (an idmapped mount: on-disk uid 0 reads as that namespace's
    /// root). Needs Linux 5.12+, and a filesystem that supports it under `src`.
    fn idmap_mount(&self, src: &Path, target: &Path, userns: RawFd) -> io::Result<()>;
    /// Writes `value` to the sysctl `key` (dotted) of the current network namespace.
    fn sysctl(&self, key: &str, value: &str) -> io::Result<()>;
    /// Installs compiled seccomp filters, in order.
    fn seccomp(&self, progs: &crate::seccomp::Programs) -> io::Result<()>;
    /// Resolves `path` inside `root` as if `root` were `/` (symlinks, `..` and absolute links
    /// never leave it: `openat2(RESOLVE_IN_ROOT)`), and returns a path naming the very inode
    /// found, for use as a mount target while the returned value lives.
    fn pin_in_root(&self, root: &Path, path: &str) -> io::Result<Pinned>;
    /// Installs the seccomp filter that turns `sysinfo` into a user notification; returns the
    /// listener fd (close-on-exec).
    fn sysinfo_listener(&self) -> io::Result<RawFd>;
    /// Brings the loopback interface of the current network namespace up.
    fn loopback_up(&self) -> io::Result<()>;
    /// Whether `path` exists (without following a final symlink).
    fn exists(&self, path: &Path) -> bool;
    fn is_dir(&self, path: &Path) -> bool;
    /// Starts a container: forks its supervisor, which clones the init into new namespaces
    /// ([`crate::init::clone_flags`]) and returns once the init has exec'd the command or
    /// failed (then no process of the container is left).
    fn start_supervisor(&self, spec: ShimSpec) -> Result<Started, ShimError>;
}

/// A path inside a container's root, resolved once; `fd` keeps the inode it names.
#[derive(Debug)]
pub struct Pinned {
    pub path: PathBuf,
    pub fd: Option<std::os::fd::OwnedFd>,
}

/// `openat2(dirfd, path, O_PATH | O_CLOEXEC, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`.
pub fn open_in_root(root: &Path, path: &str) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let dir = std::fs::File::open(root)?;
    let rel = CString::new(path.trim_start_matches('/').as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let rel = if rel.as_bytes().is_empty() {
        CString::new(".").expect("no NUL")
    } else {
        rel
    };
    // SAFETY: open_how is plain data; zero is "no flags" for every field.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid dir fd, NUL-terminated path and an open_how of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            rel.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

pub(crate) fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The real thing.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxSyscall;

impl Syscall for LinuxSyscall {
    fn mount(&self, m: &Mount) -> io::Result<()> {
        let src = m.source.as_deref().map(cstr).transpose()?;
        let tgt = cstr(&m.target)?;
        let fst = m
            .fstype
            .as_deref()
            .map(|s| CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput)))
            .transpose()?;
        let data = m
            .data
            .as_deref()
            .map(|s| CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput)))
            .transpose()?;
        // SAFETY: every pointer is either null or a valid NUL-terminated string that outlives the call.
        check(unsafe {
            libc::mount(
                src.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
                tgt.as_ptr(),
                fst.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
                m.flags,
                data.as_ref()
                    .map_or(std::ptr::null(), |s| s.as_ptr() as *const libc::c_void),
            )
        })
    }

    fn umount2(&self, target: &Path, flags: i32) -> io::Result<()> {
        let t = cstr(target)?;
        // SAFETY: valid C string.
        check(unsafe { libc::umount2(t.as_ptr(), flags) })
    }

    fn pivot_root(&self, new_root: &Path, put_old: &Path) -> io::Result<()> {
        let n = cstr(new_root)?;
        let o = cstr(put_old)?;
        // SAFETY: valid C strings; pivot_root has no libc wrapper.
        check(unsafe { libc::syscall(libc::SYS_pivot_root, n.as_ptr(), o.as_ptr()) as libc::c_int })
    }

    fn chdir(&self, path: &Path) -> io::Result<()> {
        std::env::set_current_dir(path)
    }

    fn mkdir_all(&self, path: &Path, mode: u32) -> io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(path)
    }

    fn touch(&self, path: &Path) -> io::Result<()> {
        if std::fs::symlink_metadata(path).is_ok() {
            return Ok(());
        }
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map(drop)
    }

    fn write_file(&self, path: &Path, content: &[u8]) -> io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?
            .write_all(content)
    }

    fn set_owner(&self, path: &Path, owner: (u32, u32), mode: u32) -> io::Result<()> {
        std::os::unix::fs::lchown(path, Some(owner.0), Some(owner.1))?;
        // After the chown, which clears set-id bits; fchmodat cannot skip symlinks, but this
        // is only called on what the caller just made.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
    }

    fn mknod(&self, path: &Path, mode: u32, dev: u64) -> io::Result<()> {
        let p = cstr(path)?;
        // SAFETY: valid C string.
        check(unsafe { libc::mknod(p.as_ptr(), mode as libc::mode_t, dev as libc::dev_t) })
    }

    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()> {
        std::os::unix::fs::symlink(target, link)
    }

    fn sethostname(&self, name: &str) -> io::Result<()> {
        // SAFETY: pointer and length describe `name`.
        check(unsafe { libc::sethostname(name.as_ptr() as *const libc::c_char, name.len()) })
    }

    fn setns(&self, fd: RawFd, nstype: i32) -> io::Result<()> {
        // SAFETY: plain syscall on an fd.
        check(unsafe { libc::setns(fd, nstype) })
    }

    fn unshare(&self, flags: i32) -> io::Result<()> {
        // SAFETY: plain syscall.
        check(unsafe { libc::unshare(flags) })
    }

    fn set_no_new_privs(&self) -> io::Result<()> {
        // SAFETY: plain prctl.
        check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
    }

    fn set_capabilities(&self, caps: &CapSet) -> io::Result<()> {
        crate::caps::apply(caps)
    }

    fn set_affinity(&self, cpus: &[usize]) -> io::Result<()> {
        // SAFETY: cpu_set_t is plain data; CPU_SET only writes inside it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &c in cpus {
                libc::CPU_SET(c, &mut set);
            }
            check(libc::sched_setaffinity(
                0,
                std::mem::size_of::<libc::cpu_set_t>(),
                &set,
            ))
        }
    }

    fn set_ids(&self, uid: u32, gid: u32, groups: &[u32]) -> io::Result<()> {
        // SAFETY: plain syscalls; `groups` outlives setgroups.
        unsafe {
            check(libc::setgroups(groups.len(), groups.as_ptr()))?;
            check(libc::setresgid(gid, gid, gid))?;
            check(libc::setresuid(uid, uid, uid))
        }
    }

    fn sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        std::fs::write(Path::new("/proc/sys").join(key.replace('.', "/")), value)
    }

    fn idmap_mount(&self, src: &Path, target: &Path, userns: RawFd) -> io::Result<()> {
        const OPEN_TREE_CLONE: libc::c_uint = 1;
        const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
        // Follow the target's final symlink as mount(2) does: a volume's target is a pinned
        // `/proc/self/fd/N`, a magic link to the directory resolved inside the root.
        const MOVE_MOUNT_T_SYMLINKS: libc::c_uint = 0x10;
        const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
        #[repr(C)]
        struct MountAttr {
            attr_set: u64,
            attr_clr: u64,
            propagation: u64,
            userns_fd: u64,
        }
        let (s, t) = (cstr(src)?, cstr(target)?);
        let empty = CString::default();
        // SAFETY: valid C strings; the tree fd is ours and closed by OwnedFd.
        let tree = unsafe {
            let r = libc::syscall(
                libc::SYS_open_tree,
                libc::AT_FDCWD,
                s.as_ptr(),
                OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
            );
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            std::os::fd::OwnedFd::from_raw_fd(r as RawFd)
        };
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_IDMAP,
            attr_clr: 0,
            propagation: 0,
            userns_fd: userns as u64,
        };
        // SAFETY: `attr` outlives the call and its size is passed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                tree.as_raw_fd(),
                empty.as_ptr(),
                libc::AT_EMPTY_PATH,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: valid fds and C strings.
        let r = unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                tree.as_raw_fd(),
                empty.as_ptr(),
                libc::AT_FDCWD,
                t.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_SYMLINKS,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn seccomp(&self, progs: &crate::seccomp::Programs) -> io::Result<()> {
        crate::seccomp::install(progs)
    }

    fn pin_in_root(&self, root: &Path, path: &str) -> io::Result<Pinned> {
        use std::os::fd::AsRawFd;
        let fd = open_in_root(root, path)?;
        Ok(Pinned {
            path: PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())),
            fd: Some(fd),
        })
    }

    fn sysinfo_listener(&self) -> io::Result<RawFd> {
        use std::os::fd::IntoRawFd;
        crate::sysinfo::install_filter().map(|fd| fd.into_raw_fd())
    }

    fn loopback_up(&self) -> io::Result<()> {
        loopback_up()
    }

    fn exists(&self, path: &Path) -> bool {
        std::fs::symlink_metadata(path).is_ok()
    }

    fn is_dir(&self, path: &Path) -> bool {
        std::fs::symlink_metadata(path)
            .map(|m| m.is_dir())
            .unwrap_or(false)
    }

    fn start_supervisor(&self, spec: ShimSpec) -> Result<Started, ShimError> {
        crate::shim::spawn(spec)
    }
}

/// `ip link set lo up` by ioctl, in the calling thread's network namespace.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket/ioctl/close on a zeroed ifreq naming "lo".
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        let r = (|| {
            if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) < 0 {
                return Err(io::Error::last_os_error());
            }
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })();
        libc::close(fd);
        r
    }
}
