//! The after stage: it takes an allowed event's deliveries into the store, hands what
//! the store committed to the lanes, and works the lanes: stored deliveries out to their
//! handlers, in order per entity, with retries, until delivered or dead-lettered.
//!
//! A *lane* is one handler and one entity (`crm` + `clients/12`). The store's writer
//! tells [`Deliveries::intake`] of every delivery it stored, after each commit and in id
//! order, whether or not the request that caused it is still waiting: so nothing stored
//! is ever without a lane, and a lane's ids are in store order. Each lane with work has
//! one task that takes its deliveries strictly in that order and works on one until it
//! is settled: delivered, or moved to the dead letters. While it waits for a retry, the
//! lane's later deliveries wait behind it; other lanes go on. Calls of one handler at
//! once are bounded by its `max_concurrency` slots, which a lane waits for without a
//! time limit (waiting for a slot is not a failed attempt).
//!
//! Memory is bounded whatever the backlog: a handler keeps at most [`LANES_PER_HANDLER`]
//! lanes in memory, each with the ids of its stored deliveries (8 bytes each), and a body
//! is in memory only between its read from the store and the attempt that sends it: a
//! lane that waits (a retry, a slot, a disabled handler) holds none, and reads it again
//! for its attempt; one that waits for nothing sends the body its first read brought.
//! Deliveries of lanes beyond the bound stay in the store only (the handler is
//! *spilled*); when half its lanes are done, a scan of the store brings in the next ones
//! ([`Deliveries::refill`]).
//!
//! Every attempt looks its handler up in the *current* snapshot, so a reload's changes
//! (URL, timeout, retry) apply to deliveries already queued. A handler a reload removed
//! (or turned into a before-stage one) sends its queued deliveries to the dead letters;
//! a disabled handler's deliveries wait, stored, until it is enabled again (a shared
//! store's lanes are left to the sidecars that have it enabled).
//!
//! A shared store's lanes come by claims instead of from the writer, at most two per
//! slot of a handler's `max_concurrency`; a sidecar with no room while other lanes wait
//! hands back those whose turn is over ([`shared`]).
//!
//! Code map: this file holds the lanes in memory and their tasks; [`attempt`] one
//! delivery's turn on its lane; [`refill`] the scans that bring a spilled handler's lanes
//! in; [`shared`] the claims and hand-backs of a shared store; [`retry`] the verdict on
//! each answer and the backoff.

mod attempt;
mod refill;
pub mod retry;
mod shared;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::config::{Handler, Stage};
use crate::dispatch::Live;
use crate::handlers::{Caller, new_message_id};
use crate::store::{NewDelivery, Queued, Store, StoreError, now_ms};
use attempt::deliver;
use shared::{claim_lanes, release};

/// The dead-letter reason of a delivery whose handler a reload removed.
pub const REMOVED: &str = "handler removed by a config reload";
/// ... or that the config the sidecar started with lacks (it changed while it was
/// stopped).
pub const ABSENT_AT_START: &str =
    "handler not in the config the sidecar started with (removed while it was stopped)";
/// Shared store: the reason when this sidecar never had the handler.
pub const ORPHANED: &str = "no live sidecar has the handler: a config reload removed it, or the sidecars that had it stopped";
/// ... or turned into a before-stage handler.
pub const NOT_AFTER: &str =
    "handler is no longer an after-stage handler (changed by a config reload)";

/// Lanes one handler keeps in memory at most; the rest wait in the store.
pub const LANES_PER_HANDLER: usize = 1024;
/// Longest a scrape of `/metrics` waits for the store's figures.
const FIGURES_WAIT: Duration = Duration::from_secs(1);
/// Longest wait between two tries of a store operation that failed.
const STORE_RETRY_MAX: Duration = Duration::from_secs(5);
/// One handler and one entity: the unit of ordering.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lane {
    pub handler: String,
    pub entity: String,
}

