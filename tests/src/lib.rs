//! Helpers for the end-to-end tests: a lab per test (torn down on drop, also on panic), agent
//! stop/start by pid, readers of a host's kernel state, and a flannel-configured node to join a
//! lab with.
//!
//! The tests need root (namespaces, vxlan); without it they skip, saying so, by tweed-testkit's
//! one rule. Commands in namespaces run through tweed-testkit too.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tweed_lab::{Lab, LabGuard, LabSpec};

pub use tweed_testkit::cmd::{ns_command, spawn_in};
pub use tweed_testkit::{in_ns, ip, ok_in, per_process, require_root, wait_for};

/// Why these tests need root, for `require_root!`.
pub const NEEDS_ROOT: &str = "network namespaces, vxlan and a lab of real agents";

pub fn up(spec: LabSpec) -> LabGuard {
    LabGuard::up(spec).expect("lab up")
}

/// A pod's IPv4 address, for tests of IPv4 and dual-stack labs (an IPv6-only lab's pods have
/// none).
pub fn ipv4_of(pod: &tweed_lab::state::PodState) -> std::net::Ipv4Addr {
    pod.ip
        .unwrap_or_else(|| panic!("pod {} ({}) has no IPv4 address", pod.name, pod.netns))
}

pub fn host_state(lab: &Lab, host: &str) -> tweed_lab::state::HostState {
    lab.state()
        .hosts
        .iter()
        .find(|h| h.name == host)
        .unwrap_or_else(|| panic!("no host {host}"))
        .clone()
}

/// An agent stopped by a test, with what it takes to start it again the same way.
pub struct StoppedAgent {
    pub netns: String,
    pub argv: Vec<String>,
    pub log: PathBuf,
}

/// Sends `signal` to the host's agent, waits until it is gone, returns how to restart it.
pub fn stop_agent(lab: &Lab, host: &str, signal: i32) -> StoppedAgent {
    let h = host_state(lab, host);
    let pid = h.agent_pid.expect("agent pid");
    let argv = agent_cmdline(lab, host);
    // SAFETY: plain kill(2) on a pid we started.
    unsafe { libc::kill(pid as i32, signal) };
    // Polled closely: restart tests start the next agent the moment this one is gone, and a
    // coarse poll would count its own delay as the agent's downtime.
    let gone = || {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| c.is_empty())
            .unwrap_or(true)
    };
    let start = Instant::now();
    while !gone() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for agent {pid} to exit"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    StoppedAgent {
        netns: h.netns,
        argv,
        log: h.log,
    }
}

/// Starts a stopped agent again; returns its pid. The lab's `down` kills agents by namespace, so
/// the new process is cleaned up with the lab.
pub fn start_agent(a: &StoppedAgent) -> u32 {
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&a.log)
        .expect("agent log");
    let mut child = ns_command(&a.netns, &["setsid"])
        .args(&a.argv)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start tweedd");
    let pid = child.id();
    // Reaped in the background so a killed agent does not linger as a zombie of the test.
    std::thread::spawn(move || child.wait());
    pid
}

/// Starts a stopped agent again and waits (up to 15 s) until its log says `ready: lease held`
/// once more than before: the agent says it once its data plane, the IPv6 half included, is
/// programmed.
pub fn restart_agent_ready(a: &StoppedAgent, host: &str) {
    let readies = || {
        std::fs::read_to_string(&a.log)
            .map(|l| l.matches("ready: lease held").count())
            .unwrap_or(0)
    };
    let before = readies();
    start_agent(a);
    tweed_testkit::wait_for(
        Duration::from_secs(15),
        &format!("{host}'s restarted agent ready"),
        || readies() > before,
    );
}

/// The vxlan data plane of one host as text lines, for asserting what points where.
pub struct VxlanState {
    pub routes: String,
    pub neigh: String,
    pub fdb: String,
}

pub fn vxlan_state(netns: &str, dev: &str) -> VxlanState {
    VxlanState {
        routes: in_ns(netns, &["ip", "route", "show", "dev", dev]),
        neigh: in_ns(netns, &["ip", "neigh", "show", "dev", dev]),
        fdb: in_ns(netns, &["bridge", "fdb", "show", "dev", dev]),
    }
}

/// etcdctl against the lab's live etcd members; panics on failure.
pub fn etcdctl(lab: &Lab, args: &[&str]) -> String {
    lab.etcdctl(args).expect("etcdctl")
}

