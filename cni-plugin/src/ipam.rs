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
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use ipnetwork::{Ipv4Network, Ipv6Network};

use crate::attachment::Attachment;
use crate::code;

pub const LAST_RESERVED: &str = "last_reserved_ip.0";
/// The IPv6 range set's hint (host-local numbers range sets in the configured order, and
/// flannel configures IPv4 first).
pub const LAST_RESERVED_V6: &str = "last_reserved_ip.1";
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
        subnet: String,
        range: String,
        store: String,
    },
    #[error("address {ip} cannot be given: {reason}")]
    Requested { ip: IpAddr, reason: String },
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

/// An address family the store holds addresses of: IPv4 and IPv6 share the allocation logic,
/// working on addresses as integers.
pub trait Family:
    Copy + Ord + std::fmt::Debug + std::fmt::Display + std::str::FromStr + Into<IpAddr>
{
    /// The subnet type of this family.
    type Net: Copy + std::fmt::Debug + std::fmt::Display + PartialEq + Eq;
    /// host-local keeps one "last handed out" file per range set: `.0` for the first (IPv4
    /// in flannel's order), `.1` for the second (IPv6).
    const LAST_RESERVED: &'static str;
    fn to_int(self) -> u128;
    fn from_int(v: u128) -> Self;
    /// First and last address of `net`.
    fn bounds(net: Self::Net) -> (u128, u128);
}

impl Family for Ipv4Addr {
    type Net = Ipv4Network;
    const LAST_RESERVED: &'static str = LAST_RESERVED;
    fn to_int(self) -> u128 {
        u32::from(self).into()
    }
    fn from_int(v: u128) -> Self {
        Ipv4Addr::from(v as u32)
    }
    fn bounds(net: Ipv4Network) -> (u128, u128) {
        (
            u32::from(net.network()).into(),
            u32::from(net.broadcast()).into(),
        )
    }
}

impl Family for Ipv6Addr {
    type Net = Ipv6Network;
    const LAST_RESERVED: &'static str = LAST_RESERVED_V6;
    fn to_int(self) -> u128 {
        u128::from(self)
    }
    fn from_int(v: u128) -> Self {
        Ipv6Addr::from(v)
    }
    fn bounds(net: Ipv6Network) -> (u128, u128) {
        let first = u128::from(net.network());
        // A /0 has every bit free; `checked_shr` covers the 128-bit shift Rust refuses.
        let host_bits = u128::MAX.checked_shr(u32::from(net.prefix())).unwrap_or(0);
        (first, first | host_bits)
    }
}

/// The addresses that may be handed out: the node subnet less its first address (IPv4's
/// network address, IPv6's Subnet-Router anycast address), its last (IPv4's broadcast; kept
/// out of IPv6 too, so both families read alike) and the gateway, optionally narrowed to
/// `[rangeStart, rangeEnd]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool<A: Family = Ipv4Addr> {
    pub subnet: A::Net,
    pub gateway: A,
    pub start: A,
    pub end: A,
}

/// A pool of each family (the IPv4 half is always there; the IPv6 one on a dual-stack node).
pub type Pool6 = Pool<Ipv6Addr>;

