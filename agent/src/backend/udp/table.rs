//! The peer table and the two per-packet decisions made with it: where an outgoing inner packet
//! goes (encap side) and whether an incoming datagram may enter this node (decap side). Pure: the
//! workers hold an `Arc<PeerTable>` that the control plane swaps when leases change.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use ipnetwork::Ipv4Network;

use super::packet::{parse_ipv4, Ipv4Header, PacketError};
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

/// What a public IP may send: from which port, packets of which subnets.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sender {
    port: u16,
    subnets: Vec<Ipv4Network>,
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
            ready: true,
        }
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
