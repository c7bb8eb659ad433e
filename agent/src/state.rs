//! What the agent knows about itself and its peers, shared with the HTTP and gRPC servers. The run
//! loop writes it; the servers only read it and subscribe to lease events.

use crate::metrics::Metrics;
use std::sync::{Arc, RwLock};
use tokio::sync::broadcast;

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
        r
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
