//! An honest `sysinfo(2)`. busybox `free` (and anything else calling sysinfo) asks the kernel,
//! not /proc/meminfo, so the file view alone is not enough. The container's processes run under
//! a seccomp filter that turns `sysinfo` into a user notification; the supervisor (or the
//! `exec` helper) answers it with the container's memory limit and usage, written into the
//! caller's buffer, as LXCFS would if it could.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::cgroup::Stats;
use crate::seccomp::Insn;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// The filter: `sysinfo` -> user notification, everything else allowed.
fn program() -> Vec<Insn> {
    let st = |code: u16, k: u32| Insn {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8, jf: u8| Insn {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let ld = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    let ret = (libc::BPF_RET | libc::BPF_K) as u16;
    vec![
        st(ld, 4), // seccomp_data.arch
        jeq(AUDIT_ARCH, 0, 3),
        st(ld, 0), // seccomp_data.nr
        jeq(libc::SYS_sysinfo as u32, 0, 1),
        st(ret, libc::SECCOMP_RET_USER_NOTIF),
        st(ret, libc::SECCOMP_RET_ALLOW),
    ]
}

/// Installs the filter on the calling thread (needs no_new_privs) and returns the listener.
pub fn install_filter() -> io::Result<OwnedFd> {
    let r = crate::seccomp::set_mode_filter(&program(), libc::SECCOMP_FILTER_FLAG_NEW_LISTENER)?;
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// Copies fd `target` of the process behind `pidfd` into this process.
pub fn pidfd_getfd(pidfd: RawFd, target: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, target, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: new fd owned by us.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// The container's view: the host's `real` sysinfo with memory replaced by the cgroup's.
pub fn fake(real: &libc::sysinfo, stats: &Stats, limit: u64) -> libc::sysinfo {
    let mut s = *real;
    let unit = u64::from(s.mem_unit.max(1));
    let usage = stats.memory_usage.min(limit);
    let conv = |b: u64| (b / unit) as libc::c_ulong;
    s.totalram = conv(limit);
    s.freeram = conv(limit - usage);
    s.sharedram = 0;
    s.bufferram = 0;
    s.totalswap = 0;
    s.freeswap = 0;
    s.totalhigh = 0;
    s.freehigh = 0;
    if stats.pids_current > 0 {
        s.procs = stats.pids_current.min(u16::MAX as u64) as u16;
    }
    s
}

/// Answers one pending notification on `listener`. `view` gives the current stats and limit.
/// Returns false when the listener has no more filtered processes.
pub fn serve_one(listener: &OwnedFd, view: &dyn Fn() -> (Stats, u64)) -> io::Result<bool> {
    let fd = listener.as_raw_fd();
    // SAFETY: zeroed notification buffers of the kernel's layout; ioctls on our listener;
    // process_vm_writev with a local struct and the caller's pointer.
    unsafe {
        let mut req: libc::seccomp_notif = std::mem::zeroed();
        if libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_RECV, &mut req) < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // The caller was killed before we read it, or we were interrupted.
                Some(libc::ENOENT) | Some(libc::EINTR) => Ok(true),
                _ => Err(e),
            };
        }
        let mut resp: libc::seccomp_notif_resp = std::mem::zeroed();
        resp.id = req.id;
        if req.data.nr as libc::c_long == libc::SYS_sysinfo {
            let mut real: libc::sysinfo = std::mem::zeroed();
            libc::sysinfo(&mut real);
            let (stats, limit) = view();
            let s = fake(&real, &stats, limit);
            let local = libc::iovec {
                iov_base: &s as *const libc::sysinfo as *mut libc::c_void,
                iov_len: std::mem::size_of::<libc::sysinfo>(),
            };
            let remote = libc::iovec {
                iov_base: req.data.args[0] as *mut libc::c_void,
                iov_len: std::mem::size_of::<libc::sysinfo>(),
            };
            let n = libc::process_vm_writev(req.pid as libc::pid_t, &local, 1, &remote, 1, 0);
            if n != local.iov_len as isize {
                resp.error = -libc::EFAULT;
            }
        } else {
            resp.error = -libc::ENOSYS;
        }
        // Answer only if the caller is still waiting in that very syscall.
        let mut id = req.id;
        if libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_ID_VALID, &mut id) < 0 {
            return Ok(true);
        }
        if libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_SEND, &mut resp) < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(e);
            }
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_shows_the_limit() {
        // SAFETY: sysinfo fills a zeroed struct.
        let real = unsafe {
            let mut s: libc::sysinfo = std::mem::zeroed();
            libc::sysinfo(&mut s);
            s
        };
        let st = Stats {
            memory_usage: 16 << 20,
            pids_current: 3,
            ..Default::default()
        };
        let f = fake(&real, &st, 64 << 20);
        let unit = f.mem_unit.max(1) as u64;
        assert_eq!(f.totalram as u64 * unit, 64 << 20);
        assert_eq!(f.freeram as u64 * unit, 48 << 20);
        assert_eq!(f.totalswap, 0);
        assert_eq!(f.procs, 3);
        assert_eq!(f.uptime, real.uptime);
    }

    #[test]
    fn program_shape() {
        let p = program();
        assert_eq!(p.len(), 6);
        assert_eq!(p[4].k, libc::SECCOMP_RET_USER_NOTIF);
        assert_eq!(p[5].k, libc::SECCOMP_RET_ALLOW);
        // A wrong architecture jumps straight to ALLOW.
        assert_eq!(1 + 1 + p[1].jf as usize, 5);
    }
}
