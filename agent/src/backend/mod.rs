//! Backends turn the set of remote leases into kernel state. Each one has the same shape, which
//! host-gw and udp reuse:
//!
//! 1. `setup`: make sure the backend's device exists (idempotent, reuses what a previous run left);
//! 2. desired state: one peer value per remote lease (e.g. [`vxlan::VxlanPeer`]);
//! 3. a pure `plan(observed, desired) -> Vec<Op>` producing only the missing, different and stale
//!    entries, so an unchanged world costs zero syscalls beyond the first observation;
//! 4. [`apply_plan`]: batched, idempotent, failures reported per peer in [`ReconcileStats`].
//!
//! The run loop sees them through one interface: [`Prepared`] (chosen from the network config,
//! knows what the lease must advertise before a subnet is leased) and [`DataPlane`] (set up for
//! the leased subnet; `reconcile` with every remote lease, `resync`, `mtu`).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnetwork::Ipv4Network;
use tweed_config::{BackendConfig, LeaseAttrs};

use crate::netlink::{Iface, Link, Netlink, NetlinkError, Op, Route};

pub mod hostgw;
pub mod route;
pub mod udp;
pub mod v6;
pub mod vxlan;
pub mod wireguard;

pub use hostgw::{HostGwBackend, HostGwConfig, HostGwError, HostGwPeer};
pub use udp::{UdpBackend, UdpConfig, UdpError, UdpPeer, UdpPeer6, V6Spec};
pub use vxlan::{ObservedState, VxlanBackend, VxlanConfig, VxlanError, VxlanPeer};
pub use wireguard::{WgConfig, WgError, WgImpl};

/// The smallest MTU IPv4 allows; below it the device would be useless.
pub const MIN_MTU: u32 = 68;

/// An encapsulating backend's device MTU (the underlay's minus the backend's overhead) is below
/// IPv4's minimum.
#[derive(Debug, thiserror::Error)]
#[error(
    "{device}: MTU {mtu} is below the IPv4 minimum of {MIN_MTU} (underlay MTU {underlay_mtu}, \
     {backend} needs {overhead} bytes of it)"
)]
pub struct MtuError {
    pub device: String,
    pub mtu: u32,
    pub underlay_mtu: u32,
    pub backend: &'static str,
    pub overhead: u32,
}

/// Refuses a device MTU below [`MIN_MTU`], naming what the encapsulation took of the underlay's.
pub fn check_mtu(
    device: &str,
    mtu: u32,
    underlay_mtu: u32,
    (backend, overhead): (&'static str, u32),
) -> Result<(), MtuError> {
    if mtu >= MIN_MTU {
        return Ok(());
    }
    Err(MtuError {
        device: device.to_string(),
        mtu,
        underlay_mtu,
        backend,
        overhead,
    })
}

/// Outcome of one reconcile pass.
#[derive(Debug, Default)]
pub struct ReconcileStats {
    /// Ops the kernel accepted (deletes of already-gone entries included).
    pub ops_applied: usize,
    /// Those ops, so a repair can say what was wrong.
    pub applied: Vec<Op>,
    pub failures: Vec<PeerFailure>,
    /// Peers deliberately not programmed, with the reason (e.g. host-gw peers behind a router).
    pub skipped: Vec<PeerSkip>,
}

/// A remote lease the backend refuses to program, named so the operator can find the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSkip {
    pub subnet: Ipv4Network,
    pub public_ip: Ipv4Addr,
    pub reason: String,
}

impl fmt::Display for PeerSkip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "peer {} (PublicIP {}) not programmed: {}",
            self.subnet, self.public_ip, self.reason
        )
    }
}

impl ReconcileStats {
    pub fn is_clean(&self) -> bool {
        self.failures.is_empty()
    }
}

/// One op the kernel refused, with the peer it was for, so one broken peer is reported and
/// retried without holding back the others.
#[derive(Debug, thiserror::Error)]
pub struct PeerFailure {
    /// The peer's subnet; for cleanup of entries no current peer owns, the subnet the entry
    /// served when it can be told, else `None`.
    pub subnet: Option<Ipv4Network>,
    pub op: Op,
    #[source]
    pub error: NetlinkError,
}

impl fmt::Display for PeerFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.subnet {
            Some(s) => write!(f, "peer {s}: {}", self.error),
            None => write!(f, "stale entry cleanup: {}", self.error),
        }
    }
}

/// Another node's lease, as every backend receives it. The attributes are borrowed from the
/// lease table: every lease event hands all peers to the backend, and copying 10,000 leases'
/// attributes (each with its own heap string) per event cost as much as the JSON parse of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remote<'a> {
    pub subnet: Ipv4Network,
    /// The IPv6 half of the lease's key (flannel's `...&<v6 subnet>` form), if any.
    pub subnet_v6: Option<ipnetwork::Ipv6Network>,
    pub attrs: &'a LeaseAttrs,
}

impl Remote<'_> {
    fn skip(&self, reason: String) -> PeerSkip {
        PeerSkip {
            subnet: self.subnet,
            public_ip: self.attrs.public_ip,
            reason,
        }
    }

    /// The lease must be of `want`'s backend type: nodes of different backends cannot reach each
    /// other (flannel requires one backend per network too).
    fn same_type(&self, want: &str) -> Result<(), PeerSkip> {
        let ty = self.attrs.effective_backend_type();
        if ty == want {
            Ok(())
        } else {
            Err(self.skip(format!("its backend is {ty:?}, this node runs {want}")))
        }
    }
}

