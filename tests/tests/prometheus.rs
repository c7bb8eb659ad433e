//! Issue 6: a real Prometheus (Debian's `prometheus` package) scrapes a lab host's `/metrics`.
//! It runs in h2's namespace on 127.0.0.1:9090, started by the test itself (the Debian service is
//! neither needed nor touched), and scrapes h1 over the underlay every second.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;
use tweed_e2e::*;
use tweed_lab::LabSpec;

/// The Prometheus process and its directory: killed and removed on drop, also on panic.
struct Prometheus {
    child: Child,
    dir: PathBuf,
}

impl Prometheus {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_prometheus(lab: &tweed_lab::Lab, host: &str, target: &str) -> Prometheus {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let dir = std::env::temp_dir().join(format!("tweed-prom-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let config = dir.join("p.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: tweed\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = lab
        .command(
            host,
            &[
                "prometheus".to_string(),
                format!("--config.file={}", config.display()),
                format!("--storage.tsdb.path={}", dir.join("data").display()),
                "--web.listen-address=127.0.0.1:9090".to_string(),
            ],
        )
        .expect("lab host")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start prometheus (apt-get install prometheus)");
    Prometheus { child, dir }
}

/// GET on Prometheus's HTTP API from inside `host`; `None` while it does not answer.
fn api(lab: &tweed_lab::Lab, host: &str, path: &str) -> Option<serde_json::Value> {
    let url = format!("http://127.0.0.1:9090{path}");
    let body = lab
        .exec(host, &["curl", "-sf", "--max-time", "2", &url])
        .ok()?;
    serde_json::from_str(&body).ok()
}

#[test]
fn prometheus_scrapes_a_lab_host_and_sees_its_lease() {
    require_root!(NEEDS_ROOT);
    let mut spec = LabSpec::new(per_process("pm"), 2);
    spec.pods_per_host = 1;
    let lab = up(spec);
    let h1 = host_state(&lab, "h1");
    let subnet = {
        let s = h1.subnet.as_deref().expect("h1 subnet");
        let (addr, len) = s.split_once('/').unwrap();
        let mut o: Vec<&str> = addr.split('.').collect();
        o[3] = "0";
        format!("{}/{len}", o.join("."))
    };
    let target = format!("{}:9867", h1.public_ip);
    let prom = start_prometheus(&lab, "h2", &target);

    let mut targets = serde_json::Value::Null;
    let up = |targets: &serde_json::Value| {
        targets["data"]["activeTargets"]
            .as_array()
            .is_some_and(|t| {
                t.iter()
                    .any(|t| t["labels"]["instance"] == target.as_str() && t["health"] == "up")
            })
    };
    let start = std::time::Instant::now();
    while !up(&targets) {
        if start.elapsed() > Duration::from_secs(30) {
            panic!(
                "target {target} not up after 30s: {targets}\nprometheus log:\n{}",
                prom.log()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
        targets = api(&lab, "h2", "/api/v1/targets").unwrap_or(serde_json::Value::Null);
    }

    let mut result = serde_json::Value::Null;
    let has_lease = |r: &serde_json::Value| {
        r["data"]["result"].as_array().is_some_and(|rs| {
            rs.iter().any(|s| {
                s["metric"]["subnet"] == subnet.as_str()
                    && s["metric"]["instance"] == target.as_str()
                    && s["value"][1] == "1"
            })
        })
    };
    let start = std::time::Instant::now();
    while !has_lease(&result) {
        if start.elapsed() > Duration::from_secs(20) {
            panic!(
                "tweed_lease_info{{subnet=\"{subnet}\"}} not in Prometheus after 20s: {result}\n\
                 prometheus log:\n{}",
                prom.log()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
        result = api(&lab, "h2", "/api/v1/query?query=tweed_lease_info").unwrap_or_default();
    }
    // The readiness-related series an alert would use are there too.
    let expiry = api(
        &lab,
        "h2",
        "/api/v1/query?query=tweed_lease_expiry_timestamp_seconds",
    )
    .unwrap();
    assert_eq!(
        expiry["data"]["result"].as_array().map(Vec::len),
        Some(1),
        "{expiry}"
    );
    drop(prom);
}
