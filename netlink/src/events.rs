//! Kernel change notifications: an rtnetlink socket subscribed to the link, IPv4 and IPv6
//! address, IPv4 and IPv6 route and neighbour multicast groups of one network namespace, decoded into the same
//! plain types the queries return. The agent repairs what it owns from these within a second
//! instead of waiting for its periodic relist.
//!
//! Events are hints, not a source of truth: the kernel drops them when the receive buffer
//! overflows (reported as [`Event::Lost`]), so a listener re-reads the tables it cares about
//! rather than applying an event's content.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{FromRawFd, IntoRawFd};

use rtnetlink::packet_core::{NetlinkBuffer, NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::sys::{protocols::NETLINK_ROUTE, AsyncSocketExt, SocketAddr};
use rtnetlink::sys::{Socket, TokioSocket};
#[cfg(any(test, feature = "fake"))]
use tokio::sync::mpsc;

use super::error::NetlinkError;
use super::netns::Netns;
use super::real::{
    grow_rcvbuf, parse_addr, parse_addr6, parse_fdb, parse_link, parse_neigh, parse_neigh6,
    parse_route, parse_route6,
};
use super::types::{Addr, Addr6, FdbEntry, Link, Neighbour, Neighbour6, Route, Route6};

// Legacy group bits (`RTMGRP_*`): the ones a bind address carries.
const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_NEIGH: u32 = 0x4;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;
const RTMGRP_IPV6_ROUTE: u32 = 0x400;
const GROUPS: u32 = RTMGRP_LINK
    | RTMGRP_NEIGH
    | RTMGRP_IPV4_IFADDR
    | RTMGRP_IPV4_ROUTE
    | RTMGRP_IPV6_IFADDR
    | RTMGRP_IPV6_ROUTE;

/// Whether the kernel announced an object (new or changed) or its removal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    New,
    Del,
}

/// One kernel notification, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Link(Change, Link),
    Addr(Change, Addr),
    /// An IPv6 address (the IPv6 vxlan device holds its subnet address as a /128).
    Addr6(Change, Addr6),
    /// A main-table IPv4 unicast route.
    Route(Change, Route),
    /// An IPv6 unicast route (the IPv6 data plane's, or an IPv6 underlay's).
    Route6(Change, Route6),
    Neigh(Change, Neighbour),
    /// An IPv6 neighbour (NDP) entry.
    Neigh6(Change, Neighbour6),
    Fdb(Change, FdbEntry),
    /// The kernel dropped notifications (`ENOBUFS`): whatever the listener owns must be re-read.
    Lost,
}

/// A subscription; ends when dropped.
pub struct Events {
    inner: Inner,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.inner {
            Inner::Real { .. } => "Events::Real",
            #[cfg(any(test, feature = "fake"))]
            Inner::Fake(_) => "Events::Fake",
        })
    }
}

enum Inner {
    Real {
        socket: TokioSocket,
        pending: VecDeque<Event>,
    },
    #[cfg(any(test, feature = "fake"))]
    Fake(mpsc::UnboundedReceiver<Event>),
}

