//! The file as written: serde types that mirror `provisioning.toml` key for key.
//!
//! Nothing here is checked beyond TOML types and unknown keys; durations, sizes, event
//! names, URLs and filters stay strings until [`super::compile`] turns them into a
//! [`super::Config`]. The `///` comments are the user documentation: they become the
//! descriptions of the JSON Schema in `schema/`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::defaults;

/// `provisioning.toml`: the handlers provisiond dispatches the billing's events to.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// The listener the billing posts events to, and its limits.
    pub server: Option<RawServer>,
    /// The durable store: after-stage queue, execution log, dead letters.
    pub store: Option<RawStore>,
    /// Values every handler inherits unless it sets its own.
    pub defaults: Option<RawDefaults>,
    /// Event names beyond the billing's catalogue.
    pub events: Option<RawEvents>,
    /// The handlers, each a `[[handler]]` table.
    #[serde(default)]
    pub handler: Vec<RawHandler>,
}

/// `[server]`
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// Where to listen: "host:port" (default "127.0.0.1:8600") or "unix:/path/to.sock".
    /// Changing it needs a restart.
    #[schemars(extend("default" = defaults::LISTEN))]
    pub listen: Option<String>,
    /// When set, `/events` and `/v1/*` need "Authorization: Bearer <token>". Give it
    /// through the environment: "${PROVISIOND_TOKEN}".
    pub token: Option<String>,
    /// A `listen` address that is not loopback (127.0.0.1, ::1) nor a unix socket needs
    /// `token`: without one, anyone who reaches the port can post events and use
    /// `/v1/reload` and the dead-letter routes. Set this to true to serve such an address
    /// without a token anyway, when something else (a firewall, a network policy) guards
    /// it (default false).
    #[schemars(extend("default" = defaults::ALLOW_INSECURE))]
    pub allow_insecure: Option<bool>,
    /// Largest accepted request body, with a unit ("1MiB", the default). Larger: 413.
    #[schemars(extend("default" = defaults::MAX_BODY))]
    pub max_body: Option<String>,
    /// Budget for one event's whole before-stage chain ("10s" by default). Handlers left
    /// when it runs out are treated as errors.
    #[schemars(extend("default" = defaults::DEADLINE))]
    pub deadline: Option<String>,
    /// Deepest JSON nesting accepted in a request body (default 64).
    #[schemars(range(min = 1, max = 128), extend("default" = defaults::MAX_DEPTH))]
    pub max_depth: Option<u32>,
    /// Events handled at once; over it the billing gets 503 with Retry-After (default 1024).
    #[schemars(range(min = 1), extend("default" = defaults::MAX_IN_FLIGHT))]
    pub max_in_flight: Option<u32>,
    /// Open client connections at once; further ones wait to be accepted (default 1024).
    #[schemars(range(min = 1), extend("default" = defaults::MAX_CONNECTIONS))]
    pub max_connections: Option<u32>,
    /// Time a client has to send its request headers, and to take some of a reply being
    /// written ("10s" by default).
    #[schemars(extend("default" = defaults::HEADER_TIMEOUT))]
    pub header_timeout: Option<String>,
    /// On SIGTERM, how long in-flight events and deliveries may take to finish ("10s").
    #[schemars(extend("default" = defaults::SHUTDOWN_GRACE))]
    pub shutdown_grace: Option<String>,
}

