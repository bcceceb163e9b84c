//! Every default of the file, written once: the JSON Schema shows these (the `default`
//! of each key in [`super::raw`]) and the compile step applies them
//! ([`super::compile`]); a test checks that an empty file compiles to exactly what the
//! schema says.

use std::time::Duration;

pub const LISTEN: &str = "127.0.0.1:8600";
pub const ALLOW_INSECURE: bool = false;
pub const MAX_BODY: &str = "1MiB";
pub const DEADLINE: &str = "10s";
pub const MAX_DEPTH: u32 = 64;
/// The deepest `server.max_depth`: serde_json's own nesting limit.
pub const MAX_DEPTH_LIMIT: u32 = 128;
pub const MAX_IN_FLIGHT: u32 = 1024;
pub const MAX_CONNECTIONS: u32 = 1024;
pub const HEADER_TIMEOUT: &str = "10s";
pub const SHUTDOWN_GRACE: &str = "10s";

pub const BACKEND: &str = "redb";
pub const STORE_PATH: &str = "provisiond.db";
pub const PG_SCHEMA: &str = "provisiond";
pub const PG_POOL: u32 = 8;
/// The largest `store.pool`.
pub const PG_POOL_MAX: u32 = 64;
pub const PG_LEASE: &str = "30s";
pub const DEDUPE_WINDOW: &str = "10m";
pub const KEEP_AGE: &str = "7d";
pub const KEEP_ROWS: u64 = 100_000;

pub const TIMEOUT: &str = "5s";
pub const ON_ERROR: &str = "allow";
pub const MAX_CONCURRENCY: u32 = 16;
pub const RETRY_ATTEMPTS: u32 = 25;
pub const RETRY_BACKOFF: &str = "1s";
pub const RETRY_MAX_BACKOFF: &str = "10m";

pub const PRIORITY: i64 = 100;
pub const ENABLED: bool = true;
pub const MODIFIES: bool = false;
pub const METHOD: &str = "POST";

/// The whole numbers the integer key `key` accepts (keys are named alike in every
/// section: `max_concurrency` in `[defaults]` and in a handler); `None` for other keys.
/// One range a key, whichever stage refuses a value: the compile step (`0`, `65` for
/// `pool`) or the raw layer, whose type cannot hold it (`-1`, `99999999999`).
pub fn whole_range(key: &str) -> Option<std::ops::RangeInclusive<i128>> {
    let up_to = |max: u64| 1..=i128::from(max);
    Some(match key {
        "max_depth" => up_to(MAX_DEPTH_LIMIT.into()),
        "pool" => up_to(PG_POOL_MAX.into()),
        "max_in_flight" | "max_connections" | "max_concurrency" | "attempts" => {
            up_to(u32::MAX.into())
        }
        "rows" => up_to(u64::MAX),
        "priority" => i128::from(i64::MIN)..=i128::from(i64::MAX),
        _ => return None,
    })
}

/// What `check` says of a value of `key` outside [`whole_range`]:
/// `must be between 1 and 64`.
pub fn out_of_range(key: &str) -> Option<String> {
    let range = whole_range(key)?;
    let why = match key {
        // serde_json reads no deeper: a deeper `data` would be accepted as bytes that a
        // filter could not read.
        "max_depth" => " (the deepest JSON provisiond reads)",
        _ => "",
    };
    Some(format!(
        "must be between {} and {}{why}",
        range.start(),
        range.end()
    ))
}

/// `d` the way the config writes durations: "10s", "250ms".
pub fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// A default duration, as the compile step uses it.
pub fn duration(text: &str) -> Duration {
    humantime::parse_duration(text).expect("a default duration parses")
}

