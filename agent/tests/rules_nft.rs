//! The firewall sync against real nftables (and iptables for `--ip-masq` off), inside a network
//! namespace made for the test (root). The root namespace is never touched.

use std::sync::Arc;
use tweed_agent::rules::{Firewall, Iptables, Nftables, RuleSpec, NAT_CHAIN};
use tweed_testkit::{require_root, NetnsGuard};

fn spec(subnet: &str, ip_masq: bool) -> RuleSpec {
    RuleSpec {
        network: "10.244.0.0/16".parse().unwrap(),
        subnet: subnet.parse().unwrap(),
        ip_masq,
    }
}

fn nft(args: &[&str]) {
    tweed_testkit::run("nft", args);
}

#[test]
fn nft_sync_installs_is_idempotent_repairs_and_replaces() {
    require_root!("a network namespace for the rules");
    let ns = NetnsGuard::unique("twn-nft");
    let fw = Arc::new(Firewall::new(true));
    let s3 = spec("10.244.3.0/24", true);

    let f = fw.clone();
    let (first, second, listing) = ns.enter(move || {
        let first = f.sync(&s3).unwrap();
        let second = f.sync(&s3).unwrap();
        (first, second, Nftables::listing().unwrap().unwrap())
    });
    assert!(first, "first sync installs");
    assert!(!second, "second sync changes nothing");
    assert!(
        listing.contains("type nat hook postrouting priority srcnat")
            && listing.contains("ip saddr != 10.244.0.0/16 ip daddr 10.244.3.0/24 return")
            && listing.contains("masquerade fully-random")
            && listing.contains("type filter hook forward"),
        "{listing}"
    );

    // A fresh Firewall (an agent restart) finds the table current: nothing to do.
    let again = ns.enter(move || Firewall::new(true).sync(&s3).unwrap());
    assert!(!again, "a restarted agent leaves a correct table alone");

    // An operator deletes the table: the next sync restores it.
    let f = fw.clone();
    let (repaired, listing) = ns.enter(move || {
        nft(&["delete", "table", "ip", "tweed"]);
        assert!(Nftables::listing().unwrap().is_none());
        (f.sync(&s3).unwrap(), Nftables::listing().unwrap().unwrap())
    });
    assert!(repaired);
    assert!(listing.contains("10.244.3.0/24"), "{listing}");

    // One rule flushed by hand is noticed too.
    let f = fw.clone();
    let repaired = ns.enter(move || {
        nft(&["flush", "chain", "ip", "tweed", "forward"]);
        f.sync(&s3).unwrap()
    });
    assert!(repaired, "a flushed chain is restored");

    // The subnet changes: the table is replaced, the old subnet gone, nothing duplicated.
    let f = fw.clone();
    let (moved, listing) = ns.enter(move || {
        let s9 = spec("10.244.9.0/24", true);
        (f.sync(&s9).unwrap(), Nftables::listing().unwrap().unwrap())
    });
    assert!(moved);
    assert!(
        listing.contains("ip daddr 10.244.9.0/24") && !listing.contains("10.244.3.0/24"),
        "{listing}"
    );
    assert_eq!(listing.matches("chain postrouting").count(), 1, "{listing}");

    // --ip-masq off: only the forward chain remains.
    let f = fw.clone();
    let listing = ns.enter(move || {
        assert!(f.sync(&spec("10.244.9.0/24", false)).unwrap());
        assert!(!f.sync(&spec("10.244.9.0/24", false)).unwrap());
        Nftables::listing().unwrap().unwrap()
    });
    assert!(
        !listing.contains("postrouting") && listing.contains("chain forward"),
        "{listing}"
    );

    // Removal leaves no table behind.
    let removed = ns.enter(|| {
        (
            Nftables::remove().unwrap(),
            Nftables::remove().unwrap(),
            Nftables::listing().unwrap(),
        )
    });
    assert_eq!(removed, (true, false, None));
}

#[test]
fn iptables_firewall_follows_ip_masq() {
    require_root!("a network namespace for the rules");
    let ns = NetnsGuard::unique("twn-ipt");
    let fw = Arc::new(Firewall::new(false));
    let f = fw.clone();
    let (first, second, nat) = ns.enter(move || {
        let s = spec("10.244.3.0/24", true);
        (
            f.sync(&s).unwrap(),
            f.sync(&s).unwrap(),
            Iptables::listing("nat").unwrap(),
        )
    });
    assert!(first && !second);
    assert!(nat.contains(&format!("-N {NAT_CHAIN}")), "{nat}");

    // Turning --ip-masq off removes the nat chain and its jump; forward rules stay.
    let f = fw.clone();
    let (changed, again, nat, filter) = ns.enter(move || {
        let s = spec("10.244.3.0/24", false);
        (
            f.sync(&s).unwrap(),
            f.sync(&s).unwrap(),
            Iptables::listing("nat").unwrap(),
            Iptables::listing("filter").unwrap(),
        )
    });
    assert!(changed && !again);
    assert!(!nat.contains(NAT_CHAIN), "{nat}");
    assert!(
        filter.contains("-A FORWARD -m comment --comment tweed -j TWEED-FWD"),
        "{filter}"
    );
}
