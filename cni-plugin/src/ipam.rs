//! Address allocation from the node subnet, kept on disk the way host-local keeps it:
//! `<dataDir>/<network>/<ip>` holds `<containerID>\r\n<ifname>` for each address in use,
//! `last_reserved_ip.0` the address handed out last, and `lock` is held (`flock`) for the
//! whole of each read-modify-write. The kernel drops the lock when a plugin dies, and a record
//! is created with `O_EXCL` before anything else happens, so a crash leaks at most a record
//! that GC then releases, and two invocations can never hand out one address.
//!
//! The allocation logic works over [`Dir`], so it is tested on an in-memory directory.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use ipnetwork::Ipv4Network;

use crate::attachment::Attachment;
use crate::code;

pub const LAST_RESERVED: &str = "last_reserved_ip.0";
pub const LOCK: &str = "lock";

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("IPAM store {}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("no free address left in {range} (node subnet {subnet}, store {store})")]
    Exhausted {
        subnet: Ipv4Network,
        range: String,
        store: String,
    },
    #[error("address {ip} cannot be given: {reason}")]
    Requested { ip: Ipv4Addr, reason: String },
    #[error("address range: {0}")]
    Range(String),
}

impl IpamError {
    pub fn code(&self) -> u32 {
        match self {
            IpamError::Io { .. } => code::IO,
            IpamError::Exhausted { .. } => code::EXHAUSTED,
            IpamError::Requested { .. } => code::ADDRESS_UNAVAILABLE,
            IpamError::Range(_) => code::INVALID_CONFIG,
        }
    }
}

/// A directory of small files. Names are plain file names, never paths.
pub trait Dir {
    /// Creates `name` with `content` unless it exists; `Ok(false)` when it did.
    fn create_new(&mut self, name: &str, content: &[u8]) -> io::Result<bool>;
    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>>;
    fn write(&mut self, name: &str, content: &[u8]) -> io::Result<()>;
    /// `Ok(false)` when it did not exist.
    fn remove(&mut self, name: &str) -> io::Result<bool>;
    fn list(&self) -> io::Result<Vec<String>>;
    /// Where this is, for error messages.
    fn location(&self) -> PathBuf;
}

/// The real store: a directory, locked for as long as this value lives.
#[derive(Debug)]
pub struct FsDir {
    path: PathBuf,
    _lock: File,
}

impl FsDir {
    /// Creates the directory if needed and takes its lock, waiting for other holders.
    pub fn lock(path: &Path) -> Result<FsDir, IpamError> {
        let io_err = |what: &str| {
            let path = path.to_path_buf();
            let what = what.to_string();
            move |source| IpamError::Io { path, what, source }
        };
        std::fs::create_dir_all(path).map_err(io_err("creating the directory"))?;
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path.join(LOCK))
            .map_err(io_err("opening the lock file"))?;
        loop {
            // SAFETY: flock only takes the fd, which `lock` keeps open.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } == 0 {
                break;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(io_err("locking")(e));
            }
        }
        Ok(FsDir {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }
}

impl Dir for FsDir {
    fn create_new(&mut self, name: &str, content: &[u8]) -> io::Result<bool> {
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(self.path.join(name))
        {
            Ok(mut f) => {
                f.write_all(content)?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.path.join(name)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write(&mut self, name: &str, content: &[u8]) -> io::Result<()> {
        // Overwritten in place and then cut to length, not truncated to zero first: freeing the
        // file's block on every ADD costs a synchronous discard on filesystems mounted with
        // `discard` and no journal (1–2 ms on the dev VM), and a file cut to a shorter but
        // non-zero length keeps its one block. Only `last_reserved_ip.0` is written so: a
        // hint, and garbage there only makes the next ADD start over from the range start.
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.path.join(name))?;
        f.write_all(content)?;
        f.set_len(content.len() as u64)
    }

    fn remove(&mut self, name: &str) -> io::Result<bool> {
        match std::fs::remove_file(self.path.join(name)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.path)? {
            if let Some(n) = e?.file_name().to_str() {
                out.push(n.to_string());
            }
        }
        Ok(out)
    }

    fn location(&self) -> PathBuf {
        self.path.clone()
    }
}

/// An in-memory [`Dir`] for tests.
#[cfg(test)]
#[derive(Debug, Clone, Default)]
pub(crate) struct MemDir {
    pub files: std::collections::BTreeMap<String, Vec<u8>>,
}

#[cfg(test)]
impl Dir for MemDir {
    fn create_new(&mut self, name: &str, content: &[u8]) -> io::Result<bool> {
        if self.files.contains_key(name) {
            return Ok(false);
        }
        self.files.insert(name.into(), content.to_vec());
        Ok(true)
    }
    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        Ok(self.files.get(name).cloned())
    }
    fn write(&mut self, name: &str, content: &[u8]) -> io::Result<()> {
        self.files.insert(name.into(), content.to_vec());
        Ok(())
    }
    fn remove(&mut self, name: &str) -> io::Result<bool> {
        Ok(self.files.remove(name).is_some())
    }
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.files.keys().cloned().collect())
    }
    fn location(&self) -> PathBuf {
        PathBuf::from("<memory>")
    }
}

