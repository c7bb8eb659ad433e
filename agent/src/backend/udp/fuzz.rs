//! One entry point for fuzzing everything the udp data path does with bytes it did not make:
//! the decap checks, coalescing of what passes them, and the encap side's handling of a TUN read
//! (virtio-net header + packet). Shared by the cargo-fuzz target (`fuzz/`, nightly) and the
//! seeded random test below (stable, runs in `cargo test`). It must never panic.

use std::net::{Ipv4Addr, SocketAddrV4};

use ipnetwork::Ipv4Network;

use super::offload::{flatten, prepare_tx, prepare_tx6, Coalescer, Span, VnetHdr, VNET_HDR_LEN};
use super::packet::{icmp6_unreachable, ip_version};
use super::table::{PeerTable, UdpPeer, UdpPeer6, V6Spec};

fn table() -> PeerTable {
    let net = |s: &str| s.parse::<Ipv4Network>().expect("literal");
    PeerTable::new(
        net("10.244.0.0/16"),
        net("10.244.1.0/24"),
        Ipv4Addr::new(198, 18, 0, 1),
        &[
            UdpPeer {
                subnet: net("10.244.2.0/24"),
                public_ip: Ipv4Addr::new(198, 18, 0, 2),
                port: 8285,
            },
            UdpPeer {
                subnet: net("10.244.3.0/24"),
                public_ip: Ipv4Addr::new(198, 18, 0, 3),
                port: 8285,
            },
        ],
    )
    // Dual stack: peer 2 has an IPv6 half, peer 3 does not.
    .with_v6(&V6Spec {
        network: "fd00:10:244::/56".parse().expect("literal"),
        own_subnet: "fd00:10:244:1::/64".parse().expect("literal"),
        peers: vec![UdpPeer6 {
            subnet: "fd00:10:244:2::/64".parse().expect("literal"),
            public_ip: Ipv4Addr::new(198, 18, 0, 2),
            port: 8285,
        }],
    })
}