/// An allowed event, as the after stage takes it.
pub struct Intake<'a> {
    pub event: &'a str,
    pub object_id: &'a str,
    pub entity: String,
    /// The envelope as the before stage left it: what the handlers receive.
    pub body: &'a [u8],
    /// The billing's bytes: what makes two deliveries the same for the dedupe window.
    pub original: &'a [u8],
    pub dedupe_window: Duration,
    /// The event's `X-Provisioning-Event-Id`, kept on its deliveries for the log rows.
    pub event_id: &'a str,
}

/// What [`Deliveries::accept`] stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub queued: usize,
    /// Handlers that had the identical envelope within the dedupe window.
    pub duplicates: usize,
}

/// The lanes with work, and the tasks working them.
pub struct Deliveries {
    state: Mutex<State>,
    stop: CancellationToken,
    tasks: TaskTracker,
    /// Lane tasks are started from the store's writer thread too.
    runtime: tokio::runtime::Handle,
    /// The live config: every attempt looks its handler up in the current one.
    live: Arc<Live>,
    store: Store,
    caller: Caller,
    /// Handlers whose queue depth `/metrics` has shown, so that an emptied one shows 0.
    reported: Mutex<HashSet<String>>,
    /// When the oldest waiting delivery was stored, as last read (0: none waited), so
    /// that its age keeps growing while the store cannot be read.
    oldest_at: AtomicU64,
    /// A refresh of the store's figures for `/metrics` under way: it ends when this
    /// channel's sender is dropped.
    refreshing: Mutex<Option<tokio::sync::watch::Receiver<()>>>,
    /// Shared store: an accept stored deliveries, look for free lanes now.
    wake: tokio::sync::Notify,
    /// Shared store: lanes were asked to hand back (their turn is over); those that
    /// wait for a retry or a reload look at their flag.
    handing: tokio::sync::Notify,
    /// Shared store: per handler that no live sidecar has, since when this sidecar has
    /// seen it so (see [`Deliveries::unclaimed_for`]).
    unclaimed: Mutex<HashMap<String, Unclaimed>>,
}

/// Shared store: a handler no live sidecar has, as this sidecar has seen it.
struct Unclaimed {
    /// The first time it was seen so.
    since: std::time::Instant,
    /// The last time: a look more than two leases later starts again from there, as
    /// another sidecar may have had the handler in between.
    seen: std::time::Instant,
    /// The config generation here then: a reload here starts again too.
    generation: u64,
}

#[derive(Default)]
struct State {
    /// False until the start's scan of the store is in: until then every stored delivery
    /// might have earlier ones of its lane in the store, so none starts a lane.
    resumed: bool,
    handlers: HashMap<String, HandlerLanes>,
}

/// One handler's lanes in memory.
#[derive(Default)]
struct HandlerLanes {
    /// Entity -> its lane. A lane is in the map exactly while its task runs, and holds
    /// every stored delivery of the lane but the one its task works on.
    lanes: HashMap<String, LaneQueue>,
    /// Some stored deliveries of this handler are in no lane in memory.
    spilled: bool,
    /// A scan for them runs.
    refilling: bool,
    /// Deliveries of this handler in the store, settled or not yet: the queue depth.
    depth: u64,
    /// The highest id the start's scan counted into `depth`: the writer's word of one up
    /// to it, arriving after the scan, is already counted.
    counted_to: u64,
}

struct LaneQueue {
    ids: VecDeque<u64>,
    /// The delivery the lane's task works on: its oldest.
    current: Option<u64>,
    /// The highest id the lane has had: a later word of a lower one is old news.
    last: u64,
    /// Shared store: when this sidecar claimed the lane (its turn began).
    since: Instant,
    /// Shared store: its turn is over and others wait: hand it back once the delivery
    /// it is on is settled.
    hand_back: bool,
}

impl LaneQueue {
    fn new(ids: Vec<u64>) -> Self {
        Self::since(ids, Instant::now())
    }

    fn since(ids: Vec<u64>, since: Instant) -> Self {
        let last = ids.last().copied().unwrap_or(0);
        Self {
            ids: ids.into(),
            current: None,
            last,
            since,
            hand_back: false,
        }
    }

