//! Seccomp: a profile as data ([`Profile`]: a default action and per-syscall rules), Docker's
//! default profile ([`default`]), Docker's profile file format ([`docker`]), compiled to BPF by
//! rust-vmm's `seccompiler` (never by hand), cached on disk by the hash of what was compiled, and
//! installed by the container's init just before `execve`.
//!
//! `seccompiler` builds filters with one action on match and one on mismatch. A profile with
//! several actions becomes a stack of filters: one with the profile's default action on
//! mismatch that lets through every syscall some rule names, then one filter per other action.
//! The kernel runs every filter and takes the most restrictive answer, so a syscall named by a
//! rule gets that rule's action. (When two rules name the same syscall with different actions,
//! the most restrictive wins, where libseccomp would take the first; the default profile has no
//! such overlap.)

pub mod default;
pub mod docker;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::caps::CapSet;

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp profile {path}: {what}")]
    Profile { path: PathBuf, what: String },
    #[error("compiling the seccomp filter: {0}")]
    Compile(String),
    #[error("seccomp filter cache {path}: {source}")]
    Cache { path: PathBuf, source: io::Error },
    #[error("installing the seccomp filter: {0}")]
    Install(io::Error),
}

/// What a filter does with a syscall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Action {
    Allow,
    Errno(u32),
    KillThread,
    KillProcess,
    Trap,
    Log,
}

/// Comparison of one syscall argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    /// `(arg & mask) == value`.
    MaskedEq(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Arg {
    pub index: u8,
    pub op: CmpOp,
    pub value: u64,
}

/// `name` gets `action` when every condition in `args` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub name: String,
    pub action: Action,
    pub args: Vec<Arg>,
}

impl Rule {
    pub fn allow(name: &str) -> Rule {
        Rule {
            name: name.to_string(),
            action: Action::Allow,
            args: vec![],
        }
    }
}

/// When a group of the default profile applies.
#[derive(Debug, Clone, Copy)]
pub enum When {
    Cap(u32),
}

impl When {
    pub fn holds(&self, caps: CapSet) -> bool {
        match self {
            When::Cap(c) => caps.contains(*c),
        }
    }
}

/// A seccomp profile resolved for one container (capabilities already applied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    pub default_action: Action,
    pub rules: Vec<Rule>,
}

/// The container's choice, recorded in its config.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompChoice {
    /// Docker's default profile for the container's capabilities.
    #[default]
    Default,
    /// No filter (`--security-opt seccomp=unconfined`, or `--privileged`).
    Unconfined,
    /// A profile file in Docker's format, read at creation and kept with the container.
    Profile(Profile),
}

impl SeccompChoice {
    /// The profile to compile for a container holding `caps`, if any.
    pub fn profile(&self, caps: CapSet) -> Option<Profile> {
        match self {
            SeccompChoice::Default => Some(default::profile(caps)),
            SeccompChoice::Unconfined => None,
            SeccompChoice::Profile(p) => Some(p.clone()),
        }
    }
}

/// Rules of one filter by syscall name: `None` matches every call, else any of the argument
/// condition sets.
type ByName = BTreeMap<String, Option<BTreeSet<Vec<Arg>>>>;

/// The stack of filters for `p` as seccompiler groups: (mismatch action, match action, rules by
/// syscall name). Rules that match every call of a syscall absorb its conditional ones.
fn groups(p: &Profile) -> Vec<(Action, Action, ByName)> {
    fn add(m: &mut ByName, r: &Rule) {
        let e = m
            .entry(r.name.clone())
            .or_insert_with(|| Some(BTreeSet::new()));
        if r.args.is_empty() {
            *e = None; // unconditional
        } else if let Some(set) = e {
            set.insert(r.args.clone());
        }
    }
    let mut out = Vec::new();
    if p.default_action != Action::Allow {
        let mut all = ByName::new();
        for r in p.rules.iter().filter(|r| r.action != p.default_action) {
            add(&mut all, r);
        }
        out.push((p.default_action, Action::Allow, all));
    }
    let actions: BTreeSet<Action> = p
        .rules
        .iter()
        .map(|r| r.action)
        .filter(|a| *a != Action::Allow && *a != p.default_action)
        .collect();
    for a in actions {
        let mut m = ByName::new();
        for r in p.rules.iter().filter(|r| r.action == a) {
            add(&mut m, r);
        }
        out.push((Action::Allow, a, m));
    }
    out
}

fn action_json(a: Action) -> serde_json::Value {
    use serde_json::json;
    match a {
        Action::Allow => json!("allow"),
        Action::Errno(n) => json!({ "errno": n }),
        Action::KillThread => json!("kill_thread"),
        Action::KillProcess => json!("kill_process"),
        Action::Trap => json!("trap"),
        Action::Log => json!("log"),
    }
}

