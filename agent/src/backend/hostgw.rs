//! The host-gw backend: no encapsulation, per remote lease one main-table route
//! `<peer subnet> via <peer PublicIP> dev <underlay>`. The kernel only accepts such a route when
//! the peer is on a directly connected network, and even where a router's route would make the
//! kernel accept it, the packets would reach the router with overlay addresses it cannot route. So
//! a peer behind a router is reported (named, with the router) and skipped, never programmed.
//!
//! The same route plan serves vxlan's `DirectRouting`, which uses host-gw routes for the peers on
//! its own segment.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use super::route::{canonical, not_on_link_reason};
use super::{apply_plan, diff_routes, PeerSkip, ReconcileStats};
use crate::netlink::model::Tables;
use crate::netlink::{Netlink, NetlinkError, Op, Route};

#[derive(Debug, thiserror::Error)]
pub enum HostGwError {
    #[error("host-gw: reading the routing table: {0}")]
    Observe(#[source] NetlinkError),

    #[error("host-gw: the underlay interface {name} (#{ifindex}) no longer exists")]
    UnderlayGone { name: String, ifindex: u32 },

    #[error("host-gw: looking up the underlay interface {name}: {source}")]
    Underlay {
        name: String,
        #[source]
        source: NetlinkError,
    },
}

/// Who this node is on the underlay; host-gw routes go out of `underlay_ifindex`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostGwConfig {
    /// The whole overlay network: only routes inside it can be ours.
    pub network: Ipv4Network,
    pub own_subnet: Ipv4Network,
    pub local_ip: Ipv4Addr,
    pub underlay_ifindex: u32,
    pub underlay_name: String,
    pub underlay_mtu: u32,
}

/// A remote node as host-gw needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostGwPeer {
    pub subnet: Ipv4Network,
    pub public_ip: Ipv4Addr,
}

impl HostGwPeer {
    pub fn route(&self, underlay: u32) -> Route {
        Route::via(self.subnet, self.public_ip, Some(underlay))
    }
}

/// Whether an observed route is one host-gw (or DirectRouting) would have made: on the underlay,
/// through a gateway, inside the overlay network and not our own subnet. Connected routes and
/// anything outside the overlay are never touched.
pub fn owned(cfg: &HostGwConfig, r: &Route) -> bool {
    r.oif == Some(cfg.underlay_ifindex)
        && r.gateway.is_some()
        && !r.onlink
        && r.protocol != Route::PROTO_KERNEL
        && r.dst.prefix() >= cfg.network.prefix()
        && cfg.network.contains(r.dst.network())
        && !canonical(r.dst).overlaps(cfg.own_subnet)
}

/// Sorts peers into those a plain route can serve and those it cannot (with the reason). Never
/// ourselves; one peer per subnet; subnets without host bits. `routes` is the main table.
pub fn classify(
    cfg: &HostGwConfig,
    routes: &[Route],
    peers: &[HostGwPeer],
) -> (Vec<HostGwPeer>, Vec<PeerSkip>) {
    let mut by_subnet: BTreeMap<Ipv4Network, HostGwPeer> = BTreeMap::new();
    for p in peers {
        let subnet = canonical(p.subnet);
        if subnet.overlaps(cfg.own_subnet) || p.public_ip == cfg.local_ip {
            continue;
        }
        by_subnet
            .entry(subnet)
            .or_insert(HostGwPeer { subnet, ..*p });
    }
    let mut direct = Vec::new();
    let mut skipped = Vec::new();
    for p in by_subnet.into_values() {
        match not_on_link_reason(
            routes,
            cfg.network,
            cfg.underlay_ifindex,
            &cfg.underlay_name,
            p.public_ip,
        ) {
            None => direct.push(p),
            Some(reason) => skipped.push(PeerSkip {
                subnet: p.subnet,
                public_ip: p.public_ip,
                reason,
            }),
        }
    }
    (direct, skipped)
}

/// The route ops making the owned routes exactly `direct` (already classified). Replaces move
/// a route with the same key off another device in place, so a peer switching from vxlan to a
/// direct route never loses its route in between.
pub fn plan_routes(cfg: &HostGwConfig, routes: &[Route], direct: &[HostGwPeer]) -> Vec<Op> {
    let ours: Vec<Route> = routes.iter().filter(|r| owned(cfg, r)).copied().collect();
    let want: Vec<Route> = direct
        .iter()
        .map(|p| p.route(cfg.underlay_ifindex))
        .collect();
    diff_routes(&ours, &want).into_ops()
}

