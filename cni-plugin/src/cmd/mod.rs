//! The verbs, each a thin driver: what the environment and configuration ask for is checked
//! first (pure), the netlink ops come from [`crate::plan`] (pure), every side effect goes
//! through a [`Host`], and the verb returns what goes to stdout.

mod add;
pub mod check;
mod del;
mod gc;

use crate::conf::NetConf;
use crate::env::{CniEnv, Command};
use crate::error::Error;
use crate::host::Host;
use crate::node::Node;
use crate::version::{self, Version};

/// What a successful verb prints (nothing for DEL, CHECK, GC, STATUS).
pub type Output = Option<String>;

#[derive(Debug, thiserror::Error)]
pub enum VerbError {
    #[error("{verb} needs cniVersion {need} or later; the configuration says {have}")]
    NeedsVersion {
        verb: &'static str,
        need: &'static str,
        have: String,
    },
}

pub fn run<H: Host>(host: &H, env: &CniEnv, conf: &NetConf) -> Result<Output, Error> {
    match env.command {
        Command::Add => add::add(host, env, conf).map(Some),
        Command::Del => del::del(host, env, conf).map(|()| None),
        Command::Check => {
            need_version(conf, "CHECK", Version::V0_4_0, "0.4.0")?;
            check::check(host, env, conf).map(|()| None)
        }
        Command::Gc => {
            need_version(conf, "GC", Version::V1_1_0, "1.1.0")?;
            gc::gc(host, conf).map(|()| None)
        }
        Command::Status => {
            need_version(conf, "STATUS", Version::V1_1_0, "1.1.0")?;
            status(host, conf).map(|()| None)
        }
        Command::Version => Ok(Some(version::version_doc(&conf.cni_version))),
    }
}

fn need_version(
    conf: &NetConf,
    verb: &'static str,
    min: Version,
    need: &'static str,
) -> Result<(), VerbError> {
    if conf.version() < min {
        return Err(VerbError::NeedsVersion {
            verb,
            need,
            have: conf.cni_version.clone(),
        });
    }
    Ok(())
}

/// The node as subnet.env describes it, with the configuration's overrides.
fn node<H: Host>(host: &H, conf: &NetConf) -> Result<Node, Error> {
    let env = host.read_subnet_env(conf.subnet_file.as_deref())?;
    Ok(Node::new(&env, conf))
}

