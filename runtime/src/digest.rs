//! sha256 helpers: the [`Digest`] type (the only way a digest becomes a path), hashing readers
//! and writers, file hashing.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Why a string is not a digest tweed accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest {0:?} has no algorithm (expected sha256:<64 lowercase hex>)")]
    NoAlgorithm(String),
    #[error("digest {value:?} uses {algorithm:?}: only sha256 is supported")]
    Algorithm { value: String, algorithm: String },
    #[error("digest {0:?} is not 64 lowercase hex digits after sha256:")]
    BadHex(String),
}

/// A `sha256:<64 lowercase hex>` digest, checked when made: it cannot hold `/`, `..` or
/// anything else, so [`Digest::hex`] is always safe as one path component.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// Parses strictly: `sha256:` then exactly 64 of `0-9a-f`.
    pub fn parse(s: &str) -> Result<Digest, DigestError> {
        // Shown in errors: a hostile value may be long or hold control characters.
        let shown = || s.chars().take(100).collect::<String>();
        let Some((alg, hex)) = s.split_once(':') else {
            return Err(DigestError::NoAlgorithm(shown()));
        };
        if alg != "sha256" {
            return Err(DigestError::Algorithm {
                value: shown(),
                algorithm: alg.chars().take(40).collect(),
            });
        }
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(DigestError::BadHex(shown()));
        }
        Ok(Digest(s.to_string()))
    }

    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest(sha256_of(data))
    }

    /// The 64 hex digits: one safe path component.
    pub fn hex(&self) -> &str {
        &self.0[7..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Digest, DigestError> {
        Digest::parse(s)
    }
}

impl PartialEq<str> for Digest {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

pub fn hex(bytes: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(H[(b >> 4) as usize] as char);
        s.push(H[(b & 15) as usize] as char);
    }
    s
}

/// `sha256:<hex>` of `data`.
pub fn sha256_of(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

/// Whether `s` is a well-formed `sha256:<64 hex>` digest.
pub fn is_sha256(s: &str) -> bool {
    Digest::parse(s).is_ok()
}

/// The hex part of a `sha256:` digest.
pub fn hex_part(d: &str) -> &str {
    d.strip_prefix("sha256:").unwrap_or(d)
}

/// Reads through, hashing every byte; also counts them.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    pub count: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }
    /// Drains the rest of the input (so the digest covers all of it) and returns the digest.
    pub fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((
            format!("sha256:{}", hex(&self.hasher.finalize())),
            self.count,
        ))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Writes through, hashing every byte.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    pub count: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }
    pub fn finish(mut self) -> io::Result<(String, W)> {
        self.inner.flush()?;
        Ok((
            format!("sha256:{}", hex(&self.hasher.finalize())),
            self.inner,
        ))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Digest and size of a file.
pub fn file_sha256(path: &Path) -> io::Result<(String, u64)> {
    let f = std::fs::File::open(path)?;
    HashingReader::new(io::BufReader::with_capacity(1 << 16, f)).finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digest() {
        assert_eq!(
            sha256_of(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(is_sha256(&sha256_of(b"x")));
        assert!(!is_sha256("sha256:abc"));
        assert!(!is_sha256(
            "md5:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        ));
    }

    #[test]
    fn digests_parse_strictly() {
        let good = format!("sha256:{}", "0123456789abcdef".repeat(4));
        let d = Digest::parse(&good).unwrap();
        assert_eq!(d.hex(), &good[7..]);
        assert_eq!(d.to_string(), good);
        let upper = format!("sha256:{}", "A".repeat(64));
        for (bad, want) in [
            ("sha256:../../../../../../../../etc", "not 64 lowercase hex"),
            (upper.as_str(), "not 64 lowercase hex"),
            ("sha256:", "not 64 lowercase hex"),
            (&format!("{good}0"), "not 64 lowercase hex"),
            (&format!("{good}/"), "not 64 lowercase hex"),
            (&good[7..], "no algorithm"),
            (&format!("sha512:{}", "a".repeat(128)), "only sha256"),
            (&format!("SHA256:{}", "a".repeat(64)), "only sha256"),
            (
                &format!("sha256:{}\n", "a".repeat(63)),
                "not 64 lowercase hex",
            ),
        ] {
            let e = Digest::parse(bad).unwrap_err().to_string();
            assert!(e.contains(want), "{bad:?}: {e}");
        }
        // Serde goes through the same check.
        let v: Result<Vec<Digest>, _> = serde_json::from_str(r#"["sha256:../etc"]"#);
        assert!(v.unwrap_err().to_string().contains("not 64 lowercase hex"));
        let v: Vec<Digest> = serde_json::from_str(&format!("[\"{good}\"]")).unwrap();
        assert_eq!(serde_json::to_string(&v).unwrap(), format!("[\"{good}\"]"));
        // A 64-character multi-byte string is not 64 bytes of hex (no slicing panic).
        assert!(Digest::parse(&format!("sha256:{}", "é".repeat(32))).is_err());
    }

    #[test]
    fn reader_and_writer_agree() {
        let data = vec![7u8; 100_000];
        let (d1, n) = HashingReader::new(&data[..]).finish().unwrap();
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(&data).unwrap();
        let (d2, out) = w.finish().unwrap();
        assert_eq!(d1, d2);
        assert_eq!(n, 100_000);
        assert_eq!(out.len(), 100_000);
        assert_eq!(d1, sha256_of(&data));
    }
}
