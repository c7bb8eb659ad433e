//! Root only: the link ops the CNI plugin uses, against the real kernel, inside two namespaces
//! this test creates (and deletes on drop). Nothing touches the root namespace.

use tweed_netlink::{BridgeSpec, MacAddr, Netlink, Netns, Op, Route, VethSpec};
use tweed_testkit::{require_root, NetnsGuard};

fn ok(results: Vec<Result<(), tweed_netlink::NetlinkError>>) {
    for r in results {
        r.unwrap();
    }
}

#[test]
fn bridge_veth_and_addresses_across_namespaces() {
    require_root!("network namespaces");
    let (a, b) = (NetnsGuard::unique("twna"), NetnsGuard::unique("twnb"));
    let (na, nb) = (
        Netns::open(a.path()).unwrap(),
        Netns::open(b.path()).unwrap(),
    );
    assert!(!na.same_as(&nb));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    rt.block_on(async {
        let ha = Netlink::real_in(&na).unwrap();
        let hb = Netlink::real_in(&nb).unwrap();
        let mac: MacAddr = "0a:58:0a:00:00:01".parse().unwrap();
        let br = Op::LinkAddBridge(BridgeSpec {
            name: "br9".into(),
            mtu: Some(1400),
            mac: Some(mac),
        });
        // Creating an existing bridge is success.
        ok(ha.apply_all(&[br.clone(), br.clone()]).await);
        let bridge = ha.link_by_name("br9").await.unwrap().unwrap();
        assert_eq!(
            (bridge.kind.as_deref(), bridge.mtu, bridge.mac),
            (Some("bridge"), 1400, Some(mac))
        );
        ok(ha
            .apply_all(&[
                Op::LinkAddVeth(VethSpec {
                    name: "hv0".into(),
                    peer: "eth0".into(),
                    peer_netns: Some(nb.raw_fd()),
                    mtu: Some(1400),
                    mac: None,
                    peer_mac: Some("0a:58:0a:00:00:02".parse().unwrap()),
                }),
                Op::LinkSetAlias {
                    name: "hv0".into(),
                    alias: "tweed/test".into(),
                },
                Op::LinkSetMaster {
                    name: "hv0".into(),
                    master: Some(bridge.index),
                },
                Op::LinkSetHairpin {
                    name: "hv0".into(),
                    on: true,
                },
                Op::LinkSetUp { name: "hv0".into() },
                Op::LinkSetUp { name: "br9".into() },
            ])
            .await);
        let hv = ha.link_by_name("hv0").await.unwrap().unwrap();
        assert_eq!(hv.master, Some(bridge.index));
        assert_eq!(hv.alias.as_deref(), Some("tweed/test"));
        assert!(
            ha.link_by_name("eth0").await.unwrap().is_none(),
            "the peer never lands here"
        );
        // The peer is in b, with its MAC; configure it there.
        let eth0 = hb.link_by_name("eth0").await.unwrap().unwrap();
        assert_eq!(eth0.mac, Some("0a:58:0a:00:00:02".parse().unwrap()));
        // Both ends were made with one queue each way (no cut down from one per CPU).
        for (ns, name) in [(&a, "hv0"), (&b, "eth0")] {
            let d = ns.json("ip", &["-d", "link", "show", name]);
            let q = (&d[0]["num_tx_queues"], &d[0]["num_rx_queues"]);
            assert_eq!(q, (&1.into(), &1.into()), "{name}: {d}");
        }
        let addr = "10.99.0.2/24".parse().unwrap();
        let default = Route::via(
            "0.0.0.0/0".parse().unwrap(),
            "10.99.0.1".parse().unwrap(),
            Some(eth0.index),
        );
        ok(hb
            .apply_all(&[
                Op::LinkSetUp {
                    name: "eth0".into(),
                },
                Op::AddrAdd {
                    ifindex: eth0.index,
                    addr,
                },
                Op::RouteReplace(default),
            ])
            .await);
        let addrs = hb.addresses(Some(eth0.index)).await.unwrap();
        assert_eq!(addrs.iter().map(|a| a.net).collect::<Vec<_>>(), vec![addr]);
        assert!(hb
            .routes(eth0.index)
            .await
            .unwrap()
            .iter()
            .any(|r| r.same_path(&default)));
        ok(hb
            .apply_all(&[
                Op::RouteDel(default),
                Op::RouteDel(default),
                Op::AddrDel {
                    ifindex: eth0.index,
                    addr,
                },
            ])
            .await);
        assert!(hb.addresses(Some(eth0.index)).await.unwrap().is_empty());

        // Rename needs the device down; moving it back into a.
        ok(hb
            .apply_all(&[
                Op::LinkSetDown {
                    name: "eth0".into(),
                },
                Op::LinkRename {
                    ifindex: eth0.index,
                    new_name: "net1".into(),
                },
                Op::LinkSetNetns {
                    name: "net1".into(),
                    netns: na.raw_fd(),
                },
            ])
            .await);
        assert!(hb.link_by_name("net1").await.unwrap().is_none());
        assert!(ha.link_by_name("net1").await.unwrap().is_some());
        // A MAC can be changed; deleting by index removes the pair; twice is fine.
        let new_mac: MacAddr = "0a:58:0a:00:00:09".parse().unwrap();
        ok(ha
            .apply_all(&[Op::LinkSetMac {
                name: "br9".into(),
                mac: new_mac,
            }])
            .await);
        assert_eq!(
            ha.link_by_name("br9").await.unwrap().unwrap().mac,
            Some(new_mac)
        );
        ok(ha
            .apply_all(&[
                Op::LinkDelIndex { ifindex: hv.index },
                Op::LinkDelIndex { ifindex: hv.index },
            ])
            .await);
        assert!(ha.link_by_name("net1").await.unwrap().is_none());
        // A veth whose peer name is taken is refused, not adopted.
        ok(hb
            .apply_all(&[Op::LinkAddVeth(VethSpec {
                name: "x0".into(),
                peer: "x1".into(),
                peer_netns: None,
                mtu: None,
                mac: None,
                peer_mac: None,
            })])
            .await);
        let again = hb
            .apply(&Op::LinkAddVeth(VethSpec {
                name: "x0".into(),
                peer: "x2".into(),
                peer_netns: None,
                mtu: None,
                mac: None,
                peer_mac: None,
            }))
            .await;
        assert_eq!(again.unwrap_err().errno(), Some(libc::EEXIST));
    });
}

