//! What `tweedctl run` asks for ([`RunSpec`]), checked and resolved into a [`Plan`] before
//! anything is created: the image and command, limits and CPU set, network mode, volumes,
//! name, hostname, environment, user, working directory and cgroup.

use std::path::PathBuf;

use crate::caps::CapSet;
use crate::cgroup::{Cgroup, CgroupManager, Layout};
use crate::cni::NetworkList;
use crate::exec;
use crate::image::ImageConfig;
use crate::runtime::{Runtime, RuntimeError};
use crate::state::{self, ContainerConfig, NetMode, Volume};
use crate::units::{self, Limits};
use crate::{fsutil, procview};

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
    pub security: crate::security::SecurityArgs,
}

/// A container to create, every input checked: the configuration it will record, and what
/// starting it needs besides.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Written as `config.json` by the record stage, which stamps `created`.
    pub config: ContainerConfig,
    /// The image's layer directories, topmost first.
    pub lowers: Vec<PathBuf>,
    /// The network namespace the init joins: an overlay container's pinned one, another
    /// container's, or the host's (`--host-netns`).
    pub join_netns: Option<PathBuf>,
    /// The CNI network an overlay container is attached to.
    pub network: Option<NetworkList>,
    /// The container's seccomp filters, compiled (or read from the cache) now.
    pub seccomp: Option<crate::seccomp::Programs>,
    /// With `--userns`: held from the choice of the mapping until `config.json` records it, so
    /// that concurrent runs never choose the same ids. Released by the record stage (or when
    /// the plan is dropped).
    pub userns_lock: ChoiceLock,
}

/// The run root's `userns.lock`, shared by the clones of one [`Plan`]; releasing it once
/// releases it for all of them (and closes the file, so no process forked later inherits it).
#[derive(Debug, Clone, Default)]
pub struct ChoiceLock(std::sync::Arc<std::sync::Mutex<Option<fsutil::FileLock>>>);

