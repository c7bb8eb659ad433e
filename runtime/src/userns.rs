//! User namespaces for a container (`--userns auto|UID:GID:COUNT`), the pure part: the option,
//! the `/etc/subuid` and `/etc/subgid` entries that delegate host ids to tweed, the choice of a
//! range for a new container, and the `uid_map`/`gid_map` text the supervisor writes.
//!
//! Off by default, as in Docker. With it, uid 0 in the container is an unprivileged uid on the
//! host: a process that escapes its other confinement holds no host privilege, and files it
//! creates in the writable layer belong to that uid. Only ranges the administrator delegated to
//! the [`OWNER`] user in both files are ever used, and never one that contains host uid or gid 0,
//! so a crafted or damaged subid file can at worst make the option fail.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The user whose `/etc/subuid` and `/etc/subgid` entries tweed allots containers from
/// (Docker's equivalent is `dockremap`, Podman's `containers`).
pub const OWNER: &str = "tweed";
/// Ids per container with `--userns auto`: 0..65535 inside, enough for every id an image's
/// files and `/etc/passwd` name, and the usual block size shadow-utils hands out.
pub const AUTO_SIZE: u32 = 65536;
/// Subid files are a few lines; anything this large is not one.
pub const MAX_FILE: u64 = 1 << 20;
pub const SUBUID: &str = "/etc/subuid";
pub const SUBGID: &str = "/etc/subgid";

#[derive(Debug, thiserror::Error)]
pub enum UsernsError {
    #[error("--userns {0:?}: expected auto or UID:GID:COUNT (host ids, COUNT >= 1)")]
    BadOpt(String),
    #[error("--userns cannot be combined with --privileged (Docker refuses it too)")]
    Privileged,
    #[error("--userns {opt:?}: {why}")]
    BadRange { opt: String, why: &'static str },
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: larger than {MAX_FILE} bytes, not a subordinate id file")]
    TooLarge { path: PathBuf },
    #[error("{path}:{line}: {why}; line skipped")]
    Entry {
        path: PathBuf,
        line: usize,
        why: String,
    },
    #[error(
        "{path}: no usable range for user {OWNER:?}; add one, e.g. `{OWNER}:100000:{AUTO_SIZE}0`"
    )]
    NoRange { path: PathBuf },
    #[error(
        "{path}: every range of user {OWNER:?} is in use by other containers \
         ({size} ids per container); delegate more"
    )]
    Exhausted { path: PathBuf, size: u32 },
    #[error("--userns {opt:?}: host ids {start}..{end} are not delegated to {OWNER:?} in {path}")]
    NotDelegated {
        opt: String,
        path: PathBuf,
        start: u32,
        end: u64,
    },
}

/// What `--userns` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsernsOpt {
    /// A free block of [`AUTO_SIZE`] ids from the subid files.
    Auto,
    /// Container ids 0..count map to host uids uid.. and gids gid..; must be delegated.
    Fixed { uid: u32, gid: u32, count: u32 },
}

/// A block of host ids: `start .. start + count`. Never empty, never past `u32::MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdRange {
    pub start: u32,
    pub count: u32,
}

impl IdRange {
    /// `None` when empty or when it would run past the last id.
    pub fn new(start: u32, count: u32) -> Option<IdRange> {
        if count == 0 || u64::from(start) + u64::from(count) > u64::from(u32::MAX) + 1 {
            return None;
        }
        Some(IdRange { start, count })
    }
    /// One past the last id (a u64 so that a range ending at `u32::MAX` has an end).
    pub fn end(&self) -> u64 {
        u64::from(self.start) + u64::from(self.count)
    }
    pub fn overlaps(&self, o: &IdRange) -> bool {
        u64::from(self.start) < o.end() && u64::from(o.start) < self.end()
    }
    pub fn contains(&self, o: &IdRange) -> bool {
        self.start <= o.start && o.end() <= self.end()
    }
}

/// A container's user namespace, recorded in its config: container id 0 is host `uid.start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    pub uid: IdRange,
    pub gid: IdRange,
}

