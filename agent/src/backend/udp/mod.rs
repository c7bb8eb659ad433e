//! The udp backend: a TUN device `tweed0` holding this node's subnet address, a route for the
//! whole overlay network into it, and user-space workers that carry each inner IPv4 packet as
//! the payload of one UDP datagram to the peer holding its destination (flannel's udp wire
//! format, port 8285), for hosts without VXLAN.
//!
//! Unlike flannel's, it checks what it lets in: the outer source must be a current peer's
//! PublicIP and the inner source inside that peer's subnet; everything else is dropped and
//! counted. Destinations inside the overlay that no peer holds get ICMP net-unreachable.
//!
//! Layout: [`packet`], [`table`], [`offload`] and [`csum`] are pure (parsing, peer table,
//! segmentation and coalescing, checksums) and unit-tested; [`io`] is the thin loop around them.
//! The device is persistent (`TUNSETPERSIST`): when the agent exits, address and routes stay
//! and a restarted agent only re-attaches its queues.

pub mod csum;
pub mod fuzz;
pub mod io;
pub mod offload;
pub mod packet;
pub mod persist;
pub mod table;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use ipnetwork::Ipv4Network;

use self::io::{Counters, Shared, Stats, Worker};
pub use self::table::{PeerTable, UdpPeer, UdpPeer6, V6Spec};
use super::{check_mtu, device_addr, overlay_route, plan_l3_device, MtuError, ReconcileStats};
use crate::netlink::{Addr, Link, Netlink, NetlinkError, Op, Route};

pub const DEVICE: &str = "tweed0";
pub const DEFAULT_PORT: u16 = 8285;
/// Outer IPv4 (20) + UDP (8): flannel's udp overhead.
pub const UDP_OVERHEAD: u32 = 28;

