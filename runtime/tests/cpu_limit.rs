//! `--cpus 0.5`: a busy loop gets about half a core, measured by cpuacct (v1) / cpu.stat (v2).
//! Alone in its test binary so that no other test competes for the CPUs.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn usage_ns(e: &Env, c: &str) -> u64 {
    let cg = &e.inspect(c)["Cgroup"];
    if let Some(d) = cg["dirs"]["cpuacct"].as_str() {
        std::fs::read_to_string(format!("{d}/cpuacct.usage"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    } else {
        let d = cg["dir"].as_str().unwrap();
        let s = std::fs::read_to_string(format!("{d}/cpu.stat")).unwrap();
        let us: u64 = s
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .unwrap()
            .parse()
            .unwrap();
        us * 1000
    }
}

#[test]
fn busy_loop_at_half_a_cpu_uses_half_a_core() {
    require_root!(NEEDS_ROOT);
    let e = Env::with_busybox();
    // Two busy loops: without the quota they would take two cores.
    e.start(&[
        "--name",
        "spin",
        "--cpus",
        "0.5",
        "busybox",
        "sh",
        "-c",
        "while :; do :; done & while :; do :; done",
    ]);
    std::thread::sleep(Duration::from_millis(500));
    let (u0, t0, h0) = (usage_ns(&e, "spin"), Instant::now(), host_idle());
    std::thread::sleep(Duration::from_secs(3));
    let (u1, t1, h1) = (usage_ns(&e, "spin"), Instant::now(), host_idle());
    let cores = (u1 - u0) as f64 / (t1 - t0).as_nanos() as f64;
    assert!(cores <= 0.6, "used {cores:.3} cores, over the 0.5 quota");
    // The floor holds only when the container could have had half a core: on a host whose
    // cores were busy with other work it gets its fair share, which may be less.
    let idle = h1.idle_cores_since(&h0);
    if cores + idle >= 0.5 {
        assert!(
            cores >= 0.4,
            "used {cores:.3} cores with {idle:.2} cores idle, expected about 0.5"
        );
    } else {
        eprintln!("cpu_limit: host busy ({idle:.2} cores idle): only the quota's ceiling checked");
    }
    e.ok(&["rm", "-f", "spin"]);

    e.assert_nothing_left();
}

/// The host's idle and total CPU time from /proc/stat's first line.
struct HostIdle {
    idle: u64,
    total: u64,
}

fn host_idle() -> HostIdle {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    // idle + iowait
    HostIdle {
        idle: v[3] + v.get(4).copied().unwrap_or(0),
        total: v.iter().sum(),
    }
}

impl HostIdle {
    /// Idle cores on average between `before` and now.
    fn idle_cores_since(&self, before: &HostIdle) -> f64 {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let total = self.total.saturating_sub(before.total).max(1) as f64;
        self.idle.saturating_sub(before.idle) as f64 / total * cpus
    }
}
