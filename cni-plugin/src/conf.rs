//! The network configuration on stdin: the plugin's keys, the runtime's additions
//! (`runtimeConfig`, `prevResult`, GC's attachment list), parsed and validated.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
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
    ranges: Option<Vec<Vec<RawRange>>>,
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

/// One range of host-local's `ranges` (the shape flannel's plugin hands its delegate).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRange {
    subnet: IpNetwork,
    #[serde(default, rename = "rangeStart")]
    range_start: Option<IpAddr>,
    #[serde(default, rename = "rangeEnd")]
    range_end: Option<IpAddr>,
    #[serde(default)]
    gateway: Option<IpAddr>,
}

/// A range set of `ranges`, of one family: the node subnet it names (checked against
/// subnet.env at ADD), and the optional narrowing and gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeSpec<N, A> {
    pub subnet: N,
    pub start: Option<A>,
    pub end: Option<A>,
    pub gateway: Option<A>,
}

pub type RangeV4 = RangeSpec<Ipv4Network, Ipv4Addr>;
pub type RangeV6 = RangeSpec<Ipv6Network, Ipv6Addr>;

/// `ranges`: at most one set per family, each of one range. `None` when the key is absent:
/// then the families are subnet.env's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ranges {
    pub v4: Option<RangeV4>,
    pub v6: Option<RangeV6>,
}

/// The longest IPv6 prefix a node subnet can have and still hold the gateway and a container
/// (see `ipam::Pool`); also what keeps a crafted `/128` out.
const MAX_V6_PREFIX: u8 = 126;

