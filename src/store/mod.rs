//! The durable store: the after-stage queue, the dead letters, the execution log and the
//! dedupe keys, behind one handle over two backends.
//!
//! - [`file`]: one redb file for one sidecar (`store.backend = "redb"`, the default).
//!   Writes go through one writer thread that commits in groups; it tells the lanes of
//!   every stored delivery itself ([`Store::on_commit`]).
//! - [`postgres`]: a PostgreSQL schema shared by any number of sidecars. No sidecar owns
//!   the queue: each takes lanes (handler + entity) by a lease it renews
//!   ([`Store::claim`]), and settles only what it holds ([`StoreError::Lost`] otherwise).
//!
//! The delivery side sees the same calls on both; [`Store::is_shared`] tells it which
//! way lanes come in: from the commits (one sidecar) or by claims (shared).

mod file;
mod postgres;
mod records;

use std::time::Duration;

pub use file::{CACHE_BYTES, LOG_BYTES, LOG_CAPACITY, PRUNE_LIMIT, SCHEMA_VERSION};
pub use records::{
    DeadLetter, DeadLetterFilter, Delivery, Execution, ExecutionFilter, NewDelivery, Queued,
    Replayed, Retention, Settle, Sink, now_ms, rfc3339, unix_ms,
};

use crate::config;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("cannot use the store {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("store write failed: {0}")]
    Write(String),
    #[error("store read failed: {0}")]
    Read(String),
    #[error("the store holds an unreadable row ({0}); move the file aside to start afresh")]
    Corrupt(String),
    #[error("the store is closed")]
    Closed,
    /// Shared store: this sidecar no longer holds the delivery's lane (its lease ran out
    /// and another sidecar may have taken it over), so it must not settle it.
    #[error("the lane's lease was lost to another sidecar")]
    Lost,
}

impl StoreError {
    fn write(e: impl std::fmt::Display) -> Self {
        Self::Write(e.to_string())
    }

    fn read(e: impl std::fmt::Display) -> Self {
        Self::Read(e.to_string())
    }
}

/// Offers execution log rows to a writer's channel, bounded in batches (the channel)
/// and in bytes (`bytes` of `cap` not yet written, which the writer gives back as it
/// writes): beyond either they are dropped and counted, never waited for. Returns the
/// bytes waiting, with these rows if they went in.
fn offer_log(
    rows: Vec<Execution>,
    logs: &tokio::sync::mpsc::Sender<Vec<Execution>>,
    bytes: &std::sync::atomic::AtomicUsize,
    cap: usize,
    dropped: &std::sync::atomic::AtomicU64,
) -> usize {
    use std::sync::atomic::Ordering;
    let n = rows.len() as u64;
    let weight: usize = rows.iter().map(Execution::weight).sum();
    let before = bytes.fetch_add(weight, Ordering::Relaxed);
    let sent = before + weight <= cap && logs.try_send(rows).is_ok();
    if sent {
        return before + weight;
    }
    bytes.fetch_sub(weight, Ordering::Relaxed);
    let before_drop = dropped.fetch_add(n, Ordering::Relaxed);
    crate::metrics::execution_log_dropped(n);
    if before_drop == 0 || before_drop / 1000 != (before_drop + n) / 1000 {
        tracing::warn!(
            dropped = before_drop + n,
            "execution log is behind, rows dropped"
        );
    }
    before
}

/// What `store copy` moved ([`Store::copy_from_file`]): how many of each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    pub queued: usize,
    pub dead: usize,
    pub dedupe: usize,
}

/// What became of a lane a sidecar was done with ([`Store::release`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Release {
    /// Nothing more was queued: the lane is free for any sidecar.
    Free,
    /// Deliveries were queued behind the last one (by any sidecar): still held, these
    /// come next, in id order.
    More(Vec<Queued>),
    /// The lease was lost meanwhile.
    Lost,
}

/// A handle on the open store; clones share it.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    File(file::File),
    Postgres(postgres::Postgres),
}

