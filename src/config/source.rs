//! From text to raw types: TOML parsing with spans, `${VAR}` substitution, and a
//! deserialisation that keeps going past the first error so that a file's mistakes are
//! all reported at once.
//!
//! Each section and each `[[handler]]` is deserialised on its own. When serde stops at an
//! error, the offending key is found from the error's span, reported, removed, and the
//! table is tried again; a handler with a bad `timeout` and an unknown key gets both
//! reported.

use std::collections::HashMap;
use std::ops::Range;

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use super::error::{ConfigError, KeyPath, Seg};
use super::raw::{RawConfig, RawDefaults, RawEvents, RawHandler, RawServer, RawStore};

/// A problem found before key paths are turned into line and column.
#[derive(Debug, Clone)]
pub struct Diag {
    pub path: KeyPath,
    pub span: Option<Range<usize>>,
    pub message: String,
}

impl Diag {
    pub fn at(path: KeyPath, message: impl Into<String>) -> Self {
        Self {
            path,
            span: None,
            message: message.into(),
        }
    }
}

/// A parsed file: the TOML tree with the spans of every key and value.
pub struct Document<'i> {
    text: &'i str,
    root: Spanned<DeTable<'i>>,
    /// Values that `${VAR}` substitution changed, as written in the file. Used to show
    /// URLs and commands without the secrets that came from the environment.
    pub originals: HashMap<KeyPath, String>,
}

/// What came out of the raw layer: the typed config, and for each handler kept, its index
/// among the file's `[[handler]]` tables (handlers that failed to deserialise are left
/// out, so indices can skip).
pub struct Parsed {
    pub raw: RawConfig,
    pub handler_index: Vec<usize>,
}

/// The top-level sections, in the order the docs list them.
pub const SECTIONS: &[&str] = &["server", "store", "defaults", "events", "handler"];

impl<'i> Document<'i> {
    /// Parses TOML syntax. Syntax errors are all returned, each with its span.
    pub fn parse(text: &'i str) -> Result<Self, Vec<Diag>> {
        let (root, errors) = DeTable::parse_recoverable(text);
        if !errors.is_empty() {
            return Err(errors
                .into_iter()
                .map(|e| Diag {
                    path: KeyPath::root(),
                    span: e.span(),
                    message: format!("invalid TOML: {}", e.message().trim()),
                })
                .collect());
        }
        Ok(Self {
            text,
            root,
            originals: HashMap::new(),
        })
    }

    /// Replaces `${NAME}` and `${NAME:-default}` in every string value. A missing
    /// variable is an error at that value.
    pub fn substitute_env(&mut self, lookup: &dyn Fn(&str) -> Option<String>) -> Vec<Diag> {
        let mut diags = Vec::new();
        let mut originals = HashMap::new();
        for (key, value) in self.root.get_mut().iter_mut() {
            let path = KeyPath::root().key(key.get_ref().as_ref());
            substitute_value(value, &path, lookup, &mut originals, &mut diags);
        }
        self.originals = originals;
        diags
    }

    /// Deserialises every section and handler, collecting every error.
    pub fn deserialize(&self) -> (Parsed, Vec<Diag>) {
        let mut diags = Vec::new();
        let mut raw = RawConfig::default();
        let mut handler_index = Vec::new();
        for (key, value) in self.root.get_ref().iter() {
            let name = key.get_ref().as_ref();
            let path = KeyPath::root().key(name);
            match name {
                "server" => raw.server = recover::<RawServer>(value, &path, &mut diags),
                "store" => raw.store = recover::<RawStore>(value, &path, &mut diags),
                "defaults" => raw.defaults = recover::<RawDefaults>(value, &path, &mut diags),
                "events" => raw.events = recover::<RawEvents>(value, &path, &mut diags),
                "handler" => {
                    let Some(items) = value.get_ref().as_array() else {
                        diags.push(Diag {
                            path,
                            span: Some(value.span()),
                            message: "must be an array of tables: write each handler as \
                                      [[handler]]"
                                .into(),
                        });
                        continue;
                    };
                    for (i, item) in items.iter().enumerate() {
                        if let Some(h) = recover::<RawHandler>(item, &path.index(i), &mut diags) {
                            raw.handler.push(h);
                            handler_index.push(i);
                        }
                    }
                }
                other => {
                    let hint = crate::events::suggest(other, SECTIONS.iter().copied())
                        .map(|s| format!(" (did you mean `{s}`?)"))
                        .unwrap_or_default();
                    diags.push(Diag {
                        path,
                        span: Some(key.span()),
                        message: format!(
                            "unknown section `{other}`{hint}; expected one of {}",
                            SECTIONS.join(", ")
                        ),
                    });
                }
            }
        }
        (Parsed { raw, handler_index }, diags)
    }

