//! Pure decisions: device names, addresses, ownership marks, and the netlink ops for each side
//! of an attachment. Nothing here touches the kernel, so all of it is unit-tested.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};
use sha2::{Digest, Sha256};
use tweed_netlink::{BridgeSpec, Link, MacAddr, Op, Route, Route6, VethSpec};

use crate::attachment::Attachment;

/// Marks a device as tweed's: `tweed/<network>/<containerID>/<ifname>` in `IFLA_IFALIAS`.
pub const ALIAS_PREFIX: &str = "tweed/";
/// The kernel keeps at most 255 bytes of alias.
const ALIAS_MAX: usize = 255;

/// The host end of an attachment's veth: `tw` + 12 hex digits of a hash of the container ID
/// and interface name. Deterministic, so DEL finds it without any state, and distinct per
/// attachment, so DEL never meets another container's device under this name.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let h = Sha256::digest(format!("{container_id}/{ifname}").as_bytes());
    let hex: String = h.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("tw{hex}")
}

/// Whether `name` has the shape [`host_veth_name`] gives.
pub fn is_host_veth_name(name: &str) -> bool {
    name.len() == 14
        && name.starts_with("tw")
        && name[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The ownership mark of an attachment's devices (both ends).
pub fn alias(network: &str, container_id: &str, ifname: &str) -> String {
    let full = format!("{ALIAS_PREFIX}{network}/{container_id}/{ifname}");
    if full.len() <= ALIAS_MAX {
        return full;
    }
    let h = Sha256::digest(full.as_bytes());
    let hex: String = h.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("{ALIAS_PREFIX}#{hex}")
}

/// `(network, containerID, ifname)` of a mark written by [`alias`] (not of a hashed one).
pub fn parse_alias(alias: &str) -> Option<(&str, &str, &str)> {
    let rest = alias.strip_prefix(ALIAS_PREFIX)?;
    // The network name may not contain '/', nor the container ID or the interface name.
    let mut it = rest.splitn(3, '/');
    let (n, c, i) = (it.next()?, it.next()?, it.next()?);
    if n.is_empty() || c.is_empty() || i.is_empty() || i.contains('/') {
        return None;
    }
    Some((n, c, i))
}

/// `0a:58:` + the IPv4 address: stable for an address, so neighbours' ARP entries stay right
/// when an address is reused, and never a vendor's (locally administered, unicast).
pub fn mac_for_ip(ip: Ipv4Addr) -> MacAddr {
    let o = ip.octets();
    MacAddr([0x0a, 0x58, o[0], o[1], o[2], o[3]])
}

/// The bridge's MAC on a node with no IPv4 gateway: `0e:58:` + the low 32 bits of the IPv6
/// gateway (`0e:58:00:00:00:01` for `…::1`). Kept in this form so a bridge made by an earlier
/// version keeps its MAC (a changed gateway MAC leaves containers' neighbour entries wrong
/// until they are probed again). Apart from the IPv4 MACs by the first octet (still locally
/// administered unicast).
pub fn bridge_mac6(gateway: Ipv6Addr) -> MacAddr {
    let o = gateway.octets();
    MacAddr([0x0e, 0x58, o[12], o[13], o[14], o[15]])
}

/// The MAC of a container with no IPv4 address: `0e:58:` + a 32-bit hash of the whole
/// address. The low 32 bits alone gave `…:3::2` and `…:3:0:1:0:2` one MAC, and `…:0:0:1`
/// the bridge's; every host bit of a requested address now counts. Stable for an address
/// and a bridge, like [`mac_for_ip`], so the MAC another attachment of the bridge has can be
/// worked out from its address (ADD refuses an address whose MAC another one has). Never
/// `bridge`: a hash equal to it has its last bit flipped.
pub fn mac_for_ip6(ip: Ipv6Addr, bridge: MacAddr) -> MacAddr {
    // FNV-1a: fixed by its definition, unlike std's hasher, which may change between Rust
    // releases and with it the MAC of an address.
    let h = ip.octets().iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    });
    let [a, b, c, d] = h.to_be_bytes();
    let mac = MacAddr([0x0e, 0x58, a, b, c, d]);
    if mac == bridge {
        MacAddr([0x0e, 0x58, a, b, c, d ^ 1])
    } else {
        mac
    }
}

