//! The agent in an IPv6-only network (`EnableIPv4: false`, docs/ipv6.md "IPv6-only networks"):
//! vxlan (`tweed-v6.<VNI>` only), host-gw (routes via the peers' `PublicIPv6`) or wireguard
//! (`tweed-wg` carrying IPv6 only, userspace: `run::v6only_wg`), a lease under
//! the IPv6-only key, IPv6 rules only, subnet.env with only the IPv6 pair.
//!
//! A loop of its own rather than the dual-stack one: everything there hangs off an IPv4 subnet
//! (the lease table's keys, the backends' devices, the rules), and none of it exists here. It is
//! level-triggered: lease events (a burst of them coalesced, see [`COALESCE`]), each renewal
//! that finds the lease gone and a periodic resync list the leases and bring the kernel to
//! exactly what they say, so a missed event or a drifted route costs at most one resync period.

use super::main_loop::{next_event, repair_due, subscribe};
use super::report::Report;
use super::rulecheck::{Done, Extra, RuleCheck, V6OnlyRules};
use super::stop::{next_backoff, Stop};
use super::underlay6::{Check6, Underlay6};
use super::AgentError;
use crate::backend::v6;
use crate::netlink::{Event, MacAddr, Netlink, Op};
use crate::registry::{CreateOutcome, RawLease, Registry};
use crate::rules::{Firewall, RuleSpecV6};
use crate::settings::Settings;
use crate::state::{LeaseView, PeerView};
use crate::v6only::{self as pure, Decision, Underlay};
use ipnetwork::Ipv6Network;
use std::collections::HashSet;
use std::net::Ipv6Addr;
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info, warn};
use tweed_config::{
    BackendConfig, Ipv6OnlyKey, Ipv6OnlyNetwork, LeaseAttrs, LeaseKey, SubnetEnv, SubnetEnvV6,
};

/// How often the data plane and the rules are brought back to the leases without an event.
const RESYNC: Duration = Duration::from_secs(10);

/// How long a shutdown lets a rules check under way finish (as the main loop's).
const RULES_SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// After a listing, lease events wait at most this long for the next one (rev35 L6): each
/// listing reads every lease, so a burst of events (a rollout, many nodes restarting) costs two
/// listings rather than one per event, and a storm at most one per window. An event after a
/// quiet window is listed for at once, so a lone change is not delayed.
const COALESCE: Duration = Duration::from_millis(250);

/// How long a start without the state-dir record waits for the listing that decides whether
/// the vxlan device keeps its MAC (then a fresh one).
const MAC_CHECK_WAIT: Duration = Duration::from_secs(5);

/// What the loop needs besides the leases.
pub(super) struct V6Only {
    pub registry: Arc<Registry>,
    pub nl: Netlink,
    pub firewall: Arc<Firewall>,
    pub report: Report,
    pub ipv6_addrs: crate::ipv6::Ipv6Addrs,
    /// systemd: READY=1 once ready, WATCHDOG=1 every beat (the shipped unit is `Type=notify`
    /// with `WatchdogSec`: without them an IPv6-only node was killed at start).
    pub notifier: crate::notify::Notifier,
}

/// Our lease: its key and the TTL lease it hangs on (0: a reservation, nothing to renew).
#[derive(Debug, Clone, Copy)]
struct Own {
    key: Ipv6OnlyKey,
    lease_id: i64,
}

/// The vxlan device this node runs, when the backend is vxlan.
struct Vxlan {
    spec: crate::netlink::VxlanSpec,
    direct_routing: bool,
}

struct Node {
    net: Ipv6OnlyNetwork,
    underlay: Underlay,
    attrs: LeaseAttrs,
    vxlan: Option<Vxlan>,
    /// The wireguard device, when the backend is wireguard (`run::v6only_wg`).
    wg: Option<super::v6only_wg::Wg>,
    settings: Settings,
    /// The `PublicIPv6` addresses this run advertised before `underlay.public_ipv6`, latest
    /// last (at most [`FORMER`]): our key may still name one until its rewrite got through.
    former: Vec<Ipv6Addr>,
    /// What the last run recorded about its key (subnet, lease, addresses), for [`pure::reclaim`].
    recorded: Option<pure::Recorded>,
}

/// How many earlier `PublicIPv6` addresses of this run still mark a key as ours.
const FORMER: usize = 4;

