//! Command-line parsing and output for tweedctl.

use std::io::{self, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use tweed_runtime::exec::ExecSpec;
use tweed_runtime::plan::RunSpec;
use tweed_runtime::process;
use tweed_runtime::runtime::{self, Options, Runtime, Summary};
use tweed_runtime::state;

#[derive(Parser, Debug)]
#[command(name = "tweedctl", version, about = "tweed's container runtime")]
struct Cli {
    /// Runtime state directory.
    #[arg(long, env = "TWEED_ROOT", default_value = "/run/tweed", global = true)]
    root: PathBuf,
    /// Image store and container layers.
    #[arg(
        long,
        env = "TWEED_IMAGE_ROOT",
        default_value = "/var/lib/tweed",
        global = true
    )]
    image_root: PathBuf,
    /// Cgroup parent of containers (absolute within each hierarchy).
    #[arg(
        long,
        env = "TWEED_CGROUP_PARENT",
        default_value = "/tweed",
        global = true
    )]
    cgroup_parent: String,
    /// Network namespace (name in /run/netns, or a path) that plays the host: CNI plugins run
    /// in it and --net host joins it.
    #[arg(long, env = "TWEED_HOST_NETNS", global = true)]
    host_netns: Option<String>,
    /// CNI network configuration list used by --net overlay.
    #[arg(
        long,
        env = "TWEED_CNI_CONF",
        default_value = "/etc/cni/net.d/10-tweed.conflist",
        global = true
    )]
    cni_conf: PathBuf,
    /// Directories searched for CNI plugins.
    #[arg(
        long,
        env = "TWEED_CNI_PATH",
        default_value = "/opt/cni/bin:/usr/lib/cni",
        global = true
    )]
    cni_path: String,
    /// Host uids delegated to tweed for --userns (lines `tweed:START:COUNT`).
    #[arg(
        long,
        env = "TWEED_SUBUID",
        default_value = "/etc/subuid",
        global = true
    )]
    subuid: PathBuf,
    /// Host gids delegated to tweed for --userns.
    #[arg(
        long,
        env = "TWEED_SUBGID",
        default_value = "/etc/subgid",
        global = true
    )]
    subgid: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Manage images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Create and start a container.
    Run(Box<RunArgs>),
    /// List containers.
    Ps {
        /// Only ids.
        #[arg(short, long)]
        quiet: bool,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Print a container's output.
    Logs {
        #[arg(short, long)]
        follow: bool,
        container: String,
    },
    /// Run a command in a running container.
    Exec(ExecArgs),
    /// Stop containers (SIGTERM, then SIGKILL after the grace period).
    Stop {
        #[arg(short = 't', long = "time", default_value_t = 10)]
        time: u64,
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Send a signal to containers (default SIGKILL).
    Kill {
        #[arg(short, long, default_value = "KILL")]
        signal: String,
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Remove containers.
    Rm {
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Show containers as JSON.
    Inspect {
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Wait for a container to end; prints its exit code.
    Wait { container: String },
    /// Make a container's changes a new image.
    Commit { container: String, name: String },
    /// CNI GC: let the network's plugins release what no container uses (CNI >= 1.1.0).
    Gc,
    /// Print the seccomp profile a container gets by default, in Docker's (and the OCI
    /// spec's) format: to read what is blocked, or to give runc or Docker the same filter.
    SeccompProfile {
        /// Capabilities the container would add to the default set (they unlock syscalls).
        #[arg(long = "cap-add", value_name = "CAP")]
        cap_add: Vec<String>,
    },
    /// Inspect the local tweedd agent: status, leases, peers, watch.
    Net(crate::netcli::NetArgs),
}

#[derive(Subcommand, Debug)]
enum ImageCmd {
    /// Import a docker-save tarball or OCI layout (dir or tar), or a plain rootfs directory.
    Import {
        /// Import a plain directory as a one-layer image named NAME.
        #[arg(long, value_name = "DIR")]
        rootfs: Option<PathBuf>,
        /// Name the imported image (instead of its own tag).
        #[arg(long)]
        name: Option<String>,
        /// Refuse an archive or layer whose uncompressed tar, or the files written from it,
        /// pass this size (tar and gzip bombs). Suffixes k, m, g, t.
        #[arg(long, value_name = "SIZE", default_value = "64g", value_parser = parse_size_arg)]
        max_unpacked: u64,
        /// Refuse an archive or layer with more entries than this.
        #[arg(long, value_name = "N", default_value_t = tweed_runtime::image::Limits::DEFAULT_MAX_ENTRIES)]
        max_entries: u64,
        /// FILE (or NAME with --rootfs).
        arg: String,
    },
    /// List images.
    Ls {
        #[arg(short, long)]
        quiet: bool,
    },
    /// Remove images (refused while a container uses one).
    Rm {
        #[arg(required = true)]
        images: Vec<String>,
    },
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Run in the background and print the id.
    #[arg(short, long)]
    detach: bool,
    /// Remove the container when it ends.
    #[arg(long)]
    rm: bool,
    #[arg(long)]
    name: Option<String>,
    /// Memory limit, e.g. 64m.
    #[arg(short, long)]
    memory: Option<String>,
    /// CPU limit, e.g. 0.5.
    #[arg(long)]
    cpus: Option<String>,
    /// Process limit.
    #[arg(long)]
    pids: Option<String>,
    /// overlay | none | host | container:ID.
    #[arg(long, default_value = "none")]
    net: String,
    #[arg(long)]
    hostname: Option<String>,
    #[arg(short, long = "env")]
    env: Vec<String>,
    #[arg(short, long = "volume")]
    volume: Vec<String>,
    #[arg(short, long)]
    workdir: Option<String>,
    #[arg(short, long)]
    user: Option<String>,
    #[arg(long)]
    entrypoint: Option<String>,
    /// seccomp=unconfined | seccomp=PROFILE.json (Docker's format) | no-new-privileges[=false].
    #[arg(long = "security-opt", value_name = "OPT")]
    security_opt: Vec<String>,
    /// Add a capability to Docker's default set (NAME, CAP_NAME or ALL).
    #[arg(long = "cap-add", value_name = "CAP")]
    cap_add: Vec<String>,
    /// Drop a capability from the default set (NAME, CAP_NAME or ALL).
    #[arg(long = "cap-drop", value_name = "CAP")]
    cap_drop: Vec<String>,
    /// Every capability, no seccomp filter, no masked paths, every device: the explicit way out.
    #[arg(long)]
    privileged: bool,
    /// Run in a user namespace: `auto` (a free block of 65536 ids delegated to user tweed in
    /// /etc/subuid and /etc/subgid) or host `UID:GID:COUNT` from that delegation. Off by default.
    #[arg(long, value_name = "auto|UID:GID:COUNT")]
    userns: Option<String>,
    image: String,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    cmd: Vec<String>,
}

#[derive(Args, Debug)]
struct ExecArgs {
    #[arg(short, long)]
    interactive: bool,
    #[arg(short, long)]
    tty: bool,
    #[arg(short, long = "env")]
    env: Vec<String>,
    #[arg(short, long)]
    workdir: Option<String>,
    #[arg(short, long)]
    user: Option<String>,
    container: String,
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    cmd: Vec<String>,
}

fn options(cli: &Cli) -> Options {
    let host_netns = cli.host_netns.as_ref().map(|n| {
        if n.contains('/') {
            PathBuf::from(n)
        } else {
            PathBuf::from("/run/netns").join(n)
        }
    });
    Options {
        run_root: cli.root.clone(),
        image_root: cli.image_root.clone(),
        cgroup_parent: cli.cgroup_parent.clone(),
        host_netns,
        cni_conf: cli.cni_conf.clone(),
        cni_path: cli
            .cni_path
            .split(':')
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .collect(),
        subuid: cli.subuid.clone(),
        subgid: cli.subgid.clone(),
    }
}

pub fn main() -> i32 {
    process::mark("tweedctl: main");
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tweedctl: {}", chain(&e));
            125
        }
    }
}

/// The error and its causes, skipping causes whose text the previous message already shows.
fn chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    let mut last = out.clone();
    for c in e.chain().skip(1) {
        let s = c.to_string();
        if !last.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        last = s;
    }
    out
}

fn run(cli: Cli) -> Result<i32> {
    let mut stdout = io::stdout();
    let out: &mut dyn Write = &mut stdout;
    // Talks to the agent only: no runtime state needed.
    if let Cmd::Net(args) = cli.cmd {
        return crate::netcli::run(args, out);
    }
    if let Cmd::SeccompProfile { cap_add } = &cli.cmd {
        let caps = tweed_runtime::caps::CapSet::docker_default()
            .adjust(cap_add, &[], tweed_runtime::caps::last_cap())
            .map_err(anyhow::Error::msg)?;
        let p = tweed_runtime::seccomp::default::profile(caps);
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&tweed_runtime::seccomp::docker::to_docker(&p))?
        )?;
        return Ok(0);
    }
    let rt = Runtime::new(options(&cli)).context("opening the runtime state")?;
    match cli.cmd {
        Cmd::Image(ImageCmd::Import {
            rootfs,
            name,
            max_unpacked,
            max_entries,
            arg,
        }) => {
            let limits = tweed_runtime::image::Limits {
                max_unpacked,
                max_entries,
            };
            let recs = match rootfs {
                Some(dir) => vec![rt.images.import_rootfs(&dir, &arg)?],
                None => rt
                    .images
                    .import_with(&PathBuf::from(&arg), name.as_deref(), &limits)?,
            };
            for r in recs {
                writeln!(out, "{} {}", r.name, r.id)?;
            }
        }
        Cmd::Image(ImageCmd::Ls { quiet }) => {
            let imgs = rt.images.list()?;
            if !quiet {
                writeln!(out, "{:<40} {:<19} {:>6}  CREATED", "NAME", "ID", "LAYERS")?;
            }
            for i in imgs {
                let short = state::short_id(i.id.hex());
                if quiet {
                    writeln!(out, "{}", i.name)?;
                } else {
                    writeln!(
                        out,
                        "{:<40} {:<19} {:>6}  {}",
                        i.name,
                        short,
                        i.layers.len(),
                        i.created
                    )?;
                }
            }
        }
        Cmd::Image(ImageCmd::Rm { images }) => {
            for i in images {
                let removed = rt.remove_image(&i)?;
                writeln!(out, "removed {i} ({} layers freed)", removed.len())?;
            }
        }
        Cmd::Run(a) => return run_cmd(&rt, *a, out),
        Cmd::Ps { quiet, json } => {
            let list = rt.list()?;
            if json {
                writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
            } else if quiet {
                for c in list {
                    writeln!(out, "{}", c.id)?;
                }
            } else {
                write_ps_table(&list, out)?;
            }
        }
        Cmd::Logs { follow, container } => {
            let id = rt.resolve(&container)?;
            rt.logs(&id, follow, out, &mut io::stderr())?;
        }
        Cmd::Exec(a) => {
            let id = rt.resolve(&a.container)?;
            let spec = ExecSpec {
                argv: a.cmd,
                env: a.env,
                workdir: a.workdir,
                user: a.user,
                tty: a.tty,
                interactive: a.interactive,
            };
            return Ok(rt.exec(&id, &spec)?);
        }
        Cmd::Stop { time, containers } => {
            for c in containers {
                let id = rt.resolve(&c)?;
                rt.stop(&id, Duration::from_secs(time))?;
                writeln!(out, "{c}")?;
            }
        }
        Cmd::Kill { signal, containers } => {
            let sig = process::signal_number(&signal)
                .ok_or_else(|| runtime::RuntimeError::BadSignal(signal.clone()))?;
            for c in containers {
                let id = rt.resolve(&c)?;
                rt.kill(&id, sig)?;
                writeln!(out, "{c}")?;
            }
        }
        Cmd::Rm { force, containers } => {
            let mut failed = false;
            for c in containers {
                match rt.resolve(&c).and_then(|id| rt.remove(&id, force)) {
                    Ok(()) => writeln!(out, "{c}")?,
                    Err(e) => {
                        eprintln!("tweedctl: {e}");
                        failed = true;
                    }
                }
            }
            if failed {
                return Ok(1);
            }
        }
        Cmd::Inspect { containers } => {
            let mut all = Vec::new();
            for c in containers {
                let id = rt.resolve(&c)?;
                all.push(rt.inspect(&id)?);
            }
            writeln!(out, "{}", serde_json::to_string_pretty(&all)?)?;
        }
        Cmd::Wait { container } => {
            let id = rt.resolve(&container)?;
            let e = rt.wait(&id, None)?;
            writeln!(out, "{}", e.code)?;
        }
        Cmd::Commit { container, name } => {
            let id = rt.resolve(&container)?;
            let r = rt.commit(&id, &name)?;
            writeln!(out, "{} {}", r.name, r.id)?;
        }
        Cmd::Gc => {
            if !rt.cni_gc()? {
                writeln!(out, "the network's CNI version has no GC (needs 1.1.0)")?;
            }
        }
        Cmd::Net(_) | Cmd::SeccompProfile { .. } => {
            unreachable!("handled before the runtime is opened")
        }
    }
    Ok(0)
}

