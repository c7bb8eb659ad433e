//! DEL's link delete, returning once the device is unlisted instead of once the kernel is done.
//!
//! `RTM_DELLINK` of a veth unlists both ends early in the deleting `sendmsg`, under RTNL: they
//! vanish from every lookup and dump, their names are free, and the kernel multicasts an
//! `RTM_DELLINK` notification for each. The same syscall then waits for the rest of the
//! kernel's teardown (`netdev_run_todo`: an RCU barrier and the device refcounts) before the
//! ACK is sent: 12–16 ms here, most of a synchronous DEL.
//!
//! So the request is sent by a forked child that does nothing else. The plugin sleeps in
//! `poll` on sockets subscribed to link notifications, one in each namespace holding a target,
//! until the notifications for the targets arrive (about 1 ms after the child's `sendmsg` on
//! a quiet machine), then goes on with DEL. It asks `RTM_GETLINK` by index (`ENODEV` once
//! gone) instead when a socket overran, when the child exited, and every [`CHECK_EVERY`]. The
//! child lives until its ACK comes (~15–30 ms), as an orphan once the plugin has exited.
//!
//! If anything in that path fails (no socket, no subscription to the notifications, `fork`
//! failing, the child exiting with the link still there, the link not unlisted within
//! [`UNLIST_BOUND`]), the link is deleted synchronously, as before. The child is killed and
//! reaped first, so a late `RTM_DELLINK` from it can never meet a device that reused the index.
//!
//! The child runs only raw syscalls (`dup2`, `close`, `close_range`, `setsid`, `send`, `recv`,
//! `_exit`) on a request built before the fork: no allocation, no lock, no Rust runtime state.
//! It closes every inherited descriptor except its netlink socket, first of all stdin, stdout
//! and stderr: a runtime reads the plugin's stdout and stderr until EOF, and a child holding
//! them would make DEL as slow as before for the runtime. `setsid` keeps it out of the
//! plugin's process group, so a runtime killing that group does not cut the teardown short.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use tweed_netlink::Netns;

use crate::code;

#[derive(Debug, thiserror::Error)]
#[error("{what} in {place}: {reason}")]
pub struct DetachError {
    /// The request, `ip`-like: "link del #7".
    pub what: String,
    /// The namespace, as [`Target::place`] names it.
    pub place: String,
    pub reason: String,
}

impl DetachError {
    pub fn code(&self) -> u32 {
        code::NETLINK
    }
}

/// How long the plugin waits for a detached delete to unlist the device before deleting it
/// itself.
pub const UNLIST_BOUND: Duration = Duration::from_secs(2);

const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
/// `nlmsghdr` + `ifinfomsg`: a link request by index, with no attributes.
pub const LINK_MSG_LEN: usize = NLMSG_HDRLEN + IFINFOMSG_LEN;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLMSG_ERROR: u16 = 0x2;
const NLMSG_DONE: u16 = 0x3;

/// A link request by index: `nlmsghdr` (length, type, flags, sequence, port 0) then an
/// `ifinfomsg` whose only set field is the index. Native byte order, as netlink wants.
pub fn link_msg(kind: u16, flags: u16, ifindex: u32, seq: u32) -> [u8; LINK_MSG_LEN] {
    let mut b = [0u8; LINK_MSG_LEN];
    b[0..4].copy_from_slice(&(LINK_MSG_LEN as u32).to_ne_bytes());
    b[4..6].copy_from_slice(&kind.to_ne_bytes());
    b[6..8].copy_from_slice(&flags.to_ne_bytes());
    b[8..12].copy_from_slice(&seq.to_ne_bytes());
    // ifinfomsg: family (AF_UNSPEC), pad, type, index (i32), flags, change.
    b[NLMSG_HDRLEN + 4..NLMSG_HDRLEN + 8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    b
}

/// `RTM_DELLINK` of `ifindex`, acked.
pub fn dellink_msg(ifindex: u32, seq: u32) -> [u8; LINK_MSG_LEN] {
    link_msg(libc::RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, ifindex, seq)
}

/// `RTM_GETLINK` of `ifindex`: answered by an `RTM_NEWLINK` or an error (`ENODEV` once gone).
pub fn getlink_msg(ifindex: u32, seq: u32) -> [u8; LINK_MSG_LEN] {
    link_msg(libc::RTM_GETLINK, NLM_F_REQUEST, ifindex, seq)
}

/// What the kernel answered to the request with sequence number `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// An `RTM_NEWLINK`: the device is there.
    Link,
    /// An `NLMSG_ERROR`: 0 is an ACK, anything else the errno.
    Errno(i32),
}

