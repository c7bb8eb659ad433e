//! A lease event at O(changed peers) (issue 20): the full [`plan`] builds the whole
//! effective-peer set and hash maps of every entry on the device (~8 ms at 10,000 peers), yet an
//! event usually adds, changes or removes one peer whose entries no other peer shares.
//!
//! One peer's change can move another peer's entries only through the rules of
//! `effective_peers`: one owner per canonical subnet, per subnet address (the gateway, which
//! is also the neighbour's key) and per VTEP MAC (the FDB key). [`Kept`] remembers the peers the
//! kept view was planned for, with counts per MAC, gateway and canonical subnet. When every
//! changed peer, before and after, is the only one with its MAC, its gateway and its subnet, the
//! full plan differs from "nothing" only at the changed peers' keys, so planning them alone
//! against the view's entries at those keys gives the same ops. Otherwise the caller falls back
//! to the full plan (and keeps what it planned). Tested against the full plan after every step
//! of random event sequences.
//!
//! Out of scope here, so on the full plan still: DirectRouting (its host-gw side classifies
//! every peer against the main table) and the IPv6 plane (`backend::v6`, handed every remote).

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use super::{owner, plan, ObservedState, VxlanBackend, VxlanError, VxlanPeer};
use crate::backend::route::canonical;
use crate::backend::{apply_plan, BackendError, DataPlane, PeerSkip, ReconcileStats, Remote};
use crate::netlink::{MacAddr, Netlink, Op};

/// What one lease, of the remotes handed to the backend, asks for: a peer, or why it is none.
pub type Wanted = Result<VxlanPeer, PeerSkip>;

/// The peers the backend's view was last planned for, by lease subnet, with the counts that
/// tell whether a change can touch another peer's entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Kept {
    own_subnet: Option<Ipv4Network>,
    local_ip: Option<Ipv4Addr>,
    peers: HashMap<Ipv4Network, VxlanPeer>,
    /// Leases refused, reported with every reconcile (the API's peer views read them).
    skipped: BTreeMap<Ipv4Network, PeerSkip>,
    /// Over the peers the plan can program (not ours, unicast MAC), canonical subnets.
    macs: HashMap<MacAddr, u32>,
    gateways: HashMap<Ipv4Addr, u32>,
    subnets: HashMap<Ipv4Network, u32>,
}

fn count<K: Hash + Eq>(m: &mut HashMap<K, u32>, k: K, up: bool) {
    if up {
        *m.entry(k).or_default() += 1;
    } else if let Some(n) = m.get_mut(&k) {
        *n -= 1;
        if *n == 0 {
            m.remove(&k);
        }
    }
}

impl Kept {
    /// The view of `observed`'s node with `wanted` (lease order) planned. `None` when two
    /// leases name the same subnet: the lease order then decides, which this does not keep.
    pub fn new(
        observed: &ObservedState,
        wanted: impl IntoIterator<Item = (Ipv4Network, Wanted)>,
    ) -> Option<Kept> {
        let mut k = Kept {
            own_subnet: Some(observed.own_subnet),
            local_ip: Some(observed.local_ip),
            ..Kept::default()
        };
        for (subnet, w) in wanted {
            if k.peers.contains_key(&subnet) || k.skipped.contains_key(&subnet) {
                return None;
            }
            k.set(subnet, Some(w));
        }
        Some(k)
    }

    /// The skipped leases, in subnet order.
    pub fn skipped(&self) -> impl Iterator<Item = &PeerSkip> {
        self.skipped.values()
    }

    /// `p` as `effective_peers` would program it (canonical subnet), if it can be at all.
    fn eligible(&self, p: &VxlanPeer) -> Option<VxlanPeer> {
        let subnet = canonical(p.subnet);
        let ours = self.own_subnet.is_some_and(|o| subnet.overlaps(o))
            || Some(p.public_ip) == self.local_ip;
        (!ours && p.vtep_mac.is_valid_unicast()).then_some(VxlanPeer { subnet, ..*p })
    }

    fn counts(&mut self, p: &VxlanPeer, up: bool) {
        if let Some(e) = self.eligible(p) {
            count(&mut self.macs, e.vtep_mac, up);
            count(&mut self.gateways, e.gateway(), up);
            count(&mut self.subnets, e.subnet, up);
        }
    }

    /// Alone at its MAC, gateway and subnet (or not programmable at all).
    fn alone(&self, p: &VxlanPeer) -> bool {
        self.eligible(p).is_none_or(|e| {
            self.macs.get(&e.vtep_mac) == Some(&1)
                && self.gateways.get(&e.gateway()) == Some(&1)
                && self.subnets.get(&e.subnet) == Some(&1)
        })
    }

    /// Replaces what lease `subnet` asks for (`None`: the lease is gone).
    fn set(&mut self, subnet: Ipv4Network, w: Option<Wanted>) {
        if let Some(old) = self.peers.remove(&subnet) {
            self.counts(&old, false);
        }
        self.skipped.remove(&subnet);
        match w {
            Some(Ok(p)) => {
                self.counts(&p, true);
                self.peers.insert(subnet, p);
            }
            Some(Err(s)) => {
                self.skipped.insert(subnet, s);
            }
            None => {}
        }
    }

