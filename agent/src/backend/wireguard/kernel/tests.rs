use super::*;
use crate::backend::wireguard::plan::device_spec;
use crate::backend::wireguard::PrivateKey;
use ipnetwork::Ipv4Network;
use std::net::{Ipv4Addr, SocketAddrV4};

const DEV: &str = "tweed-wg";

fn key(n: u8) -> PublicKey {
    PrivateKey::from_bytes([n; 32]).public()
}

fn peer(n: u8, ip: [u8; 4], port: u16) -> PeerSpec {
    PeerSpec {
        public_key: key(n),
        endpoint: Some(SocketAddrV4::new(ip.into(), port).into()),
        allowed_ips: vec![format!("10.5.{n}.0/24").parse().unwrap()],
        psk: None,
        keepalive: 0,
    }
}

/// With a clamped key, as every key tweed generates is; the unclamped case has its own test.
fn desired(peers: Vec<PeerSpec>) -> DeviceSpec {
    device_spec(clamp([7; 32]), 51820, peers)
}

/// The kernel clamps the private key it is given and reads it back clamped: a key file holding
/// an unclamped key (written by another tool) must not make every pass rewrite the key.
#[test]
fn an_unclamped_private_key_is_written_once() {
    let mut fake = FakeGenl::new(DEV);
    let want = device_spec([7; 32], 51820, vec![peer(1, [192, 0, 2, 1], 51820)]);
    let (ops, _) = reconcile(&mut fake, DEV, &want).unwrap();
    assert_eq!(ops.len(), 2, "{ops:?}");
    assert_eq!(fake.private_key, Some(clamp([7; 32])));
    let (ops, seen) = reconcile(&mut fake, DEV, &want).unwrap();
    assert!(ops.is_empty(), "{ops:?}");
    assert_eq!(seen.spec.private_key, Some(clamp([7; 32])));
    // Same key for X25519: the public key is unchanged by clamping.
    assert_eq!(
        PrivateKey::from_bytes([7; 32]).public(),
        PrivateKey::from_bytes(clamp([7; 32])).public()
    );
}

/// Every message must survive the wire: emitted as a generic netlink message and parsed back
/// by the crate's own parser, it is the same message.
fn wire_roundtrip(m: &WireguardMessage) -> WireguardMessage {
    let mut g = GenlMessage::from_payload(m.clone());
    g.set_resolved_family_id(0x1f);
    g.finalize();
    let mut nl = NetlinkMessage::from(g);
    nl.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    nl.finalize();
    let mut buf = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut buf);
    match NetlinkMessage::<GenlMessage<WireguardMessage>>::deserialize(&buf)
        .expect("parses")
        .payload
    {
        NetlinkPayload::InnerMessage(g) => g.payload,
        other => panic!("not a wireguard message: {other:?}"),
    }
}

#[test]
fn set_peer_carries_every_field_and_replaces_allowed_ips() {
    let mut p = peer(1, [192, 0, 2, 1], 51820);
    p.psk = Some([9; 32]);
    p.keepalive = 25;
    p.allowed_ips.push("10.5.200.0/24".parse().unwrap());
    let msgs = messages(DEV, &[WgOp::SetPeer(p.clone())]);
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(m.cmd, WireguardCmd::SetDevice);
    assert_eq!(m.attributes[0], WireguardAttribute::IfName(DEV.into()));
    let WireguardAttribute::Peers(peers) = &m.attributes[1] else {
        panic!("no peers: {m:?}")
    };
    let attrs = &peers[0].0;
    assert!(attrs.contains(&WireguardPeerAttribute::PublicKey(key(1).0)));
    assert!(attrs.contains(&WireguardPeerAttribute::PresharedKey([9; 32])));
    assert!(attrs.contains(&WireguardPeerAttribute::PersistentKeepalive(25)));
    assert!(attrs.contains(&WireguardPeerAttribute::Endpoint(
        "192.0.2.1:51820".parse().unwrap()
    )));
    assert!(attrs.contains(&WireguardPeerAttribute::Flags(
        WireguardPeerFlags::ReplaceAllowedIps
    )));
    let ips = attrs
        .iter()
        .find_map(|a| match a {
            WireguardPeerAttribute::AllowedIps(v) => Some(v),
            _ => None,
        })
        .unwrap();
    assert_eq!(ips.len(), 2);
    assert!(ips[1].0.contains(&WireguardAllowedIpAttr::IpAddr(
        "10.5.200.0".parse().unwrap()
    )));
    assert!(ips[1].0.contains(&WireguardAllowedIpAttr::Cidr(24)));
    assert_eq!(&wire_roundtrip(m), m);
}

