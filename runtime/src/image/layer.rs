//! The one tar extractor tweed has, for image layers and for the image archives that carry them
//! (docker-save and oci-archive tarballs): nothing it writes can land outside the destination
//! directory, and nothing it unpacks can grow past the configured limits.
//!
//! Layers ([`Mode::Layer`]) become overlay lower dirs: OCI whiteouts become overlay whiteouts,
//! modes, owners, xattrs, hardlinks and device nodes are kept. Archives ([`Mode::Archive`]) only
//! ever hold files, directories and links between them: device nodes, fifos and symlinks that
//! point outside are refused, owners and xattrs are not applied, whiteouts mean nothing.
//!
//! Whatever the mode: entries with absolute paths or `..` are refused, no entry is written
//! through a symlink (every parent must be a real directory, the last component is opened with
//! `O_NOFOLLOW` after clearing whatever was there), and hardlinks must name an entry already in
//! the tree through real directories.

use std::cell::Cell;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use crate::digest::{Digest, HashingReader};
use crate::fsutil;

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("entry {0:?} has an absolute path: refused")]
    AbsolutePath(String),
    #[error("entry {0:?} contains '..': refused")]
    DotDot(String),
    #[error(
        "entry {entry:?} would be written through the symlink {via:?} (a symlink escape): refused"
    )]
    SymlinkEscape { entry: String, via: String },
    #[error("entry {entry:?}: symlink target {target:?} leaves the archive: refused")]
    SymlinkOut { entry: String, target: String },
    #[error("entry {entry:?}: hardlink target {target:?} escapes the layer: refused")]
    HardlinkEscape { entry: String, target: String },
    #[error("entry {entry:?}: hardlink target {target:?} is not in this layer")]
    HardlinkMissing { entry: String, target: String },
    #[error("entry {entry:?}: {via:?} is not a directory")]
    NotADirectory { entry: String, via: String },
    #[error("entry {entry:?} has unsupported type {kind}")]
    Unsupported { entry: String, kind: String },
    #[error("entry {entry:?} is a {kind}: refused (an image archive holds only files, directories and links)")]
    SpecialInArchive { entry: String, kind: String },
    #[error("entry {0:?} is a whiteout of '.' or '..': refused")]
    WhiteoutDot(String),
    #[error(
        "entry {entry:?}: unpacking exceeds the limit of {limit} bytes (--max-unpacked): refused"
    )]
    TooLarge { entry: String, limit: u64 },
    #[error("entry {entry:?}: the archive has more than {limit} entries (--max-entries): refused")]
    TooManyEntries { entry: String, limit: u64 },
    #[error("reading the tar: {0}")]
    Tar(io::Error),
    #[error("extracting {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Bounds on what one archive may unpack to (tar bombs, gzip bombs, inode exhaustion).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of one uncompressed tar stream, and of the file contents written from it.
    pub max_unpacked: u64,
    /// Entries of one tar stream.
    pub max_entries: u64,
}

impl Limits {
    /// Generous: the largest public images are a few GiB and a few hundred thousand files.
    pub const DEFAULT_MAX_UNPACKED: u64 = 64 << 30;
    pub const DEFAULT_MAX_ENTRIES: u64 = 4_000_000;
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_unpacked: Limits::DEFAULT_MAX_UNPACKED,
            max_entries: Limits::DEFAULT_MAX_ENTRIES,
        }
    }
}

/// What is being extracted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// An image layer: becomes an overlay lower dir.
    Layer,
    /// An image archive (docker-save, oci-archive): a temporary tree of blobs and metadata.
    Archive,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LayerError + '_ {
    move |source| LayerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A tar entry's path made relative and checked: `None` for the layer root itself.
