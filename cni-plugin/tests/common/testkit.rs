//! Helpers for the root integration tests and the benchmark (`examples/cni_bench.rs` includes
//! this file): named network namespaces that are deleted on drop (also when a test panics), and
//! running a CNI plugin the way a runtime does, with the plugin process (never this one) inside
//! a chosen "host" namespace. Test code only: nothing here is in the plugin.
//!
//! Nothing here touches the root namespace: plugins run inside namespaces this module made.

use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tweed_netlink::Netns;

/// True when running as root (the integration tests skip otherwise, saying so).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A named namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct NetnsGuard {
    name: String,
    ns: Option<Netns>,
}

impl NetnsGuard {
    /// Creates `name` with loopback up; a leftover of that name from a crashed run is replaced.
    pub fn new(name: &str) -> io::Result<NetnsGuard> {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", name])?;
        let mut guard = NetnsGuard {
            name: name.to_string(),
            ns: None,
        };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        guard.ns = Some(Netns::open(guard.path()).map_err(io::Error::other)?);
        Ok(guard)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    pub fn path_str(&self) -> String {
        self.path().display().to_string()
    }

    pub fn netns(&self) -> &Netns {
        self.ns.as_ref().expect("opened in new")
    }

    /// `ip -n NAME ARGS...`, stdout.
    pub fn ip(&self, args: &[&str]) -> io::Result<String> {
        let mut a = vec!["-n", &self.name];
        a.extend_from_slice(args);
        ip(&a)
    }

    /// Runs `argv` inside the namespace (`ip netns exec`), stdout; an error carries stderr.
    pub fn exec(&self, argv: &[&str]) -> io::Result<String> {
        let mut a = vec!["netns", "exec", &self.name];
        a.extend_from_slice(argv);
        ip(&a)
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        self.ns = None;
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// `ip ARGS...`: stdout, or an error naming the command and its stderr.
pub fn ip(args: &[&str]) -> io::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What a plugin run produced.
#[derive(Debug, Clone)]
pub struct PluginRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl PluginRun {
    pub fn ok(&self) -> bool {
        self.code == 0
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "stdout is not one JSON document ({e}): {:?} (stderr {:?})",
                self.stdout, self.stderr
            )
        })
    }
}

/// One CNI invocation.
#[derive(Debug, Clone)]
pub struct Call<'a> {
    pub command: &'a str,
    pub container_id: &'a str,
    pub netns: &'a str,
    pub ifname: &'a str,
    pub args: &'a str,
    /// `CNI_PATH`; chained plugins and delegating ones (bridge -> host-local) need it.
    pub cni_path: &'a str,
    pub extra_env: Vec<(String, String)>,
}

impl<'a> Call<'a> {
    pub fn new(command: &'a str, container_id: &'a str, netns: &'a str) -> Call<'a> {
        Call {
            command,
            container_id,
            netns,
            ifname: "eth0",
            args: "",
            cni_path: "/usr/lib/cni",
            extra_env: Vec::new(),
        }
    }

    /// Adds `key=value` to the plugin's environment (set after the others, so it may replace
    /// `PATH`).
    pub fn env(mut self, key: &str, value: &str) -> Call<'a> {
        self.extra_env.push((key.into(), value.into()));
        self
    }
}

/// Starts `plugin` inside `host` (the child enters it between fork and exec), feeds `stdin`.
pub fn spawn(
    host: &Netns,
    plugin: &Path,
    call: &Call<'_>,
    stdin: &[u8],
) -> io::Result<std::process::Child> {
    let mut child = command(host, plugin, call).spawn()?;
    if let Some(mut s) = child.stdin.take() {
        s.write_all(stdin)?;
    }
    Ok(child)
}

/// The command that runs `plugin` inside `host` as a runtime would, its stdin, stdout and
/// stderr piped. `host` must stay open until it is spawned.
pub fn command(host: &Netns, plugin: &Path, call: &Call<'_>) -> Command {
    let mut cmd = Command::new(plugin);
    cmd.env_clear()
        .env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        )
        .env("CNI_COMMAND", call.command)
        .env("CNI_CONTAINERID", call.container_id)
        .env("CNI_NETNS", call.netns)
        .env("CNI_IFNAME", call.ifname)
        .env("CNI_ARGS", call.args)
        .env("CNI_PATH", call.cni_path)
        .envs(call.extra_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let fd = host.raw_fd();
    // SAFETY: only setns, an async-signal-safe syscall, runs between fork and exec, and `fd`
    // stays open until the command is spawned (the caller's promise).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Runs a plugin to completion; see [`spawn`].
pub fn run(host: &Netns, plugin: &Path, call: &Call<'_>, stdin: &[u8]) -> io::Result<PluginRun> {
    let start = Instant::now();
    let child = spawn(host, plugin, call, stdin)?;
    let out = child.wait_with_output()?;
    Ok(PluginRun {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: start.elapsed(),
    })
}

/// A subnet.env for tests.
pub fn write_subnet_env(path: &Path, network: &str, subnet: &str, mtu: u32) -> io::Result<()> {
    std::fs::write(
        path,
        format!(
            "TWEED_NETWORK={network}\nTWEED_SUBNET={subnet}\nTWEED_MTU={mtu}\nTWEED_IPMASQ=true\n"
        ),
    )
}

/// `p`-th percentile (nearest rank) of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&v, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&v, 100.0), Duration::from_millis(100));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }
}
