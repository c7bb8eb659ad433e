//! A real etcd (Debian's `etcd-server`) for tests and labs: start, wait until healthy, stop on Drop.
//!
//! ```no_run
//! let dir = tempfile::tempdir().unwrap();
//! let etcd = tweed_lab::etcd::EtcdProcess::start_local(dir.path()).unwrap();
//! tweed_lab::etcd::etcdctl(None, &etcd.endpoints(), &["put", "k", "v"]).unwrap();
//! ```

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::cmd::{self, CmdError};
use crate::error::{io_err, IoError};

/// How long `start` waits for etcd to answer a health check.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `stop` waits after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Auto-picked ports can be taken by someone else between our probe and etcd's bind.
const PORT_RACE_RETRIES: usize = 5;
const LOG_TAIL_LINES: usize = 30;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("`{0}` not found in PATH: install the Debian package `{1}` (apt-get install {1})")]
    MissingBinary(&'static str, &'static str),
    #[error("network namespace `{0}` does not exist (no /run/netns/{0})")]
    NoNetns(String),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("could not find a free port on {ip}{}: {source}", ns_suffix(.netns))]
    NoFreePort {
        ip: IpAddr,
        netns: Option<String>,
        source: io::Error,
    },
    #[error("could not start `{command}`: {source}")]
    Spawn { command: String, source: io::Error },
    #[error("etcd {who} exited during start-up ({status}); tail of {}:\n{tail}", log.display())]
    Exited {
        /// e.g. "`lab` in netns `twl-a-u`"
        who: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("etcd {who} not healthy after {START_TIMEOUT:?} (last check: {last}); tail of {}:\n{tail}", log.display())]
    NotReady {
        who: String,
        last: String,
        log: PathBuf,
        tail: String,
    },
    #[error(transparent)]
    Command(#[from] CmdError),
}

fn ns_suffix(netns: &Option<String>) -> String {
    netns
        .as_ref()
        .map(|n| format!(" in netns `{n}`"))
        .unwrap_or_default()
}

/// Serve clients over TLS (`https://`): etcd's `--cert-file`, `--key-file`, `--trusted-ca-file`
/// and `--client-cert-auth`. The health check and [`EtcdProcess::ctl`] pass `--cacert` (and, for
/// mutual TLS, `--cert`/`--key`) to etcdctl. Peer traffic stays plain (single-member labs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdTls {
    /// The server certificate (PEM); it must name the listen IP as an IP SAN.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The CA that signed the server certificate (etcdctl's `--cacert`) and, with
    /// `client_cert_auth`, that client certificates must chain to (etcd's `--trusted-ca-file`).
    pub ca_file: PathBuf,
    /// Refuse clients without a certificate signed by `ca_file` (etcd's `--client-cert-auth`).
    pub client_cert_auth: bool,
    /// The client certificate and key etcdctl presents (needed with `client_cert_auth`).
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
}

impl EtcdTls {
    /// etcdctl's TLS flags for this member.
    pub fn etcdctl_args(&self) -> Vec<String> {
        let mut v = vec![format!("--cacert={}", self.ca_file.display())];
        if let (Some(c), Some(k)) = (&self.client_cert_file, &self.client_key_file) {
            v.push(format!("--cert={}", c.display()));
            v.push(format!("--key={}", k.display()));
        }
        v
    }

    fn etcd_args(&self) -> Vec<String> {
        let mut v = vec![
            format!("--cert-file={}", self.cert_file.display()),
            format!("--key-file={}", self.key_file.display()),
        ];
        // etcd turns client certificate authentication on whenever --trusted-ca-file is set,
        // whatever --client-cert-auth says: pass it only when that is wanted.
        if self.client_cert_auth {
            v.push(format!("--trusted-ca-file={}", self.ca_file.display()));
            v.push("--client-cert-auth".into());
        }
        v
    }
}

