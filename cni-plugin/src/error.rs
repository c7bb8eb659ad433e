//! Every way a verb can fail, each with its CNI error code, and the JSON error document that
//! goes to stdout (libcni reads only stdout).

use std::path::PathBuf;

use serde::Serialize;

use crate::conf::ConfError;
use crate::env::EnvError;
use crate::ipam::IpamError;
use crate::masq::MasqError;
use crate::result::ResultError;

/// The codes of the CNI spec (0-99), and tweed's own (100 and up).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// The kernel refused a change or a query (the message names the netns, device and op).
    pub const NETLINK: u32 = 100;
    /// No free address is left in the node subnet (or in the configured range).
    pub const EXHAUSTED: u32 = 101;
    /// CHECK found the container's networking differing from what ADD set up.
    pub const CHECK_FAILED: u32 = 102;
    /// An address asked for (runtimeConfig `ips`, `CNI_ARGS` `IP=`) cannot be given.
    pub const ADDRESS_UNAVAILABLE: u32 = 103;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Env(#[from] EnvError),
    #[error(transparent)]
    Conf(#[from] ConfError),
    #[error(transparent)]
    Result(#[from] ResultError),
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    Masq(#[from] MasqError),
    #[error("reading the network configuration from stdin: {0}")]
    Stdin(#[source] std::io::Error),
    #[error("{verb} needs cniVersion {need} or later; the configuration says {have}")]
    VerbNeedsVersion {
        verb: &'static str,
        need: &'static str,
        have: String,
    },
    #[error(
        "tweed is not ready on this node: {} is missing ({reason}); tweedd writes it once it holds \
         a subnet lease (is tweedd, or flanneld, running?)",
        path.display()
    )]
    NotReady { path: PathBuf, reason: String },
    #[error("subnet.env {}: {reason}", path.display())]
    SubnetEnv { path: PathBuf, reason: String },
    #[error("container network namespace {}: {reason}", path.display())]
    Netns { path: PathBuf, reason: String },
    #[error("{what}: {reason}")]
    Kernel { what: String, reason: String },
    #[error("starting the netlink driver: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("CHECK of {ifname} in {netns}: {reason}")]
    Check {
        ifname: String,
        netns: String,
        reason: String,
    },
}

impl Error {
    pub fn code(&self) -> u32 {
        match self {
            Error::Env(_) => code::INVALID_ENV,
            Error::Conf(e) => e.code(),
            Error::Result(_) => code::DECODE,
            Error::Ipam(e) => e.code(),
            Error::Masq(_) => code::IO,
            Error::Stdin(_) => code::IO,
            Error::VerbNeedsVersion { .. } => code::INCOMPATIBLE_VERSION,
            Error::NotReady { .. } => code::TRY_AGAIN_LATER,
            Error::SubnetEnv { .. } => code::INVALID_CONFIG,
            Error::Netns { .. } => code::UNKNOWN_CONTAINER,
            Error::Kernel { .. } | Error::Runtime(_) => code::NETLINK,
            Error::Check { .. } => code::CHECK_FAILED,
        }
    }

    /// A short summary for `msg`; the full chain goes to `details`.
    pub fn summary(&self) -> &'static str {
        match self.code() {
            code::INCOMPATIBLE_VERSION => "incompatible CNI version",
            code::UNSUPPORTED_FIELD => "unsupported field in network configuration",
            code::UNKNOWN_CONTAINER => "container unknown or does not exist",
            code::INVALID_ENV => "invalid environment variables",
            code::IO => "I/O failure",
            code::DECODE => "failed to decode content",
            code::INVALID_CONFIG => "invalid network configuration",
            code::TRY_AGAIN_LATER => "try again later",
            code::NOT_AVAILABLE => "plugin not available",
            code::NETLINK => "kernel refused a network change",
            code::EXHAUSTED => "no free address",
            code::CHECK_FAILED => "CHECK failed",
            code::ADDRESS_UNAVAILABLE => "requested address unavailable",
            _ => "error",
        }
    }
}

/// The spec's error document.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ErrorDoc {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl ErrorDoc {
    /// `msg` carries the whole explanation (runtimes often show only `msg`), `details` the
    /// category, so a reader of either learns what failed.
    pub fn new(cni_version: &str, err: &Error) -> ErrorDoc {
        ErrorDoc {
            cni_version: cni_version.to_string(),
            code: err.code(),
            msg: err.to_string(),
            details: format!("tweed: {}", err.summary()),
        }
    }

    /// A STATUS "not available" answer (code 50).
    pub fn not_available(cni_version: &str, msg: String) -> ErrorDoc {
        ErrorDoc {
            cni_version: cni_version.to_string(),
            code: code::NOT_AVAILABLE,
            msg,
            details: "tweed: plugin not available".into(),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("error doc serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_doc_shape() {
        let e = Error::NotReady {
            path: "/run/tweed/subnet.env".into(),
            reason: "No such file or directory".into(),
        };
        let doc = ErrorDoc::new("1.0.0", &e);
        let v: serde_json::Value = serde_json::from_str(&doc.to_json()).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["code"], 11);
        assert!(v["msg"]
            .as_str()
            .unwrap()
            .contains("/run/tweed/subnet.env is missing"));
        assert_eq!(v["details"], "tweed: try again later");
    }
}
