//! This node's IPv6 underlay address, the lease's `PublicIPv6`: `--public-ipv6` when given, else a
//! global-scope address of the interface the IPv4 flags chose (`--iface`, `--iface-regex`,
//! `--iface-can-reach`, or the default route's). A node without one runs IPv4 only in a
//! dual-stack network, where flannel refuses to start.

use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use tweed_config::LeaseAttrs;

#[derive(Debug, thiserror::Error)]
pub enum Ipv6AddrError {
    #[error("reading IPv6 addresses from {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One address of `/proc/net/if_inet6` (the reading process's network namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inet6Addr {
    pub ifindex: u32,
    pub addr: Ipv6Addr,
    pub prefix: u8,
    /// The kernel's scope: 0 global (ULAs included), 0x20 link, 0x10 host.
    pub scope: u8,
    /// `IFA_F_*` flags.
    pub flags: u32,
}

const IFA_F_TEMPORARY: u32 = 0x01;
const IFA_F_DADFAILED: u32 = 0x08;
const IFA_F_DEPRECATED: u32 = 0x20;
const IFA_F_TENTATIVE: u32 = 0x40;
const SCOPE_GLOBAL: u8 = 0;

/// Where the addresses come from: the kernel, or a list in tests.
#[derive(Debug, Clone)]
pub enum Ipv6Addrs {
    Proc,
    #[cfg(any(test, feature = "fake"))]
    Fixed(Vec<Inet6Addr>),
    /// A list a test changes while the agent runs (an address added after the start).
    #[cfg(any(test, feature = "fake"))]
    Shared(std::sync::Arc<std::sync::Mutex<Vec<Inet6Addr>>>),
    /// [`Shared`](Self::Shared) whose read fails while it holds `None`.
    #[cfg(any(test, feature = "fake"))]
    Flaky(std::sync::Arc<std::sync::Mutex<Option<Vec<Inet6Addr>>>>),
}

impl Ipv6Addrs {
    pub fn list(&self) -> Result<Vec<Inet6Addr>, Ipv6AddrError> {
        match self {
            Ipv6Addrs::Proc => {
                let path = Path::new("/proc/net/if_inet6");
                match std::fs::read_to_string(path) {
                    Ok(text) => Ok(parse_if_inet6(&text)),
                    // A kernel without IPv6 (ipv6.disable=1) has no such file: no addresses.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
                    Err(source) => Err(Ipv6AddrError::Read {
                        path: path.to_path_buf(),
                        source,
                    }),
                }
            }
            #[cfg(any(test, feature = "fake"))]
            Ipv6Addrs::Fixed(v) => Ok(v.clone()),
            #[cfg(any(test, feature = "fake"))]
            Ipv6Addrs::Shared(v) => Ok(v.lock().unwrap_or_else(|p| p.into_inner()).clone()),
            #[cfg(any(test, feature = "fake"))]
            Ipv6Addrs::Flaky(v) => v
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .ok_or_else(|| Ipv6AddrError::Read {
                    path: "/proc/net/if_inet6".into(),
                    source: std::io::Error::other("a test made this read fail"),
                }),
        }
    }
}

/// Parses `/proc/net/if_inet6`: per line 32 hex digits of address, then hex ifindex, prefix
/// length, scope and flags, then the name. A line that does not read so is skipped: the file is
/// the kernel's, but a reader that panics or gives up on one odd line would cost the node its
/// IPv6 half for nothing.
pub fn parse_if_inet6(text: &str) -> Vec<Inet6Addr> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [addr, ifindex, prefix, scope, flags, _name] = f.as_slice() else {
                return None;
            };
            if addr.len() != 32 || !addr.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            let addr = Ipv6Addr::from(u128::from_str_radix(addr, 16).ok()?);
            let prefix = u8::from_str_radix(prefix, 16).ok().filter(|p| *p <= 128)?;
            Some(Inet6Addr {
                ifindex: u32::from_str_radix(ifindex, 16).ok()?,
                addr,
                prefix,
                scope: u8::from_str_radix(scope, 16).ok()?,
                flags: u32::from_str_radix(flags, 16).ok()?,
            })
        })
        .collect()
}

