//! The second stage: raw types to a validated [`Config`], every rule checked, every
//! error collected with its key path.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sha2::Digest as _;

use super::conninfo;
use super::defaults;
use super::error::{ConfigErrors, KeyPath, Seg};
use super::raw::{OnError, RawConfig, RawDefaults, RawRetry, RawServer, RawStore};
use super::source::{Diag, Document};
use super::{Backend, Config, Listen, Postgres, Retry, Secret, Server, Store};
use crate::events;

mod handler;

pub(super) use handler::on_path;

/// The longest duration any key accepts: one year (`"1y"`, 365.25 days, as humantime
/// counts it). Longer values are mistakes (`"500000000000y"` once overflowed a deadline
/// on every event); a year is more than any timeout, backoff, window or retention a
/// sidecar needs.
pub const MAX_DURATION: Duration = Duration::from_secs(31_557_600);

/// `[defaults] retry`, as the schema documents it.
fn default_retry() -> Retry {
    Retry {
        attempts: defaults::RETRY_ATTEMPTS,
        backoff: defaults::duration(defaults::RETRY_BACKOFF),
        max_backoff: defaults::duration(defaults::RETRY_MAX_BACKOFF),
    }
}

/// `[defaults] on_error`, as the schema documents it.
fn default_on_error() -> OnError {
    serde_json::from_value(serde_json::Value::from(defaults::ON_ERROR))
        .expect("the default on_error is a valid value")
}

pub(super) fn compile(
    text: &str,
    file: &str,
    base: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let mut doc = match Document::parse(text) {
        Ok(doc) => doc,
        Err(diags) => {
            let errors = super::source::resolve(text, file, diags, |_| None);
            return Err(ConfigErrors(errors));
        }
    };
    // The values substituted from the environment, to keep them out of messages, and
    // the variables that are set but empty, for messages about empty values.
    let substituted = std::cell::RefCell::new(Vec::new());
    let empty_vars = std::cell::RefCell::new(Vec::new());
    let recording = |name: &str| {
        let value = env(name);
        match &value {
            Some(v) if v.is_empty() => empty_vars.borrow_mut().push(name.to_owned()),
            Some(v) => substituted.borrow_mut().push(v.clone()),
            None => {}
        }
        value
    };
    let mut diags = doc.substitute_env(&recording);
    let (parsed, more) = doc.deserialize();
    diags.extend(more);

    let hidden = super::Hidden::new(&substituted.borrow());
    let mut checker = Checker {
        earlier: diags.len(),
        diags,
        hidden: hidden.clone(),
        originals: &doc.originals,
        empty_vars: &empty_vars.take(),
        synthetic: &parsed.synthetic,
        warnings: Vec::new(),
    };
    let config = checker.config(&parsed.raw, &parsed.handler_index, file, base, text);
    // A placeholder is only ever put in for a key whose error was reported.
    debug_assert!(parsed.synthetic.is_empty() || !checker.diags.is_empty());
    if checker.diags.is_empty() {
        Ok(config)
    } else {
        let mut errors = doc.resolve(file, checker.diags);
        for error in &mut errors {
            error.message = hidden.mask(std::mem::take(&mut error.message));
        }
        Err(ConfigErrors(errors))
    }
}

/// `` `A`, `B` ``: variable names as messages list them.
fn quoted_list(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    quoted.join(", ")
}

/// Collects problems while building the config; whatever it builds is thrown away when
/// there was any.
struct Checker<'a> {
    diags: Vec<Diag>,
    /// How many of `diags` came before this stage: a `${VAR}` missing, a value of the
    /// wrong type.
    earlier: usize,
    originals: &'a HashMap<KeyPath, String>,
    /// The values substituted from the environment (every handler keeps them, to mask
    /// them in what it answers).
    hidden: super::Hidden,
    /// Variables that are set, but to an empty string.
    empty_vars: &'a [String],
    /// Paths of placeholders the raw layer put in for missing or wrong required keys.
    synthetic: &'a [KeyPath],
    /// Problems that do not stop the load (see [`Config::warnings`]).
    warnings: Vec<String>,
}