impl Ranges {
    fn parse(sets: Vec<Vec<RawRange>>) -> Result<Ranges, String> {
        if sets.is_empty() {
            return Err("empty: give one range set per family, or leave \"ranges\" out".into());
        }
        let mut out = Ranges::default();
        for (i, set) in sets.into_iter().enumerate() {
            let [r]: [RawRange; 1] = set.try_into().map_err(|set: Vec<RawRange>| {
                format!(
                    "set {i} has {} ranges; tweed takes exactly one per set (the node's subnet)",
                    set.len()
                )
            })?;
            let same_family = |name: &str, ip: Option<IpAddr>| match ip {
                Some(ip) if ip.is_ipv4() != r.subnet.is_ipv4() => Err(format!(
                    "set {i}: {name} {ip} is not of the family of subnet {}",
                    r.subnet
                )),
                Some(ip) if !r.subnet.contains(ip) => Err(format!(
                    "set {i}: {name} {ip} is outside subnet {}",
                    r.subnet
                )),
                _ => Ok(()),
            };
            same_family("rangeStart", r.range_start)?;
            same_family("rangeEnd", r.range_end)?;
            same_family("gateway", r.gateway)?;
            if r.subnet.ip() != r.subnet.network() {
                return Err(format!(
                    "set {i}: subnet {} has host bits set (write {}/{})",
                    r.subnet,
                    r.subnet.network(),
                    r.subnet.prefix()
                ));
            }
            if let (Some(a), Some(b)) = (r.range_start, r.range_end) {
                if a > b {
                    return Err(format!("set {i}: rangeEnd {b} comes before rangeStart {a}"));
                }
            }
            let v4 = |ip: Option<IpAddr>| match ip {
                Some(IpAddr::V4(a)) => Some(a),
                _ => None,
            };
            let v6 = |ip: Option<IpAddr>| match ip {
                Some(IpAddr::V6(a)) => Some(a),
                _ => None,
            };
            match r.subnet {
                IpNetwork::V4(subnet) => {
                    if out.v4.is_some() {
                        return Err(format!(
                            "set {i}: a second IPv4 range set; tweed gives one address per family"
                        ));
                    }
                    if subnet.prefix() > 30 {
                        return Err(format!(
                            "set {i}: subnet {subnet} is too small for a gateway and containers"
                        ));
                    }
                    out.v4 = Some(RangeSpec {
                        subnet,
                        start: v4(r.range_start),
                        end: v4(r.range_end),
                        gateway: v4(r.gateway),
                    });
                }
                IpNetwork::V6(subnet) => {
                    if out.v6.is_some() {
                        return Err(format!(
                            "set {i}: a second IPv6 range set; tweed gives one address per family"
                        ));
                    }
                    if subnet.prefix() > MAX_V6_PREFIX {
                        return Err(format!(
                            "set {i}: subnet {subnet} is too small for a gateway and containers"
                        ));
                    }
                    out.v6 = Some(RangeSpec {
                        subnet,
                        start: v6(r.range_start),
                        end: v6(r.range_end),
                        gateway: v6(r.gateway),
                    });
                }
            }
        }
        Ok(out)
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
    /// host-local's `ranges`, as flannel's plugin passes them: `[[{"subnet":v4}],[{"subnet":v6}]]`.
    pub ranges: Option<Ranges>,
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
            ranges: get(obj, "ranges")?,
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
        let ranges = match raw.ranges {
            None => None,
            Some(sets) => Some(Ranges::parse(sets).map_err(|r| invalid("ranges", &r))?),
        };
        if ranges.is_some() && (raw.range_start.is_some() || raw.range_end.is_some()) {
            return Err(invalid(
                "ranges",
                "give either \"ranges\" or the top-level rangeStart/rangeEnd, not both",
            ));
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
            ranges,
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

    fn ranges(sets: &str) -> Result<NetConf, ConfError> {
        parse(&format!(
            r#"{{"cniVersion":"1.0.0","name":"n","ranges":{sets}}}"#
        ))
    }

    #[test]
    fn flannels_dual_stack_ranges() {
        let c =
            ranges(r#"[[{"subnet":"10.244.3.0/24"}],[{"subnet":"fd00:10:244:3::/64"}]]"#).unwrap();
        let r = c.ranges.unwrap();
        assert_eq!(r.v4.unwrap().subnet, "10.244.3.0/24".parse().unwrap());
        assert_eq!(r.v6.unwrap().subnet, "fd00:10:244:3::/64".parse().unwrap());
        // Order does not decide the family: the subnet does.
        let swapped = ranges(r#"[[{"subnet":"fd00::/64"}],[{"subnet":"10.1.0.0/24"}]]"#).unwrap();
        assert!(swapped.ranges.unwrap().v6.is_some());
        let narrowed = ranges(
            r#"[[{"subnet":"10.1.0.0/24"}],[{"subnet":"fd00::/64","rangeStart":"fd00::10","rangeEnd":"fd00::20","gateway":"fd00::1"}]]"#,
        )
        .unwrap();
        let v6 = narrowed.ranges.unwrap().v6.unwrap();
        assert_eq!(v6.start, Some("fd00::10".parse().unwrap()));
        assert_eq!(v6.gateway, Some("fd00::1".parse().unwrap()));
        assert_eq!(
            parse(r#"{"cniVersion":"1.0.0","name":"n"}"#)
                .unwrap()
                .ranges,
            None
        );
    }

    /// Crafted `ranges`: every one an INVALID_CONFIG (or DECODE-free) error naming "ranges".
    #[test]
    fn hostile_ranges() {
        let v4 = r#"[{"subnet":"10.1.0.0/24"}]"#;
        for (sets, needle) in [
            ("[]".to_string(), "empty"),
            (r#"[[]]"#.to_string(), "has 0 ranges"),
            (
                r#"[[{"subnet":"10.1.0.0/24"},{"subnet":"10.2.0.0/24"}]]"#.to_string(),
                "has 2 ranges",
            ),
            // Two sets of one family: an IPv4 range in flannel's IPv6 slot.
            (
                format!(r#"[{v4},[{{"subnet":"10.9.0.0/24"}}]]"#),
                "second IPv4",
            ),
            (
                format!(r#"[{v4},[{{"subnet":"fd00::/64"}}],[{{"subnet":"fd01::/64"}}]]"#),
                "second IPv6",
            ),
            // Absurd prefixes.
            (format!(r#"[{v4},[{{"subnet":"fd00::/129"}}]]"#), "ranges"),
            (
                format!(r#"[{v4},[{{"subnet":"fd00::/128"}}]]"#),
                "too small",
            ),
            (
                format!(r#"[{v4},[{{"subnet":"fd00::/127"}}]]"#),
                "too small",
            ),
            (r#"[[{"subnet":"10.1.0.0/33"}]]"#.to_string(), "ranges"),
            (r#"[[{"subnet":"10.1.0.0/31"}]]"#.to_string(), "too small"),
            (r#"[[{"subnet":"10.1.0.0/-1"}]]"#.to_string(), "ranges"),
            (
                format!(r#"[{v4},[{{"subnet":"fd00::1/64"}}]]"#),
                "host bits",
            ),
            // Addresses of the other family or outside the subnet.
            (
                format!(r#"[{v4},[{{"subnet":"fd00::/64","rangeStart":"10.1.0.5"}}]]"#),
                "not of the family",
            ),
            (
                format!(r#"[{v4},[{{"subnet":"fd00::/64","gateway":"fd01::1"}}]]"#),
                "outside subnet",
            ),
            (
                r#"[[{"subnet":"10.1.0.0/24","rangeEnd":"fd00::1"}]]"#.to_string(),
                "not of the family",
            ),
            (
                format!(
                    r#"[{v4},[{{"subnet":"fd00::/64","rangeStart":"fd00::9","rangeEnd":"fd00::2"}}]]"#
                ),
                "comes before",
            ),
            // Wrong shapes and unknown keys (a typo must not silently widen the range).
            (r#"{"subnet":"10.1.0.0/24"}"#.to_string(), "ranges"),
            (
                r#"[[{"subnet":"10.1.0.0/24","rangestart":"10.1.0.9"}]]"#.to_string(),
                "rangestart",
            ),
            (r#"[[{"subnet":12}]]"#.to_string(), "ranges"),
            (r#"[[{}]]"#.to_string(), "subnet"),
        ] {
            let e = ranges(&sets).unwrap_err();
            assert_eq!(e.code(), code::INVALID_CONFIG, "{sets}: {e}");
            assert!(e.to_string().contains("\"ranges\""), "{sets}: {e}");
            assert!(e.to_string().contains(needle), "{sets}: {e}");
        }
        // An IPv6 set alone: an IPv6-only attachment.
        let only6 = ranges(r#"[[{"subnet":"fd00::/64"}]]"#).unwrap();
        let r = only6.ranges.unwrap();
        assert!(r.v4.is_none() && r.v6.is_some());
        let both = parse(&format!(
            r#"{{"cniVersion":"1.0.0","name":"n","rangeStart":"10.1.0.5","ranges":[{v4}]}}"#
        ))
        .unwrap_err();
        assert!(both.to_string().contains("not both"), "{both}");
    }
}