/// Runs an IPv6-only network until `stop`. A backend that cannot run one and a node without a
/// usable IPv6 address end it with an error naming why; etcd outages are waited out.
pub(super) async fn run(
    deps: V6Only,
    settings: Settings,
    net: Ipv6OnlyNetwork,
    stop: &mut Stop,
) -> Result<(), AgentError> {
    pure::check_backend(&net.backend)?;
    let recorded = read_record(&settings);
    let links = deps.nl.links().await?;
    let addrs = deps.ipv6_addrs.list().unwrap_or_else(|e| {
        warn!("{e}");
        Vec::new()
    });
    let routes = deps.nl.all_routes6().await?;
    let flags = pure::UnderlayFlags {
        ifaces: settings.iface.clone(),
        regexes: settings.iface_regex.clone(),
        can_reach: settings.iface_can_reach,
        explicit: settings.public_ipv6,
    };
    let underlay = pure::choose_underlay(&flags, &links, &addrs, &routes)?;
    info!(iface = %underlay.name, public_ipv6 = %underlay.public_ipv6, mtu = underlay.mtu, ipv6_network = %net.ipv6.network, backend = net.backend.type_name(), "IPv6-only network");
    deps.report.ipv6_only_network(
        net.ipv6.network,
        net.backend.type_name(),
        underlay.public_ipv6,
    );

    let vxlan = match &net.backend {
        BackendConfig::Vxlan {
            vni,
            port,
            direct_routing,
            ..
        } => {
            // The device keeps its MAC across restarts: peers' FDB entries stay right. Without
            // a record of our key (a wiped state dir, an upgrade from a version without it)
            // only if no key naming another address shows it: our old key under an old
            // address cannot be told from another node's and may carry that MAC until its TTL
            // ends, and one MAC on two keys breaks every node's FDB (and ours: a peer with our
            // own MAC). The listing is the evidence; without etcd, a fresh MAC.
            let existing = deps.nl.link_by_name(&v6::device_name(*vni)).await?;
            let kept = existing
                .and_then(|l| l.mac)
                .filter(|m| m.is_valid_unicast());
            let mac = match (kept, &recorded) {
                (Some(m), Some(_)) => m,
                (Some(m), None) => {
                    let listing =
                        tokio::time::timeout(MAC_CHECK_WAIT, deps.registry.list_leases()).await;
                    match listing {
                        Ok(Ok(snap))
                            if pure::mac_free_but_ours(&snap.leases, m, underlay.public_ipv6) =>
                        {
                            m
                        }
                        _ => MacAddr::random_local(),
                    }
                }
                (None, _) => MacAddr::random_local(),
            };
            Some(Vxlan {
                spec: v6::device_spec(
                    *vni,
                    *port,
                    underlay.public_ipv6,
                    underlay.index,
                    underlay.mtu,
                    mac,
                ),
                direct_routing: *direct_routing,
            })
        }
        _ => None,
    };
    let wg = match &net.backend {
        BackendConfig::Wireguard(w) => Some(super::v6only_wg::Wg::prepare(
            w,
            &settings,
            net.ipv6.network,
            underlay.mtu,
        )?),
        _ => None,
    };
    let attrs = match &wg {
        Some(w) => w.lease_attrs(underlay.public_ipv6),
        None => pure::lease_attrs(
            underlay.public_ipv6,
            &net.backend,
            vxlan.as_ref().and_then(|v| v.spec.mac),
        ),
    };
    // What the last run advertised: our key still naming it, on the recorded lease, is ours
    // (the address changed while the agent was down).
    let former: Vec<Ipv6Addr> = recorded
        .iter()
        .flat_map(|r| r.addrs.iter().copied())
        .filter(|a| *a != underlay.public_ipv6)
        .take(FORMER)
        .collect();
    if !former.is_empty() {
        warn!(before = ?former, now = %underlay.public_ipv6, "the PublicIPv6 changed since the last run; our recorded key naming an old address is taken back and rewritten");
    }
    let mut node = Node {
        net,
        underlay,
        attrs,
        vxlan,
        wg,
        settings,
        former,
        recorded,
    };
    if let Some(v) = &node.vxlan {
        let existing = deps.nl.link_by_name(&v.spec.name).await?;
        let ops = v6::plan_device6(&v.spec, existing.as_ref());
        apply(&deps.nl, &ops).await?;
        if let Some(mtu) = v.spec.mtu {
            deps.report.mtu(mtu);
        }
    } else {
        deps.report.mtu(mtu(&node));
    }

    let previous = previous_subnet(&node.settings);
    let Some(own) = acquire(&deps, &node, previous, HashSet::new(), stop).await else {
        return Ok(());
    };
    write_subnet_env(&node, &deps.report, own.key.ipv6);
    record(&node, &own);
    // The checks run beside the loop (a fork of ip6tables or nft, seconds behind the xtables
    // lock, must not hold up a lease event); the first is awaited, so that the node is ready
    // (its data plane programmed) only with its masquerade and forward rules in place.
    let mut rules = RuleCheck::new(deps.firewall.clone());
    want_rules(&mut rules, &node, own.key.ipv6);
    tokio::select! {
        done = rules.finished() => on_rules(&deps, done),
        _ = stop.wait() => {
            if let Some(done) = rules.stop(RULES_SHUTDOWN_WAIT).await {
                on_rules(&deps, done);
            }
            return Ok(());
        }
    }
    let result = serve(&deps, &mut node, own, &mut rules, stop).await;
    if let Some(w) = &node.wg {
        w.stop().await;
    }
    if let Some(done) = rules.stop(RULES_SHUTDOWN_WAIT).await {
        on_rules(&deps, done);
    }
    result
}

