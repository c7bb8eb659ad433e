//! Turning a directory into a layer tar: a plain rootfs (`image import --rootfs`) or a
//! container's overlay upper directory (`commit`), where overlay whiteouts (char 0/0) and opaque
//! directories become OCI `.wh.NAME` and `.wh..wh..opq` entries again.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::fsutil;
use crate::image::layer::{OVERLAY_OPAQUE_XATTR, WH_OPAQUE, WH_PREFIX};

#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("writing the layer tar entry for {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// How to read the directory.
#[derive(Debug, Clone, Default)]
pub struct DiffOptions {
    /// Treat the directory as an overlay upper dir: convert whiteouts and opaque markers.
    pub overlay_upper: bool,
    /// Relative paths left out (the init layer's files: they belong to the container, not the image).
    pub exclude: HashSet<PathBuf>,
    /// The upper dir of a `--userns` container: its files are owned by the mapped host ids, and
    /// the layer records them as the container's ids (host `start + n` as `n`; outside the map
    /// as [`crate::userns::OVERFLOW_ID`], which is what the container saw). Only the tar
    /// headers change; the files on disk keep their owners.
    pub unshift: Option<crate::userns::Mapping>,
}

/// Entry counts.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DiffSummary {
    pub entries: u64,
    pub whiteouts: u64,
    pub opaque_dirs: u64,
    /// Entries whose host owner was outside [`DiffOptions::unshift`]'s map.
    pub unmapped: u64,
}

/// Whether a file is an overlay whiteout.
pub fn is_whiteout(meta: &fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

/// The OCI whiteout path for a deleted `rel`.
pub fn whiteout_path(rel: &Path) -> PathBuf {
    let name = rel
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    rel.parent()
        .unwrap_or(Path::new(""))
        .join(format!("{WH_PREFIX}{name}"))
}

struct Walker<'a, W: Write> {
    b: tar::Builder<W>,
    opts: &'a DiffOptions,
    links: HashMap<(u64, u64), PathBuf>,
    sum: DiffSummary,
}

/// `security.capability` revisions (linux/capability.h): v2 applies to whoever is root, v3
/// names the host uid of the namespace root it applies to (`rootid`, the last 4 bytes).
const VFS_CAP_REVISION_MASK: u32 = 0xFF00_0000;
const VFS_CAP_REVISION_2: u32 = 0x0200_0000;
const VFS_CAP_REVISION_3: u32 = 0x0300_0000;
const VFS_CAP_V2_LEN: usize = 20;
const VFS_CAP_V3_LEN: usize = 24;
/// POSIX ACL xattr layout (linux/posix_acl_xattr.h): a version word, then entries of tag (u16),
/// permissions (u16) and id (u32); only user and group entries carry an id.
const ACL_VERSION: u32 = 2;
const ACL_USER: u16 = 0x02;
const ACL_GROUP: u16 = 0x08;

