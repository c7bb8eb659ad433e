//! ADD+DEL latency of `tweed` against the reference `bridge` + `host-local` doing the same job
//! (a bridge with the gateway address, a veth into the container, an address from the node
//! subnet, a route to the overlay and a default route, hairpin on), interleaved in one run, and
//! optionally a second tweed binary (`--also`, e.g. main's build) in the same rounds.
//!
//! ADD and "DEL returned" count until the plugin exited and its stdout and stderr reached EOF,
//! as a runtime waits. "DEL done" counts until every process the DEL left behind exited too:
//! tweed's DEL returns once the veth is unlisted and leaves a detached child that exits when
//! the kernel acks the delete, i.e. when the kernel's teardown is over. The bench is a child
//! subreaper, so that child is reparented to it and waited for before the next round. For a
//! synchronous plugin both are the same. A last pass times the kernel floor.
//!
//! Root only. Everything happens in two namespaces this program creates and deletes: the
//! plugins run inside the "host" one, the container end lands in the other.
//!
//! `cni_bench [--rounds N] [--tweed PATH] [--also PATH] [--cni-dir DIR]`; `bench/cni` builds
//! and runs it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tweed_testkit::cni::{self as testkit, Call};
use tweed_testkit::{is_root, NetnsGuard};

struct Samples {
    add: Vec<Duration>,
    /// DEL until the plugin exited and its stdout and stderr reached EOF.
    del: Vec<Duration>,
    /// DEL until every process it left behind exited too: for tweed, the detached child that
    /// waits for the kernel's ACK of the veth delete; for a synchronous plugin, the same as
    /// `del`.
    done: Vec<Duration>,
    both: Vec<Duration>,
    both_done: Vec<Duration>,
}

impl Samples {
    fn new() -> Samples {
        Samples {
            add: Vec::new(),
            del: Vec::new(),
            done: Vec::new(),
            both: Vec::new(),
            both_done: Vec::new(),
        }
    }

    fn push(&mut self, add: Duration, del: Duration, done: Duration) {
        self.add.push(add);
        self.del.push(del);
        self.done.push(done);
        self.both.push(add + del);
        self.both_done.push(add + done);
    }

    fn sort(&mut self) {
        for v in [
            &mut self.add,
            &mut self.del,
            &mut self.done,
            &mut self.both,
            &mut self.both_done,
        ] {
            v.sort();
        }
    }

    /// One row of the table: p50 / p99 of ADD, DEL as returned, DEL until done, ADD+DEL as
    /// returned and ADD+DEL until done, in ms.
    fn print_row(&self, name: &str) {
        let p = |v: &[Duration]| {
            format!(
                "{:>6.2}/{:<6.2}",
                ms(testkit::percentile(v, 50.0)),
                ms(testkit::percentile(v, 99.0))
            )
        };
        println!(
            "{:<20} {:>13} {:>13} {:>13} {:>13} {:>13}",
            name,
            p(&self.add),
            p(&self.del),
            p(&self.done),
            p(&self.both),
            p(&self.both_done),
        );
    }

