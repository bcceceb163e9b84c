//! The single writer: one thread owns every write to the file and commits in groups.
//!
//! Requests arrive on a channel; the writer takes the first, then everything else already
//! waiting, applies the lot in one write transaction, commits once (one fsync), and only
//! then answers each request. Many events in flight therefore share one commit, and no
//! request hears "done" for a write that is not on disk.
//!
//! Faults stay where they belong:
//! - if a batch fails, nothing of it is committed, and each request is tried again in a
//!   transaction of its own, so that one bad request fails alone;
//! - every request hears the real error, whatever step failed;
//! - a failed write poisons a redb handle (every later write says "previous I/O
//!   error"), so after a storage error the writer reopens the file, at most once a
//!   second, probing by itself while no request comes, and the store reports itself
//!   unwritable ([`super::File::is_open`]) until a write succeeds again, one at least
//!   as large as the write that failed (on a disk nearly full, a small write can go
//!   through while every event still fails; the store must not read as writable then,
//!   nor flap between the two for a probe or an alert to miss). The
//!   settlements committed without fsync since the last durable commit are kept in memory
//!   and applied again after a reopen, so a full disk never brings back a delivery that
//!   was already settled.
//!
//! After each commit the writer hands the deliveries it stored (enqueued or replayed) to
//! the sink ([`super::File::on_commit`]), in id order, before it answers anyone: the
//! after stage learns of every stored delivery from the commit itself, whether or not
//! the request that caused it is still there.
//!
//! Execution log rows come on a second, bounded channel, so that a burst of them never
//! delays the queue. A batch holding only log rows, settlements of delivered or retried
//! attempts and accepts whose deliveries were all duplicates (their answer rests on the
//! first one's commit) is committed without fsync ([`Op::needs_fsync`]); the next durable commit (an accept that stores a
//! delivery, at the latest the periodic prune) makes it durable. A crash before that
//! repeats those attempts: deliveries are at least once anyway.
//!
//! Under a stream of accepts and deliveries, the writer holds the execution log's rows
//! (the channel's, and each delivery's once it is committed) and writes them together
//! every [`ROWS_EVERY`], rather than a few rows in every commit: each commit that touches
//! the log copies its last pages, so this is most of what the log costs per event. A row
//! therefore reaches the file up to [`ROWS_EVERY`] after its call under load, and up to
//! [`LOG_LINGER`] when quiet; a retry's or a dead letter's row is written with it, and
//! with every row held then. Held rows count against the log's byte bound like rows
//! still in the channel, and a crash loses them as it loses a commit without fsync.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redb::{Database, Durability, ReadableTable, Table, WriteTransaction};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use super::row::{self, BLOCK_ROWS};
use super::{DEAD, DEDUPE_AGE, DELIVERIES, EXECUTIONS, META};

/// Where a reopen after a storage error checks that the file has room again; dropped
/// at once.
const ROOM: redb::TableDefinition<(), &[u8]> = redb::TableDefinition::new("room_probe");
use crate::store::StoreError;
use crate::store::records::{
    DeadLetter, DeadLetterFilter, DeadLetterKey, Execution, NewDelivery, Queued, Replayed, now_ms,
};
use crate::store::records::{Retention, Settle, Sink};

/// A commit slower than this is logged: the billing waits for enqueue commits.
const SLOW_COMMIT: Duration = Duration::from_millis(100);
/// Most requests applied in one transaction.
const MAX_BATCH: usize = 2048;
/// Longest a batch of execution log rows alone waits for company before its commit.
const LOG_LINGER: Duration = Duration::from_millis(1000);
/// Under a stream of accepts and deliveries: how long execution log rows (the log
/// channel's and the delivered attempts') are held for one write, instead of going into
/// every commit. Held rows are written by the first commit after this, by any commit with
/// another kind of request, and at the latest [`LOG_LINGER`] after the first was held.
const ROWS_EVERY: Duration = Duration::from_millis(100);
/// Most rows one prune removes from each table, so that a prune never holds the writer
/// for long; the caller prunes again at once while a prune comes back full.
pub const PRUNE_LIMIT: usize = 20_000;
/// After a storage error: how often the writer tries to reopen the file.
const REOPEN_EVERY: Duration = Duration::from_secs(1);
/// Settlements kept for a reopen before a commit is made durable anyway.
const REDO_MAX: usize = 10_000;
/// How far above the next ids the file's counters are set. A commit writes the counters
/// only when an id it hands out reaches them, not every time: a restart then goes on
/// from them, skipping at most this many ids and never reusing one.
pub(super) const ID_BLOCK: u64 = 1024;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

