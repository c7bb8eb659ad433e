//! The inner packet (IPv4, or IPv6 in a dual-stack network): parsing that never trusts the
//! bytes, and the ICMP net-unreachable answer for destinations no peer holds. No I/O.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use super::csum;

pub const IPV4_MIN_HEADER: usize = 20;
/// The largest IPv4 packet (the total-length field is 16 bits).
pub const MAX_PACKET: usize = 65535;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("empty packet")]
    Empty,
    #[error("not IPv4 (IP version {0})")]
    NotIpv4(u8),
    #[error("not IPv6 (IP version {0})")]
    NotIpv6(u8),
    #[error("truncated: {have} bytes, the IP header says {need}")]
    Truncated { have: usize, need: usize },
    #[error("invalid IPv4 header length {0}")]
    BadHeaderLen(usize),
    #[error("oversized: {len} bytes, more than {max}")]
    Oversized { len: usize, max: usize },
}

/// The fields of an IPv4 header the data path needs; `total_len` bytes of the buffer are the
/// packet (anything after is padding and is never forwarded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Header {
    pub header_len: usize,
    pub total_len: usize,
    pub protocol: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// Fragment offset in 8-byte units; non-zero means not the first fragment.
    pub frag_offset: u16,
    pub more_fragments: bool,
}

impl Ipv4Header {
    pub fn is_fragment(&self) -> bool {
        self.frag_offset != 0 || self.more_fragments
    }
}

/// Validates and reads an IPv4 header. Every length is checked against the buffer, so a lying
/// header can never make a later step read past it.
pub fn parse_ipv4(pkt: &[u8]) -> Result<Ipv4Header, PacketError> {
    let first = *pkt.first().ok_or(PacketError::Empty)?;
    let version = first >> 4;
    if version != 4 {
        return Err(PacketError::NotIpv4(version));
    }
    if pkt.len() > MAX_PACKET {
        return Err(PacketError::Oversized {
            len: pkt.len(),
            max: MAX_PACKET,
        });
    }
    if pkt.len() < IPV4_MIN_HEADER {
        return Err(PacketError::Truncated {
            have: pkt.len(),
            need: IPV4_MIN_HEADER,
        });
    }
    let header_len = ((first & 0x0f) as usize) * 4;
    if header_len < IPV4_MIN_HEADER {
        return Err(PacketError::BadHeaderLen(header_len));
    }
    let total_len = u16::from_be_bytes([pkt[2], pkt[3]]) as usize;
    if total_len < header_len {
        return Err(PacketError::BadHeaderLen(header_len));
    }
    if total_len > pkt.len() {
        return Err(PacketError::Truncated {
            have: pkt.len(),
            need: total_len,
        });
    }
    let frag = u16::from_be_bytes([pkt[6], pkt[7]]);
    Ok(Ipv4Header {
        header_len,
        total_len,
        protocol: pkt[9],
        src: Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]),
        dst: Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]),
        frag_offset: frag & 0x1fff,
        more_fragments: frag & 0x2000 != 0,
    })
}

pub const IPV6_HEADER: usize = 40;
pub const PROTO_ICMPV6: u8 = 58;

/// The fields of an IPv6 header the data path needs; `total_len` (40 + payload length) bytes of
/// the buffer are the packet. Extension headers are not walked: routing and the source checks
/// need only the fixed header (TCPv6 segmentation and coalescing, in `offload`, take only TCP
/// right after it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6Header {
    pub total_len: usize,
    pub next_header: u8,
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
}

