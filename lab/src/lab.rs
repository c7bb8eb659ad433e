//! [`Lab`]: a lab that exists, and `up`, the order in which one is built: the underlay and the
//! outside namespace, the hosts, etcd and the network config, one agent per host, then (once every
//! agent holds a lease) the pods. Each step records itself in state.json before it acts, so that
//! `down` finds it even when `up` dies halfway. [`LabGuard`] downs a lab on Drop.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::agents::{self, AgentOptions};
use crate::cmd;
use crate::containers::{self, Tweedctl};
use crate::down::{self, DownReport};
use crate::error::{io_err, LabError};
use crate::etcd;
use crate::etcd_cluster;
use crate::names::{self, Names};
use crate::netns;
use crate::pods::{self, Attach};
use crate::spec::IpFamily;
use crate::spec::{self, LabSpec, CONFIG_KEY};
use crate::state::{self, LabState, Phase, RuntimeState};
use crate::topology;

/// A lab that exists. Dropping it leaves it running (use [`LabGuard`] or [`Lab::down`]).
#[derive(Debug)]
pub struct Lab {
    pub(crate) names: Names,
    pub(crate) dir: PathBuf,
    pub(crate) state: LabState,
    /// Processes this process spawned, so `down` from the same process can reap them.
    pub(crate) children: Vec<Child>,
}

/// Reports a finished step; errors when the caller asked to stop.
type Progress<'a> = dyn FnMut(&str, Duration) -> Result<(), LabError> + 'a;

impl Lab {
    /// Builds a lab, printing each step and its duration to stderr. On failure (or panic) it
    /// tears down whatever it had made before returning.
    pub fn up(spec: LabSpec) -> Result<Lab, LabError> {
        Self::up_with_progress(spec, &mut |step, took| {
            eprintln!("[{:>6.2}s] {step}", took.as_secs_f64());
        })
    }

    pub fn up_with_progress(
        spec: LabSpec,
        progress: &mut dyn FnMut(&str, Duration),
    ) -> Result<Lab, LabError> {
        let names = Names::new(&spec.name)?;
        let tools = spec::preflight(&spec)?;
        let root = spec.root.clone().unwrap_or_else(state::default_root);
        let dir = root.join(&spec.name);
        claim_dir(&names, &root, &dir)?;
        let runtime = tools.tweedctl.map(|bin| RuntimeState {
            tweedctl: bin,
            root: dir.join("runtime"),
            image_root: dir.join("images"),
            image: containers::IMAGE.into(),
        });
        let lab = Lab {
            state: LabState {
                name: spec.name.clone(),
                phase: Phase::Creating,
                backend: spec.backend,
                direct_routing: spec.direct_routing,
                network: names::OVERLAY_NETWORK.into(),
                segments: spec.segments,
                ip_family: spec.ip_family,
                pods_per_host: spec.pods_per_host,
                pods_via: spec.pods_via,
                tweedd: tools.tweedd,
                cni_plugin: tools.cni_plugin,
                cni_path: None,
                runtime,
                lease_ttl: spec.lease_ttl,
                underlay_netns: names.underlay_ns(),
                outside_netns: None,
                etcd: None,
                hosts: Vec::new(),
            },
            names,
            dir,
            children: Vec::new(),
        };
        // The guard tears down on `?` and on panic alike.
        let mut guard = LabGuard(Some(lab));
        let cancel = spec.cancel.clone();
        let mut progress = |what: &str, took: Duration| -> Result<(), LabError> {
            progress(what, took);
            match &cancel {
                Some(c) if c.load(Ordering::Relaxed) => Err(LabError::Interrupted),
                _ => Ok(()),
            }
        };
        guard.lab_mut().build(&spec, &mut progress)?;
        Ok(guard.into_inner())
    }

    /// The lab `name` under [`state::default_root`].
    pub fn load(name: &str) -> Result<Lab, LabError> {
        Self::load_in(&state::default_root(), name)
    }

