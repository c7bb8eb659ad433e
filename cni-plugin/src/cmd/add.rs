//! ADD: an address from the pool, the bridge, a veth pair into the container with its address
//! and routes, then the result. A failure after the address was taken undoes what exists.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use serde_json::{Map, Value};
use tweed_netlink::{Link, MacAddr, Op};

use super::node;
use crate::attachment::Attachment;
use crate::conf::{ConfError, NetConf};
use crate::env::CniEnv;
use crate::error::Error;
use crate::host::{container_place, Host, HostError, Kernel, HOST_PLACE};
use crate::ipam;
use crate::node::Node;
use crate::plan::{self, Attach, Attach4, Attach6, BridgeWant};
use crate::result::{CniResult, Interface, IpConfig, RouteOut};

/// What ADD is asked for beyond the attachment itself, checked before anything happens.
#[derive(Debug, Clone, PartialEq)]
struct Request {
    /// runtimeConfig `ips`, else `CNI_ARGS` `IP=`.
    ip: Option<Ipv4Addr>,
    /// runtimeConfig `ips`' IPv6 entry (used on a dual-stack attachment only).
    ip6: Option<Ipv6Addr>,
    /// runtimeConfig `mac`.
    mac: Option<MacAddr>,
    prev: Option<CniResult>,
}

impl Request {
    fn parse(env: &CniEnv, conf: &NetConf) -> Result<Request, Error> {
        let mac = match &conf.runtime_config.mac {
            Some(m) => Some(m.parse::<MacAddr>().map_err(|e| ConfError::Invalid {
                key: "runtimeConfig",
                reason: format!("mac: {e}"),
            })?),
            None => None,
        };
        let prev = match &conf.prev_result {
            Some(v) => Some(CniResult::from_value(v)?),
            None => None,
        };
        let (ip, ip6) = requested_ips(env, conf)?;
        Ok(Request { ip, ip6, mac, prev })
    }
}

/// The addresses the runtime asks for: runtimeConfig `ips` (the `ips` capability; the first of
/// each family) first, then `CNI_ARGS` `IP=` for IPv4. An IPv6 entry on an attachment that
/// gets no IPv6 address is ignored, as before dual-stack.
fn requested_ips(
    env: &CniEnv,
    conf: &NetConf,
) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>), ConfError> {
    let (mut v4, mut v6) = (None, None);
    for s in &conf.runtime_config.ips {
        let ip = s
            .parse::<IpNetwork>()
            .map(|n| n.ip())
            .or_else(|_| s.parse::<IpAddr>())
            .map_err(|_| ConfError::Invalid {
                key: "runtimeConfig",
                reason: format!("ips: {s:?} is not an IP address"),
            })?;
        match ip {
            IpAddr::V4(a) => v4 = v4.or(Some(a)),
            IpAddr::V6(a) => v6 = v6.or(Some(a)),
        }
    }
    Ok((v4.or(env.args.ip), v6))
}

/// The attachment to make, once its address is known.
fn attach(
    env: &CniEnv,
    conf: &NetConf,
    node: &Node,
    req: &Request,
    ip: Option<Ipv4Addr>,
    ip6: Option<Ipv6Addr>,
    mac6: Option<MacAddr>,
) -> Attach {
    let v4 = ip.zip(node.v4).map(|(ip, n4)| Attach4 {
        addr: Ipv4Network::new(ip, n4.gateway.prefix()).expect("prefix from subnet.env"),
        gateway: n4.gateway.ip(),
        network_cidr: n4.network,
    });
    let v6 = ip6.zip(node.v6).map(|(ip6, n6)| Attach6 {
        addr: Ipv6Network::new(ip6, n6.gateway.prefix()).expect("prefix from subnet.env"),
        gateway: n6.gateway.ip(),
        network_cidr: n6.network,
    });
    // The pools make at least one of the two; the IPv4 address names the MAC when there is one,
    // as before IPv6-only attachments; without it, `mac6` (worked out under the store's lock).
    let derived = match (ip, ip6) {
        (Some(ip), _) => plan::mac_for_ip(ip),
        (None, Some(ip6)) => mac6.unwrap_or_else(|| plan::mac_for_ip6(ip6, node.bridge(conf).mac)),
        (None, None) => plan::mac_for_ip6(Ipv6Addr::UNSPECIFIED, node.bridge(conf).mac),
    };
    Attach {
        network: conf.name.clone(),
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        host_veth: plan::host_veth_name(&env.container_id, &env.ifname),
        host_mac: MacAddr::random_local(),
        container_mac: req.mac.unwrap_or(derived),
        mtu: node.mtu,
        hairpin: conf.hairpin_mode,
        default_route: conf.default_route,
        v4,
        v6,
    }
}

