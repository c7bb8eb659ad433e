//! A CNI client (spec 1.0/1.1): runs the plugins of a network configuration list with the
//! container's namespace, chaining `prevResult` through ADD and deleting in reverse order.
//!
//! Plugins run with the process's namespaces, or in `host_netns` when set (a lab "host").

#[cfg(test)]
use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
#[cfg(test)]
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("CNI config {path}: {what}")]
    Config { path: PathBuf, what: String },
    #[error("CNI plugin {plugin:?} not found in {dirs}")]
    NotFound { plugin: String, dirs: String },
    #[error("running CNI plugin {plugin}: {source}")]
    Exec { plugin: String, source: io::Error },
    #[error("CNI plugin {plugin} {command} failed (code {code}): {msg}{details}")]
    Plugin {
        plugin: String,
        command: String,
        code: i64,
        msg: String,
        details: String,
    },
    #[error("CNI plugin {plugin} returned an unreadable result: {what}")]
    BadResult { plugin: String, what: String },
}

/// A network configuration list (`.conflist`, or a single-plugin `.conf`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkList {
    pub name: String,
    pub cni_version: String,
    pub plugins: Vec<Map<String, Value>>,
}

impl NetworkList {
    pub fn parse(text: &str, path: &Path) -> Result<NetworkList, CniError> {
        let bad = |what: String| CniError::Config {
            path: path.to_path_buf(),
            what,
        };
        let v: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad("not a JSON object".into()))?;
        let name = obj
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("missing \"name\"".into()))?
            .to_string();
        let cni_version = obj
            .get("cniVersion")
            .and_then(Value::as_str)
            .unwrap_or("1.0.0")
            .to_string();
        let plugins: Vec<Map<String, Value>> = match obj.get("plugins") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|p| {
                    p.as_object()
                        .cloned()
                        .ok_or_else(|| bad("a plugin is not an object".into()))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(bad("\"plugins\" is not a list".into())),
            None if obj.contains_key("type") => vec![obj.clone()],
            None => return Err(bad("no \"plugins\" and no \"type\"".into())),
        };
        if plugins.is_empty() {
            return Err(bad("empty \"plugins\"".into()));
        }
        for p in &plugins {
            if p.get("type")
                .and_then(Value::as_str)
                .is_none_or(|t| t.is_empty() || t.contains('/'))
            {
                return Err(bad("a plugin has no valid \"type\"".into()));
            }
        }
        Ok(NetworkList {
            name,
            cni_version,
            plugins,
        })
    }

    pub fn load(path: &Path) -> Result<NetworkList, CniError> {
        let text = std::fs::read_to_string(path).map_err(|e| CniError::Config {
            path: path.to_path_buf(),
            what: e.to_string(),
        })?;
        Self::parse(&text, path)
    }
}

/// One container interface: what CNI calls an attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
}

/// The stdin config for plugin `i` of `list`.
pub fn plugin_config(list: &NetworkList, i: usize, prev: Option<&Value>) -> Value {
    let mut c = list.plugins[i].clone();
    c.insert("name".into(), Value::String(list.name.clone()));
    c.insert("cniVersion".into(), Value::String(list.cni_version.clone()));
    c.remove("prevResult");
    if let Some(p) = prev {
        c.insert("prevResult".into(), p.clone());
    }
    Value::Object(c)
}

/// `1.1.0` -> (1, 1, 0).
pub fn version_tuple(v: &str) -> (u32, u32, u32) {
    let mut it = v.split('.').map(|p| p.parse().unwrap_or(0));
    (
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
    )
}

/// Addresses (without prefix length) in a CNI result, of both families (a dual-stack
/// attachment has one of each), in the result's order, each once. They end up in the
/// container's `/etc/hosts` and in `inspect`, so only what parses as an IP address is kept:
/// text a broken or hostile plugin puts there (a newline and a second hosts line, say) is not.
pub fn result_ips(result: &Value) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let ips = result.get("ips").and_then(Value::as_array);
    for s in ips
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.get("address")?.as_str())
    {
        let (addr, prefix) = s.split_once('/').unwrap_or((s, ""));
        let Ok(ip) = addr.parse::<std::net::IpAddr>() else {
            continue;
        };
        let max = if ip.is_ipv4() { 32 } else { 128 };
        if !prefix.is_empty() && prefix.parse::<u8>().map_or(true, |p| p > max) {
            continue;
        }
        let text = ip.to_string();
        if !out.contains(&text) {
            out.push(text);
        }
    }
    out
}

