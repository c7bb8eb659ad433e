//! What the agent knows about itself and its peers, shared with the HTTP and gRPC servers. The run
//! loop writes it; the servers only read it and subscribe to lease events.

use crate::metrics::Metrics;
use ipnetwork::Ipv4Network;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use tokio::sync::broadcast;
use tweed_config::SubnetKey;

/// How long the main loop may go without running before the agent counts as dead. Generous: the
/// loop waits out a lost lease's re-acquisition during an etcd outage.
pub const LIVENESS: std::time::Duration = std::time::Duration::from_secs(120);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseView {
    pub subnet: String,
    pub public_ip: String,
    pub backend_type: String,
    pub backend_data: String,
    pub lease_id: i64,
    pub own: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerView {
    pub subnet: String,
    pub public_ip: String,
    pub backend: String,
    pub programmed: bool,
    pub error: Option<String>,
}

/// A view kept by key and shared: the run loop updates only the entries an event changed, and
/// a [`Snapshot`] clone shares the map instead of copying every entry's strings (with 10,000
/// peers, rebuilding the lease and peer views took a third of a lease event's CPU).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyed<K: Ord, V>(Arc<BTreeMap<K, V>>);

impl<K: Ord, V> Default for Keyed<K, V> {
    fn default() -> Self {
        Keyed(Arc::default())
    }
}

impl<K: Ord + Clone, V: Clone> Keyed<K, V> {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The views in key order.
    pub fn iter(&self) -> impl Iterator<Item = &V> {
        self.0.values()
    }

    pub fn first(&self) -> Option<&V> {
        self.0.values().next()
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.0.get(key)
    }

    /// The map to change in place; copied first only while a snapshot still shares it.
    pub fn make_mut(&mut self) -> &mut BTreeMap<K, V> {
        Arc::make_mut(&mut self.0)
    }
}

impl<K: Ord, V> FromIterator<(K, V)> for Keyed<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Keyed(Arc::new(iter.into_iter().collect()))
    }
}

/// A wireguard peer's figures, as of the last refresh (every few seconds).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WgPeerView {
    /// The device holding the entry (`tweed-wg`, `tweed-wg-v6`).
    pub device: String,
    /// The entry's subnet in the device's family.
    pub subnet: String,
    /// The peer's lease subnet (IPv4), which the peer list goes by; empty when unknown.
    pub lease_subnet: String,
    pub public_key: String,
    /// Unix milliseconds of the last handshake; `None` before the first.
    pub handshake_unix_ms: Option<i64>,
    /// Unix milliseconds this key was first seen as a peer: with no handshake, the wait counts
    /// from here.
    pub since_unix_ms: i64,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

/// A peer with no handshake for this long is named in `/readyz`'s detail (WireGuard rekeys
/// every 2 minutes while traffic flows, so a live peer in use never gets there).
pub const STALE_HANDSHAKE_MS: i64 = 180_000;

