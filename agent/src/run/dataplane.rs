//! This node's data plane: the backend programmed with every remote lease, the masquerade and
//! forward rules, and subnet.env for the CNI plugin. It is only ever added to or repaired, never
//! torn down: on shutdown the kernel state stays, so a restart drops nothing.

use super::report::Report;
use super::AgentError;
use crate::backend::udp::io::Stats as UdpStats;
use crate::backend::{DataPlane, Prepared, Remote};
use crate::netlink::Netlink;
use crate::rules::{Firewall, RuleSpec};
use crate::subnet::OwnLease;
use ipnetwork::Ipv4Network;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tracing::{error, info, warn};
use tweed_config::{LeaseAttrs, SubnetEnv};

pub(super) struct Plane {
    nl: Netlink,
    /// How to set the backend up again (lost device, new subnet).
    prepared: Prepared,
    backend: DataPlane,
    firewall: Arc<Firewall>,
    network: Ipv4Network,
    /// `--ip-masq`: the rules masquerade, and subnet.env tells the CNI plugin so.
    ip_masq: bool,
    subnet_file: PathBuf,
    report: Report,
    /// udp counters at the last metrics export, to add only the difference.
    udp_seen: UdpStats,
}

/// What [`Plane::setup`] needs besides the backend.
pub(super) struct PlaneConfig {
    pub(super) network: Ipv4Network,
    pub(super) ip_masq: bool,
    pub(super) subnet_file: PathBuf,
}

impl Plane {
    /// Sets `prepared` up for `own`'s subnet and writes subnet.env. `attrs` is what the lease
    /// advertises, checked against what the backend turned out to be.
    pub(super) async fn setup(
        nl: Netlink,
        mut prepared: Prepared,
        attrs: &LeaseAttrs,
        own: &OwnLease,
        firewall: Firewall,
        config: PlaneConfig,
        report: Report,
    ) -> Result<Plane, AgentError> {
        prepared.set_own_subnet(own.subnet());
        prepared.remove_leftovers(&nl, config.network).await;
        let backend = prepared.setup(&nl).await?;
        if let (DataPlane::Vxlan(b), Some(data)) = (&backend, &attrs.backend_data) {
            if !data.get().contains(&b.vtep_mac().to_string()) {
                // The device ended up with another MAC than advertised; the lease must say what is real.
                warn!(advertised = %data.get(), actual = %b.vtep_mac(), "VTEP MAC changed during set-up");
            }
        }
        let plane = Plane {
            nl,
            prepared,
            backend,
            firewall: Arc::new(firewall),
            network: config.network,
            ip_masq: config.ip_masq,
            subnet_file: config.subnet_file,
            report,
            udp_seen: UdpStats::default(),
        };
        plane.write_subnet_env(own.subnet())?;
        plane.report.mtu(plane.backend.mtu());
        Ok(plane)
    }

    /// subnet.env: the network, our subnet's first address, the MTU and whether we masquerade.
    fn write_subnet_env(&self, subnet: Ipv4Network) -> Result<(), AgentError> {
        let first = Ipv4Addr::from(u32::from(subnet.network()) + 1);
        let env = SubnetEnv {
            network: self.network,
            subnet: Ipv4Network::new(first, subnet.prefix()).expect("valid prefix"),
            mtu: self.backend.mtu(),
            // Tells the CNI plugin the agent masquerades, so the plugin does not do it a second time.
            ipmasq: self.ip_masq,
        };
        env.write_atomic(&self.subnet_file)?;
        info!(path = %self.subnet_file.display(), "wrote subnet.env");
        Ok(())
    }

    /// Moves to a new subnet (ours was taken while the lease was lost).
    pub(super) async fn move_to(&mut self, subnet: Ipv4Network) {
        self.prepared.set_own_subnet(subnet);
        self.resetup().await;
        if let Err(e) = self.write_subnet_env(subnet) {
            error!("{e}");
        }
    }

    /// Sets the backend up again from scratch (device deleted behind our back, new subnet).
    async fn resetup(&mut self) {
        // udp: the old workers must let go of the TUN queues and the port first.
        self.backend.stop().await;
        match self.prepared.setup(&self.nl).await {
            Ok(b) => self.backend = b,
            Err(e) => error!(
                backend = self.prepared.type_name(),
                "setting the backend up again: {e}"
            ),
        }
    }

    /// The next [`program`](Self::program) re-reads the kernel instead of trusting the backend.
    pub(super) fn resync(&mut self) {
        self.backend.resync();
    }

    /// Makes the backend serve exactly `remotes`; a backend whose device went away is set up
    /// again once.
    pub(super) async fn program(&mut self, remotes: &[Remote]) {
        let started = Instant::now();
        let stats = match self.backend.reconcile(&self.nl, remotes).await {
            Ok(s) => s,
            Err(e) if e.is_device_gone() => {
                warn!("{e}; setting the backend up again");
                self.resetup().await;
                match self.backend.reconcile(&self.nl, remotes).await {
                    Ok(s) => s,
                    Err(e) => return error!("programming the data plane: {e}"),
                }
            }
            Err(e) => return error!("programming the data plane: {e}"),
        };
        self.report
            .programmed(self.prepared.type_name(), remotes, &stats, started);
    }

    /// Masquerade and forward rules for `subnet`; on a blocking thread since they fork iptables
    /// or nft.
    pub(super) async fn sync_rules(&mut self, subnet: Ipv4Network) {
        let spec = RuleSpec {
            network: self.network,
            subnet,
            ip_masq: self.ip_masq,
        };
        let fw = self.firewall.clone();
        let result = tokio::task::spawn_blocking(move || fw.sync(&spec))
            .await
            .expect("rule sync does not panic");
        self.report
            .rules_synced(self.firewall.name(), self.ip_masq, &result);
    }

    /// Adds what the udp workers counted since the last export to the metrics.
    pub(super) fn export_udp_stats(&mut self) {
        let DataPlane::Udp(b) = &self.backend else {
            return;
        };
        let now = b.stats();
        let last = std::mem::replace(&mut self.udp_seen, now);
        self.report.udp_traffic(&now, &last);
    }

    /// Stops what the backend runs (udp: its workers); the kernel state stays.
    pub(super) async fn stop(&mut self) {
        self.backend.stop().await;
    }
}
