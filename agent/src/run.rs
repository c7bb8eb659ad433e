//! The agent's one loop: lease in, data plane out.
//!
//! Start-up: connect, wait for the network config, pick the interface, prepare the backend (which
//! fixes what the lease advertises, e.g. vxlan's VTEP MAC), acquire the lease, set the backend
//! up, write subnet.env. Then one `select!` over shutdown, renewal, lease events and a periodic
//! data-plane resync. Every backend plugs in through [`Prepared`] and [`DataPlane`]: the loop
//! hands it all remote leases and logs what it skipped. On shutdown the lease and the data plane
//! stay as they are, so a restart drops nothing (udp's persistent TUN device only loses the
//! packets that arrive while no agent reads it).

use crate::backend::{BackendError, DataPlane, NodeContext, Prepared, Remote};
use crate::netlink::{self, Netlink};
use crate::registry::{EtcdRegistry, LeaseWatch, Registry, RegistryError, Snapshot, WatchEvent};
use crate::rules::{Firewall, RuleSpec};
use crate::settings::Settings;
use crate::state::{AgentState, EventKind, LeaseEventView, LeaseView, PeerView};
use crate::subnet::{self, OwnLease, SubnetError};
use crate::watch::Lease;
use crate::watch::{Applied, LeaseChange, LeaseTable};
use ipnetwork::Ipv4Network;
use std::collections::HashSet;
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};
use tweed_config::{LeaseAttrs, NetworkConfig, SubnetEnv};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Netlink(#[from] netlink::NetlinkError),
    #[error(transparent)]
    Iface(#[from] netlink::IfaceError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    SubnetEnv(#[from] tweed_config::subnet_env::SubnetEnvError),
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    #[error("--metrics-addr {addr}: {source}")]
    MetricsListen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// How often the data plane is re-read and repaired even without lease events (reads only when
/// nothing drifted).
const DATAPLANE_RESYNC: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

#[derive(Clone)]
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

    // The servers come first, so /healthz and the API answer while etcd or the config is awaited.
    let state = AgentState::new();
    state.update(|s| {
        s.node = hostname();
        s.etcd_endpoints = settings.etcd_endpoints.join(",");
    });
    let mut servers = Vec::new();
    if let Some(addr) = settings.metrics_addr.0 {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| AgentError::MetricsListen { addr, source })?;
        let s = stop.clone();
        info!(%addr, "serving /metrics, /healthz, /readyz");
        servers.push(tokio::spawn(crate::http::serve(
            listener,
            state.clone(),
            async move { s.clone().wait().await },
        )));
    }
    let api_listener = crate::api::bind(&settings.api_socket)?;
    info!(socket = %settings.api_socket.display(), "serving the gRPC API");
    let control = crate::api::ControlSlot::default();
    {
        let s = stop.clone();
        let st = state.clone();
        let control = control.clone();
        servers.push(tokio::spawn(async move {
            if let Err(e) =
                crate::api::serve(
                    api_listener,
                    st,
                    control,
                    async move { s.clone().wait().await },
                )
                .await
            {
                error!("{e}");
            }
            Ok(())
        }));
    }
    let result = run_agent(settings, &mut stop, state, control).await;
    // An error ends the agent without a shutdown signal: the servers must not keep it alive.
    let graceful = stop.stopped();
    for s in servers {
        if !graceful {
            s.abort();
        }
        let _ = s.await;
    }
    result
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

async fn run_agent(
    settings: Settings,
    stop: &mut Stop,
    state: AgentState,
    control: crate::api::ControlSlot,
) -> Result<(), AgentError> {
    let mut stop = stop.clone();
    let registry = Arc::new(Registry::etcd(
        EtcdRegistry::connect(settings.etcd()).await?,
    ));
    let Some(cfg) = wait_for_config(&registry, &mut stop).await else {
        return Ok(());
    };
    info!(network = %cfg.network, subnet_len = cfg.subnet_len, backend = cfg.backend.type_name(), "network config");
    let _ = control.set(crate::api::Control {
        registry: registry.clone(),
        cfg: cfg.clone(),
        lease_ttl: settings.lease_ttl,
    });

    let nl = Netlink::real()?;
    let iface = netlink::iface::select(&nl, &settings.iface_choice()?).await?;
    let public_ip = settings.public_ip.unwrap_or(iface.ip);
    info!(iface = %iface.name, addr = %iface.ip, %public_ip, mtu = iface.mtu, "underlay interface");
    state.update(|s| {
        s.public_ip = public_ip.to_string();
        s.network = cfg.network.to_string();
        s.backend = cfg.backend.type_name().to_string();
    });

    let previous = SubnetEnv::read(&settings.subnet_file)
        .ok()
        .filter(|e| e.network == cfg.network)
        .map(|e| e.node_subnet());
    let node = NodeContext {
        network: cfg.network,
        public_ip,
        iface: iface.clone(),
        state_dir: settings.state_dir.clone(),
        udp_workers: settings.udp_workers(),
    };
    // The subnet is a placeholder until the lease is known.
    let placeholder = previous.unwrap_or(cfg.nth_subnet(0).expect("a network has subnets"));
    let (mut prepared, attrs) = Prepared::new(&nl, &cfg.backend, &node, placeholder).await?;

    let Some(own) = acquire_until_done(
        &registry, &cfg, &attrs, previous, &settings, &mut stop, &state,
    )
    .await
    else {
        return Ok(());
    };
    prepared.set_own_subnet(own.subnet());
    let backend = prepared.setup(&nl).await?;
    if let (DataPlane::Vxlan(b), Some(data)) = (&backend, &attrs.backend_data) {
        if !data.get().contains(&b.vtep_mac().to_string()) {
            // The device ended up with another MAC than advertised; the lease must say what is real.
            warn!(advertised = %data.get(), actual = %b.vtep_mac(), "VTEP MAC changed during set-up");
        }
    }
    write_subnet_env(&settings, &cfg, &own, backend.mtu())?;
    state.update(|s| s.mtu = backend.mtu());

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
        prepared,
        firewall: Firewall::new(settings.nftables),
        state,
        udp_seen: Default::default(),
    };
    agent.main_loop(&mut stop).await;
    agent.backend.stop().await;
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
    state: &AgentState,
) -> Option<OwnLease> {
    let mut backoff = Duration::from_millis(500);
    loop {
        match subnet::acquire(registry, cfg, attrs, previous, settings.lease_ttl).await {
            Ok(own) => {
                info!(subnet = %own.subnet(), lease = format!("{:x}", own.lease_id), reused = own.reused, "lease acquired");
                let m = &state.metrics;
                m.lease_acquisitions.inc();
                m.lease_info.reset();
                m.lease_info
                    .with_label_values(&[&own.subnet().to_string()])
                    .set(1);
                let expiry = if own.lease_id == 0 {
                    0
                } else {
                    unix_now() + settings.lease_ttl.as_secs() as i64
                };
                m.lease_expiry.set(expiry);
                state.update(|s| {
                    s.subnet = own.subnet().to_string();
                    s.lease_held = true;
                    s.lease_expiry_unix = expiry;
                });
                return Some(own);
            }
            Err(SubnetError::Alloc(e)) => {
                state
                    .metrics
                    .lease_failures
                    .with_label_values(&["acquire"])
                    .inc();
                error!("{e}; retrying")
            }
            Err(e) => {
                state
                    .metrics
                    .lease_failures
                    .with_label_values(&["acquire"])
                    .inc();
                state
                    .metrics
                    .etcd_errors
                    .with_label_values(&["acquire"])
                    .inc();
                warn!("acquiring a lease: {e}; retrying")
            }
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
        // Tells the CNI plugin the agent masquerades, so the plugin does not do it a second time.
        ipmasq: settings.ip_masq,
    };
    env.write_atomic(&settings.subnet_file)?;
    info!(path = %settings.subnet_file.display(), "wrote subnet.env");
    Ok(())
}

/// What the watch task hands the main loop.
enum Feed {
    Events(Vec<WatchEvent>),
    Resync(Snapshot),
    /// Whether a watch stream is established (readiness).
    Live(bool),
}

/// Owns the watch: snapshot, then watch from the next revision; on errors reconnect with backoff
/// from the last revision seen; on compaction re-list so the table can diff what was missed.
async fn watch_task(
    registry: Arc<Registry>,
    start_revision: i64,
    tx: mpsc::Sender<Feed>,
    state: AgentState,
) {
    let mut next = start_revision;
    let mut backoff = Duration::from_millis(200);
    let mut first = true;
    loop {
        if !first {
            state.metrics.watch_reconnects.inc();
        }
        first = false;
        let mut w: LeaseWatch = match registry.watch(next).await {
            Ok(w) => {
                let _ = tx.send(Feed::Live(true)).await;
                w
            }
            Err(e) => {
                watch_down(&state, &tx, &mut backoff, "watch", e).await;
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
                    watch_down(&state, &tx, &mut backoff, "watch broke", e).await;
                    break;
                }
            }
        }
    }
}

