//! The shared store's lanes: claimed as they come free (at most [`HELD_PER_SLOT`] per
//! slot of a handler's `max_concurrency`), freed once delivered, and handed back when
//! their [`TURN`] is over and other lanes wait.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::{Deliveries, LANES_PER_HANDLER, Lane, LaneQueue, store_backoff};
use crate::config::Stage;
use crate::store::{Queued, Release};

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
/// Shared store: how soon free lanes are looked for again after a look that found some,
/// and at most while none are found.
const CLAIM_MIN: Duration = Duration::from_millis(50);
const CLAIM_MAX: Duration = Duration::from_secs(1);
/// Shared store: how often lanes of handlers no live sidecar has are looked for.
const ORPHANS_EVERY: Duration = Duration::from_secs(5);

/// Shared store: frees `lane` once its deliveries up to `last` are settled, trying again
/// while the store fails; what was queued behind them, still held, or `None`.
pub(super) async fn release(this: &Deliveries, lane: &Lane, last: u64) -> Option<Vec<Queued>> {
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
pub(super) async fn claim_lanes(this: Arc<Deliveries>) {
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

impl Deliveries {
    /// Shared store: whether the lane's turn is over (it was asked to hand back).
    pub(super) fn handing_back(&self, lane: &Lane) -> bool {
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

    /// Shared store: the lane came back with more deliveries after it left memory.
    /// Whether this task goes on with it (else a lane in memory already has them).
    pub(super) fn take_back(
        self: &Arc<Self>,
        lane: &Lane,
        more: Vec<Queued>,
        since: Instant,
    ) -> bool {
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
    pub(super) fn lost(self: &Arc<Self>, lane: &Lane) {
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
}
