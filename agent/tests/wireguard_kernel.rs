//! Root-only: the kernel WireGuard layer against the real kernel, in a namespace of its own
//! (deleted by a guard, even on panic). Which branch runs is decided by iproute2, an
//! implementation independent of ours: `ip link add type wireguard` succeeds only where the
//! kernel has the module. This lab host has none, so here the test proves the refusal and the
//! fallback; on a kernel with the module (the VMs) it configures a device and reads it back
//! with `wg`, and runs the agent's backend on it.

use std::net::SocketAddrV4;

use tweed_agent::backend::wireguard::kernel::{
    self, choose, KernelError, KernelProbe, LinkProbe, RealGenl,
};
use tweed_agent::backend::wireguard::plan::{device_spec, PeerSpec};
use tweed_agent::backend::wireguard::{PrivateKey, WgBackend, WgConfig, WgImpl, WgPeer};
use tweed_agent::netlink::Netlink;
use tweed_testkit::{in_ns, ip_in, require_root, try_run, NetnsGuard};

const NEEDS_ROOT: &str = "network namespaces and wireguard links";

fn links(ns: &NetnsGuard) -> String {
    ip_in(ns.name(), &["-o", "link", "show"])
}

fn kernel_has_wireguard(ns: &NetnsGuard) -> bool {
    let ok = try_run(
        "ip",
        &[
            "-n",
            ns.name(),
            "link",
            "add",
            "tw-oracle",
            "type",
            "wireguard",
        ],
    )
    .is_ok();
    if ok {
        ip_in(ns.name(), &["link", "del", "tw-oracle"]);
    }
    ok
}

#[test]
fn kernel_is_refused_clearly_and_auto_falls_back_without_the_module() {
    require_root!(NEEDS_ROOT);
    let ns = NetnsGuard::unique("tw-wgk-");
    if kernel_has_wireguard(&ns) {
        eprintln!("the kernel has wireguard: the no-module branch does not apply here");
        return;
    }
    let (probe, open, auto, forced) = ns.enter(|| {
        let probe = LinkProbe.probe();
        let open = RealGenl::open().err();
        let auto = choose(WgImpl::Auto, &mut LinkProbe).map_err(|e| e.to_string());
        let forced = choose(WgImpl::Kernel, &mut LinkProbe).map_err(|e| e.to_string());
        (probe, open, auto, forced)
    });
    let why = probe.expect_err("the probe created a wireguard link iproute2 could not");
    assert!(why.contains("creating a wireguard link"), "{why}");
    assert!(
        matches!(open, Some(KernelError::NoModule)),
        "generic netlink family resolved without the module: {open:?}"
    );
    assert_eq!(auto, Ok(WgImpl::Userspace));
    let err = forced.expect_err("kernel accepted without the module");
    eprintln!("--wireguard-impl kernel here: {err}");
    assert!(
        err.contains("kernel implementation is not available") && err.contains(&why),
        "{err}"
    );
    // The probe leaves nothing behind, failed or not.
    let l = links(&ns);
    assert!(!l.contains("twwg"), "{l}");
}

fn peer(n: u8, ip: [u8; 4]) -> PeerSpec {
    PeerSpec {
        public_key: PrivateKey::from_bytes([n; 32]).public(),
        endpoint: Some(SocketAddrV4::new(ip.into(), 51820).into()),
        allowed_ips: vec![format!("10.5.{n}.0/24").parse().unwrap()],
        psk: None,
        keepalive: 0,
    }
}

#[test]
fn kernel_device_is_configured_and_read_back_where_the_module_exists() {
    require_root!(NEEDS_ROOT);
    let ns = NetnsGuard::unique("tw-wgk-");
    if !kernel_has_wireguard(&ns) {
        eprintln!("no wireguard module in this kernel: the device branch runs only in the VMs");
        return;
    }
    const DEV: &str = "tw-wgk0";
    let want = device_spec(
        *PrivateKey::from_bytes([7; 32]).bytes(),
        51820,
        vec![peer(1, [192, 0, 2, 1]), peer(2, [192, 0, 2, 2])],
    );
    let w = want.clone();
    let (auto, first, second) = ns.enter(move || {
        let auto = choose(WgImpl::Auto, &mut LinkProbe).unwrap();
        kernel::add_link(DEV).unwrap();
        let mut g = RealGenl::open().unwrap();
        let first = kernel::reconcile(&mut g, DEV, &w).unwrap().0;
        let (second, seen) = kernel::reconcile(&mut g, DEV, &w).unwrap();
        // The kernel keeps the private key clamped.
        let mut clamped = w.clone();
        clamped.private_key = w.private_key.map(kernel::clamp);
        assert_eq!(seen.spec, clamped);
        (auto, first, second)
    });
    assert_eq!(auto, WgImpl::Kernel);
    assert_eq!(first.len(), 3, "{first:?}");
    assert!(
        second.is_empty(),
        "an unchanged device got writes: {second:?}"
    );
    let dump = in_ns(ns.name(), &["wg", "show", DEV, "dump"]);
    for p in want.peers.values() {
        let line = format!(
            "{}\t(none)\t{}\t{}",
            p.public_key,
            p.endpoint.unwrap(),
            p.allowed_ips[0]
        );
        assert!(dump.contains(&line), "{line:?} not in {dump}");
    }
    // Roam peer 1 behind our back; the next reconcile sets the lease's endpoint again.
    let k1 = want.peers.keys().next().unwrap().to_string();
    in_ns(
        ns.name(),
        &[
            "wg",
            "set",
            DEV,
            "peer",
            &k1,
            "endpoint",
            "198.51.100.9:4000",
        ],
    );
    let w = want.clone();
    let third = ns.enter(move || {
        let mut g = RealGenl::open().unwrap();
        kernel::reconcile(&mut g, DEV, &w).unwrap().0
    });
    assert_eq!(third.len(), 1, "{third:?}");
    let dump = in_ns(ns.name(), &["wg", "show", DEV, "endpoints"]);
    assert!(dump.contains("192.0.2.1:51820"), "{dump}");
}

fn backend_cfg(implementation: WgImpl) -> WgConfig {
    WgConfig {
        network: "10.5.0.0/16".parse().unwrap(),
        own_subnet: "10.5.1.0/24".parse().unwrap(),
        local_ip: [192, 0, 2, 100].into(),
        public_ip: [192, 0, 2, 100].into(),
        listen_port: 51820,
        underlay_mtu: 1500,
        mtu_base: 0,
        psk: None,
        keepalive: 0,
        key_path: "/nonexistent/wgkey".into(),
        private_key: PrivateKey::from_bytes([7; 32]),
        implementation,
        queues: 1,
        dual: None,
    }
}

fn lease_peer(n: u8) -> WgPeer {
    WgPeer {
        subnet: format!("10.5.{n}.0/24").parse().unwrap(),
        public_ip: [192, 0, 2, n].into(),
        public_key: PrivateKey::from_bytes([n; 32]).public(),
        port: 51820,
    }
}

/// What one agent run does in the namespace: set up (`wanted`), reconcile `peers` twice.
/// The backend's ops (set-up, first, second reconcile) and its implementation, or the set-up
/// error.
fn agent_run(
    ns: &NetnsGuard,
    wanted: WgImpl,
    peers: Vec<WgPeer>,
) -> Result<(&'static str, usize, usize, usize), String> {
    with_netlink_in(ns, move |nl| async move {
        let mut b = WgBackend::setup(&nl, backend_cfg(wanted))
            .await
            .map_err(|e| e.to_string())?;
        let setup = b.setup_ops().len();
        let first = b.reconcile(&nl, &peers).await.unwrap().ops_applied;
        let second = b.reconcile(&nl, &peers).await.unwrap().ops_applied;
        assert_eq!(b.peer_stats().len(), peers.len());
        Ok((b.implementation(), setup, first, second))
    })
}

