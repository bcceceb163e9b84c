//! The single writer: one thread owns every write to the file and commits in groups.
//!
//! Requests arrive on a channel; the writer takes the first, then everything else already
//! waiting, applies the lot in one write transaction, commits once (one fsync), and only
//! then answers each request. Many events in flight therefore share one commit, and no
//! request hears "done" for a write that is not on disk. If anything in a batch fails,
//! the transaction is dropped and every request of the batch gets the error: nothing is
//! half-applied.
//!
//! Execution log rows come on a second, bounded channel, so that a burst of them never
//! delays the queue. A batch holding only log rows and delivery settlements is committed
//! without fsync; the next durable commit (an enqueue, at the latest the periodic prune)
//! makes it durable. A crash before that repeats those attempts: deliveries are at least
//! once anyway.

use std::collections::HashMap;
use std::time::Duration;

use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, WriteTransaction};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, warn};

use super::records::{
    DeadLetter, DeadLetterFilter, DeadLetterKey, Delivery, Execution, NewDelivery, Replayed, now_ms,
};
use super::{DEAD, DEDUPE_AGE, DELIVERIES, EXECUTIONS, META, StoreError};

/// A commit slower than this is logged: the billing waits for enqueue commits.
const SLOW_COMMIT: Duration = Duration::from_millis(100);
/// Most requests applied in one transaction.
const MAX_BATCH: usize = 2048;
/// Longest a batch of execution log rows alone waits for company before its commit.
const LOG_LINGER: Duration = Duration::from_millis(1000);
/// Most rows one prune removes from each table, so that a prune never holds the writer
/// for long; the next one goes on.
const PRUNE_LIMIT: usize = 20_000;

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

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

