//! wireguard in the IPv6-only loop (`run::v6only`): the node key and port fixed at start, the
//! device (`backend::wireguard::v6only`) set up at the first programming and again when it
//! went, brought to each listing's peers.

use super::AgentError;
use crate::backend::wireguard::v6only::{WgV6Config, WgV6Only};
use crate::backend::wireguard::{key, PublicKey};
use crate::netlink::Netlink;
use crate::settings::Settings;
use crate::v6only::{self as pure, wireguard as wg, Peer};
use ipnetwork::Ipv6Network;
use std::net::Ipv6Addr;
use tokio::sync::Mutex;
use tracing::{info, warn};
use tweed_config::{LeaseAttrs, WireguardConfig};

pub(super) struct Wg {
    cfg: WgV6Config,
    /// `None` until the first programming, and after the device went (set up again then).
    plane: Mutex<Option<WgV6Only>>,
    /// The peers left out by the last plan, logged when they change.
    skipped: Mutex<Vec<(Ipv6Network, String)>>,
}

impl Wg {
    /// Checks that this node can run `w` here and loads (or makes) the node key: errors end the
    /// agent at start, naming the field or flag.
    pub(super) fn prepare(
        w: &WireguardConfig,
        settings: &Settings,
        network: Ipv6Network,
        underlay_mtu: u32,
    ) -> Result<Wg, AgentError> {
        wg::check(w, settings.wireguard_impl).map_err(pure::V6OnlyError::from)?;
        let key_path = settings
            .wireguard_key_file
            .clone()
            .unwrap_or_else(|| settings.state_dir.join(key::KEY_FILE_NAME));
        let (private_key, created) = key::load_or_create(&key_path)
            .map_err(|e| AgentError::Backend(crate::backend::wireguard::WgError::from(e).into()))?;
        let cfg = WgV6Config {
            network,
            listen_port: wg::port(w),
            underlay_mtu,
            mtu_base: w.mtu,
            psk: w.psk,
            keepalive: w.persistent_keepalive,
            private_key,
            queues: settings.udp_workers(),
        };
        info!(
            key_file = %key_path.display(),
            public_key = %cfg.public_key(),
            generated = created,
            port = cfg.listen_port,
            "wireguard: node key (IPv6-only network)"
        );
        Ok(Wg {
            cfg,
            plane: Mutex::new(None),
            skipped: Mutex::new(Vec::new()),
        })
    }

    pub(super) fn public_key(&self) -> PublicKey {
        self.cfg.public_key()
    }

    pub(super) fn mtu(&self) -> u32 {
        self.cfg.mtu()
    }

    pub(super) fn lease_attrs(&self, public_ipv6: Ipv6Addr) -> LeaseAttrs {
        wg::lease_attrs(public_ipv6, &self.public_key(), self.cfg.listen_port)
    }

    /// Brings the device to the wireguard peers among `peers` and reports their figures; the
    /// netlink ops it applied.
    pub(super) async fn program(
        &self,
        nl: &Netlink,
        report: &super::report::Report,
        own: Ipv6Network,
        public_ipv6: Ipv6Addr,
        peers: &[Peer],
    ) -> Result<usize, AgentError> {
        let mut plane = self.plane.lock().await;
        let mut setup = 0;
        if plane.is_none() {
            setup = self.remove_leftovers(nl).await?;
            let p = WgV6Only::setup(nl, self.cfg.clone()).await?;
            setup += p.setup_ops().len();
            *plane = Some(p);
        }
        let p = plane.as_mut().expect("set up above");
        match p.reconcile(nl, own, public_ipv6, &wg::peers(peers)).await {
            Ok((applied, skipped)) => {
                // The API's peer list and the per-peer metrics, as of this listing.
                report.wireguard_peers(&p.peer_stats());
                let mut before = self.skipped.lock().await;
                if *before != skipped {
                    for (subnet, why) in &skipped {
                        warn!(%subnet, "wireguard: peer left out: {why}");
                    }
                    *before = skipped;
                }
                Ok(setup + applied.len())
            }
            Err(e) => {
                if e.is_device_gone() {
                    warn!("wireguard: {e}; setting the device up again");
                    if let Some(mut gone) = plane.take() {
                        gone.stop().await;
                    }
                }
                Err(e.into())
            }
        }
    }

    /// Removes what another backend of this network left (`backend::v6::leftovers6`): a
    /// `tweed-v6.*` vxlan device, with its routes, and host-gw's routes via the underlay. Both
    /// are more specific than `IPv6Network dev tweed-wg`: left there, they would carry pods'
    /// packets past the device, in clear. The ops applied.
    async fn remove_leftovers(&self, nl: &Netlink) -> Result<usize, AgentError> {
        let ops = crate::backend::v6::leftovers6(
            None,
            false,
            Some(self.cfg.network),
            &nl.links().await?,
            &nl.all_routes6().await?,
        );
        for op in &ops {
            warn!(
                ?op,
                "wireguard: removing what another backend left (it would bypass tweed-wg)"
            );
            nl.apply(op).await?;
        }
        Ok(ops.len())
    }

    /// Stops the workers; the device, its address and route stay for the next start.
    pub(super) async fn stop(&self) {
        if let Some(p) = self.plane.lock().await.as_mut() {
            p.stop().await;
        }
    }
}