/// host-local's record of who holds an address: `<id>\r\n<ifname>`.
pub fn record(holder: &Attachment) -> Vec<u8> {
    format!("{}\r\n{}", holder.container_id, holder.ifname).into_bytes()
}

/// Reads a record; an old host-local record (the ID alone) has no interface name.
pub fn parse_record(b: &[u8]) -> Option<Attachment> {
    let text = std::str::from_utf8(b).ok()?;
    let mut lines = text.lines().map(str::trim);
    let id = lines.next().filter(|s| !s.is_empty())?;
    let ifname = lines.next().unwrap_or("");
    Some(Attachment::new(id, ifname))
}

/// The addresses that may be handed out: the node subnet less its network and broadcast
/// addresses and the gateway, optionally narrowed to `[rangeStart, rangeEnd]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub subnet: Ipv4Network,
    pub gateway: Ipv4Addr,
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
}

impl Pool {
    pub fn new(
        subnet: Ipv4Network,
        gateway: Ipv4Addr,
        range_start: Option<Ipv4Addr>,
        range_end: Option<Ipv4Addr>,
    ) -> Result<Pool, IpamError> {
        let net = u32::from(subnet.network());
        let bcast = u32::from(subnet.broadcast());
        if bcast - net < 3 {
            return Err(IpamError::Range(format!(
                "node subnet {subnet} is too small for a gateway and containers"
            )));
        }
        let first = Ipv4Addr::from(net + 1);
        let last = Ipv4Addr::from(bcast - 1);
        let check = |name: &str, ip: Ipv4Addr| {
            if ip < first || ip > last {
                Err(IpamError::Range(format!(
                    "{name} {ip} is not a host address of the node subnet {subnet}"
                )))
            } else {
                Ok(ip)
            }
        };
        let start = check("rangeStart", range_start.unwrap_or(first))?;
        let end = check("rangeEnd", range_end.unwrap_or(last))?;
        if start > end {
            return Err(IpamError::Range(format!(
                "rangeStart {start} > rangeEnd {end}"
            )));
        }
        Ok(Pool {
            subnet,
            gateway,
            start,
            end,
        })
    }

    pub fn describe(&self) -> String {
        format!("{}-{}", self.start, self.end)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        ip >= self.start && ip <= self.end && ip != self.gateway
    }

    /// Every candidate once, starting right after `last` (or at the start), wrapping around.
    fn candidates(&self, last: Option<Ipv4Addr>) -> impl Iterator<Item = Ipv4Addr> + '_ {
        let (s, e) = (u32::from(self.start), u32::from(self.end));
        let n = e - s + 1;
        let first = match last.map(u32::from) {
            Some(l) if l >= s && l < e => l + 1 - s,
            _ => 0,
        };
        (0..n)
            .map(move |i| Ipv4Addr::from(s + (first + i) % n))
            .filter(move |ip| *ip != self.gateway)
    }
}

fn io_err<D: Dir + ?Sized>(
    dir: &D,
    what: impl Into<String>,
) -> impl FnOnce(io::Error) -> IpamError {
    let path = dir.location();
    let what = what.into();
    move |source| IpamError::Io { path, what, source }
}

