//! Where the kernel would send a packet for an address: a longest-prefix match over the main
//! table, so host-gw and vxlan's DirectRouting can tell a peer on the same L2 segment (a route
//! without a gateway covers its address) from one behind a router. Pure, so every case is a unit
//! test; the caller passes the routes it listed.
//!
//! Only the main table is consulted, as `ip route get` would without policy rules; a host with
//! policy routing towards its peers is outside what host-gw can serve anyway.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use crate::netlink::Route;

/// The kernel's next hop towards an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextHop {
    /// On a directly connected network: packets go straight to the address on `oif`.
    Direct { oif: Option<u32> },
    /// Through a router: the address is not on any attached segment.
    Gateway { gateway: Ipv4Addr, oif: Option<u32> },
    /// No route covers the address at all.
    Unreachable,
}

/// Longest-prefix match over `routes`, lowest metric among equally long prefixes. Routes inside
/// `overlay` are skipped: they are the overlay's own (ours, or the pod bridge's), and a peer's
/// public address reached through the overlay would be a loop.
pub fn next_hop(routes: &[Route], overlay: Ipv4Network, ip: Ipv4Addr) -> NextHop {
    let best = routes
        .iter()
        .filter(|r| r.dst.contains(ip) && !overlay.contains(r.dst.network()))
        .max_by(|a, b| {
            a.dst
                .prefix()
                .cmp(&b.dst.prefix())
                .then(b.metric.cmp(&a.metric))
        });
    match best {
        None => NextHop::Unreachable,
        Some(r) => match r.gateway {
            Some(gateway) => NextHop::Gateway {
                gateway,
                oif: r.oif,
            },
            None => NextHop::Direct { oif: r.oif },
        },
    }
}

/// Why `ip` cannot be used as a plain next hop out of `underlay`, or `None` when it can.
pub fn not_on_link_reason(
    routes: &[Route],
    overlay: Ipv4Network,
    underlay: u32,
    underlay_name: &str,
    ip: Ipv4Addr,
) -> Option<String> {
    match next_hop(routes, overlay, ip) {
        NextHop::Direct { oif } if oif.is_none_or(|o| o == underlay) => None,
        NextHop::Direct { oif } => Some(format!(
            "its PublicIP {ip} is directly connected on interface #{}, not on the underlay {underlay_name}",
            oif.unwrap_or(0)
        )),
        NextHop::Gateway { gateway, .. } => Some(format!(
            "its PublicIP {ip} is not on this node's L2 segment ({underlay_name}): it is reached \
             through the router {gateway}, and host-gw routes need the peer itself as next hop"
        )),
        NextHop::Unreachable => Some(format!(
            "its PublicIP {ip} is not reachable: no route covers it"
        )),
    }
}

/// The canonical form of a subnet (no host bits), as the kernel reports route destinations.
pub fn canonical(subnet: Ipv4Network) -> Ipv4Network {
    Ipv4Network::new(subnet.network(), subnet.prefix()).expect("prefix of a valid network")
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::{ip, net};
    fn connected(dst: &str, oif: u32) -> Route {
        Route {
            dst: net(dst),
            gateway: None,
            oif: Some(oif),
            onlink: false,
            metric: 0,
            protocol: Route::PROTO_KERNEL,
        }
    }

    fn world() -> Vec<Route> {
        vec![
            connected("198.18.0.0/24", 2),
            Route::via(net("0.0.0.0/0"), ip("198.18.0.254"), Some(2)),
            Route::via(net("198.18.1.0/24"), ip("198.18.0.254"), Some(2)),
            connected("172.16.0.0/16", 3),
            // The overlay's own routes must never decide about the underlay.
            connected("10.244.0.0/16", 9),
            Route::via(net("10.244.5.0/24"), ip("198.18.0.5"), Some(2)),
        ]
    }

    #[test]
    fn longest_prefix_wins() {
        let o = net("10.244.0.0/16");
        assert_eq!(
            next_hop(&world(), o, ip("198.18.0.7")),
            NextHop::Direct { oif: Some(2) }
        );
        assert_eq!(
            next_hop(&world(), o, ip("198.18.1.7")),
            NextHop::Gateway {
                gateway: ip("198.18.0.254"),
                oif: Some(2)
            }
        );
        assert_eq!(
            next_hop(&world(), o, ip("8.8.8.8")),
            NextHop::Gateway {
                gateway: ip("198.18.0.254"),
                oif: Some(2)
            }
        );
        // Only the default route would match an overlay address; overlay routes are ignored.
        assert!(matches!(
            next_hop(&world(), o, ip("10.244.5.9")),
            NextHop::Gateway { .. }
        ));
        assert_eq!(next_hop(&[], o, ip("1.2.3.4")), NextHop::Unreachable);
    }

    #[test]
    fn lower_metric_wins_among_equal_prefixes() {
        let mut routes = vec![
            Route {
                metric: 100,
                ..connected("198.18.0.0/24", 2)
            },
            Route {
                metric: 50,
                ..Route::via(net("198.18.0.0/24"), ip("10.0.0.1"), Some(3))
            },
        ];
        assert!(matches!(
            next_hop(&routes, net("10.244.0.0/16"), ip("198.18.0.3")),
            NextHop::Gateway { .. }
        ));
        routes[1].metric = 200;
        assert_eq!(
            next_hop(&routes, net("10.244.0.0/16"), ip("198.18.0.3")),
            NextHop::Direct { oif: Some(2) }
        );
    }

    #[test]
    fn reasons_name_the_address_and_the_router() {
        let o = net("10.244.0.0/16");
        assert_eq!(
            not_on_link_reason(&world(), o, 2, "eth0", ip("198.18.0.3")),
            None
        );
        let r = not_on_link_reason(&world(), o, 2, "eth0", ip("198.18.1.3")).unwrap();
        assert!(
            r.contains("198.18.1.3") && r.contains("198.18.0.254") && r.contains("eth0"),
            "{r}"
        );
        let r = not_on_link_reason(&world(), o, 2, "eth0", ip("172.16.0.9")).unwrap();
        assert!(r.contains("#3"), "{r}");
        let r = not_on_link_reason(&[], o, 2, "eth0", ip("172.16.0.9")).unwrap();
        assert!(r.contains("not reachable"), "{r}");
    }
}
