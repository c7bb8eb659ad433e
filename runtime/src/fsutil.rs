//! Small filesystem helpers over libc: xattrs, lchown, times, device numbers, atomic writes.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::syscall::cstr;

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub fn lsetxattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let p = cstr(path)?;
    let n = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: valid C strings and a buffer of the given length.
    check(unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr() as *const libc::c_void,
            value.len(),
            0,
        )
    })
}

pub fn lgetxattr(path: &Path, name: &str) -> io::Result<Option<Vec<u8>>> {
    let p = cstr(path)?;
    let n = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: buffer pointer/len describe `buf`.
        let r = unsafe {
            libc::lgetxattr(
                p.as_ptr(),
                n.as_ptr(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
            )
        };
        if r >= 0 {
            buf.truncate(r as usize);
            return Ok(Some(buf));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::ENOTSUP) => return Ok(None),
            Some(libc::ERANGE) => buf.resize(buf.len() * 4, 0),
            _ => return Err(e),
        }
    }
}

pub fn llistxattr(path: &Path) -> io::Result<Vec<String>> {
    let p = cstr(path)?;
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: buffer pointer/len describe `buf`.
        let r = unsafe {
            libc::llistxattr(p.as_ptr(), buf.as_mut_ptr() as *mut libc::c_char, buf.len())
        };
        if r >= 0 {
            buf.truncate(r as usize);
            return Ok(buf
                .split(|b| *b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOTSUP) => return Ok(vec![]),
            Some(libc::ERANGE) => buf.resize(buf.len() * 4, 0),
            _ => return Err(e),
        }
    }
}

pub fn lchown(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let p = cstr(path)?;
    // SAFETY: valid C string.
    check(unsafe { libc::lchown(p.as_ptr(), uid, gid) })
}

/// Sets atime and mtime (seconds) without following a final symlink.
pub fn set_mtime(path: &Path, mtime: i64) -> io::Result<()> {
    let p = cstr(path)?;
    let ts = libc::timespec {
        tv_sec: mtime as libc::time_t,
        tv_nsec: 0,
    };
    let times = [ts, ts];
    // SAFETY: valid C string and two timespecs.
    check(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            p.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

pub fn mknod(path: &Path, mode: u32, major: u32, minor: u32) -> io::Result<()> {
    let p = cstr(path)?;
    let dev = libc::makedev(major, minor);
    // SAFETY: valid C string.
    check(unsafe { libc::mknod(p.as_ptr(), mode as libc::mode_t, dev) })
}

pub fn dev_major(dev: u64) -> u32 {
    libc::major(dev as libc::dev_t)
}

pub fn dev_minor(dev: u64) -> u32 {
    libc::minor(dev as libc::dev_t)
}

/// Writes `data` to `path` atomically and durably, readable by root only: a temporary file
/// in the same directory (mode 0600 from its creation), fsync, rename over `path`, fsync of the
/// directory so the rename itself survives a crash. Readers see the old content or the new,
/// never a torn file, and a crash never leaves an empty one.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    replace(path, data, true, 0o600)
}

/// [`write_atomic`] without the two fsyncs: readers still see the old content or the new,
/// never a torn file, but after a host crash the file may be missing or empty. Only for
/// records whose loss a crash makes harmless: see `state::write_process_record`.
pub fn write_atomic_volatile(path: &Path, data: &[u8]) -> io::Result<()> {
    replace(path, data, false, 0o600)
}

/// [`write_atomic_volatile`] for a file the container reads through a read-only bind mount
/// (the rendered `/proc` views): mode 0444 from its creation, like the `/proc` files it
/// stands for, because processes of any uid in the container read it and under `--userns`
/// even the container's root is not host root. Privacy comes from the 0700 directory it is
/// created in; it holds nothing that the container cannot read anyway.
pub fn write_atomic_view(path: &Path, data: &[u8]) -> io::Result<()> {
    replace(path, data, false, 0o444)
}

fn replace(path: &Path, data: &[u8], durable: bool, mode: u32) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!(
        ".{}.tmp{}-{}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id(),
        random_hex(4)
    ));
    let r = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        // The umask may have taken bits away from `mode`: a view must be readable by all.
        if mode & !0o600 != 0 {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        f.write_all(data)?;
        if durable {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r?;
    if durable {
        sync_dir(dir)?;
    }
    Ok(())
}

/// fsync of a directory: makes the entries created, renamed or removed in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Creates `path` (and missing parents) and makes it 0700: tweed's state and image
/// directories hold container environments, logs and images, for root only.
pub fn create_private_dir(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path)?;
    let m = std::fs::symlink_metadata(path)?;
    if !m.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "exists and is not a directory",
        ));
    }
    if m.permissions().mode() & 0o7777 != 0o700 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// An exclusive `flock` on a lock file, held until dropped: serializes a choice with the write
