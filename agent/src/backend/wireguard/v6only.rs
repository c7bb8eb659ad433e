//! wireguard in an IPv6-only network (`EnableIPv4: false`, docs/ipv6.md "IPv6-only networks"):
//! one device [`DEVICE`] holding our IPv6 subnet's address as /128 and the `IPv6Network`
//! route, an IPv6-only socket on `[::]:port`, each peer an entry whose allowed IPs are its IPv6
//! subnet at `[PublicIPv6]:Port`.
//!
//! The userspace engine of the dual-stack path runs it unchanged (the udp backend's workers
//! sealing with a [`WgTable`], as `separate`'s `tweed-wg-v6`): the workers' peer table knows
//! nodes by an IPv4 address, which no node of this network has, so each peer is filed under a
//! key of its own from 240.0.0.0/4 ([`route_key`]). Such a key only names the entry: a sealed
//! datagram always goes to the entry's IPv6 endpoint, the device has no IPv4 address or route,
//! and a packet that no entry's allowed IPs hold is dropped, never sent in clear.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV6};
use std::sync::Arc;

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};

use super::dual::{self, WgPeer6};
use super::key::{PrivateKey, PublicKey};
use super::plan::{self, DeviceSpec, PeerSpec};
use super::userspace::WgTable;
use super::{WgError, DEVICE};
use crate::backend::{BackendError, UdpBackend, UdpConfig, UdpPeer, UdpPeer6, V6Spec};
use crate::netlink::{Netlink, Op};

/// The reserved (class E) block the peers' routing keys come from: never an address of a
/// node, never routed.
fn keys() -> Ipv4Network {
    Ipv4Network::new(Ipv4Addr::new(240, 0, 0, 0), 4).expect("a valid prefix")
}

/// Everything the device needs but the leases.
#[derive(Debug, Clone)]
pub struct WgV6Config {
    pub network: Ipv6Network,
    /// The port we listen on and publish (`Mode` picks it: see docs/wireguard.md).
    pub listen_port: u16,
    pub underlay_mtu: u32,
    /// The net-conf `MTU`; 0 is the underlay's.
    pub mtu_base: u32,
    pub psk: Option<[u8; 32]>,
    pub keepalive: u16,
    pub private_key: PrivateKey,
    pub queues: usize,
}

impl WgV6Config {
    /// The device's MTU and the pods' (subnet.env's): the same 80 bytes as on the IPv4
    /// underlay (40 of IPv6 header, 8 of UDP, 32 of WireGuard).
    pub fn mtu(&self) -> u32 {
        plan::device_mtu(self.mtu_base, self.underlay_mtu)
    }

    pub fn public_key(&self) -> PublicKey {
        self.private_key.public()
    }
}

/// Peers a plan left out, each with why.
pub type Skipped = Vec<(Ipv6Network, String)>;

/// The routing key of the `i`-th peer (in the plan's order).
pub fn route_key(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(keys().network()) + 1 + i as u32)
}