pub fn add<H: Host>(host: &H, env: &CniEnv, conf: &NetConf) -> Result<String, Error> {
    let node = node(host, conf)?;
    let pool = node.pool(conf)?;
    let pool6 = node.pool6(conf)?;
    if pool.is_none() && pool6.is_none() {
        // Not met today (subnet.env has a family, `ranges` has a set and the pools refuse a
        // set of a family the node lacks); ADD must never make an attachment with no address.
        return Err(ConfError::Invalid {
            key: "ranges",
            reason: "gives this node no address family to take an address from".into(),
        }
        .into());
    }
    let req = Request::parse(env, conf)?;
    let cns = host.open_netns(&env.netns).map_err(HostError::from)?;
    if host.is_own_netns(&cns).map_err(HostError::from)? {
        return Err(HostError::Netns {
            path: env.netns.clone().into(),
            reason: "it is the namespace the plugin runs in (the host's), not a container's".into(),
        }
        .into());
    }

    let owner = Attachment::new(&env.container_id, &env.ifname);
    // Both families under one lock: a failed IPv6 half gives the IPv4 one back before the
    // lock is dropped.
    let (ip, ip6, mac6) = {
        let mut store = host.lock_store(&conf.store_dir())?;
        let had = ipam::held_by(&store, &owner)?;
        let (ip, ip6) = ipam::allocate_dual(
            &mut store,
            pool.as_ref(),
            pool6.as_ref(),
            &owner,
            req.ip,
            req.ip6,
        )?;
        let (ip6, mac6) = match (ip, ip6, req.mac) {
            (None, Some(mut ip6), None) => {
                let bridge_mac = node.bridge(conf).mac;
                let mut skipped = 0;
                let mac = loop {
                    let mac = ipv6_only_mac(&store, &owner, ip6, bridge_mac);
                    let ours = !had.contains(&IpAddr::V6(ip6));
                    if mac.is_ok() || !ours {
                        break mac;
                    }
                    // A pool-given address whose MAC is taken is skipped: the caller asked
                    // for no address, so a hash collision is ours to avoid, not its to see.
                    // The taken one is held while the next is drawn, so it is not drawn
                    // again, then given back.
                    let next = match (req.ip6, pool6.as_ref()) {
                        (None, Some(p)) if skipped < MAC_SKIPS => {
                            Some(ipam::allocate(&mut store, p, &owner, None))
                        }
                        _ => None,
                    };
                    // Best effort: the refusal (or the next address) is what counts.
                    let _ = ipam::release_ip(&mut store, ip6, &owner);
                    match next {
                        Some(Ok(n)) => {
                            skipped += 1;
                            ip6 = n;
                        }
                        Some(Err(e)) => break Err(e.into()),
                        None => break mac,
                    }
                };
                (Some(ip6), Some(mac?))
            }
            _ => (ip6, None),
        };
        (ip, ip6, mac6)
    };
    let a = attach(env, conf, &node, &req, ip, ip6, mac6);
    let mut bridge = node.bridge(conf);
    bridge.gateway = a.v4.as_ref().and_then(|_| node.v4.map(|n| n.gateway));
    bridge.gateway6 = a.v6.as_ref().and_then(|_| node.v6.map(|n| n.gateway));

    let mut veth_made = false;
    let wired = (|| -> Result<(), Error> {
        host.block_on(wire(host, &a, &bridge, &cns, &env.netns, &mut veth_made))??;
        // The masquerade rule is IPv4's (see docs/ipv6.md): an IPv6 address has none.
        if let (true, Some(v4), Some(n4)) = (conf.ip_masq, &a.v4, node.v4) {
            host.masq_add(v4.addr.ip(), n4.network, &a.alias())?;
        }
        host.enable_forwarding();
        Ok(())
    })();
    if let Err(e) = wired {
        undo(host, conf, &a, veth_made, &owner);
        return Err(e);
    }
    Ok(result(&a, &bridge, &env.netns, conf, req.prev)
        .to_value(&conf.cni_version)
        .to_string())
}

/// How many pool-given IPv6 addresses ADD skips for a taken MAC before it gives up: each
/// collision is about one chance in 2^32, so more than one in a row means something else.
const MAC_SKIPS: usize = 4;

/// The MAC of an IPv6-only attachment: [`plan::mac_for_ip6`], refused when another attachment
/// of the store (the same bridge) has it, since two ports with one MAC on a bridge take each
/// other's frames. Met only by a hash collision (about one pair in 2^32).
fn ipv6_only_mac<D: ipam::Dir + ?Sized>(
    store: &D,
    owner: &Attachment,
    ip6: Ipv6Addr,
    bridge: MacAddr,
) -> Result<MacAddr, Error> {
    let mac = plan::mac_for_ip6(ip6, bridge);
    let others: Vec<_> = ipam::records(store)?
        .into_iter()
        .filter(|(_, who)| who.as_ref() != Some(owner))
        .collect();
    match plan::mac6_taken_by(mac, bridge, &others) {
        None => Ok(mac),
        Some((ip, who)) => Err(ipam::IpamError::Requested {
            ip: IpAddr::V6(ip6),
            reason: format!(
                "its MAC {mac} is already that of {ip} (container {}, {}) on this bridge; \
                 ask for another address or pass runtimeConfig mac",
                who.container_id, who.ifname
            ),
        }
        .into()),
    }
}

/// Host side then container side. `veth_made` tells the undo whether the pair exists.
async fn wire<H: Host>(
    host: &H,
    a: &Attach,
    bridge: &BridgeWant,
    cns: &H::Netns,
    netns_path: &str,
    veth_made: &mut bool,
) -> Result<(), HostError> {
    let hk = Kernel::open(host, None, HOST_PLACE)?;
    let br = ensure_bridge(&hk, bridge).await?;
    let mut ops = plan::bridge_fix_ops(&br, bridge);
    let veth_at = ops.len();
    ops.extend(a.host_ops(br.index, host.netns_fd(cns)));
    let (done, res) = hk.apply(&ops).await;
    *veth_made = done[veth_at];
    res?;

    let ck = Kernel::open(host, Some(cns), &container_place(netns_path))?;
    let link = ck.link(&a.ifname).await?.ok_or_else(|| HostError::Kernel {
        what: format!("looking up {} in {}", a.ifname, ck.place),
        reason: "the veth's container end is not there".into(),
    })?;
    ck.apply(&a.container_ops(link.index)).await.1
}

/// The bridge as it is, created first if missing. Concurrent ADDs may race to create it; the
/// losers see EEXIST on a bridge, which the netlink layer counts as success.
async fn ensure_bridge(hk: &Kernel, want: &BridgeWant) -> Result<Link, HostError> {
    let link = match hk.link(&want.name).await? {
        Some(l) => l,
        None => {
            hk.apply(&[want.create_op()]).await.1?;
            hk.link(&want.name)
                .await?
                .ok_or_else(|| HostError::Kernel {
                    what: format!("bridge {} in {}", want.name, hk.place),
                    reason: "created, then gone".into(),
                })?
        }
    };
    match plan::bridge_conflict(&link) {
        Some(reason) => Err(HostError::Kernel {
            what: format!("bridge {} in {}", want.name, hk.place),
            reason,
        }),
        None => Ok(link),
    }
}

/// Undoes a failed ADD: the veth pair (both ends go with the host end), the masquerade rule,
/// the address records of both families. Best effort: the original error is what the caller reports.
fn undo<H: Host>(host: &H, conf: &NetConf, a: &Attach, veth_made: bool, owner: &Attachment) {
    if veth_made {
        let _ = host.block_on(async {
            let del = Op::LinkDel {
                name: a.host_veth.clone(),
            };
            Kernel::open(host, None, HOST_PLACE)?.apply(&[del]).await.1
        });
    }
    if let (true, Some(v4)) = (conf.ip_masq, &a.v4) {
        let _ = host.masq_del(v4.addr.ip(), &a.alias());
    }
    if let Ok(mut store) = host.lock_store(&conf.store_dir()) {
        if let Some(v4) = &a.v4 {
            let _ = ipam::release_ip(&mut store, v4.addr.ip(), owner);
        }
        if let Some(v6) = &a.v6 {
            let _ = ipam::release_ip(&mut store, v6.addr.ip(), owner);
        }
    }
}

