//! The node's share of the overlay, as the agent wrote it to subnet.env: the overlay network,
//! this node's subnet and gateway, the MTU, and from them the address pool and the bridge.

use std::path::{Path, PathBuf};

use ipnetwork::{Ipv4Network, Ipv6Network};
use tweed_config::subnet_env::SubnetEnvError;
use tweed_config::SubnetEnv;

use crate::code;
use crate::conf::NetConf;
use crate::ipam::{IpamError, Pool, Pool6};
use crate::plan::{bridge_mac6, mac_for_ip, BridgeWant};

pub const DEFAULT_SUBNET_FILE: &str = "/run/tweed/subnet.env";
/// Tried when `subnetFile` is not set and tweed's own file is absent: a flannel node.
pub const FLANNEL_SUBNET_FILE: &str = "/run/flannel/subnet.env";

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(
        "tweed is not ready on this node: {} is missing ({reason}); tweedd writes it once it holds \
         a subnet lease (is tweedd, or flanneld, running?)",
        path.display()
    )]
    NotReady { path: PathBuf, reason: String },
    #[error("subnet.env {}: {reason}", path.display())]
    SubnetEnv { path: PathBuf, reason: String },
}

impl NodeError {
    pub fn code(&self) -> u32 {
        match self {
            NodeError::NotReady { .. } => code::TRY_AGAIN_LATER,
            NodeError::SubnetEnv { .. } => code::INVALID_CONFIG,
        }
    }
}

/// `configured` when set; otherwise tweed's default, or flannel's when only that `exists`.
pub fn subnet_file(configured: Option<&Path>, exists: impl Fn(&Path) -> bool) -> PathBuf {
    match configured {
        Some(p) => p.to_path_buf(),
        None => {
            let tweed = Path::new(DEFAULT_SUBNET_FILE);
            let flannel = Path::new(FLANNEL_SUBNET_FILE);
            if !exists(tweed) && exists(flannel) {
                flannel.to_path_buf()
            } else {
                tweed.to_path_buf()
            }
        }
    }
}

/// A subnet.env that could not be read: "missing" (the agent has not written it yet: try again
/// later) told apart from "broken".
pub fn subnet_env_error(path: &Path, e: SubnetEnvError) -> NodeError {
    match e {
        SubnetEnvError::Io { path, source } if source.kind() == std::io::ErrorKind::NotFound => {
            NodeError::NotReady {
                path,
                reason: source.to_string(),
            }
        }
        other => NodeError::SubnetEnv {
            path: path.to_path_buf(),
            reason: other.to_string(),
        },
    }
}

/// What a verb needs to know about the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The IPv4 share (subnet.env's `*_NETWORK` / `*_SUBNET`); `None` on an IPv6-only node.
    pub v4: Option<Node4>,
    /// `mtu` of the configuration, else subnet.env's.
    pub mtu: u32,
    /// The IPv6 share (subnet.env's `*_IPV6_NETWORK` / `*_IPV6_SUBNET`); `None` on a v4-only
    /// node. subnet.env has at least one of the two.
    pub v6: Option<Node6>,
}

/// The node's IPv4 share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Node4 {
    /// The whole overlay, e.g. 10.244.0.0/16: containers route it through the bridge.
    pub network: Ipv4Network,
    /// The gateway with the node subnet's prefix, e.g. 10.244.3.1/24: the bridge's address.
    pub gateway: Ipv4Network,
    /// The node subnet itself, e.g. 10.244.3.0/24.
    pub subnet: Ipv4Network,
}

/// The node's IPv6 share, as [`Node4`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Node6 {
    pub network: Ipv6Network,
    /// The first address with the subnet's prefix, e.g. `fd00:10:244:3::1/64`: on the bridge.
    pub gateway: Ipv6Network,
    pub subnet: Ipv6Network,
}