/// `ps` as a table. Ids and commands come from state files anyone with access to the run root
/// can write: they are shortened by characters, never cut inside one or past the end.
fn write_ps_table(list: &[Summary], out: &mut dyn Write) -> io::Result<()> {
    writeln!(
        out,
        "{:<12}  {:<16} {:<20} {:<24} {:<8} STATUS",
        "ID", "NAME", "IMAGE", "COMMAND", "PID"
    )?;
    for c in list {
        writeln!(
            out,
            "{:<12}  {:<16} {:<20} {:<24} {:<8} {}",
            state::short_id(&c.id),
            c.name,
            c.image,
            ellipsize(&c.command, 24),
            c.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            c.status.show()
        )?;
    }
    Ok(())
}

/// `s` if it has at most `max` characters, else its first `max - 3` and "...".
fn ellipsize(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(3)).collect();
    out.push_str("...");
    out
}

fn run_cmd(rt: &Runtime, a: RunArgs, out: &mut dyn Write) -> Result<i32> {
    if a.image.is_empty() {
        bail!("no image given");
    }
    let spec = RunSpec {
        image: a.image,
        cmd: a.cmd,
        entrypoint: a.entrypoint,
        name: a.name,
        env: a.env,
        volumes: a.volume,
        workdir: a.workdir,
        hostname: a.hostname,
        net: Some(a.net),
        memory: a.memory,
        cpus: a.cpus,
        pids: a.pids,
        user: a.user,
        auto_remove: a.rm,
        security: tweed_runtime::security::SecurityArgs {
            security_opt: a.security_opt,
            cap_add: a.cap_add,
            cap_drop: a.cap_drop,
            privileged: a.privileged,
            userns: a.userns,
        },
    };
    if a.detach {
        let id = rt.run(&spec)?;
        writeln!(out, "{id}")?;
        return Ok(0);
    }
    let (_, exit) = runtime::run_attached(rt, &spec, out, &mut io::stderr())?;
    if exit.oom_killed {
        eprintln!("tweedctl: the container was OOM-killed");
    }
    Ok(exit.code)
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    tweed_runtime::units::parse_size(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tweed_runtime::state::Status;

    fn summary(id: &str, command: &str) -> Summary {
        Summary {
            id: id.into(),
            name: "n".into(),
            image: "busybox".into(),
            command: command.into(),
            status: Status::Running,
            created: "t".into(),
            pid: Some(7),
        }
    }

    #[test]
    fn ps_shows_short_ids_and_odd_commands_without_panicking() {
        let list = [
            summary("0123456789abcdef0123456789abcdef", "sleep 1000"),
            summary("abc", "echo"),
            summary("é", "echo ééééééééééééééééééééééééééééé"),
        ];
        let mut out = Vec::new();
        write_ps_table(&list, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[1].starts_with("0123456789ab  n"), "{text}");
        assert!(lines[2].starts_with("abc           n"), "{text}");
        assert!(lines[3].contains("echo éééééééééééééééé... "), "{text}");
    }

    #[test]
    fn ellipsis_counts_characters() {
        assert_eq!(ellipsize("short", 24), "short");
        assert_eq!(ellipsize(&"x".repeat(24), 24), "x".repeat(24));
        assert_eq!(
            ellipsize(&"x".repeat(25), 24),
            format!("{}...", "x".repeat(21))
        );
        assert_eq!(
            ellipsize(&"ü".repeat(30), 24),
            format!("{}...", "ü".repeat(21))
        );
    }
}
