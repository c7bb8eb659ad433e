//! Where the host mounts its cgroup hierarchies, read from `/proc/self/mountinfo`, and which
//! flavour (v1 or v2) containers get.

use std::path::{Path, PathBuf};

use super::CgroupError;

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    pub mount_point: PathBuf,
    /// The hierarchy path that is the mount's root (`/` unless the host itself is nested).
    pub root: String,
    /// v1 controllers bound to it (`name=systemd` style names excluded); empty for v2.
    pub controllers: Vec<String>,
    pub v2: bool,
}

/// Every cgroup mount in a `/proc/self/mountinfo` text.
pub fn parse_mountinfo(text: &str) -> Vec<Hierarchy> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let lf: Vec<&str> = left.split_whitespace().collect();
        let rf: Vec<&str> = right.split_whitespace().collect();
        if lf.len() < 5 || rf.len() < 3 {
            continue;
        }
        let fstype = rf[0];
        let (v2, controllers) = match fstype {
            "cgroup2" => (true, Vec::new()),
            "cgroup" => (
                false,
                rf[2]
                    .split(',')
                    .filter(|o| {
                        !o.contains('=')
                            && !matches!(
                                *o,
                                "rw" | "ro"
                                    | "relatime"
                                    | "noatime"
                                    | "nosuid"
                                    | "nodev"
                                    | "noexec"
                            )
                            && !o.starts_with("clone_children")
                            && *o != "xattr"
                    })
                    .map(str::to_string)
                    .collect(),
            ),
            _ => continue,
        };
        out.push(Hierarchy {
            mount_point: PathBuf::from(unescape_mountinfo(lf[4])),
            root: unescape_mountinfo(lf[3]),
            controllers,
            v2,
        });
    }
    out
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x"), 8)
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Which cgroup flavour a host runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// v1 hierarchies (legacy or hybrid hosts); a hybrid's cgroup2 mount is ignored.
    V1(Vec<Hierarchy>),
    /// The unified hierarchy mounted at `mount_point`.
    V2 { mount_point: PathBuf },
}

/// Picks the layout: v2 when the unified hierarchy is the main one (or the only one), else v1.
pub fn detect(hierarchies: &[Hierarchy]) -> Option<Layout> {
    let v1: Vec<Hierarchy> = hierarchies
        .iter()
        .filter(|h| !h.v2 && !h.controllers.is_empty())
        .cloned()
        .collect();
    let v2 = hierarchies.iter().find(|h| h.v2);
    if let Some(h) = v2 {
        if h.mount_point == Path::new("/sys/fs/cgroup") || v1.is_empty() {
            return Some(Layout::V2 {
                mount_point: h.mount_point.clone(),
            });
        }
    }
    if v1.is_empty() {
        None
    } else {
        // Deduplicate hierarchies mounted twice.
        let mut seen: Vec<Hierarchy> = Vec::new();
        for h in v1 {
            if !seen.iter().any(|s| s.controllers == h.controllers) {
                seen.push(h);
            }
        }
        Some(Layout::V1(seen))
    }
}

/// The host's layout, from `/proc/self/mountinfo`.
pub fn host_layout() -> Result<Layout, CgroupError> {
    let p = PathBuf::from("/proc/self/mountinfo");
    let text = std::fs::read_to_string(&p).map_err(|source| CgroupError::Read {
        path: p.clone(),
        source,
    })?;
    detect(&parse_mountinfo(&text)).ok_or(CgroupError::NoHierarchy(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNIFIED: &str = "\
25 30 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn unified_host_is_v2() {
        assert_eq!(
            detect(&parse_mountinfo(UNIFIED)),
            Some(Layout::V2 {
                mount_point: "/sys/fs/cgroup".into()
            })
        );
        assert_eq!(detect(&[]), None);
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
