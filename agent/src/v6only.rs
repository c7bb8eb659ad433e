//! An IPv6-only network (`EnableIPv4: false`): what a node decides there, as pure functions.
//! The agent's run loop for such a network is `run::v6only`; this holds its checks at start,
//! the underlay choice, the lease value, the subnet choice and the peers read from a listing.

use crate::alloc::{choose_v6, AllocError};
use crate::backend::v6::Vxlan6Peer;
use crate::ipv6::Inet6Addr;
use crate::netlink::{Link, MacAddr, Route6};
use crate::registry::RawLease;
use ipnetwork::Ipv6Network;
use rand::Rng;
use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};
use tweed_config::lease::VxlanLeaseData;
use tweed_config::{
    BackendConfig, Ipv6Config, Ipv6OnlyKey, Ipv6OnlyPeer, LeaseAttrs, LeaseKey, LeaseRejection,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum V6OnlyError {
    #[error(
        "network config field Backend.Type: {0:?} cannot run an IPv6-only network \
         (EnableIPv4: false); only \"vxlan\", \"host-gw\" and \"wireguard\" can (or enable \
         IPv4)"
    )]
    Backend(&'static str),
    #[error(transparent)]
    Wireguard(#[from] wireguard::WgV6OnlyError),
    #[error("--iface {name}: no such interface (have: {})", have.join(", "))]
    NoSuchIface { name: String, have: Vec<String> },
    #[error(
        "no underlay interface for the IPv6-only network; tried, in order: {}",
        tried.join("; ")
    )]
    NoneMatched { tried: Vec<String> },
    #[error("--iface-regex {regex:?}: not a valid regular expression: {reason}")]
    InvalidRegex { regex: String, reason: String },
    #[error(
        "--iface-can-reach {0}: an IPv6-only network (EnableIPv4: false) has no IPv4 routes; \
         give an IPv6 address (etcd's or a peer's)"
    )]
    CanReachIpv4(Ipv4Addr),
    #[error(
        "no IPv6 default route in this network namespace and no --iface: the underlay of an \
         IPv6-only network cannot be guessed; pass --iface NAME"
    )]
    NoIface,
    #[error(
        "an IPv6-only network (EnableIPv4: false) needs a PublicIPv6, but the underlay \
         interface {iface} has no usable global IPv6 address and --public-ipv6 is not given"
    )]
    NoPublicIpv6 { iface: String },
    #[error("{0}")]
    Alloc(#[from] AllocError),
}

/// Only the backends that run on an IPv6 underlay: vxlan (`tweed-v6.<VNI>`), host-gw and
/// wireguard (its endpoints on the IPv6 underlay, [`wireguard::check`]). udp carries IPv6 over
/// the IPv4 underlay, which this network has not.
pub fn check_backend(backend: &BackendConfig) -> Result<(), V6OnlyError> {
    match backend {
        BackendConfig::Vxlan { .. } | BackendConfig::HostGw | BackendConfig::Wireguard(_) => Ok(()),
        other => Err(V6OnlyError::Backend(other.type_name())),
    }
}

/// The underlay of an IPv6-only node and the address peers reach it on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub public_ipv6: Ipv6Addr,
}

/// How the operator picks the underlay of an IPv6-only network: the dual-stack flags, read with
/// IPv6 addresses.
#[derive(Debug, Default, Clone)]
pub struct UnderlayFlags {
    /// `--iface`: names, or IPv6 addresses held by the interface.
    pub ifaces: Vec<String>,
    /// `--iface-regex`: matched against the IPv6 addresses (link-local ones aside), then the
    /// interface names.
    pub regexes: Vec<String>,
    /// `--iface-can-reach`: the interface of the most specific IPv6 route to it.
    pub can_reach: Option<std::net::IpAddr>,
    /// `--public-ipv6`.
    pub explicit: Option<Ipv6Addr>,
}

