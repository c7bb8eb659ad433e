//! The lab's etcd: one member on 198.18.0.254 or a real cluster on 198.18.0.251-253, all in the
//! underlay namespace, started with the [`crate::etcd`] harness; and what fault tests do to it
//! (list the members, find the leader, kill one).

use std::net::IpAddr;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use crate::cmd::{self, CmdError};
use crate::error::LabError;
use crate::etcd::{self, EtcdError, EtcdOptions, EtcdProcess};
use crate::lab::Lab;
use crate::names::{self, Names};
use crate::netns;
use crate::state::{EtcdMemberState, EtcdState};
use crate::status::EtcdMemberStatus;

/// The options of each member (pure): `lab` alone on the bridge's address, or `etcd1..N` on the
/// cluster addresses with one `--initial-cluster`; data and logs under `dir`.
pub fn member_options(names: &Names, dir: &Path, members: usize) -> Vec<EtcdOptions> {
    let mut opts = Vec::new();
    if members <= 1 {
        let mut o = EtcdOptions::local("lab", dir.join("etcd"));
        o.listen_ip = IpAddr::V4(names::UNDERLAY_GW);
        o.log_file = Some(dir.join("etcd.log"));
        opts.push(o);
    } else {
        for m in 1..=members {
            let mut o = EtcdOptions::local(
                format!("etcd{m}"),
                dir.join("etcd").join(format!("etcd{m}")),
            );
            o.listen_ip = IpAddr::V4(names::etcd_member_ip(m));
            o.log_file = Some(dir.join(format!("etcd{m}.log")));
            opts.push(o);
        }
    }
    for o in &mut opts {
        o.netns = Some(names.underlay_ns());
        o.client_port = names::ETCD_CLIENT_PORT;
        o.peer_port = names::ETCD_PEER_PORT;
    }
    if opts.len() > 1 {
        EtcdOptions::join_as_cluster(&mut opts);
        for o in &mut opts {
            o.cluster_token = Some(format!("tweed-lab-{}", names.lab()));
        }
    }
    opts
}

/// Starts the members (detached: they outlive `tweed-lab up`); returns their state and the
/// processes, so that a `down` from the same process can reap them.
pub(crate) fn start(
    names: &Names,
    dir: &Path,
    members: usize,
    family: crate::spec::IpFamily,
) -> Result<(EtcdState, Vec<Child>), LabError> {
    let mut opts = member_options(names, dir, members);
    if family == crate::spec::IpFamily::V6 {
        // The hosts have no IPv4 address: the one member listens on the bridge's IPv6 one.
        for o in &mut opts {
            o.listen_ip = IpAddr::V6(names::segment_gateway6(0));
        }
    }
    let started = if opts.len() > 1 {
        EtcdProcess::start_cluster(opts, true)?
    } else {
        let only = opts
            .pop()
            .ok_or_else(|| LabError::Spec("no etcd members".into()))?;
        vec![EtcdProcess::start_daemon(only)?]
    };
    let members: Vec<EtcdMemberState> = started
        .iter()
        .map(|e| EtcdMemberState {
            name: e.name().to_string(),
            pid: e.pid(),
            endpoint: e.endpoints().concat(),
            data_dir: e.data_dir().to_path_buf(),
            log: e.log_file().to_path_buf(),
        })
        .collect();
    let state = EtcdState {
        pid: members[0].pid,
        endpoints: members.iter().map(|m| m.endpoint.clone()).collect(),
        data_dir: if members.len() == 1 {
            members[0].data_dir.clone()
        } else {
            dir.join("etcd")
        },
        log: members[0].log.clone(),
        members,
    };
    let children = started.into_iter().filter_map(|e| e.into_child()).collect();
    Ok((state, children))
}

/// The members a state records; a state.json from before clusters has only its one member's pid
/// and endpoint.
pub fn members_of(e: &EtcdState) -> Vec<EtcdMemberState> {
    if !e.members.is_empty() {
        return e.members.clone();
    }
    vec![EtcdMemberState {
        name: "lab".into(),
        pid: e.pid,
        endpoint: e.endpoints.first().cloned().unwrap_or_default(),
        data_dir: e.data_dir.clone(),
        log: e.log.clone(),
    }]
}

/// The leader's endpoint in `etcdctl endpoint status -w json` output: the member whose own id is
/// the leader id it reports.
pub fn leader_endpoint(status_json: &str) -> Option<String> {
    let statuses: Vec<serde_json::Value> = serde_json::from_str(status_json).ok()?;
    statuses.iter().find_map(|st| {
        let me = st["Status"]["header"]["member_id"].as_u64()?;
        let leader = st["Status"]["leader"].as_u64()?;
        (me == leader).then(|| st["Endpoint"].as_str().map(str::to_string))?
    })
}

impl Lab {
    /// The etcd members, each with its pid and whether it is alive (for fault tests).
    pub fn etcd_members(&self) -> Vec<EtcdMemberStatus> {
        let Some(e) = &self.state.etcd else {
            return Vec::new();
        };
        members_of(e)
            .into_iter()
            .map(|m| EtcdMemberStatus {
                alive: netns::pid_in(&self.state.underlay_netns, m.pid),
                name: m.name,
                endpoint: m.endpoint,
                pid: m.pid,
            })
            .collect()
    }

