//! `provisioning.toml`: from text to an immutable, validated [`Config`].
//!
//! Two stages, as in the design: [`raw`] mirrors the file for serde (unknown keys
//! refused), then [`compile`] checks every rule and builds the config, collecting all
//! errors of the file before failing. Reading the file ([`Config::load`]) is separate
//! from parsing text ([`Config::parse`]), so tests build configs from strings.

mod compile;
mod conninfo;
pub mod defaults;
mod env;
mod error;
pub mod raw;
mod source;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use compile::MAX_DURATION;
pub use conninfo::{
    ClientCert, PgTls, Root, SslMode, read_client_certificate, read_pem_certificates,
    read_root_certificates,
};
pub use defaults::fmt_duration;
pub use env::expand_env;
pub use error::{ConfigError, ConfigErrors, KeyPath, Seg};
pub use raw::{OnError, RawConfig, RawHandler, Stage};
pub use source::line_col;
pub(crate) use source::{Recover, StandIn, recover};

use crate::events::EventPattern;
use crate::filter::Filter;

/// A validated config. Built once per load; never changed afterwards.
#[derive(Debug)]
pub struct Config {
    /// The file it came from, as given (`<string>` when parsed from memory).
    pub file: String,
    /// SHA-256 of the file's text, hex.
    pub hash: String,
    pub server: Server,
    pub store: Store,
    /// `[events] extra`, normalised.
    pub extra_events: Vec<String>,
    /// The handlers in file order, enabled or not.
    pub handlers: Vec<Arc<Handler>>,
    /// Warnings about values made from the environment, found while loading (see
    /// [`Config::warnings`]).
    pub env_warnings: Vec<String>,
}

/// Where the sidecar listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Listen {
    /// The `server.listen` a config's text gives, read without loading the rest: for a
    /// client command whose config does not load (a `${VAR}` unset, say), to still find
    /// the sidecar it names. The default when the file does not set it; `None` when the
    /// text is not TOML, or the value is not a plain address (`${VAR}` in it, a typo).
    pub fn written_in(text: &str) -> Option<Self> {
        let table: toml::Table = toml::from_str(text).ok()?;
        let listen = match table.get("server").and_then(|s| s.get("listen")) {
            None => defaults::LISTEN,
            Some(value) => value.as_str()?,
        };
        if listen.contains("${") {
            return None;
        }
        compile::parse_listen(listen).ok()
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// `[server]`, with defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    pub listen: Listen,
    pub token: Option<Secret>,
    /// `server.allow_insecure`: a `listen` other hosts can reach may go without a token.
    pub allow_insecure: bool,
    pub max_body: u64,
    pub deadline: Duration,
    pub max_depth: usize,
    pub max_in_flight: usize,
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub shutdown_grace: Duration,
}

impl Server {
    /// Why this listener must not go without a token: it is reachable from other hosts,
    /// no token is set and `allow_insecure` does not say that something else guards it.
    /// Checked at load on the file's `listen`, and at reload on the running one.
    pub fn unguarded(&self) -> Option<String> {
        let Listen::Tcp(addr) = self.listen else {
            return None;
        };
        if self.token.is_some() || self.allow_insecure || addr.ip().is_loopback() {
            return None;
        }
        Some(format!(
            "{addr} is reachable from other hosts and server.token is not set, so anyone who \
             reaches it could post events and use /v1/reload and the dead-letter routes; set \
             server.token = \"${{PROVISIOND_TOKEN}}\" (and give PROVISIOND_TOKEN), listen on \
             127.0.0.1 or a unix socket, or set server.allow_insecure = true if something else \
             guards the port"
        ))
    }
}

/// `[store]`, with defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Store {
    /// The redb file (`backend = "redb"`).
    pub path: PathBuf,
    /// Where the after stage's shared data lives.
    pub backend: Backend,
    pub dedupe_window: Duration,
    pub keep_age: Duration,
    pub keep_rows: u64,
}

/// `store.backend`.
#[derive(Debug, Clone, PartialEq)]
pub enum Backend {
    /// One redb file at `store.path`, for this sidecar alone (the default).
    Redb,
    /// A PostgreSQL database shared by any number of sidecars.
    Postgres(Postgres),
}

/// `store.url`, `store.schema`, `store.pool`, `store.lease` with `backend = "postgres"`.
#[derive(Debug, Clone, PartialEq)]
pub struct Postgres {
    /// libpq-style URL or key=value string, as written; may hold a password, so never
    /// shown.
    pub url: Secret,
    /// `url` as tokio-postgres is given it: `sslrootcert` left out, `sslmode`
    /// `verify-ca` and `verify-full` read as `require` (the checks are `tls`'s).
    pub connect: Secret,
    /// What `url` asks of TLS.
    pub tls: PgTls,
    /// The schema the tables live in: a plain SQL identifier.
    pub schema: String,
    /// Connections per sidecar.
    pub pool: usize,
    /// How long a sidecar holds a lane without renewing it.
    pub lease: Duration,
}

