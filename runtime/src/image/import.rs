//! `image import FILE`: docker-save tarballs and OCI image layouts (directory or tar), every
//! blob checked against its sha256, every layer extracted once.
//!
//! Everything here is outside input. The archive is unpacked by the same extractor as layers
//! (nothing lands outside its temporary directory); every file the metadata names is resolved
//! inside it; every digest is parsed into a [`Digest`] where it is read, with the file and
//! field named in the error; a layer is stored only once its content hashed to its diff id.

use std::collections::HashMap;
use std::fs;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{
    io_err, layer, normalize_name, valid_name, ImageConfig, ImageError, ImageRecord, ImageStore,
    Limits,
};
use crate::digest::{self, Digest};
use crate::fsutil;

pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// GOARCH spelling of this machine's architecture, as image configs use.
pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

#[derive(Debug, Deserialize, Default)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Debug, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: HashMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

#[derive(Debug, Deserialize, Default)]
struct RunConfig {
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "User", default)]
    user: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct ConfigBlob {
    #[serde(default)]
    config: Option<RunConfig>,
    rootfs: RootFs,
    #[serde(default)]
    created: Option<String>,
}

/// Where the files of the thing being imported are: a directory, or a tar unpacked to a
/// temporary directory (removed on drop).
struct Source {
    root: PathBuf,
    tmp: Option<PathBuf>,
    shown: PathBuf,
}

impl Drop for Source {
    fn drop(&mut self) {
        if let Some(t) = &self.tmp {
            let _ = fsutil::remove_tree(t);
        }
    }
}

impl Source {
    fn open(store: &ImageStore, path: &Path, limits: &Limits) -> Result<Source, ImageError> {
        let meta = fs::metadata(path).map_err(io_err(path))?;
        if meta.is_dir() {
            return Ok(Source {
                root: path.to_path_buf(),
                tmp: None,
                shown: path.to_path_buf(),
            });
        }
        let tmp = store.temp_dir("import")?;
        let src = Source {
            root: tmp.clone(),
            tmp: Some(tmp.clone()),
            shown: path.to_path_buf(),
        };
        let f = fs::File::open(path).map_err(io_err(path))?;
        let r = decompress(BufReader::with_capacity(1 << 16, f), path, "")?;
        layer::extract(r, &tmp, layer::Mode::Archive, limits).map_err(|source| {
            ImageError::Archive {
                path: path.to_path_buf(),
                source,
            }
        })?;
        Ok(src)
    }

    /// A file named by the image's own metadata, refusing anything outside the source.
    fn resolve(&self, reference: &str) -> Result<PathBuf, ImageError> {
        let escape = || ImageError::BlobEscape {
            path: self.shown.clone(),
            reference: reference.to_string(),
        };
        let rel = layer::clean_path(Path::new(reference))
            .map_err(|_| escape())?
            .ok_or_else(escape)?;
        let p = self.root.join(rel);
        let canon_root = fs::canonicalize(&self.root).map_err(io_err(&self.root))?;
        match fs::canonicalize(&p) {
            Ok(c) if c.starts_with(&canon_root) => Ok(c),
            Ok(_) => Err(escape()),
            Err(e) => Err(ImageError::Malformed {
                path: self.shown.clone(),
                what: format!("{reference}: {e}"),
            }),
        }
    }

    /// Parses a digest found in `file` at `field`.
    fn digest(&self, file: &Path, field: &str, value: &str) -> Result<Digest, ImageError> {
        Digest::parse(value).map_err(|source| ImageError::BadDigest {
            path: file.to_path_buf(),
            field: field.to_string(),
            source,
        })
    }

    fn read_json<T: for<'de> Deserialize<'de>>(&self, p: &Path) -> Result<T, ImageError> {
        let data = fs::read(p).map_err(io_err(p))?;
        serde_json::from_slice(&data).map_err(|e| ImageError::Malformed {
            path: p.to_path_buf(),
            what: e.to_string(),
        })
    }
}

/// Wraps `r` in a decompressor chosen by magic bytes.
fn decompress<'a, R: io::BufRead + 'a>(
    mut r: R,
    path: &Path,
    media: &str,
) -> Result<Box<dyn Read + 'a>, ImageError> {
    let head = r.fill_buf().map_err(io_err(path))?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(r)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) || media.contains("zstd") {
        Err(ImageError::UnsupportedCompression {
            path: path.to_path_buf(),
            media: if media.is_empty() {
                "zstd".into()
            } else {
                media.to_string()
            },
        })
    } else {
        Ok(Box::new(r))
    }
}

