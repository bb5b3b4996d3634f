//! The HTTP admin endpoint on `--metrics-listen`:
//!
//! * `GET /metrics`: Prometheus metrics.
//! * `GET /healthz`: the process is up.
//! * `GET /readyz`: 200 while accepting agents, 503 once draining.
//! * `GET /query?agent=&device=&since=&limit=`: stored records as JSON lines
//!   (see [`crate::query`]), streamed, so large answers need no memory.
//! * `GET /stats`: per-agent record counts and `stored_through` as JSON.
//!
//! `/query` and `/stats` exist because sled lets only one process open a
//! store: while the server runs, `cloud-ingest query --store` cannot.
//! The endpoint has no authentication: bind it to loopback or a cluster
//! network only.

use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Body;
use axum::extract::{Query as QueryString, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::query::{record_json, QueryParams, RecordSource};

#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    /// Cancelled when the server starts draining.
    pub draining: CancellationToken,
    /// The store to browse, when the sink supports it.
    pub records: Option<Arc<dyn RecordSource>>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/query", get(query))
        .route("/stats", get(stats))
        .with_state(state)
}

/// Serves until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    stop: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

async fn readyz(State(state): State<AdminState>) -> Response {
    if state.draining.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        "ready\n".into_response()
    }
}

fn no_store() -> Response {
    (
        StatusCode::NOT_IMPLEMENTED,
        "this ingest's sink cannot be browsed here; use the sink's own tools\n",
    )
        .into_response()
}

async fn query(
    State(state): State<AdminState>,
    QueryString(params): QueryString<QueryParams>,
) -> Response {
    let Some(records) = state.records else {
        return no_store();
    };
    let query = match params.to_query(SystemTime::now()) {
        Ok(query) => query,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, String>>(256);
    tokio::task::spawn_blocking(move || {
        let result = records.query(&query, &mut |agent, record| {
            // A closed channel means the client left: stop scanning.
            tx.blocking_send(Ok(record_json(agent, &record) + "\n"))
                .is_ok()
        });
        if let Err(e) = result {
            let _ = tx.blocking_send(Err(e.to_string()));
        }
    });
    let mut rx = ReceiverStream::new(rx);
    // An error before the first record becomes a proper error response; one
    // later can only cut the (already started) body short.
    let first = match rx.next().await {
        None => return ndjson(Body::empty()),
        Some(Err(e)) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response()
        }
        Some(Ok(line)) => line,
    };
    let rest = rx.map(|item| item.map_err(std::io::Error::other));
    let body = tokio_stream::once(Ok::<_, std::io::Error>(first)).chain(rest);
    ndjson(Body::from_stream(body))
}

fn ndjson(body: Body) -> Response {
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

async fn stats(State(state): State<AdminState>) -> Response {
    let Some(records) = state.records else {
        return no_store();
    };
    match tokio::task::spawn_blocking(move || records.stats()).await {
        Ok(Ok(stats)) => axum::Json(stats).into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}
