//! CHECK: the container's interface, addresses and routes, its host end on the bridge and its
//! address records are as ADD left them. prevResult says what ADD returned; what the kernel
//! shows is read first, then compared by a pure function.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use tweed_netlink::{Addr6, Link, Route, Route6};

use super::node;
use crate::attachment::Attachment;
use crate::conf::{ConfError, NetConf};
use crate::env::CniEnv;
use crate::error::Error;
use crate::host::{container_place, Host, HostError, Kernel, HOST_PLACE};
use crate::ipam;
use crate::plan;
use crate::result::CniResult;

#[derive(Debug, thiserror::Error)]
#[error("CHECK of {ifname} in {netns}: {reason}")]
pub struct CheckError {
    pub ifname: String,
    pub netns: String,
    pub reason: String,
}

/// What the attachment must look like.
#[derive(Debug, Clone, PartialEq)]
struct Want {
    ifname: String,
    alias: String,
    mtu: u32,
    host_veth: String,
    bridge: String,
    /// The IPv4 half, when ADD's result gave the interface an IPv4 address.
    v4: Option<Want4>,
    /// The IPv6 half, when ADD's result gave the interface an IPv6 address.
    v6: Option<Want6>,
}

#[derive(Debug, Clone, PartialEq)]
struct Want4 {
    addrs: Vec<Ipv4Network>,
    /// The routes tweed adds, all via `gateway` (other plugins' routes in prevResult are
    /// theirs to check).
    routes: Vec<Ipv4Network>,
    gateway: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq)]
struct Want6 {
    addrs: Vec<Ipv6Network>,
    routes: Vec<Ipv6Network>,
    gateway: Ipv6Addr,
}

/// What the kernel shows of it. Nothing past `link` is read when `link` is missing.
#[derive(Debug, Clone, Default, PartialEq)]
struct Seen {
    link: Option<Link>,
    addrs: BTreeSet<Ipv4Network>,
    routes: Vec<Route>,
    addrs6: Vec<Addr6>,
    routes6: Vec<Route6>,
    host_end: Option<Link>,
    bridge: Option<Link>,
}

/// The IPv4 and IPv6 addresses prevResult gives the container's `ifname`.
fn prev_addrs(
    prev: &CniResult,
    ifname: &str,
) -> Result<(Vec<Ipv4Network>, Vec<Ipv6Network>), String> {
    let idx = prev
        .interfaces
        .iter()
        .position(|i| i.name == ifname && i.sandbox.is_some())
        .ok_or("prevResult lists no such interface in a sandbox")?;
    let addrs: Vec<Ipv4Network> = prev
        .ips
        .iter()
        .filter(|ip| ip.interface == Some(idx))
        .filter_map(|ip| match ip.address {
            IpNetwork::V4(a) => Some(a),
            IpNetwork::V6(_) => None,
        })
        .collect();
    let addrs6: Vec<Ipv6Network> = prev
        .ips
        .iter()
        .filter(|ip| ip.interface == Some(idx))
        .filter_map(|ip| match ip.address {
            IpNetwork::V6(a) => Some(a),
            IpNetwork::V4(_) => None,
        })
        .collect();
    if addrs.is_empty() && addrs6.is_empty() {
        return Err("prevResult gives it no address".into());
    }
    Ok((addrs, addrs6))
}

