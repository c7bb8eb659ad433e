//! Which devices a container may use: Docker's default allow-list, as data ([`DEVICE_ALLOW`]),
//! enforced by the `devices` controller on cgroup v1 (one rule per write to `devices.allow`)
//! and, on cgroup v2, which has no such files, by an eBPF program of type
//! `BPF_PROG_TYPE_CGROUP_DEVICE` attached to the container's cgroup. The program is generated
//! from the same rules as eBPF assembly text and assembled by the `rbpf` crate; its decisions are
//! unit-tested in rbpf's interpreter against the rules themselves.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// Docker's default device allow-list, in the v1 `devices.allow` syntax: making any node is
/// allowed (the nodev rootfs and these rules decide whether it can be opened), reading and
/// writing only the harmless character devices and ptys.
pub const DEVICE_ALLOW: &[&str] = &[
    "c *:* m",
    "b *:* m",
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
    "c 5:0 rwm",
    "c 5:1 rwm",
    "c 5:2 rwm",
    "c 136:* rwm",
    "c 10:200 rwm",
];

/// What a container gets: Docker's list, or every device (`--privileged`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevicePolicy {
    Default,
    All,
}

/// `BPF_DEVCG_DEV_*`: the low 16 bits of `bpf_cgroup_dev_ctx.access_type`.
pub const DEV_BLOCK: u32 = 1;
pub const DEV_CHAR: u32 = 2;
/// `BPF_DEVCG_ACC_*`: the high 16 bits.
pub const ACC_MKNOD: u32 = 1;
pub const ACC_READ: u32 = 2;
pub const ACC_WRITE: u32 = 4;

/// One parsed rule: device type (None: both), major and minor (None: any), allowed accesses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub kind: Option<u32>,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    pub access: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device rule {0:?}: expected TYPE MAJOR:MINOR ACCESS")]
    Rule(String),
    #[error("assembling the device program: {0}")]
    Assemble(String),
    #[error("loading the device program: {source}; verifier: {log}")]
    Load { source: io::Error, log: String },
    #[error("attaching the device program to {path}: {source}")]
    Attach {
        path: std::path::PathBuf,
        source: io::Error,
    },
}

/// Parses one `devices.allow` line (`a`, or `c|b|a MAJOR|*:MINOR|* [rwm]`).
pub fn parse_rule(s: &str) -> Result<Rule, DeviceError> {
    let bad = || DeviceError::Rule(s.to_string());
    let f: Vec<&str> = s.split_whitespace().collect();
    if f == ["a"] {
        return Ok(Rule {
            kind: None,
            major: None,
            minor: None,
            access: ACC_MKNOD | ACC_READ | ACC_WRITE,
        });
    }
    let [t, mm, acc] = f[..] else {
        return Err(bad());
    };
    let kind = match t {
        "c" => Some(DEV_CHAR),
        "b" => Some(DEV_BLOCK),
        "a" => None,
        _ => return Err(bad()),
    };
    let (ma, mi) = mm.split_once(':').ok_or_else(bad)?;
    let num = |x: &str| -> Result<Option<u32>, DeviceError> {
        if x == "*" {
            Ok(None)
        } else {
            x.parse().map(Some).map_err(|_| bad())
        }
    };
    let mut access = 0;
    for c in acc.chars() {
        access |= match c {
            'r' => ACC_READ,
            'w' => ACC_WRITE,
            'm' => ACC_MKNOD,
            _ => return Err(bad()),
        };
    }
    if access == 0 {
        return Err(bad());
    }
    Ok(Rule {
        kind,
        major: num(ma)?,
        minor: num(mi)?,
        access,
    })
}

/// The rules' verdict for one access (the reference the program is tested against).
pub fn allowed(rules: &[Rule], kind: u32, major: u32, minor: u32, access: u32) -> bool {
    rules.iter().any(|r| {
        r.kind.is_none_or(|k| k == kind)
            && r.major.is_none_or(|m| m == major)
            && r.minor.is_none_or(|m| m == minor)
            && access & !r.access == 0
    })
}

/// The program as eBPF assembly: r2 = type, r3 = access, r4 = major, r5 = minor; each rule
/// either returns 1 or falls through to the next; nothing matched returns 0 (deny).
pub fn program_text(rules: &[Rule]) -> String {
    let mut s = String::from(
        "ldxw r2, [r1]\n\
         mov64 r3, r2\n\
         and64 r2, 0xffff\n\
         rsh64 r3, 16\n\
         ldxw r4, [r1+4]\n\
         ldxw r5, [r1+8]\n",
    );
    for r in rules {
        let mut checks: Vec<String> = Vec::new();
        if let Some(k) = r.kind {
            checks.push(format!("jne r2, {k}, +SKIP"));
        }
        let denied = !r.access & (ACC_MKNOD | ACC_READ | ACC_WRITE);
        if denied != 0 {
            checks.push(format!("jset r3, {denied}, +SKIP"));
        }
        if let Some(m) = r.major {
            checks.push(format!("jne r4, {m}, +SKIP"));
        }
        if let Some(m) = r.minor {
            checks.push(format!("jne r5, {m}, +SKIP"));
        }
        // Each check skips the rest of its rule: the later checks and `mov64 r0, 1; exit`.
        let n = checks.len();
        for (i, c) in checks.into_iter().enumerate() {
            s.push_str(&c.replace("SKIP", &(n - 1 - i + 2).to_string()));
            s.push('\n');
        }
        s.push_str("mov64 r0, 1\nexit\n");
    }
    s.push_str("mov64 r0, 0\nexit\n");
    s
}