/// Validates and reads an IPv6 header. A zero payload length (a jumbogram's, RFC 2675) is
/// refused: no overlay MTU allows one, and accepting it would mean trusting a hop-by-hop
/// option for the length.
pub fn parse_ipv6(pkt: &[u8]) -> Result<Ipv6Header, PacketError> {
    let first = *pkt.first().ok_or(PacketError::Empty)?;
    let version = first >> 4;
    if version != 6 {
        return Err(PacketError::NotIpv6(version));
    }
    if pkt.len() > IPV6_HEADER + MAX_PACKET {
        return Err(PacketError::Oversized {
            len: pkt.len(),
            max: IPV6_HEADER + MAX_PACKET,
        });
    }
    if pkt.len() < IPV6_HEADER {
        return Err(PacketError::Truncated {
            have: pkt.len(),
            need: IPV6_HEADER,
        });
    }
    let payload = u16::from_be_bytes([pkt[4], pkt[5]]) as usize;
    if payload == 0 {
        return Err(PacketError::BadHeaderLen(IPV6_HEADER));
    }
    let total_len = IPV6_HEADER + payload;
    if total_len > pkt.len() {
        return Err(PacketError::Truncated {
            have: pkt.len(),
            need: total_len,
        });
    }
    let addr = |at: usize| {
        let b: [u8; 16] = pkt[at..at + 16].try_into().expect("16 bytes");
        Ipv6Addr::from(b)
    };
    Ok(Ipv6Header {
        total_len,
        next_header: pkt[6],
        src: addr(8),
        dst: addr(24),
    })
}

/// The IP version of a packet (its first nibble); `None` for an empty one.
pub fn ip_version(pkt: &[u8]) -> Option<u8> {
    pkt.first().map(|b| b >> 4)
}

/// Whether an IPv6 packet is the kernel's own link-local control traffic (MLD reports, router
/// or neighbour solicitations): a multicast or link-local destination, or an unspecified or
/// link-local source. Such packets never leave the link, so they are never tunnelled.
pub fn is_link_local_traffic(hdr: &Ipv6Header) -> bool {
    let ll = |a: Ipv6Addr| a.segments()[0] & 0xffc0 == 0xfe80;
    hdr.dst.is_multicast() || ll(hdr.dst) || hdr.src.is_unspecified() || ll(hdr.src)
}

/// ICMP error types: never answered with another error (RFC 1122 3.2.2).
fn is_icmp_error(icmp_type: u8) -> bool {
    matches!(icmp_type, 3 | 4 | 5 | 11 | 12)
}

fn is_unicast(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback())
}

/// How much of the offending packet the error quotes: RFC 1812 4.3.2.3 allows up to a 576-byte
/// error, which is what Linux sends too.
const ICMP_ERROR_MAX: usize = 576;

/// Writes an ICMP destination-unreachable / net-unreachable (type 3 code 0) from `src` back to
/// the sender of `orig` into `out`; returns its length, or `None` when no error may be sent
/// (the packet is itself an ICMP error, a later fragment, or from a non-unicast source).
pub fn icmp_net_unreachable(
    orig: &[u8],
    hdr: &Ipv4Header,
    src: Ipv4Addr,
    out: &mut [u8],
) -> Option<usize> {
    if hdr.frag_offset != 0
        || !is_unicast(hdr.src)
        || hdr.dst.is_broadcast()
        || hdr.dst.is_multicast()
    {
        return None;
    }
    if hdr.protocol == PROTO_ICMP {
        // A first fragment too short to show the type cannot be proven not to be an error.
        let t = *orig.get(hdr.header_len)?;
        if is_icmp_error(t) {
            return None;
        }
    }
    let quoted = hdr.total_len.min(ICMP_ERROR_MAX - 28);
    let len = 28 + quoted;
    if out.len() < len {
        return None;
    }
    let out = &mut out[..len];
    out[0] = 0x45;
    // Internetwork control, as the kernel marks its own ICMP errors.
    out[1] = 0xc0;
    out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    out[4..8].copy_from_slice(&[0, 0, 0, 0]);
    out[8] = 64;
    out[9] = PROTO_ICMP;
    out[12..16].copy_from_slice(&src.octets());
    out[16..20].copy_from_slice(&hdr.src.octets());
    csum::set_ipv4_header_checksum(&mut out[..20]);
    out[20] = 3;
    out[21] = 0;
    out[22..28].copy_from_slice(&[0; 6]);
    out[28..].copy_from_slice(&orig[..quoted]);
    let c = csum::finish(csum::sum(&out[20..]));
    out[22..24].copy_from_slice(&c.to_be_bytes());
    Some(len)
}

