//! Starting a container from its [`Plan`]: named stages, each a function with its own error
//! and its own undo ([`Release`] steps), run in this order:
//!
//! ```text
//! reserve     name link, state dir                     undo: remove them
//! rootfs      layer dirs (upper, work)                 undo: remove them
//! cgroup      create it, write the limits              undo: kill what is left, remove it
//! network     pinned netns, CNI ADD (overlay only)     undo: CNI DEL, unpin the netns
//! init layer  hostname, hosts, resolv.conf (written by the init on its scratch tmpfs), the
//!             honest /proc files
//! record      config.json; lets go of the --userns choice's lock
//! start       the supervisor clones the init into its namespaces and completes the init
//!             handshake (in `shim`); a failed start leaves no process
//! ```
//!
//! The last three need no undo of their own: what they write lives in the state and layer
//! directories, and the supervisor kills and reaps an init that fails its handshake.
//!
//! The network comes before the clone because the init joins the pinned namespace and its
//! `/etc/hosts` names the address CNI gave. The record comes before the start because a `--rm`
//! container's supervisor reads it to clean up, maybe before `tweedctl` has returned.
//!
//! When a stage fails, the finished stages are undone in reverse order. The host is reached only
//! through a [`Host`]: kernel calls ([`Syscall`]: the netns pin and the supervisor's clone), the
//! container's cgroup ([`CgroupManager`]) and the CNI plugins ([`Cni`]), so the order and the
//! undo are unit-tested with fakes, without root.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::cgroup::{self, CgroupError, CgroupManager, DevicePolicy};
use crate::cni::{self, Attachment, Cni, CniError};
use crate::init::InitSpec;
use crate::netns::{self, NetnsError};
use crate::plan::Plan;
use crate::release::Release;
use crate::rootfs::{self, InitLayer, RootfsSpec};
use crate::runtime::Runtime;
use crate::shim::{self, ShimError, ShimSpec};
use crate::state::{self, CniRecord, ContainerConfig, NetMode, StateError};
use crate::syscall::Syscall;
use crate::{procview, timefmt};

/// The stages, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Reserve,
    Rootfs,
    Cgroup,
    Network,
    InitLayer,
    Record,
    Start,
}

/// Why a start failed; every variant names the stage, and the path or container it failed on.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the name {name:?} is already in use by container {other}")]
    NameInUse { name: String, other: String },
    #[error("{path}: {source}")]
    Reserve { path: PathBuf, source: io::Error },
    #[error("{path}: {source}")]
    Rootfs { path: PathBuf, source: io::Error },
    #[error("cgroup: {source}")]
    Cgroup { id: String, source: CgroupError },
    #[error(transparent)]
    Netns(NetnsError),
    #[error("network: {source}")]
    Cni { id: String, source: Box<CniError> },
    /// Writing `cni.json`.
    #[error(transparent)]
    NetworkRecord(StateError),
    #[error("{path}: {source}")]
    ProcFiles { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Record(StateError),
    #[error("starting the container: {source}")]
    Start { id: String, source: ShimError },
}

impl StartError {
    pub fn stage(&self) -> Stage {
        match self {
            StartError::NameInUse { .. } | StartError::Reserve { .. } => Stage::Reserve,
            StartError::Rootfs { .. } => Stage::Rootfs,
            StartError::Cgroup { .. } => Stage::Cgroup,
            StartError::Netns(_) | StartError::Cni { .. } | StartError::NetworkRecord(_) => {
                Stage::Network
            }
            StartError::ProcFiles { .. } => Stage::InitLayer,
            StartError::Record(_) => Stage::Record,
            StartError::Start { .. } => Stage::Start,
        }
    }
}

/// The host as a container start sees it.
pub struct Host<'a> {
    /// Kernel calls: the network namespace pin and the supervisor's clone.
    pub sys: &'a dyn Syscall,
    /// The new container's cgroup.
    pub cgroup: &'a dyn CgroupManager,
    pub cni: &'a Cni,
}