    pub fn load_in(root: &Path, name: &str) -> Result<Lab, LabError> {
        let names = Names::new(name)?;
        let dir = root.join(name);
        let Some(state) = LabState::read(&dir)? else {
            let leftovers = down::lab_namespaces(&names, None);
            let hint = if leftovers.is_empty() {
                String::new()
            } else {
                format!(
                    " (but namespaces {} exist: `tweed-lab down --name {name}` removes them)",
                    leftovers.join(", ")
                )
            };
            return Err(LabError::NotFound {
                name: name.into(),
                path: state::state_file(&dir),
                hint,
            });
        };
        Ok(Lab {
            names,
            dir,
            state,
            children: Vec::new(),
        })
    }

    pub fn name(&self) -> &str {
        self.names.lab()
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    pub fn state(&self) -> &LabState {
        &self.state
    }

    /// The lab's directory (state.json, logs, etcd data).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn guard(self) -> LabGuard {
        LabGuard(Some(self))
    }

    /// tweedctl with this lab's state directories (`--pods-via runtime` labs only).
    pub fn tweedctl(&self) -> Option<Tweedctl> {
        containers::of_lab(&self.state)
    }

    /// The namespace behind an `exec` target: `underlay`, `outside`, `hN` or `hN/pM`.
    pub fn netns_of(&self, target: &str) -> Result<String, LabError> {
        self.names
            .target_ns(target)
            .filter(|ns| netns::exists(ns))
            .ok_or_else(|| LabError::UnknownTarget {
                lab: self.name().into(),
                target: target.into(),
            })
    }

    /// A command that runs `argv` in `target`'s namespace; the caller picks stdio and runs it.
    pub fn command<S: AsRef<std::ffi::OsStr>>(
        &self,
        target: &str,
        argv: &[S],
    ) -> Result<Command, LabError> {
        Ok(netns::exec_command(&self.netns_of(target)?, argv))
    }

    /// Runs `argv` in `target`'s namespace; its stdout, or an error with its stderr.
    pub fn exec(&self, target: &str, argv: &[&str]) -> Result<String, LabError> {
        let mut c = self.command(target, argv)?;
        c.stdin(Stdio::null());
        Ok(cmd::run(&mut c)?)
    }

    /// Kills the agents and etcd, deletes the namespaces and the state directory.
    pub fn down(mut self) -> Result<DownReport, LabError> {
        let state = Some(self.state.clone());
        down::teardown(
            &self.names,
            &self.dir,
            state.as_ref(),
            &mut self.children,
            Vec::new(),
        )
    }

    fn save(&self) -> Result<(), LabError> {
        Ok(self.state.write(&self.dir)?)
    }