/// Gives `owner` an address: `requested` if set (it must be in the pool and free, or already
/// this owner's), else the next free one after the last handed out.
pub fn allocate<D: Dir + ?Sized>(
    dir: &mut D,
    pool: &Pool,
    owner: &Attachment,
    requested: Option<Ipv4Addr>,
) -> Result<Ipv4Addr, IpamError> {
    let rec = record(owner);
    if let Some(ip) = requested {
        let refuse = |reason: String| IpamError::Requested { ip, reason };
        if ip == pool.gateway {
            return Err(refuse(format!("it is the gateway of {}", pool.subnet)));
        }
        if !pool.contains(ip) {
            return Err(refuse(format!(
                "it is outside the range {} of node subnet {}",
                pool.describe(),
                pool.subnet
            )));
        }
        let name = ip.to_string();
        if !dir
            .create_new(&name, &rec)
            .map_err(io_err(dir, format!("creating {name}")))?
        {
            let holder = dir
                .read(&name)
                .map_err(io_err(dir, format!("reading {name}")))?
                .and_then(|b| parse_record(&b));
            if holder.as_ref() != Some(owner) {
                return Err(refuse(match holder {
                    Some(h) => format!("held by container {} ({})", h.container_id, h.ifname),
                    None => "already reserved".into(),
                }));
            }
        }
        return Ok(ip);
    }
    let last = dir
        .read(LAST_RESERVED)
        .map_err(io_err(dir, format!("reading {LAST_RESERVED}")))?
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.trim().parse::<Ipv4Addr>().ok());
    for ip in pool.candidates(last) {
        let name = ip.to_string();
        if dir
            .create_new(&name, &rec)
            .map_err(io_err(dir, format!("creating {name}")))?
        {
            dir.write(LAST_RESERVED, name.as_bytes())
                .map_err(io_err(dir, format!("writing {LAST_RESERVED}")))?;
            return Ok(ip);
        }
    }
    Err(IpamError::Exhausted {
        subnet: pool.subnet,
        range: pool.describe(),
        store: dir.location().display().to_string(),
    })
}

/// Every address record: (address, holder; `None` for an empty or unreadable record).
pub fn records<D: Dir + ?Sized>(dir: &D) -> Result<Vec<(Ipv4Addr, Option<Attachment>)>, IpamError> {
    let mut out = Vec::new();
    for name in dir.list().map_err(io_err(dir, "listing"))? {
        let Ok(ip) = name.parse::<Ipv4Addr>() else {
            continue;
        };
        let owner = dir
            .read(&name)
            .map_err(io_err(dir, format!("reading {name}")))?
            .and_then(|b| parse_record(&b));
        out.push((ip, owner));
    }
    out.sort();
    Ok(out)
}

/// The addresses `owner` holds.
pub fn held_by<D: Dir + ?Sized>(dir: &D, owner: &Attachment) -> Result<Vec<Ipv4Addr>, IpamError> {
    Ok(records(dir)?
        .into_iter()
        .filter(|(_, o)| o.as_ref() == Some(owner))
        .map(|(ip, _)| ip)
        .collect())
}

/// Releases every address `owner` holds; returns them.
pub fn release_owner<D: Dir + ?Sized>(
    dir: &mut D,
    owner: &Attachment,
) -> Result<Vec<Ipv4Addr>, IpamError> {
    let ips = held_by(dir, owner)?;
    for ip in &ips {
        let name = ip.to_string();
        dir.remove(&name)
            .map_err(io_err(dir, format!("removing {name}")))?;
    }
    Ok(ips)
}

/// Releases `ip` if `owner` still holds it (a rolled-back ADD).
pub fn release_ip<D: Dir + ?Sized>(
    dir: &mut D,
    ip: Ipv4Addr,
    owner: &Attachment,
) -> Result<bool, IpamError> {
    let name = ip.to_string();
    let holder = dir
        .read(&name)
        .map_err(io_err(dir, format!("reading {name}")))?
        .and_then(|b| parse_record(&b));
    if holder.as_ref() != Some(owner) {
        return Ok(false);
    }
    dir.remove(&name)
        .map_err(io_err(dir, format!("removing {name}")))
}

/// Which records GC releases: those whose holder is not a valid attachment (empty records, left
/// by a plugin killed between creating and writing one, included). Pure.
pub fn gc_plan(
    records: &[(Ipv4Addr, Option<Attachment>)],
    valid: &BTreeSet<Attachment>,
) -> Vec<(Ipv4Addr, Option<Attachment>)> {
    records
        .iter()
        .filter(|(_, o)| o.as_ref().is_none_or(|o| !valid.contains(o)))
        .cloned()
        .collect()
}