#[test]
fn a_peer_without_psk_gets_the_zero_key_which_clears_one() {
    let msgs = messages(DEV, &[WgOp::SetPeer(peer(1, [192, 0, 2, 1], 1))]);
    let WireguardAttribute::Peers(peers) = &msgs[0].attributes[1] else {
        panic!()
    };
    assert!(peers[0]
        .0
        .contains(&WireguardPeerAttribute::PresharedKey([0; 32])));
}

#[test]
fn remove_and_device_ops_translate() {
    let msgs = messages(
        DEV,
        &[
            WgOp::SetDevice {
                private_key: [3; 32],
                listen_port: 51999,
            },
            WgOp::RemovePeer(key(4)),
        ],
    );
    assert_eq!(
        msgs[0].attributes,
        vec![
            WireguardAttribute::IfName(DEV.into()),
            WireguardAttribute::PrivateKey([3; 32]),
            WireguardAttribute::ListenPort(51999),
        ]
    );
    assert_eq!(
        msgs[1].attributes[1],
        WireguardAttribute::Peers(vec![WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey(key(4).0),
            WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
        ])])
    );
    for m in &msgs {
        assert_eq!(&wire_roundtrip(m), m);
    }
}

#[test]
fn reconcile_writes_then_nothing_when_unchanged() {
    let mut fake = FakeGenl::new(DEV);
    let want = desired(vec![
        peer(1, [192, 0, 2, 1], 51820),
        peer(2, [192, 0, 2, 2], 51820),
        peer(3, [192, 0, 2, 3], 51820),
    ]);
    let (ops, _) = reconcile(&mut fake, DEV, &want).unwrap();
    assert_eq!(ops.len(), 4, "{ops:?}");
    assert_eq!(fake.writes, 4);
    // Read back through a dump split over several messages, the device is what was planned.
    let (ops, seen) = reconcile(&mut fake, DEV, &want).unwrap();
    assert!(ops.is_empty(), "{ops:?}");
    assert_eq!(fake.writes, 4, "an unchanged device got writes");
    assert_eq!(seen.spec, want);
}

#[test]
fn reconcile_updates_removes_and_rotates() {
    let mut fake = FakeGenl::new(DEV);
    let mut want = desired(vec![
        peer(1, [192, 0, 2, 1], 51820),
        peer(2, [192, 0, 2, 2], 51820),
    ]);
    reconcile(&mut fake, DEV, &want).unwrap();
    let before = fake.writes;
    // Peer 2 gets a PSK and keepalive, peer 1 leaves, peer 5 takes over 10.5.1.0/24.
    want.peers.remove(&key(1));
    let p2 = want.peers.get_mut(&key(2)).unwrap();
    p2.psk = Some([8; 32]);
    p2.keepalive = 15;
    let mut p5 = peer(5, [192, 0, 2, 1], 51820);
    p5.allowed_ips = vec!["10.5.1.0/24".parse().unwrap()];
    want.peers.insert(key(5), p5);
    let (ops, _) = reconcile(&mut fake, DEV, &want).unwrap();
    assert_eq!(ops.len(), 3, "{ops:?}");
    assert_eq!(fake.writes, before + 3);
    let (ops, seen) = reconcile(&mut fake, DEV, &want).unwrap();
    assert!(ops.is_empty(), "{ops:?}");
    assert_eq!(seen.spec, want);
    // Clearing the PSK again reaches the device (zero key), not just the plan.
    want.peers.get_mut(&key(2)).unwrap().psk = None;
    reconcile(&mut fake, DEV, &want).unwrap();
    let p = fake
        .peers
        .iter()
        .find(|p| p.public_key == key(2).0)
        .unwrap();
    assert_eq!(p.psk, [0; 32]);
}