    fn build(&mut self, spec: &LabSpec, progress: &mut Progress<'_>) -> Result<(), LabError> {
        self.save()?;
        let u = self.names.underlay_ns();

        let t = Instant::now();
        let what = topology::add_underlay(
            &self.names,
            spec.segments,
            spec.etcd_members,
            spec.ip_family,
        )?;
        progress(&format!("underlay {u}: {what}"), t.elapsed())?;

        let t = Instant::now();
        let o = self.names.outside_ns();
        self.state.outside_netns = Some(o.clone());
        self.save()?;
        topology::add_outside(&self.names, spec.ip_family)?;
        progress(
            &format!("outside {o}: {} (not in the overlay)", names::OUTSIDE_IP),
            t.elapsed(),
        )?;

        for i in 1..=spec.hosts {
            let t = Instant::now();
            self.add_host(i)?;
            let h = &self.state.hosts[i - 1];
            let segment = if spec.segments > 1 {
                format!(", segment {}", ["A", "B"][h.segment])
            } else {
                String::new()
            };
            // An IPv6-only host has only its IPv6 underlay address (the IPv4 one is unused).
            let addr = match (spec.ip_family, h.public_ip6) {
                (IpFamily::V6, Some(ip6)) => ip6.to_string(),
                _ => h.public_ip.to_string(),
            };
            progress(
                &format!("host {} ({}, {addr}{segment})", h.name, h.netns),
                t.elapsed(),
            )?;
        }

        let t = Instant::now();
        let (etcd_state, children) =
            etcd_cluster::start(&self.names, &self.dir, spec.etcd_members, spec.ip_family)?;
        let endpoints = etcd_state.endpoints.clone();
        self.state.etcd = Some(etcd_state);
        self.children.extend(children);
        self.save()?;
        progress(&format!("etcd {} in {u}", endpoints.join(",")), t.elapsed())?;

        let t = Instant::now();
        let mut config =
            spec::network_config_json(spec.backend, spec.direct_routing, spec.ip_family);
        if let (Some(mode), spec::Backend::Wireguard) = (&spec.wireguard_mode, spec.backend) {
            let mut c: serde_json::Value =
                serde_json::from_str(&config).expect("network_config_json writes JSON");
            c["Backend"]["Mode"] = mode.as_str().into();
            config = c.to_string();
        }
        etcd::etcdctl(Some(&u), &endpoints, &["put", CONFIG_KEY, &config])?;
        progress(
            &format!("network config {CONFIG_KEY} = {config}"),
            t.elapsed(),
        )?;

        let tweedd = self.state.tweedd.clone();
        let agent = AgentOptions {
            tweedd: &tweedd,
            endpoints: &endpoints,
            lease_ttl: self.state.lease_ttl,
            ip_masq: spec.ip_masq,
            v6_only: spec.ip_family == IpFamily::V6,
            extra: &spec.agent_args,
        };
        for idx in 0..self.state.hosts.len() {
            let t = Instant::now();
            let launch = agents::launch(&self.state.hosts[idx], &agent);
            let child = agents::start(&self.state.hosts[idx], &launch)?;
            let pid = child.id();
            self.children.push(child);
            let h = &mut self.state.hosts[idx];
            h.agent_pid = Some(pid);
            h.api_socket = launch.api_socket;
            h.metrics = launch.metrics;
            self.save()?;
            let h = &self.state.hosts[idx];
            progress(&format!("tweedd on {} (pid {pid})", h.name), t.elapsed())?;
        }

        let envs = if spec.ip_family == IpFamily::V6 {
            agents::wait_subnets_v6(
                &mut self.state.hosts,
                &mut self.children,
                spec.agent_timeout,
                spec.cancel.as_deref(),
                &mut |host, subnet, took| {
                    progress(&format!("subnet.env of {host}: {subnet} (IPv6 only)"), took)
                },
            )?
        } else {
            agents::wait_subnets(
                &mut self.state.hosts,
                &mut self.children,
                spec.agent_timeout,
                spec.cancel.as_deref(),
                &mut |host, env, took| {
                    progress(
                        &format!("subnet.env of {host}: {} mtu {}", env.subnets(), env.mtu),
                        took,
                    )
                },
            )?
        };
        self.save()?;

        if let Some(plugin) = self.state.cni_plugin.clone() {
            let bin = self.dir.join("cni-bin");
            let path =
                crate::cni::cni_bin_dir(&bin, &plugin).map_err(io_err("cannot create", &bin))?;
            self.state.cni_path = Some(path);
            self.save()?;
        }
        let attach = Attach::of_lab(&self.state)?;
        if let Attach::Runtime(rt) = &attach {
            if spec.pods_per_host > 0 {
                let t = Instant::now();
                let rootfs = self.dir.join("busybox-rootfs");
                containers::busybox_rootfs(&rootfs)?;
                rt.import_rootfs(&rootfs, containers::IMAGE)?;
                let _ = fs::remove_dir_all(&rootfs);
                progress(
                    &format!(
                        "image {} (busybox-static) in {}",
                        containers::IMAGE,
                        rt.image_root.display()
                    ),
                    t.elapsed(),
                )?;
            }
        }

        for (idx, env) in envs.iter().enumerate() {
            let t = Instant::now();
            pods::prepare_host(&attach, &self.state.hosts[idx], env)?;
            let mut what = format!(
                "pods on {} via {}: {} {}",
                self.state.hosts[idx].name,
                spec.pods_via,
                names::POD_BRIDGE,
                env.subnets()
            );
            for p in 1..=spec.pods_per_host {
                let h = &self.state.hosts[idx];
                let pod = pods::attach_pod(&attach, &self.names, idx + 1, h, env, p)?;
                what.push_str(&format!(", {}", pods::describe(&pod)));
                self.state.hosts[idx].pods.push(pod);
                self.save()?;
            }
            progress(&what, t.elapsed())?;
        }

        self.state.phase = Phase::Ready;
        self.save()
    }