/// The IPv6 minimum MTU: an ICMPv6 error never exceeds it (RFC 4443 2.4 (c)).
const ICMPV6_ERROR_MAX: usize = 1280;

/// Writes an ICMPv6 destination-unreachable / no-route (type 1 code 0) from `src` back to the
/// sender of `orig` into `out`; returns its length, or `None` when no error may be sent (the
/// packet is itself an ICMPv6 error, or its source or destination is not unicast: RFC 4443
/// 2.4 (e)). An extension header before an ICMPv6 error is not walked: such a packet gets an
/// answer, which is harmless (the sender's own error is never answered by a peer).
pub fn icmp6_unreachable(
    orig: &[u8],
    hdr: &Ipv6Header,
    src: Ipv6Addr,
    out: &mut [u8],
) -> Option<usize> {
    if hdr.src.is_unspecified() || hdr.src.is_multicast() || hdr.dst.is_multicast() {
        return None;
    }
    if hdr.next_header == PROTO_ICMPV6 && *orig.get(IPV6_HEADER)? < 128 {
        return None;
    }
    let quoted = hdr.total_len.min(ICMPV6_ERROR_MAX - IPV6_HEADER - 8);
    let len = IPV6_HEADER + 8 + quoted;
    if out.len() < len {
        return None;
    }
    let out = &mut out[..len];
    out[..4].copy_from_slice(&[0x60, 0, 0, 0]);
    out[4..6].copy_from_slice(&((8 + quoted) as u16).to_be_bytes());
    out[6] = PROTO_ICMPV6;
    out[7] = 64;
    out[8..24].copy_from_slice(&src.octets());
    out[24..40].copy_from_slice(&hdr.src.octets());
    out[40] = 1;
    out[41..48].copy_from_slice(&[0; 7]);
    out[48..].copy_from_slice(&orig[..quoted]);
    let s =
        csum::sum(&out[8..40]) + (8 + quoted) as u32 + PROTO_ICMPV6 as u32 + csum::sum(&out[40..]);
    out[42..44].copy_from_slice(&csum::finish(s).to_be_bytes());
    Some(len)
}

/// A token bucket for ICMP errors, like the kernel's `icmp_ratelimit`: a sender hammering an
/// unknown subnet must not turn the data path into an ICMP generator.
#[derive(Debug, Clone)]
pub struct IcmpLimiter {
    tokens: f64,
    burst: f64,
    per_sec: f64,
    last: Option<Instant>,
}

impl IcmpLimiter {
    pub fn new(per_sec: u32, burst: u32) -> IcmpLimiter {
        IcmpLimiter {
            tokens: burst as f64,
            burst: burst as f64,
            per_sec: per_sec as f64,
            last: None,
        }
    }

