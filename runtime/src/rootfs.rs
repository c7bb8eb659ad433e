//! A container's root filesystem: overlayfs over the image layers with a per-container init
//! layer (`/etc/hosts`, `/etc/resolv.conf`, `/etc/hostname`, mount points) and upper/work dirs,
//! then `/proc`, a minimal `/dev`, a read-only `/sys`, masked and read-only paths as Docker
//! does, the honest `/proc` files, and `pivot_root`.
//!
//! The init layer and the overlay's mount point live on a scratch tmpfs that the init mounts in
//! its own mount namespace: nothing of them is on the host's disk, nothing has to be removed
//! (the tmpfs goes with the namespace), and the host's mount table never sees it. Only the
//! upper and work dirs are on disk: they hold what the container writes.

use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use crate::state::Volume;
use crate::syscall::{Mount, Pinned, Syscall};

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("mounting {what} on {target}: {source}")]
    Mount {
        what: String,
        target: PathBuf,
        source: io::Error,
    },
    #[error("{step} {path}: {source}")]
    Step {
        step: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("overlay mount options are {len} bytes, over the kernel's page-size limit (too many layers)")]
    TooManyLayers { len: usize },
    /// `path` as the container sees it (the layer is on the init's scratch tmpfs, a path the
    /// host never shows).
    #[error("writing the init layer: {path} in the container: {source}")]
    InitLayer { path: PathBuf, source: io::Error },
    /// The layers could not be shifted to the container's user namespace. EINVAL or
    /// EOPNOTSUPP here mean the kernel (before 5.12) or the filesystem holding the layer
    /// cannot make idmapped mounts; without them the image's files would belong to nobody
    /// inside, so the container is not started.
    #[error(
        "--userns: idmapped mount of layer {lower} on {target}: {source} (needs Linux 5.19+ and \
         a layer filesystem with idmapped mounts: ext4, xfs, btrfs, tmpfs 6.3+)"
    )]
    Idmap {
        lower: PathBuf,
        target: PathBuf,
        source: io::Error,
    },
    /// A volume under `--userns` is mounted idmapped, so that its host owners read the same
    /// inside; a plain bind would show every file as nobody and write new ones as the mapped
    /// ids. When its filesystem cannot do that, the container is not started.
    #[error(
        "--userns: volume {host} (on {container}) cannot be idmapped: {source} (its filesystem \
         needs idmapped mounts: ext4, xfs, btrfs, tmpfs 6.3+; not NFS, FUSE, ramfs); move the \
         volume or run without --userns"
    )]
    IdmapVolume {
        host: PathBuf,
        container: PathBuf,
        source: io::Error,
    },
}

