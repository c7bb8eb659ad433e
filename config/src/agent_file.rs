//! The agent's YAML config file (`tweedd --config FILE`): a mapping from long flag names to values.
//!
//! This module knows the file's shape, not its keys: each key's value is kept as the text a flag
//! would have been given, and the agent checks keys and values with the same parsers as its flags,
//! so a setting is declared once (in the agent's flag definitions) whichever place it comes from.

use std::path::{Path, PathBuf};

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
        key: String,
        reason: String,
    },
}

/// One key's value as written: a scalar or a list, because `etcd-endpoints: a,b` and a YAML list
/// are both natural to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileValue {
    One(String),
    Many(Vec<String>),
}

impl FileValue {
    /// The values of a setting that takes several: a list as written, a scalar split at commas.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            FileValue::One(s) => s
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            FileValue::Many(v) => v,
        }
    }
}

/// The keys a file sets, in file order. A key whose value is empty (`lease-ttl:`) is not set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentFile {
    pub path: PathBuf,
    pub entries: Vec<(String, FileValue)>,
}

impl AgentFile {
    pub fn parse(path: &Path, text: &str) -> Result<Self, AgentFileError> {
        let mut file = AgentFile {
            path: path.to_path_buf(),
            entries: Vec::new(),
        };
        if text.trim().is_empty() {
            return Ok(file);
        }
        let parse_err = |message: String| AgentFileError::Parse {
            path: path.to_path_buf(),
            message,
        };
        let doc: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(text).map_err(|e| parse_err(e.to_string()))?;
        let serde_yaml_ng::Value::Mapping(map) = doc else {
            return Err(parse_err(
                "must be a mapping of long flag names to values (e.g. `lease-ttl: 24h`)".into(),
            ));
        };
        for (k, v) in map {
            let key = scalar(&k).ok_or_else(|| parse_err(format!("a key must be text: {k:?}")))?;
            let field = |reason: String| AgentFileError::Field {
                path: path.to_path_buf(),
                key: key.clone(),
                reason,
            };
            let value = match v {
                serde_yaml_ng::Value::Null => continue,
                serde_yaml_ng::Value::Sequence(items) => FileValue::Many(
                    items
                        .iter()
                        .map(|i| scalar(i).ok_or_else(|| field(format!("{i:?} is not a value"))))
                        .collect::<Result<_, _>>()?,
                ),
                other => FileValue::One(
                    scalar(&other)
                        .ok_or_else(|| field("takes a value or a list of values".into()))?,
                ),
            };
            file.entries.push((key, value));
        }
        Ok(file)
    }

    pub fn read(path: &Path) -> Result<Self, AgentFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| AgentFileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }
}

/// A YAML scalar as the text a flag would be given (`true`, `10`, `24h`).
fn scalar(v: &serde_yaml_ng::Value) -> Option<String> {
    match v {
        serde_yaml_ng::Value::String(s) => Some(s.clone()),
        serde_yaml_ng::Value::Bool(b) => Some(b.to_string()),
        serde_yaml_ng::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentFile, AgentFileError> {
        AgentFile::parse(Path::new("/etc/tweed/tweedd.yaml"), text)
    }

    fn value(f: &AgentFile, key: &str) -> FileValue {
        f.entries.iter().find(|(k, _)| k == key).unwrap().1.clone()
    }

    #[test]
    fn scalars_lists_and_comma_lists() {
        let f = parse(
            "etcd-endpoints: http://a:2379,http://b:2379\niface: [eth1, 10.0.0.1]\nlease-ttl: 10s\n\
             ip-masq: true\nudp-workers: 4\nmetrics-addr: off\nstate-dir:\n",
        )
        .unwrap();
        assert_eq!(
            value(&f, "etcd-endpoints").into_vec(),
            vec!["http://a:2379", "http://b:2379"]
        );
        assert_eq!(value(&f, "iface").into_vec(), vec!["eth1", "10.0.0.1"]);
        // Every scalar is the text a flag would get; YAML 1.2 reads `off` as text.
        for (k, v) in [
            ("lease-ttl", "10s"),
            ("ip-masq", "true"),
            ("udp-workers", "4"),
            ("metrics-addr", "off"),
        ] {
            assert_eq!(value(&f, k), FileValue::One(v.into()), "{k}");
        }
        assert!(
            f.entries.iter().all(|(k, _)| k != "state-dir"),
            "an empty value is not set"
        );
        assert_eq!(f.path, Path::new("/etc/tweed/tweedd.yaml"));
        assert!(parse("\n").unwrap().entries.is_empty());
    }

    #[test]
    fn bad_shapes_name_the_file_and_key() {
        for (text, want) in [
            ("- a\n- b\n", "mapping"),
            ("iface: {name: eth0}\n", "iface"),
            ("iface: [[eth0]]\n", "iface"),
            ("lease-ttl: [\n", "tweedd.yaml"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(
                e.contains("/etc/tweed/tweedd.yaml") && e.contains(want),
                "{text:?}: {e}"
            );
        }
        let e = AgentFile::read(Path::new("/nonexistent/tweedd.yaml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/tweedd.yaml"), "{e}");
    }
}
