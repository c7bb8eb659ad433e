use super::*;

fn cfg() -> WgV6Config {
    WgV6Config {
        network: "fd00:10:244::/56".parse().unwrap(),
        listen_port: 51821,
        underlay_mtu: 1500,
        mtu_base: 0,
        psk: Some([9; 32]),
        keepalive: 25,
        private_key: PrivateKey::from_bytes([1; 32]),
        queues: 1,
    }
}

fn peer(n: u8, key: u8) -> WgPeer6 {
    WgPeer6 {
        subnet: format!("fd00:10:244:{n}::/64").parse().unwrap(),
        public_ipv6: format!("2001:db8::{n}").parse().unwrap(),
        public_key: PrivateKey::from_bytes([key; 32]).public(),
        port: 51821,
    }
}

const OWN: &str = "fd00:10:244:1::/64";
const OWN_IP: &str = "2001:db8::1";

#[test]
fn each_peer_is_one_entry_for_its_own_subnet_at_its_ipv6_endpoint_under_a_key_of_its_own() {
    let (entries, skipped) = plan_peers(
        &cfg(),
        OWN.parse().unwrap(),
        OWN_IP.parse().unwrap(),
        &[peer(2, 2), peer(3, 3)],
    );
    assert!(skipped.is_empty(), "{skipped:?}");
    assert_eq!(entries.len(), 2);
    for (i, spec) in entries.iter().enumerate() {
        let n = i + 2;
        assert_eq!(
            spec.allowed_ips,
            vec![IpNetwork::V6(
                format!("fd00:10:244:{n}::/64").parse().unwrap()
            )]
        );
        assert_eq!(
            spec.endpoint,
            Some(format!("[2001:db8::{n}]:51821").parse().unwrap())
        );
        assert_eq!((spec.psk, spec.keepalive), (Some([9; 32]), 25));
    }
    let keys = assign_keys(&BTreeMap::new(), &entries);
    assert!(keys.values().all(|k| keys_block().contains(*k)), "{keys:?}");
    assert_eq!(keys.len(), 2);
    assert_ne!(
        keys[&entries[0].public_key], keys[&entries[1].public_key],
        "two peers under one key"
    );
    assert_eq!(cfg().mtu(), 1420);
}

#[test]
fn ours_a_stolen_key_an_overlap_and_unusable_endpoints_are_left_out_naming_why() {
    let mut own_key = peer(4, 1);
    own_key.public_key = cfg().public_key();
    let mut link_local = peer(5, 5);
    link_local.public_ipv6 = "fe80::5".parse().unwrap();
    let mut outside = peer(6, 6);
    outside.subnet = "fd00:99::/64".parse().unwrap();
    let mut overlap = peer(7, 7);
    overlap.subnet = "fd00:10:244:2::/64".parse().unwrap();
    overlap.public_ipv6 = "2001:db8::7".parse().unwrap();
    let same_key = peer(8, 2);
    let mut at_our_ip = peer(9, 9);
    at_our_ip.public_ipv6 = OWN_IP.parse().unwrap();
    let (entries, skipped) = plan_peers(
        &cfg(),
        OWN.parse().unwrap(),
        OWN_IP.parse().unwrap(),
        &[
            peer(2, 2),
            peer(1, 11),
            own_key,
            link_local,
            outside,
            overlap,
            same_key,
            at_our_ip,
        ],
    );
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].public_key, peer(2, 2).public_key);
    let why: Vec<&str> = skipped.iter().map(|(_, w)| w.as_str()).collect();
    assert_eq!(why.len(), 7, "{why:?}");
    for want in [
        "it is this node",
        "this node's public key",
        "link-local",
        "outside fd00:10:244::/56",
        "overlaps an older lease's",
        "an older lease's",
    ] {
        assert!(why.iter().any(|w| w.contains(want)), "{want}: {why:?}");
    }
}