/// Docker's masked paths (hidden with /dev/null or an empty read-only tmpfs).
pub const MASKED: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Docker's read-only paths.
pub const READONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Device nodes of the minimal /dev: (name, major, minor).
pub const DEVICES: &[(&str, u32, u32)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

const NOSUID: libc::c_ulong = libc::MS_NOSUID;
const NODEV: libc::c_ulong = libc::MS_NODEV;
const NOEXEC: libc::c_ulong = libc::MS_NOEXEC;
const RDONLY: libc::c_ulong = libc::MS_RDONLY;
const BIND: libc::c_ulong = libc::MS_BIND;
const REC: libc::c_ulong = libc::MS_REC;
const REMOUNT: libc::c_ulong = libc::MS_REMOUNT;
const PRIVATE: libc::c_ulong = libc::MS_PRIVATE;
const STRICTATIME: libc::c_ulong = libc::MS_STRICTATIME;

/// What the init needs to build the root filesystem.
#[derive(Debug, Clone)]
pub struct RootfsSpec {
    /// An existing directory the init mounts its scratch tmpfs on (in its own mount namespace):
    /// the init layer goes to `init/`, the overlay's mount point is `merged/`, the idmapped
    /// lowers of `--userns` are under `idmap/`. Shared by every container: each sees its own.
    pub scratch: PathBuf,
    /// The files of the init layer, written on the scratch tmpfs; topmost lower.
    pub init_layer: InitLayer,
    /// Owner of the init layer's files: host root, or under `--userns` the container's root
    /// (its mapped ids; the init layer is not idmapped, so tmpfs idmapping is not needed).
    pub init_owner: (u32, u32),
    /// The image's lower dirs, topmost first.
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub volumes: Vec<Volume>,
    /// Files bind-mounted over /proc/meminfo, /proc/cpuinfo, /sys/devices/system/cpu/online.
    pub meminfo: Option<PathBuf>,
    pub cpuinfo: Option<PathBuf>,
    pub cpu_online: Option<PathBuf>,
    /// `--privileged`: no masked or read-only paths, /sys writable.
    pub privileged: bool,
}

impl RootfsSpec {
    /// The overlay's mount point, the container's root until the pivot.
    pub fn merged(&self) -> PathBuf {
        self.scratch.join("merged")
    }
    pub fn init_dir(&self) -> PathBuf {
        self.scratch.join("init")
    }
}

/// Size cap of the scratch tmpfs: the init layer is a few small files, but `/etc/hosts` of a
/// host-network container is the host's, and blocklist-style hosts files run to tens of MiB.
/// Pages are only used as written, and the container cannot write here (it is a lower layer).
const SCRATCH_SIZE: &str = "size=128m,nr_inodes=4096";

/// Mounts each lower dir idmapped through the container's user namespace under `dir`, and
/// returns the spec with those as its lowers. Image files owned by host root are then owned by
/// the container's root, so copy-up and permission checks inside work as without a user
/// namespace. The upper dir is left plain: what the container writes lands on the host owned
/// by its mapped ids.
fn idmap_lowers(
    sys: &dyn Syscall,
    spec: &RootfsSpec,
    dir: &Path,
    userns_fd: RawFd,
) -> Result<RootfsSpec, RootfsError> {
    let mut lowers = Vec::with_capacity(spec.lowers.len());
    for (i, lower) in spec.lowers.iter().enumerate() {
        let target = dir.join(i.to_string());
        sys.mkdir_all(&target, 0o700)
            .map_err(|source| RootfsError::Step {
                step: "mkdir",
                path: target.clone(),
                source,
            })?;
        sys.idmap_mount(lower, &target, userns_fd)
            .map_err(|source| RootfsError::Idmap {
                lower: lower.clone(),
                target: target.clone(),
                source,
            })?;
        lowers.push(target);
    }
    Ok(RootfsSpec {
        lowers,
        ..spec.clone()
    })
}

/// The overlay mount's data string.
/// The init layer comes first (topmost), then the image's lowers.
pub fn overlay_options(init: &Path, spec: &RootfsSpec) -> Result<String, RootfsError> {
    let lowers: Vec<String> = std::iter::once(init)
        .chain(spec.lowers.iter().map(PathBuf::as_path))
        .map(|p| escape_overlay(&p.to_string_lossy()))
        .collect();
    let s = format!(
        "lowerdir={},upperdir={},workdir={},index=off,redirect_dir=off,metacopy=off,volatile",
        lowers.join(":"),
        escape_overlay(&spec.upper.to_string_lossy()),
        escape_overlay(&spec.work.to_string_lossy()),
    );
    // The kernel copies at most one page of mount data.
    if s.len() >= 4096 {
        return Err(RootfsError::TooManyLayers { len: s.len() });
    }
    Ok(s)
}

fn escape_overlay(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace(':', "\\:")
        .replace(',', "\\,")
}

fn join(root: &Path, abs: &str) -> PathBuf {
    root.join(abs.trim_start_matches('/'))
}

fn mount(sys: &dyn Syscall, m: Mount, what: &str) -> Result<(), RootfsError> {
    sys.mount(&m).map_err(|source| RootfsError::Mount {
        what: what.to_string(),
        target: m.target.clone(),
        source,
    })
}

fn step<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> RootfsError + 'a {
    move |source| RootfsError::Step {
        step,
        path: path.to_path_buf(),
        source,
    }
}

/// `abs` resolved inside `root` (see [`Syscall::pin_in_root`]): an image cannot turn a mount
/// target into a host path with a symlink (`/proc -> /etc` or `../../..` tricks).
fn pin(sys: &dyn Syscall, root: &Path, abs: &str) -> Result<Pinned, RootfsError> {
    sys.pin_in_root(root, abs)
        .map_err(|source| RootfsError::Step {
            step: "resolving inside the container's root",
            path: PathBuf::from(abs),
            source,
        })
}

