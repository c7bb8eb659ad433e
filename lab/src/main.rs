//! `tweed-lab`: a tweed cluster on one machine, in network namespaces. See the library for the work.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use tweed_lab::spec::IpFamily;
use tweed_lab::{Backend, Lab, LabSpec, PodsVia};

#[derive(Parser)]
#[command(
    name = "tweed-lab",
    version,
    about = "A tweed cluster on one machine, in network namespaces"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the underlay, hosts, etcd, agents and pods.
    Up {
        #[arg(long)]
        name: String,
        #[arg(long)]
        hosts: usize,
        /// vxlan, host-gw or udp.
        #[arg(long, default_value = "vxlan", value_parser = parse_backend)]
        backend: Backend,
        /// vxlan only: plain routes to the peers on the same underlay segment.
        #[arg(long)]
        direct_routing: bool,
        /// Underlay segments: 2 puts hosts alternately on 198.18.0.0/24 and 198.18.1.0/24,
        /// routed by the underlay namespace.
        #[arg(long, default_value_t = 1)]
        segments: usize,
        /// v4 (IPv4 only), dual or v6. dual: the hosts also get an IPv6 underlay address
        /// (fd00:198:18:<segment>::<host>), the network config EnableIPv6 with IPv6Network
        /// fd00:10:244::/56, and every pod an IPv6 address too (vxlan, host-gw and udp). v6: the
        /// hosts get only the IPv6 address, etcd listens on the bridge's fd00:198:18::254,
        /// the network config is EnableIPv4 false (vxlan or host-gw; one segment, one etcd
        /// member, --pods-per-host 0).
        #[arg(long, default_value = "v4", value_parser = parse_ip_family)]
        ip_family: IpFamily,
        #[arg(long, default_value_t = 2)]
        pods_per_host: usize,
        /// How pods are attached: cni (the tweed CNI plugin), runtime (tweedctl containers) or
        /// direct (the lab's own ip wiring, no plugin).
        #[arg(long, default_value = "cni", value_parser = parse_pods_via)]
        pods_via: PodsVia,
        /// The tweedd binary (default: beside tweed-lab, one directory up, else in PATH).
        #[arg(long)]
        tweedd: Option<PathBuf>,
        /// The tweed CNI plugin (default: `tweed` beside tweed-lab, one directory up, else in
        /// PATH).
        #[arg(long)]
        cni_plugin: Option<PathBuf>,
        /// tweedctl, for --pods-via runtime (found like tweedd).
        #[arg(long)]
        tweedctl: Option<PathBuf>,
        /// etcd members: 1 on 198.18.0.254, or a real cluster on 198.18.0.251-253.
        #[arg(long, default_value_t = 1)]
        etcd_members: usize,
        /// Do not pass --ip-masq to the agents.
        #[arg(long)]
        no_ip_masq: bool,
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        lease_ttl: Duration,
        /// How long each agent may take to write its subnet.env.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        agent_timeout: Duration,
    },
    /// Hosts, agents and pods of a lab.
    Status {
        #[arg(long)]
        name: String,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Ping from every pod to every pod on the other hosts.
    Check {
        #[arg(long)]
        name: String,
        /// Retry until every ping passes or this much time has passed (e.g. right after `up`).
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
    /// Run a command in a host's or pod's namespace: HOST, HOST/POD, `underlay` or `outside`.
    Exec {
        #[arg(long)]
        name: String,
        target: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Kill everything and delete the namespaces and state (idempotent).
    Down {
        #[arg(long)]
        name: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn parse_backend(s: &str) -> Result<Backend, String> {
    s.parse()
}

fn parse_ip_family(s: &str) -> Result<IpFamily, String> {
    s.parse()
}

fn parse_pods_via(s: &str) -> Result<PodsVia, String> {
    s.parse()
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tweed-lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Up {
            name,
            hosts,
            backend,
            direct_routing,
            segments,
            ip_family,
            pods_per_host,
            pods_via,
            tweedd,
            cni_plugin,
            tweedctl,
            etcd_members,
            no_ip_masq,
            lease_ttl,
            agent_timeout,
        } => {
            let mut spec = LabSpec::new(&name, hosts);
            spec.backend = backend;
            spec.direct_routing = direct_routing;
            spec.segments = segments;
            spec.ip_family = ip_family;
            spec.pods_per_host = pods_per_host;
            spec.pods_via = pods_via;
            spec.tweedd = tweedd;
            spec.cni_plugin = cni_plugin;
            spec.tweedctl = tweedctl;
            spec.etcd_members = etcd_members;
            spec.ip_masq = !no_ip_masq;
            spec.lease_ttl = lease_ttl;
            spec.agent_timeout = agent_timeout;
            spec.cancel = Some(cancel_on_signals());
            let start = std::time::Instant::now();
            let lab = Lab::up(spec)
                .with_context(|| format!("lab {name} is not up (and was torn down)"))?;
            eprintln!(
                "lab {name} up in {:.2}s ({} hosts): tweed-lab status --name {name}",
                start.elapsed().as_secs_f64(),
                lab.state().hosts.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { name, output } => {
            let status = Lab::load(&name)?.status();
            match output {
                Output::Json => println!("{}", status.to_json()),
                Output::Table => print!("{}", status.to_table()),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Check { name, wait } => {
            let report = Lab::load(&name)?.check_until(wait)?;
            for f in report.failures() {
                println!("FAIL {} -> {} ({}): {}", f.from, f.to, f.to_ip, f.detail);
            }
            println!("{}", report.summary());
            Ok(if report.failed() == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Exec {
            name,
            target,
            command,
        } => {
            let lab = Lab::load(&name)?;
            let status = lab
                .command(&target, &command)?
                .status()
                .with_context(|| format!("running {command:?} in {target}"))?;
            Ok(exit_code(status))
        }
        Cmd::Down { name } => {
            let report = tweed_lab::down(&name)?;
            for w in &report.warnings {
                eprintln!("tweed-lab: warning: {w}");
            }
            eprintln!(
                "lab {name} down: {} namespaces deleted, {} processes stopped",
                report.namespaces.len(),
                report.killed
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

static CANCEL: OnceLock<Arc<AtomicBool>> = OnceLock::new();

extern "C" fn on_signal(_: libc::c_int) {
    if let Some(c) = CANCEL.get() {
        c.store(true, Ordering::Relaxed);
    }
}

/// ^C during `up` must not leave half a lab behind: the handler only raises a flag, and `up`
/// stops at its next step and tears down.
fn cancel_on_signals() -> Arc<AtomicBool> {
    let flag = CANCEL
        .get_or_init(|| Arc::new(AtomicBool::new(false)))
        .clone();
    let handler = on_signal as extern "C" fn(libc::c_int);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only does an atomic load and store, which are async-signal-safe.
        unsafe {
            libc::signal(sig, handler as libc::sighandler_t);
        }
    }
    flag
}

/// The child's exit code, or 128+signal like a shell.
fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