/// The interface: `--iface` (a name or an IPv6 address it holds), else the first
/// `--iface-regex` that matches one of its IPv6 addresses or its name (never loopback), else the one
/// `--iface-can-reach`'s address is routed out of; tried in that order, as for IPv4. With none
/// of those: the one holding `--public-ipv6`, else the IPv6 default route's (the lowest
/// metric). Its `PublicIPv6`: `--public-ipv6`, else its first stable global address
/// ([`crate::ipv6::public_ipv6`]); none is an error naming the interface, so a node without IPv6
/// never starts half-working.
pub fn choose_underlay(
    flags: &UnderlayFlags,
    links: &[Link],
    addrs: &[Inet6Addr],
    routes: &[Route6],
) -> Result<Underlay, V6OnlyError> {
    let by_index = |i: u32| links.iter().find(|l| l.index == i);
    let holder = |ip: Ipv6Addr| {
        addrs
            .iter()
            .find(|a| a.addr == ip)
            .and_then(|a| by_index(a.ifindex))
    };
    let regexes = flags
        .regexes
        .iter()
        .map(|r| {
            regex::Regex::new(r).map_err(|e| V6OnlyError::InvalidRegex {
                regex: r.clone(),
                reason: e.to_string(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let can_reach = match flags.can_reach {
        None => None,
        Some(std::net::IpAddr::V6(ip)) => Some(ip),
        Some(std::net::IpAddr::V4(ip)) => return Err(V6OnlyError::CanReachIpv4(ip)),
    };
    let mut tried = Vec::new();
    let mut chosen = None;
    if !flags.ifaces.is_empty() {
        chosen = flags
            .ifaces
            .iter()
            .find_map(|n| match n.parse::<Ipv6Addr>() {
                Ok(ip) => holder(ip),
                Err(_) => links.iter().find(|l| &l.name == n),
            });
        if chosen.is_none() && regexes.is_empty() && can_reach.is_none() {
            return Err(V6OnlyError::NoSuchIface {
                name: flags.ifaces.join(","),
                have: links.iter().map(|l| l.name.clone()).collect(),
            });
        }
        tried.push(format!(
            "--iface {}: no such interface or IPv6 address",
            flags.ifaces.join(",")
        ));
    }
    if chosen.is_none() && !regexes.is_empty() {
        // Link-local addresses are on every interface: matching them would choose at random.
        // Loopback never matches, as for IPv4.
        let global =
            |a: &&Inet6Addr| (a.addr.segments()[0] & 0xffc0) != 0xfe80 && !a.addr.is_loopback();
        let not_lo = |l: &&Link| l.name != "lo";
        chosen = regexes.iter().find_map(|re| {
            addrs
                .iter()
                .filter(global)
                .filter(|a| re.is_match(&a.addr.to_string()))
                .find_map(|a| by_index(a.ifindex).filter(not_lo))
                .or_else(|| links.iter().filter(not_lo).find(|l| re.is_match(&l.name)))
        });
        tried.push(format!(
            "--iface-regex {}: no IPv6 address or interface name matches",
            flags.regexes.join(" ")
        ));
    }
    if chosen.is_none() {
        if let Some(dst) = can_reach {
            chosen = routes
                .iter()
                .filter(|r| r.dst.contains(dst) && r.oif.is_some())
                .max_by_key(|r| (r.dst.prefix(), std::cmp::Reverse(r.metric)))
                .and_then(|r| by_index(r.oif.expect("filtered")));
            tried.push(format!("--iface-can-reach {dst}: no IPv6 route to it"));
        }
    }
    let link = match chosen {
        Some(l) => l,
        None if !tried.is_empty() => return Err(V6OnlyError::NoneMatched { tried }),
        None => {
            let owner = flags.explicit.and_then(holder);
            let default = routes
                .iter()
                .filter(|r| r.dst.prefix() == 0 && r.oif.is_some())
                .min_by_key(|r| r.metric)
                .and_then(|r| by_index(r.oif.expect("filtered")));
            owner.or(default).ok_or(V6OnlyError::NoIface)?
        }
    };
    let public_ipv6 =
        crate::ipv6::public_ipv6(flags.explicit, link.index, addrs).ok_or_else(|| {
            V6OnlyError::NoPublicIpv6 {
                iface: link.name.clone(),
            }
        })?;
    Ok(Underlay {
        index: link.index,
        name: link.name.clone(),
        mtu: link.mtu,
        public_ipv6,
    })
}

/// This node's lease value: flannel's field set with `PublicIP` 0.0.0.0 (flannel's struct
/// always has the field; no IPv4 half), the `PublicIPv6`, and vxlan's VTEP as `BackendV6Data`.
pub fn lease_attrs(
    public_ipv6: Ipv6Addr,
    backend: &BackendConfig,
    vtep_mac: Option<MacAddr>,
) -> LeaseAttrs {
    let mut attrs = LeaseAttrs::new(Ipv4Addr::UNSPECIFIED, backend.type_name(), None);
    attrs.public_ipv6 = Some(public_ipv6);
    if let (BackendConfig::Vxlan { vni, .. }, Some(mac)) = (backend, vtep_mac) {
        let data = serde_json::json!({"VNI": vni, "VtepMAC": mac.to_string()});
        attrs.backend_v6_data =
            Some(serde_json::value::RawValue::from_string(data.to_string()).expect("valid JSON"));
    }
    attrs
}

/// Every readable lease key of a listing with its raw lease, oldest claim first.
fn keys<'a>(prefix: &str, listing: &'a [RawLease]) -> Vec<(LeaseKey, &'a RawLease)> {
    let mut v: Vec<(LeaseKey, &RawLease)> = listing
        .iter()
        .filter_map(|l| Some((LeaseKey::from_etcd_key(prefix, &l.key)?.ok()?, l)))
        .collect();
    v.sort_by_key(|(_, l)| (l.create_revision, l.key.clone()));
    v
}

/// What this node does about its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Our IPv6-only key is there (a restart, a lease that outlived us, a reservation), no older
    /// key claims its subnet: keep it.
    Reuse {
        key: Ipv6OnlyKey,
        lease_id: i64,
        mod_revision: i64,
        value: Vec<u8>,
    },
    /// Create the key of this subnet.
    Take(Ipv6Network),
    /// Our own keys that serve nothing any more: remove them, then list and decide again. Left
    /// there, each blocks its subnet for a whole TTL, and every other node routes it to us.
    Remove(Vec<Stale>),
}

/// One of our own keys (our `PublicIPv6`, a TTL lease) that we do not keep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    pub key: LeaseKey,
    pub subnet: Ipv6Network,
    pub lease_id: i64,
    pub mod_revision: i64,
    pub why: &'static str,
}

/// Ours first (an IPv6-only key of a node subnet whose `PublicIPv6` is ours, that no older key
/// of the other form claims), then `previous` (subnet.env's) if free, then [`choose_v6`].
/// Occupied: the IPv6 part of every key, both forms, of the node subnet length (as dual stack
/// counts them: a hostile `::-0` must not block all). Before any of that, our other keys with a
/// TTL lease are removed (a dual-stack key from before the switch, a key that lost its race or
/// fell outside `SubnetMin`/`SubnetMax`, a second key); reservations (no TTL) are the
/// operator's and are left alone, as are keys of an `exclude`d subnet.
pub fn decide(
    cfg: &Ipv6Config,
    prefix: &str,
    listing: &[RawLease],
    public_ipv6: Ipv6Addr,
    previous: Option<Ipv6Network>,
    exclude: &HashSet<Ipv6Network>,
    rng: &mut impl Rng,
) -> Result<Decision, V6OnlyError> {
    let keys = keys(prefix, listing);
    let mut reuse = None;
    let mut stale = Vec::new();
    for (k, l) in &keys {
        let Some(subnet) = k.ipv6() else { continue };
        let mine = LeaseAttrs::parse(&l.value).is_ok_and(|a| a.public_ipv6 == Some(public_ipv6));
        if !mine || exclude.contains(&subnet) {
            continue;
        }
        let why = match k {
            LeaseKey::Ipv6Only(_) if !cfg.is_allocatable(subnet) => {
                "not a node subnet of IPv6Network"
            }
            LeaseKey::Ipv6Only(_)
                if lost_race(prefix, listing, subnet, &l.key, l.create_revision) =>
            {
                "an older key claims its subnet"
            }
            LeaseKey::Ipv6Only(k) if reuse.is_none() => {
                reuse = Some(Decision::Reuse {
                    key: *k,
                    lease_id: l.lease_id,
                    mod_revision: l.mod_revision,
                    value: l.value.clone(),
                });
                continue;
            }
            LeaseKey::Ipv6Only(_) => "a second key of ours",
            _ => "a dual-stack key of ours from before EnableIPv4: false",
        };
        if l.lease_id != 0 {
            stale.push(Stale {
                key: *k,
                subnet,
                lease_id: l.lease_id,
                mod_revision: l.mod_revision,
                why,
            });
        }
    }
    if !stale.is_empty() {
        return Ok(Decision::Remove(stale));
    }
    if let Some(d) = reuse {
        return Ok(d);
    }
    let occupied: Vec<Ipv6Network> = keys
        .iter()
        .filter_map(|(k, _)| k.ipv6())
        .filter(|n| n.prefix() == cfg.subnet_len)
        .collect();
    Ok(Decision::Take(choose_v6(
        cfg, &occupied, previous, exclude, rng,
    )?))
}

/// What the last run recorded in the state dir about its key: the subnet, the TTL lease it
/// hung on (0: a reservation) and every `PublicIPv6` it may still name (the advertised one
/// first, then former ones whose rewrite was not confirmed yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub subnet: Ipv6Network,
    pub lease_id: i64,
    pub addrs: Vec<Ipv6Addr>,
}

impl Recorded {
    /// One `subnet`, one `lease` and one or more `address` lines; `None` on anything else (the
    /// caller warns, naming the file).
    pub fn parse(text: &str) -> Option<Recorded> {
        let (mut subnet, mut lease_id, mut addrs) = (None, None, Vec::new());
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (k, v) = line.split_once(' ')?;
            match k {
                "subnet" => subnet = Some(v.trim().parse().ok()?),
                "lease" => lease_id = Some(v.trim().parse().ok()?),
                "address" => addrs.push(v.trim().parse().ok()?),
                _ => return None,
            }
        }
        (!addrs.is_empty()).then_some(())?;
        Some(Recorded {
            subnet: subnet?,
            lease_id: lease_id?,
            addrs,
        })
    }

    pub fn render(&self) -> String {
        let mut s = format!("subnet {}\nlease {}\n", self.subnet, self.lease_id);
        for a in &self.addrs {
            s.push_str(&format!("address {a}\n"));
        }
        s
    }
}

