//! The agent's one loop: lease in, data plane out.
//!
//! Start-up: wait for the network config, pick the interface, prepare the backend (which fixes
//! what the lease advertises, e.g. vxlan's VTEP MAC), acquire the lease, set the backend up, write
//! subnet.env. Then one `select!` over shutdown, lease events, a lost lease and two periodic
//! repairs (data plane, rules). Every backend plugs in through [`Prepared`] and
//! [`DataPlane`](crate::backend::DataPlane): the loop hands it all remote leases. On shutdown the
//! lease and the data plane stay as they are, so a restart drops nothing (udp's persistent TUN
//! device only loses the packets that arrive while no agent reads it).

use super::dataplane::{Plane, PlaneConfig};
use super::deps::Deps;
use super::feed::{self, Feed, Feeds};
use super::lease::{self, LeaseKeeper};
use super::report::Report;
use super::stop::{next_backoff, Stop};
use super::AgentError;
use crate::backend::{NodeContext, Prepared, Remote};
use crate::netlink;
use crate::registry::Registry;
use crate::settings::Settings;
use crate::subnet;
use crate::watch::LeaseTable;
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};
use tweed_config::{NetworkConfig, SubnetEnv};

/// How often the data plane is re-read and repaired even without lease events (reads only when
/// nothing drifted).
const DATAPLANE_RESYNC: Duration = Duration::from_secs(60);

/// Runs the agent with `deps` until `shutdown` resolves (`Ok`) or something a restart must fix
/// happens (`Err`: no usable interface, an unsupported backend, a task that died). etcd outages
/// are waited out.
pub async fn run_with(
    deps: Deps,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let mut stop = Stop::new(shutdown);
    let Deps {
        registry,
        netlink: nl,
        firewall,
        clock,
        state,
        control,
    } = deps;
    let report = Report::new(state, clock);
    let Some(cfg) = wait_for_config(&registry, &mut stop).await else {
        return Ok(());
    };
    info!(network = %cfg.network, subnet_len = cfg.subnet_len, backend = cfg.backend.type_name(), "network config");
    let _ = control.set(crate::api::Control {
        registry: registry.clone(),
        cfg: cfg.clone(),
        lease_ttl: settings.lease_ttl,
    });

    let iface = netlink::iface::select(&nl, &settings.iface_choice()?).await?;
    let public_ip = settings.public_ip.unwrap_or(iface.ip);
    info!(iface = %iface.name, addr = %iface.ip, %public_ip, mtu = iface.mtu, "underlay interface");
    report.network(&cfg, public_ip);

    let previous = SubnetEnv::read(&settings.subnet_file)
        .ok()
        .filter(|e| e.network == cfg.network)
        .map(|e| e.node_subnet());
    let node = NodeContext {
        network: cfg.network,
        public_ip,
        iface,
        state_dir: settings.state_dir.clone(),
        udp_workers: settings.udp_workers(),
        wg_key_file: settings.wireguard_key_file.clone(),
        wg_impl: settings.wireguard_impl,
    };
    // The subnet is a placeholder until the lease is known.
    let placeholder = previous.unwrap_or(cfg.nth_subnet(0).expect("a network has subnets"));
    let (prepared, attrs) = Prepared::new(&nl, &cfg.backend, &node, placeholder).await?;

    let ttl = settings.lease_ttl;
    let Some(own) =
        lease::acquire(&registry, &cfg, &attrs, previous, ttl, &mut stop, &report).await
    else {
        return Ok(());
    };
    let config = PlaneConfig {
        network: cfg.network,
        ip_masq: settings.ip_masq,
        subnet_file: settings.subnet_file.clone(),
    };
    let plane = Plane::setup(nl, prepared, &attrs, &own, firewall, config, report.clone()).await?;
    let every = subnet::renew_interval(ttl, settings.subnet_lease_renew_margin);
    let lease = LeaseKeeper::start(
        registry.clone(),
        cfg.clone(),
        attrs.clone(),
        ttl,
        every,
        own,
        report.clone(),
    );
    let mut agent = Agent {
        table: LeaseTable::new(registry.prefix(), cfg.network),
        registry,
        public_ip,
        lease,
        plane,
        report,
    };
    let result = agent.main_loop(&mut stop, settings.iptables_resync).await;
    agent.plane.stop().await;
    match &result {
        Ok(()) => info!("shutting down; lease and data plane left in place"),
        Err(e) => error!("{e}; lease and data plane left in place"),
    }
    result
}

