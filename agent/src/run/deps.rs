//! What the agent does to the world, as one value: [`run`](super::run) fills it with the real
//! things, tests with fakes.

use crate::api::ControlSlot;
use crate::netlink::Netlink;
use crate::registry::Registry;
use crate::rules::Firewall;
use crate::state::AgentState;
use std::sync::Arc;

pub struct Deps {
    /// Where leases live: etcd, or `Registry::Mem` in tests.
    pub registry: Arc<Registry>,
    /// The kernel's routing tables: a real socket, or `Netlink::Fake`.
    pub netlink: Netlink,
    /// Masquerade and forward rules: iptables, nftables, or `Firewall::Fake`.
    pub firewall: Firewall,
    pub clock: Clock,
    /// Where the agent reports; the HTTP and gRPC servers read it.
    pub state: AgentState,
    /// Where the agent hands the API what Reserve/Unreserve need, once it has them.
    pub control: ControlSlot,
    /// systemd's readiness and watchdog notifications (nothing outside systemd).
    pub notifier: crate::notify::Notifier,
    /// This namespace's IPv6 addresses (the lease's `PublicIPv6`).
    pub ipv6_addrs: crate::ipv6::Ipv6Addrs,
}

/// Wall-clock time for what the agent reports (lease expiry, event times). Waiting is always on
/// tokio's clock, which tests pause and advance.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    System,
    /// Unix time `origin_unix` at tokio's `origin`, advancing with tokio's clock.
    Tokio {
        origin_unix: i64,
        origin: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock that reads `origin_unix` now and then follows tokio's (paused) clock.
    pub fn tokio(origin_unix: i64) -> Clock {
        Clock::Tokio {
            origin_unix,
            origin: tokio::time::Instant::now(),
        }
    }

    /// Seconds since the Unix epoch.
    pub fn unix_now(&self) -> i64 {
        match self {
            Clock::System => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
            Clock::Tokio {
                origin_unix,
                origin,
            } => origin_unix + origin.elapsed().as_secs() as i64,
        }
    }
}
