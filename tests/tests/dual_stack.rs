//! Issue 19: IPv4/IPv6 dual stack end to end. A lab with `--ip-family dual` (each host an IPv4
//! and an IPv6 underlay address, the network config with EnableIPv6, every pod both families)
//! runs the vxlan, the host-gw and the udp backend; pods on different hosts reach each other over IPv4
//! and over IPv6, a checksummed TCP transfer crosses the IPv6 overlay unmasqueraded, and pods
//! reach the outside over IPv6 through the agents' IPv6 masquerade.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv6Addr};
use std::process::{Child, Stdio};
use std::time::Duration;

use ipnetwork::Ipv6Network;
use tweed_e2e::*;
use tweed_lab::names;
use tweed_lab::spec::IpFamily;
use tweed_lab::{Backend, Lab, LabGuard, LabSpec};

const HOSTS: usize = 3;
const PODS: usize = 2;
/// Bytes of the TCP transfer: well above one window, so full-size segments (and, on vxlan, path
/// MTU discovery down to the IPv6 device's MTU) are exercised, not just a handshake.
const BULK_BYTES: usize = 2 << 20;
const BULK_PORT: u16 = 5993;

fn dual_lab(tag: &str, backend: Backend) -> LabGuard {
    let mut spec = LabSpec::new(per_process(tag), HOSTS);
    spec.backend = backend;
    spec.pods_per_host = PODS;
    spec.ip_family = IpFamily::Dual;
    up(spec)
}

/// The host's IPv6 subnet as its subnet.env gives it (`fd00:10:244:N::/64`).
fn subnet6_of(lab: &Lab, host: &str) -> Ipv6Network {
    let env = tweed_config::SubnetEnv::read(&host_state(lab, host).subnet_file).unwrap();
    env.ipv6
        .unwrap_or_else(|| panic!("{host}: subnet.env has no IPv6 half"))
        .node_subnet()
}

/// What every dual-stack lab must show: each host an IPv6 underlay address, each pod an IPv6
/// address inside its host's IPv6 subnet, and every pod pair across hosts answering pings over
/// both families.
fn assert_dual_stack_reachability(lab: &Lab) {
    let overlay6: Ipv6Network = names::OVERLAY6_NETWORK.parse().unwrap();
    for (i, h) in lab.state().hosts.iter().enumerate() {
        assert_eq!(
            h.public_ip6,
            Some(names::host_public_ip6(i + 1, 1)),
            "{}",
            h.name
        );
        let sub6 = subnet6_of(lab, &h.name);
        assert!(overlay6.contains(sub6.network()), "{}: {sub6}", h.name);
        assert_eq!(h.pods.len(), PODS);
        for p in &h.pods {
            let ip6 = p
                .ip6
                .unwrap_or_else(|| panic!("{}/{}: no IPv6", h.name, p.name));
            assert!(
                sub6.contains(ip6),
                "{}/{}: {ip6} not in {sub6}",
                h.name,
                p.name
            );
        }
    }
    let report = lab.check_until(Duration::from_secs(20)).expect("check");
    let failures: Vec<String> = report
        .failures()
        .map(|f| format!("{} -> {} ({}): {}", f.from, f.to, f.to_ip, f.detail))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Every pod to every pod on the other hosts, once per family.
    let pairs = HOSTS * PODS * (HOSTS - 1) * PODS;
    let v6 = report.results.iter().filter(|r| r.to_ip.is_ipv6()).count();
    assert_eq!((report.results.len(), v6), (2 * pairs, pairs));
    assert_eq!(report.summary(), format!("{} passed, 0 failed", 2 * pairs));
}

/// Kills (and reaps) a helper process on Drop, also when the test panics.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends `BULK_BYTES` random bytes over one TCP connection from namespace `from` to `to_ip` (an
/// IPv6 address) in namespace `to`. Asserts the receiver got the same count and sha256 as were
/// sent, and returns the source address the receiver saw.
fn tcp6_transfer_checked(from: &str, to: &str, to_ip: Ipv6Addr) -> IpAddr {
    let server = format!(
        "import socket,hashlib\n\
         s=socket.socket(socket.AF_INET6)\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         s.bind(('{to_ip}',{BULK_PORT}))\ns.listen(1)\nprint('ready',flush=True)\n\
         s.settimeout(30)\nc,a=s.accept()\nc.settimeout(30)\nh=hashlib.sha256()\nn=0\n\
         while True:\n    d=c.recv(1<<20)\n    if not d: break\n    h.update(d)\n    n+=len(d)\n\
         print(n,h.hexdigest(),a[0],flush=True)\nc.close()\n"
    );
    let client = format!(
        "import socket,hashlib,os\nd=os.urandom({BULK_BYTES})\n\
         c=socket.create_connection(('{to_ip}',{BULK_PORT}),timeout=30)\n\
         c.sendall(d)\nc.shutdown(socket.SHUT_WR)\nc.recv(1)\n\
         print(len(d),hashlib.sha256(d).hexdigest(),flush=True)\n"
    );
    let mut srv = Reaped(spawn_in(to, &["python3", "-c", &server], Stdio::piped()));
    let mut out = BufReader::new(srv.0.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).expect("receiver output");
    assert_eq!(line.trim(), "ready", "receiver in {to} did not start");
    let sent = in_ns(from, &["timeout", "60", "python3", "-c", &client]);
    line.clear();
    out.read_line(&mut line).expect("receiver result");
    let sent = sent.trim();
    assert!(sent.starts_with(&format!("{BULK_BYTES} ")), "{sent}");
    let (got, source) = line
        .trim()
        .rsplit_once(' ')
        .unwrap_or_else(|| panic!("receiver in {to} said {line:?}"));
    assert_eq!(
        got, sent,
        "bytes and sha256 received in {to} (left) differ from those sent from {from} (right)"
    );
    source
        .parse()
        .unwrap_or_else(|_| panic!("receiver in {to}: bad peer address {source:?}"))
}

/// A TCP connection over IPv6 between pods on different hosts carries data intact, from the
/// client pod's own address (pod-to-pod traffic is never masqueraded), and a pod reaches the
/// outside namespace over IPv6 (which has no route to the overlay: only a masqueraded packet
/// is answered).
fn assert_tcp6_and_outside(lab: &Lab) {
    let h1p1 = &host_state(lab, "h1").pods[0];
    let h2p2 = &host_state(lab, "h2").pods[1];
    let seen = tcp6_transfer_checked(&h1p1.netns, &h2p2.netns, h2p2.ip6.unwrap());
    assert_eq!(seen, IpAddr::V6(h1p1.ip6.unwrap()), "source seen by h2/p2");
    let out6 = names::outside_ip6().to_string();
    assert!(
        ok_in(
            &h1p1.netns,
            &["ping", "-6", "-n", "-c", "2", "-W", "2", &out6],
        ),
        "h1/p1 cannot ping the outside's {out6}"
    );
}

/// Every host's subnet.env MTU and every pod's eth0 MTU is `want` (issue 19: on vxlan dual
/// stack pods get `tweed-v6.1`'s MTU, so a full-size IPv6 packet needs no Packet Too Big first).
fn assert_pod_mtus(lab: &Lab, want: u32) {
    for h in &lab.state().hosts {
        let env = tweed_config::SubnetEnv::read(&h.subnet_file).unwrap();
        assert_eq!(env.mtu, want, "{}: subnet.env", h.name);
        for p in &h.pods {
            let link = in_ns(&p.netns, &["ip", "link", "show", names::POD_IFACE]);
            assert!(
                link.contains(&format!(" mtu {want} ")),
                "{}/{}: {link}",
                h.name,
                p.name
            );
        }
    }
}

