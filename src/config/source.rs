//! From text to raw types: TOML parsing with spans, `${VAR}` substitution (by
//! [`super::env`]), and a
//! deserialisation that keeps going past the first error so that a file's mistakes are
//! all reported at once.
//!
//! Each section and each `[[handler]]` is deserialised on its own. When serde stops at an
//! error, the offending key is found from the error's span, reported, removed, and the
//! table is tried again; a handler with a bad `timeout` and an unknown key gets both
//! reported. A required key that is missing (or was removed) gets a stand-in value (see
//! [`Recover`]), so that the handler is still built and its other keys still checked.

use std::collections::HashMap;
use std::ops::Range;

use serde::de::DeserializeOwned;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use super::error::{ConfigError, KeyPath, Seg};
use super::raw::{RawConfig, RawDefaults, RawEvents, RawHandler, RawServer, RawStore};

/// A problem found before key paths are turned into line and column.
#[derive(Debug, Clone)]
pub(crate) struct Diag {
    pub path: KeyPath,
    pub span: Option<Range<usize>>,
    pub message: String,
}

impl Diag {
    pub(crate) fn at(path: KeyPath, message: impl Into<String>) -> Self {
        Self {
            path,
            span: None,
            message: message.into(),
        }
    }
}

/// A parsed file: the TOML tree with the spans of every key and value.
pub(super) struct Document<'i> {
    text: &'i str,
    root: Spanned<DeTable<'i>>,
    /// Values that `${VAR}` substitution changed, as written in the file. Used to show
    /// URLs and commands without the secrets that came from the environment.
    pub originals: HashMap<KeyPath, String>,
}

/// What came out of the raw layer: the typed config, and for each handler kept, its index
/// among the file's `[[handler]]` tables (handlers that failed to deserialise are left
/// out, so indices can skip).
pub(super) struct Parsed {
    pub raw: RawConfig,
    pub handler_index: Vec<usize>,
    /// The key paths of placeholder values put in for required keys that were missing or
    /// wrong. Their errors were reported; the compile step does not report errors at or
    /// under these paths, which would be about the placeholder, not the file.
    pub synthetic: Vec<KeyPath>,
}

/// The top-level sections, in the order the docs list them.
pub(super) const SECTIONS: &[&str] = &["server", "store", "defaults", "events", "handler"];

impl<'i> Document<'i> {
    /// Parses TOML syntax. Only the first syntax error is returned: what the parser
    /// reports after it, while recovering, is mostly noise caused by the first.
    pub(super) fn parse(text: &'i str) -> Result<Self, Vec<Diag>> {
        let (root, errors) = DeTable::parse_recoverable(text);
        if let Some(first) = errors.first() {
            return Err(vec![syntax_error(text, first)]);
        }
        Ok(Self {
            text,
            root,
            originals: HashMap::new(),
        })
    }

    /// Replaces `${NAME}` and `${NAME:-default}` in every string value. A missing
    /// variable is an error at that value.
    pub(super) fn substitute_env(&mut self, lookup: &dyn Fn(&str) -> Option<String>) -> Vec<Diag> {
        let mut diags = Vec::new();
        let mut originals = HashMap::new();
        for (key, value) in self.root.get_mut().iter_mut() {
            let path = KeyPath::root().key(key.get_ref().as_ref());
            super::env::substitute_value(value, &path, lookup, &mut originals, &mut diags);
        }
        self.originals = originals;
        diags
    }