/// The address peers reach this node on over IPv6: `explicit` (`--public-ipv6`) when given, else
/// the first stable global-scope address of interface `ifindex`. Temporary (privacy) addresses
/// change on their own and deprecated ones are on their way out; a tentative one (DAD still
/// running at boot) is taken only when there is nothing better, as it becomes usable in a second.
pub fn public_ipv6(
    explicit: Option<Ipv6Addr>,
    ifindex: u32,
    addrs: &[Inet6Addr],
) -> Option<Ipv6Addr> {
    if explicit.is_some() {
        return explicit;
    }
    let usable = |a: &&Inet6Addr| {
        a.ifindex == ifindex
            && a.scope == SCOPE_GLOBAL
            && a.flags & (IFA_F_DADFAILED | IFA_F_DEPRECATED | IFA_F_TEMPORARY) == 0
            && !a.addr.is_loopback()
            && !a.addr.is_unspecified()
            && !a.addr.is_multicast()
            && !a.addr.is_unicast_link_local()
            && a.addr.to_ipv4_mapped().is_none()
    };
    let candidates: Vec<&Inet6Addr> = addrs.iter().filter(usable).collect();
    candidates
        .iter()
        .find(|a| a.flags & IFA_F_TENTATIVE == 0)
        .or(candidates.first())
        .map(|a| a.addr)
}

/// What to do after the underlay's IPv6 addresses changed at run time, for a node advertising
/// `current` as its `PublicIPv6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublicIpv6Change {
    /// `current` is still a usable address of the interface (or was given by `--public-ipv6`):
    /// nothing to do. A new address next to it changes nothing, so peers are not moved for an
    /// address that was only added.
    Keep,
    /// `current` is gone (or deprecated, or failed DAD) and `to` is the address the configured
    /// flags choose now: the lease and the IPv6 VTEP move to it.
    Move { from: Ipv6Addr, to: Ipv6Addr },
    /// `current` is gone and nothing replaces it yet. The lease keeps advertising it (a
    /// renumbering often removes before it adds; a flap must not rename the lease), the IPv6
    /// overlay to this node is broken until an address comes back.
    Lost { from: Ipv6Addr },
}

/// The decision of [`PublicIpv6Change`]: `explicit` (`--public-ipv6`) is never second-guessed, as
/// at start; else `current` stays while it is usable, and only when it is not does the same
/// selection as at start ([`public_ipv6`]) pick another address of interface `ifindex`.
pub fn public_ipv6_change(
    current: Ipv6Addr,
    explicit: Option<Ipv6Addr>,
    ifindex: u32,
    addrs: &[Inet6Addr],
) -> PublicIpv6Change {
    if explicit.is_some() {
        return PublicIpv6Change::Keep;
    }
    let still = addrs.iter().any(|a| {
        a.addr == current
            && a.ifindex == ifindex
            && a.flags & (IFA_F_DADFAILED | IFA_F_DEPRECATED) == 0
    });
    if still {
        return PublicIpv6Change::Keep;
    }
    match public_ipv6(None, ifindex, addrs) {
        Some(to) if to != current => PublicIpv6Change::Move { from: current, to },
        _ => PublicIpv6Change::Lost { from: current },
    }
}

/// `attrs` with this node's IPv6 half: `PublicIPv6`, and for vxlan a `BackendV6Data` naming the
/// same VNI and VTEP MAC as `BackendData` (flannel's field; the IPv6 VXLAN device that will
/// answer for it is the backends' step).
pub fn with_public_ipv6(mut attrs: LeaseAttrs, public_ipv6: Ipv6Addr) -> LeaseAttrs {
    attrs.public_ipv6 = Some(public_ipv6);
    if attrs.backend_type == "vxlan" {
        attrs.backend_v6_data = attrs.backend_data.clone();
    }
    if attrs.backend_type == "udp" {
        // tweed's own: see `backend::v6::UDP_V6_DATA`.
        attrs.backend_v6_data = Some(
            serde_json::value::RawValue::from_string(crate::backend::v6::UDP_V6_DATA.into())
                .expect("a JSON constant"),
        );
    }
    attrs
}