/// (nameservers, search) from a CNI result's `dns`.
pub fn result_dns(result: &Value) -> (Vec<String>, Vec<String>) {
    let list = |k: &str| -> Vec<String> {
        result
            .get("dns")
            .and_then(|d| d.get(k))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    (list("nameservers"), list("search"))
}

/// What a plugin invocation produced.
#[derive(Debug, Clone)]
pub struct Output {
    pub success: bool,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Runs plugin binaries.
pub trait PluginExec {
    fn run(&self, plugin: &str, env: &[(String, String)], stdin: &[u8])
        -> Result<Output, CniError>;
}

/// Executes real plugin binaries found in `path`.
#[derive(Debug, Clone)]
pub struct RealExec {
    pub path: Vec<PathBuf>,
    pub host_netns: Option<PathBuf>,
}

impl PluginExec for RealExec {
    fn run(
        &self,
        plugin: &str,
        env: &[(String, String)],
        stdin: &[u8],
    ) -> Result<Output, CniError> {
        let bin = self
            .path
            .iter()
            .map(|d| d.join(plugin))
            .find(|p| p.is_file())
            .ok_or_else(|| CniError::NotFound {
                plugin: plugin.to_string(),
                dirs: self
                    .path
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":"),
            })?;
        let eerr = |source| CniError::Exec {
            plugin: plugin.to_string(),
            source,
        };
        let mut cmd = Command::new(&bin);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CNI_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let ns = match &self.host_netns {
            Some(p) => Some(std::fs::File::open(p).map_err(eerr)?),
            None => None,
        };
        if let Some(f) = &ns {
            let fd = f.as_raw_fd();
            // SAFETY: setns is async-signal-safe; fd stays open until spawn returns.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().map_err(eerr)?;
        if let Some(mut si) = child.stdin.take() {
            // A plugin may exit without reading its config (VERSION): ignore EPIPE.
            let _ = si.write_all(stdin);
        }
        let out = child.wait_with_output().map_err(eerr)?;
        Ok(Output {
            success: out.status.success(),
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }
}

/// Scripted plugins for unit tests: records every call (also in `journal`, as
/// `cni <COMMAND> <plugin>`) and answers from a queue (default: `{}`).
#[cfg(test)]
#[derive(Debug, Default)]
pub struct FakeExec {
    pub calls: Mutex<Vec<(String, String, Value)>>,
    pub answers: Mutex<VecDeque<Output>>,
    pub journal: crate::journal::Journal,
}

#[cfg(test)]
impl PluginExec for FakeExec {
    fn run(
        &self,
        plugin: &str,
        env: &[(String, String)],
        stdin: &[u8],
    ) -> Result<Output, CniError> {
        let command = env
            .iter()
            .find(|(k, _)| k == "CNI_COMMAND")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let conf: Value = serde_json::from_slice(stdin).unwrap_or(Value::Null);
        self.journal.note(format!("cni {command} {plugin}"));
        self.calls
            .lock()
            .unwrap()
            .push((plugin.to_string(), command, conf));
        Ok(self.answers.lock().unwrap().pop_front().unwrap_or(Output {
            success: true,
            stdout: b"{\"cniVersion\":\"1.0.0\"}".to_vec(),
            stderr: vec![],
        }))
    }
}

/// Enum dispatch over plugin runners.
#[derive(Debug)]
pub enum Exec {
    Real(RealExec),
    #[cfg(test)]
    Fake(FakeExec),
}

impl PluginExec for Exec {
    fn run(
        &self,
        plugin: &str,
        env: &[(String, String)],
        stdin: &[u8],
    ) -> Result<Output, CniError> {
        match self {
            Exec::Real(r) => r.run(plugin, env, stdin),
            #[cfg(test)]
            Exec::Fake(f) => f.run(plugin, env, stdin),
        }
    }
}

/// The client.
#[derive(Debug)]
pub struct Cni {
    pub exec: Exec,
    /// Passed to plugins as CNI_PATH (for delegated IPAM plugins).
    pub path: Vec<PathBuf>,
}

impl Cni {
    pub fn real(path: Vec<PathBuf>, host_netns: Option<PathBuf>) -> Cni {
        Cni {
            exec: Exec::Real(RealExec {
                path: path.clone(),
                host_netns,
            }),
            path,
        }
    }

    fn env(&self, command: &str, att: Option<&Attachment>) -> Vec<(String, String)> {
        let mut e = vec![
            ("CNI_COMMAND".to_string(), command.to_string()),
            (
                "CNI_PATH".to_string(),
                self.path
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":"),
            ),
        ];
        if let Some(a) = att {
            e.push(("CNI_CONTAINERID".into(), a.container_id.clone()));
            e.push(("CNI_NETNS".into(), a.netns.display().to_string()));
            e.push(("CNI_IFNAME".into(), a.ifname.clone()));
        }
        e
    }

    fn invoke(
        &self,
        list: &NetworkList,
        i: usize,
        command: &str,
        att: Option<&Attachment>,
        conf: &Value,
    ) -> Result<Option<Value>, CniError> {
        let plugin = list.plugins[i]
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let out = self.exec.run(
            &plugin,
            &self.env(command, att),
            conf.to_string().as_bytes(),
        )?;
        if !out.success {
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            let msg = v
                .get("msg")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).trim().to_string());
            let details = v
                .get("details")
                .and_then(Value::as_str)
                .filter(|d| !d.is_empty())
                .map(|d| format!(" ({d})"))
                .unwrap_or_default();
            return Err(CniError::Plugin {
                plugin,
                command: command.to_string(),
                code: v.get("code").and_then(Value::as_i64).unwrap_or(-1),
                msg,
                details,
            });
        }
        if out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        serde_json::from_slice(&out.stdout)
            .map(Some)
            .map_err(|e| CniError::BadResult {
                plugin,
                what: e.to_string(),
            })
    }

    /// ADD through every plugin, each getting the previous one's result. On failure the
    /// plugins are DELeted again (reverse order) so nothing is left, and the error returned.
    pub fn add(&self, list: &NetworkList, att: &Attachment) -> Result<Value, CniError> {
        let mut prev: Option<Value> = None;
        for i in 0..list.plugins.len() {
            let conf = plugin_config(list, i, prev.as_ref());
            match self.invoke(list, i, "ADD", Some(att), &conf) {
                Ok(Some(r)) => prev = Some(r),
                Ok(None) => {
                    return Err(CniError::BadResult {
                        plugin: list.plugins[i]
                            .get("type")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string(),
                        what: "empty result from ADD".into(),
                    })
                }
                Err(e) => {
                    let _ = self.del(list, att, prev.as_ref());
                    return Err(e);
                }
            }
        }
        Ok(prev.unwrap_or(Value::Null))
    }

    /// DEL through every plugin in reverse order with the cached result. Every plugin is
    /// called even if one fails; the first error is returned.
    pub fn del(
        &self,
        list: &NetworkList,
        att: &Attachment,
        cached: Option<&Value>,
    ) -> Result<(), CniError> {
        let mut first = None;
        for i in (0..list.plugins.len()).rev() {
            let conf = plugin_config(list, i, cached);
            if let Err(e) = self.invoke(list, i, "DEL", Some(att), &conf) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// CHECK (spec >= 0.4.0) through every plugin.
    pub fn check(
        &self,
        list: &NetworkList,
        att: &Attachment,
        cached: &Value,
    ) -> Result<(), CniError> {
        for i in 0..list.plugins.len() {
            let conf = plugin_config(list, i, Some(cached));
            self.invoke(list, i, "CHECK", Some(att), &conf)?;
        }
        Ok(())
    }

    /// GC (spec >= 1.1.0): every plugin releases what is not in `valid`. Returns false when
    /// the network's version has no GC.
    pub fn gc(&self, list: &NetworkList, valid: &[Attachment]) -> Result<bool, CniError> {
        if version_tuple(&list.cni_version) < (1, 1, 0) {
            return Ok(false);
        }
        let valid: Vec<Value> = valid
            .iter()
            .map(|a| serde_json::json!({"containerID": a.container_id, "ifname": a.ifname}))
            .collect();
        for i in 0..list.plugins.len() {
            let mut conf = plugin_config(list, i, None);
            conf["cni.dev/valid-attachments"] = Value::Array(valid.clone());
            self.invoke(list, i, "GC", None, &conf)?;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = r#"{"cniVersion":"1.0.0","name":"tweed","plugins":[
        {"type":"tweed","ipam":{"type":"host-local"}},
        {"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    fn att() -> Attachment {
        Attachment {
            container_id: "c1".into(),
            netns: "/run/tweed/containers/c1/netns".into(),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn parse_lists_and_single_confs() {
        let l = NetworkList::parse(LIST, Path::new("x")).unwrap();
        assert_eq!(l.name, "tweed");
        assert_eq!(l.plugins.len(), 2);
        let single = NetworkList::parse(
            r#"{"cniVersion":"0.4.0","name":"n","type":"bridge"}"#,
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(single.plugins.len(), 1);
        assert_eq!(single.cni_version, "0.4.0");
        for bad in [
            "[]",
            r#"{"plugins":[]}"#,
            r#"{"name":"n","plugins":[]}"#,
            r#"{"name":"n","plugins":[{"type":"../evil"}]}"#,
            r#"{"name":"n"}"#,
        ] {
            assert!(NetworkList::parse(bad, Path::new("x")).is_err(), "{bad}");
        }
    }

    #[test]
    fn chaining_passes_prev_result_and_del_reverses() {
        let l = NetworkList::parse(LIST, Path::new("x")).unwrap();
        let fake = FakeExec::default();
        fake.answers.lock().unwrap().extend([
            Output {
                success: true,
                stdout: br#"{"cniVersion":"1.0.0","ips":[{"address":"10.244.1.5/24"}]}"#.to_vec(),
                stderr: vec![],
            },
            Output {
                success: true,
                stdout: br#"{"cniVersion":"1.0.0","ips":[{"address":"10.244.1.5/24"}],"dns":{"nameservers":["10.96.0.10"]}}"#.to_vec(),
                stderr: vec![],
            },
        ]);
        let cni = Cni {
            exec: Exec::Fake(fake),
            path: vec!["/opt/cni/bin".into()],
        };
        let r = cni.add(&l, &att()).unwrap();
        assert_eq!(result_ips(&r), vec!["10.244.1.5"]);
        assert_eq!(result_dns(&r).0, vec!["10.96.0.10"]);
        cni.del(&l, &att(), Some(&r)).unwrap();
        let Exec::Fake(f) = &cni.exec else { panic!() };
        let calls = f.calls.lock().unwrap();
        let seq: Vec<(&str, &str)> = calls
            .iter()
            .map(|(p, c, _)| (p.as_str(), c.as_str()))
            .collect();
        assert_eq!(
            seq,
            [
                ("tweed", "ADD"),
                ("portmap", "ADD"),
                ("portmap", "DEL"),
                ("tweed", "DEL")
            ]
        );
        assert!(calls[0].2.get("prevResult").is_none());
        assert_eq!(
            calls[1].2["prevResult"]["ips"][0]["address"],
            "10.244.1.5/24"
        );
        assert_eq!(calls[1].2["name"], "tweed");
        assert_eq!(calls[1].2["cniVersion"], "1.0.0");
        assert!(calls[2].2.get("prevResult").is_some());
    }

    #[test]
    fn failed_add_is_rolled_back_and_reports_the_plugin_error() {
        let l = NetworkList::parse(LIST, Path::new("x")).unwrap();
        let fake = FakeExec::default();
        fake.answers.lock().unwrap().extend([
            Output {
                success: true,
                stdout: br#"{"cniVersion":"1.0.0"}"#.to_vec(),
                stderr: vec![],
            },
            Output {
                success: false,
                stdout: br#"{"code":11,"msg":"port busy","details":"8080"}"#.to_vec(),
                stderr: vec![],
            },
        ]);
        let cni = Cni {
            exec: Exec::Fake(fake),
            path: vec![],
        };
        let e = cni.add(&l, &att()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "CNI plugin portmap ADD failed (code 11): port busy (8080)"
        );
        let Exec::Fake(f) = &cni.exec else { panic!() };
        let cmds: Vec<String> = f
            .calls
            .lock()
            .unwrap()
            .iter()
            .map(|c| format!("{}:{}", c.0, c.1))
            .collect();
        assert_eq!(
            cmds,
            ["tweed:ADD", "portmap:ADD", "portmap:DEL", "tweed:DEL"]
        );
    }

    #[test]
    fn gc_only_for_new_versions() {
        let old = NetworkList::parse(LIST, Path::new("x")).unwrap();
        let cni = Cni {
            exec: Exec::Fake(FakeExec::default()),
            path: vec![],
        };
        assert!(!cni.gc(&old, &[att()]).unwrap());
        let new = NetworkList::parse(&LIST.replace("1.0.0", "1.1.0"), Path::new("x")).unwrap();
        assert!(cni.gc(&new, &[att()]).unwrap());
        let Exec::Fake(f) = &cni.exec else { panic!() };
        let calls = f.calls.lock().unwrap();
        assert_eq!(calls[0].1, "GC");
        assert_eq!(
            calls[0].2["cni.dev/valid-attachments"][0]["containerID"],
            "c1"
        );
    }

    #[test]
    fn real_exec_reports_missing_plugins() {
        let r = RealExec {
            path: vec!["/nonexistent".into()],
            host_netns: None,
        };
        assert!(matches!(
            r.run("bridge", &[], b"{}"),
            Err(CniError::NotFound { .. })
        ));
        assert_eq!(version_tuple("1.1.0"), (1, 1, 0));
        assert!(version_tuple("0.4.0") < (1, 1, 0));
    }

    /// A dual-stack result from the tweed plugin, in 1.x and in 0.4.0 (`version` per IP): both
    /// addresses, and the init layer's `/etc/hosts` names the hostname at each.
    #[test]
    fn dual_stack_results_give_both_addresses_to_hosts() {
        for r in [
            serde_json::json!({"cniVersion":"1.1.0","ips":[
                {"address":"10.244.7.2/24","gateway":"10.244.7.1","interface":2},
                {"address":"fd00:10:244:7::2/64","gateway":"fd00:10:244:7::1","interface":2}]}),
            serde_json::json!({"cniVersion":"0.4.0","ips":[
                {"version":"4","address":"10.244.7.2/24","interface":2},
                {"version":"6","address":"fd00:10:244:7:0::2/64","interface":2}]}),
        ] {
            let ips = result_ips(&r);
            assert_eq!(ips, ["10.244.7.2", "fd00:10:244:7::2"], "{r}");
            let hosts = crate::rootfs::render_hosts("web", &ips);
            assert!(hosts.contains("\n10.244.7.2\tweb\n"), "{hosts}");
            assert!(hosts.ends_with("\nfd00:10:244:7::2\tweb\n"), "{hosts}");
            // The usual IPv6 localhost lines stay.
            assert!(
                hosts.contains("::1\tlocalhost ip6-localhost ip6-loopback\n"),
                "{hosts}"
            );
            assert!(hosts.contains("ff02::2\tip6-allrouters\n"), "{hosts}");
        }
    }

    /// An IPv6-only node's result: the one IPv6 address, and `/etc/hosts` names the hostname
    /// at it and at no IPv4 address.
    #[test]
    fn ipv6_only_results_give_the_ipv6_address_to_hosts() {
        let r = serde_json::json!({"cniVersion":"1.1.0","ips":[
            {"address":"fd00:10:244:7::2/64","gateway":"fd00:10:244:7::1","interface":2}]});
        let ips = result_ips(&r);
        assert_eq!(ips, ["fd00:10:244:7::2"]);
        let hosts = crate::rootfs::render_hosts("web", &ips);
        assert!(hosts.ends_with("\nfd00:10:244:7::2\tweb\n"), "{hosts}");
        assert_eq!(hosts.matches("\tweb").count(), 1, "{hosts}");
    }

    /// What a broken or hostile plugin puts in `ips` never reaches `/etc/hosts` as text.
    #[test]
    fn crafted_result_addresses_are_dropped() {
        let r = serde_json::json!({"ips":[
            {"address":"10.1.0.5/24\n0.0.0.0 bank.example"},
            {"address":"bank.example"},
            {"address":"10.1.0.6/33"},
            {"address":"fd00::6/129"},
            {"address":"fd00::7/x"},
            {"address":""},
            {"address":42},
            {"noaddress":"10.1.0.8"},
            "10.1.0.9",
            {"address":"10.1.0.10"},
            {"address":"10.1.0.10/24"},
            {"address":"FD00::0:11/64"}
        ]});
        assert_eq!(result_ips(&r), ["10.1.0.10", "fd00::11"]);
        assert!(result_ips(&serde_json::json!({"ips":"10.1.0.5"})).is_empty());
        assert!(result_ips(&serde_json::json!([1, 2])).is_empty());
    }
}
