//! The wireguard backend: flannel's `"Backend":{"Type":"wireguard"}`, so tweed and flannel nodes
//! in one network reach each other encrypted.
//!
//! Each node has one key pair ([`key`]); its lease carries `{"PublicKey","Port"}`; each peer
//! lease becomes a WireGuard peer with the peer's subnet as allowed IPs and its
//! `PublicIP:Port` as endpoint ([`plan`]). The device holds the subnet's network address as
//! /32, one route for the whole network, and MTU = MTU − 80.

pub mod dual;
pub mod kernel;
pub mod key;
pub mod plan;
pub mod userspace;
pub mod v6only;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ipnetwork::Ipv4Network;
use std::net::Ipv4Addr;

pub use key::{KeyError, PrivateKey, PublicKey};
pub use plan::{WgOp, WgPeer};

/// The device's name (flannel's is `flannel-wg`; a node switching from flannel gets a device of
/// its own, and flannel's is removed as a foreign backend's leftover).
pub const DEVICE: &str = "tweed-wg";

/// Which WireGuard runs the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WgImpl {
    /// The kernel's when it has the module, else the userspace one.
    #[default]
    Auto,
    Kernel,
    Userspace,
}

impl WgImpl {
    /// As `--wireguard-impl` spells it.
    pub fn name(self) -> &'static str {
        match self {
            WgImpl::Auto => "auto",
            WgImpl::Kernel => "kernel",
            WgImpl::Userspace => "userspace",
        }
    }
}

impl std::str::FromStr for WgImpl {
    type Err = String;
    fn from_str(s: &str) -> Result<WgImpl, String> {
        match s {
            "auto" => Ok(WgImpl::Auto),
            "kernel" => Ok(WgImpl::Kernel),
            "userspace" => Ok(WgImpl::Userspace),
            other => Err(format!("{other:?} is not one of auto, kernel, userspace")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WgError {
    #[error(transparent)]
    Key(#[from] KeyError),

    #[error(
        "wireguard: MTU {mtu} left for {DEVICE} is below the IPv4 minimum of 68 \
         (configured/underlay MTU {base}, WireGuard needs 80 bytes of it)"
    )]
    Mtu { mtu: u32, base: u32 },

    /// An IPv6-only network's device carries IPv6 only, whose minimum MTU is 1280.
    #[error(
        "wireguard: MTU {mtu} left for {DEVICE} is below the IPv6 minimum of 1280 \
         (configured/underlay MTU {base}, WireGuard needs 80 bytes of it)"
    )]
    Mtu6 { mtu: u32, base: u32 },

    #[error("wireguard: the {0} implementation is not available on this host: {1}")]
    Unavailable(&'static str, String),

    /// The userspace workers were stopped to start again on other sockets, and the new ones
    /// did not start: `tweed-wg` carries nothing until the backend is set up again.
    #[error(
        "wireguard: starting {DEVICE}'s userspace workers again on {family} sockets: {source}; \
         the old ones are stopped, so the backend is set up again"
    )]
    WorkersStopped {
        family: &'static str,
        #[source]
        source: Box<crate::backend::UdpError>,
    },

    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),

    #[error("wireguard: setting up {device}: {source}")]
    Device {
        device: &'static str,
        #[source]
        source: crate::netlink::NetlinkError,
    },

    #[error("wireguard: {DEVICE} or {device_v6} no longer exists; the backend must be set up again", device_v6 = dual::DEVICE_V6)]
    DeviceGone,

    /// `separate`'s two devices cannot share a port.
    #[error(
        "wireguard: Backend.ListenPortV6 {port} is Backend.ListenPort too; Mode \"separate\" \
         runs the IPv6 device {device_v6} on a port of its own: set another Backend.ListenPortV6",
        device_v6 = dual::DEVICE_V6
    )]
    SamePortV6 { port: u16 },

    /// `ipv6` mode reaches every peer over the IPv6 underlay: a node without an address there
    /// could reach none, so it does not start rather than run cut off.
    #[error(
        "wireguard: Backend.Mode \"ipv6\" reaches every peer over the IPv6 underlay, but {iface} \
         has no global IPv6 address and no --public-ipv6 was given: add one, or use Mode \
         \"separate\", \"auto\" or \"ipv4\""
    )]
    Ipv6ModeWithoutUnderlay { iface: String },
}

/// Everything the backend needs, fixed before the lease is acquired (the lease carries the
/// public key and port).
#[derive(Debug, Clone)]
pub struct WgConfig {
    pub network: Ipv4Network,
    pub own_subnet: Ipv4Network,
    /// The underlay interface's address: the UDP socket binds to it.
    pub local_ip: Ipv4Addr,
    /// The lease's PublicIP.
    pub public_ip: Ipv4Addr,
    pub listen_port: u16,
    pub underlay_mtu: u32,
    /// The net-conf `MTU`; 0 is the underlay's.
    pub mtu_base: u32,
    pub psk: Option<[u8; 32]>,
    pub keepalive: u16,
    pub key_path: PathBuf,
    pub private_key: PrivateKey,
    pub implementation: WgImpl,
    /// Userspace: worker threads (the udp backend's `--udp-workers`).
    pub queues: usize,
    /// The IPv6 half this node serves (dual stack, every `Mode` on either path); `None`:
    /// IPv4 only.
    /// Boxed: most nodes run IPv4 only, and the data plane enum holds this config.
    pub dual: Option<Box<WgDual>>,
}

/// A dual-stack node's IPv6 half, fixed before the lease is written (its `BackendV6Data`
/// says the same), the subnet once the lease is known, `public_ipv6` following the underlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgDual {
    pub mode: tweed_config::WireguardMode,
    pub listen_port_v6: u16,
    pub ipv6: tweed_config::Ipv6Config,
    pub public_ipv6: std::net::Ipv6Addr,
    /// Our lease's IPv6 subnet; `None` until the lease is known, or when it has no IPv6 half.
    pub own_subnet: Option<ipnetwork::Ipv6Network>,
}

impl WgConfig {
    /// The device's MTU and the pods' (subnet.env's).
    pub fn mtu(&self) -> u32 {
        plan::device_mtu(self.mtu_base, self.underlay_mtu)
    }

    pub fn check_mtu(&self) -> Result<(), WgError> {
        if self.mtu() < 68 {
            return Err(WgError::Mtu {
                mtu: self.mtu(),
                base: if self.mtu_base != 0 {
                    self.mtu_base
                } else {
                    self.underlay_mtu
                },
            });
        }
        Ok(())
    }

    pub fn public_key(&self) -> PublicKey {
        self.private_key.public()
    }

    pub fn local(&self) -> plan::Local {
        plan::Local {
            network: self.network,
            own_subnet: self.own_subnet,
            public_ip: self.public_ip,
            public_key: self.public_key(),
            psk: self.psk,
            keepalive: self.keepalive,
        }
    }

    /// This node for the dual-stack plan, once it serves an IPv6 half and knows its subnet.
    ///
    /// `auto` plans as `ipv4` on both paths: the userspace path's only socket is IPv4, and in
    /// one cluster (`--wireguard-impl auto`) kernel and userspace nodes mix, with nothing in
    /// the lease telling which is which. Had a kernel node picked a peer's IPv6 endpoint by
    /// flannel's rule ([`dual::auto_endpoint`]), a userspace peer would never hear it, and that
    /// one endpoint carries the peer's IPv4 pods too. A flannel kernel peer in `auto` may
    /// still pick our IPv6 endpoint (docs/wireguard.md, "Limits").
    pub fn dual_local(&self) -> Option<dual::DualLocal> {
        let d = self.dual.as_ref()?;
        let own_subnet = d.own_subnet?;
        let mode = match d.mode {
            tweed_config::WireguardMode::Auto => tweed_config::WireguardMode::Ipv4,
            m => m,
        };
        Some(dual::DualLocal {
            mode,
            v4: self.local(),
            v6: Some(dual::Local6 {
                network: d.ipv6.network,
                own_subnet,
                public_ipv6: d.public_ipv6,
            }),
            listen_port: self.listen_port,
            listen_port_v6: d.listen_port_v6,
            mtu: self.mtu(),
        })
    }

