//! The after stage's workers: stored deliveries out to their handlers, in order per
//! entity, with retries, until delivered or dead-lettered.
//!
//! A *lane* is one handler and one entity (`crm` + `clients/12`). Each lane with work has
//! one task that takes its deliveries strictly in arrival order (the store's ids), and
//! works on one until it is settled: delivered, or moved to the dead letters. While it
//! waits for a retry, the lane's later deliveries wait behind it; other lanes go on. Calls
//! of one handler at once are bounded by its `max_concurrency` slots, which a lane waits
//! for without a time limit (waiting for a slot is not a failed attempt).
//!
//! Every attempt looks its handler up in the *current* snapshot, so a reload's changes
//! (URL, timeout, retry) apply to deliveries already queued. A handler a reload removed
//! (or turned into a before-stage one) sends its queued deliveries to the dead letters;
//! a disabled handler's deliveries wait, stored, until it is enabled again.

pub mod retry;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::config::{Handler, Stage};
use crate::dispatch::CallRecord;
use crate::handlers::Call;
use crate::server::App;
use crate::store::{Delivery, Execution, Settle, now_ms};
use retry::Verdict;

/// The dead-letter reason of a delivery whose handler a reload removed.
pub const REMOVED: &str = "handler removed by a config reload";
/// ... or turned into a before-stage handler.
pub const NOT_AFTER: &str =
    "handler is no longer an after-stage handler (changed by a config reload)";

/// One handler and one entity: the unit of ordering.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lane {
    pub handler: String,
    pub entity: String,
}

/// The lanes with work, and the tasks working them.
#[derive(Default)]
pub struct Deliveries {
    /// Delivery ids not yet started, per lane, in arrival order. A lane is in the map
    /// exactly while its task runs.
    lanes: Mutex<HashMap<Lane, VecDeque<u64>>>,
    stop: CancellationToken,
    tasks: TaskTracker,
    /// Handlers whose queue depth `/metrics` has shown, so that an emptied one shows 0.
    reported: Mutex<std::collections::HashSet<String>>,
}

impl Deliveries {
    pub fn new() -> Self {
        Self::default()
    }

    /// Hands stored deliveries to their lanes, starting a task for a lane without one.
    /// Ids must come in arrival order.
    pub fn submit(&self, app: &Arc<App>, stored: impl IntoIterator<Item = (u64, Lane)>) {
        if self.stop.is_cancelled() {
            // Stopping: they stay stored for the next start.
            return;
        }
        let mut lanes = self.lanes.lock().expect("not poisoned");
        for (id, lane) in stored {
            match lanes.get_mut(&lane) {
                Some(queue) => queue.push_back(id),
                None => {
                    lanes.insert(lane.clone(), VecDeque::from([id]));
                    self.tasks.spawn(run_lane(app.clone(), lane));
                }
            }
        }
    }

    /// Picks up what the store holds from before this start.
    pub fn resume(&self, app: &Arc<App>) -> Result<usize, crate::store::StoreError> {
        let pending = app.store.pending()?;
        let n = pending.len();
        self.submit(
            app,
            pending
                .into_iter()
                .map(|(id, handler, entity)| (id, Lane { handler, entity })),
        );
        Ok(n)
    }

    /// Lanes with work right now.
    pub fn active_lanes(&self) -> usize {
        self.lanes.lock().expect("not poisoned").len()
    }

    /// Deliveries waiting per handler: each lane's queue and the one it works on.
    pub fn depths(&self) -> HashMap<String, u64> {
        let lanes = self.lanes.lock().expect("not poisoned");
        let mut depths: HashMap<String, u64> = HashMap::new();
        for (lane, queue) in lanes.iter() {
            *depths.entry(lane.handler.clone()).or_default() += queue.len() as u64 + 1;
        }
        depths
    }

