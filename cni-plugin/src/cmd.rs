//! The verbs. Each reads the parsed configuration and environment, does its work through
//! tweed-netlink (one socket per namespace, batched ops) and the IPAM store, and returns what
//! goes to stdout.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use ipnetwork::{IpNetwork, Ipv4Network};
use serde_json::{Map, Value};
use tweed_config::subnet_env::SubnetEnvError;
use tweed_config::SubnetEnv;
use tweed_netlink::{Link, MacAddr, Netlink, NetlinkError, Netns, NetnsError, Op};

use crate::conf::{ConfError, NetConf};
use crate::detach;
use crate::env::{CniEnv, Command};
use crate::error::Error;
use crate::ipam::{self, FsDir, Owner, Pool};
use crate::masq;
use crate::plan::{self, Attach, BridgeWant};
use crate::result::{CniResult, Interface, IpConfig, RouteOut};
use crate::version::Version;

/// What a successful verb prints (nothing for DEL, GC, STATUS).
pub type Output = Option<String>;

pub fn run(env: &CniEnv, conf: &NetConf) -> Result<Output, Error> {
    match env.command {
        Command::Add => add(env, conf).map(Some),
        Command::Del => del(env, conf).map(|()| None),
        Command::Check => {
            need_version(conf, "CHECK", Version::V0_4_0, "0.4.0")?;
            check(env, conf).map(|()| None)
        }
        Command::Gc => {
            need_version(conf, "GC", Version::V1_1_0, "1.1.0")?;
            gc(conf).map(|()| None)
        }
        Command::Status => {
            need_version(conf, "STATUS", Version::V1_1_0, "1.1.0")?;
            status(conf).map(|()| None)
        }
        Command::Version => Ok(Some(crate::version::version_doc(&conf.cni_version))),
    }
}

fn need_version(
    conf: &NetConf,
    verb: &'static str,
    min: Version,
    need: &'static str,
) -> Result<(), Error> {
    if conf.version() < min {
        return Err(Error::VerbNeedsVersion {
            verb,
            need,
            have: conf.cni_version.clone(),
        });
    }
    Ok(())
}

