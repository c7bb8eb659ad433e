//! GC: everything of this network that no valid attachment holds goes: address records (empty
//! ones too), host veth ends and their `ipMasq` rules.

use tweed_netlink::Op;

use crate::conf::{ConfError, NetConf};
use crate::error::Error;
use crate::host::{Host, Kernel, HOST_PLACE};
use crate::ipam;
use crate::plan;

pub fn gc<H: Host>(host: &H, conf: &NetConf) -> Result<(), Error> {
    let valid = conf.valid_attachments.clone().ok_or(ConfError::Invalid {
        key: "cni.dev/valid-attachments",
        reason: "GC needs the list of valid attachments (it may be empty)".into(),
    })?;
    // The records go last: a rule or link GC fails to remove is found again, by its
    // record, on the next GC.
    let doomed = {
        let store = host.lock_store(&conf.store_dir())?;
        ipam::gc_plan(&ipam::records(&store)?, &valid)
    };
    host.block_on(async {
        let hk = Kernel::open(host, None, HOST_PLACE)?;
        let links = hk.nl.links().await.map_err(hk.fail("listing links"))?;
        let ops: Vec<Op> = plan::gc_links(&links, &conf.name, &valid)
            .into_iter()
            .map(|l| Op::LinkDelIndex { ifindex: l.index })
            .collect();
        hk.apply(&ops).await.1
    })??;
    if conf.ip_masq {
        // By address and mark, as DEL does: subnet.env may no longer name the IPv4 network
        // the rule was made with.
        for (ip, owner) in &doomed {
            // The masquerade rule is IPv4's; an IPv6 address has none.
            let (std::net::IpAddr::V4(ip), Some(o)) = (*ip, owner) else {
                continue;
            };
            host.masq_del(ip, &plan::alias(&conf.name, &o.container_id, &o.ifname))?;
        }
    }
    let mut store = host.lock_store(&conf.store_dir())?;
    ipam::release_planned(&mut store, &doomed)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tweed_netlink::Fake;

    use super::*;
    use crate::cmd::run;
    use crate::cmd::tests::{add, conf, env};
    use crate::host::fake::{names, veth, FakeHost};

    fn gc(host: &FakeHost, extra: serde_json::Value) -> Result<(), crate::error::Error> {
        run(host, &env("GC", "", ""), &conf("1.1.0", extra)).map(|out| assert_eq!(out, None))
    }

    #[test]
    fn gc_releases_what_is_not_in_the_valid_list() {
        let host = FakeHost::new();
        let c = conf("1.1.0", json!({"ipMasq": true}));
        let ctrs: Vec<Fake> = (0..3)
            .map(|i| {
                let path = format!("/run/netns/g{i}");
                let k = host.add_container(&path);
                add(&host, &format!("g{i}"), &path, &c);
                k
            })
            .collect();
        assert_eq!(host.records().len(), 3);
        gc(
            &host,
            json!({"ipMasq": true,
                   "cni.dev/valid-attachments": [{"containerID": "g0", "ifname": "eth0"}],
                   "cni.dev/attachments": [{"containerID": "g1", "ifname": "eth0"}]}),
        )
        .unwrap();
        assert_eq!(
            host.records().keys().collect::<Vec<_>>(),
            ["10.244.7.2", "10.244.7.3"]
        );
        assert_eq!(names(&ctrs[2]), ["lo"], "g2's pair is gone");
        assert_eq!(names(&ctrs[0]), ["lo", "eth0"]);
        assert_eq!(
            host.masq.borrow().iter().collect::<Vec<_>>(),
            [
                "10.244.7.2 10.244.0.0/16 tweed/tnet/g0/eth0",
                "10.244.7.3 10.244.0.0/16 tweed/tnet/g1/eth0"
            ]
        );
        // An empty list is a list: everything goes.
        gc(
            &host,
            json!({"ipMasq": true, "cni.dev/valid-attachments": []}),
        )
        .unwrap();
        assert!(host.records().is_empty());
        assert_eq!(names(&host.kernel), ["lo", "cni0"]);
        assert!(host.masq.borrow().is_empty());
    }

    /// A rule GC could not delete keeps its record, so the next GC finds it again.
    #[test]
    fn a_failed_rule_delete_keeps_the_record_for_the_next_gc() {
        let host = FakeHost::new();
        let c = conf("1.1.0", json!({"ipMasq": true}));
        host.add_container("/run/netns/g0");
        add(&host, "g0", "/run/netns/g0", &c);
        let none = json!({"ipMasq": true, "cni.dev/valid-attachments": []});
        host.masq_fails.set(true);
        assert!(gc(&host, none.clone()).is_err());
        assert_eq!(host.records().len(), 1);
        assert_eq!(host.masq.borrow().len(), 1);
        host.masq_fails.set(false);
        gc(&host, none).unwrap();
        assert!(host.records().is_empty());
        assert!(host.masq.borrow().is_empty());
    }

    #[test]
    fn gc_needs_the_list() {
        let host = FakeHost::new();
        let e = gc(&host, json!({})).unwrap_err();
        assert_eq!(e.code(), 7);
        assert!(e.to_string().contains("valid attachments"), "{e}");
    }

    #[test]
    fn gc_clears_what_a_killed_add_left_and_only_that() {
        let host = FakeHost::new();
        // Killed with the lock held: a record, maybe not even written.
        host.store
            .borrow_mut()
            .files
            .insert("10.244.7.5".into(), b"k0\r\neth0".to_vec());
        host.store
            .borrow_mut()
            .files
            .insert("10.244.7.6".into(), Vec::new());
        // Killed after the host side: its marked end, and an unmarked one (killed before the
        // mark); another network's device, and a live container's.
        for (index, id, network) in [
            (20, "k1", Some("tnet")),
            (21, "k2", None),
            (22, "x", Some("othernet")),
        ] {
            let alias = network.map(|n| plan::alias(n, id, "eth0"));
            let name = plan::host_veth_name(id, "eth0");
            host.kernel.put_link(veth(index, &name, alias.as_deref()));
        }
        let live = "/run/netns/live";
        host.add_container(live);
        add(&host, "live", live, &conf("1.1.0", json!({})));
        gc(
            &host,
            json!({"cni.dev/valid-attachments": [{"containerID": "live", "ifname": "eth0"}]}),
        )
        .unwrap();
        assert_eq!(host.records().keys().collect::<Vec<_>>(), ["10.244.7.2"]);
        let left = names(&host.kernel);
        assert!(
            left.contains(&plan::host_veth_name("live", "eth0")),
            "{left:?}"
        );
        assert!(
            left.contains(&plan::host_veth_name("x", "eth0")),
            "{left:?}"
        );
        assert!(
            !left.contains(&plan::host_veth_name("k1", "eth0")),
            "{left:?}"
        );
        assert!(
            !left.contains(&plan::host_veth_name("k2", "eth0")),
            "{left:?}"
        );
    }
}