    /// This node's lease value: `BackendData`, and with an IPv6 half `PublicIPv6` and
    /// `BackendV6Data` (the port IPv6 peers are served on, [`dual::v6_port`]).
    pub fn lease_attrs(&self) -> tweed_config::LeaseAttrs {
        let mut a = plan::lease_attrs(self.public_ip, &self.public_key(), self.listen_port);
        if let Some(d) = &self.dual {
            a.public_ipv6 = Some(d.public_ipv6);
            a.backend_v6_data = Some(plan::backend_data(
                &self.public_key(),
                dual::v6_port(d.mode, self.listen_port, d.listen_port_v6),
            ));
        }
        a
    }

    /// `current` (our lease as published) under this config's key: `BackendData` rebuilt,
    /// a `BackendV6Data` there renamed to the key on the port it names; everything else kept.
    /// A key rotation publishes this rather than [`lease_attrs`](Self::lease_attrs): the
    /// published lease may hold what the config does not, such as a `PublicIPv6` followed at
    /// run time, or the `PublicIPv6` of a node that carries no IPv6 (no [`WgDual`]).
    pub fn with_key(&self, current: &tweed_config::LeaseAttrs) -> tweed_config::LeaseAttrs {
        let key = self.public_key();
        let mut a = current.clone();
        a.backend_data = Some(plan::backend_data(&key, self.listen_port));
        if let Some(v6) = current.backend_v6_data.as_deref() {
            let ours = match &self.dual {
                Some(d) => dual::v6_port(d.mode, self.listen_port, d.listen_port_v6),
                None => self.listen_port,
            };
            let port = plan::read_backend_data(Some(v6), "BackendV6Data", ours)
                .map_or(ours, |(_, port)| port);
            a.backend_v6_data = Some(plan::backend_data(&key, port));
        }
        a
    }

    /// Our `PublicIPv6` moved: the dual plan reads the new one (our own entry, `auto`'s test).
    pub fn set_public_ipv6(&mut self, to: std::net::Ipv6Addr) {
        if let Some(d) = self.dual.as_mut() {
            d.public_ipv6 = to;
        }
    }

    pub fn link_spec(&self) -> plan::LinkSpec {
        plan::LinkSpec {
            network: self.network,
            own_subnet: self.own_subnet,
            mtu: self.mtu(),
        }
    }
}

/// The running wireguard data plane: the kernel's device, or the udp backend's workers.
pub struct WgBackend {
    cfg: WgConfig,
    plane: Plane,
    /// The IPv6 halves the last dual plan left out: logged when this changes, not at every
    /// reconcile.
    skipped_v6: Vec<dual::Skip6>,
    /// `separate`: the lease (IPv4 subnet) of each `tweed-wg-v6` entry's key, from the last
    /// plan, so the IPv6 device's figures are listed under their peer (either path).
    lease_of6: std::collections::BTreeMap<PublicKey, Ipv4Network>,
}

enum Plane {
    Userspace(Userspace),
    Kernel(KernelPlane),
}

/// On this path the udp backend's workers carry the packets (TUN device [`DEVICE`], the listen
/// port), sealing and opening each datagram with the [`userspace::WgTable`] published next to
/// their routing table.
struct Userspace {
    udp: crate::backend::UdpBackend,
    table: Arc<userspace::WgTable>,
    /// The device as last published; the plan against it decides whether anything changes.
    applied: plan::DeviceSpec,
    published: bool,
    /// `separate`'s IPv6 device, while this node runs one.
    v6: Option<Box<UserDev6>>,
    /// What the set-up applied, both devices'.
    setup_ops: Vec<crate::netlink::Op>,
}

/// `separate`'s IPv6 device [`dual::DEVICE_V6`] on the userspace path: the same engine as
/// `tweed-wg` (the udp backend's workers sealing with a [`userspace::WgTable`]), instantiated a
/// second time with a TUN device of its own and an IPv6-only socket on `ListenPortV6`. Its
/// table holds the node's key and the peers' IPv6 halves at their IPv6 endpoints; the workers'
/// peer table routes each IPv6 subnet to the node's IPv4 endpoint, the key the WireGuard
/// table files the entry under ([`dual::DualPeerSpec::node`]).
struct UserDev6 {
    udp: crate::backend::UdpBackend,
    table: Arc<userspace::WgTable>,
    applied: plan::DeviceSpec,
    published: bool,
    /// Whether the device's IPv6 address and route were checked since the last resync.
    link_checked: bool,
    /// What its set-up applied (the TUN device's and the IPv6 address and route).
    setup_ops: Vec<crate::netlink::Op>,
}

/// The kernel's `wireguard` link [`DEVICE`], configured over generic netlink. Every
/// reconcile reads the device back and writes only the difference, so what another tool (or
/// the kernel's roaming) changed is put back and an unchanged device sees no write at all.
struct KernelPlane {
    ifindex: u32,
    /// Blocking socket: used on the blocking pool only.
    genl: SharedGenl,
    /// What the last reconcile asked for: the periodic refresh holds the device to it.
    desired: Option<plan::DeviceSpec>,
    /// Per-peer figures from the last read-back.
    stats: Vec<PeerStats>,
    /// Whether both devices' links (and `tweed-wg-v6`'s presence or absence) were checked
    /// since the last resync or own-subnet change.
    device_checked: bool,
    setup_ops: Vec<crate::netlink::Op>,
    /// `separate`'s IPv6 device, while this node runs one.
    v6: Option<KernelDev6>,
}

/// The kernel's `wireguard` link [`dual::DEVICE_V6`] (`Mode: separate`, dual stack).
struct KernelDev6 {
    ifindex: u32,
    desired: Option<plan::DeviceSpec>,
    /// Per-peer figures from the last read-back.
    stats: Vec<PeerStats>,
}

type SharedGenl = Arc<Mutex<Box<dyn kernel::WgGenl + Send>>>;

impl std::fmt::Debug for WgBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let peers = match &self.plane {
            Plane::Userspace(u) => u.applied.peers.len(),
            Plane::Kernel(k) => k.desired.as_ref().map_or(0, |d| d.peers.len()),
        };
        f.debug_struct("WgBackend")
            .field("implementation", &self.implementation())
            .field("peers", &peers)
            .finish()
    }
}

/// Opens the generic netlink side of the kernel path (the real socket, or a fake in tests).
pub type GenlOpener =
    Box<dyn FnOnce() -> Result<Box<dyn kernel::WgGenl + Send>, kernel::KernelError> + Send>;

impl WgBackend {
    /// Chooses the implementation (`auto`: the kernel's when a `wireguard` link can be created)
    /// and sets the device up; idempotent, so a restart finds its device and writes nothing.
    pub async fn setup(
        nl: &crate::netlink::Netlink,
        cfg: WgConfig,
    ) -> Result<WgBackend, crate::backend::BackendError> {
        let open: GenlOpener = Box::new(|| {
            kernel::RealGenl::open().map(|g| Box::new(g) as Box<dyn kernel::WgGenl + Send>)
        });
        WgBackend::setup_with(nl, cfg, open).await
    }

