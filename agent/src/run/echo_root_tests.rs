//! Root-only: the kernel's real notifications of a vxlan reconcile are recognised as echoes of
//! our own writes (no repair scheduled), while a route deleted by someone else right after is
//! still drift that schedules a repair, and the repair puts it back. In a namespace of its own
//! (deleted by a guard, even on panic), never the root one.

use super::repair::{Echoes, Schedule, Watched};
use crate::backend::{VxlanBackend, VxlanConfig, VxlanPeer};
use crate::netlink::{select_iface, Change, Event, Events, MacAddr, Netlink};
use ipnetwork::Ipv4Network;
use std::net::Ipv4Addr;
use std::time::Duration;
use tokio::time::Instant;
use tweed_testkit::{ip_in, require_root, NetnsGuard};

const UNDERLAY: &str = "tw-e0";

fn peer(i: u32) -> VxlanPeer {
    let b = (i + 1).to_be_bytes();
    VxlanPeer {
        subnet: Ipv4Network::new(Ipv4Addr::from(0x0af4_6400 + (i << 8)), 24).unwrap(),
        public_ip: Ipv4Addr::from(0xc613_0000 + i + 1),
        vtep_mac: MacAddr([0x02, 0x78, b[0], b[1], b[2], b[3]]),
    }
}

/// Every notification that arrives within `quiet` of the previous one (the kernel sends them
/// as it applies the ops; a gap of `quiet` means it is done).
async fn drain(events: &mut Events, quiet: Duration) -> Vec<Event> {
    let mut out = Vec::new();
    while let Ok(Some(ev)) = tokio::time::timeout(quiet, events.next()).await {
        out.push(ev.expect("notifications readable"));
    }
    out
}

/// Notes every watched notification that is not an echo; returns how many were echoes.
fn note(evs: &[Event], watched: &Watched, echoes: &mut Echoes, schedule: &mut Schedule) -> usize {
    let now = Instant::now();
    let mut n = 0;
    for e in evs {
        if let Some(t) = watched.trigger(e) {
            if echoes.is_echo(e, now) {
                n += 1;
            } else {
                schedule.note(t, now);
            }
        }
    }
    n
}

#[test]
fn kernel_echoes_of_a_reconcile_schedule_no_repair_but_an_external_route_delete_does() {
    require_root!("network namespaces and a vxlan device");
    let ns = NetnsGuard::unique("tw-echo-");
    for args in [
        &[
            "link", "add", UNDERLAY, "type", "veth", "peer", "name", "tw-e1",
        ][..],
        &["addr", "add", "198.18.0.1/24", "dev", UNDERLAY],
        &["link", "set", UNDERLAY, "up"],
        &["link", "set", "tw-e1", "up"],
    ] {
        ip_in(ns.name(), args);
    }
    let tmp = tempfile::tempdir().unwrap();
    let mac_file = tmp.path().join("vtep-mac");
    let name = ns.name().to_string();
    ns.enter(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let nl = Netlink::real().unwrap();
                let iface = select_iface(&nl, Some(UNDERLAY)).await.unwrap();
                let cfg = VxlanConfig::new(
                    1,
                    iface.ip,
                    iface.index,
                    iface.mtu,
                    "10.244.1.0/24".parse().unwrap(),
                    mac_file,
                );
                let mut b = VxlanBackend::setup(&nl, cfg).await.unwrap();
                let watched = Watched {
                    device: Some((b.ifindex(), b.device_name().to_string())),
                    underlay: iface.index,
                    network: "10.244.0.0/16".parse().unwrap(),
                    v6: None,
                };
                let mut events = nl.events().unwrap();
                let mut echoes = Echoes::default();
                let mut schedule = Schedule::default();

                // 20 peers added, then 5 of them removed and one moved to another host.
                let mut peers: Vec<VxlanPeer> = (0..20).map(peer).collect();
                let mut recognised = 0;
                for round in 0..2 {
                    if round == 1 {
                        peers.truncate(15);
                        peers[3].public_ip = "198.19.9.9".parse().unwrap();
                        peers[3].vtep_mac = MacAddr([0x02, 0x78, 9, 9, 9, 9]);
                    }
                    let stats = b.reconcile(&nl, &peers).await.unwrap();
                    assert!(stats.is_clean(), "{:?}", stats.failures);
                    echoes.record(&stats.applied, Instant::now());
                    let evs = drain(&mut events, Duration::from_millis(300)).await;
                    recognised += note(&evs, &watched, &mut echoes, &mut schedule);
                    assert_eq!(
                        schedule.due(),
                        None,
                        "round {round}: our own writes scheduled a repair; notifications {evs:#?}"
                    );
                }
                // 60 entries added, 15 removed, 3 replaced: the kernel announced them all.
                assert!(recognised >= 60 + 15, "only {recognised} echoes seen");

                // Someone else deletes a route we just wrote (within the echo TTL): drift.
                let victim = peers[7].subnet.to_string();
                ip_in(&name, &["route", "del", &victim]);
                let evs = drain(&mut events, Duration::from_millis(300)).await;
                assert!(
                    evs.iter().any(
                        |e| matches!(e, Event::Route(Change::Del, r) if r.dst == peers[7].subnet)
                    ),
                    "{evs:#?}"
                );
                note(&evs, &watched, &mut echoes, &mut schedule);
                let due = schedule
                    .due()
                    .expect("the external delete schedules a repair");
                tokio::time::sleep_until(due).await;
                let repair = schedule.take(Instant::now()).unwrap();
                assert!(repair.triggers.contains(&super::repair::Trigger::Route));
                // What the repair does: re-read and put back what differs.
                b.resync();
                let stats = b.reconcile(&nl, &peers).await.unwrap();
                assert!(stats.is_clean(), "{:?}", stats.failures);
                assert_eq!(stats.ops_applied, 1, "{:?}", stats.applied);
                echoes.record(&stats.applied, Instant::now());
                let routes = nl.all_routes().await.unwrap();
                assert!(routes.iter().any(|r| r.dst == peers[7].subnet));
                // And the repair's own echo schedules nothing in turn.
                let evs = drain(&mut events, Duration::from_millis(300)).await;
                assert_eq!(
                    note(&evs, &watched, &mut echoes, &mut schedule),
                    1,
                    "{evs:#?}"
                );
                assert_eq!(schedule.due(), None);
            })
    });
}