pub enum Op {
    Enqueue {
        items: Vec<NewDelivery>,
        window: Duration,
        reply: Reply<Vec<Option<Delivery>>>,
    },
    Settle {
        id: u64,
        settle: Settle,
        record: Option<Box<Execution>>,
        reply: Reply<()>,
    },
    Replay {
        id: u64,
        reply: Reply<Option<Delivery>>,
    },
    Drop {
        id: u64,
        reply: Reply<bool>,
    },
    /// Every dead letter matching `filter` whose handler is in `handlers` back to the
    /// queue, in one transaction, in their id order.
    ReplayMatching {
        filter: DeadLetterFilter,
        handlers: Vec<String>,
        reply: Reply<Replayed>,
    },
    /// Every dead letter matching `filter` deleted, in one transaction.
    DropMatching {
        filter: DeadLetterFilter,
        reply: Reply<usize>,
    },
    Prune {
        retention: Retention,
        reply: Reply<usize>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// An answer held until the commit.
enum Answer {
    Enqueued(Reply<Vec<Option<Delivery>>>, Vec<Option<Delivery>>),
    Settled(Reply<()>),
    Replayed(Reply<Option<Delivery>>, Option<Delivery>),
    Dropped(Reply<bool>, bool),
    ReplayedMatching(Reply<Replayed>, Replayed),
    DroppedMatching(Reply<usize>, usize),
    Pruned(Reply<usize>, usize),
}

impl Answer {
    fn send(self, failure: Option<&StoreError>) {
        // A requester that went away (the billing hung up) is no reason to stop.
        match (self, failure) {
            (Answer::Enqueued(tx, v), None) => drop(tx.send(Ok(v))),
            (Answer::Settled(tx), None) => drop(tx.send(Ok(()))),
            (Answer::Replayed(tx, v), None) => drop(tx.send(Ok(v))),
            (Answer::Dropped(tx, v), None) => drop(tx.send(Ok(v))),
            (Answer::ReplayedMatching(tx, v), None) => drop(tx.send(Ok(v))),
            (Answer::DroppedMatching(tx, v), None) => drop(tx.send(Ok(v))),
            (Answer::Pruned(tx, v), None) => drop(tx.send(Ok(v))),
            (Answer::Enqueued(tx, _), Some(e)) => drop(tx.send(Err(e.clone()))),
            (Answer::Settled(tx), Some(e)) => drop(tx.send(Err(e.clone()))),
            (Answer::Replayed(tx, _), Some(e)) => drop(tx.send(Err(e.clone()))),
            (Answer::Dropped(tx, _), Some(e)) => drop(tx.send(Err(e.clone()))),
            (Answer::ReplayedMatching(tx, _), Some(e)) => drop(tx.send(Err(e.clone()))),
            (Answer::DroppedMatching(tx, _), Some(e)) => drop(tx.send(Err(e.clone()))),
            (Answer::Pruned(tx, _), Some(e)) => drop(tx.send(Err(e.clone()))),
        }
    }
}

pub struct Writer {
    pub db: std::sync::Arc<Database>,
    pub ops: mpsc::Receiver<Op>,
    pub logs: mpsc::Receiver<Vec<Execution>>,
    /// Notified when the log channel is half full: a lingering writer commits at once.
    pub log_pressure: std::sync::Arc<tokio::sync::Notify>,
    pub next_delivery: u64,
    pub next_execution: u64,
    /// Dedupe key -> when it was last stored (unix ms): the index of `DEDUPE_AGE`.
    pub dedupe: HashMap<[u8; 32], u64>,
}

/// Changes to the dedupe map made by a batch: undone if it fails, completed if it
/// commits.
#[derive(Default)]
struct DedupeChanges {
    /// Keys set, with what they held before.
    set: Vec<([u8; 32], Option<u64>)>,
    /// Keys pruned from the table, with the time they were pruned at.
    pruned: Vec<([u8; 32], u64)>,
}

impl Writer {
    /// Runs until a `Close` request, or until every sender is gone.
    pub fn run(mut self, runtime: tokio::runtime::Handle) {
        let mut closing = None;
        while closing.is_none() {
            let mut ops = Vec::new();
            let mut rows = Vec::new();
            let first = runtime.block_on(async {
                tokio::select! {
                    biased;
                    op = self.ops.recv() => op.map(Ok),
                    rows = self.logs.recv() => rows.map(Err),
                }
            });
            match first {
                Some(Ok(op)) => ops.push(op),
                Some(Err(r)) => rows.extend(r),
                None => break,
            }
            while ops.len() < MAX_BATCH {
                let Ok(op) = self.ops.try_recv() else { break };
                ops.push(op);
            }
            while rows.len() < MAX_BATCH {
                let Ok(r) = self.logs.try_recv() else { break };
                rows.extend(r);
            }
            if ops.is_empty() && !rows.is_empty() && self.logs.is_empty() {
                // Only log rows, and none left waiting: let more gather before
                // committing, so that a steady stream of events costs a commit per
                // LOG_LINGER, not per event. A request arriving meanwhile, or the log
                // channel filling up to half, ends the wait. (With rows still waiting,
                // there is no lingering: the writer is behind and catches up.)
                self.linger(&runtime, &mut ops, &mut rows);
            }
            if let Some(at) = ops.iter().position(|op| matches!(op, Op::Close { .. })) {
                // Requests behind the close are answered with an error, below.
                let Op::Close { reply } = ops.remove(at) else {
                    unreachable!()
                };
                closing = Some(reply);
                // The log rows still waiting are written with the last batch.
                while let Ok(r) = self.logs.try_recv() {
                    rows.extend(r);
                }
                for late in ops.drain(at..) {
                    refuse(late);
                }
            }
            self.batch(ops, rows, closing.is_some());
        }
        if let Some(reply) = closing {
            let _ = reply.send(());
        }
        // Anything sent after the close hears that the store is closed.
        self.ops.close();
        while let Ok(op) = self.ops.try_recv() {
            refuse(op);
        }
        debug!("store writer stopped");
    }

    /// Waits up to [`LOG_LINGER`] for a request to share the commit with, then takes the
    /// log rows that came meanwhile. Log rows alone do not wake the writer while it
    /// lingers: under load that would be a thread wake-up per event.
    fn linger(
        &mut self,
        runtime: &tokio::runtime::Handle,
        ops: &mut Vec<Op>,
        rows: &mut Vec<Execution>,
    ) {
        let until = tokio::time::Instant::now() + LOG_LINGER;
        let pressure = self.log_pressure.clone();
        runtime.block_on(async {
            tokio::select! {
                op = self.ops.recv() => ops.extend(op),
                () = pressure.notified() => {}
                () = tokio::time::sleep_until(until) => {}
            }
        });
        while rows.len() < MAX_BATCH {
            let Ok(more) = self.logs.try_recv() else {
                break;
            };
            rows.extend(more);
        }
    }

    fn batch(&mut self, ops: Vec<Op>, rows: Vec<Execution>, last: bool) {
        if ops.is_empty() && rows.is_empty() {
            return;
        }
        // Settlements and log rows can wait for the next durable commit: losing them in a
        // crash repeats an attempt (deliveries are at least once) or a log row. What the
        // billing or an operator was told is done (enqueue, replay, drop) cannot.
        let durable = last || ops.iter().any(|op| !matches!(op, Op::Settle { .. }));
        let (next_delivery, next_execution) = (self.next_delivery, self.next_execution);
        let mut answers = Vec::with_capacity(ops.len());
        let mut changes = DedupeChanges::default();
        let (n_ops, n_rows) = (ops.len(), rows.len());
        let started = std::time::Instant::now();
        let result = self.apply(ops, rows, durable, &mut answers, &mut changes);
        let took = started.elapsed();
        if took > SLOW_COMMIT {
            warn!(
                ms = took.as_millis() as u64,
                requests = n_ops,
                log_rows = n_rows,
                durable,
                "slow store commit"
            );
        }
        if let Err(e) = &result {
            // Nothing of the batch was committed: the counters and the map go back too.
            self.next_delivery = next_delivery;
            self.next_execution = next_execution;
            for (key, old) in changes.set.into_iter().rev() {
                match old {
                    Some(at) => self.dedupe.insert(key, at),
                    None => self.dedupe.remove(&key),
                };
            }
            error!(error = %e, "store write failed");
        } else {
            for (key, at) in changes.pruned {
                if self.dedupe.get(&key) == Some(&at) {
                    self.dedupe.remove(&key);
                }
            }
        }
        let failure = result.err();
        for answer in answers {
            answer.send(failure.as_ref());
        }
    }

    fn apply(
        &mut self,
        ops: Vec<Op>,
        rows: Vec<Execution>,
        durable: bool,
        answers: &mut Vec<Answer>,
        changes: &mut DedupeChanges,
    ) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(StoreError::write)?;
        if !durable {
            txn.set_durability(Durability::None)
                .map_err(StoreError::write)?;
        }
        let now = now_ms();
        for op in ops {
            // On an error the answers collected so far hear it: keep going only on success.
            match op {
                Op::Enqueue {
                    items,
                    window,
                    reply,
                } => {
                    let stored = self.enqueue(&txn, items, window, now, changes);
                    match stored {
                        Ok(v) => answers.push(Answer::Enqueued(reply, v)),
                        Err(e) => {
                            answers.push(Answer::Enqueued(reply, Vec::new()));
                            return Err(e);
                        }
                    }
                }
                Op::Settle {
                    id,
                    settle,
                    record,
                    reply,
                } => {
                    answers.push(Answer::Settled(reply));
                    settle_one(&txn, id, settle, now)?;
                    if let Some(record) = record {
                        self.log(&txn, vec![*record])?;
                    }
                }
                Op::Replay { id, reply } => {
                    let replayed = self.replay(&txn, id, now);
                    let ok = replayed.as_ref().ok().cloned().flatten();
                    answers.push(Answer::Replayed(reply, ok));
                    replayed?;
                }
                Op::Drop { id, reply } => {
                    let dropped = drop_dead(&txn, id);
                    answers.push(Answer::Dropped(reply, *dropped.as_ref().unwrap_or(&false)));
                    dropped?;
                }
                Op::ReplayMatching {
                    filter,
                    handlers,
                    reply,
                } => {
                    let replayed = self.replay_matching(&txn, &filter, &handlers, now);
                    match replayed {
                        Ok(v) => answers.push(Answer::ReplayedMatching(reply, v)),
                        Err(e) => {
                            answers.push(Answer::ReplayedMatching(reply, Replayed::default()));
                            return Err(e);
                        }
                    }
                }
                Op::DropMatching { filter, reply } => {
                    let dropped = drop_matching(&txn, &filter);
                    answers.push(Answer::DroppedMatching(
                        reply,
                        *dropped.as_ref().unwrap_or(&0),
                    ));
                    dropped?;
                }
                Op::Prune { retention, reply } => {
                    let pruned = prune(&txn, retention, now, &mut changes.pruned);
                    answers.push(Answer::Pruned(reply, *pruned.as_ref().unwrap_or(&0)));
                    pruned?;
                }
                Op::Close { .. } => unreachable!("taken out by run"),
            }
        }
        if !rows.is_empty() {
            self.log(&txn, rows)?;
        }
        {
            let mut meta = txn.open_table(META).map_err(StoreError::write)?;
            meta.insert("next_delivery_id", self.next_delivery)
                .map_err(StoreError::write)?;
            meta.insert("next_execution_id", self.next_execution)
                .map_err(StoreError::write)?;
        }
        txn.commit().map_err(StoreError::write)
    }

    fn enqueue(
        &mut self,
        txn: &WriteTransaction,
        items: Vec<NewDelivery>,
        window: Duration,
        now: u64,
        changes: &mut DedupeChanges,
    ) -> Result<Vec<Option<Delivery>>, StoreError> {
        let mut queue = txn.open_table(DELIVERIES).map_err(StoreError::write)?;
        let mut by_age = txn.open_table(DEDUPE_AGE).map_err(StoreError::write)?;
        let window = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            if let Some(key) = item.dedupe {
                let seen = self.dedupe.get(&key).copied();
                if seen.is_some_and(|at| now < at.saturating_add(window)) {
                    out.push(None);
                    continue;
                }
                // An older row for the key stays until pruned; the map has the newest.
                by_age.insert((now, &key), ()).map_err(StoreError::write)?;
                changes.set.push((key, self.dedupe.insert(key, now)));
            }
            let delivery = Delivery::new(self.next_delivery, item, now);
            self.next_delivery += 1;
            queue
                .insert(delivery.id, encode(&delivery).as_slice())
                .map_err(StoreError::write)?;
            out.push(Some(delivery));
        }
        Ok(out)
    }