/// The watch is down: counted, reported as not live, then a backoff before the next attempt.
async fn watch_down(
    state: &AgentState,
    tx: &mpsc::Sender<Feed>,
    backoff: &mut Duration,
    what: &str,
    e: RegistryError,
) {
    state
        .metrics
        .etcd_errors
        .with_label_values(&["watch"])
        .inc();
    let _ = tx.send(Feed::Live(false)).await;
    warn!("{what}: {e}; retrying in {backoff:?}");
    tokio::time::sleep(*backoff).await;
    *backoff = next_backoff(*backoff);
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
    backend: DataPlane,
    /// Keys already warned about, so a bad lease is logged once rather than on every resync.
    warned: HashSet<String>,
    /// How to set the backend up again (lost device, new subnet).
    prepared: Prepared,
    firewall: Firewall,
    state: AgentState,
    /// udp counters at the last metrics export, to add only the difference.
    udp_seen: crate::backend::udp::io::Stats,
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
        let watcher = tokio::spawn(watch_task(
            self.registry.clone(),
            snap.revision + 1,
            tx,
            self.state.clone(),
        ));
        self.sync_rules().await;
        self.on_feed(Feed::Resync(snap), stop).await;

        let renew_every = subnet::renew_interval(
            self.settings.lease_ttl,
            self.settings.subnet_lease_renew_margin,
        );
        let mut renew_at = tokio::time::Instant::now() + renew_every;
        let mut resync = tokio::time::interval(DATAPLANE_RESYNC);
        resync.tick().await;
        let mut rules = tokio::time::interval(self.settings.iptables_resync);
        rules.tick().await;
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
                _ = rules.tick() => {
                    self.sync_rules().await;
                    self.export_udp_stats();
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
                self.state.metrics.lease_renewals.inc();
                let expiry = unix_now() + ttl.as_secs() as i64;
                self.state.metrics.lease_expiry.set(expiry);
                self.state.update(|s| s.lease_expiry_unix = expiry);
                every
            }
            Ok(None) => {
                warn!(subnet = %self.own.subnet(), "lease expired; re-acquiring");
                self.state
                    .metrics
                    .lease_failures
                    .with_label_values(&["renew"])
                    .inc();
                self.state.update(|s| s.lease_held = false);
                self.reacquire(stop).await;
                every
            }
            Err(e) => {
                self.state
                    .metrics
                    .lease_failures
                    .with_label_values(&["renew"])
                    .inc();
                self.state
                    .metrics
                    .etcd_errors
                    .with_label_values(&["renew"])
                    .inc();
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
            &self.state,
        )
        .await
        else {
            return;
        };
        if own.subnet() != self.own.subnet() {
            error!(old = %self.own.subnet(), new = %own.subnet(), "our subnet was taken while the lease was lost; moved to a new one (local pods need new addresses)");
            self.prepared.set_own_subnet(own.subnet());
            self.resetup().await;
            if let Err(e) = write_subnet_env(&self.settings, &self.cfg, &own, self.backend.mtu()) {
                error!("{e}");
            }
        }
        self.own = own;
        self.program().await;
        self.sync_rules().await;
    }

    /// Follows what etcd says about our key's lease: an operator's `reserve` detaches it from its
    /// TTL (lease 0: nothing to renew, it never expires) and `unreserve` attaches it to a fresh
    /// TTL lease, which we must renew from then on.
    fn adopt_own_lease_id(&mut self) {
        let Some(l) = self.table.get(&self.own.key) else {
            return;
        };
        if l.attrs.public_ip != self.public_ip || l.lease_id == self.own.lease_id {
            return;
        }
        let (old, new) = (self.own.lease_id, l.lease_id);
        self.own.lease_id = new;
        let expiry = if new == 0 {
            info!(subnet = %self.own.subnet(), old = format!("{old:x}"), "our lease is reserved now: no TTL, nothing to renew");
            0
        } else {
            info!(subnet = %self.own.subnet(), lease = format!("{new:x}"), "our lease has a TTL now; renewing it");
            unix_now() + self.settings.lease_ttl.as_secs() as i64
        };
        self.state.metrics.lease_expiry.set(expiry);
        self.state.update(|s| s.lease_expiry_unix = expiry);
    }

    async fn on_feed(&mut self, feed: Feed, stop: &mut Stop) {
        let received = std::time::Instant::now();
        let applied: Applied = match feed {
            Feed::Events(ev) => self.table.apply(&ev),
            Feed::Resync(snap) => self.table.resync(&snap.leases),
            Feed::Live(live) => {
                self.state.update(|s| s.watch_live = live);
                return;
            }
        };
        self.state
            .metrics
            .leases_skipped
            .inc_by(applied.skipped.len() as u64);
        for s in &applied.skipped {
            if self.warned.insert(format!("{}|{}", s.key, s.reason)) {
                warn!(key = %s.key, "skipping lease: {}", s.reason);
            }
        }
        let mut own_lost = false;
        for c in &applied.changes {
            let own = c.subnet() == self.own.subnet();
            let (kind, lease) = match c {
                LeaseChange::Added(l) => (EventKind::Added, l),
                LeaseChange::Updated { new, .. } => (EventKind::Updated, new),
                LeaseChange::Removed(l) => (EventKind::Removed, l),
            };
            let label = match kind {
                EventKind::Added => "added",
                EventKind::Updated => "updated",
                EventKind::Removed => "removed",
            };
            self.state
                .metrics
                .lease_events
                .with_label_values(&[label])
                .inc();
            self.state.publish(LeaseEventView {
                kind,
                lease: lease_view(lease, own),
                unix_millis: unix_now() * 1000,
            });
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
        self.adopt_own_lease_id();
        if own_lost && !stop.stopped() {
            warn!(subnet = %self.own.subnet(), "our lease was deleted; re-acquiring");
            self.reacquire(stop).await;
        }
        if !applied.changes.is_empty() {
            let own_subnet = self.own.subnet();
            let leases = self
                .table
                .leases()
                .map(|l| lease_view(l, l.key.ipv4 == own_subnet))
                .collect();
            self.state.update(|s| s.leases = leases);
            self.program().await;
            self.state
                .metrics
                .reconcile_seconds
                .observe(received.elapsed().as_secs_f64());
        }
    }

    /// Masquerade and forward rules; run on a blocking thread since they fork iptables or nft.
    async fn sync_rules(&mut self) {
        let spec = RuleSpec {
            network: self.cfg.network,
            subnet: self.own.subnet(),
            ip_masq: self.settings.ip_masq,
        };
        let fw = std::mem::replace(&mut self.firewall, Firewall::new(self.settings.nftables));
        let (fw, result) = tokio::task::spawn_blocking(move || {
            let r = fw.sync(&spec);
            (fw, r)
        })
        .await
        .expect("rule sync does not panic");
        self.firewall = fw;
        match result {
            Ok(true) => {
                self.state.metrics.rules_resyncs.inc();
                info!(
                    firewall = self.firewall.name(),
                    ip_masq = self.settings.ip_masq,
                    "rules (re)installed"
                );
            }
            Ok(false) => {}
            Err(e) => {
                self.state.metrics.rules_errors.inc();
                warn!("syncing {} rules: {e}", self.firewall.name());
            }
        }
    }

    /// Adds what the udp workers counted since the last export to the Prometheus counters.
    fn export_udp_stats(&mut self) {
        let DataPlane::Udp(b) = &self.backend else {
            return;
        };
        let now = b.stats();
        let last = std::mem::replace(&mut self.udp_seen, now);
        let m = &self.state.metrics;
        let d = |a: u64, b: u64| a.saturating_sub(b);
        m.udp_packets
            .with_label_values(&["tx"])
            .inc_by(d(now.tx_packets, last.tx_packets));
        m.udp_packets
            .with_label_values(&["rx"])
            .inc_by(d(now.rx_datagrams, last.rx_datagrams));
        m.udp_bytes
            .with_label_values(&["tx"])
            .inc_by(d(now.tx_bytes, last.tx_bytes));
        m.udp_bytes
            .with_label_values(&["rx"])
            .inc_by(d(now.rx_bytes, last.rx_bytes));
        for (reason, a, b) in [
            (
                "unknown_peer",
                now.drop_unknown_peer,
                last.drop_unknown_peer,
            ),
            (
                "spoofed_inner",
                now.drop_spoofed_inner,
                last.drop_spoofed_inner,
            ),
            ("not_for_us", now.drop_not_for_us, last.drop_not_for_us),
            ("malformed", now.drop_malformed, last.drop_malformed),
            ("not_remote", now.drop_not_remote, last.drop_not_remote),
            ("not_ready", now.drop_not_ready, last.drop_not_ready),
        ] {
            m.udp_drops.with_label_values(&[reason]).inc_by(d(a, b));
        }
    }

    /// Every other node's lease. Which of them the backend can serve is its decision.
    fn remotes(&self) -> Vec<Remote> {
        let own_subnet = self.own.subnet();
        self.table
            .leases()
            .filter(|l| l.key.ipv4 != own_subnet && l.attrs.public_ip != self.public_ip)
            .map(|l| Remote {
                subnet: l.key.ipv4,
                attrs: l.attrs.clone(),
            })
            .collect()
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

    async fn program(&mut self) {
        let remotes = self.remotes();
        let started = std::time::Instant::now();
        let stats = match self.backend.reconcile(&self.nl, &remotes).await {
            Ok(s) => s,
            Err(e) if e.is_device_gone() => {
                warn!("{e}; setting the backend up again");
                self.resetup().await;
                match self.backend.reconcile(&self.nl, &remotes).await {
                    Ok(s) => s,
                    Err(e) => return error!("programming the data plane: {e}"),
                }
            }
            Err(e) => return error!("programming the data plane: {e}"),
        };
        let m = &self.state.metrics;
        m.netlink_ops.inc_by(stats.ops_applied as u64);
        m.netlink_failures.inc_by(stats.failures.len() as u64);
        m.peers.reset();
        let programmed = remotes.len() - stats.skipped.len();
        m.peers
            .with_label_values(&[self.prepared.type_name()])
            .set(programmed as i64);
        let failed: HashSet<Ipv4Network> = stats.failures.iter().filter_map(|f| f.subnet).collect();
        let peers: Vec<PeerView> = remotes
            .iter()
            .map(|r| {
                let skip = stats.skipped.iter().find(|s| s.subnet == r.subnet);
                let error = skip.map(|s| s.reason.clone()).or_else(|| {
                    failed
                        .contains(&r.subnet)
                        .then(|| "netlink programming failed (see log)".to_string())
                });
                PeerView {
                    subnet: r.subnet.to_string(),
                    public_ip: r.attrs.public_ip.to_string(),
                    backend: r.attrs.effective_backend_type().to_string(),
                    programmed: error.is_none(),
                    error,
                }
            })
            .collect();
        let clean = stats.failures.is_empty();
        self.state.update(|s| {
            s.peers = peers;
            s.backend_programmed = clean;
        });
        for s in &stats.skipped {
            if self
                .warned
                .insert(format!("{}|{}|{}", s.subnet, s.public_ip, s.reason))
            {
                warn!(subnet = %s.subnet, peer = %s.public_ip, "{s}");
            }
        }
        if stats.ops_applied > 0 || !stats.failures.is_empty() {
            info!(
                peers = remotes.len(),
                skipped = stats.skipped.len(),
                ops = stats.ops_applied,
                failures = stats.failures.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "data plane programmed"
            );
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn lease_view(l: &Lease, own: bool) -> LeaseView {
    LeaseView {
        subnet: l.key.ipv4.to_string(),
        public_ip: l.attrs.public_ip.to_string(),
        backend_type: l.attrs.effective_backend_type().to_string(),
        backend_data: l
            .attrs
            .backend_data
            .as_ref()
            .map(|d| d.get().to_string())
            .unwrap_or_default(),
        lease_id: l.lease_id,
        own,
    }
}
