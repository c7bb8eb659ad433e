//! The agent's one loop: lease in, data plane out.
//!
//! Start-up: wait for the network config, pick the interface, prepare the backend (which fixes
//! what the lease advertises, e.g. vxlan's VTEP MAC), acquire the lease, set the backend up, write
//! subnet.env. Then one `select!` over shutdown, lease events, a lost lease and two periodic
//! repairs (data plane, rules; the rules check runs beside the loop, which only hears how it
//! went: see [`super::rulecheck`]). Every backend plugs in through [`Prepared`] and
//! [`DataPlane`](crate::backend::DataPlane): the loop hands it all remote leases. On shutdown the
//! lease and the data plane stay as they are, so a restart drops nothing (udp's persistent TUN
//! device only loses the packets that arrive while no agent reads it).

use super::dataplane::{Plane, PlaneConfig};
use super::deps::Deps;
use super::feed::{self, Feed, Feeds};
use super::lease::{self, LeaseKeeper};
use super::repair::{Echoes, Schedule, Trigger, Watched};
use super::report::Report;
use super::stop::{next_backoff, Stop};
use super::underlay6::{Check6, Underlay6};
use super::AgentError;
use crate::backend::{NodeContext, Prepared, Remote};
use crate::netlink::{self, Event, Events, NetlinkError};
use crate::registry::Registry;
use crate::settings::Settings;
use crate::subnet;
use crate::watch::LeaseTable;
use ipnetwork::Ipv4Network;
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};
use tweed_config::subnet_env::SubnetEnvError;
use tweed_config::{NetworkConfig, ParsedNetwork, SubnetEnv, SubnetKey};

/// How often the data plane is re-read and repaired even without lease events (reads only when
/// nothing drifted).
const DATAPLANE_RESYNC: Duration = Duration::from_secs(60);
/// How often the udp/wireguard counters and per-peer wireguard figures (handshake age, bytes)
/// are refreshed for the API and metrics, and an unpublished rotated key is written to the lease again.
const PEER_STATS: Duration = Duration::from_secs(5);
/// How often the main loop says it is alive (/healthz, systemd's watchdog).
const BEAT: Duration = Duration::from_secs(1);
/// A main-loop turn this long is logged (debug) with what it did.
const SLOW_TURN: Duration = Duration::from_millis(2);

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
        notifier,
        ipv6_addrs,
    } = deps;
    let report = Report::new(state, clock);
    let cfg = match wait_for_config(&registry, &mut stop).await {
        None => return Ok(()),
        Some(ParsedNetwork::Ipv4(cfg)) => cfg,
        Some(ParsedNetwork::Ipv6Only(net)) => {
            // Reserve/unreserve act on the IPv6-only keys, which the loop follows; no command
            // reaches the loop (its wireguard backend has no key rotation yet).
            let _ = control.set(crate::api::Control {
                registry: registry.clone(),
                cfg: crate::api::ControlNetwork::Ipv6Only(net.ipv6.clone()),
                lease_ttl: settings.lease_ttl,
                commands: tokio::sync::mpsc::channel(1).0,
            });
            let deps = super::v6only::V6Only {
                registry,
                nl,
                firewall: Arc::new(firewall),
                report,
                ipv6_addrs,
                notifier,
            };
            let result = super::v6only::run(deps, settings, net, &mut stop).await;
            match &result {
                Ok(()) => info!("shutting down; lease and data plane left in place"),
                Err(e) => error!("{e}"),
            }
            return result;
        }
    };
    info!(network = %cfg.network, subnet_len = cfg.subnet_len, backend = cfg.backend.type_name(), "network config");
    let (commands_tx, commands) = tokio::sync::mpsc::channel(4);
    let _ = control.set(crate::api::Control {
        registry: registry.clone(),
        cfg: cfg.clone().into(),
        lease_ttl: settings.lease_ttl,
        commands: commands_tx,
    });

    let iface = netlink::iface::select(&nl, &settings.iface_choice()?).await?;
    let public_ip = settings.public_ip.unwrap_or(iface.ip);
    info!(iface = %iface.name, addr = %iface.ip, %public_ip, mtu = iface.mtu, "underlay interface");
    let choice = format!("{} {} {}", iface.name, iface.ip, public_ip);
    match remember_underlay(&settings.state_dir.join("underlay"), &choice) {
        Ok(Some(before)) => warn!(
            before = %before,
            now = %choice,
            "the underlay choice (interface, address, public IP) changed since the last start; peers are told the new public IP through the lease"
        ),
        Ok(None) => {}
        Err(e) => warn!("{e}"),
    }
    report.network(&cfg, public_ip);

    let kept_file = settings.state_dir.join(KEPT_SUBNET_FILE);
    let previous = previous_subnet(
        cfg.network,
        SubnetEnv::read(&settings.subnet_file),
        SubnetEnv::read(&kept_file),
    );
    let underlay = iface.index;
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
    let placeholder = previous
        .map(|k| k.ipv4)
        .unwrap_or(cfg.nth_subnet(0).expect("a network has subnets"));
    let (mut prepared, attrs) = Prepared::new(&nl, &cfg.backend, &node, placeholder).await?;
    let ipv6 = ipv6_mode(&cfg, &settings, &ipv6_addrs, &node.iface);
    report.ipv6_mode(&ipv6);
    prepared.check_ipv6_underlay(&cfg.backend, &ipv6)?;
    let wg_mode = match &cfg.backend {
        tweed_config::BackendConfig::Wireguard(w) => Some(w.mode),
        _ => None,
    };
    let underlay6 = super::underlay6::watcher(
        &ipv6,
        prepared.type_name(),
        wg_mode,
        settings.public_ipv6,
        node.iface.index,
        node.iface.name.clone(),
        ipv6_addrs.clone(),
    );
    let attrs = match (&ipv6, &cfg.ipv6) {
        (crate::ipv6::Ipv6Mode::DualStack { public_ipv6 }, Some(v6)) => {
            prepared.with_ipv6(attrs, *public_ipv6, v6, &cfg.backend)?
        }
        _ => attrs,
    };

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
        kept_subnet_file: kept_file,
        underlay,
        tx_csum_off: !settings.vxlan_tx_checksum_offload,
        ipv6_network: cfg.ipv6.as_ref().map(|c| c.network),
        ipv6_plane: match (&cfg.ipv6, &ipv6) {
            (Some(c), crate::ipv6::Ipv6Mode::DualStack { public_ipv6 }) => {
                Some((c.clone(), *public_ipv6))
            }
            _ => None,
        },
    };
    // Subscribed before the data plane is checked, so no drift after that check goes unseen.
    let events = subscribe(&nl);
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
    let watched = plane.watched();
    let mut agent = Agent {
        notifier,
        told_ready: false,
        table: LeaseTable::new(registry.prefix(), cfg.network, cfg.subnet_len),
        kernel: Kernel {
            nl: events.1,
            events: events.0,
            watched,
            schedule: Schedule::default(),
            echoes: Echoes::default(),
        },
        registry,
        public_ip,
        ipv6_cfg: cfg.ipv6.clone(),
        backend_cfg: cfg.backend.clone(),
        underlay6,
        to_v4: None,
        lease,
        plane,
        report,
        commands,
    };
    let result = agent.main_loop(&mut stop, settings.iptables_resync).await;
    agent.plane.stop().await;
    match &result {
        Ok(()) => info!("shutting down; lease and data plane left in place"),
        Err(e) => error!("{e}; lease and data plane left in place"),
    }
    result
}