    fn push(&mut self, id: u64) {
        if id > self.last {
            self.ids.push_back(id);
            self.last = id;
        }
    }
}

impl Deliveries {
    /// The after stage over `store`, calling handlers with `caller` as `live` has them.
    /// Must run inside a tokio runtime: lane tasks are started on it.
    pub fn new(live: Arc<Live>, store: Store, caller: Caller) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::default(),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            runtime: tokio::runtime::Handle::current(),
            live,
            store,
            caller,
            reported: Mutex::default(),
            oldest_at: AtomicU64::new(0),
            refreshing: Mutex::default(),
            wake: tokio::sync::Notify::new(),
            handing: tokio::sync::Notify::new(),
            unclaimed: Mutex::default(),
        })
    }

    /// Shared store: how long the deliveries of `handler`, which no live sidecar has,
    /// must still wait before they are dead-lettered: until it has been so for a whole
    /// lease, in which any live sidecar has said which handlers it has (every third of
    /// it, and at once after a reload), so that one that has just added the handler
    /// takes its lanes instead. A reload here starts the wait again.
    pub(super) fn unclaimed_for(&self, handler: &str) -> std::time::Duration {
        let lease = self.store.lease().unwrap_or_default();
        let generation = self.live.load().generation;
        let now = std::time::Instant::now();
        let mut unclaimed = self.unclaimed.lock().expect("not poisoned");
        let seen = unclaimed.entry(handler.to_owned()).or_insert(Unclaimed {
            since: now,
            seen: now,
            generation,
        });
        if seen.generation != generation || now.duration_since(seen.seen) > 2 * lease {
            seen.since = now;
            seen.generation = generation;
        }
        seen.seen = now;
        lease.saturating_sub(now.duration_since(seen.since))
    }

    /// Shared store: a live sidecar has `handler` again.
    pub(super) fn claimed(&self, handler: &str) {
        self.unclaimed.lock().expect("not poisoned").remove(handler);
    }

    /// Shared store: the dead-letter reason of a handler no live sidecar has.
    pub(super) fn unclaimed_reason(&self, handler: &str) -> &'static str {
        if self.live.had(handler) {
            REMOVED
        } else {
            ORPHANED
        }
    }

    /// Connects the lanes to the store's commits: from now on every delivery the store
    /// commits reaches its lane from the writer, in id order.
    pub fn attach(this: &Arc<Self>) {
        let weak = Arc::downgrade(this);
        this.store.on_commit(Box::new(move |queued| {
            if let Some(this) = weak.upgrade() {
                this.intake(queued);
            }
        }));
    }

    /// Stores one delivery per handler for an allowed event, durably; returns once they
    /// are committed. The lanes hear of them from the commit itself.
    pub async fn accept(
        &self,
        store: &Store,
        handlers: &[Arc<Handler>],
        event: Intake<'_>,
    ) -> Result<Accepted, StoreError> {
        if handlers.is_empty() {
            return Ok(Accepted {
                queued: 0,
                duplicates: 0,
            });
        }
        let window = event.dedupe_window;
        let body = String::from_utf8_lossy(event.body).into_owned();
        let items = handlers
            .iter()
            .map(|h| NewDelivery {
                handler: h.name.clone(),
                event: event.event.to_owned(),
                object_id: event.object_id.to_owned(),
                entity: event.entity.clone(),
                message_id: new_message_id(),
                body: body.clone(),
                dedupe: (!window.is_zero()).then(|| dedupe_key(&h.name, event.original)),
                event_id: Some(event.event_id.to_owned()),
            })
            .collect();
        let stored = store.enqueue(items, window).await?;
        let queued = stored.iter().flatten().count();
        if queued > 0 && store.is_shared() {
            self.wake.notify_one();
        }
        Ok(Accepted {
            queued,
            duplicates: stored.len() - queued,
        })
    }

    /// Takes deliveries the store just committed (in id order) into their lanes,
    /// starting a task for a lane without one. Called by the store's writer.
    fn intake(self: &Arc<Self>, queued: Vec<Queued>) {
        if self.stop.is_cancelled() {
            // Stopping: they stay stored for the next start.
            return;
        }
        let mut state = self.state.lock().expect("not poisoned");
        let resumed = state.resumed;
        for Queued {
            id,
            handler,
            entity,
        } in queued
        {
            let lanes = match state.handlers.get_mut(&handler) {
                Some(lanes) => lanes,
                None => state.handlers.entry(handler.clone()).or_default(),
            };
            if id > lanes.counted_to {
                lanes.depth += 1;
            }
            if let Some(lane) = lanes.lanes.get_mut(&entity) {
                lane.push(id);
            } else if resumed
                && (self.store.is_shared()
                    || (!lanes.spilled && lanes.lanes.len() < LANES_PER_HANDLER))
            {
                // A shared store's lanes come in by claims, each bounded by the room
                // left, and are held: none may be left out.
                lanes.lanes.insert(entity.clone(), LaneQueue::new(vec![id]));
                self.start_lane(Lane { handler, entity });
            } else {
                lanes.spilled = true;
            }
        }
    }

    fn start_lane(self: &Arc<Self>, lane: Lane) {
        self.tasks
            .spawn_on(run_lane(self.clone(), lane), &self.runtime);
    }

    /// Picks up what the store holds from before this start; how many deliveries. A
    /// shared store's lanes are claimed from now on, as they come free.
    pub fn resume(self: &Arc<Self>) -> Result<u64, StoreError> {
        if self.store.is_shared() {
            self.state.lock().expect("not poisoned").resumed = true;
            self.tasks
                .spawn_on(claim_lanes(self.clone()), &self.runtime);
            return Ok(0);
        }
        let n = self.refill(None)?;
        self.refill_again();
        Ok(n)
    }
}

