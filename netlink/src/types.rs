//! Plain-data views of kernel objects. Everything above this module works on these values and
//! never on netlink messages, so it can be tested without a kernel.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnetwork::{Ipv4Network, Ipv6Network};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An Ethernet address. Text form is lowercase `aa:bb:cc:dd:ee:ff`, the spelling flannel puts in
/// a lease's `VtepMAC`, so serde goes through that text form too.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub const ZERO: MacAddr = MacAddr([0; 6]);

    /// A random locally-administered unicast address: such an address can never collide with a
    /// vendor-assigned one, and a multicast bit would make the kernel refuse it as a device
    /// address.
    pub fn random_local() -> MacAddr {
        let mut b: [u8; 6] = rand::random();
        b[0] = (b[0] & 0xfe) | 0x02;
        MacAddr(b)
    }

    pub fn from_slice(b: &[u8]) -> Option<MacAddr> {
        <[u8; 6]>::try_from(b).ok().map(MacAddr)
    }

    pub fn octets(&self) -> [u8; 6] {
        self.0
    }

    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }

    /// What a device address must be: unicast and not all zeroes.
    pub fn is_valid_unicast(&self) -> bool {
        !self.is_multicast() && !self.is_zero()
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a MAC address (expected aa:bb:cc:dd:ee:ff)")]
pub struct ParseMacError(pub String);

impl FromStr for MacAddr {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<MacAddr, ParseMacError> {
        let err = || ParseMacError(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in out.iter_mut() {
            let part = parts.next().ok_or_else(err)?;
            // from_str_radix alone would also take a sign ("+f").
            if part.len() != 2 || !part.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<MacAddr, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A network device as the kernel reports it. The default is an unnamed plain device, down,
/// with nothing attached: a base that tests and the fake kernel complete with the fields they set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    /// `None` for devices without a 6-byte hardware address (loopback has one, tun does not).
    pub mac: Option<MacAddr>,
    /// `IFLA_INFO_KIND` (`"vxlan"`, `"veth"`, ...); `None` for plain physical devices.
    pub kind: Option<String>,
    /// Administratively up (`IFF_UP`), not carrier state.
    pub up: bool,
    pub vxlan: Option<VxlanAttrs>,
    /// `IFLA_MASTER`: the bridge (or bond) this device is a port of.
    pub master: Option<u32>,
    /// `IFLA_IFALIAS`: free text; the CNI plugin records which attachment owns a device here.
    pub alias: Option<String>,
}

/// The vxlan attributes tweed cares about; the rest (ttl, tos, ageing, ...) stay kernel defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanAttrs {
    pub vni: u32,
    pub port: u16,
    /// `IFLA_VXLAN_LOCAL` or `IFLA_VXLAN_LOCAL6`: the family of the underlay the tunnel uses.
    pub local: Option<IpAddr>,
    pub learning: bool,
    /// `IFLA_VXLAN_LINK`: the underlay device the tunnel is bound to.
    pub underlay: Option<u32>,
}

/// What to create for a vxlan device. `mac` and `mtu` are set in the same request so the device
/// never exists with a random MAC that a peer could learn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    /// An IPv6 address makes an IPv6-underlay device (`IFLA_VXLAN_LOCAL6`), whose FDB
    /// destinations are IPv6 VTEPs.
    pub local: IpAddr,
    pub underlay: u32,
    pub learning: bool,
    pub mtu: Option<u32>,
    pub mac: Option<MacAddr>,
}

impl VxlanSpec {
    pub fn attrs(&self) -> VxlanAttrs {
        VxlanAttrs {
            vni: self.vni,
            port: self.port,
            local: Some(self.local),
            learning: self.learning,
            underlay: Some(self.underlay),
        }
    }
}

/// What to create for a bridge. `mac` is set in the creating request: a bridge whose address was
/// set explicitly keeps it, instead of taking the lowest address among its ports as they come
/// and go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeSpec {
    pub name: String,
    pub mtu: Option<u32>,
    pub mac: Option<MacAddr>,
}

/// A veth pair: `name` in the namespace of the socket that applies the op, `peer` created
/// directly in the namespace behind `peer_netns` (an open namespace fd, see
/// [`crate::Netns::raw_fd`]; `None`: the same namespace). Neither end ever exists elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethSpec {
    pub name: String,
    pub peer: String,
    pub peer_netns: Option<i32>,
    pub mtu: Option<u32>,
    pub mac: Option<MacAddr>,
    pub peer_mac: Option<MacAddr>,
}