/// Builds the container's filesystem and pivots into it. Runs in the container's new mount
/// namespace. Every target inside the root is resolved inside it right before its mount.
pub fn setup(
    sys: &dyn Syscall,
    spec: &RootfsSpec,
    userns_fd: Option<RawFd>,
) -> Result<(), RootfsError> {
    let merged = spec.merged();
    let root = &merged;
    // Nothing we mount may propagate back to the host, nor host mounts in.
    mount(
        sys,
        Mount::new("/").flags(REC | PRIVATE),
        "private propagation",
    )?;
    // After the line above: the host never sees this tmpfs, and it is freed with our mount
    // namespace (the overlay keeps it alive past the pivot).
    mount(
        sys,
        Mount::new(&spec.scratch)
            .source("tmpfs")
            .fstype("tmpfs")
            .flags(NOSUID | NODEV | NOEXEC)
            .data(format!("mode=0700,{SCRATCH_SIZE}")),
        "scratch tmpfs",
    )?;
    let init = spec.init_dir();
    write_init_layer(sys, &init, &spec.init_layer, spec.init_owner)?;
    sys.mkdir_all(root, 0o700).map_err(step("mkdir", root))?;
    let idmapped;
    let spec = match userns_fd {
        Some(fd) => {
            idmapped = idmap_lowers(sys, spec, &spec.scratch.join("idmap"), fd)?;
            &idmapped
        }
        None => spec,
    };
    // nodev: a device node in the image or made inside opens nothing (the device cgroup is the
    // second line); only the /dev tmpfs below holds devices.
    mount(
        sys,
        Mount::new(root)
            .source("overlay")
            .fstype("overlay")
            .flags(NODEV)
            .data(overlay_options(&init, spec)?),
        "overlay",
    )?;

    for v in &spec.volumes {
        let c = v.container.to_string_lossy();
        let t = pin(sys, root, &c)?;
        match userns_fd {
            // Host uid N reads and writes as container uid N (Podman's `:idmap` with the
            // container's own mapping). Not recursive: mounts below the host directory are
            // not carried in (each would have to support idmapping too).
            Some(fd) => sys.idmap_mount(&v.host, &t.path, fd).map_err(|source| {
                RootfsError::IdmapVolume {
                    host: v.host.clone(),
                    container: v.container.clone(),
                    source,
                }
            })?,
            None => mount(
                sys,
                Mount::new(&t.path).source(&v.host).flags(BIND | REC),
                &format!("volume {}", v.host.display()),
            )?,
        }
        if v.readonly {
            // Pinned again: the first pin names the directory under the new mount.
            let t = pin(sys, root, &c)?;
            mount(
                sys,
                Mount::new(&t.path).flags(BIND | REC | REMOUNT | RDONLY),
                "read-only volume",
            )?;
        }
    }

    let proc_ = pin(sys, root, "/proc")?;
    mount(
        sys,
        Mount::new(&proc_.path)
            .source("proc")
            .fstype("proc")
            .flags(NOSUID | NODEV | NOEXEC),
        "proc",
    )?;

    let dev_mp = pin(sys, root, "/dev")?;
    mount(
        sys,
        Mount::new(&dev_mp.path)
            .source("tmpfs")
            .fstype("tmpfs")
            .flags(NOSUID | STRICTATIME)
            .data("mode=755,size=65536k"),
        "/dev tmpfs",
    )?;
    // The tmpfs root, ours from here on.
    let dev_fd = pin(sys, root, "/dev")?;
    let dev = &dev_fd.path;
    for (name, major, minor) in DEVICES {
        let p = dev.join(name);
        sys.mknod(&p, libc::S_IFCHR | 0o666, libc::makedev(*major, *minor))
            .map_err(step("mknod", &p))?;
    }
    for d in ["pts", "shm", "mqueue"] {
        sys.mkdir_all(&dev.join(d), 0o755)
            .map_err(step("mkdir", dev))?;
    }
    mount(
        sys,
        Mount::new(dev.join("pts"))
            .source("devpts")
            .fstype("devpts")
            .flags(NOSUID | NOEXEC)
            .data("newinstance,ptmxmode=0666,mode=0620,gid=5"),
        "devpts",
    )?;
    mount(
        sys,
        Mount::new(dev.join("shm"))
            .source("shm")
            .fstype("tmpfs")
            .flags(NOSUID | NODEV | NOEXEC)
            .data("mode=1777,size=65536k"),
        "/dev/shm",
    )?;
    mount(
        sys,
        Mount::new(dev.join("mqueue"))
            .source("mqueue")
            .fstype("mqueue")
            .flags(NOSUID | NODEV | NOEXEC),
        "mqueue",
    )?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let l = dev.join(link);
        sys.symlink(Path::new(target), &l)
            .map_err(step("symlink", &l))?;
    }

    let sys_ = pin(sys, root, "/sys")?;
    let sys_ro = if spec.privileged { 0 } else { RDONLY };
    mount(
        sys,
        Mount::new(&sys_.path)
            .source("sysfs")
            .fstype("sysfs")
            .flags(NOSUID | NODEV | NOEXEC | sys_ro),
        "sysfs",
    )?;

    // The honest /proc: files the supervisor keeps current.
    for (src, dst) in [
        (&spec.meminfo, "/proc/meminfo"),
        (&spec.cpuinfo, "/proc/cpuinfo"),
        (&spec.cpu_online, "/sys/devices/system/cpu/online"),
    ] {
        if let Some(src) = src {
            if sys.exists(&join(root, dst)) {
                let t = pin(sys, root, dst)?;
                mount(sys, Mount::new(&t.path).source(src).flags(BIND), dst)?;
                let t = pin(sys, root, dst)?;
                mount(
                    sys,
                    Mount::new(&t.path).flags(BIND | REMOUNT | RDONLY | NOSUID | NODEV | NOEXEC),
                    dst,
                )?;
            }
        }
    }

    if !spec.privileged {
        let null = dev.join("null");
        for p in MASKED {
            let t = join(root, p);
            if !sys.exists(&t) {
                continue;
            }
            let is_dir = sys.is_dir(&t);
            let t = pin(sys, root, p)?;
            if is_dir {
                mount(
                    sys,
                    Mount::new(&t.path)
                        .source("tmpfs")
                        .fstype("tmpfs")
                        .flags(RDONLY)
                        .data("size=0"),
                    p,
                )?;
            } else {
                mount(sys, Mount::new(&t.path).source(&null).flags(BIND), p)?;
            }
        }
        for p in READONLY {
            if !sys.exists(&join(root, p)) {
                continue;
            }
            let t = pin(sys, root, p)?;
            mount(
                sys,
                Mount::new(&t.path).source(&t.path).flags(BIND | REC),
                p,
            )?;
            let t = pin(sys, root, p)?;
            mount(
                sys,
                Mount::new(&t.path).flags(BIND | REC | REMOUNT | RDONLY | NOSUID | NODEV | NOEXEC),
                p,
            )?;
        }
    }
    drop((proc_, dev_mp, dev_fd, sys_));

    // pivot_root(".", ".") stacks the old root on the new one; unmounting "." then drops it.
    sys.chdir(root).map_err(step("chdir", root))?;
    sys.pivot_root(Path::new("."), Path::new("."))
        .map_err(step("pivot_root", root))?;
    sys.umount2(Path::new("."), libc::MNT_DETACH)
        .map_err(step("unmount old root", root))?;
    sys.chdir(Path::new("/"))
        .map_err(step("chdir", Path::new("/")))?;
    Ok(())
}

