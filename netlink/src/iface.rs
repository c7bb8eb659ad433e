//! Choosing the underlay interface.
//!
//! [`choose`] implements every knob tweedd has: `--iface` (a name or an IPv4 address, repeatable,
//! first match wins), `--iface-regex` (repeatable; matched against addresses, then names),
//! `--iface-can-reach ADDR` (the interface the main routing table sends ADDR out of) and, when
//! none of those is given, the interface owning `--public-ip` or else the interface of the IPv4
//! default route. It is a pure function of links, addresses and routes, so every branch is
//! testable without a kernel; [`select`] reads those from a [`Netlink`] and calls it.
//!
//! The older single-spec [`pick_iface`]/[`select_iface`] stay for callers that need only them.

use std::net::Ipv4Addr;

use regex::Regex;

use super::error::NetlinkError;
use super::types::{Addr, Link, Route};
use super::Netlink;

/// The underlay: where VXLAN packets leave and which address peers reach us on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    pub index: u32,
    pub name: String,
    pub ip: Ipv4Addr,
    pub mtu: u32,
}

/// What `--iface` asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfaceSpec {
    Name(String),
    Addr(Ipv4Addr),
}

impl IfaceSpec {
    /// Anything that parses as an IPv4 address is one; interface names cannot be dotted quads in
    /// practice, so there is no ambiguity worth a separate flag.
    pub fn parse(s: &str) -> IfaceSpec {
        match s.trim().parse::<Ipv4Addr>() {
            Ok(ip) => IfaceSpec::Addr(ip),
            Err(_) => IfaceSpec::Name(s.trim().to_string()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    #[error(
        "no IPv4 default route in this network namespace, so the underlay interface cannot be \
         guessed (tried: the interface of the IPv4 default route); pass --iface NAME or \
         --iface IPV4-ADDRESS to choose one"
    )]
    NoDefaultRoute,

    #[error("the IPv4 default route uses interface #{index}, which no longer exists; pass --iface to choose one")]
    DefaultRouteLinkGone { index: u32 },

    #[error("--iface {name}: no such interface (have: {})", available.join(", "))]
    NoSuchName {
        name: String,
        available: Vec<String>,
    },

    #[error("--iface {ip}: no interface has this IPv4 address")]
    NoSuchAddr { ip: Ipv4Addr },

    #[error("interface {name} ({how}) has no IPv4 address; give it one or pass --iface with another interface")]
    NoIpv4 { name: String, how: &'static str },

    #[error("looking for the underlay interface: {0}")]
    Netlink(#[from] NetlinkError),

    #[error("--iface-regex {regex:?}: not a valid regular expression: {reason}")]
    InvalidRegex { regex: String, reason: String },

    #[error(
        "--iface-can-reach {ip}: an IPv6 address chooses the underlay only in an IPv6-only \
         network (EnableIPv4: false); this network has IPv4, so give an IPv4 address"
    )]
    CanReachIpv6 { ip: std::net::Ipv6Addr },

    /// Everything [`choose`] tried, in order, each with why it did not give an interface.
    #[error(
        "no usable underlay interface; tried, in order: {}. Pass --iface NAME|IPV4, \
         --iface-regex REGEX or --iface-can-reach <etcd or peer IP> to choose one",
        tried.join("; ")
    )]
    NoneMatched { tried: Vec<String> },
}

impl Iface {
    fn of(link: &Link, ip: Ipv4Addr) -> Iface {
        Iface {
            index: link.index,
            name: link.name.clone(),
            ip,
            mtu: link.mtu,
        }
    }
}

fn link_by_index(links: &[Link], index: u32) -> Option<&Link> {
    links.iter().find(|l| l.index == index)
}