/// An xattr of a `--userns` container's upper dir with the host ids it holds shifted back to
/// the container's, as the host reads it: a v3 file capability whose `rootid` is the
/// container's root becomes the v2 an image would carry (applies to root wherever the image
/// runs); POSIX ACL entries naming users or groups are shifted like owners (outside the map:
/// [`crate::userns::OVERFLOW_ID`]). `None`: leave the xattr out, a capability of a namespace
/// root outside the map (it applied to nothing the container could be). Anything else, or a
/// malformed value, is returned as it is. The bool: an id was outside the map.
pub fn unshift_xattr(
    name: &str,
    value: &[u8],
    m: &crate::userns::Mapping,
) -> (Option<Vec<u8>>, bool) {
    let word = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    match name {
        "security.capability"
            if value.len() == VFS_CAP_V3_LEN
                && word(value, 0) & VFS_CAP_REVISION_MASK == VFS_CAP_REVISION_3 =>
        {
            match m.container_uid(word(value, 20)) {
                None => (None, true),
                Some(0) => {
                    let mut v = value[..VFS_CAP_V2_LEN].to_vec();
                    let magic = (word(value, 0) & !VFS_CAP_REVISION_MASK) | VFS_CAP_REVISION_2;
                    v[..4].copy_from_slice(&magic.to_le_bytes());
                    (Some(v), false)
                }
                Some(root) => {
                    let mut v = value.to_vec();
                    v[20..].copy_from_slice(&root.to_le_bytes());
                    (Some(v), false)
                }
            }
        }
        "system.posix_acl_access" | "system.posix_acl_default"
            if value.len() >= 4
                && (value.len() - 4).is_multiple_of(8)
                && word(value, 0) == ACL_VERSION =>
        {
            let (mut v, mut outside) = (value.to_vec(), false);
            for e in v[4..].chunks_exact_mut(8) {
                let tag = u16::from_le_bytes([e[0], e[1]]);
                let id = u32::from_le_bytes(e[4..8].try_into().expect("4 bytes"));
                let shifted = match tag {
                    ACL_USER => m.container_uid(id),
                    ACL_GROUP => m.container_gid(id),
                    _ => continue,
                };
                outside |= shifted.is_none();
                let id = shifted.unwrap_or(crate::userns::OVERFLOW_ID);
                e[4..8].copy_from_slice(&id.to_le_bytes());
            }
            (Some(v), outside)
        }
        _ => (Some(value.to_vec()), false),
    }
}

/// The owner a layer records for a file owned by host `uid:gid`: unchanged, or shifted back
/// through `unshift` (the bool: outside its map).
pub fn layer_owner(
    uid: u32,
    gid: u32,
    unshift: Option<&crate::userns::Mapping>,
) -> (u32, u32, bool) {
    match unshift {
        None => (uid, gid, false),
        Some(m) => m.to_container(uid, gid),
    }
}

