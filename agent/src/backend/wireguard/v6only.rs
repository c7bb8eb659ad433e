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

use std::collections::{BTreeMap, BTreeSet};
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
fn keys_block() -> Ipv4Network {
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

/// The device's MTU for the net-conf `MTU` (`mtu_base`, 0: the underlay's) and the underlay's,
/// or [`WgError::Mtu6`] when it is below IPv6's minimum (1280): the kernel would not carry
/// IPv6 on such a device.
pub fn check_mtu6(mtu_base: u32, underlay_mtu: u32) -> Result<u32, WgError> {
    let mtu = plan::device_mtu(mtu_base, underlay_mtu);
    if mtu < 1280 {
        let base = if mtu_base != 0 {
            mtu_base
        } else {
            underlay_mtu
        };
        return Err(WgError::Mtu6 { mtu, base });
    }
    Ok(mtu)
}

/// Peers a plan left out, each with why.
pub type Skipped = Vec<(Ipv6Network, String)>;

/// Each listed peer's routing key: a peer keeps the key it had while it stays listed, and a
/// new one takes the lowest key no listed peer holds. Keys are never positions, so a
/// re-ordered listing (a lease deleted and taken again) moves no peer to another key.
pub fn assign_keys(
    before: &BTreeMap<PublicKey, Ipv4Addr>,
    entries: &[PeerSpec],
) -> BTreeMap<PublicKey, Ipv4Addr> {
    let mut keys: BTreeMap<PublicKey, Ipv4Addr> = entries
        .iter()
        .filter_map(|s| before.get(&s.public_key).map(|k| (s.public_key, *k)))
        .collect();
    let mut taken: BTreeSet<Ipv4Addr> = keys.values().copied().collect();
    let mut next = u32::from(keys_block().network()) + 1;
    for s in entries {
        if keys.contains_key(&s.public_key) {
            continue;
        }
        while taken.contains(&Ipv4Addr::from(next)) {
            next += 1;
        }
        let k = Ipv4Addr::from(next);
        taken.insert(k);
        keys.insert(s.public_key, k);
    }
    keys
}

/// The entries as last published, with their routing keys: what the next listing is planned
/// against.
#[derive(Debug, Default, Clone)]
pub struct Published {
    applied: DeviceSpec,
    keys: BTreeMap<PublicKey, Ipv4Addr>,
    done: bool,
}

/// What one listing changes in [`Published`].
#[derive(Debug)]
pub struct Next {
    /// Every entry under its routing key.
    pub keyed: Vec<(PeerSpec, Ipv4Addr)>,
    pub ops: Vec<plan::WgOp>,
    keys: BTreeMap<PublicKey, Ipv4Addr>,
    /// The crypto table and the subnet→key map must be published (together).
    pub publish: bool,
}

impl Published {
    /// Plans `entries` against what was published: a republish when an entry or a routing key
    /// changed (or nothing was published yet), never for a re-ordered listing.
    pub fn next(&self, private_key: [u8; 32], port: u16, entries: Vec<PeerSpec>) -> Next {
        let keys = assign_keys(&self.keys, &entries);
        let desired = plan::device_spec(private_key, port, entries.clone());
        let ops = plan::plan(&self.applied, &desired);
        let publish = !ops.is_empty() || keys != self.keys || !self.done;
        let keyed = entries
            .into_iter()
            .map(|s| {
                let k = keys[&s.public_key];
                (s, k)
            })
            .collect();
        Next {
            keyed,
            ops,
            keys,
            publish,
        }
    }

    /// Records `next` as published.
    pub fn commit(&mut self, next: Next) {
        if next.publish {
            plan::apply_to(&mut self.applied, &next.ops);
            self.keys = next.keys;
            self.done = true;
        }
    }
}

/// The device's entries for `peers` (in listing order), and the peers left out with
/// why: one of ours (our subnet, our `PublicIPv6`, our key), an endpoint that is no
/// endpoint, a subnet outside `network`, or a key or subnet an earlier (older) peer holds.
/// One entry per key and per subnet, so each lease's traffic is sealed for that lease only.
pub fn plan_peers(
    cfg: &WgV6Config,
    own_subnet: Ipv6Network,
    own_public_ipv6: std::net::Ipv6Addr,
    peers: &[WgPeer6],
) -> (Vec<PeerSpec>, Skipped) {
    let own = cfg.public_key();
    let mut out: Vec<PeerSpec> = Vec::new();
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
        } else if out.iter().any(|s| s.public_key == p.public_key) {
            Some(format!(
                "its public key {} is an older lease's",
                p.public_key
            ))
        } else if out.iter().any(|s| {
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
        out.push(PeerSpec {
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
        });
    }
    (out, skipped)
}

/// Each entry's IPv6 subnet under its routing key: the workers' subnet→key map.
pub fn peers6(keyed: &[(PeerSpec, Ipv4Addr)]) -> Vec<UdpPeer6> {
    keyed
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
        .collect()
}

/// What one listing did.
#[derive(Debug)]
pub struct Reconciled {
    /// The netlink ops applied (the link's address and route).
    pub applied: Vec<Op>,
    /// The entries added, changed or removed since the last listing (0 at the first one after
    /// a set-up, which loads the table).
    pub entry_ops: usize,
    /// The peers left out, each with why.
    pub skipped: Skipped,
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
    /// The entries and routing keys as last published; each listing is planned against it.
    published: Published,
    setup_ops: Vec<Op>,
}

impl WgV6Only {
    /// Starts the workers on an IPv6-only socket `[::]:port` with [`DEVICE`] (IPv6 only: no
    /// IPv4 address or route); idempotent, so a restart re-attaches and writes nothing.
    pub async fn setup(nl: &Netlink, cfg: WgV6Config) -> Result<WgV6Only, BackendError> {
        // Checked at start too (`check_mtu6` in run::v6only_wg): this is the backstop.
        check_mtu6(cfg.mtu_base, cfg.underlay_mtu)?;
        let udp_cfg = UdpConfig {
            // The workers' table is keyed by IPv4: the keys' block, never on the device.
            network: keys_block(),
            own_subnet: Ipv4Network::new(keys_block().network(), 32).expect("a valid prefix"),
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
            published: Published::default(),
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
    /// and route as read back now (a drifted route is put back at the next listing), and the
    /// entries when an entry or a routing key changed; nothing is written for an unchanged
    /// listing.
    pub async fn reconcile(
        &mut self,
        nl: &Netlink,
        own_subnet: Ipv6Network,
        own_public_ipv6: std::net::Ipv6Addr,
        peers: &[WgPeer6],
    ) -> Result<Reconciled, BackendError> {
        let mut applied = self.check_link(nl, own_subnet).await?;
        let (entries, skipped) = plan_peers(&self.cfg, own_subnet, own_public_ipv6, peers);
        let next =
            self.published
                .next(*self.cfg.private_key.bytes(), self.cfg.listen_port, entries);
        let udp_peers: Vec<UdpPeer> = next
            .keyed
            .iter()
            .map(|(s, key)| UdpPeer {
                subnet: Ipv4Network::new(*key, 32).expect("a valid prefix"),
                public_ip: *key,
                port: s.endpoint.map_or(0, |e| e.port()),
            })
            .collect();
        // The subnet→key map is staged, not published: it goes out in the same publish as the
        // crypto table below, so the workers never see keys from one listing and entries from
        // another.
        let map_changed = self.udp.stage_v6(Some(V6Spec {
            network: self.cfg.network,
            own_subnet,
            peers: peers6(&next.keyed),
        }));
        let wg = (next.publish || map_changed).then(|| {
            let keyed: Vec<(PeerSpec, Option<Ipv4Addr>)> = next
                .keyed
                .iter()
                .map(|(s, k)| (s.clone(), Some(*k)))
                .collect();
            self.table = Arc::new(self.table.update_keyed(&self.cfg.private_key, &keyed));
            self.table.clone()
        });
        let stats = self.udp.reconcile_with(nl, &udp_peers, wg.clone()).await?;
        applied.extend(stats.applied);
        // The first table after a set-up (a restart included) is loaded, not changed: it
        // writes nothing to the kernel, so it is not counted as an update.
        let entry_ops = if self.published.done {
            next.ops.len()
        } else {
            0
        };
        if wg.is_some() && entry_ops > 0 {
            tracing::info!(device = DEVICE, ops = ?next.ops, "wireguard: peers updated");
        }
        self.published.commit(next);
        Ok(Reconciled {
            applied,
            entry_ops,
            skipped,
        })
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
