//! Kernel changes as data: backends compute a `Vec<Op>` with pure functions, tests compare those
//! vectors, and only [`super::Netlink::apply_all`] turns them into side effects.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};

use super::types::{BridgeSpec, MacAddr, Route, Route6, VethSpec, VxlanSpec};

/// One idempotent kernel change. Adds are replaces (`NLM_F_CREATE | NLM_F_REPLACE`) and deleting
/// something already gone succeeds, so any op can be retried or re-applied after a crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create a vxlan device. A device of that name with the same vxlan attributes counts as
    /// success and is left alone (MTU and MAC included); any other fails with `EEXIST`, since a
    /// vxlan device cannot be changed into another one in place.
    LinkAddVxlan(VxlanSpec),
    LinkSetUp {
        name: String,
    },
    LinkSetMtu {
        name: String,
        mtu: u32,
    },
    LinkDel {
        name: String,
    },
    /// Create a bridge. An existing bridge of that name counts as success and is left alone (a
    /// plan sets its MTU or MAC with the ops below); any other device of that name fails with
    /// `EEXIST`.
    LinkAddBridge(BridgeSpec),
    /// Create a kernel WireGuard device (its keys and peers go over generic netlink, not
    /// here). An existing `wireguard` device of that name counts as success and is left alone;
    /// any other device of that name fails with `EEXIST`; a kernel without the module fails
    /// with `EOPNOTSUPP`.
    LinkAddWireguard {
        name: String,
    },
    /// Create a veth pair, the peer possibly straight into another namespace. Fails with
    /// `EEXIST` when either name is taken: a veth pair is never adopted.
    LinkAddVeth(VethSpec),
    LinkSetDown {
        name: String,
    },
    /// `link set NAME master #MASTER`, or `nomaster` with `None`.
    LinkSetMaster {
        name: String,
        master: Option<u32>,
    },
    LinkSetMac {
        name: String,
        mac: MacAddr,
    },
    LinkSetAlias {
        name: String,
        alias: String,
    },
    /// Hairpin mode of a bridge port: frames may leave through the port they came in on.
    LinkSetHairpin {
        name: String,
        on: bool,
    },
    /// Moves a device into the namespace behind the open fd `netns`.
    LinkSetNetns {
        name: String,
        netns: i32,
    },
    /// Renames device `#ifindex`; the kernel refuses (`EBUSY`) while it is up.
    LinkRename {
        ifindex: u32,
        new_name: String,
    },
    /// Deletes the device with this index: what a caller that checked a device's identity
    /// (say, its alias) deletes, so a device renamed in between is never hit by name.
    LinkDelIndex {
        ifindex: u32,
    },
    AddrAdd {
        ifindex: u32,
        addr: Ipv4Network,
    },
    AddrDel {
        ifindex: u32,
        addr: Ipv4Network,
    },
    /// An IPv6 address, usable at once: `nodad` skips duplicate address detection, for
    /// addresses whose uniqueness an allocator already guarantees (a CNI plugin's store).
    Addr6Add {
        ifindex: u32,
        addr: Ipv6Network,
        nodad: bool,
    },
    Addr6Del {
        ifindex: u32,
        addr: Ipv6Network,
    },
    /// Permanent ARP entry `ip lladdr mac dev ifindex`.
    NeighReplace {
        ifindex: u32,
        ip: Ipv4Addr,
        mac: MacAddr,
    },
    NeighDel {
        ifindex: u32,
        ip: Ipv4Addr,
    },
    /// Permanent vxlan FDB entry `mac dst dst dev ifindex self`; an existing entry for `mac` has
    /// its first destination replaced.
    FdbReplace {
        ifindex: u32,
        mac: MacAddr,
        dst: Ipv4Addr,
    },
    /// Removes one destination of `mac`, or the whole entry when `dst` is `None`.
    FdbDel {
        ifindex: u32,
        mac: MacAddr,
        dst: Option<Ipv4Addr>,
    },
    /// Main-table route; the kernel keys it by (dst, metric), so this moves a route with the same
    /// key off another device or gateway.
    RouteReplace(Route),
    RouteDel(Route),
    /// The IPv6 twins of the three above, same semantics (NDP entry, FDB entry of an
    /// IPv6-underlay vxlan device, main-table IPv6 route keyed by (dst, metric)).
    Neigh6Replace {
        ifindex: u32,
        ip: Ipv6Addr,
        mac: MacAddr,
    },
    Neigh6Del {
        ifindex: u32,
        ip: Ipv6Addr,
    },
    Fdb6Replace {
        ifindex: u32,
        mac: MacAddr,
        dst: Ipv6Addr,
    },
    Fdb6Del {
        ifindex: u32,
        mac: MacAddr,
        dst: Option<Ipv6Addr>,
    },
    Route6Replace(Route6),
    Route6Del(Route6),
}

