//! `POST /v1/explain`: what `provisiond explain` says, as JSON, against the live config.
//!
//! The body is `{"event": NAME, "data": {...}, "object_id": N}` (`data` defaults to `{}`
//! and `object_id` to 1, as on the command line; a null `object_id` is the empty id, as
//! in an envelope). The work is [`crate::explain`]'s: this
//! module only reads the request and shapes the answer; `text` is the command's own
//! output, word for word.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{Map, Value, json};

use crate::config::Stage;
use crate::events::type_name;
use crate::explain::{Explanation, envelope, explain as explain_envelope};
use crate::server::App;
use crate::server::reply::{self, Body};

/// The keys the body takes.
const KEYS: &str = "event, data, object_id";

/// `POST /v1/explain`.
pub(crate) async fn explain(app: &Arc<App>, request: Request<Incoming>) -> Response<Body> {
    let snapshot = app.live.load_full();
    let config = &snapshot.config;
    let limit = usize::try_from(config.server.max_body).unwrap_or(usize::MAX);
    let body = match super::body(request, limit, "server.max_body", config.server.deadline).await {
        Ok(body) => body,
        Err(reply) => return reply,
    };
    let (event, object_id, data) = match parse(&body) {
        Ok(parts) => parts,
        Err(message) => return reply::error(StatusCode::BAD_REQUEST, message),
    };
    let envelope = match envelope(&event, object_id, Value::Object(data)) {
        Ok(envelope) => envelope,
        // Named as this body has them, not as an envelope's.
        Err(e) => {
            let message = e
                .to_string()
                .replace("`event.events_id`", "`event`")
                .replace("`event.object_id`", "`object_id`");
            return reply::error(StatusCode::BAD_REQUEST, message);
        }
    };
    let explanation = explain_envelope(config, &envelope);
    let mut answer = to_json(&explanation);
    answer["generation"] = json!(snapshot.generation);
    answer["text"] = json!(explanation.render(config));
    reply::json(StatusCode::OK, &answer)
}

/// The event name, object id and data of a request body, or what is wrong with it.
fn parse(body: &[u8]) -> Result<(String, Value, Map<String, Value>), String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        format!("the body is not valid JSON ({e}); send {{\"event\": NAME, \"data\": {{...}}, \"object_id\": N}}")
    })?;
    let Value::Object(mut body) = value else {
        return Err(format!(
            "the body must be a JSON object with {KEYS}, got {}",
            type_name(&value)
        ));
    };
    if let Some(key) = body
        .keys()
        .find(|k| !["event", "data", "object_id"].contains(&k.as_str()))
    {
        return Err(format!("unknown key {key:?}; the body takes {KEYS}"));
    }
    let event = match body.remove("event") {
        None | Some(Value::Null) => {
            return Err("missing `event`: the event name, e.g. \"clients.create\"".into());
        }
        Some(Value::String(s)) if !s.trim().is_empty() => s,
        Some(Value::String(_)) => return Err("`event` must not be empty".into()),
        Some(other) => {
            return Err(format!(
                "`event` must be a string (the event name), got {}",
                type_name(&other)
            ));
        }
    };
    let data = match body.remove("data") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(data)) => data,
        Some(other) => {
            return Err(format!(
                "`data` must be a JSON object, got {}",
                type_name(&other)
            ));
        }
    };
    // Absent, 1 as on the command line; null, as on the wire: the empty id.
    let object_id = match body.remove("object_id") {
        None => Value::from(1),
        Some(id @ (Value::Null | Value::Number(_) | Value::String(_))) => id,
        Some(other) => {
            return Err(format!(
                "`object_id` must be a number, a string or null, got {}",
                type_name(&other)
            ));
        }
    };
    Ok((event, object_id, data))
}

/// The explanation as JSON: who runs, in order, and why each other handler does not.
fn to_json(e: &Explanation) -> Value {
    let stage = Stage::as_str;
    let before: Vec<Value> = e
        .before
        .iter()
        .map(|h| {
            json!({"name": h.name, "priority": h.priority, "target": h.describe_target(),
                   "modifies": h.modifies})
        })
        .collect();
    let after: Vec<Value> = e
        .after
        .iter()
        .map(|h| json!({"name": h.name, "priority": h.priority, "target": h.describe_target()}))
        .collect();
    let not_run: Vec<Value> = e
        .not_run
        .iter()
        .map(|(h, _)| {
            json!({"name": h.name, "stage": stage(h.stage),
                   "reason": e.reason(&h.name).unwrap_or_default()})
        })
        .collect();
    let denied = e
        .denied
        .as_ref()
        .map(|(by, _)| json!({"handler": by, "reason": e.reason(by).unwrap_or_default()}));
    json!({
        "event": e.event,
        "object_id": e.object_id,
        "known": e.known,
        "suggestion": e.suggestion,
        "before": before,
        "after": after,
        "denied": denied,
        "not_run": not_run,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_checked_key_by_key() {
        let err = |body: &str| parse(body.as_bytes()).unwrap_err();
        assert!(err("{").starts_with("the body is not valid JSON"));
        assert!(
            err("[]")
                .starts_with("the body must be a JSON object with event, data, object_id, got")
        );
        assert_eq!(
            err(r#"{"event": "clients.create", "dat": {}}"#),
            "unknown key \"dat\"; the body takes event, data, object_id"
        );
        assert!(err("{}").starts_with("missing `event`"));
        assert_eq!(err(r#"{"event": ""}"#), "`event` must not be empty");
        assert!(err(r#"{"event": 3}"#).starts_with("`event` must be a string"));
        assert!(err(r#"{"event": "x", "data": [1]}"#).starts_with("`data` must be a JSON object"));
        assert!(
            err(r#"{"event": "x", "object_id": {}}"#)
                .starts_with("`object_id` must be a number, a string or null")
        );
        let (event, id, data) = parse(br#"{"event": "clients.create"}"#).unwrap();
        assert_eq!(
            (event.as_str(), id, data.len()),
            ("clients.create", json!(1), 0)
        );
    }
}
