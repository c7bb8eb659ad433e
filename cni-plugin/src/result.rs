//! The ADD result in one internal shape, read from a `prevResult` of any supported version and
//! written in the version the caller asked for.
//!
//! 0.3.x/0.4.0 results carry `"version": "4"|"6"` on each IP; 1.0.0 dropped it; 1.1.0 added
//! `mtu`, `socketPath` and `pciID` to interfaces and `mtu`, `advmss`, `priority`, `table` and
//! `scope` to routes. Fields tweed does not know (from a plugin before it in the chain) are kept
//! as they are, and only dropped when the requested version cannot carry them.

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::version::Version;

#[derive(Debug, thiserror::Error)]
pub enum ResultError {
    #[error("prevResult is not a CNI result: {0}")]
    Decode(#[source] serde_json::Error),
    #[error("prevResult: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IpConfig {
    pub address: IpNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteOut {
    pub dst: IpNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<RouteOut>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Value>,
}

/// Keys a version introduced, dropped when writing an older one.
const IFACE_KEYS_1_1: &[&str] = &["socketPath", "pciID"];
const ROUTE_KEYS_1_1: &[&str] = &["mtu", "advmss", "priority", "table", "scope"];

impl CniResult {
    /// Reads a result of any supported version (the `version` key of 0.3.x/0.4.0 IPs is
    /// implied by the address itself and dropped).
    pub fn from_value(v: &Value) -> Result<CniResult, ResultError> {
        let mut v = v.clone();
        if let Some(obj) = v.as_object_mut() {
            obj.remove("cniVersion");
            if let Some(Value::Array(ips)) = obj.get_mut("ips") {
                for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
                    ip.remove("version");
                }
            }
        } else {
            return Err(ResultError::Invalid("not a JSON object".into()));
        }
        let r: CniResult = serde_json::from_value(v).map_err(ResultError::Decode)?;
        for ip in &r.ips {
            if let Some(i) = ip.interface {
                if i >= r.interfaces.len() {
                    return Err(ResultError::Invalid(format!(
                        "IP {} names interface {i}, but there are only {}",
                        ip.address,
                        r.interfaces.len()
                    )));
                }
            }
        }
        Ok(r)
    }

    /// Appends `other` (interface indices shift past ours); DNS of `other` wins when ours is
    /// empty.
    pub fn append(&mut self, other: CniResult) {
        let offset = self.interfaces.len();
        self.interfaces.extend(other.interfaces);
        self.ips.extend(other.ips.into_iter().map(|mut ip| {
            ip.interface = ip.interface.map(|i| i + offset);
            ip
        }));
        self.routes.extend(other.routes);
        let empty = |d: &Option<Value>| {
            d.as_ref()
                .is_none_or(|v| v.as_object().is_none_or(Map::is_empty))
        };
        if empty(&self.dns) {
            self.dns = other.dns;
        }
    }

    /// The result as the spec of `cni_version` spells it.
    pub fn to_value(&self, cni_version: &str) -> Value {
        let v = Version::parse(cni_version).unwrap_or(Version::V1_1_0);
        let mut out = Map::new();
        out.insert("cniVersion".into(), Value::from(cni_version));
        let ifaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut i = i.clone();
                if v < Version::V1_1_0 {
                    i.mtu = None;
                    for k in IFACE_KEYS_1_1 {
                        i.extra.remove(*k);
                    }
                }
                serde_json::to_value(i).expect("serializes")
            })
            .collect();
        out.insert("interfaces".into(), Value::Array(ifaces));
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut val = serde_json::to_value(ip).expect("serializes");
                if v < Version::V1_0_0 {
                    let family = if ip.address.is_ipv4() { "4" } else { "6" };
                    val.as_object_mut()
                        .expect("object")
                        .insert("version".into(), Value::from(family));
                }
                val
            })
            .collect();
        out.insert("ips".into(), Value::Array(ips));
        if !self.routes.is_empty() {
            let routes: Vec<Value> = self
                .routes
                .iter()
                .map(|r| {
                    let mut r = r.clone();
                    if v < Version::V1_1_0 {
                        for k in ROUTE_KEYS_1_1 {
                            r.extra.remove(*k);
                        }
                    }
                    serde_json::to_value(r).expect("serializes")
                })
                .collect();
            out.insert("routes".into(), Value::Array(routes));
        }
        out.insert(
            "dns".into(),
            self.dns
                .clone()
                .unwrap_or_else(|| Value::Object(Map::new())),
        );
        Value::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "cni0".into(),
                    mac: Some("0a:58:0a:f4:01:01".into()),
                    mtu: None,
                    sandbox: None,
                    extra: Map::new(),
                },
                Interface {
                    name: "eth0".into(),
                    mac: Some("0a:58:0a:f4:01:02".into()),
                    mtu: Some(1450),
                    sandbox: Some("/run/netns/c1".into()),
                    extra: Map::new(),
                },
            ],
            ips: vec![IpConfig {
                address: "10.244.1.2/24".parse().unwrap(),
                gateway: Some("10.244.1.1".parse().unwrap()),
                interface: Some(1),
                extra: Map::new(),
            }],
            routes: vec![RouteOut {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("10.244.1.1".parse().unwrap()),
                extra: Map::new(),
            }],
            dns: Some(json!({"nameservers": ["10.96.0.10"]})),
        }
    }

    #[test]
    fn renders_each_version() {
        let r = sample();
        let v11 = r.to_value("1.1.0");
        assert_eq!(v11["cniVersion"], "1.1.0");
        assert_eq!(v11["interfaces"][1]["mtu"], 1450);
        assert_eq!(v11["ips"][0]["address"], "10.244.1.2/24");
        assert!(v11["ips"][0].get("version").is_none());
        let v10 = r.to_value("1.0.0");
        assert!(v10["interfaces"][1].get("mtu").is_none());
        assert!(v10["ips"][0].get("version").is_none());
        for old in ["0.3.0", "0.3.1", "0.4.0"] {
            let v = r.to_value(old);
            assert_eq!(v["cniVersion"], old);
            assert_eq!(v["ips"][0]["version"], "4");
            assert_eq!(v["ips"][0]["interface"], 1);
            assert_eq!(v["routes"][0]["dst"], "0.0.0.0/0");
            assert_eq!(v["dns"]["nameservers"][0], "10.96.0.10");
        }
    }

    #[test]
    fn reads_back_every_version_it_writes() {
        let r = sample();
        for ver in crate::version::SUPPORTED {
            let back = CniResult::from_value(&r.to_value(ver)).unwrap();
            assert_eq!(back.ips, r.ips, "{ver}");
            assert_eq!(back.routes, r.routes, "{ver}");
            assert_eq!(back.interfaces.len(), 2);
        }
    }

    #[test]
    fn keeps_unknown_fields_and_drops_newer_ones_for_old_versions() {
        let prev = json!({
            "cniVersion": "1.1.0",
            "interfaces": [{"name": "x", "socketPath": "/s", "vendor": "v"}],
            "ips": [{"address": "fd00::2/64", "interface": 0}],
            "routes": [{"dst": "fd00::/8", "priority": 5, "custom": 1}]
        });
        let r = CniResult::from_value(&prev).unwrap();
        let v11 = r.to_value("1.1.0");
        assert_eq!(v11["interfaces"][0]["socketPath"], "/s");
        assert_eq!(v11["routes"][0]["priority"], 5);
        let v04 = r.to_value("0.4.0");
        assert!(v04["interfaces"][0].get("socketPath").is_none());
        assert_eq!(v04["interfaces"][0]["vendor"], "v");
        assert!(v04["routes"][0].get("priority").is_none());
        assert_eq!(v04["routes"][0]["custom"], 1);
        assert_eq!(v04["ips"][0]["version"], "6");
    }

    #[test]
    fn append_shifts_interface_indices() {
        let mut a = CniResult::from_value(&json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "lo"}],
            "ips": [{"address": "127.0.0.1/8", "interface": 0}]
        }))
        .unwrap();
        a.append(sample());
        assert_eq!(a.interfaces.len(), 3);
        assert_eq!(a.ips[1].interface, Some(2));
        assert_eq!(a.dns, sample().dns);
    }

    #[test]
    fn rejects_broken_prev_results() {
        assert!(CniResult::from_value(&json!([1])).is_err());
        assert!(CniResult::from_value(&json!({"ips": [{"address": "nope"}]})).is_err());
        let e = CniResult::from_value(&json!({"ips": [{"address": "10.0.0.1/8", "interface": 3}]}))
            .unwrap_err();
        assert!(e.to_string().contains("interface 3"), "{e}");
    }
}
