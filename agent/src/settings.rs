//! tweedd's settings, each declared once: a field of [`Settings`] whose `#[arg]` names its flag,
//! its `TWEED_<FLAG>` environment variable, its default and its parser.
//!
//! The YAML file (`--config`) is the layer between the environment and the built-in default: its
//! values become the arguments' defaults and the command line is parsed again, so clap itself
//! applies flag > environment > file > default, and a value goes through the same parser wherever
//! it was written. What no single value can check (pairs of settings, the password file) is
//! checked after, naming where the value came from.

use crate::registry::EtcdOptions;
use clap::builder::BoolishValueParser;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command, CommandFactory, FromArgMatches, Parser};
use std::collections::HashSet;
use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;
use tweed_config::agent_file::{AgentFile, AgentFileError};
use tweed_netlink::iface::{IfaceChoice, IfaceError};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "tweedd",
    version,
    about = "tweed node agent: leases this node's subnet from etcd and programs the overlay",
    after_help = "Every flag can also be set as an environment variable TWEED_<FLAG> (e.g. TWEED_ETCD_ENDPOINTS) \
or as a key in the --config YAML file (e.g. `etcd-endpoints: http://10.0.0.1:2379`). \
Precedence: flag, then environment, then file, then default."
)]
pub struct Settings {
    /// YAML config file whose keys are the long flag names.
    #[arg(long, env = "TWEED_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// etcd endpoints, comma-separated
    #[arg(
        long,
        env = "TWEED_ETCD_ENDPOINTS",
        value_delimiter = ',',
        value_name = "URLS",
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,