/// Checks a blob's digest (and size when known).
fn verify_blob(path: &Path, expected: &Digest, size: Option<u64>) -> Result<(), ImageError> {
    let (actual, n) = digest::file_sha256(path).map_err(io_err(path))?;
    if let Some(s) = size {
        if s != n {
            return Err(ImageError::SizeMismatch {
                path: path.to_path_buf(),
                expected: s,
                actual: n,
            });
        }
    }
    if *expected != *actual {
        return Err(ImageError::DigestMismatch {
            path: path.to_path_buf(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
}

/// The digest a docker-archive file name claims (`<hex>.tar`, `<hex>.json`, `blobs/sha256/<hex>`).
pub fn digest_from_name(reference: &str) -> Option<Digest> {
    let last = reference.rsplit('/').next()?;
    let stem = last
        .strip_suffix(".tar")
        .or_else(|| last.strip_suffix(".json"))
        .unwrap_or(last);
    Digest::parse(&format!("sha256:{stem}")).ok()
}

/// The diff ids of a config blob, each parsed strictly (they become store paths).
fn diff_ids(src: &Source, cfg_path: &Path, cfg: &ConfigBlob) -> Result<Vec<Digest>, ImageError> {
    cfg.rootfs
        .diff_ids
        .iter()
        .enumerate()
        .map(|(i, d)| src.digest(cfg_path, &format!("rootfs.diff_ids[{i}]"), d))
        .collect()
}

impl ImageStore {
    /// Imports every image in a docker-save tarball or OCI layout (directory or tar). With
    /// `name`, the (first) image gets that name instead of its own tags.
    pub fn import(&self, path: &Path, name: Option<&str>) -> Result<Vec<ImageRecord>, ImageError> {
        self.import_with(path, name, &Limits::default())
    }

    /// [`ImageStore::import`] with explicit bounds on what each archive and layer may unpack to.
    pub fn import_with(
        &self,
        path: &Path,
        name: Option<&str>,
        limits: &Limits,
    ) -> Result<Vec<ImageRecord>, ImageError> {
        if let Some(n) = name {
            if !valid_name(&normalize_name(n)) {
                return Err(ImageError::BadName(n.to_string()));
            }
        }
        let src = Source::open(self, path, limits)?;
        let present = |f: &str| fs::symlink_metadata(src.root.join(f)).is_ok();
        if present("manifest.json") {
            self.import_docker(&src, name, limits)
        } else if present("index.json") {
            self.import_oci(&src, name, path, limits)
        } else {
            Err(ImageError::UnknownFormat {
                path: path.to_path_buf(),
            })
        }
    }

    fn import_layers(
        &self,
        src: &Source,
        layers: &[LayerRef],
        diff_ids: &[Digest],
        limits: &Limits,
    ) -> Result<(), ImageError> {
        if layers.len() != diff_ids.len() {
            return Err(ImageError::Malformed {
                path: src.shown.clone(),
                what: format!(
                    "{} layers but the config lists {} diff_ids",
                    layers.len(),
                    diff_ids.len()
                ),
            });
        }
        for ((p, desc, media), diff_id) in layers.iter().zip(diff_ids) {
            if let Some((d, size)) = desc {
                verify_blob(p, d, Some(*size))?;
            }
            // Only a layer whose content was hashed to this diff id when it was stored.
            if self.has_layer(diff_id) {
                continue;
            }
            let f = fs::File::open(p).map_err(io_err(p))?;
            let r = decompress(BufReader::with_capacity(1 << 16, f), p, media)?;
            self.add_layer(r, Some(diff_id), p, limits)?;
        }
        Ok(())
    }

    fn record_from(
        &self,
        cfg: ConfigBlob,
        diff_ids: &[Digest],
        config_digest: &Digest,
        names: Vec<String>,
        source: &str,
    ) -> Result<Vec<ImageRecord>, ImageError> {
        let rc = cfg.config.unwrap_or_default();
        let config = ImageConfig {
            env: rc.env.unwrap_or_default(),
            entrypoint: rc.entrypoint.unwrap_or_default(),
            cmd: rc.cmd.unwrap_or_default(),
            working_dir: rc.working_dir.unwrap_or_default(),
            user: rc.user.unwrap_or_default(),
        };
        let mut out = Vec::new();
        for n in names {
            let rec = ImageRecord {
                name: normalize_name(&n),
                id: config_digest.clone(),
                layers: diff_ids.to_vec(),
                config: config.clone(),
                created: cfg.created.clone().unwrap_or_default(),
                source: source.to_string(),
            };
            self.save(&rec)?;
            out.push(rec);
        }
        Ok(out)
    }

    fn import_docker(
        &self,
        src: &Source,
        name: Option<&str>,
        limits: &Limits,
    ) -> Result<Vec<ImageRecord>, ImageError> {
        let mpath = src.resolve("manifest.json")?;
        let entries: Vec<DockerEntry> = src.read_json(&mpath)?;
        let mut out = Vec::new();
        for (i, ent) in entries.iter().enumerate() {
            if name.is_some() && i > 0 {
                break;
            }
            let cfg_path = src.resolve(&ent.config)?;
            let (cfg_digest, _) = digest::file_sha256(&cfg_path).map_err(io_err(&cfg_path))?;
            let cfg_digest = Digest::parse(&cfg_digest).expect("sha256 digests are well-formed");
            if let Some(d) = digest_from_name(&ent.config) {
                verify_blob(&cfg_path, &d, None)?;
            }
            let cfg: ConfigBlob = src.read_json(&cfg_path)?;
            let diff_ids = diff_ids(src, &cfg_path, &cfg)?;
            let mut layers = Vec::new();
            for l in &ent.layers {
                let p = src.resolve(l)?;
                if let Some(d) = digest_from_name(l) {
                    // A file named by a digest must hash to it (skopeo names layers by diff id;
                    // Docker 25+ by blob digest).
                    if !diff_ids.contains(&d) {
                        verify_blob(&p, &d, None)?;
                    }
                }
                layers.push((p, None, String::new()));
            }
            // docker-save layers are uncompressed or gzip; their content must match the diff ids,
            // so a layer already in the store is still hashed here.
            for ((p, _, _), diff_id) in layers.iter().zip(&diff_ids) {
                if self.has_layer(diff_id) {
                    let f = fs::File::open(p).map_err(io_err(p))?;
                    let r = decompress(BufReader::with_capacity(1 << 16, f), p, "")?;
                    let (actual, _) = digest::HashingReader::new(r).finish().map_err(io_err(p))?;
                    if *diff_id != *actual {
                        return Err(ImageError::DiffIdMismatch {
                            path: p.clone(),
                            expected: diff_id.to_string(),
                            actual,
                        });
                    }
                }
            }
            self.import_layers(src, &layers, &diff_ids, limits)?;
            let names = match name {
                Some(n) => vec![n.to_string()],
                None => match &ent.repo_tags {
                    Some(t) if !t.is_empty() => t.clone(),
                    _ => {
                        return Err(ImageError::NoName {
                            path: src.shown.clone(),
                        })
                    }
                },
            };
            out.extend(self.record_from(cfg, &diff_ids, &cfg_digest, names, "docker-archive")?);
        }
        Ok(out)
    }

    fn import_oci(
        &self,
        src: &Source,
        name: Option<&str>,
        path: &Path,
        limits: &Limits,
    ) -> Result<Vec<ImageRecord>, ImageError> {
        let ipath = src.resolve("index.json")?;
        let index: Index = src.read_json(&ipath)?;
        let stem = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into());
        let stem = stem
            .strip_suffix(".tar")
            .unwrap_or(&stem)
            .trim_end_matches(".oci")
            .to_string();
        let mut out = Vec::new();
        for (i, desc) in index.manifests.iter().enumerate() {
            if name.is_some() && i > 0 {
                break;
            }
            let refname = desc
                .annotations
                .get("org.opencontainers.image.ref.name")
                .cloned();
            let mdigest = src.digest(&ipath, &format!("manifests[{i}].digest"), &desc.digest)?;
            let manifest_desc = self.pick_manifest(src, desc, mdigest, &ipath, 0)?;
            let mpath = self.blob(src, &manifest_desc.digest)?;
            verify_blob(&mpath, &manifest_desc.digest, Some(manifest_desc.size))?;
            let m: Manifest = src.read_json(&mpath)?;
            let cdigest = src.digest(&mpath, "config.digest", &m.config.digest)?;
            let cpath = self.blob(src, &cdigest)?;
            verify_blob(&cpath, &cdigest, Some(m.config.size))?;
            let cfg: ConfigBlob = src.read_json(&cpath)?;
            let diff_ids = diff_ids(src, &cpath, &cfg)?;
            let mut ldigests = Vec::new();
            for (j, l) in m.layers.iter().enumerate() {
                ldigests.push(src.digest(&mpath, &format!("layers[{j}].digest"), &l.digest)?);
            }
            let mut layers = Vec::new();
            for (l, d) in m.layers.iter().zip(&ldigests) {
                let p = self.blob(src, d)?;
                layers.push((p, Some((d, l.size)), l.media_type.clone()));
            }
            self.import_layers(src, &layers, &diff_ids, limits)?;
            let n = match (name, refname) {
                (Some(n), _) => n.to_string(),
                (None, Some(r)) if r.contains(':') || r.contains('/') => r,
                (None, Some(r)) => format!("{stem}:{r}"),
                (None, None) => {
                    return Err(ImageError::NoName {
                        path: src.shown.clone(),
                    })
                }
            };
            out.extend(self.record_from(cfg, &diff_ids, &cdigest, vec![n], "oci-layout")?);
        }
        if out.is_empty() {
            return Err(ImageError::Malformed {
                path: ipath,
                what: "the index lists no manifests".into(),
            });
        }
        Ok(out)
    }

    fn blob(&self, src: &Source, d: &Digest) -> Result<PathBuf, ImageError> {
        src.resolve(&format!("blobs/sha256/{}", d.hex()))
    }

    /// Follows nested indexes to the manifest for this platform (`digest`: `desc`'s, parsed).
    fn pick_manifest(
        &self,
        src: &Source,
        desc: &Descriptor,
        digest: Digest,
        file: &Path,
        depth: usize,
    ) -> Result<OwnedDesc, ImageError> {
        if desc.media_type != MEDIA_OCI_INDEX && desc.media_type != MEDIA_DOCKER_LIST {
            return Ok(OwnedDesc {
                digest,
                size: desc.size,
            });
        }
        // Content addressing rules out cycles, but not a deep chain of distinct indexes.
        if depth >= 8 {
            return Err(ImageError::Malformed {
                path: file.to_path_buf(),
                what: "image indexes nested more than 8 deep".into(),
            });
        }
        let p = self.blob(src, &digest)?;
        verify_blob(&p, &digest, Some(desc.size))?;
        let idx: Index = src.read_json(&p)?;
        let (i, pick) = idx
            .manifests
            .iter()
            .enumerate()
            .find(|(_, m)| {
                m.platform
                    .as_ref()
                    .is_some_and(|pl| pl.architecture == go_arch() && pl.os == "linux")
            })
            .or(idx.manifests.first().map(|m| (0, m)))
            .ok_or_else(|| ImageError::Malformed {
                path: p.clone(),
                what: "empty image index".into(),
            })?;
        let d = src.digest(&p, &format!("manifests[{i}].digest"), &pick.digest)?;
        self.pick_manifest(src, pick, d, &p, depth + 1)
    }
}

/// A layer file, its descriptor (digest, size) when known, and its media type.
type LayerRef<'a> = (PathBuf, Option<(&'a Digest, u64)>, String);

struct OwnedDesc {
    digest: Digest,
    size: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_from_docker_names() {
        let h = "a".repeat(64);
        let d = Some(Digest::parse(&format!("sha256:{h}")).unwrap());
        assert_eq!(digest_from_name(&format!("{h}.tar")), d);
        assert_eq!(digest_from_name(&format!("{h}.json")), d);
        assert_eq!(digest_from_name(&format!("blobs/sha256/{h}")), d);
        assert_eq!(digest_from_name(&format!("{h}/layer.tar")), None);
        assert_eq!(digest_from_name("config.json"), None);
    }

    #[test]
    fn escaping_references_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), "x").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), t.path().join("link")).unwrap();
        let src = Source {
            root: t.path().to_path_buf(),
            tmp: None,
            shown: t.path().to_path_buf(),
        };
        for bad in ["../x", "/etc/passwd", "link"] {
            assert!(
                matches!(src.resolve(bad), Err(ImageError::BlobEscape { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn tampered_blob_is_detected() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("b");
        fs::write(&p, "hello").unwrap();
        let good = Digest::of(b"hello");
        verify_blob(&p, &good, Some(5)).unwrap();
        assert!(matches!(
            verify_blob(&p, &Digest::of(b"other"), None),
            Err(ImageError::DigestMismatch { .. })
        ));
        assert!(matches!(
            verify_blob(&p, &good, Some(4)),
            Err(ImageError::SizeMismatch { .. })
        ));
    }
}