/// At start, our key from before a `PublicIPv6` change while the agent was down: the IPv6-only
/// key of the recorded subnet, still on the recorded TTL lease (or a reservation, lease 0),
/// naming one of the recorded addresses; a node subnet no older key claims and not `exclude`d.
/// Reused (its value then rewritten with the new address), so the node keeps its subnet and
/// its pods' addresses. The address alone proves nothing: ours may have expired and the old
/// address gone to another node, which took the subnet on its own lease.
pub fn reclaim(
    cfg: &Ipv6Config,
    prefix: &str,
    listing: &[RawLease],
    rec: &Recorded,
    exclude: &HashSet<Ipv6Network>,
) -> Option<Decision> {
    let subnet = rec.subnet;
    if exclude.contains(&subnet) || !cfg.is_allocatable(subnet) {
        return None;
    }
    let key = Ipv6OnlyKey { ipv6: subnet };
    let full = LeaseKey::Ipv6Only(key).etcd_key(prefix);
    let l = listing.iter().find(|l| l.key == full)?;
    let named = LeaseAttrs::parse(&l.value).ok()?.public_ipv6?;
    let same_lease = l.lease_id == 0 || l.lease_id == rec.lease_id;
    if !rec.addrs.contains(&named)
        || !same_lease
        || lost_race(prefix, listing, subnet, &full, l.create_revision)
    {
        return None;
    }
    Some(Decision::Reuse {
        key,
        lease_id: l.lease_id,
        mod_revision: l.mod_revision,
        value: l.value.clone(),
    })
}