fn arg_json(a: &Arg) -> serde_json::Value {
    use serde_json::json;
    let op = match a.op {
        CmpOp::Eq => json!("eq"),
        CmpOp::Ne => json!("ne"),
        CmpOp::Lt => json!("lt"),
        CmpOp::Le => json!("le"),
        CmpOp::Gt => json!("gt"),
        CmpOp::Ge => json!("ge"),
        CmpOp::MaskedEq(m) => json!({ "masked_eq": m }),
    };
    json!({ "index": a.index, "type": "qword", "op": op, "val": a.value })
}

#[cfg(target_arch = "x86_64")]
const ARCH: seccompiler::TargetArch = seccompiler::TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: seccompiler::TargetArch = seccompiler::TargetArch::aarch64;

/// Whether seccompiler knows `name` on this architecture (names of other architectures, such
/// as `arch_prctl` on arm64, are left out as libseccomp does).
fn known(name: &str) -> bool {
    let probe = serde_json::json!({ "p": {
        "mismatch_action": "allow", "match_action": "trap", "filter": [{ "syscall": name }]
    }});
    seccompiler::compile_from_json(probe.to_string().as_bytes(), ARCH).is_ok()
}

/// The seccompiler JSON for `p` on this architecture.
pub fn seccompiler_json(p: &Profile) -> serde_json::Value {
    let mut names = BTreeSet::new();
    for r in &p.rules {
        names.insert(r.name.as_str());
    }
    let known: BTreeSet<&str> = names.into_iter().filter(|n| known(n)).collect();
    let mut doc = serde_json::Map::new();
    for (i, (mismatch, on_match, rules)) in groups(p).into_iter().enumerate() {
        let mut filter = Vec::new();
        for (name, conds) in rules.iter().filter(|(n, _)| known.contains(n.as_str())) {
            match conds {
                None => filter.push(serde_json::json!({ "syscall": name })),
                Some(sets) => {
                    for args in sets {
                        let a: Vec<_> = args.iter().map(arg_json).collect();
                        filter.push(serde_json::json!({ "syscall": name, "args": a }));
                    }
                }
            }
        }
        doc.insert(
            format!("f{i:02}"),
            serde_json::json!({
                "mismatch_action": action_json(mismatch),
                "match_action": action_json(on_match),
                "filter": filter,
            }),
        );
    }
    serde_json::Value::Object(doc)
}

/// One classic BPF instruction, laid out as the kernel's `struct sock_filter`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// A compiled filter stack, installed in order.
pub type Programs = Vec<Vec<Insn>>;

/// Compiles `p` with seccompiler.
pub fn compile(p: &Profile) -> Result<Programs, SeccompError> {
    let doc = seccompiler_json(p);
    compile_json(&doc)
}

fn compile_json(doc: &serde_json::Value) -> Result<Programs, SeccompError> {
    let map = seccompiler::compile_from_json(doc.to_string().as_bytes(), ARCH)
        .map_err(|e| SeccompError::Compile(e.to_string()))?;
    let mut named: Vec<_> = map.into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(named
        .into_iter()
        .map(|(_, prog)| {
            prog.into_iter()
                .map(|i| Insn {
                    code: i.code,
                    jt: i.jt,
                    jf: i.jf,
                    k: i.k,
                })
                .collect()
        })
        .collect())
}

/// Cache key: what is compiled, for which architecture, by which compiler.
pub fn cache_key(p: &Profile) -> String {
    let mut h = Sha256::new();
    // v2: cache files carry a checksum (see `seal`); v1 files are simply never read again.
    h.update(b"tweed-seccomp-v2 seccompiler-0.5 ");
    h.update(std::env::consts::ARCH.as_bytes());
    h.update(serde_json::to_vec(p).unwrap_or_default());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn encode(progs: &Programs) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(progs.len() as u32).to_le_bytes());
    for p in progs {
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        for i in p {
            out.extend_from_slice(&i.code.to_le_bytes());
            out.push(i.jt);
            out.push(i.jf);
            out.extend_from_slice(&i.k.to_le_bytes());
        }
    }
    out
}

/// Reads a cache file back; anything malformed reads as a miss.
fn decode(b: &[u8]) -> Option<Programs> {
    let u32_at =
        |o: usize| -> Option<u32> { Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?)) };
    let n = u32_at(0)? as usize;
    if n > 16 {
        return None;
    }
    let mut off = 4;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = u32_at(off)? as usize;
        off += 4;
        if len == 0 || len > u16::MAX as usize {
            return None;
        }
        let mut p = Vec::with_capacity(len);
        for _ in 0..len {
            let c = b.get(off..off + 8)?;
            p.push(Insn {
                code: u16::from_le_bytes([c[0], c[1]]),
                jt: c[2],
                jf: c[3],
                k: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            });
            off += 8;
        }
        out.push(p);
    }
    (off == b.len()).then_some(out)
}