impl Checker<'_> {
    /// Records a problem, unless it is about a placeholder (see [`Self::is_synthetic`]),
    /// or about a value whose problem was found before this stage: a `${VAR}` that is
    /// not set leaves the reference in the value, which is then no URL or secret, but
    /// the variable is what to fix.
    fn error(&mut self, path: KeyPath, message: impl Into<String>) {
        let reported = self.diags[..self.earlier].iter().any(|d| d.path == path);
        if !self.is_synthetic(&path) && !reported {
            self.diags.push(Diag::at(path, message));
        }
    }

    /// Whether `path` is, or is under, a placeholder value: what the file had there was
    /// already reported, and anything said about the placeholder would be noise.
    fn is_synthetic(&self, path: &KeyPath) -> bool {
        self.synthetic.iter().any(|s| path.0.starts_with(&s.0))
    }

    /// The variables the value at `path` was made from that are set but empty (each
    /// `${NAME}` of them was replaced by nothing).
    fn empty_in(&self, path: &KeyPath) -> Vec<&str> {
        let Some(written) = self.originals.get(path) else {
            return Vec::new();
        };
        super::env::env_references(written)
            .into_iter()
            .filter(|n| self.empty_vars.iter().any(|e| e == n))
            .filter(|n| written.contains(&format!("${{{n}}}")))
            .collect()
    }

    /// ` (the value came from the environment variable `CRM_URL`)`, naming the variables
    /// the value at `path` was made from, if it was, and those of them that are set but
    /// empty (`${NAME}` is then replaced by nothing).
    fn env_note(&self, path: &KeyPath) -> String {
        let Some(written) = self.originals.get(path) else {
            return String::new();
        };
        let names = super::env::env_references(written);
        let empty = self.empty_in(path);
        let empty = match empty.as_slice() {
            [] => String::new(),
            [_] if names.len() == 1 => ", which is set but empty".to_owned(),
            [one] => format!("; `{one}` is set but empty"),
            many => format!("; {} are set but empty", quoted_list(many)),
        };
        match names.as_slice() {
            [] => String::new(),
            [one] => format!(" (the value came from the environment variable `{one}`{empty})"),
            many => format!(
                " (the value came from the environment variables {}{empty})",
                quoted_list(many)
            ),
        }
    }

    fn duration(&mut self, value: Option<&str>, path: KeyPath, default: Duration) -> Duration {
        let Some(text) = value else { return default };
        if text.trim().starts_with('-') {
            self.error(
                path,
                format!("invalid duration {text:?}: durations cannot be negative"),
            );
            return default;
        }
        match humantime::parse_duration(text.trim()) {
            Ok(d) if d > MAX_DURATION => {
                self.error(
                    path,
                    format!(
                        "duration {text:?} is too long: at most 1 year (\"1y\", \"365d\") is \
                         accepted"
                    ),
                );
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.error(
                    path,
                    format!(
                        "invalid duration {text:?}: {e}; write a number with a unit, \
                         e.g. \"250ms\", \"5s\", \"10m\""
                    ),
                );
                default
            }
        }
    }

    fn positive_duration(
        &mut self,
        value: Option<&str>,
        path: KeyPath,
        default: Duration,
    ) -> Duration {
        let d = self.duration(value, path.clone(), default);
        if d.is_zero() {
            self.error(path, "must be longer than zero");
            return default;
        }
        d
    }

    fn size(&mut self, value: Option<&str>, path: KeyPath, default: u64) -> u64 {
        let Some(text) = value else { return default };
        let message = match bytes(text.trim()) {
            Ok(0) => "must be larger than zero".to_owned(),
            Ok(size) => return size,
            Err(SizeError::NoUnit(number)) => format!(
                "invalid size {text:?}: size unit needed, e.g. \"{number}B\" or \"{number}KiB\""
            ),
            Err(SizeError::TooLarge) => format!(
                "size {text:?} is too large: at most 16 EiB less one byte (\"{}B\") is \
                 accepted",
                u64::MAX
            ),
            Err(SizeError::Invalid) => format!(
                "invalid size {text:?}; write a number with a unit, e.g. \"512KiB\", \"1MiB\""
            ),
        };
        self.error(path, message);
        default
    }

    /// An integer key: its value when in the key's range ([`defaults::whole_range`]),
    /// else an error saying the range, and `default`.
    fn whole<T: Copy + Into<i128>>(&mut self, value: Option<T>, path: KeyPath, default: T) -> T {
        let Some(n) = value else { return default };
        let Some(Seg::Key(key)) = path.0.last() else {
            return n;
        };
        match defaults::whole_range(key) {
            Some(range) if !range.contains(&n.into()) => {
                let message = defaults::out_of_range(key).unwrap_or_default();
                self.error(path, message);
                default
            }
            _ => n,
        }
    }

    fn config(
        &mut self,
        raw: &RawConfig,
        handler_index: &[usize],
        file: &str,
        base: &Path,
        text: &str,
    ) -> Config {
        let server = self.server(raw.server.as_ref().unwrap_or(&RawServer::default()));
        let store = self.store(raw.store.as_ref().unwrap_or(&RawStore::default()));
        let extra_events = self.extra_events(raw);
        let defaults = self.defaults(raw.defaults.as_ref().unwrap_or(&RawDefaults::default()));

        let mut known: Vec<String> = events::CATALOGUE.iter().map(|s| (*s).to_owned()).collect();
        known.extend(extra_events.iter().cloned());

        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut handlers = Vec::new();
        for (raw_handler, &index) in raw.handler.iter().zip(handler_index) {
            let path = KeyPath::root().key("handler").index(index);
            if self.is_synthetic(&path.key("name")) {
                // A placeholder name clashes with nothing.
            } else if let Some(first) = seen.get(&raw_handler.name) {
                self.error(
                    path.key("name"),
                    format!(
                        "duplicate handler name {:?} (first used by handler[{first}])",
                        raw_handler.name
                    ),
                );
            } else {
                seen.insert(raw_handler.name.clone(), index);
            }
            if let Some(h) = self.handler(raw_handler, index, &path, &defaults, &known, base) {
                handlers.push(Arc::new(h));
            }
        }

        Config {
            file: file.to_owned(),
            hash: hex(&sha2::Sha256::digest(text.as_bytes())),
            server,
            store,
            extra_events,
            handlers,
            env_warnings: std::mem::take(&mut self.warnings),
        }
    }

    fn server(&mut self, raw: &RawServer) -> Server {
        let path = KeyPath::root().key("server");
        let listen_text = raw.listen.as_deref().unwrap_or(defaults::LISTEN);
        let listen = match parse_listen(listen_text) {
            Ok(l) => l,
            Err(e) => {
                self.error(path.key("listen"), e);
                Listen::Tcp(defaults::LISTEN.parse().expect("default listen parses"))
            }
        };
        let token = match raw.token.as_deref() {
            Some("") => {
                let from_env = self.env_note(&path.key("token"));
                let fix = if from_env.is_empty() {
                    "remove the key to turn authentication off"
                } else {
                    "give the variable the token, or remove the key to turn authentication off"
                };
                self.error(path.key("token"), format!("is empty{from_env}; {fix}"));
                None
            }
            Some(t) => Some(Secret::new(t.to_owned())),
            None => None,
        };
        let server = Server {
            listen,
            token,
            allow_insecure: raw.allow_insecure.unwrap_or(defaults::ALLOW_INSECURE),
            max_body: self.size(
                raw.max_body.as_deref(),
                path.key("max_body"),
                defaults::size(defaults::MAX_BODY),
            ),
            deadline: self.positive_duration(
                raw.deadline.as_deref(),
                path.key("deadline"),
                defaults::duration(defaults::DEADLINE),
            ),
            max_depth: self.whole(raw.max_depth, path.key("max_depth"), defaults::MAX_DEPTH)
                as usize,
            max_in_flight: self.whole(
                raw.max_in_flight,
                path.key("max_in_flight"),
                defaults::MAX_IN_FLIGHT,
            ) as usize,
            max_connections: self.whole(
                raw.max_connections,
                path.key("max_connections"),
                defaults::MAX_CONNECTIONS,
            ) as usize,
            header_timeout: self.positive_duration(
                raw.header_timeout.as_deref(),
                path.key("header_timeout"),
                defaults::duration(defaults::HEADER_TIMEOUT),
            ),
            shutdown_grace: self.duration(
                raw.shutdown_grace.as_deref(),
                path.key("shutdown_grace"),
                defaults::duration(defaults::SHUTDOWN_GRACE),
            ),
        };
        if let Some(message) = server.unguarded() {
            self.error(path.key("listen"), message);
        }
        server
    }

    fn store(&mut self, raw: &RawStore) -> Store {
        let path = KeyPath::root().key("store");
        let file = raw.path.as_deref().unwrap_or(defaults::STORE_PATH);
        if file.trim().is_empty() && raw.backend.as_deref() != Some("postgres") {
            self.error(path.key("path"), "must not be empty");
        }
        let keep = raw.keep_executions.clone().unwrap_or_default();
        let keep_path = path.key("keep_executions");
        let keep_rows = self.whole(keep.rows, keep_path.key("rows"), defaults::KEEP_ROWS);
        let backend = self.backend(raw, &path);
        Store {
            path: PathBuf::from(file),
            backend,
            dedupe_window: self.duration(
                raw.dedupe_window.as_deref(),
                path.key("dedupe_window"),
                defaults::duration(defaults::DEDUPE_WINDOW),
            ),
            keep_age: self.positive_duration(
                keep.age.as_deref(),
                keep_path.key("age"),
                defaults::duration(defaults::KEEP_AGE),
            ),
            keep_rows,
        }
    }

    /// `store.backend` and the keys that go with it: `path` only with "redb"; `url`,
    /// `schema`, `pool` and `lease` only with "postgres", which needs `url`.
    fn backend(&mut self, raw: &RawStore, path: &KeyPath) -> Backend {
        let postgres_keys = [
            ("url", raw.url.is_some()),
            ("schema", raw.schema.is_some()),
            ("pool", raw.pool.is_some()),
            ("lease", raw.lease.is_some()),
        ];
        match raw.backend.as_deref().unwrap_or(defaults::BACKEND) {
            "redb" => {
                let which = if raw.backend.is_some() {
                    "backend is \"redb\""
                } else {
                    "backend is \"redb\" (the default)"
                };
                for (key, set) in postgres_keys {
                    if set {
                        self.error(
                            path.key(key),
                            format!(
                                "only applies to backend = \"postgres\"; this store's {which}: \
                                 set store.backend = \"postgres\" or remove the key"
                            ),
                        );
                    }
                }
                Backend::Redb
            }
            "postgres" => {
                if raw.path.is_some() {
                    self.error(
                        path.key("path"),
                        "only applies to backend = \"redb\"; with \"postgres\" the data lives \
                         in the database at store.url: remove the key",
                    );
                }
                match self.postgres(raw, path) {
                    Some(pg) => Backend::Postgres(pg),
                    None => Backend::Redb,
                }
            }
            other => {
                self.error(
                    path.key("backend"),
                    format!(
                        "unknown backend {other:?}; expected \"redb\" (one file, for this \
                         sidecar alone) or \"postgres\" (a database shared by several sidecars)"
                    ),
                );
                Backend::Redb
            }
        }
    }

    /// `backend = "postgres"`: `None` when `url` is missing or wrong (reported).
    fn postgres(&mut self, raw: &RawStore, path: &KeyPath) -> Option<Postgres> {
        let schema = raw.schema.as_deref().unwrap_or(defaults::PG_SCHEMA);
        if !is_plain_identifier(schema) {
            self.error(
                path.key("schema"),
                format!(
                    "{schema:?} is not a plain lower-case SQL identifier: use a-z, 0-9 and '_', \
                     not starting with a digit, at most 63 characters"
                ),
            );
        } else if schema.starts_with("pg_") {
            // PostgreSQL keeps these names for its own schemas.
            self.error(
                path.key("schema"),
                format!("{schema:?} starts with \"pg_\", which PostgreSQL keeps for itself"),
            );
        }
        let pool = self.whole(raw.pool, path.key("pool"), defaults::PG_POOL);
        let default_lease = defaults::duration(defaults::PG_LEASE);
        let lease = match self.duration(raw.lease.as_deref(), path.key("lease"), default_lease) {
            d if d < Duration::from_secs(1) => {
                self.error(path.key("lease"), "must be at least 1s");
                default_lease
            }
            d => d,
        };
        let url_path = path.key("url");
        let from_env = self.env_note(&url_path);
        let url = match raw.url.as_deref() {
            None => {
                self.error(
                    path.key("backend"),
                    "backend \"postgres\" needs store.url, the database to use: give it \
                     through the environment, url = \"${PROVISIOND_PG_URL}\"",
                );
                return None;
            }
            Some(url) if url.trim().is_empty() => {
                self.error(url_path, format!("is empty{from_env}"));
                return None;
            }
            Some(url) => url,
        };
        let (connect, tls) = match conninfo::split_tls(url) {
            Ok(split) => split,
            Err(problem) => {
                self.error(url_path, format!("{problem}{from_env}"));
                return None;
            }
        };
        let conninfo = match tokio_postgres::Config::from_str(&connect) {
            Ok(conninfo) => conninfo,
            Err(e) => {
                self.error(
                    url_path,
                    format!(
                        "not a PostgreSQL URL or key=value string: {}{from_env}",
                        conninfo_problem(&e, &connect)
                    ),
                );
                return None;
            }
        };
        if let Some(problem) = conninfo::tls_unreachable(&conninfo, tls.mode) {
            self.error(url_path, format!("{problem}{from_env}"));
            return None;
        }
        let files = tls
            .root
            .as_ref()
            .and_then(|root| match root {
                conninfo::Root::File(file) => conninfo::read_root_certificates(file).err(),
                conninfo::Root::System => None,
            })
            .or_else(|| {
                let client = tls.client.as_ref()?;
                conninfo::read_client_certificate(client).err()
            });
        if let Some(problem) = files {
            self.error(url_path, format!("{problem}{from_env}"));
            return None;
        }
        Some(Postgres {
            url: Secret::new(url.to_owned()),
            connect: Secret::new(connect),
            tls,
            schema: schema.to_owned(),
            pool: pool as usize,
            lease,
        })
    }

    fn extra_events(&mut self, raw: &RawConfig) -> Vec<String> {
        let Some(events) = &raw.events else {
            return Vec::new();
        };
        let path = KeyPath::root().key("events").key("extra");
        let mut out = Vec::new();
        for (i, name) in events.extra.iter().enumerate() {
            if events::is_well_formed(name) {
                out.push(events::normalize(name).into_owned());
            } else {
                self.error(
                    path.index(i),
                    format!("{name:?} is not a valid event name (dot-separated lower-case words)"),
                );
            }
        }
        out
    }

    fn defaults(&mut self, raw: &RawDefaults) -> Defaults {
        let path = KeyPath::root().key("defaults");
        Defaults {
            timeout: self.positive_duration(
                raw.timeout.as_deref(),
                path.key("timeout"),
                defaults::duration(defaults::TIMEOUT),
            ),
            on_error: raw.on_error.unwrap_or_else(default_on_error),
            max_concurrency: self.whole(
                raw.max_concurrency,
                path.key("max_concurrency"),
                defaults::MAX_CONCURRENCY,
            ) as usize,
            retry: self.retry(raw.retry.as_ref(), &path.key("retry"), default_retry()),
        }
    }

    fn retry(&mut self, raw: Option<&RawRetry>, path: &KeyPath, default: Retry) -> Retry {
        let Some(raw) = raw else { return default };
        let attempts = self.whole(raw.attempts, path.key("attempts"), default.attempts);
        let backoff =
            self.positive_duration(raw.backoff.as_deref(), path.key("backoff"), default.backoff);
        let max_backoff = self.positive_duration(
            raw.max_backoff.as_deref(),
            path.key("max_backoff"),
            default.max_backoff.max(backoff),
        );
        if max_backoff < backoff {
            self.error(
                path.key("max_backoff"),
                "must not be shorter than `backoff`",
            );
        }
        Retry {
            attempts,
            backoff,
            max_backoff,
        }
    }
}