/// The reply to `seq` among the messages in `buf`; other messages (other sequence numbers,
/// `NLMSG_DONE`) are skipped. A reply cut short by a small buffer still counts: its header and
/// error code are enough. Never allocates, so the forked child may use it too.
pub fn parse_reply(buf: &[u8], seq: u32) -> Option<Reply> {
    let word = |at: usize| {
        buf.get(at..at + 4)
            .map(|w| u32::from_ne_bytes(w.try_into().expect("4 bytes")))
    };
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = word(off)? as usize;
        if len < NLMSG_HDRLEN {
            return None;
        }
        let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        if word(off + 8)? == seq {
            match kind {
                NLMSG_ERROR => return word(off + NLMSG_HDRLEN).map(|e| Reply::Errno(-(e as i32))),
                libc::RTM_NEWLINK => return Some(Reply::Link),
                NLMSG_DONE => return None,
                _ => {}
            }
        }
        off = off.checked_add((len + 3) & !3)?;
    }
    None
}

/// A device to delete: its index in the namespace `netns` (`None`: the plugin's own), and the
/// namespace's description for error messages. `N` is the namespace handle: [`Netns`] here, a
/// fake one in the command layer's tests.
#[derive(Debug)]
pub struct Target<'a, N = Netns> {
    pub netns: Option<&'a N>,
    pub ifindex: u32,
    pub place: String,
}

