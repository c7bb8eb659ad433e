//! TUN offloads without I/O: the virtio-net header that `IFF_VNET_HDR` puts before every packet,
//! TCP segmentation of the 64 KB super-packets the kernel hands over (TSO done here, so each
//! segment fits one UDP datagram of flannel's wire format), and the reverse, coalescing received
//! segments of one TCP flow back into a super-packet (GRO) so that one TUN write carries many.
//!
//! Both directions work on positions rather than copies: segmentation writes only the per-segment
//! headers and leaves the payload where the TUN read put it, coalescing returns a header plus the
//! payload spans inside the receive buffers. The I/O layer turns both into iovecs.

use super::csum;
use super::packet::{
    parse_ipv4, parse_ipv6, Ipv4Header, Ipv6Header, PacketError, IPV6_HEADER, MAX_PACKET, PROTO_TCP,
};

/// `struct virtio_net_hdr` (without `num_buffers`), the TUN default size.
pub const VNET_HDR_LEN: usize = 10;
pub const F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_ECN: u8 = 0x80;
/// Segments one UDP GSO send may carry (`UDP_MAX_SEGMENTS` on older kernels).
pub const MAX_GSO_SEGMENTS: usize = 64;
/// The most UDP payload one send may carry: an IPv4 datagram's limit less IP and UDP headers.
pub const MAX_UDP_PAYLOAD: usize = 65535 - 20 - 8;
/// Upper bound on segments merged into one super-packet, as the kernel's GRO would allow.
const MAX_MERGE: u16 = 64;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;
const TCP_ECE: u8 = 0x40;
const TCP_CWR: u8 = 0x80;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error("shorter than the virtio-net header")]
    NoHeader,
    #[error("unsupported GSO type {0:#x}")]
    UnsupportedGso(u8),
    #[error("GSO packet with gso_size 0")]
    ZeroGsoSize,
    #[error("checksum offsets {start}+{offset} do not fit a {len}-byte packet")]
    BadChecksumOffsets {
        start: usize,
        offset: usize,
        len: usize,
    },
    #[error("TCP GSO packet without a valid TCP header")]
    BadTcp,
    #[error(transparent)]
    Packet(#[from] PacketError),
}

/// The virtio-net header. Little-endian fields: the TUN default on little-endian hosts
/// (`TUNSETVNETBE` is never used).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8]) -> Result<VnetHdr, OffloadError> {
        let b: &[u8; VNET_HDR_LEN] = b
            .get(..VNET_HDR_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(OffloadError::NoHeader)?;
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Ok(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }
}

/// A TCP super-packet cut into `count` segments: segment `i` is header `i` of the header buffer
/// (`hdr_len` bytes each) followed by `payload(i)` of the original packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tso {
    pub hdr_len: usize,
    pub mss: usize,
    pub count: usize,
    pub payload_start: usize,
    pub payload_end: usize,
}

impl Tso {
    /// Byte range of segment `i`'s payload in the original packet.
    pub fn payload(&self, i: usize) -> std::ops::Range<usize> {
        let s = self.payload_start + i * self.mss;
        s..(s + self.mss).min(self.payload_end)
    }

    /// Size of every segment but possibly the last: the UDP GSO segment size.
    pub fn seg_size(&self) -> usize {
        self.hdr_len + self.mss
    }
}

/// What one packet read from the TUN device becomes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxPacket {
    /// Send the first `len` bytes of the packet as they are (checksum completed if it was
    /// partial).
    Single { len: usize },
    /// Send segments; headers are in the header buffer.
    Tso(Tso),
}

/// Prepares a packet read from the TUN device (`pkt` is what follows the virtio-net header) for
/// the wire. A partial checksum (`NEEDS_CSUM`) is completed in place, since a flannel peer writes
/// the packet to its TUN as is and the kernel there verifies it. A TCPv4 super-packet gets one
/// complete IP+TCP header per MSS-sized segment written to `headers`.
pub fn prepare_tx(
    h: &VnetHdr,
    pkt: &mut [u8],
    headers: &mut Vec<u8>,
) -> Result<(TxPacket, Ipv4Header), OffloadError> {
    let ip = parse_ipv4(pkt)?;
    let len = ip.total_len;
    match h.gso_type & !GSO_ECN {
        GSO_NONE => {
            if h.flags & F_NEEDS_CSUM != 0 {
                complete_checksum(h, &mut pkt[..len])?;
            }
            Ok((TxPacket::Single { len }, ip))
        }
        GSO_TCPV4 => {
            let tso = tso_headers(h, &pkt[..len], &ip, headers)?;
            Ok((TxPacket::Tso(tso), ip))
        }
        other => Err(OffloadError::UnsupportedGso(other)),
    }
}

/// [`prepare_tx`] for an inner IPv6 packet: a partial checksum is completed; a TCPv6
/// super-packet (a dual-stack device offers TSO6) is cut into MSS segments as TCPv4 is. Only a
/// TCP header right after the IPv6 header is segmented (the kernel puts no extension header
/// in TCP it sends); anything else claiming TCPv6 GSO is refused.
pub fn prepare_tx6(
    h: &VnetHdr,
    pkt: &mut [u8],
    headers: &mut Vec<u8>,
) -> Result<(TxPacket, Ipv6Header), OffloadError> {
    let ip = parse_ipv6(pkt)?;
    let len = ip.total_len;
    match h.gso_type & !GSO_ECN {
        GSO_NONE => {
            if h.flags & F_NEEDS_CSUM != 0 {
                complete_checksum(h, &mut pkt[..len])?;
            }
            Ok((TxPacket::Single { len }, ip))
        }
        GSO_TCPV6 => {
            let tso = tso6_headers(h, &pkt[..len], &ip, headers)?;
            Ok((TxPacket::Tso(tso), ip))
        }
        other => Err(OffloadError::UnsupportedGso(other)),
    }
}