/// The attachment among `others` (address records of one bridge's store: address, holder)
/// whose MAC would be `mac`, if any. Holders with an IPv4 address have a `0a:58:` MAC from
/// it, so only IPv6-only holders can share a `0e:58:` one.
pub fn mac6_taken_by(
    mac: MacAddr,
    bridge: MacAddr,
    others: &[(IpAddr, Option<Attachment>)],
) -> Option<(Ipv6Addr, &Attachment)> {
    let has_v4 = |who: &Attachment| {
        others
            .iter()
            .any(|(ip, o)| ip.is_ipv4() && o.as_ref() == Some(who))
    };
    others.iter().find_map(|(ip, who)| match (ip, who) {
        (IpAddr::V6(ip6), Some(who)) if mac_for_ip6(*ip6, bridge) == mac && !has_v4(who) => {
            Some((*ip6, who))
        }
        _ => None,
    })
}

/// What the node's bridge must look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeWant {
    pub name: String,
    pub mtu: u32,
    pub mac: MacAddr,
    /// The IPv4 gateway of an attachment with an IPv4 address, with the node subnet's prefix,
    /// e.g. 10.244.3.1/24.
    pub gateway: Option<Ipv4Network>,
    /// The IPv6 gateway of an attachment with an IPv6 address, e.g. fd00:10:244:3::1/64.
    pub gateway6: Option<Ipv6Network>,
}

impl BridgeWant {
    /// A bridge with no gateway yet: ADD sets those of the attachment's families.
    pub fn new(name: &str, mtu: u32, mac: MacAddr) -> BridgeWant {
        BridgeWant {
            name: name.into(),
            mtu,
            mac,
            gateway: None,
            gateway6: None,
        }
    }

    pub fn create_op(&self) -> Op {
        Op::LinkAddBridge(BridgeSpec {
            name: self.name.clone(),
            mtu: Some(self.mtu),
            mac: Some(self.mac),
        })
    }
}

/// Why an existing device cannot serve as the bridge.
pub fn bridge_conflict(observed: &Link) -> Option<String> {
    match observed.kind.as_deref() {
        Some("bridge") => None,
        other => Some(format!(
            "{} exists but is {}, not a bridge",
            observed.name,
            other.map_or("a device of no kind".to_string(), |k| format!(
                "a {k} device"
            ))
        )),
    }
}

/// Ops that bring an existing bridge to `want`: its MAC (a bridge left with a kernel-chosen
/// MAC by an earlier, interrupted ADD is corrected here rather than kept forever), MTU,
/// gateway address and up state.
pub fn bridge_fix_ops(observed: &Link, want: &BridgeWant) -> Vec<Op> {
    let mut ops = Vec::new();
    if observed.mac != Some(want.mac) {
        ops.push(Op::LinkSetMac {
            name: want.name.clone(),
            mac: want.mac,
        });
    }
    if observed.mtu != want.mtu {
        ops.push(Op::LinkSetMtu {
            name: want.name.clone(),
            mtu: want.mtu,
        });
    }
    if let Some(gw) = want.gateway {
        ops.push(Op::AddrAdd {
            ifindex: observed.index,
            addr: gw,
        });
    }
    if let Some(gw6) = want.gateway6 {
        // Without DAD, like the containers' addresses (see `Attach6`): the gateway is the
        // node lease's first address, unique by construction, and a tentative gateway would
        // leave the first container's neighbour solicitations unanswered for a second or two.
        ops.push(Op::Addr6Add {
            ifindex: observed.index,
            addr: gw6,
            nodad: true,
        });
    }
    if !observed.up {
        ops.push(Op::LinkSetUp {
            name: want.name.clone(),
        });
    }
    ops
}

