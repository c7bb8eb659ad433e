//! The `CNI_*` environment variables, parsed and checked per verb.

use std::net::Ipv4Addr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("CNI_COMMAND is not set (expected ADD, DEL, CHECK, VERSION, STATUS or GC)")]
    NoCommand,
    #[error(
        "CNI_COMMAND={0:?} is not a CNI verb (expected ADD, DEL, CHECK, VERSION, STATUS or GC)"
    )]
    UnknownCommand(String),
    #[error("{verb} needs {var}, which is not set or empty")]
    Missing {
        verb: &'static str,
        var: &'static str,
    },
    #[error("{var}={value:?}: {reason}")]
    Invalid {
        var: &'static str,
        value: String,
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub fn parse(s: &str) -> Result<Command, EnvError> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            other => return Err(EnvError::UnknownCommand(other.to_string())),
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        }
    }
}

/// What `CNI_ARGS` may carry that tweed uses; other keys (`K8S_POD_NAME`, `IgnoreUnknown`, ...)
/// are accepted and ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    /// `IP=a.b.c.d`: the address to give, as host-local takes it.
    pub ip: Option<Ipv4Addr>,
}

impl CniArgs {
    /// `KEY=VALUE;KEY=VALUE`, empty allowed.
    pub fn parse(s: &str) -> Result<CniArgs, EnvError> {
        let invalid = |reason: String| EnvError::Invalid {
            var: "CNI_ARGS",
            value: s.to_string(),
            reason,
        };
        let mut args = CniArgs::default();
        for pair in s.split(';').filter(|p| !p.trim().is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| invalid(format!("{pair:?} is not KEY=VALUE")))?;
            if k.trim() == "IP" {
                let ip = v
                    .trim()
                    .parse()
                    .map_err(|_| invalid(format!("IP={v:?} is not an IPv4 address")))?;
                args.ip = Some(ip);
            }
        }
        Ok(args)
    }
}

/// The environment of one invocation, as far as the verb needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    pub command: Command,
    pub container_id: String,
    /// Empty when the runtime passed none (allowed for DEL).
    pub netns: String,
    pub ifname: String,
    pub args: CniArgs,
    pub path: String,
}

impl CniEnv {
    /// Reads the variables through `get` (the process environment in the binary, a map in
    /// tests) and checks what `command` requires.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<CniEnv, EnvError> {
        let get = |k: &str| get(k).filter(|v| !v.is_empty());
        let command = Command::parse(&get("CNI_COMMAND").ok_or(EnvError::NoCommand)?)?;
        let env = CniEnv {
            command,
            container_id: get("CNI_CONTAINERID").unwrap_or_default(),
            netns: get("CNI_NETNS").unwrap_or_default(),
            ifname: get("CNI_IFNAME").unwrap_or_default(),
            args: CniArgs::parse(&get("CNI_ARGS").unwrap_or_default())?,
            path: get("CNI_PATH").unwrap_or_default(),
        };
        env.check()?;
        Ok(env)
    }

    fn check(&self) -> Result<(), EnvError> {
        let verb = self.command.as_str();
        let need = |var: &'static str, v: &str| {
            if v.is_empty() {
                Err(EnvError::Missing { verb, var })
            } else {
                Ok(())
            }
        };
        match self.command {
            Command::Add | Command::Check => {
                need("CNI_CONTAINERID", &self.container_id)?;
                need("CNI_NETNS", &self.netns)?;
                need("CNI_IFNAME", &self.ifname)?;
            }
            Command::Del => {
                need("CNI_CONTAINERID", &self.container_id)?;
                need("CNI_IFNAME", &self.ifname)?;
            }
            Command::Version | Command::Status | Command::Gc => return Ok(()),
        }
        validate_container_id(&self.container_id)?;
        validate_ifname(&self.ifname).map_err(|reason| EnvError::Invalid {
            var: "CNI_IFNAME",
            value: self.ifname.clone(),
            reason,
        })
    }
}

/// The spec: alphanumerics, underscore, dot and hyphen, starting with an alphanumeric.
pub fn validate_container_id(id: &str) -> Result<(), EnvError> {
    let ok = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(EnvError::Invalid {
            var: "CNI_CONTAINERID",
            value: id.to_string(),
            reason: "only letters, digits, '_', '.' and '-' are allowed, starting with a letter \
                     or digit"
                .into(),
        })
    }
}

/// What the kernel accepts as a device name.
pub fn validate_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err("a device name has 1 to 15 characters".into());
    }
    if name == "." || name == ".." {
        return Err("\".\" and \"..\" are not device names".into());
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err("a device name may not contain '/', ':' or whitespace".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<CniEnv, EnvError> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CniEnv::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn add_needs_id_netns_and_ifname() {
        let full = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc123"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web;IP=10.244.1.7"),
            ("CNI_PATH", "/opt/cni/bin"),
        ];
        let e = env(&full).unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.args.ip, Some("10.244.1.7".parse().unwrap()));
        for skip in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
            let partial: Vec<_> = full.iter().copied().filter(|(k, _)| *k != skip).collect();
            assert_eq!(
                env(&partial).unwrap_err(),
                EnvError::Missing {
                    verb: "ADD",
                    var: skip
                }
            );
        }
    }

    #[test]
    fn del_works_without_netns() {
        let e = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", ""),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap();
        assert_eq!(e.netns, "");
    }

    #[test]
    fn rejections_name_the_variable() {
        assert_eq!(env(&[]).unwrap_err(), EnvError::NoCommand);
        assert!(matches!(
            env(&[("CNI_COMMAND", "add")]).unwrap_err(),
            EnvError::UnknownCommand(_)
        ));
        // One bad variable each, which the error must name.
        let cases: [(&[(&str, &str)], &str); 3] = [
            (
                &[
                    ("CNI_COMMAND", "DEL"),
                    ("CNI_CONTAINERID", "../etc"),
                    ("CNI_IFNAME", "eth0"),
                ],
                "CNI_CONTAINERID",
            ),
            (
                &[
                    ("CNI_COMMAND", "DEL"),
                    ("CNI_CONTAINERID", "a"),
                    ("CNI_IFNAME", "a-very-long-interface-name"),
                ],
                "CNI_IFNAME",
            ),
            (
                &[("CNI_COMMAND", "VERSION"), ("CNI_ARGS", "junk")],
                "CNI_ARGS",
            ),
        ];
        for (vars, bad) in cases {
            let e = env(vars).unwrap_err();
            assert!(e.to_string().contains(bad), "{bad}: {e}");
        }
        assert!(CniArgs::parse("IP=nope").is_err());
        assert_eq!(CniArgs::parse("").unwrap(), CniArgs::default());
    }
}
