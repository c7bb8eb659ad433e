//! Root-only: `Mode: ipv6` on the userspace path with the agent's backend objects, two nodes
//! in namespaces of their own (deleted by guards, even on panic) joined by a veth pair with
//! IPv4 and IPv6 addresses. Each runs one userspace device `tweed-wg` carrying both families,
//! its socket IPv6 only on `ListenPort`, every peer at `[PublicIPv6]:Port` (its workers are
//! threads started in the node's namespace, stopped when the backend drops).

use std::net::Ipv6Addr;

use tweed_agent::backend::wireguard::dual::{DualLocal, DualPeer, DEVICE_V6};
use tweed_agent::backend::wireguard::{PrivateKey, WgBackend, WgConfig, WgDual, WgImpl, DEVICE};
use tweed_agent::backend::{v6, DataPlane};
use tweed_agent::netlink::Netlink;
use tweed_testkit::{in_ns, ip_in, probe_in, require_root, NetnsGuard};

const NEEDS_ROOT: &str = "network namespaces and TUN devices";

const NET: &str = r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:5::/56","Backend":{"Type":"wireguard","Mode":"ipv6"}}"#;

fn public6(n: u8) -> Ipv6Addr {
    format!("2001:db8::{n}").parse().unwrap()
}

fn cfg(own: u8, key: PrivateKey) -> WgConfig {
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
            mode: tweed_config::WireguardMode::Ipv6,
            listen_port_v6: 51821,
            ipv6: net.ipv6.unwrap(),
            public_ipv6: public6(own),
            own_subnet: Some(format!("fd00:5:0:{own}::/64").parse().unwrap()),
        })),
    }
}

/// Node `n`'s lease as it publishes it while its IPv6 half is gone (`PublicIPv6` still in
/// it, no IPv6 subnet in the key), read for a node planning with `local`.
fn lease_v4(n: u8, key: &PrivateKey, local: &DualLocal) -> DualPeer {
    let c = cfg(n, key.clone());
    let attrs = tweed_config::LeaseAttrs::parse(c.lease_attrs().to_json().as_bytes()).unwrap();
    let d = c.dual.as_ref().unwrap();
    let key = tweed_config::SubnetKey {
        ipv4: c.own_subnet,
        ipv6: None,
    };
    DualPeer::from_lease(&key, &attrs, Some(&d.ipv6), local).unwrap()
}

/// Node `n`'s lease as it publishes it (`BackendData` and `BackendV6Data`, both
/// `Port` 51820), read by `reader` as the agent reads any lease.
fn lease(n: u8, key: &PrivateKey, reader: &WgBackend) -> DualPeer {
    let c = cfg(n, key.clone());
    let json = c.lease_attrs().to_json();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["BackendData"], v["BackendV6Data"], "{json}");
    assert_eq!(v["BackendData"]["Port"], 51820, "{json}");
    let attrs = tweed_config::LeaseAttrs::parse(json.as_bytes()).unwrap();
    let d = c.dual.as_ref().unwrap();
    let key = tweed_config::SubnetKey {
        ipv4: c.own_subnet,
        ipv6: d.own_subnet,
    };
    DualPeer::from_lease(&key, &attrs, Some(&d.ipv6), &reader.dual_local().unwrap()).unwrap()
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

/// Sets node `own` up as the agent does: the backend, then the IPv6 plane's /128 and
/// `IPv6Network` route on `tweed-wg`. The backend and the netlink ops both applied.
fn setup(ns: &NetnsGuard, own: u8, key: &PrivateKey) -> (WgBackend, usize) {
    let c = cfg(own, key.clone());
    in_node(ns, move |nl| async move {
        let d = c.dual.clone().unwrap();
        let b = WgBackend::setup(&nl, c).await.unwrap();
        assert_eq!(b.implementation(), "userspace");
        assert!(b.carries_v6() && b.ifindex_v6().is_none());
        let mut ops = b.setup_ops().len();
        let dp = DataPlane::Wireguard(b);
        let params = v6::V6Params {
            cfg: d.ipv6.clone(),
            own_subnet: d.own_subnet.unwrap(),
            public_ipv6: d.public_ipv6,
        };
        let plane6 = v6::V6Plane::setup(&nl, params, &dp)
            .await
            .unwrap()
            .expect("tweed-wg carries IPv6 in Mode ipv6");
        ops += plane6.setup_ops().len();
        let DataPlane::Wireguard(b) = dp else {
            unreachable!()
        };
        (b, ops)
    })
}