/// `[store]`
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// Where the after-stage queue, execution log and dead letters live: "redb" (one
    /// file at `path`, for this sidecar alone; the default) or "postgres" (a database at
    /// `url`, shared by any number of sidecars). Changing it needs a restart.
    #[schemars(extend("enum" = ["redb", "postgres"], "default" = defaults::BACKEND))]
    pub backend: Option<String>,
    /// The redb file (default "provisiond.db", relative to the working directory); only
    /// with backend "redb". Changing it needs a restart.
    #[schemars(extend("default" = defaults::STORE_PATH))]
    pub path: Option<String>,
    /// Backend "postgres": the database, as a URL
    /// ("postgres://user:pass@db1,db2/billing?target_session_attrs=read-write") or a
    /// key=value string ("host=db1 dbname=billing user=app password=..."). Required with
    /// that backend; give it through the environment: "${PROVISIOND_PG_URL}". Shown with
    /// the password masked. Changing it needs a restart.
    pub url: Option<String>,
    /// Backend "postgres": the schema the tables live in, created and migrated at start
    /// (default "provisiond"): a plain lower-case SQL identifier. Changing it needs a
    /// restart.
    #[schemars(
        regex(pattern = r"^(?!pg_)[a-z_][a-z0-9_]{0,62}$"),
        extend("default" = defaults::PG_SCHEMA)
    )]
    pub schema: Option<String>,
    /// Backend "postgres": database connections this sidecar keeps (default 8, at most
    /// 64). Changing it needs a restart.
    #[schemars(
        range(min = 1, max = 64),
        extend("default" = defaults::PG_POOL)
    )]
    pub pool: Option<u32>,
    /// Backend "postgres": how long a sidecar holds an entity's lane without renewing
    /// it; a dead sidecar's lanes are taken over after it ("30s" by default, at least
    /// "1s"). Changing it needs a restart.
    #[schemars(extend("default" = defaults::PG_LEASE))]
    pub lease: Option<String>,
    /// An identical envelope arriving again within this window is not delivered to
    /// after-stage handlers twice ("10m" by default; "0s" turns it off).
    #[schemars(extend("default" = defaults::DEDUPE_WINDOW))]
    pub dedupe_window: Option<String>,
    /// How much of the execution log to keep.
    pub keep_executions: Option<RawRetention>,
}

/// `keep_executions = { age = "7d", rows = 100000 }`: rows older than `age` or beyond the
/// newest `rows` are dropped.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRetention {
    /// Oldest row kept ("7d" by default).
    #[schemars(extend("default" = defaults::KEEP_AGE))]
    pub age: Option<String>,
    /// Most rows kept (100000 by default).
    #[schemars(range(min = 1), extend("default" = defaults::KEEP_ROWS))]
    pub rows: Option<u64>,
}

/// `[defaults]`: inherited by every handler that does not set its own.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawDefaults {
    /// Time one call of a handler may take ("5s" by default).
    #[schemars(extend("default" = defaults::TIMEOUT))]
    pub timeout: Option<String>,
    /// What a before-stage handler's failure means: "allow" (skip it, the default) or
    /// "deny" (fail closed).
    #[schemars(extend("default" = defaults::ON_ERROR))]
    pub on_error: Option<OnError>,
    /// Calls of one handler at once (16 by default).
    #[schemars(range(min = 1), extend("default" = defaults::MAX_CONCURRENCY))]
    pub max_concurrency: Option<u32>,
    /// Retries of after-stage deliveries.
    pub retry: Option<RawRetry>,
}

/// `[events]`
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawEvents {
    /// Event names the billing sends beyond its documented catalogue, so that handlers
    /// may name them.
    #[serde(default)]
    pub extra: Vec<String>,
}

/// Which part of dispatch a handler takes part in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Runs while the billing waits: may modify the data, allow or forbid the action.
    Before,
    /// Runs once the event is allowed: notified durably, with retries.
    After,
}

impl Stage {
    /// The stage's name as the file, the execution log and the metrics spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Before => "before",
            Stage::After => "after",
        }
    }
}

/// What a handler's failure (timeout, connection error, bad reply) means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Skip the failed handler and go on.
    Allow,
    /// Forbid the action; the message says what failed.
    Deny,
}