impl ChoiceLock {
    pub fn held(lock: fsutil::FileLock) -> ChoiceLock {
        ChoiceLock(std::sync::Arc::new(std::sync::Mutex::new(Some(lock))))
    }
    pub fn release(&self) {
        let lock = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(lock);
    }
    pub fn is_held(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

/// The lock file of `--userns` choices, in the run root.
pub const USERNS_LOCK: &str = "userns.lock";

impl Runtime {
    /// Checks `spec` against the images, the containers and the host; creates nothing. The
    /// container's cgroup is `<cgroup parent>/<id>` on `layout`.
    pub fn plan(&self, spec: &RunSpec, layout: &Layout) -> Result<Plan, RuntimeError> {
        let image = self.images.get(&spec.image)?;
        crate::process::mark("plan: image read");
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
                .map(|c| units::parse_cpus(c, procview::online_cpus()))
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
        let network = if net == NetMode::Overlay {
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
            .unwrap_or_else(|| format!("c-{}", state::short_id(&id)));
        if !valid_container_name(&name) {
            return Err(RuntimeError::BadName(name));
        }
        let hostname = spec
            .hostname
            .clone()
            .unwrap_or_else(|| state::short_id(&id).to_string());
        let env = container_env(&image.config.env, &spec.env, &hostname, |k| {
            std::env::var(k).ok()
        })?;
        let cwd = spec
            .workdir
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| image.config.working_dir.clone());
        let cpus = match limits.millicpus {
            Some(_) => {
                let allowed = procview::host_cpus_allowed();
                procview::pick_cpus(&allowed, limits.visible_cpus(allowed.len()), &id)
            }
            None => vec![],
        };
        let netns_path = network.as_ref().map(|_| self.paths.netns(&id));
        if netns_path.is_some() {
            join_netns = netns_path.clone();
        }
        let cgroup = Cgroup::for_container(layout, &self.opts.cgroup_parent, &id).record();
        let cwd_now = std::env::current_dir().unwrap_or_else(|_| "/".into());
        let (caps, security) =
            crate::security::resolve(&spec.security, crate::caps::last_cap(), &cwd_now)?;
        crate::process::mark("plan: security resolved");
        let seccomp = self.seccomp_programs(caps, &security)?;
        crate::process::mark("plan: seccomp loaded");
        let (userns, userns_lock) = match self.userns_mapping(&spec.security)? {
            Some((m, lock)) => (Some(m), lock),
            None => (None, ChoiceLock::default()),
        };
        crate::process::mark("plan: userns chosen");
        Ok(Plan {
            lowers: self.images.lower_dirs(&image)?,
            config: ContainerConfig {
                id,
                name,
                image: image.name,
                image_id: image.id.to_string(),
                layers: image.layers.iter().map(ToString::to_string).collect(),
                argv,
                env,
                cwd: if cwd.is_empty() { "/".to_string() } else { cwd },
                user: spec.user.clone().unwrap_or(image.config.user),
                hostname,
                limits,
                cpus,
                net,
                volumes,
                cgroup,
                caps,
                security,
                created: String::new(),
                auto_remove: spec.auto_remove,
                host_netns: self.opts.host_netns.clone(),
                netns_path,
                userns,
            },
            join_netns,
            network,
            seccomp,
            userns_lock,
        })
    }

    /// The user namespace mapping `--userns` asks for: from the delegation in the subid files,
    /// clear of every existing container's. Skipped lines of those files are logged. Returned
    /// with the run root's [`USERNS_LOCK`] held: the caller keeps it until the mapping is
    /// recorded in `config.json`, where the next run's choice reads it. An explicit mapping
    /// takes the lock too, since `auto` choices must see it.
    pub fn userns_mapping(
        &self,
        args: &crate::security::SecurityArgs,
    ) -> Result<Option<(crate::userns::Mapping, ChoiceLock)>, RuntimeError> {
        use crate::userns;
        let Some(text) = &args.userns else {
            return Ok(None);
        };
        let opt = userns::parse_opt(text)?;
        if args.privileged {
            return Err(userns::UsernsError::Privileged.into());
        }
        let lock_path = self.paths.run_root.join(USERNS_LOCK);
        let lock = fsutil::FileLock::acquire(&lock_path).map_err(|source| RuntimeError::Io {
            path: lock_path.clone(),
            source,
        })?;
        let uid_text = userns::read_subid_file(&self.opts.subuid)?;
        let gid_text = userns::read_subid_file(&self.opts.subgid)?;
        let mut used = Vec::new();
        for id in self.ids()? {
            // A container being removed concurrently is simply not in the way any more.
            if let Ok(Some(m)) = self.config(&id).map(|c| c.userns) {
                used.push(m);
            }
        }
        let files = userns::SubIds {
            uid_path: &self.opts.subuid,
            uid_text: &uid_text,
            gid_path: &self.opts.subgid,
            gid_text: &gid_text,
            owner_uid: userns::owner_uid(),
        };
        let (m, skipped) = userns::resolve(opt, text, &files, &used);
        for e in skipped {
            eprintln!("tweedctl: {e}");
        }
        Ok(Some((m?, ChoiceLock::held(lock))))
    }

    /// The compiled seccomp filters of a container holding `caps`, through the cache under the
    /// image root.
    pub fn seccomp_programs(
        &self,
        caps: CapSet,
        security: &crate::security::Security,
    ) -> Result<Option<crate::seccomp::Programs>, RuntimeError> {
        let Some(profile) = security.seccomp.profile(caps) else {
            return Ok(None);
        };
        let dir = self.opts.image_root.join("seccomp");
        Ok(Some(
            crate::seccomp::compiled(&profile, &dir)
                .map_err(crate::security::SecurityError::from)?,
        ))
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::CgroupRecord;
    use crate::runtime::Options;

    /// A runtime in a temporary directory with a one-file image `img` and a CNI network.
    fn runtime() -> (tempfile::TempDir, Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::write(rootfs.join("bin/true"), "").unwrap();
        let conf = dir.path().join("net.conflist");
        std::fs::write(&conf, r#"{"name":"tnet","plugins":[{"type":"tweed"}]}"#).unwrap();
        let rt = Runtime::new(Options {
            run_root: dir.path().join("run"),
            image_root: dir.path().join("lib"),
            host_netns: Some("/run/netns/h1".into()),
            cni_conf: conf,
            ..Options::default()
        })
        .unwrap();
        rt.images.import_rootfs(&rootfs, "img").unwrap();
        (dir, rt)
    }

    fn spec(net: &str) -> RunSpec {
        RunSpec {
            image: "img".into(),
            net: Some(net.into()),
            memory: Some("64m".into()),
            cpus: Some("0.5".into()),
            ..RunSpec::default()
        }
    }

    #[test]
    fn a_plan_says_where_everything_goes_before_anything_exists() {
        let (_dir, rt) = runtime();
        let layout = Layout::V2 {
            mount_point: "/sys/fs/cgroup".into(),
        };
        let p = rt.plan(&spec("overlay"), &layout).unwrap();
        let c = &p.config;
        let short = state::short_id(&c.id);
        assert_eq!(
            (c.name.as_str(), c.hostname.as_str()),
            (&*format!("c-{short}"), short)
        );
        assert_eq!(c.argv, ["/bin/sh"]);
        assert_eq!(c.cwd, "/");
        assert_eq!(
            c.cgroup,
            CgroupRecord::V2 {
                dir: format!("/sys/fs/cgroup/tweed/{}", c.id).into()
            }
        );
        assert_eq!(c.cpus.len(), 1, "half a CPU is pinned to one");
        // The init joins the namespace the network stage pins and CNI attaches.
        assert_eq!(c.netns_path, Some(rt.paths.netns(&c.id)));
        assert_eq!(p.join_netns, c.netns_path);
        assert_eq!(p.network.as_ref().map(|n| n.name.as_str()), Some("tnet"));
        assert_eq!(p.lowers.len(), 1);
        assert!(
            !rt.paths.state_dir(&c.id).exists(),
            "a plan creates nothing"
        );

        let none = rt.plan(&spec("none"), &layout).unwrap();
        assert_eq!((none.join_netns, none.config.netns_path), (None, None));
        assert!(none.network.is_none());
        let host = rt.plan(&spec("host"), &layout).unwrap();
        assert_eq!(host.join_netns, Some("/run/netns/h1".into()));
        assert_eq!(host.config.netns_path, None);
    }

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
}