pub(super) enum Op {
    Enqueue {
        items: Vec<NewDelivery>,
        window: Duration,
        reply: Reply<Vec<Option<u64>>>,
    },
    Settle {
        id: u64,
        settle: Settle,
        record: Option<Box<Execution>>,
        reply: Reply<()>,
    },
    Replay {
        id: u64,
        reply: Reply<Option<u64>>,
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

/// What a request did, held until its commit.
enum Done {
    Enqueued(Vec<Option<u64>>),
    Settled,
    Replayed(Option<u64>),
    Dropped(bool),
    ReplayedMatching(Replayed),
    DroppedMatching(usize),
    Pruned(usize),
}

impl Op {
    /// Whether its commit must be durable by itself. A delivery's attempt (delivered, or
    /// to be retried) and log rows can wait for the next durable commit: losing them in
    /// a crash repeats an attempt (deliveries are at least once) or a log row. What the
    /// billing or an operator was told is done cannot: a replay, a drop, and a delivery
    /// moved to the dead letters (shown to the operator, who may replay or drop it; lost,
    /// it would be tried again, and its handler called once more after a 410). Accepts are
    /// looked at in `apply`, where it is known whether they stored anything.
    fn needs_fsync(&self) -> bool {
        !matches!(
            self,
            Op::Enqueue { .. }
                | Op::Settle {
                    settle: Settle::Delivered | Settle::Retry { .. },
                    ..
                }
        )
    }

    /// About how many bytes the request adds to the file: an accept's bodies.
    fn bytes(&self) -> usize {
        match self {
            Op::Enqueue { items, .. } => items.iter().map(|item| item.body.len()).sum(),
            _ => 0,
        }
    }

    /// Answers the request. A requester that went away (the billing hung up) is no reason
    /// to stop: what it asked for is committed, and the sink has the deliveries.
    fn answer(self, result: Result<Done, StoreError>) {
        match (self, result) {
            (Op::Enqueue { reply, .. }, Ok(Done::Enqueued(v))) => drop(reply.send(Ok(v))),
            (Op::Settle { reply, .. }, Ok(Done::Settled)) => drop(reply.send(Ok(()))),
            (Op::Replay { reply, .. }, Ok(Done::Replayed(v))) => drop(reply.send(Ok(v))),
            (Op::Drop { reply, .. }, Ok(Done::Dropped(v))) => drop(reply.send(Ok(v))),
            (Op::ReplayMatching { reply, .. }, Ok(Done::ReplayedMatching(v))) => {
                drop(reply.send(Ok(v)));
            }
            (Op::DropMatching { reply, .. }, Ok(Done::DroppedMatching(v))) => {
                drop(reply.send(Ok(v)));
            }
            (Op::Prune { reply, .. }, Ok(Done::Pruned(v))) => drop(reply.send(Ok(v))),
            (op, Ok(_)) => op.answer(Err(StoreError::Write("mismatched answer".into()))),
            (Op::Enqueue { reply, .. }, Err(e)) => drop(reply.send(Err(e))),
            (Op::Settle { reply, .. }, Err(e)) => drop(reply.send(Err(e))),
            (Op::Replay { reply, .. }, Err(e)) => drop(reply.send(Err(e))),
            (Op::Drop { reply, .. }, Err(e)) => drop(reply.send(Err(e))),
            (Op::ReplayMatching { reply, .. }, Err(e)) => drop(reply.send(Err(e))),
            (Op::DropMatching { reply, .. }, Err(e)) => drop(reply.send(Err(e))),
            (Op::Prune { reply, .. }, Err(e)) => drop(reply.send(Err(e))),
            (Op::Close { reply }, _) => drop(reply.send(())),
        }
    }
}

/// What the writer needs from the store that starts it.
pub(super) struct Parts {
    pub db: Arc<ArcSwapOption<Database>>,
    /// The file, for reopening after a storage error; `None` for a store in memory.
    pub path: Option<PathBuf>,
    pub ops: mpsc::Receiver<Op>,
    pub logs: mpsc::Receiver<Vec<Execution>>,
    /// Notified when the log channel is half full: a lingering writer commits at once.
    pub log_pressure: Arc<tokio::sync::Notify>,
    /// Bytes of rows sent and not yet written: the writer takes off what each batch held.
    pub log_bytes: Arc<std::sync::atomic::AtomicUsize>,
    pub next_delivery: u64,
    pub next_execution: u64,
    /// Rows in the execution log's table (a key holds a block of them): what retention by
    /// rows counts. Counted from the file at open and after a reopen.
    pub execution_rows: u64,
    /// Dedupe key -> when it was last stored (unix ms): the index of `DEDUPE_AGE`.
    pub dedupe: HashMap<[u8; 32], u64>,
    pub sink: Arc<OnceLock<Sink>>,
    /// False while writes fail; what `/readyz` reports.
    pub writable: Arc<AtomicBool>,
}

/// A storage error the writer is recovering from.
struct Broken {
    /// When the file was last (re)tried.
    tried: Instant,
    error: StoreError,
    /// About how many bytes the largest request of the write that failed would have
    /// added (or its log rows): a reopen must find room for as many before the store
    /// says it takes writes again.
    room: usize,
}

pub(super) struct Writer {
    parts: Parts,
    /// Settlements committed without fsync since the last durable commit: what a reopen
    /// after a storage error must apply again.
    redo: Vec<(u64, Settle)>,
    /// Set by a storage error: when the file was last (re)tried, and what failed.
    broken: Option<Broken>,
    /// The counters (next delivery id, next execution id) as the file has them; `None`
    /// until a commit writes them.
    ceilings: Option<(u64, u64)>,
    /// Execution log rows taken and not yet written ([`ROWS_EVERY`]), counted in
    /// `log_bytes` until they are; at most [`MAX_BATCH`] and a batch's worth.
    held: Vec<Execution>,
    /// When the oldest of `held` was taken.
    held_since: Option<Instant>,
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

/// What the writer waits for next.
enum Next {
    Op(Op),
    Rows(Vec<Execution>),
    /// Broken and idle: time to try the file again.
    Probe,
    /// Idle with rows held: time to write them.
    Flush,
    Closed,
}

impl Writer {
    pub(super) fn new(parts: Parts) -> Self {
        Self {
            parts,
            redo: Vec::new(),
            broken: None,
            ceilings: None,
            held: Vec::new(),
            held_since: None,
        }
    }

    /// Runs until a `Close` request, or until every sender is gone.
    pub(super) fn run(mut self, runtime: tokio::runtime::Handle) {
        let mut closing = None;
        while closing.is_none() {
            let mut ops = Vec::new();
            let mut rows = Vec::new();
            let broken = self.broken.is_some();
            // Held rows are written when nothing else comes to write them.
            let flush_at = self
                .held_since
                .map(|since| tokio::time::Instant::from_std(since + LOG_LINGER));
            let p = &mut self.parts;
            let next = runtime.block_on(async {
                tokio::select! {
                    biased;
                    op = p.ops.recv() => op.map_or(Next::Closed, Next::Op),
                    rows = p.logs.recv() => rows.map_or(Next::Closed, Next::Rows),
                    () = tokio::time::sleep(REOPEN_EVERY), if broken => Next::Probe,
                    () = tokio::time::sleep_until(flush_at.unwrap_or_else(tokio::time::Instant::now)),
                        if flush_at.is_some() && !broken => Next::Flush,
                }
            });
            // Rows taken from here on are dated from now: held, they are written a
            // LOG_LINGER after they reached the writer at the latest, however the
            // wait for company ends.
            let taken = Instant::now();
            match next {
                Next::Op(op) => ops.push(op),
                Next::Rows(r) => rows.extend(r),
                Next::Probe => {
                    let _ = self.recover();
                    continue;
                }
                Next::Flush => {}
                Next::Closed => break,
            }
            while ops.len() < MAX_BATCH {
                let Ok(op) = self.parts.ops.try_recv() else {
                    break;
                };
                ops.push(op);
            }
            while rows.len() < MAX_BATCH {
                let Ok(r) = self.parts.logs.try_recv() else {
                    break;
                };
                rows.extend(r);
            }
            if ops.is_empty() && !rows.is_empty() && self.parts.logs.is_empty() {
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
                while let Ok(r) = self.parts.logs.try_recv() {
                    rows.extend(r);
                }
                for late in ops.drain(at..) {
                    late.answer(Err(StoreError::Closed));
                }
            }
            self.batch(ops, rows, taken, closing.is_some());
        }
        if let Some(reply) = closing {
            let _ = reply.send(());
        }
        // Anything sent after the close hears that the store is closed.
        self.parts.ops.close();
        while let Ok(op) = self.parts.ops.try_recv() {
            op.answer(Err(StoreError::Closed));
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
        let pressure = self.parts.log_pressure.clone();
        let p = &mut self.parts;
        runtime.block_on(async {
            tokio::select! {
                op = p.ops.recv() => ops.extend(op),
                () = pressure.notified() => {}
                () = tokio::time::sleep_until(until) => {}
            }
        });
        while rows.len() < MAX_BATCH {
            let Ok(more) = self.parts.logs.try_recv() else {
                break;
            };
            rows.extend(more);
        }
    }

    /// `rows` reached the writer at `taken` (or later).
    fn batch(&mut self, ops: Vec<Op>, rows: Vec<Execution>, taken: Instant, last: bool) {
        if !rows.is_empty() {
            // Counted in `log_bytes` by their senders already.
            self.held_since.get_or_insert(taken);
            self.held.extend(rows);
        }
        if ops.is_empty() && self.held.is_empty() {
            return;
        }
        if let Err(e) = self.recover() {
            // The file cannot take writes yet: answer at once, so the billing hears 503
            // now instead of waiting for a write that will fail.
            if !self.held.is_empty() {
                warn!(
                    rows = self.held.len(),
                    "execution log rows lost: the store cannot take writes"
                );
                let held = std::mem::take(&mut self.held);
                crate::metrics::execution_log_dropped(held.len() as u64);
                self.wrote(&held);
            }
            for op in ops {
                op.answer(Err(e.clone()));
            }
            return;
        }
        let durable = last || self.redo.len() >= REDO_MAX || ops.iter().any(Op::needs_fsync);
        // Accepts and deliveries alone leave the log's rows held for a while: one write
        // of many rows costs far less than a few rows in every commit. A retry or a dead
        // letter, what an operator looks into, has its row in the log when it is stored.
        let write_rows = last
            || ops.is_empty()
            || self.held.len() >= MAX_BATCH
            || self.held_since.is_some_and(|at| at.elapsed() >= ROWS_EVERY)
            || ops.iter().any(|op| {
                !matches!(
                    op,
                    Op::Enqueue { .. }
                        | Op::Settle {
                            settle: Settle::Delivered,
                            ..
                        }
                )
            });
        match self.commit(&ops, write_rows, durable) {
            Ok(done) => {
                for (mut op, done) in ops.into_iter().zip(done) {
                    if !write_rows {
                        self.hold_record(&mut op);
                    }
                    op.answer(Ok(done));
                }
            }
            Err(e) if ops.len() <= 1 || self.broken.is_some() => {
                for op in ops {
                    op.answer(Err(e.clone()));
                }
            }
            Err(e) => {
                // One request can spoil a batch (an unreadable row it touches): try each
                // alone, so the others go through.
                warn!(error = %e, requests = ops.len(), "store batch failed, trying its requests one by one");
                for mut op in ops {
                    let durable = last || op.needs_fsync();
                    let result = self
                        .commit(std::slice::from_ref(&op), false, durable)
                        .map(|mut done| done.remove(0));
                    if result.is_ok() {
                        self.hold_record(&mut op);
                    }
                    op.answer(result);
                }
                if !self.held.is_empty() && self.broken.is_none() {
                    let _ = self.commit(&[], true, last);
                }
            }
        }
    }

    /// Holds a committed settlement's execution log row for the next write of rows.
    fn hold_record(&mut self, op: &mut Op) {
        if let Op::Settle { record, .. } = op
            && let Some(row) = record.take()
        {
            self.parts
                .log_bytes
                .fetch_add(row.weight(), Ordering::Relaxed);
            self.held_since.get_or_insert_with(Instant::now);
            self.held.push(*row);
        }
    }

    /// Rows held are gone (written or lost): off the count of rows not yet written.
    fn wrote(&mut self, rows: &[Execution]) {
        let weight: usize = rows.iter().map(Execution::weight).sum();
        self.parts.log_bytes.fetch_sub(weight, Ordering::Relaxed);
        self.held_since = None;
    }

    /// Applies `ops` in one transaction and commits it (with fsync when `durable`, or
    /// when an accept stored a delivery), with the held execution log rows and the
    /// settlements' rows when `write_rows` (without, the settlements' rows stay in their
    /// requests); on success the sink has been told of the deliveries stored. On failure
    /// nothing is committed and the writer's counters, dedupe map and held rows are as
    /// before.
    fn commit(
        &mut self,
        ops: &[Op],
        write_rows: bool,
        durable: bool,
    ) -> Result<Vec<Done>, StoreError> {
        let (next_delivery, next_execution) = (self.parts.next_delivery, self.parts.next_execution);
        let execution_rows = self.parts.execution_rows;
        let ceilings = self.ceilings;
        let mut changes = DedupeChanges::default();
        let mut queued = Vec::new();
        let rows = if write_rows {
            Some(std::mem::take(&mut self.held))
        } else {
            None
        };
        let started = Instant::now();
        let result = self.apply(ops, rows.as_deref(), durable, &mut changes, &mut queued);
        let durable = result.as_ref().map_or(durable, |(_, durable)| *durable);
        let took = started.elapsed();
        if took > SLOW_COMMIT {
            warn!(
                ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
                requests = ops.len(),
                log_rows = rows.as_ref().map_or(0, Vec::len),
                durable,
                "slow store commit"
            );
        }
        match result {
            Ok((done, _)) => {
                crate::metrics::store_commit(durable, took);
                for (key, at) in changes.pruned {
                    if self.parts.dedupe.get(&key) == Some(&at) {
                        self.parts.dedupe.remove(&key);
                    }
                }
                if durable {
                    self.redo.clear();
                } else {
                    self.redo.extend(ops.iter().filter_map(|op| match op {
                        Op::Settle { id, settle, .. } => Some((*id, settle.clone())),
                        _ => None,
                    }));
                }
                if let Some(rows) = rows {
                    self.wrote(&rows);
                }
                if !queued.is_empty()
                    && let Some(sink) = self.parts.sink.get()
                {
                    sink(queued);
                }
                Ok(done)
            }
            Err(e) => {
                let rows_bytes = rows.iter().flatten().map(Execution::weight).sum::<usize>();
                let room = ops.iter().map(Op::bytes).fold(rows_bytes, usize::max);
                // Nothing of the transaction was committed: the counters and the map go
                // back too.
                self.parts.next_delivery = next_delivery;
                self.parts.next_execution = next_execution;
                self.parts.execution_rows = execution_rows;
                self.ceilings = ceilings;
                if let Some(rows) = rows {
                    self.held = rows;
                }
                for (key, old) in changes.set.into_iter().rev() {
                    match old {
                        Some(at) => self.parts.dedupe.insert(key, at),
                        None => self.parts.dedupe.remove(&key),
                    };
                }
                if matches!(e, StoreError::Write(_)) {
                    error!(error = %e, "store write failed; the store is unwritable until a write succeeds");
                    self.parts.writable.store(false, Ordering::Relaxed);
                    self.broken = Some(Broken {
                        tried: Instant::now(),
                        error: e.clone(),
                        room,
                    });
                } else {
                    error!(error = %e, "store request failed");
                }
                Err(e)
            }
        }
    }

    /// After a storage error: reopens the file (at most once per [`REOPEN_EVERY`]) and
    /// makes one durable write, applying again the settlements the lost handle had
    /// committed without fsync. Ok when the store takes writes.
    fn recover(&mut self) -> Result<(), StoreError> {
        let Some(broken) = &self.broken else {
            return Ok(());
        };
        if broken.tried.elapsed() < REOPEN_EVERY {
            return Err(broken.error.clone());
        }
        let room = broken.room;
        match self.reopen().and_then(|()| self.has_room(room)) {
            Ok(()) => {
                info!("store writable again");
                self.broken = None;
                self.parts.writable.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                debug!(error = %e, "store still unwritable");
                self.broken = Some(Broken {
                    tried: Instant::now(),
                    error: e.clone(),
                    room,
                });
                Err(e)
            }
        }
    }

    fn reopen(&mut self) -> Result<(), StoreError> {
        if let Some(path) = &self.parts.path {
            // A handle that saw a failed write refuses every later one: let it go (readers
            // still using it finish first), then open the file again.
            self.parts.db.store(None);
            let db = super::open_file(path).map_err(StoreError::write)?;
            self.parts.db.store(Some(Arc::new(db)));
        }
        let db = self.db()?;
        let txn = db.begin_write().map_err(StoreError::write)?;
        let now = now_ms();
        {
            let mut queue = txn.open_table(DELIVERIES).map_err(StoreError::write)?;
            for (id, settle) in &self.redo {
                settle_one(&txn, &mut queue, *id, settle, now)?;
            }
        }
        // The lost handle may have had the counters in a commit that never reached the
        // disk: write them again. Log rows it committed without fsync may be gone too.
        self.parts.execution_rows =
            super::log_extent(&txn.open_table(EXECUTIONS).map_err(StoreError::write)?)
                .map_err(StoreError::write)?
                .rows;
        self.ceilings = None;
        self.write_counters(&txn)?;
        txn.commit().map_err(StoreError::write)?;
        self.redo.clear();
        Ok(())
    }

    /// Whether the file takes `bytes` more: they are written, durably, to a table of
    /// their own, which is then dropped. redb releases a commit's freed pages at the next
    /// commit, after that one's own writes are placed: without the empty commit at the
    /// end, the first write after the probe, the event that was waiting, could not reuse
    /// the probe's pages and would need the file to grow again on a disk still nearly full.
    fn has_room(&self, bytes: usize) -> Result<(), StoreError> {
        if bytes == 0 {
            return Ok(());
        }
        let db = self.db()?;
        let txn = db.begin_write().map_err(StoreError::write)?;
        txn.open_table(ROOM)
            .map_err(StoreError::write)?
            .insert((), vec![0u8; bytes].as_slice())
            .map_err(StoreError::write)?;
        txn.commit().map_err(StoreError::write)?;
        let txn = db.begin_write().map_err(StoreError::write)?;
        txn.delete_table(ROOM).map_err(StoreError::write)?;
        txn.commit().map_err(StoreError::write)?;
        let txn = db.begin_write().map_err(StoreError::write)?;
        txn.commit().map_err(StoreError::write)
    }

    fn db(&self) -> Result<Arc<Database>, StoreError> {
        self.parts
            .db
            .load_full()
            .ok_or_else(|| StoreError::Write("the store file is not open".into()))
    }

    /// Writes the counters [`ID_BLOCK`] above the next ids when the ids have reached
    /// what the file has: every id handed out stays below the file's counters, in the
    /// same transaction as the id itself.
    fn write_counters(&mut self, txn: &WriteTransaction) -> Result<(), StoreError> {
        let next = (self.parts.next_delivery, self.parts.next_execution);
        if let Some(stored) = self.ceilings
            && next.0 <= stored.0
            && next.1 <= stored.1
        {
            return Ok(());
        }
        let ceilings = (next.0 + ID_BLOCK, next.1 + ID_BLOCK);
        let mut meta = txn.open_table(META).map_err(StoreError::write)?;
        meta.insert("next_delivery_id", ceilings.0)
            .map_err(StoreError::write)?;
        meta.insert("next_execution_id", ceilings.1)
            .map_err(StoreError::write)?;
        self.ceilings = Some(ceilings);
        Ok(())
    }

    fn apply(
        &mut self,
        ops: &[Op],
        rows: Option<&[Execution]>,
        durable: bool,
        changes: &mut DedupeChanges,
        queued: &mut Vec<Queued>,
    ) -> Result<(Vec<Done>, bool), StoreError> {
        let db = self.db()?;
        let mut txn = db.begin_write().map_err(StoreError::write)?;
        let now = now_ms();
        let mut done = Vec::with_capacity(ops.len());
        // The settlements' log rows, written with the batch's other rows below: the
        // log's table is opened once a transaction.
        let mut records: Vec<&Execution> = Vec::new();
        // The queue's tables, opened once for the run of accepts and settlements that
        // makes up nearly every batch (an open costs a lookup in redb's table of tables).
        let mut open = Open::default();
        for op in ops {
            if !matches!(op, Op::Enqueue { .. } | Op::Settle { .. }) {
                // The other requests open the tables they need themselves.
                open = Open::default();
            }
            done.push(match op {
                Op::Enqueue { items, window, .. } => {
                    let (queue, by_age) = open.enqueue(&txn)?;
                    Done::Enqueued(
                        self.enqueue(queue, by_age, items, *window, now, changes, queued)?,
                    )
                }
                Op::Settle {
                    id, settle, record, ..
                } => {
                    settle_one(&txn, open.queue(&txn)?, *id, settle, now)?;
                    if rows.is_some() {
                        records.extend(record.as_deref());
                    }
                    Done::Settled
                }
                Op::Replay { id, .. } => Done::Replayed(self.replay(&txn, *id, now, queued)?),
                Op::Drop { id, .. } => Done::Dropped(drop_dead(&txn, *id)?),
                Op::ReplayMatching {
                    filter, handlers, ..
                } => Done::ReplayedMatching(
                    self.replay_matching(&txn, filter, handlers, now, queued)?,
                ),
                Op::DropMatching { filter, .. } => {
                    Done::DroppedMatching(drop_matching(&txn, filter)?)
                }
                Op::Prune { retention, .. } => Done::Pruned(prune(
                    &txn,
                    *retention,
                    now,
                    &mut self.parts.execution_rows,
                    &mut changes.pruned,
                )?),
                Op::Close { .. } => unreachable!("taken out by run"),
            });
        }
        drop(open);
        if let Some(rows) = rows
            && !(records.is_empty() && rows.is_empty())
        {
            // The rows held are older than this batch's.
            self.log(&txn, rows.iter().chain(records))?;
        }
        self.write_counters(&txn)?;
        // An accept whose deliveries were all duplicates stored nothing: its answer rests
        // on the first one's commit, durable already.
        let durable = durable
            || done
                .iter()
                .any(|d| matches!(d, Done::Enqueued(ids) if ids.iter().any(Option::is_some)));
        if !durable {
            txn.set_durability(Durability::None)
                .map_err(StoreError::write)?;
        }
        txn.commit().map_err(StoreError::write)?;
        Ok((done, durable))
    }

    #[allow(clippy::too_many_arguments)]
    fn enqueue(
        &mut self,
        queue: &mut Table<'_, u64, &[u8]>,
        by_age: &mut Table<'_, (u64, &[u8; 32]), ()>,
        items: &[NewDelivery],
        window: Duration,
        now: u64,
        changes: &mut DedupeChanges,
        queued: &mut Vec<Queued>,
    ) -> Result<Vec<Option<u64>>, StoreError> {
        let window = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            if let Some(key) = item.dedupe {
                let seen = self.parts.dedupe.get(&key).copied();
                if seen.is_some_and(|at| now < at.saturating_add(window)) {
                    out.push(None);
                    continue;
                }
                // An older row for the key stays until pruned; the map has the newest.
                by_age.insert((now, &key), ()).map_err(StoreError::write)?;
                changes.set.push((key, self.parts.dedupe.insert(key, now)));
            }
            let id = self.parts.next_delivery;
            self.parts.next_delivery += 1;
            queue
                .insert(id, row::accepted(item, now).as_slice())
                .map_err(StoreError::write)?;
            queued.push(Queued {
                id,
                handler: item.handler.clone(),
                entity: item.entity.clone(),
            });
            out.push(Some(id));
        }
        Ok(out)
    }

    fn replay(
        &mut self,
        txn: &WriteTransaction,
        id: u64,
        now: u64,
        queued: &mut Vec<Queued>,
    ) -> Result<Option<u64>, StoreError> {
        let mut dead = txn.open_table(DEAD).map_err(StoreError::write)?;
        let Some(letter) = dead.remove(id).map_err(StoreError::write)? else {
            return Ok(None);
        };
        let letter: DeadLetter = decode(letter.value())?;
        let mut queue = txn.open_table(DELIVERIES).map_err(StoreError::write)?;
        self.requeue(&mut queue, letter, now, queued).map(Some)
    }

    /// Puts a dead letter back in the queue under a new id, which puts it behind
    /// whatever its entity has queued meanwhile; the message id stays, so a handler that
    /// dedupes on `webhook-id` recognises it. Attempts start from 1 again.
    fn requeue(
        &mut self,
        queue: &mut redb::Table<u64, &[u8]>,
        letter: DeadLetter,
        now: u64,
        queued: &mut Vec<Queued>,
    ) -> Result<u64, StoreError> {
        let mut delivery = letter.delivery;
        delivery.id = self.parts.next_delivery;
        self.parts.next_delivery += 1;
        delivery.attempts = 0;
        delivery.next_at = now;
        delivery.last_error = None;
        queue
            .insert(delivery.id, row::encode(&delivery).as_slice())
            .map_err(StoreError::write)?;
        queued.push(Queued {
            id: delivery.id,
            handler: delivery.handler,
            entity: delivery.entity,
        });
        Ok(delivery.id)
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
        queued: &mut Vec<Queued>,
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
            out.ids.push(self.requeue(&mut queue, letter, now, queued)?);
        }
        out.skipped = n_skipped;
        Ok(out)
    }

    fn log<'a>(
        &mut self,
        txn: &WriteTransaction,
        rows: impl IntoIterator<Item = &'a Execution>,
    ) -> Result<(), StoreError> {
        let mut table = txn.open_table(EXECUTIONS).map_err(StoreError::write)?;
        let mut rows = rows.into_iter().peekable();
        let mut block = Vec::with_capacity(BLOCK_ROWS);
        while rows.peek().is_some() {
            block.clear();
            block.extend(rows.by_ref().take(BLOCK_ROWS));
            let value = row::executions(block.iter().copied());
            table
                .insert(self.parts.next_execution, value.as_slice())
                .map_err(StoreError::write)?;
            let n = block.len() as u64;
            self.parts.next_execution += n;
            self.parts.execution_rows += n;
        }
        Ok(())
    }
}

/// The queue's tables of one transaction, each opened when first needed and then kept
/// for the accepts and settlements that follow.
#[derive(Default)]
struct Open<'txn> {
    queue: Option<Table<'txn, u64, &'static [u8]>>,
    by_age: Option<Table<'txn, (u64, &'static [u8; 32]), ()>>,
}

