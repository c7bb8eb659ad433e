//! What the agent knows about itself and its peers, shared with the HTTP and gRPC servers. The run
//! loop writes it; the servers only read it and subscribe to lease events.

use crate::metrics::Metrics;
use std::sync::{Arc, RwLock};
use tokio::sync::broadcast;

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
    pub backend: String,
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
    pub leases: Vec<LeaseView>,
    pub peers: Vec<PeerView>,
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
