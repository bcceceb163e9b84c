//! The store's admin routes: `GET /v1/executions`, `GET /v1/deadletters`,
//! `GET|DELETE /v1/deadletters/{id}`, `POST /v1/deadletters/{id}/replay`, and the bulk
//! `POST /v1/deadletters/replay` and `POST /v1/deadletters/drop` with a filter body.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, Uri};
use serde_json::{Value, json};
use tracing::info;

use super::App;
use super::reply::{self, Body};
use crate::api;
use crate::outcome::CallOutcome;
use crate::store::{DeadLetterFilter, ExecutionFilter, StoreError, unix_ms};

/// Rows a list returns unless `limit` says otherwise, and the most it may say.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// `GET /v1/executions?event=&handler=&object_id=&outcome=&since=&limit=`
pub(crate) async fn executions(app: &Arc<App>, uri: &Uri) -> Response<Body> {
    let mut filter = ExecutionFilter {
        limit: DEFAULT_LIMIT,
        ..Default::default()
    };
    for (key, value) in query(uri) {
        let value = Some(value);
        match key.as_str() {
            "event" => filter.event = value.map(|v| crate::events::normalize(&v).into_owned()),
            "handler" => filter.handler = value,
            "object_id" => filter.object_id = value,
            "event_id" => filter.event_id = value,
            "after" => match parse_after(value.as_deref().unwrap_or_default()) {
                Ok(id) => filter.after = Some(id),
                Err(e) => return reply::error(StatusCode::BAD_REQUEST, e),
            },
            "outcome" => match parse_outcome(value.as_deref().unwrap_or_default()) {
                Ok(outcome) => filter.outcome = Some(outcome),
                Err(e) => return reply::error(StatusCode::BAD_REQUEST, e),
            },
            "since" => match parse_since(value.as_deref().unwrap_or_default()) {
                Ok(at) => filter.since = Some(at),
                Err(e) => return reply::error(StatusCode::BAD_REQUEST, e),
            },
            "limit" => match parse_limit(
                value.as_deref().unwrap_or_default(),
                "since or the other filters",
            ) {
                Ok(n) => filter.limit = n,
                Err(e) => return reply::error(StatusCode::BAD_REQUEST, e),
            },
            other => {
                return reply::error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "unknown filter {other:?}; use event, handler, object_id, outcome, \
                         event_id, since, after, limit"
                    ),
                );
            }
        }
    }
    match app.store.executions(filter).await {
        Ok(rows) => {
            let executions: Vec<_> = rows.iter().map(api::ExecutionRow::from).collect();
            let count = executions.len();
            reply::json(StatusCode::OK, &api::Executions { count, executions })
        }
        Err(e) => store_error(&e),
    }
}

/// `/v1/deadletters` and below.
pub(crate) async fn dead_letters(app: &Arc<App>, request: Request<Incoming>) -> Response<Body> {
    let (method, uri) = (request.method().clone(), request.uri().clone());
    let (method, uri) = (&method, &uri);
    let rest = uri
        .path()
        .strip_prefix("/v1/deadletters")
        .unwrap_or_default();
    let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
    match (method, parts.as_slice()) {
        (&Method::GET, []) => list(app, uri).await,
        (_, []) => reply::method_not_allowed("GET"),
        (&Method::POST, ["replay" | "drop"]) => {
            let deadline = app.live.load().config.server.deadline;
            let body = match super::admin::body(
                request,
                MAX_FILTER_BODY,
                "the limit of a filter body",
                deadline,
            )
            .await
            {
                Ok(body) => body,
                Err(reply) => return reply,
            };
            match (selection(&body), parts[0]) {
                (Ok(filter), "replay") => replay_matching(app, filter).await,
                (Ok(filter), _) => drop_matching(app, filter).await,
                (Err(e), _) => reply::error(StatusCode::BAD_REQUEST, e),
            }
        }
        (_, ["replay" | "drop"]) => reply::method_not_allowed("POST"),
        (_, [id, ..]) if id.parse::<u64>().is_err() => reply::error(
            StatusCode::NOT_FOUND,
            format!("no dead letter {id:?}: ids are numbers"),
        ),
        (&Method::GET, [id]) => show(app, id.parse().expect("checked")).await,
        (&Method::DELETE, [id]) => drop_one(app, id.parse().expect("checked")).await,
        (_, [_]) => reply::method_not_allowed("GET, DELETE"),
        (&Method::POST, [id, "replay"]) => replay(app, id.parse().expect("checked")).await,
        (_, [_, "replay"]) => reply::method_not_allowed("POST"),
        _ => reply::not_found(uri.path()),
    }
}

