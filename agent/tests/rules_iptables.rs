//! The rule sync against real iptables, inside a network namespace made for the test (root).

use tweed_agent::rules::{forward_chain, masquerade_chain, Iptables};
use tweed_testkit::{require_root, NetnsGuard};

#[test]
fn sync_installs_is_idempotent_repairs_and_replaces() {
    require_root!("a network namespace for the rules");
    let ns = NetnsGuard::unique("twr");
    let net = "10.244.0.0/16".parse().unwrap();
    let chains = vec![
        masquerade_chain(net, "10.244.3.0/24".parse().unwrap()),
        forward_chain(net),
    ];
    let c2 = chains.clone();
    let (first, second, listing) = ns.enter(move || {
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
    let repaired = ns.enter(move || {
        for argv in tweed_testkit::sabotage::DELETE_MASQUERADE_CHAIN {
            tweed_testkit::run(argv[0], &argv[1..]);
        }
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
    let listing = ns.enter(move || {
        Iptables::sync(&moved).unwrap();
        Iptables::listing("nat").unwrap()
    });
    assert!(
        listing.contains("-d 10.244.9.0/24") && !listing.contains("-d 10.244.3.0/24"),
        "{listing}"
    );
    assert_eq!(listing.matches("-j TWEED-POSTRTG").count(), 1, "{listing}");
}
