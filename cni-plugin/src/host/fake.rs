//! A whole node in memory for the command layer's tests: one fake kernel for the plugin's
//! namespace and one per container namespace (veth peers cross between them as in the kernel),
//! an in-memory IPAM store, subnet.env as text, the `ipMasq` rules as a set. Every part can be
//! inspected afterwards and made to fail.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use ipnetwork::Ipv4Network;
use tweed_config::subnet_env::SubnetEnvError;
use tweed_config::SubnetEnv;
use tweed_netlink::{Fake, Link, Netlink, NetlinkError, NetnsError, Op};

use super::{Host, HostError};
use crate::detach::{DetachError, Target};
use crate::ipam::{Dir, IpamError, MemDir};
use crate::masq::MasqError;
use crate::node::{self, NodeError};

/// What `subnetFile` names in the tests' configurations.
pub const SUBNET_FILE: &str = "/fake/subnet.env";
const OWN_FD: i32 = 100;

/// A container namespace: a path, the fd number a veth's `peer_netns` names it by, its kernel.
#[derive(Debug, Clone)]
pub struct FakeNs {
    pub path: String,
    pub fd: i32,
    pub kernel: Fake,
}

#[derive(Debug)]
pub struct FakeHost {
    /// The plugin's own (the host's) namespace.
    pub kernel: Fake,
    /// subnet.env's text; `None`: the file is missing.
    pub subnet_env: RefCell<Option<String>>,
    pub store: Rc<RefCell<MemDir>>,
    netns: RefCell<BTreeMap<String, FakeNs>>,
    /// The `ipMasq` rules, as `ip network comment`.
    pub masq: RefCell<BTreeSet<String>>,
    pub masq_fails: Cell<bool>,
    pub forwarding: Cell<bool>,
    /// Every device `delete_links` was given: (place, ifindex, detached).
    pub deleted: RefCell<Vec<(String, u32, bool)>>,
}

impl FakeHost {
    /// A node whose subnet.env gives it 10.244.7.0/24 of 10.244.0.0/16, MTU 1450.
    pub fn new() -> FakeHost {
        let kernel = Fake::new();
        let own = FakeNs {
            path: "/proc/self/ns/net".into(),
            fd: OWN_FD,
            kernel: kernel.clone(),
        };
        FakeHost {
            kernel,
            subnet_env: RefCell::new(Some(
                "TWEED_NETWORK=10.244.0.0/16\nTWEED_SUBNET=10.244.7.1/24\nTWEED_MTU=1450\n\
                 TWEED_IPMASQ=true\n"
                    .into(),
            )),
            store: Rc::default(),
            netns: RefCell::new([(own.path.clone(), own)].into()),
            masq: RefCell::default(),
            masq_fails: Cell::new(false),
            forwarding: Cell::new(false),
            deleted: RefCell::default(),
        }
    }

    /// A container namespace at `path`, with only `lo`.
    pub fn add_container(&self, path: &str) -> Fake {
        let mut all = self.netns.borrow_mut();
        let fd = OWN_FD + all.len() as i32;
        let kernel = Fake::new();
        self.kernel.add_netns(fd, &kernel);
        let ns = FakeNs {
            path: path.into(),
            fd,
            kernel: kernel.clone(),
        };
        all.insert(path.into(), ns);
        kernel
    }

    /// The runtime removed the namespace: its devices go, and the veth peers with them.
    pub fn remove_container(&self, path: &str) {
        let ns = self
            .netns
            .borrow_mut()
            .remove(path)
            .expect("known namespace");
        let nl = Netlink::from(ns.kernel.clone());
        block_on(async {
            for l in nl.links().await.unwrap() {
                nl.apply(&Op::LinkDelIndex { ifindex: l.index })
                    .await
                    .unwrap();
            }
        });
    }

    /// Address records in the store: `ip` -> record text.
    pub fn records(&self) -> BTreeMap<String, String> {
        self.store
            .borrow()
            .files
            .iter()
            .filter(|(k, _)| k.parse::<std::net::IpAddr>().is_ok())
            .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned()))
            .collect()
    }
}

pub fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// A veth device as [`Fake::put_link`] takes it: what a test finds left on a node.
pub fn veth(index: u32, name: &str, alias: Option<&str>) -> Link {
    Link {
        index,
        name: name.into(),
        mtu: 1450,
        mac: None,
        kind: Some("veth".into()),
        up: true,
        vxlan: None,
        master: None,
        alias: alias.map(str::to_string),
    }
}

/// The links of a fake namespace.
pub fn links(k: &Fake) -> Vec<Link> {
    block_on(Netlink::from(k.clone()).links()).expect("a fake answers")
}

pub fn names(k: &Fake) -> Vec<String> {
    links(k).into_iter().map(|l| l.name).collect()
}

/// The link `name`, which must exist.
pub fn link(k: &Fake, name: &str) -> Link {
    links(k)
        .into_iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| panic!("no {name} in {:?}", names(k)))
}

/// The addresses on `l`, as text.
pub fn addrs(k: &Fake, l: &Link) -> Vec<String> {
    let nl = Netlink::from(k.clone());
    block_on(nl.addresses(Some(l.index)))
        .expect("a fake answers")
        .iter()
        .map(|a| a.net.to_string())
        .collect()
}

/// The routes through `l`, as `dst via gateway`.
pub fn routes(k: &Fake, l: &Link) -> Vec<String> {
    let nl = Netlink::from(k.clone());
    block_on(nl.routes(l.index))
        .expect("a fake answers")
        .iter()
        .map(|r| match r.gateway {
            Some(gw) => format!("{} via {gw}", r.dst),
            None => r.dst.to_string(),
        })
        .collect()
}