#[test]
fn a_roamed_endpoint_is_set_back_from_the_lease() {
    let mut fake = FakeGenl::new(DEV);
    let want = desired(vec![peer(1, [192, 0, 2, 1], 51820)]);
    reconcile(&mut fake, DEV, &want).unwrap();
    // The kernel moved the endpoint to the last authenticated source.
    fake.peers[0].endpoint = Some("198.51.100.7:40000".parse().unwrap());
    let (ops, seen) = reconcile(&mut fake, DEV, &want).unwrap();
    assert_eq!(
        seen.stats[0].endpoint,
        Some("198.51.100.7:40000".parse().unwrap())
    );
    assert_eq!(ops, vec![WgOp::SetPeer(peer(1, [192, 0, 2, 1], 51820))]);
    assert_eq!(
        fake.peers[0].endpoint,
        Some("192.0.2.1:51820".parse().unwrap())
    );
}

#[test]
fn foreign_allowed_ips_make_the_peer_rewritten() {
    let mut fake = FakeGenl::new(DEV);
    let want = desired(vec![peer(1, [192, 0, 2, 1], 51820)]);
    reconcile(&mut fake, DEV, &want).unwrap();
    // Someone (wg set) added an IPv6 allowed IP the plan does not hold.
    fake.peers[0].allowed.push(("fd00::".parse().unwrap(), 64));
    let (ops, _) = reconcile(&mut fake, DEV, &want).unwrap();
    assert_eq!(ops.len(), 1, "{ops:?}");
    assert_eq!(
        fake.peers[0].allowed.len(),
        1,
        "{:?}",
        fake.peers[0].allowed
    );
    let (ops, _) = reconcile(&mut fake, DEV, &want).unwrap();
    assert!(ops.is_empty());
}

#[test]
fn stats_read_back_handshake_age_and_bytes() {
    let mut fake = FakeGenl::new(DEV);
    reconcile(
        &mut fake,
        DEV,
        &desired(vec![
            peer(1, [192, 0, 2, 1], 51820),
            peer(2, [192, 0, 2, 2], 51820),
        ]),
    )
    .unwrap();
    let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
    fake.peers[0].last_handshake = (1_000_000 - 42, 500_000_000);
    fake.peers[0].rx = 1234;
    fake.peers[0].tx = 5678;
    // A handshake "in the future" (clock stepped back) is just now, not an error.
    fake.peers[1].last_handshake = (1_000_000 + 60, 0);
    let seen = parse_device(&fake.get_device(DEV).unwrap(), now);
    let s1 = seen.stats.iter().find(|s| s.public_key == key(1)).unwrap();
    assert_eq!(s1.last_handshake, Some(Duration::from_millis(41_500)));
    assert_eq!((s1.rx_bytes, s1.tx_bytes), (1234, 5678));
    assert_eq!(s1.subnet, Some("10.5.1.0/24".parse().unwrap()));
    let s2 = seen.stats.iter().find(|s| s.public_key == key(2)).unwrap();
    assert_eq!(s2.last_handshake, Some(Duration::ZERO));
    fake.peers[1].last_handshake = (0, 0);
    let seen = parse_device(&fake.get_device(DEV).unwrap(), now);
    let s2 = seen.stats.iter().find(|s| s.public_key == key(2)).unwrap();
    assert_eq!(s2.last_handshake, None, "never handshaken");
    // A time no clock reaches (a corrupt or hostile reply): no handshake, no overflow panic.
    fake.peers[1].last_handshake = (i64::MAX, i64::MAX);
    let seen = parse_device(&fake.get_device(DEV).unwrap(), now);
    let s2 = seen.stats.iter().find(|s| s.public_key == key(2)).unwrap();
    assert_eq!(s2.last_handshake, None);
}