impl Mapping {
    /// `/proc/PID/uid_map`: one line, the whole range from container id 0. The kernel wants it
    /// in a single write.
    pub fn uid_map(&self) -> String {
        map_line(&self.uid)
    }
    pub fn gid_map(&self) -> String {
        map_line(&self.gid)
    }
    /// The host uid of container uid `id`, if mapped (for chowning the writable layer).
    pub fn host_uid(&self, id: u32) -> Option<u32> {
        (id < self.uid.count).then(|| self.uid.start + id)
    }
    pub fn host_gid(&self, id: u32) -> Option<u32> {
        (id < self.gid.count).then(|| self.gid.start + id)
    }
    /// The container uid that host uid `host` is inside, if mapped (for `commit`).
    pub fn container_uid(&self, host: u32) -> Option<u32> {
        back(&self.uid, host)
    }
    pub fn container_gid(&self, host: u32) -> Option<u32> {
        back(&self.gid, host)
    }
    /// A host owner as the container sees it: each id shifted back into the container's
    /// range, or [`OVERFLOW_ID`] when outside the map, as the kernel shows it inside. The
    /// bool says whether either was outside.
    pub fn to_container(&self, uid: u32, gid: u32) -> (u32, u32, bool) {
        let (u, g) = (self.container_uid(uid), self.container_gid(gid));
        (
            u.unwrap_or(OVERFLOW_ID),
            g.unwrap_or(OVERFLOW_ID),
            u.is_none() || g.is_none(),
        )
    }
}

/// What a user namespace shows for an id its map does not cover (the kernel's
/// `overflowuid`/`overflowgid` default, `nobody`/`nogroup`).
pub const OVERFLOW_ID: u32 = 65534;

fn back(r: &IdRange, host: u32) -> Option<u32> {
    (u64::from(host) >= u64::from(r.start) && u64::from(host) < r.end()).then(|| host - r.start)
}

fn map_line(r: &IdRange) -> String {
    format!("0 {} {}\n", r.start, r.count)
}

impl fmt::Display for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "uid 0->{} gid 0->{} ({} ids)",
            self.uid.start, self.gid.start, self.uid.count
        )
    }
}

/// Parses the `--userns` value. "host" and the empty string are not accepted: leaving the option
/// out is how to say "no user namespace".
pub fn parse_opt(s: &str) -> Result<UsernsOpt, UsernsError> {
    if s == "auto" {
        return Ok(UsernsOpt::Auto);
    }
    let bad = || UsernsError::BadOpt(s.to_string());
    let parts: Vec<&str> = s.split(':').collect();
    let [uid, gid, count] = parts[..] else {
        return Err(bad());
    };
    let (uid, gid, count) = (num(uid).ok_or_else(bad)?, num(gid).ok_or_else(bad)?, {
        num(count).ok_or_else(bad)?
    });
    let range_err = |why| UsernsError::BadRange {
        opt: s.to_string(),
        why,
    };
    if count == 0 {
        return Err(range_err("COUNT must be at least 1"));
    }
    let (Some(u), Some(g)) = (IdRange::new(uid, count), IdRange::new(gid, count)) else {
        return Err(range_err("the range runs past the last id (4294967295)"));
    };
    if u.start == 0 || g.start == 0 {
        return Err(range_err(
            "container root would be host root; a user namespace then protects nothing",
        ));
    }
    Ok(UsernsOpt::Fixed { uid, gid, count })
}