/// `link` as the underlay, with the address the kernel would most likely use as source towards
/// `next_hop`: one whose network contains it, else the primary (the link's first in `addrs`).
/// `None` when the link has no IPv4 address.
fn underlay(link: &Link, addrs: &[Addr], next_hop: Option<Ipv4Addr>) -> Option<Iface> {
    let mine = || addrs.iter().filter(|a| a.ifindex == link.index);
    next_hop
        .and_then(|h| mine().find(|a| a.net.contains(h)))
        .or_else(|| mine().next())
        .map(|a| Iface::of(link, a.net.ip()))
}

/// Why the interface a route names is no underlay; each caller words it for its own knob.
enum Unusable<'a> {
    Gone,
    NoIpv4(&'a Link),
}

/// The [`underlay`] on the link with `index` (a route's output device).
fn routed_underlay<'a>(
    links: &'a [Link],
    addrs: &[Addr],
    index: u32,
    next_hop: Option<Ipv4Addr>,
) -> Result<Iface, Unusable<'a>> {
    let link = link_by_index(links, index).ok_or(Unusable::Gone)?;
    underlay(link, addrs, next_hop).ok_or(Unusable::NoIpv4(link))
}

/// Pure selection. `addrs` lists IPv4 addresses in kernel order, so the first one of a link is
/// its primary address.
pub fn pick_iface(
    spec: Option<&IfaceSpec>,
    links: &[Link],
    addrs: &[Addr],
    default_oif: Option<u32>,
) -> Result<Iface, IfaceError> {
    match spec {
        Some(IfaceSpec::Name(name)) => {
            let link =
                links
                    .iter()
                    .find(|l| &l.name == name)
                    .ok_or_else(|| IfaceError::NoSuchName {
                        name: name.clone(),
                        available: links.iter().map(|l| l.name.clone()).collect(),
                    })?;
            underlay(link, addrs, None).ok_or_else(|| IfaceError::NoIpv4 {
                name: link.name.clone(),
                how: "given by --iface",
            })
        }
        Some(IfaceSpec::Addr(ip)) => {
            let link = addrs
                .iter()
                .find(|a| a.net.ip() == *ip)
                .and_then(|a| link_by_index(links, a.ifindex))
                .ok_or(IfaceError::NoSuchAddr { ip: *ip })?;
            Ok(Iface::of(link, *ip))
        }
        None => {
            let index = default_oif.ok_or(IfaceError::NoDefaultRoute)?;
            routed_underlay(links, addrs, index, None).map_err(|e| match e {
                Unusable::Gone => IfaceError::DefaultRouteLinkGone { index },
                Unusable::NoIpv4(link) => IfaceError::NoIpv4 {
                    name: link.name.clone(),
                    how: "the IPv4 default route's",
                },
            })
        }
    }
}

/// Everything the operator said about the underlay interface; see the module docs for the order
/// in which it is tried.
#[derive(Debug, Clone, Default)]
pub struct IfaceChoice {
    /// `--iface`, in the order given.
    pub ifaces: Vec<IfaceSpec>,
    /// `--iface-regex`, in the order given (unanchored, like flannel's: use `^...$`).
    pub regexes: Vec<Regex>,
    /// `--iface-can-reach`.
    pub can_reach: Option<Ipv4Addr>,
    /// `--public-ip`: only consulted when nothing above is given; the interface that owns this
    /// address is preferred to the default route's (it may own none: a NAT'd public address).
    pub public_ip: Option<Ipv4Addr>,
}

