//! Everything but `/events`: health, the `/v1` admin API, the web console; metrics as
//! they land.

mod explain_api;
mod ui;

use std::sync::Arc;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::reply::{self, Body};
use super::{App, config_api, store_api};

pub async fn route(app: &Arc<App>, request: Request<Incoming>) -> Response<Body> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => reply::json(StatusCode::OK, &json!({"status": "ok"})),
        (_, "/healthz") => reply::method_not_allowed("GET"),
        (&Method::GET, "/readyz") => ready(app),
        (_, "/readyz") => reply::method_not_allowed("GET"),
        (&Method::GET, "/metrics") => metrics(app).await,
        (_, "/metrics") => reply::method_not_allowed("GET"),
        (&Method::GET, "/v1/config") => config_api::config(app),
        (_, "/v1/config") => reply::method_not_allowed("GET"),
        (&Method::POST, "/v1/reload") => config_api::reload(app).await,
        (_, "/v1/reload") => reply::method_not_allowed("POST"),
        (&Method::GET, "/v1/executions") => store_api::executions(app, request.uri()).await,
        (_, "/v1/executions") => reply::method_not_allowed("GET"),
        (&Method::POST, "/v1/explain") => explain_api::explain(app, request).await,
        (_, "/v1/explain") => reply::method_not_allowed("POST"),
        (m, p) if p == "/ui" || p.starts_with("/ui/") => ui::asset(m, p),
        (_, p) if p == "/v1/deadletters" || p.starts_with("/v1/deadletters/") => {
            store_api::dead_letters(app, request).await
        }
        (_, path) => reply::not_found(path),
    }
}

/// An admin request's body, at most `limit` bytes, all there within `deadline` (the
/// event's `server.deadline`): a client that stalls its upload is answered 408 and its
/// connection closed, so that it cannot hold one of `server.max_connections` for good.
/// Otherwise the reply to give: 413 over the limit (`limit_name` says which), 400 when
/// the connection fails.
pub(crate) async fn body(
    request: Request<Incoming>,
    limit: usize,
    limit_name: &str,
    deadline: Duration,
) -> Result<Bytes, Response<Body>> {
    let read = Limited::new(request.into_body(), limit).collect();
    match tokio::time::timeout(deadline, read).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(reply::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body is larger than {limit_name} ({limit} bytes)"),
        )),
        Ok(Err(e)) => Err(reply::error(
            StatusCode::BAD_REQUEST,
            format!("could not read the body: {e}"),
        )),
        Err(_) => {
            let mut response = reply::error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within server.deadline ({})",
                    crate::config::fmt_duration(deadline)
                ),
            );
            response.headers_mut().insert(
                hyper::header::CONNECTION,
                hyper::header::HeaderValue::from_static("close"),
            );
            Err(response)
        }
    }
}

/// `GET /metrics`: the Prometheus text format.
async fn metrics(app: &App) -> Response<Body> {
    app.deliveries.report_metrics().await;
    crate::metrics::restart_needed(app.reloader.status().restart_needed.len());
    app.metrics.run_upkeep();
    let mut response = Response::new(super::full(app.metrics.render()));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// `GET /readyz`: 200 when a config is loaded and the store is open; 503 while shutting
/// down or when the store cannot take writes, so that traffic goes elsewhere first.
fn ready(app: &App) -> Response<Body> {
    if app.is_draining() {
        return reply::unavailable("shutting down", 1);
    }
    if !app.store.is_open() {
        return reply::unavailable(
            "the store cannot take writes (a full disk, an unreachable database: see the log)",
            5,
        );
    }
    let ready = crate::api::Ready {
        status: "ready".into(),
        generation: app.live.load().generation,
        store: app.store.path().to_owned(),
    };
    reply::json(StatusCode::OK, &ready)
}
