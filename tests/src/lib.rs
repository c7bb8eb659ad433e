//! Helpers for the end-to-end tests: a lab per test (torn down on drop, also on panic), agent
//! stop/start by pid, and readers of a host's kernel state.
//!
//! The tests need root (namespaces, vxlan); they say so instead of silently passing.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tweed_lab::{Lab, LabGuard, LabSpec};

/// Panics with a clear message unless root: these tests build network namespaces.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("the end-to-end tests need root (network namespaces, vxlan): run them as root");
    }
}

/// A lab name unique to this process and test (lab names are at most 12 characters).
pub fn lab_name(tag: &str) -> String {
    format!("{tag}{}", std::process::id() % 100_000)
}

pub fn up(spec: LabSpec) -> LabGuard {
    require_root();
    LabGuard::up(spec).expect("lab up")
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
    let argv: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
        .expect("agent alive")
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    // SAFETY: plain kill(2) on a pid we started.
    unsafe { libc::kill(pid as i32, signal) };
    wait_for(Duration::from_secs(10), "agent to exit", || {
        !PathBuf::from(format!("/proc/{pid}/cmdline")).exists()
            || std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.is_empty())
                .unwrap_or(true)
    });
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
    let mut child = Command::new("ip")
        .args(["netns", "exec", &a.netns, "setsid"])
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

pub fn wait_for(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `ip`/`bridge`-style commands in a namespace and returns stdout; panics with stderr.
pub fn in_ns(netns: &str, argv: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", netns])
        .args(argv)
        .stdin(Stdio::null())
        .output()
        .expect("ip netns exec");
    assert!(
        out.status.success(),
        "{argv:?} in {netns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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
    fn ping_summary_parses() {
        let out = "PING x\n\n--- 10.0.0.1 ping statistics ---\n400 packets transmitted, 398 received, 0.5% packet loss, time 6718ms\n";
        assert_eq!(super::ping_summary(out), (400, 398));
    }
}