    /// Takes `changes` (each lease subnet once, with what it asks for now) and returns the ops
    /// that the full [`plan`] over all kept peers would return for `view`, which must be what
    /// the kept peers were last planned into. `None`: a changed peer shares a MAC, gateway or
    /// subnet with another peer; `self` is then stale and the caller plans everything.
    pub fn plan_changed(
        &mut self,
        view: &ObservedState,
        changes: &[(Ipv4Network, Option<Wanted>)],
    ) -> Option<Vec<Op>> {
        let mut touched: Vec<VxlanPeer> = Vec::new();
        for (subnet, _) in changes {
            if let Some(old) = self.peers.get(subnet) {
                if !self.alone(old) {
                    return None;
                }
                touched.extend(self.eligible(old));
            }
        }
        for (subnet, w) in changes {
            self.set(*subnet, w.clone());
        }
        let mut now = Vec::new();
        for (subnet, _) in changes {
            if let Some(new) = self.peers.get(subnet) {
                if !self.alone(new) {
                    return None;
                }
                touched.extend(self.eligible(new));
                now.push(*new);
            }
        }
        Some(plan(&narrowed(view, &touched), &now))
    }
}

/// `view`'s entries at the keys of `touched`: the only ones a plan of those peers reads.
fn narrowed(view: &ObservedState, touched: &[VxlanPeer]) -> ObservedState {
    let gateway = |ip: Ipv4Addr| touched.iter().any(|p| p.gateway() == ip);
    let mac = |m: MacAddr| touched.iter().any(|p| p.vtep_mac == m);
    let subnet = |s: Ipv4Network| touched.iter().any(|p| p.subnet == s);
    ObservedState {
        neighbours: view
            .neighbours
            .iter()
            .filter(|n| gateway(n.ip))
            .copied()
            .collect(),
        fdb: view.fdb.iter().filter(|e| mac(e.mac)).copied().collect(),
        routes: view
            .routes
            .iter()
            .filter(|r| subnet(r.dst))
            .copied()
            .collect(),
        ..ObservedState::empty(view.ifindex, view.local_ip, view.own_subnet)
    }
}

/// A remote as the vxlan backend takes it (the same rule as `DataPlane::reconcile`'s).
fn wanted(r: &Remote<'_>) -> Wanted {
    r.same_type("vxlan")
        .and_then(|()| VxlanPeer::from_lease(r.subnet, r.attrs).map_err(|e| r.skip(e.to_string())))
}

