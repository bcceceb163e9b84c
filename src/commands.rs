//! The subcommands behind `src/main.rs`: each takes parsed arguments and does the work.

mod admin;

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use admin::{
    DeadLetterCommand, ExecutionQuery, Output, Selection, dead_letters, executions, health,
};

use crate::config::{Backend, Config, ConfigErrors};
use crate::dispatch::Snapshot;
use crate::reload;
use crate::server::{App, Listener, serve};
use crate::store::{Copied, Retention, Store};
use crate::{errln, out, outln};

/// `provisiond check`: validate, print a summary or every error. Warnings (a script
/// that is not there) go to stderr and do not fail the check.
pub fn check(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            outln!("{}", config.summary());
            for warning in config.warnings() {
                errln!("warning: {warning}");
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            print_errors(&errors);
            ExitCode::FAILURE
        }
    }
}

fn print_errors(errors: &ConfigErrors) {
    for e in errors.iter() {
        errln!("{e}");
    }
    let file = errors.iter().next().map_or("config", |e| e.file.as_str());
    let n = errors.len();
    errln!("{file}: {n} error{}", if n == 1 { "" } else { "s" });
}

/// `provisiond store copy --from FILE`: what the redb file holds, into the configured
/// shared store.
pub async fn store_copy(path: &Path, from: &Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(errors) => {
            print_errors(&errors);
            return ExitCode::FAILURE;
        }
    };
    if !from.is_file() {
        errln!("provisiond: {}: no such store file", from.display());
        return ExitCode::FAILURE;
    }
    // Refused before the store is opened: opening a file backend would create its file.
    if !matches!(config.store.backend, Backend::Postgres(_)) {
        errln!(
            "provisiond: store copy needs store.backend = \"postgres\" in {}: the file \
             backend is the file itself",
            path.display()
        );
        return ExitCode::FAILURE;
    }
    let store = match Store::open(&config.store).await {
        Ok(store) => store,
        Err(e) => {
            errln!("provisiond: {e}");
            return ExitCode::FAILURE;
        }
    };
    let copied = store.copy_from_file(from).await;
    store.close().await;
    match copied {
        Ok(Copied {
            queued,
            dead,
            dedupe,
        }) => {
            outln!(
                "copied {queued} queued deliver{}, {dead} dead letter{} and {dedupe} dedupe \
                 key{} from {} into {}",
                if queued == 1 { "y" } else { "ies" },
                if dead == 1 { "" } else { "s" },
                if dedupe == 1 { "" } else { "s" },
                from.display(),
                store.path()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            errln!("provisiond: store copy failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `provisiond explain`: which handlers an event with this data would run, and why the
/// others would not. Calls nothing.
pub fn explain(path: &Path, event: &str, data: Option<&str>, object_id: &str) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(errors) => {
            print_errors(&errors);
            return ExitCode::FAILURE;
        }
    };
    let data = match crate::explain::read_data(data) {
        Ok(data) => data,
        Err(e) => {
            errln!("provisiond: {e}");
            return ExitCode::FAILURE;
        }
    };
    let object_id = object_id
        .parse::<i64>()
        .map_or_else(|_| object_id.into(), serde_json::Value::from);
    let envelope = match crate::explain::envelope(event, object_id, data.into()) {
        Ok(envelope) => envelope,
        Err(e) => {
            errln!("provisiond: {e}");
            return ExitCode::FAILURE;
        }
    };
    out!(
        "{}",
        crate::explain::explain(&config, &envelope).render(&config)
    );
    ExitCode::SUCCESS
}

/// `provisiond test`: run the config test cases in `cases`; exit 1 on any failure.
pub fn test(path: &Path, cases: &Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(errors) => {
            print_errors(&errors);
            return ExitCode::FAILURE;
        }
    };
    match crate::cases::run(&config, cases) {
        Ok(results) => {
            out!("{}", crate::cases::render(&results));
            if results.iter().all(crate::cases::CaseResult::passed) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            errln!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// `provisiond schema`: the JSON Schema of `provisioning.toml`.
pub fn schema() -> String {
    let schema = schemars::schema_for!(crate::config::RawConfig);
    let mut value = serde_json::to_value(&schema).expect("a schema serialises");
    drop_null(&mut value);
    if let Some(root) = value.as_object_mut() {
        root.insert("title".into(), "provisioning.toml".into());
    }
    let mut text = serde_json::to_string_pretty(&value).expect("a schema serialises");
    text.push('\n');
    text
}

/// TOML has no null: an optional key is simply absent. Removes the `null` alternatives
/// schemars adds for `Option` fields, so editors do not offer them.
fn drop_null(value: &mut serde_json::Value) {
    use serde_json::Value;
    let Value::Object(map) = value else {
        if let Value::Array(items) = value {
            items.iter_mut().for_each(drop_null);
        }
        return;
    };
    if let Some(Value::Array(types)) = map.get_mut("type") {
        types.retain(|t| t != "null");
        if types.len() == 1 {
            let only = types.remove(0);
            map.insert("type".into(), only);
        }
    }
    if let Some(Value::Array(alternatives)) = map.get_mut("anyOf") {
        alternatives.retain(|a| a.get("type").is_none_or(|t| t != "null"));
        if alternatives.len() == 1 {
            let Some(Value::Object(only)) = alternatives.pop() else {
                unreachable!("anyOf holds schemas")
            };
            map.remove("anyOf");
            for (k, v) in only {
                map.entry(k).or_insert(v);
            }
        }
    }
    map.values_mut().for_each(drop_null);
}

/// `provisiond run`: serve until SIGINT or SIGTERM; reload on file changes (unless
/// `watch` is false), SIGHUP and `POST /v1/reload`.
pub async fn run(path: &Path, watch: bool) -> anyhow::Result<ExitCode> {
    // SIGHUP first of all: its default action ends the process, and a start can take a
    // while (the store's integrity check reads the whole file). A reload asked for
    // meanwhile (`systemctl reload`, configuration management) is then done once the
    // sidecar runs, rather than killing it.
    let hangup = reload::hangup().context("cannot watch SIGHUP")?;
    // Watch first, read second: a change made while the file is read is still seen.
    let watcher = if watch {
        match reload::watch::Watcher::start(path) {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(
                    config = %path.display(), error = %e,
                    "cannot watch the config; reload with SIGHUP or POST /v1/reload"
                );
                None
            }
        }
    } else {
        None
    };
    // Start-up failures go through the log, so that they come in the log's format (JSON
    // lines in a container) like everything else.
    let config = match reload::load(path) {
        Ok(config) => config,
        Err(errors) => {
            for e in errors.iter() {
                error!(error = %e, "invalid config");
            }
            error!(config = %path.display(), errors = errors.len(), "not started, fix the config first");
            return Ok(ExitCode::FAILURE);
        }
    };
    let listen = config.server.listen.clone();
    let grace = config.server.shutdown_grace;
    let listener = match Listener::bind(&listen).await {
        Ok(listener) => listener,
        Err(e) => {
            error!(listen = %listen, error = %e, "not started: cannot listen");
            return Ok(ExitCode::FAILURE);
        }
    };
    let handlers = config.handlers.len();
    // Before the store opens: a database reached at once says so in the metrics.
    let metrics = crate::metrics::install();
    let store = match Store::open(&config.store).await {
        Ok(store) => store,
        Err(e) => {
            error!(error = %e, "not started");
            return Ok(ExitCode::FAILURE);
        }
    };
    let app = App::new(Snapshot::new(config, 1), store, path.to_path_buf(), metrics);
    let shutdown = CancellationToken::new();
    crate::shutdown::watch(shutdown.clone()).context("cannot watch signals")?;
    let watching = watcher.is_some();
    reload::spawn(app.reloader.clone(), watcher, hangup, shutdown.clone());
    let pending = app
        .deliveries
        .resume()
        .context("cannot read the stored deliveries")?;
    if pending > 0 {
        info!(pending, "resuming stored deliveries");
    }
    let pruning = {
        let app = app.clone();
        app.store.clone().keep_pruned(
            PRUNE_EVERY,
            move || retention(&app.live.load().config.store),
            shutdown.clone(),
        )
    };
    // On a signal the workers stop next to the listener, under the same grace period.
    let stopping = {
        let app = app.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            if !app.deliveries.stop(grace).await {
                warn!("grace period over, attempts in flight are left to the next start");
            }
        })
    };
    info!(
        addr = %listener.local_addr(), config = %path.display(), handlers, watching,
        store = %app.store.path(), version = env!("CARGO_PKG_VERSION"),
        threads = tokio::runtime::Handle::current().metrics().num_workers(), "listening"
    );
    for warning in app.live.load().config.warnings() {
        warn!(%warning, "config warning");
    }
    notify_ready(&listener.local_addr());
    watchdog();
    let stopping_notice = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            notify(&[sd_notify::NotifyState::Stopping]);
        })
    };
    serve(listener, app.clone(), shutdown.clone(), grace).await;
    // serve returns once shutdown began: the notice is due (awaited, not aborted, so a
    // busy machine that has not polled it yet still sends it).
    shutdown.cancel();
    let _ = stopping_notice.await;
    let _ = stopping.await;
    let _ = pruning.await;
    app.store.close().await;
    info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Tells systemd (`Type=notify`) that the config is loaded, the store open and the