/// The filters of `GET /v1/deadletters`: those of the bulk routes, and the page's.
const LIST_KEYS: &str = "handler, event, object_id, entity, since, until, after, limit";

/// `GET /v1/deadletters?handler=&event=&object_id=&entity=&since=&until=&after=&limit=`:
/// what the bulk replay or drop with the same filters would take, a page at a time
/// (`more` says whether there is a next one, from `after` = the last id shown).
async fn list(app: &Arc<App>, uri: &Uri) -> Response<Body> {
    let mut filter = DeadLetterFilter::default();
    let mut after = 0;
    let mut limit = DEFAULT_LIMIT;
    for (key, value) in query(uri) {
        let parsed = match key.as_str() {
            "handler" => {
                filter.handler = Some(value);
                Ok(())
            }
            "event" => {
                filter.event = Some(crate::events::normalize(&value).into_owned());
                Ok(())
            }
            "object_id" => {
                filter.object_id = Some(value);
                Ok(())
            }
            "entity" => {
                filter.entity = Some(value);
                Ok(())
            }
            "since" => parse_since(&value).map(|at| filter.since = Some(at)),
            "until" => parse_since(&value)
                .map(|at| filter.until = Some(at))
                .map_err(|e| e.replacen("since", "until", 1)),
            "after" => parse_after(&value).map(|id| after = id),
            "limit" => parse_limit(&value, "the filters or after").map(|n| limit = n),
            other => Err(format!("unknown filter {other:?}; use {LIST_KEYS}")),
        };
        if let Err(e) = parsed {
            return reply::error(StatusCode::BAD_REQUEST, e);
        }
    }
    if let Err(e) = check_window(filter.since, filter.until) {
        return reply::error(StatusCode::BAD_REQUEST, e);
    }
    // One more than asked for says whether there is a next page.
    match app.store.dead_letters(filter, after, limit + 1).await {
        Ok(mut letters) => {
            let more = letters.len() > limit;
            letters.truncate(limit);
            let deadletters: Vec<_> = letters.iter().map(api::DeadLetterRow::from).collect();
            let count = deadletters.len();
            reply::json(
                StatusCode::OK,
                &api::DeadLetters {
                    count,
                    more,
                    deadletters,
                },
            )
        }
        Err(e) => store_error(&e),
    }
}

async fn show(app: &Arc<App>, id: u64) -> Response<Body> {
    match app.store.dead_letter(id).await {
        Ok(Some(letter)) => reply::json(StatusCode::OK, &api::DeadLetterRow::from(&letter)),
        Ok(None) => unknown(id),
        Err(e) => store_error(&e),
    }
}

async fn replay(app: &Arc<App>, id: u64) -> Response<Body> {
    let letter = match app.store.dead_letter(id).await {
        Ok(Some(letter)) => letter,
        Ok(None) => return unknown(id),
        Err(e) => return store_error(&e),
    };
    let handler = &letter.delivery.handler;
    let known = app
        .live
        .load()
        .config
        .handler(handler)
        .is_some_and(|h| h.stage == crate::config::Stage::After);
    if !known {
        return reply::error(
            StatusCode::CONFLICT,
            format!(
                "dead letter {id} is for handler {handler:?}, which the config has no \
                 after-stage handler of; add it back, or drop the dead letter"
            ),
        );
    }
    match app.store.replay(id).await {
        Ok(Some(new_id)) => {
            // The lane has it from the commit, whether or not this request lives on.
            info!(dead_letter = id, delivery = new_id, handler = %handler, "dead letter replayed");
            let replayed = api::ReplayedOne {
                replayed: id,
                delivery: new_id,
            };
            reply::json(StatusCode::OK, &replayed)
        }
        Ok(None) => unknown(id),
        Err(e) => store_error(&e),
    }
}

async fn drop_one(app: &Arc<App>, id: u64) -> Response<Body> {
    match app.store.drop_dead_letter(id).await {
        Ok(true) => {
            info!(dead_letter = id, "dead letter dropped");
            reply::json(StatusCode::OK, &api::DroppedOne { dropped: id })
        }
        Ok(false) => unknown(id),
        Err(e) => store_error(&e),
    }
}