impl VxlanBackend {
    /// Programs the leases of `changed` (lease subnets, looked up in `remotes`) alone, when
    /// [`Kept::plan_changed`] can. `Ok(None)`: the full plan is needed.
    pub(super) async fn reconcile_changed(
        &mut self,
        nl: &Netlink,
        remotes: &[Remote<'_>],
        changed: &[Ipv4Network],
    ) -> Result<Option<ReconcileStats>, VxlanError> {
        if self.cfg.direct_routing.is_some() {
            return Ok(None);
        }
        let (Some(view), Some(kept)) = (self.view.as_ref(), self.kept.as_mut()) else {
            return Ok(None);
        };
        let mut changes: Vec<(Ipv4Network, Option<Wanted>)> = Vec::with_capacity(changed.len());
        for &s in changed {
            if changes.iter().any(|(c, _)| *c == s) {
                continue;
            }
            let mut found = remotes.iter().filter(|r| r.subnet == s);
            let first = found.next();
            if found.next().is_some() {
                self.kept = None;
                return Ok(None);
            }
            changes.push((s, first.map(wanted)));
        }
        let Some(ops) = kept.plan_changed(view, &changes) else {
            self.kept = None;
            return Ok(None);
        };
        let skipped: Vec<PeerSkip> = kept.skipped().cloned().collect();
        let peers: Vec<VxlanPeer> = changes
            .iter()
            .filter_map(|(_, w)| w.as_ref().and_then(|w| w.as_ref().ok()).copied())
            .collect();
        let view = self.view.take().expect("checked above");
        let stats = apply_plan(nl, &ops, |op| owner(op, &peers)).await;
        let mut stats = self.after_apply(view, &ops, None, stats)?;
        stats.skipped = skipped;
        Ok(Some(stats))
    }

    /// The full reconcile of every remote, keeping what it planned for the next event.
    pub(in crate::backend) async fn reconcile_keeping(
        &mut self,
        nl: &Netlink,
        remotes: &[Remote<'_>],
    ) -> Result<ReconcileStats, VxlanError> {
        let wanted: Vec<(Ipv4Network, Wanted)> =
            remotes.iter().map(|r| (r.subnet, wanted(r))).collect();
        let peers: Vec<VxlanPeer> = wanted
            .iter()
            .filter_map(|(_, w)| w.as_ref().ok().copied())
            .collect();
        let mut skipped: Vec<PeerSkip> = wanted
            .iter()
            .filter_map(|(_, w)| w.as_ref().err().cloned())
            .collect();
        let mut stats = self.reconcile(nl, &peers).await?;
        drop(peers);
        if stats.is_clean() && self.cfg.direct_routing.is_none() {
            if let Some(view) = &self.view {
                self.kept = Kept::new(view, wanted);
            }
        }
        skipped.append(&mut stats.skipped);
        stats.skipped = skipped;
        Ok(stats)
    }
}

impl DataPlane {
    /// [`reconcile`](Self::reconcile) after a lease event that changed the leases of `changed`
    /// (lease subnets; a renamed lease's old and new). `remotes` are all of them, as for
    /// `reconcile`. vxlan plans the changed peers alone when no other peer shares their
    /// entries ([`Kept`]), else everything; the other backends always plan everything.
    pub async fn reconcile_changed(
        &mut self,
        nl: &Netlink,
        remotes: &[Remote<'_>],
        changed: &[Ipv4Network],
    ) -> Result<ReconcileStats, BackendError> {
        let DataPlane::Vxlan(b) = self else {
            return self.reconcile(nl, remotes).await;
        };
        if let Some(stats) = b.reconcile_changed(nl, remotes, changed).await? {
            return Ok(stats);
        }
        Ok(b.reconcile_keeping(nl, remotes).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::{FdbEntry, Neighbour, Route};

    const DEV: u32 = 9;

    /// xorshift64*: reproducible random sequences without a crate.
    pub(super) struct Rng(pub(super) u64);

    impl Rng {
        pub(super) fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
        }
    }

    fn own() -> Ipv4Network {
        "10.244.200.0/24".parse().unwrap()
    }

    fn local() -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, 1)
    }

    /// A lease subnet of a small pool: mostly disjoint /24s, some a /25 on the same address (a
    /// shared gateway), some with host bits (a shared canonical subnet), one inside our own.
    pub(super) fn lease_subnet(rng: &mut Rng) -> Ipv4Network {
        let n = rng.below(14) as u8;
        match rng.below(12) {
            0 => Ipv4Network::new(Ipv4Addr::new(10, 244, n, 0), 25).unwrap(),
            1 => Ipv4Network::new(Ipv4Addr::new(10, 244, n, 7), 24).unwrap(),
            2 => Ipv4Network::new(Ipv4Addr::new(10, 244, 200, 0), 24).unwrap(),
            _ => Ipv4Network::new(Ipv4Addr::new(10, 244, n, 0), 24).unwrap(),
        }
    }

    /// What a lease asks for: mostly a peer with its own MAC and IP; sometimes a MAC another
    /// peer may use (same or another node), our public IP, a multicast MAC, or a refusal.
    fn wanted_for(rng: &mut Rng, subnet: Ipv4Network) -> Wanted {
        let i = subnet.ip().octets()[2];
        let mut p = VxlanPeer {
            subnet,
            public_ip: Ipv4Addr::new(198, 18, 1, i),
            vtep_mac: MacAddr([2, 0, 0, 0, 1, i]),
        };
        match rng.below(16) {
            0 | 1 => p.vtep_mac = MacAddr([2, 0, 0, 0, 0, rng.below(3) as u8]),
            2 => {
                p.vtep_mac = MacAddr([2, 0, 0, 0, 0, rng.below(3) as u8]);
                p.public_ip = Ipv4Addr::new(198, 18, 0, 50);
            }
            3 => p.public_ip = local(),
            4 => p.vtep_mac = MacAddr([3, 0, 0, 0, 0, 1]),
            5 => {
                return Err(PeerSkip {
                    subnet,
                    public_ip: p.public_ip,
                    reason: "its backend is \"host-gw\"".into(),
                })
            }
            6 => p.public_ip = Ipv4Addr::new(198, 18, 2, rng.below(200) as u8),
            _ => {}
        }
        Ok(p)
    }

    /// Entries a previous run or someone else left: stale, foreign, non-permanent.
    fn junk(rng: &mut Rng) -> ObservedState {
        junk_on(rng, DEV)
    }

    /// [`junk`] on device `dev`.
    pub(super) fn junk_on(rng: &mut Rng, dev: u32) -> ObservedState {
        let mut o = ObservedState::empty(dev, local(), own());
        for _ in 0..rng.below(8) {
            let n = rng.below(16) as u8;
            let gw = Ipv4Addr::new(10, 244, n, 0);
            let mac = MacAddr([2, 0, 0, 0, rng.below(2) as u8, rng.below(16) as u8]);
            match rng.below(4) {
                0 => o.neighbours.push(Neighbour {
                    ifindex: dev,
                    ip: gw,
                    mac: Some(mac),
                    permanent: rng.below(2) == 0,
                }),
                1 => o.fdb.push(FdbEntry {
                    ifindex: dev,
                    mac,
                    dst: Some(Ipv4Addr::new(198, 18, 3, n)),
                    permanent: rng.below(3) != 0,
                }),
                _ => {
                    let mut r = Route::onlink(Ipv4Network::new(gw, 24).unwrap(), gw, dev);
                    r.metric = [0, 0, 100][rng.below(3) as usize];
                    o.routes.push(r);
                }
            }
        }
        o.after(&[])
    }

    /// `view` after someone else's hand: some of its entries gone, junk added.
    fn drifted(rng: &mut Rng, view: &ObservedState) -> ObservedState {
        let mut d = view.clone();
        d.neighbours.retain(|_| rng.below(4) != 0);
        d.fdb.retain(|_| rng.below(4) != 0);
        d.routes.retain(|_| rng.below(4) != 0);
        let j = junk(rng);
        d.neighbours.extend(j.neighbours);
        d.fdb.extend(j.fdb);
        d.routes.extend(j.routes);
        d.after(&[])
    }

    fn sorted(ops: &[Op]) -> Vec<String> {
        let mut v: Vec<String> = ops.iter().map(|o| format!("{o:?}")).collect();
        v.sort();
        v
    }

    fn peers(desired: &BTreeMap<Ipv4Network, Wanted>) -> Vec<VxlanPeer> {
        desired
            .values()
            .filter_map(|w| w.as_ref().ok())
            .copied()
            .collect()
    }

    #[test]
    fn changed_peers_planned_alone_equal_the_full_plan_after_every_event() {
        let (mut alone, mut full_steps) = (0, 0);
        // Events planned alone right after a full reconcile, and full reconciles of drift.
        let (mut first_alone, mut repairs) = (0, 0);
        for seed in 1..=150u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut desired: BTreeMap<Ipv4Network, Wanted> = BTreeMap::new();
            for _ in 0..rng.below(10) {
                let s = lease_subnet(&mut rng);
                let w = wanted_for(&mut rng, s);
                desired.insert(s, w);
            }
            let mut view = junk(&mut rng);
            view = view.after(&plan(&view, &peers(&desired)));
            let mut kept = Kept::new(&view, desired.clone());
            let mut after_full = true;
            for step in 0..60 {
                // Now and then a full reconcile (a resync, or the repair of drift: ours deleted,
                // someone else's added), which keeps what it planned, as the backend's does.
                if rng.below(8) == 0 {
                    if rng.below(2) == 0 {
                        view = drifted(&mut rng, &view);
                        repairs += 1;
                    }
                    view = view.after(&plan(&view, &peers(&desired)));
                    kept = Kept::new(&view, desired.clone());
                    after_full = true;
                    continue;
                }
                let mut changes: Vec<(Ipv4Network, Option<Wanted>)> = Vec::new();
                for _ in 0..=rng.below(3) / 2 {
                    let s = lease_subnet(&mut rng);
                    if changes.iter().any(|(c, _)| *c == s) {
                        continue;
                    }
                    let w = (rng.below(4) != 0).then(|| wanted_for(&mut rng, s));
                    match &w {
                        Some(w) => desired.insert(s, w.clone()),
                        None => desired.remove(&s),
                    };
                    changes.push((s, w));
                }
                let full = plan(&view, &peers(&desired));
                let inc = kept.as_mut().and_then(|k| k.plan_changed(&view, &changes));
                let fell_back = inc.is_none();
                match inc {
                    Some(inc) => {
                        alone += 1;
                        first_alone += usize::from(after_full);
                        assert_eq!(
                            view.after(&inc),
                            view.after(&full),
                            "seed {seed} step {step}: {changes:?}"
                        );
                        assert_eq!(sorted(&inc), sorted(&full), "seed {seed} step {step}");
                    }
                    None => full_steps += 1,
                }
                after_full = false;
                view = view.after(&full);
                // What the backend does after either path: keep the peers planned (the full
                // path rebuilds; the incremental one already updated them).
                if fell_back {
                    kept = Kept::new(&view, desired.clone());
                }
                let k = kept.as_ref().expect("no duplicate subnets in a map");
                let want_skips: Vec<&PeerSkip> =
                    desired.values().filter_map(|w| w.as_ref().err()).collect();
                assert_eq!(k.skipped().collect::<Vec<_>>(), want_skips);
                assert_eq!(k, &Kept::new(&view, desired.clone()).unwrap());
            }
        }
        // Both paths ran, and the incremental one most of the time.
        assert!(alone > full_steps, "alone {alone}, full {full_steps}");
        assert!(full_steps > 100, "full {full_steps}");
        assert!(
            first_alone > 300,
            "first after a full reconcile alone {first_alone}"
        );
        assert!(repairs > 300, "repairs {repairs}");
    }
}

#[cfg(test)]
mod backend_tests {
    use super::*;
    use crate::backend::VxlanConfig;
    use crate::netlink::Fake;
    use crate::testutil::{ip, net};