/// IPv6 addresses and routes against the real kernel: `nodad` gives a usable address at once
/// (the kernel reports it without `tentative`), without it the address starts tentative; the
/// routes read back with their gateway; deleting twice is success.
#[test]
fn ipv6_addresses_and_routes() {
    use tweed_netlink::Route6;
    require_root!("network namespaces");
    let ns = NetnsGuard::unique("twn6");
    let n = Netns::open(ns.path()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    rt.block_on(async {
        let h = Netlink::real_in(&n).unwrap();
        ok(h.apply_all(&[
            Op::LinkAddBridge(BridgeSpec {
                name: "br6".into(),
                mtu: None,
                mac: None,
            }),
            Op::LinkSetUp { name: "br6".into() },
        ])
        .await);
        let br = h.link_by_name("br6").await.unwrap().unwrap();
        // A port with a carrier (a veth whose peer is up) gives the bridge one; DAD starts then.
        ns.ip(&["link", "add", "d6", "type", "veth", "peer", "name", "d6p"])
            .unwrap();
        ns.ip(&["link", "set", "d6p", "up"]).unwrap();
        ns.ip(&["link", "set", "d6", "master", "br6", "up"])
            .unwrap();
        let (a, b) = (
            "fd00:6::1/64".parse().unwrap(),
            "fd00:6::2/64".parse().unwrap(),
        );
        ok(h.apply_all(&[
            Op::Addr6Add {
                ifindex: br.index,
                addr: a,
                nodad: true,
            },
            Op::Addr6Add {
                ifindex: br.index,
                addr: b,
                nodad: false,
            },
        ])
        .await);
        let got = h.addresses6(Some(br.index)).await.unwrap();
        let find = |net| got.iter().find(|x| x.net == net).copied().unwrap();
        assert!(!find(a).tentative, "{got:?}");
        assert!(find(b).tentative, "{got:?}");
        let show = ns.ip(&["-6", "-o", "addr", "show", "dev", "br6"]).unwrap();
        assert!(show.contains("fd00:6::1/64 scope global nodad"), "{show}");

        let r = Route6::via(
            "fd00:60::/56".parse().unwrap(),
            "fd00:6::9".parse().unwrap(),
            Some(br.index),
        );
        let default = Route6 {
            dst: "::/0".parse().unwrap(),
            ..r
        };
        ok(
            h.apply_all(&[Op::Route6Replace(r), Op::Route6Replace(default)])
                .await,
        );
        let routes = h.all_routes6().await.unwrap();
        assert!(
            routes.contains(&r) && routes.contains(&default),
            "{routes:?}"
        );
        let text = ns.ip(&["-6", "route"]).unwrap();
        assert!(
            text.contains("fd00:60::/56 via fd00:6::9 dev br6"),
            "{text}"
        );
        ok(h.apply_all(&[
            Op::Route6Del(r),
            Op::Route6Del(r),
            Op::Addr6Del {
                ifindex: br.index,
                addr: a,
            },
            Op::Addr6Del {
                ifindex: br.index,
                addr: a,
            },
        ])
        .await);
        assert!(!h.all_routes6().await.unwrap().contains(&r));
        assert!(!h
            .addresses6(Some(br.index))
            .await
            .unwrap()
            .iter()
            .any(|x| x.net == a));
    });
}