impl<A: Family> Pool<A> {
    pub fn new(
        subnet: A::Net,
        gateway: A,
        range_start: Option<A>,
        range_end: Option<A>,
    ) -> Result<Pool<A>, IpamError> {
        let (net, last) = A::bounds(subnet);
        if last - net < 3 {
            return Err(IpamError::Range(format!(
                "node subnet {subnet} is too small for a gateway and containers"
            )));
        }
        let first = A::from_int(net + 1);
        let last = A::from_int(last - 1);
        let check = |name: &str, ip: A| {
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

    pub fn contains(&self, ip: A) -> bool {
        ip >= self.start && ip <= self.end && ip != self.gateway
    }

    /// Every candidate once, starting right after `last` (or at the start), wrapping around.
    /// Lazy: an IPv6 /64 is never walked further than to the first free address.
    fn candidates(&self, last: Option<A>) -> impl Iterator<Item = A> + '_ {
        let (s, e) = (self.start.to_int(), self.end.to_int());
        // At most 2^128 - 2 (the first and last addresses are never in a pool): no overflow.
        let n = e - s + 1;
        let first = match last.map(A::to_int) {
            Some(l) if l >= s && l < e => l + 1 - s,
            _ => 0,
        };
        (0..n)
            .map(move |i| {
                // (first + i) mod n without the sum overflowing u128.
                let off = if i < n - first {
                    first + i
                } else {
                    i - (n - first)
                };
                A::from_int(s + off)
            })
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
pub fn allocate<D: Dir + ?Sized, A: Family>(
    dir: &mut D,
    pool: &Pool<A>,
    owner: &Attachment,
    requested: Option<A>,
) -> Result<A, IpamError> {
    let rec = record(owner);
    if let Some(ip) = requested {
        let refuse = |reason: String| IpamError::Requested {
            ip: ip.into(),
            reason,
        };
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
        .read(A::LAST_RESERVED)
        .map_err(io_err(dir, format!("reading {}", A::LAST_RESERVED)))?
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.trim().parse::<A>().ok());
    for ip in pool.candidates(last) {
        let name = ip.to_string();
        if dir
            .create_new(&name, &rec)
            .map_err(io_err(dir, format!("creating {name}")))?
        {
            dir.write(A::LAST_RESERVED, name.as_bytes())
                .map_err(io_err(dir, format!("writing {}", A::LAST_RESERVED)))?;
            return Ok(ip);
        }
    }
    Err(IpamError::Exhausted {
        subnet: pool.subnet.to_string(),
        range: pool.describe(),
        store: dir.location().display().to_string(),
    })
}

/// One address of each family whose pool is set, for `owner`: the IPv4 one, then the IPv6 one.
/// When the second fails the first is released before the error is returned, so a failed
/// dual-stack allocation leaves no record of either family. (A crash between the two
/// leaves a record of the first, as a crash after a single-family allocation does: GC or the
/// owner's DEL releases it.)
pub fn allocate_dual<D: Dir + ?Sized>(
    dir: &mut D,
    pool: Option<&Pool>,
    pool6: Option<&Pool6>,
    owner: &Attachment,
    requested: Option<Ipv4Addr>,
    requested6: Option<Ipv6Addr>,
) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>), IpamError> {
    // An address this owner held before the call (an ADD repeated with a requested address)
    // is not released on the way out: it was not this call's to give back.
    let had = held_by(dir, owner)?;
    let v4 = match pool {
        Some(pool) => Some(allocate(dir, pool, owner, requested)?),
        None => None,
    };
    let Some(pool6) = pool6 else {
        return Ok((v4, None));
    };
    match allocate(dir, pool6, owner, requested6) {
        Ok(v6) => Ok((v4, Some(v6))),
        Err(e) => {
            if let Some(v4) = v4.filter(|v4| !had.contains(&IpAddr::V4(*v4))) {
                // Best effort: the error of the IPv6 half is what the caller must see.
                let _ = release_ip(dir, v4, owner);
            }
            Err(e)
        }
    }
}

/// Every address record of both families: (address, holder; `None` for an empty or
/// unreadable record). IPv4 ones sort first.
pub fn records<D: Dir + ?Sized>(dir: &D) -> Result<Vec<(IpAddr, Option<Attachment>)>, IpamError> {
    let mut out = Vec::new();
    for name in dir.list().map_err(io_err(dir, "listing"))? {
        let Ok(ip) = name.parse::<IpAddr>() else {
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

/// The addresses `owner` holds, of both families.
pub fn held_by<D: Dir + ?Sized>(dir: &D, owner: &Attachment) -> Result<Vec<IpAddr>, IpamError> {
    Ok(records(dir)?
        .into_iter()
        .filter(|(_, o)| o.as_ref() == Some(owner))
        .map(|(ip, _)| ip)
        .collect())
}

/// Releases every address `owner` holds, of both families; returns them.
pub fn release_owner<D: Dir + ?Sized>(
    dir: &mut D,
    owner: &Attachment,
) -> Result<Vec<IpAddr>, IpamError> {
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
    ip: impl Into<IpAddr>,
    owner: &Attachment,
) -> Result<bool, IpamError> {
    let name = ip.into().to_string();
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
    records: &[(IpAddr, Option<Attachment>)],
    valid: &BTreeSet<Attachment>,
) -> Vec<(IpAddr, Option<Attachment>)> {
    records
        .iter()
        .filter(|(_, o)| o.as_ref().is_none_or(|o| !valid.contains(o)))
        .cloned()
        .collect()
}

/// Removes the records `doomed` (from [`gc_plan`]) names, each only while it still has the
/// holder the plan saw: GC reads the records, removes rules and links, and only then takes the
/// records, so an ADD that took an address (or wrote a record) in between keeps it. Returns
/// the records removed.
pub fn release_planned<D: Dir + ?Sized>(
    dir: &mut D,
    doomed: &[(IpAddr, Option<Attachment>)],
) -> Result<Vec<(IpAddr, Option<Attachment>)>, IpamError> {
    let mut gone = Vec::new();
    for (ip, owner) in doomed {
        let name = ip.to_string();
        let Some(bytes) = dir
            .read(&name)
            .map_err(io_err(dir, format!("reading {name}")))?
        else {
            continue;
        };
        if parse_record(&bytes) != *owner {
            continue;
        }
        dir.remove(&name)
            .map_err(io_err(dir, format!("removing {name}")))?;
        gone.push((*ip, owner.clone()));
    }
    Ok(gone)
}

/// Runs [`gc_plan`] and removes what it names, of both families; returns the released records.
#[cfg(test)]
pub fn gc<D: Dir + ?Sized>(
    dir: &mut D,
    valid: &BTreeSet<Attachment>,
) -> Result<Vec<(IpAddr, Option<Attachment>)>, IpamError> {
    let doomed = gc_plan(&records(dir)?, valid);
    release_planned(dir, &doomed)
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
        assert_eq!(release_owner(&mut d, &a).unwrap(), vec![IpAddr::V4(ia)]);
        assert_eq!(release_owner(&mut d, &a).unwrap(), Vec::<IpAddr>::new());
        assert_eq!(held_by(&d, &a1).unwrap(), vec![IpAddr::V4(ia1)]);
        assert!(release_ip(&mut d, ib, &b).unwrap());
        assert_eq!(held_by(&d, &b).unwrap(), Vec::<IpAddr>::new());
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
            vec![(
                IpAddr::V4(ip("10.244.1.2")),
                Some(Attachment::new("keep", "eth0"))
            )]
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

    fn pool6(subnet: &str, gw: &str) -> Pool6 {
        Pool::new(subnet.parse().unwrap(), gw.parse().unwrap(), None, None).unwrap()
    }

    fn ip6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_pool_skips_the_anycast_the_last_and_the_gateway() {
        let p = pool6("fd00:10:244:3::/64", "fd00:10:244:3::1");
        assert_eq!(p.start, ip6("fd00:10:244:3::1"));
        assert_eq!(p.end, ip6("fd00:10:244:3:ffff:ffff:ffff:fffe"));
        assert!(!p.contains(p.gateway));
        let mut d = MemDir::default();
        let a = allocate(&mut d, &p, &Attachment::new("a", "eth0"), None).unwrap();
        let b = allocate(&mut d, &p, &Attachment::new("b", "eth0"), None).unwrap();
        assert_eq!((a, b), (ip6("fd00:10:244:3::2"), ip6("fd00:10:244:3::3")));
        // Its own hint file, so the IPv4 walk is not disturbed (host-local's `.1`).
        assert_eq!(d.files[LAST_RESERVED_V6], b"fd00:10:244:3::3");
        assert!(!d.files.contains_key(LAST_RESERVED));
        assert_eq!(d.files["fd00:10:244:3::2"], b"a\r\neth0");
    }

    #[test]
    fn ipv6_wraps_and_exhausts_in_a_small_subnet() {
        // A /125: ::0 and ::7 out, ::1 the gateway, so ::2..::6.
        let p = pool6("fd00::/125", "fd00::1");
        let mut d = MemDir::default();
        let got: Vec<_> = (0..5)
            .map(|i| {
                allocate(&mut d, &p, &Attachment::new(&format!("c{i}"), "eth0"), None).unwrap()
            })
            .collect();
        assert_eq!(got.first(), Some(&ip6("fd00::2")));
        assert_eq!(got.last(), Some(&ip6("fd00::6")));
        let e = allocate(&mut d, &p, &Attachment::new("x", "eth0"), None).unwrap_err();
        assert_eq!(e.code(), code::EXHAUSTED);
        assert!(e.to_string().contains("fd00::/125"), "{e}");
        release_ip(&mut d, ip6("fd00::3"), &Attachment::new("c1", "eth0")).unwrap();
        let again = allocate(&mut d, &p, &Attachment::new("y", "eth0"), None).unwrap();
        assert_eq!(again, ip6("fd00::3"));
    }

    /// Crafted prefixes and ranges: no panic, no overflow, an error naming the problem.
    #[test]
    fn ipv6_absurd_subnets_and_ranges() {
        for tiny in ["fd00::/127", "fd00::/128"] {
            let e = Pool::new(tiny.parse().unwrap(), ip6("fd00::1"), None, None).unwrap_err();
            assert!(e.to_string().contains("too small"), "{tiny}: {e}");
        }
        // The whole address space: bounds at the very ends of u128.
        let all = pool6("::/0", "::1");
        assert_eq!(
            (all.start, all.end),
            (ip6("::1"), ip6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe"))
        );
        let mut d = MemDir::default();
        assert_eq!(
            allocate(&mut d, &all, &Attachment::new("a", "eth0"), None).unwrap(),
            ip6("::2")
        );
        // A hint at the range's last address wraps to the start, not past the end.
        d.files.insert(
            LAST_RESERVED_V6.into(),
            b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe".to_vec(),
        );
        assert_eq!(
            allocate(&mut d, &all, &Attachment::new("b", "eth0"), None).unwrap(),
            ip6("::3")
        );
        let subnet: Ipv6Network = "fd00:1::/64".parse().unwrap();
        let outside = Pool::new(subnet, ip6("fd00:1::1"), Some(ip6("fd00:2::5")), None);
        assert!(outside
            .unwrap_err()
            .to_string()
            .contains("rangeStart fd00:2::5"));
        let anycast = Pool::new(subnet, ip6("fd00:1::1"), Some(ip6("fd00:1::")), None);
        assert_eq!(anycast.unwrap_err().code(), code::INVALID_CONFIG);
        let reversed = Pool::new(
            subnet,
            ip6("fd00:1::1"),
            Some(ip6("fd00:1::9")),
            Some(ip6("fd00:1::5")),
        );
        assert!(reversed
            .unwrap_err()
            .to_string()
            .contains("rangeStart fd00:1::9 > rangeEnd"));
        // Garbage (or an IPv4 address) in the IPv6 hint: start over, do not fail.
        let p = pool6("fd00:1::/64", "fd00:1::1");
        for junk in [&b"10.244.1.9"[..], b"\xff\xfe", b"fd00:1::zz"] {
            let mut d = MemDir::default();
            d.files.insert(LAST_RESERVED_V6.into(), junk.to_vec());
            assert_eq!(
                allocate(&mut d, &p, &Attachment::new("a", "eth0"), None).unwrap(),
                ip6("fd00:1::2")
            );
        }
    }

    #[test]
    fn dual_allocation_gives_one_of_each_or_nothing() {
        let p4 = pool();
        let p6 = pool6("fd00::/125", "fd00::1");
        let mut d = MemDir::default();
        let a = Attachment::new("a", "eth0");
        let (v4, v6) = allocate_dual(&mut d, Some(&p4), Some(&p6), &a, None, None).unwrap();
        assert_eq!((v4, v6), (Some(ip("10.244.1.2")), Some(ip6("fd00::2"))));
        let v4 = v4.unwrap();
        assert_eq!(
            held_by(&d, &a).unwrap(),
            vec![IpAddr::V4(v4), IpAddr::V6(ip6("fd00::2"))]
        );
        // v4-only: exactly the single-family path.
        let b = Attachment::new("b", "eth0");
        assert_eq!(
            allocate_dual(&mut d, Some(&p4), None, &b, None, None).unwrap(),
            (Some(ip("10.244.1.3")), None)
        );
        // v6-only: no IPv4 record.
        let c = Attachment::new("c", "eth0");
        assert_eq!(
            allocate_dual(&mut d, None, Some(&p6), &c, Some(ip("10.244.1.9")), None).unwrap(),
            (None, Some(ip6("fd00::3")))
        );
        assert_eq!(held_by(&d, &c).unwrap(), vec![IpAddr::V6(ip6("fd00::3"))]);
        release_owner(&mut d, &c).unwrap();
        // Fill the IPv6 pool, then a dual ADD: IPv4 is taken, IPv6 fails, IPv4 is given back.
        for i in 0..4 {
            allocate(
                &mut d,
                &p6,
                &Attachment::new(&format!("f{i}"), "eth0"),
                None,
            )
            .unwrap();
        }
        let before = records(&d).unwrap();
        let x = Attachment::new("x", "eth0");
        let e = allocate_dual(&mut d, Some(&p4), Some(&p6), &x, None, None).unwrap_err();
        assert_eq!(e.code(), code::EXHAUSTED);
        assert!(held_by(&d, &x).unwrap().is_empty());
        assert_eq!(records(&d).unwrap(), before);
        // A requested IPv6 address held by someone else fails the same way.
        let e = allocate_dual(&mut d, Some(&p4), Some(&p6), &x, None, Some(ip6("fd00::2")))
            .unwrap_err();
        assert_eq!(e.code(), code::ADDRESS_UNAVAILABLE);
        assert!(held_by(&d, &x).unwrap().is_empty());
        // A repeated ADD whose IPv4 address was already this owner's keeps it on failure.
        let e = allocate_dual(
            &mut d,
            Some(&p4),
            Some(&p6),
            &a,
            Some(v4),
            Some(ip6("fd00::3")),
        );
        assert!(e.is_err());
        assert!(held_by(&d, &a).unwrap().contains(&IpAddr::V4(v4)));
    }

    /// GC takes records only as planned: an address an ADD took (or a record it wrote) after
    /// GC read the records stays.
    #[test]
    fn release_planned_keeps_what_changed_since_the_plan() {
        let mut d = MemDir::default();
        let p = pool();
        let old = Attachment::new("old", "eth0");
        allocate(&mut d, &p, &old, None).unwrap();
        d.write("10.244.1.77", b"").unwrap();
        let doomed = gc_plan(&records(&d).unwrap(), &BTreeSet::new());
        assert_eq!(doomed.len(), 2);
        // Meanwhile: a new ADD's record, and the empty record now written by its ADD.
        let new = Attachment::new("new", "eth0");
        allocate(&mut d, &p, &new, None).unwrap();
        d.write("10.244.1.77", b"late\r\neth0").unwrap();
        let gone = release_planned(&mut d, &doomed).unwrap();
        assert_eq!(gone, vec![(IpAddr::V4(ip("10.244.1.2")), Some(old))]);
        let left: Vec<_> = records(&d).unwrap().into_iter().map(|(_, o)| o).collect();
        assert_eq!(
            left,
            vec![Some(new), Some(Attachment::new("late", "eth0"))],
            "the ADDs after the plan keep their records"
        );
    }

    #[test]
    fn release_and_gc_cover_both_families() {
        let mut d = MemDir::default();
        let p6 = pool6("fd00::/64", "fd00::1");
        let a = Attachment::new("a", "eth0");
        let k = Attachment::new("k", "eth0");
        allocate_dual(&mut d, Some(&pool()), Some(&p6), &a, None, None).unwrap();
        allocate_dual(&mut d, Some(&pool()), Some(&p6), &k, None, None).unwrap();
        d.write("fd00::77", b"").unwrap(); // killed mid-write
        let gone = gc(&mut d, &[k.clone()].into()).unwrap();
        let names: Vec<_> = gone.iter().map(|(ip, _)| ip.to_string()).collect();
        assert_eq!(names, ["10.244.1.2", "fd00::2", "fd00::77"]);
        assert_eq!(release_owner(&mut d, &k).unwrap().len(), 2);
        assert!(records(&d).unwrap().is_empty());
    }

    #[test]
    fn fs_dir_holds_ipv6_records_as_host_local_names_them() {
        let tmp = tempfile::tempdir().unwrap();
        let mut d = FsDir::lock(tmp.path()).unwrap();
        let p6 = pool6("fd00:10:244:3::/64", "fd00:10:244:3::1");
        let a = Attachment::new("a", "eth0");
        allocate_dual(&mut d, Some(&pool()), Some(&p6), &a, None, None).unwrap();
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("fd00:10:244:3::2")).unwrap(),
            "a\r\neth0"
        );
        assert_eq!(
            std::fs::read_to_string(tmp.path().join(LAST_RESERVED_V6)).unwrap(),
            "fd00:10:244:3::2"
        );
        assert_eq!(release_owner(&mut d, &a).unwrap().len(), 2);
    }
}
