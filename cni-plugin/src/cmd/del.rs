//! DEL: the attachment's devices (only those carrying its mark), its addresses and its
//! `ipMasq` rules go. Whatever is already gone (the namespace, the devices, the records) is
//! fine: DEL may come twice, or after the runtime removed the namespace.

use tweed_netlink::NetnsError;

use crate::attachment::Attachment;
use crate::conf::NetConf;
use crate::detach::Target;
use crate::env::CniEnv;
use crate::error::Error;
use crate::host::{container_place, Host, HostError, Kernel, HOST_PLACE};
use crate::ipam;
use crate::plan;

pub fn del<H: Host>(host: &H, env: &CniEnv, conf: &NetConf) -> Result<(), Error> {
    let owner = Attachment::new(&env.container_id, &env.ifname);
    let alias = plan::alias(&conf.name, &env.container_id, &env.ifname);
    let host_veth = plan::host_veth_name(&env.container_id, &env.ifname);
    // An empty CNI_NETNS, a vanished one, or a stale bind-mount file: nothing to do inside.
    let cns = if env.netns.is_empty() {
        None
    } else {
        match host.open_netns(&env.netns) {
            Ok(ns) => Some(ns),
            Err(e) if e.is_not_found() || matches!(e, NetnsError::NotNetns { .. }) => None,
            Err(e) => return Err(HostError::from(e).into()),
        }
    };
    let container_place = container_place(&env.netns);
    // Which devices are this attachment's. The runtime behind the real handles is gone when
    // this returns, before `delete_links` forks.
    let (in_container, on_host) = host.block_on(async {
        let mut in_container = None;
        if let Some(ns) = &cns {
            let ck = Kernel::open(host, Some(ns), &container_place)?;
            // Only the device this attachment made: an interface of that name set up by
            // anyone else stays.
            in_container = ck
                .link(&env.ifname)
                .await?
                .filter(|l| plan::owned_by(l, &alias))
                .map(|l| l.index);
        }
        let hk = Kernel::open(host, None, HOST_PLACE)?;
        let on_host = hk
            .link(&host_veth)
            .await?
            .filter(|l| plan::host_end_deletable(l, &alias))
            .map(|l| l.index);
        Ok::<_, HostError>((in_container, on_host))
    })??;
    // The container end first: deleting it takes the host end along, which is then only
    // checked.
    let mut targets = Vec::new();
    if let (Some(ifindex), Some(ns)) = (in_container, cns.as_ref()) {
        targets.push(Target {
            netns: Some(ns),
            ifindex,
            place: container_place.clone(),
        });
    }
    if let Some(ifindex) = on_host {
        targets.push(Target {
            netns: None,
            ifindex,
            place: HOST_PLACE.into(),
        });
    }
    host.delete_links(&targets, conf.detached_delete)?;
    // The rule goes before the record: if deleting it fails, a retried DEL still finds the
    // address by its record (the other way round the rule would outlive it, and masquerade
    // the next pod given the address).
    let held = {
        let store = host.lock_store(&conf.store_dir())?;
        ipam::held_by(&store, &owner)?
    };
    if conf.ip_masq {
        // By address and mark, not by subnet.env: the node may have lost its IPv4 half (or
        // changed network) since ADD, and the rule made then must still go. The masquerade
        // rule is IPv4's; an IPv6 address has none.
        for ip in held.iter().filter_map(|ip| match *ip {
            std::net::IpAddr::V4(v4) => Some(v4),
            std::net::IpAddr::V6(_) => None,
        }) {
            host.masq_del(ip, &alias)?;
        }
    }
    // Exactly what was read above, each only while still ours (`release_ip`), as GC does.
    let mut store = host.lock_store(&conf.store_dir())?;
    for ip in held {
        ipam::release_ip(&mut store, ip, &owner)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tweed_netlink::Op;

    use super::*;
    use crate::cmd::run;
    use crate::cmd::tests::{attached, conf, env, C1};
    use crate::host::fake::{link, names, veth, FakeHost};

    fn del(host: &FakeHost, id: &str, netns: &str, c: &NetConf) {
        assert_eq!(
            run(host, &env("DEL", id, netns), c).unwrap(),
            None,
            "DEL prints nothing"
        );
    }

    /// A masquerade rule DEL could not delete is not orphaned: the record stays, so the
    /// retried DEL finds the address and takes the rule, then the record.
    #[test]
    fn a_failed_rule_delete_keeps_the_record_for_the_retry() {
        let (host, _, c, _) = attached("c1", json!({"ipMasq": true}));
        assert_eq!(host.masq.borrow().len(), 1);
        host.masq_fails.set(true);
        assert!(run(&host, &env("DEL", "c1", C1), &c).is_err());
        assert_eq!(
            host.records().len(),
            1,
            "the record outlives the rule's failed delete"
        );
        assert_eq!(host.masq.borrow().len(), 1);
        host.masq_fails.set(false);
        del(&host, "c1", C1, &c);
        assert!(host.masq.borrow().is_empty());
        assert!(host.records().is_empty());
    }

    #[test]
    fn del_removes_the_container_end_first_then_the_record_and_the_rule() {
        let (host, ctr, c, _) = attached("c1", json!({"ipMasq": true}));
        let eth0 = link(&ctr, "eth0").index;
        let hv = link(&host.kernel, &plan::host_veth_name("c1", "eth0")).index;
        del(&host, "c1", C1, &c);
        assert_eq!(names(&ctr), ["lo"]);
        assert_eq!(names(&host.kernel), ["lo", "cni0"]);
        assert!(host.records().is_empty());
        assert!(host.masq.borrow().is_empty());
        // The container end first (the host end goes with it, and is then only checked).
        assert_eq!(
            *host.deleted.borrow(),
            [
                (format!("container netns {C1}"), eth0, true),
                ("the host namespace".into(), hv, true)
            ]
        );
        // Again: nothing left to find, still fine.
        del(&host, "c1", C1, &c);
        assert_eq!(host.deleted.borrow().len(), 2);
    }

    #[test]
    fn del_after_the_namespace_vanished_still_frees_everything() {
        let (host, _, c, _) = attached("c1", json!({}));
        host.remove_container(C1);
        del(&host, "c1", C1, &c);
        del(&host, "c1", C1, &c);
        assert!(host.records().is_empty());
        assert_eq!(names(&host.kernel), ["lo", "cni0"]);
        // Empty CNI_NETNS, nothing ever added.
        let mut e = env("DEL", "c9", C1);
        e.netns.clear();
        assert_eq!(run(&host, &e, &c).unwrap(), None);
    }

    #[test]
    fn an_unmarked_host_end_under_the_attachments_name_is_deleted() {
        // What a plugin killed between creating the pair and marking it leaves.
        let host = FakeHost::new();
        let hv = plan::host_veth_name("k1", "eth0");
        host.kernel.put_link(veth(30, &hv, None));
        del(&host, "k1", C1, &conf("1.0.0", json!({})));
        assert_eq!(
            *host.deleted.borrow(),
            [("the host namespace".to_string(), 30, true)]
        );
        assert_eq!(names(&host.kernel), ["lo"]);
    }

    #[test]
    fn del_leaves_what_is_not_this_attachments() {
        let (host, ctr, c, _) = attached("a", json!({}));
        // Another container ID naming the same namespace and interface.
        del(&host, "b", C1, &c);
        assert!(names(&ctr).contains(&"eth0".to_string()));
        assert_eq!(host.records().len(), 1);
        // A foreign eth0, and a host device under f's name marked for someone else.
        let f = host.add_container("/run/netns/f");
        f.add_link("eth0", 1500, None);
        let hv = plan::host_veth_name("f", "eth0");
        host.kernel
            .put_link(veth(50, &hv, Some("tweed/tnet/other/eth0")));
        del(&host, "f", "/run/netns/f", &c);
        assert!(names(&f).contains(&"eth0".to_string()));
        assert!(names(&host.kernel).contains(&hv));
        assert!(host.deleted.borrow().is_empty());
    }

    #[test]
    fn detached_delete_off_is_passed_on() {
        let (host, _, c, _) = attached("c1", json!({"detachedDelete": false}));
        del(&host, "c1", C1, &c);
        let d = host.deleted.borrow();
        assert!(
            !d.is_empty() && d.iter().all(|(_, _, detached)| !detached),
            "{d:?}"
        );
    }

    #[test]
    fn a_kernel_failure_is_reported_and_keeps_the_record() {
        let (host, ctr, c, _) = attached("c1", json!({}));
        ctr.fail_when(|op| matches!(op, Op::LinkDelIndex { .. }).then_some(libc::EBUSY));
        let e = run(&host, &env("DEL", "c1", C1), &c).unwrap_err();
        assert_eq!(e.code(), 100);
        assert!(
            e.to_string().contains("container netns /run/netns/c1"),
            "{e}"
        );
        // The address stays taken until a DEL succeeds: the device may still use it.
        assert_eq!(host.records().len(), 1);
    }
}
