//! Property tests: whatever bytes the billing or an operator's editor produce, parsing
//! never panics and bad input always gets a clean error.

use proptest::prelude::*;
use provisiond::config::Config;
use provisiond::events::{DEFAULT_MAX_DEPTH, Envelope};
use serde_json::Value;

/// Arbitrary JSON values, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        any::<f64>()
            .prop_filter_map("finite", serde_json::Number::from_f64)
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
        let _ = Envelope::parse(&bytes, DEFAULT_MAX_DEPTH);
    }

    #[test]
    fn envelope_parser_survives_any_json(value in json_value()) {
        let bytes = serde_json::to_vec(&value).unwrap();
        match Envelope::parse(&bytes, DEFAULT_MAX_DEPTH) {
            Ok(envelope) => {
                // Whatever it accepted round-trips to the same event and data.
                prop_assert_eq!(&Value::Object(envelope.event.clone()), &value["event"]);
                prop_assert_eq!(&Value::Object(envelope.data.clone()), &value["data"]);
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn envelope_parser_survives_envelope_shaped_json(event in json_value(), data in json_value(), id in json_value()) {
        let mut event = event;
        if let Value::Object(map) = &mut event {
            map.insert("events_id".into(), id);
        }
        let body = serde_json::json!({"event": event, "data": data});
        let _ = Envelope::parse(body.to_string().as_bytes(), DEFAULT_MAX_DEPTH);
    }

    #[test]
    fn config_loader_survives_any_text(text in ".{0,400}") {
        if let Err(errors) = Config::parse_with_env(&text, "p.toml", std::path::Path::new("."), &|_| None) {
            prop_assert!(!errors.is_empty());
            for e in errors.iter() {
                prop_assert!(e.to_string().starts_with("p.toml"));
            }
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
        if let Err(errors) = Config::parse_with_env(&text, "p.toml", std::path::Path::new("."), &|_| None) {
            prop_assert!(!errors.is_empty());
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
            prop_assert!(!errors.is_empty());
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
