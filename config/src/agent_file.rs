//! The agent's YAML config file (`tweedd --config FILE`). Keys are the long flag names; the command
//! line and `TWEED_*` environment variables override what is set here.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum AgentFileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {key}: {reason}")]
    Field {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
}

/// A scalar or a list, because `etcd-endpoints: a,b` and a YAML list are both natural to write.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => s
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AgentFile {
    pub etcd_endpoints: Option<OneOrMany>,
    pub etcd_prefix: Option<String>,
    pub etcd_cafile: Option<PathBuf>,
    pub etcd_certfile: Option<PathBuf>,
    pub etcd_keyfile: Option<PathBuf>,
    pub etcd_username: Option<String>,
    /// Prefer `etcd-password-file`: a config file is often world-readable.
    pub etcd_password: Option<String>,
    pub etcd_password_file: Option<PathBuf>,
    pub iface: Option<OneOrMany>,
    pub iface_regex: Option<OneOrMany>,
    pub iface_can_reach: Option<String>,
    pub public_ip: Option<String>,
    pub subnet_file: Option<PathBuf>,
    pub subnet_lease_renew_margin: Option<String>,
    pub lease_ttl: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub log_level: Option<String>,
    /// `host:port`, or `""`/`off` to disable.
    pub metrics_addr: Option<String>,
    pub api_socket: Option<PathBuf>,
    pub ip_masq: Option<bool>,
    pub iptables_resync: Option<String>,
    pub nftables: Option<bool>,
}

impl AgentFile {
    pub fn parse(path: &Path, text: &str) -> Result<Self, AgentFileError> {
        if text.trim().is_empty() {
            return Ok(AgentFile::default());
        }
        serde_yaml_ng::from_str(text).map_err(|e| AgentFileError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    pub fn read(path: &Path) -> Result<Self, AgentFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| AgentFileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses a duration value from this file, naming the key on error.
    pub fn duration(
        path: &Path,
        key: &'static str,
        value: &Option<String>,
    ) -> Result<Option<Duration>, AgentFileError> {
        value
            .as_deref()
            .map(|v| {
                humantime::parse_duration(v).map_err(|e| AgentFileError::Field {
                    path: path.to_path_buf(),
                    key,
                    reason: format!("{v:?}: {e} (e.g. 60m, 24h, 10s)"),
                })
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_key() {
        let f = AgentFile::parse(
            Path::new("a.yaml"),
            "etcd-endpoints: http://a:2379,http://b:2379\netcd-prefix: /x\niface: [eth1, 10.0.0.1]\nlease-ttl: 10s\nsubnet-lease-renew-margin: 2s\nstate-dir: /tmp/s\n",
        )
        .unwrap();
        assert_eq!(
            f.etcd_endpoints.unwrap().into_vec(),
            vec!["http://a:2379", "http://b:2379"]
        );
        assert_eq!(f.iface.unwrap().into_vec(), vec!["eth1", "10.0.0.1"]);
        assert_eq!(
            AgentFile::duration(Path::new("a"), "lease-ttl", &f.lease_ttl).unwrap(),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            AgentFile::parse(Path::new("e"), "\n").unwrap(),
            AgentFile::default()
        );
    }

    #[test]
    fn parses_the_newer_keys() {
        let f = AgentFile::parse(
            Path::new("a.yaml"),
            "etcd-username: flannel\netcd-password-file: /etc/tweed/pw\niface-regex: ['^eth[0-9]+$', '^198\\.18\\.']\n\
             iface-can-reach: 198.18.0.1\nmetrics-addr: off\napi-socket: /run/x.sock\nip-masq: true\n\
             iptables-resync: 10s\nnftables: false\n",
        )
        .unwrap();
        assert_eq!(f.etcd_username.as_deref(), Some("flannel"));
        assert_eq!(f.etcd_password_file, Some(PathBuf::from("/etc/tweed/pw")));
        assert_eq!(
            f.iface_regex.unwrap().into_vec(),
            vec!["^eth[0-9]+$", "^198\\.18\\."]
        );
        assert_eq!(f.iface_can_reach.as_deref(), Some("198.18.0.1"));
        assert_eq!(f.metrics_addr.as_deref(), Some("off"));
        assert_eq!(f.api_socket, Some(PathBuf::from("/run/x.sock")));
        assert_eq!((f.ip_masq, f.nftables), (Some(true), Some(false)));
        assert_eq!(f.iptables_resync.as_deref(), Some("10s"));
    }

    #[test]
    fn a_bool_key_with_a_non_bool_value_is_named() {
        let e = AgentFile::parse(Path::new("/etc/tweed/tweedd.yaml"), "ip-masq: maybe\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/etc/tweed/tweedd.yaml") && e.contains("ip-masq"),
            "{e}"
        );
    }

    #[test]
    fn typos_and_bad_values_name_the_key_and_file() {
        let e = AgentFile::parse(Path::new("/etc/tweed/tweedd.yaml"), "etcd-endpoint: x\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/etc/tweed/tweedd.yaml") && e.contains("etcd-endpoint"),
            "{e}"
        );
        let e = AgentFile::duration(Path::new("f"), "lease-ttl", &Some("soon".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("lease-ttl") && e.contains("soon"), "{e}");
    }
}
