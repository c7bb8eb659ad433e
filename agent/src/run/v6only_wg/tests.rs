use super::*;
use crate::netlink::{Link, Route6};

fn net() -> Ipv6Network {
    "fd00:10:244::/56".parse().unwrap()
}

fn link(index: u32, name: &str, kind: &str) -> Link {
    Link {
        index,
        name: name.to_string(),
        kind: Some(kind.to_string()),
        ..Link::default()
    }
}

#[test]
fn dual_stacks_tweed_wg_v6_is_a_leftover_beside_vxlans_device_and_our_own_device_is_not() {
    let links = [
        link(1, "eth0", "veth"),
        link(2, "tweed-wg", "tun"),
        link(3, "tweed-wg-v6", "wireguard"),
        link(4, "tweed-v6.9", "vxlan"),
    ];
    let ops = leftovers(net(), &links, &[]);
    let names: Vec<String> = ops
        .iter()
        .map(|op| match op {
            Op::LinkDel { name } => name.clone(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(names, vec!["tweed-v6.9", "tweed-wg-v6"]);
    // Nothing left: nothing to remove.
    assert!(leftovers(net(), &links[..2], &[] as &[Route6]).is_empty());
}

#[tokio::test]
async fn a_leftover_that_cannot_be_removed_is_logged_and_the_others_are_still_removed() {
    let ops = vec![
        Op::LinkDel {
            name: "tweed-v6.9".into(),
        },
        Op::LinkDel {
            name: "tweed-wg-v6".into(),
        },
    ];
    let tried = std::sync::Mutex::new(Vec::new());
    let done = remove_each(ops, |op| {
        let first = tried.lock().unwrap().is_empty();
        tried.lock().unwrap().push(op.to_string());
        async move {
            if first {
                Err("EBUSY")
            } else {
                Ok(())
            }
        }
    })
    .await;
    assert_eq!(done, 1);
    let tried = tried.into_inner().unwrap();
    assert_eq!(tried.len(), 2, "stopped at the first failure: {tried:?}");
    assert!(tried[1].contains("tweed-wg-v6"), "{tried:?}");
}
