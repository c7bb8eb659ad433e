//! The userspace WireGuard: boringtun's noise core (`Tunn`: handshakes, sessions, timers,
//! sealing and opening, no I/O) per peer, driven by the udp backend's workers, which keep their
//! TUN/UDP batching and offloads. This module is the part between them, still without I/O:
//! which peer a datagram belongs to, sealing one inner packet, opening one datagram.
//!
//! Peers are found the way WireGuard finds them, not by the outer source address: a handshake
//! initiation by the static key it carries, everything else by the receiver index we handed
//! out (its upper 24 bits name the peer). Replies and handshakes always go to the lease's
//! endpoint: this implementation never roams.
//!
//! Outgoing packets are sealed for the entry the workers' table routes them to (a node's IPv4
//! `PublicIP`) *and* whose allowed IPs hold the inner destination, as WireGuard's cryptokey
//! routing would: two leases naming one `PublicIP` (a stale lease of a re-keyed node, or a
//! hostile one) file two entries under that address, and the destination alone tells them
//! apart, so one lease can never take another's traffic by sorting after it.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey as XPublic, StaticSecret};

use super::key::{PrivateKey, PublicKey};
use super::plan::PeerSpec;

/// Handshake initiations per second before cookies are demanded (boringtun's device default).
const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// One peer's protocol state, kept across peer-table updates so a lease change elsewhere does
/// not cost this peer a handshake.
pub struct PeerState {
    pub spec: PeerSpec,
    pub index: u32,
    /// Shared with the entry this one replaced when only its endpoint or allowed IPs changed.
    pub tunn: Arc<Mutex<Tunn>>,
    /// Datagrams from this peer that failed authentication or replay checks.
    pub rx_rejected: AtomicU64,
}

impl PeerState {
    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.spec.endpoint
    }

    /// Time since the last handshake, bytes sent and received (inner).
    pub fn stats(&self) -> (Option<Duration>, usize, usize) {
        let (age, tx, rx, _, _) = lock(&self.tunn).stats();
        (age, tx, rx)
    }
}

fn lock(t: &Mutex<Tunn>) -> std::sync::MutexGuard<'_, Tunn> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// The node's side: its key and the peers, published to the workers as one value.
pub struct WgTable {
    secret: StaticSecret,
    public: XPublic,
    peers: Vec<Arc<PeerState>>,
    by_index: HashMap<u32, usize>,
    by_key: HashMap<[u8; 32], usize>,
    /// Every entry filed under an address: leases may share a `PublicIP`.
    by_public_ip: HashMap<Ipv4Addr, Vec<usize>>,
    limiter: Arc<RateLimiter>,
    next_index: u32,
    /// Datagrams no peer claims (unknown key or index, garbage).
    pub rx_unknown: AtomicU64,
}

impl std::fmt::Debug for WgTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgTable")
            .field("peers", &self.peers.len())
            .finish()
    }
}

