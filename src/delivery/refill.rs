//! A handler's lanes beyond [`LANES_PER_HANDLER`](super::LANES_PER_HANDLER) stay in
//! the store (the handler is *spilled*); a scan of the queue brings the next ones into
//! memory when there is room, at the start and when half its lanes are done.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, error, warn};

use super::{Deliveries, LANES_PER_HANDLER, Lane, LaneQueue, State};
use crate::store::StoreError;

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

impl Deliveries {
    /// Brings stored deliveries that are in no lane in memory into lanes, up to the bound
    /// per handler: of every handler at the start (`only` = `None`), else of one spilled
    /// handler. Returns how many stored deliveries the scan saw.
    ///
    /// The scan runs without the lock over one view of the queue; then, under the lock,
    /// a second look at what was committed since completes the new lanes, and ids the
    /// writer hands over later are taken only when above a lane's last.
    pub(super) fn refill(self: &Arc<Self>, only: Option<&str>) -> Result<u64, StoreError> {
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

    pub(super) fn spawn_refill(self: &Arc<Self>, handler: String) {
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
    pub(super) fn refill_again(self: &Arc<Self>) {
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
