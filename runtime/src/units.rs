//! Parsing of resource limits as users type them: `64m`, `1.5g`, `0.5` CPUs, `100` pids.
//!
//! Pure functions; the cgroup module turns the parsed values into file contents.

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnitsError {
    #[error("invalid memory size {0:?}: expected a number with an optional unit b, k, m, g or t (e.g. 64m)")]
    BadMemory(String),
    #[error("memory limit {0:?} is too small: the minimum is 6m (the kernel needs room for the container's init)")]
    MemoryTooSmall(String),
    #[error("invalid CPU count {0:?}: expected a decimal number such as 0.5 or 2")]
    BadCpus(String),
    #[error("CPU count {value:?} is out of range: it must be between 0.01 and {max} (the CPUs this host has)")]
    CpusOutOfRange { value: String, max: usize },
    #[error("invalid pids limit {0:?}: expected a whole number of at least 1")]
    BadPids(String),
}

/// Smallest memory limit we accept. Docker says 6 MiB; below it the init cannot even exec.
pub const MIN_MEMORY: u64 = 6 * 1024 * 1024;

/// CFS period used for `--cpus` (Docker's default).
pub const CPU_PERIOD_US: u64 = 100_000;

/// Parses a memory size: `64m`, `64M`, `64mb`, `1.5g`, `1048576`, `512k`.
pub fn parse_memory(s: &str) -> Result<u64, UnitsError> {
    let bytes = parse_size(s)?;
    if bytes < MIN_MEMORY {
        return Err(UnitsError::MemoryTooSmall(s.to_string()));
    }
    Ok(bytes)
}

/// Parses a size in bytes with the suffixes of [`parse_memory`], without its minimum.
pub fn parse_size(s: &str) -> Result<u64, UnitsError> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').filter(|r| !r.is_empty()).unwrap_or(&t);
    let (num, mult): (&str, u64) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        Some(c) if c.is_ascii_digit() => (t, 1),
        _ => return Err(UnitsError::BadMemory(s.to_string())),
    };
    if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(UnitsError::BadMemory(s.to_string()));
    }
    let v: f64 = num
        .parse()
        .map_err(|_| UnitsError::BadMemory(s.to_string()))?;
    let bytes = v * mult as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(UnitsError::BadMemory(s.to_string()));
    }
    Ok(bytes as u64)
}

/// A CPU limit in millicpus (`0.5` -> 500). `host_cpus` bounds it, as Docker does.
pub fn parse_cpus(s: &str, host_cpus: usize) -> Result<u64, UnitsError> {
    let t = s.trim();
    if t.is_empty() || !t.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(UnitsError::BadCpus(s.to_string()));
    }
    let v: f64 = t.parse().map_err(|_| UnitsError::BadCpus(s.to_string()))?;
    let milli = (v * 1000.0).round();
    if milli < 10.0 || milli > (host_cpus as f64) * 1000.0 {
        return Err(UnitsError::CpusOutOfRange {
            value: s.to_string(),
            max: host_cpus,
        });
    }
    Ok(milli as u64)
}

pub fn parse_pids(s: &str) -> Result<u64, UnitsError> {
    match s.trim().parse::<u64>() {
        Ok(v) if v >= 1 => Ok(v),
        _ => Err(UnitsError::BadPids(s.to_string())),
    }
}

/// Resource limits of one container, already validated.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Bytes.
    pub memory: Option<u64>,
    /// Thousandths of a CPU.
    pub millicpus: Option<u64>,
    pub pids: Option<u64>,
}

impl Limits {
    /// CFS quota in microseconds per [`CPU_PERIOD_US`].
    pub fn cpu_quota_us(&self) -> Option<u64> {
        self.millicpus.map(|m| m * CPU_PERIOD_US / 1000)
    }

    /// How many CPUs the container is shown (and pinned to): the quota rounded up.
    pub fn visible_cpus(&self, host_cpus: usize) -> usize {
        match self.millicpus {
            Some(m) => (m.div_ceil(1000) as usize).clamp(1, host_cpus.max(1)),
            None => host_cpus.max(1),
        }
    }
}

/// Human form of a byte count for tables: `64MiB`.
pub fn human_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if v.fract() == 0.0 {
        format!("{}{}", v as u64, U[i])
    } else {
        format!("{v:.1}{}", U[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_units() {
        assert_eq!(parse_memory("64m").unwrap(), 64 << 20);
        assert_eq!(parse_memory("64M").unwrap(), 64 << 20);
        assert_eq!(parse_memory("64mb").unwrap(), 64 << 20);
        assert_eq!(parse_memory("1g").unwrap(), 1 << 30);
        assert_eq!(parse_memory("1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_memory("8192k").unwrap(), 8 << 20);
        assert_eq!(parse_memory("7340032").unwrap(), 7 << 20);
        assert_eq!(parse_memory("7340032b").unwrap(), 7 << 20);
    }

    #[test]
    fn memory_rejects_nonsense_and_tiny() {
        for bad in ["", "m", "-1m", "12x", "1.2.3m", "abc", "1e9"] {
            assert!(
                matches!(parse_memory(bad), Err(UnitsError::BadMemory(_))),
                "{bad}"
            );
        }
        assert_eq!(
            parse_memory("1m"),
            Err(UnitsError::MemoryTooSmall("1m".into()))
        );
        assert_eq!(
            parse_memory("0"),
            Err(UnitsError::MemoryTooSmall("0".into()))
        );
    }

    #[test]
    fn cpus() {
        assert_eq!(parse_cpus("0.5", 2).unwrap(), 500);
        assert_eq!(parse_cpus("2", 2).unwrap(), 2000);
        assert_eq!(parse_cpus("0.01", 2).unwrap(), 10);
        assert!(matches!(
            parse_cpus("3", 2),
            Err(UnitsError::CpusOutOfRange { .. })
        ));
        assert!(matches!(
            parse_cpus("0", 2),
            Err(UnitsError::CpusOutOfRange { .. })
        ));
        assert!(matches!(parse_cpus("-1", 2), Err(UnitsError::BadCpus(_))));
        assert!(matches!(parse_cpus("half", 2), Err(UnitsError::BadCpus(_))));
    }

    #[test]
    fn pids() {
        assert_eq!(parse_pids("100").unwrap(), 100);
        assert!(parse_pids("0").is_err());
        assert!(parse_pids("-5").is_err());
        assert!(parse_pids("lots").is_err());
    }

    #[test]
    fn quota_and_visible_cpus() {
        let l = Limits {
            millicpus: Some(500),
            ..Default::default()
        };
        assert_eq!(l.cpu_quota_us(), Some(50_000));
        assert_eq!(l.visible_cpus(2), 1);
        let l = Limits {
            millicpus: Some(1500),
            ..Default::default()
        };
        assert_eq!(l.cpu_quota_us(), Some(150_000));
        assert_eq!(l.visible_cpus(2), 2);
        assert_eq!(l.visible_cpus(8), 2);
        assert_eq!(Limits::default().visible_cpus(4), 4);
    }

    #[test]
    fn human() {
        assert_eq!(human_bytes(64 << 20), "64MiB");
        assert_eq!(human_bytes(1536), "1.5KiB");
    }
}