/// The whole host-gw decision: which peers get routes, which are skipped and why, and the ops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostGwPlan {
    pub ops: Vec<Op>,
    pub skipped: Vec<PeerSkip>,
}

pub fn plan(cfg: &HostGwConfig, routes: &[Route], peers: &[HostGwPeer]) -> HostGwPlan {
    let (direct, skipped) = classify(cfg, routes, peers);
    HostGwPlan {
        ops: plan_routes(cfg, routes, &direct),
        skipped,
    }
}

/// The main table as the model says it is after `ops` succeeded.
pub fn routes_after(routes: &[Route], ops: &[Op]) -> Vec<Route> {
    let mut t = Tables::from_entries(&[], &[], routes);
    for op in ops {
        let _ = t.apply(op);
    }
    t.routes.into_values().collect()
}

#[derive(Debug)]
pub struct HostGwBackend {
    cfg: HostGwConfig,
    /// The main table as far as we know; `None` forces a re-list at the next reconcile. The
    /// whole table, not only our routes: the connected routes decide who is on our segment.
    view: Option<Vec<Route>>,
}

impl HostGwBackend {
    /// Nothing to create: checks that the underlay still exists.
    pub async fn setup(nl: &Netlink, cfg: HostGwConfig) -> Result<HostGwBackend, HostGwError> {
        let link = nl
            .link_by_index(cfg.underlay_ifindex)
            .await
            .map_err(|source| HostGwError::Underlay {
                name: cfg.underlay_name.clone(),
                source,
            })?;
        if link.is_none() {
            return Err(HostGwError::UnderlayGone {
                name: cfg.underlay_name.clone(),
                ifindex: cfg.underlay_ifindex,
            });
        }
        Ok(HostGwBackend { cfg, view: None })
    }

    pub fn config(&self) -> &HostGwConfig {
        &self.cfg
    }

    /// Pods see the underlay's MTU: nothing is added to their packets.
    pub fn mtu(&self) -> u32 {
        self.cfg.underlay_mtu
    }

    pub fn resync(&mut self) {
        self.view = None;
    }

