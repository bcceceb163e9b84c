//! Everything but `/events`: health now; metrics and the `/v1` admin API as they land.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::App;
use super::reply::{self, Body};

pub async fn route(app: &Arc<App>, request: Request<Incoming>) -> Response<Body> {
    let _ = app;
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => reply::json(StatusCode::OK, &json!({"status": "ok"})),
        (_, "/healthz") => reply::method_not_allowed("GET"),
        (_, path) => reply::not_found(path),
    }
}