/// The wireguard peers without a handshake for [`STALE_HANDSHAKE_MS`] at `now_unix_ms`, as
/// sentences naming them. Reported, never a reason for not being ready: an idle peer (no traffic
/// and no keepalive) legitimately has none.
pub fn stale_wg_peers(peers: &[WgPeerView], now_unix_ms: i64) -> Vec<String> {
    peers
        .iter()
        .filter_map(|p| {
            let from = p.handshake_unix_ms.unwrap_or(p.since_unix_ms);
            let age = now_unix_ms.saturating_sub(from);
            (age >= STALE_HANDSHAKE_MS).then(|| match p.handshake_unix_ms {
                Some(_) => format!(
                    "wireguard peer {} ({}) on {}: last handshake {} s ago",
                    p.subnet,
                    p.public_key,
                    p.device,
                    age / 1000
                ),
                None => format!(
                    "wireguard peer {} ({}) on {}: no handshake in the {} s since it was added",
                    p.subnet,
                    p.public_key,
                    p.device,
                    age / 1000
                ),
            })
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Added,
    Updated,
    Removed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseEventView {
    pub kind: EventKind,
    pub lease: LeaseView,
    pub unix_millis: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub node: String,
    pub public_ip: String,
    pub network: String,
    pub subnet: String,
    /// `off`, `dual-stack`, or why this node runs IPv4 only in a dual-stack network; empty
    /// before the network config is read.
    pub ipv6: String,
    /// The lease's `PublicIPv6`; empty when none.
    pub public_ipv6: String,
    /// The lease's IPv6 subnet; empty when none.
    pub subnet_v6: String,
    pub backend: String,
    /// `kernel` or `userspace`: what carries the data plane (see
    /// `DataPlane::implementation`); empty before set-up.
    pub backend_implementation: String,
    pub mtu: u32,
    pub lease_held: bool,
    pub backend_programmed: bool,
    pub watch_live: bool,
    /// subnet.env holds this node's current subnet and MTU.
    pub subnet_env_written: bool,
    /// When the agent's main loop last ran; `None` before it started (start-up, etcd awaited).
    pub loop_beat: Option<std::time::Instant>,
    pub lease_expiry_unix: i64,
    pub etcd_endpoints: String,
    /// Every lease of the table, by key.
    pub leases: Keyed<SubnetKey, LeaseView>,
    /// Every remote lease the backend was given, by IPv4 subnet (unique in the table).
    pub peers: Keyed<Ipv4Network, PeerView>,
    pub wg_peers: Vec<WgPeerView>,
    /// In an IPv6-only network (which has no IPv4 lease table): every lease the node takes
    /// (its own and its peers'), by IPv6 subnet; empty otherwise.
    pub v6only_leases: Keyed<String, LeaseView>,
    /// In an IPv6-only network: the peers as last programmed, by IPv6 subnet.
    pub v6only_peers: Keyed<String, PeerView>,
}

impl Snapshot {
    /// Reasons the node is not ready; empty means ready.
    pub fn not_ready(&self) -> Vec<String> {
        let mut r = Vec::new();
        if !self.lease_held {
            r.push("no subnet lease held".to_string());
        }
        if !self.backend_programmed {
            r.push(format!(
                "backend {} not programmed",
                if self.backend.is_empty() {
                    "?"
                } else {
                    &self.backend
                }
            ));
        }
        if !self.watch_live {
            r.push("lease watch not live".to_string());
        }
        if !self.subnet_env_written {
            r.push("subnet.env not written".to_string());
        }
        r
    }

    /// Why the agent is not alive, if it is not: its main loop stopped running (a loop blocked
    /// or dead; a dead watch or renewal task ends the process, see `run`).
    pub fn not_alive(&self, now: std::time::Instant) -> Option<String> {
        let beat = self.loop_beat?;
        let age = now.saturating_duration_since(beat);
        (age > LIVENESS).then(|| format!("the main loop last ran {} s ago", age.as_secs()))
    }
}

/// Cheap to clone; every clone sees the same state.
#[derive(Clone)]
pub struct AgentState {
    snapshot: Arc<RwLock<Snapshot>>,
    events: broadcast::Sender<LeaseEventView>,
    pub metrics: Arc<Metrics>,
}

impl AgentState {
    pub fn new() -> Self {
        AgentState {
            snapshot: Arc::default(),
            events: broadcast::channel(1024).0,
            metrics: Arc::new(Metrics::new()),
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        self.snapshot.read().expect("state lock").clone()
    }

    pub fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        f(&mut self.snapshot.write().expect("state lock"));
    }

    pub fn publish(&self, ev: LeaseEventView) {
        // No subscribers is the normal case.
        let _ = self.events.send(ev);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<LeaseEventView> {
        self.events.subscribe()
    }
}

impl Default for AgentState {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod stale_tests {
    use super::*;

    fn peer(key: &str, handshake: Option<i64>, since: i64) -> WgPeerView {
        WgPeerView {
            device: "tweed-wg".into(),
            subnet: "10.244.7.0/24".into(),
            lease_subnet: "10.244.7.0/24".into(),
            public_key: key.into(),
            handshake_unix_ms: handshake,
            since_unix_ms: since,
            ..Default::default()
        }
    }

    #[test]
    fn a_peer_without_a_handshake_for_three_minutes_is_named() {
        // A fake clock: the rule sees only the `now` it is given.
        let t0 = 1_800_000_000_000;
        let peers = [
            peer("fresh", Some(t0), t0 - 600_000),
            peer("old", Some(t0 - STALE_HANDSHAKE_MS + 1000), t0 - 600_000),
            peer("never", None, t0),
        ];
        assert!(stale_wg_peers(&peers, t0).is_empty());
        // One second short of 3 minutes for "old": still nothing.
        assert!(stale_wg_peers(&peers, t0 + 999).is_empty());
        let at = |now| stale_wg_peers(&peers, now);
        let r = at(t0 + 1000);
        assert_eq!(r.len(), 1, "{r:?}");
        assert!(
            r[0].contains("old") && r[0].contains("last handshake 180 s ago"),
            "{r:?}"
        );
        // One millisecond short of 3 minutes for "fresh" and "never" (added at t0): only "old".
        assert_eq!(at(t0 + STALE_HANDSHAKE_MS - 1).len(), 1);
        // "never" waits from when it was added, "fresh" from its handshake: both due now.
        let r = at(t0 + STALE_HANDSHAKE_MS);
        assert_eq!(r.len(), 3, "{r:?}");
        assert!(
            r[0].contains("fresh") && r[0].contains("last handshake 180 s ago"),
            "{r:?}"
        );
        assert!(
            r[2].contains("never") && r[2].contains("no handshake in the 180 s"),
            "{r:?}"
        );
        // A clock that went backwards names nobody.
        assert!(stale_wg_peers(&peers, 0).is_empty());
    }

    /// `Mode: separate`: one peer, an entry on each device; only the IPv6 device's is stale,
    /// and it is named with that device and its IPv6 subnet.
    #[test]
    fn each_device_entry_of_a_peer_is_judged_and_named_on_its_own() {
        let t0 = 1_800_000_000_000;
        let v4 = peer("k", Some(t0), t0 - 600_000);
        let v6 = WgPeerView {
            device: "tweed-wg-v6".into(),
            subnet: "fd00:5:0:7::/64".into(),
            ..peer("k", None, t0 - 600_000)
        };
        let r = stale_wg_peers(&[v4, v6], t0);
        assert_eq!(
            r,
            [
                "wireguard peer fd00:5:0:7::/64 (k) on tweed-wg-v6: no handshake in the 600 s \
              since it was added"
            ]
        );
    }

    #[test]
    fn stale_peers_do_not_make_the_node_unready() {
        let snap = Snapshot {
            lease_held: true,
            backend_programmed: true,
            watch_live: true,
            subnet_env_written: true,
            wg_peers: vec![peer("never", None, 0)],
            ..Default::default()
        };
        assert!(snap.not_ready().is_empty());
        assert_eq!(stale_wg_peers(&snap.wg_peers, STALE_HANDSHAKE_MS).len(), 1);
    }
}
