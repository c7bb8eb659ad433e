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
    for (i, (spec, key)) in entries.iter().enumerate() {
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
        assert!(keys().contains(*key), "{key}");
    }
    assert_ne!(entries[0].1, entries[1].1, "two peers under one key");
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
    assert_eq!(entries[0].0.public_key, peer(2, 2).public_key);
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
    let keyed: Vec<(PeerSpec, Option<Ipv4Addr>)> =
        entries.iter().map(|(s, k)| (s.clone(), Some(*k))).collect();
    let key = PrivateKey::from_bytes([1; 32]);
    let table = WgTable::new(&key).update_keyed(&key, &keyed);
    let dst = |n: u8| format!("fd00:10:244:{n}::5").parse().unwrap();
    for (i, (spec, k)) in entries.iter().enumerate() {
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