/// that records it across `tweedctl` processes. The file is created 0600 and never removed
/// (removing a lock file lets a late opener lock an inode nobody else sees). flock rather than
/// fcntl locks: a flock belongs to the open file, so closing some other descriptor of the same
/// file elsewhere in the process does not drop it.
#[derive(Debug)]
pub struct FileLock {
    file: std::fs::File,
}

impl FileLock {
    /// Blocks until the lock is ours.
    pub fn acquire(path: &Path) -> io::Result<FileLock> {
        let file = open_lock_file(path)?;
        loop {
            // SAFETY: flock only takes the fd, which `file` keeps open.
            if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) } == 0 {
                return Ok(FileLock { file });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// The lock if nobody holds it, `None` if somebody does.
    pub fn try_acquire(path: &Path) -> io::Result<Option<FileLock>> {
        let file = open_lock_file(path)?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        // SAFETY: flock only takes the fd, which `file` keeps open.
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(Some(FileLock { file }));
        }
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            Ok(None)
        } else {
            Err(e)
        }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // Closing the file would release it too; unlocking first says so explicitly and holds
        // even if a forked child still shares the open file.
        // SAFETY: flock only takes the fd, which `self.file` keeps open.
        unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&self.file), libc::LOCK_UN) };
    }
}

fn open_lock_file(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Removes a directory tree; missing is fine.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether `path` is a mount point (its device differs from its parent's, or it is `/`).
pub fn is_mount_point(path: &Path) -> bool {
    let me = std::fs::symlink_metadata(path);
    let parent = path.parent().map(std::fs::symlink_metadata);
    use std::os::unix::fs::MetadataExt;
    match (me, parent) {
        (Ok(m), Some(Ok(p))) => m.dev() != p.dev() || m.ino() == p.ino(),
        _ => false,
    }
}

/// A path as bytes for messages.
pub fn show(p: &Path) -> String {
    String::from_utf8_lossy(p.as_os_str().as_bytes()).into_owned()
}

/// Random hex string of `n` bytes (from the OS).
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::fill(&mut b[..]);
    crate::digest::hex(&b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// The writers differ only in fsync and the mode: the same file results.
    #[test]
    fn atomic_writes_are_private_and_replace_whole() {
        type Write = fn(&Path, &[u8]) -> io::Result<()>;
        for (name, write, want) in [
            ("durable", write_atomic as Write, 0o600),
            ("volatile", write_atomic_volatile as Write, 0o600),
            // The /proc views: readable by every uid of the container, writable by nobody
            // but root.
            ("view", write_atomic_view as Write, 0o444),
        ] {
            let t = tempfile::tempdir().unwrap();
            let p = t.path().join("state.json");
            write(&p, b"one").unwrap();
            write(&p, b"two").unwrap();
            assert_eq!(std::fs::read(&p).unwrap(), b"two", "{name}");
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, want, "{name}");
            // No temporary file is left behind.
            assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 1, "{name}");
            // A symlink planted at the target's place is never followed: rename replaces the
            // link, its target stays untouched.
            let outside = t.path().join("outside");
            std::fs::write(&outside, b"keep").unwrap();
            std::os::unix::fs::symlink(&outside, t.path().join("link.json")).unwrap();
            write(&t.path().join("link.json"), b"new").unwrap();
            assert_eq!(std::fs::read(&outside).unwrap(), b"keep", "{name}");
            // A write into a missing directory fails and leaves nothing.
            assert!(write(&t.path().join("no/such"), b"x").is_err(), "{name}");
        }
    }

    #[test]
    fn private_dirs_are_0700_even_when_they_existed() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        create_private_dir(&d).unwrap();
        assert_eq!(
            std::fs::metadata(&d).unwrap().permissions().mode() & 0o7777,
            0o700
        );
        std::fs::write(t.path().join("f"), "").unwrap();
        assert!(create_private_dir(&t.path().join("f")).is_err());
    }

    #[test]
    fn a_file_lock_excludes_other_holders_until_dropped() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("x.lock");
        let held = FileLock::acquire(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A second open file is a second holder, even in this process: it is refused.
        assert!(FileLock::try_acquire(&p).unwrap().is_none());
        drop(held);
        let again = FileLock::try_acquire(&p).unwrap().expect("free after drop");
        assert!(FileLock::try_acquire(&p).unwrap().is_none());
        drop(again);
        // A symlink planted at the path is not followed.
        let l = t.path().join("link.lock");
        std::os::unix::fs::symlink(&p, &l).unwrap();
        assert!(FileLock::acquire(&l).is_err());
    }

    #[test]
    fn a_blocked_acquire_gets_the_lock_only_after_the_holder_lets_go() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("x.lock");
        let held = FileLock::acquire(&p).unwrap();
        let released = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let (p, released) = (p.clone(), released.clone());
            std::thread::spawn(move || {
                tx.send(()).unwrap();
                let _l = FileLock::acquire(&p).unwrap();
                // Ordering, not timing: the waiter must only get here after the release.
                released.load(Ordering::SeqCst)
            })
        };
        rx.recv().unwrap();
        // Room for a broken lock to let the waiter through early; the verdict is the order
        // above, whatever the scheduling.
        std::thread::sleep(std::time::Duration::from_millis(50));
        released.store(true, Ordering::SeqCst);
        drop(held);
        assert!(waiter.join().unwrap(), "acquired while still held");
    }
}

