//! The one place that talks netlink.
//!
//! Callers describe kernel changes as [`Op`] values and read kernel state as plain types
//! ([`Link`], [`Addr`], [`Neighbour`], [`FdbEntry`], [`Route`]). [`Netlink`] has two
//! implementations behind one enum: [`Real`], a batched NETLINK_ROUTE socket in the current network
//! namespace, and `Fake`, an in-memory kernel for tests that cannot be root (compiled for tests
//! only: `cfg(test)` here, the `fake` feature from other crates' dev-dependencies, so no release
//! binary carries it). Enum dispatch rather than a trait keeps the futures `Send` without boxing and lets the backends take `&Netlink`.

mod error;
pub mod events;
#[cfg(any(test, feature = "fake"))]
mod fake;
pub mod iface;
pub mod model;
pub mod netns;
mod op;
mod real;
mod types;

pub use error::NetlinkError;
pub use events::{Change, Event, Events};
#[cfg(any(test, feature = "fake"))]
pub use fake::Fake;
pub use iface::{pick_iface, select_iface, Iface, IfaceError, IfaceSpec};
pub use netns::{Netns, NetnsError};
pub use op::Op;
pub use real::Real;
pub use types::{
    Addr, Addr6, BridgeSpec, FdbEntry, FdbEntry6, Link, MacAddr, Neighbour, Neighbour6,
    ParseMacError, Route, Route6, VethSpec, VxlanAttrs, VxlanSpec,
};

/// A handle on the kernel's routing tables; cheap to clone (clones share the socket or the fake).
#[derive(Clone, Debug)]
pub enum Netlink {
    Real(Real),
    #[cfg(any(test, feature = "fake"))]
    Fake(Fake),
}

impl From<Real> for Netlink {
    fn from(r: Real) -> Netlink {
        Netlink::Real(r)
    }
}

#[cfg(any(test, feature = "fake"))]
impl From<Fake> for Netlink {
    fn from(f: Fake) -> Netlink {
        Netlink::Fake(f)
    }
}

/// A read of kernel state: from the real socket (async, fallible) or from the fake's in-memory
/// kernel (immediate, infallible), by the method of the same name on either.
macro_rules! query {
    ($self:ident, $method:ident($($arg:expr),*)) => {
        match $self {
            Netlink::Real(r) => r.$method($($arg),*).await,
            #[cfg(any(test, feature = "fake"))]
            Netlink::Fake(f) => Ok(f.$method($($arg),*)),
        }
    };
}

impl Netlink {
    /// A real socket in the calling thread's network namespace. Must be called inside a tokio
    /// runtime, which then drives the socket; enter the namespace before calling.
    pub fn real() -> Result<Netlink, NetlinkError> {
        Real::connect().map(Netlink::Real)
    }

    /// A real socket opened inside `netns` (see [`Netns::run`]: a short-lived thread enters the
    /// namespace, opens the socket and ends; no caller thread changes namespace). Driven by the
    /// current tokio runtime like [`Netlink::real`]; every op and query through it acts in
    /// `netns`.
    pub fn real_in(netns: &Netns) -> Result<Netlink, NetlinkError> {
        Real::connect_in(netns).map(Netlink::Real)
    }

    /// Subscribes to the kernel's link, address, route and neighbour notifications: for a real
    /// handle in the calling thread's network namespace (the one [`Netlink::real`] uses), for a
    /// fake from its in-memory kernel, which announces every op it applies.
    pub fn events(&self) -> Result<Events, NetlinkError> {
        match self {
            Netlink::Real(_) => Events::real(),
            #[cfg(any(test, feature = "fake"))]
            Netlink::Fake(f) => Ok(f.subscribe()),
        }
    }

    pub async fn link_by_name(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        query!(self, link_by_name(name))
    }

    pub async fn link_by_index(&self, index: u32) -> Result<Option<Link>, NetlinkError> {
        query!(self, link_by_index(index))
    }

    pub async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        query!(self, links())
    }

    /// IPv4 addresses of one link, or of all links with `None`, in kernel order (primary first).
    pub async fn addresses(&self, ifindex: Option<u32>) -> Result<Vec<Addr>, NetlinkError> {
        query!(self, addresses(ifindex))
    }

    /// IPv6 addresses of one link, or of all links with `None` (link-local ones included).
    pub async fn addresses6(&self, ifindex: Option<u32>) -> Result<Vec<Addr6>, NetlinkError> {
        query!(self, addresses6(ifindex))
    }

    /// IPv4 neighbours (ARP entries) of a link, whatever their state.
    pub async fn neighbours(&self, ifindex: u32) -> Result<Vec<Neighbour>, NetlinkError> {
        query!(self, neighbours(ifindex))
    }

    /// Bridge-family FDB entries the link itself holds (`bridge fdb show dev X`).
    pub async fn fdb(&self, ifindex: u32) -> Result<Vec<FdbEntry>, NetlinkError> {
        query!(self, fdb(ifindex))
    }

    /// IPv4 unicast routes of the main table whose output device is `oif`.
    pub async fn routes(&self, oif: u32) -> Result<Vec<Route>, NetlinkError> {
        let all = self.all_routes().await?;
        Ok(all.into_iter().filter(|r| r.oif == Some(oif)).collect())
    }

    /// IPv4 unicast routes of the main table.
    pub async fn all_routes(&self) -> Result<Vec<Route>, NetlinkError> {
        query!(self, routes())
    }

    /// IPv6 neighbours (NDP entries) of a link, whatever their state.
    pub async fn neighbours6(&self, ifindex: u32) -> Result<Vec<Neighbour6>, NetlinkError> {
        query!(self, neighbours6(ifindex))
    }

    /// Bridge-family FDB entries of a link whose remote is an IPv6 VTEP.
    pub async fn fdb6(&self, ifindex: u32) -> Result<Vec<FdbEntry6>, NetlinkError> {
        query!(self, fdb6(ifindex))
    }

    /// All IPv6 unicast routes of the main table (the kernel's own included).
    pub async fn all_routes6(&self) -> Result<Vec<Route6>, NetlinkError> {
        query!(self, routes6())
    }

    /// The device of the IPv4 default route the kernel would use (lowest metric), if any.
    pub async fn default_route_oif(&self) -> Result<Option<u32>, NetlinkError> {
        let routes = self.all_routes().await?;
        Ok(routes
            .iter()
            .filter(|r| r.is_default() && r.oif.is_some())
            .min_by_key(|r| r.metric)
            .and_then(|r| r.oif))
    }

    pub async fn mtu(&self, ifindex: u32) -> Result<u32, NetlinkError> {
        self.link_by_index(ifindex)
            .await?
            .map(|l| l.mtu)
            .ok_or(NetlinkError::NoSuchLink { ifindex })
    }

    pub async fn apply(&self, op: &Op) -> Result<(), NetlinkError> {
        self.apply_all(std::slice::from_ref(op))
            .await
            .pop()
            .unwrap_or(Ok(()))
    }

    /// Applies `ops` in order, as if one by one, but batched. One result per op, same order; a
    /// failed op does not stop the ones after it, so callers decide what a failure means.
    pub async fn apply_all(&self, ops: &[Op]) -> Vec<Result<(), NetlinkError>> {
        match self {
            Netlink::Real(r) => r.apply_all(ops).await,
            #[cfg(any(test, feature = "fake"))]
            Netlink::Fake(f) => ops.iter().map(|op| f.apply(op)).collect(),
        }
    }
}
