//! Lease keys and values as flannel writes them under `<prefix>/subnets/`.

use ipnetwork::{Ipv4Network, Ipv6Network};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
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

/// `etcd_key` and `from_etcd_key` for a key type that displays and parses as the part after
/// `<prefix>/subnets/`: both key forms live in the same directory.
macro_rules! etcd_key_methods {
    () => {
        /// Full etcd key under `prefix` (e.g. `/coreos.com/network`).
        pub fn etcd_key(&self, prefix: &str) -> String {
            format!("{}/subnets/{}", prefix.trim_end_matches('/'), self)
        }

        /// Parses a full etcd key; `None` when the key is not under `<prefix>/subnets/`.
        pub fn from_etcd_key(prefix: &str, key: &str) -> Option<Result<Self, LeaseError>> {
            let dir = format!("{}/subnets/", prefix.trim_end_matches('/'));
            key.strip_prefix(&dir).map(str::parse)
        }
    };
}

impl SubnetKey {
    pub fn new(ipv4: Ipv4Network) -> Self {
        SubnetKey { ipv4, ipv6: None }
    }

    etcd_key_methods!();
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

/// The IPv6 half of a key, shared by the dual-stack and the IPv6-only form.
fn parse_v6_part(key: &str, part: &str) -> Result<Ipv6Network, LeaseError> {
    let n = parse_part(key, part, |a: Ipv6Addr, l| Ipv6Network::new(a, l), 128)?;
    // flannel's key pattern allows only hex digits and colons in the v6 part; a dotted
    // (IPv4-mapped) subnet is not a pod network either, and a dot is what would let flannel's
    // pattern find an IPv4 part inside an IPv6-only key.
    if part.contains('.') {
        return Err(LeaseError::Key {
            key: key.to_string(),
            reason: format!("{n} is an IPv4-mapped address, not an IPv6 subnet"),
        });
    }
    if n.ip() != n.network() {
        return Err(LeaseError::Key {
            key: key.to_string(),
            reason: format!("{n} has host bits set"),
        });
    }
    Ok(n)
}

/// One subnet, one etcd key: a spelling such as `-+24`, `-024` or `FD00::` would parse to the
/// same subnets as the canonical key, letting two keys claim one subnet and a renewal write beside
/// the lease it renews. flannel only ever writes the canonical form.
fn canonical<K: fmt::Display>(s: &str, key: K) -> Result<K, LeaseError> {
    let canonical = key.to_string();
    if canonical != s {
        return Err(LeaseError::Key {
            key: s.to_string(),
            reason: format!("not in canonical form (the same subnets are spelled {canonical:?})"),
        });
    }
    Ok(key)
}

impl FromStr for SubnetKey {
    type Err = LeaseError;
    fn from_str(s: &str) -> Result<Self, LeaseError> {
        let (v4, v6) = match s.split_once('&') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        if v6.is_none() && v4.contains(':') && s.parse::<Ipv6OnlyKey>().is_ok() {
            // Said apart from garbage so the skip in the log tells the operator why.
            return Err(LeaseError::Key {
                key: s.to_string(),
                reason: "an IPv6-only lease (no IPv4 subnet); this reader takes IPv4 and \
                         dual-stack keys only"
                    .into(),
            });
        }
        let ipv4: Ipv4Network = parse_part(s, v4, |a: Ipv4Addr, l| Ipv4Network::new(a, l), 32)?;
        if ipv4.ip() != ipv4.network() {
            return Err(LeaseError::Key {
                key: s.to_string(),
                reason: format!("{ipv4} has host bits set"),
            });
        }
        if v6.is_some() && ipv4.prefix() == 0 {
            // What flannel renders for an IPv6-only node (an empty IPv4 half). Read as a v4 key it
            // would claim 0.0.0.0/0, which overlaps every subnet and would block all allocation.
            return Err(LeaseError::Key {
                key: s.to_string(),
                reason: format!(
                    "{ipv4} is not a node subnet (flannel's spelling of an IPv6-only lease; \
                     tweed's is the IPv6 part alone)"
                ),
            });
        }
        let ipv6 = v6.map(|p| parse_v6_part(s, p)).transpose()?;
        canonical(s, SubnetKey { ipv4, ipv6 })
    }
}

/// The key of an IPv6-only lease (`EnableIPv4: false`, tweed only): the IPv6 part of a
/// dual-stack key on its own, `fd00:12:13::-56`. flannel's etcd mode has no such form (its key
/// always starts with an IPv4 part, which it leaves at `0.0.0.0-0` for IPv6-only); this one has
/// no dot, so flannel's key pattern does not match it and it skips the key, and tweed's
/// [`SubnetKey`] refuses it, so a node that reads IPv4 and dual-stack keys skips it and logs
/// why instead of taking `0.0.0.0/0` for a peer's subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv6OnlyKey {
    pub ipv6: Ipv6Network,
}

impl fmt::Display for Ipv6OnlyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ipv6.ip(), self.ipv6.prefix())
    }
}

impl FromStr for Ipv6OnlyKey {
    type Err = LeaseError;
    fn from_str(s: &str) -> Result<Self, LeaseError> {
        if s.contains('&') {
            return Err(LeaseError::Key {
                key: s.to_string(),
                reason: "an IPv6-only key has one part, no '&'".into(),
            });
        }
        let ipv6 = parse_v6_part(s, s)?;
        canonical(s, Ipv6OnlyKey { ipv6 })
    }
}

/// Any lease key tweed reads or writes: flannel's form (IPv4, optionally with IPv6) or tweed's
/// IPv6-only form. Which one a node writes follows from its families: IPv4 or dual stack write
/// [`SubnetKey`], IPv6-only writes [`Ipv6OnlyKey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LeaseKey {
    Flannel(SubnetKey),
    Ipv6Only(Ipv6OnlyKey),
}

impl LeaseKey {
    /// The key a node with these subnets writes: flannel's form whenever it has an IPv4 subnet
    /// (so flannel nodes read it), the IPv6-only form otherwise; `None` without any subnet.
    pub fn for_subnets(ipv4: Option<Ipv4Network>, ipv6: Option<Ipv6Network>) -> Option<Self> {
        match (ipv4, ipv6) {
            (Some(ipv4), ipv6) => Some(LeaseKey::Flannel(SubnetKey { ipv4, ipv6 })),
            (None, Some(ipv6)) => Some(LeaseKey::Ipv6Only(Ipv6OnlyKey { ipv6 })),
            (None, None) => None,
        }
    }

    pub fn ipv4(&self) -> Option<Ipv4Network> {
        match self {
            LeaseKey::Flannel(k) => Some(k.ipv4),
            LeaseKey::Ipv6Only(_) => None,
        }
    }

    pub fn ipv6(&self) -> Option<Ipv6Network> {
        match self {
            LeaseKey::Flannel(k) => k.ipv6,
            LeaseKey::Ipv6Only(k) => Some(k.ipv6),
        }
    }

    etcd_key_methods!();
}

impl fmt::Display for LeaseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeaseKey::Flannel(k) => k.fmt(f),
            LeaseKey::Ipv6Only(k) => k.fmt(f),
        }
    }
}