impl State {}

impl Deliveries {
    /// The next delivery of `lane`, or `None` when it has no more: the lane then leaves
    /// memory (and a spilled handler with room scans the store for more).
    fn next(self: &Arc<Self>, lane: &Lane) -> Next {
        let mut state = self.state.lock().expect("not poisoned");
        let Some(lanes) = state.handlers.get_mut(&lane.handler) else {
            return Next::Empty;
        };
        if let Some(queue) = lanes.lanes.get_mut(&lane.entity) {
            if queue.hand_back {
                drop(state);
                self.lost(lane);
                return Next::HandedBack;
            }
            if let Some(id) = queue.ids.pop_front() {
                queue.current = Some(id);
                return Next::Deliver(id);
            }
        }
        lanes.lanes.remove(&lane.entity);
        if lanes.spilled && !lanes.refilling && lanes.lanes.len() <= LANES_PER_HANDLER / 2 {
            lanes.refilling = true;
            drop(state);
            self.spawn_refill(lane.handler.clone());
        } else if self.store.is_shared() {
            // Room for another lane: claim one now rather than at the next look.
            drop(state);
            self.wake.notify_one();
        }
        Next::Empty
    }

    /// A delivery of `handler` left the store (delivered or dead-lettered).
    fn settled(&self, handler: &str) {
        let mut state = self.state.lock().expect("not poisoned");
        if let Some(lanes) = state.handlers.get_mut(handler) {
            lanes.depth = lanes.depth.saturating_sub(1);
        }
    }

    /// Lanes `handler` may still take into memory.
    fn room(&self, handler: &str) -> usize {
        let state = self.state.lock().expect("not poisoned");
        let used = state.handlers.get(handler).map_or(0, |l| l.lanes.len());
        LANES_PER_HANDLER.saturating_sub(used)
    }

    /// Lanes in memory right now.
    pub fn active_lanes(&self) -> usize {
        let state = self.state.lock().expect("not poisoned");
        state.handlers.values().map(|l| l.lanes.len()).sum()
    }

