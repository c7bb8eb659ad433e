//! The CNI protocol as a container runtime speaks it: a host's network configuration list, and
//! ADD/DEL calls of the tweed plugin run inside the host namespace.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ipnetwork::{Ipv4Network, Ipv6Network};
use serde_json::{json, Value};

use crate::cmd;
use crate::names;
use crate::netns;

/// The CNI network name, also the IPAM directory under `dataDir`.
pub const CNI_NETWORK: &str = "tweed";
pub const CNI_VERSION: &str = "1.0.0";
/// Where a host's conflist lives, under its `hosts/hN/` directory.
pub const CONFLIST: &str = "net.d/10-tweed.conflist";

/// A failed CNI call: what the plugin said (its JSON error on stdout) and where.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("could not run the CNI plugin `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("CNI {verb} of {target} failed: {msg}")]
    Failed {
        verb: &'static str,
        /// `<container> (netns <pod ns>) in host netns <host ns>`
        target: String,
        /// The exit status and the plugin's error `code` and `msg`, else its raw output.
        msg: String,
    },
    #[error("CNI ADD of {container}: the result has no address: {result}")]
    NoAddress { container: String, result: String },
    #[error("CNI configuration list {}: {reason}", path.display())]
    Conflist { path: PathBuf, reason: String },
}

/// A host's network configuration list, as `/etc/cni/net.d/10-tweed.conflist` would hold it.
pub fn conflist(subnet_file: &Path, data_dir: &Path) -> Value {
    json!({
        "cniVersion": CNI_VERSION,
        "name": CNI_NETWORK,
        "plugins": [{
            "type": "tweed",
            "subnetFile": subnet_file,
            "dataDir": data_dir,
        }],
    })
}

/// What a runtime sends the first plugin of `list` on stdin: the plugin's entry plus the list's
/// `name` and `cniVersion`.
pub fn plugin_conf(list: &Value) -> Value {
    let mut conf = list["plugins"][0].clone();
    if let Some(o) = conf.as_object_mut() {
        o.insert("name".into(), list["name"].clone());
        o.insert("cniVersion".into(), list["cniVersion"].clone());
    }
    conf
}

/// The first plugin's configuration from the conflist file at `path`, as a runtime sends it.
pub fn read_plugin_conf(path: &Path) -> Result<Value, CniError> {
    let bad = |reason: String| CniError::Conflist {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let list: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    Ok(plugin_conf(&list))
}

/// One CNI call's parameters (the `CNI_*` variables).
#[derive(Debug, Clone)]
pub struct CniCall<'a> {
    pub plugin: &'a Path,
    /// `CNI_PATH`
    pub cni_path: &'a Path,
    /// The namespace that plays the host: the plugin runs inside it.
    pub host_ns: &'a str,
    pub container_id: &'a str,
    /// The pod's namespace name (`CNI_NETNS=/run/netns/<it>`).
    pub pod_ns: &'a str,
    /// The plugin's configuration (stdin).
    pub conf: &'a Value,
}

impl CniCall<'_> {
    fn command(&self, verb: &str, netns_path: &str) -> Command {
        let mut c = netns::exec_command(self.host_ns, &[self.plugin]);
        c.env("CNI_COMMAND", verb)
            .env("CNI_CONTAINERID", self.container_id)
            .env("CNI_NETNS", netns_path)
            .env("CNI_IFNAME", names::POD_IFACE)
            .env("CNI_PATH", self.cni_path)
            .env_remove("CNI_ARGS")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    fn run(&self, verb: &'static str, netns_path: &str) -> Result<String, CniError> {
        let mut c = self.command(verb, netns_path);
        let spawn_err = |c: &Command, source| CniError::Spawn {
            command: cmd::display(c),
            source,
        };
        let mut child = c.spawn().map_err(|e| spawn_err(&c, e))?;
        let input = self.conf.to_string();
        if let Some(mut stdin) = child.stdin.take() {
            // A plugin that exits without reading gives EPIPE here; its output says why.
            let _ = stdin.write_all(input.as_bytes());
        }
        let out = child.wait_with_output().map_err(|e| spawn_err(&c, e))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            return Ok(stdout);
        }
        let msg = match serde_json::from_str::<Value>(&stdout) {
            Ok(v) if v.get("msg").is_some() => format!(
                "code {}: {}",
                v["code"],
                v["msg"].as_str().unwrap_or_default()
            ),
            _ => format!(
                "{} {}",
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
            .trim()
            .to_string(),
        };
        Err(CniError::Failed {
            verb,
            target: format!(
                "{} (netns {}) in host netns {}",
                self.container_id, self.pod_ns, self.host_ns
            ),
            msg: format!("({}) {msg}", out.status),
        })
    }
}

/// The addresses of a CNI result, one per family at most (the first of each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CniAddrs {
    pub ipv4: Option<Ipv4Network>,
    pub ipv6: Option<Ipv6Network>,
}

