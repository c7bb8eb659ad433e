//! The kernel WireGuard device driven over generic netlink (family `wireguard`): the plan's ops
//! become `WG_CMD_SET_DEVICE` messages, `WG_CMD_GET_DEVICE` reads the device back into the
//! plan's [`DeviceSpec`] plus per-peer figures.
//!
//! The side effect is the [`WgGenl`] trait: [`RealGenl`] talks to the kernel through a
//! blocking `netlink-sys` socket, [`FakeGenl`] keeps a device in memory with the kernel's
//! semantics for the flags used here, so the reconcile is tested without root or module.
//!
//! [`super::WgBackend`] runs this path when [`choose`] picks it: `auto` where the kernel makes
//! `wireguard` links, `kernel` always (failing, with the reason, where it cannot).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnetwork::IpNetwork;
use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlFamily, GenlMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};

use super::plan::{DeviceSpec, PeerSpec, WgOp};
use super::{PeerStats, PublicKey, WgImpl};

/// The kernel treats an all-zero preshared key as "none": writing it clears a PSK.
const NO_PSK: [u8; 32] = [0; 32];

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "wireguard kernel: the generic netlink family \"wireguard\" is not registered \
         (no wireguard module in this kernel; use --wireguard-impl=userspace or auto)"
    )]
    NoModule,

    #[error("wireguard kernel: {what} on {device}: {source}")]
    Io {
        what: &'static str,
        device: String,
        #[source]
        source: std::io::Error,
    },

    #[error("wireguard kernel: {what} on {device}: malformed reply: {detail}")]
    Decode {
        what: &'static str,
        device: String,
        detail: String,
    },
}

/// One write or read of the kernel's wireguard configuration.
pub trait WgGenl {
    /// `WG_CMD_GET_DEVICE` as a dump: the device may come in several messages.
    fn get_device(&mut self, device: &str) -> Result<Vec<WireguardMessage>, KernelError>;
    /// One `WG_CMD_SET_DEVICE`, acknowledged.
    fn set_device(&mut self, msg: WireguardMessage) -> Result<(), KernelError>;
}

/// The messages carrying `ops` to `device`, one per op: a message per peer keeps every message
/// far below the socket's size limit whatever the peer count, and a failure names its peer.
pub fn messages(device: &str, ops: &[WgOp]) -> Vec<WireguardMessage> {
    ops.iter()
        .map(|op| {
            let mut attributes = vec![WireguardAttribute::IfName(device.to_string())];
            match op {
                WgOp::SetDevice {
                    private_key,
                    listen_port,
                } => {
                    attributes.push(WireguardAttribute::PrivateKey(*private_key));
                    attributes.push(WireguardAttribute::ListenPort(*listen_port));
                }
                WgOp::SetPeer(p) => {
                    attributes.push(WireguardAttribute::Peers(vec![peer_attrs(p)]));
                }
                WgOp::RemovePeer(k) => {
                    attributes.push(WireguardAttribute::Peers(vec![WireguardPeer(vec![
                        WireguardPeerAttribute::PublicKey(k.0),
                        WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
                    ])]));
                }
            }
            WireguardMessage {
                cmd: WireguardCmd::SetDevice,
                attributes,
            }
        })
        .collect()
}

fn peer_attrs(p: &PeerSpec) -> WireguardPeer {
    // Every field is written, so a peer whose PSK, keepalive or allowed IPs changed ends up
    // exactly as planned: REPLACE_ALLOWEDIPS drops the ones not listed, a zero PSK clears one.
    let mut attrs = vec![
        WireguardPeerAttribute::PublicKey(p.public_key.0),
        WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
        WireguardPeerAttribute::PresharedKey(p.psk.unwrap_or(NO_PSK)),
        WireguardPeerAttribute::PersistentKeepalive(p.keepalive),
    ];
    if let Some(e) = p.endpoint {
        attrs.push(WireguardPeerAttribute::Endpoint(e));
    }
    attrs.push(WireguardPeerAttribute::AllowedIps(
        p.allowed_ips
            .iter()
            .map(|n| {
                WireguardAllowedIp(vec![
                    WireguardAllowedIpAttr::Family(match n {
                        IpNetwork::V4(_) => WireguardAddressFamily::Ipv4,
                        IpNetwork::V6(_) => WireguardAddressFamily::Ipv6,
                    }),
                    WireguardAllowedIpAttr::IpAddr(n.network()),
                    WireguardAllowedIpAttr::Cidr(n.prefix()),
                ])
            })
            .collect(),
    ));
    WireguardPeer(attrs)
}

