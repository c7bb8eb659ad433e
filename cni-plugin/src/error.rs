//! Every way an invocation can fail, as one enum over the modules' own errors, and the JSON
//! error document that goes to stdout (libcni reads only stdout). The CNI codes are in
//! [`crate::code`]; each module's error says which it is.

use serde::Serialize;

use crate::cmd::check::CheckError;
use crate::cmd::VerbError;
use crate::code;
use crate::conf::ConfError;
use crate::detach::DetachError;
use crate::env::EnvError;
use crate::host::HostError;
use crate::ipam::IpamError;
use crate::masq::MasqError;
use crate::node::NodeError;
use crate::result::ResultError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Env(#[from] EnvError),
    #[error(transparent)]
    Conf(#[from] ConfError),
    #[error(transparent)]
    Result(#[from] ResultError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Detach(#[from] DetachError),
    #[error(transparent)]
    Masq(#[from] MasqError),
    #[error(transparent)]
    Verb(#[from] VerbError),
    #[error(transparent)]
    Check(#[from] CheckError),
    #[error("reading the network configuration from stdin: {0}")]
    Stdin(#[source] std::io::Error),
}

impl Error {
    pub fn code(&self) -> u32 {
        match self {
            Error::Env(_) => code::INVALID_ENV,
            Error::Conf(e) => e.code(),
            Error::Result(_) => code::DECODE,
            Error::Node(e) => e.code(),
            Error::Ipam(e) => e.code(),
            Error::Host(e) => e.code(),
            Error::Detach(e) => e.code(),
            Error::Masq(_) | Error::Stdin(_) => code::IO,
            Error::Verb(_) => code::INCOMPATIBLE_VERSION,
            Error::Check(_) => code::CHECK_FAILED,
        }
    }

    /// A short summary for `details`.
    pub fn summary(&self) -> &'static str {
        code::summary(self.code())
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
            details: format!("tweed: {}", code::summary(code::NOT_AVAILABLE)),
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
        let e = Error::Node(NodeError::NotReady {
            path: "/run/tweed/subnet.env".into(),
            reason: "No such file or directory".into(),
        });
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
