//! The peer table and the two per-packet decisions made with it: where an outgoing inner packet
//! goes (encap side) and whether an incoming datagram may enter this node (decap side). Pure: the
//! workers hold an `Arc<PeerTable>` that the control plane swaps when leases change.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};

use ipnetwork::{Ipv4Network, Ipv6Network};

use super::packet::{
    is_link_local_traffic, parse_ipv4, parse_ipv6, Ipv4Header, Ipv6Header, PacketError,
};
use crate::backend::route::canonical;

/// A remote node: packets for `subnet` go to `public_ip`, and only `public_ip:port` may send
/// packets from `subnet`. The port matters: any process on the peer host (a pod with host
/// networking, or one whose traffic is masqueraded to the node's address) can send from
/// `public_ip`, but only the peer's agent holds `port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UdpPeer {
    pub subnet: Ipv4Network,
    pub public_ip: Ipv4Addr,
    pub port: u16,
}

/// A remote node's IPv6 half in a dual-stack network (tweed's own: flannel's udp has none):
/// packets for `subnet` go to the same `public_ip:port` as the node's IPv4 packets, over the
/// IPv4 underlay, and only that endpoint may send packets from `subnet`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UdpPeer6 {
    pub subnet: Ipv6Network,
    pub public_ip: Ipv4Addr,
    pub port: u16,
}

/// The IPv6 half of the table's inputs: the network's `IPv6Network`, this node's IPv6 subnet and
/// the peers' IPv6 halves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V6Spec {
    pub network: Ipv6Network,
    pub own_subnet: Ipv6Network,
    pub peers: Vec<UdpPeer6>,
}

/// The IPv6 half of a built table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V6Table {
    pub network: Ipv6Network,
    pub own_subnet: Ipv6Network,
    /// Longest prefix first; per prefix length, network address -> peer.
    by_prefix: Vec<(u8, HashMap<u128, Ipv4Addr>)>,
}

/// What a public IP may send: from which port, packets of which subnets.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sender {
    port: u16,
    subnets: Vec<Ipv4Network>,
    subnets6: Vec<Ipv6Network>,
}

/// `n` with its host bits cleared (a lease may name an address inside the subnet).
fn canonical6(n: Ipv6Network) -> Ipv6Network {
    Ipv6Network::new(n.network(), n.prefix()).expect("prefix of a valid network")
}

/// Why a packet was not forwarded; each has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DropReason {
    #[error("malformed inner packet: {0}")]
    Malformed(#[from] PacketError),
    /// The outer source is not the PublicIP of any current peer: a spoofed or stale sender.
    #[error("outer source is not a peer")]
    UnknownPeer,
    /// The outer source is a peer's PublicIP but not its agent's port: another process on that
    /// host (e.g. a pod) trying to inject packets as the node.
    #[error("outer source port is not the peer's udp port")]
    WrongPort,
    /// A peer sent a packet claiming a source outside its own subnet.
    #[error("inner source is outside the sending peer's subnet")]
    SpoofedInnerSource,
    /// The inner destination is not in this node's subnet: forwarding it would make this node a
    /// relay into whatever its routing table reaches.
    #[error("inner destination is not in this node's subnet")]
    NotForThisNode,
    /// Outgoing: the destination is this node's own subnet or outside the overlay (a routing
    /// loop or a misconfigured route, never something to tunnel).
    #[error("destination is not a remote overlay subnet")]
    NotRemote,
    /// The table has not been filled from the leases yet (first seconds after a start).
    #[error("peer table not loaded yet")]
    NotReady,
}

/// Where an outgoing inner packet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outbound {
    Peer(Ipv4Addr),
    /// Inside the overlay but no peer holds the subnet: answer ICMP net-unreachable.
    Unreachable,
    Drop(DropReason),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTable {
    pub network: Ipv4Network,
    pub own_subnet: Ipv4Network,
    /// Longest prefix first; per prefix length, network address -> peer.
    by_prefix: Vec<(u8, HashMap<u32, Ipv4Addr>)>,
    by_public_ip: HashMap<Ipv4Addr, Sender>,
    /// Only in a dual-stack network on a node with an IPv6 subnet; without it every inner IPv6
    /// packet is malformed, as before dual stack.
    v6: Option<V6Table>,
    /// The node runs dual stack but the IPv6 half is not loaded yet (the first seconds after a
    /// restart, which stores only the IPv4 half): IPv6 is then not ready, not malformed.
    v6_pending: bool,
    ready: bool,
}

