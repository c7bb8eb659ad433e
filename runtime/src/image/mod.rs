//! The image store: content-addressed extracted layers shared by images, and image records.
//!
//! ```text
//! <root>/layers/<diff-id hex>/     one extracted layer (overlay lower dir), made once
//! <root>/images/<name>.json        an image: its layers (bottom first) and run config
//! <root>/tmp/                      extraction in progress (renamed into layers/ when complete)
//! ```

pub mod diff;
pub mod import;
pub mod layer;

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::{self, HashingReader};
use crate::fsutil;

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
    pub id: String,
    /// Layer diff ids, bottom first.
    pub layers: Vec<String>,
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
        for d in ["layers", "images", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(ImageStore {
            root: root.to_path_buf(),
        })
    }

    pub fn layer_dir(&self, diff_id: &str) -> PathBuf {
        self.root.join("layers").join(digest::hex_part(diff_id))
    }

    pub fn has_layer(&self, diff_id: &str) -> bool {
        self.layer_dir(diff_id).is_dir()
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
    /// stream's digest must match it. Returns the diff id. A layer already present is reused.
    pub fn add_layer<R: Read>(
        &self,
        reader: R,
        expected: Option<&str>,
        what: &Path,
    ) -> Result<String, ImageError> {
        let tmp = self.temp_dir("layer")?;
        let result = (|| {
            let mut hr = HashingReader::new(reader);
            let r = layer::extract(&mut hr, &tmp);
            let r = r.map_err(|source| ImageError::Layer {
                layer: fsutil::show(what),
                source,
            })?;
            let (diff_id, _) = hr.finish().map_err(io_err(what))?;
            let _ = r;
            if let Some(exp) = expected {
                if exp != diff_id {
                    return Err(ImageError::DiffIdMismatch {
                        path: what.to_path_buf(),
                        expected: exp.to_string(),
                        actual: diff_id,
                    });
                }
            }
            let dest = self.layer_dir(&diff_id);
            match fs::rename(&tmp, &dest) {
                Ok(()) => {}
                // Someone else (another import) extracted it first: theirs is identical.
                Err(_) if dest.is_dir() => fsutil::remove_tree(&tmp).map_err(io_err(&tmp))?,
                Err(e) => return Err(io_err(&dest)(e)),
            }
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
    ) -> Result<String, ImageError> {
        let tmp = self.temp_dir("diff")?;
        let tarp = tmp.join("layer.tar");
        let result = (|| {
            let f = fs::File::create(&tarp).map_err(io_err(&tarp))?;
            let w = digest::HashingWriter::new(io::BufWriter::new(f));
            let (w, _) = diff::write_layer(dir, w, opts).map_err(|source| ImageError::Diff {
                path: dir.to_path_buf(),
                source,
            })?;
            let (diff_id, _) = w.finish().map_err(io_err(&tarp))?;
            if self.has_layer(&diff_id) {
                return Ok(diff_id);
            }
            let f = fs::File::open(&tarp).map_err(io_err(&tarp))?;
            self.add_layer(io::BufReader::new(f), Some(&diff_id), dir)
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
                .filter(|r| digest::hex_part(&r.id).starts_with(hexref))
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
            used.extend(r.layers.iter().map(|d| digest::hex_part(d).to_string()));
        }
        let dir = self.root.join("layers");
        let mut removed = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !used.contains(&name) {
                fsutil::remove_tree(&e.path()).map_err(io_err(&e.path()))?;
                removed.push(format!("sha256:{name}"));
            }
        }
        Ok(removed)
    }

    /// Overlay lower dirs for an image, topmost first (overlayfs's order).
    pub fn lower_dirs(&self, rec: &ImageRecord) -> Vec<PathBuf> {
        rec.layers.iter().rev().map(|d| self.layer_dir(d)).collect()
    }

    /// Records an image tweed made itself (`source`: a rootfs import or a commit), created
    /// now, with the content-addressed id of the config blob OCI would write for it.
    pub fn save_made(
        &self,
        name: String,
        config: ImageConfig,
        layers: Vec<String>,
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
    pub fn synth_config_id(config: &ImageConfig, layers: &[String], created: &str) -> String {
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
        digest::sha256_of(v.to_string().as_bytes())
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
        let diff_id = self.add_layer_from_dir(dir, &diff::DiffOptions::default())?;
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
            id: digest::sha256_of(b"cfg"),
            layers: vec![digest::sha256_of(b"l1")],
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
        assert_eq!(s.get(&digest::hex_part(&rec.id)[..8]).unwrap(), rec);
        assert!(matches!(s.get("nope"), Err(ImageError::Unknown(_))));
        // Layers nobody references are collected; referenced ones stay.
        fs::create_dir(s.layer_dir(&rec.layers[0])).unwrap();
        fs::create_dir(s.layer_dir(&digest::sha256_of(b"orphan"))).unwrap();
        let removed = s.gc_layers(&HashSet::new()).unwrap();
        assert_eq!(removed, vec![digest::sha256_of(b"orphan")]);
        assert!(s.has_layer(&rec.layers[0]));
        s.remove_record("bb:latest").unwrap();
        assert!(s.list().unwrap().is_empty());
    }
}