/// The IPv6 addresses on `l`, as text, `(tentative)` marked.
pub fn addrs6(k: &Fake, l: &Link) -> Vec<String> {
    let nl = Netlink::from(k.clone());
    block_on(nl.addresses6(Some(l.index)))
        .expect("a fake answers")
        .iter()
        .map(|a| {
            let t = if a.tentative { " (tentative)" } else { "" };
            format!("{}{t}", a.net)
        })
        .collect()
}

/// The IPv6 routes through `l`, as `dst via gateway`.
pub fn routes6(k: &Fake, l: &Link) -> Vec<String> {
    let nl = Netlink::from(k.clone());
    block_on(nl.all_routes6())
        .expect("a fake answers")
        .iter()
        .filter(|r| r.oif == Some(l.index))
        .map(|r| match r.gateway {
            Some(gw) => format!("{} via {gw}", r.dst),
            None => r.dst.to_string(),
        })
        .collect()
}

/// subnet.env of a dual-stack node (the IPv4 half is [`FakeHost::new`]'s).
pub const DUAL_SUBNET_ENV: &str = "TWEED_NETWORK=10.244.0.0/16\nTWEED_SUBNET=10.244.7.1/24\n\
    TWEED_IPV6_NETWORK=fd00:10:244::/56\nTWEED_IPV6_SUBNET=fd00:10:244:7::1/64\nTWEED_MTU=1450\n";

/// subnet.env of an IPv6-only node, as flannel writes it with EnableIPv4 false.
pub const V6_ONLY_SUBNET_ENV: &str = "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\n\
    FLANNEL_IPV6_SUBNET=fd00:10:244:7::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n";

/// The locked store: a handle on the host's one in-memory directory.
pub struct FakeStore(Rc<RefCell<MemDir>>);

impl Dir for FakeStore {
    fn create_new(&mut self, name: &str, content: &[u8]) -> io::Result<bool> {
        self.0.borrow_mut().create_new(name, content)
    }
    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        self.0.borrow().read(name)
    }
    fn write(&mut self, name: &str, content: &[u8]) -> io::Result<()> {
        self.0.borrow_mut().write(name, content)
    }
    fn remove(&mut self, name: &str) -> io::Result<bool> {
        self.0.borrow_mut().remove(name)
    }
    fn list(&self) -> io::Result<Vec<String>> {
        self.0.borrow().list()
    }
    fn location(&self) -> PathBuf {
        self.0.borrow().location()
    }
}

impl Host for FakeHost {
    type Netns = FakeNs;
    type Store = FakeStore;

    fn read_subnet_env(&self, configured: Option<&Path>) -> Result<SubnetEnv, NodeError> {
        let path = node::subnet_file(configured, |p| p == Path::new(SUBNET_FILE));
        let text = self
            .subnet_env
            .borrow()
            .clone()
            .filter(|_| path == Path::new(SUBNET_FILE));
        let res = match text {
            Some(t) => SubnetEnv::parse(&path, &t),
            None => Err(SubnetEnvError::Io {
                path: path.clone(),
                source: io::ErrorKind::NotFound.into(),
            }),
        };
        res.map_err(|e| node::subnet_env_error(&path, e))
    }

    fn lock_store(&self, _path: &Path) -> Result<FakeStore, IpamError> {
        Ok(FakeStore(self.store.clone()))
    }

    fn open_netns(&self, path: &str) -> Result<FakeNs, NetnsError> {
        self.netns
            .borrow()
            .get(path)
            .cloned()
            .ok_or_else(|| NetnsError::Open {
                path: path.into(),
                source: io::ErrorKind::NotFound.into(),
            })
    }

    fn is_own_netns(&self, ns: &FakeNs) -> Result<bool, NetnsError> {
        Ok(ns.fd == OWN_FD)
    }

    fn netns_fd(&self, ns: &FakeNs) -> i32 {
        ns.fd
    }

    fn block_on<F: Future>(&self, f: F) -> Result<F::Output, HostError> {
        Ok(block_on(f))
    }

    fn netlink(&self, ns: Option<&FakeNs>) -> Result<Netlink, NetlinkError> {
        Ok(Netlink::from(
            ns.map_or(&self.kernel, |n| &n.kernel).clone(),
        ))
    }

    fn masq_add(&self, ip: Ipv4Addr, network: Ipv4Network, comment: &str) -> Result<(), MasqError> {
        if self.masq_fails.get() {
            return Err(MasqError::Spawn(io::ErrorKind::NotFound.into()));
        }
        self.masq
            .borrow_mut()
            .insert(format!("{ip} {network} {comment}"));
        Ok(())
    }

    fn masq_del(&self, ip: Ipv4Addr, comment: &str) -> Result<(), MasqError> {
        if self.masq_fails.get() {
            return Err(MasqError::Spawn(io::ErrorKind::NotFound.into()));
        }
        self.masq.borrow_mut().retain(|r| {
            let mut w = r.split(' ');
            !(w.next() == Some(&ip.to_string()) && w.nth(1) == Some(comment))
        });
        Ok(())
    }

    fn enable_forwarding(&self) {
        self.forwarding.set(true);
    }

    fn delete_links(
        &self,
        targets: &[Target<'_, FakeNs>],
        detached: bool,
    ) -> Result<(), DetachError> {
        for t in targets {
            self.deleted
                .borrow_mut()
                .push((t.place.clone(), t.ifindex, detached));
            let nl = Netlink::from(t.netns.map_or(&self.kernel, |n| &n.kernel).clone());
            block_on(nl.apply(&Op::LinkDelIndex { ifindex: t.ifindex })).map_err(|e| {
                DetachError {
                    what: format!("link del #{}", t.ifindex),
                    place: t.place.clone(),
                    reason: e.to_string(),
                }
            })?;
        }
        Ok(())
    }
}
