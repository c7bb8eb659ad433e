//! An honest `/proc` for containers: `/proc/meminfo`, `/proc/cpuinfo` and
//! `/sys/devices/system/cpu/online` rendered from the container's limits (what LXCFS does for
//! Docker). The shim keeps the rendered files fresh; they are bind-mounted over the originals.
//!
//! `meminfo` is rendered with a fixed width per value so that each refresh has the same length
//! and can be written in place in a single `pwrite`: a reader never sees a truncated file.

use crate::cgroup::Stats;

/// Width of each value column (digits), wide enough for any real size in kB.
const WIDTH: usize = 16;

/// The keys replaced with container values; every other line keeps the host's value.
fn container_value(key: &str, s: &Stats, limit: u64, host: u64) -> Option<u64> {
    let kb = |b: u64| b / 1024;
    let usage = s.memory_usage.min(limit);
    let free = limit - usage;
    let cache = s.cache.min(usage);
    Some(match key {
        "MemTotal" => kb(limit),
        "MemFree" => kb(free),
        "MemAvailable" => kb(free + s.inactive_file.min(cache)),
        "Buffers" => 0,
        "Cached" => kb(cache),
        "SwapCached" | "SwapTotal" | "SwapFree" | "Zswap" | "Zswapped" => 0,
        "Active" | "Inactive" | "Active(anon)" | "Inactive(anon)" | "Active(file)"
        | "Inactive(file)" | "Shmem" | "Mapped" | "AnonPages" | "Slab" | "SReclaimable"
        | "SUnreclaim" => host.min(kb(usage)),
        _ => return None,
    })
}

/// Renders `/proc/meminfo` for a container limited to `limit` bytes, using the host's file as
/// the template for the set and order of keys.
pub fn render_meminfo(host: &str, stats: &Stats, limit: u64) -> String {
    let mut out = String::with_capacity(host.len() * 2);
    for line in host.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let host_val: u64 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        let unit = parts.next();
        let v = container_value(key, stats, limit, host_val).unwrap_or(host_val);
        let label = format!("{key}:");
        match unit {
            Some(u) => out.push_str(&format!("{label:<16}{v:>WIDTH$} {u}\n")),
            None => out.push_str(&format!("{label:<16}{v:>WIDTH$}\n")),
        }
    }
    out
}

/// Renders `/proc/cpuinfo` showing only `cpus` (host CPU numbers), renumbered from 0.
pub fn render_cpuinfo(host: &str, cpus: &[usize]) -> String {
    let n = cpus.len();
    let mut out = String::new();
    let mut idx = 0;
    for block in host.split("\n\n") {
        let proc_num = block.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "processor").then(|| v.trim().parse::<usize>().ok())?
        });
        let Some(p) = proc_num else { continue };
        if !cpus.contains(&p) {
            continue;
        }
        for l in block.lines() {
            let key = l.split(':').next().unwrap_or("").trim();
            match key {
                "processor" => out.push_str(&format!("processor\t: {idx}\n")),
                "siblings" => out.push_str(&format!("siblings\t: {n}\n")),
                "cpu cores" => out.push_str(&format!("cpu cores\t: {n}\n")),
                _ => {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out.push('\n');
        idx += 1;
    }
    out
}

/// `/sys/devices/system/cpu/online` for `n` CPUs.
pub fn render_cpu_online(n: usize) -> String {
    if n <= 1 {
        "0\n".to_string()
    } else {
        format!("0-{}\n", n - 1)
    }
}

/// Parses a kernel CPU list (`0-3,5`).
pub fn parse_cpu_list(s: &str) -> Vec<usize> {
    let mut v = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                    v.extend(a..=b);
                }
            }
            None => {
                if let Ok(a) = part.parse() {
                    v.push(a);
                }
            }
        }
    }
    v
}

/// The CPUs this process may run on (all online ones if the kernel will not say).
pub fn host_cpus_allowed() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills a zeroed cpu_set_t.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return (0..online_cpus()).collect();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|c| libc::CPU_ISSET(*c, &set))
            .collect()
    }
}

pub fn online_cpus() -> usize {
    // SAFETY: plain sysconf.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    n.max(1) as usize
}