impl PeerTable {
    /// An empty table that drops everything until the first real one replaces it.
    pub fn not_ready(network: Ipv4Network, own_subnet: Ipv4Network) -> PeerTable {
        PeerTable {
            network,
            own_subnet,
            by_prefix: Vec::new(),
            by_public_ip: HashMap::new(),
            v6: None,
            v6_pending: false,
            ready: false,
        }
    }

    /// Builds the table. Never ourselves, nothing outside the overlay, and one owner per subnet
    /// (first wins, in subnet order, so every node decides the same way).
    pub fn new(
        network: Ipv4Network,
        own_subnet: Ipv4Network,
        local_ip: Ipv4Addr,
        peers: &[UdpPeer],
    ) -> PeerTable {
        let own_subnet = canonical(own_subnet);
        let mut sorted: Vec<UdpPeer> = peers
            .iter()
            .map(|p| UdpPeer {
                subnet: canonical(p.subnet),
                ..*p
            })
            .filter(|p| {
                p.public_ip != local_ip
                    && !p.subnet.overlaps(own_subnet)
                    && p.subnet.prefix() >= network.prefix()
                    && network.contains(p.subnet.network())
            })
            .collect();
        sorted.sort();
        let mut by_len: HashMap<u8, HashMap<u32, Ipv4Addr>> = HashMap::new();
        let mut by_public_ip: HashMap<Ipv4Addr, Sender> = HashMap::new();
        let mut taken: Vec<Ipv4Network> = Vec::new();
        for p in sorted {
            if taken.iter().any(|t| t.overlaps(p.subnet)) {
                continue;
            }
            // One port per public IP (one agent per node): a second lease of the same node
            // naming another port is the stale one, and sorting makes the choice the same on
            // every node.
            if by_public_ip
                .get(&p.public_ip)
                .is_some_and(|s| s.port != p.port)
            {
                continue;
            }
            taken.push(p.subnet);
            by_len
                .entry(p.subnet.prefix())
                .or_default()
                .insert(u32::from(p.subnet.network()), p.public_ip);
            by_public_ip
                .entry(p.public_ip)
                .or_insert_with(|| Sender {
                    port: p.port,
                    subnets: Vec::new(),
                    subnets6: Vec::new(),
                })
                .subnets
                .push(p.subnet);
        }
        let mut by_prefix: Vec<(u8, HashMap<u32, Ipv4Addr>)> = by_len.into_iter().collect();
        by_prefix.sort_by_key(|e| std::cmp::Reverse(e.0));
        PeerTable {
            network,
            own_subnet,
            by_prefix,
            by_public_ip,
            v6: None,
            v6_pending: false,
            ready: true,
        }
    }

    /// Adds the IPv6 half. A peer's IPv6 subnet is taken only when its endpoint (public IP and
    /// port) is one the IPv4 half accepted: the IPv6 half rides on the node's IPv4 lease and
    /// never makes a stranger a sender. Never our own subnet, nothing outside `IPv6Network`, one
    /// owner per subnet (first in sorted order, as for IPv4).
    pub fn with_v6(mut self, spec: &V6Spec) -> PeerTable {
        let own_subnet = canonical6(spec.own_subnet);
        let mut sorted: Vec<UdpPeer6> = spec
            .peers
            .iter()
            .map(|p| UdpPeer6 {
                subnet: canonical6(p.subnet),
                ..*p
            })
            .filter(|p| {
                !p.subnet.overlaps(own_subnet)
                    && p.subnet.prefix() >= spec.network.prefix()
                    && spec.network.contains(p.subnet.network())
            })
            .collect();
        sorted.sort();
        let mut by_len: HashMap<u8, HashMap<u128, Ipv4Addr>> = HashMap::new();
        let mut taken: Vec<Ipv6Network> = Vec::new();
        for p in sorted {
            let Some(sender) = self.by_public_ip.get_mut(&p.public_ip) else {
                continue;
            };
            if sender.port != p.port || taken.iter().any(|t| t.overlaps(p.subnet)) {
                continue;
            }
            taken.push(p.subnet);
            sender.subnets6.push(p.subnet);
            by_len
                .entry(p.subnet.prefix())
                .or_default()
                .insert(u128::from(p.subnet.network()), p.public_ip);
        }
        let mut by_prefix: Vec<(u8, HashMap<u128, Ipv4Addr>)> = by_len.into_iter().collect();
        by_prefix.sort_by_key(|e| std::cmp::Reverse(e.0));
        self.v6 = Some(V6Table {
            network: spec.network,
            own_subnet,
            by_prefix,
        });
        self
    }

