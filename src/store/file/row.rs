//! The queue's rows (`deliveries`) and the execution log's (`executions`): postcard
//! after a one-byte tag.
//!
//! Each attempt reads its row back, and the envelope is most of it. As JSON the envelope
//! was an escaped string, unescaped on every read: 28k instructions of a stored event's
//! 277k (BENCHMARKS.md, "Where the stored path spends its time"). In postcard a string
//! is its length and its bytes, so a read is a few copies, and `handler` and `entity`
//! come first, so the queue's scan at start reads only them.
//!
//! An execution log row is written for every handler call, on the writer thread: in
//! JSON, its encoding was a third of the log's cost there (7.4k instructions a row), and
//! its keys were most of its size. The rows a commit writes go in blocks of up to
//! [`BLOCK_ROWS`] under one key, the id of the block's first row (the others follow it
//! one by one): one B-tree insert a block, where a row each cost about 5.6k instructions
//! (BENCHMARKS.md, "Tenth pass").
//!
//! Rows written by earlier versions are JSON: they begin with `{`, never with [`TAG`],
//! and are read as before. A queued row is written in this format the next time it is
//! written (a retry's settlement, a replay); old log rows (a JSON row or a [`TAG`] row
//! under each key) stay as they are until pruned, each read as a block of one.
//! Dead letters stay JSON (the API's filters read them, never on the event path).

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::config::Stage;
use crate::store::records::{Delivery, Execution, NewDelivery};

/// The first byte of a postcard row; `{` (0x7b) begins a JSON one.
const TAG: u8 = 1;
/// The first byte of a block of log rows: their number, then each row (postcard).
const BLOCK: u8 = 2;
/// Most log rows in one block. A query decodes whole blocks, and retention rewrites the
/// oldest one when it keeps only part of it.
pub(super) const BLOCK_ROWS: usize = 64;

/// A delivery row, borrowed from where it is read or written. The field order is the
/// format: add fields at the end only, with a new [`TAG`].
#[derive(Serialize, Deserialize)]
struct Row<'a> {
    #[serde(borrow)]
    handler: Cow<'a, str>,
    #[serde(borrow)]
    entity: Cow<'a, str>,
    enqueued_at: u64,
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow)]
    object_id: Cow<'a, str>,
    #[serde(borrow)]
    message_id: Cow<'a, str>,
    #[serde(borrow)]
    body: Cow<'a, str>,
    attempts: u32,
    next_at: u64,
    #[serde(borrow)]
    last_error: Option<Cow<'a, str>>,
    #[serde(borrow)]
    event_id: Option<Cow<'a, str>>,
}

/// The part of a row the queue's scan and the oldest-delivery gauge need.
#[derive(Deserialize)]
pub(super) struct Head<'a> {
    #[serde(borrow)]
    pub handler: Cow<'a, str>,
    #[serde(borrow)]
    pub entity: Cow<'a, str>,
    pub enqueued_at: u64,
}

fn write(row: &Row<'_>) -> Vec<u8> {
    postcard::to_extend(row, vec![TAG]).expect("delivery rows serialise")
}

/// The row of a delivery just accepted at `now`.
pub(super) fn accepted(new: &NewDelivery, now: u64) -> Vec<u8> {
    write(&Row {
        handler: Cow::Borrowed(&new.handler),
        entity: Cow::Borrowed(&new.entity),
        enqueued_at: now,
        event: Cow::Borrowed(&new.event),
        object_id: Cow::Borrowed(&new.object_id),
        message_id: Cow::Borrowed(&new.message_id),
        body: Cow::Borrowed(&new.body),
        attempts: 0,
        next_at: now,
        last_error: None,
        event_id: new.event_id.as_deref().map(Cow::Borrowed),
    })
}

