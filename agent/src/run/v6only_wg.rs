//! wireguard in the IPv6-only loop (`run::v6only`): the node key and port fixed at start, the
//! device (`backend::wireguard::v6only`) set up at the first programming and again when it
//! went, brought to each listing's peers.

use super::AgentError;
use crate::backend::wireguard::v6only::{check_mtu6, Reconciled, WgV6Config, WgV6Only};
use crate::backend::wireguard::{key, PublicKey};
use crate::netlink::Netlink;
use crate::netlink::Op;
use crate::settings::Settings;
use crate::v6only::{self as pure, wireguard as wg, Peer};
use ipnetwork::Ipv6Network;
use std::future::Future;
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
        // Before the lease and subnet.env: a node that cannot carry IPv6 must not advertise
        // itself to peers nor hand pods an MTU below 1280.
        check_mtu6(w.mtu, underlay_mtu)
            .map_err(|e| AgentError::Backend(crate::backend::BackendError::from(e)))?;
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
    /// writes made: netlink ops and entries added, changed or removed.
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
            setup = self.remove_leftovers(nl).await;
            let p = WgV6Only::setup(nl, self.cfg.clone()).await?;
            setup += p.setup_ops().len();
            *plane = Some(p);
        }
        let p = plane.as_mut().expect("set up above");
        let (wg_peers, unread) = wg::peers(peers, self.cfg.listen_port);
        match p.reconcile(nl, own, public_ipv6, &wg_peers).await {
            Ok(Reconciled {
                applied,
                entry_ops,
                mut skipped,
            }) => {
                skipped.extend(unread);
                // The API's peer list and the per-peer metrics, as of this listing.
                report.wireguard_peers(&p.peer_stats());
                let mut before = self.skipped.lock().await;
                if *before != skipped {
                    for (subnet, why) in &skipped {
                        warn!(%subnet, "wireguard: peer left out: {why}");
                    }
                    *before = skipped;
                }
                Ok(setup + applied.len() + entry_ops)
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

    /// Removes what another backend of this network left (`leftovers`). Failures are logged
    /// and the set-up goes on, as the dual-stack plane does: one undeletable leftover must not
    /// keep the whole data plane down. The ops applied.
    async fn remove_leftovers(&self, nl: &Netlink) -> usize {
        let (links, routes) = match (nl.links().await, nl.all_routes6().await) {
            (Ok(l), Ok(r)) => (l, r),
            (Err(e), _) | (_, Err(e)) => {
                warn!("wireguard: looking for what another backend left: {e}");
                return 0;
            }
        };
        let ops = leftovers(self.cfg.network, &links, &routes);
        remove_each(ops, |op| async move { nl.apply(&op).await }).await
    }

    /// Stops the workers; the device, its address and route stay for the next start.
    pub(super) async fn stop(&self) {
        if let Some(p) = self.plane.lock().await.as_mut() {
            p.stop().await;
        }
    }
}

/// What another backend of this network left that would bypass `tweed-wg` in clear or hold its
/// port: a `tweed-v6.*` vxlan device, with its routes, and host-gw's routes via the underlay
/// (`backend::v6::leftovers6`: both are more specific than `IPv6Network dev tweed-wg`), and
/// dual stack's `tweed-wg-v6` (`separate` mode), which holds our /128 and `IPv6Network` and,
/// on the kernel path, the very port our sockets bind.
fn leftovers(
    network: Ipv6Network,
    links: &[crate::netlink::Link],
    routes: &[crate::netlink::Route6],
) -> Vec<Op> {
    let mut ops = crate::backend::v6::leftovers6(None, false, Some(network), links, routes);
    let v6 = crate::backend::wireguard::dual::DEVICE_V6;
    if links.iter().any(|l| l.name == v6) {
        ops.push(Op::LinkDel {
            name: v6.to_string(),
        });
    }
    ops
}

/// Applies each op with `apply`, logging a failure and going on with the next; how many were
/// applied.
async fn remove_each<F, Fut, E>(ops: Vec<Op>, mut apply: F) -> usize
where
    F: FnMut(Op) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut done = 0;
    for op in ops {
        let shown = op.to_string();
        match apply(op).await {
            Ok(()) => {
                warn!("wireguard: removed what another backend left (it would bypass tweed-wg): {shown}");
                done += 1;
            }
            Err(e) => warn!("wireguard: removing what another backend left ({shown}): {e}"),
        }
    }
    done
}

#[cfg(test)]
mod tests;