/// What one received datagram asks of the worker.
pub enum Opened<'a> {
    /// An inner IPv4 or IPv6 packet of this length from `peer`, at the start of the output
    /// buffer; its source still has to be checked against the peer's allowed IPs ([`allowed`],
    /// [`super::dual::source_allowed`]).
    Packet(usize, &'a PeerState),
    /// Protocol traffic handled; the worker must send what [`WgTable::drain`] yields for `peer`.
    Handled(&'a PeerState),
    Rejected,
}

impl WgTable {
    pub fn new(key: &PrivateKey) -> WgTable {
        let secret = StaticSecret::from(*key.bytes());
        let public = XPublic::from(&secret);
        WgTable {
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            secret,
            public,
            peers: Vec::new(),
            by_index: HashMap::new(),
            by_key: HashMap::new(),
            by_public_ip: HashMap::new(),
            next_index: 1,
            rx_unknown: AtomicU64::new(0),
        }
    }

    /// The table for `peers`, keeping the state of every peer whose key and PSK are unchanged;
    /// each peer is filed under its IPv4 endpoint's address ([`route`](Self::route)).
    pub fn update(&self, key: &PrivateKey, peers: &[PeerSpec]) -> WgTable {
        let keyed: Vec<(PeerSpec, Option<Ipv4Addr>)> = peers
            .iter()
            .map(|p| (p.clone(), p.endpoint_v4().map(|e| *e.ip())))
            .collect();
        self.update_keyed(key, &keyed)
    }

    /// [`update`](Self::update) with each peer's routing key given: the address the udp peer
    /// table routes its subnets to. `separate`'s IPv6 device reaches its peers at IPv6
    /// endpoints, and files each under its node's IPv4 `PublicIP`, the key the peer table
    /// knows nodes by; several peers may share one ([`route`](Self::route) tells them apart).
    pub fn update_keyed(
        &self,
        key: &PrivateKey,
        peers: &[(PeerSpec, Option<Ipv4Addr>)],
    ) -> WgTable {
        let same_key = key.bytes() == self.secret.as_bytes();
        let mut t = if same_key {
            WgTable {
                secret: self.secret.clone(),
                public: self.public,
                limiter: self.limiter.clone(),
                peers: Vec::new(),
                by_index: HashMap::new(),
                by_key: HashMap::new(),
                by_public_ip: HashMap::new(),
                next_index: self.next_index,
                rx_unknown: AtomicU64::new(self.rx_unknown.load(Ordering::Relaxed)),
            }
        } else {
            let mut t = WgTable::new(key);
            t.next_index = self.next_index;
            t
        };
        for (spec, route_key) in peers {
            let kept = same_key
                .then(|| self.by_key.get(&spec.public_key.0))
                .flatten()
                .map(|&i| &self.peers[i])
                .filter(|p| p.spec.psk == spec.psk && p.spec.keepalive == spec.keepalive);
            let state = match kept {
                Some(p) if p.spec == *spec => p.clone(),
                // Endpoint or allowed IPs changed: same sessions, new addressing.
                Some(p) => Arc::new(PeerState {
                    spec: spec.clone(),
                    index: p.index,
                    tunn: p.tunn.clone(),
                    rx_rejected: AtomicU64::new(0),
                }),
                None => {
                    let index = t.next_index;
                    t.next_index = (t.next_index + 1) & 0x00ff_ffff;
                    Arc::new(PeerState {
                        spec: spec.clone(),
                        index,
                        tunn: Arc::new(Mutex::new(t.new_tunn(spec, index))),
                        rx_rejected: AtomicU64::new(0),
                    })
                }
            };
            t.insert(state, *route_key);
        }
        t
    }

    fn new_tunn(&self, spec: &PeerSpec, index: u32) -> Tunn {
        Tunn::new(
            self.secret.clone(),
            XPublic::from(spec.public_key.0),
            spec.psk,
            (spec.keepalive != 0).then_some(spec.keepalive),
            index,
            Some(self.limiter.clone()),
        )
    }

    fn insert(&mut self, p: Arc<PeerState>, route_key: Option<Ipv4Addr>) {
        let i = self.peers.len();
        self.by_index.insert(p.index, i);
        self.by_key.insert(p.spec.public_key.0, i);
        if let Some(k) = route_key {
            self.by_public_ip.entry(k).or_default().push(i);
        }
        self.peers.push(p);
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.public.to_bytes())
    }

    pub fn peers(&self) -> &[Arc<PeerState>] {
        &self.peers
    }

    /// The entry an inner packet for `dst` routed to `node` is sealed for: filed under `node`
    /// (its IPv4 endpoint's address, or the key [`update_keyed`](Self::update_keyed) gave it)
    /// and holding `dst` in its allowed IPs. Never another entry under the same address: each
    /// lease's traffic goes only to the session and endpoint of the lease that claims it.
    pub fn route(&self, node: Ipv4Addr, dst: IpAddr) -> Option<&PeerState> {
        self.by_public_ip
            .get(&node)?
            .iter()
            .map(|&i| &*self.peers[i])
            .find(|p| p.spec.allowed_ips.iter().any(|n| n.contains(dst)))
    }

    /// Seals one inner packet for `peer` into `out` (at least `pkt.len() + 32` and 148 bytes).
    /// The bytes to send: a data message, or a handshake initiation when there is no session
    /// yet (the packet then waits in the peer's queue and leaves once the handshake is done).
    pub fn seal<'a>(&self, peer: &PeerState, pkt: &[u8], out: &'a mut [u8]) -> Option<&'a [u8]> {
        match lock(&peer.tunn).encapsulate(pkt, out) {
            TunnResult::WriteToNetwork(b) => Some(b),
            _ => None,
        }
    }

    /// Opens one datagram from `src` into `out` (at least the datagram's length).
    pub fn open(&self, src: IpAddr, d: &[u8], out: &mut [u8]) -> (Opened<'_>, Option<usize>) {
        let Some(peer) = self.peer_of(d) else {
            self.rx_unknown.fetch_add(1, Ordering::Relaxed);
            return (Opened::Rejected, None);
        };
        let mut t = lock(&peer.tunn);
        match t.decapsulate(Some(src), d, out) {
            // An inner IPv6 packet (dual stack) is the worker's to check as well: its source
            // against the peer's IPv6 allowed IPs, its destination against our IPv6 subnet.
            TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => {
                (Opened::Packet(p.len(), peer), None)
            }
            // A keepalive opens to nothing: nothing to write.
            TunnResult::Done => (Opened::Handled(peer), None),
            TunnResult::WriteToNetwork(b) => {
                let n = b.len();
                (Opened::Handled(peer), Some(n))
            }
            TunnResult::Err(e) => {
                tracing::trace!(peer = %peer.spec.public_key, "wireguard: datagram refused: {e:?}");
                peer.rx_rejected.fetch_add(1, Ordering::Relaxed);
                (Opened::Rejected, None)
            }
        }
    }

    /// What `peer` has queued for the network after a handshake step (packets held back for
    /// the session); call until `None`.
    pub fn drain<'a>(&self, peer: &PeerState, out: &'a mut [u8]) -> Option<&'a [u8]> {
        match lock(&peer.tunn).decapsulate(None, &[], out) {
            TunnResult::WriteToNetwork(b) => Some(b),
            _ => None,
        }
    }

    /// Runs `peer`'s timers (rekey, keepalive, handshake retry); what to send, if anything.
    /// A peer with no session yet gets a handshake initiation without waiting for traffic: after
    /// our restart the peer still seals with keys we lost, and a one-way stream from it would
    /// otherwise stay dark until its own rekey timers fire (seen: several seconds).
    pub fn tick<'a>(&self, peer: &PeerState, out: &'a mut [u8]) -> Option<&'a [u8]> {
        let mut t = lock(&peer.tunn);
        let n = match t.update_timers(out) {
            TunnResult::WriteToNetwork(b) => b.len(),
            _ if t.time_since_last_handshake().is_none() => {
                // `false`: no resend while one is in flight (the timers retry it).
                match t.format_handshake_initiation(out, false) {
                    TunnResult::WriteToNetwork(b) => b.len(),
                    _ => return None,
                }
            }
            _ => return None,
        };
        Some(&out[..n])
    }

    /// Runs every peer's timers ([`tick`](Self::tick)) and hands `send` what to send where. Called
    /// every 250 ms and at once for a new table, so a restarted agent's peers get their
    /// handshake initiations right away. Also restarts the handshake count of the cookie
    /// logic once a second: it counts handshakes per second, and nothing else resets it (after
    /// the 100th handshake of the agent's life, every handshake would get a cookie reply, and
    /// the initiator retries only after 5 s).
    pub fn tick_all(&self, out: &mut [u8], mut send: impl FnMut(&[u8], SocketAddr)) {
        // A no-op until a second has passed since the last reset.
        self.limiter.reset_count();
        for p in &self.peers {
            if let (Some(b), Some(ep)) = (self.tick(p, out), p.endpoint()) {
                send(b, ep);
            }
        }
    }

    /// The peer a datagram is for: a handshake initiation by the static key inside it (one DH,
    /// rate-limited by the peer's Tunn after), anything else by our receiver index.
    fn peer_of(&self, d: &[u8]) -> Option<&PeerState> {
        let i = match Tunn::parse_incoming_packet(d).ok()? {
            Packet::HandshakeInit(p) => {
                let half = parse_handshake_anon(&self.secret, &self.public, &p).ok()?;
                *self.by_key.get(&half.peer_static_public)?
            }
            Packet::HandshakeResponse(p) => *self.by_index.get(&(p.receiver_idx >> 8))?,
            Packet::PacketCookieReply(p) => *self.by_index.get(&(p.receiver_idx >> 8))?,
            Packet::PacketData(p) => *self.by_index.get(&(p.receiver_idx >> 8))?,
        };
        Some(&self.peers[i])
    }
}