/// The row of a stored delivery (its id is the row's key, not in the row).
pub(super) fn encode(d: &Delivery) -> Vec<u8> {
    write(&Row {
        handler: Cow::Borrowed(&d.handler),
        entity: Cow::Borrowed(&d.entity),
        enqueued_at: d.enqueued_at,
        event: Cow::Borrowed(&d.event),
        object_id: Cow::Borrowed(&d.object_id),
        message_id: Cow::Borrowed(&d.message_id),
        body: Cow::Borrowed(&d.body),
        attempts: d.attempts,
        next_at: d.next_at,
        last_error: d.last_error.as_deref().map(Cow::Borrowed),
        event_id: d.event_id.as_deref().map(Cow::Borrowed),
    })
}

/// An execution log row. The field order is the format, as for [`Row`]; `stage` is
/// stored as its variant's index (before 0, after 1).
#[derive(Serialize, Deserialize)]
struct LogRow<'a> {
    at: u64,
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow)]
    object_id: Cow<'a, str>,
    #[serde(borrow)]
    handler: Cow<'a, str>,
    stage: Stage,
    attempt: u32,
    #[serde(borrow)]
    outcome: Cow<'a, str>,
    duration_ms: f64,
    code: Option<i64>,
    #[serde(borrow)]
    excerpt: Cow<'a, str>,
    #[serde(borrow)]
    error: Option<Cow<'a, str>>,
    delivery: Option<u64>,
    #[serde(borrow)]
    event_id: Option<Cow<'a, str>>,
}

/// A block of log rows, oldest first (ids: the key, then one more each).
pub(super) fn executions<'a>(rows: impl ExactSizeIterator<Item = &'a Execution>) -> Vec<u8> {
    let n = u32::try_from(rows.len()).expect("a block holds few rows");
    let mut out = postcard::to_extend(&n, vec![BLOCK]).expect("a count serialises");
    for e in rows {
        out = postcard::to_extend(&log_row(e), out).expect("log rows serialise");
    }
    out
}

/// The rows under `key` in the log's table, oldest first, with their ids: a block's, or
/// the one row of an earlier version.
pub(super) fn read_executions(key: u64, bytes: &[u8]) -> Result<Vec<Execution>, String> {
    let Some(rest) = bytes.strip_prefix(&[BLOCK]) else {
        let mut row = read_execution(bytes)?;
        row.id = key;
        return Ok(vec![row]);
    };
    let (n, mut rest) = postcard::take_from_bytes::<u32>(rest).map_err(|e| e.to_string())?;
    let mut rows = Vec::with_capacity(usize::try_from(n).unwrap_or(0).min(BLOCK_ROWS));
    for id in key..key.saturating_add(u64::from(n)) {
        let (row, left) = postcard::take_from_bytes::<LogRow<'_>>(rest)
            .map_err(|e| format!("row {} of the block at {key}: {e}", id - key + 1))?;
        rows.push(owned(id, row));
        rest = left;
    }
    if !rest.is_empty() {
        return Err(format!(
            "{} bytes after the last row of the block at {key}",
            rest.len()
        ));
    }
    Ok(rows)
}

/// How many rows are under a key of the log's table, without reading them.
pub(super) fn rows_in(bytes: &[u8]) -> Result<u64, String> {
    match bytes.strip_prefix(&[BLOCK]) {
        Some(rest) => postcard::take_from_bytes::<u32>(rest)
            .map(|(n, _)| u64::from(n))
            .map_err(|e| e.to_string()),
        None => Ok(1),
    }
}

fn log_row(e: &Execution) -> LogRow<'_> {
    LogRow {
        at: e.at,
        event: Cow::Borrowed(&e.event),
        object_id: Cow::Borrowed(&e.object_id),
        handler: Cow::Borrowed(&e.handler),
        stage: e.stage,
        attempt: e.attempt,
        outcome: Cow::Borrowed(&e.outcome),
        duration_ms: e.duration_ms,
        code: e.code,
        excerpt: Cow::Borrowed(&e.excerpt),
        error: e.error.as_deref().map(Cow::Borrowed),
        delivery: e.delivery,
        event_id: e.event_id.as_deref().map(Cow::Borrowed),
    }
}

