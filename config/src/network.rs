//! The network config JSON stored at `<prefix>/config`, spelled as flannel spells it.

use ipnetwork::{Ipv4Network, Ipv6Network};
use serde_json::{Map, Value};
use std::net::{Ipv4Addr, Ipv6Addr};

pub const DEFAULT_SUBNET_LEN: u8 = 24;
pub const DEFAULT_IPV6_SUBNET_LEN: u8 = 64;
/// Longest IPv6 node subnet flannel accepts: a /126 still holds a gateway and a pod.
pub const MAX_IPV6_SUBNET_LEN: u8 = 126;
/// Longest IPv6Network prefix: four subnets of the longest length.
pub const MAX_IPV6_NETWORK_PREFIX: u8 = MAX_IPV6_SUBNET_LEN - 2;
pub const DEFAULT_VXLAN_PORT: u16 = 8472;
pub const DEFAULT_UDP_PORT: u16 = 8285;
pub const DEFAULT_VNI: u32 = 1;
pub const DEFAULT_WG_PORT: u16 = 51820;
pub const DEFAULT_WG_PORT_V6: u16 = 51821;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetworkConfigError {
    #[error("network config is not valid JSON: {0}")]
    Json(String),
    #[error("network config must be a JSON object")]
    NotObject,
    #[error("network config field {field}: {reason}")]
    Field { field: &'static str, reason: String },
}

fn bad(field: &'static str, reason: impl Into<String>) -> NetworkConfigError {
    NetworkConfigError::Field {
        field,
        reason: reason.into(),
    }
}

/// The validated network configuration. Derived defaults (SubnetMin/Max, backend ports) are filled
/// in, so consumers never re-derive them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    pub network: Ipv4Network,
    pub subnet_len: u8,
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    pub backend: BackendConfig,
    /// `EnableIPv4`; always `true` here: an IPv6-only config parses to
    /// [`ParsedNetwork::Ipv6Only`] instead.
    pub enable_ipv4: bool,
    /// Present when `EnableIPv6` is true.
    pub ipv6: Option<Ipv6Config>,
}

/// What a network config describes: an IPv4 network (possibly dual stack, with
/// [`NetworkConfig::ipv6`]) or an IPv6-only one. Separate types because an IPv6-only network has no
/// IPv4 `Network`, and everything that runs today needs one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParsedNetwork {
    Ipv4(NetworkConfig),
    Ipv6Only(Ipv6OnlyNetwork),
}

/// An IPv6-only network (`EnableIPv4: false`, `EnableIPv6: true`), validated with flannel's rules.
/// Its IPv4 keys (`Network`, `SubnetLen`, `SubnetMin`, `SubnetMax`) are ignored, as flannel ignores
/// them. The agent runs one with vxlan or host-gw (docs/ipv6.md, "IPv6-only networks").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv6OnlyNetwork {
    pub ipv6: Ipv6Config,
    pub backend: BackendConfig,
}

/// The IPv6 half of a dual-stack network (`EnableIPv6: true`), defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv6Config {
    pub network: Ipv6Network,
    pub subnet_len: u8,
    pub subnet_min: Ipv6Addr,
    pub subnet_max: Ipv6Addr,
}

