//! `provisioning.toml`: from text to an immutable, validated [`Config`].
//!
//! Two stages, as in the design: [`raw`] mirrors the file for serde (unknown keys
//! refused), then [`compile`] checks every rule and builds the config, collecting all
//! errors of the file before failing. Reading the file ([`Config::load`]) is separate
//! from parsing text ([`Config::parse`]), so tests build configs from strings.

mod compile;
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
pub use defaults::fmt_duration;
pub use env::expand_env;
pub use error::{ConfigError, ConfigErrors, KeyPath, Seg};
pub use raw::{OnError, RawConfig, RawHandler, Stage};
pub use source::line_col;

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
}

/// Where the sidecar listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
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
    pub max_body: u64,
    pub deadline: Duration,
    pub max_depth: usize,
    pub max_in_flight: usize,
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub shutdown_grace: Duration,
}

/// `[store]`, with defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Store {
    pub path: PathBuf,
    pub dedupe_window: Duration,
    pub keep_age: Duration,
    pub keep_rows: u64,
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
    /// arguments.
    pub argv: Vec<String>,
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
    /// prints them after `warning: `. So far: a script handler whose program is a path
    /// (it holds a `/`) that is not there or not executable. It may well be deployed
    /// separately from the file, so this is no error.
    pub fn warnings(&self) -> Vec<String> {
        self.handlers
            .iter()
            .filter_map(|h| match &h.target {
                Target::Script(script) => script_warning(&h.name, script),
                Target::Http(_) => None,
            })
            .collect()
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
        for h in &self.handlers {
            let events: Vec<String> = h.events.iter().map(ToString::to_string).collect();
            text.push_str(&format!(
                "\n  {:<7} {:>4}  {}{}  [{}]  {}",
                format!("{:?}", h.stage).to_lowercase(),
                h.priority,
                h.name,
                if h.enabled { "" } else { " (disabled)" },
                events.join(", "),
                h.describe_target(),
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
    let problem = match std::fs::metadata(program) {
        Err(_) => "not found",
        Ok(m) if !m.is_file() => "is not a file",
        Ok(m) if m.permissions().mode() & 0o111 == 0 => "is not executable",
        Ok(_) => return None,
    };
    let written = &script.shown_argv[0];
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

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "CRM_TOKEN").then(|| "t0ken".to_owned())
    }

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::parse_with_env(text, "p.toml", Path::new("/etc/p"), &env)
    }

    #[test]
    fn many_mistakes_are_reported_together() {
        let text = r#"
[server]
listen = "127.0.0.1:8600"
colour = "blue"

[[handler]]
name = "a"
events = ["clients.crate"]
stage = "before"
url = "http://127.0.0.1:1/x"
timeout = "5 parsecs"

[[handler]]
name = "a"
events = ["clients.create"]
stage = "before"
url = "http://127.0.0.1:1/x"
command = ["/bin/true"]

[[handler]]
name = "c"
events = ["*"]
stage = "after"
url = "http://h/${MISSING}"
match = { "data.name" = { regex = "(" } }
when = "data.x =="
priority = "high"
"#;
        let errors = parse(text).unwrap_err();
        let text = errors.to_string();
        println!("{text}");
        for want in [
            "p.toml:4:1: server.colour: unknown key `colour`",
            "p.toml:8:11: handler[0].events[0]: unknown event \"clients.crate\" (did you mean \"clients.create\"?)",
            "p.toml:11:11: handler[0].timeout: invalid duration",
            "p.toml:14:8: handler[1].name: duplicate handler name \"a\"",
            "handler[1].command: a handler has either `url` (HTTP) or `command` (script), not both",
            "p.toml:24:7: handler[2].url: environment variable `MISSING` is not set",
            "handler[2].match.\"data.name\".regex: invalid regex",
            "handler[2].when: invalid CEL expression",
            "p.toml:27:12: handler[2].priority: invalid type",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }

    #[test]
    fn a_good_file_compiles() {
        let text = r#"
[defaults]
timeout = "2s"
on_error = "deny"

[events]
extra = ["clients.custom_event"]

[[handler]]
name = "crm"
events = ["clients.*", "clients.custom_event", "clients_packages.renew"]
stage = "before"
priority = 5
url = "https://user:${CRM_TOKEN}@crm.example/hook?x=1"
modifies = true
[handler.match]
data.balance = { lt = 0 }
"event.object_id" = 3

[[handler]]
name = "script"
events = ["*"]
stage = "after"
command = ["./hooks/block.sh", "--token", "${CRM_TOKEN}"]
retry = { attempts = 3, backoff = "100ms", max_backoff = "1s" }
"#;
        let config = parse(text).unwrap();
        let crm = config.handler("crm").unwrap();
        assert_eq!(crm.timeout, Duration::from_secs(2));
        assert_eq!(crm.on_error, OnError::Deny);
        assert_eq!(crm.filter.conditions.len(), 2);
        assert!(crm.takes("clients.subscriptions.renew"));
        assert_eq!(
            crm.describe_target(),
            "POST https://user:***@crm.example/hook?x=1"
        );
        let Target::Http(http) = &crm.target else {
            panic!()
        };
        assert_eq!(http.url.password(), Some("t0ken"));
        let script = config.handler("script").unwrap();
        assert_eq!(
            script.describe_target(),
            "./hooks/block.sh --token ${CRM_TOKEN}"
        );
        let Target::Script(s) = &script.target else {
            panic!()
        };
        assert_eq!(s.argv[0], "/etc/p/./hooks/block.sh");
        assert_eq!(s.argv[2], "t0ken");
        assert_eq!(script.retry.attempts, 3);
        assert!(!format!("{config:?}").contains("t0ken"), "{config:?}");
    }

    #[test]
    fn targets_are_shown_as_written_with_the_password_masked() {
        let text = "[[handler]]\nname = \"a\"\nevents = [\"*\"]\nstage = \"before\"\n\
                    url = \"http://user:${CRM_TOKEN}@crm/${PATHX:-def}/$${literal}\"\n";
        let config = parse(text).unwrap();
        assert_eq!(
            config.handler("a").unwrap().describe_target(),
            "POST http://user:***@crm/${PATHX:-def}/$${literal}"
        );
    }

    #[test]
    fn messages_say_what_is_wrong_in_the_users_words() {
        let text = r#"[[handler]]
name = "a"
events = ["Clients.Create", "CLIENTS.*", "Clients.Crate", "Foo.Bar"]
stage = "before"
url = "${CRM_TOKEN}"
timeout = "-1s"
on_error = 1
"#;
        assert_eq!(
            error_lines(text),
            [
                "p.toml:3:11: handler[0].events[0]: `Clients.Create` is not a valid event name: \
                 event names are lower-case (did you mean \"clients.create\"?)",
                "p.toml:3:29: handler[0].events[1]: `CLIENTS.*` is not a valid event name: \
                 event names are lower-case (did you mean \"clients.*\"?)",
                "p.toml:3:42: handler[0].events[2]: `Clients.Crate` is not a valid event name: \
                 event names are lower-case (did you mean \"clients.create\"?)",
                "p.toml:3:59: handler[0].events[3]: `Foo.Bar` is not a valid event name: event \
                 names are lower-case",
                "p.toml:5:7: handler[0].url: invalid URL: relative URL without a base (the value \
                 came from the environment variable `CRM_TOKEN`)",
                "p.toml:6:11: handler[0].timeout: invalid duration \"-1s\": durations cannot be \
                 negative",
                "p.toml:7:12: handler[0].on_error: invalid type: expected a string",
            ]
        );
    }

    #[test]
    fn warns_about_scripts_that_are_not_there_or_not_executable() {
        use std::os::unix::fs::PermissionsExt as _;

        let dir = tempfile::TempDir::new().unwrap();
        let write = |name: &str, mode: u32| {
            let path = dir.path().join(name);
            std::fs::write(&path, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write("ok.sh", 0o755);
        write("plain.sh", 0o644);
        std::fs::create_dir(dir.path().join("hooks")).unwrap();
        let handler = |name: &str, program: &str| {
            format!(
                "[[handler]]\nname = \"{name}\"\nevents = [\"*\"]\nstage = \"after\"\n\
                 command = [\"{program}\"]\n"
            )
        };
        let text = [
            handler("ok", "./ok.sh"),
            handler("on-path", "true"),
            handler("missing", "./nope.sh"),
            handler("plain", "./plain.sh"),
            handler("dir", "hooks/"),
            handler("from-env", "${CRM_TOKEN}/x.sh"),
        ]
        .concat();
        let config = Config::parse_with_env(&text, "p.toml", dir.path(), &env).unwrap();
        let base = dir.path().display();
        assert_eq!(
            config.warnings(),
            [
                format!(
                    "handler \"missing\": command \"./nope.sh\" not found at {base}/nope.sh \
                     (fine if it is deployed separately)"
                ),
                format!(
                    "handler \"plain\": command \"./plain.sh\" is not executable at \
                     {base}/plain.sh (fine if it is deployed separately)"
                ),
                format!(
                    "handler \"dir\": command \"hooks/\" is not a file at {base}/hooks/ (fine \
                     if it is deployed separately)"
                ),
                "handler \"from-env\": command \"${CRM_TOKEN}/x.sh\" not found (fine if it is \
                 deployed separately)"
                    .to_owned(),
            ]
        );
    }

    #[test]
    fn error_messages_never_quote_values_from_the_environment() {
        let errors = parse(
            "[[handler]]\nname = \"a\"\nevents = [\"*\"]\nstage = \"before\"\n\
             url = \"ftp://u:${CRM_TOKEN}@crm.example/\"\nmatch = { \"data.x\" = { regex = \"(${CRM_TOKEN}\" } }\n",
        )
        .unwrap_err();
        let text = errors.to_string();
        assert_eq!(errors.len(), 2, "{text}");
        assert!(!text.contains("t0ken"), "{text}");
        assert!(
            text.contains(
                "handler[0].url: \"ftp://u:***@crm.example/\" must be an http:// or https:// \
                 URL (the value came from the environment variable `CRM_TOKEN`)"
            ),
            "{text}"
        );
    }

    /// The lines of the errors `text` gives, to compare whole.
    fn error_lines(text: &str) -> Vec<String> {
        let errors = parse(text).unwrap_err();
        errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_handler_with_a_missing_or_wrong_required_key_is_still_checked() {
        let text = r#"[[handler]]
name = "b c"
events = ["clients*"]
url = "http://127.0.0.1:1/x"

[[handler]]
name = "b"
events = ["clients.create"]
stage = "Before"
priority = "high"
url = "http://127.0.0.1:1/x"
retry = { attempts = 3 }
"#;
        assert_eq!(
            error_lines(text),
            [
                "p.toml:1:1: handler[0]: missing `stage`: say \"before\" (may modify, allow or \
                 forbid) or \"after\" (notified durably)",
                "p.toml:2:8: handler[0].name: \"b c\" is not a valid handler name: use letters, \
                 digits, '-' and '_'",
                "p.toml:3:11: handler[0].events[0]: `clients*` is not a valid event name \
                 (dot-separated lower-case words, a prefix such as \"clients.*\", or \"*\")",
                "p.toml:9:9: handler[1].stage: unknown value `Before`, expected `before` or `after`",
                "p.toml:10:12: handler[1].priority: invalid type: string \"high\", expected an \
                 integer",
                "p.toml:12:9: handler[1].retry: only applies to the after stage; a before-stage \
                 handler is called once, see `on_error`",
            ]
        );
    }

    #[test]
    fn placeholders_for_missing_keys_cause_no_errors_of_their_own() {
        // Two handlers without a name are no duplicates (of each other or of a real
        // handler with the placeholder's name), one without events does not "name no
        // event", and one without a stage may have after-stage keys.
        let text = "[[handler]]\nevents = [\"*\"]\nstage = \"after\"\nurl = \"http://a/\"\n\
                    [[handler]]\nstage = \"before\"\nurl = \"http://a/\"\n\
                    [[handler]]\nname = \"c\"\nevents = [\"*\"]\nurl = \"http://a/\"\n\
                    retry = { attempts = 2 }\nmodifies = true\n\
                    [[handler]]\nname = \"\"\nevents = [\"*\"]\nstage = \"after\"\n\
                    url = \"http://a/\"\n";
        assert_eq!(
            error_lines(text),
            [
                "p.toml:1:1: handler[0]: missing `name`",
                "p.toml:5:1: handler[1]: missing `name`",
                "p.toml:5:1: handler[1]: missing `events`",
                "p.toml:8:1: handler[2]: missing `stage`: say \"before\" (may modify, allow or \
                 forbid) or \"after\" (notified durably)",
                "p.toml:15:8: handler[3].name: \"\" is not a valid handler name: use letters, \
                 digits, '-' and '_'",
            ]
        );
    }

    #[test]
    fn a_mistake_in_a_header_table_is_pinned_to_its_key() {
        // The span of `[handler.retry]` does not cover its keys; the error must still
        // name the key, and the handler's other problems must still be found.
        let text = "[[handler]]\nevents = [\"*\"]\nstage = \"after\"\nurl = \"http://a/\"\n\
                    [handler.retry]\natempts = 3\n";
        assert_eq!(
            error_lines(text),
            [
                "p.toml:1:1: handler[0]: missing `name`",
                "p.toml:6:1: handler[0].retry.atempts: unknown key `atempts`, expected one of \
                 `attempts`, `backoff`, `max_backoff`",
            ]
        );
    }

    #[test]
    fn a_missing_bracket_is_one_syntax_error_with_a_hint() {
        let text = "[[handler]]\nname = \"a\"\nevents = [\"clients.create\", \"clients.update\"\n\
                    stage = \"before\"\nurl = \"http://a/\"\n\n\
                    [[handler]]\nname = \"b\"\nevents = [\"*\"]\nstage = \"after\"\n";
        assert_eq!(
            error_lines(text),
            [
                "p.toml:4:1: invalid TOML: missing comma between array elements, expected `,` \
              (is a `]` missing on an earlier line?)"
            ]
        );
        // A bracket left open on the same line needs no hint beyond the parser's.
        assert_eq!(
            error_lines("[server\nlisten = 1\n"),
            ["p.toml:1:8: invalid TOML: unclosed table, expected `]`"]
        );
    }

    #[test]
    fn stage_is_required_and_syntax_errors_have_positions() {
        let errors = parse("[[handler]]\nname = \"x\"\nevents = [\"*\"]\nurl = \"http://a/\"\n")
            .unwrap_err();
        assert!(
            errors
                .to_string()
                .contains("p.toml:1:1: handler[0]: missing `stage`"),
            "{errors}"
        );
        let errors = parse("[server\nlisten = 1\n").unwrap_err();
        assert!(errors.to_string().starts_with("p.toml:1:"), "{errors}");
    }
}
