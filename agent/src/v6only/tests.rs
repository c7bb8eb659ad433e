use super::*;
use rand::SeedableRng;

const PREFIX: &str = "/coreos.com/network";

fn cfg() -> Ipv6Config {
    let tweed_config::ParsedNetwork::Ipv6Only(n) = tweed_config::NetworkConfig::parse_any(
        r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#,
    )
    .unwrap() else {
        panic!("an IPv6-only config")
    };
    n.ipv6
}

fn lease(key: &str, value: &str, rev: i64) -> RawLease {
    RawLease {
        key: format!("{PREFIX}/subnets/{key}"),
        value: value.as_bytes().to_vec(),
        lease_id: 100 + rev,
        mod_revision: rev,
        create_revision: rev,
    }
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

fn net6(s: &str) -> Ipv6Network {
    s.parse().unwrap()
}

fn link(index: u32, name: &str) -> Link {
    Link {
        index,
        name: name.into(),
        mtu: 1500,
        mac: None,
        kind: None,
        up: true,
        vxlan: None,
        master: None,
        alias: None,
    }
}

fn addr(ifindex: u32, a: &str, scope: u8) -> Inet6Addr {
    Inet6Addr {
        ifindex,
        addr: v6(a),
        prefix: 64,
        scope,
        flags: 0,
    }
}

#[test]
fn only_vxlan_and_host_gw_run_an_ipv6_only_network_and_the_error_names_backend_type() {
    let parse = |ty: &str| {
        let tweed_config::ParsedNetwork::Ipv6Only(n) =
            tweed_config::NetworkConfig::parse_any(&format!(
                r#"{{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{{"Type":"{ty}"}}}}"#
            ))
            .unwrap()
        else {
            panic!()
        };
        n.backend
    };
    assert_eq!(check_backend(&parse("vxlan")), Ok(()));
    assert_eq!(check_backend(&parse("host-gw")), Ok(()));
    for ty in ["udp", "wireguard"] {
        let e = check_backend(&parse(ty)).unwrap_err();
        assert_eq!(
            e,
            V6OnlyError::Backend(if ty == "udp" { "udp" } else { "wireguard" })
        );
        let text = e.to_string();
        assert!(text.contains("Backend.Type") && text.contains(ty), "{text}");
    }
}

#[test]
fn the_underlay_and_public_ipv6_come_from_the_flags_or_the_ipv6_default_route() {
    let links = [link(1, "lo"), link(2, "eth0"), link(3, "eth1")];
    let addrs = [
        addr(1, "::1", 0x10),
        addr(2, "fe80::2", 0x20),
        addr(2, "2001:db8::2", 0),
        addr(3, "2001:db8:1::3", 0),
    ];
    let default = Route6 {
        dst: net6("::/0"),
        gateway: Some(v6("fe80::1")),
        oif: Some(3),
        onlink: false,
        metric: 1024,
        protocol: 3,
    };
    let u = choose_underlay(&[], None, &links, &addrs, &[default]).unwrap();
    assert_eq!(
        (u.name.as_str(), u.public_ipv6),
        ("eth1", v6("2001:db8:1::3"))
    );
    let u = choose_underlay(&["eth0".into()], None, &links, &addrs, &[default]).unwrap();
    assert_eq!(
        (u.name.as_str(), u.public_ipv6),
        ("eth0", v6("2001:db8::2"))
    );
    // --public-ipv6 picks the interface holding it, and is advertised as given.
    let u = choose_underlay(&[], Some(v6("2001:db8::2")), &links, &addrs, &[]).unwrap();
    assert_eq!(
        (u.name.as_str(), u.public_ipv6),
        ("eth0", v6("2001:db8::2"))
    );
    assert!(matches!(
        choose_underlay(&["eth9".into()], None, &links, &addrs, &[default]),
        Err(V6OnlyError::NoSuchIface { .. })
    ));
    assert_eq!(
        choose_underlay(&[], None, &links, &addrs, &[]),
        Err(V6OnlyError::NoIface)
    );
    // An interface with only a link-local address: a clear error naming it, no start.
    let only_ll = [addr(2, "fe80::2", 0x20)];
    let e = choose_underlay(&["eth0".into()], None, &links, &only_ll, &[]).unwrap_err();
    assert_eq!(
        e,
        V6OnlyError::NoPublicIpv6 {
            iface: "eth0".into()
        }
    );
    assert!(e.to_string().contains("--public-ipv6"), "{e}");
}

#[test]
fn the_lease_value_is_flannels_field_set_with_public_ip_0_0_0_0() {
    let vxlan = BackendConfig::Vxlan {
        vni: 1,
        port: 8472,
        direct_routing: false,
        mtu: 0,
    };
    let mac: MacAddr = "aa:bb:cc:dd:ee:02".parse().unwrap();
    assert_eq!(
        lease_attrs(v6("2001:db8::6"), &vxlan, Some(mac)).to_json(),
        r#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::6","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:02"}}"#
    );
    assert_eq!(
        lease_attrs(v6("2001:db8::6"), &BackendConfig::HostGw, None).to_json(),
        r#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::6","BackendType":"host-gw"}"#
    );
    // What we write, a peer of our kind accepts.
    let key: LeaseKey = "fd00:10:244:3::-64".parse().unwrap();
    let a = lease_attrs(v6("2001:db8::6"), &vxlan, Some(mac));
    assert!(a.validate_ipv6_only(&key, &cfg()).is_ok());
}

#[test]
fn allocation_reuses_our_key_else_takes_a_subnet_no_key_of_either_form_holds() {
    let cfg = cfg();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let me = v6("2001:db8::6");
    let mine = lease(
        "fd00:10:244:5::-64",
        r#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::6","BackendType":"host-gw"}"#,
        4,
    );
    let other = lease(
        "fd00:10:244:6::-64",
        r#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::7","BackendType":"host-gw"}"#,
        3,
    );
    let d = decide(
        &cfg,
        PREFIX,
        &[other.clone(), mine],
        me,
        None,
        &HashSet::new(),
        &mut rng,
    )
    .unwrap();
    assert!(
        matches!(d, Decision::Reuse { key, lease_id: 104, .. } if key.ipv6 == net6("fd00:10:244:5::/64")),
        "{d:?}"
    );
    // The previous subnet is asked back when free, never when a dual-stack key holds its part.
    let dual = lease(
        "10.244.7.0-24&fd00:10:244:7::-64",
        r#"{"PublicIP":"198.18.0.7","PublicIPv6":"2001:db8::9","BackendType":"host-gw"}"#,
        2,
    );
    let listing = [other, dual];
    let prev = Some(net6("fd00:10:244:8::/64"));
    assert_eq!(
        decide(&cfg, PREFIX, &listing, me, prev, &HashSet::new(), &mut rng).unwrap(),
        Decision::Take(net6("fd00:10:244:8::/64"))
    );
    let held = Some(net6("fd00:10:244:7::/64"));
    for _ in 0..50 {
        let Decision::Take(s) =
            decide(&cfg, PREFIX, &listing, me, held, &HashSet::new(), &mut rng).unwrap()
        else {
            panic!()
        };
        assert!(cfg.is_allocatable(s));
        assert!(
            s != net6("fd00:10:244:7::/64") && s != net6("fd00:10:244:6::/64"),
            "{s}"
        );
    }
    // A hostile key covering the whole network does not block allocation.
    let hostile = lease("fd00:10:244::-56", r#"{"PublicIP":"0.0.0.0"}"#, 1);
    assert!(matches!(
        decide(
            &cfg,
            PREFIX,
            &[hostile],
            me,
            None,
            &HashSet::new(),
            &mut rng
        ),
        Ok(Decision::Take(_))
    ));
}

#[test]
fn allocation_fails_naming_ipv6network_when_every_subnet_is_taken() {
    let tweed_config::ParsedNetwork::Ipv6Only(n) = tweed_config::NetworkConfig::parse_any(
        r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/62","IPv6SubnetLen":64}"#,
    )
    .unwrap() else {
        panic!()
    };
    let listing: Vec<RawLease> = (1..4)
        .map(|i| {
            lease(
                &format!("fd00:0:0:{i}::-64"),
                r#"{"PublicIP":"0.0.0.0"}"#,
                i,
            )
        })
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let e = decide(
        &n.ipv6,
        PREFIX,
        &listing,
        v6("2001:db8::6"),
        None,
        &HashSet::new(),
        &mut rng,
    )
    .unwrap_err();
    assert!(e.to_string().contains("fd00::/62"), "{e}");
}

#[test]
fn a_younger_key_of_the_other_form_on_our_subnet_loses_the_race() {
    let own = net6("fd00:10:244:5::/64");
    let ours = lease("fd00:10:244:5::-64", "{}", 9);
    let older_dual = lease("10.244.5.0-24&fd00:10:244:5::-64", "{}", 8);
    let younger = lease("10.244.6.0-24&fd00:10:244:5::-64", "{}", 10);
    assert!(lost_race(
        PREFIX,
        &[ours.clone(), older_dual],
        own,
        &ours.key,
        9
    ));
    assert!(!lost_race(
        PREFIX,
        &[ours.clone(), younger],
        own,
        &ours.key,
        9
    ));
}

#[test]
fn peers_are_ipv6_only_leases_and_the_ipv6_half_of_dual_stack_ones_never_ourselves() {
    let cfg = cfg();
    let mac1 = r#""BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:01"}"#;
    let listing = [
        lease(
            "fd00:10:244:1::-64",
            &format!(
                r#"{{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::1","BackendType":"vxlan",{mac1}}}"#
            ),
            1,
        ),
        // Ours.
        lease(
            "fd00:10:244:2::-64",
            r#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::2","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:02"}}"#,
            2,
        ),
        // A dual-stack node: its IPv6 half.
        lease(
            "10.244.3.0-24&fd00:10:244:3::-64",
            r#"{"PublicIP":"198.18.0.3","PublicIPv6":"2001:db8::3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:13"},"BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:03"}}"#,
            3,
        ),
        // A younger claim of a peer's subnet.
        lease(
            "10.244.9.0-24&fd00:10:244:1::-64",
            r#"{"PublicIP":"198.18.0.9","PublicIPv6":"2001:db8::9","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:09"}}"#,
            4,
        ),
        // An IPv4-only node, a crafted value, a corrupt key and value.
        lease(
            "10.244.4.0-24",
            r#"{"PublicIP":"198.18.0.4","BackendType":"vxlan"}"#,
            5,
        ),
        lease(
            "fd00:10:244:6::-64",
            r#"{"PublicIP":"0.0.0.0","PublicIPv6":"::1"}"#,
            6,
        ),
        lease(
            "0.0.0.0-0&fd00:10:244:7::-64",
            r#"{"PublicIP":"0.0.0.0"}"#,
            7,
        ),
        lease("fd00:10:244:8::-64", "not json", 8),
    ];
    let (peers, skipped) = peers(&cfg, PREFIX, &listing, Some(net6("fd00:10:244:2::/64")));
    let got: Vec<(Ipv6Network, Ipv6Addr)> = peers
        .iter()
        .map(|p| (p.peer.subnet, p.peer.public_ipv6))
        .collect();
    assert_eq!(
        got,
        [
            (net6("fd00:10:244:1::/64"), v6("2001:db8::1")),
            (net6("fd00:10:244:3::/64"), v6("2001:db8::3"))
        ]
    );
    let labels: Vec<&str> = skipped.iter().map(|s| s.2).collect();
    assert_eq!(labels.len(), 5, "{skipped:?}");
    for l in [
        "bad_key",
        "overlap",
        "not_ipv6_peer",
        "bad_public_ip",
        "bad_value",
    ] {
        assert!(labels.contains(&l), "{l} missing in {skipped:?}");
    }
    let vx = vxlan_peers(&peers);
    assert_eq!(vx.len(), 2);
    assert_eq!(vx[1].vtep_mac.to_string(), "aa:bb:cc:dd:ee:03");
    assert!(hostgw_peers(&peers).is_empty());
}
