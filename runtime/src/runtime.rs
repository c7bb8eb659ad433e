//! The high-level API behind `tweedctl` (and the lab): run, list, inspect, logs, stop, kill,
//! remove, exec, commit; image import, list, remove.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::caps::CapSet;
use crate::cgroup::{self, Cgroup, CgroupError, CgroupManager};
use crate::cni::{self, Attachment, Cni, CniError, NetworkList};
use crate::exec::{self, ExecError, ExecSpec};
use crate::image::{self, diff::DiffOptions, ImageConfig, ImageError, ImageRecord, ImageStore};
use crate::init::InitSpec;
use crate::netns::{self, NetnsError};
use crate::rootfs::{self, InitLayer, RootfsError, RootfsSpec};
use crate::shim::{self, ShimError, ShimSpec};
use crate::state::{
    self, ContainerConfig, ExitInfo, NetMode, Paths, ProcInfo, StateError, Status, Volume,
};
use crate::units::{self, Limits, UnitsError};
use crate::{fsutil, logs, process, procview, timefmt};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("no such container: {0}")]
    NoSuchContainer(String),
    #[error("container reference {0:?} is ambiguous: give more of the id")]
    Ambiguous(String),
    #[error("the name {0:?} is already in use by container {1}")]
    NameInUse(String, String),
    #[error("invalid container name {0:?}: use [a-zA-Z0-9][a-zA-Z0-9_.-]*")]
    BadName(String),
    #[error("no command: image {0} has no Cmd or Entrypoint, so give one after the image name")]
    MissingCommand(String),
    #[error("invalid volume {0:?}: expected /HOST/PATH:/CONTAINER/PATH[:ro]")]
    BadVolume(String),
    #[error("volume source {0} does not exist")]
    VolumeSource(PathBuf),
    #[error("invalid network mode {0:?}: expected overlay, none, host or container:ID")]
    BadNetMode(String),
    #[error("invalid environment entry {0:?}: expected K=V or K")]
    BadEnv(String),
    #[error("container {0} is not running")]
    NotRunning(String),
    #[error("container {0} is running: stop it first or use rm -f")]
    StillRunning(String),
    #[error("container {0} did not stop within {1:?}")]
    StopTimeout(String, Duration),
    #[error("unknown signal {0:?}")]
    BadSignal(String),
    #[error("{0}")]
    Units(#[from] UnitsError),
    #[error("{0}")]
    Image(#[from] ImageError),
    #[error("cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("network: {0}")]
    Cni(#[from] CniError),
    #[error("{0}")]
    Netns(#[from] NetnsError),
    #[error("rootfs: {0}")]
    Rootfs(#[from] RootfsError),
    #[error("{0}")]
    State(#[from] StateError),
    #[error("starting the container: {0}")]
    Start(#[from] ShimError),
    #[error("exec: {0}")]
    Exec(#[from] ExecError),
    #[error("container {id} removed, but cleanup reported: {errors}")]
    Cleanup { id: String, errors: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> RuntimeError + '_ {
    move |source| RuntimeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where and how the runtime works.
#[derive(Debug, Clone)]
pub struct Options {
    /// Runtime state (default /run/tweed).
    pub run_root: PathBuf,
    /// Images and container layers (default /var/lib/tweed).
    pub image_root: PathBuf,
    /// Cgroup parent of containers, absolute in each hierarchy (default /tweed).
    pub cgroup_parent: String,
    /// A network namespace to treat as the host's (a lab host): CNI plugins run in it and
    /// `--net host` joins it.
    pub host_netns: Option<PathBuf>,
    pub cni_conf: PathBuf,
    pub cni_path: Vec<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            run_root: "/run/tweed".into(),
            image_root: "/var/lib/tweed".into(),
            cgroup_parent: "/tweed".into(),
            host_netns: None,
            cni_conf: "/etc/cni/net.d/10-tweed.conflist".into(),
            cni_path: vec!["/opt/cni/bin".into(), "/usr/lib/cni".into()],
        }
    }
}

/// `tweedctl run` arguments.
#[derive(Debug, Clone, Default)]
pub struct RunSpec {
    pub image: String,
    pub cmd: Vec<String>,
    pub entrypoint: Option<String>,
    pub name: Option<String>,
    pub env: Vec<String>,
    pub volumes: Vec<String>,
    pub workdir: Option<String>,
    pub hostname: Option<String>,
    /// overlay | none | host | container:ID (default none).
    pub net: Option<String>,
    pub memory: Option<String>,
    pub cpus: Option<String>,
    pub pids: Option<String>,
    pub user: Option<String>,
    pub auto_remove: bool,
}

/// One line of `ps`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub id: String,
    pub name: String,
    pub image: String,
    pub command: String,
    pub status: Status,
    pub created: String,
    pub pid: Option<i32>,
}

/// The CNI attachment of a container, recorded before ADD so that DEL and GC always know it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct CniRecord {
    pub list: NetworkList,
    pub attachment: Attachment,
    pub result: Option<Value>,
}

/// Container name rule (Docker's).
pub fn valid_container_name(n: &str) -> bool {
    let b = n.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(c))
}

/// The command a container runs: entrypoint + (given command or the image's Cmd).
pub fn command_for(cfg: &ImageConfig, entrypoint: Option<&str>, cmd: &[String]) -> Vec<String> {
    let ep: Vec<String> = match entrypoint {
        Some("") => vec![],
        Some(e) => vec![e.to_string()],
        None => cfg.entrypoint.clone(),
    };
    let rest = if cmd.is_empty() && entrypoint.is_none() {
        cfg.cmd.clone()
    } else {
        cmd.to_vec()
    };
    ep.into_iter().chain(rest).collect()
}

/// The container's environment: PATH default, the image's, the user's (`K` alone takes the
/// caller's value), HOSTNAME and HOME.
pub fn container_env(
    image_env: &[String],
    user_env: &[String],
    hostname: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Vec<String>, RuntimeError> {
    let mut env =
        vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()];
    env = exec::merge_env(&env, image_env);
    let mut extra = Vec::new();
    for e in user_env {
        match e.split_once('=') {
            Some((k, _)) if !k.is_empty() => extra.push(e.clone()),
            None if !e.is_empty() => {
                if let Some(v) = lookup(e) {
                    extra.push(format!("{e}={v}"));
                }
            }
            _ => return Err(RuntimeError::BadEnv(e.clone())),
        }
    }
    env = exec::merge_env(&env, &[format!("HOSTNAME={hostname}")]);
    env = exec::merge_env(&env, &extra);
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push("HOME=/root".into());
    }
    Ok(env)
}

/// Undo actions for a half-created container, run in reverse unless disarmed.
struct Undo(Vec<Box<dyn FnOnce()>>);

impl Undo {
    fn push(&mut self, f: impl FnOnce() + 'static) {
        self.0.push(Box::new(f));
    }
    fn disarm(&mut self) {
        self.0.clear();
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        while let Some(f) = self.0.pop() {
            f();
        }
    }
}

fn host_cpus_allowed() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills a zeroed cpu_set_t.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return (0..online_cpus()).collect();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|c| libc::CPU_ISSET(*c, &set))
            .collect()
    }
}

