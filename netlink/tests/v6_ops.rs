//! Root only: the IPv6 ops of the vxlan and host-gw data planes (an IPv6-underlay vxlan device,
//! NDP, FDB and IPv6 route entries) against the real kernel, inside a namespace this test creates
//! and deletes on drop. Checks that what is written reads back equal, so plans are idempotent.

use std::process::Command;

use tweed_netlink::{FdbEntry6, MacAddr, Neighbour6, Netlink, Netns, Op, Route6, VxlanSpec};
use tweed_testkit::{require_root, NetnsGuard};

fn ok(results: Vec<Result<(), tweed_netlink::NetlinkError>>) {
    for r in results {
        r.unwrap();
    }
}

fn ip(ns: &NetnsGuard, args: &str) {
    let st = Command::new("ip")
        .args(["netns", "exec", ns.name(), "ip"])
        .args(args.split_whitespace())
        .status()
        .unwrap();
    assert!(st.success(), "ip {args}");
}

#[test]
fn ipv6_vxlan_neigh_fdb_and_routes_read_back_equal() {
    require_root!("network namespaces");
    let ns = NetnsGuard::unique("twv6");
    ip(&ns, "link add u0 type veth peer name u1");
    ip(&ns, "link set u1 up");
    ip(&ns, "addr add 2001:db8::1/64 dev u0 nodad");
    ip(&ns, "link set u0 up");
    let netns = Netns::open(ns.path()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    rt.block_on(async {
        let nl = Netlink::real_in(&netns).unwrap();
        let u0 = nl.link_by_name("u0").await.unwrap().unwrap();
        let mac: MacAddr = "0a:58:0a:00:00:07".parse().unwrap();
        let spec = VxlanSpec {
            name: "tweed-v6.1".into(),
            vni: 1,
            port: 8472,
            local: "2001:db8::1".parse().unwrap(),
            underlay: u0.index,
            learning: false,
            mtu: Some(1430),
            mac: Some(mac),
        };
        // The second add meets the device with the same attributes: success.
        let add = Op::LinkAddVxlan(spec.clone());
        ok(nl.apply_all(&[add.clone(), add]).await);
        ok(nl
            .apply_all(&[Op::LinkSetUp {
                name: spec.name.clone(),
            }])
            .await);
        let dev = nl.link_by_name(&spec.name).await.unwrap().unwrap();
        assert_eq!(dev.vxlan, Some(spec.attrs()));
        assert_eq!((dev.mtu, dev.mac), (1430, Some(mac)));
        // A device of the same name on another port is refused, not adopted.
        let other = Op::LinkAddVxlan(VxlanSpec {
            port: 4789,
            ..spec.clone()
        });
        assert!(nl.apply(&other).await.is_err());

        let peer_mac: MacAddr = "0a:58:0a:00:00:09".parse().unwrap();
        let gw = "fd00:10:244:5::".parse().unwrap();
        let vtep = "2001:db8::5".parse().unwrap();
        let route = Route6::onlink("fd00:10:244:5::/64".parse().unwrap(), gw, dev.index);
        let hg = Route6::via(
            "fd00:10:244:6::/64".parse().unwrap(),
            "2001:db8::6".parse().unwrap(),
            Some(u0.index),
        );
        let ops = vec![
            Op::Fdb6Replace {
                ifindex: dev.index,
                mac: peer_mac,
                dst: vtep,
            },
            Op::Neigh6Replace {
                ifindex: dev.index,
                ip: gw,
                mac: peer_mac,
            },
            Op::Route6Replace(route),
            Op::Route6Replace(hg),
        ];
        // Twice: replaces are idempotent.
        ok(nl.apply_all(&ops).await);
        ok(nl.apply_all(&ops).await);

        let fdb = nl.fdb6(dev.index).await.unwrap();
        assert!(
            fdb.contains(&FdbEntry6 {
                ifindex: dev.index,
                mac: peer_mac,
                dst: Some(vtep),
                permanent: true
            }),
            "{fdb:?}"
        );
        let neigh = nl.neighbours6(dev.index).await.unwrap();
        assert!(
            neigh.contains(&Neighbour6 {
                ifindex: dev.index,
                ip: gw,
                mac: Some(peer_mac),
                permanent: true
            }),
            "{neigh:?}"
        );
        let routes = nl.all_routes6().await.unwrap();
        for want in [route, hg] {
            assert!(
                routes.iter().any(|r| r.same_path(&want)),
                "{want:?} not in {routes:?}"
            );
        }
        // The IPv4 views do not see the IPv6 entries.
        assert!(nl.neighbours(dev.index).await.unwrap().is_empty());
        assert!(nl.routes(dev.index).await.unwrap().is_empty());

        let dels = vec![
            Op::Route6Del(route),
            Op::Route6Del(hg),
            Op::Neigh6Del {
                ifindex: dev.index,
                ip: gw,
            },
            Op::Fdb6Del {
                ifindex: dev.index,
                mac: peer_mac,
                dst: Some(vtep),
            },
        ];
        // Twice: deleting what is gone is success.
        ok(nl.apply_all(&dels).await);
        ok(nl.apply_all(&dels).await);
        assert!(nl
            .fdb6(dev.index)
            .await
            .unwrap()
            .iter()
            .all(|e| e.mac != peer_mac));
        assert!(nl
            .neighbours6(dev.index)
            .await
            .unwrap()
            .iter()
            .all(|n| n.ip != gw));
        let routes = nl.all_routes6().await.unwrap();
        assert!(!routes
            .iter()
            .any(|r| r.same_path(&route) || r.same_path(&hg)));
    });
}
