//! Property tests: whatever bytes the billing or an operator's editor produce, parsing
//! never panics and bad input always gets a clean error.

use proptest::prelude::*;
use provisiond::config::{Config, ConfigErrors};
use provisiond::events::{DEFAULT_MAX_DEPTH, Envelope, MAX_ID_LEN, normalize};
use serde_json::Value;

/// What the envelope rules (README, "Pointing the billing at provisiond") say about a
/// JSON body: `None` when it is an envelope, else the words its error must contain (the
/// field that is wrong). Checked in the order the rules are written.
fn envelope_verdict(body: &Value) -> Option<&'static str> {
    let bad_id = |s: &str| s.len() > MAX_ID_LEN || s.chars().any(char::is_control);
    let Value::Object(body) = body else {
        return Some("must be a JSON object");
    };
    let Some(Value::Object(event)) = body.get("event") else {
        return Some("`event`");
    };
    match event.get("events_id") {
        Some(Value::String(s)) if !s.is_empty() && !bad_id(s) => {}
        _ => return Some("`event.events_id`"),
    }
    match event.get("object_id") {
        None | Some(Value::Null | Value::Number(_)) => {}
        Some(Value::String(s)) if !bad_id(s) => {}
        _ => return Some("`event.object_id`"),
    }
    match body.get("data") {
        Some(Value::Object(_)) => None,
        _ => Some("`data`"),
    }
}

/// Checks a parse of `value`'s JSON against [`envelope_verdict`]; an accepted envelope
/// must give back the event and data it was given, and serialise to JSON that parses
/// to the same envelope.
fn check_envelope(value: &Value) -> Result<(), TestCaseError> {
    let bytes = serde_json::to_vec(value).unwrap();
    let parsed = Envelope::parse(&bytes, DEFAULT_MAX_DEPTH);
    match (parsed, envelope_verdict(value)) {
        (Ok(envelope), None) => {
            prop_assert_eq!(
                &Value::Object(envelope.event.map().clone()),
                &value["event"]
            );
            prop_assert_eq!(&Value::Object(envelope.data.map().clone()), &value["data"]);
            let name = value["event"]["events_id"].as_str().unwrap();
            prop_assert_eq!(&envelope.name, &normalize(name));
            let again = Envelope::parse(&envelope.to_json(), DEFAULT_MAX_DEPTH).unwrap();
            prop_assert_eq!(again, envelope);
        }
        (Err(e), Some(words)) => {
            let message = e.to_string();
            prop_assert!(
                message.contains(words),
                "{} does not name {}",
                message,
                words
            );
        }
        (Ok(_), Some(words)) => {
            prop_assert!(false, "accepted, though {} is wrong: {}", words, value)
        }
        (Err(e), None) => prop_assert!(false, "refused an envelope ({}): {}", e, value),
    }
    Ok(())
}

/// Every error of a config that failed to load names the file and, when it has one, a
/// line and column inside the text.
fn check_positions(errors: &ConfigErrors, text: &str) -> Result<(), TestCaseError> {
    prop_assert!(!errors.is_empty());
    let lines = text.split('\n').count();
    for e in errors.iter() {
        prop_assert!(e.to_string().starts_with("p.toml"), "{}", e);
        prop_assert!(!e.message.is_empty(), "{}", e);
        if let (Some(line), Some(column)) = (e.line, e.column) {
            prop_assert!(
                line >= 1 && line <= lines,
                "{} is past the text:\n{}",
                e,
                text
            );
            let width = text.split('\n').nth(line - 1).unwrap().chars().count();
            prop_assert!(
                column >= 1 && column <= width + 1,
                "{} is past its line:\n{}",
                e,
                text
            );
        }
    }
    Ok(())
}