/// The device's entries for `peers`, each with its routing key, and the peers left out with
/// why: one of ours (our subnet, our `PublicIPv6`, our key), an endpoint that is no
/// endpoint, a subnet outside `network`, or a key or subnet an earlier (older) peer holds.
/// One entry per key and per subnet, so each lease's traffic is sealed for that lease only.
pub fn plan_peers(
    cfg: &WgV6Config,
    own_subnet: Ipv6Network,
    own_public_ipv6: std::net::Ipv6Addr,
    peers: &[WgPeer6],
) -> (Vec<(PeerSpec, Ipv4Addr)>, Skipped) {
    let own = cfg.public_key();
    let mut out: Vec<(PeerSpec, Ipv4Addr)> = Vec::new();
    let mut skipped = Vec::new();
    for p in peers {
        let subnet = match Ipv6Network::new(p.subnet.network(), p.subnet.prefix()) {
            Ok(s) => s,
            Err(e) => {
                skipped.push((p.subnet, e.to_string()));
                continue;
            }
        };
        let why = if subnet.overlaps(own_subnet) || p.public_ipv6 == own_public_ipv6 {
            Some("it is this node".to_string())
        } else if p.public_key == own {
            Some(format!("it advertises this node's public key {own}"))
        } else if subnet.prefix() < cfg.network.prefix() || !cfg.network.contains(subnet.network())
        {
            Some(format!("its subnet is outside {}", cfg.network))
        } else if let Some(why) = dual::endpoint6_unusable(p.public_ipv6) {
            Some(format!("its PublicIPv6 {} is {why}", p.public_ipv6))
        } else if out.iter().any(|(s, _)| s.public_key == p.public_key) {
            Some(format!(
                "its public key {} is an older lease's",
                p.public_key
            ))
        } else if out.iter().any(|(s, _)| {
            s.allowed_ips
                .iter()
                .any(|n| matches!(n, IpNetwork::V6(n) if n.overlaps(subnet)))
        }) {
            Some("its subnet overlaps an older lease's".to_string())
        } else {
            None
        };
        if let Some(why) = why {
            skipped.push((subnet, why));
            continue;
        }
        let key = route_key(out.len());
        out.push((
            PeerSpec {
                public_key: p.public_key,
                endpoint: Some(SocketAddr::V6(SocketAddrV6::new(
                    p.public_ipv6,
                    p.port,
                    0,
                    0,
                ))),
                allowed_ips: vec![IpNetwork::V6(subnet)],
                psk: cfg.psk,
                keepalive: cfg.keepalive,
            },
            key,
        ));
    }
    (out, skipped)
}

/// The device's link side: our subnet's /128 and the `IPv6Network` route, as `separate`'s
/// IPv6 device has them ([`dual::plan_link6`]).
fn link_plan(cfg: &WgV6Config, own_subnet: Ipv6Network) -> dual::DevicePlan {
    dual::DevicePlan {
        name: DEVICE,
        listen_port: cfg.listen_port,
        mtu: cfg.mtu(),
        addrs: vec![IpNetwork::V6(crate::backend::v6::device_addr6(own_subnet))],
        routes: vec![IpNetwork::V6(cfg.network)],
        peers: Vec::new(),
    }
}

/// The running device on the userspace path.
pub struct WgV6Only {
    cfg: WgV6Config,
    udp: UdpBackend,
    table: Arc<WgTable>,
    /// The entries as last published; the plan against it decides whether anything changes.
    applied: DeviceSpec,
    published: bool,
    setup_ops: Vec<Op>,
}

impl WgV6Only {
    /// Starts the workers on an IPv6-only socket `[::]:port` with [`DEVICE`] (IPv6 only: no
    /// IPv4 address or route); idempotent, so a restart re-attaches and writes nothing.
    pub async fn setup(nl: &Netlink, cfg: WgV6Config) -> Result<WgV6Only, BackendError> {
        if cfg.mtu() < 1280 {
            let base = Some(cfg.mtu_base).filter(|&b| b != 0);
            return Err(WgError::Mtu6 {
                mtu: cfg.mtu(),
                base: base.unwrap_or(cfg.underlay_mtu),
            }
            .into());
        }
        let udp_cfg = UdpConfig {
            // The workers' table is keyed by IPv4: the keys' block, never on the device.
            network: keys(),
            own_subnet: Ipv4Network::new(keys().network(), 32).expect("a valid prefix"),
            local_ip: Ipv4Addr::UNSPECIFIED,
            port: cfg.listen_port,
            underlay_mtu: cfg.underlay_mtu,
            mtu_override: Some(cfg.mtu()),
            queues: cfg.queues,
            peers_file: None,
            device: DEVICE,
            steering: crate::backend::udp::io::Steering::WireguardPeer,
            bind6: Some(std::net::Ipv6Addr::UNSPECIFIED),
            v6_only: true,
        };
        let udp = UdpBackend::setup_with(nl, udp_cfg, true).await?;
        let setup_ops = udp.setup_ops().to_vec();
        tracing::info!(
            implementation = "userspace",
            device = DEVICE,
            port = cfg.listen_port,
            public_key = %cfg.public_key(),
            mtu = cfg.mtu(),
            "wireguard: IPv6-only data plane running"
        );
        Ok(WgV6Only {
            table: Arc::new(WgTable::new(&cfg.private_key)),
            cfg,
            udp,
            applied: DeviceSpec::default(),
            published: false,
            setup_ops,
        })
    }