/// One attachment as the host side sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attach {
    pub network: String,
    pub container_id: String,
    pub ifname: String,
    pub host_veth: String,
    pub host_mac: MacAddr,
    pub container_mac: MacAddr,
    pub mtu: u32,
    pub hairpin: bool,
    pub default_route: bool,
    /// The IPv4 half; `None` for an IPv6-only attachment.
    pub v4: Option<Attach4>,
    /// The IPv6 half; `None` for an IPv4-only attachment. At least one half is there.
    pub v6: Option<Attach6>,
}

/// A container's IPv4 address, gateway and overlay network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attach4 {
    /// With the node subnet's prefix.
    pub addr: Ipv4Network,
    pub gateway: Ipv4Addr,
    pub network_cidr: Ipv4Network,
}

/// A container's IPv6 address, gateway and overlay network. The address is added with DAD
/// turned off (`IFA_F_NODAD`) rather than waited on: the IPAM store hands each address of the
/// node's subnet to one attachment only and the subnet is this node's lease, so DAD could only
/// delay the address (by `dad_transmits` × `retrans_time`, a second by default), never find a
/// duplicate; and ADD must not return while the address is tentative, since the kernel drops
/// traffic to a tentative address and will not send from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attach6 {
    /// With the node subnet's prefix.
    pub addr: Ipv6Network,
    pub gateway: Ipv6Addr,
    pub network_cidr: Ipv6Network,
}

impl Attach {
    pub fn alias(&self) -> String {
        alias(&self.network, &self.container_id, &self.ifname)
    }

    /// Host side, after the bridge exists as `bridge_index`: the veth pair (its container end
    /// created straight into the container's namespace, already named `ifname`), marked, on the
    /// bridge, up.
    pub fn host_ops(&self, bridge_index: u32, container_netns_fd: i32) -> Vec<Op> {
        let mut ops = vec![
            Op::LinkAddVeth(VethSpec {
                name: self.host_veth.clone(),
                peer: self.ifname.clone(),
                peer_netns: Some(container_netns_fd),
                mtu: Some(self.mtu),
                mac: Some(self.host_mac),
                peer_mac: Some(self.container_mac),
            }),
            Op::LinkSetAlias {
                name: self.host_veth.clone(),
                alias: self.alias(),
            },
            Op::LinkSetMaster {
                name: self.host_veth.clone(),
                master: Some(bridge_index),
            },
        ];
        if self.hairpin {
            ops.push(Op::LinkSetHairpin {
                name: self.host_veth.clone(),
                on: true,
            });
        }
        ops.push(Op::LinkSetUp {
            name: self.host_veth.clone(),
        });
        ops
    }

    /// Container side, once its end is `ifindex` there: mark, up, address, routes.
    pub fn container_ops(&self, ifindex: u32) -> Vec<Op> {
        let mut ops = vec![
            Op::LinkSetAlias {
                name: self.ifname.clone(),
                alias: self.alias(),
            },
            Op::LinkSetUp {
                name: self.ifname.clone(),
            },
        ];
        if let Some(v4) = &self.v4 {
            ops.push(Op::AddrAdd {
                ifindex,
                addr: v4.addr,
            });
            for dst in self.route_dsts() {
                ops.push(Op::RouteReplace(Route::via(dst, v4.gateway, Some(ifindex))));
            }
        }
        if let Some(v6) = &self.v6 {
            ops.push(Op::Addr6Add {
                ifindex,
                addr: v6.addr,
                nodad: true,
            });
            for dst in self.route_dsts6() {
                ops.push(Op::Route6Replace(Route6::via(
                    dst,
                    v6.gateway,
                    Some(ifindex),
                )));
            }
        }
        ops
    }

    /// IPv6 routes in the container, as [`Attach::route_dsts`]: none for a v4-only attachment.
    pub fn route_dsts6(&self) -> Vec<Ipv6Network> {
        let Some(v6) = &self.v6 else {
            return Vec::new();
        };
        let mut v = vec![v6.network_cidr];
        if self.default_route {
            v.push(Ipv6Network::new(Ipv6Addr::UNSPECIFIED, 0).expect("valid"));
        }
        v
    }

