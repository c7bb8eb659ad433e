//! What `tweed-lab check` does: ping from every pod to every pod on the other hosts, in
//! parallel, and report each result. Every pair is pinged in each family both pods have: over
//! IPv4 and over IPv6 in a dual-stack lab, over IPv6 in an IPv6-only one.

use std::net::IpAddr;
#[cfg(test)]
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::cmd;
use crate::error::LabError;
use crate::lab::Lab;
use crate::netns;
use crate::state::HostState;

const CHECK_PARALLELISM: usize = 16;

/// One ping of `check`.
#[derive(Debug, Clone)]
pub struct PingResult {
    /// `h1/p1`
    pub from: String,
    pub to: String,
    pub to_ip: IpAddr,
    pub ok: bool,
    /// ping's summary, or why it could not run.
    pub detail: String,
}

#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    pub results: Vec<PingResult>,
}

impl CheckReport {
    pub fn passed(&self) -> usize {
        self.results.iter().filter(|r| r.ok).count()
    }
    pub fn failed(&self) -> usize {
        self.results.len() - self.passed()
    }
    pub fn failures(&self) -> impl Iterator<Item = &PingResult> {
        self.results.iter().filter(|r| !r.ok)
    }
    /// `N passed, M failed`
    pub fn summary(&self) -> String {
        format!("{} passed, {} failed", self.passed(), self.failed())
    }
}

/// One ping to make: from pod `from` (in namespace `netns`) to pod `to` at `to_ip`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ping {
    from: String,
    netns: String,
    to: String,
    to_ip: IpAddr,
}

/// Every pod to every pod on the other hosts, in host and pod order; IPv4 when both pods have an
/// IPv4 address, then IPv6 when both have an IPv6 one.
fn pings(hosts: &[HostState]) -> Vec<Ping> {
    let mut jobs = Vec::new();
    for a in hosts {
        for b in hosts.iter().filter(|b| b.name != a.name) {
            for pa in &a.pods {
                for pb in &b.pods {
                    let v4 = pa.ip.and(pb.ip).map(IpAddr::V4);
                    let v6 = pa.ip6.and(pb.ip6).map(IpAddr::V6);
                    for to_ip in v4.into_iter().chain(v6) {
                        jobs.push(Ping {
                            from: format!("{}/{}", a.name, pa.name),
                            netns: pa.netns.clone(),
                            to: format!("{}/{}", b.name, pb.name),
                            to_ip,
                        });
                    }
                }
            }
        }
    }
    jobs
}

