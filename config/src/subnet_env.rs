//! `subnet.env`: how the agent tells the CNI plugin (and flannel-era tooling) its lease.

use ipnetwork::{Ipv4Network, Ipv6Network};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SubnetEnvError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {key}: {reason}")]
    Field {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

/// What a node's lease tells its pods. At least one address family is present: flannel writes
/// the IPv4 pair only with `EnableIPv4` and the IPv6 pair only with `EnableIPv6`, so an IPv6-only
/// node has `ipv4: None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// `TWEED_NETWORK` / `TWEED_SUBNET`; `None` on an IPv6-only node.
    pub ipv4: Option<SubnetEnvV4>,
    pub mtu: u32,
    pub ipmasq: bool,
    /// The IPv6 half of a dual-stack lease, or the whole lease of an IPv6-only node; `None` on a
    /// v4-only node.
    pub ipv6: Option<SubnetEnvV6>,
}

/// `TWEED_NETWORK` / `TWEED_SUBNET` (flannel: `FLANNEL_NETWORK` / `FLANNEL_SUBNET`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetEnvV4 {
    pub network: Ipv4Network,
    /// The node's first usable address with the subnet's prefix, e.g. `10.244.3.1/24`.
    pub subnet: Ipv4Network,
}

impl SubnetEnvV4 {
    /// The node subnet itself (network address), e.g. `10.244.3.0/24`.
    pub fn node_subnet(&self) -> Ipv4Network {
        Ipv4Network::new(self.subnet.network(), self.subnet.prefix()).expect("prefix already valid")
    }
}

/// `TWEED_IPV6_NETWORK` / `TWEED_IPV6_SUBNET` (flannel: `FLANNEL_IPV6_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetEnvV6 {
    pub network: Ipv6Network,
    /// The node's first usable address with the subnet's prefix, e.g. `fd00:10:244:3::1/64`.
    pub subnet: Ipv6Network,
}

impl SubnetEnvV6 {
    /// The pair for the node subnet `own` (its network address) in `network`: flannel writes
    /// the subnet's first address with its length.
    pub fn for_node(network: Ipv6Network, own: Ipv6Network) -> Self {
        let first = std::net::Ipv6Addr::from(u128::from(own.network()) + 1);
        SubnetEnvV6 {
            network,
            subnet: Ipv6Network::new(first, own.prefix()).expect("the subnet's own prefix"),
        }
    }

    /// The node subnet itself (network address), e.g. `fd00:10:244:3::/64`.
    pub fn node_subnet(&self) -> Ipv6Network {
        Ipv6Network::new(self.subnet.network(), self.subnet.prefix()).expect("prefix already valid")
    }
}

impl SubnetEnv {
    /// The IPv4 node subnet, e.g. `10.244.3.0/24`; `None` on an IPv6-only node.
    pub fn node_subnet(&self) -> Option<Ipv4Network> {
        self.ipv4.map(|v4| v4.node_subnet())
    }

    /// The node's subnets as the file states them (first addresses), IPv4 first, e.g.
    /// `10.244.3.1/24 fd00:10:244:3::1/64`; for logs and progress lines.
    pub fn subnets(&self) -> String {
        let v4 = self.ipv4.map(|v4| v4.subnet.to_string());
        let v6 = self.ipv6.map(|v6| v6.subnet.to_string());
        [v4, v6].into_iter().flatten().collect::<Vec<_>>().join(" ")
    }

