//! `state.json`: what a lab is made of, written as it is built so that `down` and `status` work
//! from another process, and after a half-finished `up`.
//!
//! Labs outlive upgrades of `tweed-lab` (an operator may have one up across an upgrade and must
//! still be able to `down` it), so every field added after the first release has a default that
//! describes what older labs did, and the typed fields keep the spelling older labs wrote:
//! `backend` as flannel spells it, `pods_via` in lowercase, `lease_ttl` as a humantime duration.

use std::fmt::Display;
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{io_err, IoError};
use crate::pods::PodsVia;
use crate::spec::{Backend, IpFamily};

/// Reading or writing `state.json`, with the file it was about.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Io(#[from] IoError),
    /// Names the field when a value is bad (e.g. `field `backend`: unknown backend "ipip"`).
    #[error("{}: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: pod {pod} has no address (neither field `ip` nor field `ip6`)", path.display())]
    NoPodAddress { path: PathBuf, pod: String },
    #[error("{}: pod {pod} has no field `ip`, which every pod of a {family} lab has", path.display())]
    NoPodIpv4 {
        path: PathBuf,
        pod: String,
        family: IpFamily,
    },
}

/// Where labs keep their state: `$TWEED_LAB_ROOT`, else `/run/tweed-lab` (tmpfs: gone on reboot,
/// like the namespaces it describes).
pub fn default_root() -> PathBuf {
    std::env::var_os("TWEED_LAB_ROOT")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/tweed-lab"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Creating,
    Ready,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub name: String,
    pub phase: Phase,
    #[serde(deserialize_with = "backend")]
    pub backend: Backend,
    /// vxlan's `DirectRouting`.
    #[serde(default)]
    pub direct_routing: bool,
    pub network: String,
    /// Underlay segments (1 or 2).
    #[serde(default = "one")]
    pub segments: usize,
    /// `v4`, `dual` or `v6` (labs older than this field were IPv4 only).
    #[serde(default, deserialize_with = "ip_family")]
    pub ip_family: IpFamily,
    pub pods_per_host: usize,
    /// How pods are attached (labs older than this field wired them directly).
    #[serde(default = "direct", deserialize_with = "pods_via")]
    pub pods_via: PodsVia,
    pub tweedd: PathBuf,
    /// The tweed CNI plugin (`cni` and `runtime` pods).
    #[serde(default)]
    pub cni_plugin: Option<PathBuf>,
    /// `CNI_PATH`: a directory holding `tweed` (a link to `cni_plugin`).
    #[serde(default)]
    pub cni_path: Option<PathBuf>,
    /// `runtime` pods: tweedctl and its per-lab state.
    #[serde(default)]
    pub runtime: Option<RuntimeState>,
    /// The agents' `--lease-ttl`, written like `5m`.
    #[serde(serialize_with = "humantime_duration", deserialize_with = "lease_ttl")]
    pub lease_ttl: Duration,
    pub underlay_netns: String,
    /// The namespace outside the overlay (198.18.0.250).
    #[serde(default)]
    pub outside_netns: Option<String>,
    pub etcd: Option<EtcdState>,
    pub hosts: Vec<HostState>,
}

fn one() -> usize {
    1
}

fn direct() -> PodsVia {
    PodsVia::Direct
}

/// A string field parsed by `parse`; errors name the field, since serde_json's own messages only
/// give a line and column.
fn parsed<'de, D, T, E>(
    field: &'static str,
    d: D,
    parse: impl FnOnce(&str) -> Result<T, E>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    E: Display,
{
    let s =
        String::deserialize(d).map_err(|e| D::Error::custom(format!("field `{field}`: {e}")))?;
    parse(&s).map_err(|e| D::Error::custom(format!("field `{field}`: {e}")))
}

fn backend<'de, D: Deserializer<'de>>(d: D) -> Result<Backend, D::Error> {
    parsed("backend", d, str::parse)
}

fn ip_family<'de, D: Deserializer<'de>>(d: D) -> Result<IpFamily, D::Error> {
    parsed("ip_family", d, str::parse)
}

fn pods_via<'de, D: Deserializer<'de>>(d: D) -> Result<PodsVia, D::Error> {
    parsed("pods_via", d, str::parse)
}

fn lease_ttl<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    parsed("lease_ttl", d, humantime::parse_duration)
}

fn humantime_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

