//! The before-stage chain: one handler at a time, each seeing the data the one before
//! left, under the event's deadline.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use serde_json::Value;
use tracing::{debug, warn};

use super::Route;
use crate::config::fmt_duration;
use crate::config::{Handler, OnError, Stage};
use crate::events::Envelope;
use crate::filter::{CelInput, Verdict};
use crate::handlers::{Call, CallError, Caller, EXCERPT, Reply, exec, new_message_id};
use crate::outcome::CallOutcome;

/// How the before stage ended.
// One per event, moved once: boxing the larger variant would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Outcome {
    /// Every handler allowed (or failed under `on_error = "allow"`).
    Allowed {
        envelope: Envelope,
        /// Whether any handler replaced the data.
        modified: bool,
        /// The CEL form of the final envelope, for the after-stage filters.
        cel: CelInput,
    },
    /// A handler forbade the action, or failed under `on_error = "deny"`.
    Denied { handler: String, message: String },
}

/// One handler call, for the execution log.
#[derive(Debug, Clone)]
pub struct CallRecord {
    pub at: SystemTime,
    pub handler: String,
    pub stage: Stage,
    pub attempt: u32,
    /// A [`CallOutcome`]'s name (`CallOutcome::as_str`): the store keeps it as text.
    pub outcome: CallOutcome,
    pub duration: Duration,
    /// Whether the handler was called: not when its filter failed, nor when the event's
    /// deadline ran out before its turn. Only calls made count in its latency.
    pub called: bool,
    /// HTTP status or exit code.
    pub code: Option<i64>,
    pub excerpt: String,
    pub error: Option<String>,
}

impl CallRecord {
    /// The execution log row of this call, made for `event` on `object_id` (and, in
    /// the after stage, for stored delivery `delivery`).
    pub fn into_execution(
        self,
        event: &str,
        object_id: &str,
        delivery: Option<u64>,
    ) -> crate::store::Execution {
        crate::store::Execution {
            id: 0,
            at: crate::store::unix_ms(self.at),
            event: event.to_owned(),
            object_id: object_id.to_owned(),
            handler: self.handler,
            stage: self.stage,
            attempt: self.attempt,
            outcome: self.outcome.as_str().to_owned(),
            duration_ms: (self.duration.as_secs_f64() * 1e6).round() / 1e3,
            code: self.code,
            excerpt: self.excerpt,
            error: self.error,
            delivery,
            event_id: None,
        }
    }
}