impl Postgres {
    /// `url` safe to show (in `check`, `GET /v1/config`, logs): the password masked,
    /// the rest as given, e.g. `postgres://app:***@db1,db2/billing` or
    /// `host=db1 user=app password=***`.
    pub fn shown_url(&self) -> String {
        conninfo::masked(self.url.expose())
    }
}

impl Store {
    /// Where the store is, safe to show: the redb file, or the database with its
    /// password masked.
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Redb => format!("redb {}", self.path.display()),
            Backend::Postgres(pg) => format!("postgres {} (schema {})", pg.shown_url(), pg.schema),
        }
    }
}

/// After-stage retries: exponential backoff with full jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    pub attempts: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
}

/// A value that must never be shown: its `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The values the config took from the environment, to be masked (`***`) wherever a
/// text that may quote them is shown: config errors, and what handlers answer (a
/// handler that echoes its request headers would otherwise put the token of its
/// `headers` into the execution log). Values shorter than 4 characters are left: they
/// are no secrets, and masking them would garble the text.
#[derive(Clone, Default)]
pub struct Hidden(Arc<[String]>);

impl Hidden {
    pub fn new(values: &[String]) -> Self {
        let mut values: Vec<String> = values
            .iter()
            .filter(|v| v.trim().len() >= 4)
            .cloned()
            .collect();
        // Longest first, so that a value containing another is masked whole.
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        values.dedup();
        Self(values.into())
    }

    /// `text` with every value masked; as it was (no copy) when none occurs.
    pub fn mask(&self, mut text: String) -> String {
        for value in self.0.iter() {
            if text.contains(value.as_str()) {
                text = text.replace(value.as_str(), "***");
            }
        }
        text
    }
}

/// One compiled `[[handler]]`.
pub struct Handler {
    pub name: String,
    /// Its index among the file's `[[handler]]` tables: the tie-break after `priority`.
    pub position: usize,
    pub stage: Stage,
    pub priority: i64,
    pub enabled: bool,
    pub events: Vec<EventPattern>,
    pub target: Target,
    pub modifies: bool,
    pub on_error: OnError,
    pub timeout: Duration,
    pub max_concurrency: usize,
    pub retry: Retry,
    pub filter: Filter,
    /// `max_concurrency` permits: a call holds one while it runs.
    pub slots: Arc<tokio::sync::Semaphore>,
    /// The config's values from the environment, masked in what is kept of its replies
    /// (execution log excerpts and errors, dead letters, log lines).
    pub hidden: Hidden,
    /// The handler as written (after `${VAR}` substitution): what a reload compares to
    /// tell a changed handler from an unchanged one.
    pub raw: RawHandler,
}

/// Shows what is safe to show: the target as written, never substituted secrets.
impl fmt::Debug for Handler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handler")
            .field("name", &self.name)
            .field("stage", &self.stage)
            .field("priority", &self.priority)
            .field("enabled", &self.enabled)
            .field("events", &self.events)
            .field("target", &self.describe_target())
            .finish_non_exhaustive()
    }
}

impl Handler {
    /// Whether this handler takes events named `name` (normalised), leaving filters and
    /// `enabled` aside.
    pub fn takes(&self, name: &str) -> bool {
        self.events.iter().any(|p| p.matches(name))
    }

    /// What the handler calls, safe to show: the URL or command as written in the file,
    /// before `${VAR}` substitution, so secrets from the environment stay out.
    pub fn describe_target(&self) -> String {
        match &self.target {
            Target::Http(http) => format!("{} {}", http.method, http.shown_url),
            Target::Script(script) => script.shown_argv.join(" "),
        }
    }
}

/// How a handler is called.
#[derive(Debug)]
pub enum Target {
    Http(HttpTarget),
    Script(ScriptTarget),
}

/// The request headers provisiond sets on an HTTP handler's calls (`handlers::http`),
/// each with what it holds. A handler's `headers` may not name one, in any case: the
/// call would carry the file's value instead or as well (a second `Content-Type`,
/// another handler's name, a `Host` other than the URL's, a forged signature).
pub const SET_BY_PROVISIOND: &[(&str, &str)] = &[
    ("content-type", "application/json: the body is the envelope"),
    ("content-length", "from the body"),
    ("transfer-encoding", "from the body"),
    ("host", "from `url`"),
    ("x-provisioning-event", "the event's name"),
    ("x-provisioning-handler", "the handler's name"),
    (
        "x-provisioning-attempt",
        "the attempt's number, 1 for the first",
    ),
    ("webhook-id", "Standard Webhooks signing, with `secret`"),
    (
        "webhook-timestamp",
        "Standard Webhooks signing, with `secret`",
    ),
    (
        "webhook-signature",
        "Standard Webhooks signing, with `secret`",
    ),
];