fn tso6_headers(
    h: &VnetHdr,
    pkt: &[u8],
    ip: &Ipv6Header,
    headers: &mut Vec<u8>,
) -> Result<Tso, OffloadError> {
    let mss = h.gso_size as usize;
    if mss == 0 {
        return Err(OffloadError::ZeroGsoSize);
    }
    if ip.next_header != PROTO_TCP {
        return Err(OffloadError::BadTcp);
    }
    let iphl = IPV6_HEADER;
    let off = *pkt.get(iphl + 12).ok_or(OffloadError::BadTcp)?;
    let tcphl = ((off >> 4) as usize) * 4;
    if tcphl < 20 || iphl + tcphl > ip.total_len {
        return Err(OffloadError::BadTcp);
    }
    let hdr_len = iphl + tcphl;
    let payload_len = ip.total_len - hdr_len;
    let count = payload_len.div_ceil(mss).max(1);
    let tso = Tso {
        hdr_len,
        mss,
        count,
        payload_start: hdr_len,
        payload_end: ip.total_len,
    };
    headers.clear();
    headers.resize(count * hdr_len, 0);
    let seq0 = u32::from_be_bytes([pkt[iphl + 4], pkt[iphl + 5], pkt[iphl + 6], pkt[iphl + 7]]);
    let flags0 = pkt[iphl + 13];
    // Source and destination: the address half of the IPv6 pseudo-header, the same per segment.
    let addrs = csum::sum(&pkt[8..40]);
    for i in 0..count {
        let chunk = &pkt[tso.payload(i)];
        let out = &mut headers[i * hdr_len..(i + 1) * hdr_len];
        out.copy_from_slice(&pkt[..hdr_len]);
        let (iph, tcph) = out.split_at_mut(iphl);
        let seg_len = (tcphl + chunk.len()) as u16;
        iph[4..6].copy_from_slice(&seg_len.to_be_bytes());
        tcph[4..8].copy_from_slice(&seq0.wrapping_add((i * mss) as u32).to_be_bytes());
        let mut flags = flags0;
        if i + 1 != count {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if i != 0 {
            flags &= !TCP_CWR;
        }
        tcph[13] = flags;
        tcph[16] = 0;
        tcph[17] = 0;
        let s = addrs + seg_len as u32 + PROTO_TCP as u32 + csum::sum(tcph) + csum::sum(chunk);
        tcph[16..18].copy_from_slice(&csum::finish(s).to_be_bytes());
    }
    Ok(tso)
}

fn complete_checksum(h: &VnetHdr, pkt: &mut [u8]) -> Result<(), OffloadError> {
    let start = h.csum_start as usize;
    let at = start + h.csum_offset as usize;
    if at + 2 > pkt.len() {
        return Err(OffloadError::BadChecksumOffsets {
            start,
            offset: h.csum_offset as usize,
            len: pkt.len(),
        });
    }
    // The field holds the pseudo-header sum; summing over it completes the checksum.
    let c = csum::finish(csum::sum(&pkt[start..]));
    pkt[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

fn tcp_header_len(pkt: &[u8], ip: &Ipv4Header) -> Option<usize> {
    if ip.protocol != PROTO_TCP || ip.is_fragment() {
        return None;
    }
    let off = *pkt.get(ip.header_len + 12)?;
    let tcphl = ((off >> 4) as usize) * 4;
    (tcphl >= 20 && ip.header_len + tcphl <= ip.total_len).then_some(tcphl)
}

fn tso_headers(
    h: &VnetHdr,
    pkt: &[u8],
    ip: &Ipv4Header,
    headers: &mut Vec<u8>,
) -> Result<Tso, OffloadError> {
    let mss = h.gso_size as usize;
    if mss == 0 {
        return Err(OffloadError::ZeroGsoSize);
    }
    let tcphl = tcp_header_len(pkt, ip).ok_or(OffloadError::BadTcp)?;
    let iphl = ip.header_len;
    let hdr_len = iphl + tcphl;
    let payload_len = ip.total_len - hdr_len;
    let count = payload_len.div_ceil(mss).max(1);
    let tso = Tso {
        hdr_len,
        mss,
        count,
        payload_start: hdr_len,
        payload_end: ip.total_len,
    };
    headers.clear();
    headers.resize(count * hdr_len, 0);
    let id0 = u16::from_be_bytes([pkt[4], pkt[5]]);
    let seq0 = u32::from_be_bytes([pkt[iphl + 4], pkt[iphl + 5], pkt[iphl + 6], pkt[iphl + 7]]);
    let flags0 = pkt[iphl + 13];
    let src: [u8; 4] = pkt[12..16].try_into().expect("4 bytes");
    let dst: [u8; 4] = pkt[16..20].try_into().expect("4 bytes");
    for i in 0..count {
        let range = tso.payload(i);
        let chunk = &pkt[range.clone()];
        let out = &mut headers[i * hdr_len..(i + 1) * hdr_len];
        out.copy_from_slice(&pkt[..hdr_len]);
        let (iph, tcph) = out.split_at_mut(iphl);
        iph[2..4].copy_from_slice(&((hdr_len + chunk.len()) as u16).to_be_bytes());
        iph[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
        csum::set_ipv4_header_checksum(iph);
        tcph[4..8].copy_from_slice(&seq0.wrapping_add((i * mss) as u32).to_be_bytes());
        let mut flags = flags0;
        if i + 1 != count {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if i != 0 {
            flags &= !TCP_CWR;
        }
        tcph[13] = flags;
        tcph[16] = 0;
        tcph[17] = 0;
        let s = csum::pseudo_header(src, dst, PROTO_TCP, (tcphl + chunk.len()) as u16)
            + csum::sum(tcph)
            + csum::sum(chunk);
        tcph[16..18].copy_from_slice(&csum::finish(s).to_be_bytes());
    }
    Ok(tso)
}

/// Groups of segments, each at most [`MAX_GSO_SEGMENTS`] and [`MAX_UDP_PAYLOAD`] bytes: one
/// UDP GSO send each. Returns (first segment, segment count) pairs.
pub fn gso_batches(tso: &Tso) -> impl Iterator<Item = (usize, usize)> {
    let per = (MAX_UDP_PAYLOAD / tso.seg_size()).clamp(1, MAX_GSO_SEGMENTS);
    let count = tso.count;
    (0..count)
        .step_by(per)
        .map(move |first| (first, per.min(count - first)))
}

/// Where a received packet lives in the caller's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub buf: usize,
    pub start: usize,
    pub end: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlowKey {
    /// Source then destination address (IPv4: the first 8 bytes).
    addrs: [u8; 32],
    ports: [u8; 4],
    v6: bool,
}

/// One write to the TUN device: `head` (virtio-net header, and for TCP the IP and TCP headers)
/// followed by the bytes of `parts`.
#[derive(Debug, Clone, Default)]
pub struct GroItem {
    pub head: Vec<u8>,
    pub parts: Vec<Span>,
    flow: Option<FlowKey>,
    next_seq: u32,
    gso_size: usize,
    count: u16,
    payload: usize,
    closed: bool,
    push: bool,
}

impl GroItem {
    pub fn segments(&self) -> u16 {
        self.count
    }
}

/// Coalesces the inner packets of one receive batch. Packets of one TCP flow that follow each
/// other in sequence merge into one item; anything else becomes an item of its own. Items keep
/// arrival order, and a flow only ever merges into its newest item, so no flow is reordered.
#[derive(Debug, Default)]
pub struct Coalescer {
    items: Vec<GroItem>,
    used: usize,
    finished: bool,
}

impl Coalescer {
    pub fn new() -> Coalescer {
        Coalescer::default()
    }

    fn next_item(&mut self) -> &mut GroItem {
        if self.used == self.items.len() {
            self.items.push(GroItem::default());
        }
        let it = &mut self.items[self.used];
        self.used += 1;
        it.head.clear();
        it.parts.clear();
        it.flow = None;
        it.count = 1;
        it.payload = 0;
        it.closed = true;
        it.push = false;
        it
    }

    /// Adds a packet that is written on its own, as it is.
    pub fn push_single(&mut self, span: Span) {
        self.finished = false;
        let it = self.next_item();
        it.head.extend_from_slice(&[0; VNET_HDR_LEN]);
        it.parts.push(span);
    }

    /// Adds one validated packet (`pkt` is exactly `hdr.total_len` bytes, found at `span`).
    pub fn push(&mut self, pkt: &[u8], hdr: &Ipv4Header, span: Span) {
        let Some((tcphl, flags)) = mergeable(pkt, hdr) else {
            return self.push_single(span);
        };
        let mut addrs = [0u8; 32];
        addrs[..8].copy_from_slice(&pkt[12..20]);
        let key = FlowKey {
            addrs,
            ports: pkt[20..24].try_into().expect("4 bytes"),
            v6: false,
        };
        self.merge(pkt, hdr.header_len, tcphl, flags, key, span);
    }

    /// [`push`](Self::push) for a validated IPv6 packet: TCP right after the IPv6 header merges
    /// as TCPv4 does (the item is written as a TCPv6 super-packet), anything else goes alone.
    pub fn push6(&mut self, pkt: &[u8], hdr: &Ipv6Header, span: Span) {
        let Some((tcphl, flags)) = mergeable6(pkt, hdr) else {
            return self.push_single(span);
        };
        let key = FlowKey {
            addrs: pkt[8..40].try_into().expect("32 bytes"),
            ports: pkt[40..44].try_into().expect("4 bytes"),
            v6: true,
        };
        self.merge(pkt, IPV6_HEADER, tcphl, flags, key, span);
    }

    fn merge(
        &mut self,
        pkt: &[u8],
        iphl: usize,
        tcphl: usize,
        flags: u8,
        key: FlowKey,
        span: Span,
    ) {
        self.finished = false;
        let hl = iphl + tcphl;
        let payload = pkt.len() - hl;
        let seq = u32::from_be_bytes(pkt[iphl + 4..iphl + 8].try_into().expect("4 bytes"));
        let newest = self.items[..self.used]
            .iter_mut()
            .rev()
            .find(|it| it.flow == Some(key));
        if let Some(it) = newest {
            let same = if key.v6 {
                same_headers6(&it.head[VNET_HDR_LEN..], &pkt[..hl])
            } else {
                same_headers(&it.head[VNET_HDR_LEN..], &pkt[..hl])
            };
            if !it.closed
                && it.next_seq == seq
                && payload <= it.gso_size
                && it.count < MAX_MERGE
                && hl + it.payload + payload <= MAX_PACKET
                && same
            {
                it.parts.push(Span {
                    start: span.start + hl,
                    ..span
                });
                it.count += 1;
                it.payload += payload;
                it.next_seq = seq.wrapping_add(payload as u32);
                if payload < it.gso_size || flags & TCP_PSH != 0 {
                    it.closed = true;
                    it.push = flags & TCP_PSH != 0;
                }
                return;
            }
        }
        let it = self.next_item();
        it.head.extend_from_slice(&[0; VNET_HDR_LEN]);
        it.head.extend_from_slice(&pkt[..hl]);
        it.parts.push(Span {
            start: span.start + hl,
            ..span
        });
        it.flow = Some(key);
        it.next_seq = seq.wrapping_add(payload as u32);
        it.gso_size = payload;
        it.payload = payload;
        it.closed = flags & TCP_PSH != 0;
        it.push = it.closed;
    }

    /// The items of this batch with their headers final; call [`clear`](Self::clear) after
    /// writing them.
    pub fn items(&mut self) -> &[GroItem] {
        if !self.finished {
            for it in &mut self.items[..self.used] {
                match it.flow {
                    Some(f) if it.count > 1 && f.v6 => finish_merged6(it),
                    Some(_) if it.count > 1 => finish_merged(it),
                    _ => {}
                }
            }
            self.finished = true;
        }
        &self.items[..self.used]
    }

    pub fn clear(&mut self) {
        self.used = 0;
        self.finished = false;
    }
}

/// TCP over IPv4 without IP options or fragments, a plain ACK (PSH allowed) carrying data:
/// the segments GRO may merge. Returns the TCP header length and flags.
fn mergeable(pkt: &[u8], hdr: &Ipv4Header) -> Option<(usize, u8)> {
    if hdr.header_len != 20 || hdr.total_len != pkt.len() {
        return None;
    }
    let tcphl = tcp_header_len(pkt, hdr)?;
    let flags = pkt[20 + 13];
    let payload = pkt.len() - 20 - tcphl;
    let ok = flags & TCP_ACK != 0
        && flags & (TCP_SYN | TCP_FIN | TCP_RST | TCP_URG | TCP_ECE | TCP_CWR) == 0
        && payload > 0;
    ok.then_some((tcphl, flags))
}

/// [`mergeable`] for IPv6: TCP directly after the fixed header (no extension headers).
fn mergeable6(pkt: &[u8], hdr: &Ipv6Header) -> Option<(usize, u8)> {
    if hdr.next_header != PROTO_TCP || hdr.total_len != pkt.len() {
        return None;
    }
    let off = *pkt.get(IPV6_HEADER + 12)?;
    let tcphl = ((off >> 4) as usize) * 4;
    if tcphl < 20 || IPV6_HEADER + tcphl > pkt.len() {
        return None;
    }
    let flags = pkt[IPV6_HEADER + 13];
    let payload = pkt.len() - IPV6_HEADER - tcphl;
    let ok = flags & TCP_ACK != 0
        && flags & (TCP_SYN | TCP_FIN | TCP_RST | TCP_URG | TCP_ECE | TCP_CWR) == 0
        && payload > 0;
    ok.then_some((tcphl, flags))
}

/// [`same_headers`] for IPv6: version, traffic class and flow label, next header, hop limit,
/// addresses; the same TCP fields.
fn same_headers6(first: &[u8], pkt: &[u8]) -> bool {
    if first.len() != pkt.len() {
        return false;
    }
    let t0 = &first[IPV6_HEADER..];
    let t1 = &pkt[IPV6_HEADER..];
    first[0..4] == pkt[0..4]
        && first[6..40] == pkt[6..40]
        && t0[0..4] == t1[0..4]
        && t0[8..13] == t1[8..13]
        && (t0[13] & !TCP_PSH) == (t1[13] & !TCP_PSH)
        && t0[14..16] == t1[14..16]
        && t0[20..] == t1[20..]
}

fn finish_merged6(it: &mut GroItem) {
    let hl = it.head.len() - VNET_HDR_LEN;
    let tcp_len = hl - IPV6_HEADER + it.payload;
    let vnet = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV6,
        hdr_len: hl as u16,
        gso_size: it.gso_size as u16,
        csum_start: IPV6_HEADER as u16,
        csum_offset: 16,
    };
    it.head[..VNET_HDR_LEN].copy_from_slice(&vnet.encode());
    let h = &mut it.head[VNET_HDR_LEN..];
    h[4..6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
    if it.push {
        h[IPV6_HEADER + 13] |= TCP_PSH;
    }
    // CHECKSUM_PARTIAL, as for IPv4: the folded IPv6 pseudo-header sum.
    let partial = csum::fold(csum::sum(&h[8..40]) + tcp_len as u32 + PROTO_TCP as u32);
    h[IPV6_HEADER + 16..IPV6_HEADER + 18].copy_from_slice(&partial.to_be_bytes());
}

/// Whether `pkt`'s headers match the item's first ones in everything GRO must preserve: IP
/// version/length, TOS, DF, TTL, protocol, addresses; TCP ports, ack, data offset, flags (PSH
/// aside), window, options.
fn same_headers(first: &[u8], pkt: &[u8]) -> bool {
    if first.len() != pkt.len() {
        return false;
    }
    let ip_same = first[0..2] == pkt[0..2]
        && (first[6] & 0x40) == (pkt[6] & 0x40)
        && first[8..10] == pkt[8..10]
        && first[12..20] == pkt[12..20];
    let t0 = &first[20..];
    let t1 = &pkt[20..];
    ip_same
        && t0[0..4] == t1[0..4]
        && t0[8..13] == t1[8..13]
        && (t0[13] & !TCP_PSH) == (t1[13] & !TCP_PSH)
        && t0[14..16] == t1[14..16]
        && t0[20..] == t1[20..]
}

fn finish_merged(it: &mut GroItem) {
    let hl = it.head.len() - VNET_HDR_LEN;
    let iphl = 20;
    let tcp_len = hl - iphl + it.payload;
    let vnet = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: hl as u16,
        gso_size: it.gso_size as u16,
        csum_start: iphl as u16,
        csum_offset: 16,
    };
    it.head[..VNET_HDR_LEN].copy_from_slice(&vnet.encode());
    let h = &mut it.head[VNET_HDR_LEN..];
    h[2..4].copy_from_slice(&((hl + it.payload) as u16).to_be_bytes());
    csum::set_ipv4_header_checksum(&mut h[..iphl]);
    if it.push {
        h[iphl + 13] |= TCP_PSH;
    }
    let src: [u8; 4] = h[12..16].try_into().expect("4 bytes");
    let dst: [u8; 4] = h[16..20].try_into().expect("4 bytes");
    // CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum; the kernel adds the rest.
    let partial = csum::fold(csum::pseudo_header(src, dst, PROTO_TCP, tcp_len as u16));
    h[iphl + 16..iphl + 18].copy_from_slice(&partial.to_be_bytes());
}

/// Concatenates an item as the TUN write would see it (tests and the fuzz target).
pub fn flatten(item: &GroItem, bufs: &[&[u8]]) -> Vec<u8> {
    let mut v = item.head.clone();
    for p in &item.parts {
        v.extend_from_slice(&bufs[p.buf][p.start..p.end]);
    }
    v
}

#[cfg(test)]
mod tests6 {
    use super::super::packet::tests::ipv6;
    use super::super::packet::PROTO_UDP;
    use super::*;

    /// A UDP-in-IPv6 packet whose checksum field holds only the pseudo-header sum, as the kernel
    /// hands it over with `NEEDS_CSUM`.
    fn partial() -> (VnetHdr, Vec<u8>) {
        let payload = [0x12, 0x34, 0x00, 0x35, 0x00, 0x0c, 0, 0, 1, 2, 3, 4];
        let mut p = ipv6("fd00:10:244:1::5", "fd00:10:244:2::9", PROTO_UDP, &payload);
        let ph = csum::sum(&p[8..40]) + payload.len() as u32 + PROTO_UDP as u32;
        p[46..48].copy_from_slice(&csum::fold(ph).to_be_bytes());
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 40,
            csum_offset: 6,
            ..Default::default()
        };
        (h, p)
    }

    #[test]
    fn ipv6_partial_checksum_is_completed() {
        let (h, mut p) = partial();
        let (tx, hdr) = prepare_tx6(&h, &mut p, &mut Vec::new()).unwrap();
        assert_eq!(tx, TxPacket::Single { len: p.len() });
        assert_eq!(hdr.total_len, p.len());
        // Verifying: pseudo-header plus the whole UDP part sums to 0xffff.
        let s =
            csum::sum(&p[8..40]) + (p.len() - 40) as u32 + PROTO_UDP as u32 + csum::sum(&p[40..]);
        assert_eq!(csum::finish(s), 0);
    }

    /// A TCPv6 super-packet: 20-byte TCP header (seq 1000, flags PSH|ACK|FIN), `len` bytes.
    fn tcp6(len: usize) -> Vec<u8> {
        let mut tcp = vec![0u8; 20 + len];
        tcp[0..2].copy_from_slice(&4000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = TCP_PSH | TCP_ACK | TCP_FIN;
        for (i, b) in tcp[20..].iter_mut().enumerate() {
            *b = i as u8;
        }
        ipv6("fd00:10:244:1::5", "fd00:10:244:2::9", PROTO_TCP, &tcp)
    }

    fn gso6(mss: u16) -> VnetHdr {
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV6,
            hdr_len: 60,
            gso_size: mss,
            csum_start: 40,
            csum_offset: 16,
        }
    }

    #[test]
    fn tcpv6_super_packets_are_cut_into_valid_segments() {
        let mut p = tcp6(3001);
        let orig = p.clone();
        let mut headers = Vec::new();
        let (tx, _) = prepare_tx6(&gso6(1000), &mut p, &mut headers).unwrap();
        let TxPacket::Tso(tso) = tx else {
            panic!("{tx:?}")
        };
        assert_eq!((tso.count, tso.hdr_len, tso.mss), (4, 60, 1000));
        let mut payload = Vec::new();
        for i in 0..tso.count {
            let mut seg = headers[i * 60..(i + 1) * 60].to_vec();
            seg.extend_from_slice(&p[tso.payload(i)]);
            let h = parse_ipv6(&seg).unwrap();
            assert_eq!(h.total_len, seg.len(), "segment {i}'s payload length");
            let tcp = &seg[40..];
            let seq = u32::from_be_bytes(tcp[4..8].try_into().unwrap());
            assert_eq!(seq, 1000 + 1000 * i as u32);
            let last = i + 1 == tso.count;
            assert_eq!(
                tcp[13] & (TCP_FIN | TCP_PSH) != 0,
                last,
                "segment {i}'s flags"
            );
            let s = csum::sum(&seg[8..40]) + tcp.len() as u32 + PROTO_TCP as u32 + csum::sum(tcp);
            assert_eq!(csum::finish(s), 0, "segment {i}'s TCP checksum");
            payload.extend_from_slice(&tcp[20..]);
        }
        assert_eq!(
            payload,
            orig[60..],
            "the segments carry the payload in order"
        );
    }

    /// The receive side: consecutive TCPv6 segments of one flow merge into one TCPv6
    /// super-packet whose payload is theirs in order and whose partial checksum, completed as
    /// the kernel would, is valid; a SYN, UDP and a gap in sequence are written alone.
    #[test]
    fn tcpv6_segments_coalesce_into_a_valid_super_packet() {
        let mut p = tcp6(3000);
        // Segments as the sender cuts them (PSH|FIN only on the last: clear FIN for merging).
        p[40 + 13] = TCP_ACK | TCP_PSH;
        let mut headers = Vec::new();
        let (TxPacket::Tso(tso), _) = prepare_tx6(&gso6(1000), &mut p, &mut headers).unwrap()
        else {
            panic!("not segmented")
        };
        let mut buf = Vec::new();
        let mut spans = Vec::new();
        for i in 0..tso.count {
            let start = buf.len();
            buf.extend_from_slice(&headers[i * 60..(i + 1) * 60]);
            buf.extend_from_slice(&p[tso.payload(i)]);
            spans.push((start, buf.len()));
        }
        let (_, udp) = partial();
        let ustart = buf.len();
        buf.extend_from_slice(&udp);
        let mut c = Coalescer::new();
        for (s, e) in &spans {
            let h = parse_ipv6(&buf[*s..*e]).unwrap();
            c.push6(
                &buf[*s..*e],
                &h,
                Span {
                    buf: 0,
                    start: *s,
                    end: *e,
                },
            );
        }
        let uh = parse_ipv6(&buf[ustart..]).unwrap();
        c.push6(
            &buf[ustart..],
            &uh,
            Span {
                buf: 0,
                start: ustart,
                end: buf.len(),
            },
        );
        let items = c.items().to_vec();
        assert_eq!(items.len(), 2, "one merged TCP item, the UDP packet alone");
        assert_eq!(items[0].segments(), 3);
        let merged = flatten(&items[0], &[&buf]);
        let vh = VnetHdr::parse(&merged).unwrap();
        assert_eq!(
            (vh.gso_type, vh.gso_size, vh.csum_start),
            (GSO_TCPV6, 1000, 40)
        );
        let mut pkt = merged[VNET_HDR_LEN..].to_vec();
        assert_eq!(parse_ipv6(&pkt).unwrap().total_len, pkt.len());
        assert_eq!(&pkt[60..], &p[60..], "payload in order");
        assert_ne!(pkt[40 + 13] & TCP_PSH, 0, "the last segment's PSH is kept");
        // Completing the partial checksum gives a valid TCP checksum over the whole packet.
        complete_checksum(&vh, &mut pkt).unwrap();
        let s = csum::sum(&pkt[8..40])
            + (pkt.len() - 40) as u32
            + PROTO_TCP as u32
            + csum::sum(&pkt[40..]);
        assert_eq!(csum::finish(s), 0);
        assert_eq!(flatten(&items[1], &[&buf])[VNET_HDR_LEN..], udp[..]);
        // A gap in sequence starts a new item.
        c.clear();
        for (s, e) in [spans[0], spans[2]] {
            let h = parse_ipv6(&buf[s..e]).unwrap();
            c.push6(
                &buf[s..e],
                &h,
                Span {
                    buf: 0,
                    start: s,
                    end: e,
                },
            );
        }
        assert_eq!(c.items().len(), 2);
    }

    #[test]
    fn ipv6_bad_super_packets_and_offsets_are_refused() {
        let mut headers = Vec::new();
        // Not TCP (UDP claiming TCPv6 GSO), GSO size 0, a TCP header length past the packet,
        // a GSO type never asked for.
        let (_, mut p) = partial();
        assert_eq!(
            prepare_tx6(&gso6(1000), &mut p, &mut headers),
            Err(OffloadError::BadTcp)
        );
        let mut p = tcp6(100);
        assert_eq!(
            prepare_tx6(&gso6(0), &mut p, &mut headers),
            Err(OffloadError::ZeroGsoSize)
        );
        let mut p = tcp6(10);
        p[40 + 12] = 15 << 4;
        assert_eq!(
            prepare_tx6(&gso6(1000), &mut p, &mut headers),
            Err(OffloadError::BadTcp)
        );
        let mut h = gso6(1000);
        h.gso_type = 5;
        assert_eq!(
            prepare_tx6(&h, &mut tcp6(100), &mut headers),
            Err(OffloadError::UnsupportedGso(5))
        );
        let (mut h, mut p) = partial();
        h.csum_offset = 200;
        assert!(matches!(
            prepare_tx6(&h, &mut p, &mut headers),
            Err(OffloadError::BadChecksumOffsets { .. })
        ));
        let (h, mut p) = partial();
        assert!(matches!(
            prepare_tx6(&h, &mut p[..30], &mut headers),
            Err(OffloadError::Packet(PacketError::Truncated { .. }))
        ));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A TCP/IPv4 packet with timestamps-like options and `payload`.
    pub fn tcp_packet(seq: u32, flags: u8, payload: &[u8], id: u16) -> Vec<u8> {
        let tcphl = 32;
        let total = 20 + tcphl + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&id.to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = PROTO_TCP;
        p[12..16].copy_from_slice(&[10, 244, 1, 2]);
        p[16..20].copy_from_slice(&[10, 244, 2, 2]);
        csum::set_ipv4_header_checksum(&mut p[..20]);
        let t = &mut p[20..];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&5201u16.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&777u32.to_be_bytes());
        t[12] = ((tcphl / 4) as u8) << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&500u16.to_be_bytes());
        t[20..32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 7]);
        t[32..].copy_from_slice(payload);
        let s = csum::pseudo_header(
            [10, 244, 1, 2],
            [10, 244, 2, 2],
            PROTO_TCP,
            (tcphl + payload.len()) as u16,
        ) + csum::sum(&p[20..]);
        let c = csum::finish(s);
        p[36..38].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn tcp_valid(pkt: &[u8]) -> bool {
        let ip = parse_ipv4(pkt).unwrap();
        let s = csum::pseudo_header(
            pkt[12..16].try_into().unwrap(),
            pkt[16..20].try_into().unwrap(),
            PROTO_TCP,
            (ip.total_len - 20) as u16,
        ) + csum::sum(&pkt[20..ip.total_len]);
        csum::finish(csum::sum(&pkt[..20])) == 0 && csum::finish(s) == 0
    }

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + 3) as u8).collect()
    }

    /// A super-packet as the kernel hands it over: partial checksum, gso header.
    fn super_packet(n: usize, mss: u16, flags: u8) -> (VnetHdr, Vec<u8>) {
        let p = tcp_packet(1000, flags, &payload(n), 42);
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 52,
            gso_size: mss,
            csum_start: 20,
            csum_offset: 16,
        };
        (h, p)
    }

    fn segments(tso: &Tso, headers: &[u8], pkt: &[u8]) -> Vec<Vec<u8>> {
        (0..tso.count)
            .map(|i| {
                let mut s = headers[i * tso.hdr_len..(i + 1) * tso.hdr_len].to_vec();
                s.extend_from_slice(&pkt[tso.payload(i)]);
                s
            })
            .collect()
    }

    #[test]
    fn vnet_header_round_trip() {
        let h = VnetHdr {
            flags: 1,
            gso_type: 1,
            hdr_len: 52,
            gso_size: 1420,
            csum_start: 20,
            csum_offset: 16,
        };
        assert_eq!(VnetHdr::parse(&h.encode()).unwrap(), h);
        assert_eq!(VnetHdr::parse(&[0; 9]), Err(OffloadError::NoHeader));
    }

    #[test]
    fn tso_cuts_mss_segments_with_valid_headers() {
        let (h, mut p) = super_packet(10_000, 1400, TCP_ACK | TCP_PSH | TCP_FIN);
        let mut headers = Vec::new();
        let (tx, _) = prepare_tx(&h, &mut p, &mut headers).unwrap();
        let TxPacket::Tso(tso) = tx else {
            panic!("{tx:?}")
        };
        assert_eq!((tso.count, tso.hdr_len, tso.seg_size()), (8, 52, 1452));
        let segs = segments(&tso, &headers, &p);
        let mut seq = 1000u32;
        for (i, s) in segs.iter().enumerate() {
            assert!(tcp_valid(s), "segment {i} checksums");
            let ip = parse_ipv4(s).unwrap();
            assert_eq!(ip.total_len, s.len());
            assert_eq!(u16::from_be_bytes([s[4], s[5]]), 42 + i as u16);
            assert_eq!(u32::from_be_bytes(s[24..28].try_into().unwrap()), seq);
            seq += (s.len() - 52) as u32;
            let last = i == segs.len() - 1;
            assert_eq!(s[33] & (TCP_PSH | TCP_FIN) != 0, last, "segment {i} flags");
        }
        assert_eq!(segs[7].len(), 52 + 10_000 - 7 * 1400);
    }

    #[test]
    fn gso_batches_respect_the_udp_limits() {
        let tso = Tso {
            hdr_len: 52,
            mss: 1420,
            count: 46,
            payload_start: 52,
            payload_end: 52 + 65_000,
        };
        let b: Vec<_> = gso_batches(&tso).collect();
        assert_eq!(b, vec![(0, 44), (44, 2)]);
        for (first, n) in b {
            assert!(
                n * tso.seg_size() <= MAX_UDP_PAYLOAD && n <= MAX_GSO_SEGMENTS,
                "{first}"
            );
        }
        let tiny = Tso {
            hdr_len: 40,
            mss: 8,
            count: 200,
            payload_start: 40,
            payload_end: 1640,
        };
        assert!(gso_batches(&tiny).all(|(_, n)| n <= MAX_GSO_SEGMENTS));
    }

    #[test]
    fn partial_checksum_of_a_single_packet_is_completed() {
        let mut p = tcp_packet(5, TCP_ACK, &payload(100), 1);
        assert!(tcp_valid(&p));
        let good = p.clone();
        // What the kernel hands over: the pseudo-header sum in the checksum field.
        let partial = csum::fold(csum::pseudo_header(
            [10, 244, 1, 2],
            [10, 244, 2, 2],
            PROTO_TCP,
            (p.len() - 20) as u16,
        ));
        p[36..38].copy_from_slice(&partial.to_be_bytes());
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: 16,
            ..Default::default()
        };
        let (tx, _) = prepare_tx(&h, &mut p, &mut Vec::new()).unwrap();
        assert_eq!(tx, TxPacket::Single { len: good.len() });
        assert_eq!(p, good);
        let bad = VnetHdr {
            csum_start: 2000,
            ..h
        };
        assert!(matches!(
            prepare_tx(&bad, &mut p, &mut Vec::new()),
            Err(OffloadError::BadChecksumOffsets { .. })
        ));
    }

    #[test]
    fn bad_gso_input_is_an_error_not_a_panic() {
        let (mut h, mut p) = super_packet(3000, 1400, TCP_ACK);
        h.gso_size = 0;
        assert_eq!(
            prepare_tx(&h, &mut p, &mut Vec::new()).unwrap_err(),
            OffloadError::ZeroGsoSize
        );
        h.gso_size = 1400;
        h.gso_type = 4;
        assert_eq!(
            prepare_tx(&h, &mut p, &mut Vec::new()).unwrap_err(),
            OffloadError::UnsupportedGso(4)
        );
        h.gso_type = GSO_TCPV4;
        let mut udp = super::super::packet::tests::ipv4("10.244.1.2", "10.244.2.2", 17, &[0; 100]);
        assert_eq!(
            prepare_tx(&h, &mut udp, &mut Vec::new()).unwrap_err(),
            OffloadError::BadTcp
        );
        let mut bad_off = p.clone();
        bad_off[32] = 0xf0; // 60-byte TCP header
        bad_off.truncate(70);
        bad_off[2..4].copy_from_slice(&70u16.to_be_bytes());
        assert_eq!(
            prepare_tx(&h, &mut bad_off, &mut Vec::new()).unwrap_err(),
            OffloadError::BadTcp
        );
    }

    fn coalesce(pkts: &[Vec<u8>]) -> (Vec<Vec<u8>>, Vec<u16>) {
        let bufs: Vec<&[u8]> = pkts.iter().map(Vec::as_slice).collect();
        let mut c = Coalescer::new();
        for (i, p) in pkts.iter().enumerate() {
            let h = parse_ipv4(p).unwrap();
            c.push(
                p,
                &h,
                Span {
                    buf: i,
                    start: 0,
                    end: p.len(),
                },
            );
        }
        let items = c.items();
        (
            items.iter().map(|it| flatten(it, &bufs)).collect(),
            items.iter().map(|it| it.segments()).collect(),
        )
    }

    #[test]
    fn segments_coalesce_back_into_the_super_packet() {
        let (h, mut p) = super_packet(10_000, 1400, TCP_ACK | TCP_PSH);
        let mut headers = Vec::new();
        let (TxPacket::Tso(tso), _) = prepare_tx(&h, &mut p, &mut headers).unwrap() else {
            panic!()
        };
        let segs = segments(&tso, &headers, &p);
        let (out, counts) = coalesce(&segs);
        assert_eq!(counts, vec![8]);
        let o = &out[0];
        let v = VnetHdr::parse(o).unwrap();
        assert_eq!(
            (
                v.flags,
                v.gso_type,
                v.gso_size,
                v.hdr_len,
                v.csum_start,
                v.csum_offset
            ),
            (F_NEEDS_CSUM, GSO_TCPV4, 1400, 52, 20, 16)
        );
        let pkt = &o[VNET_HDR_LEN..];
        assert_eq!(pkt.len(), p.len());
        assert_eq!(csum::finish(csum::sum(&pkt[..20])), 0);
        // Same bytes as the original super-packet apart from the IP checksum and the partial
        // TCP checksum.
        assert_eq!(pkt[20..36], p[20..36]);
        assert_eq!(pkt[38..], p[38..]);
        assert_eq!(pkt[33] & TCP_PSH, TCP_PSH);
        // The partial checksum plus the data sum gives a valid checksum, as the kernel computes.
        let c = csum::finish(csum::sum(&pkt[20..]));
        let mut full = pkt.to_vec();
        full[36..38].copy_from_slice(&c.to_be_bytes());
        assert!(tcp_valid(&full));
    }

    #[test]
    fn gaps_flows_and_other_packets_are_never_merged_or_reordered() {
        let a = |seq, f| tcp_packet(seq, f, &payload(100), 0);
        let udp = super::super::packet::tests::ipv4("10.244.1.2", "10.244.2.2", 17, &[0; 10]);
        let mut other_flow = a(100, TCP_ACK);
        other_flow[22] = 0x99; // another destination port
        let mut syn = a(300, TCP_ACK | TCP_SYN);
        syn[33] = TCP_SYN | TCP_ACK;
        let pkts = vec![
            a(100, TCP_ACK),
            a(200, TCP_ACK),
            udp.clone(),
            other_flow,
            a(300, TCP_ACK), // merges into the first item: still in sequence
            a(500, TCP_ACK), // gap: new item
            a(600, TCP_ACK | TCP_PSH),
            a(700, TCP_ACK), // after PSH the item is closed
            tcp_packet(800, TCP_ACK, &payload(150), 0), // larger than gso_size: new item
        ];
        let (out, counts) = coalesce(&pkts);
        assert_eq!(counts, vec![3, 1, 1, 2, 1, 1]);
        assert_eq!(&out[1][VNET_HDR_LEN..], &udp[..]);
        assert_eq!(VnetHdr::parse(&out[1]).unwrap(), VnetHdr::default());
        // A single TCP packet goes out unchanged with an empty virtio header.
        assert_eq!(&out[4][VNET_HDR_LEN..], &pkts[7][..]);
        let _ = syn;
    }

    #[test]
    fn a_short_segment_closes_the_item() {
        let pkts = vec![
            tcp_packet(0, TCP_ACK, &payload(100), 0),
            tcp_packet(100, TCP_ACK, &payload(50), 0),
            tcp_packet(150, TCP_ACK, &payload(100), 0),
        ];
        let (_, counts) = coalesce(&pkts);
        assert_eq!(counts, vec![2, 1]);
    }
}
