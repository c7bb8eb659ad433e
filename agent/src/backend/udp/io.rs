//! The thin I/O layer of the udp backend: one std thread per TUN queue, each owning its queue's
//! file descriptor and its own UDP socket on the backend port (`SO_REUSEPORT`), moving packets
//! both ways with the pure functions of [`super::offload`] and [`super::table`].
//!
//! Speed comes from doing less per byte, not from a tighter loop:
//! - the TUN device runs with `IFF_VNET_HDR` and TSO, so one read returns up to 64 KB of a TCP
//!   flow; it is cut into MSS segments here (headers only, the payload is not copied) and sent
//!   with UDP GSO (`UDP_SEGMENT`): one `sendmmsg` carries many reads, each many datagrams;
//! - the socket has `UDP_GRO`, so one `recvmmsg` slot returns a run of datagrams from one peer;
//!   the TCP segments in them are coalesced into super-packets and written with one `writev`
//!   each, again without copying payload in user space;
//! - `IFF_MULTI_QUEUE` spreads flows over the queues, and a classic-BPF `SO_REUSEPORT` program
//!   picks the receiving socket by the *inner* flow, so several flows between the same two
//!   nodes (one outer 4-tuple) still use several workers.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use super::offload::{
    gso_batches, prepare_tx, prepare_tx6, Coalescer, Span, TxPacket, VnetHdr, MAX_GSO_SEGMENTS,
    MAX_UDP_PAYLOAD, VNET_HDR_LEN,
};
use super::packet::{
    icmp6_unreachable, icmp_net_unreachable, ip_version, parse_ipv4, parse_ipv6, IcmpLimiter,
    Ipv6Header, MAX_PACKET,
};
use super::table::{check_inner, check_inner6, DropReason, Outbound, PeerTable};
use crate::backend::wireguard::dual::source_allowed;
use crate::backend::wireguard::userspace::{allowed, inner_dst, Opened, WgTable};

const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
/// TUN reads per `sendmmsg`.
const TX_BATCH: usize = 16;
/// Datagram runs per `recvmmsg`.
const RX_BATCH: usize = 16;
const SOCK_BUF: libc::c_int = 8 << 20;
/// How long a worker sleeps in `poll` before it looks at the stop flag again.
const POLL_MS: libc::c_int = 100;
/// Room for one TUN read: the virtio-net header and the largest IPv4 packet.
const TUN_BUF: usize = VNET_HDR_LEN + MAX_PACKET;
/// One GRO'd receive can hold up to 64 KB of datagrams.
const RX_BUF: usize = 65535;

/// Counters of one worker; [`Counters::add_to`] sums them for reports.
#[derive(Debug, Default)]
pub struct Counters {
    pub tx_packets: AtomicU64,
    /// Inner bytes read from the TUN device (what the overlay sends).
    pub tx_bytes: AtomicU64,
    /// UDP payload bytes received (inner packets from peers).
    pub rx_bytes: AtomicU64,
    pub tx_datagrams: AtomicU64,
    pub rx_datagrams: AtomicU64,
    pub rx_writes: AtomicU64,
    pub drop_unknown_peer: AtomicU64,
    pub drop_wrong_port: AtomicU64,
    pub drop_spoofed_inner: AtomicU64,
    pub drop_not_for_us: AtomicU64,
    pub drop_malformed: AtomicU64,
    pub drop_not_remote: AtomicU64,
    pub drop_not_ready: AtomicU64,
    pub icmp_unreachable: AtomicU64,
    pub send_errors: AtomicU64,
    pub tun_errors: AtomicU64,
    /// wireguard: datagrams refused by the protocol (no peer, bad MAC or tag, replay).
    pub drop_unauthenticated: AtomicU64,
}

/// A plain copy of the counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub tx_datagrams: u64,
    pub rx_datagrams: u64,
    pub rx_writes: u64,
    pub drop_unknown_peer: u64,
    pub drop_wrong_port: u64,
    pub drop_spoofed_inner: u64,
    pub drop_not_for_us: u64,
    pub drop_malformed: u64,
    pub drop_not_remote: u64,
    pub drop_not_ready: u64,
    pub icmp_unreachable: u64,
    pub send_errors: u64,
    pub tun_errors: u64,
    pub drop_unauthenticated: u64,
}

impl Stats {
    /// Adds `o`'s counts (another set of workers': wireguard's `tweed-wg-v6`). Destructured,
    /// so a new counter cannot be left out.
    pub fn add(&mut self, o: &Stats) {
        let Stats {
            tx_packets,
            tx_bytes,
            rx_bytes,
            tx_datagrams,
            rx_datagrams,
            rx_writes,
            drop_unknown_peer,
            drop_wrong_port,
            drop_spoofed_inner,
            drop_not_for_us,
            drop_malformed,
            drop_not_remote,
            drop_not_ready,
            icmp_unreachable,
            send_errors,
            tun_errors,
            drop_unauthenticated,
        } = *o;
        self.tx_packets += tx_packets;
        self.tx_bytes += tx_bytes;
        self.rx_bytes += rx_bytes;
        self.tx_datagrams += tx_datagrams;
        self.rx_datagrams += rx_datagrams;
        self.rx_writes += rx_writes;
        self.drop_unknown_peer += drop_unknown_peer;
        self.drop_wrong_port += drop_wrong_port;
        self.drop_spoofed_inner += drop_spoofed_inner;
        self.drop_not_for_us += drop_not_for_us;
        self.drop_malformed += drop_malformed;
        self.drop_not_remote += drop_not_remote;
        self.drop_not_ready += drop_not_ready;
        self.icmp_unreachable += icmp_unreachable;
        self.send_errors += send_errors;
        self.tun_errors += tun_errors;
        self.drop_unauthenticated += drop_unauthenticated;
    }

    /// Packets refused by the receive-side security checks.
    pub fn rx_refused(&self) -> u64 {
        self.drop_unknown_peer
            + self.drop_wrong_port
            + self.drop_spoofed_inner
            + self.drop_not_for_us
            + self.drop_unauthenticated
    }
}

fn inc(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    fn count_drop(&self, r: DropReason, n: u64) {
        let c = match r {
            DropReason::Malformed(_) => &self.drop_malformed,
            DropReason::UnknownPeer => &self.drop_unknown_peer,
            DropReason::WrongPort => &self.drop_wrong_port,
            DropReason::SpoofedInnerSource => &self.drop_spoofed_inner,
            DropReason::NotForThisNode => &self.drop_not_for_us,
            DropReason::NotRemote => &self.drop_not_remote,
            DropReason::NotReady => &self.drop_not_ready,
        };
        inc(c, n);
    }

    pub fn add_to(&self, s: &mut Stats) {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        s.tx_packets += g(&self.tx_packets);
        s.tx_bytes += g(&self.tx_bytes);
        s.rx_bytes += g(&self.rx_bytes);
        s.tx_datagrams += g(&self.tx_datagrams);
        s.rx_datagrams += g(&self.rx_datagrams);
        s.rx_writes += g(&self.rx_writes);
        s.drop_unknown_peer += g(&self.drop_unknown_peer);
        s.drop_wrong_port += g(&self.drop_wrong_port);
        s.drop_spoofed_inner += g(&self.drop_spoofed_inner);
        s.drop_not_for_us += g(&self.drop_not_for_us);
        s.drop_malformed += g(&self.drop_malformed);
        s.drop_not_remote += g(&self.drop_not_remote);
        s.drop_not_ready += g(&self.drop_not_ready);
        s.icmp_unreachable += g(&self.icmp_unreachable);
        s.send_errors += g(&self.send_errors);
        s.tun_errors += g(&self.tun_errors);
        s.drop_unauthenticated += g(&self.drop_unauthenticated);
    }
}

/// What the control plane shares with the workers.
#[derive(Debug)]
pub struct Shared {
    table: RwLock<Arc<PeerTable>>,
    /// wireguard: the protocol state sealing and opening every datagram; `None` for plain udp.
    wg: RwLock<Option<Arc<WgTable>>>,
    version: AtomicU64,
    stop: AtomicBool,
    /// Set by a worker whose TUN queue died (device deleted): the backend must be set up again.
    pub device_gone: AtomicBool,
    pub port: u16,
    /// One eventfd per thread that sleeps in `poll` (the workers, then the reporter): a stop or
    /// a new table wakes it at once instead of after its poll interval. One each, because the
    /// thread that reads an eventfd resets it for everyone polling it.
    wakers: Vec<OwnedFd>,
}

impl Shared {
    /// `sleepers`: how many threads will wait with [`Shared::waker`] (indices `0..sleepers`).
    pub fn new(table: PeerTable, port: u16, sleepers: usize) -> io::Result<Shared> {
        let wakers = (0..sleepers)
            .map(|_| {
                // SAFETY: plain eventfd(2) call; the result is checked before use.
                let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
                // SAFETY: fd was just returned by eventfd(2) and is owned by nobody else.
                Ok(unsafe { OwnedFd::from_raw_fd(fd) })
            })
            .collect::<io::Result<_>>()?;
        Ok(Shared {
            table: RwLock::new(Arc::new(table)),
            wg: RwLock::new(None),
            version: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            device_gone: AtomicBool::new(false),
            port,
            wakers,
        })
    }

