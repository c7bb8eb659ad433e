//! systemd's readiness protocol (`sd_notify`): a datagram to the socket named by `NOTIFY_SOCKET`,
//! `READY=1` once the node is ready, `WATCHDOG=1` while the agent's loop runs (a unit with
//! `WatchdogSec=` restarts an agent whose loop stopped). Without `NOTIFY_SOCKET` (no systemd,
//! `Type=simple`, Kubernetes) nothing is sent.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET {socket:?}: {source}")]
    Send {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    #[error("NOTIFY_SOCKET {socket:?}: neither an absolute path nor an abstract name (@...)")]
    BadSocket { socket: String },
}

/// Where `NOTIFY_SOCKET` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Path(PathBuf),
    /// Linux abstract namespace (`@name`).
    Abstract(Vec<u8>),
}

/// Reads `NOTIFY_SOCKET`'s value as systemd writes it.
pub fn parse_socket(value: &str) -> Result<Target, NotifyError> {
    if let Some(name) = value.strip_prefix('@') {
        if !name.is_empty() {
            return Ok(Target::Abstract(name.as_bytes().to_vec()));
        }
    } else if value.starts_with('/') {
        return Ok(Target::Path(PathBuf::from(value)));
    }
    Err(NotifyError::BadSocket {
        socket: value.to_string(),
    })
}

/// The notification side effect: systemd's socket, or nothing.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    target: Option<(String, Target)>,
    /// `WATCHDOG_USEC` was set for this process: the watchdog is on.
    watchdog: bool,
}

impl Notifier {
    /// From the environment systemd gives a `Type=notify` service. A malformed `NOTIFY_SOCKET`
    /// is an error (the unit would time out waiting for READY otherwise, with no clue why).
    pub fn from_env() -> Result<Notifier, NotifyError> {
        let Some(value) = std::env::var("NOTIFY_SOCKET")
            .ok()
            .filter(|v| !v.is_empty())
        else {
            return Ok(Notifier::default());
        };
        let target = parse_socket(&value)?;
        // WATCHDOG_PID names the process meant; another one (a child) must not feed it.
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|p| p == std::process::id());
        let watchdog = for_us
            && std::env::var("WATCHDOG_USEC")
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|us| us > 0);
        Ok(Notifier {
            target: Some((value, target)),
            watchdog,
        })
    }

    /// A notifier for `target`, watchdog on (tests).
    pub fn to(target: Target) -> Notifier {
        Notifier {
            target: Some((format!("{target:?}"), target)),
            watchdog: true,
        }
    }

    pub fn ready(&self) -> Result<(), NotifyError> {
        self.send("READY=1\nSTATUS=lease held, data plane programmed")
    }

    /// Feeds the watchdog, if systemd runs one for us.
    pub fn watchdog(&self) -> Result<(), NotifyError> {
        if self.watchdog {
            self.send("WATCHDOG=1")
        } else {
            Ok(())
        }
    }

    pub fn status(&self, status: &str) -> Result<(), NotifyError> {
        self.send(&format!("STATUS={status}"))
    }

    fn send(&self, msg: &str) -> Result<(), NotifyError> {
        let Some((socket, target)) = &self.target else {
            return Ok(());
        };
        let err = |source| NotifyError::Send {
            socket: socket.clone(),
            source,
        };
        let addr = match target {
            Target::Path(p) => SocketAddr::from_pathname(p).map_err(err)?,
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name).map_err(err)?
            }
        };
        let sock = UnixDatagram::unbound().map_err(err)?;
        sock.send_to_addr(msg.as_bytes(), &addr).map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_values() {
        assert_eq!(
            parse_socket("/run/systemd/notify").unwrap(),
            Target::Path("/run/systemd/notify".into())
        );
        assert_eq!(
            parse_socket("@/org/x").unwrap(),
            Target::Abstract(b"/org/x".to_vec())
        );
        for bad in ["", "@", "relative/path", "notify"] {
            let e = parse_socket(bad).unwrap_err().to_string();
            assert!(e.contains("NOTIFY_SOCKET"), "{e}");
        }
    }

    #[test]
    fn ready_and_watchdog_reach_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::to(Target::Path(path));
        n.ready().unwrap();
        n.watchdog().unwrap();
        let mut buf = [0u8; 256];
        let len = server.recv(&mut buf).unwrap();
        assert!(std::str::from_utf8(&buf[..len])
            .unwrap()
            .starts_with("READY=1\n"));
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
        // Without systemd nothing is sent and nothing fails.
        Notifier::default().ready().unwrap();
        Notifier::default().watchdog().unwrap();
    }

    #[test]
    fn an_abstract_socket_is_reached_too() {
        let name = format!("tweed-notify-test-{}", std::process::id());
        use std::os::linux::net::SocketAddrExt;
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        Notifier::to(Target::Abstract(name.into_bytes()))
            .watchdog()
            .unwrap();
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }
}
