//! `GET /v1/config` (what is live, and how reloads went) and `POST /v1/reload`.
//!
//! Handlers are shown by what is safe to show: name, stage, priority, events, the
//! target as written in the file (before `${VAR}` substitution), and the settings that
//! apply to its stage. Tokens, secrets, headers, script environments and filters never
//! appear.

use std::sync::Arc;
use std::time::SystemTime;

use hyper::{Response, StatusCode};
use serde_json::{Map, Value, json};

use super::App;
use super::reply::{self, Body};
use crate::config::{Handler, Stage};
use crate::reload::{Outcome, Pending, Trigger};

/// `GET /v1/config`.
pub(crate) fn config(app: &Arc<App>) -> Response<Body> {
    let snapshot = app.live.load_full();
    let config = &snapshot.config;
    let status = app.reloader.status();

    let handlers: Vec<Value> = config.handlers.iter().map(|h| describe(h)).collect();
    let mut events = Map::new();
    for name in config.known_events() {
        let route = snapshot.plan.route(name);
        let names = |hs: &[Arc<Handler>]| hs.iter().map(|h| h.name.clone()).collect::<Vec<_>>();
        events.insert(
            name.to_owned(),
            json!({"before": names(&route.before), "after": names(&route.after)}),
        );
    }
    let last_error = status.last_error.as_ref().map(|e| {
        json!({
            "at": time(e.at),
            "trigger": e.trigger.to_string(),
            "message": format!("the config file was rejected ({} error{}); the config shown is still live",
                e.errors.len(), if e.errors.len() == 1 { "" } else { "s" }),
            "errors": e.errors,
        })
    });
    reply::json(
        StatusCode::OK,
        &json!({
            "generation": snapshot.generation,
            "loaded_at": time(snapshot.loaded_at),
            "file": config.file,
            "hash": status.hash,
            "handlers": handlers,
            "events": events,
            "reloads": {
                "applied": status.applied,
                "unchanged": status.unchanged,
                "rejected": status.rejected,
            },
            "last_error": last_error,
            "restart_needed": pending(&status.restart_needed),
        }),
    )
}

/// `POST /v1/reload`: 200 with `applied` or `unchanged`, 422 with `rejected` and the
/// errors.
pub(crate) async fn reload(app: &Arc<App>) -> Response<Body> {
    match app.reloader.reload(Trigger::Api).await {
        Outcome::Applied {
            generation,
            changes,
            restart_needed,
        } => reply::json(
            StatusCode::OK,
            &json!({
                "result": "applied",
                "generation": generation,
                "added": changes.added,
                "removed": changes.removed,
                "changed": changes.changed,
                "settings": changes.settings,
                "restart_needed": pending(&restart_needed),
            }),
        ),
        Outcome::Unchanged {
            generation,
            restart_needed,
        } => reply::json(
            StatusCode::OK,
            &json!({
                "result": "unchanged",
                "generation": generation,
                "restart_needed": pending(&restart_needed),
            }),
        ),
        Outcome::Rejected { generation, errors } => {
            let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
            reply::json(
                StatusCode::UNPROCESSABLE_ENTITY,
                &json!({
                    "result": "rejected",
                    "generation": generation,
                    "error": {
                        "message": format!(
                            "the config file was rejected ({} error{}); the running config stays",
                            errors.len(), if errors.len() == 1 { "" } else { "s" }
                        ),
                        "errors": errors,
                    },
                }),
            )
        }
    }
}

/// A handler with the settings that apply to its stage: a before-stage handler may
/// modify and has an `on_error`; an after-stage one has a `retry` instead. Both have a
/// `timeout` and a `max_concurrency`.
fn describe(h: &Handler) -> Value {
    let duration = crate::config::fmt_duration;
    let mut shown = Map::new();
    let mut put = |key: &str, value: Value| {
        shown.insert(key.to_owned(), value);
    };
    put("name", json!(h.name));
    put("stage", json!(h.stage));
    put("priority", json!(h.priority));
    put("enabled", json!(h.enabled));
    let events: Vec<String> = h.events.iter().map(ToString::to_string).collect();
    put("events", json!(events));
    put("target", json!(h.describe_target()));
    match h.stage {
        Stage::Before => {
            put("modifies", json!(h.modifies));
            put("on_error", json!(h.on_error));
        }
        Stage::After => put(
            "retry",
            json!({
                "attempts": h.retry.attempts,
                "backoff": duration(h.retry.backoff),
                "max_backoff": duration(h.retry.max_backoff),
            }),
        ),
    }
    put("timeout", json!(duration(h.timeout)));
    put("max_concurrency", json!(h.max_concurrency));
    Value::Object(shown)
}

fn pending(list: &[Pending]) -> Value {
    list.iter()
        .map(|p| json!({"setting": p.setting, "file": p.file, "running": p.running}))
        .collect()
}

fn time(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}
