//! Root-only: the udp backend end to end, real `tweedd` agents in namespaces (see
//! `backend_common`). One cluster per test; three hosts, the third on a routed segment (udp, like
//! vxlan, does not need a shared L2 segment).

mod backend_common;

use std::net::Ipv4Addr;
use std::time::Duration;

use backend_common::*;

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"udp"}}"#;
const ALL_PAIRS: &[(usize, usize)] = &[(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)];

/// An IPv4/UDP packet from `src` to `dst:port` (checksum 0: allowed for UDP over IPv4).
fn inner_udp(src: Ipv4Addr, dst: Ipv4Addr, port: u16, payload: &[u8]) -> Vec<u8> {
    let total = 28 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let mut sum: u32 = 0;
    for c in p[..20].chunks(2) {
        sum += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&port.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

#[test]
fn udp_all_pairs_mtu_and_device() {
    require_root!(NEEDS_ROOT);
    let c = Cluster::up("u1", CONFIG, &[0, 0, 1]);
    c.assert_all_pairs(ALL_PAIRS, Duration::from_secs(10));
    for h in &c.hosts {
        assert_eq!(h.env.as_ref().unwrap().mtu, 1472, "underlay 1500 - 28");
        let link = ip_in(&h.ns, &["-d", "link", "show", "tweed0"]);
        assert!(link.contains("mtu 1472") && link.contains("tun"), "{link}");
        // No IPv6 on the device: the kernel's router solicitations would land in the workers.
        let v6 = ip_in(&h.ns, &["-6", "addr", "show", "dev", "tweed0"]);
        assert!(!v6.contains("inet6"), "{v6}");
        let r = c
            .route_to(0, "10.244.0.0/16")
            .expect("overlay route via tweed0");
        assert_eq!(r["dev"], "tweed0");
    }
    // Large packets (fragmenting is the kernel's job before the TUN device) and TCP.
    let to = c.hosts[1].pod_ip().to_string();
    in_ns(
        &c.hosts[0].pod_ns,
        &["ping", "-c", "2", "-s", "1444", "-M", "do", &to],
    );
    let (ok, out) = probe_in(
        &c.hosts[0].pod_ns,
        &["ping", "-c", "1", "-s", "1445", "-M", "do", &to],
    );
    assert!(!ok, "1445 + 28 bytes must not fit the pod MTU 1472: {out}");
}

#[test]
fn udp_spoofed_and_foreign_packets_never_reach_a_pod() {
    require_root!(NEEDS_ROOT);
    let mut c = Cluster::up("u2", CONFIG, &[0, 0, 0]);
    c.assert_all_pairs(&[(1, 0), (2, 0)], Duration::from_secs(10));
    let h1 = c.hosts[0].clone();
    let h2 = c.hosts[1].clone();
    let h3 = c.hosts[2].clone();
    let pod_port = 7777;
    let listener = udp_socket_in(&h1.pod_ns, &format!("{}:{pod_port}", h1.pod_ip()));
    listener
        .set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let target = format!("{}:8285", h1.public_ip);
    let recv = |what: &str| -> Option<String> {
        let mut buf = [0u8; 2048];
        match listener.recv_from(&mut buf) {
            Ok((n, _)) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => {
                let _ = what;
                None
            }
        }
    };

    // 1. From a namespace on the underlay that is no peer, claiming to be h2's pod.
    let stranger = c.add_stranger("x", 0, "198.18.0.50".parse().unwrap());
    let s = udp_socket_in(&stranger, "198.18.0.50:8285");
    for _ in 0..5 {
        s.send_to(
            &inner_udp(h2.pod_ip(), h1.pod_ip(), pod_port, b"spoof-stranger"),
            &target,
        )
        .unwrap();
    }
    assert_eq!(
        recv("stranger"),
        None,
        "a non-peer's packet reached the pod"
    );

    // 2. From a real peer's address and agent port (forged with a raw socket: h2's agent holds
    // the port), but with an inner source outside that peer's subnet.
    let raw = RawUdp::new_in(&h2.ns);
    let h2_agent = std::net::SocketAddrV4::new(h2.public_ip, 8285);
    let to_h1 = std::net::SocketAddrV4::new(h1.public_ip, 8285);
    for _ in 0..5 {
        raw.send(
            h2_agent,
            to_h1,
            &inner_udp(h3.pod_ip(), h1.pod_ip(), pod_port, b"spoof-inner"),
        );
    }
    assert_eq!(
        recv("inner"),
        None,
        "a packet with a spoofed inner source reached the pod"
    );

    // 3. Garbage from the peer's agent port: truncated, oversized header claims, not IPv4.
    let good = inner_udp(h2.pod_ip(), h1.pod_ip(), pod_port, b"legit");
    let mut not_v4 = good.clone();
    not_v4[0] = 0x60;
    let mut lying_len = good.clone();
    lying_len[2..4].copy_from_slice(&9000u16.to_be_bytes());
    for junk in [
        &good[..10],
        &not_v4[..],
        &lying_len[..],
        &[][..],
        &[0x45; 1400][..],
    ] {
        raw.send(h2_agent, to_h1, junk);
    }
    assert_eq!(recv("junk"), None);

    // 4. A well-formed packet from the peer's address but another port (any process on h2, or
    // a pod masqueraded to h2's address).
    let from_h2 = udp_socket_in(&h2.ns, &format!("{}:0", h2.public_ip));
    for _ in 0..5 {
        from_h2.send_to(&good, &target).unwrap();
    }
    assert_eq!(
        recv("wrong port"),
        None,
        "a packet from the peer's address but not its agent port reached the pod"
    );

    // Control: the same packet from the peer's agent port is delivered (the listener works).
    raw.send(h2_agent, to_h1, &good);
    assert_eq!(recv("legit").as_deref(), Some("legit"));

    // The drops are counted and reported.
    wait_for(
        Duration::from_secs(5),
        "the drop report in h1's log",
        || {
            // The reporter logs once a second: wait for the line with every count in it.
            h1.log_text().lines().any(|l| {
                l.contains("udp: dropped packets")
                    && l.contains("unknown_peer=5")
                    && l.contains("wrong_port=5")
                    && l.contains("spoofed_inner_source=5")
            })
        },
    );
    // The data plane still works after all that.
    c.assert_all_pairs(&[(1, 0), (0, 2)], Duration::from_secs(5));
}

#[test]
fn udp_unknown_destination_gets_net_unreachable() {
    require_root!(NEEDS_ROOT);
    let c = Cluster::up("u3", CONFIG, &[0, 0]);
    c.assert_all_pairs(&[(0, 1)], Duration::from_secs(10));
    // Several probes with a 2 s wait: once, under a loaded CI run, a single 1 s probe saw no
    // answer at all (cause not found yet; see the closing note of issue 3).
    let (ok, out) = probe_in(
        &c.hosts[0].pod_ns,
        &[
            "ping",
            "-n",
            "-c",
            "4",
            "-i",
            "0.5",
            "-W",
            "2",
            "10.244.250.9",
        ],
    );
    assert!(!ok);
    assert!(out.contains("Destination Net Unreachable"), "{out}");
    // From the overlay's network address (see PeerTable::icmp_source).
    assert!(out.contains("From 10.244.0.0"), "{out}");
}

#[test]
fn udp_peer_leaving_removes_its_entry() {
    require_root!(NEEDS_ROOT);
    let mut c = Cluster::up("u4", CONFIG, &[0, 0, 0]);
    c.assert_all_pairs(&[(0, 1), (0, 2)], Duration::from_secs(10));
    let gone = c.hosts[2].clone();
    // The node goes away for good: agent stopped, then its lease deleted (as expiry would).
    c.stop_agent(2, libc::SIGTERM);
    let key = format!(
        "/coreos.com/network/subnets/{}-{}",
        gone.subnet().network(),
        gone.subnet().prefix()
    );
    c.etcdctl(&["del", &key]);
    wait_for(
        Duration::from_secs(5),
        "h1 to answer net-unreachable for the gone peer",
        || {
            let (_, out) = probe_in(
                &c.hosts[0].pod_ns,
                &[
                    "ping",
                    "-n",
                    "-c",
                    "1",
                    "-W",
                    "1",
                    &gone.pod_ip().to_string(),
                ],
            );
            out.contains("Destination Net Unreachable")
        },
    );
    // The others are unaffected.
    c.assert_all_pairs(&[(0, 1), (1, 0)], Duration::from_secs(5));
}

#[test]
fn udp_agent_restart_recovers_within_a_second() {
    require_root!(NEEDS_ROOT);
    let mut c = Cluster::up("u5", CONFIG, &[0, 0]);
    c.assert_all_pairs(&[(0, 1)], Duration::from_secs(10));
    let from = c.hosts[0].pod_ns.clone();
    let to = c.hosts[1].pod_ip();
    let pinger = std::thread::spawn(move || ping_gaps(&from, to, "0.01", 400));
    std::thread::sleep(Duration::from_millis(1000));
    c.stop_agent(0, libc::SIGTERM);
    // The device survives the agent: same interface, still addressed.
    let link = ip_in(&c.hosts[0].ns, &["link", "show", "tweed0"]);
    assert!(link.contains("tweed0"), "{link}");
    c.start_agent(0);
    let (sent, received, gap) = pinger.join().unwrap();
    eprintln!("udp restart: {received}/{sent} replies, largest gap {gap:.3}s");
    assert!(
        gap <= 1.0,
        "traffic stopped for {gap:.3}s across the restart\n{}",
        c.hosts[0].log_text()
    );
    assert!(received > 0);
}
