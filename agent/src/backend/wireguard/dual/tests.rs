use super::*;
use crate::backend::wireguard::key::PrivateKey;

fn pk(n: u8) -> PublicKey {
    PrivateKey::from_bytes([n; 32]).public()
}

fn cfg6() -> Ipv6Config {
    Ipv6Config {
        network: "fd00:10:244::/56".parse().unwrap(),
        subnet_len: 64,
        subnet_min: "fd00:10:244:1::".parse().unwrap(),
        subnet_max: "fd00:10:244:ff::".parse().unwrap(),
    }
}

fn local(mode: WireguardMode, dual: bool) -> DualLocal {
    DualLocal {
        mode,
        v4: Local {
            network: "10.244.0.0/16".parse().unwrap(),
            own_subnet: "10.244.1.0/24".parse().unwrap(),
            public_ip: "198.18.0.1".parse().unwrap(),
            public_key: pk(1),
            psk: None,
            keepalive: 0,
        },
        v6: dual.then(|| Local6 {
            network: "fd00:10:244::/56".parse().unwrap(),
            own_subnet: "fd00:10:244:1::/64".parse().unwrap(),
            public_ipv6: "2001:db8::1".parse().unwrap(),
        }),
        listen_port: 51820,
        listen_port_v6: 51821,
        mtu: 1420,
    }
}

