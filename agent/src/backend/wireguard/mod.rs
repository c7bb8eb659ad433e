//! The wireguard backend: flannel's `"Backend":{"Type":"wireguard"}`, so tweed and flannel nodes
//! in one network reach each other encrypted.
//!
//! Each node has one key pair ([`key`]); its lease carries `{"PublicKey","Port"}`; each peer
//! lease becomes a WireGuard peer with the peer's subnet as allowed IPs and its
//! `PublicIP:Port` as endpoint ([`plan`]). The device holds the subnet's network address as
//! /32, one route for the whole network, and MTU = MTU − 80.

pub mod key;
pub mod plan;
pub mod userspace;

use std::path::PathBuf;

use ipnetwork::Ipv4Network;
use std::net::Ipv4Addr;

pub use key::{KeyError, PrivateKey, PublicKey};
pub use plan::{WgOp, WgPeer};

/// The device's name (flannel's is `flannel-wg`; a node switching from flannel gets a device of
/// its own, and flannel's is removed as a foreign backend's leftover).
pub const DEVICE: &str = "tweed-wg";

/// Which WireGuard runs the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WgImpl {
    /// The kernel's when it has the module, else the userspace one.
    #[default]
    Auto,
    Kernel,
    Userspace,
}

impl std::str::FromStr for WgImpl {
    type Err = String;
    fn from_str(s: &str) -> Result<WgImpl, String> {
        match s {
            "auto" => Ok(WgImpl::Auto),
            "kernel" => Ok(WgImpl::Kernel),
            "userspace" => Ok(WgImpl::Userspace),
            other => Err(format!("{other:?} is not one of auto, kernel, userspace")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WgError {
    #[error(transparent)]
    Key(#[from] KeyError),

    #[error(
        "wireguard: MTU {mtu} left for {DEVICE} is below the IPv4 minimum of 68 \
         (configured/underlay MTU {base}, WireGuard needs 80 bytes of it)"
    )]
    Mtu { mtu: u32, base: u32 },

    #[error("wireguard: the {0} implementation is not available on this host: {1}")]
    Unavailable(&'static str, String),
}

/// Everything the backend needs, fixed before the lease is acquired (the lease carries the
/// public key and port).
#[derive(Debug, Clone)]
pub struct WgConfig {
    pub network: Ipv4Network,
    pub own_subnet: Ipv4Network,
    /// The underlay interface's address: the UDP socket binds to it.
    pub local_ip: Ipv4Addr,
    /// The lease's PublicIP.
    pub public_ip: Ipv4Addr,
    pub listen_port: u16,
    pub underlay_mtu: u32,
    /// The net-conf `MTU`; 0 is the underlay's.
    pub mtu_base: u32,
    pub psk: Option<[u8; 32]>,
    pub keepalive: u16,
    pub key_path: PathBuf,
    pub private_key: PrivateKey,
    pub implementation: WgImpl,
    /// Userspace: worker threads (the udp backend's `--udp-workers`).
    pub queues: usize,
}

impl WgConfig {
    /// The device's MTU and the pods' (subnet.env's).
    pub fn mtu(&self) -> u32 {
        plan::device_mtu(self.mtu_base, self.underlay_mtu)
    }

    pub fn check_mtu(&self) -> Result<(), WgError> {
        if self.mtu() < 68 {
            return Err(WgError::Mtu {
                mtu: self.mtu(),
                base: if self.mtu_base != 0 {
                    self.mtu_base
                } else {
                    self.underlay_mtu
                },
            });
        }
        Ok(())
    }

    pub fn public_key(&self) -> PublicKey {
        self.private_key.public()
    }

    pub fn local(&self) -> plan::Local {
        plan::Local {
            network: self.network,
            own_subnet: self.own_subnet,
            public_ip: self.public_ip,
            public_key: self.public_key(),
            psk: self.psk,
            keepalive: self.keepalive,
        }
    }

    pub fn link_spec(&self) -> plan::LinkSpec {
        plan::LinkSpec {
            network: self.network,
            own_subnet: self.own_subnet,
            mtu: self.mtu(),
        }
    }
}