/// What to start. `client_port`/`peer_port` 0 means "pick a free one".
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    pub name: String,
    pub data_dir: PathBuf,
    /// Run inside this network namespace (`ip netns exec`); needs root.
    pub netns: Option<String>,
    pub listen_ip: IpAddr,
    pub client_port: u16,
    pub peer_port: u16,
    /// Where etcd's stdout/stderr go; default: `<data_dir>.log`.
    pub log_file: Option<PathBuf>,
    /// Serve clients over `https://` with these certificates; `None`: plain `http://`.
    pub tls: Option<EtcdTls>,
    /// More etcd flags, appended last (e.g. `--auth-token-ttl=2`).
    pub extra_args: Vec<String>,
    /// A member of a multi-member cluster: etcd's `--initial-cluster`
    /// (`name1=http://ip1:port,name2=...`), shared by all members; `None`: a cluster of one.
    /// Start the members together with [`EtcdProcess::start_cluster`].
    pub initial_cluster: Option<String>,
    /// `--initial-cluster-token`, the same for every member; default `tweed-<name>`.
    pub cluster_token: Option<String>,
}

impl EtcdOptions {
    /// A single member on 127.0.0.1 with free ports.
    pub fn local(name: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        EtcdOptions {
            name: name.into(),
            data_dir: data_dir.into(),
            netns: None,
            listen_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            client_port: 0,
            peer_port: 0,
            log_file: None,
            tls: None,
            extra_args: Vec::new(),
            initial_cluster: None,
            cluster_token: None,
        }
    }

    /// Makes `members` one cluster: the same `--initial-cluster` (every member's
    /// `name=peer URL`) for all of them. Their ports must be set first.
    pub fn join_as_cluster(members: &mut [EtcdOptions]) {
        let initial = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        for m in members {
            m.initial_cluster = Some(initial.clone());
        }
    }

    /// This member's peer URL (`http://<listen_ip>:<peer_port>`), for `--initial-cluster`.
    pub fn peer_url(&self) -> String {
        url(self.listen_ip, self.peer_port)
    }

    fn log_path(&self) -> PathBuf {
        self.log_file.clone().unwrap_or_else(|| {
            let mut s = self.data_dir.clone().into_os_string();
            s.push(".log");
            PathBuf::from(s)
        })
    }
}

/// A running etcd member. Dropping it stops it (SIGTERM, then SIGKILL) and reaps it, and removes the
/// data directory unless [`EtcdProcess::keep_data_dir`] was called.
#[derive(Debug)]
pub struct EtcdProcess {
    child: Option<Child>,
    pid: u32,
    name: String,
    netns: Option<String>,
    client_url: String,
    tls: Option<EtcdTls>,
    data_dir: PathBuf,
    log_file: PathBuf,
    keep_data: bool,
}

impl EtcdProcess {
    /// Starts etcd and waits (up to [`START_TIMEOUT`]) until `etcdctl endpoint health` passes.
    pub fn start(opts: EtcdOptions) -> Result<Self, EtcdError> {
        Self::spawn(opts, false)
    }

    /// A throw-away etcd on 127.0.0.1 with free ports; data and log live under `dir`.
    /// Needs no root.
    pub fn start_local(dir: impl AsRef<Path>) -> Result<Self, EtcdError> {
        let dir = dir.as_ref();
        let mut opts = EtcdOptions::local("local", dir.join("etcd-data"));
        opts.log_file = Some(dir.join("etcd.log"));
        Self::start(opts)
    }

    /// Like `start`, but in a new session (setsid) so it is immune to the caller's terminal signals;
    /// use with [`EtcdProcess::detach`].
    pub fn start_daemon(opts: EtcdOptions) -> Result<Self, EtcdError> {
        Self::spawn(opts, true)
    }