pub fn clean_path(raw: &Path) -> Result<Option<PathBuf>, LayerError> {
    let show = || fsutil::show(raw);
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => {
                return Err(LayerError::AbsolutePath(show()))
            }
            Component::ParentDir => return Err(LayerError::DotDot(show())),
            Component::CurDir => {}
            Component::Normal(n) => out.push(n),
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// OCI whiteout prefix.
pub const WH_PREFIX: &str = ".wh.";
/// OCI opaque-directory marker.
pub const WH_OPAQUE: &str = ".wh..wh..opq";

/// What a layer entry means.
#[derive(Debug, PartialEq, Eq)]
pub enum Kind {
    /// Put this entry in the layer.
    Normal,
    /// `dir/.wh.NAME`: hide `dir/NAME` of lower layers.
    Whiteout(PathBuf),
    /// `dir/.wh..wh..opq`: hide everything of lower layers under `dir`.
    Opaque(PathBuf),
    /// Other `.wh..wh.` metadata (aufs hardlink dirs), or a bare `.wh.`: ignored.
    Skip,
    /// `.wh..` or `.wh...`: would hide the directory itself or its parent (outside the layer).
    WhiteoutDot,
}

pub fn classify(rel: &Path) -> Kind {
    let name = rel
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let parent = rel.parent().map(Path::to_path_buf).unwrap_or_default();
    if name == WH_OPAQUE {
        Kind::Opaque(parent)
    } else if name.starts_with(".wh..wh.") {
        Kind::Skip
    } else if let Some(hidden) = name.strip_prefix(WH_PREFIX) {
        if hidden.is_empty() {
            Kind::Skip
        } else if hidden == "." || hidden == ".." {
            Kind::WhiteoutDot
        } else {
            Kind::Whiteout(parent.join(hidden))
        }
    } else {
        Kind::Normal
    }
}

/// Makes sure every ancestor of `rel` under `root` is a real directory (creating missing ones),
/// refusing symlinks on the way.
pub fn ensure_parents(root: &Path, rel: &Path, entry: &str) -> Result<(), LayerError> {
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    let mut cur = root.to_path_buf();
    for c in parent.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(LayerError::SymlinkEscape {
                    entry: entry.to_string(),
                    via: fsutil::show(cur.strip_prefix(root).unwrap_or(&cur)),
                })
            }
            Ok(_) => {
                return Err(LayerError::NotADirectory {
                    entry: entry.to_string(),
                    via: fsutil::show(cur.strip_prefix(root).unwrap_or(&cur)),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&cur).map_err(io_err(&cur))?;
                fs::set_permissions(&cur, fs::Permissions::from_mode(0o755))
                    .map_err(io_err(&cur))?;
            }
            Err(e) => return Err(io_err(&cur)(e)),
        }
    }
    Ok(())
}

/// Like [`ensure_parents`] but creates nothing: every ancestor must exist as a directory.
fn check_parents(root: &Path, rel: &Path, entry: &str, target: &str) -> Result<(), LayerError> {
    let mut cur = root.to_path_buf();
    if let Some(parent) = rel.parent() {
        for c in parent.components() {
            cur.push(c);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(LayerError::HardlinkEscape {
                        entry: entry.to_string(),
                        target: target.to_string(),
                    })
                }
                _ => {
                    return Err(LayerError::HardlinkMissing {
                        entry: entry.to_string(),
                        target: target.to_string(),
                    })
                }
            }
        }
    }
    Ok(())
}

/// Removes whatever is at `path` unless it is a directory and `keep_dir` (a directory entry
/// repeated, or re-described, in the same layer keeps its children).
fn clear(path: &Path, keep_dir: bool) -> Result<(), LayerError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            if !keep_dir {
                fs::remove_dir_all(path).map_err(io_err(path))?;
            }
        }
        Ok(_) => fs::remove_file(path).map_err(io_err(path))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(path)(e)),
    }
    Ok(())
}

/// Counts of what a layer held.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub entries: u64,
    pub whiteouts: u64,
    pub opaque_dirs: u64,
    pub hardlinks: u64,
    pub devices: u64,
}

/// The overlay whiteout: a character device 0/0.
pub fn make_whiteout(path: &Path) -> io::Result<()> {
    fsutil::mknod(path, libc::S_IFCHR, 0, 0)
}

