//! How the kernel's neighbour, FDB and route tables react to [`Op`]s, as far as tweed relies on
//! it. One model serves the [`super::Fake`] kernel and the backends' in-memory view of what they
//! programmed, so both agree with each other by construction.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};

use super::op::Op;
use super::types::{FdbEntry, FdbEntry6, MacAddr, Neighbour, Neighbour6, Route, Route6};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tables {
    pub neigh: BTreeMap<(u32, Ipv4Addr), Neighbour>,
    /// One entry per (device, MAC) with its list of remote VTEPs, as vxlan keeps them.
    pub fdb: BTreeMap<(u32, MacAddr), Vec<FdbEntry>>,
    /// The main table's identity of a route is (dst, metric), not the device.
    pub routes: BTreeMap<(Ipv4Network, u32), Route>,
    /// The IPv6 twins, kept by the same rules.
    pub neigh6: BTreeMap<(u32, Ipv6Addr), Neighbour6>,
    pub fdb6: BTreeMap<(u32, MacAddr), Vec<FdbEntry6>>,
    pub routes6: BTreeMap<(Ipv6Network, u32), Route6>,
}

impl Tables {
    pub fn from_entries(neigh: &[Neighbour], fdb: &[FdbEntry], routes: &[Route]) -> Tables {
        let mut t = Tables::default();
        for n in neigh {
            t.neigh.insert((n.ifindex, n.ip), *n);
        }
        for e in fdb {
            t.fdb.entry((e.ifindex, e.mac)).or_default().push(*e);
        }
        for r in routes {
            t.routes.insert((r.dst, r.metric), *r);
        }
        t
    }

    pub fn neighbours(&self, ifindex: u32) -> Vec<Neighbour> {
        self.neigh
            .values()
            .filter(|n| n.ifindex == ifindex)
            .copied()
            .collect()
    }

    pub fn fdb_entries(&self, ifindex: u32) -> Vec<FdbEntry> {
        self.fdb
            .iter()
            .filter(|((i, _), _)| *i == ifindex)
            .flat_map(|(_, v)| v.iter().copied())
            .collect()
    }

    pub fn routes_via(&self, oif: u32) -> Vec<Route> {
        self.routes
            .values()
            .filter(|r| r.oif == Some(oif))
            .copied()
            .collect()
    }