impl IfaceChoice {
    /// From the raw flag values; a bad regex is an error naming it.
    pub fn new(
        ifaces: &[String],
        regexes: &[String],
        can_reach: Option<Ipv4Addr>,
        public_ip: Option<Ipv4Addr>,
    ) -> Result<IfaceChoice, IfaceError> {
        let regexes = regexes
            .iter()
            .map(|r| {
                Regex::new(r).map_err(|e| IfaceError::InvalidRegex {
                    regex: r.clone(),
                    reason: e.to_string(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(IfaceChoice {
            ifaces: ifaces.iter().map(|s| IfaceSpec::parse(s)).collect(),
            regexes,
            can_reach,
            public_ip,
        })
    }

    /// True when the operator named no interface: the default route decides.
    pub fn is_automatic(&self) -> bool {
        self.ifaces.is_empty() && self.regexes.is_empty() && self.can_reach.is_none()
    }
}

/// How a route lookup ended: the output device and the next hop (the gateway, or the destination
/// itself for a directly connected network).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteHit {
    pub oif: u32,
    pub next_hop: Ipv4Addr,
}

/// Longest-prefix match over the main table's unicast routes, like the kernel without policy
/// rules: the most specific route wins, then the lowest metric. A gateway route without an output
/// device is resolved through the table again (a few levels at most).
pub fn route_lookup(dst: Ipv4Addr, routes: &[Route]) -> Option<RouteHit> {
    fn lookup(dst: Ipv4Addr, routes: &[Route], depth: u8) -> Option<RouteHit> {
        let best = routes
            .iter()
            .filter(|r| r.dst.contains(dst))
            .min_by_key(|r| (std::cmp::Reverse(r.dst.prefix()), r.metric))?;
        let next_hop = best.gateway.unwrap_or(dst);
        match best.oif {
            Some(oif) => Some(RouteHit { oif, next_hop }),
            None if depth < 4 && best.gateway.is_some() => {
                lookup(next_hop, routes, depth + 1).map(|h| RouteHit {
                    oif: h.oif,
                    next_hop,
                })
            }
            None => None,
        }
    }
    lookup(dst, routes, 0)
}

/// Pure choice; errors list every attempt. `addrs` are IPv4 addresses in kernel order (a link's
/// first is its primary); `routes` are the main table's IPv4 unicast routes.
pub fn choose(
    spec: &IfaceChoice,
    links: &[Link],
    addrs: &[Addr],
    routes: &[Route],
) -> Result<Iface, IfaceError> {
    let mut tried: Vec<String> = Vec::new();

    for want in &spec.ifaces {
        match pick_iface(Some(want), links, addrs, None) {
            Ok(i) => return Ok(i),
            Err(e) => tried.push(e.to_string()),
        }
    }

    let is_loopback = |l: &Link| l.name == "lo";
    for re in &spec.regexes {
        // Addresses first (flannel's order), then names; loopback never matches.
        let by_addr = addrs.iter().find_map(|a| {
            let link = link_by_index(links, a.ifindex)?;
            (!is_loopback(link)
                && !a.net.ip().is_loopback()
                && re.is_match(&a.net.ip().to_string()))
            .then(|| Iface::of(link, a.net.ip()))
        });
        if let Some(i) = by_addr {
            return Ok(i);
        }
        let named: Vec<&Link> = links
            .iter()
            .filter(|l| !is_loopback(l) && re.is_match(&l.name))
            .collect();
        if let Some(i) = named.iter().find_map(|l| underlay(l, addrs, None)) {
            return Ok(i);
        }
        tried.push(if named.is_empty() {
            format!(
                "--iface-regex {}: matches no interface name or IPv4 address",
                re.as_str()
            )
        } else {
            format!(
                "--iface-regex {}: matches {} but none has an IPv4 address",
                re.as_str(),
                named
                    .iter()
                    .map(|l| l.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        });
    }

    if let Some(target) = spec.can_reach {
        match route_lookup(target, routes) {
            None => tried.push(format!(
                "--iface-can-reach {target}: no route to it in the main table"
            )),
            Some(hit) => match routed_underlay(links, addrs, hit.oif, Some(hit.next_hop)) {
                Ok(i) => return Ok(i),
                Err(Unusable::Gone) => tried.push(format!(
                    "--iface-can-reach {target}: the route uses interface #{}, which no longer exists",
                    hit.oif
                )),
                Err(Unusable::NoIpv4(link)) => tried.push(format!(
                    "--iface-can-reach {target}: routed out of {}, which has no IPv4 address",
                    link.name
                )),
            },
        }
    }

    if !spec.is_automatic() {
        return Err(IfaceError::NoneMatched { tried });
    }

    if let Some(ip) = spec.public_ip {
        match pick_iface(Some(&IfaceSpec::Addr(ip)), links, addrs, None) {
            Ok(i) => return Ok(i),
            Err(_) => tried.push(format!(
                "--public-ip {ip}: no interface owns it (fine behind NAT; falling back to the default route)"
            )),
        }
    }

    let default = routes
        .iter()
        .filter(|r| r.is_default() && r.oif.is_some())
        .min_by_key(|r| r.metric);
    match default {
        None => {
            tried.push("the IPv4 default route's interface: there is no IPv4 default route".into())
        }
        Some(r) => {
            let index = r.oif.expect("filtered");
            match routed_underlay(links, addrs, index, r.gateway) {
                Ok(i) => return Ok(i),
                Err(Unusable::Gone) => tried.push(format!(
                    "the IPv4 default route's interface: #{index} no longer exists"
                )),
                Err(Unusable::NoIpv4(link)) => tried.push(format!(
                    "the IPv4 default route's interface {}: it has no IPv4 address",
                    link.name
                )),
            }
        }
    }
    Err(IfaceError::NoneMatched { tried })
}

/// Reads links, addresses and routes from the kernel (or the fake) and [`choose`]s.
pub async fn select(nl: &Netlink, spec: &IfaceChoice) -> Result<Iface, IfaceError> {
    let links = nl.links().await?;
    let addrs = nl.addresses(None).await?;
    let routes = nl.all_routes().await?;
    choose(spec, &links, &addrs, &routes)
}

/// Reads what [`pick_iface`] needs from the kernel and picks; `iface` is the raw `--iface` value.
pub async fn select_iface(nl: &Netlink, iface: Option<&str>) -> Result<Iface, IfaceError> {
    let spec = iface.map(IfaceSpec::parse);
    let links = nl.links().await?;
    let addrs = nl.addresses(None).await?;
    let default_oif = match spec {
        None => nl.default_route_oif().await?,
        Some(_) => None,
    };
    pick_iface(spec.as_ref(), &links, &addrs, default_oif)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Fake, Route};

    fn link(index: u32, name: &str, mtu: u32) -> Link {
        Link {
            index,
            name: name.into(),
            mtu,
            up: true,
            ..Default::default()
        }
    }

    fn addr(ifindex: u32, s: &str) -> Addr {
        Addr {
            ifindex,
            net: s.parse().unwrap(),
        }
    }

    /// What the assertions compare: the chosen interface's name and address.
    fn name_ip(i: &Iface) -> (&str, String) {
        (i.name.as_str(), i.ip.to_string())
    }

    fn world() -> (Vec<Link>, Vec<Addr>) {
        (
            // Each link its own MTU, so a test can tell which link an Iface was built from.
            vec![
                link(1, "lo", 1499),
                link(2, "eth0", 1498),
                link(3, "eth1", 1497),
                link(4, "bare", 1496),
            ],
            vec![
                addr(1, "127.0.0.1/8"),
                addr(2, "198.18.0.2/24"),
                addr(2, "198.18.0.99/24"),
                addr(3, "10.0.0.3/16"),
            ],
        )
    }

    #[test]
    fn spec_parsing() {
        assert_eq!(IfaceSpec::parse("eth0"), IfaceSpec::Name("eth0".into()));
        assert_eq!(
            IfaceSpec::parse("10.0.0.3"),
            IfaceSpec::Addr("10.0.0.3".parse().unwrap())
        );
    }

    #[test]
    fn by_name_takes_the_primary_address() {
        let (links, addrs) = world();
        let i = pick_iface(Some(&IfaceSpec::parse("eth0")), &links, &addrs, None).unwrap();
        assert_eq!(
            i,
            Iface {
                index: 2,
                name: "eth0".into(),
                ip: "198.18.0.2".parse().unwrap(),
                mtu: 1498
            }
        );
    }

    #[test]
    fn by_address_even_a_secondary_one() {
        let (links, addrs) = world();
        let i = pick_iface(Some(&IfaceSpec::parse("198.18.0.99")), &links, &addrs, None).unwrap();
        assert_eq!((i.index, i.ip.to_string()), (2, "198.18.0.99".into()));
    }

    #[test]
    fn default_route_interface() {
        let (links, addrs) = world();
        let i = pick_iface(None, &links, &addrs, Some(3)).unwrap();
        assert_eq!(name_ip(&i), ("eth1", "10.0.0.3".into()));
    }

    #[test]
    fn errors_say_what_was_tried() {
        let (links, addrs) = world();
        let e = pick_iface(None, &links, &addrs, None).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, IfaceError::NoDefaultRoute));
        assert!(
            msg.contains("default route") && msg.contains("--iface"),
            "{msg}"
        );

        let e = pick_iface(Some(&IfaceSpec::parse("wlan9")), &links, &addrs, None).unwrap_err();
        assert!(
            e.to_string().contains("wlan9") && e.to_string().contains("eth0"),
            "{e}"
        );
        let e = pick_iface(Some(&IfaceSpec::parse("bare")), &links, &addrs, None).unwrap_err();
        assert!(matches!(e, IfaceError::NoIpv4 { .. }), "{e}");
        let e = pick_iface(Some(&IfaceSpec::parse("1.2.3.4")), &links, &addrs, None).unwrap_err();
        assert!(matches!(e, IfaceError::NoSuchAddr { .. }), "{e}");
        let e = pick_iface(None, &links, &addrs, Some(42)).unwrap_err();
        assert!(
            matches!(e, IfaceError::DefaultRouteLinkGone { index: 42 }),
            "{e}"
        );
    }

    fn route(dst: &str, gw: Option<&str>, oif: Option<u32>, metric: u32) -> Route {
        Route {
            dst: dst.parse().unwrap(),
            gateway: gw.map(|g| g.parse().unwrap()),
            oif,
            onlink: false,
            metric,
            protocol: Route::PROTO_KERNEL,
        }
    }

    /// lo(1) 127.0.0.1, eth0(2) 198.18.0.2 + .99, eth1(3) 10.0.0.3/16, bare(4) no address;
    /// default via 198.18.0.1 on eth0, connected routes for both networks.
    fn routes() -> Vec<Route> {
        vec![
            route("0.0.0.0/0", Some("198.18.0.1"), Some(2), 100),
            route("198.18.0.0/24", None, Some(2), 0),
            route("10.0.0.0/16", None, Some(3), 0),
        ]
    }

    fn choice(ifaces: &[&str], regexes: &[&str], can_reach: Option<&str>) -> IfaceChoice {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        IfaceChoice::new(
            &s(ifaces),
            &s(regexes),
            can_reach.map(|c| c.parse().unwrap()),
            None,
        )
        .unwrap()
    }

    #[test]
    fn choose_defaults_to_the_default_route_interface() {
        let (links, addrs) = world();
        let i = choose(&IfaceChoice::default(), &links, &addrs, &routes()).unwrap();
        assert_eq!(name_ip(&i), ("eth0", "198.18.0.2".into()));
    }

    #[test]
    fn choose_iface_list_first_match_wins() {
        let (links, addrs) = world();
        let c = choice(&["wlan0", "bare", "10.0.0.3", "eth0"], &[], None);
        let i = choose(&c, &links, &addrs, &routes()).unwrap();
        assert_eq!(i.name, "eth1");
    }

    #[test]
    fn choose_regex_matches_addresses_then_names_and_never_loopback() {
        let (links, addrs) = world();
        let i = choose(
            &choice(&[], &[r"^198\.18\.0\.99$"], None),
            &links,
            &addrs,
            &[],
        )
        .unwrap();
        assert_eq!(name_ip(&i), ("eth0", "198.18.0.99".into()));
        let i = choose(&choice(&[], &["^eth1$"], None), &links, &addrs, &[]).unwrap();
        assert_eq!(name_ip(&i), ("eth1", "10.0.0.3".into()));
        // `.` matches everything; lo (first in kernel order) is skipped.
        let i = choose(&choice(&[], &["."], None), &links, &addrs, &[]).unwrap();
        assert_eq!(i.name, "eth0");
        // A name match without an address does not count; the next regex is tried.
        let i = choose(&choice(&[], &["^ba", "^10\\."], None), &links, &addrs, &[]).unwrap();
        assert_eq!(i.name, "eth1");
        assert!(matches!(
            IfaceChoice::new(&[], &["(".into()], None, None),
            Err(IfaceError::InvalidRegex { .. })
        ));
    }

    #[test]
    fn route_lookup_is_longest_prefix_then_metric_and_resolves_gateways() {
        let mut r = routes();
        r.push(route("10.0.5.0/24", Some("198.18.0.7"), None, 0));
        r.push(route("10.0.6.0/24", None, Some(2), 50));
        r.push(route("10.0.6.0/24", None, Some(3), 10));
        let hit = |d: &str| route_lookup(d.parse().unwrap(), &r);
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            hit("10.0.9.9"),
            Some(RouteHit {
                oif: 3,
                next_hop: ip("10.0.9.9")
            })
        );
        assert_eq!(
            hit("8.8.8.8"),
            Some(RouteHit {
                oif: 2,
                next_hop: ip("198.18.0.1")
            })
        );
        // A gateway route without a device goes out where its gateway is reached.
        assert_eq!(
            hit("10.0.5.1"),
            Some(RouteHit {
                oif: 2,
                next_hop: ip("198.18.0.7")
            })
        );
        assert_eq!(
            hit("10.0.6.1").unwrap().oif,
            3,
            "lowest metric among equals"
        );
        assert_eq!(route_lookup(ip("1.1.1.1"), &routes()[1..]), None);
    }

    #[test]
    fn choose_can_reach_picks_the_routed_interface() {
        let reaching = |dest| {
            let (links, addrs) = world();
            choose(&choice(&[], &[], Some(dest)), &links, &addrs, &routes()).unwrap()
        };
        assert_eq!(reaching("10.0.200.1").name, "eth1");
        // Via the default route: eth0, with its address in the gateway's network.
        assert_eq!(
            name_ip(&reaching("203.0.113.9")),
            ("eth0", "198.18.0.2".into())
        );
    }

    /// The Vagrant trap: every VM has the NAT interface eth0 = 10.0.2.15 with the default route,
    /// and the host-only network on eth1. The default picks eth0 on every node (all advertise
    /// 10.0.2.15); `--iface eth1` or `--iface-can-reach <etcd IP>` picks the right one.
    #[test]
    fn vagrant_nat_interface_trap() {
        let links = vec![
            link(1, "lo", 1500),
            link(2, "eth0", 1500),
            link(3, "eth1", 1500),
        ];
        let addrs = vec![
            addr(1, "127.0.0.1/8"),
            addr(2, "10.0.2.15/24"),
            addr(3, "192.168.56.11/24"),
        ];
        let routes = vec![
            route("0.0.0.0/0", Some("10.0.2.2"), Some(2), 100),
            route("10.0.2.0/24", None, Some(2), 100),
            route("192.168.56.0/24", None, Some(3), 0),
        ];
        let i = choose(&IfaceChoice::default(), &links, &addrs, &routes).unwrap();
        assert_eq!(i.ip.to_string(), "10.0.2.15", "the trap");
        for c in [
            choice(&["eth1"], &[], None),
            choice(&[], &[], Some("192.168.56.10")),
        ] {
            let i = choose(&c, &links, &addrs, &routes).unwrap();
            assert_eq!(name_ip(&i), ("eth1", "192.168.56.11".into()));
        }
    }

    #[test]
    fn choose_public_ip_prefers_its_owner_else_default_route() {
        let (links, addrs) = world();
        let mut c = IfaceChoice {
            public_ip: Some("10.0.0.3".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(choose(&c, &links, &addrs, &routes()).unwrap().name, "eth1");
        c.public_ip = Some("203.0.113.1".parse().unwrap());
        assert_eq!(choose(&c, &links, &addrs, &routes()).unwrap().name, "eth0");
    }

    #[test]
    fn choose_error_lists_everything_tried_and_does_not_fall_back() {
        let (links, addrs) = world();
        let c = choice(&["wlan0", "bare"], &["^en", "^ba"], Some("172.31.0.1"));
        let e = choose(&c, &links, &addrs, &routes()[1..]).unwrap_err();
        let msg = e.to_string();
        let IfaceError::NoneMatched { tried } = &e else {
            panic!("{e}")
        };
        assert_eq!(tried.len(), 5, "{msg}");
        for part in [
            "wlan0",
            "bare",
            "^en",
            "^ba",
            "matches bare but none",
            "172.31.0.1",
            "no route",
        ] {
            assert!(msg.contains(part), "{part} missing in {msg}");
        }
        // An explicit choice that fails never silently becomes the default route's interface.
        let e = choose(&choice(&["wlan0"], &[], None), &links, &addrs, &routes()).unwrap_err();
        assert!(!e.to_string().contains("default route"), "{e}");
        // Nothing at all: the default route was tried, and --public-ip too.
        let c = IfaceChoice {
            public_ip: Some("203.0.113.1".parse().unwrap()),
            ..Default::default()
        };
        let msg = choose(&c, &links, &addrs, &routes()[1..])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("--public-ip 203.0.113.1") && msg.contains("no IPv4 default route"),
            "{msg}"
        );
    }

    /// eth0 198.18.0.2/24 (MTU 1500) and eth1 10.1.0.2/24 (MTU 9000), no routes yet.
    fn two_nic_fake() -> (Fake, u32, u32) {
        let fake = Fake::new();
        let eth0 = fake.add_link("eth0", 1500, None);
        let eth1 = fake.add_link("eth1", 9000, None);
        fake.add_addr(addr(eth0, "198.18.0.2/24"));
        fake.add_addr(addr(eth1, "10.1.0.2/24"));
        (fake, eth0, eth1)
    }

    #[tokio::test]
    async fn select_reads_the_fake_kernel() {
        let (fake, eth0, eth1) = two_nic_fake();
        fake.add_route(route("0.0.0.0/0", Some("198.18.0.1"), Some(eth0), 0));
        fake.add_route(route("10.1.0.0/24", None, Some(eth1), 0));
        let nl = Netlink::from(fake);
        let i = select(&nl, &IfaceChoice::default()).await.unwrap();
        assert_eq!(i.name, "eth0");
        let c = IfaceChoice::new(&[], &[], Some("10.1.0.77".parse().unwrap()), None).unwrap();
        let i = select(&nl, &c).await.unwrap();
        assert_eq!((i.name.as_str(), i.mtu), ("eth1", 9000));
    }

    #[tokio::test]
    async fn select_uses_the_lowest_metric_default_route() {
        let (fake, eth0, eth1) = two_nic_fake();
        let default = |oif, metric| Route {
            metric,
            ..Route::via(
                "0.0.0.0/0".parse().unwrap(),
                "198.18.0.1".parse().unwrap(),
                Some(oif),
            )
        };
        fake.add_route(default(eth0, 200));
        fake.add_route(default(eth1, 100));
        let nl = Netlink::from(fake);
        let i = select_iface(&nl, None).await.unwrap();
        assert_eq!((i.name.as_str(), i.mtu), ("eth1", 9000));
        let i = select_iface(&nl, Some("eth0")).await.unwrap();
        assert_eq!(i.ip.to_string(), "198.18.0.2");
    }
}