impl FromStr for LeaseKey {
    type Err = LeaseError;
    fn from_str(s: &str) -> Result<Self, LeaseError> {
        // The first part decides the form: an IPv4 address starts flannel's, an IPv6 one tweed's
        // IPv6-only key (which then must have no second part).
        let first = s.split('&').next().unwrap_or_default();
        if first.contains(':') {
            s.parse().map(LeaseKey::Ipv6Only)
        } else {
            s.parse().map(LeaseKey::Flannel)
        }
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

/// Why a peer's lease is refused. Anyone who can write to etcd can write a lease; these are the
/// values no real node writes and that would make this node send traffic somewhere it must not
/// (its own loopback, a multicast group, into the overlay itself) or claim more address space
/// than a node gets. The label is the `reason` of `tweed_leases_rejected_total`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseRejection {
    #[error("subnet {subnet} is outside network {network}")]
    OutsideNetwork {
        subnet: Ipv4Network,
        network: Ipv4Network,
    },
    #[error("subnet {subnet} is a /{len}, but the network's SubnetLen is /{want}")]
    WrongPrefixLen {
        subnet: Ipv4Network,
        len: u8,
        want: u8,
    },
    #[error("PublicIP {ip} is {what}: no node can be reached there")]
    BadPublicIp { ip: IpAddr, what: &'static str },
    #[error(
        "PublicIP {ip} is inside the overlay network {network}: tunnelling to it would loop \
         through the overlay"
    )]
    PublicIpInOverlay { ip: Ipv4Addr, network: Ipv4Network },
    #[error("BackendType {0:?} is not a backend name")]
    BadBackendType(String),
    #[error("IPv6 subnet {subnet} is not a /{want} node subnet of IPv6Network {network}")]
    NotIpv6NodeSubnet {
        subnet: Ipv6Network,
        network: Ipv6Network,
        want: u8,
    },
    #[error("{0}")]
    NotIpv6OnlyLease(&'static str),
    #[error(
        "PublicIPv6 {ip} is inside the IPv6 overlay network {network}: tunnelling to it would \
         loop through the overlay"
    )]
    PublicIpv6InOverlay { ip: Ipv6Addr, network: Ipv6Network },
    #[error("BackendData of a {backend} lease: {reason}")]
    BadBackendData {
        backend: &'static str,
        reason: String,
    },
}

impl LeaseRejection {
    /// The metric label: a fixed, small set.
    pub fn label(&self) -> &'static str {
        match self {
            LeaseRejection::OutsideNetwork { .. } => "outside_network",
            LeaseRejection::WrongPrefixLen { .. } => "wrong_prefix_len",
            LeaseRejection::BadPublicIp { .. } => "bad_public_ip",
            LeaseRejection::PublicIpInOverlay { .. } => "public_ip_in_overlay",
            LeaseRejection::BadBackendType(_) => "bad_backend_type",
            LeaseRejection::NotIpv6NodeSubnet { .. } => "outside_network",
            LeaseRejection::NotIpv6OnlyLease(_) => "not_ipv6_peer",
            LeaseRejection::PublicIpv6InOverlay { .. } => "public_ip_in_overlay",
            LeaseRejection::BadBackendData { .. } => "bad_backend_data",
        }
    }
}

/// Larger than any backend's data (vxlan's is ~50 bytes), small enough that a hostile value
/// cannot make every node hold megabytes per lease.
pub const MAX_BACKEND_DATA: usize = 4096;

/// Why `ip` cannot be a node's public address, if it cannot.
fn unusable(ip: IpAddr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
        Some("the broadcast address")
    } else {
        None
    }
}

/// [`unusable`] as the rejection a lease gets for it.
fn check_public_ip(ip: IpAddr) -> Result<(), LeaseRejection> {
    match unusable(ip) {
        Some(what) => Err(LeaseRejection::BadPublicIp { ip, what }),
        None => Ok(()),
    }
}

/// A MAC a VTEP can have: six hex octets, not multicast/broadcast, not all zero.
fn valid_vtep_mac(s: &str) -> Result<(), String> {
    let octets: Vec<&str> = s.split(':').collect();
    let parsed: Option<Vec<u8>> = (octets.len() == 6)
        .then(|| {
            octets
                .iter()
                .map(|o| {
                    (o.len() == 2)
                        .then(|| u8::from_str_radix(o, 16).ok())
                        .flatten()
                })
                .collect()
        })
        .flatten();
    let b = parsed.ok_or_else(|| format!("VtepMAC {s:?} is not a MAC address"))?;
    if b[0] & 1 == 1 {
        return Err(format!("VtepMAC {s} is a multicast address"));
    }
    if b.iter().all(|o| *o == 0) {
        return Err(format!("VtepMAC {s} is all zero"));
    }
    Ok(())
}

impl LeaseAttrs {
    /// Checks a peer's lease for `key` against the network (`network`, `SubnetLen`). Pure: the
    /// watch calls it for every value before anything is programmed from it.
    pub fn validate(
        &self,
        key: &SubnetKey,
        network: Ipv4Network,
        subnet_len: u8,
    ) -> Result<(), LeaseRejection> {
        let subnet = key.ipv4;
        if !network.contains(subnet.network()) || subnet.prefix() < network.prefix() {
            return Err(LeaseRejection::OutsideNetwork { subnet, network });
        }
        if subnet.prefix() != subnet_len {
            return Err(LeaseRejection::WrongPrefixLen {
                subnet,
                len: subnet.prefix(),
                want: subnet_len,
            });
        }
        check_public_ip(self.public_ip.into())?;
        if network.contains(self.public_ip) {
            return Err(LeaseRejection::PublicIpInOverlay {
                ip: self.public_ip,
                network,
            });
        }
        if let Some(v6) = self.public_ipv6 {
            check_public_ip(v6.into())?;
        }
        self.check_backend(false)
    }

