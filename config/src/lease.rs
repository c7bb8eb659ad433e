//! Lease keys and values as flannel writes them under `<prefix>/subnets/`.

use ipnetwork::{Ipv4Network, Ipv6Network};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeaseError {
    #[error("lease key {key:?}: {reason}")]
    Key { key: String, reason: String },
    #[error("lease value: {0}")]
    Value(String),
}

/// The last path element of a lease key: `10.244.3.0-24`, or `10.244.3.0-24&fc00:0:0:3::-64` for
/// dual stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubnetKey {
    pub ipv4: Ipv4Network,
    pub ipv6: Option<Ipv6Network>,
}

impl SubnetKey {
    pub fn new(ipv4: Ipv4Network) -> Self {
        SubnetKey { ipv4, ipv6: None }
    }

    /// Full etcd key under `prefix` (e.g. `/coreos.com/network`).
    pub fn etcd_key(&self, prefix: &str) -> String {
        format!("{}/subnets/{}", prefix.trim_end_matches('/'), self)
    }

    /// Parses a full etcd key; `None` when the key is not under `<prefix>/subnets/`.
    pub fn from_etcd_key(prefix: &str, key: &str) -> Option<Result<Self, LeaseError>> {
        let dir = format!("{}/subnets/", prefix.trim_end_matches('/'));
        key.strip_prefix(&dir).map(str::parse)
    }
}

impl fmt::Display for SubnetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ipv4.ip(), self.ipv4.prefix())?;
        if let Some(v6) = self.ipv6 {
            write!(f, "&{}-{}", v6.ip(), v6.prefix())?;
        }
        Ok(())
    }
}

fn parse_part<A: FromStr, N>(
    key: &str,
    part: &str,
    make: impl Fn(A, u8) -> Result<N, ipnetwork::IpNetworkError>,
    max: u8,
) -> Result<N, LeaseError> {
    let err = |reason: String| LeaseError::Key {
        key: key.to_string(),
        reason,
    };
    let (addr, len) = part
        .rsplit_once('-')
        .ok_or_else(|| err(format!("{part:?} is not ADDRESS-PREFIXLEN")))?;
    let addr: A = addr
        .parse()
        .map_err(|_| err(format!("{addr:?} is not an address")))?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= max)
        .ok_or_else(|| err(format!("{len:?} is not a prefix length")))?;
    make(addr, len).map_err(|e| err(e.to_string()))
}

impl FromStr for SubnetKey {
    type Err = LeaseError;
    fn from_str(s: &str) -> Result<Self, LeaseError> {
        let (v4, v6) = match s.split_once('&') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let ipv4: Ipv4Network = parse_part(s, v4, |a: Ipv4Addr, l| Ipv4Network::new(a, l), 32)?;
        if ipv4.ip() != ipv4.network() {
            return Err(LeaseError::Key {
                key: s.to_string(),
                reason: format!("{ipv4} has host bits set"),
            });
        }
        let ipv6 = v6
            .map(|p| parse_part(s, p, |a: Ipv6Addr, l| Ipv6Network::new(a, l), 128))
            .transpose()?;
        Ok(SubnetKey { ipv4, ipv6 })
    }
}

/// A lease value. Field names, order and omissions follow flannel's `LeaseAttrs` so a value written
/// by either side reads back byte-identical; backend data stays raw because each backend owns its
/// format and a foreign backend's data must be carried unchanged.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseAttrs {
    #[serde(rename = "PublicIP")]
    pub public_ip: Ipv4Addr,
    #[serde(
        rename = "PublicIPv6",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub public_ipv6: Option<Ipv6Addr>,
    #[serde(
        rename = "BackendType",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub backend_type: String,
    #[serde(
        rename = "BackendData",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_data: Option<Box<RawValue>>,
    #[serde(
        rename = "BackendV6Data",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_v6_data: Option<Box<RawValue>>,
}

impl PartialEq for LeaseAttrs {
    fn eq(&self, other: &Self) -> bool {
        let raw = |r: &Option<Box<RawValue>>| r.as_ref().map(|v| v.get().to_string());
        self.public_ip == other.public_ip
            && self.public_ipv6 == other.public_ipv6
            && self.backend_type == other.backend_type
            && raw(&self.backend_data) == raw(&other.backend_data)
            && raw(&self.backend_v6_data) == raw(&other.backend_v6_data)
    }
}
impl Eq for LeaseAttrs {}

impl LeaseAttrs {
    pub fn new(
        public_ip: Ipv4Addr,
        backend_type: &str,
        backend_data: Option<&serde_json::Value>,
    ) -> Self {
        LeaseAttrs {
            public_ip,
            public_ipv6: None,
            backend_type: backend_type.to_string(),
            backend_data: backend_data.map(|v| {
                RawValue::from_string(v.to_string()).expect("serde_json::Value always serialises")
            }),
            backend_v6_data: None,
        }
    }

