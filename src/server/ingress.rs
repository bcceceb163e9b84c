//! `POST /events`: the billing's envelope in, the chain's verdict out.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_ENCODING, CONTENT_LENGTH};
use hyper::{Request, Response, StatusCode};
use serde_json::json;
use tracing::{Instrument as _, info, info_span, warn};

use super::App;
use super::reply::{self, Body};
use crate::config::{Handler, Server, Stage};
use crate::delivery::Intake;
use crate::dispatch::{CallRecord, Outcome, Route, Snapshot, Trace, run_before, select_after};
use crate::events::Envelope;
use crate::filter::CelInput;
use crate::metrics;
use crate::outcome::{CallOutcome, EventOutcome};

/// The header that carries the event id back, the same id every log line of the event has.
pub const EVENT_ID_HEADER: &str = "x-provisioning-event-id";

/// `snapshot` is the config the request was authorised under: the event keeps it to the
/// end, whatever reloads meanwhile.
pub async fn events(
    app: &Arc<App>,
    snapshot: Arc<Snapshot>,
    request: Request<Incoming>,
) -> Response<Body> {
    let id = crate::events::new_id("evt");
    let span = info_span!("event", id = id.as_str());
    // A guard, so that a request dropped mid-way (the billing hung up) still counts down.
    let _in_flight = InFlight::enter();
    let mut response = handle(app, snapshot, request, &id).instrument(span).await;
    if let Ok(value) = hyper::header::HeaderValue::from_str(&id) {
        response.headers_mut().insert(EVENT_ID_HEADER, value);
    }
    response
}

/// One event in the `provisiond_events_in_flight` gauge, for as long as it lives.
struct InFlight;

impl InFlight {
    fn enter() -> Self {
        metrics::in_flight(1.0);
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::in_flight(-1.0);
    }
}

async fn handle(
    app: &Arc<App>,
    snapshot: Arc<Snapshot>,
    request: Request<Incoming>,
    id: &str,
) -> Response<Body> {
    let started = Instant::now();
    if app.is_draining() {
        metrics::event("unparsed".into(), EventOutcome::Unavailable);
        return reply::unavailable("provisiond is shutting down; retry shortly", 1);
    }
    let Ok(_permit) = app.in_flight.try_acquire() else {
        warn!("too many events in flight, answering 503");
        metrics::event("unparsed".into(), EventOutcome::Unavailable);
        return reply::unavailable("too many events in flight; retry shortly", 1);
    };
    if let Some(coding) = content_coding(&request) {
        warn!(content_encoding = %coding, "bad request");
        metrics::event("unparsed".into(), EventOutcome::BadRequest);
        return reply::unsupported_coding(&coding);
    }
    let server = &snapshot.config.server;
    // Reading the body counts against the deadline: a stalled upload must not hold an
    // in-flight slot for longer than an event may take.
    let deadline = started + server.deadline;
    let body = match read_body(request, server, deadline).await {
        Ok(body) => body,
        Err(unread) => return unread.reply(server),
    };

    let envelope = match Envelope::parse(&body, server.max_depth) {
        Ok(envelope) => envelope,
        Err(e) => {
            warn!(error = %e, "bad request");
            metrics::event("unparsed".into(), EventOutcome::BadRequest);
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
    let mut chain = Chain {
        app,
        id,
        event: &event,
        object_id: &object_id,
        label: &label,
        started,
        generation: snapshot.generation,
        records: Vec::new(),
        calling: None,
        over: false,
    };
    let outcome = run_before(
        &app.caller,
        &route,
        envelope,
        body.clone(),
        deadline,
        server.deadline,
        &mut chain,
    )
    .await;
    let records = chain.over();
    metrics::before_chain(started.elapsed());

    let judged = Judged {
        app,
        snapshot: &snapshot,
        id,
        event: &event,
        object_id: &object_id,
        label,
        started,
        records,
    };
    match outcome {
        Outcome::Denied { handler, message } => judged.denied(&handler, &message),
        Outcome::Allowed {
            envelope,
            modified,
            mut cel,
        } => {
            judged
                .allowed(&route, &envelope, modified, &mut cel, &body)
                .await
        }
    }
}

/// An event's before stage under way: the calls made so far, and the one being made. If
/// the billing hangs up meanwhile, hyper drops the event's future, and with it this:
/// the event still gets its log line (outcome `abandoned`), its execution log rows (the
/// call cut short as an `error`) and its metrics.
struct Chain<'a> {
    app: &'a App,
    id: &'a str,
    event: &'a str,
    object_id: &'a str,
    label: &'a str,
    started: Instant,
    generation: u64,
    records: Vec<CallRecord>,
    /// The handler called now, when and since when.
    calling: Option<(Arc<Handler>, std::time::SystemTime, Instant)>,
    /// The chain ran to its end: the event is answered the usual way.
    over: bool,
}

impl Chain<'_> {
    /// The chain ran to its end: its calls, counted in the metrics.
    fn over(mut self) -> Vec<CallRecord> {
        self.over = true;
        let records = std::mem::take(&mut self.records);
        for record in &records {
            metrics::handler_call(record);
        }
        records
    }
}