/// The files of the init layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InitLayer {
    pub hostname: String,
    pub hosts: String,
    pub resolv_conf: String,
    /// Volume targets, created so that the image's own paths are never changed for them.
    pub mount_dirs: Vec<PathBuf>,
    pub mount_files: Vec<PathBuf>,
}

/// Paths of the init layer that `commit` leaves out of the writable layer.
pub const INIT_FILES: &[&str] = &["etc/hosts", "etc/hostname", "etc/resolv.conf"];

/// `/etc/hosts` for a container with addresses `ips`.
pub fn render_hosts(hostname: &str, ips: &[String]) -> String {
    let mut s = String::from(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n",
    );
    for ip in ips {
        s.push_str(&format!("{ip}\t{hostname}\n"));
    }
    s
}

/// A container's `/etc/resolv.conf` from the host's, without loopback resolvers (they are the
/// host's own, unreachable from another network namespace) unless the container shares the
/// host's network.
pub fn render_resolv(host: &str, keep_loopback: bool, dns: &[String], search: &[String]) -> String {
    if !dns.is_empty() {
        let mut s = String::new();
        if !search.is_empty() {
            s.push_str(&format!("search {}\n", search.join(" ")));
        }
        for d in dns {
            s.push_str(&format!("nameserver {d}\n"));
        }
        return s;
    }
    host.lines()
        .filter(|l| {
            let mut w = l.split_whitespace();
            match (w.next(), w.next()) {
                (Some("nameserver"), Some(ip)) => {
                    keep_loopback || !(ip.starts_with("127.") || ip == "::1")
                }
                _ => true,
            }
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Writes the init layer under `dir` (on the scratch tmpfs, which holds nothing else an image
/// or a user controls: no symlink can redirect these writes), every entry owned by `owner`.
fn write_init_layer(
    sys: &dyn Syscall,
    dir: &Path,
    l: &InitLayer,
    owner: (u32, u32),
) -> Result<(), RootfsError> {
    let err = |p: &Path| {
        let p = Path::new("/").join(p.strip_prefix(dir).unwrap_or(p));
        move |source| RootfsError::InitLayer { path: p, source }
    };
    let own = |p: &Path, mode: u32| sys.set_owner(p, owner, mode).map_err(err(p));
    // Every directory from `dir` down to `p` that is not there yet, made and given to `owner`
    // with its mode set whatever the umask.
    let mkdirs = |p: &Path| -> Result<(), RootfsError> {
        let mut missing: Vec<&Path> = p
            .ancestors()
            .take_while(|a| a.starts_with(dir) && !sys.is_dir(a))
            .collect();
        missing.reverse();
        for d in missing {
            sys.mkdir_all(d, 0o755).map_err(err(d))?;
            own(d, 0o755)?;
        }
        Ok(())
    };
    for d in ["etc", "proc", "sys", "dev"] {
        mkdirs(&dir.join(d))?;
    }
    for (f, content) in [
        ("etc/hostname", format!("{}\n", l.hostname)),
        ("etc/hosts", l.hosts.clone()),
        ("etc/resolv.conf", l.resolv_conf.clone()),
    ] {
        let p = dir.join(f);
        sys.write_file(&p, content.as_bytes()).map_err(err(&p))?;
        own(&p, 0o644)?;
    }
    for d in &l.mount_dirs {
        mkdirs(&dir.join(d.strip_prefix("/").unwrap_or(d)))?;
    }
    for f in &l.mount_files {
        let p = dir.join(f.strip_prefix("/").unwrap_or(f));
        if let Some(parent) = p.parent() {
            mkdirs(parent)?;
        }
        sys.write_file(&p, b"").map_err(err(&p))?;
        own(&p, 0o644)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscall::fake::{Call, FakeSyscall};
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn spec() -> RootfsSpec {
        RootfsSpec {
            scratch: "/c".into(),
            init_layer: InitLayer::default(),
            init_owner: (0, 0),
            lowers: vec!["/l/top".into(), "/l/bottom".into()],
            upper: "/c/upper".into(),
            work: "/c/work".into(),
            volumes: vec![Volume {
                host: "/data".into(),
                container: "/mnt/data".into(),
                readonly: true,
            }],
            meminfo: Some("/s/meminfo".into()),
            cpuinfo: None,
            cpu_online: Some("/s/online".into()),
            privileged: false,
        }
    }

    fn mounts(calls: &[Call]) -> Vec<Mount> {
        calls
            .iter()
            .filter_map(|c| match c {
                Call::Mount(m) => Some(m.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn overlay_data_orders_layers_top_first() {
        assert_eq!(
            overlay_options(Path::new("/c/init"), &spec()).unwrap(),
            "lowerdir=/c/init:/l/top:/l/bottom,upperdir=/c/upper,workdir=/c/work,index=off,redirect_dir=off,metacopy=off,volatile"
        );
        let mut s = spec();
        s.lowers = (0..100)
            .map(|i| PathBuf::from(format!("/var/lib/tweed/layers/{i:064}")))
            .collect();
        assert!(matches!(
            overlay_options(Path::new("/c/init"), &s),
            Err(RootfsError::TooManyLayers { .. })
        ));
        assert_eq!(escape_overlay("/a:b,c"), "/a\\:b\\,c");
    }

    #[test]
    fn userns_builds_the_overlay_from_idmapped_lowers() {
        let sys = FakeSyscall::new();
        let sp = spec();
        setup(&sys, &sp, Some(9)).unwrap();
        let calls = sys.calls();
        let pos = |want: &dyn Fn(&Call) -> bool| calls.iter().position(want).unwrap();
        let private = pos(&|c| matches!(c, Call::Mount(m) if m.target == Path::new("/")));
        let overlay =
            pos(&|c| matches!(c, Call::Mount(m) if m.fstype.as_deref() == Some("overlay")));
        let idmaps: Vec<(usize, &Call)> = calls
            .iter()
            .enumerate()
            .filter(|(_, c)| matches!(c, Call::IdmapMount(..)))
            .collect();
        // The image's two lowers (not the init layer: it is written owned by the mapped root,
        // so tmpfs needs no idmap support), then the volume.
        assert_eq!(idmaps.len(), 3);
        for (i, (at, c)) in idmaps[..2].iter().enumerate() {
            // After private propagation (the staging mounts must not reach the host), before
            // the overlay that uses them.
            assert!(private < *at && *at < overlay);
            assert_eq!(
                **c,
                Call::IdmapMount(
                    sp.lowers[i].clone(),
                    PathBuf::from(format!("/c/idmap/{i}")),
                    9
                )
            );
        }
        let Call::Mount(m) = &calls[overlay] else {
            unreachable!()
        };
        assert!(
            m.data
                .as_deref()
                .unwrap()
                .starts_with("lowerdir=/c/init:/c/idmap/0:/c/idmap/1,upperdir=/c/upper,"),
            "{m:?}"
        );
        // The volume: idmapped through the same namespace (no plain bind of it), on its pinned
        // target inside the overlay, then made read-only, all before /proc.
        let (vol_at, vol) = idmaps[2];
        assert_eq!(
            *vol,
            Call::IdmapMount("/data".into(), "/c/merged/mnt/data".into(), 9)
        );
        assert!(overlay < vol_at);
        assert!(!calls.iter().any(
            |c| matches!(c, Call::Mount(m) if m.source.as_deref() == Some(Path::new("/data")))
        ));
        let ro = pos(&|c| {
            matches!(c, Call::Mount(m) if m.target == Path::new("/c/merged/mnt/data")
                && m.flags & (REMOUNT | RDONLY) == REMOUNT | RDONLY)
        });
        let proc_ = pos(&|c| matches!(c, Call::Mount(m) if m.fstype.as_deref() == Some("proc")));
        assert!(vol_at < ro && ro < proc_);
        // Without a namespace fd nothing is idmapped; the volume is a plain recursive bind.
        let sys = FakeSyscall::new();
        setup(&sys, &sp, None).unwrap();
        assert!(!sys
            .calls()
            .iter()
            .any(|c| matches!(c, Call::IdmapMount(..))));
        assert!(mounts(&sys.calls())
            .iter()
            .any(|m| m.source.as_deref() == Some(Path::new("/data")) && m.flags == BIND | REC));
    }

    /// A volume whose filesystem cannot be idmapped stops the setup right there, naming the
    /// volume: no plain bind instead (its files would be nobody's inside), no later mount and
    /// no pivot. Nothing needs undoing: the mounts so far live in the init's own mount
    /// namespace, which goes with it.
    #[test]
    fn a_volume_that_cannot_be_idmapped_fails_naming_it() {
        let mut sys = FakeSyscall::new();
        sys.fail_on = Some("/c/merged/mnt/data".into());
        let sp = spec();
        let e = setup(&sys, &sp, Some(9)).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(&e, RootfsError::IdmapVolume { host, container, .. }
                if host == Path::new("/data") && container == Path::new("/mnt/data")),
            "{msg}"
        );
        assert!(
            msg.contains("/data") && msg.contains("idmapped") && msg.contains("--userns"),
            "{msg}"
        );
        let calls = sys.calls();
        assert!(matches!(
            calls.last(),
            Some(Call::IdmapMount(src, _, 9)) if src == Path::new("/data")
        ));
        assert!(!calls.iter().any(|c| matches!(c, Call::PivotRoot(..))));
        assert!(!mounts(&calls)
            .iter()
            .any(|m| m.source.as_deref() == Some(Path::new("/data"))
                || m.fstype.as_deref() == Some("proc")));
    }

    #[test]
    fn setup_mounts_in_order_and_pivots() {
        let sys = FakeSyscall::with_existing(
            &[
                "/c/merged/proc/meminfo",
                "/c/merged/proc/kcore",
                "/c/merged/sys/devices/system/cpu/online",
            ],
            &["/c/merged/proc/sys", "/c/merged/proc/acpi"],
        );
        setup(&sys, &spec(), None).unwrap();
        let calls = sys.calls();
        let ms = mounts(&calls);
        assert_eq!(ms[0].target, PathBuf::from("/"));
        assert_eq!(ms[0].flags, REC | PRIVATE);
        // The scratch tmpfs, after private propagation: the host never sees it.
        assert_eq!(ms[1].fstype.as_deref(), Some("tmpfs"));
        assert_eq!(ms[1].target, PathBuf::from("/c"));
        assert_eq!(ms[1].flags, NOSUID | NODEV | NOEXEC);
        // The init layer is written on it before the overlay that uses it.
        let overlay_at = calls
            .iter()
            .position(|c| matches!(c, Call::Mount(m) if m.fstype.as_deref() == Some("overlay")))
            .unwrap();
        let hostname_at = calls
            .iter()
            .position(
                |c| matches!(c, Call::WriteFile(p, _) if p == Path::new("/c/init/etc/hostname")),
            )
            .unwrap();
        assert!(hostname_at < overlay_at);
        assert_eq!(ms[2].fstype.as_deref(), Some("overlay"));
        assert_eq!(ms[2].target, PathBuf::from("/c/merged"));
        // The read-only volume: bind, then remount read-only.
        assert_eq!(ms[3].source, Some(PathBuf::from("/data")));
        assert_eq!(ms[3].target, PathBuf::from("/c/merged/mnt/data"));
        assert_ne!(ms[4].flags & RDONLY, 0);
        assert_eq!(ms[5].fstype.as_deref(), Some("proc"));
        let by_target = |t: &str| {
            ms.iter()
                .filter(|m| m.target == Path::new(t))
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(by_target("/c/merged/sys")[0].flags & RDONLY, RDONLY);
        assert_eq!(
            by_target("/c/merged/dev/pts")[0].fstype.as_deref(),
            Some("devpts")
        );
        assert_eq!(
            by_target("/c/merged/dev/shm")[0].fstype.as_deref(),
            Some("tmpfs")
        );
        // Honest /proc: meminfo bound (it exists), cpuinfo not configured.
        assert_eq!(
            by_target("/c/merged/proc/meminfo")[0].source,
            Some(PathBuf::from("/s/meminfo"))
        );
        assert!(by_target("/c/merged/proc/cpuinfo").is_empty());
        assert_eq!(
            by_target("/c/merged/sys/devices/system/cpu/online").len(),
            2
        );
        // Masked: the file gets /dev/null, the directory an empty tmpfs; absent ones nothing.
        assert_eq!(
            by_target("/c/merged/proc/kcore")[0].source,
            Some(PathBuf::from("/c/merged/dev/null"))
        );
        assert_eq!(
            by_target("/c/merged/proc/acpi")[0].fstype.as_deref(),
            Some("tmpfs")
        );
        assert!(by_target("/c/merged/proc/keys").is_empty());
        // Read-only: bind + remount ro.
        let ps = by_target("/c/merged/proc/sys");
        assert_eq!(ps.len(), 2);
        assert_ne!(ps[1].flags & RDONLY, 0);
        // Devices.
        let nods: Vec<_> = calls
            .iter()
            .filter(|c| matches!(c, Call::Mknod(..)))
            .collect();
        assert_eq!(nods.len(), DEVICES.len());
        // Pivot last.
        let n = calls.len();
        assert_eq!(calls[n - 4], Call::Chdir("/c/merged".into()));
        assert_eq!(calls[n - 3], Call::PivotRoot(".".into(), ".".into()));
        assert_eq!(calls[n - 2], Call::Umount(".".into(), libc::MNT_DETACH));
        assert_eq!(calls[n - 1], Call::Chdir("/".into()));
    }

    #[test]
    fn a_failing_mount_names_its_target() {
        let mut sys = FakeSyscall::new();
        sys.fail_on = Some("/c/merged/proc".into());
        let e = setup(&sys, &spec(), None).unwrap_err();
        assert!(e.to_string().contains("proc"), "{e}");
        assert!(!sys.calls().iter().any(|c| matches!(c, Call::PivotRoot(..))));
    }

    #[test]
    fn hosts_and_resolv() {
        let h = render_hosts("web", &["10.1.0.5".into()]);
        assert!(h.starts_with("127.0.0.1\tlocalhost\n"));
        assert!(h.ends_with("10.1.0.5\tweb\n"));
        let host = "search lan\nnameserver 127.0.0.53\nnameserver 192.0.2.1\noptions edns0\n";
        assert_eq!(
            render_resolv(host, false, &[], &[]),
            "search lan\nnameserver 192.0.2.1\noptions edns0\n"
        );
        assert_eq!(render_resolv(host, true, &[], &[]), host);
        assert_eq!(
            render_resolv(host, false, &["10.0.0.10".into()], &["svc".into()]),
            "search svc\nnameserver 10.0.0.10\n"
        );
    }

    fn layer() -> InitLayer {
        InitLayer {
            hostname: "h1".into(),
            hosts: "127.0.0.1 localhost\n".into(),
            resolv_conf: "".into(),
            mount_dirs: vec!["/mnt/data".into()],
            mount_files: vec!["/etc/app.conf".into()],
        }
    }

    #[test]
    fn init_layer_files() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("init");
        // Owned by whoever runs the test: a chown that needs no privilege.
        let me = fs::metadata(t.path()).unwrap();
        let r = write_init_layer(
            &crate::syscall::LinuxSyscall,
            &dir,
            &layer(),
            (me.uid(), me.gid()),
        );
        r.unwrap();
        assert_eq!(fs::metadata(dir.join("mnt/data")).unwrap().uid(), me.uid());
        assert_eq!(
            fs::read_to_string(dir.join("etc/hostname")).unwrap(),
            "h1\n"
        );
        assert!(dir.join("mnt/data").is_dir());
        assert!(dir.join("etc/app.conf").is_file());
        assert!(dir.join("proc").is_dir());
        let mode = |p: &str| fs::metadata(dir.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("etc"), 0o755);
        assert_eq!(mode("mnt"), 0o755);
        assert_eq!(mode("etc/hosts"), 0o644);
    }

    /// Under `--userns` every entry of the init layer, intermediate directories of volume
    /// targets too, belongs to the container's root (the mapped ids).
    #[test]
    fn init_layer_belongs_to_its_owner() {
        let sys = FakeSyscall::new();
        write_init_layer(&sys, Path::new("/s/init"), &layer(), (100000, 100000)).unwrap();
        let calls = sys.calls();
        let made: Vec<&PathBuf> = calls
            .iter()
            .filter_map(|c| match c {
                Call::MkdirAll(p) | Call::WriteFile(p, _) => Some(p),
                _ => None,
            })
            .collect();
        for p in [
            "/s/init",
            "/s/init/etc",
            "/s/init/mnt",
            "/s/init/mnt/data",
            "/s/init/etc/app.conf",
        ] {
            assert!(made.contains(&&PathBuf::from(p)), "{p} not made: {made:?}");
        }
        for p in made {
            assert!(
                calls
                    .iter()
                    .any(|c| matches!(c, Call::SetOwner(q, (100000, 100000), _) if q == p)),
                "{} not given to the container's root",
                p.display()
            );
        }
    }

    /// A volume target under a file of the init layer: the error names the path.
    #[test]
    fn a_failed_init_layer_names_the_path() {
        let sys = FakeSyscall::new();
        let mut l = layer();
        l.mount_dirs = vec!["/etc/hostname/x".into()];
        let e = write_init_layer(&sys, Path::new("/s/init"), &l, (0, 0)).unwrap_err();
        assert!(
            matches!(&e, RootfsError::InitLayer { path, .. } if path == Path::new("/etc/hostname")),
            "{e}"
        );
        assert!(e.to_string().contains("init layer"), "{e}");
    }
}
