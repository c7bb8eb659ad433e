//! Issue 16, the agent's half of the hostile-input suite: a peer host's pod cannot inject udp
//! packets as that node, hostile leases in etcd are refused next to good ones, a hijacked own
//! lease is restored (then given up) but never adopted, and slow clients do not starve /metrics.
//! Each test runs in a lab of its own (namespaces, real etcd, real agents), torn down on drop.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;
use tweed_e2e::*;
use tweed_lab::{Backend, Lab, LabSpec};

/// The value of the first series of `/metrics` starting with `series` (0 when absent).
fn metric(body: &str, series: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// `host`'s /metrics, fetched from `from` (a lab exec target).
fn scrape(lab: &Lab, from: &str, host: &str) -> String {
    let url = format!("http://{}:9867/metrics", host_state(lab, host).public_ip);
    lab.exec(from, &["curl", "-sf", "--max-time", "2", &url])
        .unwrap_or_default()
}

fn wait_metric(lab: &Lab, host: &str, series: &str, at_least: f64, timeout: Duration) -> String {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let body = scrape(lab, "h2", host);
        if metric(&body, series) >= at_least {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{host}: {series} never reached {at_least}; last /metrics:\n{}",
            body.lines()
                .filter(|l| l.starts_with("tweed_"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn subnet_of(lab: &Lab, host: &str) -> String {
    let env = tweed_config::SubnetEnv::read(&host_state(lab, host).subnet_file).unwrap();
    env.node_subnet().expect("IPv4 pair").to_string()
}

/// A python3 program sending `count` udp datagrams from source port `sport` to `dst:8285`, each
/// a well-formed inner IPv4/UDP packet from `inner_src` to `inner_dst:5999`: exactly what the
/// peer's agent would send, but from another port (or another address).
fn injector(sport: u16, dst: &str, inner_src: &str, inner_dst: &str, count: u32) -> String {
    format!(
        r#"
import socket, struct
def csum(b):
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
src = socket.inet_aton('{inner_src}'); dst = socket.inet_aton('{inner_dst}')
payload = b'injected'
udp = struct.pack('!HHHH', 4000, 5999, 8 + len(payload), 0) + payload
hdr = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, src, dst)
hdr = hdr[:10] + struct.pack('!H', csum(hdr)) + hdr[12:]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', {sport}))
for _ in range({count}):
    s.sendto(hdr + udp, ('{dst}', 8285))
"#
    )
}

#[test]
fn udp_takes_packets_only_from_the_peers_agent_port() {
    require_root!(NEEDS_ROOT);
    let mut spec = LabSpec::new(per_process("su"), 2);
    spec.backend = Backend::Udp;
    spec.pods_per_host = 1;
    let lab = up(spec);
    lab.check_until(Duration::from_secs(15)).expect("check");
    let h1 = host_state(&lab, "h1");
    let pod = ipv4_of(&h1.pods[0]).to_string();
    // The inner source is inside h2's subnet: only the outer source tells the forgery apart.
    let inner_src = subnet_of(&lab, "h2").replace(".0/24", ".77");

    // A listener in h1's pod: nothing injected may reach it.
    let listen = "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
                  s.bind(('0.0.0.0',5999))\nprint('ready',flush=True)\ns.settimeout(6)\n\
                  try:\n    d,a=s.recvfrom(100)\n    print('GOT',a[0],d,flush=True)\n\
                  except socket.timeout:\n    print('nothing',flush=True)\n";
    let mut listener = lab
        .command("h1/p1", &["python3", "-c", listen])
        .unwrap()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("listener");
    let mut out = BufReader::new(listener.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");

    let before = scrape(&lab, "h2", "h1");
    let base = |reason: &str| {
        metric(
            &before,
            &format!("tweed_udp_drops_total{{reason=\"{reason}\"}}"),
        )
    };
    let (wrong0, unknown0) = (base("wrong_port"), base("unknown_peer"));
    // The peer's own address with another port: a pod on h2 masqueraded to h2's address, or
    // any process there.
    let from_peer = injector(40000, &h1.public_ip.to_string(), &inner_src, &pod, 50);
    lab.exec("h2", &["python3", "-c", &from_peer])
        .expect("inject from h2");
    // A stranger using the agents' port: not a peer whatever port it uses.
    let from_outside = injector(8285, &h1.public_ip.to_string(), &inner_src, &pod, 30);
    lab.exec("outside", &["python3", "-c", &from_outside])
        .expect("inject from outside");

    line.clear();
    out.read_line(&mut line).unwrap();
    let _ = listener.kill();
    let _ = listener.wait();
    assert_eq!(line.trim(), "nothing", "an injected packet reached the pod");
    let body = wait_metric(
        &lab,
        "h1",
        "tweed_udp_drops_total{reason=\"wrong_port\"}",
        wrong0 + 50.0,
        Duration::from_secs(15),
    );
    assert!(
        metric(&body, "tweed_udp_drops_total{reason=\"unknown_peer\"}") >= unknown0 + 30.0,
        "{body}"
    );
    // Real traffic between the agents still flows.
    lab.check_until(Duration::from_secs(15))
        .expect("check after the injection");
}

#[test]
fn hostile_leases_are_refused_and_counted_while_good_ones_are_programmed() {
    require_root!(NEEDS_ROOT);
    let lab = up(LabSpec::new(per_process("sl"), 2));
    lab.check_until(Duration::from_secs(15)).expect("check");
    let good = free_subnet(&lab, &[]);
    let mut used = vec![good.clone()];
    let mut next = || {
        let s = free_subnet(&lab, &used.iter().map(String::as_str).collect::<Vec<_>>());
        used.push(s.clone());
        s
    };
    let vx = |ip: &str, mac: &str| {
        format!(
            r#"{{"PublicIP":"{ip}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
        )
    };
    let key = |s: &str, len: u8| {
        format!(
            "/coreos.com/network/subnets/{}-{len}",
            s.trim_end_matches('/')
        )
    };
    // (key, value, reason label)
    let hostile: Vec<(String, String, &str)> = vec![
        // 250 is past the range free_subnet hands out, and even: a valid /23.
        (
            key("10.244.250.0", 23),
            vx("198.18.0.91", "0a:00:00:00:00:91"),
            "wrong_prefix_len",
        ),
        // Host bits set: not a subnet at all.
        (
            key(&format!("{}.5", next().trim_end_matches(".0")), 24),
            vx("198.18.0.99", "0a:00:00:00:00:99"),
            "bad_key",
        ),
        (
            key(&next(), 25),
            vx("198.18.0.92", "0a:00:00:00:00:92"),
            "wrong_prefix_len",
        ),
        (
            key(&next(), 24),
            vx("127.0.0.1", "0a:00:00:00:00:93"),
            "bad_public_ip",
        ),
        (
            key(&next(), 24),
            vx("224.0.0.1", "0a:00:00:00:00:94"),
            "bad_public_ip",
        ),
        (
            key(&next(), 24),
            vx("0.0.0.0", "0a:00:00:00:00:95"),
            "bad_public_ip",
        ),
        (
            key(&next(), 24),
            vx("10.244.1.1", "0a:00:00:00:00:96"),
            "public_ip_in_overlay",
        ),
        (
            key(&next(), 24),
            vx("198.18.0.97", "ff:ff:ff:ff:ff:ff"),
            "bad_backend_data",
        ),
        (
            key(&next(), 24),
            r#"{"PublicIP":"198.18.0.98","BackendType":"vxlan"}"#.to_string(),
            "bad_backend_data",
        ),
    ];
    for (k, v, _) in &hostile {
        etcdctl(&lab, &["put", k, v]);
    }
    etcdctl(
        &lab,
        &[
            "put",
            &key(&good, 24),
            &vx("198.18.0.90", "0a:00:00:00:00:90"),
        ],
    );

    let h1 = host_state(&lab, "h1");
    wait_for(
        Duration::from_secs(10),
        "the good lease programmed on h1",
        || {
            in_ns(&h1.netns, &["ip", "route", "show", "dev", "tweed.1"])
                .contains(&format!("{good}/24 via {good}"))
        },
    );
    let routes = in_ns(&h1.netns, &["ip", "route"]);
    let neigh = in_ns(&h1.netns, &["ip", "neigh", "show", "dev", "tweed.1"]);
    for (k, v, reason) in &hostile {
        let subnet = k.rsplit('/').next().unwrap().split('-').next().unwrap();
        assert!(
            !routes.contains(&format!("{subnet}/")),
            "{reason} lease {k} {v} was programmed:\n{routes}"
        );
    }
    for bad in ["127.0.0.1", "224.0.0.1", "ff:ff:ff:ff:ff:ff"] {
        assert!(
            !neigh.contains(bad),
            "{bad} reached the neighbour table:\n{neigh}"
        );
    }
    let body = scrape(&lab, "h2", "h1");
    for (reason, n) in [
        ("bad_key", 1.0),
        ("wrong_prefix_len", 2.0),
        ("bad_public_ip", 3.0),
        ("public_ip_in_overlay", 1.0),
        ("bad_backend_data", 2.0),
    ] {
        let got = metric(
            &body,
            &format!("tweed_leases_rejected_total{{reason=\"{reason}\"}}"),
        );
        assert_eq!(got, n, "tweed_leases_rejected_total{{reason={reason:?}}}");
    }
    // Each refusal is logged, naming the key.
    let log = std::fs::read_to_string(&h1.log).unwrap();
    for (k, _, reason) in &hostile {
        assert!(
            log.lines().any(|l| l.contains("rejecting lease")
                && l.contains(k.as_str())
                && l.contains(reason)),
            "no log line for {k} ({reason})"
        );
    }
    // The agents did not trip over them: the lab still works end to end.
    lab.check_until(Duration::from_secs(15))
        .expect("check with hostile leases");
}

#[test]
fn a_hijacked_own_lease_is_restored_then_given_up_never_adopted() {
    require_root!(NEEDS_ROOT);
    let lab = up(LabSpec::new(per_process("sh"), 2));
    lab.check_until(Duration::from_secs(15)).expect("check");
    let h1 = host_state(&lab, "h1");
    let subnet = subnet_of(&lab, "h1");
    let key = format!("/coreos.com/network/subnets/{}", subnet.replace('/', "-"));
    let thief = r#"{"PublicIP":"198.18.0.66","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0a:00:00:00:00:66"}}"#;
    let value_of = |lab: &Lab| etcdctl(lab, &["get", "--print-value-only", &key]);
    for round in 1..=3 {
        etcdctl(&lab, &["put", &key, thief]);
        wait_for(Duration::from_secs(10), "h1 to restore its lease", || {
            value_of(&lab).contains(&format!("\"PublicIP\":\"{}\"", h1.public_ip))
        });
        let body = scrape(&lab, "h2", "h1");
        assert_eq!(
            metric(&body, "tweed_lease_conflicts_total{action=\"restored\"}"),
            round as f64
        );
        assert_eq!(subnet_of(&lab, "h1"), subnet, "restoring keeps the subnet");
    }
    // The fourth overwrite: someone keeps fighting for the key, so h1 moves rather than flap
    // every peer's data plane, and leaves the thief's value alone.
    etcdctl(&lab, &["put", &key, thief]);
    wait_for(
        Duration::from_secs(15),
        "h1 to move to another subnet",
        || subnet_of(&lab, "h1") != subnet,
    );
    let body = scrape(&lab, "h2", "h1");
    assert_eq!(
        metric(&body, "tweed_lease_conflicts_total{action=\"moved\"}"),
        1.0
    );
    assert!(
        value_of(&lab).contains("198.18.0.66"),
        "the old key was rewritten"
    );
    let log = std::fs::read_to_string(&h1.log).unwrap();
    assert!(
        log.contains("CONFLICT"),
        "the conflict was not logged loudly"
    );
    // h1 never took the thief's address as its own: its new lease names h1.
    let new_key = format!(
        "/coreos.com/network/subnets/{}",
        subnet_of(&lab, "h1").replace('/', "-")
    );
    assert!(etcdctl(&lab, &["get", "--print-value-only", &new_key])
        .contains(&format!("\"PublicIP\":\"{}\"", h1.public_ip)));
}

#[test]
fn slow_clients_do_not_starve_metrics() {
    require_root!(NEEDS_ROOT);
    let lab = up(LabSpec::new(per_process("ss"), 2));
    let h1 = host_state(&lab, "h1");
    // From the outside namespace: 200 connections, each sending half a request head and then
    // one byte a second, as slowloris does. Prints how many the server had closed after 12 s.
    let slowloris = format!(
        r#"
import socket, time, select
conns = []
for _ in range(200):
    s = socket.socket(); s.settimeout(2)
    try:
        s.connect(('{ip}', 9867)); s.sendall(b'GET /metrics HTTP/1.1\r\nHost: x\r\n'); conns.append(s)
    except OSError:
        pass
print('opened', len(conns), flush=True)
closed = set()
start = time.time()
while time.time() - start < 12:
    for i, s in enumerate(conns):
        if i in closed:
            continue
        try:
            s.sendall(b'X-a: b\r\n')
            r, _, _ = select.select([s], [], [], 0)
            if r and s.recv(100) == b'':
                closed.add(i)
        except OSError:
            closed.add(i)
    time.sleep(1)
print('closed', len(closed), 'of', len(conns), flush=True)
"#,
        ip = h1.public_ip
    );
    let mut attacker = lab
        .command("outside", &["python3", "-c", &slowloris])
        .unwrap()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("slowloris");
    let mut out = BufReader::new(attacker.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.starts_with("opened"), "{line}");
    // While the attack holds its connections, Prometheus (here: h2) is served every time.
    let url = format!("http://{}:9867/metrics", h1.public_ip);
    for i in 0..10 {
        let t = std::time::Instant::now();
        let body = lab
            .exec("h2", &["curl", "-sf", "--max-time", "2", &url])
            .unwrap_or_else(|e| panic!("scrape {i} failed during the attack: {e}"));
        assert!(body.contains("tweed_lease_info"), "scrape {i}: {body}");
        assert!(t.elapsed() < Duration::from_secs(2));
        std::thread::sleep(Duration::from_millis(300));
    }
    line.clear();
    out.read_line(&mut line).unwrap();
    let _ = attacker.wait();
    // Every slow connection was closed: over the per-address cap at once, the rest at the
    // header deadline (5 s), although each kept sending.
    let parts: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(parts.first(), Some(&"closed"), "{line}");
    assert_eq!(
        parts[1], parts[3],
        "not every slow connection was closed: {line}"
    );
}
