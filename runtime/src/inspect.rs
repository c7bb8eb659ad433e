//! `tweedctl inspect`: everything known about a container as one JSON document, shaped like
//! Docker's so that tools and people used to it find their way.

use serde_json::Value;

use crate::cgroup::{Cgroup, CgroupManager};
use crate::cni;
use crate::runtime::{Runtime, RuntimeError};
use crate::state::{self, CniRecord, Status};
use crate::units;

impl Runtime {
    /// Everything known about a container, as JSON.
    pub fn inspect(&self, id: &str) -> Result<Value, RuntimeError> {
        let cfg = self.config(id)?;
        let status = self.status(id)?;
        let init = self.proc_info(id, "init.json")?;
        let shim = self.proc_info(id, "shim.json")?;
        let exit = self.exit_info(id)?;
        let cni: Option<CniRecord> = state::read_json(&self.paths.state_dir(id).join("cni.json"))?;
        let stats = if status == Status::Running {
            Cgroup::from_record(&cfg.cgroup).stats().ok()
        } else {
            None
        };
        let ddir = self.paths.data_dir(id);
        let image = self.images.get(&cfg.image_id).ok();
        Ok(serde_json::json!({
            "Id": cfg.id,
            "Name": cfg.name,
            "Created": cfg.created,
            "Image": cfg.image,
            "ImageId": cfg.image_id,
            "Path": cfg.argv.first(),
            "Args": cfg.argv.get(1..).unwrap_or(&[]),
            "State": {
                "Status": status,
                "Running": status == Status::Running,
                "Pid": if status == Status::Running { init.as_ref().map(|i| i.pid) } else { None },
                "SupervisorPid": shim.as_ref().map(|s| s.pid),
                "StartedAt": init.as_ref().map(|i| i.started.clone()),
                "FinishedAt": exit.as_ref().map(|e| e.finished.clone()),
                "ExitCode": exit.as_ref().map(|e| e.code),
                "Signal": exit.as_ref().and_then(|e| e.signal),
                "OOMKilled": exit.as_ref().is_some_and(|e| e.oom_killed),
                "Dead": matches!(status, Status::Dead { .. }),
            },
            "Config": {
                "Hostname": cfg.hostname,
                "Env": cfg.env,
                "Cmd": cfg.argv,
                "WorkingDir": cfg.cwd,
                "User": cfg.user,
            },
            "HostConfig": {
                "Memory": cfg.limits.memory,
                "NanoCpus": cfg.limits.millicpus.map(|m| m * 1_000_000),
                "CpuQuota": cfg.limits.cpu_quota_us(),
                "CpuPeriod": cfg.limits.millicpus.map(|_| units::CPU_PERIOD_US),
                "PidsLimit": cfg.limits.pids,
                "CpusetCpus": cfg.cpus,
                "NetworkMode": cfg.net.show(),
                "Binds": cfg.volumes.iter().map(|v| format!("{}:{}{}", v.host.display(), v.container.display(), if v.readonly { ":ro" } else { "" })).collect::<Vec<_>>(),
                "CapAdd": Value::Null,
                "Capabilities": cfg.caps.names(),
                "AutoRemove": cfg.auto_remove,
            },
            "NetworkSettings": {
                "Mode": cfg.net.show(),
                "SandboxKey": cfg.netns_path,
                "IPAddresses": cni.as_ref().and_then(|c| c.result.as_ref()).map(cni::result_ips).unwrap_or_default(),
                "CniResult": cni.as_ref().and_then(|c| c.result.clone()),
                "CniNetwork": cni.as_ref().map(|c| c.list.name.clone()),
            },
            "GraphDriver": {
                "Name": "overlay",
                "Data": {
                    "LowerDir": image.as_ref().and_then(|i| self.images.lower_dirs(i).ok()),
                    "UpperDir": ddir.join("upper"),
                    "WorkDir": ddir.join("work"),
                    // On the init's scratch tmpfs: these paths exist in the container's mount
                    // namespace only (`/proc/<pid>/root` reaches the merged view from the host).
                    "InitDir": self.paths.scratch().join("init"),
                    "MergedDir": self.paths.scratch().join("merged"),
                },
            },
            "Cgroup": cfg.cgroup,
            "Stats": stats,
        }))
    }
}
