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
    let (u0, t0) = (usage_ns(&e, "spin"), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let (u1, t1) = (usage_ns(&e, "spin"), Instant::now());
    let cores = (u1 - u0) as f64 / (t1 - t0).as_nanos() as f64;
    assert!(
        (0.4..=0.6).contains(&cores),
        "used {cores:.3} cores, expected about 0.5"
    );
    e.ok(&["rm", "-f", "spin"]);

    e.assert_nothing_left();
}