/// Who the chain calls: the handlers themselves ([`Caller`]), or `explain`'s dry run,
/// which allows every call and leaves the data as it was.
pub trait Calls {
    fn call(&self, call: Call<'_>) -> impl Future<Output = Result<Reply, CallError>> + Send;
}

impl Calls for Caller {
    fn call(&self, call: Call<'_>) -> impl Future<Output = Result<Reply, CallError>> + Send {
        Caller::call(self, call)
    }
}

/// Where the chain writes what it did: a record of every call (the execution log's
/// rows), and the handlers a filter passed over (which only a dry run keeps).
pub trait Trace {
    fn record(&mut self, handler: &Arc<Handler>, record: CallRecord);
    fn passed_over(&mut self, _handler: &Arc<Handler>, _verdict: Verdict) {}
    /// `handler` is being called now: its record comes when the call is over, unless
    /// the event is dropped first (the billing hung up).
    fn calling(&mut self, _handler: &Arc<Handler>, _at: SystemTime, _started: Instant) {}
}

impl Trace for Vec<CallRecord> {
    fn record(&mut self, _handler: &Arc<Handler>, record: CallRecord) {
        self.push(record);
    }
}

/// What one handler's call meant for the chain.
enum Step {
    Allow(Option<serde_json::Map<String, Value>>),
    Deny(String),
    Error(String),
}

/// Runs the before-stage handlers of `route` on `envelope`, in order, until one denies
/// or the chain ends. Every call made is added to `records`, with the handlers a filter
/// passed over. `original` is the body `envelope` was parsed from: handlers get it byte
/// for byte until one modifies the data.
pub async fn run_before(
    caller: &impl Calls,
    route: &Route,
    envelope: Envelope,
    original: Bytes,
    deadline: Instant,
    deadline_len: Duration,
    records: &mut impl Trace,
) -> Outcome {
    let object_id = envelope.object_id();
    let mut data = Data {
        envelope,
        modified: false,
        body: Some(original),
        cel: CelInput::default(),
    };
    let budget = Budget {
        deadline,
        len: deadline_len,
    };
    for handler in &route.before {
        let started = Instant::now();
        let at = SystemTime::now();
        let remaining = budget.deadline.saturating_duration_since(started);
        let mut called = false;
        let (step, code, excerpt) = match handler
            .filter
            .evaluate_with(&data.envelope, &mut data.cel)
        {
            Ok(Verdict::Pass) if remaining.is_zero() => (
                Step::Error(format!(
                    "server.deadline ({}) ran out before this handler",
                    fmt_duration(budget.len)
                )),
                None,
                String::new(),
            ),
            Ok(Verdict::Pass) => {
                records.calling(handler, at, started);
                called = true;
                call(caller, handler, &mut data, &object_id, remaining, budget).await
            }
            Ok(verdict) => {
                debug!(handler = %handler.name, event = %data.envelope.name, ?verdict, "handler skipped by its filter");
                records.passed_over(handler, verdict);
                continue;
            }
            Err(e) => (Step::Error(e.to_string()), None, String::new()),
        };
        let record = CallRecord {
            at,
            handler: handler.name.clone(),
            stage: Stage::Before,
            attempt: 1,
            outcome: CallOutcome::Allowed,
            duration: started.elapsed(),
            called,
            code,
            excerpt,
            error: None,
        };
        if let Some(denied) = take_step(handler, step, record, &mut data, records) {
            return denied;
        }
    }
    Outcome::Allowed {
        envelope: data.envelope,
        modified: data.modified,
        cel: data.cel,
    }
}

/// The data as the chain goes.
struct Data {
    envelope: Envelope,
    /// Whether any handler replaced the data.
    modified: bool,
    /// The serialised envelope and its CEL form, kept until a handler changes the data.
    body: Option<Bytes>,
    cel: CelInput,
}

/// The event's deadline, and how long it was (for the messages).
#[derive(Clone, Copy)]
struct Budget {
    deadline: Instant,
    len: Duration,
}

/// Calls one handler whose filter passed, with `remaining` of the event's deadline
/// (not zero): what the reply means, its code and excerpt.
async fn call(
    caller: &impl Calls,
    handler: &Arc<Handler>,
    data: &mut Data,
    object_id: &str,
    remaining: Duration,
    budget: Budget,
) -> (Step, Option<i64>, String) {
    let capped = remaining < handler.timeout;
    let envelope = &data.envelope;
    let body = data
        .body
        .get_or_insert_with(|| Bytes::from(envelope.to_json()))
        .clone();
    let message_id = new_message_id();
    let result = caller
        .call(Call {
            handler,
            event: &envelope.name,
            object_id,
            body: body.clone(),
            attempt: 1,
            message_id: &message_id,
            timeout: remaining.min(handler.timeout),
        })
        .await;
    match result {
        Ok(reply) => {
            let code = Some(reply.code());
            let excerpt = handler.hidden.mask(reply.excerpt());
            (interpret(handler, reply, &body), code, excerpt)
        }
        Err(crate::handlers::CallError::Timeout(_)) if capped => (
            Step::Error(format!(
                "server.deadline ({}) ran out during the call",
                fmt_duration(budget.len)
            )),
            None,
            String::new(),
        ),
        Err(e) => (Step::Error(e.to_string()), None, String::new()),
    }
}

/// Records one call and does what its step means for the chain: the outcome when the
/// chain ends here, else `None` (the data replaced if the handler modified it).
fn take_step(
    handler: &Arc<Handler>,
    step: Step,
    mut record: CallRecord,
    data: &mut Data,
    records: &mut impl Trace,
) -> Option<Outcome> {
    let duration = record.duration;
    let event = &data.envelope.name;
    match step {
        Step::Allow(new_data) => {
            debug!(handler = %handler.name, event = %event, ?duration, "handler allowed");
            if let Some(new_data) = new_data {
                data.envelope.data = new_data.into();
                data.modified = true;
                data.body = None;
                data.cel = CelInput::default();
            }
            records.record(handler, record);
            None
        }
        Step::Deny(message) => {
            let message = handler.hidden.mask(message);
            debug!(handler = %handler.name, event = %event, ?duration, reason = %message, "handler denied");
            record.outcome = CallOutcome::Denied;
            records.record(handler, record);
            Some(Outcome::Denied {
                handler: handler.name.clone(),
                message,
            })
        }
        Step::Error(error) => {
            // What the handler said may quote it (an echo of the request's headers).
            let error = handler.hidden.mask(error);
            record.outcome = CallOutcome::Error;
            record.error = Some(error.clone());
            records.record(handler, record);
            match handler.on_error {
                OnError::Allow => {
                    warn!(handler = %handler.name, event = %event, %error, "handler failed, skipped (on_error = allow)");
                    None
                }
                OnError::Deny => {
                    warn!(handler = %handler.name, event = %event, %error, "handler failed, event denied (on_error = deny)");
                    Some(Outcome::Denied {
                        handler: handler.name.clone(),
                        message: format!("handler failed: {error}"),
                    })
                }
            }
        }
    }
}

/// What a before-stage reply means. `sent` is the body the handler was sent: a modifying
/// handler that answers with exactly those bytes (an echo) changed nothing, and the data
/// keeps its bytes.
fn interpret(handler: &Handler, reply: Reply, sent: &[u8]) -> Step {
    match reply {
        Reply::Http {
            status,
            body,
            truncated,
            ..
        } => match status {
            200..=299 if handler.modifies => {
                if truncated {
                    return Step::Error(format!(
                        "reply body is larger than {} bytes",
                        crate::handlers::REPLY_CAP
                    ));
                }
                new_data(&body, sent)
            }
            200..=299 => Step::Allow(None),
            403 | 409 | 422 => Step::Deny(deny_message(&body, status)),
            other => {
                let excerpt = crate::handlers::excerpt(&body);
                Step::Error(if excerpt.is_empty() {
                    format!("unexpected HTTP status {other}")
                } else {
                    format!("unexpected HTTP status {other}: {excerpt}")
                })
            }
        },
        Reply::Script {
            code: Some(0),
            stdout,
            truncated,
            ..
        } => {
            if !handler.modifies {
                return Step::Allow(None);
            }
            if truncated {
                return Step::Error(format!(
                    "stdout is larger than {} bytes",
                    crate::handlers::REPLY_CAP
                ));
            }
            new_data(&stdout, sent)
        }
        Reply::Script {
            code: Some(code),
            stderr,
            ..
        } => {
            let message = exec::last_lines(&stderr, 5, EXCERPT);
            Step::Deny(if message.is_empty() {
                format!("exited with status {code}")
            } else {
                message
            })
        }
        Reply::Script { signal, .. } => Step::Error(format!(
            "script was killed by signal {}",
            signal.unwrap_or_default()
        )),
    }
}

/// The data of a modifying handler's reply: an envelope, or nothing to keep the data
/// (an empty reply, or the very bytes it was sent).
fn new_data(body: &[u8], sent: &[u8]) -> Step {
    if body == sent || body.iter().all(u8::is_ascii_whitespace) {
        return Step::Allow(None);
    }
    match Envelope::parse(body, crate::events::DEFAULT_MAX_DEPTH) {
        Ok(envelope) => Step::Allow(Some(envelope.data.into_map())),
        Err(e) => Step::Error(format!(
            "reply is not an envelope ({e}); a handler with modifies = true must return \
             the envelope, or an empty body to keep the data"
        )),
    }
}

/// The message of a forbidding reply: its `message` or `error` field, else its text.
fn deny_message(body: &[u8], status: u16) -> String {
    if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(body) {
        let field = map.get("message").or_else(|| map.get("error"));
        let text = match field {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(inner)) => inner
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_owned),
            _ => None,
        };
        if let Some(text) = text.filter(|t| !t.trim().is_empty()) {
            return crate::handlers::excerpt(text.as_bytes());
        }
    }
    let text = crate::handlers::excerpt(body);
    if text.is_empty() {
        format!("forbidden (HTTP {status})")
    } else {
        text
    }
}

