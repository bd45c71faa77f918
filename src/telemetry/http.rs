//! The HTTP endpoints: the three probes and `/metrics`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use super::Telemetry;

fn status(ok: bool, body: &str) -> Response {
    let code = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, [(header::CONTENT_TYPE, "application/json")], format!("{{\"status\":{}}}\n", serde_json::Value::from(body)))
        .into_response()
}

async fn live(State(t): State<Arc<Telemetry>>) -> Response {
    match t.stalled_for() {
        None => status(true, "alive"),
        Some(quiet) => {
            let body = serde_json::json!({ "status": "stalled", "no_progress_ms": quiet.as_millis() as u64 });
            (StatusCode::SERVICE_UNAVAILABLE, [(header::CONTENT_TYPE, "application/json")], format!("{body}\n"))
                .into_response()
        }
    }
}

async fn ready(State(t): State<Arc<Telemetry>>) -> Response {
    let role = t.role();
    // A standby is healthy and ready to take over; it reports so, with its role.
    let (ok, reason) = t.readiness();
    let code = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = serde_json::json!({ "status": if ok { "ready" } else { reason }, "role": role.as_str() });
    (code, [(header::CONTENT_TYPE, "application/json")], format!("{body}\n")).into_response()
}

async fn startup(State(t): State<Arc<Telemetry>>) -> Response {
    let ok = t.started.load(Ordering::SeqCst);
    status(ok, if ok { "started" } else { "starting" })
}

async fn metrics(State(t): State<Arc<Telemetry>>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], t.render()).into_response()
}

/// Binds `addr` and serves the probes and metrics until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    telemetry: Arc<Telemetry>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/health/startup", get(startup))
        .route("/metrics", get(metrics))
        .with_state(telemetry);
    tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await;
        if let Err(e) = served {
            tracing::error!(error = %e, "health server stopped");
        }
    });
    tracing::info!(addr = %bound, "health and metrics served");
    Ok(bound)
}