/// The first way `seen` differs from `want`.
fn verify(want: &Want, seen: &Seen) -> Result<(), String> {
    let link = seen.link.as_ref().ok_or("the interface is gone")?;
    if !plan::owned_by(link, &want.alias) {
        return Err(format!(
            "the interface is not tweed's for this attachment (alias {:?})",
            link.alias
        ));
    }
    if !link.up {
        return Err("the interface is down".into());
    }
    if link.mtu != want.mtu {
        return Err(format!("MTU is {}, expected {}", link.mtu, want.mtu));
    }
    if let Some(w4) = &want.v4 {
        if let Some(a) = w4.addrs.iter().find(|a| !seen.addrs.contains(a)) {
            return Err(format!("address {a} is missing"));
        }
        let gw = w4.gateway;
        for dst in &w4.routes {
            if !seen
                .routes
                .iter()
                .any(|r| r.dst == *dst && r.gateway == Some(gw))
            {
                return Err(format!("route to {dst} via {gw} is missing"));
            }
        }
    }
    if let Some(w6) = &want.v6 {
        for a in &w6.addrs {
            match seen.addrs6.iter().find(|s| s.net == *a) {
                None => return Err(format!("address {a} is missing")),
                Some(s) if s.tentative => {
                    return Err(format!(
                        "address {a} is tentative (duplicate address detection has not \
                         finished, or found a duplicate)"
                    ))
                }
                Some(_) => {}
            }
        }
        let gw = w6.gateway;
        for dst in &w6.routes {
            if !seen
                .routes6
                .iter()
                .any(|r| r.dst == *dst && r.gateway == Some(gw))
            {
                return Err(format!("route to {dst} via {gw} is missing"));
            }
        }
    }
    let hv = &want.host_veth;
    let host_end = seen
        .host_end
        .as_ref()
        .ok_or_else(|| format!("the host end {hv} is gone"))?;
    let bridge = seen
        .bridge
        .as_ref()
        .ok_or_else(|| format!("bridge {} is gone", want.bridge))?;
    if host_end.master != Some(bridge.index) {
        return Err(format!(
            "the host end {hv} is not a port of {}",
            want.bridge
        ));
    }
    if !host_end.up {
        return Err(format!("the host end {hv} is down"));
    }
    Ok(())
}

pub fn check<H: Host>(host: &H, env: &CniEnv, conf: &NetConf) -> Result<(), Error> {
    let fail = |reason: String| CheckError {
        ifname: env.ifname.clone(),
        netns: env.netns.clone(),
        reason,
    };
    let prev = conf.prev_result.as_ref().ok_or(ConfError::Invalid {
        key: "prevResult",
        reason: "CHECK needs the result of ADD as prevResult".into(),
    })?;
    let (addrs, addrs6) = prev_addrs(&CniResult::from_value(prev)?, &env.ifname).map_err(fail)?;
    let node = node(host, conf)?;
    let owner = Attachment::new(&env.container_id, &env.ifname);
    let held = {
        let store = host.lock_store(&conf.store_dir())?;
        ipam::held_by(&store, &owner)?
    };
    let ips = addrs
        .iter()
        .map(|a| a.ip().into())
        .chain(addrs6.iter().map(|a| a.ip().into()));
    for ip in ips {
        if !held.contains(&ip) {
            return Err(fail(format!(
                "address {ip} is not recorded for this container in {}",
                conf.store_dir().display()
            ))
            .into());
        }
    }
    let v6 = match (addrs6.is_empty(), node.v6) {
        (true, _) => None,
        (false, None) => {
            return Err(fail(
                "prevResult gives it an IPv6 address, but this node's subnet.env has no IPv6 \
                 subnet any more"
                    .into(),
            )
            .into())
        }
        (false, Some(n6)) => {
            let mut routes = vec![n6.network];
            if conf.default_route {
                routes.push(Ipv6Network::new(Ipv6Addr::UNSPECIFIED, 0).expect("valid"));
            }
            Some(Want6 {
                addrs: addrs6,
                routes,
                gateway: n6.gateway.ip(),
            })
        }
    };
    let v4 = match (addrs.is_empty(), node.v4) {
        (true, _) => None,
        (false, None) => {
            return Err(fail(
                "prevResult gives it an IPv4 address, but this node's subnet.env has no IPv4 \
                 subnet any more"
                    .into(),
            )
            .into())
        }
        (false, Some(n4)) => {
            let mut routes = vec![n4.network];
            if conf.default_route {
                routes.push(Ipv4Network::new(Ipv4Addr::UNSPECIFIED, 0).expect("valid"));
            }
            Some(Want4 {
                addrs,
                routes,
                gateway: n4.gateway.ip(),
            })
        }
    };
    let want = Want {
        ifname: env.ifname.clone(),
        alias: plan::alias(&conf.name, &env.container_id, &env.ifname),
        mtu: node.mtu,
        v4,
        host_veth: plan::host_veth_name(&env.container_id, &env.ifname),
        bridge: conf.bridge.clone(),
        v6,
    };
    let cns = host.open_netns(&env.netns).map_err(HostError::from)?;
    let seen = host.block_on(observe(host, &cns, &env.netns, &want))??;
    verify(&want, &seen).map_err(|r| fail(r).into())
}