impl<W: Write> Walker<'_, W> {
    fn base_header(&mut self, meta: &fs::Metadata, kind: tar::EntryType) -> tar::Header {
        let (uid, gid, outside) = layer_owner(meta.uid(), meta.gid(), self.opts.unshift.as_ref());
        self.sum.unmapped += u64::from(outside);
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(meta.mode() & 0o7777);
        h.set_uid(uid.into());
        h.set_gid(gid.into());
        h.set_mtime(meta.mtime().max(0) as u64);
        h.set_size(0);
        h
    }

    fn werr(path: &Path) -> impl FnOnce(io::Error) -> DiffError + '_ {
        move |source| DiffError::Write {
            path: path.to_path_buf(),
            source,
        }
    }

    fn xattrs(&mut self, abs: &Path) -> Result<Option<Vec<u8>>, DiffError> {
        let names = fsutil::llistxattr(abs).map_err(|source| DiffError::Read {
            path: abs.to_path_buf(),
            source,
        })?;
        let mut opaque = None;
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        for n in names {
            let v = fsutil::lgetxattr(abs, &n)
                .map_err(|source| DiffError::Read {
                    path: abs.to_path_buf(),
                    source,
                })?
                .unwrap_or_default();
            if n.starts_with("trusted.overlay.") {
                if n == OVERLAY_OPAQUE_XATTR {
                    opaque = Some(v);
                }
                continue;
            }
            let v = match &self.opts.unshift {
                Some(m) => {
                    let (v, outside) = unshift_xattr(&n, &v, m);
                    self.sum.unmapped += u64::from(outside);
                    match v {
                        Some(v) => v,
                        None => continue,
                    }
                }
                None => v,
            };
            pax.push((format!("SCHILY.xattr.{n}"), v));
        }
        if !pax.is_empty() {
            self.b
                .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .map_err(Self::werr(abs))?;
        }
        Ok(opaque)
    }

    fn empty_file(&mut self, rel: &Path) -> Result<(), DiffError> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o600);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(0);
        h.set_mtime(0);
        self.b
            .append_data(&mut h, rel, io::empty())
            .map_err(Self::werr(rel))
    }

    fn visit(&mut self, abs: &Path, rel: &Path) -> Result<(), DiffError> {
        let rerr = |p: &Path| {
            let p = p.to_path_buf();
            move |source| DiffError::Read { path: p, source }
        };
        let mut names: Vec<_> = fs::read_dir(abs)
            .map_err(rerr(abs))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(rerr(abs))?;
        names.sort();
        for name in names {
            let a = abs.join(&name);
            let r = rel.join(&name);
            if self.opts.exclude.contains(&r) {
                continue;
            }
            let meta = fs::symlink_metadata(&a).map_err(rerr(&a))?;
            let ft = meta.file_type();
            self.sum.entries += 1;
            if self.opts.overlay_upper && is_whiteout(&meta) {
                self.empty_file(&whiteout_path(&r))?;
                self.sum.whiteouts += 1;
                continue;
            }
            if ft.is_dir() {
                let opaque = self.xattrs(&a)?;
                let mut h = self.base_header(&meta, tar::EntryType::Directory);
                self.b
                    .append_data(&mut h, &r, io::empty())
                    .map_err(Self::werr(&r))?;
                if self.opts.overlay_upper && opaque.as_deref() == Some(b"y") {
                    self.empty_file(&r.join(WH_OPAQUE))?;
                    self.sum.opaque_dirs += 1;
                }
                self.visit(&a, &r)?;
            } else if ft.is_file() {
                if meta.nlink() > 1 {
                    if let Some(first) = self.links.get(&(meta.dev(), meta.ino())).cloned() {
                        let mut h = self.base_header(&meta, tar::EntryType::Link);
                        self.b
                            .append_link(&mut h, &r, &first)
                            .map_err(Self::werr(&r))?;
                        continue;
                    }
                    self.links.insert((meta.dev(), meta.ino()), r.clone());
                }
                self.xattrs(&a)?;
                let mut h = self.base_header(&meta, tar::EntryType::Regular);
                h.set_size(meta.len());
                let f = fs::File::open(&a).map_err(rerr(&a))?;
                self.b.append_data(&mut h, &r, f).map_err(Self::werr(&r))?;
            } else if ft.is_symlink() {
                let target = fs::read_link(&a).map_err(rerr(&a))?;
                self.xattrs(&a)?;
                let mut h = self.base_header(&meta, tar::EntryType::Symlink);
                self.b
                    .append_link(&mut h, &r, &target)
                    .map_err(Self::werr(&r))?;
            } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
                let kind = if ft.is_char_device() {
                    tar::EntryType::Char
                } else if ft.is_block_device() {
                    tar::EntryType::Block
                } else {
                    tar::EntryType::Fifo
                };
                self.xattrs(&a)?;
                let mut h = self.base_header(&meta, kind);
                if !ft.is_fifo() {
                    h.set_device_major(fsutil::dev_major(meta.rdev()))
                        .map_err(Self::werr(&r))?;
                    h.set_device_minor(fsutil::dev_minor(meta.rdev()))
                        .map_err(Self::werr(&r))?;
                }
                self.b
                    .append_data(&mut h, &r, io::empty())
                    .map_err(Self::werr(&r))?;
            }
            // Sockets are not part of images.
        }
        Ok(())
    }
}

