//! The kernel side: one NETLINK_ROUTE socket in the network namespace of the thread that opened
//! it, driven by a task on the current tokio runtime.
//!
//! Changes are batched: up to [`BATCH`] requests travel in one `sendmsg`, which the kernel works
//! through in order, acking each; all batches are queued at once. Forking `ip` costs ~6 ms a
//! call, and even one request per round trip means 15,000 round trips for 5,000 vxlan peers;
//! batched, programming them is bound by the kernel's own route insertion (~0.3 s, the same as
//! `ip -batch`).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};

use futures::stream::StreamExt;
use ipnetwork::{Ipv4Network, Ipv6Network};
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR,
    NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
};
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use rtnetlink::packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoPortKind, InfoVeth, InfoVxlan,
    LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::proto::{ConnectionHandle, NetlinkCodec};
use rtnetlink::sys::{protocols::NETLINK_ROUTE, AsyncSocket, SocketAddr, TokioSocket};
use rtnetlink::LinkVxlan;

use super::error::NetlinkError;
use super::netns::Netns;
use super::op::Op;
use super::types::{
    Addr, Addr6, FdbEntry, FdbEntry6, Link, MacAddr, Neighbour, Neighbour6, Route, Route6,
    VxlanAttrs,
};

/// Requests per `sendmsg`. Every request is acked, and all acks of a batch land in the receive
/// buffer before we read any; a full buffer makes the kernel drop acks, which would leave their
/// requests waiting forever. 128 acks take well under 200 KiB even at the default buffer size.
const BATCH: usize = 128;
/// Receive buffer asked for: a dump of thousands of entries then needs fewer wake-ups.
const RCVBUF: usize = 4 << 20;
const NUD_PERMANENT: u16 = 0x80;
const RT_TABLE_MAIN: u32 = 254;

/// Cheap to clone: clones share the socket. The socket closes when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct Real {
    handle: ConnectionHandle<RouteNetlinkMessage>,
}