    /// Host `i`: its directory, its conflist (for the plugin modes), then its wires. Recorded
    /// before it is made, so a failure halfway still names it in state.json.
    fn add_host(&mut self, i: usize) -> Result<(), LabError> {
        let mut h = topology::host_state(
            &self.names,
            &self.dir,
            i,
            self.state.segments,
            self.state.ip_family,
        );
        let host_dir = topology::host_dir(&self.dir, &h.name);
        fs::create_dir_all(&host_dir).map_err(io_err("cannot create", &host_dir))?;
        if self.state.pods_via.uses_plugin() {
            h.cni_conf = Some(pods::write_conflist(&host_dir, &h.subnet_file)?);
        }
        self.state.hosts.push(h);
        self.save()?;
        topology::add_host(
            &self.names,
            i,
            &self.state.hosts[i - 1],
            self.state.ip_family,
        )
    }
}

/// Creates the lab's directory, refusing when the lab (or something of it) already exists.
fn claim_dir(names: &Names, root: &Path, dir: &Path) -> Result<(), LabError> {
    fs::create_dir_all(root).map_err(io_err("cannot create", root))?;
    let exists = |detail: String| LabError::Exists {
        name: names.lab().into(),
        detail,
    };
    let leftovers = down::lab_namespaces(names, None);
    if !leftovers.is_empty() {
        return Err(exists(format!("namespaces {}", leftovers.join(", "))));
    }
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let sf = state::state_file(dir);
            if sf.exists() {
                return Err(exists(format!("{}", sf.display())));
            }
            // A directory without state and without namespaces is debris of an old teardown.
            fs::remove_dir_all(dir).map_err(io_err("cannot remove", dir))?;
            fs::create_dir(dir).map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    exists(format!("{} appeared meanwhile", dir.display()))
                } else {
                    io_err("cannot create", dir)(e).into()
                }
            })
        }
        Err(e) => Err(io_err("cannot create", dir)(e).into()),
    }
}

/// Owns a lab and takes it down on Drop (errors go to stderr), also when a test panics.
#[derive(Debug)]
pub struct LabGuard(Option<Lab>);

impl LabGuard {
    pub fn up(spec: LabSpec) -> Result<LabGuard, LabError> {
        Ok(Lab::up(spec)?.guard())
    }

    /// Disarms the guard: the lab stays up.
    pub fn into_inner(mut self) -> Lab {
        self.0.take().expect("guard holds a lab")
    }

    pub fn down(mut self) -> Result<DownReport, LabError> {
        self.0.take().expect("guard holds a lab").down()
    }

    fn lab_mut(&mut self) -> &mut Lab {
        self.0.as_mut().expect("guard holds a lab")
    }
}

impl std::ops::Deref for LabGuard {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        self.0.as_ref().expect("guard holds a lab")
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Some(lab) = self.0.take() {
            let name = lab.name().to_string();
            if let Err(e) = lab.down() {
                eprintln!("tweed-lab: tearing down lab {name}: {e}");
            }
        }
    }
}