impl Lab {
    /// Pings from every pod to every pod on the other hosts, in parallel.
    pub fn check(&self) -> Result<CheckReport, LabError> {
        cmd::find_program("ping").ok_or(LabError::MissingProgram {
            program: "ping",
            package: "iputils-ping",
        })?;
        let queue = std::sync::Mutex::new(
            pings(&self.state.hosts)
                .into_iter()
                .enumerate()
                .collect::<Vec<_>>(),
        );
        let results = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..CHECK_PARALLELISM {
                s.spawn(|| loop {
                    let Some((i, job)) = queue.lock().unwrap().pop() else {
                        break;
                    };
                    let r = ping(job);
                    results.lock().unwrap().push((i, r));
                });
            }
        });
        let mut results = results.into_inner().unwrap();
        results.sort_by_key(|(i, _)| *i);
        Ok(CheckReport {
            results: results.into_iter().map(|(_, r)| r).collect(),
        })
    }

    /// Repeats `check` until nothing fails or `timeout` has passed; returns the last report. The
    /// data plane converges a little after `up` (agents learn of each other through etcd).
    pub fn check_until(&self, timeout: Duration) -> Result<CheckReport, LabError> {
        let start = Instant::now();
        loop {
            let report = self.check()?;
            if report.failed() == 0 || start.elapsed() >= timeout {
                return Ok(report);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

fn ping(job: Ping) -> PingResult {
    let ns = &job.netns;
    let out = netns::exec_command(
        ns,
        &[
            "ping",
            "-n",
            "-q",
            "-c",
            "2",
            "-W",
            "1",
            "-i",
            "0.2",
            &job.to_ip.to_string(),
        ],
    )
    .stdin(Stdio::null())
    .output();
    let (ok, detail) = match out {
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stdout);
            let summary = text
                .lines()
                .find(|l| l.contains("packets transmitted"))
                .unwrap_or("")
                .to_string();
            let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
            (
                o.status.success(),
                [summary, err]
                    .into_iter()
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        }
        Err(e) => (false, format!("cannot run ping in {ns}: {e}")),
    };
    PingResult {
        from: job.from,
        to: job.to,
        to_ip: job.to_ip,
        ok,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::Names;
    use crate::state::PodState;
    use crate::topology;

    #[test]
    fn pods_ping_every_pod_on_the_other_hosts_only() {
        let names = Names::new("demo").unwrap();
        let hosts: Vec<HostState> = (1..=3)
            .map(|i| {
                let mut h = topology::host_state(
                    &names,
                    std::path::Path::new("/lab"),
                    i,
                    1,
                    crate::spec::IpFamily::V4,
                );
                h.pods = (1..=2)
                    .map(|p| PodState {
                        name: names.pod(p),
                        netns: names.pod_ns(i, p),
                        ip: Some(Ipv4Addr::new(10, 244, i as u8, p as u8 + 1)),
                        ip6: None,
                        container_id: None,
                    })
                    .collect();
                h
            })
            .collect();
        let jobs = pings(&hosts);
        // 6 pods, each pinging the 4 on other hosts.
        assert_eq!(jobs.len(), 24);
        assert!(jobs.iter().all(|j| j.from[..2] != j.to[..2]), "{jobs:?}");
        assert_eq!(
            jobs[0],
            Ping {
                from: "h1/p1".into(),
                netns: "twl-demo-h1-p1".into(),
                to: "h2/p1".into(),
                to_ip: Ipv4Addr::new(10, 244, 2, 2).into(),
            }
        );
        assert!(pings(&hosts[..1]).is_empty());
        // Dual stack: each pair twice, IPv4 then IPv6; a pod without IPv6 is pinged over IPv4.
        let mut dual = hosts.clone();
        for (i, h) in dual.iter_mut().enumerate() {
            for (p, pod) in h.pods.iter_mut().enumerate() {
                pod.ip6 = Some(format!("fd00:10:244:{}::{}", i + 1, p + 2).parse().unwrap());
            }
        }
        let jobs = pings(&dual);
        assert_eq!(jobs.len(), 48);
        assert_eq!(jobs[0].to_ip, IpAddr::from(Ipv4Addr::new(10, 244, 2, 2)));
        assert_eq!(jobs[1].to_ip, "fd00:10:244:2::2".parse::<IpAddr>().unwrap());
        assert_eq!(
            (jobs[1].from.as_str(), jobs[1].to.as_str()),
            ("h1/p1", "h2/p1")
        );
        dual[1].pods[0].ip6 = None;
        assert_eq!(pings(&dual).len(), 48 - 2 * 4);
        // IPv6 only: each pair once, over IPv6.
        let mut v6 = dual.clone();
        v6[1].pods[0].ip6 = Some("fd00:10:244:2::2".parse().unwrap());
        for pod in v6.iter_mut().flat_map(|h| h.pods.iter_mut()) {
            pod.ip = None;
        }
        let jobs = pings(&v6);
        assert_eq!(jobs.len(), 24);
        assert!(jobs.iter().all(|j| j.to_ip.is_ipv6()), "{jobs:?}");
        assert_eq!(
            (jobs[0].from.as_str(), jobs[0].to.as_str(), jobs[0].to_ip),
            ("h1/p1", "h2/p1", "fd00:10:244:2::2".parse().unwrap())
        );
    }

    #[test]
    fn check_summary_line() {
        let mut r = CheckReport::default();
        for ok in [true, true, false] {
            r.results.push(PingResult {
                from: "h1/p1".into(),
                to: "h2/p1".into(),
                to_ip: Ipv4Addr::new(10, 244, 2, 2).into(),
                ok,
                detail: String::new(),
            });
        }
        assert_eq!(r.summary(), "2 passed, 1 failed");
        assert_eq!(r.failures().count(), 1);
    }
}