    pub fn allow(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let dt = now
                .saturating_duration_since(last)
                .min(Duration::from_secs(10));
            self.tokens = (self.tokens + dt.as_secs_f64() * self.per_sec).min(self.burst);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal valid IPv4 packet with `payload_len` zero bytes of `protocol`.
    pub fn ipv4(src: &str, dst: &str, protocol: u8, payload: &[u8]) -> Vec<u8> {
        let total = 20 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[8] = 64;
        p[9] = protocol;
        p[12..16].copy_from_slice(&src.parse::<Ipv4Addr>().unwrap().octets());
        p[16..20].copy_from_slice(&dst.parse::<Ipv4Addr>().unwrap().octets());
        csum::set_ipv4_header_checksum(&mut p[..20]);
        p[20..].copy_from_slice(payload);
        p
    }

    #[test]
    fn parses_a_valid_header() {
        let p = ipv4("10.244.2.5", "10.244.1.7", PROTO_UDP, &[1, 2, 3]);
        let h = parse_ipv4(&p).unwrap();
        assert_eq!(h.header_len, 20);
        assert_eq!(h.total_len, 23);
        assert_eq!(h.src.to_string(), "10.244.2.5");
        assert_eq!(h.dst.to_string(), "10.244.1.7");
        assert_eq!(h.protocol, PROTO_UDP);
        assert!(!h.is_fragment());
        // Trailing padding is allowed and excluded by total_len.
        let mut padded = p.clone();
        padded.extend([0; 5]);
        assert_eq!(parse_ipv4(&padded).unwrap().total_len, 23);
    }

    #[test]
    fn rejects_every_kind_of_bad_input() {
        let good = ipv4("10.244.2.5", "10.244.1.7", PROTO_UDP, &[0; 8]);
        assert_eq!(parse_ipv4(&[]), Err(PacketError::Empty));
        let mut v6 = good.clone();
        v6[0] = 0x60;
        assert_eq!(parse_ipv4(&v6), Err(PacketError::NotIpv4(6)));
        assert!(matches!(
            parse_ipv4(&good[..19]),
            Err(PacketError::Truncated { .. })
        ));
        assert!(matches!(
            parse_ipv4(&good[..27]),
            Err(PacketError::Truncated { have: 27, need: 28 })
        ));
        let mut ihl = good.clone();
        ihl[0] = 0x44;
        assert_eq!(parse_ipv4(&ihl), Err(PacketError::BadHeaderLen(16)));
        let mut long_ihl = good.clone();
        long_ihl[0] = 0x4f; // 60-byte header in a 28-byte packet
        assert!(parse_ipv4(&long_ihl).is_err());
        let mut short_total = good.clone();
        short_total[2..4].copy_from_slice(&10u16.to_be_bytes());
        assert!(parse_ipv4(&short_total).is_err());
        let huge = vec![0x45u8; MAX_PACKET + 1];
        assert!(matches!(
            parse_ipv4(&huge),
            Err(PacketError::Oversized { .. })
        ));
    }

    /// A minimal valid IPv6 packet carrying `payload` as `next_header`.
    pub fn ipv6(src: &str, dst: &str, next_header: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; IPV6_HEADER + payload.len()];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
        p[6] = next_header;
        p[7] = 64;
        p[8..24].copy_from_slice(&src.parse::<Ipv6Addr>().unwrap().octets());
        p[24..40].copy_from_slice(&dst.parse::<Ipv6Addr>().unwrap().octets());
        p[40..].copy_from_slice(payload);
        p
    }

    #[test]
    fn parses_a_valid_ipv6_header_and_ignores_padding() {
        let p = ipv6(
            "fd00:10:244:2::5",
            "fd00:10:244:1::7",
            PROTO_UDP,
            &[1, 2, 3],
        );
        let h = parse_ipv6(&p).unwrap();
        assert_eq!(h.total_len, 43);
        assert_eq!(h.next_header, PROTO_UDP);
        assert_eq!(h.src.to_string(), "fd00:10:244:2::5");
        assert_eq!(h.dst.to_string(), "fd00:10:244:1::7");
        let mut padded = p.clone();
        padded.extend([0; 7]);
        assert_eq!(parse_ipv6(&padded).unwrap().total_len, 43);
        assert_eq!(ip_version(&p), Some(6));
        assert_eq!(ip_version(&[]), None);
    }

