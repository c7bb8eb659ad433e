//! tweedd's settings: flags, `TWEED_<FLAG>` environment variables and the YAML config file, merged
//! in that order of precedence over built-in defaults.

use crate::registry::EtcdOptions;
use clap::builder::BoolishValueParser;
use clap::Parser;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tweed_config::agent_file::{AgentFile, AgentFileError};
use tweed_netlink::iface::{IfaceChoice, IfaceError};

pub const DEFAULT_ETCD_ENDPOINTS: &str = "http://127.0.0.1:2379";
pub const DEFAULT_ETCD_PREFIX: &str = "/coreos.com/network";
pub const DEFAULT_SUBNET_FILE: &str = "/run/tweed/subnet.env";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tweed";
pub const DEFAULT_RENEW_MARGIN: Duration = Duration::from_secs(60 * 60);
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(24 * 60 * 60);
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9867";
pub const DEFAULT_API_SOCKET: &str = "/run/tweed/tweedd.sock";
/// flannel's `--iptables-resync` default.
pub const DEFAULT_IPTABLES_RESYNC: Duration = Duration::from_secs(5);

/// Values are `Option` so "not given" can fall through to the config file and then the default;
/// clap already folds the environment variable into the flag.
#[derive(Debug, Parser, Default)]
#[command(
    name = "tweedd",
    version,
    about = "tweed node agent: leases this node's subnet from etcd and programs the overlay",
    after_help = "Every flag can also be set as an environment variable TWEED_<FLAG> (e.g. TWEED_ETCD_ENDPOINTS) \
or as a key in the --config YAML file (e.g. `etcd-endpoints: http://10.0.0.1:2379`). \
Precedence: flag, then environment, then file, then default."
)]
pub struct Cli {
    /// YAML config file whose keys are the long flag names.
    #[arg(long, env = "TWEED_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// etcd endpoints, comma-separated [default: http://127.0.0.1:2379]
    #[arg(
        long,
        env = "TWEED_ETCD_ENDPOINTS",
        value_delimiter = ',',
        value_name = "URLS"
    )]
    pub etcd_endpoints: Option<Vec<String>>,

    /// etcd key prefix holding `config` and `subnets/` (flannel's layout) [default: /coreos.com/network]
    #[arg(long, env = "TWEED_ETCD_PREFIX", value_name = "PREFIX")]
    pub etcd_prefix: Option<String>,

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

    /// etcd password; prefer --etcd-password-file (a flag shows in `ps`).
    #[arg(
        long,
        env = "TWEED_ETCD_PASSWORD",
        hide_env_values = true,
        value_name = "PASSWORD"
    )]
    pub etcd_password: Option<String>,

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
    pub iface: Option<Vec<String>>,

    /// Regex matched against IPv4 addresses, then interface names (unanchored); repeatable, tried
    /// after --iface, first match wins
    #[arg(long, env = "TWEED_IFACE_REGEX", value_name = "REGEX")]
    pub iface_regex: Option<Vec<String>>,

    /// Use the interface the routing table sends this address out of (e.g. etcd's IP); tried
    /// after --iface and --iface-regex
    #[arg(long, env = "TWEED_IFACE_CAN_REACH", value_name = "IP")]
    pub iface_can_reach: Option<Ipv4Addr>,

    /// IP advertised to other nodes in this node's lease [default: the chosen interface's address]
    #[arg(long, env = "TWEED_PUBLIC_IP", value_name = "IP")]
    pub public_ip: Option<Ipv4Addr>,

    /// Where to write the lease for the CNI plugin [default: /run/tweed/subnet.env]
    #[arg(long, env = "TWEED_SUBNET_FILE", value_name = "FILE")]
    pub subnet_file: Option<PathBuf>,

    /// Renew the lease this long before it expires; a bare number means minutes, as in flannel
    /// [default: 60m]
    #[arg(long, env = "TWEED_SUBNET_LEASE_RENEW_MARGIN", value_name = "DURATION")]
    pub subnet_lease_renew_margin: Option<String>,

    /// TTL of this node's lease in etcd (e.g. 24h, 30s) [default: 24h]
    #[arg(long, env = "TWEED_LEASE_TTL", value_name = "DURATION")]
    pub lease_ttl: Option<String>,

    /// Directory for state kept across restarts (the VTEP MAC) [default: /var/lib/tweed]
    #[arg(long, env = "TWEED_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Log filter: error, warn, info, debug, trace, or a tracing directive [default: info]
    #[arg(long, env = "TWEED_LOG_LEVEL", value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// Address for /metrics, /healthz, /readyz; "" or "off" disables [default: 0.0.0.0:9867]
    #[arg(long, env = "TWEED_METRICS_ADDR", value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,

    /// Unix socket of the gRPC API (tweedctl) [default: /run/tweed/tweedd.sock]
    #[arg(long, env = "TWEED_API_SOCKET", value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Masquerade traffic leaving the overlay (as flannel's --ip-masq) [default: false]
    #[arg(
        long,
        env = "TWEED_IP_MASQ",
        num_args = 0..=1,
        default_missing_value = "true",
        require_equals = true,
        value_parser = BoolishValueParser::new(),
        value_name = "BOOL"
    )]
    pub ip_masq: Option<bool>,

    /// How often the firewall rules are checked and repaired; a bare number means seconds, as
    /// in flannel [default: 5s]
    #[arg(long, env = "TWEED_IPTABLES_RESYNC", value_name = "DURATION")]
    pub iptables_resync: Option<String>,

    /// Program the rules with nftables (table `ip tweed`) instead of iptables [default: false]
    #[arg(
        long,
        env = "TWEED_NFTABLES",
        num_args = 0..=1,
        default_missing_value = "true",
        require_equals = true,
        value_parser = BoolishValueParser::new(),
        value_name = "BOOL"
    )]
    pub nftables: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(transparent)]
    File(#[from] AgentFileError),
    #[error("{source_name} {flag}: {reason}")]
    Invalid {
        source_name: String,
        flag: &'static str,
        reason: String,
    },
}

