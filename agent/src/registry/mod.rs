//! Where leases live. [`Registry`] is enum-dispatched over the real etcd store and an in-memory one
//! with the same semantics (revisions, create-if-absent, TTL leases, watches, compaction), so the
//! subnet manager is tested without etcd and the etcd impl is tested against a real etcd.

mod etcd;
#[cfg(any(test, feature = "fake"))]
mod mem;

pub use etcd::{EtcdOptions, EtcdRegistry};
#[cfg(any(test, feature = "fake"))]
pub use mem::{MemOp, MemRegistry};

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;
use tweed_config::{LeaseAttrs, SubnetKey};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// `detail` is the whole error chain (etcd-client's own Display stops at "transport error").
    #[error("etcd {op} {key}: {detail}")]
    Etcd {
        op: &'static str,
        key: String,
        detail: String,
        #[source]
        source: Box<etcd_client::Error>,
    },
    #[error(
        "etcd {op} {key}: TLS with {endpoints} failed: {detail} (check --etcd-cafile: it must be \
         the CA that signed etcd's server certificate, whose SANs must name the endpoint's host or \
         IP; an etcd with --client-cert-auth also needs --etcd-certfile and --etcd-keyfile)"
    )]
    Tls {
        op: &'static str,
        key: String,
        endpoints: String,
        detail: String,
        #[source]
        source: Box<etcd_client::Error>,
    },
    #[error("etcd authentication as user {user:?} at {endpoints} failed: {detail} (check --etcd-username and --etcd-password/--etcd-password-file)")]
    Auth {
        user: String,
        endpoints: String,
        detail: String,
        #[source]
        source: Box<etcd_client::Error>,
    },
    #[error("{flag} {path}: {source}")]
    TlsFile {
        /// The flag that named the file, e.g. `--etcd-certfile`.
        flag: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd options: {0}")]
    Options(String),
    #[error("watch from revision {requested} is compacted (oldest kept: {compacted})")]
    Compacted { requested: i64, compacted: i64 },
    #[error("watch on {prefix} ended: {reason}")]
    WatchEnded { prefix: String, reason: String },
    #[error("etcd {op} {key}: the key kept changing under us; try again")]
    Raced { op: &'static str, key: String },
}

/// A lease key of either form (flannel's, tweed's IPv6-only one): what the writes need of it.
/// `Sync` so a borrowed key can be held across an await in a `Send` future.
pub trait KeyName: Sync {
    /// The full etcd key under `prefix`.
    fn etcd_key(&self, prefix: &str) -> String;
}

impl KeyName for SubnetKey {
    fn etcd_key(&self, prefix: &str) -> String {
        SubnetKey::etcd_key(self, prefix)
    }
}

impl KeyName for tweed_config::LeaseKey {
    fn etcd_key(&self, prefix: &str) -> String {
        tweed_config::LeaseKey::etcd_key(self, prefix)
    }
}

/// A key/value under `<prefix>/subnets/`, unparsed: parsing (and skipping what is corrupt) is the
/// lease table's job, so one bad value never fails a whole listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawLease {
    pub key: String,
    pub value: Vec<u8>,
    pub lease_id: i64,
    pub mod_revision: i64,
    /// When the key was created; unchanged by later writes. Orders overlapping claims.
    pub create_revision: i64,
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub leases: Vec<RawLease>,
    /// Store revision the listing was taken at; a watch continues from `revision + 1`.
    pub revision: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(RawLease),
    Delete { key: String, revision: i64 },
}