impl Trace for Chain<'_> {
    fn record(&mut self, _handler: &Arc<Handler>, record: CallRecord) {
        self.calling = None;
        self.records.push(record);
    }

    fn calling(&mut self, handler: &Arc<Handler>, at: std::time::SystemTime, started: Instant) {
        self.calling = Some((handler.clone(), at, started));
    }
}

impl Drop for Chain<'_> {
    fn drop(&mut self) {
        if self.over {
            return;
        }
        let mut records = std::mem::take(&mut self.records);
        if let Some((handler, at, started)) = self.calling.take() {
            records.push(CallRecord {
                at,
                handler: handler.name.clone(),
                stage: Stage::Before,
                attempt: 1,
                outcome: CallOutcome::Error,
                duration: started.elapsed(),
                called: true,
                code: None,
                excerpt: String::new(),
                error: Some(
                    "the billing hung up before the call was over; the call was cancelled".into(),
                ),
            });
        }
        for record in &records {
            metrics::handler_call(record);
        }
        warn!(
            event = self.event,
            object_id = self.object_id,
            outcome = EventOutcome::Abandoned.as_str(),
            calls = records.len(),
            duration_ms = ms(self.started),
            generation = self.generation,
            "event"
        );
        log_calls(self.app, records, self.event, self.object_id, self.id);
        metrics::event(self.label.to_owned(), EventOutcome::Abandoned);
    }
}

/// Why an event's body was not read.
enum Unread {
    /// Larger than `server.max_body`, as declared or as sent.
    TooLarge,
    /// The connection failed while it was read.
    Failed(Box<dyn std::error::Error + Send + Sync>),
    /// Not all there by the event's deadline.
    Late,
}

/// Whether a body's read failed because the peer closed the connection before it was
/// all there (hyper's incomplete message, or an early end of the stream under it).
fn hung_up(e: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(e), |e| e.source()).any(|e| {
        e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_incomplete_message)
            || e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::UnexpectedEof)
    })
}

impl Unread {
    /// The answer to an event whose body was not read.
    fn reply(self, server: &Server) -> Response<Body> {
        match self {
            Self::TooLarge => too_large(server.max_body),
            Self::Failed(e) => {
                // The billing hung up before its body was all there: nobody reads the
                // answer, and the request was not a bad one.
                if hung_up(e.as_ref()) {
                    warn!(error = %e, "the client hung up before the request body was complete");
                    metrics::event("unparsed".into(), EventOutcome::Abandoned);
                } else {
                    warn!(error = %e, "could not read the request body");
                    metrics::event("unparsed".into(), EventOutcome::BadRequest);
                }
                reply::error(
                    StatusCode::BAD_REQUEST,
                    format!("could not read the body: {e}"),
                )
            }
            Self::Late => {
                warn!(deadline = ?server.deadline, "request body not received within server.deadline");
                metrics::event("unparsed".into(), EventOutcome::Timeout);
                let mut response = reply::error(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request body did not arrive within server.deadline ({})",
                        crate::config::fmt_duration(server.deadline)
                    ),
                );
                response.headers_mut().insert(
                    hyper::header::CONNECTION,
                    hyper::header::HeaderValue::from_static("close"),
                );
                response
            }
        }
    }
}

/// The request's `Content-Encoding` when it is anything but `identity`: the body is then
/// not the envelope's bytes (a proxy's gzip, say), and provisiond decodes no content coding.
fn content_coding(request: &Request<Incoming>) -> Option<String> {
    let mut codings = request
        .headers()
        .get_all(CONTENT_ENCODING)
        .iter()
        .flat_map(|value| value.to_str().unwrap_or("(not ASCII)").split(','))
        .map(str::trim)
        .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"))
        .peekable();
    codings.peek()?;
    Some(codings.collect::<Vec<_>>().join(", "))
}

/// The event's body, at most `server.max_body` bytes, by `deadline`.
async fn read_body(
    request: Request<Incoming>,
    server: &Server,
    deadline: Instant,
) -> Result<Bytes, Unread> {
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > server.max_body) {
        return Err(Unread::TooLarge);
    }
    let limit = usize::try_from(server.max_body).unwrap_or(usize::MAX);
    let read = Limited::new(request.into_body(), limit).collect();
    match tokio::time::timeout_at(deadline.into(), read).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(Unread::TooLarge),
        Ok(Err(e)) => Err(Unread::Failed(e)),
        Err(_) => Err(Unread::Late),
    }
}

/// An event past its before stage: what its answer, its log line and its execution log
/// rows are made of.
struct Judged<'a> {
    app: &'a App,
    snapshot: &'a Snapshot,
    id: &'a str,
    event: &'a str,
    object_id: &'a str,
    /// The event's label in the metrics.
    label: String,
    started: Instant,
    records: Vec<CallRecord>,
}