    /// As [`setup`](Self::setup), the kernel path's generic netlink opened by `open` (called
    /// only when the kernel runs). The socket is opened on the calling thread, so it lives in
    /// the agent's namespace, as the `Netlink` handle does for `tweedd`.
    pub async fn setup_with(
        nl: &crate::netlink::Netlink,
        cfg: WgConfig,
        open: GenlOpener,
    ) -> Result<WgBackend, crate::backend::BackendError> {
        cfg.check_mtu()?;
        let chosen = choose_implementation(nl, cfg.implementation).await?;
        let plane = match chosen {
            WgImpl::Kernel => Plane::Kernel(setup_kernel(nl, &cfg, open).await?),
            _ => Plane::Userspace(setup_userspace(nl, &cfg).await?),
        };
        let b = WgBackend {
            cfg,
            plane,
            skipped_v6: Vec::new(),
            lease_of6: Default::default(),
        };
        tracing::info!(
            implementation = b.implementation(),
            device = DEVICE,
            port = b.cfg.listen_port,
            public_key = %b.cfg.public_key(),
            mtu = b.cfg.mtu(),
            ipv6 = b.carries_v6(),
            device_v6 = b.ifindex_v6().map(|_| dual::DEVICE_V6),
            "wireguard: data plane running"
        );
        Ok(b)
    }

    /// Uses `key` from the next [`reconcile`](Self::reconcile) on: the device op it plans
    /// sets the new key (every peer handshakes again).
    pub fn set_private_key(&mut self, key: PrivateKey) {
        self.cfg.private_key = key;
    }

    pub fn public_key(&self) -> PublicKey {
        self.cfg.public_key()
    }

    pub fn config_port(&self) -> u16 {
        self.cfg.listen_port
    }

    /// This node for the dual-stack plan when it serves an IPv6 half (see [`WgConfig::dual`]).
    pub fn dual_local(&self) -> Option<dual::DualLocal> {
        self.cfg.dual_local()
    }

    /// The network's IPv6 half, when this node serves one.
    pub fn ipv6_config(&self) -> Option<&tweed_config::Ipv6Config> {
        self.cfg.dual.as_ref().map(|d| &d.ipv6)
    }

    /// Our lease's IPv6 subnet changed: the next reconcile plans for it, links included (the
    /// kernel path's `tweed-wg-v6` takes the new /128, or goes when the IPv6 half did).
    /// `Mode: ipv6` plans peers at IPv6 endpoints only with our IPv6 half: the change is logged
    /// here, and the userspace workers' sockets follow at the next reconcile
    /// ([`socket_change`]); the kernel device listens on both families and needs nothing.
    pub fn set_own_subnet_v6(&mut self, subnet: Option<ipnetwork::Ipv6Network>) {
        let before = SocketPlan::of(&self.cfg);
        if let Some(d) = self.cfg.dual.as_mut() {
            if d.own_subnet != subnet {
                d.own_subnet = subnet;
                let after = SocketPlan::of(&self.cfg);
                if after.v6_socket != before.v6_socket {
                    tracing::info!(
                        implementation = self.implementation(),
                        "wireguard: our lease {} its IPv6 half: Mode ipv6 plans peers at {} \
                         endpoints now ({})",
                        if subnet.is_some() { "gained" } else { "lost" },
                        after.family(),
                        match self.plane {
                            Plane::Kernel(_) => "the kernel device listens on both families",
                            Plane::Userspace(_) =>
                                "tweed-wg's workers start again on sockets of that family",
                        }
                    );
                }
                match &mut self.plane {
                    Plane::Kernel(k) => k.device_checked = false,
                    Plane::Userspace(u) => {
                        if let Some(d) = u.v6.as_mut() {
                            d.link_checked = false;
                        }
                    }
                }
            }
        }
    }

    /// This node turns dual stack at run time (it started IPv4 only, or turned so): the IPv6
    /// half its lease is about to advertise (`Prepared::with_ipv6`). Nothing changes in the
    /// plans until our lease's IPv6 subnet is known ([`set_own_subnet_v6`](Self::set_own_subnet_v6)):
    /// the subnet already learnt is kept, so a repeated call plans nothing new.
    pub fn set_dual(&mut self, dual: &WgDual) {
        let own_subnet = self.cfg.dual.as_ref().and_then(|d| d.own_subnet);
        self.cfg.dual = Some(Box::new(WgDual {
            own_subnet,
            ..dual.clone()
        }));
    }

    /// Our `PublicIPv6` moved ([`WgConfig::set_public_ipv6`]).
    pub fn set_public_ipv6(&mut self, to: std::net::Ipv6Addr) {
        self.cfg.set_public_ipv6(to);
    }

    /// Whether this data plane carries IPv6 pods: its device then needs the node's IPv6 subnet
    /// address and the `IPv6Network` route ([`crate::backend::v6::V6Plane`] sets them).
    pub fn carries_v6(&self) -> bool {
        self.cfg.dual_local().is_some_and(|l| !l.separate())
    }

    /// `separate`'s IPv6 device `tweed-wg-v6`, while the kernel path runs one: it carries
    /// the IPv6 pods (its address, route and peers are the backend's own).
    pub fn ifindex_v6(&self) -> Option<u32> {
        match &self.plane {
            Plane::Kernel(k) => k.v6.as_ref().map(|d| d.ifindex),
            Plane::Userspace(u) => u.v6.as_ref().map(|d| d.udp.ifindex()),
        }
    }

