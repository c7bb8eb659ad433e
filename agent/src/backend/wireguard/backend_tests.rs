//! The backend's whole lease-event flow on the kernel path, without root: the fake netlink
//! kernel (which has or lacks the wireguard module) holds the link, the fake generic netlink
//! device holds keys and peers, and every assertion reads them back from there.

use super::kernel::FakeGenl;
use super::*;
use crate::netlink::{Fake, Netlink, Op};

fn cfg(implementation: WgImpl) -> WgConfig {
    WgConfig {
        network: "10.5.0.0/16".parse().unwrap(),
        own_subnet: "10.5.1.0/24".parse().unwrap(),
        local_ip: Ipv4Addr::new(192, 168, 9, 1),
        public_ip: Ipv4Addr::new(192, 168, 9, 1),
        listen_port: 51820,
        underlay_mtu: 1500,
        mtu_base: 0,
        psk: None,
        keepalive: 0,
        key_path: PathBuf::from("/nonexistent/wgkey"),
        private_key: PrivateKey::from_bytes([1; 32]),
        implementation,
        queues: 1,
        dual: None,
    }
}

fn peer(n: u8, key: u8, ip: [u8; 4]) -> WgPeer {
    WgPeer {
        subnet: format!("10.5.{n}.0/24").parse().unwrap(),
        public_ip: ip.into(),
        public_key: PrivateKey::from_bytes([key; 32]).public(),
        port: 51820,
    }
}

type Shared = Arc<Mutex<FakeGenl>>;

fn opener(g: &Shared) -> GenlOpener {
    let g = g.clone();
    Box::new(move || Ok(Box::new(g) as Box<dyn kernel::WgGenl + Send>))
}

fn lock(g: &Shared) -> std::sync::MutexGuard<'_, FakeGenl> {
    g.lock().unwrap()
}

/// The kernel device's peers as (key, endpoint, allowed IPs), by allowed IPs.
fn peers_of(g: &Shared) -> Vec<(PublicKey, String, Vec<String>)> {
    let mut v: Vec<(PublicKey, String, Vec<String>)> = lock(g)
        .peers
        .iter()
        .map(|p| {
            (
                PublicKey(p.public_key),
                p.endpoint.map(|e| e.to_string()).unwrap_or_default(),
                p.allowed
                    .iter()
                    .map(|(ip, c)| format!("{ip}/{c}"))
                    .collect(),
            )
        })
        .collect();
    v.sort_by(|a, b| a.2.cmp(&b.2));
    v
}

async fn kernel_backend(nl: &Netlink, g: &Shared, wanted: WgImpl) -> WgBackend {
    WgBackend::setup_with(nl, cfg(wanted), opener(g))
        .await
        .expect("set up on a kernel with the module")
}

#[tokio::test]
async fn auto_takes_the_kernel_and_configures_the_link_like_the_userspace_device() {
    let fake = Fake::with_wireguard();
    let nl = Netlink::from(fake.clone());
    let g: Shared = Arc::new(Mutex::new(FakeGenl::new(DEVICE)));
    let b = kernel_backend(&nl, &g, WgImpl::Auto).await;
    assert_eq!(b.implementation(), "kernel");
    let link = nl
        .link_by_name(DEVICE)
        .await
        .unwrap()
        .expect("device created");
    assert_eq!(link.kind.as_deref(), Some("wireguard"));
    assert_eq!((link.mtu, link.up), (1420, true));
    assert_eq!(b.ifindex(), link.index);
    let addrs: Vec<String> = nl
        .addresses(Some(link.index))
        .await
        .unwrap()
        .iter()
        .map(|a| a.net.to_string())
        .collect();
    assert_eq!(addrs, ["10.5.1.0/32"]);
    let routes: Vec<String> = nl
        .all_routes()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.oif == Some(link.index))
        .map(|r| r.dst.to_string())
        .collect();
    assert_eq!(routes, ["10.5.0.0/16"]);
    // The probe's throw-away link is gone.
    assert!(no_probe_link_left(&nl).await);
    // Nothing was written to the device before the first reconcile.
    assert_eq!(lock(&g).writes, 0);
}

#[tokio::test]
async fn lease_events_reach_the_kernel_device_and_an_unchanged_set_writes_nothing() {
    let fake = Fake::with_wireguard();
    let nl = Netlink::from(fake.clone());
    let g: Shared = Arc::new(Mutex::new(FakeGenl::new(DEVICE)));
    let mut b = kernel_backend(&nl, &g, WgImpl::Kernel).await;
    let (a, c) = (peer(2, 2, [192, 168, 9, 2]), peer(3, 3, [192, 168, 9, 3]));

    // Two peers added: the device key and port, then one message per peer.
    let s = b.reconcile(&nl, &[a, c]).await.unwrap();
    assert_eq!((s.ops_applied, lock(&g).writes), (3, 3));
    // Stored clamped, as the kernel stores it.
    let ours = kernel::clamp(*cfg(WgImpl::Kernel).private_key.bytes());
    assert_eq!(lock(&g).private_key, Some(ours));
    assert_eq!(lock(&g).listen_port, 51820);
    assert_eq!(
        peers_of(&g),
        vec![
            (
                a.public_key,
                "192.168.9.2:51820".into(),
                vec!["10.5.2.0/24".into()]
            ),
            (
                c.public_key,
                "192.168.9.3:51820".into(),
                vec!["10.5.3.0/24".into()]
            ),
        ]
    );
    // The same leases again: zero writes, on either side.
    let log = fake.ops().len();
    let s = b.reconcile(&nl, &[a, c]).await.unwrap();
    assert_eq!(
        (s.ops_applied, lock(&g).writes, fake.ops().len()),
        (0, 3, log)
    );

    // A lease whose PublicIP moved: that peer alone is rewritten.
    let a2 = peer(2, 2, [192, 168, 9, 22]);
    let s = b.reconcile(&nl, &[a2, c]).await.unwrap();
    assert_eq!((s.ops_applied, lock(&g).writes), (1, 4));
    assert_eq!(peers_of(&g)[0].1, "192.168.9.22:51820");

    // A peer's key rotated (new key in its lease): the old entry goes, the new one comes.
    let c2 = peer(3, 33, [192, 168, 9, 3]);
    b.reconcile(&nl, &[a2, c2]).await.unwrap();
    let keys: Vec<PublicKey> = peers_of(&g).into_iter().map(|p| p.0).collect();
    assert_eq!(keys, vec![a2.public_key, c2.public_key]);

    // Our own key rotated: one device write, the peers untouched.
    let before = lock(&g).writes;
    b.set_private_key(PrivateKey::from_bytes([9; 32]));
    let s = b.reconcile(&nl, &[a2, c2]).await.unwrap();
    assert_eq!((s.ops_applied, lock(&g).writes), (1, before + 1));
    assert_eq!(lock(&g).private_key, Some(kernel::clamp([9; 32])));

    // A peer's lease removed.
    b.reconcile(&nl, &[c2]).await.unwrap();
    let keys: Vec<PublicKey> = peers_of(&g).into_iter().map(|p| p.0).collect();
    assert_eq!(keys, vec![c2.public_key]);
    let writes = lock(&g).writes;
    b.reconcile(&nl, &[c2]).await.unwrap();
    assert_eq!(lock(&g).writes, writes);
}

