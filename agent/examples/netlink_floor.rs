//! The kernel floor for `bench/controlplane`: the netlink ops the vxlan backend sends on a cold
//! start for N peers, sent by a program that does nothing else (no etcd, no observing, no diff,
//! no agent). Only `Netlink::apply_all` over the planned ops is timed.
//!
//! Usage (root, inside a network namespace of the caller's making whose IFACE has an IPv4
//! address): `netlink_floor IFACE N`. The peers are the bench's simulated leases (peer i:
//! 10.(1+i/256).(i%256).0/24 on 198.19.(i/256).(i%256), VTEP MAC 02:00:<i as 4 bytes>), so the
//! op list is the one `tweedd` sends for them. Prints one line: `floor peers=N ops=M ms=T`.

use std::net::Ipv4Addr;
use std::time::Instant;

use anyhow::{bail, Context};
use ipnetwork::Ipv4Network;
use tweed_agent::backend::vxlan::plan;
use tweed_agent::backend::{ObservedState, VxlanBackend, VxlanConfig, VxlanPeer};
use tweed_agent::netlink::{select_iface, MacAddr, Netlink};

/// The lab agent's own subnet is a 10.244.x.0/24; any subnet outside the peers' does here.
const OWN_SUBNET: &str = "10.244.1.0/24";

fn peer(i: u32) -> VxlanPeer {
    let [a, b, c, d] = i.to_be_bytes();
    VxlanPeer {
        subnet: Ipv4Network::new(Ipv4Addr::new(10, 1 + (i / 256) as u8, d, 0), 24)
            .expect("/24 is a valid prefix"),
        public_ip: Ipv4Addr::new(198, 19, c, d),
        vtep_mac: MacAddr([0x02, 0x00, a, b, c, d]),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, iface, n] = &args[..] else {
        bail!("usage: netlink_floor IFACE PEERS");
    };
    let n: u32 = n.parse().context("PEERS")?;
    // The bench's addressing runs out at 10.255.x: 254 * 256 peers.
    if n > 254 * 256 {
        bail!("at most {} peers", 254 * 256);
    }
    let nl = Netlink::real().context("netlink socket")?;
    let up = select_iface(&nl, Some(iface)).await.context("underlay")?;
    let tmp = std::env::temp_dir().join(format!("netlink-floor-{}.mac", std::process::id()));
    let own: Ipv4Network = OWN_SUBNET.parse()?;
    let cfg = VxlanConfig::new(1, up.ip, up.index, up.mtu, own, tmp.clone());
    let backend = VxlanBackend::setup(&nl, cfg).await.context("vxlan device");
    let _ = std::fs::remove_file(&tmp);
    let backend = backend?;
    let peers: Vec<_> = (0..n).map(peer).collect();
    // The plan from an empty device is what the agent sends when it finds nothing programmed.
    let ops = plan(&ObservedState::empty(backend.ifindex(), up.ip, own), &peers);
    let t = Instant::now();
    let res = nl.apply_all(&ops).await;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if let Some((op, Err(e))) = ops.iter().zip(&res).find(|(_, r)| r.is_err()) {
        bail!("{op}: {e}");
    }
    println!("floor peers={n} ops={} ms={ms:.1}", ops.len());
    Ok(())
}