    /// Starts the members of one cluster together (each with fixed ports and the same
    /// `initial_cluster`), then waits until every member answers a health check, which needs a
    /// quorum: a member started alone would wait for its peers. On failure, stops them all.
    pub fn start_cluster(
        members: Vec<EtcdOptions>,
        daemon: bool,
    ) -> Result<Vec<EtcdProcess>, EtcdError> {
        let etcd_bin = Self::preflight()?;
        let mut started = Vec::new();
        for opts in &members {
            assert!(
                opts.client_port != 0 && opts.peer_port != 0,
                "cluster members need fixed ports"
            );
            let log = Self::prepare_log(opts)?;
            let log_start = log_len(&log);
            let me = Self::launch(
                opts,
                &etcd_bin,
                &log,
                opts.client_port,
                opts.peer_port,
                daemon,
            )?;
            started.push((me, log_start));
        }
        let mut ready = Vec::new();
        for (mut me, log_start) in started {
            // On error, the members still in `started`/`ready` stop on drop.
            me.wait_ready(log_start)?;
            me.keep_data = false;
            ready.push(me);
        }
        Ok(ready)
    }

    fn preflight() -> Result<PathBuf, EtcdError> {
        let etcd_bin =
            cmd::find_program("etcd").ok_or(EtcdError::MissingBinary("etcd", "etcd-server"))?;
        cmd::find_program("etcdctl").ok_or(EtcdError::MissingBinary("etcdctl", "etcd-client"))?;
        Ok(etcd_bin)
    }