impl Ipv6Config {
    fn parse(obj: &Map<String, Value>) -> Result<Self, NetworkConfigError> {
        let net_str = get_str(obj, "IPv6Network", "IPv6Network")?.ok_or_else(|| {
            bad(
                "IPv6Network",
                "missing while EnableIPv6 is true (e.g. \"fd00:10:244::/56\")",
            )
        })?;
        let network: Ipv6Network = net_str
            .parse()
            .map_err(|_| bad("IPv6Network", format!("{net_str:?} is not an IPv6 CIDR")))?;
        if network.network() != network.ip() {
            return Err(bad(
                "IPv6Network",
                format!(
                    "{net_str} has host bits set; did you mean {}/{}?",
                    network.network(),
                    network.prefix()
                ),
            ));
        }
        // Rust and Go both render IPv4-mapped addresses dotted, which neither side's key parser
        // takes as an IPv6 subnet: a network reaching into ::ffff:0:0/96 could hand out subnets
        // whose lease keys every reader refuses.
        let mapped: Ipv6Network = "::ffff:0:0/96".parse().expect("constant");
        if network.overlaps(mapped) {
            return Err(bad(
                "IPv6Network",
                format!("{network} overlaps the IPv4-mapped range {mapped}"),
            ));
        }
        let prefix = network.prefix();
        if prefix > MAX_IPV6_NETWORK_PREFIX {
            return Err(bad(
                "IPv6Network",
                format!("{network} is too small: it needs at least /{MAX_IPV6_NETWORK_PREFIX} to hold four node subnets"),
            ));
        }
        let subnet_len = match get_uint(obj, "IPv6SubnetLen", "IPv6SubnetLen", 128)? {
            Some(0) | None if prefix > 62 => prefix.saturating_add(2),
            Some(0) | None => DEFAULT_IPV6_SUBNET_LEN,
            Some(v) => v as u8,
        };
        if subnet_len > MAX_IPV6_SUBNET_LEN {
            return Err(bad(
                "IPv6SubnetLen",
                format!(
                    "{subnet_len} is too long: a node subnet needs at least /{MAX_IPV6_SUBNET_LEN}"
                ),
            ));
        }
        if subnet_len <= prefix || subnet_len - prefix < 2 {
            return Err(bad(
                "IPv6SubnetLen",
                format!(
                    "IPv6Network {network} holds fewer than 4 subnets of /{subnet_len}; use a larger IPv6Network or a longer IPv6SubnetLen"
                ),
            ));
        }
        let size = 1u128 << (128 - subnet_len as u32);
        let first = u128::from(network.network());
        // prefix < subnet_len <= 126, so the shift cannot overflow.
        let last_subnet = first + ((1u128 << (128 - prefix as u32)) - size);
        let check = |field: &'static str, addr: Ipv6Addr| -> Result<Ipv6Addr, NetworkConfigError> {
            if !network.contains(addr) {
                return Err(bad(
                    field,
                    format!("{addr} is outside IPv6Network {network}"),
                ));
            }
            if (u128::from(addr) - first) % size != 0 {
                return Err(bad(
                    field,
                    format!("{addr} is not aligned to IPv6SubnetLen /{subnet_len}"),
                ));
            }
            Ok(addr)
        };
        let get_v6 = |key: &'static str| -> Result<Option<Ipv6Addr>, NetworkConfigError> {
            get_str(obj, key, key)?
                .map(|s| {
                    s.parse::<Ipv6Addr>()
                        .map_err(|_| bad(key, format!("{s:?} is not an IPv6 address")))
                })
                .transpose()
        };
        let subnet_min = match get_v6("IPv6SubnetMin")? {
            Some(a) => check("IPv6SubnetMin", a)?,
            None => Ipv6Addr::from(first + size),
        };
        let subnet_max = match get_v6("IPv6SubnetMax")? {
            Some(a) => check("IPv6SubnetMax", a)?,
            None => Ipv6Addr::from(last_subnet),
        };
        if u128::from(subnet_min) > u128::from(subnet_max) {
            return Err(bad(
                "IPv6SubnetMin",
                format!("{subnet_min} is above IPv6SubnetMax {subnet_max}"),
            ));
        }
        Ok(Ipv6Config {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
        })
    }

    /// Size of one node subnet in addresses.
    pub fn subnet_size(&self) -> u128 {
        1u128 << (128 - self.subnet_len as u32)
    }

    /// Number of node subnets in [IPv6SubnetMin, IPv6SubnetMax].
    pub fn subnet_count(&self) -> u128 {
        (u128::from(self.subnet_max) - u128::from(self.subnet_min)) / self.subnet_size() + 1
    }

    /// The i-th subnet of the allocatable range.
    pub fn nth_subnet(&self, i: u128) -> Option<Ipv6Network> {
        if i >= self.subnet_count() {
            return None;
        }
        let base = u128::from(self.subnet_min) + i * self.subnet_size();
        Ipv6Network::new(Ipv6Addr::from(base), self.subnet_len).ok()
    }

    /// Whether `subnet` is a well-formed node subnet inside [IPv6SubnetMin, IPv6SubnetMax].
    pub fn is_allocatable(&self, subnet: Ipv6Network) -> bool {
        let a = u128::from(subnet.ip());
        subnet.prefix() == self.subnet_len
            && subnet.ip() == subnet.network()
            && a >= u128::from(self.subnet_min)
            && a <= u128::from(self.subnet_max)
    }
}

fn get_bool_or(
    obj: &Map<String, Value>,
    key: &'static str,
    default: bool,
) -> Result<bool, NetworkConfigError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        _ => get_bool(obj, key, key),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendConfig {
    Vxlan {
        vni: u32,
        port: u16,
        direct_routing: bool,
        /// 0 means "derive from the underlay".
        mtu: u32,
    },
    HostGw,
    Udp {
        port: u16,
        mtu: u32,
    },
    Wireguard(WireguardConfig),
}

/// flannel's `wireguard` backend keys, with its defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireguardConfig {
    pub listen_port: u16,
    /// The port of the IPv6 device in `separate` mode (flannel's `flannel-wg-v6`).
    pub listen_port_v6: u16,
    /// 0 means "the external interface's MTU"; the device gets this minus 80.
    pub mtu: u32,
    /// The pre-shared key, decoded from base64.
    pub psk: Option<[u8; 32]>,
    /// Seconds; 0 is off.
    pub persistent_keepalive: u16,
    pub mode: WireguardMode,
}

/// flannel's `Mode`: with IPv6 enabled, one device per address family (`separate`), or one
/// device carrying both families whose peers' endpoints are on the IPv4 underlay (`ipv4`), the
/// IPv6 underlay (`ipv6`) or whichever flannel's rule picks per peer (`auto`). With an IPv4-only
/// overlay every mode means one IPv4 device; `ipv6` then has no IPv6 underlay address to use and
/// is refused (naming `Backend.Mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireguardMode {
    Separate,
    Auto,
    Ipv4,
    Ipv6,
}

/// Decodes a WireGuard key (standard base64 of exactly 32 bytes), as `wg` and flannel spell them.
pub fn decode_wg_key(s: &str) -> Result<[u8; 32], String> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .map_err(|e| format!("not base64: {e}"))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("a key is 32 bytes, this one is {}", b.len()))
}

impl BackendConfig {
    /// The `BackendType` string written into leases.
    pub fn type_name(&self) -> &'static str {
        match self {
            BackendConfig::Vxlan { .. } => "vxlan",
            BackendConfig::HostGw => "host-gw",
            BackendConfig::Udp { .. } => "udp",
            BackendConfig::Wireguard(_) => "wireguard",
        }
    }
}

fn get_str<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    field: &'static str,
) -> Result<Option<&'a str>, NetworkConfigError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(bad(field, format!("expected a string, got {other}"))),
    }
}