    /// Which WireGuard carries the traffic: `kernel` or `userspace`.
    pub fn implementation(&self) -> &'static str {
        match self.plane {
            Plane::Userspace(_) => "userspace",
            Plane::Kernel(_) => "kernel",
        }
    }

    pub fn mtu(&self) -> u32 {
        self.cfg.mtu()
    }

    pub fn ifindex(&self) -> u32 {
        match &self.plane {
            Plane::Userspace(u) => u.udp.ifindex(),
            Plane::Kernel(k) => k.ifindex,
        }
    }

    /// Netlink ops the kernel path's set-up applied (none when the device was already right).
    pub fn setup_ops(&self) -> &[crate::netlink::Op] {
        match &self.plane {
            Plane::Userspace(u) => &u.setup_ops,
            Plane::Kernel(k) => &k.setup_ops,
        }
    }

    pub fn resync(&mut self) {
        match &mut self.plane {
            Plane::Userspace(u) => {
                u.udp.resync();
                if let Some(d) = u.v6.as_mut() {
                    d.udp.resync();
                    d.link_checked = false;
                }
            }
            Plane::Kernel(k) => k.device_checked = false,
        }
    }

    /// Userspace: stops the workers. Kernel: nothing runs in the agent; the device stays.
    pub async fn stop(&mut self) {
        if let Plane::Userspace(u) = &mut self.plane {
            u.udp.stop().await;
            if let Some(d) = u.v6.as_mut() {
                d.udp.stop().await;
            }
        }
    }

    /// The userspace workers' counters, both devices' summed (the kernel path has none of
    /// these: zeros).
    pub fn stats(&self) -> crate::backend::udp::io::Stats {
        match &self.plane {
            Plane::Userspace(u) => {
                let mut s = u.udp.stats();
                if let Some(d) = &u.v6 {
                    s.add(&d.udp.stats());
                }
                s
            }
            Plane::Kernel(_) => Default::default(),
        }
    }

    /// `tweed-wg-v6`'s own workers' counters, while the userspace path runs it.
    pub fn stats_v6(&self) -> Option<crate::backend::udp::io::Stats> {
        match &self.plane {
            Plane::Userspace(u) => u.v6.as_ref().map(|d| d.udp.stats()),
            Plane::Kernel(_) => None,
        }
    }

    /// Per peer: public key, endpoint, subnet, time since the last handshake, bytes out and in
    /// (kernel: as of the last read-back, see [`refresh`](Self::refresh)).
    pub fn peer_stats(&self) -> Vec<PeerStats> {
        let listed6 = |s: &PeerStats| PeerStats {
            lease_subnet: self.lease_of6.get(&s.public_key).copied(),
            ..s.clone()
        };
        match &self.plane {
            Plane::Userspace(u) => {
                let mut all = userspace_stats(&u.table, DEVICE);
                if let Some(d) = &u.v6 {
                    all.extend(
                        userspace_stats(&d.table, dual::DEVICE_V6)
                            .iter()
                            .map(listed6),
                    );
                }
                all
            }
            Plane::Kernel(k) => {
                let mut all = k.stats.clone();
                if let Some(d) = &k.v6 {
                    all.extend(d.stats.iter().map(listed6));
                }
                all
            }
        }
    }

    /// Kernel: reads the device again for fresh figures and, in the same pass, sets back
    /// whatever drifted from the last reconcile's plan (an endpoint the kernel roamed to
    /// another source: flannel#1770). Writes nothing when nothing drifted. Userspace: nothing
    /// to do (its figures are live and it never roams).
    pub async fn refresh(&mut self) -> Result<usize, WgError> {
        let Plane::Kernel(k) = &mut self.plane else {
            return Ok(0);
        };
        let Some(desired) = k.desired.clone() else {
            return Ok(0);
        };
        let (mut ops, stats) = genl_reconcile(k.genl.clone(), DEVICE, desired).await?;
        k.stats = stats;
        // The IPv6 device's peers roam the same way, and have figures of their own.
        if let Some(d) = k.v6.as_mut() {
            if let Some(desired6) = d.desired.clone() {
                let (n, st) = genl_reconcile(k.genl.clone(), dual::DEVICE_V6, desired6).await?;
                ops += n;
                d.stats = st;
            }
        }
        Ok(ops)
    }

    /// Makes the device hold exactly the peers `peers` call for. Userspace: publishes a new
    /// table to the workers only when the plan has ops. Kernel: writes only the plan's ops
    /// against the device as read back now (none when it already matches).
    pub async fn reconcile(
        &mut self,
        nl: &crate::netlink::Netlink,
        peers: &[WgPeer],
    ) -> Result<crate::backend::ReconcileStats, crate::backend::BackendError> {
        let (specs, skipped) = plan::desired_peers(&self.cfg.local(), peers);
        self.reconcile_specs(nl, specs, skipped, &Nodes::new(), None, &Nodes::new())
            .await
    }

    /// [`reconcile`](Self::reconcile) for a node serving an IPv6 half: each peer's allowed IPs
    /// are both its subnets (its IPv6 half when usable, [`dual::plan_dual`]); what is left out
    /// is logged. `separate`: `tweed-wg` gets the IPv4 halves and `tweed-wg-v6` the IPv6
    /// halves, each with its own plan (kernel: against its own read-back; userspace: against
    /// what its workers were last given).
    pub async fn reconcile_dual(
        &mut self,
        nl: &crate::netlink::Netlink,
        peers: &[dual::DualPeer],
    ) -> Result<crate::backend::ReconcileStats, crate::backend::BackendError> {
        let Some(local) = self.cfg.dual_local() else {
            let v4: Vec<WgPeer> = peers.iter().map(|p| p.v4).collect();
            return self.reconcile(nl, &v4).await;
        };
        let plan = dual::plan_dual(&local, peers);
        // An operator must see why a peer's IPv6 pods are unreachable (its IPv4 half still
        // runs): once per change, at warn.
        if plan.skipped_v6 != self.skipped_v6 {
            for s in &plan.skipped_v6 {
                tracing::warn!(
                    peer = %s.v4_subnet,
                    "wireguard: the peer's IPv6 half is left out (IPv6 pods there unreachable): {}",
                    s.reason
                );
            }
            self.skipped_v6 = plan.skipped_v6.clone();
        }
        self.lease_of6 = peers
            .iter()
            .filter_map(|p| Some((p.v6.as_ref().ok()?.public_key, p.v4.subnet)))
            .collect();
        let key = *self.cfg.private_key.bytes();
        let nodes_of = |d: &dual::DevicePlan| -> Nodes {
            d.peers.iter().map(|p| (p.public_key, p.node)).collect()
        };
        let dev = plan.devices.iter().find(|d| d.name == DEVICE);
        let specs = dev
            .map(|d| dual::device_spec(d, key).peers)
            .unwrap_or_default();
        let nodes = dev.map(nodes_of).unwrap_or_default();
        let dev6 = plan.devices.iter().find(|d| d.name == dual::DEVICE_V6);
        let v6 = dev6.map(|d| dual::device_spec(d, key));
        let nodes6 = dev6.map(nodes_of).unwrap_or_default();
        self.reconcile_specs(
            nl,
            specs.into_values().collect(),
            plan.skipped,
            &nodes,
            v6,
            &nodes6,
        )
        .await
    }

    /// `nodes`: each `tweed-wg` peer's node ([`dual::DualPeerSpec::node`]; missing: its
    /// IPv4 endpoint); `v6`: what `separate`'s IPv6 device holds (`None`: this node runs
    /// none, and one left from before is removed at the next link check); `nodes6`: each of
    /// its peers' node.
    async fn reconcile_specs(
        &mut self,
        nl: &crate::netlink::Netlink,
        specs: Vec<plan::PeerSpec>,
        skipped: Vec<crate::backend::PeerSkip>,
        nodes: &Nodes,
        v6: Option<plan::DeviceSpec>,
        nodes6: &Nodes,
    ) -> Result<crate::backend::ReconcileStats, crate::backend::BackendError> {
        let desired = plan::device_spec(
            *self.cfg.private_key.bytes(),
            self.cfg.listen_port,
            specs.clone(),
        );
        let mut stats = match &mut self.plane {
            Plane::Userspace(u) => {
                u.reconcile(nl, &self.cfg, &specs, desired, nodes, v6, nodes6)
                    .await?
            }
            Plane::Kernel(k) => {
                let mut stats = crate::backend::ReconcileStats::default();
                // The IPv6 device's presence follows the plan at once (its own subnet learnt
                // or lost): checked with the links rather than failing the pass.
                if !k.device_checked || v6.is_some() != k.v6.is_some() {
                    let (ifindex, mut ops) = kernel_link(nl, &self.cfg).await?;
                    k.ifindex = ifindex;
                    let (ifindex6, ops6) = kernel_link_v6(nl, &self.cfg, v6.is_some()).await?;
                    ops.extend(ops6);
                    k.v6 = ifindex6.map(|ifindex| KernelDev6 {
                        ifindex,
                        desired: None,
                        stats: Vec::new(),
                    });
                    stats.ops_applied += ops.len();
                    stats.applied = ops;
                    k.device_checked = true;
                }
                // Recorded before the write: a pass that fails half-way must not leave the
                // periodic read-back converging the device to the state before it.
                k.desired = Some(desired.clone());
                let (n, peer_stats) = genl_reconcile(k.genl.clone(), DEVICE, desired).await?;
                stats.ops_applied += n;
                k.stats = peer_stats;
                if let (Some(desired6), Some(d)) = (v6, k.v6.as_mut()) {
                    d.desired = Some(desired6.clone());
                    let (n, st) = genl_reconcile(k.genl.clone(), dual::DEVICE_V6, desired6).await?;
                    stats.ops_applied += n;
                    d.stats = st;
                }
                stats
            }
        };
        stats.skipped.extend(skipped);
        Ok(stats)
    }
}

/// Each peer's node on one device, by the peer's key there.
type Nodes = std::collections::BTreeMap<PublicKey, std::net::SocketAddrV4>;