#[derive(Debug, Clone)]
pub struct Settings {
    /// Includes `username`/`password` (the password already read from --etcd-password-file).
    pub etcd: EtcdOptions,
    pub iface: Vec<String>,
    /// Validated regexes (see [`Settings::iface_choice`]).
    pub iface_regex: Vec<String>,
    pub iface_can_reach: Option<Ipv4Addr>,
    pub public_ip: Option<Ipv4Addr>,
    pub subnet_file: PathBuf,
    pub renew_margin: Duration,
    pub lease_ttl: Duration,
    pub state_dir: PathBuf,
    pub log_level: String,
    /// `None`: metrics/health HTTP disabled (`--metrics-addr off`).
    pub metrics_addr: Option<SocketAddr>,
    pub api_socket: PathBuf,
    pub ip_masq: bool,
    pub iptables_resync: Duration,
    pub nftables: bool,
}

impl Settings {
    /// Everything the interface choice needs (see `tweed_netlink::iface::choose`).
    pub fn iface_choice(&self) -> Result<IfaceChoice, IfaceError> {
        IfaceChoice::new(
            &self.iface,
            &self.iface_regex,
            self.iface_can_reach,
            self.public_ip,
        )
    }
}

/// What a bare number means for a duration flag.
#[derive(Clone, Copy)]
enum Bare {
    Rejected,
    Minutes,
    Seconds,
}

