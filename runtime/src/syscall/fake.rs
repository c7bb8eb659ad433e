//! The recording [`Syscall`] of unit tests. Compiled for tests only.

use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{Mount, Syscall};
use crate::caps::CapSet;
use crate::journal::Journal;
use crate::shim::{ShimError, ShimSpec, Started};

/// What [`FakeSyscall`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Mount(Mount),
    Umount(PathBuf, i32),
    PivotRoot(PathBuf, PathBuf),
    Chdir(PathBuf),
    MkdirAll(PathBuf),
    Touch(PathBuf),
    /// A file written: path, content.
    WriteFile(PathBuf, String),
    /// Owner and mode set: path, (uid, gid), mode.
    SetOwner(PathBuf, (u32, u32), u32),
    Mknod(PathBuf, u32, u64),
    Symlink(PathBuf, PathBuf),
    Sethostname(String),
    Setns(RawFd, i32),
    Unshare(i32),
    NoNewPrivs,
    Caps(CapSet),
    Affinity(Vec<usize>),
    SetIds(u32, u32),
    /// An idmapped copy of a directory mounted: source, target, user namespace fd.
    IdmapMount(PathBuf, PathBuf, RawFd),
    Sysctl(String, String),
    LoopbackUp,
    SysinfoFilter,
    /// Seccomp filters installed (how many).
    Seccomp(usize),
    /// A container start: its state directory, the namespaces its init is cloned with and
    /// the one it joins, and whether its `config.json` (which a `--rm` supervisor reads) is
    /// there yet.
    StartSupervisor {
        state_dir: PathBuf,
        clone_flags: i32,
        join_netns: Option<PathBuf>,
        config_recorded: bool,
        /// What the start makes durable while the supervisor starts.
        sync_meanwhile: Vec<PathBuf>,
        /// The init layer the init is to write on its scratch tmpfs.
        init_layer: crate::rootfs::InitLayer,
        /// Where that tmpfs is mounted.
        scratch: PathBuf,
    },
}

impl Call {
    /// The call's line in a [`Journal`].
    fn line(&self) -> String {
        match self {
            Call::Mount(m) => format!("sys mount {}", m.target.display()),
            Call::Umount(t, _) => format!("sys umount {}", t.display()),
            Call::Unshare(f) => format!("sys unshare {f:#x}"),
            Call::LoopbackUp => "sys loopback up".into(),
            Call::StartSupervisor { state_dir, .. } => {
                format!("sys start supervisor {}", state_dir.display())
            }
            other => format!("sys {other:?}"),
        }
    }
}

/// Records calls; paths listed in `existing` (and those it created) exist, directories among them
/// are those in `dirs` or made by `mkdir_all`.
#[derive(Debug, Default)]
pub struct FakeSyscall {
    pub calls: Mutex<Vec<Call>>,
    pub existing: Mutex<Vec<PathBuf>>,
    pub dirs: Mutex<Vec<PathBuf>>,
    /// Calls whose target is this path fail with EPERM.
    pub fail_on: Option<PathBuf>,
    pub journal: Journal,
}

impl FakeSyscall {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn with_existing(files: &[&str], dirs: &[&str]) -> Self {
        let f = Self::default();
        f.existing
            .lock()
            .unwrap()
            .extend(files.iter().chain(dirs.iter()).map(PathBuf::from));
        f.dirs
            .lock()
            .unwrap()
            .extend(dirs.iter().map(PathBuf::from));
        f
    }
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
    fn rec(&self, c: Call, target: Option<&Path>) -> io::Result<()> {
        self.journal.note(c.line());
        self.calls.lock().unwrap().push(c);
        match (&self.fail_on, target) {
            (Some(f), Some(t)) if f == t => Err(io::Error::from_raw_os_error(libc::EPERM)),
            _ => Ok(()),
        }
    }
}

