//! Root-only: the workers' `SO_REUSEPORT` steering programs as the kernel runs them, on a real
//! reuseport group of the backend's sockets inside a namespace of the test's own. The unit tests
//! in `backend::udp::io` run the same programs on an emulator; this checks that the kernel accepts
//! them and reads the offsets the same way (from the UDP payload).

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use tweed_agent::backend::udp::io::{attach_reuseport_program, udp_socket, Steering};
use tweed_testkit::netns::{self, NetnsGuard};

const WORKERS: usize = 4;
const PORT: u16 = 51820;

/// A WireGuard data message to our receiver index `(peer << 8) | session`.
fn data_message(peer: u32, session: u8, counter: u64) -> Vec<u8> {
    let mut d = vec![0u8; 96];
    d[0] = 4;
    d[4..8].copy_from_slice(&((peer << 8) | session as u32).to_le_bytes());
    d[8..16].copy_from_slice(&counter.to_le_bytes());
    // Ciphertext stand-in that differs per datagram, as real ciphertext does.
    for (i, b) in d[16..].iter_mut().enumerate() {
        *b = (counter as u8).wrapping_mul(31).wrapping_add(i as u8);
    }
    d
}

/// Which socket of the group received each datagram, by its first 8 bytes (type and index).
fn receive_all(socks: &[OwnedFd], expect: usize) -> Vec<(usize, [u8; 8])> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.len() < expect && Instant::now() < deadline {
        for (w, s) in socks.iter().enumerate() {
            loop {
                // SAFETY: reads at most buf.len() bytes into buf, alive for the call.
                let n = unsafe {
                    libc::recv(
                        s.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n < 8 {
                    break;
                }
                // With UDP GRO on, one read may carry several data messages (all 96 bytes);
                // all of them came in on this socket.
                let n = n as usize;
                let each = if n.is_multiple_of(96) { 96 } else { n };
                for d in buf[..n].chunks(each) {
                    got.push((w, d[..8].try_into().unwrap()));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    got
}

#[test]
fn wireguard_steering_keeps_a_peer_on_one_worker_in_the_kernel() {
    tweed_testkit::require_root!("a network namespace with a reuseport group");
    let ns = NetnsGuard::unique("twst");
    netns::enter(ns.name(), || {
        let bind = SocketAddrV4::new(Ipv4Addr::LOCALHOST, PORT);
        let socks: Vec<OwnedFd> = (0..WORKERS)
            .map(|_| udp_socket(bind).expect("backend socket").0)
            .collect();
        attach_reuseport_program(
            socks[0].as_raw_fd(),
            WORKERS as u32,
            Steering::WireguardPeer,
        )
        .expect("the kernel takes the wireguard program");
        let from = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        // 8 peers, each over 3 sessions (rekeys change the index's low byte), 4 datagrams each.
        let mut sent = 0;
        for peer in 1..=8u32 {
            for session in [0u8, 1, 0xff] {
                for c in 0..4u64 {
                    from.send_to(&data_message(peer, session, c), bind).unwrap();
                    sent += 1;
                }
            }
        }
        // A handshake initiation names no index of ours: the first socket (worker 0).
        let mut init = vec![0u8; 148];
        init[0] = 1;
        init[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
        from.send_to(&init, bind).unwrap();
        let got = receive_all(&socks, sent + 1);
        assert_eq!(got.len(), sent + 1, "every datagram received once");
        let mut worker_of = std::collections::BTreeMap::new();
        for (w, head) in &got {
            if head[0] == 1 {
                assert_eq!(*w, 0, "initiation on worker 0");
                continue;
            }
            let peer = u32::from_le_bytes(head[4..8].try_into().unwrap()) >> 8;
            let first = *worker_of.entry(peer).or_insert(*w);
            assert_eq!(
                first, *w,
                "peer {peer}: datagrams on workers {first} and {w}"
            );
        }
        assert_eq!(worker_of.len(), 8);
        let used: std::collections::BTreeSet<_> = worker_of.values().collect();
        assert!(used.len() > 1, "8 peers on one worker: {worker_of:?}");
        // The inner-flow program (the udp backend's) is accepted too.
        let other = SocketAddrV4::new(Ipv4Addr::LOCALHOST, PORT + 1);
        let (s, _) = udp_socket(other).unwrap();
        let (_s2, _) = udp_socket(other).unwrap();
        attach_reuseport_program(s.as_raw_fd(), 2, Steering::InnerFlow)
            .expect("the kernel takes the inner-flow program");
    });
}
