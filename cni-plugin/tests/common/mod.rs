//! A "node" for the root integration tests: a host namespace the plugin runs in, a temp dir
//! with subnet.env and the IPAM store, and container namespaces. Everything is removed on drop,
//! also when a test fails.

#![allow(dead_code)]

pub mod trace;

use std::path::{Path, PathBuf};
use std::process::Child;

use serde_json::{json, Value};
use tweed_testkit::cni::{self, Call, PluginRun};
use tweed_testkit::NetnsGuard;

pub const TWEED: &str = env!("CARGO_BIN_EXE_tweed");
pub const REF_DIR: &str = "/usr/lib/cni";

/// Why these tests need root, for `tweed_testkit::require_root!`.
pub const NEEDS_ROOT: &str = "network namespaces, veths and iptables for the plugin";

/// A node with subnet 10.244.7.1/24 (the test has checked for root).
pub fn node(tag: &str) -> Node {
    Node::new(tag, "10.244.7.1/24")
}

pub struct Node {
    pub prefix: String,
    pub host: NetnsGuard,
    pub dir: tempfile::TempDir,
    pub subnet_env: PathBuf,
}

impl Node {
    pub fn new(tag: &str, subnet: &str) -> Node {
        let prefix = format!("twt{}{tag}", std::process::id());
        let host = NetnsGuard::new(&format!("{prefix}h")).expect("host netns");
        let dir = tempfile::tempdir().expect("temp dir");
        let subnet_env = dir.path().join("subnet.env");
        cni::write_subnet_env(&subnet_env, "10.244.0.0/16", subnet, 1450).expect("subnet.env");
        Node {
            prefix,
            host,
            dir,
            subnet_env,
        }
    }

    /// Adds the IPv6 half of a dual-stack lease to subnet.env, as the agent writes it.
    pub fn dual_stack(self, network6: &str, subnet6: &str) -> Node {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.subnet_env)
            .expect("subnet.env");
        writeln!(
            f,
            "TWEED_IPV6_NETWORK={network6}\nTWEED_IPV6_SUBNET={subnet6}"
        )
        .expect("subnet.env");
        self
    }

    /// Replaces subnet.env by an IPv6-only node's, as flannel writes it with EnableIPv4 false
    /// (no FLANNEL_NETWORK / FLANNEL_SUBNET).
    pub fn ipv6_only(self, network6: &str, subnet6: &str) -> Node {
        std::fs::write(
            &self.subnet_env,
            format!(
                "FLANNEL_IPV6_NETWORK={network6}\nFLANNEL_IPV6_SUBNET={subnet6}\n\
                 FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
            ),
        )
        .expect("subnet.env");
        self
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The IPAM store of network `name`.
    pub fn store(&self, name: &str) -> PathBuf {
        self.data_dir().join(name)
    }

    /// Address records in the store of network `name`.
    pub fn records(&self, name: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.store(name))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// A tweed configuration for this node, with `extra` keys merged in.
    pub fn conf_value(&self, version: &str, extra: Value) -> Value {
        let mut c = json!({
            "cniVersion": version,
            "name": "tnet",
            "type": "tweed",
            "subnetFile": self.subnet_env,
            "dataDir": self.data_dir(),
        });
        if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                c.insert(k.clone(), v.clone());
            }
        }
        c
    }

    pub fn conf(&self, version: &str, extra: Value) -> String {
        self.conf_value(version, extra).to_string()
    }

    pub fn container(&self, n: usize) -> NetnsGuard {
        NetnsGuard::new(&format!("{}c{n}", self.prefix)).expect("container netns")
    }

    /// `count` containers for a parallel run, container `i` with ID `{id_prefix}{i}`.
    pub fn containers(&self, count: usize, id_prefix: &str) -> Containers {
        let netns: Vec<NetnsGuard> = (0..count).map(|i| self.container(i)).collect();
        Containers {
            paths: netns.iter().map(NetnsGuard::path_str).collect(),
            ids: (0..count).map(|i| format!("{id_prefix}{i}")).collect(),
            netns,
        }
    }

    pub fn run(&self, plugin: &Path, call: &Call<'_>, conf: &str) -> PluginRun {
        cni::run(&self.host, plugin, call, conf.as_bytes()).expect("spawning the plugin")
    }

    pub fn tweed(&self, command: &str, id: &str, netns: &str, conf: &str) -> PluginRun {
        self.run(Path::new(TWEED), &Call::new(command, id, netns), conf)
    }

    /// Starts tweed traced (see [`trace`]): the test holds it, or the child it forks, where it
    /// wants, and kills it or lets it finish.
    pub fn traced(
        &self,
        call: &Call<'_>,
        conf: &str,
        syscalls: bool,
        children: trace::Children,
    ) -> trace::Traced {
        trace::Traced::spawn(
            &self.host,
            Path::new(TWEED),
            call,
            conf.as_bytes(),
            syscalls,
            children,
        )
    }

    /// Starts tweed without waiting for it: the test kills it, or overlaps it with others.
    pub fn spawn(&self, call: &Call<'_>, conf: &str) -> Child {
        cni::spawn(&self.host, Path::new(TWEED), call, conf.as_bytes())
            .expect("spawning the plugin")
    }

    /// Starts `command` for container `ids[i]` in `paths[i]`, every one before waiting for any,
    /// so that they contend as on a busy node; see [`wait_ok`].
    pub fn spawn_all(
        &self,
        command: &str,
        ids: &[String],
        paths: &[String],
        conf: &str,
    ) -> Vec<Child> {
        ids.iter()
            .zip(paths)
            .map(|(id, path)| self.spawn(&Call::new(command, id, path), conf))
            .collect()
    }

    /// Names of the host namespace's links.
    pub fn host_links(&self) -> Vec<String> {
        links(&self.host)
    }

    /// The host ends of tweed's veth pairs: what a DEL or GC must leave none of.
    pub fn tw_links(&self) -> Vec<String> {
        self.host_links()
            .into_iter()
            .filter(|l| l.starts_with("tw"))
            .collect()
    }
}

/// Containers from [`Node::containers`]: what [`Node::spawn_all`] takes, index by index.
pub struct Containers {
    pub netns: Vec<NetnsGuard>,
    pub paths: Vec<String>,
    pub ids: Vec<String>,
}

/// Waits for a plugin from [`Node::spawn`] and asserts it succeeded, naming the run `what`;
/// returns its stdout.
pub fn wait_ok(child: Child, what: &str) -> String {
    let out = child.wait_with_output().expect("waiting for the plugin");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{what}: {stdout}");
    stdout
}

/// Link names in a namespace.
pub fn links(ns: &NetnsGuard) -> Vec<String> {
    ns.ip(&["-o", "link", "show"])
        .expect("ip link")
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

/// Asserts a run failed with `code` and printed exactly one JSON error document naming
/// `needle`.
pub fn assert_error(run: &PluginRun, code: u64, needle: &str) {
    assert!(!run.ok(), "expected failure, got success: {}", run.stdout);
    let v = run.json();
    assert_eq!(v["code"], code, "{}", run.stdout);
    let msg = v["msg"].as_str().unwrap_or_default();
    assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
    assert_eq!(
        run.stdout.trim().lines().count(),
        1,
        "one document only: {:?}",
        run.stdout
    );
}

/// Whether the reference plugins are installed (Debian `containernetworking-plugins`).
pub fn have_reference_plugins() -> bool {
    [
        "bridge",
        "host-local",
        "portmap",
        "bandwidth",
        "firewall",
        "tuning",
    ]
    .iter()
    .all(|p| Path::new(REF_DIR).join(p).exists())
}