    /// Publishes a new table; workers pick it up before their next batch, woken for it.
    pub fn publish(&self, table: PeerTable) {
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
        self.version.fetch_add(1, Ordering::Release);
        self.wake_all();
    }

    pub fn table(&self) -> Arc<PeerTable> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Publishes the routing table and the WireGuard state that goes with it, as one version.
    pub fn publish_wg(&self, table: PeerTable, wg: Arc<WgTable>) {
        *self.wg.write().unwrap_or_else(|e| e.into_inner()) = Some(wg);
        self.publish(table);
    }

    pub fn wg(&self) -> Option<Arc<WgTable>> {
        self.wg.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Tells every thread to stop and wakes it.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.wake_all();
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// The eventfd thread `i` polls; readable after a stop or a publish.
    pub fn waker(&self, i: usize) -> Option<RawFd> {
        self.wakers.get(i).map(|f| f.as_raw_fd())
    }

    fn wake_all(&self) {
        for w in &self.wakers {
            let one = 1u64;
            // SAFETY: writes the 8 bytes of a live u64 to an eventfd we own. A full counter
            // (EAGAIN) means the thread is already woken: nothing to do.
            let _ = unsafe { libc::write(w.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }
}

/// Sleeps until `waker` is readable or `timeout_ms` passed, then resets it; true when woken.
pub fn sleep_on(waker: Option<RawFd>, timeout_ms: libc::c_int) -> bool {
    let Some(fd) = waker else {
        std::thread::sleep(std::time::Duration::from_millis(timeout_ms as u64));
        return false;
    };
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd, length 1.
    let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    let woken = n > 0 && p.revents & libc::POLLIN != 0;
    if woken {
        reset_waker(fd);
    }
    woken
}

fn reset_waker(fd: RawFd) {
    let mut v = 0u64;
    // SAFETY: reads at most 8 bytes into a live u64; the fd is non-blocking.
    let _ = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its exact size; fd is owned by the caller.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// `a` as the kernel takes it, in storage big enough for either family, and its length.
fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut st: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match a {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            let s = unsafe {
                &mut *(&mut st as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            s.sin_family = libc::AF_INET as libc::sa_family_t;
            s.sin_port = a.port().to_be();
            s.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            let s = unsafe {
                &mut *(&mut st as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            s.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            s.sin6_port = a.port().to_be();
            s.sin6_addr.s6_addr = a.ip().octets();
            s.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>()
        }
    };
    (st, len as libc::socklen_t)
}

/// The address the kernel wrote into `st` (a received datagram's source); `None` for a family
/// this backend does not speak.
fn from_sockaddr(st: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match st.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in (its family says so) into the storage.
            let s = unsafe { &*(st as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(s.sin_addr.s_addr)),
                u16::from_be(s.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6 (its family says so) into the storage.
            let s = unsafe { &*(st as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                s.sin6_addr.s6_addr.into(),
                u16::from_be(s.sin6_port),
                0,
                s.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// The backend's UDP socket: bound to `bind` in a `SO_REUSEPORT` group (one per worker, and a
/// restarted agent can bind before the old one's sockets are gone), large buffers (64 KB GSO
/// super-datagrams fill the default ones after three), and `UDP_GRO` when the kernel has it.
/// An IPv6 `bind` makes an IPv6-only socket (wireguard's `tweed-wg-v6`): the IPv4 port is
/// another device's.
pub fn udp_socket(bind: impl Into<SocketAddr>) -> io::Result<(OwnedFd, bool)> {
    let bind = bind.into();
    let family = match bind {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = cvt(unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = fd.as_raw_fd();
    if family == libc::AF_INET6 {
        setsockopt_int(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    }
    setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if setsockopt_int(raw, libc::SOL_SOCKET, force, SOCK_BUF).is_err() {
            let _ = setsockopt_int(raw, libc::SOL_SOCKET, plain, SOCK_BUF);
        }
    }
    let (sa, len) = sockaddr(bind);
    // SAFETY: sa holds a valid sockaddr of `len` bytes.
    cvt(unsafe { libc::bind(raw, (&sa as *const libc::sockaddr_storage).cast(), len) })?;
    let gro = setsockopt_int(raw, SOL_UDP, UDP_GRO, 1).is_ok();
    Ok((fd, gro))
}

/// One classic BPF instruction (`jt`/`jf` 0 for a statement), for the reuseport programs.
fn bpf_jump(code: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// The classic-BPF program choosing the receiving socket of the reuseport group: a hash of the
/// inner packet's addresses and, for TCP, UDP and SCTP (first fragments only), its ports (the
/// UDP payload starts at offset 0 for this program). Both halves are combined with XOR, so the
/// hash is symmetric: a flow's replies reach the worker that wrote its requests to the TUN
/// queue, and the TUN device's own flow steering sends the next request out of that same queue.
/// One thread then serves a request/response exchange on each host: no second wake-up. ICMP and
/// other protocols hash by addresses only (an echo's checksum differs from its reply's). Different
/// flows spread over the workers. A packet too short for a load ends the program with 0: worker 0.
pub fn reuseport_program(workers: u32) -> Vec<libc::sock_filter> {
    let op = |code: u32, k: u32| bpf_jump(code, k, 0, 0);
    let jump = bpf_jump;
    const LD_W_ABS: u32 = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    const LD_H_ABS: u32 = libc::BPF_LD | libc::BPF_H | libc::BPF_ABS;
    const LD_B_ABS: u32 = libc::BPF_LD | libc::BPF_B | libc::BPF_ABS;
    const LD_H_IND: u32 = libc::BPF_LD | libc::BPF_H | libc::BPF_IND;
    const LD_MEM: u32 = libc::BPF_LD | libc::BPF_MEM;
    const LDX_MSH: u32 = libc::BPF_LDX | libc::BPF_B | libc::BPF_MSH;
    const LDX_MEM: u32 = libc::BPF_LDX | libc::BPF_MEM;
    const ST: u32 = libc::BPF_ST;
    const TAX: u32 = libc::BPF_MISC | libc::BPF_TAX;
    const XOR_X: u32 = libc::BPF_ALU | libc::BPF_XOR | libc::BPF_X;
    const MUL_K: u32 = libc::BPF_ALU | libc::BPF_MUL | libc::BPF_K;
    const RSH_K: u32 = libc::BPF_ALU | libc::BPF_RSH | libc::BPF_K;
    const MOD_K: u32 = libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K;
    const JEQ_K: u32 = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
    const JSET_K: u32 = libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K;
    const JA: u32 = libc::BPF_JMP | libc::BPF_JA;
    const RET_A: u32 = libc::BPF_RET | libc::BPF_A;
    // Jump offsets count instructions after the jump; the comments number the instructions.
    vec![
        op(LD_W_ABS, 12),           // 0: inner source address
        op(TAX, 0),                 // 1
        op(LD_W_ABS, 16),           // 2: inner destination address
        op(XOR_X, 0),               // 3
        op(ST, 0),                  // 4: M[0] = src ^ dst
        op(LD_B_ABS, 9),            // 5: protocol
        jump(JEQ_K, 6, 3, 0),       // 6: TCP -> 10
        jump(JEQ_K, 17, 2, 0),      // 7: UDP -> 10
        jump(JEQ_K, 132, 1, 0),     // 8: SCTP -> 10
        op(JA, 11),                 // 9: no ports -> 21
        op(LD_H_ABS, 6),            // 10: flags and fragment offset
        jump(JSET_K, 0x1fff, 9, 0), // 11: not a first fragment: no ports -> 21
        op(LDX_MSH, 0),             // 12: X = header length
        op(LD_H_IND, 0),            // 13: source port
        op(ST, 1),                  // 14
        op(LD_H_IND, 2),            // 15: destination port
        op(LDX_MEM, 1),             // 16
        op(XOR_X, 0),               // 17: sport ^ dport
        op(LDX_MEM, 0),             // 18
        op(XOR_X, 0),               // 19
        op(ST, 0),                  // 20: M[0] ^= sport ^ dport
        op(LD_MEM, 0),              // 21
        op(MUL_K, 0x9e37_79b1),     // 22
        op(RSH_K, 16),              // 23
        op(MOD_K, workers.max(1)),  // 24
        op(RET_A, 0),               // 25
    ]
}

/// What the reuseport program reads to pick a worker for a received datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steering {
    /// The inner packet's flow ([`reuseport_program`]): the udp backend, whose payload is the
    /// inner packet in clear.
    InnerFlow,
    /// The WireGuard peer ([`wireguard_reuseport_program`]): the payload is ciphertext.
    WireguardPeer,
}

/// The reuseport program for WireGuard messages: the inner packet is encrypted, so a hash of
/// the bytes where [`reuseport_program`] looks for addresses is a hash of ciphertext, different
/// for every datagram. That scattered one TCP stream's segments over every worker: they queued
/// on the peer's session lock, arrived out of order and were no longer coalesced into
/// super-packets. This program hashes the peer instead: the receiver index we handed out (data
/// messages and cookie replies at offset 4, handshake responses at 8; little-endian, the low
/// byte is the session and the upper 24 bits the peer, see `WgTable::peer_of`) without its
/// session byte, so a peer stays on one worker across rekeys and its datagrams stay in order.
/// Handshake initiations name no index of ours (the peer is in the encrypted static key):
/// worker 0, which also runs the timers. Too short or unknown: worker 0 as well.
pub fn wireguard_reuseport_program(workers: u32) -> Vec<libc::sock_filter> {
    let op = |code: u32, k: u32| bpf_jump(code, k, 0, 0);
    let jump =
        |k: u32, jt: u8, jf: u8| bpf_jump(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, k, jt, jf);
    const LD_W_ABS: u32 = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    const LD_B_ABS: u32 = libc::BPF_LD | libc::BPF_B | libc::BPF_ABS;
    const AND_K: u32 = libc::BPF_ALU | libc::BPF_AND | libc::BPF_K;
    const MUL_K: u32 = libc::BPF_ALU | libc::BPF_MUL | libc::BPF_K;
    const RSH_K: u32 = libc::BPF_ALU | libc::BPF_RSH | libc::BPF_K;
    const MOD_K: u32 = libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K;
    const JA: u32 = libc::BPF_JMP | libc::BPF_JA;
    const RET_A: u32 = libc::BPF_RET | libc::BPF_A;
    const RET_K: u32 = libc::BPF_RET | libc::BPF_K;
    vec![
        op(LD_B_ABS, 0),           // 0: message type (the other three bytes are zero)
        jump(4, 2, 0),             // 1: data -> 4
        jump(3, 1, 0),             // 2: cookie reply -> 4
        jump(2, 2, 8),             // 3: handshake response -> 6; initiation, other -> 12
        op(LD_W_ABS, 4),           // 4: receiver index (loaded big-endian: session byte on top)
        op(JA, 1),                 // 5: -> 7
        op(LD_W_ABS, 8),           // 6: receiver index of a response
        op(AND_K, 0x00ff_ffff),    // 7: the peer's 24 bits, without the session byte
        op(MUL_K, 0x9e37_79b1),    // 8
        op(RSH_K, 16),             // 9
        op(MOD_K, workers.max(1)), // 10
        op(RET_A, 0),              // 11
        op(RET_K, 0),              // 12: worker 0
    ]
}

pub fn attach_reuseport_program(fd: RawFd, workers: u32, steering: Steering) -> io::Result<()> {
    let prog = match steering {
        Steering::InnerFlow => reuseport_program(workers),
        Steering::WireguardPeer => wireguard_reuseport_program(workers),
    };
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: fprog points at `prog`, alive for the call; the kernel copies the program.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// One TUN queue plus one socket, moved into its thread.
pub struct Worker {
    pub id: usize,
    pub tun: OwnedFd,
    pub sock: OwnedFd,
    pub gro: bool,
    pub shared: Arc<Shared>,
    pub counters: Arc<Counters>,
}

/// Per-worker buffers, allocated once; the vectors of the batch paths are kept (emptied) between
/// batches so the data path does not allocate.
struct Bufs {
    tx: Vec<Vec<u8>>,
    tx_headers: Vec<Vec<u8>>,
    rx: Vec<Vec<u8>>,
    icmp: Vec<u8>,
    ready: Vec<(usize, TxPacket, Ipv4Addr)>,
    planned: Vec<Planned>,
    tx_iovs: Vec<libc::iovec>,
    tx_addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)>,
    tx_control: Vec<u8>,
    tx_msgs: Vec<libc::mmsghdr>,
    rx_control: Vec<u8>,
    rx_addrs: Vec<libc::sockaddr_storage>,
    rx_iovs: Vec<libc::iovec>,
    rx_msgs: Vec<libc::mmsghdr>,
    write_iovs: Vec<libc::iovec>,
    /// wireguard: sealed datagrams of one TUN batch, back to back, and where each is.
    sealed: Vec<u8>,
    sealed_at: Vec<(usize, usize, SocketAddr)>,
    /// wireguard: one plaintext segment, assembled for sealing.
    segment: Vec<u8>,
    /// wireguard: opened packets, at the offsets of their datagrams in `rx`.
    plain: Vec<Vec<u8>>,
    control_msg: Vec<u8>,
}

/// One planned datagram run for `sendmmsg`: `iov_count` iovecs from `iov_first`, to `dst`,
/// with `gso` set when it carries several segments.
struct Planned {
    iov_first: usize,
    iov_count: usize,
    dst: SocketAddr,
    gso: Option<u16>,
    segments: usize,
}

impl Worker {
    pub fn run(self) {
        let mut bufs = Bufs {
            tx: (0..TX_BATCH).map(|_| vec![0u8; TUN_BUF]).collect(),
            tx_headers: (0..TX_BATCH).map(|_| Vec::with_capacity(8192)).collect(),
            rx: (0..RX_BATCH).map(|_| vec![0u8; RX_BUF]).collect(),
            // The larger of the two errors: ICMPv6's 1280 bytes (ICMPv4's is 576).
            icmp: vec![0u8; VNET_HDR_LEN + 1280],
            ready: Vec::with_capacity(TX_BATCH),
            planned: Vec::new(),
            tx_iovs: Vec::new(),
            tx_addrs: Vec::new(),
            tx_control: Vec::new(),
            tx_msgs: Vec::new(),
            rx_control: Vec::new(),
            rx_addrs: Vec::new(),
            rx_iovs: Vec::new(),
            rx_msgs: Vec::new(),
            write_iovs: Vec::with_capacity(80),
            sealed: Vec::new(),
            sealed_at: Vec::new(),
            segment: Vec::new(),
            plain: Vec::new(),
            control_msg: vec![0u8; 2048],
        };

        let mut table = self.shared.table();
        let mut wg = self.shared.wg();
        let mut version = self.shared.version.load(Ordering::Acquire);
        let mut last_tick = Instant::now();
        // A fresh WireGuard table is ticked at once: its new peers get their handshake
        // initiations now, not at the next tick (a restart's first handshake waited for it).
        let mut fresh_wg = wg.is_some();
        let mut coalescer = Coalescer::new();
        let mut icmp_limit = IcmpLimiter::new(100, 50);
        let mut gso_ok = true;
        let mut gro_ok = self.gro;
        let waker = self.shared.waker(self.id);
        loop {
            if self.shared.stopping() {
                return;
            }
            self.reload(&mut version, &mut table, &mut wg, &mut fresh_wg);
            // Until the first table, read nothing: what arrives queues in the TUN queue and the
            // socket buffer and is forwarded once the table is there, instead of being dropped
            // as "not ready" (a restarted agent lists the leases after its workers start).
            if !table.is_ready() {
                sleep_on(waker, POLL_MS);
                continue;
            }
            // One worker runs the WireGuard timers (handshake retries, rekeys, keepalives).
            if let (0, Some(w)) = (self.id, &wg) {
                if fresh_wg || last_tick.elapsed().as_millis() >= 250 {
                    fresh_wg = false;
                    last_tick = Instant::now();
                    w.tick_all(&mut bufs.control_msg, |b, ep| self.send_one(b, ep));
                }
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.tun.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.sock.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    // poll ignores a negative fd.
                    fd: waker.unwrap_or(-1),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: fds is a live array of three pollfd and its length is passed.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, POLL_MS) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(worker = self.id, "udp: poll: {e}; worker stops");
                return;
            }
            if fds[2].revents & libc::POLLIN != 0 {
                reset_waker(fds[2].fd);
            }
            if self.shared.stopping() {
                return;
            }
            // The table may have changed while this worker slept: what woke it is for the
            // current one (a handshake response to an initiation the new table sent would
            // otherwise meet the table before it, be dropped, and cost the peer a 5 s retry).
            self.reload(&mut version, &mut table, &mut wg, &mut fresh_wg);
            if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                self.tun_gone(format_args!("TUN queue closed (device deleted?)"));
                return;
            }
            if fds[0].revents & libc::POLLIN != 0 {
                match self.tun_to_udp(
                    &table,
                    wg.as_deref(),
                    &mut bufs,
                    &mut icmp_limit,
                    &mut gso_ok,
                ) {
                    Ok(()) => {}
                    Err(e) => {
                        self.tun_gone(format_args!("reading the TUN queue: {e}"));
                        return;
                    }
                }
            }
            if fds[1].revents & libc::POLLIN != 0 {
                self.udp_to_tun(
                    &table,
                    wg.as_deref(),
                    &mut bufs,
                    &mut coalescer,
                    &mut gro_ok,
                );
            }
        }
    }

    /// The TUN queue is unusable (the device was deleted, most likely): the worker stops, and the
    /// next reconcile reports the device gone so that the agent sets the backend up again.
    fn tun_gone(&self, why: std::fmt::Arguments<'_>) {
        tracing::warn!(worker = self.id, "udp: {why}; worker stops");
        self.shared.device_gone.store(true, Ordering::Relaxed);
    }

    /// Takes the published table when its version moved; `fresh_wg` is set when the
    /// WireGuard state is a new one.
    fn reload(
        &self,
        version: &mut u64,
        table: &mut Arc<PeerTable>,
        wg: &mut Option<Arc<WgTable>>,
        fresh_wg: &mut bool,
    ) {
        let v = self.shared.version.load(Ordering::Acquire);
        if v == *version {
            return;
        }
        *table = self.shared.table();
        let new = self.shared.wg();
        *fresh_wg |= match (&new, &*wg) {
            (Some(n), Some(o)) => !Arc::ptr_eq(n, o),
            (n, _) => n.is_some(),
        };
        *wg = new;
        *version = v;
    }

    /// Reads up to a batch from the TUN queue and sends it. Errors only for a dead queue.
    fn tun_to_udp(
        &self,
        table: &PeerTable,
        wg: Option<&WgTable>,
        bufs: &mut Bufs,
        icmp_limit: &mut IcmpLimiter,
        gso_ok: &mut bool,
    ) -> io::Result<()> {
        let c = &self.counters;
        let mut ready = std::mem::take(&mut bufs.ready);
        ready.clear();
        for slot in 0..TX_BATCH {
            let buf = &mut bufs.tx[slot];
            // SAFETY: reads at most buf.len() bytes into buf, which lives across the call.
            let n = unsafe { libc::read(self.tun.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) | Some(libc::EINTR) => break,
                    Some(libc::EBADFD) | Some(libc::EBADF) | Some(libc::ENODEV) => return Err(e),
                    _ => {
                        inc(&c.tun_errors, 1);
                        break;
                    }
                }
            }
            let n = n as usize;
            let Ok(vh) = VnetHdr::parse(&buf[..n]) else {
                c.count_drop(DropReason::Malformed(super::packet::PacketError::Empty), 1);
                continue;
            };
            let (pkt_area, _) = buf.split_at_mut(n);
            let pkt = &mut pkt_area[VNET_HDR_LEN..];
            // Inner IPv6 (dual stack): sent as it is, to the peer's IPv4 endpoint. Without an
            // IPv6 half in the table only the kernel's link-local traffic is told apart (not
            // remote); anything else is malformed, as before dual stack.
            if ip_version(pkt) == Some(6) {
                let (tx, hdr) = match prepare_tx6(&vh, pkt, &mut bufs.tx_headers[slot]) {
                    Ok(r) => r,
                    Err(_) => {
                        inc(&c.drop_malformed, 1);
                        continue;
                    }
                };
                inc(&c.tx_packets, 1);
                inc(&c.tx_bytes, (n - VNET_HDR_LEN) as u64);
                match table.route6(&hdr) {
                    Outbound::Peer(p) => ready.push((slot, tx, p)),
                    Outbound::Drop(r) => c.count_drop(r, 1),
                    Outbound::Unreachable => {
                        let Some(src) = table.icmp_source6() else {
                            continue;
                        };
                        if !icmp_limit.allow(Instant::now()) {
                            continue;
                        }
                        let pkt = &buf[VNET_HDR_LEN..n];
                        let (head, body) = bufs.icmp.split_at_mut(VNET_HDR_LEN);
                        head.fill(0);
                        if let Some(len) = icmp6_unreachable(pkt, &hdr, src, body) {
                            self.write_icmp(&bufs.icmp[..VNET_HDR_LEN + len]);
                        }
                    }
                }
                continue;
            }
            let (tx, hdr) = match prepare_tx(&vh, pkt, &mut bufs.tx_headers[slot]) {
                Ok(r) => r,
                Err(_) => {
                    inc(&c.drop_malformed, 1);
                    continue;
                }
            };
            inc(&c.tx_packets, 1);
            inc(&c.tx_bytes, (n - VNET_HDR_LEN) as u64);
            match table.route(&hdr) {
                Outbound::Peer(p) => ready.push((slot, tx, p)),
                Outbound::Drop(r) => c.count_drop(r, 1),
                Outbound::Unreachable => {
                    if !icmp_limit.allow(Instant::now()) {
                        continue;
                    }
                    let pkt = &buf[VNET_HDR_LEN..n];
                    let (head, body) = bufs.icmp.split_at_mut(VNET_HDR_LEN);
                    head.fill(0);
                    if let Some(len) = icmp_net_unreachable(pkt, &hdr, table.icmp_source(), body) {
                        self.write_icmp(&bufs.icmp[..VNET_HDR_LEN + len]);
                    }
                }
            }
        }
        if ready.is_empty() {
            bufs.ready = ready;
            return Ok(());
        }
        if let Some(wg) = wg {
            self.seal_and_send(wg, &ready, bufs, gso_ok);
            bufs.ready = ready;
            return Ok(());
        }
        // Plan first, then take pointers: the iovec vector must not move once msghdrs point
        // into it.
        let mut iovs = std::mem::take(&mut bufs.tx_iovs);
        let mut planned = std::mem::take(&mut bufs.planned);
        iovs.clear();
        planned.clear();
        let iov = |b: &[u8]| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        };
        for (slot, tx, dst) in &ready {
            let pkt = &bufs.tx[*slot][VNET_HDR_LEN..];
            match tx {
                TxPacket::Single { len } => {
                    planned.push(Planned {
                        iov_first: iovs.len(),
                        iov_count: 1,
                        dst: SocketAddrV4::new(*dst, self.shared.port).into(),
                        gso: None,
                        segments: 1,
                    });
                    iovs.push(iov(&pkt[..*len]));
                }
                TxPacket::Tso(tso) => {
                    let headers = &bufs.tx_headers[*slot];
                    let per_send: Vec<(usize, usize)> = if *gso_ok {
                        gso_batches(tso).collect()
                    } else {
                        (0..tso.count).map(|i| (i, 1)).collect()
                    };
                    for (first, count) in per_send {
                        let iov_first = iovs.len();
                        for i in first..first + count {
                            iovs.push(iov(&headers[i * tso.hdr_len..(i + 1) * tso.hdr_len]));
                            iovs.push(iov(&pkt[tso.payload(i)]));
                        }
                        planned.push(Planned {
                            iov_first,
                            iov_count: 2 * count,
                            dst: SocketAddrV4::new(*dst, self.shared.port).into(),
                            gso: (count > 1).then_some(tso.seg_size() as u16),
                            segments: count,
                        });
                    }
                }
            }
        }
        self.send_planned(&mut iovs, &planned, bufs, gso_ok);
        bufs.ready = ready;
        bufs.tx_iovs = iovs;
        bufs.planned = planned;
        Ok(())
    }

    /// Writes one ICMP error (virtio-net header included) back into the TUN device.
    fn write_icmp(&self, b: &[u8]) {
        let c = &self.counters;
        // SAFETY: writes initialized bytes of `b`, alive for the call.
        let w = unsafe { libc::write(self.tun.as_raw_fd(), b.as_ptr().cast(), b.len()) };
        if w >= 0 {
            inc(&c.icmp_unreachable, 1);
        } else {
            inc(&c.tun_errors, 1);
        }
    }

    fn send_planned(
        &self,
        iovs: &mut [libc::iovec],
        planned: &[Planned],
        bufs: &mut Bufs,
        gso_ok: &mut bool,
    ) {
        let c = &self.counters;
        let addrs = &mut bufs.tx_addrs;
        addrs.clear();
        addrs.extend(planned.iter().map(|p| sockaddr(p.dst)));
        // One cmsg buffer per message: UDP_SEGMENT takes a u16.
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
        let control = &mut bufs.tx_control;
        control.clear();
        control.resize(space * planned.len(), 0);
        // SAFETY: all-zero mmsghdr is valid; every pointer set below stays alive until sendmmsg
        // returns (iovs, addrs and control are not touched meanwhile).
        let msgs = &mut bufs.tx_msgs;
        msgs.clear();
        msgs.extend(planned.iter().map(|_| unsafe { zeroed::<libc::mmsghdr>() }));
        for (i, p) in planned.iter().enumerate() {
            let m = &mut msgs[i].msg_hdr;
            m.msg_name = (&addrs[i].0 as *const libc::sockaddr_storage) as *mut libc::c_void;
            m.msg_namelen = addrs[i].1;
            m.msg_iov = iovs[p.iov_first..].as_mut_ptr();
            m.msg_iovlen = p.iov_count;
            if let Some(gso) = p.gso {
                let ctl = &mut control[i * space..(i + 1) * space];
                m.msg_control = ctl.as_mut_ptr().cast();
                m.msg_controllen = space;
                // SAFETY: the control buffer is CMSG_SPACE(u16) bytes, enough for one cmsg
                // carrying a u16, and msg_control/msg_controllen describe it.
                unsafe {
                    let cm = libc::CMSG_FIRSTHDR(m);
                    (*cm).cmsg_level = SOL_UDP;
                    (*cm).cmsg_type = UDP_SEGMENT;
                    (*cm).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(cm).cast::<u16>(), gso);
                }
            }
        }
        let mut start = 0;
        while start < msgs.len() {
            // SAFETY: msgs[start..] are fully initialized mmsghdr whose pointers are live.
            let rc = unsafe {
                libc::sendmmsg(
                    self.sock.as_raw_fd(),
                    msgs[start..].as_mut_ptr(),
                    (msgs.len() - start) as libc::c_uint,
                    0,
                )
            };
            if rc > 0 {
                for p in &planned[start..start + rc as usize] {
                    inc(&c.tx_datagrams, p.segments as u64);
                }
                start += rc as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EIO) if planned[start].gso.is_some() && *gso_ok => {
                    // The egress device cannot checksum or segment for us: fall back to one
                    // datagram per segment from the next batch on.
                    tracing::warn!(worker = self.id, "udp: UDP GSO send failed (EIO); sending one datagram per segment from now on");
                    *gso_ok = false;
                }
                _ => {}
            }
            // This message cannot go (peer unreachable, no buffer, ...): count it, go on.
            inc(&c.send_errors, 1);
            start += 1;
        }
    }

    fn udp_to_tun(
        &self,
        table: &PeerTable,
        wg: Option<&WgTable>,
        bufs: &mut Bufs,
        coalescer: &mut Coalescer,
        gro_ok: &mut bool,
    ) {
        let c = &self.counters;
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(size_of::<libc::c_int>() as u32) } as usize;
        // Made on the first receive and kept in `bufs` after: the receive path does not
        // allocate. The iovecs point into `bufs.rx`, whose buffers never move, and the kernel
        // does not change them; every header field is set again below before each call.
        let mut control = std::mem::take(&mut bufs.rx_control);
        control.resize(space * RX_BATCH, 0);
        let mut addrs = std::mem::take(&mut bufs.rx_addrs);
        // SAFETY: all-zero sockaddr_in/mmsghdr are valid values.
        addrs.resize_with(RX_BATCH, || unsafe { zeroed() });
        let mut iovs = std::mem::take(&mut bufs.rx_iovs);
        if iovs.is_empty() {
            iovs.extend(bufs.rx.iter_mut().map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            }));
        }
        let mut msgs = std::mem::take(&mut bufs.rx_msgs);
        // SAFETY: see above.
        msgs.resize_with(RX_BATCH, || unsafe { zeroed() });
        for _round in 0..4 {
            for (i, m) in msgs.iter_mut().enumerate() {
                let h = &mut m.msg_hdr;
                h.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
                h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                h.msg_iov = &mut iovs[i];
                h.msg_iovlen = 1;
                h.msg_control = control[i * space..].as_mut_ptr().cast();
                h.msg_controllen = space;
                h.msg_flags = 0;
                m.msg_len = 0;
            }
            // SAFETY: every mmsghdr points at live buffers of the stated sizes.
            let n = unsafe {
                libc::recvmmsg(
                    self.sock.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    RX_BATCH as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n <= 0 {
                break;
            }
            let n = n as usize;
            for i in 0..n {
                let len = msgs[i].msg_len as usize;
                let h = &msgs[i].msg_hdr;
                let seg = gro_size(h).unwrap_or(len).max(1);
                let datagrams = len.div_ceil(seg).max(1) as u64;
                inc(&c.rx_datagrams, datagrams);
                inc(&c.rx_bytes, len as u64);
                if h.msg_flags & libc::MSG_TRUNC != 0 {
                    inc(&c.drop_malformed, datagrams);
                    continue;
                }
                let Some(src) = from_sockaddr(&addrs[i]) else {
                    c.count_drop(DropReason::UnknownPeer, datagrams);
                    continue;
                };
                if !table.is_ready() {
                    c.count_drop(DropReason::NotReady, datagrams);
                    continue;
                }
                if let Some(wg) = wg {
                    self.open_run(wg, table, i, len, seg, src.ip(), bufs, coalescer, *gro_ok);
                    continue;
                }
                // Plain udp speaks IPv4 only (its peers are IPv4 endpoints).
                let SocketAddr::V4(src) = src else {
                    c.count_drop(DropReason::UnknownPeer, datagrams);
                    continue;
                };
                // One look-up per run: GRO only merges datagrams of one sender (address and
                // port).
                let subnets = match table.subnets_of(src) {
                    Ok(s) => s,
                    Err(r) => {
                        c.count_drop(r, datagrams);
                        continue;
                    }
                };
                let data = &bufs.rx[i][..len];
                let mut off = 0;
                while off < len {
                    let end = (off + seg).min(len);
                    let d = &data[off..end];
                    if ip_version(d) == Some(6) {
                        let Some(v6) = table.v6() else {
                            c.count_drop(table.no_v6_reason(), 1);
                            off = end;
                            continue;
                        };
                        {
                            // The endpoint was checked above; only its IPv6 subnets are new.
                            let subnets6 = table.subnets6_of(src).unwrap_or(&[]);
                            match parse_ipv6(d)
                                .map_err(DropReason::Malformed)
                                .and_then(|h| check_inner6(v6.own_subnet, subnets6, &h).map(|()| h))
                            {
                                Err(r) => c.count_drop(r, 1),
                                Ok(h) => {
                                    let span = Span {
                                        buf: i,
                                        start: off,
                                        end: off + h.total_len,
                                    };
                                    if *gro_ok {
                                        coalescer.push6(&d[..h.total_len], &h, span);
                                    } else {
                                        coalescer.push_single(span);
                                    }
                                }
                            }
                            off = end;
                            continue;
                        }
                    }
                    match parse_ipv4(d) {
                        Err(e) => c.count_drop(DropReason::Malformed(e), 1),
                        Ok(hdr) => match check_inner(table.own_subnet, subnets, &hdr) {
                            Err(r) => c.count_drop(r, 1),
                            Ok(()) => {
                                let span = Span {
                                    buf: i,
                                    start: off,
                                    end: off + hdr.total_len,
                                };
                                if *gro_ok {
                                    coalescer.push(&d[..hdr.total_len], &hdr, span);
                                } else {
                                    coalescer.push_single(span);
                                }
                            }
                        },
                    }
                    off = end;
                }
            }
            self.flush(coalescer, bufs, gro_ok, wg.is_some());
            if n < RX_BATCH {
                break;
            }
        }
        bufs.rx_control = control;
        bufs.rx_addrs = addrs;
        bufs.rx_iovs = iovs;
        bufs.rx_msgs = msgs;
    }

    fn flush(&self, coalescer: &mut Coalescer, bufs: &mut Bufs, gro_ok: &mut bool, opened: bool) {
        let c = &self.counters;
        let mut iov = std::mem::take(&mut bufs.write_iovs);
        for it in coalescer.items() {
            iov.clear();
            iov.push(libc::iovec {
                iov_base: it.head.as_ptr() as *mut libc::c_void,
                iov_len: it.head.len(),
            });
            for p in &it.parts {
                let src = if opened { &bufs.plain } else { &bufs.rx };
                let b = &src[p.buf][p.start..p.end];
                iov.push(libc::iovec {
                    iov_base: b.as_ptr() as *mut libc::c_void,
                    iov_len: b.len(),
                });
            }
            // SAFETY: every iovec points into live buffers (the item's head, the rx buffers).
            let w = unsafe {
                libc::writev(self.tun.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int)
            };
            if w >= 0 {
                inc(&c.rx_writes, 1);
            } else {
                inc(&c.tun_errors, 1);
                let e = io::Error::last_os_error();
                if it.segments() > 1 && e.raw_os_error() == Some(libc::EINVAL) && *gro_ok {
                    tracing::warn!(worker = self.id, "udp: the TUN device refused a coalesced packet ({e}); writing one packet per write from now on");
                    *gro_ok = false;
                }
            }
        }
        coalescer.clear();
        bufs.write_iovs = iov;
    }
}

impl Worker {
    /// One datagram, outside the batches: WireGuard handshakes, cookies and keepalives.
    fn send_one(&self, b: &[u8], to: SocketAddr) {
        let (sa, len) = sockaddr(to);
        // SAFETY: b and sa are live for the call and their lengths are passed.
        let rc = unsafe {
            libc::sendto(
                self.sock.as_raw_fd(),
                b.as_ptr().cast(),
                b.len(),
                0,
                (&sa as *const libc::sockaddr_storage).cast(),
                len,
            )
        };
        if rc < 0 {
            inc(&self.counters.send_errors, 1);
        } else {
            inc(&self.counters.tx_datagrams, 1);
        }
    }

    /// wireguard: seals every segment of the batch, back to back in one buffer, then sends runs
    /// of equal-sized data messages to one peer as UDP GSO sends (a TSO super-packet's segments
    /// seal to equal sizes but the last), the rest one by one.
    fn seal_and_send(
        &self,
        wg: &WgTable,
        ready: &[(usize, TxPacket, Ipv4Addr)],
        bufs: &mut Bufs,
        gso_ok: &mut bool,
    ) {
        let c = &self.counters;
        let mut sealed = std::mem::take(&mut bufs.sealed);
        let mut at = std::mem::take(&mut bufs.sealed_at);
        let mut segment = std::mem::take(&mut bufs.segment);
        sealed.clear();
        at.clear();
        let mut seal = |pt: &[u8], to: Ipv4Addr, sealed: &mut Vec<u8>| {
            let Some(peer) = inner_dst(pt).and_then(|dst| wg.route(to, dst)) else {
                c.count_drop(DropReason::UnknownPeer, 1);
                return;
            };
            let Some(ep) = peer.endpoint() else { return };
            let off = sealed.len();
            sealed.resize(off + pt.len() + 32 + 148, 0);
            match wg.seal(peer, pt, &mut sealed[off..]) {
                Some(b) => {
                    let n = b.len();
                    sealed.truncate(off + n);
                    at.push((off, n, ep));
                }
                None => sealed.truncate(off),
            }
        };
        for (slot, tx, dst) in ready {
            let pkt = &bufs.tx[*slot][VNET_HDR_LEN..];
            match tx {
                TxPacket::Single { len } => seal(&pkt[..*len], *dst, &mut sealed),
                TxPacket::Tso(tso) => {
                    let headers = &bufs.tx_headers[*slot];
                    for i in 0..tso.count {
                        segment.clear();
                        segment.extend_from_slice(&headers[i * tso.hdr_len..(i + 1) * tso.hdr_len]);
                        segment.extend_from_slice(&pkt[tso.payload(i)]);
                        seal(&segment, *dst, &mut sealed);
                    }
                }
            }
        }
        // Pointers are taken only now that `sealed` no longer grows.
        let mut iovs = std::mem::take(&mut bufs.tx_iovs);
        let mut planned = std::mem::take(&mut bufs.planned);
        iovs.clear();
        planned.clear();
        let mut k = 0;
        while k < at.len() {
            let (off, n, ep) = at[k];
            let data = sealed[off] == 4;
            let mut count = 1;
            if *gso_ok && data {
                while k + count < at.len()
                    && count < MAX_GSO_SEGMENTS
                    && (count + 1) * n <= MAX_UDP_PAYLOAD
                {
                    let (o2, n2, ep2) = at[k + count];
                    if ep2 != ep || sealed[o2] != 4 || n2 > n {
                        break;
                    }
                    count += 1;
                    // A shorter datagram can only end a GSO run.
                    if n2 < n {
                        break;
                    }
                }
            }
            let iov_first = iovs.len();
            for &(o, len, _) in &at[k..k + count] {
                iovs.push(libc::iovec {
                    iov_base: sealed[o..].as_ptr() as *mut libc::c_void,
                    iov_len: len,
                });
            }
            planned.push(Planned {
                iov_first,
                iov_count: count,
                dst: ep,
                gso: (count > 1).then_some(n as u16),
                segments: count,
            });
            k += count;
        }
        self.send_planned(&mut iovs, &planned, bufs, gso_ok);
        bufs.tx_iovs = iovs;
        bufs.planned = planned;
        bufs.sealed = sealed;
        bufs.sealed_at = at;
        bufs.segment = segment;
    }

    /// wireguard: opens one received run (GRO may have merged several datagrams of one sender)
    /// into `bufs.plain[i]` at the same offsets, checks each inner packet against the sending
    /// peer's allowed IPs and this node's subnet, and queues it for the coalescer. Handshake
    /// replies and the packets a handshake released go out at once, to the lease's endpoint.
    #[allow(clippy::too_many_arguments)]
    fn open_run(
        &self,
        wg: &WgTable,
        table: &PeerTable,
        i: usize,
        len: usize,
        seg: usize,
        src: IpAddr,
        bufs: &mut Bufs,
        coalescer: &mut Coalescer,
        gro_ok: bool,
    ) {
        let c = &self.counters;
        while bufs.plain.len() <= i {
            bufs.plain.push(vec![0u8; RX_BUF]);
        }
        let mut off = 0;
        while off < len {
            let end = (off + seg).min(len);
            let (opened, reply) = {
                let d = &bufs.rx[i][off..end];
                let out = &mut bufs.plain[i][off..end];
                let (o, r) = wg.open(src, d, out);
                let o = match o {
                    Opened::Packet(n, peer) => Ok((n, peer)),
                    Opened::Handled(peer) => Err(Some(peer)),
                    Opened::Rejected => Err(None),
                };
                (o, r)
            };
            match opened {
                Ok((n, peer)) if ip_version(&bufs.plain[i][off..off + n]) == Some(6) => {
                    // Dual stack: an IPv6 pod packet sealed by the same session.
                    let inner = &bufs.plain[i][off..off + n];
                    match wg_inner6(&peer.spec.allowed_ips, table, inner) {
                        Err(why) => c.count_drop(why, 1),
                        Ok(h) => {
                            let span = Span {
                                buf: i,
                                start: off,
                                end: off + h.total_len,
                            };
                            if gro_ok {
                                coalescer.push6(&inner[..h.total_len], &h, span);
                            } else {
                                coalescer.push_single(span);
                            }
                        }
                    }
                }
                Ok((n, peer)) => match parse_ipv4(&bufs.plain[i][off..off + n]) {
                    Err(e) => c.count_drop(DropReason::Malformed(e), 1),
                    Ok(hdr) if !allowed(peer, hdr.src) => {
                        c.count_drop(DropReason::SpoofedInnerSource, 1)
                    }
                    Ok(hdr) if !table.own_subnet.contains(hdr.dst) => {
                        c.count_drop(DropReason::NotForThisNode, 1)
                    }
                    Ok(hdr) => {
                        let span = Span {
                            buf: i,
                            start: off,
                            end: off + hdr.total_len,
                        };
                        if gro_ok {
                            coalescer.push(&bufs.plain[i][off..off + hdr.total_len], &hdr, span);
                        } else {
                            coalescer.push_single(span);
                        }
                    }
                },
                Err(Some(peer)) => {
                    if let Some(ep) = peer.endpoint() {
                        if let Some(n) = reply {
                            let msg = bufs.plain[i][off..off + n].to_vec();
                            self.send_one(&msg, ep);
                        }
                        while let Some(b) = wg.drain(peer, &mut bufs.control_msg) {
                            let b = b.to_vec();
                            self.send_one(&b, ep);
                        }
                    }
                }
                Err(None) => inc(&c.drop_unauthenticated, 1),
            }
            off = end;
        }
    }
}

/// The checks an inner IPv6 packet opened by a wireguard session passes before it goes to the
/// TUN device (dual stack): this node carries IPv6 (else the table's reason), a well-formed
/// header, a source inside the sending peer's IPv6 allowed IPs (an IPv4-mapped address never
/// matches an IPv4 one, [`source_allowed`]), a destination inside our IPv6 subnet.
fn wg_inner6(
    allowed_ips: &[ipnetwork::IpNetwork],
    table: &PeerTable,
    inner: &[u8],
) -> Result<Ipv6Header, DropReason> {
    let v6 = table.v6().ok_or_else(|| table.no_v6_reason())?;
    let h = parse_ipv6(inner).map_err(DropReason::Malformed)?;
    if !source_allowed(allowed_ips, inner) {
        return Err(DropReason::SpoofedInnerSource);
    }
    if !v6.own_subnet.contains(h.dst) {
        return Err(DropReason::NotForThisNode);
    }
    Ok(h)
}

/// The `UDP_GRO` segment size of a received run, when the kernel merged datagrams.
fn gro_size(h: &libc::msghdr) -> Option<usize> {
    if h.msg_controllen == 0 {
        return None;
    }
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of cmsgs; the CMSG
    // macros stay within that length.
    unsafe {
        let mut cm = libc::CMSG_FIRSTHDR(h);
        while !cm.is_null() {
            if (*cm).cmsg_level == SOL_UDP && (*cm).cmsg_type == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(cm).cast::<libc::c_int>());
                return (v > 0).then_some(v as usize);
            }
            cm = libc::CMSG_NXTHDR(h, cm);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wireguard receive path's inner IPv6 checks ([`wg_inner6`], what `open_run` runs on
    /// each opened IPv6 packet), against hostile packets from an authenticated peer.
    #[test]
    fn wireguard_inner_ipv6_is_checked_against_the_peer_and_our_subnet() {
        use super::super::packet::tests::ipv6;
        use super::super::packet::PacketError;
        use super::super::table::{UdpPeer, UdpPeer6, V6Spec};
        let peer = |n: u8| UdpPeer {
            subnet: format!("10.244.{n}.0/24").parse().unwrap(),
            public_ip: Ipv4Addr::new(198, 18, 0, n),
            port: 51820,
        };
        let v4 = PeerTable::new(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.1.0/24".parse().unwrap(),
            Ipv4Addr::new(198, 18, 0, 1),
            &[peer(2), peer(3)],
        );
        let table = v4.clone().with_v6(&V6Spec {
            network: "fd00:10:244::/56".parse().unwrap(),
            own_subnet: "fd00:10:244:1::/64".parse().unwrap(),
            peers: vec![UdpPeer6 {
                subnet: "fd00:10:244:2::/64".parse().unwrap(),
                public_ip: Ipv4Addr::new(198, 18, 0, 2),
                port: 51820,
            }],
        });
        // Peer 2's allowed IPs: both its subnets.
        let allowed: Vec<ipnetwork::IpNetwork> = vec![
            "10.244.2.0/24".parse().unwrap(),
            "fd00:10:244:2::/64".parse().unwrap(),
        ];
        let ok = ipv6("fd00:10:244:2::5", "fd00:10:244:1::7", 17, &[0; 8]);
        let h = wg_inner6(&allowed, &table, &ok).expect("a packet from its subnet to ours");
        assert_eq!(
            h.dst,
            "fd00:10:244:1::7".parse::<std::net::Ipv6Addr>().unwrap()
        );
        // A source in another peer's subnet (spoofed), or IPv4-mapped from the peer's IPv4
        // subnet (must not pass as IPv4).
        for src in ["fd00:10:244:3::5", "::ffff:10.244.2.5", "fd00:10:244:1::9"] {
            let p = ipv6(src, "fd00:10:244:1::7", 17, &[0; 8]);
            assert_eq!(
                wg_inner6(&allowed, &table, &p).unwrap_err(),
                DropReason::SpoofedInnerSource,
                "{src}"
            );
        }
        // A destination outside our subnet: another node's, or outside IPv6Network.
        for dst in ["fd00:10:244:3::7", "2001:db8::7"] {
            let p = ipv6("fd00:10:244:2::5", dst, 17, &[0; 8]);
            assert_eq!(
                wg_inner6(&allowed, &table, &p).unwrap_err(),
                DropReason::NotForThisNode,
                "{dst}"
            );
        }
        // Truncated: under 40 bytes, or shorter than the payload length says.
        assert!(matches!(
            wg_inner6(&allowed, &table, &ok[..39]).unwrap_err(),
            DropReason::Malformed(PacketError::Truncated { .. })
        ));
        assert!(matches!(
            wg_inner6(&allowed, &table, &ok[..ok.len() - 1]).unwrap_err(),
            DropReason::Malformed(PacketError::Truncated { .. })
        ));
        // A node without an IPv6 half drops it with the table's reason (waiting for the half,
        // or IPv4 only).
        assert_eq!(
            wg_inner6(&allowed, &v4.clone().with_v6_pending(), &ok).unwrap_err(),
            DropReason::NotReady
        );
        assert_eq!(
            wg_inner6(&allowed, &v4, &ok).unwrap_err(),
            DropReason::Malformed(PacketError::NotIpv4(6))
        );
        // Allowed IPs without an IPv6 network: nothing IPv6 passes.
        let only4: Vec<ipnetwork::IpNetwork> = vec!["10.244.2.0/24".parse().unwrap()];
        assert_eq!(
            wg_inner6(&only4, &table, &ok).unwrap_err(),
            DropReason::SpoofedInnerSource
        );
    }

    /// Runs a classic-BPF program the way the kernel does for a reuseport group (a load past
    /// the end returns 0), so the program's choices are tested without a socket.
    fn run_cbpf(prog: &[libc::sock_filter], pkt: &[u8]) -> u32 {
        let (mut a, mut x, mut mem, mut pc) = (0u32, 0u32, [0u32; 16], 0usize);
        let load = |off: usize, size: usize| -> Option<u32> {
            let b = pkt.get(off..off + size)?;
            Some(b.iter().fold(0u32, |v, &b| v << 8 | b as u32))
        };
        loop {
            let i = prog[pc];
            pc += 1;
            let (code, k) = (i.code as u32, i.k);
            match code {
                c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => match load(k as usize, 4) {
                    Some(v) => a = v,
                    None => return 0,
                },
                c if c == libc::BPF_LD | libc::BPF_H | libc::BPF_ABS => match load(k as usize, 2) {
                    Some(v) => a = v,
                    None => return 0,
                },
                c if c == libc::BPF_LD | libc::BPF_B | libc::BPF_ABS => match load(k as usize, 1) {
                    Some(v) => a = v,
                    None => return 0,
                },
                c if c == libc::BPF_LD | libc::BPF_H | libc::BPF_IND => {
                    match load((x + k) as usize, 2) {
                        Some(v) => a = v,
                        None => return 0,
                    }
                }
                c if c == libc::BPF_LDX | libc::BPF_B | libc::BPF_MSH => {
                    match load(k as usize, 1) {
                        Some(v) => x = 4 * (v & 0xf),
                        None => return 0,
                    }
                }
                c if c == libc::BPF_LD | libc::BPF_MEM => a = mem[k as usize],
                c if c == libc::BPF_LDX | libc::BPF_MEM => x = mem[k as usize],
                c if c == libc::BPF_ST => mem[k as usize] = a,
                c if c == libc::BPF_MISC | libc::BPF_TAX => x = a,
                c if c == libc::BPF_ALU | libc::BPF_XOR | libc::BPF_X => a ^= x,
                c if c == libc::BPF_ALU | libc::BPF_MUL | libc::BPF_K => a = a.wrapping_mul(k),
                c if c == libc::BPF_ALU | libc::BPF_RSH | libc::BPF_K => a >>= k,
                c if c == libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K => a %= k,
                c if c == libc::BPF_JMP | libc::BPF_JA => pc += k as usize,
                c if c == libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K => {
                    pc += if a == k { i.jt } else { i.jf } as usize
                }
                c if c == libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K => {
                    pc += if a & k != 0 { i.jt } else { i.jf } as usize
                }
                c if c == libc::BPF_ALU | libc::BPF_AND | libc::BPF_K => a &= k,
                c if c == libc::BPF_RET | libc::BPF_A => return a,
                c if c == libc::BPF_RET | libc::BPF_K => return k,
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
    }

    fn ipv4(proto: u8, src: [u8; 4], dst: [u8; 4], l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(l4);
        p
    }

    #[test]
    fn reuseport_hash_is_symmetric_and_spreads_flows() {
        let prog = reuseport_program(4);
        assert!(prog.len() < 64);
        let (a, b) = ([10, 244, 1, 2], [10, 244, 7, 3]);
        let ports = |s: u16, d: u16| [s.to_be_bytes(), d.to_be_bytes()].concat();
        // A TCP segment and its ACK: one worker.
        for (s, d) in [(40000, 5201), (5201, 80), (1, 65535)] {
            let there = run_cbpf(&prog, &ipv4(6, a, b, &ports(s, d)));
            let back = run_cbpf(&prog, &ipv4(6, b, a, &ports(d, s)));
            assert_eq!(there, back, "tcp {s}->{d}");
            assert!(there < 4);
        }
        // An ICMP echo and its reply differ in type and checksum: addresses only, one worker.
        let req = run_cbpf(&prog, &ipv4(1, a, b, &[8, 0, 0x12, 0x34, 0, 1, 0, 1]));
        let rep = run_cbpf(&prog, &ipv4(1, b, a, &[0, 0, 0x1a, 0x34, 0, 1, 0, 1]));
        let req2 = run_cbpf(&prog, &ipv4(1, a, b, &[8, 0, 0x12, 0x33, 0, 1, 0, 2]));
        assert_eq!(req, rep);
        assert_eq!(req, req2);
        // Many flows between the same two pods use every worker.
        let used: std::collections::BTreeSet<u32> = (0..64u16)
            .map(|i| run_cbpf(&prog, &ipv4(6, a, b, &ports(40000 + i, 5201))))
            .collect();
        assert_eq!(used.len(), 4, "{used:?}");
        // An options-carrying header: ports are read after the options.
        let mut opt = ipv4(17, a, b, &[]);
        opt[0] = 0x46;
        opt.extend_from_slice(&[1, 1, 1, 0]);
        let with_opts = |s: u16, d: u16| {
            let mut p = opt.clone();
            p.extend_from_slice(&ports(s, d));
            run_cbpf(&prog, &p)
        };
        let distinct: std::collections::BTreeSet<u32> =
            (0..64u16).map(|i| with_opts(1000 + i, 53)).collect();
        assert!(distinct.len() > 1);
        // Too short for the loads: worker 0, never a panic or an index past the group.
        assert_eq!(run_cbpf(&prog, &[0x45, 0, 0]), 0);
        assert_eq!(run_cbpf(&prog, &ipv4(6, a, b, &[])), 0);
        assert_eq!(
            run_cbpf(&reuseport_program(1), &ipv4(6, a, b, &ports(1, 2))),
            0
        );
        // A non-first fragment has no ports: hashed by addresses, like its first fragment
        // cannot be, but deterministically.
        let mut frag = ipv4(17, a, b, &ports(9, 9));
        frag[6] = 0x00;
        frag[7] = 0x10;
        assert_eq!(run_cbpf(&prog, &frag), run_cbpf(&prog, &ipv4(1, a, b, &[])));
    }

    /// The WireGuard program, fed real messages from boringtun: every datagram a peer sends us
    /// after a handshake (its data, our handshake response's counterpart, a cookie reply) goes to
    /// one worker, also after a new session changed the index's session byte; different peers
    /// use different workers. The inner-flow program scatters the same peer's data (the reason
    /// for a second program).
    #[test]
    fn wireguard_steering_keeps_a_peer_on_one_worker() {
        use crate::backend::wireguard::plan::PeerSpec;
        use crate::backend::wireguard::userspace::{Opened, WgTable};
        use crate::backend::wireguard::PrivateKey;

        const WORKERS: u32 = 4;
        let prog = wireguard_reuseport_program(WORKERS);
        let inner = reuseport_program(WORKERS);
        let spec = |k: &PrivateKey, subnet: String, ip: String| PeerSpec {
            public_key: k.public(),
            endpoint: Some(SocketAddrV4::new(ip.parse().unwrap(), 51820).into()),
            allowed_ips: vec![subnet.parse().unwrap()],
            psk: None,
            keepalive: 0,
        };
        let mut buf = vec![0u8; 4096];
        // Opens `d` at `to`; what `to` answers or releases for the network.
        let open = |to: &WgTable, src: &str, d: &[u8], buf: &mut Vec<u8>| -> Vec<Vec<u8>> {
            let (o, reply) = to.open(src.parse().unwrap(), d, buf);
            let mut back: Vec<Vec<u8>> = reply.map(|n| buf[..n].to_vec()).into_iter().collect();
            if let Opened::Handled(p) | Opened::Packet(_, p) = o {
                let mut b = vec![0u8; 4096];
                while let Some(x) = to.drain(p, &mut b) {
                    back.push(x.to_vec());
                }
            }
            back
        };
        let pkt = |n: u8| {
            ipv4(
                17,
                [10, 244, 2 + n, 7],
                [10, 244, 1, 5],
                &[0, 53, 0, 53, 0, 8, 0, 0],
            )
        };

        let kn = PrivateKey::generate();
        let keys: Vec<PrivateKey> = (0..8).map(|_| PrivateKey::generate()).collect();
        let specs: Vec<PeerSpec> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                spec(
                    k,
                    format!("10.244.{}.0/24", i + 2),
                    format!("198.18.0.{}", i + 2),
                )
            })
            .collect();
        let node = WgTable::new(&kn).update(&kn, &specs);
        let node_spec = spec(&kn, "10.244.1.0/24".into(), "198.18.0.1".into());
        let mut workers = std::collections::BTreeSet::new();
        let mut inner_scatter = std::collections::BTreeSet::new();
        for (i, k) in keys.iter().enumerate() {
            let src = format!("198.18.0.{}", i + 2);
            let peer = WgTable::new(k).update(k, std::slice::from_ref(&node_spec));
            // We initiate: the peer's handshake response carries our index at offset 8.
            let init = node
                .seal(&node.peers()[i], &pkt(i as u8), &mut buf)
                .unwrap()
                .to_vec();
            assert_eq!(run_cbpf(&prog, &init), 0, "initiations: worker 0");
            let resp = open(&peer, "198.18.0.1", &init, &mut buf);
            assert_eq!(resp.len(), 1);
            assert_eq!(resp[0][0], 2);
            let w = run_cbpf(&prog, &resp[0]);
            assert!(w < WORKERS);
            workers.insert(w);
            let ours = u32::from_le_bytes(resp[0][8..12].try_into().unwrap());
            assert_eq!(ours >> 8, node.peers()[i].index, "the index names the peer");
            // Our held packet leaves as data and confirms the session at the peer (a responder
            // sends nothing before that).
            for d in open(&node, &src, &resp[0], &mut buf) {
                open(&peer, "198.18.0.1", &d, &mut buf);
            }
            // The peer's data: our index at offset 4, one worker for all of it.
            for n in 0..16u8 {
                let d = peer
                    .seal(&peer.peers()[0], &pkt(n), &mut buf)
                    .unwrap()
                    .to_vec();
                assert_eq!(d[0], 4);
                assert_eq!(run_cbpf(&prog, &d), w, "peer {i} data {n}");
                inner_scatter.insert(run_cbpf(&inner, &d));
            }
            // A cookie reply to us names the same index.
            let mut cookie = vec![0u8; 64];
            cookie[0] = 3;
            cookie[4..8].copy_from_slice(&ours.to_le_bytes());
            assert_eq!(run_cbpf(&prog, &cookie), w);
            // The peer restarts and handshakes again: a new session of ours, a new low byte,
            // the same worker.
            let peer = WgTable::new(k).update(k, std::slice::from_ref(&node_spec));
            let init = peer
                .seal(&peer.peers()[0], &pkt(1), &mut buf)
                .unwrap()
                .to_vec();
            let resp = open(&node, &src, &init, &mut buf);
            let data = open(&peer, "198.18.0.1", &resp[0], &mut buf);
            assert!(!data.is_empty());
            for d in &data {
                assert_eq!(d[0], 4);
                let again = u32::from_le_bytes(d[4..8].try_into().unwrap());
                assert_ne!(again, ours, "a new session");
                assert_eq!(again >> 8, ours >> 8);
                assert_eq!(run_cbpf(&prog, d), w, "peer {i} after its restart");
            }
        }
        assert!(workers.len() > 1, "8 peers on one worker: {workers:?}");
        assert!(
            inner_scatter.len() > 1,
            "the inner-flow hash of ciphertext: {inner_scatter:?}"
        );
        // Too short, garbage, one worker: worker 0, never past the group.
        assert_eq!(run_cbpf(&prog, &[4, 0, 0]), 0);
        assert_eq!(run_cbpf(&prog, &[9; 64]), 0);
        assert_eq!(run_cbpf(&prog, &[]), 0);
        let one = wireguard_reuseport_program(1);
        let mut d = vec![0u8; 32];
        d[0] = 4;
        d[4..8].copy_from_slice(&0x1234_5601u32.to_le_bytes());
        assert_eq!(run_cbpf(&one, &d), 0);
    }

    /// A publish and a stop wake every sleeping thread at once, each through its own eventfd
    /// (one thread resetting a shared one would leave the others asleep).
    #[test]
    fn a_publish_or_a_stop_wakes_every_sleeper() {
        let net = "10.244.0.0/16".parse().unwrap();
        let own = "10.244.1.0/24".parse().unwrap();
        let shared = Arc::new(Shared::new(PeerTable::not_ready(net, own), 8285, 3).unwrap());
        for i in 0..3 {
            assert!(
                !sleep_on(shared.waker(i), 0),
                "woken before anything happened"
            );
        }
        shared.publish(PeerTable::new(net, own, "198.18.0.1".parse().unwrap(), &[]));
        for i in 0..3 {
            assert!(
                sleep_on(shared.waker(i), 0),
                "sleeper {i} missed the publish"
            );
            assert!(!sleep_on(shared.waker(i), 0), "sleeper {i} not reset");
        }
        // Threads asleep for far longer than the test waits: the stop is what ends their sleep.
        let sleepers: Vec<_> = (0..3)
            .map(|i| {
                let shared = shared.clone();
                std::thread::spawn(move || sleep_on(shared.waker(i), 600_000))
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(20));
        shared.request_stop();
        for t in sleepers {
            assert!(t.join().unwrap(), "woken by the stop, not the timeout");
        }
        assert!(shared.stopping());
        assert!(shared.waker(3).is_none());
    }

    /// Both families go to the kernel and come back unchanged (the IPv6 device's socket
    /// speaks IPv6, tweed-wg's IPv4); the lengths are the families' own.
    #[test]
    fn socket_addresses_of_both_families_round_trip() {
        for a in ["198.18.0.2:51820", "[2001:db8::2]:51821", "[fe80::1%3]:7"] {
            let a: SocketAddr = a.parse().unwrap();
            let (st, len) = sockaddr(a);
            let want = match a {
                SocketAddr::V4(_) => size_of::<libc::sockaddr_in>(),
                SocketAddr::V6(_) => size_of::<libc::sockaddr_in6>(),
            };
            assert_eq!(len as usize, want, "{a}");
            assert_eq!(from_sockaddr(&st), Some(a));
        }
        // SAFETY: all-zero sockaddr_storage is valid (family AF_UNSPEC).
        let unspec: libc::sockaddr_storage = unsafe { zeroed() };
        assert_eq!(from_sockaddr(&unspec), None);
    }

    /// An IPv6 socket binds IPv6-only, so the IPv4 port stays another socket's.
    #[test]
    fn an_ipv6_socket_leaves_the_ipv4_port_free() {
        let (v6, _) =
            udp_socket("[::1]:0".parse::<SocketAddr>().unwrap()).expect("IPv6 loopback socket");
        // SAFETY: getsockopt into a live c_int of the passed size.
        let mut only: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                v6.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                (&mut only as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!((rc, only), (0, 1));
    }

    #[test]
    fn stats_sum_workers() {
        let a = Counters::default();
        let b = Counters::default();
        a.count_drop(DropReason::UnknownPeer, 2);
        b.count_drop(DropReason::SpoofedInnerSource, 1);
        b.count_drop(DropReason::NotForThisNode, 1);
        let mut s = Stats::default();
        a.add_to(&mut s);
        b.add_to(&mut s);
        assert_eq!(s.rx_refused(), 4);
        assert_eq!(s.drop_unknown_peer, 2);
        // Two devices' workers (wireguard's separate): summed the same way.
        let mut both = s;
        both.add(&s);
        assert_eq!(both.rx_refused(), 8);
        assert_eq!(both.drop_spoofed_inner, 2);
    }
}
