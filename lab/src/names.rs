//! Names and addresses of everything a lab creates. Pure: no I/O.
//!
//! Every namespace carries the lab's prefix `twl-<lab>-`, so labs never collide and `down` can find
//! a lab's leftovers without its state file. Interface names never carry the lab name: they live
//! inside the lab's own namespaces, where short fixed names (`br0`, `br1`, `eth0`, `cni0`,
//! `veth-h3`, `veth-o`, `veth-p2`) cannot clash and always fit the kernel's 15-character limit.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};

/// The underlay: /24 segments that are only ever configured inside the lab's namespaces. Segment
/// A is 198.18.0.0/24 on bridge `br0`; a routed second segment B (`--segments 2`) is
/// 198.18.1.0/24 on `br1`. Both bridges live in the underlay namespace, which routes between them.
pub const UNDERLAY_PREFIX: u8 = 24;
pub const UNDERLAY_NET: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);
/// The underlay bridge's own address (segment A's gateway), where a single etcd listens.
pub const UNDERLAY_GW: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
pub const UNDERLAY_BRIDGE: &str = "br0";
/// How many underlay segments a lab can have.
pub const MAX_SEGMENTS: usize = 2;
/// The "outside" namespace: on segment A, not part of the overlay (a stand-in for the internet,
/// for masquerade tests).
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 250);
pub const OUTSIDE_VETH: &str = "veth-o";
/// The members of a multi-member etcd cluster listen on these addresses of `br0`.
pub const ETCD_MEMBER_BASE: u8 = 251;
pub const MAX_ETCD_MEMBERS: usize = 3;
/// tweedd's default metrics port (`--metrics-addr 0.0.0.0:9867`).
pub const METRICS_PORT: u16 = 9867;
pub const HOST_IFACE: &str = "eth0";
pub const POD_IFACE: &str = "eth0";
pub const POD_BRIDGE: &str = "cni0";
pub const ETCD_CLIENT_PORT: u16 = 2379;
pub const ETCD_PEER_PORT: u16 = 2380;
pub const OVERLAY_NETWORK: &str = "10.244.0.0/16";
pub const OVERLAY_SUBNET_LEN: u8 = 24;
/// `--ip-family dual`: the overlay's IPv6 network and node subnet length (flannel's default /64).
pub const OVERLAY6_NETWORK: &str = "fd00:10:244::/56";
pub const OVERLAY6_SUBNET_LEN: u8 = 64;
/// `--ip-family dual`: the underlay's IPv6 side, a ULA /64 per segment that spells its IPv4
/// twin (fd00:198:18:<segment>::/64), with the same last numbers: host i is `::<i>` (hex digits
/// spelling the decimal number, so h12 is `::12`), the gateway `::254`, the outside `::250`.
pub const UNDERLAY6_PREFIX: u8 = 64;
/// .254 is the bridge, .250 the outside namespace and .251 to .253 etcd members, so hosts take
/// .1 to .249.
pub const MAX_HOSTS: usize = 249;
/// Keeps `ip netns list` readable; nothing in the kernel limits namespace names this tightly.
pub const MAX_NAME_LEN: usize = 12;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid lab name {name:?}: {reason}")]
pub struct NameError {
    pub name: String,
    pub reason: String,
}

