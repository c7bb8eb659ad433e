//! A lab: an underlay namespace with one or two bridges (segments), N host namespaces running
//! `tweedd`, etcd (one member or a cluster) in the underlay namespace, an "outside" namespace, and
//! K pods per host, attached through the tweed CNI plugin (or as tweedctl containers, or wired
//! directly).

use std::fmt;
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tweed_config::subnet_env::SubnetEnvError;
use tweed_config::SubnetEnv;

use crate::cmd::{self, CmdError};
use crate::containers::{self, RuntimeError, Tweedctl};
use crate::etcd::{self, EtcdError, EtcdOptions, EtcdProcess};
use crate::names::{self, NameError, Names};
use crate::netns;
use crate::pods::{self, CniError, PodsVia};
use crate::state::{
    self, EtcdMemberState, EtcdState, HostState, LabState, Phase, PodState, RuntimeState,
};

/// Where flannel (and tweed) look for the network config.
pub const CONFIG_KEY: &str = "/coreos.com/network/config";
const LOG_TAIL_LINES: usize = 30;
const KILL_GRACE: Duration = Duration::from_secs(5);
const CHECK_PARALLELISM: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("{0}")]
    Spec(String),
    #[error("tweed-lab needs root: it creates network namespaces (try sudo)")]
    NotRoot,
    #[error("`{program}` not found in PATH: install the Debian package `{package}`")]
    MissingProgram {
        program: &'static str,
        package: &'static str,
    },
    #[error("lab `{name}` already exists ({detail}): run `tweed-lab down --name {name}` first")]
    Exists { name: String, detail: String },
    #[error("no lab named `{name}`: {} not found{hint}", path.display())]
    NotFound {
        name: String,
        path: PathBuf,
        hint: String,
    },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{}: {source}", path.display())]
    StateJson {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error(transparent)]
    Etcd(Box<EtcdError>),
    #[error(transparent)]
    SubnetEnv(#[from] SubnetEnvError),
    #[error(transparent)]
    Cni(Box<CniError>),
    #[error(transparent)]
    Runtime(Box<RuntimeError>),
    #[error("tweedd on {host} (netns {netns}): {reason}; tail of {}:\n{tail}", log.display())]
    Agent {
        host: String,
        netns: String,
        reason: String,
        log: PathBuf,
        tail: String,
    },
    #[error("lab `{lab}` has no {target:?}: use underlay, outside, hN or hN/pM")]
    UnknownTarget { lab: String, target: String },
    #[error("interrupted")]
    Interrupted,
    #[error("tearing down lab `{name}` left problems:\n  {}", errors.join("\n  "))]
    Teardown { name: String, errors: Vec<String> },
}

impl From<EtcdError> for LabError {
    fn from(e: EtcdError) -> Self {
        LabError::Etcd(Box::new(e))
    }
}

impl From<CniError> for LabError {
    fn from(e: CniError) -> Self {
        LabError::Cni(Box::new(e))
    }
}

impl From<RuntimeError> for LabError {
    fn from(e: RuntimeError) -> Self {
        LabError::Runtime(Box::new(e))
    }
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LabError {
    let path = path.to_path_buf();
    move |source| LabError::Io { what, path, source }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Vxlan,
    HostGw,
    Udp,
}

impl Backend {
    /// The spelling of flannel's `Backend.Type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Vxlan => "vxlan",
            Backend::HostGw => "host-gw",
            Backend::Udp => "udp",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vxlan" => Ok(Backend::Vxlan),
            "host-gw" => Ok(Backend::HostGw),
            "udp" => Ok(Backend::Udp),
            other => Err(format!(
                "unknown backend {other:?}: expected vxlan, host-gw or udp"
            )),
        }
    }
}

/// The network config the lab writes to etcd (`DirectRouting` only when set, vxlan only).
pub fn network_config_json(backend: Backend, direct_routing: bool) -> String {
    let mut b = serde_json::json!({"Type": backend.as_str()});
    if direct_routing {
        b["DirectRouting"] = true.into();
    }
    serde_json::json!({
        "Network": names::OVERLAY_NETWORK,
        "SubnetLen": names::OVERLAY_SUBNET_LEN,
        "Backend": b,
    })
    .to_string()
}

/// What `up` builds.
#[derive(Debug, Clone)]
pub struct LabSpec {
    pub name: String,
    pub hosts: usize,
    pub backend: Backend,
    /// vxlan's `DirectRouting`: peers on the same underlay segment get plain routes.
    pub direct_routing: bool,
    /// Underlay segments: 1 (198.18.0.0/24) or 2 (hosts alternate between 198.18.0.0/24 and
    /// 198.18.1.0/24, routed by the underlay namespace).
    pub segments: usize,
    pub pods_per_host: usize,
    /// How pods are attached (default: the tweed CNI plugin).
    pub pods_via: PodsVia,
    /// Default: `tweedd` beside the running executable (or one directory up, for test binaries
    /// in `target/*/deps`), else in `$PATH`.
    pub tweedd: Option<PathBuf>,
    /// The tweed CNI plugin; found like `tweedd` (as `tweed`).
    pub cni_plugin: Option<PathBuf>,
    /// tweedctl, for `PodsVia::Runtime`; found like `tweedd`.
    pub tweedctl: Option<PathBuf>,
    /// etcd members: 1 (on 198.18.0.254) or a real cluster of 2-3 (198.18.0.251-253).
    pub etcd_members: usize,
    /// Pass `--ip-masq` to the agents (when their `--help` lists it).
    pub ip_masq: bool,
    pub lease_ttl: Duration,
    /// Default: [`state::default_root`].
    pub root: Option<PathBuf>,
    /// How long each agent may take to write its subnet.env.
    pub agent_timeout: Duration,
    /// Appended to every tweedd command line.
    pub agent_args: Vec<String>,
    /// Set it (e.g. from a SIGINT handler) to make `up` stop between steps and tear down.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl LabSpec {
    pub fn new(name: impl Into<String>, hosts: usize) -> Self {
        LabSpec {
            name: name.into(),
            hosts,
            backend: Backend::Vxlan,
            direct_routing: false,
            segments: 1,
            pods_per_host: 2,
            pods_via: PodsVia::default(),
            tweedd: None,
            cni_plugin: None,
            tweedctl: None,
            etcd_members: 1,
            ip_masq: true,
            lease_ttl: Duration::from_secs(300),
            root: None,
            agent_timeout: Duration::from_secs(30),
            agent_args: Vec::new(),
            cancel: None,
        }
    }
}

/// `tweed-lab status --output json`, key for key. Fields marked `skip` only feed the table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub hosts: Vec<HostStatus>,
    pub etcd: EtcdStatus,
    #[serde(skip)]
    pub lab: String,
    #[serde(skip)]
    pub ready: bool,
    #[serde(skip)]
    pub dir: PathBuf,
    #[serde(skip)]
    pub pods_via: String,
    /// `(netns, address)` of the outside namespace.
    #[serde(skip)]
    pub outside: Option<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    pub name: String,
    pub netns: String,
    pub public_ip: String,
    /// The node subnet, e.g. 10.244.3.0/24; null until the agent wrote subnet.env.
    pub subnet: Option<String>,
    pub backend: String,
    pub agent_pid: Option<u32>,
    pub log: String,
    /// `http://<public_ip>:9867/metrics` (reachable from the lab's namespaces); null when this
    /// tweedd has no `--metrics-addr`.
    pub metrics: Option<String>,
    /// The agent's gRPC socket (`tweedctl net --socket`); null when this tweedd has no
    /// `--api-socket`.
    pub api_socket: Option<String>,
    pub pods: Vec<PodStatus>,
    #[serde(skip)]
    pub agent_alive: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodStatus {
    pub name: String,
    pub netns: String,
    pub ip: String,
    /// The tweedctl container id (`--pods-via runtime`), else null.
    pub container_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdStatus {
    /// Every member's client URL.
    pub endpoints: Vec<String>,
    pub members: Vec<EtcdMemberStatus>,
    #[serde(skip)]
    pub pid: Option<u32>,
    #[serde(skip)]
    pub alive: bool,
}

/// One etcd member: what `etcd_members()` returns for fault tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdMemberStatus {
    pub name: String,
    pub endpoint: String,
    pub pid: u32,
    pub alive: bool,
}

