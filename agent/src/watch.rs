//! The lease table: turns raw registry listings and watch events into lease changes. Pure, so the
//! add/update/remove rules and the compaction re-list diff are unit-tested without etcd.

use crate::registry::{RawLease, WatchEvent};
use ipnetwork::{Ipv4Network, Ipv6Network};
use std::collections::BTreeMap;
use tweed_config::{Ipv6OnlyKey, LeaseAttrs, LeaseRejection, SubnetKey};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub key: SubnetKey,
    pub attrs: LeaseAttrs,
    pub lease_id: i64,
    pub mod_revision: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseChange {
    Added(Lease),
    Updated { old: Lease, new: Lease },
    Removed(Lease),
}

impl LeaseChange {
    pub fn subnet(&self) -> Ipv4Network {
        match self {
            LeaseChange::Added(l) | LeaseChange::Removed(l) => l.key.ipv4,
            LeaseChange::Updated { new, .. } => new.key.ipv4,
        }
    }

    /// The key this change leaves without a lease: a removed one, or the old name of a renamed
    /// one (an update whose key changed: same IPv4 subnet, the IPv6 half added or dropped).
    pub fn key_gone(&self) -> Option<&SubnetKey> {
        match self {
            LeaseChange::Removed(l) => Some(&l.key),
            LeaseChange::Updated { old, new } if old.key != new.key => Some(&old.key),
            _ => None,
        }
    }
}

/// A value or key the table refused. Never fatal: the caller logs it with the key (once per
/// revision) and counts it under `kind`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub key: String,
    pub reason: String,
    /// The `reason` label of `tweed_leases_rejected_total`: `bad_key`, `bad_value`, `overlap` or
    /// a [`LeaseRejection`] label.
    pub kind: &'static str,
    /// The key's subnet when the key parsed: a rejected lease covering ours is a conflict.
    pub subnet: Option<Ipv4Network>,
    pub mod_revision: i64,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub changes: Vec<LeaseChange>,
    pub skipped: Vec<Skipped>,
}

pub struct LeaseTable {
    dir: String,
    network: Ipv4Network,
    subnet_len: u8,
    leases: BTreeMap<SubnetKey, Lease>,
    /// Every parseable key, valid value or not: all of them block allocation of their subnet.
    occupied: BTreeMap<String, Ipv4Network>,
    /// The IPv6 part of every parseable key, of either form (dual stack, or tweed's IPv6-only
    /// key that this table otherwise skips): all of them block allocation of their IPv6 subnet.
    occupied_v6: BTreeMap<String, Ipv6Network>,
    /// The IPv6 node subnet length, when the network has an IPv6 half: a key whose IPv6 part
    /// has another length blocks nothing (see [`Self::with_ipv6_subnet_len`]).
    v6_subnet_len: Option<u8>,
    /// Keys skipped as overlapping an older lease, by etcd key, as last written. When the older
    /// lease goes they are read again: a rename (the IPv6 half added or dropped) creates the new
    /// key while the old one stands, and deleting the old one must hand the subnet over at once
    /// (an update, the route kept), not leave the new key unseen until a rewrite or a resync.
    shadowed: BTreeMap<String, RawLease>,
}

impl LeaseTable {
    pub fn new(prefix: &str, network: Ipv4Network, subnet_len: u8) -> Self {
        LeaseTable {
            dir: format!("{}/subnets/", prefix.trim_end_matches('/')),
            network,
            subnet_len,
            leases: BTreeMap::new(),
            occupied: BTreeMap::new(),
            occupied_v6: BTreeMap::new(),
            v6_subnet_len: None,
            shadowed: BTreeMap::new(),
        }
    }

    /// Counts only IPv6 parts of `len` as occupied, as IPv4 parts of another length than
    /// `SubnetLen` are not: no node allocates another length, and a hostile `&::-0` (or a part
    /// covering all of `IPv6Network`) would otherwise leave no IPv6 subnet free for anyone.
    pub fn with_ipv6_subnet_len(mut self, len: Option<u8>) -> Self {
        self.v6_subnet_len = len;
        self
    }

