//! The gRPC API on a unix socket: status, leases, peers and a stream of lease events.

use crate::registry::{RawLease, Registry, ReserveOutcome, UnreserveOutcome};
use crate::state::{AgentState, EventKind, LeaseEventView, LeaseView};
use ipnetwork::{Ipv4Network, Ipv6Network};
use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tweed_api::v1::agent_server::{Agent, AgentServer};
use tweed_api::v1::{self as pb, lease_event::Kind};
use tweed_config::{Ipv6Config, Ipv6OnlyKey, LeaseKey, NetworkConfig, SubnetKey};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("API socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "API socket {path}: another tweedd answers on it; stop that agent first, or give this one \
         another --api-socket"
    )]
    InUse { path: PathBuf },
    #[error("API server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// What Reserve/Unreserve need, known once the agent reached etcd and read the network config.
pub struct Control {
    pub registry: Arc<Registry>,
    pub cfg: ControlNetwork,
    /// `--lease-ttl`: the TTL an unreserved key gets.
    pub lease_ttl: Duration,
    /// Requests only the run loop can carry out (it owns the data plane and the lease).
    pub commands: tokio::sync::mpsc::Sender<Command>,
}

/// The network whose keys Reserve/Unreserve act on.
pub enum ControlNetwork {
    /// IPv4 subnets (a dual-stack key keeps its IPv6 half), held by a `PublicIP`.
    Ipv4(NetworkConfig),
    /// An IPv6-only network (`EnableIPv4: false`): its IPv6-only keys, held by a `PublicIPv6`.
    Ipv6Only(Ipv6Config),
}

impl From<NetworkConfig> for ControlNetwork {
    fn from(cfg: NetworkConfig) -> Self {
        ControlNetwork::Ipv4(cfg)
    }
}

/// A request for the run loop, with where its answer goes.
#[derive(Debug)]
pub enum Command {
    RotateWireguardKey(tokio::sync::oneshot::Sender<Result<pb::RotateWireguardKeyReply, Status>>),
}

/// Set by the run loop; empty while etcd or the network config is awaited.
pub type ControlSlot = Arc<OnceLock<Control>>;

pub struct Service {
    state: AgentState,
    control: ControlSlot,
}

impl Service {
    fn control(&self) -> Result<&Control, Status> {
        self.control.get().ok_or_else(|| {
            Status::unavailable("the agent has not read the network config from etcd yet")
        })
    }

    /// The control handle and the key of `subnet`, checked against the network it holds.
    ///
    /// A dual-stack lease's key names its IPv6 half too (`10.244.7.0-24&fd00:…-64`): the key
    /// already holding the subnet is the one acted on, so a reservation keeps the IPv6 half
    /// instead of writing a second, v4-only key beside it.
    ///
    /// In an IPv6-only network the key is the IPv6-only key of the subnet, the one its node's
    /// loop holds and follows (reserved or unreserved by hand).
    async fn control_and_key(&self, subnet: &str) -> Result<(&Control, LeaseKey), Status> {
        let c = self.control()?;
        let cfg = match &c.cfg {
            ControlNetwork::Ipv4(cfg) => cfg,
            ControlNetwork::Ipv6Only(cfg) => {
                return Ok((c, LeaseKey::Ipv6Only(parse_subnet6(cfg, subnet)?)))
            }
        };
        let key = parse_subnet(cfg, subnet)?;
        let snap = c.registry.list_leases().await.map_err(registry_status)?;
        let existing = key_holding(c.registry.prefix(), &snap.leases, key.ipv4);
        Ok((c, LeaseKey::Flannel(existing.unwrap_or(key))))
    }
}

/// Whether `a` can be a node's `PublicIPv6`: peers reach it across the underlay, so not the
/// unspecified, loopback, multicast, link-local or IPv4-mapped addresses.
fn global_unicast6(a: std::net::Ipv6Addr) -> bool {
    !(a.is_unspecified()
        || a.is_loopback()
        || a.is_multicast()
        || a.is_unicast_link_local()
        || a.to_ipv4_mapped().is_some())
}

/// The key holding the IPv4 subnet `v4`. Two keys can name it (a rename cut short, or two
/// nodes' racing claims); the oldest one is the lease every reader's table accepts, the others
/// are skipped as overlaps.
fn key_holding(prefix: &str, leases: &[RawLease], v4: Ipv4Network) -> Option<SubnetKey> {
    leases
        .iter()
        .filter_map(|l| {
            let k = SubnetKey::from_etcd_key(prefix, &l.key)?.ok()?;
            (k.ipv4 == v4).then_some(((l.create_revision, l.mod_revision), k))
        })
        .min_by_key(|(rev, _)| *rev)
        .map(|(_, k)| k)
}