    /// Applies a neighbour, FDB or route op; `Err(errno)` as the kernel would answer. Other ops
    /// do not touch these tables and succeed.
    pub fn apply(&mut self, op: &Op) -> Result<(), i32> {
        match op {
            Op::NeighReplace { ifindex, ip, mac } => {
                self.neigh.insert(
                    (*ifindex, *ip),
                    Neighbour::permanent(*ifindex, *ip, Some(*mac)),
                );
                Ok(())
            }
            Op::NeighDel { ifindex, ip } => self
                .neigh
                .remove(&(*ifindex, *ip))
                .map(drop)
                .ok_or(libc::ENOENT),
            Op::FdbReplace { ifindex, mac, dst } => {
                let new = FdbEntry::permanent(*ifindex, *mac, Some(*dst));
                let remotes = self.fdb.entry((*ifindex, *mac)).or_default();
                // vxlan's NLM_F_REPLACE rewrites the first remote in place and leaves the others.
                match remotes.iter().position(|e| e.dst == Some(*dst)) {
                    Some(i) => remotes[i] = new,
                    None if remotes.is_empty() => remotes.push(new),
                    None => remotes[0] = new,
                }
                for e in remotes.iter_mut() {
                    e.permanent = true;
                }
                Ok(())
            }
            Op::FdbDel { ifindex, mac, dst } => {
                let key = (*ifindex, *mac);
                let remotes = self.fdb.get_mut(&key).ok_or(libc::ENOENT)?;
                match dst {
                    None => {
                        self.fdb.remove(&key);
                    }
                    Some(d) => {
                        let i = remotes
                            .iter()
                            .position(|e| e.dst == Some(*d))
                            .ok_or(libc::ENOENT)?;
                        remotes.remove(i);
                        if remotes.is_empty() {
                            self.fdb.remove(&key);
                        }
                    }
                }
                Ok(())
            }
            Op::RouteReplace(r) => {
                let mut r = *r;
                if r.protocol == 0 {
                    r.protocol = Route::PROTO_STATIC;
                }
                self.routes.insert((r.dst, r.metric), r);
                Ok(())
            }
            Op::RouteDel(r) => {
                let key = (r.dst, r.metric);
                let found = self.routes.get(&key).ok_or(libc::ESRCH)?;
                let oif_ok = r.oif.is_none() || r.oif == found.oif;
                let gw_ok = r.gateway.is_none() || r.gateway == found.gateway;
                if !(oif_ok && gw_ok) {
                    return Err(libc::ESRCH);
                }
                self.routes.remove(&key);
                Ok(())
            }
            Op::Neigh6Replace { ifindex, ip, mac } => {
                self.neigh6.insert(
                    (*ifindex, *ip),
                    Neighbour6 {
                        ifindex: *ifindex,
                        ip: *ip,
                        mac: Some(*mac),
                        permanent: true,
                    },
                );
                Ok(())
            }
            Op::Neigh6Del { ifindex, ip } => self
                .neigh6
                .remove(&(*ifindex, *ip))
                .map(drop)
                .ok_or(libc::ENOENT),
            Op::Fdb6Replace { ifindex, mac, dst } => {
                let new = FdbEntry6 {
                    ifindex: *ifindex,
                    mac: *mac,
                    dst: Some(*dst),
                    permanent: true,
                };
                let remotes = self.fdb6.entry((*ifindex, *mac)).or_default();
                match remotes.iter().position(|e| e.dst == Some(*dst)) {
                    Some(i) => remotes[i] = new,
                    None if remotes.is_empty() => remotes.push(new),
                    None => remotes[0] = new,
                }
                for e in remotes.iter_mut() {
                    e.permanent = true;
                }
                Ok(())
            }
            Op::Fdb6Del { ifindex, mac, dst } => {
                let key = (*ifindex, *mac);
                let remotes = self.fdb6.get_mut(&key).ok_or(libc::ENOENT)?;
                match dst {
                    None => {
                        self.fdb6.remove(&key);
                    }
                    Some(d) => {
                        let i = remotes
                            .iter()
                            .position(|e| e.dst == Some(*d))
                            .ok_or(libc::ENOENT)?;
                        remotes.remove(i);
                        if remotes.is_empty() {
                            self.fdb6.remove(&key);
                        }
                    }
                }
                Ok(())
            }
            Op::Route6Replace(r) => {
                let mut r = *r;
                if r.protocol == 0 {
                    r.protocol = Route::PROTO_STATIC;
                }
                self.routes6.insert((r.dst, r.metric), r);
                Ok(())
            }
            Op::Route6Del(r) => {
                let key = (r.dst, r.metric);
                let found = self.routes6.get(&key).ok_or(libc::ESRCH)?;
                let oif_ok = r.oif.is_none() || r.oif == found.oif;
                let gw_ok = r.gateway.is_none() || r.gateway == found.gateway;
                if !(oif_ok && gw_ok) {
                    return Err(libc::ESRCH);
                }
                self.routes6.remove(&key);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    pub fn neighbours6(&self, ifindex: u32) -> Vec<Neighbour6> {
        self.neigh6
            .values()
            .filter(|n| n.ifindex == ifindex)
            .copied()
            .collect()
    }

    pub fn fdb6_entries(&self, ifindex: u32) -> Vec<FdbEntry6> {
        self.fdb6
            .iter()
            .filter(|((i, _), _)| *i == ifindex)
            .flat_map(|(_, v)| v.iter().copied())
            .collect()
    }

    /// Forgets everything attached to a device, as the kernel does when the device goes away.
    pub fn drop_device(&mut self, ifindex: u32) {
        self.neigh.retain(|(i, _), _| *i != ifindex);
        self.fdb.retain(|(i, _), _| *i != ifindex);
        self.routes.retain(|_, r| r.oif != Some(ifindex));
        self.neigh6.retain(|(i, _), _| *i != ifindex);
        self.fdb6.retain(|(i, _), _| *i != ifindex);
        self.routes6.retain(|_, r| r.oif != Some(ifindex));
    }
}
