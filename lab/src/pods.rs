//! Pods: how a lab attaches them, and how `down` detaches them. Three ways, one shape (a `cni0`
//! bridge in the host namespace and one namespace per pod behind it):
//!
//! * [`PodsVia::Cni`] (the default): the real tweed CNI plugin, run by the CNI protocol inside the
//!   host namespace, as a container runtime would (see [`crate::cni`]).
//! * [`PodsVia::Runtime`]: each pod is a `tweedctl run --net overlay` container (see
//!   [`crate::containers`]), which calls the same plugin.
//! * [`PodsVia::Direct`]: the lab wires the pods itself with `ip` ([`wire_bridge`], [`wire_pod`]).
//!   It needs no plugin binary, so it tells an agent problem from a plugin problem.

use std::fs;
use std::net::{IpAddr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;

use ipnetwork::{Ipv4Network, Ipv6Network};
use tweed_config::SubnetEnv;

use crate::cmd::{self, CmdError};
use crate::cni::{self, CniCall};
use crate::containers::{self, Tweedctl};
use crate::error::{io_err, LabError};
use crate::names::{self, Names};
use crate::netns;
use crate::spec::{self, Binary};
use crate::state::{HostState, LabState, PodState};

/// How `up` attaches pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PodsVia {
    /// The tweed CNI plugin, run by the lab by the CNI protocol.
    #[default]
    Cni,
    /// tweedctl containers (`tweedctl run -d --net overlay`), which run the same plugin.
    Runtime,
    /// The lab's own `ip` wiring; no CNI plugin involved.
    Direct,
}

string_enum!(PodsVia, "pod mode", {
    Cni => "cni",
    Runtime => "runtime",
    Direct => "direct",
});

impl PodsVia {
    /// Whether this mode needs the CNI plugin binary.
    pub fn uses_plugin(self) -> bool {
        self != PodsVia::Direct
    }
}

/// One pod to create. Pure data, so the plan is unit-testable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPlan {
    pub name: String,
    pub netns: String,
    /// Address with prefix, e.g. 10.244.3.2/24; none on an IPv6-only node.
    pub ip: Option<Ipv4Network>,
    /// The IPv6 address when the network has IPv6, e.g. fd00:10:244:3::2/64.
    pub ip6: Option<Ipv6Network>,
    /// The pod's cable end on the host's bridge.
    pub host_veth: String,
}

/// The pods of host `host`, given its subnet.env.
pub fn plan(
    names: &Names,
    host: usize,
    env: &SubnetEnv,
    count: usize,
) -> Result<Vec<PodPlan>, String> {
    (1..=count).map(|p| plan_pod(names, host, env, p)).collect()
}

/// Pod `pod` of host `host`.
pub fn plan_pod(
    names: &Names,
    host: usize,
    env: &SubnetEnv,
    pod: usize,
) -> Result<PodPlan, String> {
    if env.ipv4.is_none() && env.ipv6.is_none() {
        return Err("neither TWEED_SUBNET nor TWEED_IPV6_SUBNET is set".into());
    }
    Ok(PodPlan {
        name: names.pod(pod),
        netns: names.pod_ns(host, pod),
        ip: env
            .ipv4
            .map(|v4| names::pod_ip(v4.subnet, pod))
            .transpose()?,
        ip6: env
            .ipv6
            .as_ref()
            .map(|v6| names::pod_ip6(v6.subnet, pod))
            .transpose()?,
        host_veth: names.pod_veth(pod),
    })
}

/// The host's pod bridge: holds TWEED_SUBNET's address (and TWEED_IPV6_SUBNET's), MTU TWEED_MTU.
pub fn wire_bridge(host_ns: &str, env: &SubnetEnv) -> Result<(), CmdError> {
    netns::bridge(
        host_ns,
        names::POD_BRIDGE,
        env.ipv4.map(|v4| v4.subnet.to_string()).as_deref(),
        Some(env.mtu),
    )?;
    if let Some(v6) = &env.ipv6 {
        // nodad: the address is the subnet's own, unique by the lease.
        let a = v6.subnet.to_string();
        netns::ip(
            host_ns,
            &["-6", "addr", "add", &a, "dev", names::POD_BRIDGE, "nodad"],
        )?;
    }
    Ok(())
}