#[tokio::test]
async fn a_roamed_endpoint_is_set_back_and_the_figures_come_from_the_read_back() {
    let fake = Fake::with_wireguard();
    let nl = Netlink::from(fake.clone());
    let g: Shared = Arc::new(Mutex::new(FakeGenl::new(DEVICE)));
    let mut b = kernel_backend(&nl, &g, WgImpl::Kernel).await;
    let a = peer(2, 2, [192, 168, 9, 2]);
    b.reconcile(&nl, std::slice::from_ref(&a)).await.unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    {
        // What the kernel does on its own: a handshake, traffic, and (a packet authenticated
        // from another source) the endpoint moved there.
        let mut k = lock(&g);
        let p = &mut k.peers[0];
        p.last_handshake = (now.as_secs() as i64 - 30, 0);
        p.rx = 1234;
        p.tx = 5678;
        p.endpoint = Some("192.168.77.7:40000".parse().unwrap());
    }
    let writes = lock(&g).writes;
    assert_eq!(b.refresh().await.unwrap(), 1);
    assert_eq!(lock(&g).writes, writes + 1);
    assert_eq!(peers_of(&g)[0].1, "192.168.9.2:51820");
    let st = b.peer_stats();
    assert_eq!(st.len(), 1);
    assert_eq!((st[0].rx_bytes, st[0].tx_bytes), (1234, 5678));
    assert_eq!(st[0].subnet, Some(a.subnet.into()));
    assert_eq!(st[0].lease_subnet, Some(a.subnet));
    assert_eq!(st[0].device, DEVICE);
    assert_eq!(st[0].endpoint, Some("192.168.9.2:51820".parse().unwrap()));
    let age = st[0].last_handshake.expect("handshake read back").as_secs();
    assert!((29..=60).contains(&age), "{age}");
    // Nothing drifted since: the refresh reads and writes nothing.
    assert_eq!(b.refresh().await.unwrap(), 0);
    assert_eq!(lock(&g).writes, writes + 1);
    // The userspace counters are not this path's: zeros.
    assert_eq!(b.stats(), Default::default());
}

#[tokio::test]
async fn a_restart_on_a_configured_device_writes_nothing() {
    let fake = Fake::with_wireguard();
    let nl = Netlink::from(fake.clone());
    let g: Shared = Arc::new(Mutex::new(FakeGenl::new(DEVICE)));
    let peers = [peer(2, 2, [192, 168, 9, 2]), peer(3, 3, [192, 168, 9, 3])];
    let mut first = kernel_backend(&nl, &g, WgImpl::Auto).await;
    first.reconcile(&nl, &peers).await.unwrap();
    first.stop().await;
    drop(first);
    let (ops, writes) = (fake.ops().len(), lock(&g).writes);

    let mut again = kernel_backend(&nl, &g, WgImpl::Auto).await;
    assert!(again.setup_ops().is_empty(), "{:?}", again.setup_ops());
    let s = again.reconcile(&nl, &peers).await.unwrap();
    assert_eq!(s.ops_applied, 0);
    // Not even the probe's throw-away link: the device is a wireguard link, so the kernel has
    // the module.
    let new_ops: Vec<Op> = fake.ops()[ops..].to_vec();
    assert!(new_ops.is_empty(), "{new_ops:?}");
    assert_eq!(lock(&g).writes, writes);
    // After a resync the link is checked again: still nothing to write.
    again.resync();
    let s = again.reconcile(&nl, &peers).await.unwrap();
    assert_eq!(s.ops_applied, 0);
}

#[tokio::test]
async fn the_userspace_tun_device_is_replaced_by_a_kernel_link() {
    let fake = Fake::with_wireguard();
    fake.put_link(crate::netlink::Link {
        index: 40,
        name: DEVICE.into(),
        mtu: 1420,
        kind: Some("tun".into()),
        up: true,
        ..Default::default()
    });
    let nl = Netlink::from(fake.clone());
    let g: Shared = Arc::new(Mutex::new(FakeGenl::new(DEVICE)));
    let b = kernel_backend(&nl, &g, WgImpl::Auto).await;
    let link = nl.link_by_name(DEVICE).await.unwrap().unwrap();
    assert_eq!(link.kind.as_deref(), Some("wireguard"));
    assert_ne!(link.index, 40);
    assert_eq!(b.ifindex(), link.index);
}

#[tokio::test]
async fn kernel_without_the_module_fails_naming_it_and_auto_would_take_userspace() {
    let fake = Fake::new();
    let nl = Netlink::from(fake.clone());
    let g: Shared = Arc::new(Mutex::new(FakeGenl::new(DEVICE)));
    let err = WgBackend::setup_with(&nl, cfg(WgImpl::Kernel), opener(&g))
        .await
        .expect_err("kernel accepted without the module")
        .to_string();
    assert!(
        err.contains("kernel implementation is not available")
            && err.contains("no wireguard module"),
        "{err}"
    );
    assert!(nl.link_by_name(DEVICE).await.unwrap().is_none());
    // auto on the same kernel: the probe's answer makes choose() take userspace (whose TUN
    // set-up needs root, so it is not run here).
    let probed = probe_kernel(&nl).await;
    assert!(probed
        .as_ref()
        .is_err_and(|e| e.contains("modprobe wireguard")));
    assert_eq!(
        kernel::choose(WgImpl::Auto, &mut kernel::Probed(probed)).unwrap(),
        WgImpl::Userspace
    );
    assert!(no_probe_link_left(&nl).await);
}

