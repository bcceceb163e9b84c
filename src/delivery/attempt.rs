//! One delivery on its lane: read from the store, looked up in the current snapshot,
//! sent when a slot is free, and settled (delivered, retried later, or dead-lettered),
//! with its execution log row.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tracing::{debug, error, info, warn};

use super::retry::{self, Verdict};
use super::{ABSENT_AT_START, Deliveries, Lane, NOT_AFTER, REMOVED, store_backoff};
use crate::config::{Handler, Stage};
use crate::dispatch::{CallRecord, Live};
use crate::handlers::Call;
use crate::outcome::CallOutcome;
use crate::store::{Execution, Settle, StoreError, now_ms};

/// What the current config says about a delivery's handler.
enum Found {
    Ready(Arc<Handler>),
    Disabled,
    Dead(&'static str),
}

fn find(live: &Live, name: &str) -> Found {
    let snapshot = live.load();
    match snapshot.config.handler(name) {
        None if live.had(name) => Found::Dead(REMOVED),
        None => Found::Dead(ABSENT_AT_START),
        Some(h) if h.stage != Stage::After => Found::Dead(NOT_AFTER),
        Some(h) if !h.enabled => Found::Disabled,
        Some(h) => Found::Ready(h.clone()),
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
pub(super) async fn deliver(this: &Arc<Deliveries>, lane: &Lane, id: u64) -> bool {
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
        let (settle, row) =
            match attempt(this, lane, id, &handler, &mut delivery, &mut generations).await {
                Ok(attempted) => attempted,
                Err(Turn::Done(settled)) => return settled,
                Err(_) => continue,
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
    if let Found::Ready(handler) = &found {
        // No wait is longer than the current `max_backoff`: a reload (or a restart) that
        // lowered it shortens a wait begun under the old one.
        let longest = u64::try_from(handler.retry.max_backoff.as_millis()).unwrap_or(u64::MAX);
        delivery.next_at = delivery.next_at.min(now_ms().saturating_add(longest));
    }
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
        Found::Dead(mut reason) => {
            // Shared store: another live sidecar that still has the handler takes it;
            // when none has, the deliveries wait a lease for one that has just added it.
            if this.store.is_shared() {
                match this.store.handler_elsewhere(&lane.handler).await {
                    Ok(false) => {
                        // Held meanwhile: looked at again once, when the wait is over
                        // (a query a second for each of many lanes would load the
                        // database for nothing).
                        let wait = this.unclaimed_for(&lane.handler);
                        if !wait.is_zero() {
                            return tokio::select! {
                                biased;
                                () = stop.cancelled() => Turn::Done(false),
                                () = tokio::time::sleep(wait) => Turn::Again,
                            };
                        }
                        if reason == REMOVED || reason == ABSENT_AT_START {
                            reason = this.unclaimed_reason(&lane.handler);
                        }
                    }
                    Ok(true) => {
                        this.claimed(&lane.handler);
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
            warn!(handler = %lane.handler, entity = %lane.entity, delivery = id, event_id = delivery.event_id.as_deref().unwrap_or_default(), reason, "delivery dead-lettered");
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
/// settle it, with its execution log row. `Err` is [`Turn::Done`], or [`Turn::Again`]
/// when a reload came while the delivery waited for a slot: the handler it waited for
/// may be gone, disabled or changed, so it is looked up again.
async fn attempt(
    this: &Arc<Deliveries>,
    lane: &Lane,
    id: u64,
    handler: &Handler,
    delivery: &mut crate::store::Delivery,
    generations: &mut tokio::sync::watch::Receiver<u64>,
) -> Result<(Settle, Execution), Turn> {
    let slot = match handler.slots.clone().try_acquire_owned() {
        Ok(slot) => slot,
        Err(_) => {
            // No body while waiting for a slot.
            delivery.body = String::new();
            tokio::select! {
                biased;
                () = this.stop.cancelled() => return Err(Turn::Done(false)),
                () = changed(generations) => return Err(Turn::Again),
                slot = handler.slots.clone().acquire_owned() => slot.expect("handler slots are never closed"),
            }
        }
    };
    // Shared store: only while the lane's lease is surely still ours, so that a sidecar
    // cut off from the database does not deliver what another has taken over.
    if !this.store.holds((&lane.handler, &lane.entity)) {
        warn!(handler = %lane.handler, entity = %lane.entity, delivery = id, "lane's lease not renewed in time, left to other sidecars");
        this.lost(lane);
        return Err(Turn::Done(false));
    }
    let body = if delivery.body.is_empty() {
        match read_delivery(this, id).await {
            Ok(Some(d)) => d.body,
            Ok(None) => return Err(Turn::Done(true)),
            Err(()) => return Err(Turn::Done(false)),
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
        called: true,
        code: result.as_ref().ok().map(crate::handlers::Reply::code),
        excerpt: result
            .as_ref()
            .map(|r| handler.hidden.mask(r.excerpt()))
            .unwrap_or_default(),
        error: None,
    };
    let verdict = retry::judge(&result).masked(&handler.hidden);
    let event_id = delivery.event_id.as_deref().unwrap_or_default();
    let settle = settlement(lane, id, event_id, handler, verdict, &mut call);
    crate::metrics::handler_call(&call);
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
    event_id: &str,
    handler: &Handler,
    verdict: Verdict,
    call: &mut CallRecord,
) -> Settle {
    let (name, entity, attempt, duration) = (
        lane.handler.as_str(),
        lane.entity.as_str(),
        call.attempt,
        call.duration,
    );
    match verdict {
        Verdict::Delivered => {
            info!(
                handler = name,
                entity,
                delivery = id,
                event_id,
                attempt,
                ?duration,
                "delivered"
            );
            Settle::Delivered
        }
        Verdict::Gone { reason } => {
            warn!(handler = name, entity, delivery = id, event_id, attempt, %reason, "delivery dead-lettered");
            call.outcome = CallOutcome::Dead;
            call.error = Some(reason.clone());
            Settle::Dead {
                attempts: attempt,
                reason,
                error: None,
            }
        }
        Verdict::Retry { error, .. } if retry::exhausted(&handler.retry, attempt) => {
            warn!(handler = name, entity, delivery = id, event_id, attempt, %error, "delivery failed, attempts exhausted, dead-lettered");
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
            warn!(handler = name, entity, delivery = id, event_id, attempt, %error, retry_in = ?wait, "delivery failed, retrying");
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