    /// Where ICMPv6 errors come from: `IPv6Network`'s network address, never leased (the
    /// default `IPv6SubnetMin` skips the first subnet), for the reason [`icmp_source`] gives.
    ///
    /// [`icmp_source`]: Self::icmp_source
    pub fn icmp_source6(&self) -> Option<Ipv6Addr> {
        self.v6.as_ref().map(|v| v.network.network())
    }

    /// Marks the table as one of a dual-stack node whose IPv6 half is still to come.
    pub fn with_v6_pending(mut self) -> PeerTable {
        self.v6_pending = self.v6.is_none();
        self
    }

    /// Why an inner IPv6 packet cannot be handled by a table without an IPv6 half.
    pub fn no_v6_reason(&self) -> DropReason {
        if self.v6_pending {
            DropReason::NotReady
        } else {
            DropReason::Malformed(PacketError::NotIpv4(6))
        }
    }

    /// The IPv6 half, when this node carries IPv6.
    pub fn v6(&self) -> Option<&V6Table> {
        self.v6.as_ref()
    }

    /// How many peer IPv6 subnets the table routes.
    pub fn len6(&self) -> usize {
        self.by_public_ip.values().map(|s| s.subnets6.len()).sum()
    }

    /// The peer holding the IPv6 destination `dst`, longest prefix first.
    pub fn lookup6(&self, dst: Ipv6Addr) -> Option<Ipv4Addr> {
        let a = u128::from(dst);
        self.v6.as_ref()?.by_prefix.iter().find_map(|(len, m)| {
            let mask = if *len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            m.get(&(a & mask)).copied()
        })
    }

    /// The IPv6 subnets the outer source `src` may send from (empty for a sender without an
    /// IPv6 half); the same endpoint check as [`subnets_of`](Self::subnets_of).
    pub fn subnets6_of(&self, src: SocketAddrV4) -> Result<&[Ipv6Network], DropReason> {
        let s = self
            .by_public_ip
            .get(src.ip())
            .ok_or(DropReason::UnknownPeer)?;
        if s.port != src.port() {
            return Err(DropReason::WrongPort);
        }
        Ok(&s.subnets6)
    }

    /// Encap side for an inner IPv6 packet. The kernel's link-local control traffic (MLD,
    /// router solicitations) is never tunnelled; without an IPv6 half any other IPv6 packet is
    /// what it was before dual stack: malformed (not IPv4).
    pub fn route6(&self, hdr: &Ipv6Header) -> Outbound {
        if !self.ready {
            return Outbound::Drop(DropReason::NotReady);
        }
        // Link-local control traffic first: the kernel sends MLD reports as soon as the device
        // has its IPv6 address, before the first reconcile gives the table its IPv6 half.
        if is_link_local_traffic(hdr) {
            return Outbound::Drop(DropReason::NotRemote);
        }
        let Some(v6) = &self.v6 else {
            return Outbound::Drop(self.no_v6_reason());
        };
        if v6.own_subnet.contains(hdr.dst) || !v6.network.contains(hdr.dst) {
            return Outbound::Drop(DropReason::NotRemote);
        }
        match self.lookup6(hdr.dst) {
            Some(p) => Outbound::Peer(p),
            None => Outbound::Unreachable,
        }
    }

    /// Decap side for an inner IPv6 packet: the same checks as [`decap`](Self::decap) (a peer's
    /// endpoint, an inner source inside that peer's IPv6 subnet, a destination inside ours).
    /// Fuzzed like `decap`: no input may panic it.
    pub fn decap6(
        &self,
        outer_src: SocketAddrV4,
        payload: &[u8],
    ) -> Result<Ipv6Header, DropReason> {
        if !self.ready {
            return Err(DropReason::NotReady);
        }
        let subnets = self.subnets6_of(outer_src)?;
        let Some(v6) = &self.v6 else {
            return Err(self.no_v6_reason());
        };
        let hdr = parse_ipv6(payload)?;
        check_inner6(v6.own_subnet, subnets, &hdr)?;
        Ok(hdr)
    }