/// Runs [`gc_plan`] and removes what it names; returns the released records.
pub fn gc<D: Dir + ?Sized>(
    dir: &mut D,
    valid: &BTreeSet<Attachment>,
) -> Result<Vec<(Ipv4Addr, Option<Attachment>)>, IpamError> {
    let doomed = gc_plan(&records(dir)?, valid);
    for (ip, _) in &doomed {
        let name = ip.to_string();
        dir.remove(&name)
            .map_err(io_err(dir, format!("removing {name}")))?;
    }
    Ok(doomed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Pool {
        Pool::new(
            "10.244.1.0/24".parse().unwrap(),
            "10.244.1.1".parse().unwrap(),
            None,
            None,
        )
        .unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn sequential_from_last_reserved_skipping_the_gateway() {
        let mut d = MemDir::default();
        let p = pool();
        let a = allocate(&mut d, &p, &Attachment::new("a", "eth0"), None).unwrap();
        let b = allocate(&mut d, &p, &Attachment::new("b", "eth0"), None).unwrap();
        assert_eq!((a, b), (ip("10.244.1.2"), ip("10.244.1.3")));
        assert_eq!(d.files[LAST_RESERVED], b"10.244.1.3");
        assert_eq!(d.files["10.244.1.2"], b"a\r\neth0");
        // Releasing .2 does not make it the next one: allocation goes on after the last.
        release_owner(&mut d, &Attachment::new("a", "eth0")).unwrap();
        let c = allocate(&mut d, &p, &Attachment::new("c", "eth0"), None).unwrap();
        assert_eq!(c, ip("10.244.1.4"));
    }

    #[test]
    fn wraps_around_and_reports_exhaustion() {
        let mut d = MemDir::default();
        let p = Pool::new(
            "10.244.1.0/29".parse().unwrap(),
            ip("10.244.1.1"),
            None,
            None,
        )
        .unwrap();
        // .2 .. .6 are usable (.1 is the gateway, .7 broadcast).
        d.write(LAST_RESERVED, b"10.244.1.5").unwrap();
        let got: Vec<_> = (0..5)
            .map(|i| {
                allocate(&mut d, &p, &Attachment::new(&format!("c{i}"), "eth0"), None).unwrap()
            })
            .collect();
        assert_eq!(
            got,
            [
                "10.244.1.6",
                "10.244.1.2",
                "10.244.1.3",
                "10.244.1.4",
                "10.244.1.5"
            ]
            .map(ip)
            .to_vec()
        );
        let e = allocate(&mut d, &p, &Attachment::new("x", "eth0"), None).unwrap_err();
        assert_eq!(e.code(), code::EXHAUSTED);
        assert!(e.to_string().contains("10.244.1.0/29"), "{e}");
    }

    #[test]
    fn garbage_last_reserved_starts_over() {
        let mut d = MemDir::default();
        d.write(LAST_RESERVED, b"not an ip").unwrap();
        let a = allocate(&mut d, &pool(), &Attachment::new("a", "eth0"), None).unwrap();
        assert_eq!(a, ip("10.244.1.2"));
    }

    #[test]
    fn range_narrows_the_pool() {
        let p = Pool::new(
            "10.244.1.0/24".parse().unwrap(),
            ip("10.244.1.1"),
            Some(ip("10.244.1.100")),
            Some(ip("10.244.1.101")),
        )
        .unwrap();
        let mut d = MemDir::default();
        assert_eq!(
            allocate(&mut d, &p, &Attachment::new("a", "e"), None).unwrap(),
            ip("10.244.1.100")
        );
        assert_eq!(
            allocate(&mut d, &p, &Attachment::new("b", "e"), None).unwrap(),
            ip("10.244.1.101")
        );
        assert!(allocate(&mut d, &p, &Attachment::new("c", "e"), None).is_err());
        assert!(Pool::new(
            "10.244.1.0/24".parse().unwrap(),
            ip("10.244.1.1"),
            Some(ip("10.244.2.5")),
            None
        )
        .is_err());
        assert!(Pool::new(
            "10.244.1.0/31".parse().unwrap(),
            ip("10.244.1.1"),
            None,
            None
        )
        .is_err());
    }

    #[test]
    fn requested_addresses() {
        let mut d = MemDir::default();
        let p = pool();
        let a = Attachment::new("a", "eth0");
        assert_eq!(
            allocate(&mut d, &p, &a, Some(ip("10.244.1.50"))).unwrap(),
            ip("10.244.1.50")
        );
        // Asking again for the same owner is fine; for another it is not.
        assert!(allocate(&mut d, &p, &a, Some(ip("10.244.1.50"))).is_ok());
        let e = allocate(
            &mut d,
            &p,
            &Attachment::new("b", "eth0"),
            Some(ip("10.244.1.50")),
        )
        .unwrap_err();
        assert_eq!(e.code(), code::ADDRESS_UNAVAILABLE);
        assert!(e.to_string().contains("held by container a"), "{e}");
        for bad in ["10.244.1.1", "10.244.2.9", "10.244.1.255"] {
            assert!(allocate(&mut d, &p, &Attachment::new("c", "eth0"), Some(ip(bad))).is_err());
        }
    }

    #[test]
    fn release_only_touches_the_owner() {
        let mut d = MemDir::default();
        let p = pool();
        let a = Attachment::new("a", "eth0");
        let a1 = Attachment::new("a", "net1");
        let b = Attachment::new("b", "eth0");
        let ia = allocate(&mut d, &p, &a, None).unwrap();
        let ia1 = allocate(&mut d, &p, &a1, None).unwrap();
        let ib = allocate(&mut d, &p, &b, None).unwrap();
        assert!(!release_ip(&mut d, ib, &a).unwrap());
        assert_eq!(release_owner(&mut d, &a).unwrap(), vec![ia]);
        assert_eq!(release_owner(&mut d, &a).unwrap(), Vec::<Ipv4Addr>::new());
        assert_eq!(held_by(&d, &a1).unwrap(), vec![ia1]);
        assert!(release_ip(&mut d, ib, &b).unwrap());
        assert_eq!(held_by(&d, &b).unwrap(), Vec::<Ipv4Addr>::new());
    }

    #[test]
    fn gc_keeps_valid_attachments_only() {
        let mut d = MemDir::default();
        let p = pool();
        for id in ["keep", "drop"] {
            allocate(&mut d, &p, &Attachment::new(id, "eth0"), None).unwrap();
        }
        allocate(&mut d, &p, &Attachment::new("keep", "net1"), None).unwrap();
        d.write("10.244.1.77", b"").unwrap(); // a record from a plugin killed mid-write
        d.write("junk", b"x").unwrap();
        let valid: BTreeSet<Attachment> = [Attachment::new("keep", "eth0")].into();
        let gone = gc(&mut d, &valid).unwrap();
        let gone_ips: Vec<_> = gone.iter().map(|(ip, _)| ip.to_string()).collect();
        assert_eq!(gone_ips, ["10.244.1.3", "10.244.1.4", "10.244.1.77"]);
        let left: Vec<_> = records(&d).unwrap();
        assert_eq!(
            left,
            vec![(ip("10.244.1.2"), Some(Attachment::new("keep", "eth0")))]
        );
        assert!(d.files.contains_key("junk") && d.files.contains_key(LAST_RESERVED));
    }

    #[test]
    fn records_parse_host_local_formats() {
        assert_eq!(
            parse_record(b"abc\r\neth0"),
            Some(Attachment::new("abc", "eth0"))
        );
        assert_eq!(
            parse_record(b"abc\neth0\n"),
            Some(Attachment::new("abc", "eth0"))
        );
        assert_eq!(parse_record(b"abc"), Some(Attachment::new("abc", "")));
        assert_eq!(parse_record(b""), None);
    }

    #[test]
    fn fs_dir_round_trip_and_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("net");
        {
            let mut d = FsDir::lock(&path).unwrap();
            let a = allocate(&mut d, &pool(), &Attachment::new("a", "eth0"), None).unwrap();
            assert_eq!(
                std::fs::read_to_string(path.join(a.to_string())).unwrap(),
                "a\r\neth0"
            );
        }
        // The lock is released on drop: taking it again does not block.
        let d = FsDir::lock(&path).unwrap();
        assert_eq!(records(&d).unwrap().len(), 1);
        assert!(path.join(LOCK).exists());
    }
}
