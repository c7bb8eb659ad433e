//! A container's confinement choices (`--security-opt`, `--cap-add`, `--cap-drop`,
//! `--privileged`), checked at creation and recorded in its config. The defaults are Docker's:
//! its capability set, its seccomp profile, its masked and read-only paths and device list; tweed
//! also sets no_new_privs unless asked not to.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::caps::CapSet;
use crate::seccomp::{self, SeccompChoice, SeccompError};

#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("--security-opt {0:?}: expected seccomp=unconfined|PROFILE.json or no-new-privileges[=true|false]")]
    BadOpt(String),
    #[error("--cap-add/--cap-drop: {0}")]
    Caps(String),
    #[error("{0}")]
    Seccomp(#[from] SeccompError),
}

/// Recorded per container. Configs written before these options existed read as the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Security {
    pub seccomp: SeccompChoice,
    pub no_new_privs: bool,
    /// `--privileged`: every capability, no seccomp, no masked or read-only paths, every device.
    pub privileged: bool,
}

impl Default for Security {
    fn default() -> Self {
        Security {
            seccomp: SeccompChoice::Default,
            no_new_privs: true,
            privileged: false,
        }
    }
}

/// The options as given on the command line.
#[derive(Debug, Clone, Default)]
pub struct SecurityArgs {
    pub security_opt: Vec<String>,
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    pub privileged: bool,
    /// `--userns auto|UID:GID:COUNT` (see [`crate::userns`]); none: no user namespace.
    pub userns: Option<String>,
}

/// One `--security-opt` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecurityOpt {
    SeccompUnconfined,
    SeccompProfile(PathBuf),
    NoNewPrivs(bool),
}

/// Parses `seccomp=unconfined`, `seccomp=FILE`, `no-new-privileges[=true|false]` (Docker also
/// accepts `:` for `=`).
pub fn parse_opt(s: &str) -> Result<SecurityOpt, SecurityError> {
    let bad = || SecurityError::BadOpt(s.to_string());
    let (k, v) = match s.find(['=', ':']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    match (k, v) {
        ("seccomp", Some("unconfined")) => Ok(SecurityOpt::SeccompUnconfined),
        ("seccomp", Some(p)) if !p.is_empty() => Ok(SecurityOpt::SeccompProfile(p.into())),
        ("no-new-privileges", None | Some("true")) => Ok(SecurityOpt::NoNewPrivs(true)),
        ("no-new-privileges", Some("false")) => Ok(SecurityOpt::NoNewPrivs(false)),
        _ => Err(bad()),
    }
}

/// The container's capabilities and security settings. A seccomp profile file is read now
/// (relative paths from `cwd`) and kept in the config, so later edits of the file do not change
/// a created container.
pub fn resolve(
    args: &SecurityArgs,
    last_cap: u32,
    cwd: &Path,
) -> Result<(CapSet, Security), SecurityError> {
    let mut sec = Security::default();
    let opts = args
        .security_opt
        .iter()
        .map(|s| parse_opt(s))
        .collect::<Result<Vec<_>, _>>()?;
    let caps = if args.privileged {
        sec.privileged = true;
        sec.seccomp = SeccompChoice::Unconfined;
        let own = crate::caps::own_bounding().unwrap_or(CapSet(u64::MAX));
        CapSet(CapSet::all(last_cap).0 & own.0)
    } else {
        CapSet::docker_default()
            .adjust(&args.cap_add, &args.cap_drop, last_cap)
            .map_err(SecurityError::Caps)?
    };
    for o in opts {
        match o {
            SecurityOpt::SeccompUnconfined => sec.seccomp = SeccompChoice::Unconfined,
            SecurityOpt::SeccompProfile(p) => {
                let p = cwd.join(p);
                sec.seccomp = SeccompChoice::Profile(seccomp::docker::load(&p, caps)?);
            }
            SecurityOpt::NoNewPrivs(b) => sec.no_new_privs = b,
        }
    }
    Ok((caps, sec))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(opts: &[&str]) -> SecurityArgs {
        SecurityArgs {
            security_opt: opts.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn options() {
        assert_eq!(
            parse_opt("seccomp=unconfined").unwrap(),
            SecurityOpt::SeccompUnconfined
        );
        assert_eq!(
            parse_opt("seccomp:unconfined").unwrap(),
            SecurityOpt::SeccompUnconfined
        );
        assert_eq!(
            parse_opt("seccomp=/x.json").unwrap(),
            SecurityOpt::SeccompProfile("/x.json".into())
        );
        assert_eq!(
            parse_opt("no-new-privileges").unwrap(),
            SecurityOpt::NoNewPrivs(true)
        );
        assert_eq!(
            parse_opt("no-new-privileges=false").unwrap(),
            SecurityOpt::NoNewPrivs(false)
        );
        for bad in [
            "seccomp",
            "seccomp=",
            "apparmor=x",
            "label=disable",
            "no-new-privileges=maybe",
            "",
        ] {
            let e = parse_opt(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn defaults_privileged_and_opt_outs() {
        let cwd = Path::new("/");
        let (caps, sec) = resolve(&args(&[]), 40, cwd).unwrap();
        assert_eq!(caps, CapSet::docker_default());
        assert_eq!(sec, Security::default());
        assert!(sec.no_new_privs);

        let (caps, sec) = resolve(
            &SecurityArgs {
                privileged: true,
                ..Default::default()
            },
            40,
            cwd,
        )
        .unwrap();
        let own = crate::caps::own_bounding().unwrap();
        assert_eq!(caps, CapSet(CapSet::all(40).0 & own.0));
        assert!(sec.privileged);
        assert_eq!(sec.seccomp, SeccompChoice::Unconfined);

        let (_, sec) = resolve(
            &args(&["seccomp=unconfined", "no-new-privileges=false"]),
            40,
            cwd,
        )
        .unwrap();
        assert_eq!(sec.seccomp, SeccompChoice::Unconfined);
        assert!(!sec.no_new_privs);

        let e = resolve(
            &SecurityArgs {
                cap_add: vec!["CAP_WHATEVER".into()],
                ..Default::default()
            },
            40,
            cwd,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("CAP_WHATEVER"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("p.json"),
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir"],"action":"SCMP_ACT_ERRNO"}]}"#,
        )
        .unwrap();
        let (_, sec) = resolve(&args(&["seccomp=p.json"]), 40, dir.path()).unwrap();
        match sec.seccomp {
            SeccompChoice::Profile(p) => assert_eq!(p.rules[0].name, "mkdir"),
            other => panic!("{other:?}"),
        }
        let e = resolve(&args(&["seccomp=missing.json"]), 40, dir.path()).unwrap_err();
        assert!(e.to_string().contains("missing.json"), "{e}");
    }

    #[test]
    fn old_configs_read_as_the_defaults() {
        let s: Security = serde_json::from_str("{}").unwrap();
        assert_eq!(s, Security::default());
    }
}
