//! Prometheus metrics: the names, one place that records each kind, and the recorder.
//!
//! The recorder is process-global (the `metrics` crate's facade), installed once by
//! [`install`]; code records through the small functions here so that names and labels
//! are spelled in one place. Labels have bounded values: event names outside the
//! catalogue and `[events] extra` are counted as `other`.

use std::collections::HashMap;
use std::sync::{LazyLock, OnceLock, RwLock};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::config::Config;
use crate::dispatch::CallRecord;
use crate::outcome::{CallOutcome, EventOutcome};

pub(crate) const EVENTS: &str = "provisiond_events_total";
pub(crate) const EVENTS_IN_FLIGHT: &str = "provisiond_events_in_flight";
pub(crate) const BEFORE_CHAIN_SECONDS: &str = "provisiond_before_chain_duration_seconds";
pub(crate) const HANDLER_CALLS: &str = "provisiond_handler_calls_total";
pub(crate) const HANDLER_SECONDS: &str = "provisiond_handler_duration_seconds";
pub(crate) const QUEUE_DEPTH: &str = "provisiond_after_queue_depth";
pub(crate) const HANDLER_OLDEST_SECONDS: &str = "provisiond_after_handler_oldest_age_seconds";
pub(crate) const LANES_IN_MEMORY: &str = "provisiond_after_lanes_in_memory";
pub(crate) const QUEUE_OLDEST_SECONDS: &str = "provisiond_after_queue_oldest_age_seconds";
pub(crate) const DEAD_LETTERS: &str = "provisiond_dead_letters";
pub(crate) const EXECUTION_LOG_DROPPED: &str = "provisiond_execution_log_dropped_total";
pub(crate) const LOG_LINES_DROPPED: &str = "provisiond_log_lines_dropped_total";
pub(crate) const RELOADS: &str = "provisiond_reloads_total";
pub(crate) const STORE_UNREADABLE_ROWS: &str = "provisiond_store_unreadable_rows_total";
pub(crate) const STORE_WRITABLE: &str = "provisiond_store_writable";
pub(crate) const STORE_COMMIT_SECONDS: &str = "provisiond_store_commit_duration_seconds";
pub(crate) const CONFIG_GENERATION: &str = "provisiond_config_generation";
pub(crate) const BUILD_INFO: &str = "provisiond_build_info";
pub(crate) const RESTART_NEEDED: &str = "provisiond_restart_needed_settings";
pub(crate) const STORE_INFO: &str = "provisiond_store_info";

/// Latency buckets, in seconds: from 100 µs to the longest sensible handler timeout.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// Installs the global recorder (once; later calls return the same handle) and
/// describes every metric.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .expect("static buckets are valid")
                .install_recorder()
                .expect("the metrics recorder is installed once");
            describe();
            zero();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(EVENTS, "Events received, by event name and outcome.");
    describe_gauge!(EVENTS_IN_FLIGHT, "Events being handled now.");
    describe_histogram!(
        BEFORE_CHAIN_SECONDS,
        metrics::Unit::Seconds,
        "Time the before-stage chain took, per event."
    );
    describe_counter!(
        HANDLER_CALLS,
        "Handler calls, by handler, stage and outcome."
    );
    describe_histogram!(
        HANDLER_SECONDS,
        metrics::Unit::Seconds,
        "Time one handler call took, by handler and stage."
    );
    describe_gauge!(QUEUE_DEPTH, "After-stage deliveries waiting, by handler.");
    describe_gauge!(
        QUEUE_OLDEST_SECONDS,
        "Age of the oldest waiting after-stage delivery, in seconds."
    );
    describe_gauge!(DEAD_LETTERS, "Deliveries in the dead letters.");
    describe_gauge!(
        HANDLER_OLDEST_SECONDS,
        "Age of the oldest after-stage delivery in this sidecar's lanes (waiting, being tried, \
         or held while its handler is disabled), by handler, in seconds."
    );
    describe_gauge!(
        LANES_IN_MEMORY,
        "After-stage lanes (handler and entity) held in memory; the rest wait in the store."
    );
    describe_counter!(
        EXECUTION_LOG_DROPPED,
        "Execution log rows dropped because the store's writer was behind."
    );
    describe_counter!(
        LOG_LINES_DROPPED,
        "Log lines dropped because stderr was not taking them fast enough."
    );
    describe_counter!(RELOADS, "Config reloads, by result.");
    describe_counter!(
        STORE_UNREADABLE_ROWS,
        "Unreadable queued rows moved to the dead letters when the store was opened."
    );
    describe_gauge!(
        STORE_WRITABLE,
        "1 while the store takes writes, 0 while they fail (a full disk, an I/O error)."
    );
    describe_histogram!(
        STORE_COMMIT_SECONDS,
        metrics::Unit::Seconds,
        "Time the store file's writer took for one batch of writes, applied and committed, \
         by durability (true: fsynced, as every batch with an accept is)."
    );
    describe_gauge!(CONFIG_GENERATION, "Generation of the live config.");
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the labels say which build runs (version)."
    );
    describe_gauge!(
        STORE_INFO,
        "1 for the store this sidecar uses (0 for one it used before): backend (file or \
         postgres) and store, the same for every sidecar that shares a database."
    );
    describe_gauge!(
        RESTART_NEEDED,
        "Settings changed in the config file that keep their running values until a restart."
    );
}