/// Runs `f` on a current-thread runtime in `ns`, with a real netlink handle opened there.
fn with_netlink_in<T, F>(ns: &NetnsGuard, f: impl FnOnce(Netlink) -> F + Send + 'static) -> T
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

/// The agent's backend on the real kernel. With the module (the VMs): `auto` runs the kernel
/// device, configured as wg(8) reads it; a restart writes nothing; a roamed endpoint is set
/// back. Without it (this host): `kernel` fails naming the module and leaves no device.
#[test]
fn the_backend_runs_the_kernel_device_or_names_the_missing_module() {
    require_root!(NEEDS_ROOT);
    let ns = NetnsGuard::unique("tw-wgb-");
    let peers = vec![lease_peer(2), lease_peer(3)];
    if !kernel_has_wireguard(&ns) {
        let err = agent_run(&ns, WgImpl::Kernel, peers).expect_err("kernel without the module");
        eprintln!("--wireguard-impl kernel here: {err}");
        assert!(err.contains("no wireguard module"), "{err}");
        let l = links(&ns);
        assert!(!l.contains("tweed-wg") && !l.contains("twwg"), "{l}");
        return;
    }
    let (imp, setup, first, second) = agent_run(&ns, WgImpl::Auto, peers.clone()).unwrap();
    assert_eq!(imp, "kernel");
    // link add, up, address, route (the kernel's default MTU 1420 is already 1500 - 80); then
    // key+port and one write per peer; then nothing.
    assert_eq!((setup, first, second), (4, 3, 0));
    let link = ip_in(ns.name(), &["-d", "-o", "link", "show", "tweed-wg"]);
    assert!(
        link.contains("mtu 1420") && link.contains("wireguard"),
        "{link}"
    );
    let addr = ip_in(ns.name(), &["-o", "addr", "show", "tweed-wg"]);
    assert!(addr.contains("10.5.1.0/32"), "{addr}");
    let route = ip_in(ns.name(), &["route", "show", "dev", "tweed-wg"]);
    assert!(route.contains("10.5.0.0/16"), "{route}");
    let dump = in_ns(ns.name(), &["wg", "show", "tweed-wg", "dump"]);
    for p in &peers {
        let line = format!(
            "{}\t(none)\t{}:51820\t{}",
            p.public_key, p.public_ip, p.subnet
        );
        assert!(dump.contains(&line), "{line:?} not in {dump}");
    }
    // The kernel roams peer 2; the restarted agent finds everything else in place.
    let k2 = peers[0].public_key.to_string();
    in_ns(
        ns.name(),
        &[
            "wg",
            "set",
            "tweed-wg",
            "peer",
            &k2,
            "endpoint",
            "198.51.100.9:4000",
        ],
    );
    let (imp, setup, first, second) = agent_run(&ns, WgImpl::Kernel, peers.clone()).unwrap();
    assert_eq!((imp, setup, first, second), ("kernel", 0, 1, 0));
    let ends = in_ns(ns.name(), &["wg", "show", "tweed-wg", "endpoints"]);
    assert!(ends.contains("192.0.2.2:51820"), "{ends}");
}

/// One node: `own` subnet 10.5.`own`.0/24 at 192.0.2.`own`, key [`own`; 32], the others as peers.
fn node_cfg(own: u8) -> WgConfig {
    WgConfig {
        own_subnet: format!("10.5.{own}.0/24").parse().unwrap(),
        local_ip: [192, 0, 2, own].into(),
        public_ip: [192, 0, 2, own].into(),
        private_key: PrivateKey::from_bytes([own; 32]),
        ..backend_cfg(WgImpl::Kernel)
    }
}

/// Sets node `own`'s backend up in `ns` and reconciles `peers`; the per-peer figures it read.
fn node_run(
    ns: &NetnsGuard,
    own: u8,
    peers: Vec<WgPeer>,
) -> (
    &'static str,
    Vec<tweed_agent::backend::wireguard::PeerStats>,
) {
    with_netlink_in(ns, move |nl| async move {
        let mut b = WgBackend::setup(&nl, node_cfg(own)).await.unwrap();
        b.reconcile(&nl, &peers).await.unwrap();
        (b.implementation(), b.peer_stats())
    })
}

/// Two nodes' backends on kernel devices, joined by a veth pair as underlay: the pods'
/// addresses reach each other through WireGuard, and the figures read back from the kernel show
/// the handshake and the bytes. Runs only on a kernel with the module (the VM).
#[test]
fn two_kernel_backends_carry_traffic_and_report_the_handshake() {
    require_root!(NEEDS_ROOT);
    let a = NetnsGuard::unique("tw-wga-");
    let b = NetnsGuard::unique("tw-wgb-");
    if !kernel_has_wireguard(&a) {
        eprintln!("no wireguard module in this kernel: traffic runs only in the VMs");
        return;
    }
    underlay(&a, &b);
    let (ia, _) = node_run(&a, 2, vec![lease_peer(3)]);
    let (ib, _) = node_run(&b, 3, vec![lease_peer(2)]);
    assert_eq!((ia, ib), ("kernel", "kernel"));
    let (ok, out) = tweed_testkit::probe_in(a.name(), &["ping", "-c", "3", "-W", "3", "10.5.3.0"]);
    assert!(ok, "no ping through the kernel devices: {out}");
    // A restarted agent reads the figures back from the kernel.
    let (_, stats) = node_run(&a, 2, vec![lease_peer(3)]);
    assert_eq!(stats.len(), 1, "{stats:?}");
    let s = &stats[0];
    assert!(
        s.last_handshake.is_some() && s.rx_bytes > 0 && s.tx_bytes > 0,
        "{s:?}"
    );
    eprintln!("peer figures read back: {s:?}");
}

/// A veth pair as the two nodes' underlay: `ua` 192.0.2.2/24 in `a`, `ub` 192.0.2.3/24 in `b`.
fn underlay(a: &NetnsGuard, b: &NetnsGuard) {
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
    for (ns, dev, addr) in [(a, "ua", "192.0.2.2/24"), (b, "ub", "192.0.2.3/24")] {
        ip_in(ns.name(), &["addr", "add", addr, "dev", dev]);
        ip_in(ns.name(), &["link", "set", dev, "up"]);
    }
}

/// `ping` from `ns` to `dst` through the tunnel (the first one waits for the handshake, which
/// takes a while under TCG), panicking with the output when none is answered.
fn ping_ok(ns: &NetnsGuard, dst: &str, what: &str) {
    let (ok, out) = tweed_testkit::probe_in(ns.name(), &["ping", "-c", "3", "-W", "3", dst]);
    assert!(ok, "{what}: no ping from {} to {dst}: {out}", ns.name());
}

/// `argv` with `input` on its stdin, in the current namespace: stdout, trimmed.
fn run_with_stdin(argv: &[&str], input: &str) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The largest UDP payload one packet of a 1420-MTU device carries: 1420 - 20 (IP) - 8 (UDP).
const FULL_PAYLOAD: usize = 1392;

/// One full-size UDP datagram with DF from `from` (`from_ip`) to `to` (`to_ip`), its bytes
/// compared on arrival; and one byte more refused by the sender's stack (EMSGSIZE: the route's
/// device has MTU 1420). The sockets are made in their namespaces and used from here.
fn full_size_udp(from: &NetnsGuard, from_ip: &str, to: &NetnsGuard, to_ip: &str) {
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    use std::time::Duration;
    let bind = |ip: &str| -> std::net::SocketAddr { format!("{ip}:0").parse().unwrap() };
    let (src, dst) = (bind(from_ip), bind(to_ip));
    let rx = to.enter(move || UdpSocket::bind(dst).unwrap());
    let tx = from.enter(move || UdpSocket::bind(src).unwrap());
    let dst = rx.local_addr().unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let df: libc::c_int = libc::IP_PMTUDISC_DO;
    // SAFETY: a valid socket and an int option of the right size.
    let rc = unsafe {
        libc::setsockopt(
            tx.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&df as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "IP_MTU_DISCOVER: {}",
        std::io::Error::last_os_error()
    );
    let payload: Vec<u8> = (0..FULL_PAYLOAD).map(|i| (i * 7 + 3) as u8).collect();
    tx.send_to(&payload, dst).unwrap();
    let mut buf = [0u8; 2048];
    let (n, peer) = rx
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("{from_ip} -> {to_ip}: no full-size datagram: {e}"));
    assert_eq!(peer, tx.local_addr().unwrap());
    assert!(
        buf[..n] == payload[..],
        "{from_ip} -> {to_ip}: {n} bytes, not the sent ones"
    );
    let big = vec![0u8; FULL_PAYLOAD + 1];
    let err = tx
        .send_to(&big, dst)
        .expect_err("1393 bytes with DF over MTU 1420");
    assert_eq!(err.raw_os_error(), Some(libc::EMSGSIZE), "{err}");
}

/// Bytes of the TCP transfer each way: many windows, so a path that loses or reorders
/// segments must recover, and the tunnel's MSS (from MTU 1420) is exercised.
const TCP_BYTES: usize = 1 << 20;

/// `len` bytes of a xorshift64 stream from `seed`: no period short enough to hide a
/// duplicated or dropped segment, and different per direction.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// [`TCP_BYTES`] over TCP from `from` (`from_ip`) to `to` (`to_ip`) through the tunnel, compared
/// byte for byte on arrival. The listener is made in `to`'s namespace and the connection in
/// `from`'s (a socket keeps its namespace), then both ends run here: the sender on a thread of
/// its own. Every connect, read and write has a timeout, so a broken path fails naming the
/// direction instead of hanging the VM run. Returns the transfer's duration.
fn tcp_transfer(
    from: &NetnsGuard,
    from_ip: &str,
    to: &NetnsGuard,
    to_ip: &str,
    seed: u64,
) -> std::time::Duration {
    use std::io::{Read, Write};
    use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
    use std::time::{Duration, Instant};
    // TCG is slow; a stall this long means the path is broken, not busy.
    const STALL: Duration = Duration::from_secs(30);
    let what = format!("TCP {from_ip} -> {to_ip}");
    let bind: SocketAddr = format!("{to_ip}:0").parse().unwrap();
    let listener = to
        .enter(move || TcpListener::bind(bind))
        .unwrap_or_else(|e| panic!("{what}: bind: {e}"));
    let dst = listener.local_addr().unwrap();
    let mut tx = from
        .enter(move || TcpStream::connect_timeout(&dst, STALL))
        .unwrap_or_else(|e| panic!("{what}: connect: {e}"));
    // connect returned: the handshake is done, so the connection waits in the accept queue.
    let (mut rx, peer) = listener
        .accept()
        .unwrap_or_else(|e| panic!("{what}: accept: {e}"));
    assert_eq!(peer.ip().to_string(), from_ip, "{what}: source address");
    rx.set_read_timeout(Some(STALL)).unwrap();
    tx.set_write_timeout(Some(STALL)).unwrap();
    let data = pattern(seed, TCP_BYTES);
    let sent = data.clone();
    let t0 = Instant::now();
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        tx.write_all(&sent)?;
        tx.shutdown(Shutdown::Write)
    });
    let mut got = Vec::with_capacity(TCP_BYTES);
    let read = rx.read_to_end(&mut got);
    let took = t0.elapsed();
    // A failed read drops `rx` when the panic unwinds, which resets the sender's writes.
    read.unwrap_or_else(|e| panic!("{what}: read after {} bytes: {e}", got.len()));
    sender
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{what}: write: {e}"));
    assert_eq!(got.len(), TCP_BYTES, "{what}: length");
    if let Some(i) = got.iter().zip(&data).position(|(g, d)| g != d) {
        panic!("{what}: byte {i} differs");
    }
    took
}

/// The `wg show DEV latest-handshakes` line of `key`: seconds since the epoch, 0 for none.
fn wg_latest_handshake(ns: &NetnsGuard, dev: &str, key: &str) -> u64 {
    let out = in_ns(ns.name(), &["wg", "show", dev, "latest-handshakes"]);
    out.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|t| t.trim().parse().unwrap())
        .unwrap_or_else(|| panic!("{key} not in `wg show {dev} latest-handshakes`: {out}"))
}

/// Interop with a node configured as flannel's wireguard backend configures one, on the
/// kernel's WireGuard, from the leases only: tweed's kernel-path backend (node 2, in `a`)
/// and a `wireguard` link `flannel-wg` set up with `ip` and `wg` (node 3, in `b`): key pair
/// from `wg genkey`/`wg pubkey`, listen port 51820, the subnet's network address /32, MTU
/// underlay - 80, one scope-link route for the whole network, a peer per other lease (allowed
/// IPs = its subnet, endpoint = PublicIP:Port). Each side reads only the other's lease JSON.
/// Pings both ways; handshake in tweed's read-back and in `wg show latest-handshakes`.
#[test]
fn a_kernel_node_configured_as_flannel_does_interoperates_with_the_kernel_backend() {
    require_root!(NEEDS_ROOT);
    let a = NetnsGuard::unique("tw-wfa-");
    let b = NetnsGuard::unique("tw-wfb-");
    if !kernel_has_wireguard(&a) {
        eprintln!(
            "no wireguard module in this kernel: the flannel-configured kernel node runs only in \
             the VM (scripts/vm-wg-kernel)"
        );
        return;
    }
    underlay(&a, &b);
    const DEV: &str = "flannel-wg";
    // The flannel node's keys, as flannel's backend would hold them.
    let private = run_with_stdin(&["wg", "genkey"], "");
    let public = run_with_stdin(&["wg", "pubkey"], &format!("{private}\n"));
    // Its lease, in flannel's format; tweed reads it as any other lease.
    let flannel_lease = format!(
        r#"{{"PublicIP":"192.0.2.3","BackendType":"wireguard","BackendData":{{"PublicKey":"{public}","Port":51820}}}}"#
    );
    let attrs = tweed_config::LeaseAttrs::parse(flannel_lease.as_bytes()).unwrap();
    let flannel_peer = WgPeer::from_lease("10.5.3.0/24".parse().unwrap(), &attrs, 51820).unwrap();
    // tweed's lease as it publishes it; the flannel node reads only that JSON.
    let tweed_lease = tweed_agent::backend::wireguard::plan::lease_attrs(
        [192, 0, 2, 2].into(),
        &PrivateKey::from_bytes([2; 32]).public(),
        51820,
    )
    .to_json();
    let v: serde_json::Value = serde_json::from_str(&tweed_lease).unwrap();
    let (tweed_ip, tweed_key, tweed_port) = (
        v["PublicIP"].as_str().unwrap().to_string(),
        v["BackendData"]["PublicKey"].as_str().unwrap().to_string(),
        v["BackendData"]["Port"].as_u64().unwrap(),
    );
    assert_eq!(v["BackendType"], "wireguard", "{tweed_lease}");

    let (imp, _) = node_run(&a, 2, vec![flannel_peer]);
    assert_eq!(imp, "kernel");

    // The flannel node: Network 10.5.0.0/16, its lease 10.5.3.0/24, underlay MTU 1500.
    let n = b.name();
    ip_in(n, &["link", "add", DEV, "type", "wireguard"]);
    // wg(8) reads the key from a file (no /dev/stdin in the VM's initramfs); 0600, as wg wants.
    let key_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key_file.path(), format!("{private}\n")).unwrap();
    let key_path = key_file.path().to_str().unwrap();
    in_ns(
        n,
        &[
            "wg",
            "set",
            DEV,
            "listen-port",
            "51820",
            "private-key",
            key_path,
        ],
    );
    ip_in(n, &["addr", "add", "10.5.3.0/32", "dev", DEV]);
    // flannel: the underlay interface's MTU minus 80.
    let ub = ip_in(n, &["-o", "link", "show", "ub"]);
    let underlay_mtu: u32 = ub
        .split_whitespace()
        .skip_while(|w| *w != "mtu")
        .nth(1)
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no mtu in {ub}"));
    let mtu = (underlay_mtu - 80).to_string();
    ip_in(n, &["link", "set", DEV, "mtu", &mtu, "up"]);
    ip_in(
        n,
        &["route", "add", "10.5.0.0/16", "dev", DEV, "scope", "link"],
    );
    let endpoint = format!("{tweed_ip}:{tweed_port}");
    in_ns(
        n,
        &[
            "wg",
            "set",
            DEV,
            "peer",
            &tweed_key,
            "endpoint",
            &endpoint,
            "allowed-ips",
            "10.5.2.0/24",
        ],
    );

    // Each side starts a handshake once.
    ping_ok(&a, "10.5.3.0", "tweed -> flannel-configured node");
    ping_ok(&b, "10.5.2.0", "flannel-configured node -> tweed");
    full_size_udp(&a, "10.5.2.0", &b, "10.5.3.0");
    full_size_udp(&b, "10.5.3.0", &a, "10.5.2.0");
    let tcp_to = tcp_transfer(&a, "10.5.2.0", &b, "10.5.3.0", 0x7eed_2003);
    let tcp_back = tcp_transfer(&b, "10.5.3.0", &a, "10.5.2.0", 0x7eed_3002);

    let (_, stats) = node_run(&a, 2, vec![flannel_peer]);
    assert_eq!(stats.len(), 1, "{stats:?}");
    let s = &stats[0];
    assert_eq!(s.public_key.to_string(), public);
    assert!(
        s.last_handshake.is_some() && s.rx_bytes > 0 && s.tx_bytes > 0,
        "{s:?}"
    );
    let hs = wg_latest_handshake(&b, DEV, &tweed_key);
    assert!(hs > 0, "no handshake with tweed on the flannel node");
    let transfer = in_ns(n, &["wg", "show", DEV, "transfer"]);
    let line = transfer
        .lines()
        .find(|l| l.starts_with(&tweed_key))
        .unwrap_or_else(|| panic!("{transfer}"));
    let f: Vec<u64> = line
        .split('\t')
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    assert!(f.len() == 2 && f[0] > 0 && f[1] > 0, "{line}");
    eprintln!(
        "flannel-configured kernel node: tweed read back {s:?}; wg show on it: handshake at {hs}, \
         rx/tx {} / {} bytes; TCP {TCP_BYTES} B tweed -> it in {tcp_to:?}, back in {tcp_back:?}",
        f[0], f[1]
    );
}

