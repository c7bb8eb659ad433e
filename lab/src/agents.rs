//! The agents: one `tweedd` per host, started detached in the host's namespace, and the wait for
//! each one's `subnet.env`, which says it holds a lease.
//!
//! The lab and the agent are built and released together, so the lab passes the flags of the
//! agent in this workspace as they are; a flag given in [`crate::LabSpec::agent_args`] replaces
//! the lab's own.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tweed_config::subnet_env::SubnetEnvError;
use tweed_config::SubnetEnv;

use crate::cmd::{self, CmdError};
use crate::error::{io_err, LabError};
use crate::names;
use crate::netns;
use crate::state::HostState;

const LOG_TAIL_LINES: usize = 30;

/// What every agent of a lab shares.
#[derive(Debug, Clone)]
pub struct AgentOptions<'a> {
    pub tweedd: &'a Path,
    /// Every etcd member's client URL.
    pub endpoints: &'a [String],
    pub lease_ttl: Duration,
    /// `--ip-masq`
    pub ip_masq: bool,
    /// An IPv6-only lab: the hosts have only IPv6 addresses (metrics on `[::]`).
    pub v6_only: bool,
    /// Appended last.
    pub extra: &'a [String],
}

/// One agent's command line and where it will answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentLaunch {
    /// `tweedd FLAGS...`, to run inside the host's namespace.
    pub argv: Vec<OsString>,
    /// `--api-socket`, unless `extra` chose its own.
    pub api_socket: Option<PathBuf>,
    /// The metrics URL, reachable from the lab's namespaces, unless `extra` chose its own
    /// `--metrics-addr`.
    pub metrics: Option<String>,
}

/// The agent of host `h` (pure).
pub fn launch(h: &HostState, o: &AgentOptions<'_>) -> AgentLaunch {
    let given = |flag: &str| {
        o.extra
            .iter()
            .any(|a| a == flag || a.strip_prefix(flag).is_some_and(|v| v.starts_with('=')))
    };
    let mut argv: Vec<OsString> = vec![o.tweedd.into()];
    let mut push = |flag: &str, value: &dyn AsRef<std::ffi::OsStr>| {
        argv.push(flag.into());
        argv.push(value.as_ref().to_os_string());
    };
    push("--etcd-endpoints", &o.endpoints.join(","));
    push("--iface", &names::HOST_IFACE);
    push("--subnet-file", &h.subnet_file);
    push("--state-dir", &h.agent_state_dir);
    push(
        "--lease-ttl",
        &humantime::format_duration(o.lease_ttl).to_string(),
    );
    let api_socket = (!given("--api-socket")).then(|| h.log.with_file_name("tweedd.sock"));
    if let Some(sock) = &api_socket {
        push("--api-socket", sock);
    }
    // Every address of the host, so that pods (via cni0) and the other hosts reach it alike.
    let metrics = (!given("--metrics-addr")).then(|| match h.public_ip6.filter(|_| o.v6_only) {
        Some(ip6) => {
            push("--metrics-addr", &format!("[::]:{}", names::METRICS_PORT));
            format!("http://[{ip6}]:{}/metrics", names::METRICS_PORT)
        }
        None => {
            push(
                "--metrics-addr",
                &format!("0.0.0.0:{}", names::METRICS_PORT),
            );
            format!("http://{}:{}/metrics", h.public_ip, names::METRICS_PORT)
        }
    });
    if o.ip_masq && !given("--ip-masq") {
        argv.push("--ip-masq".into());
    }
    argv.extend(o.extra.iter().map(OsString::from));
    AgentLaunch {
        argv,
        api_socket,
        metrics,
    }
}

/// Starts the agent in `h`'s namespace, in its own session (it must outlive `tweed-lab up` and
/// ignore its terminal's ^C), logging to `h.log`. A stale subnet.env goes first, so that the
/// wait sees this agent's.
pub(crate) fn start(h: &HostState, launch: &AgentLaunch) -> Result<Child, LabError> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&h.log)
        .map_err(io_err("cannot open", &h.log))?;
    let log2 = log.try_clone().map_err(io_err("cannot open", &h.log))?;
    let _ = fs::remove_file(&h.subnet_file);
    let mut c = netns::exec_command(&h.netns, &launch.argv);
    c.stdin(Stdio::null()).stdout(log).stderr(log2);
    cmd::new_session(&mut c);
    c.spawn().map_err(|source| {
        LabError::Cmd(CmdError::Spawn {
            command: cmd::display(&c),
            source,
        })
    })
}

