//! `state.json`: what a lab is made of, written as it is built so that `down` and `status` work
//! from another process, and after a half-finished `up`.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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
    pub backend: String,
    /// vxlan's `DirectRouting`.
    #[serde(default)]
    pub direct_routing: bool,
    pub network: String,
    /// Underlay segments (1 or 2).
    #[serde(default = "one")]
    pub segments: usize,
    pub pods_per_host: usize,
    /// How pods are attached: `cni`, `runtime` or `direct` (labs older than this field: direct).
    #[serde(default = "direct")]
    pub pods_via: String,
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
    pub lease_ttl: String,
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

fn direct() -> String {
    "direct".into()
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
    pub agent_pid: Option<u32>,
    pub log: PathBuf,
    pub subnet_file: PathBuf,
    pub agent_state_dir: PathBuf,
    /// Underlay segment: 0 (A, 198.18.0.0/24) or 1 (B, 198.18.1.0/24).
    #[serde(default)]
    pub segment: usize,
    /// The agent's gRPC socket, when this tweedd takes `--api-socket`.
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// The agent's metrics URL, when this tweedd takes `--metrics-addr`.
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
    /// Plain address, e.g. 10.244.3.2.
    pub ip: Ipv4Addr,
    /// `runtime` pods: the tweedctl container's id.
    #[serde(default)]
    pub container_id: Option<String>,
}

pub fn state_file(dir: &Path) -> PathBuf {
    dir.join("state.json")
}
