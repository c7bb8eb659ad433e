//! Capabilities: Docker's default set and the syscalls that reduce a process to it.

use std::io;

use serde::{Deserialize, Serialize};

/// A set of capabilities as a bit mask (bit N = capability N).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapSet(pub u64);

/// Capability numbers from `linux/capability.h` with their names.
pub const NAMES: &[(u32, &str)] = &[
    (0, "CAP_CHOWN"),
    (1, "CAP_DAC_OVERRIDE"),
    (2, "CAP_DAC_READ_SEARCH"),
    (3, "CAP_FOWNER"),
    (4, "CAP_FSETID"),
    (5, "CAP_KILL"),
    (6, "CAP_SETGID"),
    (7, "CAP_SETUID"),
    (8, "CAP_SETPCAP"),
    (9, "CAP_LINUX_IMMUTABLE"),
    (10, "CAP_NET_BIND_SERVICE"),
    (11, "CAP_NET_BROADCAST"),
    (12, "CAP_NET_ADMIN"),
    (13, "CAP_NET_RAW"),
    (14, "CAP_IPC_LOCK"),
    (15, "CAP_IPC_OWNER"),
    (16, "CAP_SYS_MODULE"),
    (17, "CAP_SYS_RAWIO"),
    (18, "CAP_SYS_CHROOT"),
    (19, "CAP_SYS_PTRACE"),
    (20, "CAP_SYS_PACCT"),
    (21, "CAP_SYS_ADMIN"),
    (22, "CAP_SYS_BOOT"),
    (23, "CAP_SYS_NICE"),
    (24, "CAP_SYS_RESOURCE"),
    (25, "CAP_SYS_TIME"),
    (26, "CAP_SYS_TTY_CONFIG"),
    (27, "CAP_MKNOD"),
    (28, "CAP_LEASE"),
    (29, "CAP_AUDIT_WRITE"),
    (30, "CAP_AUDIT_CONTROL"),
    (31, "CAP_SETFCAP"),
    (32, "CAP_MAC_OVERRIDE"),
    (33, "CAP_MAC_ADMIN"),
    (34, "CAP_SYSLOG"),
    (35, "CAP_WAKE_ALARM"),
    (36, "CAP_BLOCK_SUSPEND"),
    (37, "CAP_AUDIT_READ"),
    (38, "CAP_PERFMON"),
    (39, "CAP_BPF"),
    (40, "CAP_CHECKPOINT_RESTORE"),
];

pub const DAC_READ_SEARCH: u32 = 2;
pub const MKNOD: u32 = 27;
pub const SYS_MODULE: u32 = 16;
pub const SYS_RAWIO: u32 = 17;
pub const SYS_CHROOT: u32 = 18;
pub const SYS_PTRACE: u32 = 19;
pub const SYS_PACCT: u32 = 20;
pub const SYS_ADMIN: u32 = 21;
pub const SYS_BOOT: u32 = 22;
pub const SYS_NICE: u32 = 23;
pub const SYS_TIME: u32 = 25;
pub const SYS_TTY_CONFIG: u32 = 26;

/// Docker's default capability set (moby `oci/caps/defaults.go`).
pub const DOCKER_DEFAULT: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