/// An IPv6 address on a device, with its prefix length; `tentative` while duplicate address
/// detection runs (the kernel neither sends from it nor accepts traffic to it until it ends).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr6 {
    pub ifindex: u32,
    pub net: Ipv6Network,
    pub tentative: bool,
}

/// An IPv4 address on a device; `net` is the address with its prefix length (`10.244.3.0/32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr {
    pub ifindex: u32,
    pub net: Ipv4Network,
}

/// An IPv4 ARP entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    pub ip: Ipv4Addr,
    /// Absent for entries still resolving (`INCOMPLETE`, `FAILED`).
    pub mac: Option<MacAddr>,
    /// `NUD_PERMANENT`: only such entries are ever made by tweed; the rest belong to the kernel.
    pub permanent: bool,
}

/// A bridge-family forwarding entry on a vxlan device: frames for `mac` go to VTEP `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdbEntry {
    pub ifindex: u32,
    pub mac: MacAddr,
    pub dst: Option<Ipv4Addr>,
    pub permanent: bool,
}

impl Neighbour {
    /// An entry as tweed makes them (`NUD_PERMANENT`).
    pub fn permanent(ifindex: u32, ip: Ipv4Addr, mac: Option<MacAddr>) -> Neighbour {
        Neighbour {
            ifindex,
            ip,
            mac,
            permanent: true,
        }
    }
}

impl FdbEntry {
    /// An entry as tweed makes them (`NUD_PERMANENT`).
    pub fn permanent(ifindex: u32, mac: MacAddr, dst: Option<Ipv4Addr>) -> FdbEntry {
        FdbEntry {
            ifindex,
            mac,
            dst,
            permanent: true,
        }
    }
}

/// An IPv4 route in the main table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Network,
    pub gateway: Option<Ipv4Addr>,
    /// Output device. For an observed multipath route, the first hop's device; `None` in an op
    /// lets the kernel pick the device from `gateway`.
    pub oif: Option<u32>,
    pub onlink: bool,
    /// Priority (metric); part of the kernel's identity of a route together with `dst`.
    pub metric: u32,
    /// `RTPROT_*` of an observed route. Routes tweed writes carry [`Route::PROTO_STATIC`].
    pub protocol: u8,
}

impl Route {
    pub const PROTO_KERNEL: u8 = 2;
    pub const PROTO_BOOT: u8 = 3;
    pub const PROTO_STATIC: u8 = 4;

    /// `dst via gateway dev oif onlink`: the gateway need not be reachable, the kernel just
    /// resolves it on `oif` (how vxlan reaches a peer's subnet address).
    pub fn onlink(dst: Ipv4Network, gateway: Ipv4Addr, oif: u32) -> Route {
        Route {
            dst,
            gateway: Some(gateway),
            oif: Some(oif),
            onlink: true,
            metric: 0,
            protocol: Route::PROTO_STATIC,
        }
    }

    /// `dst via gateway [dev oif]`: a plain next hop on a directly connected network (host-gw).
    pub fn via(dst: Ipv4Network, gateway: Ipv4Addr, oif: Option<u32>) -> Route {
        Route {
            dst,
            gateway: Some(gateway),
            oif,
            onlink: false,
            metric: 0,
            protocol: Route::PROTO_STATIC,
        }
    }