/// One pod: its namespace, a veth into `cni0`, its address and a default route via the bridge.
pub fn wire_pod(host_ns: &str, env: &SubnetEnv, pod: &PodPlan) -> Result<(), CmdError> {
    netns::add(&pod.netns)?;
    netns::veth(
        host_ns,
        &pod.host_veth,
        &pod.netns,
        names::POD_IFACE,
        Some(env.mtu),
    )?;
    netns::ip(
        host_ns,
        &["link", "set", &pod.host_veth, "master", names::POD_BRIDGE],
    )?;
    if let (Some(ip), Some(v4)) = (pod.ip, env.ipv4) {
        netns::ip(
            &pod.netns,
            &["addr", "add", &ip.to_string(), "dev", names::POD_IFACE],
        )?;
        netns::ip(
            &pod.netns,
            &[
                "route",
                "add",
                "default",
                "via",
                &v4.subnet.ip().to_string(),
                "dev",
                names::POD_IFACE,
            ],
        )?;
    }
    if let (Some(ip6), Some(v6)) = (pod.ip6, &env.ipv6) {
        let a = ip6.to_string();
        let gw = v6.subnet.ip().to_string();
        netns::ip(
            &pod.netns,
            &["-6", "addr", "add", &a, "dev", names::POD_IFACE, "nodad"],
        )?;
        netns::ip(
            &pod.netns,
            &[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &gw,
                "dev",
                names::POD_IFACE,
            ],
        )?;
    }
    Ok(())
}

/// The global IPv6 address on `eth0` of namespace `ns`, if any (`ip -6 -o addr show`).
pub fn global_ip6(ns: &str) -> Result<Option<Ipv6Addr>, CmdError> {
    let out = netns::ip(
        ns,
        &[
            "-6",
            "-o",
            "addr",
            "show",
            "dev",
            names::POD_IFACE,
            "scope",
            "global",
        ],
    )?;
    Ok(parse_global_ip6(&out))
}

/// The first address of `ip -6 -o addr show` output (`2: eth0    inet6 fd00::2/64 scope ...`).
fn parse_global_ip6(out: &str) -> Option<Ipv6Addr> {
    out.lines().find_map(|l| {
        let mut words = l.split_whitespace();
        words.find(|w| *w == "inet6")?;
        words.next()?.split('/').next()?.parse().ok()
    })
}

/// A lab's way of attaching pods, with what that way runs.
#[derive(Debug, Clone)]
pub(crate) enum Attach {
    Direct,
    Cni { plugin: PathBuf, cni_path: PathBuf },
    Runtime(Tweedctl),
}

impl Attach {
    /// From a lab's state once its `CNI_PATH` is set up.
    pub(crate) fn of_lab(state: &LabState) -> Result<Attach, LabError> {
        let missing = |what: &str| {
            LabError::Spec(format!(
                "lab {}: pods via {} but no {what} in its state",
                state.name, state.pods_via
            ))
        };
        Ok(match state.pods_via {
            PodsVia::Direct => Attach::Direct,
            PodsVia::Cni => Attach::Cni {
                plugin: state
                    .cni_plugin
                    .clone()
                    .ok_or_else(|| missing("CNI plugin"))?,
                cni_path: state.cni_path.clone().ok_or_else(|| missing("CNI_PATH"))?,
            },
            PodsVia::Runtime => {
                Attach::Runtime(containers::of_lab(state).ok_or_else(|| missing("tweedctl"))?)
            }
        })
    }
}

