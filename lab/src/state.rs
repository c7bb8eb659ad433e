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
    pub network: String,
    pub pods_per_host: usize,
    pub tweedd: PathBuf,
    pub lease_ttl: String,
    pub underlay_netns: String,
    pub etcd: Option<EtcdState>,
    pub hosts: Vec<HostState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EtcdState {
    pub pid: u32,
    pub endpoints: Vec<String>,
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
}

pub fn state_file(dir: &Path) -> PathBuf {
    dir.join("state.json")
}