    /// A vxlan lease of node `n` (PublicIP 198.18.0.n, VTEP MAC ..:0n unless `mac` says).
    fn lease(n: u8, mac: u8, ty: &str) -> Remote<'static> {
        let value = format!(
            r#"{{"PublicIP":"198.18.0.{n}","BackendType":"{ty}","BackendData":{{"VNI":1,"VtepMAC":"02:00:00:00:00:{mac:02x}"}}}}"#
        );
        // Leaked: a test's handful of leases lives as long as the test process anyway.
        let attrs = Box::leak(Box::new(
            tweed_config::LeaseAttrs::parse(value.as_bytes()).unwrap(),
        ));
        Remote {
            subnet: net(&format!("10.244.{n}.0/24")),
            subnet_v6: None,
            attrs,
        }
    }

    fn kept(dp: &DataPlane) -> Option<&Kept> {
        match dp {
            DataPlane::Vxlan(b) => b.kept.as_ref(),
            _ => None,
        }
    }

    #[tokio::test]
    async fn an_event_writes_the_changed_peer_only_and_a_shared_mac_takes_the_full_plan() {
        let fake = Fake::new();
        let eth0 = fake.add_link("eth0", 1500, None);
        let tmp = tempfile::tempdir().unwrap();
        let nl = Netlink::from(fake.clone());
        let cfg = VxlanConfig::new(
            1,
            ip("198.18.0.1"),
            eth0,
            1500,
            net("10.244.1.0/24"),
            tmp.path().join("vtep-mac"),
        );
        let mut dp = DataPlane::Vxlan(VxlanBackend::setup(&nl, cfg).await.unwrap());
        let mut remotes: Vec<Remote<'static>> = (2..=6).map(|n| lease(n, n, "vxlan")).collect();
        remotes.push(lease(9, 9, "host-gw"));
        let stats = dp.reconcile(&nl, &remotes).await.unwrap();
        assert_eq!((stats.ops_applied, stats.skipped.len()), (15, 1));
        assert!(
            kept(&dp).is_some(),
            "the full reconcile keeps what it planned"
        );

        // An event changing no lease writes nothing and still reports the refused one.
        fake.take_ops();
        let stats = dp.reconcile_changed(&nl, &remotes, &[]).await.unwrap();
        assert_eq!((stats.ops_applied, stats.skipped.len()), (0, 1));
        assert!(kept(&dp).is_some());

        // A new peer: its three entries, and the refused lease still reported.
        remotes.push(lease(7, 7, "vxlan"));
        let stats = dp
            .reconcile_changed(&nl, &remotes, &[net("10.244.7.0/24")])
            .await
            .unwrap();
        assert_eq!(fake.take_ops().len(), 3);
        assert_eq!(stats.skipped[0].subnet, net("10.244.9.0/24"));
        assert!(kept(&dp).is_some());

        // A gone peer: its three entries go.
        remotes.retain(|r| r.subnet != net("10.244.3.0/24"));
        dp.reconcile_changed(&nl, &remotes, &[net("10.244.3.0/24")])
            .await
            .unwrap();
        let ops = fake.take_ops();
        assert_eq!(ops.len(), 3);
        assert!(ops
            .iter()
            .all(|o| matches!(o, Op::RouteDel(_) | Op::NeighDel { .. } | Op::FdbDel { .. })));

        // A clone of node 2's MAC on another node: the full plan (which refuses it) decides.
        remotes.push(lease(8, 2, "vxlan"));
        dp.reconcile_changed(&nl, &remotes, &[net("10.244.8.0/24")])
            .await
            .unwrap();
        assert_eq!(fake.take_ops(), vec![]);
        // The clone leaves: node 2 still shares nothing, so it is planned alone again.
        remotes.pop();
        dp.reconcile_changed(&nl, &remotes, &[net("10.244.8.0/24")])
            .await
            .unwrap();
        assert_eq!(fake.take_ops(), vec![]);

        // Whatever path each event took, a fresh full plan over a re-listed device has nothing
        // left to do.
        dp.resync();
        let stats = dp.reconcile(&nl, &remotes).await.unwrap();
        assert_eq!(stats.ops_applied, 0);
    }