    /// Sets the after-stage gauges of `/metrics`: queue depth per handler (every
    /// after-stage handler of `config`, and any other with deliveries waiting; 0 for one
    /// that had some before), the oldest waiting delivery's age, the dead letters.
    pub fn report_metrics(&self, store: &crate::store::Store, config: &crate::config::Config) {
        let mut depths = self.depths();
        for h in config.handlers.iter().filter(|h| h.stage == Stage::After) {
            depths.entry(h.name.clone()).or_default();
        }
        {
            let mut reported = self.reported.lock().expect("not poisoned");
            for gone in reported.iter().filter(|h| !depths.contains_key(*h)) {
                crate::metrics::queue(gone, 0);
            }
            reported.clear();
            for (handler, depth) in &depths {
                crate::metrics::queue(handler, *depth);
                reported.insert(handler.clone());
            }
        }
        match store.oldest_enqueued() {
            Ok(oldest) => {
                let age = oldest.map_or(0, |at| now_ms().saturating_sub(at));
                crate::metrics::queue_oldest(Duration::from_millis(age));
            }
            Err(e) => warn!(error = %e, "cannot read the queue for metrics"),
        }
        match store.dead_letter_count() {
            Ok(n) => crate::metrics::dead_letters(n),
            Err(e) => warn!(error = %e, "cannot count the dead letters for metrics"),
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

async fn run_lane(app: Arc<App>, lane: Lane) {
    let this = &app.deliveries;
    loop {
        let next = {
            let mut lanes = this.lanes.lock().expect("not poisoned");
            match lanes.get_mut(&lane).and_then(VecDeque::pop_front) {
                Some(id) => id,
                None => {
                    lanes.remove(&lane);
                    return;
                }
            }
        };
        if !deliver(&app, &lane, next).await {
            return;
        }
    }
}

/// What the current config says about a delivery's handler.
enum Found {
    Ready(Arc<Handler>),
    Disabled,
    Dead(&'static str),
}

fn find(app: &App, name: &str) -> Found {
    let snapshot = app.snapshot.load();
    match snapshot.config.handler(name) {
        None => Found::Dead(REMOVED),
        Some(h) if h.stage != Stage::After => Found::Dead(NOT_AFTER),
        Some(h) if !h.enabled => Found::Disabled,
        Some(h) => Found::Ready(h.clone()),
    }
}

/// Works on delivery `id` until it is settled (true) or provisiond stops (false).
async fn deliver(app: &Arc<App>, lane: &Lane, id: u64) -> bool {
    let stop = &app.deliveries.stop;
    let mut generations = app.subscribe();
    let mut delivery = match app.store.delivery(id) {
        Ok(Some(d)) => d,
        Ok(None) => return true,
        Err(e) => {
            // Left in the store; the next start tries again.
            error!(delivery = id, error = %e, "cannot read a delivery, skipped until restart");
            return true;
        }
    };
    loop {
        if stop.is_cancelled() {
            return false;
        }
        let handler = match find(app, &delivery.handler) {
            Found::Ready(h) => h,
            Found::Dead(reason) => {
                warn!(handler = %lane.handler, entity = %lane.entity, delivery = id, reason, "delivery dead-lettered");
                let settle = Settle::Dead {
                    attempts: delivery.attempts,
                    reason: reason.to_owned(),
                    error: None,
                };
                record(app, id, settle, None).await;
                return true;
            }
            Found::Disabled => {
                debug!(handler = %lane.handler, delivery = id, "handler disabled, delivery waits");
                tokio::select! {
                    biased;
                    () = stop.cancelled() => return false,
                    () = changed(&mut generations) => continue,
                }
            }
        };
        let wait = Duration::from_millis(delivery.next_at.saturating_sub(now_ms()));
        if !wait.is_zero() {
            tokio::select! {
                biased;
                () = stop.cancelled() => return false,
                // A reload: look at the handler again, then wait what is left.
                () = changed(&mut generations) => {}
                () = tokio::time::sleep(wait) => {}
            }
            continue;
        }
        let slot = tokio::select! {
            biased;
            () = stop.cancelled() => return false,
            slot = handler.slots.clone().acquire_owned() => slot.expect("handler slots are never closed"),
        };
        let attempt = delivery.attempts + 1;
        let at = SystemTime::now();
        let started = Instant::now();
        let result = app
            .caller
            .call_in_slot(Call {
                handler: &handler,
                event: &delivery.event,
                object_id: &delivery.object_id,
                body: Bytes::from(delivery.body.clone()),
                attempt,
                message_id: &delivery.message_id,
                timeout: handler.timeout,
            })
            .await;
        drop(slot);
        let duration = started.elapsed();
        let verdict = retry::judge(&result);
        let outcome = match &verdict {
            Verdict::Delivered => "delivered",
            Verdict::Gone { .. } => "dead",
            Verdict::Retry { .. } if retry::exhausted(&handler.retry, attempt) => "dead",
            Verdict::Retry { .. } => "failed",
        };
        crate::metrics::handler_call(&handler.name, "after", outcome, duration);
        let mut call = CallRecord {
            at,
            handler: handler.name.clone(),
            stage: Stage::After,
            attempt,
            outcome: "delivered",
            duration,
            code: result.as_ref().ok().map(crate::handlers::Reply::code),
            excerpt: result.as_ref().map(|r| r.excerpt()).unwrap_or_default(),
            error: None,
        };
        let fields = (&lane.handler, &lane.entity, id, attempt);
        let settle = match verdict {
            Verdict::Delivered => {
                info!(handler = %fields.0, entity = %fields.1, delivery = id, attempt, ?duration, "delivered");
                Settle::Delivered
            }
            Verdict::Gone { reason } => {
                warn!(handler = %fields.0, entity = %fields.1, delivery = id, attempt, %reason, "delivery dead-lettered");
                call.outcome = "dead";
                call.error = Some(reason.clone());
                Settle::Dead {
                    attempts: attempt,
                    reason,
                    error: None,
                }
            }
            Verdict::Retry { error, .. } if retry::exhausted(&handler.retry, attempt) => {
                warn!(handler = %fields.0, entity = %fields.1, delivery = id, attempt, %error, "delivery failed, attempts exhausted, dead-lettered");
                call.outcome = "dead";
                call.error = Some(error.clone());
                Settle::Dead {
                    attempts: attempt,
                    reason: format!("gave up after {attempt} attempts; last error: {error}"),
                    error: Some(error),
                }
            }
            Verdict::Retry { error, retry_after } => {
                let wait = retry::delay(&handler.retry, attempt, retry_after, fastrand::f64());
                warn!(handler = %fields.0, entity = %fields.1, delivery = id, attempt, %error, retry_in = ?wait, "delivery failed, retrying");
                call.outcome = "failed";
                call.error = Some(error.clone());
                let next_at =
                    now_ms().saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
                delivery.attempts = attempt;
                delivery.next_at = next_at;
                Settle::Retry {
                    attempts: attempt,
                    next_at,
                    error,
                }
            }
        };
        let done = !matches!(settle, Settle::Retry { .. });
        let row = Execution::from_call(call, &delivery.event, &delivery.object_id, Some(id))
            .event_id(delivery.event_id.clone());
        record(app, id, settle, Some(row)).await;
        if done {
            return true;
        }
    }
}

/// Stores how an attempt ended. A failure is logged and otherwise ignored: the delivery's
/// stored state is then older than the truth, which at worst repeats an attempt after a
/// restart (deliveries are at least once).
async fn record(app: &App, id: u64, settle: Settle, row: Option<Execution>) {
    if let Err(e) = app.store.settle(id, settle, row).await {
        error!(delivery = id, error = %e, "cannot record a delivery attempt");
    }
}

/// Resolves on the next published config; never when no more can come.
async fn changed(generations: &mut tokio::sync::watch::Receiver<u64>) {
    if generations.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl Delivery {
    /// The lane this delivery goes out in.
    pub fn lane(&self) -> Lane {
        Lane {
            handler: self.handler.clone(),
            entity: self.entity.clone(),
        }
    }
}
