//! A small multi-host cluster in network namespaces for the backend end-to-end tests (root).
//!
//! Layout: an underlay namespace acting as two L2 segments joined by a router (`br0`
//! 198.18.0.254/24 and `br1` 198.18.1.254/24, forwarding on), etcd listening on 198.18.0.254 in
//! it, one namespace per host (eth0 on one segment, default route via its router address,
//! `tweedd` from this build started with `ip netns exec`), and one pod namespace per host behind
//! a `cni0` bridge wired from the host's subnet.env. Every name carries a per-process prefix;
//! [`Cluster`]'s Drop kills the agents and deletes every namespace, also on panic. Nothing is
//! created in the root namespace and no traffic leaves these namespaces.

#![allow(dead_code)]

use std::fs;
use std::net::{Ipv4Addr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use tweed_config::SubnetEnv;
use tweed_lab::etcd::{etcdctl, EtcdOptions, EtcdProcess};

pub const CONFIG_KEY: &str = "/coreos.com/network/config";
pub const ETCD_IP: &str = "198.18.0.254";

/// Why these tests need root, for `require_root!`.
pub const NEEDS_ROOT: &str = "a cluster of network namespaces with real agents, veths and bridges";

pub use tweed_testkit::cmd::ns_command;
pub use tweed_testkit::{in_ns, ip_in, probe_in, require_root, wait_for};

/// Binds a UDP socket inside `ns` (the thread that made it exits; the socket stays there).
pub fn udp_socket_in(ns: &str, bind: &str) -> UdpSocket {
    let bind = bind.to_string();
    tweed_testkit::netns::enter(ns, move || UdpSocket::bind(&bind).expect("bind"))
}

/// Sends UDP datagrams with any outer source address and port from inside `ns`: a raw socket
/// (`IPPROTO_RAW`, so the test writes the IPv4 header itself). The udp backend accepts packets
/// only from a peer's PublicIP *and* its agent port, which a normal socket cannot take while the
/// peer's agent holds it.
pub struct RawUdp(std::os::fd::OwnedFd);

impl RawUdp {
    pub fn new_in(ns: &str) -> RawUdp {
        use std::os::fd::FromRawFd;
        tweed_testkit::netns::enter(ns, || {
            // SAFETY: plain socket(2); the fd is owned by the OwnedFd from here.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            // SAFETY: `fd` was just returned by socket(2) and is not owned elsewhere.
            RawUdp(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
        })
    }

    /// One datagram `src` -> `dst` carrying `payload` (UDP checksum 0: "none", valid for IPv4).
    pub fn send(&self, src: std::net::SocketAddrV4, dst: std::net::SocketAddrV4, payload: &[u8]) {
        use std::os::fd::AsRawFd;
        let total = 20 + 8 + payload.len();
        let mut p = Vec::with_capacity(total);
        p.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0]);
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p.extend_from_slice(&src.ip().octets());
        p.extend_from_slice(&dst.ip().octets());
        p.extend_from_slice(&src.port().to_be_bytes());
        p.extend_from_slice(&dst.port().to_be_bytes());
        p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(*dst.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: valid buffer and sockaddr_in for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                p.as_ptr().cast(),
                p.len(),
                0,
                (&to as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        assert_eq!(
            n,
            p.len() as isize,
            "raw sendto: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    pub ns: String,
    pub pod_ns: String,
    pub public_ip: Ipv4Addr,
    pub dir: PathBuf,
    pub env: Option<SubnetEnv>,
}

impl Host {
    pub fn pod_ip(&self) -> Ipv4Addr {
        let e = self.env.as_ref().expect("subnet.env read");
        Ipv4Addr::from(u32::from(e.ipv4.expect("IPv4 pair").subnet.ip()) + 1)
    }

    pub fn subnet(&self) -> ipnetwork::Ipv4Network {
        self.env
            .as_ref()
            .expect("subnet.env read")
            .node_subnet()
            .expect("IPv4 pair")
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("tweedd.log")
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(self.log()).unwrap_or_default()
    }

    pub fn subnet_file(&self) -> PathBuf {
        self.dir.join("subnet.env")
    }
}

pub struct Cluster {
    pub prefix: String,
    pub underlay: String,
    pub hosts: Vec<Host>,
    pub etcd: Option<EtcdProcess>,
    pub dir: tempfile::TempDir,
    agents: Vec<Option<Child>>,
    extra_ns: Vec<String>,
    tweedd: PathBuf,
}

impl Cluster {
    /// Builds the underlay and one host per entry of `segments` (0 or 1), starts etcd and writes
    /// `config`, then starts the agents and wires a pod on each host.
    pub fn up(tag: &str, config: &str, segments: &[u8]) -> Cluster {
        let prefix = format!("tw{tag}{}", std::process::id() % 100_000);
        let underlay = format!("{prefix}-u");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = Cluster {
            prefix: prefix.clone(),
            underlay: underlay.clone(),
            hosts: Vec::new(),
            etcd: None,
            dir,
            agents: Vec::new(),
            extra_ns: Vec::new(),
            tweedd: PathBuf::from(env!("CARGO_BIN_EXE_tweedd")),
        };
        add_ns(&underlay);
        for (br, addr) in [("br0", "198.18.0.254/24"), ("br1", "198.18.1.254/24")] {
            ip_in(&underlay, &["link", "add", "name", br, "type", "bridge"]);
            ip_in(&underlay, &["addr", "add", addr, "dev", br]);
            ip_in(&underlay, &["link", "set", br, "up"]);
        }
        in_ns(&underlay, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        for (i, seg) in segments.iter().enumerate() {
            let n = i + 1;
            let name = format!("h{n}");
            let ns = format!("{prefix}-{name}");
            let public_ip = Ipv4Addr::new(198, 18, *seg, n as u8);
            add_ns(&ns);
            c.hosts.push(Host {
                name: name.clone(),
                ns: ns.clone(),
                pod_ns: format!("{ns}-p"),
                public_ip,
                dir: c.dir.path().join(&name),
                env: None,
            });
            fs::create_dir_all(c.dir.path().join(&name)).unwrap();
            veth(&underlay, &format!("v{name}"), &ns, "eth0", None);
            ip_in(
                &underlay,
                &[
                    "link",
                    "set",
                    &format!("v{name}"),
                    "master",
                    &format!("br{seg}"),
                ],
            );
            ip_in(
                &ns,
                &["addr", "add", &format!("{public_ip}/24"), "dev", "eth0"],
            );
            ip_in(
                &ns,
                &[
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("198.18.{seg}.254"),
                ],
            );
            in_ns(&ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            c.agents.push(None);
        }
        let mut opts = EtcdOptions::local("e2e", c.dir.path().join("etcd"));
        opts.netns = Some(underlay.clone());
        opts.listen_ip = ETCD_IP.parse().unwrap();
        opts.client_port = 2379;
        opts.peer_port = 2380;
        opts.log_file = Some(c.dir.path().join("etcd.log"));
        c.etcd = Some(EtcdProcess::start(opts).expect("etcd"));
        c.etcdctl(&["put", CONFIG_KEY, config]);
        for i in 0..c.hosts.len() {
            c.start_agent(i);
        }
        for i in 0..c.hosts.len() {
            let env = c.wait_subnet_env(i);
            c.hosts[i].env = Some(env.clone());
            let v4 = env.ipv4.expect("IPv4 pair");
            let h = c.hosts[i].clone();
            ip_in(&h.ns, &["link", "add", "name", "cni0", "type", "bridge"]);
            ip_in(&h.ns, &["link", "set", "cni0", "mtu", &env.mtu.to_string()]);
            ip_in(
                &h.ns,
                &["addr", "add", &v4.subnet.to_string(), "dev", "cni0"],
            );
            ip_in(&h.ns, &["link", "set", "cni0", "up"]);
            add_ns(&h.pod_ns);
            veth(&h.ns, "vpod", &h.pod_ns, "eth0", Some(env.mtu));
            ip_in(&h.ns, &["link", "set", "vpod", "master", "cni0"]);
            ip_in(
                &h.pod_ns,
                &[
                    "addr",
                    "add",
                    &format!("{}/{}", h.pod_ip(), v4.subnet.prefix()),
                    "dev",
                    "eth0",
                ],
            );
            ip_in(
                &h.pod_ns,
                &[
                    "route",
                    "add",
                    "default",
                    "via",
                    &v4.subnet.ip().to_string(),
                ],
            );
        }
        c
    }

    pub fn endpoint(&self) -> String {
        format!("http://{ETCD_IP}:2379")
    }

    pub fn etcdctl(&self, args: &[&str]) -> String {
        etcdctl(Some(&self.underlay), &[self.endpoint()], args).expect("etcdctl")
    }

    /// A namespace on segment `seg` with address `addr` that is no host of the cluster.
    pub fn add_stranger(&mut self, name: &str, seg: u8, addr: Ipv4Addr) -> String {
        let ns = format!("{}-{name}", self.prefix);
        add_ns(&ns);
        self.extra_ns.push(ns.clone());
        let v = format!("v{name}");
        veth(&self.underlay, &v, &ns, "eth0", None);
        ip_in(
            &self.underlay,
            &["link", "set", &v, "master", &format!("br{seg}")],
        );
        ip_in(&ns, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        ns
    }

    pub fn start_agent(&mut self, i: usize) {
        let h = &self.hosts[i];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(h.log())
            .unwrap();
        let child = ns_command(&h.ns, &[])
            .arg(&self.tweedd)
            .args(["--etcd-endpoints", &self.endpoint(), "--iface", "eth0"])
            .arg("--subnet-file")
            .arg(h.subnet_file())
            .arg("--state-dir")
            .arg(h.dir.join("lib"))
            .args(["--lease-ttl", "10m", "--log-level", "info"])
            // Each agent its own API socket (the default path is shared by every namespace on
            // this machine) and no metrics listener.
            .arg("--api-socket")
            .arg(h.dir.join("api.sock"))
            .args(["--metrics-addr", "off"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start tweedd");
        self.agents[i] = Some(child);
    }

    /// Sends `sig` to host `i`'s agent and waits until it has exited.
    pub fn stop_agent(&mut self, i: usize, sig: i32) {
        if let Some(mut child) = self.agents[i].take() {
            // SAFETY: kill(2) on our own child process.
            unsafe { libc::kill(child.id() as i32, sig) };
            let start = Instant::now();
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if start.elapsed() > Duration::from_secs(10) {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    pub fn agent_alive(&mut self, i: usize) -> bool {
        matches!(
            self.agents[i].as_mut().map(|c| c.try_wait()),
            Some(Ok(None))
        )
    }

    fn wait_subnet_env(&mut self, i: usize) -> SubnetEnv {
        let start = Instant::now();
        loop {
            if let Ok(e) = SubnetEnv::read(&self.hosts[i].subnet_file()) {
                return e;
            }
            let dead = !self.agent_alive(i);
            if dead || start.elapsed() > Duration::from_secs(30) {
                panic!(
                    "{}: no subnet.env (agent {}); log:\n{}",
                    self.hosts[i].name,
                    if dead { "exited" } else { "still running" },
                    self.hosts[i].log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Pings `to` from `from`'s pod until one reply comes back or `timeout` passes.
    pub fn pod_reaches(&self, from: usize, to: Ipv4Addr, timeout: Duration) -> bool {
        let start = Instant::now();
        loop {
            let (ok, _) = probe_in(
                &self.hosts[from].pod_ns,
                &["ping", "-n", "-q", "-c", "1", "-W", "1", &to.to_string()],
            );
            if ok {
                return true;
            }
            if start.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every pod reaches every other host's pod (waiting up to `timeout` for convergence).
    pub fn assert_all_pairs(&self, pairs: &[(usize, usize)], timeout: Duration) {
        for &(a, b) in pairs {
            let to = self.hosts[b].pod_ip();
            assert!(
                self.pod_reaches(a, to, timeout),
                "{} pod cannot reach {} pod {to}\n--- {} log:\n{}\n--- {} log:\n{}",
                self.hosts[a].name,
                self.hosts[b].name,
                self.hosts[a].name,
                self.hosts[a].log_text(),
                self.hosts[b].name,
                self.hosts[b].log_text()
            );
        }
    }

    pub fn routes(&self, i: usize) -> Vec<serde_json::Value> {
        let out = ip_in(&self.hosts[i].ns, &["-j", "-4", "route", "show"]);
        serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap_or_default()
    }

    /// The main-table route for `dst` (e.g. "10.244.3.0/24") on host `i`.
    pub fn route_to(&self, i: usize, dst: &str) -> Option<serde_json::Value> {
        self.routes(i).into_iter().find(|r| r["dst"] == dst)
    }
}

/// `ping -D -i interval -c count` from `ns`; returns (sent, received, largest gap in seconds
/// between consecutive replies, including from the start and to the end of the run).
pub fn ping_gaps(ns: &str, to: Ipv4Addr, interval: &str, count: u32) -> (u32, u32, f64) {
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let (_, out) = probe_in(
        ns,
        &[
            "ping",
            "-n",
            "-D",
            "-W",
            "1",
            "-i",
            interval,
            "-c",
            &count.to_string(),
            &to.to_string(),
        ],
    );
    let ended = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let mut times = vec![started];
    for l in out.lines() {
        if l.contains("bytes from") {
            if let Some(ts) = l
                .strip_prefix('[')
                .and_then(|r| r.split(']').next())
                .and_then(|t| t.parse::<f64>().ok())
            {
                times.push(ts);
            }
        }
    }
    let received = times.len() as u32 - 1;
    times.push(ended);
    let gap = times.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
    (count, received, gap)
}

fn add_ns(ns: &str) {
    tweed_testkit::netns::create(ns).unwrap_or_else(|e| panic!("{e}"));
}

fn veth(a_ns: &str, a: &str, b_ns: &str, b: &str, mtu: Option<u32>) {
    let mtu = mtu.map(|m| m.to_string());
    let mut args = vec!["link", "add", "name", a];
    if let Some(m) = &mtu {
        args.extend(["mtu", m]);
    }
    args.extend(["type", "veth", "peer", "name", b]);
    if let Some(m) = &mtu {
        args.extend(["mtu", m]);
    }
    args.extend(["netns", b_ns]);
    ip_in(a_ns, &args);
    ip_in(a_ns, &["link", "set", a, "up"]);
    ip_in(b_ns, &["link", "set", b, "up"]);
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for a in self.agents.iter_mut() {
            if let Some(mut c) = a.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if let Some(mut e) = self.etcd.take() {
            e.stop();
        }
        let mut all: Vec<String> = self.hosts.iter().map(|h| h.pod_ns.clone()).collect();
        all.extend(self.extra_ns.iter().cloned());
        all.extend(self.hosts.iter().map(|h| h.ns.clone()));
        all.push(self.underlay.clone());
        for ns in all {
            tweed_testkit::netns::delete(&ns);
        }
    }
}
