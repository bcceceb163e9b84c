//! The compile step for one `[[handler]]`: its events, stage settings, filter and
//! target (an HTTP URL or a script), every rule checked with its key path.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;

use super::{Checker, Defaults};
use crate::config::defaults;
use crate::config::error::KeyPath;
use crate::config::raw::{RawHandler, Stage};
use crate::config::{Handler, HttpTarget, SET_BY_PROVISIOND, ScriptTarget, SigningKey, Target};
use crate::events::{self, EventPattern};
use crate::filter::Filter;

impl Checker<'_> {
    pub(super) fn handler(
        &mut self,
        raw: &RawHandler,
        index: usize,
        path: &KeyPath,
        defaults: &Defaults,
        known: &[String],
        base: &Path,
    ) -> Option<Handler> {
        let errors_before = self.diags.len();

        let name_ok = !raw.name.is_empty()
            && raw
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !name_ok {
            self.error(
                path.key("name"),
                format!(
                    "{:?} is not a valid handler name: use letters, digits, '-' and '_'",
                    raw.name
                ),
            );
        }

        let events = self.event_patterns(raw, path, known);
        let target = self.target(raw, path, base);

        let stage = raw.stage;
        if self.is_synthetic(&path.key("stage")) {
            // The stage is not known, so neither is which keys it allows.
        } else if stage == Stage::After {
            if raw.modifies.is_some() {
                self.error(
                    path.key("modifies"),
                    "only before-stage handlers can modify the data",
                );
            }
            if raw.on_error.is_some() {
                self.error(
                    path.key("on_error"),
                    "only applies to the before stage; after-stage deliveries are retried \
                     (see `retry`)",
                );
            }
        } else if raw.retry.is_some() {
            self.error(
                path.key("retry"),
                "only applies to the after stage; a before-stage handler is called once, \
                 see `on_error`",
            );
        }

        let timeout = self.positive_duration(
            raw.timeout.as_deref(),
            path.key("timeout"),
            defaults.timeout,
        );
        let max_concurrency = match raw.max_concurrency {
            Some(n) => self.whole(Some(n), path.key("max_concurrency"), 1) as usize,
            None => defaults.max_concurrency,
        };
        let retry = self.retry(raw.retry.as_ref(), &path.key("retry"), defaults.retry);

        let filter_keys = [path.key("match").0, path.key("when").0];
        let filter_from_env = self
            .originals
            .keys()
            .any(|k| filter_keys.iter().any(|f| k.0.starts_with(f)));
        let filter = match Filter::compile(raw.match_.as_ref(), raw.when.as_deref()) {
            Ok(f) => Filter {
                from_env: filter_from_env,
                ..f
            },
            Err(errors) => {
                for (rel, message) in errors {
                    self.error(path.join(&rel), message);
                }
                Filter::default()
            }
        };

        if self.diags.len() > errors_before {
            return None;
        }
        Some(Handler {
            name: raw.name.clone(),
            position: index,
            stage,
            priority: raw.priority.unwrap_or(defaults::PRIORITY),
            enabled: raw.enabled.unwrap_or(defaults::ENABLED),
            events,
            target: target?,
            modifies: raw.modifies.unwrap_or(defaults::MODIFIES),
            on_error: raw.on_error.unwrap_or(defaults.on_error),
            timeout,
            max_concurrency,
            retry,
            filter,
            slots: Arc::new(tokio::sync::Semaphore::new(max_concurrency)),
            hidden: self.hidden.clone(),
            raw: raw.clone(),
        })
    }

    fn event_patterns(
        &mut self,
        raw: &RawHandler,
        path: &KeyPath,
        known: &[String],
    ) -> Vec<EventPattern> {
        let path = path.key("events");
        if raw.events.is_empty() {
            self.error(
                path.clone(),
                "must name at least one event (or \"*\" for all)",
            );
        }
        let mut patterns = Vec::new();
        for (i, text) in raw.events.iter().enumerate() {
            match event_pattern(text, known) {
                Ok(pattern) if !patterns.contains(&pattern) => patterns.push(pattern),
                Ok(_) => {}
                Err(message) => self.error(path.index(i), message),
            }
        }
        patterns
    }

    fn target(&mut self, raw: &RawHandler, path: &KeyPath, base: &Path) -> Option<Target> {
        match (&raw.url, &raw.command) {
            (Some(_), Some(_)) => {
                self.error(
                    path.key("command"),
                    "a handler has either `url` (HTTP) or `command` (script), not both",
                );
                None
            }
            (None, None) => {
                // A `url` or `command` of the wrong type was reported (and taken out):
                // that is the mistake, not a missing target.
                let reported = self.diags.iter().any(|d| {
                    ["url", "command"]
                        .iter()
                        .any(|key| d.path.0.starts_with(&path.key(*key).0))
                });
                if !reported {
                    self.error(
                        path.clone(),
                        "a handler needs `url` (HTTP) or `command` (script)",
                    );
                }
                None
            }
            (Some(url), None) => {
                for key in RawHandler::SCRIPT_ONLY {
                    if key_set(raw, key) {
                        self.error(
                            path.key(*key),
                            "only applies to script handlers (`command`)",
                        );
                    }
                }
                self.http_target(raw, url, path)
            }
            (None, Some(argv)) => {
                for key in RawHandler::HTTP_ONLY {
                    if key_set(raw, key) {
                        self.error(path.key(*key), "only applies to HTTP handlers (`url`)");
                    }
                }
                self.script_target(raw, argv, path, base)
            }
        }
    }

    fn http_target(&mut self, raw: &RawHandler, url: &str, path: &KeyPath) -> Option<Target> {
        let url_path = path.key("url");
        // When the value came from `${VAR}`, messages show the URL as written, never the
        // value, and say where the value came from.
        let written = self.originals.get(&url_path).map(String::as_str);
        let shown = written.map_or_else(|| url.to_owned(), without_password);
        let from_env = self.env_note(&url_path);
        let parsed = match reqwest::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Some(u),
            Ok(u) => {
                let shown = if written.is_some() {
                    &shown
                } else {
                    u.as_str()
                };
                self.error(
                    url_path.clone(),
                    format!("{shown:?} must be an http:// or https:// URL{from_env}"),
                );
                None
            }
            Err(e) => {
                self.error(url_path.clone(), format!("invalid URL: {e}{from_env}"));
                None
            }
        };
        let method = match raw.method.as_deref().map(str::to_ascii_uppercase) {
            None => reqwest::Method::from_bytes(defaults::METHOD.as_bytes())
                .expect("the default method is valid"),
            Some(m) if matches!(m.as_str(), "POST" | "PUT" | "PATCH") => {
                reqwest::Method::from_bytes(m.as_bytes()).expect("known method")
            }
            Some(m) => {
                self.error(
                    path.key("method"),
                    format!("{m:?} cannot carry the envelope; use POST, PUT or PATCH"),
                );
                reqwest::Method::POST
            }
        };
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in raw.headers.iter().flatten() {
            let header_path = path.key("headers").key(name.as_str());
            let set = SET_BY_PROVISIOND
                .iter()
                .find(|(set, _)| set.eq_ignore_ascii_case(name));
            if let Some((_, what)) = set {
                self.error(
                    header_path,
                    format!("{name:?} is set by provisiond ({what}); remove it from `headers`"),
                );
                continue;
            }
            let parsed_name = reqwest::header::HeaderName::from_bytes(name.as_bytes());
            let parsed_value = reqwest::header::HeaderValue::from_str(value);
            match (parsed_name, parsed_value) {
                (Ok(n), Ok(mut v)) => {
                    let empty = self.empty_in(&header_path);
                    if !empty.is_empty() {
                        let said = match empty.as_slice() {
                            [one] => format!(
                                "the environment variable `{one}` is set but empty, so it adds"
                            ),
                            many => format!(
                                "the environment variables {} are set but empty, so they add",
                                super::quoted_list(many)
                            ),
                        };
                        self.warnings.push(format!(
                            "handler {:?}: header {name}: {said} nothing to the value sent",
                            raw.name
                        ));
                    }
                    v.set_sensitive(true);
                    headers.insert(n, v);
                }
                (Err(_), _) => self.error(header_path, format!("{name:?} is not a header name")),
                (_, Err(_)) => self.error(header_path, "is not a valid header value"),
            }
        }
        let secret = raw.secret.as_deref().and_then(|s| {
            let key = s
                .strip_prefix("whsec_")
                .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
                .filter(|k| !k.is_empty());
            if key.is_none() {
                let from_env = self.env_note(&path.key("secret"));
                self.error(
                    path.key("secret"),
                    format!(
                        "must be \"whsec_\" followed by base64 (a Standard Webhooks \
                         secret){from_env}"
                    ),
                );
            }
            key.map(SigningKey)
        });
        Some(Target::Http(HttpTarget {
            shown_url: without_password(written.unwrap_or(url)),
            url: parsed?,
            method,
            headers,
            secret,
        }))
    }

    fn script_target(
        &mut self,
        raw: &RawHandler,
        argv: &[String],
        path: &KeyPath,
        base: &Path,
    ) -> Option<Target> {
        let command_path = path.key("command");
        if argv.is_empty() || argv[0].trim().is_empty() {
            let from_env = self.env_note(&command_path.index(0));
            self.error(
                command_path,
                format!(
                    "must name a program{from_env}: command = [\"/path/to/script\", \
                     \"arg\"...]"
                ),
            );
            return None;
        }
        let shown_argv = argv
            .iter()
            .enumerate()
            .map(|(i, arg)| {
                self.originals
                    .get(&command_path.index(i))
                    .cloned()
                    .unwrap_or_else(|| arg.clone())
            })
            .collect();
        let mut argv = argv.to_vec();
        let written = Path::new(&argv[0]);
        if written.is_relative() && argv[0].contains('/') {
            argv[0] = base.join(written).display().to_string();
        }
        let mut env = Vec::new();
        for (name, value) in raw.env.iter().flatten() {
            let ok = !name.is_empty() && !name.contains('=') && !name.contains('\0');
            if !ok || value.contains('\0') {
                self.error(
                    path.key("env").key(name.as_str()),
                    "is not a valid environment variable",
                );
                continue;
            }
            env.push((name.clone(), value.clone()));
        }
        // A bare name is looked up now, in the `PATH` the script will run with: its
        // `env`'s when it sets one, else provisiond's.
        let program = if argv[0].contains('/') {
            PathBuf::from(&argv[0])
        } else {
            let own_path = env.iter().find(|(name, _)| name == "PATH");
            let found = match own_path {
                Some((_, value)) => in_path(&argv[0], std::ffi::OsStr::new(value)),
                None => on_path(&argv[0]),
            };
            found.unwrap_or_else(|| PathBuf::from(&argv[0]))
        };
        let workdir = match raw.workdir.as_deref() {
            Some(dir) => base.join(dir),
            None => base.to_path_buf(),
        };
        Some(Target::Script(ScriptTarget {
            argv,
            program,
            shown_argv,
            env,
            workdir,
        }))
    }
}

