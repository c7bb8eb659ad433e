//! The host as it is: this machine's files, namespaces, netlink, iptables and sysctls, from the
//! namespace the plugin runs in.

use std::future::Future;
use std::net::Ipv4Addr;
use std::path::Path;

use ipnetwork::Ipv4Network;
use tweed_config::SubnetEnv;
use tweed_netlink::{Netlink, NetlinkError, Netns, NetnsError};

use super::{Host, HostError};
use crate::detach::{self, DetachError, Target};
use crate::ipam::{FsDir, IpamError};
use crate::masq::{self, MasqError};
use crate::node::{self, NodeError};

/// The node the plugin runs on.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealHost;

impl Host for RealHost {
    type Netns = Netns;
    type Store = FsDir;

    fn read_subnet_env(&self, configured: Option<&Path>) -> Result<SubnetEnv, NodeError> {
        let path = node::subnet_file(configured, Path::exists);
        SubnetEnv::read(&path).map_err(|e| node::subnet_env_error(&path, e))
    }

    fn lock_store(&self, path: &Path) -> Result<FsDir, IpamError> {
        FsDir::lock(path)
    }

    fn open_netns(&self, path: &str) -> Result<Netns, NetnsError> {
        Netns::open(path)
    }

    fn is_own_netns(&self, ns: &Netns) -> Result<bool, NetnsError> {
        Ok(Netns::current()?.same_as(ns))
    }

    fn netns_fd(&self, ns: &Netns) -> i32 {
        ns.raw_fd()
    }

    fn block_on<F: Future>(&self, f: F) -> Result<F::Output, HostError> {
        // Current-thread and dropped on return: DEL forks after its lookups, and must then be
        // the only thread (see `detach`).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(HostError::Runtime)?;
        Ok(rt.block_on(f))
    }

    fn netlink(&self, ns: Option<&Netns>) -> Result<Netlink, NetlinkError> {
        match ns {
            None => Netlink::real(),
            Some(ns) => Netlink::real_in(ns),
        }
    }

    fn masq_add(&self, ip: Ipv4Addr, network: Ipv4Network, comment: &str) -> Result<(), MasqError> {
        masq::add(ip, network, comment)
    }

    fn masq_del(&self, ip: Ipv4Addr, network: Ipv4Network, comment: &str) -> Result<(), MasqError> {
        masq::del(ip, network, comment)
    }

    /// The node forwards between the bridge and the overlay; flannel's bridge (isGateway) turns
    /// this on too. Only written when off.
    fn enable_forwarding(&self) {
        const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
        if std::fs::read(PATH).is_ok_and(|v| v.first() == Some(&b'0')) {
            let _ = std::fs::write(PATH, b"1");
        }
    }

    fn delete_links(&self, targets: &[Target<'_>], detached: bool) -> Result<(), DetachError> {
        detach::delete(targets, detached)
    }
}