/// Sets node `own` up while its lease has no IPv6 half (a re-setup then): the backend only,
/// nothing for the IPv6 plane to do.
fn setup_without_half(ns: &NetnsGuard, own: u8, key: &PrivateKey) -> WgBackend {
    let mut c = cfg(own, key.clone());
    c.dual.as_mut().unwrap().own_subnet = None;
    in_node(ns, move |nl| async move {
        let b = WgBackend::setup(&nl, c).await.unwrap();
        assert!(!b.carries_v6() && b.dual_local().is_none());
        b
    })
}

/// Our lease lost its IPv6 half at run time, as the agent follows it: the backend is told, the
/// next programming reconciles the peers (as the leases read now), and the IPv6 plane takes its
/// address and route off `tweed-wg` (`Plane::setup_v6` -> `clear_wireguard6`).
fn lose_half(ns: &NetnsGuard, mut b: WgBackend, peers: Vec<DualPeer>) -> WgBackend {
    in_node(ns, move |nl| async move {
        b.set_own_subnet_v6(None);
        let s = b.reconcile_dual(&nl, &peers).await.unwrap();
        assert!(s.skipped.is_empty(), "{:?}", s.skipped);
        v6::remove_wireguard6(&nl, b.ifindex()).await.unwrap();
        b
    })
}

/// Our lease has its IPv6 half again: the backend first, then the IPv6 plane set up again on
/// `tweed-wg` (the agent's order: `reconcile_v4`, then `setup_v6`).
fn regain_half(ns: &NetnsGuard, mut b: WgBackend, own: u8, peers: Vec<DualPeer>) -> WgBackend {
    let d = cfg(own, PrivateKey::from_bytes([0; 32])).dual.unwrap();
    in_node(ns, move |nl| async move {
        b.set_own_subnet_v6(d.own_subnet);
        let s = b.reconcile_dual(&nl, &peers).await.unwrap();
        assert!(s.skipped.is_empty(), "{:?}", s.skipped);
        let dp = DataPlane::Wireguard(b);
        let params = v6::V6Params {
            cfg: d.ipv6.clone(),
            own_subnet: d.own_subnet.unwrap(),
            public_ipv6: d.public_ipv6,
        };
        v6::V6Plane::setup(&nl, params, &dp)
            .await
            .unwrap()
            .expect("tweed-wg carries IPv6 again");
        let DataPlane::Wireguard(b) = dp else {
            unreachable!()
        };
        b
    })
}

/// The UDP sockets on 51820 in `ns`, as `ss` lists their local addresses.
fn sockets(ns: &NetnsGuard) -> String {
    in_ns(ns.name(), &["ss", "-Huln", "sport", "=", ":51820"])
}

/// Reconciles `b` in `ns` against `peers`; the backend back and the ops the pass applied.
fn reconcile(ns: &NetnsGuard, mut b: WgBackend, peers: Vec<DualPeer>) -> (WgBackend, usize) {
    in_node(ns, move |nl| async move {
        let s = b.reconcile_dual(&nl, &peers).await.unwrap();
        assert!(s.skipped.is_empty(), "{:?}", s.skipped);
        (b, s.ops_applied)
    })
}

fn ping(ns: &NetnsGuard, dst: &str) -> (bool, String) {
    probe_in(ns.name(), &["ping", "-c", "2", "-W", "2", dst])
}

