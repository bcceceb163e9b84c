//! `POST /events`: the billing's envelope in, the chain's verdict out.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use hyper::header::CONTENT_LENGTH;
use hyper::{Request, Response, StatusCode};
use serde_json::json;
use tracing::{Instrument as _, info, info_span, warn};

use super::App;
use super::reply::{self, Body};
use crate::dispatch::{CallRecord, Outcome, run_before, select_after};
use crate::events::Envelope;
use crate::metrics;

/// The header that carries the event id back, the same id every log line of the event has.
pub const EVENT_ID_HEADER: &str = "x-provisioning-event-id";

pub async fn events(app: &Arc<App>, request: Request<Incoming>) -> Response<Body> {
    let id = crate::events::new_id("evt");
    let span = info_span!("event", id = %id);
    metrics::in_flight(1.0);
    let mut response = handle(app, request).instrument(span).await;
    metrics::in_flight(-1.0);
    if let Ok(value) = hyper::header::HeaderValue::from_str(&id) {
        response.headers_mut().insert(EVENT_ID_HEADER, value);
    }
    response
}

async fn handle(app: &Arc<App>, request: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    if app.is_draining() {
        metrics::event("unparsed".into(), "unavailable");
        return reply::unavailable("provisiond is shutting down; retry shortly", 1);
    }
    let Ok(_permit) = app.in_flight.try_acquire() else {
        warn!("too many events in flight, answering 503");
        metrics::event("unparsed".into(), "unavailable");
        return reply::unavailable("too many events in flight; retry shortly", 1);
    };
    // One snapshot for the whole event, however long it takes and whatever reloads.
    let snapshot = app.snapshot.load_full();
    let server = &snapshot.config.server;

    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > server.max_body) {
        return too_large(server.max_body);
    }
    let limit = usize::try_from(server.max_body).unwrap_or(usize::MAX);
    let body: Bytes = match Limited::new(request.into_body(), limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return too_large(server.max_body),
        Err(e) => {
            return reply::error(
                StatusCode::BAD_REQUEST,
                format!("could not read the body: {e}"),
            );
        }
    };

    let envelope = match Envelope::parse(&body, server.max_depth) {
        Ok(envelope) => envelope,
        Err(e) => {
            warn!(error = %e, "bad request");
            metrics::event("unparsed".into(), "bad_request");
            return reply::error(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    let event = envelope.name.clone();
    let object_id = envelope.object_id();
    let known = snapshot.plan.is_known(&event);
    if !known {
        info!(event = %event, "event outside the catalogue, dispatching to wildcard handlers");
    }
    let label = metrics::event_label(&event, known);

    let route = snapshot.plan.route(&event);
    let mut records: Vec<CallRecord> = Vec::new();
    let deadline = started + server.deadline;
    let outcome = run_before(
        &app.caller,
        &route,
        envelope,
        deadline,
        server.deadline,
        &mut records,
    )
    .await;
    metrics::before_chain(started.elapsed());
    for record in &records {
        metrics::handler_call(&record.handler, "before", record.outcome, record.duration);
    }

    match outcome {
        Outcome::Denied { handler, message } => {
            info!(
                event = %event, object_id = %object_id, outcome = "denied", handler = %handler,
                message = %message, duration_ms = ms(started), generation = snapshot.generation,
                "event"
            );
            metrics::event(label, "denied");
            reply::json(
                StatusCode::FORBIDDEN,
                &json!({"error": {"handler": handler, "message": message}}),
            )
        }
        Outcome::Allowed {
            envelope,
            modified,
            mut cel,
        } => {
            let after = select_after(&route, &envelope, &mut cel, &mut records);
            if !after.is_empty() {
                // `run` refuses after-stage handlers until the durable store exists, so a
                // config that reaches here with one is a bug, and a 200 would lose it.
                warn!(event = %event, "after-stage handlers selected but no store; answering 503");
                metrics::event(label, "unavailable");
                return reply::unavailable("the after stage is not available in this build", 60);
            }
            info!(
                event = %event, object_id = %object_id, outcome = "allowed", modified,
                calls = records.len(), duration_ms = ms(started),
                generation = snapshot.generation, "event"
            );
            metrics::event(label, "allowed");
            let body = if modified {
                Bytes::from(envelope.to_json())
            } else {
                body
            };
            reply::raw_json(StatusCode::OK, body)
        }
    }
}

fn too_large(max: u64) -> Response<Body> {
    metrics::event("unparsed".into(), "too_large");
    reply::error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("body is larger than server.max_body ({max} bytes)"),
    )
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}