/// `data[0]` picks the outer source (a peer or a stranger) and how the rest is cut into
/// datagrams (as UDP GRO would hand them over); every datagram goes through decap and, when
/// accepted, the coalescer. The whole input is also treated as a TUN read.
pub fn fuzz_one(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let t = table();
    let outer = match sel & 3 {
        0 => SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 8285),
        1 => SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 3), 8285),
        2 => SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 3), 8286),
        _ => SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 9), 8285),
    };
    let seg = match sel >> 2 {
        0 => rest.len().max(1),
        n => n as usize * 24,
    };
    let mut c = Coalescer::new();
    let mut off = 0;
    while off < rest.len() {
        let end = (off + seg).min(rest.len());
        // As the workers do: IPv6 to the IPv6 checks, written on its own when accepted.
        if ip_version(&rest[off..end]) == Some(6) {
            if let Ok(h) = t.decap6(outer, &rest[off..end]) {
                assert!(h.total_len <= end - off);
                c.push6(
                    &rest[off..off + h.total_len],
                    &h,
                    Span {
                        buf: 0,
                        start: off,
                        end: off + h.total_len,
                    },
                );
            }
            off = end;
            continue;
        }
        if let Ok(h) = t.decap(outer, &rest[off..end]) {
            assert!(h.total_len <= end - off);
            c.push(
                &rest[off..off + h.total_len],
                &h,
                Span {
                    buf: 0,
                    start: off,
                    end: off + h.total_len,
                },
            );
        }
        off = end;
    }
    for it in c.items() {
        let bytes = flatten(it, &[rest]);
        assert!(bytes.len() >= VNET_HDR_LEN);
    }

    if let Ok(vh) = VnetHdr::parse(rest) {
        let mut pkt = rest[VNET_HDR_LEN..].to_vec();
        if ip_version(&pkt) == Some(6) {
            let mut headers = Vec::new();
            if let Ok((tx, hdr)) = prepare_tx6(&vh, &mut pkt, &mut headers) {
                let _ = t.route6(&hdr);
                if let super::offload::TxPacket::Tso(tso) = tx {
                    for i in 0..tso.count {
                        let r = tso.payload(i);
                        assert!(r.start <= r.end && r.end <= pkt.len());
                    }
                    assert_eq!(headers.len(), tso.count * tso.hdr_len);
                }
                let mut out = [0u8; 1280];
                let src = t.icmp_source6().expect("dual-stack table");
                if let Some(n) = icmp6_unreachable(&pkt, &hdr, src, &mut out) {
                    assert!(n <= 1280);
                }
            }
        }
        let mut headers = Vec::new();
        if let Ok((tx, hdr)) = prepare_tx(&vh, &mut pkt, &mut headers) {
            let _ = t.route(&hdr);
            if let super::offload::TxPacket::Tso(tso) = tx {
                for i in 0..tso.count {
                    let r = tso.payload(i);
                    assert!(r.start <= r.end && r.end <= pkt.len());
                }
                assert_eq!(headers.len(), tso.count * tso.hdr_len);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::offload::tests::tcp_packet;
    use super::super::packet::tests::{ipv4, ipv6};
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Valid datagrams and TUN reads to mutate.
    fn corpus() -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        let from_peer = |p: Vec<u8>| {
            let mut d = vec![0u8];
            d.extend(p);
            d
        };
        v.push(from_peer(ipv4("10.244.2.5", "10.244.1.7", 17, &[1; 30])));
        v.push(from_peer(ipv4(
            "10.244.2.5",
            "10.244.1.7",
            1,
            &[8, 0, 0, 0, 0, 1, 0, 1],
        )));
        // IPv6 from peer 2 (accepted), and an ICMPv6 echo as a TUN read with a partial checksum.
        v.push(from_peer(ipv6(
            "fd00:10:244:2::5",
            "fd00:10:244:1::7",
            17,
            &[1; 30],
        )));
        let mut t6 = vec![0u8];
        t6.extend(
            VnetHdr {
                flags: 1,
                csum_start: 40,
                csum_offset: 2,
                ..Default::default()
            }
            .encode(),
        );
        t6.extend(ipv6(
            "fd00:10:244:1::7",
            "fd00:10:244:9::1",
            58,
            &[128, 0, 0, 0, 0, 1, 0, 1],
        ));
        v.push(t6);
        // A GRO run of four TCPv6 segments from peer 2 (168 bytes each = 7 * 24, the cut of
        // selector 7 << 2), which the coalescer merges.
        let mut run6 = vec![(7 << 2) as u8];
        for i in 0..4u32 {
            let mut tcp = vec![0u8; 20 + 108];
            tcp[4..8].copy_from_slice(&(1000 + i * 108).to_be_bytes());
            tcp[12] = 5 << 4;
            tcp[13] = 0x10;
            run6.extend(ipv6("fd00:10:244:2::2", "fd00:10:244:1::2", 6, &tcp));
        }
        v.push(run6);
        let mut run = Vec::new();
        for i in 0..4u32 {
            let mut p = tcp_packet(1000 + i * 100, 0x10, &[7; 100], 0);
            p[12..16].copy_from_slice(&[10, 244, 2, 2]);
            p[16..20].copy_from_slice(&[10, 244, 1, 2]);
            run.extend(p);
        }
        // Four 152-byte segments, cut as GRO would: selector gives seg = 152 = 24 * 6 + 8, so
        // use a selector whose cut is a multiple of 24 near it, and one that cuts exactly.
        let mut d = vec![(6 << 2) as u8];
        d.extend(&run);
        v.push(d);
        // A TUN read: virtio header asking for TSO, then a TCP super-packet.
        let mut t = vec![0u8];
        t.extend(
            VnetHdr {
                flags: 1,
                gso_type: 1,
                hdr_len: 52,
                gso_size: 100,
                csum_start: 20,
                csum_offset: 16,
            }
            .encode(),
        );
        t.extend(tcp_packet(5, 0x18, &[3; 1000], 9));
        v.push(t);
        v
    }

    /// 100,000 mutated inputs (bit flips, byte overwrites with edge values, truncation,
    /// extension, length-field lies), seeded so a failure reproduces.
    #[test]
    fn random_mutations_never_panic() {
        let corpus = corpus();
        let mut rng = StdRng::seed_from_u64(0x7ee0_f022);
        for _ in 0..100_000 {
            let mut d = corpus[rng.random_range(0..corpus.len())].clone();
            for _ in 0..rng.random_range(1..6) {
                match rng.random_range(0..6) {
                    0 if !d.is_empty() => {
                        let i = rng.random_range(0..d.len());
                        d[i] ^= 1 << rng.random_range(0..8);
                    }
                    1 if !d.is_empty() => {
                        let i = rng.random_range(0..d.len());
                        d[i] = [0, 0xff, 0x45, 0x40, 0x7f, 0x80][rng.random_range(0..6)];
                    }
                    2 => {
                        let n = rng.random_range(0..=d.len());
                        d.truncate(n);
                    }
                    3 => {
                        let n = rng.random_range(0..200);
                        d.extend((0..n).map(|_| rng.random::<u8>()));
                    }
                    4 if d.len() > 4 => {
                        // Lie in the IPv4 total length (offset 2 after the selector byte).
                        let v: u16 = rng.random();
                        d[3..5].copy_from_slice(&v.to_be_bytes());
                    }
                    _ => {
                        if !d.is_empty() {
                            d[0] = rng.random();
                        }
                    }
                }
            }
            fuzz_one(&d);
        }
    }

    #[test]
    fn the_corpus_exercises_acceptance_and_coalescing() {
        // Sanity: unmutated inputs reach the interesting paths (not just early rejects).
        let t = table();
        assert!(t
            .decap6(
                SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 8285),
                &corpus()[2][1..]
            )
            .is_ok());
        for d in corpus().iter().take(2) {
            assert!(t
                .decap(
                    SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 8285),
                    &d[1..]
                )
                .is_ok());
        }
        for d in corpus() {
            fuzz_one(&d);
        }
        // The TCPv6 run passes decap and merges into one item.
        let run6 = &corpus()[4][1..];
        let mut c = Coalescer::new();
        for k in 0..4 {
            let seg = &run6[k * 168..(k + 1) * 168];
            let h = t
                .decap6(SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 8285), seg)
                .unwrap();
            c.push6(
                seg,
                &h,
                Span {
                    buf: 0,
                    start: k * 168,
                    end: (k + 1) * 168,
                },
            );
        }
        assert_eq!(c.items().len(), 1);
        assert_eq!(c.items()[0].segments(), 4);
    }
}