/// "10.244.7.0/24" or flannel's key form "10.244.7.0-24", checked against the network.
fn parse_subnet(cfg: &NetworkConfig, s: &str) -> Result<SubnetKey, Status> {
    let s = s.trim();
    let net = s
        .parse::<Ipv4Network>()
        .ok()
        .or_else(|| s.parse::<SubnetKey>().ok().map(|k| k.ipv4))
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "{s:?} is not a subnet (write it like 10.244.7.0/{})",
                cfg.subnet_len
            ))
        })?;
    if !cfg.is_allocatable(net) {
        return Err(Status::invalid_argument(format!(
            "{s} is not an allocatable subnet of network {}: it must be a /{} between {} and {}",
            cfg.network, cfg.subnet_len, cfg.subnet_min, cfg.subnet_max
        )));
    }
    Ok(SubnetKey::new(net))
}

/// "fd00:10:244:7::/64" or the key form "fd00:10:244:7::-64", checked against the IPv6-only
/// network.
fn parse_subnet6(cfg: &Ipv6Config, s: &str) -> Result<Ipv6OnlyKey, Status> {
    let s = s.trim();
    let net = s
        .parse::<Ipv6Network>()
        .ok()
        .or_else(|| s.parse::<Ipv6OnlyKey>().ok().map(|k| k.ipv6))
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "{s:?} is not an IPv6 subnet (an IPv6-only network: write it like {}/{})",
                cfg.subnet_min, cfg.subnet_len
            ))
        })?;
    if !cfg.is_allocatable(net) {
        return Err(Status::invalid_argument(format!(
            "{s} is not an allocatable subnet of IPv6Network {}: it must be a /{} between {} and {}",
            cfg.network, cfg.subnet_len, cfg.subnet_min, cfg.subnet_max
        )));
    }
    Ok(Ipv6OnlyKey { ipv6: net })
}

/// The subnet a key names, as replies and logs show it.
fn subnet_of(key: &LeaseKey) -> String {
    match key {
        LeaseKey::Flannel(k) => k.ipv4.to_string(),
        LeaseKey::Ipv6Only(k) => k.ipv6.to_string(),
    }
}

fn registry_status(e: crate::registry::RegistryError) -> Status {
    Status::unavailable(e.to_string())
}

fn lease_pb(l: &LeaseView) -> pb::Lease {
    pb::Lease {
        subnet: l.subnet.clone(),
        public_ip: l.public_ip.clone(),
        backend_type: l.backend_type.clone(),
        backend_data: l.backend_data.clone(),
        lease_id: l.lease_id,
        own: l.own,
    }
}