/// Deletes every target still present, in order: detached where possible and `detached` is
/// set (the `detachedDelete` setting; see the module docs), else synchronously. When this
/// returns `Ok`, none of them is listed any more. The first target's deletion usually takes the
/// others with it (the two ends of one veth): their notifications are waited for too, and they
/// are then skipped.
pub fn delete(targets: &[Target<'_>], detached: bool) -> Result<(), DetachError> {
    // Per target, three sockets in its namespace, opened by one thread there when it is
    // another namespace: one to ask on, one subscribed to link notifications (never asked on:
    // when notifications overrun it, replies could be lost), one for the child to send from.
    let mut query = Vec::with_capacity(targets.len());
    let mut watch = Vec::with_capacity(targets.len());
    let mut spare = Vec::with_capacity(targets.len());
    let mut subscribed = Vec::with_capacity(targets.len());
    for t in targets {
        let socks = open_sockets(t.netns, 3).map_err(|e| DetachError {
            what: "opening netlink".into(),
            place: t.place.clone(),
            reason: e.to_string(),
        })?;
        let [q, w, s]: [OwnedFd; 3] = socks.try_into().expect("three sockets");
        // Unsubscribed, the wait would hear of the device only from the periodic RTM_GETLINK,
        // later than a synchronous delete would be done: such a target is deleted here.
        subscribed.push(subscribe_links(&w).is_ok());
        query.push(q);
        watch.push(w);
        spare.push(Some(s));
    }
    let mut present = vec![true; targets.len()];
    let mut seq = QUERY_SEQ;
    for i in 0..targets.len() {
        if !present[i] {
            continue;
        }
        let t = &targets[i];
        seq += 1;
        match request(&query[i], &getlink_msg(t.ifindex, seq), seq) {
            Ok(Reply::Errno(libc::ENODEV)) => {
                present[i] = false;
                continue;
            }
            Ok(_) => {}
            Err(e) => {
                return Err(DetachError {
                    what: format!("link show #{}", t.ifindex),
                    place: t.place.clone(),
                    reason: e.to_string(),
                })
            }
        }
        // A second detached delete in one namespace (when the first did not take this target
        // along) needs a fresh socket to send from.
        let send = match spare[i].take() {
            _ if !detached || !subscribed[i] => None,
            Some(s) => Some(s),
            None => open_sockets(t.netns, 1).ok().and_then(|mut v| v.pop()),
        };
        if let Some(send) = send {
            let mut w = Waiter {
                targets,
                query: &query,
                watch: &watch,
                present: &mut present,
                seq: &mut seq,
            };
            if w.detached(i, send) {
                continue;
            }
        }
        seq += 1;
        let del = |reason: String| DetachError {
            what: format!("link del #{}", t.ifindex),
            place: t.place.clone(),
            reason,
        };
        match request(&query[i], &dellink_msg(t.ifindex, seq), seq) {
            Ok(Reply::Errno(0 | libc::ENODEV)) => present[i] = false,
            Ok(Reply::Errno(e)) => return Err(del(io::Error::from_raw_os_error(e).to_string())),
            Ok(Reply::Link) => return Err(del("answered with a link".into())),
            Err(e) => return Err(del(e.to_string())),
        }
    }
    Ok(())
}

/// The child's request has this sequence number; the plugin's own queries count up from
/// [`QUERY_SEQ`], so a notification (which carries the sequence number of the request that
/// caused it) is never taken for a reply.
const CHILD_SEQ: u32 = 1;
const QUERY_SEQ: u32 = 0x7000_0000;

struct Waiter<'a, 'b> {
    targets: &'a [Target<'b>],
    query: &'a [OwnedFd],
    watch: &'a [OwnedFd],
    present: &'a mut [bool],
    seq: &'a mut u32,
}

impl Waiter<'_, '_> {
    /// Forks a child that sends `RTM_DELLINK` of target `i` on `send`, and waits until target
    /// `i` is unlisted, and every other target still present too, or the child exited. True
    /// when target `i` is gone; false when the caller must delete it itself (the child, if
    /// any, is then dead and reaped).
    fn detached(&mut self, i: usize, send: OwnedFd) -> bool {
        // Everything the child uses is ready before the fork: it must not allocate.
        let msg = dellink_msg(self.targets[i].ifindex, CHILD_SEQ);
        let max_fd = max_fd();
        let sock = send.as_raw_fd();
        // Single-threaded here, by construction: the tokio runtime that looked the links up
        // was current-thread and has been dropped (it never used a blocking pool, and dropping
        // it would have joined one), and sockets inside a namespace were opened on this
        // thread. The child needs no lock anyway: it runs raw syscalls.
        // SAFETY: fork has no preconditions; the child only calls `child`, which never returns
        // and is async-signal-safe.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: in the freshly forked child, see `child`.
            unsafe { child(sock, &msg, max_fd) }
        }
        // The child has its copy of the socket; ours goes.
        drop(send);
        if pid < 0 {
            return false;
        }
        let start = Instant::now();
        let mut child_exited = false;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let pending: Vec<usize> = (0..self.targets.len())
                .filter(|&j| self.present[j])
                .collect();
            if pending.is_empty() {
                break;
            }
            // Sleeps until a link notification arrives (the child's own DELLINK is one), or
            // for CHECK_EVERY: the child keeps the CPU to itself meanwhile.
            let mut fds: Vec<libc::pollfd> = pending
                .iter()
                .map(|&j| libc::pollfd {
                    fd: self.watch[j].as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            // SAFETY: fds is a live array of the given length.
            let n = unsafe {
                libc::poll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    CHECK_EVERY.as_millis() as i32,
                )
            };
            let mut check = n <= 0;
            for (k, &j) in pending.iter().enumerate() {
                if fds[k].revents == 0 {
                    continue;
                }
                match drain(&self.watch[j], self.targets[j].ifindex, &mut buf) {
                    Seen::Deleted => self.present[j] = false,
                    Seen::Lost => check = true,
                    Seen::Nothing => {}
                }
            }
            if !child_exited {
                // SAFETY: waitpid on our own child, not blocking.
                if unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) } == pid {
                    child_exited = true;
                    check = true;
                }
            }
            if check {
                // Asked, not heard: after a lost notification, a timeout or the child's exit.
                for &j in &pending {
                    *self.seq += 1;
                    let q = getlink_msg(self.targets[j].ifindex, *self.seq);
                    if let Ok(Reply::Errno(libc::ENODEV)) = request(&self.query[j], &q, *self.seq) {
                        self.present[j] = false;
                    }
                }
            }
            if !self.present[i] && (child_exited || start.elapsed() > UNLIST_BOUND) {
                break;
            }
            if child_exited {
                // It exited, and the device is still listed: its request failed.
                return false;
            }
            if start.elapsed() > UNLIST_BOUND {
                kill_and_reap(pid);
                return false;
            }
        }
        if !child_exited {
            // Reaped now if already done; else left to finish, and reaped by whoever inherits
            // it when the plugin exits.
            // SAFETY: waitpid on our own child, not blocking.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        }
        true
    }
}