#[tokio::test]
async fn a_vanished_kernel_device_asks_for_a_new_setup() {
    let fake = Fake::with_wireguard();
    let nl = Netlink::from(fake.clone());
    let g: Shared = Arc::new(Mutex::new(FakeGenl::new("gone")));
    let mut b = kernel_backend(&nl, &g, WgImpl::Kernel).await;
    let err = b
        .reconcile(&nl, &[peer(2, 2, [192, 168, 9, 2])])
        .await
        .expect_err("wrote to a missing device");
    assert!(err.is_device_gone(), "{err}");
}

/// The kernel probe's throw-away `twwg<pid>` link is gone again.
async fn no_probe_link_left(nl: &Netlink) -> bool {
    nl.links()
        .await
        .unwrap()
        .iter()
        .all(|l| !l.name.starts_with(PROBE_PREFIX))
}

#[tokio::test]
async fn the_probe_removes_a_dead_agents_link_and_a_failed_delete_still_means_kernel() {
    let fake = Fake::with_wireguard();
    let nl = Netlink::from(fake.clone());
    // What an agent killed between the probe's add and delete leaves behind.
    fake.add_link(&format!("{PROBE_PREFIX}4242"), 1420, None);
    probe_kernel(&nl).await.unwrap();
    assert!(no_probe_link_left(&nl).await);
    // The kernel made the link, only its delete failed: still a kernel with wireguard, and the
    // link is gone after the next start's probe.
    fake.fail_when(|op| {
        matches!(op, Op::LinkDel { name } if name.starts_with(PROBE_PREFIX)).then_some(libc::EBUSY)
    });
    probe_kernel(&nl).await.unwrap();
    assert!(!no_probe_link_left(&nl).await);
    fake.clear_failures();
    probe_kernel(&nl).await.unwrap();
    assert!(no_probe_link_left(&nl).await);
}

/// A dual-stack node on the kernel path, single-device mode: the peers' entries get both
/// subnets as allowed IPs (`auto`: IPv4 endpoints, as on userspace), a second pass writes nothing, and
/// the IPv6 plane puts the IPv6 subnet address and the `IPv6Network` route on `tweed-wg`.
#[tokio::test]
async fn kernel_dual_stack_device_carries_both_families_from_the_plan() {
    use tweed_config::{LeaseAttrs, SubnetKey, WireguardMode};
    let fake = Fake::with_wireguard();
    let nl = Netlink::from(fake.clone());
    let g: Shared = Arc::new(Mutex::new(FakeGenl::new(DEVICE)));
    let net = tweed_config::NetworkConfig::parse(
        r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:5::/56","Backend":{"Type":"wireguard","Mode":"auto"}}"#,
    )
    .unwrap();
    let ipv6 = net.ipv6.clone().unwrap();
    let own6: ipnetwork::Ipv6Network = "fd00:5:0:1::/64".parse().unwrap();
    let cfg = WgConfig {
        dual: Some(Box::new(WgDual {
            mode: WireguardMode::Auto,
            listen_port_v6: 51821,
            ipv6: ipv6.clone(),
            public_ipv6: "2001:db8::1".parse().unwrap(),
            own_subnet: Some(own6),
        })),
        ..cfg(WgImpl::Kernel)
    };
    let mut b = WgBackend::setup_with(&nl, cfg, opener(&g)).await.unwrap();
    assert_eq!(b.implementation(), "kernel");
    assert!(b.carries_v6());
    let local = b.dual_local().unwrap();
    // Two flannel-format dual-stack leases: one with a public PublicIP (IPv4 endpoint), one with
    // an RFC 1918 PublicIP and global PublicIPv6s, where flannel's auto rule would take the IPv6
    // endpoint: tweed takes IPv4, which a userspace peer (IPv4 socket only) also listens on.
    let lease = |n: u8, key: u8, ip: &str, ip6: &str| {
        let k = PrivateKey::from_bytes([key; 32]).public();
        let json = format!(
            r#"{{"PublicIP":"{ip}","PublicIPv6":"{ip6}","BackendType":"wireguard","BackendData":{{"PublicKey":"{k}","Port":51820}},"BackendV6Data":{{"PublicKey":"{k}","Port":51820}}}}"#
        );
        let skey = SubnetKey {
            ipv4: format!("10.5.{n}.0/24").parse().unwrap(),
            ipv6: Some(format!("fd00:5:0:{n}::/64").parse().unwrap()),
        };
        let attrs = LeaseAttrs::parse(json.as_bytes()).unwrap();
        (
            k,
            dual::DualPeer::from_lease(&skey, &attrs, Some(&ipv6), &local).unwrap(),
        )
    };
    let (ka, a) = lease(2, 2, "198.51.100.2", "2001:db8::2");
    let (kc, c) = lease(3, 3, "192.168.9.3", "2001:db8::3");
    b.reconcile_dual(&nl, &[a.clone(), c.clone()])
        .await
        .unwrap();
    let mut want = vec![
        (
            ka,
            "198.51.100.2:51820".to_string(),
            vec!["10.5.2.0/24".to_string(), "fd00:5:0:2::/64".into()],
        ),
        (
            kc,
            "192.168.9.3:51820".to_string(),
            vec!["10.5.3.0/24".to_string(), "fd00:5:0:3::/64".into()],
        ),
    ];
    want.sort_by(|x, y| x.2.cmp(&y.2));
    assert_eq!(peers_of(&g), want);
    let writes = lock(&g).writes;
    b.reconcile_dual(&nl, &[a, c]).await.unwrap();
    assert_eq!(lock(&g).writes, writes, "an unchanged set writes nothing");

    // The IPv6 plane on the kernel device: address /128 and the IPv6Network route, then nothing.
    let dp = crate::backend::DataPlane::Wireguard(b);
    let params = crate::backend::v6::V6Params {
        cfg: ipv6.clone(),
        own_subnet: own6,
        public_ipv6: "2001:db8::1".parse().unwrap(),
    };
    let v6 = crate::backend::v6::V6Plane::setup(&nl, params.clone(), &dp)
        .await
        .unwrap()
        .expect("the device carries IPv6");
    assert_eq!(v6.setup_ops().len(), 2, "{:?}", v6.setup_ops());
    let ifindex = nl.link_by_name(DEVICE).await.unwrap().unwrap().index;
    let addrs: Vec<String> = nl
        .addresses6(Some(ifindex))
        .await
        .unwrap()
        .iter()
        .map(|a| a.net.to_string())
        .collect();
    assert!(addrs.contains(&"fd00:5:0:1::/128".to_string()), "{addrs:?}");
    let routes: Vec<String> = nl
        .all_routes6()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.oif == Some(ifindex))
        .map(|r| r.dst.to_string())
        .collect();
    assert_eq!(routes, ["fd00:5::/56"]);
    let again = crate::backend::v6::V6Plane::setup(&nl, params, &dp)
        .await
        .unwrap()
        .unwrap();
    assert!(again.setup_ops().is_empty(), "{:?}", again.setup_ops());

    // The node stops serving IPv6 (Mode separate after a restart, the lease's IPv6 half gone):
    // the /128 and the IPv6Network route come off the device, which outlives the agent; the
    // kernel's link-local address stays; a second pass removes nothing.
    let ll: ipnetwork::Ipv6Network = "fe80::1/64".parse().unwrap();
    nl.apply(&crate::netlink::Op::Addr6Add {
        ifindex,
        addr: ll,
        nodad: true,
    })
    .await
    .unwrap();
    let removed = crate::backend::v6::remove_wireguard6(&nl, ifindex)
        .await
        .unwrap();
    assert_eq!(removed.len(), 2, "{removed:?}");
    let addrs: Vec<_> = nl.addresses6(Some(ifindex)).await.unwrap();
    assert_eq!(
        addrs.iter().map(|a| a.net).collect::<Vec<_>>(),
        [ll],
        "{addrs:?}"
    );
    assert!(nl
        .all_routes6()
        .await
        .unwrap()
        .iter()
        .all(|r| r.oif != Some(ifindex)));
    let again = crate::backend::v6::remove_wireguard6(&nl, ifindex)
        .await
        .unwrap();
    assert!(again.is_empty(), "{again:?}");
}