fn get_uint(
    obj: &Map<String, Value>,
    key: &str,
    field: &'static str,
    max: u64,
) -> Result<Option<u64>, NetworkConfigError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if v <= max => Ok(Some(v)),
            _ => Err(bad(
                field,
                format!("expected an integer 0..={max}, got {n}"),
            )),
        },
        Some(other) => Err(bad(field, format!("expected a number, got {other}"))),
    }
}

fn get_bool(
    obj: &Map<String, Value>,
    key: &str,
    field: &'static str,
) -> Result<bool, NetworkConfigError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(bad(field, format!("expected true or false, got {other}"))),
    }
}

fn get_ipv4(
    obj: &Map<String, Value>,
    key: &str,
    field: &'static str,
) -> Result<Option<Ipv4Addr>, NetworkConfigError> {
    get_str(obj, key, field)?
        .map(|s| {
            s.parse::<Ipv4Addr>()
                .map_err(|_| bad(field, format!("{s:?} is not an IPv4 address")))
        })
        .transpose()
}

fn subnet_size(len: u8) -> u32 {
    1u32 << (32 - len as u32)
}

impl NetworkConfig {
    /// Parses and validates flannel's JSON, accepting keys it does not use (flannel configs in the wild
    /// carry `EnableIPv6`, `EnableNFTables` and the like) so a config written for flannel works verbatim.
    ///
    /// Refuses an IPv6-only config (naming `EnableIPv4`): it has no IPv4 `Network`, which every
    /// user of this type needs. [`NetworkConfig::parse_any`] reads one (the agent does).
    pub fn parse(json: &str) -> Result<Self, NetworkConfigError> {
        match Self::parse_any(json)? {
            ParsedNetwork::Ipv4(c) => Ok(c),
            ParsedNetwork::Ipv6Only(_) => Err(bad(
                "EnableIPv4",
                "false (an IPv6-only network) has no IPv4 Network for this reader; the agent \
                 reads it with NetworkConfig::parse_any and runs it with vxlan or host-gw \
                 (docs/ipv6.md)",
            )),
        }
    }

    /// Parses and validates any network config, IPv6-only included.
    pub fn parse_any(json: &str) -> Result<ParsedNetwork, NetworkConfigError> {
        let value: Value =
            serde_json::from_str(json).map_err(|e| NetworkConfigError::Json(e.to_string()))?;
        let obj = value.as_object().ok_or(NetworkConfigError::NotObject)?;

        // The families come first: they decide which other keys matter.
        let enable_ipv4 = get_bool_or(obj, "EnableIPv4", true)?;
        let enable_ipv6 = get_bool_or(obj, "EnableIPv6", false)?;
        if !enable_ipv4 && !enable_ipv6 {
            return Err(bad(
                "EnableIPv4",
                "false while EnableIPv6 is false too: the network would have no address family",
            ));
        }
        if !enable_ipv4 {
            return Ok(ParsedNetwork::Ipv6Only(Ipv6OnlyNetwork {
                ipv6: Ipv6Config::parse(obj)?,
                backend: Self::parse_backend_of(obj)?,
            }));
        }

        let net_str = get_str(obj, "Network", "Network")?
            .ok_or_else(|| bad("Network", "missing (e.g. \"10.244.0.0/16\")"))?;
        let parsed: Ipv4Network = net_str
            .parse()
            .map_err(|_| bad("Network", format!("{net_str:?} is not an IPv4 CIDR")))?;
        if parsed.network() != parsed.ip() {
            return Err(bad(
                "Network",
                format!(
                    "{net_str} has host bits set; did you mean {}/{}?",
                    parsed.network(),
                    parsed.prefix()
                ),
            ));
        }
        let network = parsed;

        let subnet_len = match get_uint(obj, "SubnetLen", "SubnetLen", 32)? {
            Some(0) | None => DEFAULT_SUBNET_LEN,
            Some(v) => v as u8,
        };
        if subnet_len > 30 {
            return Err(bad(
                "SubnetLen",
                format!("{subnet_len} is too long: a node subnet needs at least /30"),
            ));
        }
        if subnet_len <= network.prefix() || subnet_len - network.prefix() < 2 {
            return Err(bad(
                "SubnetLen",
                format!(
                    "Network {network} holds fewer than 4 subnets of /{subnet_len}; use a larger Network or a longer SubnetLen"
                ),
            ));
        }

        let size = subnet_size(subnet_len);
        let first = u32::from(network.network());
        let last_subnet = first + (subnet_size(network.prefix()) - size);
        let check = |field: &'static str, addr: Ipv4Addr| -> Result<Ipv4Addr, NetworkConfigError> {
            let a = u32::from(addr);
            if !network.contains(addr) {
                return Err(bad(field, format!("{addr} is outside Network {network}")));
            }
            if (a - first) % size != 0 {
                return Err(bad(
                    field,
                    format!("{addr} is not aligned to SubnetLen /{subnet_len}"),
                ));
            }
            Ok(addr)
        };
        let subnet_min = match get_ipv4(obj, "SubnetMin", "SubnetMin")? {
            Some(a) => check("SubnetMin", a)?,
            None => Ipv4Addr::from(first + size),
        };
        let subnet_max = match get_ipv4(obj, "SubnetMax", "SubnetMax")? {
            Some(a) => check("SubnetMax", a)?,
            None => Ipv4Addr::from(last_subnet),
        };
        if u32::from(subnet_min) > u32::from(subnet_max) {
            return Err(bad(
                "SubnetMin",
                format!("{subnet_min} is above SubnetMax {subnet_max}"),
            ));
        }

