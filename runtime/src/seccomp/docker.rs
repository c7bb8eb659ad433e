//! Docker's seccomp profile format (`--security-opt seccomp=FILE`): `defaultAction`,
//! `defaultErrnoRet`, `architectures`, and `syscalls` entries of `names`, `action`, `errnoRet`,
//! `args` (`index`, `value`, `valueTwo`, `op`) and `includes`/`excludes` by capability and
//! architecture. Read into a [`Profile`] for the container's capabilities at creation. The file
//! comes from the user: every field is checked and an error names the entry.

use std::path::Path;

use serde::Deserialize;

use super::{Action, Arg, CmpOp, Profile, Rule, SeccompError};
use crate::caps::CapSet;

/// Profiles larger than this are refused (Docker's default is about 20 KiB).
pub const MAX_BYTES: u64 = 1 << 20;
/// At most this many syscall names over all entries.
pub const MAX_NAMES: usize = 4096;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct File {
    default_action: String,
    #[serde(default)]
    default_errno_ret: Option<u32>,
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    syscalls: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    #[serde(default)]
    names: Vec<String>,
    #[serde(default)]
    name: Option<String>,
    action: String,
    #[serde(default)]
    errno_ret: Option<u32>,
    #[serde(default)]
    args: Vec<FileArg>,
    #[serde(default)]
    includes: Filter,
    #[serde(default)]
    excludes: Filter,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Filter {
    #[serde(default)]
    caps: Vec<String>,
    #[serde(default)]
    arches: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileArg {
    index: u32,
    value: u64,
    #[serde(default)]
    value_two: u64,
    op: String,
}

/// Docker's name of this architecture.
fn this_arch() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        "SCMP_ARCH_AARCH64"
    } else {
        "SCMP_ARCH_X86_64"
    }
}

fn action(s: &str, errno: Option<u32>, default_errno: u32) -> Result<Action, String> {
    Ok(match s {
        "SCMP_ACT_ALLOW" => Action::Allow,
        "SCMP_ACT_ERRNO" => {
            let e = errno.unwrap_or(default_errno);
            if e == 0 || e > 4095 {
                return Err(format!("errno {e} out of range 1..=4095"));
            }
            Action::Errno(e)
        }
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => Action::KillThread,
        "SCMP_ACT_KILL_PROCESS" => Action::KillProcess,
        "SCMP_ACT_TRAP" => Action::Trap,
        "SCMP_ACT_LOG" => Action::Log,
        other => return Err(format!("unsupported action {other:?}")),
    })
}

fn op(a: &FileArg) -> Result<(CmpOp, u64), String> {
    Ok(match a.op.as_str() {
        "SCMP_CMP_EQ" => (CmpOp::Eq, a.value),
        "SCMP_CMP_NE" => (CmpOp::Ne, a.value),
        "SCMP_CMP_LT" => (CmpOp::Lt, a.value),
        "SCMP_CMP_LE" => (CmpOp::Le, a.value),
        "SCMP_CMP_GT" => (CmpOp::Gt, a.value),
        "SCMP_CMP_GE" => (CmpOp::Ge, a.value),
        // libseccomp's masked equality: (arg & value) == valueTwo.
        "SCMP_CMP_MASKED_EQ" => (CmpOp::MaskedEq(a.value), a.value_two),
        other => return Err(format!("unsupported operator {other:?}")),
    })
}