/// Kernel and userspace in one mesh: node 2 runs tweed's backend on the kernel device, node 3
/// tweed's userspace path (forced: boringtun on the udp workers and a TUN device), in-process
/// (the workers are threads started in node 3's namespace, stopped when the backend drops).
/// Pings both ways; each side shows the handshake and bytes with the other.
#[test]
fn kernel_and_userspace_backends_in_one_mesh_carry_traffic_both_ways() {
    require_root!(NEEDS_ROOT);
    let a = NetnsGuard::unique("tw-wma-");
    let b = NetnsGuard::unique("tw-wmb-");
    if !kernel_has_wireguard(&a) {
        eprintln!(
            "no wireguard module in this kernel: the kernel <-> userspace mesh runs only in the \
             VM (scripts/vm-wg-kernel)"
        );
        return;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        panic!("/dev/net/tun is missing: the userspace path needs the tun device");
    }
    underlay(&a, &b);
    let (ia, _) = node_run(&a, 2, vec![lease_peer(3)]);
    assert_eq!(ia, "kernel");
    // Declared after the namespaces, so it is dropped (its workers stopped) before them.
    let user = with_netlink_in(&b, move |nl| async move {
        let cfg = WgConfig {
            implementation: WgImpl::Userspace,
            ..node_cfg(3)
        };
        let mut u = WgBackend::setup(&nl, cfg).await.unwrap();
        u.reconcile(&nl, &[lease_peer(2)]).await.unwrap();
        u
    });
    assert_eq!(user.implementation(), "userspace");
    ping_ok(&a, "10.5.3.0", "kernel -> userspace");
    ping_ok(&b, "10.5.2.0", "userspace -> kernel");
    full_size_udp(&a, "10.5.2.0", &b, "10.5.3.0");
    full_size_udp(&b, "10.5.3.0", &a, "10.5.2.0");
    let tcp_to = tcp_transfer(&a, "10.5.2.0", &b, "10.5.3.0", 0x7eed_2003);
    let tcp_back = tcp_transfer(&b, "10.5.3.0", &a, "10.5.2.0", 0x7eed_3002);
    let (_, ks) = node_run(&a, 2, vec![lease_peer(3)]);
    let us = user.peer_stats();
    assert_eq!((ks.len(), us.len()), (1, 1), "{ks:?} {us:?}");
    for (side, s) in [("kernel", &ks[0]), ("userspace", &us[0])] {
        assert!(
            s.last_handshake.is_some() && s.rx_bytes > 0 && s.tx_bytes > 0,
            "{side}: {s:?}"
        );
    }
    assert_eq!(ks[0].public_key, PrivateKey::from_bytes([3; 32]).public());
    assert_eq!(us[0].public_key, PrivateKey::from_bytes([2; 32]).public());
    eprintln!(
        "mixed mesh: kernel node read back {:?}; userspace node {:?}; TCP {TCP_BYTES} B kernel \
         -> userspace in {tcp_to:?}, back in {tcp_back:?}",
        ks[0], us[0]
    );
    drop(user);
}

/// Datagrams per second of each [`Stream`]: the rate issue 17 names for restarts under load.
const STREAM_RATE: u64 = 1000;

/// A sequenced UDP stream at [`STREAM_RATE`] from `from_ip` (a socket made in `from`) to
/// `to_ip` (a socket made in `to`), through the tunnel. The sender keeps an absolute schedule
/// (datagram `i` is due at `i` ms), so a thread the emulator stalls catches up with a burst
/// instead of sending fewer; the receiver stamps each arrival. Unlike `ping`, every datagram
/// has its own sequence number, so losses, duplicates and the longest silence are exact.
struct Stream {
    what: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sender: std::thread::JoinHandle<(u64, u64)>,
    receiver: std::thread::JoinHandle<Vec<(u64, std::time::Instant)>>,
    /// A test that panics mid-stream must not leave its threads sending until the binary exits.
    _stop_on_drop: StopOnDrop,
}

struct StopOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What a [`Stream`] saw: datagrams sent (send errors count as sent and lost), received
/// (unique), duplicates, and the longest time between two arrivals.
#[derive(Debug)]
struct StreamReport {
    what: String,
    sent: u64,
    send_errors: u64,
    received: u64,
    duplicates: u64,
    max_gap: std::time::Duration,
    /// Arrival times, in order.
    arrivals: Vec<std::time::Instant>,
}

impl StreamReport {
    fn lost(&self) -> u64 {
        self.sent - self.received
    }

    /// From `t` to the first arrival after it.
    fn next_arrival_after(&self, t: std::time::Instant) -> Option<std::time::Duration> {
        self.arrivals.iter().find(|a| **a >= t).map(|a| *a - t)
    }
}

impl std::fmt::Display for StreamReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} sent, {} lost ({} send errors), {} duplicates, longest gap {:?}",
            self.what,
            self.sent,
            self.lost(),
            self.send_errors,
            self.duplicates,
            self.max_gap
        )
    }
}

impl Stream {
    fn start(from: &NetnsGuard, from_ip: &str, to: &NetnsGuard, to_ip: &str) -> Stream {
        use std::net::{SocketAddr, UdpSocket};
        use std::os::fd::AsRawFd;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        use std::time::{Duration, Instant};
        let what = format!("{from_ip} -> {to_ip}");
        let src: SocketAddr = format!("{from_ip}:0").parse().unwrap();
        let dst: SocketAddr = format!("{to_ip}:0").parse().unwrap();
        let rx = to.enter(move || UdpSocket::bind(dst).unwrap());
        let tx = from.enter(move || UdpSocket::bind(src).unwrap());
        // A receiver the emulator stalls for a while must not drop at its socket: 4 MiB
        // (FORCE: past rmem_max, we are root).
        let size: libc::c_int = 4 << 20;
        // SAFETY: a valid socket and an int option of the right size.
        let rc = unsafe {
            libc::setsockopt(
                rx.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
        // The sender's silence for this long (TCG included) ends the receiver.
        rx.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        let dst = rx.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let sending = Arc::new(AtomicBool::new(true));
        let (s, s2) = (stop.clone(), sending.clone());
        let sender = std::thread::spawn(move || {
            let t0 = Instant::now();
            let (mut seq, mut errors) = (0u64, 0u64);
            let mut buf = [0u8; 64];
            while !s.load(Ordering::Relaxed) {
                let due = t0 + Duration::from_micros(seq * 1_000_000 / STREAM_RATE);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                buf[..8].copy_from_slice(&seq.to_be_bytes());
                if tx.send_to(&buf, dst).is_err() {
                    errors += 1;
                }
                seq += 1;
            }
            s2.store(false, Ordering::Relaxed);
            (seq, errors)
        });
        let receiver = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 128];
            loop {
                match rx.recv_from(&mut buf) {
                    Ok((n, _)) if n >= 8 => got.push((
                        u64::from_be_bytes(buf[..8].try_into().unwrap()),
                        Instant::now(),
                    )),
                    Ok(_) => {}
                    // Silence: done once the sender has stopped; else the path is down, and
                    // the datagrams sent meanwhile count as lost.
                    Err(_) if !sending.load(Ordering::Relaxed) => return got,
                    Err(_) => {}
                }
            }
        });
        Stream {
            what,
            _stop_on_drop: StopOnDrop(stop.clone()),
            stop,
            sender,
            receiver,
        }
    }

    /// Stops sending, waits for the datagrams in flight, and counts.
    fn finish(self) -> StreamReport {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.collect()
    }

    /// Stops both streams at once (so they cover the same time), then counts each.
    fn finish_both(streams: [Stream; 2]) -> [StreamReport; 2] {
        for s in &streams {
            s.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        streams.map(Stream::finish)
    }

    fn collect(self) -> StreamReport {
        let (sent, send_errors) = self.sender.join().unwrap();
        let got = self.receiver.join().unwrap();
        let mut seen = std::collections::HashSet::new();
        let duplicates = got.iter().filter(|(s, _)| !seen.insert(*s)).count() as u64;
        let max_gap = got
            .windows(2)
            .map(|w| w[1].1 - w[0].1)
            .max()
            .unwrap_or_default();
        StreamReport {
            what: self.what,
            sent,
            send_errors,
            received: seen.len() as u64,
            duplicates,
            max_gap,
            arrivals: got.into_iter().map(|(_, t)| t).collect(),
        }
    }
}

/// Streams both ways between node 2 (`a`, 10.5.2.0) and node 3 (`b`, 10.5.3.0).
fn streams_both_ways(a: &NetnsGuard, b: &NetnsGuard) -> [Stream; 2] {
    [
        Stream::start(a, "10.5.2.0", b, "10.5.3.0"),
        Stream::start(b, "10.5.3.0", a, "10.5.2.0"),
    ]
}

/// Node `own`'s backend ([`node_cfg`]), set up in `ns` and reconciled with `peers`, kept for
/// later passes.
fn node_up(ns: &NetnsGuard, own: u8, peers: Vec<WgPeer>) -> WgBackend {
    let cfg = node_cfg(own);
    with_netlink_in(ns, move |nl| async move {
        let mut b = WgBackend::setup(&nl, cfg).await.unwrap();
        b.reconcile(&nl, &peers).await.unwrap();
        b
    })
}

/// One more reconcile of a kept backend in its namespace: the backend and the writes it made.
fn node_reconcile(ns: &NetnsGuard, mut b: WgBackend, peers: Vec<WgPeer>) -> (WgBackend, usize) {
    with_netlink_in(ns, move |nl| async move {
        let n = b.reconcile(&nl, &peers).await.unwrap().ops_applied;
        (b, n)
    })
}

/// The peer of node `own` as another node reads it from `own`'s lease JSON (as published with
/// `public`), the way the agent's lease watch does.
fn peer_from_lease(own: u8, public: &tweed_agent::backend::wireguard::PublicKey) -> WgPeer {
    let json =
        tweed_agent::backend::wireguard::plan::lease_attrs([192, 0, 2, own].into(), public, 51820)
            .to_json();
    let attrs = tweed_config::LeaseAttrs::parse(json.as_bytes()).unwrap();
    WgPeer::from_lease(format!("10.5.{own}.0/24").parse().unwrap(), &attrs, 51820).unwrap()
}

