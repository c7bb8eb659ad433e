//! ADD+DEL latency of `tweed` against the reference `bridge` + `host-local` doing the same job
//! (a bridge with the gateway address, a veth into the container, an address from the node
//! subnet, a route to the overlay and a default route, hairpin on), interleaved in one run.
//!
//! Each run counts until the plugin exited and its stdout and stderr reached EOF, as a runtime
//! waits. A separate pass then times tweed's DEL against the exit of the detached child that
//! finishes the kernel's teardown after DEL returned, and a last one the kernel floor.
//!
//! Root only. Everything happens in two namespaces this program creates and deletes: the
//! plugins run inside the "host" one, the container end lands in the other.
//!
//! `cni_bench [--rounds N] [--tweed PATH] [--cni-dir DIR]`; `bench/cni` builds and runs it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use tweed_testkit::cni::{self as testkit, Call};
use tweed_testkit::{is_root, NetnsGuard};

struct Samples {
    add: Vec<Duration>,
    del: Vec<Duration>,
    both: Vec<Duration>,
}

impl Samples {
    fn new() -> Samples {
        Samples {
            add: Vec::new(),
            del: Vec::new(),
            both: Vec::new(),
        }
    }
    fn sort(&mut self) {
        self.add.sort();
        self.del.sort();
        self.both.sort();
    }