impl Events {
    /// Subscribes in the calling thread's network namespace. Needs a tokio runtime.
    pub fn real() -> Result<Events, NetlinkError> {
        tokio::runtime::Handle::try_current().map_err(|_| NetlinkError::NoRuntime)?;
        let socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Connect)?;
        Events::from_socket(socket)
    }

    /// Subscribes inside `netns` (only the socket's creation happens there).
    pub fn real_in(netns: &Netns) -> Result<Events, NetlinkError> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| NetlinkError::NoRuntime)?;
        let socket = netns
            .run(|| Socket::new(NETLINK_ROUTE))?
            .map_err(NetlinkError::Connect)?;
        let _enter = rt.enter();
        Events::from_socket(socket)
    }

    fn from_socket(mut socket: Socket) -> Result<Events, NetlinkError> {
        socket
            .bind(&SocketAddr::new(0, GROUPS))
            .map_err(|source| NetlinkError::Query {
                what: "subscribing to rtnetlink link, address, route and neighbour groups".into(),
                source,
            })?;
        // A burst (thousands of routes written at start) must not overflow it; when it does
        // anyway the listener is told and re-reads everything.
        grow_rcvbuf(&socket);
        let fd = socket.into_raw_fd();
        // SAFETY: `fd` is the bound NETLINK_ROUTE socket just released by `into_raw_fd`; the
        // TokioSocket owns it from here and registers it with the current runtime.
        let socket = unsafe { TokioSocket::from_raw_fd(fd) };
        Ok(Events {
            inner: Inner::Real {
                socket,
                pending: VecDeque::new(),
            },
        })
    }

    /// A subscription fed by hand (see [`crate::Fake::subscribe`]).
    #[cfg(any(test, feature = "fake"))]
    pub(crate) fn channel() -> (mpsc::UnboundedSender<Event>, Events) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            tx,
            Events {
                inner: Inner::Fake(rx),
            },
        )
    }

    /// The next notification. `None` when a fake's kernel is gone; a real socket's read error
    /// other than an overrun is returned.
    pub async fn next(&mut self) -> Option<Result<Event, NetlinkError>> {
        match &mut self.inner {
            #[cfg(any(test, feature = "fake"))]
            Inner::Fake(rx) => rx.recv().await.map(Ok),
            Inner::Real { socket, pending } => loop {
                if let Some(e) = pending.pop_front() {
                    return Some(Ok(e));
                }
                match socket.recv_from_full().await {
                    Ok((buf, _)) => pending.extend(decode(&buf)),
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        return Some(Ok(Event::Lost))
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(source) => {
                        return Some(Err(NetlinkError::Query {
                            what: "reading rtnetlink notifications".into(),
                            source,
                        }))
                    }
                }
            },
        }
    }
}

/// Every notification in one datagram; what does not parse (or is not ours to care about) is
/// skipped, since a hint lost here is caught by the periodic relist.
pub fn decode(mut buf: &[u8]) -> Vec<Event> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let len = match NetlinkBuffer::new_checked(buf) {
            Ok(b) => b.length() as usize,
            Err(_) => break,
        };
        // A length past the datagram, or too short to move on, would loop or read beyond it.
        if len < 16 || len > buf.len() {
            break;
        }
        let aligned = len.div_ceil(4) * 4;
        if let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[..len]) {
            if let NetlinkPayload::InnerMessage(m) = msg.payload {
                out.extend(event_of(&m));
            }
        }
        buf = &buf[aligned.min(buf.len())..];
    }
    out
}

