//! What the store holds, as Rust types: deliveries, dead letters, execution log rows.
//!
//! Dead letters are stored as JSON (readable with any redb tool, and easy to extend: a
//! new field with a default does not need a schema change); the queue's rows, read back
//! on every attempt, and the execution log's, written for every call, in postcard
//! (`file/row.rs`). Times are unix milliseconds, so that they survive a restart and
//! read the same in every process.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::config::Stage;

/// Milliseconds since the unix epoch.
pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Now, in unix milliseconds.
pub fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

/// A unix-milliseconds time as RFC 3339 (`2026-11-26T10:00:00.000Z`).
pub fn rfc3339(ms: u64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(at).to_string()
}

/// A delivery about to be stored: one event for one after-stage handler.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub handler: String,
    pub event: String,
    pub object_id: String,
    /// `clients/12`: deliveries of one handler for one entity go out in arrival order.
    pub entity: String,
    /// `webhook-id`: the same on every attempt of this delivery.
    pub message_id: String,
    /// The envelope as the before stage left it, serialised.
    pub body: String,
    /// When set, the delivery is skipped if the same key was stored within the window.
    pub dedupe: Option<[u8; 32]>,
    /// The id of the billing's event (`X-Provisioning-Event-Id`), for the log rows.
    pub event_id: Option<String>,
}

/// A delivery just stored, as the after stage needs to know of it: its id and lane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub id: u64,
    pub handler: String,
    pub entity: String,
}

/// A stored, not yet settled delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    #[serde(skip)]
    pub id: u64,
    pub handler: String,
    pub event: String,
    pub object_id: String,
    pub entity: String,
    pub message_id: String,
    pub body: String,
    /// Attempts made so far.
    pub attempts: u32,
    /// Not before this time (unix ms).
    pub next_at: u64,
    /// When the billing's event was accepted (unix ms).
    pub enqueued_at: u64,
    /// What went wrong on the last attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The id of the billing's event (`X-Provisioning-Event-Id`); absent in rows stored
    /// before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
}

impl Delivery {
    pub fn new(id: u64, new: NewDelivery, now: u64) -> Self {
        Self {
            id,
            handler: new.handler,
            event: new.event,
            object_id: new.object_id,
            entity: new.entity,
            message_id: new.message_id,
            body: new.body,
            attempts: 0,
            next_at: now,
            enqueued_at: now,
            last_error: None,
            event_id: new.event_id,
        }
    }
}

/// A delivery that will not be retried any more, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    #[serde(flatten)]
    pub delivery: Delivery,
    pub reason: String,
    /// When it was given up (unix ms).
    pub died_at: u64,
}

impl DeadLetter {
    /// The JSON the admin API shows: the envelope parsed, times as RFC 3339.
    pub fn to_json(&self) -> Value {
        let d = &self.delivery;
        json!({
            "id": d.id,
            "handler": d.handler,
            "event": d.event,
            "object_id": d.object_id,
            "entity": d.entity,
            "attempts": d.attempts,
            "reason": self.reason,
            "last_error": d.last_error,
            "enqueued_at": rfc3339(d.enqueued_at),
            "died_at": rfc3339(self.died_at),
            "message_id": d.message_id,
            "envelope": serde_json::from_str::<Value>(&d.body).unwrap_or(Value::String(d.body.clone())),
        })
    }
}

/// One handler call in the execution log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Execution {
    #[serde(skip)]
    pub id: u64,
    /// When the call started (unix ms).
    pub at: u64,
    pub event: String,
    pub object_id: String,
    pub handler: String,
    pub stage: Stage,
    pub attempt: u32,
    /// `allowed`, `denied`, `error` (before); `delivered`, `failed`, `dead` (after).
    pub outcome: String,
    pub duration_ms: f64,
    /// HTTP status or exit code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub excerpt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The delivery this call was an attempt of (after stage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<u64>,
    /// The id of the billing's event (`X-Provisioning-Event-Id`) the call was made for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
}

impl Execution {
    /// The row with the id of the event it was made for.
    #[must_use]
    pub fn event_id(mut self, event_id: Option<String>) -> Self {
        self.event_id = event_id;
        self
    }

    /// About how much memory the row holds (its strings' heap included): what the
    /// execution log's channel counts against its byte budget.
    pub fn weight(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.event.capacity()
            + self.object_id.capacity()
            + self.handler.capacity()
            + self.outcome.capacity()
            + self.excerpt.capacity()
            + self.error.as_ref().map_or(0, String::capacity)
            + self.event_id.as_ref().map_or(0, String::capacity)
    }

    /// The JSON the admin API shows.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "time": rfc3339(self.at),
            "event": self.event,
            "object_id": self.object_id,
            "handler": self.handler,
            "stage": self.stage,
            "attempt": self.attempt,
            "outcome": self.outcome,
            "duration_ms": self.duration_ms,
            "code": self.code,
            "excerpt": self.excerpt,
            "error": self.error,
            "delivery": self.delivery,
            "event_id": self.event_id,
        })
    }
}