    /// One row of the table: p50 and p99 of ADD, DEL and both, in ms.
    fn print_row(&self, name: &str) {
        let p = |v: &[Duration], q: f64| ms(testkit::percentile(v, q));
        println!(
            "{:<18} {:>8.2}ms {:>8.2}ms {:>8.2}ms {:>8.2}ms {:>10.2}ms {:>10.2}ms",
            name,
            p(&self.add, 50.0),
            p(&self.add, 99.0),
            p(&self.del, 50.0),
            p(&self.del, 99.0),
            p(&self.both, 50.0),
            p(&self.both, 99.0),
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> ExitCode {
    let mut rounds = 50usize;
    let mut tweed: Option<PathBuf> = None;
    let mut cni_dir = PathBuf::from("/usr/lib/cni");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => rounds = args.next().and_then(|v| v.parse().ok()).unwrap_or(rounds),
            "--tweed" => tweed = args.next().map(PathBuf::from),
            "--cni-dir" => cni_dir = args.next().map(PathBuf::from).unwrap_or(cni_dir),
            other => {
                eprintln!("unknown argument {other:?}; usage: cni_bench [--rounds N] [--tweed PATH] [--cni-dir DIR]");
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
    for p in [&tweed, &bridge, &cni_dir.join("host-local")] {
        if !p.exists() {
            eprintln!(
                "{} not found (reference plugins: Debian package containernetworking-plugins)",
                p.display()
            );
            return ExitCode::from(2);
        }
    }
    let pid = std::process::id();
    let host = NetnsGuard::new(&format!("twb{pid}h")).expect("host namespace");
    let ctr = NetnsGuard::new(&format!("twb{pid}c")).expect("container namespace");
    let tmp = tempdir();
    let subnet_env = tmp.join("subnet.env");
    testkit::write_subnet_env(&subnet_env, "10.244.0.0/16", "10.244.9.1/24", 1450)
        .expect("subnet.env");
    let tweed_conf = serde_json::json!({
        "cniVersion": "1.0.0", "name": "bench-tweed", "type": "tweed", "bridge": "cni0",
        "subnetFile": subnet_env, "dataDir": tmp.join("tweed"), "hairpinMode": true,
    })
    .to_string();
    let ref_conf = serde_json::json!({
        "cniVersion": "1.0.0", "name": "bench-ref", "type": "bridge", "bridge": "cni1",
        "isGateway": true, "hairpinMode": true, "mtu": 1450,
        "ipam": {"type": "host-local", "subnet": "10.244.10.0/24", "dataDir": tmp.join("ref"),
                 "routes": [{"dst": "10.244.0.0/16"}, {"dst": "0.0.0.0/0"}]},
    })
    .to_string();
    let cni_path = cni_dir.display().to_string();
    let netns = ctr.path_str();
    let plugins = [
        ("tweed", tweed.clone(), tweed_conf),
        ("bridge+host-local", bridge, ref_conf),
    ];
    let mut samples = [Samples::new(), Samples::new()];
    let warmup = 3;
    for round in 0..rounds + warmup {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (name, path, conf) = &plugins[i];
            let id = format!("bench-{round}");
            let mut call = Call::new("ADD", &id, &netns);
            call.cni_path = &cni_path;
            let add = testkit::run(&host, path, &call, conf.as_bytes()).expect("spawn");
            if !add.ok() {
                eprintln!("{name} ADD failed: {} {}", add.stdout, add.stderr);
                return ExitCode::FAILURE;
            }
            call.command = "DEL";
            let del = testkit::run(&host, path, &call, conf.as_bytes()).expect("spawn");
            if !del.ok() {
                eprintln!("{name} DEL failed: {} {}", del.stdout, del.stderr);
                return ExitCode::FAILURE;
            }
            // `testkit::run` returns once the plugin exited and its stdout and stderr reached
            // EOF: what a runtime waits for. A detached child still holding either pipe would
            // show up here.
            if round >= warmup {
                let s = &mut samples[i];
                s.add.push(add.elapsed);
                s.del.push(del.elapsed);
                s.both.push(add.elapsed + del.elapsed);
            }
        }
    }
    for s in samples.iter_mut() {
        s.sort();
    }
    let mut teardown = match detached_teardown(&host, &tweed, &plugins[0].2, &netns, rounds) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("measuring tweed's detached teardown: {e}");
            return ExitCode::FAILURE;
        }
    };
    teardown.0.sort();
    teardown.1.sort();
    let mut floor = kernel_floor(&host, &ctr, rounds);
    floor.sort();
    println!(
        "cni bench: {rounds} rounds, interleaved, {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<18} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12}",
        "plugin", "ADD p50", "ADD p99", "DEL p50", "DEL p99", "ADD+DEL p50", "ADD+DEL p99"
    );
    for (i, s) in samples.iter().enumerate() {
        s.print_row(plugins[i].0);
    }
    floor.print_row("kernel floor");
    println!(
        "{:<18} {:>10} {:>10} {:>8.2}ms {:>8.2}ms   (a separate pass of {rounds} tweed ADD/DELs: DEL returned)",
        "tweed DEL", "", "",
        ms(testkit::percentile(&teardown.0, 50.0)),
        ms(testkit::percentile(&teardown.0, 99.0)),
    );
    println!(
        "{:<18} {:>10} {:>10} {:>8.2}ms {:>8.2}ms   (same DELs: until the detached child that finishes the kernel's teardown exited)",
        "tweed teardown", "", "",
        ms(testkit::percentile(&teardown.1, 50.0)),
        ms(testkit::percentile(&teardown.1, 99.0)),
    );
    println!("(kernel floor: creating and deleting one veth pair across the two namespaces through an open netlink socket, no process, no IPAM)");
    let ratio = |p: f64| {
        ms(testkit::percentile(&samples[0].both, p)) / ms(testkit::percentile(&samples[1].both, p))
    };
    let add_ratio = ms(testkit::percentile(&samples[0].add, 50.0))
        / ms(testkit::percentile(&samples[1].add, 50.0));
    println!("tweed / reference, ADD+DEL: median {:.2}x, p99 {:.2}x (target <= 0.50x); ADD alone: median {add_ratio:.2}x", ratio(50.0), ratio(99.0));
    drop((host, ctr));
    let _ = std::fs::remove_dir_all(&tmp);
    ExitCode::SUCCESS
}

/// tweed's DEL returns once its devices are unlisted; a detached child of the plugin finishes
/// the kernel's teardown. This pass measures, per DEL, the time until the plugin was done (as
/// in the main loop: its exit and EOF on its stdout and stderr) and the time until that child
/// exited. The bench becomes a child subreaper for this pass, so the orphaned child is
/// reparented to it and its exit can be waited for. It runs apart from the interleaved rounds
/// because waiting for each child there would keep the next ADD from overlapping with the
/// teardown, as it does under a real runtime.
fn detached_teardown(
    host: &NetnsGuard,
    tweed: &std::path::Path,
    conf: &str,
    netns: &str,
    rounds: usize,
) -> std::io::Result<(Vec<Duration>, Vec<Duration>)> {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only sets a flag on this process.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let (mut returned, mut done) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let id = format!("teardown-{round}");
        let mut call = Call::new("ADD", &id, netns);
        let add = testkit::run(&host, tweed, &call, conf.as_bytes())?;
        if !add.ok() {
            return Err(std::io::Error::other(format!("ADD: {}", add.stdout)));
        }
        // Nothing else is a child now: any orphan of the ADD (there is none) is drained.
        reap_all();
        call.command = "DEL";
        let start = std::time::Instant::now();
        let del = testkit::run(&host, tweed, &call, conf.as_bytes())?;
        if !del.ok() {
            return Err(std::io::Error::other(format!("DEL: {}", del.stdout)));
        }
        returned.push(del.elapsed);
        // Blocks until the detached child exits (at once when DEL deleted synchronously).
        reap_all();
        done.push(start.elapsed());
    }
    // SAFETY: as above.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0) };
    Ok((returned, done))
}

/// Waits for every child of this process (only orphans inherited as a subreaper are left when
/// this is called).
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
            s.add.push(a);
            s.del.push(d);
            s.both.push(a + d);
        }
    });
    s
}

fn tempdir() -> PathBuf {
    let p = std::env::temp_dir().join(format!("tweed-cni-bench-{}", std::process::id()));
    std::fs::create_dir_all(&p).expect("temp dir");
    p
}