/// Makes the counters an operator alerts on exist from the start, at 0: `increase()`
/// over a series that appears already at 1 would miss the first bad push after a start.
fn zero() {
    for result in ["applied", "unchanged", "rejected"] {
        counter!(RELOADS, "result" => result).absolute(0);
    }
    counter!(EXECUTION_LOG_DROPPED).absolute(0);
    // Refusals that come before any event name is read: a wrong token, a full store.
    for outcome in [EventOutcome::Unauthorized, EventOutcome::Unavailable] {
        counter!(EVENTS, "event" => "unparsed", "outcome" => outcome.as_str()).absolute(0);
    }
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    gauge!(RESTART_NEEDED).set(0.0);
    counter!(LOG_LINES_DROPPED).absolute(0);
    // A panel of it reads 0 after a start, not "no data".
    gauge!(EVENTS_IN_FLIGHT).set(0.0);
    // The latency panel and quantiles have a series (empty) before the first event.
    let _ = histogram!(BEFORE_CHAIN_SECONDS);
}

/// One batch of the store file's writer, applied and committed; `durable` when fsynced.
pub(crate) fn store_commit(durable: bool, took: Duration) {
    static KEPT: LazyLock<[Histogram; 2]> = LazyLock::new(|| {
        [false, true].map(|durable| {
            histogram!(STORE_COMMIT_SECONDS, "durable" => if durable { "true" } else { "false" })
        })
    });
    KEPT[usize::from(durable)].record(took.as_secs_f64());
}

/// The label for an event name: the name when the config knows it, else `other`.
pub(crate) fn event_label(name: &str, known: bool) -> String {
    if known {
        name.to_owned()
    } else {
        "other".to_owned()
    }
}

// Every event records several metrics. Building a metric's key (labels, allocations, a
// registry lookup) costs more than the increment, so the handles are kept, per label
// set, the first time they are used: later events only find them and add.

/// Handles kept by a string label and a `&'static str` one.
type Handles<T> = RwLock<HashMap<String, HashMap<&'static str, T>>>;

/// The handle for `(first, second)`, made by `make` on first use.
fn kept<T: Clone>(
    handles: &Handles<T>,
    first: &str,
    second: &'static str,
    make: impl FnOnce() -> T,
) -> T {
    if let Some(found) = handles
        .read()
        .expect("metric handles lock")
        .get(first)
        .and_then(|inner| inner.get(second))
    {
        return found.clone();
    }
    let made = make();
    handles
        .write()
        .expect("metric handles lock")
        .entry(first.to_owned())
        .or_default()
        .insert(second, made.clone());
    made
}

pub(crate) fn event(event: String, outcome: EventOutcome) {
    let outcome = outcome.as_str();
    static KEPT: LazyLock<Handles<Counter>> = LazyLock::new(Default::default);
    kept(
        &KEPT,
        &event,
        outcome,
        || counter!(EVENTS, "event" => event.clone(), "outcome" => outcome),
    )
    .increment(1);
}

pub(crate) fn before_chain(duration: Duration) {
    static KEPT: LazyLock<Histogram> = LazyLock::new(|| histogram!(BEFORE_CHAIN_SECONDS));
    KEPT.record(duration.as_secs_f64());
}