/// The device as read back: what the plan compares against, and the figures.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observed {
    pub spec: DeviceSpec,
    pub stats: Vec<PeerStats>,
}

/// Folds a `GET_DEVICE` dump into the plan's terms. A peer with many allowed IPs continues in
/// the next message under the same key; its parts are merged. Endpoints and allowed IPs of both
/// families are read (the dual-stack plan writes IPv6 ones); an allowed IP the plan cannot
/// express (no address or prefix, a prefix too long) leaves the peer with no endpoint, which
/// never equals a lease's, so the plan rewrites the peer and REPLACE_ALLOWEDIPS drops the rest.
pub fn parse_device(msgs: &[WireguardMessage], now: SystemTime) -> Observed {
    let mut spec = DeviceSpec::default();
    let mut stats: Vec<PeerStats> = Vec::new();
    let mut foreign = std::collections::BTreeSet::new();
    for m in msgs {
        for a in &m.attributes {
            match a {
                WireguardAttribute::PrivateKey(k) if *k != NO_PSK => spec.private_key = Some(*k),
                WireguardAttribute::ListenPort(p) => spec.listen_port = *p,
                WireguardAttribute::Peers(peers) => {
                    for peer in peers {
                        let Some(key) = peer.iter().find_map(|a| match a {
                            WireguardPeerAttribute::PublicKey(k) => Some(PublicKey(*k)),
                            _ => None,
                        }) else {
                            continue;
                        };
                        let entry = spec.peers.entry(key).or_insert_with(|| PeerSpec {
                            public_key: key,
                            endpoint: None,
                            allowed_ips: Vec::new(),
                            psk: None,
                            keepalive: 0,
                        });
                        if !stats.iter().any(|s| s.public_key == key) {
                            stats.push(PeerStats {
                                device: super::DEVICE,
                                public_key: key,
                                endpoint: None,
                                subnet: None,
                                lease_subnet: None,
                                last_handshake: None,
                                tx_bytes: 0,
                                rx_bytes: 0,
                            });
                        }
                        let st = stats
                            .iter_mut()
                            .find(|s| s.public_key == key)
                            .expect("pushed");
                        for a in peer.iter() {
                            match a {
                                WireguardPeerAttribute::PresharedKey(k) => {
                                    entry.psk = (*k != NO_PSK).then_some(*k)
                                }
                                WireguardPeerAttribute::Endpoint(e) => {
                                    // The kernel reports an IPv6 endpoint with the flow info
                                    // and scope it learnt; the plan's have none.
                                    entry.endpoint = Some(match *e {
                                        SocketAddr::V6(v6) => SocketAddr::V6(
                                            std::net::SocketAddrV6::new(*v6.ip(), v6.port(), 0, 0),
                                        ),
                                        v4 => v4,
                                    })
                                }
                                WireguardPeerAttribute::PersistentKeepalive(k) => {
                                    entry.keepalive = *k
                                }
                                WireguardPeerAttribute::LastHandshake(t) => {
                                    st.last_handshake =
                                        handshake_age(t.seconds, t.nano_seconds, now)
                                }
                                WireguardPeerAttribute::RxBytes(b) => st.rx_bytes = *b,
                                WireguardPeerAttribute::TxBytes(b) => st.tx_bytes = *b,
                                WireguardPeerAttribute::AllowedIps(ips) => {
                                    for ip in ips {
                                        match allowed_net(ip) {
                                            Some(n) => entry.allowed_ips.push(n),
                                            None => {
                                                foreign.insert(key);
                                            }
                                        }
                                    }
                                }
                                _ => {}
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }
    for (k, p) in spec.peers.iter_mut() {
        p.allowed_ips.sort();
        p.allowed_ips.dedup();
        if foreign.contains(k) {
            p.endpoint = None;
        }
    }
    for s in stats.iter_mut() {
        if let Some(p) = spec.peers.get(&s.public_key) {
            s.endpoint = p.endpoint;
            s.subnet = p.subnet_v4().map(IpNetwork::V4).or_else(|| {
                p.allowed_ips
                    .iter()
                    .find(|n| matches!(n, IpNetwork::V6(_)))
                    .copied()
            });
            s.lease_subnet = p.subnet_v4();
        }
    }
    Observed { spec, stats }
}

fn allowed_net(ip: &WireguardAllowedIp) -> Option<IpNetwork> {
    let mut addr = None;
    let mut cidr = None;
    for a in ip.iter() {
        match a {
            WireguardAllowedIpAttr::IpAddr(v) => addr = Some(*v),
            WireguardAllowedIpAttr::Cidr(c) => cidr = Some(*c),
            _ => {}
        }
    }
    let n = IpNetwork::new(addr?, cidr?).ok()?;
    IpNetwork::new(n.network(), n.prefix()).ok()
}

/// The kernel reports the handshake as wall-clock time, zero for never; a time ahead of
/// `now` (clock stepped back) counts as just now.
fn handshake_age(secs: i64, nanos: i64, now: SystemTime) -> Option<Duration> {
    if secs == 0 && nanos == 0 {
        return None;
    }
    // Values from the kernel, but parsed from a socket: an absurd one is no handshake, not a
    // panic on overflow.
    let at = UNIX_EPOCH
        .checked_add(Duration::from_secs(u64::try_from(secs).ok()?))?
        .checked_add(Duration::from_nanos(u64::try_from(nanos).ok()?))?;
    Some(now.duration_since(at).unwrap_or(Duration::ZERO))
}

/// Reads the device, plans against `desired` and writes only the difference. Returns the ops
/// written (none when the device already matches: zero writes) and the device as read.
pub fn reconcile(
    genl: &mut dyn WgGenl,
    device: &str,
    desired: &DeviceSpec,
) -> Result<(Vec<WgOp>, Observed), KernelError> {
    let observed = parse_device(&genl.get_device(device)?, SystemTime::now());
    // The kernel stores the key clamped and reads it back so: compared unclamped, an
    // unchanged device would get its key written on every pass (found in the VMs).
    let mut desired = desired.clone();
    desired.private_key = desired.private_key.map(clamp);
    let ops = super::plan::plan(&observed.spec, &desired);
    for m in messages(device, &ops) {
        genl.set_device(m)?;
    }
    Ok((ops, observed))
}

/// Curve25519 clamping, as the kernel applies it to a private key it is given (the same key
/// for X25519: the public key does not change).
pub fn clamp(mut k: [u8; 32]) -> [u8; 32] {
    k[0] &= 248;
    k[31] &= 127;
    k[31] |= 64;
    k
}

/// Whether a kernel wireguard link can be created in this namespace.
pub trait KernelProbe {
    fn probe(&mut self) -> Result<(), String>;
}

/// A probe already made (asynchronously, through the agent's netlink handle).
#[derive(Debug, Clone)]
pub struct Probed(pub Result<(), String>);

impl KernelProbe for Probed {
    fn probe(&mut self) -> Result<(), String> {
        self.0.clone()
    }
}

/// Shared, so a test keeps a handle on the fake device the backend writes to.
impl<T: WgGenl> WgGenl for std::sync::Arc<std::sync::Mutex<T>> {
    fn get_device(&mut self, device: &str) -> Result<Vec<WireguardMessage>, KernelError> {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_device(device)
    }

    fn set_device(&mut self, msg: WireguardMessage) -> Result<(), KernelError> {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_device(msg)
    }
}

/// What runs: `kernel` insists (and fails with the probe's reason), `userspace` never probes,
/// `auto` takes the kernel when the probe succeeds.
pub fn choose(wanted: WgImpl, probe: &mut dyn KernelProbe) -> Result<WgImpl, super::WgError> {
    match wanted {
        WgImpl::Userspace => Ok(WgImpl::Userspace),
        WgImpl::Kernel => probe
            .probe()
            .map(|()| WgImpl::Kernel)
            .map_err(|why| super::WgError::Unavailable("kernel", why)),
        WgImpl::Auto => Ok(match probe.probe() {
            Ok(()) => WgImpl::Kernel,
            Err(why) => {
                tracing::info!(reason = %why, "wireguard: no kernel implementation, userspace runs");
                WgImpl::Userspace
            }
        }),
    }
}

/// Creates a `wireguard` link over rtnetlink in the calling thread's namespace (which also
/// makes a kernel with the module loadable load it). Fails with the kernel's errno otherwise
/// (`EOPNOTSUPP`: no such link kind).
pub fn add_link(name: &str) -> Result<(), KernelError> {
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_string()));
    msg.attributes
        .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
            InfoKind::Wireguard,
        )]));
    let mut nl = NetlinkMessage::from(RouteNetlinkMessage::NewLink(msg));
    nl.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    rtnl(nl, "creating a wireguard link", name)
}

