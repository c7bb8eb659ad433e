//! What `tweed-lab status` shows: a [`Status`] built from state.json and what is alive now,
//! printed as JSON (`--output json`, key for key as the README documents) or as tables.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tweed_config::SubnetEnv;

use crate::lab::Lab;
use crate::names;
use crate::netns;
use crate::pods::PodsVia;
use crate::spec::Backend;
use crate::state::{HostState, Phase};

/// `tweed-lab status --output json`, key for key. Fields marked `skip` only feed the table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub hosts: Vec<HostStatus>,
    pub etcd: EtcdStatus,
    #[serde(skip)]
    pub lab: String,
    #[serde(skip)]
    pub ready: bool,
    #[serde(skip)]
    pub dir: PathBuf,
    #[serde(skip)]
    pub pods_via: PodsVia,
    /// `(netns, address)` of the outside namespace.
    #[serde(skip)]
    pub outside: Option<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    pub name: String,
    pub netns: String,
    pub public_ip: String,
    /// The IPv6 underlay address (dual-stack labs only; absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_ip6: Option<String>,
    /// The node subnet, e.g. 10.244.3.0/24; null until the agent wrote subnet.env.
    pub subnet: Option<String>,
    /// The IPv6 node subnet, e.g. fd00:10:244:3::/64 (dual-stack labs only; absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet6: Option<String>,
    pub backend: Backend,
    pub agent_pid: Option<u32>,
    pub log: String,
    /// `http://<public_ip>:9867/metrics` (reachable from the lab's namespaces); null when the
    /// lab's `agent_args` gave the agent a `--metrics-addr` of their own.
    pub metrics: Option<String>,
    /// The agent's gRPC socket (`tweedctl net --socket`); null when the lab's `agent_args` gave
    /// the agent an `--api-socket` of their own.
    pub api_socket: Option<String>,
    pub pods: Vec<PodStatus>,
    #[serde(skip)]
    pub agent_alive: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodStatus {
    pub name: String,
    pub netns: String,
    /// The pod's IPv4 address; null in an IPv6-only lab.
    pub ip: Option<String>,
    /// The pod's IPv6 address (dual-stack and IPv6-only labs; absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<String>,
    /// The tweedctl container id (`--pods-via runtime`), else null.
    pub container_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdStatus {
    /// Every member's client URL.
    pub endpoints: Vec<String>,
    pub members: Vec<EtcdMemberStatus>,
    #[serde(skip)]
    pub pid: Option<u32>,
    #[serde(skip)]
    pub alive: bool,
}

/// One etcd member: what `etcd_members()` returns for fault tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdMemberStatus {
    pub name: String,
    pub endpoint: String,
    pub pid: u32,
    pub alive: bool,
}

