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
    replace(path, data, true)
}

/// [`write_atomic`] without the two fsyncs: readers still see the old content or the new,
/// never a torn file, but after a host crash the file may be missing or empty. Only for
/// records whose loss a crash makes harmless: see `state::write_process_record`.
pub fn write_atomic_volatile(path: &Path, data: &[u8]) -> io::Result<()> {
    replace(path, data, false)
}

fn replace(path: &Path, data: &[u8], durable: bool) -> io::Result<()> {
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
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
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

    /// Both writers, durable and volatile, differ only in fsync: the same file results.
    #[test]
    fn atomic_writes_are_private_and_replace_whole() {
        type Write = fn(&Path, &[u8]) -> io::Result<()>;
        for (name, write) in [
            ("durable", write_atomic as Write),
            ("volatile", write_atomic_volatile as Write),
        ] {
            let t = tempfile::tempdir().unwrap();
            let p = t.path().join("state.json");
            write(&p, b"one").unwrap();
            write(&p, b"two").unwrap();
            assert_eq!(std::fs::read(&p).unwrap(), b"two", "{name}");
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{name}");
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