impl Real {
    /// Opens the socket in the calling thread's network namespace and spawns its driver on the
    /// current tokio runtime.
    pub fn connect() -> Result<Real, NetlinkError> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| NetlinkError::NoRuntime)?;
        let (mut conn, handle, _unsolicited) =
            rtnetlink::proto::new_connection::<RouteNetlinkMessage>(NETLINK_ROUTE)
                .map_err(NetlinkError::Connect)?;
        // Batches are matched to their ops by position, which needs one reply per request,
        // successes included.
        conn.set_forward_ack(true);
        grow_rcvbuf(conn.socket_mut().socket_mut());
        rt.spawn(conn);
        Ok(Real { handle })
    }

    /// Like [`Real::connect`], with the socket opened inside `netns`: a socket belongs to the
    /// namespace it was created in, so only its creation needs to happen there.
    pub fn connect_in(netns: &Netns) -> Result<Real, NetlinkError> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| NetlinkError::NoRuntime)?;
        let sock = netns
            .run(|| rtnetlink::sys::Socket::new(NETLINK_ROUTE))?
            .map_err(NetlinkError::Connect)?;
        let fd = sock.into_raw_fd();
        // SAFETY: `fd` is a NETLINK_ROUTE socket we own (just released by `into_raw_fd`); the
        // TokioSocket takes it over and registers it with the runtime entered below.
        let socket = {
            let _enter = rt.enter();
            unsafe { TokioSocket::from_raw_fd(fd) }
        };
        let (mut conn, handle, _unsolicited) = rtnetlink::proto::from_socket_with_codec::<
            RouteNetlinkMessage,
            TokioSocket,
            NetlinkCodec,
        >(socket);
        conn.set_forward_ack(true);
        grow_rcvbuf(conn.socket_mut().socket_mut());
        rt.spawn(conn);
        Ok(Real { handle })
    }

    pub(crate) async fn apply_all(&self, ops: &[Op]) -> Vec<Result<(), NetlinkError>> {
        // All batches are queued up front, in op order; the connection sends them one at a time
        // and reads every ack before the next send, so the kernel sees the ops exactly in
        // sequence. (A stream of per-batch closures would be neater but makes the future fail
        // the higher-ranked `Send` check the run loop's `tokio::spawn` needs.)
        let mut pending = Vec::with_capacity(ops.len().div_ceil(BATCH));
        for chunk in ops.chunks(BATCH) {
            let msgs = chunk.iter().map(op_message).collect::<Vec<_>>();
            let replies = self.handle.request_batch(msgs, SocketAddr::new(0, 0)).ok();
            pending.push((chunk, replies));
        }
        let mut results = Vec::with_capacity(ops.len());
        for (chunk, replies) in pending {
            let replies = match replies {
                Some(r) => r.collect::<Vec<_>>().await,
                None => Vec::new(),
            };
            results.extend(batch_results(chunk, replies));
        }
        self.settle_existing_links(ops, &mut results).await;
        results
    }

    /// Creating a device that already exists with exactly the requested attributes counts as
    /// success, which makes `LinkAddVxlan` idempotent like every other op.
    async fn settle_existing_links(&self, ops: &[Op], results: &mut [Result<(), NetlinkError>]) {
        for (op, res) in ops.iter().zip(results.iter_mut()) {
            if !matches!(res, Err(e) if e.errno() == Some(libc::EEXIST)) {
                continue;
            }
            match op {
                Op::LinkAddVxlan(spec) => {
                    if let Ok(Some(link)) = self.link_by_name(&spec.name).await {
                        if link.vxlan == Some(spec.attrs()) {
                            *res = Ok(());
                        }
                    }
                }
                Op::LinkAddBridge(spec) => {
                    if let Ok(Some(link)) = self.link_by_name(&spec.name).await {
                        if link.kind.as_deref() == Some("bridge") {
                            *res = Ok(());
                        }
                    }
                }
                Op::LinkAddWireguard { name } => {
                    if let Ok(Some(link)) = self.link_by_name(name).await {
                        if link.kind.as_deref() == Some("wireguard") {
                            *res = Ok(());
                        }
                    }
                }
                _ => {}
            }
        }
    }

    async fn dump(
        &self,
        msg: RouteNetlinkMessage,
        what: &str,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        // A dump that raced with a change says so with NLM_F_DUMP_INTR and may miss entries;
        // a plan built from it could delete something live, so read it again.
        for _ in 0..5 {
            let mut req = NetlinkMessage::from(msg.clone());
            req.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
            let mut replies = self
                .handle
                .request(req, SocketAddr::new(0, 0))
                .map_err(|_| closed(what))?;
            let mut out = Vec::new();
            let mut interrupted = false;
            while let Some(m) = replies.next().await {
                interrupted |= m.header.flags & NLM_F_DUMP_INTR != 0;
                match m.payload {
                    NetlinkPayload::InnerMessage(inner) => out.push(inner),
                    NetlinkPayload::Error(e) if e.code.is_some() => {
                        return Err(NetlinkError::Query {
                            what: what.to_string(),
                            source: e.to_io(),
                        })
                    }
                    NetlinkPayload::Overrun(_) => {
                        return Err(NetlinkError::Query {
                            what: what.to_string(),
                            source: io::Error::from_raw_os_error(libc::ENOBUFS),
                        })
                    }
                    _ => {}
                }
            }
            if !interrupted {
                return Ok(out);
            }
        }
        Err(NetlinkError::Unexpected {
            what: what.to_string(),
            detail: "the dump was interrupted by concurrent changes five times in a row".into(),
        })
    }

    async fn get_link(&self, msg: LinkMessage, what: &str) -> Result<Option<Link>, NetlinkError> {
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetLink(msg));
        req.header.flags = NLM_F_REQUEST;
        let mut replies = self
            .handle
            .request(req, SocketAddr::new(0, 0))
            .map_err(|_| closed(what))?;
        let mut found = None;
        while let Some(m) = replies.next().await {
            match m.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
                    found = Some(parse_link(&l))
                }
                NetlinkPayload::Error(e) if e.raw_code() == -libc::ENODEV => return Ok(None),
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    return Err(NetlinkError::Query {
                        what: what.to_string(),
                        source: e.to_io(),
                    })
                }
                _ => {}
            }
        }
        Ok(found)
    }

    pub(crate) async fn link_by_name(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        self.get_link(msg, &format!("looking up link {name}")).await
    }

    pub(crate) async fn link_by_index(&self, index: u32) -> Result<Option<Link>, NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.get_link(msg, &format!("looking up link #{index}"))
            .await
    }

    pub(crate) async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let msgs = self
            .dump(
                RouteNetlinkMessage::GetLink(LinkMessage::default()),
                "listing links",
            )
            .await?;
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(parse_link(l)),
                _ => None,
            })
            .collect())
    }

    pub(crate) async fn addresses(&self, ifindex: Option<u32>) -> Result<Vec<Addr>, NetlinkError> {
        let mut q = AddressMessage::default();
        q.header.family = AddressFamily::Inet;
        let msgs = self
            .dump(RouteNetlinkMessage::GetAddress(q), "listing IPv4 addresses")
            .await?;
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => parse_addr(a),
                _ => None,
            })
            .filter(|a| ifindex.is_none_or(|i| a.ifindex == i))
            .collect())
    }

    pub(crate) async fn addresses6(
        &self,
        ifindex: Option<u32>,
    ) -> Result<Vec<Addr6>, NetlinkError> {
        let mut q = AddressMessage::default();
        q.header.family = AddressFamily::Inet6;
        let msgs = self
            .dump(RouteNetlinkMessage::GetAddress(q), "listing IPv6 addresses")
            .await?;
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => parse_addr6(a),
                _ => None,
            })
            .filter(|a| ifindex.is_none_or(|i| a.ifindex == i))
            .collect())
    }

    pub(crate) async fn neighbours(&self, ifindex: u32) -> Result<Vec<Neighbour>, NetlinkError> {
        self.neighbour_dump(AddressFamily::Inet, "listing IPv4 neighbours", |n| {
            parse_neigh(n).filter(|n| n.ifindex == ifindex)
        })
        .await
    }

    pub(crate) async fn fdb(&self, ifindex: u32) -> Result<Vec<FdbEntry>, NetlinkError> {
        self.neighbour_dump(AddressFamily::Bridge, "listing bridge FDB entries", |e| {
            parse_fdb(e).filter(|e| e.ifindex == ifindex)
        })
        .await
    }

    pub(crate) async fn neighbours6(&self, ifindex: u32) -> Result<Vec<Neighbour6>, NetlinkError> {
        self.neighbour_dump(AddressFamily::Inet6, "listing IPv6 neighbours", |n| {
            parse_neigh6(n).filter(|n| n.ifindex == ifindex)
        })
        .await
    }

    pub(crate) async fn fdb6(&self, ifindex: u32) -> Result<Vec<FdbEntry6>, NetlinkError> {
        self.neighbour_dump(AddressFamily::Bridge, "listing bridge FDB entries", |e| {
            parse_fdb6(e).filter(|e| e.ifindex == ifindex)
        })
        .await
    }

    /// One dump of the neighbour table of `family` (the bridge family for FDB entries), each
    /// message kept if `keep` makes something of it.
    async fn neighbour_dump<T>(
        &self,
        family: AddressFamily,
        what: &'static str,
        keep: impl Fn(&NeighbourMessage) -> Option<T>,
    ) -> Result<Vec<T>, NetlinkError> {
        let mut q = NeighbourMessage::default();
        q.header.family = family;
        let msgs = self
            .dump(RouteNetlinkMessage::GetNeighbour(q), what)
            .await?;
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => keep(n),
                _ => None,
            })
            .collect())
    }

    /// All IPv6 unicast routes of the main table.
    pub(crate) async fn routes6(&self) -> Result<Vec<Route6>, NetlinkError> {
        let mut q = RouteMessage::default();
        q.header.address_family = AddressFamily::Inet6;
        let msgs = self
            .dump(RouteNetlinkMessage::GetRoute(q), "listing IPv6 routes")
            .await?;
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => parse_route6(r),
                _ => None,
            })
            .collect())
    }

    /// All IPv4 unicast routes of the main table.
    pub(crate) async fn routes(&self) -> Result<Vec<Route>, NetlinkError> {
        let mut q = RouteMessage::default();
        q.header.address_family = AddressFamily::Inet;
        let msgs = self
            .dump(RouteNetlinkMessage::GetRoute(q), "listing IPv4 routes")
            .await?;
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => parse_route(r),
                _ => None,
            })
            .collect())
    }
}