/// Largest filter body accepted.
const MAX_FILTER_BODY: usize = 64 * 1024;
/// The keys of a bulk filter body.
const SELECTION_KEYS: &str = "handler, event, object_id, entity, since, until, or all";

/// The filter body of `POST /v1/deadletters/replay|drop`: `handler`, `event`,
/// `object_id`, `entity`, `since`, `until` (a time, or a duration back from now), or
/// `"all": true`. An empty filter without `all` is refused: it would take everything.
fn selection(body: &[u8]) -> Result<DeadLetterFilter, String> {
    let body: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(body)
            .map_err(|e| format!("the body must be a JSON object of filters: {e}"))?
    };
    let Value::Object(fields) = body else {
        return Err(format!(
            "the body must be a JSON object of filters ({SELECTION_KEYS})"
        ));
    };
    let mut filter = DeadLetterFilter::default();
    let mut all = false;
    for (key, value) in fields {
        let text = || match &value {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            other => Err(format!(
                "{key} must be a string or a number, got {}",
                crate::events::type_name(other)
            )),
        };
        match key.as_str() {
            "handler" => filter.handler = Some(text()?),
            "event" => filter.event = Some(crate::events::normalize(&text()?).into_owned()),
            "object_id" => filter.object_id = Some(text()?),
            "entity" => filter.entity = Some(text()?),
            "since" => filter.since = Some(parse_since(&text()?)?),
            "until" => {
                filter.until =
                    Some(parse_since(&text()?).map_err(|e| e.replacen("since", "until", 1))?)
            }
            "all" => match value {
                Value::Bool(b) => all = b,
                other => {
                    return Err(format!(
                        "all must be true or false, got {}",
                        crate::events::type_name(&other)
                    ));
                }
            },
            other => return Err(format!("unknown filter {other:?}; use {SELECTION_KEYS}")),
        }
    }
    match (filter.is_empty(), all) {
        (true, false) => Err(format!(
            "no filter given; give one or more of {SELECTION_KEYS}: \"all\": true to take \
             every dead letter"
        )),
        (false, true) => Err(
            "\"all\": true takes every dead letter; leave it out to take only those the \
             filters match"
                .into(),
        ),
        _ => check_window(filter.since, filter.until).map(|()| filter),
    }
}

/// `POST /v1/deadletters/replay`: every match back to the queue, in the order its events
/// arrived. Those for a handler the config has no after-stage handler of stay, and the
/// reply says so.
async fn replay_matching(app: &Arc<App>, filter: DeadLetterFilter) -> Response<Body> {
    let handlers: Vec<String> = app
        .live
        .load()
        .config
        .handlers
        .iter()
        .filter(|h| h.stage == crate::config::Stage::After)
        .map(|h| h.name.clone())
        .collect();
    let hint = unmatched_names(app, &filter);
    match app.store.replay_matching(filter, handlers).await {
        Ok(replayed) => {
            // The lanes have the deliveries from the commit, in id order.
            let n = replayed.ids.len();
            if let Some(first) = replayed.ids.first() {
                info!(
                    replayed = n,
                    skipped = replayed.skipped,
                    first,
                    "dead letters replayed"
                );
            }
            let mut body = api::ReplayedMatching {
                replayed: n,
                skipped: replayed.skipped,
                message: None,
            };
            if replayed.skipped > 0 {
                let names: Vec<&str> = replayed
                    .skipped_handlers
                    .iter()
                    .map(String::as_str)
                    .collect();
                body.message = Some(format!(
                    "{} matching dead letter{} left in place: the config has no after-stage \
                     handler {}; add it back, or drop them",
                    replayed.skipped,
                    if replayed.skipped == 1 { "" } else { "s" },
                    names.join(", ")
                ));
            } else if n == 0 {
                body.message = hint;
            }
            reply::json(StatusCode::OK, &body)
        }
        Err(e) => store_error(&e),
    }
}

/// `POST /v1/deadletters/drop`: every match deleted.
async fn drop_matching(app: &Arc<App>, filter: DeadLetterFilter) -> Response<Body> {
    let hint = unmatched_names(app, &filter);
    match app.store.drop_matching(filter).await {
        Ok(n) => {
            if n > 0 {
                info!(dropped = n, "dead letters dropped");
            }
            let message = if n == 0 { hint } else { None };
            reply::json(
                StatusCode::OK,
                &api::DroppedMatching {
                    dropped: n,
                    message,
                },
            )
        }
        Err(e) => store_error(&e),
    }
}