/// The after-stage handlers whose filters pass on the final envelope. A filter that fails
/// counts as that handler's error: it gets no delivery, and a record says why.
pub fn select_after(
    route: &Route,
    envelope: &Envelope,
    cel: &mut CelInput,
    records: &mut impl Trace,
) -> Vec<Arc<Handler>> {
    let mut selected = Vec::new();
    for handler in &route.after {
        match handler.filter.evaluate_with(envelope, cel) {
            Ok(Verdict::Pass) => selected.push(handler.clone()),
            Ok(verdict) => records.passed_over(handler, verdict),
            Err(e) => {
                warn!(handler = %handler.name, event = %envelope.name, error = %e, "after-stage filter failed, no delivery");
                records.record(
                    handler,
                    CallRecord {
                        at: SystemTime::now(),
                        handler: handler.name.clone(),
                        stage: Stage::After,
                        attempt: 0,
                        outcome: CallOutcome::Error,
                        duration: Duration::ZERO,
                        called: false,
                        code: None,
                        excerpt: String::new(),
                        error: Some(e.to_string()),
                    },
                );
            }
        }
    }
    selected
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_messages() {
        assert_eq!(deny_message(br#"{"message":"no"}"#, 403), "no");
        assert_eq!(deny_message(br#"{"error":"nope"}"#, 409), "nope");
        assert_eq!(deny_message(br#"{"error":{"message":"x"}}"#, 422), "x");
        assert_eq!(deny_message(b"plain words\n", 403), "plain words");
        assert_eq!(deny_message(b"", 403), "forbidden (HTTP 403)");
        let long = vec![b'a'; 5000];
        assert_eq!(deny_message(&long, 403).len(), EXCERPT);
    }
}