/// Name prefix of a container's layer directory set aside for removal ([`set_aside`]).
/// Container ids are hex, so no live directory starts with it.
pub const GONE_PREFIX: &str = ".gone.";

/// Takes a container's layer directory out of use in one rename (`<parent>/<name>` becomes
/// `<parent>/.gone.<name>`) so that its removal, a dozen rmdirs each waiting for the file
/// system's journal, can happen after `rm` has returned ([`sweep_detached`]). Returns whether
/// there was anything to set aside. A crash after the rename leaves a `.gone.` entry that the
/// next sweep of the same directory removes.
pub fn set_aside(path: &Path) -> io::Result<bool> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    let mut gone = std::ffi::OsString::from(GONE_PREFIX);
    gone.push(name);
    let to = parent.join(gone);
    // A leftover of the same name (a crash between rename and sweep, the id reused) first.
    remove_tree(&to)?;
    match std::fs::rename(path, &to) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// The pid of the last sweeper this process started, reaped at the next start so that a
/// long-lived caller keeps at most one zombie.
static LAST_SWEEPER: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Removes every `.gone.` entry of `dir` in a detached child process (its own session, stdio
/// on /dev/null, nice 10), this call's and any a crash left behind. The child allocates
/// nothing and takes no lock, so the caller may be multi-threaded.
pub fn sweep_detached(dir: &Path) -> io::Result<()> {
    let d = cstr(dir)?;
    let null = CString::new("/dev/null").expect("no NUL");
    let last = LAST_SWEEPER.swap(0, std::sync::atomic::Ordering::Relaxed);
    if last > 0 {
        // SAFETY: non-blocking wait for our own earlier child.
        unsafe { libc::waitpid(last, std::ptr::null_mut(), libc::WNOHANG) };
    }
    // SAFETY: the child only makes async-signal-safe system calls on memory prepared before
    // the fork (the two C strings) or on its stack, then _exits.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => unsafe {
            libc::setsid();
            let fd = libc::open(null.as_ptr(), libc::O_RDWR);
            if fd >= 0 {
                libc::dup2(fd, 0);
                libc::dup2(fd, 1);
                libc::dup2(fd, 2);
            }
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            libc::nice(10);
            let parent = libc::open(
                d.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            );
            if parent >= 0 {
                remove_gone_entries(parent);
            }
            libc::_exit(0)
        },
        pid => {
            LAST_SWEEPER.store(pid, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }
    }
}

/// One `getdents64` record: (name with its NUL, is a directory or of unknown type, next offset).
fn dirent_at(buf: &[u8], off: usize) -> (&[u8], bool, usize) {
    // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
    let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
    let dtype = buf[off + 18];
    let raw = &buf[off + 19..off + reclen];
    let len = raw
        .iter()
        .position(|&b| b == 0)
        .map_or(raw.len(), |p| p + 1);
    let dirish = dtype == libc::DT_DIR || dtype == libc::DT_UNKNOWN;
    (&raw[..len], dirish, off + reclen)
}

fn is_dot(name: &[u8]) -> bool {
    name == b".\0" || name == b"..\0"
}

/// Removes the `.gone.` entries of the directory open as `parent`; allocation-free.
fn remove_gone_entries(parent: libc::c_int) {
    let mut buf = [0u8; 4096];
    loop {
        let mut found = false;
        // SAFETY: lseek/getdents64 on our fd into our buffer.
        unsafe { libc::lseek(parent, 0, libc::SEEK_SET) };
        loop {
            let n =
                unsafe { libc::syscall(libc::SYS_getdents64, parent, buf.as_mut_ptr(), buf.len()) };
            if n <= 0 {
                break;
            }
            let mut off = 0;
            while off < n as usize {
                let (name, _, next) = dirent_at(&buf, off);
                off = next;
                if name.starts_with(GONE_PREFIX.as_bytes()) {
                    // SAFETY: `name` is NUL-terminated (dirent_at keeps the NUL).
                    let ok =
                        unsafe { remove_tree_at(parent, name.as_ptr() as *const libc::c_char) };
                    found |= ok;
                }
            }
        }
        // Entries removed while reading may hide others: read again until a pass removes none.
        if !found {
            return;
        }
    }
}