pub fn del_link(name: &str) -> Result<(), KernelError> {
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_string()));
    let mut nl = NetlinkMessage::from(RouteNetlinkMessage::DelLink(msg));
    nl.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    rtnl(nl, "deleting the link", name)
}

fn rtnl(
    nl: NetlinkMessage<RouteNetlinkMessage>,
    what: &'static str,
    name: &str,
) -> Result<(), KernelError> {
    let io = |source| KernelError::Io {
        what,
        device: name.to_string(),
        source,
    };
    let mut sock = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE).map_err(io)?;
    sock.bind_auto().map_err(io)?;
    sock.connect(&netlink_sys::SocketAddr::new(0, 0))
        .map_err(io)?;
    exchange(&sock, &mut 0, nl, what, name).map(|_| ())
}

/// The real probe: a throw-away link named after the process (unique per agent, at most 15
/// bytes), created and deleted.
#[derive(Debug, Default)]
pub struct LinkProbe;

impl KernelProbe for LinkProbe {
    fn probe(&mut self) -> Result<(), String> {
        let name = format!("twwg{}", std::process::id() % 100_000_000);
        add_link(&name).map_err(|e| e.to_string())?;
        del_link(&name).map_err(|e| e.to_string())
    }
}

/// The kernel over a blocking generic netlink socket in the calling thread's namespace.
pub struct RealGenl {
    sock: netlink_sys::Socket,
    family: u16,
    seq: u32,
}