/// The loop, once the lease is held and the rules were checked once.
async fn serve(
    deps: &V6Only,
    node: &mut Node,
    mut own: Own,
    rules: &mut RuleCheck<V6OnlyRules>,
    stop: &mut Stop,
) -> Result<(), AgentError> {
    let renew_every = crate::subnet::renew_interval(
        node.settings.lease_ttl,
        node.settings.subnet_lease_renew_margin,
    );
    let mut renew_at = tokio::time::Instant::now() + renew_every;
    let mut renew_backoff = Duration::from_millis(500);
    let mut resync = tokio::time::interval(RESYNC);
    let mut rules_every = tokio::time::interval(node.settings.iptables_resync);
    // Its first tick is now: the rules were just checked.
    rules_every.tick().await;
    let mut beat = tokio::time::interval(Duration::from_secs(1));
    let mut watch = None;
    let mut backoff = Duration::from_millis(500);
    let mut told_ready = false;
    // No listing for events before this; a listing due then for events that came meanwhile.
    let mut quiet_until = tokio::time::Instant::now();
    let mut relist_at: Option<tokio::time::Instant> = None;
    // The PublicIPv6 follower (`--public-ipv6` pins it): address notifications on the underlay
    // schedule a check, and so does every resync, for notifications lost or never subscribed.
    let mut follow = Underlay6::new(
        Some(node.underlay.public_ipv6),
        node.settings.public_ipv6,
        node.underlay.index,
        node.underlay.name.clone(),
        deps.ipv6_addrs.clone(),
    );
    let (mut events, _) = subscribe(&deps.nl);
    // One look now: an address change between the start-up's look and the subscription.
    follow.note(&Event::Lost, tokio::time::Instant::now());
    loop {
        // The watch (re)starts after every listing, from that listing's revision.
        if watch.is_none() {
            let listed = reconcile(deps, node, &mut own, rules, stop).await;
            quiet_until = tokio::time::Instant::now() + COALESCE;
            relist_at = None;
            let revision = match listed {
                Some(Ok(revision)) => revision,
                Some(Err(e)) => {
                    warn!("IPv6-only: {e}; retrying in {backoff:?}");
                    deps.report.watch_live(false);
                    if stop.sleep(backoff).await {
                        return Ok(());
                    }
                    backoff = next_backoff(backoff);
                    continue;
                }
                None => return Ok(()),
            };
            match deps.registry.watch(revision + 1).await {
                Ok(w) => {
                    watch = Some(w);
                    backoff = Duration::from_millis(500);
                    deps.report.watch_live(true);
                }
                Err(e) => {
                    warn!("IPv6-only: watching the leases: {e}; retrying in {backoff:?}");
                    deps.report.watch_live(false);
                    if stop.sleep(backoff).await {
                        return Ok(());
                    }
                    backoff = next_backoff(backoff);
                    continue;
                }
            }
        }
        let w = watch.as_mut().expect("set above");
        tokio::select! {
            _ = stop.wait() => return Ok(()),
            events = w.next() => match events {
                Ok(_) if relist_at.is_none() && tokio::time::Instant::now() >= quiet_until => {
                    let listed = reconcile(deps, node, &mut own, rules, stop).await;
                    quiet_until = tokio::time::Instant::now() + COALESCE;
                    match listed {
                        Some(Ok(_)) => {}
                        Some(Err(e)) => { warn!("IPv6-only: {e}"); watch = None; }
                        None => return Ok(()),
                    }
                }
                Ok(_) => {
                    relist_at.get_or_insert(quiet_until);
                }
                Err(e) => {
                    warn!("IPv6-only: the lease watch ended: {e}; listing again");
                    deps.report.watch_live(false);
                    watch = None;
                }
            },
            _ = tokio::time::sleep_until(renew_at) => {
                renew_at = tokio::time::Instant::now() + renew_every;
                if own.lease_id != 0 {
                    match deps.registry.renew(own.lease_id).await {
                        Ok(Some(ttl)) => {
                            deps.report.ipv6_only_renewed(own.lease_id, ttl);
                            renew_backoff = Duration::from_millis(500);
                        }
                        Ok(None) => {
                            warn!(subnet_v6 = %own.key.ipv6, "IPv6-only lease expired; taking it again");
                            deps.report.ipv6_only_lease_lost();
                            // The listing notices the key is gone and acquires again.
                            watch = None;
                        }
                        Err(e) => {
                            // Retried soon, not at the next period: that may be past the TTL.
                            warn!("IPv6-only: renewing the lease: {e}; retrying in {renew_backoff:?}");
                            renew_at = tokio::time::Instant::now() + renew_backoff;
                            renew_backoff = next_backoff(renew_backoff);
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(relist_at.unwrap_or(quiet_until)), if relist_at.is_some() => {
                relist_at = None;
                let listed = reconcile(deps, node, &mut own, rules, stop).await;
                quiet_until = tokio::time::Instant::now() + COALESCE;
                match listed {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => { warn!("IPv6-only: {e}"); watch = None; }
                    None => return Ok(()),
                }
            }
            ev = next_event(&mut events) => match ev {
                Some(Ok(e)) => follow.note(&e, tokio::time::Instant::now()),
                Some(Err(e)) => {
                    warn!("IPv6-only: kernel notifications: {e}; subscribing again");
                    events = subscribe(&deps.nl).0;
                    follow.note(&Event::Lost, tokio::time::Instant::now());
                }
                None => {
                    warn!("IPv6-only: kernel notifications ended; the PublicIPv6 is checked at each resync only");
                    events = None;
                }
            },
            _ = repair_due(follow.due()) => {
                // Only `Moved` can come: the follower has an address and never turns IPv4 only.
                if let Some(Check6::Moved(to)) = follow.check() {
                    moved(deps, node, to);
                    // The old address stays in the record beside the new one until a restart
                    // finds the key rewritten: it may still name either.
                    record(node, &own);
                    // etcd may be reached over the underlay: connections from the old address
                    // are dead (the lease watch among them), so new ones are made now; the
                    // listing at the loop's top rewrites the lease and moves the device.
                    if let Err(e) = deps.registry.redial().await {
                        warn!("IPv6-only: reconnecting to etcd after the move: {e}");
                    }
                    watch = None;
                }
            }
            _ = resync.tick() => {
                follow.note(&Event::Lost, tokio::time::Instant::now());
                // Also answers the events waiting for a listing: they came before this one.
                relist_at = None;
                let listed = reconcile(deps, node, &mut own, rules, stop).await;
                quiet_until = tokio::time::Instant::now() + COALESCE;
                if let Some(Err(e)) = listed {
                    warn!("IPv6-only: {e}");
                    watch = None;
                }
            }
            _ = rules_every.tick() => want_rules(rules, node, own.key.ipv6),
            done = rules.finished() => on_rules(deps, done),
            _ = beat.tick() => {
                let ready = deps.report.beat();
                if let Err(e) = deps.notifier.watchdog() {
                    warn!("{e}");
                }
                if ready && !told_ready {
                    told_ready = true;
                    match deps.notifier.ready() {
                        Ok(()) => info!("ready: lease held, data plane programmed, subnet.env written"),
                        Err(e) => warn!("{e}"),
                    }
                }
            }
        }
    }
}

/// The IPv6 subnet subnet.env named (a restart asks it back, as the IPv4 half does); an
/// unreadable file asks for nothing.
fn previous_subnet(settings: &Settings) -> Option<Ipv6Network> {
    SubnetEnv::read(&settings.subnet_file)
        .ok()?
        .ipv6
        .map(|v6| v6.node_subnet())
}

/// Takes our lease: ours if it is there, else a free subnet but `exclude`; retried while etcd
/// fails or a race is lost. `None` on shutdown.
async fn acquire(
    deps: &V6Only,
    node: &Node,
    mut previous: Option<Ipv6Network>,
    mut exclude: HashSet<Ipv6Network>,
    stop: &mut Stop,
) -> Option<Own> {
    let mut backoff = Duration::from_millis(500);
    loop {
        match try_acquire(deps, node, &mut previous, &mut exclude).await {
            Ok(Some(own)) => {
                deps.report
                    .ipv6_only_lease(own.key.ipv6, own.lease_id, node.settings.lease_ttl);
                return Some(own);
            }
            Ok(None) => continue,
            Err(e) => {
                error!("IPv6-only: acquiring a lease: {e}; retrying in {backoff:?}");
                if stop.sleep(backoff).await {
                    return None;
                }
                backoff = next_backoff(backoff);
            }
        }
    }
}

/// One listing and what it decides; `Ok(None)`: list and decide again.
async fn try_acquire(
    deps: &V6Only,
    node: &Node,
    previous: &mut Option<Ipv6Network>,
    exclude: &mut HashSet<Ipv6Network>,
) -> Result<Option<Own>, AgentError> {
    let prefix = deps.registry.prefix().to_string();
    let snap = deps.registry.list_leases().await?;
    let decision = match pure::decide(
        &node.net.ipv6,
        &prefix,
        &snap.leases,
        node.underlay.public_ipv6,
        *previous,
        exclude,
        &mut rand::rng(),
    )? {
        // A new subnet only when the key the last run recorded is not there under an old
        // address (on its lease, or reserved).
        Decision::Take(subnet) => node
            .recorded
            .as_ref()
            .and_then(|r| pure::reclaim(&node.net.ipv6, &prefix, &snap.leases, r, exclude))
            .unwrap_or(Decision::Take(subnet)),
        d => d,
    };
    match decision {
        Decision::Remove(stale) => {
            for s in stale {
                warn!(key = %s.key, subnet_v6 = %s.subnet, "removing our own stale lease: {}", s.why);
                // Revoked first: that alone removes the key, and a failed delete below must not
                // leave it to be found (and reused) again.
                let _ = deps.registry.revoke(s.lease_id).await;
                deps.registry.delete_lease(&s.key, s.mod_revision).await?;
            }
            Ok(None)
        }
        Decision::Reuse {
            key,
            lease_id,
            mod_revision,
            value,
        } => {
            // Renewed now, not a period from now: a restart close to the TTL would otherwise
            // lose the key just after reusing it, and every peer would see it go and come back.
            if lease_id != 0 && deps.registry.renew(lease_id).await?.is_none() {
                // It expired between the listing and now: its subnet is likely free, ask it back.
                *previous = Some(key.ipv6);
                return Ok(None);
            }
            if value != node.attrs.to_json().as_bytes() {
                let k = LeaseKey::Ipv6Only(key);
                if !deps
                    .registry
                    .update_lease(&k, &node.attrs, lease_id, mod_revision)
                    .await?
                {
                    return Ok(None);
                }
            }
            Ok(Some(Own { key, lease_id }))
        }
        Decision::Take(subnet) => {
            let key = Ipv6OnlyKey { ipv6: subnet };
            let k = LeaseKey::Ipv6Only(key);
            let lease_id = match deps
                .registry
                .create_lease(&k, &node.attrs, node.settings.lease_ttl)
                .await?
            {
                CreateOutcome::Created { lease_id } => lease_id,
                CreateOutcome::Taken => {
                    exclude.insert(subnet);
                    return Ok(None);
                }
            };
            let full = k.etcd_key(&prefix);
            let snap = deps.registry.list_leases().await?;
            let mine: Option<&RawLease> = snap.leases.iter().find(|l| l.key == full);
            let lost = match mine {
                Some(m) => pure::lost_race(&prefix, &snap.leases, subnet, &full, m.create_revision),
                None => true,
            };
            if lost {
                warn!(subnet_v6 = %subnet, "an older key claims this IPv6 subnet; choosing again");
                // Excluded and revoked before the delete, which may fail: the key must not
                // outlive this attempt, nor the subnet be chosen again.
                exclude.insert(subnet);
                let _ = deps.registry.revoke(lease_id).await;
                if let Some(m) = mine {
                    deps.registry.delete_lease(&k, m.mod_revision).await?;
                }
                return Ok(None);
            }
            Ok(Some(Own { key, lease_id }))
        }
    }
}

/// Lists the leases, takes our lease again if it went, and programs the peers. The listing's
/// revision, or the error; `None` on shutdown.
async fn reconcile(
    deps: &V6Only,
    node: &Node,
    own: &mut Own,
    rules: &mut RuleCheck<V6OnlyRules>,
    stop: &mut Stop,
) -> Option<Result<i64, AgentError>> {
    let snap = match deps.registry.list_leases().await {
        Ok(s) => s,
        Err(e) => return Some(Err(e.into())),
    };
    let was = own.key.ipv6;
    let again = match pure::held_as(
        deps.registry.prefix(),
        &snap.leases,
        own.key,
        own.lease_id,
        &node.ours(),
    ) {
        pure::Held::Ours { lease_id } => {
            if lease_id != own.lease_id {
                info!(subnet_v6 = %was, lease = lease_id, "our IPv6-only key now hangs on another lease (0: reserved); following it");
                own.lease_id = lease_id;
                record(node, own);
            }
            None
        }
        pure::Held::Gone => {
            warn!(subnet_v6 = %was, "our IPv6-only lease is gone; taking it again");
            Some((Some(was), HashSet::new()))
        }
        pure::Held::Lost => {
            // Our lease expired and another node took the subnet: staying would give two
            // nodes one subnet, and the other node's older claim wins everywhere else.
            warn!(subnet_v6 = %was, "another node holds our IPv6-only key; choosing another subnet");
            Some((None, HashSet::from([was])))
        }
    };
    if let Some((previous, exclude)) = again {
        deps.report.ipv6_only_lease_lost();
        *own = acquire(deps, node, previous, exclude, stop).await?;
        if own.key.ipv6 != was {
            write_subnet_env(node, &deps.report, own.key.ipv6);
        }
        record(node, own);
        want_rules(rules, node, own.key.ipv6);
        return Some(Ok(snap.revision));
    }
    // Programmed even when the rewrite failed (a lost CAS race, an error after the listing).
    // While etcd cannot be listed at all the device does not move: it waits for the next
    // listing, like every other change.
    let rewritten = rewrite(deps, node, *own, &snap.leases).await;
    match program(deps, node, own.key.ipv6, &snap.leases).await {
        Ok(()) => {
            deps.report.ipv6_only_programmed(true);
            Some(rewritten.map(|()| snap.revision))
        }
        Err(e) => {
            deps.report.ipv6_only_programmed(false);
            Some(Err(e))
        }
    }
}

impl Node {
    /// Every `PublicIPv6` that marks a key as ours: the current one and this run's former ones.
    fn ours(&self) -> Vec<Ipv6Addr> {
        let mut v = vec![self.underlay.public_ipv6];
        v.extend(self.former.iter().copied());
        v
    }
}

/// Our `PublicIPv6` left the underlay and `to` replaced it (issue 19): advertised from now on
/// (the next listing rewrites our key, [`rewrite`]), the vxlan device's local address with it
/// (the next programming re-creates `tweed-v6.<VNI>`, whose local address cannot change in
/// place; its MAC is kept, so peers' FDB entries need only the new address).
fn moved(deps: &V6Only, node: &mut Node, to: Ipv6Addr) {
    let from = node.underlay.public_ipv6;
    node.former.retain(|a| *a != to && *a != from);
    node.former.push(from);
    if node.former.len() > FORMER {
        node.former.remove(0);
    }
    node.underlay.public_ipv6 = to;
    node.attrs = pure::with_public_ipv6(&node.attrs, to);
    if let Some(v) = node.vxlan.as_mut() {
        v.spec.local = to.into();
    }
    deps.report
        .ipv6_only_network(node.net.ipv6.network, node.net.backend.type_name(), to);
}

/// Where the `PublicIPv6` this node advertises is recorded for the next run.
fn public_ipv6_file(settings: &Settings) -> std::path::PathBuf {
    settings.state_dir.join("ipv6-only-public-ipv6")
}

/// The last run's record; a file that cannot be read or parsed is skipped (the node then
/// cannot take back a key naming an old address), with a warning naming it.
fn read_record(settings: &Settings) -> Option<pure::Recorded> {
    let path = public_ipv6_file(settings);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(path = %path.display(), "reading the IPv6-only record: {e}; ignored");
            return None;
        }
    };
    let rec = pure::Recorded::parse(&text);
    if rec.is_none() {
        warn!(path = %path.display(), content = %text.trim(), "the IPv6-only record is not \"subnet\", \"lease\" and \"address\" lines; ignored");
    }
    rec
}

/// Records our key (subnet, lease) and every address it may name: the advertised one and this
/// run's former ones. Written to a temporary file renamed over the record, so that a crash
/// leaves the old record or the new one, never a truncated one. A failure is logged (the next
/// run then cannot recognise our key once the address changed while the agent was down).
fn record(node: &Node, own: &Own) {
    let path = public_ipv6_file(&node.settings);
    let rec = pure::Recorded {
        subnet: own.key.ipv6,
        lease_id: own.lease_id,
        addrs: node.ours(),
    };
    let tmp = path.with_extension("tmp");
    let written = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&tmp, rec.render()))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        warn!(path = %path.display(), "recording the IPv6-only key: {e}");
    }
}