/// `attrs` without this node's IPv6 half (`PublicIPv6`, `BackendV6Data`): what a node that
/// turned IPv4 only advertises, as one that started so would.
pub fn without_ipv6(mut attrs: LeaseAttrs) -> LeaseAttrs {
    attrs.public_ipv6 = None;
    attrs.backend_v6_data = None;
    attrs
}

/// What this node does with the network's IPv6 half, for the log and the status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ipv6Mode {
    /// The network has no IPv6 half.
    Off,
    /// The network is dual stack but this node has no IPv6 address to advertise.
    V4Only {
        iface: String,
    },
    DualStack {
        public_ipv6: Ipv6Addr,
    },
}

impl Ipv6Mode {
    /// The status text (`tweedctl net status`, the API).
    pub fn status(&self) -> String {
        match self {
            Ipv6Mode::Off => "off".into(),
            Ipv6Mode::V4Only { iface } => format!(
                "IPv4 only: the network has EnableIPv6, but {iface} has no global IPv6 address \
                 and no --public-ipv6 was given"
            ),
            Ipv6Mode::DualStack { .. } => "dual-stack".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
00000000000000000000000000000001 01 80 10 80       lo
fe800000000000000000000000000001 02 40 20 80     eth0
20010db8000000000000000000000001 02 40 00 01     eth0
20010db8000000000000000000000002 02 40 00 20     eth0
20010db8000000000000000000000003 02 40 00 40     eth0
fd000000000000000000000000000004 02 40 00 80     eth0
20010db8000000000000000000000009 03 40 00 80     eth1
";

    fn a(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn the_first_stable_global_address_of_the_chosen_interface() {
        let addrs = parse_if_inet6(SAMPLE);
        assert_eq!(addrs.len(), 7);
        assert_eq!(addrs[1].addr, a("fe80::1"));
        assert_eq!(
            (addrs[1].ifindex, addrs[1].prefix, addrs[1].scope),
            (2, 64, 0x20)
        );
        // Temporary (::1), deprecated (::2), tentative (::3) passed over for the ULA.
        assert_eq!(public_ipv6(None, 2, &addrs), Some(a("fd00::4")));
        assert_eq!(public_ipv6(None, 3, &addrs), Some(a("2001:db8::9")));
        // Only tentative left: taken (usable once DAD ends).
        let tentative: Vec<_> = addrs.iter().filter(|x| x.flags == 0x40).cloned().collect();
        assert_eq!(public_ipv6(None, 2, &tentative), Some(a("2001:db8::3")));
        // Loopback and link-local only: none. --public-ipv6 always wins.
        assert_eq!(public_ipv6(None, 1, &addrs), None);
        let link_local_only = &addrs[1..2];
        assert_eq!(public_ipv6(None, 2, link_local_only), None);
        assert_eq!(
            public_ipv6(Some(a("2001:db8::77")), 1, &addrs),
            Some(a("2001:db8::77"))
        );
    }

    #[test]
    fn odd_lines_are_skipped_not_fatal() {
        let text = format!(
            "{SAMPLE}\n\
             garbage\n\
             2001:db8::1 02 40 00 80 eth0\n\
             20010db800000000000000000000000g 02 40 00 80 eth0\n\
             20010db8000000000000000000000001 02 ff 00 80 eth0\n\
             20010db8000000000000000000000001 1ffffffff 40 00 80 eth0\n\
             20010db8000000000000000000000001 02 40 00 80\n\
             20010db8000000000000000000000001 02 40 00 80 eth0 extra\n\
             +0010db8000000000000000000000001 02 40 00 80 eth0\n\
             {}\n",
            "f".repeat(100_000)
        );
        assert_eq!(parse_if_inet6(&text), parse_if_inet6(SAMPLE));
        assert!(parse_if_inet6("").is_empty());
    }

    #[test]
    fn an_ipv4_mapped_or_multicast_global_entry_is_never_chosen() {
        let addrs = parse_if_inet6(
            "00000000000000000000ffff0a000001 02 60 00 80 eth0\n\
             ff020000000000000000000000000001 02 80 00 80 eth0\n",
        );
        assert_eq!(addrs.len(), 2);
        assert_eq!(public_ipv6(None, 2, &addrs), None);
    }

    #[test]
    fn vxlan_attrs_gain_flannels_v6_fields() {
        let v4 = LeaseAttrs::new(
            "198.18.0.1".parse().unwrap(),
            "vxlan",
            Some(&serde_json::json!({"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:01"})),
        );
        let dual = with_public_ipv6(v4, a("2001:db8::1"));
        assert_eq!(
            dual.to_json(),
            r#"{"PublicIP":"198.18.0.1","PublicIPv6":"2001:db8::1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:01"},"BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:01"}}"#
        );
        let hostgw = LeaseAttrs::new("198.18.0.1".parse().unwrap(), "host-gw", None);
        assert_eq!(
            with_public_ipv6(hostgw, a("2001:db8::1")).to_json(),
            r#"{"PublicIP":"198.18.0.1","PublicIPv6":"2001:db8::1","BackendType":"host-gw"}"#
        );
        let udp = LeaseAttrs::new("198.18.0.1".parse().unwrap(), "udp", None);
        assert_eq!(
            with_public_ipv6(udp, a("2001:db8::1")).to_json(),
            r#"{"PublicIP":"198.18.0.1","PublicIPv6":"2001:db8::1","BackendType":"udp","BackendV6Data":{"Underlay":"ipv4"}}"#
        );
    }

    fn at(addr: &str, ifindex: u32, flags: u32) -> Inet6Addr {
        Inet6Addr {
            ifindex,
            addr: a(addr),
            prefix: 64,
            scope: SCOPE_GLOBAL,
            flags,
        }
    }

    #[test]
    fn a_public_ipv6_that_stays_is_kept_even_next_to_a_new_address() {
        // A new address listed first would win a fresh selection; the current one stays.
        let addrs = [at("2001:db8::9", 2, 0x80), at("2001:db8::1", 2, 0x80)];
        assert_eq!(
            public_ipv6_change(a("2001:db8::1"), None, 2, &addrs),
            PublicIpv6Change::Keep
        );
        // --public-ipv6 is the operator's word, whatever the interface holds.
        assert_eq!(
            public_ipv6_change(a("2001:db8::77"), Some(a("2001:db8::77")), 2, &[]),
            PublicIpv6Change::Keep
        );
    }

    #[test]
    fn a_removed_or_deprecated_public_ipv6_moves_to_the_flags_choice() {
        let from = a("2001:db8::1");
        // Replaced: the new stable address of the same interface.
        let replaced = [
            at("fe80::1", 2, 0x80),
            at("2001:db8::9", 3, 0x80),
            at("2001:db8::2", 2, IFA_F_TEMPORARY),
            at("2001:db8::5", 2, 0x80),
        ];
        assert_eq!(
            public_ipv6_change(from, None, 2, &replaced),
            PublicIpv6Change::Move {
                from,
                to: a("2001:db8::5")
            }
        );
        // Deprecated (its preferred lifetime ran out) or DAD failed: on its way out, moved.
        for flags in [IFA_F_DEPRECATED, IFA_F_DADFAILED] {
            let addrs = [at("2001:db8::1", 2, flags), at("2001:db8::5", 2, 0x80)];
            assert_eq!(
                public_ipv6_change(from, None, 2, &addrs),
                PublicIpv6Change::Move {
                    from,
                    to: a("2001:db8::5")
                }
            );
        }
        // The same address on another interface is not ours.
        let elsewhere = [at("2001:db8::1", 3, 0x80), at("2001:db8::5", 2, 0x40)];
        assert_eq!(
            public_ipv6_change(from, None, 2, &elsewhere),
            PublicIpv6Change::Move {
                from,
                to: a("2001:db8::5")
            }
        );
    }

    #[test]
    fn a_removed_public_ipv6_with_nothing_to_replace_it_is_lost_not_renamed() {
        let from = a("2001:db8::1");
        for addrs in [
            vec![],
            vec![at("fe80::1", 2, 0x80)],
            vec![at("2001:db8::2", 2, IFA_F_TEMPORARY)],
            vec![at("2001:db8::3", 2, IFA_F_DEPRECATED)],
            vec![at("2001:db8::9", 3, 0x80)],
        ] {
            assert_eq!(
                public_ipv6_change(from, None, 2, &addrs),
                PublicIpv6Change::Lost { from },
                "{addrs:?}"
            );
        }
    }
}