#[test]
fn userspace_ipv6_mode_carries_both_families_over_the_ipv6_underlay_on_one_device() {
    require_root!(NEEDS_ROOT);
    assert!(
        std::path::Path::new("/dev/net/tun").exists(),
        "/dev/net/tun is missing: the userspace path needs the tun device"
    );
    let a = NetnsGuard::unique("tw-wu6a-");
    let b = NetnsGuard::unique("tw-wu6b-");
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
    let (ua, setup_a) = setup(&a, 2, &ka);
    let (ub, _) = setup(&b, 3, &kb);
    assert!(setup_a > 0);
    let la = lease(3, &kb, &ua);
    let (ua, first) = reconcile(&a, ua, vec![la.clone()]);
    assert!(first > 0);
    let lb = lease(2, &ka, &ub);
    let (ub, _) = reconcile(&b, ub, vec![lb.clone()]);

    // One TUN device with both families' addresses and routes; no second device; the socket
    // IPv6 only on ListenPort, no IPv4 one.
    let links = ip_in(a.name(), &["-o", "link", "show"]);
    assert!(!links.contains(DEVICE_V6), "{links}");
    let link = ip_in(a.name(), &["-d", "link", "show", DEVICE]);
    assert!(link.contains("tun") && link.contains("mtu 1420"), "{link}");
    let addr = ip_in(a.name(), &["addr", "show", "dev", DEVICE]);
    assert!(
        addr.contains("10.5.2.0/32") && addr.contains("fd00:5:0:2::/128"),
        "{addr}"
    );
    let r4 = ip_in(a.name(), &["-4", "route", "show", "dev", DEVICE]);
    let r6 = ip_in(a.name(), &["-6", "route", "show", "dev", DEVICE]);
    assert!(
        r4.contains("10.5.0.0/16") && r6.contains("fd00:5::/56"),
        "{r4}\n{r6}"
    );
    let socks = in_ns(a.name(), &["ss", "-Huln"]);
    assert!(socks.contains("[::]:51820"), "{socks}");
    assert!(
        !socks.contains("192.0.2.2:51820") && !socks.contains("0.0.0.0:51820"),
        "an IPv4 wireguard socket: {socks}"
    );

    // Only the IPv6 underlay is left between the nodes: both families still pass, both ways.
    for (ns, dev) in [(&a, "ua"), (&b, "ub")] {
        ip_in(ns.name(), &["-4", "addr", "flush", "dev", dev]);
    }
    for (ns, dst) in [
        (&a, "10.5.3.0"),
        (&a, "fd00:5:0:3::"),
        (&b, "10.5.2.0"),
        (&b, "fd00:5:0:2::"),
    ] {
        let (ok, out) = ping(ns, dst);
        assert!(ok, "Mode ipv6 over the IPv6 underlay, {dst}: {out}");
    }
    let s = ub.stats();
    assert!(s.rx_datagrams >= 8 && s.tx_datagrams >= 8, "{s:?}");
    // The figures: one entry per peer, on tweed-wg, at the IPv6 endpoint, with a handshake.
    let st = ua.peer_stats();
    assert_eq!(st.len(), 1, "{st:?}");
    let p = &st[0];
    assert_eq!(
        (p.device, p.endpoint, p.lease_subnet),
        (
            DEVICE,
            Some("[2001:db8::3]:51820".parse().unwrap()),
            Some("10.5.3.0/24".parse().unwrap())
        )
    );
    assert!(
        p.last_handshake.is_some() && p.tx_bytes > 0 && p.rx_bytes > 0,
        "{p:?}"
    );
    eprintln!("userspace ipv6 mode: ping and ping6 with no IPv4 underlay; {p:?}");

    // A second pass writes nothing.
    let (ua, n) = reconcile(&a, ua, vec![la.clone()]);
    assert_eq!(n, 0);
    // A restart re-attaches the TUN device: nothing to write (backend and IPv6 plane), and
    // both families run again.
    drop(ua);
    let (ua, ops) = setup(&a, 2, &ka);
    assert_eq!(ops, 0, "a restart on a device that is right writes nothing");
    let (ua, _) = reconcile(&a, ua, vec![la]);
    for dst in ["10.5.3.0", "fd00:5:0:3::"] {
        let (ok, out) = ping(&a, dst);
        assert!(ok, "after A's restart, {dst}: {out}");
    }
    drop((ua, ub));
}