#[derive(Debug)]
pub struct HttpTarget {
    pub url: reqwest::Url,
    /// The URL as written in the file (before substitution), with any password masked.
    pub shown_url: String,
    pub method: reqwest::Method,
    pub headers: reqwest::header::HeaderMap,
    /// The decoded Standard Webhooks key (`whsec_` removed, base64 decoded).
    pub secret: Option<SigningKey>,
}

/// A Standard Webhooks signing key.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey(pub Vec<u8>);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(***)")
    }
}

#[derive(Debug)]
pub struct ScriptTarget {
    /// The program (resolved against the config's directory when relative) and its
    /// arguments: what the script gets as its argv.
    pub argv: Vec<String>,
    /// The file executed: `argv[0]`, or for a bare name the file of that name first
    /// found in provisiond's `PATH` when the config was loaded. Given a path, the
    /// standard library spawns with `posix_spawn`; given a bare name while the child's
    /// `PATH` is set, it falls back to fork + exec, which copies provisiond's page
    /// tables on every call.
    pub program: PathBuf,
    /// The command as written in the file (before substitution).
    pub shown_argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Where the script runs: `workdir`, or else the config file's directory.
    pub workdir: PathBuf,
}

impl Config {
    /// Reads and validates a config file: what `check`, `run`, every reload, `explain`
    /// and `test` use. The file is read once, and what was read is what is checked.
    ///
    /// An empty file (nothing but whitespace) is refused, by every command alike: an
    /// in-place write empties the file before it writes the new text, and were that
    /// moment read by a reload, the empty config would remove every handler. To run
    /// without handlers, write a comment in the file.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors::file(&file, format!("cannot read the file: {e}")))?;
        if text.trim().is_empty() {
            return Err(ConfigErrors::file(
                &file,
                "the file is empty (a write in progress?); to run without handlers, write a \
                 comment in it",
            ));
        }
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        // Absolute: a script runs in its `workdir`, where a path relative to ours (from
        // a relative `-c`) would name another file.
        let base = std::path::absolute(&base).unwrap_or(base);
        compile::compile(&text, &file, &base, &|name| std::env::var(name).ok())
    }

    /// Validates config text, with the process environment for `${VAR}`. `file` names the
    /// text in messages; relative script paths resolve against the working directory.
    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigErrors> {
        compile::compile(text, file, Path::new("."), &|name| std::env::var(name).ok())
    }

    /// Validates config text with a given environment.
    pub fn parse_with_env(
        text: &str,
        file: &str,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigErrors> {
        compile::compile(text, file, base, env)
    }

    /// The handler called `name`, if any.
    pub fn handler(&self, name: &str) -> Option<&Arc<Handler>> {
        self.handlers.iter().find(|h| h.name == name)
    }

    /// Every event name a handler may name: the catalogue and `[events] extra`.
    pub fn known_events(&self) -> impl Iterator<Item = &str> {
        crate::events::CATALOGUE
            .iter()
            .copied()
            .chain(self.extra_events.iter().map(String::as_str))
    }

    /// Problems that do not stop the config from loading, one line each, as `check`
    /// prints them after `warning: `:
    /// - a script handler whose program is a path (it holds a `/`) that is not there or
    ///   not executable. It may well be deployed separately from the file, so this is no
    ///   error;
    /// - a `match` key that looks like a misspelt operator (`{ regx = "^A" }`), read as
    ///   a field name. A field may really be called that, so this is no error either;
    /// - a before-stage handler whose `timeout` is longer than `server.deadline`: the
    ///   chain is cut at the deadline, so the handler never has its whole timeout;
    /// - a header value made with a variable that is set but empty (`Bearer ${TOKEN}`
    ///   sent as `Bearer `): an empty value may be meant, so this is no error.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = self.env_warnings.clone();
        for h in &self.handlers {
            if let Target::Script(script) = &h.target {
                warnings.extend(script_warning(&h.name, script));
            }
            if h.stage == Stage::Before && h.timeout > self.server.deadline {
                let from = if h.raw.timeout.is_none() {
                    " (from [defaults])"
                } else {
                    ""
                };
                warnings.push(format!(
                    "handler {:?}: timeout {}{from} is longer than server.deadline {}: the \
                     before stage is cut at the deadline, so the handler never has its whole \
                     timeout; keep the timeout below the deadline",
                    h.name,
                    fmt_duration(h.timeout),
                    fmt_duration(self.server.deadline),
                ));
            }
            for (path, op) in h.filter.suspect_operators() {
                let (parent, key) = path.rsplit_once('.').unwrap_or(("", path));
                warnings.push(format!(
                    "handler {:?}: match compares field {path} for equality; if `{key}` \
                     is meant as an operator, it is `{op}` (\"{parent}\" = {{ {op} = ... }})",
                    h.name
                ));
            }
        }
        warnings
    }

    /// A one-paragraph summary, as `check` prints it.
    pub fn summary(&self) -> String {
        let count = |stage| {
            self.handlers
                .iter()
                .filter(|h| h.stage == stage && h.enabled)
                .count()
        };
        let disabled = self.handlers.iter().filter(|h| !h.enabled).count();
        let mut text = format!(
            "{}: ok, {} handler{} ({} before, {} after{}), listen {}",
            self.file,
            self.handlers.len(),
            if self.handlers.len() == 1 { "" } else { "s" },
            count(Stage::Before),
            count(Stage::After),
            if disabled > 0 {
                format!(", {disabled} disabled")
            } else {
                String::new()
            },
            self.server.listen,
        );
        if let Backend::Postgres(_) = &self.store.backend {
            text.push_str(&format!(", store {}", self.store.describe()));
        }
        // One line a handler, its columns aligned: stage, priority, name, events, target.
        let rows: Vec<[String; 4]> = self
            .handlers
            .iter()
            .map(|h| {
                let events: Vec<String> = h.events.iter().map(ToString::to_string).collect();
                [
                    format!("{:?}", h.stage).to_lowercase(),
                    format!("{}{}", h.name, if h.enabled { "" } else { " (disabled)" }),
                    format!("[{}]", events.join(", ")),
                    h.describe_target(),
                ]
            })
            .collect();
        let width = |column: usize| {
            let widths = rows.iter().map(|r| r[column].chars().count());
            widths.max().unwrap_or(0)
        };
        let (names, events) = (width(1), width(2));
        for (h, [stage, name, on, target]) in self.handlers.iter().zip(&rows) {
            text.push_str(&format!(
                "\n  {stage:<6} {:>4}  {name:<names$}  {on:<events$}  {target}",
                h.priority,
            ));
        }
        text
    }
}