    fn prepare_log(opts: &EtcdOptions) -> Result<PathBuf, EtcdError> {
        if let Some(ns) = &opts.netns {
            if !Path::new("/run/netns").join(ns).exists() {
                return Err(EtcdError::NoNetns(ns.clone()));
            }
        }
        let log = opts.log_path();
        if let Some(parent) = log.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(io_err("cannot create log directory", parent))?;
        }
        Ok(log)
    }

    fn spawn(opts: EtcdOptions, daemon: bool) -> Result<Self, EtcdError> {
        let etcd_bin = Self::preflight()?;
        let log = Self::prepare_log(&opts)?;
        let fresh_dir = is_empty_or_missing(&opts.data_dir);
        let auto_ports = opts.client_port == 0 || opts.peer_port == 0;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (client_port, peer_port) = pick_ports(&opts)?;
            // Only this attempt's output matters for the error tail.
            let log_start = log_len(&log);
            let started = Self::launch(&opts, &etcd_bin, &log, client_port, peer_port, daemon)
                .and_then(|me| me.ready_or_stop(log_start));
            match started {
                Err(EtcdError::Exited { tail, .. })
                    if auto_ports
                        && attempt < PORT_RACE_RETRIES
                        && tail.contains("address already in use") =>
                {
                    if fresh_dir {
                        let _ = fs::remove_dir_all(&opts.data_dir);
                    }
                    continue;
                }
                r => return r,
            }
        }
    }

    /// Waits for the member [`Self::launch`] started; stops it if it does not come up.
    fn ready_or_stop(mut self, log_start: u64) -> Result<Self, EtcdError> {
        match self.wait_ready(log_start) {
            Ok(()) => {
                self.keep_data = false;
                Ok(self)
            }
            Err(e) => {
                self.stop();
                Err(e)
            }
        }
    }

    /// Spawns the member without waiting for it.
    fn launch(
        opts: &EtcdOptions,
        etcd_bin: &Path,
        log: &Path,
        client_port: u16,
        peer_port: u16,
        daemon: bool,
    ) -> Result<Self, EtcdError> {
        let client_scheme = if opts.tls.is_some() { "https" } else { "http" };
        let client_url = scheme_url(client_scheme, opts.listen_ip, client_port);
        let peer_url = url(opts.listen_ip, peer_port);
        let log_out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io_err("cannot open etcd log", log))?;
        let log_err = log_out
            .try_clone()
            .map_err(io_err("cannot open etcd log", log))?;

        let mut command = match &opts.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(etcd_bin);
                c
            }
            None => Command::new(etcd_bin),
        };
        command
            .arg("--name")
            .arg(&opts.name)
            .arg("--data-dir")
            .arg(&opts.data_dir)
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(
                opts.initial_cluster
                    .clone()
                    .unwrap_or_else(|| format!("{}={peer_url}", opts.name)),
            )
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(
                opts.cluster_token
                    .clone()
                    .unwrap_or_else(|| format!("tweed-{}", opts.name)),
            )
            // capnslog (3.4's default) is deprecated and noisy about it.
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .args(opts.tls.iter().flat_map(EtcdTls::etcd_args))
            .args(&opts.extra_args)
            .stdin(Stdio::null())
            .stdout(log_out)
            .stderr(log_err);
        if daemon {
            cmd::new_session(&mut command);
        }
        let child = command.spawn().map_err(|source| EtcdError::Spawn {
            command: cmd::display(&command),
            source,
        })?;
        Ok(EtcdProcess {
            pid: child.id(),
            child: Some(child),
            name: opts.name.clone(),
            netns: opts.netns.clone(),
            client_url,
            tls: opts.tls.clone(),
            data_dir: opts.data_dir.clone(),
            log_file: log.to_path_buf(),
            // On a failed start, don't delete a data dir the caller may want to inspect... unless
            // it was ours to begin with; `spawn` handles that.
            keep_data: true,
        })
    }

    fn wait_ready(&mut self, log_start: u64) -> Result<(), EtcdError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(EtcdError::Exited {
                        who: self.who(),
                        status: status.to_string(),
                        log: self.log_file.clone(),
                        tail: tail_from(&self.log_file, log_start),
                    });
                }
            }
            // A plain connect is much cheaper than forking etcdctl, but only works from our netns.
            let listening = self.netns.is_some()
                || self
                    .client_url
                    .trim_start_matches("http://")
                    .trim_start_matches("https://")
                    .parse::<SocketAddr>()
                    .map(|a| TcpStream::connect_timeout(&a, Duration::from_millis(200)).is_ok())
                    .unwrap_or(true);
            let last = if listening {
                match self.ctl(&[
                    "--dial-timeout=1s",
                    "--command-timeout=2s",
                    "endpoint",
                    "health",
                ]) {
                    Ok(_) => return Ok(()),
                    Err(e) => e.to_string(),
                }
            } else {
                format!("{} refuses connections", self.client_url)
            };
            if Instant::now() >= deadline {
                return Err(EtcdError::NotReady {
                    who: self.who(),
                    last,
                    log: self.log_file.clone(),
                    tail: tail_from(&self.log_file, log_start),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn who(&self) -> String {
        format!("`{}`{}", self.name, ns_suffix(&self.netns))
    }

    /// Client URLs, e.g. `["http://127.0.0.1:41234"]` (`https://` when started with TLS).
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.client_url.clone()]
    }

    /// The TLS settings this member serves with, if any.
    pub fn tls(&self) -> Option<&EtcdTls> {
        self.tls.as_ref()
    }

    /// Runs etcdctl against this member: in its netns, with its TLS flags (`--cacert`, and
    /// `--cert`/`--key` when a client certificate is configured). Returns stdout.
    pub fn ctl(&self, args: &[&str]) -> Result<String, EtcdError> {
        let tls_args = self
            .tls
            .as_ref()
            .map(EtcdTls::etcdctl_args)
            .unwrap_or_default();
        let mut all: Vec<&str> = tls_args.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        etcdctl(self.netns.as_deref(), &self.endpoints(), &all)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The member name (`--name`).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Keep the data directory when this is stopped or dropped.
    pub fn keep_data_dir(&mut self) {
        self.keep_data = true;
    }

    /// SIGTERM, up to 5 s grace, SIGKILL; reaps the process. Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                cmd::signal(self.pid, libc::SIGTERM);
                let deadline = Instant::now() + STOP_GRACE;
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = child.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        if !self.keep_data {
            let _ = fs::remove_dir_all(&self.data_dir);
        }
    }

    /// Gives up ownership but hands back the process handle, so a caller that kills etcd later
    /// (the lab's `down`, in the same process) can reap it instead of leaving a zombie.
    pub(crate) fn into_child(mut self) -> Option<Child> {
        self.keep_data = true;
        self.child.take()
    }

    /// Leaves etcd running (and its data in place) and returns its pid, e.g. for `tweed-lab up`.
    pub fn detach(mut self) -> u32 {
        // Dropping a std Child neither kills nor waits; our parent-less child is reaped by init
        // once we exit.
        self.child = None;
        self.keep_data = true;
        self.pid
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `etcdctl` (API v3) against `endpoints`, inside `netns` if given; returns its stdout.
pub fn etcdctl(
    netns: Option<&str>,
    endpoints: &[String],
    args: &[&str],
) -> Result<String, EtcdError> {
    let bin =
        cmd::find_program("etcdctl").ok_or(EtcdError::MissingBinary("etcdctl", "etcd-client"))?;
    let mut c = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    c.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .args(args)
        .stdin(Stdio::null());
    Ok(cmd::run(&mut c)?)
}

fn url(ip: IpAddr, port: u16) -> String {
    scheme_url("http", ip, port)
}

fn scheme_url(scheme: &str, ip: IpAddr, port: u16) -> String {
    format!("{scheme}://{}", SocketAddr::new(ip, port))
}

fn is_empty_or_missing(dir: &Path) -> bool {
    match fs::read_dir(dir) {
        Ok(mut it) => it.next().is_none(),
        Err(_) => true,
    }
}

/// Where the log ends now: a start's error tail is what comes after.
fn log_len(log: &Path) -> u64 {
    fs::metadata(log).map(|m| m.len()).unwrap_or(0)
}

fn tail_from(log: &Path, start: u64) -> String {
    let full = cmd::tail(log, LOG_TAIL_LINES * 4);
    // Drop lines from earlier attempts when the log was appended to; a rough cut is fine here.
    let len = fs::metadata(log).map(|m| m.len()).unwrap_or(0);
    let new_bytes = len.saturating_sub(start) as usize;
    let cut = full.len().saturating_sub(new_bytes);
    let text = full.get(cut..).unwrap_or(&full);
    let lines: Vec<&str> = text.lines().collect();
    let keep = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
    if keep.is_empty() {
        "(no output)".into()
    } else {
        keep.join("\n")
    }
}

fn pick_ports(opts: &EtcdOptions) -> Result<(u16, u16), EtcdError> {
    if opts.client_port != 0 && opts.peer_port != 0 {
        return Ok((opts.client_port, opts.peer_port));
    }
    let err = |source| EtcdError::NoFreePort {
        ip: opts.listen_ip,
        netns: opts.netns.clone(),
        source,
    };
    let (a, b) = match &opts.netns {
        None => free_port_pair(opts.listen_ip).map_err(err)?,
        Some(ns) => {
            let ns_path = Path::new("/run/netns").join(ns);
            let ip = opts.listen_ip;
            // setns(2) only moves the calling thread, so a throw-away thread can probe the
            // namespace's ports without disturbing anyone else.
            std::thread::spawn(move || -> io::Result<(u16, u16)> {
                let f = fs::File::open(&ns_path)?;
                use std::os::fd::AsRawFd;
                // SAFETY: a valid fd; affects only this short-lived thread.
                if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                free_port_pair(ip)
            })
            .join()
            .map_err(|_| err(io::Error::other("port probe thread panicked")))?
            .map_err(err)?
        }
    };
    let client = if opts.client_port != 0 {
        opts.client_port
    } else {
        a
    };
    let peer = match opts.peer_port {
        0 if b == client => a,
        0 => b,
        p => p,
    };
    Ok((client, peer))
}

fn free_port_pair(ip: IpAddr) -> io::Result<(u16, u16)> {
    // Hold both at once so they differ.
    let a = TcpListener::bind((ip, 0))?;
    let b = TcpListener::bind((ip, 0))?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn have_etcd() -> bool {
        cmd::find_program("etcd").is_some() && cmd::find_program("etcdctl").is_some()
    }

    #[test]
    fn urls_bracket_ipv6() {
        assert_eq!(
            url("127.0.0.1".parse().unwrap(), 2379),
            "http://127.0.0.1:2379"
        );
        assert_eq!(url("::1".parse().unwrap(), 2379), "http://[::1]:2379");
    }

    #[test]
    fn tls_flags_for_etcd_and_etcdctl() {
        let mut t = EtcdTls {
            cert_file: "/c/server.pem".into(),
            key_file: "/c/server-key.pem".into(),
            ca_file: "/c/ca.pem".into(),
            client_cert_auth: false,
            client_cert_file: None,
            client_key_file: None,
        };
        assert_eq!(
            t.etcd_args(),
            vec!["--cert-file=/c/server.pem", "--key-file=/c/server-key.pem"]
        );
        assert_eq!(t.etcdctl_args(), vec!["--cacert=/c/ca.pem"]);
        t.client_cert_auth = true;
        t.client_cert_file = Some("/c/client.pem".into());
        t.client_key_file = Some("/c/client-key.pem".into());
        assert_eq!(
            &t.etcd_args()[2..],
            ["--trusted-ca-file=/c/ca.pem", "--client-cert-auth"]
        );
        assert_eq!(
            t.etcdctl_args(),
            vec![
                "--cacert=/c/ca.pem",
                "--cert=/c/client.pem",
                "--key=/c/client-key.pem"
            ]
        );
        assert_eq!(
            scheme_url("https", "127.0.0.1".parse().unwrap(), 2379),
            "https://127.0.0.1:2379"
        );
    }

    #[test]
    fn default_log_sits_beside_data_dir() {
        let o = EtcdOptions::local("x", "/tmp/abc/etcd-data");
        assert_eq!(o.log_path(), PathBuf::from("/tmp/abc/etcd-data.log"));
    }

    #[test]
    fn missing_binary_names_the_package() {
        let e = EtcdError::MissingBinary("etcd", "etcd-server");
        assert!(e.to_string().contains("apt-get install etcd-server"), "{e}");
    }

    #[test]
    fn start_local_put_get_and_drop_kills() {
        assert!(
            have_etcd(),
            "etcd/etcdctl missing: apt-get install etcd-server etcd-client"
        );
        let dir = tempfile::tempdir().unwrap();
        let etcd = EtcdProcess::start_local(dir.path()).unwrap();
        let eps = etcd.endpoints();
        assert_eq!(eps.len(), 1);
        assert!(eps[0].starts_with("http://127.0.0.1:"), "{eps:?}");
        etcdctl(
            None,
            &eps,
            &[
                "put",
                "/coreos.com/network/config",
                r#"{"Network":"10.244.0.0/16"}"#,
            ],
        )
        .unwrap();
        let got = etcdctl(
            None,
            &eps,
            &["get", "--print-value-only", "/coreos.com/network/config"],
        )
        .unwrap();
        assert_eq!(got.trim(), r#"{"Network":"10.244.0.0/16"}"#);

        let pid = etcd.pid();
        let data = etcd.data_dir().to_path_buf();
        assert!(cmd::pid_alive(pid));
        drop(etcd);
        assert!(!cmd::pid_alive(pid), "etcd {pid} still alive after drop");
        assert!(!data.exists(), "data dir not removed");
        assert!(etcdctl(None, &eps, &["--dial-timeout=300ms", "get", "x"]).is_err());
    }

    #[test]
    fn two_local_etcds_run_side_by_side() {
        let d1 = tempfile::tempdir().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        let (e1, e2) = std::thread::scope(|s| {
            let a = s.spawn(|| EtcdProcess::start_local(d1.path()));
            let b = s.spawn(|| EtcdProcess::start_local(d2.path()));
            (a.join().unwrap().unwrap(), b.join().unwrap().unwrap())
        });
        assert_ne!(e1.endpoints(), e2.endpoints());
        etcdctl(None, &e1.endpoints(), &["put", "k", "one"]).unwrap();
        let v = etcdctl(None, &e2.endpoints(), &["get", "--print-value-only", "k"]).unwrap();
        assert_eq!(v.trim(), "");
    }

    #[test]
    fn three_member_cluster_starts_together_and_survives_losing_one() {
        assert!(have_etcd(), "etcd/etcdctl missing");
        let dir = tempfile::tempdir().unwrap();
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let mut members: Vec<EtcdOptions> = (1..=3)
            .map(|i| {
                let (c, p) = free_port_pair(lo).unwrap();
                let mut o = EtcdOptions::local(format!("m{i}"), dir.path().join(format!("m{i}")));
                o.client_port = c;
                o.peer_port = p;
                o.cluster_token = Some("t-cluster".into());
                o
            })
            .collect();
        EtcdOptions::join_as_cluster(&mut members);
        let mut cluster = EtcdProcess::start_cluster(members, false).unwrap();
        let all: Vec<String> = cluster.iter().flat_map(|m| m.endpoints()).collect();
        assert_eq!(all.len(), 3);
        let list = etcdctl(None, &all[..1], &["member", "list"]).unwrap();
        assert_eq!(list.lines().count(), 3, "{list}");
        etcdctl(None, &all, &["put", "k", "v"]).unwrap();
        // Losing one member keeps a quorum.
        cluster.remove(0).stop();
        let v = etcdctl(None, &all[1..], &["get", "--print-value-only", "k"]).unwrap();
        assert_eq!(v.trim(), "v");
    }

    #[test]
    fn keep_data_dir_survives_stop() {
        let dir = tempfile::tempdir().unwrap();
        let mut etcd = EtcdProcess::start_local(dir.path()).unwrap();
        etcd.keep_data_dir();
        etcd.stop();
        assert!(dir.path().join("etcd-data/member").is_dir());
        assert!(dir.path().join("etcd.log").is_file());
    }

    #[test]
    fn port_in_use_fails_fast_with_log_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = EtcdOptions::local("bad", dir.path().join("d"));
        // A port that is in use by our own listener: etcd must exit and we must say why.
        let l = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        opts.client_port = l.local_addr().unwrap().port();
        opts.peer_port = {
            let l2 = TcpListener::bind(("127.0.0.1", 0)).unwrap();
            l2.local_addr().unwrap().port()
        };
        let t = Instant::now();
        let err = EtcdProcess::start(opts).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(20));
        let msg = err.to_string();
        assert!(matches!(err, EtcdError::Exited { .. }), "{msg}");
        assert!(msg.contains("address already in use"), "{msg}");
    }

    #[test]
    fn runs_inside_a_netns_when_root() {
        tweed_testkit::require_root!("a network namespace");
        let guard = tweed_testkit::NetnsGuard::unique("twl-etcdt");
        let ns = guard.name().to_string();
        let dir = tempfile::tempdir().unwrap();
        let mut opts = EtcdOptions::local("nstest", dir.path().join("d"));
        opts.netns = Some(ns.clone());
        let etcd = EtcdProcess::start(opts).unwrap();
        etcdctl(Some(&ns), &etcd.endpoints(), &["put", "a", "b"]).unwrap();
        let v = etcdctl(
            Some(&ns),
            &etcd.endpoints(),
            &["get", "--print-value-only", "a"],
        )
        .unwrap();
        assert_eq!(v.trim(), "b");
        // Not reachable from our own namespace: the member really lives in the netns.
        assert!(etcdctl(
            None,
            &etcd.endpoints(),
            &["--dial-timeout=300ms", "get", "a"]
        )
        .is_err());
        let pid = etcd.pid();
        drop(etcd);
        assert!(!cmd::pid_alive(pid));
    }

    #[test]
    fn netns_that_does_not_exist_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = EtcdOptions::local("x", dir.path().join("d"));
        opts.netns = Some("twl-no-such-ns".into());
        let err = EtcdProcess::start(opts).unwrap_err();
        assert!(err.to_string().contains("twl-no-such-ns"), "{err}");
    }
}