    fn replay(
        &mut self,
        txn: &WriteTransaction,
        id: u64,
        now: u64,
    ) -> Result<Option<Delivery>, StoreError> {
        let mut dead = txn.open_table(DEAD).map_err(StoreError::write)?;
        let Some(letter) = dead.remove(id).map_err(StoreError::write)? else {
            return Ok(None);
        };
        let letter: DeadLetter = decode(letter.value())?;
        let mut delivery = letter.delivery;
        // A new id puts it behind whatever its entity has queued meanwhile; the message id
        // stays, so a handler that dedupes on `webhook-id` recognises it.
        delivery.id = self.next_delivery;
        self.next_delivery += 1;
        delivery.attempts = 0;
        delivery.next_at = now;
        delivery.last_error = None;
        let mut queue = txn.open_table(DELIVERIES).map_err(StoreError::write)?;
        queue
            .insert(delivery.id, encode(&delivery).as_slice())
            .map_err(StoreError::write)?;
        Ok(Some(delivery))
    }

    /// The bulk form of [`Self::replay`]: the matching dead letters, taken in id order
    /// (the order their events arrived), get new ids in that order, so each entity's
    /// replayed deliveries go out in their original order, behind what it queued since.
    fn replay_matching(
        &mut self,
        txn: &WriteTransaction,
        filter: &DeadLetterFilter,
        handlers: &[String],
        now: u64,
    ) -> Result<Replayed, StoreError> {
        let mut out = Replayed::default();
        let mut dead = txn.open_table(DEAD).map_err(StoreError::write)?;
        let mut queue = txn.open_table(DELIVERIES).map_err(StoreError::write)?;
        let skipped = &mut out.skipped_handlers;
        let mut n_skipped = 0;
        let taken = dead
            .extract_if(|_, value| {
                let Ok(key) = serde_json::from_slice::<DeadLetterKey>(value) else {
                    return false;
                };
                if !filter.matches(&key) {
                    return false;
                }
                if handlers.contains(&key.handler) {
                    return true;
                }
                n_skipped += 1;
                skipped.insert(key.handler);
                false
            })
            .map_err(StoreError::write)?;
        for entry in taken {
            let (_, value) = entry.map_err(StoreError::write)?;
            let letter: DeadLetter = decode(value.value())?;
            let mut delivery = letter.delivery;
            delivery.id = self.next_delivery;
            self.next_delivery += 1;
            delivery.attempts = 0;
            delivery.next_at = now;
            delivery.last_error = None;
            queue
                .insert(delivery.id, encode(&delivery).as_slice())
                .map_err(StoreError::write)?;
            out.deliveries.push(delivery);
        }
        out.skipped = n_skipped;
        Ok(out)
    }