/// One handler's metrics in one stage: a call counter per outcome and the latencies.
#[derive(Clone)]
struct Calls {
    by_outcome: Vec<(&'static str, Counter)>,
    time: Histogram,
}

impl Calls {
    /// Registers every outcome of the stage at once, so that each series exists (at 0)
    /// from the handler's first call.
    fn new(handler: &str, stage: &'static str) -> Self {
        let outcomes: &[CallOutcome] = match stage {
            "before" => &CallOutcome::BEFORE,
            _ => &CallOutcome::AFTER,
        };
        Self {
            by_outcome: outcomes
                .iter()
                .map(|o| (o.as_str(), call_counter(handler, stage, o.as_str())))
                .collect(),
            time: histogram!(HANDLER_SECONDS, "handler" => handler.to_owned(), "stage" => stage),
        }
    }
}

fn call_counter(handler: &str, stage: &'static str, outcome: &'static str) -> Counter {
    counter!(
        HANDLER_CALLS,
        "handler" => handler.to_owned(), "stage" => stage, "outcome" => outcome
    )
}

/// Every handler's call series, by handler and stage.
static CALLS: LazyLock<Handles<Calls>> = LazyLock::new(Default::default);

/// Makes the call series of every handler in `config` exist, at 0, before its first
/// call: a series that appears already at 1 hides that call from `increase()`, so an
/// alert on a new handler's first failure would miss it. Called for the config loaded at
/// start and for each applied reload.
pub(crate) fn handlers(config: &Config) {
    for handler in &config.handlers {
        let stage = handler.stage.as_str();
        kept(&CALLS, &handler.name, stage, || {
            Calls::new(&handler.name, stage)
        });
    }
}

/// Counts one handler call by its outcome and, if the handler was called, its time
/// (a failed filter or an event out of time before the handler's turn has none).
pub(crate) fn handler_call(record: &CallRecord) {
    let (handler, stage) = (record.handler.as_str(), record.stage.as_str());
    let outcome = record.outcome.as_str();
    let calls = kept(&CALLS, handler, stage, || Calls::new(handler, stage));
    match calls.by_outcome.iter().find(|(known, _)| *known == outcome) {
        Some((_, counter)) => counter.increment(1),
        None => call_counter(handler, stage, outcome).increment(1),
    }
    if record.called {
        calls.time.record(record.duration.as_secs_f64());
    }
}

pub(crate) fn in_flight(delta: f64) {
    static KEPT: LazyLock<Gauge> = LazyLock::new(|| gauge!(EVENTS_IN_FLIGHT));
    KEPT.increment(delta);
}

pub(crate) fn reload(result: &'static str) {
    counter!(RELOADS, "result" => result).increment(1);
}

pub(crate) fn generation(generation: u64) {
    gauge!(CONFIG_GENERATION).set(generation as f64);
}

pub(crate) fn queue(handler: &str, depth: u64) {
    gauge!(QUEUE_DEPTH, "handler" => handler.to_owned()).set(depth as f64);
}

pub(crate) fn queue_oldest(age: Duration) {
    gauge!(QUEUE_OLDEST_SECONDS).set(age.as_secs_f64());
}

pub(crate) fn execution_log_dropped(rows: u64) {
    counter!(EXECUTION_LOG_DROPPED).increment(rows);
}

pub(crate) fn log_lines_dropped(lines: u64) {
    counter!(LOG_LINES_DROPPED).increment(lines);
}

pub(crate) fn store_unreadable_rows(rows: u64) {
    counter!(STORE_UNREADABLE_ROWS).absolute(rows);
}

pub(crate) fn handler_oldest(handler: &str, age: Duration) {
    gauge!(HANDLER_OLDEST_SECONDS, "handler" => handler.to_owned()).set(age.as_secs_f64());
}

pub(crate) fn lanes_in_memory(lanes: usize) {
    gauge!(LANES_IN_MEMORY).set(lanes as f64);
}

pub(crate) fn store_writable(writable: bool) {
    gauge!(STORE_WRITABLE).set(if writable { 1.0 } else { 0.0 });
}

pub(crate) fn dead_letters(count: u64) {
    gauge!(DEAD_LETTERS).set(count as f64);
}

/// Names the store this sidecar uses: `backend` and `store`, an identity that sidecars
/// sharing a database share (the dashboard counts a shared queue once by it). A store
/// named before, if another, is set to 0: a gauge cannot be removed.
pub(crate) fn store_info(backend: &'static str, store: &str) {
    static NAMED: std::sync::Mutex<Option<(&'static str, String)>> = std::sync::Mutex::new(None);
    let mut named = NAMED.lock().expect("store info lock");
    if let Some((was_backend, was)) = named.as_ref() {
        if *was_backend == backend && was == store {
            return;
        }
        gauge!(STORE_INFO, "backend" => *was_backend, "store" => was.clone()).set(0.0);
    }
    gauge!(STORE_INFO, "backend" => backend, "store" => store.to_owned()).set(1.0);
    *named = Some((backend, store.to_owned()));
}

/// How many settings wait for a restart (`restart_needed` in `/v1/config`).
pub(crate) fn restart_needed(settings: usize) {
    gauge!(RESTART_NEEDED).set(settings as f64);
}