fn parse_duration(
    source_name: &str,
    flag: &'static str,
    v: &str,
    bare: Bare,
) -> Result<Duration, SettingsError> {
    if let Ok(n) = v.trim().parse::<u64>() {
        match bare {
            Bare::Minutes if n > 0 => return Ok(Duration::from_secs(n * 60)),
            Bare::Seconds if n > 0 => return Ok(Duration::from_secs(n)),
            _ => {}
        }
    }
    let d = humantime::parse_duration(v.trim()).map_err(|e| SettingsError::Invalid {
        source_name: source_name.to_string(),
        flag,
        reason: format!("{v:?}: {e} (e.g. 60m, 24h, 30s)"),
    })?;
    if d.is_zero() {
        return Err(SettingsError::Invalid {
            source_name: source_name.to_string(),
            flag,
            reason: "must be greater than zero".into(),
        });
    }
    Ok(d)
}

impl Cli {
    pub fn into_settings(self) -> Result<Settings, SettingsError> {
        let file = match &self.config {
            Some(p) => AgentFile::read(p)?,
            None => AgentFile::default(),
        };
        Self::merge(self, file)
    }

    fn merge(cli: Cli, file: AgentFile) -> Result<Settings, SettingsError> {
        let fname = cli
            .config
            .as_deref()
            .unwrap_or(Path::new("config file"))
            .display()
            .to_string();
        let invalid =
            |source_name: &str, flag: &'static str, reason: String| SettingsError::Invalid {
                source_name: source_name.to_string(),
                flag,
                reason,
            };
        let pick_dur = |flag: &'static str,
                        c: &Option<String>,
                        f: &Option<String>,
                        default: Duration,
                        bare: Bare| {
            match (c, f) {
                (Some(v), _) => parse_duration(&format!("--{flag}"), flag, v, bare),
                (None, Some(v)) => parse_duration(&fname, flag, v, bare),
                (None, None) => Ok(default),
            }
        };
        let renew_margin = pick_dur(
            "subnet-lease-renew-margin",
            &cli.subnet_lease_renew_margin,
            &file.subnet_lease_renew_margin,
            DEFAULT_RENEW_MARGIN,
            Bare::Minutes,
        )?;
        let lease_ttl = pick_dur(
            "lease-ttl",
            &cli.lease_ttl,
            &file.lease_ttl,
            DEFAULT_LEASE_TTL,
            Bare::Rejected,
        )?;
        let iptables_resync = pick_dur(
            "iptables-resync",
            &cli.iptables_resync,
            &file.iptables_resync,
            DEFAULT_IPTABLES_RESYNC,
            Bare::Seconds,
        )?;
        let metrics_addr = match (&cli.metrics_addr, &file.metrics_addr) {
            (Some(v), _) => {
                parse_metrics_addr(v).map_err(|r| invalid("--metrics-addr", "metrics-addr", r))?
            }
            (None, Some(v)) => {
                parse_metrics_addr(v).map_err(|r| invalid(&fname, "metrics-addr", r))?
            }
            (None, None) => Some(DEFAULT_METRICS_ADDR.parse().expect("valid default")),
        };
        let (username, password) = etcd_credentials(&cli_creds(&cli), &file_creds(&file), &fname)?;
        let iface_can_reach = match (cli.iface_can_reach, &file.iface_can_reach) {
            (Some(ip), _) => Some(ip),
            (None, Some(s)) => Some(s.trim().parse().map_err(|_| {
                invalid(
                    &fname,
                    "iface-can-reach",
                    format!("{s:?} is not an IPv4 address"),
                )
            })?),
            (None, None) => None,
        };
        let (iface_regex_source, iface_regex) = match (cli.iface_regex, file.iface_regex) {
            (Some(v), _) => ("--iface-regex".to_string(), v),
            (None, Some(v)) => (fname.clone(), v.into_vec()),
            (None, None) => (String::new(), Vec::new()),
        };
        if let Err(e) = IfaceChoice::new(&[], &iface_regex, None, None) {
            return Err(invalid(&iface_regex_source, "iface-regex", e.to_string()));
        }