fn valid_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= 64 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Parses the text of a profile file for a container holding `caps`. `path` names the file in
/// errors.
pub fn parse(text: &str, caps: CapSet, path: &Path) -> Result<Profile, SeccompError> {
    let err = |what: String| SeccompError::Profile {
        path: path.to_path_buf(),
        what,
    };
    let f: File = serde_json::from_str(text).map_err(|e| err(e.to_string()))?;
    if !f.architectures.is_empty()
        && !f
            .architectures
            .iter()
            .any(|a| a == this_arch() || a == "SCMP_ARCH_NATIVE")
    {
        return Err(err(format!(
            "architectures {:?} do not include {}",
            f.architectures,
            this_arch()
        )));
    }
    let default_errno = f.default_errno_ret.unwrap_or(libc::EPERM as u32);
    let default_action = action(&f.default_action, Some(default_errno), default_errno)
        .map_err(|e| err(format!("defaultAction: {e}")))?;
    let has = |names: &[String]| -> Result<bool, String> {
        let mut all = true;
        for n in names {
            let set = CapSet::from_names(&[n.as_str()])
                .ok_or_else(|| format!("unknown capability {n:?}"))?;
            all &= caps.0 & set.0 == set.0;
        }
        Ok(all)
    };
    let mut rules = Vec::new();
    let mut count = 0usize;
    for (i, e) in f.syscalls.iter().enumerate() {
        let at = |what: String| err(format!("syscalls[{i}]: {what}"));
        let names: Vec<&String> = e.names.iter().chain(e.name.iter()).collect();
        if names.is_empty() {
            return Err(at("no syscall names".into()));
        }
        count += names.len();
        if count > MAX_NAMES {
            return Err(at(format!("more than {MAX_NAMES} syscall names")));
        }
        if let Some(bad) = names.iter().find(|n| !valid_name(n)) {
            return Err(at(format!("bad syscall name {bad:?}")));
        }
        let act = action(&e.action, e.errno_ret, default_errno).map_err(at)?;
        if e.args.len() > 6 {
            return Err(at("more than 6 argument conditions".into()));
        }
        let mut args = Vec::new();
        for a in &e.args {
            if a.index > 5 {
                return Err(at(format!("argument index {} out of range 0..=5", a.index)));
            }
            let (o, v) = op(a).map_err(at)?;
            args.push(Arg {
                index: a.index as u8,
                op: o,
                value: v,
            });
        }
        // includes: every listed capability held and this architecture listed (when any);
        // excludes: none of the listed capabilities held, this architecture not listed.
        let inc_caps = e.includes.caps.is_empty() || has(&e.includes.caps).map_err(at)?;
        let inc_arch =
            e.includes.arches.is_empty() || e.includes.arches.iter().any(|a| arch_matches(a));
        let exc_caps = !e.excludes.caps.is_empty() && {
            let mut any = false;
            for c in &e.excludes.caps {
                any |= has(std::slice::from_ref(c)).map_err(at)?;
            }
            any
        };
        let exc_arch = e.excludes.arches.iter().any(|a| arch_matches(a));
        if !inc_caps || !inc_arch || exc_caps || exc_arch {
            continue;
        }
        for n in names {
            rules.push(Rule {
                name: n.clone(),
                action: act,
                args: args.clone(),
            });
        }
    }
    Ok(Profile {
        default_action,
        rules,
    })
}

/// Docker's `includes.arches` use Go's names (`amd64`, `arm64`, ...).
fn arch_matches(a: &str) -> bool {
    let ours: &[&str] = if cfg!(target_arch = "aarch64") {
        &["arm64", "aarch64", "SCMP_ARCH_AARCH64"]
    } else {
        &["amd64", "x86_64", "SCMP_ARCH_X86_64"]
    };
    ours.contains(&a)
}

/// `p` in Docker's (and the OCI runtime spec's `linux.seccomp`) format, one entry per rule, so
/// that runc or Docker can be given exactly tweed's filter (`tweedctl seccomp-profile`).
pub fn to_docker(p: &Profile) -> serde_json::Value {
    use serde_json::json;
    let act = |a: Action| -> (&'static str, Option<u32>) {
        match a {
            Action::Allow => ("SCMP_ACT_ALLOW", None),
            Action::Errno(e) => ("SCMP_ACT_ERRNO", Some(e)),
            Action::KillThread => ("SCMP_ACT_KILL_THREAD", None),
            Action::KillProcess => ("SCMP_ACT_KILL_PROCESS", None),
            Action::Trap => ("SCMP_ACT_TRAP", None),
            Action::Log => ("SCMP_ACT_LOG", None),
        }
    };
    let (da, de) = act(p.default_action);
    let mut doc = json!({
        "defaultAction": da,
        "architectures": [this_arch()],
        "syscalls": p.rules.iter().map(|r| {
            let (a, e) = act(r.action);
            let mut entry = json!({
                "names": [r.name],
                "action": a,
                "args": r.args.iter().map(|x| {
                    let (op, value, two) = match x.op {
                        CmpOp::Eq => ("SCMP_CMP_EQ", x.value, 0),
                        CmpOp::Ne => ("SCMP_CMP_NE", x.value, 0),
                        CmpOp::Lt => ("SCMP_CMP_LT", x.value, 0),
                        CmpOp::Le => ("SCMP_CMP_LE", x.value, 0),
                        CmpOp::Gt => ("SCMP_CMP_GT", x.value, 0),
                        CmpOp::Ge => ("SCMP_CMP_GE", x.value, 0),
                        CmpOp::MaskedEq(m) => ("SCMP_CMP_MASKED_EQ", m, x.value),
                    };
                    json!({ "index": x.index, "value": value, "valueTwo": two, "op": op })
                }).collect::<Vec<_>>(),
            });
            if let Some(e) = e {
                entry["errnoRet"] = json!(e);
            }
            entry
        }).collect::<Vec<_>>(),
    });
    if let Some(e) = de {
        doc["defaultErrnoRet"] = json!(e);
    }
    doc
}

/// Reads and parses a profile file, refusing anything over [`MAX_BYTES`].
pub fn load(path: &Path, caps: CapSet) -> Result<Profile, SeccompError> {
    let err = |what: String| SeccompError::Profile {
        path: path.to_path_buf(),
        what,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    if meta.len() > MAX_BYTES {
        return Err(err(format!(
            "{} bytes, over the {MAX_BYTES}-byte limit",
            meta.len()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    parse(&text, caps, path)
}