/// A plain decimal u32: no sign, no spaces, no hex, no leading `+`, at most 10 digits.
fn num(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The ranges a subid file delegates to [`OWNER`] (by name or by `owner_uid`), in file order,
/// plus one error per line skipped. Lines of other users are not checked beyond their owner
/// field: they are not ours to judge. `#` comments and blank lines are ignored.
pub fn parse_subid(
    path: &Path,
    text: &str,
    owner_uid: Option<u32>,
) -> (Vec<IdRange>, Vec<UsernsError>) {
    let (mut ranges, mut skipped) = (Vec::new(), Vec::new());
    let owner_uid = owner_uid.map(|u| u.to_string());
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let skip = |why: String| UsernsError::Entry {
            path: path.to_path_buf(),
            line: line_no,
            why,
        };
        let mut fields = t.split(':');
        let owner = fields.next().unwrap_or_default();
        if owner != OWNER && Some(owner) != owner_uid.as_deref() {
            continue;
        }
        let rest: Vec<&str> = fields.collect();
        let [start, count] = rest[..] else {
            skipped.push(skip(format!(
                "expected {OWNER}:START:COUNT, found {} fields",
                rest.len() + 1
            )));
            continue;
        };
        let (Some(start), Some(count)) = (num(start), num(count)) else {
            skipped.push(skip("START and COUNT must be decimal numbers".into()));
            continue;
        };
        let Some(r) = IdRange::new(start, count) else {
            skipped.push(skip(format!(
                "{start}+{count} is empty or runs past the last id"
            )));
            continue;
        };
        if start == 0 {
            skipped.push(skip(
                "the range contains host id 0 (root); refusing to map it into a container".into(),
            ));
            continue;
        }
        ranges.push(r);
    }
    (ranges, skipped)
}

/// The uid of [`OWNER`] in the host's `/etc/passwd`, if that user exists.
pub fn owner_uid() -> Option<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next() == Some(OWNER)).then(|| f.nth(1).and_then(num))?
    })
}

/// Reads a subid file, refusing anything over [`MAX_FILE`] and any non-UTF-8 content.
pub fn read_subid_file(path: &Path) -> Result<String, UsernsError> {
    let read = |source| UsernsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(path).map_err(read)?;
    let mut buf = Vec::new();
    f.take(MAX_FILE + 1).read_to_end(&mut buf).map_err(read)?;
    if buf.len() as u64 > MAX_FILE {
        return Err(UsernsError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    String::from_utf8(buf).map_err(|_| {
        read(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not UTF-8",
        ))
    })
}

/// The first block of `size` ids inside one of `delegated` that overlaps none of `used` (the
/// blocks of the containers that exist). Blocks start on a multiple of `size` from their
/// delegated range's start, so containers do not share partial blocks.
pub fn choose(
    path: &Path,
    delegated: &[IdRange],
    used: &[IdRange],
    size: u32,
) -> Result<IdRange, UsernsError> {
    if delegated.is_empty() {
        return Err(UsernsError::NoRange {
            path: path.to_path_buf(),
        });
    }
    for d in delegated {
        let mut start = u64::from(d.start);
        while start + u64::from(size) <= d.end() {
            // Fits in u32: start + size <= d.end() <= u32::MAX + 1.
            let cand = IdRange {
                start: start as u32,
                count: size,
            };
            match used
                .iter()
                .filter(|u| u.overlaps(&cand))
                .map(|u| u.end())
                .max()
            {
                None => return Ok(cand),
                // Jump past the furthest block in the way, to the next aligned start.
                Some(end) => {
                    let off = end - u64::from(d.start);
                    let s = u64::from(size);
                    start = u64::from(d.start) + off.div_ceil(s) * s;
                }
            }
        }
    }
    Err(UsernsError::Exhausted {
        path: path.to_path_buf(),
        size,
    })
}

/// The subid files as read, with their paths, for [`resolve`].
pub struct SubIds<'a> {
    pub uid_path: &'a Path,
    pub uid_text: &'a str,
    pub gid_path: &'a Path,
    pub gid_text: &'a str,
    /// The numeric uid of [`OWNER`], if it exists: shadow-utils accepts either in the files.
    pub owner_uid: Option<u32>,
}

/// The mapping for a new container: `opt` checked against the delegation in the subid files and
/// against `used` (the mappings of the containers that exist). Returns the lines skipped as
/// well, also on failure, for the caller to log: they often are the reason.
pub fn resolve(
    opt: UsernsOpt,
    opt_text: &str,
    files: &SubIds<'_>,
    used: &[Mapping],
) -> (Result<Mapping, UsernsError>, Vec<UsernsError>) {
    let (uids, mut skipped) = parse_subid(files.uid_path, files.uid_text, files.owner_uid);
    let (gids, gskipped) = parse_subid(files.gid_path, files.gid_text, files.owner_uid);
    skipped.extend(gskipped);
    (pick(opt, opt_text, files, &uids, &gids, used), skipped)
}