impl Syscall for FakeSyscall {
    fn mount(&self, m: &Mount) -> io::Result<()> {
        self.rec(Call::Mount(m.clone()), Some(&m.target))
    }
    fn umount2(&self, target: &Path, flags: i32) -> io::Result<()> {
        self.rec(Call::Umount(target.into(), flags), Some(target))
    }
    fn pivot_root(&self, n: &Path, o: &Path) -> io::Result<()> {
        self.rec(Call::PivotRoot(n.into(), o.into()), Some(n))
    }
    fn chdir(&self, p: &Path) -> io::Result<()> {
        self.rec(Call::Chdir(p.into()), Some(p))
    }
    fn mkdir_all(&self, p: &Path, _mode: u32) -> io::Result<()> {
        // A file on the way: as the kernel would say.
        let file_on_the_way = {
            let (existing, dirs) = (self.existing.lock().unwrap(), self.dirs.lock().unwrap());
            existing
                .iter()
                .any(|e| p.starts_with(e) && !dirs.contains(e))
        };
        if file_on_the_way {
            self.rec(Call::MkdirAll(p.into()), None)?;
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        self.existing.lock().unwrap().push(p.into());
        self.dirs.lock().unwrap().push(p.into());
        self.rec(Call::MkdirAll(p.into()), Some(p))
    }
    fn touch(&self, p: &Path) -> io::Result<()> {
        self.existing.lock().unwrap().push(p.into());
        self.rec(Call::Touch(p.into()), Some(p))
    }
    fn write_file(&self, p: &Path, content: &[u8]) -> io::Result<()> {
        if self.is_dir(p) {
            return Err(io::Error::from_raw_os_error(libc::EISDIR));
        }
        self.existing.lock().unwrap().push(p.into());
        let c = String::from_utf8_lossy(content).into_owned();
        self.rec(Call::WriteFile(p.into(), c), Some(p))
    }
    fn set_owner(&self, p: &Path, owner: (u32, u32), mode: u32) -> io::Result<()> {
        self.rec(Call::SetOwner(p.into(), owner, mode), Some(p))
    }
    fn mknod(&self, p: &Path, mode: u32, dev: u64) -> io::Result<()> {
        self.existing.lock().unwrap().push(p.into());
        self.rec(Call::Mknod(p.into(), mode, dev), Some(p))
    }
    fn symlink(&self, t: &Path, l: &Path) -> io::Result<()> {
        self.existing.lock().unwrap().push(l.into());
        self.rec(Call::Symlink(t.into(), l.into()), Some(l))
    }
    fn sethostname(&self, n: &str) -> io::Result<()> {
        self.rec(Call::Sethostname(n.into()), None)
    }
    fn setns(&self, fd: RawFd, t: i32) -> io::Result<()> {
        self.rec(Call::Setns(fd, t), None)
    }
    fn unshare(&self, f: i32) -> io::Result<()> {
        self.rec(Call::Unshare(f), None)
    }
    fn set_no_new_privs(&self) -> io::Result<()> {
        self.rec(Call::NoNewPrivs, None)
    }
    fn set_capabilities(&self, caps: &CapSet) -> io::Result<()> {
        self.rec(Call::Caps(*caps), None)
    }
    fn set_affinity(&self, cpus: &[usize]) -> io::Result<()> {
        self.rec(Call::Affinity(cpus.to_vec()), None)
    }
    fn set_ids(&self, uid: u32, gid: u32, _g: &[u32]) -> io::Result<()> {
        self.rec(Call::SetIds(uid, gid), None)
    }
    fn sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        self.rec(Call::Sysctl(key.into(), value.into()), None)
    }
    fn idmap_mount(&self, src: &Path, target: &Path, userns: RawFd) -> io::Result<()> {
        self.rec(
            Call::IdmapMount(src.to_path_buf(), target.to_path_buf(), userns),
            Some(target),
        )
    }
    fn seccomp(&self, progs: &crate::seccomp::Programs) -> io::Result<()> {
        self.rec(Call::Seccomp(progs.len()), None)
    }
    fn pin_in_root(&self, root: &Path, path: &str) -> io::Result<crate::syscall::Pinned> {
        Ok(crate::syscall::Pinned {
            path: root.join(path.trim_start_matches('/')),
            fd: None,
        })
    }
    fn sysinfo_listener(&self) -> io::Result<RawFd> {
        self.rec(Call::SysinfoFilter, None).map(|_| 99)
    }
    fn loopback_up(&self) -> io::Result<()> {
        self.rec(Call::LoopbackUp, None)
    }
    fn exists(&self, p: &Path) -> bool {
        self.existing.lock().unwrap().iter().any(|e| e == p)
    }
    fn is_dir(&self, p: &Path) -> bool {
        self.dirs.lock().unwrap().iter().any(|e| e == p)
    }
    fn start_supervisor(&self, spec: ShimSpec) -> Result<Started, ShimError> {
        let call = Call::StartSupervisor {
            state_dir: spec.state_dir.clone(),
            clone_flags: crate::init::clone_flags(&spec.init),
            join_netns: spec.init.join_netns.clone(),
            config_recorded: spec.state_dir.join("config.json").is_file(),
            sync_meanwhile: spec.sync_meanwhile.clone(),
            init_layer: spec.init.rootfs.init_layer.clone(),
            scratch: spec.init.rootfs.scratch.clone(),
        };
        self.rec(call, Some(&spec.state_dir))
            .map_err(ShimError::Spawn)?;
        crate::shim::sync_durable(&spec.sync_meanwhile)?;
        Ok(Started {
            shim_pid: 0,
            init_pid: 0,
        })
    }
}
