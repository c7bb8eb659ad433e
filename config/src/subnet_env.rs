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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    pub network: Ipv4Network,
    /// The node's first usable address with the subnet's prefix, e.g. `10.244.3.1/24`.
    pub subnet: Ipv4Network,
    pub mtu: u32,
    pub ipmasq: bool,
    /// The IPv6 half of a dual-stack lease; `None` on a v4-only node.
    pub ipv6: Option<SubnetEnvV6>,
}

/// `TWEED_IPV6_NETWORK` / `TWEED_IPV6_SUBNET` (flannel: `FLANNEL_IPV6_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnvV6 {
    pub network: Ipv6Network,
    /// The node's first usable address with the subnet's prefix, e.g. `fd00:10:244:3::1/64`.
    pub subnet: Ipv6Network,
}

impl SubnetEnvV6 {
    /// The node subnet itself (network address), e.g. `fd00:10:244:3::/64`.
    pub fn node_subnet(&self) -> Ipv6Network {
        Ipv6Network::new(self.subnet.network(), self.subnet.prefix()).expect("prefix already valid")
    }
}

impl SubnetEnv {
    /// The node subnet itself (network address), e.g. `10.244.3.0/24`.
    pub fn node_subnet(&self) -> Ipv4Network {
        Ipv4Network::new(self.subnet.network(), self.subnet.prefix()).expect("prefix already valid")
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "TWEED_NETWORK={}", self.network);
        let _ = writeln!(s, "TWEED_SUBNET={}", self.subnet);
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
    /// blank lines, `export ` and quotes are tolerated because operators edit this file by hand.
    pub fn parse(path: &Path, text: &str) -> Result<Self, SubnetEnvError> {
        let field = |key: &str, reason: String| SubnetEnvError::Field {
            path: path.to_path_buf(),
            key: key.to_string(),
            reason,
        };
        let mut tweed = std::collections::HashMap::new();
        let mut flannel = std::collections::HashMap::new();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            let line = line.strip_prefix("export ").unwrap_or(line);
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let v = v.trim().trim_matches('"').trim_matches('\'').to_string();
            if let Some(k) = k.trim().strip_prefix("TWEED_") {
                tweed.insert(k.to_string(), v);
            } else if let Some(k) = k.trim().strip_prefix("FLANNEL_") {
                flannel.insert(k.to_string(), v);
            }
        }
        let get = |k: &str| -> Option<(String, &String)> {
            tweed
                .get(k)
                .map(|v| (format!("TWEED_{k}"), v))
                .or_else(|| flannel.get(k).map(|v| (format!("FLANNEL_{k}"), v)))
        };
        let need =
            |k: &str| get(k).ok_or_else(|| field(&format!("TWEED_{k}"), "missing".to_string()));
        let (nk, nv) = need("NETWORK")?;
        let network: Ipv4Network = nv
            .parse()
            .map_err(|_| field(&nk, format!("{nv:?} is not an IPv4 CIDR")))?;
        let (sk, sv) = need("SUBNET")?;
        let subnet: Ipv4Network = sv
            .parse()
            .map_err(|_| field(&sk, format!("{sv:?} is not an IPv4 CIDR")))?;
        let (mk, mv) = need("MTU")?;
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
        let v6_cidr = |k: &str| -> Result<Option<(String, Ipv6Network)>, SubnetEnvError> {
            match get(k) {
                None => Ok(None),
                Some((key, v)) => match v.parse::<Ipv6Network>() {
                    Ok(n) => Ok(Some((key, n))),
                    Err(_) => Err(field(&key, format!("{v:?} is not an IPv6 CIDR"))),
                },
            }
        };
        // The other half of a pair is named as the present half is spelled, so an error about a
        // flannel file names flannel's key.
        let sibling = |present: &str, from: &str, to: &str| present.replace(from, to);
        // Both or neither: half a dual-stack lease would give pods a v6 address with no network
        // to route it in (or the reverse).
        let ipv6 = match (v6_cidr("IPV6_NETWORK")?, v6_cidr("IPV6_SUBNET")?) {
            (None, None) => None,
            (Some((nk, network)), Some((sk, subnet))) => {
                if !network.contains(subnet.network()) || subnet.prefix() < network.prefix() {
                    return Err(field(&sk, format!("{subnet} is outside {nk} {network}")));
                }
                Some(SubnetEnvV6 { network, subnet })
            }
            (Some((nk, _)), None) => {
                return Err(field(
                    &sibling(&nk, "NETWORK", "SUBNET"),
                    format!("missing while {nk} is set"),
                ))
            }
            (None, Some((sk, _))) => {
                return Err(field(
                    &sibling(&sk, "SUBNET", "NETWORK"),
                    format!("missing while {sk} is set"),
                ))
            }
        };
        Ok(SubnetEnv {
            network,
            subnet,
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

    fn sample() -> SubnetEnv {
        SubnetEnv {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.3.1/24".parse().unwrap(),
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
        assert_eq!(s.node_subnet().to_string(), "10.244.3.0/24");
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