    fn log(&mut self, txn: &WriteTransaction, rows: Vec<Execution>) -> Result<(), StoreError> {
        let mut table = txn.open_table(EXECUTIONS).map_err(StoreError::write)?;
        for row in rows {
            table
                .insert(self.next_execution, encode(&row).as_slice())
                .map_err(StoreError::write)?;
            self.next_execution += 1;
        }
        Ok(())
    }
}

fn settle_one(txn: &WriteTransaction, id: u64, settle: Settle, now: u64) -> Result<(), StoreError> {
    let mut queue = txn.open_table(DELIVERIES).map_err(StoreError::write)?;
    match settle {
        Settle::Delivered => {
            queue.remove(id).map_err(StoreError::write)?;
        }
        Settle::Retry {
            attempts,
            next_at,
            error,
        } => {
            let Some(old) = queue.get(id).map_err(StoreError::write)? else {
                return Ok(());
            };
            let mut delivery: Delivery = decode(old.value())?;
            drop(old);
            delivery.attempts = attempts;
            delivery.next_at = next_at;
            delivery.last_error = Some(error);
            queue
                .insert(id, encode(&delivery).as_slice())
                .map_err(StoreError::write)?;
        }
        Settle::Dead {
            attempts,
            reason,
            error,
        } => {
            let Some(old) = queue.remove(id).map_err(StoreError::write)? else {
                return Ok(());
            };
            let mut delivery: Delivery = decode(old.value())?;
            drop(old);
            delivery.id = id;
            delivery.attempts = attempts;
            if error.is_some() {
                delivery.last_error = error;
            }
            let letter = DeadLetter {
                delivery,
                reason,
                died_at: now,
            };
            let mut dead = txn.open_table(DEAD).map_err(StoreError::write)?;
            dead.insert(id, encode(&letter).as_slice())
                .map_err(StoreError::write)?;
        }
    }
    Ok(())
}