/// What ADD prints: the bridge, the host end and the container end, the address on the
/// container end, the routes; appended to `prev` when tweed is chained after other plugins.
fn result(
    a: &Attach,
    bridge: &BridgeWant,
    netns: &str,
    conf: &NetConf,
    prev: Option<CniResult>,
) -> CniResult {
    let iface = |name: &str, mac: MacAddr, mtu: Option<u32>, sandbox: Option<&str>| Interface {
        name: name.into(),
        mac: Some(mac.to_string()),
        mtu,
        sandbox: sandbox.map(str::to_string),
        extra: Map::new(),
    };
    let mut ours = CniResult {
        interfaces: vec![
            iface(&bridge.name, bridge.mac, None, None),
            iface(&a.host_veth, a.host_mac, None, None),
            iface(&a.ifname, a.container_mac, Some(a.mtu), Some(netns)),
        ],
        ips: a
            .v4
            .iter()
            .map(|v4| IpConfig {
                address: IpNetwork::V4(v4.addr),
                gateway: Some(IpAddr::V4(v4.gateway)),
                interface: Some(2),
                extra: Map::new(),
            })
            .chain(a.v6.iter().map(|v6| IpConfig {
                address: IpNetwork::V6(v6.addr),
                gateway: Some(IpAddr::V6(v6.gateway)),
                interface: Some(2),
                extra: Map::new(),
            }))
            .collect(),
        routes: a
            .v4
            .iter()
            .flat_map(|v4| {
                a.route_dsts().into_iter().map(|dst| RouteOut {
                    dst: IpNetwork::V4(dst),
                    gw: Some(IpAddr::V4(v4.gateway)),
                    extra: Map::new(),
                })
            })
            .chain(a.v6.iter().flat_map(|v6| {
                a.route_dsts6().into_iter().map(|dst| RouteOut {
                    dst: IpNetwork::V6(dst),
                    gw: Some(IpAddr::V6(v6.gateway)),
                    extra: Map::new(),
                })
            }))
            .collect(),
        dns: conf.dns.clone(),
    };
    match prev {
        Some(mut p) => {
            p.append(ours);
            p
        }
        None => {
            ours.dns = ours.dns.or_else(|| Some(Value::Object(Map::new())));
            ours
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::cmd::run;
    use crate::cmd::tests::{add, conf, env, C1};
    use crate::host::fake::{addrs, link, names, routes, FakeHost};

    /// A host with the one container `C1`, whose kernel is returned too.
    fn with_c1() -> (FakeHost, tweed_netlink::Fake) {
        let host = FakeHost::new();
        let ctr = host.add_container(C1);
        (host, ctr)
    }

    #[test]
    fn add_wires_the_host_and_the_container_and_prints_what_it_made() {
        let (host, ctr) = with_c1();
        let c = conf(
            "1.0.0",
            json!({"hairpinMode": true, "dns": {"nameservers": ["10.96.0.10"]}}),
        );
        let r = add(&host, "c1", C1, &c);

        let br = link(&host.kernel, "cni0");
        assert_eq!(br.kind.as_deref(), Some("bridge"));
        assert_eq!(br.mac.unwrap().to_string(), "0a:58:0a:f4:07:01");
        assert!(br.up && br.mtu == 1450);
        assert_eq!(addrs(&host.kernel, &br), ["10.244.7.1/24"]);
        let hv = plan::host_veth_name("c1", "eth0");
        let port = link(&host.kernel, &hv);
        assert_eq!(port.master, Some(br.index));
        assert_eq!(port.alias.as_deref(), Some("tweed/tnet/c1/eth0"));
        assert!(port.up && port.mtu == 1450);
        assert!(host.kernel.ops().contains(&Op::LinkSetHairpin {
            name: hv.clone(),
            on: true
        }));

        let eth0 = link(&ctr, "eth0");
        assert_eq!(eth0.alias.as_deref(), Some("tweed/tnet/c1/eth0"));
        assert!(eth0.up && eth0.mtu == 1450);
        assert_eq!(eth0.mac.unwrap().to_string(), "0a:58:0a:f4:07:02");
        assert_eq!(addrs(&ctr, &eth0), ["10.244.7.2/24"]);
        assert_eq!(
            routes(&ctr, &eth0),
            ["0.0.0.0/0 via 10.244.7.1", "10.244.0.0/16 via 10.244.7.1"]
        );
        assert_eq!(host.records()["10.244.7.2"], "c1\r\neth0");
        assert!(host.forwarding.get());
        assert!(host.masq.borrow().is_empty(), "ipMasq is off by default");

        assert_eq!(r["cniVersion"], "1.0.0");
        assert_eq!(r["interfaces"][0]["name"], "cni0");
        assert_eq!(r["interfaces"][0]["mac"], "0a:58:0a:f4:07:01");
        assert_eq!(r["interfaces"][1]["name"], hv.as_str());
        assert_eq!(r["interfaces"][1]["mac"], port.mac.unwrap().to_string());
        assert_eq!(r["interfaces"][2]["name"], "eth0");
        assert_eq!(r["interfaces"][2]["sandbox"], C1);
        assert_eq!(r["ips"][0]["address"], "10.244.7.2/24");
        assert_eq!(r["ips"][0]["gateway"], "10.244.7.1");
        assert_eq!(r["ips"][0]["interface"], 2);
        assert_eq!(r["routes"][0]["dst"], "10.244.0.0/16");
        assert_eq!(r["routes"][1]["dst"], "0.0.0.0/0");
        assert_eq!(r["dns"]["nameservers"][0], "10.96.0.10");
    }

    #[test]
    fn a_failure_after_the_veth_exists_deletes_it_and_releases_the_address() {
        let (host, ctr) = with_c1();
        ctr.fail_when(|op| matches!(op, Op::AddrAdd { .. }).then_some(libc::EPERM));
        let e = run(&host, &env("ADD", "c1", C1), &conf("1.0.0", json!({}))).unwrap_err();
        assert_eq!(e.code(), 100, "{e}");
        assert!(
            e.to_string().contains("in container netns /run/netns/c1"),
            "{e}"
        );
        let hv = plan::host_veth_name("c1", "eth0");
        assert!(
            host.kernel.ops().contains(&Op::LinkDel { name: hv }),
            "the undo deletes the pair by its host end"
        );
        assert_eq!(names(&host.kernel), ["lo", "cni0"]);
        assert_eq!(names(&ctr), ["lo"], "the container end went with the pair");
        assert!(host.records().is_empty(), "{:?}", host.records());
    }

    #[test]
    fn a_failure_after_wiring_undoes_the_wiring_and_the_rule() {
        let (host, ctr) = with_c1();
        host.masq_fails.set(true);
        let c = conf("1.0.0", json!({"ipMasq": true}));
        let e = run(&host, &env("ADD", "c1", C1), &c).unwrap_err();
        assert_eq!(e.code(), 5, "{e}");
        assert!(e.to_string().contains("iptables"), "{e}");
        assert_eq!(names(&host.kernel), ["lo", "cni0"]);
        assert_eq!(names(&ctr), ["lo"]);
        assert!(host.records().is_empty());
        // With iptables back, the same ADD goes through and adds its one rule (for the next
        // address: allocation goes on after the last one handed out).
        host.masq_fails.set(false);
        add(&host, "c1", C1, &c);
        assert_eq!(
            host.masq.borrow().iter().collect::<Vec<_>>(),
            ["10.244.7.3 10.244.0.0/16 tweed/tnet/c1/eth0"]
        );
    }

    #[test]
    fn a_veth_that_could_not_be_made_is_not_deleted() {
        let (host, ctr) = with_c1();
        // Someone else's eth0 is in the container already.
        ctr.add_link("eth0", 1500, None);
        let e = run(&host, &env("ADD", "c1", C1), &conf("1.0.0", json!({}))).unwrap_err();
        assert_eq!(e.code(), 100);
        assert!(e.to_string().contains("eth0 already exists"), "{e}");
        assert!(!host
            .kernel
            .ops()
            .iter()
            .any(|op| matches!(op, Op::LinkDel { .. })));
        assert_eq!(names(&ctr), ["lo", "eth0"]);
        assert!(host.records().is_empty());
        // A multicast MAC is refused by the kernel the same way: nothing made, address back.
        let c2 = "/run/netns/c2";
        host.add_container(c2);
        let mac = conf(
            "1.0.0",
            json!({"runtimeConfig": {"mac": "01:00:5e:00:00:01"}}),
        );
        assert_eq!(
            run(&host, &env("ADD", "c2", c2), &mac).unwrap_err().code(),
            100
        );
        assert!(host.records().is_empty());
    }

    #[test]
    fn rejections_take_no_address() {
        let host = FakeHost::new();
        host.add_container(C1);
        let c = conf("1.0.0", json!({}));
        let code = |id: &str, netns: &str, c: &NetConf| {
            let e = run(&host, &env("ADD", id, netns), c).unwrap_err();
            (e.code(), e.to_string())
        };
        let (n, msg) = code("c1", "/run/netns/gone", &c);
        assert_eq!(n, 3);
        assert!(msg.contains("/run/netns/gone"), "{msg}");
        let (n, msg) = code("c1", "/proc/self/ns/net", &c);
        assert_eq!(n, 3);
        assert!(msg.contains("not a container's"), "{msg}");
        let bad_ip = conf("1.0.0", json!({"runtimeConfig": {"ips": ["nope"]}}));
        assert_eq!(code("c1", C1, &bad_ip).0, 7);
        let bad_mac = conf("1.0.0", json!({"runtimeConfig": {"mac": "zz"}}));
        assert_eq!(code("c1", C1, &bad_mac).0, 7);
        let bad_prev = conf("1.0.0", json!({"prevResult": {"ips": [{"address": "x"}]}}));
        assert_eq!(code("c1", C1, &bad_prev).0, 6);
        assert!(host.records().is_empty());
        assert!(host.kernel.ops().is_empty(), "nothing was touched");
        *host.subnet_env.borrow_mut() = None;
        assert_eq!(code("c1", C1, &c).0, 11);
    }

    #[test]
    fn an_exhausted_pool_fails_with_101_and_makes_nothing() {
        let host = FakeHost::new();
        host.add_container(C1);
        let c2 = host.add_container("/run/netns/c2");
        let one = conf(
            "1.0.0",
            json!({"rangeStart": "10.244.7.9", "rangeEnd": "10.244.7.9"}),
        );
        assert_eq!(
            add(&host, "c1", C1, &one)["ips"][0]["address"],
            "10.244.7.9/24"
        );
        let e = run(&host, &env("ADD", "c2", "/run/netns/c2"), &one).unwrap_err();
        assert_eq!(e.code(), 101);
        assert!(e.to_string().contains("no free address"), "{e}");
        assert_eq!(names(&c2), ["lo"]);
        assert_eq!(host.records().keys().collect::<Vec<_>>(), ["10.244.7.9"]);
    }

    #[test]
    fn requested_address_mac_and_a_chained_prev_result() {
        let (host, ctr) = with_c1();
        let c = conf(
            "1.0.0",
            json!({"runtimeConfig": {"ips": ["fd00::5/64", "10.244.7.50/24"],
                                     "mac": "0a:58:00:00:00:99"}}),
        );
        let r = add(&host, "r1", C1, &c);
        assert_eq!(r["ips"][0]["address"], "10.244.7.50/24");
        assert_eq!(
            link(&ctr, "eth0").mac.unwrap().to_string(),
            "0a:58:00:00:00:99"
        );
        // CNI_ARGS IP=, and the result of a plugin before tweed in the chain.
        let c2 = "/run/netns/c2";
        host.add_container(c2);
        let prev = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "lo", "sandbox": c2}],
                          "ips": [{"address": "127.0.0.1/8", "interface": 0}],
                          "dns": {"nameservers": ["1.1.1.1"]}});
        let mut e = env("ADD", "r2", c2);
        e.args.ip = Some("10.244.7.60".parse().unwrap());
        let out = run(&host, &e, &conf("1.0.0", json!({"prevResult": prev}))).unwrap();
        let r: Value = serde_json::from_str(&out.unwrap()).unwrap();
        assert_eq!(r["interfaces"][0]["name"], "lo");
        assert_eq!(r["ips"][1]["address"], "10.244.7.60/24");
        assert_eq!(r["ips"][1]["interface"], 3);
        assert_eq!(r["dns"]["nameservers"][0], "1.1.1.1");
        // The same address for another container is refused.
        let c3 = "/run/netns/c3";
        host.add_container(c3);
        let mut e = env("ADD", "r3", c3);
        e.args.ip = Some("10.244.7.60".parse().unwrap());
        let err = run(&host, &e, &conf("1.0.0", json!({}))).unwrap_err();
        assert_eq!(err.code(), 103);
        assert!(err.to_string().contains("held by container r2"), "{err}");
    }

    #[test]
    fn a_leftover_bridge_is_corrected_and_a_foreign_device_refused() {
        let host = FakeHost::new();
        host.add_container(C1);
        host.kernel.put_link(Link {
            index: 40,
            name: "cni0".into(),
            mtu: 1500,
            mac: Some(MacAddr([2, 0x11, 0x22, 0x33, 0x44, 0x55])),
            kind: Some("bridge".into()),
            ..Default::default()
        });
        add(&host, "c1", C1, &conf("1.0.0", json!({})));
        let br = link(&host.kernel, "cni0");
        assert_eq!(br.index, 40, "kept, not made again");
        assert_eq!(br.mac.unwrap().to_string(), "0a:58:0a:f4:07:01");
        assert!(br.up && br.mtu == 1450);
        assert_eq!(addrs(&host.kernel, &br), ["10.244.7.1/24"]);

        let other = FakeHost::new();
        other.add_container(C1);
        other.kernel.add_link("cni0", 1500, None);
        let e = run(&other, &env("ADD", "c1", C1), &conf("1.0.0", json!({}))).unwrap_err();
        assert_eq!(e.code(), 100);
        assert!(e.to_string().contains("not a bridge"), "{e}");
        assert!(other.records().is_empty());
    }

    #[test]
    fn results_follow_the_configurations_version() {
        for v in ["0.3.1", "1.1.0"] {
            let host = FakeHost::new();
            host.add_container(C1);
            let r = add(&host, "c1", C1, &conf(v, json!({})));
            assert_eq!(r["cniVersion"], v);
            assert_eq!(r["ips"][0].get("version").is_some(), v == "0.3.1", "{r}");
            assert_eq!(r["interfaces"][2].get("mtu").is_some(), v == "1.1.0", "{r}");
        }
    }

    /// A dual-stack node with the one container `C1`.
    fn dual_with_c1() -> (FakeHost, tweed_netlink::Fake) {
        let (host, ctr) = with_c1();
        *host.subnet_env.borrow_mut() = Some(crate::host::fake::DUAL_SUBNET_ENV.into());
        (host, ctr)
    }

    #[test]
    fn dual_stack_add_gives_one_address_per_family() {
        use crate::host::fake::{addrs6, routes6};
        let (host, ctr) = dual_with_c1();
        let r = add(&host, "c1", C1, &conf("1.1.0", json!({})));
        let br = link(&host.kernel, "cni0");
        assert_eq!(addrs(&host.kernel, &br), ["10.244.7.1/24"]);
        assert_eq!(addrs6(&host.kernel, &br), ["fd00:10:244:7::1/64"]);
        let eth0 = link(&ctr, "eth0");
        assert_eq!(addrs(&ctr, &eth0), ["10.244.7.2/24"]);
        // Not tentative: added without DAD, usable when ADD returns.
        assert_eq!(addrs6(&ctr, &eth0), ["fd00:10:244:7::2/64"]);
        assert_eq!(
            routes(&ctr, &eth0),
            ["0.0.0.0/0 via 10.244.7.1", "10.244.0.0/16 via 10.244.7.1"]
        );
        assert_eq!(
            routes6(&ctr, &eth0),
            [
                "::/0 via fd00:10:244:7::1",
                "fd00:10:244::/56 via fd00:10:244:7::1"
            ]
        );
        assert_eq!(host.records()["10.244.7.2"], "c1\r\neth0");
        assert_eq!(host.records()["fd00:10:244:7::2"], "c1\r\neth0");
        // CNI 1.x: both IPs on the container's interface (index 2), each with its gateway, and
        // the routes of both families.
        assert_eq!(
            r["ips"],
            json!([
                {"address": "10.244.7.2/24", "gateway": "10.244.7.1", "interface": 2},
                {"address": "fd00:10:244:7::2/64", "gateway": "fd00:10:244:7::1", "interface": 2}
            ])
        );
        assert_eq!(
            r["routes"],
            json!([
                {"dst": "10.244.0.0/16", "gw": "10.244.7.1"},
                {"dst": "0.0.0.0/0", "gw": "10.244.7.1"},
                {"dst": "fd00:10:244::/56", "gw": "fd00:10:244:7::1"},
                {"dst": "::/0", "gw": "fd00:10:244:7::1"}
            ])
        );
        // 0.4.0 spells the family on each IP.
        let (host, _) = dual_with_c1();
        let old = add(&host, "c1", C1, &conf("0.4.0", json!({})));
        assert_eq!(old["ips"][1]["version"], "6");
        assert_eq!(old["ips"][0]["version"], "4");
    }

    #[test]
    fn dual_stack_add_follows_ranges_and_the_runtimes_ipv6_request() {
        use crate::host::fake::addrs6;
        let (host, ctr) = dual_with_c1();
        let c = conf(
            "1.0.0",
            json!({
                "ranges": [[{"subnet": "10.244.7.0/24"}], [{"subnet": "fd00:10:244:7::/64"}]],
                "runtimeConfig": {"ips": ["fd00:10:244:7::99/64", "10.244.7.50"]}
            }),
        );
        add(&host, "c1", C1, &c);
        let eth0 = link(&ctr, "eth0");
        assert_eq!(addrs(&ctr, &eth0), ["10.244.7.50/24"]);
        assert_eq!(addrs6(&ctr, &eth0), ["fd00:10:244:7::99/64"]);
        // A requested IPv6 address outside the node's subnet (another node's), or the gateway:
        // code 103, and the IPv4 address taken first is given back.
        for bad in [
            "fd00:10:244:8::5",
            "fd00:10:244:7::1",
            "fd00:10:244:7::",
            "::1",
        ] {
            let (host, ctr) = dual_with_c1();
            let c = conf("1.0.0", json!({"runtimeConfig": {"ips": [bad]}}));
            let e = run(&host, &env("ADD", "c1", C1), &c).unwrap_err();
            assert_eq!(e.code(), crate::code::ADDRESS_UNAVAILABLE, "{bad}: {e}");
            assert!(host.records().is_empty() && names(&ctr) == ["lo"], "{bad}");
        }
        // `ranges` with the IPv4 set only: a v4-only attachment on a dual-stack node.
        let (host, ctr) = dual_with_c1();
        let v4 = conf("1.0.0", json!({"ranges": [[{"subnet": "10.244.7.0/24"}]]}));
        let r = add(&host, "c1", C1, &v4);
        assert_eq!(r["ips"].as_array().unwrap().len(), 1);
        assert!(addrs6(&ctr, &link(&ctr, "eth0")).is_empty());
        assert!(addrs6(&host.kernel, &link(&host.kernel, "cni0")).is_empty());
        assert_eq!(host.records().len(), 1);
    }

    /// IPv4-only subnet.env: exactly the ops and result of before dual-stack.
    #[test]
    fn ipv4_only_node_makes_no_ipv6_op() {
        let (host, ctr) = with_c1();
        let r = add(
            &host,
            "c1",
            C1,
            &conf("1.0.0", json!({"runtimeConfig": {"ips": ["fd00::5"]}})),
        );
        let v6_op = |op: &Op| {
            matches!(
                op,
                Op::Addr6Add { .. } | Op::Route6Replace(_) | Op::Addr6Del { .. } | Op::Route6Del(_)
            )
        };
        assert!(!host.kernel.ops().iter().any(v6_op));
        assert!(!ctr.ops().iter().any(v6_op));
        assert_eq!(r["ips"].as_array().unwrap().len(), 1);
        assert_eq!(host.records().keys().collect::<Vec<_>>(), ["10.244.7.2"]);
        // `ranges` asking for IPv6 on this node: refused before anything is made.
        let (host, ctr) = with_c1();
        let c = conf(
            "1.0.0",
            json!({"ranges": [[{"subnet": "10.244.7.0/24"}], [{"subnet": "fd00:10:244:7::/64"}]]}),
        );
        let e = run(&host, &env("ADD", "c1", C1), &c).unwrap_err();
        assert_eq!(e.code(), 7, "{e}");
        assert!(e.to_string().contains("no IPv6 subnet"), "{e}");
        assert!(host.records().is_empty() && names(&ctr) == ["lo"]);
    }

    /// A failed dual-stack ADD leaves no veth and no address of either family.
    #[test]
    fn a_failed_dual_stack_add_leaves_nothing_of_either_family() {
        // The IPv6 pool exhausted after the IPv4 allocation.
        let (host, ctr) = dual_with_c1();
        let narrow = conf(
            "1.0.0",
            json!({"ranges": [[{"subnet": "10.244.7.0/24"}],
                [{"subnet": "fd00:10:244:7::/64", "rangeStart": "fd00:10:244:7::2", "rangeEnd": "fd00:10:244:7::2"}]]}),
        );
        add(&host, "c0", C1, &narrow);
        let c2 = "/run/netns/c2";
        let ctr2 = host.add_container(c2);
        let e = run(&host, &env("ADD", "c2", c2), &narrow).unwrap_err();
        assert_eq!(e.code(), crate::code::EXHAUSTED, "{e}");
        assert!(e.to_string().contains("fd00:10:244:7::/64"), "{e}");
        assert_eq!(names(&ctr2), ["lo"]);
        let hv2 = plan::host_veth_name("c2", "eth0");
        assert!(!names(&host.kernel).contains(&hv2));
        assert_eq!(
            host.records().keys().collect::<Vec<_>>(),
            ["10.244.7.2", "fd00:10:244:7::2"],
            "only c0's pair"
        );
        let _ = ctr;
        // The kernel refusing the IPv6 address after the veth exists: pair deleted, both
        // records released.
        let (host, ctr) = dual_with_c1();
        ctr.fail_when(|op| matches!(op, Op::Addr6Add { .. }).then_some(libc::EACCES));
        let e = run(&host, &env("ADD", "c1", C1), &conf("1.0.0", json!({}))).unwrap_err();
        assert_eq!(e.code(), 100, "{e}");
        assert_eq!(names(&ctr), ["lo"]);
        assert_eq!(names(&host.kernel), ["lo", "cni0"]);
        assert!(host.records().is_empty(), "{:?}", host.records());
        // Or refusing an IPv6 route.
        let (host, ctr) = dual_with_c1();
        ctr.fail_when(|op| matches!(op, Op::Route6Replace(_)).then_some(libc::ENETUNREACH));
        run(&host, &env("ADD", "c1", C1), &conf("1.0.0", json!({}))).unwrap_err();
        assert_eq!(names(&ctr), ["lo"]);
        assert!(host.records().is_empty(), "{:?}", host.records());
    }

    #[test]
    fn dual_stack_del_and_check() {
        let (host, ctr) = dual_with_c1();
        let r = add(&host, "c1", C1, &conf("1.0.0", json!({})));
        let chk = conf("1.0.0", json!({ "prevResult": r }));
        run(&host, &env("CHECK", "c1", C1), &chk).unwrap();
        // The IPv6 address gone (or tentative): CHECK names it.
        let eth0 = link(&ctr, "eth0");
        let nl = tweed_netlink::Netlink::from(ctr.clone());
        let a6: Ipv6Network = "fd00:10:244:7::2/64".parse().unwrap();
        crate::host::fake::block_on(nl.apply(&Op::Addr6Add {
            ifindex: eth0.index,
            addr: a6,
            nodad: false,
        }))
        .unwrap();
        let e = run(&host, &env("CHECK", "c1", C1), &chk).unwrap_err();
        assert!(
            e.to_string().contains("fd00:10:244:7::2/64 is tentative"),
            "{e}"
        );
        crate::host::fake::block_on(nl.apply(&Op::Addr6Del {
            ifindex: eth0.index,
            addr: a6,
        }))
        .unwrap();
        let e = run(&host, &env("CHECK", "c1", C1), &chk).unwrap_err();
        assert!(
            e.to_string()
                .contains("address fd00:10:244:7::2/64 is missing"),
            "{e}"
        );
        // A v4-only prevResult on the same node checks the IPv4 half only.
        let mut v4_only = r.clone();
        v4_only["ips"].as_array_mut().unwrap().truncate(1);
        let chk4 = conf("1.0.0", json!({ "prevResult": v4_only }));
        run(&host, &env("CHECK", "c1", C1), &chk4).unwrap();
        // DEL frees both families.
        run(&host, &env("DEL", "c1", C1), &conf("1.0.0", json!({}))).unwrap();
        assert!(host.records().is_empty(), "{:?}", host.records());
    }

    /// An IPv6-only node with the one container `C1`.
    fn v6_only_with_c1() -> (FakeHost, tweed_netlink::Fake) {
        let (host, ctr) = with_c1();
        *host.subnet_env.borrow_mut() = Some(crate::host::fake::V6_ONLY_SUBNET_ENV.into());
        (host, ctr)
    }

    /// Review L3: two requested IPv6-only addresses of one bridge whose MACs would be one are
    /// not both given; the second ADD is refused, leaving no record and no veth of its own.
    #[test]
    fn ipv6_only_add_refuses_an_address_whose_mac_another_has() {
        let (host, ctr) = v6_only_with_c1();
        host.add_container("/run/netns/c2");
        let (first, second) = ("fd00:10:244:7::986e:986e", "fd00:10:244:7::e078:e078");
        let ask = |ip: &str| conf("1.1.0", json!({"runtimeConfig": {"ips": [ip]}}));
        add(&host, "c1", C1, &ask(first));
        let mac = link(&ctr, "eth0").mac.unwrap();
        assert_eq!(
            mac,
            plan::mac_for_ip6(
                first.parse().unwrap(),
                link(&host.kernel, "cni0").mac.unwrap()
            )
        );
        let e = run(&host, &env("ADD", "c2", "/run/netns/c2"), &ask(second)).unwrap_err();
        assert_eq!(e.code(), crate::code::ADDRESS_UNAVAILABLE, "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!(
                "its MAC {mac} is already that of {first} (container c1, eth0)"
            )),
            "{msg}"
        );
        assert_eq!(
            host.records().keys().collect::<Vec<_>>(),
            [&first.to_string()],
            "the refused address is given back"
        );
        let c2_veth = plan::host_veth_name("c2", "eth0");
        assert!(
            !names(&host.kernel).contains(&c2_veth),
            "{:?}",
            names(&host.kernel)
        );
        // An address with a MAC of its own is given as usual, and the runtime's own MAC wins.
        add(&host, "c2", "/run/netns/c2", &ask("fd00:10:244:7::3"));
        run(
            &host,
            &env("DEL", "c2", "/run/netns/c2"),
            &ask("fd00:10:244:7::3"),
        )
        .unwrap();
        let own = conf(
            "1.1.0",
            json!({"runtimeConfig": {"ips": [second], "mac": "0e:58:12:34:56:78"}}),
        );
        add(&host, "c2", "/run/netns/c2", &own);
    }

    /// A pool-given address whose MAC another pod has is skipped, not refused: the runtime
    /// asked for no address. The skipped one is given back.
    #[test]
    fn ipv6_only_add_skips_a_pool_address_whose_mac_another_has() {
        let (host, ctr) = v6_only_with_c1();
        let (first, second) = ("fd00:10:244:7::986e:986e", "fd00:10:244:7::e078:e078");
        let ask = |ip: &str| conf("1.1.0", json!({"runtimeConfig": {"ips": [ip]}}));
        add(&host, "c1", C1, &ask(first));
        let c2 = host.add_container("/run/netns/c2");
        // The pool's next address is `second`, whose MAC is c1's.
        host.store.borrow_mut().files.insert(
            ipam::LAST_RESERVED_V6.into(),
            b"fd00:10:244:7::e078:e077".to_vec(),
        );
        let r = add(&host, "c2", "/run/netns/c2", &conf("1.1.0", json!({})));
        let got = r["ips"][0]["address"].as_str().unwrap().to_string();
        assert_eq!(got, "fd00:10:244:7::e078:e079/64", "{r}");
        let recs = host.records();
        assert!(
            !recs.contains_key(second),
            "the skipped address is given back: {recs:?}"
        );
        assert_eq!(recs.len(), 2, "{recs:?}");
        let c1_mac = link(&ctr, "eth0").mac.unwrap();
        assert_ne!(link(&c2, "eth0").mac.unwrap(), c1_mac);
    }

    fn v4_op(op: &Op) -> bool {
        matches!(
            op,
            Op::AddrAdd { .. } | Op::RouteReplace(_) | Op::AddrDel { .. } | Op::RouteDel(_)
        )
    }

    /// IPv6-only: one IPv6 address without DAD, the IPv6 gateway on the bridge, IPv6 routes,
    /// no IPv4 op anywhere, and a result carrying only the IPv6 IP.
    #[test]
    fn ipv6_only_add_gives_one_ipv6_address_and_no_ipv4() {
        use crate::host::fake::{addrs6, routes6};
        let (host, ctr) = v6_only_with_c1();
        // An IPv4 request (runtimeConfig ips, CNI_ARGS IP=) has no pool to come from: ignored,
        // as an IPv6 request is on a v4-only node.
        let c = conf(
            "1.1.0",
            json!({"ipMasq": true, "runtimeConfig": {"ips": ["10.244.7.9"]}}),
        );
        let r = add(&host, "c1", C1, &c);
        let br = link(&host.kernel, "cni0");
        assert!(addrs(&host.kernel, &br).is_empty());
        assert_eq!(addrs6(&host.kernel, &br), ["fd00:10:244:7::1/64"]);
        assert_eq!(br.mac.unwrap().to_string(), "0e:58:00:00:00:01");
        let eth0 = link(&ctr, "eth0");
        assert!(addrs(&ctr, &eth0).is_empty());
        assert_eq!(addrs6(&ctr, &eth0), ["fd00:10:244:7::2/64"]);
        // The hash of the whole address (plan::mac_for_ip6), not its low 32 bits.
        assert_eq!(eth0.mac.unwrap().to_string(), "0e:58:ca:3f:22:5d");
        assert!(routes(&ctr, &eth0).is_empty());
        assert_eq!(
            routes6(&ctr, &eth0),
            [
                "::/0 via fd00:10:244:7::1",
                "fd00:10:244::/56 via fd00:10:244:7::1"
            ]
        );
        assert!(ctr.ops().contains(&Op::Addr6Add {
            ifindex: eth0.index,
            addr: "fd00:10:244:7::2/64".parse().unwrap(),
            nodad: true
        }));
        assert!(!host.kernel.ops().iter().any(v4_op));
        assert!(!ctr.ops().iter().any(v4_op));
        assert_eq!(
            host.records().keys().collect::<Vec<_>>(),
            ["fd00:10:244:7::2"]
        );
        assert!(
            host.masq.borrow().is_empty(),
            "the masquerade rule is IPv4's"
        );
        assert_eq!(
            r["ips"],
            json!([{"address": "fd00:10:244:7::2/64", "gateway": "fd00:10:244:7::1", "interface": 2}])
        );
        assert_eq!(
            r["routes"],
            json!([
                {"dst": "fd00:10:244::/56", "gw": "fd00:10:244:7::1"},
                {"dst": "::/0", "gw": "fd00:10:244:7::1"}
            ])
        );
        // CHECK passes on what ADD made, and names a missing IPv6 route.
        let chk = conf("1.1.0", json!({ "prevResult": r }));
        run(&host, &env("CHECK", "c1", C1), &chk).unwrap();
        let nl = tweed_netlink::Netlink::from(ctr.clone());
        let default6 = tweed_netlink::Route6::via(
            "::/0".parse().unwrap(),
            "fd00:10:244:7::1".parse().unwrap(),
            Some(eth0.index),
        );
        crate::host::fake::block_on(nl.apply(&Op::Route6Del(default6))).unwrap();
        let e = run(&host, &env("CHECK", "c1", C1), &chk).unwrap_err();
        assert!(
            e.to_string()
                .contains("route to ::/0 via fd00:10:244:7::1 is missing"),
            "{e}"
        );
        // A prevResult with an IPv4 address on this node: CHECK says the node has none.
        let mut with4 = r.clone();
        with4["ips"] =
            json!([{"address": "10.244.7.2/24", "gateway": "10.244.7.1", "interface": 2}]);
        let e = run(
            &host,
            &env("CHECK", "c1", C1),
            &conf("1.1.0", json!({ "prevResult": with4 })),
        )
        .unwrap_err();
        assert!(e.to_string().contains("10.244.7.2"), "{e}");
        // DEL frees the address and the veth.
        run(&host, &env("DEL", "c1", C1), &c).unwrap();
        assert!(host.records().is_empty(), "{:?}", host.records());
        assert_eq!(names(&ctr), ["lo"]);
        // `ranges` asking for IPv4 here: refused before anything is made.
        let (host, ctr) = v6_only_with_c1();
        let asks4 = conf("1.0.0", json!({"ranges": [[{"subnet": "10.244.7.0/24"}]]}));
        let e = run(&host, &env("ADD", "c1", C1), &asks4).unwrap_err();
        assert_eq!(e.code(), 7, "{e}");
        assert!(e.to_string().contains("no IPv4 subnet"), "{e}");
        assert!(host.records().is_empty() && names(&ctr) == ["lo"]);
    }

    /// `ranges` with the IPv6 set only on a dual-stack node: an IPv6-only attachment, on the
    /// bridge's one MAC (the IPv4 gateway's).
    #[test]
    fn ipv6_ranges_alone_make_an_ipv6_only_attachment_on_a_dual_node() {
        use crate::host::fake::addrs6;
        let (host, ctr) = dual_with_c1();
        let c = conf(
            "1.0.0",
            json!({"ranges": [[{"subnet": "fd00:10:244:7::/64"}]]}),
        );
        let r = add(&host, "c1", C1, &c);
        assert_eq!(r["ips"].as_array().unwrap().len(), 1, "{r}");
        assert_eq!(r["ips"][0]["address"], "fd00:10:244:7::2/64");
        let eth0 = link(&ctr, "eth0");
        assert!(addrs(&ctr, &eth0).is_empty());
        assert_eq!(addrs6(&ctr, &eth0), ["fd00:10:244:7::2/64"]);
        let br = link(&host.kernel, "cni0");
        assert_eq!(br.mac.unwrap().to_string(), "0a:58:0a:f4:07:01");
        assert!(addrs(&host.kernel, &br).is_empty());
        assert_eq!(host.records().len(), 1);
    }

    /// A failed IPv6-only ADD leaves no veth and no address record.
    #[test]
    fn a_failed_ipv6_only_add_leaves_nothing() {
        for fail in [
            (|op: &Op| matches!(op, Op::Addr6Add { .. }).then_some(libc::EACCES))
                as fn(&Op) -> Option<i32>,
            |op: &Op| matches!(op, Op::Route6Replace(_)).then_some(libc::ENETUNREACH),
        ] {
            let (host, ctr) = v6_only_with_c1();
            ctr.fail_when(fail);
            let e = run(&host, &env("ADD", "c1", C1), &conf("1.0.0", json!({}))).unwrap_err();
            assert_eq!(e.code(), 100, "{e}");
            assert_eq!(names(&ctr), ["lo"]);
            assert_eq!(names(&host.kernel), ["lo", "cni0"]);
            assert!(host.records().is_empty(), "{:?}", host.records());
        }
        // The pool exhausted: nothing made at all.
        let (host, _) = v6_only_with_c1();
        let narrow = conf(
            "1.0.0",
            json!({"ranges": [[{"subnet": "fd00:10:244:7::/64", "rangeStart": "fd00:10:244:7::2", "rangeEnd": "fd00:10:244:7::2"}]]}),
        );
        add(&host, "c0", C1, &narrow);
        let c2 = "/run/netns/c2";
        let ctr2 = host.add_container(c2);
        let e = run(&host, &env("ADD", "c2", c2), &narrow).unwrap_err();
        assert_eq!(e.code(), crate::code::EXHAUSTED, "{e}");
        assert_eq!(names(&ctr2), ["lo"]);
        assert_eq!(
            host.records().keys().collect::<Vec<_>>(),
            ["fd00:10:244:7::2"]
        );
    }
}