/// `retry = { attempts = 12, backoff = "1s", max_backoff = "10m" }`: exponential backoff
/// with full jitter.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    /// Attempts in all, the first included, before the delivery goes to the dead letters
    /// (25 unless `[defaults] retry` says otherwise).
    #[schemars(range(min = 1), extend("default" = defaults::RETRY_ATTEMPTS))]
    pub attempts: Option<u32>,
    /// The first wait; each retry doubles it, up to `max_backoff` ("1s" unless
    /// `[defaults] retry` says otherwise).
    #[schemars(extend("default" = defaults::RETRY_BACKOFF))]
    pub backoff: Option<String>,
    /// The longest wait between two attempts ("10m" unless `[defaults] retry` says
    /// otherwise).
    #[schemars(extend("default" = defaults::RETRY_MAX_BACKOFF))]
    pub max_backoff: Option<String>,
}

/// One `[[handler]]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawHandler {
    /// Unique name: letters, digits, '-' and '_'.
    #[schemars(regex(pattern = r"^[A-Za-z0-9_-]+$"))]
    pub name: String,
    /// Events this handler takes: names ("clients.create"), prefixes at any depth
    /// ("clients.*"), or "*" for every event.
    #[schemars(length(min = 1))]
    pub events: Vec<String>,
    /// "before" (may modify, allow or forbid) or "after" (notified durably). Required.
    pub stage: Stage,
    /// Lower runs first (default 100); ties keep file order.
    #[schemars(extend("default" = defaults::PRIORITY))]
    pub priority: Option<i64>,
    /// `false` keeps the handler in the file but out of dispatch.
    #[schemars(extend("default" = defaults::ENABLED))]
    pub enabled: Option<bool>,
    /// HTTP handler: the URL the envelope is sent to.
    pub url: Option<String>,
    /// HTTP handler: the method ("POST" by default, or "PUT", "PATCH"; lower case too).
    #[schemars(extend(
        "enum" = ["POST", "PUT", "PATCH", "post", "put", "patch"],
        "default" = defaults::METHOD
    ))]
    pub method: Option<String>,
    /// HTTP handler: extra request headers. Not those provisiond sets itself:
    /// Content-Type, Content-Length, Transfer-Encoding, Host, X-Provisioning-Event,
    /// X-Provisioning-Handler and the webhook-* signing headers.
    pub headers: Option<BTreeMap<String, String>>,
    /// HTTP handler: a Standard Webhooks secret ("whsec_" + base64); requests are then
    /// signed.
    pub secret: Option<String>,
    /// Script handler: the program and its arguments, run without a shell.
    pub command: Option<Vec<String>>,
    /// Script handler: extra environment variables.
    pub env: Option<BTreeMap<String, String>>,
    /// Script handler: the working directory.
    pub workdir: Option<String>,
    /// Before stage: take the reply's data as the new data.
    #[schemars(extend("default" = defaults::MODIFIES))]
    pub modifies: Option<bool>,
    /// Before stage: "allow" skips this handler when it fails, "deny" forbids.
    pub on_error: Option<OnError>,
    /// Time one call may take, with a unit ("5s").
    pub timeout: Option<String>,
    /// Calls of this handler at once (default 16).
    #[schemars(range(min = 1))]
    pub max_concurrency: Option<u32>,
    /// After stage: retries of a failed delivery.
    pub retry: Option<RawRetry>,
    /// Conditions on the envelope that must all hold: dot paths ("data.companies_id",
    /// "event.object_id") to a value (equality) or to a table of operators
    /// (eq ne in not_in lt le gt ge exists regex).
    #[serde(rename = "match")]
    pub match_: Option<serde_json::Map<String, serde_json::Value>>,
    /// A CEL expression over `event` and `data` that must be true.
    pub when: Option<String>,
}

impl RawHandler {
    /// The keys serde knows for a handler, for messages about keys in the wrong place.
    pub const HTTP_ONLY: &'static [&'static str] = &["method", "headers", "secret"];
    pub const SCRIPT_ONLY: &'static [&'static str] = &["env", "workdir"];
}
