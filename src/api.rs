//! The admin API's JSON, once: the bodies the server's routes send and take
//! ([`crate::server`]) and the client commands read and send ([`crate::commands::admin`]).
//! Field names and their order are the API's. A field the server may leave out or set
//! to null is an `Option` (or empty) on the client's side.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::Stage;
use crate::store::{DeadLetter, Execution, rfc3339};

/// Every error: `{"error": {"message": ...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ErrorReply {
    pub error: ErrorBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ErrorBody {
    pub message: String,
}

/// `GET /readyz`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Ready {
    pub status: String,
    /// The live config's generation.
    pub generation: u64,
    /// The store's path.
    pub store: String,
}

/// `GET /v1/executions`: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Executions {
    pub count: usize,
    pub executions: Vec<ExecutionRow>,
}

/// One row of the execution log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ExecutionRow {
    pub id: u64,
    /// RFC 3339, milliseconds.
    pub time: String,
    pub event: String,
    pub object_id: String,
    pub handler: String,
    pub stage: Stage,
    pub attempt: u32,
    /// A [`crate::outcome::CallOutcome`]'s name; text, so that a client reads outcomes
    /// a later sidecar adds.
    pub outcome: String,
    pub duration_ms: f64,
    /// HTTP status or exit code.
    #[serde(default)]
    pub code: Option<i64>,
    #[serde(default)]
    pub excerpt: String,
    #[serde(default)]
    pub error: Option<String>,
    /// The delivery this call was an attempt of (after stage).
    #[serde(default)]
    pub delivery: Option<u64>,
    #[serde(default)]
    pub event_id: Option<String>,
}

impl From<&Execution> for ExecutionRow {
    fn from(row: &Execution) -> Self {
        Self {
            id: row.id,
            time: rfc3339(row.at),
            event: row.event.clone(),
            object_id: row.object_id.clone(),
            handler: row.handler.clone(),
            stage: row.stage,
            attempt: row.attempt,
            outcome: row.outcome.clone(),
            duration_ms: row.duration_ms,
            code: row.code,
            excerpt: row.excerpt.clone(),
            error: row.error.clone(),
            delivery: row.delivery,
            event_id: row.event_id.clone(),
        }
    }
}

/// `GET /v1/deadletters`: oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct DeadLetters {
    pub count: usize,
    /// More dead letters match, after the last one here.
    #[serde(default)]
    pub more: bool,
    pub deadletters: Vec<DeadLetterRow>,
}

/// One dead letter (also `GET /v1/deadletters/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct DeadLetterRow {
    pub id: u64,
    pub handler: String,
    pub event: String,
    pub object_id: String,
    /// `clients/12`.
    pub entity: String,
    pub attempts: u32,
    pub reason: String,
    #[serde(default)]
    pub last_error: Option<String>,
    /// RFC 3339, milliseconds.
    pub enqueued_at: String,
    pub died_at: String,
    pub message_id: String,
    /// The envelope as JSON; as text when it is not.
    pub envelope: Value,
}

impl From<&DeadLetter> for DeadLetterRow {
    fn from(letter: &DeadLetter) -> Self {
        let d = &letter.delivery;
        Self {
            id: d.id,
            handler: d.handler.clone(),
            event: d.event.clone(),
            object_id: d.object_id.clone(),
            entity: d.entity.clone(),
            attempts: d.attempts,
            reason: letter.reason.clone(),
            last_error: d.last_error.clone(),
            enqueued_at: rfc3339(d.enqueued_at),
            died_at: rfc3339(letter.died_at),
            message_id: d.message_id.clone(),
            envelope: serde_json::from_str(&d.body).unwrap_or_else(|_| d.body.clone().into()),
        }
    }
}

/// `POST /v1/deadletters/{id}/replay`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ReplayedOne {
    /// The dead letter's id.
    pub replayed: u64,
    /// The new delivery's id.
    pub delivery: u64,
}

/// `DELETE /v1/deadletters/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct DroppedOne {
    /// The dead letter's id.
    pub dropped: u64,
}

/// The filter body of `POST /v1/deadletters/replay|drop`: the server reads it key by
/// key (`server::store_api`), to say which key is wrong.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Selection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handler: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity: Option<String>,
    /// A time (RFC 3339) or a duration back from now (`1h`), on `died_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// Every dead letter: only without filters.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
}

/// `POST /v1/deadletters/replay`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ReplayedMatching {
    pub replayed: usize,
    /// Matches left in place: their handler is not in the config.
    pub skipped: usize,
    /// Says which handlers, when some were skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `POST /v1/deadletters/drop`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct DroppedMatching {
    pub dropped: usize,
    /// When nothing matched: a handler or event name of the filter that the config
    /// does not know.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Delivery;

    fn execution(code: Option<i64>, error: Option<&str>) -> Execution {
        Execution {
            id: 9,
            at: 1_764_000_000_123,
            event: "clients.update".into(),
            object_id: "12".into(),
            handler: "crm".into(),
            stage: Stage::After,
            attempt: 2,
            outcome: "failed".into(),
            duration_ms: 12.345,
            code,
            excerpt: String::new(),
            error: error.map(str::to_owned),
            delivery: Some(4),
            event_id: None,
        }
    }

    fn letter(body: &str) -> DeadLetter {
        DeadLetter {
            delivery: Delivery {
                id: 3,
                handler: "crm".into(),
                event: "clients.create".into(),
                object_id: "12".into(),
                entity: "clients/12".into(),
                message_id: "msg_1".into(),
                body: body.into(),
                attempts: 5,
                next_at: 0,
                enqueued_at: 1_764_000_000_000,
                last_error: Some("HTTP status 503".into()),
                event_id: None,
            },
            reason: "gave up".into(),
            died_at: 1_764_000_100_000,
        }
    }

    /// The rows read exactly as the store's own JSON of them: same keys, same order,
    /// same values, nulls included.
    #[test]
    fn rows_serialise_as_the_store_shows_them() {
        for row in [execution(Some(503), Some("boom")), execution(None, None)] {
            assert_eq!(
                serde_json::to_string(&ExecutionRow::from(&row)).unwrap(),
                row.to_json().to_string()
            );
            let back: ExecutionRow = serde_json::from_value(row.to_json()).unwrap();
            assert_eq!(back, ExecutionRow::from(&row));
        }
        for letter in [letter(r#"{"event":{"x":1},"data":{}}"#), letter("not json")] {
            assert_eq!(
                serde_json::to_string(&DeadLetterRow::from(&letter)).unwrap(),
                letter.to_json().to_string()
            );
        }
    }
}