/// What `tweedctl` needs to find the lab's containers again: `tweedctl --root ROOT --image-root
/// IMAGE_ROOT ...`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuntimeState {
    pub tweedctl: PathBuf,
    pub root: PathBuf,
    pub image_root: PathBuf,
    pub image: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EtcdState {
    /// The first member's pid (kept for older readers; see `members`).
    pub pid: u32,
    /// Every member's client URL.
    pub endpoints: Vec<String>,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// One per member (a single etcd is a one-member cluster).
    #[serde(default)]
    pub members: Vec<EtcdMemberState>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EtcdMemberState {
    /// etcd's `--name`, e.g. `etcd2`.
    pub name: String,
    pub pid: u32,
    pub endpoint: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostState {
    pub name: String,
    pub netns: String,
    pub public_ip: Ipv4Addr,
    /// The host's IPv6 underlay address (dual-stack labs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_ip6: Option<Ipv6Addr>,
    pub agent_pid: Option<u32>,
    pub log: PathBuf,
    pub subnet_file: PathBuf,
    pub agent_state_dir: PathBuf,
    /// Underlay segment: 0 (A, 198.18.0.0/24) or 1 (B, 198.18.1.0/24).
    #[serde(default)]
    pub segment: usize,
    /// The agent's gRPC socket; `None` when the lab's `agent_args` chose their own.
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// The agent's metrics URL; `None` when the lab's `agent_args` chose their own address.
    #[serde(default)]
    pub metrics: Option<String>,
    /// The host's CNI network configuration list (`net.d/10-tweed.conflist`).
    #[serde(default)]
    pub cni_conf: Option<PathBuf>,
    /// TWEED_SUBNET as read during `up` (status re-reads the file).
    pub subnet: Option<String>,
    pub mtu: Option<u32>,
    pub pods: Vec<PodState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodState {
    pub name: String,
    pub netns: String,
    /// Plain IPv4 address, e.g. 10.244.3.2; `None` in an IPv6-only lab (no `ip` key then, so
    /// the IPv4 and dual-stack labs' files stay as older tweed-labs wrote and read them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    /// The pod's global IPv6 address (dual-stack and IPv6-only labs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<Ipv6Addr>,
    /// `runtime` pods: the tweedctl container's id.
    #[serde(default)]
    pub container_id: Option<String>,
}

impl PodState {
    /// Every address of the pod, IPv4 first.
    pub fn ips(&self) -> Vec<IpAddr> {
        let v4 = self.ip.map(IpAddr::V4);
        let v6 = self.ip6.map(IpAddr::V6);
        [v4, v6].into_iter().flatten().collect()
    }
}

pub fn state_file(dir: &Path) -> PathBuf {
    dir.join("state.json")
}

impl LabState {
    /// The state of the lab in `dir`; `Ok(None)` when it has no state.json.
    pub fn read(dir: &Path) -> Result<Option<LabState>, StateError> {
        let path = state_file(dir);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("cannot read", &path)(e).into()),
        };
        Self::parse(&path, &text).map(Some)
    }

    /// Parses the text of `path`.
    pub fn parse(path: &Path, text: &str) -> Result<LabState, StateError> {
        let state: LabState = serde_json::from_str(text).map_err(|source| StateError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        // Both address keys are optional now (an IPv6-only pod has no `ip`); a pod without
        // either is a damaged file, not a pod `check` should silently skip.
        for h in &state.hosts {
            if let Some(p) = h.pods.iter().find(|p| p.ips().is_empty()) {
                return Err(StateError::NoPodAddress {
                    path: path.to_path_buf(),
                    pod: format!("{}/{}", h.name, p.name),
                });
            }
            // Every node of a v4 or dual network has IPv4 (a dual node may lack IPv6), so
            // a pod there without `ip` is damage, and `check` would skip its pings unseen.
            if state.ip_family != IpFamily::V6 {
                if let Some(p) = h.pods.iter().find(|p| p.ip.is_none()) {
                    return Err(StateError::NoPodIpv4 {
                        path: path.to_path_buf(),
                        pod: format!("{}/{}", h.name, p.name),
                        family: state.ip_family,
                    });
                }
            }
        }
        Ok(state)
    }

    /// The hosts' underlay addresses, in host order.
    pub fn public_ips(&self) -> Vec<String> {
        self.hosts.iter().map(|h| h.public_ip.to_string()).collect()
    }

    /// Replaces `dir`'s state.json atomically, so a reader never sees half of it.
    pub fn write(&self, dir: &Path) -> Result<(), StateError> {
        let path = state_file(dir);
        let tmp = dir.join(".state.json.tmp");
        let text = serde_json::to_string_pretty(self).map_err(|source| StateError::Json {
            path: path.clone(),
            source,
        })?;
        fs::write(&tmp, text + "\n").map_err(io_err("cannot write", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("cannot write", &path))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state.json as the first tweed-lab wrote it: no pods_via, segments, CNI, runtime,
    /// outside namespace, etcd members, API socket or metrics.
    const FIRST_RELEASE: &str = r#"{
  "name": "old",
  "phase": "ready",
  "backend": "host-gw",
  "network": "10.244.0.0/16",
  "pods_per_host": 1,
  "tweedd": "/usr/bin/tweedd",
  "lease_ttl": "1m 30s",
  "underlay_netns": "twl-old-u",
  "etcd": {
    "pid": 4000,
    "endpoints": ["http://198.18.0.254:2379"],
    "data_dir": "/run/tweed-lab/old/etcd",
    "log": "/run/tweed-lab/old/etcd.log"
  },
  "hosts": [{
    "name": "h1",
    "netns": "twl-old-h1",
    "public_ip": "198.18.0.1",
    "agent_pid": 4001,
    "log": "/run/tweed-lab/old/hosts/h1/tweedd.log",
    "subnet_file": "/run/tweed-lab/old/hosts/h1/subnet.env",
    "agent_state_dir": "/run/tweed-lab/old/hosts/h1/lib",
    "subnet": "10.244.5.1/24",
    "mtu": 1500,
    "pods": [{"name": "p1", "netns": "twl-old-h1-p1", "ip": "10.244.5.2"}]
  }]
}"#;

    #[test]
    fn a_first_release_state_reads_with_the_defaults_of_its_time() {
        let s = LabState::parse(Path::new("state.json"), FIRST_RELEASE).unwrap();
        assert_eq!(s.backend, Backend::HostGw);
        assert_eq!(s.lease_ttl, Duration::from_secs(90));
        assert_eq!(s.pods_via, PodsVia::Direct);
        assert_eq!(s.segments, 1);
        assert_eq!(s.ip_family, IpFamily::V4);
        assert_eq!(
            (s.hosts[0].public_ip6, s.hosts[0].pods[0].ip6),
            (None, None)
        );
        assert!(!s.direct_routing);
        assert!(s.cni_plugin.is_none() && s.runtime.is_none() && s.outside_netns.is_none());
        assert!(s.etcd.as_ref().unwrap().members.is_empty());
        let h = &s.hosts[0];
        assert_eq!(
            (h.segment, h.api_socket.as_ref(), h.metrics.as_ref()),
            (0, None, None)
        );
        assert_eq!(h.pods[0].container_id, None);
    }

    #[test]
    fn public_ips_are_the_hosts_addresses_in_order() {
        let mut s = LabState::parse(Path::new("state.json"), FIRST_RELEASE).unwrap();
        let mut h2 = s.hosts[0].clone();
        h2.public_ip = "198.18.1.2".parse().unwrap();
        s.hosts.push(h2);
        assert_eq!(s.public_ips(), ["198.18.0.1", "198.18.1.2"]);
    }

    #[test]
    fn typed_fields_are_written_as_older_labs_wrote_them() {
        let mut s = LabState::parse(Path::new("state.json"), FIRST_RELEASE).unwrap();
        s.pods_via = PodsVia::Runtime;
        s.lease_ttl = Duration::from_secs(300);
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["backend"], "host-gw");
        assert_eq!(v["pods_via"], "runtime");
        assert_eq!(v["lease_ttl"], "5m");
        let back = LabState::parse(Path::new("state.json"), &v.to_string()).unwrap();
        assert_eq!(
            (back.backend, back.pods_via, back.lease_ttl),
            (s.backend, s.pods_via, s.lease_ttl)
        );
        // An IPv4 lab writes no IPv6 keys (older tweed-labs read it as they always did); a
        // dual-stack one writes them and reads them back.
        assert!(v["hosts"][0].get("public_ip6").is_none());
        assert!(v["hosts"][0]["pods"][0].get("ip6").is_none());
        s.ip_family = IpFamily::Dual;
        s.hosts[0].public_ip6 = Some("fd00:198:18::1".parse().unwrap());
        s.hosts[0].pods[0].ip6 = Some("fd00:10:244:3::2".parse().unwrap());
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["ip_family"], "dual");
        assert_eq!(v["hosts"][0]["public_ip6"], "fd00:198:18::1");
        let back = LabState::parse(Path::new("state.json"), &v.to_string()).unwrap();
        assert_eq!(back.ip_family, IpFamily::Dual);
        assert_eq!(back.hosts[0].pods[0].ip6, s.hosts[0].pods[0].ip6);
        assert_eq!(v["hosts"][0]["pods"][0]["ip"], "10.244.5.2");
    }

    #[test]
    fn an_ipv6_only_pod_has_no_ip_key_and_reads_back() {
        let mut s = LabState::parse(Path::new("state.json"), FIRST_RELEASE).unwrap();
        assert_eq!(
            s.hosts[0].pods[0].ips(),
            ["10.244.5.2".parse::<IpAddr>().unwrap()]
        );
        s.ip_family = IpFamily::V6;
        let pod = &mut s.hosts[0].pods[0];
        pod.ip = None;
        pod.ip6 = Some("fd00:10:244:5::2".parse().unwrap());
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["ip_family"], "v6");
        let p = &v["hosts"][0]["pods"][0];
        assert!(p.get("ip").is_none(), "{p}");
        assert_eq!(p["ip6"], "fd00:10:244:5::2");
        let back = LabState::parse(Path::new("state.json"), &v.to_string()).unwrap();
        assert_eq!(back.ip_family, IpFamily::V6);
        let pod = &back.hosts[0].pods[0];
        assert_eq!((pod.ip, pod.ip6), (None, s.hosts[0].pods[0].ip6));
        assert_eq!(pod.ips(), ["fd00:10:244:5::2".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn a_pod_without_any_address_names_the_file_and_the_pod() {
        let text = FIRST_RELEASE.replace(r#", "ip": "10.244.5.2""#, "");
        assert_ne!(text, FIRST_RELEASE);
        let e = LabState::parse(Path::new("/run/tweed-lab/old/state.json"), &text)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "/run/tweed-lab/old/state.json: pod h1/p1 has no address (neither field `ip` nor \
             field `ip6`)"
        );
        // In a v4 or dual lab a pod's IPv4 address is required even beside an IPv6 one.
        let text = FIRST_RELEASE.replace(r#""ip": "10.244.5.2""#, r#""ip6": "fd00:10:244:5::2""#);
        let e = LabState::parse(Path::new("state.json"), &text)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "state.json: pod h1/p1 has no field `ip`, which every pod of a v4 lab has"
        );
        // A malformed address still names its field.
        let text = FIRST_RELEASE.replace(r#""ip": "10.244.5.2""#, r#""ip": "fd00::2""#);
        let e = LabState::parse(Path::new("state.json"), &text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid IPv4 address syntax"), "{e}");
    }

    #[test]
    fn a_bad_value_names_the_file_and_the_field() {
        let path = Path::new("/run/tweed-lab/old/state.json");
        for (field, from, to) in [
            ("backend", r#""backend": "host-gw""#, r#""backend": "ipip""#),
            (
                "lease_ttl",
                r#""lease_ttl": "1m 30s""#,
                r#""lease_ttl": "soon""#,
            ),
            (
                "lease_ttl",
                r#""lease_ttl": "1m 30s""#,
                r#""lease_ttl": 90"#,
            ),
            (
                "pods_via",
                r#""pods_per_host": 1,"#,
                r#""pods_per_host": 1, "pods_via": "cri","#,
            ),
            (
                "ip_family",
                r#""pods_per_host": 1,"#,
                r#""pods_per_host": 1, "ip_family": "v5","#,
            ),
        ] {
            let text = FIRST_RELEASE.replace(from, to);
            assert_ne!(text, FIRST_RELEASE);
            let e = LabState::parse(path, &text).unwrap_err().to_string();
            assert!(e.starts_with("/run/tweed-lab/old/state.json: "), "{e}");
            assert!(e.contains(&format!("field `{field}`")), "{e}");
        }
        let e = LabState::parse(path, &FIRST_RELEASE.replace(r#""backend": "host-gw","#, ""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `backend`"), "{e}");
    }

    #[test]
    fn write_then_read_in_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(LabState::read(dir.path()).unwrap().is_none());
        let s = LabState::parse(Path::new("x"), FIRST_RELEASE).unwrap();
        s.write(dir.path()).unwrap();
        let back = LabState::read(dir.path()).unwrap().unwrap();
        assert_eq!(back.name, "old");
        assert!(!dir.path().join(".state.json.tmp").exists());
        fs::write(state_file(dir.path()), "{").unwrap();
        let e = LabState::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("state.json"), "{e}");
    }
}
