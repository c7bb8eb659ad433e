//! The lab's wires: the underlay namespace (a bridge per segment, routing between segments, the
//! etcd members' addresses), the outside namespace, and each host's namespace with its cable into
//! its segment. Addresses and names come from [`crate::names`]; this module only applies them.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use crate::cmd::CmdError;
use crate::error::LabError;
use crate::names::{self, Names};
use crate::netns;
use crate::spec::IpFamily;
use crate::state::HostState;

/// The underlay namespace with `segments` bridges and, for a multi-member etcd, the members'
/// addresses on `br0`. Returns what it made, for the progress line.
pub(crate) fn add_underlay(
    names: &Names,
    segments: usize,
    etcd_members: usize,
    family: IpFamily,
) -> Result<String, LabError> {
    let u = names.underlay_ns();
    netns::add(&u)?;
    if family.has_v6() {
        ipv6_setup(&u, segments > 1)?;
    }
    let mut what = Vec::new();
    for seg in 0..segments {
        let gw = format!("{}/{}", names::segment_gateway(seg), names::UNDERLAY_PREFIX);
        let br = names::segment_bridge(seg);
        netns::bridge(&u, &br, Some(&gw), None)?;
        if family.has_v6() {
            let gw6 = format!(
                "{}/{}",
                names::segment_gateway6(seg),
                names::UNDERLAY6_PREFIX
            );
            add_addr6(&u, &br, &gw6)?;
            what.push(format!("bridge {br} {gw} {gw6}"));
        } else {
            what.push(format!("bridge {br} {gw}"));
        }
    }
    if segments > 1 {
        netns::sysctl(&u, "net.ipv4.ip_forward", "1")?;
        what.push("routing between them".into());
    }
    if etcd_members > 1 {
        for m in 1..=etcd_members {
            let a = format!("{}/{}", names::etcd_member_ip(m), names::UNDERLAY_PREFIX);
            netns::ip(&u, &["addr", "add", &a, "dev", names::UNDERLAY_BRIDGE])?;
        }
    }
    Ok(what.join(", "))
}

/// The namespace outside the overlay: on segment A at 198.18.0.250, default route via the
/// underlay (which knows nothing of 10.244.0.0/16: only masqueraded traffic gets answers).
pub(crate) fn add_outside(names: &Names, family: IpFamily) -> Result<(), LabError> {
    let o = names.outside_ns();
    netns::add(&o)?;
    let addr = format!("{}/{}", names::OUTSIDE_IP, names::UNDERLAY_PREFIX);
    let v6 = family.has_v6().then(|| Cable6 {
        addr: format!("{}/{}", names::outside_ip6(), names::UNDERLAY6_PREFIX),
        gateway: names::segment_gateway6(0),
    });
    if v6.is_some() {
        ipv6_setup(&o, false)?;
    }
    cable(
        names,
        names::OUTSIDE_VETH,
        names::UNDERLAY_BRIDGE,
        &o,
        Some((addr.as_str(), names::UNDERLAY_GW)),
        v6.as_ref(),
    )
}

/// The IPv6 half of a cable: `eth0`'s address and the default route.
struct Cable6 {
    addr: String,
    gateway: Ipv6Addr,
}

/// IPv6 in a fresh namespace: no duplicate address detection (every address in the lab is
/// unique by construction, and DAD would leave them `tentative`, unusable, for a second or two
/// after `up`), and forwarding when the namespace routes.
fn ipv6_setup(ns: &str, forwarding: bool) -> Result<(), CmdError> {
    // `default` covers the interfaces made (or moved in) later, `all` those already there (lo).
    for scope in ["all", "default"] {
        netns::sysctl(ns, &format!("net.ipv6.conf.{scope}.accept_dad"), "0")?;
        if forwarding {
            netns::sysctl(ns, &format!("net.ipv6.conf.{scope}.forwarding"), "1")?;
        }
    }
    Ok(())
}

/// `ip -6 addr add ADDR dev DEV nodad`.
fn add_addr6(ns: &str, dev: &str, addr: &str) -> Result<(), CmdError> {
    netns::ip(ns, &["-6", "addr", "add", addr, "dev", dev, "nodad"])?;
    Ok(())
}

/// Where host `name` keeps its files: `<lab dir>/hosts/<name>`.
pub fn host_dir(lab_dir: &Path, name: &str) -> PathBuf {
    lab_dir.join("hosts").join(name)
}

