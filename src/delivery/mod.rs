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
//! A shared store's lanes come by claims instead of from the writer, at most
//! [`HELD_PER_SLOT`] per slot of a handler's `max_concurrency`; a sidecar with no room
//! while other lanes wait hands back those whose [`TURN`] is over.

pub mod retry;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::config::{Handler, Stage};
use crate::dispatch::CallRecord;
use crate::dispatch::Live;
use crate::handlers::{Call, Caller, new_message_id};
use crate::outcome::CallOutcome;
use crate::store::{Execution, NewDelivery, Queued, Release, Settle, Store, StoreError, now_ms};
use retry::Verdict;

/// The dead-letter reason of a delivery whose handler a reload removed.
pub const REMOVED: &str = "handler removed by a config reload";
/// ... or turned into a before-stage handler.
pub const NOT_AFTER: &str =
    "handler is no longer an after-stage handler (changed by a config reload)";

/// Lanes one handler keeps in memory at most; the rest wait in the store.
pub const LANES_PER_HANDLER: usize = 1024;
/// Shared store: lanes a sidecar holds at once per slot of a handler's
/// `max_concurrency`. Two: a slot that finishes a lane finds the next one in memory, and
/// lanes this sidecar could not work yet are left for the others to claim.
const HELD_PER_SLOT: usize = 2;
/// Shared store: a lane's turn. A sidecar that holds all the lanes it may of a handler,
/// while other lanes of it wait (free with work, or their lease run out), hands back
/// the lanes it has held this long, oldest first, as many as wait: each after the
/// delivery it is on is settled. A lane that never empties (a steady stream for its
/// entity) would otherwise keep its sidecar for ever, and the others would wait.
const TURN: Duration = Duration::from_secs(1);
/// Shared store: how often a sidecar with no room for more lanes of a handler asks
/// whether others wait, at most.
const WAITING_EVERY: Duration = Duration::from_millis(250);

/// Longest wait between two tries of a store operation that failed.
const STORE_RETRY_MAX: Duration = Duration::from_secs(5);
/// Shared store: how soon free lanes are looked for again after a look that found some,
/// and at most while none are found.
const CLAIM_MIN: Duration = Duration::from_millis(50);
const CLAIM_MAX: Duration = Duration::from_secs(1);
/// Shared store: how often lanes of handlers no live sidecar has are looked for.
const ORPHANS_EVERY: Duration = Duration::from_secs(5);

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
    /// Shared store: an accept stored deliveries, look for free lanes now.
    wake: tokio::sync::Notify,
    /// Shared store: lanes were asked to hand back (their turn is over); those that
    /// wait for a retry or a reload look at their flag.
    handing: tokio::sync::Notify,
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
            wake: tokio::sync::Notify::new(),
            handing: tokio::sync::Notify::new(),
        })
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

    /// Brings stored deliveries that are in no lane in memory into lanes, up to the bound
    /// per handler: of every handler at the start (`only` = `None`), else of one spilled
    /// handler. Returns how many stored deliveries the scan saw.
    ///
    /// The scan runs without the lock over one view of the queue; then, under the lock,
    /// a second look at what was committed since completes the new lanes, and ids the
    /// writer hands over later are taken only when above a lane's last.
    fn refill(self: &Arc<Self>, only: Option<&str>) -> Result<u64, StoreError> {
        let store = &self.store;
        let known = self.in_memory(only);
        let mut scan = Scan::default();
        let outcome = store.scan_queue(0, |id, handler, entity| {
            scan.first(&known, only, id, handler, entity);
        });
        let mut state = self.state.lock().expect("not poisoned");
        let last_id = scan.last_id;
        let tail = outcome.and_then(|()| {
            store.scan_queue(last_id, |id, handler, entity| {
                scan.since(&state, only, id, handler, entity);
            })
        });
        if let Err(e) = tail {
            state.refill_failed(known, only);
            return Err(e);
        }
        let start = state.refilled(&known, scan.found, only, scan.last_id);
        drop(state);
        for lane in start {
            self.start_lane(lane);
        }
        Ok(scan.seen)
    }

    /// What a refill begins from: per handler (of `only`, or all), the entities of its
    /// lanes in memory, and room for more.
    fn in_memory(&self, only: Option<&str>) -> InMemory {
        let state = self.state.lock().expect("not poisoned");
        state
            .handlers
            .iter()
            .filter(|(h, _)| only.is_none_or(|o| o == h.as_str()))
            .map(|(h, l)| {
                let room = LANES_PER_HANDLER.saturating_sub(l.lanes.len());
                (h.clone(), (l.lanes.keys().cloned().collect(), room))
            })
            .collect()
    }
}

