//! `tweedctl net`: the local agent's view over its gRPC socket, as tables or JSON.

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use tweed_api::v1::{self as pb, lease_event::Kind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(clap::Args, Debug)]
pub struct NetArgs {
    /// The agent's API socket.
    #[arg(long, env = "TWEED_API_SOCKET", default_value = tweed_api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    cmd: NetCmd,
}

#[derive(Subcommand, Debug)]
enum NetCmd {
    /// This node: subnet, backend, readiness.
    Status,
    /// Every lease the agent knows.
    Leases,
    /// The peers programmed into the data plane.
    Peers,
    /// Stream lease changes until interrupted.
    Watch,
    /// Pin SUBNET to PUBLIC_IP: no TTL, never expires, taken only by the agent with that IP.
    Reserve {
        /// e.g. 10.244.7.0/24 (an IPv6-only network: fd00:10:244:7::/64)
        subnet: String,
        /// the public IP of the node that may hold it (an IPv6-only network: its PublicIPv6)
        public_ip: String,
    },
    /// Give a reserved SUBNET a TTL again (the agent's --lease-ttl): it expires unless renewed.
    Unreserve {
        /// e.g. 10.244.7.0/24 (an IPv6-only network: fd00:10:244:7::/64)
        subnet: String,
    },
    /// The wireguard backend's key.
    Wireguard {
        #[command(subcommand)]
        cmd: WgCmd,
    },
}

#[derive(Subcommand, Debug)]
enum WgCmd {
    /// New private key without a restart: stored in the key file, used, and published in this
    /// node's lease; peers replace the old peer entry.
    RotateKey,
}

pub fn run(args: NetArgs, out: &mut dyn Write) -> Result<i32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run_async(args, out))
}

async fn connect(
    socket: &Path,
) -> Result<tweed_api::v1::agent_client::AgentClient<tonic::transport::Channel>> {
    tweed_api::connect(socket).await.with_context(|| {
        format!(
            "connecting to tweedd at {} (is tweedd running? is this the right --socket?)",
            socket.display()
        )
    })
}

fn status_msg(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("tweedd answered: {}", e.message())
}

/// The agent's answer to one call; a gRPC error status becomes what tweedd said.
async fn answer<T>(
    call: impl std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    Ok(call.await.map_err(status_msg)?.into_inner())
}

/// How `--output json` lays a value out.
#[derive(Debug, Clone, Copy)]
enum Layout {
    /// Whole answers, indented for people.
    Pretty,
    /// Stream events and confirmations: one line each, so a script can read them as they come.
    Line,
}

/// Prints one answer in the chosen format, building only that form; `table` brings its own
/// newlines.
fn emit(
    out: &mut dyn Write,
    output: Output,
    layout: Layout,
    json: impl FnOnce() -> serde_json::Value,
    table: impl FnOnce() -> String,
) -> Result<()> {
    match (output, layout) {
        // `{:#}` is serde_json's pretty printer, byte for byte `to_string_pretty`.
        (Output::Json, Layout::Pretty) => writeln!(out, "{:#}", json())?,
        (Output::Json, Layout::Line) => writeln!(out, "{}", json())?,
        (Output::Table, _) => write!(out, "{}", table())?,
    }
    Ok(())
}

/// Where answers go, and in which format.
struct Printer<'a> {
    out: &'a mut dyn Write,
    output: Output,
}

impl Printer<'_> {
    fn emit(
        &mut self,
        layout: Layout,
        json: impl FnOnce() -> serde_json::Value,
        table: impl FnOnce() -> String,
    ) -> Result<()> {
        emit(self.out, self.output, layout, json, table)
    }

    /// A list reply: JSON an array of `one` per item, or the table `table` makes of them all.
    fn list<T>(
        &mut self,
        items: &[T],
        one: fn(&T) -> serde_json::Value,
        table: fn(&[T]) -> String,
    ) -> Result<()> {
        let json = || items.iter().map(one).collect();
        emit(self.out, self.output, Layout::Pretty, json, || table(items))
    }
}