    /// Medians of this row over `other`'s: ADD, ADD+DEL as returned, ADD+DEL until done.
    fn print_ratio(&self, name: &str, other: &Samples, other_name: &str) {
        let r = |a: &[Duration], b: &[Duration], q: f64| {
            ms(testkit::percentile(a, q)) / ms(testkit::percentile(b, q))
        };
        println!(
            "{name} / {other_name}: ADD {:.2}x | ADD+DEL returned {:.2}x (p99 {:.2}x) | ADD+DEL done {:.2}x (p99 {:.2}x)",
            r(&self.add, &other.add, 50.0),
            r(&self.both, &other.both, 50.0),
            r(&self.both, &other.both, 99.0),
            r(&self.both_done, &other.both_done, 50.0),
            r(&self.both_done, &other.both_done, 99.0),
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

const USAGE: &str = "usage: cni_bench [--rounds N] [--tweed PATH] [--also PATH] [--cni-dir DIR]";

fn main() -> ExitCode {
    let mut rounds = 50usize;
    let mut tweed: Option<PathBuf> = None;
    let mut also: Option<PathBuf> = None;
    let mut cni_dir = PathBuf::from("/usr/lib/cni");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => rounds = args.next().and_then(|v| v.parse().ok()).unwrap_or(rounds),
            "--tweed" => tweed = args.next().map(PathBuf::from),
            "--also" => also = args.next().map(PathBuf::from),
            "--cni-dir" => cni_dir = args.next().map(PathBuf::from).unwrap_or(cni_dir),
            other => {
                eprintln!("unknown argument {other:?}; {USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    if !is_root() {
        eprintln!("cni_bench needs root: it creates network namespaces");
        return ExitCode::from(2);
    }
    let tweed = tweed.unwrap_or_else(|| {
        let exe = std::env::current_exe().expect("own path");
        // target/<profile>/examples/cni_bench -> target/<profile>/tweed
        exe.parent()
            .and_then(|p| p.parent())
            .expect("target dir")
            .join("tweed")
    });
    let bridge = cni_dir.join("bridge");
    let mut needed = vec![tweed.clone(), bridge.clone(), cni_dir.join("host-local")];
    needed.extend(also.clone());
    for p in &needed {
        if !p.exists() {
            eprintln!(
                "{} not found (reference plugins: Debian package containernetworking-plugins)",
                p.display()
            );
            return ExitCode::from(2);
        }
    }
    // Every process a DEL leaves behind is reparented to the bench, so that the round can
    // wait for it: tweed's detached child exits once the kernel acked the veth delete, which
    // is when the kernel is done with the devices.
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only sets a flag on this process.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        eprintln!(
            "cni_bench: becoming a subreaper: {}",
            std::io::Error::last_os_error()
        );
        return ExitCode::FAILURE;
    }
    let pid = std::process::id();
    let host = NetnsGuard::new(&format!("twb{pid}h")).expect("host namespace");
    let ctr = NetnsGuard::new(&format!("twb{pid}c")).expect("container namespace");
    let tmp = tempdir();
    let subnet_env = tmp.join("subnet.env");
    testkit::write_subnet_env(&subnet_env, "10.244.0.0/16", "10.244.9.1/24", 1450)
        .expect("subnet.env");
    // The second tweed (`--also`) has its own node subnet: each puts the gateway address on
    // its own bridge.
    let subnet_also = tmp.join("subnet-also.env");
    testkit::write_subnet_env(&subnet_also, "10.244.0.0/16", "10.244.11.1/24", 1450)
        .expect("subnet.env");
    let tweed_conf = |bridge: &str, data: &str, subnet_env: &PathBuf| {
        serde_json::json!({
            "cniVersion": "1.0.0", "name": format!("bench-{data}"), "type": "tweed",
            "bridge": bridge, "subnetFile": subnet_env, "dataDir": tmp.join(data),
            "hairpinMode": true,
        })
        .to_string()
    };
    let ref_conf = serde_json::json!({
        "cniVersion": "1.0.0", "name": "bench-ref", "type": "bridge", "bridge": "cni1",
        "isGateway": true, "hairpinMode": true, "mtu": 1450,
        "ipam": {"type": "host-local", "subnet": "10.244.10.0/24", "dataDir": tmp.join("ref"),
                 "routes": [{"dst": "10.244.0.0/16"}, {"dst": "0.0.0.0/0"}]},
    })
    .to_string();
    let cni_path = cni_dir.display().to_string();
    let netns = ctr.path_str();
    let mut plugins = vec![
        (
            "tweed",
            tweed.clone(),
            tweed_conf("cni0", "tweed", &subnet_env),
        ),
        ("bridge+host-local", bridge, ref_conf),
    ];
    if let Some(old) = &also {
        plugins.push((
            "tweed --also",
            old.clone(),
            tweed_conf("cni2", "also", &subnet_also),
        ));
    }
    let mut samples: Vec<Samples> = plugins.iter().map(|_| Samples::new()).collect();
    let warmup = 3;
    for round in 0..rounds + warmup {
        // Each plugin goes first as often as the others.
        let n = plugins.len();
        for k in 0..n {
            let i = (round + k) % n;
            let (name, path, conf) = &plugins[i];
            let id = format!("bench-{i}-{round}");
            let mut call = Call::new("ADD", &id, &netns);
            call.cni_path = &cni_path;
            let add = testkit::run(&host, path, &call, conf.as_bytes()).expect("spawn");
            if !add.ok() {
                eprintln!("{name} ADD failed: {} {}", add.stdout, add.stderr);
                return ExitCode::FAILURE;
            }
            // Nothing is left over from the ADD (no plugin leaves a process there).
            reap_all();
            call.command = "DEL";
            let start = Instant::now();
            let del = testkit::run(&host, path, &call, conf.as_bytes()).expect("spawn");
            if !del.ok() {
                eprintln!("{name} DEL failed: {} {}", del.stdout, del.stderr);
                return ExitCode::FAILURE;
            }
            // `testkit::run` returned once the plugin exited and its stdout and stderr reached
            // EOF: what a runtime waits for. This blocks until the detached child, if any,
            // exited too: the kernel has then finished the delete.
            reap_all();
            let done = start.elapsed();
            if round >= warmup {
                samples[i].push(add.elapsed, del.elapsed, done);
            }
        }
    }
    for s in samples.iter_mut() {
        s.sort();
    }
    let mut floor = kernel_floor(&host, &ctr, rounds);
    floor.sort();
    println!(
        "cni bench: {rounds} rounds, interleaved, {} CPUs, load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    );
    println!("p50/p99 in ms; \"returned\": until the plugin exited and its stdout and stderr reached EOF; \"done\": until every process it left behind exited too");
    println!(
        "{:<20} {:>13} {:>13} {:>13} {:>13} {:>13}",
        "plugin", "ADD", "DEL returned", "DEL done", "ADD+DEL ret.", "ADD+DEL done"
    );
    for (i, s) in samples.iter().enumerate() {
        s.print_row(plugins[i].0);
    }
    floor.print_row("kernel floor");
    println!("(kernel floor: creating and deleting one veth pair across the two namespaces through an open netlink socket, no process, no IPAM)");
    samples[0].print_ratio("tweed", &samples[1], "reference");
    if samples.len() > 2 {
        samples[2].print_ratio("tweed --also", &samples[1], "reference");
        samples[0].print_ratio("tweed", &samples[2], "tweed --also");
    }
    floor.print_ratio("kernel floor", &samples[1], "reference");
    println!("target: tweed / reference ADD+DEL done <= 0.50x");
    drop((host, ctr));
    let _ = std::fs::remove_dir_all(&tmp);
    ExitCode::SUCCESS
}

/// Waits for every child of this process. Called only when no plugin is running, so what is
/// left are the orphans inherited as a subreaper.
fn reap_all() {
    // SAFETY: waitpid with a null status pointer; ECHILD ends the loop.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), 0) } > 0 {}
}

/// What the kernel alone takes to create and delete the veth pair of one attachment: the part
/// of ADD and DEL no plugin can avoid.
fn kernel_floor(host: &NetnsGuard, ctr: &NetnsGuard, rounds: usize) -> Samples {
    use std::os::fd::AsRawFd;
    use tweed_netlink::{Netlink, Netns, Op, VethSpec};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    let mut s = Samples::new();
    rt.block_on(async {
        let host = Netns::open(host.path()).expect("the host namespace");
        let nl = Netlink::real_in(&host).expect("netlink in the host namespace");
        for _ in 0..rounds {
            let add = Op::LinkAddVeth(VethSpec {
                name: "twfloor".into(),
                peer: "eth0".into(),
                peer_netns: Some(ctr.as_raw_fd()),
                mtu: Some(1450),
                mac: None,
                peer_mac: None,
            });
            let t = std::time::Instant::now();
            nl.apply(&add).await.expect("veth add");
            let a = t.elapsed();
            let t = std::time::Instant::now();
            nl.apply(&Op::LinkDel {
                name: "twfloor".into(),
            })
            .await
            .expect("veth del");
            let d = t.elapsed();
            s.push(a, d, d);
        }
    });
    s
}

fn tempdir() -> PathBuf {
    let p = std::env::temp_dir().join(format!("tweed-cni-bench-{}", std::process::id()));
    std::fs::create_dir_all(&p).expect("temp dir");
    p
}