/// `[defaults]`, filled in.
struct Defaults {
    timeout: Duration,
    on_error: OnError,
    max_concurrency: usize,
    retry: Retry,
}

/// Why a size does not read.
enum SizeError {
    /// A bare number (the number as written): bytes, to bytesize; a mistake here, as
    /// it is for a duration.
    NoUnit(String),
    /// Past `u64::MAX` bytes, which bytesize would quietly read as `u64::MAX`: no limit.
    TooLarge,
    Invalid,
}

/// The bytes in a size written as a number and one of bytesize's units ("512KiB",
/// "1.5MiB", "100B"). Stricter than bytesize alone: it takes a bare number as bytes
/// and saturates a size past `u64::MAX` ("17EiB") to `u64::MAX`.
fn bytes(text: &str) -> Result<u64, SizeError> {
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = (&text[..split], text[split..].trim_start());
    let size = text.parse::<bytesize::ByteSize>();
    if unit.is_empty() {
        return Err(match size {
            Ok(_) => SizeError::NoUnit(number.to_owned()),
            Err(_) => SizeError::Invalid,
        });
    }
    let size = size.map_err(|_| SizeError::Invalid)?.as_u64();
    // bytesize keeps a unit's factor to itself: it is the size of one of the unit.
    let factor = format!("1{unit}")
        .parse::<bytesize::ByteSize>()
        .map_err(|_| SizeError::Invalid)?
        .as_u64();
    // Where bytesize saturates: a whole number past u64 or times its factor past it,
    // or (a fraction, worked out in f64) a product from 2^64 up.
    let fits = match number.parse::<u64>() {
        Ok(n) => n.checked_mul(factor).is_some(),
        Err(_) if !number.contains('.') => false,
        Err(_) => number
            .parse::<f64>()
            .is_ok_and(|n| n * (factor as f64) < 18_446_744_073_709_551_616.0),
    };
    if fits {
        Ok(size)
    } else {
        Err(SizeError::TooLarge)
    }
}