/// Where this node stands: what every backend needs besides its own config.
#[derive(Debug, Clone)]
pub struct NodeContext {
    pub network: Ipv4Network,
    pub public_ip: Ipv4Addr,
    pub iface: Iface,
    pub state_dir: PathBuf,
    /// udp backend: worker threads, one TUN queue each (`--udp-workers`).
    pub udp_workers: usize,
    /// wireguard: the private key file (`$WIREGUARD_KEY_FILE`), default `<state_dir>/wgkey`.
    pub wg_key_file: Option<PathBuf>,
    /// wireguard: kernel, userspace or whichever this host has.
    pub wg_impl: WgImpl,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Vxlan(#[from] VxlanError),
    #[error(transparent)]
    HostGw(#[from] HostGwError),
    #[error(transparent)]
    Udp(#[from] UdpError),
    #[error(transparent)]
    Wireguard(#[from] WgError),
}

impl BackendError {
    /// The backend's device (or underlay) went away: set it up again.
    pub fn is_device_gone(&self) -> bool {
        matches!(
            self,
            BackendError::Vxlan(VxlanError::DeviceGone { .. })
                | BackendError::HostGw(HostGwError::UnderlayGone { .. })
                | BackendError::Udp(UdpError::DeviceGone { .. })
                | BackendError::Wireguard(WgError::DeviceGone)
        )
    }

    /// What the backend ran is stopped (wireguard's userspace workers, stopped for a socket
    /// change whose new workers failed): programming it again would carry nothing, it must be
    /// set up again.
    pub fn is_stopped(&self) -> bool {
        matches!(
            self,
            BackendError::Wireguard(WgError::WorkersStopped { .. })
        )
    }
}

/// A backend chosen from the network config, not set up yet.
#[derive(Debug, Clone)]
pub enum Prepared {
    Vxlan(VxlanConfig),
    HostGw(HostGwConfig),
    Udp(UdpConfig),
    Wireguard(WgConfig),
}

/// `$body` on the config of whichever backend this is, for the fields every backend has.
macro_rules! each_config {
    ($self:expr, $c:ident => $body:expr) => {
        match $self {
            Prepared::Vxlan($c) => $body,
            Prepared::HostGw($c) => $body,
            Prepared::Udp($c) => $body,
            Prepared::Wireguard($c) => $body,
        }
    };
}

impl Prepared {
    /// Chooses the backend and computes what the lease advertises (vxlan: the VTEP MAC, fixed
    /// now because the lease must carry it). `own_subnet` is a placeholder until the lease is
    /// known ([`set_own_subnet`](Self::set_own_subnet)).
    pub async fn new(
        nl: &Netlink,
        backend: &BackendConfig,
        node: &NodeContext,
        own_subnet: Ipv4Network,
    ) -> Result<(Prepared, LeaseAttrs), BackendError> {
        let iface = &node.iface;
        Ok(match *backend {
            BackendConfig::Vxlan {
                vni,
                port,
                direct_routing,
                mtu,
            } => {
                let cfg = VxlanConfig {
                    vni,
                    port,
                    local_ip: node.public_ip,
                    underlay_ifindex: iface.index,
                    underlay_mtu: iface.mtu,
                    own_subnet,
                    mac_file: node.state_dir.join(format!("vtep-mac.{vni}")),
                    mtu_override: (mtu != 0).then_some(mtu),
                    direct_routing: direct_routing.then(|| vxlan::DirectRouting {
                        network: node.network,
                        underlay_name: iface.name.clone(),
                    }),
                };
                let mac = VxlanBackend::prepare_mac(nl, &cfg).await?;
                let attrs = LeaseAttrs::new(
                    node.public_ip,
                    "vxlan",
                    Some(&serde_json::json!({"VNI": vni, "VtepMAC": mac.to_string()})),
                );
                (Prepared::Vxlan(cfg), attrs)
            }
            BackendConfig::HostGw => (
                Prepared::HostGw(HostGwConfig {
                    network: node.network,
                    own_subnet,
                    local_ip: node.public_ip,
                    underlay_ifindex: iface.index,
                    underlay_name: iface.name.clone(),
                    underlay_mtu: iface.mtu,
                }),
                LeaseAttrs::new(node.public_ip, "host-gw", None),
            ),
            BackendConfig::Udp { port, mtu } => (
                Prepared::Udp(UdpConfig {
                    network: node.network,
                    own_subnet,
                    // Bound to the interface's address: a --public-ip behind NAT is not ours.
                    local_ip: iface.ip,
                    port,
                    underlay_mtu: iface.mtu,
                    mtu_override: (mtu != 0).then_some(mtu),
                    queues: node.udp_workers,
                    peers_file: Some(node.state_dir.join("udp-peers")),
                    device: udp::DEVICE,
                    steering: udp::io::Steering::InnerFlow,
                    bind6: None,
                    v6_only: false,
                }),
                LeaseAttrs::new(node.public_ip, "udp", None),
            ),
            BackendConfig::Wireguard(ref w) => {
                let key_path = node
                    .wg_key_file
                    .clone()
                    .unwrap_or_else(|| node.state_dir.join(wireguard::key::KEY_FILE_NAME));
                let (private_key, created) = wireguard::key::load_or_create(&key_path)
                    .map_err(|e| BackendError::Wireguard(e.into()))?;
                let cfg = WgConfig {
                    network: node.network,
                    own_subnet,
                    local_ip: iface.ip,
                    public_ip: node.public_ip,
                    listen_port: w.listen_port,
                    underlay_mtu: iface.mtu,
                    mtu_base: w.mtu,
                    psk: w.psk,
                    keepalive: w.persistent_keepalive,
                    key_path,
                    private_key,
                    implementation: node.wg_impl,
                    queues: node.udp_workers,
                    dual: None,
                };
                cfg.check_mtu()?;
                // The kernel/userspace choice is left to each set-up (`WgBackend::setup`): the
                // lease does not depend on it (`Prepared::with_ipv6`), and `auto` falls back
                // to userspace whenever the kernel probe fails, a re-setup's included.
                tracing::info!(
                    key_file = %cfg.key_path.display(),
                    public_key = %cfg.public_key(),
                    generated = created,
                    "wireguard: node key"
                );
                let attrs = cfg.lease_attrs();
                (Prepared::Wireguard(cfg), attrs)
            }
        })
    }

    /// Whether this node can run `backend` with the IPv6 underlay `ipv6` it found: wireguard's
    /// `Mode: ipv6` needs an IPv6 underlay address (every peer is reached there); a node
    /// without one fails at start, naming the interface, rather than run cut off from all.
    /// `separate`'s two devices need two ports in any network with an IPv6 half.
    pub fn check_ipv6_underlay(
        &self,
        backend: &BackendConfig,
        ipv6: &crate::ipv6::Ipv6Mode,
    ) -> Result<(), BackendError> {
        match (backend, ipv6) {
            // Refused whether the node starts dual or IPv4 only: one that turns dual at run
            // time would fail there at every address notification instead.
            (BackendConfig::Wireguard(w), mode)
                if *mode != crate::ipv6::Ipv6Mode::Off
                    && w.mode == tweed_config::WireguardMode::Separate
                    && w.listen_port_v6 == w.listen_port =>
            {
                Err(BackendError::Wireguard(WgError::SamePortV6 {
                    port: w.listen_port_v6,
                }))
            }
            (BackendConfig::Wireguard(w), crate::ipv6::Ipv6Mode::V4Only { iface })
                if w.mode == tweed_config::WireguardMode::Ipv6 =>
            {
                Err(BackendError::Wireguard(WgError::Ipv6ModeWithoutUnderlay {
                    iface: iface.clone(),
                }))
            }
            _ => Ok(()),
        }
    }

    /// `attrs` with a dual-stack node's IPv6 half: `PublicIPv6`, and a `BackendV6Data` when
    /// the backend serves IPv6 ([`crate::ipv6::with_public_ipv6`]; wireguard in every
    /// `Backend.Mode`, on either path, the mode then recorded for its set-up). At start
    /// `attrs` is what [`new`](Self::new) returned; a node turning dual at run time passes its
    /// lease as published (fields followed at run time are kept), and the running backend
    /// takes the recorded half too (`WgBackend::set_dual`). Both `BackendData` and
    /// `BackendV6Data` name the key in use: peers sharing one device drop an IPv6 half whose
    /// key differs from its `BackendData`'s, and a published lease may still name a key
    /// rotated away.
    pub fn with_ipv6(
        &mut self,
        attrs: LeaseAttrs,
        public_ipv6: std::net::Ipv6Addr,
        ipv6: &tweed_config::Ipv6Config,
        backend: &BackendConfig,
    ) -> Result<LeaseAttrs, BackendError> {
        let (Prepared::Wireguard(c), BackendConfig::Wireguard(w)) = (&mut *self, backend) else {
            return Ok(crate::ipv6::with_public_ipv6(attrs, public_ipv6));
        };
        if w.mode == tweed_config::WireguardMode::Separate && w.listen_port_v6 == w.listen_port {
            return Err(BackendError::Wireguard(WgError::SamePortV6 {
                port: w.listen_port_v6,
            }));
        }
        c.dual = Some(Box::new(wireguard::WgDual {
            mode: w.mode,
            listen_port_v6: w.listen_port_v6,
            ipv6: ipv6.clone(),
            public_ipv6,
            // Learnt from the lease's key once it has the IPv6 half (`set_own_subnet_v6`):
            // until then nothing is planned for IPv6.
            own_subnet: None,
        }));
        let mut attrs = crate::ipv6::with_public_ipv6(attrs, public_ipv6);
        attrs.backend_v6_data = Some(wireguard::plan::backend_data(
            &c.public_key(),
            wireguard::dual::v6_port(w.mode, c.listen_port, w.listen_port_v6),
        ));
        Ok(c.with_key(&attrs))
    }

    /// wireguard's IPv6 half as recorded by [`with_ipv6`](Self::with_ipv6), for the running
    /// backend; `None` for the other backends or before it.
    pub fn wireguard_dual(&self) -> Option<&wireguard::WgDual> {
        match self {
            Prepared::Wireguard(c) => c.dual.as_deref(),
            _ => None,
        }
    }

    /// Our lease's IPv6 subnet, for a backend that serves IPv6 itself (wireguard's device).
    pub fn set_own_subnet_v6(&mut self, subnet: Option<ipnetwork::Ipv6Network>) {
        if let Prepared::Wireguard(c) = self {
            if let Some(d) = c.dual.as_mut() {
                d.own_subnet = subnet;
            }
        }
    }

    /// Our `PublicIPv6` moved: wireguard's dual plan reads the new one.
    pub fn set_public_ipv6(&mut self, to: std::net::Ipv6Addr) {
        if let Prepared::Wireguard(c) = self {
            c.set_public_ipv6(to);
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            Prepared::Vxlan(_) => "vxlan",
            Prepared::HostGw(_) => "host-gw",
            Prepared::Udp(_) => "udp",
            Prepared::Wireguard(_) => "wireguard",
        }
    }

    pub fn set_own_subnet(&mut self, subnet: Ipv4Network) {
        each_config!(self, c => c.own_subnet = subnet)
    }

    /// The subnet the backend is (or will be) set up for.
    pub fn own_subnet(&self) -> Ipv4Network {
        each_config!(self, c => c.own_subnet)
    }

    /// The underlay MTU the backend derives its device's MTU from.
    pub fn underlay_mtu(&self) -> u32 {
        each_config!(self, c => c.underlay_mtu)
    }

    /// The MTU pods get (subnet.env, status, metrics) for a backend device of `device_mtu`;
    /// `dual`: this node runs the IPv6 half. Only vxlan has an IPv6 device with a larger
    /// overhead (see [`v6::pod_mtu`]); host-gw's IPv6 routes use the underlay itself and the
    /// other backends carry no IPv6, so they keep the device's MTU.
    pub fn pod_mtu(&self, device_mtu: u32, dual: bool) -> u32 {
        match self {
            Prepared::Vxlan(c) => v6::pod_mtu(
                device_mtu,
                c.mtu_override.is_some(),
                dual.then(|| v6::device_mtu6(c.underlay_mtu)),
            ),
            _ => device_mtu,
        }
    }

    /// The underlay's MTU changed at run time: the next [`setup`](Self::setup) derives the
    /// device's MTU from `mtu` (an MTU override in the network config still wins).
    pub fn set_underlay_mtu(&mut self, mtu: u32) {
        each_config!(self, c => c.underlay_mtu = mtu)
    }

    /// What another backend left in the kernel: after an operator switches the network's
    /// backend and restarts the agent, the old device would keep its routes (a udp `tweed0`
    /// routes the whole network) and host-gw's per-peer routes via the underlay would shadow
    /// the new backend's. Devices go with their routes; host-gw routes are told by a gateway
    /// outside the overlay network, which no other backend writes.
    pub fn leftovers(&self, network: Ipv4Network, links: &[Link], routes: &[Route]) -> Vec<Op> {
        let own_vxlan = match self {
            Prepared::Vxlan(c) => Some(vxlan::device_name(c.vni)),
            _ => None,
        };
        let mut ops: Vec<Op> = links
            .iter()
            .filter(|l| {
                let old_udp = l.name == udp::DEVICE && !matches!(self, Prepared::Udp(_));
                let old_wg = (l.name == wireguard::DEVICE || l.name == wireguard::dual::DEVICE_V6)
                    && !matches!(self, Prepared::Wireguard(_));
                let old_vxlan = l.kind.as_deref() == Some("vxlan")
                    && l.name.starts_with("tweed.")
                    && own_vxlan.as_deref() != Some(l.name.as_str());
                old_udp || old_wg || old_vxlan
            })
            .map(|l| Op::LinkDel {
                name: l.name.clone(),
            })
            .collect();
        // vxlan with DirectRouting writes host-gw's kind of route itself.
        let writes_gateway_routes = match self {
            Prepared::HostGw(_) => true,
            Prepared::Vxlan(c) => c.direct_routing.is_some(),
            Prepared::Udp(_) | Prepared::Wireguard(_) => false,
        };
        if !writes_gateway_routes {
            ops.extend(
                routes
                    .iter()
                    .filter(|r| {
                        r.protocol == Route::PROTO_STATIC
                            && r.dst.prefix() > network.prefix()
                            && network.contains(r.dst.network())
                            && r.gateway.is_some_and(|gw| !network.contains(gw))
                    })
                    .map(|r| Op::RouteDel(*r)),
            );
        }
        ops
    }

    /// Removes [`leftovers`](Self::leftovers); a failure is logged, since the new backend
    /// works beside most leftovers and the next restart tries again.
    pub async fn remove_leftovers(&self, nl: &Netlink, network: Ipv4Network) {
        let (links, routes) = match (nl.links().await, nl.all_routes().await) {
            (Ok(l), Ok(r)) => (l, r),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!("looking for other backends' leftovers: {e}");
                return;
            }
        };
        for op in self.leftovers(network, &links, &routes) {
            match nl.apply(&op).await {
                Ok(()) => tracing::info!(backend = self.type_name(), "removed leftover: {op}"),
                Err(e) => tracing::warn!("removing leftover ({op}): {e}"),
            }
        }
    }

    /// Sets the backend up (idempotent: a restart finds its device and changes nothing).
    pub async fn setup(&self, nl: &Netlink) -> Result<DataPlane, BackendError> {
        self.setup_dual(nl, false).await
    }

    /// [`setup`](Self::setup); `dual`: this node runs the IPv6 half too (udp then leaves IPv6
    /// on its TUN device, since it carries IPv6 itself; the other backends do not care).
    pub async fn setup_dual(&self, nl: &Netlink, dual: bool) -> Result<DataPlane, BackendError> {
        Ok(match self {
            Prepared::Vxlan(c) => DataPlane::Vxlan(VxlanBackend::setup(nl, c.clone()).await?),
            Prepared::HostGw(c) => DataPlane::HostGw(HostGwBackend::setup(nl, c.clone()).await?),
            Prepared::Udp(c) => DataPlane::Udp(UdpBackend::setup_with(nl, c.clone(), dual).await?),
            Prepared::Wireguard(c) => {
                DataPlane::Wireguard(wireguard::WgBackend::setup(nl, c.clone()).await?)
            }
        })
    }
}

/// A set-up backend.
#[derive(Debug)]
pub enum DataPlane {
    Vxlan(VxlanBackend),
    HostGw(HostGwBackend),
    Udp(UdpBackend),
    Wireguard(wireguard::WgBackend),
}

impl DataPlane {
    /// The MTU pods must use (subnet.env's `TWEED_MTU`).
    pub fn mtu(&self) -> u32 {
        match self {
            DataPlane::Vxlan(b) => b.mtu(),
            DataPlane::HostGw(b) => b.mtu(),
            DataPlane::Udp(b) => b.mtu(),
            DataPlane::Wireguard(b) => b.mtu(),
        }
    }

    /// What carries the packets: `kernel` (vxlan, host-gw, wireguard's kernel device) or
    /// `userspace` (udp's workers, wireguard's on them).
    pub fn implementation(&self) -> &'static str {
        match self {
            DataPlane::Vxlan(_) | DataPlane::HostGw(_) => "kernel",
            DataPlane::Udp(_) => "userspace",
            DataPlane::Wireguard(b) => b.implementation(),
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            DataPlane::Vxlan(_) => "vxlan",
            DataPlane::HostGw(_) => "host-gw",
            DataPlane::Udp(_) => "udp",
            DataPlane::Wireguard(_) => "wireguard",
        }
    }

    /// The next reconcile re-reads the kernel instead of trusting the backend's view.
    pub fn resync(&mut self) {
        match self {
            DataPlane::Vxlan(b) => b.resync(),
            DataPlane::HostGw(b) => b.resync(),
            DataPlane::Udp(b) => b.resync(),
            DataPlane::Wireguard(b) => b.resync(),
        }
    }

    /// Releases what the backend runs (udp: its workers); the kernel state stays.
    pub async fn stop(&mut self) {
        match self {
            DataPlane::Udp(b) => b.stop().await,
            DataPlane::Wireguard(b) => b.stop().await,
            _ => {}
        }
    }

    /// Makes the data plane serve exactly `remotes` (other nodes' leases). Leases this backend
    /// cannot serve come back in [`ReconcileStats::skipped`].
    pub async fn reconcile(
        &mut self,
        nl: &Netlink,
        remotes: &[Remote<'_>],
    ) -> Result<ReconcileStats, BackendError> {
        let mut skipped = Vec::new();
        let mut stats = match self {
            // Keeps the peers it planned, so the next lease event (the first after a start, a
            // resync or a repair too) can plan its changed peers alone (issue 20).
            DataPlane::Vxlan(b) => b.reconcile_keeping(nl, remotes).await?,
            DataPlane::HostGw(b) => {
                let peers = peers_of_type(remotes, "host-gw", &mut skipped, |r| {
                    Ok(HostGwPeer {
                        subnet: r.subnet,
                        public_ip: r.attrs.public_ip,
                    })
                });
                b.reconcile(nl, &peers).await?
            }
            DataPlane::Udp(b) => {
                // Every node of a network binds the network config's Backend.Port (flannel's
                // udp leases carry no BackendData), so that is the port a peer sends from.
                let port = b.port();
                let peers = peers_of_type(remotes, "udp", &mut skipped, |r| {
                    Ok(UdpPeer {
                        subnet: r.subnet,
                        public_ip: r.attrs.public_ip,
                        port,
                    })
                });
                b.reconcile(nl, &peers).await?
            }
            // A node serving an IPv6 half: each peer's lease read for both halves. (One whose
            // lease lost its IPv6 half plans IPv4 only below, which also drops the IPv6 routes.)
            DataPlane::Wireguard(b) if b.dual_local().is_some() => {
                let local = b.dual_local().expect("checked");
                let ipv6 = b.ipv6_config().cloned();
                let peers = peers_of_type(remotes, "wireguard", &mut skipped, |r| {
                    let key = tweed_config::SubnetKey {
                        ipv4: r.subnet,
                        ipv6: r.subnet_v6,
                    };
                    wireguard::dual::DualPeer::from_lease(&key, r.attrs, ipv6.as_ref(), &local)
                        .map_err(|e| r.skip(e))
                });
                b.reconcile_dual(nl, &peers).await?
            }
            DataPlane::Wireguard(b) => {
                let port = b.config_port();
                let peers = peers_of_type(remotes, "wireguard", &mut skipped, |r| {
                    wireguard::WgPeer::from_lease(r.subnet, r.attrs, port).map_err(|e| r.skip(e))
                });
                b.reconcile(nl, &peers).await?
            }
        };
        skipped.append(&mut stats.skipped);
        stats.skipped = skipped;
        Ok(stats)
    }
}

/// The remotes of backend type `ty`, as that backend's peers. Every lease left out (another
/// backend type, or one `to_peer` refuses) goes to `skipped` in lease order, so the operator is
/// told about each node this one does not reach.
fn peers_of_type<P>(
    remotes: &[Remote<'_>],
    ty: &str,
    skipped: &mut Vec<PeerSkip>,
    to_peer: impl Fn(&Remote<'_>) -> Result<P, PeerSkip>,
) -> Vec<P> {
    remotes
        .iter()
        .filter_map(|r| {
            r.same_type(ty)
                .and_then(|()| to_peer(r))
                .map_err(|s| skipped.push(s))
                .ok()
        })
        .collect()
}

/// Applies a plan and attributes each failure with `owner`.
pub async fn apply_plan(
    nl: &Netlink,
    ops: &[Op],
    owner: impl Fn(&Op) -> Option<Ipv4Network>,
) -> ReconcileStats {
    let mut stats = ReconcileStats::default();
    if ops.is_empty() {
        return stats;
    }
    for (op, res) in ops.iter().zip(nl.apply_all(ops).await) {
        match res {
            Ok(()) => {
                stats.ops_applied += 1;
                stats.applied.push(op.clone());
            }
            Err(error) => stats.failures.push(PeerFailure {
                subnet: owner(op),
                op: op.clone(),
                error,
            }),
        }
    }
    stats
}

/// What a layer-3 device (udp's TUN, wireguard's link) needs to match: `mtu`, up, exactly the
/// one address `addr`, exactly the one `route` among the non-kernel routes through it. Pure;
/// `routes` are the main-table routes, `addrs` the device's addresses.
pub fn plan_l3_device(
    link: &Link,
    addrs: &[crate::netlink::Addr],
    routes: &[Route],
    mtu: u32,
    addr: Ipv4Network,
    route: Route,
) -> Vec<Op> {
    let mut ops = Vec::new();
    if link.mtu != mtu {
        ops.push(Op::LinkSetMtu {
            name: link.name.clone(),
            mtu,
        });
    }
    if !link.up {
        ops.push(Op::LinkSetUp {
            name: link.name.clone(),
        });
    }
    ops.extend(vxlan::plan_addresses(link.index, addrs, addr));
    let ours: Vec<Route> = routes
        .iter()
        .filter(|r| r.oif == Some(link.index) && r.protocol != Route::PROTO_KERNEL)
        .copied()
        .collect();
    ops.extend(diff_routes(&ours, &[route]).into_ops());
    ops
}

/// The address an overlay device holds: its subnet's network address as /32 (flannel's choice;
/// host-originated overlay traffic uses it as source).
pub fn device_addr(own_subnet: Ipv4Network) -> Ipv4Network {
    Ipv4Network::new(own_subnet.network(), 32).expect("/32 is a valid prefix")
}

/// The one route a layer-3 device owns: the whole overlay `network` into device `ifindex` (the
/// pod bridge's more specific route keeps local traffic local).
pub fn overlay_route(network: Ipv4Network, ifindex: u32) -> Route {
    Route {
        dst: route::canonical(network),
        gateway: None,
        oif: Some(ifindex),
        onlink: false,
        metric: 0,
        protocol: Route::PROTO_STATIC,
    }
}

/// The route part of a plan.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RouteDiff {
    /// Observed routes no desired route accounts for.
    pub delete: Vec<Route>,
    /// Desired routes that are missing or differ, in desired order.
    pub replace: Vec<Route>,
}

impl RouteDiff {
    /// The ops that carry the diff out: deletes first, then the replaces.
    pub fn into_ops(self) -> Vec<Op> {
        let deletes = self.delete.into_iter().map(Op::RouteDel);
        deletes
            .chain(self.replace.into_iter().map(Op::RouteReplace))
            .collect()
    }
}

/// Diffs the routes a backend owns (`observed`, already narrowed to its device and protocol)
/// against the ones it wants. Routes are keyed by (dst, metric) like the kernel keys them, so a
/// differing route with a desired key is replaced in place rather than deleted and re-added,
/// which would drop traffic in between.
pub fn diff_routes(observed: &[Route], desired: &[Route]) -> RouteDiff {
    let have: HashMap<(Ipv4Network, u32), &Route> =
        observed.iter().map(|r| ((r.dst, r.metric), r)).collect();
    let want: HashSet<(Ipv4Network, u32)> = desired.iter().map(|r| (r.dst, r.metric)).collect();
    RouteDiff {
        delete: observed
            .iter()
            .filter(|r| !want.contains(&(r.dst, r.metric)))
            .copied()
            .collect(),
        replace: desired
            .iter()
            .filter(|d| !have.get(&(d.dst, d.metric)).is_some_and(|o| o.same_path(d)))
            .copied()
            .collect(),
    }
}

/// The one log line of a device set-up that changed something: a restart on a device already
/// configured stays quiet.
pub(crate) fn log_setup(what: &str, device: &str, mtu: u32, ops: usize) {
    if ops > 0 {
        tracing::info!(device, mtu, ops, "{what} set up");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::netlink::{Addr, Fake};

    fn remote(subnet: &str, value: &str) -> Remote<'static> {
        // Leaked: a test's handful of leases lives as long as the test process anyway.
        let attrs = Box::leak(Box::new(LeaseAttrs::parse(value.as_bytes()).unwrap()));
        Remote {
            subnet: subnet.parse().unwrap(),
            subnet_v6: None,
            attrs,
        }
    }

    /// The device's own route is put in place; what the kernel made for the device (its
    /// address's route) and routes through other devices are not the plan's to touch.
    #[test]
    fn a_layer3_device_plan_touches_only_its_own_non_kernel_routes() {
        let tun = Link {
            index: 7,
            name: "tweed0".into(),
            mtu: 1472,
            kind: Some("tun".into()),
            up: true,
            ..Default::default()
        };
        let addr: Ipv4Network = "10.244.1.0/32".parse().unwrap();
        let addrs = [crate::netlink::Addr {
            ifindex: 7,
            net: addr,
        }];
        let want = Route {
            dst: "10.244.0.0/16".parse().unwrap(),
            gateway: None,
            oif: Some(7),
            onlink: false,
            metric: 0,
            protocol: Route::PROTO_STATIC,
        };
        let kernel = Route {
            dst: "10.244.1.0/32".parse().unwrap(),
            protocol: Route::PROTO_KERNEL,
            ..want
        };
        let elsewhere = Route {
            dst: "10.99.0.0/16".parse().unwrap(),
            oif: Some(3),
            ..want
        };
        let stray = Route {
            dst: "10.98.0.0/16".parse().unwrap(),
            ..want
        };
        let routes = [kernel, elsewhere, stray];
        assert_eq!(
            plan_l3_device(&tun, &addrs, &routes, 1472, addr, want),
            vec![Op::RouteDel(stray), Op::RouteReplace(want)]
        );
        let done = [kernel, elsewhere, want];
        assert_eq!(
            plan_l3_device(&tun, &addrs, &done, 1472, addr, want),
            vec![]
        );
    }

    #[test]
    fn leftovers_of_other_backends_are_removed_and_nothing_else() {
        let network: Ipv4Network = "10.244.0.0/16".parse().unwrap();
        let link = |index, name: &str, kind: Option<&str>| Link {
            index,
            name: name.into(),
            mtu: 1450,
            kind: kind.map(Into::into),
            up: true,
            ..Default::default()
        };
        let links = [
            link(1, "eth1", None),
            link(2, "tweed.1", Some("vxlan")),
            link(3, "tweed0", Some("tun")),
            link(4, "tweed.7", Some("vxlan")),
            link(5, "tweed.9", Some("bridge")),
        ];
        let route = |dst: &str, gw: &str, oif, protocol| Route {
            dst: dst.parse().unwrap(),
            gateway: Some(gw.parse().unwrap()),
            oif: Some(oif),
            onlink: false,
            metric: 0,
            protocol,
        };
        let hostgw = route("10.244.5.0/24", "192.168.56.12", 1, Route::PROTO_STATIC);
        let routes = [
            hostgw,
            // vxlan's own: gateway inside the overlay
            route("10.244.6.0/24", "10.244.6.0", 2, Route::PROTO_STATIC),
            // not tweed's: another protocol, outside the network, the whole network
            route("10.244.7.0/24", "192.168.56.13", 1, Route::PROTO_BOOT),
            route("10.9.0.0/24", "192.168.56.13", 1, Route::PROTO_STATIC),
            route("10.244.0.0/16", "192.168.56.13", 1, Route::PROTO_STATIC),
        ];
        let vxlan = Prepared::Vxlan(VxlanConfig {
            vni: 1,
            port: 0,
            local_ip: "192.168.56.11".parse().unwrap(),
            underlay_ifindex: 1,
            underlay_mtu: 1500,
            own_subnet: "10.244.1.0/24".parse().unwrap(),
            mac_file: PathBuf::from("/nonexistent"),
            mtu_override: None,
            direct_routing: None,
        });
        let del = |n: &str| Op::LinkDel { name: n.into() };
        assert_eq!(
            vxlan.leftovers(network, &links, &routes),
            vec![del("tweed0"), del("tweed.7"), Op::RouteDel(hostgw)]
        );
        let hg = Prepared::HostGw(HostGwConfig {
            network,
            own_subnet: "10.244.1.0/24".parse().unwrap(),
            local_ip: "192.168.56.11".parse().unwrap(),
            underlay_ifindex: 1,
            underlay_name: "eth1".into(),
            underlay_mtu: 1500,
        });
        assert_eq!(
            hg.leftovers(network, &links, &routes),
            vec![del("tweed.1"), del("tweed0"), del("tweed.7")]
        );
    }

    fn vxlan_on(underlay_mtu: u32, mtu_override: Option<u32>) -> Prepared {
        Prepared::Vxlan(VxlanConfig {
            vni: 1,
            port: 0,
            local_ip: "192.168.56.11".parse().unwrap(),
            underlay_ifindex: 1,
            underlay_mtu,
            own_subnet: "10.244.1.0/24".parse().unwrap(),
            mac_file: PathBuf::from("/nonexistent"),
            mtu_override,
            direct_routing: None,
        })
    }

    /// The device MTU as the vxlan backend derives it from the same config.
    fn vxlan_device_mtu(p: &Prepared) -> u32 {
        match p {
            Prepared::Vxlan(c) => c.mtu(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn pods_get_the_smaller_vxlan_device_mtu_only_when_the_ipv6_device_runs() {
        // v4 only: tweed.1's underlay - 50, as flannel.
        let v4 = vxlan_on(1500, None);
        assert_eq!(v4.pod_mtu(vxlan_device_mtu(&v4), false), 1450);
        // dual stack: tweed-v6.1's underlay - 70 is the smaller.
        assert_eq!(v4.pod_mtu(vxlan_device_mtu(&v4), true), 1430);
        // jumbo underlay: 9000 -> 8950 v4 only, 8930 dual.
        let jumbo = vxlan_on(9000, None);
        assert_eq!(jumbo.pod_mtu(vxlan_device_mtu(&jumbo), false), 8950);
        assert_eq!(jumbo.pod_mtu(vxlan_device_mtu(&jumbo), true), 8930);
        // An override wins, also above the IPv6 device's MTU and in dual stack.
        for (over, want) in [(1400, 1400), (1450, 1450), (1440, 1440)] {
            let p = vxlan_on(1500, Some(over));
            assert_eq!(
                p.pod_mtu(vxlan_device_mtu(&p), true),
                want,
                "override {over}"
            );
            assert_eq!(
                p.pod_mtu(vxlan_device_mtu(&p), false),
                want,
                "override {over}"
            );
        }
    }

    #[test]
    fn host_gw_and_the_other_backends_keep_their_device_mtu_in_dual_stack() {
        let hg = Prepared::HostGw(HostGwConfig {
            network: "10.244.0.0/16".parse().unwrap(),
            own_subnet: "10.244.1.0/24".parse().unwrap(),
            local_ip: "192.168.56.11".parse().unwrap(),
            underlay_ifindex: 1,
            underlay_name: "eth1".into(),
            underlay_mtu: 1500,
        });
        // host-gw: no encapsulation, IPv6 routed on the underlay itself.
        assert_eq!(hg.pod_mtu(1500, true), 1500);
        assert_eq!(hg.pod_mtu(1500, false), 1500);
        assert_eq!(hg.pod_mtu(9000, true), 9000);
    }

    #[test]
    fn the_pod_mtu_rule_itself() {
        use v6::{device_mtu6, pod_mtu};
        assert_eq!(device_mtu6(1500), 1430);
        assert_eq!(device_mtu6(9000), 8930);
        assert_eq!(
            device_mtu6(40),
            0,
            "saturates, the v4 check refuses such an underlay"
        );
        assert_eq!(pod_mtu(1450, false, None), 1450);
        assert_eq!(pod_mtu(1450, false, Some(1430)), 1430);
        assert_eq!(pod_mtu(1450, true, Some(1430)), 1450);
        // Never above the IPv4 device either.
        assert_eq!(pod_mtu(1400, false, Some(1430)), 1400);
    }

    #[tokio::test]
    async fn every_backend_is_prepared_and_driven_the_same_way() {
        let fake = Fake::new();
        let eth0 = fake.add_link("eth0", 1500, Some("02:00:00:00:00:01".parse().unwrap()));
        fake.add_addr(Addr {
            ifindex: eth0,
            net: "198.18.0.1/24".parse().unwrap(),
        });
        fake.add_route(Route {
            dst: "198.18.0.0/24".parse().unwrap(),
            gateway: None,
            oif: Some(eth0),
            onlink: false,
            metric: 0,
            protocol: Route::PROTO_KERNEL,
        });
        let nl = Netlink::from(fake.clone());
        let tmp = tempfile::tempdir().unwrap();
        let node = NodeContext {
            network: "10.244.0.0/16".parse().unwrap(),
            public_ip: "198.18.0.1".parse().unwrap(),
            iface: Iface {
                index: eth0,
                name: "eth0".into(),
                ip: "198.18.0.1".parse().unwrap(),
                mtu: 1500,
            },
            state_dir: tmp.path().to_path_buf(),
            udp_workers: 2,
            wg_key_file: None,
            wg_impl: WgImpl::Auto,
        };
        let own: Ipv4Network = "10.244.1.0/24".parse().unwrap();

        // host-gw: the lease says host-gw, no BackendData; only host-gw peers are served.
        let (mut p, attrs) = Prepared::new(&nl, &BackendConfig::HostGw, &node, own)
            .await
            .unwrap();
        assert_eq!(
            attrs.to_json(),
            r#"{"PublicIP":"198.18.0.1","BackendType":"host-gw"}"#
        );
        p.set_own_subnet(own);
        let mut dp = p.setup(&nl).await.unwrap();
        assert_eq!(dp.mtu(), 1500);
        let stats = dp
            .reconcile(
                &nl,
                &[
                    remote(
                        "10.244.2.0/24",
                        r#"{"PublicIP":"198.18.0.2","BackendType":"host-gw"}"#,
                    ),
                    remote("10.244.3.0/24", r#"{"PublicIP":"198.18.0.3"}"#),
                ],
            )
            .await
            .unwrap();
        assert_eq!(stats.ops_applied, 1);
        assert_eq!(stats.skipped.len(), 1);
        assert!(
            stats.skipped[0].reason.contains(r#""udp""#)
                && stats.skipped[0].reason.contains("host-gw"),
            "{}",
            stats.skipped[0]
        );

        // vxlan: the lease carries the VTEP MAC the device then has.
        let vx = BackendConfig::Vxlan {
            vni: 1,
            port: 8472,
            direct_routing: false,
            mtu: 0,
        };
        let (p, attrs) = Prepared::new(&nl, &vx, &node, own).await.unwrap();
        let dp = p.setup(&nl).await.unwrap();
        let DataPlane::Vxlan(b) = &dp else {
            panic!("{dp:?}")
        };
        assert!(attrs
            .backend_data
            .as_ref()
            .unwrap()
            .get()
            .contains(&b.vtep_mac().to_string()));
        assert_eq!(dp.mtu(), 1450);

        // udp: flannel's wire needs no BackendData.
        let (p, attrs) = Prepared::new(&nl, &BackendConfig::Udp { port: 8285, mtu: 0 }, &node, own)
            .await
            .unwrap();
        assert_eq!(
            attrs.to_json(),
            r#"{"PublicIP":"198.18.0.1","BackendType":"udp"}"#
        );
        let Prepared::Udp(c) = p else { panic!() };
        assert_eq!(
            (c.mtu(), c.port, c.local_ip, c.queues),
            (1472, 8285, node.iface.ip, 2)
        );

        // wireguard "Mode":"ipv6" is prepared with every --wireguard-impl (the userspace
        // path runs it on an IPv6 socket); a node without an IPv6 underlay address is refused
        // naming the interface, one with it is not.
        let json = r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"wireguard","Mode":"ipv6"}}"#;
        let net = tweed_config::NetworkConfig::parse(json).unwrap();
        let v4only = crate::ipv6::Ipv6Mode::V4Only {
            iface: "eth0".into(),
        };
        let dual = crate::ipv6::Ipv6Mode::DualStack {
            public_ipv6: "2001:db8::1".parse().unwrap(),
        };
        let mut prepared = None;
        for wg_impl in [
            wireguard::WgImpl::Auto,
            wireguard::WgImpl::Userspace,
            wireguard::WgImpl::Kernel,
        ] {
            let node = NodeContext {
                wg_impl,
                ..node.clone()
            };
            let (p, _) = Prepared::new(&nl, &net.backend, &node, own)
                .await
                .unwrap_or_else(|e| panic!("Mode ipv6 with {wg_impl:?}: {e}"));
            let err = p
                .check_ipv6_underlay(&net.backend, &v4only)
                .expect_err("no IPv6 underlay address");
            assert!(
                err.to_string().contains("eth0 has no global IPv6 address"),
                "{err}"
            );
            p.check_ipv6_underlay(&net.backend, &dual).unwrap();
            prepared = Some(p);
        }
        let p = prepared.expect("prepared");
        // Other modes run IPv4 only there, as before.
        let separate =
            tweed_config::NetworkConfig::parse(&json.replace(r#","Mode":"ipv6""#, "")).unwrap();
        p.check_ipv6_underlay(&separate.backend, &v4only).unwrap();
    }

    /// The lease's `BackendV6Data` depends on `Backend.Mode` only, not on the implementation;
    /// the implementation is chosen at each set-up from what was asked (`auto` kept, so a
    /// re-setup whose kernel probe fails falls back to userspace); a key rotation keeps the
    /// published lease's `PublicIPv6`.
    #[tokio::test]
    async fn wireguard_advertises_ipv6_by_mode_and_chooses_the_implementation_at_each_setup() {
        use wireguard::WgImpl;
        let node = |tmp: &std::path::Path, wg_impl: WgImpl| NodeContext {
            network: "10.244.0.0/16".parse().unwrap(),
            public_ip: "198.18.0.1".parse().unwrap(),
            iface: Iface {
                index: 1,
                name: "eth0".into(),
                ip: "198.18.0.1".parse().unwrap(),
                mtu: 1500,
            },
            state_dir: tmp.to_path_buf(),
            udp_workers: 1,
            wg_key_file: None,
            wg_impl,
        };
        let own: Ipv4Network = "10.244.1.0/24".parse().unwrap();
        let public_ipv6: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
        let net = |mode: &str| {
            tweed_config::NetworkConfig::parse(&format!(
                r#"{{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{{"Type":"wireguard","Mode":"{mode}","ListenPortV6":51999}}}}"#
            ))
            .unwrap()
        };
        // (kernel module?, wanted, Mode) -> chosen at set-up, BackendV6Data port (None: IPv4
        // only).
        type Case = (bool, WgImpl, &'static str, &'static str, Option<u16>);
        let cases: [Case; 11] = [
            (false, WgImpl::Auto, "auto", "userspace", Some(51820)),
            // ipv6's one device serves IPv6 peers on ListenPort, on either path.
            (false, WgImpl::Auto, "ipv6", "userspace", Some(51820)),
            (true, WgImpl::Userspace, "ipv6", "userspace", Some(51820)),
            (true, WgImpl::Kernel, "ipv6", "kernel", Some(51820)),
            (false, WgImpl::Auto, "ipv4", "userspace", Some(51820)),
            // separate's tweed-wg-v6 on ListenPortV6, which BackendV6Data names, whichever
            // path a set-up lands on (userspace's is a second TUN with an IPv6 socket).
            (false, WgImpl::Auto, "separate", "userspace", Some(51999)),
            (
                true,
                WgImpl::Userspace,
                "separate",
                "userspace",
                Some(51999),
            ),
            (true, WgImpl::Userspace, "ipv4", "userspace", Some(51820)),
            (true, WgImpl::Auto, "auto", "kernel", Some(51820)),
            (true, WgImpl::Auto, "separate", "kernel", Some(51999)),
            (true, WgImpl::Kernel, "separate", "kernel", Some(51999)),
        ];
        for (module, wanted, mode, chosen, port) in cases {
            let fake = if module {
                Fake::with_wireguard()
            } else {
                Fake::new()
            };
            let nl = Netlink::from(fake.clone());
            let tmp = tempfile::tempdir().unwrap();
            let cfg = net(mode);
            let (mut p, attrs) = Prepared::new(&nl, &cfg.backend, &node(tmp.path(), wanted), own)
                .await
                .unwrap();
            let Prepared::Wireguard(c) = &p else { panic!() };
            // What was asked is kept for every set-up, which chooses (WgBackend::setup_with).
            assert_eq!(c.implementation, wanted, "{mode} {wanted:?}");
            let expect_impl = if chosen == "kernel" {
                WgImpl::Kernel
            } else {
                WgImpl::Userspace
            };
            let got = wireguard::choose_implementation(&nl, c.implementation).await;
            assert_eq!(got.unwrap(), expect_impl, "{mode} {wanted:?}");
            if module && wanted == WgImpl::Auto {
                // A re-setup after the module went away: auto falls back to userspace.
                fake.set_wireguard(false);
                let again = wireguard::choose_implementation(&nl, c.implementation).await;
                assert_eq!(again.unwrap(), WgImpl::Userspace);
            }
            let key = c.public_key();
            // The probe left no link behind.
            let links = nl.links().await.unwrap();
            assert!(links.iter().all(|l| l.name == "lo"), "{links:?}");
            let got = p.with_ipv6(attrs, public_ipv6, cfg.ipv6.as_ref().unwrap(), &cfg.backend);
            let a = got.unwrap();
            assert_eq!(a.public_ipv6, Some(public_ipv6));
            let v6 = a.backend_v6_data.as_ref().map(|d| d.get().to_string());
            assert_eq!(
                v6,
                port.map(|port| format!(r#"{{"PublicKey":"{key}","Port":{port}}}"#)),
                "{mode} {chosen}"
            );
            let Prepared::Wireguard(c) = &mut p else {
                panic!()
            };
            assert_eq!(c.dual.is_some(), port.is_some());
            // The subnet comes with the lease; then the dual plan runs.
            assert!(c.dual_local().is_none());
            p.set_own_subnet_v6(Some("fd00:10:244:1::/64".parse().unwrap()));
            let Prepared::Wireguard(c) = &p else { panic!() };
            if port.is_some() {
                let l = c.dual_local().expect("dual");
                // auto plans as ipv4 on both paths: kernel and userspace nodes mix in one
                // cluster, and a userspace node listens on IPv4 only.
                let planned = match mode {
                    "separate" => tweed_config::WireguardMode::Separate,
                    "ipv6" => tweed_config::WireguardMode::Ipv6,
                    _ => tweed_config::WireguardMode::Ipv4,
                };
                assert_eq!(l.mode, planned, "{mode} {chosen}");
                assert_eq!(l.separate(), mode == "separate");
                assert_eq!(c.lease_attrs().to_json(), a.to_json());
            }
            // PublicIPv6 moves at run time (published as follow_public_ipv6 does), then the
            // key rotates: the rotated lease keeps the new address in every mode, separate
            // included, and both key fields name the new key on their old ports.
            let moved: std::net::Ipv6Addr = "2001:db8::99".parse().unwrap();
            p.set_public_ipv6(moved);
            let published = crate::ipv6::with_public_ipv6(a.clone(), moved);
            let Prepared::Wireguard(c) = &mut p else {
                panic!()
            };
            if let Some(d) = &c.dual {
                assert_eq!(d.public_ipv6, moved, "{mode} {chosen}");
                assert_eq!(c.dual_local().unwrap().v6.unwrap().public_ipv6, moved);
            }
            c.private_key = wireguard::PrivateKey::generate();
            let new_key = c.public_key();
            assert_ne!(new_key, key);
            let r = c.with_key(&published);
            assert_eq!(r.public_ipv6, Some(moved), "{mode} {chosen}");
            assert_eq!(
                r.backend_data.as_ref().map(|d| d.get().to_string()),
                Some(format!(r#"{{"PublicKey":"{new_key}","Port":51820}}"#))
            );
            assert_eq!(
                r.backend_v6_data.as_ref().map(|d| d.get().to_string()),
                port.map(|port| format!(r#"{{"PublicKey":"{new_key}","Port":{port}}}"#)),
                "{mode} {chosen}"
            );
            assert_eq!(r.public_ip, a.public_ip);
            assert_eq!(r.backend_type, "wireguard");
        }
    }

    /// `separate`'s two devices cannot share a port: refused on either path (both build the
    /// IPv6 device), naming the field.
    #[tokio::test]
    async fn wireguard_separate_refuses_listen_port_v6_equal_to_listen_port() {
        use wireguard::WgImpl;
        let cfg = tweed_config::NetworkConfig::parse(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"wireguard","ListenPort":51820,"ListenPortV6":51820}}"#,
        )
        .unwrap();
        for wanted in [WgImpl::Kernel, WgImpl::Userspace, WgImpl::Auto] {
            let tmp = tempfile::tempdir().unwrap();
            let node = NodeContext {
                network: "10.244.0.0/16".parse().unwrap(),
                public_ip: "198.18.0.1".parse().unwrap(),
                iface: Iface {
                    index: 1,
                    name: "eth0".into(),
                    ip: "198.18.0.1".parse().unwrap(),
                    mtu: 1500,
                },
                state_dir: tmp.path().to_path_buf(),
                udp_workers: 1,
                wg_key_file: None,
                wg_impl: wanted,
            };
            let nl = Netlink::from(Fake::with_wireguard());
            let (mut p, attrs) =
                Prepared::new(&nl, &cfg.backend, &node, "10.244.1.0/24".parse().unwrap())
                    .await
                    .unwrap();
            let got = p.with_ipv6(
                attrs,
                "2001:db8::1".parse().unwrap(),
                cfg.ipv6.as_ref().unwrap(),
                &cfg.backend,
            );
            let msg = got.expect_err(&format!("{wanted:?} accepted")).to_string();
            assert!(msg.contains("Backend.ListenPortV6 51820"), "{msg}");
            assert!(msg.contains("tweed-wg-v6"), "{msg}");
            // Refused at start too, also on a node starting IPv4 only (it could turn dual at
            // run time); a network without an IPv6 half never builds the IPv6 device.
            let v4only = crate::ipv6::Ipv6Mode::V4Only {
                iface: "eth0".into(),
            };
            let dual = crate::ipv6::Ipv6Mode::DualStack {
                public_ipv6: "2001:db8::1".parse().unwrap(),
            };
            for ipv6 in [&v4only, &dual] {
                let msg = p
                    .check_ipv6_underlay(&cfg.backend, ipv6)
                    .expect_err(&format!("{wanted:?} {ipv6:?} accepted at start"))
                    .to_string();
                assert!(msg.contains("Backend.ListenPortV6 51820"), "{msg}");
            }
            p.check_ipv6_underlay(&cfg.backend, &crate::ipv6::Ipv6Mode::Off)
                .unwrap();
        }
    }

    #[test]
    fn route_diff_replaces_in_place_and_deletes_strays() {
        let net = |s: &str| s.parse::<Ipv4Network>().unwrap();
        let gw = |s: &str| s.parse().unwrap();
        let keep = Route::onlink(net("10.244.1.0/24"), gw("10.244.1.0"), 5);
        let changed_old = Route::onlink(net("10.244.2.0/24"), gw("10.244.2.0"), 5);
        let changed_new = Route::via(net("10.244.2.0/24"), gw("198.18.0.2"), Some(5));
        let stray = Route::onlink(net("10.244.3.0/24"), gw("10.244.3.0"), 5);
        let other_metric = Route {
            metric: 100,
            ..keep
        };
        let new = Route::onlink(net("10.244.4.0/24"), gw("10.244.4.0"), 5);
        let d = diff_routes(
            &[keep, changed_old, stray, other_metric],
            &[keep, changed_new, new],
        );
        assert_eq!(d.delete, vec![stray, other_metric]);
        assert_eq!(d.replace, vec![changed_new, new]);
        assert_eq!(diff_routes(&[keep], &[keep]), RouteDiff::default());
    }
}