/// What this node does with the network's IPv6 half: dual stack with `--public-ipv6` or the
/// interface's global address, else IPv4 only, said in the log (flannel refuses to start there;
/// the node stays useful over IPv4, and peers skip the IPv6 half of a lease that has none).
fn ipv6_mode(
    cfg: &NetworkConfig,
    settings: &Settings,
    addrs: &crate::ipv6::Ipv6Addrs,
    iface: &netlink::iface::Iface,
) -> crate::ipv6::Ipv6Mode {
    use crate::ipv6::Ipv6Mode;
    let Some(v6) = &cfg.ipv6 else {
        return Ipv6Mode::Off;
    };
    let listed = addrs.list().unwrap_or_else(|e| {
        warn!("{e}");
        Vec::new()
    });
    match crate::ipv6::public_ipv6(settings.public_ipv6, iface.index, &listed) {
        Some(public_ipv6) => {
            info!(%public_ipv6, ipv6_network = %v6.network, "dual stack");
            Ipv6Mode::DualStack { public_ipv6 }
        }
        None => {
            let mode = Ipv6Mode::V4Only {
                iface: iface.name.clone(),
            };
            warn!(ipv6_network = %v6.network, "{}", mode.status());
            mode
        }
    }
}

/// Records `choice` (interface, address, public IP) in `path` and returns the one recorded by
/// the previous start when it differs: a choice that changes between restarts (an address added,
/// interfaces renumbered) is worth a warning, since peers then reach this node elsewhere.
fn remember_underlay(path: &std::path::Path, choice: &str) -> Result<Option<String>, String> {
    let before = std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string());
    if before.as_deref() == Some(choice) {
        return Ok(None);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{choice}\n"))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("recording the underlay choice in {}: {e}", path.display()))?;
    Ok(before.filter(|b| !b.is_empty()))
}

#[cfg(test)]
#[test]
fn a_changed_underlay_choice_is_reported_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state/underlay");
    assert_eq!(
        remember_underlay(&path, "eth0 198.18.0.1 198.18.0.1"),
        Ok(None)
    );
    assert_eq!(
        remember_underlay(&path, "eth0 198.18.0.1 198.18.0.1"),
        Ok(None)
    );
    assert_eq!(
        remember_underlay(&path, "eth1 10.0.0.1 10.0.0.1"),
        Ok(Some("eth0 198.18.0.1 198.18.0.1".into()))
    );
    assert_eq!(remember_underlay(&path, "eth1 10.0.0.1 10.0.0.1"), Ok(None));
}

/// The kernel's notifications, or none (the periodic relist then is the only repair).
pub(super) fn subscribe(nl: &netlink::Netlink) -> (Option<Events>, netlink::Netlink) {
    match nl.events() {
        Ok(e) => (Some(e), nl.clone()),
        Err(e) => {
            error!("cannot subscribe to kernel notifications, drift is repaired only by the periodic relist: {e}");
            (None, nl.clone())
        }
    }
}

/// The next notification; never, without a subscription.
pub(super) async fn next_event(events: &mut Option<Events>) -> Option<Result<Event, NetlinkError>> {
    match events {
        Some(e) => e.next().await,
        None => std::future::pending().await,
    }
}

/// The next change `nft monitor` saw to tweed's table; never, without nftables.
async fn nft_change(nft: &mut Option<super::nftmon::NftMonitor>) -> Option<()> {
    match nft {
        Some(m) => m.changes.recv().await,
        None => std::future::pending().await,
    }
}