/// Our attributes once the `PublicIPv6` moved to `to`: only the address changes, whatever the
/// backend put in `BackendV6Data` (vxlan's VTEP MAC, wireguard's key and port) stays.
pub fn with_public_ipv6(attrs: &LeaseAttrs, to: Ipv6Addr) -> LeaseAttrs {
    let mut a = attrs.clone();
    a.public_ipv6 = Some(to);
    a
}

/// Whether the key named `own` in a listing is still ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Ours, on this TTL lease (0: reserved). It differs from the one we had when an operator
    /// reserved or unreserved the key by hand: renew what the key now hangs on.
    Ours { lease_id: i64 },
    /// No such key (expired, deleted): take the subnet back if it is free.
    Gone,
    /// The name is there, but another node wrote it (another `PublicIPv6`, or another TTL lease
    /// than ours: ours expired and someone took the subnet): not ours, choose another subnet.
    Lost,
}

pub fn held(
    prefix: &str,
    listing: &[RawLease],
    own: Ipv6OnlyKey,
    own_lease_id: i64,
    public_ipv6: Ipv6Addr,
) -> Held {
    held_as(prefix, listing, own, own_lease_id, &[public_ipv6])
}

/// [`held`] for a node whose `PublicIPv6` moved at run time: `addrs` is what it advertises now
/// and what it advertised before in this run. Until the rewrite of our value got through
/// ([`rewrite`]), our key still names an old address; without this, a reserved key (whose
/// lease id proves nothing) would count as another node's and the node would give its
/// subnet up.
pub fn held_as(
    prefix: &str,
    listing: &[RawLease],
    own: Ipv6OnlyKey,
    own_lease_id: i64,
    addrs: &[Ipv6Addr],
) -> Held {
    let full = LeaseKey::Ipv6Only(own).etcd_key(prefix);
    let Some(l) = listing.iter().find(|l| l.key == full) else {
        return Held::Gone;
    };
    let ours = LeaseAttrs::parse(&l.value)
        .is_ok_and(|a| a.public_ipv6.is_some_and(|ip| addrs.contains(&ip)));
    if !ours || (own_lease_id != 0 && l.lease_id != 0 && l.lease_id != own_lease_id) {
        return Held::Lost;
    }
    Held::Ours {
        lease_id: l.lease_id,
    }
}