impl Store {
    /// Opens the configured store. The file is opened (or created) at once; a shared
    /// database is connected to and migrated in the background, the store saying it is
    /// not open ([`Store::is_open`]) until then. Must run inside a tokio runtime.
    pub async fn open(config: &config::Store) -> Result<Self, StoreError> {
        let backend = match &config.backend {
            config::Backend::Redb => Backend::File(file::File::open(&config.path)?),
            config::Backend::Postgres(pg) => Backend::Postgres(postgres::Postgres::open(pg).await?),
        };
        Ok(Self { backend })
    }

    /// The redb file at `path`.
    pub fn open_file(path: &std::path::Path) -> Result<Self, StoreError> {
        Ok(Self {
            backend: Backend::File(file::File::open(path)?),
        })
    }

    /// A store in memory, gone with the process: for tests.
    pub fn memory() -> Result<Self, StoreError> {
        Ok(Self {
            backend: Backend::File(file::File::memory()?),
        })
    }

    #[cfg(test)]
    fn from_file(file: file::File) -> Self {
        Self {
            backend: Backend::File(file),
        }
    }

    /// Where the data lives, for logs and `/readyz`: the file, or the database without
    /// its credentials.
    pub fn path(&self) -> &str {
        match &self.backend {
            Backend::File(f) => f.path(),
            Backend::Postgres(p) => p.shown(),
        }
    }

    /// Whether the store is shared by several sidecars: lanes are then claimed, not
    /// handed over by the commits.
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// Shared store: how long a lane's lease lasts (`store.lease`).
    pub fn lease(&self) -> Option<Duration> {
        match &self.backend {
            Backend::File(_) => None,
            Backend::Postgres(p) => Some(p.lease()),
        }
    }

    /// Whether the store can take writes now.
    pub fn is_open(&self) -> bool {
        match &self.backend {
            Backend::File(f) => f.is_open(),
            Backend::Postgres(p) => p.is_open(),
        }
    }

    /// Sets what is told of each commit's stored deliveries (ids and lanes, in id
    /// order), before anyone hears of the commit. Only the first call counts. A shared
    /// store tells nobody: its lanes are claimed.
    pub fn on_commit(&self, sink: Sink) {
        if let Backend::File(f) = &self.backend {
            f.on_commit(sink);
        }
    }

    /// Stores deliveries durably; returns once they are committed, with their ids. An
    /// item whose dedupe key was stored within `window` is skipped: its slot in the reply
    /// is `None`.
    pub async fn enqueue(
        &self,
        items: Vec<NewDelivery>,
        window: Duration,
    ) -> Result<Vec<Option<u64>>, StoreError> {
        match &self.backend {
            Backend::File(f) => f.enqueue(items, window).await,
            Backend::Postgres(p) => p.enqueue(items, window).await,
        }
    }