/// The source address a UDP datagram from `from` to `to_ip` arrives with at `to` (both lab
/// `exec` targets): shows whether traffic was masqueraded on its way. A listener in `to` prints
/// the first datagram's source; `from` sends until it is heard or `timeout` passes.
pub fn udp_source_seen(lab: &Lab, from: &str, to: &str, to_ip: &str, timeout: Duration) -> String {
    const PORT: u16 = 5999;
    let listen = format!(
        "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
         s.bind(('0.0.0.0',{PORT}))\nprint('ready',flush=True)\n\
         s.settimeout({})\nd,a=s.recvfrom(100)\nprint(a[0],flush=True)\n",
        timeout.as_secs_f64()
    );
    let mut listener = lab
        .command(to, &["python3", "-c", &listen])
        .expect("listener target")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 listener");
    let mut out = std::io::BufReader::new(listener.stdout.take().unwrap());
    let mut line = String::new();
    use std::io::BufRead;
    out.read_line(&mut line).expect("listener output");
    assert_eq!(line.trim(), "ready", "listener in {to} did not start");
    let send = format!(
        "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
         for _ in range({}):\n    s.sendto(b'x',('{to_ip}',{PORT}))\n    time.sleep(0.1)\n",
        (timeout.as_millis() / 100).max(1)
    );
    let mut sender = lab
        .command(from, &["python3", "-c", &send])
        .expect("sender target")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 sender");
    line.clear();
    let _ = out.read_line(&mut line);
    let _ = sender.kill();
    let _ = sender.wait();
    let _ = listener.kill();
    let _ = listener.wait();
    line.trim().to_string()
}

/// The agent's command line, as the kernel has it.
pub fn agent_cmdline(lab: &Lab, host: &str) -> Vec<String> {
    let pid = host_state(lab, host).agent_pid.expect("agent pid");
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .expect("agent alive")
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// The value following `flag` on a command line.
pub fn flag_value<'a>(argv: &'a [String], flag: &str) -> Option<&'a str> {
    argv.iter()
        .position(|a| a == flag)
        .and_then(|i| argv.get(i + 1))
        .map(String::as_str)
}

/// `10.244.X.0` (X in 200..250, after the X in `skip`) that no host of the lab holds: for
/// leases a test writes itself. The agents pick their subnets at random, so a fixed test subnet
/// would now and then land on a host's own lease and overwrite it.
pub fn free_subnet(lab: &Lab, skip: &[&str]) -> String {
    let taken: Vec<String> = lab
        .state()
        .hosts
        .iter()
        .filter_map(|h| h.subnet.clone())
        .collect();
    (200..250)
        .find(|o| {
            !taken.iter().any(|t| t.starts_with(&format!("10.244.{o}.")))
                && !skip.contains(&format!("10.244.{o}.0").as_str())
        })
        .map(|o| format!("10.244.{o}.0"))
        .expect("a free 10.244.x.0/24 in 200..250")
}

/// The IPv6 half of a dual-stack lease key as flannel's watcher reads it:
/// `.../10.244.5.0-24&fd00:10:244:5::-64` -> `fd00:10:244:5::/64`; `None` for an IPv4-only key.
pub fn key_subnet6(key: &str) -> Option<ipnetwork::Ipv6Network> {
    let (_, v6) = key.rsplit('/').next()?.split_once('&')?;
    let (addr, len) = v6.rsplit_once('-')?;
    ipnetwork::Ipv6Network::new(addr.parse().ok()?, len.parse().ok()?).ok()
}

/// A host's subnet as its lease key names it: `10.244.7.1/24` -> `10.244.7.0`.
pub fn subnet_network(subnet: &str) -> String {
    let (addr, _) = subnet
        .split_once('/')
        .unwrap_or_else(|| panic!("{subnet:?} is no ADDRESS/PREFIX"));
    let mut octets: Vec<&str> = addr.split('.').collect();
    octets[3] = "0";
    octets.join(".")
}

/// Parsed `ping -q` summary: (transmitted, received).
pub fn ping_summary(out: &str) -> (u32, u32) {
    let line = out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary in {out:?}"));
    let nums: Vec<u32> = line
        .split(',')
        .filter_map(|p| p.split_whitespace().next()?.parse().ok())
        .collect();
    (nums[0], nums[1])
}

/// A node set up the way flannel sets one up, joining a lab from outside it: the tests that show
/// tweed and flannel nodes can share one cluster.
pub mod flannel {
    use super::{etcdctl, in_ns, ip};
    use tweed_lab::Lab;