fn pick(
    opt: UsernsOpt,
    opt_text: &str,
    files: &SubIds<'_>,
    uids: &[IdRange],
    gids: &[IdRange],
    used: &[Mapping],
) -> Result<Mapping, UsernsError> {
    let mapping = match opt {
        UsernsOpt::Auto => {
            let used_u: Vec<IdRange> = used.iter().map(|m| m.uid).collect();
            let used_g: Vec<IdRange> = used.iter().map(|m| m.gid).collect();
            Mapping {
                uid: choose(files.uid_path, uids, &used_u, AUTO_SIZE)?,
                gid: choose(files.gid_path, gids, &used_g, AUTO_SIZE)?,
            }
        }
        UsernsOpt::Fixed { uid, gid, count } => {
            // parse_opt made sure these are valid.
            let (u, g) = (IdRange { start: uid, count }, IdRange { start: gid, count });
            for (r, all, path) in [(u, uids, files.uid_path), (g, gids, files.gid_path)] {
                if !all.iter().any(|d| d.contains(&r)) {
                    return Err(UsernsError::NotDelegated {
                        opt: opt_text.to_string(),
                        path: path.to_path_buf(),
                        start: r.start,
                        end: r.end(),
                    });
                }
            }
            // An explicit mapping may be shared on purpose (two containers that share files);
            // that is the administrator's choice, as with Docker's --userns-remap.
            Mapping { uid: u, gid: g }
        }
    };
    Ok(mapping)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("/etc/subuid")
    }
    fn r(start: u32, count: u32) -> IdRange {
        IdRange::new(start, count).unwrap()
    }

    #[test]
    fn options() {
        assert_eq!(parse_opt("auto").unwrap(), UsernsOpt::Auto);
        assert_eq!(
            parse_opt("100000:200000:65536").unwrap(),
            UsernsOpt::Fixed {
                uid: 100000,
                gid: 200000,
                count: 65536
            }
        );
        for bad in [
            "",
            "host",
            "AUTO",
            "auto ",
            "1:2",
            "1:2:3:4",
            "-1:2:3",
            "+1:2:3",
            "0x10:2:3",
            " 1:2:3",
            "1:2:",
            "::",
            "1:2:3\n",
            "99999999999:1:1",
            "1:2:٣",
        ] {
            assert!(
                matches!(parse_opt(bad), Err(UsernsError::BadOpt(_))),
                "{bad:?}"
            );
        }
        let e = parse_opt("0:100000:10").unwrap_err().to_string();
        assert!(e.contains("host root"), "{e}");
        assert!(parse_opt("100000:0:10").is_err());
        assert!(parse_opt("100000:100000:0")
            .unwrap_err()
            .to_string()
            .contains("COUNT"));
        let e = parse_opt("4294967295:100000:2").unwrap_err().to_string();
        assert!(e.contains("past the last id"), "{e}");
        // The last id itself is fine.
        assert!(parse_opt("4294967295:4294967295:1").is_ok());
    }

    #[test]
    fn maps_are_one_line_from_zero() {
        let m = Mapping {
            uid: r(100000, 65536),
            gid: r(200000, 65536),
        };
        assert_eq!(m.uid_map(), "0 100000 65536\n");
        assert_eq!(m.gid_map(), "0 200000 65536\n");
        assert_eq!(m.host_uid(0), Some(100000));
        assert_eq!(m.host_uid(65535), Some(165535));
        assert_eq!(m.host_uid(65536), None);
        assert_eq!(m.host_gid(7), Some(200007));
    }

    #[test]
    fn host_ids_shift_back_into_the_container() {
        let m = Mapping {
            uid: r(100000, 65536),
            gid: r(200000, 1000),
        };
        assert_eq!(m.to_container(100000, 200000), (0, 0, false));
        assert_eq!(m.to_container(101000, 200999), (1000, 999, false));
        assert_eq!(m.to_container(165535, 200000), (65535, 0, false));
        // Just outside on either side, host root, and the gid side's smaller range.
        for (u, g) in [
            (99999, 200000),
            (165536, 200000),
            (0, 200000),
            (100000, 201000),
            (100000, 199999),
            (u32::MAX, u32::MAX),
        ] {
            let (cu, cg, outside) = m.to_container(u, g);
            assert!(outside, "{u}:{g}");
            assert!(cu == OVERFLOW_ID || cg == OVERFLOW_ID, "{u}:{g}");
        }
        assert_eq!(m.to_container(0, 200001), (OVERFLOW_ID, 1, true));
        // Shifting back undoes host_uid for every mapped id, at the edges too.
        for id in [0, 1, 999, 65535] {
            assert_eq!(m.container_uid(m.host_uid(id).unwrap()), Some(id));
        }
        // A range that ends at the last id.
        let top = Mapping {
            uid: r(u32::MAX, 1),
            gid: r(u32::MAX, 1),
        };
        assert_eq!(top.to_container(u32::MAX, u32::MAX), (0, 0, false));
        assert_eq!(top.container_uid(u32::MAX - 1), None);
    }

    #[test]
    fn subid_files() {
        let text = "# delegated by hand\n\nroot:100000:65536\ntweed:200000:131072\n\
                    other:1:2:3\ntweed:300000:65536\n1234:400000:65536\n";
        let (ranges, skipped) = parse_subid(p(), text, Some(1234));
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(
            ranges,
            vec![r(200000, 131072), r(300000, 65536), r(400000, 65536)]
        );
        // Without the numeric owner the last line is someone else's.
        assert_eq!(parse_subid(p(), text, None).0.len(), 2);
    }

    #[test]
    fn hostile_subid_files() {
        let long = format!("tweed:{}:1", "9".repeat(100_000));
        let cases: &[(&str, &str)] = &[
            // Host root, directly or by wrapping around.
            ("tweed:0:65536", "host id 0"),
            ("tweed:4294967295:2", "past the last id"),
            ("tweed:4294901760:65537", "past the last id"),
            ("tweed:100000:0", "empty"),
            ("tweed:-1:65536", "decimal"),
            ("tweed:+100000:65536", "decimal"),
            ("tweed:0x10000:65536", "decimal"),
            ("tweed:100000:65536:extra", "4 fields"),
            ("tweed:100000", "2 fields"),
            ("tweed", "1 fields"),
            ("tweed:1e5:65536", "decimal"),
            ("tweed:100000:65536\0", "decimal"),
            ("tweed:10 0000:65536", "decimal"),
            (&long, "decimal"),
        ];
        for (line, why) in cases {
            let text = format!("tweed:500000:65536\n{line}\n");
            let (ranges, skipped) = parse_subid(p(), &text, None);
            assert_eq!(ranges, vec![r(500000, 65536)], "{line:?}");
            assert_eq!(skipped.len(), 1, "{line:?}");
            let msg = skipped[0].to_string();
            assert!(msg.starts_with("/etc/subuid:2: "), "{msg}");
            assert!(msg.contains(why), "{line:?}: {msg}");
        }
        // Lookalike owners are not ours.
        let (ranges, skipped) = parse_subid(
            p(),
            "tweed2:100000:65536\n tweedx:1:1\nTWEED:100000:65536\n:tweed:1:1\n",
            None,
        );
        assert!(ranges.is_empty() && skipped.is_empty());
        // CRLF line ends and surrounding spaces are tolerated.
        let (ranges, _) = parse_subid(p(), "tweed:100000:65536\r\n", None);
        assert_eq!(ranges, vec![r(100000, 65536)]);
    }

    #[test]
    fn oversized_and_binary_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("tweed-userns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let big = dir.join("big");
        std::fs::write(&big, vec![b'#'; MAX_FILE as usize + 1]).unwrap();
        assert!(matches!(
            read_subid_file(&big),
            Err(UsernsError::TooLarge { .. })
        ));
        let bin = dir.join("bin");
        std::fs::write(&bin, b"tweed:100000:65536\n\xff\xfe\n").unwrap();
        let e = read_subid_file(&bin).unwrap_err().to_string();
        assert!(e.contains("bin") && e.contains("UTF-8"), "{e}");
        let ok = dir.join("ok");
        std::fs::write(&ok, "tweed:100000:65536\n").unwrap();
        assert_eq!(read_subid_file(&ok).unwrap(), "tweed:100000:65536\n");
        let e = read_subid_file(&dir.join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn choosing_blocks() {
        let d = [r(100000, 3 * 65536), r(1000000, 65536)];
        assert_eq!(choose(p(), &d, &[], 65536).unwrap(), r(100000, 65536));
        let used = [r(100000, 65536)];
        assert_eq!(choose(p(), &d, &used, 65536).unwrap(), r(165536, 65536));
        // A misaligned block in the way (an explicit mapping) pushes to the next aligned start.
        let used = [r(100005, 10), r(165536 + 70000, 1)];
        assert_eq!(choose(p(), &d, &used, 65536).unwrap(), r(165536, 65536));
        let used = [r(100000, 2 * 65536 + 1)];
        assert_eq!(choose(p(), &d, &used, 65536).unwrap(), r(1000000, 65536));
        let used = [r(100000, 3 * 65536), r(1000000, 1)];
        let e = choose(p(), &d, &used, 65536).unwrap_err().to_string();
        assert!(e.contains("in use") && e.contains("/etc/subuid"), "{e}");
        // Too small to hold one block.
        assert!(matches!(
            choose(p(), &[r(100000, 65535)], &[], 65536),
            Err(UsernsError::Exhausted { .. })
        ));
        let e = choose(p(), &[], &[], 65536).unwrap_err().to_string();
        assert!(e.contains("no usable range") && e.contains("tweed:"), "{e}");
        // A range that ends at the last id.
        let top = r(u32::MAX - 65535, 65536);
        assert_eq!(choose(p(), &[top], &[], 65536).unwrap(), top);
        assert!(choose(p(), &[top], &[top], 65536).is_err());
    }

    #[test]
    fn no_two_auto_containers_share_ids() {
        let d = [r(100000, 10 * 65536), r(5000000, 3 * 65536)];
        let mut used: Vec<IdRange> = vec![r(300000, 7)];
        // 13 blocks, one taken by a misaligned explicit mapping.
        for _ in 0..12 {
            let c = choose(p(), &d, &used, 65536).unwrap();
            assert!(d.iter().any(|x| x.contains(&c)));
            assert!(used.iter().all(|u| !u.overlaps(&c)), "{c:?} in {used:?}");
            assert_ne!(c.start, 0);
            used.push(c);
        }
        assert!(choose(p(), &d, &used, 65536).is_err());
    }

    #[test]
    fn resolving_options_against_the_files() {
        let files = SubIds {
            uid_path: Path::new("/etc/subuid"),
            uid_text: "tweed:100000:131072\nbad line\ntweed:x:1\n",
            gid_path: Path::new("/etc/subgid"),
            gid_text: "tweed:200000:65536\n",
            owner_uid: None,
        };
        let (m, skipped) = resolve(UsernsOpt::Auto, "auto", &files, &[]);
        let m = m.unwrap();
        assert_eq!(m.uid, r(100000, 65536));
        assert_eq!(m.gid, r(200000, 65536));
        assert_eq!(skipped.len(), 1, "only our own bad line: {skipped:?}");
        // The gid side is full: the error names subgid.
        let (r, skipped) = resolve(UsernsOpt::Auto, "auto", &files, &[m]);
        let e = r.unwrap_err().to_string();
        // The skipped line is reported on failure too.
        assert_eq!(skipped.len(), 1);
        assert!(e.contains("/etc/subgid"), "{e}");

        let fixed = parse_opt("100010:200000:1000").unwrap();
        let m = resolve(fixed, "100010:200000:1000", &files, &[]).0.unwrap();
        assert_eq!(m.uid_map(), "0 100010 1000\n");
        let fixed = parse_opt("100000:200000:65537").unwrap();
        let e = resolve(fixed, "100000:200000:65537", &files, &[])
            .0
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/etc/subgid") && e.contains("not delegated"),
            "{e}"
        );
        // Straddling two delegated ranges is not delegation of the whole.
        let files2 = SubIds {
            uid_text: "tweed:100000:10\ntweed:100010:10\n",
            gid_text: "tweed:100000:20\n",
            ..files
        };
        let fixed = parse_opt("100000:100000:20").unwrap();
        assert!(resolve(fixed, "x", &files2, &[]).0.is_err());
    }
}