/// Issue 18 on the kernel path: node 2 rotates its key as the agent does (the new key set on
/// its backend, one reconcile: the device write), then node 3 reconciles with node 2's lease
/// as republished (new `PublicKey`), while datagrams flow both ways at 1,000/s. Node 3's device
/// must hold only the new key, node 2's device must use it, and the longest silence in either
/// direction must stay under WireGuard's REKEY_TIMEOUT (5 s): one handshake, not a refused
/// handshake and a retry. The figures are printed (TCG: slow, a loose bound on purpose).
#[test]
fn kernel_key_rotation_under_traffic_replaces_the_peer_within_one_handshake() {
    require_root!(NEEDS_ROOT);
    let a = NetnsGuard::unique("tw-wra-");
    let b = NetnsGuard::unique("tw-wrb-");
    if !kernel_has_wireguard(&a) {
        eprintln!("no wireguard module in this kernel: rotation under traffic runs only in the VM");
        return;
    }
    underlay(&a, &b);
    let old = PrivateKey::from_bytes([2; 32]).public();
    let na = node_up(&a, 2, vec![lease_peer(3)]);
    let nb = node_up(&b, 3, vec![peer_from_lease(2, &old)]);
    ping_ok(&a, "10.5.3.0", "before the rotation");
    let streams = streams_both_ways(&a, &b);
    std::thread::sleep(std::time::Duration::from_secs(1));

    let new_key = PrivateKey::generate();
    let new = new_key.public();
    let t0 = std::time::Instant::now();
    let mut na = na;
    na.set_private_key(new_key);
    let (na, writes_a) = node_reconcile(&a, na, vec![lease_peer(3)]);
    // Node 2 -> 3 is paused from node 2's switch until node 3 knows the new key and a
    // handshake is done; what node 3's reconcile starts is that handshake.
    let t_b = std::time::Instant::now();
    let (nb, writes_b) = node_reconcile(&b, nb, vec![peer_from_lease(2, &new)]);
    let (switch, update) = (t_b - t0, t_b.elapsed());
    std::thread::sleep(std::time::Duration::from_secs(2));
    let reports = Stream::finish_both(streams);
    for r in &reports {
        eprintln!("rotation under traffic: {r}");
    }
    let resumed = reports[0].next_arrival_after(t_b);
    eprintln!(
        "kernel key rotation under traffic: node 2's switch {switch:?} ({writes_a} write), node \
         3's update {update:?} ({writes_b} writes); node 2 -> 3 flowing again {resumed:?} after \
         node 3's update began; longest pause {:?} / {:?}, lost {} / {} of {} / {}",
        reports[0].max_gap,
        reports[1].max_gap,
        reports[0].lost(),
        reports[1].lost(),
        reports[0].sent,
        reports[1].sent
    );

    // Node 2: the device's key; node 3: the new peer entry, then the old one removed.
    assert_eq!((writes_a, writes_b), (1, 2));
    assert_eq!(
        in_ns(a.name(), &["wg", "show", "tweed-wg", "public-key"]).trim(),
        new.to_string()
    );
    let peers_b = in_ns(b.name(), &["wg", "show", "tweed-wg", "peers"]);
    assert_eq!(
        peers_b.trim(),
        new.to_string(),
        "node 3 still has another peer"
    );
    let hs = wg_latest_handshake(&b, "tweed-wg", &new.to_string());
    assert!(hs > 0, "no handshake under the new key");
    let resumed = resumed.expect("nothing from node 2 after node 3's update");
    assert!(
        resumed < std::time::Duration::from_secs(5),
        "node 2 -> 3 back only {resumed:?} after node 3's update began: a refused handshake and \
         a retry"
    );
    for r in &reports {
        assert!(r.received > 0 && r.duplicates == 0, "{r}");
        assert!(
            r.max_gap < std::time::Duration::from_secs(5),
            "a pause past REKEY_TIMEOUT (a refused handshake and a retry): {r}"
        );
    }
    // And traffic after the rotation.
    ping_ok(&a, "10.5.3.0", "after the rotation");
    drop((na, nb));
}

/// `ip monitor` on the links, addresses and routes of `ns`, as a child process: an oracle
/// independent of our netlink code for "no rtnetlink write" (a write of any of these makes an
/// event, also one that changes nothing visible, e.g. a route replaced by the same one).
struct Monitor(std::process::Child);

/// Also when the test panics between start and finish: an orphaned `ip monitor` would keep the
/// namespace alive.
impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Monitor {
    fn start(ns: &NetnsGuard) -> Monitor {
        Monitor::spawn(&["ip", "-n", ns.name(), "monitor", "link", "address", "route"])
    }

    /// `nft monitor` in `ns`: every nftables change there, which covers iptables-nft's (the
    /// agent's rules go through `iptables-restore`, which iptables-nft turns into nf_tables
    /// netlink messages).
    fn start_nft(ns: &NetnsGuard) -> Monitor {
        Monitor::spawn(&["ip", "netns", "exec", ns.name(), "nft", "monitor"])
    }

    fn spawn(argv: &[&str]) -> Monitor {
        use std::process::{Command, Stdio};
        let child = Command::new(argv[0])
            .args(&argv[1..])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("ip monitor");
        // Subscribed before anything happens: TCG takes its time to start a process.
        std::thread::sleep(std::time::Duration::from_secs(1));
        Monitor(child)
    }

    /// Adds a marker address to `lo` (a positive control: it must show, so the monitor was
    /// listening), then stops: the events before the marker.
    fn finish(self, ns: &NetnsGuard) -> Vec<String> {
        ip_in(ns.name(), &["addr", "add", "127.9.9.9/32", "dev", "lo"]);
        self.until("127.9.9.9")
    }

    /// [`finish`](Self::finish) for [`start_nft`](Self::start_nft): the marker is a table.
    fn finish_nft(self, ns: &NetnsGuard) -> Vec<String> {
        in_ns(ns.name(), &["nft", "add", "table", "ip", "twmarker"]);
        self.until("twmarker")
    }

    /// The lines before the first one holding `marker` (which must come within 20 s).
    fn until(mut self, marker: &str) -> Vec<String> {
        use std::io::{BufRead, BufReader};
        let out = self.0.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut before = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let seen = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l.contains(marker) => break true,
                Ok(l) => before.push(l),
                Err(_) => break false,
            }
        };
        let _ = self.0.kill();
        let _ = self.0.wait();
        assert!(
            seen,
            "the monitor never showed the marker {marker}: {before:?}"
        );
        before
    }
}

/// Issue 17 on the kernel path: node 2's backend stopped and started again as the agent
/// restarts (same key, the device kept) while datagrams flow both ways at 1,000/s. The new
/// backend's set-up and first reconcile write nothing (its own count; and `ip monitor` sees no
/// link, address or route event), and not one datagram is lost either way.
#[test]
fn kernel_backend_restart_under_traffic_loses_nothing_and_writes_nothing() {
    require_root!(NEEDS_ROOT);
    let a = NetnsGuard::unique("tw-wsa-");
    let b = NetnsGuard::unique("tw-wsb-");
    if !kernel_has_wireguard(&a) {
        eprintln!("no wireguard module in this kernel: restart under traffic runs only in the VM");
        return;
    }
    underlay(&a, &b);
    let na = node_up(&a, 2, vec![lease_peer(3)]);
    let nb = node_up(&b, 3, vec![lease_peer(2)]);
    ping_ok(&a, "10.5.3.0", "before the restart");
    ping_ok(&b, "10.5.2.0", "before the restart");
    let monitor = Monitor::start(&a);
    let streams = streams_both_ways(&a, &b);
    std::thread::sleep(std::time::Duration::from_secs(1));

    let t0 = std::time::Instant::now();
    let (setup, first, na) = with_netlink_in(&a, move |nl| async move {
        let mut old = na;
        old.stop().await;
        drop(old);
        let mut b = WgBackend::setup(&nl, node_cfg(2)).await.unwrap();
        let setup = b.setup_ops().len();
        let first = b
            .reconcile(&nl, &[lease_peer(3)])
            .await
            .unwrap()
            .ops_applied;
        (setup, first, b)
    });
    let took = t0.elapsed();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let reports = Stream::finish_both(streams);
    let events = monitor.finish(&a);

    for r in &reports {
        eprintln!("restart under traffic: {r}");
    }
    eprintln!(
        "kernel restart under traffic: stop + set-up + reconcile in {took:?}, {setup} + {first} \
         writes, {} rtnetlink events; lost {} / {} of {} / {}, longest gap {:?} / {:?}",
        events.len(),
        reports[0].lost(),
        reports[1].lost(),
        reports[0].sent,
        reports[1].sent,
        reports[0].max_gap,
        reports[1].max_gap
    );
    assert_eq!(na.implementation(), "kernel");
    assert_eq!(
        (setup, first),
        (0, 0),
        "the restart wrote to a device that was right"
    );
    assert!(
        events.is_empty(),
        "rtnetlink events during the restart: {events:?}"
    );
    for r in &reports {
        assert!(r.sent > 1000, "{r}");
        assert_eq!((r.lost(), r.duplicates), (0, 0), "{r}");
    }
    drop((na, nb));
}

// ------------------------------------------------------------------ the whole agent, with etcd

/// The programs the whole-agent test runs: `$TWEED_TWEEDD` (the VM's copy) or the one Cargo
/// built with this test.
fn tweedd_bin() -> String {
    std::env::var("TWEED_TWEEDD").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tweedd").to_string())
}

/// One node's `tweedd`, in its namespace, with its files under `dir`; killed (SIGKILL) and
/// reaped when dropped, also on panic.
struct Agent {
    ns: String,
    dir: std::path::PathBuf,
    iface: &'static str,
    ip: &'static str,
    etcd: String,
    child: Option<std::process::Child>,
    runs: usize,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Agent {
    fn new(ns: &NetnsGuard, iface: &'static str, ip: &'static str, etcd: &str) -> Agent {
        let dir = std::env::temp_dir().join(format!("{}-agent", ns.name()));
        std::fs::create_dir_all(dir.join("lib")).unwrap();
        Agent {
            ns: ns.name().to_string(),
            dir,
            iface,
            ip,
            etcd: etcd.to_string(),
            child: None,
            runs: 0,
        }
    }

    fn subnet_file(&self) -> std::path::PathBuf {
        self.dir.join("subnet.env")
    }

    /// Starts `bin` as this node's agent, the kernel WireGuard path forced (a missing module is
    /// then an error, not a fallback to userspace); its log is `tweedd-<run>.log`.
    fn start(&mut self, bin: &str) -> std::path::PathBuf {
        assert!(self.child.is_none(), "{}: an agent still runs", self.ns);
        self.runs += 1;
        let log = self.dir.join(format!("tweedd-{}.log", self.runs));
        let out = std::fs::File::create(&log).unwrap();
        let (subnet, state, sock) = (
            self.subnet_file(),
            self.dir.join("lib"),
            self.dir.join("tweedd.sock"),
        );
        let metrics = format!("{}:9867", self.ip);
        let argv = [
            bin,
            "--etcd-endpoints",
            &self.etcd,
            "--iface",
            self.iface,
            "--subnet-file",
            subnet.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--api-socket",
            sock.to_str().unwrap(),
            "--metrics-addr",
            &metrics,
            "--wireguard-impl",
            "kernel",
            // Both chains (nat and filter), as a real node runs: without it there is no nat
            // chain, and iptables-nft names a missing chain "incompatible".
            "--ip-masq",
        ];
        let child = tweed_testkit::cmd::ns_command(&self.ns, &argv)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("{bin}: {e}"));
        self.child = Some(child);
        log
    }