/// vxlan: `tweed-v6.1` beside `tweed.1`, its VTEP the host's IPv6 underlay address, MTU the
/// underlay's minus 70, the host's IPv6 subnet address /128 on it; one onlink route per peer.
#[test]
fn vxlan_dual_stack_pods_reach_each_other_over_ipv4_and_ipv6() {
    require_root!(NEEDS_ROOT);
    let lab = dual_lab("d6v", Backend::Vxlan);
    assert_dual_stack_reachability(&lab);
    // tweed.1 stays at underlay - 50 (checked below for tweed-v6.1 at - 70).
    for h in &lab.state().hosts {
        let link = in_ns(&h.netns, &["ip", "link", "show", "tweed.1"]);
        assert!(link.contains(" mtu 1450 "), "{}: {link}", h.name);
    }
    assert_pod_mtus(&lab, 1430);
    for h in &lab.state().hosts {
        let link = in_ns(&h.netns, &["ip", "-d", "link", "show", "tweed-v6.1"]);
        let local = format!("local {} ", h.public_ip6.unwrap());
        assert!(
            link.contains(&local) && link.contains("mtu 1430") && link.contains("vxlan id 1"),
            "{}: {link}",
            h.name
        );
        let addr = in_ns(&h.netns, &["ip", "-6", "addr", "show", "dev", "tweed-v6.1"]);
        let own = format!("{}/128", subnet6_of(&lab, &h.name).network());
        assert!(addr.contains(&own), "{}: no {own} in {addr}", h.name);
        let routes = in_ns(
            &h.netns,
            &["ip", "-6", "route", "show", "dev", "tweed-v6.1"],
        );
        for peer in lab.state().hosts.iter().filter(|p| p.name != h.name) {
            let s = subnet6_of(&lab, &peer.name);
            let want = format!("{s} via {} proto static metric 1024 onlink", s.network());
            assert!(
                routes.contains(&want),
                "{}: no {want:?} in\n{routes}",
                h.name
            );
            let fdb = in_ns(&h.netns, &["bridge", "fdb", "show", "dev", "tweed-v6.1"]);
            let dst = format!("dst {} self permanent", peer.public_ip6.unwrap());
            assert!(fdb.contains(&dst), "{}: no {dst:?} in\n{fdb}", h.name);
        }
    }
    assert_tcp6_and_outside(&lab);
    assert_ipv6_survives_an_agent_restart(&lab);

    // Drift of the IPv6 plane is repaired from the kernel's notifications, well before the
    // 60 s periodic relist: each of h1's entries for h2, then the whole device.
    let h1 = host_state(&lab, "h1");
    let s2 = subnet6_of(&lab, "h2");
    let mac2 = in_ns(
        &host_state(&lab, "h2").netns,
        &["cat", "/sys/class/net/tweed-v6.1/address"],
    );
    let mac2 = mac2.trim();
    let route = s2.to_string();
    let gw = s2.network().to_string();
    let breakages: [(&str, Vec<&str>); 4] = [
        (
            "route",
            vec!["ip", "-6", "route", "del", &route, "dev", "tweed-v6.1"],
        ),
        (
            "neigh",
            vec!["ip", "-6", "neigh", "del", &gw, "dev", "tweed-v6.1"],
        ),
        (
            "fdb",
            vec!["bridge", "fdb", "del", mac2, "dev", "tweed-v6.1"],
        ),
        ("device", vec!["ip", "link", "del", "tweed-v6.1"]),
    ];
    let dst2 = format!(
        "dst {} self permanent",
        host_state(&lab, "h2").public_ip6.unwrap()
    );
    let intact = || {
        let show =
            |argv: &[&str]| tweed_testkit::cmd::try_in_ns(&h1.netns, argv).unwrap_or_default();
        show(&["ip", "-6", "route", "show", "dev", "tweed-v6.1"])
            .contains(&format!("{route} via {gw}"))
            && show(&["ip", "-6", "neigh", "show", "dev", "tweed-v6.1"])
                .contains(&format!("{gw} lladdr {mac2} PERMANENT"))
            && show(&["bridge", "fdb", "show", "dev", "tweed-v6.1"])
                .contains(&format!("{mac2} {dst2}"))
            && show(&["ip", "-6", "addr", "show", "dev", "tweed-v6.1"])
                .contains(&format!("{}/128", subnet6_of(&lab, "h1").network()))
    };
    assert!(intact(), "h1's IPv6 entries for h2 before the breakages");
    assert_deleted_v6_address_returns_within_a_second(&lab);
    for (what, argv) in &breakages {
        in_ns(&h1.netns, argv);
        wait_for(
            Duration::from_secs(5),
            &format!("h1's IPv6 {what} repaired"),
            intact,
        );
    }
    let target = host_state(&lab, "h2").pods[0].ip6.unwrap().to_string();
    assert!(
        ok_in(
            &h1.pods[0].netns,
            &["ping", "-6", "-n", "-c", "1", "-W", "2", &target]
        ),
        "h1/p1 -> {target} after the repairs"
    );
}