/// For a bulk operation that matched nothing: the filter's handler or event that the
/// config does not know, likely a typo, with the closest name it does know.
fn unmatched_names(app: &App, filter: &DeadLetterFilter) -> Option<String> {
    let live = app.live.load();
    let config = &live.config;
    let mut said = Vec::new();
    if let Some(handler) = &filter.handler
        && config.handler(handler).is_none()
    {
        let names = config.handlers.iter().map(|h| h.name.as_str());
        let hint = crate::events::suggest(handler, names)
            .map(|s| format!(" (did you mean {s:?}?)"))
            .unwrap_or_default();
        said.push(format!("the config has no handler {handler:?}{hint}"));
    }
    if let Some(event) = &filter.event
        && !live.plan.is_known(event)
    {
        let hint = crate::events::suggest(event, config.known_events())
            .map(|s| format!(" (did you mean {s:?}?)"))
            .unwrap_or_default();
        said.push(format!(
            "{event:?} is neither in the catalogue nor in [events] extra{hint}"
        ));
    }
    (!said.is_empty()).then(|| said.join("; "))
}

fn unknown(id: u64) -> Response<Body> {
    reply::error(StatusCode::NOT_FOUND, format!("no dead letter {id}"))
}

fn store_error(e: &StoreError) -> Response<Body> {
    tracing::warn!(error = %e, "store request failed");
    reply::unavailable(&e.to_string(), 1)
}

/// The query string's pairs, percent-decoded.
fn query(uri: &Uri) -> Vec<(String, String)> {
    let Some(q) = uri.query() else {
        return Vec::new();
    };
    reqwest::Url::parse(&format!("http://x/?{q}"))
        .map(|u| u.query_pairs().into_owned().collect())
        .unwrap_or_default()
}

/// `after`: a row id.
fn parse_after(text: &str) -> Result<u64, String> {
    text.parse()
        .map_err(|_| format!("after must be a row id (a whole number), got {text:?}"))
}

/// `limit`: 1 to [`MAX_LIMIT`]; over it, the error says to narrow the query with
/// `narrow`, the filters the route takes.
fn parse_limit(text: &str, narrow: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Ok(n) if n > MAX_LIMIT => Err(format!(
            "limit is at most {MAX_LIMIT}, got {n}; narrow the query with {narrow}"
        )),
        _ => Err(format!(
            "limit must be a whole number from 1 to {MAX_LIMIT} (at most {MAX_LIMIT}), got \
             {text:?}"
        )),
    }
}

/// `outcome`: one the log can hold, else an error listing them. A value no row can have
/// would otherwise answer an empty list, as if nothing had happened.
fn parse_outcome(text: &str) -> Result<String, String> {
    match text.parse::<CallOutcome>() {
        Ok(outcome) => Ok(outcome.as_str().to_owned()),
        Err(_) => Err(format!(
            "unknown outcome {text:?}; use {} (before stage), {} (after stage; \
             error there is a filter that failed)",
            listed(&CallOutcome::BEFORE),
            listed(&CallOutcome::AFTER),
        )),
    }
}

/// `a, b or c`.
fn listed(outcomes: &[CallOutcome]) -> String {
    match outcomes {
        [] => String::new(),
        [one] => one.as_str().to_owned(),
        [rest @ .., last] => {
            let rest: Vec<&str> = rest.iter().map(|o| o.as_str()).collect();
            format!("{} or {last}", rest.join(", "))
        }
    }
}

/// `since`: an RFC 3339 time (`2026-11-26T10:00:00Z`, `2026-11-26T12:00:00+02:00`; one
/// without a zone, `2026-11-26 10:00:00`, is UTC) or a duration back from now (`15m`,
/// `2h`). In milliseconds since the epoch.
fn parse_since(text: &str) -> Result<u64, String> {
    if let Ok(ago) = humantime::parse_duration(text) {
        let at = SystemTime::now()
            .checked_sub(ago)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        return Ok(unix_ms(at));
    }
    if let Ok(at) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(u64::try_from(at.timestamp_millis()).unwrap_or(0));
    }
    humantime::parse_rfc3339_weak(text)
        .map(unix_ms)
        .map_err(|_| {
            format!(
                "since must be a time (\"2026-11-26T10:00:00Z\", \"2026-11-26T12:00:00+02:00\"; \
                 without a zone, UTC) or a duration back from now (\"15m\"), got {text:?}"
            )
        })
}