#[test]
fn a_packet_is_sealed_only_for_the_lease_whose_subnet_holds_its_destination() {
    let (entries, _) = plan_peers(
        &cfg(),
        OWN.parse().unwrap(),
        OWN_IP.parse().unwrap(),
        &[peer(2, 2), peer(3, 3)],
    );
    let key = PrivateKey::from_bytes([1; 32]);
    let next = Published::default().next(*key.bytes(), 51821, entries.clone());
    let keyed: Vec<(PeerSpec, Option<Ipv4Addr>)> = next
        .keyed
        .iter()
        .map(|(s, k)| (s.clone(), Some(*k)))
        .collect();
    let table = WgTable::new(&key).update_keyed(&key, &keyed);
    let dst = |n: u8| format!("fd00:10:244:{n}::5").parse().unwrap();
    for (i, (spec, k)) in next.keyed.iter().enumerate() {
        let own = dst(i as u8 + 2);
        let other = dst(if i == 0 { 3 } else { 2 });
        let sealed_for = table.route(*k, own).map(|p| p.spec.public_key);
        assert_eq!(sealed_for, Some(spec.public_key), "entry {i}");
        // Another lease's destination under this key: no entry, so dropped, never sealed
        // for the wrong peer.
        assert!(table.route(*k, other).is_none(), "entry {i} took {other}");
        assert!(
            table.route(*k, dst(9)).is_none(),
            "entry {i} took a stranger's"
        );
    }
}

#[test]
fn a_reordered_listing_keeps_every_peer_under_its_key_and_routable() {
    let plan = |peers: &[WgPeer6]| {
        plan_peers(&cfg(), OWN.parse().unwrap(), OWN_IP.parse().unwrap(), peers).0
    };
    let key = PrivateKey::from_bytes([1; 32]);
    let mut published = Published::default();
    let first = published.next(*key.bytes(), 51821, plan(&[peer(2, 2), peer(3, 3)]));
    assert!(first.publish);
    let table = |next: &Next| {
        let keyed: Vec<(PeerSpec, Option<Ipv4Addr>)> = next
            .keyed
            .iter()
            .map(|(s, k)| (s.clone(), Some(*k)))
            .collect();
        WgTable::new(&key).update_keyed(&key, &keyed)
    };
    let mut workers = table(&first);
    published.commit(first);
    // The same leases listed the other way round (one deleted and taken again).
    let second = published.next(*key.bytes(), 51821, plan(&[peer(3, 3), peer(2, 2)]));
    if second.publish {
        workers = table(&second);
    }
    // The subnet→key map the workers get from this listing.
    for p in peers6(&second.keyed) {
        let dst = std::net::IpAddr::V6(p.subnet.network());
        let found = workers
            .route(p.public_ip, dst)
            .map(|s| s.spec.allowed_ips.clone());
        assert_eq!(
            found,
            Some(vec![IpNetwork::V6(p.subnet)]),
            "{} under {} after a re-ordered listing",
            p.subnet,
            p.public_ip
        );
    }
    assert!(
        !second.publish,
        "a re-ordered listing republished: {second:?}"
    );
    published.commit(second);

    // A middle peer going keeps the others' keys; a new one takes the freed key.
    let three = published.next(
        *key.bytes(),
        51821,
        plan(&[peer(2, 2), peer(3, 3), peer(4, 4)]),
    );
    let keys_of = |n: &Next| -> Vec<(PublicKey, Ipv4Addr)> {
        n.keyed.iter().map(|(s, k)| (s.public_key, *k)).collect()
    };
    let before = keys_of(&three);
    published.commit(three);
    let without = published.next(*key.bytes(), 51821, plan(&[peer(2, 2), peer(4, 4)]));
    assert!(without.publish);
    for (k, addr) in keys_of(&without) {
        assert!(before.contains(&(k, addr)), "{k} moved to {addr}");
    }
    published.commit(without);
    let again = published.next(
        *key.bytes(),
        51821,
        plan(&[peer(5, 5), peer(2, 2), peer(4, 4)]),
    );
    let freed = before[1].1;
    assert_eq!(
        keys_of(&again)[0],
        (peer(5, 5).public_key, freed),
        "the new peer takes the freed key"
    );
}

#[test]
fn an_mtu_below_ipv6s_minimum_is_refused_naming_it() {
    assert_eq!(check_mtu6(0, 1500).unwrap(), 1420);
    assert_eq!(check_mtu6(1360, 9000).unwrap(), 1280);
    let e = check_mtu6(1359, 1500).unwrap_err();
    assert!(
        matches!(
            e,
            WgError::Mtu6 {
                mtu: 1279,
                base: 1359
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("1280"), "{e}");
    assert!(matches!(
        check_mtu6(0, 1300),
        Err(WgError::Mtu6 {
            mtu: 1220,
            base: 1300
        })
    ));
}
