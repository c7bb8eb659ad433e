//! Pods as tweed containers (`--pods-via runtime`): each pod is `tweedctl run -d --net overlay`
//! with the lab's own `--root`/`--image-root`, `--host-netns <host ns>`, `--cni-conf <the host's
//! conflist>` and `--cni-path`. The image is busybox, built offline from Debian's
//! `busybox-static`. The container's network namespace is then also named `twl-<lab>-hN-pM`
//! (`ip netns attach`), so `check`, `exec hN/pM` and `down` treat it like any other pod.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::cmd::{self, CmdError};
use crate::error::{io_err, IoError};
use crate::state::LabState;

/// The image every runtime pod runs.
pub const IMAGE: &str = "busybox";
/// What the pods run: nothing, for a long time (PID 1 of its own pid namespace).
pub const POD_COMMAND: &[&str] = &["sleep", "2000000000"];

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("`busybox` not found: install the Debian package busybox-static")]
    NoBusybox,
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error("tweedctl {what}: unexpected output {output:?}")]
    Output { what: String, output: String },
}

/// A busybox root filesystem in `dir`: `/bin/busybox` (static) and a link per applet.
pub fn busybox_rootfs(dir: &Path) -> Result<PathBuf, RuntimeError> {
    let busybox = cmd::find_program("busybox").ok_or(RuntimeError::NoBusybox)?;
    let applets = cmd::run(Command::new(&busybox).arg("--list"))?;
    let bin = dir.join("bin");
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "run", "root"] {
        let p = dir.join(d);
        fs::create_dir_all(&p).map_err(io_err("cannot create", &p))?;
    }
    let target = bin.join("busybox");
    fs::copy(&busybox, &target).map_err(io_err("cannot copy busybox to", &target))?;
    for applet in applets.split_whitespace().filter(|a| *a != "busybox") {
        let link = bin.join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", &link).map_err(io_err("cannot link", &link))?;
        }
    }
    Ok(dir.to_path_buf())
}

/// tweedctl with the lab's state directories.
#[derive(Debug, Clone)]
pub struct Tweedctl {
    pub bin: PathBuf,
    pub root: PathBuf,
    pub image_root: PathBuf,
    /// `--cni-path`: `run` needs it for ADD and `rm` for DEL (a container records its host
    /// namespace and network list, not where the plugins are).
    pub cni_path: Option<PathBuf>,
}

/// tweedctl with the state directories of a `--pods-via runtime` lab; `None` for other labs.
pub fn of_lab(state: &LabState) -> Option<Tweedctl> {
    state.runtime.as_ref().map(|r| Tweedctl {
        bin: r.tweedctl.clone(),
        root: r.root.clone(),
        image_root: r.image_root.clone(),
        cni_path: state.cni_path.clone(),
    })
}

/// What `run` needs per host.
#[derive(Debug, Clone)]
pub struct HostNet<'a> {
    pub host_ns: &'a str,
    pub cni_conf: &'a Path,
}

impl Tweedctl {
    /// `tweedctl --root R --image-root I [--cni-path P] ARGS...`
    pub fn command<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--root")
            .arg(&self.root)
            .arg("--image-root")
            .arg(&self.image_root);
        if let Some(p) = &self.cni_path {
            c.arg("--cni-path").arg(p);
        }
        c.args(args).stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Result<String, RuntimeError> {
        Ok(cmd::run(&mut self.command(args))?)
    }

    /// `image import --rootfs DIR NAME`
    pub fn import_rootfs(&self, rootfs: &Path, name: &str) -> Result<(), RuntimeError> {
        cmd::run(
            self.command(&["image", "import", "--rootfs"])
                .arg(rootfs)
                .arg(name),
        )?;
        Ok(())
    }

    /// `run -d --name NAME --net overlay IMAGE CMD...` on a host; returns the container id.
    pub fn run_pod(&self, host: &HostNet<'_>, name: &str) -> Result<String, RuntimeError> {
        let mut c = self.command(&["--host-netns", host.host_ns]);
        c.arg("--cni-conf")
            .arg(host.cni_conf)
            .args(["run", "-d", "--name", name, "--hostname", name])
            .args(["--net", "overlay", IMAGE])
            .args(POD_COMMAND);
        let out = cmd::run(&mut c)?;
        let id = out.lines().last().unwrap_or("").trim().to_string();
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(RuntimeError::Output {
                what: format!("run {name}"),
                output: out,
            });
        }
        Ok(id)
    }

    /// `inspect ID`: (init pid, first IP address).
    pub fn pid_and_ip(&self, id: &str) -> Result<(u32, String), RuntimeError> {
        let out = self.run(&["inspect", id])?;
        let bad = || RuntimeError::Output {
            what: format!("inspect {id}"),
            output: out.clone(),
        };
        let v: Value = serde_json::from_str(&out).map_err(|_| bad())?;
        let c = v.get(0).unwrap_or(&v);
        let pid = c["State"]["Pid"].as_u64().ok_or_else(bad)? as u32;
        let ip = c["NetworkSettings"]["IPAddresses"][0]
            .as_str()
            .ok_or_else(bad)?
            .to_string();
        Ok((pid, ip))
    }

    /// Every container id in this root (`ps -q`).
    pub fn ids(&self) -> Result<Vec<String>, RuntimeError> {
        Ok(self
            .run(&["ps", "-q"])?
            .split_whitespace()
            .map(str::to_string)
            .collect())
    }

    /// `rm -f IDS...`: stops them, runs CNI DEL, removes their namespaces, mounts and cgroups.
    pub fn remove(&self, ids: &[String]) -> Result<(), RuntimeError> {
        if ids.is_empty() {
            return Ok(());
        }
        cmd::run(self.command(&["rm", "-f"]).args(ids))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_carries_the_lab_roots_first() {
        let t = Tweedctl {
            bin: "/x/tweedctl".into(),
            root: "/lab/runtime".into(),
            image_root: "/lab/images".into(),
            cni_path: None,
        };
        assert_eq!(
            cmd::display(&t.command(&["ps", "-q"])),
            "/x/tweedctl --root /lab/runtime --image-root /lab/images ps -q"
        );
        let t = Tweedctl {
            cni_path: Some("/lab/cni-bin".into()),
            ..t
        };
        assert_eq!(
            cmd::display(&t.command(&["rm", "-f", "x"])),
            "/x/tweedctl --root /lab/runtime --image-root /lab/images --cni-path /lab/cni-bin rm -f x"
        );
    }

    #[test]
    fn busybox_rootfs_has_applets() {
        if cmd::find_program("busybox").is_none() {
            eprintln!("skipped: busybox-static not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = busybox_rootfs(&dir.path().join("rootfs")).unwrap();
        assert!(root.join("bin/busybox").is_file());
        assert_eq!(
            fs::read_link(root.join("bin/sh")).unwrap(),
            PathBuf::from("busybox")
        );
        assert!(root.join("bin/ping").symlink_metadata().is_ok());
    }
}
