//! Everything but `/events`: health, the `/v1` admin API; metrics as they land.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::reply::{self, Body};
use super::{App, config_api};

pub async fn route(app: &Arc<App>, request: Request<Incoming>) -> Response<Body> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => reply::json(StatusCode::OK, &json!({"status": "ok"})),
        (_, "/healthz") => reply::method_not_allowed("GET"),
        (&Method::GET, "/v1/config") => config_api::config(app),
        (_, "/v1/config") => reply::method_not_allowed("GET"),
        (&Method::POST, "/v1/reload") => config_api::reload(app).await,
        (_, "/v1/reload") => reply::method_not_allowed("POST"),
        (_, path) => reply::not_found(path),
    }
}