/// What a host needs before its first pod: the directly wired pods' bridge (the plugin makes its
/// own).
pub(crate) fn prepare_host(
    how: &Attach,
    host: &HostState,
    env: &SubnetEnv,
) -> Result<(), LabError> {
    if let Attach::Direct = how {
        wire_bridge(&host.netns, env)?;
    }
    Ok(())
}

/// Pod `pod` (from 1) of host `host_no`, whose state is `host`.
pub(crate) fn attach_pod(
    how: &Attach,
    names: &Names,
    host_no: usize,
    host: &HostState,
    env: &SubnetEnv,
    pod: usize,
) -> Result<PodState, LabError> {
    let (name, pod_ns) = (names.pod(pod), names.pod_ns(host_no, pod));
    let conf_path = || {
        host.cni_conf
            .clone()
            .ok_or_else(|| LabError::Spec(format!("host {} has no CNI conflist", host.name)))
    };
    let (ip, container_id) = match how {
        Attach::Direct => {
            let p = plan_pod(names, host_no, env, pod).map_err(|e| {
                LabError::Spec(format!(
                    "pods on {} ({}): {e}",
                    host.name,
                    host.subnet_file.display()
                ))
            })?;
            wire_pod(&host.netns, env, &p)?;
            (p.ip.map(|ip| ip.ip()), None)
        }
        Attach::Cni { plugin, cni_path } => {
            netns::add(&pod_ns)?;
            let conf = cni::read_plugin_conf(&conf_path()?)?;
            let addrs = cni::cni_add(&CniCall {
                plugin,
                cni_path,
                host_ns: &host.netns,
                container_id: &pod_ns,
                pod_ns: &pod_ns,
                conf: &conf,
            })?;
            if env.ipv4.is_some() && addrs.ipv4.is_none() {
                return Err(LabError::Spec(format!(
                    "pod {name} on {}: the node has an IPv4 subnet but CNI ADD gave {pod_ns} no \
                     IPv4 address",
                    host.name
                )));
            }
            (addrs.ipv4.map(|ip| ip.ip()), None)
        }
        Attach::Runtime(rt) => {
            let conf = conf_path()?;
            let net = containers::HostNet {
                host_ns: &host.netns,
                cni_conf: &conf,
            };
            let id = rt.run_pod(&net, &format!("{}-{name}", host.name))?;
            let (pid, ip) = rt.pid_and_ip(&id)?;
            // inspect lists the IPv4 address first when there is one; an IPv6-only node's
            // container has only its IPv6 address (read back from the namespace below).
            let ip = match ip.parse::<IpAddr>() {
                Ok(IpAddr::V4(v4)) => Some(v4),
                Ok(IpAddr::V6(_)) if env.ipv4.is_none() => None,
                _ => {
                    let want = if env.ipv4.is_some() { "IPv4" } else { "IPv6" };
                    return Err(LabError::Spec(format!(
                        "container {id}: `tweedctl inspect` gave no {want} address: {ip:?}"
                    )));
                }
            };
            // Named like any pod's, so `check`, `exec hN/pM` and `down` need not know.
            cmd::run(Command::new("ip").args(["netns", "attach", &pod_ns, &pid.to_string()]))?;
            (ip, Some(id))
        }
    };
    // Whatever attached the pod, its IPv6 address is read back from the pod itself: a node with
    // an IPv6 subnet whose pod got none is an error here, not a mystery in the first ping6.
    let ip6 = match &env.ipv6 {
        None => None,
        Some(_) => Some(global_ip6(&pod_ns)?.ok_or_else(|| {
            LabError::Spec(format!(
                "pod {name} on {}: the node has an IPv6 subnet but {pod_ns} has no global IPv6 \
                 address on {}",
                host.name,
                names::POD_IFACE
            ))
        })?),
    };
    Ok(PodState {
        name,
        netns: pod_ns,
        ip,
        ip6,
        container_id,
    })
}