    /// Routes in the container: the overlay network, and the default route unless turned off;
    /// none for an IPv6-only attachment.
    pub fn route_dsts(&self) -> Vec<Ipv4Network> {
        let Some(v4) = &self.v4 else {
            return Vec::new();
        };
        let mut v = vec![v4.network_cidr];
        if self.default_route {
            v.push(Ipv4Network::new(Ipv4Addr::UNSPECIFIED, 0).expect("valid"));
        }
        v
    }
}

/// Whether a device carries this attachment's mark.
pub fn owned_by(link: &Link, alias: &str) -> bool {
    link.alias.as_deref() == Some(alias)
}

/// The host end DEL may delete: it carries the mark, or (a plugin killed between creating the
/// pair and marking it, microseconds apart in one batch) it is an unmarked veth under the
/// attachment's own hashed name. A device marked for anyone else is never touched.
pub fn host_end_deletable(link: &Link, alias: &str) -> bool {
    owned_by(link, alias)
        || (link.alias.is_none()
            && link.kind.as_deref() == Some("veth")
            && is_host_veth_name(&link.name))
}

/// Host devices GC removes for `network`: tweed-marked veths of this network whose attachment
/// is not valid, and unmarked `tw…` veths (see [`host_end_deletable`]) that no valid
/// attachment's name maps to.
pub fn gc_links<'a>(
    links: &'a [Link],
    network: &str,
    valid: &BTreeSet<Attachment>,
) -> Vec<&'a Link> {
    let names: BTreeSet<String> = valid
        .iter()
        .map(|a| host_veth_name(&a.container_id, &a.ifname))
        .collect();
    links
        .iter()
        .filter(|l| l.kind.as_deref() == Some("veth"))
        .filter(|l| match l.alias.as_deref() {
            Some(a) => match parse_alias(a) {
                Some((n, c, i)) => {
                    n == network && !valid.iter().any(|v| v.container_id == c && v.ifname == i)
                }
                None => false,
            },
            None => is_host_veth_name(&l.name) && !names.contains(&l.name),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, kind: &str, alias: Option<&str>) -> Link {
        Link {
            index,
            name: name.into(),
            mtu: 1500,
            mac: None,
            kind: Some(kind.into()),
            up: true,
            vxlan: None,
            master: None,
            alias: alias.map(str::to_string),
        }
    }

    fn attach() -> Attach {
        Attach {
            network: "tweed".into(),
            container_id: "c1".into(),
            ifname: "eth0".into(),
            host_veth: host_veth_name("c1", "eth0"),
            host_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            container_mac: mac_for_ip("10.244.1.2".parse().unwrap()),
            mtu: 1450,
            hairpin: true,
            default_route: true,
            v4: Some(Attach4 {
                addr: "10.244.1.2/24".parse().unwrap(),
                gateway: "10.244.1.1".parse().unwrap(),
                network_cidr: "10.244.0.0/16".parse().unwrap(),
            }),
            v6: None,
        }
    }

    #[test]
    fn dual_stack_plans_add_the_ipv6_half_without_dad() {
        let mut a = attach();
        assert!(a.route_dsts6().is_empty());
        let v4_only = a.container_ops(2);
        a.v6 = Some(Attach6 {
            addr: "fd00:10:244:1::2/64".parse().unwrap(),
            gateway: "fd00:10:244:1::1".parse().unwrap(),
            network_cidr: "fd00:10:244::/56".parse().unwrap(),
        });
        let ops = a.container_ops(2);
        // The IPv4 ops are unchanged and come first; the IPv6 ones follow.
        assert_eq!(ops[..v4_only.len()], v4_only[..]);
        let v6: Vec<String> = ops[v4_only.len()..].iter().map(Op::to_string).collect();
        assert_eq!(
            v6,
            [
                "addr replace fd00:10:244:1::2/64 dev #2 nodad",
                "-6 route replace fd00:10:244::/56 via fd00:10:244:1::1 dev #2 metric 1024",
                "-6 route replace ::/0 via fd00:10:244:1::1 dev #2 metric 1024",
            ]
        );
        a.default_route = false;
        assert_eq!(a.route_dsts6(), ["fd00:10:244::/56".parse().unwrap()]);
        let mut want = bridge_want();
        want.gateway6 = Some("fd00:10:244:1::1/64".parse().unwrap());
        let mut l = link(4, "cni0", "bridge", None);
        (l.mac, l.mtu) = (Some(want.mac), 1450);
        let fix: Vec<String> = bridge_fix_ops(&l, &want)
            .iter()
            .map(Op::to_string)
            .collect();
        assert_eq!(
            fix,
            [
                "addr replace 10.244.1.1/24 dev #4",
                "addr replace fd00:10:244:1::1/64 dev #4 nodad"
            ]
        );
    }

    fn bridge_want() -> BridgeWant {
        let gw: Ipv4Network = "10.244.1.1/24".parse().unwrap();
        let mut want = BridgeWant::new("cni0", 1450, mac_for_ip(gw.ip()));
        want.gateway = Some(gw);
        want
    }

    /// An IPv6-only attachment: no IPv4 op in the container or on the bridge, the same IPv6
    /// ops as a dual-stack one's.
    #[test]
    fn ipv6_only_plans_have_no_ipv4_op() {
        let mut a = attach();
        a.v4 = None;
        a.v6 = Some(Attach6 {
            addr: "fd00:10:244:1::2/64".parse().unwrap(),
            gateway: "fd00:10:244:1::1".parse().unwrap(),
            network_cidr: "fd00:10:244::/56".parse().unwrap(),
        });
        assert!(a.route_dsts().is_empty());
        let ops: Vec<String> = a.container_ops(2).iter().map(Op::to_string).collect();
        assert_eq!(
            ops,
            [
                "link set eth0 alias \"tweed/tweed/c1/eth0\"",
                "link set eth0 up",
                "addr replace fd00:10:244:1::2/64 dev #2 nodad",
                "-6 route replace fd00:10:244::/56 via fd00:10:244:1::1 dev #2 metric 1024",
                "-6 route replace ::/0 via fd00:10:244:1::1 dev #2 metric 1024",
            ]
        );
        let gw6: Ipv6Network = "fd00:10:244:1::1/64".parse().unwrap();
        let mut want = BridgeWant::new("cni0", 1450, bridge_mac6(gw6.ip()));
        want.gateway6 = Some(gw6);
        assert_eq!(want.mac.to_string(), "0e:58:00:00:00:01");
        assert!(want.mac.is_valid_unicast());
        let mut l = link(4, "cni0", "bridge", None);
        (l.mac, l.mtu) = (Some(want.mac), 1450);
        let fix: Vec<String> = bridge_fix_ops(&l, &want)
            .iter()
            .map(Op::to_string)
            .collect();
        assert_eq!(fix, ["addr replace fd00:10:244:1::1/64 dev #4 nodad"]);
    }

    #[test]
    fn names_are_stable_short_and_distinct() {
        let a = host_veth_name("c1", "eth0");
        assert_eq!(a, host_veth_name("c1", "eth0"));
        assert_ne!(a, host_veth_name("c1", "net1"));
        assert_ne!(a, host_veth_name("c2", "eth0"));
        assert!(a.len() <= 15 && is_host_veth_name(&a), "{a}");
        assert!(!is_host_veth_name("tweed0") && !is_host_veth_name("twXXXXXXXXXXXX"));
    }

    #[test]
    fn alias_round_trip_and_long_ids() {
        let a = alias("tweed", "abc-1", "eth0");
        assert_eq!(a, "tweed/tweed/abc-1/eth0");
        assert_eq!(parse_alias(&a), Some(("tweed", "abc-1", "eth0")));
        let long = alias("n", &"x".repeat(300), "eth0");
        assert!(long.len() <= 255 && long.starts_with("tweed/#"));
        assert_eq!(parse_alias(&long), None);
        assert_eq!(parse_alias("something else"), None);
    }

    #[test]
    fn mac_follows_the_address() {
        let m = mac_for_ip("10.244.3.7".parse().unwrap());
        assert_eq!(m.to_string(), "0a:58:0a:f4:03:07");
        assert!(m.is_valid_unicast());
    }

    /// Review L3: the low 32 bits alone named the MAC, so addresses apart only in the upper host
    /// bits shared one, and `…:X:0:0:1` got the bridge's.
    #[test]
    fn ipv6_macs_count_every_host_bit_and_never_take_the_bridges() {
        let ip = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        let bridge = bridge_mac6(ip("fd00:10:244:3::1"));
        assert_eq!(bridge.to_string(), "0e:58:00:00:00:01");
        let a = mac_for_ip6(ip("fd00:10:244:3::2"), bridge);
        let b = mac_for_ip6(ip("fd00:10:244:3:0:1:0:2"), bridge);
        assert_eq!(a.to_string(), "0e:58:45:1c:1e:91");
        assert_eq!(b.to_string(), "0e:58:fe:74:d6:ce");
        for low in [
            "fd00:10:244:3:0:0:0:1",
            "fd00:10:244:3:1:0:0:1",
            "fd00:10:244:3:ffff::1",
        ] {
            assert_ne!(mac_for_ip6(ip(low), bridge), bridge, "{low}");
        }
        // Stable for an address, locally administered unicast, apart from the IPv4 MACs.
        assert_eq!(mac_for_ip6(ip("fd00:10:244:3::2"), bridge), a);
        assert!(a.is_valid_unicast() && b.is_valid_unicast());
        assert_eq!(a.0[0], 0x0e);
        // A hash equal to the bridge's MAC has its last bit flipped.
        let x = ip("fd00:10:244:3::7");
        let hashed = mac_for_ip6(x, bridge);
        let flipped = mac_for_ip6(x, hashed);
        assert_ne!(flipped, hashed);
        assert_eq!(flipped.0[..5], hashed.0[..5]);
        assert_eq!(flipped.0[5], hashed.0[5] ^ 1);
    }

    #[test]
    fn a_taken_ipv6_mac_names_its_holder() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let bridge = bridge_mac6("fd00:10:244:7::1".parse().unwrap());
        // Two addresses of one /64 whose hashes collide (found by search).
        let (first, second) = ("fd00:10:244:7::986e:986e", "fd00:10:244:7::e078:e078");
        let mac = mac_for_ip6(second.parse().unwrap(), bridge);
        assert_eq!(mac, mac_for_ip6(first.parse().unwrap(), bridge));
        assert_eq!(mac.to_string(), "0e:58:b2:c7:53:87");
        let c1 = Attachment::new("c1", "eth0");
        let c2 = Attachment::new("c2", "eth0");
        let only_v6 = vec![
            (ip(first), Some(c1.clone())),
            (ip("fd00:10:244:7::5"), Some(c2.clone())),
        ];
        assert_eq!(
            mac6_taken_by(mac, bridge, &only_v6),
            Some((first.parse().unwrap(), &c1))
        );
        // A holder with an IPv4 address has its MAC from that one: no clash.
        let dual = vec![
            (ip("10.244.7.3"), Some(c1.clone())),
            (ip(first), Some(c1.clone())),
        ];
        assert_eq!(mac6_taken_by(mac, bridge, &dual), None);
        // An unreadable record names nobody.
        assert_eq!(mac6_taken_by(mac, bridge, &[(ip(first), None)]), None);
    }

    #[test]
    fn bridge_is_fixed_only_where_it_differs() {
        let want = bridge_want();
        let mut l = link(4, "cni0", "bridge", None);
        l.mac = Some(want.mac);
        l.mtu = 1450;
        assert_eq!(
            bridge_fix_ops(&l, &want),
            vec![Op::AddrAdd {
                ifindex: 4,
                addr: want.gateway.unwrap()
            }]
        );
        // A bridge left behind with a kernel-chosen MAC and MTU, down.
        l.mac = Some(MacAddr([2, 1, 2, 3, 4, 5]));
        l.mtu = 1500;
        l.up = false;
        let ops = bridge_fix_ops(&l, &want);
        assert_eq!(ops.len(), 4);
        assert!(ops.contains(&Op::LinkSetMac {
            name: "cni0".into(),
            mac: want.mac
        }));
        assert!(ops.contains(&Op::LinkSetMtu {
            name: "cni0".into(),
            mtu: 1450
        }));
        assert!(bridge_conflict(&link(4, "cni0", "dummy", None))
            .unwrap()
            .contains("a dummy device"));
        assert_eq!(bridge_conflict(&l), None);
        assert!(matches!(
            want.create_op(),
            Op::LinkAddBridge(BridgeSpec {
                mtu: Some(1450),
                ..
            })
        ));
    }

    #[test]
    fn host_and_container_plans() {
        let a = attach();
        let host = a.host_ops(4, 9);
        assert!(matches!(&host[0], Op::LinkAddVeth(v)
            if v.peer == "eth0" && v.peer_netns == Some(9) && v.mtu == Some(1450)));
        assert!(host.contains(&Op::LinkSetMaster {
            name: a.host_veth.clone(),
            master: Some(4)
        }));
        assert!(host.contains(&Op::LinkSetHairpin {
            name: a.host_veth.clone(),
            on: true
        }));
        assert_eq!(
            host.last(),
            Some(&Op::LinkSetUp {
                name: a.host_veth.clone()
            })
        );
        let c = a.container_ops(2);
        let routes: Vec<String> = c
            .iter()
            .filter(|o| matches!(o, Op::RouteReplace(_)))
            .map(|o| o.to_string())
            .collect();
        assert_eq!(
            routes,
            [
                "route replace 10.244.0.0/16 via 10.244.1.1 dev #2",
                "route replace 0.0.0.0/0 via 10.244.1.1 dev #2"
            ]
        );
        let mut no_default = a.clone();
        no_default.default_route = false;
        no_default.hairpin = false;
        assert_eq!(no_default.route_dsts().len(), 1);
        assert!(!no_default
            .host_ops(4, 9)
            .iter()
            .any(|o| matches!(o, Op::LinkSetHairpin { .. })));
    }

    #[test]
    fn ownership_rules() {
        let a = attach();
        let mine = link(5, &a.host_veth, "veth", Some(&a.alias()));
        let theirs = link(6, &a.host_veth, "veth", Some("tweed/tweed/other/eth0"));
        let unmarked = link(7, &a.host_veth, "veth", None);
        let foreign = link(8, "eth0", "veth", Some("set by someone else"));
        assert!(host_end_deletable(&mine, &a.alias()));
        assert!(!host_end_deletable(&theirs, &a.alias()));
        assert!(host_end_deletable(&unmarked, &a.alias()));
        assert!(!owned_by(&foreign, &a.alias()));
        assert!(!host_end_deletable(
            &link(9, "eth0", "veth", None),
            &a.alias()
        ));
    }

    #[test]
    fn gc_picks_invalid_attachments_of_this_network_only() {
        let keep = Attachment {
            container_id: "keep".into(),
            ifname: "eth0".into(),
        };
        let valid: BTreeSet<_> = [keep.clone()].into();
        let links = vec![
            link(1, "lo", "", None),
            link(2, "cni0", "bridge", None),
            link(
                3,
                &host_veth_name("keep", "eth0"),
                "veth",
                Some(&alias("tweed", "keep", "eth0")),
            ),
            link(
                4,
                &host_veth_name("gone", "eth0"),
                "veth",
                Some(&alias("tweed", "gone", "eth0")),
            ),
            link(
                5,
                &host_veth_name("x", "eth0"),
                "veth",
                Some(&alias("othernet", "x", "eth0")),
            ),
            link(6, &host_veth_name("half", "eth0"), "veth", None),
            link(
                7,
                &host_veth_name("keep", "eth0").replace("tw", "tx"),
                "veth",
                None,
            ),
            link(8, "vethabc", "veth", None),
        ];
        let doomed: Vec<u32> = gc_links(&links, "tweed", &valid)
            .iter()
            .map(|l| l.index)
            .collect();
        assert_eq!(doomed, vec![4, 6]);
    }
}