/// The node a `tweed-wg` entry is routed to: the plan's ([`dual::DualPeerSpec::node`]), else
/// its IPv4 endpoint. The workers' peer table knows nodes by their IPv4 `PublicIP:Port`; in
/// `Mode: ipv6` the entry's endpoint is the IPv6 one, so the plan's node names it.
fn node_of(s: &plan::PeerSpec, nodes: &Nodes) -> Option<std::net::SocketAddrV4> {
    nodes
        .get(&s.public_key)
        .copied()
        .or_else(|| s.endpoint_v4())
}

/// The workers' IPv4 routes of `tweed-wg`: each peer's IPv4 subnet to its node.
fn userspace_peers(specs: &[plan::PeerSpec], nodes: &Nodes) -> Vec<crate::backend::UdpPeer> {
    specs
        .iter()
        .filter_map(|s| {
            let node = node_of(s, nodes)?;
            Some(crate::backend::UdpPeer {
                subnet: s.subnet_v4()?,
                public_ip: *node.ip(),
                port: node.port(),
            })
        })
        .collect()
}

/// `tweed-wg`'s WireGuard entries, each filed under its node's address. Two leases may name
/// one `PublicIP`: the workers then seal for the entry whose allowed IPs hold the destination
/// (`WgTable::route`), whatever its endpoint's family, never for the one filed last.
fn keyed_entries(
    specs: &[plan::PeerSpec],
    nodes: &Nodes,
) -> Vec<(plan::PeerSpec, Option<std::net::Ipv4Addr>)> {
    specs
        .iter()
        .map(|s| (s.clone(), node_of(s, nodes).map(|n| *n.ip())))
        .collect()
}

/// One userspace device's entries as [`PeerStats`] (`lease_subnet`: the entry's IPv4 subnet,
/// none on `tweed-wg-v6`, whose caller fills it in).
fn userspace_stats(table: &userspace::WgTable, device: &'static str) -> Vec<PeerStats> {
    table
        .peers()
        .iter()
        .map(|p| {
            let (age, tx, rx) = p.stats();
            let subnet = p
                .spec
                .subnet_v4()
                .map(Into::into)
                .or_else(|| p.spec.allowed_ips.iter().find(|n| n.is_ipv6()).copied());
            PeerStats {
                device,
                public_key: p.spec.public_key,
                endpoint: p.spec.endpoint,
                subnet,
                lease_subnet: p.spec.subnet_v4(),
                last_handshake: age,
                tx_bytes: tx as u64,
                rx_bytes: rx as u64,
            }
        })
        .collect()
}

impl Userspace {
    #[allow(clippy::too_many_arguments)]
    async fn reconcile(
        &mut self,
        nl: &crate::netlink::Netlink,
        cfg: &WgConfig,
        specs: &[plan::PeerSpec],
        desired: plan::DeviceSpec,
        nodes: &Nodes,
        v6: Option<plan::DeviceSpec>,
        nodes6: &Nodes,
    ) -> Result<crate::backend::ReconcileStats, crate::backend::BackendError> {
        let rebuilt = self.follow_socket_plan(nl, cfg).await?;
        let ops = plan::plan(&self.applied, &desired);
        let node_of = |s: &plan::PeerSpec| node_of(s, nodes);
        let udp_peers = userspace_peers(specs, nodes);
        // Single-device modes: IPv6 pods ride the same IPv4 endpoint, the workers' table
        // routes each peer's IPv6 subnet to it (sealed there by the peer's session like its
        // IPv4 packets). `separate`: tweed-wg carries IPv4 only.
        let shared = cfg
            .dual
            .as_ref()
            .filter(|d| d.mode != tweed_config::WireguardMode::Separate);
        if let Some(d) = shared {
            // Our lease lost its IPv6 half: the workers' table drops the IPv6 routes too.
            if d.own_subnet.is_none() {
                self.udp.set_v6(None);
            }
            if let Some(own_subnet) = d.own_subnet {
                let peers = specs
                    .iter()
                    .filter_map(|s| {
                        let ep = node_of(s)?;
                        Some(s.allowed_ips.iter().filter_map(move |n| match n {
                            ipnetwork::IpNetwork::V6(n) => Some(crate::backend::UdpPeer6 {
                                subnet: *n,
                                public_ip: *ep.ip(),
                                port: ep.port(),
                            }),
                            ipnetwork::IpNetwork::V4(_) => None,
                        }))
                    })
                    .flatten()
                    .collect();
                self.udp.set_v6(Some(crate::backend::V6Spec {
                    network: d.ipv6.network,
                    own_subnet,
                    peers,
                }));
            }
        }
        let wg = (!ops.is_empty() || !self.published).then(|| {
            self.table = Arc::new(
                self.table
                    .update_keyed(&cfg.private_key, &keyed_entries(specs, nodes)),
            );
            self.table.clone()
        });
        if wg.is_some() {
            tracing::debug!(ops = ?ops, "wireguard: peers updated");
        }
        let mut stats = self.udp.reconcile_with(nl, &udp_peers, wg.clone()).await?;
        stats.ops_applied += rebuilt.len();
        stats.applied.splice(0..0, rebuilt);
        if wg.is_some() {
            stats.ops_applied += ops.len();
            plan::apply_to(&mut self.applied, &ops);
            self.published = true;
        }
        // The IPv6 device follows the plan at once (our IPv6 subnet learnt or lost).
        match (v6, self.v6.as_mut()) {
            (Some(desired6), Some(d)) => {
                let s6 = d.reconcile(nl, cfg, &udp_peers, desired6, nodes6).await?;
                stats.ops_applied += s6.ops_applied;
                stats.applied.extend(s6.applied);
            }
            (Some(desired6), None) => {
                let mut d = UserDev6::setup(nl, cfg).await?;
                stats.ops_applied += d.setup_ops.len();
                stats.applied.extend(d.setup_ops.iter().cloned());
                let s6 = d.reconcile(nl, cfg, &udp_peers, desired6, nodes6).await?;
                stats.ops_applied += s6.ops_applied;
                stats.applied.extend(s6.applied);
                self.v6 = Some(Box::new(d));
            }
            (None, Some(_)) => {
                let mut d = self.v6.take().expect("matched");
                d.udp.stop().await;
                let (_, ops) = kernel_link_v6(nl, cfg, false).await?;
                stats.ops_applied += ops.len();
                stats.applied.extend(ops);
            }
            (None, None) => {}
        }
        Ok(stats)
    }
}

impl Userspace {
    /// What the running workers are set up for.
    fn running(&self) -> SocketPlan {
        SocketPlan {
            v6_socket: self.udp.config().bind6.is_some(),
            dual_device: self.udp.is_dual(),
        }
    }

    /// Starts `tweed-wg`'s workers again when their sockets' family no longer matches the
    /// endpoints the plan for `cfg` names ([`socket_change`]): our lease gained or lost its IPv6
    /// half in `Mode: ipv6`, or a set-up ran while it was gone. The TUN device is re-attached
    /// (its address and routes stay) and the WireGuard table, key and sessions included, is
    /// published to the new workers, so a peer whose session is still valid needs no
    /// handshake. The ops the new workers' device check applied.
    async fn follow_socket_plan(
        &mut self,
        nl: &crate::netlink::Netlink,
        cfg: &WgConfig,
    ) -> Result<Vec<crate::netlink::Op>, crate::backend::BackendError> {
        let running = self.running();
        let Some(want) = socket_change(running, cfg) else {
            return Ok(Vec::new());
        };
        let udp_cfg = crate::backend::UdpConfig {
            bind6: want.v6_socket.then_some(std::net::Ipv6Addr::UNSPECIFIED),
            ..udp_config(cfg)
        };
        tracing::info!(
            device = DEVICE,
            from = %self.udp.config().bind(),
            to = %udp_cfg.bind(),
            "wireguard: our lease {} its IPv6 half: peers are planned at {} endpoints now; \
             starting tweed-wg's userspace workers again on {} sockets (same key and sessions)",
            if SocketPlan::of(cfg).dual_device { "gained" } else { "lost" },
            want.family(),
            want.family(),
        );
        // The old workers hold the port and the TUN queues until they end.
        self.udp.stop().await;
        self.udp = crate::backend::UdpBackend::setup_with(nl, udp_cfg, want.dual_device)
            .await
            .map_err(|e| WgError::WorkersStopped {
                family: want.family(),
                source: Box::new(e),
            })?;
        // The new workers start with no table: the caller publishes this one to them.
        self.published = false;
        Ok(self.udp.setup_ops().to_vec())
    }
}

