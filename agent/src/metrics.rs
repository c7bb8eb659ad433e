//! The agent's Prometheus metrics. One registry per agent (not the global one), so tests run
//! several agents in one process without collisions.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    /// 1 for the subnet this node holds (label), absent while none is held.
    pub lease_info: IntGaugeVec,
    /// 1 for the IPv6 subnet of this node's dual-stack lease (label), absent when IPv4 only.
    pub lease_ipv6_info: IntGaugeVec,
    pub lease_expiry: IntGauge,
    pub peers: IntGaugeVec,
    pub lease_acquisitions: IntCounter,
    pub lease_renewals: IntCounter,
    pub lease_failures: IntCounterVec,
    pub etcd_errors: IntCounterVec,
    pub watch_reconnects: IntCounter,
    pub lease_events: IntCounterVec,
    /// Peer leases refused by validation, per reason (see `LeaseRejection::label`).
    pub leases_rejected: IntCounterVec,
    /// Our own lease found taken, overwritten or covered by another, per action taken.
    pub lease_conflicts: IntCounterVec,
    pub netlink_ops: IntCounter,
    pub netlink_failures: IntCounter,
    pub reconcile_seconds: Histogram,
    /// The part of `reconcile_seconds` a lease event waited for the main loop (busy with a
    /// rule check, a relist or another event).
    pub lease_event_wait_seconds: Histogram,
    pub rules_resyncs: IntCounter,
    /// Drift repaired after a kernel notification or the periodic relist, by object kind.
    pub repairs: IntCounterVec,
    /// From the first notification of a drift to its repair applied.
    pub repair_seconds: Histogram,
    pub rules_errors: IntCounter,
    pub udp_packets: IntCounterVec,
    pub udp_bytes: IntCounterVec,
    pub udp_drops: IntCounterVec,
    /// Per wireguard peer (labels: its subnet and public key), refreshed with the udp counters;
    /// a peer leaving the table leaves these too. Age is -1 before the first handshake.
    pub wg_handshake_age: IntGaugeVec,
    pub wg_peer_bytes: IntGaugeVec,
    /// The backend running and its implementation (`kernel` | `userspace`), value 1.
    pub backend_info: IntGaugeVec,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: T) -> T {
    r.register(Box::new(m.clone()))
        .expect("metric names are unique and valid");
    m
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new_custom(Some("tweed".into()), None).expect("valid prefix");
        let counter = |name: &str, help: &str| reg(&r, IntCounter::new(name, help).expect("valid"));
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &r,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid"),
            )
        };
        Metrics {
            lease_info: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new("lease_info", "The subnet this node holds (value 1)"),
                    &["subnet"],
                )
                .expect("valid"),
            ),
            lease_ipv6_info: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "lease_ipv6_info",
                        "The IPv6 subnet of this node's dual-stack lease (value 1)",
                    ),
                    &["subnet"],
                )
                .expect("valid"),
            ),
            lease_expiry: reg(
                &r,
                IntGauge::new(
                    "lease_expiry_timestamp_seconds",
                    "When this node's lease expires unless renewed (0: no TTL)",
                )
                .expect("valid"),
            ),
            peers: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new("peers", "Peers programmed into the data plane"),
                    &["backend"],
                )
                .expect("valid"),
            ),
            lease_acquisitions: counter(
                "lease_acquisitions_total",
                "Leases acquired or re-acquired",
            ),
            lease_renewals: counter("lease_renewals_total", "Successful lease renewals"),
            lease_failures: counter_vec("lease_failures_total", "Failed lease operations", &["op"]),
            etcd_errors: counter_vec("etcd_errors_total", "etcd requests that failed", &["op"]),
            watch_reconnects: counter(
                "watch_reconnects_total",
                "Times the lease watch was re-established",
            ),
            lease_events: counter_vec("lease_events_total", "Lease changes seen", &["kind"]),
            leases_rejected: counter_vec(
                "leases_rejected_total",
                "Lease keys or values refused (corrupt, hostile or overlapping), per revision",
                &["reason"],
            ),
            lease_conflicts: counter_vec(
                "lease_conflicts_total",
                "Conflicts over this node's own lease, by the action taken",
                &["action"],
            ),
            netlink_ops: counter("netlink_ops_total", "Netlink changes applied"),
            netlink_failures: counter("netlink_failures_total", "Netlink changes that failed"),
            reconcile_seconds: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "reconcile_seconds",
                        "From a lease event being received to the data plane programmed",
                    )
                    .buckets(vec![
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    ]),
                )
                .expect("valid"),
            ),
            lease_event_wait_seconds: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "lease_event_wait_seconds",
                        "From a lease event being received to the main loop taking it up",
                    )
                    .buckets(vec![
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    ]),
                )
                .expect("valid"),
            ),
            rules_resyncs: counter(
                "rules_resyncs_total",
                "Rule syncs that had to change something",
            ),
            rules_errors: counter("rules_errors_total", "Rule syncs that failed"),
            repairs: counter_vec(
                "repairs_total",
                "Owned kernel objects found drifted and repaired",
                &["kind"],
            ),
            repair_seconds: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "repair_seconds",
                        "From a kernel notification of drift to the repair applied",
                    )
                    .buckets(vec![
                        0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                    ]),
                )
                .expect("valid"),
            ),
            udp_packets: counter_vec("udp_packets_total", "udp backend packets", &["direction"]),
            udp_bytes: counter_vec("udp_bytes_total", "udp backend bytes", &["direction"]),
            udp_drops: counter_vec(
                "udp_drops_total",
                "udp backend packets dropped",
                &["reason"],
            ),
            wg_handshake_age: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "wireguard_peer_handshake_age_seconds",
                        "Seconds since the last handshake with a peer (-1: none yet), per device entry",
                    ),
                    &["subnet", "public_key", "device"],
                )
                .expect("valid"),
            ),
            wg_peer_bytes: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "wireguard_peer_bytes",
                        "Bytes sent to (tx) and received from (rx) a peer since its session began, per device entry",
                    ),
                    &["subnet", "public_key", "direction", "device"],
                )
                .expect("valid"),
            ),
            backend_info: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "backend_info",
                        "The backend running and which implementation carries it: kernel or userspace (value 1)",
                    ),
                    &["backend", "implementation"],
                )
                .expect("valid"),
            ),
            registry: r,
        }
    }

    /// The text exposition format, for `/metrics`.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encoding to a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_the_prefix() {
        let m = Metrics::new();
        m.lease_info.with_label_values(&["10.244.3.0/24"]).set(1);
        m.lease_ipv6_info
            .with_label_values(&["fd00:10:244:3::/64"])
            .set(1);
        m.peers.with_label_values(&["vxlan"]).set(2);
        m.lease_failures.with_label_values(&["renew"]).inc();
        m.etcd_errors.with_label_values(&["watch"]).inc();
        m.lease_events.with_label_values(&["added"]).inc();
        m.udp_packets.with_label_values(&["tx"]).inc();
        m.udp_bytes.with_label_values(&["tx"]).inc_by(100);
        m.udp_drops.with_label_values(&["unknown_peer"]).inc();
        m.reconcile_seconds.observe(0.002);
        m.lease_event_wait_seconds.observe(0.001);
        m.backend_info
            .with_label_values(&["wireguard", "kernel"])
            .set(1);
        let text = m.render();
        for name in [
            "tweed_lease_info{subnet=\"10.244.3.0/24\"} 1",
            "tweed_lease_ipv6_info{subnet=\"fd00:10:244:3::/64\"} 1",
            "tweed_lease_expiry_timestamp_seconds 0",
            "tweed_peers{backend=\"vxlan\"} 2",
            "tweed_backend_info{backend=\"wireguard\",implementation=\"kernel\"} 1",
            "tweed_lease_acquisitions_total 0",
            "tweed_lease_renewals_total 0",
            "tweed_lease_failures_total{op=\"renew\"} 1",
            "tweed_etcd_errors_total{op=\"watch\"} 1",
            "tweed_watch_reconnects_total 0",
            "tweed_netlink_ops_total 0",
            "tweed_netlink_failures_total 0",
            "tweed_reconcile_seconds_count 1",
            "tweed_lease_event_wait_seconds_bucket{le=\"0.001\"} 1",
            "tweed_rules_resyncs_total 0",
            "tweed_udp_drops_total{reason=\"unknown_peer\"} 1",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
