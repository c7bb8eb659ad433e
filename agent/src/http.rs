//! `/metrics`, `/healthz` (liveness: the main loop runs) and `/readyz` (lease held, backend
//! device up and every peer programmed, watch live, subnet.env written) on `--metrics-addr`.
//! Both answer JSON saying what is missing.
//!
//! The listener keeps the default bind on all addresses: the DaemonSet's probes, Prometheus and
//! the lab reach it on the node's address. So anyone who can reach the node can open connections
//! to it, and the server must survive them: a cap on connections in total and per source
//! address (over it, a connection is closed at once, so the backlog never fills), a deadline for
//! the request head (slowloris), one for each response, and a maximum connection age.

use crate::state::AgentState;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tower::ServiceExt;

pub fn router(state: AgentState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(s): State<AgentState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
}

async fn readyz(State(s): State<AgentState>) -> impl IntoResponse {
    let snap = s.snapshot();
    let reasons = snap.not_ready();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let body = serde_json::json!({
        "ready": reasons.is_empty(),
        "reasons": reasons,
        // Reported only: an idle peer may rightly have no handshake.
        "stale_peers": crate::state::stale_wg_peers(&snap.wg_peers, now_ms),
        "lease_held": snap.lease_held,
        "backend_programmed": snap.backend_programmed,
        "watch_live": snap.watch_live,
        "subnet_env_written": snap.subnet_env_written,
    });
    let code = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(code, body)
}

async fn healthz(State(s): State<AgentState>) -> impl IntoResponse {
    match s.snapshot().not_alive(std::time::Instant::now()) {
        None => json(StatusCode::OK, serde_json::json!({"alive": true})),
        Some(reason) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"alive": false, "reason": reason}),
        ),
    }
}

fn json(code: StatusCode, body: serde_json::Value) -> impl IntoResponse {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body}\n"),
    )
}

/// What one client may hold of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections open at once, all clients together.
    pub max_connections: usize,
    /// Connections open at once from one source address: one misbehaving client cannot take
    /// the whole budget from the probes and Prometheus.
    pub max_per_ip: usize,
    /// Time to send a whole request head, from the first byte (and for an idle keep-alive
    /// connection, until the next request starts).
    pub header_timeout: Duration,
    /// Time to produce a response.
    pub response_timeout: Duration,
    /// A connection is closed after this long whatever it does (a reader that never drains a
    /// response, or a keep-alive connection held for ever).
    pub max_age: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 256,
            max_per_ip: 32,
            header_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(10),
            max_age: Duration::from_secs(120),
        }
    }
}

/// Open connections, in total and per source address. A slot is given back when its
/// [`Slot`] drops, whichever way the connection ended.
#[derive(Debug, Default)]
struct Conns {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

#[derive(Debug)]
struct Slot {
    conns: Arc<Mutex<Conns>>,
    ip: IpAddr,
}

/// Takes a slot for a connection from `ip`, or says why not. Pure bookkeeping, tested alone.
fn admit(conns: &Arc<Mutex<Conns>>, ip: IpAddr, limits: &HttpLimits) -> Result<Slot, &'static str> {
    let mut c = conns.lock().unwrap_or_else(|p| p.into_inner());
    if c.total >= limits.max_connections {
        return Err("connection limit reached");
    }
    let n = c.per_ip.entry(ip).or_default();
    if *n >= limits.max_per_ip {
        return Err("per-address connection limit reached");
    }
    *n += 1;
    c.total += 1;
    Ok(Slot {
        conns: conns.clone(),
        ip,
    })
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        c.total -= 1;
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

/// Serves until `shutdown` resolves, with the default [`HttpLimits`]. Takes a bound listener so
/// callers (and tests) choose the port.
pub async fn serve(
    listener: TcpListener,
    state: AgentState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, state, HttpLimits::default(), shutdown).await
}

pub async fn serve_with(
    listener: TcpListener,
    state: AgentState,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state);
    let conns = Arc::new(Mutex::new(Conns::default()));
    let (closing, closed) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    let mut refused_logged = false;
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // Out of file descriptors and the like: wait a moment rather than spin.
                Err(e) => {
                    tracing::warn!("metrics server: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let slot = match admit(&conns, peer.ip(), &limits) {
            Ok(s) => s,
            Err(why) => {
                if !refused_logged {
                    tracing::warn!(%peer, "metrics server: {why}; closing new connections until some end");
                    refused_logged = true;
                }
                drop(stream);
                continue;
            }
        };
        refused_logged = false;
        let app = app.clone();
        let mut closed = closed.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = hyper::service::service_fn(move |req| {
                let app = app.clone();
                async move {
                    match tokio::time::timeout(limits.response_timeout, app.oneshot(req)).await {
                        Ok(r) => r,
                        Err(_) => Ok((StatusCode::SERVICE_UNAVAILABLE, "response timed out\n")
                            .into_response()),
                    }
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let age = tokio::time::sleep(limits.max_age);
            tokio::pin!(age);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = &mut age => {}
                _ = closed.wait_for(|c| *c) => {}
            }
            // Finish the request in flight, then close; a client that does not let us finish
            // gets one more header timeout.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(limits.header_timeout, conn).await;
        });
    }
    let _ = closing.send(true);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_caps_total_and_per_address_and_gives_slots_back() {
        let limits = HttpLimits {
            max_connections: 3,
            max_per_ip: 2,
            ..HttpLimits::default()
        };
        let conns = Arc::new(Mutex::new(Conns::default()));
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        let b: IpAddr = "198.18.0.2".parse().unwrap();
        let c: IpAddr = "198.18.0.3".parse().unwrap();
        let a1 = admit(&conns, a, &limits).unwrap();
        let _a2 = admit(&conns, a, &limits).unwrap();
        assert_eq!(
            admit(&conns, a, &limits).unwrap_err(),
            "per-address connection limit reached"
        );
        let _b1 = admit(&conns, b, &limits).unwrap();
        assert_eq!(
            admit(&conns, c, &limits).unwrap_err(),
            "connection limit reached"
        );
        drop(a1);
        let _c1 = admit(&conns, c, &limits).unwrap();
        assert_eq!(conns.lock().unwrap().total, 3);
        assert_eq!(conns.lock().unwrap().per_ip.get(&a), Some(&1));
    }
}