    /// flannel's etcd prefix for leases, one key per subnet (`10.244.7.0-24`).
    pub const SUBNETS: &str = "/coreos.com/network/subnets/";

    /// Namespaces a test makes outside the lab's own (the lab's `down` does not know them). On
    /// drop, also when the test fails, their processes are killed (the test started all of them:
    /// a namespace with a live process would linger) and the namespaces deleted.
    struct Namespaces(Vec<String>);

    impl Drop for Namespaces {
        fn drop(&mut self) {
            for ns in &self.0 {
                tweed_testkit::netns::delete(ns);
            }
        }
    }

    /// A flannel node's host namespace on the lab's underlay bridge (eth0 [`PUBLIC_IP`]/24,
    /// forwarding on) and one pod behind its `cni0` bridge, on a subnet no tweed host took. No
    /// backend device and no lease yet: those differ between flannel's backends. Both namespaces
    /// go when this is dropped.
    pub struct Node {
        /// The host's namespace.
        pub node: String,
        /// The pod's namespace.
        pub pod: String,
        /// The node's subnet, e.g. `10.244.200.0` (its lease is for the /24).
        pub subnet: String,
        pub pod_ip: String,
        _namespaces: Namespaces,
    }

    /// The flannel node's underlay address: outside the range the lab gives its hosts.
    pub const PUBLIC_IP: &str = "198.18.0.200";