impl UserDev6 {
    /// Starts the device's workers on `ListenPortV6` (an IPv6-only socket on every address, so
    /// a moved `PublicIPv6` needs no new socket) and gives it its IPv6 address and route.
    async fn setup(
        nl: &crate::netlink::Netlink,
        cfg: &WgConfig,
    ) -> Result<UserDev6, crate::backend::BackendError> {
        let port = cfg
            .dual
            .as_ref()
            .map_or(cfg.listen_port, |d| d.listen_port_v6);
        let udp_cfg = crate::backend::UdpConfig {
            port,
            device: dual::DEVICE_V6,
            bind6: Some(std::net::Ipv6Addr::UNSPECIFIED),
            v6_only: true,
            ..udp_config(cfg)
        };
        let udp = crate::backend::UdpBackend::setup_with(nl, udp_cfg, true).await?;
        let mut d = UserDev6 {
            udp,
            table: Arc::new(userspace::WgTable::new(&cfg.private_key)),
            applied: plan::DeviceSpec::default(),
            published: false,
            link_checked: false,
            setup_ops: Vec::new(),
        };
        let ops = d.check_link(nl, cfg).await?;
        d.setup_ops = d.udp.setup_ops().iter().cloned().chain(ops).collect();
        crate::backend::log_setup(
            "wireguard: userspace IPv6 device",
            dual::DEVICE_V6,
            cfg.mtu(),
            d.setup_ops.len(),
        );
        Ok(d)
    }

    /// The IPv6 subnet's /128 and the `IPv6Network` route on the device, as the kernel path's
    /// `tweed-wg-v6` has them ([`dual::plan_link6`]); the ops applied.
    async fn check_link(
        &mut self,
        nl: &crate::netlink::Netlink,
        cfg: &WgConfig,
    ) -> Result<Vec<crate::netlink::Op>, WgError> {
        let dev = |source| WgError::Device {
            device: dual::DEVICE_V6,
            source,
        };
        let ifindex = self.udp.ifindex();
        // Deleted (or made again by someone else): its queues are dead, so the whole backend
        // is set up again, as for tweed-wg.
        if nl
            .link_by_name(dual::DEVICE_V6)
            .await
            .map_err(dev)?
            .is_none_or(|l| l.index != ifindex)
        {
            return Err(WgError::DeviceGone);
        }
        let plan = cfg.dual_local().and_then(|l| {
            dual::plan_dual(&l, &[])
                .devices
                .into_iter()
                .find(|d| d.name == dual::DEVICE_V6)
        });
        let Some(plan) = plan else {
            return Ok(Vec::new());
        };
        let ops = dual::plan_link6(
            &plan,
            ifindex,
            &nl.addresses6(Some(ifindex)).await.map_err(dev)?,
            &nl.all_routes6().await.map_err(dev)?,
        );
        for op in &ops {
            nl.apply(op).await.map_err(dev)?;
        }
        self.link_checked = true;
        Ok(ops)
    }

    async fn reconcile(
        &mut self,
        nl: &crate::netlink::Netlink,
        cfg: &WgConfig,
        v4_peers: &[crate::backend::UdpPeer],
        desired: plan::DeviceSpec,
        nodes: &Nodes,
    ) -> Result<crate::backend::ReconcileStats, crate::backend::BackendError> {
        let link_ops = if self.link_checked {
            Vec::new()
        } else {
            self.check_link(nl, cfg).await?
        };
        if let Some((d, own_subnet)) = cfg.dual.as_ref().and_then(|d| Some((d, d.own_subnet?))) {
            let peers = desired
                .peers
                .values()
                .filter_map(|p| {
                    let node = nodes.get(&p.public_key)?;
                    let subnet = p.allowed_ips.iter().find_map(|n| match n {
                        ipnetwork::IpNetwork::V6(n) => Some(*n),
                        ipnetwork::IpNetwork::V4(_) => None,
                    })?;
                    Some(crate::backend::UdpPeer6 {
                        subnet,
                        public_ip: *node.ip(),
                        port: node.port(),
                    })
                })
                .collect();
            self.udp.set_v6(Some(crate::backend::V6Spec {
                network: d.ipv6.network,
                own_subnet,
                peers,
            }));
        }
        let ops = plan::plan(&self.applied, &desired);
        let wg = (!ops.is_empty() || !self.published).then(|| {
            // Filed under the node's IPv4, which two leases may share: the workers then take the
            // entry whose allowed IPs hold the destination (`WgTable::route`), never the one
            // filed last, or a lease naming another node's PublicIP would get its IPv6 traffic.
            let keyed: Vec<(plan::PeerSpec, Option<std::net::Ipv4Addr>)> = desired
                .peers
                .values()
                .map(|p| (p.clone(), nodes.get(&p.public_key).map(|n| *n.ip())))
                .collect();
            self.table = Arc::new(self.table.update_keyed(&cfg.private_key, &keyed));
            self.table.clone()
        });
        if wg.is_some() {
            tracing::debug!(device = dual::DEVICE_V6, ops = ?ops, "wireguard: peers updated");
        }
        // The IPv4 halves are the peer table's senders (each IPv6 half rides on its node's
        // lease); no IPv4 route leads into this device, so none of them is ever routed to here.
        let mut stats = self.udp.reconcile_with(nl, v4_peers, wg.clone()).await?;
        if wg.is_some() {
            stats.ops_applied += ops.len();
            plan::apply_to(&mut self.applied, &ops);
            self.published = true;
        }
        stats.ops_applied += link_ops.len();
        stats.applied.extend(link_ops);
        Ok(stats)
    }
}

/// What `tweed-wg`'s userspace workers need from their set-up under a plan: the sockets'
/// family and whether the TUN device carries IPv6 (TCPv6 offload, IPv6 left on). Both are
/// fixed when the workers start, so a change means new workers ([`socket_change`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketPlan {
    /// IPv6-only sockets on `[::]:ListenPort` (`Mode: ipv6` with our lease's IPv6 half);
    /// otherwise IPv4 ones on the underlay address.
    pub v6_socket: bool,
    /// The device carries IPv6 pods too (a single-device mode with our IPv6 half).
    pub dual_device: bool,
}

impl SocketPlan {
    /// What the plan for `cfg` (as it is now: our IPv6 subnet learnt or lost) needs. The
    /// endpoints `tweed-wg`'s peers are planned at are IPv6 exactly when `v6_socket` is.
    pub fn of(cfg: &WgConfig) -> SocketPlan {
        let local = cfg.dual_local();
        SocketPlan {
            v6_socket: local
                .as_ref()
                .is_some_and(|l| l.mode == tweed_config::WireguardMode::Ipv6),
            dual_device: local.as_ref().is_some_and(|l| !l.separate()),
        }
    }

    /// The underlay family the peers are reached over, for log lines.
    pub fn family(self) -> &'static str {
        if self.v6_socket {
            "IPv6"
        } else {
            "IPv4"
        }
    }
}