/// Per handler, the entities of its lanes in memory when a refill began, and the room
/// it had for more.
type InMemory = HashMap<String, (HashSet<String>, usize)>;

/// What a refill's two looks at the store found.
#[derive(Default)]
struct Scan {
    found: HashMap<String, Waiting>,
    /// Stored deliveries the first look saw (of `only`, or all).
    seen: u64,
    /// The last id seen: the second look starts above the first's.
    last_id: u64,
}

/// One handler's deliveries in no lane in memory, as a refill found them.
#[derive(Default)]
struct Waiting {
    lanes: HashMap<String, Vec<u64>>,
    /// Deliveries left in the store only.
    more: bool,
    count: u64,
}

impl Scan {
    /// The first look, without the lock, over one view of the queue: a delivery joins a
    /// new lane while its handler had room when the refill began.
    fn first(
        &mut self,
        known: &InMemory,
        only: Option<&str>,
        id: u64,
        handler: &str,
        entity: &str,
    ) {
        self.last_id = id;
        if only.is_some_and(|o| o != handler) {
            return;
        }
        self.seen += 1;
        let (in_memory, room) = known
            .get(handler)
            .map_or((false, LANES_PER_HANDLER), |(k, room)| {
                (k.contains(entity), *room)
            });
        let f = match self.found.get_mut(handler) {
            Some(f) => f,
            None => self.found.entry(handler.to_owned()).or_default(),
        };
        f.count += 1;
        if in_memory {
            return;
        }
        if let Some(ids) = f.lanes.get_mut(entity) {
            ids.push(id);
        } else if f.lanes.len() < room {
            f.lanes.insert(entity.to_owned(), vec![id]);
        } else {
            f.more = true;
        }
    }

    /// The second look, under the lock, at what was committed since the first: it
    /// completes the new lanes, and starts none.
    fn since(&mut self, state: &State, only: Option<&str>, id: u64, handler: &str, entity: &str) {
        // The queue's depth counts what both looks saw: it is all that is stored while
        // the lock is held.
        self.last_id = id;
        if only.is_some_and(|o| o != handler) {
            return;
        }
        let f = match self.found.get_mut(handler) {
            Some(f) => f,
            None => self.found.entry(handler.to_owned()).or_default(),
        };
        f.count += 1;
        let in_memory = state
            .handlers
            .get(handler)
            .is_some_and(|l| l.lanes.contains_key(entity));
        if in_memory {
            return;
        }
        match f.lanes.get_mut(entity) {
            Some(ids) => ids.push(id),
            None => f.more = true,
        }
    }
}

impl State {
    /// A refill's scan failed: try again later; what was in memory stays as it was.
    fn refill_failed(&mut self, known: InMemory, only: Option<&str>) {
        for (handler, _) in known {
            if let Some(lanes) = self.handlers.get_mut(&handler) {
                lanes.refilling = false;
                lanes.spilled = true;
            }
        }
        if only.is_none() {
            self.resumed = false;
        }
    }