    /// etcd key prefix holding `config` and `subnets/` (flannel's layout)
    #[arg(
        long,
        env = "TWEED_ETCD_PREFIX",
        value_name = "PREFIX",
        default_value = "/coreos.com/network"
    )]
    pub etcd_prefix: String,

    /// CA certificate (PEM) to verify etcd's server certificate.
    #[arg(long, env = "TWEED_ETCD_CAFILE", value_name = "FILE")]
    pub etcd_cafile: Option<PathBuf>,

    /// Client certificate (PEM) for mutual TLS to etcd; needs --etcd-keyfile.
    #[arg(long, env = "TWEED_ETCD_CERTFILE", value_name = "FILE")]
    pub etcd_certfile: Option<PathBuf>,

    /// Client key (PEM) for mutual TLS to etcd; needs --etcd-certfile.
    #[arg(long, env = "TWEED_ETCD_KEYFILE", value_name = "FILE")]
    pub etcd_keyfile: Option<PathBuf>,

    /// etcd user (etcd's `auth enable`); needs --etcd-password or --etcd-password-file.
    #[arg(long, env = "TWEED_ETCD_USERNAME", value_name = "USER")]
    pub etcd_username: Option<String>,

    // Once loaded: the password from whichever of the two was used.
    /// etcd password; prefer --etcd-password-file (a flag shows in `ps`).
    #[arg(
        long,
        env = "TWEED_ETCD_PASSWORD",
        hide_env_values = true,
        value_name = "PASSWORD"
    )]
    pub etcd_password: Option<Secret>,

    /// File holding the etcd password (trailing newline ignored), e.g. a mounted secret.
    #[arg(long, env = "TWEED_ETCD_PASSWORD_FILE", value_name = "FILE")]
    pub etcd_password_file: Option<PathBuf>,

    /// Interface for inter-host traffic, by name or IPv4 address; repeatable, first match wins
    /// [default: the interface of the default route]
    #[arg(
        long,
        env = "TWEED_IFACE",
        value_delimiter = ',',
        value_name = "NAME|IP"
    )]
    pub iface: Vec<String>,

    /// Regex matched against IPv4 addresses, then interface names (unanchored); repeatable, tried
    /// after --iface, first match wins
    #[arg(long, env = "TWEED_IFACE_REGEX", value_name = "REGEX", value_parser = regex)]
    pub iface_regex: Vec<String>,

    /// Use the interface the routing table sends this address out of (e.g. etcd's IP); tried
    /// after --iface and --iface-regex. IPv4, or IPv6 in an IPv6-only network (EnableIPv4: false)
    #[arg(long, env = "TWEED_IFACE_CAN_REACH", value_name = "IP")]
    pub iface_can_reach: Option<std::net::IpAddr>,

    /// IP advertised to other nodes in this node's lease [default: the chosen interface's address]
    #[arg(long, env = "TWEED_PUBLIC_IP", value_name = "IP")]
    pub public_ip: Option<Ipv4Addr>,

    /// IPv6 address advertised as the lease's PublicIPv6 when the network has EnableIPv6
    /// [default: the chosen interface's first stable global-scope IPv6 address]
    #[arg(long, env = "TWEED_PUBLIC_IPV6", value_name = "IPV6", value_parser = public_ipv6)]
    pub public_ipv6: Option<std::net::Ipv6Addr>,

    /// Where to write the lease for the CNI plugin
    #[arg(
        long,
        env = "TWEED_SUBNET_FILE",
        value_name = "FILE",
        default_value = "/run/tweed/subnet.env"
    )]
    pub subnet_file: PathBuf,

    /// Renew the lease this long before it expires; a bare number means minutes, as in flannel
    #[arg(
        long,
        env = "TWEED_SUBNET_LEASE_RENEW_MARGIN",
        value_name = "DURATION",
        default_value = "60m",
        value_parser = minutes
    )]
    pub subnet_lease_renew_margin: Duration,

    /// TTL of this node's lease in etcd (e.g. 24h, 30s)
    #[arg(
        long,
        env = "TWEED_LEASE_TTL",
        value_name = "DURATION",
        default_value = "24h",
        value_parser = duration
    )]
    pub lease_ttl: Duration,

    /// Directory for state kept across restarts (the VTEP MAC)
    #[arg(
        long,
        env = "TWEED_STATE_DIR",
        value_name = "DIR",
        default_value = "/var/lib/tweed"
    )]
    pub state_dir: PathBuf,

    /// Log filter: error, warn, info, debug, trace, or a tracing directive
    #[arg(
        long,
        env = "TWEED_LOG_LEVEL",
        value_name = "LEVEL",
        default_value = "info"
    )]
    pub log_level: String,

    /// Address for /metrics, /healthz, /readyz; "" or "off" disables
    #[arg(
        long,
        env = "TWEED_METRICS_ADDR",
        value_name = "HOST:PORT",
        default_value = "0.0.0.0:9867",
        value_parser = metrics_addr
    )]
    pub metrics_addr: MetricsAddr,

    /// Connections the metrics server holds at once; more are closed on arrival
    #[arg(
        long,
        env = "TWEED_METRICS_MAX_CONNECTIONS",
        value_name = "N",
        default_value = "256",
        value_parser = connections
    )]
    pub metrics_max_connections: usize,

    /// Connections the metrics server holds at once from one address
    #[arg(
        long,
        env = "TWEED_METRICS_MAX_CONNECTIONS_PER_IP",
        value_name = "N",
        default_value = "32",
        value_parser = connections
    )]
    pub metrics_max_connections_per_ip: usize,

    /// Time a metrics client has to send a request head (slow clients are cut off)
    #[arg(
        long,
        env = "TWEED_METRICS_HEADER_TIMEOUT",
        value_name = "DURATION",
        default_value = "5s",
        value_parser = seconds
    )]
    pub metrics_header_timeout: Duration,

    /// Unix socket of the gRPC API (tweedctl)
    #[arg(
        long,
        env = "TWEED_API_SOCKET",
        value_name = "PATH",
        default_value = tweed_api::DEFAULT_SOCKET
    )]
    pub api_socket: PathBuf,

    /// Masquerade traffic leaving the overlay (as flannel's --ip-masq)
    #[arg(
        long,
        env = "TWEED_IP_MASQ",
        action = ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true",
        require_equals = true,
        default_value = "false",
        value_parser = BoolishValueParser::new(),
        value_name = "BOOL"
    )]
    pub ip_masq: bool,

    /// How often the firewall rules are checked and repaired; a bare number means seconds, as
    /// in flannel
    #[arg(
        long,
        env = "TWEED_IPTABLES_RESYNC",
        value_name = "DURATION",
        default_value = "5s",
        value_parser = seconds
    )]
    pub iptables_resync: Duration,

    /// Program the rules with nftables (table `ip tweed`) instead of iptables
    #[arg(
        long,
        env = "TWEED_NFTABLES",
        action = ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true",
        require_equals = true,
        default_value = "false",
        value_parser = BoolishValueParser::new(),
        value_name = "BOOL"
    )]
    pub nftables: bool,

    /// vxlan: leave the device's tx checksum offload on; `false` turns tx-checksum-ip-generic off
    /// (some NIC/kernel pairs corrupt vxlan checksums with it)
    #[arg(
        long,
        env = "TWEED_VXLAN_TX_CHECKSUM_OFFLOAD",
        action = ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true",
        require_equals = true,
        default_value = "true",
        value_parser = BoolishValueParser::new(),
        value_name = "BOOL"
    )]
    pub vxlan_tx_checksum_offload: bool,

    /// udp backend: worker threads (TUN queues), 1-64 [default: one per core, at most 8]
    #[arg(long, env = "TWEED_UDP_WORKERS", value_name = "N", value_parser = udp_workers)]
    pub udp_workers: Option<usize>,

    /// wireguard backend: the node's private key file, made (mode 0400) when missing; the
    /// variable is flannel's [default: <state-dir>/wgkey]
    #[arg(long, env = "WIREGUARD_KEY_FILE", value_name = "FILE")]
    pub wireguard_key_file: Option<PathBuf>,

    /// wireguard backend: `kernel`, `userspace`, or `auto` (the kernel's when it has the module)
    #[arg(
        long,
        env = "TWEED_WIREGUARD_IMPL",
        value_name = "auto|kernel|userspace",
        default_value = "auto"
    )]
    pub wireguard_impl: crate::backend::WgImpl,
}

