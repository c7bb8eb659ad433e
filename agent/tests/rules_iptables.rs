//! The rule sync against real iptables, inside a network namespace made for the test (root).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;
use tweed_agent::rules::{forward_chain, masquerade_chain, Iptables};

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs `f` on a thread that has entered `ns`; children it spawns (iptables) inherit the netns.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = File::open(&path).expect("netns file");
        // SAFETY: setns on a valid namespace fd affects only this thread.
        assert_eq!(
            unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns"
        );
        f()
    })
    .join()
    .expect("netns thread")
}

#[test]
fn sync_installs_is_idempotent_repairs_and_replaces() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (network namespaces)"
    );
    let ns = Netns(format!("twr-{}", std::process::id()));
    assert!(Command::new("ip")
        .args(["netns", "add", &ns.0])
        .status()
        .unwrap()
        .success());
    let net = "10.244.0.0/16".parse().unwrap();
    let chains = vec![
        masquerade_chain(net, "10.244.3.0/24".parse().unwrap()),
        forward_chain(net),
    ];
    let c2 = chains.clone();
    let (first, second, listing) = in_netns(&ns.0, move || {
        let first = Iptables::sync(&c2).unwrap();
        let second = Iptables::sync(&c2).unwrap();
        (first, second, Iptables::listing("nat").unwrap())
    });
    assert!(first, "first sync installs");
    assert!(!second, "second sync changes nothing");
    assert!(
        listing.contains("-A POSTROUTING -m comment --comment tweed -j TWEED-POSTRTG"),
        "{listing}"
    );
    assert!(listing.contains("-d 10.244.3.0/24"), "{listing}");

    // An operator deletes the chain: the next sync restores chain and jump.
    let c3 = chains.clone();
    let repaired = in_netns(&ns.0, move || {
        let run =
            |a: &[&str]| assert!(Command::new("iptables").args(a).status().unwrap().success());
        run(&[
            "-t",
            "nat",
            "-D",
            "POSTROUTING",
            "-m",
            "comment",
            "--comment",
            "tweed",
            "-j",
            "TWEED-POSTRTG",
        ]);
        run(&["-t", "nat", "-F", "TWEED-POSTRTG"]);
        run(&["-t", "nat", "-X", "TWEED-POSTRTG"]);
        (
            Iptables::sync(&c3).unwrap(),
            Iptables::listing("nat").unwrap(),
        )
    });
    assert!(repaired.0);
    assert!(repaired
        .1
        .contains("-A POSTROUTING -m comment --comment tweed -j TWEED-POSTRTG"));

    // The subnet changes: the old rule goes, the new one comes, the jump is not duplicated.
    let moved = vec![
        masquerade_chain(net, "10.244.9.0/24".parse().unwrap()),
        forward_chain(net),
    ];
    let listing = in_netns(&ns.0, move || {
        Iptables::sync(&moved).unwrap();
        Iptables::listing("nat").unwrap()
    });
    assert!(
        listing.contains("-d 10.244.9.0/24") && !listing.contains("-d 10.244.3.0/24"),
        "{listing}"
    );
    assert_eq!(listing.matches("-j TWEED-POSTRTG").count(), 1, "{listing}");
}
