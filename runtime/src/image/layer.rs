//! Extracting one image layer (a tar stream) into a directory that overlayfs can use as a lower
//! layer: OCI whiteouts become overlay whiteouts, modes, owners, xattrs, hardlinks and device
//! nodes are kept, and any entry that would land outside the layer is refused.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::fsutil;

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("layer entry {0:?} has an absolute path: refused")]
    AbsolutePath(String),
    #[error("layer entry {0:?} contains '..': refused")]
    DotDot(String),
    #[error("layer entry {entry:?} would be written through the symlink {via:?} (a symlink escape): refused")]
    SymlinkEscape { entry: String, via: String },
    #[error("layer entry {entry:?}: hardlink target {target:?} escapes the layer: refused")]
    HardlinkEscape { entry: String, target: String },
    #[error("layer entry {entry:?}: hardlink target {target:?} is not in this layer")]
    HardlinkMissing { entry: String, target: String },
    #[error("layer entry {entry:?}: {via:?} is not a directory")]
    NotADirectory { entry: String, via: String },
    #[error("layer entry {entry:?} has unsupported type {kind}")]
    Unsupported { entry: String, kind: String },
    #[error("reading the layer tar: {0}")]
    Tar(io::Error),
    #[error("extracting {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
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
    /// Other `.wh..wh.` metadata (aufs hardlink dirs): ignored.
    Skip,
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

/// Extracts a layer tar into `dest` (an existing, empty directory).
pub fn extract<R: Read>(reader: R, dest: &Path) -> Result<Summary, LayerError> {
    let mut ar = tar::Archive::new(reader);
    let mut sum = Summary::default();
    // Directories' mtimes are set last: creating children changes them.
    let mut dir_times: Vec<(PathBuf, i64)> = Vec::new();
    for e in ar.entries().map_err(LayerError::Tar)? {
        let mut e = e.map_err(LayerError::Tar)?;
        sum.entries += 1;
        let raw = e.path().map_err(LayerError::Tar)?.into_owned();
        let entry = fsutil::show(&raw);
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
        let mode = h.mode().map_err(LayerError::Tar)? & 0o7777;
        let uid = pax_uid.unwrap_or(h.uid().map_err(LayerError::Tar)? as u32);
        let gid = pax_gid.unwrap_or(h.gid().map_err(LayerError::Tar)? as u32);
        let mtime = pax_mtime.unwrap_or(h.mtime().unwrap_or(0) as i64);
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
                if kind_byte.is_dir() {
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
        match classify(&rel) {
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
                io::copy(&mut e, &mut f).map_err(io_err(&target))?;
            }
            T::Symlink => {
                let l = link.ok_or_else(|| LayerError::Unsupported {
                    entry: entry.clone(),
                    kind: "symlink without target".into(),
                })?;
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
}