    fn occupy_v6(&mut self, key: &str, v6: Option<Ipv6Network>) {
        match v6.filter(|n| self.v6_subnet_len.is_none_or(|l| n.prefix() == l)) {
            Some(n) => self.occupied_v6.insert(key.to_string(), n),
            None => self.occupied_v6.remove(key),
        };
    }

    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    pub fn get(&self, key: &SubnetKey) -> Option<&Lease> {
        self.leases.get(key)
    }

    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    pub fn occupied(&self) -> Vec<Ipv4Network> {
        self.occupied.values().copied().collect()
    }

    /// The IPv6 part of every key but `except` (an etcd key), for [`crate::alloc::choose_v6`].
    pub fn occupied_v6(&self, except: Option<&str>) -> Vec<Ipv6Network> {
        self.occupied_v6
            .iter()
            .filter(|(k, _)| Some(k.as_str()) != except)
            .map(|(_, v)| *v)
            .collect()
    }

    /// Whether the etcd key `key` blocks allocation of an IPv4 subnet overlapping `v4` or an
    /// IPv6 subnet overlapping `v6`.
    pub fn blocks(&self, key: &str, v4: Ipv4Network, v6: Option<Ipv6Network>) -> bool {
        let over4 = |o: &Ipv4Network| o.contains(v4.network()) || v4.contains(o.network());
        self.occupied.get(key).is_some_and(over4) || v6.is_some_and(|v6| self.blocks_v6(key, v6))
    }

    /// Whether the etcd key `key` blocks allocation of an IPv6 subnet overlapping `v6`.
    pub fn blocks_v6(&self, key: &str, v6: Ipv6Network) -> bool {
        self.occupied_v6
            .get(key)
            .is_some_and(|o| o.contains(v6.network()) || v6.contains(o.network()))
    }

    fn parse_key(&self, key: &str, mod_revision: i64) -> Option<Result<SubnetKey, Skipped>> {
        let name = key.strip_prefix(&self.dir)?;
        Some(name.parse::<SubnetKey>().map_err(|e| Skipped {
            key: key.to_string(),
            reason: e.to_string(),
            kind: "bad_key",
            subnet: None,
            mod_revision,
        }))
    }