/// A value that must not show in logs or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret(s)
    }
}

/// `--metrics-addr`: `None` when the HTTP endpoint is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<SocketAddr>);

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// A flag or environment value clap refused, or `--help`/`--version`: [`clap::Error::exit`]
    /// prints it and exits with the right status.
    #[error(transparent)]
    Cli(#[from] clap::Error),
    #[error(transparent)]
    File(#[from] AgentFileError),
    #[error("{source_name} {flag}: {reason}")]
    Invalid {
        /// Where the value came from: `--flag`, `TWEED_FLAG` or the config file's path.
        source_name: String,
        flag: String,
        reason: String,
    },
}

impl Settings {
    /// Reads the process's arguments, its environment and the file they name.
    pub fn load() -> Result<Settings, SettingsError> {
        Self::load_from(std::env::args_os())
    }

    /// As [`load`](Self::load) with `args` (program name first) instead of the process's.
    pub fn load_from<I, T>(args: I) -> Result<Settings, SettingsError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let config = Settings::command()
            .try_get_matches_from(&args)?
            .get_one::<PathBuf>("config")
            .cloned();
        let file = match &config {
            Some(p) => AgentFile::read(p)?,
            None => AgentFile::default(),
        };
        let (cmd, from_file) = with_file_defaults(Settings::command(), &file)?;
        // Flags and the environment parsed once already, so what fails now is a file value.
        let matches = cmd
            .try_get_matches_from(&args)
            .map_err(|e| file_value_error(&file, e))?;
        let mut s = Settings::from_arg_matches(&matches)?;
        let origin = Origin {
            matches: &matches,
            from_file: &from_file,
            file: &file,
        };
        s.check(&origin)?;
        Ok(s)
    }

    /// Everything the interface choice needs (see `tweed_netlink::iface::choose`).
    pub fn iface_choice(&self) -> Result<IfaceChoice, IfaceError> {
        let can_reach = match self.iface_can_reach {
            None => None,
            Some(std::net::IpAddr::V4(ip)) => Some(ip),
            Some(std::net::IpAddr::V6(ip)) => return Err(IfaceError::CanReachIpv6 { ip }),
        };
        IfaceChoice::new(&self.iface, &self.iface_regex, can_reach, self.public_ip)
    }

    /// How to reach etcd; the password is the one [`load`](Self::load) settled on.
    pub fn etcd(&self) -> EtcdOptions {
        EtcdOptions {
            endpoints: self.etcd_endpoints.clone(),
            prefix: self.etcd_prefix.clone(),
            ca_file: self.etcd_cafile.clone(),
            cert_file: self.etcd_certfile.clone(),
            key_file: self.etcd_keyfile.clone(),
            username: self.etcd_username.clone(),
            password: self.etcd_password.clone().map(|p| p.0),
            request_timeout: Duration::from_secs(5),
        }
    }

    /// The metrics server's limits; the response deadline and connection age stay at their
    /// defaults (they bound what a client holds, which the two caps already limit).
    pub fn http_limits(&self) -> crate::http::HttpLimits {
        crate::http::HttpLimits {
            max_connections: self.metrics_max_connections,
            max_per_ip: self.metrics_max_connections_per_ip,
            header_timeout: self.metrics_header_timeout,
            ..crate::http::HttpLimits::default()
        }
    }

    /// What an operator must hear about at start-up although it works: today, an etcd password
    /// sent over plain http, readable by anyone on the path to etcd.
    pub fn security_warnings(&self) -> Vec<String> {
        let plain: Vec<&str> = self
            .etcd_endpoints
            .iter()
            .filter(|e| e.starts_with("http://"))
            .map(String::as_str)
            .collect();
        let mut out = Vec::new();
        if let (Some(user), false) = (&self.etcd_username, plain.is_empty()) {
            out.push(format!(
                "etcd user {user:?} and its password are sent unencrypted to {}: anyone on the \
                 path can read them and then rewrite every lease; use https:// endpoints \
                 (--etcd-cafile)",
                plain.join(", ")
            ));
        }
        out
    }

    /// udp workers (TUN queues): one per core, at most 8, unless `--udp-workers` says otherwise (a
    /// host whose pods mostly talk request/response can prefer fewer threads to wake up).
    pub fn udp_workers(&self) -> usize {
        self.udp_workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(8)
        })
    }

    /// The checks no single value's parser can make.
    fn check(&mut self, origin: &Origin) -> Result<(), SettingsError> {
        self.etcd_endpoints = self
            .etcd_endpoints
            .iter()
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect();
        let invalid = |id: &str, reason: String| SettingsError::Invalid {
            source_name: origin.name(id),
            flag: long_name(id),
            reason,
        };
        if self.etcd_endpoints.is_empty() {
            return Err(invalid("etcd_endpoints", "no endpoint given".into()));
        }
        if let Some(e) = self
            .etcd_endpoints
            .iter()
            .find(|e| !(e.starts_with("http://") || e.starts_with("https://")))
        {
            return Err(invalid(
                "etcd_endpoints",
                format!("{e:?} must start with http:// or https://"),
            ));
        }
        if self.etcd_certfile.is_some() != self.etcd_keyfile.is_some() {
            return Err(SettingsError::Invalid {
                source_name: "--etcd-certfile/--etcd-keyfile".into(),
                flag: "etcd-certfile".into(),
                reason: "a client certificate and its key go together: give both or neither".into(),
            });
        }
        self.etcd_password = self.password(origin)?;
        match (&self.etcd_username, &self.etcd_password) {
            (Some(u), _) if u.trim().is_empty() => Err(invalid("etcd_username", "is empty".into())),
            (Some(_), None) => Err(invalid(
                "etcd_username",
                "needs --etcd-password or --etcd-password-file".into(),
            )),
            (None, Some(_)) => Err(invalid("etcd_password", "needs --etcd-username".into())),
            _ => Ok(()),
        }
    }

    /// The password from the highest layer that gives one (flag or environment over the file),
    /// as a value or a file to read; both at that layer is an error.
    fn password(&self, origin: &Origin) -> Result<Option<Secret>, SettingsError> {
        let top = origin
            .layer("etcd_password")
            .max(origin.layer("etcd_password_file"));
        let value = self
            .etcd_password
            .clone()
            .filter(|_| origin.layer("etcd_password") == top);
        let file = self
            .etcd_password_file
            .as_ref()
            .filter(|_| origin.layer("etcd_password_file") == top);
        let invalid = |id: &str, reason: String| SettingsError::Invalid {
            source_name: origin.name(id),
            flag: long_name(id),
            reason,
        };
        match (value, file) {
            (Some(_), Some(_)) => Err(SettingsError::Invalid {
                source_name: match top {
                    Layer::File => origin.file.path.display().to_string(),
                    _ => "--etcd-password/--etcd-password-file".into(),
                },
                flag: "etcd-password".into(),
                reason: "give etcd-password or etcd-password-file, not both".into(),
            }),
            (Some(p), None) => Ok(Some(p)),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    invalid("etcd_password_file", format!("{}: {e}", path.display()))
                })?;
                let pw = text.trim_end_matches(['\n', '\r']);
                if pw.is_empty() {
                    return Err(invalid(
                        "etcd_password_file",
                        format!("{}: is empty", path.display()),
                    ));
                }
                Ok(Some(Secret(pw.to_string())))
            }
            (None, None) => Ok(None),
        }
    }
}