fn event_of(m: &RouteNetlinkMessage) -> Option<Event> {
    use Change::{Del, New};
    use RouteNetlinkMessage as M;
    Some(match m {
        M::NewLink(l) => Event::Link(New, parse_link(l)),
        M::DelLink(l) => Event::Link(Del, parse_link(l)),
        M::NewAddress(a) | M::DelAddress(a) if a.header.family == AddressFamily::Inet6 => {
            let c = if matches!(m, M::NewAddress(_)) {
                New
            } else {
                Del
            };
            Event::Addr6(c, parse_addr6(a)?)
        }
        M::NewAddress(a) => Event::Addr(New, parse_addr(a)?),
        M::DelAddress(a) => Event::Addr(Del, parse_addr(a)?),
        M::NewRoute(r) | M::DelRoute(r) if r.header.address_family == AddressFamily::Inet6 => {
            let c = if matches!(m, M::NewRoute(_)) {
                New
            } else {
                Del
            };
            Event::Route6(c, parse_route6(r)?)
        }
        M::NewRoute(r) => Event::Route(New, parse_route(r)?),
        M::DelRoute(r) => Event::Route(Del, parse_route(r)?),
        M::NewNeighbour(n) | M::DelNeighbour(n) => {
            let c = if matches!(m, M::NewNeighbour(_)) {
                New
            } else {
                Del
            };
            match n.header.family {
                AddressFamily::Bridge => Event::Fdb(c, parse_fdb(n)?),
                AddressFamily::Inet6 => Event::Neigh6(c, parse_neigh6(n)?),
                _ => Event::Neigh(c, parse_neigh(n)?),
            }
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_core::NetlinkHeader;
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
    use rtnetlink::packet_route::route::{RouteProtocol, RouteType};

    fn route_msg(del: bool) -> Vec<u8> {
        let mut r = RouteMessage::default();
        r.header.address_family = AddressFamily::Inet;
        r.header.destination_prefix_length = 24;
        r.header.kind = RouteType::Unicast;
        r.header.protocol = RouteProtocol::Static;
        r.header.table = 254;
        r.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(
                "10.244.2.0".parse().unwrap(),
            )));
        r.attributes.push(RouteAttribute::Oif(7));
        let inner = if del {
            RouteNetlinkMessage::DelRoute(r)
        } else {
            RouteNetlinkMessage::NewRoute(r)
        };
        let mut msg = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(inner));
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        buf
    }

    #[test]
    fn a_datagram_of_several_notifications_decodes_in_order() {
        let mut buf = route_msg(false);
        buf.extend(route_msg(true));
        let ev = decode(&buf);
        assert_eq!(ev.len(), 2, "{ev:?}");
        let Event::Route(Change::New, r) = &ev[0] else {
            panic!("{ev:?}")
        };
        assert_eq!(
            (r.dst.to_string(), r.oif),
            ("10.244.2.0/24".into(), Some(7))
        );
        assert!(matches!(ev[1], Event::Route(Change::Del, _)));
    }

    #[test]
    fn routes_of_both_families_parse_alike_and_other_tables_and_families_are_left_out() {
        use crate::real::{parse_route, parse_route6};
        let msg = |family, table: u32, dst: RouteAddress, gw: RouteAddress| {
            let mut r = RouteMessage::default();
            r.header.address_family = family;
            r.header.destination_prefix_length = 64;
            r.header.kind = RouteType::Unicast;
            r.header.protocol = RouteProtocol::Static;
            r.header.table = 254;
            r.attributes.push(RouteAttribute::Table(table));
            r.attributes.push(RouteAttribute::Destination(dst));
            r.attributes.push(RouteAttribute::Gateway(gw));
            r.attributes.push(RouteAttribute::Priority(1024));
            r
        };
        let v6 = |s: &str| RouteAddress::Inet6(s.parse().unwrap());
        let v4 = |s: &str| RouteAddress::Inet(s.parse().unwrap());

        let r = parse_route6(&msg(
            AddressFamily::Inet6,
            254,
            v6("fd00:1::"),
            v6("fd00::2"),
        ))
        .unwrap();
        assert_eq!(
            (r.dst.to_string(), r.gateway, r.metric, r.protocol),
            (
                "fd00:1::/64".into(),
                Some("fd00::2".parse().unwrap()),
                1024,
                4
            )
        );
        let mut m4 = msg(AddressFamily::Inet, 254, v4("10.1.0.0"), v4("10.0.0.2"));
        m4.header.destination_prefix_length = 16;
        let r = parse_route(&m4).unwrap();
        assert_eq!(
            (r.dst.to_string(), r.gateway, r.metric),
            (
                "10.1.0.0/16".into(),
                Some("10.0.0.2".parse().unwrap()),
                1024
            )
        );
        // Another table, or a message of the other family, is not ours to read.
        assert!(parse_route6(&msg(
            AddressFamily::Inet6,
            100,
            v6("fd00:1::"),
            v6("fd00::2")
        ))
        .is_none());
        assert!(parse_route(&msg(
            AddressFamily::Inet6,
            254,
            v6("fd00:1::"),
            v6("fd00::2")
        ))
        .is_none());
        // Addresses of the wrong family inside a message are ignored, not misread.
        let r = parse_route6(&msg(
            AddressFamily::Inet6,
            254,
            v4("10.1.0.0"),
            v4("10.0.0.2"),
        ))
        .unwrap();
        assert_eq!((r.dst.to_string(), r.gateway), ("::/64".into(), None));
    }

    #[test]
    fn truncated_or_lying_lengths_stop_decoding_without_panicking() {
        let good = route_msg(true);
        // Cut anywhere: never a panic, never an event made of half a message.
        for cut in 0..good.len() {
            assert!(decode(&good[..cut]).is_empty(), "cut at {cut}");
        }
        // A header claiming more than the datagram holds, or less than a header.
        for len in [0u32, 4, 15, u32::MAX, good.len() as u32 + 4] {
            let mut bad = good.clone();
            bad[..4].copy_from_slice(&len.to_ne_bytes());
            assert!(decode(&bad).is_empty(), "length {len}");
        }
        // Garbage after a good message is ignored, the good one kept.
        let mut tail = good.clone();
        tail.extend([0xff; 7]);
        assert_eq!(decode(&tail).len(), 1);
    }
}