    pub fn parse(value: &[u8]) -> Result<Self, LeaseError> {
        serde_json::from_slice(value).map_err(|e| LeaseError::Value(e.to_string()))
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("lease attrs always serialise")
    }

    /// Flannel's udp leases carry no BackendType; treat them as udp.
    pub fn effective_backend_type(&self) -> &str {
        if self.backend_type.is_empty() {
            "udp"
        } else {
            &self.backend_type
        }
    }

    /// Typed view of a vxlan lease's BackendData.
    pub fn vxlan_data(&self) -> Result<VxlanLeaseData, LeaseError> {
        let raw = self
            .backend_data
            .as_ref()
            .ok_or_else(|| LeaseError::Value("vxlan lease has no BackendData".into()))?;
        serde_json::from_str(raw.get())
            .map_err(|e| LeaseError::Value(format!("vxlan BackendData: {e}")))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VxlanLeaseData {
    #[serde(rename = "VNI", default)]
    pub vni: u32,
    /// Kept as text: validated by the backend, which owns the MAC type.
    #[serde(rename = "VtepMAC")]
    pub vtep_mac: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_round_trip() {
        let k: SubnetKey = "10.244.3.0-24".parse().unwrap();
        assert_eq!(k.ipv4.to_string(), "10.244.3.0/24");
        assert_eq!(k.to_string(), "10.244.3.0-24");
        assert_eq!(
            k.etcd_key("/coreos.com/network/"),
            "/coreos.com/network/subnets/10.244.3.0-24"
        );
        let d: SubnetKey = "10.244.3.0-24&fc00:0:0:3::-64".parse().unwrap();
        assert_eq!(d.ipv6.unwrap().to_string(), "fc00:0:0:3::/64");
        assert_eq!(d.to_string(), "10.244.3.0-24&fc00:0:0:3::-64");
        assert_eq!(
            SubnetKey::from_etcd_key(
                "/coreos.com/network",
                "/coreos.com/network/subnets/10.1.2.0-24"
            ),
            Some(Ok(SubnetKey::new("10.1.2.0/24".parse().unwrap())))
        );
        assert_eq!(
            SubnetKey::from_etcd_key("/coreos.com/network", "/coreos.com/network/config"),
            None
        );
    }

    #[test]
    fn bad_keys() {
        for k in [
            "",
            "10.244.3.0",
            "10.244.3.0-33",
            "10.244.3.5-24",
            "x-24",
            "10.244.3.0-24&zz-64",
        ] {
            assert!(k.parse::<SubnetKey>().is_err(), "{k} should be rejected");
        }
    }

    #[test]
    fn flannel_values_round_trip_byte_for_byte() {
        for v in [
            r#"{"PublicIP":"198.18.0.3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}"#,
            r#"{"PublicIP":"198.18.0.4","BackendType":"host-gw"}"#,
            r#"{"PublicIP":"198.18.0.5"}"#,
            r#"{"PublicIP":"198.18.0.6","PublicIPv6":"fc00::6","BackendType":"vxlan","BackendData":{"VtepMAC":"aa:bb:cc:dd:ee:01","VNI":1},"BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:02"}}"#,
        ] {
            let a = LeaseAttrs::parse(v.as_bytes()).unwrap();
            assert_eq!(a.to_json(), v);
        }
        let udp = LeaseAttrs::parse(br#"{"PublicIP":"198.18.0.5"}"#).unwrap();
        assert_eq!(udp.effective_backend_type(), "udp");
    }

    #[test]
    fn vxlan_data() {
        let a = LeaseAttrs::parse(
            br#"{"PublicIP":"198.18.0.3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}"#,
        )
        .unwrap();
        let d = a.vxlan_data().unwrap();
        assert_eq!(d.vni, 1);
        assert_eq!(d.vtep_mac, "aa:bb:cc:dd:ee:ff");
        let built = LeaseAttrs::new(
            "198.18.0.3".parse().unwrap(),
            "vxlan",
            Some(&serde_json::json!({"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"})),
        );
        assert_eq!(built, a);
    }

    #[test]
    fn corrupt_values_are_errors() {
        for v in [
            &b"{"[..],
            b"null",
            br#"{"PublicIP":"nope"}"#,
            br#"{"BackendType":"vxlan"}"#,
        ] {
            assert!(LeaseAttrs::parse(v).is_err());
        }
        let no_data =
            LeaseAttrs::parse(br#"{"PublicIP":"1.2.3.4","BackendType":"vxlan"}"#).unwrap();
        assert!(no_data.vxlan_data().is_err());
    }
}
