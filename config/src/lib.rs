//! tweed's on-disk and on-the-wire formats, parsed and validated without I/O side effects beyond
//! reading and writing the file named by the caller.
//!
//! Everything here is flannel-compatible on purpose: tweed and flannel nodes share one etcd, and the
//! CNI plugin reads a flannel node's `subnet.env`.

pub mod agent_file;
pub mod lease;
pub mod network;
pub mod subnet_env;

pub use lease::{
    Ipv6OnlyKey, Ipv6OnlyPeer, LeaseAttrs, LeaseKey, LeaseRejection, PeerIpv6, SubnetKey,
};
pub use network::{
    BackendConfig, Ipv6Config, Ipv6OnlyNetwork, NetworkConfig, ParsedNetwork, WireguardConfig,
    WireguardMode,
};
pub use subnet_env::{SubnetEnv, SubnetEnvV4, SubnetEnvV6};