/// A cache file: the SHA-256 of its cache key and the encoded programs, then the programs. The
/// key is in the sum so that a file is valid only under its own name: one sealed for a more
/// permissive profile and copied (or renamed) to another profile's name is a miss.
fn seal(key: &str, encoded: &[u8]) -> Vec<u8> {
    let mut out = sealed_sum(key, encoded);
    out.extend_from_slice(encoded);
    out
}

fn sealed_sum(key: &str, encoded: &[u8]) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(key.as_bytes());
    h.update(encoded);
    h.finalize().to_vec()
}

/// The encoded programs of a cache file whose checksum matches `key`, else `None`.
fn unseal<'a>(key: &str, b: &'a [u8]) -> Option<&'a [u8]> {
    let (sum, body) = (b.get(..32)?, b.get(32..)?);
    (sealed_sum(key, body) == sum).then_some(body)
}

/// A cache file's content when it can be trusted as far as a cache can be: a regular file
/// (not followed through a symlink) owned by us and writable by nobody else. Anything else
/// is a miss, and the recompiled filters replace it.
fn read_cache(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    let m = f.metadata().ok()?;
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if !m.is_file() || m.uid() != me || m.mode() & 0o022 != 0 {
        return None;
    }
    // The directory too: in one others can write, a file could be swapped under its name.
    let d = std::fs::symlink_metadata(path.parent()?).ok()?;
    if !d.is_dir() || d.uid() != me || d.mode() & 0o022 != 0 {
        return None;
    }
    let mut b = Vec::with_capacity(m.len() as usize);
    f.read_to_end(&mut b).ok()?;
    Some(b)
}

/// The compiled filters for `p`, from `cache_dir/<key>.bpf` when an earlier container compiled
/// the same profile, else compiled now and stored (atomically, root-only).
///
/// The cache is trusted once its checksum matches, not re-verified by compiling (which is the
/// work it saves; a compile costs several times the read). The checksum catches what happens
/// without an attacker: a torn or bit-flipped file that still decodes as a valid, different
/// filter, which would silently confine less. It cannot stop a deliberate writer, and need not:
/// the directory is root's alone (0700 under the image root) and the file 0600, and whoever can
/// write there can as well replace the image layers or `tweedctl` itself. A file with another
/// owner or writable by group/others is not read at all.
pub fn compiled(p: &Profile, cache_dir: &Path) -> Result<Programs, SeccompError> {
    let key = cache_key(p);
    let path = cache_dir.join(format!("{key}.bpf"));
    if let Some(b) = read_cache(&path) {
        if let Some(progs) = unseal(&key, &b).and_then(decode) {
            return Ok(progs);
        }
    }
    let progs = compile(p)?;
    store(p, cache_dir, &progs)?;
    Ok(progs)
}

/// Where [`compiled`] keeps the filters of `p`.
pub fn cache_path(p: &Profile, cache_dir: &Path) -> PathBuf {
    cache_dir.join(format!("{}.bpf", cache_key(p)))
}

/// Stores `progs` as the compiled filters of `p` (atomically, root-only, sealed with their
/// checksum). [`compiled`] stores what it compiled; the tests plant other programs with it.
pub fn store(p: &Profile, cache_dir: &Path, progs: &Programs) -> Result<(), SeccompError> {
    let path = cache_path(p, cache_dir);
    let cache_err = |source| SeccompError::Cache {
        path: path.clone(),
        source,
    };
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(cache_dir)
        .map_err(cache_err)?;
    let tmp = cache_dir.join(format!(
        ".{}.{}",
        std::process::id(),
        crate::fsutil::random_hex(8)
    ));
    let r = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&seal(&cache_key(p), &encode(progs)))?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(cache_err(e));
    }
    Ok(())
}

/// Installs `progs` on the calling thread, in order. Needs no_new_privs or CAP_SYS_ADMIN.
pub fn install(progs: &Programs) -> io::Result<()> {
    for p in progs {
        set_mode_filter(p, 0)?;
    }
    Ok(())
}

/// `seccomp(SECCOMP_SET_MODE_FILTER, flags, prog)` on the calling thread; returns what the kernel
/// returned (a listener fd with `SECCOMP_FILTER_FLAG_NEW_LISTENER`). No allocation: callers run
/// it between fork and exec.
pub fn set_mode_filter(prog: &[Insn], flags: libc::c_ulong) -> io::Result<i64> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `prog` is alive for the call and the kernel copies it before returning.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            &fprog as *const libc::sock_fprog,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

#[cfg(test)]
mod tests;
