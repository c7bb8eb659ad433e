//! The high-level API behind `tweedctl` (and the lab): run, list, inspect, logs, stop, kill,
//! remove, exec, commit; image import, list, remove.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::cgroup::{self, Cgroup, CgroupError, CgroupManager};
use crate::cni::{Cni, CniError, NetworkList};
use crate::digest::Digest;
use crate::exec::{self, ExecError, ExecSpec};
use crate::fsutil;
use crate::image::{self, diff::DiffOptions, ImageConfig, ImageError, ImageRecord, ImageStore};
use crate::plan::RunSpec;
use crate::release::Release;
use crate::rootfs;
use crate::start::{Host, StartError};
use crate::state::{
    self, CniRecord, ContainerConfig, ExitInfo, Paths, ProcInfo, StateError, Status,
};
use crate::syscall::{LinuxSyscall, Syscall};
use crate::units::UnitsError;
use crate::{logs, process};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("no such container: {0}")]
    NoSuchContainer(String),
    #[error(transparent)]
    Userns(#[from] crate::userns::UsernsError),
    #[error("container reference {0:?} is ambiguous: give more of the id")]
    Ambiguous(String),
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
    State(#[from] StateError),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("exec: {0}")]
    Exec(#[from] ExecError),
    #[error("{0}")]
    Security(#[from] crate::security::SecurityError),
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
    /// Where `--userns` finds the host ids delegated to tweed (default /etc/subuid, /etc/subgid).
    pub subuid: PathBuf,
    pub subgid: PathBuf,
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
            subuid: crate::userns::SUBUID.into(),
            subgid: crate::userns::SUBGID.into(),
        }
    }
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
        // /run/tweed is shared with the agent (subnet.env, its socket) and keeps its mode when
        // it exists; a new one, and everything tweedctl keeps in it, is root's alone.
        if fs::symlink_metadata(&paths.run_root).is_err() {
            fsutil::create_private_dir(&paths.run_root).map_err(io_err(&paths.run_root))?;
        }
        // The store first: it makes a missing image root private, which creating
        // `<image root>/containers` first would have made with the default mode.
        let images = ImageStore::open(&opts.image_root)?;
        for d in [
            paths.containers(),
            paths.names(),
            opts.image_root.join("containers"),
        ] {
            // Container environments, logs and layers are root's alone.
            fsutil::create_private_dir(&d).map_err(io_err(&d))?;
        }
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

    pub(crate) fn ids(&self) -> Result<Vec<String>, RuntimeError> {
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

    pub(crate) fn proc_info(&self, id: &str, file: &str) -> Result<Option<ProcInfo>, RuntimeError> {
        Ok(state::read_process_record(
            &self.paths.state_dir(id).join(file),
        )?)
    }

    pub fn exit_info(&self, id: &str) -> Result<Option<ExitInfo>, RuntimeError> {
        Ok(state::read_process_record(
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

    pub(crate) fn netns_of(&self, id: &str) -> Result<PathBuf, RuntimeError> {
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
        let layout = cgroup::host_layout()?;
        let plan = self.plan(spec, &layout)?;
        let cgroup = Cgroup::for_container(&layout, &self.opts.cgroup_parent, &plan.config.id);
        let cni = Cni::real(self.opts.cni_path.clone(), self.opts.host_netns.clone());
        let host = Host {
            sys: &LinuxSyscall,
            cgroup: &cgroup,
            cni: &cni,
        };
        self.start(&plan, &host)?;
        Ok(plan.config.id)
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
        // A supervisor this process started is its child: reap it now that it has exited.
        process::reap_exited_children();
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
        let cfg: Option<ContainerConfig> =
            state::read_json(&self.paths.state_dir(id).join("config.json"))?;
        process::mark("cleanup: start");
        let host_netns = cfg
            .as_ref()
            .and_then(|c| c.host_netns.clone())
            .or(self.opts.host_netns.clone());
        let cni = Cni::real(self.opts.cni_path.clone(), host_netns);
        let cgroup = cfg.as_ref().map(|c| Cgroup::from_record(&c.cgroup));
        let errors = self.release(
            id,
            cfg.as_ref(),
            &LinuxSyscall,
            &cni,
            cgroup.as_ref().map(|c| c as &dyn CgroupManager),
        );
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

    /// Gives back what a container that no longer runs holds, whatever the errors: its
    /// network, cgroup, layers, name and state, in that order. Returns the errors.
    pub(crate) fn release(
        &self,
        id: &str,
        cfg: Option<&ContainerConfig>,
        sys: &dyn Syscall,
        cni: &Cni,
        cgroup: Option<&dyn CgroupManager>,
    ) -> Vec<String> {
        let sdir = self.paths.state_dir(id);
        let attachment: Option<CniRecord> =
            state::read_json(&sdir.join("cni.json")).unwrap_or(None);
        let mut steps = Vec::new();
        steps.extend(attachment.map(|record| Release::Attachment { cni, record }));
        steps.push(Release::Netns {
            sys,
            path: self.paths.netns(id),
        });
        steps.extend(cgroup.map(Release::Cgroup));
        steps.push(Release::Layers(self.paths.data_dir(id)));
        steps.extend(cfg.map(|c| Release::Name {
            link: self.paths.name_link(&c.name),
            id: id.to_string(),
        }));
        steps.push(Release::Tree(sdir));
        steps
            .iter()
            .filter_map(|s| {
                let r = s.run().err();
                process::mark(s.label());
                r
            })
            .collect()
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
        let seccomp = self.seccomp_programs(cfg.caps, &cfg.security)?;
        Ok(exec::exec(&cfg, pid, spec, seccomp.as_ref())?)
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
            // A --userns container's files are the mapped host ids on disk; the image must
            // hold the ids its processes saw, or a run without that mapping gets strangers.
            unshift: cfg.userns,
        };
        let upper = self.paths.data_dir(id).join("upper");
        let r = self.images.add_layer_from_dir(&upper, &opts);
        if frozen {
            let _ = cg.freeze(false);
        }
        let (diff_id, sum) = r?;
        if sum.unmapped > 0 {
            // Only host root can make such files (the container cannot name those ids).
            eprintln!(
                "tweedctl: commit: {} entries of {} are owned by host ids outside the \
                 container's map; recorded as {} (nobody), as the container saw them",
                sum.unmapped,
                upper.display(),
                crate::userns::OVERFLOW_ID
            );
        }
        let cfg_path = self.paths.state_dir(id).join("config.json");
        let mut layers = cfg
            .layers
            .iter()
            .enumerate()
            .map(|(i, d)| {
                Digest::parse(d).map_err(|source| ImageError::BadDigest {
                    path: cfg_path.clone(),
                    field: format!("layers[{i}]"),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
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
        Ok(self.images.save_made(name, config, layers, "commit")?)
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
            if c.image == rec.name || (rec.id == *c.image_id && !others_same_id) {
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
