//! The firewall sync against real nftables (and iptables for `--ip-masq` off), inside a network
//! namespace made for the test (root). The root namespace is never touched.

use std::sync::Arc;
use tweed_agent::rules::{
    Family, Firewall, Iptables, Nftables, RuleSpec, RuleSpecV6, FWD_CHAIN, NAT_CHAIN,
};
use tweed_testkit::{require_root, NetnsGuard};

fn spec(subnet: &str, ip_masq: bool) -> RuleSpec {
    RuleSpec {
        network: "10.244.0.0/16".parse().unwrap(),
        subnet: subnet.parse().unwrap(),
        ip_masq,
        ipv6: None,
    }
}

/// [`spec`] for a dual-stack lease: fd00:10:244::/56, our half `fd00:10:244:<n>::/64`.
fn dual(subnet: &str, v6_subnet: &str, ip_masq: bool) -> RuleSpec {
    RuleSpec {
        ipv6: Some(RuleSpecV6 {
            network: "fd00:10:244::/56".parse().unwrap(),
            subnet: v6_subnet.parse().unwrap(),
        }),
        ..spec(subnet, ip_masq)
    }
}

/// The IPv6 half with nftables: table `ip6 tweed` beside `ip tweed`, idempotent, repaired,
/// replaced when the IPv6 subnet changes; an IPv4-only spec leaves it alone.
#[test]
fn nft_ipv6_table_mirrors_the_ipv4_one() {
    require_root!("a network namespace for the rules");
    let ns = NetnsGuard::unique("twn-nft6");
    let fw = Arc::new(Firewall::new(true));
    let s = dual("10.244.3.0/24", "fd00:10:244:3::/64", true);
    let f = fw.clone();
    let (first, second, v4, v6) = ns.enter(move || {
        (
            f.sync(&s).unwrap(),
            f.sync(&s).unwrap(),
            Nftables::listing().unwrap().unwrap(),
            Nftables::listing_v6().unwrap().unwrap(),
        )
    });
    assert!(first && !second);
    assert!(v4.contains("ip daddr 10.244.3.0/24"), "{v4}");
    assert!(
        v6.contains("table ip6 tweed")
            && v6.contains("ip6 saddr != fd00:10:244::/56 ip6 daddr fd00:10:244:3::/64 return")
            && v6.contains(
                "ip6 saddr fd00:10:244::/56 ip6 daddr != ff00::/8 masquerade fully-random"
            )
            && v6.contains("ip6 daddr fd00:10:244::/56 accept"),
        "{v6}"
    );
    let f = fw.clone();
    let (repaired, moved, v6) = ns.enter(move || {
        nft(&["delete", "table", "ip6", "tweed"]);
        let repaired = f.sync(&s).unwrap();
        let moved = f
            .sync(&dual("10.244.3.0/24", "fd00:10:244:9::/64", true))
            .unwrap();
        (repaired, moved, Nftables::listing_v6().unwrap().unwrap())
    });
    assert!(repaired && moved);
    assert!(
        v6.contains("fd00:10:244:9::/64") && !v6.contains("fd00:10:244:3::/64"),
        "{v6}"
    );
    // IPv4 only from now on (the node lost its address): the IPv6 table is not touched.
    let f = fw.clone();
    let (changed, v6) = ns.enter(move || {
        (
            f.sync(&spec("10.244.3.0/24", true)).unwrap(),
            Nftables::listing_v6().unwrap(),
        )
    });
    assert!(!changed);
    assert!(v6.is_some());
}

/// The IPv6 half with ip6tables: the same chains and jumps as iptables, idempotent, repaired,
/// and the nat chain removed with --ip-masq off.
#[test]
fn ip6tables_chains_mirror_the_ipv4_ones() {
    require_root!("a network namespace for the rules");
    let ns = NetnsGuard::unique("twn-ip6t");
    let fw = Arc::new(Firewall::new(false));
    let f = fw.clone();
    let (first, second, nat, filter) = ns.enter(move || {
        let s = dual("10.244.3.0/24", "fd00:10:244:3::/64", true);
        (
            f.sync(&s).unwrap(),
            f.sync(&s).unwrap(),
            Iptables::listing_in(Family::V6, "nat").unwrap(),
            Iptables::listing_in(Family::V6, "filter").unwrap(),
        )
    });
    assert!(first && !second);
    for want in [
        "-A POSTROUTING -m comment --comment tweed -j TWEED-POSTRTG",
        "-A TWEED-POSTRTG ! -s fd00:10:244::/56 -d fd00:10:244:3::/64 -m comment --comment tweed -j RETURN",
        "-A TWEED-POSTRTG -s fd00:10:244::/56 ! -d ff00::/8 -m comment --comment tweed -j MASQUERADE --random-fully",
    ] {
        assert!(nat.lines().any(|l| l == want), "{want} missing in\n{nat}");
    }
    assert!(
        filter.contains("-A FORWARD -m comment --comment tweed -j TWEED-FWD")
            && filter
                .contains("-A TWEED-FWD -d fd00:10:244::/56 -m comment --comment tweed -j ACCEPT"),
        "{filter}"
    );
    // Someone flushes the IPv6 nat chain: restored; then --ip-masq off removes it.
    let f = fw.clone();
    let (repaired, off, nat, filter) = ns.enter(move || {
        tweed_testkit::run("ip6tables", &["-t", "nat", "-F", NAT_CHAIN]);
        let repaired = f
            .sync(&dual("10.244.3.0/24", "fd00:10:244:3::/64", true))
            .unwrap();
        let off = f
            .sync(&dual("10.244.3.0/24", "fd00:10:244:3::/64", false))
            .unwrap();
        (
            repaired,
            off,
            Iptables::listing_in(Family::V6, "nat").unwrap(),
            Iptables::listing_in(Family::V6, "filter").unwrap(),
        )
    });
    assert!(repaired && off);
    assert!(!nat.contains(NAT_CHAIN), "{nat}");
    assert!(filter.contains(&format!("-N {FWD_CHAIN}")), "{filter}");
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
