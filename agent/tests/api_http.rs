//! The metrics/health HTTP server and the gRPC API, on a port-0 listener and a temp unix socket.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tweed_agent::state::{AgentState, EventKind, LeaseEventView, LeaseView, PeerView};

/// The body of a raw HTTP response.
fn json_body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, out)
}

fn ready(state: &AgentState) {
    state.update(|s| {
        s.node = "h1".into();
        s.subnet = "10.244.3.0/24".into();
        s.backend = "vxlan".into();
        s.lease_held = true;
        s.backend_programmed = true;
        s.watch_live = true;
        s.subnet_env_written = true;
        s.leases = [(
            tweed_config::SubnetKey::new("10.244.3.0/24".parse().unwrap()),
            LeaseView {
                subnet: "10.244.3.0/24".into(),
                public_ip: "198.18.0.1".into(),
                backend_type: "vxlan".into(),
                own: true,
                ..Default::default()
            },
        )]
        .into_iter()
        .collect();
        s.peers = [(
            "10.244.4.0/24".parse().unwrap(),
            PeerView {
                subnet: "10.244.4.0/24".into(),
                public_ip: "198.18.0.2".into(),
                backend: "vxlan".into(),
                programmed: true,
                error: None,
            },
        )]
        .into_iter()
        .collect();
    });
}

/// Tells a server to shut down and requires it to finish, cleanly, within 5 s.
async fn stop<E: std::fmt::Debug>(
    tx: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), E>>,
) {
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn health_ready_and_metrics() {
    let state = AgentState::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(tweed_agent::http::serve(listener, state.clone(), async {
        let _ = rx.await;
    }));
    // Alive while starting (no loop yet), and while the loop runs.
    assert_eq!(get(addr, "/healthz").await.0, 200);
    state.update(|s| s.loop_beat = Some(std::time::Instant::now()));
    let (code, body) = get(addr, "/healthz").await;
    assert_eq!((code, json_body(&body)), (200, "{\"alive\":true}\n"));
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 503);
    let v: serde_json::Value = serde_json::from_str(json_body(&body)).unwrap();
    assert_eq!(v["ready"], false);
    assert_eq!(v["lease_held"], false);
    assert_eq!(v["subnet_env_written"], false);
    assert!(
        body.contains("no subnet lease held")
            && body.contains("lease watch not live")
            && body.contains("subnet.env not written"),
        "{body}"
    );
    ready(&state);
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(json_body(&body)).unwrap();
    assert_eq!(
        (
            v["ready"].as_bool(),
            v["reasons"].as_array().map(|r| r.len())
        ),
        (Some(true), Some(0))
    );
    // A device that could not be programmed: not ready, and the body says why.
    state.update(|s| s.backend_programmed = false);
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("backend vxlan not programmed"), "{body}");
    state.update(|s| s.backend_programmed = true);
    // A main loop that stopped running: not alive.
    let stale = std::time::Instant::now()
        .checked_sub(tweed_agent::state::LIVENESS + Duration::from_secs(1))
        .unwrap();
    state.update(|s| s.loop_beat = Some(stale));
    let (code, body) = get(addr, "/healthz").await;
    assert_eq!(code, 503);
    assert!(
        body.contains("\"alive\":false") && body.contains("main loop last ran"),
        "{body}"
    );
    state.metrics.lease_renewals.inc();
    let (code, body) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(body.contains("tweed_lease_renewals_total 1"), "{body}");
    assert_eq!(get(addr, "/nope").await.0, 404);
    stop(tx, server).await;
}