/// subnet.env, with "missing" told apart from "broken".
pub fn read_subnet_env(path: &Path) -> Result<SubnetEnv, Error> {
    SubnetEnv::read(path).map_err(|e| match e {
        SubnetEnvError::Io { path, source } if source.kind() == std::io::ErrorKind::NotFound => {
            Error::NotReady {
                path,
                reason: source.to_string(),
            }
        }
        other => Error::SubnetEnv {
            path: path.to_path_buf(),
            reason: other.to_string(),
        },
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(Error::Runtime)
}

fn kernel(what: impl Into<String>) -> impl FnOnce(NetlinkError) -> Error {
    let what = what.into();
    move |e| Error::Kernel {
        what,
        reason: e.to_string(),
    }
}

fn netns_err(e: NetnsError) -> Error {
    let (path, reason) = match &e {
        NetnsError::Open { path, source } => (path.clone(), source.to_string()),
        NetnsError::NotNetns { path, detail } => {
            (path.clone(), format!("not a network namespace ({detail})"))
        }
        NetnsError::Enter { path, source } | NetnsError::Thread { path, source } => {
            (path.clone(), source.to_string())
        }
        NetnsError::Panicked { path } => (path.clone(), e.to_string()),
    };
    Error::Netns { path, reason }
}

/// Applies `ops` in one batch; the first failure becomes an error naming `place`. Returns the
/// per-op results too, so a caller knows what did happen.
async fn apply(nl: &Netlink, ops: &[Op], place: &str) -> (Vec<bool>, Result<(), Error>) {
    let results = nl.apply_all(ops).await;
    let done = results.iter().map(Result::is_ok).collect();
    let first = ops
        .iter()
        .zip(results)
        .find_map(|(op, r)| r.err().map(|e| (op, e)));
    let res = match first {
        None => Ok(()),
        Some((op, e)) => Err(Error::Kernel {
            what: format!("{op} in {place}"),
            reason: match e {
                NetlinkError::Op { source, .. } => explain(op, &source),
                other => other.to_string(),
            },
        }),
    };
    (done, res)
}

/// The kernel's errno, plus what it usually means for that op.
fn explain(op: &Op, e: &std::io::Error) -> String {
    match (op, e.raw_os_error()) {
        (Op::LinkAddVeth(v), Some(libc::EEXIST)) => format!(
            "{e}: {} already exists in the container's namespace, or {} on the host (was this \
             attachment added twice without DEL?)",
            v.peer, v.name
        ),
        _ => e.to_string(),
    }
}

/// The address the runtime asks for: runtimeConfig `ips` (the `ips` capability) first, then
/// `CNI_ARGS` `IP=`. IPv6 entries are ignored: the node subnet is IPv4.
fn requested_ip(env: &CniEnv, conf: &NetConf) -> Result<Option<Ipv4Addr>, Error> {
    for s in &conf.runtime_config.ips {
        let ip = s
            .parse::<IpNetwork>()
            .map(|n| n.ip())
            .or_else(|_| s.parse::<IpAddr>())
            .map_err(|_| ConfError::Invalid {
                key: "runtimeConfig",
                reason: format!("ips: {s:?} is not an IP address"),
            })?;
        if let IpAddr::V4(v4) = ip {
            return Ok(Some(v4));
        }
    }
    Ok(env.args.ip)
}

struct Node {
    env: SubnetEnv,
    mtu: u32,
    gateway: Ipv4Network,
}

impl Node {
    fn read(conf: &NetConf) -> Result<Node, Error> {
        let env = read_subnet_env(&conf.subnet_file_path())?;
        let mtu = conf.mtu.unwrap_or(env.mtu);
        let gateway = env.subnet;
        Ok(Node { env, mtu, gateway })
    }

    fn pool(&self, conf: &NetConf) -> Result<Pool, Error> {
        Ok(Pool::new(
            self.env.node_subnet(),
            self.gateway.ip(),
            conf.range_start,
            conf.range_end,
        )?)
    }

    fn bridge(&self, conf: &NetConf) -> BridgeWant {
        BridgeWant::new(&conf.bridge, self.mtu, self.gateway)
    }
}

/// Fault injection for the rollback tests; compiled into debug builds only.
fn test_hook(point: &str) -> Result<(), Error> {
    if !cfg!(debug_assertions) {
        return Ok(());
    }
    if std::env::var("TWEED_CNI_TEST_PAUSE").as_deref() == Ok(point) {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
    if std::env::var("TWEED_CNI_TEST_FAIL").as_deref() == Ok(point) {
        return Err(Error::Kernel {
            what: format!("test hook {point}"),
            reason: "failure injected by TWEED_CNI_TEST_FAIL".into(),
        });
    }
    Ok(())
}

fn add(env: &CniEnv, conf: &NetConf) -> Result<String, Error> {
    let node = Node::read(conf)?;
    let pool = node.pool(conf)?;
    let requested = requested_ip(env, conf)?;
    let container_mac = match &conf.runtime_config.mac {
        Some(m) => Some(m.parse::<MacAddr>().map_err(|e| ConfError::Invalid {
            key: "runtimeConfig",
            reason: format!("mac: {e}"),
        })?),
        None => None,
    };
    let prev = match &conf.prev_result {
        Some(v) => Some(CniResult::from_value(v)?),
        None => None,
    };
    let cns = Netns::open(&env.netns).map_err(netns_err)?;
    let hns = Netns::current().map_err(netns_err)?;
    if cns.same_as(&hns) {
        return Err(Error::Netns {
            path: env.netns.clone().into(),
            reason: "it is the namespace the plugin runs in (the host's), not a container's".into(),
        });
    }

    let owner = Owner::new(&env.container_id, &env.ifname);
    let store = conf.store_dir();
    let ip = {
        let mut dir = FsDir::lock(&store)?;
        let ip = ipam::allocate(&mut dir, &pool, &owner, requested)?;
        test_hook("ipam-locked")?;
        ip
    };
    let attach = Attach {
        network: conf.name.clone(),
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        host_veth: plan::host_veth_name(&env.container_id, &env.ifname),
        host_mac: MacAddr::random_local(),
        container_mac: container_mac.unwrap_or_else(|| plan::mac_for_ip(ip)),
        mtu: node.mtu,
        hairpin: conf.hairpin_mode,
        addr: Ipv4Network::new(ip, node.gateway.prefix()).expect("prefix from subnet.env"),
        gateway: node.gateway.ip(),
        network_cidr: node.env.network,
        default_route: conf.default_route,
    };
    let bridge = node.bridge(conf);

    let mut veth_made = false;
    let wired = (|| -> Result<(), Error> {
        let rt = runtime()?;
        rt.block_on(wire(&attach, &bridge, &cns, &env.netns, &mut veth_made))?;
        test_hook("after-wire")?;
        if conf.ip_masq {
            masq::add(ip, node.env.network, &attach.alias())?;
        }
        enable_forwarding();
        Ok(())
    })();
    if let Err(e) = wired {
        rollback(&attach, veth_made, ip, &owner, &store, conf, &node);
        return Err(e);
    }

    let mut ours = CniResult {
        interfaces: vec![
            Interface {
                name: bridge.name.clone(),
                mac: Some(bridge.mac.to_string()),
                mtu: None,
                sandbox: None,
                extra: Map::new(),
            },
            Interface {
                name: attach.host_veth.clone(),
                mac: Some(attach.host_mac.to_string()),
                mtu: None,
                sandbox: None,
                extra: Map::new(),
            },
            Interface {
                name: attach.ifname.clone(),
                mac: Some(attach.container_mac.to_string()),
                mtu: Some(attach.mtu),
                sandbox: Some(env.netns.clone()),
                extra: Map::new(),
            },
        ],
        ips: vec![IpConfig {
            address: IpNetwork::V4(attach.addr),
            gateway: Some(IpAddr::V4(attach.gateway)),
            interface: Some(2),
            extra: Map::new(),
        }],
        routes: attach
            .route_dsts()
            .into_iter()
            .map(|dst| RouteOut {
                dst: IpNetwork::V4(dst),
                gw: Some(IpAddr::V4(attach.gateway)),
                extra: Map::new(),
            })
            .collect(),
        dns: conf.dns.clone(),
    };
    let result = match prev {
        Some(mut p) => {
            p.append(ours);
            p
        }
        None => {
            ours.dns = ours.dns.or_else(|| Some(Value::Object(Map::new())));
            ours
        }
    };
    Ok(result.to_value(&conf.cni_version).to_string())
}

/// Host side then container side. `veth_made` tells the rollback whether the pair exists.
async fn wire(
    a: &Attach,
    bridge: &BridgeWant,
    cns: &Netns,
    netns_path: &str,
    veth_made: &mut bool,
) -> Result<(), Error> {
    let host = Netlink::real().map_err(kernel("opening netlink in the host namespace"))?;
    let br = ensure_bridge(&host, bridge).await?;
    let mut ops = plan::bridge_fix_ops(&br, bridge);
    let veth_at = ops.len();
    ops.extend(a.host_ops(br.index, cns.raw_fd()));
    let (done, res) = apply(&host, &ops, "the host namespace").await;
    *veth_made = done[veth_at];
    res?;
    test_hook("after-host")?;

    let place = format!("container netns {netns_path}");
    let cnl = Netlink::real_in(cns).map_err(kernel(format!("opening netlink in {place}")))?;
    let link = cnl
        .link_by_name(&a.ifname)
        .await
        .map_err(kernel(format!("looking up {} in {place}", a.ifname)))?
        .ok_or_else(|| Error::Kernel {
            what: format!("looking up {} in {place}", a.ifname),
            reason: "the veth's container end is not there".into(),
        })?;
    apply(&cnl, &a.container_ops(link.index), &place).await.1
}

/// The bridge as it is, created first if missing. Concurrent ADDs may race to create it; the
/// losers see EEXIST on a bridge, which the netlink layer counts as success.
async fn ensure_bridge(host: &Netlink, want: &BridgeWant) -> Result<Link, Error> {
    let what = format!("bridge {} in the host namespace", want.name);
    if let Some(l) = host
        .link_by_name(&want.name)
        .await
        .map_err(kernel(format!("looking up {what}")))?
    {
        if let Some(reason) = plan::bridge_conflict(&l) {
            return Err(Error::Kernel { what, reason });
        }
        return Ok(l);
    }
    let (_, res) = apply(host, &[want.create_op()], "the host namespace").await;
    res?;
    let l = host
        .link_by_name(&want.name)
        .await
        .map_err(kernel(format!("looking up {what}")))?
        .ok_or_else(|| Error::Kernel {
            what: what.clone(),
            reason: "created, then gone".into(),
        })?;
    match plan::bridge_conflict(&l) {
        Some(reason) => Err(Error::Kernel { what, reason }),
        None => Ok(l),
    }
}

/// Undoes a failed ADD: the veth pair (both ends go with the host end), the masquerade rule,
/// the address record. Best effort: the original error is what the caller reports.
fn rollback(
    a: &Attach,
    veth_made: bool,
    ip: Ipv4Addr,
    owner: &Owner,
    store: &Path,
    conf: &NetConf,
    node: &Node,
) {
    if veth_made {
        if let Ok(rt) = runtime() {
            let _ = rt.block_on(async {
                let host = Netlink::real()?;
                host.apply(&Op::LinkDel {
                    name: a.host_veth.clone(),
                })
                .await
            });
        }
    }
    if conf.ip_masq {
        let _ = masq::del(ip, node.env.network, &a.alias());
    }
    if let Ok(mut dir) = FsDir::lock(store) {
        let _ = ipam::release_ip(&mut dir, ip, owner);
    }
}

/// The node forwards between the bridge and the overlay; flannel's bridge (isGateway) turns
/// this on too. Only written when off, and only in the plugin's (host) namespace.
fn enable_forwarding() {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read(PATH).is_ok_and(|v| v.first() == Some(&b'0')) {
        let _ = std::fs::write(PATH, b"1");
    }
}

fn del(env: &CniEnv, conf: &NetConf) -> Result<(), Error> {
    let owner = Owner::new(&env.container_id, &env.ifname);
    let alias = plan::alias(&conf.name, &env.container_id, &env.ifname);
    let host_veth = plan::host_veth_name(&env.container_id, &env.ifname);
    // An empty CNI_NETNS, a vanished one, or a stale bind-mount file: nothing to do inside.
    let cns = if env.netns.is_empty() {
        None
    } else {
        match Netns::open(&env.netns) {
            Ok(ns) => Some(ns),
            Err(e) if e.is_not_found() || matches!(e, NetnsError::NotNetns { .. }) => None,
            Err(e) => return Err(netns_err(e)),
        }
    };
    let container_place = format!("container netns {}", env.netns);
    // Which devices are this attachment's, found through tweed-netlink as everywhere else.
    let (in_container, on_host) = {
        let rt = runtime()?;
        rt.block_on(async {
            let mut in_container = None;
            if let Some(ns) = &cns {
                let place = &container_place;
                let nl =
                    Netlink::real_in(ns).map_err(kernel(format!("opening netlink in {place}")))?;
                let link = nl
                    .link_by_name(&env.ifname)
                    .await
                    .map_err(kernel(format!("looking up {} in {place}", env.ifname)))?;
                // Only the device this attachment made: an interface of that name set up by
                // anyone else stays.
                in_container = link.filter(|l| plan::owned_by(l, &alias)).map(|l| l.index);
            }
            let host = Netlink::real().map_err(kernel("opening netlink in the host namespace"))?;
            let link = host.link_by_name(&host_veth).await.map_err(kernel(format!(
                "looking up {host_veth} in the host namespace"
            )))?;
            let on_host = link
                .filter(|l| plan::host_end_deletable(l, &alias))
                .map(|l| l.index);
            Ok::<_, Error>((in_container, on_host))
        })?
        // The runtime is dropped here, before `detach` forks (see `Waiter::detached` there).
    };
    // The container end first: deleting it takes the host end along, which is then only
    // checked. Each returns once unlisted; the kernel's teardown finishes in a detached child.
    let mut targets = Vec::new();
    if let (Some(ifindex), Some(ns)) = (in_container, cns.as_ref()) {
        targets.push(detach::Target {
            netns: Some(ns),
            ifindex,
            place: container_place.clone(),
        });
    }
    if let Some(ifindex) = on_host {
        targets.push(detach::Target {
            netns: None,
            ifindex,
            place: "the host namespace".into(),
        });
    }
    detach::delete(&targets, conf.detached_delete, detach::Hooks::from_env())?;
    let released = {
        let mut dir = FsDir::lock(&conf.store_dir())?;
        ipam::release_owner(&mut dir, &owner)?
    };
    if conf.ip_masq && !released.is_empty() {
        if let Ok(env_file) = read_subnet_env(&conf.subnet_file_path()) {
            for ip in released {
                masq::del(ip, env_file.network, &alias)?;
            }
        }
    }
    Ok(())
}

fn check(env: &CniEnv, conf: &NetConf) -> Result<(), Error> {
    let fail = |reason: String| Error::Check {
        ifname: env.ifname.clone(),
        netns: env.netns.clone(),
        reason,
    };
    let prev = conf.prev_result.as_ref().ok_or(ConfError::Invalid {
        key: "prevResult",
        reason: "CHECK needs the result of ADD as prevResult".into(),
    })?;
    let prev = CniResult::from_value(prev)?;
    let idx = prev
        .interfaces
        .iter()
        .position(|i| i.name == env.ifname && i.sandbox.is_some())
        .ok_or_else(|| fail("prevResult lists no such interface in a sandbox".into()))?;
    let want_addrs: Vec<Ipv4Network> = prev
        .ips
        .iter()
        .filter(|ip| ip.interface == Some(idx))
        .filter_map(|ip| match ip.address {
            IpNetwork::V4(a) => Some(a),
            IpNetwork::V6(_) => None,
        })
        .collect();
    if want_addrs.is_empty() {
        return Err(fail("prevResult gives it no IPv4 address".into()));
    }
    let node = Node::read(conf)?;
    let owner = Owner::new(&env.container_id, &env.ifname);
    let held = {
        let dir = FsDir::lock(&conf.store_dir())?;
        ipam::held_by(&dir, &owner)?
    };
    for a in &want_addrs {
        if !held.contains(&a.ip()) {
            return Err(fail(format!(
                "address {} is not recorded for this container in {}",
                a.ip(),
                conf.store_dir().display()
            )));
        }
    }
    let alias = plan::alias(&conf.name, &env.container_id, &env.ifname);
    let cns = Netns::open(&env.netns).map_err(netns_err)?;
    let rt = runtime()?;
    rt.block_on(async {
        let place = format!("container netns {}", env.netns);
        let nl = Netlink::real_in(&cns).map_err(kernel(format!("opening netlink in {place}")))?;
        let link = nl
            .link_by_name(&env.ifname)
            .await
            .map_err(kernel(format!("looking up {}", env.ifname)))?
            .ok_or_else(|| fail("the interface is gone".into()))?;
        if !plan::owned_by(&link, &alias) {
            return Err(fail(format!(
                "the interface is not tweed's for this attachment (alias {:?})",
                link.alias
            )));
        }
        if !link.up {
            return Err(fail("the interface is down".into()));
        }
        if link.mtu != node.mtu {
            return Err(fail(format!("MTU is {}, expected {}", link.mtu, node.mtu)));
        }
        let have: BTreeSet<Ipv4Network> = nl
            .addresses(Some(link.index))
            .await
            .map_err(kernel(format!("listing addresses in {place}")))?
            .into_iter()
            .map(|a| a.net)
            .collect();
        for a in &want_addrs {
            if !have.contains(a) {
                return Err(fail(format!("address {a} is missing")));
            }
        }
        let routes = nl
            .routes(link.index)
            .await
            .map_err(kernel(format!("listing routes in {place}")))?;
        // The routes tweed adds (other plugins' routes in prevResult are theirs to check).
        let gateway = node.gateway.ip();
        let mut want_routes = vec![node.env.network];
        if conf.default_route {
            want_routes.push(Ipv4Network::new(Ipv4Addr::UNSPECIFIED, 0).expect("valid"));
        }
        for dst in want_routes {
            if !routes
                .iter()
                .any(|k| k.dst == dst && k.gateway == Some(gateway))
            {
                return Err(fail(format!("route to {dst} via {gateway} is missing")));
            }
        }
        let host = Netlink::real().map_err(kernel("opening netlink in the host namespace"))?;
        let hv = plan::host_veth_name(&env.container_id, &env.ifname);
        let hl = host
            .link_by_name(&hv)
            .await
            .map_err(kernel(format!("looking up {hv}")))?
            .ok_or_else(|| fail(format!("the host end {hv} is gone")))?;
        let br = host
            .link_by_name(&conf.bridge)
            .await
            .map_err(kernel(format!("looking up {}", conf.bridge)))?
            .ok_or_else(|| fail(format!("bridge {} is gone", conf.bridge)))?;
        if hl.master != Some(br.index) {
            return Err(fail(format!(
                "the host end {hv} is not a port of {}",
                conf.bridge
            )));
        }
        if !hl.up {
            return Err(fail(format!("the host end {hv} is down")));
        }
        Ok(())
    })
}

fn gc(conf: &NetConf) -> Result<(), Error> {
    let valid = conf.valid_attachments.clone().ok_or(ConfError::Invalid {
        key: "cni.dev/valid-attachments",
        reason: "GC needs the list of valid attachments (it may be empty)".into(),
    })?;
    let released = {
        let mut dir = FsDir::lock(&conf.store_dir())?;
        ipam::gc(&mut dir, &valid)?
    };
    let rt = runtime()?;
    rt.block_on(async {
        let host = Netlink::real().map_err(kernel("opening netlink in the host namespace"))?;
        let links = host
            .links()
            .await
            .map_err(kernel("listing links in the host namespace"))?;
        let ops: Vec<Op> = plan::gc_links(&links, &conf.name, &valid)
            .into_iter()
            .map(|l| Op::LinkDelIndex { ifindex: l.index })
            .collect();
        apply(&host, &ops, "the host namespace").await.1
    })?;
    if conf.ip_masq {
        if let Ok(env_file) = read_subnet_env(&conf.subnet_file_path()) {
            for (ip, owner) in released {
                if let Some(o) = owner {
                    let alias = plan::alias(&conf.name, &o.container_id, &o.ifname);
                    masq::del(ip, env_file.network, &alias)?;
                }
            }
        }
    }
    Ok(())
}

/// Ready when subnet.env is there and readable; the caller turns an error into code 50.
fn status(conf: &NetConf) -> Result<(), Error> {
    let node = Node::read(conf)?;
    node.pool(conf)?;
    Ok(())
}