/// The workers `tweed-wg` must be started again with, when the running ones (`running`) cannot
/// serve what the plan for `cfg` needs; `None` when they can. Their socket family must match
/// the planned endpoints' (an IPv6-only socket cannot send to an IPv4 endpoint, nor an IPv4
/// one to an IPv6 endpoint). A device carrying IPv6 may keep doing so when the plan no longer
/// needs it (its IPv6 address and route go with the IPv6 plane): new workers only for the
/// socket, and they keep the device as it is; one that does not carry IPv6 cannot take the
/// IPv6 plane's address, so gaining it needs new workers too.
pub fn socket_change(running: SocketPlan, cfg: &WgConfig) -> Option<SocketPlan> {
    let want = SocketPlan::of(cfg);
    if want.v6_socket == running.v6_socket && (running.dual_device || !want.dual_device) {
        return None;
    }
    Some(SocketPlan {
        v6_socket: want.v6_socket,
        dual_device: want.dual_device || running.dual_device,
    })
}

/// The workers' config of `tweed-wg` (`tweed-wg-v6` changes port, device and socket).
/// `Mode: ipv6` reaches every peer over the IPv6 underlay: an IPv6-only socket on every
/// address (a moved `PublicIPv6` needs no new socket), no IPv4 one, on `ListenPort`.
fn udp_config(cfg: &WgConfig) -> crate::backend::UdpConfig {
    let ipv6_mode = SocketPlan::of(cfg).v6_socket;
    crate::backend::UdpConfig {
        network: cfg.network,
        own_subnet: cfg.own_subnet,
        local_ip: cfg.local_ip,
        port: cfg.listen_port,
        underlay_mtu: cfg.underlay_mtu,
        mtu_override: Some(cfg.mtu()),
        queues: cfg.queues,
        // The peer table comes from the leases' keys; a stored copy could not open packets
        // before the handshake anyway.
        peers_file: None,
        device: DEVICE,
        // One peer's datagrams to one worker: they are ciphertext, and one session's lock.
        steering: crate::backend::udp::io::Steering::WireguardPeer,
        bind6: ipv6_mode.then_some(std::net::Ipv6Addr::UNSPECIFIED),
        v6_only: false,
    }
}

async fn setup_userspace(
    nl: &crate::netlink::Netlink,
    cfg: &WgConfig,
) -> Result<Userspace, crate::backend::BackendError> {
    let udp_cfg = udp_config(cfg);
    // Dual stack on one device: the TUN device keeps IPv6 (the IPv6 plane gives it the address
    // and route). `separate`: IPv6 is tweed-wg-v6's.
    let separate = cfg.dual_local().is_some_and(|l| l.separate());
    let udp = crate::backend::UdpBackend::setup_with(nl, udp_cfg, SocketPlan::of(cfg).dual_device)
        .await?;
    let mut setup_ops = udp.setup_ops().to_vec();
    let v6 = if separate {
        let d = UserDev6::setup(nl, cfg).await?;
        setup_ops.extend(d.setup_ops.iter().cloned());
        Some(Box::new(d))
    } else {
        // An IPv6 device left behind (another mode, or a kernel `separate` node restarted
        // here): its `IPv6Network` route would swallow what this node does not carry.
        let (_, ops) = kernel_link_v6(nl, cfg, false).await?;
        for op in &ops {
            tracing::info!("wireguard: removed the IPv6 device this node no longer runs: {op}");
        }
        setup_ops.extend(ops);
        None
    };
    Ok(Userspace {
        udp,
        table: Arc::new(userspace::WgTable::new(&cfg.private_key)),
        applied: plan::DeviceSpec::default(),
        published: false,
        v6,
        setup_ops,
    })
}

async fn setup_kernel(
    nl: &crate::netlink::Netlink,
    cfg: &WgConfig,
    open: GenlOpener,
) -> Result<KernelPlane, crate::backend::BackendError> {
    let (ifindex, mut setup_ops) = kernel_link(nl, cfg).await?;
    crate::backend::log_setup(
        "wireguard: kernel device",
        DEVICE,
        cfg.mtu(),
        setup_ops.len(),
    );
    let separate = cfg.dual_local().is_some_and(|l| l.separate());
    let (ifindex6, ops6) = kernel_link_v6(nl, cfg, separate).await?;
    if separate {
        crate::backend::log_setup(
            "wireguard: kernel IPv6 device",
            dual::DEVICE_V6,
            cfg.mtu(),
            ops6.len(),
        );
    }
    setup_ops.extend(ops6);
    let genl = open().map_err(WgError::Kernel)?;
    Ok(KernelPlane {
        ifindex,
        genl: Arc::new(Mutex::new(genl)),
        desired: None,
        stats: Vec::new(),
        device_checked: true,
        setup_ops,
        v6: ifindex6.map(|ifindex| KernelDev6 {
            ifindex,
            desired: None,
            stats: Vec::new(),
        }),
    })
}

/// The implementation a set-up runs: `userspace` as asked, else the kernel's when it makes
/// `wireguard` links (`kernel` fails without; `auto` then takes userspace). Asked again at
/// every set-up, a re-setup's included, so an `auto` node whose kernel stops making
/// `wireguard` links (module unloaded) comes back on userspace rather than stopped.
pub async fn choose_implementation(
    nl: &crate::netlink::Netlink,
    wanted: WgImpl,
) -> Result<WgImpl, WgError> {
    let probed = match wanted {
        WgImpl::Userspace => Ok(()),
        _ => probe_kernel(nl).await,
    };
    kernel::choose(wanted, &mut kernel::Probed(probed))
}

/// Whether this kernel makes `wireguard` links: a throw-away one (named after the process)
/// created and deleted through the same handle the device will be. A probe link an agent left
/// when it died between the two steps is removed first (in a container the agent is often pid
/// 1 every time, elsewhere the name differs per run and nothing else would ever remove it).
/// When [`DEVICE`] already is a `wireguard` link (a restart), that link is the answer and no
/// probe link is made: a restart on a device that is right writes nothing at all.
async fn probe_kernel(nl: &crate::netlink::Netlink) -> Result<(), String> {
    use crate::netlink::Op;
    let mut have_device = false;
    if let Ok(links) = nl.links().await {
        have_device = links
            .iter()
            .any(|l| l.name == DEVICE && l.kind.as_deref() == Some("wireguard"));
        for l in links.iter().filter(|l| l.name.starts_with(PROBE_PREFIX)) {
            match nl
                .apply(&Op::LinkDel {
                    name: l.name.clone(),
                })
                .await
            {
                Ok(()) => tracing::info!(link = %l.name, "removed a leftover wireguard probe link"),
                Err(e) => {
                    tracing::warn!(link = %l.name, "removing a leftover wireguard probe link: {e}")
                }
            }
        }
    }
    if have_device {
        return Ok(());
    }
    let name = format!("{PROBE_PREFIX}{}", std::process::id() % 100_000_000);
    match nl.apply(&Op::LinkAddWireguard { name: name.clone() }).await {
        Ok(()) => {
            // The add answered the question; a failed delete is a leftover the next start
            // removes, not a reason to think the kernel lacks wireguard.
            if let Err(e) = nl.apply(&Op::LinkDel { name: name.clone() }).await {
                tracing::warn!(link = %name, "deleting the wireguard probe link: {e}");
            }
            Ok(())
        }
        Err(e) if e.errno() == Some(libc::EOPNOTSUPP) => Err(format!(
            "`ip link add type wireguard` fails ({e}): this kernel has no wireguard module \
             (load it with `modprobe wireguard`, or use --wireguard-impl=userspace)"
        )),
        Err(e) => Err(format!("creating a wireguard link: {e}")),
    }
}