    /// Deliveries waiting per handler, in memory or in the store only.
    pub fn depths(&self) -> HashMap<String, u64> {
        let state = self.state.lock().expect("not poisoned");
        state
            .handlers
            .iter()
            .filter(|(_, l)| l.depth > 0)
            .map(|(h, l)| (h.clone(), l.depth))
            .collect()
    }

    /// Per handler, the oldest delivery its lanes in memory hold (the one a lane works
    /// on comes before its queue).
    fn oldest_ids(&self) -> Vec<(String, u64)> {
        let state = self.state.lock().expect("not poisoned");
        state
            .handlers
            .iter()
            .filter_map(|(h, l)| {
                l.lanes
                    .values()
                    .filter_map(|q| q.current.or_else(|| q.ids.front().copied()))
                    .min()
                    .map(|id| (h.clone(), id))
            })
            .collect()
    }

    /// Sets the after stage's gauges for a scrape. The store's figures (queue depths,
    /// the oldest delivery's age, the dead letters) are read by a refresh that the scrape
    /// waits for at most [`FIGURES_WAIT`]: a store that takes longer (a database that does
    /// not answer takes up to its operation timeout for each read) leaves the refresh to go
    /// on alone, its figures for the next scrape, and this one shows those last read.
    /// A refresh still running is waited for rather than started again.
    pub async fn report_metrics(self: &Arc<Self>) {
        let mut done = {
            let mut refreshing = self.refreshing.lock().expect("not poisoned");
            // A refresh whose sender is gone has ended (or died): start another.
            if let Some(done) = refreshing.as_ref().filter(|d| d.has_changed().is_ok()) {
                done.clone()
            } else {
                let (finished, done) = tokio::sync::watch::channel(());
                *refreshing = Some(done.clone());
                let this = self.clone();
                self.runtime.spawn(async move {
                    this.read_figures().await;
                    *this.refreshing.lock().expect("not poisoned") = None;
                    drop(finished);
                });
                done
            }
        };
        if tokio::time::timeout(FIGURES_WAIT, done.changed())
            .await
            .is_err()
        {
            debug!("the store's figures are late; this scrape shows those last read");
        }
        crate::metrics::store_writable(self.store.is_open());
        crate::metrics::lanes_in_memory(self.active_lanes());
    }

    /// Reads the store's figures into the gauges: queue depth per handler (every
    /// after-stage handler of the config, and any other with deliveries waiting; 0 for
    /// one that had some before), the oldest waiting delivery's age, the dead letters. A
    /// queue that cannot be read (the database is down) keeps the figures last read: a
    /// backlog does not read as 0 during an outage.
    async fn read_figures(&self) {
        let store = &self.store;
        let config = self.live.load().config.clone();
        let depths = match store.queue_depths().await {
            Ok(Some(shared)) => Some(shared.into_iter().collect()),
            Ok(None) => Some(self.depths()),
            Err(e) => {
                warn!(error = %e, "cannot read the queue for metrics; keeping the last figures");
                None
            }
        };
        if let Some(depths) = depths {
            self.report_depths(&config, depths).await;
        }
        match store.oldest_enqueued().await {
            Ok(oldest) => self.oldest_at.store(oldest.unwrap_or(0), Ordering::Relaxed),
            Err(e) => warn!(error = %e, "cannot read the queue for metrics; its oldest ages on"),
        }
        let age = match self.oldest_at.load(Ordering::Relaxed) {
            0 => 0,
            at => now_ms().saturating_sub(at),
        };
        crate::metrics::queue_oldest(Duration::from_millis(age));
        match store.dead_letter_count().await {
            Ok(n) => crate::metrics::dead_letters(n),
            Err(e) => warn!(error = %e, "cannot count the dead letters for metrics"),
        }
    }