    /// The etcd endpoints of the members that are alive.
    pub fn etcd_live_endpoints(&self) -> Vec<String> {
        self.etcd_members()
            .into_iter()
            .filter(|m| m.alive)
            .map(|m| m.endpoint)
            .collect()
    }

    /// Runs etcdctl in the underlay namespace against the live members; returns stdout.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String, LabError> {
        Ok(etcd::etcdctl(
            Some(&self.state.underlay_netns),
            &self.etcd_live_endpoints(),
            args,
        )?)
    }

    /// The name of the current etcd leader, from `etcdctl endpoint status -w json` over the live
    /// members; `None` while there is none (no quorum, or an election under way).
    pub fn etcd_leader(&self) -> Result<Option<String>, LabError> {
        let out = self.etcdctl(&[
            "--dial-timeout=1s",
            "--command-timeout=2s",
            "endpoint",
            "status",
            "-w",
            "json",
        ]);
        // An unreachable member makes etcdctl fail, but the others still printed their status.
        let text = match out {
            Ok(t) => t,
            Err(LabError::Etcd(e)) => match &*e {
                EtcdError::Command(CmdError::Failed { stdout, .. }) => stdout.clone(),
                _ => return Err(LabError::Etcd(e)),
            },
            Err(e) => return Err(e),
        };
        Ok(leader_endpoint(&text).and_then(|ep| {
            self.etcd_members()
                .into_iter()
                .find(|m| m.endpoint == ep)
                .map(|m| m.name)
        }))
    }

    /// SIGKILLs etcd member `name` and waits until it is gone. The lab's `down` copes.
    pub fn kill_etcd_member(&self, name: &str) -> Result<(), LabError> {
        let m = self
            .etcd_members()
            .into_iter()
            .find(|m| m.name == name)
            .ok_or_else(|| {
                LabError::Spec(format!("lab {} has no etcd member {name}", self.name()))
            })?;
        if m.alive {
            cmd::signal(m.pid, libc::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while netns::pid_in(&self.state.underlay_netns, m.pid) {
            if Instant::now() >= deadline {
                return Err(LabError::Spec(format!(
                    "etcd member {name} (pid {}) survived SIGKILL",
                    m.pid
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn one_member_listens_on_the_bridge() {
        let names = Names::new("demo").unwrap();
        let dir = Path::new("/lab");
        let o = member_options(&names, dir, 1);
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].name, "lab");
        assert_eq!(o[0].listen_ip.to_string(), "198.18.0.254");
        assert_eq!(o[0].netns.as_deref(), Some("twl-demo-u"));
        assert_eq!((o[0].client_port, o[0].peer_port), (2379, 2380));
        assert_eq!(o[0].data_dir, PathBuf::from("/lab/etcd"));
        assert_eq!(o[0].log_file.as_deref(), Some(Path::new("/lab/etcd.log")));
        assert!(o[0].initial_cluster.is_none());
    }

    #[test]
    fn a_cluster_shares_one_initial_cluster() {
        let names = Names::new("demo").unwrap();
        let o = member_options(&names, Path::new("/lab"), 3);
        let ips: Vec<String> = o.iter().map(|o| o.listen_ip.to_string()).collect();
        assert_eq!(ips, ["198.18.0.251", "198.18.0.252", "198.18.0.253"]);
        let want = "etcd1=http://198.18.0.251:2380,etcd2=http://198.18.0.252:2380,\
                    etcd3=http://198.18.0.253:2380";
        for (m, o) in o.iter().enumerate() {
            assert_eq!(o.name, format!("etcd{}", m + 1));
            assert_eq!(o.initial_cluster.as_deref(), Some(want));
            assert_eq!(o.cluster_token.as_deref(), Some("tweed-lab-demo"));
            assert_eq!(o.data_dir, Path::new("/lab/etcd").join(&o.name));
        }
    }

    #[test]
    fn an_old_state_has_its_one_member() {
        let e = EtcdState {
            pid: 7,
            endpoints: vec!["http://198.18.0.254:2379".into()],
            data_dir: "/lab/etcd".into(),
            log: "/lab/etcd.log".into(),
            members: Vec::new(),
        };
        let m = members_of(&e);
        assert_eq!(m.len(), 1);
        assert_eq!((m[0].name.as_str(), m[0].pid), ("lab", 7));
        assert_eq!(m[0].endpoint, "http://198.18.0.254:2379");
    }

    #[test]
    fn the_leader_is_the_member_that_names_itself() {
        let out = r#"[
          {"Endpoint":"http://198.18.0.251:2379","Status":{"header":{"member_id":1},"leader":2}},
          {"Endpoint":"http://198.18.0.252:2379","Status":{"header":{"member_id":2},"leader":2}}
        ]"#;
        assert_eq!(
            leader_endpoint(out).as_deref(),
            Some("http://198.18.0.252:2379")
        );
        let none = r#"[{"Endpoint":"x","Status":{"header":{"member_id":1},"leader":0}}]"#;
        assert_eq!(leader_endpoint(none), None);
        assert_eq!(leader_endpoint(""), None);
    }
}