    /// Takes what a refill found into lanes; the lanes to start. `seen_to` is the last
    /// id the refill's two looks saw.
    fn refilled(
        &mut self,
        known: &InMemory,
        mut found: HashMap<String, Waiting>,
        only: Option<&str>,
        seen_to: u64,
    ) -> Vec<Lane> {
        // Handlers with nothing stored come out of the scan as nothing spilled.
        for handler in known.keys() {
            found.entry(handler.clone()).or_default();
        }
        let mut start = Vec::new();
        for (handler, f) in found {
            let lanes = self.handlers.entry(handler.clone()).or_default();
            let mut more = f.more;
            // A lane in memory when the scan began that has finished since may have had
            // deliveries committed behind it that no lane took: look again.
            if let Some((was, _)) = known.get(&handler)
                && was.iter().any(|e| !lanes.lanes.contains_key(e))
            {
                more = true;
            }
            for (entity, ids) in f.lanes {
                match lanes.lanes.get_mut(&entity) {
                    Some(lane) => ids.into_iter().for_each(|id| lane.push(id)),
                    None => {
                        lanes.lanes.insert(entity.clone(), LaneQueue::new(ids));
                        start.push(Lane {
                            handler: handler.clone(),
                            entity,
                        });
                    }
                }
            }
            if only.is_none() {
                lanes.depth = f.count;
                lanes.counted_to = seen_to;
            }
            lanes.spilled = more;
            lanes.refilling = false;
        }
        if only.is_none() {
            self.resumed = true;
        }
        start
    }
}

/// What the current config says about a delivery's handler.
enum Found {
    Ready(Arc<Handler>),
    Disabled,
    Dead(&'static str),
}

fn find(live: &Live, name: &str) -> Found {
    let snapshot = live.load();
    match snapshot.config.handler(name) {
        None => Found::Dead(REMOVED),
        Some(h) if h.stage != Stage::After => Found::Dead(NOT_AFTER),
        Some(h) if !h.enabled => Found::Disabled,
        Some(h) => Found::Ready(h.clone()),
    }
}

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

    /// Shared store: whether the lane's turn is over (it was asked to hand back).
    fn handing_back(&self, lane: &Lane) -> bool {
        let state = self.state.lock().expect("not poisoned");
        state
            .handlers
            .get(&lane.handler)
            .and_then(|lanes| lanes.lanes.get(&lane.entity))
            .is_some_and(|queue| queue.hand_back)
    }

    /// Shared store: `waiting` lanes of `handler` wait for a sidecar while this one has
    /// no room for more: asks as many of its lanes whose turn is over to hand back,
    /// those held longest first. How many it asked.
    fn hand_back(&self, handler: &str, waiting: usize) -> usize {
        let mut state = self.state.lock().expect("not poisoned");
        let Some(lanes) = state.handlers.get_mut(handler) else {
            return 0;
        };
        let already = lanes.lanes.values().filter(|q| q.hand_back).count();
        let mut done: Vec<&mut LaneQueue> = lanes
            .lanes
            .values_mut()
            .filter(|q| !q.hand_back && q.since.elapsed() >= TURN)
            .collect();
        done.sort_by_key(|q| q.since);
        let asked = waiting.saturating_sub(already).min(done.len());
        for queue in done.into_iter().take(asked) {
            queue.hand_back = true;
        }
        drop(state);
        if asked > 0 {
            self.handing.notify_waiters();
        }
        asked
    }