#[tokio::test]
async fn grpc_status_lists_and_event_stream_over_a_0600_socket() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/tweedd.sock");
    // A stale socket file from a crashed run is replaced.
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, b"stale").unwrap();
    let state = AgentState::new();
    let listener = tweed_agent::api::bind(&path).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(tweed_agent::api::serve(
        listener,
        state.clone(),
        Default::default(),
        async {
            let _ = rx.await;
        },
    ));
    let mut c = tweed_api::connect(&path).await.unwrap();
    let st = c
        .status(tweed_api::v1::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!st.ready && st.not_ready.len() == 4, "{st:?}");
    ready(&state);
    let st = c
        .status(tweed_api::v1::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(st.ready, "{st:?}");
    assert_eq!(
        (st.node.as_str(), st.subnet.as_str()),
        ("h1", "10.244.3.0/24")
    );
    let leases = c
        .list_leases(tweed_api::v1::ListLeasesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(leases.leases.len(), 1);
    assert!(leases.leases[0].own);
    let peers = c
        .list_peers(tweed_api::v1::ListPeersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(peers.peers[0].public_ip, "198.18.0.2");

    let mut stream = c
        .watch_leases(tweed_api::v1::WatchLeasesRequest {})
        .await
        .unwrap()
        .into_inner();
    // The subscription is live once the call returned.
    state.publish(LeaseEventView {
        kind: EventKind::Removed,
        lease: LeaseView {
            subnet: "10.244.4.0/24".into(),
            ..Default::default()
        },
        unix_millis: 42,
    });
    let ev = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.kind, tweed_api::v1::lease_event::Kind::Removed as i32);
    assert_eq!(ev.lease.unwrap().subnet, "10.244.4.0/24");
    drop(stream);
    stop(tx, server).await;
}

/// Issue 19: in an IPv6-only network Reserve/Unreserve act on the IPv6-only key of an IPv6
/// subnet, held by a `PublicIPv6`; IPv4 subnets and addresses are refused naming why, and the
/// wireguard key rotation is refused (no wireguard there).
#[tokio::test]
async fn grpc_reserve_and_unreserve_in_an_ipv6_only_network() {
    use std::sync::Arc;
    use tweed_agent::api::{Control, ControlNetwork, ControlSlot};
    use tweed_agent::registry::{MemRegistry, Registry};
    use tweed_api::v1::{ReserveRequest, RotateWireguardKeyRequest, UnreserveRequest};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tweedd.sock");
    let listener = tweed_agent::api::bind(&path).unwrap();
    let control = ControlSlot::default();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(tweed_agent::api::serve(
        listener,
        AgentState::new(),
        control.clone(),
        async {
            let _ = rx.await;
        },
    ));
    let mem = MemRegistry::new("/coreos.com/network");
    let net = tweed_config::NetworkConfig::parse_any(
        r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#,
    )
    .unwrap();
    let tweed_config::ParsedNetwork::Ipv6Only(net) = net else {
        panic!("not IPv6-only")
    };
    assert!(control
        .set(Control {
            registry: Arc::new(Registry::Mem(mem.clone())),
            cfg: ControlNetwork::Ipv6Only(net.ipv6),
            lease_ttl: Duration::from_secs(30),
            commands: tokio::sync::mpsc::channel(1).0,
        })
        .is_ok());
    let mut c = tweed_api::connect(&path).await.unwrap();
    let req = |subnet: &str, ip: &str| ReserveRequest {
        subnet: subnet.into(),
        public_ip: ip.into(),
    };
    for (subnet, ip, says) in [
        ("10.244.9.0/24", "fd00:198:18::7", "not an IPv6 subnet"),
        (
            "fd00:99::/64",
            "fd00:198:18::7",
            "IPv6Network fd00:10:244::/56",
        ),
        ("fd00:10:244:9::/60", "fd00:198:18::7", "/64"),
        ("fd00:10:244:9::/64", "198.18.0.77", "not an IPv6 address"),
        ("fd00:10:244:9::/64", "::", "global unicast"),
        ("fd00:10:244:9::/64", "::1", "global unicast"),
        ("fd00:10:244:9::/64", "ff02::1", "global unicast"),
        ("fd00:10:244:9::/64", "fe80::1", "global unicast"),
        ("fd00:10:244:9::/64", "::ffff:198.18.0.7", "global unicast"),
    ] {
        let e = c.reserve(req(subnet, ip)).await.unwrap_err();
        assert_eq!(
            e.code(),
            tonic::Code::InvalidArgument,
            "{subnet} {ip}: {e:?}"
        );
        assert!(e.message().contains(says), "{subnet} {ip}: {e:?}");
    }
    // The key form works too; the value is flannel's field set with PublicIP 0.0.0.0.
    let r = c
        .reserve(req("fd00:10:244:9::-64", "fd00:198:18::7"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.subnet.as_str(), r.public_ip.as_str(), r.created),
        ("fd00:10:244:9::/64", "fd00:198:18::7", true)
    );
    let key = "/coreos.com/network/subnets/fd00:10:244:9::-64";
    let reg = Registry::Mem(mem.clone());
    let stored = |reg: &Registry| {
        let snap = futures::executor::block_on(reg.list_leases()).unwrap();
        snap.leases.into_iter().find(|l| l.key == key).unwrap()
    };
    let l = stored(&reg);
    assert_eq!(l.lease_id, 0);
    assert_eq!(
        l.value,
        br#"{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198:18::7"}"#
    );
    let e = c
        .reserve(req("fd00:10:244:9::/64", "fd00:198:18::8"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists);
    assert!(e.message().contains("held by fd00:198:18::7"), "{e:?}");
    let u = c
        .unreserve(UnreserveRequest {
            subnet: "fd00:10:244:9::/64".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(u.subnet, "fd00:10:244:9::/64");
    assert!(u.lease_id != 0 && u.ttl_seconds == 30, "{u:?}");
    assert_eq!(stored(&reg).lease_id, u.lease_id);
    // Reserved again by its holder: the same value, detached from the TTL.
    let r = c
        .reserve(req("fd00:10:244:9::/64", "fd00:198:18::7"))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.created);
    assert_eq!(stored(&reg).lease_id, 0);
    // A dual-stack key already claims fd00:10:244:a::/64: no IPv6-only reservation beside it.
    mem.put_raw(
        "/coreos.com/network/subnets/10.244.10.0-24&fd00:10:244:a::-64",
        br#"{"PublicIP":"198.18.0.9","PublicIPv6":"fd00:198:18::9","BackendType":"vxlan"}"#,
    );
    let e = c
        .reserve(req("fd00:10:244:a::/64", "fd00:198:18::9"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("dual-stack key"), "{e:?}");
    assert!(
        !mem.keys()
            .iter()
            .any(|k| k.ends_with("/fd00:10:244:a::-64")),
        "{:?}",
        mem.keys()
    );
    let e = c
        .rotate_wireguard_key(RotateWireguardKeyRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("IPv6-only"), "{e:?}");
    stop(tx, server).await;
}

/// Issue 6: Reserve/Unreserve over the socket, against the in-memory registry.
#[tokio::test]
async fn grpc_reserve_and_unreserve() {
    use std::sync::Arc;
    use tweed_agent::api::{Control, ControlSlot};
    use tweed_agent::registry::{MemRegistry, Registry};
    use tweed_api::v1::{ReserveRequest, UnreserveRequest};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tweedd.sock");
    let listener = tweed_agent::api::bind(&path).unwrap();
    let control = ControlSlot::default();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(tweed_agent::api::serve(
        listener,
        AgentState::new(),
        control.clone(),
        async {
            let _ = rx.await;
        },
    ));
    let mut c = tweed_api::connect(&path).await.unwrap();
    let req = |subnet: &str, ip: &str| ReserveRequest {
        subnet: subnet.into(),
        public_ip: ip.into(),
    };
    let unreq = |subnet: &str| UnreserveRequest {
        subnet: subnet.into(),
    };
    // Before the agent has read the network config: unavailable, not a crash.
    let e = c
        .reserve(req("10.244.9.0/24", "198.18.0.77"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");

    let mem = MemRegistry::new("/coreos.com/network");
    assert!(control
        .set(Control {
            registry: Arc::new(Registry::Mem(mem.clone())),
            cfg: tweed_config::NetworkConfig::parse(r#"{"Network":"10.244.0.0/16"}"#)
                .unwrap()
                .into(),
            lease_ttl: Duration::from_secs(30),
            commands: tokio::sync::mpsc::channel(1).0,
        })
        .is_ok());
    for (subnet, ip) in [
        ("10.99.0.0/24", "198.18.0.77"),
        ("10.244.9.0/25", "198.18.0.77"),
        ("10.244.9.1/24", "198.18.0.77"),
        ("nonsense", "198.18.0.77"),
        ("10.244.9.0/24", "not-an-ip"),
    ] {
        let e = c.reserve(req(subnet, ip)).await.unwrap_err();
        assert_eq!(
            e.code(),
            tonic::Code::InvalidArgument,
            "{subnet} {ip}: {e:?}"
        );
    }
    let r = c
        .reserve(req("10.244.9.0-24", "198.18.0.77"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.subnet.as_str(), r.created), ("10.244.9.0/24", true));
    let e = c
        .reserve(req("10.244.9.0/24", "198.18.0.78"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists);
    assert!(e.message().contains("held by 198.18.0.77"), "{e:?}");
    let u = c
        .unreserve(unreq("10.244.9.0/24"))
        .await
        .unwrap()
        .into_inner();
    assert!(u.lease_id != 0 && u.ttl_seconds == 30, "{u:?}");
    // Again: it has a TTL lease now, so it is no reservation; a key nobody holds is not found.
    for (subnet, code) in [
        ("10.244.9.0/24", tonic::Code::FailedPrecondition),
        ("10.244.10.0/24", tonic::Code::NotFound),
    ] {
        let e = c.unreserve(unreq(subnet)).await.unwrap_err();
        assert_eq!(e.code(), code, "{subnet}: {e:?}");
    }
    // A dual-stack lease's key names its IPv6 half too: reserve and unreserve act on that key,
    // never writing a second, v4-only key for the same subnet.
    let dual = "/coreos.com/network/subnets/10.244.20.0-24&fd00:10:244:20::-64";
    mem.put_raw(
        dual,
        br#"{"PublicIP":"198.18.0.80","PublicIPv6":"2001:db8::80"}"#,
    );
    let u = c
        .unreserve(unreq("10.244.20.0/24"))
        .await
        .unwrap()
        .into_inner();
    assert!(u.lease_id != 0, "{u:?}");
    let r = c
        .reserve(req("10.244.20.0/24", "198.18.0.80"))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.created, "{r:?}");
    let snap = Registry::Mem(mem.clone()).list_leases().await.unwrap();
    let keys: Vec<&str> = snap
        .leases
        .iter()
        .map(|l| l.key.as_str())
        .filter(|k| k.contains("10.244.20.0"))
        .collect();
    assert_eq!(keys, vec![dual]);
    assert_eq!(
        snap.leases.iter().find(|l| l.key == dual).unwrap().lease_id,
        0,
        "reserved again"
    );
    let _ = tx.send(());
    server.await.unwrap().unwrap();
}

/// wireguard `Mode: separate` (kernel path): a peer has an entry on `tweed-wg` and one on
/// `tweed-wg-v6`. The peer list gives the IPv4 entry's figures as before, with its device,
/// and the IPv6 entry's under `v6_entry`; `/readyz` names the stale IPv6 entry with its
/// device, and stays ready.
#[tokio::test]
async fn wireguard_figures_of_both_devices_in_the_peer_list_and_readyz() {
    use tweed_agent::state::WgPeerView;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tweedd.sock");
    let state = AgentState::new();
    ready(&state);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    state.update(|s| {
        s.wg_peers = vec![
            WgPeerView {
                device: "tweed-wg".into(),
                subnet: "10.244.4.0/24".into(),
                lease_subnet: "10.244.4.0/24".into(),
                public_key: "K4".into(),
                handshake_unix_ms: Some(now - 7_000),
                since_unix_ms: now - 600_000,
                tx_bytes: 11,
                rx_bytes: 12,
            },
            WgPeerView {
                device: "tweed-wg-v6".into(),
                subnet: "fd00:10:244:4::/64".into(),
                lease_subnet: "10.244.4.0/24".into(),
                public_key: "K6".into(),
                handshake_unix_ms: None,
                since_unix_ms: now - 600_000,
                tx_bytes: 21,
                rx_bytes: 22,
            },
        ]
    });

    let listener = tweed_agent::api::bind(&path).unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(tweed_agent::api::serve(
        listener,
        state.clone(),
        Default::default(),
        async {
            let _ = rx.await;
        },
    ));
    let mut c = tweed_api::connect(&path).await.unwrap();
    let peers = c
        .list_peers(tweed_api::v1::ListPeersRequest {})
        .await
        .unwrap()
        .into_inner()
        .peers;
    assert_eq!(
        peers.len(),
        1,
        "one row per lease, not per device: {peers:?}"
    );
    let p = &peers[0];
    assert_eq!(
        (
            p.public_key.as_str(),
            p.device.as_str(),
            p.tx_bytes,
            p.rx_bytes
        ),
        ("K4", "tweed-wg", 11, 12)
    );
    assert!((7..=9).contains(&p.handshake_age_seconds), "{p:?}");
    let v6 = p.v6_entry.as_ref().expect("the tweed-wg-v6 entry");
    assert_eq!(
        (
            v6.device.as_str(),
            v6.subnet.as_str(),
            v6.public_key.as_str(),
            v6.handshake_age_seconds,
            v6.tx_bytes,
            v6.rx_bytes
        ),
        ("tweed-wg-v6", "fd00:10:244:4::/64", "K6", -1, 21, 22)
    );
    stop(tx, server).await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(tweed_agent::http::serve(listener, state.clone(), async {
        let _ = rx.await;
    }));
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(json_body(&body)).unwrap();
    assert_eq!(
        v["stale_peers"],
        serde_json::json!([
            "wireguard peer fd00:10:244:4::/64 (K6) on tweed-wg-v6: no handshake in the 600 s since it was added"
        ])
    );
    stop(tx, server).await;
}