impl RealGenl {
    /// Opens the socket and resolves the `wireguard` family; [`KernelError::NoModule`] when
    /// the kernel has none.
    pub fn open() -> Result<RealGenl, KernelError> {
        let io = |what, source| KernelError::Io {
            what,
            device: "-".into(),
            source,
        };
        let mut sock = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_GENERIC)
            .map_err(|e| io("opening a generic netlink socket", e))?;
        sock.bind_auto()
            .map_err(|e| io("binding the generic netlink socket", e))?;
        sock.connect(&netlink_sys::SocketAddr::new(0, 0))
            .map_err(|e| io("connecting the generic netlink socket", e))?;
        let mut g = RealGenl {
            sock,
            family: 0,
            seq: 0,
        };
        let mut req = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(
                WireguardMessage::family_name().to_string(),
            )],
        });
        req.finalize();
        let mut nl = NetlinkMessage::from(req);
        nl.header.flags = NLM_F_REQUEST;
        let replies = match exchange(
            &g.sock,
            &mut g.seq,
            nl,
            "resolving the wireguard family",
            "-",
        ) {
            Err(KernelError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
                return Err(KernelError::NoModule)
            }
            r => r?,
        };
        g.family = replies
            .iter()
            .flat_map(|m| m.payload.nlas.iter())
            .find_map(|a| match a {
                GenlCtrlAttrs::FamilyId(id) => Some(*id),
                _ => None,
            })
            .ok_or(KernelError::NoModule)?;
        Ok(g)
    }

    fn wg(&self, payload: WireguardMessage) -> GenlMessage<WireguardMessage> {
        let mut m = GenlMessage::from_payload(payload);
        m.set_resolved_family_id(self.family);
        m.finalize();
        m
    }
}

