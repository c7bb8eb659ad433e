//! The udp peer table kept on disk (`<state-dir>/udp-peers`), so a restarted agent forwards from
//! the moment its workers start instead of after it has listed every lease from etcd. The file is
//! a cache, never the truth: the first reconcile replaces whatever it held, and anything in it
//! that does not parse is skipped, since a damaged cache must not keep the agent from starting.

use super::table::UdpPeer;
use std::path::Path;

/// More lines than any network has subnets (a /8 in /24s is 65,536) are not read.
pub const MAX_PEERS: usize = 65_536;

/// One `SUBNET PUBLIC_IP PORT` line per peer: the port is part of what the udp receive path
/// checks a packet's source against.
pub fn render(peers: &[UdpPeer]) -> String {
    peers
        .iter()
        .map(|p| format!("{} {} {}\n", p.subnet, p.public_ip, p.port))
        .collect()
}

/// The peers in `text`; lines that are not `SUBNET PUBLIC_IP PORT` are skipped and counted
/// (also the two-field lines of agents before the port check: the first reconcile fills them in).
pub fn parse(text: &str) -> (Vec<UdpPeer>, usize) {
    let mut peers = Vec::new();
    let mut bad = 0;
    for line in text.lines().take(MAX_PEERS) {
        let mut words = line.split_whitespace();
        let parsed = match (words.next(), words.next(), words.next(), words.next()) {
            (Some(s), Some(ip), Some(port), None) => s
                .parse()
                .ok()
                .zip(ip.parse().ok())
                .zip(port.parse::<u16>().ok().filter(|p| *p != 0)),
            _ => None,
        };
        match parsed {
            Some(((subnet, public_ip), port)) => peers.push(UdpPeer {
                subnet,
                public_ip,
                port,
            }),
            None => bad += 1,
        }
    }
    (peers, bad)
}

/// The peers stored at `path`; none when it is missing or unreadable (logged).
pub fn load(path: &Path) -> Vec<UdpPeer> {
    let text = match std::fs::read(path) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), "udp: not reading the stored peer table: {e}");
            return Vec::new();
        }
    };
    let (peers, bad) = parse(&text);
    if bad > 0 {
        tracing::warn!(path = %path.display(), skipped = bad, "udp: stored peer table has lines that are not SUBNET PUBLIC_IP PORT");
    }
    peers
}

/// Replaces the file at `path` with `peers` (written aside, then renamed).
pub fn store(path: &Path, peers: &[UdpPeer]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, render(peers))?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(s: &str, ip: &str) -> UdpPeer {
        UdpPeer {
            subnet: s.parse().unwrap(),
            public_ip: ip.parse().unwrap(),
            port: 8285,
        }
    }

    #[test]
    fn round_trip_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/udp-peers");
        assert!(load(&path).is_empty(), "missing file: no peers");
        let peers = vec![
            peer("10.244.2.0/24", "198.18.0.2"),
            peer("10.244.3.0/24", "198.18.0.3"),
        ];
        store(&path, &peers).unwrap();
        assert_eq!(load(&path), peers);
        store(&path, &[]).unwrap();
        assert!(load(&path).is_empty());
    }

    #[test]
    fn a_damaged_or_hostile_file_yields_only_its_good_lines() {
        let text = "10.244.2.0/24 198.18.0.2 8285\n\
                    10.244.3.0/24\n\
                    10.244.4.0/33 198.18.0.4 8285\n\
                    10.244.5.0/24 198.18.0.5 8285 extra\n\
                    10.244.8.0/24 198.18.0.8\n\
                    10.244.9.0/24 198.18.0.9 0\n\
                    10.244.10.0/24 198.18.0.10 65536\n\
                    garbage\n\
                    \u{0}\u{ff}\n\
                    10.244.6.0/24 999.1.1.1 8285\n\
                    \n\
                    10.244.7.0/24  198.18.0.7 8285\n";
        let (peers, bad) = parse(text);
        assert_eq!(
            peers,
            vec![
                peer("10.244.2.0/24", "198.18.0.2"),
                peer("10.244.7.0/24", "198.18.0.7")
            ]
        );
        assert_eq!(bad, 10);
        // Endless input is cut at MAX_PEERS lines.
        let huge = "10.244.2.0/24 198.18.0.2 8285\n".repeat(MAX_PEERS + 10);
        assert_eq!(parse(&huge).0.len(), MAX_PEERS);
        // Not UTF-8 at all: nothing, no panic.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("udp-peers");
        std::fs::write(&path, [0xffu8, 0xfe, 0x00, 0x0a, 0x80]).unwrap();
        assert!(load(&path).is_empty());
    }
}
