//! Root-only: `Mode: separate` on the userspace path with the agent's backend objects, two
//! nodes in namespaces of their own (deleted by guards, even on panic) joined by a veth pair
//! with IPv4 and IPv6 addresses. Each runs `tweed-wg` and the second userspace device
//! `tweed-wg-v6` (its workers are threads started in the node's namespace, stopped when the
//! backend drops).

use std::net::Ipv6Addr;

use tweed_agent::backend::wireguard::dual::{DualPeer, WgPeer6, DEVICE_V6};
use tweed_agent::backend::wireguard::{PrivateKey, WgBackend, WgConfig, WgDual, WgImpl, WgPeer};
use tweed_agent::netlink::Netlink;
use tweed_testkit::{ip_in, probe_in, require_root, NetnsGuard};

const NEEDS_ROOT: &str = "network namespaces and TUN devices";

const NET: &str = r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:5::/56","Backend":{"Type":"wireguard"}}"#;

fn public6(n: u8) -> Ipv6Addr {
    format!("2001:db8::{n}").parse().unwrap()
}

fn cfg(own: u8, key: PrivateKey, own6: bool) -> WgConfig {
    let net = tweed_config::NetworkConfig::parse(NET).unwrap();
    WgConfig {
        network: "10.5.0.0/16".parse().unwrap(),
        own_subnet: format!("10.5.{own}.0/24").parse().unwrap(),
        local_ip: [192, 0, 2, own].into(),
        public_ip: [192, 0, 2, own].into(),
        listen_port: 51820,
        underlay_mtu: 1500,
        mtu_base: 0,
        psk: None,
        keepalive: 0,
        key_path: "/nonexistent/wgkey".into(),
        private_key: key,
        implementation: WgImpl::Userspace,
        queues: 2,
        dual: Some(Box::new(WgDual {
            mode: tweed_config::WireguardMode::Separate,
            listen_port_v6: 51821,
            ipv6: net.ipv6.unwrap(),
            public_ipv6: public6(own),
            own_subnet: own6.then(|| format!("fd00:5:0:{own}::/64").parse().unwrap()),
        })),
    }
}

/// Node `n`'s lease as the other node reads it: its IPv4 half at `192.0.2.n:51820`, its IPv6
/// half at `[2001:db8::n]:51821`, both under `key`'s public half.
fn lease(n: u8, key: &PrivateKey) -> DualPeer {
    DualPeer {
        v4: WgPeer {
            subnet: format!("10.5.{n}.0/24").parse().unwrap(),
            public_ip: [192, 0, 2, n].into(),
            public_key: key.public(),
            port: 51820,
        },
        v6: Ok(WgPeer6 {
            subnet: format!("fd00:5:0:{n}::/64").parse().unwrap(),
            public_ipv6: public6(n),
            public_key: key.public(),
            port: 51821,
        }),
    }
}

/// Runs `f` on a current-thread runtime in `ns`, with a real netlink handle opened there.
fn in_node<T, F>(ns: &NetnsGuard, f: impl FnOnce(Netlink) -> F + Send + 'static) -> T
where
    T: Send + 'static,
    F: std::future::Future<Output = T>,
{
    ns.enter(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move { f(Netlink::real().unwrap()).await })
    })
}

/// Reconciles `b` in `ns` against `peers`; the backend back and the ops the pass applied.
fn reconcile(ns: &NetnsGuard, mut b: WgBackend, peers: Vec<DualPeer>) -> (WgBackend, usize) {
    in_node(ns, move |nl| async move {
        let n = b.reconcile_dual(&nl, &peers).await.unwrap().ops_applied;
        (b, n)
    })
}

fn ping6(ns: &NetnsGuard, dst: &str) -> (bool, String) {
    probe_in(ns.name(), &["ping", "-6", "-c", "2", "-W", "2", dst])
}