#[test]
fn a_peer_split_over_dump_messages_is_merged() {
    let part = |ips: &[&str]| WireguardMessage {
        cmd: WireguardCmd::GetDevice,
        attributes: vec![WireguardAttribute::Peers(vec![WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey(key(1).0),
            WireguardPeerAttribute::AllowedIps(
                ips.iter()
                    .map(|s| {
                        let n: Ipv4Network = s.parse().unwrap();
                        WireguardAllowedIp(vec![
                            WireguardAllowedIpAttr::IpAddr(IpAddr::V4(n.ip())),
                            WireguardAllowedIpAttr::Cidr(n.prefix()),
                        ])
                    })
                    .collect(),
            ),
        ])])],
    };
    // The second part also carries a non-canonical address (host bits set).
    let seen = parse_device(
        &[part(&["10.5.2.0/24"]), part(&["10.5.1.9/24"])],
        SystemTime::now(),
    );
    assert_eq!(
        seen.spec.peers[&key(1)].allowed_ips,
        vec![
            "10.5.1.0/24".parse::<IpNetwork>().unwrap(),
            "10.5.2.0/24".parse().unwrap()
        ]
    );
    assert_eq!(seen.stats.len(), 1);
}

#[test]
fn crafted_replies_do_not_panic() {
    // Garbage and truncated bytes in place of a kernel reply: an error, never a panic.
    let good = {
        let mut g = GenlMessage::from_payload(
            messages(DEV, &[WgOp::SetPeer(peer(1, [192, 0, 2, 1], 1))])[0].clone(),
        );
        g.set_resolved_family_id(0x1f);
        g.finalize();
        let mut nl = NetlinkMessage::from(g);
        nl.finalize();
        let mut b = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut b);
        b
    };
    for cut in 0..good.len() {
        let _ = NetlinkMessage::<GenlMessage<WireguardMessage>>::deserialize(&good[..cut]);
    }
    let mut bad = good.clone();
    for i in 20..bad.len() {
        bad[i] = bad[i].wrapping_mul(31).wrapping_add(7);
        let _ = NetlinkMessage::<GenlMessage<WireguardMessage>>::deserialize(&bad);
    }
    // A reply with a peer missing its key and an allowed IP missing its prefix is skipped.
    let seen = parse_device(
        &[WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::Peers(vec![
                WireguardPeer(vec![WireguardPeerAttribute::RxBytes(1)]),
                WireguardPeer(vec![
                    WireguardPeerAttribute::PublicKey(key(2).0),
                    WireguardPeerAttribute::AllowedIps(vec![WireguardAllowedIp(vec![
                        WireguardAllowedIpAttr::IpAddr(IpAddr::V4(Ipv4Addr::new(10, 5, 2, 0))),
                    ])]),
                ]),
            ])],
        }],
        SystemTime::now(),
    );
    assert_eq!(seen.spec.peers.len(), 1);
    assert!(seen.spec.peers[&key(2)].allowed_ips.is_empty());
}

struct FakeProbe {
    result: Result<(), String>,
    calls: usize,
}

impl KernelProbe for FakeProbe {
    fn probe(&mut self) -> Result<(), String> {
        self.calls += 1;
        self.result.clone()
    }
}

#[test]
fn auto_takes_the_kernel_only_when_the_probe_succeeds() {
    let mut yes = FakeProbe {
        result: Ok(()),
        calls: 0,
    };
    let mut no = FakeProbe {
        result: Err("Operation not supported".into()),
        calls: 0,
    };
    assert_eq!(choose(WgImpl::Auto, &mut yes).unwrap(), WgImpl::Kernel);
    assert_eq!(choose(WgImpl::Auto, &mut no).unwrap(), WgImpl::Userspace);
    assert_eq!(choose(WgImpl::Kernel, &mut yes).unwrap(), WgImpl::Kernel);
    let err = choose(WgImpl::Kernel, &mut no).unwrap_err().to_string();
    assert!(
        err.contains("kernel") && err.contains("Operation not supported"),
        "{err}"
    );
    let calls = no.calls;
    assert_eq!(
        choose(WgImpl::Userspace, &mut no).unwrap(),
        WgImpl::Userspace
    );
    assert_eq!(no.calls, calls, "userspace must not probe");
}