fn closed(what: &str) -> NetlinkError {
    NetlinkError::Closed {
        what: what.to_string(),
    }
}

pub(crate) fn grow_rcvbuf(sock: &rtnetlink::sys::Socket) {
    let size = RCVBUF as libc::c_int;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live local; the fd is owned by
    // `sock` and open for the duration of the call.
    let forced = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    // Without CAP_NET_ADMIN only the rmem_max-capped size is allowed; batches are sized to cope.
    if forced != 0 {
        if let Err(e) = sock.set_rx_buf_sz(RCVBUF) {
            tracing::debug!("netlink: keeping the default receive buffer: {e}");
        }
    }
}

fn batch_results(
    ops: &[Op],
    replies: Vec<NetlinkMessage<RouteNetlinkMessage>>,
) -> Vec<Result<(), NetlinkError>> {
    let mut replies = replies.into_iter();
    ops.iter()
        .map(|op| match replies.next().map(|m| m.payload) {
            Some(NetlinkPayload::Error(e)) => match e.code {
                None => Ok(()),
                Some(_) if op.gone_errnos().contains(&-e.raw_code()) => Ok(()),
                Some(_) => Err(NetlinkError::Op {
                    op: Box::new(op.clone()),
                    source: e.to_io(),
                }),
            },
            Some(other) => Err(NetlinkError::Unexpected {
                what: op.to_string(),
                detail: format!("message type {}", other.message_type()),
            }),
            None => Err(closed(&op.to_string())),
        })
        .collect()
}