/// Kills and reaps our own child. Inside its request, the kernel finishes or abandons the
/// request before the child dies; once reaped, nothing of it is left in flight.
fn kill_and_reap(pid: libc::pid_t) {
    // SAFETY: kill and waitpid on our own, not yet reaped child: the pid cannot have been
    // reused. kill cannot fail here (the pid exists, zombie or not, and is ours to signal).
    unsafe { libc::kill(pid, libc::SIGKILL) };
    loop {
        // SAFETY: as above.
        let r = unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        if r == pid || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            // Reaped, or ECHILD: it is not ours to wait for any more, so it is gone.
            return;
        }
    }
}

/// How often the wait for a detached delete asks `RTM_GETLINK` when no notification says
/// the device went. Rarely needed: a notification normally comes within a millisecond, and
/// the query would wait for RTNL, which the child holds while it unregisters.
pub const CHECK_EVERY: Duration = Duration::from_millis(20);

enum Seen {
    Deleted,
    /// The socket overran (`ENOBUFS`): notifications were dropped.
    Lost,
    Nothing,
}

/// Reads every queued message on a subscribed socket, looking for the `RTM_DELLINK` of
/// `ifindex`.
fn drain(fd: &OwnedFd, ifindex: u32, buf: &mut [u8]) -> Seen {
    let mut seen = Seen::Nothing;
    loop {
        // SAFETY: buf is a live, writable buffer of the given length.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::ENOBUFS) => {
                    if !matches!(seen, Seen::Deleted) {
                        seen = Seen::Lost;
                    }
                    continue;
                }
                Some(libc::EINTR) => continue,
                _ => return seen,
            }
        }
        if dellink_seen(&buf[..n as usize], ifindex) {
            seen = Seen::Deleted;
        }
    }
}

/// Whether `buf` holds an `RTM_DELLINK` notification of `ifindex`.
pub fn dellink_seen(buf: &[u8], ifindex: u32) -> bool {
    let mut off = 0;
    while off + LINK_MSG_LEN <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
        if len < NLMSG_HDRLEN {
            return false;
        }
        let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        let at = off + NLMSG_HDRLEN + 4;
        let index = i32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes"));
        if kind == libc::RTM_DELLINK && index == ifindex as i32 {
            return true;
        }
        off = match off.checked_add((len + 3) & !3) {
            Some(o) => o,
            None => return false,
        };
    }
    false
}

