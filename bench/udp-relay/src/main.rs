//! udp-relay: flannel's udp data plane reduced to its design, as the floor of bench/dataplane.
//! A plain TUN device (no virtio-net header, no offloads, one queue) and one UDP socket; each
//! packet costs one read and one sendto, each datagram one recvfrom and one write. Nothing is
//! checked, batched or segmented: that is the point of the comparison.
//!
//! Usage: udp-relay TUN_NAME LISTEN_IP:PORT SUBNET/LEN=PEER_IP [SUBNET/LEN=PEER_IP ...]
//! The TUN device is created here; address, MTU and routes are the caller's (`ip`).

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

fn die(msg: String) -> ! {
    eprintln!("udp-relay: {msg}");
    std::process::exit(2)
}

fn open_tun(name: &str) -> OwnedFd {
    // SAFETY: open(2) of a fixed path; the result is checked.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        die(format!("/dev/net/tun: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just opened and is owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq we pass.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        die(format!("TUNSETIFF {name}: {}", std::io::Error::last_os_error()));
    }
    fd
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        die("usage: udp-relay TUN_NAME LISTEN_IP:PORT SUBNET/LEN=PEER_IP ...".into());
    }
    let listen: SocketAddrV4 = args[1].parse().unwrap_or_else(|_| die(format!("bad address {}", args[1])));
    let mut peers: Vec<(u32, u32, SocketAddrV4)> = Vec::new();
    for p in &args[2..] {
        let (net, peer) = p.split_once('=').unwrap_or_else(|| die(format!("bad peer {p}")));
        let (addr, len) = net.split_once('/').unwrap_or_else(|| die(format!("bad subnet {net}")));
        let addr: Ipv4Addr = addr.parse().unwrap_or_else(|_| die(format!("bad subnet {net}")));
        let len: u32 = len.parse().unwrap_or_else(|_| die(format!("bad subnet {net}")));
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        let peer: Ipv4Addr = peer.parse().unwrap_or_else(|_| die(format!("bad peer {p}")));
        peers.push((u32::from(addr) & mask, mask, SocketAddrV4::new(peer, listen.port())));
    }
    let tun = open_tun(&args[0]);
    let sock = UdpSocket::bind(listen).unwrap_or_else(|e| die(format!("bind {listen}: {e}")));
    let mut buf = vec![0u8; 65536];
    loop {
        let mut fds = [
            libc::pollfd { fd: tun.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: two live pollfd.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            continue;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            // SAFETY: reads into a live buffer of the given size.
            let n = unsafe { libc::read(tun.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 20 {
                let dst = u32::from_be_bytes([buf[16], buf[17], buf[18], buf[19]]);
                if let Some((_, _, to)) = peers.iter().find(|(net, mask, _)| dst & mask == *net) {
                    let _ = sock.send_to(&buf[..n as usize], to);
                }
            }
        }
        if fds[1].revents & libc::POLLIN != 0 {
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                // SAFETY: writes n initialized bytes of buf.
                unsafe { libc::write(tun.as_raw_fd(), buf.as_ptr().cast(), n) };
            }
        }
    }
}