    /// Waits for the agent's "ready" line in `log` (lease held, data plane programmed,
    /// subnet.env written).
    fn wait_ready(&mut self, log: &std::path::Path) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.contains("ready: lease held") {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("{}: tweedd exited ({status}):\n{text}", self.ns);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{}: tweedd not ready in 90 s:\n{text}",
                self.ns
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// SIGTERM, as `systemctl stop` sends it, and the wait for the exit.
    fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("an agent runs");
        // SAFETY: the pid of a child we have not reaped yet.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        c.wait().unwrap()
    }

    /// The agent's node subnet, from the subnet.env it wrote.
    fn subnet(&self) -> ipnetwork::Ipv4Network {
        tweed_config::SubnetEnv::read(&self.subnet_file())
            .unwrap()
            .node_subnet()
            .expect("IPv4 pair")
    }

    /// The agent's IPv6 node subnet (its network address), from the subnet.env it wrote.
    fn subnet6(&self) -> ipnetwork::Ipv6Network {
        tweed_config::SubnetEnv::read(&self.subnet_file())
            .unwrap()
            .ipv6
            .expect("IPv6 pair")
            .node_subnet()
    }

    /// `/metrics`, fetched from inside the node's namespace.
    fn metrics(&self, ns: &NetnsGuard) -> String {
        let addr = format!("{}:9867", self.ip);
        ns.enter(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
                .unwrap();
            write!(
                s,
                "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut body = String::new();
            s.read_to_string(&mut body).unwrap();
            body
        })
    }
}

/// The value of an unlabelled counter in a Prometheus text page.
fn metric(page: &str, name: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{page}"))
}

/// Where a datagram can be dropped on its way pod -> node -> tunnel -> node -> pod, as named
/// counters: the backlog of the (one) CPU (`/proc/net/softnet_stat`, second column), each
/// node's device and veth drops, each pod's UDP receive buffer errors. Read before and after
/// a restart: a loss with no write by the agent is then placed.
fn drop_counters(nodes: &[&NetnsGuard], pods: &[&NetnsGuard]) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let softnet = std::fs::read_to_string("/proc/net/softnet_stat").unwrap_or_default();
    let backlog: u64 = softnet
        .lines()
        .filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok())
        .sum();
    out.push(("softnet backlog".to_string(), backlog));
    for n in nodes {
        for dev in ["tweed-wg", "vpod", "ua", "ub"] {
            for dir in ["rx", "tx"] {
                let f = format!("/sys/class/net/{dev}/statistics/{dir}_dropped");
                if let Ok(v) = tweed_testkit::try_in_ns(n.name(), &["cat", &f]) {
                    out.push((
                        format!("{} {dev} {dir}_dropped", n.name()),
                        v.trim().parse().unwrap_or(0),
                    ));
                }
            }
        }
    }
    for p in pods {
        let snmp = in_ns(p.name(), &["cat", "/proc/net/snmp"]);
        let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
        if let [names, values] = udp[..] {
            for (k, v) in names
                .split_whitespace()
                .zip(values.split_whitespace())
                .skip(1)
            {
                if k == "RcvbufErrors" || k == "InErrors" || k == "SndbufErrors" {
                    out.push((format!("{} udp {k}", p.name()), v.parse().unwrap_or(0)));
                }
            }
        }
    }
    out
}

/// The counters of [`drop_counters`] that grew from `before` to `after`.
fn grown(before: &[(String, u64)], after: &[(String, u64)]) -> Vec<String> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let b = before.iter().find(|(bk, _)| bk == k).map_or(0, |(_, b)| *b);
            (*v > b).then(|| format!("{k} +{}", v - b))
        })
        .collect()
}

/// A pod on a node, as a point-to-point CNI makes one: namespace `pod` with `eth0` holding
/// `ip`/32 and a default route via 169.254.1.1, the node's end of the veth; the node routes
/// `ip`/32 to that veth and forwards.
fn pod_on(node: &NetnsGuard, pod: &NetnsGuard, ip: std::net::Ipv4Addr) {
    let (n, p, ip32) = (node.name(), pod.name(), format!("{ip}/32"));
    ip_in(
        n,
        &[
            "link", "add", "vpod", "type", "veth", "peer", "name", "eth0", "netns", p,
        ],
    );
    ip_in(n, &["addr", "add", "169.254.1.1/32", "dev", "vpod"]);
    ip_in(n, &["link", "set", "vpod", "up"]);
    ip_in(n, &["route", "add", &ip32, "dev", "vpod"]);
    ip_in(p, &["addr", "add", &ip32, "dev", "eth0"]);
    ip_in(p, &["link", "set", "lo", "up"]);
    ip_in(p, &["link", "set", "eth0", "up"]);
    ip_in(p, &["route", "add", "169.254.1.1", "dev", "eth0"]);
    ip_in(
        p,
        &[
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
        ],
    );
    node.enter(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap());
}