/// h1's `tweed-v6.1` subnet address (/128), deleted by hand, is put back from the kernel's IPv6
/// address notification within a second (before, only a device set-up or the 60 s relist did),
/// and the repair is counted under kind `address` in `tweed_repairs_total`.
fn assert_deleted_v6_address_returns_within_a_second(lab: &Lab) {
    let h1 = host_state(lab, "h1");
    let own = format!("{}/128", subnet6_of(lab, "h1").network());
    let url = format!("http://{}:9867/metrics", h1.public_ip);
    let address_repairs = || {
        let body = lab
            .exec("h2", &["curl", "-sf", "--max-time", "2", &url])
            .unwrap_or_default();
        body.lines()
            .find(|l| l.starts_with("tweed_repairs_total{kind=\"address\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let before = address_repairs();
    let has_it = || {
        tweed_testkit::cmd::try_in_ns(
            &h1.netns,
            &["ip", "-6", "addr", "show", "dev", "tweed-v6.1"],
        )
        .is_ok_and(|a| a.contains(&own))
    };
    assert!(has_it(), "h1: no {own} on tweed-v6.1");
    in_ns(
        &h1.netns,
        &["ip", "-6", "addr", "del", &own, "dev", "tweed-v6.1"],
    );
    assert!(!has_it(), "h1: {own} still there after its deletion");
    wait_for(
        Duration::from_secs(1),
        &format!("h1's {own} back on tweed-v6.1"),
        has_it,
    );
    wait_for(
        Duration::from_secs(5),
        "an address repair counted in h1's /metrics",
        || address_repairs() > before,
    );
    let log = std::fs::read_to_string(&h1.log).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("repaired drift") && l.contains(&format!("addr replace {own}"))),
        "no repair of {own} in h1's log"
    );
}

/// The IPv6 data plane outlives its agent (the kernel keeps it), and the restarted agent takes
/// `tweed-v6.1` over as it is (same ifindex: set-up is idempotent) and keeps pods answering.
fn assert_ipv6_survives_an_agent_restart(lab: &Lab) {
    let h2 = host_state(lab, "h2");
    let ifindex = |ns: &str| {
        let link = in_ns(ns, &["ip", "-o", "link", "show", "tweed-v6.1"]);
        link.split(':')
            .next()
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let before = ifindex(&h2.netns);
    let pinger = &host_state(lab, "h1").pods[0].netns;
    let target = h2.pods[0].ip6.unwrap().to_string();
    let ping6 = || ok_in(pinger, &["ping", "-6", "-n", "-c", "1", "-W", "2", &target]);
    let stopped = stop_agent(lab, "h2", libc::SIGTERM);
    assert!(ping6(), "h1/p1 -> {target} with h2's agent stopped");
    restart_agent_ready(&stopped, "h2");
    assert!(ping6(), "h1/p1 -> {target} after h2's agent restarted");
    assert_eq!(ifindex(&h2.netns), before, "tweed-v6.1 was made again");
}

/// host-gw: one IPv6 route per peer, via the peer's IPv6 underlay address on eth0; no vxlan.
#[test]
fn host_gw_dual_stack_pods_reach_each_other_over_ipv4_and_ipv6() {
    require_root!(NEEDS_ROOT);
    let lab = dual_lab("d6h", Backend::HostGw);
    assert_dual_stack_reachability(&lab);
    // host-gw: no encapsulation, pods get the underlay's MTU in both families.
    assert_pod_mtus(&lab, 1500);
    for h in &lab.state().hosts {
        let routes = in_ns(&h.netns, &["ip", "-6", "route"]);
        for peer in lab.state().hosts.iter().filter(|p| p.name != h.name) {
            let want = format!(
                "{} via {} dev eth0",
                subnet6_of(&lab, &peer.name),
                peer.public_ip6.unwrap()
            );
            assert!(
                routes.contains(&want),
                "{}: no {want:?} in\n{routes}",
                h.name
            );
        }
        assert!(!routes.contains("tweed-v6"), "{}: {routes}", h.name);
    }
    assert_tcp6_and_outside(&lab);

    // A deleted IPv6 route is put back from the notification, not the 60 s relist.
    let h1 = host_state(&lab, "h1");
    let want = format!(
        "{} via {} dev eth0",
        subnet6_of(&lab, "h2"),
        host_state(&lab, "h2").public_ip6.unwrap()
    );
    let dst = subnet6_of(&lab, "h2").to_string();
    in_ns(&h1.netns, &["ip", "-6", "route", "del", &dst]);
    wait_for(
        Duration::from_secs(5),
        "h1's IPv6 route to h2 repaired",
        || {
            tweed_testkit::cmd::try_in_ns(&h1.netns, &["ip", "-6", "route"])
                .is_ok_and(|r| r.contains(&want))
        },
    );

    // An IPv6 vxlan device an earlier (vxlan) run left is removed at the next start; host-gw's
    // own IPv6 routes stay.
    let local = h1.public_ip6.unwrap().to_string();
    in_ns(
        &h1.netns,
        &[
            "ip",
            "link",
            "add",
            "tweed-v6.1",
            "type",
            "vxlan",
            "id",
            "1",
            "dstport",
            "8472",
            "local",
            &local,
            "dev",
            "eth0",
            "nolearning",
        ],
    );
    let stopped = stop_agent(&lab, "h1", libc::SIGTERM);
    restart_agent_ready(&stopped, "h1");
    let log = std::fs::read_to_string(&h1.log).unwrap();
    assert!(
        log.contains("removed IPv6 leftover: link del tweed-v6.1"),
        "{log}"
    );
    assert!(
        !ok_in(&h1.netns, &["ip", "link", "show", "tweed-v6.1"]),
        "tweed-v6.1 is still on h1"
    );
    assert!(in_ns(&h1.netns, &["ip", "-6", "route"]).contains(&want));
    let target = host_state(&lab, "h2").pods[0].ip6.unwrap().to_string();
    assert!(
        ok_in(
            &h1.pods[0].netns,
            &["ping", "-6", "-n", "-c", "1", "-W", "2", &target]
        ),
        "h1/p1 -> {target} after h1's restart"
    );
}

/// The value of the first `/metrics` series of `host` starting with `series` (0 when absent),
/// fetched from h2 over the underlay.
fn host_metric(lab: &Lab, host: &str, series: &str) -> f64 {
    let url = format!("http://{}:9867/metrics", host_state(lab, host).public_ip);
    lab.exec("h2", &["curl", "-sf", "--max-time", "2", &url])
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// A python3 program that writes, with a raw socket, outer IPv4/UDP datagrams from
/// `outer_src:8285` (exactly what a peer's agent sends) to `outer_dst:8285`, each carrying an
/// inner IPv6/UDP packet to `[inner_dst]:5999` with a valid checksum: `spoofed` times from
/// `spoofed_src`, then `legit` times from `legit_src`.
fn v6_injector(
    outer_src: &str,
    outer_dst: &str,
    inner_dst: &str,
    (spoofed_src, spoofed): (&str, u32),
    (legit_src, legit): (&str, u32),
) -> String {
    format!(
        r#"
import socket, struct, time
def csum(b):
    if len(b) % 2: b += b'\0'
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    while s >> 16: s = (s >> 16) + (s & 0xffff)
    return ~s & 0xffff
def inner(src, dst):
    s6 = socket.inet_pton(socket.AF_INET6, src); d6 = socket.inet_pton(socket.AF_INET6, dst)
    payload = b'from ' + src.encode()
    ulen = 8 + len(payload)
    udp = struct.pack('!HHHH', 4000, 5999, ulen, 0) + payload
    c = csum(s6 + d6 + struct.pack('!IxxxB', ulen, 17) + udp) or 0xffff
    udp = udp[:6] + struct.pack('!H', c) + udp[8:]
    return struct.pack('!IHBB', 0x60000000, ulen, 17, 64) + s6 + d6 + udp
def outer(pkt):
    ulen = 8 + len(pkt)
    udp = struct.pack('!HHHH', 8285, 8285, ulen, 0) + pkt
    ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + ulen, 0, 0, 64, 17, 0,
                     socket.inet_aton('{outer_src}'), socket.inet_aton('{outer_dst}'))
    return ip + udp
r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for src, n in (('{spoofed_src}', {spoofed}), ('{legit_src}', {legit})):
    for _ in range(n):
        r.sendto(outer(inner(src, '{inner_dst}')), ('{outer_dst}', 0))
        time.sleep(0.005)
"#
    )
}

/// udp, dual stack (tweed's own format, flannel's udp has no IPv6): pods' IPv6 rides the same
/// IPv4 udp tunnel as their IPv4 (outer IPv4/UDP to the peer's PublicIP:8285, inner IPv6 packet
/// as the payload). `tweed0` holds the host's IPv6 subnet address (/128) and the route for the
/// whole IPv6 overlay, no link-local address (no autoconfiguration noise), pods get the same MTU
/// in both families (underlay - 28), an inner IPv6 packet whose source is not the sending peer's
/// is dropped and counted while a genuine one from the same endpoint is delivered, the kernel's
/// own IPv6 traffic into the device is never counted as malformed, and IPv6 survives an agent
/// restart.
#[test]
fn udp_dual_stack_pods_reach_each_other_over_ipv4_and_ipv6() {
    require_root!(NEEDS_ROOT);
    let lab = dual_lab("d6u", Backend::Udp);
    assert_dual_stack_reachability(&lab);
    // The inner IPv6 packet travels over the IPv4 underlay: 20 + 8 bytes, as for IPv4.
    assert_pod_mtus(&lab, 1472);
    for h in &lab.state().hosts {
        let addr = in_ns(&h.netns, &["ip", "-6", "addr", "show", "dev", "tweed0"]);
        let own = format!("{}/128", subnet6_of(&lab, &h.name).network());
        assert!(addr.contains(&own), "{}: no {own} in {addr}", h.name);
        assert!(!addr.contains("fe80"), "{}: autoconfigured {addr}", h.name);
        let routes = in_ns(&h.netns, &["ip", "-6", "route", "show", "dev", "tweed0"]);
        let want = format!("{} proto static metric 1024", names::OVERLAY6_NETWORK);
        assert!(
            routes.contains(&want),
            "{}: no {want:?} in\n{routes}",
            h.name
        );
        let ra = in_ns(
            &h.netns,
            &["cat", "/proc/sys/net/ipv6/conf/tweed0/accept_ra"],
        );
        assert_eq!(ra.trim(), "0", "{}", h.name);
        let links = in_ns(&h.netns, &["ip", "link"]);
        assert!(!links.contains("tweed-v6"), "{}: {links}", h.name);
    }
    assert_tcp6_and_outside(&lab);

    // Injection from h2's own agent endpoint (address and port): an inner IPv6 source in h3's
    // subnet is a spoof and is dropped; the same packet with a source in h2's subnet goes in.
    let h1 = host_state(&lab, "h1");
    let h2 = host_state(&lab, "h2");
    let target = h1.pods[0].ip6.unwrap().to_string();
    let spoofed_src = host_state(&lab, "h3").pods[0].ip6.unwrap().to_string();
    let legit_src = h2.pods[0].ip6.unwrap().to_string();
    let spoofed_series = "tweed_udp_drops_total{reason=\"spoofed_inner\"}";
    let spoofed0 = host_metric(&lab, "h1", spoofed_series);
    let listen = "import socket\ns=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n\
                  s.bind(('::',5999))\nprint('ready',flush=True)\ns.settimeout(5)\n\
                  try:\n    while True:\n        d,a=s.recvfrom(200)\n        print('GOT',a[0],flush=True)\n\
                  except socket.timeout:\n    print('done',flush=True)\n";
    let mut listener = Reaped(
        lab.command("h1/p1", &["python3", "-c", listen])
            .unwrap()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("listener"),
    );
    let mut out = BufReader::new(listener.0.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let inject = v6_injector(
        &h2.public_ip.to_string(),
        &h1.public_ip.to_string(),
        &target,
        (&spoofed_src, 40),
        (&legit_src, 3),
    );
    lab.exec("h2", &["python3", "-c", &inject])
        .expect("inject from h2");
    let mut got = Vec::new();
    loop {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 || line.trim() == "done" {
            break;
        }
        got.push(line.trim().trim_start_matches("GOT ").to_string());
    }
    assert!(
        !got.is_empty(),
        "the genuine injected IPv6 packets never reached h1/p1"
    );
    assert!(
        got.iter().all(|src| *src == legit_src),
        "a spoofed inner IPv6 source reached h1/p1: {got:?}"
    );
    wait_for(
        Duration::from_secs(10),
        "h1 counting the 40 spoofed IPv6 packets",
        || host_metric(&lab, "h1", spoofed_series) >= spoofed0 + 40.0,
    );
    // The kernel's IPv6 control traffic into tweed0 (MLD reports) is dropped as link-local,
    // never as malformed.
    for h in ["h1", "h2", "h3"] {
        assert_eq!(
            host_metric(&lab, h, "tweed_udp_drops_total{reason=\"malformed\"}"),
            0.0,
            "{h}"
        );
    }

    // IPv6 through the restarted agent (the device, its address and route stay; the peer
    // table's IPv6 half is filled again from the leases).
    let ping6 = || {
        ok_in(
            &h1.pods[0].netns,
            &["ping", "-6", "-n", "-c", "1", "-W", "2", &legit_src],
        )
    };
    let stopped = stop_agent(&lab, "h2", libc::SIGTERM);
    restart_agent_ready(&stopped, "h2");
    wait_for(
        Duration::from_secs(10),
        "h1/p1 ping6 to h2/p1 after h2's restart",
        ping6,
    );
    // The restart's first moments (IPv6 half not loaded yet) count IPv6 as not ready, never as
    // malformed.
    for h in ["h1", "h2", "h3"] {
        assert_eq!(
            host_metric(&lab, h, "tweed_udp_drops_total{reason=\"malformed\"}"),
            0.0,
            "{h} after h2's restart"
        );
    }
    let log = std::fs::read_to_string(&h2.log).unwrap();
    assert_eq!(
        log.matches("IPv6 disabled on the device").count(),
        0,
        "h2 switched IPv6 off on tweed0"
    );
}

/// A node that loses its IPv6 address in a dual-stack network runs IPv4 only after a restart
/// (flannel would refuse to start): its lease is renamed to an IPv4-only key, the other nodes drop
/// their IPv6 entries for it and keep their IPv4 ones, every pod pair still reaches each other over
/// IPv4, and the dual-stack nodes' pods still reach each other over IPv6.
#[test]
fn a_node_without_ipv6_stays_reachable_over_ipv4_in_a_dual_stack_lab() {
    require_root!(NEEDS_ROOT);
    let mut spec = LabSpec::new(per_process("d6m"), HOSTS);
    spec.pods_per_host = 1;
    spec.ip_family = IpFamily::Dual;
    let lab = up(spec);
    assert_eq!(
        lab.check_until(Duration::from_secs(20)).unwrap().failed(),
        0
    );
    let h3 = host_state(&lab, "h3");
    let s3 = subnet6_of(&lab, "h3").to_string();
    let h1 = host_state(&lab, "h1");
    let v6_routes = || {
        in_ns(
            &h1.netns,
            &["ip", "-6", "route", "show", "dev", "tweed-v6.1"],
        )
    };
    assert!(v6_routes().contains(&s3), "{}", v6_routes());
    // tweed's chains and jumps in one family's tables, as `-S` lists them.
    let tweed_rules = |cmd: &str| {
        let mut l: Vec<String> = ["filter", "nat"]
            .into_iter()
            .flat_map(|t| {
                in_ns(&h3.netns, &[cmd, "-w", "5", "-t", t, "-S"])
                    .lines()
                    .filter(|l| l.contains("TWEED-"))
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect();
        l.sort();
        l
    };
    assert!(
        tweed_rules("ip6tables").len() >= 4,
        "h3's IPv6 rules while dual stack: {:?}",
        tweed_rules("ip6tables")
    );
    let v4_rules = tweed_rules("iptables");

    let stopped = stop_agent(&lab, "h3", libc::SIGTERM);
    let addr = format!("{}/64", h3.public_ip6.unwrap());
    in_ns(
        &h3.netns,
        &["ip", "-6", "addr", "del", &addr, "dev", "eth0"],
    );
    start_agent(&stopped);
    wait_for(Duration::from_secs(15), "h3 running IPv4 only", || {
        std::fs::read_to_string(&h3.log).is_ok_and(|l| l.contains("IPv4 only"))
    });
    // h3's lease is an IPv4-only key now, and the others' IPv6 entries for it are gone.
    wait_for(
        Duration::from_secs(15),
        "h1 drops its IPv6 route to h3",
        || !v6_routes().contains(&s3),
    );
    let keys = etcdctl(
        &lab,
        &[
            "get",
            "--prefix",
            "--keys-only",
            "/coreos.com/network/subnets/",
        ],
    );
    // The agent writes its lease before it sets the data plane up and rewrites subnet.env
    // (which still holds the earlier run's IPv6 pair until then): the peers can drop their
    // routes before that, so the file is waited for, not read once.
    wait_for(
        Duration::from_secs(15),
        "h3's subnet.env without an IPv6 half",
        || tweed_config::SubnetEnv::read(&h3.subnet_file).is_ok_and(|e| e.ipv6.is_none()),
    );
    let subnet3 = tweed_config::SubnetEnv::read(&h3.subnet_file).unwrap();
    let v4_key = subnet3
        .node_subnet()
        .expect("IPv4 pair")
        .to_string()
        .replace('/', "-");
    assert!(
        keys.lines().any(|k| k.ends_with(&format!("/{v4_key}"))),
        "no IPv4-only key for h3 ({v4_key}) in\n{keys}"
    );
    assert!(
        subnet3.ipv6.is_none(),
        "h3's subnet.env still has an IPv6 half"
    );
    // IPv4 only now: pods created from now on get tweed.1's MTU again.
    assert_eq!(subnet3.mtu, 1450, "h3's subnet.env MTU, IPv4 only");
    // The earlier run's IPv6 rules are removed (chains and jumps), the IPv4 ones kept as they were.
    wait_for(Duration::from_secs(15), "h3's IPv6 rules removed", || {
        tweed_rules("ip6tables").is_empty()
    });
    assert_eq!(tweed_rules("iptables"), v4_rules, "h3's IPv4 rules");
    assert!(
        std::fs::read_to_string(&h3.log)
            .unwrap()
            .contains("removed the IPv6 rules of an earlier dual-stack run"),
        "h3's log names the removal"
    );

    // IPv4: every pair; IPv6: between the dual-stack nodes (h3's pods keep a stale IPv6
    // address, which `check` still pings and which fails, so only its IPv4 results count).
    let start = std::time::Instant::now();
    let v4_failures = loop {
        let report = lab.check().unwrap();
        assert!(report.results.iter().any(|r| r.to_ip.is_ipv4()));
        let failed: Vec<String> = report
            .failures()
            .filter(|f| f.to_ip.is_ipv4())
            .map(|f| format!("{} -> {}: {}", f.from, f.to, f.detail))
            .collect();
        if failed.is_empty() || start.elapsed() > Duration::from_secs(20) {
            break failed;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(v4_failures.is_empty(), "{}", v4_failures.join("\n"));
    let h2p1 = host_state(&lab, "h2").pods[0].clone();
    let target = h2p1.ip6.unwrap().to_string();
    assert!(
        ok_in(
            &h1.pods[0].netns,
            &["ping", "-6", "-n", "-c", "2", "-W", "2", &target]
        ),
        "h1/p1 -> h2/p1 over IPv6 with h3 IPv4 only"
    );
}

/// A node configured by hand exactly the way flannel v0.28's vxlan backend configures a
/// dual-stack node (pkg/backend/vxlan, read for facts): `flannel.1` and `flannel-v6.1` (VNI 1, port
/// 8472, local its PublicIP / PublicIPv6, learning off), the IPv4 subnet's network /32 on
/// `flannel.1` and the IPv6 subnet's address /128 on `flannel-v6.1`, one lease under flannel's
/// dual key `<v4>-24&<v6>-64` with `BackendData` and `BackendV6Data`, and per peer, from the
/// peers' leases in etcd: neighbour (ARP / NDP) `<peer subnet address> lladdr <VtepMAC>`, FDB
/// `<VtepMAC> dst <PublicIP / PublicIPv6>`, route `<peer subnet> via <peer subnet address>
/// onlink`, per family. tweed programs the node's IPv6 half from that lease, and its pod and the
/// tweed pods reach each other over IPv4 and over IPv6, both ways.
#[test]
fn a_flannel_configured_dual_stack_node_interoperates_with_tweed_nodes() {
    require_root!(NEEDS_ROOT);
    let mut spec = LabSpec::new(per_process("d6f"), 2);
    spec.pods_per_host = 1;
    spec.ip_family = IpFamily::Dual;
    let lab = up(spec);
    // Namespaces outside the lab: deleted on drop, also when an assertion below fails.
    let fl = flannel::Node::up(&lab, "twf6", "1450");
    let (node, pod, subnet, pod_ip) = (&*fl.node, &*fl.pod, &*fl.subnet, &*fl.pod_ip);
    let public_ip = flannel::PUBLIC_IP;
    // The IPv6 twin of the node's IPv4 underlay address (fd00:198:18::200 beside 198.18.0.200).
    let public_ip6 = names::host_public_ip6(200, 1);

    // An IPv6 subnet of the overlay no tweed host took (the agents pick theirs at random).
    let overlay6: Ipv6Network = names::OVERLAY6_NETWORK.parse().unwrap();
    let taken: Vec<Ipv6Network> = ["h1", "h2"].iter().map(|h| subnet6_of(&lab, h)).collect();
    let subnet6 = (0xc8u16..=0xff)
        .map(|g| {
            let s = overlay6.network().segments();
            Ipv6Network::new(Ipv6Addr::new(s[0], s[1], s[2], g, 0, 0, 0, 0), 64).unwrap()
        })
        .find(|s| !taken.contains(s))
        .expect("a free IPv6 /64 in the overlay");
    let gw6 = Ipv6Addr::from(u128::from(subnet6.network()) + 1);
    let pod_ip6 = Ipv6Addr::from(u128::from(subnet6.network()) + 2);

    // IPv6 on the node and its pod: no DAD (a tentative address is unusable for a second or
    // two), forwarding on, the IPv6 underlay address beside the IPv4 one, and the pod's second
    // family as flannel's CNI chain gives it (cni0 the gateway, a default route via it).
    for ns in [node, pod] {
        for scope in ["all", "default"] {
            in_ns(
                ns,
                &[
                    "sysctl",
                    "-qw",
                    &format!("net.ipv6.conf.{scope}.accept_dad=0"),
                ],
            );
        }
    }
    in_ns(node, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    let addr6 = |ns: &str, a: String, dev: &str| {
        ip(&["-n", ns, "-6", "addr", "add", &a, "dev", dev, "nodad"]);
    };
    addr6(node, format!("{public_ip6}/64"), "eth0");
    addr6(node, format!("{gw6}/64"), "cni0");
    addr6(pod, format!("{pod_ip6}/64"), "eth0");
    let gw6s = gw6.to_string();
    ip(&["-n", pod, "-6", "route", "add", "default", "via", &gw6s]);

    // flannel's two vxlan devices; the IPv6 one's MTU is left to the kernel (eth0's minus the
    // IPv6 headroom), as flannel creates it without one.
    let vxlan = |dev: &str, local: &str| {
        ip(&[
            "-n",
            node,
            "link",
            "add",
            dev,
            "type",
            "vxlan",
            "id",
            "1",
            "local",
            local,
            "dev",
            "eth0",
            "dstport",
            "8472",
            "nolearning",
        ]);
    };
    vxlan("flannel.1", public_ip);
    vxlan("flannel-v6.1", &public_ip6.to_string());
    ip(&["-n", node, "link", "set", "flannel.1", "mtu", "1450", "up"]);
    ip(&["-n", node, "link", "set", "flannel-v6.1", "up"]);
    fl.address_device("flannel.1");
    addr6(node, format!("{}/128", subnet6.network()), "flannel-v6.1");
    let mac_of = |dev: &str| {
        in_ns(node, &["cat", &format!("/sys/class/net/{dev}/address")])
            .trim()
            .to_string()
    };
    let (mac, mac6) = (mac_of("flannel.1"), mac_of("flannel-v6.1"));

    // The lease, in flannel's dual-stack key and JSON, held by a TTL lease.
    let key = format!("{subnet}-24&{}-64", subnet6.network());
    let value = format!(
        r#"{{"PublicIP":"{public_ip}","PublicIPv6":"{public_ip6}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"{mac6}"}}}}"#
    );
    fl.write_lease_at(&lab, &key, 600, &value);

    // The node's side, programmed by hand from the tweed hosts' leases as flannel reads them.
    let listing = etcdctl(&lab, &["get", "--prefix", flannel::SUBNETS]);
    let mut peers = 0;
    for (k, peer_net, val) in flannel::leases(&listing) {
        if peer_net == subnet {
            assert_eq!(val, value, "our lease as written");
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(val).expect("tweed lease is flannel JSON");
        assert_eq!(v["BackendType"], "vxlan", "{k}");
        let peer6 = key_subnet6(k).unwrap_or_else(|| panic!("{k}: no IPv6 half in the key"));
        let peer_gw6 = peer6.network().to_string();
        let fam: [(&str, &str, &str, String, String, &str); 2] = [
            (
                "-4",
                "flannel.1",
                "BackendData",
                peer_net.clone(),
                format!("{peer_net}/24"),
                "PublicIP",
            ),
            (
                "-6",
                "flannel-v6.1",
                "BackendV6Data",
                peer_gw6.clone(),
                peer6.to_string(),
                "PublicIPv6",
            ),
        ];
        for (f, dev, data, gw, dst, public) in &fam {
            assert_eq!(v[*data]["VNI"], 1, "{k} {data}");
            let peer_mac = v[*data]["VtepMAC"]
                .as_str()
                .unwrap_or_else(|| panic!("{k}: no {data}.VtepMAC"));
            let peer_ip = v[*public]
                .as_str()
                .unwrap_or_else(|| panic!("{k}: no {public}"));
            flannel::program_vxlan_peer(node, f, dev, gw, peer_mac, peer_ip, dst);
        }
        peers += 1;
    }
    assert_eq!(peers, 2, "{listing}");

    // Each tweed host programs the node from its dual-stack lease: both families, flannel's
    // entries, the IPv6 ones on tweed-v6.1 toward the node's PublicIPv6.
    let route6 = format!(
        "{subnet6} via {} proto static metric 1024 onlink",
        subnet6.network()
    );
    let neigh6 = format!("{} lladdr {mac6} PERMANENT", subnet6.network());
    let fdb6 = format!("{mac6} dst {public_ip6} self permanent");
    for h in ["h1", "h2"] {
        let ns = host_state(&lab, h).netns;
        wait_for(
            Duration::from_secs(10),
            &format!("{h} to program the flannel node over both families"),
            || {
                let s = vxlan_state(&ns, "tweed.1");
                let show =
                    |argv: &[&str]| tweed_testkit::cmd::try_in_ns(&ns, argv).unwrap_or_default();
                s.routes.contains(&format!("{subnet}/24 via {subnet}"))
                    && s.fdb.contains(&mac)
                    && show(&["ip", "-6", "route", "show", "dev", "tweed-v6.1"]).contains(&route6)
                    && show(&["ip", "-6", "neigh", "show", "dev", "tweed-v6.1"]).contains(&neigh6)
                    && show(&["bridge", "fdb", "show", "dev", "tweed-v6.1"]).contains(&fdb6)
            },
        );
    }

    // Both directions, both families, every tweed pod; and from the node itself over IPv6,
    // which leaves from its /128 on flannel-v6.1 and so is answered through the overlay.
    let pod_ip6s = pod_ip6.to_string();
    for h in ["h1", "h2"] {
        for p in &host_state(&lab, h).pods {
            let ip4 = ipv4_of(p).to_string();
            let ip6 = p
                .ip6
                .unwrap_or_else(|| panic!("{h}/{}: no IPv6", p.name))
                .to_string();
            for (from, to) in [
                (pod, ip4.as_str()),
                (pod, ip6.as_str()),
                (p.netns.as_str(), pod_ip),
                (p.netns.as_str(), pod_ip6s.as_str()),
                (node, ip6.as_str()),
            ] {
                assert!(
                    ok_in(from, &["ping", "-n", "-c", "2", "-W", "2", to]),
                    "{from} -> {to} ({h}/{})",
                    p.name
                );
            }
        }
    }
}

/// vxlan `DirectRouting` in a dual-stack lab with two IPv6 underlay segments (h1 and h3 on A,
/// h2 on B, routed by the underlay namespace): a peer on the same segment gets a plain IPv6 route
/// via its `PublicIPv6` on eth0 and no `tweed-v6.1` FDB entry, a peer behind the router the
/// `tweed-v6.1` route and FDB entry; every pod pair answers ping and ping6. An agent restart
/// keeps the direct IPv6 routes (they are the vxlan plane's own, no leftovers), and a deleted
/// one is repaired from its notification.
#[test]
fn vxlan_direct_routing_uses_plain_ipv6_routes_on_the_segment_and_vxlan_across_it() {
    require_root!(NEEDS_ROOT);
    let mut spec = LabSpec::new(per_process("d6dr"), 3);
    spec.backend = Backend::Vxlan;
    spec.direct_routing = true;
    spec.segments = 2;
    spec.pods_per_host = 1;
    spec.ip_family = IpFamily::Dual;
    let lab = up(spec);
    let report = lab.check_until(Duration::from_secs(20)).expect("check");
    let failures: Vec<String> = report
        .failures()
        .map(|f| format!("{} -> {} ({}): {}", f.from, f.to, f.to_ip, f.detail))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // 3 hosts x 2 peers, once per family.
    let v6 = report.results.iter().filter(|r| r.to_ip.is_ipv6()).count();
    assert_eq!((report.results.len(), v6), (12, 6));

    let check_routes = |h: &tweed_lab::state::HostState| {
        let routes = in_ns(&h.netns, &["ip", "-6", "route"]);
        let fdb = in_ns(&h.netns, &["bridge", "fdb", "show", "dev", "tweed-v6.1"]);
        for peer in lab.state().hosts.iter().filter(|p| p.name != h.name) {
            let s = subnet6_of(&lab, &peer.name);
            let ip6 = peer.public_ip6.unwrap();
            let line = routes
                .lines()
                .find(|l| l.starts_with(&format!("{s} ")))
                .unwrap_or_else(|| panic!("{}: no route to {s} in\n{routes}", h.name));
            let dst = format!("dst {ip6} self permanent");
            if peer.segment == h.segment {
                assert!(
                    line.contains(&format!("via {ip6} dev eth0")),
                    "{} -> {} (same segment): {line}",
                    h.name,
                    peer.name
                );
                assert!(!fdb.contains(&dst), "{}: {dst:?} in\n{fdb}", h.name);
            } else {
                assert!(
                    line.contains(&format!("via {} dev tweed-v6.1", s.network()))
                        && line.contains("onlink"),
                    "{} -> {} (other segment): {line}",
                    h.name,
                    peer.name
                );
                assert!(fdb.contains(&dst), "{}: no {dst:?} in\n{fdb}", h.name);
            }
        }
    };
    for h in &lab.state().hosts {
        check_routes(h);
    }
    let h1 = host_state(&lab, "h1");
    let h3 = host_state(&lab, "h3");
    assert_eq!((h1.segment, h3.segment), (0, 0));
    let ping6 = |to: Ipv6Addr| {
        ok_in(
            &h1.pods[0].netns,
            &["ping", "-6", "-n", "-c", "2", "-W", "2", &to.to_string()],
        )
    };
    assert!(ping6(h3.pods[0].ip6.unwrap()), "h1/p1 -> h3/p1 (direct)");
    assert!(
        ping6(host_state(&lab, "h2").pods[0].ip6.unwrap()),
        "h1/p1 -> h2/p1 (vxlan)"
    );

    // A restart keeps the direct routes: the vxlan plane owns them, nothing is a leftover.
    let stopped = stop_agent(&lab, "h1", libc::SIGTERM);
    restart_agent_ready(&stopped, "h1");
    let log = std::fs::read_to_string(&h1.log).unwrap();
    assert!(!log.contains("removed IPv6 leftover"), "{log}");
    check_routes(&h1);
    assert!(
        ping6(h3.pods[0].ip6.unwrap()),
        "h1/p1 -> h3/p1 after a restart"
    );

    // A deleted direct route is put back from its notification (not the 60 s relist).
    let s3 = subnet6_of(&lab, "h3");
    let want = format!("{s3} via {} dev eth0", h3.public_ip6.unwrap());
    in_ns(&h1.netns, &["ip", "-6", "route", "del", &s3.to_string()]);
    wait_for(
        Duration::from_secs(5),
        "h1's direct IPv6 route to h3 repaired",
        || {
            tweed_testkit::cmd::try_in_ns(&h1.netns, &["ip", "-6", "route"])
                .is_ok_and(|r| r.contains(&want))
        },
    );
    assert!(
        ping6(h3.pods[0].ip6.unwrap()),
        "h1/p1 -> h3/p1 after the repair"
    );
}

/// h1's lease value, read from the lab's etcd (the lease whose `PublicIP` is h1's).
fn lease_value_of(lab: &Lab, host: &str) -> serde_json::Value {
    let ip = host_state(lab, host).public_ip.to_string();
    let listing = etcdctl(lab, &["get", "--prefix", "/coreos.com/network/subnets/"]);
    listing
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["PublicIP"] == ip.as_str())
        .unwrap_or_else(|| panic!("no lease of {host} in\n{listing}"))
}

/// The node's `PublicIPv6` changes at run time (issue 19): h1's underlay IPv6 address is
/// removed (nothing replaces it: logged, the lease keeps the old address), then a new one is
/// added: within seconds h1's lease in etcd advertises it, h1's `tweed-v6.1` has it as local
/// VTEP address, h2's FDB entry for h1 points at it, and the pods ping6 each other again.
#[test]
fn a_changed_public_ipv6_moves_the_lease_and_the_vxlan_vtep() {
    require_root!(NEEDS_ROOT);
    let mut spec = LabSpec::new(per_process("d6pc"), 2);
    spec.backend = Backend::Vxlan;
    spec.pods_per_host = 1;
    spec.ip_family = IpFamily::Dual;
    let lab = up(spec);
    let report = lab.check_until(Duration::from_secs(20)).expect("check");
    assert_eq!(report.summary(), "4 passed, 0 failed");
    let h1 = host_state(&lab, "h1");
    let h2 = host_state(&lab, "h2");
    let old = h1.public_ip6.unwrap();
    assert_eq!(lease_value_of(&lab, "h1")["PublicIPv6"], old.to_string());

    // Removed, nothing in its place: said once, nothing renamed.
    in_ns(
        &h1.netns,
        &[
            "ip",
            "-6",
            "addr",
            "del",
            &format!("{old}/64"),
            "dev",
            "eth0",
        ],
    );
    wait_for(
        Duration::from_secs(5),
        "h1 logs the lost PublicIPv6",
        || {
            std::fs::read_to_string(&h1.log)
                .is_ok_and(|l| l.contains("no other usable global IPv6 address"))
        },
    );
    assert_eq!(lease_value_of(&lab, "h1")["PublicIPv6"], old.to_string());

    // A new address: the lease, h1's VTEP and h2's FDB follow.
    let new: Ipv6Addr = "fd00:198:18::101".parse().unwrap();
    in_ns(
        &h1.netns,
        &[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{new}/64"),
            "dev",
            "eth0",
            "nodad",
        ],
    );
    wait_for(
        Duration::from_secs(10),
        "h1's lease advertises the new PublicIPv6",
        || lease_value_of(&lab, "h1")["PublicIPv6"] == new.to_string(),
    );
    wait_for(
        Duration::from_secs(10),
        "h1's tweed-v6.1 on the new address",
        || {
            tweed_testkit::cmd::try_in_ns(&h1.netns, &["ip", "-d", "link", "show", "tweed-v6.1"])
                .is_ok_and(|l| l.contains(&format!("local {new} ")))
        },
    );
    wait_for(
        Duration::from_secs(10),
        "h2's FDB entry for h1 on the new address",
        || {
            tweed_testkit::cmd::try_in_ns(
                &h2.netns,
                &["bridge", "fdb", "show", "dev", "tweed-v6.1"],
            )
            .is_ok_and(|f| {
                f.contains(&format!("dst {new} ")) && !f.contains(&format!("dst {old} "))
            })
        },
    );
    let log = std::fs::read_to_string(&h1.log).unwrap();
    assert!(
        log.contains("the PublicIPv6 left the underlay interface; advertising"),
        "{log}"
    );
    let to_h1 = h1.pods[0].ip6.unwrap().to_string();
    let to_h2 = h2.pods[0].ip6.unwrap().to_string();
    let ping6 = |ns: &str, to: &str| ok_in(ns, &["ping", "-6", "-n", "-c", "2", "-W", "2", to]);
    assert!(
        ping6(&h2.pods[0].netns, &to_h1),
        "h2/p1 -> h1/p1 after the move"
    );
    assert!(
        ping6(&h1.pods[0].netns, &to_h2),
        "h1/p1 -> h2/p1 after the move"
    );
}

/// Issue 19, both run-time gaps: h2 starts IPv4 only (its IPv6 underlay address removed before
/// the agent starts), then the address comes back while the agent runs. Without a restart h2
/// turns dual stack: its lease takes an IPv6 half (flannel's `v4&v6` key), the IPv6 device gets
/// its /128 (udp: `tweed0` set up again to carry IPv6; vxlan: `tweed-v6.1` created), h1 learns
/// the half from the lease, and ping6 crosses the overlay (h1's pod to h2's device address),
/// while IPv4 keeps working.
fn assert_turns_dual_without_restart(tag: &str, backend: Backend, device6: &str) {
    let mut spec = LabSpec::new(per_process(tag), 2);
    spec.backend = backend;
    spec.pods_per_host = 1;
    spec.ip_family = IpFamily::Dual;
    let lab = up(spec);
    assert_eq!(
        lab.check_until(Duration::from_secs(20)).unwrap().failed(),
        0
    );
    let h1 = host_state(&lab, "h1");
    let h2 = host_state(&lab, "h2");
    let addr = format!("{}/64", h2.public_ip6.unwrap());
    let stopped = stop_agent(&lab, "h2", libc::SIGTERM);
    in_ns(
        &h2.netns,
        &["ip", "-6", "addr", "del", &addr, "dev", "eth0"],
    );
    start_agent(&stopped);
    wait_for(
        Duration::from_secs(15),
        "h2's subnet.env without an IPv6 half",
        || {
            std::fs::read_to_string(&h2.log).is_ok_and(|l| l.contains("IPv4 only"))
                && tweed_config::SubnetEnv::read(&h2.subnet_file).is_ok_and(|e| e.ipv6.is_none())
        },
    );
    let starts_before = std::fs::read_to_string(&h2.log)
        .unwrap()
        .matches("network config")
        .count();

    // IPv4 pings every 10 ms across the switch: how long IPv4 pauses (udp: while the backend
    // is set up again), a figure printed, not a pass/fail time. The deadline covers the longest
    // waits below on a slow machine; SIGINT ends it once the switch is checked.
    let v4 = ipv4_of(&h2.pods[0]).to_string();
    let mut pinger = ns_command(
        &h1.pods[0].netns,
        &["ping", "-n", "-q", "-i", "0.01", "-w", "60", &v4],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .expect("ping starts");
    std::thread::sleep(Duration::from_millis(300));
    // The address comes back; the agent runs on.
    in_ns(
        &h2.netns,
        &["ip", "-6", "addr", "add", &addr, "dev", "eth0"],
    );
    wait_for(
        Duration::from_secs(20),
        "h2's subnet.env with an IPv6 half",
        || tweed_config::SubnetEnv::read(&h2.subnet_file).is_ok_and(|e| e.ipv6.is_some()),
    );
    if let Some(status) = pinger.try_wait().unwrap() {
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(pinger.stdout.as_mut().unwrap(), &mut out);
        panic!(
            "the pings ended ({status}) before the switch: the figure below would not cover it\n{out}\n{}",
            std::fs::read_to_string(&h2.log).unwrap_or_default()
        );
    }
    let log = std::fs::read_to_string(&h2.log).unwrap();
    assert!(log.contains("turning dual stack"), "{log}");
    if backend == Backend::Udp {
        assert!(log.contains("udp: the lease's IPv6 half appeared"), "{log}");
    }
    assert_eq!(
        log.matches("network config").count(),
        starts_before,
        "no restart"
    );
    let sub6 = subnet6_of(&lab, "h2");
    let keys = etcdctl(
        &lab,
        &[
            "get",
            "--prefix",
            "--keys-only",
            "/coreos.com/network/subnets/",
        ],
    );
    assert!(
        keys.lines().any(|k| key_subnet6(k) == Some(sub6)),
        "no v4&v6 key for h2 ({sub6}) in\n{keys}"
    );
    let dev_addr = sub6.network().to_string();
    wait_for(Duration::from_secs(10), "h2's IPv6 device /128", || {
        in_ns(&h2.netns, &["ip", "-6", "addr", "show", "dev", device6])
            .contains(&format!("{dev_addr}/128"))
    });
    // h1's pod reaches h2's device over IPv6 (h1 learns the IPv6 half from the renamed lease),
    // and IPv4 to h2's pod still works.
    wait_for(
        Duration::from_secs(20),
        "ping6 h1/p1 -> h2's device",
        || {
            ok_in(
                &h1.pods[0].netns,
                &["ping", "-6", "-n", "-c", "1", "-W", "1", &dev_addr],
            )
        },
    );
    // SAFETY: kill(2) on our own child's pid, which is not reaped before the wait below.
    unsafe { libc::kill(pinger.id() as libc::pid_t, libc::SIGINT) };
    let out = pinger.wait_with_output().expect("ping ends");
    let summary = String::from_utf8_lossy(&out.stdout);
    let line = summary
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary: {summary}"));
    let count = |what: &str| -> u64 {
        line.split(',')
            .find(|p| p.contains(what))
            .and_then(|p| p.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let (sent, received) = (count("transmitted"), count("received"));
    eprintln!(
        "{tag}: IPv4 pings every 10 ms while h2 turned dual stack: {sent} sent, {received} received, {} lost",
        sent - received.min(sent)
    );
    assert!(received > 0, "IPv4 stopped across the switch: {line}");
    assert!(
        ok_in(
            &h1.pods[0].netns,
            &["ping", "-n", "-c", "2", "-W", "2", &v4]
        ),
        "h1/p1 -> h2/p1 over IPv4"
    );
}

#[test]
fn udp_node_turns_dual_stack_when_its_ipv6_address_appears_without_restart() {
    require_root!(NEEDS_ROOT);
    assert_turns_dual_without_restart("d6a", Backend::Udp, "tweed0");
}

#[test]
fn vxlan_node_turns_dual_stack_when_its_ipv6_address_appears_without_restart() {
    require_root!(NEEDS_ROOT);
    assert_turns_dual_without_restart("d6b", Backend::Vxlan, "tweed-v6.1");
}

/// Issue 19, the reverse switch: h3's IPv6 underlay address is deleted while its agent runs.
/// Past the grace period, without a restart, h3 turns IPv4 only: its key in etcd is the
/// IPv4-only form (same IPv4 subnet), its IPv6 plane (vxlan: `tweed-v6.1`) and IPv6 rules are
/// gone, subnet.env has no IPv6 half, the peers drop their IPv6 route to it, IPv4 works between
/// every pair of pods and h1 and h2 still reach each other over IPv6. The address back, h3
/// turns dual stack again on its old IPv6 subnet, and the pods reach h3's over IPv6 again.
fn assert_turns_ipv4_only_and_back(tag: &str, backend: Backend) {
    let mut spec = LabSpec::new(per_process(tag), HOSTS);
    spec.backend = backend;
    spec.pods_per_host = 1;
    spec.ip_family = IpFamily::Dual;
    let lab = up(spec);
    assert_eq!(
        lab.check_until(Duration::from_secs(20)).unwrap().failed(),
        0
    );
    let (h1, h2, h3) = (
        host_state(&lab, "h1"),
        host_state(&lab, "h2"),
        host_state(&lab, "h3"),
    );
    let s3 = subnet6_of(&lab, "h3");
    let v4_3 = tweed_config::SubnetEnv::read(&h3.subnet_file)
        .unwrap()
        .node_subnet()
        .expect("IPv4 pair");
    // vxlan's on tweed-v6.1, host-gw's via h3's address on eth0.
    let v6_routes = |h: &tweed_lab::state::HostState| {
        in_ns(&h.netns, &["ip", "-6", "route", "show", &s3.to_string()])
    };
    for h in [&h1, &h2] {
        assert!(v6_routes(h).contains(&s3.to_string()), "{}", v6_routes(h));
    }
    let starts = || {
        std::fs::read_to_string(&h3.log)
            .unwrap()
            .matches("network config")
            .count()
    };
    let starts_before = starts();
    let addr = format!("{}/64", h3.public_ip6.unwrap());
    let routes_via_peers = |h: &tweed_lab::state::HostState| {
        in_ns(&h.netns, &["ip", "-6", "route", "show"])
            .lines()
            .filter(|l| l.starts_with("fd00:10:244:") && l.contains(" via "))
            .count()
    };
    if backend == Backend::HostGw {
        assert_eq!(routes_via_peers(&h3), 2, "h3's IPv6 routes to h1 and h2");
    }

    let gone_at = std::time::Instant::now();
    in_ns(
        &h3.netns,
        &["ip", "-6", "addr", "del", &addr, "dev", "eth0"],
    );
    wait_for(
        Duration::from_secs(20),
        "h3's subnet.env without an IPv6 half",
        || tweed_config::SubnetEnv::read(&h3.subnet_file).is_ok_and(|e| e.ipv6.is_none()),
    );
    let switched_after = gone_at.elapsed();
    eprintln!("{tag}: h3 turned IPv4 only {switched_after:?} after its address was deleted");
    assert!(
        switched_after >= Duration::from_secs(3),
        "before the grace: {switched_after:?}"
    );
    // Logged once the IPv6 plane is removed, just after subnet.env is written.
    wait_for(Duration::from_secs(10), "h3 logs the switch", || {
        std::fs::read_to_string(&h3.log).is_ok_and(|l| l.contains("turned IPv4 only"))
    });
    assert_eq!(starts(), starts_before, "no restart");
    let keys = etcdctl(
        &lab,
        &[
            "get",
            "--prefix",
            "--keys-only",
            "/coreos.com/network/subnets/",
        ],
    );
    let v4_key = v4_3.to_string().replace('/', "-");
    assert!(
        keys.lines().any(|k| k.ends_with(&format!("/{v4_key}"))),
        "no IPv4-only key for h3 ({v4_key}) in\n{keys}"
    );
    assert!(
        !keys.lines().any(|k| key_subnet6(k) == Some(s3)),
        "h3's dual key is still there:\n{keys}"
    );
    assert!(lease_value_of(&lab, "h3").get("PublicIPv6").is_none());
    if backend == Backend::Vxlan {
        wait_for(Duration::from_secs(10), "h3's tweed-v6.1 removed", || {
            tweed_testkit::cmd::try_in_ns(&h3.netns, &["ip", "link", "show", "tweed-v6.1"]).is_err()
        });
    } else {
        // Its own pods' route on cni0 stays (they keep their addresses); the peers' go.
        wait_for(
            Duration::from_secs(10),
            "h3's IPv6 routes to peers removed",
            || {
                !in_ns(&h3.netns, &["ip", "-6", "route", "show"])
                    .lines()
                    .any(|l| l.starts_with("fd00:10:244:") && l.contains(" via "))
            },
        );
    }
    for h in [&h1, &h2] {
        wait_for(
            Duration::from_secs(15),
            &format!("{} drops its IPv6 route to h3", h.name),
            || !v6_routes(h).contains(&s3.to_string()),
        );
    }
    wait_for(Duration::from_secs(15), "h3's IPv6 rules removed", || {
        !in_ns(&h3.netns, &["ip6tables", "-w", "5", "-t", "nat", "-S"]).contains("TWEED-")
    });
    // IPv4 between every pair of pods; IPv6 between the dual-stack nodes.
    let all = [&h1, &h2, &h3];
    for from in all {
        for to in all {
            if from.name == to.name {
                continue;
            }
            let ip = ipv4_of(&to.pods[0]).to_string();
            assert!(
                ok_in(
                    &from.pods[0].netns,
                    &["ping", "-n", "-c", "2", "-W", "2", &ip]
                ),
                "{} -> {} over IPv4 with h3 IPv4 only",
                from.name,
                to.name
            );
        }
    }
    let ping6 = |from: &tweed_lab::state::HostState, to: &str| {
        ok_in(
            &from.pods[0].netns,
            &["ping", "-6", "-n", "-c", "2", "-W", "2", to],
        )
    };
    assert!(
        ping6(&h1, &h2.pods[0].ip6.unwrap().to_string()),
        "h1 -> h2 over IPv6"
    );
    assert!(
        ping6(&h2, &h1.pods[0].ip6.unwrap().to_string()),
        "h2 -> h1 over IPv6"
    );

    // Back: dual stack again, on the same IPv6 subnet (h3's pod keeps its address).
    in_ns(
        &h3.netns,
        &["ip", "-6", "addr", "add", &addr, "dev", "eth0", "nodad"],
    );
    wait_for(
        Duration::from_secs(20),
        "h3's subnet.env with an IPv6 half",
        || tweed_config::SubnetEnv::read(&h3.subnet_file).is_ok_and(|e| e.ipv6.is_some()),
    );
    assert_eq!(subnet6_of(&lab, "h3"), s3, "the old IPv6 subnet back");
    assert_eq!(starts(), starts_before, "no restart");
    let log = std::fs::read_to_string(&h3.log).unwrap();
    assert_eq!(
        log.matches("turned IPv4 only").count(),
        1,
        "logged once: {log}"
    );
    assert!(log.contains("turning dual stack"), "{log}");
    if backend == Backend::Vxlan {
        let dev_addr = s3.network().to_string();
        wait_for(Duration::from_secs(10), "h3's tweed-v6.1 /128", || {
            tweed_testkit::cmd::try_in_ns(
                &h3.netns,
                &["ip", "-6", "addr", "show", "dev", "tweed-v6.1"],
            )
            .is_ok_and(|a| a.contains(&format!("{dev_addr}/128")))
        });
    }
    wait_for(Duration::from_secs(20), "ping6 h1/p1 -> h3/p1", || {
        ping6(&h1, &h3.pods[0].ip6.unwrap().to_string())
    });
    assert!(
        ping6(&h3, &h2.pods[0].ip6.unwrap().to_string()),
        "h3 -> h2 over IPv6"
    );
    assert!(
        ok_in(
            &h1.pods[0].netns,
            &[
                "ping",
                "-n",
                "-c",
                "2",
                "-W",
                "2",
                &ipv4_of(&h3.pods[0]).to_string()
            ]
        ),
        "h1 -> h3 over IPv4 after the round trip"
    );
}

#[test]
fn vxlan_node_turns_ipv4_only_when_its_ipv6_address_goes_and_dual_again_when_it_returns() {
    require_root!(NEEDS_ROOT);
    assert_turns_ipv4_only_and_back("d6g", Backend::Vxlan);
}

#[test]
fn host_gw_node_turns_ipv4_only_when_its_ipv6_address_goes_and_dual_again_when_it_returns() {
    require_root!(NEEDS_ROOT);
    assert_turns_ipv4_only_and_back("d6k", Backend::HostGw);
}

/// Issue 19: udp carries IPv6 over the IPv4 underlay, so a udp node whose IPv6 underlay address
/// goes stays dual stack (its lease keeps the IPv6 half, its pods keep reaching the others over
/// IPv6), long past the grace period after which vxlan and host-gw turn IPv4 only.
#[test]
fn udp_node_stays_dual_stack_when_its_ipv6_underlay_address_goes() {
    require_root!(NEEDS_ROOT);
    let mut spec = LabSpec::new(per_process("d6s"), 2);
    spec.backend = Backend::Udp;
    spec.pods_per_host = 1;
    spec.ip_family = IpFamily::Dual;
    let lab = up(spec);
    assert_eq!(
        lab.check_until(Duration::from_secs(20)).unwrap().failed(),
        0
    );
    let (h1, h2) = (host_state(&lab, "h1"), host_state(&lab, "h2"));
    let s2 = subnet6_of(&lab, "h2");
    let addr = format!("{}/64", h2.public_ip6.unwrap());
    in_ns(
        &h2.netns,
        &["ip", "-6", "addr", "del", &addr, "dev", "eth0"],
    );
    wait_for(Duration::from_secs(5), "h2 logs the lost address", || {
        std::fs::read_to_string(&h2.log)
            .is_ok_and(|l| l.contains("no other usable global IPv6 address"))
    });
    // Well past vxlan's and host-gw's 3 s grace.
    std::thread::sleep(Duration::from_secs(6));
    let log = std::fs::read_to_string(&h2.log).unwrap();
    assert!(!log.contains("turning IPv4 only"), "{log}");
    assert_eq!(subnet6_of(&lab, "h2"), s2, "subnet.env keeps the IPv6 half");
    let keys = etcdctl(
        &lab,
        &[
            "get",
            "--prefix",
            "--keys-only",
            "/coreos.com/network/subnets/",
        ],
    );
    assert!(
        keys.lines().any(|k| key_subnet6(k) == Some(s2)),
        "h2's dual key is gone:\n{keys}"
    );
    let ping6 = |from: &tweed_lab::state::HostState, to: &tweed_lab::state::HostState| {
        ok_in(
            &from.pods[0].netns,
            &[
                "ping",
                "-6",
                "-n",
                "-c",
                "2",
                "-W",
                "2",
                &to.pods[0].ip6.unwrap().to_string(),
            ],
        )
    };
    assert!(
        ping6(&h1, &h2),
        "h1 -> h2 over IPv6 without h2's IPv6 underlay"
    );
    assert!(
        ping6(&h2, &h1),
        "h2 -> h1 over IPv6 without h2's IPv6 underlay"
    );
}