    #[test]
    fn rejects_every_kind_of_bad_ipv6_input() {
        let good = ipv6("fd00:10:244:2::5", "fd00:10:244:1::7", PROTO_UDP, &[0; 8]);
        assert_eq!(parse_ipv6(&[]), Err(PacketError::Empty));
        let v4 = ipv4("10.244.2.5", "10.244.1.7", PROTO_UDP, &[0; 8]);
        assert_eq!(parse_ipv6(&v4), Err(PacketError::NotIpv6(4)));
        let mut v7 = good.clone();
        v7[0] = 0x70;
        assert_eq!(parse_ipv6(&v7), Err(PacketError::NotIpv6(7)));
        // Shorter than the fixed header, even by one byte.
        assert!(matches!(
            parse_ipv6(&good[..39]),
            Err(PacketError::Truncated { have: 39, need: 40 })
        ));
        assert!(matches!(
            parse_ipv6(&good[..1]),
            Err(PacketError::Truncated { .. })
        ));
        // A payload length past the buffer: the header lies about the size.
        let mut long = good.clone();
        long[4..6].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(matches!(
            parse_ipv6(&long),
            Err(PacketError::Truncated {
                have: 48,
                need: 65575
            })
        ));
        assert!(matches!(
            parse_ipv6(&good[..47]),
            Err(PacketError::Truncated { have: 47, need: 48 })
        ));
        // Payload length 0 (a jumbogram) is refused.
        let mut jumbo = good.clone();
        jumbo[4..6].copy_from_slice(&[0, 0]);
        assert_eq!(parse_ipv6(&jumbo), Err(PacketError::BadHeaderLen(40)));
        let huge = vec![0x60u8; IPV6_HEADER + MAX_PACKET + 1];
        assert!(matches!(
            parse_ipv6(&huge),
            Err(PacketError::Oversized { .. })
        ));
    }

    #[test]
    fn icmp6_unreachable_quotes_checksums_and_knows_when_to_stay_silent() {
        let src: Ipv6Addr = "fd00:10:244::".parse().unwrap();
        let orig = ipv6(
            "fd00:10:244:1::7",
            "fd00:10:244:99::1",
            PROTO_UDP,
            &[7; 100],
        );
        let h = parse_ipv6(&orig).unwrap();
        let mut out = [0u8; 2000];
        let n = icmp6_unreachable(&orig, &h, src, &mut out).unwrap();
        let e = parse_ipv6(&out[..n]).unwrap();
        assert_eq!((e.src, e.dst, e.next_header), (src, h.src, PROTO_ICMPV6));
        assert_eq!((out[40], out[41]), (1, 0));
        let s =
            csum::sum(&out[8..40]) + (n - 40) as u32 + PROTO_ICMPV6 as u32 + csum::sum(&out[40..n]);
        assert_eq!(csum::finish(s), 0, "ICMPv6 checksum");
        assert_eq!(&out[48..n], &orig[..]);
        // Never more than the IPv6 minimum MTU.
        let big = ipv6(
            "fd00:10:244:1::7",
            "fd00:10:244:99::1",
            PROTO_UDP,
            &[0; 1400],
        );
        let n = icmp6_unreachable(&big, &parse_ipv6(&big).unwrap(), src, &mut out).unwrap();
        assert_eq!(n, 1280);
        // No error for an error, for multicast, or for an unspecified source.
        let err = ipv6(
            "fd00:10:244:1::7",
            "fd00:10:244:99::1",
            PROTO_ICMPV6,
            &[1, 0, 0, 0],
        );
        assert_eq!(
            icmp6_unreachable(&err, &parse_ipv6(&err).unwrap(), src, &mut out),
            None
        );
        let echo = ipv6(
            "fd00:10:244:1::7",
            "fd00:10:244:99::1",
            PROTO_ICMPV6,
            &[128, 0, 0, 0],
        );
        assert!(icmp6_unreachable(&echo, &parse_ipv6(&echo).unwrap(), src, &mut out).is_some());
        for (s, d) in [("::", "fd00:10:244:99::1"), ("fd00:10:244:1::7", "ff05::2")] {
            let p = ipv6(s, d, PROTO_UDP, &[0; 8]);
            assert_eq!(
                icmp6_unreachable(&p, &parse_ipv6(&p).unwrap(), src, &mut out),
                None
            );
        }
        assert_eq!(
            icmp6_unreachable(&orig, &h, src, &mut out[..100]),
            None,
            "no room"
        );
    }