pub(super) fn parse_listen(text: &str) -> Result<Listen, String> {
    if let Some(path) = text.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("\"unix:\" needs a socket path, e.g. \"unix:/run/provisiond.sock\"".into());
        }
        return Ok(Listen::Unix(PathBuf::from(path)));
    }
    text.parse::<SocketAddr>().map(Listen::Tcp).map_err(|_| {
        format!("{text:?} is not an address; write \"127.0.0.1:8600\" or \"unix:/path.sock\"")
    })
}

/// What tokio-postgres found wrong with a connection string, safe to show. Its
/// messages name options, never values, with one exception: an unknown option in a
/// key=value string that holds a password may be a piece of that password (an unquoted
/// one with a space), so it is not named then.
fn conninfo_problem(e: &tokio_postgres::Error, url: &str) -> String {
    let scheme = url.trim_start().split_once("://").map(|(scheme, _)| scheme);
    if let Some(scheme) = scheme
        && !matches!(scheme, "postgres" | "postgresql")
    {
        return format!("a URL must start with postgres:// or postgresql://, not {scheme}://");
    }
    if scheme.is_none() && !url.contains('=') {
        return "neither a URL (postgres://user@host:5432/db) nor key=value pairs \
                (host=... dbname=...)"
            .to_owned();
    }
    let Some(cause) = std::error::Error::source(e).map(ToString::to_string) else {
        return e.to_string();
    };
    if cause.starts_with("unknown option") && url.to_ascii_lowercase().contains("password") {
        return "an unknown option (a password with spaces must be quoted: \
                password='...')"
            .to_owned();
    }
    cause
}

/// `^[a-z_][a-z0-9_]{0,62}$`: a name PostgreSQL takes as it is, unquoted and in full.
fn is_plain_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z' | '_'))
        && name.len() <= 63
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