#[derive(Debug, thiserror::Error)]
pub enum UdpError {
    #[error(transparent)]
    Mtu(#[from] MtuError),

    #[error("opening TUN device {device} (multiqueue, virtio-net header): {source}")]
    Tun {
        device: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("UDP socket on {addr}: {source}")]
    Socket {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },

    #[error("setting up the TUN device: {0}")]
    Device(#[source] NetlinkError),

    #[error("{device} no longer exists or its queues died; the backend must be set up again")]
    DeviceGone { device: &'static str },

    #[error("starting a udp worker thread: {0}")]
    Thread(#[source] std::io::Error),

    #[error("creating the udp workers' wake-up eventfds: {0}")]
    Waker(#[source] std::io::Error),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpConfig {
    pub network: Ipv4Network,
    pub own_subnet: Ipv4Network,
    /// The address the sockets bind to (the underlay interface's): outer packets leave from it,
    /// and peers check them against our lease's PublicIP.
    pub local_ip: Ipv4Addr,
    pub port: u16,
    pub underlay_mtu: u32,
    pub mtu_override: Option<u32>,
    /// Worker threads, each with its own TUN queue and socket.
    pub queues: usize,
    /// Where the peer table is kept across restarts ([`persist`]); `None`: not kept.
    pub peers_file: Option<std::path::PathBuf>,
    /// The TUN device: [`DEVICE`], or the wireguard backend's when it runs on these workers.
    pub device: &'static str,
    /// How received datagrams are spread over the workers.
    pub steering: io::Steering,
    /// `Some`: the sockets are IPv6-only ones bound to this address (wireguard's devices on
    /// the IPv6 underlay: `Mode: separate`'s `tweed-wg-v6`, `Mode: ipv6`'s `tweed-wg`).
    pub bind6: Option<Ipv6Addr>,
    /// The device carries IPv6 only: no IPv4 address or route (its owner gives it its IPv6
    /// ones): `Mode: separate`'s `tweed-wg-v6`.
    pub v6_only: bool,
}

impl UdpConfig {
    pub fn mtu(&self) -> u32 {
        self.mtu_override
            .unwrap_or(self.underlay_mtu.saturating_sub(UDP_OVERHEAD))
    }

    /// The device address: the subnet's network address as /32, as vxlan does; host-originated
    /// overlay traffic uses it as source (ICMP errors do not: see `PeerTable::icmp_source`).
    pub fn device_addr(&self) -> Ipv4Network {
        device_addr(self.own_subnet)
    }

    /// The one route this backend owns: the whole overlay into the TUN device (the pod bridge's
    /// more specific route keeps local traffic local).
    pub fn route(&self, ifindex: u32) -> Route {
        overlay_route(self.network, ifindex)
    }

    /// Where the sockets bind.
    pub fn bind(&self) -> SocketAddr {
        match self.bind6 {
            Some(ip) => SocketAddrV6::new(ip, self.port, 0, 0).into(),
            None => SocketAddrV4::new(self.local_ip, self.port).into(),
        }
    }
}

/// What the device needs so it matches `cfg`: MTU, up, exactly the one address, exactly the one
/// route. Pure; `routes` are the main-table routes through the device.
pub fn plan_device(cfg: &UdpConfig, link: &Link, addrs: &[Addr], routes: &[Route]) -> Vec<Op> {
    if cfg.v6_only {
        // An IPv6-only device: MTU and up here, no IPv4 at all (an IPv4 route through it
        // would blackhole: its peers carry IPv6 only); its IPv6 side is its owner's.
        let mut ops = Vec::new();
        if link.mtu != cfg.mtu() {
            ops.push(Op::LinkSetMtu {
                name: link.name.clone(),
                mtu: cfg.mtu(),
            });
        }
        if !link.up {
            ops.push(Op::LinkSetUp {
                name: link.name.clone(),
            });
        }
        ops.extend(
            addrs
                .iter()
                .filter(|a| a.ifindex == link.index)
                .map(|a| Op::AddrDel {
                    ifindex: a.ifindex,
                    addr: a.net,
                }),
        );
        ops.extend(
            routes
                .iter()
                .filter(|r| r.oif == Some(link.index) && r.protocol != Route::PROTO_KERNEL)
                .map(|r| Op::RouteDel(*r)),
        );
        return ops;
    }
    plan_l3_device(
        link,
        addrs,
        routes,
        cfg.mtu(),
        cfg.device_addr(),
        cfg.route(link.index),
    )
}

/// Opens (or re-attaches to) the persistent multiqueue TUN device with the virtio-net header and
/// TCPv4 segmentation offload (and TCPv6 with `tso6`: a dual-stack node); one non-blocking
/// descriptor per queue.
fn open_tun(name: &str, queues: usize, tso6: bool) -> std::io::Result<Vec<OwnedFd>> {
    let first = tun_rs::DeviceBuilder::new()
        .name(name)
        .offload(true)
        .multi_queue(true)
        // A new device stays down until IPv6 is off and it is configured (tun-rs would bring
        // it up at once, and the kernel would send a router solicitation into it); a restart
        // finds it up and leaves it so.
        .inherit_enable_state()
        .build_sync()?;
    first.persist()?;
    let mut devs = vec![first];
    for _ in 1..queues.max(1) {
        devs.push(devs[0].try_clone()?);
    }
    // Only what the workers segment themselves: TCPv4, and TCPv6 in dual stack (tun-rs also
    // asks for USO, which would hand over super-packets this backend does not cut). The mask is
    // per device, set again at every attach.
    let mut offloads = (libc::TUN_F_CSUM | libc::TUN_F_TSO4) as libc::c_ulong;
    if tso6 {
        offloads |= libc::TUN_F_TSO6 as libc::c_ulong;
    }
    // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is a live TUN queue.
    let rc = unsafe { libc::ioctl(devs[0].as_raw_fd(), libc::TUNSETOFFLOAD, offloads) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    for d in devs {
        d.set_nonblocking(true)?;
        // SAFETY: into_raw_fd hands over sole ownership of the queue's descriptor.
        fds.push(unsafe { OwnedFd::from_raw_fd(d.into_raw_fd()) });
    }
    Ok(fds)
}

/// The running udp data plane.
pub struct UdpBackend {
    cfg: UdpConfig,
    ifindex: u32,
    shared: Arc<Shared>,
    counters: Vec<Arc<Counters>>,
    threads: Vec<JoinHandle<()>>,
    peers: Option<Vec<UdpPeer>>,
    /// The IPv6 half of the table (dual stack), set by the IPv6 plane after each reconcile.
    /// Boxed: the backend is held inline by the enums of its users (wireguard's plane).
    v6: Option<Box<V6Spec>>,
    /// Set up for dual stack: until [`set_v6`](Self::set_v6) the table's IPv6 half is pending.
    dual: bool,
    /// Whether the device was checked since the last resync.
    device_checked: bool,
    setup_ops: Vec<Op>,
}

impl std::fmt::Debug for UdpBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpBackend")
            .field("cfg", &self.cfg)
            .field("ifindex", &self.ifindex)
            .field("workers", &self.threads.len())
            .finish()
    }
}

impl UdpBackend {
    /// Creates or re-attaches `tweed0`, configures it, binds the sockets and starts the workers.
    /// Without a stored table the workers read nothing until the first
    /// [`reconcile`](Self::reconcile) loads the peer table: what arrives meanwhile waits in the
    /// kernel and is forwarded then (a restart never answers live traffic with ICMP errors).
    pub async fn setup(nl: &Netlink, cfg: UdpConfig) -> Result<UdpBackend, UdpError> {
        Self::setup_with(nl, cfg, false).await
    }

    /// [`setup`](Self::setup); `ipv6`: the node carries IPv6 through the device (dual stack), so
    /// the kernel's IPv6 is left on, with its autoconfiguration off ([`quiet_ipv6`]), instead
    /// of switched off.
    pub async fn setup_with(
        nl: &Netlink,
        cfg: UdpConfig,
        ipv6: bool,
    ) -> Result<UdpBackend, UdpError> {
        let cfg_device = cfg.device;
        // The wireguard backend's userspace path runs on these workers too: its lines must not
        // say udp.
        let who = if cfg_device == DEVICE {
            "udp"
        } else {
            "wireguard (userspace)"
        };
        check_mtu(
            cfg_device,
            cfg.mtu(),
            cfg.underlay_mtu,
            ("udp", UDP_OVERHEAD),
        )?;
        let existing = nl
            .link_by_name(cfg_device)
            .await
            .map_err(UdpError::Device)?;
        if let Some(l) = &existing {
            if l.kind.as_deref() != Some("tun") {
                tracing::warn!(device = cfg_device, kind = ?l.kind, "{who}: replacing a device that is not a TUN device");
                apply_strict(
                    nl,
                    &[Op::LinkDel {
                        name: cfg_device.into(),
                    }],
                )
                .await?;
            }
        }
        let fds = match open_tun(cfg_device, cfg.queues, ipv6) {
            Ok(f) => f,
            // A persistent device made with other flags (single queue, no virtio header) refuses
            // to attach: replace it.
            Err(e) if existing.is_some() => {
                tracing::warn!(
                    device = cfg_device,
                    "{who}: cannot attach to the existing device ({e}); recreating it"
                );
                apply_strict(
                    nl,
                    &[Op::LinkDel {
                        name: cfg_device.into(),
                    }],
                )
                .await?;
                open_tun(cfg_device, cfg.queues, ipv6).map_err(|source| UdpError::Tun {
                    device: cfg_device,
                    source,
                })?
            }
            Err(source) => {
                return Err(UdpError::Tun {
                    device: cfg_device,
                    source,
                })
            }
        };
        let link = nl
            .link_by_name(cfg_device)
            .await
            .map_err(UdpError::Device)?
            .ok_or(UdpError::DeviceGone { device: cfg_device })?;
        // IPv6 on tweed0 would only make the kernel send router solicitations and MLD reports
        // into the TUN device, which the workers must drop (IPv4 only) and report as malformed
        // every few minutes, forever.
        // In dual stack IPv6 stays on, without anything the kernel would send by itself but MLD
        // reports, which the workers drop as link-local traffic (not malformed).
        if ipv6 {
            match quiet_ipv6(Path::new(IPV6_CONF), cfg_device) {
                Ok(0) => {}
                Ok(n) => tracing::info!(device = cfg_device, written = n, "{who}: IPv6 on the device, autoconfiguration off"),
                Err(e) => tracing::warn!(device = cfg_device, "{who}: cannot set the device's IPv6 up ({e}); IPv6 pods will not reach other nodes"),
            }
        } else {
            match disable_ipv6(Path::new(IPV6_CONF), cfg_device) {
                Ok(true) => tracing::info!(device = cfg_device, "{who}: IPv6 disabled on the device"),
                Ok(false) => {}
                Err(e) => tracing::warn!(device = cfg_device, "{who}: cannot disable IPv6 ({e}); the kernel's IPv6 control packets will be counted as malformed"),
            }
        }
        let setup_ops = configure(nl, &cfg, &link).await?;
        crate::backend::log_setup(
            &format!("{who}: device"),
            cfg_device,
            cfg.mtu(),
            setup_ops.len(),
        );

        let bind = cfg.bind();
        let mut socks = Vec::new();
        for _ in 0..fds.len() {
            socks.push(
                io::udp_socket(bind).map_err(|source| UdpError::Socket { addr: bind, source })?,
            );
        }
        if socks.len() > 1 {
            if let Err(e) = io::attach_reuseport_program(
                socks[0].0.as_raw_fd(),
                socks.len() as u32,
                cfg.steering,
            ) {
                tracing::warn!(steering = ?cfg.steering, "{who}: no steering across workers ({e}); the kernel's 4-tuple hash decides");
            }
        }
        if !socks.iter().all(|(_, gro)| *gro) {
            tracing::warn!("{who}: this kernel has no UDP_GRO; receiving one datagram per read");
        }
        // The table the previous run left: forwarding starts with the workers, and the first
        // reconcile (after the leases are listed) corrects it.
        let stored = cfg
            .peers_file
            .as_deref()
            .map(persist::load)
            .unwrap_or_default();
        let table = if stored.is_empty() {
            PeerTable::not_ready(cfg.network, cfg.own_subnet)
        } else {
            tracing::info!(
                peers = stored.len(),
                "{who}: forwarding with the stored peer table until the leases are listed"
            );
            PeerTable::new(cfg.network, cfg.own_subnet, cfg.local_ip, &stored)
        };
        let table = if ipv6 { table.with_v6_pending() } else { table };
        // The workers sleep on wakers 0..n, the reporter on n.
        let shared =
            Arc::new(Shared::new(table, cfg.port, fds.len() + 1).map_err(UdpError::Waker)?);
        let mut counters = Vec::new();
        let mut threads = Vec::new();
        for (id, (tun, (sock, gro))) in fds.into_iter().zip(socks).enumerate() {
            let c = Arc::new(Counters::default());
            counters.push(c.clone());
            let w = Worker {
                id,
                tun,
                sock,
                gro,
                shared: shared.clone(),
                counters: c,
            };
            let t = std::thread::Builder::new()
                .name(format!("tweed-udp-{id}"))
                .spawn(move || w.run())
                .map_err(UdpError::Thread)?;
            threads.push(t);
        }
        threads.push(spawn_reporter(shared.clone(), counters.clone()).map_err(UdpError::Thread)?);
        tracing::info!(device = cfg_device, %bind, workers = counters.len(), mtu = cfg.mtu(), "{who}: data plane running");
        Ok(UdpBackend {
            cfg,
            ifindex: link.index,
            shared,
            counters,
            threads,
            peers: None,
            v6: None,
            dual: ipv6,
            device_checked: true,
            setup_ops,
        })
    }

    pub fn mtu(&self) -> u32 {
        self.cfg.mtu()
    }

    pub fn config(&self) -> &UdpConfig {
        &self.cfg
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    pub fn setup_ops(&self) -> &[Op] {
        &self.setup_ops
    }

    /// Whether the device was set up to carry IPv6 too (TCPv6 offload, IPv6 on): fixed for
    /// this set-up; another mode needs a new one.
    pub fn is_dual(&self) -> bool {
        self.dual
    }

    /// The table the workers use now.
    pub fn table(&self) -> Arc<PeerTable> {
        self.shared.table()
    }

    pub fn stats(&self) -> Stats {
        let mut s = Stats::default();
        for c in &self.counters {
            c.add_to(&mut s);
        }
        s
    }

    /// The next reconcile re-checks the device.
    pub fn resync(&mut self) {
        self.device_checked = false;
    }

    /// Moves to another subnet (the lease was lost and another one acquired).
    pub fn set_own_subnet(&mut self, subnet: Ipv4Network) {
        self.cfg.own_subnet = subnet;
        self.peers = None;
        self.device_checked = false;
    }

    /// The udp port this node binds, and so (same network config) the one every peer sends from.
    pub fn port(&self) -> u16 {
        self.cfg.port
    }

    /// Publishes the peer table for `peers` (only when it changed) and, after a resync, checks
    /// the device's MTU, address and route.
    pub async fn reconcile(
        &mut self,
        nl: &Netlink,
        peers: &[UdpPeer],
    ) -> Result<ReconcileStats, UdpError> {
        self.reconcile_with(nl, peers, None).await
    }

    /// As [`reconcile`](Self::reconcile); with `wg`, the workers seal and open every datagram
    /// with that WireGuard state (published with the table, always: the caller publishes only
    /// when something changed).
    pub async fn reconcile_with(
        &mut self,
        nl: &Netlink,
        peers: &[UdpPeer],
        wg: Option<Arc<crate::backend::wireguard::userspace::WgTable>>,
    ) -> Result<ReconcileStats, UdpError> {
        if self.shared.device_gone.load(Ordering::Relaxed) {
            return Err(UdpError::DeviceGone {
                device: self.cfg.device,
            });
        }
        let mut stats = ReconcileStats::default();
        if !self.device_checked {
            let link = nl
                .link_by_name(self.cfg.device)
                .await
                .map_err(UdpError::Device)?
                .filter(|l| l.index == self.ifindex)
                .ok_or(UdpError::DeviceGone {
                    device: self.cfg.device,
                })?;
            let ops = configure(nl, &self.cfg, &link).await?;
            stats.ops_applied += ops.len();
            stats.applied = ops;
            self.device_checked = true;
        }
        let mut sorted = peers.to_vec();
        sorted.sort();
        sorted.dedup();
        if let Some(wg) = wg {
            let table = self.build_table(&sorted);
            self.shared.publish_wg(table, wg);
            self.peers = Some(sorted);
        } else if self.peers.as_ref() != Some(&sorted) {
            let table = self.build_table(&sorted);
            tracing::debug!(peers = table.len(), "udp: peer table published");
            self.shared.publish(table);
            if let Some(path) = &self.cfg.peers_file {
                if let Err(e) = persist::store(path, &sorted) {
                    tracing::warn!(path = %path.display(), "udp: storing the peer table: {e}");
                }
            }
            self.peers = Some(sorted);
        }
        Ok(stats)
    }

    fn build_table(&self, sorted: &[UdpPeer]) -> PeerTable {
        let t = PeerTable::new(
            self.cfg.network,
            self.cfg.own_subnet,
            self.cfg.local_ip,
            sorted,
        );
        match &self.v6 {
            Some(spec) => t.with_v6(spec),
            None if self.dual => t.with_v6_pending(),
            None => t,
        }
    }

    /// Sets the IPv6 half of the peer table (dual stack: our IPv6 subnet, the network's and the
    /// peers' IPv6 halves; `None`: IPv4 only) and publishes the table when it changed and the
    /// IPv4 half is loaded (otherwise the next reconcile publishes both).
    pub fn set_v6(&mut self, spec: Option<V6Spec>) {
        if !self.stage_v6(spec) {
            return;
        }
        if let Some(peers) = &self.peers {
            let table = self.build_table(peers);
            tracing::debug!(
                peers = table.len(),
                ipv6_peers = table.len6(),
                "udp: peer table published"
            );
            self.shared.publish(table);
        }
    }

    /// Sets the IPv6 half of the peer table without publishing it: the next
    /// [`reconcile_with`](Self::reconcile_with) that carries a crypto table publishes both as
    /// one version. Whether it changed.
    pub fn stage_v6(&mut self, spec: Option<V6Spec>) -> bool {
        let spec = spec.map(|mut s| {
            s.peers.sort();
            s.peers.dedup();
            Box::new(s)
        });
        if self.v6 == spec {
            return false;
        }
        self.v6 = spec;
        true
    }

    /// Stops the workers and waits until they let go of the TUN queues and the port (the device
    /// and its routes stay: a restart re-attaches). Their wakers make them notice at once, not
    /// after a poll interval (a restart's traffic is lost meanwhile); the wait runs on a
    /// blocking thread, so the runtime's other tasks keep running.
    pub async fn stop(&mut self) {
        let t = std::time::Instant::now();
        self.shared.request_stop();
        let threads = std::mem::take(&mut self.threads);
        if threads.is_empty() {
            return;
        }
        let joined = tokio::task::spawn_blocking(move || join_all(threads)).await;
        if let Err(e) = joined {
            tracing::error!("udp: waiting for the workers to stop: {e}");
        }
        tracing::info!(
            device = self.cfg.device,
            ms = t.elapsed().as_millis() as u64,
            "udp: workers stopped"
        );
    }
}

fn join_all(threads: Vec<JoinHandle<()>>) {
    for t in threads {
        let _ = t.join();
    }
}

/// For owners outside async code (tests); the agent calls [`UdpBackend::stop`] first, which
/// leaves nothing to join here.
impl Drop for UdpBackend {
    fn drop(&mut self) {
        self.shared.request_stop();
        join_all(std::mem::take(&mut self.threads));
    }
}

async fn configure(nl: &Netlink, cfg: &UdpConfig, link: &Link) -> Result<Vec<Op>, UdpError> {
    let addrs = nl
        .addresses(Some(link.index))
        .await
        .map_err(UdpError::Device)?;
    let routes = nl.routes(link.index).await.map_err(UdpError::Device)?;
    let ops = plan_device(cfg, link, &addrs, &routes);
    apply_strict(nl, &ops).await?;
    Ok(ops)
}

/// Where the per-device IPv6 switches are, in the agent's network namespace.
const IPV6_CONF: &str = "/proc/sys/net/ipv6/conf";

/// Sets `<conf>/<dev>/disable_ipv6` to 1 unless it already is. `Ok(false)`: nothing to do,
/// including a kernel without IPv6 (no such directory). Checked first, so a restart writes
/// nothing.
fn disable_ipv6(conf: &Path, dev: &str) -> std::io::Result<bool> {
    let path = conf.join(dev).join("disable_ipv6");
    match std::fs::read_to_string(&path) {
        Ok(v) if v.trim() == "1" => Ok(false),
        Ok(_) => std::fs::write(&path, "1")
            .map(|()| true)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(std::io::Error::new(
            e.kind(),
            format!("{}: {e}", path.display()),
        )),
    }
}

/// The per-device IPv6 settings a dual-stack `tweed0` gets, in the order written: no link-local
/// address or any other generated one (`addr_gen_mode` 1 = none), no router advertisements or
/// solicitations, no DAD (the device is a point-to-point TUN, the lease makes the address
/// unique); then IPv6 on. Without these the kernel would send router solicitations into the
/// device at every start.
const QUIET_IPV6: [(&str, &str); 5] = [
    ("addr_gen_mode", "1"),
    ("accept_ra", "0"),
    ("router_solicitations", "0"),
    ("accept_dad", "0"),
    ("disable_ipv6", "0"),
];

/// Writes [`QUIET_IPV6`] under `<conf>/<dev>/`, each only when it differs (a restart writes
/// nothing, so the device keeps its IPv6 address and routes); the number written. A kernel
/// without IPv6 is an error here: the network asked for it.
fn quiet_ipv6(conf: &Path, dev: &str) -> std::io::Result<usize> {
    let mut written = 0;
    for (key, want) in QUIET_IPV6 {
        let path = conf.join(dev).join(key);
        let named =
            |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let now = std::fs::read_to_string(&path).map_err(named)?;
        if now.trim() != want {
            std::fs::write(&path, want).map_err(named)?;
            written += 1;
        }
    }
    Ok(written)
}

async fn apply_strict(nl: &Netlink, ops: &[Op]) -> Result<(), UdpError> {
    for op in ops {
        nl.apply(op).await.map_err(UdpError::Device)?;
    }
    Ok(())
}

/// Logs refused packets once a second when the counters moved, so a spoofing attempt or a
/// misconfigured peer shows in the log without a log line per packet.
fn spawn_reporter(
    shared: Arc<Shared>,
    counters: Vec<Arc<Counters>>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("tweed-udp-stats".into())
        .spawn(move || {
            let mut last = Stats::default();
            let waker = shared.waker(counters.len());
            let mut next = std::time::Instant::now() + Duration::from_secs(1);
            while !shared.stopping() {
                // Woken by every publish too: the report stays once a second.
                let left = next.saturating_duration_since(std::time::Instant::now());
                if !left.is_zero() {
                    io::sleep_on(waker, left.as_millis().max(1) as libc::c_int);
                    continue;
                }
                next += Duration::from_secs(1);
                let mut s = Stats::default();
                for c in &counters {
                    c.add_to(&mut s);
                }
                if s.rx_refused() != last.rx_refused() || s.drop_malformed != last.drop_malformed {
                    tracing::warn!(
                        unknown_peer = s.drop_unknown_peer,
                        wrong_port = s.drop_wrong_port,
                        unauthenticated = s.drop_unauthenticated,
                        spoofed_inner_source = s.drop_spoofed_inner,
                        not_for_this_node = s.drop_not_for_us,
                        malformed = s.drop_malformed,
                        "udp: dropped packets (totals since start)"
                    );
                }
                if s.tx_packets != last.tx_packets || s.rx_datagrams != last.rx_datagrams {
                    tracing::debug!(
                        tun_reads = s.tx_packets - last.tx_packets,
                        datagrams_sent = s.tx_datagrams - last.tx_datagrams,
                        datagrams_received = s.rx_datagrams - last.rx_datagrams,
                        tun_writes = s.rx_writes - last.rx_writes,
                        "udp: last second"
                    );
                }
                if s.icmp_unreachable != last.icmp_unreachable {
                    tracing::info!(
                        total = s.icmp_unreachable,
                        "udp: sent ICMP net-unreachable for destinations no peer holds"
                    );
                }
                last = s;
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_is_switched_off_once_and_a_kernel_without_it_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("tweed0");
        std::fs::create_dir(&dev).unwrap();
        std::fs::write(dev.join("disable_ipv6"), "0\n").unwrap();
        assert!(disable_ipv6(dir.path(), "tweed0").unwrap());
        assert_eq!(
            std::fs::read_to_string(dev.join("disable_ipv6")).unwrap(),
            "1"
        );
        assert!(
            !disable_ipv6(dir.path(), "tweed0").unwrap(),
            "a restart writes nothing"
        );
        assert!(
            !disable_ipv6(dir.path(), "nodev").unwrap(),
            "no IPv6 in the kernel"
        );
        std::fs::remove_file(dev.join("disable_ipv6")).unwrap();
        std::fs::create_dir(dev.join("disable_ipv6")).unwrap();
        let e = disable_ipv6(dir.path(), "tweed0").unwrap_err();
        assert!(e.to_string().contains("tweed0/disable_ipv6"), "{e}");
    }

    #[test]
    fn dual_stack_ipv6_is_switched_on_quietly_and_once() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("tweed0");
        std::fs::create_dir(&dev).unwrap();
        for (k, v) in [
            ("addr_gen_mode", "0\n"),
            ("accept_ra", "1\n"),
            ("router_solicitations", "-1\n"),
            ("accept_dad", "1\n"),
            ("disable_ipv6", "1\n"),
        ] {
            std::fs::write(dev.join(k), v).unwrap();
        }
        assert_eq!(quiet_ipv6(dir.path(), "tweed0").unwrap(), 5);
        for (k, v) in QUIET_IPV6 {
            assert_eq!(std::fs::read_to_string(dev.join(k)).unwrap(), v, "{k}");
        }
        assert_eq!(
            quiet_ipv6(dir.path(), "tweed0").unwrap(),
            0,
            "a restart writes nothing"
        );
        // A kernel without IPv6: an error naming the file, since the network asked for IPv6.
        let e = quiet_ipv6(dir.path(), "nodev").unwrap_err();
        assert!(e.to_string().contains("nodev/addr_gen_mode"), "{e}");
    }

    /// `stop` waits until the workers let go (they hold the TUN queues and the port a new set-up
    /// needs) without blocking the async runtime meanwhile: on a single-threaded runtime, another
    /// task keeps running while a slow worker winds down.
    #[tokio::test]
    async fn stop_waits_for_the_workers_without_blocking_the_runtime() {
        use std::sync::atomic::{AtomicBool, AtomicU64};
        let cfg = cfg();
        let shared = Arc::new(
            Shared::new(
                PeerTable::not_ready(cfg.network, cfg.own_subnet),
                cfg.port,
                1,
            )
            .unwrap(),
        );
        let exited = Arc::new(AtomicBool::new(false));
        let worker = {
            let (shared, exited) = (shared.clone(), exited.clone());
            std::thread::spawn(move || {
                while !shared.stopping() {
                    std::thread::sleep(Duration::from_millis(5));
                }
                // Letting go of a queue takes a while (up to a poll interval for a real worker).
                std::thread::sleep(Duration::from_millis(300));
                exited.store(true, Ordering::Relaxed);
            })
        };
        let mut b = UdpBackend {
            cfg,
            ifindex: 7,
            shared,
            counters: Vec::new(),
            threads: vec![worker],
            peers: None,
            v6: None,
            dual: false,
            device_checked: true,
            setup_ops: Vec::new(),
        };
        let ticks = Arc::new(AtomicU64::new(0));
        let ticker = {
            let ticks = ticks.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    ticks.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        tokio::task::yield_now().await;
        let before = ticks.load(Ordering::Relaxed);
        b.stop().await;
        let during = ticks.load(Ordering::Relaxed) - before;
        ticker.abort();
        assert!(
            exited.load(Ordering::Relaxed),
            "stop returned before the worker ended"
        );
        assert!(
            during >= 3,
            "the runtime stood still while stopping ({during} ticks)"
        );
        b.stop().await;
    }

    fn cfg() -> UdpConfig {
        UdpConfig {
            network: "10.244.0.0/16".parse().unwrap(),
            own_subnet: "10.244.1.0/24".parse().unwrap(),
            local_ip: "198.18.0.1".parse().unwrap(),
            port: DEFAULT_PORT,
            underlay_mtu: 1500,
            mtu_override: None,
            queues: 2,
            peers_file: None,
            device: DEVICE,
            steering: io::Steering::InnerFlow,
            bind6: None,
            v6_only: false,
        }
    }

    fn link(mtu: u32, up: bool) -> Link {
        Link {
            index: 7,
            name: DEVICE.into(),
            mtu,
            kind: Some("tun".into()),
            up,
            ..Default::default()
        }
    }

    #[test]
    fn mtu_is_underlay_minus_28() {
        assert_eq!(cfg().mtu(), 1472);
        let c = UdpConfig {
            mtu_override: Some(1400),
            ..cfg()
        };
        assert_eq!(c.mtu(), 1400);
    }

    #[test]
    fn fresh_device_gets_mtu_up_address_and_route() {
        let c = cfg();
        let ops = plan_device(&c, &link(1500, false), &[], &[]);
        assert_eq!(
            ops,
            vec![
                Op::LinkSetMtu {
                    name: DEVICE.into(),
                    mtu: 1472
                },
                Op::LinkSetUp {
                    name: DEVICE.into()
                },
                Op::AddrAdd {
                    ifindex: 7,
                    addr: "10.244.1.0/32".parse().unwrap()
                },
                Op::RouteReplace(c.route(7)),
            ]
        );
        let addrs = [Addr {
            ifindex: 7,
            net: "10.244.1.0/32".parse().unwrap(),
        }];
        assert_eq!(
            plan_device(&c, &link(1472, true), &addrs, &[c.route(7)]),
            vec![]
        );
    }

    /// `tweed-wg-v6` on these workers: MTU and up, and whatever IPv4 it holds goes (its
    /// peers carry IPv6 only); its IPv6 address and route are the wireguard backend's.
    #[test]
    fn an_ipv6_only_device_holds_no_ipv4() {
        let c = UdpConfig {
            bind6: Some(std::net::Ipv6Addr::UNSPECIFIED),
            v6_only: true,
            mtu_override: Some(1420),
            ..cfg()
        };
        assert_eq!(c.bind().to_string(), "[::]:8285");
        assert_eq!(cfg().bind().to_string(), "198.18.0.1:8285");
        let stray = Addr {
            ifindex: 7,
            net: "10.244.1.0/32".parse().unwrap(),
        };
        let ops = plan_device(&c, &link(1500, false), &[stray], &[c.route(7)]);
        assert_eq!(
            ops,
            vec![
                Op::LinkSetMtu {
                    name: DEVICE.into(),
                    mtu: 1420
                },
                Op::LinkSetUp {
                    name: DEVICE.into()
                },
                Op::AddrDel {
                    ifindex: 7,
                    addr: "10.244.1.0/32".parse().unwrap()
                },
                Op::RouteDel(c.route(7)),
            ]
        );
        assert_eq!(plan_device(&c, &link(1420, true), &[], &[]), vec![]);
        // `Mode: ipv6`'s tweed-wg: an IPv6 socket, and the device keeps its IPv4 address and
        // route (the IPv4 pods ride the IPv6 underlay).
        let both = UdpConfig {
            v6_only: false,
            ..c.clone()
        };
        assert_eq!(both.bind().to_string(), "[::]:8285");
        assert_eq!(
            plan_device(&both, &link(1420, true), &[stray], &[both.route(7)]),
            vec![]
        );
    }

    #[test]
    fn a_new_subnet_replaces_the_address_and_stray_routes_go() {
        let c = cfg();
        let old = [Addr {
            ifindex: 7,
            net: "10.244.9.0/32".parse().unwrap(),
        }];
        let stray = Route::via(
            "10.245.0.0/16".parse().unwrap(),
            "10.244.9.1".parse().unwrap(),
            Some(7),
        );
        let ops = plan_device(&c, &link(1472, true), &old, &[c.route(7), stray]);
        assert_eq!(
            ops,
            vec![
                Op::AddrAdd {
                    ifindex: 7,
                    addr: "10.244.1.0/32".parse().unwrap()
                },
                Op::AddrDel {
                    ifindex: 7,
                    addr: "10.244.9.0/32".parse().unwrap()
                },
                Op::RouteDel(stray),
            ]
        );
    }
}
