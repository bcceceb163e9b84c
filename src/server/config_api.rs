//! `GET /v1/config` (what is live, and how reloads went) and `POST /v1/reload`.
//!
//! Handlers are shown by what is safe to show: name, stage, priority, events, the
//! target as written in the file (before `${VAR}` substitution), and the settings that
//! apply to its stage. Tokens, secrets, headers, script environments and filters never
//! appear. The store is shown by its backend; a database URL with its password masked.

use std::sync::Arc;
use std::time::SystemTime;

use hyper::{Response, StatusCode};
use serde_json::{Map, Value, json};

use super::App;
use super::reply::{self, Body};
use crate::config::{Backend, Handler, Stage, Store};
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
            "store": describe_store(&config.store),
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

/// `[store]` as it is used: the backend and where the data is, with a database URL's
/// password masked, and the retention settings.
fn describe_store(store: &Store) -> Value {
    let duration = crate::config::fmt_duration;
    let mut shown = match &store.backend {
        Backend::Redb => json!({"backend": "redb", "path": store.path.display().to_string()}),
        Backend::Postgres(pg) => json!({
            "backend": "postgres",
            "url": pg.shown_url(),
            "schema": pg.schema,
            "pool": pg.pool,
            "lease": duration(pg.lease),
        }),
    };
    shown["dedupe_window"] = json!(duration(store.dedupe_window));
    shown["keep_executions"] = json!({"age": duration(store.keep_age), "rows": store.keep_rows});
    shown
}

fn pending(list: &[Pending]) -> Value {
    list.iter()
        .map(|p| json!({"setting": p.setting, "file": p.file, "running": p.running}))
        .collect()
}

fn time(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::describe_store;
    use crate::config::Config;

    #[test]
    fn the_store_is_shown_without_the_database_password() {
        let text = "[store]\nbackend = \"postgres\"\nurl = \"${PG_URL}\"\npool = 4\n";
        let env = |name: &str| {
            (name == "PG_URL").then(|| "postgres://app:pw%40-7781@db1,db2/billing".to_owned())
        };
        let config =
            Config::parse_with_env(text, "p.toml", std::path::Path::new("."), &env).unwrap();
        let shown = describe_store(&config.store);
        assert_eq!(
            shown,
            json!({
                "backend": "postgres",
                "url": "postgres://app:***@db1,db2/billing",
                "schema": "provisiond",
                "pool": 4,
                "lease": "30s",
                "dedupe_window": "10m",
                "keep_executions": {"age": "7days", "rows": 100000},
            })
        );
        assert!(!shown.to_string().contains("7781"), "{shown}");

        let config = Config::parse("", "p.toml").unwrap();
        let shown = describe_store(&config.store);
        assert_eq!(shown["backend"], "redb");
        assert_eq!(shown["path"], "provisiond.db");
    }
}