/// Writes our attributes over our key when the listing shows another value (a moved
/// `PublicIPv6`, a hand edit), compare-and-swap and on the lease the key hangs on (0: a
/// reservation stays one). A lost race is left to the next listing, which the racing write's
/// event brings.
async fn rewrite(
    deps: &V6Only,
    node: &Node,
    own: Own,
    listing: &[RawLease],
) -> Result<(), AgentError> {
    let Some((lease_id, mod_revision)) =
        pure::rewrite(deps.registry.prefix(), listing, own.key, &node.attrs)
    else {
        return Ok(());
    };
    let key = LeaseKey::Ipv6Only(own.key);
    if deps
        .registry
        .update_lease(&key, &node.attrs, lease_id, mod_revision)
        .await?
    {
        info!(subnet_v6 = %own.key.ipv6, public_ipv6 = %node.underlay.public_ipv6, lease = lease_id, "IPv6-only lease rewritten with this node's attributes");
    } else {
        warn!(subnet_v6 = %own.key.ipv6, "IPv6-only lease changed while being rewritten; the next listing tries again");
    }
    Ok(())
}

/// Brings the kernel to exactly the peers of `listing`.
async fn program(
    deps: &V6Only,
    node: &Node,
    own: Ipv6Network,
    listing: &[RawLease],
) -> Result<(), AgentError> {
    let cfg = &node.net.ipv6;
    let (peers, skipped) = pure::peers(
        cfg,
        deps.registry.prefix(),
        listing,
        Some(own),
        node.underlay.public_ipv6,
    );
    for (key, why, label) in &skipped {
        deps.report.ipv6_only_rejected(key, why, label);
    }
    let nl = &deps.nl;
    // A subnet with an address of this node on it (not on tweed-v6.<VNI> or tweed-wg, whose
    // address is replaced below) is not a peer's, whatever etcd says: typically our own old key after a
    // wiped state dir, whose subnet the pod bridge still carries. Routing it away would take
    // our own pods' traffic (and the kernel refuses a gateway that is a local address).
    let device_name = match (&node.vxlan, &node.wg) {
        (Some(v), _) => Some(v.spec.name.as_str()),
        (None, Some(_)) => Some(crate::backend::wireguard::DEVICE),
        (None, None) => None,
    };
    let device = match device_name {
        Some(name) => nl.link_by_name(name).await?.map(|l| l.index),
        None => None,
    };
    let local: Vec<Ipv6Addr> = nl
        .addresses6(None)
        .await?
        .into_iter()
        .filter(|a| Some(a.ifindex) != device)
        .map(|a| a.net.ip())
        .collect();
    let (peers, here) = pure::not_local(peers, &local);
    for (key, subnet) in &here {
        deps.report.ipv6_only_rejected(
            key,
            &format!("{subnet} is on this node (an address of it is local): our own old key?"),
            "local",
        );
    }
    let mut wg_result = Ok(());
    let ops = match (&node.vxlan, &node.wg) {
        // The wireguard device applies its own plan (link and entries).
        (None, Some(w)) => {
            match w
                .program(nl, &deps.report, own, node.underlay.public_ipv6, &peers)
                .await
            {
                Ok(0) => {}
                Ok(n) => info!(
                    ops = n,
                    peers = peers.len(),
                    "IPv6-only: wireguard device updated"
                ),
                Err(e) => wg_result = Err(e),
            }
            Vec::new()
        }
        (Some(v), _) => {
            let existing = nl.link_by_name(&v.spec.name).await?;
            apply(nl, &v6::plan_device6(&v.spec, existing.as_ref())).await?;
            let ifindex = nl
                .link_by_name(&v.spec.name)
                .await?
                .map(|l| l.index)
                .ok_or(crate::netlink::NetlinkError::NoSuchLink { ifindex: 0 })?;
            let addrs = nl.addresses6(Some(ifindex)).await?;
            apply(
                nl,
                &v6::plan_addresses6(ifindex, &addrs, v6::device_addr6(own)),
            )
            .await?;
            let observed = v6::Observed6 {
                ifindex,
                own_subnet: Some(own),
                local: Some(node.underlay.public_ipv6),
                neighbours: nl.neighbours6(ifindex).await?,
                fdb: nl.fdb6(ifindex).await?,
                routes: nl.all_routes6().await?,
            };
            let peers = pure::vxlan_peers(&peers);
            let direct = v6::Direct6 {
                network: cfg.network,
                underlay: node.underlay.index,
                enabled: v.direct_routing,
            };
            v6::plan_direct6(&direct, &observed, &peers)
        }
        (None, None) => {
            let routes = nl.all_routes6().await?;
            let (ops, skipped) = v6::plan_hostgw6(
                cfg.network,
                own,
                node.underlay.index,
                &routes,
                &pure::hostgw_peers(&peers),
            );
            for (subnet, why) in skipped {
                if deps.report.once(format!("hostgw6 {subnet} {why}")) {
                    warn!(%subnet, "host-gw: no IPv6 route to this peer: {why}");
                }
            }
            ops
        }
    };
    if !ops.is_empty() {
        info!(
            ops = ops.len(),
            peers = peers.len(),
            "IPv6-only: data plane updated"
        );
    }
    let applied = match wg_result {
        Ok(()) => apply(nl, &ops).await,
        Err(e) => Err(e),
    };
    let (leases, peer_views) = views(deps, node, own, listing, &peers, &applied);
    deps.report.ipv6_only_views(leases, peer_views);
    applied
}