        let public_ip = match (cli.public_ip, &file.public_ip) {
            (Some(ip), _) => Some(ip),
            (None, Some(s)) => Some(s.parse().map_err(|_| SettingsError::Invalid {
                source_name: fname.clone(),
                flag: "public-ip",
                reason: format!("{s:?} is not an IPv4 address"),
            })?),
            (None, None) => None,
        };
        let endpoints: Vec<String> = cli
            .etcd_endpoints
            .or(file.etcd_endpoints.map(|e| e.into_vec()))
            .unwrap_or_else(|| vec![DEFAULT_ETCD_ENDPOINTS.to_string()])
            .into_iter()
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(SettingsError::Invalid {
                source_name: "--etcd-endpoints".into(),
                flag: "etcd-endpoints",
                reason: "no endpoint given".into(),
            });
        }
        for e in &endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(SettingsError::Invalid {
                    source_name: "--etcd-endpoints".into(),
                    flag: "etcd-endpoints",
                    reason: format!("{e:?} must start with http:// or https://"),
                });
            }
        }
        let etcd = EtcdOptions {
            endpoints,
            prefix: cli
                .etcd_prefix
                .or(file.etcd_prefix)
                .unwrap_or_else(|| DEFAULT_ETCD_PREFIX.to_string()),
            ca_file: cli.etcd_cafile.or(file.etcd_cafile),
            cert_file: cli.etcd_certfile.or(file.etcd_certfile),
            key_file: cli.etcd_keyfile.or(file.etcd_keyfile),
            username,
            password,
            request_timeout: Duration::from_secs(5),
        };
        if etcd.cert_file.is_some() != etcd.key_file.is_some() {
            return Err(SettingsError::Invalid {
                source_name: "--etcd-certfile/--etcd-keyfile".into(),
                flag: "etcd-certfile",
                reason: "a client certificate and its key go together: give both or neither".into(),
            });
        }
        Ok(Settings {
            etcd,
            iface: cli
                .iface
                .or(file.iface.map(|i| i.into_vec()))
                .unwrap_or_default(),
            public_ip,
            subnet_file: cli
                .subnet_file
                .or(file.subnet_file)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SUBNET_FILE)),
            renew_margin,
            lease_ttl,
            state_dir: cli
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            log_level: cli
                .log_level
                .or(file.log_level)
                .unwrap_or_else(|| "info".to_string()),
            iface_regex,
            iface_can_reach,
            metrics_addr,
            api_socket: cli
                .api_socket
                .or(file.api_socket)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_API_SOCKET)),
            ip_masq: cli.ip_masq.or(file.ip_masq).unwrap_or(false),
            iptables_resync,
            nftables: cli.nftables.or(file.nftables).unwrap_or(false),
        })
    }
}

/// `host:port`, `:port` (all addresses, as Go spells it), or `""`/`off` for disabled.
fn parse_metrics_addr(v: &str) -> Result<Option<SocketAddr>, String> {
    let v = v.trim();
    if v.is_empty() || v.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let full = match v.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => v.to_string(),
    };
    full.parse::<SocketAddr>().map(Some).map_err(|_| {
        format!("{v:?} is not HOST:PORT with an IP host (e.g. 0.0.0.0:9867, 127.0.0.1:9867, :9867), nor \"off\"")
    })
}

/// The credential-related values given at one level (flags+env, or the file).
struct Creds {
    source: String,
    username: Option<String>,
    password: Option<String>,
    password_file: Option<PathBuf>,
}

fn cli_creds(cli: &Cli) -> Creds {
    Creds {
        source: "--etcd-password/--etcd-password-file".into(),
        username: cli.etcd_username.clone(),
        password: cli.etcd_password.clone(),
        password_file: cli.etcd_password_file.clone(),
    }
}

fn file_creds(file: &AgentFile) -> Creds {
    Creds {
        source: String::new(),
        username: file.etcd_username.clone(),
        password: file.etcd_password.clone(),
        password_file: file.etcd_password_file.clone(),
    }
}

