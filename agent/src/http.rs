//! `/metrics`, `/healthz` (liveness: the main loop runs) and `/readyz` (lease held, backend
//! device up and every peer programmed, watch live, subnet.env written) on `--metrics-addr`.
//! Both answer JSON saying what is missing.

use crate::state::AgentState;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::future::Future;
use tokio::net::TcpListener;

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
    let body = serde_json::json!({
        "ready": reasons.is_empty(),
        "reasons": reasons,
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

/// Serves until `shutdown` resolves. Takes a bound listener so callers (and tests) choose the port.
pub async fn serve(
    listener: TcpListener,
    state: AgentState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