impl Op {
    pub fn is_delete(&self) -> bool {
        matches!(
            self,
            Op::LinkDel { .. }
                | Op::LinkDelIndex { .. }
                | Op::AddrDel { .. }
                | Op::Addr6Del { .. }
                | Op::NeighDel { .. }
                | Op::FdbDel { .. }
                | Op::RouteDel(_)
                | Op::Neigh6Del { .. }
                | Op::Fdb6Del { .. }
                | Op::Route6Del(_)
        )
    }

    /// Errnos meaning "already gone" for a delete, so that deleting twice is success. Each
    /// object type reports absence differently.
    pub(crate) fn gone_errnos(&self) -> &'static [i32] {
        match self {
            Op::LinkDel { .. } | Op::LinkDelIndex { .. } => &[libc::ENODEV],
            Op::AddrDel { .. } | Op::Addr6Del { .. } => &[libc::EADDRNOTAVAIL, libc::ENODEV],
            Op::NeighDel { .. } | Op::FdbDel { .. } | Op::Neigh6Del { .. } | Op::Fdb6Del { .. } => {
                &[libc::ENOENT, libc::ENODEV]
            }
            Op::RouteDel(_) | Op::Route6Del(_) => &[libc::ESRCH, libc::ENOENT, libc::ENODEV],
            _ => &[],
        }
    }
}

/// `ip`-like spelling, so logs and errors read like the command an operator would type.
impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::LinkAddVxlan(s) => {
                write!(
                    f,
                    "link add {} type vxlan id {} dstport {} local {} dev #{} {}learning",
                    s.name,
                    s.vni,
                    s.port,
                    s.local,
                    s.underlay,
                    if s.learning { "" } else { "no" }
                )?;
                write_mtu_mac(f, s.mtu, s.mac)?;
                Ok(())
            }
            Op::LinkSetUp { name } => write!(f, "link set {name} up"),
            Op::LinkSetMtu { name, mtu } => write!(f, "link set {name} mtu {mtu}"),
            Op::LinkDel { name } => write!(f, "link del {name}"),
            Op::LinkAddBridge(b) => {
                write!(f, "link add {} type bridge", b.name)?;
                write_mtu_mac(f, b.mtu, b.mac)?;
                Ok(())
            }
            Op::LinkAddWireguard { name } => write!(f, "link add {name} type wireguard"),
            Op::LinkAddVeth(v) => {
                write!(f, "link add {}", v.name)?;
                write_mtu_mac(f, v.mtu, v.mac)?;
                write!(f, " type veth peer name {}", v.peer)?;
                if let Some(mac) = v.peer_mac {
                    write!(f, " address {mac}")?;
                }
                if let Some(fd) = v.peer_netns {
                    write!(f, " netns fd:{fd}")?;
                }
                Ok(())
            }
            Op::LinkSetDown { name } => write!(f, "link set {name} down"),
            Op::LinkSetMaster { name, master } => match master {
                Some(m) => write!(f, "link set {name} master #{m}"),
                None => write!(f, "link set {name} nomaster"),
            },
            Op::LinkSetMac { name, mac } => write!(f, "link set {name} address {mac}"),
            Op::LinkSetAlias { name, alias } => write!(f, "link set {name} alias {alias:?}"),
            Op::LinkSetHairpin { name, on } => write!(
                f,
                "link set {name} type bridge_slave hairpin {}",
                if *on { "on" } else { "off" }
            ),
            Op::LinkSetNetns { name, netns } => write!(f, "link set {name} netns fd:{netns}"),
            Op::LinkRename { ifindex, new_name } => {
                write!(f, "link set #{ifindex} name {new_name}")
            }
            Op::LinkDelIndex { ifindex } => write!(f, "link del #{ifindex}"),
            Op::AddrAdd { ifindex, addr } => write!(f, "addr replace {addr} dev #{ifindex}"),
            Op::AddrDel { ifindex, addr } => write!(f, "addr del {addr} dev #{ifindex}"),
            Op::NeighReplace { ifindex, ip, mac } => {
                write!(
                    f,
                    "neigh replace {ip} lladdr {mac} dev #{ifindex} nud permanent"
                )
            }
            Op::NeighDel { ifindex, ip } => write!(f, "neigh del {ip} dev #{ifindex}"),
            Op::FdbReplace { ifindex, mac, dst } => {
                write!(
                    f,
                    "fdb replace {mac} dst {dst} dev #{ifindex} self permanent"
                )
            }
            Op::FdbDel { ifindex, mac, dst } => {
                write!(f, "fdb del {mac}")?;
                if let Some(dst) = dst {
                    write!(f, " dst {dst}")?;
                }
                write!(f, " dev #{ifindex} self")
            }
            Op::RouteReplace(r) => write!(f, "route replace {}", RouteText(r)),
            Op::RouteDel(r) => write!(f, "route del {}", RouteText(r)),
            Op::Addr6Add {
                ifindex,
                addr,
                nodad,
            } => {
                write!(f, "addr replace {addr} dev #{ifindex}")?;
                if *nodad {
                    write!(f, " nodad")?;
                }
                Ok(())
            }
            Op::Addr6Del { ifindex, addr } => write!(f, "addr del {addr} dev #{ifindex}"),
            Op::Neigh6Replace { ifindex, ip, mac } => write!(
                f,
                "-6 neigh replace {ip} lladdr {mac} dev #{ifindex} nud permanent"
            ),
            Op::Neigh6Del { ifindex, ip } => write!(f, "-6 neigh del {ip} dev #{ifindex}"),
            Op::Fdb6Replace { ifindex, mac, dst } => write!(
                f,
                "fdb replace {mac} dst {dst} dev #{ifindex} self permanent"
            ),
            Op::Fdb6Del { ifindex, mac, dst } => {
                write!(f, "fdb del {mac}")?;
                if let Some(dst) = dst {
                    write!(f, " dst {dst}")?;
                }
                write!(f, " dev #{ifindex} self")
            }
            Op::Route6Replace(r) => write!(f, "-6 route replace {}", Route6Text(r)),
            Op::Route6Del(r) => write!(f, "-6 route del {}", Route6Text(r)),
        }
    }
}