fn op_message(op: &Op) -> NetlinkMessage<RouteNetlinkMessage> {
    const ADD: u16 = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
    const PLAIN: u16 = NLM_F_REQUEST | NLM_F_ACK;
    let (msg, flags) = match op {
        Op::LinkAddVxlan(s) => {
            let mut b = LinkVxlan::new(&s.name, s.vni)
                .dev(s.underlay)
                .port(s.port)
                .learning(s.learning);
            b = match s.local {
                IpAddr::V4(ip) => b.local(ip),
                IpAddr::V6(ip) => b.local6(ip),
            };
            if let Some(mtu) = s.mtu {
                b = b.mtu(mtu);
            }
            if let Some(mac) = s.mac {
                b = b.address(mac.octets().to_vec());
            }
            // The kernel refuses NLM_F_REPLACE for links, and without NLM_F_EXCL an existing
            // device would get a partial changelink (vxlan rejects a port, after maybe taking
            // the MTU). EEXIST is sorted out afterwards, see `settle_existing_links`.
            (
                RouteNetlinkMessage::NewLink(b.build()),
                PLAIN | NLM_F_CREATE | NLM_F_EXCL,
            )
        }
        Op::LinkSetUp { name } => {
            let mut m = link_named(name);
            m.header.flags = LinkFlags::Up;
            m.header.change_mask = LinkFlags::Up;
            (RouteNetlinkMessage::SetLink(m), PLAIN)
        }
        Op::LinkSetMtu { name, mtu } => {
            let mut m = link_named(name);
            m.attributes.push(LinkAttribute::Mtu(*mtu));
            (RouteNetlinkMessage::SetLink(m), PLAIN)
        }
        Op::LinkDel { name } => (RouteNetlinkMessage::DelLink(link_named(name)), PLAIN),
        Op::LinkDelIndex { ifindex } => {
            let mut m = LinkMessage::default();
            m.header.index = *ifindex;
            (RouteNetlinkMessage::DelLink(m), PLAIN)
        }
        Op::LinkAddBridge(b) => {
            let mut m = link_named(&b.name);
            if let Some(mtu) = b.mtu {
                m.attributes.push(LinkAttribute::Mtu(mtu));
            }
            if let Some(mac) = b.mac {
                m.attributes
                    .push(LinkAttribute::Address(mac.octets().to_vec()));
            }
            m.attributes
                .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                    InfoKind::Bridge,
                )]));
            // Same reasoning as for vxlan: EEXIST is settled afterwards.
            (
                RouteNetlinkMessage::NewLink(m),
                PLAIN | NLM_F_CREATE | NLM_F_EXCL,
            )
        }
        Op::LinkAddWireguard { name } => {
            let mut m = link_named(name);
            m.attributes
                .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                    InfoKind::Wireguard,
                )]));
            // EEXIST is settled afterwards, as for a bridge.
            (
                RouteNetlinkMessage::NewLink(m),
                PLAIN | NLM_F_CREATE | NLM_F_EXCL,
            )
        }
        Op::LinkAddVeth(v) => {
            let mut peer = link_named(&v.peer);
            // One queue each way, asked for up front: a veth is otherwise created with one
            // queue per possible CPU and then cut down to one active queue, and that cut waits
            // for an RCU grace period (synchronize_net, under RTNL), for each end: most of a
            // veth add's kernel time on a busy node.
            let queues = [LinkAttribute::NumTxQueues(1), LinkAttribute::NumRxQueues(1)];
            peer.attributes.extend(queues.clone());
            if let Some(mtu) = v.mtu {
                peer.attributes.push(LinkAttribute::Mtu(mtu));
            }
            if let Some(mac) = v.peer_mac {
                peer.attributes
                    .push(LinkAttribute::Address(mac.octets().to_vec()));
            }
            if let Some(fd) = v.peer_netns {
                peer.attributes.push(LinkAttribute::NetNsFd(fd));
            }
            let mut m = link_named(&v.name);
            m.attributes.extend(queues);
            if let Some(mtu) = v.mtu {
                m.attributes.push(LinkAttribute::Mtu(mtu));
            }
            if let Some(mac) = v.mac {
                m.attributes
                    .push(LinkAttribute::Address(mac.octets().to_vec()));
            }
            m.attributes.push(LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Veth),
                LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
            ]));
            (
                RouteNetlinkMessage::NewLink(m),
                PLAIN | NLM_F_CREATE | NLM_F_EXCL,
            )
        }
        Op::LinkSetDown { name } => {
            let mut m = link_named(name);
            m.header.change_mask = LinkFlags::Up;
            (RouteNetlinkMessage::SetLink(m), PLAIN)
        }
        Op::LinkSetMaster { name, master } => {
            let mut m = link_named(name);
            m.attributes
                .push(LinkAttribute::Controller(master.unwrap_or(0)));
            (RouteNetlinkMessage::SetLink(m), PLAIN)
        }
        Op::LinkSetMac { name, mac } => {
            let mut m = link_named(name);
            m.attributes
                .push(LinkAttribute::Address(mac.octets().to_vec()));
            (RouteNetlinkMessage::SetLink(m), PLAIN)
        }
        Op::LinkSetAlias { name, alias } => {
            let mut m = link_named(name);
            m.attributes.push(LinkAttribute::IfAlias(alias.clone()));
            (RouteNetlinkMessage::SetLink(m), PLAIN)
        }
        Op::LinkSetHairpin { name, on } => {
            let mut m = link_named(name);
            m.attributes.push(LinkAttribute::LinkInfo(vec![
                LinkInfo::PortKind(InfoPortKind::Bridge),
                LinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::HairpinMode(
                    *on,
                )])),
            ]));
            // RTM_NEWLINK on an existing device is a change; slave data needs it (not SETLINK).
            (RouteNetlinkMessage::NewLink(m), PLAIN)
        }
        Op::LinkSetNetns { name, netns } => {
            let mut m = link_named(name);
            m.attributes.push(LinkAttribute::NetNsFd(*netns));
            (RouteNetlinkMessage::SetLink(m), PLAIN)
        }
        Op::LinkRename { ifindex, new_name } => {
            let mut m = LinkMessage::default();
            m.header.index = *ifindex;
            m.attributes.push(LinkAttribute::IfName(new_name.clone()));
            (RouteNetlinkMessage::SetLink(m), PLAIN)
        }
        Op::AddrAdd { ifindex, addr } => (
            RouteNetlinkMessage::NewAddress(addr_msg(*ifindex, addr)),
            ADD,
        ),
        Op::AddrDel { ifindex, addr } => (
            RouteNetlinkMessage::DelAddress(addr_msg(*ifindex, addr)),
            PLAIN,
        ),
        Op::Addr6Add {
            ifindex,
            addr,
            nodad,
        } => {
            let mut m = addr6_msg(*ifindex, addr);
            if *nodad {
                // Both places: the header byte for older kernels, IFA_FLAGS for newer ones.
                m.header.flags = AddressHeaderFlags::Nodad;
                m.attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            (RouteNetlinkMessage::NewAddress(m), ADD)
        }
        Op::Addr6Del { ifindex, addr } => (
            RouteNetlinkMessage::DelAddress(addr6_msg(*ifindex, addr)),
            PLAIN,
        ),
        Op::NeighReplace { ifindex, ip, mac } => (
            neigh_new(
                AddressFamily::Inet,
                *ifindex,
                NeighbourAddress::Inet(*ip),
                mac,
            ),
            ADD,
        ),
        Op::NeighDel { ifindex, ip } => (
            neigh_del(AddressFamily::Inet, *ifindex, NeighbourAddress::Inet(*ip)),
            PLAIN,
        ),
        Op::FdbReplace { ifindex, mac, dst } => {
            (fdb_new(*ifindex, mac, NeighbourAddress::Inet(*dst)), ADD)
        }
        Op::FdbDel { ifindex, mac, dst } => (
            fdb_del(*ifindex, mac, dst.map(NeighbourAddress::Inet)),
            PLAIN,
        ),
        Op::RouteReplace(r) => (route_new(route_msg(r), r.protocol, r.onlink), ADD),
        Op::RouteDel(r) => (route_del(route_msg(r)), PLAIN),
        Op::Neigh6Replace { ifindex, ip, mac } => (
            neigh_new(
                AddressFamily::Inet6,
                *ifindex,
                NeighbourAddress::Inet6(*ip),
                mac,
            ),
            ADD,
        ),
        Op::Neigh6Del { ifindex, ip } => (
            neigh_del(AddressFamily::Inet6, *ifindex, NeighbourAddress::Inet6(*ip)),
            PLAIN,
        ),
        Op::Fdb6Replace { ifindex, mac, dst } => {
            (fdb_new(*ifindex, mac, NeighbourAddress::Inet6(*dst)), ADD)
        }
        Op::Fdb6Del { ifindex, mac, dst } => (
            fdb_del(*ifindex, mac, dst.map(NeighbourAddress::Inet6)),
            PLAIN,
        ),
        Op::Route6Replace(r) => (route_new(route6_msg(r), r.protocol, r.onlink), ADD),
        Op::Route6Del(r) => (route_del(route6_msg(r)), PLAIN),
    };
    let mut nl = NetlinkMessage::from(msg);
    nl.header.flags = flags;
    nl
}