    /// BackendType and the backend data. `v6_only`: the lease is read for its IPv6 half alone,
    /// so a vxlan lease needs `BackendV6Data` (the VTEP of the IPv6 device) and its `BackendData`
    /// only has to be within size.
    fn check_backend(&self, v6_only: bool) -> Result<(), LeaseRejection> {
        let ty = &self.backend_type;
        if ty.len() > 32
            || !ty
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(LeaseRejection::BadBackendType(
                ty.chars().take(40).collect(),
            ));
        }
        let backend: &'static str = match self.effective_backend_type() {
            "vxlan" => "vxlan",
            "host-gw" => "host-gw",
            "udp" => "udp",
            // An IPv6-only node runs wireguard from this value alone; a dual-stack one reads
            // it in the backend (`DualPeer::from_lease`), flannel's defaults applied there.
            "wireguard" if v6_only => "wireguard",
            // Another backend's lease: its data is that backend's business; the data plane
            // reports the node as unreachable by ours.
            _ => "foreign",
        };
        let bad = |reason: String| LeaseRejection::BadBackendData { backend, reason };
        for raw in [&self.backend_data, &self.backend_v6_data]
            .into_iter()
            .flatten()
        {
            if raw.get().len() > MAX_BACKEND_DATA {
                return Err(bad(format!(
                    "{} bytes, more than the {MAX_BACKEND_DATA} allowed",
                    raw.get().len()
                )));
            }
        }
        match backend {
            "vxlan" if v6_only => {
                let raw = self
                    .backend_v6_data
                    .as_ref()
                    .ok_or_else(|| bad("no BackendV6Data (the IPv6 VTEP)".into()))?;
                let d6: VxlanLeaseData = serde_json::from_str(raw.get())
                    .map_err(|e| bad(format!("BackendV6Data: {e}")))?;
                if d6.vni >= 1 << 24 {
                    return Err(bad(format!(
                        "BackendV6Data: VNI {} does not fit in 24 bits",
                        d6.vni
                    )));
                }
                valid_vtep_mac(&d6.vtep_mac).map_err(|e| bad(format!("BackendV6Data: {e}")))?;
            }
            "wireguard" => {
                let raw = self.backend_v6_data.as_ref().ok_or_else(|| {
                    bad("no BackendV6Data (the WireGuard public key and port)".into())
                })?;
                // serde would also read a struct from an array (`["key"]`): not a lease's form.
                if !raw.get().trim_start().starts_with('{') {
                    return Err(bad("BackendV6Data: not a JSON object".into()));
                }
                let d: WireguardLeaseData = serde_json::from_str(raw.get())
                    .map_err(|e| bad(format!("BackendV6Data: {e}")))?;
                crate::network::decode_wg_key(&d.public_key)
                    .map_err(|e| bad(format!("BackendV6Data.PublicKey: {e}")))?;
            }
            "vxlan" => {
                let d = self.vxlan_data().map_err(|e| bad(e.to_string()))?;
                if d.vni >= 1 << 24 {
                    return Err(bad(format!("VNI {} does not fit in 24 bits", d.vni)));
                }
                valid_vtep_mac(&d.vtep_mac).map_err(bad)?;
                if let Some(raw) = &self.backend_v6_data {
                    let d6: VxlanLeaseData = serde_json::from_str(raw.get())
                        .map_err(|e| bad(format!("BackendV6Data: {e}")))?;
                    valid_vtep_mac(&d6.vtep_mac).map_err(|e| bad(format!("BackendV6Data: {e}")))?;
                }
            }
            // host-gw and udp carry nothing; flannel writes no data or `null`, and an object
            // (future fields) is tolerated, but not a bare scalar or array.
            "host-gw" | "udp" => {
                for raw in [&self.backend_data, &self.backend_v6_data]
                    .into_iter()
                    .flatten()
                {
                    let t = raw.get().trim_start();
                    if !(t.starts_with('{') || t == "null") {
                        return Err(bad(format!("{t:.40} is not an object")));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// What this node makes of a peer lease's IPv6 half. The IPv4 half is checked by
/// [`LeaseAttrs::validate`]; a bad or missing v6 half never rejects the lease, it only means no
/// v6 route to that peer (a v4-only node in a dual-stack network still reaches everyone by v4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIpv6 {
    /// Route the peer's v6 subnet via its `PublicIPv6`.
    Usable {
        subnet: Ipv6Network,
        public_ipv6: Ipv6Addr,
    },
    /// Nothing to route; the reason is for the log (a fixed, small set).
    Skipped(&'static str),
}

impl LeaseAttrs {
    /// `ipv6` is this node's view of the network's IPv6 half (`None` when it runs v4-only).
    pub fn peer_ipv6(&self, key: &SubnetKey, ipv6: Option<&crate::Ipv6Config>) -> PeerIpv6 {
        let Some(cfg) = ipv6 else {
            return PeerIpv6::Skipped("this node runs IPv4 only");
        };
        let Some(subnet) = key.ipv6 else {
            return PeerIpv6::Skipped("the peer's lease has no IPv6 subnet");
        };
        let Some(public_ipv6) = self.public_ipv6 else {
            return PeerIpv6::Skipped("the peer's lease has an IPv6 subnet but no PublicIPv6");
        };
        if !cfg.network.contains(subnet.network()) || subnet.prefix() != cfg.subnet_len {
            return PeerIpv6::Skipped("the peer's IPv6 subnet is not a node subnet of IPv6Network");
        }
        if unusable(public_ipv6.into()).is_some() {
            return PeerIpv6::Skipped(
                "the peer's PublicIPv6 is unspecified, loopback or multicast",
            );
        }
        if cfg.network.contains(public_ipv6) {
            return PeerIpv6::Skipped("the peer's PublicIPv6 is inside the IPv6 overlay");
        }
        PeerIpv6::Usable {
            subnet,
            public_ipv6,
        }
    }
}

/// A peer as an IPv6-only node programs it: its IPv6 subnet and the address it is reached on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6OnlyPeer {
    pub subnet: Ipv6Network,
    pub public_ipv6: Ipv6Addr,
}

impl LeaseAttrs {
    /// Checks a lease as a node of an IPv6-only network (`EnableIPv4: false`) reads it; pure, so
    /// the watch calls it for every value before anything is programmed from it.
    ///
    /// An IPv6-only key must carry `PublicIP` 0.0.0.0 (what tweed writes: the field is
    /// flannel's and always present) and a usable `PublicIPv6`. A flannel-form key in the same
    /// network is a dual-stack node (one that runs the network's IPv6 half, say with an older
    /// config): only its IPv6 half is used, and it must look like a real node's: a usable IPv4
    /// `PublicIP` (0.0.0.0 there is a value dressed as IPv6-only under a dotted key) and an IPv6
    /// subnet. Either way the IPv6 subnet must be a node subnet of `IPv6Network`, the
    /// `PublicIPv6` global unicast outside the overlay, and the backend data the IPv6 half's
    /// (`BackendV6Data`).
    pub fn validate_ipv6_only(
        &self,
        key: &LeaseKey,
        cfg: &crate::Ipv6Config,
    ) -> Result<Ipv6OnlyPeer, LeaseRejection> {
        let subnet = match key {
            LeaseKey::Ipv6Only(k) => {
                if !self.public_ip.is_unspecified() {
                    return Err(LeaseRejection::NotIpv6OnlyLease(
                        "an IPv6-only key whose PublicIP is not 0.0.0.0: the value is not an \
                         IPv6-only node's",
                    ));
                }
                k.ipv6
            }
            LeaseKey::Flannel(k) => {
                check_public_ip(self.public_ip.into())?;
                k.ipv6.ok_or(LeaseRejection::NotIpv6OnlyLease(
                    "an IPv4-only lease: nothing an IPv6-only node can route",
                ))?
            }
        };
        if !cfg.network.contains(subnet.network())
            || subnet.prefix() != cfg.subnet_len
            || subnet.network() != subnet.ip()
        {
            return Err(LeaseRejection::NotIpv6NodeSubnet {
                subnet,
                network: cfg.network,
                want: cfg.subnet_len,
            });
        }
        let public_ipv6 = self.public_ipv6.ok_or(LeaseRejection::NotIpv6OnlyLease(
            "the lease has no PublicIPv6: the node cannot be reached over IPv6",
        ))?;
        check_public_ip(public_ipv6.into())?;
        let ip = IpAddr::V6(public_ipv6);
        if public_ipv6.is_unicast_link_local() {
            return Err(LeaseRejection::BadPublicIp {
                ip,
                what: "a link-local address",
            });
        }
        if public_ipv6.to_ipv4_mapped().is_some() {
            return Err(LeaseRejection::BadPublicIp {
                ip,
                what: "an IPv4-mapped address",
            });
        }
        if cfg.network.contains(public_ipv6) {
            return Err(LeaseRejection::PublicIpv6InOverlay {
                ip: public_ipv6,
                network: cfg.network,
            });
        }
        self.check_backend(true)?;
        Ok(Ipv6OnlyPeer {
            subnet,
            public_ipv6,
        })
    }
}

/// A wireguard lease's `BackendV6Data` in an IPv6-only network. `Port` missing, null or 0 means
/// the reader's own port, as in dual stack and as older flannel leases are written (their
/// reader then tries `[PublicIPv6]:` its own port).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireguardLeaseData {
    /// Kept as text: decoded by [`crate::decode_wg_key`].
    #[serde(rename = "PublicKey")]
    pub public_key: String,
    #[serde(rename = "Port", default)]
    pub port: Option<u16>,
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
            // v6 in the v4 slot, v4 in the v6 slot, mixed families.
            "fd00::-64",
            "fd00::-64&10.244.3.0-24",
            "10.244.3.0-24&10.244.4.0-24",
            "10.244.3.0-24&::ffff:10.0.0.0-120",
            // Empty, doubled or trailing parts.
            "10.244.3.0-24&",
            "&fd00::-64",
            "10.244.3.0-24&fd00::-64&fd01::-64",
            "10.244.3.0-24&&fd00::-64",
            "10.244.3.0-24&fd00::-",
            "10.244.3.0-24&fd00::",
            // Overlong prefixes and huge numbers.
            "10.244.3.0-24&fd00::-129",
            "10.244.3.0-24&fd00::-256",
            "10.244.3.0-24&fd00::-18446744073709551616",
            "10.244.3.0-4294967320",
            // Host bits in the v6 part.
            "10.244.3.0-24&fd00::1-64",
            "10.244.3.0-24&fd00:0:0:3:8000::-64",
            // Non-canonical spellings of valid keys.
            "10.244.3.0-+24",
            "10.244.3.0-024",
            "10.244.3.0-24&FD00:0:0:3::-64",
            "10.244.3.0-24&fd00:0:0:3:0:0:0:0-64",
            "10.244.3.0-24&fd00:0000:0:3::-64",
            "10.244.3.0-24&fd00:0:0:3::-064",
            " 10.244.3.0-24",
            "10.244.3.0-24\n",
            "10.244.3.0-24&fd00:0:0:3::-64 ",
        ] {
            assert!(k.parse::<SubnetKey>().is_err(), "{k} should be rejected");
        }
    }

    /// A dual-stack lease exactly as flannel writes it, read by a v4-only tweed node and by a
    /// dual-stack one.
    #[test]
    fn flannel_dual_stack_lease_v4_only_node_skips_the_v6_half() {
        let key: SubnetKey = "10.244.3.0-24&fd00:10:244:3::-64".parse().unwrap();
        let attrs = LeaseAttrs::parse(
            br#"{"PublicIP":"198.18.0.6","PublicIPv6":"2001:db8::6","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:01"},"BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:02"}}"#,
        )
        .unwrap();
        let net = net("10.244.0.0/16");
        assert_eq!(attrs.validate(&key, net, 24), Ok(()));
        assert_eq!(
            attrs.peer_ipv6(&key, None),
            PeerIpv6::Skipped("this node runs IPv4 only")
        );
        let cfg = crate::NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}"#,
        )
        .unwrap()
        .ipv6
        .unwrap();
        assert_eq!(
            attrs.peer_ipv6(&key, Some(&cfg)),
            PeerIpv6::Usable {
                subnet: "fd00:10:244:3::/64".parse().unwrap(),
                public_ipv6: "2001:db8::6".parse().unwrap()
            }
        );
        // Bad v6 halves are skipped, never fatal, and the v4 half stays valid.
        let v4_only_key: SubnetKey = "10.244.3.0-24".parse().unwrap();
        for (k, v) in [
            (
                &v4_only_key,
                r#"{"PublicIP":"198.18.0.6","PublicIPv6":"2001:db8::6"}"#,
            ),
            (&key, r#"{"PublicIP":"198.18.0.6"}"#),
            (&key, r#"{"PublicIP":"198.18.0.6","PublicIPv6":"::1"}"#),
            (&key, r#"{"PublicIP":"198.18.0.6","PublicIPv6":"ff02::1"}"#),
            (
                &key,
                r#"{"PublicIP":"198.18.0.6","PublicIPv6":"fd00:10:244:9::1"}"#,
            ),
            (
                &"10.244.3.0-24&fd00:99::-64".parse().unwrap(),
                r#"{"PublicIP":"198.18.0.6","PublicIPv6":"2001:db8::6"}"#,
            ),
            (
                &"10.244.3.0-24&fd00:10:244:3::-80".parse().unwrap(),
                r#"{"PublicIP":"198.18.0.6","PublicIPv6":"2001:db8::6"}"#,
            ),
            (
                &"10.244.3.0-24&fd00:10:244::-48".parse().unwrap(),
                r#"{"PublicIP":"198.18.0.6","PublicIPv6":"2001:db8::6"}"#,
            ),
        ] {
            let a = LeaseAttrs::parse(v.as_bytes()).unwrap();
            assert!(
                matches!(a.peer_ipv6(k, Some(&cfg)), PeerIpv6::Skipped(_)),
                "{k} {v}"
            );
            // validate() already refuses a loopback/multicast PublicIPv6 outright (a value no
            // real node writes); every other bad v6 half leaves the v4 half usable.
            if !v.contains("::1\"") && !v.contains("ff02") {
                assert_eq!(a.validate(k, net, 24), Ok(()), "{k} {v}");
            }
        }
        // A PublicIPv6 that is not an address at all makes the value unreadable, as any corrupt
        // value is: the watch skips and logs it.
        assert!(
            LeaseAttrs::parse(br#"{"PublicIP":"198.18.0.6","PublicIPv6":"10.0.0.1"}"#).is_err()
        );
    }

    #[test]
    fn flannel_dual_stack_keys_both_directions() {
        // The issue's example and keys as flannel's Go renders them (RFC 5952 form).
        for k in [
            "10.12.13.0-24&fd00:12:13::-56",
            "10.244.0.0-24&2001:cafe:42::-64",
            "10.244.255.0-24&fd00:10:244:ff::-64",
            "10.0.0.0-8&::-0",
            "10.244.3.0-24&fd00::1230-124",
        ] {
            let parsed: SubnetKey = k.parse().unwrap();
            assert!(parsed.ipv6.is_some(), "{k}");
            assert_eq!(parsed.to_string(), k);
        }
        let k = SubnetKey {
            ipv4: "10.12.13.0/24".parse().unwrap(),
            ipv6: Some("fd00:12:13::/56".parse().unwrap()),
        };
        assert_eq!(
            k.etcd_key("/coreos.com/network"),
            "/coreos.com/network/subnets/10.12.13.0-24&fd00:12:13::-56"
        );
        assert_eq!(
            SubnetKey::from_etcd_key(
                "/coreos.com/network",
                "/coreos.com/network/subnets/10.12.13.0-24&fd00:12:13::-56"
            ),
            Some(Ok(k))
        );
    }

    /// A seeded xorshift64 generator: the sweeps below are deterministic without a fuzz crate.
    fn xorshift(mut x: u64) -> impl FnMut() -> u64 {
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    /// Property: every key tweed renders parses back to itself, over a deterministic sweep of
    /// subnets of both families (no fuzz crate in the workspace; a seeded generator instead).
    #[test]
    fn rendered_keys_round_trip_over_a_sweep() {
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..5000 {
            let l4 = (next() % 33) as u8;
            let l6 = (next() % 129) as u8;
            let v4 = Ipv4Network::new(Ipv4Addr::from(next() as u32), l4).unwrap();
            let v4 = Ipv4Network::new(v4.network(), l4).unwrap();
            let a6 = (u128::from(next()) << 64) | u128::from(next());
            let v6 = Ipv6Network::new(Ipv6Addr::from(a6), l6).unwrap();
            let v6 = Ipv6Network::new(v6.network(), l6).unwrap();
            for key in [
                SubnetKey::new(v4),
                SubnetKey {
                    ipv4: v4,
                    ipv6: Some(v6),
                },
            ] {
                let text = key.to_string();
                if key.ipv6.is_some() && v4.prefix() == 0 {
                    // flannel's IPv6-only spelling: refused (see `flannels_ipv6_only_spelling`).
                    assert!(text.parse::<SubnetKey>().is_err(), "{text}");
                    continue;
                }
                assert_eq!(text.parse::<SubnetKey>(), Ok(key), "{text}");
                // Any single-byte corruption either fails or parses to a key that renders as
                // the corrupted text: never a silent alias of another spelling.
                let mut bytes = text.clone().into_bytes();
                let i = (next() as usize) % bytes.len();
                bytes[i] = (next() % 128) as u8;
                if let Ok(t) = String::from_utf8(bytes) {
                    if let Ok(k) = t.parse::<SubnetKey>() {
                        assert_eq!(k.to_string(), t);
                    }
                }
            }
        }
    }

    /// Values as flannel writes them, one per backend shape; each is also a valid lease.
    const FLANNEL_VALUES: [&str; 4] = [
        r#"{"PublicIP":"198.18.0.3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}"#,
        r#"{"PublicIP":"198.18.0.4","BackendType":"host-gw"}"#,
        r#"{"PublicIP":"198.18.0.5"}"#,
        r#"{"PublicIP":"198.18.0.6","PublicIPv6":"fc00::6","BackendType":"vxlan","BackendData":{"VtepMAC":"aa:bb:cc:dd:ee:01","VNI":1},"BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:02"}}"#,
    ];

    #[test]
    fn ipv6_only_keys_round_trip_and_are_told_apart_from_flannels() {
        let k: LeaseKey = "fd00:12:13::-56".parse().unwrap();
        assert_eq!(
            k,
            LeaseKey::Ipv6Only(Ipv6OnlyKey {
                ipv6: "fd00:12:13::/56".parse().unwrap()
            })
        );
        assert_eq!(
            (k.ipv4(), k.ipv6()),
            (None, Some("fd00:12:13::/56".parse().unwrap()))
        );
        assert_eq!(
            k.etcd_key("/coreos.com/network/"),
            "/coreos.com/network/subnets/fd00:12:13::-56"
        );
        assert_eq!(
            LeaseKey::from_etcd_key("/coreos.com/network", &k.etcd_key("/coreos.com/network")),
            Some(Ok(k))
        );
        assert_eq!(
            LeaseKey::from_etcd_key("/coreos.com/network", "/coreos.com/network/config"),
            None
        );
        // flannel's forms read through LeaseKey exactly as through SubnetKey.
        for text in ["10.12.13.0-24", "10.12.13.0-24&fd00:12:13::-56"] {
            let k: LeaseKey = text.parse().unwrap();
            assert_eq!(k, LeaseKey::Flannel(text.parse().unwrap()));
            assert_eq!(k.to_string(), text);
            assert_eq!(k.ipv4(), Some("10.12.13.0/24".parse().unwrap()));
        }
        // Which form a node writes follows from the subnets it holds.
        let (v4, v6) = (
            Some("10.12.13.0/24".parse().unwrap()),
            Some("fd00:12:13::/56".parse().unwrap()),
        );
        for ((a, b), want) in [
            ((v4, None), Some("10.12.13.0-24")),
            ((v4, v6), Some("10.12.13.0-24&fd00:12:13::-56")),
            ((None, v6), Some("fd00:12:13::-56")),
            ((None, None), None),
        ] {
            let k = LeaseKey::for_subnets(a, b);
            assert_eq!(k.map(|k| k.to_string()).as_deref(), want);
            if let Some(k) = k {
                assert_eq!((k.ipv4(), k.ipv6()), (a, b));
                assert_eq!(k.to_string().parse::<LeaseKey>(), Ok(k));
            }
        }
        for text in [
            "fd00::-64",
            "2001:cafe:42::-64",
            "fd00::1230-124",
            "::-0",
            "fd00::1-128",
        ] {
            let k: Ipv6OnlyKey = text.parse().unwrap();
            assert_eq!(k.to_string(), text);
        }
    }

    /// Issue 19 item 5: what an IPv4 or dual-stack reader (tweed's `SubnetKey`, which the watch
    /// uses, and flannel's key pattern) makes of an IPv6-only key: a refusal, never a subnet.
    #[test]
    fn ipv6_only_keys_are_skipped_by_the_flannel_format_reader() {
        let err = "fd00:12:13::-56".parse::<SubnetKey>().unwrap_err();
        assert!(err.to_string().contains("IPv6-only lease"), "{err}");
        // flannel's pattern needs `digits.digits` before the first '-', so a key without a dot
        // never matches it; every rendered IPv6-only key is dot-free, and a dotted one is refused.
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        for _ in 0..5000 {
            let len = (next() % 129) as u8;
            let a = (u128::from(next()) << 64) | u128::from(next());
            let n = Ipv6Network::new(Ipv6Addr::from(a), len).unwrap();
            let k = Ipv6OnlyKey {
                ipv6: Ipv6Network::new(n.network(), len).unwrap(),
            };
            let text = k.to_string();
            if text.contains('.') {
                // Rust renders an IPv4-mapped address dotted: such a "subnet" is refused on read
                // (and IPv6Network refuses the mapped range, so tweed never allocates one).
                assert!(text.parse::<Ipv6OnlyKey>().is_err(), "{text}");
                continue;
            }
            assert_eq!(text.parse::<Ipv6OnlyKey>(), Ok(k), "{text}");
            assert_eq!(
                text.parse::<LeaseKey>(),
                Ok(LeaseKey::Ipv6Only(k)),
                "{text}"
            );
            assert!(text.parse::<SubnetKey>().is_err(), "{text}");
        }
    }

    #[test]
    fn flannels_ipv6_only_spelling_is_refused_not_read_as_0_0_0_0_slash_0() {
        for text in ["0.0.0.0-0&fd00:12:13::-56", "0.0.0.0-0&::-0"] {
            let err = text.parse::<SubnetKey>().unwrap_err().to_string();
            assert!(err.contains("IPv6-only"), "{err}");
            assert!(text.parse::<LeaseKey>().is_err(), "{text}");
        }
        // A v4-only 0.0.0.0-0 is no IPv6-only spelling; it stays what it was (refused later by
        // validation as outside the network).
        assert!("0.0.0.0-0".parse::<SubnetKey>().is_ok());
    }

    #[test]
    fn hostile_ipv6_only_keys_are_refused() {
        let huge = format!("fd00::-{}", "9".repeat(1 << 20));
        let long_addr = format!("{}::-64", "f".repeat(1 << 20));
        for k in [
            "",
            "-",
            "-64",
            "fd00::",
            "fd00::-",
            "fd00::-64&",
            "fd00::-64&fd01::-64",
            "fd00::-64&10.244.3.0-24",
            "fd00::-64&&",
            "fd00::-64&garbage",
            "fd00::-64-64",
            // Prefix out of range, signed, padded, huge.
            "fd00::-129",
            "fd00::-256",
            "fd00::-+64",
            "fd00::--64",
            "fd00::-064",
            "fd00::- 64",
            "fd00::-18446744073709551616",
            huge.as_str(),
            long_addr.as_str(),
            // Host bits.
            "fd00::1-64",
            "fd00::1-127",
            "fd00:0:0:3:8000::-64",
            // Non-canonical spellings of valid keys.
            "FD00::-64",
            "fd00:0:0:0:0:0:0:0-64",
            "fd00:0000::-64",
            "fd00::-64 ",
            " fd00::-64",
            "fd00::-64\n",
            "[fd00::]-64",
            "fd00::%eth0-64",
            // IPv4-mapped and IPv4 in the v6 slot.
            "::ffff:10.0.0.0-120",
            "::ffff:a00:0-120",
            "10.244.3.0-24",
            // Unicode digits (fullwidth, Arabic-Indic) and lookalike characters.
            "fd00::-\u{ff16}\u{ff14}",
            "fd00::-\u{666}\u{664}",
            "fd00\u{ff1a}\u{ff1a}-64",
            "fd00::-6\u{200b}4",
        ] {
            assert!(
                k.parse::<Ipv6OnlyKey>().is_err(),
                "{k:?} should be rejected"
            );
            // Whatever LeaseKey makes of it, it never silently aliases another spelling.
            if let Ok(lk) = k.parse::<LeaseKey>() {
                assert_eq!(lk.to_string(), k);
            }
        }
        // "::ffff:a00:0-120" is canonical only in Rust's dotted rendering, so it is refused as
        // non-canonical; the dotted form is refused as IPv4-mapped. Either way: no key.
        assert!("::ffff:10.0.0.0-120".parse::<LeaseKey>().is_err());
    }

    /// An IPv6-only lease value: flannel's field set, with the IPv4 `PublicIP` it always writes
    /// left at 0.0.0.0, round-trips byte for byte.
    #[test]
    fn ipv6_only_and_dual_stack_values_round_trip() {
        for v in [
            r#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::6","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:02"}}"#,
            r#"{"PublicIP":"198.18.0.6","PublicIPv6":"2001:db8::6","BackendType":"host-gw"}"#,
        ] {
            let a = LeaseAttrs::parse(v.as_bytes()).unwrap();
            assert_eq!(a.to_json(), v);
            assert_eq!(LeaseAttrs::parse(a.to_json().as_bytes()).unwrap(), a);
        }
    }

    /// Values crafted to make two readers disagree about the IPv6 half.
    #[test]
    fn spoofed_ipv6_value_fields() {
        // A duplicated field: Go's decoder keeps the last, a lenient reader might keep the
        // first; refusing the value leaves no room for the two to route differently.
        for v in [
            r#"{"PublicIP":"198.18.0.6","PublicIPv6":"2001:db8::6","PublicIPv6":"2001:db8::7"}"#,
            r#"{"PublicIP":"198.18.0.6","BackendV6Data":{"VNI":1},"BackendV6Data":{"VNI":2}}"#,
            // Wrong types and families in the v6 fields.
            r#"{"PublicIP":"198.18.0.6","PublicIPv6":"198.18.0.7"}"#,
            r#"{"PublicIP":"198.18.0.6","PublicIPv6":"::ffff:198.18.0.7x"}"#,
            r#"{"PublicIP":"198.18.0.6","PublicIPv6":6}"#,
            r#"{"PublicIP":"198.18.0.6","PublicIPv6":["2001:db8::6"]}"#,
            r#"{"PublicIP":"198.18.0.6","PublicIPv6":"2001:db8::6%eth0"}"#,
            r#"{"PublicIP":"198.18.0.6","PublicIPv6":"[2001:db8::6]"}"#,
            r#"{"PublicIP":"198.18.0.6","PublicIPv6":"2001:db8::\uff16"}"#,
        ] {
            assert!(LeaseAttrs::parse(v.as_bytes()).is_err(), "{v}");
        }
        // A case variant is not the field (tweed matches names exactly): it is ignored, so it can
        // neither add nor replace a PublicIPv6.
        let a = LeaseAttrs::parse(
            br#"{"PublicIP":"198.18.0.6","publicipv6":"2001:db8::66","backendv6data":{"VNI":9}}"#,
        )
        .unwrap();
        assert_eq!((a.public_ipv6, a.backend_v6_data.is_none()), (None, true));
        // A BackendV6Data with a bad VtepMAC rejects the lease naming the field.
        let key: SubnetKey = "10.244.3.0-24&fd00:10:244:3::-64".parse().unwrap();
        let bad = LeaseAttrs::parse(
            br#"{"PublicIP":"198.18.0.6","PublicIPv6":"2001:db8::6","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:01"},"BackendV6Data":{"VNI":1,"VtepMAC":"ff:ff:ff:ff:ff:ff"}}"#,
        )
        .unwrap();
        let e = bad.validate(&key, net("10.244.0.0/16"), 24).unwrap_err();
        assert!(e.to_string().contains("BackendV6Data"), "{e}");
    }

    #[test]
    fn flannel_values_round_trip_byte_for_byte() {
        for v in FLANNEL_VALUES {
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

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn check(key: &str, value: &str) -> Result<(), LeaseRejection> {
        let k: SubnetKey = key.parse().unwrap();
        LeaseAttrs::parse(value.as_bytes())
            .unwrap()
            .validate(&k, net("10.244.0.0/16"), 24)
    }

    #[test]
    fn good_leases_of_every_backend_pass() {
        let more = [
            r#"{"PublicIP":"198.18.0.3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:f0"}}"#,
            r#"{"PublicIP":"198.18.0.5","BackendType":"udp","BackendData":null}"#,
            r#"{"PublicIP":"10.0.0.5","BackendType":"ipip","BackendData":[1,2]}"#,
            r#"{"PublicIP":"198.18.0.6","PublicIPv6":"fc00::6","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:02"},"BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:04"}}"#,
        ];
        for v in FLANNEL_VALUES.into_iter().chain(more) {
            assert_eq!(check("10.244.3.0-24", v), Ok(()), "{v}");
        }
    }

    #[test]
    fn hostile_leases_are_refused_with_a_reason_naming_the_field() {
        let cases: &[(&str, &str, &str, &str)] = &[
            (
                "10.245.0.0-24",
                r#"{"PublicIP":"198.18.0.3"}"#,
                "outside_network",
                "outside network",
            ),
            (
                "10.0.0.0-8",
                r#"{"PublicIP":"198.18.0.3"}"#,
                "outside_network",
                "outside network",
            ),
            (
                "10.244.0.0-16",
                r#"{"PublicIP":"198.18.0.3"}"#,
                "wrong_prefix_len",
                "SubnetLen is /24",
            ),
            (
                "10.244.4.0-23",
                r#"{"PublicIP":"198.18.0.3"}"#,
                "wrong_prefix_len",
                "/23",
            ),
            (
                "10.244.4.128-25",
                r#"{"PublicIP":"198.18.0.3"}"#,
                "wrong_prefix_len",
                "/25",
            ),
            (
                "10.244.3.0-24",
                r#"{"PublicIP":"127.0.0.1"}"#,
                "bad_public_ip",
                "loopback",
            ),
            (
                "10.244.3.0-24",
                r#"{"PublicIP":"127.8.9.10"}"#,
                "bad_public_ip",
                "loopback",
            ),
            (
                "10.244.3.0-24",
                r#"{"PublicIP":"0.0.0.0"}"#,
                "bad_public_ip",
                "unspecified",
            ),
            (
                "10.244.3.0-24",
                r#"{"PublicIP":"224.0.0.1"}"#,
                "bad_public_ip",
                "multicast",
            ),
            (
                "10.244.3.0-24",
                r#"{"PublicIP":"239.255.255.250"}"#,
                "bad_public_ip",
                "multicast",
            ),
            (
                "10.244.3.0-24",
                r#"{"PublicIP":"255.255.255.255"}"#,
                "bad_public_ip",
                "broadcast",
            ),
            (
                "10.244.3.0-24",
                r#"{"PublicIP":"198.18.0.3","PublicIPv6":"::1"}"#,
                "bad_public_ip",
                "::1",
            ),
            (
                "10.244.3.0-24",
                r#"{"PublicIP":"10.244.1.1"}"#,
                "public_ip_in_overlay",
                "inside the overlay",
            ),
            (
                "10.244.3.0-24",
                r#"{"PublicIP":"10.244.3.1"}"#,
                "public_ip_in_overlay",
                "10.244.3.1",
            ),
            (
                "10.244.3.0-24",
                r#"{"PublicIP":"198.18.0.3","BackendType":"vx lan\n"}"#,
                "bad_backend_type",
                "BackendType",
            ),
            (
                "10.244.3.0-24",
                r#"{"PublicIP":"198.18.0.3","BackendType":"vxlan"}"#,
                "bad_backend_data",
                "no BackendData",
            ),
            (
                "10.244.3.0-24",
                r#"{"PublicIP":"198.18.0.3","BackendType":"vxlan","BackendData":{"VNI":1}}"#,
                "bad_backend_data",
                "VtepMAC",
            ),
            (
                "10.244.3.0-24",
                r#"{"PublicIP":"198.18.0.3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"zz:bb:cc:dd:ee:ff"}}"#,
                "bad_backend_data",
                "not a MAC",
            ),
            (
                "10.244.3.0-24",
                r#"{"PublicIP":"198.18.0.3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee"}}"#,
                "bad_backend_data",
                "not a MAC",
            ),
            (
                "10.244.3.0-24",
                r#"{"PublicIP":"198.18.0.3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"ff:ff:ff:ff:ff:ff"}}"#,
                "bad_backend_data",
                "multicast",
            ),
            (
                "10.244.3.0-24",
                r#"{"PublicIP":"198.18.0.3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"00:00:00:00:00:00"}}"#,
                "bad_backend_data",
                "all zero",
            ),
            (
                "10.244.3.0-24",
                r#"{"PublicIP":"198.18.0.3","BackendType":"vxlan","BackendData":{"VNI":16777216,"VtepMAC":"aa:bb:cc:dd:ee:f0"}}"#,
                "bad_backend_data",
                "24 bits",
            ),
            (
                "10.244.3.0-24",
                r#"{"PublicIP":"198.18.0.3","BackendType":"vxlan","BackendData":"aa"}"#,
                "bad_backend_data",
                "vxlan BackendData",
            ),
            (
                "10.244.3.0-24",
                r#"{"PublicIP":"198.18.0.3","BackendType":"host-gw","BackendData":42}"#,
                "bad_backend_data",
                "not an object",
            ),
            (
                "10.244.3.0-24",
                r#"{"PublicIP":"198.18.0.3","BackendData":[1]}"#,
                "bad_backend_data",
                "udp",
            ),
        ];
        for (key, value, label, needle) in cases {
            let e = check(key, value).expect_err(&format!("{key} {value} must be refused"));
            assert_eq!(e.label(), *label, "{key} {value}: {e}");
            assert!(
                e.to_string().contains(needle),
                "{key} {value}: {e:?} lacks {needle:?}"
            );
        }
        let huge = format!(
            r#"{{"PublicIP":"198.18.0.3","BackendType":"host-gw","BackendData":{{"x":"{}"}}}}"#,
            "a".repeat(MAX_BACKEND_DATA)
        );
        let e = check("10.244.3.0-24", &huge).unwrap_err();
        assert_eq!(e.label(), "bad_backend_data");
        assert!(e.to_string().contains("bytes"), "{e}");
    }

    fn v6_only_cfg() -> crate::Ipv6Config {
        let crate::ParsedNetwork::Ipv6Only(n) = crate::NetworkConfig::parse_any(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap() else {
            panic!("an IPv6-only config")
        };
        n.ipv6
    }

    const V6_DATA: &str = r#""BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:02"}"#;

    fn v6_only(key: &str, value: &str) -> Result<Ipv6OnlyPeer, LeaseRejection> {
        let k: LeaseKey = key.parse().unwrap();
        LeaseAttrs::parse(value.as_bytes())
            .unwrap()
            .validate_ipv6_only(&k, &v6_only_cfg())
    }

    #[test]
    fn a_wireguard_ipv6_only_lease_needs_a_key_and_a_port_if_any_in_backend_v6_data() {
        const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let lease = |public_ip: &str, v6: &str| {
            format!(
                r#"{{"PublicIP":"{public_ip}","PublicIPv6":"2001:db8::6","BackendType":"wireguard"{v6}}}"#
            )
        };
        let good = format!(r#","BackendV6Data":{{"PublicKey":"{KEY}","Port":51820}}"#);
        assert_eq!(
            v6_only("fd00:10:244:3::-64", &lease("0.0.0.0", &good)),
            Ok(Ipv6OnlyPeer {
                subnet: "fd00:10:244:3::/64".parse().unwrap(),
                public_ipv6: "2001:db8::6".parse().unwrap(),
            })
        );
        let rejected = |v6: &str| match v6_only("fd00:10:244:3::-64", &lease("0.0.0.0", v6)) {
            Err(LeaseRejection::BadBackendData { backend, reason }) => {
                assert_eq!(backend, "wireguard", "{v6}");
                reason
            }
            other => panic!("{v6}: {other:?}"),
        };
        assert!(rejected("").contains("no BackendV6Data"));
        // No Port (older flannel), null or 0: the reader's own port, as in dual stack.
        for port in ["", r#","Port":null"#, r#","Port":0"#] {
            let v6 = format!(r#","BackendV6Data":{{"PublicKey":"{KEY}"{port}}}"#);
            assert!(
                v6_only("fd00:10:244:3::-64", &lease("0.0.0.0", &v6)).is_ok(),
                "{v6}"
            );
        }
        let text = format!(r#","BackendV6Data":{{"PublicKey":"{KEY}","Port":"51820"}}"#);
        assert!(rejected(&text).contains("BackendV6Data"));
        let big = format!(r#","BackendV6Data":{{"PublicKey":"{KEY}","Port":70000}}"#);
        assert!(rejected(&big).contains("BackendV6Data"));
        let short = r#","BackendV6Data":{"PublicKey":"AAEC","Port":51820}"#;
        assert!(rejected(short).contains("PublicKey: a key is 32 bytes"));
        let junk = r#","BackendV6Data":{"PublicKey":"not base64!","Port":51820}"#;
        assert!(rejected(junk).contains("PublicKey: not base64"));
        let array = r#","BackendV6Data":["x"]"#;
        assert!(rejected(array).starts_with("BackendV6Data:"));
        // A dual-stack value under the IPv6-only key is not an IPv6-only node's.
        assert!(matches!(
            v6_only("fd00:10:244:3::-64", &lease("198.18.0.6", &good)),
            Err(LeaseRejection::NotIpv6OnlyLease(_))
        ));
    }

    #[test]
    fn an_ipv6_only_node_takes_ipv6_only_leases_and_the_ipv6_half_of_dual_stack_ones() {
        let want = Ipv6OnlyPeer {
            subnet: "fd00:10:244:3::/64".parse().unwrap(),
            public_ipv6: "2001:db8::6".parse().unwrap(),
        };
        let own_form = format!(
            r#"{{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::6","BackendType":"vxlan",{V6_DATA}}}"#
        );
        assert_eq!(v6_only("fd00:10:244:3::-64", &own_form), Ok(want));
        let hostgw = r#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::6","BackendType":"host-gw"}"#;
        assert_eq!(v6_only("fd00:10:244:3::-64", hostgw), Ok(want));
        // A dual-stack node in the same network, exactly as flannel writes one: its IPv6 half.
        let dual = format!(
            r#"{{"PublicIP":"198.18.0.6","PublicIPv6":"2001:db8::6","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:01"}},{V6_DATA}}}"#
        );
        assert_eq!(v6_only("10.244.3.0-24&fd00:10:244:3::-64", &dual), Ok(want));
    }

    #[test]
    fn crafted_leases_are_refused_by_an_ipv6_only_node() {
        let key = "fd00:10:244:3::-64";
        let value = |public_ip: &str, public_ipv6: Option<&str>| {
            let v6 = public_ipv6
                .map(|a| format!(r#""PublicIPv6":"{a}","#))
                .unwrap_or_default();
            format!(r#"{{"PublicIP":"{public_ip}",{v6}"BackendType":"vxlan",{V6_DATA}}}"#)
        };
        let good = Some("2001:db8::6");
        let cases: Vec<(String, String, &str)> = vec![
            // PublicIP 0.0.0.0 under a dotted (flannel-form) key: an IPv6-only value dressed up.
            (
                "10.244.3.0-24&fd00:10:244:3::-64".into(),
                value("0.0.0.0", good),
                "bad_public_ip",
            ),
            // A real IPv4 PublicIP under an IPv6-only key.
            (key.into(), value("198.18.0.6", good), "not_ipv6_peer"),
            // An IPv4-only lease: nothing to route.
            ("10.244.3.0-24".into(), value("198.18.0.6", good), "not_ipv6_peer"),
            (key.into(), value("0.0.0.0", None), "not_ipv6_peer"),
            (key.into(), value("0.0.0.0", Some("::")), "bad_public_ip"),
            (key.into(), value("0.0.0.0", Some("::1")), "bad_public_ip"),
            (key.into(), value("0.0.0.0", Some("ff02::1")), "bad_public_ip"),
            (key.into(), value("0.0.0.0", Some("fe80::1")), "bad_public_ip"),
            (
                key.into(),
                value("0.0.0.0", Some("::ffff:198.18.0.6")),
                "bad_public_ip",
            ),
            (
                key.into(),
                value("0.0.0.0", Some("fd00:10:244:9::1")),
                "public_ip_in_overlay",
            ),
            // Subnets outside IPv6Network, of the wrong length, or covering the whole network.
            ("fd00:99::-64".into(), value("0.0.0.0", good), "outside_network"),
            ("fd00:10:244:3::-80".into(), value("0.0.0.0", good), "outside_network"),
            ("fd00:10:244::-56".into(), value("0.0.0.0", good), "outside_network"),
            ("::-0".into(), value("0.0.0.0", good), "outside_network"),
            // vxlan without the IPv6 VTEP, or with a bad one.
            (
                key.into(),
                r#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::6","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:01"}}"#.into(),
                "bad_backend_data",
            ),
            (
                key.into(),
                r#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::6","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"ff:ff:ff:ff:ff:ff"}}"#.into(),
                "bad_backend_data",
            ),
            (
                key.into(),
                r#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::6","BackendType":"host-gw","BackendV6Data":[1]}"#.into(),
                "bad_backend_data",
            ),
            (
                key.into(),
                r#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::6","BackendType":"VXLAN!"}"#.into(),
                "bad_backend_type",
            ),
        ];
        for (k, v, label) in cases {
            let got = v6_only(&k, &v);
            assert_eq!(
                got.as_ref().map_err(LeaseRejection::label),
                Err(label),
                "{k} {v}: {got:?}"
            );
        }
    }

    #[test]
    fn an_ipv4_reader_still_refuses_an_ipv6_only_value_under_a_dotted_key() {
        // The IPv4 validation is unchanged: PublicIP 0.0.0.0 is never a peer over IPv4.
        let k: SubnetKey = "10.244.3.0-24&fd00:10:244:3::-64".parse().unwrap();
        let a = LeaseAttrs::parse(
            br#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::6","BackendType":"host-gw"}"#,
        )
        .unwrap();
        assert!(matches!(
            a.validate(&k, net("10.244.0.0/16"), 24),
            Err(LeaseRejection::BadPublicIp { .. })
        ));
    }
}