/// The API's lease and peer views of an IPv6-only network: our lease and each peer's, with
/// its `PublicIPv6` as the public IP; a peer is programmed unless applying failed.
fn views(
    deps: &V6Only,
    node: &Node,
    own: Ipv6Network,
    listing: &[RawLease],
    peers: &[pure::Peer],
    applied: &Result<(), AgentError>,
) -> (Vec<LeaseView>, Vec<PeerView>) {
    let v6_data = |a: &LeaseAttrs| {
        a.backend_v6_data
            .as_ref()
            .map(|d| d.get().to_string())
            .unwrap_or_default()
    };
    let own_key = LeaseKey::Ipv6Only(Ipv6OnlyKey { ipv6: own }).etcd_key(deps.registry.prefix());
    let lease_id = |key: &str| {
        listing
            .iter()
            .find(|l| l.key == key)
            .map_or(0, |l| l.lease_id)
    };
    let mut leases = vec![LeaseView {
        subnet: own.to_string(),
        public_ip: node.underlay.public_ipv6.to_string(),
        backend_type: node.attrs.effective_backend_type().to_string(),
        backend_data: v6_data(&node.attrs),
        lease_id: lease_id(&own_key),
        own: true,
    }];
    let error = applied.as_ref().err().map(|e| e.to_string());
    let mut views = Vec::with_capacity(peers.len());
    for p in peers {
        leases.push(LeaseView {
            subnet: p.peer.subnet.to_string(),
            public_ip: p.peer.public_ipv6.to_string(),
            backend_type: p.attrs.effective_backend_type().to_string(),
            backend_data: v6_data(&p.attrs),
            lease_id: lease_id(&p.key),
            own: false,
        });
        views.push(PeerView {
            subnet: p.peer.subnet.to_string(),
            public_ip: p.peer.public_ipv6.to_string(),
            backend: p.attrs.effective_backend_type().to_string(),
            programmed: error.is_none(),
            error: error.clone(),
        });
    }
    (leases, views)
}