impl Runtime {
    /// Creates and starts the container `plan` describes; returns once its command runs. On
    /// failure nothing of it is left: the finished stages are undone, last first.
    pub fn start(&self, plan: &Plan, host: &Host<'_>) -> Result<(), StartError> {
        let id = &plan.config.id;
        let mut s = Starting {
            rt: self,
            plan,
            host,
            state_dir: self.paths.state_dir(id),
            data_dir: self.paths.data_dir(id),
            undo: Vec::new(),
        };
        s.reserve()?;
        s.rootfs()?;
        crate::process::mark("run: dirs made");
        s.cgroup()?;
        crate::process::mark("run: cgroup made");
        let net = s.network()?;
        let views = s.init_layer(&net)?;
        crate::process::mark("run: init layer written");
        s.record()?;
        crate::process::mark("run: recorded");
        s.start(views)?;
        s.undo.clear();
        Ok(())
    }
}

/// A start under way: the undo steps of the finished stages, run in reverse on drop unless the
/// start got through.
struct Starting<'a> {
    rt: &'a Runtime,
    plan: &'a Plan,
    host: &'a Host<'a>,
    state_dir: PathBuf,
    data_dir: PathBuf,
    undo: Vec<Release<'a>>,
}

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        while let Some(step) = self.undo.pop() {
            // Best effort: the start's own error is the one to report.
            let _ = step.run();
        }
    }
}

/// What the network stage hands on: the addresses and DNS settings CNI gave.
#[derive(Debug, Default)]
struct Attached {
    ips: Vec<String>,
    nameservers: Vec<String>,
    search: Vec<String>,
}

/// The init layer the init writes, the files it bind-mounts over `/proc` and `/sys`, and the
/// supervisor's template for refreshing meminfo.
#[derive(Debug, Default)]
struct ProcViews {
    init_layer: InitLayer,
    meminfo_template: Option<String>,
    meminfo: Option<PathBuf>,
    cpuinfo: Option<PathBuf>,
    cpu_online: Option<PathBuf>,
}

fn io_at(
    path: &Path,
    variant: fn(PathBuf, io::Error) -> StartError,
) -> impl FnOnce(io::Error) -> StartError + '_ {
    move |source| variant(path.to_path_buf(), source)
}