    /// Makes the owned routes exactly those for the on-link `peers`; the others come back in
    /// [`ReconcileStats::skipped`].
    pub async fn reconcile(
        &mut self,
        nl: &Netlink,
        peers: &[HostGwPeer],
    ) -> Result<ReconcileStats, HostGwError> {
        let routes = match self.view.take() {
            Some(v) => v,
            None => nl.all_routes().await.map_err(HostGwError::Observe)?,
        };
        let p = plan(&self.cfg, &routes, peers);
        let mut stats = apply_plan(nl, &p.ops, |op| match op {
            Op::RouteReplace(r) | Op::RouteDel(r) => Some(r.dst),
            _ => None,
        })
        .await;
        stats.skipped = p.skipped;
        for f in &stats.failures {
            tracing::warn!("host-gw: {f}");
        }
        if stats
            .failures
            .iter()
            .any(|f| f.error.errno() == Some(libc::ENODEV))
        {
            return Err(HostGwError::UnderlayGone {
                name: self.cfg.underlay_name.clone(),
                ifindex: self.cfg.underlay_ifindex,
            });
        }
        self.view = stats
            .failures
            .is_empty()
            .then(|| routes_after(&routes, &p.ops));
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::{Addr, Fake};

    const ETH0: u32 = 2;

    use crate::testutil::{ip, net};
    fn cfg() -> HostGwConfig {
        HostGwConfig {
            network: net("10.244.0.0/16"),
            own_subnet: net("10.244.1.0/24"),
            local_ip: ip("198.18.0.1"),
            underlay_ifindex: ETH0,
            underlay_name: "eth0".into(),
            underlay_mtu: 1500,
        }
    }
    fn peer(n: u8) -> HostGwPeer {
        HostGwPeer {
            subnet: net(&format!("10.244.{n}.0/24")),
            public_ip: ip(&format!("198.18.0.{n}")),
        }
    }
    fn far_peer(n: u8) -> HostGwPeer {
        HostGwPeer {
            subnet: net(&format!("10.244.{n}.0/24")),
            public_ip: ip(&format!("198.18.1.{n}")),
        }
    }
    fn underlay() -> Vec<Route> {
        vec![
            Route {
                dst: net("198.18.0.0/24"),
                gateway: None,
                oif: Some(ETH0),
                onlink: false,
                metric: 0,
                protocol: Route::PROTO_KERNEL,
            },
            Route {
                protocol: Route::PROTO_BOOT,
                ..Route::via(net("0.0.0.0/0"), ip("198.18.0.254"), Some(ETH0))
            },
        ]
    }

    #[test]
    fn one_route_per_on_link_peer() {
        let p = plan(&cfg(), &underlay(), &[peer(3), peer(2)]);
        assert_eq!(
            p.ops,
            vec![
                Op::RouteReplace(peer(2).route(ETH0)),
                Op::RouteReplace(peer(3).route(ETH0)),
            ]
        );
        assert!(p.skipped.is_empty());
        let after = routes_after(&underlay(), &p.ops);
        assert_eq!(plan(&cfg(), &after, &[peer(2), peer(3)]).ops, vec![]);
    }

    #[test]
    fn a_peer_behind_a_router_is_skipped_and_named() {
        let p = plan(&cfg(), &underlay(), &[peer(2), far_peer(7)]);
        assert_eq!(p.ops, vec![Op::RouteReplace(peer(2).route(ETH0))]);
        assert_eq!(p.skipped.len(), 1);
        let s = &p.skipped[0];
        assert_eq!(
            (s.subnet, s.public_ip),
            (far_peer(7).subnet, far_peer(7).public_ip)
        );
        assert!(
            s.reason.contains("198.18.1.7") && s.reason.contains("198.18.0.254"),
            "{}",
            s.reason
        );
        assert!(s.to_string().contains("10.244.7.0/24"), "{s}");
    }

    #[test]
    fn own_subnet_and_own_ip_are_never_programmed() {
        let own = HostGwPeer {
            subnet: net("10.244.1.0/24"),
            public_ip: ip("198.18.0.9"),
        };
        let me = HostGwPeer {
            subnet: net("10.244.9.0/24"),
            public_ip: ip("198.18.0.1"),
        };
        assert_eq!(plan(&cfg(), &underlay(), &[own, me]).ops, vec![]);
    }

    #[test]
    fn removed_and_moved_peers_are_updated_in_place() {
        let before = routes_after(
            &underlay(),
            &plan(&cfg(), &underlay(), &[peer(2), peer(3)]).ops,
        );
        let moved = HostGwPeer {
            public_ip: ip("198.18.0.33"),
            ..peer(3)
        };
        let p = plan(&cfg(), &before, &[moved]);
        assert_eq!(
            p.ops,
            vec![
                Op::RouteDel(peer(2).route(ETH0)),
                Op::RouteReplace(moved.route(ETH0)),
            ]
        );
    }

    #[test]
    fn foreign_routes_are_left_alone() {
        let mut routes = underlay();
        // A connected route inside the overlay (the pod bridge), a route outside the overlay,
        // a vxlan route on another device: none of them is host-gw's.
        routes.push(Route {
            dst: net("10.244.1.0/24"),
            gateway: None,
            oif: Some(7),
            onlink: false,
            metric: 0,
            protocol: Route::PROTO_KERNEL,
        });
        routes.push(Route::via(
            net("172.20.0.0/16"),
            ip("198.18.0.50"),
            Some(ETH0),
        ));
        routes.push(Route::onlink(net("10.244.8.0/24"), ip("10.244.8.0"), 9));
        assert_eq!(plan(&cfg(), &routes, &[]).ops, vec![]);
    }

    #[tokio::test]
    async fn reconcile_against_the_fake_kernel() {
        let fake = Fake::new();
        let eth0 = fake.add_link("eth0", 1500, None);
        assert_eq!(eth0, ETH0);
        fake.add_addr(Addr {
            ifindex: eth0,
            net: net("198.18.0.1/24"),
        });
        for r in underlay() {
            fake.add_route(r);
        }
        let nl = Netlink::from(fake.clone());
        let mut b = HostGwBackend::setup(&nl, cfg()).await.unwrap();
        assert_eq!(b.mtu(), 1500);
        let s = b.reconcile(&nl, &[peer(2), far_peer(3)]).await.unwrap();
        assert_eq!((s.ops_applied, s.skipped.len()), (1, 1));
        fake.take_ops();
        let s = b.reconcile(&nl, &[peer(2), far_peer(3)]).await.unwrap();
        assert_eq!(s.ops_applied, 0);
        assert_eq!(fake.ops(), vec![]);
        // A resync re-reads and finds nothing to do either.
        b.resync();
        assert_eq!(b.reconcile(&nl, &[peer(2)]).await.unwrap().ops_applied, 0);
        let s = b.reconcile(&nl, &[]).await.unwrap();
        assert_eq!(s.ops_applied, 1);
        assert!(nl
            .routes(eth0)
            .await
            .unwrap()
            .iter()
            .all(|r| !owned(&cfg(), r)));
    }
}