/// Sends `msg` on `sock` and collects the replies to it until the ack, the dump's end or (a
/// plain request) the first answer; a netlink error comes back as the errno it carries.
fn exchange<I>(
    sock: &netlink_sys::Socket,
    seq: &mut u32,
    mut msg: NetlinkMessage<I>,
    what: &'static str,
    device: &str,
) -> Result<Vec<I>, KernelError>
where
    I: netlink_packet_core::NetlinkSerializable
        + netlink_packet_core::NetlinkDeserializable
        + std::fmt::Debug,
{
    let io = |source| KernelError::Io {
        what,
        device: device.to_string(),
        source,
    };
    let decode = |detail: String| KernelError::Decode {
        what,
        device: device.to_string(),
        detail,
    };
    *seq = seq.wrapping_add(1);
    msg.header.sequence_number = *seq;
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    sock.send(&buf, 0).map_err(io)?;
    let dump = msg.header.flags & NLM_F_DUMP == NLM_F_DUMP;
    let acked = msg.header.flags & NLM_F_ACK != 0;
    let mut out = Vec::new();
    loop {
        let (data, _) = sock.recv_from_full().map_err(io)?;
        let mut off = 0;
        while off < data.len() {
            let reply = NetlinkMessage::<I>::deserialize(&data[off..])
                .map_err(|e| decode(e.to_string()))?;
            let len = reply.header.length as usize;
            if len == 0 {
                return Err(decode("zero-length message".into()));
            }
            off += (len + 3) & !3;
            if reply.header.sequence_number != *seq {
                continue;
            }
            match reply.payload {
                NetlinkPayload::InnerMessage(m) => {
                    out.push(m);
                    if !dump && !acked {
                        return Ok(out);
                    }
                }
                NetlinkPayload::Error(e) => {
                    return match e.code {
                        None => Ok(out),
                        Some(_) => Err(io(e.to_io())),
                    };
                }
                NetlinkPayload::Done(_) => return Ok(out),
                _ => {}
            }
        }
    }
}

impl WgGenl for RealGenl {
    fn get_device(&mut self, device: &str) -> Result<Vec<WireguardMessage>, KernelError> {
        let mut nl = NetlinkMessage::from(self.wg(WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::IfName(device.to_string())],
        }));
        nl.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        Ok(
            exchange(&self.sock, &mut self.seq, nl, "reading the device", device)?
                .into_iter()
                .map(|m| m.payload)
                .collect(),
        )
    }

    fn set_device(&mut self, msg: WireguardMessage) -> Result<(), KernelError> {
        let device = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                WireguardAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            })
            .unwrap_or_default();
        let mut nl = NetlinkMessage::from(self.wg(msg));
        nl.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        exchange(
            &self.sock,
            &mut self.seq,
            nl,
            "configuring the device",
            &device,
        )?;
        Ok(())
    }
}