async fn observe<H: Host>(
    host: &H,
    cns: &H::Netns,
    netns_path: &str,
    want: &Want,
) -> Result<Seen, HostError> {
    let ck = Kernel::open(host, Some(cns), &container_place(netns_path))?;
    let Some(link) = ck.link(&want.ifname).await? else {
        return Ok(Seen::default());
    };
    let addrs = ck
        .nl
        .addresses(Some(link.index))
        .await
        .map_err(ck.fail("listing addresses"))?
        .into_iter()
        .map(|a| a.net)
        .collect();
    let routes = ck
        .nl
        .routes(link.index)
        .await
        .map_err(ck.fail("listing routes"))?;
    let (addrs6, routes6) = if want.v6.is_some() {
        let addrs6 = ck
            .nl
            .addresses6(Some(link.index))
            .await
            .map_err(ck.fail("listing IPv6 addresses"))?;
        let routes6 = ck
            .nl
            .all_routes6()
            .await
            .map_err(ck.fail("listing IPv6 routes"))?
            .into_iter()
            .filter(|r| r.oif == Some(link.index))
            .collect();
        (addrs6, routes6)
    } else {
        Default::default()
    };
    let hk = Kernel::open(host, None, HOST_PLACE)?;
    Ok(Seen {
        link: Some(link),
        addrs,
        routes,
        addrs6,
        routes6,
        host_end: hk.link(&want.host_veth).await?,
        bridge: hk.link(&want.bridge).await?,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};
    use tweed_netlink::{Addr, Fake, Netlink, Op};

    use super::*;
    use crate::cmd::run;
    use crate::cmd::tests::{attached, conf, env, C1};
    use crate::host::fake::{block_on, link, FakeHost};

    /// A node with c1 added, and the configuration CHECK gets (ADD's result as prevResult).
    fn added() -> (FakeHost, Fake, NetConf) {
        let (host, ctr, _, r) = attached("c1", json!({}));
        (host, ctr, conf("1.0.0", json!({ "prevResult": r })))
    }

    fn check(host: &FakeHost, c: &NetConf) -> Result<(), (u32, String)> {
        run(host, &env("CHECK", "c1", C1), c)
            .map(|out| assert_eq!(out, None, "CHECK prints nothing"))
            .map_err(|e| (e.code(), e.to_string()))
    }

    fn assert_fails(host: &FakeHost, c: &NetConf, needle: &str) {
        let (code, msg) = check(host, c).unwrap_err();
        assert_eq!(code, 102, "{msg}");
        assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
        assert!(msg.starts_with("CHECK of eth0 in /run/netns/c1: "), "{msg}");
    }

    fn apply(k: &Fake, op: Op) {
        block_on(Netlink::from(k.clone()).apply(&op)).unwrap();
    }

    #[test]
    fn check_passes_on_what_add_made() {
        let (host, _, c) = added();
        check(&host, &c).unwrap();
    }

    #[test]
    fn check_names_what_changed_in_the_container() {
        let (host, ctr, c) = added();
        let eth0 = link(&ctr, "eth0").index;
        let routes = block_on(Netlink::from(ctr.clone()).routes(eth0)).unwrap();
        let default = *routes.iter().find(|r| r.is_default()).unwrap();
        apply(&ctr, Op::RouteDel(default));
        assert_fails(&host, &c, "route to 0.0.0.0/0 via 10.244.7.1 is missing");
        apply(&ctr, Op::RouteReplace(default));
        check(&host, &c).unwrap();
        let addr = "10.244.7.2/24".parse().unwrap();
        apply(
            &ctr,
            Op::AddrDel {
                ifindex: eth0,
                addr,
            },
        );
        assert_fails(&host, &c, "address 10.244.7.2/24 is missing");
        ctr.add_addr(Addr {
            ifindex: eth0,
            net: addr,
        });
        apply(
            &ctr,
            Op::LinkSetMtu {
                name: "eth0".into(),
                mtu: 1500,
            },
        );
        assert_fails(&host, &c, "MTU is 1500, expected 1450");
        apply(
            &ctr,
            Op::LinkSetMtu {
                name: "eth0".into(),
                mtu: 1450,
            },
        );
        apply(
            &ctr,
            Op::LinkSetDown {
                name: "eth0".into(),
            },
        );
        assert_fails(&host, &c, "the interface is down");
        apply(
            &ctr,
            Op::LinkSetUp {
                name: "eth0".into(),
            },
        );
        apply(
            &ctr,
            Op::LinkSetAlias {
                name: "eth0".into(),
                alias: "mine".into(),
            },
        );
        assert_fails(&host, &c, "not tweed's for this attachment");
        apply(&ctr, Op::LinkDelIndex { ifindex: eth0 });
        assert_fails(&host, &c, "the interface is gone");
    }

    #[test]
    fn check_names_what_changed_on_the_host() {
        let (host, _, c) = added();
        let hv = plan::host_veth_name("c1", "eth0");
        apply(&host.kernel, Op::LinkSetDown { name: hv.clone() });
        assert_fails(&host, &c, &format!("the host end {hv} is down"));
        apply(&host.kernel, Op::LinkSetUp { name: hv.clone() });
        apply(
            &host.kernel,
            Op::LinkSetMaster {
                name: hv.clone(),
                master: None,
            },
        );
        assert_fails(&host, &c, "is not a port of cni0");
        apply(
            &host.kernel,
            Op::LinkDel {
                name: "cni0".into(),
            },
        );
        assert_fails(&host, &c, "bridge cni0 is gone");
        apply(&host.kernel, Op::LinkDel { name: hv.clone() });
        assert_fails(&host, &c, "the interface is gone");
    }

    #[test]
    fn check_needs_the_record_and_a_usable_prev_result() {
        let (host, _, c) = added();
        host.store.borrow_mut().files.remove("10.244.7.2");
        assert_fails(
            &host,
            &c,
            "address 10.244.7.2 is not recorded for this container",
        );
        let (host, _, c) = added();
        let (code, msg) = check(&host, &conf("1.0.0", json!({}))).unwrap_err();
        assert_eq!(code, 7);
        assert!(msg.contains("prevResult"), "{msg}");
        let mut prev: Value = c.prev_result.clone().unwrap();
        prev["interfaces"][2]["sandbox"] = Value::Null;
        let no_sandbox = conf("1.0.0", json!({ "prevResult": prev }));
        assert_fails(&host, &no_sandbox, "lists no such interface in a sandbox");
        let mut prev: Value = c.prev_result.clone().unwrap();
        prev["ips"] = json!([]);
        let none = conf("1.0.0", json!({ "prevResult": prev }));
        assert_fails(&host, &none, "prevResult gives it no address");
        // An IPv6 address this v4-only attachment never got: not in the store.
        let mut prev: Value = c.prev_result.clone().unwrap();
        prev["ips"][0]["address"] = json!("fd00::2/64");
        let v6 = conf("1.0.0", json!({ "prevResult": prev }));
        assert_fails(
            &host,
            &v6,
            "address fd00::2 is not recorded for this container",
        );
    }

    #[test]
    fn without_the_default_route_check_does_not_ask_for_it() {
        let (host, ctr, _, r) = attached("c1", json!({"defaultRoute": false}));
        let routes = block_on(Netlink::from(ctr.clone()).routes(link(&ctr, "eth0").index)).unwrap();
        assert!(!routes.iter().any(|r| r.is_default()), "{routes:?}");
        let c = conf("1.0.0", json!({"defaultRoute": false, "prevResult": r}));
        check(&host, &c).unwrap();
    }
}