impl<'a> Starting<'a> {
    fn config(&self) -> &'a ContainerConfig {
        &self.plan.config
    }

    /// The name (an atomic symlink, so two runs cannot both get it) and the state directory.
    fn reserve(&mut self) -> Result<(), StartError> {
        let reserve = |path, source| StartError::Reserve { path, source };
        let (id, name) = (&self.config().id, &self.config().name);
        let link = self.rt.paths.name_link(name);
        if let Err(e) = std::os::unix::fs::symlink(id, &link) {
            if e.kind() != io::ErrorKind::AlreadyExists {
                return Err(io_at(&link, reserve)(e));
            }
            let other = fs::read_link(&link)
                .map(|t| t.to_string_lossy().into_owned())
                .unwrap_or_default();
            if self.rt.paths.state_dir(&other).exists() {
                return Err(StartError::NameInUse {
                    name: name.clone(),
                    other,
                });
            }
            // A stale reservation (its container is gone): take it over.
            let _ = fs::remove_file(&link);
            std::os::unix::fs::symlink(id, &link).map_err(io_at(&link, reserve))?;
        }
        self.undo.push(Release::Name {
            link,
            id: id.clone(),
        });
        // The state holds the container's environment (secrets) and its output: root's alone.
        std::os::unix::fs::DirBuilderExt::mode(&mut fs::DirBuilder::new(), 0o700)
            .create(&self.state_dir)
            .map_err(io_at(&self.state_dir, reserve))?;
        self.undo.push(Release::Tree(self.state_dir.clone()));
        Ok(())
    }

    /// The overlay's directories on disk; the init mounts them in its own mount namespace,
    /// with its init layer and the mount point on its scratch tmpfs (no disk work for them).
    fn rootfs(&mut self) -> Result<(), StartError> {
        let rootfs = |path, source| StartError::Rootfs { path, source };
        let scratch = self.rt.paths.scratch();
        // Made once, shared by every container, never removed: each init mounts over it.
        if let Err(e) = std::os::unix::fs::DirBuilderExt::mode(&mut fs::DirBuilder::new(), 0o700)
            .create(&scratch)
        {
            if e.kind() != io::ErrorKind::AlreadyExists {
                return Err(rootfs(scratch, e));
            }
        }
        fs::create_dir(&self.data_dir).map_err(io_at(&self.data_dir, rootfs))?;
        self.undo.push(Release::Tree(self.data_dir.clone()));
        for d in ["upper", "work"] {
            let p = self.data_dir.join(d);
            fs::create_dir(&p).map_err(io_at(&p, rootfs))?;
        }
        if let Some(m) = &self.config().userns {
            // The upper dir is the overlay's root directory: it must be the container root's,
            // which is the mapped uid here (the lowers are idmapped by the init instead).
            let upper = self.data_dir.join("upper");
            std::os::unix::fs::chown(&upper, Some(m.uid.start), Some(m.gid.start))
                .map_err(io_at(&upper, rootfs))?;
        }
        Ok(())
    }

    /// The cgroup with its limits.
    fn cgroup(&mut self) -> Result<(), StartError> {
        let cg = self.host.cgroup;
        // Before create: removing a half-made cgroup is fine.
        self.undo.push(Release::Cgroup(cg));
        let err = |source| StartError::Cgroup {
            id: self.config().id.clone(),
            source,
        };
        cg.create().map_err(err)?;
        let policy = if self.config().security.privileged {
            DevicePolicy::All
        } else {
            DevicePolicy::Default
        };
        cg.devices(policy).map_err(err)?;
        cg.apply(&self.config().limits).map_err(err)
    }

    /// An overlay container's own network namespace, attached by the CNI plugins.
    fn network(&mut self) -> Result<Attached, StartError> {
        let Some(list) = &self.plan.network else {
            return Ok(Attached::default());
        };
        let id = &self.config().id;
        let ns = self.rt.paths.netns(id);
        netns::create(self.host.sys, &ns).map_err(StartError::Netns)?;
        self.undo.push(Release::Netns {
            sys: self.host.sys,
            path: ns.clone(),
        });
        let record = CniRecord {
            list: list.clone(),
            attachment: Attachment {
                container_id: id.clone(),
                netns: ns,
                ifname: "eth0".into(),
            },
            result: None,
        };
        let path = self.state_dir.join("cni.json");
        // Recorded before ADD so that DEL and GC always know the attachment.
        state::write_json(&path, &record).map_err(StartError::NetworkRecord)?;
        // A failed ADD has already DELeted what its plugins made.
        let result = self
            .host
            .cni
            .add(list, &record.attachment)
            .map_err(|e| StartError::Cni {
                id: id.clone(),
                source: Box::new(e),
            })?;
        let (nameservers, search) = cni::result_dns(&result);
        let ips = cni::result_ips(&result);
        let record = CniRecord {
            result: Some(result),
            ..record
        };
        self.undo.push(Release::Attachment {
            cni: self.host.cni,
            record: record.clone(),
        });
        state::write_json(&path, &record).map_err(StartError::NetworkRecord)?;
        Ok(Attached {
            ips,
            nameservers,
            search,
        })
    }

    /// The files that make the container's identity (hostname, hosts, resolv.conf, volume
    /// mount points; the init writes them) and its honest `/proc` files.
    fn init_layer(&mut self, net: &Attached) -> Result<ProcViews, StartError> {
        let config = self.config();
        let host_mode = config.net == NetMode::Host;
        let host_resolv = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let hosts = if host_mode {
            fs::read_to_string("/etc/hosts")
                .unwrap_or_else(|_| rootfs::render_hosts(&config.hostname, &[]))
        } else {
            rootfs::render_hosts(&config.hostname, &net.ips)
        };
        let (dirs, files): (Vec<_>, Vec<_>) = config.volumes.iter().partition(|v| v.host.is_dir());
        let init_layer = InitLayer {
            hostname: config.hostname.clone(),
            hosts,
            resolv_conf: rootfs::render_resolv(
                &host_resolv,
                host_mode,
                &net.nameservers,
                &net.search,
            ),
            mount_dirs: dirs.into_iter().map(|v| v.container.clone()).collect(),
            mount_files: files.into_iter().map(|v| v.container.clone()).collect(),
        };

        let (limits, cpus) = (&config.limits, &config.cpus);
        let meminfo_template = limits
            .memory
            .and_then(|_| fs::read_to_string("/proc/meminfo").ok());
        let meminfo = match (&meminfo_template, limits.memory) {
            // A cgroup with nothing in it yet uses nothing.
            (Some(t), Some(m)) => Some(procview::render_meminfo(t, &cgroup::Stats::default(), m)),
            _ => None,
        };
        let (cpuinfo, online) = if cpus.is_empty() {
            (None, None)
        } else {
            (
                fs::read_to_string("/proc/cpuinfo")
                    .ok()
                    .map(|c| procview::render_cpuinfo(&c, cpus)),
                Some(procview::render_cpu_online(cpus.len())),
            )
        };
        let (meminfo, cpuinfo, cpu_online) = shim::prepare_proc_files(
            &self.state_dir,
            meminfo.as_deref(),
            cpuinfo.as_deref(),
            online.as_deref(),
        )
        .map_err(|source| StartError::ProcFiles {
            path: self.state_dir.join("proc"),
            source,
        })?;
        Ok(ProcViews {
            init_layer,
            meminfo_template,
            meminfo,
            cpuinfo,
            cpu_online,
        })
    }

    /// `config.json`: from here on any `tweedctl` sees the container, and the next `--userns`
    /// choice sees its ids, so the choice's lock is let go here (not before: another run would
    /// choose the same block; not later: runs would wait on each other's start).
    fn record(&mut self) -> Result<(), StartError> {
        let config = ContainerConfig {
            created: timefmt::now(),
            ..self.config().clone()
        };
        // Visible now (atomic rename), durable by the time the start returns: the fsyncs run
        // while the supervisor starts the container (`ShimSpec::sync_meanwhile`). A crash
        // before then kills the container too, and leaves no record or an empty one, which
        // reads as none, as if the crash had come a moment earlier.
        let r = state::write_json_pending(&self.state_dir.join("config.json"), &config)
            .map_err(StartError::Record);
        // On failure too: the undo removes the state dir, so the ids are free again.
        self.plan.userns_lock.release();
        r
    }

    /// The supervisor, which clones the init and waits for its handshake.
    fn start(&mut self, views: ProcViews) -> Result<(), StartError> {
        let config = self.config();
        let init = InitSpec {
            rootfs: RootfsSpec {
                scratch: self.rt.paths.scratch(),
                init_layer: views.init_layer,
                init_owner: config.userns.map_or((0, 0), |m| (m.uid.start, m.gid.start)),
                lowers: self.plan.lowers.clone(),
                upper: self.data_dir.join("upper"),
                work: self.data_dir.join("work"),
                volumes: config.volumes.clone(),
                meminfo: views.meminfo,
                cpuinfo: views.cpuinfo,
                cpu_online: views.cpu_online,
                privileged: config.security.privileged,
            },
            hostname: config.hostname.clone(),
            argv: config.argv.clone(),
            env: config.env.clone(),
            cwd: config.cwd.clone(),
            user: config.user.clone(),
            caps: config.caps,
            cpus: config.cpus.clone(),
            new_netns: config.net == NetMode::None,
            join_netns: self.plan.join_netns.clone(),
            virtual_sysinfo: config.limits.memory.is_some(),
            seccomp: self.plan.seccomp.clone(),
            no_new_privs: config.security.no_new_privs,
            userns: config.userns,
            userns_fd: None,
            // Never the host's own namespace: its sysctls are not the container's to change.
            userns_net_sysctls: config.userns.is_some() && config.net != NetMode::Host,
        };
        let on_exit: Option<Box<dyn FnOnce()>> = if config.auto_remove {
            let rt = self.rt.clone();
            let id = config.id.clone();
            Some(Box::new(move || {
                let _ = rt.cleanup(&id);
            }))
        } else {
            None
        };
        crate::process::mark("run: spawning shim");
        self.host
            .sys
            .start_supervisor(ShimSpec {
                state_dir: self.state_dir.clone(),
                init,
                cgroup: config.cgroup.clone(),
                meminfo_template: views.meminfo_template,
                memory_limit: config.limits.memory,
                on_exit,
                sync_meanwhile: vec![self.state_dir.join("config.json")],
            })
            .map_err(|source| StartError::Start {
                id: config.id.clone(),
                source,
            })?;
        crate::process::mark("run: started");
        Ok(())
    }
}

#[cfg(test)]
mod tests;