    /// Deserialises every section and handler, collecting every error.
    pub(super) fn deserialize(&self) -> (Parsed, Vec<Diag>) {
        let mut diags = Vec::new();
        let mut raw = RawConfig::default();
        let mut handler_index = Vec::new();
        let mut synthetic = Vec::new();
        for (key, value) in self.root.get_ref().iter() {
            let name = key.get_ref().as_ref();
            let path = KeyPath::root().key(name);
            let mut recovery = Recovery {
                diags: &mut diags,
                synthetic: &mut synthetic,
            };
            let is_section = matches!(name, "server" | "store" | "defaults" | "events");
            if is_section && value.get_ref().as_table().is_none() {
                recovery.diags.push(Diag {
                    path,
                    span: Some(value.span()),
                    message: not_a_table(name, value.get_ref()),
                });
                continue;
            }
            match name {
                "server" => raw.server = recovery.recover::<RawServer>(value, &path),
                "store" => raw.store = recovery.recover::<RawStore>(value, &path),
                "defaults" => raw.defaults = recovery.recover::<RawDefaults>(value, &path),
                "events" => raw.events = recovery.recover::<RawEvents>(value, &path),
                "handler" => {
                    let Some(items) = value.get_ref().as_array() else {
                        recovery.diags.push(Diag {
                            path,
                            span: Some(value.span()),
                            message: "must be an array of tables: write each handler as \
                                      [[handler]]"
                                .into(),
                        });
                        continue;
                    };
                    for (i, item) in items.iter().enumerate() {
                        if let Some(h) = recovery.recover::<RawHandler>(item, &path.index(i)) {
                            raw.handler.push(h);
                            handler_index.push(i);
                        }
                    }
                }
                other => {
                    let hint = crate::events::suggest(other, SECTIONS.iter().copied())
                        .map(|s| format!(" (did you mean `{s}`?)"))
                        .unwrap_or_default();
                    recovery.diags.push(Diag {
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
        let parsed = Parsed {
            raw,
            handler_index,
            synthetic,
        };
        (parsed, diags)
    }

    /// The span of the value at `path`, or of the deepest part of it that exists.
    pub(super) fn span_of(&self, path: &KeyPath) -> Option<Range<usize>> {
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
    pub(super) fn resolve(&self, file: &str, diags: Vec<Diag>) -> Vec<ConfigError> {
        resolve(self.text, file, diags, |p| self.span_of(p))
    }
}

/// A TOML syntax error, with a hint when it is likely caused by a bracket left open on
/// an earlier line: the parser then stumbles on the next line, not at the real mistake.
fn syntax_error(text: &str, error: &toml::de::Error) -> Diag {
    let message = error.message().trim();
    let span = error.span();
    if message == "duplicate key"
        && let Some(diag) = span.clone().and_then(|at| duplicate_key(text, at))
    {
        return diag;
    }
    // The parser stopped at the start of a line, or at the `=` of a line's `key =`: a
    // list or table left open above has run into the next key.
    let at_line_start = span
        .as_ref()
        .is_some_and(|s| starts_line(text, s.start) || after_a_key(text, s.start));
    let hint = match closing_bracket(message) {
        Some(bracket) if at_line_start => {
            format!(" (is a `{bracket}` missing on an earlier line?)")
        }
        _ => String::new(),
    };
    Diag {
        path: KeyPath::root(),
        span,
        message: format!("invalid TOML: {message}{hint}"),
    }
}

/// toml's "duplicate key", made to name the key and the line it was first set on. toml
/// gives only the span of the second occurrence's key: the key is read there, and the
/// text parsed again with that occurrence renamed, so that the tree shows where the key
/// sits (its path) and, untouched, where the first occurrence is. `None` when the tree
/// does not tell (the plain message is kept then).
fn duplicate_key(text: &str, at: Range<usize>) -> Option<Diag> {
    let written = text.get(at.clone())?;
    // The key as TOML reads it (`"na me"` is `na me`).
    let name = DeTable::parse(&format!("{written} = 0"))
        .ok()?
        .get_ref()
        .keys()
        .next()?
        .get_ref()
        .to_string();
    let renamed = (0..)
        .map(|n| format!("provisiond-duplicate-{n}"))
        .find(|r| !text.contains(r.as_str()))?;
    let patched = format!("{}{renamed}{}", &text[..at.start], &text[at.end..]);
    let (root, _) = DeTable::parse_recoverable(&patched);
    let root = Spanned::new(root.span(), DeValue::Table(root.into_inner()));
    let (mut path, value) = find_key(&root, &renamed)?;
    path.0.pop();
    let path = path.key(name.as_str());
    let (line, _) = line_col(text, at.start);
    let first = first_key_span(&root, &path)
        .filter(|s| s.end <= at.start)
        .map(|s| match line_col(text, s.start) {
            (l, c) if l == line => format!("line {l}, column {c}"),
            (l, _) => format!("line {l}"),
        });
    // A `[table]` or `[[table]]` header: the key is on a line that opens with `[`, its
    // value a table (or an array of them) whose span is the header's.
    let line_start = text[..at.start].rfind('\n').map_or(0, |i| i + 1);
    let in_header = text[line_start..at.start].trim_start().starts_with('[')
        && matches!(value.get_ref(), DeValue::Table(_) | DeValue::Array(_));
    let header = patched.get(value.span()).filter(|_| in_header);
    let message = match header {
        Some(header) => format!(
            "invalid TOML: duplicate table {}{}",
            header.replace(&renamed, written),
            first
                .map(|f| format!(" (first defined on {f})"))
                .unwrap_or_default()
        ),
        None => format!(
            "invalid TOML: duplicate key `{name}`{}",
            first
                .map(|f| format!(" (first set on {f})"))
                .unwrap_or_default()
        ),
    };
    Some(Diag {
        path,
        span: Some(at),
        message,
    })
}

/// The path to the first key called `key` below `value`, and its value.
fn find_key<'a, 'i>(
    value: &'a Spanned<DeValue<'i>>,
    key: &str,
) -> Option<(KeyPath, &'a Spanned<DeValue<'i>>)> {
    match value.get_ref() {
        DeValue::Table(table) => table.iter().find_map(|(k, v)| {
            let here = KeyPath::root().key(k.get_ref().as_ref());
            if k.get_ref() == key {
                return Some((here, v));
            }
            let (rest, found) = find_key(v, key)?;
            Some((here.join(&rest), found))
        }),
        DeValue::Array(items) => items.iter().enumerate().find_map(|(i, v)| {
            let (rest, found) = find_key(v, key)?;
            Some((KeyPath::root().index(i).join(&rest), found))
        }),
        _ => None,
    }
}

/// The span of the key (not the value) at `path` below `root`.
fn first_key_span(root: &Spanned<DeValue<'_>>, path: &KeyPath) -> Option<Range<usize>> {
    let (Seg::Key(last), parents) = path.0.split_last()? else {
        return None;
    };
    let mut current = root;
    for seg in parents {
        current = match (seg, current.get_ref()) {
            (Seg::Key(k), DeValue::Table(t)) => t.get(k.as_str())?,
            (Seg::Index(i), DeValue::Array(a)) => a.get(*i)?,
            _ => return None,
        };
    }
    let table = current.get_ref().as_table()?;
    table.get_key_value(last.as_str()).map(|(k, _)| k.span())
}

/// The bracket that closes what a syntax error `message` is about (an array, an inline
/// table, a table header), if it is about one.
fn closing_bracket(message: &str) -> Option<char> {
    if message.contains("array") || message.starts_with("unclosed table") {
        Some(']')
    } else if message.contains("inline table") || message.contains("key-value pairs") {
        Some('}')
    } else {
        None
    }
}

/// What to say of a section (`server`, `store`, `defaults`, `events`) written as
/// something other than one table: `[[server]]`, or `events = [...]` at the top.
fn not_a_table(name: &str, value: &DeValue<'_>) -> String {
    match (name, value) {
        ("events", DeValue::Array(_)) => "must be a table: `[events]` with `extra = [...]` \
             lists the events beyond the catalogue; the events a handler takes go in its \
             own `events`, under [[handler]]"
            .to_owned(),
        (_, DeValue::Array(_)) => format!("must be one table: write [{name}], not [[{name}]]"),
        _ => format!("must be a table: write [{name}], with its keys on the lines below"),
    }
}

/// Whether `offset` is the `=` of a line that starts with a bare key (`stage =`).
fn after_a_key(text: &str, offset: usize) -> bool {
    let before = &text[..offset.min(text.len())];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let key = before[line_start..].trim();
    text[offset.min(text.len())..].starts_with('=')
        && !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Whether only blanks come before `offset` on its line.
fn starts_line(text: &str, offset: usize) -> bool {
    let before = &text[..offset.min(text.len())];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    before[line_start..].trim().is_empty()
}

/// Turns diagnostics into sorted errors, looking up missing spans with `span_of`.
pub(super) fn resolve(
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

/// 1-based line and column (in characters) of a byte offset in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = text[line_start..offset].chars().count() + 1;
    (line, column)
}

/// A stand-in for a required key that is missing, or whose value was wrong and removed.
pub(crate) enum StandIn {
    /// What the file evidently meant (`stage = "Before"` read as "before"); the wrong
    /// value is still reported, but the rest of the handler is checked against this one.
    Meant(DeValue<'static>),
    /// A neutral value that only lets deserialisation go on: nothing about it is reported.
    Placeholder(DeValue<'static>),
}

/// A raw type that [`Recovery::recover`] can deserialise past its mistakes.
pub(crate) trait Recover: DeserializeOwned {
    /// The stand-in for the required key `field`, given the value the file had for it
    /// (removed because it was wrong), if any. `None`: the table cannot be recovered.
    fn stand_in(_field: &str, _written: Option<&DeValue<'_>>) -> Option<StandIn> {
        None
    }

    /// A serde message about the value at `path`, in the words of the file's users (the
    /// config's, by default).
    fn word(path: &KeyPath, message: &str) -> String {
        tidy(path, message)
    }
}

/// Deserialises `value` as `T` past its mistakes, as the config's sections are: the value
/// if it could be had, every problem found (with its span and its path below `value`),
/// and the paths of the placeholders put in.
pub(crate) fn recover<T: Recover>(
    value: &Spanned<DeValue<'_>>,
) -> (Option<T>, Vec<Diag>, Vec<KeyPath>) {
    let (mut diags, mut synthetic) = (Vec::new(), Vec::new());
    let mut recovery = Recovery {
        diags: &mut diags,
        synthetic: &mut synthetic,
    };
    let value = recovery.recover::<T>(value, &KeyPath::root());
    (value, diags, synthetic)
}

impl Recover for RawServer {}
impl Recover for RawStore {}
impl Recover for RawDefaults {}
impl Recover for RawEvents {}

impl Recover for RawHandler {
    /// Placeholders that cause no errors of their own: an empty `name` (never a valid
    /// one, so it clashes with no real handler's), `events = ["*"]` (not "must name at
    /// least one event"), `stage = "before"`. A misspelt stage such as "Before" or
    /// "AFTER" is taken as meant, so that stage rules (`retry`, `modifies`) are checked.
    fn stand_in(field: &str, written: Option<&DeValue<'_>>) -> Option<StandIn> {
        let text = |s: &str| DeValue::String(s.to_owned().into());
        match field {
            "name" => Some(StandIn::Placeholder(text(""))),
            "events" => {
                let mut any = toml::de::DeArray::new();
                any.push(Spanned::new(0..0, text("*")));
                Some(StandIn::Placeholder(DeValue::Array(any)))
            }
            "stage" => {
                let meant = match written {
                    Some(DeValue::String(s)) => s.trim().to_ascii_lowercase(),
                    _ => String::new(),
                };
                Some(match meant.as_str() {
                    "before" | "after" => StandIn::Meant(text(&meant)),
                    _ => StandIn::Placeholder(text("before")),
                })
            }
            _ => None,
        }
    }
}

/// Where [`Recovery::recover`] puts what it finds.
struct Recovery<'a> {
    diags: &'a mut Vec<Diag>,
    synthetic: &'a mut Vec<KeyPath>,
}

impl Recovery<'_> {
    /// Deserialises `value` as `T`, reporting and removing offending keys, and standing
    /// in for missing required ones, until it succeeds or the error is about the table
    /// as a whole.
    fn recover<T: Recover>(&mut self, value: &Spanned<DeValue<'_>>, base: &KeyPath) -> Option<T> {
        let mut value = value.clone();
        // The top-level keys removed so far, with the values they had.
        let mut removed: Vec<(String, Spanned<DeValue<'_>>)> = Vec::new();
        // Each round removes or adds one key, so a table takes few rounds; the bound only
        // guards against a loop if that ever fails to progress.
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
            if rel.is_empty() {
                // About the table as a whole: only a missing required key can be mended.
                let Some(field) = missing_field(error.message()) else {
                    self.report(base.clone(), span, &T::word(base, error.message()));
                    return None;
                };
                // A key removed for a wrong value was reported then; say nothing twice.
                let written = removed.iter().find(|(k, _)| *k == field).map(|(_, v)| v);
                if written.is_none() {
                    self.report(base.clone(), span, &T::word(base, error.message()));
                }
                let stand_in = T::stand_in(&field, written.map(Spanned::get_ref))?;
                let stand_in = match stand_in {
                    StandIn::Meant(v) => v,
                    StandIn::Placeholder(v) => {
                        self.synthetic.push(base.key(field.as_str()));
                        v
                    }
                };
                if !insert(&mut value, &field, stand_in) {
                    return None;
                }
                continue;
            }
            // A key or element at fault: report it, take it out, try again.
            let path = base.join(&rel);
            self.report(path.clone(), span, &T::word(&path, error.message()));
            let gone = remove(&mut value, &rel.0)?;
            if let [Seg::Key(key)] = rel.0.as_slice() {
                removed.push((key.clone(), gone));
            }
        }
        None
    }

    fn report(&mut self, path: KeyPath, span: Option<Range<usize>>, message: &str) {
        self.diags.push(Diag {
            path,
            span,
            message: message.to_owned(),
        });
    }
}

/// Adds `key = stand_in` to the table `value`, with an empty span so that no error
/// position ever falls in it; false when `value` is not a table.
fn insert(value: &mut Spanned<DeValue<'_>>, key: &str, stand_in: DeValue<'static>) -> bool {
    let DeValue::Table(table) = value.get_mut() else {
        return false;
    };
    let key = Spanned::new(0..0, std::borrow::Cow::Owned(key.to_owned()));
    table.insert(key, Spanned::new(0..0, stand_in));
    true
}

/// The path, relative to `value`, of the deepest key or element whose key or value
/// covers `offset`. Every child is searched, not only those whose span covers `offset`:
/// the span of a table written as a `[handler.retry]` header does not cover its keys.
fn locate(value: &Spanned<DeValue<'_>>, offset: usize) -> KeyPath {
    let mut path = KeyPath::root();
    locate_below(value, offset, &mut path);
    path
}

/// Pushes onto `path` the steps from `value` down to `offset`; false when no key or
/// element below `value` covers it (and `path` is left as it was).
fn locate_below(value: &Spanned<DeValue<'_>>, offset: usize, path: &mut KeyPath) -> bool {
    match value.get_ref() {
        DeValue::Table(table) => table.iter().any(|(k, v)| {
            let seg = Seg::Key(k.get_ref().to_string());
            locate_at(seg, k.span().contains(&offset), v, offset, path)
        }),
        DeValue::Array(items) => items
            .iter()
            .enumerate()
            .any(|(i, v)| locate_at(Seg::Index(i), false, v, offset, path)),
        _ => false,
    }
}

/// Whether `offset` is in the child `seg` of a table or array (its key when `in_key`, its
/// value, or deeper); if so, pushes the steps there onto `path`.
fn locate_at(
    seg: Seg,
    in_key: bool,
    child: &Spanned<DeValue<'_>>,
    offset: usize,
    path: &mut KeyPath,
) -> bool {
    path.0.push(seg);
    if in_key || locate_below(child, offset, path) || child.span().contains(&offset) {
        return true;
    }
    path.0.pop();
    false
}

/// Removes the value at `path` and returns it; `None` when there was nothing there.
fn remove<'i>(value: &mut Spanned<DeValue<'i>>, path: &[Seg]) -> Option<Spanned<DeValue<'i>>> {
    let (last, parents) = path.split_last()?;
    let mut current = value;
    for seg in parents {
        let next = match (seg, current.get_mut()) {
            (Seg::Key(k), DeValue::Table(t)) => t.get_mut(k.as_str()),
            (Seg::Index(i), DeValue::Array(a)) => a.get_mut(*i),
            _ => None,
        };
        current = next?;
    }
    match (last, current.get_mut()) {
        (Seg::Key(k), DeValue::Table(t)) => t.remove(k.as_str()),
        (Seg::Index(i), DeValue::Array(a)) => {
            let mut kept = toml::de::DeArray::new();
            let mut found = None;
            for (j, item) in a.iter().enumerate() {
                if j == *i {
                    found = Some(item.clone());
                } else {
                    kept.push(item.clone());
                }
            }
            *a = kept;
            found
        }
        _ => None,
    }
}

/// `missing field `stage`` -> `stage`.
fn missing_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    Some(rest.split('`').next()?.to_owned())
}

/// Serde's messages about the value at `path`, in the words of this file's users.
fn tidy(path: &KeyPath, message: &str) -> String {
    let message = message.trim();
    // An integer that the key's type cannot hold (`-1`, `99999999999`): the key's range,
    // as the compile step says it of `0`.
    let integer = message.starts_with("invalid value: integer `")
        || message.starts_with("invalid type: integer `")
        || message == "integer number overflowed";
    if let (true, Some(Seg::Key(key))) = (integer, path.0.last())
        && let Some(range) = super::defaults::out_of_range(key)
    {
        return range;
    }
    if let Some(field) = missing_field(message) {
        return match field.as_str() {
            "stage" => "missing `stage`: say \"before\" (may modify, allow or forbid) or \
                        \"after\" (notified durably)"
                .to_owned(),
            _ => format!("missing `{field}`"),
        };
    }
    if message == "wanted string or table" {
        // toml's words for an enum given a number, boolean or array.
        return "invalid type: expected a string".to_owned();
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

    #[test]
    fn line_and_column_count_characters() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(line_col(text, 0), (1, 1));
        let at = text.find('"').unwrap();
        assert_eq!(line_col(text, at), (2, 6));
    }
}
