//! tweed-lab: a whole tweed cluster on one machine, each host a network namespace.
//!
//! * [`etcd`]: a real etcd for tests (`EtcdProcess::start_local`) and labs.
//! * [`Lab`]: `up`, `load`, `status`, `check`, `exec`, `down`; [`LabGuard`] downs on Drop.
//! * [`pods`]: pods through the tweed CNI plugin (default), as tweedctl containers
//!   ([`containers`]), or wired directly.
//!
//! Nothing here configures the root network namespace: every link, address and route is created
//! inside namespaces named `twl-<lab>-...`.

pub mod cmd;
pub mod containers;
pub mod etcd;
pub mod lab;
pub mod names;
pub mod netns;
pub mod pods;
pub mod state;

pub use lab::{
    down, down_in, Backend, CheckReport, DownReport, EtcdMemberStatus, Lab, LabError, LabGuard,
    LabSpec, PingResult, Status,
};
pub use pods::PodsVia;