/// `p1 10.244.3.2` (`p1 10.244.3.2 fd00:10:244:3::2` when dual stack, `p1 fd00:10:244:3::2`
/// when IPv6 only), and the container for tweedctl pods.
pub(crate) fn describe(pod: &PodState) -> String {
    let ips = pod
        .ips()
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ");
    match &pod.container_id {
        Some(id) => format!(
            "{} {ips} (container {})",
            pod.name,
            id.chars().take(12).collect::<String>()
        ),
        None => format!("{} {ips}", pod.name),
    }
}

/// Runs CNI DEL for the lab's CNI pods and `tweedctl rm -f` for its containers (best effort, as a
/// node would: the namespaces go anyway); returns what failed.
pub(crate) fn detach_all(dir: &Path, state: Option<&LabState>) -> Vec<String> {
    let mut warnings = Vec::new();
    // Containers: every one in the lab's runtime root, recorded in state.json or not (an `up`
    // may have died between `run` and saving).
    let runtime_root = dir.join("runtime");
    if runtime_root.join("containers").is_dir() {
        let rt = match state.and_then(containers::of_lab) {
            Some(rt) => Some(rt),
            None => spec::find_binary(Binary::Tweedctl, None)
                .ok()
                .map(|bin| Tweedctl {
                    bin,
                    root: runtime_root.clone(),
                    image_root: dir.join("images"),
                    cni_path: Some(dir.join("cni-bin")).filter(|p| p.is_dir()),
                }),
        };
        match rt {
            Some(rt) => {
                if let Err(e) = rt.ids().and_then(|ids| rt.remove(&ids)) {
                    warnings.push(format!("removing the lab's containers: {e}"));
                }
            }
            None => warnings.push("containers left: tweedctl not found".into()),
        }
    }
    let Some(s) = state else {
        return warnings;
    };
    if s.pods_via != PodsVia::Cni {
        return warnings;
    }
    let (Some(plugin), Some(cni_path)) = (&s.cni_plugin, &s.cni_path) else {
        return warnings;
    };
    for h in s.hosts.iter().filter(|h| netns::exists(&h.netns)) {
        let Some(Ok(conf)) = h.cni_conf.as_deref().map(cni::read_plugin_conf) else {
            continue;
        };
        for p in &h.pods {
            let call = CniCall {
                plugin,
                cni_path,
                host_ns: &h.netns,
                container_id: &p.netns,
                pod_ns: &p.netns,
                conf: &conf,
            };
            if let Err(e) = cni::cni_del(&call) {
                warnings.push(e.to_string());
            }
        }
    }
    warnings
}