    fn put(&mut self, raw: &RawLease, out: &mut Applied) {
        self.shadowed.remove(&raw.key);
        let key = match self.parse_key(&raw.key, raw.mod_revision) {
            None => return,
            Some(Err(s)) => {
                // An IPv6-only key is no peer of this (IPv4) table, but its subnet is taken.
                let name = raw.key.strip_prefix(&self.dir).unwrap_or_default();
                if let Ok(k) = name.parse::<Ipv6OnlyKey>() {
                    self.occupy_v6(&raw.key, Some(k.ipv6));
                }
                return out.skipped.push(s);
            }
            Some(Ok(k)) => k,
        };
        self.occupied.insert(raw.key.clone(), key.ipv4);
        self.occupy_v6(&raw.key, key.ipv6);
        let skip = |kind: &'static str, reason: String| Skipped {
            key: raw.key.clone(),
            reason,
            kind,
            subnet: Some(key.ipv4),
            mod_revision: raw.mod_revision,
        };
        // A corrupt or hostile value keeps whatever we last knew for the key: dropping a working
        // peer because someone wrote garbage would turn one bad write into lost traffic.
        let attrs = match LeaseAttrs::parse(&raw.value) {
            Ok(a) => a,
            Err(e) => return out.skipped.push(skip("bad_value", e.to_string())),
        };
        if let Err(e) = attrs.validate(&key, self.network, self.subnet_len) {
            if matches!(
                e,
                LeaseRejection::WrongPrefixLen { .. } | LeaseRejection::OutsideNetwork { .. }
            ) {
                // No node allocates such a key, so it must not block allocation either: a
                // stray `10.244.0.0-16`, or `10.0.0.0-8` around the whole network, would
                // otherwise leave no free subnet at all. (One outside and disjoint blocks
                // nothing anyway.)
                self.occupied.remove(&raw.key);
            }
            return out.skipped.push(skip(e.label(), e.to_string()));
        }
        if let Some(other) = self.leases.keys().find(|k| {
            **k != key
                && (k.ipv4.contains(key.ipv4.network()) || key.ipv4.contains(k.ipv4.network()))
        }) {
            // Ignored by everyone, so it must not block allocation either: a stray
            // `10.244.0.0-16` would otherwise leave no free subnet at all.
            self.occupied.remove(&raw.key);
            self.shadowed.insert(raw.key.clone(), raw.clone());
            return out.skipped.push(skip(
                "overlap",
                format!(
                    "subnet {} overlaps the existing lease for {}",
                    key.ipv4, other.ipv4
                ),
            ));
        }
        let new = Lease {
            key,
            attrs,
            lease_id: raw.lease_id,
            mod_revision: raw.mod_revision,
        };
        match self.leases.insert(key, new.clone()) {
            None => out.changes.push(LeaseChange::Added(new)),
            // A changed lease id is a change too: `tweedctl net reserve` detaches a key from its
            // TTL (lease 0) and `unreserve` attaches it to a new one, with the same value.
            Some(old) if old.attrs != new.attrs || old.lease_id != new.lease_id => {
                out.changes.push(LeaseChange::Updated { old, new })
            }
            Some(_) => {}
        }
    }

    fn delete(&mut self, key: &str, out: &mut Applied) {
        self.occupied.remove(key);
        self.occupied_v6.remove(key);
        self.shadowed.remove(key);
        let Some(Ok(k)) = self.parse_key(key, 0) else {
            return;
        };
        let Some(old) = self.leases.remove(&k) else {
            return;
        };
        let freed = old.key.ipv4;
        out.changes.push(LeaseChange::Removed(old));
        // The keys this lease shadowed stand now, oldest first (the table's rule). A rename's
        // new key becomes the lease in the same batch, and `coalesce` makes the pair an update.
        let mut waiting: Vec<RawLease> = self
            .shadowed
            .values()
            .filter(|r| {
                let name = r.key.strip_prefix(&self.dir).unwrap_or_default();
                name.parse::<SubnetKey>()
                    .is_ok_and(|s| s.ipv4.overlaps(freed))
            })
            .cloned()
            .collect();
        waiting.sort_by_key(|r| (r.create_revision, r.mod_revision));
        for raw in &waiting {
            self.put(raw, out);
        }
    }

    /// Makes a removed lease and an added one of the same node on the same IPv4 subnet (same
    /// `PublicIP`) one update: a rename, whose key gained or lost its IPv6 half. Consumers then
    /// keep the IPv4 route instead of deleting and re-adding it.
    fn coalesce(out: &mut Applied) {
        let mut merged: Vec<LeaseChange> = Vec::with_capacity(out.changes.len());
        for c in std::mem::take(&mut out.changes) {
            if let LeaseChange::Added(new) = &c {
                let same_node = |p: &LeaseChange| {
                    matches!(p, LeaseChange::Removed(old)
                        if old.key.ipv4 == new.key.ipv4 && old.attrs.public_ip == new.attrs.public_ip)
                };
                if let Some(i) = merged.iter().position(same_node) {
                    if let LeaseChange::Removed(old) = merged.remove(i) {
                        merged.insert(
                            i,
                            LeaseChange::Updated {
                                old,
                                new: new.clone(),
                            },
                        );
                        continue;
                    }
                }
            }
            merged.push(c);
        }
        out.changes = merged;
    }

    pub fn apply(&mut self, events: &[WatchEvent]) -> Applied {
        let mut out = Applied::default();
        for ev in events {
            match ev {
                WatchEvent::Put(raw) => self.put(raw, &mut out),
                WatchEvent::Delete { key, .. } => self.delete(key, &mut out),
            }
        }
        Self::coalesce(&mut out);
        out
    }

    /// Replaces the table with a full listing (start, or after a compacted watch) and reports the
    /// difference as if the missed events had been seen.
    pub fn resync(&mut self, listing: &[RawLease]) -> Applied {
        let mut out = Applied::default();
        let present: std::collections::HashSet<&str> =
            listing.iter().map(|l| l.key.as_str()).collect();
        let gone: std::collections::BTreeSet<String> = self
            .occupied
            .keys()
            .chain(self.occupied_v6.keys())
            .filter(|k| !present.contains(k.as_str()))
            .cloned()
            .collect();
        // A shadowed key gone from the listing must not come back when its shadow goes.
        self.shadowed.retain(|k, _| present.contains(k.as_str()));
        for k in gone {
            self.delete(&k, &mut out);
        }
        // Oldest key first: otherwise a newer key that sorts first (`10.244.0.0-16`, a /23 before
        // its /24) wins an overlap against a real lease. Creation, not last write, decides, so a
        // real lease rewritten later (new VTEP MAC) still beats a bogus key written before that.
        let mut listing: Vec<&RawLease> = listing.iter().collect();
        listing.sort_by_key(|l| (l.create_revision, l.mod_revision));
        for raw in listing {
            self.put(raw, &mut out);
        }
        Self::coalesce(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/coreos.com/network";

    fn raw(subnet: &str, value: &str, rev: i64) -> RawLease {
        RawLease {
            key: format!("{P}/subnets/{subnet}"),
            value: value.as_bytes().to_vec(),
            lease_id: 5,
            mod_revision: rev,
            create_revision: rev,
        }
    }

    fn vx(ip: &str, mac: &str) -> String {
        format!(
            r#"{{"PublicIP":"{ip}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
        )
    }

    /// The vxlan lease of node `n`: public IP 198.18.0.n, VTEP MAC aa:aa:aa:aa:aa:<n as two digits>.
    fn node(subnet: &str, n: u8, rev: i64) -> RawLease {
        raw(
            subnet,
            &vx(&format!("198.18.0.{n}"), &format!("aa:aa:aa:aa:aa:{n:02}")),
            rev,
        )
    }

    fn table() -> LeaseTable {
        LeaseTable::new(P, "10.244.0.0/16".parse().unwrap(), 24)
    }

    #[test]
    fn add_update_remove() {
        let mut t = table();
        let a = t.apply(&[WatchEvent::Put(raw(
            "10.244.1.0-24",
            &vx("198.18.0.1", "aa:aa:aa:aa:aa:01"),
            2,
        ))]);
        assert!(
            matches!(a.changes.as_slice(), [LeaseChange::Added(l)] if l.key.ipv4.to_string() == "10.244.1.0/24")
        );
        // Same attrs, new revision (a renewal rewrite): not a change.
        let a = t.apply(&[WatchEvent::Put(raw(
            "10.244.1.0-24",
            &vx("198.18.0.1", "aa:aa:aa:aa:aa:01"),
            3,
        ))]);
        assert_eq!(a, Applied::default());
        // New VTEP MAC: an update carrying old and new.
        let a = t.apply(&[WatchEvent::Put(raw(
            "10.244.1.0-24",
            &vx("198.18.0.1", "aa:aa:aa:aa:aa:02"),
            4,
        ))]);
        match a.changes.as_slice() {
            [LeaseChange::Updated { old, new }] => {
                assert_eq!(
                    old.attrs.vxlan_data().unwrap().vtep_mac,
                    "aa:aa:aa:aa:aa:01"
                );
                assert_eq!(
                    new.attrs.vxlan_data().unwrap().vtep_mac,
                    "aa:aa:aa:aa:aa:02"
                );
            }
            other => panic!("{other:?}"),
        }
        let a = t.apply(&[WatchEvent::Delete {
            key: format!("{P}/subnets/10.244.1.0-24"),
            revision: 5,
        }]);
        assert!(matches!(a.changes.as_slice(), [LeaseChange::Removed(_)]));
        assert!(t.is_empty() && t.occupied().is_empty());
        // Deleting an unknown key is nothing.
        assert_eq!(
            t.apply(&[WatchEvent::Delete {
                key: format!("{P}/subnets/10.244.9.0-24"),
                revision: 6
            }]),
            Applied::default()
        );
    }

    #[test]
    fn corrupt_and_foreign_values_are_skipped_not_fatal() {
        let mut t = table();
        let a = t.apply(&[
            WatchEvent::Put(raw("10.244.1.0-24", "{not json", 2)),
            WatchEvent::Put(node("bogus", 2, 3)),
            WatchEvent::Put(raw(
                "10.9.0.0-24",
                &vx("198.18.0.3", "aa:aa:aa:aa:aa:03"),
                4,
            )),
            WatchEvent::Put(raw(
                "10.244.2.0-24",
                &vx("198.18.0.4", "aa:aa:aa:aa:aa:04"),
                5,
            )),
            WatchEvent::Put(raw(
                "10.244.2.0-23",
                &vx("198.18.0.5", "aa:aa:aa:aa:aa:05"),
                6,
            )),
            // Not under subnets/: ignored silently.
            WatchEvent::Put(RawLease {
                key: format!("{P}/config"),
                value: b"{}".to_vec(),
                lease_id: 0,
                mod_revision: 7,
                create_revision: 7,
            }),
        ]);
        assert_eq!(a.changes.len(), 1, "{a:?}");
        let keys: Vec<_> = a
            .skipped
            .iter()
            .map(|s| s.key.rsplit('/').next().unwrap().to_string())
            .collect();
        assert_eq!(
            keys,
            ["10.244.1.0-24", "bogus", "10.9.0.0-24", "10.244.2.0-23"]
        );
        let kinds: Vec<_> = a.skipped.iter().map(|s| s.kind).collect();
        assert_eq!(
            kinds,
            [
                "bad_value",
                "bad_key",
                "outside_network",
                "wrong_prefix_len"
            ]
        );
        assert!(
            a.skipped[3].reason.contains("SubnetLen is /24"),
            "{:?}",
            a.skipped[3]
        );
        // The corrupt key still blocks allocation of its subnet.
        assert!(t.occupied().contains(&"10.244.1.0/24".parse().unwrap()));
        // A good lease overwritten with garbage keeps its last good value.
        let a = t.apply(&[WatchEvent::Put(raw("10.244.2.0-24", "garbage", 8))]);
        assert!(a.changes.is_empty() && a.skipped.len() == 1);
        assert_eq!(t.len(), 1);
    }

    /// Issue 19 item 5: an IPv6-only key (tweed's form) and flannel's IPv6-only spelling reach an
    /// IPv4/dual-stack node's watch: both are skipped as bad keys, neither claims an IPv4 subnet
    /// (flannel's would otherwise read as 0.0.0.0/0 and leave no subnet free), and the good lease
    /// beside them is applied.
    #[test]
    fn ipv6_only_keys_are_skipped_and_block_no_ipv4_subnet() {
        let mut t = table();
        let v6only = r#"{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::6","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"aa:aa:aa:aa:aa:06"}}"#;
        let a = t.resync(&[
            raw("fd00:10:244:3::-64", v6only, 2),
            raw("0.0.0.0-0&fd00:10:244:4::-64", v6only, 3),
            node("10.244.2.0-24", 4, 4),
        ]);
        assert_eq!(a.changes.len(), 1, "{a:?}");
        let kinds: Vec<_> = a.skipped.iter().map(|s| (s.kind, s.subnet)).collect();
        assert_eq!(kinds, [("bad_key", None), ("bad_key", None)]);
        for s in &a.skipped {
            assert!(s.reason.contains("IPv6-only"), "{s:?}");
        }
        assert_eq!(t.occupied(), ["10.244.2.0/24".parse().unwrap()]);
    }

    /// A key around the whole network (`10.0.0.0-8` over 10.244.0.0/16, or `0.0.0.0-0`) is
    /// refused as outside the network and, like a wrong-length key, leaves allocation free.
    #[test]
    fn keys_around_the_whole_network_block_no_allocation() {
        let mut t = table();
        // Nodes 2..=5, each key one revision newer than the one before.
        let keys = ["10.0.0.0-8", "0.0.0.0-0", "10.244.0.0-16", "10.244.2.0-24"];
        let leases: Vec<_> = (2u8..)
            .zip(keys)
            .map(|(n, k)| node(k, n, n.into()))
            .collect();
        let a = t.resync(&leases);
        let kinds: Vec<_> = a.skipped.iter().map(|s| s.kind).collect();
        assert_eq!(
            kinds,
            ["outside_network", "outside_network", "wrong_prefix_len"]
        );
        assert_eq!(t.occupied(), ["10.244.2.0/24".parse().unwrap()]);
        let cfg = tweed_config::NetworkConfig::parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap();
        let d = crate::alloc::choose(
            &cfg,
            &[],
            &t.occupied(),
            "198.18.0.9".parse().unwrap(),
            None,
            &Default::default(),
            &mut rand::rng(),
        );
        assert!(
            matches!(d, Ok(crate::alloc::Decision::Take(s)) if s != "10.244.2.0/24".parse().unwrap()),
            "{d:?}"
        );
    }

    #[test]
    fn resync_lets_the_older_of_two_overlapping_leases_win_whatever_the_key_order() {
        let mut t = table();
        let a = t.resync(&[
            node("10.244.0.0-16", 9, 9),
            node("10.244.2.0-23", 8, 8),
            node("10.244.2.0-24", 2, 3),
            node("10.244.5.0-24", 5, 4),
        ]);
        assert_eq!(a.changes.len(), 2, "{a:?}");
        assert_eq!(a.skipped.len(), 2, "{a:?}");
        assert!(
            a.skipped.iter().all(|s| s.kind == "wrong_prefix_len"),
            "{a:?}"
        );
        assert_eq!(t.len(), 2);
        // Skipped for their length, they do not block allocation.
        let mut occupied = t.occupied();
        occupied.sort();
        assert_eq!(
            occupied,
            [
                "10.244.2.0/24".parse().unwrap(),
                "10.244.5.0/24".parse().unwrap()
            ]
        );
    }

    #[test]
    fn a_real_lease_rewritten_after_a_bogus_key_still_wins_on_resync() {
        let mut t = table();
        // Real lease created at 3, bogus /16 at 5, real lease rewritten (new MAC) at 8.
        let mut real = raw("10.244.2.0-24", &vx("198.18.0.2", "aa:aa:aa:aa:aa:22"), 8);
        real.create_revision = 3;
        let bogus = node("10.244.0.0-16", 9, 5);
        let a = t.resync(&[bogus, real]);
        assert_eq!(t.len(), 1, "{a:?}");
        assert_eq!(
            t.leases().next().unwrap().key.ipv4.to_string(),
            "10.244.2.0/24"
        );
        assert_eq!(a.skipped.len(), 1);
        assert!(a.skipped[0].key.ends_with("10.244.0.0-16"), "{a:?}");
    }

    #[test]
    fn hostile_values_are_rejected_counted_by_kind_and_keep_the_last_good_value() {
        let mut t = table();
        let good = node("10.244.2.0-24", 2, 2);
        t.apply(&[WatchEvent::Put(good)]);
        let hostile = [
            (
                r#"{"PublicIP":"127.0.0.1","BackendType":"host-gw"}"#,
                "bad_public_ip",
            ),
            (
                r#"{"PublicIP":"224.0.0.5","BackendType":"host-gw"}"#,
                "bad_public_ip",
            ),
            (
                r#"{"PublicIP":"0.0.0.0","BackendType":"host-gw"}"#,
                "bad_public_ip",
            ),
            (
                r#"{"PublicIP":"10.244.7.1","BackendType":"host-gw"}"#,
                "public_ip_in_overlay",
            ),
            (
                r#"{"PublicIP":"198.18.0.2","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"x"}}"#,
                "bad_backend_data",
            ),
        ];
        for (i, (v, kind)) in hostile.iter().enumerate() {
            let a = t.apply(&[WatchEvent::Put(raw("10.244.2.0-24", v, 10 + i as i64))]);
            assert!(a.changes.is_empty(), "{v}: {a:?}");
            assert_eq!(a.skipped.len(), 1);
            assert_eq!(a.skipped[0].kind, *kind, "{v}");
            assert_eq!(a.skipped[0].mod_revision, 10 + i as i64);
            assert_eq!(a.skipped[0].subnet, Some("10.244.2.0/24".parse().unwrap()));
        }
        let l = t.leases().next().unwrap();
        assert_eq!(l.attrs.public_ip.to_string(), "198.18.0.2");
        // A hostile new key is never added, but still blocks allocation of its subnet.
        let a = t.apply(&[WatchEvent::Put(raw(
            "10.244.3.0-24",
            r#"{"PublicIP":"127.0.0.1"}"#,
            20,
        ))]);
        assert!(a.changes.is_empty() && a.skipped.len() == 1);
        assert_eq!(t.len(), 1);
        assert!(t.occupied().contains(&"10.244.3.0/24".parse().unwrap()));
    }

    #[test]
    fn overlapping_keys_lose_to_the_older_one() {
        // Only reachable when the network's SubnetLen changed under running agents; the older
        // key still wins.
        let mut t = LeaseTable::new(P, "10.244.0.0/16".parse().unwrap(), 23);
        let a = t.resync(&[node("10.244.2.0-23", 8, 3), node("10.244.2.0-24", 2, 2)]);
        assert_eq!(a.skipped.len(), 1, "{a:?}");
        assert_eq!(a.skipped[0].kind, "wrong_prefix_len");
        let mut t = LeaseTable::new(P, "10.244.0.0/16".parse().unwrap(), 24);
        t.leases.insert(
            "10.244.2.0-23".parse().unwrap(),
            Lease {
                key: "10.244.2.0-23".parse().unwrap(),
                attrs: LeaseAttrs::parse(vx("198.18.0.8", "aa:aa:aa:aa:aa:08").as_bytes()).unwrap(),
                lease_id: 1,
                mod_revision: 1,
            },
        );
        let a = t.apply(&[WatchEvent::Put(raw(
            "10.244.3.0-24",
            &vx("198.18.0.3", "aa:aa:aa:aa:aa:03"),
            4,
        ))]);
        assert_eq!(a.skipped[0].kind, "overlap", "{a:?}");
    }

    #[test]
    fn resync_after_compaction_reports_the_missed_difference() {
        let mut t = table();
        t.resync(&[
            node("10.244.1.0-24", 1, 2),
            node("10.244.2.0-24", 2, 3),
            node("10.244.3.0-24", 3, 4),
        ]);
        assert_eq!(t.len(), 3);
        // While the watch was down: .1 deleted, .2 changed, .3 untouched, .4 added.
        let a = t.resync(&[
            raw("10.244.2.0-24", &vx("198.18.0.2", "aa:aa:aa:aa:aa:22"), 10),
            node("10.244.3.0-24", 3, 4),
            node("10.244.4.0-24", 4, 11),
        ]);
        let mut kinds: Vec<_> = a
            .changes
            .iter()
            .map(|c| match c {
                LeaseChange::Added(_) => format!("add {}", c.subnet()),
                LeaseChange::Updated { .. } => format!("update {}", c.subnet()),
                LeaseChange::Removed(_) => format!("remove {}", c.subnet()),
            })
            .collect();
        kinds.sort();
        assert_eq!(
            kinds,
            [
                "add 10.244.4.0/24",
                "remove 10.244.1.0/24",
                "update 10.244.2.0/24"
            ]
        );
        assert_eq!(t.len(), 3);
        // A second identical resync is a no-op.
        assert!(t
            .resync(&[
                raw("10.244.2.0-24", &vx("198.18.0.2", "aa:aa:aa:aa:aa:22"), 10),
                node("10.244.3.0-24", 3, 4),
                node("10.244.4.0-24", 4, 11),
            ])
            .changes
            .is_empty());
    }

    /// Hostile IPv6 parts (a /0, the whole IPv6 network, a wrong length, a dotted or
    /// non-canonical spelling) block no IPv6 subnet; node-sized ones of both key forms do.
    #[test]
    fn only_node_sized_ipv6_parts_block_ipv6_subnets() {
        use crate::testutil::net;
        let mut t = LeaseTable::new(P, net("10.244.0.0/16"), 24).with_ipv6_subnet_len(Some(64));
        let v = r#"{"PublicIP":"198.18.0.9","PublicIPv6":"2001:db8::9"}"#;
        let listing: Vec<RawLease> = [
            "10.244.1.0-24&::-0",
            "10.244.2.0-24&fd00:10:244::-56",
            "10.244.3.0-24&fd00:10:244:3::-80",
            "10.244.4.0-24&::ffff:10.0.0.0-120",
            "10.244.5.0-24&FD00:10:244:5::-64",
            "fd00:10:244:6::-64&",
            "::-0",
            "10.244.7.0-24&fd00:10:244:7::-64",
            "fd00:10:244:8::-64",
        ]
        .iter()
        .enumerate()
        .map(|(i, k)| raw(k, v, i as i64 + 1))
        .collect();
        t.resync(&listing);
        let mut got: Vec<String> = t.occupied_v6(None).iter().map(|n| n.to_string()).collect();
        got.sort();
        assert_eq!(got, ["fd00:10:244:7::/64", "fd00:10:244:8::/64"]);
        let k7 = format!("{P}/subnets/10.244.7.0-24&fd00:10:244:7::-64");
        assert_eq!(t.occupied_v6(Some(&k7)).len(), 1);
        assert!(t.blocks(
            &k7,
            net("10.244.99.0/24"),
            Some("fd00:10:244:7::/64".parse().unwrap())
        ));
        assert!(t.blocks(&k7, net("10.244.7.0/24"), None));
        assert!(!t.blocks(
            &k7,
            net("10.244.99.0/24"),
            Some("fd00:10:244:9::/64".parse().unwrap())
        ));
        // Deleted keys free their IPv6 subnets, the IPv6-only form included.
        t.resync(&listing[..6]);
        assert!(t.occupied_v6(None).is_empty());
    }

    /// Review finding 1 of issue 19: a node renamed its lease (its IPv6 half added, or dropped),
    /// creating the new key while the old one stood, then deleting the old one. The table must
    /// report one update (the IPv4 route kept), never a remove then an add, whatever the order of
    /// the batches, and in a resync that missed the events.
    #[test]
    fn a_rename_of_the_same_node_is_an_update_not_a_remove_and_an_add() {
        let v4 = "10.244.3.0-24";
        let dual = "10.244.3.0-24&fd00:10:244:3::-64";
        let dual_value = r#"{"PublicIP":"198.18.0.3","PublicIPv6":"2001:db8::3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:aa:aa:aa:aa:03"}}"#;
        let del = |k: &str| WatchEvent::Delete {
            key: format!("{P}/subnets/{k}"),
            revision: 0,
        };
        let rename = |a: &Applied, from: &str, to: &str| match a.changes.as_slice() {
            [LeaseChange::Updated { old, new }] => {
                assert_eq!(old.key, from.parse().unwrap());
                assert_eq!(new.key, to.parse().unwrap());
                assert_eq!(a.changes[0].key_gone(), Some(&old.key));
            }
            other => panic!("{from} -> {to}: {other:?}"),
        };
        // v4-only -> dual, then back, each as two batches: create the new key, delete the old.
        let mut t = table();
        t.apply(&[WatchEvent::Put(node(v4, 3, 2))]);
        let a = t.apply(&[WatchEvent::Put(raw(dual, dual_value, 3))]);
        assert!(
            a.changes.is_empty(),
            "the new key waits behind the old: {a:?}"
        );
        assert_eq!(a.skipped[0].kind, "overlap");
        rename(&t.apply(&[del(v4)]), v4, dual);
        assert_eq!(
            t.leases().map(|l| l.key).collect::<Vec<_>>(),
            [dual.parse().unwrap()]
        );
        assert_eq!(t.occupied(), ["10.244.3.0/24".parse().unwrap()]);
        // The rename's rewrite of the new key, once alone, is no change.
        assert!(t
            .apply(&[WatchEvent::Put(raw(dual, dual_value, 5))])
            .changes
            .is_empty());
        t.apply(&[WatchEvent::Put(node(v4, 3, 6))]);
        rename(&t.apply(&[del(dual)]), dual, v4);
        // One batch holding both events.
        let mut t = table();
        t.apply(&[WatchEvent::Put(node(v4, 3, 2))]);
        rename(
            &t.apply(&[WatchEvent::Put(raw(dual, dual_value, 3)), del(v4)]),
            v4,
            dual,
        );
        // A resync that missed both events.
        let mut t = table();
        t.resync(&[node(v4, 3, 2)]);
        rename(&t.resync(&[raw(dual, dual_value, 3)]), v4, dual);
        // Another node's key on the subnet (another PublicIP) is a real remove and add.
        let mut t = table();
        t.apply(&[WatchEvent::Put(node(v4, 3, 2))]);
        t.apply(&[WatchEvent::Put(node(dual, 4, 3))]);
        let a = t.apply(&[del(v4)]);
        assert!(
            matches!(
                a.changes.as_slice(),
                [LeaseChange::Removed(_), LeaseChange::Added(_)]
            ),
            "{a:?}"
        );
        // A shadowed key deleted before its shadow goes never comes back.
        let mut t = table();
        t.apply(&[WatchEvent::Put(node(v4, 3, 2))]);
        t.apply(&[WatchEvent::Put(raw(dual, dual_value, 3))]);
        t.apply(&[del(dual)]);
        let a = t.apply(&[del(v4)]);
        assert!(
            matches!(a.changes.as_slice(), [LeaseChange::Removed(_)]),
            "{a:?}"
        );
        assert!(t.is_empty() && t.occupied().is_empty());
    }
}