pub(crate) fn two_opener(g4: &Shared, g6: &Shared) -> GenlOpener {
    let two = kernel::FakeGenls(vec![g4.clone(), g6.clone()]);
    Box::new(move || Ok(Box::new(two) as Box<dyn kernel::WgGenl + Send>))
}

const NET6: &str = r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:5::/56","Backend":{"Type":"wireguard"}}"#;

pub(crate) fn separate_cfg(own6: Option<&str>) -> WgConfig {
    let net = tweed_config::NetworkConfig::parse(NET6).unwrap();
    WgConfig {
        dual: Some(Box::new(WgDual {
            mode: tweed_config::WireguardMode::Separate,
            listen_port_v6: 51821,
            ipv6: net.ipv6.unwrap(),
            public_ipv6: "2001:db8::1".parse().unwrap(),
            own_subnet: own6.map(|s| s.parse().unwrap()),
        })),
        ..cfg(WgImpl::Kernel)
    }
}

/// A flannel-format dual-stack lease of peer `n` (key byte `key`), its IPv6 half at
/// `ip6`; `port6`: `BackendV6Data.Port` (`None`: left out, as older flannel does).
fn separate_lease(
    local: &dual::DualLocal,
    n: u8,
    key: u8,
    ip6: &str,
    port6: Option<u16>,
) -> (PublicKey, dual::DualPeer) {
    use tweed_config::{LeaseAttrs, SubnetKey};
    let k = PrivateKey::from_bytes([key; 32]).public();
    let v6data = match port6 {
        Some(p) => format!(r#"{{"PublicKey":"{k}","Port":{p}}}"#),
        None => format!(r#"{{"PublicKey":"{k}"}}"#),
    };
    let json = format!(
        r#"{{"PublicIP":"198.51.100.{n}","PublicIPv6":"{ip6}","BackendType":"wireguard","BackendData":{{"PublicKey":"{k}","Port":51820}},"BackendV6Data":{v6data}}}"#
    );
    let skey = SubnetKey {
        ipv4: format!("10.5.{n}.0/24").parse().unwrap(),
        ipv6: Some(format!("fd00:5:0:{n}::/64").parse().unwrap()),
    };
    let net = tweed_config::NetworkConfig::parse(NET6).unwrap();
    let attrs = LeaseAttrs::parse(json.as_bytes()).unwrap();
    (
        k,
        dual::DualPeer::from_lease(&skey, &attrs, net.ipv6.as_ref(), local).unwrap(),
    )
}

/// The link `name`'s global IPv6 addresses and the IPv6 routes through it, as text.
async fn link6(nl: &Netlink, name: &str) -> Option<(u32, Vec<String>, Vec<String>)> {
    let l = nl.link_by_name(name).await.unwrap()?;
    let addrs = nl
        .addresses6(Some(l.index))
        .await
        .unwrap()
        .iter()
        .map(|a| a.net.to_string())
        .filter(|a| !a.starts_with("fe80"))
        .collect();
    let routes = nl
        .all_routes6()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.oif == Some(l.index))
        .map(|r| r.dst.to_string())
        .collect();
    Some((l.index, addrs, routes))
}

/// `Mode: separate` on the kernel path: `tweed-wg` holds the peers' IPv4 halves at their
/// IPv4 endpoints, `tweed-wg-v6` (on ListenPortV6, the same key, its /128 and the
/// `IPv6Network` route) their IPv6 halves at `[PublicIPv6]:Port` from `BackendV6Data`; an
/// IPv6 half with a PublicIPv6 that is no endpoint is left out with the reason; a second
/// pass writes nothing, anywhere; a roamed IPv6 endpoint is set back by the refresh.
#[tokio::test]
async fn kernel_separate_runs_ipv6_peers_on_their_own_device() {
    let fake = Fake::with_wireguard();
    let nl = Netlink::from(fake.clone());
    let g4: Shared = Arc::new(Mutex::new(FakeGenl::new(DEVICE)));
    let g6: Shared = Arc::new(Mutex::new(FakeGenl::new(dual::DEVICE_V6)));
    let mut b = WgBackend::setup_with(
        &nl,
        separate_cfg(Some("fd00:5:0:1::/64")),
        two_opener(&g4, &g6),
    )
    .await
    .unwrap();
    assert_eq!(b.implementation(), "kernel");
    // tweed-wg carries no IPv6 in this mode: the single-device IPv6 plane is not for it.
    assert!(!b.carries_v6());
    let (idx6, addrs, routes) = link6(&nl, dual::DEVICE_V6).await.expect("tweed-wg-v6 made");
    assert_eq!(b.ifindex_v6(), Some(idx6));
    assert_eq!(addrs, ["fd00:5:0:1::/128"]);
    assert_eq!(routes, ["fd00:5::/56"]);
    let l6 = nl.link_by_name(dual::DEVICE_V6).await.unwrap().unwrap();
    assert!(l6.up);
    assert_eq!(l6.mtu, 1420);
    assert_eq!(l6.kind.as_deref(), Some("wireguard"));
    let (_, addrs4, routes4) = link6(&nl, DEVICE).await.unwrap();
    assert!(
        addrs4.is_empty() && routes4.is_empty(),
        "{addrs4:?} {routes4:?}"
    );

    let local = b.dual_local().unwrap();
    assert!(local.separate());
    let (ka, a) = separate_lease(&local, 2, 2, "2001:db8::2", Some(51821));
    // Older flannel: no Port, so our own ListenPortV6.
    let (kc, c) = separate_lease(&local, 3, 3, "2001:db8::3", None);
    // PublicIPv6s that are no endpoint: IPv4 half served, IPv6 half left out with the reason.
    let bad = [
        (4, "fe80::4", "link-local"),
        (5, "::ffff:198.51.100.5", "IPv4-mapped"),
        (6, "ff02::6", "multicast"),
        (7, "::", "unspecified"),
    ];
    let mut peers = vec![a.clone(), c.clone()];
    for (n, ip6, why) in bad {
        let (_, p) = separate_lease(&local, n, n, ip6, Some(51821));
        let err = p.v6.clone().expect_err(ip6);
        assert!(err.contains(why), "{ip6}: {err}");
        peers.push(p);
    }
    let stats = b.reconcile_dual(&nl, &peers).await.unwrap();
    assert!(stats.skipped.is_empty(), "{:?}", stats.skipped);
    let v4: Vec<(String, Vec<String>)> = peers_of(&g4)
        .into_iter()
        .map(|(_, ep, allowed)| (ep, allowed))
        .collect();
    assert_eq!(v4.len(), 6);
    for (n, (ep, allowed)) in (2..).zip(&v4) {
        assert_eq!(ep, &format!("198.51.100.{n}:51820"));
        assert_eq!(allowed, &[format!("10.5.{n}.0/24")]);
    }
    assert_eq!(
        peers_of(&g6),
        [
            (
                ka,
                "[2001:db8::2]:51821".to_string(),
                vec!["fd00:5:0:2::/64".to_string()]
            ),
            (
                kc,
                "[2001:db8::3]:51821".to_string(),
                vec!["fd00:5:0:3::/64".to_string()]
            ),
        ]
    );
    assert_eq!(lock(&g6).listen_port, 51821);
    assert_eq!(lock(&g4).listen_port, 51820);
    // Figures per device entry: six on tweed-wg, two on tweed-wg-v6, each of the latter with
    // its IPv6 subnet and IPv6 endpoint, listed under its peer's lease.
    lock(&g6).peers[0].rx = 77;
    b.refresh().await.unwrap();
    let st = b.peer_stats();
    assert_eq!(st.iter().filter(|s| s.device == DEVICE).count(), 6);
    let mut six: Vec<(String, String, String, u64)> = st
        .iter()
        .filter(|s| s.device == dual::DEVICE_V6)
        .map(|s| {
            (
                s.subnet.unwrap().to_string(),
                s.endpoint.unwrap().to_string(),
                s.lease_subnet.unwrap().to_string(),
                s.rx_bytes,
            )
        })
        .collect();
    six.sort();
    let rx2 = if lock(&g6).peers[0].public_key == ka.0 {
        77
    } else {
        0
    };
    assert_eq!(
        six,
        [
            (
                "fd00:5:0:2::/64".to_string(),
                "[2001:db8::2]:51821".to_string(),
                "10.5.2.0/24".to_string(),
                rx2
            ),
            (
                "fd00:5:0:3::/64".into(),
                "[2001:db8::3]:51821".into(),
                "10.5.3.0/24".into(),
                77 - rx2
            ),
        ]
    );
    assert_eq!(lock(&g6).private_key, lock(&g4).private_key);
    assert!(lock(&g6).private_key.is_some());

    // Unchanged: no generic netlink write on either device, no netlink op.
    let (w4, w6) = (lock(&g4).writes, lock(&g6).writes);
    fake.take_ops();
    let again = b.reconcile_dual(&nl, &peers).await.unwrap();
    assert_eq!(again.ops_applied, 0, "{:?}", again.applied);
    assert_eq!((lock(&g4).writes, lock(&g6).writes), (w4, w6));
    assert!(fake.take_ops().is_empty());

    // The kernel roams the IPv6 endpoint: the periodic read-back puts the lease's back.
    lock(&g6).peers[0].endpoint = Some("[2001:db8::99]:40000".parse().unwrap());
    assert_eq!(b.refresh().await.unwrap(), 1);
    assert_eq!(peers_of(&g6)[0].1, "[2001:db8::2]:51821");
    assert_eq!(b.refresh().await.unwrap(), 0);

    // The IPv6 plane names tweed-wg-v6 for drift repair and writes nothing itself.
    let dp = crate::backend::DataPlane::Wireguard(b);
    let params = crate::backend::v6::V6Params {
        cfg: tweed_config::NetworkConfig::parse(NET6)
            .unwrap()
            .ipv6
            .unwrap(),
        own_subnet: "fd00:5:0:1::/64".parse().unwrap(),
        public_ipv6: "2001:db8::1".parse().unwrap(),
    };
    let v6 = crate::backend::v6::V6Plane::setup(&nl, params, &dp)
        .await
        .unwrap()
        .expect("the IPv6 plane runs on tweed-wg-v6");
    assert_eq!(v6.device(), Some((idx6, dual::DEVICE_V6.to_string())));
    assert!(v6.setup_ops().is_empty(), "{:?}", v6.setup_ops());
}

/// `tweed-wg-v6` follows our lease: a new IPv6 subnet moves its /128 at the next reconcile
/// (the link check is not skipped as done); the lease losing its IPv6 half removes the device
/// (the plan then has no IPv6 half at all); a restart of a node that runs no IPv6 device
/// (another mode, no IPv6) removes one left from before. Deleted or set down behind our
/// back, it is made again at the resync a repair does, peers included.
#[tokio::test]
async fn kernel_separate_ipv6_device_follows_the_lease_and_is_repaired() {
    let fake = Fake::with_wireguard();
    let nl = Netlink::from(fake.clone());
    let g4: Shared = Arc::new(Mutex::new(FakeGenl::new(DEVICE)));
    let g6: Shared = Arc::new(Mutex::new(FakeGenl::new(dual::DEVICE_V6)));
    let mut b = WgBackend::setup_with(
        &nl,
        separate_cfg(Some("fd00:5:0:1::/64")),
        two_opener(&g4, &g6),
    )
    .await
    .unwrap();
    let local = b.dual_local().unwrap();
    let (_, a) = separate_lease(&local, 2, 2, "2001:db8::2", Some(51821));
    b.reconcile_dual(&nl, std::slice::from_ref(&a))
        .await
        .unwrap();
    assert_eq!(peers_of(&g6).len(), 1);

    // Deleted behind our back (the fake device's peers go with it): the repair's resync
    // makes the link again, with its address, route and peer.
    nl.apply(&Op::LinkDel {
        name: dual::DEVICE_V6.into(),
    })
    .await
    .unwrap();
    *lock(&g6) = FakeGenl::new(dual::DEVICE_V6);
    b.resync();
    b.reconcile_dual(&nl, std::slice::from_ref(&a))
        .await
        .unwrap();
    let (idx, addrs, routes) = link6(&nl, dual::DEVICE_V6).await.expect("made again");
    assert_eq!(b.ifindex_v6(), Some(idx));
    assert_eq!(
        (addrs, routes),
        (
            vec!["fd00:5:0:1::/128".to_string()],
            vec!["fd00:5::/56".to_string()]
        )
    );
    assert_eq!(peers_of(&g6).len(), 1);
    assert_eq!(lock(&g6).listen_port, 51821);
    // Set down: brought up again.
    let mut down = nl.link_by_name(dual::DEVICE_V6).await.unwrap().unwrap();
    down.up = false;
    fake.put_link(down);
    b.resync();
    fake.take_ops();
    b.reconcile_dual(&nl, std::slice::from_ref(&a))
        .await
        .unwrap();
    assert_eq!(
        fake.take_ops(),
        [Op::LinkSetUp {
            name: dual::DEVICE_V6.into()
        }]
    );

    // Our lease's IPv6 subnet changes: re-planned without a resync, the old /128 goes.
    b.set_own_subnet_v6(Some("fd00:5:0:9::/64".parse().unwrap()));
    let local = b.dual_local().unwrap();
    let (_, a) = separate_lease(&local, 2, 2, "2001:db8::2", Some(51821));
    b.reconcile_dual(&nl, std::slice::from_ref(&a))
        .await
        .unwrap();
    let (_, addrs, _) = link6(&nl, dual::DEVICE_V6).await.unwrap();
    assert_eq!(addrs, ["fd00:5:0:9::/128"]);

    // The lease loses its IPv6 half: no dual plan any more, and the device goes with it.
    b.set_own_subnet_v6(None);
    assert!(b.dual_local().is_none());
    b.reconcile_dual(&nl, std::slice::from_ref(&a))
        .await
        .unwrap();
    assert!(nl.link_by_name(dual::DEVICE_V6).await.unwrap().is_none());
    assert_eq!(b.ifindex_v6(), None);
    assert_eq!(peers_of(&g4).len(), 1, "IPv4 keeps running");
    // The half comes back: the device too.
    b.set_own_subnet_v6(Some("fd00:5:0:9::/64".parse().unwrap()));
    b.reconcile_dual(&nl, std::slice::from_ref(&a))
        .await
        .unwrap();
    assert!(b.ifindex_v6().is_some());

    // A restart in a mode without the IPv6 device (here: no IPv6 half at all, as after
    // `Mode: auto` with --wireguard-impl=auto on a node without an IPv6 address) removes it.
    drop(b);
    let b = WgBackend::setup_with(&nl, cfg(WgImpl::Kernel), two_opener(&g4, &g6))
        .await
        .unwrap();
    assert!(nl.link_by_name(dual::DEVICE_V6).await.unwrap().is_none());
    assert_eq!(b.ifindex_v6(), None);
    assert!(b.setup_ops().contains(&Op::LinkDel {
        name: dual::DEVICE_V6.into()
    }));
}

/// `Mode: ipv6` on the kernel path: one device `tweed-wg` on ListenPort whose peers are
/// reached at `[PublicIPv6]:Port` (the `BackendData` port: the peer's one device listens
/// there), allowed IPs both subnets; the lease says `BackendV6Data.Port` = ListenPort; a peer
/// without a usable IPv6 half is skipped with the reason (never given its IPv4 endpoint); no
/// second device; the IPv6 plane runs on `tweed-wg`; a second pass writes nothing; a roamed
/// IPv6 endpoint is set back by the refresh.
#[tokio::test]
async fn kernel_ipv6_mode_reaches_every_peer_over_the_ipv6_underlay() {
    let fake = Fake::with_wireguard();
    let nl = Netlink::from(fake.clone());
    let g: Shared = Arc::new(Mutex::new(FakeGenl::new(DEVICE)));
    let mut cfg = separate_cfg(Some("fd00:5:0:1::/64"));
    cfg.dual.as_mut().unwrap().mode = tweed_config::WireguardMode::Ipv6;
    let lease = tweed_config::LeaseAttrs::parse(cfg.lease_attrs().to_json().as_bytes()).unwrap();
    assert_eq!(lease.public_ipv6, Some("2001:db8::1".parse().unwrap()));
    let port_of = |data: Option<&serde_json::value::RawValue>| {
        serde_json::from_str::<serde_json::Value>(data.unwrap().get()).unwrap()["Port"].clone()
    };
    assert_eq!(port_of(lease.backend_data.as_deref()), 51820);
    assert_eq!(port_of(lease.backend_v6_data.as_deref()), 51820);
    let mut b = WgBackend::setup_with(&nl, cfg, opener(&g)).await.unwrap();
    assert_eq!(b.implementation(), "kernel");
    assert!(b.carries_v6(), "the IPv6 plane serves tweed-wg");
    assert_eq!(b.ifindex_v6(), None);
    assert!(nl.link_by_name(dual::DEVICE_V6).await.unwrap().is_none());

    let local = b.dual_local().unwrap();
    assert!(!local.separate() && local.ipv6_endpoints());
    // BackendV6Data.Port 51821 is another mode's second device: the shared device takes the
    // BackendData port.
    let (ka, a) = separate_lease(&local, 2, 2, "2001:db8::2", Some(51821));
    let (kc, c) = separate_lease(&local, 3, 3, "2001:db8::3", None);
    let (_, linklocal) = separate_lease(&local, 4, 4, "fe80::4", Some(51820));
    let peers = vec![a, c, linklocal];
    let stats = b.reconcile_dual(&nl, &peers).await.unwrap();
    assert_eq!(
        stats
            .skipped
            .iter()
            .map(|s| s.subnet.to_string())
            .collect::<Vec<_>>(),
        ["10.5.4.0/24"],
        "{:?}",
        stats.skipped
    );
    assert!(
        stats.skipped[0].reason.contains("IPv6 underlay"),
        "{:?}",
        stats.skipped
    );
    let both = |n: u8| vec![format!("10.5.{n}.0/24"), format!("fd00:5:0:{n}::/64")];
    assert_eq!(
        peers_of(&g),
        [
            (ka, "[2001:db8::2]:51820".to_string(), both(2)),
            (kc, "[2001:db8::3]:51820".to_string(), both(3)),
        ]
    );
    assert_eq!(lock(&g).listen_port, 51820);
    // The figures carry the IPv6 endpoint and the lease's subnet.
    let st = b.peer_stats();
    assert_eq!(st.len(), 2);
    assert!(st.iter().all(|s| s.device == DEVICE), "{st:?}");
    let mut eps: Vec<String> = st.iter().map(|s| s.endpoint.unwrap().to_string()).collect();
    eps.sort();
    assert_eq!(eps, ["[2001:db8::2]:51820", "[2001:db8::3]:51820"]);

    let writes = lock(&g).writes;
    fake.take_ops();
    let again = b.reconcile_dual(&nl, &peers).await.unwrap();
    assert_eq!(again.ops_applied, 0, "{:?}", again.applied);
    assert_eq!(lock(&g).writes, writes);
    assert!(fake.take_ops().is_empty());

    lock(&g).peers[0].endpoint = Some("[2001:db8::99]:40000".parse().unwrap());
    assert_eq!(b.refresh().await.unwrap(), 1);
    assert_eq!(peers_of(&g)[0].1, "[2001:db8::2]:51820");
    assert_eq!(b.refresh().await.unwrap(), 0);

    // The IPv6 plane puts the /128 and the IPv6Network route on tweed-wg.
    let dp = crate::backend::DataPlane::Wireguard(b);
    let params = crate::backend::v6::V6Params {
        cfg: tweed_config::NetworkConfig::parse(NET6)
            .unwrap()
            .ipv6
            .unwrap(),
        own_subnet: "fd00:5:0:1::/64".parse().unwrap(),
        public_ipv6: "2001:db8::1".parse().unwrap(),
    };
    let v6 = crate::backend::v6::V6Plane::setup(&nl, params, &dp)
        .await
        .unwrap()
        .expect("tweed-wg carries IPv6");
    assert_eq!(v6.setup_ops().len(), 2, "{:?}", v6.setup_ops());
    let (_, addrs, routes) = link6(&nl, DEVICE).await.unwrap();
    assert_eq!(addrs, ["fd00:5:0:1::/128"]);
    assert_eq!(routes, ["fd00:5::/56"]);
}

/// `Mode: ipv6` on the userspace path, as `Userspace::reconcile` files it: every entry's
/// endpoint is `[PublicIPv6]:Port`, the workers' IPv4 routes name the node's IPv4 endpoint
/// (the key the peer table knows nodes by), and the WireGuard entries are filed under it. A
/// hostile lease naming the victim's `PublicIP` with its own `PublicIPv6` and a key sorting
/// after the victim's (review 35, H1) gets neither the victim's IPv4 nor its IPv6 traffic:
/// each destination is sealed for the entry whose allowed IPs hold it and sent to that entry's
/// endpoint.
#[test]
fn userspace_ipv6_mode_seals_each_destination_for_its_own_lease() {
    let mut cfg = separate_cfg(Some("fd00:5:0:1::/64"));
    cfg.dual.as_mut().unwrap().mode = tweed_config::WireguardMode::Ipv6;
    let local = cfg.dual_local().unwrap();
    let (kv, victim) = separate_lease(&local, 2, 2, "2001:db8::2", Some(51820));
    // Grinding is trivial: the first key byte whose public key sorts after the victim's.
    let xb = (3..=255u8)
        .find(|b| PrivateKey::from_bytes([*b; 32]).public() > kv)
        .expect("a key sorting after the victim's");
    let (kx, mut attacker) = separate_lease(&local, 66, xb, "2001:db8::66", Some(51820));
    assert!(kx > kv, "the attacker's entry is filed last");
    attacker.v4.public_ip = victim.v4.public_ip;
    let plan = dual::plan_dual(&local, &[victim, attacker]);
    assert!(plan.skipped.is_empty(), "{:?}", plan.skipped);
    let dev = &plan.devices[0];
    assert_eq!(plan.devices.len(), 1);
    let nodes: Nodes = dev.peers.iter().map(|p| (p.public_key, p.node)).collect();
    let specs: Vec<plan::PeerSpec> = dual::device_spec(dev, *cfg.private_key.bytes())
        .peers
        .into_values()
        .collect();

    let mut routes: Vec<String> = userspace_peers(&specs, &nodes)
        .iter()
        .map(|p| format!("{} {}:{}", p.subnet, p.public_ip, p.port))
        .collect();
    routes.sort();
    assert_eq!(
        routes,
        [
            "10.5.2.0/24 198.51.100.2:51820",
            "10.5.66.0/24 198.51.100.2:51820"
        ]
    );
    let node: Ipv4Addr = "198.51.100.2".parse().unwrap();
    let keyed = keyed_entries(&specs, &nodes);
    assert!(keyed.iter().all(|(_, k)| *k == Some(node)), "{keyed:?}");
    let t = userspace::WgTable::new(&cfg.private_key).update_keyed(&cfg.private_key, &keyed);
    for (dst, key, ep) in [
        ("10.5.2.7", kv, "[2001:db8::2]:51820"),
        ("fd00:5:0:2::7", kv, "[2001:db8::2]:51820"),
        ("10.5.66.7", kx, "[2001:db8::66]:51820"),
        ("fd00:5:0:66::7", kx, "[2001:db8::66]:51820"),
    ] {
        let p = t.route(node, dst.parse().unwrap()).expect(dst);
        assert_eq!(
            (p.spec.public_key, p.endpoint().unwrap().to_string()),
            (key, ep.to_string()),
            "{dst}"
        );
    }
    assert!(t.route(node, "10.5.9.1".parse().unwrap()).is_none());
}

/// Which sockets `tweed-wg`'s userspace workers need, and when running ones must be replaced:
/// `Mode: ipv6` needs IPv6 sockets exactly while our lease has its IPv6 half (the plan names
/// IPv6 endpoints only then); every other mode keeps IPv4 sockets. A device set up without
/// IPv6 must be set up again to take the IPv6 plane's address; one with it keeps it.
#[test]
fn the_userspace_sockets_follow_the_planned_endpoint_family() {
    use tweed_config::WireguardMode::{Auto, Ipv4, Ipv6, Separate};
    let cfg_of = |mode, own6: Option<&str>| {
        let mut c = separate_cfg(own6);
        c.dual.as_mut().unwrap().mode = mode;
        c
    };
    let sp = |v6_socket, dual_device| SocketPlan {
        v6_socket,
        dual_device,
    };
    let half = Some("fd00:5:0:1::/64");
    // What a set-up asks for.
    for (mode, own6, want) in [
        (Ipv6, half, sp(true, true)),
        (Ipv6, None, sp(false, false)),
        (Auto, half, sp(false, true)),
        (Auto, None, sp(false, false)),
        (Ipv4, half, sp(false, true)),
        (Separate, half, sp(false, false)),
        (Separate, None, sp(false, false)),
    ] {
        assert_eq!(
            SocketPlan::of(&cfg_of(mode, own6)),
            want,
            "{mode:?} {own6:?}"
        );
    }
    assert_eq!(SocketPlan::of(&cfg(WgImpl::Userspace)), sp(false, false));
    // The planned endpoints' family is the sockets': IPv6 exactly in Mode ipv6 with the half.
    for (mode, own6) in [(Ipv6, half), (Ipv6, None), (Auto, half), (Separate, half)] {
        let c = cfg_of(mode, own6);
        let planned_v6 = c.dual_local().is_some_and(|l| {
            let (_, p) = separate_lease(&l, 2, 2, "2001:db8::2", None);
            dual::plan_dual(&l, &[p])
                .devices
                .iter()
                .find(|d| d.name == DEVICE)
                .is_some_and(|d| d.peers.iter().all(|p| p.endpoint.is_ipv6()))
        });
        assert_eq!(
            SocketPlan::of(&c).v6_socket,
            planned_v6,
            "{mode:?} {own6:?}"
        );
    }

    // (a) Mode ipv6 loses the half at run time: IPv4 sockets, the device keeps IPv6.
    let running = SocketPlan::of(&cfg_of(Ipv6, half));
    assert_eq!(socket_change(running, &cfg_of(Ipv6, half)), None);
    assert_eq!(
        socket_change(running, &cfg_of(Ipv6, None)),
        Some(sp(false, true))
    );
    // ... and gets it back on those workers: IPv6 sockets again.
    assert_eq!(
        socket_change(sp(false, true), &cfg_of(Ipv6, half)),
        Some(sp(true, true))
    );
    assert_eq!(socket_change(sp(false, true), &cfg_of(Ipv6, None)), None);
    // (b) Set up while the half was gone: the half back needs IPv6 sockets and IPv6 on the
    // device.
    let bare = SocketPlan::of(&cfg_of(Ipv6, None));
    assert_eq!(
        socket_change(bare, &cfg_of(Ipv6, half)),
        Some(sp(true, true))
    );
    // auto/ipv4 never change the sockets; only a device without IPv6 gaining the half is set
    // up again (the IPv6 plane's address needs IPv6 on it), and losing it changes nothing.
    for mode in [Auto, Ipv4] {
        assert_eq!(
            socket_change(sp(false, false), &cfg_of(mode, half)),
            Some(sp(false, true)),
            "{mode:?}"
        );
        assert_eq!(socket_change(sp(false, true), &cfg_of(mode, None)), None);
        assert_eq!(socket_change(sp(false, true), &cfg_of(mode, half)), None);
    }
    // separate: tweed-wg is IPv4 only whatever the half does (tweed-wg-v6 has its own).
    for own6 in [half, None] {
        assert_eq!(
            socket_change(sp(false, false), &cfg_of(Separate, own6)),
            None
        );
    }
}

/// The kernel path in the same case: the device listens on both families, so losing the IPv6
/// half at run time moves every peer to its IPv4 endpoint and getting it back moves them to
/// the IPv6 one, on the same link with the same key, nothing set up again.
#[tokio::test]
async fn kernel_ipv6_mode_follows_our_ipv6_half_on_the_same_device() {
    let fake = Fake::with_wireguard();
    let nl = Netlink::from(fake.clone());
    let g: Shared = Arc::new(Mutex::new(FakeGenl::new(DEVICE)));
    let half: ipnetwork::Ipv6Network = "fd00:5:0:1::/64".parse().unwrap();
    let mut cfg = separate_cfg(Some("fd00:5:0:1::/64"));
    cfg.dual.as_mut().unwrap().mode = tweed_config::WireguardMode::Ipv6;
    let mut b = WgBackend::setup_with(&nl, cfg, opener(&g)).await.unwrap();
    let (ifindex, key) = (b.ifindex(), b.public_key());
    let local = b.dual_local().unwrap();
    let (ka, a) = separate_lease(&local, 2, 2, "2001:db8::2", None);
    let peers = vec![a];
    let endpoint = |g: &Shared| peers_of(g)[0].1.clone();
    b.reconcile_dual(&nl, &peers).await.unwrap();
    assert_eq!(endpoint(&g), "[2001:db8::2]:51820");
    for round in 0..2 {
        b.set_own_subnet_v6(None);
        b.reconcile_dual(&nl, &peers).await.unwrap();
        assert_eq!(endpoint(&g), "198.51.100.2:51820", "round {round}");
        assert_eq!(peers_of(&g)[0].0, ka);
        b.set_own_subnet_v6(Some(half));
        b.reconcile_dual(&nl, &peers).await.unwrap();
        assert_eq!(endpoint(&g), "[2001:db8::2]:51820", "round {round}");
        assert_eq!((b.ifindex(), b.public_key()), (ifindex, key));
        assert_eq!(lock(&g).listen_port, 51820);
    }
}
