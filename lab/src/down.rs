//! What `tweed-lab down` does: detach the pods, kill every process in the lab's namespaces,
//! delete the namespaces, unmount what containers left and remove the state directory. It works
//! from state.json when there is one and from the namespaces' names alone when there is not (a
//! half-built lab, or a state.json this version cannot read).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use crate::error::LabError;
use crate::names::Names;
use crate::netns;
use crate::pods;
use crate::state::{self, LabState};

const KILL_GRACE: Duration = Duration::from_secs(5);

/// What `down` did.
#[derive(Debug, Clone, Default)]
pub struct DownReport {
    pub namespaces: Vec<String>,
    pub killed: usize,
    pub state_dir_removed: bool,
    /// Best-effort steps that failed without leaving anything behind (e.g. a CNI DEL whose
    /// namespace was deleted anyway).
    pub warnings: Vec<String>,
}

/// Tears down lab `name` under the default root, with or without a (readable) state.json.
pub fn down(name: &str) -> Result<DownReport, LabError> {
    down_in(&state::default_root(), name)
}

pub fn down_in(root: &Path, name: &str) -> Result<DownReport, LabError> {
    let names = Names::new(name)?;
    let dir = root.join(name);
    // A state.json that cannot be read must not stop a teardown: the namespace scan covers the
    // namespaces and their processes; only the pods' CNI DEL is lost, which the warning says.
    let (state, warnings) = match LabState::read(&dir) {
        Ok(state) => (state, Vec::new()),
        Err(e) => (
            None,
            vec![format!(
                "{e}; tearing down by namespace names alone, without CNI DEL for the pods"
            )],
        ),
    };
    teardown(&names, &dir, state.as_ref(), &mut Vec::new(), warnings)
}

/// The lab's namespaces that exist: from the state file and from `ip netns list`, pods first so
/// that hosts (whose bridges the pods' cables hang on) go after them.
pub(crate) fn lab_namespaces(names: &Names, state: Option<&LabState>) -> Vec<String> {
    let mut all: Vec<String> = netns::list()
        .unwrap_or_default()
        .into_iter()
        .filter(|ns| names.owns_netns(ns))
        .collect();
    if let Some(s) = state {
        all.push(s.underlay_netns.clone());
        all.extend(s.outside_netns.clone());
        for h in &s.hosts {
            all.push(h.netns.clone());
            all.extend(h.pods.iter().map(|p| p.netns.clone()));
        }
    }
    all.retain(|ns| names.owns_netns(ns) && netns::exists(ns));
    teardown_order(names, all)
}

/// Pods first, then hosts and outside, the underlay last: a pod's cable hangs on its host's
/// bridge, and every host's on the underlay's. Duplicates go.
fn teardown_order(names: &Names, mut all: Vec<String>) -> Vec<String> {
    let underlay = names.underlay_ns();
    let host_dashes = names.prefix().matches('-').count();
    all.sort_by_key(|ns| {
        let depth = if *ns == underlay {
            2
        } else if ns.matches('-').count() > host_dashes {
            0
        } else {
            1
        };
        (depth, ns.clone())
    });
    all.dedup();
    all
}

/// Takes down what `names`, `state` and `dir` describe; `children` are the lab processes this
/// process spawned (reaped here), `warnings` what the caller already had to say.
pub(crate) fn teardown(
    names: &Names,
    dir: &Path,
    state: Option<&LabState>,
    children: &mut Vec<Child>,
    mut warnings: Vec<String>,
) -> Result<DownReport, LabError> {
    let mut errors = Vec::new();
    // Pods first, while agents, hosts and pod namespaces still exist: best effort, as a node
    // would (the namespaces go anyway).
    warnings.extend(pods::detach_all(dir, state));
    let namespaces = lab_namespaces(names, state);
    let before: usize = namespaces.iter().map(|ns| netns::pids(ns).len()).sum();
    let left = netns::kill_all(&namespaces, KILL_GRACE);
    if !left.is_empty() {
        errors.push(format!("processes survived SIGKILL: {left:?}"));
    }
    for mut c in children.drain(..) {
        let _ = c.kill();
        let _ = c.wait();
    }
    for ns in &namespaces {
        if let Err(e) = netns::del(ns) {
            errors.push(e.to_string());
        }
    }
    // Whatever a container left mounted under the lab directory (overlay roots, netns files).
    errors.extend(unmount_under(dir));
    let mut removed = false;
    match fs::remove_dir_all(dir) {
        Ok(()) => removed = true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => errors.push(format!("cannot remove {}: {e}", dir.display())),
    }
    if errors.is_empty() {
        Ok(DownReport {
            namespaces,
            killed: before,
            state_dir_removed: removed,
            warnings,
        })
    } else {
        Err(LabError::Teardown {
            name: names.lab().into(),
            errors,
        })
    }
}

/// Lazily unmounts every mount point under `dir` (deepest first); returns failures.
fn unmount_under(dir: &Path) -> Vec<String> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let Ok(dir) = fs::canonicalize(dir) else {
        return Vec::new();
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(&dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    points.dedup();
    let mut errors = Vec::new();
    for p in points {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
            continue;
        };
        // SAFETY: a valid NUL-terminated path; umount2 has no memory-safety preconditions.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::ENOENT) {
                errors.push(format!("cannot unmount {}: {e}", p.display()));
            }
        }
    }
    errors
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_go_before_hosts_and_the_underlay_last() {
        let names = Names::new("a-b").unwrap();
        let all = [
            "twl-a-b-u",
            "twl-a-b-h1",
            "twl-a-b-o",
            "twl-a-b-h1-p1",
            "twl-a-b-h1",
            "twl-a-b-h2-p1",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            teardown_order(&names, all),
            [
                "twl-a-b-h1-p1",
                "twl-a-b-h2-p1",
                "twl-a-b-h1",
                "twl-a-b-o",
                "twl-a-b-u"
            ]
        );
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mountinfo(r"/run/a\040b/c"), "/run/a b/c");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/end\"), r"/end\");
    }
}