fn link_named(name: &str) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.to_string()));
    m
}

fn addr_msg(ifindex: u32, addr: &Ipv4Network) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.prefix_len = addr.prefix();
    m.header.scope = AddressScope::Universe;
    m.header.index = ifindex;
    m.attributes.push(AddressAttribute::Local(addr.ip().into()));
    m.attributes
        .push(AddressAttribute::Address(addr.ip().into()));
    m
}

fn addr6_msg(ifindex: u32, addr: &Ipv6Network) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = AddressFamily::Inet6;
    m.header.prefix_len = addr.prefix();
    m.header.scope = AddressScope::Universe;
    m.header.index = ifindex;
    m.attributes.push(AddressAttribute::Local(addr.ip().into()));
    m.attributes
        .push(AddressAttribute::Address(addr.ip().into()));
    m
}

/// A permanent ARP (IPv4) or NDP (IPv6) entry for `dst`.
fn neigh_new(
    family: AddressFamily,
    ifindex: u32,
    dst: NeighbourAddress,
    mac: &MacAddr,
) -> RouteNetlinkMessage {
    let mut m = neigh_msg(family, ifindex);
    m.header.state = NeighbourState::Permanent;
    m.attributes.push(NeighbourAttribute::Destination(dst));
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.octets().to_vec()));
    RouteNetlinkMessage::NewNeighbour(m)
}