    /// The span of the value at `path`, or of the deepest part of it that exists.
    pub fn span_of(&self, path: &KeyPath) -> Option<Range<usize>> {
        let mut span = None;
        let mut table = Some(self.root.get_ref());
        let mut current: Option<&Spanned<DeValue<'_>>> = None;
        for seg in &path.0 {
            let next = match (seg, table, current) {
                (Seg::Key(k), Some(t), _) => t.get(k.as_str()),
                (Seg::Index(i), _, Some(v)) => v.get_ref().as_array().and_then(|a| a.get(*i)),
                _ => None,
            };
            let Some(next) = next else { break };
            span = Some(next.span());
            current = Some(next);
            table = next.get_ref().as_table();
        }
        span
    }

    /// Turns diagnostics into errors with line and column. Those without a span get the
    /// span of their key path.
    pub fn resolve(&self, file: &str, diags: Vec<Diag>) -> Vec<ConfigError> {
        resolve(self.text, file, diags, |p| self.span_of(p))
    }
}

/// Turns diagnostics into sorted errors, looking up missing spans with `span_of`.
pub fn resolve(
    text: &str,
    file: &str,
    diags: Vec<Diag>,
    span_of: impl Fn(&KeyPath) -> Option<Range<usize>>,
) -> Vec<ConfigError> {
    let mut errors: Vec<(usize, ConfigError)> = diags
        .into_iter()
        .map(|d| {
            let span = d.span.or_else(|| span_of(&d.path));
            let (line, column) = match &span {
                Some(s) => {
                    let (l, c) = line_col(text, s.start);
                    (Some(l), Some(c))
                }
                None => (None, None),
            };
            let order = span.map_or(usize::MAX, |s| s.start);
            let error = ConfigError {
                file: file.to_owned(),
                line,
                column,
                path: d.path,
                message: d.message,
            };
            (order, error)
        })
        .collect();
    errors.sort_by_key(|(order, _)| *order);
    errors.dedup_by(|a, b| a.1 == b.1);
    errors.into_iter().map(|(_, e)| e).collect()
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = text[line_start..offset].chars().count() + 1;
    (line, column)
}

fn substitute_value(
    value: &mut Spanned<DeValue<'_>>,
    path: &KeyPath,
    lookup: &dyn Fn(&str) -> Option<String>,
    originals: &mut HashMap<KeyPath, String>,
    diags: &mut Vec<Diag>,
) {
    let span = value.span();
    match value.get_mut() {
        DeValue::String(s) => {
            if !s.contains('$') {
                return;
            }
            match expand_env(s, lookup) {
                Ok(expanded) => {
                    if expanded != s.as_ref() {
                        originals.insert(path.clone(), s.to_string());
                        *s = std::borrow::Cow::Owned(expanded);
                    }
                }
                Err(message) => diags.push(Diag {
                    path: path.clone(),
                    span: Some(span),
                    message,
                }),
            }
        }
        DeValue::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                substitute_value(item, &path.index(i), lookup, originals, diags);
            }
        }
        DeValue::Table(table) => {
            for (key, item) in table.iter_mut() {
                let path = path.key(key.get_ref().as_ref());
                substitute_value(item, &path, lookup, originals, diags);
            }
        }
        _ => {}
    }
}