impl Status {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("status serializes")
    }

    /// The human table.
    pub fn to_table(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let alive =
            |pid: u32, alive: bool| format!("pid {pid}, {}", if alive { "alive" } else { "DEAD" });
        let _ = writeln!(
            s,
            "lab {} ({}), pods via {}, state in {}",
            self.lab,
            if self.ready { "ready" } else { "INCOMPLETE" },
            self.pods_via,
            self.dir.display()
        );
        match (self.etcd.members.as_slice(), self.etcd.pid) {
            ([], None) => {
                let _ = writeln!(s, "etcd {} (not started)", self.etcd.endpoints.join(","));
            }
            ([], Some(p)) | ([_], Some(p)) => {
                let _ = writeln!(
                    s,
                    "etcd {} ({})",
                    self.etcd.endpoints.join(","),
                    alive(p, self.etcd.alive)
                );
            }
            (members, _) => {
                let _ = writeln!(s, "etcd cluster of {}:", members.len());
                for m in members {
                    let _ = writeln!(s, "  {} {} ({})", m.name, m.endpoint, alive(m.pid, m.alive));
                }
            }
        }
        if let Some((ns, ip)) = &self.outside {
            let _ = writeln!(s, "outside {ns} {ip}");
        }
        s.push('\n');
        let mut rows =
            vec![["HOST", "NETNS", "PUBLIC_IP", "SUBNET", "BACKEND", "AGENT"].map(String::from)];
        let mut agents = vec![["HOST", "METRICS", "API_SOCKET", "LOG"].map(String::from)];
        for h in &self.hosts {
            let agent = match (h.agent_pid, h.agent_alive) {
                (Some(p), true) => format!("{p} alive"),
                (Some(p), false) => format!("{p} DEAD"),
                (None, _) => "-".into(),
            };
            // Dual stack: both families in one cell, IPv4 first.
            let both = |v4: String, v6: &Option<String>| match v6 {
                Some(v6) => format!("{v4} {v6}"),
                None => v4,
            };
            rows.push([
                h.name.clone(),
                h.netns.clone(),
                both(h.public_ip.clone(), &h.public_ip6),
                both(h.subnet.clone().unwrap_or_else(|| "-".into()), &h.subnet6),
                h.backend.to_string(),
                agent,
            ]);
            agents.push([
                h.name.clone(),
                h.metrics.clone().unwrap_or_else(|| "-".into()),
                h.api_socket.clone().unwrap_or_else(|| "-".into()),
                h.log.clone(),
            ]);
        }
        s.push_str(&table(&rows));
        s.push('\n');
        s.push_str(&table(&agents));
        let mut pods = vec![["POD", "NETNS", "IP", "CONTAINER"].map(String::from)];
        for h in &self.hosts {
            for p in &h.pods {
                pods.push([
                    format!("{}/{}", h.name, p.name),
                    p.netns.clone(),
                    // Every family the pod has, IPv4 first.
                    [&p.ip, &p.ip6]
                        .into_iter()
                        .flatten()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(" "),
                    p.container_id
                        .as_deref()
                        .map(|c| c.chars().take(12).collect())
                        .unwrap_or_else(|| "-".into()),
                ]);
            }
        }
        if pods.len() > 1 {
            s.push('\n');
            s.push_str(&table(&pods));
        }
        s
    }
}

fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut s = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        s.push_str(line.join("  ").trim_end());
        s.push('\n');
    }
    s
}

/// The node subnet of a host: from its subnet.env now, else as `up` read it.
fn node_subnet(h: &HostState) -> Option<String> {
    SubnetEnv::read(&h.subnet_file)
        .ok()
        .and_then(|e| e.node_subnet())
        .map(|n| n.to_string())
        .or_else(|| {
            h.subnet
                .as_deref()
                .and_then(|s| s.parse::<ipnetwork::Ipv4Network>().ok())
                .and_then(|n| ipnetwork::Ipv4Network::new(n.network(), n.prefix()).ok())
                .map(|n| n.to_string())
        })
}