    /// The queue depth and the oldest waiting delivery's age per handler, from `depths`.
    async fn report_depths(
        &self,
        config: &crate::config::Config,
        mut depths: HashMap<String, u64>,
    ) {
        let store = &self.store;
        for h in config.handlers.iter().filter(|h| h.stage == Stage::After) {
            depths.entry(h.name.clone()).or_default();
        }
        let mut ages: HashMap<String, Duration> = HashMap::new();
        for (handler, id) in self.oldest_ids() {
            if let Ok(Some(d)) = store.delivery(id).await {
                let age = Duration::from_millis(now_ms().saturating_sub(d.enqueued_at));
                ages.insert(handler, age);
            }
        }
        {
            let mut reported = self.reported.lock().expect("not poisoned");
            for gone in reported.iter().filter(|h| !depths.contains_key(*h)) {
                crate::metrics::queue(gone, 0);
                crate::metrics::handler_oldest(gone, Duration::ZERO);
            }
            reported.clear();
            for (handler, depth) in &depths {
                crate::metrics::queue(handler, *depth);
                let age = ages.get(handler).copied().unwrap_or_default();
                crate::metrics::handler_oldest(handler, age);
                reported.insert(handler.clone());
            }
        }
    }

    /// Stops: lanes waiting (for a retry, a slot, a handler) stop at once; attempts in
    /// flight finish and are recorded. Returns false if some were still running after
    /// `grace`. Whatever is not delivered stays in the store.
    pub async fn stop(&self, grace: Duration) -> bool {
        self.stop.cancel();
        self.tasks.close();
        tokio::time::timeout(grace, self.tasks.wait()).await.is_ok()
    }
}

/// What a lane's task does next.
enum Next {
    Deliver(u64),
    /// Nothing left in memory: the lane has left it.
    Empty,
    /// Shared store: its turn was over; the lane has left memory and is given back.
    HandedBack,
}

async fn run_lane(this: Arc<Deliveries>, lane: Lane) {
    let since = Instant::now();
    let mut last = 0;
    loop {
        loop {
            match this.next(&lane) {
                Next::Deliver(id) => {
                    last = id;
                    if !deliver(&this, &lane, id).await {
                        return;
                    }
                }
                Next::Empty => break,
                Next::HandedBack => {
                    debug!(handler = %lane.handler, entity = %lane.entity, "lane handed back: its turn is over and others wait");
                    return;
                }
            }
        }
        // The lane has left memory. A shared store's stays held until it is freed; what
        // other sidecars queued behind it meanwhile comes back here.
        if !this.store.is_shared() {
            return;
        }
        let Some(more) = release(&this, &lane, last).await else {
            return;
        };
        if !this.take_back(&lane, more, since) {
            return;
        }
    }
}

/// Waits before trying a failed store operation again: false when provisiond stops
/// meanwhile.
async fn store_backoff(stop: &CancellationToken, wait: &mut Duration) -> bool {
    let this = *wait;
    *wait = (*wait * 2).min(STORE_RETRY_MAX);
    tokio::select! {
        biased;
        () = stop.cancelled() => false,
        () = tokio::time::sleep(this) => true,
    }
}