async fn apply(nl: &Netlink, ops: &[Op]) -> Result<(), AgentError> {
    let results = nl.apply_all(ops).await;
    let mut first = None;
    for (op, r) in ops.iter().zip(results) {
        if let Err(e) = r {
            warn!(?op, "IPv6-only: {e}");
            first.get_or_insert(e);
        }
    }
    match first {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// Asks for a rules check for our subnet `own` (after the one under way, if any).
fn want_rules(rules: &mut RuleCheck<V6OnlyRules>, node: &Node, own: Ipv6Network) {
    let spec = RuleSpecV6 {
        network: node.net.ipv6.network,
        subnet: own,
    };
    rules.want(
        V6OnlyRules {
            spec,
            ip_masq: node.settings.ip_masq,
        },
        Extra::default(),
    );
}

/// A rules check ended: `tweed_rules_resyncs_total` / `tweed_rules_errors_total` and the log.
fn on_rules(deps: &V6Only, done: Done<V6OnlyRules>) {
    deps.report
        .rules_synced(deps.firewall.name(), done.spec.ip_masq, &done.synced);
}

/// The pods' MTU: the device's (vxlan, wireguard), else the underlay's (host-gw).
fn mtu(node: &Node) -> u32 {
    match (&node.vxlan, &node.wg) {
        (Some(v), _) => v.spec.mtu.unwrap_or(node.underlay.mtu),
        (None, Some(w)) => w.mtu(),
        (None, None) => node.underlay.mtu,
    }
}

/// subnet.env with only the IPv6 pair, the MTU and IPMASQ.
fn write_subnet_env(node: &Node, report: &Report, own: Ipv6Network) {
    let env = SubnetEnv {
        ipv4: None,
        mtu: mtu(node),
        ipmasq: node.settings.ip_masq,
        ipv6: Some(SubnetEnvV6::for_node(node.net.ipv6.network, own)),
    };
    match env.write_atomic(&node.settings.subnet_file) {
        Ok(()) => {
            info!(path = %node.settings.subnet_file.display(), subnet = %env.subnets(), "subnet.env written (IPv6 only)");
            report.subnet_env_written(true);
        }
        Err(e) => {
            error!("{e}");
            report.subnet_env_written(false);
        }
    }
}