/// Expands `${NAME}` and `${NAME:-default}`; `$${` stands for a literal `${`. A `$` not
/// followed by `{` is kept as it is.
pub fn expand_env(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(literal) = after.strip_prefix("${") {
            out.push_str("${");
            rest = literal;
            continue;
        }
        let Some(inner) = after.strip_prefix('{') else {
            out.push('$');
            rest = after;
            continue;
        };
        let Some(end) = inner.find('}') else {
            return Err(format!("unclosed `${{` in {text:?}"));
        };
        let expr = &inner[..end];
        let (name, default) = match expr.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (expr, None),
        };
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(format!(
                "`${{{expr}}}` is not a valid variable reference; write ${{NAME}} or \
                 ${{NAME:-default}}"
            ));
        }
        match (lookup(name), default) {
            (Some(v), Some(d)) if v.is_empty() => out.push_str(d),
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(format!(
                    "environment variable `{name}` is not set (write ${{{name}:-default}} \
                     to give a default)"
                ));
            }
        }
        rest = &inner[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Deserialises `value` as `T`, reporting and removing offending keys until it succeeds
/// or the error is about the table as a whole.
fn recover<T: DeserializeOwned>(
    value: &Spanned<DeValue<'_>>,
    base: &KeyPath,
    diags: &mut Vec<Diag>,
) -> Option<T> {
    let mut value = value.clone();
    let mut removed: Vec<String> = Vec::new();
    // Each round removes one key, so a table can take at most as many rounds as it has
    // values; the bound only guards against a loop if removal ever fails to progress.
    for _ in 0..256 {
        let error = match T::deserialize(ValueDeserializer::from(value.clone())) {
            Ok(t) => return Some(t),
            Err(e) => e,
        };
        let span = error.span();
        let rel = span
            .as_ref()
            .map(|s| locate(&value, s.start))
            .unwrap_or_default();
        let message = tidy(error.message());
        if rel.is_empty() {
            let suppressed = missing_field(error.message()).is_some_and(|f| removed.contains(&f));
            if !suppressed {
                diags.push(Diag {
                    path: base.clone(),
                    span,
                    message,
                });
            }
            return None;
        }
        diags.push(Diag {
            path: base.join(&rel),
            span,
            message,
        });
        if let Some(Seg::Key(first)) = rel.0.first() {
            removed.push(first.clone());
        }
        if !remove(&mut value, &rel.0) {
            return None;
        }
    }
    None
}

/// The path, relative to `value`, of the deepest key or element whose key or value
/// covers `offset`.
fn locate(value: &Spanned<DeValue<'_>>, offset: usize) -> KeyPath {
    let mut path = KeyPath::root();
    let mut current = value;
    loop {
        let next = match current.get_ref() {
            DeValue::Table(table) => table.iter().find_map(|(k, v)| {
                let in_key = k.span().contains(&offset);
                let in_value = v.span().contains(&offset);
                (in_key || in_value).then(|| (Seg::Key(k.get_ref().to_string()), v, in_key))
            }),
            DeValue::Array(items) => items
                .iter()
                .enumerate()
                .find(|(_, v)| v.span().contains(&offset))
                .map(|(i, v)| (Seg::Index(i), v, false)),
            _ => None,
        };
        let Some((seg, next, at_key)) = next else {
            return path;
        };
        path.0.push(seg);
        if at_key {
            return path;
        }
        current = next;
    }
}

/// Removes the value at `path`; false when there was nothing there.
fn remove(value: &mut Spanned<DeValue<'_>>, path: &[Seg]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut current = value;
    for seg in parents {
        let next = match (seg, current.get_mut()) {
            (Seg::Key(k), DeValue::Table(t)) => t.get_mut(k.as_str()),
            (Seg::Index(i), DeValue::Array(a)) => a.get_mut(*i),
            _ => None,
        };
        match next {
            Some(n) => current = n,
            None => return false,
        }
    }
    match (last, current.get_mut()) {
        (Seg::Key(k), DeValue::Table(t)) => t.remove(k.as_str()).is_some(),
        (Seg::Index(i), DeValue::Array(a)) => {
            let mut kept = toml::de::DeArray::new();
            let mut found = false;
            for (j, item) in a.iter().enumerate() {
                if j == *i {
                    found = true;
                } else {
                    kept.push(item.clone());
                }
            }
            *a = kept;
            found
        }
        _ => false,
    }
}

/// `missing field `stage`` -> `stage`.
fn missing_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    Some(rest.split('`').next()?.to_owned())
}

/// Serde's messages, in the words of this file's users.
fn tidy(message: &str) -> String {
    let message = message.trim();
    if let Some(field) = missing_field(message) {
        return match field.as_str() {
            "stage" => "missing `stage`: say \"before\" (may modify, allow or forbid) or \
                        \"after\" (notified durably)"
                .to_owned(),
            _ => format!("missing `{field}`"),
        };
    }
    let mut message = message
        .replace("unknown field", "unknown key")
        .replace("unknown variant", "unknown value")
        .replace("expected a sequence", "expected an array");
    for (rust, words) in [
        ("expected i64", "expected an integer"),
        ("expected u32", "expected a whole number"),
        ("expected u64", "expected a whole number"),
    ] {
        message = message.replace(rust, words);
    }
    if let Some(at) = message.find("expected struct ") {
        message.truncate(at);
        message.push_str("expected a table");
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "TOKEN" => Some("s3cret".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_variables() {
        assert_eq!(expand_env("a ${TOKEN} b", &env).unwrap(), "a s3cret b");
        assert_eq!(expand_env("${NOPE:-x:y}", &env).unwrap(), "x:y");
        assert_eq!(expand_env("${EMPTY:-d}", &env).unwrap(), "d");
        assert_eq!(expand_env("${EMPTY}", &env).unwrap(), "");
        assert_eq!(expand_env("$${TOKEN} $5", &env).unwrap(), "${TOKEN} $5");
        assert!(
            expand_env("${NOPE}", &env)
                .unwrap_err()
                .contains("`NOPE` is not set")
        );
        assert!(expand_env("${1X}", &env).is_err());
        assert!(expand_env("${TOKEN", &env).is_err());
    }

    #[test]
    fn line_and_column_count_characters() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(line_col(text, 0), (1, 1));
        let at = text.find('"').unwrap();
        assert_eq!(line_col(text, at), (2, 6));
    }
}