impl Judged<'_> {
    /// A handler of the before stage denied the event: 403.
    fn denied(self, handler: &str, message: &str) -> Response<Body> {
        info!(
            event = self.event,
            object_id = self.object_id,
            outcome = EventOutcome::Denied.as_str(),
            handler,
            reason = message,
            duration_ms = ms(self.started),
            generation = self.snapshot.generation,
            "event"
        );
        log_calls(self.app, self.records, self.event, self.object_id, self.id);
        metrics::event(self.label, EventOutcome::Denied);
        reply::json(
            StatusCode::FORBIDDEN,
            &json!({"error": {"handler": handler, "message": message}}),
        )
    }

    /// The before stage allowed the event: its after-stage deliveries into the store,
    /// then 200 with the envelope as the chain left it (`body`, the billing's bytes,
    /// unless a handler modified the data); 503 when the store cannot take them.
    async fn allowed(
        mut self,
        route: &Route,
        envelope: &Envelope,
        modified: bool,
        cel: &mut CelInput,
        body: &Bytes,
    ) -> Response<Body> {
        let before = self.records.len();
        let after = select_after(route, envelope, cel, &mut self.records);
        // Its rows: after-stage filters that failed.
        for record in &self.records[before..] {
            metrics::handler_call(record);
        }
        let reply_body = if modified {
            Bytes::from(envelope.to_json())
        } else {
            body.clone()
        };
        let (event, object_id) = (self.event, self.object_id);
        let intake = Intake {
            event,
            object_id,
            entity: envelope.entity(),
            body: &reply_body,
            original: body,
            dedupe_window: self.snapshot.config.store.dedupe_window,
            event_id: self.id,
        };
        // The calls' rows go first: a billing that hangs up while the deliveries are
        // stored (they are, whether it waits or not) leaves them in the log all the same.
        let calls = self.records.len();
        log_calls(self.app, self.records, event, object_id, self.id);
        // And the event's line and metric, if it hangs up before the store answers.
        let mut storing = Storing {
            event,
            object_id,
            label: Some(self.label),
            started: self.started,
            generation: self.snapshot.generation,
            calls,
        };
        // The 200 leaves only once the deliveries are on disk.
        let accepted = match self
            .app
            .deliveries
            .accept(&self.app.store, &after, intake)
            .await
        {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(event = %event, object_id = %object_id, error = %e, "cannot store the deliveries, answering 503");
                metrics::event(storing.answered(), EventOutcome::Unavailable);
                return reply::unavailable(
                    "the store cannot take the after-stage deliveries; retry shortly",
                    1,
                );
            }
        };
        let queued = accepted.queued;
        if accepted.duplicates > 0 {
            info!(
                event,
                object_id,
                duplicates = accepted.duplicates,
                "identical envelope within store.dedupe_window, not delivered again"
            );
        }
        info!(
            event,
            object_id,
            outcome = EventOutcome::Allowed.as_str(),
            modified,
            calls,
            queued,
            duration_ms = ms(self.started),
            generation = self.snapshot.generation,
            "event"
        );
        metrics::event(storing.answered(), EventOutcome::Allowed);
        reply::raw_json(StatusCode::OK, reply_body)
    }
}

/// An allowed event whose after-stage deliveries are being stored. If the billing hangs
/// up meanwhile, hyper drops the event's future, and with it this: the event still gets
/// its log line and metric (outcome `abandoned`; the deliveries are stored all the
/// same, and the billing's retry is deduplicated).
struct Storing<'a> {
    event: &'a str,
    object_id: &'a str,
    /// The event's metrics label, until it is answered.
    label: Option<String>,
    started: Instant,
    generation: u64,
    calls: usize,
}

impl Storing<'_> {
    /// The event is answered: its line and metric are the answer's. Its label.
    fn answered(&mut self) -> String {
        self.label.take().unwrap_or_default()
    }
}

impl Drop for Storing<'_> {
    fn drop(&mut self) {
        let Some(label) = self.label.take() else {
            return;
        };
        warn!(
            event = self.event,
            object_id = self.object_id,
            outcome = EventOutcome::Abandoned.as_str(),
            calls = self.calls,
            duration_ms = ms(self.started),
            generation = self.generation,
            "event"
        );
        metrics::event(label, EventOutcome::Abandoned);
    }
}

/// Hands the calls made for an event to the execution log, without waiting.
fn log_calls(app: &App, records: Vec<CallRecord>, event: &str, object_id: &str, id: &str) {
    let rows = records
        .into_iter()
        .map(|r| {
            r.into_execution(event, object_id, None)
                .event_id(Some(id.to_owned()))
        })
        .collect();
    app.store.log(rows);
}

fn too_large(max: u64) -> Response<Body> {
    metrics::event("unparsed".into(), EventOutcome::TooLarge);
    reply::error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("body is larger than server.max_body ({max} bytes)"),
    )
}

/// Milliseconds since `since`, to the microsecond.
fn ms(since: Instant) -> f64 {
    (since.elapsed().as_secs_f64() * 1_000_000.0).round() / 1000.0
}
