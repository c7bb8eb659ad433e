//! tweed's CNI plugin: what flannel + bridge + host-local do as three binaries, in one.
//!
//! * [`env`], [`conf`]: the `CNI_*` variables and the configuration on stdin.
//! * [`attachment`]: `(containerID, ifname)`, what holds an address or a device.
//! * [`node`]: the node's subnet, gateway and MTU from subnet.env.
//! * [`ipam`]: addresses from the node subnet, on disk under a lock (host-local's layout).
//! * [`plan`]: names, ownership marks and the netlink ops of an attachment (pure).
//! * [`result`], [`version`]: results and version answers in every supported spec version.
//! * [`cmd`]: the verbs, thin drivers over the above.
//! * [`host`]: every side effect of a verb behind one seam (real, and fake in tests).
//! * [`masq`]: the `ipMasq` iptables rule.
//! * [`detach`]: DEL's link delete that returns once the devices are unlisted.
//! * [`code`], [`error`]: CNI error codes, and the error document on stdout.
//!
//! [`main`] is the whole binary: it reads the environment and stdin and prints one JSON document
//! (a result, a version answer or an error) or nothing.

pub mod attachment;
pub mod cmd;
pub mod code;
pub mod conf;
pub mod detach;
pub mod env;
pub mod error;
pub mod host;
pub mod ipam;
pub mod masq;
pub mod node;
pub mod plan;
pub mod result;
pub mod version;

use crate::cmd::VerbError;
use crate::conf::NetConf;
use crate::env::{CniEnv, Command};
use crate::error::{Error, ErrorDoc};
use crate::host::{Host, RealHost};

/// What to print on stdout and the exit code.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub stdout: Option<String>,
    pub code: i32,
}