/// Writes `src` as a layer tar to `out`.
pub fn write_layer<W: Write>(
    src: &Path,
    out: W,
    opts: &DiffOptions,
) -> Result<(W, DiffSummary), DiffError> {
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    let mut w = Walker {
        b,
        opts,
        links: HashMap::new(),
        sum: DiffSummary::default(),
    };
    w.visit(src, Path::new(""))?;
    let sum = w.sum.clone();
    let out = w.b.into_inner().map_err(|source| DiffError::Write {
        path: src.to_path_buf(),
        source,
    })?;
    Ok((out, sum))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whiteout_paths() {
        assert_eq!(
            whiteout_path(Path::new("etc/passwd")),
            PathBuf::from("etc/.wh.passwd")
        );
        assert_eq!(whiteout_path(Path::new("top")), PathBuf::from(".wh.top"));
    }

    #[test]
    fn plain_tree_round_trips_through_tar_listing() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        fs::create_dir_all(root.join("etc/sub")).unwrap();
        fs::write(root.join("etc/hosts"), "x").unwrap();
        fs::write(root.join("etc/keep"), "keep").unwrap();
        fs::hard_link(root.join("etc/keep"), root.join("etc/keep2")).unwrap();
        std::os::unix::fs::symlink("/etc/keep", root.join("link")).unwrap();
        let opts = DiffOptions {
            overlay_upper: true,
            exclude: [PathBuf::from("etc/hosts")].into_iter().collect(),
            unshift: None,
        };
        let (buf, sum) = write_layer(root, Vec::new(), &opts).unwrap();
        assert_eq!(sum.whiteouts, 0);
        let mut ar = tar::Archive::new(&buf[..]);
        let mut seen = Vec::new();
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            seen.push((
                e.path().unwrap().to_string_lossy().into_owned(),
                e.header().entry_type(),
            ));
        }
        let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["etc", "etc/keep", "etc/keep2", "etc/sub", "link"]);
        assert_eq!(seen[0].1, tar::EntryType::Directory);
        assert_eq!(seen[2].1, tar::EntryType::Link);
        assert_eq!(seen[4].1, tar::EntryType::Symlink);
    }

    fn cap_v3(magic_low: u32, permitted: u32, rootid: u32) -> Vec<u8> {
        let mut v = Vec::new();
        for w in [VFS_CAP_REVISION_3 | magic_low, permitted, 0, 0, 0, rootid] {
            v.extend_from_slice(&w.to_le_bytes());
        }
        v
    }

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut v = ACL_VERSION.to_le_bytes().to_vec();
        for (tag, perm, id) in entries {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        v
    }

    #[test]
    fn ids_inside_xattrs_shift_back_too() {
        use crate::userns::{IdRange, Mapping, OVERFLOW_ID};
        let m = Mapping {
            uid: IdRange::new(100000, 65536).unwrap(),
            gid: IdRange::new(300000, 65536).unwrap(),
        };
        let cap = "security.capability";
        // setcap by the container's root: v3 naming its host uid becomes a plain v2, the
        // effective flag and the capability words kept.
        let (v, outside) = unshift_xattr(cap, &cap_v3(1, 1 << 10, 100000), &m);
        let v = v.unwrap();
        assert!(!outside);
        assert_eq!(v.len(), VFS_CAP_V2_LEN);
        assert_eq!(&v[..4], &(VFS_CAP_REVISION_2 | 1).to_le_bytes());
        assert_eq!(&v[4..8], &(1u32 << 10).to_le_bytes());
        // A nested namespace's root (container uid 1000) stays v3 with the container's id.
        let (v, _) = unshift_xattr(cap, &cap_v3(0, 1, 101000), &m);
        assert_eq!(&v.unwrap()[20..], &1000u32.to_le_bytes());
        // A rootid outside the map is left out: it applied to nobody the container could be.
        assert_eq!(unshift_xattr(cap, &cap_v3(0, 1, 7), &m), (None, true));
        // v2 and malformed values pass through untouched.
        let mut v2 = cap_v3(0, 1, 0);
        v2.truncate(VFS_CAP_V2_LEN);
        v2[..4].copy_from_slice(&VFS_CAP_REVISION_2.to_le_bytes());
        assert_eq!(unshift_xattr(cap, &v2, &m), (Some(v2.clone()), false));
        assert_eq!(
            unshift_xattr(cap, b"short", &m),
            (Some(b"short".to_vec()), false)
        );

        // ACLs: user and group entries shifted, the owner/mask/other entries untouched.
        let host = acl(&[
            (0x01, 6, u32::MAX),
            (ACL_USER, 6, 101000),
            (ACL_GROUP, 4, 300050),
            (ACL_USER, 4, 42),
            (0x20, 0, u32::MAX),
        ]);
        let want = acl(&[
            (0x01, 6, u32::MAX),
            (ACL_USER, 6, 1000),
            (ACL_GROUP, 4, 50),
            (ACL_USER, 4, OVERFLOW_ID),
            (0x20, 0, u32::MAX),
        ]);
        for name in ["system.posix_acl_access", "system.posix_acl_default"] {
            assert_eq!(unshift_xattr(name, &host, &m), (Some(want.clone()), true));
        }
        // A torn ACL is not reinterpreted.
        let torn = &host[..host.len() - 3];
        assert_eq!(
            unshift_xattr("system.posix_acl_access", torn, &m),
            (Some(torn.to_vec()), false)
        );
        // Other xattrs carry no ids.
        assert_eq!(
            unshift_xattr("user.note", b"100000", &m),
            (Some(b"100000".to_vec()), false)
        );
    }

    /// The xattrs of each entry of a layer tar (from its PAX headers), by path.
    fn xattrs(buf: &[u8]) -> HashMap<String, HashMap<String, Vec<u8>>> {
        let mut ar = tar::Archive::new(buf);
        let mut out = HashMap::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let mut x = HashMap::new();
            if let Some(exts) = e.pax_extensions().unwrap() {
                for ext in exts {
                    let ext = ext.unwrap();
                    if let Some(n) = ext.key().unwrap().strip_prefix("SCHILY.xattr.") {
                        x.insert(n.to_string(), ext.value_bytes().to_vec());
                    }
                }
            }
            out.insert(path, x);
        }
        out
    }

    /// The ids of each entry of a layer tar, by path.
    fn owners(buf: &[u8]) -> HashMap<String, (u64, u64, tar::EntryType)> {
        let mut ar = tar::Archive::new(buf);
        ar.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    (h.uid().unwrap(), h.gid().unwrap(), h.entry_type()),
                )
            })
            .collect()
    }

    #[test]
    fn owners_shift_back_only_with_a_mapping() {
        use crate::userns::{IdRange, Mapping, OVERFLOW_ID};
        let m = Mapping {
            uid: IdRange::new(100000, 65536).unwrap(),
            gid: IdRange::new(300000, 65536).unwrap(),
        };
        assert_eq!(layer_owner(101000, 301000, Some(&m)), (1000, 1000, false));
        assert_eq!(layer_owner(101000, 301000, None), (101000, 301000, false));
        assert_eq!(layer_owner(5, 300000, Some(&m)), (OVERFLOW_ID, 0, true));
    }

    /// A `--userns` container's upper dir: files, a dir, a symlink (its own owner, not its
    /// target's) and a hardlink are recorded with container ids, one owner outside the map as
    /// the overflow id; the files on disk keep their host owners. Needs root for the chowns;
    /// without root the tree is the caller's and a one-id map of the caller's uid is used.
    #[test]
    fn a_userns_upper_dir_is_recorded_with_container_ids() {
        use crate::userns::{IdRange, Mapping, OVERFLOW_ID};
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        fs::create_dir(root.join("home")).unwrap();
        fs::write(root.join("home/f"), "x").unwrap();
        fs::write(root.join("rootfile"), "r").unwrap();
        fs::hard_link(root.join("home/f"), root.join("home/f2")).unwrap();
        std::os::unix::fs::symlink("rootfile", root.join("link")).unwrap();
        fs::write(root.join("stray"), "s").unwrap();
        // The new tree's owner is who this test runs as (the workspace's one root check lives
        // in tweed_testkit; here the ids themselves are what matters).
        let (uid, gid) = {
            use std::os::unix::fs::MetadataExt;
            let md = fs::metadata(root.join("rootfile")).unwrap();
            (md.uid(), md.gid())
        };
        if uid != 0 {
            let m = Mapping {
                uid: IdRange::new(uid, 1).unwrap(),
                gid: IdRange::new(gid, 1).unwrap(),
            };
            let opts = DiffOptions {
                unshift: Some(m),
                ..DiffOptions::default()
            };
            let (buf, sum) = write_layer(root, Vec::new(), &opts).unwrap();
            assert_eq!(sum.unmapped, 0);
            for (p, (u, g, _)) in owners(&buf) {
                assert_eq!((u, g), (0, 0), "{p}");
            }
            return;
        }
        let m = Mapping {
            uid: IdRange::new(100000, 65536).unwrap(),
            gid: IdRange::new(300000, 65536).unwrap(),
        };
        let chown = |p: &str, u, g| fsutil::lchown(&root.join(p), u, g).unwrap();
        chown("home", 101000, 301000);
        chown("home/f", 101000, 301001);
        chown("rootfile", 100000, 300000);
        // The link's own owner differs from its target's: lchown semantics.
        chown("link", 100007, 300007);
        chown("stray", 42, 300000);
        // What setcap and setfacl inside leave on the upper dir, as the host reads it.
        let acl_in = acl(&[
            (0x01, 6, u32::MAX),
            (ACL_USER, 6, 101000),
            (0x04, 4, u32::MAX),
            (0x10, 6, u32::MAX),
            (0x20, 4, u32::MAX),
        ]);
        fsutil::lsetxattr(&root.join("home/f"), "system.posix_acl_access", &acl_in).unwrap();
        let cap = cap_v3(1, 1 << 10, 100000);
        fsutil::lsetxattr(&root.join("rootfile"), "security.capability", &cap).unwrap();
        let opts = DiffOptions {
            overlay_upper: true,
            unshift: Some(m),
            ..DiffOptions::default()
        };
        let (buf, sum) = write_layer(root, Vec::new(), &opts).unwrap();
        let o = owners(&buf);
        assert_eq!(o["home"], (1000, 1000, tar::EntryType::Directory));
        assert_eq!(o["home/f"], (1000, 1001, tar::EntryType::Regular));
        assert_eq!(o["home/f2"], (1000, 1001, tar::EntryType::Link));
        assert_eq!(o["rootfile"], (0, 0, tar::EntryType::Regular));
        assert_eq!(o["link"], (7, 7, tar::EntryType::Symlink));
        assert_eq!(
            o["stray"],
            (u64::from(OVERFLOW_ID), 0, tar::EntryType::Regular)
        );
        assert_eq!(sum.unmapped, 1);
        let x = xattrs(&buf);
        let acl_out = &x["home/f"]["system.posix_acl_access"];
        // The second entry (after the version word and the owner entry) is the user one.
        assert_eq!(&acl_out[16..20], &1000u32.to_le_bytes(), "{acl_out:?}");
        let cap_out = &x["rootfile"]["security.capability"];
        assert_eq!(cap_out.len(), VFS_CAP_V2_LEN);
        assert_eq!(&cap_out[..4], &(VFS_CAP_REVISION_2 | 1).to_le_bytes());
        // The upper dir itself is untouched.
        let md = |p: &str| fs::symlink_metadata(root.join(p)).unwrap();
        assert_eq!((md("home/f").uid(), md("home/f").gid()), (101000, 301001));
        assert_eq!((md("link").uid(), md("rootfile").uid()), (100007, 100000));
        // Without a mapping the host ids are recorded as they are.
        let (plain, _) = write_layer(root, Vec::new(), &DiffOptions::default()).unwrap();
        assert_eq!(
            owners(&plain)["home/f"],
            (101000, 301001, tar::EntryType::Regular)
        );
    }
}
