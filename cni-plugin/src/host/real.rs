//! The host as it is: this machine's files, namespaces, netlink, iptables and sysctls, from the
//! namespace the plugin runs in.

use std::fs::File;
use std::future::Future;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
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
            Some(ns) => run_here(ns, Netlink::real).map_err(NetlinkError::Connect)?,
        }
    }

    fn masq_add(&self, ip: Ipv4Addr, network: Ipv4Network, comment: &str) -> Result<(), MasqError> {
        masq::add(ip, network, comment)
    }

    fn masq_del(&self, ip: Ipv4Addr, comment: &str) -> Result<(), MasqError> {
        masq::del(ip, comment)
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

/// Runs `f` on the calling thread inside `ns`, then moves the thread back to the namespace it
/// was in. A netlink socket belongs to the namespace it was created in, so opening one is all
/// that needs to happen there. [`Netns::run`] does it on a fresh thread instead, which costs
/// a thread start and, on a busy node, a wait for a CPU for that thread, per socket: on the
/// path of every ADD and DEL. The plugin may switch its own thread: nothing else runs on it
/// meanwhile (`f` only opens sockets, and a current-thread runtime polls nothing during it).
pub(crate) fn run_here<T>(ns: &Netns, f: impl FnOnce() -> T) -> io::Result<T> {
    let home = File::open("/proc/thread-self/ns/net")?;
    tweed_netlink::netns::enter(ns.as_fd())?;
    let out = f();
    // Staying in the container's namespace would make every later host step act on the wrong
    // namespace; back into one the thread was just in, with the same privileges, cannot fail
    // short of a kernel bug.
    tweed_netlink::netns::enter(home.as_fd())
        .expect("setns back into the plugin's own network namespace");
    Ok(out)
}