/// An in-memory kernel device: applies SET_DEVICE with the kernel's rules for the flags the
/// translation uses (and clamps the private key, as the kernel does), answers GET_DEVICE from
/// its state, and counts writes.
#[derive(Debug, Default)]
pub struct FakeGenl {
    pub device: String,
    pub private_key: Option<[u8; 32]>,
    pub listen_port: u16,
    /// In insertion order, as the kernel lists them.
    pub peers: Vec<FakePeer>,
    pub writes: usize,
    /// The largest number of peers one GET_DEVICE message carries (the kernel splits dumps).
    pub peers_per_message: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakePeer {
    pub public_key: [u8; 32],
    pub psk: [u8; 32],
    pub endpoint: Option<SocketAddr>,
    pub keepalive: u16,
    pub allowed: Vec<(IpAddr, u8)>,
    pub last_handshake: (i64, i64),
    pub rx: u64,
    pub tx: u64,
}

impl FakeGenl {
    pub fn new(device: &str) -> FakeGenl {
        FakeGenl {
            device: device.into(),
            peers_per_message: 2,
            ..FakeGenl::default()
        }
    }

    fn check(&self, attrs: &[WireguardAttribute]) -> Result<(), KernelError> {
        let named = attrs
            .iter()
            .any(|a| matches!(a, WireguardAttribute::IfName(n) if *n == self.device));
        if named {
            Ok(())
        } else {
            Err(KernelError::Io {
                what: "fake device lookup",
                device: format!("{attrs:?}"),
                source: std::io::Error::from_raw_os_error(libc::ENODEV),
            })
        }
    }
}

impl WgGenl for FakeGenl {
    fn get_device(&mut self, device: &str) -> Result<Vec<WireguardMessage>, KernelError> {
        self.check(&[WireguardAttribute::IfName(device.to_string())])?;
        let mut head = vec![
            WireguardAttribute::IfName(self.device.clone()),
            WireguardAttribute::ListenPort(self.listen_port),
        ];
        if let Some(k) = self.private_key {
            head.push(WireguardAttribute::PrivateKey(k));
        }
        let peers: Vec<WireguardPeer> = self
            .peers
            .iter()
            .map(|p| {
                let mut a = vec![
                    WireguardPeerAttribute::PublicKey(p.public_key),
                    WireguardPeerAttribute::PresharedKey(p.psk),
                    WireguardPeerAttribute::PersistentKeepalive(p.keepalive),
                    WireguardPeerAttribute::LastHandshake(
                        netlink_packet_wireguard::WireguardTimeSpec {
                            seconds: p.last_handshake.0,
                            nano_seconds: p.last_handshake.1,
                        },
                    ),
                    WireguardPeerAttribute::RxBytes(p.rx),
                    WireguardPeerAttribute::TxBytes(p.tx),
                ];
                if let Some(e) = p.endpoint {
                    a.push(WireguardPeerAttribute::Endpoint(e));
                }
                a.push(WireguardPeerAttribute::AllowedIps(
                    p.allowed
                        .iter()
                        .map(|(ip, c)| {
                            WireguardAllowedIp(vec![
                                WireguardAllowedIpAttr::Family(if ip.is_ipv4() {
                                    WireguardAddressFamily::Ipv4
                                } else {
                                    WireguardAddressFamily::Ipv6
                                }),
                                WireguardAllowedIpAttr::IpAddr(*ip),
                                WireguardAllowedIpAttr::Cidr(*c),
                            ])
                        })
                        .collect(),
                ));
                WireguardPeer(a)
            })
            .collect();
        let mut out = vec![WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: head,
        }];
        for chunk in peers.chunks(self.peers_per_message.max(1)) {
            out.push(WireguardMessage {
                cmd: WireguardCmd::GetDevice,
                attributes: vec![
                    WireguardAttribute::IfName(self.device.clone()),
                    WireguardAttribute::Peers(chunk.to_vec()),
                ],
            });
        }
        Ok(out)
    }