/// What makes two deliveries the same for `store.dedupe_window`: the handler, and the
/// envelope exactly as the billing sent it (its bytes, before any handler changed it).
fn dedupe_key(handler: &str, body: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    let mut hash = sha2::Sha256::new();
    hash.update(handler.as_bytes());
    hash.update([0]);
    hash.update(body);
    hash.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(entity: &str) -> NewDelivery {
        NewDelivery {
            handler: "down".into(),
            event: "clients.update".into(),
            object_id: entity.rsplit('/').next().unwrap_or_default().into(),
            entity: entity.into(),
            message_id: new_message_id(),
            body: "{}".into(),
            dedupe: None,
            event_id: None,
        }
    }

    #[tokio::test]
    async fn the_queue_depth_counts_each_delivery_once_whichever_of_the_start_and_the_writer_tells_it_first()
     {
        // A handler nothing answers, retried an hour later: its deliveries stay queued.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let text = format!(
            "[[handler]]\nname = \"down\"\nevents = [\"*\"]\nstage = \"after\"\n\
             url = \"http://127.0.0.1:{port}/\"\n\
             retry = {{ attempts = 1000, backoff = \"1h\", max_backoff = \"1h\" }}\n"
        );
        let config = crate::config::Config::parse(&text, "test.toml").unwrap();
        let live = Live::new(crate::dispatch::Snapshot::new(config, 1));
        let store = Store::memory().unwrap();
        // Stored before the lanes hear of commits: only the start's scan sees these.
        let ids: Vec<u64> = store
            .enqueue(
                vec![
                    stored("clients/1"),
                    stored("clients/2"),
                    stored("clients/3"),
                ],
                Duration::from_secs(60),
            )
            .await
            .unwrap()
            .into_iter()
            .flatten()
            .collect();
        let deliveries = Deliveries::new(live, store.clone(), Caller::new());
        Deliveries::attach(&deliveries);
        assert_eq!(deliveries.resume().unwrap(), 3);
        assert_eq!(deliveries.depths().get("down"), Some(&3));
        // The writer's word of a delivery the scan already counted, arriving after it
        // (it waited for the lock the scan held): not counted again.
        deliveries.intake(vec![Queued {
            id: ids[2],
            handler: "down".into(),
            entity: "clients/3".into(),
        }]);
        assert_eq!(deliveries.depths().get("down"), Some(&3));
        // A delivery committed after the start is counted when the writer tells of it.
        store
            .enqueue(vec![stored("clients/4")], Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(deliveries.depths().get("down"), Some(&4));
        deliveries.stop.cancel();
    }

    /// The reason each delivery of a handler that is not in the config got when it was
    /// dead-lettered, once all `n` have been.
    async fn reasons(store: &Store, n: usize) -> Vec<String> {
        for _ in 0..500 {
            let dead = store
                .dead_letters(crate::store::DeadLetterFilter::default(), 0, 100)
                .await
                .unwrap();
            if dead.len() >= n {
                return dead.into_iter().map(|d| d.reason).collect();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{n} dead letters expected");
    }

    #[tokio::test]
    async fn a_handler_absent_since_the_start_is_told_from_one_a_reload_removed_after_any_reload() {
        let config = |names: &[&str]| {
            let text: String = names
                .iter()
                .map(|name| {
                    format!(
                        "[[handler]]\nname = \"{name}\"\nevents = [\"*\"]\nstage = \"after\"\n\
                         url = \"http://127.0.0.1:9/\"\n\
                         retry = {{ attempts = 1000, backoff = \"1h\", max_backoff = \"1h\" }}\n"
                    )
                })
                .collect();
            crate::dispatch::Snapshot::new(
                crate::config::Config::parse(&text, "test.toml").unwrap(),
                1,
            )
        };

        // Stored while the sidecar ran a config that had "down"; it starts without it,
        // and a reload that changes something else comes before the lanes look.
        let store = Store::memory().unwrap();
        let stored_ = vec![stored("clients/1"), stored("clients/2")];
        store
            .enqueue(stored_, Duration::from_secs(60))
            .await
            .unwrap();
        let live = Live::new(config(&["other"]));
        let mut reloaded = config(&["other", "another"]);
        reloaded.generation = 2;
        live.publish(reloaded);
        let deliveries = Deliveries::new(live, store.clone(), Caller::new());
        Deliveries::attach(&deliveries);
        deliveries.resume().unwrap();
        assert_eq!(reasons(&store, 2).await, [ABSENT_AT_START; 2]);
        deliveries.stop.cancel();

        // Had since the start, then removed by a reload: what the reason says.
        let store = Store::memory().unwrap();
        let live = Live::new(config(&["down"]));
        let mut reloaded = config(&["other"]);
        reloaded.generation = 2;
        live.publish(reloaded);
        store
            .enqueue(vec![stored("clients/1")], Duration::from_secs(60))
            .await
            .unwrap();
        let deliveries = Deliveries::new(live, store.clone(), Caller::new());
        Deliveries::attach(&deliveries);
        deliveries.resume().unwrap();
        assert_eq!(reasons(&store, 1).await, [REMOVED]);
        deliveries.stop.cancel();
    }
}
