//! The node's WireGuard private key: generated once, stored base64 (as `wg genkey` prints it)
//! with mode 0400, and reused by every later start, so peers keep the public key they know.
//!
//! The file is flannel's `/run/flannel/wgkey` equivalent: tweed keeps it in its state dir, and
//! `$WIREGUARD_KEY_FILE` (flannel's variable) names another path. A file that is there but is not
//! a key is an error naming the file, never overwritten: it may be the operator's key.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use tweed_config::network::decode_wg_key;

/// flannel's variable naming the key file.
pub const KEY_FILE_ENV: &str = "WIREGUARD_KEY_FILE";
/// The key file's name in the state dir.
pub const KEY_FILE_NAME: &str = "wgkey";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("wireguard key file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("wireguard key file {path}: {reason}; remove it to have a new key generated")]
    Corrupt { path: PathBuf, reason: String },
}

/// A private key. Its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey([u8; 32]);

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(<redacted>, public {})", self.public())
    }
}

/// A public key, shown base64 as `wg` and leases spell it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&encode(&self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

pub fn encode(k: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(k)
}

impl PrivateKey {
    /// A new key from the OS's random source, clamped as Curve25519 secrets are (as `wg genkey`
    /// stores them, so the file reads the same to `wg`).
    pub fn generate() -> PrivateKey {
        let mut k: [u8; 32] = rand::random();
        k[0] &= 248;
        k[31] &= 127;
        k[31] |= 64;
        PrivateKey(k)
    }

    pub fn from_bytes(k: [u8; 32]) -> PrivateKey {
        PrivateKey(k)
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn public(&self) -> PublicKey {
        let s = x25519_dalek::StaticSecret::from(self.0);
        PublicKey(x25519_dalek::PublicKey::from(&s).to_bytes())
    }
}

/// Where the key lives: `$WIREGUARD_KEY_FILE` when set (`env` is its value), else the state dir.
pub fn key_path(state_dir: &Path, env: Option<&std::ffi::OsStr>) -> PathBuf {
    match env {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => state_dir.join(KEY_FILE_NAME),
    }
}

/// Reads the key at `path`, or generates and stores one when there is none. `Ok((key, true))`
/// when it was generated now.
pub fn load_or_create(path: &Path) -> Result<(PrivateKey, bool), KeyError> {
    match read(path)? {
        Some(k) => Ok((k, false)),
        None => {
            let k = PrivateKey::generate();
            store(path, &k)?;
            Ok((k, true))
        }
    }
}

/// The key in `path`; `None` when there is no such file.
pub fn read(path: &Path) -> Result<Option<PrivateKey>, KeyError> {
    let io_err = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    let corrupt = |reason: String| KeyError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    if !meta.is_file() {
        return Err(corrupt("not a regular file".into()));
    }
    // A key is 44 characters; anything much larger is not one, and is not read into memory.
    if meta.len() > 256 {
        return Err(corrupt(format!(
            "{} bytes is too long for a key",
            meta.len()
        )));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "wireguard: the private key file is readable by others than its owner");
    }
    let text = fs::read(path).map_err(io_err)?;
    let text = std::str::from_utf8(&text).map_err(|_| corrupt("not text".into()))?;
    let k = decode_wg_key(text).map_err(corrupt)?;
    Ok(Some(PrivateKey(k)))
}

/// Stores `key` at `path` with mode 0400, replacing what is there in one rename: a crash leaves
/// either the old key or the new one, never half of one.
pub fn store(path: &Path, key: &PrivateKey) -> Result<(), KeyError> {
    let io_err = |p: &Path, source| KeyError::Io {
        path: p.to_path_buf(),
        source,
    };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(d) = dir {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(d)
            .map_err(|e| io_err(d, e))?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| KEY_FILE_NAME.into());
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let write = || -> io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(&tmp)?;
        f.write_all(encode(&key.0).as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(d) = dir {
            fs::File::open(d)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_err(path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_mode_0400_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/wgkey");
        let (k1, new1) = load_or_create(&path).unwrap();
        assert!(new1);
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o400);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), 44, "{text:?}");
        let (k2, new2) = load_or_create(&path).unwrap();
        assert!(!new2);
        assert_eq!(k1, k2);
        assert_eq!(k1.public(), k2.public());
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn a_key_written_by_wg_is_read_and_its_public_key_matches() {
        // RFC 7748 section 6.1: Alice's private key and public key.
        let private = "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=";
        let public = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        fs::write(&path, format!("{private}\n")).unwrap();
        let k = read(&path).unwrap().unwrap();
        assert_eq!(k.public().to_string(), public);
        assert!(!format!("{k:?}").contains(private));
    }

    #[test]
    fn a_corrupt_key_file_is_an_error_naming_it_and_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wgkey");
        for bad in [
            &b"not a key"[..],
            b"",
            b"AAECAwQFBgcICQoLDA0ODw==",
            b"\xff\xfe",
            &[b'A'; 4096][..],
        ] {
            fs::write(&path, bad).unwrap();
            let e = load_or_create(&path).unwrap_err();
            assert!(matches!(e, KeyError::Corrupt { .. }), "{e}");
            assert!(e.to_string().contains(&path.display().to_string()), "{e}");
            assert_eq!(fs::read(&path).unwrap(), bad, "the file was changed");
        }
        fs::remove_file(&path).unwrap();
        fs::create_dir(&path).unwrap();
        assert!(matches!(
            load_or_create(&path).unwrap_err(),
            KeyError::Corrupt { .. }
        ));
        // A symlink is not followed to whatever it names.
        let target = dir.path().join("elsewhere");
        fs::write(&target, encode(PrivateKey::generate().bytes())).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(read(&link).is_err());
    }

    #[test]
    fn env_var_names_the_file() {
        let state = Path::new("/var/lib/tweed");
        assert_eq!(key_path(state, None), state.join("wgkey"));
        assert_eq!(
            key_path(state, Some("/etc/wg/key".as_ref())),
            PathBuf::from("/etc/wg/key")
        );
        assert_eq!(key_path(state, Some("".as_ref())), state.join("wgkey"));
    }

    #[test]
    fn store_replaces_a_key_in_one_step() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wgkey");
        let (old, _) = load_or_create(&path).unwrap();
        let new = PrivateKey::generate();
        store(&path, &new).unwrap();
        assert_eq!(read(&path).unwrap().unwrap(), new);
        assert_ne!(old, new);
    }
}