/// Subscribes to the link notifications of the socket's namespace (`RTMGRP_LINK`). `bind`
/// also gives the socket a port: the kernel skips unbound sockets (port 0) when it multicasts
/// a notification that names no port to exclude.
fn subscribe_links(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: sockaddr_nl is plain data; all-zero is valid.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr.nl_groups = 1 << (libc::RTNLGRP_LINK - 1);
    // SAFETY: addr outlives the call, and its size is passed.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The forked child: keeps only the netlink socket (as fd 3), leaves the session, sends the
/// prepared request, reads the ACK and exits: 0 on an ACK, 1 when setting itself up failed, 2
/// when sending failed or the reply was no ACK. Whatever is not 0 makes the plugin delete the
/// link itself.
///
/// # Safety
///
/// Only in a child just returned from `fork`. Everything here is a raw, async-signal-safe
/// syscall or pure code on the stack.
unsafe fn child(sock: RawFd, msg: &[u8; LINK_MSG_LEN], max_fd: i32) -> ! {
    // SAFETY: raw syscalls on descriptors of this process; the caller guarantees the context.
    unsafe {
        if sock != 3 && libc::dup2(sock, 3) != 3 {
            libc::_exit(1);
        }
        // close's result is not waited on: Linux releases the descriptor whatever it returns
        // (EBADF: it was not open), so no outcome leaves a pipe of the runtime held here.
        for fd in 0..3 {
            libc::close(fd);
        }
        if libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32) != 0 {
            for fd in 4..max_fd {
                libc::close(fd);
            }
        }
        // Only a process group leader cannot leave: a forked child never is one, so a failure
        // means something unforeseen, and the plugin does the delete instead.
        if libc::setsid() < 0 {
            libc::_exit(1);
        }
        let sent = libc::send(3, msg.as_ptr().cast(), msg.len(), 0);
        if sent != msg.len() as isize {
            libc::_exit(2);
        }
        let mut buf = [0u8; 512];
        let n = libc::recv(3, buf.as_mut_ptr().cast(), buf.len(), 0);
        if n < 0 {
            libc::_exit(2);
        }
        let code = match parse_reply(&buf[..n as usize], CHILD_SEQ) {
            Some(Reply::Errno(0)) => 0,
            _ => 2,
        };
        libc::_exit(code)
    }
}

/// One past the highest descriptor the child may have to close when `close_range` is missing
/// (kernels before 5.9).
fn max_fd() -> i32 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_OPEN_MAX) };
    if n <= 0 {
        1024
    } else {
        n.min(1 << 16) as i32
    }
}

/// `n` NETLINK_ROUTE sockets in `netns` (the plugin's own when `None`), opened by this
/// thread, switched there and back (no thread is started: the fork below wants none).
fn open_sockets(netns: Option<&Netns>, n: usize) -> io::Result<Vec<OwnedFd>> {
    let open = || {
        (0..n)
            .map(|_| route_socket())
            .collect::<io::Result<Vec<_>>>()
    };
    match netns {
        None => open(),
        Some(ns) => crate::host::real::run_here(ns, open)?,
    }
}

fn route_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket has no preconditions; a non-negative result is a descriptor we own.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // A reply never comes late, but a bound keeps a lost one from hanging DEL.
    let tv = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: tv outlives the call, and its size is passed.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Sends `msg` (whose sequence number is `seq`) and reads until the reply to it.
