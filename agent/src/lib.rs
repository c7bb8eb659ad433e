//! tweedd: the tweed node agent.
//!
//! Layers, from the outside in: `main.rs` loads [`settings`] and calls [`run::run`], which
//! connects etcd, the kernel and the firewall and hands them to [`run::run_with`], the agent's
//! loop. The loop wires a [`registry::Registry`] (etcd or in-memory) to a backend through pure
//! pieces ([`alloc`], [`watch`]) and a single netlink layer ([`netlink`]) that is the only code
//! talking to the kernel.

pub mod alloc;
pub mod api;
pub mod backend;
pub mod http;
pub mod ipv6;
pub mod metrics;
pub mod notify;
pub mod offload;
pub mod state;
pub use tweed_netlink as netlink;
pub mod registry;
pub mod rules;
pub mod run;
pub mod settings;
pub mod subnet;
pub mod v6only;
pub mod watch;

#[cfg(test)]
mod testutil;