    #[test]
    fn link_local_control_traffic_is_recognised() {
        let h = |s: &str, d: &str| parse_ipv6(&ipv6(s, d, PROTO_ICMPV6, &[0; 8])).unwrap();
        // MLDv2 report from an address-less device, router solicitation, neighbour solicitation.
        assert!(is_link_local_traffic(&h("::", "ff02::16")));
        assert!(is_link_local_traffic(&h("fe80::1", "ff02::2")));
        assert!(is_link_local_traffic(&h(
            "fd00:10:244:1::",
            "ff02::1:ff00:5"
        )));
        assert!(is_link_local_traffic(&h("fd00:10:244:1::5", "fe80::9")));
        assert!(!is_link_local_traffic(&h(
            "fd00:10:244:1::5",
            "fd00:10:244:2::9"
        )));
    }

    #[test]
    fn icmp_unreachable_quotes_the_packet_and_checksums() {
        let orig = ipv4("10.244.1.7", "10.244.99.1", PROTO_UDP, &[7; 100]);
        let h = parse_ipv4(&orig).unwrap();
        let mut out = [0u8; 1500];
        let n = icmp_net_unreachable(&orig, &h, "10.244.1.0".parse().unwrap(), &mut out).unwrap();
        let icmp = &out[..n];
        let ih = parse_ipv4(icmp).unwrap();
        assert_eq!(
            (ih.src.to_string(), ih.dst.to_string()),
            ("10.244.1.0".into(), "10.244.1.7".into())
        );
        assert_eq!(ih.protocol, PROTO_ICMP);
        assert_eq!(
            csum::finish(csum::sum(&icmp[..20])),
            0,
            "IP header checksum"
        );
        assert_eq!(csum::finish(csum::sum(&icmp[20..])), 0, "ICMP checksum");
        assert_eq!((icmp[20], icmp[21]), (3, 0));
        assert_eq!(&icmp[28..], &orig[..]);
    }

    #[test]
    fn icmp_unreachable_is_not_sent_when_forbidden() {
        let src = "10.244.1.0".parse().unwrap();
        let mut out = [0u8; 1500];
        let err = ipv4(
            "10.244.1.7",
            "10.244.99.1",
            PROTO_ICMP,
            &[3, 0, 0, 0, 0, 0, 0, 0],
        );
        assert_eq!(
            icmp_net_unreachable(&err, &parse_ipv4(&err).unwrap(), src, &mut out),
            None
        );
        let echo = ipv4(
            "10.244.1.7",
            "10.244.99.1",
            PROTO_ICMP,
            &[8, 0, 0, 0, 0, 0, 0, 0],
        );
        assert!(icmp_net_unreachable(&echo, &parse_ipv4(&echo).unwrap(), src, &mut out).is_some());
        let bcast = ipv4("0.0.0.0", "10.244.99.1", PROTO_UDP, &[0; 8]);
        assert_eq!(
            icmp_net_unreachable(&bcast, &parse_ipv4(&bcast).unwrap(), src, &mut out),
            None
        );
        let mut frag = ipv4("10.244.1.7", "10.244.99.1", PROTO_UDP, &[0; 8]);
        frag[7] = 1;
        assert_eq!(
            icmp_net_unreachable(&frag, &parse_ipv4(&frag).unwrap(), src, &mut out),
            None
        );
        // A big packet is quoted only up to a 576-byte error.
        let big = ipv4("10.244.1.7", "10.244.99.1", PROTO_UDP, &[0; 1400]);
        let n = icmp_net_unreachable(&big, &parse_ipv4(&big).unwrap(), src, &mut out).unwrap();
        assert_eq!(n, 576);
    }

    #[test]
    fn limiter_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut l = IcmpLimiter::new(10, 3);
        assert!((0..3).all(|_| l.allow(t0)));
        assert!(!l.allow(t0));
        assert!(l.allow(t0 + Duration::from_millis(110)));
        assert!(!l.allow(t0 + Duration::from_millis(120)));
    }
}
