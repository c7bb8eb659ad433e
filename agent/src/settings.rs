//! tweedd's settings: flags, `TWEED_<FLAG>` environment variables and the YAML config file, merged
//! in that order of precedence over built-in defaults.

use crate::registry::EtcdOptions;
use clap::Parser;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tweed_config::agent_file::{AgentFile, AgentFileError};

pub const DEFAULT_ETCD_ENDPOINTS: &str = "http://127.0.0.1:2379";
pub const DEFAULT_ETCD_PREFIX: &str = "/coreos.com/network";
pub const DEFAULT_SUBNET_FILE: &str = "/run/tweed/subnet.env";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tweed";
pub const DEFAULT_RENEW_MARGIN: Duration = Duration::from_secs(60 * 60);
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(24 * 60 * 60);

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

    /// Interface for inter-host traffic, by name or IPv4 address; repeatable, first match wins
    /// [default: the interface of the default route]
    #[arg(
        long,
        env = "TWEED_IFACE",
        value_delimiter = ',',
        value_name = "NAME|IP"
    )]
    pub iface: Option<Vec<String>>,

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
    pub etcd: EtcdOptions,
    pub iface: Vec<String>,
    pub public_ip: Option<Ipv4Addr>,
    pub subnet_file: PathBuf,
    pub renew_margin: Duration,
    pub lease_ttl: Duration,
    pub state_dir: PathBuf,
    pub log_level: String,
}

fn parse_duration(
    source_name: &str,
    flag: &'static str,
    v: &str,
    bare_minutes: bool,
) -> Result<Duration, SettingsError> {
    if bare_minutes {
        if let Ok(m) = v.trim().parse::<u64>() {
            return Ok(Duration::from_secs(m * 60));
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
        let pick_dur = |flag: &'static str,
                        c: &Option<String>,
                        f: &Option<String>,
                        default: Duration,
                        bare_minutes: bool| {
            match (c, f) {
                (Some(v), _) => parse_duration(&format!("--{flag}"), flag, v, bare_minutes),
                (None, Some(v)) => parse_duration(&fname, flag, v, bare_minutes),
                (None, None) => Ok(default),
            }
        };
        let renew_margin = pick_dur(
            "subnet-lease-renew-margin",
            &cli.subnet_lease_renew_margin,
            &file.subnet_lease_renew_margin,
            DEFAULT_RENEW_MARGIN,
            true,
        )?;
        let lease_ttl = pick_dur(
            "lease-ttl",
            &cli.lease_ttl,
            &file.lease_ttl,
            DEFAULT_LEASE_TTL,
            false,
        )?;
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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut v = vec!["tweedd"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap()
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
        assert!(Cli::try_parse_from(["tweedd", "--public-ip", "not-an-ip"]).is_err());
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
