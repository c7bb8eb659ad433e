//! The wireguard backend: flannel's `"Backend":{"Type":"wireguard"}`, so tweed and flannel nodes
//! in one network reach each other encrypted.
//!
//! Each node has one key pair ([`key`]); its lease carries `{"PublicKey","Port"}`; each peer
//! lease becomes a WireGuard peer with the peer's subnet as allowed IPs and its
//! `PublicIP:Port` as endpoint ([`plan`]). The device holds the subnet's network address as
//! /32, one route for the whole network, and MTU = MTU − 80.

pub mod kernel;
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

/// The running wireguard data plane. On this path the udp backend's workers carry the packets
/// (TUN device [`DEVICE`], the listen port), sealing and opening each datagram with the
/// [`userspace::WgTable`] published next to their routing table.
pub struct WgBackend {
    cfg: WgConfig,
    udp: crate::backend::UdpBackend,
    table: std::sync::Arc<userspace::WgTable>,
    /// The device as last published; the plan against it decides whether anything changes.
    applied: plan::DeviceSpec,
    published: bool,
}

impl std::fmt::Debug for WgBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgBackend")
            .field("implementation", &"userspace")
            .field("peers", &self.applied.peers.len())
            .finish()
    }
}

impl WgBackend {
    /// Chooses the implementation and sets the device up. Only the userspace one is built: a
    /// host with the kernel module still gets the userspace path under `auto`, and `kernel`
    /// is refused with that reason.
    pub async fn setup(
        nl: &crate::netlink::Netlink,
        cfg: WgConfig,
    ) -> Result<WgBackend, crate::backend::BackendError> {
        if cfg.implementation == WgImpl::Kernel {
            return Err(WgError::Unavailable(
                "kernel",
                "this build drives only the userspace implementation; use --wireguard-impl=userspace or auto".into(),
            )
            .into());
        }
        let udp_cfg = crate::backend::UdpConfig {
            network: cfg.network,
            own_subnet: cfg.own_subnet,
            local_ip: cfg.local_ip,
            port: cfg.listen_port,
            underlay_mtu: cfg.underlay_mtu,
            mtu_override: Some(cfg.mtu()),
            queues: cfg.queues,
            // The peer table comes from the leases' keys; a stored copy could not open packets
            // before the handshake anyway.
            peers_file: None,
            device: DEVICE,
        };
        let udp = crate::backend::UdpBackend::setup(nl, udp_cfg).await?;
        tracing::info!(
            implementation = "userspace",
            device = DEVICE,
            port = cfg.listen_port,
            public_key = %cfg.public_key(),
            mtu = cfg.mtu(),
            "wireguard: data plane running"
        );
        let table = std::sync::Arc::new(userspace::WgTable::new(&cfg.private_key));
        Ok(WgBackend {
            cfg,
            udp,
            table,
            applied: plan::DeviceSpec::default(),
            published: false,
        })
    }

    /// Uses `key` from the next [`reconcile`](Self::reconcile) on: the device op it plans
    /// publishes a table of fresh sessions under the new key (every peer handshakes again).
    pub fn set_private_key(&mut self, key: PrivateKey) {
        self.cfg.private_key = key;
    }

    pub fn public_key(&self) -> PublicKey {
        self.cfg.public_key()
    }

    pub fn config_port(&self) -> u16 {
        self.cfg.listen_port
    }

    pub fn implementation(&self) -> &'static str {
        "userspace"
    }

    pub fn mtu(&self) -> u32 {
        self.cfg.mtu()
    }

    pub fn ifindex(&self) -> u32 {
        self.udp.ifindex()
    }

    pub fn resync(&mut self) {
        self.udp.resync();
    }

    pub async fn stop(&mut self) {
        self.udp.stop().await;
    }

    pub fn stats(&self) -> crate::backend::udp::io::Stats {
        self.udp.stats()
    }

    /// Per peer: public key, endpoint, subnet, time since the last handshake, bytes out and in.
    pub fn peer_stats(&self) -> Vec<PeerStats> {
        self.table
            .peers()
            .iter()
            .map(|p| {
                let (age, tx, rx) = p.stats();
                PeerStats {
                    public_key: p.spec.public_key,
                    endpoint: p.spec.endpoint,
                    subnet: p.spec.allowed_ips.first().copied(),
                    last_handshake: age,
                    tx_bytes: tx as u64,
                    rx_bytes: rx as u64,
                }
            })
            .collect()
    }

    /// Makes the device hold exactly the peers `peers` call for; publishes a new table to the
    /// workers only when the plan has ops.
    pub async fn reconcile(
        &mut self,
        nl: &crate::netlink::Netlink,
        peers: &[WgPeer],
    ) -> Result<crate::backend::ReconcileStats, crate::backend::BackendError> {
        let (specs, skipped) = plan::desired_peers(&self.cfg.local(), peers);
        let desired = plan::device_spec(
            *self.cfg.private_key.bytes(),
            self.cfg.listen_port,
            specs.clone(),
        );
        let ops = plan::plan(&self.applied, &desired);
        let udp_peers: Vec<crate::backend::UdpPeer> = specs
            .iter()
            .filter_map(|s| {
                Some(crate::backend::UdpPeer {
                    subnet: *s.allowed_ips.first()?,
                    public_ip: *s.endpoint?.ip(),
                    port: s.endpoint?.port(),
                })
            })
            .collect();
        let wg = (!ops.is_empty() || !self.published).then(|| {
            self.table = std::sync::Arc::new(self.table.update(&self.cfg.private_key, &specs));
            self.table.clone()
        });
        if wg.is_some() {
            tracing::debug!(ops = ?ops, "wireguard: peers updated");
        }
        let mut stats = self.udp.reconcile_with(nl, &udp_peers, wg.clone()).await?;
        if wg.is_some() {
            stats.ops_applied += ops.len();
            plan::apply_to(&mut self.applied, &ops);
            self.published = true;
        }
        stats.skipped.extend(skipped);
        Ok(stats)
    }
}

/// One peer's figures for metrics and `tweedctl net peers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStats {
    pub public_key: PublicKey,
    pub endpoint: Option<std::net::SocketAddrV4>,
    pub subnet: Option<Ipv4Network>,
    pub last_handshake: Option<std::time::Duration>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}