impl Node {
    pub fn new(env: &SubnetEnv, conf: &NetConf) -> Node {
        Node {
            v4: env.ipv4.map(|v4| Node4 {
                network: v4.network,
                gateway: v4.subnet,
                subnet: v4.node_subnet(),
            }),
            mtu: conf.mtu.unwrap_or(env.mtu),
            v6: env.ipv6.map(|v6| Node6 {
                network: v6.network,
                gateway: v6.subnet,
                subnet: v6.node_subnet(),
            }),
        }
    }

    /// The IPv4 pool when this attachment gets an IPv4 address: `ranges` has an IPv4 set, or
    /// (no `ranges`) subnet.env has the IPv4 pair. It is the node subnet, narrowed by
    /// `rangeStart`/`rangeEnd` or by the IPv4 set of `ranges`, which must name this node's
    /// subnet (and gateway, if it names one).
    pub fn pool(&self, conf: &NetConf) -> Result<Option<Pool>, IpamError> {
        let spec = match conf.ranges {
            Some(r) => match r.v4 {
                Some(spec) => Some(spec),
                None => return Ok(None),
            },
            None => None,
        };
        let Some(n4) = self.v4 else {
            return match spec {
                Some(s) => Err(IpamError::Range(format!(
                    "\"ranges\" asks for IPv4 ({}), but this node's subnet.env has no IPv4 \
                     subnet (TWEED_SUBNET / FLANNEL_SUBNET): is EnableIPv4 set?",
                    s.subnet
                ))),
                // rangeStart/rangeEnd are IPv4 addresses: set on an IPv6-only node, they ask
                // for a family the node has not.
                None if conf.range_start.is_some() || conf.range_end.is_some() => {
                    Err(IpamError::Range(
                        "rangeStart/rangeEnd narrow the IPv4 pool, but this node's subnet.env \
                         has no IPv4 subnet (TWEED_SUBNET / FLANNEL_SUBNET)"
                            .into(),
                    ))
                }
                None => Ok(None),
            };
        };
        let (start, end) = match spec {
            Some(r) => {
                same_subnet(r.subnet, n4.subnet, r.gateway, n4.gateway.ip())?;
                (r.start, r.end)
            }
            None => (conf.range_start, conf.range_end),
        };
        Pool::new(n4.subnet, n4.gateway.ip(), start, end).map(Some)
    }

    /// The IPv6 pool when this attachment gets an IPv6 address: `ranges` has an IPv6 set, or
    /// (no `ranges`) subnet.env has the IPv6 pair. `ranges` asking for IPv6 on a node without an
    /// IPv6 lease, or for another subnet than the node's, is a configuration error: an address
    /// outside the node's lease would be unreachable from the other nodes.
    pub fn pool6(&self, conf: &NetConf) -> Result<Option<Pool6>, IpamError> {
        let spec = match conf.ranges {
            Some(r) => match r.v6 {
                Some(spec) => Some(spec),
                None => return Ok(None),
            },
            None => None,
        };
        let Some(n6) = self.v6 else {
            return match spec {
                Some(s) => Err(IpamError::Range(format!(
                    "\"ranges\" asks for IPv6 ({}), but this node's subnet.env has no IPv6 \
                     subnet (TWEED_IPV6_SUBNET / FLANNEL_IPV6_SUBNET): is EnableIPv6 set and \
                     does the node have an IPv6 lease?",
                    s.subnet
                ))),
                None => Ok(None),
            };
        };
        let (start, end) = match spec {
            Some(s) => {
                same_subnet(s.subnet, n6.subnet, s.gateway, n6.gateway.ip())?;
                (s.start, s.end)
            }
            None => (None, None),
        };
        Pool::new(n6.subnet, n6.gateway.ip(), start, end).map(Some)
    }

    /// The bridge with no gateway address yet (ADD adds those of the families the attachment
    /// has). Its MAC comes from the node, IPv4 gateway first, so attachments of different
    /// families on one node agree on it.
    pub fn bridge(&self, conf: &NetConf) -> BridgeWant {
        let mac = match (self.v4, self.v6) {
            (Some(n4), _) => mac_for_ip(n4.gateway.ip()),
            (None, Some(n6)) => bridge_mac6(n6.gateway.ip()),
            // Not met: subnet.env is parsed with at least one family.
            (None, None) => bridge_mac6(std::net::Ipv6Addr::UNSPECIFIED),
        };
        BridgeWant::new(&conf.bridge, self.mtu, mac)
    }
}

