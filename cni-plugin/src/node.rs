//! The node's share of the overlay, as the agent wrote it to subnet.env: the overlay network,
//! this node's subnet and gateway, the MTU, and from them the address pool and the bridge.

use std::path::{Path, PathBuf};

use ipnetwork::Ipv4Network;
use tweed_config::subnet_env::SubnetEnvError;
use tweed_config::SubnetEnv;

use crate::code;
use crate::conf::NetConf;
use crate::ipam::{IpamError, Pool};
use crate::plan::BridgeWant;

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
    /// The whole overlay, e.g. 10.244.0.0/16: containers route it through the bridge.
    pub network: Ipv4Network,
    /// The gateway with the node subnet's prefix, e.g. 10.244.3.1/24: the bridge's address.
    pub gateway: Ipv4Network,
    /// The node subnet itself, e.g. 10.244.3.0/24.
    pub subnet: Ipv4Network,
    /// `mtu` of the configuration, else subnet.env's.
    pub mtu: u32,
}

impl Node {
    pub fn new(env: &SubnetEnv, conf: &NetConf) -> Node {
        Node {
            network: env.network,
            gateway: env.subnet,
            subnet: env.node_subnet(),
            mtu: conf.mtu.unwrap_or(env.mtu),
        }
    }

    pub fn pool(&self, conf: &NetConf) -> Result<Pool, IpamError> {
        Pool::new(
            self.subnet,
            self.gateway.ip(),
            conf.range_start,
            conf.range_end,
        )
    }

    pub fn bridge(&self, conf: &NetConf) -> BridgeWant {
        BridgeWant::new(&conf.bridge, self.mtu, self.gateway)
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

    /// A flannel dual-stack node's file: the plugin reads it (the IPv6 pair parsed and kept for
    /// the dual-stack IPAM to come) and sets up exactly the IPv4 node it did before.
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
        assert_eq!(Node::new(&e6, &c), Node::new(&e4, &c));
        assert_eq!(
            Node::new(&e6, &c).pool(&c).unwrap(),
            Node::new(&e4, &c).pool(&c).unwrap()
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
        assert_eq!(n.mtu, 1450);
        assert_eq!(n.subnet, "10.244.3.0/24".parse().unwrap());
        let p = n.pool(&conf("")).unwrap();
        assert!(!p.contains(n.gateway.ip()));
        assert_eq!(Node::new(&env(), &conf(r#","mtu":1400"#)).mtu, 1400);
        let b = n.bridge(&conf(r#","bridge":"br9""#));
        assert_eq!((b.name.as_str(), b.gateway), ("br9", n.gateway));
        let outside = conf(r#","rangeStart":"10.244.9.1""#);
        assert_eq!(n.pool(&outside).unwrap_err().code(), code::INVALID_CONFIG);
    }
}