/// Writes host `host_dir`'s conflist (for the plugin modes); returns its path.
pub(crate) fn write_conflist(host_dir: &Path, subnet_file: &Path) -> Result<PathBuf, LabError> {
    let path = host_dir.join(cni::CONFLIST);
    let parent = path.parent().unwrap_or(host_dir);
    fs::create_dir_all(parent).map_err(io_err("cannot create", parent))?;
    let list = cni::conflist(subnet_file, &host_dir.join("ipam"));
    fs::write(&path, format!("{list:#}\n")).map_err(io_err("cannot write", &path))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_modes_parse() {
        for m in [PodsVia::Cni, PodsVia::Runtime, PodsVia::Direct] {
            assert_eq!(m.as_str().parse::<PodsVia>().unwrap(), m);
            assert_eq!(serde_json::to_value(m).unwrap(), m.as_str());
        }
        assert_eq!(
            "cri".parse::<PodsVia>().unwrap_err(),
            r#"unknown pod mode "cri": expected cni, runtime or direct"#
        );
        assert_eq!(PodsVia::default(), PodsVia::Cni);
    }

    #[test]
    fn pods_are_described_with_a_short_container_id() {
        let mut p = PodState {
            name: "p1".into(),
            netns: "twl-demo-h1-p1".into(),
            ip: Some(std::net::Ipv4Addr::new(10, 244, 3, 2)),
            ip6: None,
            container_id: None,
        };
        assert_eq!(describe(&p), "p1 10.244.3.2");
        p.container_id = Some("0123456789abcdef".into());
        assert_eq!(describe(&p), "p1 10.244.3.2 (container 0123456789ab)");
        p.container_id = Some("abc".into());
        assert_eq!(describe(&p), "p1 10.244.3.2 (container abc)");
        p.ip6 = Some("fd00:10:244:3::2".parse().unwrap());
        assert_eq!(
            describe(&p),
            "p1 10.244.3.2 fd00:10:244:3::2 (container abc)"
        );
        p.ip = None;
        p.container_id = None;
        assert_eq!(describe(&p), "p1 fd00:10:244:3::2");
    }

    #[test]
    fn the_global_ipv6_address_is_read_from_ip_output() {
        let out = "2: eth0    inet6 fd00:10:244:3::2/64 scope global \\       valid_lft forever\n";
        assert_eq!(
            parse_global_ip6(out),
            Some("fd00:10:244:3::2".parse().unwrap())
        );
        assert_eq!(parse_global_ip6(""), None);
        // Crafted junk: no inet6 word, or a non-address after it.
        assert_eq!(parse_global_ip6("2: eth0 inet 10.0.0.1/24"), None);
        assert_eq!(parse_global_ip6("2: eth0 inet6 zz::1/64"), None);
        assert_eq!(parse_global_ip6("2: eth0 inet6"), None);
    }

    #[test]
    fn the_conflist_written_is_the_one_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let subnet = dir.path().join("subnet.env");
        let path = write_conflist(dir.path(), &subnet).unwrap();
        assert_eq!(path, dir.path().join("net.d/10-tweed.conflist"));
        let conf = cni::read_plugin_conf(&path).unwrap();
        assert_eq!(conf["type"], "tweed");
        assert_eq!(conf["subnetFile"], subnet.display().to_string());
        assert_eq!(
            conf["dataDir"],
            dir.path().join("ipam").display().to_string()
        );
    }

    #[test]
    fn plan_numbers_pods_after_the_bridge() {
        let names = Names::new("demo").unwrap();
        let env = SubnetEnv {
            ipv4: Some(tweed_config::SubnetEnvV4 {
                network: "10.244.0.0/16".parse().unwrap(),
                subnet: "10.244.7.1/24".parse().unwrap(),
            }),
            mtu: 1450,
            ipmasq: true,
            ipv6: None,
        };
        let p = plan(&names, 2, &env, 2).unwrap();
        assert_eq!(
            p,
            vec![
                PodPlan {
                    name: "p1".into(),
                    netns: "twl-demo-h2-p1".into(),
                    ip: Some("10.244.7.2/24".parse().unwrap()),
                    ip6: None,
                    host_veth: "veth-p1".into(),
                },
                PodPlan {
                    name: "p2".into(),
                    netns: "twl-demo-h2-p2".into(),
                    ip: Some("10.244.7.3/24".parse().unwrap()),
                    ip6: None,
                    host_veth: "veth-p2".into(),
                },
            ]
        );
        assert!(plan(&names, 2, &env, 254).is_err());
        // An IPv6-only node: the pods get only the IPv6 address above the bridge's.
        let v6_only = SubnetEnv {
            ipv4: None,
            ipv6: Some(tweed_config::SubnetEnvV6 {
                network: "fd00:10:244::/56".parse().unwrap(),
                subnet: "fd00:10:244:7::1/64".parse().unwrap(),
            }),
            ..env
        };
        let p = plan_pod(&names, 2, &v6_only, 1).unwrap();
        assert_eq!(p.ip, None);
        assert_eq!(p.ip6, Some("fd00:10:244:7::2/64".parse().unwrap()));
        let neither = SubnetEnv {
            ipv6: None,
            ..v6_only
        };
        assert!(plan_pod(&names, 2, &neither, 1)
            .unwrap_err()
            .contains("neither TWEED_SUBNET nor TWEED_IPV6_SUBNET"));
    }
}