/// A `ranges` set must name the node's own subnet and gateway: the lease is the node's only
/// share of the overlay.
fn same_subnet<N: PartialEq + std::fmt::Display, A: PartialEq + std::fmt::Display>(
    asked: N,
    node: N,
    gateway: Option<A>,
    node_gateway: A,
) -> Result<(), IpamError> {
    if asked != node {
        return Err(IpamError::Range(format!(
            "\"ranges\" names subnet {asked}, but this node's subnet is {node}"
        )));
    }
    match gateway {
        Some(g) if g != node_gateway => Err(IpamError::Range(format!(
            "\"ranges\" names gateway {g}, but this node's gateway (the bridge's address) is \
             {node_gateway}"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: &str) -> NetConf {
        NetConf::parse(format!(r#"{{"cniVersion":"1.0.0","name":"n"{extra}}}"#).as_bytes()).unwrap()
    }

    fn env() -> SubnetEnv {
        SubnetEnv::parse(
            Path::new("/s"),
            "TWEED_NETWORK=10.244.0.0/16\nTWEED_SUBNET=10.244.3.1/24\nTWEED_MTU=1450\n",
        )
        .unwrap()
    }

    #[test]
    fn the_configured_file_then_tweeds_then_flannels() {
        let x = Path::new("/x/subnet.env");
        assert_eq!(subnet_file(Some(x), |_| false), x);
        assert_eq!(subnet_file(None, |_| true), Path::new(DEFAULT_SUBNET_FILE));
        assert_eq!(subnet_file(None, |_| false), Path::new(DEFAULT_SUBNET_FILE));
        let only_flannel = |p: &Path| p == Path::new(FLANNEL_SUBNET_FILE);
        assert_eq!(
            subnet_file(None, only_flannel),
            Path::new(FLANNEL_SUBNET_FILE)
        );
    }

    /// A flannel dual-stack node's file: the plugin reads it and sets up exactly the IPv4 node
    /// it did before, plus the IPv6 half.
    #[test]
    fn flannels_dual_stack_file_gives_the_same_ipv4_node() {
        let p = Path::new(FLANNEL_SUBNET_FILE);
        let v4 = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
        let dual = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:3::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
        let (e4, e6) = (
            SubnetEnv::parse(p, v4).unwrap(),
            SubnetEnv::parse(p, dual).unwrap(),
        );
        let c = conf("");
        let (mut n6, n4) = (Node::new(&e6, &c), Node::new(&e4, &c));
        assert!(n4.v6.is_none() && n6.v6.is_some());
        assert_eq!(n4.pool6(&c).unwrap(), None);
        let p6 = n6.pool6(&c).unwrap().unwrap();
        assert_eq!(p6.gateway.to_string(), "fd00:10:244:3::1");
        assert_eq!(p6.start.to_string(), "fd00:10:244:3::1");
        n6.v6 = None;
        assert_eq!(n6, n4);
        assert_eq!(
            Node::new(&e6, &c).pool(&c).unwrap().unwrap(),
            Node::new(&e4, &c).pool(&c).unwrap().unwrap()
        );
        let v6 = e6.ipv6.expect("the IPv6 pair is parsed");
        assert_eq!(v6.node_subnet().to_string(), "fd00:10:244:3::/64");
        assert_eq!(v6.subnet.ip().to_string(), "fd00:10:244:3::1");
        // A broken IPv6 half is a broken file (INVALID_CONFIG naming flannel's key), not a
        // silently v4-only node.
        for (bad, key) in [
            (
                "FLANNEL_IPV6_SUBNET=fd00:10:244:3::1/64\n",
                "FLANNEL_IPV6_NETWORK",
            ),
            (
                "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd01::1/64\n",
                "FLANNEL_IPV6_SUBNET",
            ),
            (
                "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=10.244.3.1/24\n",
                "FLANNEL_IPV6_SUBNET",
            ),
        ] {
            let e = subnet_env_error(p, SubnetEnv::parse(p, &format!("{v4}{bad}")).unwrap_err());
            assert_eq!(e.code(), code::INVALID_CONFIG, "{bad}");
            assert!(e.to_string().contains(key), "{bad}: {e}");
        }
    }

    #[test]
    fn missing_is_not_ready_and_broken_is_invalid() {
        let p = Path::new("/run/tweed/subnet.env");
        let missing = SubnetEnvError::Io {
            path: p.into(),
            source: std::io::ErrorKind::NotFound.into(),
        };
        let e = subnet_env_error(p, missing);
        assert_eq!(e.code(), code::TRY_AGAIN_LATER);
        assert!(
            e.to_string().contains("/run/tweed/subnet.env is missing"),
            "{e}"
        );
        let broken = SubnetEnv::parse(p, "TWEED_MTU=big\n").unwrap_err();
        let e = subnet_env_error(p, broken);
        assert_eq!(e.code(), code::INVALID_CONFIG);
        let denied = SubnetEnvError::Io {
            path: p.into(),
            source: std::io::ErrorKind::PermissionDenied.into(),
        };
        assert_eq!(subnet_env_error(p, denied).code(), code::INVALID_CONFIG);
    }

    #[test]
    fn the_configured_mtu_wins_and_the_pool_skips_the_gateway() {
        let n = Node::new(&env(), &conf(""));
        let n4 = n.v4.unwrap();
        assert_eq!(n.mtu, 1450);
        assert_eq!(n4.subnet, "10.244.3.0/24".parse().unwrap());
        let p = n.pool(&conf("")).unwrap().unwrap();
        assert!(!p.contains(n4.gateway.ip()));
        assert_eq!(Node::new(&env(), &conf(r#","mtu":1400"#)).mtu, 1400);
        let b = n.bridge(&conf(r#","bridge":"br9""#));
        assert_eq!(b.name, "br9");
        assert_eq!(b.mac, mac_for_ip(n4.gateway.ip()));
        let outside = conf(r#","rangeStart":"10.244.9.1""#);
        assert_eq!(n.pool(&outside).unwrap_err().code(), code::INVALID_CONFIG);
    }

    fn dual_env() -> SubnetEnv {
        SubnetEnv::parse(
            Path::new("/s"),
            "TWEED_NETWORK=10.244.0.0/16\nTWEED_SUBNET=10.244.3.1/24\nTWEED_IPV6_NETWORK=fd00:10:244::/56\nTWEED_IPV6_SUBNET=fd00:10:244:3::1/64\nTWEED_MTU=1450\n",
        )
        .unwrap()
    }

    /// `ranges` decides the families; each set must be this node's own subnet and gateway.
    #[test]
    fn ranges_pick_the_families_and_must_name_the_nodes_subnets() {
        let r = |sets: &str| conf(&format!(r#","ranges":{sets}"#));
        let both = r(
            r#"[[{"subnet":"10.244.3.0/24"}],[{"subnet":"fd00:10:244:3::/64","rangeStart":"fd00:10:244:3::100"}]]"#,
        );
        let n = Node::new(&dual_env(), &both);
        assert_eq!(n.pool(&both).unwrap(), n.pool(&conf("")).unwrap());
        assert!(n.pool(&both).unwrap().is_some());
        assert_eq!(
            n.pool6(&both).unwrap().unwrap().start.to_string(),
            "fd00:10:244:3::100"
        );
        // Only an IPv4 set on a dual-stack node: a v4-only attachment.
        let v4 = r(r#"[[{"subnet":"10.244.3.0/24","rangeStart":"10.244.3.50"}]]"#);
        assert_eq!(n.pool6(&v4).unwrap(), None);
        assert_eq!(
            n.pool(&v4).unwrap().unwrap().start.to_string(),
            "10.244.3.50"
        );
        // Only an IPv6 set on a dual-stack node: a v6-only attachment.
        let v6 = r(r#"[[{"subnet":"fd00:10:244:3::/64"}]]"#);
        assert_eq!(n.pool(&v6).unwrap(), None);
        assert!(n.pool6(&v6).unwrap().is_some());
        // An IPv6 set on a v4-only node.
        let e = Node::new(&env(), &both).pool6(&both).unwrap_err();
        assert_eq!(e.code(), code::INVALID_CONFIG);
        assert!(e.to_string().contains("no IPv6 subnet"), "{e}");
        for (sets, needle) in [
            // Another node's IPv6 subnet, inside the overlay network.
            (
                r#"[[{"subnet":"10.244.3.0/24"}],[{"subnet":"fd00:10:244:4::/64"}]]"#,
                "fd00:10:244:4::/64",
            ),
            // The whole overlay network rather than the node's share.
            (
                r#"[[{"subnet":"10.244.3.0/24"}],[{"subnet":"fd00:10:244::/56"}]]"#,
                "fd00:10:244::/56",
            ),
            // Outside the network altogether.
            (
                r#"[[{"subnet":"10.244.3.0/24"}],[{"subnet":"2001:db8::/64"}]]"#,
                "2001:db8::/64",
            ),
            (
                r#"[[{"subnet":"10.244.3.0/24"}],[{"subnet":"fd00:10:244:3::/64","gateway":"fd00:10:244:3::9"}]]"#,
                "gateway fd00:10:244:3::9",
            ),
        ] {
            let e = n.pool6(&r(sets)).unwrap_err();
            assert_eq!(e.code(), code::INVALID_CONFIG, "{sets}");
            assert!(e.to_string().contains(needle), "{sets}: {e}");
        }
        for sets in [
            r#"[[{"subnet":"10.244.4.0/24"}]]"#,
            r#"[[{"subnet":"10.244.3.0/24","gateway":"10.244.3.7"}]]"#,
        ] {
            assert_eq!(
                n.pool(&r(sets)).unwrap_err().code(),
                code::INVALID_CONFIG,
                "{sets}"
            );
        }
    }

    fn v6_only_env() -> SubnetEnv {
        SubnetEnv::parse(
            Path::new("/run/flannel/subnet.env"),
            "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:3::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap()
    }

    /// An IPv6-only node (flannel's file with EnableIPv4 false): IPv6 pool only; an IPv4 set
    /// in `ranges` is refused naming the missing key; the bridge's MAC follows the IPv6 gateway.
    #[test]
    fn ipv6_only_node_pools_only_ipv6() {
        let c = conf("");
        let n = Node::new(&v6_only_env(), &c);
        assert_eq!(n.v4, None);
        assert_eq!(n.pool(&c).unwrap(), None);
        let p6 = n.pool6(&c).unwrap().unwrap();
        assert_eq!(p6.start.to_string(), "fd00:10:244:3::1");
        assert!(!p6.contains("fd00:10:244:3::1".parse().unwrap()));
        assert_eq!(n.bridge(&c).mac.to_string(), "0e:58:00:00:00:01");
        let only6 = conf(r#","ranges":[[{"subnet":"fd00:10:244:3::/64"}]]"#);
        assert_eq!(n.pool(&only6).unwrap(), None);
        assert!(n.pool6(&only6).unwrap().is_some());
        let asks4 =
            conf(r#","ranges":[[{"subnet":"10.244.3.0/24"}],[{"subnet":"fd00:10:244:3::/64"}]]"#);
        let e = n.pool(&asks4).unwrap_err();
        assert_eq!(e.code(), code::INVALID_CONFIG);
        assert!(
            e.to_string().contains("no IPv4 subnet (TWEED_SUBNET"),
            "{e}"
        );
        // rangeStart/rangeEnd are IPv4's: on an IPv6-only node they ask for what is not there.
        let old = conf(r#","rangeStart":"10.244.3.5""#);
        let e = n.pool(&old).unwrap_err();
        assert!(e.to_string().contains("rangeStart/rangeEnd"), "{e}");
    }
}