fn request(fd: &OwnedFd, msg: &[u8], seq: u32) -> io::Result<Reply> {
    // SAFETY: msg is a live buffer of the given length.
    let sent = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    // A full RTM_NEWLINK (stats, per-CPU data, …) fits easily.
    let mut buf = vec![0u8; 32 << 10];
    loop {
        // SAFETY: buf is a live, writable buffer of the given length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if let Some(r) = parse_reply(&buf[..n as usize], seq) {
            return Ok(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn dellink_by_index_is_an_acked_request() {
        let m = dellink_msg(0x1234, 7);
        assert_eq!(word(&m, 0), 32, "length covers nlmsghdr + ifinfomsg");
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), 17, "RTM_DELLINK");
        assert_eq!(u16::from_ne_bytes([m[6], m[7]]), 0x1 | 0x4, "REQUEST | ACK");
        assert_eq!(word(&m, 8), 7, "sequence");
        assert_eq!(word(&m, 12), 0, "port: the kernel's");
        assert_eq!(m[16], 0, "family AF_UNSPEC");
        assert_eq!(word(&m, 20), 0x1234, "ifi_index");
        assert_eq!(&m[24..32], &[0; 8], "flags and change untouched");
    }

    #[test]
    fn getlink_asks_without_ack() {
        let m = getlink_msg(5, 9);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), 18, "RTM_GETLINK");
        assert_eq!(u16::from_ne_bytes([m[6], m[7]]), 0x1, "REQUEST only");
        assert_eq!(word(&m, 20), 5);
    }

    #[test]
    fn a_dellink_notification_is_found_by_index() {
        let mut ifinfo = [0u8; 16];
        ifinfo[4..8].copy_from_slice(&42i32.to_ne_bytes());
        // A NEWLINK of 42 (a state change), then the DELLINK of 7, then the DELLINK of 42.
        let mut buf = msg(libc::RTM_NEWLINK, 0, &ifinfo);
        let mut other = ifinfo;
        other[4..8].copy_from_slice(&7i32.to_ne_bytes());
        buf.extend(msg(libc::RTM_DELLINK, 1, &other));
        assert!(!dellink_seen(&buf, 42));
        assert!(dellink_seen(&buf, 7));
        buf.extend(msg(libc::RTM_DELLINK, 0, &ifinfo));
        assert!(dellink_seen(&buf, 42));
        assert!(!dellink_seen(&buf[..40], 42), "cut short");
        assert!(!dellink_seen(&[0xff; 64], 42));
    }

    fn msg(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDRLEN + payload.len();
        let mut v = Vec::new();
        v.extend_from_slice(&(len as u32).to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(&0u16.to_ne_bytes());
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.extend_from_slice(payload);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    fn error(seq: u32, errno: i32) -> Vec<u8> {
        let mut p = (-errno).to_ne_bytes().to_vec();
        // The request's header comes back after the code.
        p.extend_from_slice(&getlink_msg(1, seq)[..NLMSG_HDRLEN]);
        msg(NLMSG_ERROR, seq, &p)
    }

    #[test]
    fn replies_are_matched_by_sequence() {
        assert_eq!(parse_reply(&error(3, 0), 3), Some(Reply::Errno(0)));
        assert_eq!(
            parse_reply(&error(3, libc::ENODEV), 3),
            Some(Reply::Errno(libc::ENODEV))
        );
        assert_eq!(
            parse_reply(&msg(libc::RTM_NEWLINK, 4, &[0; 19]), 4),
            Some(Reply::Link)
        );
        // A stale reply first, then ours, in one read.
        let mut two = error(2, libc::EPERM);
        two.extend(msg(libc::RTM_NEWLINK, 5, &[0; 16]));
        assert_eq!(parse_reply(&two, 5), Some(Reply::Link));
        assert_eq!(parse_reply(&two, 6), None);
        // A reply cut short still counts; garbage is no reply, never a panic.
        assert_eq!(parse_reply(&two[..20], 2), Some(Reply::Errno(libc::EPERM)));
        assert_eq!(parse_reply(&two[..19], 2), None);
        let newlink = msg(libc::RTM_NEWLINK, 8, &[0; 2000]);
        assert_eq!(parse_reply(&newlink[..100], 8), Some(Reply::Link));
        assert_eq!(parse_reply(&[0xff; 40], 1), None);
        assert_eq!(parse_reply(&[], 1), None);
    }
}
