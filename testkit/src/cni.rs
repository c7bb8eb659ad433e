//! Calling a CNI plugin the way a container runtime does: a clean environment with the `CNI_*`
//! variables, the configuration on stdin, and the plugin process (never the test's) inside a
//! chosen "host" namespace, entered between fork and exec.

use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
    host: &impl AsFd,
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
pub fn command(host: &impl AsFd, plugin: &Path, call: &Call<'_>) -> Command {
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
    let fd = host.as_fd().as_raw_fd();
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
pub fn run(
    host: &impl AsFd,
    plugin: &Path,
    call: &Call<'_>,
    stdin: &[u8],
) -> io::Result<PluginRun> {
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
