//! The side effects of a verb behind one seam: subnet.env and the IPAM store on disk, network
//! namespaces and netlink in them, iptables, the forwarding switch and DEL's link delete.
//! [`RealHost`] does them on this machine; the command layer's unit tests run the same verbs on
//! a fake one (an in-memory kernel per namespace, store and rule set).
//!
//! Netlink itself is `tweed-netlink`'s seam ([`Netlink`] is real or fake); this trait only
//! says where a handle comes from, so the verbs build their op lists and read links the same
//! way for both.

#[cfg(test)]
pub(crate) mod fake;
pub(crate) mod real;

use std::future::Future;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnetwork::Ipv4Network;
use tweed_config::SubnetEnv;
use tweed_netlink::{Link, Netlink, NetlinkError, NetnsError, Op};

use crate::code;
use crate::detach::{DetachError, Target};
use crate::ipam::{Dir, IpamError};
use crate::masq::MasqError;
use crate::node::NodeError;

pub use real::RealHost;

pub trait Host {
    /// An open network namespace.
    type Netns;
    /// The IPAM store of one network, locked for as long as the value lives.
    type Store: Dir;

    /// subnet.env: `configured` (the `subnetFile` setting) or the default place.
    fn read_subnet_env(&self, configured: Option<&Path>) -> Result<SubnetEnv, NodeError>;
    /// Creates the store at `path` if needed and takes its lock, waiting for other holders.
    fn lock_store(&self, path: &Path) -> Result<Self::Store, IpamError>;
    fn open_netns(&self, path: &str) -> Result<Self::Netns, NetnsError>;
    /// Whether `ns` is the namespace the plugin runs in (the host's).
    fn is_own_netns(&self, ns: &Self::Netns) -> Result<bool, NetnsError>;
    /// How a veth's `peer_netns` names `ns`.
    fn netns_fd(&self, ns: &Self::Netns) -> i32;
    /// Runs netlink work to completion. Real handles are driven by a runtime that lives for
    /// this call only, so they must be opened inside `f` and not outlive it.
    fn block_on<F: Future>(&self, f: F) -> Result<F::Output, HostError>;
    /// A netlink handle in `ns`, or in the plugin's own namespace with `None`.
    fn netlink(&self, ns: Option<&Self::Netns>) -> Result<Netlink, NetlinkError>;
    /// Adds the `ipMasq` rule of one container address unless it is there.
    fn masq_add(&self, ip: Ipv4Addr, network: Ipv4Network, comment: &str) -> Result<(), MasqError>;
    /// Removes the rules of `ip` marked `comment`, whatever network they name; none is fine.
    fn masq_del(&self, ip: Ipv4Addr, comment: &str) -> Result<(), MasqError>;
    /// Turns IPv4 forwarding on in the plugin's namespace if it is off; best effort.
    fn enable_forwarding(&self);
    /// Deletes devices by index and returns once they are unlisted (see `detach`).
    fn delete_links(
        &self,
        targets: &[Target<'_, Self::Netns>],
        detached: bool,
    ) -> Result<(), DetachError>;
}

/// The kernel refused, or could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("container network namespace {}: {reason}", path.display())]
    Netns { path: PathBuf, reason: String },
    #[error("{what}: {reason}")]
    Kernel { what: String, reason: String },
    #[error("starting the netlink driver: {0}")]
    Runtime(#[source] std::io::Error),
}

impl HostError {
    pub fn code(&self) -> u32 {
        match self {
            HostError::Netns { .. } => code::UNKNOWN_CONTAINER,
            HostError::Kernel { .. } | HostError::Runtime(_) => code::NETLINK,
        }
    }
}

impl From<NetnsError> for HostError {
    fn from(e: NetnsError) -> HostError {
        let (path, reason) = match &e {
            NetnsError::Open { path, source } => (path.clone(), source.to_string()),
            NetnsError::NotNetns { path, detail } => {
                (path.clone(), format!("not a network namespace ({detail})"))
            }
            NetnsError::Enter { path, source } | NetnsError::Thread { path, source } => {
                (path.clone(), source.to_string())
            }
            NetnsError::Panicked { path } => (path.clone(), e.to_string()),
        };
        HostError::Netns { path, reason }
    }
}

/// How errors name the plugin's own namespace.
pub const HOST_PLACE: &str = "the host namespace";

/// How errors name a container's namespace.
pub fn container_place(netns_path: &str) -> String {
    format!("container netns {netns_path}")
}

/// Netlink in one namespace, with the words that name it, so that every failure says where.
pub struct Kernel {
    pub nl: Netlink,
    pub place: String,
}

impl Kernel {
    /// Netlink in `ns`, or in the plugin's own namespace ([`HOST_PLACE`]) with `None`.
    pub fn open<H: Host>(
        host: &H,
        ns: Option<&H::Netns>,
        place: &str,
    ) -> Result<Kernel, HostError> {
        let nl = host.netlink(ns).map_err(|e| HostError::Kernel {
            what: format!("opening netlink in {place}"),
            reason: e.to_string(),
        })?;
        Ok(Kernel {
            nl,
            place: place.to_string(),
        })
    }

    /// Maps a failed query to an error saying `what` was being done, and where.
    pub fn fail(&self, what: &str) -> impl FnOnce(NetlinkError) -> HostError {
        let what = format!("{what} in {}", self.place);
        move |e| HostError::Kernel {
            what,
            reason: e.to_string(),
        }
    }

    pub async fn link(&self, name: &str) -> Result<Option<Link>, HostError> {
        let fail = self.fail(&format!("looking up {name}"));
        self.nl.link_by_name(name).await.map_err(fail)
    }

    /// Applies `ops` in one batch; the first failure becomes the error. Returns the per-op
    /// results too, so a caller knows what did happen.
    pub async fn apply(&self, ops: &[Op]) -> (Vec<bool>, Result<(), HostError>) {
        let results = self.nl.apply_all(ops).await;
        let done = results.iter().map(Result::is_ok).collect();
        let first = ops
            .iter()
            .zip(results)
            .find_map(|(op, r)| r.err().map(|e| (op, e)));
        let res = match first {
            None => Ok(()),
            Some((op, e)) => Err(HostError::Kernel {
                what: format!("{op} in {}", self.place),
                reason: match e {
                    NetlinkError::Op { source, .. } => explain(op, &source),
                    other => other.to_string(),
                },
            }),
        };
        (done, res)
    }
}

/// The kernel's errno, plus what it usually means for that op.
fn explain(op: &Op, e: &std::io::Error) -> String {
    match (op, e.raw_os_error()) {
        (Op::LinkAddVeth(v), Some(libc::EEXIST)) => format!(
            "{e}: {} already exists in the container's namespace, or {} on the host (was this \
             attachment added twice without DEL?)",
            v.peer, v.name
        ),
        _ => e.to_string(),
    }
}