async fn wait_for_config(registry: &Registry, stop: &mut Stop) -> Option<NetworkConfig> {
    let key = registry.config_key();
    let mut backoff = Duration::from_millis(500);
    let mut said_waiting = false;
    let mut last_bad: Option<String> = None;
    loop {
        match registry.get_config().await {
            Ok(Some(json)) => match NetworkConfig::parse(&json) {
                Ok(cfg) => return Some(cfg),
                Err(e) => {
                    if last_bad.as_deref() != Some(json.as_str()) {
                        error!(%key, "invalid network config (fix it in etcd; waiting): {e}");
                        last_bad = Some(json);
                    }
                }
            },
            Ok(None) => {
                if !said_waiting {
                    info!(%key, "waiting for the network config to be written");
                    said_waiting = true;
                }
            }
            Err(e) => warn!("reading network config: {e}"),
        }
        if stop.sleep(backoff).await {
            return None;
        }
        backoff = next_backoff(backoff);
    }
}

/// The running agent: everyone's leases, ours, and the data plane made of them.
struct Agent {
    registry: Arc<Registry>,
    public_ip: Ipv4Addr,
    table: LeaseTable,
    lease: LeaseKeeper,
    plane: Plane,
    report: Report,
}

impl Agent {
    async fn main_loop(
        &mut self,
        stop: &mut Stop,
        rules_every: Duration,
    ) -> Result<(), AgentError> {
        // The initial listing goes through the same path as a compaction re-list.
        let Some(snap) = feed::list(&self.registry, stop).await else {
            return Ok(());
        };
        let mut feeds = Feeds::spawn(
            self.registry.clone(),
            snap.revision + 1,
            self.report.clone(),
        );
        self.plane.sync_rules(self.lease.own().subnet()).await;
        self.on_feed(Feed::Resync(snap), stop).await;

        let mut resync = tokio::time::interval(DATAPLANE_RESYNC);
        resync.tick().await;
        let mut rules = tokio::time::interval(rules_every);
        rules.tick().await;
        loop {
            tokio::select! {
                _ = stop.wait() => return Ok(()),
                feed = feeds.next() => self.on_feed(feed?, stop).await,
                id = self.lease.expired() => {
                    let old = self.lease.own().subnet();
                    if self.lease.on_expired(id?, stop).await {
                        self.after_reacquire(old).await;
                    }
                }
                _ = resync.tick() => {
                    self.plane.resync();
                    self.program().await;
                }
                _ = rules.tick() => {
                    self.plane.sync_rules(self.lease.own().subnet()).await;
                    self.plane.export_udp_stats();
                }
            }
        }
    }

    async fn on_feed(&mut self, feed: Feed, stop: &mut Stop) {
        let received = Instant::now();
        let applied = match feed {
            Feed::Events(ev) => self.table.apply(&ev),
            Feed::Resync(snap) => self.table.resync(&snap.leases),
            Feed::Live(live) => return self.report.watch_live(live),
        };
        let own = self.lease.own();
        self.report.lease_changes(&applied, own.subnet());
        let own_lost = applied.changes.iter().any(
            |c| matches!(c, crate::watch::LeaseChange::Removed(l) if l.key.ipv4 == own.subnet()),
        );
        self.lease.follow(&self.table);
        if own_lost && !stop.stopped() {
            warn!(subnet = %own.subnet(), "our lease was deleted; re-acquiring");
            if self.lease.reacquire(stop).await {
                self.after_reacquire(own.subnet()).await;
            }
        }
        if !applied.changes.is_empty() {
            self.report.leases(&self.table, self.lease.own().subnet());
            self.program().await;
            self.report.reconciled_in(received);
        }
    }

    /// A lease is held again after a loss; `old` is the subnet we had.
    async fn after_reacquire(&mut self, old: ipnetwork::Ipv4Network) {
        let new = self.lease.own().subnet();
        if new != old {
            self.report.subnet_moved(old, new);
            self.plane.move_to(new).await;
        }
        self.program().await;
        self.plane.sync_rules(new).await;
    }

    /// Every other node's lease. Which of them the backend can serve is its decision.
    fn remotes(&self) -> Vec<Remote> {
        let own = self.lease.own().subnet();
        self.table
            .leases()
            .filter(|l| l.key.ipv4 != own && l.attrs.public_ip != self.public_ip)
            .map(|l| Remote {
                subnet: l.key.ipv4,
                attrs: l.attrs.clone(),
            })
            .collect()
    }

    async fn program(&mut self) {
        let remotes = self.remotes();
        self.plane.program(&remotes).await;
    }
}