/// The assembled program (8-byte eBPF instructions).
pub fn program(rules: &[Rule]) -> Result<Vec<u8>, DeviceError> {
    rbpf::assembler::assemble(&program_text(rules)).map_err(DeviceError::Assemble)
}

/// Docker's rules, parsed.
pub fn default_rules() -> Vec<Rule> {
    DEVICE_ALLOW
        .iter()
        .map(|r| parse_rule(r).expect("the built-in rules parse"))
        .collect()
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

/// Loads `prog` into the kernel as a cgroup device program.
pub fn load(prog: &[u8]) -> Result<OwnedFd, DeviceError> {
    let license = c"Apache-2.0";
    let mut log = vec![0u8; 64 * 1024];
    let mut name = [0u8; 16];
    name[..11].copy_from_slice(b"tweed_devcg");
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: (prog.len() / 8) as u32,
        insns: prog.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        prog_name: name,
        ..Default::default()
    };
    // attr points at live buffers (program, license, log) for the whole call.
    let r = match bpf(BPF_PROG_LOAD, &attr) {
        Ok(r) => r,
        Err(source) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            return Err(DeviceError::Load {
                source,
                log: String::from_utf8_lossy(&log[..end]).trim().to_string(),
            });
        }
    };
    // SAFETY: the kernel just gave us this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// Attaches a loaded program to the cgroup v2 directory `dir`. The cgroup keeps the program;
/// the fd can be closed afterwards, and removing the cgroup detaches it.
pub fn attach(dir: &Path, prog: &OwnedFd) -> Result<(), DeviceError> {
    let err = |source| DeviceError::Attach {
        path: dir.to_path_buf(),
        source,
    };
    let cg = std::fs::File::open(dir).map_err(err)?;
    let attr = ProgAttachAttr {
        target_fd: cg.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
    };
    bpf(BPF_PROG_ATTACH, &attr).map_err(err)?;
    Ok(())
}

/// `bpf(cmd, attr, sizeof attr)`: `A` is the `#[repr(C)]` attr union member that `cmd` reads.
fn bpf<A>(cmd: libc::c_long, attr: &A) -> io::Result<i64> {
    // SAFETY: attr is a live reference for the call and the size passed is its own.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const A,
            std::mem::size_of::<A>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// Builds, loads and attaches Docker's device program to the v2 cgroup `dir`.
pub fn install_v2(dir: &Path) -> Result<(), DeviceError> {
    let prog = program(&default_rules())?;
    let fd = load(&prog)?;
    attach(dir, &fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(prog: &[u8], kind: u32, access: u32, major: u32, minor: u32) -> bool {
        let vm = rbpf::EbpfVmRaw::new(Some(prog)).unwrap();
        let mut ctx = Vec::new();
        ctx.extend_from_slice(&(access << 16 | kind).to_le_bytes());
        ctx.extend_from_slice(&major.to_le_bytes());
        ctx.extend_from_slice(&minor.to_le_bytes());
        match vm.execute_program(&mut ctx).unwrap() {
            0 => false,
            1 => true,
            other => panic!("program returned {other}"),
        }
    }

    #[test]
    fn rules_parse_as_v1_writes_them() {
        assert_eq!(
            parse_rule("c 136:* rwm").unwrap(),
            Rule {
                kind: Some(DEV_CHAR),
                major: Some(136),
                minor: None,
                access: 7
            }
        );
        assert_eq!(parse_rule("a").unwrap().kind, None);
        for bad in [
            "",
            "x 1:3 rwm",
            "c 1 rwm",
            "c 1:3 rwx",
            "c 1:3",
            "c a:3 r",
            "c 1:3 r extra",
        ] {
            assert!(parse_rule(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_default_program_decides_as_the_rules() {
        let rules = default_rules();
        let prog = program(&rules).unwrap();
        // Spot checks: the host disk cannot be read or written, only made; /dev/null can.
        assert!(!run(&prog, DEV_BLOCK, ACC_READ, 254, 0));
        assert!(!run(&prog, DEV_BLOCK, ACC_WRITE, 8, 0));
        assert!(run(&prog, DEV_BLOCK, ACC_MKNOD, 8, 0));
        assert!(!run(&prog, DEV_BLOCK, ACC_MKNOD | ACC_READ, 8, 0));
        assert!(run(&prog, DEV_CHAR, ACC_READ | ACC_WRITE, 1, 3));
        assert!(run(&prog, DEV_CHAR, ACC_READ | ACC_WRITE, 136, 7));
        assert!(run(&prog, DEV_CHAR, ACC_READ, 10, 200));
        assert!(!run(&prog, DEV_CHAR, ACC_READ, 10, 229)); // /dev/fuse
        assert!(!run(&prog, DEV_CHAR, ACC_READ, 1, 1)); // /dev/mem
        assert!(!run(&prog, DEV_CHAR, ACC_WRITE, 4, 0)); // a tty
                                                         // Exhaustively over a grid that covers every rule's edges.
        let majors = [0, 1, 4, 5, 8, 10, 136, 137, 254, 65535];
        let minors = [0, 1, 2, 3, 5, 7, 8, 9, 10, 200, 229, 65535];
        for kind in [DEV_BLOCK, DEV_CHAR] {
            for access in 1..8 {
                for &ma in &majors {
                    for &mi in &minors {
                        assert_eq!(
                            run(&prog, kind, access, ma, mi),
                            allowed(&rules, kind, ma, mi, access),
                            "type {kind} access {access} {ma}:{mi}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn allow_all_and_empty_lists() {
        let all = program(&[parse_rule("a").unwrap()]).unwrap();
        assert!(run(&all, DEV_BLOCK, 7, 8, 0));
        let none = program(&[]).unwrap();
        assert!(!run(&none, DEV_CHAR, ACC_READ, 1, 3));
    }
}