/// [`pod_on`]'s IPv6 half: `ip`/128 on the pod's `eth0`, a default route via fe80::1 (the
/// node's end of the veth), and on the node `ip`/128 to that veth, IPv6 forwarding on.
fn pod6_on(node: &NetnsGuard, pod: &NetnsGuard, ip: std::net::Ipv6Addr) {
    let (n, p, ip128) = (node.name(), pod.name(), format!("{ip}/128"));
    ip_in(
        n,
        &["-6", "addr", "add", "fe80::1/64", "dev", "vpod", "nodad"],
    );
    ip_in(n, &["-6", "route", "add", &ip128, "dev", "vpod"]);
    ip_in(p, &["-6", "addr", "add", &ip128, "dev", "eth0", "nodad"]);
    ip_in(
        p,
        &[
            "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
        ],
    );
    node.enter(|| std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1").unwrap());
}

/// `ping6` from `ns` to `dst`, panicking with the output when none is answered.
fn ping6_ok(ns: &NetnsGuard, dst: &str, what: &str) {
    let (ok, out) = tweed_testkit::probe_in(ns.name(), &["ping6", "-c", "3", "-W", "3", dst]);
    assert!(ok, "{what}: no ping6 from {} to {dst}: {out}", ns.name());
}

/// Issue 18 with the whole agent on a dual-stack network: etcd, two `tweedd` (kernel forced)
/// with an IPv4 and an IPv6 underlay address on `--iface`, `"Mode": mode`, and a dual-stack pod
/// on each. Pods reach each other over both families; wg(8) reads back what flannel's mode
/// means (separate: `tweed-wg` at the IPv4 endpoint and `tweed-wg-v6` at `[PublicIPv6]:51821`;
/// ipv6: one `tweed-wg` at `[PublicIPv6]:51820`, both subnets allowed); the per-peer metrics
/// carry each device; a restarted agent writes nothing (0 netlink ops, 0 rule installs).
fn whole_agent_dual_stack(mode: &str, tag: &str) {
    let a = NetnsGuard::unique(&format!("tw-{tag}a-"));
    let b = NetnsGuard::unique(&format!("tw-{tag}b-"));
    if !kernel_has_wireguard(&a) {
        eprintln!("no wireguard module in this kernel: the whole agent in Mode {mode} runs only in the VM");
        return;
    }
    underlay(&a, &b);
    for (ns, dev, addr) in [(&a, "ua", "2001:db8::2/64"), (&b, "ub", "2001:db8::3/64")] {
        ip_in(ns.name(), &["-6", "addr", "add", addr, "dev", dev, "nodad"]);
    }
    let etcd_dir = std::env::temp_dir().join(format!("{}-etcd", a.name()));
    let files = RemoveOnDrop(vec![etcd_dir.clone()]);
    let mut opts = tweed_lab::etcd::EtcdOptions::local(tag, etcd_dir.join("data"));
    opts.netns = Some(a.name().to_string());
    opts.listen_ip = [192, 0, 2, 2].into();
    opts.client_port = 2379;
    opts.peer_port = 2380;
    opts.log_file = Some(etcd_dir.join("etcd.log"));
    let etcd = tweed_lab::etcd::EtcdProcess::start(opts).unwrap();
    let conf = format!(
        r#"{{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:244::/56","Backend":{{"Type":"wireguard","Mode":"{mode}"}}}}"#
    );
    etcd.ctl(&["put", "/coreos.com/network/config", &conf])
        .unwrap();
    let endpoint = etcd.endpoints()[0].clone();
    let bin = tweedd_bin();
    let mut agents = [
        Agent::new(&a, "ua", "192.0.2.2", &endpoint),
        Agent::new(&b, "ub", "192.0.2.3", &endpoint),
    ];
    for ag in &mut agents {
        let log = ag.start(&bin);
        ag.wait_ready(&log);
    }
    let pods = [
        NetnsGuard::unique(&format!("tw-{tag}pa-")),
        NetnsGuard::unique(&format!("tw-{tag}pb-")),
    ];
    let mut ips = Vec::new();
    for (i, node) in [&a, &b].into_iter().enumerate() {
        let v4 = std::net::Ipv4Addr::from(u32::from(agents[i].subnet().network()) + 5);
        let v6 = std::net::Ipv6Addr::from(u128::from(agents[i].subnet6().network()) + 5);
        pod_on(node, &pods[i], v4);
        pod6_on(node, &pods[i], v6);
        ips.push((v4.to_string(), v6.to_string()));
    }
    // Each agent has programmed the other's lease, on the device that carries IPv6.
    let dev6 = if mode == "separate" {
        "tweed-wg-v6"
    } else {
        "tweed-wg"
    };
    for (i, ns) in [&a, &b].into_iter().enumerate() {
        let want = agents[1 - i].subnet6().to_string();
        tweed_testkit::wait_for(
            std::time::Duration::from_secs(60),
            "the peer's IPv6 subnet programmed",
            || in_ns(ns.name(), &["wg", "show", dev6, "allowed-ips"]).contains(&want),
        );
    }
    for (from, to) in [(0, 1), (1, 0)] {
        ping_ok(
            &pods[from],
            &ips[to].0,
            &format!("Mode {mode}: pod to pod, IPv4"),
        );
        ping6_ok(
            &pods[from],
            &ips[to].1,
            &format!("Mode {mode}: pod to pod, IPv6"),
        );
    }
    let ends = in_ns(a.name(), &["wg", "show", "tweed-wg", "endpoints"]);
    let devices = links(&a);
    if mode == "separate" {
        let ends6 = in_ns(a.name(), &["wg", "show", "tweed-wg-v6", "endpoints"]);
        assert!(ends.contains("192.0.2.3:51820"), "{ends}");
        assert!(ends6.contains("[2001:db8::3]:51821"), "{ends6}");
    } else {
        assert!(
            ends.contains("[2001:db8::3]:51820") && !ends.contains("192.0.2."),
            "{ends}"
        );
        assert!(!devices.contains("tweed-wg-v6"), "{devices}");
        let allowed = in_ns(a.name(), &["wg", "show", "tweed-wg", "allowed-ips"]);
        assert!(
            allowed.contains(&agents[1].subnet().to_string())
                && allowed.contains(&agents[1].subnet6().to_string()),
            "{allowed}"
        );
    }
    let page = agents[0].metrics(&a);
    let want = format!(r#"device="{dev6}""#);
    assert!(
        page.lines()
            .any(|l| l.starts_with("tweed_wireguard_peer_bytes") && l.contains(&want)),
        "no per-peer figures for {dev6}:\n{page}"
    );
    // A restart finds everything right.
    let status = agents[1].stop();
    assert!(status.success(), "tweedd exit on SIGTERM: {status}");
    let log = agents[1].start(&bin);
    agents[1].wait_ready(&log);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let page = agents[1].metrics(&b);
    let (ops, rules) = (
        metric(&page, "tweed_netlink_ops_total"),
        metric(&page, "tweed_rules_resyncs_total"),
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        (ops, rules),
        (0, 0),
        "Mode {mode}: the restart wrote:\n{text}"
    );
    ping6_ok(
        &pods[0],
        &ips[1].1,
        &format!("Mode {mode}: IPv6 after the restart"),
    );
    ping_ok(
        &pods[0],
        &ips[1].0,
        &format!("Mode {mode}: IPv4 after the restart"),
    );
    eprintln!(
        "whole-agent Mode {mode}: ping and ping6 pod to pod both ways; {dev6} endpoints read back; restart: {ops} netlink ops, {rules} rule installs"
    );
    drop(agents);
    drop(etcd);
    drop(files);
}

#[test]
fn whole_agent_separate_mode_carries_dual_stack_pods_and_restarts_without_writes() {
    require_root!(NEEDS_ROOT);
    whole_agent_dual_stack("separate", "wds");
}

#[test]
fn whole_agent_ipv6_mode_carries_dual_stack_pods_and_restarts_without_writes() {
    require_root!(NEEDS_ROOT);
    whole_agent_dual_stack("ipv6", "wd6");
}

/// Issue 17 item 2 on the kernel path with the whole agent: etcd, two `tweedd` nodes with
/// `"Backend":{"Type":"wireguard"}` (kernel forced) and a pod on each, 1,000 datagrams/s pod
/// to pod each way. Each node's agent in turn is stopped (SIGTERM) and started again, node 3's
/// from a second copy of the binary (an upgrade), node 2's from the first. Asserted per
/// restart: not one datagram lost or duplicated either way; no link, address or route event
/// in the node's namespace (`ip monitor`) and no nftables change (`nft monitor`: the agent's
/// iptables-nft rules) from stop to ready and 2 s after; the new agent counts 0 netlink ops
/// and 0 rule (re)installs, and runs the kernel device.
#[test]
fn whole_agent_restart_under_pod_traffic_loses_nothing_and_writes_nothing() {
    require_root!(NEEDS_ROOT);
    let a = NetnsGuard::unique("tw-waa-");
    let b = NetnsGuard::unique("tw-wab-");
    if !kernel_has_wireguard(&a) {
        eprintln!(
            "no wireguard module in this kernel: the whole-agent restart runs only in the VM"
        );
        return;
    }
    underlay(&a, &b);
    // etcd on node 2's underlay address, as a cluster's etcd on one of its hosts.
    let etcd_dir = std::env::temp_dir().join(format!("{}-etcd", a.name()));
    // Declared before etcd and the agents, so it runs after they are stopped, on a failed
    // assertion too.
    let mut files = RemoveOnDrop(vec![etcd_dir.clone()]);
    let mut opts = tweed_lab::etcd::EtcdOptions::local("wgk", etcd_dir.join("data"));
    opts.netns = Some(a.name().to_string());
    opts.listen_ip = [192, 0, 2, 2].into();
    opts.client_port = 2379;
    opts.peer_port = 2380;
    opts.log_file = Some(etcd_dir.join("etcd.log"));
    let etcd = tweed_lab::etcd::EtcdProcess::start(opts).unwrap();
    etcd.ctl(&[
        "put",
        "/coreos.com/network/config",
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}"#,
    ])
    .unwrap();
    let endpoint = etcd.endpoints()[0].clone();

    let old_bin = tweedd_bin();
    // The upgrade's "new" binary: another file, as a package upgrade leaves it.
    let new_bin = std::env::temp_dir().join(format!("{}-tweedd-new", b.name()));
    files.0.push(new_bin.clone());
    std::fs::copy(&old_bin, &new_bin).unwrap();
    let new_bin = new_bin.to_str().unwrap().to_string();

    let mut agents = [
        Agent::new(&a, "ua", "192.0.2.2", &endpoint),
        Agent::new(&b, "ub", "192.0.2.3", &endpoint),
    ];
    for ag in &mut agents {
        let log = ag.start(&old_bin);
        ag.wait_ready(&log);
    }
    let pods = [NetnsGuard::unique("tw-wpa-"), NetnsGuard::unique("tw-wpb-")];
    let ips: Vec<std::net::Ipv4Addr> = agents
        .iter()
        .map(|ag| std::net::Ipv4Addr::from(u32::from(ag.subnet().network()) + 5))
        .collect();
    pod_on(&a, &pods[0], ips[0]);
    pod_on(&b, &pods[1], ips[1]);
    // Both agents see each other's lease (the peers are programmed) before the first ping.
    for (i, ns) in [&a, &b].into_iter().enumerate() {
        let want = agents[1 - i].subnet().to_string();
        tweed_testkit::wait_for(
            std::time::Duration::from_secs(60),
            "the peer's lease programmed",
            || in_ns(ns.name(), &["wg", "show", "tweed-wg", "allowed-ips"]).contains(&want),
        );
    }
    // The rules are there and iptables (nf_tables backend) reads them back, as the agent's
    // own check does.
    for ns in [&a, &b] {
        let nat = in_ns(
            ns.name(),
            &["iptables", "-w", "5", "-t", "nat", "-S", "TWEED-POSTRTG"],
        );
        assert!(
            nat.contains("MASQUERADE"),
            "{}: nat chain: {nat}",
            ns.name()
        );
        let fwd = in_ns(ns.name(), &["iptables", "-w", "5", "-S", "TWEED-FWD"]);
        assert!(
            fwd.contains("ACCEPT"),
            "{}: forward chain: {fwd}",
            ns.name()
        );
    }
    let (ip_a, ip_b) = (ips[0].to_string(), ips[1].to_string());
    ping_ok(&pods[0], &ip_b, "pod to pod before the restarts");
    ping_ok(&pods[1], &ip_a, "pod to pod before the restarts");

    // Node 3 first, with the new binary; then node 2 (etcd's host) with the same one.
    for (i, node, bin) in [(1usize, &b, &new_bin), (0, &a, &old_bin)] {
        let who = format!("node {}", i + 2);
        let ip_mon = Monitor::start(node);
        let nft_mon = Monitor::start_nft(node);
        let streams = [
            Stream::start(&pods[0], &ip_a, &pods[1], &ip_b),
            Stream::start(&pods[1], &ip_b, &pods[0], &ip_a),
        ];
        let counters_before = drop_counters(&[&a, &b], &[&pods[0], &pods[1]]);
        // Stateless (no counters) with handles: a rule deleted and added again, even the same,
        // gets a new handle.
        let ruleset_before = in_ns(node.name(), &["nft", "-a", "-s", "list", "ruleset"]);
        std::thread::sleep(std::time::Duration::from_secs(1));
        let t0 = std::time::Instant::now();
        let status = agents[i].stop();
        let stopped = t0.elapsed();
        let log = agents[i].start(bin);
        agents[i].wait_ready(&log);
        let ready = t0.elapsed();
        // Past the agent's first rule check and a round of lease events.
        std::thread::sleep(std::time::Duration::from_secs(2));
        let reports = Stream::finish_both(streams);
        let drops = grown(
            &counters_before,
            &drop_counters(&[&a, &b], &[&pods[0], &pods[1]]),
        );
        let rt_events = ip_mon.finish(node);
        let nft_events = nft_mon.finish_nft(node);
        in_ns(node.name(), &["nft", "delete", "table", "ip", "twmarker"]);
        let ruleset_after = in_ns(node.name(), &["nft", "-a", "-s", "list", "ruleset"]);
        let page = agents[i].metrics(node);
        let (ops, rules, rule_errors) = (
            metric(&page, "tweed_netlink_ops_total"),
            metric(&page, "tweed_rules_resyncs_total"),
            metric(&page, "tweed_rules_errors_total"),
        );
        for r in &reports {
            eprintln!("whole-agent restart of {who}: {r}");
        }
        eprintln!(
            "whole-agent restart under pod traffic ({who}, {}): stopped ({status}) in {stopped:?}, \
             ready again {ready:?} after SIGTERM; {ops} netlink ops, {rules} rule installs, {} \
             rtnetlink and {} nftables events; lost {} / {} of {} / {}, longest gap {:?} / {:?}; \
             drop counters grown: {drops:?}",
            if bin == &new_bin { "new binary" } else { "same binary" },
            rt_events.len(),
            nft_events.len(),
            reports[0].lost(),
            reports[1].lost(),
            reports[0].sent,
            reports[1].sent,
            reports[0].max_gap,
            reports[1].max_gap
        );
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(status.success(), "{who}: tweedd exit on SIGTERM: {status}");
        assert!(
            page.contains(r#"tweed_backend_info{backend="wireguard",implementation="kernel"} 1"#),
            "{who}: not the kernel path:\n{page}"
        );
        assert_eq!(
            (ops, rules, rule_errors),
            (0, 0, 0),
            "{who}: the restarted agent wrote to objects that were right, or could not read \
             its rules:\n{text}"
        );
        assert!(
            ruleset_before.contains("TWEED-POSTRTG") && ruleset_before.contains("TWEED-FWD"),
            "{who}: tweed's chains are not in the ruleset:\n{ruleset_before}"
        );
        assert_eq!(
            ruleset_before, ruleset_after,
            "{who}: the restart changed the ruleset\n{text}"
        );
        // The reconcile's line, not the "ready: ..., data plane programmed, ..." one.
        let wrote = |l: &&str| {
            l.contains("rules (re)installed")
                || (l.contains("data plane programmed") && !l.contains("ready:"))
        };
        assert!(
            !text.lines().any(|l| wrote(&l)),
            "{who}: the restarted agent logged a write:\n{text}"
        );
        assert!(
            rt_events.is_empty(),
            "{who}: rtnetlink events during the restart: {rt_events:?}\n{text}"
        );
        assert!(
            nft_events.is_empty(),
            "{who}: nftables changes during the restart: {nft_events:?}\n{text}"
        );
        for r in &reports {
            assert!(r.sent > 1000, "{who}: {r}");
            assert_eq!(
                (r.lost(), r.duplicates),
                (0, 0),
                "{who}: {r}; drop counters grown: {drops:?}"
            );
        }
        assert!(drops.is_empty(), "{who}: drops: {drops:?}");
    }
    eprintln!("whole-agent kernel restarts: both nodes, 0 lost, 0 writes");

    // The control for "0 rule installs": the restarted agent does check and repair its rules.
    // iptables-nft's changes are announced (`nft monitor`), so a flushed chain comes back
    // within the 100 ms window, not at the next periodic check.
    let node = &a;
    let before = metric(&agents[0].metrics(node), "tweed_rules_resyncs_total");
    let t0 = std::time::Instant::now();
    in_ns(
        node.name(),
        &["iptables", "-w", "5", "-t", "nat", "-F", "TWEED-POSTRTG"],
    );
    tweed_testkit::wait_for(
        std::time::Duration::from_secs(30),
        "the flushed nat chain put back",
        || {
            in_ns(
                node.name(),
                &["iptables", "-w", "5", "-t", "nat", "-S", "TWEED-POSTRTG"],
            )
            .contains("MASQUERADE")
        },
    );
    let repaired = t0.elapsed();
    eprintln!("whole-agent kernel: flushed nat chain repaired in {repaired:?} (under TCG)");
    // Counted once the sync returns, a moment after the chain is back.
    tweed_testkit::wait_for(
        std::time::Duration::from_secs(10),
        "the rule repair counted",
        || metric(&agents[0].metrics(node), "tweed_rules_resyncs_total") > before,
    );
    drop(agents);
    drop(etcd);
    drop(files);
}

/// The test's files outside its namespaces (etcd's data dir, the upgrade's binary copy).
struct RemoveOnDrop(Vec<std::path::PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_dir_all(p).or_else(|_| std::fs::remove_file(p));
        }
    }
}

/// Node `own`'s config in `Mode: separate`, dual stack: IPv6 subnet fd00:5:0:`own`::/64,
/// `PublicIPv6` 2001:db8::`own`, `ListenPortV6` 51821.
fn separate_cfg(own: u8) -> WgConfig {
    let net = tweed_config::NetworkConfig::parse(
        r#"{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:5::/56","Backend":{"Type":"wireguard"}}"#,
    )
    .unwrap();
    WgConfig {
        dual: Some(Box::new(tweed_agent::backend::wireguard::WgDual {
            mode: tweed_config::WireguardMode::Separate,
            listen_port_v6: 51821,
            ipv6: net.ipv6.unwrap(),
            public_ipv6: format!("2001:db8::{own}").parse().unwrap(),
            own_subnet: Some(format!("fd00:5:0:{own}::/64").parse().unwrap()),
        })),
        ..node_cfg(own)
    }
}