impl Status {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("status serializes")
    }

    /// The human table.
    pub fn to_table(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let alive =
            |pid: u32, alive: bool| format!("pid {pid}, {}", if alive { "alive" } else { "DEAD" });
        let _ = writeln!(
            s,
            "lab {} ({}), pods via {}, state in {}",
            self.lab,
            if self.ready { "ready" } else { "INCOMPLETE" },
            self.pods_via,
            self.dir.display()
        );
        match (self.etcd.members.as_slice(), self.etcd.pid) {
            ([], None) => {
                let _ = writeln!(s, "etcd {} (not started)", self.etcd.endpoints.join(","));
            }
            ([], Some(p)) | ([_], Some(p)) => {
                let _ = writeln!(
                    s,
                    "etcd {} ({})",
                    self.etcd.endpoints.join(","),
                    alive(p, self.etcd.alive)
                );
            }
            (members, _) => {
                let _ = writeln!(s, "etcd cluster of {}:", members.len());
                for m in members {
                    let _ = writeln!(s, "  {} {} ({})", m.name, m.endpoint, alive(m.pid, m.alive));
                }
            }
        }
        if let Some((ns, ip)) = &self.outside {
            let _ = writeln!(s, "outside {ns} {ip}");
        }
        s.push('\n');
        let mut rows = vec![[
            "HOST".to_string(),
            "NETNS".into(),
            "PUBLIC_IP".into(),
            "SUBNET".into(),
            "BACKEND".into(),
            "AGENT".into(),
        ]];
        let mut agents = vec![[
            "HOST".to_string(),
            "METRICS".into(),
            "API_SOCKET".into(),
            "LOG".into(),
        ]];
        for h in &self.hosts {
            let agent = match (h.agent_pid, h.agent_alive) {
                (Some(p), true) => format!("{p} alive"),
                (Some(p), false) => format!("{p} DEAD"),
                (None, _) => "-".into(),
            };
            rows.push([
                h.name.clone(),
                h.netns.clone(),
                h.public_ip.clone(),
                h.subnet.clone().unwrap_or_else(|| "-".into()),
                h.backend.clone(),
                agent,
            ]);
            agents.push([
                h.name.clone(),
                h.metrics.clone().unwrap_or_else(|| "-".into()),
                h.api_socket.clone().unwrap_or_else(|| "-".into()),
                h.log.clone(),
            ]);
        }
        s.push_str(&table(&rows));
        s.push('\n');
        s.push_str(&table(&agents));
        let mut pods = vec![[
            "POD".to_string(),
            "NETNS".into(),
            "IP".into(),
            "CONTAINER".into(),
        ]];
        for h in &self.hosts {
            for p in &h.pods {
                pods.push([
                    format!("{}/{}", h.name, p.name),
                    p.netns.clone(),
                    p.ip.clone(),
                    p.container_id
                        .as_deref()
                        .map(|c| c.chars().take(12).collect())
                        .unwrap_or_else(|| "-".into()),
                ]);
            }
        }
        if pods.len() > 1 {
            s.push('\n');
            s.push_str(&table(&pods));
        }
        s
    }
}

fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut s = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        s.push_str(line.join("  ").trim_end());
        s.push('\n');
    }
    s
}

/// One ping of `check`.
#[derive(Debug, Clone)]
pub struct PingResult {
    /// `h1/p1`
    pub from: String,
    pub to: String,
    pub to_ip: Ipv4Addr,
    pub ok: bool,
    /// ping's summary, or why it could not run.
    pub detail: String,
}

#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    pub results: Vec<PingResult>,
}

impl CheckReport {
    pub fn passed(&self) -> usize {
        self.results.iter().filter(|r| r.ok).count()
    }
    pub fn failed(&self) -> usize {
        self.results.len() - self.passed()
    }
    pub fn failures(&self) -> impl Iterator<Item = &PingResult> {
        self.results.iter().filter(|r| !r.ok)
    }
    /// `N passed, M failed`
    pub fn summary(&self) -> String {
        format!("{} passed, {} failed", self.passed(), self.failed())
    }
}

/// What `down` did.
#[derive(Debug, Clone, Default)]
pub struct DownReport {
    pub namespaces: Vec<String>,
    pub killed: usize,
    pub state_dir_removed: bool,
    /// Best-effort steps that failed without leaving anything behind (e.g. a CNI DEL whose
    /// namespace was deleted anyway).
    pub warnings: Vec<String>,
}