/// Ready when subnet.env is there, readable and gives a usable pool of each family the
/// configuration asks for; the caller turns an error into code 50.
fn status<H: Host>(host: &H, conf: &NetConf) -> Result<(), Error> {
    let node = node(host, conf)?;
    node.pool(conf)?;
    node.pool6(conf)?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    //! What the verbs' tests share: a fake node and the calls a runtime makes.

    use super::*;
    use crate::host::fake::{FakeHost, SUBNET_FILE};
    use serde_json::{json, Value};

    /// A configuration of network "tnet" on the fake node, with `extra` keys merged in.
    pub fn conf(version: &str, extra: Value) -> NetConf {
        let mut c = json!({
            "cniVersion": version, "name": "tnet", "type": "tweed",
            "subnetFile": SUBNET_FILE, "dataDir": "/fake/data",
        });
        for (k, v) in extra.as_object().expect("an object") {
            c[k] = v.clone();
        }
        NetConf::parse(c.to_string().as_bytes()).expect("valid configuration")
    }

    pub fn env(command: &str, id: &str, netns: &str) -> CniEnv {
        let vars = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", id),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", "eth0"),
        ];
        CniEnv::from_lookup(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
        .expect("valid environment")
    }

    /// ADD of container `id` in the namespace at `netns`: the result document.
    pub fn add(host: &FakeHost, id: &str, netns: &str, conf: &NetConf) -> Value {
        let out = run(host, &env("ADD", id, netns), conf).expect("ADD succeeds");
        serde_json::from_str(&out.expect("ADD prints its result")).expect("one JSON document")
    }

    /// The container namespace the verbs' tests attach.
    pub const C1: &str = "/run/netns/c1";

    /// A node with [`C1`] added as container `id` under a 1.0.0 configuration with `extra`:
    /// where a test of what comes after ADD starts. The node, the container, the configuration
    /// and ADD's result.
    pub fn attached(id: &str, extra: Value) -> (FakeHost, tweed_netlink::Fake, NetConf, Value) {
        let host = FakeHost::new();
        let ctr = host.add_container(C1);
        let c = conf("1.0.0", extra);
        let r = add(&host, id, C1, &c);
        (host, ctr, c, r)
    }

    #[test]
    fn verbs_newer_than_the_configuration_are_refused_with_code_1() {
        let host = FakeHost::new();
        for (verb, old, need) in [
            ("CHECK", "0.3.1", "0.4.0"),
            ("GC", "1.0.0", "1.1.0"),
            ("STATUS", "1.0.0", "1.1.0"),
        ] {
            let e = run(
                &host,
                &env(verb, "c1", "/run/netns/c1"),
                &conf(old, json!({})),
            )
            .unwrap_err();
            assert_eq!(e.code(), 1, "{verb}: {e}");
            assert!(
                e.to_string()
                    .contains(&format!("{verb} needs cniVersion {need}")),
                "{e}"
            );
        }
    }

    #[test]
    fn status_is_ready_with_a_usable_subnet_env_only() {
        let host = FakeHost::new();
        let st = || run(&host, &env("STATUS", "", ""), &conf("1.1.0", json!({})));
        assert_eq!(st().unwrap(), None);
        *host.subnet_env.borrow_mut() = None;
        let e = st().unwrap_err();
        assert_eq!(e.code(), 11);
        assert!(e.to_string().contains("/fake/subnet.env is missing"), "{e}");
        *host.subnet_env.borrow_mut() = Some("TWEED_NETWORK=10.244.0.0/16\n".into());
        assert_eq!(st().unwrap_err().code(), 7);
        // A configured range outside the node subnet: the pool is unusable.
        *host.subnet_env.borrow_mut() = FakeHost::new().subnet_env.take();
        let outside = conf("1.1.0", json!({"rangeStart": "10.244.9.1"}));
        let e = run(&host, &env("STATUS", "", ""), &outside).unwrap_err();
        assert!(e.to_string().contains("rangeStart 10.244.9.1"), "{e}");
        // `ranges` asking for IPv6 on a node whose lease has none: not ready for it.
        let dual = conf(
            "1.1.0",
            json!({"ranges": [[{"subnet": "10.244.7.0/24"}], [{"subnet": "fd00:10:244:7::/64"}]]}),
        );
        let e = run(&host, &env("STATUS", "", ""), &dual).unwrap_err();
        assert!(e.to_string().contains("no IPv6 subnet"), "{e}");
        *host.subnet_env.borrow_mut() = Some(crate::host::fake::DUAL_SUBNET_ENV.into());
        assert_eq!(run(&host, &env("STATUS", "", ""), &dual).unwrap(), None);
        // An IPv6-only node: ready for subnet.env's family; not for `ranges` asking for IPv4.
        *host.subnet_env.borrow_mut() = Some(crate::host::fake::V6_ONLY_SUBNET_ENV.into());
        assert_eq!(st().unwrap(), None);
        let e = run(&host, &env("STATUS", "", ""), &dual).unwrap_err();
        assert!(e.to_string().contains("no IPv4 subnet"), "{e}");
    }

    #[test]
    fn version_answers_in_the_configurations_version() {
        let host = FakeHost::new();
        let out = run(&host, &env("VERSION", "", ""), &conf("0.4.0", json!({})))
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["supportedVersions"].as_array().unwrap().len(), 5);
        // Nothing was touched.
        assert!(host.kernel.ops().is_empty() && host.records().is_empty());
    }
}