fn online_cpus() -> usize {
    // SAFETY: plain sysconf.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    n.max(1) as usize
}

/// The runtime.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub opts: Options,
    pub paths: Paths,
    pub images: ImageStore,
}

impl Runtime {
    pub fn new(opts: Options) -> Result<Runtime, RuntimeError> {
        let paths = Paths {
            run_root: opts.run_root.clone(),
            image_root: opts.image_root.clone(),
        };
        for d in [
            paths.containers(),
            paths.names(),
            opts.image_root.join("containers"),
        ] {
            fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        let images = ImageStore::open(&opts.image_root)?;
        Ok(Runtime {
            opts,
            paths,
            images,
        })
    }

    /// A container id from an id, a unique id prefix, or a name.
    pub fn resolve(&self, reference: &str) -> Result<String, RuntimeError> {
        if reference.is_empty() || reference.contains('/') || reference.starts_with('.') {
            return Err(RuntimeError::NoSuchContainer(reference.to_string()));
        }
        if self.paths.state_dir(reference).join("config.json").exists() {
            return Ok(reference.to_string());
        }
        if let Ok(t) = fs::read_link(self.paths.name_link(reference)) {
            let id = t.to_string_lossy().into_owned();
            if self.paths.state_dir(&id).exists() {
                return Ok(id);
            }
        }
        let ids = self.ids()?;
        let m: Vec<&String> = ids.iter().filter(|i| i.starts_with(reference)).collect();
        match m.len() {
            1 => Ok(m[0].clone()),
            0 => Err(RuntimeError::NoSuchContainer(reference.to_string())),
            _ => Err(RuntimeError::Ambiguous(reference.to_string())),
        }
    }

    fn ids(&self) -> Result<Vec<String>, RuntimeError> {
        let d = self.paths.containers();
        let mut v = Vec::new();
        for e in fs::read_dir(&d).map_err(io_err(&d))? {
            let e = e.map_err(io_err(&d))?;
            if e.path().join("config.json").exists() {
                v.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(v)
    }

    pub fn config(&self, id: &str) -> Result<ContainerConfig, RuntimeError> {
        state::read_json(&self.paths.state_dir(id).join("config.json"))?
            .ok_or_else(|| RuntimeError::NoSuchContainer(id.to_string()))
    }

    fn proc_info(&self, id: &str, file: &str) -> Result<Option<ProcInfo>, RuntimeError> {
        Ok(state::read_json(&self.paths.state_dir(id).join(file))?)
    }

    pub fn exit_info(&self, id: &str) -> Result<Option<ExitInfo>, RuntimeError> {
        Ok(state::read_json(
            &self.paths.state_dir(id).join("exit.json"),
        )?)
    }

    /// Status from the state files and live processes.
    pub fn status(&self, id: &str) -> Result<Status, RuntimeError> {
        let shim = self.proc_info(id, "shim.json")?;
        let init = self.proc_info(id, "init.json")?;
        let exit = self.exit_info(id)?;
        let shim_alive = shim
            .as_ref()
            .is_some_and(|s| state::alive(s.pid, s.start_time));
        let init_alive = init
            .as_ref()
            .is_some_and(|s| state::alive(s.pid, s.start_time));
        Ok(state::status(
            init.as_ref(),
            exit.as_ref(),
            shim_alive,
            init_alive,
        ))
    }

    /// The init pid of a running container.
    pub fn init_pid(&self, id: &str) -> Result<i32, RuntimeError> {
        match (self.status(id)?, self.proc_info(id, "init.json")?) {
            (Status::Running, Some(i)) if state::alive(i.pid, i.start_time) => Ok(i.pid),
            _ => Err(RuntimeError::NotRunning(id.to_string())),
        }
    }

    fn netns_of(&self, id: &str) -> Result<PathBuf, RuntimeError> {
        let cfg = self.config(id)?;
        let pid = self.init_pid(id)?;
        Ok(match cfg.netns_path {
            Some(p) => p,
            None => PathBuf::from(format!("/proc/{pid}/ns/net")),
        })
    }

    /// Creates and starts a container; returns its id once its command runs.
    pub fn run(&self, spec: &RunSpec) -> Result<String, RuntimeError> {
        process::mark("run: start");
        // Everything that can be checked is checked before anything is created.
        let image = self.images.get(&spec.image)?;
        let argv = command_for(&image.config, spec.entrypoint.as_deref(), &spec.cmd);
        if argv.is_empty() {
            return Err(RuntimeError::MissingCommand(image.name.clone()));
        }
        let limits = Limits {
            memory: spec
                .memory
                .as_deref()
                .map(units::parse_memory)
                .transpose()?,
            millicpus: spec
                .cpus
                .as_deref()
                .map(|c| units::parse_cpus(c, online_cpus()))
                .transpose()?,
            pids: spec.pids.as_deref().map(units::parse_pids).transpose()?,
        };
        let net_s = spec.net.clone().unwrap_or_else(|| "none".into());
        let mut net =
            NetMode::parse(&net_s).ok_or_else(|| RuntimeError::BadNetMode(net_s.clone()))?;
        let mut join_netns = None;
        if let NetMode::Container(r) = &net {
            let target = self.resolve(r)?;
            join_netns = Some(self.netns_of(&target)?);
            net = NetMode::Container(target);
        }
        if net == NetMode::Host {
            join_netns = self.opts.host_netns.clone();
        }
        let list = if net == NetMode::Overlay {
            Some(NetworkList::load(&self.opts.cni_conf)?)
        } else {
            None
        };
        let mut volumes = Vec::new();
        for v in &spec.volumes {
            let vol = Volume::parse(v).ok_or_else(|| RuntimeError::BadVolume(v.clone()))?;
            if !vol.host.exists() {
                return Err(RuntimeError::VolumeSource(vol.host));
            }
            volumes.push(vol);
        }
        let id = fsutil::random_hex(32);
        let name = spec
            .name
            .clone()
            .unwrap_or_else(|| format!("c-{}", &id[..12]));
        if !valid_container_name(&name) {
            return Err(RuntimeError::BadName(name));
        }
        let hostname = spec
            .hostname
            .clone()
            .unwrap_or_else(|| id[..12].to_string());
        let env = container_env(&image.config.env, &spec.env, &hostname, |k| {
            std::env::var(k).ok()
        })?;

        let mut undo = Undo(Vec::new());
        // The name: an atomic symlink, so two runs cannot both get it.
        let link = self.paths.name_link(&name);
        if let Err(e) = std::os::unix::fs::symlink(&id, &link) {
            if e.kind() == io::ErrorKind::AlreadyExists {
                let other = fs::read_link(&link)
                    .map(|t| t.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if self.paths.state_dir(&other).exists() {
                    return Err(RuntimeError::NameInUse(name, other));
                }
                // A stale reservation (its container is gone): take it over.
                let _ = fs::remove_file(&link);
                std::os::unix::fs::symlink(&id, &link).map_err(io_err(&link))?;
            } else {
                return Err(io_err(&link)(e));
            }
        }
        undo.push(move || {
            let _ = fs::remove_file(&link);
        });
        let sdir = self.paths.state_dir(&id);
        let ddir = self.paths.data_dir(&id);
        fs::create_dir(&sdir).map_err(io_err(&sdir))?;
        {
            let s = sdir.clone();
            undo.push(move || {
                let _ = fsutil::remove_tree(&s);
            });
        }
        for d in ["upper", "work", "init", "merged"] {
            let p = ddir.join(d);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        {
            let d = ddir.clone();
            undo.push(move || {
                let _ = fsutil::remove_tree(&d);
            });
        }

        process::mark("run: dirs made");
        let layout = cgroup::host_layout()?;
        let cg = Cgroup::for_container(&layout, &self.opts.cgroup_parent, &id);
        let rec = cg.record();
        {
            let rec = rec.clone();
            undo.push(move || {
                let _ = Cgroup::from_record(&rec).remove();
            });
        }
        cg.create()?;
        cg.apply(&limits)?;

        process::mark("run: cgroup made");
        let cpus = match limits.millicpus {
            Some(_) => {
                let allowed = host_cpus_allowed();
                procview::pick_cpus(&allowed, limits.visible_cpus(allowed.len()), &id)
            }
            None => vec![],
        };

        // Network.
        let mut netns_path = None;
        let mut ips: Vec<String> = Vec::new();
        let mut dns = (Vec::new(), Vec::new());
        if let Some(list) = &list {
            let p = sdir.join("netns");
            netns::create(&p)?;
            {
                let p = p.clone();
                undo.push(move || {
                    let _ = netns::remove(&p);
                });
            }
            let rec = CniRecord {
                list: list.clone(),
                attachment: Attachment {
                    container_id: id.clone(),
                    netns: p.clone(),
                    ifname: "eth0".into(),
                },
                result: None,
            };
            let rpath = sdir.join("cni.json");
            state::write_json(&rpath, &rec)?;
            let cni = Cni::real(self.opts.cni_path.clone(), self.opts.host_netns.clone());
            let result = cni.add(list, &rec.attachment)?;
            {
                let (list, att, res) = (list.clone(), rec.attachment.clone(), result.clone());
                let (path, host) = (self.opts.cni_path.clone(), self.opts.host_netns.clone());
                undo.push(move || {
                    let _ = Cni::real(path, host).del(&list, &att, Some(&res));
                });
            }
            ips = cni::result_ips(&result);
            dns = cni::result_dns(&result);
            state::write_json(
                &rpath,
                &CniRecord {
                    result: Some(result),
                    ..rec
                },
            )?;
            netns_path = Some(p.clone());
            join_netns = Some(p);
        }

        // Init layer.
        let host_resolv = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let hosts = if net == NetMode::Host {
            fs::read_to_string("/etc/hosts")
                .unwrap_or_else(|_| rootfs::render_hosts(&hostname, &[]))
        } else {
            rootfs::render_hosts(&hostname, &ips)
        };
        let (mount_dirs, mount_files) =
            volumes.iter().fold((vec![], vec![]), |(mut d, mut f), v| {
                if v.host.is_dir() {
                    d.push(v.container.clone());
                } else {
                    f.push(v.container.clone());
                }
                (d, f)
            });
        rootfs::write_init_layer(
            &ddir.join("init"),
            &InitLayer {
                hostname: hostname.clone(),
                hosts,
                resolv_conf: rootfs::render_resolv(
                    &host_resolv,
                    net == NetMode::Host,
                    &dns.0,
                    &dns.1,
                ),
                mount_dirs,
                mount_files,
            },
        )?;

        // The honest /proc.
        let meminfo_template = limits
            .memory
            .and_then(|_| fs::read_to_string("/proc/meminfo").ok());
        let meminfo = match (&meminfo_template, limits.memory) {
            (Some(t), Some(m)) => Some(procview::render_meminfo(
                t,
                // A cgroup with nothing in it yet uses nothing.
                &cgroup::Stats::default(),
                m,
            )),
            _ => None,
        };
        let (cpuinfo, online) = if cpus.is_empty() {
            (None, None)
        } else {
            (
                fs::read_to_string("/proc/cpuinfo")
                    .ok()
                    .map(|c| procview::render_cpuinfo(&c, &cpus)),
                Some(procview::render_cpu_online(cpus.len())),
            )
        };
        let (meminfo_p, cpuinfo_p, online_p) = shim::prepare_proc_files(
            &sdir,
            meminfo.as_deref(),
            cpuinfo.as_deref(),
            online.as_deref(),
        )
        .map_err(io_err(&sdir))?;

        let mut lowers = vec![ddir.join("init")];
        lowers.extend(self.images.lower_dirs(&image));
        let user = spec
            .user
            .clone()
            .unwrap_or_else(|| image.config.user.clone());
        let cwd = spec
            .workdir
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| image.config.working_dir.clone());
        let cwd = if cwd.is_empty() { "/".to_string() } else { cwd };
        let config = ContainerConfig {
            id: id.clone(),
            name: name.clone(),
            image: image.name.clone(),
            image_id: image.id.clone(),
            layers: image.layers.clone(),
            argv: argv.clone(),
            env: env.clone(),
            cwd: cwd.clone(),
            user: user.clone(),
            hostname: hostname.clone(),
            limits: limits.clone(),
            cpus: cpus.clone(),
            net: net.clone(),
            volumes: volumes.clone(),
            cgroup: rec.clone(),
            caps: CapSet::docker_default(),
            created: timefmt::now(),
            auto_remove: spec.auto_remove,
            host_netns: self.opts.host_netns.clone(),
            netns_path,
        };
        state::write_json(&sdir.join("config.json"), &config)?;

        let init = InitSpec {
            rootfs: RootfsSpec {
                merged: ddir.join("merged"),
                lowers,
                upper: ddir.join("upper"),
                work: ddir.join("work"),
                volumes,
                meminfo: meminfo_p,
                cpuinfo: cpuinfo_p,
                cpu_online: online_p,
            },
            hostname,
            argv,
            env,
            cwd,
            user,
            caps: config.caps,
            cpus,
            new_netns: net == NetMode::None,
            join_netns,
            virtual_sysinfo: limits.memory.is_some(),
        };
        let on_exit: Option<Box<dyn FnOnce()>> = if spec.auto_remove {
            let rt = self.clone();
            let id = id.clone();
            Some(Box::new(move || {
                let _ = rt.cleanup(&id);
            }))
        } else {
            None
        };
        process::mark("run: spawning shim");
        shim::spawn(ShimSpec {
            state_dir: sdir,
            init,
            cgroup: rec,
            meminfo_template,
            memory_limit: limits.memory,
            on_exit,
        })?;
        process::mark("run: started");
        undo.disarm();
        Ok(id)
    }

    /// Blocks until the container's supervisor has recorded its exit.
    pub fn wait(&self, id: &str, timeout: Option<Duration>) -> Result<ExitInfo, RuntimeError> {
        if let Some(s) = self.proc_info(id, "shim.json")? {
            if let Ok(fd) = process::pidfd_open(s.pid) {
                if state::alive(s.pid, s.start_time) {
                    let _ = process::wait_readable(fd.as_raw_fd(), timeout);
                }
            }
        }
        match self.exit_info(id)? {
            Some(e) => Ok(e),
            None => match self.status(id)? {
                Status::Running | Status::Created => Err(RuntimeError::StopTimeout(
                    id.to_string(),
                    timeout.unwrap_or_default(),
                )),
                _ => Err(RuntimeError::NotRunning(id.to_string())),
            },
        }
    }

    /// Sends a signal to the container's init.
    pub fn kill(&self, id: &str, sig: i32) -> Result<(), RuntimeError> {
        let pid = self.init_pid(id)?;
        let fd = process::pidfd_open(pid).map_err(|_| RuntimeError::NotRunning(id.to_string()))?;
        process::pidfd_send_signal(&fd, sig).map_err(|_| RuntimeError::NotRunning(id.to_string()))
    }

    /// SIGTERM, then SIGKILL after `grace`; returns once the exit is recorded.
    pub fn stop(&self, id: &str, grace: Duration) -> Result<ExitInfo, RuntimeError> {
        if let Ok(pid) = self.init_pid(id) {
            if let Ok(fd) = process::pidfd_open(pid) {
                let _ = process::pidfd_send_signal(&fd, libc::SIGTERM);
                if !process::wait_readable(fd.as_raw_fd(), Some(grace)).unwrap_or(false) {
                    let _ = process::pidfd_send_signal(&fd, libc::SIGKILL);
                }
            }
        }
        match self.status(id)? {
            Status::Running | Status::Created => self.wait(id, Some(Duration::from_secs(30))),
            Status::Exited { .. } => Ok(self.exit_info(id)?.expect("exited has exit info")),
            Status::Dead { .. } => Err(RuntimeError::NotRunning(id.to_string())),
        }
    }

    /// Removes a container: its network (CNI DEL), namespace, cgroup, layers and state.
    pub fn remove(&self, id: &str, force: bool) -> Result<(), RuntimeError> {
        process::mark("remove: start");
        match self.status(id)? {
            Status::Running | Status::Created if !force => {
                return Err(RuntimeError::StillRunning(id.to_string()))
            }
            Status::Running | Status::Created => {
                let _ = self.kill(id, libc::SIGKILL);
                let _ = self.wait(id, Some(Duration::from_secs(30)));
            }
            _ => {}
        }
        // A supervisor still finishing (e.g. writing the exit) is waited for.
        if let Some(s) = self.proc_info(id, "shim.json")? {
            if state::alive(s.pid, s.start_time) {
                if let Ok(fd) = process::pidfd_open(s.pid) {
                    let _ = process::wait_readable(fd.as_raw_fd(), Some(Duration::from_secs(10)));
                }
            }
        }
        self.cleanup(id)
    }

    /// Releases everything of a container that is no longer running.
    pub fn cleanup(&self, id: &str) -> Result<(), RuntimeError> {
        let sdir = self.paths.state_dir(id);
        let cfg: Option<ContainerConfig> = state::read_json(&sdir.join("config.json"))?;
        let mut errors: Vec<String> = Vec::new();
        process::mark("cleanup: start");
        let cni_rec: Option<CniRecord> = state::read_json(&sdir.join("cni.json")).unwrap_or(None);
        if let Some(r) = cni_rec {
            let host = cfg
                .as_ref()
                .and_then(|c| c.host_netns.clone())
                .or(self.opts.host_netns.clone());
            let cni = Cni::real(self.opts.cni_path.clone(), host);
            if let Err(e) = cni.del(&r.list, &r.attachment, r.result.as_ref()) {
                errors.push(e.to_string());
            }
        }
        if let Err(e) = netns::remove(&sdir.join("netns")) {
            errors.push(e.to_string());
        }
        if let Some(c) = &cfg {
            if let Err(e) = Cgroup::from_record(&c.cgroup).remove() {
                errors.push(e.to_string());
            }
        }
        process::mark("cleanup: cgroups removed");
        let ddir = self.paths.data_dir(id);
        if let Err(e) = fsutil::remove_tree(&ddir) {
            errors.push(format!("{}: {e}", ddir.display()));
        }
        if let Some(c) = &cfg {
            let link = self.paths.name_link(&c.name);
            if fs::read_link(&link).is_ok_and(|t| t == Path::new(id)) {
                let _ = fs::remove_file(&link);
            }
        }
        process::mark("cleanup: layers removed");
        if let Err(e) = fsutil::remove_tree(&sdir) {
            errors.push(format!("{}: {e}", sdir.display()));
        }
        process::mark("cleanup: state removed");
        if errors.is_empty() {
            Ok(())
        } else {
            Err(RuntimeError::Cleanup {
                id: id.to_string(),
                errors: errors.join("; "),
            })
        }
    }

    pub fn list(&self) -> Result<Vec<Summary>, RuntimeError> {
        let mut out = Vec::new();
        for id in self.ids()? {
            let Ok(cfg) = self.config(&id) else { continue };
            let status = self.status(&id)?;
            let pid = match status {
                Status::Running => self.proc_info(&id, "init.json")?.map(|i| i.pid),
                _ => None,
            };
            out.push(Summary {
                id: id.clone(),
                name: cfg.name,
                image: cfg.image,
                command: cfg.argv.join(" "),
                status,
                created: cfg.created,
                pid,
            });
        }
        out.sort_by(|a, b| a.created.cmp(&b.created));
        Ok(out)
    }

    /// Everything known about a container, as JSON.
    pub fn inspect(&self, id: &str) -> Result<Value, RuntimeError> {
        let cfg = self.config(id)?;
        let status = self.status(id)?;
        let init = self.proc_info(id, "init.json")?;
        let shim = self.proc_info(id, "shim.json")?;
        let exit = self.exit_info(id)?;
        let cni: Option<CniRecord> = state::read_json(&self.paths.state_dir(id).join("cni.json"))?;
        let stats = if status == Status::Running {
            Cgroup::from_record(&cfg.cgroup).stats().ok()
        } else {
            None
        };
        let ddir = self.paths.data_dir(id);
        let image = self.images.get(&cfg.image_id).ok();
        Ok(serde_json::json!({
            "Id": cfg.id,
            "Name": cfg.name,
            "Created": cfg.created,
            "Image": cfg.image,
            "ImageId": cfg.image_id,
            "Path": cfg.argv.first(),
            "Args": cfg.argv.get(1..).unwrap_or(&[]),
            "State": {
                "Status": status,
                "Running": status == Status::Running,
                "Pid": if status == Status::Running { init.as_ref().map(|i| i.pid) } else { None },
                "SupervisorPid": shim.as_ref().map(|s| s.pid),
                "StartedAt": init.as_ref().map(|i| i.started.clone()),
                "FinishedAt": exit.as_ref().map(|e| e.finished.clone()),
                "ExitCode": exit.as_ref().map(|e| e.code),
                "Signal": exit.as_ref().and_then(|e| e.signal),
                "OOMKilled": exit.as_ref().is_some_and(|e| e.oom_killed),
                "Dead": matches!(status, Status::Dead { .. }),
            },
            "Config": {
                "Hostname": cfg.hostname,
                "Env": cfg.env,
                "Cmd": cfg.argv,
                "WorkingDir": cfg.cwd,
                "User": cfg.user,
            },
            "HostConfig": {
                "Memory": cfg.limits.memory,
                "NanoCpus": cfg.limits.millicpus.map(|m| m * 1_000_000),
                "CpuQuota": cfg.limits.cpu_quota_us(),
                "CpuPeriod": cfg.limits.millicpus.map(|_| units::CPU_PERIOD_US),
                "PidsLimit": cfg.limits.pids,
                "CpusetCpus": cfg.cpus,
                "NetworkMode": cfg.net.show(),
                "Binds": cfg.volumes.iter().map(|v| format!("{}:{}{}", v.host.display(), v.container.display(), if v.readonly { ":ro" } else { "" })).collect::<Vec<_>>(),
                "CapAdd": Value::Null,
                "Capabilities": cfg.caps.names(),
                "AutoRemove": cfg.auto_remove,
            },
            "NetworkSettings": {
                "Mode": cfg.net.show(),
                "SandboxKey": cfg.netns_path,
                "IPAddresses": cni.as_ref().and_then(|c| c.result.as_ref()).map(cni::result_ips).unwrap_or_default(),
                "CniResult": cni.as_ref().and_then(|c| c.result.clone()),
                "CniNetwork": cni.as_ref().map(|c| c.list.name.clone()),
            },
            "GraphDriver": {
                "Name": "overlay",
                "Data": {
                    "LowerDir": image.as_ref().map(|i| self.images.lower_dirs(i)),
                    "InitDir": ddir.join("init"),
                    "UpperDir": ddir.join("upper"),
                    "WorkDir": ddir.join("work"),
                    "MergedDir": ddir.join("merged"),
                },
            },
            "Cgroup": cfg.cgroup,
            "Stats": stats,
        }))
    }

    /// Copies the container's log to `out`/`err`; with `follow`, until the container ends.
    pub fn logs(
        &self,
        id: &str,
        follow: bool,
        out: &mut dyn Write,
        err: &mut dyn Write,
    ) -> Result<(), RuntimeError> {
        let p = self.paths.state_dir(id).join("log");
        let f = loop {
            match fs::File::open(&p) {
                Ok(f) => break f,
                Err(e)
                    if e.kind() == io::ErrorKind::NotFound
                        && follow
                        && self.status(id)?.is_running() =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(io_err(&p)(e)),
            }
        };
        let mut r = logs::LogReader::new(f);
        let shim = self.proc_info(id, "shim.json")?;
        let pidfd = shim
            .as_ref()
            .filter(|s| state::alive(s.pid, s.start_time))
            .and_then(|s| process::pidfd_open(s.pid).ok());
        loop {
            r.pump(out, err).map_err(io_err(&p))?;
            if !follow {
                return Ok(());
            }
            match &pidfd {
                Some(fd) => {
                    if process::wait_readable(fd.as_raw_fd(), Some(Duration::from_millis(50)))
                        .unwrap_or(true)
                    {
                        r.pump(out, err).map_err(io_err(&p))?;
                        return Ok(());
                    }
                }
                None => {
                    r.pump(out, err).map_err(io_err(&p))?;
                    return Ok(());
                }
            }
        }
    }

    /// Runs a command in a running container; returns its exit code.
    pub fn exec(&self, id: &str, spec: &ExecSpec) -> Result<i32, RuntimeError> {
        let cfg = self.config(id)?;
        let pid = self.init_pid(id)?;
        Ok(exec::exec(&cfg, pid, spec)?)
    }

    /// Makes the container's writable layer a new image layer on top of its image.
    pub fn commit(&self, id: &str, name: &str) -> Result<ImageRecord, RuntimeError> {
        let cfg = self.config(id)?;
        let name = image::normalize_name(name);
        if !image::valid_name(&name) {
            return Err(ImageError::BadName(name).into());
        }
        let running = self.status(id)? == Status::Running;
        let cg = Cgroup::from_record(&cfg.cgroup);
        let frozen = running && cg.freeze(true).is_ok();
        let opts = DiffOptions {
            overlay_upper: true,
            exclude: rootfs::INIT_FILES.iter().map(PathBuf::from).collect(),
        };
        let r = self
            .images
            .add_layer_from_dir(&self.paths.data_dir(id).join("upper"), &opts);
        if frozen {
            let _ = cg.freeze(false);
        }
        let diff_id = r?;
        let mut layers = cfg.layers.clone();
        layers.push(diff_id);
        let config = ImageConfig {
            env: cfg
                .env
                .iter()
                .filter(|e| !e.starts_with("HOSTNAME="))
                .cloned()
                .collect(),
            entrypoint: vec![],
            cmd: cfg.argv.clone(),
            working_dir: cfg.cwd.clone(),
            user: cfg.user.clone(),
        };
        let created = timefmt::now();
        let rec = ImageRecord {
            name,
            id: ImageStore::synth_config_id(&config, &layers, &created),
            layers,
            config,
            created,
            source: "commit".into(),
        };
        self.images.save(&rec)?;
        Ok(rec)
    }

    /// `image rm`: refused while a container uses the image.
    pub fn remove_image(&self, reference: &str) -> Result<Vec<String>, RuntimeError> {
        let rec = self.images.get(reference)?;
        let others_same_id = self
            .images
            .list()?
            .iter()
            .any(|r| r.id == rec.id && r.name != rec.name);
        let mut keep = HashSet::new();
        for id in self.ids()? {
            let Ok(c) = self.config(&id) else { continue };
            if c.image == rec.name || (c.image_id == rec.id && !others_same_id) {
                return Err(ImageError::InUse {
                    name: rec.name,
                    container: c.name,
                }
                .into());
            }
            keep.extend(c.layers.iter().cloned());
        }
        self.images.remove_record(&rec.name)?;
        Ok(self.images.gc_layers(&keep)?)
    }

    /// CNI GC: tells the network's plugins which attachments are still valid.
    pub fn cni_gc(&self) -> Result<bool, RuntimeError> {
        let list = NetworkList::load(&self.opts.cni_conf)?;
        let mut valid = Vec::new();
        for id in self.ids()? {
            if let Ok(Some(r)) =
                state::read_json::<CniRecord>(&self.paths.state_dir(&id).join("cni.json"))
            {
                if r.list.name == list.name {
                    valid.push(r.attachment);
                }
            }
        }
        let cni = Cni::real(self.opts.cni_path.clone(), self.opts.host_netns.clone());
        Ok(cni.gc(&list, &valid)?)
    }
}

/// Runs a container attached: streams its output and returns its exit once it ends.
pub fn run_attached(
    rt: &Runtime,
    spec: &RunSpec,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(String, ExitInfo), RuntimeError> {
    let mut spec = spec.clone();
    let remove = spec.auto_remove;
    // Attached --rm is done here, after the exit is read.
    spec.auto_remove = false;
    let id = rt.run(&spec)?;
    rt.logs(&id, true, out, err)?;
    let exit = rt.wait(&id, None);
    process::mark("run: exited");
    if remove {
        match &exit {
            // The supervisor has exited after recording the exit: nothing runs any more.
            Ok(_) => rt.cleanup(&id)?,
            Err(_) => rt.remove(&id, true)?,
        }
    }
    process::mark("run: removed");
    Ok((id, exit?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_container_name("web-1"));
        assert!(valid_container_name("a.b_c"));
        assert!(!valid_container_name("-x"));
        assert!(!valid_container_name("a/b"));
        assert!(!valid_container_name(""));
    }

    #[test]
    fn commands() {
        let cfg = ImageConfig {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["serve".into()],
            ..Default::default()
        };
        assert_eq!(command_for(&cfg, None, &[]), ["/entry", "serve"]);
        assert_eq!(command_for(&cfg, None, &["x".into()]), ["/entry", "x"]);
        assert_eq!(command_for(&cfg, Some(""), &["sh".into()]), ["sh"]);
        assert_eq!(command_for(&cfg, Some("/bin/ls"), &[]), ["/bin/ls"]);
        assert!(command_for(&ImageConfig::default(), None, &[]).is_empty());
    }

    #[test]
    fn environment() {
        let env = container_env(
            &["PATH=/img".into(), "A=1".into()],
            &["A=2".into(), "FROMHOST".into(), "MISSING".into()],
            "h",
            |k| (k == "FROMHOST").then(|| "v".to_string()),
        )
        .unwrap();
        assert_eq!(
            env,
            ["PATH=/img", "HOSTNAME=h", "A=2", "FROMHOST=v", "HOME=/root"]
        );
        assert!(matches!(
            container_env(&[], &["=x".into()], "h", |_| None),
            Err(RuntimeError::BadEnv(_))
        ));
    }

    #[test]
    fn undo_runs_in_reverse_unless_disarmed() {
        use std::sync::{Arc, Mutex};
        let log = Arc::new(Mutex::new(Vec::new()));
        {
            let mut u = Undo(Vec::new());
            for i in 0..3 {
                let l = log.clone();
                u.push(move || l.lock().unwrap().push(i));
            }
        }
        assert_eq!(*log.lock().unwrap(), vec![2, 1, 0]);
        let mut u = Undo(Vec::new());
        let l = log.clone();
        u.push(move || l.lock().unwrap().push(9));
        u.disarm();
        drop(u);
        assert_eq!(log.lock().unwrap().len(), 3);
    }
}