/// Our key (held: [`held_as`]) as a listing shows it, when its value is not `attrs` (the
/// `PublicIPv6` moved, or the value was edited by hand): its lease id (0: reserved) and
/// modification revision, to write `attrs` over it compare-and-swap, on the same lease. A
/// reservation is rewritten too: it pins the subnet to this node, and peers must reach the
/// node where it is now.
pub fn rewrite(
    prefix: &str,
    listing: &[RawLease],
    own: Ipv6OnlyKey,
    attrs: &LeaseAttrs,
) -> Option<(i64, i64)> {
    let full = LeaseKey::Ipv6Only(own).etcd_key(prefix);
    let l = listing.iter().find(|l| l.key == full)?;
    (l.value != attrs.to_json().as_bytes()).then_some((l.lease_id, l.mod_revision))
}

/// Whether a key older than ours (`own`, created at `own_rev`) claims our subnet: two key
/// forms can name one IPv6 subnet, so create-if-absent alone does not settle a race.
pub fn lost_race(
    prefix: &str,
    listing: &[RawLease],
    own: Ipv6Network,
    own_key: &str,
    own_rev: i64,
) -> bool {
    keys(prefix, listing).iter().any(|(k, l)| {
        l.key != own_key
            && l.create_revision < own_rev
            && k.ipv6()
                .is_some_and(|n| n.prefix() == own.prefix() && n.overlaps(own))
    })
}

/// A peer as the data plane programs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub key: String,
    pub peer: Ipv6OnlyPeer,
    pub attrs: LeaseAttrs,
}

/// `peers` split into those whose subnet holds none of this node's addresses `local`, and the
/// others (key, subnet): a subnet this node has an address on is not routed to a peer.
pub fn not_local(peers: Vec<Peer>, local: &[Ipv6Addr]) -> (Vec<Peer>, Vec<(String, Ipv6Network)>) {
    let (here, away): (Vec<Peer>, Vec<Peer>) = peers
        .into_iter()
        .partition(|p| local.iter().any(|a| p.peer.subnet.contains(*a)));
    (
        away,
        here.into_iter().map(|p| (p.key, p.peer.subnet)).collect(),
    )
}