/// When the scheduled repair is due; never, with none scheduled.
pub(super) async fn repair_due(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn wait_for_config(registry: &Registry, stop: &mut Stop) -> Option<ParsedNetwork> {
    let key = registry.config_key();
    let mut backoff = Duration::from_millis(500);
    let mut said_waiting = false;
    let mut last_bad: Option<String> = None;
    loop {
        match registry.get_config().await {
            Ok(Some(json)) => match NetworkConfig::parse_any(&json) {
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

/// Kernel notifications and the repairs they schedule.
struct Kernel {
    nl: netlink::Netlink,
    events: Option<Events>,
    watched: Watched,
    schedule: Schedule,
    /// Our own recent writes, whose notifications are no drift.
    echoes: Echoes,
}

/// A dual-stack node turning IPv4 only ([`Check6::Gone`]): the lease's rename to its IPv4-only
/// key runs in a task, retried with backoff while etcd fails, and the lease, subnet.env, the
/// rules and the IPv6 plane stay dual until it is done, so they always agree. Meanwhile our
/// key's events (its old name deleted by the rename), its expiry and the address checks wait:
/// the rename's acquisition answers for all of them.
struct ToV4 {
    /// The address that left.
    from: std::net::Ipv6Addr,
    /// What the lease advertises once IPv4 only.
    attrs: tweed_config::LeaseAttrs,
    /// The attempt running; `None` while waiting for `retry_at`.
    attempt: Option<tokio::task::JoinHandle<Result<subnet::OwnLease, subnet::SubnetError>>>,
    retry_at: Option<tokio::time::Instant>,
    backoff: Duration,
}

/// The first retry of a failed rename to the IPv4-only key; then doubled up to the agent's cap.
const TO_V4_RETRY: Duration = Duration::from_millis(500);

/// How long a shutdown waits for a rename to the IPv4-only key under way.
const TO_V4_SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// The end of the rename attempt running; never, without one.
async fn to_v4_done(
    to_v4: &mut Option<ToV4>,
) -> Result<Result<subnet::OwnLease, subnet::SubnetError>, tokio::task::JoinError> {
    match to_v4.as_mut().and_then(|t| t.attempt.as_mut()) {
        Some(task) => task.await,
        None => std::future::pending().await,
    }
}

/// The running agent: everyone's leases, ours, and the data plane made of them.
struct Agent {
    kernel: Kernel,
    notifier: crate::notify::Notifier,
    /// systemd was told READY=1 (once; readiness lost later shows in /readyz).
    told_ready: bool,
    registry: Arc<Registry>,
    public_ip: Ipv4Addr,
    /// The network's IPv6 half (`EnableIPv6`), for a node that turns dual stack at run time.
    ipv6_cfg: Option<tweed_config::Ipv6Config>,
    /// The network's `Backend`, for the IPv6 half a node turning dual advertises (wireguard's
    /// `BackendV6Data` port by `Mode`).
    backend_cfg: tweed_config::BackendConfig,
    /// The `PublicIPv6` follower, when this node runs dual stack or waits for an address to.
    underlay6: Option<Underlay6>,
    /// Turning IPv4 only, until the lease is renamed ([`ToV4`]).
    to_v4: Option<ToV4>,
    table: LeaseTable,
    lease: LeaseKeeper,
    plane: Plane,
    report: Report,
    /// The API's requests (a key rotation).
    commands: tokio::sync::mpsc::Receiver<crate::api::Command>,
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
        // The first check is awaited, as before the loop ran checks beside it: a node says
        // ready (READY=1, pods start) only with its masquerade rules in place. No lease event
        // is handled before the initial listing anyway.
        self.plane.sync_rules(self.lease.own().subnet());
        let first = self.plane.rules_finished().await;
        self.plane.on_rules(first);
        self.on_feed(Feed::Resync(snap), stop).await;
        release_freed_heap();

        let mut resync = tokio::time::interval(DATAPLANE_RESYNC);
        resync.tick().await;
        let mut rules = tokio::time::interval(rules_every);
        rules.tick().await;
        let mut beat = tokio::time::interval(BEAT);
        let mut peer_stats = tokio::time::interval(PEER_STATS);
        let mut nft = self
            .plane
            .rules_monitor_scope()
            .await
            .map(super::nftmon::NftMonitor::spawn);
        let mut nft_due: Option<tokio::time::Instant> = None;
        loop {
            let switching = self.to_v4.is_some();
            let v4_retry = self.to_v4.as_ref().and_then(|t| t.retry_at);
            // Read before the select: the rules arm's future borrows the plane.
            let teardown_due = self.plane.teardown_v6_due();
            let (arm, began) = tokio::select! {
                _ = stop.wait() => {
                    self.finish_v4_attempt().await;
                    return Ok(());
                }
                feed = feeds.next() => {
                    let began = Instant::now();
                    self.on_feed(feed?, stop).await;
                    ("lease event", began)
                }
                id = self.lease.expired(), if !switching => {
                    let began = Instant::now();
                    let old = self.lease.own().subnet();
                    if self.lease.on_expired(id?, stop).await {
                        self.after_reacquire(old).await;
                    }
                    ("lease lost", began)
                }
                ev = next_event(&mut self.kernel.events) => {
                    let began = Instant::now();
                    self.on_kernel_event(ev);
                    ("kernel notification", began)
                }
                _ = repair_due(self.kernel.schedule.due()) => {
                    let began = Instant::now();
                    self.repair().await;
                    ("repair", began)
                }
                _ = repair_due(self.underlay6.as_ref().and_then(Underlay6::due)), if !switching => {
                    let began = Instant::now();
                    self.follow_public_ipv6(stop).await;
                    ("public ipv6", began)
                }
                done = to_v4_done(&mut self.to_v4) => {
                    let began = Instant::now();
                    self.on_v4_attempt(done).await;
                    ("ipv4 only", began)
                }
                _ = repair_due(v4_retry) => {
                    let began = Instant::now();
                    self.try_v4_only();
                    ("ipv4 only retry", began)
                }
                _ = repair_due(teardown_due) => {
                    let began = Instant::now();
                    self.plane.teardown_v6().await;
                    ("ipv6 teardown", began)
                }
                _ = beat.tick() => {
                    let began = Instant::now();
                    self.beat();
                    ("beat", began)
                }
                Some(cmd) = self.commands.recv() => {
                    let began = Instant::now();
                    self.on_command(cmd).await;
                    ("api command", began)
                }
                _ = peer_stats.tick() => {
                    let began = Instant::now();
                    self.plane.export_udp_stats().await;
                    if !self.lease.republish().await {
                        warn!("the lease still advertises the old wireguard key; retrying");
                    }
                    ("peer stats", began)
                }
                Some(()) = nft_change(&mut nft) => {
                    let began = Instant::now();
                    // Our own writes echo too: gather a burst, then one listing decides.
                    nft_due.get_or_insert(tokio::time::Instant::now() + super::repair::DEBOUNCE);
                    ("nft notification", began)
                }
                _ = repair_due(nft_due) => {
                    let began = Instant::now();
                    nft_due = None;
                    self.plane.sync_rules(self.lease.own().subnet());
                    ("rules after nft change", began)
                }
                _ = resync.tick() => {
                    let began = Instant::now();
                    // The backstop for lost notifications: reads only, unless something drifted.
                    let since = tokio::time::Instant::now();
                    let all = [Trigger::Lost].into_iter().collect();
                    let own = self.lease.own().subnet();
                    let remotes = told_remotes(&self.report, &self.table, own, self.public_ip, Some(&[]));
                    let r = self.plane.repair(&remotes, &all).await;
                    self.kernel.echoes.record(&r.ops, tokio::time::Instant::now());
                    self.report.repaired("periodic relist", &r, since.elapsed());
                    self.kernel.watched = self.plane.watched();
                    ("periodic relist", began)
                }
                _ = rules.tick() => {
                    let began = Instant::now();
                    // Started (or merged into the next check), not awaited: the outcome comes
                    // back in the arm below.
                    self.plane.sync_rules(self.lease.own().subnet());
                    self.plane.export_udp_stats().await;
                    ("rules check", began)
                }
                done = self.plane.rules_finished() => {
                    let began = Instant::now();
                    self.plane.on_rules(done);
                    ("rules outcome", began)
                }
            };
            // A lease event arriving meanwhile waits for this turn: the long ones are named,
            // to attribute a slow lease -> route (lease_event_wait_seconds says how often).
            let took = began.elapsed();
            if took >= SLOW_TURN {
                debug!(arm, took_us = took.as_micros() as u64, "main loop turn");
            }
        }
    }

    async fn on_command(&mut self, cmd: crate::api::Command) {
        match cmd {
            crate::api::Command::RotateWireguardKey(reply) => {
                let r = self.rotate_wireguard_key().await;
                let _ = reply.send(r);
            }
        }
    }

    /// A new key in the file, in use, then in the lease: peers that see the lease replace our
    /// old peer entry and handshake with the new key (ours already answers to it; the other way
    /// round, they would be refused until our table changed).
    async fn rotate_wireguard_key(
        &mut self,
    ) -> Result<tweed_api::v1::RotateWireguardKeyReply, tonic::Status> {
        let (old, new, attrs) = self
            .plane
            .rotate_wireguard_key(self.lease.attrs())
            .map_err(|e| match e {
                super::dataplane::RotateError::NotWireguard(_) => {
                    tonic::Status::failed_precondition(e.to_string())
                }
                _ => tonic::Status::internal(e.to_string()),
            })?;
        self.program().await;
        let published = self.lease.publish(attrs).await;
        self.plane.export_wireguard_peers();
        info!(%old, %new, published, "wireguard: key rotated");
        Ok(tweed_api::v1::RotateWireguardKeyReply {
            old_public_key: old.to_string(),
            new_public_key: new.to_string(),
            published,
        })
    }

    /// Liveness for /healthz and systemd's watchdog, and READY=1 the first time the node is ready.
    fn beat(&mut self) {
        let ready = self.report.beat();
        if let Err(e) = self.notifier.watchdog() {
            warn!("{e}");
        }
        if ready && !self.told_ready {
            self.told_ready = true;
            match self.notifier.ready() {
                Ok(()) => info!("ready: lease held, data plane programmed, subnet.env written"),
                Err(e) => warn!("{e}"),
            }
        }
    }

    fn on_kernel_event(&mut self, ev: Option<Result<Event, NetlinkError>>) {
        let now = tokio::time::Instant::now();
        match ev {
            Some(Ok(e)) => {
                if let Some(u) = self.underlay6.as_mut() {
                    u.note(&e, now);
                }
                if let Some(t) = self.kernel.watched.trigger(&e) {
                    if !self.kernel.echoes.is_echo(&e, now) {
                        self.kernel.schedule.note(t, now);
                    }
                }
            }
            Some(Err(e)) => {
                // Whatever happened while the socket failed is unknown: re-read it all.
                warn!("kernel notifications: {e}; subscribing again");
                self.kernel.events = subscribe(&self.kernel.nl).0;
                self.kernel.schedule.note(Trigger::Lost, now);
            }
            None => {
                warn!("kernel notifications ended; drift is repaired by the periodic relist only");
                self.kernel.events = None;
            }
        }
    }

    /// The repair the notifications scheduled; retried with backoff while it fails.
    async fn repair(&mut self) {
        let now = tokio::time::Instant::now();
        let Some(due) = self.kernel.schedule.take(now) else {
            return;
        };
        let own = self.lease.own().subnet();
        let remotes = told_remotes(&self.report, &self.table, own, self.public_ip, Some(&[]));
        let r = self.plane.repair(&remotes, &due.triggers).await;
        self.kernel
            .echoes
            .record(&r.ops, tokio::time::Instant::now());
        let cause: Vec<&str> = due.triggers.iter().map(|t| t.as_str()).collect();
        self.report
            .repaired(&cause.join(","), &r, due.since.elapsed());
        self.kernel.watched = self.plane.watched();
        // Rules have no notifications; a device coming and going is when they get flushed.
        if due
            .triggers
            .iter()
            .any(|t| matches!(t, Trigger::Device | Trigger::Underlay | Trigger::Lost))
        {
            self.plane.sync_rules(self.lease.own().subnet());
        }
        if r.clean {
            self.kernel.schedule.succeeded();
        } else {
            self.kernel
                .schedule
                .failed(due, tokio::time::Instant::now());
        }
    }

    async fn on_feed(&mut self, feed: Feed, stop: &mut Stop) {
        let taken = Instant::now();
        // A resync rebuilds the API's lease views; events update them by key.
        let (applied, by_key, received, revision) = match feed {
            Feed::Events(ev, received) => {
                let revision = ev.last().map(|e| e.revision()).unwrap_or_default();
                (self.table.apply(&ev), true, received, revision)
            }
            Feed::Resync(snap) => (self.table.resync(&snap.leases), false, taken, snap.revision),
            Feed::Live(live) => return self.report.watch_live(live),
        };
        let own = self.lease.own();
        self.report.lease_changes(&applied, own.subnet());
        // The whole key: a renamed lease (its IPv6 half changed) removes an old key naming the
        // same IPv4 subnet, which is not ours any more; the table reports a rename as an update.
        // While turning IPv4 only, the rename deletes our old key itself, and its acquisition
        // answers for a conflict or a loss too.
        let own_lost = self.to_v4.is_none()
            && applied
                .changes
                .iter()
                .any(|c| c.key_gone() == Some(&own.key));
        self.lease.follow(&self.table);
        if !own_lost
            && !stop.stopped()
            && self.to_v4.is_none()
            && self.lease.conflicts(&self.table, &applied)
            && self.lease.resolve_conflict(stop).await == lease::ConflictAction::Moved
        {
            self.after_reacquire(own.subnet()).await;
        }
        if own_lost && !stop.stopped() {
            warn!(subnet = %own.subnet(), "our lease was deleted; re-acquiring");
            if self.lease.reacquire(stop).await {
                self.after_reacquire(own.subnet()).await;
            }
        }
        if !applied.changes.is_empty() {
            // The kernel first: the API's view of 10,000 leases takes milliseconds to rebuild,
            // and the new peer's route must not wait for it.
            if by_key {
                let changed = changed_subnets(&applied.changes);
                self.program_changed(Some(&changed)).await;
            } else {
                self.program().await;
            }
            self.report.reconciled_in(received, taken);
            // Per event, for attributing a slow lease -> route sample (bench/controlplane):
            // the log line's time is the end; waited is the main loop being busy elsewhere.
            debug!(
                revision,
                waited_us = taken.saturating_duration_since(received).as_micros() as u64,
                handled_us = taken.elapsed().as_micros() as u64,
                "lease event programmed"
            );
            let changes = by_key.then_some(applied.changes.as_slice());
            self.report
                .leases(&self.table, self.lease.own().subnet(), changes);
        }
    }

    /// The `PublicIPv6` check the underlay's address notifications scheduled: when the address
    /// moved, the lease advertises the new one (retried with the other unpublished attributes
    /// while etcd is away) and the IPv6 plane is set up again on it; peers follow the lease.
    /// A node that ran IPv4 only turns dual stack instead ([`turn_dual`](Self::turn_dual)).
    async fn follow_public_ipv6(&mut self, stop: &mut Stop) {
        let to = match self.underlay6.as_mut().and_then(Underlay6::check) {
            None => return,
            Some(Check6::Appeared(to)) => return self.turn_dual(to, stop).await,
            Some(Check6::Gone(from)) => return self.turn_v4_only(from),
            Some(Check6::Moved(to)) => to,
        };
        self.report
            .ipv6_mode(&crate::ipv6::Ipv6Mode::DualStack { public_ipv6: to });
        self.plane.set_public_ipv6(to);
        self.program().await;
        let attrs = crate::ipv6::with_public_ipv6(self.lease.attrs().clone(), to);
        if !self.lease.publish(attrs).await {
            warn!(public_ipv6 = %to, "the lease still advertises the old PublicIPv6; retrying");
        }
    }

    /// This node started IPv4 only in a dual-stack network and has a usable IPv6 address now
    /// (issue 19): the lease advertises it as `PublicIPv6` and takes its IPv6 half (the key is
    /// renamed to `v4&v6`, the IPv4 half kept, so peers see an update, never a removal), then
    /// the IPv6 plane is set up as at a dual-stack start (vxlan's `tweed-v6.<VNI>`, host-gw's
    /// IPv6 routes, udp set up again to carry IPv6, wireguard's `tweed-wg-v6` or IPv6 on
    /// `tweed-wg` by `Mode`), with subnet.env and the rules following.
    /// The node counts as dual only once the key has the IPv6 half; otherwise the watcher waits
    /// for the next address change.
    async fn turn_dual(&mut self, to: std::net::Ipv6Addr, stop: &mut Stop) {
        let Some(cfg6) = self.ipv6_cfg.clone() else {
            return;
        };
        info!(
            public_ipv6 = %to,
            ipv6_network = %cfg6.network,
            "a usable IPv6 address appeared on the underlay interface: turning dual stack (taking the lease's IPv6 half, setting the IPv6 data plane up)"
        );
        let current = self.lease.attrs().clone();
        let attrs = match self.plane.dual_attrs(current, to, &cfg6, &self.backend_cfg) {
            Ok(a) => a,
            Err(e) => {
                error!(public_ipv6 = %to, "turning dual stack: {e}; the node stays IPv4 only");
                if let Some(u) = self.underlay6.as_mut() {
                    u.stayed_ipv4_only(to);
                }
                return;
            }
        };
        let old = self.lease.own().subnet();
        let held = self.lease.take_ipv6_half(attrs, stop).await;
        // Dual only once the key names an IPv6 subnet: before that, subnet.env, the rules and
        // the status stay IPv4 only and the watcher keeps waiting.
        let dual = held && self.lease.own().key.ipv6.is_some();
        if let Some(u) = self.underlay6.as_mut() {
            if dual {
                u.turned_dual(to);
            } else {
                u.stayed_ipv4_only(to);
            }
        }
        if dual {
            self.report
                .ipv6_mode(&crate::ipv6::Ipv6Mode::DualStack { public_ipv6: to });
            self.plane.enable_ipv6(cfg6, to);
        }
        if held {
            // Also without the IPv6 half: the lease was taken again, maybe on another subnet.
            self.after_reacquire(old).await;
        }
    }

    /// A vxlan or host-gw node's last usable IPv6 address left the underlay for the grace
    /// period (issue 19): the node turns IPv4 only. The lease is renamed to its IPv4-only key
    /// (the IPv4 subnet kept, so peers see an update and keep their IPv4 route) in a task, and
    /// only once that is done do subnet.env, the rules, the status and the IPv6 plane follow
    /// ([`on_v4_attempt`](Self::on_v4_attempt)).
    fn turn_v4_only(&mut self, from: std::net::Ipv6Addr) {
        warn!(
            %from,
            grace = ?super::underlay6::GRACE,
            "no usable IPv6 address on the underlay interface for the grace period: turning IPv4 only (renaming the lease to its IPv4 half, then removing the IPv6 data plane and rules)"
        );
        self.to_v4 = Some(ToV4 {
            from,
            attrs: crate::ipv6::without_ipv6(self.lease.attrs().clone()),
            attempt: None,
            retry_at: None,
            backoff: TO_V4_RETRY,
        });
        self.try_v4_only();
    }

    /// Starts an attempt at the rename to the IPv4-only key.
    fn try_v4_only(&mut self) {
        if let Some(t) = self.to_v4.as_mut() {
            t.retry_at = None;
            // What the lease advertises now: a key rotated since the last attempt included.
            t.attrs = crate::ipv6::without_ipv6(self.lease.attrs().clone());
            t.attempt = Some(self.lease.spawn_acquire(t.attrs.clone()));
        }
    }

    /// Shutting down during a rename to the IPv4-only key: its two writes are let finish (up to
    /// [`TO_V4_SHUTDOWN_WAIT`]) and committed, so the files left for the next start match etcd.
    /// One still running then is cut like a killed agent's, whose leftover key the next
    /// acquisition removes.
    async fn finish_v4_attempt(&mut self) {
        let Some(task) = self.to_v4.as_mut().and_then(|t| t.attempt.as_mut()) else {
            return;
        };
        info!("shutting down: letting the lease's rename to its IPv4-only key finish");
        match tokio::time::timeout(TO_V4_SHUTDOWN_WAIT, task).await {
            Ok(done) => self.on_v4_attempt(done).await,
            Err(_) => warn!(
                wait = ?TO_V4_SHUTDOWN_WAIT,
                "the lease's rename to its IPv4-only key did not finish; the next start completes it"
            ),
        }
    }

    /// An attempt at the rename ended: committed when the key is IPv4 only, else (etcd failed,
    /// the task died) everything stays dual and it is tried again after a backoff.
    async fn on_v4_attempt(
        &mut self,
        done: Result<Result<subnet::OwnLease, subnet::SubnetError>, tokio::task::JoinError>,
    ) {
        let Some(t) = self.to_v4.as_mut() else {
            return;
        };
        t.attempt = None;
        let own = match done {
            Ok(Ok(own)) if own.key.ipv6.is_none() => own,
            failed => {
                let why = match failed {
                    Ok(Ok(own)) => format!("the lease came back as {} (dual)", own.key),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => format!("the attempt died: {e}"),
                };
                warn!(
                    retry_in = ?t.backoff,
                    "turning IPv4 only: renaming the lease to its IPv4 half: {why}; the node stays dual stack until it is done"
                );
                self.report.v4_only_attempt_failed();
                t.retry_at = Some(tokio::time::Instant::now() + t.backoff);
                t.backoff = next_backoff(t.backoff);
                return;
            }
        };
        let Some(ToV4 { from, attrs, .. }) = self.to_v4.take() else {
            return;
        };
        let old = self.lease.own().subnet();
        if !self.lease.switched_v4_only(own, attrs).await {
            warn!("turned IPv4 only: the lease's attributes published meanwhile (a rotated key) are not in etcd yet; retrying");
        }
        let iface = self
            .underlay6
            .as_mut()
            .map(|u| {
                u.went_v4_only();
                u.iface().to_string()
            })
            .unwrap_or_default();
        self.report
            .ipv6_mode(&crate::ipv6::Ipv6Mode::V4Only { iface });
        // subnet.env and the MTU first: the CNI plugin stops handing out IPv6 addresses. A key
        // taken meanwhile moved us: that subnet.env names the new subnet already.
        self.plane.name_own_subnet(self.lease.own().subnet());
        self.plane.disable_ipv6();
        self.after_reacquire(old).await;
        self.plane.teardown_v6().await;
        info!(
            %from,
            subnet = %self.lease.own().subnet(),
            "turned IPv4 only: the lease has no IPv6 half, subnet.env and the status say IPv4 only; an IPv6 address on the underlay interface turns the node dual stack again"
        );
    }

    /// A lease is held again after a loss; `old` is the subnet we had.
    async fn after_reacquire(&mut self, old: ipnetwork::Ipv4Network) {
        let new = self.lease.own().subnet();
        // The subnet.env `set_own_v6` writes must not name `old` when it was taken.
        self.plane.name_own_subnet(new);
        self.plane.set_own_v6(self.lease.own().key.ipv6);
        if new != old {
            self.report.subnet_moved(old, new);
            // Sets the backend up again, in the mode the lease's IPv6 half asks for.
            self.plane.move_to(new).await;
        } else {
            self.plane.follow_dual_mode().await;
        }
        self.program().await;
        self.plane.sync_rules(new);
    }

    async fn program(&mut self) {
        self.program_changed(None).await
    }

    /// [`program`](Self::program); `changed`: only these leases (IPv4 subnets) changed since
    /// the last programming, which lets the backend plan them alone.
    async fn program_changed(&mut self, changed: Option<&[Ipv4Network]>) {
        let own = self.lease.own().subnet();
        let remotes = told_remotes(&self.report, &self.table, own, self.public_ip, changed);
        let stats = match changed {
            Some(c) => self.plane.program_changed(&remotes, c).await,
            None => self.plane.program(&remotes).await,
        };
        if let Some(stats) = stats {
            self.kernel
                .echoes
                .record(&stats.applied, tokio::time::Instant::now());
        }
        // Programming may have set the IPv6 plane up again (our IPv6 subnet changed), with a
        // new device index to watch.
        self.kernel.watched = self.plane.watched();
    }
}

/// The IPv4 subnets whose leases a batch touched: a renamed lease's old and new key.
fn changed_subnets(changes: &[crate::watch::LeaseChange]) -> Vec<Ipv4Network> {
    let mut out: Vec<Ipv4Network> = Vec::with_capacity(changes.len() + 1);
    for c in changes {
        out.push(c.subnet());
        if let Some(old) = c.key_gone() {
            out.push(old.ipv4);
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// [`remotes`] for a reconcile, the report told first which leases changed since the last one
/// (`None`: any), as its peer views' short path needs: the one way the run loop makes them.
fn told_remotes<'a>(
    report: &Report,
    table: &'a LeaseTable,
    own: Ipv4Network,
    public_ip: Ipv4Addr,
    changed: Option<&[Ipv4Network]>,
) -> Vec<Remote<'a>> {
    report.peers_changed(own, changed);
    remotes(table, own, public_ip)
}

/// Every other node's lease (not our subnet, not our public IP), borrowed from `table`. Which of
/// them the backend can serve is its decision. A free function so the borrow of the table sits
/// beside the `&mut` of the data plane that consumes it.
pub(super) fn remotes(
    table: &LeaseTable,
    own: Ipv4Network,
    public_ip: Ipv4Addr,
) -> Vec<Remote<'_>> {
    table
        .leases()
        .filter(|l| l.key.ipv4 != own && l.attrs.public_ip != public_ip)
        .map(|l| Remote {
            subnet: l.key.ipv4,
            subnet_v6: l.key.ipv6,
            attrs: &l.attrs,
        })
        .collect()
}

/// Hands the heap the initial listing and programming freed back to the kernel. With thousands of
/// peers, the listing's response, its parsed leases and the first plan are several times the
/// steady-state working set; glibc keeps freed chunks in its arenas (one per worker thread), so
/// without this the agent's RSS stays at the start-up peak for its whole life.
fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The copy of subnet.env kept in the state dir: subnet.env lives in /run, which a reboot empties,
/// and a node that was down longer than the lease TTL should still get its old subnet back when
/// nobody took it (its pods' addresses stay valid for whoever remembers them).
pub(crate) const KEPT_SUBNET_FILE: &str = "subnet.env";

/// The subnet to try first: the live subnet.env's (an agent restart), else the state dir's copy (a
/// reboot). A file of another network is not ours to re-take; an unreadable or hostile one is
/// logged and ignored, since a fresh subnet is always a safe answer.
pub(crate) fn previous_subnet(
    network: Ipv4Network,
    live: Result<SubnetEnv, SubnetEnvError>,
    kept: Result<SubnetEnv, SubnetEnvError>,
) -> Option<SubnetKey> {
    [live, kept].into_iter().find_map(|r| match r {
        Ok(SubnetEnv {
            ipv4: Some(v4),
            ipv6,
            ..
        }) if v4.network == network => Some(SubnetKey {
            ipv4: v4.node_subnet(),
            ipv6: ipv6.map(|v6| v6.node_subnet()),
        }),
        Ok(e) => {
            let old = e
                .ipv4
                .map(|v4| v4.network.to_string())
                .unwrap_or_else(|| "none".into());
            info!(%old, new = %network, "previous subnet is of another network; not re-taken");
            None
        }
        Err(SubnetEnvError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            None
        }
        Err(e) => {
            warn!("previous subnet ignored: {e}");
            None
        }
    })
}

#[cfg(test)]
mod previous_tests {
    use super::*;
    use std::path::Path;

    fn env(text: &str) -> Result<SubnetEnv, SubnetEnvError> {
        SubnetEnv::parse(Path::new("/test/subnet.env"), text)
    }
    fn missing() -> Result<SubnetEnv, SubnetEnvError> {
        SubnetEnv::read(Path::new("/nonexistent/tweed/subnet.env"))
    }
    fn prev4(
        network: Ipv4Network,
        live: Result<SubnetEnv, SubnetEnvError>,
        kept: Result<SubnetEnv, SubnetEnvError>,
    ) -> Option<Ipv4Network> {
        previous_subnet(network, live, kept).map(|k| k.ipv4)
    }
    const NET: &str = "10.244.0.0/16";
    fn net() -> Ipv4Network {
        NET.parse().unwrap()
    }
    fn good(subnet: &str) -> String {
        format!("TWEED_NETWORK={NET}\nTWEED_SUBNET={subnet}\nTWEED_MTU=1450\nTWEED_IPMASQ=false\n")
    }

    #[test]
    fn the_live_file_wins_then_the_kept_copy_survives_a_reboot() {
        let s = prev4(
            net(),
            env(&good("10.244.7.1/24")),
            env(&good("10.244.9.1/24")),
        );
        assert_eq!(s, Some("10.244.7.0/24".parse().unwrap()));
        // /run emptied by a reboot: the state dir's copy is used.
        let s = prev4(net(), missing(), env(&good("10.244.9.1/24")));
        assert_eq!(s, Some("10.244.9.0/24".parse().unwrap()));
        assert_eq!(prev4(net(), missing(), missing()), None);
    }

    #[test]
    fn a_dual_stack_file_asks_both_halves_back() {
        let text = format!(
            "{}TWEED_IPV6_NETWORK=fd00:10:244::/56\nTWEED_IPV6_SUBNET=fd00:10:244:3::1/64\n",
            good("10.244.7.1/24")
        );
        let k = previous_subnet(net(), env(&text), missing()).unwrap();
        assert_eq!(k.to_string(), "10.244.7.0-24&fd00:10:244:3::-64");
    }

    #[test]
    fn hostile_or_foreign_kept_files_are_ignored_not_fatal() {
        let hostile = [
            "",
            "\0\0\0\u{fffd}",
            "TWEED_NETWORK=10.244.0.0/16\nTWEED_SUBNET=999.1.1.1/24\n",
            "TWEED_NETWORK=10.244.0.0/16\nTWEED_SUBNET=10.244.7.1/99\n",
            &"A=".repeat(100_000),
            "TWEED_SUBNET=$(reboot)\n",
        ];
        for text in hostile {
            assert_eq!(prev4(net(), missing(), env(text)), None, "{text:.40?}");
        }
        // A corrupt live file still lets the kept copy answer.
        let s = prev4(net(), env("garbage"), env(&good("10.244.9.1/24")));
        assert_eq!(s, Some("10.244.9.0/24".parse().unwrap()));
        // Another network's subnet (the config changed) is not ours to re-take.
        let other = "TWEED_NETWORK=10.99.0.0/16\nTWEED_SUBNET=10.99.3.1/24\nTWEED_MTU=1450\n";
        assert_eq!(prev4(net(), missing(), env(other)), None);
    }
}

#[cfg(test)]
mod remotes_tests {
    use super::*;
    use crate::registry::RawLease;

    const P: &str = "/coreos.com/network";

    fn node(subnet: &str, n: u8) -> RawLease {
        RawLease {
            key: format!("{P}/subnets/{subnet}"),
            value: format!(
                r#"{{"PublicIP":"198.18.0.{n}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"aa:aa:aa:aa:aa:{n:02}"}}}}"#
            )
            .into_bytes(),
            lease_id: 5,
            mod_revision: n.into(),
            create_revision: n.into(),
        }
    }

    #[test]
    fn remotes_leave_out_our_subnet_and_our_public_ip_and_borrow_the_tables_attributes() {
        let mut t = LeaseTable::new(P, "10.244.0.0/16".parse().unwrap(), 24);
        t.resync(&[
            node("10.244.1.0-24", 1),
            node("10.244.2.0-24", 2),
            node("10.244.3.0-24", 3),
            // A second lease from our own public IP (a stale one of ours): never a peer.
            node("10.244.4.0-24", 9),
            node("10.244.5.0-24", 5),
        ]);
        let own: Ipv4Network = "10.244.2.0/24".parse().unwrap();
        let r = remotes(&t, own, "198.18.0.9".parse().unwrap());
        let subnets: Vec<String> = r.iter().map(|r| r.subnet.to_string()).collect();
        assert_eq!(subnets, ["10.244.1.0/24", "10.244.3.0/24", "10.244.5.0/24"]);
        // The very attributes the table holds, not copies: a lease event must not duplicate
        // every peer's lease (issue 20: that was a tenth of the agent's time per event).
        for r in &r {
            let lease = t.leases().find(|l| l.key.ipv4 == r.subnet).unwrap();
            assert!(
                std::ptr::eq(r.attrs, &lease.attrs),
                "{} was copied",
                r.subnet
            );
            assert_eq!(r.subnet_v6, lease.key.ipv6);
        }
        assert_eq!(
            r[1].attrs.public_ip,
            "198.18.0.3".parse::<Ipv4Addr>().unwrap()
        );
    }
}

/// Where one lease event's time goes at 10,000 peers, phase by phase, on the path `on_feed`
/// takes (the fake kernel stands for netlink; timings are printed, never asserted):
/// `cargo test --release -p tweed-agent --lib -- --ignored event_phases_at_10000_peers --nocapture`.
#[cfg(test)]
mod event_cost {
    use super::*;
    use crate::backend::{DataPlane, VxlanBackend, VxlanConfig};
    use crate::netlink::{Fake, Netlink};
    use crate::registry::{RawLease, WatchEvent};
    use crate::state::AgentState;
    use crate::testutil::{ip, net};

    const P: &str = "/coreos.com/network";

    fn put(i: u32, rev: i64) -> WatchEvent {
        let value = format!(
            r#"{{"PublicIP":"198.19.{}.{}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"02:00:00:00:{:02x}:{:02x}"}}}}"#,
            i / 256,
            i % 256,
            i / 256,
            i % 256
        );
        WatchEvent::Put(RawLease {
            key: format!("{P}/subnets/10.{}.{}.0-24", 1 + i / 256, i % 256),
            value: value.into_bytes(),
            lease_id: 7,
            mod_revision: rev,
            create_revision: rev,
        })
    }

    fn del(i: u32) -> WatchEvent {
        WatchEvent::Delete {
            key: format!("{P}/subnets/10.{}.{}.0-24", 1 + i / 256, i % 256),
            revision: 0,
        }
    }

    #[tokio::test]
    #[ignore = "timing figures for docs/performance.md, not a check"]
    async fn event_phases_at_10000_peers() {
        let fake = Fake::new();
        let eth0 = fake.add_link("eth0", 1500, None);
        let tmp = tempfile::tempdir().unwrap();
        let nl = Netlink::from(fake.clone());
        let own = net("10.244.0.0/24");
        let public_ip = ip("198.18.0.1");
        let cfg = VxlanConfig::new(1, public_ip, eth0, 1500, own, tmp.path().join("vtep-mac"));
        let mut dp = DataPlane::Vxlan(VxlanBackend::setup(&nl, cfg).await.unwrap());
        let mut table = LeaseTable::new(P, "10.0.0.0/8".parse().unwrap(), 24);
        table.apply(&(0..10_000).map(|i| put(i, 1)).collect::<Vec<_>>());
        let report = Report::new(AgentState::new(), super::super::deps::Clock::System);
        report.leases(&table, own, None);
        let rs = remotes(&table, own, public_ip);
        let stats = dp.reconcile(&nl, &rs).await.unwrap();
        report.programmed("vxlan", &rs, &stats, Instant::now());
        drop(rs);
        fake.take_ops();

        const PHASES: [&str; 7] = [
            "LeaseTable::apply",
            "Report::lease_changes",
            "remotes()",
            "DataPlane::reconcile_changed",
            "Report::programmed",
            "Report::leases",
            "drop remotes",
        ];
        let mut ns = [0u128; PHASES.len()];
        let rounds = 100u32;
        for k in 0..rounds {
            // Adds and deletes in turn, as bench/controlplane's latency phase.
            let ev = if k % 2 == 0 {
                put(20_000 + k, 2 + i64::from(k))
            } else {
                del(20_000 + k - 1)
            };
            let mut t = Instant::now();
            let mut lap = |i: usize, t: &mut Instant| {
                ns[i] += t.elapsed().as_nanos();
                *t = Instant::now();
            };
            let applied = table.apply(&[ev]);
            lap(0, &mut t);
            report.lease_changes(&applied, own);
            lap(1, &mut t);
            let changed = changed_subnets(&applied.changes);
            report.peers_changed(own, Some(&changed));
            let rs = remotes(&table, own, public_ip);
            lap(2, &mut t);
            let started = Instant::now();
            let stats = dp.reconcile_changed(&nl, &rs, &changed).await.unwrap();
            lap(3, &mut t);
            report.programmed("vxlan", &rs, &stats, started);
            lap(4, &mut t);
            report.leases(&table, own, Some(&applied.changes));
            lap(5, &mut t);
            drop(rs);
            lap(6, &mut t);
            assert_eq!(
                fake.take_ops().len(),
                3,
                "round {k}: the event's peer alone"
            );
        }
        let total: u128 = ns.iter().sum();
        let ms = |n: u128| n as f64 / f64::from(rounds) / 1e6;
        println!(
            "one lease event (add or delete) at 10,000 peers, mean of {rounds}: {:.3} ms",
            ms(total)
        );
        for (p, n) in PHASES.iter().zip(ns) {
            println!(
                "  {p:<30} {:.3} ms ({:.0}%)",
                ms(n),
                n as f64 * 100.0 / total as f64
            );
        }
    }
}