/// A peer lease exactly as a flannel v0.28.9 dual-stack wireguard node writes it (key and value),
/// read back through the etcd key parser and the lease parser.
fn flannel_lease(
    n: u8,
    public_ip: &str,
    public_ipv6: Option<&str>,
    v6_data: Option<&str>,
) -> (SubnetKey, LeaseAttrs) {
    let k = pk(n);
    let key = match public_ipv6 {
        Some(_) => format!("10.244.{n}.0-24&fd00:10:244:{n:x}::-64"),
        None => format!("10.244.{n}.0-24"),
    };
    let mut json = format!(
        r#"{{"PublicIP":"{public_ip}","BackendType":"wireguard","BackendData":{{"PublicKey":"{k}","Port":51820}}"#
    );
    if let Some(ip6) = public_ipv6 {
        json.push_str(&format!(r#","PublicIPv6":"{ip6}""#));
        let data = v6_data
            .map(str::to_string)
            .unwrap_or(format!(r#"{{"PublicKey":"{k}","Port":51821}}"#));
        json.push_str(&format!(r#","BackendV6Data":{data}"#));
    }
    json.push('}');
    (
        key.parse().unwrap(),
        LeaseAttrs::parse(json.as_bytes()).unwrap(),
    )
}

fn peer(l: &DualLocal, n: u8, ip: &str, ip6: Option<&str>) -> DualPeer {
    let (k, a) = flannel_lease(n, ip, ip6, None);
    DualPeer::from_lease(&k, &a, l.v6.as_ref().map(|_| cfg6()).as_ref(), l).unwrap()
}

fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

#[test]
fn a_flannel_dual_stack_lease_reads_as_both_halves() {
    let l = local(WireguardMode::Separate, true);
    let p = peer(&l, 2, "198.18.0.2", Some("2001:db8::2"));
    assert_eq!(p.v4.subnet.to_string(), "10.244.2.0/24");
    assert_eq!(p.v4.endpoint().to_string(), "198.18.0.2:51820");
    assert_eq!(p.v4.public_key, pk(2));
    let h = p.v6.unwrap();
    assert_eq!(h.subnet.to_string(), "fd00:10:244:2::/64");
    assert_eq!(h.public_ipv6, "2001:db8::2".parse::<Ipv6Addr>().unwrap());
    assert_eq!((h.public_key, h.port), (pk(2), 51821));

    // A v4-only node reads the same lease as IPv4 only, and says why.
    let l4 = local(WireguardMode::Separate, false);
    let (k, a) = flannel_lease(2, "198.18.0.2", Some("2001:db8::2"), None);
    let p = DualPeer::from_lease(&k, &a, None, &l4).unwrap();
    assert_eq!(p.v6.unwrap_err(), "this node runs IPv4 only");
}

#[test]
fn a_v6_half_without_port_means_our_v6_port_for_the_mode() {
    let k = pk(3);
    let data = format!(r#"{{"PublicKey":"{k}"}}"#);
    let (key, a) = flannel_lease(3, "198.18.0.3", Some("2001:db8::3"), Some(&data));
    let sep = local(WireguardMode::Separate, true);
    let p = DualPeer::from_lease(&key, &a, Some(&cfg6()), &sep).unwrap();
    assert_eq!(p.v6.unwrap().port, 51821);
    let auto = local(WireguardMode::Auto, true);
    let p = DualPeer::from_lease(&key, &a, Some(&cfg6()), &auto).unwrap();
    assert_eq!(p.v6.unwrap().port, 51820);
}

#[test]
fn a_hostile_v6_half_costs_only_the_v6_half() {
    let l = local(WireguardMode::Separate, true);
    for (data, want) in [
        ("null".to_string(), "BackendV6Data"),
        ("[]".to_string(), "BackendV6Data is not a JSON object"),
        ("{}".to_string(), "BackendV6Data has no PublicKey"),
        (
            r#"{"PublicKey":"AAECAwQFBgcICQoLDA0ODw=="}"#.to_string(),
            "BackendV6Data.PublicKey",
        ),
        (
            r#"{"PublicKey":7}"#.to_string(),
            "BackendV6Data.PublicKey is not a string",
        ),
        (
            format!(r#"{{"PublicKey":"{}","Port":70000}}"#, pk(4)),
            "BackendV6Data.Port 70000 is not a UDP port",
        ),
        (
            format!(r#"{{"PublicKey":"{}","Port":"51821"}}"#, pk(4)),
            "BackendV6Data.Port is not a number",
        ),
    ] {
        let (k, a) = flannel_lease(4, "198.18.0.4", Some("2001:db8::4"), Some(&data));
        let p = DualPeer::from_lease(&k, &a, Some(&cfg6()), &l).unwrap();
        assert_eq!(p.v4.public_key, pk(4), "{data}");
        let e = p.v6.unwrap_err();
        assert!(e.contains(want), "{data}: {e}");
    }
    // A PublicIPv6 inside the overlay, or a v6 subnet outside IPv6Network: no v6 half.
    let (k, a) = flannel_lease(4, "198.18.0.4", Some("fd00:10:244:9::1"), None);
    let p = DualPeer::from_lease(&k, &a, Some(&cfg6()), &l).unwrap();
    assert!(p.v6.unwrap_err().contains("inside the IPv6 overlay"));
    let (_, a) = flannel_lease(4, "198.18.0.4", Some("2001:db8::4"), None);
    let k: SubnetKey = "10.244.4.0-24&fd00:99::-64".parse().unwrap();
    let p = DualPeer::from_lease(&k, &a, Some(&cfg6()), &l).unwrap();
    assert!(p.v6.unwrap_err().contains("not a node subnet"));
}

#[test]
fn separate_mode_is_two_devices_one_per_family() {
    let l = local(WireguardMode::Separate, true);
    let plan = plan_dual(
        &l,
        &[
            peer(&l, 3, "198.18.0.3", Some("2001:db8::3")),
            peer(&l, 2, "198.18.0.2", Some("2001:db8::2")),
            // A v4-only node in the dual-stack network.
            peer(&l, 5, "198.18.0.5", None),
        ],
    );
    assert!(plan.skipped.is_empty());
    assert_eq!(plan.skipped_v6.len(), 1, "{:?}", plan.skipped_v6);
    assert_eq!(plan.skipped_v6[0].v4_subnet.to_string(), "10.244.5.0/24");
    let [v4, v6] = &plan.devices[..] else {
        panic!("{:?}", plan.devices)
    };
    assert_eq!((v4.name, v4.listen_port, v4.mtu), ("tweed-wg", 51820, 1420));
    assert_eq!(v4.addrs, [net("10.244.1.0/32")]);
    assert_eq!(v4.routes, [net("10.244.0.0/16")]);
    let v4p: Vec<_> = v4
        .peers
        .iter()
        .map(|p| (p.endpoint.to_string(), p.allowed_ips.clone()))
        .collect();
    assert_eq!(
        v4p,
        [
            ("198.18.0.2:51820".into(), vec![net("10.244.2.0/24")]),
            ("198.18.0.3:51820".into(), vec![net("10.244.3.0/24")]),
            ("198.18.0.5:51820".into(), vec![net("10.244.5.0/24")]),
        ]
    );
    assert_eq!(
        (v6.name, v6.listen_port, v6.mtu),
        ("tweed-wg-v6", 51821, 1420)
    );
    assert_eq!(v6.addrs, [net("fd00:10:244:1::/128")]);
    assert_eq!(v6.routes, [net("fd00:10:244::/56")]);
    let v6p: Vec<_> = v6
        .peers
        .iter()
        .map(|p| (p.public_key, p.endpoint.to_string(), p.allowed_ips.clone()))
        .collect();
    assert_eq!(
        v6p,
        [
            (
                pk(2),
                "[2001:db8::2]:51821".into(),
                vec![net("fd00:10:244:2::/64")]
            ),
            (
                pk(3),
                "[2001:db8::3]:51821".into(),
                vec![net("fd00:10:244:3::/64")]
            ),
        ]
    );
}

#[test]
fn single_device_modes_carry_both_subnets_and_pick_the_endpoint_family() {
    let peers = |l: &DualLocal| {
        vec![
            peer(l, 2, "198.18.0.2", Some("2001:db8::2")),
            peer(l, 5, "198.18.0.5", None),
        ]
    };
    for (mode, ep2, ep5) in [
        (
            WireguardMode::Ipv4,
            Some("198.18.0.2:51820"),
            Some("198.18.0.5:51820"),
        ),
        (
            WireguardMode::Auto,
            Some("198.18.0.2:51820"),
            Some("198.18.0.5:51820"),
        ),
        // Mode ipv6 cannot reach a peer without a usable IPv6 half.
        (WireguardMode::Ipv6, Some("[2001:db8::2]:51820"), None),
    ] {
        let l = local(mode, true);
        let plan = plan_dual(&l, &peers(&l));
        let [dev] = &plan.devices[..] else {
            panic!("{mode:?}: {:?}", plan.devices)
        };
        assert_eq!(
            (dev.name, dev.listen_port, dev.mtu),
            ("tweed-wg", 51820, 1420)
        );
        assert_eq!(
            dev.addrs,
            [net("10.244.1.0/32"), net("fd00:10:244:1::/128")]
        );
        assert_eq!(dev.routes, [net("10.244.0.0/16"), net("fd00:10:244::/56")]);
        let p2 = dev.peers.iter().find(|p| p.public_key == pk(2)).unwrap();
        assert_eq!(Some(p2.endpoint.to_string().as_str()), ep2, "{mode:?}");
        assert_eq!(
            p2.allowed_ips,
            [net("10.244.2.0/24"), net("fd00:10:244:2::/64")]
        );
        let p5 = dev.peers.iter().find(|p| p.public_key == pk(5));
        assert_eq!(
            p5.map(|p| p.endpoint.to_string()).as_deref(),
            ep5,
            "{mode:?}"
        );
        if let Some(p5) = p5 {
            assert_eq!(p5.allowed_ips, [net("10.244.5.0/24")]);
        } else {
            assert!(
                plan.skipped[0].reason.contains("Mode ipv6"),
                "{:?}",
                plan.skipped
            );
        }
    }
}

#[test]
fn auto_follows_flannels_endpoint_rule() {
    let ula: Ipv6Addr = "fd12::1".parse().unwrap();
    let global: Ipv6Addr = "2001:db8::1".parse().unwrap();
    let public4: Ipv4Addr = "198.18.0.2".parse().unwrap();
    let private4: Ipv4Addr = "10.1.0.2".parse().unwrap();
    assert_eq!(auto_endpoint(public4, global, global), IpAddr::V4(public4));
    assert_eq!(auto_endpoint(private4, global, global), IpAddr::V6(global));
    assert_eq!(auto_endpoint(private4, ula, global), IpAddr::V4(private4));
    assert_eq!(auto_endpoint(private4, global, ula), IpAddr::V4(private4));
    // In a plan: a peer behind a private IPv4 with a global IPv6 is reached over IPv6, on the
    // shared device's port.
    let l = local(WireguardMode::Auto, true);
    let plan = plan_dual(&l, &[peer(&l, 2, "10.1.0.2", Some("2001:db8::2"))]);
    assert_eq!(
        plan.devices[0].peers[0].endpoint.to_string(),
        "[2001:db8::2]:51820"
    );
}

#[test]
fn a_v4_only_node_runs_one_ipv4_device_in_every_mode() {
    for mode in [
        WireguardMode::Separate,
        WireguardMode::Auto,
        WireguardMode::Ipv4,
    ] {
        let l = local(mode, false);
        let (k, a) = flannel_lease(2, "198.18.0.2", Some("2001:db8::2"), None);
        let p = DualPeer::from_lease(&k, &a, None, &l).unwrap();
        let plan = plan_dual(&l, &[p]);
        let [dev] = &plan.devices[..] else {
            panic!("{mode:?}: {:?}", plan.devices)
        };
        assert_eq!(dev.addrs, [net("10.244.1.0/32")]);
        assert_eq!(dev.routes, [net("10.244.0.0/16")]);
        assert_eq!(dev.peers[0].allowed_ips, [net("10.244.2.0/24")]);
        assert_eq!(dev.peers[0].endpoint.to_string(), "198.18.0.2:51820");
    }
}

#[test]
fn v6_halves_that_are_ours_overlap_or_disagree_on_the_key_are_left_out() {
    let l = local(WireguardMode::Auto, true);
    let mut ps = vec![peer(&l, 2, "198.18.0.2", Some("2001:db8::2"))];
    // Peer 3 claims peer 2's v6 subnet.
    let mut p3 = peer(&l, 3, "198.18.0.3", Some("2001:db8::3"));
    if let Ok(h) = &mut p3.v6 {
        h.subnet = "fd00:10:244:2::/64".parse().unwrap();
    }
    ps.push(p3);
    // Peer 4's v6 half is under another key.
    let mut p4 = peer(&l, 4, "198.18.0.4", Some("2001:db8::4"));
    if let Ok(h) = &mut p4.v6 {
        h.public_key = pk(44);
    }
    ps.push(p4.clone());
    // Peer 6 claims our v6 subnet.
    let mut p6 = peer(&l, 6, "198.18.0.6", Some("2001:db8::6"));
    if let Ok(h) = &mut p6.v6 {
        h.subnet = "fd00:10:244:1::/64".parse().unwrap();
    }
    ps.push(p6);
    let plan = plan_dual(&l, &ps);
    let dev = &plan.devices[0];
    assert_eq!(dev.peers.len(), 4, "every IPv4 half is still served");
    let v6_allowed: Vec<_> = dev
        .peers
        .iter()
        .flat_map(|p| p.allowed_ips.iter().filter(|n| n.is_ipv6()))
        .collect();
    assert_eq!(v6_allowed, [&net("fd00:10:244:2::/64")]);
    let reasons: Vec<_> = plan.skipped_v6.iter().map(|s| s.reason.as_str()).collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons[0].contains("overlaps"), "{reasons:?}");
    assert!(
        reasons[1].contains("one device holds one key per peer"),
        "{reasons:?}"
    );
    assert!(reasons[2].contains("this node's"), "{reasons:?}");

    // In separate mode a v6 key of its own is fine (each device has its peer entry).
    let l = local(WireguardMode::Separate, true);
    let plan = plan_dual(&l, &[p4]);
    assert_eq!(plan.devices[1].peers[0].public_key, pk(44));
}

#[test]
fn our_lease_advertises_the_port_v6_peers_are_served_on() {
    let k = pk(1);
    let sep = local(WireguardMode::Separate, true);
    assert_eq!(
        lease_attrs(&sep).to_json(),
        format!(
            r#"{{"PublicIP":"198.18.0.1","PublicIPv6":"2001:db8::1","BackendType":"wireguard","BackendData":{{"PublicKey":"{k}","Port":51820}},"BackendV6Data":{{"PublicKey":"{k}","Port":51821}}}}"#
        )
    );
    let auto = local(WireguardMode::Auto, true);
    assert!(lease_attrs(&auto).to_json().ends_with(&format!(
        r#""BackendV6Data":{{"PublicKey":"{k}","Port":51820}}}}"#
    )));
    let v4 = local(WireguardMode::Separate, false);
    assert!(!lease_attrs(&v4).to_json().contains("V6"));

    // Two tweed nodes read each other's leases into matching plans.
    let key: SubnetKey = "10.244.1.0-24&fd00:10:244:1::-64".parse().unwrap();
    let mut other = local(WireguardMode::Separate, true);
    other.v4.own_subnet = "10.244.7.0/24".parse().unwrap();
    other.v4.public_ip = "198.18.0.7".parse().unwrap();
    other.v4.public_key = pk(7);
    other.v6 = Some(Local6 {
        own_subnet: "fd00:10:244:7::/64".parse().unwrap(),
        public_ipv6: "2001:db8::7".parse().unwrap(),
        ..other.v6.clone().unwrap()
    });
    let p = DualPeer::from_lease(&key, &lease_attrs(&sep), Some(&cfg6()), &other).unwrap();
    let plan = plan_dual(&other, &[p]);
    assert_eq!(
        plan.devices[1].peers[0].endpoint.to_string(),
        "[2001:db8::1]:51821"
    );
    // Both entries name the node by its IPv4 endpoint (userspace's peer table routes to it).
    for dev in &plan.devices {
        assert_eq!(
            dev.peers[0].node.to_string(),
            "198.18.0.1:51820",
            "{}",
            dev.name
        );
    }
}

fn v4_packet(src: [u8; 4]) -> Vec<u8> {
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    p[12..16].copy_from_slice(&src);
    p
}

fn v6_packet(src: &str) -> Vec<u8> {
    let mut p = vec![0u8; 48];
    p[0] = 0x60;
    p[8..24].copy_from_slice(&src.parse::<Ipv6Addr>().unwrap().octets());
    p
}

#[test]
fn inner_sources_are_checked_against_allowed_ips_of_both_families() {
    let allowed = [net("10.244.2.0/24"), net("fd00:10:244:2::/64")];
    assert!(source_allowed(&allowed, &v4_packet([10, 244, 2, 9])));
    assert!(source_allowed(&allowed, &v6_packet("fd00:10:244:2::9")));
    // Spoofed: another peer's subnets.
    assert!(!source_allowed(&allowed, &v4_packet([10, 244, 3, 9])));
    assert!(!source_allowed(&allowed, &v6_packet("fd00:10:244:3::9")));
    // A v4-only peer's entry lets no IPv6 through.
    assert!(!source_allowed(
        &allowed[..1],
        &v6_packet("fd00:10:244:2::9")
    ));
    // An IPv4-mapped IPv6 source is IPv6: it does not pass as 10.244.2.9.
    assert!(!source_allowed(&allowed, &v6_packet("::ffff:10.244.2.9")));
    // Crafted: empty, truncated headers, other versions.
    assert!(!source_allowed(&allowed, &[]));
    assert!(!source_allowed(&allowed, &v4_packet([10, 244, 2, 9])[..19]));
    assert!(!source_allowed(
        &allowed,
        &v6_packet("fd00:10:244:2::9")[..39]
    ));
    let mut v5 = v4_packet([10, 244, 2, 9]);
    v5[0] = 0x55;
    assert!(!source_allowed(&allowed, &v5));
    // A v6 header claiming version 4 is read as v4 (bytes 12..16), not trusted as v6.
    let mut confused = v6_packet("fd00:10:244:2::9");
    confused[0] = 0x45;
    assert!(!source_allowed(&allowed, &confused));
}

#[test]
fn the_plan_goes_onto_kernel_devices_over_generic_netlink_and_a_second_pass_writes_nothing() {
    use crate::backend::wireguard::kernel::{clamp, parse_device, reconcile, FakeGenl, WgGenl};
    let key = clamp([9; 32]);
    for mode in [
        WireguardMode::Separate,
        WireguardMode::Auto,
        WireguardMode::Ipv6,
    ] {
        let l = local(mode, true);
        let plan = plan_dual(
            &l,
            &[
                peer(&l, 2, "198.18.0.2", Some("2001:db8::2")),
                peer(&l, 3, "198.18.0.3", Some("2001:db8::3")),
            ],
        );
        for dev in &plan.devices {
            let want = device_spec(dev, key);
            let mut fake = FakeGenl::new(dev.name);
            let (ops, _) = reconcile(&mut fake, dev.name, &want).unwrap();
            assert_eq!(ops.len(), 3, "{mode:?} {}: {ops:?}", dev.name);
            // What the fake kernel holds reads back as the plan, IPv6 entries included.
            let seen = parse_device(
                &fake.get_device(dev.name).unwrap(),
                std::time::SystemTime::now(),
            );
            assert_eq!(seen.spec, want, "{mode:?} {}", dev.name);
            let (ops, _) = reconcile(&mut fake, dev.name, &want).unwrap();
            assert!(ops.is_empty(), "{mode:?} {}: {ops:?}", dev.name);
            let families: Vec<bool> = fake.peers[0]
                .allowed
                .iter()
                .map(|(a, _)| a.is_ipv6())
                .collect();
            let want_families = match (mode, dev.name) {
                (WireguardMode::Separate, DEVICE_V6) => vec![true],
                (WireguardMode::Separate, _) => vec![false],
                _ => vec![false, true],
            };
            assert_eq!(families, want_families, "{mode:?} {}", dev.name);
            assert_eq!(
                fake.peers[0].endpoint.unwrap().is_ipv6(),
                dev.name == DEVICE_V6 || mode == WireguardMode::Ipv6
            );
        }
    }
    // A kernel-roamed IPv6 endpoint is set back from the lease, nothing else.
    let l = local(WireguardMode::Separate, true);
    let plan = plan_dual(&l, &[peer(&l, 2, "198.18.0.2", Some("2001:db8::2"))]);
    let want = device_spec(&plan.devices[1], key);
    let mut fake = FakeGenl::new(DEVICE_V6);
    reconcile(&mut fake, DEVICE_V6, &want).unwrap();
    fake.peers[0].endpoint = Some("[2001:db8::99]:4444".parse().unwrap());
    let (ops, _) = reconcile(&mut fake, DEVICE_V6, &want).unwrap();
    assert_eq!(ops.len(), 1, "{ops:?}");
    assert_eq!(
        fake.peers[0].endpoint,
        Some("[2001:db8::2]:51821".parse().unwrap())
    );
}

#[test]
fn the_v6_link_side_is_address_and_route_and_nothing_when_in_place() {
    use crate::netlink::{Addr6, Op, Route, Route6};
    let l = local(WireguardMode::Separate, true);
    let plan = plan_dual(&l, &[]);
    let v6dev = &plan.devices[1];
    let ops = plan_link6(v6dev, 7, &[], &[]);
    let route = Route6 {
        dst: "fd00:10:244::/56".parse().unwrap(),
        gateway: None,
        oif: Some(7),
        onlink: false,
        metric: Route6::DEFAULT_METRIC,
        protocol: Route::PROTO_STATIC,
    };
    assert_eq!(
        ops,
        vec![
            Op::Addr6Add {
                ifindex: 7,
                addr: "fd00:10:244:1::/128".parse().unwrap(),
                nodad: true
            },
            Op::Route6Replace(route),
        ]
    );
    let have_addr = Addr6 {
        ifindex: 7,
        net: "fd00:10:244:1::/128".parse().unwrap(),
        tentative: false,
    };
    let link_local = Addr6 {
        ifindex: 7,
        net: "fe80::1/64".parse().unwrap(),
        tentative: false,
    };
    let kernel_route = Route6 {
        dst: "fe80::/64".parse().unwrap(),
        protocol: Route::PROTO_KERNEL,
        metric: 256,
        ..route
    };
    assert_eq!(
        plan_link6(v6dev, 7, &[have_addr, link_local], &[route, kernel_route]),
        vec![],
        "in place: no write"
    );
    // An old lease's address and a stale route through the device go.
    let old = Addr6 {
        ifindex: 7,
        net: "fd00:10:244:9::/128".parse().unwrap(),
        tentative: false,
    };
    let stale = Route6 {
        dst: "fd00:99::/56".parse().unwrap(),
        ..route
    };
    assert_eq!(
        plan_link6(v6dev, 7, &[have_addr, old], &[route, stale]),
        vec![
            Op::Addr6Del {
                ifindex: 7,
                addr: old.net
            },
            Op::Route6Del(stale)
        ]
    );
    // The IPv4 device of separate mode has no IPv6 side; the shared device of auto has.
    assert_eq!(plan_link6(&plan.devices[0], 7, &[], &[]), vec![]);
    let auto = local(WireguardMode::Auto, true);
    assert_eq!(
        plan_link6(&plan_dual(&auto, &[]).devices[0], 7, &[], &[]).len(),
        2
    );
}