    /// The file's text. A value with neither pair renders a file [`parse`](Self::parse) refuses;
    /// [`write_atomic`](Self::write_atomic) refuses to write it.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if let Some(v4) = &self.ipv4 {
            let _ = writeln!(s, "TWEED_NETWORK={}", v4.network);
            let _ = writeln!(s, "TWEED_SUBNET={}", v4.subnet);
        }
        // The v6 pair sits where flannel puts FLANNEL_IPV6_*: after the v4 pair.
        if let Some(v6) = &self.ipv6 {
            let _ = writeln!(s, "TWEED_IPV6_NETWORK={}", v6.network);
            let _ = writeln!(s, "TWEED_IPV6_SUBNET={}", v6.subnet);
        }
        let _ = writeln!(s, "TWEED_MTU={}", self.mtu);
        let _ = writeln!(s, "TWEED_IPMASQ={}", self.ipmasq);
        s
    }

    /// Parses `TWEED_*` or flannel's `FLANNEL_*` keys; `TWEED_*` wins when both appear. Comments,
    /// blank lines, `export ` and quotes are tolerated because operators edit this file by hand;
    /// a key set twice is refused, since which of the two a reader honours would be a guess.
    /// Each family's pair is both-or-neither and at least one family is present.
    pub fn parse(path: &Path, text: &str) -> Result<Self, SubnetEnvError> {
        let field = |key: &str, reason: String| SubnetEnvError::Field {
            path: path.to_path_buf(),
            key: key.to_string(),
            reason,
        };
        let mut tweed = std::collections::HashMap::new();
        let mut flannel = std::collections::HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            let line = line.strip_prefix("export ").unwrap_or(line);
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let v = v.trim().trim_matches('"').trim_matches('\'').to_string();
            let k = k.trim();
            let (map, short) = if let Some(short) = k.strip_prefix("TWEED_") {
                (&mut tweed, short)
            } else if let Some(short) = k.strip_prefix("FLANNEL_") {
                (&mut flannel, short)
            } else {
                continue;
            };
            if let Some((first, _)) = map.insert(short.to_string(), (n + 1, v)) {
                return Err(field(k, format!("set twice (lines {first} and {})", n + 1)));
            }
        }
        let get = |k: &str| -> Option<(String, &String)> {
            tweed
                .get(k)
                .map(|(_, v)| (format!("TWEED_{k}"), v))
                .or_else(|| flannel.get(k).map(|(_, v)| (format!("FLANNEL_{k}"), v)))
        };
        // Both or neither per family: half a lease would give pods an address with no network
        // to route it in (or the reverse). The missing half is named as the present half is
        // spelled, so an error about a flannel file names flannel's key.
        type Pair<'a> = Option<((String, &'a String), (String, &'a String))>;
        let pair = |net: &str, sub: &str| -> Result<Pair, SubnetEnvError> {
            match (get(net), get(sub)) {
                (None, None) => Ok(None),
                (Some(n), Some(s)) => Ok(Some((n, s))),
                (Some((nk, _)), None) => Err(field(
                    &nk.replace(net, sub),
                    format!("missing while {nk} is set"),
                )),
                (None, Some((sk, _))) => Err(field(
                    &sk.replace(sub, net),
                    format!("missing while {sk} is set"),
                )),
            }
        };
        let ipv4 = match pair("NETWORK", "SUBNET")? {
            None => None,
            Some(((nk, nv), (sk, sv))) => {
                let network: Ipv4Network = nv
                    .parse()
                    .map_err(|_| field(&nk, format!("{nv:?} is not an IPv4 CIDR")))?;
                let subnet: Ipv4Network = sv
                    .parse()
                    .map_err(|_| field(&sk, format!("{sv:?} is not an IPv4 CIDR")))?;
                if !network.contains(subnet.ip()) || subnet.prefix() < network.prefix() {
                    return Err(field(&sk, format!("{subnet} is outside {nk} {network}")));
                }
                Some(SubnetEnvV4 { network, subnet })
            }
        };
        let ipv6 = match pair("IPV6_NETWORK", "IPV6_SUBNET")? {
            None => None,
            Some(((nk, nv), (sk, sv))) => {
                let network: Ipv6Network = nv
                    .parse()
                    .map_err(|_| field(&nk, format!("{nv:?} is not an IPv6 CIDR")))?;
                let subnet: Ipv6Network = sv
                    .parse()
                    .map_err(|_| field(&sk, format!("{sv:?} is not an IPv6 CIDR")))?;
                if !network.contains(subnet.ip()) || subnet.prefix() < network.prefix() {
                    return Err(field(&sk, format!("{subnet} is outside {nk} {network}")));
                }
                Some(SubnetEnvV6 { network, subnet })
            }
        };
        let (mk, mv) = get("MTU").ok_or_else(|| field("TWEED_MTU", "missing".to_string()))?;
        let mtu: u32 = mv
            .parse()
            .ok()
            .filter(|m| (576..=65535).contains(m))
            .ok_or_else(|| field(&mk, format!("{mv:?} is not an MTU (576..=65535)")))?;
        let ipmasq = match get("IPMASQ") {
            None => false,
            Some((k, v)) => match v.as_str() {
                "true" => true,
                "false" | "" => false,
                other => return Err(field(&k, format!("{other:?} is not true or false"))),
            },
        };
        if ipv4.is_none() && ipv6.is_none() {
            return Err(field(
                "TWEED_NETWORK",
                "missing, and so is TWEED_IPV6_NETWORK: a lease needs at least one address family"
                    .to_string(),
            ));
        }
        Ok(SubnetEnv {
            ipv4,
            mtu,
            ipmasq,
            ipv6,
        })
    }

    pub fn read(path: &Path) -> Result<Self, SubnetEnvError> {
        let text = std::fs::read_to_string(path).map_err(|source| SubnetEnvError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Writes through a temp file + rename in the same directory, so a reader never sees half a file.
    pub fn write_atomic(&self, path: &Path) -> Result<(), SubnetEnvError> {
        if self.ipv4.is_none() && self.ipv6.is_none() {
            // Readers would refuse the file; keeping the previous one is better than that.
            return Err(SubnetEnvError::Field {
                path: path.to_path_buf(),
                key: "TWEED_NETWORK".to_string(),
                reason: "neither an IPv4 nor an IPv6 pair to write".to_string(),
            });
        }
        write_atomic(path, self.render().as_bytes())
    }
}

/// Atomic file replacement shared by everything that writes state other processes read.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), SubnetEnvError> {
    let io = |source| SubnetEnvError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ipv6_pair_is_the_first_address_of_the_node_subnet_with_its_length() {
        let net: Ipv6Network = "fd00:10:244::/56".parse().unwrap();
        for (own, want) in [
            ("fd00:10:244:3::/64", "fd00:10:244:3::1/64"),
            ("fd00:10:244:0:8000::/66", "fd00:10:244:0:8000::1/66"),
        ] {
            let pair = SubnetEnvV6::for_node(net, own.parse().unwrap());
            assert_eq!((pair.network, pair.subnet.to_string()), (net, want.into()));
            assert_eq!(pair.node_subnet().to_string(), own);
        }
    }

    fn sample() -> SubnetEnv {
        SubnetEnv {
            ipv4: Some(SubnetEnvV4 {
                network: "10.244.0.0/16".parse().unwrap(),
                subnet: "10.244.3.1/24".parse().unwrap(),
            }),
            mtu: 1450,
            ipmasq: true,
            ipv6: None,
        }
    }

    fn dual() -> SubnetEnv {
        SubnetEnv {
            ipv6: Some(SubnetEnvV6 {
                network: "fd00:10:244::/56".parse().unwrap(),
                subnet: "fd00:10:244:3::1/64".parse().unwrap(),
            }),
            ..sample()
        }
    }

    #[test]
    fn dual_stack_render_parse_round_trip() {
        let s = dual();
        let text = s.render();
        assert!(
            text
                == "TWEED_NETWORK=10.244.0.0/16\nTWEED_SUBNET=10.244.3.1/24\nTWEED_IPV6_NETWORK=fd00:10:244::/56\nTWEED_IPV6_SUBNET=fd00:10:244:3::1/64\nTWEED_MTU=1450\nTWEED_IPMASQ=true\n",
            "{text}"
        );
        assert_eq!(SubnetEnv::parse(Path::new("x"), &text).unwrap(), s);
        assert_eq!(
            s.ipv6.unwrap().node_subnet().to_string(),
            "fd00:10:244:3::/64"
        );
        // flannel's spelling of the same lease.
        let flannel = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:3::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
        assert_eq!(SubnetEnv::parse(Path::new("x"), flannel).unwrap(), dual());
    }

    #[test]
    fn bad_ipv6_halves_name_the_key() {
        let base = "TWEED_NETWORK=10.244.0.0/16\nTWEED_SUBNET=10.244.3.1/24\nTWEED_MTU=1450\n";
        for (extra, key) in [
            ("TWEED_IPV6_NETWORK=fd00::/56\n", "TWEED_IPV6_SUBNET"),
            ("TWEED_IPV6_SUBNET=fd00::1/64\n", "TWEED_IPV6_NETWORK"),
            (
                "TWEED_IPV6_NETWORK=10.0.0.0/8\nTWEED_IPV6_SUBNET=fd00::1/64\n",
                "TWEED_IPV6_NETWORK",
            ),
            (
                "TWEED_IPV6_NETWORK=fd00::/56\nTWEED_IPV6_SUBNET=10.244.3.1/24\n",
                "TWEED_IPV6_SUBNET",
            ),
            (
                "TWEED_IPV6_NETWORK=fd00::/56\nTWEED_IPV6_SUBNET=fd01::1/64\n",
                "TWEED_IPV6_SUBNET",
            ),
            (
                "TWEED_IPV6_NETWORK=fd00::/56\nTWEED_IPV6_SUBNET=fd00::1/48\n",
                "TWEED_IPV6_SUBNET",
            ),
            (
                "TWEED_IPV6_NETWORK=fd00::/56\nTWEED_IPV6_SUBNET=fd00::1/999\n",
                "TWEED_IPV6_SUBNET",
            ),
        ] {
            let e = SubnetEnv::parse(Path::new("f"), &format!("{base}{extra}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{extra}: {e}");
            // The same mistakes in a flannel-written file name flannel's keys.
            let flannel = format!("{base}{extra}").replace("TWEED_", "FLANNEL_");
            let e = SubnetEnv::parse(Path::new("f"), &flannel)
                .unwrap_err()
                .to_string();
            let fkey = key.replace("TWEED_", "FLANNEL_");
            assert!(e.contains(&fkey) && !e.contains("TWEED_"), "{flannel}: {e}");
        }
    }

    #[test]
    fn render_parse_round_trip() {
        let s = sample();
        assert_eq!(
            s.render(),
            "TWEED_NETWORK=10.244.0.0/16\nTWEED_SUBNET=10.244.3.1/24\nTWEED_MTU=1450\nTWEED_IPMASQ=true\n"
        );
        assert_eq!(SubnetEnv::parse(Path::new("x"), &s.render()).unwrap(), s);
        assert_eq!(s.node_subnet().unwrap().to_string(), "10.244.3.0/24");
    }

    #[test]
    fn flannel_spelling_and_comments() {
        let text = "# written by flannel\nFLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
        assert_eq!(SubnetEnv::parse(Path::new("x"), text).unwrap(), sample());
        let with_comment = "TWEED_NETWORK=10.244.0.0/16\nTWEED_SUBNET=10.244.3.1/24 # first usable\nexport TWEED_MTU=\"1450\"\nTWEED_IPMASQ=true\n";
        assert_eq!(
            SubnetEnv::parse(Path::new("x"), with_comment).unwrap(),
            sample()
        );
    }

    #[test]
    fn errors_name_file_and_key() {
        // (file, text, the key the error must name); the file is named in every error.
        let cases = [
            ("/run/tweed/subnet.env", "TWEED_NETWORK=10.0.0.0/16\n", "TWEED_SUBNET"),
            (
                "/etc/tweed/mtu-test.env",
                "TWEED_NETWORK=10.0.0.0/16\nTWEED_SUBNET=10.0.1.1/24\nTWEED_MTU=big\n",
                "TWEED_MTU",
            ),
            (
                "/var/lib/masq-test.env",
                "TWEED_NETWORK=10.0.0.0/16\nTWEED_SUBNET=10.0.1.1/24\nTWEED_MTU=1450\nTWEED_IPMASQ=maybe\n",
                "TWEED_IPMASQ",
            ),
        ];
        for (file, text, key) in cases {
            let e = SubnetEnv::parse(Path::new(file), text)
                .unwrap_err()
                .to_string();
            assert!(e.contains(file) && e.contains(key), "{e}");
        }
    }

    fn v6_only() -> SubnetEnv {
        SubnetEnv {
            ipv4: None,
            ..dual()
        }
    }

    #[test]
    fn ipv6_only_render_parse_round_trip() {
        let s = v6_only();
        let text = s.render();
        assert_eq!(
            text,
            "TWEED_IPV6_NETWORK=fd00:10:244::/56\nTWEED_IPV6_SUBNET=fd00:10:244:3::1/64\nTWEED_MTU=1450\nTWEED_IPMASQ=true\n"
        );
        assert_eq!(SubnetEnv::parse(Path::new("x"), &text).unwrap(), s);
        assert_eq!(s.node_subnet(), None);
        // What flannel writes with EnableIPv4 false: no FLANNEL_NETWORK / FLANNEL_SUBNET.
        let flannel = "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:3::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
        assert_eq!(SubnetEnv::parse(Path::new("x"), flannel).unwrap(), s);
    }

    #[test]
    fn crafted_bad_files_name_the_key() {
        let v6 = "TWEED_IPV6_NETWORK=fd00::/56\nTWEED_IPV6_SUBNET=fd00::1/64\n";
        let mtu = "TWEED_MTU=1450\n";
        for (text, key, says) in [
            // Neither family.
            (
                mtu.to_string(),
                "TWEED_NETWORK",
                "at least one address family",
            ),
            // The v4 half only one key, beside a whole v6 pair.
            (
                format!("TWEED_NETWORK=10.0.0.0/16\n{v6}{mtu}"),
                "TWEED_SUBNET",
                "missing while TWEED_NETWORK",
            ),
            (
                format!("TWEED_SUBNET=10.0.1.1/24\n{v6}{mtu}"),
                "TWEED_NETWORK",
                "missing while TWEED_SUBNET",
            ),
            // The v4 subnet outside the v4 network, or wider than it.
            (
                format!("TWEED_NETWORK=10.0.0.0/16\nTWEED_SUBNET=10.1.0.1/24\n{mtu}"),
                "TWEED_SUBNET",
                "outside",
            ),
            (
                format!("TWEED_NETWORK=10.0.0.0/16\nTWEED_SUBNET=10.0.0.1/8\n{mtu}"),
                "TWEED_SUBNET",
                "outside",
            ),
            // The families swapped.
            (
                format!("TWEED_NETWORK=fd00::/56\nTWEED_SUBNET=fd00::1/64\n{mtu}"),
                "TWEED_NETWORK",
                "not an IPv4 CIDR",
            ),
            // Duplicate keys, even with the same value.
            (
                format!("{v6}TWEED_IPV6_SUBNET=fd00::2/64\n{mtu}"),
                "TWEED_IPV6_SUBNET",
                "set twice (lines 2 and 3)",
            ),
            (format!("{v6}{mtu}{mtu}"), "TWEED_MTU", "set twice"),
            // An IPv6-only file still needs its MTU.
            (v6.to_string(), "TWEED_MTU", "missing"),
        ] {
            let e = SubnetEnv::parse(Path::new("/run/tweed/subnet.env"), &text)
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("/run/tweed/subnet.env: ") && e.contains(key) && e.contains(says),
                "{text}: {e}"
            );
        }
        // A flannel key and its TWEED_ twin are not duplicates: TWEED_ wins.
        let both = format!("FLANNEL_MTU=1400\n{v6}{mtu}");
        assert_eq!(SubnetEnv::parse(Path::new("x"), &both).unwrap().mtu, 1450);
        // A flannel file's half pair names flannel's key.
        let e = SubnetEnv::parse(
            Path::new("x"),
            "FLANNEL_SUBNET=10.0.1.1/24\nFLANNEL_IPV6_NETWORK=fd00::/56\nFLANNEL_IPV6_SUBNET=fd00::1/64\nFLANNEL_MTU=1450\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("FLANNEL_NETWORK: missing while FLANNEL_SUBNET"),
            "{e}"
        );
    }

    #[test]
    fn write_refuses_a_lease_with_no_family() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        v6_only().write_atomic(&path).unwrap();
        let none = SubnetEnv {
            ipv6: None,
            ..v6_only()
        };
        let e = none.write_atomic(&path).unwrap_err().to_string();
        assert!(e.contains("TWEED_NETWORK") && e.contains("neither"), "{e}");
        // The previous file is kept, not replaced by one readers would refuse.
        assert_eq!(SubnetEnv::read(&path).unwrap(), v6_only());
    }

    #[test]
    fn atomic_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/subnet.env");
        sample().write_atomic(&path).unwrap();
        assert_eq!(SubnetEnv::read(&path).unwrap(), sample());
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temp file left behind: {names:?}");
        let err = SubnetEnv::read(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing"), "{err}");
    }
}