/// The optional ` mtu N address M` of the link-creating ops, in `ip link` order.
fn write_mtu_mac(
    f: &mut fmt::Formatter<'_>,
    mtu: Option<u32>,
    mac: Option<MacAddr>,
) -> fmt::Result {
    if let Some(mtu) = mtu {
        write!(f, " mtu {mtu}")?;
    }
    if let Some(mac) = mac {
        write!(f, " address {mac}")?;
    }
    Ok(())
}

struct RouteText<'a>(&'a Route);

impl fmt::Display for RouteText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.0;
        write!(f, "{}", r.dst)?;
        if let Some(gw) = r.gateway {
            write!(f, " via {gw}")?;
        }
        if let Some(oif) = r.oif {
            write!(f, " dev #{oif}")?;
        }
        if r.onlink {
            write!(f, " onlink")?;
        }
        if r.metric != 0 {
            write!(f, " metric {}", r.metric)?;
        }
        Ok(())
    }
}

struct Route6Text<'a>(&'a Route6);

impl fmt::Display for Route6Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.0;
        write!(f, "{}", r.dst)?;
        if let Some(gw) = r.gateway {
            write!(f, " via {gw}")?;
        }
        if let Some(oif) = r.oif {
            write!(f, " dev #{oif}")?;
        }
        if r.onlink {
            write!(f, " onlink")?;
        }
        if r.metric != 0 {
            write!(f, " metric {}", r.metric)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_reads_like_ip() {
        let r = Route::onlink(
            "10.244.5.0/24".parse().unwrap(),
            "10.244.5.0".parse().unwrap(),
            7,
        );
        assert_eq!(
            Op::RouteReplace(r).to_string(),
            "route replace 10.244.5.0/24 via 10.244.5.0 dev #7 onlink"
        );
        let op = Op::FdbReplace {
            ifindex: 7,
            mac: "aa:bb:cc:dd:ee:ff".parse().unwrap(),
            dst: "198.18.0.5".parse().unwrap(),
        };
        assert_eq!(
            op.to_string(),
            "fdb replace aa:bb:cc:dd:ee:ff dst 198.18.0.5 dev #7 self permanent"
        );
        assert!(!op.is_delete());
        assert!(Op::RouteDel(r).is_delete());
    }
}