    pub fn is_ready(&self) -> bool {
        self.ready
    }

    pub fn len(&self) -> usize {
        self.by_public_ip.values().map(|s| s.subnets.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where ICMP errors come from: the overlay's network address. Not this node's own
    /// address: the kernel drops packets arriving with a local source (`accept_local` is off),
    /// and the first subnet is never leased by default (SubnetMin), so no node holds it; the
    /// overlay route makes it pass reverse-path filtering on the TUN device.
    pub fn icmp_source(&self) -> Ipv4Addr {
        self.network.network()
    }

    /// The peer holding `dst`, longest prefix first.
    pub fn lookup(&self, dst: Ipv4Addr) -> Option<Ipv4Addr> {
        let a = u32::from(dst);
        self.by_prefix.iter().find_map(|(len, m)| {
            let mask = if *len == 0 { 0 } else { u32::MAX << (32 - len) };
            m.get(&(a & mask)).copied()
        })
    }

    /// The subnets the outer source `src` may send from: only a peer's PublicIP with that
    /// peer's port is one.
    pub fn subnets_of(&self, src: SocketAddrV4) -> Result<&[Ipv4Network], DropReason> {
        let s = self
            .by_public_ip
            .get(src.ip())
            .ok_or(DropReason::UnknownPeer)?;
        if s.port != src.port() {
            return Err(DropReason::WrongPort);
        }
        Ok(&s.subnets)
    }

    /// Encap side: where an inner packet read from the TUN device goes.
    pub fn route(&self, hdr: &Ipv4Header) -> Outbound {
        if !self.ready {
            return Outbound::Drop(DropReason::NotReady);
        }
        if self.own_subnet.contains(hdr.dst) || !self.network.contains(hdr.dst) {
            return Outbound::Drop(DropReason::NotRemote);
        }
        match self.lookup(hdr.dst) {
            Some(p) => Outbound::Peer(p),
            None => Outbound::Unreachable,
        }
    }

    /// Decap side: may `payload`, received from `outer_src`, be written to the TUN device? On
    /// success returns the inner header; only `total_len` bytes of the payload are the packet.
    /// This is the fuzzed function: no input may panic it.
    pub fn decap(&self, outer_src: SocketAddrV4, payload: &[u8]) -> Result<Ipv4Header, DropReason> {
        if !self.ready {
            return Err(DropReason::NotReady);
        }
        let subnets = self.subnets_of(outer_src)?;
        let hdr = parse_ipv4(payload)?;
        check_inner(self.own_subnet, subnets, &hdr)?;
        Ok(hdr)
    }
}

/// The inner-address half of [`PeerTable::decap`], for a sender whose subnets were already
/// looked up once for a whole batch of its datagrams.
pub fn check_inner(
    own_subnet: Ipv4Network,
    sender_subnets: &[Ipv4Network],
    hdr: &Ipv4Header,
) -> Result<(), DropReason> {
    if !sender_subnets.iter().any(|s| s.contains(hdr.src)) {
        return Err(DropReason::SpoofedInnerSource);
    }
    if !own_subnet.contains(hdr.dst) {
        return Err(DropReason::NotForThisNode);
    }
    Ok(())
}

/// [`check_inner`] for an inner IPv6 packet.
pub fn check_inner6(
    own_subnet: Ipv6Network,
    sender_subnets: &[Ipv6Network],
    hdr: &Ipv6Header,
) -> Result<(), DropReason> {
    if !sender_subnets.iter().any(|s| s.contains(hdr.src)) {
        return Err(DropReason::SpoofedInnerSource);
    }
    if !own_subnet.contains(hdr.dst) {
        return Err(DropReason::NotForThisNode);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::packet::tests::ipv4;
    use super::super::packet::PROTO_UDP;
    use super::*;

    use crate::testutil::{ip, net};
    fn peer(n: u8) -> UdpPeer {
        UdpPeer {
            subnet: net(&format!("10.244.{n}.0/24")),
            public_ip: ip(&format!("198.18.0.{n}")),
            port: PORT,
        }
    }
    const PORT: u16 = 8285;
    fn from(s: &str) -> SocketAddrV4 {
        SocketAddrV4::new(ip(s), PORT)
    }
    fn table() -> PeerTable {
        PeerTable::new(
            net("10.244.0.0/16"),
            net("10.244.1.0/24"),
            ip("198.18.0.1"),
            &[peer(2), peer(3)],
        )
    }
    fn hdr(src: &str, dst: &str) -> Ipv4Header {
        parse_ipv4(&ipv4(src, dst, PROTO_UDP, &[0; 8])).unwrap()
    }

    #[test]
    fn outbound_lookup() {
        let t = table();
        assert_eq!(
            t.route(&hdr("10.244.1.5", "10.244.2.9")),
            Outbound::Peer(ip("198.18.0.2"))
        );
        assert_eq!(
            t.route(&hdr("10.244.1.5", "10.244.3.1")),
            Outbound::Peer(ip("198.18.0.3"))
        );
        assert_eq!(
            t.route(&hdr("10.244.1.5", "10.244.77.1")),
            Outbound::Unreachable
        );
        assert_eq!(
            t.route(&hdr("10.244.1.5", "10.244.1.9")),
            Outbound::Drop(DropReason::NotRemote)
        );
        assert_eq!(
            t.route(&hdr("10.244.1.5", "8.8.8.8")),
            Outbound::Drop(DropReason::NotRemote)
        );
        let empty = PeerTable::not_ready(net("10.244.0.0/16"), net("10.244.1.0/24"));
        assert_eq!(
            empty.route(&hdr("10.244.1.5", "10.244.2.9")),
            Outbound::Drop(DropReason::NotReady)
        );
    }

    #[test]
    fn longest_prefix_wins_and_overlaps_keep_the_first() {
        let t = PeerTable::new(
            net("10.244.0.0/16"),
            net("10.244.1.0/24"),
            ip("198.18.0.1"),
            &[
                UdpPeer {
                    subnet: net("10.244.128.0/25"),
                    public_ip: ip("198.18.0.9"),
                    port: PORT,
                },
                UdpPeer {
                    subnet: net("10.244.2.0/24"),
                    public_ip: ip("198.18.0.2"),
                    port: PORT,
                },
                // Overlaps 10.244.2.0/24, which sorts first: ignored.
                UdpPeer {
                    subnet: net("10.244.2.128/25"),
                    public_ip: ip("198.18.0.8"),
                    port: PORT,
                },
                // Ourselves, and outside the overlay: ignored.
                UdpPeer {
                    subnet: net("10.244.5.0/24"),
                    public_ip: ip("198.18.0.1"),
                    port: PORT,
                },
                UdpPeer {
                    subnet: net("10.99.0.0/24"),
                    public_ip: ip("198.18.0.7"),
                    port: PORT,
                },
            ],
        );
        assert_eq!(t.len(), 2);
        assert_eq!(t.lookup(ip("10.244.128.7")), Some(ip("198.18.0.9")));
        assert_eq!(t.lookup(ip("10.244.128.200")), None);
        assert_eq!(t.lookup(ip("10.244.2.200")), Some(ip("198.18.0.2")));
        assert_eq!(
            t.subnets_of(from("198.18.0.8")),
            Err(DropReason::UnknownPeer)
        );
        assert_eq!(t.lookup(ip("10.244.5.1")), None);
    }

    #[test]
    fn decap_accepts_only_a_peer_sending_from_its_subnet_to_ours() {
        let t = table();
        let ok = ipv4("10.244.2.5", "10.244.1.7", PROTO_UDP, &[0; 8]);
        assert_eq!(
            t.decap(from("198.18.0.2"), &ok).unwrap().total_len,
            ok.len()
        );
        assert_eq!(
            t.decap(from("198.18.0.99"), &ok),
            Err(DropReason::UnknownPeer)
        );
        assert_eq!(
            t.decap(from("198.18.0.3"), &ok),
            Err(DropReason::SpoofedInnerSource)
        );
        let elsewhere = ipv4("10.244.2.5", "10.244.3.7", PROTO_UDP, &[0; 8]);
        assert_eq!(
            t.decap(from("198.18.0.2"), &elsewhere),
            Err(DropReason::NotForThisNode)
        );
        let outside = ipv4("10.244.2.5", "192.168.1.1", PROTO_UDP, &[0; 8]);
        assert_eq!(
            t.decap(from("198.18.0.2"), &outside),
            Err(DropReason::NotForThisNode)
        );
        assert!(matches!(
            t.decap(from("198.18.0.2"), &ok[..10]),
            Err(DropReason::Malformed(_))
        ));
        assert!(matches!(
            t.decap(from("198.18.0.2"), &[0x60; 40]),
            Err(DropReason::Malformed(PacketError::NotIpv4(6)))
        ));
    }

    #[test]
    fn decap_refuses_a_peers_ip_from_another_port() {
        let t = table();
        let ok = ipv4("10.244.2.5", "10.244.1.7", PROTO_UDP, &[0; 8]);
        for port in [0, 53, PORT - 1, PORT + 1, 40000, u16::MAX] {
            let src = SocketAddrV4::new(ip("198.18.0.2"), port);
            assert_eq!(t.decap(src, &ok), Err(DropReason::WrongPort), "port {port}");
        }
        // A stranger is unknown whatever port it uses, the peer's port included.
        let stranger = SocketAddrV4::new(ip("198.18.0.99"), PORT);
        assert_eq!(t.decap(stranger, &ok), Err(DropReason::UnknownPeer));
        assert!(t.decap(from("198.18.0.2"), &ok).is_ok());
    }

    #[test]
    fn a_peer_with_a_per_lease_port_is_checked_against_its_own() {
        let mut p3 = peer(3);
        p3.port = 9000;
        // The same node again under another port: the first (sorted) one wins.
        let mut stale = peer(2);
        stale.subnet = net("10.244.9.0/24");
        stale.port = 7000;
        let t = PeerTable::new(
            net("10.244.0.0/16"),
            net("10.244.1.0/24"),
            ip("198.18.0.1"),
            &[peer(2), p3, stale],
        );
        let from3 = ipv4("10.244.3.5", "10.244.1.7", PROTO_UDP, &[0; 8]);
        assert!(t
            .decap(SocketAddrV4::new(ip("198.18.0.3"), 9000), &from3)
            .is_ok());
        assert_eq!(
            t.decap(from("198.18.0.3"), &from3),
            Err(DropReason::WrongPort)
        );
        assert_eq!(
            t.lookup(ip("10.244.9.1")),
            None,
            "the stale second port is ignored"
        );
        assert_eq!(t.len(), 2);
    }
}

#[cfg(test)]
mod tests6 {
    use super::super::packet::tests::{ipv4, ipv6};
    use super::super::packet::{PROTO_ICMPV6, PROTO_UDP};
    use super::*;
    use crate::testutil::{ip, net};

    const PORT: u16 = 8285;

    fn n6(s: &str) -> Ipv6Network {
        s.parse().unwrap()
    }
    fn from(s: &str) -> SocketAddrV4 {
        SocketAddrV4::new(ip(s), PORT)
    }
    fn peer(n: u8) -> UdpPeer {
        UdpPeer {
            subnet: net(&format!("10.244.{n}.0/24")),
            public_ip: ip(&format!("198.18.0.{n}")),
            port: PORT,
        }
    }
    fn peer6(n: u8) -> UdpPeer6 {
        UdpPeer6 {
            subnet: n6(&format!("fd00:10:244:{n}::/64")),
            public_ip: ip(&format!("198.18.0.{n}")),
            port: PORT,
        }
    }
    fn spec(peers: Vec<UdpPeer6>) -> V6Spec {
        V6Spec {
            network: n6("fd00:10:244::/56"),
            own_subnet: n6("fd00:10:244:1::/64"),
            peers,
        }
    }
    /// Node 1 (us), peers 2 and 3 dual stack, peer 4 IPv4 only.
    fn table() -> PeerTable {
        PeerTable::new(
            net("10.244.0.0/16"),
            net("10.244.1.0/24"),
            ip("198.18.0.1"),
            &[peer(2), peer(3), peer(4)],
        )
        .with_v6(&spec(vec![peer6(2), peer6(3)]))
    }
    fn h6(src: &str, dst: &str) -> Ipv6Header {
        parse_ipv6(&ipv6(src, dst, PROTO_UDP, &[0; 8])).unwrap()
    }

    #[test]
    fn v6_destinations_go_to_the_peers_ipv4_endpoint() {
        let t = table();
        assert_eq!(t.len6(), 2);
        assert_eq!(
            t.route6(&h6("fd00:10:244:1::5", "fd00:10:244:2::9")),
            Outbound::Peer(ip("198.18.0.2"))
        );
        assert_eq!(
            t.route6(&h6("fd00:10:244:1::5", "fd00:10:244:3:ffff::1")),
            Outbound::Peer(ip("198.18.0.3"))
        );
        // Inside the overlay, no peer: ICMPv6-worthy; our own subnet and outside: never tunnelled.
        assert_eq!(
            t.route6(&h6("fd00:10:244:1::5", "fd00:10:244:4::1")),
            Outbound::Unreachable
        );
        assert_eq!(
            t.route6(&h6("fd00:10:244:1::5", "fd00:10:244:1::9")),
            Outbound::Drop(DropReason::NotRemote)
        );
        assert_eq!(
            t.route6(&h6("fd00:10:244:1::5", "2001:db8::1")),
            Outbound::Drop(DropReason::NotRemote)
        );
        // The kernel's MLD report and router solicitation: dropped, not malformed.
        assert_eq!(
            t.route6(&h6("::", "ff02::16")),
            Outbound::Drop(DropReason::NotRemote)
        );
        assert_eq!(
            t.route6(&h6("fe80::1", "ff02::2")),
            Outbound::Drop(DropReason::NotRemote)
        );
        // The IPv4 half is unchanged.
        assert_eq!(t.lookup(ip("10.244.4.1")), Some(ip("198.18.0.4")));
    }

    #[test]
    fn without_a_v6_half_ipv6_stays_malformed_and_not_ready_drops() {
        let v4only = PeerTable::new(
            net("10.244.0.0/16"),
            net("10.244.1.0/24"),
            ip("198.18.0.1"),
            &[peer(2)],
        );
        let pkt = ipv6("fd00:10:244:2::5", "fd00:10:244:1::7", PROTO_UDP, &[0; 8]);
        assert_eq!(
            v4only.route6(&h6("fd00:10:244:1::5", "fd00:10:244:2::9")),
            Outbound::Drop(DropReason::Malformed(PacketError::NotIpv4(6)))
        );
        assert_eq!(
            v4only.decap6(from("198.18.0.2"), &pkt),
            Err(DropReason::Malformed(PacketError::NotIpv4(6)))
        );
        // A dual-stack node's table before its IPv6 half is loaded: not ready, not malformed.
        let pending = v4only.clone().with_v6_pending();
        assert_eq!(
            pending.route6(&h6("fd00:10:244:1::5", "fd00:10:244:2::9")),
            Outbound::Drop(DropReason::NotReady)
        );
        assert_eq!(
            pending.decap6(from("198.18.0.2"), &pkt),
            Err(DropReason::NotReady)
        );
        assert!(
            !table().with_v6_pending().v6_pending,
            "a loaded half is not pending"
        );
        // The kernel's MLD report is link-local traffic even before the IPv6 half is loaded.
        assert_eq!(
            v4only.route6(&h6("::", "ff02::16")),
            Outbound::Drop(DropReason::NotRemote)
        );
        let nr = PeerTable::not_ready(net("10.244.0.0/16"), net("10.244.1.0/24"));
        assert_eq!(
            nr.route6(&h6("fd00:10:244:1::5", "fd00:10:244:2::9")),
            Outbound::Drop(DropReason::NotReady)
        );
        assert_eq!(
            nr.decap6(from("198.18.0.2"), &pkt),
            Err(DropReason::NotReady)
        );
    }

    #[test]
    fn v6_halves_are_only_taken_from_accepted_ipv4_endpoints() {
        let mut other_port = peer6(3);
        other_port.port = 9999;
        let stranger = UdpPeer6 {
            subnet: n6("fd00:10:244:7::/64"),
            public_ip: ip("198.18.0.77"),
            port: PORT,
        };
        // Ours, outside the network, overlapping an earlier one.
        let own = UdpPeer6 {
            subnet: n6("fd00:10:244:1::/64"),
            ..peer6(2)
        };
        let outside = UdpPeer6 {
            subnet: n6("fd00:99::/64"),
            ..peer6(2)
        };
        let overlap = UdpPeer6 {
            subnet: n6("fd00:10:244:2:8000::/65"),
            ..peer6(4)
        };
        let t = PeerTable::new(
            net("10.244.0.0/16"),
            net("10.244.1.0/24"),
            ip("198.18.0.1"),
            &[peer(2), peer(3), peer(4)],
        )
        .with_v6(&spec(vec![
            peer6(2),
            other_port,
            stranger,
            own,
            outside,
            overlap,
        ]));
        assert_eq!(t.len6(), 1, "only peer 2's own subnet");
        assert_eq!(
            t.lookup6("fd00:10:244:2::1".parse().unwrap()),
            Some(ip("198.18.0.2"))
        );
        assert_eq!(t.lookup6("fd00:10:244:3::1".parse().unwrap()), None);
        assert_eq!(t.lookup6("fd00:10:244:7::1".parse().unwrap()), None);
        assert_eq!(
            t.subnets6_of(from("198.18.0.77")),
            Err(DropReason::UnknownPeer)
        );
        assert_eq!(t.subnets6_of(from("198.18.0.4")), Ok(&[][..]));
    }

    #[test]
    fn decap6_refuses_spoofed_inner_sources() {
        let t = table();
        let ok = ipv6(
            "fd00:10:244:2::5",
            "fd00:10:244:1::7",
            PROTO_ICMPV6,
            &[128, 0, 0, 0],
        );
        assert_eq!(
            t.decap6(from("198.18.0.2"), &ok).unwrap().total_len,
            ok.len()
        );
        // Peer 3 claiming peer 2's pod; peer 4 (no v6 half) claiming anything; a source outside
        // the overlay; the destination's own subnet as source (a reflection attempt).
        for (sender, src) in [
            ("198.18.0.3", "fd00:10:244:2::5"),
            ("198.18.0.4", "fd00:10:244:4::5"),
            ("198.18.0.2", "2001:db8::1"),
            ("198.18.0.2", "fd00:10:244:1::9"),
            ("198.18.0.2", "::"),
            ("198.18.0.2", "fe80::1"),
        ] {
            let p = ipv6(src, "fd00:10:244:1::7", PROTO_UDP, &[0; 8]);
            assert_eq!(
                t.decap6(from(sender), &p),
                Err(DropReason::SpoofedInnerSource),
                "{sender} sending from {src}"
            );
        }
        // Not for us: another peer's pod, outside the overlay, multicast.
        for dst in ["fd00:10:244:3::7", "2001:db8::7", "ff02::1"] {
            let p = ipv6("fd00:10:244:2::5", dst, PROTO_UDP, &[0; 8]);
            assert_eq!(
                t.decap6(from("198.18.0.2"), &p),
                Err(DropReason::NotForThisNode),
                "{dst}"
            );
        }
        // The endpoint checks come first, as for IPv4.
        assert_eq!(
            t.decap6(from("198.18.0.99"), &ok),
            Err(DropReason::UnknownPeer)
        );
        let wrong_port = SocketAddrV4::new(ip("198.18.0.2"), PORT + 1);
        assert_eq!(t.decap6(wrong_port, &ok), Err(DropReason::WrongPort));
    }

    #[test]
    fn decap6_refuses_malformed_headers() {
        let t = table();
        let good = ipv6("fd00:10:244:2::5", "fd00:10:244:1::7", PROTO_UDP, &[0; 8]);
        let mut lying = good.clone();
        lying[4..6].copy_from_slice(&1000u16.to_be_bytes());
        let mut jumbo = good.clone();
        jumbo[4..6].copy_from_slice(&[0, 0]);
        let v4 = ipv4("10.244.2.5", "10.244.1.7", PROTO_UDP, &[0; 8]);
        for bad in [
            &good[..39],
            &good[..47],
            &lying[..],
            &jumbo[..],
            &v4[..],
            &[][..],
        ] {
            assert!(
                matches!(
                    t.decap6(from("198.18.0.2"), bad),
                    Err(DropReason::Malformed(_))
                ),
                "{bad:?}"
            );
        }
    }
}