/// Node `own`'s lease as it publishes it, read back as a peer by the node with `reader`.
fn separate_peer(
    own: u8,
    reader: &tweed_agent::backend::wireguard::dual::DualLocal,
) -> tweed_agent::backend::wireguard::dual::DualPeer {
    let cfg = separate_cfg(own);
    let attrs = tweed_config::LeaseAttrs::parse(cfg.lease_attrs().to_json().as_bytes()).unwrap();
    let d = cfg.dual.as_ref().unwrap();
    let key = tweed_config::SubnetKey {
        ipv4: cfg.own_subnet,
        ipv6: d.own_subnet,
    };
    tweed_agent::backend::wireguard::dual::DualPeer::from_lease(&key, &attrs, Some(&d.ipv6), reader)
        .unwrap()
}

/// Sets node `own` up in `Mode: separate` in `ns` and reconciles the other's lease twice;
/// the second pass's writes.
fn separate_run(ns: &NetnsGuard, own: u8, other: u8) -> usize {
    with_netlink_in(ns, move |nl| async move {
        let mut b = WgBackend::setup(&nl, separate_cfg(own)).await.unwrap();
        assert_eq!(b.implementation(), "kernel");
        let local = b.dual_local().unwrap();
        let peers = vec![separate_peer(other, &local)];
        b.reconcile_dual(&nl, &peers).await.unwrap();
        b.reconcile_dual(&nl, &peers).await.unwrap().ops_applied
    })
}

/// flannel's default `Mode: separate` on two kernel nodes with an IPv4 and an IPv6 underlay:
/// IPv4 pods through `tweed-wg` at the IPv4 endpoints, IPv6 pods through `tweed-wg-v6` on
/// ListenPortV6 at `[PublicIPv6]:51821` (as wg(8) reads the devices back); a second pass and
/// a restart write nothing. Runs only on a kernel with the module (the VM).
#[test]
fn separate_mode_carries_ipv6_pods_on_a_second_kernel_device() {
    require_root!(NEEDS_ROOT);
    let a = NetnsGuard::unique("tw-wsa-");
    let b = NetnsGuard::unique("tw-wsb-");
    if !kernel_has_wireguard(&a) {
        eprintln!("no wireguard module in this kernel: separate mode runs only in the VMs");
        return;
    }
    underlay(&a, &b);
    for (ns, dev, addr) in [(&a, "ua", "2001:db8::2/64"), (&b, "ub", "2001:db8::3/64")] {
        ip_in(ns.name(), &["-6", "addr", "add", addr, "dev", dev, "nodad"]);
    }
    assert_eq!(separate_run(&a, 2, 3), 0, "a second pass writes nothing");
    assert_eq!(separate_run(&b, 3, 2), 0, "a second pass writes nothing");
    let ports = in_ns(a.name(), &["wg", "show", "tweed-wg-v6", "listen-port"]);
    assert_eq!(ports.trim(), "51821");
    let ends6 = in_ns(a.name(), &["wg", "show", "tweed-wg-v6", "endpoints"]);
    assert!(ends6.contains("[2001:db8::3]:51821"), "{ends6}");
    let allowed6 = in_ns(a.name(), &["wg", "show", "tweed-wg-v6", "allowed-ips"]);
    assert!(
        allowed6.contains("fd00:5:0:3::/64") && !allowed6.contains("10.5."),
        "{allowed6}"
    );
    let ends4 = in_ns(a.name(), &["wg", "show", "tweed-wg", "endpoints"]);
    assert!(ends4.contains("192.0.2.3:51820"), "{ends4}");
    let allowed4 = in_ns(a.name(), &["wg", "show", "tweed-wg", "allowed-ips"]);
    assert!(!allowed4.contains("fd00:"), "{allowed4}");
    let route6 = ip_in(a.name(), &["-6", "route", "show", "dev", "tweed-wg-v6"]);
    assert!(route6.contains("fd00:5::/56"), "{route6}");
    let (ok, out) =
        tweed_testkit::probe_in(a.name(), &["ping6", "-c", "3", "-W", "3", "fd00:5:0:3::"]);
    assert!(ok, "no ping6 through tweed-wg-v6: {out}");
    ping_ok(&a, "10.5.3.0", "separate mode, IPv4 half");
    let hs = in_ns(
        a.name(),
        &["wg", "show", "tweed-wg-v6", "latest-handshakes"],
    );
    let t: u64 = hs
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    assert!(t > 0, "no handshake on tweed-wg-v6: {hs}");
    // A restart finds both devices right, and reads each device's entry for the peer back:
    // the IPv6 one with its own handshake and bytes, listed under the peer's lease.
    let (setup, stats) = with_netlink_in(&a, |nl| async move {
        let mut b = WgBackend::setup(&nl, separate_cfg(2)).await.unwrap();
        let setup = b.setup_ops().len();
        let local = b.dual_local().unwrap();
        let peers = vec![separate_peer(3, &local)];
        b.reconcile_dual(&nl, &peers).await.unwrap();
        b.refresh().await.unwrap();
        (setup, b.peer_stats())
    });
    assert_eq!(setup, 0);
    assert_eq!(stats.len(), 2, "{stats:?}");
    let v6 = stats
        .iter()
        .find(|s| s.device == "tweed-wg-v6")
        .expect("the tweed-wg-v6 entry");
    assert_eq!(
        (
            v6.subnet.map(|n| n.to_string()),
            v6.lease_subnet.map(|n| n.to_string()),
            v6.endpoint
        ),
        (
            Some("fd00:5:0:3::/64".into()),
            Some("10.5.3.0/24".into()),
            Some("[2001:db8::3]:51821".parse().unwrap())
        )
    );
    assert!(
        v6.last_handshake.is_some() && v6.rx_bytes > 0 && v6.tx_bytes > 0,
        "{v6:?}"
    );
    let v4 = stats.iter().find(|s| s.device == "tweed-wg").unwrap();
    assert_eq!(v4.endpoint, Some("192.0.2.3:51820".parse().unwrap()));
    eprintln!(
        "separate mode: ping6 through tweed-wg-v6 ([2001:db8::3]:51821) and ping through tweed-wg; figures read back: {v4:?} / {v6:?}"
    );
}

/// `Mode: separate` with a kernel node and a userspace node (issue 18, the IPv6 equivalent of
/// the IPv4 mixed mesh): node 2 runs both devices as kernel `wireguard` links, node 3 the
/// userspace path (forced: `tweed-wg` and `tweed-wg-v6` are TUN devices with boringtun on the
/// udp workers, the IPv6 one on an IPv6-only socket on `[::]:51821`). IPv6 pods reach each
/// other through the two `tweed-wg-v6`s at `[PublicIPv6]:51821`, both ways, IPv4 pods through
/// the two `tweed-wg`s; each side shows the handshake and bytes on its `tweed-wg-v6` entry.
/// Runs only on a kernel with the module (the VM).
#[test]
fn separate_mode_kernel_and_userspace_ipv6_devices_carry_ipv6_pods_both_ways() {
    require_root!(NEEDS_ROOT);
    let a = NetnsGuard::unique("tw-wxa-");
    let b = NetnsGuard::unique("tw-wxb-");
    if !kernel_has_wireguard(&a) {
        eprintln!(
            "no wireguard module in this kernel: the kernel <-> userspace separate mode runs \
             only in the VM (scripts/vm-wg-kernel)"
        );
        return;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        panic!("/dev/net/tun is missing: the userspace path needs the tun device");
    }
    underlay(&a, &b);
    for (ns, dev, addr) in [(&a, "ua", "2001:db8::2/64"), (&b, "ub", "2001:db8::3/64")] {
        ip_in(ns.name(), &["-6", "addr", "add", addr, "dev", dev, "nodad"]);
    }
    assert_eq!(separate_run(&a, 2, 3), 0, "a second pass writes nothing");
    // Declared after the namespaces, so it is dropped (its workers stopped) before them.
    let user = with_netlink_in(&b, move |nl| async move {
        let cfg = WgConfig {
            implementation: WgImpl::Userspace,
            ..separate_cfg(3)
        };
        let mut u = WgBackend::setup(&nl, cfg).await.unwrap();
        assert_eq!(u.implementation(), "userspace");
        assert!(u.ifindex_v6().is_some(), "the userspace tweed-wg-v6");
        let local = u.dual_local().unwrap();
        let s = u
            .reconcile_dual(&nl, &[separate_peer(2, &local)])
            .await
            .unwrap();
        assert!(s.skipped.is_empty(), "{:?}", s.skipped);
        u
    });
    let link6 = ip_in(b.name(), &["-d", "link", "show", "tweed-wg-v6"]);
    assert!(link6.contains("tun"), "{link6}");
    // (No ss(8) in the VM: the userspace socket shows in the kernel side's figures below, its
    // entry's handshake and bytes with the peer at `[2001:db8::3]:51821`.)
    let ends6 = in_ns(a.name(), &["wg", "show", "tweed-wg-v6", "endpoints"]);
    assert!(ends6.contains("[2001:db8::3]:51821"), "{ends6}");
    for (ns, dst, what) in [
        (&a, "fd00:5:0:3::", "kernel -> userspace tweed-wg-v6"),
        (&b, "fd00:5:0:2::", "userspace -> kernel tweed-wg-v6"),
    ] {
        let (ok, out) = tweed_testkit::probe_in(ns.name(), &["ping6", "-c", "3", "-W", "3", dst]);
        assert!(ok, "{what}: no ping6 from {} to {dst}: {out}", ns.name());
    }
    ping_ok(
        &a,
        "10.5.3.0",
        "separate mode kernel -> userspace, IPv4 half",
    );
    ping_ok(
        &b,
        "10.5.2.0",
        "separate mode userspace -> kernel, IPv4 half",
    );
    // The kernel side's figures as a restarted backend reads them back; the userspace side's
    // are live.
    let ks = with_netlink_in(&a, |nl| async move {
        let mut k = WgBackend::setup(&nl, separate_cfg(2)).await.unwrap();
        let local = k.dual_local().unwrap();
        k.reconcile_dual(&nl, &[separate_peer(3, &local)])
            .await
            .unwrap();
        k.refresh().await.unwrap();
        k.peer_stats()
    });
    let us = user.peer_stats();
    let v6_entry = |all: &[tweed_agent::backend::wireguard::PeerStats]| {
        all.iter()
            .find(|s| s.device == "tweed-wg-v6")
            .cloned()
            .unwrap_or_else(|| panic!("no tweed-wg-v6 entry: {all:?}"))
    };
    let (k6, u6) = (v6_entry(&ks), v6_entry(&us));
    for (side, s, ep, key) in [
        ("kernel", &k6, "[2001:db8::3]:51821", 3u8),
        ("userspace", &u6, "[2001:db8::2]:51821", 2u8),
    ] {
        assert_eq!(s.endpoint, Some(ep.parse().unwrap()), "{side}: {s:?}");
        assert_eq!(s.public_key, PrivateKey::from_bytes([key; 32]).public());
        assert!(
            s.last_handshake.is_some() && s.rx_bytes > 0 && s.tx_bytes > 0,
            "{side}: {s:?}"
        );
    }
    eprintln!(
        "mixed separate mode: ping6 both ways through the kernel and userspace tweed-wg-v6; \
         kernel read back {k6:?}; userspace {u6:?}"
    );
    drop(user);
}

/// Node `own`'s config in `Mode: ipv6`: as [`separate_cfg`], one device on the IPv6 underlay.
fn ipv6_mode_cfg(own: u8) -> WgConfig {
    let mut cfg = separate_cfg(own);
    cfg.dual.as_mut().unwrap().mode = tweed_config::WireguardMode::Ipv6;
    cfg
}