/// Which layer gave a value; the flag and the environment are one layer, as for a password
/// given by one and a password file by the other (an error: not both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Layer {
    Default,
    File,
    FlagOrEnv,
}

/// Where each value of one load came from.
struct Origin<'a> {
    matches: &'a ArgMatches,
    /// Ids of the arguments the file set.
    from_file: &'a HashSet<String>,
    file: &'a AgentFile,
}

impl Origin<'_> {
    fn layer(&self, id: &str) -> Layer {
        match self.matches.value_source(id) {
            Some(ValueSource::CommandLine | ValueSource::EnvVariable) => Layer::FlagOrEnv,
            _ if self.from_file.contains(id) => Layer::File,
            _ => Layer::Default,
        }
    }

    /// `--flag`, `TWEED_FLAG` or the file's path, for error messages.
    fn name(&self, id: &str) -> String {
        match self.matches.value_source(id) {
            Some(ValueSource::EnvVariable) => {
                format!("TWEED_{}", id.to_ascii_uppercase())
            }
            _ if self.from_file.contains(id) => self.file.path.display().to_string(),
            _ => format!("--{}", long_name(id)),
        }
    }
}

fn long_name(id: &str) -> String {
    id.replace('_', "-")
}

/// `cmd` with the file's values as its arguments' defaults, and the ids the file set. Unknown
/// keys are errors, so a typo does not go unnoticed.
fn with_file_defaults(
    mut cmd: Command,
    file: &AgentFile,
) -> Result<(Command, HashSet<String>), AgentFileError> {
    let mut from_file = HashSet::new();
    for (key, value) in &file.entries {
        let field = |reason: String| AgentFileError::Field {
            path: file.path.clone(),
            key: key.clone(),
            reason,
        };
        let Some(arg) = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && key != "config")
        else {
            return Err(field(
                "unknown key; the keys are the long flag names of `tweedd --help`".into(),
            ));
        };
        let values = if matches!(arg.get_action(), ArgAction::Append) {
            value.clone().into_vec()
        } else {
            match value {
                tweed_config::agent_file::FileValue::One(v) => vec![v.clone()],
                tweed_config::agent_file::FileValue::Many(_) => {
                    return Err(field("takes one value, not a list".into()))
                }
            }
        };
        let id = arg.get_id().to_string();
        cmd = cmd.mut_arg(&id, |a| a.default_values(values));
        from_file.insert(id);
    }
    Ok((cmd, from_file))
}