/// A lab that exists. Dropping it leaves it running (use [`LabGuard`] or [`Lab::down`]).
#[derive(Debug)]
pub struct Lab {
    names: Names,
    dir: PathBuf,
    state: LabState,
    /// Processes this process spawned, so `down` from the same process can reap them.
    children: Vec<Child>,
}

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
        let tools = preflight(&spec)?;
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
                backend: spec.backend.to_string(),
                direct_routing: spec.direct_routing,
                network: names::OVERLAY_NETWORK.into(),
                segments: spec.segments,
                pods_per_host: spec.pods_per_host,
                pods_via: spec.pods_via.to_string(),
                tweedd: tools.tweedd,
                cni_plugin: tools.cni_plugin,
                cni_path: None,
                runtime,
                lease_ttl: humantime::format_duration(spec.lease_ttl).to_string(),
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
        let path = state::state_file(&dir);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let leftovers = lab_namespaces(&names, None);
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
                    path,
                    hint,
                });
            }
            Err(e) => return Err(io_err("cannot read", &path)(e)),
        };
        let state: LabState =
            serde_json::from_str(&text).map_err(|source| LabError::StateJson {
                path: path.clone(),
                source,
            })?;
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

    pub fn status(&self) -> Status {
        let hosts = self
            .state
            .hosts
            .iter()
            .map(|h| {
                let subnet = SubnetEnv::read(&h.subnet_file)
                    .ok()
                    .map(|e| e.node_subnet().to_string())
                    .or_else(|| {
                        h.subnet
                            .as_deref()
                            .and_then(|s| s.parse::<ipnetwork::Ipv4Network>().ok())
                            .and_then(|n| ipnetwork::Ipv4Network::new(n.network(), n.prefix()).ok())
                            .map(|n| n.to_string())
                    });
                HostStatus {
                    name: h.name.clone(),
                    netns: h.netns.clone(),
                    public_ip: h.public_ip.to_string(),
                    subnet,
                    backend: self.state.backend.clone(),
                    agent_pid: h.agent_pid,
                    log: h.log.display().to_string(),
                    metrics: h.metrics.clone(),
                    api_socket: h.api_socket.as_ref().map(|p| p.display().to_string()),
                    pods: h
                        .pods
                        .iter()
                        .map(|p| PodStatus {
                            name: p.name.clone(),
                            netns: p.netns.clone(),
                            ip: p.ip.to_string(),
                            container_id: p.container_id.clone(),
                        })
                        .collect(),
                    agent_alive: h.agent_pid.is_some_and(|p| netns::pid_in(&h.netns, p)),
                }
            })
            .collect();
        let etcd = match &self.state.etcd {
            Some(e) => EtcdStatus {
                endpoints: e.endpoints.clone(),
                members: self.etcd_members(),
                pid: Some(e.pid),
                alive: netns::pid_in(&self.state.underlay_netns, e.pid),
            },
            None => EtcdStatus {
                endpoints: vec![names::etcd_endpoint()],
                members: Vec::new(),
                pid: None,
                alive: false,
            },
        };
        let outside = self
            .state
            .outside_netns
            .clone()
            .map(|ns| (ns, names::OUTSIDE_IP.to_string()));
        Status {
            hosts,
            etcd,
            lab: self.name().to_string(),
            ready: self.state.phase == Phase::Ready,
            dir: self.dir.clone(),
            pods_via: self.state.pods_via.clone(),
            outside,
        }
    }

    /// The etcd members, each with its pid and whether it is alive (for fault tests).
    pub fn etcd_members(&self) -> Vec<EtcdMemberStatus> {
        let Some(e) = &self.state.etcd else {
            return Vec::new();
        };
        let members = if e.members.is_empty() {
            // A state.json from before clusters: its one member.
            vec![EtcdMemberState {
                name: "lab".into(),
                pid: e.pid,
                endpoint: e.endpoints.first().cloned().unwrap_or_default(),
                data_dir: e.data_dir.clone(),
                log: e.log.clone(),
            }]
        } else {
            e.members.clone()
        };
        members
            .into_iter()
            .map(|m| EtcdMemberStatus {
                alive: netns::pid_in(&self.state.underlay_netns, m.pid),
                name: m.name,
                endpoint: m.endpoint,
                pid: m.pid,
            })
            .collect()
    }

    /// The etcd endpoints of the members that are alive.
    pub fn etcd_live_endpoints(&self) -> Vec<String> {
        self.etcd_members()
            .into_iter()
            .filter(|m| m.alive)
            .map(|m| m.endpoint)
            .collect()
    }

    /// Runs etcdctl in the underlay namespace against the live members; returns stdout.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String, LabError> {
        Ok(etcd::etcdctl(
            Some(&self.state.underlay_netns),
            &self.etcd_live_endpoints(),
            args,
        )?)
    }

    /// The name of the current etcd leader, from `etcdctl endpoint status -w json` over the live
    /// members; `None` while there is none (no quorum, or an election under way).
    pub fn etcd_leader(&self) -> Result<Option<String>, LabError> {
        let out = self.etcdctl(&[
            "--dial-timeout=1s",
            "--command-timeout=2s",
            "endpoint",
            "status",
            "-w",
            "json",
        ]);
        // An unreachable member makes etcdctl fail, but the others still printed their status.
        let text = match out {
            Ok(t) => t,
            Err(LabError::Etcd(e)) => match &*e {
                EtcdError::Command(CmdError::Failed { stdout, .. }) => stdout.clone(),
                _ => return Err(LabError::Etcd(e)),
            },
            Err(e) => return Err(e),
        };
        let statuses: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap_or_default();
        let leader_endpoint = statuses.iter().find_map(|st| {
            let me = st["Status"]["header"]["member_id"].as_u64()?;
            let leader = st["Status"]["leader"].as_u64()?;
            (me == leader).then(|| st["Endpoint"].as_str().map(str::to_string))?
        });
        Ok(leader_endpoint.and_then(|ep| {
            self.etcd_members()
                .into_iter()
                .find(|m| m.endpoint == ep)
                .map(|m| m.name)
        }))
    }

    /// SIGKILLs etcd member `name` and waits until it is gone. The lab's `down` copes.
    pub fn kill_etcd_member(&self, name: &str) -> Result<(), LabError> {
        let m = self
            .etcd_members()
            .into_iter()
            .find(|m| m.name == name)
            .ok_or_else(|| {
                LabError::Spec(format!("lab {} has no etcd member {name}", self.name()))
            })?;
        if m.alive {
            cmd::signal(m.pid, libc::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while netns::pid_in(&self.state.underlay_netns, m.pid) {
            if Instant::now() >= deadline {
                return Err(LabError::Spec(format!(
                    "etcd member {name} (pid {}) survived SIGKILL",
                    m.pid
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Pings from every pod to every pod on the other hosts, in parallel.
    pub fn check(&self) -> Result<CheckReport, LabError> {
        cmd::find_program("ping").ok_or(LabError::MissingProgram {
            program: "ping",
            package: "iputils-ping",
        })?;
        let mut jobs = Vec::new();
        for a in &self.state.hosts {
            for b in self.state.hosts.iter().filter(|b| b.name != a.name) {
                for pa in &a.pods {
                    for pb in &b.pods {
                        jobs.push((
                            format!("{}/{}", a.name, pa.name),
                            pa.netns.clone(),
                            format!("{}/{}", b.name, pb.name),
                            pb.ip,
                        ));
                    }
                }
            }
        }
        let queue = std::sync::Mutex::new(jobs.into_iter().enumerate().collect::<Vec<_>>());
        let results = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..CHECK_PARALLELISM {
                s.spawn(|| loop {
                    let Some((i, (from, ns, to, ip))) = queue.lock().unwrap().pop() else {
                        break;
                    };
                    let r = ping(&from, &ns, &to, ip);
                    results.lock().unwrap().push((i, r));
                });
            }
        });
        let mut results = results.into_inner().unwrap();
        results.sort_by_key(|(i, _)| *i);
        Ok(CheckReport {
            results: results.into_iter().map(|(_, r)| r).collect(),
        })
    }

    /// Repeats `check` until nothing fails or `timeout` has passed; returns the last report. The
    /// data plane converges a little after `up` (agents learn of each other through etcd).
    pub fn check_until(&self, timeout: Duration) -> Result<CheckReport, LabError> {
        let start = Instant::now();
        loop {
            let report = self.check()?;
            if report.failed() == 0 || start.elapsed() >= timeout {
                return Ok(report);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The namespace behind an `exec` target: `underlay`, `hN` or `hN/pM`.
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
        teardown(&self.names, &self.dir, state.as_ref(), &mut self.children)
    }

    fn save(&self) -> Result<(), LabError> {
        let path = state::state_file(&self.dir);
        let tmp = self.dir.join(".state.json.tmp");
        let text = serde_json::to_string_pretty(&self.state).expect("state serializes");
        fs::write(&tmp, text + "\n").map_err(io_err("cannot write", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("cannot write", &path))
    }

    fn build(
        &mut self,
        spec: &LabSpec,
        progress: &mut dyn FnMut(&str, Duration) -> Result<(), LabError>,
    ) -> Result<(), LabError> {
        self.save()?;
        let u = self.names.underlay_ns();

        let t = Instant::now();
        netns::add(&u)?;
        let mut what = Vec::new();
        for seg in 0..spec.segments {
            let gw = format!("{}/{}", names::segment_gateway(seg), names::UNDERLAY_PREFIX);
            let br = names::segment_bridge(seg);
            netns::bridge(&u, &br, Some(&gw), None)?;
            what.push(format!("bridge {br} {gw}"));
        }
        if spec.segments > 1 {
            netns::sysctl(&u, "net.ipv4.ip_forward", "1")?;
            what.push("routing between them".into());
        }
        if spec.etcd_members > 1 {
            for m in 1..=spec.etcd_members {
                let a = format!("{}/{}", names::etcd_member_ip(m), names::UNDERLAY_PREFIX);
                netns::ip(&u, &["addr", "add", &a, "dev", names::UNDERLAY_BRIDGE])?;
            }
        }
        step(progress, format!("underlay {u}: {}", what.join(", ")), t)?;

        let t = Instant::now();
        let o = self.add_outside()?;
        step(
            progress,
            format!("outside {o}: {} (not in the overlay)", names::OUTSIDE_IP),
            t,
        )?;

        for i in 1..=spec.hosts {
            let t = Instant::now();
            let h = self.add_host(i, spec)?;
            step(
                progress,
                format!(
                    "host {} ({}, {}{})",
                    h.name,
                    h.netns,
                    h.public_ip,
                    if spec.segments > 1 {
                        format!(", segment {}", ["A", "B"][h.segment])
                    } else {
                        String::new()
                    }
                ),
                t,
            )?;
        }

        let t = Instant::now();
        self.start_etcd(spec)?;
        let endpoints = self
            .state
            .etcd
            .as_ref()
            .expect("etcd started")
            .endpoints
            .clone();
        step(progress, format!("etcd {} in {u}", endpoints.join(",")), t)?;

        let t = Instant::now();
        let config = network_config_json(spec.backend, spec.direct_routing);
        etcd::etcdctl(Some(&u), &endpoints, &["put", CONFIG_KEY, &config])?;
        step(
            progress,
            format!("network config {CONFIG_KEY} = {config}"),
            t,
        )?;

        let flags = agent_flags(&self.state.tweedd);
        for idx in 0..self.state.hosts.len() {
            let t = Instant::now();
            let pid = self.start_agent(idx, spec, &flags)?;
            step(
                progress,
                format!("tweedd on {} (pid {pid})", self.state.hosts[idx].name),
                t,
            )?;
        }

        let cancel = spec.cancel.clone();
        let envs = self.wait_subnets(
            spec.agent_timeout,
            cancel.as_deref(),
            &mut |host, env, took| {
                progress(
                    &format!("subnet.env of {host}: {} mtu {}", env.subnet, env.mtu),
                    took,
                )
            },
        )?;

        if let Some(plugin) = self.state.cni_plugin.clone() {
            let bin = self.dir.join("cni-bin");
            let path = pods::cni_bin_dir(&bin, &plugin).map_err(io_err("cannot create", &bin))?;
            self.state.cni_path = Some(path);
            self.save()?;
        }
        if spec.pods_via == PodsVia::Runtime && spec.pods_per_host > 0 {
            let t = Instant::now();
            let rt = self.tweedctl().expect("runtime mode has tweedctl");
            let rootfs = self.dir.join("busybox-rootfs");
            containers::busybox_rootfs(&rootfs)?;
            rt.import_rootfs(&rootfs, containers::IMAGE)?;
            let _ = fs::remove_dir_all(&rootfs);
            step(
                progress,
                format!(
                    "image {} (busybox-static) in {}",
                    containers::IMAGE,
                    rt.image_root.display()
                ),
                t,
            )?;
        }

        for (idx, env) in envs.iter().enumerate() {
            let t = Instant::now();
            let ips = match spec.pods_via {
                PodsVia::Direct => self.direct_pods(idx, env, spec.pods_per_host)?,
                PodsVia::Cni => self.cni_pods(idx, spec.pods_per_host)?,
                PodsVia::Runtime => self.runtime_pods(idx, spec.pods_per_host)?,
            };
            self.save()?;
            let h = &self.state.hosts[idx];
            step(
                progress,
                format!(
                    "pods on {} via {}: {} {}",
                    h.name,
                    spec.pods_via,
                    names::POD_BRIDGE,
                    env.subnet
                ) + &ips.iter().map(|s| format!(", {s}")).collect::<String>(),
                t,
            )?;
        }

        self.state.phase = Phase::Ready;
        self.save()
    }

    /// tweedctl with this lab's state directories (`--pods-via runtime` labs only).
    pub fn tweedctl(&self) -> Option<Tweedctl> {
        self.state.runtime.as_ref().map(|r| Tweedctl {
            bin: r.tweedctl.clone(),
            root: r.root.clone(),
            image_root: r.image_root.clone(),
            cni_path: self.state.cni_path.clone(),
        })
    }

    /// The lab's own `ip` wiring.
    fn direct_pods(
        &mut self,
        idx: usize,
        env: &SubnetEnv,
        count: usize,
    ) -> Result<Vec<String>, LabError> {
        let h = &self.state.hosts[idx];
        let (host_name, host_ns) = (h.name.clone(), h.netns.clone());
        let plan = pods::plan(&self.names, idx + 1, env, count)
            .map_err(|e| LabError::Spec(format!("pods on {host_name}: {e}")))?;
        pods::wire_bridge(&host_ns, env)?;
        let mut ips = Vec::new();
        for p in &plan {
            pods::wire_pod(&host_ns, env, p)?;
            self.state.hosts[idx].pods.push(PodState {
                name: p.name.clone(),
                netns: p.netns.clone(),
                ip: p.ip.ip(),
                container_id: None,
            });
            ips.push(format!("{} {}", p.name, p.ip.ip()));
        }
        Ok(ips)
    }

    /// A namespace per pod, attached by the tweed CNI plugin (ADD, run in the host namespace).
    fn cni_pods(&mut self, idx: usize, count: usize) -> Result<Vec<String>, LabError> {
        let mut ips = Vec::new();
        for p in 1..=count {
            let (name, pod_ns) = (self.names.pod(p), self.names.pod_ns(idx + 1, p));
            netns::add(&pod_ns)?;
            let ip = {
                let h = &self.state.hosts[idx];
                let conf = self.plugin_conf(h)?;
                pods::cni_add(&pods::CniCall {
                    plugin: self.state.cni_plugin.as_deref().expect("plugin"),
                    cni_path: self.state.cni_path.as_deref().expect("cni path"),
                    host_ns: &h.netns,
                    container_id: &pod_ns,
                    pod_ns: &pod_ns,
                    conf: &conf,
                })?
            };
            self.state.hosts[idx].pods.push(PodState {
                name: name.clone(),
                netns: pod_ns,
                ip: ip.ip(),
                container_id: None,
            });
            self.save()?;
            ips.push(format!("{name} {}", ip.ip()));
        }
        Ok(ips)
    }

    /// A tweedctl container per pod; its namespace is also named like a pod's.
    fn runtime_pods(&mut self, idx: usize, count: usize) -> Result<Vec<String>, LabError> {
        let rt = self.tweedctl().expect("runtime mode has tweedctl");
        let mut ips = Vec::new();
        for p in 1..=count {
            let (name, pod_ns) = (self.names.pod(p), self.names.pod_ns(idx + 1, p));
            let h = &self.state.hosts[idx];
            let conf = h.cni_conf.clone().expect("plugin modes have a conflist");
            let host = containers::HostNet {
                host_ns: &h.netns,
                cni_conf: &conf,
            };
            let id = rt.run_pod(&host, &format!("{}-{name}", h.name))?;
            let (pid, ip) = rt.pid_and_ip(&id)?;
            let ip: Ipv4Addr = ip.parse().map_err(|_| {
                LabError::Spec(format!("container {id} has no IPv4 address: {ip:?}"))
            })?;
            cmd::run(Command::new("ip").args(["netns", "attach", &pod_ns, &pid.to_string()]))?;
            self.state.hosts[idx].pods.push(PodState {
                name: name.clone(),
                netns: pod_ns,
                ip,
                container_id: Some(id.clone()),
            });
            self.save()?;
            ips.push(format!(
                "{name} {ip} (container {})",
                &id[..id.len().min(12)]
            ));
        }
        Ok(ips)
    }

    /// The first plugin's configuration from host `h`'s conflist, as a runtime sends it.
    fn plugin_conf(&self, h: &HostState) -> Result<serde_json::Value, LabError> {
        let path = h
            .cni_conf
            .clone()
            .ok_or_else(|| LabError::Spec(format!("host {} has no CNI conflist", h.name)))?;
        let text = fs::read_to_string(&path).map_err(io_err("cannot read", &path))?;
        let list: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| LabError::StateJson { path, source })?;
        Ok(pods::plugin_conf(&list))
    }

    /// The namespace outside the overlay: on segment A at 198.18.0.250, default route via the
    /// underlay (which knows nothing of 10.244.0.0/16: only masqueraded traffic gets answers).
    fn add_outside(&mut self) -> Result<String, LabError> {
        let u = self.names.underlay_ns();
        let o = self.names.outside_ns();
        self.state.outside_netns = Some(o.clone());
        self.save()?;
        netns::add(&o)?;
        netns::veth(&u, names::OUTSIDE_VETH, &o, names::HOST_IFACE, None)?;
        netns::ip(
            &u,
            &[
                "link",
                "set",
                names::OUTSIDE_VETH,
                "master",
                names::UNDERLAY_BRIDGE,
            ],
        )?;
        netns::ip(
            &o,
            &[
                "addr",
                "add",
                &format!("{}/{}", names::OUTSIDE_IP, names::UNDERLAY_PREFIX),
                "dev",
                names::HOST_IFACE,
            ],
        )?;
        netns::ip(
            &o,
            &[
                "route",
                "add",
                "default",
                "via",
                &names::UNDERLAY_GW.to_string(),
            ],
        )?;
        Ok(o)
    }

    fn add_host(&mut self, i: usize, spec: &LabSpec) -> Result<HostState, LabError> {
        let u = self.names.underlay_ns();
        let ns = self.names.host_ns(i);
        let name = self.names.host(i);
        let host_dir = self.dir.join("hosts").join(&name);
        fs::create_dir_all(&host_dir).map_err(io_err("cannot create", &host_dir))?;
        let segment = names::host_segment(i, spec.segments);
        let subnet_file = host_dir.join("subnet.env");
        let cni_conf = if spec.pods_via.uses_plugin() {
            let path = host_dir.join(pods::CONFLIST);
            let parent = path.parent().expect("conflist has a directory");
            fs::create_dir_all(parent).map_err(io_err("cannot create", parent))?;
            let list = pods::conflist(&subnet_file, &host_dir.join("ipam"));
            fs::write(
                &path,
                serde_json::to_string_pretty(&list).expect("json") + "\n",
            )
            .map_err(io_err("cannot write", &path))?;
            Some(path)
        } else {
            None
        };
        let h = HostState {
            name,
            netns: ns.clone(),
            public_ip: names::host_public_ip(i, spec.segments),
            agent_pid: None,
            log: host_dir.join("tweedd.log"),
            subnet_file,
            agent_state_dir: host_dir.join("lib"),
            segment,
            api_socket: None,
            metrics: None,
            cni_conf,
            subnet: None,
            mtu: None,
            pods: Vec::new(),
        };
        // Record before creating, so a failure halfway still names it in state.json.
        self.state.hosts.push(h.clone());
        self.save()?;
        netns::add(&ns)?;
        let uveth = self.names.underlay_veth(i);
        netns::veth(&u, &uveth, &ns, names::HOST_IFACE, None)?;
        netns::ip(
            &u,
            &[
                "link",
                "set",
                &uveth,
                "master",
                &names::segment_bridge(segment),
            ],
        )?;
        netns::ip(
            &ns,
            &[
                "addr",
                "add",
                &format!("{}/{}", h.public_ip, names::UNDERLAY_PREFIX),
                "dev",
                names::HOST_IFACE,
            ],
        )?;
        // Beyond its segment (etcd on a cluster address, the other segment, outside) via the
        // underlay namespace.
        netns::ip(
            &ns,
            &[
                "route",
                "add",
                "default",
                "via",
                &names::segment_gateway(segment).to_string(),
            ],
        )?;
        netns::sysctl(&ns, "net.ipv4.ip_forward", "1")?;
        Ok(h)
    }

    /// One etcd on 198.18.0.254:2379, or a cluster on 198.18.0.251-253, in the underlay namespace.
    fn start_etcd(&mut self, spec: &LabSpec) -> Result<(), LabError> {
        let u = self.names.underlay_ns();
        let mut opts = Vec::new();
        if spec.etcd_members <= 1 {
            let mut o = EtcdOptions::local("lab", self.dir.join("etcd"));
            o.listen_ip = IpAddr::V4(names::UNDERLAY_GW);
            o.log_file = Some(self.dir.join("etcd.log"));
            opts.push(o);
        } else {
            for m in 1..=spec.etcd_members {
                let mut o = EtcdOptions::local(
                    format!("etcd{m}"),
                    self.dir.join("etcd").join(format!("etcd{m}")),
                );
                o.listen_ip = IpAddr::V4(names::etcd_member_ip(m));
                o.log_file = Some(self.dir.join(format!("etcd{m}.log")));
                opts.push(o);
            }
        }
        for o in &mut opts {
            o.netns = Some(u.clone());
            o.client_port = names::ETCD_CLIENT_PORT;
            o.peer_port = names::ETCD_PEER_PORT;
        }
        let started = if opts.len() == 1 {
            vec![EtcdProcess::start_daemon(opts.pop().expect("one"))?]
        } else {
            let initial = opts
                .iter()
                .map(|o| format!("{}={}", o.name, o.peer_url()))
                .collect::<Vec<_>>()
                .join(",");
            for o in &mut opts {
                o.initial_cluster = Some(initial.clone());
                o.cluster_token = Some(format!("tweed-lab-{}", self.name()));
            }
            EtcdProcess::start_cluster(opts, true)?
        };
        let members: Vec<EtcdMemberState> = started
            .iter()
            .map(|e| EtcdMemberState {
                name: e.name().to_string(),
                pid: e.pid(),
                endpoint: e.endpoints().concat(),
                data_dir: e.data_dir().to_path_buf(),
                log: e.log_file().to_path_buf(),
            })
            .collect();
        self.state.etcd = Some(EtcdState {
            pid: members[0].pid,
            endpoints: members.iter().map(|m| m.endpoint.clone()).collect(),
            data_dir: if members.len() == 1 {
                members[0].data_dir.clone()
            } else {
                self.dir.join("etcd")
            },
            log: members[0].log.clone(),
            members,
        });
        for e in started {
            self.children.extend(e.into_child());
        }
        self.save()
    }

    fn start_agent(
        &mut self,
        idx: usize,
        spec: &LabSpec,
        flags: &AgentFlags,
    ) -> Result<u32, LabError> {
        let endpoints = self
            .state
            .etcd
            .as_ref()
            .map(|e| e.endpoints.join(","))
            .unwrap_or_else(names::etcd_endpoint);
        let h = &self.state.hosts[idx];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&h.log)
            .map_err(io_err("cannot open", &h.log))?;
        let log2 = log.try_clone().map_err(io_err("cannot open", &h.log))?;
        let _ = fs::remove_file(&h.subnet_file);
        let given = |flag: &str| {
            spec.agent_args
                .iter()
                .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
        };
        let mut c = netns::exec_command(&h.netns, &[&self.state.tweedd]);
        c.arg("--etcd-endpoints")
            .arg(&endpoints)
            .args(["--iface", names::HOST_IFACE])
            .arg("--subnet-file")
            .arg(&h.subnet_file)
            .arg("--state-dir")
            .arg(&h.agent_state_dir)
            .arg("--lease-ttl")
            .arg(&self.state.lease_ttl);
        let api_socket = (flags.api_socket && !given("--api-socket"))
            .then(|| h.log.with_file_name("tweedd.sock"));
        if let Some(sock) = &api_socket {
            c.arg("--api-socket").arg(sock);
        }
        if flags.ip_masq && spec.ip_masq && !given("--ip-masq") {
            c.arg("--ip-masq");
        }
        let metrics = (flags.metrics_addr && !given("--metrics-addr"))
            .then(|| format!("http://{}:{}/metrics", h.public_ip, names::METRICS_PORT));
        c.args(&spec.agent_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // Its own session: the agent must outlive `tweed-lab up` and ignore its terminal's ^C.
        cmd::new_session(&mut c);
        let child = c.spawn().map_err(|source| {
            LabError::Cmd(CmdError::Spawn {
                command: cmd::display(&c),
                source,
            })
        })?;
        let pid = child.id();
        self.children.push(child);
        let h = &mut self.state.hosts[idx];
        h.agent_pid = Some(pid);
        h.api_socket = api_socket;
        h.metrics = metrics;
        self.save()?;
        Ok(pid)
    }

    /// Waits for every host's subnet.env; fails fast when an agent dies.
    fn wait_subnets(
        &mut self,
        timeout: Duration,
        cancel: Option<&AtomicBool>,
        on_ready: &mut dyn FnMut(&str, &SubnetEnv, Duration) -> Result<(), LabError>,
    ) -> Result<Vec<SubnetEnv>, LabError> {
        let start = Instant::now();
        let n = self.state.hosts.len();
        let mut envs: Vec<Option<SubnetEnv>> = vec![None; n];
        let mut last_err: Vec<Option<String>> = vec![None; n];
        loop {
            for i in 0..n {
                if envs[i].is_some() {
                    continue;
                }
                let h = &self.state.hosts[i];
                match SubnetEnv::read(&h.subnet_file) {
                    Ok(env) => {
                        on_ready(&h.name, &env, start.elapsed())?;
                        self.state.hosts[i].subnet = Some(env.subnet.to_string());
                        self.state.hosts[i].mtu = Some(env.mtu);
                        envs[i] = Some(env);
                        continue;
                    }
                    Err(SubnetEnvError::Io { source, .. })
                        if source.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => last_err[i] = Some(e.to_string()),
                }
                let pid = h.agent_pid.unwrap_or(0);
                if let Some(child) = self.children.iter_mut().find(|c| c.id() == pid) {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(self.agent_error(
                            i,
                            format!(
                                "exited ({status}) before writing {}",
                                h.subnet_file.display()
                            ),
                        ));
                    }
                }
            }
            if envs.iter().all(Option::is_some) {
                self.save()?;
                return Ok(envs.into_iter().flatten().collect());
            }
            if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                return Err(LabError::Interrupted);
            }
            if start.elapsed() >= timeout {
                let i = envs
                    .iter()
                    .position(Option::is_none)
                    .expect("one is missing");
                let h = &self.state.hosts[i];
                let why = last_err[i]
                    .clone()
                    .unwrap_or_else(|| format!("no {}", h.subnet_file.display()));
                return Err(self.agent_error(i, format!("{why} after {timeout:?}")));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn agent_error(&self, i: usize, reason: String) -> LabError {
        let h = &self.state.hosts[i];
        LabError::Agent {
            host: h.name.clone(),
            netns: h.netns.clone(),
            reason,
            log: h.log.clone(),
            tail: cmd::tail(&h.log, LOG_TAIL_LINES),
        }
    }
}

/// Reports a finished step; errors when the caller asked to stop.
fn step(
    progress: &mut dyn FnMut(&str, Duration) -> Result<(), LabError>,
    what: String,
    t: Instant,
) -> Result<(), LabError> {
    progress(&what, t.elapsed())
}

fn ping(from: &str, ns: &str, to: &str, ip: Ipv4Addr) -> PingResult {
    let out = netns::exec_command(
        ns,
        &[
            "ping",
            "-n",
            "-q",
            "-c",
            "2",
            "-W",
            "1",
            "-i",
            "0.2",
            &ip.to_string(),
        ],
    )
    .stdin(Stdio::null())
    .output();
    let (ok, detail) = match out {
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stdout);
            let summary = text
                .lines()
                .find(|l| l.contains("packets transmitted"))
                .unwrap_or("")
                .to_string();
            let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
            (
                o.status.success(),
                [summary, err]
                    .into_iter()
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        }
        Err(e) => (false, format!("cannot run ping in {ns}: {e}")),
    };
    PingResult {
        from: from.into(),
        to: to.into(),
        to_ip: ip,
        ok,
        detail,
    }
}

/// Tears down lab `name` under the default root, with or without a (complete) state.json.
pub fn down(name: &str) -> Result<DownReport, LabError> {
    down_in(&state::default_root(), name)
}

pub fn down_in(root: &Path, name: &str) -> Result<DownReport, LabError> {
    let names = Names::new(name)?;
    let dir = root.join(name);
    // A corrupt or half-written state must not stop a teardown: the namespace scan covers it.
    let state: Option<LabState> = fs::read_to_string(state::state_file(&dir))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    teardown(&names, &dir, state.as_ref(), &mut Vec::new())
}

/// The lab's namespaces that exist: from the state file and from `ip netns list`, pods first so
/// that hosts (whose bridges the pods' cables hang on) go after them.
fn lab_namespaces(names: &Names, state: Option<&LabState>) -> Vec<String> {
    let mut all: Vec<String> = netns::list()
        .unwrap_or_default()
        .into_iter()
        .filter(|ns| names.owns_netns(ns))
        .collect();
    if let Some(s) = state {
        all.push(s.underlay_netns.clone());
        all.extend(s.outside_netns.clone());
        for h in &s.hosts {
            all.push(h.netns.clone());
            all.extend(h.pods.iter().map(|p| p.netns.clone()));
        }
    }
    all.retain(|ns| names.owns_netns(ns) && netns::exists(ns));
    all.sort_by_key(|ns| {
        let depth = if ns == &names.underlay_ns() {
            2
        } else if ns.matches('-').count() > names.prefix().matches('-').count() {
            0
        } else {
            1
        };
        (depth, ns.clone())
    });
    all.dedup();
    all
}

fn teardown(
    names: &Names,
    dir: &Path,
    state: Option<&LabState>,
    children: &mut Vec<Child>,
) -> Result<DownReport, LabError> {
    let mut errors = Vec::new();
    // Pods first, while agents, hosts and pod namespaces still exist: best effort, as a node
    // would (the namespaces go anyway).
    let warnings = detach_pods(dir, state);
    let namespaces = lab_namespaces(names, state);
    let before: usize = namespaces.iter().map(|ns| netns::pids(ns).len()).sum();
    let left = netns::kill_all(&namespaces, KILL_GRACE);
    if !left.is_empty() {
        errors.push(format!("processes survived SIGKILL: {left:?}"));
    }
    for mut c in children.drain(..) {
        let _ = c.kill();
        let _ = c.wait();
    }
    for ns in &namespaces {
        if let Err(e) = netns::del(ns) {
            errors.push(e.to_string());
        }
    }
    // Whatever a container left mounted under the lab directory (overlay roots, netns files).
    errors.extend(unmount_under(dir));
    let mut removed = false;
    match fs::remove_dir_all(dir) {
        Ok(()) => removed = true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => errors.push(format!("cannot remove {}: {e}", dir.display())),
    }
    if errors.is_empty() {
        Ok(DownReport {
            namespaces,
            killed: before,
            state_dir_removed: removed,
            warnings,
        })
    } else {
        Err(LabError::Teardown {
            name: names.lab().into(),
            errors,
        })
    }
}

/// Runs CNI DEL for the lab's CNI pods and `tweedctl rm -f` for its containers; returns what
/// failed.
fn detach_pods(dir: &Path, state: Option<&LabState>) -> Vec<String> {
    let mut warnings = Vec::new();
    // Containers: every one in the lab's runtime root, recorded in state.json or not (an `up`
    // may have died between `run` and saving).
    let runtime_root = dir.join("runtime");
    if runtime_root.join("containers").is_dir() {
        let rt = match state.and_then(|s| s.runtime.as_ref()) {
            Some(r) => Some(Tweedctl {
                bin: r.tweedctl.clone(),
                root: r.root.clone(),
                image_root: r.image_root.clone(),
                cni_path: state.and_then(|s| s.cni_path.clone()),
            }),
            None => find_binary("tweedctl", None).ok().map(|bin| Tweedctl {
                bin,
                root: runtime_root.clone(),
                image_root: dir.join("images"),
                cni_path: Some(dir.join("cni-bin")).filter(|p| p.is_dir()),
            }),
        };
        match rt {
            Some(rt) => {
                if let Err(e) = rt.ids().and_then(|ids| rt.remove(&ids)) {
                    warnings.push(format!("removing the lab's containers: {e}"));
                }
            }
            None => warnings.push("containers left: tweedctl not found".into()),
        }
    }
    let Some(s) = state else {
        return warnings;
    };
    if s.pods_via != PodsVia::Cni.as_str() {
        return warnings;
    }
    let (Some(plugin), Some(cni_path)) = (&s.cni_plugin, &s.cni_path) else {
        return warnings;
    };
    for h in s.hosts.iter().filter(|h| netns::exists(&h.netns)) {
        let Some(conf) = h
            .cni_conf
            .as_ref()
            .and_then(|p| fs::read_to_string(p).ok())
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .map(|l| pods::plugin_conf(&l))
        else {
            continue;
        };
        for p in &h.pods {
            let call = pods::CniCall {
                plugin,
                cni_path,
                host_ns: &h.netns,
                container_id: &p.netns,
                pod_ns: &p.netns,
                conf: &conf,
            };
            if let Err(e) = pods::cni_del(&call) {
                warnings.push(e.to_string());
            }
        }
    }
    warnings
}

/// Lazily unmounts every mount point under `dir` (deepest first); returns failures.
fn unmount_under(dir: &Path) -> Vec<String> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let Ok(dir) = fs::canonicalize(dir) else {
        return Vec::new();
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(&dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    points.dedup();
    let mut errors = Vec::new();
    for p in points {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
            continue;
        };
        // SAFETY: a valid NUL-terminated path; umount2 has no memory-safety preconditions.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::ENOENT) {
                errors.push(format!("cannot unmount {}: {e}", p.display()));
            }
        }
    }
    errors
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The programs `up` runs.
#[derive(Debug)]
struct Tools {
    tweedd: PathBuf,
    cni_plugin: Option<PathBuf>,
    tweedctl: Option<PathBuf>,
}

/// Checks what `up` needs before it touches anything; returns the programs to run.
fn preflight(spec: &LabSpec) -> Result<Tools, LabError> {
    if !(1..=names::MAX_HOSTS).contains(&spec.hosts) {
        return Err(LabError::Spec(format!(
            "--hosts must be 1 to {}, not {}",
            names::MAX_HOSTS,
            spec.hosts
        )));
    }
    if spec.pods_per_host > 250 {
        return Err(LabError::Spec(format!(
            "--pods-per-host {} does not fit a /{} node subnet",
            spec.pods_per_host,
            names::OVERLAY_SUBNET_LEN
        )));
    }
    if spec.direct_routing && spec.backend != Backend::Vxlan {
        return Err(LabError::Spec(format!(
            "--direct-routing is a vxlan option; backend {} has none",
            spec.backend
        )));
    }
    if !(1..=names::MAX_SEGMENTS).contains(&spec.segments) {
        return Err(LabError::Spec(format!(
            "--segments must be 1 to {}, not {}",
            names::MAX_SEGMENTS,
            spec.segments
        )));
    }
    if !(1..=names::MAX_ETCD_MEMBERS).contains(&spec.etcd_members) {
        return Err(LabError::Spec(format!(
            "--etcd-members must be 1 to {}, not {}",
            names::MAX_ETCD_MEMBERS,
            spec.etcd_members
        )));
    }
    // SAFETY: geteuid cannot fail and has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(LabError::NotRoot);
    }
    let mut needed = vec![
        ("ip", "iproute2"),
        ("sysctl", "procps"),
        ("etcd", "etcd-server"),
        ("etcdctl", "etcd-client"),
    ];
    if spec.pods_via == PodsVia::Runtime {
        needed.push(("busybox", "busybox-static"));
    }
    for (program, package) in needed {
        cmd::find_program(program).ok_or(LabError::MissingProgram { program, package })?;
    }
    Ok(Tools {
        tweedd: find_binary("tweedd", spec.tweedd.as_deref())?,
        cni_plugin: spec
            .pods_via
            .uses_plugin()
            .then(|| find_binary("tweed", spec.cni_plugin.as_deref()))
            .transpose()?,
        tweedctl: (spec.pods_via == PodsVia::Runtime)
            .then(|| find_binary("tweedctl", spec.tweedctl.as_deref()))
            .transpose()?,
    })
}

/// `explicit`, else `name` beside the running executable (or one directory up, for test
/// binaries in `target/*/deps`), else in `$PATH`.
fn find_binary(name: &str, explicit: Option<&Path>) -> Result<PathBuf, LabError> {
    let (package, flag) = match name {
        "tweedd" => ("tweed-agent", "--tweedd"),
        "tweed" => ("tweed-cni", "--cni-plugin"),
        _ => ("tweed-runtime", "--tweedctl"),
    };
    if let Some(p) = explicit {
        return fs::canonicalize(p)
            .map_err(|e| LabError::Spec(format!("{name} {}: {e}", p.display())));
    }
    let exe_dirs = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
        .map(|d| vec![d.clone(), d.join("..")])
        .unwrap_or_default();
    exe_dirs
        .into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .or_else(|| cmd::find_program(name))
        .and_then(|p| fs::canonicalize(p).ok())
        .ok_or_else(|| {
            LabError::Spec(format!(
                "{name} not found beside tweed-lab nor in PATH: build it \
                 (cargo build -p {package}) or pass {flag} PATH"
            ))
        })
}

/// Which of the optional flags this tweedd takes (from its `--help`), so the lab works with
/// agents older than a flag.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct AgentFlags {
    api_socket: bool,
    ip_masq: bool,
    metrics_addr: bool,
}

fn agent_flags(tweedd: &Path) -> AgentFlags {
    let help = help_text(tweedd, Duration::from_secs(10));
    parse_agent_flags(&help)
}

fn parse_agent_flags(help: &str) -> AgentFlags {
    let has = |flag: &str| {
        help.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == '=')
            .any(|w| w == flag)
    };
    AgentFlags {
        api_socket: has("--api-socket"),
        ip_masq: has("--ip-masq"),
        metrics_addr: has("--metrics-addr"),
    }
}

/// `PROGRAM --help`'s stdout, or "" when it fails or takes longer than `timeout`.
fn help_text(program: &Path, timeout: Duration) -> String {
    use std::io::Read as _;
    let Ok(mut child) = Command::new(program)
        .arg("--help")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    else {
        return String::new();
    };
    let mut out = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
        }
    }
    reader.join().unwrap_or_default()
}

/// Creates the lab's directory, refusing when the lab (or something of it) already exists.
fn claim_dir(names: &Names, root: &Path, dir: &Path) -> Result<(), LabError> {
    fs::create_dir_all(root).map_err(io_err("cannot create", root))?;
    let exists = |detail: String| LabError::Exists {
        name: names.lab().into(),
        detail,
    };
    let leftovers = lab_namespaces(names, None);
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
                    io_err("cannot create", dir)(e)
                }
            })
        }
        Err(e) => Err(io_err("cannot create", dir)(e)),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_status() -> Status {
        Status {
            hosts: vec![HostStatus {
                name: "h1".into(),
                netns: "twl-demo-h1".into(),
                public_ip: "198.18.0.1".into(),
                subnet: Some("10.244.3.0/24".into()),
                backend: "vxlan".into(),
                agent_pid: Some(4242),
                log: "/run/tweed-lab/demo/hosts/h1/tweedd.log".into(),
                metrics: Some("http://198.18.0.1:9867/metrics".into()),
                api_socket: Some("/run/tweed-lab/demo/hosts/h1/tweedd.sock".into()),
                pods: vec![PodStatus {
                    name: "p1".into(),
                    netns: "twl-demo-h1-p1".into(),
                    ip: "10.244.3.2".into(),
                    container_id: None,
                }],
                agent_alive: true,
            }],
            etcd: EtcdStatus {
                endpoints: vec!["http://198.18.0.254:2379".into()],
                members: vec![EtcdMemberStatus {
                    name: "lab".into(),
                    endpoint: "http://198.18.0.254:2379".into(),
                    pid: 7,
                    alive: true,
                }],
                pid: Some(7),
                alive: true,
            },
            lab: "demo".into(),
            ready: true,
            dir: "/run/tweed-lab/demo".into(),
            pods_via: "cni".into(),
            outside: Some(("twl-demo-o".into(), "198.18.0.250".into())),
        }
    }

    #[test]
    fn status_json_has_exactly_the_documented_keys() {
        let v: serde_json::Value = serde_json::from_str(&sample_status().to_json()).unwrap();
        let keys = |v: &serde_json::Value| {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(keys(&v), ["etcd", "hosts"]);
        assert_eq!(keys(&v["etcd"]), ["endpoints", "members"]);
        assert_eq!(
            keys(&v["etcd"]["members"][0]),
            ["alive", "endpoint", "name", "pid"]
        );
        assert_eq!(
            keys(&v["hosts"][0]),
            [
                "agent_pid",
                "api_socket",
                "backend",
                "log",
                "metrics",
                "name",
                "netns",
                "pods",
                "public_ip",
                "subnet"
            ]
        );
        assert_eq!(
            keys(&v["hosts"][0]["pods"][0]),
            ["container_id", "ip", "name", "netns"]
        );
        assert_eq!(v["hosts"][0]["agent_pid"], 4242);
        assert_eq!(v["hosts"][0]["metrics"], "http://198.18.0.1:9867/metrics");
        assert_eq!(
            v["hosts"][0]["api_socket"],
            "/run/tweed-lab/demo/hosts/h1/tweedd.sock"
        );
        assert_eq!(v["hosts"][0]["subnet"], "10.244.3.0/24");
        assert_eq!(v["etcd"]["endpoints"][0], "http://198.18.0.254:2379");
    }

    #[test]
    fn status_json_nulls_when_unknown() {
        let mut s = sample_status();
        s.hosts[0].subnet = None;
        s.hosts[0].agent_pid = None;
        s.hosts[0].metrics = None;
        s.hosts[0].api_socket = None;
        let v: serde_json::Value = serde_json::from_str(&s.to_json()).unwrap();
        assert!(v["hosts"][0]["subnet"].is_null());
        assert!(v["hosts"][0]["agent_pid"].is_null());
        assert!(v["hosts"][0]["metrics"].is_null());
        assert!(v["hosts"][0]["api_socket"].is_null());
        assert!(v["hosts"][0]["pods"][0]["container_id"].is_null());
    }

    #[test]
    fn status_table_lists_hosts_and_pods() {
        let t = sample_status().to_table();
        assert!(t.contains("HOST"), "{t}");
        assert!(t.contains("4242 alive"), "{t}");
        assert!(t.contains("h1/p1"), "{t}");
        assert!(t.contains("10.244.3.2"), "{t}");
        assert!(t.contains("http://198.18.0.1:9867/metrics"), "{t}");
        assert!(
            t.contains("/run/tweed-lab/demo/hosts/h1/tweedd.sock"),
            "{t}"
        );
        assert!(t.contains("outside twl-demo-o 198.18.0.250"), "{t}");
        assert!(t.contains("pods via cni"), "{t}");
        let mut s = sample_status();
        s.etcd.members = (1..=3)
            .map(|i| EtcdMemberStatus {
                name: format!("etcd{i}"),
                endpoint: format!("http://198.18.0.25{i}:2379"),
                pid: 10 + i,
                alive: i != 2,
            })
            .collect();
        let t = s.to_table();
        assert!(t.contains("etcd cluster of 3"), "{t}");
        assert!(
            t.contains("etcd2 http://198.18.0.252:2379 (pid 12, DEAD)"),
            "{t}"
        );
    }

    #[test]
    fn config_json_is_flannels() {
        assert_eq!(
            network_config_json(Backend::Vxlan, false),
            r#"{"Backend":{"Type":"vxlan"},"Network":"10.244.0.0/16","SubnetLen":24}"#
        );
        let v: serde_json::Value =
            serde_json::from_str(&network_config_json(Backend::HostGw, false)).unwrap();
        assert_eq!(v["Backend"]["Type"], "host-gw");
        let v: serde_json::Value =
            serde_json::from_str(&network_config_json(Backend::Udp, false)).unwrap();
        assert_eq!(v["Backend"]["Type"], "udp");
        let v: serde_json::Value =
            serde_json::from_str(&network_config_json(Backend::Vxlan, true)).unwrap();
        assert_eq!(v["Backend"]["DirectRouting"], true);
    }

    #[test]
    fn backends_parse() {
        assert_eq!("vxlan".parse::<Backend>().unwrap(), Backend::Vxlan);
        assert_eq!("host-gw".parse::<Backend>().unwrap(), Backend::HostGw);
        assert_eq!("udp".parse::<Backend>().unwrap(), Backend::Udp);
        assert!("ipip"
            .parse::<Backend>()
            .unwrap_err()
            .contains("unknown backend"));
    }

    #[test]
    fn preflight_rejects_impossible_specs() {
        let err = |f: &dyn Fn(&mut LabSpec)| {
            let mut spec = LabSpec::new("x", 2);
            f(&mut spec);
            preflight(&spec).unwrap_err().to_string()
        };
        let e = err(&|s| {
            s.backend = Backend::HostGw;
            s.direct_routing = true;
        });
        assert!(
            e.contains("--direct-routing") && e.contains("host-gw"),
            "{e}"
        );
        assert!(err(&|s| s.hosts = 0).contains("--hosts"));
        assert!(err(&|s| s.hosts = 250).contains("--hosts"));
        assert!(err(&|s| s.segments = 3).contains("--segments"));
        assert!(err(&|s| s.segments = 0).contains("--segments"));
        assert!(err(&|s| s.etcd_members = 4).contains("--etcd-members"));
        assert!(err(&|s| s.pods_per_host = 251).contains("--pods-per-host"));
    }

    #[test]
    fn agent_flags_come_from_help() {
        let help = "Options:\n      --api-socket <PATH>\n          Unix socket\n      \
                    --ip-masq[=<BOOL>]\n      --metrics-addr <HOST:PORT>\n";
        assert_eq!(
            parse_agent_flags(help),
            AgentFlags {
                api_socket: true,
                ip_masq: true,
                metrics_addr: true
            }
        );
        // An older agent: none of them; a flag's mention in prose does not count.
        let old = "Options:\n      --iface <NAME>\n   see --ip-masquerade docs\n";
        assert_eq!(parse_agent_flags(old), AgentFlags::default());
    }

    #[test]
    fn help_of_a_program_that_never_exits_is_cut_off() {
        let t = Instant::now();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hang");
        fs::write(&p, "#!/bin/sh\necho --ip-masq\nexec sleep 100\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        let help = help_text(&p, Duration::from_millis(300));
        assert!(help.contains("--ip-masq"), "{help:?}");
        assert!(t.elapsed() < Duration::from_secs(5));
        assert_eq!(
            help_text(Path::new("/nonexistent/x"), Duration::from_secs(1)),
            ""
        );
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mountinfo(r"/run/a\040b/c"), "/run/a b/c");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/end\"), r"/end\");
    }

    #[test]
    fn check_summary_line() {
        let mut r = CheckReport::default();
        for ok in [true, true, false] {
            r.results.push(PingResult {
                from: "h1/p1".into(),
                to: "h2/p1".into(),
                to_ip: Ipv4Addr::new(10, 244, 2, 2),
                ok,
                detail: String::new(),
            });
        }
        assert_eq!(r.summary(), "2 passed, 1 failed");
        assert_eq!(r.failures().count(), 1);
    }
}
