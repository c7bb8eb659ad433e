//! [`LabError`]: everything `up`, `down`, `status`, `check` and `exec` can fail with. The errors of
//! the pieces (a command, etcd, a CNI call, tweedctl, state.json) come through whole.

use std::io;
use std::path::{Path, PathBuf};

use tweed_config::subnet_env::SubnetEnvError;

use crate::cmd::CmdError;
use crate::cni::CniError;
use crate::containers::RuntimeError;
use crate::etcd::EtcdError;
use crate::names::NameError;
use crate::state::StateError;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("{0}")]
    Spec(String),
    #[error("tweed-lab needs root: it creates network namespaces (try sudo)")]
    NotRoot,
    #[error("`{program}` not found in PATH: install the Debian package `{package}`")]
    MissingProgram {
        program: &'static str,
        package: &'static str,
    },
    #[error("lab `{name}` already exists ({detail}): run `tweed-lab down --name {name}` first")]
    Exists { name: String, detail: String },
    #[error("no lab named `{name}`: {} not found{hint}", path.display())]
    NotFound {
        name: String,
        path: PathBuf,
        hint: String,
    },
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error(transparent)]
    Etcd(Box<EtcdError>),
    #[error(transparent)]
    SubnetEnv(#[from] SubnetEnvError),
    #[error(transparent)]
    Cni(Box<CniError>),
    #[error(transparent)]
    Runtime(Box<RuntimeError>),
    #[error("tweedd on {host} (netns {netns}): {reason}; tail of {}:\n{tail}", log.display())]
    Agent {
        host: String,
        netns: String,
        reason: String,
        log: PathBuf,
        tail: String,
    },
    #[error("lab `{lab}` has no {target:?}: use underlay, outside, hN or hN/pM")]
    UnknownTarget { lab: String, target: String },
    #[error("interrupted")]
    Interrupted,
    #[error("tearing down lab `{name}` left problems:\n  {}", errors.join("\n  "))]
    Teardown { name: String, errors: Vec<String> },
}

impl From<EtcdError> for LabError {
    fn from(e: EtcdError) -> Self {
        LabError::Etcd(Box::new(e))
    }
}

impl From<CniError> for LabError {
    fn from(e: CniError) -> Self {
        LabError::Cni(Box::new(e))
    }
}

impl From<RuntimeError> for LabError {
    fn from(e: RuntimeError) -> Self {
        LabError::Runtime(Box::new(e))
    }
}

/// A file operation that failed, with the path it failed on; every error enum of the crate
/// carries it whole.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}: {source}", path.display())]
pub struct IoError {
    pub what: &'static str,
    pub path: PathBuf,
    pub source: io::Error,
}

/// `map_err(io_err("cannot create", &dir))?`, into any error that holds an [`IoError`].
pub(crate) fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> IoError {
    let path = path.to_path_buf();
    move |source| IoError { what, path, source }
}