/// The row of one handler call, as versions before blocks wrote it.
#[cfg(test)]
pub(super) fn execution(e: &Execution) -> Vec<u8> {
    postcard::to_extend(&log_row(e), vec![TAG]).expect("log rows serialise")
}

/// A log row of an earlier version (one under each key), with `id` 0.
fn read_execution(bytes: &[u8]) -> Result<Execution, String> {
    let Some(rest) = bytes.strip_prefix(&[TAG]) else {
        return serde_json::from_slice(bytes).map_err(|e| e.to_string());
    };
    let row: LogRow<'_> = postcard::from_bytes(rest).map_err(|e| e.to_string())?;
    Ok(owned(0, row))
}

fn owned(id: u64, row: LogRow<'_>) -> Execution {
    Execution {
        id,
        at: row.at,
        event: row.event.into_owned(),
        object_id: row.object_id.into_owned(),
        handler: row.handler.into_owned(),
        stage: row.stage,
        attempt: row.attempt,
        outcome: row.outcome.into_owned(),
        duration_ms: row.duration_ms,
        code: row.code,
        excerpt: row.excerpt.into_owned(),
        error: row.error.map(Cow::into_owned),
        delivery: row.delivery,
        event_id: row.event_id.map(Cow::into_owned),
    }
}

/// A stored delivery, with `id` 0: the caller knows the key it read.
pub(super) fn decode(bytes: &[u8]) -> Result<Delivery, String> {
    let Some(rest) = bytes.strip_prefix(&[TAG]) else {
        return serde_json::from_slice(bytes).map_err(|e| e.to_string());
    };
    let row: Row<'_> = postcard::from_bytes(rest).map_err(|e| e.to_string())?;
    Ok(Delivery {
        id: 0,
        handler: row.handler.into_owned(),
        event: row.event.into_owned(),
        object_id: row.object_id.into_owned(),
        entity: row.entity.into_owned(),
        message_id: row.message_id.into_owned(),
        body: row.body.into_owned(),
        attempts: row.attempts,
        next_at: row.next_at,
        enqueued_at: row.enqueued_at,
        last_error: row.last_error.map(Cow::into_owned),
        event_id: row.event_id.map(Cow::into_owned),
    })
}