fn neigh_del(family: AddressFamily, ifindex: u32, dst: NeighbourAddress) -> RouteNetlinkMessage {
    let mut m = neigh_msg(family, ifindex);
    m.attributes.push(NeighbourAttribute::Destination(dst));
    RouteNetlinkMessage::DelNeighbour(m)
}

/// A permanent forwarding entry of a vxlan device: frames for `mac` go to the VTEP `dst`.
fn fdb_new(ifindex: u32, mac: &MacAddr, dst: NeighbourAddress) -> RouteNetlinkMessage {
    let mut m = neigh_msg(AddressFamily::Bridge, ifindex);
    m.header.state = NeighbourState::Permanent;
    m.header.flags = NeighbourFlags::Own;
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.octets().to_vec()));
    m.attributes.push(NeighbourAttribute::Destination(dst));
    RouteNetlinkMessage::NewNeighbour(m)
}

/// Without `dst`, every forwarding entry of `mac` on the device goes.
fn fdb_del(ifindex: u32, mac: &MacAddr, dst: Option<NeighbourAddress>) -> RouteNetlinkMessage {
    let mut m = neigh_msg(AddressFamily::Bridge, ifindex);
    m.header.flags = NeighbourFlags::Own;
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.octets().to_vec()));
    if let Some(dst) = dst {
        m.attributes.push(NeighbourAttribute::Destination(dst));
    }
    RouteNetlinkMessage::DelNeighbour(m)
}

/// Finishes a route of either family for a replace: tweed's routes are static unless the op says
/// otherwise.
fn route_new(mut m: RouteMessage, protocol: u8, onlink: bool) -> RouteNetlinkMessage {
    m.header.protocol = RouteProtocol::from(if protocol == 0 {
        Route::PROTO_STATIC
    } else {
        protocol
    });
    m.header.scope = RouteScope::Universe;
    m.header.kind = RouteType::Unicast;
    if onlink {
        m.header.flags = RouteFlags::Onlink;
    }
    RouteNetlinkMessage::NewRoute(m)
}

/// NOWHERE and unspec type/protocol mean "any": the key and next hop pick the route.
fn route_del(mut m: RouteMessage) -> RouteNetlinkMessage {
    m.header.scope = RouteScope::NoWhere;
    m.header.kind = RouteType::Unspec;
    m.header.protocol = RouteProtocol::Unspec;
    RouteNetlinkMessage::DelRoute(m)
}

fn neigh_msg(family: AddressFamily, ifindex: u32) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = family;
    m.header.ifindex = ifindex;
    m.header.kind = RouteType::Unspec;
    m
}

fn route_msg(r: &Route) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = AddressFamily::Inet;
    m.header.destination_prefix_length = r.dst.prefix();
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    if r.dst.prefix() > 0 {
        m.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(
                r.dst.network(),
            )));
    }
    if let Some(gw) = r.gateway {
        m.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gw)));
    }
    if let Some(oif) = r.oif {
        m.attributes.push(RouteAttribute::Oif(oif));
    }
    if r.metric != 0 {
        m.attributes.push(RouteAttribute::Priority(r.metric));
    }
    m
}

