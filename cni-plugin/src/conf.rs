//! The network configuration on stdin: the plugin's keys, the runtime's additions
//! (`runtimeConfig`, `prevResult`, GC's attachment list), parsed and validated.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;

use crate::attachment::Attachment;
use crate::code;
use crate::env::validate_ifname;
use crate::version::{Version, SUPPORTED};

pub const DEFAULT_BRIDGE: &str = "cni0";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";

/// The keys tweed reads, before validation.
struct Raw {
    cni_version: Option<String>,
    name: Option<String>,
    kind: Option<String>,
    bridge: Option<String>,
    subnet_file: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    mtu: Option<u32>,
    hairpin_mode: Option<bool>,
    ip_masq: Option<bool>,
    default_route: Option<bool>,
    detached_delete: Option<bool>,
    range_start: Option<Ipv4Addr>,
    range_end: Option<Ipv4Addr>,
    dns: Option<Value>,
    ipam: Option<Value>,
    runtime_config: Option<Value>,
    prev_result: Option<Value>,
    valid_attachments: Option<Vec<Attachment>>,
    attachments: Option<Vec<Attachment>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfError {
    #[error("the network configuration is not valid JSON for tweed: {0}")]
    Decode(#[source] serde_json::Error),
    #[error(
        "cniVersion {version:?} is not supported by tweed (supported: {})",
        SUPPORTED.join(", ")
    )]
    Version { version: String },
    #[error("network configuration: \"{key}\": {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error(
        "network configuration: \"ipam\" is not supported: tweed allocates addresses from the \
         node subnet itself (remove the \"ipam\" section)"
    )]
    Ipam,
}