/// A file value that failed its argument's parser, named by file and key.
fn file_value_error(file: &AgentFile, e: clap::Error) -> SettingsError {
    let text = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    let (Some(arg), Some(value)) = (
        text(ContextKind::InvalidArg),
        text(ContextKind::InvalidValue),
    ) else {
        return SettingsError::Cli(e);
    };
    if !matches!(
        e.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return SettingsError::Cli(e);
    }
    // "--lease-ttl <DURATION>" or "--ip-masq[=<BOOL>]"
    let key: String = arg
        .trim_start_matches('-')
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    let reason = match std::error::Error::source(&e) {
        Some(cause) => format!("{value:?}: {cause}"),
        None => format!("{value:?} is not a valid value"),
    };
    SettingsError::Invalid {
        source_name: file.path.display().to_string(),
        flag: key,
        reason,
    }
}

/// A duration with a unit (`24h`, `30s`), greater than zero.
fn duration(v: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(v.trim()).map_err(|e| format!("{e} (e.g. 60m, 24h, 30s)"))?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

/// A duration, or a bare number of minutes (flannel's `--subnet-lease-renew-margin`).
fn minutes(v: &str) -> Result<Duration, String> {
    match v.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(Duration::from_secs(n * 60)),
        _ => duration(v),
    }
}

