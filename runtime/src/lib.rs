//! tweed-runtime: a small container runtime for tweed clusters.
//!
//! Images ([`image`]), rootfs with an init layer ([`rootfs`]), namespaces and the container init
//! ([`init`]), cgroups v1 and v2 ([`cgroup`]), the per-container supervisor ([`shim`]), exec
//! ([`exec`]), the CNI client ([`cni`]), and the high-level API `tweedctl` is built on
//! ([`runtime::Runtime`]). A run is checked into a [`plan::Plan`] and started in named stages
//! ([`start`]) that [`release`] undoes.

pub mod caps;
pub mod cgroup;
pub mod cni;
pub mod digest;
pub mod exec;
pub mod fsutil;
pub mod image;
pub mod init;
pub mod inspect;
#[cfg(test)]
mod journal;
pub mod logs;
pub mod netns;
pub mod plan;
pub mod process;
pub mod procview;
pub mod release;
pub mod rootfs;
pub mod runtime;
pub mod seccomp;
pub mod security;
pub mod shim;
pub mod start;
pub mod state;
pub mod syscall;
pub mod sysinfo;
pub mod timefmt;
pub mod units;
pub mod userns;