impl ConfError {
    pub fn code(&self) -> u32 {
        match self {
            ConfError::Decode(_) => code::DECODE,
            ConfError::Version { .. } => code::INCOMPATIBLE_VERSION,
            ConfError::Invalid { .. } => code::INVALID_CONFIG,
            ConfError::Ipam => code::UNSUPPORTED_FIELD,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct RuntimeConfig {
    /// The `ips` capability: addresses (with or without prefix) the runtime asks for.
    #[serde(default)]
    pub ips: Vec<String>,
    /// The `mac` capability.
    #[serde(default)]
    pub mac: Option<String>,
}

/// One key of the configuration, typed; a wrong type is an error naming the key.
fn get<T: serde::de::DeserializeOwned>(
    obj: &serde_json::Map<String, Value>,
    key: &'static str,
) -> Result<Option<T>, ConfError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => T::deserialize(v).map(Some).map_err(|e| ConfError::Invalid {
            key,
            reason: e.to_string(),
        }),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub bridge: String,
    /// `None`: tweed's default, then flannel's (see [`crate::node::subnet_file`]).
    pub subnet_file: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub mtu: Option<u32>,
    pub hairpin_mode: bool,
    pub ip_masq: bool,
    pub default_route: bool,
    /// DEL returns once the veth is unlisted and leaves the kernel's teardown to a forked child
    /// (see `detach`); `false` deletes in the plugin process, as the reference plugins do.
    pub detached_delete: bool,
    pub range_start: Option<Ipv4Addr>,
    pub range_end: Option<Ipv4Addr>,
    pub dns: Option<Value>,
    pub runtime_config: RuntimeConfig,
    pub prev_result: Option<Value>,
    /// GC's valid list: `cni.dev/valid-attachments` and `cni.dev/attachments` together (libcni
    /// sends both, older callers only the second).
    pub valid_attachments: Option<BTreeSet<Attachment>>,
}

impl NetConf {
    pub fn parse(bytes: &[u8]) -> Result<NetConf, ConfError> {
        // Unknown keys are ignored: runtimes add theirs (`capabilities`, capability-keyed
        // `runtimeConfig` entries, `args`) and chained plugins' settings may sit beside ours.
        let doc: Value = serde_json::from_slice(bytes).map_err(ConfError::Decode)?;
        let obj = doc.as_object().ok_or(ConfError::Invalid {
            key: "(top level)",
            reason: "not a JSON object".into(),
        })?;
        let raw = Raw {
            cni_version: get(obj, "cniVersion")?,
            name: get(obj, "name")?,
            kind: get(obj, "type")?,
            bridge: get(obj, "bridge")?,
            subnet_file: get(obj, "subnetFile")?,
            data_dir: get(obj, "dataDir")?,
            mtu: get(obj, "mtu")?,
            hairpin_mode: get(obj, "hairpinMode")?,
            ip_masq: get(obj, "ipMasq")?,
            default_route: get(obj, "defaultRoute")?,
            detached_delete: get(obj, "detachedDelete")?,
            range_start: get(obj, "rangeStart")?,
            range_end: get(obj, "rangeEnd")?,
            dns: get(obj, "dns")?,
            ipam: get(obj, "ipam")?,
            runtime_config: get(obj, "runtimeConfig")?,
            prev_result: get(obj, "prevResult")?,
            valid_attachments: get(obj, "cni.dev/valid-attachments")?,
            attachments: get(obj, "cni.dev/attachments")?,
        };
        let invalid = |key: &'static str, reason: &str| ConfError::Invalid {
            key,
            reason: reason.to_string(),
        };
        let cni_version = raw
            .cni_version
            .ok_or_else(|| invalid("cniVersion", "missing"))?;
        if !Version::is_supported(&cni_version) {
            return Err(ConfError::Version {
                version: cni_version,
            });
        }
        let name = raw.name.ok_or_else(|| invalid("name", "missing"))?;
        validate_network_name(&name).map_err(|r| invalid("name", &r))?;
        if let Some(kind) = &raw.kind {
            if kind != "tweed" {
                return Err(invalid(
                    "type",
                    &format!("{kind:?}: this is the \"tweed\" plugin"),
                ));
            }
        }
        if raw
            .ipam
            .as_ref()
            .is_some_and(|v| v.as_object().is_some_and(|o| !o.is_empty()))
        {
            return Err(ConfError::Ipam);
        }
        let bridge = raw.bridge.unwrap_or_else(|| DEFAULT_BRIDGE.to_string());
        validate_ifname(&bridge).map_err(|r| invalid("bridge", &format!("{bridge:?}: {r}")))?;
        if let Some(m) = raw.mtu {
            if !(576..=65535).contains(&m) {
                return Err(invalid("mtu", &format!("{m} is not within 576..=65535")));
            }
        }
        if let (Some(a), Some(b)) = (raw.range_start, raw.range_end) {
            if a > b {
                return Err(invalid(
                    "rangeEnd",
                    &format!("{b} comes before rangeStart {a}"),
                ));
            }
        }
        if let Some(dns) = &raw.dns {
            if !dns.is_object() {
                return Err(invalid("dns", "not an object"));
            }
        }
        let runtime_config = match raw.runtime_config {
            None | Some(Value::Null) => RuntimeConfig::default(),
            Some(v) => {
                serde_json::from_value(v).map_err(|e| invalid("runtimeConfig", &e.to_string()))?
            }
        };
        let prev_result = raw.prev_result.filter(|v| !v.is_null());
        let valid_attachments = match (raw.valid_attachments, raw.attachments) {
            (None, None) => None,
            (a, b) => Some(a.into_iter().chain(b).flatten().collect()),
        };
        Ok(NetConf {
            cni_version,
            name,
            bridge,
            subnet_file: raw.subnet_file,
            data_dir: raw
                .data_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            mtu: raw.mtu,
            hairpin_mode: raw.hairpin_mode.unwrap_or(false),
            ip_masq: raw.ip_masq.unwrap_or(false),
            default_route: raw.default_route.unwrap_or(true),
            detached_delete: raw.detached_delete.unwrap_or(true),
            range_start: raw.range_start,
            range_end: raw.range_end,
            dns: raw.dns,
            runtime_config,
            prev_result,
            valid_attachments,
        })
    }

    pub fn version(&self) -> Version {
        Version::parse(&self.cni_version).expect("validated at parse")
    }

    /// The IPAM store of this network: `<dataDir>/<name>`.
    pub fn store_dir(&self) -> PathBuf {
        self.data_dir.join(&self.name)
    }
}

/// The network name becomes a directory name under `dataDir`.
fn validate_network_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty".into());
    }
    if name == "." || name == ".." || name.contains('/') || name.chars().any(char::is_control) {
        return Err(format!(
            "{name:?}: a network name becomes a directory name, so it may not be \".\", \"..\" \
             or contain '/'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NetConf, ConfError> {
        NetConf::parse(s.as_bytes())
    }

    #[test]
    fn minimal_config_takes_defaults() {
        let c = parse(r#"{"cniVersion":"1.0.0","name":"tweed","type":"tweed"}"#).unwrap();
        assert_eq!(c.bridge, "cni0");
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/cni/networks"));
        assert_eq!(c.store_dir(), PathBuf::from("/var/lib/cni/networks/tweed"));
        assert!(!c.ip_masq && !c.hairpin_mode && c.default_route && c.detached_delete);
        assert_eq!(c.mtu, None);
        assert_eq!(c.valid_attachments, None);
    }

    #[test]
    fn full_config_and_runtime_additions() {
        let c = parse(
            r#"{"cniVersion":"1.1.0","name":"n","type":"tweed","bridge":"br9",
            "subnetFile":"/x/subnet.env","dataDir":"/d","mtu":1400,"hairpinMode":true,
            "ipMasq":true,"defaultRoute":false,"detachedDelete":false,"rangeStart":"10.244.1.100",
            "rangeEnd":"10.244.1.200","dns":{"nameservers":["10.96.0.10"]},
            "capabilities":{"portMappings":true,"ips":true},
            "runtimeConfig":{"ips":["10.244.1.150/24"],"mac":"0a:58:00:00:00:01",
              "portMappings":[{"HostPort":8080,"containerPort":80,"protocol":"tcp"}]},
            "prevResult":null,
            "cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}],
            "cni.dev/attachments":[{"containerID":"b","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(c.bridge, "br9");
        assert_eq!(c.subnet_file, Some(PathBuf::from("/x/subnet.env")));
        assert_eq!(c.mtu, Some(1400));
        assert!(c.ip_masq && c.hairpin_mode && !c.default_route && !c.detached_delete);
        assert_eq!(c.runtime_config.ips, vec!["10.244.1.150/24".to_string()]);
        assert_eq!(c.prev_result, None);
        assert_eq!(c.valid_attachments.unwrap().len(), 2);
    }

    #[test]
    fn rejections_carry_their_codes() {
        let cases: &[(&str, u32, &str)] = &[
            ("{not json", code::DECODE, "not valid JSON"),
            (
                r#"{"cniVersion":"0.2.0","name":"n"}"#,
                code::INCOMPATIBLE_VERSION,
                "0.2.0",
            ),
            (
                r#"{"cniVersion":"7.0.0","name":"n"}"#,
                code::INCOMPATIBLE_VERSION,
                "7.0.0",
            ),
            (r#"{"name":"n"}"#, code::INVALID_CONFIG, "cniVersion"),
            (r#"{"cniVersion":"1.0.0"}"#, code::INVALID_CONFIG, "name"),
            (
                r#"{"cniVersion":"1.0.0","name":"../x"}"#,
                code::INVALID_CONFIG,
                "directory",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"bridge"}"#,
                code::INVALID_CONFIG,
                "type",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","mtu":70000}"#,
                code::INVALID_CONFIG,
                "mtu",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","bridge":"a/b"}"#,
                code::INVALID_CONFIG,
                "bridge",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","ipam":{"type":"host-local"}}"#,
                code::UNSUPPORTED_FIELD,
                "ipam",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","rangeStart":"10.0.0.9","rangeEnd":"10.0.0.1"}"#,
                code::INVALID_CONFIG,
                "rangeEnd",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","mtu":"big"}"#,
                code::INVALID_CONFIG,
                "mtu",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","detachedDelete":"no"}"#,
                code::INVALID_CONFIG,
                "detachedDelete",
            ),
        ];
        for (text, want, needle) in cases {
            let e = parse(text).unwrap_err();
            assert_eq!(e.code(), *want, "{text}: {e}");
            assert!(e.to_string().contains(needle), "{text}: {e}");
        }
    }
}
