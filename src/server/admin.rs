//! Everything but `/events`: health now; metrics and the `/v1` admin API as they land.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::App;
use super::reply::{self, Body};
use super::store_api;

pub async fn route(app: &Arc<App>, request: Request<Incoming>) -> Response<Body> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => reply::json(StatusCode::OK, &json!({"status": "ok"})),
        (_, "/healthz") => reply::method_not_allowed("GET"),
        (&Method::GET, "/v1/executions") => store_api::executions(app, request.uri()).await,
        (_, "/v1/executions") => reply::method_not_allowed("GET"),
        (m, p) if p == "/v1/deadletters" || p.starts_with("/v1/deadletters/") => {
            store_api::dead_letters(app, m, request.uri()).await
        }
        (_, path) => reply::not_found(path),
    }
}