fn route6_msg(r: &Route6) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = AddressFamily::Inet6;
    m.header.destination_prefix_length = r.dst.prefix();
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    if r.dst.prefix() > 0 {
        m.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet6(
                r.dst.network(),
            )));
    }
    if let Some(gw) = r.gateway {
        m.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet6(gw)));
    }
    if let Some(oif) = r.oif {
        m.attributes.push(RouteAttribute::Oif(oif));
    }
    // Metric 0 is sent as no priority; the kernel then stores IPv6 routes at 1024, which is why
    // `Route6`'s constructors ask for 1024 explicitly (what is written is what is read back).
    if r.metric != 0 {
        m.attributes.push(RouteAttribute::Priority(r.metric));
    }
    m
}

pub(crate) fn parse_link(m: &LinkMessage) -> Link {
    let mut link = Link {
        index: m.header.index,
        name: String::new(),
        mtu: 0,
        mac: None,
        kind: None,
        up: m.header.flags.contains(LinkFlags::Up),
        vxlan: None,
        master: None,
        alias: None,
    };
    for attr in &m.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
            LinkAttribute::Address(a) => link.mac = MacAddr::from_slice(a),
            LinkAttribute::Controller(i) => link.master = Some(*i).filter(|i| *i != 0),
            LinkAttribute::IfAlias(a) => link.alias = Some(a.clone()).filter(|a| !a.is_empty()),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(k) => link.kind = Some(k.to_string()),
                        LinkInfo::Data(InfoData::Vxlan(v)) => link.vxlan = Some(parse_vxlan(v)),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    link
}

fn parse_vxlan(attrs: &[InfoVxlan]) -> VxlanAttrs {
    let mut v = VxlanAttrs {
        vni: 0,
        port: 0,
        local: None,
        learning: true,
        underlay: None,
    };
    for a in attrs {
        match a {
            InfoVxlan::Id(id) => v.vni = *id,
            InfoVxlan::Port(p) => v.port = *p,
            InfoVxlan::Local(ip) => v.local = Some(IpAddr::V4(*ip)),
            InfoVxlan::Local6(ip) => v.local = Some(IpAddr::V6(*ip)),
            InfoVxlan::Learning(l) => v.learning = *l,
            InfoVxlan::Link(i) => v.underlay = Some(*i).filter(|i| *i != 0),
            _ => {}
        }
    }
    v
}

pub(crate) fn parse_addr(m: &AddressMessage) -> Option<Addr> {
    if m.header.family != AddressFamily::Inet {
        return None;
    }
    // For point-to-point links IFA_ADDRESS is the peer; IFA_LOCAL is always our own address.
    let mut local = None;
    let mut address = None;
    for attr in &m.attributes {
        match attr {
            AddressAttribute::Local(std::net::IpAddr::V4(ip)) => local = Some(*ip),
            AddressAttribute::Address(std::net::IpAddr::V4(ip)) => address = Some(*ip),
            _ => {}
        }
    }
    let ip = local.or(address)?;
    Some(Addr {
        ifindex: m.header.index,
        net: Ipv4Network::new(ip, m.header.prefix_len).ok()?,
    })
}

fn neigh_ipv4(attrs: &[NeighbourAttribute]) -> Option<Ipv4Addr> {
    attrs.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
            <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
        }
        _ => None,
    })
}

fn neigh_mac(attrs: &[NeighbourAttribute]) -> Option<MacAddr> {
    attrs.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(b) => MacAddr::from_slice(b),
        _ => None,
    })
}

pub(crate) fn parse_neigh(m: &NeighbourMessage) -> Option<Neighbour> {
    if m.header.family != AddressFamily::Inet {
        return None;
    }
    Some(Neighbour {
        ifindex: m.header.ifindex,
        ip: neigh_ipv4(&m.attributes)?,
        mac: neigh_mac(&m.attributes),
        permanent: u16::from(m.header.state) & NUD_PERMANENT != 0,
    })
}

pub(crate) fn parse_fdb(m: &NeighbourMessage) -> Option<FdbEntry> {
    if m.header.family != AddressFamily::Bridge {
        return None;
    }
    Some(FdbEntry {
        ifindex: m.header.ifindex,
        mac: neigh_mac(&m.attributes)?,
        dst: neigh_ipv4(&m.attributes),
        permanent: u16::from(m.header.state) & NUD_PERMANENT != 0,
    })
}

fn neigh_ipv6(attrs: &[NeighbourAttribute]) -> Option<Ipv6Addr> {
    attrs.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => Some(*ip),
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
            <[u8; 16]>::try_from(b.as_slice()).ok().map(Ipv6Addr::from)
        }
        _ => None,
    })
}