        let backend = Self::parse_backend_of(obj)?;
        let ipv6 = if enable_ipv6 {
            Some(Ipv6Config::parse(obj)?)
        } else {
            None
        };
        if let (BackendConfig::Wireguard(w), None) = (&backend, &ipv6) {
            if w.mode == WireguardMode::Ipv6 {
                return Err(bad(
                    "Backend.Mode",
                    "\"ipv6\" puts the peers' endpoints on the IPv6 underlay, which needs \
                     EnableIPv6 and an IPv6Network",
                ));
            }
        }

        Ok(ParsedNetwork::Ipv4(NetworkConfig {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            backend,
            enable_ipv4,
            ipv6,
        }))
    }

    fn parse_backend_of(obj: &Map<String, Value>) -> Result<BackendConfig, NetworkConfigError> {
        match obj.get("Backend") {
            None | Some(Value::Null) => Self::parse_backend(&Map::new()),
            Some(Value::Object(b)) => Self::parse_backend(b),
            Some(other) => Err(bad("Backend", format!("expected an object, got {other}"))),
        }
    }

    fn parse_backend(b: &Map<String, Value>) -> Result<BackendConfig, NetworkConfigError> {
        // Flannel's code falls back to udp when Type is missing while its docs promise vxlan; tweed
        // keeps the documented promise.
        let ty = get_str(b, "Type", "Backend.Type")?.unwrap_or("vxlan");
        match ty {
            "vxlan" => {
                let vni = get_uint(b, "VNI", "Backend.VNI", (1 << 24) - 1)?
                    .map(|v| v as u32)
                    .unwrap_or(DEFAULT_VNI);
                if vni == 0 {
                    return Err(bad("Backend.VNI", "must be 1..=16777215"));
                }
                let port = get_uint(b, "Port", "Backend.Port", u16::MAX as u64)?
                    .filter(|p| *p != 0)
                    .map(|p| p as u16)
                    .unwrap_or(DEFAULT_VXLAN_PORT);
                Ok(BackendConfig::Vxlan {
                    vni,
                    port,
                    direct_routing: get_bool(b, "DirectRouting", "Backend.DirectRouting")?,
                    mtu: Self::parse_mtu(b)?,
                })
            }
            "host-gw" => Ok(BackendConfig::HostGw),
            "udp" => {
                let port = get_uint(b, "Port", "Backend.Port", u16::MAX as u64)?
                    .filter(|p| *p != 0)
                    .map(|p| p as u16)
                    .unwrap_or(DEFAULT_UDP_PORT);
                Ok(BackendConfig::Udp {
                    port,
                    mtu: Self::parse_mtu(b)?,
                })
            }
            "wireguard" => Self::parse_wireguard(b).map(BackendConfig::Wireguard),
            other => Err(bad(
                "Backend.Type",
                format!(
                    "unknown backend {other:?}; tweed supports vxlan, host-gw, udp and wireguard"
                ),
            )),
        }
    }

    fn parse_wireguard(b: &Map<String, Value>) -> Result<WireguardConfig, NetworkConfigError> {
        let port = |key: &'static str, field: &'static str, default: u16| {
            get_uint(b, key, field, u16::MAX as u64).map(|p| match p {
                Some(0) | None => default,
                Some(p) => p as u16,
            })
        };
        let psk = get_str(b, "PSK", "Backend.PSK")?
            .filter(|s| !s.is_empty())
            .map(|s| decode_wg_key(s).map_err(|e| bad("Backend.PSK", e)))
            .transpose()?;
        let keepalive = get_uint(
            b,
            "PersistentKeepaliveInterval",
            "Backend.PersistentKeepaliveInterval",
            u16::MAX as u64,
        )?
        .unwrap_or(0) as u16;
        let mode = match get_str(b, "Mode", "Backend.Mode")?.unwrap_or("") {
            "" | "separate" => WireguardMode::Separate,
            "auto" => WireguardMode::Auto,
            "ipv4" => WireguardMode::Ipv4,
            "ipv6" => WireguardMode::Ipv6,
            other => {
                return Err(bad(
                    "Backend.Mode",
                    format!("{other:?} is not one of separate, auto, ipv4, ipv6"),
                ))
            }
        };
        Ok(WireguardConfig {
            listen_port: port("ListenPort", "Backend.ListenPort", DEFAULT_WG_PORT)?,
            listen_port_v6: port("ListenPortV6", "Backend.ListenPortV6", DEFAULT_WG_PORT_V6)?,
            mtu: Self::parse_mtu(b)?,
            psk,
            persistent_keepalive: keepalive,
            mode,
        })
    }

    fn parse_mtu(b: &Map<String, Value>) -> Result<u32, NetworkConfigError> {
        let mtu = get_uint(b, "MTU", "Backend.MTU", 65535)?.unwrap_or(0) as u32;
        if mtu != 0 && mtu < 576 {
            return Err(bad(
                "Backend.MTU",
                format!("{mtu} is below IPv4's minimum of 576"),
            ));
        }
        Ok(mtu)
    }

    /// Size of one node subnet in addresses.
    pub fn subnet_size(&self) -> u32 {
        subnet_size(self.subnet_len)
    }

    /// Number of node subnets in [SubnetMin, SubnetMax].
    pub fn subnet_count(&self) -> u32 {
        (u32::from(self.subnet_max) - u32::from(self.subnet_min)) / self.subnet_size() + 1
    }

    /// The i-th subnet of the allocatable range.
    pub fn nth_subnet(&self, i: u32) -> Option<Ipv4Network> {
        if i >= self.subnet_count() {
            return None;
        }
        let base = u32::from(self.subnet_min) + i * self.subnet_size();
        Ipv4Network::new(Ipv4Addr::from(base), self.subnet_len).ok()
    }

    /// Whether `subnet` is a well-formed node subnet of this network inside [SubnetMin, SubnetMax].
    pub fn is_allocatable(&self, subnet: Ipv4Network) -> bool {
        let a = u32::from(subnet.ip());
        subnet.prefix() == self.subnet_len
            && subnet.ip() == subnet.network()
            && a >= u32::from(self.subnet_min)
            && a <= u32::from(self.subnet_max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_err(json: &str) -> &'static str {
        match NetworkConfig::parse(json) {
            Err(NetworkConfigError::Field { field, .. }) => field,
            other => panic!("expected a field error for {json}, got {other:?}"),
        }
    }

    #[test]
    fn flannel_example_verbatim() {
        let c = NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","SubnetLen":24,"SubnetMin":"10.244.1.0","SubnetMax":"10.244.255.0",
               "EnableNFTables":false,"Backend":{"Type":"vxlan","VNI":1,"Port":8472,"DirectRouting":false,"MTU":0}}"#,
        )
        .unwrap();
        assert_eq!(c.network.to_string(), "10.244.0.0/16");
        assert_eq!(c.subnet_count(), 255);
        assert_eq!(
            c.backend,
            BackendConfig::Vxlan {
                vni: 1,
                port: 8472,
                direct_routing: false,
                mtu: 0
            }
        );
    }

    #[test]
    fn defaults() {
        let c = NetworkConfig::parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap();
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 244, 1, 0));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 244, 255, 0));
        assert_eq!(c.backend.type_name(), "vxlan");
        assert_eq!(c.nth_subnet(0).unwrap().to_string(), "10.244.1.0/24");
        assert_eq!(c.nth_subnet(254).unwrap().to_string(), "10.244.255.0/24");
        assert!(c.nth_subnet(255).is_none());
        let u =
            NetworkConfig::parse(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}"#).unwrap();
        assert_eq!(u.backend, BackendConfig::Udp { port: 8285, mtu: 0 });
        let h = NetworkConfig::parse(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}"#)
            .unwrap();
        assert_eq!(h.backend, BackendConfig::HostGw);
    }

    #[test]
    fn rejections_name_the_field() {
        assert!(matches!(
            NetworkConfig::parse("{"),
            Err(NetworkConfigError::Json(_))
        ));
        assert_eq!(
            NetworkConfig::parse("[]").unwrap_err(),
            NetworkConfigError::NotObject
        );
        assert_eq!(field_err(r#"{}"#), "Network");
        assert_eq!(field_err(r#"{"Network":"nope"}"#), "Network");
        assert_eq!(field_err(r#"{"Network":"10.244.1.0/16"}"#), "Network");
        assert_eq!(field_err(r#"{"Network":7}"#), "Network");
        assert_eq!(
            field_err(r#"{"Network":"10.0.0.0/8","SubnetLen":31}"#),
            "SubnetLen"
        );
        // /23 with /24 subnets: only two subnets.
        assert_eq!(field_err(r#"{"Network":"10.0.0.0/23"}"#), "SubnetLen");
        assert_eq!(
            field_err(r#"{"Network":"10.0.0.0/16","SubnetLen":"24"}"#),
            "SubnetLen"
        );
        assert_eq!(
            field_err(r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.1.5"}"#),
            "SubnetMin"
        );
        assert_eq!(
            field_err(r#"{"Network":"10.0.0.0/16","SubnetMax":"10.1.0.0"}"#),
            "SubnetMax"
        );
        assert_eq!(
            field_err(r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.9.0","SubnetMax":"10.0.8.0"}"#),
            "SubnetMin"
        );
        assert_eq!(
            field_err(r#"{"Network":"10.0.0.0/16","Backend":{"Type":"ipsec"}}"#),
            "Backend.Type"
        );
        assert_eq!(
            field_err(r#"{"Network":"10.0.0.0/16","Backend":{"VNI":0}}"#),
            "Backend.VNI"
        );
        assert_eq!(
            field_err(r#"{"Network":"10.0.0.0/16","Backend":{"Port":70000}}"#),
            "Backend.Port"
        );
        assert_eq!(
            field_err(r#"{"Network":"10.0.0.0/16","Backend":{"MTU":100}}"#),
            "Backend.MTU"
        );
        assert_eq!(
            field_err(r#"{"Network":"10.0.0.0/16","Backend":{"DirectRouting":"yes"}}"#),
            "Backend.DirectRouting"
        );
        assert_eq!(
            field_err(r#"{"Network":"10.0.0.0/16","Backend":"vxlan"}"#),
            "Backend"
        );
    }

    #[test]
    fn wireguard_keys_and_defaults() {
        let c = NetworkConfig::parse(r#"{"Network":"10.5.0.0/16","Backend":{"Type":"wireguard"}}"#)
            .unwrap();
        assert_eq!(c.backend.type_name(), "wireguard");
        assert_eq!(
            c.backend,
            BackendConfig::Wireguard(WireguardConfig {
                listen_port: 51820,
                listen_port_v6: 51821,
                mtu: 0,
                psk: None,
                persistent_keepalive: 0,
                mode: WireguardMode::Separate,
            })
        );
        let psk = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let c = NetworkConfig::parse(&format!(
            r#"{{"Network":"10.5.0.0/16","Backend":{{"Type":"wireguard","ListenPort":51000,
               "ListenPortV6":51001,"MTU":1420,"PSK":"{psk}","PersistentKeepaliveInterval":25,
               "Mode":"auto"}}}}"#
        ))
        .unwrap();
        let BackendConfig::Wireguard(w) = c.backend else {
            panic!("{c:?}")
        };
        let want: [u8; 32] = std::array::from_fn(|i| i as u8);
        assert_eq!(
            (
                w.listen_port,
                w.listen_port_v6,
                w.mtu,
                w.psk,
                w.persistent_keepalive,
                w.mode
            ),
            (51000, 51001, 1420, Some(want), 25, WireguardMode::Auto)
        );
        for (mode, want) in [
            ("separate", WireguardMode::Separate),
            ("ipv4", WireguardMode::Ipv4),
            ("", WireguardMode::Separate),
        ] {
            let c = NetworkConfig::parse(&format!(
                r#"{{"Network":"10.5.0.0/16","Backend":{{"Type":"wireguard","Mode":"{mode}"}}}}"#
            ))
            .unwrap();
            assert!(matches!(c.backend, BackendConfig::Wireguard(w) if w.mode == want));
        }
    }

    #[test]
    fn wireguard_rejections_name_the_field() {
        let wg = |keys: &str| {
            field_err(&format!(
                r#"{{"Network":"10.5.0.0/16","Backend":{{"Type":"wireguard",{keys}}}}}"#
            ))
        };
        assert_eq!(wg(r#""Mode":"both""#), "Backend.Mode");
        // ipv6 is valid only with an IPv6 overlay.
        assert_eq!(wg(r#""Mode":"ipv6""#), "Backend.Mode");
        let dual = NetworkConfig::parse(
            r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:5::/56",
                "Backend":{"Type":"wireguard","Mode":"ipv6","ListenPortV6":52000}}"#,
        )
        .unwrap();
        assert!(matches!(dual.backend, BackendConfig::Wireguard(w)
            if w.mode == WireguardMode::Ipv6 && w.listen_port_v6 == 52000));
        assert_eq!(wg(r#""Mode":4"#), "Backend.Mode");
        assert_eq!(wg(r#""ListenPort":65536"#), "Backend.ListenPort");
        assert_eq!(wg(r#""ListenPort":-1"#), "Backend.ListenPort");
        assert_eq!(wg(r#""ListenPortV6":"x""#), "Backend.ListenPortV6");
        assert_eq!(wg(r#""MTU":80"#), "Backend.MTU");
        assert_eq!(wg(r#""PSK":"not base64!""#), "Backend.PSK");
        // Valid base64, wrong length: a 16-byte key.
        assert_eq!(wg(r#""PSK":"AAECAwQFBgcICQoLDA0ODw==""#), "Backend.PSK");
        assert_eq!(wg(r#""PSK":7"#), "Backend.PSK");
        assert_eq!(
            wg(r#""PersistentKeepaliveInterval":70000"#),
            "Backend.PersistentKeepaliveInterval"
        );
        assert_eq!(
            wg(r#""PersistentKeepaliveInterval":1.5"#),
            "Backend.PersistentKeepaliveInterval"
        );
        // An empty PSK is flannel's "none".
        let c = NetworkConfig::parse(
            r#"{"Network":"10.5.0.0/16","Backend":{"Type":"wireguard","PSK":""}}"#,
        )
        .unwrap();
        assert!(matches!(c.backend, BackendConfig::Wireguard(w) if w.psk.is_none()));
    }

    #[test]
    fn wg_keys_decode_only_as_32_bytes_of_base64() {
        // Unpadded, as some tools print keys: refused like `wg` refuses it.
        assert!(decode_wg_key(&"A".repeat(43)).is_err());
        let k = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        assert_eq!(decode_wg_key(k).unwrap()[31], 31);
        assert_eq!(decode_wg_key(&format!(" {k}\n")).unwrap()[0], 0);
        assert!(decode_wg_key("").unwrap_err().contains("0"));
        assert!(decode_wg_key(&"QUFB".repeat(100))
            .unwrap_err()
            .contains("300"));
        assert!(decode_wg_key("ÿÿÿÿ").is_err());
    }

    #[test]
    fn allocatable() {
        let c = NetworkConfig::parse(
            r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.4.0","SubnetMax":"10.0.9.0"}"#,
        )
        .unwrap();
        assert_eq!(c.subnet_count(), 6);
        assert!(c.is_allocatable("10.0.4.0/24".parse().unwrap()));
        assert!(c.is_allocatable("10.0.9.0/24".parse().unwrap()));
        assert!(!c.is_allocatable("10.0.3.0/24".parse().unwrap()));
        assert!(!c.is_allocatable("10.0.10.0/24".parse().unwrap()));
        assert!(!c.is_allocatable("10.0.5.0/25".parse().unwrap()));
    }
}

#[cfg(test)]
mod ipv6_tests {
    use super::*;

    fn v6(extra: &str) -> Result<NetworkConfig, NetworkConfigError> {
        NetworkConfig::parse(&format!(
            r#"{{"Network":"10.244.0.0/16","EnableIPv6":true{extra}}}"#
        ))
    }

    fn field_of(r: Result<NetworkConfig, NetworkConfigError>) -> &'static str {
        match r {
            Err(NetworkConfigError::Field { field, .. }) => field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn v4_only_by_default_and_ipv6_keys_ignored_when_disabled() {
        let c =
            NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","IPv6Network":"not even a cidr"}"#)
                .unwrap();
        assert!(c.enable_ipv4);
        assert_eq!(c.ipv6, None);
        let c = NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","EnableIPv6":false}"#).unwrap();
        assert_eq!(c.ipv6, None);
    }

    #[test]
    fn flannel_dual_stack_defaults() {
        let c = v6(r#","IPv6Network":"fd00:10:244::/56""#).unwrap();
        let s = c.ipv6.unwrap();
        assert_eq!(s.subnet_len, 64);
        // The first subnet is skipped, as for IPv4.
        assert_eq!(s.subnet_min, "fd00:10:244:1::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(
            s.subnet_max,
            "fd00:10:244:ff::".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(s.subnet_count(), 255);
        assert_eq!(s.nth_subnet(0).unwrap().to_string(), "fd00:10:244:1::/64");
        assert_eq!(
            s.nth_subnet(254).unwrap().to_string(),
            "fd00:10:244:ff::/64"
        );
        assert_eq!(s.nth_subnet(255), None);
        assert!(s.is_allocatable("fd00:10:244:7::/64".parse().unwrap()));
        assert!(!s.is_allocatable("fd00:10:244::/64".parse().unwrap()));
        assert!(!s.is_allocatable("fd00:10:244:7::/80".parse().unwrap()));
        assert!(!s.is_allocatable("fd00:10:245::/64".parse().unwrap()));
    }

    #[test]
    fn subnet_len_defaults_to_prefix_plus_two_past_62() {
        for (net, want) in [
            ("fd00::/48", 64),
            ("fd00::/62", 64),
            ("fd00::/63", 65),
            ("fd00::/100", 102),
            ("fd00::/122", 124),
            ("fd00::/124", 126),
        ] {
            let c = v6(&format!(r#","IPv6Network":"{net}""#)).unwrap();
            assert_eq!(c.ipv6.unwrap().subnet_len, want, "{net}");
        }
        // Past /124 the network cannot hold four subnets of at most /126.
        for net in ["fd00::/125", "fd00::/128"] {
            assert_eq!(
                field_of(v6(&format!(r#","IPv6Network":"{net}""#))),
                "IPv6Network",
                "{net}"
            );
        }
        let c = v6(r#","IPv6Network":"fd00::/48","IPv6SubnetLen":126"#).unwrap();
        assert_eq!(c.ipv6.unwrap().subnet_len, 126);
    }

    #[test]
    fn explicit_subnet_len_and_range() {
        let c = v6(
            r#","IPv6Network":"2001:db8::/32","IPv6SubnetLen":56,"IPv6SubnetMin":"2001:db8:0:200::","IPv6SubnetMax":"2001:db8:0:f00::""#,
        )
        .unwrap();
        let s = c.ipv6.unwrap();
        assert_eq!(s.subnet_len, 56);
        assert_eq!(s.subnet_count(), 14);
        assert_eq!(s.nth_subnet(1).unwrap().to_string(), "2001:db8:0:300::/56");
        // A /8 network of /124 subnets: 2^116 subnets; the count must not overflow.
        let c = v6(r#","IPv6Network":"fd00::/8","IPv6SubnetLen":124"#).unwrap();
        assert_eq!(c.ipv6.unwrap().subnet_count(), (1u128 << 116) - 1);
    }

    #[test]
    fn hostile_and_malformed_values_name_the_field() {
        let cases: &[(&str, &str)] = &[
            ("", "IPv6Network"),
            (r#","IPv6Network":"10.0.0.0/8""#, "IPv6Network"),
            (r#","IPv6Network":"fd00::1/64""#, "IPv6Network"),
            (r#","IPv6Network":"fd00::/129""#, "IPv6Network"),
            (r#","IPv6Network":12"#, "IPv6Network"),
            (
                r#","IPv6Network":"fd00::/64","IPv6SubnetLen":64"#,
                "IPv6SubnetLen",
            ),
            (
                r#","IPv6Network":"fd00::/64","IPv6SubnetLen":65"#,
                "IPv6SubnetLen",
            ),
            (
                r#","IPv6Network":"fd00::/48","IPv6SubnetLen":127"#,
                "IPv6SubnetLen",
            ),
            (
                r#","IPv6Network":"fd00::/48","IPv6SubnetLen":128"#,
                "IPv6SubnetLen",
            ),
            (
                r#","IPv6Network":"fd00::/124","IPv6SubnetLen":125"#,
                "IPv6SubnetLen",
            ),
            (
                r#","IPv6Network":"fd00::/48","IPv6SubnetLen":129"#,
                "IPv6SubnetLen",
            ),
            (
                r#","IPv6Network":"fd00::/48","IPv6SubnetLen":-1"#,
                "IPv6SubnetLen",
            ),
            (
                r#","IPv6Network":"fd00::/48","IPv6SubnetLen":1e300"#,
                "IPv6SubnetLen",
            ),
            (
                r#","IPv6Network":"fd00::/48","IPv6SubnetLen":18446744073709551616"#,
                "IPv6SubnetLen",
            ),
            (
                r#","IPv6Network":"fd00::/48","IPv6SubnetLen":"64""#,
                "IPv6SubnetLen",
            ),
            (
                r#","IPv6Network":"fd00::/48","IPv6SubnetMin":"fd01::""#,
                "IPv6SubnetMin",
            ),
            (
                r#","IPv6Network":"fd00::/48","IPv6SubnetMin":"fd00:0:0:1::1""#,
                "IPv6SubnetMin",
            ),
            (
                r#","IPv6Network":"fd00::/48","IPv6SubnetMin":"10.244.1.0""#,
                "IPv6SubnetMin",
            ),
            (
                r#","IPv6Network":"fd00::/48","IPv6SubnetMax":"fd00:1::""#,
                "IPv6SubnetMax",
            ),
            (
                r#","IPv6Network":"fd00::/48","IPv6SubnetMin":"fd00:0:0:9::","IPv6SubnetMax":"fd00:0:0:8::""#,
                "IPv6SubnetMin",
            ),
        ];
        for (extra, field) in cases {
            assert_eq!(field_of(v6(extra)), *field, "{extra}");
        }
        assert_eq!(
            field_of(NetworkConfig::parse(
                r#"{"Network":"10.244.0.0/16","EnableIPv6":"yes"}"#
            )),
            "EnableIPv6"
        );
        assert_eq!(
            field_of(NetworkConfig::parse(
                r#"{"Network":"10.244.0.0/16","EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/48"}"#
            )),
            "EnableIPv4"
        );
        assert!(NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","EnableIPv4":true}"#).is_ok());
        // Networks reaching into the IPv4-mapped range would hand out subnets whose keys are
        // rendered dotted and refused by every reader.
        for net in [
            "::/0",
            "::/64",
            "::ffff:0:0/96",
            "::ffff:a00:0/120",
            "::ff00:0:0/88",
        ] {
            assert_eq!(
                field_of(v6(&format!(r#","IPv6Network":"{net}""#))),
                "IPv6Network",
                "{net}"
            );
        }
        assert!(v6(r#","IPv6Network":"::1:0:0:0/80""#).is_ok());
    }

    fn any(json: &str) -> Result<ParsedNetwork, NetworkConfigError> {
        NetworkConfig::parse_any(json)
    }

    #[test]
    fn ipv6_only_is_parsed_by_parse_any_and_refused_by_parse() {
        let json = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"host-gw"}}"#;
        let ParsedNetwork::Ipv6Only(n) = any(json).unwrap() else {
            panic!("expected an IPv6-only network");
        };
        assert_eq!(n.backend, BackendConfig::HostGw);
        assert_eq!(n.ipv6.network.to_string(), "fd00:10:244::/56");
        assert_eq!(n.ipv6.subnet_len, 64);
        assert_eq!(
            n.ipv6.subnet_min,
            "fd00:10:244:1::".parse::<Ipv6Addr>().unwrap()
        );
        // The agent runs NetworkConfig, which needs an IPv4 Network: refused, naming the field.
        let err = NetworkConfig::parse(json).unwrap_err();
        assert!(err.to_string().contains("IPv6-only"), "{err}");
        assert_eq!(field_of(Err(err)), "EnableIPv4");
        // IPv4 keys are ignored in an IPv6-only network, whatever they hold (flannel's rule).
        let with_v4 = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Network":"not a cidr","SubnetLen":99,"Backend":{"Type":"host-gw"}}"#;
        assert_eq!(any(with_v4).unwrap(), any(json).unwrap());
        // Dual stack and IPv4 come back as the NetworkConfig parse returns.
        for j in [
            r#"{"Network":"10.244.0.0/16"}"#,
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/48"}"#,
        ] {
            assert_eq!(
                any(j).unwrap(),
                ParsedNetwork::Ipv4(NetworkConfig::parse(j).unwrap())
            );
        }
    }

    #[test]
    fn contradictory_family_settings_name_the_field() {
        let field = |r: Result<ParsedNetwork, NetworkConfigError>| match r {
            Err(NetworkConfigError::Field { field, .. }) => field,
            other => panic!("expected a field error, got {other:?}"),
        };
        let cases: &[(&str, &str)] = &[
            // No family at all, spelled out or by EnableIPv6's default.
            (
                r#"{"Network":"10.244.0.0/16","EnableIPv4":false,"EnableIPv6":false}"#,
                "EnableIPv4",
            ),
            (
                r#"{"Network":"10.244.0.0/16","EnableIPv4":false}"#,
                "EnableIPv4",
            ),
            // IPv6 switched on with nothing to run it on.
            (r#"{"EnableIPv4":false,"EnableIPv6":true}"#, "IPv6Network"),
            (
                r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":""}"#,
                "IPv6Network",
            ),
            (
                r#"{"Network":"10.244.0.0/16","EnableIPv6":true}"#,
                "IPv6Network",
            ),
            // IPv4 on (the default) needs its Network even when IPv6 is set up.
            (
                r#"{"EnableIPv6":true,"IPv6Network":"fd00::/48"}"#,
                "Network",
            ),
            // Wrong types for the switches themselves.
            (
                r#"{"EnableIPv4":"false","EnableIPv6":true,"IPv6Network":"fd00::/48"}"#,
                "EnableIPv4",
            ),
            (r#"{"EnableIPv4":0,"EnableIPv6":1}"#, "EnableIPv4"),
            // An IPv6-only network is validated as strictly as a dual-stack one's IPv6 half.
            (
                r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/125"}"#,
                "IPv6Network",
            ),
            (
                r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/48","IPv6SubnetLen":127}"#,
                "IPv6SubnetLen",
            ),
            (
                r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/48","IPv6SubnetMax":"fd00:1::"}"#,
                "IPv6SubnetMax",
            ),
            (
                r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/48","Backend":{"Type":"bogus"}}"#,
                "Backend.Type",
            ),
        ];
        for (json, want) in cases {
            assert_eq!(field(any(json)), *want, "{json}");
        }
        // null means unset: EnableIPv4 stays true.
        assert!(matches!(
            any(r#"{"Network":"10.244.0.0/16","EnableIPv4":null}"#),
            Ok(ParsedNetwork::Ipv4(_))
        ));
    }
}