impl WatchEvent {
    pub fn revision(&self) -> i64 {
        match self {
            WatchEvent::Put(l) => l.mod_revision,
            WatchEvent::Delete { revision, .. } => *revision,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateOutcome {
    Created {
        lease_id: i64,
    },
    /// Someone else holds the key: pick another subnet.
    Taken,
}

/// What [`Registry::reserve`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReserveOutcome {
    /// The key now has no TTL lease. `created`: it did not exist before; otherwise an existing
    /// lease of the same public IP was detached from its TTL (or was reserved already).
    Reserved { created: bool },
    /// Another public IP holds the subnet (its PublicIP, or the raw value if unreadable).
    HeldBy(String),
}

/// What [`Registry::unreserve`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnreserveOutcome {
    /// The key is now attached to the fresh TTL lease `lease_id`.
    Released {
        lease_id: i64,
    },
    /// The key has a TTL lease already: it is not a reservation.
    NotReserved {
        lease_id: i64,
    },
    NotFound,
}

/// The value a reservation is created with, as flannel's: `{"PublicIP":"…"}`.
pub fn reservation_value(holder: IpAddr) -> Vec<u8> {
    match holder {
        IpAddr::V4(ip) => serde_json::json!({ "PublicIP": ip.to_string() }),
        // An IPv6-only key's value: flannel's field set has PublicIP, 0.0.0.0 there.
        IpAddr::V6(ip) => {
            serde_json::json!({ "PublicIP": "0.0.0.0", "PublicIPv6": ip.to_string() })
        }
    }
    .to_string()
    .into_bytes()
}

/// The PublicIP of a stored lease value, `Err(text)` when it has none.
pub(crate) fn holder_of(value: &[u8]) -> Result<Ipv4Addr, String> {
    serde_json::from_slice::<serde_json::Value>(value)
        .ok()
        .and_then(|v| v.get("PublicIP")?.as_str()?.parse().ok())
        .ok_or_else(|| format!("an unreadable value {:?}", String::from_utf8_lossy(value)))
}

/// Who holds a stored lease value in the family of `like`: its PublicIP for an IPv4 address,
/// its PublicIPv6 for an IPv6 one (an IPv6-only key's holder); `Err(text)` when it has none.
pub(crate) fn holder_like(value: &[u8], like: IpAddr) -> Result<IpAddr, String> {
    let field = if like.is_ipv6() {
        "PublicIPv6"
    } else {
        "PublicIP"
    };
    serde_json::from_slice::<serde_json::Value>(value)
        .ok()
        .and_then(|v| v.get(field)?.as_str()?.parse::<IpAddr>().ok())
        // 0.0.0.0 is every IPv6-only value's PublicIP: it names no holder.
        .filter(|ip| ip.is_ipv6() == like.is_ipv6() && !ip.is_unspecified())
        .ok_or_else(|| {
            format!(
                "a value without a usable {field} {:?}",
                String::from_utf8_lossy(value)
            )
        })
}

pub enum Registry {
    Etcd(Box<EtcdRegistry>),
    #[cfg(any(test, feature = "fake"))]
    Mem(MemRegistry),
}

pub enum LeaseWatch {
    Etcd(Box<etcd::EtcdWatch>),
    #[cfg(any(test, feature = "fake"))]
    Mem(mem::MemWatch),
}

impl LeaseWatch {
    /// Next batch of events. `Err(Compacted)` means: re-list and diff.
    pub async fn next(&mut self) -> Result<Vec<WatchEvent>, RegistryError> {
        match self {
            LeaseWatch::Etcd(w) => w.next().await,
            #[cfg(any(test, feature = "fake"))]
            LeaseWatch::Mem(w) => w.next().await,
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $r:ident => $e:expr) => {
        match $self {
            Registry::Etcd($r) => $e,
            #[cfg(any(test, feature = "fake"))]
            Registry::Mem($r) => $e,
        }
    };
}

/// Async methods that forward to the backend's method of the same name and arguments.
macro_rules! forward {
    ($($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $ok:ty;)*) => {
        $(
            $(#[$doc])*
            pub async fn $name(&self, $($arg: $ty),*) -> Result<$ok, RegistryError> {
                dispatch!(self, r => r.$name($($arg),*).await)
            }
        )*
    };
}

impl Registry {
    pub fn etcd(r: EtcdRegistry) -> Self {
        Registry::Etcd(Box::new(r))
    }

    pub fn prefix(&self) -> &str {
        dispatch!(self, r => r.prefix())
    }

    pub fn config_key(&self) -> String {
        format!("{}/config", self.prefix())
    }

    pub fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix())
    }

    forward! {
        /// The network config JSON, `None` while it has not been written.
        fn get_config() -> Option<String>;
        fn list_leases() -> Snapshot;
        /// Creates `key` with a fresh TTL lease only if it does not exist (version 0).
        fn create_lease(key: &dyn KeyName, attrs: &LeaseAttrs, ttl: Duration) -> CreateOutcome;
        /// Rewrites the value of a lease we hold, keeping its TTL lease, only if nobody changed it
        /// since `mod_revision`. Returns false when it changed or vanished.
        fn update_lease(key: &dyn KeyName, attrs: &LeaseAttrs, lease_id: i64, mod_revision: i64) -> bool;
        /// Deletes `key` only if unchanged since `mod_revision`; false when it changed or vanished.
        fn delete_lease(key: &dyn KeyName, mod_revision: i64) -> bool;
        /// Lets go of a TTL lease now (its keys go with it) instead of waiting out its TTL. A lease
        /// already gone is no error.
        fn revoke(lease_id: i64) -> ();
        /// Replaces the connection to etcd with a fresh one (after this node's address changed).
        fn redial() -> ();
        /// Extends the TTL lease. `Ok(None)` when the lease no longer exists (expired or revoked).
        fn renew(lease_id: i64) -> Option<Duration>;
        /// Pins `key` to `holder` without a TTL: creates `{"PublicIP":ip}` if absent (an IPv6
        /// holder, of an IPv6-only key: `{"PublicIP":"0.0.0.0","PublicIPv6":ip}`), or rewrites
        /// the same value without a lease if that address holds it (`PublicIP`, or `PublicIPv6`
        /// for an IPv6 holder). Nothing changes when another address does.
        fn reserve(key: &dyn KeyName, holder: IpAddr) -> ReserveOutcome;
        /// Attaches a reserved key (no TTL) to a fresh TTL lease, so it expires unless renewed.
        fn unreserve(key: &dyn KeyName, ttl: Duration) -> UnreserveOutcome;
    }

    pub async fn watch(&self, from_revision: i64) -> Result<LeaseWatch, RegistryError> {
        match self {
            Registry::Etcd(r) => r
                .watch(from_revision)
                .await
                .map(|w| LeaseWatch::Etcd(Box::new(w))),
            #[cfg(any(test, feature = "fake"))]
            Registry::Mem(r) => r.watch(from_revision).map(LeaseWatch::Mem),
        }
    }
}
