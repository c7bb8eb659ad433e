use super::*;
use rand::SeedableRng;

pub(super) const PREFIX: &str = "/coreos.com/network";

fn cfg() -> Ipv6Config {
    let tweed_config::ParsedNetwork::Ipv6Only(n) = tweed_config::NetworkConfig::parse_any(
        r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#,
    )
    .unwrap() else {
        panic!("an IPv6-only config")
    };
    n.ipv6
}

pub(super) fn lease(key: &str, value: &str, rev: i64) -> RawLease {
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
fn vxlan_host_gw_and_wireguard_run_an_ipv6_only_network_udp_is_refused_naming_backend_type() {
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
    assert_eq!(check_backend(&parse("wireguard")), Ok(()));
    let e = check_backend(&parse("udp")).unwrap_err();
    assert_eq!(e, V6OnlyError::Backend("udp"));
    let text = e.to_string();
    assert!(
        text.contains("Backend.Type") && text.contains("udp"),
        "{text}"
    );
}

fn fl(ifaces: &[&str], explicit: Option<Ipv6Addr>) -> UnderlayFlags {
    UnderlayFlags {
        ifaces: ifaces.iter().map(|s| s.to_string()).collect(),
        explicit,
        ..UnderlayFlags::default()
    }
}

/// `--iface` as an IPv6 address, `--iface-regex` (addresses first, then names, link-local
/// addresses never) and `--iface-can-reach` (the most specific route), tried in that order as
/// for IPv4; nothing matching is an error naming every flag tried.
#[test]
fn the_ipv6_underlay_follows_iface_regex_and_can_reach_as_for_ipv4() {
    let links = [
        link(1, "lo"),
        link(2, "eth0"),
        link(3, "eth1"),
        link(4, "bond0"),
    ];
    let addrs = [
        addr(1, "::1", 0x10),
        addr(2, "fe80::2", 0x20),
        addr(2, "2001:db8::2", 0),
        addr(3, "fe80::3", 0x20),
        addr(3, "fd00:198:18::3", 0),
        addr(4, "2001:db8:4::4", 0),
    ];
    let route = |dst: &str, oif: u32, metric: u32| Route6 {
        dst: net6(dst),
        gateway: None,
        oif: Some(oif),
        onlink: false,
        metric,
        protocol: 3,
    };
    // The default route goes out of eth0; the flags choose otherwise.
    let routes = [
        route("::/0", 2, 1024),
        route("fd00:198:18::/64", 3, 256),
        route("fd00:198::/32", 4, 256),
        route("fd00:198:18::/64", 4, 512),
    ];
    let pick = |f: UnderlayFlags| choose_underlay(&f, &links, &addrs, &routes).map(|u| u.name);
    assert_eq!(pick(fl(&["fd00:198:18::3"], None)), Ok("eth1".into()));
    let re = |r: &[&str]| UnderlayFlags {
        regexes: r.iter().map(|s| s.to_string()).collect(),
        ..UnderlayFlags::default()
    };
    assert_eq!(pick(re(&["^fd00:198:"])), Ok("eth1".into()));
    assert_eq!(pick(re(&["^bond"])), Ok("bond0".into()));
    // Loopback never matches, by name or address.
    assert_eq!(pick(re(&["^lo$", "^::1$", "^eth1$"])), Ok("eth1".into()));
    // The first regex that matches wins; a link-local match counts for nothing.
    assert_eq!(pick(re(&["^fe80::3$", "^2001:db8:4:"])), Ok("bond0".into()));
    let reach = |ip: &str| UnderlayFlags {
        can_reach: Some(ip.parse().unwrap()),
        ..UnderlayFlags::default()
    };
    // The /64 beats the /32, and of two /64s the lower metric.
    assert_eq!(pick(reach("fd00:198:18::254")), Ok("eth1".into()));
    assert_eq!(pick(reach("fd00:198:99::1")), Ok("bond0".into()));
    assert_eq!(pick(reach("2001:db8:77::1")), Ok("eth0".into()));
    // Tried in order: a missing --iface falls through to the regex, then to can-reach.
    let mut f = re(&["^nothing$"]);
    f.ifaces = vec!["eth9".into()];
    f.can_reach = Some("fd00:198:18::254".parse().unwrap());
    assert_eq!(pick(f.clone()), Ok("eth1".into()));
    f.can_reach = None;
    let e = choose_underlay(&f, &links, &addrs, &[]).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("--iface eth9") && text.contains("--iface-regex ^nothing$"),
        "{text}"
    );
    let e = choose_underlay(&reach("10.0.0.1"), &links, &addrs, &routes).unwrap_err();
    assert_eq!(e, V6OnlyError::CanReachIpv4("10.0.0.1".parse().unwrap()));
    assert!(e.to_string().contains("--iface-can-reach"), "{e}");
    let e = choose_underlay(&reach("2001:db9::1"), &links, &addrs, &[]).unwrap_err();
    assert!(e.to_string().contains("no IPv6 route"), "{e}");
    assert!(matches!(
        choose_underlay(&re(&["("]), &links, &addrs, &routes),
        Err(V6OnlyError::InvalidRegex { .. })
    ));
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
    let u = choose_underlay(&fl(&[], None), &links, &addrs, &[default]).unwrap();
    assert_eq!(
        (u.name.as_str(), u.public_ipv6),
        ("eth1", v6("2001:db8:1::3"))
    );
    let u = choose_underlay(&fl(&["eth0"], None), &links, &addrs, &[default]).unwrap();
    assert_eq!(
        (u.name.as_str(), u.public_ipv6),
        ("eth0", v6("2001:db8::2"))
    );
    // --public-ipv6 picks the interface holding it, and is advertised as given.
    let u = choose_underlay(&fl(&[], Some(v6("2001:db8::2"))), &links, &addrs, &[]).unwrap();
    assert_eq!(
        (u.name.as_str(), u.public_ipv6),
        ("eth0", v6("2001:db8::2"))
    );
    assert!(matches!(
        choose_underlay(&fl(&["eth9"], None), &links, &addrs, &[default]),
        Err(V6OnlyError::NoSuchIface { .. })
    ));
    assert_eq!(
        choose_underlay(&fl(&[], None), &links, &addrs, &[]),
        Err(V6OnlyError::NoIface)
    );
    // An interface with only a link-local address: a clear error naming it, no start.
    let only_ll = [addr(2, "fe80::2", 0x20)];
    let e = choose_underlay(&fl(&["eth0"], None), &links, &only_ll, &[]).unwrap_err();
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
    let (peers, skipped) = peers(
        &cfg,
        PREFIX,
        &listing,
        Some(net6("fd00:10:244:2::/64")),
        v6("2001:db8::2"),
    );
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

const ME: &str = r#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::6","BackendType":"host-gw"}"#;

fn ttl_lease(key: &str, value: &str, rev: i64, lease_id: i64) -> RawLease {
    RawLease {
        lease_id,
        ..lease(key, value, rev)
    }
}

#[test]
fn our_key_that_an_older_key_of_the_other_form_claims_is_removed_not_reused() {
    let cfg = cfg();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let older_dual = lease(
        "10.244.5.0-24&fd00:10:244:5::-64",
        r#"{"PublicIP":"198.18.0.9","PublicIPv6":"2001:db8::9","BackendType":"host-gw"}"#,
        2,
    );
    // Ours lost that race, but its delete failed (or the agent died before it).
    let ours = ttl_lease("fd00:10:244:5::-64", ME, 3, 77);
    let d = decide(
        &cfg,
        PREFIX,
        &[older_dual.clone(), ours.clone()],
        v6("2001:db8::6"),
        None,
        &HashSet::new(),
        &mut rng,
    )
    .unwrap();
    let Decision::Remove(stale) = d else {
        panic!("{d:?}")
    };
    assert_eq!(stale.len(), 1);
    assert_eq!(
        (stale[0].subnet, stale[0].lease_id, stale[0].mod_revision),
        (net6("fd00:10:244:5::/64"), 77, 3)
    );
    assert_eq!(stale[0].why, "an older key claims its subnet");
    // A reservation of ours that lost is left to the operator, and not reused either.
    let reserved = ttl_lease("fd00:10:244:5::-64", ME, 3, 0);
    for _ in 0..20 {
        let d = decide(
            &cfg,
            PREFIX,
            &[older_dual.clone(), reserved.clone()],
            v6("2001:db8::6"),
            None,
            &HashSet::new(),
            &mut rng,
        )
        .unwrap();
        assert!(
            matches!(d, Decision::Take(s) if s != net6("fd00:10:244:5::/64")),
            "{d:?}"
        );
    }
}

#[test]
fn our_stale_keys_of_either_form_are_removed_at_acquire_and_reservations_kept() {
    let cfg = cfg();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let me = v6("2001:db8::6");
    // From before the switch to IPv6-only: our dual-stack key, on a TTL lease.
    let dual = ttl_lease(
        "10.244.4.0-24&fd00:10:244:4::-64",
        r#"{"PublicIP":"198.18.0.6","PublicIPv6":"2001:db8::6","BackendType":"host-gw"}"#,
        2,
        50,
    );
    let keep = ttl_lease("fd00:10:244:9::-64", ME, 3, 51);
    let second = ttl_lease("fd00:10:244:a::-64", ME, 4, 52);
    let other = ttl_lease(
        "fd00:10:244:b::-64",
        r#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::7","BackendType":"host-gw"}"#,
        5,
        53,
    );
    let listing = [dual.clone(), keep.clone(), second, other];
    let Decision::Remove(stale) =
        decide(&cfg, PREFIX, &listing, me, None, &HashSet::new(), &mut rng).unwrap()
    else {
        panic!()
    };
    let got: Vec<(i64, &str)> = stale.iter().map(|s| (s.lease_id, s.why)).collect();
    assert_eq!(
        got,
        [
            (50, "a dual-stack key of ours from before EnableIPv4: false"),
            (52, "a second key of ours")
        ]
    );
    // Once they are gone, ours is reused.
    let d = decide(
        &cfg,
        PREFIX,
        std::slice::from_ref(&keep),
        me,
        None,
        &HashSet::new(),
        &mut rng,
    )
    .unwrap();
    assert!(matches!(d, Decision::Reuse { lease_id: 51, .. }), "{d:?}");
    // A key of ours outside SubnetMin/SubnetMax goes too.
    let narrowed: Ipv6Config = {
        let tweed_config::ParsedNetwork::Ipv6Only(n) = tweed_config::NetworkConfig::parse_any(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","IPv6SubnetMin":"fd00:10:244:10::","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap() else {
            panic!()
        };
        n.ipv6
    };
    let d = decide(
        &narrowed,
        PREFIX,
        &[keep],
        me,
        None,
        &HashSet::new(),
        &mut rng,
    )
    .unwrap();
    assert!(
        matches!(&d, Decision::Remove(s) if s.len() == 1 && s[0].why == "not a node subnet of IPv6Network"),
        "{d:?}"
    );
    // A reserved dual-stack key of ours (no TTL) is the operator's: not removed.
    let reserved_dual = RawLease {
        lease_id: 0,
        ..dual
    };
    assert!(matches!(
        decide(
            &cfg,
            PREFIX,
            &[reserved_dual],
            me,
            None,
            &HashSet::new(),
            &mut rng
        )
        .unwrap(),
        Decision::Take(_)
    ));
}

#[test]
fn our_key_is_held_only_while_it_has_our_public_ipv6_and_our_lease() {
    let me = v6("2001:db8::6");
    let own = Ipv6OnlyKey {
        ipv6: net6("fd00:10:244:5::/64"),
    };
    let at = |value: &str, lease_id: i64| [ttl_lease("fd00:10:244:5::-64", value, 3, lease_id)];
    assert_eq!(
        held(PREFIX, &at(ME, 7), own, 7, me),
        Held::Ours { lease_id: 7 }
    );
    assert_eq!(held(PREFIX, &[], own, 7, me), Held::Gone);
    // Our lease expired while we were cut off, and another node took the subnet.
    let theirs = r#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::7","BackendType":"host-gw"}"#;
    assert_eq!(held(PREFIX, &at(theirs, 9), own, 7, me), Held::Lost);
    assert_eq!(held(PREFIX, &at(theirs, 7), own, 7, me), Held::Lost);
    assert_eq!(held(PREFIX, &at(ME, 9), own, 7, me), Held::Lost);
    assert_eq!(held(PREFIX, &at("not json", 7), own, 7, me), Held::Lost);
    // Reserved or unreserved by hand: still ours, on what it now hangs on.
    assert_eq!(
        held(PREFIX, &at(ME, 0), own, 7, me),
        Held::Ours { lease_id: 0 }
    );
    assert_eq!(
        held(PREFIX, &at(ME, 9), own, 0, me),
        Held::Ours { lease_id: 9 }
    );
}

#[test]
fn a_stale_key_of_ours_is_no_peer_but_still_the_older_claim() {
    let cfg = cfg();
    let me = v6("2001:db8::6");
    let listing = [
        // Our dual-stack key from before the switch, not yet removed.
        lease(
            "10.244.4.0-24&fd00:10:244:4::-64",
            r#"{"PublicIP":"198.18.0.6","PublicIPv6":"2001:db8::6","BackendType":"host-gw"}"#,
            2,
        ),
        lease(
            "fd00:10:244:4::-64",
            r#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::7","BackendType":"host-gw"}"#,
            3,
        ),
        lease(
            "fd00:10:244:8::-64",
            r#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::8","BackendType":"host-gw"}"#,
            4,
        ),
    ];
    let (peers, skipped) = peers(&cfg, PREFIX, &listing, Some(net6("fd00:10:244:9::/64")), me);
    assert_eq!(
        hostgw_peers(&peers),
        [(net6("fd00:10:244:8::/64"), v6("2001:db8::8"))]
    );
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert_eq!(
        (skipped[0].0.as_str(), skipped[0].2),
        ("/coreos.com/network/subnets/fd00:10:244:4::-64", "overlap")
    );
}

/// Issue 19: after a `PublicIPv6` move, our key still names the former address until its
/// rewrite got through: it is held (a reservation too, whose lease id proves nothing), and a
/// key naming an address we never had is not.
#[test]
fn a_key_with_a_former_public_ipv6_of_this_run_is_still_ours() {
    let now = v6("2001:db8::7");
    let before = v6("2001:db8::6");
    let own = Ipv6OnlyKey {
        ipv6: net6("fd00:10:244:5::/64"),
    };
    let at = |value: &str, lease_id: i64| [ttl_lease("fd00:10:244:5::-64", value, 3, lease_id)];
    // Only the current address: the reservation with the former one looks like another node's.
    assert_eq!(held(PREFIX, &at(ME, 0), own, 0, now), Held::Lost);
    assert_eq!(
        held_as(PREFIX, &at(ME, 0), own, 0, &[now, before]),
        Held::Ours { lease_id: 0 }
    );
    assert_eq!(
        held_as(PREFIX, &at(ME, 7), own, 7, &[now, before]),
        Held::Ours { lease_id: 7 }
    );
    let theirs = r#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::9","BackendType":"host-gw"}"#;
    assert_eq!(
        held_as(PREFIX, &at(theirs, 0), own, 0, &[now, before]),
        Held::Lost
    );
    // Another TTL lease than ours is another node's, whatever the address.
    assert_eq!(
        held_as(PREFIX, &at(ME, 9), own, 7, &[now, before]),
        Held::Lost
    );
}

/// Our key is rewritten only when its value is not what we advertise, compare-and-swap on
/// the revision listed and on the lease it hangs on (0: it stays reserved).
#[test]
fn our_key_is_rewritten_only_when_its_value_differs() {
    let own = Ipv6OnlyKey {
        ipv6: net6("fd00:10:244:5::/64"),
    };
    let backend = BackendConfig::HostGw;
    let moved = lease_attrs(v6("2001:db8::7"), &backend, None);
    let same = lease_attrs(v6("2001:db8::6"), &backend, None);
    let listing = [
        ttl_lease("fd00:10:244:5::-64", &same.to_json(), 11, 7),
        ttl_lease("fd00:10:244:6::-64", ME, 12, 8),
    ];
    assert_eq!(rewrite(PREFIX, &listing, own, &same), None);
    assert_eq!(rewrite(PREFIX, &listing, own, &moved), Some((7, 11)));
    let reserved = [ttl_lease("fd00:10:244:5::-64", ME, 13, 0)];
    assert_eq!(rewrite(PREFIX, &reserved, own, &moved), Some((0, 13)));
    // Gone: nothing to rewrite (the loop takes the subnet again).
    assert_eq!(rewrite(PREFIX, &listing[1..], own, &moved), None);
}

/// Issue 19: the address changed while the agent was down. Our key of the recorded subnet,
/// on the recorded TTL lease (or reserved) and naming a recorded address, is reused; not one
/// naming another address, on another TTL lease (ours expired and the node that got our old
/// address took the subnet), of another subnet, one an older key claims, nor an excluded or
/// out-of-range one.
#[test]
fn a_key_of_our_recorded_subnet_lease_and_address_is_reclaimed_after_a_restart() {
    let cfg = cfg();
    let prev = net6("fd00:10:244:5::/64");
    let rec = Recorded {
        subnet: prev,
        lease_id: 7,
        addrs: vec![v6("2001:db8::7"), v6("2001:db8::6")],
    };
    let ours = ttl_lease("fd00:10:244:5::-64", ME, 3, 7);
    let none = HashSet::new();
    let r = |listing: &[RawLease], rec: &Recorded| reclaim(&cfg, PREFIX, listing, rec, &none);
    let single = std::slice::from_ref(&ours);
    assert_eq!(
        r(single, &rec),
        Some(Decision::Reuse {
            key: Ipv6OnlyKey { ipv6: prev },
            lease_id: 7,
            mod_revision: 3,
            value: ME.as_bytes().to_vec(),
        })
    );
    let reserved = [ttl_lease("fd00:10:244:5::-64", ME, 3, 0)];
    assert!(matches!(
        r(&reserved, &rec),
        Some(Decision::Reuse { lease_id: 0, .. })
    ));
    let another_lease = [ttl_lease("fd00:10:244:5::-64", ME, 3, 8)];
    assert_eq!(r(&another_lease, &rec), None, "another node's TTL lease");
    let other_addr = Recorded {
        addrs: vec![v6("2001:db8::9")],
        ..rec.clone()
    };
    assert_eq!(r(single, &other_addr), None);
    let other_subnet = Recorded {
        subnet: net6("fd00:10:244:6::/64"),
        ..rec.clone()
    };
    assert_eq!(r(single, &other_subnet), None);
    let older = [
        lease(
            "10.244.5.0-24&fd00:10:244:5::-64",
            r#"{"PublicIP":"198.18.0.9","PublicIPv6":"2001:db8::9","BackendType":"host-gw"}"#,
            2,
        ),
        ours.clone(),
    ];
    assert_eq!(r(&older, &rec), None, "lost its race");
    let excluded = HashSet::from([prev]);
    assert_eq!(reclaim(&cfg, PREFIX, single, &rec, &excluded), None);
    // fd00:10:244::/64 is below IPv6SubnetMin (the first subnet is skipped).
    let low = [ttl_lease("fd00:10:244::-64", ME, 3, 7)];
    let low_rec = Recorded {
        subnet: net6("fd00:10:244::/64"),
        ..rec.clone()
    };
    assert_eq!(r(&low, &low_rec), None);
}

/// The state-dir record round-trips; anything else in it is refused (the caller warns).
#[test]
fn the_record_round_trips_and_refuses_garbage() {
    let rec = Recorded {
        subnet: net6("fd00:10:244:5::/64"),
        lease_id: 7,
        addrs: vec![v6("2001:db8::7"), v6("2001:db8::6")],
    };
    assert_eq!(Recorded::parse(&rec.render()), Some(rec.clone()));
    for bad in [
        "",
        "2001:db8::6\n",
        "subnet fd00:10:244:5::/64\nlease 7\n",
        "subnet fd00:10:244:5::/64\nlease x\naddress 2001:db8::6\n",
        "subnet fd00:10:244:5::/64\nlease 7\naddress 2001:db8::6\nother 1\n",
    ] {
        assert_eq!(Recorded::parse(bad), None, "{bad:?}");
    }
}

/// H1: a MAC is public in every lease and cloned VMs share one: another node's key (another
/// `PublicIPv6`) carrying our device's VTEP MAC is neither reused nor removed as ours.
#[test]
fn another_nodes_key_with_our_vtep_mac_is_neither_reused_nor_removed() {
    let cfg = cfg();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let theirs = r#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::6","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:00:66"}}"#;
    let dual = r#"{"PublicIP":"198.18.0.9","PublicIPv6":"2001:db8::6","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:66"},"BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:00:66"}}"#;
    let listing = [
        ttl_lease("fd00:10:244:5::-64", theirs, 3, 7),
        ttl_lease("10.244.6.0-24&fd00:10:244:6::-64", dual, 4, 8),
    ];
    let none = HashSet::new();
    for previous in [None, Some(net6("fd00:10:244:5::/64"))] {
        let d = decide(
            &cfg,
            PREFIX,
            &listing,
            v6("2001:db8::7"),
            previous,
            &none,
            &mut rng,
        )
        .unwrap();
        assert!(
            matches!(d, Decision::Take(s) if s != net6("fd00:10:244:5::/64") && s != net6("fd00:10:244:6::/64")),
            "{previous:?}: {d:?}"
        );
    }
}

/// H2: a move changes only the address; a non-vxlan `BackendV6Data` (wireguard's key and
/// port) survives it.
#[test]
fn a_move_keeps_any_backend_v6_data() {
    let wg = LeaseAttrs::parse(
        br#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::6","BackendType":"wireguard","BackendV6Data":{"PublicKey":"k0ySxNoDa8ZLfT1WNm6DPQn5VvGSVjGvWMz4EG0zsAk=","Port":51821}}"#,
    )
    .unwrap();
    let moved = with_public_ipv6(&wg, v6("2001:db8::7"));
    assert_eq!(moved.public_ipv6, Some(v6("2001:db8::7")));
    assert_eq!(moved.backend_type, wg.backend_type);
    let data = moved
        .backend_v6_data
        .as_ref()
        .expect("BackendV6Data kept")
        .get();
    assert!(
        data.contains(r#""PublicKey":"k0ySxNoDa8ZLfT1WNm6DPQn5VvGSVjGvWMz4EG0zsAk=""#),
        "{data}"
    );
    assert!(data.contains(r#""Port":51821"#), "{data}");
}

/// A peer whose subnet holds one of this node's addresses (our own old key after a wiped state
/// dir, its subnet still on the pod bridge) is not routed; the others are.
#[test]
fn a_peer_subnet_with_a_local_address_is_not_routed() {
    let peer = |key: &str, subnet: &str, ip: &str| Peer {
        key: key.to_string(),
        peer: Ipv6OnlyPeer {
            subnet: net6(subnet),
            public_ipv6: v6(ip),
        },
        attrs: LeaseAttrs::parse(ME.as_bytes()).unwrap(),
    };
    let peers = vec![
        peer("a", "fd00:10:244:1f::/64", "2001:db8::6"),
        peer("b", "fd00:10:244:20::/64", "2001:db8::9"),
    ];
    let (kept, here) = not_local(peers, &[v6("fd00:10:244:1f::1"), v6("2001:db8::7")]);
    assert_eq!(
        kept.iter().map(|p| p.key.as_str()).collect::<Vec<_>>(),
        ["b"]
    );
    assert_eq!(here, vec![("a".to_string(), net6("fd00:10:244:1f::/64"))]);
}

/// Without the state-dir record the vxlan MAC is kept only while no key naming another
/// address shows it (rev37e M1).
#[test]
fn a_mac_is_kept_without_the_record_only_when_no_other_address_shows_it() {
    let mac: MacAddr = "02:00:00:00:00:77".parse().unwrap();
    let ours: Ipv6Addr = "fd00:198:18::1".parse().unwrap();
    let lease = |ip6: &str, m: &str| {
        RawLease {
        key: format!("/coreos.com/network/subnets/{ip6}"),
        value: format!(
            r#"{{"PublicIP":"0.0.0.0","PublicIPv6":"{ip6}","BackendType":"vxlan","BackendV6Data":{{"VNI":1,"VtepMAC":"{m}"}}}}"#
        )
        .into_bytes(),
        lease_id: 1,
        mod_revision: 1,
        create_revision: 1,
    }
    };
    let mine = lease("fd00:198:18::1", "02:00:00:00:00:77");
    let other_mac = lease("fd00:198:18::9", "02:00:00:00:00:78");
    let old_or_theirs = lease("fd00:198:18::9", "02:00:00:00:00:77");
    let junk = RawLease {
        value: b"{not json".to_vec(),
        ..mine.clone()
    };
    assert!(mac_free_but_ours(&[], mac, ours));
    assert!(mac_free_but_ours(
        &[mine.clone(), other_mac.clone(), junk],
        mac,
        ours
    ));
    assert!(!mac_free_but_ours(
        &[mine, other_mac, old_or_theirs],
        mac,
        ours
    ));
}