/// Arbitrary JSON values, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        // Finite, and read back as written (serde_json's float parsing is not exact for
        // every value; that is its business, not the envelope's).
        any::<f64>()
            .prop_filter_map("finite", serde_json::Number::from_f64)
            .prop_filter("reads back", |n| {
                serde_json::from_str::<serde_json::Number>(&n.to_string())
                    .ok()
                    .as_ref()
                    == Some(n)
            })
            .prop_map(Value::Number),
        ".*".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{0,8}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn envelope_parser_survives_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        match (Envelope::parse(&bytes, DEFAULT_MAX_DEPTH), serde_json::from_slice::<Value>(&bytes)) {
            // Not JSON: said so (or refused for its nesting before parsing).
            (Err(e), Err(_)) => {
                let message = e.to_string();
                prop_assert!(
                    message.starts_with("body is not valid JSON") || message.contains("nests deeper"),
                    "{}", message
                );
            }
            (Ok(_), Err(e)) => prop_assert!(false, "accepted bytes that are not JSON: {}", e),
            (_, Ok(value)) => check_envelope(&value)?,
        }
    }

    #[test]
    fn envelope_parser_survives_any_json(value in json_value()) {
        check_envelope(&value)?;
    }

    #[test]
    fn envelope_parser_survives_envelope_shaped_json(
        event in json_value(),
        data in json_value(),
        id in prop_oneof![json_value(), "\\PC{0,300}".prop_map(Value::String), ".{0,12}".prop_map(Value::String)],
        object_id in prop_oneof![json_value(), ".{0,12}".prop_map(Value::String)],
    ) {
        let mut event = event;
        if let Value::Object(map) = &mut event {
            map.insert("events_id".into(), id);
            map.insert("object_id".into(), object_id);
        }
        let body = serde_json::json!({"event": event, "data": data});
        check_envelope(&body)?;
    }

    #[test]
    fn config_loader_survives_any_text(text in ".{0,400}") {
        if let Err(errors) = Config::parse_with_env(&text, "p.toml", std::path::Path::new("."), &|_| None) {
            check_positions(&errors, &text)?;
        }
    }

    #[test]
    fn config_loader_survives_toml_shaped_text(
        lines in prop::collection::vec(
            prop_oneof![
                Just("[server]".to_owned()),
                Just("[[handler]]".to_owned()),
                Just("[store]".to_owned()),
                Just("[handler.match]".to_owned()),
                "(name|events|stage|url|command|timeout|priority|match|when|listen|extra|retry) = ".prop_flat_map(|k| {
                    prop_oneof![
                        Just(format!("{k}\"x\"")),
                        Just(format!("{k}[\"clients.*\", 1]")),
                        Just(format!("{k}{{ lt = 0 }}")),
                        Just(format!("{k}\"${{X}}\"")),
                        Just(format!("{k}-5")),
                        Just(format!("{k}\"before\"")),
                        Just(format!("{k}\"10s\"")),
                        Just(format!("{k}\"http://127.0.0.1:1/\"")),
                    ]
                }),
                ".{0,30}",
            ],
            0..24,
        )
    ) {
        let text = lines.join("\n");
        match Config::parse_with_env(&text, "p.toml", std::path::Path::new("."), &|_| None) {
            Err(errors) => check_positions(&errors, &text)?,
            // What loads has as many handlers as the text has `[[handler]]` tables.
            Ok(config) => prop_assert_eq!(
                config.handlers.len(),
                lines.iter().filter(|l| l.as_str() == "[[handler]]").count(),
                "{}", text
            ),
        }
    }
}