pub(crate) fn parse_neigh6(m: &NeighbourMessage) -> Option<Neighbour6> {
    if m.header.family != AddressFamily::Inet6 {
        return None;
    }
    Some(Neighbour6 {
        ifindex: m.header.ifindex,
        ip: neigh_ipv6(&m.attributes)?,
        mac: neigh_mac(&m.attributes),
        permanent: u16::from(m.header.state) & NUD_PERMANENT != 0,
    })
}

/// An FDB entry whose destination is an IPv6 VTEP (entries with an IPv4 or no destination are
/// the IPv4 view's, [`parse_fdb`]).
pub(crate) fn parse_fdb6(m: &NeighbourMessage) -> Option<FdbEntry6> {
    if m.header.family != AddressFamily::Bridge {
        return None;
    }
    Some(FdbEntry6 {
        ifindex: m.header.ifindex,
        mac: neigh_mac(&m.attributes)?,
        dst: neigh_ipv6(&m.attributes),
        permanent: u16::from(m.header.state) & NUD_PERMANENT != 0,
    })
}

/// What a main-table unicast route of either family says; `addr` takes the family's addresses and
/// leaves the other family's out, as a route message of the wrong family would be.
struct RouteFields<A> {
    dst: Option<A>,
    gateway: Option<A>,
    oif: Option<u32>,
    onlink: bool,
    metric: u32,
    protocol: u8,
}

fn route_fields<A>(
    m: &RouteMessage,
    family: AddressFamily,
    addr: impl Fn(&RouteAddress) -> Option<A>,
) -> Option<RouteFields<A>> {
    let h = &m.header;
    if h.address_family != family || h.kind != RouteType::Unicast {
        return None;
    }
    let mut table = u32::from(h.table);
    let mut f = RouteFields {
        dst: None,
        gateway: None,
        oif: None,
        onlink: h.flags.contains(RouteFlags::Onlink),
        metric: 0,
        protocol: u8::from(h.protocol),
    };
    let mut first_hop_oif = None;
    for attr in &m.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(a) => f.dst = addr(a).or(f.dst),
            RouteAttribute::Gateway(a) => f.gateway = addr(a).or(f.gateway),
            RouteAttribute::Oif(i) => f.oif = Some(*i),
            RouteAttribute::Priority(p) => f.metric = *p,
            RouteAttribute::MultiPath(hops) => {
                first_hop_oif = hops.first().map(|h| h.interface_index)
            }
            _ => {}
        }
    }
    if table != RT_TABLE_MAIN {
        return None;
    }
    f.oif = f.oif.or(first_hop_oif);
    Some(f)
}

pub(crate) fn parse_route6(m: &RouteMessage) -> Option<Route6> {
    let f = route_fields(m, AddressFamily::Inet6, |a| match a {
        RouteAddress::Inet6(ip) => Some(*ip),
        _ => None,
    })?;
    Some(Route6 {
        dst: Ipv6Network::new(
            f.dst.unwrap_or(Ipv6Addr::UNSPECIFIED),
            m.header.destination_prefix_length,
        )
        .ok()?,
        gateway: f.gateway,
        oif: f.oif,
        onlink: f.onlink,
        metric: f.metric,
        protocol: f.protocol,
    })
}

pub(crate) fn parse_route(m: &RouteMessage) -> Option<Route> {
    let f = route_fields(m, AddressFamily::Inet, |a| match a {
        RouteAddress::Inet(ip) => Some(*ip),
        _ => None,
    })?;
    Some(Route {
        dst: Ipv4Network::new(
            f.dst.unwrap_or(Ipv4Addr::UNSPECIFIED),
            m.header.destination_prefix_length,
        )
        .ok()?,
        gateway: f.gateway,
        oif: f.oif,
        onlink: f.onlink,
        metric: f.metric,
        protocol: f.protocol,
    })
}

pub(crate) fn parse_addr6(m: &AddressMessage) -> Option<Addr6> {
    if m.header.family != AddressFamily::Inet6 {
        return None;
    }
    let mut ip: Option<Ipv6Addr> = None;
    // IFA_FLAGS (32 bits) when present, else the header's byte.
    let mut tentative = m.header.flags.contains(AddressHeaderFlags::Tentative);
    for attr in &m.attributes {
        match attr {
            AddressAttribute::Local(IpAddr::V6(a)) => ip = Some(*a),
            AddressAttribute::Address(IpAddr::V6(a)) => ip = ip.or(Some(*a)),
            AddressAttribute::Flags(f) => tentative = f.contains(AddressFlags::Tentative),
            _ => {}
        }
    }
    Some(Addr6 {
        ifindex: m.header.index,
        net: Ipv6Network::new(ip?, m.header.prefix_len).ok()?,
        tentative,
    })
}