/// The name prefix of the probe's throw-away link.
const PROBE_PREFIX: &str = "twwg";

/// The `wireguard` link [`DEVICE`] with MTU, up, the subnet's address and the network's route,
/// as the userspace path's TUN device has them. A device of another kind under that name (the
/// userspace path's TUN device after a switch to the kernel) is replaced. Returns the link's
/// index and the ops applied: none when everything was in place.
async fn kernel_link(
    nl: &crate::netlink::Netlink,
    cfg: &WgConfig,
) -> Result<(u32, Vec<crate::netlink::Op>), WgError> {
    let dev = |source| WgError::Device {
        device: DEVICE,
        source,
    };
    let (link, mut applied) = ensure_wireguard_link(nl, DEVICE).await?;
    let addrs = nl.addresses(Some(link.index)).await.map_err(dev)?;
    let routes = nl.routes(link.index).await.map_err(dev)?;
    let ops = crate::backend::plan_l3_device(
        &link,
        &addrs,
        &routes,
        cfg.mtu(),
        crate::backend::device_addr(cfg.own_subnet),
        crate::backend::overlay_route(cfg.network, link.index),
    );
    for op in ops {
        nl.apply(&op).await.map_err(dev)?;
        applied.push(op);
    }
    Ok((link.index, applied))
}

/// The `wireguard` link `name`, made when missing; a link of another kind under that name is
/// replaced. Returns the link and the ops applied.
async fn ensure_wireguard_link(
    nl: &crate::netlink::Netlink,
    name: &'static str,
) -> Result<(crate::netlink::Link, Vec<crate::netlink::Op>), WgError> {
    use crate::netlink::Op;
    let dev = |source| WgError::Device {
        device: name,
        source,
    };
    let mut applied = Vec::new();
    let existing = nl.link_by_name(name).await.map_err(dev)?;
    if existing
        .as_ref()
        .is_some_and(|l| l.kind.as_deref() != Some("wireguard"))
    {
        tracing::warn!(
            device = name,
            "wireguard: replacing a device that is not a kernel wireguard link"
        );
        let op = Op::LinkDel { name: name.into() };
        nl.apply(&op).await.map_err(dev)?;
        applied.push(op);
    }
    if existing.is_none() || !applied.is_empty() {
        let op = Op::LinkAddWireguard { name: name.into() };
        nl.apply(&op).await.map_err(dev)?;
        applied.push(op);
    }
    let link = nl
        .link_by_name(name)
        .await
        .map_err(dev)?
        .ok_or(WgError::DeviceGone)?;
    Ok((link, applied))
}

/// `separate`'s IPv6 device [`dual::DEVICE_V6`] when `wanted` (this node plans it: kernel
/// path, dual stack, lease with its IPv6 half): a `wireguard` link with MTU, up, the IPv6
/// subnet's /128 and the `IPv6Network` route ([`dual::plan_link6`]). Not `wanted`: a
/// `tweed-wg-v6` left from before (another mode, the lease's IPv6 half gone, a restart on
/// userspace) is deleted, whatever the config says now, since its route would keep
/// `IPv6Network` in a device nobody programs. Returns its index (`None` when absent) and the
/// ops applied: none when everything was in place.
async fn kernel_link_v6(
    nl: &crate::netlink::Netlink,
    cfg: &WgConfig,
    wanted: bool,
) -> Result<(Option<u32>, Vec<crate::netlink::Op>), WgError> {
    use crate::netlink::Op;
    let dev = |source| WgError::Device {
        device: dual::DEVICE_V6,
        source,
    };
    let plan = cfg.dual_local().filter(|_| wanted).and_then(|l| {
        dual::plan_dual(&l, &[])
            .devices
            .into_iter()
            .find(|d| d.name == dual::DEVICE_V6)
    });
    let Some(plan) = plan else {
        let mut applied = Vec::new();
        if nl
            .link_by_name(dual::DEVICE_V6)
            .await
            .map_err(dev)?
            .is_some()
        {
            let op = Op::LinkDel {
                name: dual::DEVICE_V6.into(),
            };
            nl.apply(&op).await.map_err(dev)?;
            applied.push(op);
        }
        return Ok((None, applied));
    };
    let (link, mut applied) = ensure_wireguard_link(nl, dual::DEVICE_V6).await?;
    let mut ops = Vec::new();
    if link.mtu != plan.mtu {
        ops.push(Op::LinkSetMtu {
            name: link.name.clone(),
            mtu: plan.mtu,
        });
    }
    if !link.up {
        ops.push(Op::LinkSetUp {
            name: link.name.clone(),
        });
    }
    ops.extend(dual::plan_link6(
        &plan,
        link.index,
        &nl.addresses6(Some(link.index)).await.map_err(dev)?,
        &nl.all_routes6().await.map_err(dev)?,
    ));
    for op in ops {
        nl.apply(&op).await.map_err(dev)?;
        applied.push(op);
    }
    Ok((Some(link.index), applied))
}

/// [`kernel::reconcile`] on the blocking pool (the socket blocks). Returns how many writes it
/// made and the per-peer figures as they are after them (read again only when it wrote).
async fn genl_reconcile(
    genl: SharedGenl,
    device: &'static str,
    desired: plan::DeviceSpec,
) -> Result<(usize, Vec<PeerStats>), WgError> {
    tokio::task::spawn_blocking(move || {
        let mut g = genl.lock().unwrap_or_else(|e| e.into_inner());
        let (ops, observed) = kernel::reconcile(&mut **g, device, &desired)?;
        for op in &ops {
            if let WgOp::SetPeer(p) = op {
                let was = observed.spec.peers.get(&p.public_key).and_then(|o| o.endpoint);
                if was.is_some() && was != p.endpoint {
                    tracing::warn!(device, peer = %p.public_key, roamed_to = ?was, lease = ?p.endpoint, "wireguard: the kernel moved a peer's endpoint; set back to the lease's");
                }
            }
        }
        let named = |mut stats: Vec<PeerStats>| {
            for s in &mut stats {
                s.device = device;
            }
            stats
        };
        if ops.is_empty() {
            return Ok((0, named(observed.stats)));
        }
        tracing::debug!(device, ops = ?ops, "wireguard: kernel device updated");
        let now = kernel::parse_device(&g.get_device(device)?, std::time::SystemTime::now());
        Ok((ops.len(), named(now.stats)))
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    .map_err(|e: kernel::KernelError| match e {
        kernel::KernelError::Io { ref source, .. } if source.raw_os_error() == Some(libc::ENODEV) => {
            WgError::DeviceGone
        }
        e => WgError::Kernel(e),
    })
}

/// One peer entry's figures for metrics, `tweedctl net peers` and `/readyz`: one per device
/// entry, so a `Mode: separate` peer has one on `tweed-wg` and one on `tweed-wg-v6`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStats {
    /// The device holding the entry: [`DEVICE`], or [`dual::DEVICE_V6`].
    pub device: &'static str,
    pub public_key: PublicKey,
    /// IPv6 in `Mode: ipv6` and on `tweed-wg-v6`.
    pub endpoint: Option<std::net::SocketAddr>,
    /// The entry's subnet in the device's family: the IPv4 one on `tweed-wg` (in the
    /// single-device dual modes too), the IPv6 one on `tweed-wg-v6`.
    pub subnet: Option<ipnetwork::IpNetwork>,
    /// The subnet of the peer's lease (its IPv4 one), which `tweedctl net peers` lists the
    /// peer under; `None` for an entry the leases do not explain.
    pub lease_subnet: Option<Ipv4Network>,
    pub last_handshake: Option<std::time::Duration>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

#[cfg(test)]
pub(crate) mod backend_tests;