async fn run_async(args: NetArgs, out: &mut dyn Write) -> Result<i32> {
    let mut c = connect(&args.socket).await?;
    let mut w = Printer {
        out,
        output: args.output,
    };
    match args.cmd {
        NetCmd::Status => {
            let s = answer(c.status(pb::StatusRequest {})).await?;
            w.emit(Layout::Pretty, || status_json(&s), || status_table(&s))?;
            return Ok(if s.ready { 0 } else { 1 });
        }
        NetCmd::Leases => {
            let l = answer(c.list_leases(pb::ListLeasesRequest {})).await?;
            w.list(&l.leases, lease_json, leases_table)?;
        }
        NetCmd::Peers => {
            let p = answer(c.list_peers(pb::ListPeersRequest {})).await?;
            w.list(&p.peers, peer_json, peers_table)?;
        }
        NetCmd::Watch => {
            let mut s = answer(c.watch_leases(pb::WatchLeasesRequest {})).await?;
            while let Some(ev) = s.message().await.map_err(status_msg)? {
                let kind = match Kind::try_from(ev.kind).unwrap_or(Kind::Updated) {
                    Kind::Added => "added",
                    Kind::Updated => "updated",
                    Kind::Removed => "removed",
                };
                let lease = ev.lease.unwrap_or_default();
                w.emit(
                    Layout::Line,
                    || json!({"kind": kind, "unix_millis": ev.unix_millis, "lease": lease_json(&lease)}),
                    || {
                        format!(
                            "{:<8} {:<18} {:<16} {}\n",
                            kind, lease.subnet, lease.public_ip, lease.backend_type
                        )
                    },
                )?;
                w.out.flush()?;
            }
        }
        NetCmd::Reserve { subnet, public_ip } => {
            let r = answer(c.reserve(pb::ReserveRequest { subnet, public_ip })).await?;
            w.emit(
                Layout::Line,
                || json!({"subnet": r.subnet, "public_ip": r.public_ip, "created": r.created}),
                || format!("reserved {} for {}\n", r.subnet, r.public_ip),
            )?;
        }
        NetCmd::Wireguard {
            cmd: WgCmd::RotateKey,
        } => {
            let r = answer(c.rotate_wireguard_key(pb::RotateWireguardKeyRequest {})).await?;
            w.emit(
                Layout::Line,
                || json!({"old_public_key": r.old_public_key, "new_public_key": r.new_public_key, "published": r.published}),
                || {
                    format!(
                        "rotated: {} -> {}{}\n",
                        r.old_public_key,
                        r.new_public_key,
                        if r.published {
                            ""
                        } else {
                            " (not in the lease yet: the agent retries every 5 s)"
                        }
                    )
                },
            )?;
            return Ok(if r.published { 0 } else { 1 });
        }
        NetCmd::Unreserve { subnet } => {
            let r = answer(c.unreserve(pb::UnreserveRequest { subnet })).await?;
            w.emit(
                Layout::Line,
                || json!({"subnet": r.subnet, "lease_id": format!("{:x}", r.lease_id), "ttl_seconds": r.ttl_seconds}),
                || {
                    format!(
                        "unreserved {}: lease {:x}, expires in {}s unless renewed\n",
                        r.subnet, r.lease_id, r.ttl_seconds
                    )
                },
            )?;
        }
    }
    Ok(0)
}

fn status_json(s: &pb::StatusReply) -> serde_json::Value {
    json!({
        "node": s.node, "public_ip": s.public_ip, "network": s.network, "subnet": s.subnet,
        "backend": s.backend, "backend_implementation": s.backend_implementation, "mtu": s.mtu, "ready": s.ready, "not_ready": s.not_ready,
        "lease_held": s.lease_held, "backend_programmed": s.backend_programmed,
        "watch_live": s.watch_live, "lease_expiry_unix": s.lease_expiry_unix,
        "version": s.version, "etcd_endpoints": s.etcd_endpoints,
        "ipv6": s.ipv6, "public_ipv6": s.public_ipv6, "subnet_v6": s.subnet_v6,
    })
}

fn status_table(s: &pb::StatusReply) -> String {
    let mut t = String::new();
    let rows = [
        ("node", s.node.clone()),
        ("public ip", s.public_ip.clone()),
        ("network", s.network.clone()),
        ("subnet", s.subnet.clone()),
        ("ipv6", s.ipv6.clone()),
        ("public ipv6", s.public_ipv6.clone()),
        ("ipv6 subnet", s.subnet_v6.clone()),
        (
            "backend",
            if s.backend_implementation.is_empty() {
                s.backend.clone()
            } else {
                format!("{} ({})", s.backend, s.backend_implementation)
            },
        ),
        ("mtu", s.mtu.to_string()),
        (
            "ready",
            if s.ready {
                "yes".to_string()
            } else {
                format!("no ({})", s.not_ready.join("; "))
            },
        ),
        (
            "lease expires",
            if s.lease_expiry_unix == 0 {
                "never".into()
            } else {
                s.lease_expiry_unix.to_string()
            },
        ),
        ("etcd", s.etcd_endpoints.clone()),
        ("version", s.version.clone()),
    ];
    for (k, v) in rows {
        t.push_str(&format!("{k:<14} {v}\n"));
    }
    t
}

fn lease_json(l: &pb::Lease) -> serde_json::Value {
    json!({"subnet": l.subnet, "public_ip": l.public_ip, "backend_type": l.backend_type,
           "backend_data": l.backend_data, "lease_id": format!("{:x}", l.lease_id), "own": l.own})
}