    fn device(dp: &DataPlane) -> &VxlanBackend {
        match dp {
            DataPlane::Vxlan(b) => b,
            _ => unreachable!("a vxlan data plane"),
        }
    }

    async fn observed(nl: &Netlink, dp: &DataPlane) -> ObservedState {
        let b = device(dp);
        ObservedState::observe(nl, b.ifindex, b.cfg.local_ip, b.cfg.own_subnet)
            .await
            .unwrap()
    }

    fn vxlan_cfg(tmp: &std::path::Path, eth0: u32, own: &str) -> VxlanConfig {
        VxlanConfig::new(
            1,
            ip("198.18.0.1"),
            eth0,
            1500,
            net(own),
            tmp.join("vtep-mac"),
        )
    }

    /// A lease event that changed `changed`, asserted to be planned alone (a full plan over a
    /// programmed device writes the same few ops, so the count alone cannot tell): what it
    /// wrote.
    async fn event_alone(
        nl: &Netlink,
        fake: &Fake,
        dp: &mut DataPlane,
        remotes: &[Remote<'_>],
        changed: Ipv4Network,
    ) -> Vec<Op> {
        let b = device(dp);
        let change = (
            changed,
            remotes.iter().find(|r| r.subnet == changed).map(wanted),
        );
        let (view, kept) = (b.view.as_ref(), b.kept.clone());
        let alone = kept
            .zip(view)
            .and_then(|(mut k, v)| k.plan_changed(v, &[change]));
        let alone = alone.expect("kept peers to plan the changed one alone");
        fake.take_ops();
        dp.reconcile_changed(nl, remotes, &[changed]).await.unwrap();
        let written = fake.take_ops();
        assert_eq!(written, alone);
        written
    }

    /// The case bench/controlplane measures: the first lease event after a start (cold, or over
    /// a programmed device), a resync and a repair writes its own peer's three entries only.
    #[tokio::test]
    async fn the_first_event_after_a_start_a_resync_or_a_repair_writes_its_peer_only() {
        let fake = Fake::new();
        let eth0 = fake.add_link("eth0", 1500, None);
        let tmp = tempfile::tempdir().unwrap();
        let nl = Netlink::from(fake.clone());
        let cfg = || vxlan_cfg(tmp.path(), eth0, "10.244.1.0/24");
        let mut remotes: Vec<Remote<'static>> = (2..=11).map(|n| lease(n, n, "vxlan")).collect();
        let added = |ops: &[Op], n: u8| {
            assert_eq!(ops.len(), 3, "{ops:?}");
            let subnet = net(&format!("10.244.{n}.0/24"));
            assert!(ops.iter().all(|o| match o {
                Op::RouteReplace(r) => r.dst == subnet,
                Op::NeighReplace { ip, .. } => *ip == subnet.network(),
                Op::FdbReplace { dst, .. } => *dst == ip(&format!("198.18.0.{n}")),
                _ => false,
            }));
        };

        // A cold start, then an event.
        let mut dp = DataPlane::Vxlan(VxlanBackend::setup(&nl, cfg()).await.unwrap());
        let stats = dp.reconcile(&nl, &remotes).await.unwrap();
        assert_eq!(stats.ops_applied, 30);
        remotes.push(lease(20, 20, "vxlan"));
        let ops = event_alone(&nl, &fake, &mut dp, &remotes, net("10.244.20.0/24")).await;
        added(&ops, 20);

        // A restart over the programmed device (a new backend, nothing in memory), then an event.
        let mut dp = DataPlane::Vxlan(VxlanBackend::setup(&nl, cfg()).await.unwrap());
        assert_eq!(dp.reconcile(&nl, &remotes).await.unwrap().ops_applied, 0);
        remotes.push(lease(21, 21, "vxlan"));
        let ops = event_alone(&nl, &fake, &mut dp, &remotes, net("10.244.21.0/24")).await;
        added(&ops, 21);

        // The periodic resync (a re-list), then an event.
        dp.resync();
        assert_eq!(dp.reconcile(&nl, &remotes).await.unwrap().ops_applied, 0);
        remotes.push(lease(22, 22, "vxlan"));
        let ops = event_alone(&nl, &fake, &mut dp, &remotes, net("10.244.22.0/24")).await;
        added(&ops, 22);

        // Someone deletes node 2's route and leaves a permanent neighbour of their own; the
        // repair (a re-list and the full plan) puts the one back and takes the other away.
        let route2 = observed(&nl, &dp)
            .await
            .routes
            .into_iter()
            .find(|r| r.dst == net("10.244.2.0/24"))
            .unwrap();
        nl.apply(&Op::RouteDel(route2)).await.unwrap();
        fake.add_neighbour(crate::netlink::Neighbour::permanent(
            device(&dp).ifindex,
            ip("10.244.40.0"),
            Some(MacAddr([2, 0, 0, 0, 0, 0x40])),
        ));
        fake.take_ops();
        dp.resync();
        assert_eq!(dp.reconcile(&nl, &remotes).await.unwrap().ops_applied, 2);
        remotes.push(lease(23, 23, "vxlan"));
        let ops = event_alone(&nl, &fake, &mut dp, &remotes, net("10.244.23.0/24")).await;
        added(&ops, 23);
        // And a removal right after another repair: its three deletes.
        dp.resync();
        dp.reconcile(&nl, &remotes).await.unwrap();
        remotes.retain(|r| r.subnet != net("10.244.5.0/24"));
        let ops = event_alone(&nl, &fake, &mut dp, &remotes, net("10.244.5.0/24")).await;
        assert_eq!(ops.len(), 3, "{ops:?}");
        assert!(ops
            .iter()
            .all(|o| matches!(o, Op::RouteDel(_) | Op::NeighDel { .. } | Op::FdbDel { .. })));
    }

    /// A lease of pool node `n` in one of the shapes the pure test's `wanted_for` draws: its own
    /// MAC, a MAC shared with others, our public IP, a multicast MAC, host-gw, no MAC.
    fn pool_attrs(n: u8, shape: u8) -> tweed_config::LeaseAttrs {
        let (public_ip, mac, ty) = match shape {
            0 => (
                format!("198.18.2.{n}"),
                format!("02:00:00:00:00:{:02x}", n % 3),
                "vxlan",
            ),
            1 => (
                "198.18.0.1".into(),
                format!("02:00:00:00:01:{n:02x}"),
                "vxlan",
            ),
            2 => (format!("198.18.1.{n}"), "03:00:00:00:00:01".into(), "vxlan"),
            3 => (
                format!("198.18.1.{n}"),
                format!("02:00:00:00:01:{n:02x}"),
                "host-gw",
            ),
            4 => (format!("198.18.1.{n}"), "nope".into(), "vxlan"),
            _ => (
                format!("198.18.1.{n}"),
                format!("02:00:00:00:01:{n:02x}"),
                "vxlan",
            ),
        };
        let value = format!(
            r#"{{"PublicIP":"{public_ip}","BackendType":"{ty}","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
        );
        tweed_config::LeaseAttrs::parse(value.as_bytes()).unwrap()
    }

    fn remotes_of<'a>(d: &BTreeMap<Ipv4Network, &'a tweed_config::LeaseAttrs>) -> Vec<Remote<'a>> {
        d.iter()
            .map(|(&subnet, &attrs)| Remote {
                subnet,
                subnet_v6: None,
                attrs,
            })
            .collect()
    }

    /// The device, the backend's view and its kept peers, after any step: the device holds what
    /// the leases ask for (a fresh full plan over it is empty), the view is the device, and the
    /// kept peers equal ones rebuilt from scratch.
    async fn check(nl: &Netlink, dp: &DataPlane, remotes: &[Remote<'_>], at: &str) {
        let b = device(dp);
        let device = observed(nl, dp).await;
        let wanted: Vec<(Ipv4Network, Wanted)> =
            remotes.iter().map(|r| (r.subnet, wanted(r))).collect();
        let peers: Vec<VxlanPeer> = wanted
            .iter()
            .filter_map(|(_, w)| w.as_ref().ok().copied())
            .collect();
        assert_eq!(plan(&device, &peers), vec![], "{at}: the device");
        assert_eq!(
            b.view.as_ref().map(|v| v.after(&[])),
            Some(device.after(&[])),
            "{at}: the view"
        );
        let rebuilt = Kept::new(&device, wanted);
        assert!(rebuilt.is_some(), "{at}: distinct subnets");
        assert_eq!(b.kept, rebuilt, "{at}: the kept peers");
    }

    /// Random events interleaved with full reconciles, resyncs and repairs of drift (entries
    /// deleted and foreign ones added behind the backend's back), on the fake kernel: after
    /// every step the device, the view and the kept peers are right, and an event whose peers
    /// can be planned alone (the first after a full reconcile included) writes exactly those
    /// ops.
    #[tokio::test]
    async fn events_full_reconciles_and_repairs_interleaved_keep_the_kept_peers_right() {
        use super::tests::{junk_on, lease_subnet, Rng};
        let pool: Vec<Vec<tweed_config::LeaseAttrs>> = (0..16u8)
            .map(|n| (0..10).map(|shape| pool_attrs(n, shape)).collect())
            .collect();
        let (mut alone, mut first_alone, mut fulls) = (0, 0, 0);
        for seed in 1..=40u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let fake = Fake::new();
            let eth0 = fake.add_link("eth0", 1500, None);
            let tmp = tempfile::tempdir().unwrap();
            let nl = Netlink::from(fake.clone());
            let cfg = vxlan_cfg(tmp.path(), eth0, "10.244.200.0/24");
            let mut dp = DataPlane::Vxlan(VxlanBackend::setup(&nl, cfg).await.unwrap());
            let dev = device(&dp).ifindex;
            let mut desired: BTreeMap<Ipv4Network, &tweed_config::LeaseAttrs> = BTreeMap::new();
            let draw = |rng: &mut Rng| {
                let s = lease_subnet(rng);
                let n = usize::from(s.ip().octets()[2].min(15));
                (s, &pool[n][rng.below(10) as usize])
            };
            for _ in 0..rng.below(10) {
                let (s, a) = draw(&mut rng);
                desired.insert(s, a);
            }
            // A previous run's and others' entries on the device, then the start.
            let j = junk_on(&mut rng, dev);
            j.neighbours.into_iter().for_each(|n| fake.add_neighbour(n));
            j.fdb.into_iter().for_each(|e| fake.add_fdb(e));
            j.routes.into_iter().for_each(|r| fake.add_route(r));
            dp.reconcile(&nl, &remotes_of(&desired)).await.unwrap();
            check(
                &nl,
                &dp,
                &remotes_of(&desired),
                &format!("seed {seed} start"),
            )
            .await;
            let mut after_full = true;
            for step in 0..40 {
                let at = format!("seed {seed} step {step}");
                match rng.below(10) {
                    0 => {
                        dp.reconcile(&nl, &remotes_of(&desired)).await.unwrap();
                        after_full = true;
                        fulls += 1;
                    }
                    1 | 2 => {
                        if rng.below(3) != 0 {
                            // Drift: some of the device's entries deleted, others' added.
                            let now = observed(&nl, &dp).await;
                            let mut dels: Vec<Op> = Vec::new();
                            for n in &now.neighbours {
                                if rng.below(4) == 0 {
                                    dels.push(Op::NeighDel {
                                        ifindex: dev,
                                        ip: n.ip,
                                    });
                                }
                            }
                            for e in &now.fdb {
                                if rng.below(4) == 0 {
                                    dels.push(Op::FdbDel {
                                        ifindex: dev,
                                        mac: e.mac,
                                        dst: e.dst,
                                    });
                                }
                            }
                            for r in &now.routes {
                                if rng.below(4) == 0 {
                                    dels.push(Op::RouteDel(*r));
                                }
                            }
                            for r in nl.apply_all(&dels).await {
                                r.unwrap();
                            }
                            let j = junk_on(&mut rng, dev);
                            j.neighbours.into_iter().for_each(|n| fake.add_neighbour(n));
                            j.routes.into_iter().for_each(|r| fake.add_route(r));
                            let fdb = observed(&nl, &dp).await.fdb;
                            for e in j.fdb {
                                if !fdb.iter().any(|f| f.mac == e.mac && f.dst == e.dst) {
                                    fake.add_fdb(e);
                                }
                            }
                        }
                        // The repair: a re-list and the full plan.
                        dp.resync();
                        dp.reconcile(&nl, &remotes_of(&desired)).await.unwrap();
                        after_full = true;
                        fulls += 1;
                    }
                    _ => {
                        let mut changed: Vec<Ipv4Network> = Vec::new();
                        for _ in 0..=rng.below(3) / 2 {
                            let (s, a) = draw(&mut rng);
                            if changed.contains(&s) {
                                continue;
                            }
                            if rng.below(4) == 0 {
                                desired.remove(&s);
                            } else {
                                desired.insert(s, a);
                            }
                            changed.push(s);
                        }
                        let remotes = remotes_of(&desired);
                        let changes: Vec<(Ipv4Network, Option<Wanted>)> = changed
                            .iter()
                            .map(|&s| (s, remotes.iter().find(|r| r.subnet == s).map(wanted)))
                            .collect();
                        let b = device(&dp);
                        let predicted = b
                            .view
                            .as_ref()
                            .zip(b.kept.clone())
                            .and_then(|(v, mut k)| k.plan_changed(v, &changes));
                        fake.take_ops();
                        dp.reconcile_changed(&nl, &remotes, &changed).await.unwrap();
                        if let Some(ops) = predicted {
                            assert_eq!(fake.take_ops(), ops, "{at}: {changed:?}");
                            alone += 1;
                            first_alone += usize::from(after_full);
                        }
                        after_full = false;
                    }
                }
                check(&nl, &dp, &remotes_of(&desired), &at).await;
            }
        }
        assert!(fulls > 300, "full reconciles {fulls}");
        assert!(alone > 600, "alone {alone}");
        assert!(
            first_alone > 200,
            "first events after a full reconcile alone {first_alone}"
        );
    }
}

