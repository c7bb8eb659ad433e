//! Thin wrappers over `ip` for namespaces and links. Every call names a namespace: nothing here
//! ever touches the root namespace's links, addresses or routes.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cmd::{self, CmdError};

/// `ip -n NS ARGS...`
pub fn ip(ns: &str, args: &[&str]) -> Result<String, CmdError> {
    cmd::run(Command::new("ip").arg("-n").arg(ns).args(args))
}

/// A command that runs `argv` inside `ns` (`ip netns exec NS argv...`).
pub fn exec_command<S: AsRef<std::ffi::OsStr>>(ns: &str, argv: &[S]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(argv);
    c
}

pub fn exists(ns: &str) -> bool {
    Path::new("/run/netns").join(ns).exists()
}

/// Creates a namespace with its loopback up.
pub fn add(ns: &str) -> Result<(), CmdError> {
    cmd::run(Command::new("ip").args(["netns", "add", ns]))?;
    ip(ns, &["link", "set", "lo", "up"])?;
    Ok(())
}

/// Deletes a namespace; a missing one is fine.
pub fn del(ns: &str) -> Result<(), CmdError> {
    if !exists(ns) {
        return Ok(());
    }
    match cmd::run(Command::new("ip").args(["netns", "del", ns])) {
        Ok(_) => Ok(()),
        Err(_) if !exists(ns) => Ok(()),
        Err(e) => Err(e),
    }
}

/// All named namespaces (`ip netns list` prints `name (id: N)` once an id is assigned).
pub fn list() -> Result<Vec<String>, CmdError> {
    let out = cmd::run(Command::new("ip").args(["netns", "list"]))?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// Pids of processes whose network namespace is `ns`.
pub fn pids(ns: &str) -> Vec<u32> {
    if !exists(ns) {
        return Vec::new();
    }
    cmd::run(Command::new("ip").args(["netns", "pids", ns]))
        .map(|out| {
            out.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `sysctl -w key=value` inside `ns` (network sysctls are per namespace).
pub fn sysctl(ns: &str, key: &str, value: &str) -> Result<(), CmdError> {
    cmd::run(&mut exec_command(
        ns,
        &["sysctl", "-q", "-w", &format!("{key}={value}")],
    ))?;
    Ok(())
}

/// A veth pair created straight into two namespaces, both ends up: `a_name` in `a_ns`, `b_name`
/// in `b_ns`. Creating it with `ip -n A ... peer ... netns B` means neither end ever exists in the
/// root namespace, not even for a moment.
pub fn veth(
    a_ns: &str,
    a_name: &str,
    b_ns: &str,
    b_name: &str,
    mtu: Option<u32>,
) -> Result<(), CmdError> {
    let mtu = mtu.map(|m| m.to_string());
    // `name` spelled out: a bare NAME that abbreviates an `ip link` keyword would be misparsed.
    let mut args = vec!["link", "add", "name", a_name];
    if let Some(m) = &mtu {
        args.extend(["mtu", m]);
    }
    args.extend(["type", "veth", "peer", "name", b_name]);
    if let Some(m) = &mtu {
        args.extend(["mtu", m]);
    }
    args.extend(["netns", b_ns]);
    ip(a_ns, &args)?;
    ip(a_ns, &["link", "set", a_name, "up"])?;
    ip(b_ns, &["link", "set", b_name, "up"])?;
    Ok(())
}

/// A bridge in `ns`, up, optionally with an address and MTU.
pub fn bridge(ns: &str, name: &str, addr: Option<&str>, mtu: Option<u32>) -> Result<(), CmdError> {
    ip(ns, &["link", "add", "name", name, "type", "bridge"])?;
    if let Some(m) = mtu {
        ip(ns, &["link", "set", name, "mtu", &m.to_string()])?;
    }
    if let Some(a) = addr {
        ip(ns, &["addr", "add", a, "dev", name])?;
    }
    ip(ns, &["link", "set", name, "up"])?;
    Ok(())
}

/// Sends `sig` to every process in each namespace, then SIGKILLs what is left after `grace`.
/// Returns the pids that were still there at the end.
pub fn kill_all(namespaces: &[String], grace: Duration) -> Vec<u32> {
    let collect = || -> Vec<u32> { namespaces.iter().flat_map(|ns| pids(ns)).collect() };
    let first = collect();
    if first.is_empty() {
        return first;
    }
    for &p in &first {
        cmd::signal(p, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    loop {
        let left: Vec<u32> = first
            .iter()
            .copied()
            .filter(|p| cmd::pid_alive(*p))
            .collect();
        if left.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            for &p in &left {
                cmd::signal(p, libc::SIGKILL);
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Anything that appeared meanwhile (a forked child) gets no grace.
    for p in collect() {
        cmd::signal(p, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let left = collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether process `pid` lives in namespace `ns` (guards against a recycled pid in old state).
pub fn pid_in(ns: &str, pid: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(p), Ok(n)) = (
        std::fs::metadata(format!("/proc/{pid}/ns/net")),
        std::fs::metadata(Path::new("/run/netns").join(ns)),
    ) else {
        return false;
    };
    p.dev() == n.dev() && p.ino() == n.ino() && cmd::pid_alive(pid)
}