    fn spawn_refill(self: &Arc<Self>, handler: String) {
        let this = self.clone();
        self.tasks.spawn_on(
            async move {
                let scanning = this.clone();
                let scanned =
                    tokio::task::spawn_blocking(move || scanning.refill(Some(&handler))).await;
                match scanned {
                    Ok(Ok(n)) => debug!(deliveries = n, "lanes refilled from the store"),
                    Ok(Err(e)) => {
                        warn!(error = %e, "cannot scan the store for waiting deliveries, trying again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(e) => error!(error = %e, "lane refill failed"),
                }
                this.refill_again();
            },
            &self.runtime,
        );
    }

    /// Starts another scan for every spilled handler with room and no scan running.
    fn refill_again(self: &Arc<Self>) {
        if self.stop.is_cancelled() {
            return;
        }
        let mut due = Vec::new();
        {
            let mut state = self.state.lock().expect("not poisoned");
            for (handler, lanes) in &mut state.handlers {
                if lanes.spilled && !lanes.refilling && lanes.lanes.len() <= LANES_PER_HANDLER / 2 {
                    lanes.refilling = true;
                    due.push(handler.clone());
                }
            }
        }
        for handler in due {
            self.spawn_refill(handler);
        }
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

    /// Shared store: the lane came back with more deliveries after it left memory.
    /// Whether this task goes on with it (else a lane in memory already has them).
    fn take_back(self: &Arc<Self>, lane: &Lane, more: Vec<Queued>, since: Instant) -> bool {
        let mut state = self.state.lock().expect("not poisoned");
        let lanes = state.handlers.entry(lane.handler.clone()).or_default();
        let ids = more.into_iter().map(|q| q.id);
        match lanes.lanes.get_mut(&lane.entity) {
            Some(queue) => {
                ids.for_each(|id| queue.push(id));
                false
            }
            None => {
                lanes
                    .lanes
                    .insert(lane.entity.clone(), LaneQueue::since(ids.collect(), since));
                true
            }
        }
    }

    /// Shared store: the lane is no longer this sidecar's (its lease ran out, or it was
    /// given up): it leaves memory, its task stops, and it is given back if still held.
    fn lost(self: &Arc<Self>, lane: &Lane) {
        {
            let mut state = self.state.lock().expect("not poisoned");
            if let Some(lanes) = state.handlers.get_mut(&lane.handler) {
                lanes.lanes.remove(&lane.entity);
            }
        }
        let (this, lane) = (self.clone(), lane.clone());
        self.tasks.spawn_on(
            async move {
                if let Err(e) = this.store.abandon((&lane.handler, &lane.entity)).await {
                    debug!(error = %e, "cannot give a lane back; its lease runs out");
                }
                // Room for another lane, and this one waits for a sidecar.
                this.wake.notify_one();
            },
            &self.runtime,
        );
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

    /// Sets the after-stage gauges of `/metrics`: queue depth per handler (every
    /// after-stage handler of `config`, and any other with deliveries waiting; 0 for one
    /// that had some before), the oldest waiting delivery's age, the dead letters.
    pub async fn report_metrics(&self, config: &crate::config::Config) {
        let store = &self.store;
        // A queue that cannot be read (the database is down) keeps the figures last
        // read: a backlog does not read as 0 during an outage.
        let depths = match store.queue_depths().await {
            Ok(Some(shared)) => Some(shared.into_iter().collect()),
            Ok(None) => Some(self.depths()),
            Err(e) => {
                warn!(error = %e, "cannot read the queue for metrics; keeping the last figures");
                None
            }
        };
        if let Some(depths) = depths {
            self.report_depths(config, depths).await;
        }
        crate::metrics::store_writable(store.is_open());
        crate::metrics::lanes_in_memory(self.active_lanes());
        match store.oldest_enqueued().await {
            Ok(oldest) => {
                let age = oldest.map_or(0, |at| now_ms().saturating_sub(at));
                crate::metrics::queue_oldest(Duration::from_millis(age));
            }
            Err(e) => warn!(error = %e, "cannot read the queue for metrics"),
        }
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

/// Shared store: frees `lane` once its deliveries up to `last` are settled, trying again
/// while the store fails; what was queued behind them, still held, or `None`.
async fn release(this: &Deliveries, lane: &Lane, last: u64) -> Option<Vec<Queued>> {
    let mut wait = Duration::from_millis(100);
    loop {
        match this
            .store
            .release((&lane.handler, &lane.entity), last)
            .await
        {
            Ok(Release::More(more)) => return Some(more),
            Ok(Release::Free | Release::Lost) => return None,
            Err(e) => {
                warn!(handler = %lane.handler, entity = %lane.entity, error = %e, "cannot free a lane, trying again");
                if !store_backoff(&this.stop, &mut wait).await {
                    return None;
                }
            }
        }
    }
}

/// Shared store: looks for free lanes (none held, or their lease run out) of this
/// sidecar's handlers, as room allows, and starts them; at once after an accept, else
/// with a backoff while none are found. Also tells the other sidecars which handlers
/// this one has, and now and then takes lanes of handlers that no live sidecar has, so
/// that they are dead-lettered as a removed handler's are.
async fn claim_lanes(this: Arc<Deliveries>) {
    let mut idle = CLAIM_MIN;
    let mut announced: Option<Vec<String>> = None;
    let mut orphans_at = Instant::now();
    // Per handler, when this sidecar last asked whether others' lanes wait.
    let mut asked_at: HashMap<String, Instant> = HashMap::new();
    loop {
        let (all, enabled) = {
            let snapshot = this.live.load();
            let after = snapshot
                .config
                .handlers
                .iter()
                .filter(|h| h.stage == Stage::After);
            let all: Vec<String> = after.clone().map(|h| h.name.clone()).collect();
            let enabled: Vec<(String, Option<usize>)> = after
                .filter(|h| h.enabled)
                .map(|h| (h.name.clone(), Some(h.max_concurrency)))
                .collect();
            (all, enabled)
        };
        if announced.as_ref() != Some(&all) {
            this.store.set_handlers(all.clone());
            if this.store.announce().await.is_ok() {
                announced = Some(all.clone());
            }
        }
        let mut found = 0;
        let mut wanted = enabled;
        if orphans_at.elapsed() >= ORPHANS_EVERY {
            orphans_at = Instant::now();
            match this.store.orphans().await {
                Ok(orphans) => wanted.extend(
                    orphans
                        .into_iter()
                        .filter(|h| !all.contains(h))
                        .map(|h| (h, None)),
                ),
                Err(e) => debug!(error = %e, "cannot look for orphaned lanes"),
            }
        }
        for (handler, slots) in wanted {
            let room = this.room(&handler);
            // A handler of ours holds at most HELD_PER_SLOT lanes per slot; one no longer
            // configured (its lanes are dead-lettered) as many as memory allows.
            let room = slots.map_or(room, |n| {
                let held = LANES_PER_HANDLER - room;
                room.min((n * HELD_PER_SLOT).saturating_sub(held))
            });
            // No room: lanes whose turn is over make room for those that wait.
            if room == 0 && slots.is_some() {
                let due = asked_at
                    .get(&handler)
                    .is_none_or(|at| at.elapsed() >= WAITING_EVERY);
                if due {
                    asked_at.insert(handler.clone(), Instant::now());
                    let held = LANES_PER_HANDLER - this.room(&handler);
                    match this.store.waiting(&handler, held).await {
                        Ok(0) => {}
                        Ok(waiting) => {
                            let asked = this.hand_back(&handler, waiting);
                            if asked > 0 {
                                debug!(handler = %handler, waiting, asked, "lanes wait: handing back those whose turn is over");
                            }
                        }
                        Err(e) => {
                            debug!(handler = %handler, error = %e, "cannot ask whether lanes wait")
                        }
                    }
                }
                continue;
            }
            match this.store.claim(&handler, room).await {
                Ok(queued) if !queued.is_empty() => {
                    found += queued.len();
                    this.intake(queued);
                }
                Ok(_) => {}
                Err(e) => debug!(handler = %handler, error = %e, "cannot claim lanes"),
            }
        }
        idle = if found > 0 {
            CLAIM_MIN
        } else {
            (idle * 2).min(CLAIM_MAX)
        };
        tokio::select! {
            biased;
            () = this.stop.cancelled() => return,
            () = this.wake.notified() => {}
            () = tokio::time::sleep(idle) => {}
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

/// Reads delivery `id`, trying again while the store fails; `Ok(None)` when it is not
/// stored (settled already), `Err(())` when provisiond stops.
async fn read_delivery(
    this: &Arc<Deliveries>,
    id: u64,
) -> Result<Option<crate::store::Delivery>, ()> {
    let mut wait = Duration::from_millis(100);
    loop {
        match this.store.delivery(id).await {
            Ok(found) => return Ok(found),
            Err(e) => {
                warn!(delivery = id, error = %e, "cannot read a delivery, trying again");
                if !store_backoff(&this.stop, &mut wait).await {
                    return Err(());
                }
            }
        }
    }
}

/// Works on delivery `id` until it is settled (true) or provisiond stops (false).
async fn deliver(this: &Arc<Deliveries>, lane: &Lane, id: u64) -> bool {
    let mut generations = this.live.subscribe();
    let mut delivery = match read_delivery(this, id).await {
        Ok(Some(d)) => d,
        Ok(None) => return true,
        Err(()) => return false,
    };
    // The body read here goes out with the first attempt when that attempt waits for
    // nothing; a lane that waits (a retry, a slot, a disabled handler) drops it first and
    // reads it again for the attempt: a waiting lane holds no body.
    loop {
        let handler = match turn(this, lane, id, &mut delivery, &mut generations).await {
            Turn::Go(handler) => handler,
            Turn::Again => continue,
            Turn::Done(settled) => return settled,
        };
        let (settle, row) = match attempt(this, lane, id, &handler, &mut delivery).await {
            Ok(attempted) => attempted,
            Err(settled) => return settled,
        };
        let done = !matches!(settle, Settle::Retry { .. });
        if !record(this, lane, id, settle, Some(row)).await {
            return false;
        }
        if done {
            return true;
        }
    }
}

/// Where a delivery stands before an attempt.
enum Turn {
    /// Due, and its handler ready.
    Go(Arc<Handler>),
    /// Something changed (a reload, the wait is over): look again.
    Again,
    /// Settled (true) or provisiond stops (false): the lane's work on it is over.
    Done(bool),
}

/// Looks the delivery's handler up in the current config and waits for its turn: the
/// retry time, or a reload while the handler is disabled. A removed handler
/// dead-letters it. The delivery's body is dropped unless its turn is now.
async fn turn(
    this: &Arc<Deliveries>,
    lane: &Lane,
    id: u64,
    delivery: &mut crate::store::Delivery,
    generations: &mut tokio::sync::watch::Receiver<u64>,
) -> Turn {
    let stop = &this.stop;
    if stop.is_cancelled() {
        return Turn::Done(false);
    }
    let found = find(&this.live, &delivery.handler);
    let wait = Duration::from_millis(delivery.next_at.saturating_sub(now_ms()));
    if let Found::Ready(handler) = &found
        && wait.is_zero()
    {
        return Turn::Go(handler.clone());
    }
    delivery.body = String::new();
    match found {
        // Ready, and not due yet: the wait below, unless the lane's turn is over.
        Found::Ready(_) if this.handing_back(lane) => {
            this.lost(lane);
            return Turn::Done(false);
        }
        Found::Ready(_) => {}
        Found::Dead(reason) => {
            // Shared store: another live sidecar that still has the handler takes it.
            if this.store.is_shared() {
                match this.store.handler_elsewhere(&lane.handler).await {
                    Ok(false) => {}
                    Ok(true) => {
                        info!(handler = %lane.handler, entity = %lane.entity, "handler not in this config but in another sidecar's: lane left to it");
                        this.lost(lane);
                        return Turn::Done(false);
                    }
                    Err(e) => {
                        warn!(handler = %lane.handler, error = %e, "cannot ask which sidecars have the handler, trying again");
                        return tokio::select! {
                            biased;
                            () = stop.cancelled() => Turn::Done(false),
                            () = tokio::time::sleep(Duration::from_secs(1)) => Turn::Again,
                        };
                    }
                }
            }
            warn!(handler = %lane.handler, entity = %lane.entity, delivery = id, reason, "delivery dead-lettered");
            let settle = Settle::Dead {
                attempts: delivery.attempts,
                reason: reason.to_owned(),
                error: None,
            };
            return Turn::Done(record(this, lane, id, settle, None).await);
        }
        // Shared store: the lane goes back, to a sidecar that has the handler enabled;
        // disabled on every one, it waits in the database (none claims it).
        Found::Disabled if this.store.is_shared() => {
            info!(handler = %lane.handler, entity = %lane.entity, "handler disabled here: lane left to the sidecars that have it enabled");
            this.lost(lane);
            return Turn::Done(false);
        }
        Found::Disabled => {
            debug!(handler = %lane.handler, delivery = id, "handler disabled, delivery waits");
            return tokio::select! {
                biased;
                () = stop.cancelled() => Turn::Done(false),
                () = changed(generations) => Turn::Again,
            };
        }
    }
    tokio::select! {
        biased;
        () = stop.cancelled() => Turn::Done(false),
        // A reload: look at the handler again, then wait what is left.
        () = changed(generations) => Turn::Again,
        // Lanes were asked to hand back: this one may be among them.
        () = this.handing.notified() => Turn::Again,
        () = tokio::time::sleep(wait) => Turn::Again,
    }
}

/// Makes one attempt of delivery `id` in one of the handler's slots, and says how to
/// settle it, with its execution log row. `Err` as in [`Turn::Done`].
async fn attempt(
    this: &Arc<Deliveries>,
    lane: &Lane,
    id: u64,
    handler: &Handler,
    delivery: &mut crate::store::Delivery,
) -> Result<(Settle, Execution), bool> {
    let slot = match handler.slots.clone().try_acquire_owned() {
        Ok(slot) => slot,
        Err(_) => {
            // No body while waiting for a slot.
            delivery.body = String::new();
            tokio::select! {
                biased;
                () = this.stop.cancelled() => return Err(false),
                slot = handler.slots.clone().acquire_owned() => slot.expect("handler slots are never closed"),
            }
        }
    };
    // Shared store: only while the lane's lease is surely still ours, so that a sidecar
    // cut off from the database does not deliver what another has taken over.
    if !this.store.holds((&lane.handler, &lane.entity)) {
        warn!(handler = %lane.handler, entity = %lane.entity, delivery = id, "lane's lease not renewed in time, left to other sidecars");
        this.lost(lane);
        return Err(false);
    }
    let body = if delivery.body.is_empty() {
        match read_delivery(this, id).await {
            Ok(Some(d)) => d.body,
            Ok(None) => return Err(true),
            Err(()) => return Err(false),
        }
    } else {
        std::mem::take(&mut delivery.body)
    };
    let attempt = delivery.attempts + 1;
    let at = SystemTime::now();
    let started = Instant::now();
    let result = this
        .caller
        .call_in_slot(Call {
            handler,
            event: &delivery.event,
            object_id: &delivery.object_id,
            body: Bytes::from(body),
            attempt,
            message_id: &delivery.message_id,
            timeout: handler.timeout,
        })
        .await;
    drop(slot);
    let duration = started.elapsed();
    let mut call = CallRecord {
        at,
        handler: handler.name.clone(),
        stage: Stage::After,
        attempt,
        outcome: CallOutcome::Delivered,
        duration,
        code: result.as_ref().ok().map(crate::handlers::Reply::code),
        excerpt: result.as_ref().map(|r| r.excerpt()).unwrap_or_default(),
        error: None,
    };
    let settle = settlement(lane, id, handler, retry::judge(&result), &mut call);
    crate::metrics::handler_call(&handler.name, "after", call.outcome, duration);
    if let Settle::Retry {
        attempts, next_at, ..
    } = &settle
    {
        delivery.attempts = *attempts;
        delivery.next_at = *next_at;
    }
    let row = call
        .into_execution(&delivery.event, &delivery.object_id, Some(id))
        .event_id(delivery.event_id.clone());
    Ok((settle, row))
}

/// What an attempt's verdict means for the delivery; fills in the call's outcome and
/// error, and logs it.
fn settlement(
    lane: &Lane,
    id: u64,
    handler: &Handler,
    verdict: Verdict,
    call: &mut CallRecord,
) -> Settle {
    let (name, entity, attempt, duration) =
        (&lane.handler, &lane.entity, call.attempt, call.duration);
    match verdict {
        Verdict::Delivered => {
            info!(handler = %name, entity = %entity, delivery = id, attempt, ?duration, "delivered");
            Settle::Delivered
        }
        Verdict::Gone { reason } => {
            warn!(handler = %name, entity = %entity, delivery = id, attempt, %reason, "delivery dead-lettered");
            call.outcome = CallOutcome::Dead;
            call.error = Some(reason.clone());
            Settle::Dead {
                attempts: attempt,
                reason,
                error: None,
            }
        }
        Verdict::Retry { error, .. } if retry::exhausted(&handler.retry, attempt) => {
            warn!(handler = %name, entity = %entity, delivery = id, attempt, %error, "delivery failed, attempts exhausted, dead-lettered");
            call.outcome = CallOutcome::Dead;
            call.error = Some(error.clone());
            Settle::Dead {
                attempts: attempt,
                reason: format!(
                    "gave up after {attempt} attempt{}; last error: {error}",
                    if attempt == 1 { "" } else { "s" }
                ),
                error: Some(error),
            }
        }
        Verdict::Retry { error, retry_after } => {
            let wait = retry::delay(&handler.retry, attempt, retry_after, fastrand::f64());
            warn!(handler = %name, entity = %entity, delivery = id, attempt, %error, retry_in = ?wait, "delivery failed, retrying");
            call.outcome = CallOutcome::Failed;
            call.error = Some(error.clone());
            let next_at =
                now_ms().saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
            Settle::Retry {
                attempts: attempt,
                next_at,
                error,
            }
        }
    }
}

/// Stores how an attempt ended, trying again while the store fails: the lane does not
/// move on before its delivery is settled in the store (that would break its order, and
/// leave the delivery stored and unattempted). False when provisiond stops first: the
/// stored state is then older than the truth, which at worst repeats an attempt after a
/// restart (deliveries are at least once).
async fn record(
    this: &Arc<Deliveries>,
    lane: &Lane,
    id: u64,
    settle: Settle,
    row: Option<Execution>,
) -> bool {
    let gone = !matches!(settle, Settle::Retry { .. });
    let mut wait = Duration::from_millis(100);
    loop {
        match this
            .store
            .settle(
                id,
                (&lane.handler, &lane.entity),
                settle.clone(),
                row.clone(),
            )
            .await
        {
            Ok(()) => {
                if gone {
                    this.settled(&lane.handler);
                }
                return true;
            }
            Err(StoreError::Lost) => {
                warn!(handler = %lane.handler, entity = %lane.entity, delivery = id, "lane taken over by another sidecar; this attempt is not recorded");
                this.lost(lane);
                return false;
            }
            Err(e) => {
                error!(delivery = id, error = %e, "cannot record a delivery attempt, trying again");
                if !store_backoff(&this.stop, &mut wait).await {
                    return false;
                }
            }
        }
    }
}

/// Resolves on the next published config; never when no more can come.
async fn changed(generations: &mut tokio::sync::watch::Receiver<u64>) {
    if generations.changed().await.is_err() {
        std::future::pending::<()>().await;
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
}