/// The userspace sockets follow the planned endpoints' family at run time, with no restart
/// (issue 18, left by the first `Mode: ipv6` round): both nodes' leases lose their IPv6 half
/// (so each plans the other at its IPv4 endpoint) and get it back (IPv6 endpoints), twice.
/// Each time `tweed-wg`'s workers start again on sockets of the planned family, keeping the
/// key, and the peer answers through the tunnel. In the second round A is also set up again
/// while the half is gone (its sockets IPv4, its device without IPv6), and the half coming
/// back still brings IPv6 sockets and ping6.
#[test]
fn userspace_ipv6_mode_sockets_follow_our_ipv6_half_without_a_restart() {
    require_root!(NEEDS_ROOT);
    assert!(
        std::path::Path::new("/dev/net/tun").exists(),
        "/dev/net/tun is missing: the userspace path needs the tun device"
    );
    let a = NetnsGuard::unique("tw-wf6a-");
    let b = NetnsGuard::unique("tw-wf6b-");
    ip_in(
        a.name(),
        &[
            "link",
            "add",
            "fa",
            "type",
            "veth",
            "peer",
            "name",
            "fb",
            "netns",
            b.name(),
        ],
    );
    for (ns, dev, n) in [(&a, "fa", 2), (&b, "fb", 3)] {
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
        PrivateKey::from_bytes([4; 32]),
        PrivateKey::from_bytes([5; 32]),
    );
    let (ua, _) = setup(&a, 2, &ka);
    let (ub, _) = setup(&b, 3, &kb);
    let (local_a, local_b) = (ua.dual_local().unwrap(), ub.dual_local().unwrap());
    let (la, lb) = (lease(3, &kb, &ua), lease(2, &ka, &ub));
    let (la4, lb4) = (lease_v4(3, &kb, &local_a), lease_v4(2, &ka, &local_b));
    let (mut ua, _) = reconcile(&a, ua, vec![la.clone()]);
    let (mut ub, _) = reconcile(&b, ub, vec![lb.clone()]);
    let key_a = ua.public_key();
    let both_ways = |what: &str, dsts: &[(&NetnsGuard, &str)]| {
        for (ns, dst) in dsts {
            let (ok, out) = ping(ns, dst);
            assert!(ok, "{what}, {} -> {dst}: {out}", ns.name());
        }
    };
    let v4 = [(&a, "10.5.3.0"), (&b, "10.5.2.0")];
    let v6 = [(&a, "fd00:5:0:3::"), (&b, "fd00:5:0:2::")];
    both_ways("with the IPv6 half", &v4);
    both_ways("with the IPv6 half", &v6);
    let endpoint = |b: &WgBackend| b.peer_stats()[0].endpoint.unwrap().to_string();
    for round in 0..2 {
        ua = lose_half(&a, ua, vec![la4.clone()]);
        ub = lose_half(&b, ub, vec![lb4.clone()]);
        if round == 1 {
            // (b): a re-setup while the half is gone.
            drop(ua);
            let fresh = setup_without_half(&a, 2, &ka);
            (ua, _) = reconcile(&a, fresh, vec![la4.clone()]);
        }
        // The peers first: reachable is what counts; the sockets say why.
        both_ways(&format!("round {round}, the half gone"), &v4);
        let socks = sockets(&a);
        assert!(
            socks.contains("192.0.2.2:51820") && !socks.contains("[::]:51820"),
            "round {round}, the half gone: IPv4 sockets only: {socks}"
        );
        assert_eq!(endpoint(&ua), "192.0.2.3:51820", "round {round}");
        assert_eq!(endpoint(&ub), "192.0.2.2:51820", "round {round}");

        ua = regain_half(&a, ua, 2, vec![la.clone()]);
        ub = regain_half(&b, ub, 3, vec![lb.clone()]);
        let socks = sockets(&a);
        assert!(
            socks.contains("[::]:51820") && !socks.contains("192.0.2.2:51820"),
            "round {round}, the half back: IPv6 sockets only: {socks}"
        );
        assert_eq!(endpoint(&ua), "[2001:db8::3]:51820", "round {round}");
        assert_eq!(endpoint(&ub), "[2001:db8::2]:51820", "round {round}");
        both_ways(&format!("round {round}, the half back"), &v4);
        both_ways(&format!("round {round}, the half back"), &v6);
        assert_eq!(ua.public_key(), key_a, "the key is kept");
        let p = &ua.peer_stats()[0];
        assert!(p.last_handshake.is_some() && p.rx_bytes > 0, "{p:?}");
        eprintln!("round {round}: the half gone and back, ping and ping6 answered; {p:?}");
    }
    // With the half back and nothing changed, a pass writes nothing and starts nothing.
    let (ua, n) = reconcile(&a, ua, vec![la]);
    assert_eq!(n, 0);
    drop((ua, ub));
}