impl CapSet {
    pub fn from_names(names: &[&str]) -> Option<CapSet> {
        let mut m = 0u64;
        for n in names {
            let (num, _) = NAMES.iter().find(|(_, name)| name == n)?;
            m |= 1 << num;
        }
        Some(CapSet(m))
    }
    pub fn docker_default() -> CapSet {
        CapSet::from_names(DOCKER_DEFAULT).expect("default names are known")
    }
    /// Every capability the kernel knows (`--privileged`).
    pub fn all(last_cap: u32) -> CapSet {
        CapSet(if last_cap >= 63 {
            u64::MAX
        } else {
            (1u64 << (last_cap + 1)) - 1
        })
    }
    /// Docker's `--cap-add`/`--cap-drop`: names with or without `CAP_`, any case, or `ALL`.
    /// Drops apply first, then adds (so `--cap-drop ALL --cap-add NET_RAW` keeps one).
    pub fn adjust(self, add: &[String], drop: &[String], last_cap: u32) -> Result<CapSet, String> {
        let parse = |n: &String| -> Result<u64, String> {
            let up = n.trim().to_ascii_uppercase();
            if up == "ALL" {
                return Ok(CapSet::all(last_cap).0);
            }
            let full = if up.starts_with("CAP_") {
                up
            } else {
                format!("CAP_{up}")
            };
            CapSet::from_names(&[full.as_str()])
                .map(|c| c.0)
                .ok_or_else(|| format!("unknown capability {n:?}"))
        };
        let mut m = self.0;
        for n in drop {
            m &= !parse(n)?;
        }
        for n in add {
            m |= parse(n)?;
        }
        Ok(CapSet(m))
    }
    pub fn contains(&self, cap: u32) -> bool {
        cap < 64 && self.0 & (1 << cap) != 0
    }
    pub fn names(&self) -> Vec<&'static str> {
        NAMES
            .iter()
            .filter(|(n, _)| self.contains(*n))
            .map(|(_, s)| *s)
            .collect()
    }
    /// Capabilities `0..=last_cap` to drop from the bounding set.
    pub fn to_drop(&self, last_cap: u32) -> Vec<u32> {
        (0..=last_cap).filter(|c| !self.contains(*c)).collect()
    }
}

/// The bounding set of this process (`--privileged` can give no more than the runtime has,
/// e.g. when it runs in a sandbox itself).
pub fn own_bounding() -> Option<CapSet> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapBnd:"))?;
    u64::from_str_radix(hex.trim(), 16).ok().map(CapSet)
}

/// The kernel's highest capability number.
pub fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Drops the bounding set to `caps`, clears ambient caps, and sets permitted, effective and
/// inheritable to `caps`. Called by [`crate::syscall::LinuxSyscall`].
pub(crate) fn apply(caps: &CapSet) -> io::Result<()> {
    for c in caps.to_drop(last_cap()) {
        // SAFETY: plain prctl. EINVAL means the kernel does not know the cap: nothing to drop.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, c as libc::c_ulong, 0, 0, 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
        }
    }
    // SAFETY: plain prctl; failure (old kernels without ambient caps) is harmless.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
    }
    let lo = caps.0 as u32;
    let hi = (caps.0 >> 32) as u32;
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: lo,
            permitted: lo,
            inheritable: 0,
        },
        CapData {
            effective: hi,
            permitted: hi,
            inheritable: 0,
        },
    ];
    // SAFETY: header and two data structs laid out as the kernel expects for version 3.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_default_set() {
        let d = CapSet::docker_default();
        assert_eq!(d.names().len(), 14);
        assert!(d.contains(0)); // CHOWN
        assert!(d.contains(13)); // NET_RAW
        assert!(!d.contains(21)); // SYS_ADMIN
        assert!(!d.contains(12)); // NET_ADMIN
                                  // The mask Docker containers show as CapEff in /proc/self/status.
        assert_eq!(d.0, 0x0000_0000_a804_25fb);
    }

    #[test]
    fn drop_list_is_the_complement() {
        let d = CapSet::docker_default();
        let drop = d.to_drop(40);
        assert_eq!(drop.len(), 41 - 14);
        assert!(drop.contains(&21));
        assert!(!drop.contains(&0));
    }

    #[test]
    fn add_and_drop_as_docker() {
        let d = CapSet::docker_default();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let c = d
            .adjust(&s(&["sys_ptrace"]), &s(&["CAP_MKNOD", "net_raw"]), 40)
            .unwrap();
        assert!(c.contains(SYS_PTRACE) && !c.contains(MKNOD) && !c.contains(13));
        let only = d
            .adjust(&s(&["NET_BIND_SERVICE"]), &s(&["ALL"]), 40)
            .unwrap();
        assert_eq!(only.names(), ["CAP_NET_BIND_SERVICE"]);
        assert_eq!(d.adjust(&s(&["all"]), &[], 40).unwrap(), CapSet::all(40));
        assert_eq!(CapSet::all(40).0, (1 << 41) - 1);
        assert!(d
            .adjust(&s(&["CAP_NOPE"]), &[], 40)
            .unwrap_err()
            .contains("CAP_NOPE"));
    }

    #[test]
    fn unknown_names_are_refused() {
        assert!(CapSet::from_names(&["CAP_NOPE"]).is_none());
    }
}