/// The destination of an inner IPv4 or IPv6 packet (what [`WgTable::route`] needs), `None`
/// when it is too short to hold one.
pub fn inner_dst(pkt: &[u8]) -> Option<IpAddr> {
    match pkt.first()? >> 4 {
        4 => {
            let b: [u8; 4] = pkt.get(16..20)?.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        6 => {
            let b: [u8; 16] = pkt.get(24..40)?.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        _ => None,
    }
}

/// Whether an inner IPv4 source may come from a peer: inside its IPv4 allowed IPs (an IPv6
/// allowed network never admits an IPv4 source).
pub fn allowed(peer: &PeerState, src: Ipv4Addr) -> bool {
    peer.spec.allowed_ips.iter().any(|n| match n {
        ipnetwork::IpNetwork::V4(n) => n.contains(src),
        ipnetwork::IpNetwork::V6(_) => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::udp::packet::tests::ipv4;

    fn spec(k: &PrivateKey, subnet: &str, ip: &str, psk: Option<[u8; 32]>) -> PeerSpec {
        spec_of(k.public(), subnet, ip, psk)
    }

    fn spec_of(public_key: PublicKey, subnet: &str, ip: &str, psk: Option<[u8; 32]>) -> PeerSpec {
        PeerSpec {
            public_key,
            endpoint: Some(std::net::SocketAddrV4::new(ip.parse().unwrap(), 51820).into()),
            allowed_ips: vec![subnet.parse().unwrap()],
            psk,
            keepalive: 0,
        }
    }

    /// Delivers every datagram `from` produced to `to`, returning the inner packets that came
    /// out and the datagrams `to` sends back.
    fn deliver(to: &WgTable, src: &str, d: &[u8]) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let mut out = vec![0u8; 2048];
        let (mut pkts, mut back) = (Vec::new(), Vec::new());
        let (o, reply) = to.open(src.parse().unwrap(), d, &mut out);
        let peer = match o {
            Opened::Packet(n, peer) => {
                pkts.push(out[..n].to_vec());
                Some(peer.spec.public_key)
            }
            Opened::Handled(peer) => Some(peer.spec.public_key),
            Opened::Rejected => None,
        };
        if let Some(n) = reply {
            back.push(out[..n].to_vec());
        }
        if let Some(k) = peer {
            let p = &to.peers[to.by_key[&k.0]];
            let mut buf = vec![0u8; 2048];
            while let Some(b) = to.drain(p, &mut buf) {
                back.push(b.to_vec());
            }
        }
        (pkts, back)
    }

    fn seal_to_first_peer(t: &WgTable, pkt: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; 2048];
        t.seal(&t.peers()[0], pkt, &mut out).unwrap().to_vec()
    }

    fn pair(psk_a: Option<[u8; 32]>, psk_b: Option<[u8; 32]>) -> (WgTable, WgTable, PrivateKey) {
        let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
        let a = WgTable::new(&ka).update(&ka, &[spec(&kb, "10.244.2.0/24", "198.18.0.2", psk_a)]);
        let b = WgTable::new(&kb).update(&kb, &[spec(&ka, "10.244.1.0/24", "198.18.0.1", psk_b)]);
        (a, b, ka)
    }

    /// A's first packet triggers the handshake, is held, and arrives once the session is up;
    /// on the wire no byte of it is in clear.
    #[test]
    fn handshake_then_data_both_ways_and_no_plaintext_on_the_wire() {
        let (a, b, _) = pair(None, None);
        let secret = b"tweed-known-payload-0123456789";
        let pkt = ipv4("10.244.1.5", "10.244.2.7", 17, secret);
        let pa = &a.peers()[0];
        let mut out = vec![0u8; 2048];
        let init = a.seal(pa, &pkt, &mut out).unwrap().to_vec();
        assert_eq!(init[0], 1, "handshake initiation");
        let (got, resp) = deliver(&b, "198.18.0.1", &init);
        assert!(got.is_empty());
        assert_eq!(resp.len(), 1);
        assert_eq!(resp[0][0], 2, "handshake response");
        // The response completes A's handshake; the held packet then leaves as data.
        let (got, queued) = deliver(&a, "198.18.0.2", &resp[0]);
        assert!(got.is_empty());
        assert!(queued.iter().any(|d| d[0] == 4));
        let mut inner = Vec::new();
        for d in &queued {
            assert!(!d.windows(secret.len()).any(|w| w == secret));
            inner.extend(deliver(&b, "198.18.0.1", d).0);
        }
        assert_eq!(inner, vec![pkt.clone()]);
        // And back, with the session now established on both sides.
        let reply = ipv4("10.244.2.7", "10.244.1.5", 17, b"pong");
        let d = b.seal(&b.peers()[0], &reply, &mut out).unwrap().to_vec();
        assert_eq!(d[0], 4);
        assert_eq!(deliver(&a, "198.18.0.2", &d).0, vec![reply]);
        let (age, tx, rx) = a.peers()[0].stats();
        assert!(age.is_some());
        assert!(tx >= pkt.len() && rx > 0, "{tx} {rx}");
        // A replayed datagram is refused and counted.
        assert!(deliver(&a, "198.18.0.2", &d).0.is_empty());
        assert_eq!(a.peers()[0].rx_rejected.load(Ordering::Relaxed), 1);
    }

    /// Dual stack: an inner IPv6 packet rides the same session and comes out as a packet for
    /// the worker to check (not swallowed as protocol traffic), and its source is checked
    /// against the sender's IPv6 allowed IPs, so another subnet's source is refused.
    #[test]
    fn an_inner_ipv6_packet_rides_the_session_and_is_checked_against_allowed_ips() {
        use crate::backend::udp::packet::tests::ipv6;
        use crate::backend::wireguard::dual::source_allowed;
        let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
        let dual = |k: &PrivateKey, v4: &str, v6: &str, ip: &str| PeerSpec {
            allowed_ips: vec![v4.parse().unwrap(), v6.parse().unwrap()],
            ..spec(k, v4, ip, None)
        };
        let a = WgTable::new(&ka).update(
            &ka,
            &[dual(
                &kb,
                "10.244.2.0/24",
                "fd00:10:244:2::/64",
                "198.18.0.2",
            )],
        );
        let b = WgTable::new(&kb).update(
            &kb,
            &[dual(
                &ka,
                "10.244.1.0/24",
                "fd00:10:244:1::/64",
                "198.18.0.1",
            )],
        );
        let secret = b"tweed-known-v6-payload-0123456789";
        let pkt = ipv6("fd00:10:244:1::5", "fd00:10:244:2::7", 17, secret);
        let init = seal_to_first_peer(&a, &pkt);
        let (_, resp) = deliver(&b, "198.18.0.1", &init);
        let (_, queued) = deliver(&a, "198.18.0.2", &resp[0]);
        let mut inner = Vec::new();
        for d in &queued {
            assert!(!d.windows(secret.len()).any(|w| w == secret));
            inner.extend(deliver(&b, "198.18.0.1", d).0);
        }
        assert_eq!(inner, vec![pkt.clone()]);
        let from_a = &b.peers()[0].spec.allowed_ips;
        assert!(source_allowed(from_a, &pkt));
        // A spoofed source (B's own subnet, or a third node's) opens but is not allowed.
        for src in ["fd00:10:244:2::9", "fd00:10:244:3::1"] {
            let spoofed = ipv6(src, "fd00:10:244:2::7", 17, b"x");
            let d = seal_to_first_peer(&a, &spoofed);
            let got = deliver(&b, "198.18.0.1", &d).0;
            assert_eq!(got, vec![spoofed.clone()]);
            assert!(!source_allowed(from_a, &got[0]), "{src}");
        }
    }

    #[test]
    fn a_wrong_psk_or_a_stranger_gets_nothing_through() {
        let (a, b, _) = pair(Some([1; 32]), Some([2; 32]));
        let init = seal_to_first_peer(&a, &ipv4("10.244.1.5", "10.244.2.7", 1, b"x"));
        let (got, resp) = deliver(&b, "198.18.0.1", &init);
        assert!(got.is_empty());
        // B answers (it cannot check the PSK before), but A cannot complete the handshake.
        for r in resp {
            let (got, back) = deliver(&a, "198.18.0.2", &r);
            assert!(got.is_empty() && back.iter().all(|d| d[0] != 4));
        }
        // A node nobody knows: its initiation names no peer.
        let stranger_key = PrivateKey::generate();
        let s = WgTable::new(&stranger_key).update(
            &stranger_key,
            &[spec_of(b.public_key(), "10.244.2.0/24", "198.18.0.2", None)],
        );
        let init = seal_to_first_peer(&s, &ipv4("10.244.9.1", "10.244.2.7", 1, b"x"));
        assert!(deliver(&b, "198.18.0.9", &init).1.is_empty());
        assert!(b.rx_unknown.load(Ordering::Relaxed) >= 1);
        // Garbage of every short length is refused, never a panic.
        for n in 0..200 {
            let junk: Vec<u8> = (0..n).map(|i| (i * 7 + n) as u8).collect();
            assert!(deliver(&b, "198.18.0.1", &junk).0.is_empty());
        }
    }

    #[test]
    fn an_update_keeps_unchanged_peers_sessions() {
        let (a, _, ka) = pair(None, None);
        let before = a.peers()[0].clone();
        let same = a.update(&ka, std::slice::from_ref(&before.spec));
        assert!(Arc::ptr_eq(&before, &same.peers()[0]));
        let kc = PrivateKey::generate();
        let grown = a.update(
            &ka,
            &[
                before.spec.clone(),
                spec(&kc, "10.244.3.0/24", "198.18.0.3", None),
            ],
        );
        assert!(Arc::ptr_eq(&before, &grown.peers()[0]));
        assert_ne!(grown.peers()[1].index, before.index);
        assert!(grown
            .route("198.18.0.3".parse().unwrap(), "10.244.3.9".parse().unwrap())
            .is_some());
    }

    /// `separate`'s IPv6 device: peers at IPv6 endpoints, filed under their node's IPv4
    /// address (what the workers' peer table routes to). The handshake runs between IPv6
    /// endpoints, inner IPv6 packets come through, and a rotated key keeps the filing.
    #[test]
    fn an_ipv6_device_files_peers_under_their_node_and_sends_to_their_ipv6_endpoint() {
        use crate::backend::udp::packet::tests::ipv6;
        let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
        let v6spec = |k: &PrivateKey, subnet: &str, ep: &str| PeerSpec {
            public_key: k.public(),
            endpoint: Some(ep.parse().unwrap()),
            allowed_ips: vec![subnet.parse().unwrap()],
            psk: None,
            keepalive: 0,
        };
        let node_b: Ipv4Addr = "198.18.0.2".parse().unwrap();
        let a = WgTable::new(&ka).update_keyed(
            &ka,
            &[(
                v6spec(&kb, "fd00:10:244:2::/64", "[2001:db8::2]:51821"),
                Some(node_b),
            )],
        );
        let b = WgTable::new(&kb).update_keyed(
            &kb,
            &[(
                v6spec(&ka, "fd00:10:244:1::/64", "[2001:db8::1]:51821"),
                Some("198.18.0.1".parse().unwrap()),
            )],
        );
        let b6: IpAddr = "fd00:10:244:2::7".parse().unwrap();
        let pa = a.route(node_b, b6).expect("filed under the node");
        assert_eq!(pa.endpoint().unwrap().to_string(), "[2001:db8::2]:51821");
        // No IPv4 endpoint: the plain update would file it under nothing.
        assert!(WgTable::new(&ka)
            .update(&ka, std::slice::from_ref(&pa.spec))
            .route(node_b, b6)
            .is_none());
        // The timers' initiation goes to the IPv6 endpoint; the handshake completes there.
        let mut out = vec![0u8; 2048];
        let mut sent = Vec::new();
        a.tick_all(&mut out, |d, ep| sent.push((d.to_vec(), ep)));
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].1.to_string(), "[2001:db8::2]:51821");
        let (_, resp) = deliver(&b, "2001:db8::1", &sent[0].0);
        assert_eq!(resp.len(), 1);
        let _ = deliver(&a, "2001:db8::2", &resp[0]);
        let pkt = ipv6(
            "fd00:10:244:1::5",
            "fd00:10:244:2::7",
            17,
            b"over the v6 underlay",
        );
        let d = seal_to_first_peer(&a, &pkt);
        assert_eq!(d[0], 4, "a data message: the session is up");
        assert_eq!(deliver(&b, "2001:db8::1", &d).0, vec![pkt]);

        let rotated = PrivateKey::generate();
        let a2 = a.update_keyed(&rotated, &[(pa.spec.clone(), Some(node_b))]);
        assert_eq!(a2.public_key(), rotated.public());
        assert!(a2.route(node_b, b6).is_some());
    }

    /// Review H1: a hostile lease names the victim's `PublicIP`, its own `PublicIPv6` and a key
    /// that sorts after the victim's (so it is filed last, in either order here). The victim's
    /// IPv6 subnet is still sealed for the victim's session and sent to the victim's endpoint,
    /// and a packet sealed so opens only at the victim; the attacker gets only its own subnet.
    #[test]
    fn a_lease_sharing_a_public_ip_never_gets_the_others_traffic() {
        use crate::backend::udp::packet::tests::ipv6;
        let (ka, kv) = (PrivateKey::generate(), PrivateKey::generate());
        // Grinding is trivial; here the attacker's key is whichever of two sorts last.
        let (kv, kx) = {
            let kx = PrivateKey::generate();
            if kx.public() > kv.public() {
                (kv, kx)
            } else {
                (kx, kv)
            }
        };
        assert!(kx.public() > kv.public());
        let v6spec = |k: &PrivateKey, subnet: &str, ep: &str| PeerSpec {
            public_key: k.public(),
            endpoint: Some(ep.parse().unwrap()),
            allowed_ips: vec![subnet.parse().unwrap()],
            psk: None,
            keepalive: 0,
        };
        let shared: Ipv4Addr = "198.18.0.2".parse().unwrap();
        let victim = v6spec(&kv, "fd00:10:244:2::/64", "[2001:db8::2]:51821");
        let attacker = v6spec(&kx, "fd00:10:244:66::/64", "[2001:db8::66]:51821");
        // What `UserDev6::reconcile` files: both under the node's IPv4, in key order.
        for peers in [
            vec![
                (victim.clone(), Some(shared)),
                (attacker.clone(), Some(shared)),
            ],
            vec![
                (attacker.clone(), Some(shared)),
                (victim.clone(), Some(shared)),
            ],
        ] {
            let a = WgTable::new(&ka).update_keyed(&ka, &peers);
            let to_victim = ipv6("fd00:10:244:1::5", "fd00:10:244:2::7", 17, b"secret");
            let dst = inner_dst(&to_victim).unwrap();
            let p = a.route(shared, dst).expect("the victim's entry");
            assert_eq!(p.spec.public_key, kv.public());
            assert_eq!(p.endpoint().unwrap().to_string(), "[2001:db8::2]:51821");
            let to_x = ipv6("fd00:10:244:1::5", "fd00:10:244:66::1", 17, b"x");
            let x = a.route(shared, inner_dst(&to_x).unwrap()).unwrap();
            assert_eq!(x.spec.public_key, kx.public());
            // Nobody's subnet: no entry, rather than whichever was filed last.
            assert!(a
                .route(shared, "fd00:10:244:9::1".parse().unwrap())
                .is_none());
            assert!(a.route(shared, "10.244.2.1".parse().unwrap()).is_none());

            // What the worker sends for the victim's packet (a handshake initiation first)
            // is the victim's to answer and never the attacker's.
            let mut out = vec![0u8; 2048];
            let init = a
                .seal(p, &to_victim, &mut out)
                .expect("an initiation")
                .to_vec();
            let back = |kb: &PrivateKey, spec: &PeerSpec| {
                let t = WgTable::new(kb).update_keyed(
                    kb,
                    &[(
                        PeerSpec {
                            public_key: ka.public(),
                            endpoint: Some("[2001:db8::1]:51821".parse().unwrap()),
                            allowed_ips: vec!["fd00:10:244:1::/64".parse().unwrap()],
                            ..spec.clone()
                        },
                        Some("198.18.0.1".parse().unwrap()),
                    )],
                );
                let (_, resp) = deliver(&t, "2001:db8::1", &init);
                (t, resp)
            };
            let (_, from_x) = back(&kx, &attacker);
            assert!(from_x.is_empty(), "the attacker cannot answer it");
            let (v, from_v) = back(&kv, &victim);
            assert_eq!(from_v.len(), 1, "the victim answers it");
            let (opened, _) = deliver(&a, "2001:db8::2", &from_v[0]);
            assert!(opened.is_empty());
            let mut out = vec![0u8; 2048];
            let d = a
                .seal(a.route(shared, dst).unwrap(), &to_victim, &mut out)
                .unwrap()
                .to_vec();
            assert_eq!(d[0], 4, "a data message: the session is up");
            assert_eq!(deliver(&v, "2001:db8::1", &d).0, vec![to_victim.clone()]);
        }
    }

    #[test]
    fn the_inner_destination_is_read_from_either_family() {
        assert_eq!(
            inner_dst(&ipv4("10.244.1.5", "10.244.2.7", 17, b"x")),
            Some("10.244.2.7".parse().unwrap())
        );
        use crate::backend::udp::packet::tests::ipv6;
        assert_eq!(
            inner_dst(&ipv6("fd00::1", "fd00:10:244:2::7", 17, b"x")),
            Some("fd00:10:244:2::7".parse().unwrap())
        );
        for short in [&[][..], &[0x45; 19][..], &[0x60; 39][..], &[0x10; 60][..]] {
            assert_eq!(inner_dst(short), None);
        }
    }

    /// Everything `tick_all` asks to send, as (message type, endpoint IP).
    fn ticked(t: &WgTable) -> Vec<(u8, IpAddr)> {
        let mut out = vec![0u8; 2048];
        let mut sent = Vec::new();
        t.tick_all(&mut out, |b, ep| sent.push((b[0], ep.ip())));
        sent
    }

    /// A new table (a restarted agent's first) starts a handshake with every peer at once; one
    /// in flight is not sent again, and a later table adds only its new peers' initiations.
    #[test]
    fn a_new_table_sends_every_peer_an_initiation_at_once() {
        let k = PrivateKey::generate();
        let peers: Vec<PeerSpec> = (2..5)
            .map(|i| {
                spec(
                    &PrivateKey::generate(),
                    &format!("10.244.{i}.0/24"),
                    &format!("198.18.0.{i}"),
                    None,
                )
            })
            .collect();
        let t = WgTable::new(&k).update(&k, &peers);
        let mut sent = ticked(&t);
        sent.sort();
        let want: Vec<(u8, IpAddr)> = (2..5)
            .map(|i| (1, format!("198.18.0.{i}").parse().unwrap()))
            .collect();
        assert_eq!(sent, want);
        assert_eq!(ticked(&t), vec![], "in flight: not resent on the next tick");
        let mut more = peers.clone();
        more.push(spec(
            &PrivateKey::generate(),
            "10.244.9.0/24",
            "198.18.0.9",
            None,
        ));
        let t2 = t.update(&k, &more);
        assert_eq!(ticked(&t2), vec![(1, "198.18.0.9".parse().unwrap())]);
    }

    /// The cookie logic counts handshakes per second: past 100 it answers with cookie replies
    /// (the initiator then retries only after 5 s). Ticking restarts the count once a second,
    /// so a long-lived agent still answers handshakes.
    #[test]
    fn the_handshake_count_restarts_every_second() {
        let (a, b, _) = pair(None, None);
        let pa = &a.peers()[0];
        let mut out = vec![0u8; 2048];
        let mut init = || match lock(&pa.tunn).format_handshake_initiation(&mut out, true) {
            TunnResult::WriteToNetwork(d) => d.to_vec(),
            _ => panic!("no initiation"),
        };
        let answer = |d: &[u8]| {
            let (_, back) = deliver(&b, "198.18.0.1", d);
            back.first().map(|m| m[0])
        };
        for n in 0..HANDSHAKE_RATE_LIMIT {
            assert_ne!(answer(&init()), Some(3), "cookie reply at handshake {n}");
        }
        assert_eq!(answer(&init()), Some(3), "over the limit: a cookie reply");
        std::thread::sleep(Duration::from_millis(1050));
        assert_eq!(
            answer(&init()),
            Some(3),
            "a second later, not ticked: still"
        );
        let _ = ticked(&b);
        assert_eq!(answer(&init()), Some(2), "ticked: a handshake response");
    }
}