/// Arbitrary TOML documents built from arbitrary values, in every section.
fn toml_value() -> impl Strategy<Value = toml::Value> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(toml::Value::Boolean),
        any::<i64>().prop_map(toml::Value::Integer),
        ".{0,12}".prop_map(toml::Value::String),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(toml::Value::Array),
            prop::collection::btree_map("[a-z_.]{1,10}", inner, 0..6)
                .prop_map(|m| toml::Value::Table(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn config_loader_survives_arbitrary_toml_documents(
        handlers in prop::collection::vec(prop::collection::btree_map(
            "(name|events|stage|url|command|timeout|priority|match|when|modifies|retry|env|headers|x)", toml_value(), 0..8), 0..4),
        server in prop::collection::btree_map("(listen|max_body|deadline|token|x)", toml_value(), 0..4),
    ) {
        let mut doc = toml::Table::new();
        doc.insert("server".into(), toml::Value::Table(server.into_iter().collect()));
        doc.insert(
            "handler".into(),
            toml::Value::Array(handlers.into_iter().map(|h| toml::Value::Table(h.into_iter().collect())).collect()),
        );
        let text = toml::to_string(&doc).unwrap();
        if let Err(errors) = Config::parse_with_env(&text, "p.toml", std::path::Path::new("."), &|_| None) {
            check_positions(&errors, &text)?;
            for e in errors.iter() {
                prop_assert!(e.line.is_some(), "{} has no position in:\n{}", e, text);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Placeholders stand in for missing required keys so that the rest of a handler is
    /// checked, but a handler without `name`, `events` or `stage` never loads.
    #[test]
    fn a_handler_without_a_required_key_never_loads(
        missing in prop::sample::select(vec!["name", "events", "stage"]),
        stage in prop::sample::select(vec!["before", "after", "Before", "AFTER", "x"]),
        extra in prop::collection::btree_map(
            "(priority|retry|modifies|on_error|timeout|x)", toml_value(), 0..3),
    ) {
        let mut handler = toml::Table::new();
        handler.insert("name".into(), "h".into());
        handler.insert("events".into(), toml::Value::Array(vec!["*".into()]));
        handler.insert("stage".into(), stage.into());
        handler.insert("url".into(), "http://127.0.0.1:1/".into());
        handler.extend(extra);
        handler.remove(missing);
        let mut doc = toml::Table::new();
        doc.insert("handler".into(), toml::Value::Array(vec![toml::Value::Table(handler)]));
        let text = toml::to_string(&doc).unwrap();
        let errors = Config::parse_with_env(&text, "p.toml", std::path::Path::new("."), &|_| None)
            .expect_err("loaded a handler without a required key");
        prop_assert!(
            errors.iter().any(|e| e.message.contains(&format!("missing `{missing}`"))),
            "{} in:\n{}", errors, text
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Valid handlers load as written: the names, stages, priorities and timeouts the
    /// text gives, in file order.
    #[test]
    fn valid_handlers_load_as_written(
        handlers in prop::collection::vec(
            ("[a-z][a-z0-9_-]{0,10}", prop::bool::ANY, -1000i64..1000, 1u64..3_600_000),
            1..6,
        ),
    ) {
        let mut text = String::from("# generated\n");
        for (i, (name, before, priority, timeout_ms)) in handlers.iter().enumerate() {
            text.push_str(&format!(
                "[[handler]]\nname = \"{name}{i}\"\nevents = [\"clients.*\"]\nstage = \"{}\"\n\
                 priority = {priority}\ntimeout = \"{timeout_ms}ms\"\nurl = \"http://127.0.0.1:1/\"\n",
                if *before { "before" } else { "after" },
            ));
        }
        let config = Config::parse_with_env(&text, "p.toml", std::path::Path::new("."), &|_| None)
            .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(config.handlers.len(), handlers.len());
        for (i, (h, (name, before, priority, timeout_ms))) in config.handlers.iter().zip(&handlers).enumerate() {
            prop_assert_eq!(&h.name, &format!("{name}{i}"));
            prop_assert_eq!(h.stage == provisiond::config::Stage::Before, *before);
            prop_assert_eq!(h.priority, *priority);
            prop_assert_eq!(h.timeout, std::time::Duration::from_millis(*timeout_ms));
            prop_assert_eq!(h.position, i);
        }
    }
}
