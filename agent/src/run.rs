//! The agent's one loop: lease in, data plane out.
//!
//! Start-up: connect, wait for the network config, pick the interface, prepare the backend (which
//! fixes the VTEP MAC the lease advertises), acquire the lease, program the backend, write
//! subnet.env. Then one `select!` over shutdown, renewal, lease events and a periodic data-plane
//! resync. On shutdown the lease and the data plane stay as they are, so a restart drops nothing.

use crate::backend::vxlan::{VxlanBackend, VxlanConfig, VxlanError, VxlanPeer};
use crate::netlink::{self, Netlink};
use crate::registry::{EtcdRegistry, LeaseWatch, Registry, RegistryError, Snapshot, WatchEvent};
use crate::settings::Settings;
use crate::subnet::{self, OwnLease, SubnetError};
use crate::watch::{Applied, LeaseChange, LeaseTable};
use ipnetwork::Ipv4Network;
use std::collections::HashSet;
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};
use tweed_config::{BackendConfig, LeaseAttrs, NetworkConfig, SubnetEnv};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Netlink(#[from] netlink::NetlinkError),
    #[error(transparent)]
    Iface(#[from] netlink::IfaceError),
    #[error(transparent)]
    Vxlan(#[from] VxlanError),
    #[error(transparent)]
    SubnetEnv(#[from] tweed_config::subnet_env::SubnetEnvError),
    #[error("backend {0:?} is not supported by this build of tweedd yet")]
    UnsupportedBackend(&'static str),
}

/// How often the data plane is re-read and repaired even without lease events (reads only when
/// nothing drifted).
const DATAPLANE_RESYNC: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

struct Stop(watch::Receiver<bool>);

impl Stop {
    async fn wait(&mut self) {
        let _ = self.0.wait_for(|s| *s).await;
    }

    /// Sleeps `d`; returns true when shutdown came first.
    async fn sleep(&mut self, d: Duration) -> bool {
        tokio::select! {
            _ = self.wait() => true,
            _ = tokio::time::sleep(d) => false,
        }
    }

    fn stopped(&self) -> bool {
        *self.0.borrow()
    }
}

fn next_backoff(d: Duration) -> Duration {
    (d * 2).min(MAX_BACKOFF)
}

/// Runs the agent until `shutdown` resolves. Returns an error only for what a restart cannot fix
/// (bad TLS files, no usable interface, an unsupported backend); etcd outages are waited out.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let mut stop = Stop(stop_rx);

    let registry = Arc::new(Registry::etcd(
        EtcdRegistry::connect(settings.etcd.clone()).await?,
    ));
    let Some(cfg) = wait_for_config(&registry, &mut stop).await else {
        return Ok(());
    };
    info!(network = %cfg.network, subnet_len = cfg.subnet_len, backend = cfg.backend.type_name(), "network config");

    let nl = Netlink::real()?;
    let iface = choose_iface(&nl, &settings.iface).await?;
    let public_ip = settings.public_ip.unwrap_or(iface.ip);
    info!(iface = %iface.name, addr = %iface.ip, %public_ip, mtu = iface.mtu, "underlay interface");

    let BackendConfig::Vxlan { vni, port, mtu, .. } = cfg.backend else {
        return Err(AgentError::UnsupportedBackend(cfg.backend.type_name()));
    };
    let previous = SubnetEnv::read(&settings.subnet_file)
        .ok()
        .filter(|e| e.network == cfg.network)
        .map(|e| e.node_subnet());
    let mut vx_cfg = VxlanConfig {
        vni,
        port,
        local_ip: public_ip,
        underlay_ifindex: iface.index,
        underlay_mtu: iface.mtu,
        // Replaced by the leased subnet before the device is set up.
        own_subnet: previous.unwrap_or(cfg.nth_subnet(0).expect("a network has subnets")),
        mac_file: settings.state_dir.join(format!("vtep-mac.{vni}")),
        mtu_override: (mtu != 0).then_some(mtu),
    };
    let vtep_mac = VxlanBackend::prepare_mac(&nl, &vx_cfg).await?;
    let attrs = LeaseAttrs::new(
        public_ip,
        "vxlan",
        Some(&serde_json::json!({"VNI": vni, "VtepMAC": vtep_mac.to_string()})),
    );

    let Some(own) =
        acquire_until_done(&registry, &cfg, &attrs, previous, &settings, &mut stop).await
    else {
        return Ok(());
    };
    vx_cfg.own_subnet = own.subnet();
    let backend = VxlanBackend::setup(&nl, vx_cfg.clone()).await?;
    if backend.vtep_mac() != vtep_mac {
        // The device ended up with another MAC than advertised; the lease must say what is real.
        warn!(advertised = %vtep_mac, actual = %backend.vtep_mac(), "VTEP MAC changed during set-up");
    }
    write_subnet_env(&settings, &cfg, &own, backend.mtu())?;

    let mut agent = Agent {
        registry: registry.clone(),
        nl,
        cfg: cfg.clone(),
        attrs,
        settings: settings.clone(),
        own,
        public_ip,
        table: LeaseTable::new(registry.prefix(), cfg.network),
        backend,
        warned: HashSet::new(),
        vx_cfg,
    };
    agent.main_loop(&mut stop).await;
    info!("shutting down; lease and data plane left in place");
    Ok(())
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

async fn acquire_until_done(
    registry: &Registry,
    cfg: &NetworkConfig,
    attrs: &LeaseAttrs,
    previous: Option<Ipv4Network>,
    settings: &Settings,
    stop: &mut Stop,
) -> Option<OwnLease> {
    let mut backoff = Duration::from_millis(500);
    loop {
        match subnet::acquire(registry, cfg, attrs, previous, settings.lease_ttl).await {
            Ok(own) => {
                info!(subnet = %own.subnet(), lease = format!("{:x}", own.lease_id), reused = own.reused, "lease acquired");
                return Some(own);
            }
            Err(SubnetError::Alloc(e)) => error!("{e}; retrying"),
            Err(e) => warn!("acquiring a lease: {e}; retrying"),
        }
        if stop.sleep(backoff).await {
            return None;
        }
        backoff = next_backoff(backoff);
    }
}

fn write_subnet_env(
    settings: &Settings,
    cfg: &NetworkConfig,
    own: &OwnLease,
    mtu: u32,
) -> Result<(), AgentError> {
    let subnet = own.subnet();
    let first = Ipv4Addr::from(u32::from(subnet.network()) + 1);
    let env = SubnetEnv {
        network: cfg.network,
        subnet: Ipv4Network::new(first, subnet.prefix()).expect("valid prefix"),
        mtu,
        // The agent installs no masquerade rules yet, so it must not tell the CNI plugin it does.
        ipmasq: false,
    };
    env.write_atomic(&settings.subnet_file)?;
    info!(path = %settings.subnet_file.display(), "wrote subnet.env");
    Ok(())
}

/// What the watch task hands the main loop.
enum Feed {
    Events(Vec<WatchEvent>),
    Resync(Snapshot),
}

/// Owns the watch: snapshot, then watch from the next revision; on errors reconnect with backoff
/// from the last revision seen; on compaction re-list so the table can diff what was missed.
async fn watch_task(registry: Arc<Registry>, start_revision: i64, tx: mpsc::Sender<Feed>) {
    let mut next = start_revision;
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut w: LeaseWatch = match registry.watch(next).await {
            Ok(w) => w,
            Err(e) => {
                warn!("watch: {e}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = next_backoff(backoff);
                continue;
            }
        };
        loop {
            match w.next().await {
                Ok(events) => {
                    backoff = Duration::from_millis(200);
                    if let Some(l) = events.last() {
                        next = l.revision() + 1;
                    }
                    if tx.send(Feed::Events(events)).await.is_err() {
                        return;
                    }
                }
                Err(RegistryError::Compacted {
                    requested,
                    compacted,
                }) => {
                    warn!(requested, compacted, "watch history compacted; re-listing");
                    match registry.list_leases().await {
                        Ok(snap) => {
                            next = snap.revision + 1;
                            if tx.send(Feed::Resync(snap)).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => warn!("re-list after compaction: {e}"),
                    }
                    break;
                }
                Err(e) => {
                    warn!("watch broke: {e}; reconnecting in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = next_backoff(backoff);
                    break;
                }
            }
        }
    }
}

struct Agent {
    registry: Arc<Registry>,
    nl: Netlink,
    cfg: NetworkConfig,
    attrs: LeaseAttrs,
    settings: Settings,
    own: OwnLease,
    public_ip: Ipv4Addr,
    table: LeaseTable,
    backend: VxlanBackend,
    /// Keys already warned about, so a bad lease is logged once rather than on every resync.
    warned: HashSet<String>,
    vx_cfg: VxlanConfig,
}

impl Agent {
    async fn main_loop(&mut self, stop: &mut Stop) {
        let (tx, mut rx) = mpsc::channel(64);
        // The initial listing goes through the same path as a compaction re-list.
        let snap = loop {
            match self.registry.list_leases().await {
                Ok(s) => break s,
                Err(e) => {
                    warn!("listing leases: {e}");
                    if stop.sleep(Duration::from_secs(1)).await {
                        return;
                    }
                }
            }
        };
        let watcher = tokio::spawn(watch_task(self.registry.clone(), snap.revision + 1, tx));
        self.on_feed(Feed::Resync(snap), stop).await;

        let renew_every =
            subnet::renew_interval(self.settings.lease_ttl, self.settings.renew_margin);
        let mut renew_at = tokio::time::Instant::now() + renew_every;
        let mut resync = tokio::time::interval(DATAPLANE_RESYNC);
        resync.tick().await;
        loop {
            tokio::select! {
                _ = stop.wait() => break,
                feed = rx.recv() => match feed {
                    Some(f) => self.on_feed(f, stop).await,
                    None => break,
                },
                _ = tokio::time::sleep_until(renew_at) => {
                    renew_at = tokio::time::Instant::now() + self.renew(renew_every, stop).await;
                }
                _ = resync.tick() => {
                    self.backend.resync();
                    self.program().await;
                }
            }
        }
        watcher.abort();
    }

    /// Renews the lease; returns when to try next.
    async fn renew(&mut self, every: Duration, stop: &mut Stop) -> Duration {
        if self.own.lease_id == 0 {
            return every;
        }
        match self.registry.renew(self.own.lease_id).await {
            Ok(Some(ttl)) => {
                debug!(subnet = %self.own.subnet(), ?ttl, "lease renewed");
                every
            }
            Ok(None) => {
                warn!(subnet = %self.own.subnet(), "lease expired; re-acquiring");
                self.reacquire(stop).await;
                every
            }
            Err(e) => {
                warn!("renewing lease: {e}; retrying in 2s");
                Duration::from_secs(2)
            }
        }
    }

    async fn reacquire(&mut self, stop: &mut Stop) {
        let previous = Some(self.own.subnet());
        let Some(own) = acquire_until_done(
            &self.registry,
            &self.cfg,
            &self.attrs,
            previous,
            &self.settings,
            stop,
        )
        .await
        else {
            return;
        };
        if own.subnet() != self.own.subnet() {
            error!(old = %self.own.subnet(), new = %own.subnet(), "our subnet was taken while the lease was lost; moved to a new one (local pods need new addresses)");
            self.vx_cfg.own_subnet = own.subnet();
            match VxlanBackend::setup(&self.nl, self.vx_cfg.clone()).await {
                Ok(b) => self.backend = b,
                Err(e) => error!("reconfiguring the backend for {}: {e}", own.subnet()),
            }
            if let Err(e) = write_subnet_env(&self.settings, &self.cfg, &own, self.backend.mtu()) {
                error!("{e}");
            }
        }
        self.own = own;
        self.program().await;
    }

    async fn on_feed(&mut self, feed: Feed, stop: &mut Stop) {
        let applied: Applied = match feed {
            Feed::Events(ev) => self.table.apply(&ev),
            Feed::Resync(snap) => self.table.resync(&snap.leases),
        };
        for s in &applied.skipped {
            if self.warned.insert(format!("{}|{}", s.key, s.reason)) {
                warn!(key = %s.key, "skipping lease: {}", s.reason);
            }
        }
        let mut own_lost = false;
        for c in &applied.changes {
            let own = c.subnet() == self.own.subnet();
            match c {
                LeaseChange::Added(l) => {
                    info!(subnet = %l.key.ipv4, peer = %l.attrs.public_ip, own, "lease added")
                }
                LeaseChange::Updated { old, new } => {
                    info!(subnet = %new.key.ipv4, peer = %new.attrs.public_ip, old_peer = %old.attrs.public_ip, own, "lease updated")
                }
                LeaseChange::Removed(l) => {
                    info!(subnet = %l.key.ipv4, peer = %l.attrs.public_ip, own, "lease removed");
                    own_lost |= own;
                }
            }
        }
        if own_lost && !stop.stopped() {
            warn!(subnet = %self.own.subnet(), "our lease was deleted; re-acquiring");
            self.reacquire(stop).await;
        }
        if !applied.changes.is_empty() {
            self.program().await;
        }
    }

    fn peers(&mut self) -> Vec<VxlanPeer> {
        let mut peers = Vec::new();
        let own_subnet = self.own.subnet();
        for l in self.table.leases() {
            if l.key.ipv4 == own_subnet || l.attrs.public_ip == self.public_ip {
                continue;
            }
            let ty = l.attrs.effective_backend_type();
            let peer = if ty == "vxlan" {
                VxlanPeer::from_lease(l.key.ipv4, &l.attrs).map_err(|e| e.to_string())
            } else {
                Err(format!("its backend is {ty:?}, this node runs vxlan"))
            };
            match peer {
                Ok(p) => peers.push(p),
                Err(reason) => {
                    let k = format!("{}|{reason}", l.key);
                    if self.warned.insert(k) {
                        warn!(subnet = %l.key.ipv4, peer = %l.attrs.public_ip, "not programming peer: {reason}");
                    }
                }
            }
        }
        peers
    }

    async fn program(&mut self) {
        let peers = self.peers();
        let started = std::time::Instant::now();
        match self.backend.reconcile(&self.nl, &peers).await {
            Ok(stats) => {
                if stats.ops_applied > 0 || !stats.failures.is_empty() {
                    info!(
                        peers = peers.len(),
                        ops = stats.ops_applied,
                        failures = stats.failures.len(),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "data plane programmed"
                    );
                }
            }
            Err(VxlanError::DeviceGone { device }) => {
                warn!(%device, "vxlan device vanished; recreating it");
                match VxlanBackend::setup(&self.nl, self.vx_cfg.clone()).await {
                    Ok(b) => {
                        self.backend = b;
                        if let Err(e) = self.backend.reconcile(&self.nl, &peers).await {
                            error!("programming the data plane: {e}");
                        }
                    }
                    Err(e) => error!("recreating {device}: {e}"),
                }
            }
            Err(e) => error!("programming the data plane: {e}"),
        }
    }
}

/// `--iface` values are tried in order, first match wins; none given means the default route's.
async fn choose_iface(nl: &Netlink, wanted: &[String]) -> Result<netlink::Iface, AgentError> {
    if wanted.is_empty() {
        return Ok(netlink::select_iface(nl, None).await?);
    }
    let mut last = None;
    for w in wanted {
        match netlink::select_iface(nl, Some(w)).await {
            Ok(i) => return Ok(i),
            Err(e) => {
                debug!(iface = %w, "not usable: {e}");
                last = Some(e);
            }
        }
    }
    Err(last.expect("at least one --iface").into())
}