fn leases_table(leases: &[pb::Lease]) -> String {
    let mut t = format!(
        "{:<18} {:<16} {:<8} {:<17} {}\n",
        "SUBNET", "PUBLIC_IP", "BACKEND", "LEASE", "OWN"
    );
    for l in leases {
        let lease = if l.lease_id == 0 {
            "reserved".to_string()
        } else {
            format!("{:x}", l.lease_id)
        };
        t.push_str(&format!(
            "{:<18} {:<16} {:<8} {:<17} {}\n",
            l.subnet,
            l.public_ip,
            l.backend_type,
            lease,
            if l.own { "*" } else { "" }
        ));
    }
    t
}

fn peer_json(p: &pb::Peer) -> serde_json::Value {
    let mut v = json!({"subnet": p.subnet, "public_ip": p.public_ip, "backend": p.backend,
           "programmed": p.programmed, "error": p.error});
    if !p.public_key.is_empty() {
        v["public_key"] = json!(p.public_key);
        v["handshake_age_seconds"] =
            json!((p.handshake_age_seconds >= 0).then_some(p.handshake_age_seconds));
        v["tx_bytes"] = json!(p.tx_bytes);
        v["rx_bytes"] = json!(p.rx_bytes);
        v["device"] = json!(p.device);
    }
    if let Some(e) = &p.v6_entry {
        v["v6_entry"] = json!({"device": e.device, "subnet": e.subnet,
            "public_key": e.public_key,
            "handshake_age_seconds": (e.handshake_age_seconds >= 0).then_some(e.handshake_age_seconds),
            "tx_bytes": e.tx_bytes, "rx_bytes": e.rx_bytes});
    }
    v
}

fn age_text(seconds: i64) -> String {
    if seconds < 0 {
        "never".to_string()
    } else {
        format!("{seconds}s")
    }
}

/// wireguard peers' columns: key, handshake age, bytes out/in, device; nothing for other
/// backends.
fn wg_columns(p: &pb::Peer) -> String {
    if p.public_key.is_empty() {
        return String::new();
    }
    format!(
        " {:<44} {:>9} {:>12} {:>12} {}",
        p.public_key,
        age_text(p.handshake_age_seconds),
        p.tx_bytes,
        p.rx_bytes,
        p.device
    )
}