    impl Node {
        /// `prefix` keeps the namespaces of tests running side by side apart; `mtu` is what
        /// flannel's subnet.env gives pods for the backend under test.
        pub fn up(lab: &Lab, prefix: &str, mtu: &str) -> Node {
            let name = lab.name();
            let node = format!("{prefix}-{name}");
            let pod = format!("{prefix}-{name}-p");
            // Before the first namespace exists, so a failing step below still removes both.
            let namespaces = Namespaces(vec![pod.clone(), node.clone()]);
            let underlay = lab.state().underlay_netns.clone();

            let subnet = super::free_subnet(lab, &[]);
            let third = subnet.split('.').nth(2).expect("10.244.x.0").to_string();

            ip(&["netns", "add", &node]);
            ip(&[
                "-n", &underlay, "link", "add", "flv", "type", "veth", "peer", "name", "eth0",
                "netns", &node,
            ]);
            ip(&["-n", &underlay, "link", "set", "flv", "master", "br0", "up"]);
            in_ns(&node, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            ip(&["-n", &node, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &node,
                "addr",
                "add",
                &format!("{PUBLIC_IP}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &node, "link", "set", "eth0", "up"]);

            // As flannel's CNI chain (bridge + host-local) makes a pod.
            let gw = format!("10.244.{third}.1");
            let pod_ip = format!("10.244.{third}.2");
            ip(&["-n", &node, "link", "add", "cni0", "type", "bridge"]);
            ip(&[
                "-n",
                &node,
                "addr",
                "add",
                &format!("{gw}/24"),
                "dev",
                "cni0",
            ]);
            ip(&["-n", &node, "link", "set", "cni0", "mtu", mtu, "up"]);
            ip(&["netns", "add", &pod]);
            ip(&[
                "-n", &node, "link", "add", "vp", "mtu", mtu, "type", "veth", "peer", "name",
                "eth0", "netns", &pod,
            ]);
            ip(&["-n", &node, "link", "set", "vp", "master", "cni0", "up"]);
            ip(&["-n", &pod, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &pod,
                "addr",
                "add",
                &format!("{pod_ip}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &pod, "link", "set", "eth0", "mtu", mtu, "up"]);
            ip(&["-n", &pod, "route", "add", "default", "via", &gw]);

            Node {
                node,
                pod,
                subnet,
                pod_ip,
                _namespaces: namespaces,
            }
        }

        /// Gives flannel's backend device `dev` the subnet's network address as /32, as flannel
        /// does: the node's source address for the overlay.
        pub fn address_device(&self, dev: &str) {
            ip(&[
                "-n",
                &self.node,
                "addr",
                "add",
                &format!("{}/32", self.subnet),
                "dev",
                dev,
            ]);
        }

        /// Writes the node's lease the way flannel does: `value` under its subnet's key, held by
        /// an etcd lease of `ttl_secs`.
        pub fn write_lease(&self, lab: &Lab, ttl_secs: u32, value: &str) {
            self.write_lease_at(lab, &format!("{}-24", self.subnet), ttl_secs, value);
        }

        /// As [`Node::write_lease`], under `<SUBNETS><key>`: for keys other than the IPv4-only
        /// one, such as flannel's dual-stack `10.244.200.0-24&fd00:10:244:c8::-64`.
        pub fn write_lease_at(&self, lab: &Lab, key: &str, ttl_secs: u32, value: &str) {
            let grant = etcdctl(lab, &["lease", "grant", &ttl_secs.to_string()]);
            let lease_id = grant
                .split_whitespace()
                .nth(1)
                .expect("lease id")
                .to_string();
            etcdctl(
                lab,
                &[
                    "put",
                    &format!("--lease={lease_id}"),
                    &format!("{SUBNETS}{key}"),
                    value,
                ],
            );
        }
    }

    impl Node {
        /// The other nodes' leases as flannel's watcher reads them, as (subnet, attrs): the own
        /// lease must read back as `own_value`, every other one must be flannel JSON of
        /// `backend_type`.
        pub fn peer_leases(
            &self,
            lab: &Lab,
            own_value: &str,
            backend_type: &str,
        ) -> Vec<(String, serde_json::Value)> {
            let listing = etcdctl(lab, &["get", "--prefix", SUBNETS]);
            let mut peers = Vec::new();
            for (key, peer_net, val) in leases(&listing) {
                if peer_net == self.subnet {
                    assert_eq!(val, own_value, "our lease as written");
                    continue;
                }
                let v: serde_json::Value =
                    serde_json::from_str(val).expect("tweed lease is flannel JSON");
                assert_eq!(v["BackendType"], backend_type, "{key} {val}");
                peers.push((peer_net, v));
            }
            peers
        }
    }

    /// What flannel's vxlan backend writes on `node` for one peer of one family (`family` is
    /// `-4` or `-6`): the neighbour `gw lladdr mac` and the FDB entry `mac dst public_ip` on `dev`,
    /// both permanent, and the route `dst via gw dev onlink`.
    pub fn program_vxlan_peer(
        node: &str,
        family: &str,
        dev: &str,
        gw: &str,
        mac: &str,
        public_ip: &str,
        dst: &str,
    ) {
        ip(&[
            "-n",
            node,
            family,
            "neigh",
            "replace",
            gw,
            "lladdr",
            mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ]);
        in_ns(
            node,
            &[
                "bridge",
                "fdb",
                "replace",
                mac,
                "dev",
                dev,
                "dst",
                public_ip,
                "self",
                "permanent",
            ],
        );
        ip(&[
            "-n", node, family, "route", "replace", dst, "via", gw, "dev", dev, "onlink",
        ]);
    }

    /// The leases in an `etcdctl get --prefix SUBNETS` listing, the node's own included, as
    /// (key, subnet, value): the subnet read from the key the way flannel reads it.
    pub fn leases(listing: &str) -> Vec<(&str, String, &str)> {
        let lines: Vec<&str> = listing.lines().collect();
        lines
            .chunks(2)
            .map(|pair| {
                let (key, val) = (pair[0], pair[1]);
                let subnet = key
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .split('-')
                    .next()
                    .unwrap()
                    .to_string();
                (key, subnet, val)
            })
            .collect()
    }
}

/// A payload no protocol header contains by chance; `ping -p` repeats it through the packet.
pub const MARKER_HEX: &str = "7477656564706c61696e746578742121"; // "tweedplaintext!!"
pub const MARKER: &[u8] = b"tweedplaintext!!";

/// How often `needle` stands in `hay` (the marker in a capture).
pub fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// Runs `during` while tcpdump captures on `target` (all interfaces) what matches `filter`; the
/// raw capture bytes (a 24-byte pcap file header first, when tcpdump wrote anything).
pub fn capture_while(lab: &Lab, target: &str, filter: &str, during: impl FnOnce()) -> Vec<u8> {
    let file = std::env::temp_dir().join(format!("{}.pcap", tweed_testkit::unique("tweed-wg-cap")));
    let file_s = file.to_str().unwrap().to_string();
    let mut dump = lab
        .command(
            target,
            &[
                "tcpdump", "-i", "any", "-U", "-s", "0", "-w", &file_s, filter,
            ],
        )
        .unwrap()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump");
    // tcpdump says "listening on ..." once it captures: before that, `during` would be missed
    // and a "nothing in clear" check would pass on an empty capture.
    let lines = lines_of(dump.stderr.take().expect("piped"));
    let listening = wait_for_line(&lines, Duration::from_secs(10), |l| {
        l.contains("listening on")
    });
    assert!(
        listening.is_some(),
        "tcpdump in {target} did not start capturing"
    );
    during();
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(dump.id() as i32, libc::SIGTERM) };
    let _ = dump.wait();
    let bytes = std::fs::read(&file).unwrap_or_default();
    let _ = std::fs::remove_file(&file);
    bytes
}

/// The lines `from` prints, read on a thread of their own.
fn lines_of(from: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The first line from `lines` that `want` holds, within `limit`; the lines before it are
/// consumed.
fn wait_for_line(
    lines: &std::sync::mpsc::Receiver<String>,
    limit: Duration,
    want: impl Fn(&str) -> bool,
) -> Option<String> {
    let until = std::time::Instant::now() + limit;
    loop {
        let left = until.checked_duration_since(std::time::Instant::now())?;
        match lines.recv_timeout(left) {
            Ok(l) if want(&l) => return Some(l),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// Restarts `host`'s agent (SIGTERM, then until ready) while `ip monitor address route`
/// watches its namespace; the agent as stopped, and the events seen up to a second after it was
/// ready again (none: the restart changed no address or route).
pub fn restart_watching_addresses_and_routes(lab: &Lab, host: &str) -> (StoppedAgent, String) {
    let mut monitor = lab
        .command(
            host,
            &["stdbuf", "-oL", "ip", "-o", "monitor", "address", "route"],
        )
        .unwrap()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ip monitor");
    let lines = lines_of(monitor.stdout.take().expect("piped"));
    // A probe route on lo, seen by the monitor, proves it is watching before the restart: a
    // monitor that started late would report "no events" for a restart it never saw.
    // One probe address per try, so that a late line of an earlier try is never taken for the
    // last one's; netlink keeps their order, so the last one's deletion comes after them all.
    let route = |verb: &str, i: usize| {
        let probe = format!("fd00:ffff:7e57::{i:x}");
        lab.exec(
            host,
            &[
                "ip",
                "-6",
                "route",
                verb,
                "unreachable",
                &probe,
                "dev",
                "lo",
            ],
        )
        .unwrap_or_else(|e| panic!("ip route {verb} {probe}: {e}"));
        format!("{probe} ")
    };
    // Added again until seen: the monitor may subscribe after an add.
    let seen = (1..=20).find(|&i| {
        let probe = route("add", i);
        let seen = wait_for_line(&lines, Duration::from_millis(500), |l| {
            !l.starts_with("Deleted") && l.contains(&probe)
        });
        route("del", i);
        seen.is_some()
    });
    let Some(last) = seen else {
        panic!("ip monitor in {host} saw no probe route")
    };
    let probe = format!("fd00:ffff:7e57::{last:x} ");
    let gone = wait_for_line(&lines, Duration::from_secs(10), |l| {
        l.starts_with("Deleted") && l.contains(&probe)
    });
    assert!(
        gone.is_some(),
        "ip monitor in {host} saw the probe route stay"
    );
    let stopped = stop_agent(lab, host, libc::SIGTERM);
    restart_agent_ready(&stopped, host);
    std::thread::sleep(Duration::from_secs(1));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(monitor.id() as i32, libc::SIGTERM) };
    let _ = monitor.wait();
    // The reader ends at the pipe's end; bounded in case something else holds it open.
    let mut events = Vec::new();
    while let Ok(l) = lines.recv_timeout(Duration::from_secs(5)) {
        events.push(l);
    }
    (stopped, events.join("\n"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn flag_values() {
        let argv: Vec<String> = ["tweedd", "--iface", "eth0", "--ip-masq"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(super::flag_value(&argv, "--iface"), Some("eth0"));
        assert_eq!(super::flag_value(&argv, "--ip-masq"), None);
        assert_eq!(super::flag_value(&argv, "--nope"), None);
    }

    #[test]
    fn subnet_network_zeroes_the_host_part() {
        assert_eq!(super::subnet_network("10.244.7.1/24"), "10.244.7.0");
        assert_eq!(super::subnet_network("10.244.213.0/24"), "10.244.213.0");
    }

    #[test]
    fn ping_summary_parses() {
        let out = "PING x\n\n--- 10.0.0.1 ping statistics ---\n400 packets transmitted, 398 received, 0.5% packet loss, time 6718ms\n";
        assert_eq!(super::ping_summary(out), (400, 398));
    }
}