/// What is wrong with a script handler's program, if anything can be seen from here.
fn script_warning(handler: &str, script: &ScriptTarget) -> Option<String> {
    use std::os::unix::fs::PermissionsExt as _;

    let program = Path::new(&script.argv[0]);
    if !script.argv[0].contains('/') {
        return None; // looked up in PATH when it runs
    }
    let written = &script.shown_argv[0];
    let problem = match std::fs::metadata(program) {
        Err(_) => "not found",
        Ok(m) if !m.is_file() => "is not a file",
        Ok(m) if m.permissions().mode() & 0o111 == 0 => "is not executable",
        Ok(_) => {
            let own_path = script.env.iter().any(|(name, _)| name == "PATH");
            let problem = interpreter_problem(program, own_path)?;
            return Some(format!(
                "handler {handler:?}: command {written:?}: {problem}"
            ));
        }
    };
    // A path made from `${VAR}` is not shown resolved: values from the environment stay
    // out of the output.
    let at = if written.contains("${") {
        String::new()
    } else {
        let absolute = std::path::absolute(program).unwrap_or_else(|_| program.to_path_buf());
        format!(" at {}", absolute.display())
    };
    Some(format!(
        "handler {handler:?}: command {written:?} {problem}{at} (fine if it is deployed \
         separately)"
    ))
}

/// What is wrong with the interpreter a script's `#!` line names, if anything can be
/// seen from here. `env`'s program is looked up in provisiond's `PATH`, unless the
/// handler's `env` gives the script a `PATH` of its own (`own_path`).
fn interpreter_problem(program: &Path, own_path: bool) -> Option<String> {
    use std::io::Read as _;

    let mut head = [0u8; 256];
    let read = std::fs::File::open(program).ok()?.read(&mut head).ok()?;
    let line = head[..read].strip_prefix(b"#!")?;
    let line = std::str::from_utf8(line.split(|&b| b == b'\n').next()?).ok()?;
    let shebang = format!("#!{}", line.trim());
    let mut words = line.split_whitespace();
    let interpreter = words.next()?;
    if !Path::new(interpreter).is_file() {
        return Some(format!(
            "its interpreter {interpreter} ({shebang}) is not found; the script cannot \
             start, an error that follows on_error (before stage) or is retried (after \
             stage)"
        ));
    }
    if interpreter.ends_with("/env") && !own_path {
        // `env -S python3 -u`: the first word that is no option; `env A=1 prog`: left.
        let name = words.find(|w| !w.starts_with('-'))?;
        if !name.contains(['=', '/']) && compile::on_path(name).is_none() {
            return Some(format!(
                "its interpreter {name} ({shebang}) is not in provisiond's PATH; `env` \
                 would exit 127, which refuses the event (before stage) or is retried \
                 (after stage)"
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests;