/// Waits for every host's subnet.env and records subnet and MTU in `hosts`; fails fast when an
/// agent among `children` dies, and on `cancel`.
pub(crate) fn wait_subnets(
    hosts: &mut [HostState],
    children: &mut [Child],
    timeout: Duration,
    cancel: Option<&AtomicBool>,
    on_ready: &mut dyn FnMut(&str, &SubnetEnv, Duration) -> Result<(), LabError>,
) -> Result<Vec<SubnetEnv>, LabError> {
    let start = Instant::now();
    let n = hosts.len();
    let mut envs: Vec<Option<SubnetEnv>> = vec![None; n];
    let mut last_err: Vec<Option<String>> = vec![None; n];
    loop {
        for (i, h) in hosts.iter_mut().enumerate() {
            if envs[i].is_some() {
                continue;
            }
            match SubnetEnv::read(&h.subnet_file) {
                Ok(env) => {
                    on_ready(&h.name, &env, start.elapsed())?;
                    h.subnet = env.ipv4.map(|v4| v4.subnet.to_string());
                    h.mtu = Some(env.mtu);
                    envs[i] = Some(env);
                    continue;
                }
                Err(SubnetEnvError::Io { source, .. })
                    if source.kind() == io::ErrorKind::NotFound => {}
                Err(e) => last_err[i] = Some(e.to_string()),
            }
            let pid = h.agent_pid.unwrap_or(0);
            if let Some(child) = children.iter_mut().find(|c| c.id() == pid) {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(error(
                        h,
                        format!(
                            "exited ({status}) before writing {}",
                            h.subnet_file.display()
                        ),
                    ));
                }
            }
        }
        let Some(i) = envs.iter().position(Option::is_none) else {
            return Ok(envs.into_iter().flatten().collect());
        };
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(LabError::Interrupted);
        }
        if start.elapsed() >= timeout {
            let h = &hosts[i];
            let why = last_err[i]
                .clone()
                .unwrap_or_else(|| format!("no {}", h.subnet_file.display()));
            return Err(error(h, format!("{why} after {timeout:?}")));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// [`wait_subnets`] for an IPv6-only lab: each agent's subnet.env names its IPv6 subnet
/// (`TWEED_IPV6_SUBNET`), which is recorded as the host's subnet; returns the files in host
/// order.
pub(crate) fn wait_subnets_v6(
    hosts: &mut [HostState],
    children: &mut [Child],
    timeout: Duration,
    cancel: Option<&AtomicBool>,
    on_ready: &mut dyn FnMut(&str, &str, Duration) -> Result<(), LabError>,
) -> Result<Vec<SubnetEnv>, LabError> {
    let start = Instant::now();
    let mut envs: Vec<Option<SubnetEnv>> = vec![None; hosts.len()];
    loop {
        let mut waiting = None;
        for (i, h) in hosts.iter_mut().enumerate() {
            if envs[i].is_some() {
                continue;
            }
            // A file without the IPv6 pair (or unreadable yet) is waited on like a missing one.
            if let Some(env) = SubnetEnv::read(&h.subnet_file)
                .ok()
                .filter(|env| env.ipv6.is_some())
            {
                let s = env.ipv6.map(|v6| v6.subnet.to_string()).unwrap_or_default();
                on_ready(&h.name, &s, start.elapsed())?;
                h.subnet = Some(s);
                h.mtu = Some(env.mtu);
                envs[i] = Some(env);
                continue;
            }
            let pid = h.agent_pid.unwrap_or(0);
            if let Some(child) = children.iter_mut().find(|c| c.id() == pid) {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(error(
                        h,
                        format!(
                            "exited ({status}) before writing {}",
                            h.subnet_file.display()
                        ),
                    ));
                }
            }
            waiting.get_or_insert(i);
        }
        let Some(i) = waiting else {
            return Ok(envs.into_iter().flatten().collect());
        };
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(LabError::Interrupted);
        }
        if start.elapsed() >= timeout {
            let h = &hosts[i];
            return Err(error(
                h,
                format!(
                    "no TWEED_IPV6_SUBNET in {} after {timeout:?}",
                    h.subnet_file.display()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An agent failure, with the tail of its log.
fn error(h: &HostState, reason: String) -> LabError {
    LabError::Agent {
        host: h.name.clone(),
        netns: h.netns.clone(),
        reason,
        log: h.log.clone(),
        tail: cmd::tail(&h.log, LOG_TAIL_LINES),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::Names;
    use crate::spec::IpFamily;
    use crate::topology;

    fn host() -> HostState {
        let names = Names::new("demo").unwrap();
        topology::host_state(&names, Path::new("/lab"), 1, 1, IpFamily::V4)
    }

    fn args(l: &AgentLaunch) -> Vec<String> {
        l.argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    /// The value after `flag`, when `flag` is there exactly once.
    fn value<'a>(argv: &'a [String], flag: &str) -> Option<&'a str> {
        let at: Vec<usize> = (0..argv.len()).filter(|i| argv[*i] == flag).collect();
        match at.as_slice() {
            [i] => argv.get(i + 1).map(String::as_str),
            _ => None,
        }
    }

    #[test]
    fn the_agent_gets_every_flag_the_lab_relies_on() {
        let endpoints = [
            "http://198.18.0.251:2379".into(),
            "http://198.18.0.252:2379".into(),
        ];
        let o = AgentOptions {
            tweedd: Path::new("/bin/tweedd"),
            endpoints: &endpoints,
            lease_ttl: Duration::from_secs(120),
            ip_masq: true,
            v6_only: false,
            extra: &[],
        };
        let l = launch(&host(), &o);
        let a = args(&l);
        assert_eq!(a[0], "/bin/tweedd");
        assert_eq!(
            value(&a, "--etcd-endpoints"),
            Some("http://198.18.0.251:2379,http://198.18.0.252:2379")
        );
        assert_eq!(value(&a, "--iface"), Some("eth0"));
        assert_eq!(value(&a, "--subnet-file"), Some("/lab/hosts/h1/subnet.env"));
        assert_eq!(value(&a, "--state-dir"), Some("/lab/hosts/h1/lib"));
        assert_eq!(value(&a, "--lease-ttl"), Some("2m"));
        assert_eq!(value(&a, "--api-socket"), Some("/lab/hosts/h1/tweedd.sock"));
        assert_eq!(value(&a, "--metrics-addr"), Some("0.0.0.0:9867"));
        assert_eq!(a.iter().filter(|f| *f == "--ip-masq").count(), 1);
        assert_eq!(
            l.api_socket.as_deref(),
            Some(Path::new("/lab/hosts/h1/tweedd.sock"))
        );
        assert_eq!(l.metrics.as_deref(), Some("http://198.18.0.1:9867/metrics"));
    }

    #[test]
    fn no_ip_masq_leaves_the_flag_out() {
        let o = AgentOptions {
            tweedd: Path::new("tweedd"),
            endpoints: &[],
            lease_ttl: Duration::from_secs(300),
            ip_masq: false,
            v6_only: false,
            extra: &[],
        };
        let a = args(&launch(&host(), &o));
        assert!(!a.iter().any(|f| f.starts_with("--ip-masq")), "{a:?}");
        assert_eq!(value(&a, "--lease-ttl"), Some("5m"));
    }

    #[test]
    fn extra_args_replace_the_labs_own_flags() {
        let extra: Vec<String> = [
            "--api-socket=/elsewhere.sock",
            "--metrics-addr",
            "off",
            "--ip-masq=false",
            "--fake-mute",
        ]
        .map(String::from)
        .into();
        let o = AgentOptions {
            tweedd: Path::new("tweedd"),
            endpoints: &[],
            lease_ttl: Duration::from_secs(300),
            ip_masq: true,
            v6_only: false,
            extra: &extra,
        };
        let l = launch(&host(), &o);
        let a = args(&l);
        assert_eq!(l.api_socket, None);
        assert_eq!(l.metrics, None);
        assert_eq!(value(&a, "--metrics-addr"), Some("off"));
        assert!(!a.iter().any(|f| f == "--ip-masq" || f == "--api-socket"));
        assert_eq!(&a[a.len() - extra.len()..], extra.as_slice());
        // A flag that merely starts like one of them is not one of them.
        let extra = ["--api-socketx".to_string()];
        let l = launch(&host(), &AgentOptions { extra: &extra, ..o });
        assert!(l.api_socket.is_some());
    }
}