/// Sets node `own` up in `Mode: ipv6` in `ns` as the agent does (the backend on `imp`, then
/// the IPv6 plane's /128 and `IPv6Network` route on `tweed-wg`), reconciles the other's lease
/// as published, twice, and reads the figures (a kernel device's through the netlink handle
/// of this runtime, hence here). Returns the backend (a userspace one's workers stop when it
/// drops), the set-up's netlink ops (backend + IPv6 plane), the first and the second pass's
/// writes, and the figures.
#[allow(clippy::type_complexity)]
fn ipv6_mode_node(
    ns: &NetnsGuard,
    own: u8,
    other: u8,
    imp: WgImpl,
) -> (
    WgBackend,
    usize,
    usize,
    usize,
    Vec<tweed_agent::backend::wireguard::PeerStats>,
) {
    use tweed_agent::backend::{v6, DataPlane};
    with_netlink_in(ns, move |nl| async move {
        let cfg = WgConfig {
            implementation: imp,
            ..ipv6_mode_cfg(own)
        };
        let d = cfg.dual.clone().unwrap();
        let b = WgBackend::setup(&nl, cfg).await.unwrap();
        let want = if imp == WgImpl::Userspace {
            "userspace"
        } else {
            "kernel"
        };
        assert_eq!(b.implementation(), want);
        assert!(b.carries_v6() && b.ifindex_v6().is_none());
        let mut setup = b.setup_ops().len();
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
        setup += plane6.setup_ops().len();
        let DataPlane::Wireguard(mut b) = dp else {
            unreachable!()
        };
        let local = b.dual_local().unwrap();
        // The other node's lease as it publishes it, read as the agent reads any lease.
        let other_cfg = ipv6_mode_cfg(other);
        let attrs =
            tweed_config::LeaseAttrs::parse(other_cfg.lease_attrs().to_json().as_bytes()).unwrap();
        let od = other_cfg.dual.as_ref().unwrap();
        let key = tweed_config::SubnetKey {
            ipv4: other_cfg.own_subnet,
            ipv6: od.own_subnet,
        };
        let peer = tweed_agent::backend::wireguard::dual::DualPeer::from_lease(
            &key,
            &attrs,
            Some(&od.ipv6),
            &local,
        )
        .unwrap();
        let peers = vec![peer];
        let first = b.reconcile_dual(&nl, &peers).await.unwrap();
        assert!(first.skipped.is_empty(), "{:?}", first.skipped);
        let second = b.reconcile_dual(&nl, &peers).await.unwrap().ops_applied;
        b.refresh().await.unwrap();
        let stats = b.peer_stats();
        (b, setup, first.ops_applied, second, stats)
    })
}

/// [`ipv6_mode_node`] on the kernel path, then the figures as the kernel reads them back.
fn ipv6_mode_run(
    ns: &NetnsGuard,
    own: u8,
    other: u8,
) -> (
    usize,
    usize,
    usize,
    Vec<tweed_agent::backend::wireguard::PeerStats>,
) {
    let (_, setup, first, second, stats) = ipv6_mode_node(ns, own, other, WgImpl::Kernel);
    (setup, first, second, stats)
}

/// flannel's `Mode: ipv6` on two kernel nodes: one device `tweed-wg` on ListenPort carrying
/// both families, each peer at `[PublicIPv6]:ListenPort` (wg(8) reads IPv6 endpoints and both
/// subnets as allowed IPs), no second device. With the IPv4 underlay addresses removed, pods
/// still reach each other over both families, so the IPv6 underlay carries them; a second
/// pass and a restart write nothing. Runs only on a kernel with the module (the VM).
#[test]
fn ipv6_mode_carries_both_families_over_the_ipv6_underlay_on_one_kernel_device() {
    require_root!(NEEDS_ROOT);
    let a = NetnsGuard::unique("tw-w6a-");
    let b = NetnsGuard::unique("tw-w6b-");
    if !kernel_has_wireguard(&a) {
        eprintln!("no wireguard module in this kernel: ipv6 mode runs only in the VMs");
        return;
    }
    underlay(&a, &b);
    for (ns, dev, addr) in [(&a, "ua", "2001:db8::2/64"), (&b, "ub", "2001:db8::3/64")] {
        ip_in(ns.name(), &["-6", "addr", "add", addr, "dev", dev, "nodad"]);
    }
    let (setup_a, first_a, second_a, _) = ipv6_mode_run(&a, 2, 3);
    let (_, _, second_b, _) = ipv6_mode_run(&b, 3, 2);
    assert!(setup_a > 0 && first_a > 0, "{setup_a} {first_a}");
    assert_eq!((second_a, second_b), (0, 0), "a second pass writes nothing");
    assert!(
        !links(&a).contains("tweed-wg-v6"),
        "Mode ipv6 runs one device: {}",
        links(&a)
    );
    let port = in_ns(a.name(), &["wg", "show", "tweed-wg", "listen-port"]);
    assert_eq!(port.trim(), "51820");
    let ends = in_ns(a.name(), &["wg", "show", "tweed-wg", "endpoints"]);
    assert!(
        ends.contains("[2001:db8::3]:51820") && !ends.contains("192.0.2."),
        "{ends}"
    );
    let allowed = in_ns(a.name(), &["wg", "show", "tweed-wg", "allowed-ips"]);
    assert!(
        allowed.contains("10.5.3.0/24") && allowed.contains("fd00:5:0:3::/64"),
        "{allowed}"
    );
    let route6 = ip_in(a.name(), &["-6", "route", "show", "dev", "tweed-wg"]);
    assert!(route6.contains("fd00:5::/56"), "{route6}");
    // Only the IPv6 underlay is left between the nodes.
    for (ns, dev) in [(&a, "ua"), (&b, "ub")] {
        ip_in(ns.name(), &["-4", "addr", "flush", "dev", dev]);
    }
    ping_ok(
        &a,
        "10.5.3.0",
        "Mode ipv6, IPv4 pods over the IPv6 underlay",
    );
    let (ok, out) =
        tweed_testkit::probe_in(a.name(), &["ping6", "-c", "3", "-W", "3", "fd00:5:0:3::"]);
    assert!(
        ok,
        "no ping6 through tweed-wg over the IPv6 underlay: {out}"
    );
    ping_ok(&b, "10.5.2.0", "Mode ipv6, the other way");
    // A restarted node finds its device, address, route and peer right, and reads the
    // handshake and bytes back, its endpoint IPv6.
    let (setup, first, second, stats) = ipv6_mode_run(&a, 2, 3);
    assert_eq!(
        (setup, first, second),
        (0, 0, 0),
        "a restart writes nothing"
    );
    assert_eq!(stats.len(), 1, "{stats:?}");
    let s = &stats[0];
    assert_eq!(s.endpoint, Some("[2001:db8::3]:51820".parse().unwrap()));
    assert!(
        s.last_handshake.is_some() && s.rx_bytes > 0 && s.tx_bytes > 0,
        "{s:?}"
    );
    eprintln!(
        "ipv6 mode: ping and ping6 through tweed-wg at [2001:db8::3]:51820, no IPv4 underlay; {s:?}"
    );
}

/// `Mode: ipv6` with a kernel node and a userspace node (issue 18): node 2 runs `tweed-wg` as a
/// kernel `wireguard` link, node 3 the userspace path (forced: a TUN device with boringtun on
/// the udp workers, its socket IPv6-only on `[::]:51820`), each peer at `[PublicIPv6]:51820`.
/// With the IPv4 underlay addresses removed, both families pass both ways between the overlay
/// addresses; wg(8) on the kernel side shows the userspace peer at `[2001:db8::3]:51820` with a
/// handshake, and the userspace side's figures (what `tweedctl net peers` and the metrics
/// print) the kernel peer's handshake and bytes. Runs only on a kernel with the module (the VM).
#[test]
fn ipv6_mode_kernel_and_userspace_devices_carry_both_families_both_ways() {
    require_root!(NEEDS_ROOT);
    let a = NetnsGuard::unique("tw-w6ka-");
    let b = NetnsGuard::unique("tw-w6ub-");
    if !kernel_has_wireguard(&a) {
        eprintln!(
            "no wireguard module in this kernel: the kernel <-> userspace ipv6 mode runs only \
             in the VM (scripts/vm-wg-kernel)"
        );
        return;
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        panic!("/dev/net/tun is missing: the userspace path needs the tun device");
    }
    underlay(&a, &b);
    for (ns, dev, addr) in [(&a, "ua", "2001:db8::2/64"), (&b, "ub", "2001:db8::3/64")] {
        ip_in(ns.name(), &["-6", "addr", "add", addr, "dev", dev, "nodad"]);
    }
    let (_, first_k, second_k, _) = ipv6_mode_run(&a, 2, 3);
    // The first pass writes the peer: a count stuck at 0 would make the second pass's 0 prove
    // nothing.
    assert!(first_k > 0, "the kernel node's first pass wrote nothing");
    assert_eq!(second_k, 0, "a second pass writes nothing");
    // Declared after the namespaces, so it is dropped (its workers stopped) before them.
    let (user, _, first_u, second_u, _) = ipv6_mode_node(&b, 3, 2, WgImpl::Userspace);
    assert!(first_u > 0, "the userspace node's first pass wrote nothing");
    assert_eq!(second_u, 0, "a second userspace pass writes nothing");
    let link = ip_in(b.name(), &["-d", "link", "show", "tweed-wg"]);
    assert!(link.contains("tun"), "{link}");
    assert!(
        !links(&b).contains("tweed-wg-v6"),
        "Mode ipv6 runs one device: {}",
        links(&b)
    );
    // Only the IPv6 underlay is left between the nodes.
    for (ns, dev) in [(&a, "ua"), (&b, "ub")] {
        ip_in(ns.name(), &["-4", "addr", "flush", "dev", dev]);
    }
    for (ns, dst4, dst6, what) in [
        (&a, "10.5.3.0", "fd00:5:0:3::", "kernel -> userspace"),
        (&b, "10.5.2.0", "fd00:5:0:2::", "userspace -> kernel"),
    ] {
        ping_ok(
            ns,
            dst4,
            &format!("Mode ipv6 {what}, IPv4 over the IPv6 underlay"),
        );
        let (ok, out) = tweed_testkit::probe_in(ns.name(), &["ping6", "-c", "3", "-W", "3", dst6]);
        assert!(
            ok,
            "Mode ipv6 {what}: no ping6 from {} to {dst6}: {out}",
            ns.name()
        );
    }
    let user_key = PrivateKey::from_bytes([3; 32]).public().to_string();
    let ends = in_ns(a.name(), &["wg", "show", "tweed-wg", "endpoints"]);
    assert!(
        ends.contains(&format!("{user_key}\t[2001:db8::3]:51820")),
        "the kernel side's peer entry for the userspace node: {ends}"
    );
    let hs = wg_latest_handshake(&a, "tweed-wg", &user_key);
    assert!(
        hs > 0,
        "no handshake with the userspace peer on the kernel side"
    );
    // The kernel side's figures as a restarted backend reads them back; the userspace side's
    // are live.
    let (_, _, _, ks) = ipv6_mode_run(&a, 2, 3);
    let us = user.peer_stats();
    assert_eq!((ks.len(), us.len()), (1, 1), "{ks:?} {us:?}");
    for (side, s, ep, key) in [
        ("kernel", &ks[0], "[2001:db8::3]:51820", 3u8),
        ("userspace", &us[0], "[2001:db8::2]:51820", 2u8),
    ] {
        assert_eq!(s.device, "tweed-wg", "{side}: {s:?}");
        assert_eq!(s.endpoint, Some(ep.parse().unwrap()), "{side}: {s:?}");
        assert_eq!(s.public_key, PrivateKey::from_bytes([key; 32]).public());
        assert!(
            s.last_handshake.is_some() && s.rx_bytes > 0 && s.tx_bytes > 0,
            "{side}: {s:?}"
        );
    }
    eprintln!(
        "mixed ipv6 mode: ping and ping6 both ways between kernel and userspace tweed-wg over \
         the IPv6 underlay; kernel wg show: {}; kernel read back {:?}; userspace {:?}",
        ends.trim(),
        ks[0],
        us[0]
    );
    drop(user);
}