#[cfg(test)]
mod cost {
    use super::*;
    use std::time::Instant;

    #[test]
    #[ignore = "timing; run with --release --ignored --nocapture"]
    fn changed_peer_plan_per_event_at_10000_peers() {
        let own: Ipv4Network = "10.0.0.0/24".parse().unwrap();
        let peer = |i: u32| VxlanPeer {
            subnet: Ipv4Network::new(Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24).unwrap(),
            public_ip: Ipv4Addr::from(0xc612_0000 + i),
            vtep_mac: MacAddr([2, 0, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8]),
        };
        let mut peers: Vec<VxlanPeer> = (1..=10_000).map(peer).collect();
        let empty = ObservedState::empty(9, Ipv4Addr::new(198, 18, 0, 0), own);
        let view = empty.after(&plan(&empty, &peers));
        let mut kept =
            Kept::new(&view, peers.iter().map(|p| (p.subnet, Ok(*p)))).expect("distinct subnets");
        let rounds = 50u32;
        let (mut full_t, mut inc_t) = (0.0, 0.0);
        for round in 0..rounds {
            let new = peer(10_001 + round);
            peers.push(new);
            let t = Instant::now();
            let full = plan(&view, &peers);
            full_t += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let inc = kept
                .plan_changed(&view, &[(new.subnet, Some(Ok(new)))])
                .expect("a peer sharing nothing");
            inc_t += t.elapsed().as_secs_f64();
            assert_eq!(inc, full);
            // The same event again next round: take it back out of both.
            peers.pop();
            kept.plan_changed(&view, &[(new.subnet, None)]).unwrap();
        }
        let n = f64::from(rounds);
        println!(
            "one lease added at 10,000 peers, mean of {rounds}: full plan {:.3} ms, changed peer alone {:.3} ms, {:.0}x",
            full_t / n * 1e3,
            inc_t / n * 1e3,
            full_t / inc_t
        );
    }
}
