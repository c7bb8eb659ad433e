//! The Internet checksum (RFC 1071). Segmenting a 64 KB TCP super-packet means summing all of it,
//! so the sum runs over 8-byte words: the ones' complement sum does not depend on byte order, so
//! native-endian words are added with end-around carry and the result is swapped once at the end.

/// Ones' complement sum of `data` as big-endian 16-bit words (an odd tail is padded with a zero
/// byte), not yet folded: add several with `+` and finish with [`fold`] or [`finish`]. Slices
/// summed separately must each start at an even offset of the checksummed data.
pub fn sum(data: &[u8]) -> u32 {
    // 32-bit words widened into eight independent u64 lanes: no carry chain between additions,
    // so the compiler vectorizes the loop (a 64 KB super-packet is summed on every send). A lane
    // overflows only after 2^32 words, far beyond any packet. 2^16 = 1 (mod 2^16 - 1), so a sum
    // of 32-bit words folds to the same ones' complement sum as the 16-bit words it holds.
    let mut lanes = [0u64; 8];
    let mut blocks = data.chunks_exact(32);
    for b in &mut blocks {
        for (i, lane) in lanes.iter_mut().enumerate() {
            let w: [u8; 4] = b[4 * i..4 * i + 4].try_into().expect("4-byte word");
            *lane += u32::from_ne_bytes(w) as u64;
        }
    }
    let mut acc: u64 = 0;
    let mut add = |v: u64| {
        let (s, carry) = acc.overflowing_add(v);
        acc = s + carry as u64;
    };
    for l in lanes {
        add(l);
    }
    let mut words = blocks.remainder().chunks_exact(4);
    for w in &mut words {
        add(u32::from_ne_bytes(w.try_into().expect("4-byte word")) as u64);
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut tail = [0u8; 4];
        tail[..rest.len()].copy_from_slice(rest);
        add(u32::from_ne_bytes(tail) as u64);
    }
    // 64 -> 32 -> 16 bits, each fold with its carry.
    let mut a = (acc & 0xffff_ffff) + (acc >> 32);
    a = (a & 0xffff_ffff) + (a >> 32);
    let mut b = (a & 0xffff) + (a >> 16);
    b = (b & 0xffff) + (b >> 16);
    b = (b & 0xffff) + (b >> 16);
    // The native-endian sum of big-endian words is the byte-swapped big-endian sum.
    u16::from_be(b as u16) as u32
}

/// Folds a sum of [`sum`]s to 16 bits (no complement): what a CHECKSUM_PARTIAL field holds.
pub fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The checksum to store: the complement of the folded sum.
pub fn finish(s: u32) -> u16 {
    !fold(s)
}

/// The TCP/UDP pseudo-header's sum for IPv4.
pub fn pseudo_header(src: [u8; 4], dst: [u8; 4], protocol: u8, len: u16) -> u32 {
    let w = |b: [u8; 4]| {
        u16::from_be_bytes([b[0], b[1]]) as u32 + u16::from_be_bytes([b[2], b[3]]) as u32
    };
    w(src) + w(dst) + protocol as u32 + len as u32
}

/// Recomputes an IPv4 header's checksum in place (`hdr` is exactly the header).
pub fn set_ipv4_header_checksum(hdr: &mut [u8]) {
    hdr[10] = 0;
    hdr[11] = 0;
    let c = finish(sum(hdr));
    hdr[10..12].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook definition, one big-endian word at a time.
    fn reference(data: &[u8]) -> u16 {
        let mut s: u32 = 0;
        for c in data.chunks(2) {
            let w = if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from_be_bytes([c[0], 0])
            };
            s += w as u32;
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    #[test]
    fn matches_the_definition_for_all_lengths_and_contents() {
        let mut rng = 0x1234_5678_u64;
        let mut random = |len: usize| -> Vec<u8> {
            (0..len)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng as u8
                })
                .collect()
        };
        for len in (0..300).chain([1024, 1431, 1432, 4097, 65535]) {
            let data = random(len);
            assert_eq!(fold(sum(&data)), reference(&data), "len {len}");
            // Sums of even-offset slices add up to the sum of the whole.
            let (a, b) = data.split_at((len / 2) & !1);
            assert_eq!(fold(sum(a) + sum(b)), reference(&data), "split {len}");
        }
        let ones = vec![0xffu8; 70000];
        assert_eq!(fold(sum(&ones)), reference(&ones));
    }

    #[test]
    fn rfc1071_example_and_ip_header() {
        // RFC 1071 section 3: 0001 f203 f4f5 f6f7 sums to ddf2.
        assert_eq!(
            fold(sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7])),
            0xddf2
        );
        // A real IPv4 header (checksum b861).
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        set_ipv4_header_checksum(&mut h);
        assert_eq!(&h[10..12], &[0xb8, 0x61]);
        assert_eq!(finish(sum(&h)), 0);
    }
}