/// A row's handler, entity and acceptance time, without reading the rest.
pub(super) fn head(bytes: &[u8]) -> Result<Head<'_>, String> {
    match bytes.strip_prefix(&[TAG]) {
        Some(rest) => postcard::take_from_bytes(rest)
            .map(|(head, _)| head)
            .map_err(|e| e.to_string()),
        None => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new() -> NewDelivery {
        NewDelivery {
            handler: "crm".into(),
            event: "clients.create".into(),
            object_id: "12".into(),
            entity: "clients/12".into(),
            message_id: "msg_1".into(),
            body: r#"{"event":{"name":"clients.create"},"data":{"name":"O\"Neil \u00e9"}}"#.into(),
            dedupe: None,
            event_id: Some("evt_1".into()),
        }
    }

    #[test]
    fn an_accepted_row_reads_back_as_the_delivery_and_its_head() {
        let bytes = accepted(&new(), 1000);
        assert_eq!(bytes[0], TAG);
        let d = Delivery::new(0, new(), 1000);
        assert_eq!(decode(&bytes).unwrap(), d);
        assert_eq!(bytes, encode(&d));
        let head = head(&bytes).unwrap();
        assert_eq!(
            (&*head.handler, &*head.entity, head.enqueued_at),
            ("crm", "clients/12", 1000)
        );
    }

    #[test]
    fn a_retried_row_keeps_its_error_and_times() {
        let mut d = Delivery::new(0, new(), 1000);
        d.attempts = 3;
        d.next_at = 9000;
        d.last_error = Some("HTTP 503".into());
        d.event_id = None;
        assert_eq!(decode(&encode(&d)).unwrap(), d);
    }

    #[test]
    fn a_json_row_of_an_earlier_version_still_reads() {
        let mut d = Delivery::new(0, new(), 1000);
        d.last_error = Some("HTTP 500".into());
        let json = serde_json::to_vec(&d).unwrap();
        assert_eq!(json[0], b'{');
        assert_eq!(decode(&json).unwrap(), d);
        let head = head(&json).unwrap();
        assert_eq!((&*head.handler, &*head.entity), ("crm", "clients/12"));
        // Written again, it is a postcard row.
        assert_eq!(encode(&decode(&json).unwrap())[0], TAG);
    }

    fn call() -> Execution {
        Execution {
            id: 0,
            at: 1_700_000_000_123,
            event: "clients.update".into(),
            object_id: "12".into(),
            handler: "crm".into(),
            stage: Stage::After,
            attempt: 2,
            outcome: "failed".into(),
            duration_ms: 12.25,
            code: Some(503),
            excerpt: "busy \"now\"".into(),
            error: Some("HTTP status 503: busy".into()),
            delivery: Some(42),
            event_id: Some("evt_1".into()),
        }
    }

    fn with_id(id: u64, row: Execution) -> Execution {
        Execution { id, ..row }
    }

    #[test]
    fn a_block_of_log_rows_reads_back_with_their_ids_and_is_smaller_than_their_json() {
        let bare = Execution {
            stage: Stage::Before,
            code: None,
            excerpt: String::new(),
            error: None,
            delivery: None,
            event_id: None,
            ..call()
        };
        let rows = [call(), bare.clone(), call()];
        let block = executions(rows.iter());
        assert_eq!(block[0], BLOCK);
        assert_eq!(rows_in(&block).unwrap(), 3);
        assert_eq!(
            read_executions(40, &block).unwrap(),
            vec![with_id(40, call()), with_id(41, bare), with_id(42, call())]
        );
        let json: usize = rows
            .iter()
            .map(|r| serde_json::to_vec(r).unwrap().len())
            .sum();
        assert!(block.len() * 2 < json, "{} bytes", block.len());
    }

    #[test]
    fn log_rows_of_earlier_versions_still_read_as_blocks_of_one() {
        let json = serde_json::to_vec(&call()).unwrap();
        assert_eq!(read_executions(7, &json).unwrap(), vec![with_id(7, call())]);
        assert_eq!(rows_in(&json).unwrap(), 1);
        let one = execution(&call());
        assert_eq!(one[0], TAG);
        assert_eq!(read_executions(8, &one).unwrap(), vec![with_id(8, call())]);
        assert_eq!(rows_in(&one).unwrap(), 1);
        assert!(read_executions(8, &one[..10]).is_err());
    }

    #[test]
    fn a_damaged_block_is_an_error_naming_the_row() {
        let rows = [call(), call()];
        let block = executions(rows.iter());
        let cut = read_executions(5, &block[..block.len() - 4]).unwrap_err();
        assert!(cut.starts_with("row 2 of the block at 5"), "{cut}");
        let mut long = block.clone();
        long.push(0);
        let extra = read_executions(5, &long).unwrap_err();
        assert_eq!(extra, "1 bytes after the last row of the block at 5");
    }

    #[test]
    fn a_damaged_row_is_an_error_naming_what_is_wrong() {
        let mut bytes = accepted(&new(), 1000);
        bytes.truncate(bytes.len() / 2);
        assert!(decode(&bytes).is_err());
        assert!(
            decode(b"{not json")
                .unwrap_err()
                .contains("key must be a string")
        );
        assert!(decode(&[TAG]).is_err());
        assert!(decode(b"").is_err());
    }
}