/// The executable file `name` in provisiond's `PATH`, first found, as the shell would
/// run it; `None` when there is none (the call then fails as it would have).
pub(in crate::config) fn on_path(name: &str) -> Option<PathBuf> {
    in_path(name, &std::env::var_os("PATH")?)
}

/// The executable file `name` in the directories of `path` (a `PATH` value), first
/// found.
fn in_path(name: &str, path: &std::ffi::OsStr) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;

    std::env::split_paths(path)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(name))
        .find(|file| {
            std::fs::metadata(file)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// One entry of a handler's `events`, checked against the `known` event names.
fn event_pattern(text: &str, known: &[String]) -> Result<EventPattern, String> {
    let pattern = match EventPattern::parse(text) {
        Ok(pattern) => pattern,
        Err(_) if text.chars().any(|c| c.is_ascii_uppercase()) => {
            let lower = text.to_ascii_lowercase();
            let hint = EventPattern::parse(&lower)
                .map(|p| did_you_mean(&lower, &p, known))
                .unwrap_or_default();
            return Err(format!(
                "`{text}` is not a valid event name: event names are lower-case{hint}"
            ));
        }
        Err(e) => return Err(e),
    };
    match &pattern {
        EventPattern::Exact(name) if !known.contains(name) => Err(format!(
            "unknown event {text:?}{}; list events the billing's catalogue lacks in \
             [events] extra",
            did_you_mean(text, &pattern, known)
        )),
        EventPattern::Prefix(prefix) if !known.iter().any(|k| k.starts_with(prefix)) => {
            Err(format!(
                "{text:?} matches no known event{}; list events the billing's catalogue \
                 lacks in [events] extra",
                did_you_mean(text, &pattern, known)
            ))
        }
        _ => Ok(pattern),
    }
}

/// ` (did you mean "clients.create"?)`: the known event name, or for a prefix pattern the
/// known prefix ("clients.*"), closest to `text`; empty when none is close.
fn did_you_mean(text: &str, pattern: &EventPattern, known: &[String]) -> String {
    let candidates: Vec<String> = match pattern {
        EventPattern::Exact(_) => known.to_vec(),
        EventPattern::Prefix(_) => known
            .iter()
            .flat_map(|k| {
                k.match_indices('.')
                    .map(|(at, _)| format!("{}.*", &k[..at]))
                    .collect::<Vec<_>>()
            })
            .collect(),
        EventPattern::Any => Vec::new(),
    };
    events::suggest(text, candidates.iter().map(String::as_str))
        .map(|s| format!(" (did you mean \"{s}\"?)"))
        .unwrap_or_default()
}

fn key_set(raw: &RawHandler, key: &str) -> bool {
    match key {
        "method" => raw.method.is_some(),
        "headers" => raw.headers.is_some(),
        "secret" => raw.secret.is_some(),
        "env" => raw.env.is_some(),
        "workdir" => raw.workdir.is_some(),
        _ => false,
    }
}

/// The URL as written with its password, if any, replaced by `***`:
/// `scheme://user:PASSWORD@host/...` -> `scheme://user:***@host/...`. The rest stays byte
/// for byte as written; a round trip through `Url` would percent-encode `${VAR}`.
fn without_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let start = scheme_end + 3;
    let rest = &url[start..];
    let authority = &rest[..outside_refs(rest)
        .find(|&(_, c)| matches!(c, '/' | '?' | '#'))
        .map_or(rest.len(), |(i, _)| i)];
    let Some(at) = outside_refs(authority)
        .filter(|&(_, c)| c == '@')
        .last()
        .map(|(i, _)| i)
    else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    match outside_refs(userinfo).find(|&(_, c)| c == ':') {
        Some((colon, _)) if colon + 1 < userinfo.len() => {
            format!("{}{}:***{}", &url[..start], &userinfo[..colon], &rest[at..])
        }
        _ => url.to_owned(),
    }
}

/// The characters of `text` with their byte offsets, leaving out those inside `${...}`
/// references (whose defaults may hold `/`, `:` or `@`).
fn outside_refs(text: &str) -> impl Iterator<Item = (usize, char)> + '_ {
    let mut depth = 0usize;
    text.char_indices().filter(move |&(i, c)| {
        if c == '$' && text[i..].starts_with("${") {
            depth += 1;
        } else if c == '}' && depth > 0 {
            depth -= 1;
            return false;
        }
        depth == 0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_password_of_a_url_is_masked() {
        for (written, shown) in [
            (
                "http://user:${PW}@crm/${PATHX:-def}/$${literal}",
                "http://user:***@crm/${PATHX:-def}/$${literal}",
            ),
            (
                "https://u:p%40ss@h:8443/a?b=c#d",
                "https://u:***@h:8443/a?b=c#d",
            ),
            ("http://u:${PW:-a/b@c}@h/x", "http://u:***@h/x"),
            ("http://${USER:-a:b}:pw@h/", "http://${USER:-a:b}:***@h/"),
            ("http://user@h/a:b@c", "http://user@h/a:b@c"),
            ("http://h/?q=a:b@c", "http://h/?q=a:b@c"),
            ("http://user:@h/", "http://user:@h/"),
            ("${CRM_URL}", "${CRM_URL}"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(without_password(written), shown, "{written}");
        }
    }
}