/// One invocation on this machine: environment through `get`, configuration `stdin`.
pub fn main(get: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Reply {
    main_with(&RealHost, get, stdin)
}

/// One invocation on `host`.
pub fn main_with<H: Host>(host: &H, get: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Reply {
    // The version errors are reported in: the configuration's, when it says one we speak.
    let raw_version = serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(|s| s.as_str())
                .map(str::to_string)
        })
        .filter(|v| version::Version::is_supported(v))
        .unwrap_or_else(|| version::LATEST.to_string());
    let fail = |e: &Error| Reply {
        stdout: Some(ErrorDoc::new(&raw_version, e).to_json()),
        code: 1,
    };
    let env = match CniEnv::from_lookup(&get) {
        Ok(e) => e,
        Err(e) => return fail(&e.into()),
    };
    if env.command == Command::Version {
        return Reply {
            stdout: Some(version::version_doc(&raw_version)),
            code: 0,
        };
    }
    let conf = match NetConf::parse(stdin) {
        Ok(c) => c,
        Err(e) => return fail(&e.into()),
    };
    match cmd::run(host, &env, &conf) {
        Ok(out) => Reply {
            stdout: out,
            code: 0,
        },
        Err(e)
            if env.command == Command::Status
                && !matches!(e, Error::Verb(VerbError::NeedsVersion { .. })) =>
        {
            Reply {
                stdout: Some(ErrorDoc::not_available(&conf.cni_version, e.to_string()).to_json()),
                code: 1,
            }
        }
        Err(e) => Reply {
            stdout: Some(ErrorDoc::new(&conf.cni_version, &e).to_json()),
            code: 1,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn call(vars: &[(&str, &str)], stdin: &str) -> (i32, serde_json::Value) {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let r = main(|k| m.get(k).cloned(), stdin.as_bytes());
        let doc = r
            .stdout
            .as_deref()
            .map(|s| serde_json::from_str(s).expect("one JSON document"))
            .unwrap_or(serde_json::Value::Null);
        (r.code, doc)
    }

    #[test]
    fn version_needs_no_config() {
        let (code, doc) = call(&[("CNI_COMMAND", "VERSION")], "");
        assert_eq!(code, 0);
        assert_eq!(doc["cniVersion"], version::LATEST);
        let (_, doc) = call(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"0.4.0"}"#);
        assert_eq!(doc["cniVersion"], "0.4.0");
    }

    #[test]
    fn errors_are_json_with_codes_and_the_callers_version() {
        let (code, doc) = call(&[], "{}");
        assert_eq!((code, doc["code"].as_u64()), (1, Some(4)));
        let add = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
        ];
        let (_, doc) = call(&add, "{oops");
        assert_eq!(doc["code"], 6);
        let missing =
            r#"{"cniVersion":"0.3.1","name":"n","subnetFile":"/nonexistent/tweed/subnet.env"}"#;
        let (_, doc) = call(&add, missing);
        assert_eq!(doc["code"], 11);
        assert_eq!(doc["cniVersion"], "0.3.1");
        assert!(doc["msg"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/tweed/subnet.env"));
    }

    #[test]
    fn status_says_not_available_with_code_50() {
        let conf =
            r#"{"cniVersion":"1.1.0","name":"n","subnetFile":"/nonexistent/tweed/subnet.env"}"#;
        let (code, doc) = call(&[("CNI_COMMAND", "STATUS")], conf);
        assert_eq!((code, doc["code"].as_u64()), (1, Some(50)));
        let old = r#"{"cniVersion":"1.0.0","name":"n"}"#;
        let (_, doc) = call(&[("CNI_COMMAND", "STATUS")], old);
        assert_eq!(doc["code"], 1);
    }

    /// The whole path from environment and stdin to the reply, on a fake node.
    fn call_on(host: &host::fake::FakeHost, vars: &[(&str, &str)], stdin: &str) -> Reply {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        main_with(host, |k| m.get(k).cloned(), stdin.as_bytes())
    }

    #[test]
    fn a_verb_replies_with_one_document_or_nothing_and_its_code() {
        let host = host::fake::FakeHost::new();
        host.add_container("/run/netns/c1");
        let vars = |verb| {
            [
                ("CNI_COMMAND", verb),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_NETNS", "/run/netns/c1"),
                ("CNI_IFNAME", "eth0"),
            ]
        };
        let conf = format!(
            r#"{{"cniVersion":"0.4.0","name":"n","subnetFile":"{}"}}"#,
            host::fake::SUBNET_FILE
        );
        let add = call_on(&host, &vars("ADD"), &conf);
        assert_eq!(add.code, 0);
        let doc: serde_json::Value = serde_json::from_str(add.stdout.as_deref().unwrap()).unwrap();
        assert_eq!(doc["cniVersion"], "0.4.0");
        assert_eq!(doc["ips"][0]["address"], "10.244.7.2/24");
        // The same attachment again: the kernel refuses the second pair.
        let again = call_on(&host, &vars("ADD"), &conf);
        assert_eq!(again.code, 1);
        let doc: serde_json::Value =
            serde_json::from_str(again.stdout.as_deref().unwrap()).unwrap();
        assert_eq!(
            (doc["code"].as_u64(), &doc["cniVersion"]),
            (Some(100), &"0.4.0".into())
        );
        assert!(
            doc["msg"].as_str().unwrap().contains("already exists"),
            "{doc}"
        );
        assert_eq!(doc["details"], "tweed: kernel refused a network change");
        let del = call_on(&host, &vars("DEL"), &conf);
        assert_eq!(
            del,
            Reply {
                stdout: None,
                code: 0
            }
        );
        // STATUS of a node whose agent is not up: code 50, not 11.
        *host.subnet_env.borrow_mut() = None;
        let status = conf.replace("0.4.0", "1.1.0");
        let st = call_on(&host, &[("CNI_COMMAND", "STATUS")], &status);
        let doc: serde_json::Value = serde_json::from_str(st.stdout.as_deref().unwrap()).unwrap();
        assert_eq!((st.code, doc["code"].as_u64()), (1, Some(50)));
    }
}
