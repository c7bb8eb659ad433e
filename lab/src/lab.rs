//! A lab: an underlay namespace with a bridge, N host namespaces running `tweedd`, etcd in the
//! underlay namespace, and K pod namespaces per host.

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
use crate::etcd::{self, EtcdError, EtcdOptions, EtcdProcess};
use crate::names::{self, NameError, Names};
use crate::netns;
use crate::pods;
use crate::state::{self, EtcdState, HostState, LabState, Phase, PodState};

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
    #[error("tweedd on {host} (netns {netns}): {reason}; tail of {}:\n{tail}", log.display())]
    Agent {
        host: String,
        netns: String,
        reason: String,
        log: PathBuf,
        tail: String,
    },
    #[error("lab `{lab}` has no {target:?}: use underlay, hN or hN/pM")]
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

/// The network config the lab writes to etcd.
pub fn network_config_json(backend: Backend) -> String {
    serde_json::json!({
        "Network": names::OVERLAY_NETWORK,
        "SubnetLen": names::OVERLAY_SUBNET_LEN,
        "Backend": {"Type": backend.as_str()},
    })
    .to_string()
}

/// What `up` builds.
#[derive(Debug, Clone)]
pub struct LabSpec {
    pub name: String,
    pub hosts: usize,
    pub backend: Backend,
    pub pods_per_host: usize,
    /// Default: `tweedd` beside the running executable (or one directory up, for test binaries
    /// in `target/*/deps`), else in `$PATH`.
    pub tweedd: Option<PathBuf>,
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
            pods_per_host: 2,
            tweedd: None,
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
    pub pods: Vec<PodStatus>,
    #[serde(skip)]
    pub agent_alive: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodStatus {
    pub name: String,
    pub netns: String,
    pub ip: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdStatus {
    pub endpoints: Vec<String>,
    #[serde(skip)]
    pub pid: Option<u32>,
    #[serde(skip)]
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
        let etcd_pid = match (self.etcd.pid, self.etcd.alive) {
            (Some(p), true) => format!("pid {p}, alive"),
            (Some(p), false) => format!("pid {p}, DEAD"),
            (None, _) => "not started".into(),
        };
        let _ = writeln!(
            s,
            "lab {} ({}), state in {}",
            self.lab,
            if self.ready { "ready" } else { "INCOMPLETE" },
            self.dir.display()
        );
        let _ = writeln!(s, "etcd {} ({etcd_pid})", self.etcd.endpoints.join(","));
        let mut rows = vec![[
            "HOST".to_string(),
            "NETNS".into(),
            "PUBLIC_IP".into(),
            "SUBNET".into(),
            "BACKEND".into(),
            "AGENT".into(),
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
                h.log.clone(),
            ]);
        }
        s.push_str(&table(&rows));
        let mut pods = vec![["POD".to_string(), "NETNS".into(), "IP".into()]];
        for h in &self.hosts {
            for p in &h.pods {
                pods.push([
                    format!("{}/{}", h.name, p.name),
                    p.netns.clone(),
                    p.ip.clone(),
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
        let tweedd = preflight(&spec)?;
        let root = spec.root.clone().unwrap_or_else(state::default_root);
        let dir = root.join(&spec.name);
        claim_dir(&names, &root, &dir)?;
        let lab = Lab {
            state: LabState {
                name: spec.name.clone(),
                phase: Phase::Creating,
                backend: spec.backend.to_string(),
                network: names::OVERLAY_NETWORK.into(),
                pods_per_host: spec.pods_per_host,
                tweedd,
                lease_ttl: humantime::format_duration(spec.lease_ttl).to_string(),
                underlay_netns: names.underlay_ns(),
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
                    pods: h
                        .pods
                        .iter()
                        .map(|p| PodStatus {
                            name: p.name.clone(),
                            netns: p.netns.clone(),
                            ip: p.ip.to_string(),
                        })
                        .collect(),
                    agent_alive: h.agent_pid.is_some_and(|p| netns::pid_in(&h.netns, p)),
                }
            })
            .collect();
        let etcd = match &self.state.etcd {
            Some(e) => EtcdStatus {
                endpoints: e.endpoints.clone(),
                pid: Some(e.pid),
                alive: netns::pid_in(&self.state.underlay_netns, e.pid),
            },
            None => EtcdStatus {
                endpoints: vec![names::etcd_endpoint()],
                pid: None,
                alive: false,
            },
        };
        Status {
            hosts,
            etcd,
            lab: self.name().to_string(),
            ready: self.state.phase == Phase::Ready,
            dir: self.dir.clone(),
        }
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
        let gw = format!("{}/{}", names::UNDERLAY_GW, names::UNDERLAY_PREFIX);
        netns::bridge(&u, names::UNDERLAY_BRIDGE, Some(&gw), None)?;
        step(
            progress,
            format!("underlay {u}: bridge {} {gw}", names::UNDERLAY_BRIDGE),
            t,
        )?;

        for i in 1..=spec.hosts {
            let t = Instant::now();
            let h = self.add_host(i)?;
            step(
                progress,
                format!("host {} ({}, {})", h.name, h.netns, h.public_ip),
                t,
            )?;
        }

        let t = Instant::now();
        let mut opts = EtcdOptions::local("lab", self.dir.join("etcd"));
        opts.netns = Some(u.clone());
        opts.listen_ip = IpAddr::V4(names::UNDERLAY_GW);
        opts.client_port = names::ETCD_CLIENT_PORT;
        opts.peer_port = names::ETCD_PEER_PORT;
        opts.log_file = Some(self.dir.join("etcd.log"));
        let etcd = EtcdProcess::start_daemon(opts)?;
        let endpoints = etcd.endpoints();
        self.state.etcd = Some(EtcdState {
            pid: etcd.pid(),
            endpoints: endpoints.clone(),
            data_dir: etcd.data_dir().to_path_buf(),
            log: etcd.log_file().to_path_buf(),
        });
        self.children.extend(etcd.into_child());
        self.save()?;
        step(progress, format!("etcd {} in {u}", endpoints.join(",")), t)?;

        let t = Instant::now();
        let config = network_config_json(spec.backend);
        etcd::etcdctl(Some(&u), &endpoints, &["put", CONFIG_KEY, &config])?;
        step(
            progress,
            format!("network config {CONFIG_KEY} = {config}"),
            t,
        )?;

        for idx in 0..self.state.hosts.len() {
            let t = Instant::now();
            let pid = self.start_agent(idx, spec)?;
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

        for (idx, env) in envs.iter().enumerate() {
            let t = Instant::now();
            let h = &self.state.hosts[idx];
            let (host_name, host_ns) = (h.name.clone(), h.netns.clone());
            let plan = pods::plan(&self.names, idx + 1, env, spec.pods_per_host)
                .map_err(|e| LabError::Spec(format!("pods on {host_name}: {e}")))?;
            pods::wire_bridge(&host_ns, env)?;
            let mut ips = Vec::new();
            for p in &plan {
                pods::wire_pod(&host_ns, env, p)?;
                self.state.hosts[idx].pods.push(PodState {
                    name: p.name.clone(),
                    netns: p.netns.clone(),
                    ip: p.ip.ip(),
                });
                ips.push(format!("{} {}", p.name, p.ip.ip()));
            }
            self.save()?;
            step(
                progress,
                format!("pods on {host_name}: {} {}", names::POD_BRIDGE, env.subnet)
                    + &ips.iter().map(|s| format!(", {s}")).collect::<String>(),
                t,
            )?;
        }

        self.state.phase = Phase::Ready;
        self.save()
    }

    fn add_host(&mut self, i: usize) -> Result<HostState, LabError> {
        let u = self.names.underlay_ns();
        let ns = self.names.host_ns(i);
        let name = self.names.host(i);
        let host_dir = self.dir.join("hosts").join(&name);
        fs::create_dir_all(&host_dir).map_err(io_err("cannot create", &host_dir))?;
        let h = HostState {
            name,
            netns: ns.clone(),
            public_ip: names::host_public_ip(i),
            agent_pid: None,
            log: host_dir.join("tweedd.log"),
            subnet_file: host_dir.join("subnet.env"),
            agent_state_dir: host_dir.join("lib"),
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
            &["link", "set", &uveth, "master", names::UNDERLAY_BRIDGE],
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
        netns::sysctl(&ns, "net.ipv4.ip_forward", "1")?;
        Ok(h)
    }

    fn start_agent(&mut self, idx: usize, spec: &LabSpec) -> Result<u32, LabError> {
        let h = &self.state.hosts[idx];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&h.log)
            .map_err(io_err("cannot open", &h.log))?;
        let log2 = log.try_clone().map_err(io_err("cannot open", &h.log))?;
        let _ = fs::remove_file(&h.subnet_file);
        let mut c = netns::exec_command(&h.netns, &[&self.state.tweedd]);
        c.arg("--etcd-endpoints")
            .arg(names::etcd_endpoint())
            .args(["--iface", names::HOST_IFACE])
            .arg("--subnet-file")
            .arg(&h.subnet_file)
            .arg("--state-dir")
            .arg(&h.agent_state_dir)
            .arg("--lease-ttl")
            .arg(&self.state.lease_ttl)
            .args(&spec.agent_args)
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
        self.state.hosts[idx].agent_pid = Some(pid);
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
    let namespaces = lab_namespaces(names, state);
    let mut errors = Vec::new();
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
        })
    } else {
        Err(LabError::Teardown {
            name: names.lab().into(),
            errors,
        })
    }
}

/// Checks what `up` needs before it touches anything; returns the tweedd to run.
fn preflight(spec: &LabSpec) -> Result<PathBuf, LabError> {
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
    if spec.backend != Backend::Vxlan {
        return Err(LabError::Spec(format!(
            "backend {} is not supported by tweed-lab yet: only vxlan is",
            spec.backend
        )));
    }
    // SAFETY: geteuid cannot fail and has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(LabError::NotRoot);
    }
    for (program, package) in [
        ("ip", "iproute2"),
        ("sysctl", "procps"),
        ("etcd", "etcd-server"),
        ("etcdctl", "etcd-client"),
    ] {
        cmd::find_program(program).ok_or(LabError::MissingProgram { program, package })?;
    }
    find_tweedd(spec.tweedd.as_deref())
}

fn find_tweedd(explicit: Option<&Path>) -> Result<PathBuf, LabError> {
    if let Some(p) = explicit {
        return fs::canonicalize(p)
            .map_err(|e| LabError::Spec(format!("tweedd {}: {e}", p.display())));
    }
    let exe_dirs = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
        .map(|d| vec![d.clone(), d.join("..")])
        .unwrap_or_default();
    exe_dirs
        .into_iter()
        .map(|d| d.join("tweedd"))
        .find(|p| p.is_file())
        .or_else(|| cmd::find_program("tweedd"))
        .and_then(|p| fs::canonicalize(p).ok())
        .ok_or_else(|| {
            LabError::Spec(
                "tweedd not found beside tweed-lab nor in PATH: build it \
                 (cargo build -p tweed-agent) or pass --tweedd PATH"
                    .into(),
            )
        })
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
                pods: vec![PodStatus {
                    name: "p1".into(),
                    netns: "twl-demo-h1-p1".into(),
                    ip: "10.244.3.2".into(),
                }],
                agent_alive: true,
            }],
            etcd: EtcdStatus {
                endpoints: vec!["http://198.18.0.254:2379".into()],
                pid: Some(7),
                alive: true,
            },
            lab: "demo".into(),
            ready: true,
            dir: "/run/tweed-lab/demo".into(),
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
        assert_eq!(keys(&v["etcd"]), ["endpoints"]);
        assert_eq!(
            keys(&v["hosts"][0]),
            [
                "agent_pid",
                "backend",
                "log",
                "name",
                "netns",
                "pods",
                "public_ip",
                "subnet"
            ]
        );
        assert_eq!(keys(&v["hosts"][0]["pods"][0]), ["ip", "name", "netns"]);
        assert_eq!(v["hosts"][0]["agent_pid"], 4242);
        assert_eq!(v["hosts"][0]["subnet"], "10.244.3.0/24");
        assert_eq!(v["etcd"]["endpoints"][0], "http://198.18.0.254:2379");
    }

    #[test]
    fn status_json_nulls_when_unknown() {
        let mut s = sample_status();
        s.hosts[0].subnet = None;
        s.hosts[0].agent_pid = None;
        let v: serde_json::Value = serde_json::from_str(&s.to_json()).unwrap();
        assert!(v["hosts"][0]["subnet"].is_null());
        assert!(v["hosts"][0]["agent_pid"].is_null());
    }

    #[test]
    fn status_table_lists_hosts_and_pods() {
        let t = sample_status().to_table();
        assert!(t.contains("HOST"), "{t}");
        assert!(t.contains("4242 alive"), "{t}");
        assert!(t.contains("h1/p1"), "{t}");
        assert!(t.contains("10.244.3.2"), "{t}");
    }

    #[test]
    fn config_json_is_flannels() {
        assert_eq!(
            network_config_json(Backend::Vxlan),
            r#"{"Backend":{"Type":"vxlan"},"Network":"10.244.0.0/16","SubnetLen":24}"#
        );
        let v: serde_json::Value =
            serde_json::from_str(&network_config_json(Backend::HostGw)).unwrap();
        assert_eq!(v["Backend"]["Type"], "host-gw");
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
    fn only_vxlan_is_accepted_for_now() {
        let mut spec = LabSpec::new("x", 2);
        spec.backend = Backend::HostGw;
        let e = preflight(&spec).unwrap_err().to_string();
        assert!(e.contains("host-gw") && e.contains("only vxlan"), "{e}");
        let spec = LabSpec::new("x", 0);
        assert!(preflight(&spec)
            .unwrap_err()
            .to_string()
            .contains("--hosts"));
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