/// Which dead letters a bulk replay or drop takes; an empty filter takes them all.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeadLetterFilter {
    pub handler: Option<String>,
    pub event: Option<String>,
    pub object_id: Option<String>,
    /// `clients/12`.
    pub entity: Option<String>,
    /// Only those that died at or after this time (unix ms).
    pub since: Option<u64>,
    /// Only those that died before this time (unix ms).
    pub until: Option<u64>,
}

/// The fields of a stored dead letter a [`DeadLetterFilter`] looks at: read without
/// copying the envelope.
#[derive(Deserialize)]
pub struct DeadLetterKey {
    pub handler: String,
    pub event: String,
    pub object_id: String,
    pub entity: String,
    pub died_at: u64,
}

impl DeadLetterFilter {
    /// Whether the filter takes every dead letter.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    pub fn matches(&self, letter: &DeadLetterKey) -> bool {
        self.takes(
            [
                &letter.handler,
                &letter.event,
                &letter.object_id,
                &letter.entity,
            ],
            letter.died_at,
        )
    }

    /// [`Self::matches`], for a dead letter read whole.
    pub fn matches_letter(&self, letter: &DeadLetter) -> bool {
        let d = &letter.delivery;
        self.takes(
            [&d.handler, &d.event, &d.object_id, &d.entity],
            letter.died_at,
        )
    }

    /// `[handler, event, object_id, entity]`, and when it died.
    fn takes(&self, fields: [&str; 4], died_at: u64) -> bool {
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        let [handler, event, object_id, entity] = fields;
        eq(&self.handler, handler)
            && eq(&self.event, event)
            && eq(&self.object_id, object_id)
            && eq(&self.entity, entity)
            && self.since.is_none_or(|s| died_at >= s)
            && self.until.is_none_or(|u| died_at < u)
    }
}

/// What a bulk replay did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Replayed {
    /// The new delivery ids, in the order the dead letters had (their old ids' order).
    pub ids: Vec<u64>,
    /// Matching dead letters left where they are: their handler is not one the replay
    /// may put deliveries in for (the config has no such after-stage handler).
    pub skipped: usize,
    /// Those handlers' names.
    pub skipped_handlers: std::collections::BTreeSet<String>,
}

/// Filters of `GET /v1/executions`; `None` matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecutionFilter {
    pub event: Option<String>,
    pub handler: Option<String>,
    pub object_id: Option<String>,
    pub outcome: Option<String>,
    pub event_id: Option<String>,
    /// Only rows at or after this time (unix ms).
    pub since: Option<u64>,
    /// Only rows with an id above this one: what `--follow` has not seen yet.
    pub after: Option<u64>,
    pub limit: usize,
}

impl ExecutionFilter {
    pub fn matches(&self, row: &Execution) -> bool {
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        eq(&self.event, &row.event)
            && eq(&self.handler, &row.handler)
            && eq(&self.object_id, &row.object_id)
            && eq(&self.outcome, &row.outcome)
            && self
                .event_id
                .as_deref()
                .is_none_or(|w| row.event_id.as_deref() == Some(w))
            && self.after.is_none_or(|a| row.id > a)
            && self.since.is_none_or(|s| row.at >= s)
    }
}

/// How a delivery attempt ended, as the store records it.
#[derive(Debug, Clone, PartialEq)]
pub enum Settle {
    /// Delivered: the delivery leaves the queue.
    Delivered,
    /// Failed, to be tried again at `next_at` (unix ms).
    Retry {
        attempts: u32,
        next_at: u64,
        error: String,
    },
    /// Given up: the delivery moves to the dead letters.
    Dead {
        attempts: u32,
        reason: String,
        error: Option<String>,
    },
}

/// What the execution log and the dedupe table keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub keep_age: Duration,
    pub keep_rows: u64,
    pub dedupe_window: Duration,
}

/// Told of the deliveries each commit stored, in id order.
pub type Sink = Box<dyn Fn(Vec<Queued>) + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_500), "1970-01-01T00:00:01.500Z");
    }

    #[test]
    fn a_delivery_round_trips_without_its_id() {
        let new = NewDelivery {
            handler: "crm".into(),
            event: "clients.create".into(),
            object_id: "12".into(),
            entity: "clients/12".into(),
            message_id: "msg_1".into(),
            body: r#"{"event":{},"data":{}}"#.into(),
            dedupe: None,
            event_id: Some("evt_1".into()),
        };
        let d = Delivery::new(7, new, 1000);
        let bytes = serde_json::to_vec(&d).unwrap();
        let mut back: Delivery = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back.id, 0);
        back.id = 7;
        assert_eq!(back, d);
    }

    #[test]
    fn a_delivery_stored_before_event_ids_still_reads() {
        let old = r#"{"handler":"crm","event":"clients.create","object_id":"12",
            "entity":"clients/12","message_id":"msg_1","body":"{}","attempts":0,
            "next_at":1,"enqueued_at":1}"#;
        let d: Delivery = serde_json::from_str(old).unwrap();
        assert_eq!(d.event_id, None);
        let row: Execution = serde_json::from_str(
            r#"{"at":1,"event":"e","object_id":"1","handler":"h","stage":"after",
            "attempt":1,"outcome":"delivered","duration_ms":1.0}"#,
        )
        .unwrap();
        assert_eq!(row.event_id, None);
    }
}