/// Refuses a window that cannot hold anything: `since` at or after `until`.
fn check_window(since: Option<u64>, until: Option<u64>) -> Result<(), String> {
    match (since, until) {
        (Some(since), Some(until)) if since >= until => {
            let at = |ms: u64| {
                humantime::format_rfc3339_seconds(
                    SystemTime::UNIX_EPOCH + Duration::from_millis(ms),
                )
            };
            Err(format!(
                "since ({}) is not before until ({}), so nothing can match; since is the \
                 earlier end of the window (a duration counts back from now: since = \"2h\", \
                 until = \"1h\")",
                at(since),
                at(until)
            ))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn since_takes_a_time_or_a_duration() {
        assert_eq!(parse_since("1970-01-01T00:00:02Z"), Ok(2000));
        let ago = parse_since("10m").unwrap();
        let expect = unix_ms(SystemTime::now() - Duration::from_secs(600));
        assert!(ago.abs_diff(expect) < 5_000);
        assert!(parse_since("yesterday").is_err());
    }

    #[test]
    fn a_time_with_an_offset_is_that_instant_and_one_without_a_zone_is_utc() {
        let utc = parse_since("2026-12-07T15:00:00Z").unwrap();
        assert_eq!(parse_since("2026-12-07T17:00:00+02:00"), Ok(utc));
        assert_eq!(parse_since("2026-12-07T10:00:00-05:00"), Ok(utc));
        assert_eq!(parse_since("2026-12-07 17:00:00+02:00"), Ok(utc));
        assert_eq!(parse_since("2026-12-07T15:00:00.250Z"), Ok(utc + 250));
        assert_eq!(parse_since("2026-12-07T15:00:00"), Ok(utc));
        assert_eq!(parse_since("2026-12-07 15:00:00"), Ok(utc));
        let error = parse_since("2026-12-07T17:00:00+2").unwrap_err();
        assert!(error.contains("+02:00"), "{error}");
    }

    #[test]
    fn a_window_that_cannot_hold_anything_is_refused() {
        assert!(check_window(Some(1), Some(2)).is_ok());
        assert!(check_window(Some(1), None).is_ok());
        let error = check_window(Some(2_000), Some(1_000)).unwrap_err();
        assert!(
            error.starts_with(
                "since (1970-01-01T00:00:02Z) is not before until (1970-01-01T00:00:01Z)"
            ),
            "{error}"
        );
        let since = parse_since("1h").unwrap();
        let until = parse_since("2h").unwrap();
        assert!(check_window(Some(since), Some(until)).is_err());
        assert!(selection(br#"{"since": "1h", "until": "2h"}"#).is_err());
        assert!(selection(br#"{"since": "2h", "until": "1h"}"#).is_ok());
    }

    #[test]
    fn limits_are_bounded() {
        assert_eq!(parse_limit("5", "handler"), Ok(5));
        assert_eq!(parse_limit("1000", "handler"), Ok(1000));
        assert!(
            parse_limit("0", "handler")
                .unwrap_err()
                .contains("from 1 to 1000")
        );
        assert_eq!(
            parse_limit("1001", "handler").unwrap_err(),
            "limit is at most 1000, got 1001; narrow the query with handler"
        );
        assert!(parse_limit("x", "handler").is_err());
    }

    #[test]
    fn outcomes_are_those_the_log_holds() {
        for outcome in CallOutcome::ALL.map(CallOutcome::as_str) {
            assert_eq!(parse_outcome(outcome).as_deref(), Ok(outcome));
        }
        let e = parse_outcome("bogus").unwrap_err();
        assert!(
            e.starts_with("unknown outcome \"bogus\"; use allowed"),
            "{e}"
        );
        for outcome in CallOutcome::ALL.map(CallOutcome::as_str) {
            assert!(e.contains(outcome), "{e}");
        }
    }

    #[test]
    fn queries_are_decoded() {
        let uri: Uri = "/v1/executions?event=clients.create&since=2026-11-26T10%3A00%3A00Z"
            .parse()
            .unwrap();
        assert_eq!(
            query(&uri),
            [
                ("event".to_owned(), "clients.create".to_owned()),
                ("since".to_owned(), "2026-11-26T10:00:00Z".to_owned())
            ]
        );
    }
}
