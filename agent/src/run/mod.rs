//! Running the agent. [`run`] connects the real world (etcd, the kernel's netlink, iptables or
//! nftables, the system clock) and starts the HTTP and gRPC servers; [`run_with`] is the agent
//! itself, which takes those side effects as a [`Deps`] value so tests hand it fakes.
//!
//! Inside: [`main_loop`] (start-up, then one `select!`), [`lease`] (acquiring and renewing this
//! node's lease), [`feed`] (the watch on everyone's leases), [`dataplane`] (backend, rules and
//! subnet.env) and [`report`] (what the servers show: state, metrics, events).

mod dataplane;
mod deps;
#[cfg(test)]
mod echo_root_tests;
mod feed;
mod lease;
mod main_loop;
mod nftmon;
mod repair;
mod report;
mod rulecheck;
mod stop;
#[cfg(test)]
mod tests;
mod underlay6;
mod v6only;
#[cfg(test)]
mod v6only_tests;
mod v6only_wg;

pub use deps::{Clock, Deps};
pub use main_loop::run_with;
/// The status' `ipv6` of a node in an IPv6-only network.
pub use report::IPV6_ONLY as IPV6_ONLY_STATUS;

use crate::netlink::{self, Netlink};
use crate::registry::{EtcdRegistry, Registry, RegistryError};
use crate::rules::Firewall;
use crate::settings::Settings;
use crate::state::AgentState;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use stop::Stop;
use tracing::{error, info};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Netlink(#[from] netlink::NetlinkError),
    #[error(transparent)]
    Iface(#[from] netlink::IfaceError),
    #[error(transparent)]
    Backend(#[from] crate::backend::BackendError),
    #[error(transparent)]
    SubnetEnv(#[from] tweed_config::subnet_env::SubnetEnvError),
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    #[error(transparent)]
    V6Only(#[from] crate::v6only::V6OnlyError),
    #[error(transparent)]
    Notify(#[from] crate::notify::NotifyError),
    #[error("--metrics-addr {addr}: {source}")]
    MetricsListen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// A task the agent cannot work without ended; a restart starts it again.
    #[error("the {task} task died: {cause}")]
    TaskDied { task: &'static str, cause: String },
}

impl AgentError {
    /// What became of a task that should have run as long as the agent.
    fn task_died(task: &'static str, end: Result<(), tokio::task::JoinError>) -> AgentError {
        let cause = match end {
            Ok(()) => "it returned".to_string(),
            Err(e) if e.is_panic() => {
                let p = e.into_panic();
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".into());
                format!("panicked: {msg}")
            }
            Err(e) => e.to_string(),
        };
        AgentError::TaskDied { task, cause }
    }
}

/// Runs the agent until `shutdown` resolves. Returns an error for what a restart may fix or an
/// operator must (bad TLS files, no usable interface, an unsupported backend, a task that died);
/// etcd outages are waited out.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let stop = Stop::new(shutdown);
    for w in settings.security_warnings() {
        tracing::warn!("SECURITY: {w}");
    }
    // The servers come first, so /healthz and the API answer while etcd or the config is awaited.
    let state = AgentState::new();
    state.update(|s| {
        s.node = hostname();
        s.etcd_endpoints = settings.etcd_endpoints.join(",");
    });
    let mut servers = Vec::new();
    if let Some(addr) = settings.metrics_addr.0 {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| AgentError::MetricsListen { addr, source })?;
        info!(%addr, "serving /metrics, /healthz, /readyz");
        servers.push(serve_until_stop("metrics server: ", &stop, |stopped| {
            crate::http::serve_with(listener, state.clone(), settings.http_limits(), stopped)
        }));
    }
    let api_listener = crate::api::bind(&settings.api_socket)?;
    info!(socket = %settings.api_socket.display(), "serving the gRPC API");
    let control = crate::api::ControlSlot::default();
    // ApiError names the API server itself.
    servers.push(serve_until_stop("", &stop, |stopped| {
        crate::api::serve(api_listener, state.clone(), control.clone(), stopped)
    }));

    let result = match real_deps(&settings, state, control).await {
        Ok(deps) => run_with(deps, settings, stop.clone().wait_owned()).await,
        Err(e) => Err(e),
    };
    // An error ends the agent without a shutdown signal: the servers must not keep it alive.
    let graceful = stop.stopped();
    for s in servers {
        if !graceful {
            s.abort();
        }
        let _ = s.await;
    }
    result
}

/// etcd, the kernel of this network namespace, the firewall `--nftables` names, the system clock.
async fn real_deps(
    settings: &Settings,
    state: AgentState,
    control: crate::api::ControlSlot,
) -> Result<Deps, AgentError> {
    Ok(Deps {
        registry: Arc::new(Registry::etcd(
            EtcdRegistry::connect(settings.etcd()).await?,
        )),
        netlink: Netlink::real()?,
        firewall: Firewall::new(settings.nftables),
        clock: Clock::System,
        state,
        control,
        notifier: crate::notify::Notifier::from_env()?,
        ipv6_addrs: crate::ipv6::Ipv6Addrs::Proc,
    })
}

/// Runs a server on the runtime until `stop`; when it fails, its error is logged after `prefix`.
fn serve_until_stop<E, F>(
    prefix: &'static str,
    stop: &Stop,
    serve: impl FnOnce(Pin<Box<dyn Future<Output = ()> + Send>>) -> F,
) -> tokio::task::JoinHandle<()>
where
    E: std::fmt::Display + Send + 'static,
    F: Future<Output = Result<(), E>> + Send + 'static,
{
    let served = serve(Box::pin(stop.clone().wait_owned()));
    tokio::spawn(async move {
        if let Err(e) = served.await {
            error!("{prefix}{e}");
        }
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}