    pub fn mtu(&self) -> u32 {
        self.cfg.mtu()
    }

    pub fn setup_ops(&self) -> &[Op] {
        &self.setup_ops
    }

    /// Brings the device to exactly `peers` for our subnet `own_subnet`: the link's address
    /// and route as read back now (a drifted route is put back at the next listing), the
    /// entries when the plan has ops. Nothing is written for an unchanged listing. The netlink ops applied, and the peers
    /// left out.
    pub async fn reconcile(
        &mut self,
        nl: &Netlink,
        own_subnet: Ipv6Network,
        own_public_ipv6: std::net::Ipv6Addr,
        peers: &[WgPeer6],
    ) -> Result<(Vec<Op>, Skipped), BackendError> {
        let mut applied = self.check_link(nl, own_subnet).await?;
        let (entries, skipped) = plan_peers(&self.cfg, own_subnet, own_public_ipv6, peers);
        let udp_peers: Vec<UdpPeer> = entries
            .iter()
            .map(|(s, key)| UdpPeer {
                subnet: Ipv4Network::new(*key, 32).expect("a valid prefix"),
                public_ip: *key,
                port: s.endpoint.map_or(0, |e| e.port()),
            })
            .collect();
        let peers6 = entries
            .iter()
            .flat_map(|(s, key)| {
                s.allowed_ips.iter().filter_map(move |n| match n {
                    IpNetwork::V6(n) => Some(UdpPeer6 {
                        subnet: *n,
                        public_ip: *key,
                        port: s.endpoint.map_or(0, |e| e.port()),
                    }),
                    IpNetwork::V4(_) => None,
                })
            })
            .collect();
        self.udp.set_v6(Some(V6Spec {
            network: self.cfg.network,
            own_subnet,
            peers: peers6,
        }));
        let desired = plan::device_spec(
            *self.cfg.private_key.bytes(),
            self.cfg.listen_port,
            entries.iter().map(|(s, _)| s.clone()).collect(),
        );
        let ops = plan::plan(&self.applied, &desired);
        // Published with the peer table: the keys are positions in the plan, so both change
        // together or neither does.
        let wg = (!ops.is_empty() || !self.published).then(|| {
            let keyed: Vec<(PeerSpec, Option<Ipv4Addr>)> =
                entries.iter().map(|(s, k)| (s.clone(), Some(*k))).collect();
            self.table = Arc::new(self.table.update_keyed(&self.cfg.private_key, &keyed));
            self.table.clone()
        });
        if wg.is_some() {
            tracing::debug!(device = DEVICE, ops = ?ops, "wireguard: peers updated");
        }
        let stats = self.udp.reconcile_with(nl, &udp_peers, wg.clone()).await?;
        applied.extend(stats.applied);
        if wg.is_some() {
            plan::apply_to(&mut self.applied, &ops);
            self.published = true;
        }
        Ok((applied, skipped))
    }

    async fn check_link(
        &mut self,
        nl: &Netlink,
        own_subnet: Ipv6Network,
    ) -> Result<Vec<Op>, WgError> {
        let dev = |source| WgError::Device {
            device: DEVICE,
            source,
        };
        let ifindex = self.udp.ifindex();
        if nl
            .link_by_name(DEVICE)
            .await
            .map_err(dev)?
            .is_none_or(|l| l.index != ifindex)
        {
            return Err(WgError::DeviceGone);
        }
        let ops = dual::plan_link6(
            &link_plan(&self.cfg, own_subnet),
            ifindex,
            &nl.addresses6(Some(ifindex)).await.map_err(dev)?,
            &nl.all_routes6().await.map_err(dev)?,
        );
        for op in &ops {
            nl.apply(op).await.map_err(dev)?;
        }
        Ok(ops)
    }

    /// Per entry: key, endpoint, subnet (its IPv6 one; no IPv4 lease subnet), handshake age,
    /// bytes out and in, live from the workers' table.
    pub fn peer_stats(&self) -> Vec<super::PeerStats> {
        super::userspace_stats(&self.table, DEVICE)
    }

    /// Stops the workers (the device and its address and route stay: a restart re-attaches).
    pub async fn stop(&mut self) {
        self.udp.stop().await;
    }
}

#[cfg(test)]
mod tests;