/// listener bound. Without `NOTIFY_SOCKET` in the environment it does nothing.
fn notify_ready(addr: &str) {
    let status = format!("listening on {addr}");
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ]);
}

/// systemd's watchdog (`WatchdogSec=` in the unit): `WATCHDOG=1` every half of its
/// interval, from a task on the runtime that serves the events. A runtime that no longer
/// runs its tasks (a deadlock, a hang) stops the pings, and systemd restarts the
/// service. Nothing without `WATCHDOG_USEC` (for this process) in the environment.
fn watchdog() {
    let Some(every) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = (every / 2).max(std::time::Duration::from_millis(10));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            notify(&[sd_notify::NotifyState::Watchdog]);
        }
    });
}

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

/// `provisiond send`: post an envelope like the billing's to a running sidecar and print
/// the reply: its status and event id on stderr, its body on stdout. Exit 0 on 200, 1
/// otherwise.
pub async fn send(
    config_path: &Path,
    target: &crate::remote::Target,
    event: &str,
    data: Option<&str>,
    object_id: i64,
) -> anyhow::Result<ExitCode> {
    let data = crate::explain::read_data(data).map_err(anyhow::Error::msg)?;
    let body = crate::remote::envelope(event, object_id, serde_json::Value::Object(data));
    let remote = crate::remote::Remote::new(config_path, target)?;
    if let Some(warning) = outside_catalogue(remote.config(), event) {
        errln!("provisiond: warning: {warning}");
    }
    let response = remote
        .response(
            reqwest::Method::POST,
            "/events",
            Some(bytes::Bytes::from(body.to_string())),
        )
        .await?;
    let status = response.status().as_u16();
    // The id to look the event up by (`executions --event-id`), as the billing gets it.
    let event_id = response
        .headers()
        .get(crate::server::ingress::EVENT_ID_HEADER)
        .and_then(|id| id.to_str().ok())
        .map(str::to_owned);
    let text = response.text().await.context("cannot read the reply")?;
    let shown = serde_json::from_str::<serde_json::Value>(&text).map_or(text, |v| {
        serde_json::to_string_pretty(&v).expect("JSON serialises")
    });
    match (status, event_id) {
        (401, _) => errln!("HTTP 401: {}", remote.token_hint()),
        (status, Some(id)) => errln!("HTTP {status}, event {id}"),
        (status, None) => errln!("HTTP {status}"),
    }
    outln!("{shown}");
    Ok(if status == 200 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What `send` says about an event name neither the catalogue nor the config's `[events]
/// extra` has (the config's when it loaded, else the catalogue alone): it is still sent,
/// as the billing would, and goes to the wildcard handlers.
fn outside_catalogue(config: Option<&Config>, event: &str) -> Option<String> {
    let name = crate::events::normalize(event);
    let known: Vec<&str> = match config {
        Some(config) => config.known_events().collect(),
        None => crate::events::CATALOGUE.to_vec(),
    };
    if known.contains(&name.as_ref()) {
        return None;
    }
    let hint = crate::events::suggest(&name, known.iter().copied())
        .map(|s| format!(" (did you mean {s:?}?)"))
        .unwrap_or_default();
    Some(format!(
        "{event:?} is not in the billing's catalogue nor [events] extra{hint}; sending it \
         anyway: the sidecar gives it to the handlers matching \"*\" or a prefix only"
    ))
}

/// How often the execution log and the dedupe keys are trimmed.
const PRUNE_EVERY: Duration = Duration::from_secs(5);

fn retention(store: &crate::config::Store) -> Retention {
    Retention {
        keep_age: store.keep_age,
        keep_rows: store.keep_rows,
        dedupe_window: store.dedupe_window,
    }
}