/// A duration, or a bare number of seconds (flannel's `--iptables-resync`).
fn seconds(v: &str) -> Result<Duration, String> {
    match v.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(Duration::from_secs(n)),
        _ => duration(v),
    }
}

/// An address peers can send to: not unspecified, loopback, multicast, link-local or
/// IPv4-mapped (all refused or skipped by every reader of the lease).
fn public_ipv6(v: &str) -> Result<std::net::Ipv6Addr, String> {
    let a: std::net::Ipv6Addr = v
        .trim()
        .parse()
        .map_err(|_| format!("{v:?} is not an IPv6 address"))?;
    if a.is_unspecified()
        || a.is_loopback()
        || a.is_multicast()
        || a.is_unicast_link_local()
        || a.to_ipv4_mapped().is_some()
    {
        return Err(format!(
            "{a} cannot be a node's address (unspecified, loopback, multicast, link-local or IPv4-mapped)"
        ));
    }
    Ok(a)
}

fn regex(v: &str) -> Result<String, String> {
    regex::Regex::new(v)
        .map(|_| v.to_string())
        .map_err(|e| e.to_string())
}

fn connections(v: &str) -> Result<usize, String> {
    match v.trim().parse::<usize>() {
        Ok(n) if (1..=65536).contains(&n) => Ok(n),
        _ => Err("must be a number from 1 to 65536".into()),
    }
}

fn udp_workers(v: &str) -> Result<usize, String> {
    match v.trim().parse::<usize>() {
        Ok(n) if (1..=64).contains(&n) => Ok(n),
        _ => Err("must be a number from 1 to 64".into()),
    }
}

/// `host:port`, `:port` (all addresses, as Go spells it), or `""`/`off` for disabled.
fn metrics_addr(v: &str) -> Result<MetricsAddr, String> {
    let v = v.trim();
    if v.is_empty() || v.eq_ignore_ascii_case("off") {
        return Ok(MetricsAddr(None));
    }
    let full = match v.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => v.to_string(),
    };
    full.parse::<SocketAddr>()
        .map(|a| MetricsAddr(Some(a)))
        .map_err(|_| {
            "not HOST:PORT with an IP host (e.g. 0.0.0.0:9867, 127.0.0.1:9867, :9867), nor \"off\""
                .to_string()
        })
}

/// clap reads `TWEED_*` from the process environment: a test that sets it must not overlap with
/// a test that loads settings, so every test that loads holds this.
#[cfg(test)]
pub(crate) fn env_lock() -> std::sync::MutexGuard<'static, ()> {
    static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ENV.lock().unwrap_or_else(|p| p.into_inner())
}

/// Settings from `args` (program name included), for tests.
#[cfg(test)]
pub(crate) fn for_test(args: &[&str]) -> Settings {
    let _g = env_lock();
    Settings::load_from(args).unwrap()
}

#[cfg(test)]
mod tests;