pub const OVERLAY_OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Counts the bytes read through it and fails once they pass `limit`; `tripped` tells the
/// extractor that an I/O error from the tar crate was this limit.
struct Limited<R> {
    inner: R,
    left: u64,
    tripped: Rc<Cell<bool>>,
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            self.tripped.set(true);
            return Err(io::Error::other("the unpack limit is exceeded"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Extracts a tar stream (already decompressed) into `dest`, an existing empty directory, and
/// returns what it held and the sha256 of the whole stream (the diff id, for a layer). The
/// stream is read to its end so the digest covers all of it; that too is bounded by `limits`.
pub fn extract(
    reader: impl Read,
    dest: &Path,
    mode: Mode,
    limits: &Limits,
) -> Result<(Summary, Digest), LayerError> {
    let tripped = Rc::new(Cell::new(false));
    let mut hr = HashingReader::new(Limited {
        inner: reader,
        // Headers and padding: a tar of N bytes of files is a little more than N bytes.
        left: limits
            .max_unpacked
            .saturating_add(limits.max_entries.saturating_mul(1024))
            .saturating_add(1 << 20),
        tripped: tripped.clone(),
    });
    let mut last_entry = String::new();
    let r = extract_entries(&mut hr, dest, mode, limits, &mut last_entry);
    let too_large = |last: &str| LayerError::TooLarge {
        entry: last.to_string(),
        limit: limits.max_unpacked,
    };
    let sum = match r {
        Err(_) if tripped.get() => return Err(too_large(&last_entry)),
        r => r?,
    };
    match hr.finish() {
        Ok((d, _)) => Ok((
            sum,
            Digest::parse(&d).expect("sha256 digests are well-formed"),
        )),
        Err(_) if tripped.get() => Err(too_large("(after the end of the archive)")),
        Err(e) => Err(LayerError::Tar(e)),
    }
}

/// Whether a symlink at `rel` pointing at `target` stays inside the tree, judged on the names
/// alone (the extractor never follows links, and archive readers canonicalize before trusting).
pub fn symlink_stays_inside(rel: &Path, target: &Path) -> bool {
    if target.has_root() {
        return false;
    }
    let mut depth: usize = rel.parent().map(|p| p.components().count()).unwrap_or(0);
    for c in target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return false,
            },
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

fn extract_entries<R: Read>(
    reader: R,
    dest: &Path,
    mode: Mode,
    limits: &Limits,
    last_entry: &mut String,
) -> Result<Summary, LayerError> {
    let mut ar = tar::Archive::new(reader);
    let mut sum = Summary::default();
    let mut written: u64 = 0;
    // Directories' mtimes are set last: creating children changes them.
    let mut dir_times: Vec<(PathBuf, i64)> = Vec::new();
    for e in ar.entries().map_err(LayerError::Tar)? {
        let mut e = e.map_err(LayerError::Tar)?;
        sum.entries += 1;
        let raw = e.path().map_err(LayerError::Tar)?.into_owned();
        let entry = fsutil::show(&raw);
        last_entry.clone_from(&entry);
        if sum.entries > limits.max_entries {
            return Err(LayerError::TooManyEntries {
                entry,
                limit: limits.max_entries,
            });
        }
        let layer = mode == Mode::Layer;
        let mut xattrs: Vec<(String, Vec<u8>)> = Vec::new();
        let mut pax_uid = None;
        let mut pax_gid = None;
        let mut pax_mtime = None;
        if let Some(exts) = e.pax_extensions().map_err(LayerError::Tar)? {
            for ext in exts {
                let ext = ext.map_err(LayerError::Tar)?;
                let Ok(key) = ext.key() else { continue };
                if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                    xattrs.push((name.to_string(), ext.value_bytes().to_vec()));
                } else if key == "uid" {
                    pax_uid = ext.value().ok().and_then(|v| v.parse::<u32>().ok());
                } else if key == "gid" {
                    pax_gid = ext.value().ok().and_then(|v| v.parse::<u32>().ok());
                } else if key == "mtime" {
                    pax_mtime = ext
                        .value()
                        .ok()
                        .and_then(|v| v.split('.').next()?.parse::<i64>().ok());
                }
            }
        }
        let h = e.header();
        let kind_byte = h.entry_type();
        // Archive entries' owners, modes and times are never applied: not read either, since
        // archive writers are sloppy with them.
        let (mode, uid, gid, mtime) = if layer {
            (
                h.mode().map_err(LayerError::Tar)? & 0o7777,
                pax_uid.unwrap_or(h.uid().map_err(LayerError::Tar)? as u32),
                pax_gid.unwrap_or(h.gid().map_err(LayerError::Tar)? as u32),
                pax_mtime.unwrap_or(h.mtime().unwrap_or(0) as i64),
            )
        } else {
            (0o600, 0, 0, 0)
        };
        let link = e
            .link_name()
            .map_err(LayerError::Tar)?
            .map(|l| l.into_owned());
        let (major, minor) = (
            h.device_major().ok().flatten().unwrap_or(0),
            h.device_minor().ok().flatten().unwrap_or(0),
        );

        let rel = match clean_path(&raw)? {
            Some(r) => r,
            None => {
                // The layer root ("./"): take its metadata.
                if layer && kind_byte.is_dir() {
                    fsutil::lchown(dest, uid, gid).map_err(io_err(dest))?;
                    fs::set_permissions(dest, fs::Permissions::from_mode(mode))
                        .map_err(io_err(dest))?;
                    for (k, v) in &xattrs {
                        fsutil::lsetxattr(dest, k, v).map_err(io_err(dest))?;
                    }
                    dir_times.push((dest.to_path_buf(), mtime));
                }
                continue;
            }
        };
        let target = dest.join(&rel);
        let kind = if layer { classify(&rel) } else { Kind::Normal };
        match kind {
            Kind::WhiteoutDot => return Err(LayerError::WhiteoutDot(entry)),
            Kind::Skip => continue,
            Kind::Opaque(dir) => {
                let d = dest.join(&dir);
                if !dir.as_os_str().is_empty() {
                    ensure_parents(dest, &dir, &entry)?;
                    match fs::symlink_metadata(&d) {
                        Ok(m) if m.is_dir() => {}
                        _ => {
                            clear(&d, false)?;
                            fs::create_dir(&d).map_err(io_err(&d))?;
                        }
                    }
                }
                fsutil::lsetxattr(&d, OVERLAY_OPAQUE_XATTR, b"y").map_err(io_err(&d))?;
                sum.opaque_dirs += 1;
                continue;
            }
            Kind::Whiteout(hidden) => {
                ensure_parents(dest, &hidden, &entry)?;
                let p = dest.join(&hidden);
                clear(&p, false)?;
                make_whiteout(&p).map_err(io_err(&p))?;
                sum.whiteouts += 1;
                continue;
            }
            Kind::Normal => {}
        }
        ensure_parents(dest, &rel, &entry)?;
        use tar::EntryType as T;
        match kind_byte {
            T::Directory => {
                clear(&target, true)?;
                if !target.is_dir() {
                    fs::create_dir(&target).map_err(io_err(&target))?;
                }
                dir_times.push((target.clone(), mtime));
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                clear(&target, false)?;
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&target)
                    .map_err(io_err(&target))?;
                // Sparse entries expand on read: count what is written, not what was read.
                let left = limits.max_unpacked.saturating_sub(written);
                let n = io::copy(&mut (&mut e).take(left.saturating_add(1)), &mut f)
                    .map_err(io_err(&target))?;
                if n > left {
                    return Err(LayerError::TooLarge {
                        entry,
                        limit: limits.max_unpacked,
                    });
                }
                written += n;
            }
            T::Symlink => {
                let l = link.ok_or_else(|| LayerError::Unsupported {
                    entry: entry.clone(),
                    kind: "symlink without target".into(),
                })?;
                // In a layer an absolute link means the container's root, so any target is
                // fine there; an archive is read on the host, where it would mean the host's.
                if !layer && !symlink_stays_inside(&rel, &l) {
                    return Err(LayerError::SymlinkOut {
                        entry,
                        target: fsutil::show(&l),
                    });
                }
                clear(&target, false)?;
                std::os::unix::fs::symlink(&l, &target).map_err(io_err(&target))?;
            }
            T::Link => {
                let l = link.ok_or_else(|| LayerError::Unsupported {
                    entry: entry.clone(),
                    kind: "hardlink without target".into(),
                })?;
                let lshow = fsutil::show(&l);
                let lrel = match clean_path(&l) {
                    Ok(Some(r)) => r,
                    _ => {
                        return Err(LayerError::HardlinkEscape {
                            entry,
                            target: lshow,
                        })
                    }
                };
                check_parents(dest, &lrel, &entry, &lshow)?;
                let src = dest.join(&lrel);
                match fs::symlink_metadata(&src) {
                    Ok(m) if !m.is_dir() => {}
                    _ => {
                        return Err(LayerError::HardlinkMissing {
                            entry,
                            target: lshow,
                        })
                    }
                }
                if src != target {
                    clear(&target, false)?;
                    fs::hard_link(&src, &target).map_err(io_err(&target))?;
                }
                sum.hardlinks += 1;
                // A hardlink shares its inode: no metadata of its own.
                continue;
            }
            T::Char | T::Block | T::Fifo if !layer => {
                return Err(LayerError::SpecialInArchive {
                    entry,
                    kind: match kind_byte {
                        T::Char => "character device",
                        T::Block => "block device",
                        _ => "fifo",
                    }
                    .into(),
                })
            }
            T::Char | T::Block | T::Fifo => {
                clear(&target, false)?;
                let t = match kind_byte {
                    T::Char => libc::S_IFCHR,
                    T::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                fsutil::mknod(&target, t | mode, major, minor).map_err(io_err(&target))?;
                sum.devices += 1;
            }
            other => {
                return Err(LayerError::Unsupported {
                    entry,
                    kind: format!("{other:?}"),
                })
            }
        }
        if !layer {
            // Archive files are read by tweed only: no owners, modes or xattrs from the tar.
            continue;
        }
        fsutil::lchown(&target, uid, gid).map_err(io_err(&target))?;
        for (k, v) in &xattrs {
            fsutil::lsetxattr(&target, k, v).map_err(io_err(&target))?;
        }
        if kind_byte != T::Symlink {
            // After chown, which clears set-id bits.
            fs::set_permissions(&target, fs::Permissions::from_mode(mode))
                .map_err(io_err(&target))?;
        }
        if kind_byte != T::Directory {
            fsutil::set_mtime(&target, mtime).map_err(io_err(&target))?;
        }
    }
    // Setting a directory's times does not touch its parent's, so any order works once every
    // entry exists.
    for (p, t) in dir_times {
        fsutil::set_mtime(&p, t).map_err(io_err(&p))?;
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_paths() {
        assert_eq!(
            clean_path(Path::new("./a/b")).unwrap(),
            Some(PathBuf::from("a/b"))
        );
        assert_eq!(
            clean_path(Path::new("a/./b/")).unwrap(),
            Some(PathBuf::from("a/b"))
        );
        assert_eq!(clean_path(Path::new("./")).unwrap(), None);
        assert!(matches!(
            clean_path(Path::new("/etc/passwd")),
            Err(LayerError::AbsolutePath(_))
        ));
        assert!(matches!(
            clean_path(Path::new("a/../../x")),
            Err(LayerError::DotDot(_))
        ));
        assert!(matches!(
            clean_path(Path::new("..")),
            Err(LayerError::DotDot(_))
        ));
    }

    #[test]
    fn classify_whiteouts() {
        assert_eq!(classify(Path::new("etc/passwd")), Kind::Normal);
        assert_eq!(
            classify(Path::new("etc/.wh.passwd")),
            Kind::Whiteout("etc/passwd".into())
        );
        assert_eq!(classify(Path::new(".wh.top")), Kind::Whiteout("top".into()));
        assert_eq!(
            classify(Path::new("var/.wh..wh..opq")),
            Kind::Opaque("var".into())
        );
        assert_eq!(classify(Path::new(".wh..wh..opq")), Kind::Opaque("".into()));
        assert_eq!(classify(Path::new(".wh..wh.plnk")), Kind::Skip);
        assert_eq!(classify(Path::new("a/.wh.")), Kind::Skip);
        assert_eq!(classify(Path::new("a/.whx")), Kind::Normal);
        // Hiding "." or ".." would remove the directory itself, or its parent outside the layer.
        assert_eq!(classify(Path::new("a/.wh..")), Kind::WhiteoutDot);
        assert_eq!(classify(Path::new(".wh...")), Kind::WhiteoutDot);
        assert_eq!(
            classify(Path::new("a/.wh....")),
            Kind::Whiteout("a/...".into())
        );
    }

    #[test]
    fn parents_through_a_symlink_are_refused() {
        let t = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc", t.path().join("evil")).unwrap();
        let e = ensure_parents(t.path(), Path::new("evil/passwd"), "evil/passwd").unwrap_err();
        assert!(
            matches!(e, LayerError::SymlinkEscape { ref via, .. } if via == "evil"),
            "{e}"
        );
        assert!(e.to_string().contains("symlink escape"));
        // Relative symlinks are refused as parents too, even when they stay inside.
        std::fs::create_dir(t.path().join("real")).unwrap();
        std::os::unix::fs::symlink("real", t.path().join("alias")).unwrap();
        assert!(ensure_parents(t.path(), Path::new("alias/x"), "alias/x").is_err());
    }

    #[test]
    fn missing_parents_are_created() {
        let t = tempfile::tempdir().unwrap();
        ensure_parents(t.path(), Path::new("a/b/c/file"), "x").unwrap();
        assert!(t.path().join("a/b/c").is_dir());
        std::fs::write(t.path().join("f"), "").unwrap();
        assert!(matches!(
            ensure_parents(t.path(), Path::new("f/x"), "f/x"),
            Err(LayerError::NotADirectory { .. })
        ));
    }

    #[test]
    fn symlinks_judged_by_name() {
        let inside = |rel: &str, t: &str| symlink_stays_inside(Path::new(rel), Path::new(t));
        assert!(inside("abc/layer.tar", "../def/layer.tar"));
        assert!(inside("a/b/c", "../../x"));
        assert!(inside("f", "g"));
        assert!(inside("f", "./g/../h"));
        assert!(!inside("f", "/etc/passwd"));
        assert!(!inside("f", ".."));
        assert!(!inside("a/b", "../../x"));
        assert!(!inside("a/b", "c/../../../x"));
    }

    /// A tar made by hand: the tar crate's builder refuses the hostile names tested here.
    fn tar_of(entries: &[(&str, tar::EntryType, &str, &[u8])]) -> Vec<u8> {
        let raw = |(name, kind, link, data): &(&str, tar::EntryType, &str, &[u8])| {
            tweed_testkit::tar::raw_entry(name, *kind, Some(*link).filter(|l| !l.is_empty()), data)
        };
        tweed_testkit::tar::finish_tar(entries.iter().flat_map(raw).collect())
    }

    fn archive(
        entries: &[(&str, tar::EntryType, &str, &[u8])],
        limits: Limits,
    ) -> (tempfile::TempDir, Result<(Summary, Digest), LayerError>) {
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("x");
        fs::create_dir(&dest).unwrap();
        let r = extract(&tar_of(entries)[..], &dest, Mode::Archive, &limits);
        (t, r)
    }

    use tar::EntryType as T;

    #[test]
    fn archives_refuse_what_would_reach_outside() {
        let host = tempfile::tempdir().unwrap();
        let victim = host.path().join("victim");
        fs::write(&victim, "host").unwrap();
        let v = victim.to_str().unwrap();
        let d = Limits::default();
        // Symlink then a file through it: refused at the symlink, naming it.
        let (_t, r) = archive(
            &[("f", T::Symlink, v, b""), ("f", T::Regular, "", b"img")],
            d,
        );
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("\"f\"") && e.contains("leaves the archive"),
            "{e}"
        );
        let (_t, r) = archive(&[("a/f", T::Symlink, "../../x", b"")], d);
        assert!(matches!(r, Err(LayerError::SymlinkOut { .. })));
        let (_t, r) = archive(&[("h", T::Link, v, b"")], d);
        assert!(matches!(r, Err(LayerError::HardlinkEscape { .. })), "{r:?}");
        let (_t, r) = archive(&[("h", T::Link, "../victim", b"")], d);
        assert!(matches!(r, Err(LayerError::HardlinkEscape { .. })), "{r:?}");
        let (_t, r) = archive(&[("h", T::Link, "missing", b"")], d);
        assert!(
            matches!(r, Err(LayerError::HardlinkMissing { .. })),
            "{r:?}"
        );
        let (_t, r) = archive(&[("../victim", T::Regular, "", b"img")], d);
        assert!(matches!(r, Err(LayerError::DotDot(_))), "{r:?}");
        let (_t, r) = archive(&[(v, T::Regular, "", b"img")], d);
        assert!(matches!(r, Err(LayerError::AbsolutePath(_))), "{r:?}");
        for k in [T::Char, T::Block, T::Fifo] {
            let (_t, r) = archive(&[("dev", k, "", b"")], d);
            let e = r.unwrap_err().to_string();
            assert!(e.contains("\"dev\"") && e.contains("refused"), "{e}");
        }
        assert_eq!(fs::read_to_string(&victim).unwrap(), "host");
        // Links that stay inside stay allowed (old docker-save archives share layers so).
        let (t, r) = archive(
            &[
                ("a/layer.tar", T::Regular, "", b"L"),
                ("b/layer.tar", T::Symlink, "../a/layer.tar", b""),
                ("c", T::Link, "a/layer.tar", b""),
            ],
            d,
        );
        r.unwrap();
        assert_eq!(fs::read(t.path().join("x/b/layer.tar")).unwrap(), b"L");
        assert_eq!(fs::read(t.path().join("x/c")).unwrap(), b"L");
    }

    #[test]
    fn limits_stop_bombs_with_a_clear_error() {
        let small = Limits {
            max_unpacked: 1000,
            max_entries: 3,
        };
        let big = vec![0u8; 5000];
        let (_t, r) = archive(&[("big", T::Regular, "", &big)], small);
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("\"big\"") && e.contains("1000 bytes") && e.contains("--max-unpacked"),
            "{e}"
        );
        // Many small files add up.
        let (_t, r) = archive(
            &[
                ("a", T::Regular, "", &big[..600]),
                ("b", T::Regular, "", &big[..600]),
            ],
            small,
        );
        assert!(
            matches!(r, Err(LayerError::TooLarge { ref entry, .. }) if entry == "b"),
            "{r:?}"
        );
        let many: Vec<String> = (0..10).map(|i| format!("f{i}")).collect();
        let entries: Vec<_> = many
            .iter()
            .map(|n| (n.as_str(), T::Regular, "", &b""[..]))
            .collect();
        let (_t, r) = archive(&entries, small);
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("\"f3\"")
                && e.contains("more than 3 entries")
                && e.contains("--max-entries"),
            "{e}"
        );
        // Within the limits, the digest covers the whole stream.
        let entries = [("a", T::Regular, "", &b"xyz"[..])];
        let (_t, r) = archive(&entries, small);
        assert_eq!(r.unwrap().1, Digest::of(&tar_of(&entries)));
    }
}