/// Username and password; the password comes from the highest level that gives one (flag/env
/// over file), as either a value or a file, and reading the file is an error naming it.
fn etcd_credentials(
    cli: &Creds,
    file: &Creds,
    fname: &str,
) -> Result<(Option<String>, Option<String>), SettingsError> {
    let invalid = |source_name: &str, flag: &'static str, reason: String| SettingsError::Invalid {
        source_name: source_name.to_string(),
        flag,
        reason,
    };
    let username = cli.username.clone().or_else(|| file.username.clone());
    let level = if cli.password.is_some() || cli.password_file.is_some() {
        Some((cli, cli.source.as_str()))
    } else if file.password.is_some() || file.password_file.is_some() {
        Some((file, fname))
    } else {
        None
    };
    let password = match level {
        None => None,
        Some((c, src)) => match (&c.password, &c.password_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    src,
                    "etcd-password",
                    "give etcd-password or etcd-password-file, not both".into(),
                ))
            }
            (Some(p), None) => Some(p.clone()),
            (None, Some(path)) => {
                let src = if c.source.is_empty() {
                    fname
                } else {
                    "--etcd-password-file"
                };
                let text = std::fs::read_to_string(path).map_err(|e| {
                    invalid(
                        src,
                        "etcd-password-file",
                        format!("{}: {e}", path.display()),
                    )
                })?;
                let pw = text.trim_end_matches(['\n', '\r']).to_string();
                if pw.is_empty() {
                    return Err(invalid(
                        src,
                        "etcd-password-file",
                        format!("{}: is empty", path.display()),
                    ));
                }
                Some(pw)
            }
            (None, None) => unreachable!("level chosen because one is set"),
        },
    };
    match (&username, &password) {
        (Some(u), _) if u.trim().is_empty() => Err(invalid(
            "--etcd-username",
            "etcd-username",
            "is empty".into(),
        )),
        (Some(_), None) => Err(invalid(
            "--etcd-username",
            "etcd-username",
            "needs --etcd-password or --etcd-password-file".into(),
        )),
        (None, Some(_)) => Err(invalid(
            "--etcd-password",
            "etcd-password",
            "needs --etcd-username".into(),
        )),
        _ => Ok((username, password)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// clap reads `TWEED_*` from the process environment: tests that set it must not overlap with
    /// tests that parse, so every test that parses holds this.
    static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn env_lock() -> std::sync::MutexGuard<'static, ()> {
        ENV.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cli(args: &[&str]) -> Cli {
        let _g = env_lock();
        let mut v = vec!["tweedd"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap()
    }

    fn file(text: &str) -> AgentFile {
        AgentFile::parse(Path::new("/etc/tweed/f.yaml"), text).unwrap()
    }

    fn merge_err(args: &[&str], f: AgentFile) -> String {
        Cli::merge(cli(args), f).unwrap_err().to_string()
    }

    #[test]
    fn newer_flags_default_like_flannel() {
        let s = Cli::merge(cli(&[]), AgentFile::default()).unwrap();
        assert_eq!(s.metrics_addr, Some("0.0.0.0:9867".parse().unwrap()));
        assert_eq!(s.api_socket, PathBuf::from("/run/tweed/tweedd.sock"));
        assert!(!s.ip_masq && !s.nftables);
        assert_eq!(s.iptables_resync, Duration::from_secs(5));
        assert!(s.iface_regex.is_empty() && s.iface_can_reach.is_none());
        assert!(s.etcd.username.is_none() && s.etcd.password.is_none());
        assert!(s.iface_choice().unwrap().is_automatic());
    }

    #[test]
    fn newer_flags_parse_and_beat_the_file() {
        let f = file(
            "metrics-addr: 127.0.0.1:1\napi-socket: /file.sock\nip-masq: true\nnftables: true\n\
             iptables-resync: 1m\niface-regex: ['^file']\niface-can-reach: 10.0.0.1\n",
        );
        let s = Cli::merge(cli(&[]), f.clone()).unwrap();
        assert_eq!(s.metrics_addr, Some("127.0.0.1:1".parse().unwrap()));
        assert_eq!(s.api_socket, PathBuf::from("/file.sock"));
        assert!(s.ip_masq && s.nftables);
        assert_eq!(s.iptables_resync, Duration::from_secs(60));
        assert_eq!(s.iface_regex, vec!["^file"]);
        assert_eq!(s.iface_can_reach, Some("10.0.0.1".parse().unwrap()));
        let s = Cli::merge(
            cli(&[
                "--metrics-addr=off",
                "--api-socket",
                "/flag.sock",
                "--ip-masq=false",
                "--nftables=no",
                "--iptables-resync",
                "7",
                "--iface-regex",
                "^eth",
                "--iface-regex",
                "^198\\.18\\.",
                "--iface-can-reach",
                "198.18.0.1",
            ]),
            f,
        )
        .unwrap();
        assert_eq!(s.metrics_addr, None);
        assert_eq!(s.api_socket, PathBuf::from("/flag.sock"));
        assert!(!s.ip_masq && !s.nftables, "flags turn the file's true off");
        assert_eq!(
            s.iptables_resync,
            Duration::from_secs(7),
            "bare number = seconds"
        );
        assert_eq!(s.iface_regex, vec!["^eth", "^198\\.18\\."]);
        assert_eq!(s.iface_can_reach, Some("198.18.0.1".parse().unwrap()));
        let c = s.iface_choice().unwrap();
        assert_eq!((c.regexes.len(), c.can_reach.is_some()), (2, true));
        // A bare boolean flag means true; the next flag is not taken as its value.
        let s = Cli::merge(cli(&["--ip-masq", "--nftables"]), AgentFile::default()).unwrap();
        assert!(s.ip_masq && s.nftables);
        for (v, want) in [("", None), ("OFF", None), (":9100", Some("0.0.0.0:9100"))] {
            let s = Cli::merge(cli(&["--metrics-addr", v]), AgentFile::default()).unwrap();
            assert_eq!(s.metrics_addr, want.map(|w| w.parse().unwrap()), "{v:?}");
        }
    }

    #[test]
    fn environment_sits_between_flag_and_file() {
        let _g = env_lock();
        let vars = [
            ("TWEED_IP_MASQ", "true"),
            ("TWEED_METRICS_ADDR", "127.0.0.1:9999"),
            ("TWEED_IFACE_REGEX", "^env"),
            ("TWEED_IPTABLES_RESYNC", "30s"),
            ("TWEED_ETCD_USERNAME", "envuser"),
            ("TWEED_ETCD_PASSWORD", "envpw"),
        ];
        for (k, v) in vars {
            std::env::set_var(k, v);
        }
        let parse = |args: &[&str]| {
            let mut v = vec!["tweedd"];
            v.extend_from_slice(args);
            Cli::try_parse_from(v)
        };
        let f = file(
            "ip-masq: false\nmetrics-addr: off\niptables-resync: 1s\netcd-username: fileuser\n",
        );
        let from_env = parse(&[]).map(|c| Cli::merge(c, f.clone()));
        let from_flag = parse(&["--metrics-addr", "127.0.0.1:1", "--ip-masq=0"])
            .map(|c| Cli::merge(c, f.clone()));
        for (k, _) in vars {
            std::env::remove_var(k);
        }
        let s = from_env.unwrap().unwrap();
        assert!(s.ip_masq, "env beats file");
        assert_eq!(s.metrics_addr, Some("127.0.0.1:9999".parse().unwrap()));
        assert_eq!(s.iface_regex, vec!["^env"]);
        assert_eq!(s.iptables_resync, Duration::from_secs(30));
        assert_eq!(s.etcd.username.as_deref(), Some("envuser"));
        assert_eq!(s.etcd.password.as_deref(), Some("envpw"));
        let s = from_flag.unwrap().unwrap();
        assert!(!s.ip_masq, "flag beats env");
        assert_eq!(s.metrics_addr, Some("127.0.0.1:1".parse().unwrap()));
    }

    #[test]
    fn etcd_password_file_and_its_errors() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let pws = pw.to_str().unwrap();
        let s = Cli::merge(
            cli(&["--etcd-username", "tweed", "--etcd-password-file", pws]),
            AgentFile::default(),
        )
        .unwrap();
        assert_eq!(
            (s.etcd.username.as_deref(), s.etcd.password.as_deref()),
            (Some("tweed"), Some("s3cret"))
        );
        assert!(
            !format!("{s:?}").contains("s3cret"),
            "Debug must not show the password"
        );
        // From the file, and a flag password overrides the file's password file.
        let f = file(&format!(
            "etcd-username: tweed\netcd-password-file: {pws}\n"
        ));
        let s = Cli::merge(cli(&[]), f.clone()).unwrap();
        assert_eq!(s.etcd.password.as_deref(), Some("s3cret"));
        let s = Cli::merge(cli(&["--etcd-password", "flagpw"]), f).unwrap();
        assert_eq!(s.etcd.password.as_deref(), Some("flagpw"));

        let missing = dir.path().join("nope");
        let e = merge_err(
            &[
                "--etcd-username",
                "u",
                "--etcd-password-file",
                missing.to_str().unwrap(),
            ],
            AgentFile::default(),
        );
        assert!(
            e.contains("--etcd-password-file") && e.contains("nope"),
            "{e}"
        );
        let f = file(&format!(
            "etcd-username: u\netcd-password-file: {}\n",
            missing.display()
        ));
        let e = merge_err(&["--config", "/etc/tweed/f.yaml"], f);
        assert!(
            e.contains("/etc/tweed/f.yaml") && e.contains("etcd-password-file"),
            "{e}"
        );
        std::fs::write(&pw, "\n").unwrap();
        let e = merge_err(
            &["--etcd-username", "u", "--etcd-password-file", pws],
            AgentFile::default(),
        );
        assert!(e.contains("empty"), "{e}");
        let e = merge_err(
            &[
                "--etcd-username",
                "u",
                "--etcd-password",
                "p",
                "--etcd-password-file",
                pws,
            ],
            AgentFile::default(),
        );
        assert!(e.contains("not both"), "{e}");
        let e = merge_err(&["--etcd-username", "u"], AgentFile::default());
        assert!(
            e.contains("etcd-username") && e.contains("--etcd-password"),
            "{e}"
        );
        let e = merge_err(&["--etcd-password", "p"], AgentFile::default());
        assert!(e.contains("needs --etcd-username"), "{e}");
    }

    #[test]
    fn newer_bad_values_name_the_flag_or_file() {
        let e = merge_err(&["--metrics-addr", "localhost"], AgentFile::default());
        assert!(
            e.contains("--metrics-addr") && e.contains("localhost"),
            "{e}"
        );
        let e = merge_err(
            &["--config", "/etc/tweed/f.yaml"],
            file("metrics-addr: nope:1\n"),
        );
        assert!(
            e.contains("/etc/tweed/f.yaml") && e.contains("metrics-addr"),
            "{e}"
        );
        let e = merge_err(&["--iptables-resync", "often"], AgentFile::default());
        assert!(e.contains("iptables-resync") && e.contains("often"), "{e}");
        let e = merge_err(&["--iptables-resync", "0"], AgentFile::default());
        assert!(e.contains("iptables-resync"), "{e}");
        let e = merge_err(&["--iface-regex", "(eth"], AgentFile::default());
        assert!(e.contains("--iface-regex") && e.contains("(eth"), "{e}");
        let e = merge_err(
            &["--config", "/etc/tweed/f.yaml"],
            file("iface-regex: '['\n"),
        );
        assert!(
            e.contains("/etc/tweed/f.yaml") && e.contains("iface-regex"),
            "{e}"
        );
        let e = merge_err(
            &["--config", "/etc/tweed/f.yaml"],
            file("iface-can-reach: etcd1\n"),
        );
        assert!(e.contains("iface-can-reach") && e.contains("etcd1"), "{e}");
        let _g = env_lock();
        for bad in [
            &["tweedd", "--iface-can-reach", "etcd1"][..],
            &["tweedd", "--ip-masq=perhaps"],
            &["tweedd", "--nftables=2"],
        ] {
            let e = Cli::try_parse_from(bad).unwrap_err().to_string();
            assert!(e.contains(bad[1].split('=').next().unwrap()), "{e}");
        }
    }

    #[test]
    fn defaults() {
        let s = Cli::merge(cli(&[]), AgentFile::default()).unwrap();
        assert_eq!(s.etcd.endpoints, vec!["http://127.0.0.1:2379"]);
        assert_eq!(s.etcd.prefix, "/coreos.com/network");
        assert_eq!(s.subnet_file, PathBuf::from("/run/tweed/subnet.env"));
        assert_eq!(s.lease_ttl, DEFAULT_LEASE_TTL);
        assert_eq!(s.renew_margin, DEFAULT_RENEW_MARGIN);
        assert_eq!(s.state_dir, PathBuf::from("/var/lib/tweed"));
        assert!(s.iface.is_empty() && s.public_ip.is_none());
    }

    #[test]
    fn flag_beats_file_beats_default() {
        let file = AgentFile::parse(
            Path::new("f.yaml"),
            "etcd-endpoints: [http://file:2379]\nlease-ttl: 1h\nsubnet-file: /file/subnet.env\niface: eth9\n",
        )
        .unwrap();
        let s = Cli::merge(
            cli(&[
                "--etcd-endpoints",
                "http://a:1,http://b:2",
                "--iface",
                "eth1",
                "--iface",
                "10.0.0.1",
            ]),
            file,
        )
        .unwrap();
        assert_eq!(s.etcd.endpoints, vec!["http://a:1", "http://b:2"]);
        assert_eq!(s.iface, vec!["eth1", "10.0.0.1"]);
        assert_eq!(s.lease_ttl, Duration::from_secs(3600));
        assert_eq!(s.subnet_file, PathBuf::from("/file/subnet.env"));
    }

    #[test]
    fn renew_margin_accepts_flannel_minutes() {
        let s = Cli::merge(
            cli(&["--subnet-lease-renew-margin", "30"]),
            AgentFile::default(),
        )
        .unwrap();
        assert_eq!(s.renew_margin, Duration::from_secs(1800));
        let s = Cli::merge(
            cli(&["--subnet-lease-renew-margin", "90s"]),
            AgentFile::default(),
        )
        .unwrap();
        assert_eq!(s.renew_margin, Duration::from_secs(90));
    }

    #[test]
    fn bad_values_name_the_flag() {
        let e = Cli::merge(cli(&["--lease-ttl", "soon"]), AgentFile::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("lease-ttl") && e.contains("soon"), "{e}");
        let e = Cli::merge(cli(&["--lease-ttl", "0s"]), AgentFile::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("lease-ttl"), "{e}");
        let e = Cli::merge(
            cli(&["--etcd-endpoints", "127.0.0.1:2379"]),
            AgentFile::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("etcd-endpoints") && e.contains("http://"), "{e}");
        let e = Cli::merge(cli(&["--etcd-certfile", "/c.pem"]), AgentFile::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("etcd-keyfile"), "{e}");
        assert!({
            let _g = env_lock();
            Cli::try_parse_from(["tweedd", "--public-ip", "not-an-ip"]).is_err()
        });
        let file = AgentFile::parse(Path::new("f.yaml"), "public-ip: nope\n").unwrap();
        let e = Cli::merge(cli(&["--config", "/etc/tweed/f.yaml"]), file)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/etc/tweed/f.yaml") && e.contains("public-ip"),
            "{e}"
        );
    }
}