impl<'txn> Open<'txn> {
    fn queue(
        &mut self,
        txn: &'txn WriteTransaction,
    ) -> Result<&mut Table<'txn, u64, &'static [u8]>, StoreError> {
        if self.queue.is_none() {
            self.queue = Some(txn.open_table(DELIVERIES).map_err(StoreError::write)?);
        }
        Ok(self.queue.as_mut().expect("opened above"))
    }

    #[allow(clippy::type_complexity)]
    fn enqueue(
        &mut self,
        txn: &'txn WriteTransaction,
    ) -> Result<
        (
            &mut Table<'txn, u64, &'static [u8]>,
            &mut Table<'txn, (u64, &'static [u8; 32]), ()>,
        ),
        StoreError,
    > {
        self.queue(txn)?;
        if self.by_age.is_none() {
            self.by_age = Some(txn.open_table(DEDUPE_AGE).map_err(StoreError::write)?);
        }
        Ok((
            self.queue.as_mut().expect("opened above"),
            self.by_age.as_mut().expect("opened above"),
        ))
    }
}

fn settle_one(
    txn: &WriteTransaction,
    queue: &mut Table<'_, u64, &[u8]>,
    id: u64,
    settle: &Settle,
    now: u64,
) -> Result<(), StoreError> {
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
            let mut delivery = row::decode(old.value()).map_err(super::unreadable)?;
            drop(old);
            delivery.attempts = *attempts;
            delivery.next_at = *next_at;
            delivery.last_error = Some(error.clone());
            queue
                .insert(id, row::encode(&delivery).as_slice())
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
            let mut delivery = row::decode(old.value()).map_err(super::unreadable)?;
            drop(old);
            delivery.id = id;
            delivery.attempts = *attempts;
            if error.is_some() {
                delivery.last_error.clone_from(error);
            }
            let letter = DeadLetter {
                delivery,
                reason: reason.clone(),
                died_at: now,
            };
            let mut dead = txn.open_table(DEAD).map_err(StoreError::write)?;
            dead.insert(id, encode(&letter).as_slice())
                .map_err(StoreError::write)?;
        }
    }
    Ok(())
}