/// Removes the directory `name` of `parent` and everything below it, in O(1) memory: it
/// descends into a subdirectory that is not empty, and climbs back through `..` once a
/// directory is empty, until the top is empty. Gives up (returns false) when a pass over a
/// directory removes nothing and finds nowhere to descend (an entry it may not remove).
///
/// # Safety
///
/// `name` must be a NUL-terminated string.
unsafe fn remove_tree_at(parent: libc::c_int, name: *const libc::c_char) -> bool {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY (whole body): system calls on our own fds, our buffer and NUL-terminated names.
    unsafe {
        if libc::unlinkat(parent, name, 0) == 0
            || libc::unlinkat(parent, name, libc::AT_REMOVEDIR) == 0
        {
            return true;
        }
        let top = libc::openat(parent, name, flags);
        if top < 0 {
            return false;
        }
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(top, &mut st);
        let top_id = (st.st_dev, st.st_ino);
        let mut cur = top;
        let mut buf = [0u8; 4096];
        let mut budget: u64 = 10_000_000;
        'dir: loop {
            budget -= 1;
            if budget == 0 {
                libc::close(cur);
                return false;
            }
            libc::lseek(cur, 0, libc::SEEK_SET);
            let mut progress = false;
            loop {
                let n = libc::syscall(libc::SYS_getdents64, cur, buf.as_mut_ptr(), buf.len());
                if n <= 0 {
                    break;
                }
                let mut off = 0;
                while off < n as usize {
                    let (e, dirish, next) = dirent_at(&buf, off);
                    off = next;
                    if is_dot(e) {
                        continue;
                    }
                    let e = e.as_ptr() as *const libc::c_char;
                    if libc::unlinkat(cur, e, if dirish { libc::AT_REMOVEDIR } else { 0 }) == 0
                        || libc::unlinkat(cur, e, if dirish { 0 } else { libc::AT_REMOVEDIR }) == 0
                    {
                        progress = true;
                        continue;
                    }
                    let sub = libc::openat(cur, e, flags);
                    if sub >= 0 {
                        libc::close(cur);
                        cur = sub;
                        continue 'dir;
                    }
                }
            }
            if progress {
                continue 'dir;
            }
            // A pass removed nothing: the directory is empty, or holds what we may not remove.
            libc::fstat(cur, &mut st);
            let empty_reread = {
                libc::lseek(cur, 0, libc::SEEK_SET);
                let n = libc::syscall(libc::SYS_getdents64, cur, buf.as_mut_ptr(), buf.len());
                let mut off = 0;
                let mut only_dots = true;
                while n > 0 && off < n as usize {
                    let (e, _, next) = dirent_at(&buf, off);
                    off = next;
                    only_dots &= is_dot(e);
                }
                only_dots
            };
            if !empty_reread {
                libc::close(cur);
                return false;
            }
            if (st.st_dev, st.st_ino) == top_id {
                libc::close(cur);
                return libc::unlinkat(parent, name, libc::AT_REMOVEDIR) == 0;
            }
            let up = libc::openat(cur, c"..".as_ptr(), flags);
            libc::close(cur);
            if up < 0 {
                return false;
            }
            cur = up;
        }
    }
}

#[cfg(test)]
mod gone_tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A layer directory set aside is gone from its path at once; the detached sweep removes
    /// it (deep, with files, symlinks and an empty dir) and a leftover of an earlier crash,
    /// and leaves the other entries and what a symlink points to alone.
    #[test]
    fn set_aside_then_sweep_removes_this_and_earlier_leftovers_only() {
        let t = tempfile::tempdir().unwrap();
        let containers = t.path().join("containers");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"x").unwrap();
        let c = containers.join("abc");
        let mut deep = c.join("upper");
        for i in 0..200 {
            deep = deep.join(format!("d{i}"));
        }
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(deep.join("f"), b"x").unwrap();
        std::fs::create_dir_all(c.join("work/work/incompat/volatile")).unwrap();
        for i in 0..300 {
            std::fs::write(c.join(format!("upper/file{i}")), b"x").unwrap();
        }
        symlink(&outside, c.join("upper/link")).unwrap();
        let crashed = containers.join(format!("{GONE_PREFIX}old"));
        std::fs::create_dir_all(crashed.join("upper/x")).unwrap();
        std::fs::create_dir_all(containers.join("live")).unwrap();

        assert!(set_aside(&c).unwrap());
        assert!(!c.exists());
        assert!(!set_aside(&c).unwrap(), "nothing left to set aside");
        sweep_detached(&containers).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let left: Vec<_> = std::fs::read_dir(&containers)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            if left == [std::ffi::OsString::from("live")] {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "left: {left:?}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(outside.join("keep").exists());
    }
}