/// Lab names: 1 to 12 of `[a-z0-9-]`, starting with a letter or digit and not ending in `-`.
pub fn validate_lab_name(name: &str) -> Result<(), NameError> {
    let bad = |reason: &str| {
        Err(NameError {
            name: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad(&format!("longer than {MAX_NAME_LEN} characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("only a-z, 0-9 and '-' are allowed");
    }
    if name.starts_with('-') || name.ends_with('-') || name.contains("--") {
        return bad("'-' may not start or end it, nor repeat");
    }
    Ok(())
}

/// The names of one lab's namespaces and hosts. Hosts and pods count from 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    lab: String,
}

impl Names {
    pub fn new(lab: &str) -> Result<Self, NameError> {
        validate_lab_name(lab)?;
        Ok(Names {
            lab: lab.to_string(),
        })
    }

    pub fn lab(&self) -> &str {
        &self.lab
    }

    pub fn prefix(&self) -> String {
        format!("twl-{}-", self.lab)
    }

    pub fn underlay_ns(&self) -> String {
        format!("twl-{}-u", self.lab)
    }

    /// The namespace outside the overlay, on segment A (`exec` target `outside`).
    pub fn outside_ns(&self) -> String {
        format!("twl-{}-o", self.lab)
    }

    pub fn host(&self, host: usize) -> String {
        format!("h{host}")
    }

    pub fn host_ns(&self, host: usize) -> String {
        format!("twl-{}-h{host}", self.lab)
    }

    pub fn pod(&self, pod: usize) -> String {
        format!("p{pod}")
    }

    pub fn pod_ns(&self, host: usize, pod: usize) -> String {
        format!("twl-{}-h{host}-p{pod}", self.lab)
    }

    /// The host's end of its underlay cable, in the underlay namespace.
    pub fn underlay_veth(&self, host: usize) -> String {
        format!("veth-h{host}")
    }

    /// The pod's cable end on the host's `cni0`, in the host namespace.
    pub fn pod_veth(&self, pod: usize) -> String {
        format!("veth-p{pod}")
    }

    /// Whether `ns` is one of this lab's namespaces. Exact shapes, not a prefix test: lab `a`'s
    /// prefix is a prefix of lab `a-h1`'s too, but `twl-a-h1-u` is no shape of lab `a`.
    pub fn owns_netns(&self, ns: &str) -> bool {
        let Some(rest) = ns.strip_prefix(&self.prefix()) else {
            return false;
        };
        if rest == "u" || rest == "o" {
            return true;
        }
        let num = |s: &str, tag: char| {
            s.strip_prefix(tag)
                .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        };
        match rest.split_once('-') {
            None => num(rest, 'h'),
            Some((h, p)) => num(h, 'h') && num(p, 'p'),
        }
    }

    /// Resolves an `exec` target: `underlay`, `outside`, `hN` or `hN/pM` (also `hN-pM`).
    pub fn target_ns(&self, target: &str) -> Option<String> {
        if target == "underlay" || target == "u" {
            return Some(self.underlay_ns());
        }
        if target == "outside" || target == "o" {
            return Some(self.outside_ns());
        }
        let ns = format!("{}{}", self.prefix(), target.replace('/', "-"));
        (self.owns_netns(&ns) && ns != self.underlay_ns() && ns != self.outside_ns()).then_some(ns)
    }
}

/// The segment (0 = A, 1 = B) of host `host` when the underlay has `segments` segments: hosts
/// alternate, h1 on A, h2 on B, h3 on A, ...
pub fn host_segment(host: usize, segments: usize) -> usize {
    (host - 1) % segments.max(1)
}

/// Segment `seg`'s network, e.g. 198.18.1.0/24 for B.
pub fn segment_net(seg: usize) -> Ipv4Network {
    let o = UNDERLAY_NET.octets();
    Ipv4Network::new(Ipv4Addr::new(o[0], o[1], seg as u8, 0), UNDERLAY_PREFIX)
        .expect("a /24 is valid")
}

/// Segment `seg`'s gateway: the underlay namespace's address on it (198.18.<seg>.254).
pub fn segment_gateway(seg: usize) -> Ipv4Addr {
    let o = UNDERLAY_GW.octets();
    Ipv4Addr::new(o[0], o[1], seg as u8, o[3])
}

/// Segment `seg`'s bridge in the underlay namespace: `br0`, `br1`.
pub fn segment_bridge(seg: usize) -> String {
    format!("br{seg}")
}

/// `198.18.<segment>.<host>`: host i keeps its number as the last octet on either segment.
pub fn host_public_ip(host: usize, segments: usize) -> Ipv4Addr {
    assert!((1..=MAX_HOSTS).contains(&host), "host index {host}");
    let o = segment_net(host_segment(host, segments)).network().octets();
    Ipv4Addr::new(o[0], o[1], o[2], host as u8)
}

/// Segment `seg`'s IPv6 network: fd00:198:18:<seg>::/64.
pub fn segment_net6(seg: usize) -> Ipv6Network {
    Ipv6Network::new(
        Ipv6Addr::new(0xfd00, 0x198, 0x18, seg as u16, 0, 0, 0, 0),
        UNDERLAY6_PREFIX,
    )
    .expect("a /64 is valid")
}

/// Address `last` of segment `seg`'s IPv6 network, `last` written in decimal digits read as hex
/// (host 12 is `::12`, not `::c`), so the IPv6 address reads like its IPv4 twin.
fn segment_addr6(seg: usize, last: usize) -> Ipv6Addr {
    let digits = u16::from_str_radix(&last.to_string(), 16).expect("at most 3 decimal digits");
    let s = segment_net6(seg).network().segments();
    Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, digits)
}

/// Segment `seg`'s IPv6 gateway: fd00:198:18:<seg>::254.
pub fn segment_gateway6(seg: usize) -> Ipv6Addr {
    segment_addr6(seg, UNDERLAY_GW.octets()[3] as usize)
}

/// The outside namespace's IPv6 address: fd00:198:18::250.
pub fn outside_ip6() -> Ipv6Addr {
    segment_addr6(0, OUTSIDE_IP.octets()[3] as usize)
}

/// `fd00:198:18:<segment>::<host>`, the IPv6 twin of [`host_public_ip`].
pub fn host_public_ip6(host: usize, segments: usize) -> Ipv6Addr {
    assert!((1..=MAX_HOSTS).contains(&host), "host index {host}");
    segment_addr6(host_segment(host, segments), host)
}

/// The single etcd's endpoint (on the underlay bridge's own address).
pub fn etcd_endpoint() -> String {
    format!("http://{UNDERLAY_GW}:{ETCD_CLIENT_PORT}")
}

/// Member `m` (from 1) of a multi-member etcd: 198.18.0.251, .252, .253.
pub fn etcd_member_ip(m: usize) -> Ipv4Addr {
    assert!((1..=MAX_ETCD_MEMBERS).contains(&m), "etcd member {m}");
    let o = UNDERLAY_NET.octets();
    Ipv4Addr::new(o[0], o[1], o[2], ETCD_MEMBER_BASE + (m as u8 - 1))
}

/// Pod `pod` (from 1) of a host whose bridge holds `bridge` (TWEED_SUBNET, e.g. 10.244.3.1/24)
/// gets the address `pod` above it: .2, .3, ... Errors when the subnet has no room.
pub fn pod_ip(bridge: Ipv4Network, pod: usize) -> Result<Ipv4Network, String> {
    let base = u32::from(bridge.ip());
    let last = u32::from(bridge.broadcast()).saturating_sub(1);
    let ip = u32::try_from(pod)
        .ok()
        .and_then(|p| base.checked_add(p))
        .filter(|ip| *ip <= last && pod > 0)
        .ok_or_else(|| format!("subnet {bridge} has no room for pod {pod}"))?;
    Ipv4Network::new(Ipv4Addr::from(ip), bridge.prefix()).map_err(|e| e.to_string())
}

/// Pod `pod`'s IPv6 address behind a bridge holding `bridge` (TWEED_IPV6_SUBNET, e.g.
/// fd00:10:244:3::1/64): `pod` above it, as [`pod_ip`] does for IPv4.
pub fn pod_ip6(bridge: Ipv6Network, pod: usize) -> Result<Ipv6Network, String> {
    let base = u128::from(bridge.ip());
    let last = u128::from(bridge.broadcast());
    let ip = u128::try_from(pod)
        .ok()
        .and_then(|p| base.checked_add(p))
        .filter(|ip| *ip <= last && pod > 0)
        .ok_or_else(|| format!("subnet {bridge} has no room for pod {pod}"))?;
    Ipv6Network::new(Ipv6Addr::from(ip), bridge.prefix()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_scheme_and_fit() {
        let n = Names::new("demo").unwrap();
        assert_eq!(n.underlay_ns(), "twl-demo-u");
        assert_eq!(n.host_ns(3), "twl-demo-h3");
        assert_eq!(n.pod_ns(3, 2), "twl-demo-h3-p2");
        assert_eq!(n.host(3), "h3");
        assert_eq!(n.pod(2), "p2");
        for name in [n.underlay_veth(MAX_HOSTS), n.pod_veth(253)] {
            assert!(name.len() <= 15, "{name}");
        }
        for name in [UNDERLAY_BRIDGE, HOST_IFACE, POD_BRIDGE, POD_IFACE] {
            assert!(name.len() <= 15);
        }
    }

    #[test]
    fn lab_names_are_validated() {
        for ok in ["a", "demo", "e2e-1", "x1234567890y"] {
            validate_lab_name(ok).unwrap();
        }
        for bad in [
            "",
            "Demo",
            "de_mo",
            "-a",
            "a-",
            "a--b",
            "x1234567890yz",
            "a b",
            "ä",
        ] {
            let e = validate_lab_name(bad).unwrap_err();
            assert!(e.to_string().contains("invalid lab name"), "{e}");
        }
    }

    #[test]
    fn ownership_is_exact_even_with_dashes() {
        let a = Names::new("a").unwrap();
        let ah1 = Names::new("a-h1").unwrap();
        assert!(a.owns_netns("twl-a-u"));
        assert!(a.owns_netns("twl-a-h1"));
        assert!(a.owns_netns("twl-a-h12-p3"));
        assert!(!a.owns_netns("twl-a-h1-u"));
        assert!(!a.owns_netns("twl-a-h1-h2"));
        assert!(!a.owns_netns("twl-a-h"));
        assert!(!a.owns_netns("twl-a-hx"));
        assert!(!a.owns_netns("twl-ab-u"));
        assert!(!a.owns_netns("twl-a-h1-p"));
        assert!(ah1.owns_netns("twl-a-h1-u"));
        assert!(ah1.owns_netns("twl-a-h1-h2-p1"));
        assert!(!ah1.owns_netns("twl-a-h1-p1"));
    }

    #[test]
    fn targets_resolve() {
        let n = Names::new("demo").unwrap();
        assert_eq!(n.target_ns("h2").unwrap(), "twl-demo-h2");
        assert_eq!(n.target_ns("h2/p1").unwrap(), "twl-demo-h2-p1");
        assert_eq!(n.target_ns("h2-p1").unwrap(), "twl-demo-h2-p1");
        assert_eq!(n.target_ns("underlay").unwrap(), "twl-demo-u");
        assert_eq!(n.target_ns("outside").unwrap(), "twl-demo-o");
        assert_eq!(n.target_ns("o").unwrap(), "twl-demo-o");
        assert!(n.owns_netns("twl-demo-o"));
        assert_eq!(n.target_ns("p1"), None);
        assert_eq!(n.target_ns("h2/x"), None);
    }

    #[test]
    fn addressing() {
        assert_eq!(host_public_ip(1, 1), Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(host_public_ip(249, 1), Ipv4Addr::new(198, 18, 0, 249));
        assert_eq!(host_public_ip(2, 1), Ipv4Addr::new(198, 18, 0, 2));
        // Two segments: hosts alternate, keeping their number.
        assert_eq!(host_public_ip(1, 2), Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(host_public_ip(2, 2), Ipv4Addr::new(198, 18, 1, 2));
        assert_eq!(host_public_ip(3, 2), Ipv4Addr::new(198, 18, 0, 3));
        assert_eq!(segment_gateway(1), Ipv4Addr::new(198, 18, 1, 254));
        assert_eq!(segment_net(1).to_string(), "198.18.1.0/24");
        assert_eq!(segment_bridge(1), "br1");
        assert_eq!(etcd_endpoint(), "http://198.18.0.254:2379");
        assert_eq!(etcd_member_ip(1), Ipv4Addr::new(198, 18, 0, 251));
        assert_eq!(etcd_member_ip(3), Ipv4Addr::new(198, 18, 0, 253));
        // Nothing the lab puts on segment A collides with a host.
        for reserved in [OUTSIDE_IP, UNDERLAY_GW, etcd_member_ip(1)] {
            assert!(reserved.octets()[3] as usize > MAX_HOSTS);
        }
        let br: Ipv4Network = "10.244.3.1/24".parse().unwrap();
        assert_eq!(pod_ip(br, 1).unwrap().to_string(), "10.244.3.2/24");
        assert_eq!(pod_ip(br, 253).unwrap().to_string(), "10.244.3.254/24");
        assert!(pod_ip(br, 254).is_err());
        assert!(pod_ip(br, 0).is_err());
        let small: Ipv4Network = "10.244.3.1/30".parse().unwrap();
        assert_eq!(pod_ip(small, 1).unwrap().to_string(), "10.244.3.2/30");
        assert!(pod_ip(small, 2).is_err());
    }

    #[test]
    fn ipv6_addressing_spells_the_ipv4_twin() {
        assert_eq!(host_public_ip6(1, 1).to_string(), "fd00:198:18::1");
        assert_eq!(host_public_ip6(12, 1).to_string(), "fd00:198:18::12");
        assert_eq!(host_public_ip6(249, 1).to_string(), "fd00:198:18::249");
        assert_eq!(host_public_ip6(2, 2).to_string(), "fd00:198:18:1::2");
        assert_eq!(segment_gateway6(0).to_string(), "fd00:198:18::254");
        assert_eq!(segment_gateway6(1).to_string(), "fd00:198:18:1::254");
        assert_eq!(outside_ip6().to_string(), "fd00:198:18::250");
        assert_eq!(segment_net6(1).to_string(), "fd00:198:18:1::/64");
        // Distinct for every host, and never one of the reserved addresses.
        let all: std::collections::HashSet<_> =
            (1..=MAX_HOSTS).map(|h| host_public_ip6(h, 1)).collect();
        assert_eq!(all.len(), MAX_HOSTS);
        assert!(!all.contains(&segment_gateway6(0)) && !all.contains(&outside_ip6()));
        let br: Ipv6Network = "fd00:10:244:3::1/64".parse().unwrap();
        assert_eq!(pod_ip6(br, 1).unwrap().to_string(), "fd00:10:244:3::2/64");
        assert!(pod_ip6(br, 0).is_err());
        let tiny: Ipv6Network = "fd00:10:244:3::1/126".parse().unwrap();
        assert_eq!(
            pod_ip6(tiny, 2).unwrap().to_string(),
            "fd00:10:244:3::3/126"
        );
        assert!(pod_ip6(tiny, 3).is_err());
    }
}