/// Picks `n` of the `allowed` CPUs for a container, starting at an offset derived from its id so
/// that containers spread over the host.
pub fn pick_cpus(allowed: &[usize], n: usize, id: &str) -> Vec<usize> {
    if allowed.is_empty() || n >= allowed.len() {
        return allowed.to_vec();
    }
    let h = id
        .bytes()
        .fold(0usize, |a, b| a.wrapping_mul(31).wrapping_add(b as usize));
    let start = h % allowed.len();
    let mut v: Vec<usize> = (0..n)
        .map(|i| allowed[(start + i) % allowed.len()])
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST_MEMINFO: &str = "\
MemTotal:       24684092 kB
MemFree:        19880272 kB
MemAvailable:   24230884 kB
Buffers:          102400 kB
Cached:          4000000 kB
SwapCached:            0 kB
Active:          1000000 kB
SwapTotal:       1000000 kB
SwapFree:        1000000 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
";

    fn field(text: &str, key: &str) -> u64 {
        text.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k == key).then(|| v.split_whitespace().next()?.parse().ok())?
            })
            .unwrap()
    }

    #[test]
    fn meminfo_shows_the_limit() {
        let s = Stats {
            memory_usage: 16 << 20,
            cache: 4 << 20,
            inactive_file: 2 << 20,
            ..Default::default()
        };
        let m = render_meminfo(HOST_MEMINFO, &s, 64 << 20);
        assert_eq!(field(&m, "MemTotal"), 65536);
        assert_eq!(field(&m, "MemFree"), 49152);
        assert_eq!(field(&m, "MemAvailable"), 49152 + 2048);
        assert_eq!(field(&m, "Cached"), 4096);
        assert_eq!(field(&m, "Buffers"), 0);
        assert_eq!(field(&m, "SwapTotal"), 0);
        assert_eq!(field(&m, "Hugepagesize"), 2048);
        assert_eq!(field(&m, "HugePages_Total"), 0);
        assert_eq!(m.lines().count(), HOST_MEMINFO.lines().count());
        assert!(m.contains("MemTotal:                  65536 kB\n"));
    }

    #[test]
    fn meminfo_length_is_stable_across_refreshes() {
        let a = render_meminfo(HOST_MEMINFO, &Stats::default(), 64 << 20);
        let b = render_meminfo(
            HOST_MEMINFO,
            &Stats {
                memory_usage: 63 << 20,
                cache: 1,
                ..Default::default()
            },
            64 << 20,
        );
        assert_eq!(a.len(), b.len());
    }

    #[test]
    fn usage_above_limit_never_underflows() {
        let s = Stats {
            memory_usage: 100 << 20,
            ..Default::default()
        };
        let m = render_meminfo(HOST_MEMINFO, &s, 64 << 20);
        assert_eq!(field(&m, "MemFree"), 0);
    }

    #[test]
    fn cpuinfo_keeps_only_the_container_cpus() {
        let host = "processor\t: 0\nmodel name\t: X\nsiblings\t: 4\ncpu cores\t: 4\n\n\
processor\t: 1\nmodel name\t: X\nsiblings\t: 4\n\n\
processor\t: 2\nmodel name\t: X\n\n\
processor\t: 3\nmodel name\t: X\n\n";
        let c = render_cpuinfo(host, &[1, 3]);
        assert_eq!(c.matches("processor").count(), 2);
        assert!(c.contains("processor\t: 0\n"));
        assert!(c.contains("processor\t: 1\n"));
        assert!(!c.contains("processor\t: 2\n"));
        assert!(c.contains("siblings\t: 2\n"));
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(render_cpu_online(1), "0\n");
        assert_eq!(render_cpu_online(3), "0-2\n");
        assert_eq!(parse_cpu_list("0-3,5\n"), vec![0, 1, 2, 3, 5]);
        assert_eq!(parse_cpu_list("0"), vec![0]);
    }

    #[test]
    fn picked_cpus_are_allowed_and_spread() {
        let all = [0, 1, 2, 3];
        let a = pick_cpus(&all, 1, "aaaa");
        assert_eq!(a.len(), 1);
        assert!(all.contains(&a[0]));
        assert_eq!(pick_cpus(&all, 4, "x"), all.to_vec());
        assert_eq!(pick_cpus(&all, 9, "x"), all.to_vec());
        let spread: std::collections::HashSet<Vec<usize>> = (0..20)
            .map(|i| pick_cpus(&all, 1, &format!("id{i}")))
            .collect();
        assert!(spread.len() > 1);
    }
}