impl Lab {
    pub fn status(&self) -> Status {
        let hosts = self
            .state
            .hosts
            .iter()
            .map(|h| HostStatus {
                name: h.name.clone(),
                netns: h.netns.clone(),
                // An IPv6-only lab's hosts have no IPv4 address: the recorded one is unused.
                public_ip: if self.state.ip_family == crate::spec::IpFamily::V6 {
                    "-".into()
                } else {
                    h.public_ip.to_string()
                },
                public_ip6: h.public_ip6.map(|ip| ip.to_string()),
                subnet: node_subnet(h),
                subnet6: SubnetEnv::read(&h.subnet_file)
                    .ok()
                    .and_then(|e| e.ipv6)
                    .map(|v6| v6.node_subnet().to_string()),
                backend: self.state.backend,
                agent_pid: h.agent_pid,
                log: h.log.display().to_string(),
                metrics: h.metrics.clone(),
                api_socket: h.api_socket.as_ref().map(|p| p.display().to_string()),
                pods: h
                    .pods
                    .iter()
                    .map(|p| PodStatus {
                        name: p.name.clone(),
                        netns: p.netns.clone(),
                        ip: p.ip.map(|ip| ip.to_string()),
                        ip6: p.ip6.map(|ip| ip.to_string()),
                        container_id: p.container_id.clone(),
                    })
                    .collect(),
                agent_alive: h.agent_pid.is_some_and(|p| netns::pid_in(&h.netns, p)),
            })
            .collect();
        let etcd = match &self.state.etcd {
            Some(e) => EtcdStatus {
                endpoints: e.endpoints.clone(),
                members: self.etcd_members(),
                pid: Some(e.pid),
                alive: netns::pid_in(&self.state.underlay_netns, e.pid),
            },
            None => EtcdStatus {
                endpoints: vec![names::etcd_endpoint()],
                members: Vec::new(),
                pid: None,
                alive: false,
            },
        };
        let outside = self
            .state
            .outside_netns
            .clone()
            .map(|ns| (ns, names::OUTSIDE_IP.to_string()));
        Status {
            hosts,
            etcd,
            lab: self.name().to_string(),
            ready: self.state.phase == Phase::Ready,
            dir: self.dir.clone(),
            pods_via: self.state.pods_via,
            outside,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_status() -> Status {
        Status {
            hosts: vec![HostStatus {
                name: "h1".into(),
                netns: "twl-demo-h1".into(),
                public_ip: "198.18.0.1".into(),
                public_ip6: None,
                subnet: Some("10.244.3.0/24".into()),
                subnet6: None,
                backend: Backend::Vxlan,
                agent_pid: Some(4242),
                log: "/run/tweed-lab/demo/hosts/h1/tweedd.log".into(),
                metrics: Some("http://198.18.0.1:9867/metrics".into()),
                api_socket: Some("/run/tweed-lab/demo/hosts/h1/tweedd.sock".into()),
                pods: vec![PodStatus {
                    name: "p1".into(),
                    netns: "twl-demo-h1-p1".into(),
                    ip: Some("10.244.3.2".into()),
                    ip6: None,
                    container_id: None,
                }],
                agent_alive: true,
            }],
            etcd: EtcdStatus {
                endpoints: vec!["http://198.18.0.254:2379".into()],
                members: vec![EtcdMemberStatus {
                    name: "lab".into(),
                    endpoint: "http://198.18.0.254:2379".into(),
                    pid: 7,
                    alive: true,
                }],
                pid: Some(7),
                alive: true,
            },
            lab: "demo".into(),
            ready: true,
            dir: "/run/tweed-lab/demo".into(),
            pods_via: PodsVia::Cni,
            outside: Some(("twl-demo-o".into(), "198.18.0.250".into())),
        }
    }

    #[test]
    fn status_json_has_exactly_the_documented_keys() {
        let v: serde_json::Value = serde_json::from_str(&sample_status().to_json()).unwrap();
        let keys = |v: &serde_json::Value| {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(keys(&v), ["etcd", "hosts"]);
        assert_eq!(keys(&v["etcd"]), ["endpoints", "members"]);
        assert_eq!(
            keys(&v["etcd"]["members"][0]),
            ["alive", "endpoint", "name", "pid"]
        );
        assert_eq!(
            keys(&v["hosts"][0]),
            [
                "agent_pid",
                "api_socket",
                "backend",
                "log",
                "metrics",
                "name",
                "netns",
                "pods",
                "public_ip",
                "subnet"
            ]
        );
        assert_eq!(
            keys(&v["hosts"][0]["pods"][0]),
            ["container_id", "ip", "name", "netns"]
        );
        assert_eq!(v["hosts"][0]["agent_pid"], 4242);
        assert_eq!(v["hosts"][0]["metrics"], "http://198.18.0.1:9867/metrics");
        assert_eq!(
            v["hosts"][0]["api_socket"],
            "/run/tweed-lab/demo/hosts/h1/tweedd.sock"
        );
        assert_eq!(v["hosts"][0]["subnet"], "10.244.3.0/24");
        assert_eq!(v["etcd"]["endpoints"][0], "http://198.18.0.254:2379");

        // A dual-stack lab adds the IPv6 twins (and only then), in JSON and in the table.
        let mut s = sample_status();
        s.hosts[0].public_ip6 = Some("fd00:198:18::1".into());
        s.hosts[0].subnet6 = Some("fd00:10:244:3::/64".into());
        s.hosts[0].pods[0].ip6 = Some("fd00:10:244:3::2".into());
        let v: serde_json::Value = serde_json::from_str(&s.to_json()).unwrap();
        assert_eq!(v["hosts"][0]["public_ip6"], "fd00:198:18::1");
        assert_eq!(v["hosts"][0]["subnet6"], "fd00:10:244:3::/64");
        assert_eq!(v["hosts"][0]["pods"][0]["ip6"], "fd00:10:244:3::2");
        let t = s.to_table();
        assert!(t.contains("198.18.0.1 fd00:198:18::1"), "{t}");
        assert!(t.contains("10.244.3.0/24 fd00:10:244:3::/64"), "{t}");
        assert!(t.contains("10.244.3.2 fd00:10:244:3::2"), "{t}");

        // An IPv6-only lab: no IPv4 address for the host or the pod (null in JSON).
        s.hosts[0].public_ip = "-".into();
        s.hosts[0].subnet = None;
        s.hosts[0].pods[0].ip = None;
        let v: serde_json::Value = serde_json::from_str(&s.to_json()).unwrap();
        let pod = &v["hosts"][0]["pods"][0];
        assert_eq!(
            keys(pod),
            ["container_id", "ip", "ip6", "name", "netns"],
            "{pod}"
        );
        assert!(pod["ip"].is_null(), "{pod}");
        assert_eq!(pod["ip6"], "fd00:10:244:3::2");
        let t = s.to_table();
        let row = t.lines().find(|l| l.starts_with("h1/p1")).unwrap();
        assert_eq!(
            row.split_whitespace().collect::<Vec<_>>(),
            ["h1/p1", "twl-demo-h1-p1", "fd00:10:244:3::2", "-"],
            "{t}"
        );
    }

    #[test]
    fn status_json_nulls_when_unknown() {
        let mut s = sample_status();
        s.hosts[0].subnet = None;
        s.hosts[0].agent_pid = None;
        s.hosts[0].metrics = None;
        s.hosts[0].api_socket = None;
        let v: serde_json::Value = serde_json::from_str(&s.to_json()).unwrap();
        assert!(v["hosts"][0]["subnet"].is_null());
        assert!(v["hosts"][0]["agent_pid"].is_null());
        assert!(v["hosts"][0]["metrics"].is_null());
        assert!(v["hosts"][0]["api_socket"].is_null());
        assert!(v["hosts"][0]["pods"][0]["container_id"].is_null());
    }

    #[test]
    fn status_table_lists_hosts_and_pods() {
        let t = sample_status().to_table();
        assert!(t.contains("HOST"), "{t}");
        assert!(t.contains("4242 alive"), "{t}");
        assert!(t.contains("h1/p1"), "{t}");
        assert!(t.contains("10.244.3.2"), "{t}");
        assert!(t.contains("http://198.18.0.1:9867/metrics"), "{t}");
        assert!(
            t.contains("/run/tweed-lab/demo/hosts/h1/tweedd.sock"),
            "{t}"
        );
        assert!(t.contains("outside twl-demo-o 198.18.0.250"), "{t}");
        assert!(t.contains("pods via cni"), "{t}");
        let mut s = sample_status();
        s.etcd.members = (1..=3)
            .map(|i| EtcdMemberStatus {
                name: format!("etcd{i}"),
                endpoint: format!("http://198.18.0.25{i}:2379"),
                pid: 10 + i,
                alive: i != 2,
            })
            .collect();
        let t = s.to_table();
        assert!(t.contains("etcd cluster of 3"), "{t}");
        assert!(
            t.contains("etcd2 http://198.18.0.252:2379 (pid 12, DEAD)"),
            "{t}"
        );
    }
}
