//! The image store: content-addressed extracted layers shared by images, and image records.
//!
//! ```text
//! <root>/layers/<diff-id hex>/     one extracted layer (overlay lower dir), made once
//! <root>/verified/<diff-id hex>    written (durably) once that layer's content matched its digest
//! <root>/images/<name>.json        an image: its layers (bottom first) and run config
//! <root>/tmp/                      extraction in progress (renamed into layers/ when complete)
//! ```
//!
//! Every directory is 0700 and every record 0600. A diff id becomes a path only through
//! [`Digest`], which holds nothing but `sha256:` and 64 hex digits; a layer directory counts as
//! present only with its `verified/` mark, so a directory that got there any other way (a crash
//! between rename and mark, an older tweed, a hand-made one) is never mounted or reused.

pub mod diff;
pub mod import;
pub mod layer;

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::{self, Digest, DigestError};
use crate::fsutil;
pub use layer::Limits;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("unknown image {0:?} (see `tweedctl image ls`)")]
    Unknown(String),
    #[error("image reference {reference:?} is ambiguous: it matches {matches:?}")]
    Ambiguous {
        reference: String,
        matches: Vec<String>,
    },
    #[error("invalid image name {0:?}: use letters, digits and . _ - / : @ only")]
    BadName(String),
    #[error(
        "{path}: not a docker-save tarball or OCI image layout (no manifest.json, no index.json)"
    )]
    UnknownFormat { path: PathBuf },
    #[error("{path}: {what}")]
    Malformed { path: PathBuf, what: String },
    #[error("blob {path}: sha256 mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("blob {path}: size mismatch: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error(
        "layer {path}: its uncompressed content is {actual}, but the image config says {expected}"
    )]
    DiffIdMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("layer {path}: {media} layers are not supported (use gzip or uncompressed tar)")]
    UnsupportedCompression { path: PathBuf, media: String },
    #[error("{path}: reference {reference:?} escapes the image directory: refused")]
    BlobEscape { path: PathBuf, reference: String },
    #[error("{path}: the image has no name: pass --name")]
    NoName { path: PathBuf },
    #[error("image {name} is used by container {container}: remove the container first")]
    InUse { name: String, container: String },
    #[error("layer {layer}: {source}")]
    Layer {
        layer: String,
        source: layer::LayerError,
    },
    #[error("image archive {path}: {source}")]
    Archive {
        path: PathBuf,
        source: layer::LayerError,
    },
    #[error("{path}: {field}: {source}")]
    BadDigest {
        path: PathBuf,
        field: String,
        source: DigestError,
    },
    #[error("layer {layer} of image {image} is not in the store, or was never verified: re-import the image")]
    LayerMissing { image: String, layer: Digest },
    #[error("building a layer from {path}: {source}")]
    Diff {
        path: PathBuf,
        source: diff::DiffError,
    },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How to run an image, from its config (`Env`, `Entrypoint`, `Cmd`, `WorkingDir`, `User`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageConfig {
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

/// One named image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: String,
    /// `sha256:` digest of the image config.
    pub id: Digest,
    /// Layer diff ids, bottom first.
    pub layers: Vec<Digest>,
    pub config: ImageConfig,
    pub created: String,
    /// `docker-archive`, `oci-layout`, `rootfs` or `commit`.
    pub source: String,
}

/// `busybox` -> `busybox:latest`; names with a tag or digest stay.
pub fn normalize_name(name: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') || name.contains('@') {
        name.to_string()
    } else {
        format!("{name}:latest")
    }
}

pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with(['.', '/', '-', ':'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/:@".contains(&b))
}

fn encode_name(name: &str) -> String {
    let mut s = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"._-".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

/// The image store.
#[derive(Debug, Clone)]
pub struct ImageStore {
    pub root: PathBuf,
}

impl ImageStore {
    pub fn open(root: &Path) -> Result<ImageStore, ImageError> {
        // The root may be shared (the agent keeps its state in /var/lib/tweed too): made
        // private when tweed creates it, left as it is otherwise; what tweed keeps in it is
        // private either way.
        if fs::symlink_metadata(root).is_err() {
            fsutil::create_private_dir(root).map_err(io_err(root))?;
        }
        for d in ["layers", "verified", "images", "tmp"] {
            let p = root.join(d);
            fsutil::create_private_dir(&p).map_err(io_err(&p))?;
        }
        Ok(ImageStore {
            root: root.to_path_buf(),
        })
    }

    pub fn layer_dir(&self, diff_id: &Digest) -> PathBuf {
        self.root.join("layers").join(diff_id.hex())
    }

    fn mark_path(&self, diff_id: &Digest) -> PathBuf {
        self.root.join("verified").join(diff_id.hex())
    }

    /// Whether the layer is extracted and its content was verified against `diff_id`.
    pub fn has_layer(&self, diff_id: &Digest) -> bool {
        let real_dir = fs::symlink_metadata(self.layer_dir(diff_id)).is_ok_and(|m| m.is_dir());
        real_dir
            && fs::read(self.mark_path(diff_id))
                .is_ok_and(|m| m.strip_suffix(b"\n") == Some(diff_id.as_str().as_bytes()))
    }

    /// Moves a verified extraction into `layers/` and marks it, durably, in that order: a crash
    /// in between leaves an unmarked directory, which is replaced next time.
    fn install_layer(&self, tmp: &Path, diff_id: &Digest) -> Result<(), ImageError> {
        if self.has_layer(diff_id) {
            // Another import extracted the same content first: theirs is identical.
            return fsutil::remove_tree(tmp).map_err(io_err(tmp));
        }
        let dest = self.layer_dir(diff_id);
        if fs::symlink_metadata(&dest).is_ok() {
            // Not verified: whatever it is, it is not trusted and not kept.
            match fs::symlink_metadata(&dest) {
                Ok(m) if m.is_dir() => fsutil::remove_tree(&dest),
                _ => fs::remove_file(&dest),
            }
            .map_err(io_err(&dest))?;
        }
        match fs::rename(tmp, &dest) {
            Ok(()) => {}
            Err(_) if self.has_layer(diff_id) => {
                return fsutil::remove_tree(tmp).map_err(io_err(tmp))
            }
            Err(e) => return Err(io_err(&dest)(e)),
        }
        let layers = self.root.join("layers");
        fsutil::sync_dir(&layers).map_err(io_err(&layers))?;
        let mark = self.mark_path(diff_id);
        fsutil::write_atomic(&mark, format!("{diff_id}\n").as_bytes()).map_err(io_err(&mark))
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.root
            .join("images")
            .join(format!("{}.json", encode_name(name)))
    }

    /// A fresh directory under `tmp/`.
    pub fn temp_dir(&self, what: &str) -> Result<PathBuf, ImageError> {
        let p = self
            .root
            .join("tmp")
            .join(format!("{what}-{}", fsutil::random_hex(8)));
        fs::create_dir(&p).map_err(io_err(&p))?;
        Ok(p)
    }

    /// Extracts a layer tar (uncompressed stream) into the store. When `expected` is given the
    /// stream's digest must match it. Returns the diff id. A verified layer already present is
    /// reused.
    pub fn add_layer<R: Read>(
        &self,
        reader: R,
        expected: Option<&Digest>,
        what: &Path,
        limits: &Limits,
    ) -> Result<Digest, ImageError> {
        let tmp = self.temp_dir("layer")?;
        let result =
            (|| {
                let (_, diff_id) = layer::extract(reader, &tmp, layer::Mode::Layer, limits)
                    .map_err(|source| ImageError::Layer {
                        layer: fsutil::show(what),
                        source,
                    })?;
                if let Some(exp) = expected {
                    if *exp != diff_id {
                        return Err(ImageError::DiffIdMismatch {
                            path: what.to_path_buf(),
                            expected: exp.to_string(),
                            actual: diff_id.to_string(),
                        });
                    }
                }
                self.install_layer(&tmp, &diff_id)?;
                Ok(diff_id)
            })();
        if result.is_err() {
            let _ = fsutil::remove_tree(&tmp);
        }
        result
    }

    /// Makes a layer from a directory (plain rootfs, or an overlay upper dir with `opts`).
    pub fn add_layer_from_dir(
        &self,
        dir: &Path,
        opts: &diff::DiffOptions,
    ) -> Result<(Digest, diff::DiffSummary), ImageError> {
        let tmp = self.temp_dir("diff")?;
        let tarp = tmp.join("layer.tar");
        let result = (|| {
            let f = fs::File::create(&tarp).map_err(io_err(&tarp))?;
            let w = digest::HashingWriter::new(io::BufWriter::new(f));
            let (w, sum) = diff::write_layer(dir, w, opts).map_err(|source| ImageError::Diff {
                path: dir.to_path_buf(),
                source,
            })?;
            let (diff_id, _) = w.finish().map_err(io_err(&tarp))?;
            let diff_id = Digest::parse(&diff_id).expect("sha256 digests are well-formed");
            if self.has_layer(&diff_id) {
                return Ok((diff_id, sum));
            }
            let f = fs::File::open(&tarp).map_err(io_err(&tarp))?;
            // Made here from a local directory: nothing hostile to bound.
            let unbounded = Limits {
                max_unpacked: u64::MAX,
                max_entries: u64::MAX,
            };
            let d = self.add_layer(io::BufReader::new(f), Some(&diff_id), dir, &unbounded)?;
            Ok((d, sum))
        })();
        let _ = fsutil::remove_tree(&tmp);
        result
    }

    pub fn save(&self, rec: &ImageRecord) -> Result<(), ImageError> {
        if !valid_name(&rec.name) {
            return Err(ImageError::BadName(rec.name.clone()));
        }
        let p = self.record_path(&rec.name);
        let data = serde_json::to_vec_pretty(rec).expect("records serialize");
        fsutil::write_atomic(&p, &data).map_err(io_err(&p))
    }

    pub fn list(&self) -> Result<Vec<ImageRecord>, ImageError> {
        let dir = self.root.join("images");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let p = e.map_err(io_err(&dir))?.path();
            if p.extension().is_some_and(|x| x == "json") {
                let data = fs::read(&p).map_err(io_err(&p))?;
                let rec: ImageRecord =
                    serde_json::from_slice(&data).map_err(|e| ImageError::Malformed {
                        path: p.clone(),
                        what: e.to_string(),
                    })?;
                out.push(rec);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Finds an image by name (`busybox` means `busybox:latest`) or id (prefix).
    pub fn get(&self, reference: &str) -> Result<ImageRecord, ImageError> {
        let norm = normalize_name(reference);
        for n in [
            reference.to_string(),
            norm.clone(),
            format!("docker.io/library/{norm}"),
            format!("docker.io/{norm}"),
        ] {
            if valid_name(&n) {
                let p = self.record_path(&n);
                if let Ok(data) = fs::read(&p) {
                    return serde_json::from_slice(&data).map_err(|e| ImageError::Malformed {
                        path: p,
                        what: e.to_string(),
                    });
                }
            }
        }
        let hexref = digest::hex_part(reference);
        if hexref.len() >= 4 && hexref.bytes().all(|b| b.is_ascii_hexdigit()) {
            let all = self.list()?;
            let m: Vec<&ImageRecord> = all
                .iter()
                .filter(|r| r.id.hex().starts_with(hexref))
                .collect();
            let ids: HashSet<&str> = m.iter().map(|r| r.id.as_str()).collect();
            match ids.len() {
                0 => {}
                1 => return Ok(m[0].clone()),
                _ => {
                    return Err(ImageError::Ambiguous {
                        reference: reference.to_string(),
                        matches: m.iter().map(|r| r.name.clone()).collect(),
                    })
                }
            }
        }
        Err(ImageError::Unknown(reference.to_string()))
    }

    /// Deletes an image record (the caller checks that no container uses it).
    pub fn remove_record(&self, name: &str) -> Result<(), ImageError> {
        let p = self.record_path(name);
        fs::remove_file(&p).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                ImageError::Unknown(name.to_string())
            } else {
                io_err(&p)(e)
            }
        })
    }

    /// Removes layers that no image references and that are not in `keep`.
    pub fn gc_layers(&self, keep: &HashSet<String>) -> Result<Vec<String>, ImageError> {
        let mut used: HashSet<String> = keep
            .iter()
            .map(|d| digest::hex_part(d).to_string())
            .collect();
        for r in self.list()? {
            used.extend(r.layers.iter().map(|d| d.hex().to_string()));
        }
        let dir = self.root.join("layers");
        let mut removed = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !used.contains(&name) {
                // The mark goes first: a layer half removed must not count as present.
                let mark = self.root.join("verified").join(&name);
                match fs::remove_file(&mark) {
                    Err(err) if err.kind() != io::ErrorKind::NotFound => {
                        return Err(io_err(&mark)(err))
                    }
                    _ => {}
                }
                fsutil::remove_tree(&e.path()).map_err(io_err(&e.path()))?;
                removed.push(format!("sha256:{name}"));
            }
        }
        Ok(removed)
    }

    /// Overlay lower dirs for an image, topmost first (overlayfs's order). Every layer must be
    /// present and verified.
    pub fn lower_dirs(&self, rec: &ImageRecord) -> Result<Vec<PathBuf>, ImageError> {
        rec.layers
            .iter()
            .rev()
            .map(|d| {
                if self.has_layer(d) {
                    Ok(self.layer_dir(d))
                } else {
                    Err(ImageError::LayerMissing {
                        image: rec.name.clone(),
                        layer: d.clone(),
                    })
                }
            })
            .collect()
    }

    /// Records an image tweed made itself (`source`: a rootfs import or a commit), created
    /// now, with the content-addressed id of the config blob OCI would write for it.
    pub fn save_made(
        &self,
        name: String,
        config: ImageConfig,
        layers: Vec<Digest>,
        source: &str,
    ) -> Result<ImageRecord, ImageError> {
        let created = crate::timefmt::now();
        let rec = ImageRecord {
            name,
            id: Self::synth_config_id(&config, &layers, &created),
            layers,
            config,
            created,
            source: source.into(),
        };
        self.save(&rec)?;
        Ok(rec)
    }

    /// An image config blob as OCI writes it, for content-addressed ids of images tweed makes.
    pub fn synth_config_id(config: &ImageConfig, layers: &[Digest], created: &str) -> Digest {
        let v = serde_json::json!({
            "architecture": import::go_arch(),
            "os": "linux",
            "created": created,
            "config": {
                "Env": config.env, "Entrypoint": config.entrypoint, "Cmd": config.cmd,
                "WorkingDir": config.working_dir, "User": config.user,
            },
            "rootfs": {"type": "layers", "diff_ids": layers},
        });
        Digest::of(v.to_string().as_bytes())
    }

    /// `image import --rootfs DIR NAME`.
    pub fn import_rootfs(&self, dir: &Path, name: &str) -> Result<ImageRecord, ImageError> {
        let name = normalize_name(name);
        if !valid_name(&name) {
            return Err(ImageError::BadName(name));
        }
        if !dir.is_dir() {
            return Err(ImageError::Io {
                path: dir.to_path_buf(),
                source: io::Error::from(io::ErrorKind::NotFound),
            });
        }
        let (diff_id, _) = self.add_layer_from_dir(dir, &diff::DiffOptions::default())?;
        let config = ImageConfig {
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            cmd: vec!["/bin/sh".into()],
            ..Default::default()
        };
        self.save_made(name, config, vec![diff_id], "rootfs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn names() {
        assert_eq!(normalize_name("busybox"), "busybox:latest");
        assert_eq!(normalize_name("busybox:1.35"), "busybox:1.35");
        assert_eq!(
            normalize_name("localhost:5000/bb"),
            "localhost:5000/bb:latest"
        );
        assert_eq!(normalize_name("a/b@sha256:00"), "a/b@sha256:00");
        assert!(valid_name("docker.io/library/busybox:latest"));
        assert!(!valid_name("../etc"));
        assert!(!valid_name("a b"));
        assert!(!valid_name(""));
        assert_eq!(encode_name("a/b:c"), "a%2Fb%3Ac");
    }

    #[test]
    fn records_round_trip_and_lookup() {
        let t = tempfile::tempdir().unwrap();
        let s = ImageStore::open(t.path()).unwrap();
        let rec = ImageRecord {
            name: "bb:latest".into(),
            id: Digest::of(b"cfg"),
            layers: vec![Digest::of(b"l1")],
            config: ImageConfig::default(),
            created: "x".into(),
            source: "test".into(),
        };
        s.save(&rec).unwrap();
        assert_eq!(s.get("bb").unwrap(), rec);
        assert_eq!(s.get("bb:latest").unwrap(), rec);
        let hub = ImageRecord {
            name: "docker.io/library/hub:v1".into(),
            ..rec.clone()
        };
        s.save(&hub).unwrap();
        assert_eq!(s.get("hub:v1").unwrap(), hub);
        s.remove_record("docker.io/library/hub:v1").unwrap();
        assert_eq!(s.get(&rec.id.hex()[..8]).unwrap(), rec);
        assert!(matches!(s.get("nope"), Err(ImageError::Unknown(_))));
        // Layers nobody references are collected; referenced ones stay.
        let tmp = s.temp_dir("t").unwrap();
        s.install_layer(&tmp, &rec.layers[0]).unwrap();
        let orphan = Digest::of(b"orphan");
        let tmp = s.temp_dir("t").unwrap();
        s.install_layer(&tmp, &orphan).unwrap();
        assert!(s.has_layer(&orphan));
        let removed = s.gc_layers(&HashSet::new()).unwrap();
        assert_eq!(removed, vec![orphan.to_string()]);
        assert!(!s.has_layer(&orphan));
        assert!(!s.mark_path(&orphan).exists());
        assert!(s.has_layer(&rec.layers[0]));
        s.remove_record("bb:latest").unwrap();
        assert!(s.list().unwrap().is_empty());
    }

    #[test]
    fn only_verified_layers_count() {
        let t = tempfile::tempdir().unwrap();
        let s = ImageStore::open(&t.path().join("store")).unwrap();
        for d in ["", "layers", "verified", "images", "tmp"] {
            let m = fs::metadata(t.path().join("store").join(d)).unwrap();
            assert_eq!(m.permissions().mode() & 0o7777, 0o700, "{d}");
        }
        let d = Digest::of(b"layer");
        // A directory that got there without verification (a crash, a hand-made one) is not a
        // layer, nor is a symlink to a host directory with a mark.
        fs::create_dir(s.layer_dir(&d)).unwrap();
        assert!(!s.has_layer(&d));
        fs::remove_dir(s.layer_dir(&d)).unwrap();
        std::os::unix::fs::symlink("/etc", s.layer_dir(&d)).unwrap();
        fs::write(s.mark_path(&d), format!("{d}\n")).unwrap();
        assert!(!s.has_layer(&d));
        let rec = ImageRecord {
            name: "x:1".into(),
            id: Digest::of(b"c"),
            layers: vec![d.clone()],
            config: ImageConfig::default(),
            created: String::new(),
            source: "test".into(),
        };
        let e = s.lower_dirs(&rec).unwrap_err().to_string();
        assert!(
            e.contains(d.as_str()) && e.contains("never verified"),
            "{e}"
        );
        // Installing replaces whatever unverified thing sat there, and marks it.
        let tmp = s.temp_dir("t").unwrap();
        fs::write(tmp.join("f"), "layer").unwrap();
        s.install_layer(&tmp, &d).unwrap();
        assert!(s.has_layer(&d));
        assert_eq!(fs::read(s.layer_dir(&d).join("f")).unwrap(), b"layer");
        assert_eq!(s.lower_dirs(&rec).unwrap(), vec![s.layer_dir(&d)]);
        assert_eq!(
            fs::metadata(s.mark_path(&d)).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A record naming a layer by a non-digest does not load.
        let p = s.record_path("bad:1");
        let mut v = serde_json::to_value(&rec).unwrap();
        v["layers"] = serde_json::json!(["sha256:../../../../etc"]);
        fs::write(&p, v.to_string()).unwrap();
        let e = s.get("bad:1").unwrap_err().to_string();
        assert!(
            e.contains("bad%3A1.json") && e.contains("not 64 lowercase hex"),
            "{e}"
        );
    }
}