/// Drops execution rows beyond the retention (`rows`: how many the log holds), oldest
/// first, and dedupe keys older than the window. Rows go from the front while there are
/// more than `keep_rows` or the first is older than `keep_age`; a block kept in part is
/// written again under the id of its first row kept.
fn prune(
    txn: &WriteTransaction,
    retention: Retention,
    now: u64,
    rows: &mut u64,
    pruned: &mut Vec<([u8; 32], u64)>,
) -> Result<usize, StoreError> {
    let mut removed = 0;
    let oldest =
        now.saturating_sub(u64::try_from(retention.keep_age.as_millis()).unwrap_or(u64::MAX));
    let mut log = txn.open_table(EXECUTIONS).map_err(StoreError::write)?;
    while removed < PRUNE_LIMIT {
        let (key, block) = {
            let first = log.first().map_err(StoreError::write)?;
            let Some((key, value)) = first else { break };
            let key = key.value();
            // An unreadable block goes whole, as a row older than any would.
            let block = row::read_executions(key, value.value())
                .map_err(|_| row::rows_in(value.value()).unwrap_or(1));
            (key, block)
        };
        let (gone, kept) = match &block {
            Err(n) => (*n, &[][..]),
            Ok(block) => {
                let gone = block
                    .iter()
                    .enumerate()
                    .take_while(|(i, r)| {
                        rows.saturating_sub(*i as u64) > retention.keep_rows || r.at < oldest
                    })
                    .count();
                (gone as u64, &block[gone..])
            }
        };
        if gone == 0 {
            break;
        }
        log.remove(key).map_err(StoreError::write)?;
        if let Some(first) = kept.first() {
            log.insert(first.id, row::executions(kept.iter()).as_slice())
                .map_err(StoreError::write)?;
        }
        *rows = rows.saturating_sub(gone);
        removed += usize::try_from(gone).unwrap_or(usize::MAX);
        if !kept.is_empty() {
            break;
        }
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

pub(super) fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("store rows serialise")
}

pub(super) fn decode<'a, T: serde::Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| super::unreadable(e.to_string()))
}