#[test]
fn userspace_separate_runs_ipv6_on_its_own_device_rotates_keys_and_removes_it() {
    require_root!(NEEDS_ROOT);
    assert!(
        std::path::Path::new("/dev/net/tun").exists(),
        "/dev/net/tun is missing: the userspace path needs the tun device"
    );
    let a = NetnsGuard::unique("tw-wsa-");
    let b = NetnsGuard::unique("tw-wsb-");
    ip_in(
        a.name(),
        &[
            "link",
            "add",
            "ua",
            "type",
            "veth",
            "peer",
            "name",
            "ub",
            "netns",
            b.name(),
        ],
    );
    for (ns, dev, n) in [(&a, "ua", 2), (&b, "ub", 3)] {
        ip_in(
            ns.name(),
            &["addr", "add", &format!("192.0.2.{n}/24"), "dev", dev],
        );
        ip_in(
            ns.name(),
            &[
                "-6",
                "addr",
                "add",
                &format!("2001:db8::{n}/64"),
                "dev",
                dev,
                "nodad",
            ],
        );
        ip_in(ns.name(), &["link", "set", dev, "up"]);
        ip_in(ns.name(), &["link", "set", "lo", "up"]);
    }
    let (ka, kb) = (
        PrivateKey::from_bytes([2; 32]),
        PrivateKey::from_bytes([3; 32]),
    );

    let setup = |ns: &NetnsGuard, c: WgConfig| {
        in_node(ns, move |nl| async move {
            let b = WgBackend::setup(&nl, c).await.unwrap();
            let ops = b.setup_ops().len();
            (b, ops)
        })
    };
    let (ua, _) = setup(&a, cfg(2, ka.clone(), true));
    let (ub, _) = setup(&b, cfg(3, kb.clone(), true));
    let (ua, _) = reconcile(&a, ua, vec![lease(3, &kb)]);
    let (ub, _) = reconcile(&b, ub, vec![lease(2, &ka)]);
    assert_eq!(ua.implementation(), "userspace");
    let idx6 = ua.ifindex_v6().expect("tweed-wg-v6 runs");
    assert_ne!(Some(idx6), Some(ua.ifindex()));

    // The IPv6 device: a TUN device, the /128 and the IPv6Network route; tweed-wg IPv4 only.
    let link = ip_in(a.name(), &["-d", "link", "show", DEVICE_V6]);
    assert!(link.contains("tun") && link.contains("mtu 1420"), "{link}");
    let addr = ip_in(a.name(), &["-6", "addr", "show", "dev", DEVICE_V6]);
    assert!(addr.contains("fd00:5:0:2::/128"), "{addr}");
    let v4 = ip_in(a.name(), &["-4", "addr", "show", "dev", DEVICE_V6]);
    assert!(!v4.contains("inet"), "{v4}");
    let routes = ip_in(a.name(), &["-6", "route", "show", "dev", DEVICE_V6]);
    assert!(routes.contains("fd00:5::/56"), "{routes}");
    let routes = ip_in(a.name(), &["-6", "route", "show", "dev", "tweed-wg"]);
    assert!(!routes.contains("fd00:5::/56"), "{routes}");

    // Both families through their own devices; the IPv6 datagrams are the IPv6 device's.
    let (ok, out) = ping6(&a, "fd00:5:0:3::");
    assert!(ok, "ping6 over tweed-wg-v6: {out}");
    let (ok, out) = probe_in(a.name(), &["ping", "-c", "2", "-W", "2", "10.5.3.0"]);
    assert!(ok, "ping over tweed-wg: {out}");
    let s6 = ub.stats_v6().expect("the IPv6 device's workers");
    assert!(s6.rx_datagrams >= 2 && s6.tx_datagrams >= 2, "{s6:?}");
    // Per-peer figures of both devices: the tweed-wg-v6 entry at the IPv6 endpoint, its IPv6
    // subnet, listed under the peer's lease, with its own handshake and bytes.
    let st = ua.peer_stats();
    assert_eq!(st.len(), 2, "{st:?}");
    let e6 = st
        .iter()
        .find(|s| s.device == DEVICE_V6)
        .expect("the tweed-wg-v6 entry");
    assert_eq!(
        (e6.endpoint, e6.subnet, e6.lease_subnet),
        (
            Some("[2001:db8::3]:51821".parse().unwrap()),
            Some("fd00:5:0:3::/64".parse().unwrap()),
            Some("10.5.3.0/24".parse().unwrap())
        )
    );
    assert!(
        e6.last_handshake.is_some() && e6.tx_bytes > 0 && e6.rx_bytes > 0,
        "{e6:?}"
    );
    let e4 = st
        .iter()
        .find(|s| s.device == "tweed-wg")
        .expect("tweed-wg");
    assert_eq!(e4.endpoint, Some("192.0.2.3:51820".parse().unwrap()));
    assert!(e4.last_handshake.is_some(), "{e4:?}");
    eprintln!("userspace separate: tweed-wg-v6 entry {e6:?}");
    // A second pass writes nothing.
    let (ua, n) = reconcile(&a, ua, vec![lease(3, &kb)]);
    assert_eq!(n, 0);
    // A restart re-attaches both TUN devices: nothing to write, and IPv6 runs again.
    drop(ua);
    let (ua, ops) = setup(&a, cfg(2, ka.clone(), true));
    assert_eq!(ops, 0, "a restart on devices that are right writes nothing");
    assert_eq!(ua.ifindex_v6(), Some(idx6), "the same tweed-wg-v6");
    let (ua, _) = reconcile(&a, ua, vec![lease(3, &kb)]);
    let (ok, out) = ping6(&a, "fd00:5:0:3::");
    assert!(ok, "ping6 after A's restart: {out}");

    // A's key rotates: both its devices take the new key at the next pass. Until B reads the
    // new lease, A's handshakes are refused by B's IPv6 device and counted there.
    let ka2 = PrivateKey::from_bytes([22; 32]);
    let mut ua = ua;
    // Read before the pass: the new table sends its handshake initiations at once.
    let refused_before = ub.stats_v6().unwrap().drop_unauthenticated;
    ua.set_private_key(ka2.clone());
    let (ua, n) = reconcile(&a, ua, vec![lease(3, &kb)]);
    assert!(n >= 2, "both devices rotate: {n} ops");
    let (ok, _) = ping6(&a, "fd00:5:0:3::");
    assert!(!ok, "B still knows A's old key only");
    let refused = ub.stats_v6().unwrap().drop_unauthenticated;
    assert!(refused > refused_before, "{refused} {refused_before}");
    assert!(ub.stats().drop_unauthenticated >= refused);
    let (ub, _) = reconcile(&b, ub, vec![lease(2, &ka2)]);
    let (ok, out) = ping6(&a, "fd00:5:0:3::");
    assert!(ok, "ping6 after the rotation: {out}");

    // A's lease loses its IPv6 half: its IPv6 device goes at the next pass, workers and link;
    // IPv4 keeps running.
    let mut ua = ua;
    ua.set_own_subnet_v6(None);
    let (ua, n) = reconcile(&a, ua, vec![lease(3, &kb)]);
    assert!(n >= 1);
    assert_eq!(ua.ifindex_v6(), None);
    let links = ip_in(a.name(), &["-o", "link", "show"]);
    assert!(!links.contains(DEVICE_V6), "{links}");
    let (ok, out) = probe_in(a.name(), &["ping", "-c", "2", "-W", "2", "10.5.3.0"]);
    assert!(ok, "IPv4 after the IPv6 device went: {out}");
    drop((ua, ub));
}
