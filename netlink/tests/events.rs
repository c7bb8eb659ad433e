//! Root only: rtnetlink notifications from a namespace this test creates (deleted on drop). The
//! subscription is opened inside it, so nothing of the root namespace is seen or touched.

use std::process::{Command, Stdio};
use std::time::Duration;

use tweed_netlink::{Change, Event, Events, Netns};

struct Ns(String);

impl Ns {
    fn new(tag: &str) -> Ns {
        let name = format!("twev{}{tag}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        assert!(Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success());
        Ns(name)
    }
    /// `ip ARGS`, or `bridge ARGS` when they start with `bridge`, inside the namespace.
    fn ip(&self, args: &str) {
        let (prog, rest) = match args.strip_prefix("bridge ") {
            Some(rest) => ("bridge", rest),
            None => ("ip", args),
        };
        let st = Command::new(prog)
            .args(["-n", &self.0])
            .args(rest.split_whitespace())
            .status()
            .unwrap();
        assert!(st.success(), "ip -n {} {args}", self.0);
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
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
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    let ns = Ns::new("a");
    let netns = Netns::open(format!("/run/netns/{}", ns.0)).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut ev = Events::real_in(&netns).unwrap();
        ns.ip("link add d0 type veth peer name d1");
        let Event::Link(Change::New, l) =
            wait_for(&mut ev, "new link", |e| matches!(e, Event::Link(_, l) if l.name == "d0")).await
        else {
            unreachable!()
        };
        assert!(!l.up);
        ns.ip("link set d1 up");
        ns.ip("link set d0 up");
        wait_for(&mut ev, "link up", |e| matches!(e, Event::Link(Change::New, l) if l.name == "d0" && l.up)).await;
        ns.ip("addr add 192.0.2.1/24 dev d0");
        wait_for(&mut ev, "address", |e| matches!(e, Event::Addr(Change::New, a) if a.net.to_string() == "192.0.2.1/24")).await;
        ns.ip("route add 10.244.9.0/24 via 192.0.2.9 dev d0");
        wait_for(&mut ev, "route", |e| matches!(e, Event::Route(Change::New, r) if r.dst.to_string() == "10.244.9.0/24")).await;
        ns.ip("route del 10.244.9.0/24");
        wait_for(&mut ev, "route del", |e| matches!(e, Event::Route(Change::Del, r) if r.dst.to_string() == "10.244.9.0/24")).await;
        ns.ip("neigh replace 192.0.2.7 lladdr 02:00:00:00:00:07 dev d0 nud permanent");
        wait_for(&mut ev, "neighbour", |e| matches!(e, Event::Neigh(Change::New, n) if n.ip.to_string() == "192.0.2.7" && n.permanent)).await;
        ns.ip("neigh del 192.0.2.7 dev d0");
        wait_for(&mut ev, "neighbour del", |e| matches!(e, Event::Neigh(Change::Del, n) if n.ip.to_string() == "192.0.2.7")).await;
        ns.ip("link add vx0 type vxlan id 5 dstport 4789 local 192.0.2.1 dev d0 nolearning");
        ns.ip("bridge fdb append 02:00:00:00:00:08 dst 192.0.2.8 dev vx0 self permanent");
        wait_for(&mut ev, "fdb", |e| matches!(e, Event::Fdb(Change::New, f) if f.mac.to_string() == "02:00:00:00:00:08")).await;
        ns.ip("bridge fdb del 02:00:00:00:00:08 dev vx0 self");
        wait_for(&mut ev, "fdb del", |e| matches!(e, Event::Fdb(Change::Del, f) if f.mac.to_string() == "02:00:00:00:00:08")).await;
        ns.ip("link set d0 mtu 1400");
        wait_for(&mut ev, "mtu", |e| matches!(e, Event::Link(Change::New, l) if l.name == "d0" && l.mtu == 1400)).await;
        ns.ip("link del vx0");
        wait_for(&mut ev, "link del", |e| matches!(e, Event::Link(Change::Del, l) if l.name == "vx0")).await;
    });
}