/// A default size in bytes.
pub fn size(text: &str) -> u64 {
    text.parse::<bytesize::ByteSize>()
        .expect("a default size parses")
        .as_u64()
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use crate::config::{Config, OnError, Target};

    /// What the JSON Schema documents as `definition.property`'s default.
    fn documented(definition: &str, property: &str) -> Value {
        let schema = serde_json::to_value(schemars::schema_for!(crate::config::RawConfig))
            .expect("the schema serialises");
        let found = schema["$defs"][definition]["properties"][property]["default"].clone();
        assert!(
            !found.is_null(),
            "{definition}.{property} documents no default"
        );
        found
    }

    fn duration(definition: &str, property: &str) -> std::time::Duration {
        humantime::parse_duration(documented(definition, property).as_str().unwrap()).unwrap()
    }

    #[test]
    fn an_empty_config_compiles_to_exactly_the_documented_defaults() {
        let config = Config::parse("", "provisioning.toml").unwrap();
        let server = &config.server;
        assert_eq!(
            json!(server.listen.to_string()),
            documented("RawServer", "listen")
        );
        assert!(server.token.is_none());
        let max_body = documented("RawServer", "max_body");
        assert_eq!(
            server.max_body,
            max_body
                .as_str()
                .unwrap()
                .parse::<bytesize::ByteSize>()
                .unwrap()
                .as_u64()
        );
        assert_eq!(server.deadline, duration("RawServer", "deadline"));
        assert_eq!(
            json!(server.max_depth),
            documented("RawServer", "max_depth")
        );
        assert_eq!(
            json!(server.max_in_flight),
            documented("RawServer", "max_in_flight")
        );
        assert_eq!(
            json!(server.max_connections),
            documented("RawServer", "max_connections")
        );
        assert_eq!(
            server.header_timeout,
            duration("RawServer", "header_timeout")
        );
        assert_eq!(
            server.shutdown_grace,
            duration("RawServer", "shutdown_grace")
        );
        assert_eq!(documented("RawServer", "allow_insecure"), json!(false));

        let store = &config.store;
        assert_eq!(json!("redb"), documented("RawStore", "backend"));
        assert_eq!(store.backend, crate::config::Backend::Redb);
        assert_eq!(json!(store.path), documented("RawStore", "path"));
        assert_eq!(store.dedupe_window, duration("RawStore", "dedupe_window"));
        assert_eq!(store.keep_age, duration("RawRetention", "age"));
        assert_eq!(json!(store.keep_rows), documented("RawRetention", "rows"));
        assert!(config.handlers.is_empty() && config.extra_events.is_empty());
    }

    #[test]
    fn a_bare_postgres_store_gets_exactly_the_documented_defaults() {
        let text = "[store]\nbackend = \"postgres\"\nurl = \"postgres://db/billing\"\n";
        let config = Config::parse(text, "provisioning.toml").unwrap();
        let crate::config::Backend::Postgres(pg) = &config.store.backend else {
            panic!("a postgres store")
        };
        assert_eq!(json!(pg.schema), documented("RawStore", "schema"));
        assert_eq!(json!(pg.pool), documented("RawStore", "pool"));
        assert_eq!(pg.lease, duration("RawStore", "lease"));
        assert_eq!(pg.url.expose(), "postgres://db/billing");
    }

    #[test]
    fn a_bare_handler_gets_exactly_the_documented_defaults() {
        let text = "[[handler]]\nname = \"a\"\nevents = [\"*\"]\nstage = \"after\"\n\
                    url = \"http://127.0.0.1:1/\"\n\
                    [[handler]]\nname = \"b\"\nevents = [\"*\"]\nstage = \"before\"\n\
                    url = \"http://127.0.0.1:1/\"\n";
        let config = Config::parse(text, "provisioning.toml").unwrap();
        for h in &config.handlers {
            assert_eq!(json!(h.priority), documented("RawHandler", "priority"));
            assert_eq!(json!(h.enabled), documented("RawHandler", "enabled"));
            assert_eq!(json!(h.modifies), documented("RawHandler", "modifies"));
            assert_eq!(h.timeout, duration("RawDefaults", "timeout"));
            assert_eq!(
                json!(h.max_concurrency),
                documented("RawDefaults", "max_concurrency")
            );
            let on_error: OnError =
                serde_json::from_value(documented("RawDefaults", "on_error")).unwrap();
            assert_eq!(h.on_error, on_error);
            assert_eq!(json!(h.retry.attempts), documented("RawRetry", "attempts"));
            assert_eq!(h.retry.backoff, duration("RawRetry", "backoff"));
            assert_eq!(h.retry.max_backoff, duration("RawRetry", "max_backoff"));
            let Target::Http(http) = &h.target else {
                panic!("an HTTP handler")
            };
            assert_eq!(
                json!(http.method.as_str()),
                documented("RawHandler", "method")
            );
        }
    }

    #[test]
    fn the_methods_the_schema_offers_are_exactly_those_check_takes() {
        let schema = serde_json::to_value(schemars::schema_for!(crate::config::RawConfig))
            .expect("the schema serialises");
        let offered = schema["$defs"]["RawHandler"]["properties"]["method"]["enum"]
            .as_array()
            .expect("an enum")
            .clone();
        let compiles = |method: &str| {
            let text = format!(
                "[[handler]]\nname = \"h\"\nevents = [\"*\"]\nstage = \"after\"\n\
                 url = \"http://127.0.0.1:9/\"\nmethod = \"{method}\"\n"
            );
            Config::parse(&text, "provisioning.toml").is_ok()
        };
        for method in &offered {
            assert!(compiles(method.as_str().unwrap()), "{method}");
        }
        for refused in ["GET", "get", "DELETE", ""] {
            assert!(!compiles(refused), "{refused}");
            assert!(!offered.contains(&json!(refused)), "{refused}");
        }
    }
}