/// CNI ADD: the plugin attaches the (existing) pod namespace; returns the pod's addresses (an
/// IPv4-only node's pod has no IPv6 one, an IPv6-only node's no IPv4 one).
pub fn cni_add(call: &CniCall<'_>) -> Result<CniAddrs, CniError> {
    let out = cni_add_result(call)?;
    let addrs = result_addrs(&out);
    if addrs.ipv4.is_none() && addrs.ipv6.is_none() {
        return Err(CniError::NoAddress {
            container: call.container_id.into(),
            result: out.trim().to_string(),
        });
    }
    Ok(addrs)
}

/// ADD, returning the plugin's result as it printed it (for callers that need more than the
/// addresses).
pub fn cni_add_result(call: &CniCall<'_>) -> Result<String, CniError> {
    call.run("ADD", &format!("/run/netns/{}", call.pod_ns))
}

/// CNI DEL (idempotent; an empty `CNI_NETNS` when the pod namespace is gone).
pub fn cni_del(call: &CniCall<'_>) -> Result<(), CniError> {
    let path = Path::new("/run/netns").join(call.pod_ns);
    let netns_path = if path.exists() {
        path.display().to_string()
    } else {
        String::new()
    };
    call.run("DEL", &netns_path).map(|_| ())
}

/// The first IPv4 address of a CNI result (`ips[].address`, e.g. `10.244.3.2/24`).
pub fn result_ipv4(result: &str) -> Option<Ipv4Network> {
    result_addrs(result).ipv4
}

/// The first address of each family in a CNI result's `ips[].address`; none of either when the
/// result is not JSON.
pub fn result_addrs(result: &str) -> CniAddrs {
    let v: Value = serde_json::from_str(result).unwrap_or_default();
    let addrs: Vec<&str> = v
        .get("ips")
        .and_then(Value::as_array)
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| ip.get("address")?.as_str())
                .collect()
        })
        .unwrap_or_default();
    CniAddrs {
        ipv4: addrs.iter().find_map(|a| a.parse().ok()),
        ipv6: addrs.iter().find_map(|a| a.parse().ok()),
    }
}

/// `CNI_PATH` for the lab: `<dir>/tweed`, a link to the plugin, so that a plugin file not named
/// `tweed` still answers to `"type": "tweed"`.
pub fn cni_bin_dir(dir: &Path, plugin: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let link = dir.join("tweed");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(plugin, &link)?;
    Ok(dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflist_and_plugin_conf_are_what_a_runtime_sends() {
        let list = conflist(
            Path::new("/lab/hosts/h1/subnet.env"),
            Path::new("/lab/hosts/h1/ipam"),
        );
        assert_eq!(
            list,
            json!({"cniVersion":"1.0.0","name":"tweed","plugins":[{"type":"tweed",
                "subnetFile":"/lab/hosts/h1/subnet.env","dataDir":"/lab/hosts/h1/ipam"}]})
        );
        assert_eq!(
            plugin_conf(&list),
            json!({"cniVersion":"1.0.0","name":"tweed","type":"tweed",
                "subnetFile":"/lab/hosts/h1/subnet.env","dataDir":"/lab/hosts/h1/ipam"})
        );
    }

    #[test]
    fn a_conflist_file_is_read_or_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("10-tweed.conflist");
        let list = conflist(Path::new("/s.env"), Path::new("/ipam"));
        std::fs::write(&path, list.to_string()).unwrap();
        assert_eq!(read_plugin_conf(&path).unwrap(), plugin_conf(&list));
        std::fs::write(&path, "{").unwrap();
        let e = read_plugin_conf(&path).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(read_plugin_conf(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn result_address_is_parsed() {
        let r = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"cni0"}],
            "ips":[{"address":"10.244.3.2/24","gateway":"10.244.3.1","interface":2}]}"#;
        assert_eq!(result_ipv4(r).unwrap().to_string(), "10.244.3.2/24");
        assert_eq!(result_ipv4(r#"{"ips":[]}"#), None);
        assert_eq!(result_ipv4("not json"), None);
        // Dual stack, either order; IPv6 only.
        let dual = r#"{"ips":[{"address":"fd00:10:244:3::2/64"},{"address":"10.244.3.2/24"}]}"#;
        let a = result_addrs(dual);
        assert_eq!(a.ipv4.unwrap().to_string(), "10.244.3.2/24");
        assert_eq!(a.ipv6.unwrap().to_string(), "fd00:10:244:3::2/64");
        let v6 = result_addrs(
            r#"{"ips":[{"address":"fd00:10:244:3::2/64","gateway":"fd00:10:244:3::1"}]}"#,
        );
        assert_eq!(v6.ipv4, None);
        assert_eq!(v6.ipv6.unwrap().to_string(), "fd00:10:244:3::2/64");
        let none = result_addrs(r#"{"ips":[{"address":"junk"}]}"#);
        assert_eq!((none.ipv4, none.ipv6), (None, None));
    }
}
