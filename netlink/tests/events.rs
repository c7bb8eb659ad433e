//! Root only: rtnetlink notifications from a namespace this test creates (deleted on drop). The
//! subscription is opened inside it, so nothing of the root namespace is seen or touched.

use std::time::Duration;

use tweed_netlink::{Change, Event, Events, Netns};
use tweed_testkit::{require_root, run, NetnsGuard};

/// `ip ARGS`, or `bridge ARGS` when they start with `bridge`, inside `ns`; panics naming the
/// command when it fails.
fn ip(ns: &NetnsGuard, args: &str) {
    let (prog, rest) = match args.strip_prefix("bridge ") {
        Some(rest) => ("bridge", rest),
        None => ("ip", args),
    };
    let mut argv = vec!["-n", ns.name()];
    argv.extend(rest.split_whitespace());
    run(prog, &argv);
}

/// Reads events until `want` matches one, failing after 5 s.
async fn wait_for(ev: &mut Events, what: &str, want: impl Fn(&Event) -> bool) -> Event {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let e = tokio::time::timeout_at(deadline, ev.next())
            .await
            .unwrap_or_else(|_| panic!("no {what} event within 5 s"))
            .expect("subscription open")
            .expect("readable");
        if want(&e) {
            return e;
        }
    }
}

#[test]
fn link_route_neighbour_and_fdb_changes_are_announced() {
    require_root!("network namespaces");
    let ns = NetnsGuard::unique("twev");
    let netns = Netns::open(ns.path()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut ev = Events::real_in(&netns).unwrap();
        ip(&ns, "link add d0 type veth peer name d1");
        let Event::Link(Change::New, l) =
            wait_for(&mut ev, "new link", |e| matches!(e, Event::Link(_, l) if l.name == "d0")).await
        else {
            unreachable!()
        };
        assert!(!l.up);
        ip(&ns, "link set d1 up");
        ip(&ns, "link set d0 up");
        wait_for(&mut ev, "link up", |e| matches!(e, Event::Link(Change::New, l) if l.name == "d0" && l.up)).await;
        ip(&ns, "addr add 192.0.2.1/24 dev d0");
        wait_for(&mut ev, "address", |e| matches!(e, Event::Addr(Change::New, a) if a.net.to_string() == "192.0.2.1/24")).await;
        ip(&ns, "route add 10.244.9.0/24 via 192.0.2.9 dev d0");
        wait_for(&mut ev, "route", |e| matches!(e, Event::Route(Change::New, r) if r.dst.to_string() == "10.244.9.0/24")).await;
        ip(&ns, "route del 10.244.9.0/24");
        wait_for(&mut ev, "route del", |e| matches!(e, Event::Route(Change::Del, r) if r.dst.to_string() == "10.244.9.0/24")).await;
        ip(&ns, "neigh replace 192.0.2.7 lladdr 02:00:00:00:00:07 dev d0 nud permanent");
        wait_for(&mut ev, "neighbour", |e| matches!(e, Event::Neigh(Change::New, n) if n.ip.to_string() == "192.0.2.7" && n.permanent)).await;
        ip(&ns, "neigh del 192.0.2.7 dev d0");
        wait_for(&mut ev, "neighbour del", |e| matches!(e, Event::Neigh(Change::Del, n) if n.ip.to_string() == "192.0.2.7")).await;
        ip(&ns, "link add vx0 type vxlan id 5 dstport 4789 local 192.0.2.1 dev d0 nolearning");
        ip(&ns, "bridge fdb append 02:00:00:00:00:08 dst 192.0.2.8 dev vx0 self permanent");
        wait_for(&mut ev, "fdb", |e| matches!(e, Event::Fdb(Change::New, f) if f.mac.to_string() == "02:00:00:00:00:08")).await;
        ip(&ns, "bridge fdb del 02:00:00:00:00:08 dev vx0 self");
        wait_for(&mut ev, "fdb del", |e| matches!(e, Event::Fdb(Change::Del, f) if f.mac.to_string() == "02:00:00:00:00:08")).await;
        // The IPv6 twins, with their content (the IPv6 data plane repairs from them).
        ip(&ns, "-6 addr add 2001:db8::1/64 dev d0 nodad");
        wait_for(&mut ev, "address6", |e| matches!(e, Event::Addr6(Change::New, a) if a.net.to_string() == "2001:db8::1/64" && !a.tentative)).await;
        ip(&ns, "-6 addr add 2001:db8:1::1/128 dev d0 nodad");
        ip(&ns, "-6 addr del 2001:db8:1::1/128 dev d0");
        wait_for(&mut ev, "address6 del", |e| matches!(e, Event::Addr6(Change::Del, a) if a.net.to_string() == "2001:db8:1::1/128")).await;
        ip(&ns, "-6 route add fd00:10:244:9::/64 via 2001:db8::9 dev d0");
        wait_for(&mut ev, "route6", |e| matches!(e, Event::Route6(Change::New, r) if r.dst.to_string() == "fd00:10:244:9::/64" && r.gateway.map(|g| g.to_string()).as_deref() == Some("2001:db8::9"))).await;
        ip(&ns, "-6 route del fd00:10:244:9::/64");
        wait_for(&mut ev, "route6 del", |e| matches!(e, Event::Route6(Change::Del, r) if r.dst.to_string() == "fd00:10:244:9::/64")).await;
        ip(&ns, "-6 neigh replace 2001:db8::7 lladdr 02:00:00:00:00:17 dev d0 nud permanent");
        wait_for(&mut ev, "neighbour6", |e| matches!(e, Event::Neigh6(Change::New, n) if n.ip.to_string() == "2001:db8::7" && n.permanent)).await;
        ip(&ns, "-6 neigh del 2001:db8::7 dev d0");
        wait_for(&mut ev, "neighbour6 del", |e| matches!(e, Event::Neigh6(Change::Del, n) if n.ip.to_string() == "2001:db8::7")).await;
        ip(&ns, "link set d0 mtu 1400");
        wait_for(&mut ev, "mtu", |e| matches!(e, Event::Link(Change::New, l) if l.name == "d0" && l.mtu == 1400)).await;
        ip(&ns, "link del vx0");
        wait_for(&mut ev, "link del", |e| matches!(e, Event::Link(Change::Del, l) if l.name == "vx0")).await;
    });
}
