//! The redb backend: one file holding the after-stage queue, the dead letters, the
//! execution log and the dedupe keys, for one sidecar.
//!
//! Writes go through one writer thread ([`writer`]) that commits in groups; reads open
//! their own read transaction wherever they run (redb readers never wait for the writer).
//! The file carries a schema version in its `meta` table: a file from a newer release,
//! or one that is not a provisiond store, is refused at open with a sentence that says
//! what to do.

mod row;
mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwapOption;

use redb::{
    Builder, Database, DatabaseError, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    StorageError, TableDefinition,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::StoreError;
use super::records::{
    DeadLetter, DeadLetterFilter, Delivery, Execution, ExecutionFilter, NewDelivery, Replayed,
    Retention, Settle, Sink, now_ms,
};
pub use writer::PRUNE_LIMIT;
use writer::{Op, Parts, Writer, decode};

/// The layout this build reads and writes. A later release that changes it migrates
/// files with a lower number at open; a file with a higher number is refused.
pub const SCHEMA_VERSION: u64 = 3;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Delivery id -> [`Delivery`] (postcard, `row.rs`; JSON in files of earlier versions).
/// Ids grow with arrival, so key order is arrival order.
const DELIVERIES: TableDefinition<u64, &[u8]> = TableDefinition::new("deliveries");
/// Delivery id -> [`DeadLetter`] (JSON).
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
/// Id of a block's first row -> a block of [`Execution`]s, the ids following on from
/// the key (postcard, `row.rs`; one row a key, JSON or postcard, in files of earlier
/// versions), oldest first.
const EXECUTIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("executions");
/// (when it was stored, dedupe key): the dedupe keys (SHA-256 of handler and body) in
/// time order. Appending is cheap and pruning takes the front; lookups go to a map the
/// writer keeps in memory and rebuilds from this table at open.
const DEDUPE_AGE: TableDefinition<(u64, &[u8; 32]), ()> = TableDefinition::new("dedupe_by_time");

/// Requests waiting for the writer before senders wait too.
const OPS_CAPACITY: usize = 8192;
/// Batches of execution log rows waiting for the writer; beyond it rows are dropped.
pub const LOG_CAPACITY: usize = 4096;
/// Most bytes of execution log rows handed to the writer and not yet written (waiting in
/// the channel or gathered for the next commit); beyond it rows are dropped.
pub const LOG_BYTES: usize = 8 << 20;

/// A handle on the open file; clones share it.
#[derive(Clone)]
pub(super) struct File {
    inner: Arc<Inner>,
}

struct Inner {
    /// The open file; empty for a moment while the writer reopens it after a storage
    /// error.
    db: Arc<ArcSwapOption<Database>>,
    path: String,
    /// False while writes fail (a full disk, an I/O error): `/readyz` says not ready.
    writable: Arc<AtomicBool>,
    /// Told of every delivery stored, by the writer, after each commit.
    sink: Arc<OnceLock<Sink>>,
    ops: mpsc::Sender<Op>,
    logs: mpsc::Sender<Vec<Execution>>,
    log_capacity: usize,
    /// Bytes of rows sent to the writer and not yet written ([`Execution::weight`]).
    log_bytes: Arc<AtomicUsize>,
    log_bytes_cap: usize,
    /// Tells a lingering writer that the log channel is half full: commit now.
    log_pressure: Arc<tokio::sync::Notify>,
    /// Execution log rows dropped because the writer was behind.
    dropped: AtomicU64,
    /// Unreadable queued rows that opening moved to the dead letters.
    quarantined: usize,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl File {
    /// Opens the store at `path`, creating it when missing. Must run inside a tokio
    /// runtime: the writer thread waits on its channels through it.
    pub(super) fn open(path: &Path) -> Result<Self, StoreError> {
        let shown = path.display().to_string();
        let fail = |reason: String| StoreError::Open {
            path: shown.clone(),
            reason,
        };
        if path.is_dir() {
            return Err(fail(
                "it is a directory; set store.path to a file name".into(),
            ));
        }
        warn_if_readable_by_all(path);
        let db = open_file(path).map_err(|e| fail(open_reason(&e)))?;
        Self::start(db, shown, Some(path.to_path_buf()), LOG_CAPACITY, LOG_BYTES)
    }

    /// A store in memory, gone with the process: for tests.
    pub(super) fn memory() -> Result<Self, StoreError> {
        Self::memory_with(LOG_CAPACITY, LOG_BYTES)
    }

    fn memory_with(log_capacity: usize, log_bytes_cap: usize) -> Result<Self, StoreError> {
        let db = Builder::new()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(|e| StoreError::Open {
                path: "<memory>".into(),
                reason: e.to_string(),
            })?;
        Self::start(db, "<memory>".into(), None, log_capacity, log_bytes_cap)
    }

    fn start(
        db: Database,
        path: String,
        file: Option<PathBuf>,
        log_capacity: usize,
        log_bytes_cap: usize,
    ) -> Result<Self, StoreError> {
        let fail = |reason: String| StoreError::Open {
            path: path.clone(),
            reason,
        };
        let Prepared {
            next_delivery,
            next_execution,
            execution_rows,
            quarantined,
        } = prepare(&db).map_err(fail)?;
        let dedupe = load_dedupe(&db).map_err(fail)?;
        let db = Arc::new(ArcSwapOption::from_pointee(db));
        let (ops_tx, ops_rx) = mpsc::channel(OPS_CAPACITY);
        let (logs_tx, logs_rx) = mpsc::channel(log_capacity);
        let log_pressure = Arc::new(tokio::sync::Notify::new());
        let log_bytes = Arc::new(AtomicUsize::new(0));
        let writable = Arc::new(AtomicBool::new(true));
        let sink = Arc::new(OnceLock::new());
        let writer = Writer::new(Parts {
            db: db.clone(),
            path: file,
            ops: ops_rx,
            logs: logs_rx,
            log_pressure: log_pressure.clone(),
            log_bytes: log_bytes.clone(),
            next_delivery,
            next_execution,
            execution_rows,
            dedupe,
            sink: sink.clone(),
            writable: writable.clone(),
        });
        let runtime = tokio::runtime::Handle::current();
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(runtime))
            .map_err(|e| fail(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                path,
                writable,
                sink,
                ops: ops_tx,
                logs: logs_tx,
                log_capacity,
                log_bytes,
                log_bytes_cap,
                log_pressure,
                dropped: AtomicU64::new(0),
                quarantined,
                writer: Mutex::new(Some(thread)),
            }),
        })
    }

    /// The file, as configured.
    pub(super) fn path(&self) -> &str {
        &self.inner.path
    }

    async fn request<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .ops
            .send(op(tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Whether the store can take writes: its writer runs, the file is open, and the
    /// last write succeeded (after a failed one, the writer probes by itself).
    pub(super) fn is_open(&self) -> bool {
        !self.inner.ops.is_closed()
            && self.inner.writable.load(Ordering::Relaxed)
            && self.read().is_ok()
    }

    /// Sets what the writer tells of each commit's stored deliveries (ids and lanes, in
    /// id order), before anyone hears of the commit. Only the first call counts.
    pub(super) fn on_commit(&self, sink: Sink) {
        let _ = self.inner.sink.set(sink);
    }

    /// Stores deliveries durably; returns once they are committed, with their ids. An
    /// item whose dedupe key was stored within `window` is skipped: its slot in the reply
    /// is `None`.
    pub(super) async fn enqueue(
        &self,
        items: Vec<NewDelivery>,
        window: Duration,
    ) -> Result<Vec<Option<u64>>, StoreError> {
        self.request(|reply| Op::Enqueue {
            items,
            window,
            reply,
        })
        .await
    }

    /// Records how an attempt of delivery `id` ended, with its execution log row.
    pub(super) async fn settle(
        &self,
        id: u64,
        settle: Settle,
        record: Option<Execution>,
    ) -> Result<(), StoreError> {
        self.request(|reply| Op::Settle {
            id,
            settle,
            record: record.map(Box::new),
            reply,
        })
        .await
    }

    /// Moves dead letter `id` back to the queue under a new delivery id (returned);
    /// `None` when there is no such dead letter.
    pub(super) async fn replay(&self, id: u64) -> Result<Option<u64>, StoreError> {
        self.request(|reply| Op::Replay { id, reply }).await
    }

    /// Deletes dead letter `id`; whether it existed.
    pub(super) async fn drop_dead_letter(&self, id: u64) -> Result<bool, StoreError> {
        self.request(|reply| Op::Drop { id, reply }).await
    }

    /// Moves every dead letter matching `filter` back to the queue, in one transaction,
    /// under new ids in their old order; only those for one of `handlers` (the rest
    /// stay, counted as skipped).
    pub(super) async fn replay_matching(
        &self,
        filter: DeadLetterFilter,
        handlers: Vec<String>,
    ) -> Result<Replayed, StoreError> {
        self.request(|reply| Op::ReplayMatching {
            filter,
            handlers,
            reply,
        })
        .await
    }

    /// Deletes every dead letter matching `filter`, in one transaction; how many.
    pub(super) async fn drop_matching(
        &self,
        filter: DeadLetterFilter,
    ) -> Result<usize, StoreError> {
        self.request(|reply| Op::DropMatching { filter, reply })
            .await
    }

    /// Applies the retention; how many rows went.
    pub(super) async fn prune(&self, retention: Retention) -> Result<usize, StoreError> {
        self.request(|reply| Op::Prune { retention, reply }).await
    }

    /// Adds execution log rows without waiting: they are written with the next batch.
    /// When the writer is that far behind ([`LOG_CAPACITY`] batches or [`LOG_BYTES`]
    /// bytes not yet written), they are dropped and counted, never waited for.
    pub(super) fn log(&self, rows: Vec<Execution>) {
        if rows.is_empty() {
            return;
        }
        let inner = &*self.inner;
        let waiting = super::offer_log(
            rows,
            &inner.logs,
            &inner.log_bytes,
            inner.log_bytes_cap,
            &inner.dropped,
        );
        if inner.logs.capacity() < inner.log_capacity / 2 || waiting > inner.log_bytes_cap / 2 {
            inner.log_pressure.notify_one();
        }
    }

    /// Unreadable queued rows that opening the file moved to the dead letters.
    pub(super) fn quarantined(&self) -> usize {
        self.inner.quarantined
    }

    /// Execution log rows dropped so far because the writer was behind.
    pub(super) fn dropped_log_rows(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Writes what is queued and stops the writer. Later requests get
    /// [`StoreError::Closed`].
    pub(super) async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.ops.send(Op::Close { reply: tx }).await.is_ok() {
            let _ = rx.await;
        }
        let thread = self.inner.writer.lock().expect("not poisoned").take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }

    fn read(&self) -> Result<redb::ReadTransaction, StoreError> {
        let db = self.inner.db.load();
        let db = db
            .as_ref()
            .ok_or_else(|| StoreError::Read("the store file is being reopened".into()))?;
        db.begin_read().map_err(StoreError::read)
    }

    /// One stored delivery.
    pub(super) fn delivery(&self, id: u64) -> Result<Option<Delivery>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(DELIVERIES).map_err(StoreError::read)?;
        let Some(row) = table.get(id).map_err(StoreError::read)? else {
            return Ok(None);
        };
        let mut delivery = row::decode(row.value()).map_err(unreadable)?;
        delivery.id = id;
        Ok(Some(delivery))
    }

    /// Calls `each` with (id, handler, entity) of every stored delivery with an id above
    /// `after`, oldest first, from one consistent view of the queue. A row that cannot be
    /// read is skipped (start-up moves such rows to the dead letters).
    pub(super) fn scan_queue(
        &self,
        after: u64,
        mut each: impl FnMut(u64, &str, &str),
    ) -> Result<(), StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(DELIVERIES).map_err(StoreError::read)?;
        let Some(from) = after.checked_add(1) else {
            return Ok(());
        };
        for row in table.range(from..).map_err(StoreError::read)? {
            let (id, value) = row.map_err(StoreError::read)?;
            match row::head(value.value()) {
                Ok(head) => each(id.value(), &head.handler, &head.entity),
                Err(e) => warn!(delivery = id.value(), error = %e, "unreadable delivery skipped"),
            }
        }
        Ok(())
    }

    /// Every stored delivery as (id, handler, entity), oldest first.
    #[cfg(test)]
    pub(super) fn pending(&self) -> Result<Vec<(u64, String, String)>, StoreError> {
        let mut out = Vec::new();
        self.scan_queue(0, |id, handler, entity| {
            out.push((id, handler.to_owned(), entity.to_owned()));
        })?;
        Ok(out)
    }

    /// Deliveries waiting in the queue.
    pub(super) fn queue_depth(&self) -> Result<u64, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(DELIVERIES).map_err(StoreError::read)?;
        table.len().map_err(StoreError::read)
    }

    /// When the oldest delivery in the queue was accepted (unix ms); `None` when empty.
    pub(super) fn oldest_enqueued(&self) -> Result<Option<u64>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(DELIVERIES).map_err(StoreError::read)?;
        let Some((_, row)) = table.first().map_err(StoreError::read)? else {
            return Ok(None);
        };
        let head = row::head(row.value()).map_err(unreadable)?;
        Ok(Some(head.enqueued_at))
    }

    /// Dead letters stored.
    pub(super) fn dead_letter_count(&self) -> Result<u64, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(DEAD).map_err(StoreError::read)?;
        table.len().map_err(StoreError::read)
    }

    /// Execution log rows matching `filter`, newest first.
    pub(super) fn executions(
        &self,
        filter: &ExecutionFilter,
    ) -> Result<Vec<Execution>, StoreError> {
        // Rows are keyed in the order they were written, which can trail their start time
        // by a little (a batch, or a long call): scan a minute past `since` before stopping.
        const SLACK_MS: u64 = 60_000;
        let txn = self.read()?;
        let table = txn.open_table(EXECUTIONS).map_err(StoreError::read)?;
        let mut out = Vec::new();
        // `after` (what `executions --follow` has seen) bounds the scan from below.
        let first = filter.after.map_or(0, |a| a.saturating_add(1));
        'blocks: for block in table.iter().map_err(StoreError::read)?.rev() {
            let (key, value) = block.map_err(StoreError::read)?;
            let rows = row::read_executions(key.value(), value.value()).map_err(unreadable)?;
            for row in rows.into_iter().rev() {
                if row.id < first
                    || filter
                        .since
                        .is_some_and(|s| row.at.saturating_add(SLACK_MS) < s)
                {
                    break 'blocks;
                }
                if filter.matches(&row) {
                    out.push(row);
                    if out.len() >= filter.limit {
                        break 'blocks;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Dead letters, oldest first; only `handler`'s when given.
    pub(super) fn dead_letters(
        &self,
        filter: &DeadLetterFilter,
        after: u64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(DEAD).map_err(StoreError::read)?;
        let mut out = Vec::new();
        let from = after.saturating_add(1);
        for row in table.range(from..).map_err(StoreError::read)? {
            let (id, value) = row.map_err(StoreError::read)?;
            let mut letter: DeadLetter = decode(value.value())?;
            letter.delivery.id = id.value();
            if filter.matches_letter(&letter) {
                out.push(letter);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The dedupe keys stored, each with the time it was last stored (unix ms).
    pub(super) fn dedupe_keys(&self) -> Result<Vec<([u8; 32], u64)>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(DEDUPE_AGE).map_err(StoreError::read)?;
        let mut latest = HashMap::new();
        for row in table.iter().map_err(StoreError::read)? {
            let (key, _) = row.map_err(StoreError::read)?;
            let (at, hash) = key.value();
            let seen = latest.entry(*hash).or_insert(at);
            *seen = (*seen).max(at);
        }
        Ok(latest.into_iter().collect())
    }

    /// One dead letter.
    pub(super) fn dead_letter(&self, id: u64) -> Result<Option<DeadLetter>, StoreError> {
        let txn = self.read()?;
        let table = txn.open_table(DEAD).map_err(StoreError::read)?;
        let Some(row) = table.get(id).map_err(StoreError::read)? else {
            return Ok(None);
        };
        let mut letter: DeadLetter = decode(row.value())?;
        letter.delivery.id = id;
        Ok(Some(letter))
    }
}

/// What opening found.
struct Prepared {
    next_delivery: u64,
    next_execution: u64,
    execution_rows: u64,
    /// Unreadable queued rows moved to the dead letters.
    quarantined: usize,
}

/// Checks the schema version (writing it into a new file), creates the tables, reads
/// where the id counters stand, and moves unreadable queued rows aside.
fn prepare(db: &Database) -> Result<Prepared, String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    let not_ours = |e: redb::TableError| match e {
        redb::TableError::Storage(e) => e.to_string(),
        other => format!(
            "the file is a redb database but not a provisiond store ({other}); point \
             store.path at another file"
        ),
    };
    let existing = txn
        .list_tables()
        .map_err(|e| e.to_string())?
        .map(|t| redb::TableHandle::name(&t).to_owned())
        .collect::<Vec<_>>();
    let counters = {
        let mut meta = txn.open_table(META).map_err(not_ours)?;
        let version = meta
            .get("schema_version")
            .map_err(|e| e.to_string())?
            .map(|v| v.value());
        match version {
            None if existing.iter().any(|t| t != "meta") => {
                return Err(
                    "the file is a redb database but not a provisiond store (it has \
                            no schema version); point store.path at another file"
                        .into(),
                );
            }
            None => {
                meta.insert("schema_version", SCHEMA_VERSION)
                    .map_err(|e| e.to_string())?;
                info!(schema_version = SCHEMA_VERSION, "store created");
            }
            Some(v) if v > SCHEMA_VERSION => {
                return Err(format!(
                    "it was written by a newer provisiond (store schema version {v}; this \
                     build reads up to {SCHEMA_VERSION}); run that newer release, or move \
                     the file aside to start with an empty store"
                ));
            }
            Some(from @ (1 | 2)) => {
                // Version 1 held the queue's and the execution log's rows as JSON; 2
                // wrote them in postcard, a log row under each key; 3 writes the log's
                // rows in blocks. This build reads all three (`row.rs`), so nothing is
                // rewritten here. The number goes up so that a release from before
                // refuses the file instead of taking its new rows for damaged ones.
                meta.insert("schema_version", SCHEMA_VERSION)
                    .map_err(|e| e.to_string())?;
                info!(
                    from,
                    schema_version = SCHEMA_VERSION,
                    "store upgraded: rows keep their format until next written"
                );
            }
            Some(v) if v < SCHEMA_VERSION => {
                return Err(format!("unknown store schema version {v}"));
            }
            Some(_) => {}
        }
        let get = |key| -> Result<u64, String> {
            Ok(meta
                .get(key)
                .map_err(|e| e.to_string())?
                .map_or(1, |v| v.value()))
        };
        (get("next_delivery_id")?, get("next_execution_id")?)
    };
    // Create every table, so that readers never meet a missing one; check that the ids
    // stored are below the counters (they always are, unless the file was tampered with).
    let last = |def: TableDefinition<u64, &[u8]>| -> Result<u64, String> {
        let table = txn.open_table(def).map_err(not_ours)?;
        let last = table.last().map_err(|e| e.to_string())?;
        Ok(last.map_or(0, |(k, _)| k.value()))
    };
    let max_delivery = last(DELIVERIES)?.max(last(DEAD)?);
    let quarantined = quarantine(&txn).map_err(|e| e.to_string())?;
    let log = log_extent(&txn.open_table(EXECUTIONS).map_err(not_ours)?)?;
    txn.open_table(DEDUPE_AGE).map_err(not_ours)?;
    txn.commit().map_err(|e| e.to_string())?;
    Ok(Prepared {
        next_delivery: counters.0.max(max_delivery + 1),
        next_execution: counters.1.max(log.next_id),
        execution_rows: log.rows,
        quarantined,
    })
}

/// What the execution log's table holds.
struct LogExtent {
    /// Above the id of every row.
    next_id: u64,
    rows: u64,
}

/// Reads how many rows the log holds (a count from each block's head) and where its
/// ids end.
fn log_extent(table: &impl ReadableTable<u64, &'static [u8]>) -> Result<LogExtent, String> {
    let mut extent = LogExtent {
        next_id: 1,
        rows: 0,
    };
    for block in table.iter().map_err(|e| e.to_string())? {
        let (key, value) = block.map_err(|e| e.to_string())?;
        let n = row::rows_in(value.value()).unwrap_or(1);
        extent.rows += n;
        extent.next_id = extent.next_id.max(key.value().saturating_add(n));
    }
    Ok(extent)
}

/// A stored row that does not decode.
fn unreadable(e: String) -> StoreError {
    StoreError::Corrupt(format!("unreadable row: {e}"))
}

/// Moves queued rows that cannot be read to the dead letters, with the reason, so that
/// one damaged row neither stops the start nor blocks its lane. Returns how many.
fn quarantine(txn: &redb::WriteTransaction) -> Result<usize, StoreError> {
    let mut queue = txn.open_table(DELIVERIES).map_err(StoreError::write)?;
    let mut bad = Vec::new();
    for row in queue.iter().map_err(StoreError::read)? {
        let (id, value) = row.map_err(StoreError::read)?;
        if let Err(e) = row::decode(value.value()) {
            bad.push((
                id.value(),
                String::from_utf8_lossy(value.value()).into_owned(),
                e,
            ));
        }
    }
    let mut dead = txn.open_table(DEAD).map_err(StoreError::write)?;
    for (id, raw, e) in &bad {
        warn!(delivery = id, error = %e, "unreadable delivery in the queue, moved to the dead letters");
        let letter = DeadLetter {
            delivery: Delivery {
                id: *id,
                handler: String::new(),
                event: String::new(),
                object_id: String::new(),
                entity: String::new(),
                message_id: String::new(),
                body: raw.clone(),
                attempts: 0,
                next_at: 0,
                enqueued_at: 0,
                last_error: None,
                event_id: None,
            },
            reason: format!(
                "unreadable row in the queue ({e}); the stored bytes are kept as the envelope"
            ),
            died_at: now_ms(),
        };
        queue.remove(*id).map_err(StoreError::write)?;
        dead.insert(*id, writer::encode(&letter).as_slice())
            .map_err(StoreError::write)?;
    }
    Ok(bad.len())
}

/// redb's page cache. It fills with the pages every commit writes (the execution log
/// appends a page's worth every few hundred events), so under load it is most of the
/// process's memory; the pages read back are the queue's and the log's newest ones.
pub const CACHE_BYTES: usize = 16 << 20;

/// Warns, once at start, about an existing store file that every local user may read
/// (one made before new files were created 0600): its mode is left as it is.
fn warn_if_readable_by_all(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o004 != 0
    {
        warn!(
            store = %path.display(),
            mode = %format!("{:04o}", meta.permissions().mode() & 0o7777),
            "the store file is readable by every local user, and it holds the billing's \
             envelopes and the handlers' replies: `chmod 600` it"
        );
    }
}

/// Opens (or creates) the file, checking all of it: damage is then an error, not a
/// panic later. A new file is created with mode 0600 first (redb would leave it to the
/// umask, 0644 as a rule): it holds the billing's envelopes and the handlers' replies,
/// which are for this sidecar's user alone. An existing file keeps its mode (an operator
/// may have chosen it); [`File::open`] warns when every local user may read it.
fn open_file(path: &Path) -> Result<Database, DatabaseError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(DatabaseError::Storage(StorageError::Io(e))),
    }
    let mut builder = Builder::new();
    builder
        .set_check_integrity_on_open(true)
        .set_cache_size(CACHE_BYTES);
    builder.create(path)
}

/// The dedupe keys stored, each with its latest time.
fn load_dedupe(db: &Database) -> Result<HashMap<[u8; 32], u64>, String> {
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let table = txn.open_table(DEDUPE_AGE).map_err(|e| e.to_string())?;
    let mut keys = HashMap::new();
    for row in table.iter().map_err(|e| e.to_string())? {
        let (key, _) = row.map_err(|e| e.to_string())?;
        let (at, hash) = key.value();
        keys.insert(*hash, at);
    }
    Ok(keys)
}

/// What to tell the operator when the file cannot be opened.
fn open_reason(e: &DatabaseError) -> String {
    use std::io::ErrorKind;
    match e {
        DatabaseError::Storage(StorageError::Io(io)) => match io.kind() {
            ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => format!(
                "{io}; provisiond needs to write the file and its directory: fix the \
                 permissions or set store.path to a writable place"
            ),
            ErrorKind::NotFound => {
                format!("{io}; the directory does not exist: create it or set store.path")
            }
            ErrorKind::InvalidData => format!(
                "the file is not a provisiond store or is damaged ({io}); move it aside \
                 (provisiond then starts with an empty store) or restore it from a backup"
            ),
            _ => format!("{io}"),
        },
        DatabaseError::Storage(StorageError::Corrupted(what)) => format!(
            "the file is damaged ({what}); move it aside (provisiond then starts with an \
             empty store) or restore it from a backup"
        ),
        DatabaseError::DatabaseAlreadyOpen => "another process has it open (is another \
             provisiond running on the same file?); stop that one or give this one its own \
             store.path"
            .into(),
        DatabaseError::UpgradeRequired(v) => format!(
            "it uses redb file format {v}, which this build cannot read; open it with the \
             release that wrote it, or move it aside"
        ),
        other => format!(
            "{other}; move the file aside (provisiond then starts with an empty store) or \
             restore it from a backup"
        ),
    }
}

#[cfg(test)]
mod tests;