fn peers_table(peers: &[pb::Peer]) -> String {
    let wg = peers.iter().any(|p| !p.public_key.is_empty());
    let mut t = format!(
        "{:<18} {:<16} {:<9} {:<10}",
        "SUBNET", "PUBLIC_IP", "BACKEND", "PROGRAMMED"
    );
    if wg {
        t.push_str(&format!(
            " {:<44} {:>9} {:>12} {:>12} {}",
            "PUBLIC_KEY", "HANDSHAKE", "TX_BYTES", "RX_BYTES", "DEVICE"
        ));
    }
    t.push('\n');
    for p in peers {
        let state = if p.programmed {
            "yes".to_string()
        } else {
            format!("no: {}", p.error)
        };
        t.push_str(&format!(
            "{:<18} {:<16} {:<9} {:<10}{}\n",
            p.subnet,
            p.public_ip,
            p.backend,
            state,
            wg_columns(p)
        ));
        // `Mode: separate`: the same peer's entry on the IPv6 device, on a line of its own
        // under the peer, its IPv6 subnet in the SUBNET column.
        if let Some(e) = &p.v6_entry {
            t.push_str(&format!(
                "{:<18} {:<16} {:<9} {:<10} {:<44} {:>9} {:>12} {:>12} {}\n",
                e.subnet,
                "",
                "",
                "",
                e.public_key,
                age_text(e.handshake_age_seconds),
                e.tx_bytes,
                e.rx_bytes,
                e.device
            ));
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables() {
        let l = vec![
            pb::Lease {
                subnet: "10.244.3.0/24".into(),
                public_ip: "198.18.0.1".into(),
                backend_type: "vxlan".into(),
                lease_id: 0x2a,
                own: true,
                ..Default::default()
            },
            pb::Lease {
                subnet: "10.244.4.0/24".into(),
                public_ip: "198.18.0.2".into(),
                backend_type: "vxlan".into(),
                lease_id: 0,
                ..Default::default()
            },
        ];
        let t = leases_table(&l);
        assert!(
            t.lines()
                .nth(1)
                .unwrap()
                .starts_with("10.244.3.0/24      198.18.0.1       vxlan    2a"),
            "{t}"
        );
        assert!(t.contains("reserved"), "{t}");
        let p = peers_table(&[pb::Peer {
            subnet: "10.244.4.0/24".into(),
            programmed: false,
            error: "bad MAC".into(),
            ..Default::default()
        }]);
        assert!(p.contains("no: bad MAC"), "{p}");
        assert!(!p.contains("HANDSHAKE"), "{p}");
        let key = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
        let wg = |age| pb::Peer {
            subnet: "10.244.4.0/24".into(),
            backend: "wireguard".into(),
            programmed: true,
            public_key: key.into(),
            handshake_age_seconds: age,
            tx_bytes: 1234,
            rx_bytes: 5678,
            device: "tweed-wg".into(),
            ..Default::default()
        };
        let p = peers_table(&[wg(42), wg(-1)]);
        assert!(p.lines().next().unwrap().contains("HANDSHAKE"), "{p}");
        assert!(p.lines().next().unwrap().ends_with(" DEVICE"), "{p}");
        let row = p.lines().nth(1).unwrap();
        assert!(
            row.contains(key) && row.contains(" 42s ") && row.ends_with(" 5678 tweed-wg"),
            "{p}"
        );
        assert!(p.lines().nth(2).unwrap().contains("never"), "{p}");
        let j = peer_json(&wg(-1));
        assert_eq!(j["handshake_age_seconds"], serde_json::Value::Null);
        assert_eq!(j["public_key"], key);
        assert_eq!(peer_json(&wg(7))["handshake_age_seconds"], 7);
        assert_eq!(peer_json(&wg(7))["device"], "tweed-wg");
        assert!(peer_json(&wg(7)).get("v6_entry").is_none());
        // `Mode: separate`: the peer's tweed-wg-v6 entry on the line under it.
        let key6 = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        let sep = pb::Peer {
            v6_entry: Some(pb::WireguardEntry {
                device: "tweed-wg-v6".into(),
                subnet: "fd00:10:244:4::/64".into(),
                public_key: key6.into(),
                handshake_age_seconds: -1,
                tx_bytes: 9,
                rx_bytes: 10,
            }),
            ..wg(42)
        };
        let p = peers_table(std::slice::from_ref(&sep));
        assert_eq!(p.lines().count(), 3, "{p}");
        let row6 = p.lines().nth(2).unwrap();
        assert!(
            row6.starts_with("fd00:10:244:4::/64 ")
                && row6.contains(key6)
                && row6.contains(" never ")
                && row6.ends_with(" 10 tweed-wg-v6"),
            "{p}"
        );
        let j = peer_json(&sep);
        assert_eq!(j["v6_entry"]["device"], "tweed-wg-v6");
        assert_eq!(j["v6_entry"]["subnet"], "fd00:10:244:4::/64");
        assert_eq!(
            j["v6_entry"]["handshake_age_seconds"],
            serde_json::Value::Null
        );
        assert_eq!(j["v6_entry"]["rx_bytes"], 10);
        assert_eq!(j["tx_bytes"], 1234);
        let s = status_table(&pb::StatusReply {
            ready: false,
            not_ready: vec!["no subnet lease held".into()],
            ..Default::default()
        });
        assert!(s.contains("no (no subnet lease held)"), "{s}");
        assert_eq!(status_json(&pb::StatusReply::default())["ready"], false);
        let wg = pb::StatusReply {
            backend: "wireguard".into(),
            backend_implementation: "kernel".into(),
            ..Default::default()
        };
        assert!(status_table(&wg).contains("wireguard (kernel)"));
        assert_eq!(status_json(&wg)["backend_implementation"], "kernel");
        let dual = pb::StatusReply {
            ipv6: "dual-stack".into(),
            public_ipv6: "2001:db8::1".into(),
            subnet_v6: "fd00:10:244:3::/64".into(),
            ..Default::default()
        };
        let t = status_table(&dual);
        assert!(
            t.contains("ipv6           dual-stack\n")
                && t.contains("public ipv6    2001:db8::1\n")
                && t.contains("ipv6 subnet    fd00:10:244:3::/64\n"),
            "{t}"
        );
        assert_eq!(status_json(&dual)["subnet_v6"], "fd00:10:244:3::/64");
    }

    #[test]
    fn emit_prints_the_chosen_form_only() {
        let leases = vec![lease_json(&pb::Lease::default()), json!({"a": [1, 2]})];
        let print = |output, layout| {
            let mut out = Vec::new();
            emit(
                &mut out,
                output,
                layout,
                || leases.iter().cloned().collect(),
                || "a table\n".to_string(),
            )
            .unwrap();
            String::from_utf8(out).unwrap()
        };
        assert_eq!(
            print(Output::Json, Layout::Pretty),
            serde_json::to_string_pretty(&leases).unwrap() + "\n"
        );
        assert_eq!(
            print(Output::Json, Layout::Line),
            serde_json::to_string(&leases).unwrap() + "\n"
        );
        assert_eq!(print(Output::Table, Layout::Pretty), "a table\n");
        assert_eq!(print(Output::Table, Layout::Line), "a table\n");
    }
}