/// Host `i`'s record before it exists: its namespace, address and files under `dir`
/// (`hosts/hN/`). Pure.
pub fn host_state(
    names: &Names,
    dir: &Path,
    i: usize,
    segments: usize,
    family: IpFamily,
) -> HostState {
    let name = names.host(i);
    let host_dir = host_dir(dir, &name);
    HostState {
        netns: names.host_ns(i),
        public_ip: names::host_public_ip(i, segments),
        public_ip6: family.has_v6().then(|| names::host_public_ip6(i, segments)),
        agent_pid: None,
        log: host_dir.join("tweedd.log"),
        subnet_file: host_dir.join("subnet.env"),
        agent_state_dir: host_dir.join("lib"),
        segment: names::host_segment(i, segments),
        api_socket: None,
        metrics: None,
        cni_conf: None,
        subnet: None,
        mtu: None,
        pods: Vec::new(),
        name,
    }
}

/// Host `i`'s namespace, its `eth0` cable into its segment's bridge, its address, a default
/// route via its segment's gateway (for etcd on a cluster address, the other segment and the
/// outside), and forwarding on; in a dual-stack lab the same again for IPv6.
pub(crate) fn add_host(
    names: &Names,
    i: usize,
    h: &HostState,
    family: IpFamily,
) -> Result<(), LabError> {
    netns::add(&h.netns)?;
    // An IPv6-only lab's hosts get no IPv4 address at all: nothing can fall back to IPv4.
    let v4 = (family != IpFamily::V6).then(|| {
        (
            format!("{}/{}", h.public_ip, names::UNDERLAY_PREFIX),
            names::segment_gateway(h.segment),
        )
    });
    let v6 = h.public_ip6.map(|ip6| Cable6 {
        addr: format!("{ip6}/{}", names::UNDERLAY6_PREFIX),
        gateway: names::segment_gateway6(h.segment),
    });
    if v6.is_some() {
        // Forwarding: the host routes its pods' IPv6 traffic like their IPv4 traffic.
        ipv6_setup(&h.netns, true)?;
    }
    cable(
        names,
        &names.underlay_veth(i),
        &names::segment_bridge(h.segment),
        &h.netns,
        v4.as_ref().map(|(a, g)| (a.as_str(), *g)),
        v6.as_ref(),
    )?;
    netns::sysctl(&h.netns, "net.ipv4.ip_forward", "1")?;
    Ok(())
}

/// A veth from `bridge` in the underlay to `eth0` in `ns`, which gets `addr` and a default route
/// via `gateway` (and the IPv6 twins when `v6` is given).
fn cable(
    names: &Names,
    underlay_end: &str,
    bridge: &str,
    ns: &str,
    v4: Option<(&str, Ipv4Addr)>,
    v6: Option<&Cable6>,
) -> Result<(), LabError> {
    let u = names.underlay_ns();
    netns::veth(&u, underlay_end, ns, names::HOST_IFACE, None)?;
    netns::ip(&u, &["link", "set", underlay_end, "master", bridge])?;
    if let Some((addr, gateway)) = v4 {
        netns::ip(ns, &["addr", "add", addr, "dev", names::HOST_IFACE])?;
        netns::ip(
            ns,
            &["route", "add", "default", "via", &gateway.to_string()],
        )?;
    } else {
        // No IPv4 address: the link must be up for the IPv6 one to be usable.
        netns::ip(ns, &["link", "set", names::HOST_IFACE, "up"])?;
    }
    if let Some(v6) = v6 {
        add_addr6(ns, names::HOST_IFACE, &v6.addr)?;
        netns::ip(
            ns,
            &[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &v6.gateway.to_string(),
                "dev",
                names::HOST_IFACE,
            ],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_record_names_its_files_and_address() {
        let names = Names::new("demo").unwrap();
        let dir = Path::new("/run/tweed-lab/demo");
        let h = host_state(&names, dir, 2, 2, IpFamily::V4);
        assert_eq!(h.public_ip6, None);
        assert_eq!(h.name, "h2");
        assert_eq!(h.netns, "twl-demo-h2");
        assert_eq!(h.public_ip, Ipv4Addr::new(198, 18, 1, 2));
        assert_eq!(h.segment, 1);
        assert_eq!(h.log, dir.join("hosts/h2/tweedd.log"));
        assert_eq!(h.subnet_file, dir.join("hosts/h2/subnet.env"));
        assert_eq!(h.agent_state_dir, dir.join("hosts/h2/lib"));
        assert!(h.agent_pid.is_none() && h.pods.is_empty() && h.cni_conf.is_none());
        let h = host_state(&names, dir, 2, 1, IpFamily::Dual);
        assert_eq!((h.public_ip, h.segment), (Ipv4Addr::new(198, 18, 0, 2), 0));
        assert_eq!(h.public_ip6, Some("fd00:198:18::2".parse().unwrap()));
    }
}