    pub fn is_default(&self) -> bool {
        self.dst.prefix() == 0
    }

    /// Same forwarding behaviour, ignoring who installed it: the comparison a plan needs.
    pub fn same_path(&self, other: &Route) -> bool {
        self.dst == other.dst
            && self.gateway == other.gateway
            && self.oif == other.oif
            && self.onlink == other.onlink
            && self.metric == other.metric
    }
}

/// A permanent IPv6 neighbour (NDP) entry, the IPv6 twin of [`Neighbour`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbour6 {
    pub ifindex: u32,
    pub ip: Ipv6Addr,
    pub mac: Option<MacAddr>,
    pub permanent: bool,
}

/// An FDB entry of an IPv6-underlay vxlan device: frames for `mac` go to IPv6 VTEP `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdbEntry6 {
    pub ifindex: u32,
    pub mac: MacAddr,
    pub dst: Option<Ipv6Addr>,
    pub permanent: bool,
}

/// An IPv6 route in the main table, the twin of [`Route`] (same fields, same meaning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route6 {
    pub dst: Ipv6Network,
    pub gateway: Option<Ipv6Addr>,
    pub oif: Option<u32>,
    pub onlink: bool,
    pub metric: u32,
    pub protocol: u8,
}

impl Route6 {
    /// The metric the kernel gives an IPv6 route added without one (`IP6_RT_PRIO_USER`). Routes
    /// are written with it explicitly so that the route read back equals the route planned.
    pub const DEFAULT_METRIC: u32 = 1024;

    /// `dst via gateway dev oif onlink` (vxlan: the peer's subnet address on the v6 device).
    pub fn onlink(dst: Ipv6Network, gateway: Ipv6Addr, oif: u32) -> Route6 {
        Route6 {
            dst,
            gateway: Some(gateway),
            oif: Some(oif),
            onlink: true,
            metric: Route6::DEFAULT_METRIC,
            protocol: Route::PROTO_STATIC,
        }
    }

    /// `dst via gateway [dev oif]` (host-gw).
    pub fn via(dst: Ipv6Network, gateway: Ipv6Addr, oif: Option<u32>) -> Route6 {
        Route6 {
            dst,
            gateway: Some(gateway),
            oif,
            onlink: false,
            metric: Route6::DEFAULT_METRIC,
            protocol: Route::PROTO_STATIC,
        }
    }

    pub fn same_path(&self, other: &Route6) -> bool {
        self.dst == other.dst
            && self.gateway == other.gateway
            && self.oif == other.oif
            && self.onlink == other.onlink
            && self.metric == other.metric
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_text_round_trip() {
        let m: MacAddr = "AA:bb:0c:dd:ee:0f".parse().unwrap();
        assert_eq!(m, MacAddr([0xaa, 0xbb, 0x0c, 0xdd, 0xee, 0x0f]));
        assert_eq!(m.to_string(), "aa:bb:0c:dd:ee:0f");
        for bad in [
            "",
            "aa:bb:cc:dd:ee",
            "aa:bb:cc:dd:ee:ff:00",
            "aa:bb:cc:dd:ee:f",
            "aa-bb-cc-dd-ee-ff",
            "gg:bb:cc:dd:ee:ff",
            "aa:bb:cc:dd:ee:+f",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn mac_serde_is_a_string() {
        let m = MacAddr([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]);
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(j, r#""aa:bb:cc:dd:ee:ff""#);
        assert_eq!(serde_json::from_str::<MacAddr>(&j).unwrap(), m);
        assert!(serde_json::from_str::<MacAddr>(r#""nope""#).is_err());
    }

    #[test]
    fn random_mac_is_local_unicast() {
        for _ in 0..1000 {
            let m = MacAddr::random_local();
            assert_eq!(m.0[0] & 0x03, 0x02, "{m}");
            assert!(m.is_valid_unicast());
        }
        assert_ne!(MacAddr::random_local(), MacAddr::random_local());
    }
}
