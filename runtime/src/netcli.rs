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
        /// e.g. 10.244.7.0/24
        subnet: String,
        /// the public IP of the node that may hold it
        public_ip: String,
    },
    /// Give a reserved SUBNET a TTL again (the agent's --lease-ttl): it expires unless renewed.
    Unreserve {
        /// e.g. 10.244.7.0/24
        subnet: String,
    },
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

async fn run_async(args: NetArgs, out: &mut dyn Write) -> Result<i32> {
    let mut c = connect(&args.socket).await?;
    match args.cmd {
        NetCmd::Status => {
            let s = c
                .status(pb::StatusRequest {})
                .await
                .map_err(status_msg)?
                .into_inner();
            if args.output == Output::Json {
                writeln!(out, "{}", serde_json::to_string_pretty(&status_json(&s))?)?;
            } else {
                write!(out, "{}", status_table(&s))?;
            }
            return Ok(if s.ready { 0 } else { 1 });
        }
        NetCmd::Leases => {
            let l = c
                .list_leases(pb::ListLeasesRequest {})
                .await
                .map_err(status_msg)?
                .into_inner();
            if args.output == Output::Json {
                let v: Vec<_> = l.leases.iter().map(lease_json).collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
            } else {
                write!(out, "{}", leases_table(&l.leases))?;
            }
        }
        NetCmd::Peers => {
            let p = c
                .list_peers(pb::ListPeersRequest {})
                .await
                .map_err(status_msg)?
                .into_inner();
            if args.output == Output::Json {
                let v: Vec<_> = p
                    .peers
                    .iter()
                    .map(|p| json!({"subnet": p.subnet, "public_ip": p.public_ip, "backend": p.backend, "programmed": p.programmed, "error": p.error}))
                    .collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
            } else {
                write!(out, "{}", peers_table(&p.peers))?;
            }
        }
        NetCmd::Watch => {
            let mut s = c
                .watch_leases(pb::WatchLeasesRequest {})
                .await
                .map_err(status_msg)?
                .into_inner();
            while let Some(ev) = s.message().await.map_err(status_msg)? {
                let kind = match Kind::try_from(ev.kind).unwrap_or(Kind::Updated) {
                    Kind::Added => "added",
                    Kind::Updated => "updated",
                    Kind::Removed => "removed",
                };
                let lease = ev.lease.unwrap_or_default();
                if args.output == Output::Json {
                    writeln!(
                        out,
                        "{}",
                        json!({"kind": kind, "unix_millis": ev.unix_millis, "lease": lease_json(&lease)})
                    )?;
                } else {
                    writeln!(
                        out,
                        "{:<8} {:<18} {:<16} {}",
                        kind, lease.subnet, lease.public_ip, lease.backend_type
                    )?;
                }
                out.flush()?;
            }
        }
        NetCmd::Reserve { subnet, public_ip } => {
            let r = c
                .reserve(pb::ReserveRequest { subnet, public_ip })
                .await
                .map_err(status_msg)?
                .into_inner();
            if args.output == Output::Json {
                writeln!(
                    out,
                    "{}",
                    json!({"subnet": r.subnet, "public_ip": r.public_ip, "created": r.created})
                )?;
            } else {
                writeln!(out, "reserved {} for {}", r.subnet, r.public_ip)?;
            }
        }
        NetCmd::Unreserve { subnet } => {
            let r = c
                .unreserve(pb::UnreserveRequest { subnet })
                .await
                .map_err(status_msg)?
                .into_inner();
            if args.output == Output::Json {
                writeln!(
                    out,
                    "{}",
                    json!({"subnet": r.subnet, "lease_id": format!("{:x}", r.lease_id), "ttl_seconds": r.ttl_seconds})
                )?;
            } else {
                writeln!(
                    out,
                    "unreserved {}: lease {:x}, expires in {}s unless renewed",
                    r.subnet, r.lease_id, r.ttl_seconds
                )?;
            }
        }
    }
    Ok(0)
}

fn status_json(s: &pb::StatusReply) -> serde_json::Value {
    json!({
        "node": s.node, "public_ip": s.public_ip, "network": s.network, "subnet": s.subnet,
        "backend": s.backend, "mtu": s.mtu, "ready": s.ready, "not_ready": s.not_ready,
        "lease_held": s.lease_held, "backend_programmed": s.backend_programmed,
        "watch_live": s.watch_live, "lease_expiry_unix": s.lease_expiry_unix,
        "version": s.version, "etcd_endpoints": s.etcd_endpoints,
    })
}

fn status_table(s: &pb::StatusReply) -> String {
    let mut t = String::new();
    let rows = [
        ("node", s.node.clone()),
        ("public ip", s.public_ip.clone()),
        ("network", s.network.clone()),
        ("subnet", s.subnet.clone()),
        ("backend", s.backend.clone()),
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

fn peers_table(peers: &[pb::Peer]) -> String {
    let mut t = format!(
        "{:<18} {:<16} {:<8} {}\n",
        "SUBNET", "PUBLIC_IP", "BACKEND", "PROGRAMMED"
    );
    for p in peers {
        let state = if p.programmed {
            "yes".to_string()
        } else {
            format!("no: {}", p.error)
        };
        t.push_str(&format!(
            "{:<18} {:<16} {:<8} {}\n",
            p.subnet, p.public_ip, p.backend, state
        ));
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
        let s = status_table(&pb::StatusReply {
            ready: false,
            not_ready: vec!["no subnet lease held".into()],
            ..Default::default()
        });
        assert!(s.contains("no (no subnet lease held)"), "{s}");
        assert_eq!(status_json(&pb::StatusReply::default())["ready"], false);
    }
}