/// Drops execution rows beyond the retention, and dedupe keys older than the window.
fn prune(
    txn: &WriteTransaction,
    retention: Retention,
    now: u64,
    pruned: &mut Vec<([u8; 32], u64)>,
) -> Result<usize, StoreError> {
    let mut removed = 0;
    let oldest =
        now.saturating_sub(u64::try_from(retention.keep_age.as_millis()).unwrap_or(u64::MAX));
    let mut rows = txn.open_table(EXECUTIONS).map_err(StoreError::write)?;
    while removed < PRUNE_LIMIT {
        let too_many = rows.len().map_err(StoreError::write)? > retention.keep_rows;
        let (key, too_old) = {
            let first = rows.first().map_err(StoreError::write)?;
            let Some((key, value)) = first else { break };
            let at = decode::<Execution>(value.value()).map_or(0, |r| r.at);
            (key.value(), at < oldest)
        };
        if !(too_many || too_old) {
            break;
        }
        rows.remove(key).map_err(StoreError::write)?;
        removed += 1;
    }
    let cutoff =
        now.saturating_sub(u64::try_from(retention.dedupe_window.as_millis()).unwrap_or(u64::MAX));
    let mut by_age = txn.open_table(DEDUPE_AGE).map_err(StoreError::write)?;
    let mut expired = Vec::new();
    for entry in by_age
        .range((0u64, &[0u8; 32])..(cutoff, &[0u8; 32]))
        .map_err(StoreError::write)?
    {
        let (key, _) = entry.map_err(StoreError::write)?;
        let (at, hash) = key.value();
        expired.push((*hash, at));
        if expired.len() >= PRUNE_LIMIT {
            break;
        }
    }
    for (hash, at) in &expired {
        by_age.remove((*at, hash)).map_err(StoreError::write)?;
    }
    let n = expired.len();
    pruned.extend(expired);
    Ok(removed + n)
}

fn drop_dead(txn: &WriteTransaction, id: u64) -> Result<bool, StoreError> {
    let mut dead = txn.open_table(DEAD).map_err(StoreError::write)?;
    let existed = dead.remove(id).map_err(StoreError::write)?.is_some();
    Ok(existed)
}

/// Deletes every dead letter matching `filter`; how many.
fn drop_matching(txn: &WriteTransaction, filter: &DeadLetterFilter) -> Result<usize, StoreError> {
    let mut dead = txn.open_table(DEAD).map_err(StoreError::write)?;
    let mut n = 0;
    dead.retain(|_, value| {
        let take = serde_json::from_slice::<DeadLetterKey>(value).is_ok_and(|k| filter.matches(&k));
        n += usize::from(take);
        !take
    })
    .map_err(StoreError::write)?;
    Ok(n)
}

fn refuse(op: Op) {
    let closed = StoreError::Closed;
    match op {
        Op::Enqueue { reply, .. } => drop(reply.send(Err(closed))),
        Op::Settle { reply, .. } => drop(reply.send(Err(closed))),
        Op::Replay { reply, .. } => drop(reply.send(Err(closed))),
        Op::Drop { reply, .. } => drop(reply.send(Err(closed))),
        Op::ReplayMatching { reply, .. } => drop(reply.send(Err(closed))),
        Op::DropMatching { reply, .. } => drop(reply.send(Err(closed))),
        Op::Prune { reply, .. } => drop(reply.send(Err(closed))),
        Op::Close { reply } => drop(reply.send(())),
    }
}

pub fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("store rows serialise")
}

pub fn decode<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("unreadable row: {e}")))
}