fn event_pb(e: &LeaseEventView) -> pb::LeaseEvent {
    let kind = match e.kind {
        EventKind::Added => Kind::Added,
        EventKind::Updated => Kind::Updated,
        EventKind::Removed => Kind::Removed,
    };
    pb::LeaseEvent {
        kind: kind as i32,
        lease: Some(lease_pb(&e.lease)),
        unix_millis: e.unix_millis,
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::LeaseEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for Service {
    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        let s = self.state.snapshot();
        let not_ready = s.not_ready();
        Ok(Response::new(pb::StatusReply {
            node: s.node,
            public_ip: s.public_ip,
            network: s.network,
            subnet: s.subnet,
            backend: s.backend,
            mtu: s.mtu,
            ready: not_ready.is_empty(),
            lease_held: s.lease_held,
            backend_programmed: s.backend_programmed,
            watch_live: s.watch_live,
            not_ready,
            lease_expiry_unix: s.lease_expiry_unix,
            version: env!("CARGO_PKG_VERSION").to_string(),
            etcd_endpoints: s.etcd_endpoints,
            backend_implementation: s.backend_implementation,
            ipv6: s.ipv6,
            public_ipv6: s.public_ipv6,
            subnet_v6: s.subnet_v6,
        }))
    }

    async fn list_leases(
        &self,
        _: Request<pb::ListLeasesRequest>,
    ) -> Result<Response<pb::ListLeasesReply>, Status> {
        let snap = self.state.snapshot();
        let leases = snap
            .leases
            .iter()
            .chain(snap.v6only_leases.iter())
            .map(lease_pb)
            .collect();
        Ok(Response::new(pb::ListLeasesReply { leases }))
    }

    async fn list_peers(
        &self,
        _: Request<pb::ListPeersRequest>,
    ) -> Result<Response<pb::ListPeersReply>, Status> {
        let snap = self.state.snapshot();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let peers = snap
            .peers
            .iter()
            .chain(snap.v6only_peers.iter())
            .map(|p| {
                // An IPv6-only network's entries have no IPv4 lease subnet: the lease is
                // named by the entry's own (IPv6) subnet.
                let entry = |device: &str| {
                    snap.wg_peers.iter().find(|w| {
                        w.device == device
                            && (w.lease_subnet == p.subnet
                                || (w.lease_subnet.is_empty() && w.subnet == p.subnet))
                    })
                };
                let age = |w: &crate::state::WgPeerView| {
                    w.handshake_unix_ms
                        .map_or(-1, |t| now_ms.saturating_sub(t).max(0) / 1000)
                };
                let wg = entry(crate::backend::wireguard::DEVICE);
                pb::Peer {
                    public_key: wg.map(|w| w.public_key.clone()).unwrap_or_default(),
                    handshake_age_seconds: wg.map_or(-1, age),
                    tx_bytes: wg.map_or(0, |w| w.tx_bytes),
                    rx_bytes: wg.map_or(0, |w| w.rx_bytes),
                    device: wg.map(|w| w.device.clone()).unwrap_or_default(),
                    v6_entry: entry(crate::backend::wireguard::dual::DEVICE_V6).map(|w| {
                        pb::WireguardEntry {
                            device: w.device.clone(),
                            subnet: w.subnet.clone(),
                            public_key: w.public_key.clone(),
                            handshake_age_seconds: age(w),
                            tx_bytes: w.tx_bytes,
                            rx_bytes: w.rx_bytes,
                        }
                    }),
                    subnet: p.subnet.clone(),
                    public_ip: p.public_ip.clone(),
                    backend: p.backend.clone(),
                    programmed: p.programmed,
                    error: p.error.clone().unwrap_or_default(),
                }
            })
            .collect();
        Ok(Response::new(pb::ListPeersReply { peers }))
    }

    type WatchLeasesStream = EventStream;

    async fn watch_leases(
        &self,
        _: Request<pb::WatchLeasesRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let rx = self.state.subscribe();
        let stream = tokio_stream::wrappers::BroadcastStream::new(rx).map(|r| match r {
            Ok(e) => Ok(event_pb(&e)),
            Err(e) => Err(Status::data_loss(format!(
                "watcher fell behind ({e}); list leases and watch again"
            ))),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn reserve(
        &self,
        req: Request<pb::ReserveRequest>,
    ) -> Result<Response<pb::ReserveReply>, Status> {
        let req = req.into_inner();
        let (c, key) = self.control_and_key(&req.subnet).await?;
        let given = req.public_ip.trim();
        // An IPv6-only key is held by its node's PublicIPv6, any other by the PublicIP.
        let ip: IpAddr = match key {
            LeaseKey::Flannel(_) => given.parse::<std::net::Ipv4Addr>().map(IpAddr::V4).map_err(|_| {
                Status::invalid_argument(format!("{:?} is not an IPv4 address", req.public_ip))
            })?,
            LeaseKey::Ipv6Only(_) => given.parse::<std::net::Ipv6Addr>().map(IpAddr::V6).map_err(|_| {
                Status::invalid_argument(format!(
                    "{:?} is not an IPv6 address (in an IPv6-only network a subnet is held by its node's PublicIPv6)",
                    req.public_ip
                ))
            })?,
        };
        if let (LeaseKey::Ipv6Only(k), IpAddr::V6(a)) = (&key, ip) {
            if !global_unicast6(a) {
                return Err(Status::invalid_argument(format!(
                    "{a} cannot hold a subnet: a node's PublicIPv6 is a global unicast address \
                     (not unspecified, loopback, multicast, link-local or IPv4-mapped)"
                )));
            }
            // A dual-stack key naming the same IPv6 subnet wins every reader's table (it is
            // older); a reservation beside it would only linger.
            let snap = c.registry.list_leases().await.map_err(registry_status)?;
            let prefix = c.registry.prefix();
            if let Some(other) = snap.leases.iter().find(|l| {
                LeaseKey::from_etcd_key(prefix, &l.key).is_some_and(|r| {
                    r.is_ok_and(|o| !matches!(o, LeaseKey::Ipv6Only(_)) && o.ipv6() == Some(k.ipv6))
                })
            }) {
                return Err(Status::failed_precondition(format!(
                    "{} is already claimed by the dual-stack key {}; remove that first",
                    k.ipv6, other.key
                )));
            }
        }
        let subnet = subnet_of(&key);
        match c
            .registry
            .reserve(&key, ip)
            .await
            .map_err(registry_status)?
        {
            ReserveOutcome::Reserved { created } => {
                tracing::info!(%subnet, public_ip = %ip, created, "subnet reserved");
                Ok(Response::new(pb::ReserveReply {
                    subnet,
                    public_ip: ip.to_string(),
                    created,
                }))
            }
            ReserveOutcome::HeldBy(holder) => Err(Status::already_exists(format!(
                "{subnet} is held by {holder}, not {ip}: unreserve it, or wait until its lease expires"
            ))),
        }
    }

    async fn rotate_wireguard_key(
        &self,
        _: Request<pb::RotateWireguardKeyRequest>,
    ) -> Result<Response<pb::RotateWireguardKeyReply>, Status> {
        let c = self.control()?;
        if let ControlNetwork::Ipv6Only(_) = c.cfg {
            return Err(Status::failed_precondition(
                "not available in an IPv6-only network (EnableIPv4: false): its wireguard \
                 backend has no key rotation yet (restart with a new key file instead)",
            ));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let gone = || Status::unavailable("the agent's run loop is not running (shutting down?)");
        c.commands
            .send(Command::RotateWireguardKey(tx))
            .await
            .map_err(|_| gone())?;
        Ok(Response::new(rx.await.map_err(|_| gone())??))
    }

    async fn unreserve(
        &self,
        req: Request<pb::UnreserveRequest>,
    ) -> Result<Response<pb::UnreserveReply>, Status> {
        let (c, key) = self.control_and_key(&req.into_inner().subnet).await?;
        let subnet = subnet_of(&key);
        match c
            .registry
            .unreserve(&key, c.lease_ttl)
            .await
            .map_err(registry_status)?
        {
            UnreserveOutcome::Released { lease_id } => {
                tracing::info!(%subnet, lease = format!("{lease_id:x}"), "subnet unreserved");
                Ok(Response::new(pb::UnreserveReply {
                    subnet,
                    lease_id,
                    ttl_seconds: c.lease_ttl.as_secs().max(1) as i64,
                }))
            }
            UnreserveOutcome::NotReserved { lease_id } => Err(Status::failed_precondition(
                format!("{subnet} is not reserved: it has the TTL lease {lease_id:x}"),
            )),
            UnreserveOutcome::NotFound => Err(Status::not_found(format!(
                "{subnet} is not leased or reserved"
            ))),
        }
    }
}

/// Binds the socket with mode 0600: the API shows the cluster's layout, so only root may read it.
/// A socket left by an agent that is gone is replaced; one that an agent still answers on is
/// refused, so a second agent started by mistake does not take the running one's API away.
pub fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| ApiError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // Refused (nobody listens) or not a socket at all: stale, replaced below.
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(ApiError::InUse {
            path: path.to_path_buf(),
        });
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let l = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(l)
}

pub async fn serve(
    listener: UnixListener,
    state: AgentState,
    control: ControlSlot,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ApiError> {
    tonic::transport::Server::builder()
        .add_service(AgentServer::new(Service { state, control }))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_key_holding_a_subnet_is_the_oldest_of_those_naming_it() {
        const P: &str = "/coreos.com/network";
        let raw = |name: &str, created: i64| RawLease {
            key: format!("{P}/subnets/{name}"),
            value: br#"{"PublicIP":"198.18.0.1"}"#.to_vec(),
            lease_id: 0,
            mod_revision: 50 - created,
            create_revision: created,
        };
        let v4: Ipv4Network = "10.244.7.0/24".parse().unwrap();
        // The older key sorts after the younger one by name: age decides, not the name.
        let leases = [
            raw("10.244.6.0-24", 1),
            raw("10.244.7.0-24", 9),
            raw("10.244.7.0-24&fd00:10:244:1::-64", 4),
        ];
        let k = key_holding(P, &leases, v4).unwrap();
        assert_eq!(k.to_string(), "10.244.7.0-24&fd00:10:244:1::-64");
        assert_eq!(
            key_holding(P, &leases[..2], v4).unwrap().to_string(),
            "10.244.7.0-24"
        );
        assert_eq!(
            key_holding(P, &leases, "10.244.8.0/24".parse().unwrap()),
            None
        );
    }

    #[tokio::test]
    async fn bind_refuses_a_live_socket_and_replaces_a_stale_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run").join("tweedd.sock");
        let first = bind(&path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);

        let e = bind(&path).unwrap_err().to_string();
        assert!(
            e.contains(path.to_str().unwrap()) && e.contains("another tweedd"),
            "{e}"
        );
        // The running agent keeps its socket.
        let _client = tokio::net::UnixStream::connect(&path).await.unwrap();
        first.accept().await.expect("the first agent still accepts");

        // Gone without removing its socket (killed): the next agent takes the path over.
        drop(first);
        assert!(path.exists());
        let second = bind(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        let _client = tokio::net::UnixStream::connect(&path).await.unwrap();
        second.accept().await.unwrap();

        // Whatever else sits there is not an agent either.
        drop(second);
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "not a socket").unwrap();
        bind(&path).unwrap();
    }
}