    /// Records how an attempt of delivery `id` (of lane `handler` + `entity`) ended,
    /// with its execution log row. [`StoreError::Lost`] when a shared store's lane is
    /// no longer this sidecar's.
    pub async fn settle(
        &self,
        id: u64,
        lane: (&str, &str),
        settle: Settle,
        record: Option<Execution>,
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::File(f) => f.settle(id, settle, record).await,
            Backend::Postgres(p) => p.settle(id, lane, settle, record).await,
        }
    }

    /// Moves dead letter `id` back to the queue under a new delivery id (returned);
    /// `None` when there is no such dead letter.
    pub async fn replay(&self, id: u64) -> Result<Option<u64>, StoreError> {
        match &self.backend {
            Backend::File(f) => f.replay(id).await,
            Backend::Postgres(p) => p.replay(id).await,
        }
    }

    /// Deletes dead letter `id`; whether it existed.
    pub async fn drop_dead_letter(&self, id: u64) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::File(f) => f.drop_dead_letter(id).await,
            Backend::Postgres(p) => p.drop_dead_letter(id).await,
        }
    }

    /// Moves every dead letter matching `filter` back to the queue, in one transaction,
    /// under new ids in their old order; only those for one of `handlers` (the rest
    /// stay, counted as skipped).
    pub async fn replay_matching(
        &self,
        filter: DeadLetterFilter,
        handlers: Vec<String>,
    ) -> Result<Replayed, StoreError> {
        match &self.backend {
            Backend::File(f) => f.replay_matching(filter, handlers).await,
            Backend::Postgres(p) => p.replay_matching(filter, handlers).await,
        }
    }

    /// Deletes every dead letter matching `filter`, in one transaction; how many.
    pub async fn drop_matching(&self, filter: DeadLetterFilter) -> Result<usize, StoreError> {
        match &self.backend {
            Backend::File(f) => f.drop_matching(filter).await,
            Backend::Postgres(p) => p.drop_matching(filter).await,
        }
    }

    /// Applies the retention once, at most [`PRUNE_LIMIT`] rows of each table; how many
    /// rows went.
    pub async fn prune(&self, retention: Retention) -> Result<usize, StoreError> {
        match &self.backend {
            Backend::File(f) => f.prune(retention).await,
            Backend::Postgres(p) => p.prune(retention).await,
        }
    }

    /// Applies the retention every `every` until `stop`. `retention` is asked each time,
    /// so a reload's values apply.
    pub fn keep_pruned(
        self,
        every: Duration,
        retention: impl Fn() -> Retention + Send + 'static,
        stop: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                match self.prune_all(retention(), &stop).await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(rows = n, "store pruned"),
                    Err(e) => tracing::warn!(error = %e, "cannot prune the store"),
                }
            }
        })
    }

    /// Applies the retention until nothing is left to prune (or `stop`): one prune
    /// removes at most [`PRUNE_LIMIT`] rows of each table, so that other requests get
    /// their turn between two; going on at once while one comes back full keeps up with
    /// any rate. How many rows went.
    pub async fn prune_all(
        &self,
        retention: Retention,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<usize, StoreError> {
        let mut total = 0;
        loop {
            let n = self.prune(retention).await?;
            total += n;
            if n < PRUNE_LIMIT || stop.is_cancelled() {
                return Ok(total);
            }
        }
    }

    /// Adds execution log rows without waiting: they are written with the next batch.
    /// When the writer is that far behind ([`LOG_CAPACITY`] batches or [`LOG_BYTES`]
    /// bytes not yet written), they are dropped and counted, never waited for.
    pub fn log(&self, rows: Vec<Execution>) {
        match &self.backend {
            Backend::File(f) => f.log(rows),
            Backend::Postgres(p) => p.log(rows),
        }
    }

    /// Unreadable queued rows that opening the file moved to the dead letters.
    pub fn quarantined(&self) -> usize {
        match &self.backend {
            Backend::File(f) => f.quarantined(),
            Backend::Postgres(_) => 0,
        }
    }

    /// Execution log rows dropped so far because the writer was behind.
    pub fn dropped_log_rows(&self) -> u64 {
        match &self.backend {
            Backend::File(f) => f.dropped_log_rows(),
            Backend::Postgres(p) => p.dropped_log_rows(),
        }
    }

    /// Writes what is queued and stops. Later requests get [`StoreError::Closed`]. A
    /// shared store gives its lanes back first, so that other sidecars need not wait
    /// for the leases to run out.
    pub async fn close(&self) {
        match &self.backend {
            Backend::File(f) => f.close().await,
            Backend::Postgres(p) => p.close().await,
        }
    }

    /// One stored delivery.
    pub async fn delivery(&self, id: u64) -> Result<Option<Delivery>, StoreError> {
        match &self.backend {
            Backend::File(f) => f.delivery(id),
            Backend::Postgres(p) => p.delivery(id).await,
        }
    }

    /// Calls `each` with (id, handler, entity) of every stored delivery with an id above
    /// `after`, oldest first, from one consistent view of the queue. Only the file's:
    /// a shared store's lanes are claimed ([`Store::claim`]), never scanned.
    pub fn scan_queue(
        &self,
        after: u64,
        each: impl FnMut(u64, &str, &str),
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::File(f) => f.scan_queue(after, each),
            Backend::Postgres(_) => Ok(()),
        }
    }

    /// Shared store: deliveries waiting per handler, of every sidecar. The file's are
    /// counted in memory by the lanes (`None`).
    pub async fn queue_depths(&self) -> Result<Option<Vec<(String, u64)>>, StoreError> {
        match &self.backend {
            Backend::File(_) => Ok(None),
            Backend::Postgres(p) => p.queue_depths().await.map(Some),
        }
    }

    /// Deliveries waiting in the queue.
    pub async fn queue_depth(&self) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::File(f) => f.queue_depth(),
            Backend::Postgres(p) => p.queue_depth().await,
        }
    }

    /// When the oldest delivery in the queue was accepted (unix ms); `None` when empty.
    pub async fn oldest_enqueued(&self) -> Result<Option<u64>, StoreError> {
        match &self.backend {
            Backend::File(f) => f.oldest_enqueued(),
            Backend::Postgres(p) => p.oldest_enqueued().await,
        }
    }

    /// Dead letters stored.
    pub async fn dead_letter_count(&self) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::File(f) => f.dead_letter_count(),
            Backend::Postgres(p) => p.dead_letter_count().await,
        }
    }

    /// Execution log rows matching `filter`, newest first.
    pub async fn executions(&self, filter: ExecutionFilter) -> Result<Vec<Execution>, StoreError> {
        match &self.backend {
            Backend::File(f) => {
                let f = f.clone();
                tokio::task::spawn_blocking(move || f.executions(&filter))
                    .await
                    .map_err(StoreError::read)?
            }
            Backend::Postgres(p) => p.executions(&filter).await,
        }
    }

    /// Dead letters `filter` takes, oldest first, with ids above `after`: at most
    /// `limit`.
    pub async fn dead_letters(
        &self,
        filter: DeadLetterFilter,
        after: u64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        match &self.backend {
            Backend::File(f) => {
                let f = f.clone();
                tokio::task::spawn_blocking(move || f.dead_letters(&filter, after, limit))
                    .await
                    .map_err(StoreError::read)?
            }
            Backend::Postgres(p) => p.dead_letters(&filter, after, limit).await,
        }
    }

    /// One dead letter.
    pub async fn dead_letter(&self, id: u64) -> Result<Option<DeadLetter>, StoreError> {
        match &self.backend {
            Backend::File(f) => f.dead_letter(id),
            Backend::Postgres(p) => p.dead_letter(id).await,
        }
    }

    /// Shared store: takes up to `room` free lanes of `handler` (none held, or their
    /// lease run out) with their first queued deliveries, in id order per lane. The
    /// file's lanes come from its commits: nothing to claim.
    pub async fn claim(&self, handler: &str, room: usize) -> Result<Vec<Queued>, StoreError> {
        match &self.backend {
            Backend::File(_) => Ok(Vec::new()),
            Backend::Postgres(p) => p.claim(handler, room).await,
        }
    }

    /// Shared store: how many lanes of `handler` wait for a sidecar (free with work
    /// left, or held by a lease that ran out), counting up to `limit`. The file's lanes
    /// never wait for one.
    pub async fn waiting(&self, handler: &str, limit: usize) -> Result<usize, StoreError> {
        match &self.backend {
            Backend::File(_) => Ok(0),
            Backend::Postgres(p) => p.waiting(handler, limit).await,
        }
    }

    /// Shared store: this sidecar is done with the lane's deliveries up to `last`: it
    /// frees the lane, or keeps it when more were queued meanwhile.
    pub async fn release(&self, lane: (&str, &str), last: u64) -> Result<Release, StoreError> {
        match &self.backend {
            Backend::File(_) => Ok(Release::Free),
            Backend::Postgres(p) => p.release(lane, last).await,
        }
    }

    /// Shared store: gives a held lane up, its deliveries still queued, for another
    /// sidecar to take (a handler this one no longer has, but others do; a lane whose
    /// turn is over while others wait). It waits from now on, behind those that waited
    /// before it.
    pub async fn abandon(&self, lane: (&str, &str)) -> Result<(), StoreError> {
        match &self.backend {
            Backend::File(_) => Ok(()),
            Backend::Postgres(p) => p.abandon(lane).await,
        }
    }

    /// Whether this sidecar may attempt a delivery of the lane: always for the file;
    /// for a shared store, while it holds the lane's lease with time to spare.
    pub fn holds(&self, lane: (&str, &str)) -> bool {
        match &self.backend {
            Backend::File(_) => true,
            Backend::Postgres(p) => p.holds(lane),
        }
    }

    /// Shared store: tells the other sidecars which after-stage handlers this one has
    /// (a handler a reload removed here is dead-lettered only when no live sidecar
    /// still has it).
    pub fn set_handlers(&self, handlers: Vec<String>) {
        if let Backend::Postgres(p) = &self.backend {
            p.set_handlers(handlers);
        }
    }

    /// Moves what the redb file at `from` holds (queued deliveries, dead letters) into
    /// this store, which must be a shared one: copied in one transaction, then removed
    /// from the file, so that running it twice copies nothing twice. The dedupe keys
    /// are copied too (and stay in the file: copying them again changes nothing), so
    /// that an envelope the file's node accepted is still deduped within its window
    /// once the database takes over. The file must not be in use by a running sidecar
    /// (redb locks it). How many of each.
    pub async fn copy_from_file(&self, from: &std::path::Path) -> Result<Copied, StoreError> {
        let Backend::Postgres(pg) = &self.backend else {
            return Err(StoreError::Open {
                path: self.path().to_owned(),
                reason: "store copy needs store.backend = \"postgres\" in the config: the \
                         file backend is the file itself"
                    .into(),
            });
        };
        if !pg.wait_open(Duration::from_secs(10)).await {
            return Err(StoreError::Open {
                path: self.path().to_owned(),
                reason: match pg.why_not_ready() {
                    Some(why) => format!("not usable within 10s: {why}"),
                    None => "not usable within 10s".into(),
                },
            });
        }
        let file = file::File::open(from)?;
        let mut ids = Vec::new();
        file.scan_queue(0, |id, _, _| ids.push(id))?;
        let mut deliveries = Vec::with_capacity(ids.len());
        for id in &ids {
            deliveries.extend(file.delivery(*id)?);
        }
        let dead = file.dead_letters(&DeadLetterFilter::default(), 0, usize::MAX)?;
        let dead_ids: Vec<u64> = dead.iter().map(|l| l.delivery.id).collect();
        let dedupe = file.dedupe_keys()?;
        let copied = pg.import(deliveries, dead, dedupe).await?;
        for id in ids {
            file.settle(id, Settle::Delivered, None).await?;
        }
        for id in dead_ids {
            file.drop_dead_letter(id).await?;
        }
        file.close().await;
        Ok(copied)
    }

    /// Shared store: tells the other sidecars about this one and its handlers now.
    pub async fn announce(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::File(_) => Ok(()),
            Backend::Postgres(p) => p.announce().await,
        }
    }

    /// Shared store: whether another live sidecar has an after-stage handler `name`.
    pub async fn handler_elsewhere(&self, name: &str) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::File(_) => Ok(false),
            Backend::Postgres(p) => p.handler_elsewhere(name).await,
        }
    }

    /// Shared store: handlers with queued deliveries that no live sidecar has (their
    /// lanes are claimed by anyone, to be dead-lettered as a removed handler's are).
    pub async fn orphans(&self) -> Result<Vec<String>, StoreError> {
        match &self.backend {
            Backend::File(_) => Ok(Vec::new()),
            Backend::Postgres(p) => p.orphans().await,
        }
    }
}