    fn set_device(&mut self, msg: WireguardMessage) -> Result<(), KernelError> {
        self.check(&msg.attributes)?;
        self.writes += 1;
        for a in msg.attributes {
            match a {
                WireguardAttribute::PrivateKey(k) => self.private_key = Some(clamp(k)),
                WireguardAttribute::ListenPort(p) => self.listen_port = p,
                WireguardAttribute::Peers(peers) => {
                    for peer in peers {
                        let Some(key) = peer.iter().find_map(|a| match a {
                            WireguardPeerAttribute::PublicKey(k) => Some(*k),
                            _ => None,
                        }) else {
                            continue;
                        };
                        let flags = peer
                            .iter()
                            .find_map(|a| match a {
                                WireguardPeerAttribute::Flags(f) => Some(*f),
                                _ => None,
                            })
                            .unwrap_or(WireguardPeerFlags::empty());
                        if flags.contains(WireguardPeerFlags::RemoveMe) {
                            self.peers.retain(|p| p.public_key != key);
                            continue;
                        }
                        let idx = match self.peers.iter().position(|p| p.public_key == key) {
                            Some(i) => i,
                            None => {
                                self.peers.push(FakePeer {
                                    public_key: key,
                                    psk: NO_PSK,
                                    endpoint: None,
                                    keepalive: 0,
                                    allowed: Vec::new(),
                                    last_handshake: (0, 0),
                                    rx: 0,
                                    tx: 0,
                                });
                                self.peers.len() - 1
                            }
                        };
                        let p = &mut self.peers[idx];
                        if flags.contains(WireguardPeerFlags::ReplaceAllowedIps) {
                            p.allowed.clear();
                        }
                        for a in peer.iter() {
                            match a {
                                WireguardPeerAttribute::PresharedKey(k) => p.psk = *k,
                                WireguardPeerAttribute::Endpoint(e) => p.endpoint = Some(*e),
                                WireguardPeerAttribute::PersistentKeepalive(k) => p.keepalive = *k,
                                WireguardPeerAttribute::AllowedIps(ips) => {
                                    for ip in ips {
                                        let mut addr = None;
                                        let mut cidr = None;
                                        for x in ip.iter() {
                                            match x {
                                                WireguardAllowedIpAttr::IpAddr(a) => {
                                                    addr = Some(*a)
                                                }
                                                WireguardAllowedIpAttr::Cidr(c) => cidr = Some(*c),
                                                _ => {}
                                            }
                                        }
                                        if let (Some(a), Some(c)) = (addr, cidr) {
                                            p.allowed.push((a, c));
                                        }
                                    }
                                }
                                _ => {}
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Several fake devices behind one socket (`Mode: separate`'s two): a message goes to the
/// device it names.
#[cfg(test)]
pub struct FakeGenls(pub Vec<std::sync::Arc<std::sync::Mutex<FakeGenl>>>);

#[cfg(test)]
impl FakeGenls {
    fn named(
        &self,
        device: &str,
    ) -> Result<&std::sync::Arc<std::sync::Mutex<FakeGenl>>, KernelError> {
        self.0
            .iter()
            .find(|g| g.lock().unwrap().device == device)
            .ok_or_else(|| KernelError::Io {
                what: "fake device lookup",
                device: device.into(),
                source: std::io::Error::from_raw_os_error(libc::ENODEV),
            })
    }
}

#[cfg(test)]
impl WgGenl for FakeGenls {
    fn get_device(&mut self, device: &str) -> Result<Vec<WireguardMessage>, KernelError> {
        self.named(device)?.lock().unwrap().get_device(device)
    }

    fn set_device(&mut self, msg: WireguardMessage) -> Result<(), KernelError> {
        let name = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                WireguardAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            })
            .unwrap_or_default();
        self.named(&name)?.lock().unwrap().set_device(msg)
    }
}

#[cfg(test)]
mod tests;
