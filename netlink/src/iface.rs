//! Choosing the underlay interface from `--iface` (a name or an IPv4 address) or, without it, the
//! interface of the IPv4 default route. The choice is a pure function of the links, addresses and
//! default route, so every branch is testable without a kernel.

use std::net::Ipv4Addr;

use super::error::NetlinkError;
use super::types::{Addr, Link};
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
}

/// Pure selection. `addrs` lists IPv4 addresses in kernel order, so the first one of a link is
/// its primary address.
pub fn pick_iface(
    spec: Option<&IfaceSpec>,
    links: &[Link],
    addrs: &[Addr],
    default_oif: Option<u32>,
) -> Result<Iface, IfaceError> {
    let first_ip = |index: u32| {
        addrs
            .iter()
            .find(|a| a.ifindex == index)
            .map(|a| a.net.ip())
    };
    let build = |link: &Link, ip: Ipv4Addr| Iface {
        index: link.index,
        name: link.name.clone(),
        ip,
        mtu: link.mtu,
    };
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
            let ip = first_ip(link.index).ok_or_else(|| IfaceError::NoIpv4 {
                name: link.name.clone(),
                how: "given by --iface",
            })?;
            Ok(build(link, ip))
        }
        Some(IfaceSpec::Addr(ip)) => {
            let link = addrs
                .iter()
                .find(|a| a.net.ip() == *ip)
                .and_then(|a| links.iter().find(|l| l.index == a.ifindex))
                .ok_or(IfaceError::NoSuchAddr { ip: *ip })?;
            Ok(build(link, *ip))
        }
        None => {
            let index = default_oif.ok_or(IfaceError::NoDefaultRoute)?;
            let link = links
                .iter()
                .find(|l| l.index == index)
                .ok_or(IfaceError::DefaultRouteLinkGone { index })?;
            let ip = first_ip(index).ok_or_else(|| IfaceError::NoIpv4 {
                name: link.name.clone(),
                how: "the IPv4 default route's",
            })?;
            Ok(build(link, ip))
        }
    }
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

    fn world() -> (Vec<Link>, Vec<Addr>) {
        let link = |index, name: &str| Link {
            index,
            name: name.into(),
            mtu: 1500 - index,
            mac: None,
            kind: None,
            up: true,
            vxlan: None,
        };
        let addr = |ifindex, s: &str| Addr {
            ifindex,
            net: s.parse().unwrap(),
        };
        (
            vec![
                link(1, "lo"),
                link(2, "eth0"),
                link(3, "eth1"),
                link(4, "bare"),
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
        assert_eq!(
            (i.name.as_str(), i.ip.to_string()),
            ("eth1", "10.0.0.3".into())
        );
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

    #[tokio::test]
    async fn select_uses_the_lowest_metric_default_route() {
        let fake = Fake::new();
        let eth0 = fake.add_link("eth0", 1500, None);
        let eth1 = fake.add_link("eth1", 9000, None);
        for (i, ip) in [(eth0, "198.18.0.2/24"), (eth1, "10.1.0.2/24")] {
            fake.add_addr(Addr {
                ifindex: i,
                net: ip.parse().unwrap(),
            });
        }
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