/// The peers in a listing, for a node of an IPv6-only network whose subnet is `own` and whose
/// address is `public_ipv6`: every lease [`LeaseAttrs::validate_ipv6_only`] accepts (IPv6-only
/// keys, and the IPv6 half of dual-stack ones), the oldest claim winning a subnet claimed
/// twice. Our own keys are never peers: `own`, and any other key with our `PublicIPv6` (a
/// stale one, still claiming its subnet until it is removed; as a peer it would be a route or
/// an FDB entry to ourselves). The rejected rest is returned with the reason, for the log and
/// `tweed_leases_rejected_total`.
pub fn peers(
    cfg: &Ipv6Config,
    prefix: &str,
    listing: &[RawLease],
    own: Option<Ipv6Network>,
    public_ipv6: Ipv6Addr,
) -> (Vec<Peer>, Vec<(String, String, &'static str)>) {
    let mut out: Vec<Peer> = Vec::new();
    let mut claimed: Vec<Ipv6Network> = Vec::new();
    let mut skipped = Vec::new();
    for l in listing {
        if let Some(Err(e)) = LeaseKey::from_etcd_key(prefix, &l.key) {
            skipped.push((l.key.clone(), e.to_string(), "bad_key"));
        }
    }
    for (key, l) in keys(prefix, listing) {
        let checked = LeaseAttrs::parse(&l.value)
            .map_err(|e| (e.to_string(), "bad_value"))
            .and_then(|a| {
                a.validate_ipv6_only(&key, cfg)
                    .map(|p| (p, a))
                    .map_err(|r: LeaseRejection| (r.to_string(), r.label()))
            });
        match checked {
            Ok((p, _)) if own.is_some_and(|o| o.overlaps(p.subnet)) => {}
            Ok((p, _)) if claimed.iter().any(|c| c.overlaps(p.subnet)) => skipped.push((
                l.key.clone(),
                format!("{} is claimed by an older key", p.subnet),
                "overlap",
            )),
            Ok((p, _)) if p.public_ipv6 == public_ipv6 => claimed.push(p.subnet),
            Ok((peer, attrs)) => {
                claimed.push(peer.subnet);
                out.push(Peer {
                    key: l.key.clone(),
                    peer,
                    attrs,
                })
            }
            Err((why, label)) => skipped.push((l.key.clone(), why, label)),
        }
    }
    (out, skipped)
}

/// The vxlan peers among `peers` (their lease says vxlan; the VTEP is `BackendV6Data`'s, which
/// validation has checked).
pub fn vxlan_peers(peers: &[Peer]) -> Vec<Vxlan6Peer> {
    peers
        .iter()
        .filter(|p| p.attrs.effective_backend_type() == "vxlan")
        .filter_map(|p| {
            let raw = p.attrs.backend_v6_data.as_ref()?;
            let d: VxlanLeaseData = serde_json::from_str(raw.get()).ok()?;
            Some(Vxlan6Peer {
                subnet: p.peer.subnet,
                public_ipv6: p.peer.public_ipv6,
                vtep_mac: d.vtep_mac.parse().ok()?,
            })
        })
        .collect()
}

/// Whether a restart without the state-dir record may keep the vxlan device's `mac`: only
/// when every lease advertising it (in either data) names `ours` as its `PublicIPv6`, i.e. the
/// only key with that MAC is one that names this node's address (the usual upgrade from a
/// version without the record). A MAC on a key naming another address might be our old key
/// under an old address, indistinguishable from another node's, and one MAC on two keys breaks
/// every node's FDB. A value that does not parse does not advertise the MAC. Pure.
pub fn mac_free_but_ours(listing: &[RawLease], mac: MacAddr, ours: Ipv6Addr) -> bool {
    listing.iter().all(|l| {
        let Ok(attrs) = serde_json::from_slice::<LeaseAttrs>(&l.value) else {
            return true;
        };
        let shows = [&attrs.backend_data, &attrs.backend_v6_data]
            .into_iter()
            .flatten()
            .filter_map(|raw| serde_json::from_str::<VxlanLeaseData>(raw.get()).ok())
            .any(|d| d.vtep_mac.parse::<MacAddr>().ok() == Some(mac));
        !shows || attrs.public_ipv6 == Some(ours)
    })
}

/// The host-gw peers among `peers`: subnet and next hop.
pub fn hostgw_peers(peers: &[Peer]) -> Vec<(Ipv6Network, Ipv6Addr)> {
    peers
        .iter()
        .filter(|p| p.attrs.effective_backend_type() == "host-gw")
        .map(|p| (p.peer.subnet, p.peer.public_ipv6))
        .collect()
}

pub mod wireguard;

#[cfg(test)]
mod tests;
