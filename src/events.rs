//! The billing's events: the catalogue of names, aliases, patterns, and the envelope.
//!
//! Everything here is pure: no I/O, no config. The config layer uses the catalogue to
//! check names at load; the ingress uses [`Envelope::parse`] on every request.

use std::borrow::Cow;
use std::fmt;

use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// Every event name the billing is documented to send.
pub const CATALOGUE: &[&str] = &[
    "clients.create",
    "clients.update",
    "clients.delete",
    "clients.archive",
    "clients.custom_fields.update",
    "clients.balance_zero",
    "clients.balance_notzero",
    "clients.accounts.create",
    "clients.accounts.update",
    "clients.accounts.delete",
    "clients.subscriptions.assign",
    "clients.subscriptions.activate",
    "clients.subscriptions.deactivate",
    "clients.subscriptions.renew",
    "clients.subscriptions.close",
    "email_rates_manager.import",
    "importd.process_success",
    "importd.process_failed",
];

/// The kind of entity each catalogue event is about. Custom fields belong to the
/// client: `clients.custom_fields.update` is about the client, as `clients.update` is.
const ENTITIES: &[(&str, &str)] = &[
    ("clients.create", "clients"),
    ("clients.update", "clients"),
    ("clients.delete", "clients"),
    ("clients.archive", "clients"),
    ("clients.custom_fields.update", "clients"),
    ("clients.balance_zero", "clients"),
    ("clients.balance_notzero", "clients"),
    ("clients.accounts.create", "clients.accounts"),
    ("clients.accounts.update", "clients.accounts"),
    ("clients.accounts.delete", "clients.accounts"),
    ("clients.subscriptions.assign", "clients.subscriptions"),
    ("clients.subscriptions.activate", "clients.subscriptions"),
    ("clients.subscriptions.deactivate", "clients.subscriptions"),
    ("clients.subscriptions.renew", "clients.subscriptions"),
    ("clients.subscriptions.close", "clients.subscriptions"),
    ("email_rates_manager.import", "email_rates_manager"),
    ("importd.process_success", "importd"),
    ("importd.process_failed", "importd"),
];

/// The kind of entity an event (its normalised name) is about: for a catalogue event,
/// what the catalogue says; for any other, the name without its last part
/// (`invoices.paid` is about `invoices`; a name without a dot is its own kind).
pub fn entity_kind(name: &str) -> &str {
    match ENTITIES.iter().find(|(event, _)| *event == name) {
        Some((_, kind)) => kind,
        None => name.rsplit_once('.').map_or(name, |(kind, _)| kind),
    }
}

/// Maps an alias the billing (or an operator) may use to its catalogue name. Names that
/// are not aliases come back unchanged and borrowed.
pub fn normalize(name: &str) -> Cow<'_, str> {
    if name == "clients.custom_fields_update" {
        return Cow::Borrowed("clients.custom_fields.update");
    }
    if let Some(rest) = name.strip_prefix("clients_packages.") {
        return Cow::Owned(format!("clients.subscriptions.{rest}"));
    }
    Cow::Borrowed(name)
}

/// The closest known name to `name`, for a "did you mean" hint.
pub fn suggest<'a>(name: &str, known: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    known
        .into_iter()
        .map(|k| (strsim::damerau_levenshtein(name, k), k))
        .filter(|(d, k)| *d <= 3.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Whether `name` is shaped like an event name: dot-separated words of lower-case letters,
/// digits and underscores.
pub fn is_well_formed(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
}

/// One entry of a handler's `events`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventPattern {
    /// `"*"`: every event, known or not.
    Any,
    /// `"clients.*"`: every event under that prefix, at any depth. Holds `"clients."`.
    Prefix(String),
    /// One event name, normalised.
    Exact(String),
}

impl EventPattern {
    /// Reads a pattern as written in the config. Aliases are normalised; whether the name
    /// is known is the config layer's business.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "*" {
            return Ok(Self::Any);
        }
        if let Some(prefix) = text.strip_suffix(".*") {
            if !is_well_formed(prefix) {
                return Err(format!("`{text}` is not a valid event pattern"));
            }
            return Ok(Self::Prefix(format!("{prefix}.")));
        }
        if !is_well_formed(text) {
            return Err(format!(
                "`{text}` is not a valid event name (dot-separated lower-case words, \
                 a prefix such as \"clients.*\", or \"*\")"
            ));
        }
        Ok(Self::Exact(normalize(text).into_owned()))
    }

    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Prefix(prefix) => name.starts_with(prefix.as_str()),
            Self::Exact(exact) => exact == name,
        }
    }
}

impl fmt::Display for EventPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Prefix(prefix) => write!(f, "{prefix}*"),
            Self::Exact(name) => f.write_str(name),
        }
    }
}

/// A process-unique id: `prefix_` and 24 hex digits from the process start time and a
/// counter, so ids also differ across restarts.
pub fn new_id(prefix: &str) -> String {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};
    static START: OnceLock<String> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let start = START.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        format!("{nanos:016x}")
    });
    let mut id = String::with_capacity(prefix.len() + 1 + start.len() + 8);
    id.push_str(prefix);
    id.push('_');
    id.push_str(start);
    push_hex(&mut id, NEXT.fetch_add(1, Ordering::Relaxed), 8);
    id
}

/// `n` in lower-case hex, at least `width` digits: what `{n:0width$x}` writes, without
/// the formatting machinery (two ids an event).
fn push_hex(out: &mut String, n: u64, width: u32) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let digits = (u64::BITS - n.leading_zeros())
        .div_ceil(4)
        .max(width)
        .max(1);
    for i in (0..digits).rev() {
        let nibble = (n >> (i * 4)) & 0xf;
        out.push(char::from(DIGITS[usize::try_from(nibble).unwrap_or(0)]));
    }
}

/// What is wrong with a request body that should have been an envelope.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("body is not valid JSON: {0}")]
    Json(String),
    #[error("body must be a JSON object with `event` and `data`, got {0}")]
    NotAnObject(&'static str),
    #[error("missing `event` object")]
    MissingEvent,
    #[error("`event` must be an object, got {0}")]
    EventNotAnObject(&'static str),
    #[error("missing `event.events_id`")]
    MissingEventsId,
    #[error("`event.events_id` must be a non-empty string, got {0}")]
    BadEventsId(&'static str),
    #[error("`event.object_id` must be a number, a string or null, got {0}")]
    BadObjectId(&'static str),
    /// A value a script could not be given in its environment (and no log line or
    /// header should carry): `field` is `event.events_id` or `event.object_id`.
    #[error("`{field}` must not hold control characters (found U+{code:04X} at character {at})")]
    ControlCharacter {
        field: &'static str,
        code: u32,
        at: usize,
    },
    #[error("`{field}` is {len} bytes long; at most {MAX_ID_LEN} are accepted")]
    TooLong { field: &'static str, len: usize },
    #[error("missing `data` object")]
    MissingData,
    #[error("`data` must be an object, got {0}")]
    DataNotAnObject(&'static str),
    #[error("body nests deeper than {0} levels")]
    TooDeep(usize),
    /// `event`, `data`, `event.events_id` or `event.object_id` twice: JSON parsers differ
    /// on which one counts, so a handler could read another than provisiond routed on.
    #[error(
        "`{0}` is given more than once; send it once (a handler could read another one than \
         provisiond went by)"
    )]
    Repeated(&'static str),
    #[error(
        "body is not valid JSON: \\u{code:04x} at line {line} column {column} is half of a \
         UTF-16 surrogate pair, not a character"
    )]
    LoneSurrogate {
        code: u16,
        line: usize,
        column: usize,
    },
}

/// A billing event: the envelope exactly as sent (`event` keeps any extra keys it has),
/// plus its normalised name.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// The normalised event name (`event.events_id` with aliases resolved).
    pub name: String,
    /// The `event` object as the billing sent it, parsed only when something reads it
    /// (a filter on `event`, [`Envelope::to_value`]).
    pub event: Object,
    /// The `data` object, as the chain has left it so far: the billing's bytes, parsed
    /// only when something reads it (a filter, a modifying handler's caller).
    pub data: Object,
    /// Other top-level keys of the body, kept and echoed back.
    pub extra: Map<String, Value>,
    /// `event.object_id` as text, read at parse.
    object_id: String,
}

/// Longest `event.events_id` and `event.object_id` accepted, in bytes.
pub const MAX_ID_LEN: usize = 256;

/// The envelope's `event` or `data` object. Kept as the billing's bytes (already checked
/// to be a JSON object) until first read as a map; most events are never read (no filter,
/// no handler modifying the data), and building the maps is most of parsing an envelope.
#[derive(Debug, Clone, Default)]
pub struct Object {
    raw: Option<Box<RawValue>>,
    map: std::sync::OnceLock<Map<String, Value>>,
}

impl Object {
    /// The object as a map, parsed now if it was not yet.
    pub fn map(&self) -> &Map<String, Value> {
        self.map.get_or_init(|| {
            self.raw
                .as_ref()
                // Checked at parse to be an object, nested no deeper than serde_json reads,
                // with no lone surrogate in its strings: this parse does not fail.
                .and_then(|raw| serde_json::from_str(raw.get()).ok())
                .unwrap_or_default()
        })
    }

    /// The object as a map of its own.
    pub fn into_map(mut self) -> Map<String, Value> {
        self.map();
        self.map.take().unwrap_or_default()
    }
}

impl Object {
    /// The billing's bytes of an object, checked to be one (it starts with `{` and
    /// parsed as JSON), nested no deeper than the limit.
    fn raw(raw: Box<RawValue>) -> Self {
        Self {
            raw: Some(raw),
            map: std::sync::OnceLock::new(),
        }
    }
}

impl From<Map<String, Value>> for Object {
    fn from(map: Map<String, Value>) -> Self {
        Self {
            raw: None,
            map: std::sync::OnceLock::from(map),
        }
    }
}

impl std::ops::Deref for Object {
    type Target = Map<String, Value>;

    fn deref(&self) -> &Self::Target {
        self.map()
    }
}

impl PartialEq for Object {
    fn eq(&self, other: &Self) -> bool {
        self.map() == other.map()
    }
}

impl serde::Serialize for Object {
    /// The billing's bytes when the object is theirs (read or not: a read never changes
    /// the map), else the map.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match &self.raw {
            Some(raw) => raw.serialize(serializer),
            None => self.map().serialize(serializer),
        }
    }
}

/// The top level of a body, `event` and `data` left as bytes. Another key keeps its last
/// value if repeated, as in a JSON map.
struct Top {
    event: Option<Box<RawValue>>,
    data: Option<Box<RawValue>>,
    extra: Map<String, Value>,
    /// The first of `event` and `data` found twice.
    repeated: Option<&'static str>,
}

/// A key of a JSON object, matched against the keys a parse reads without allocating
/// for them (serde_json hands unescaped keys over borrowed); another key is copied only
/// when the parse keeps it.
enum Key {
    Known(usize),
    Other(String),
    Skipped,
}

/// Reads one [`Key`]: its index in `known`, else the key itself if `keep`.
#[derive(Clone, Copy)]
struct KeySeed {
    known: &'static [&'static str],
    keep: bool,
}

impl serde::de::Visitor<'_> for KeySeed {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Key, E> {
        Ok(match self.known.iter().position(|k| *k == key) {
            Some(i) => Key::Known(i),
            None if self.keep => Key::Other(key.to_owned()),
            None => Key::Skipped,
        })
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for KeySeed {
    type Value = Key;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Key, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Top {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Top;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an envelope")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Top, A::Error> {
                let mut top = Top {
                    event: None,
                    data: None,
                    extra: Map::new(),
                    repeated: None,
                };
                let keys = KeySeed {
                    known: &["event", "data"],
                    keep: true,
                };
                while let Some(key) = map.next_key_seed(keys)? {
                    match key {
                        Key::Known(0) => {
                            if top.event.replace(map.next_value()?).is_some() {
                                top.repeated.get_or_insert("event");
                            }
                        }
                        Key::Known(_) => {
                            if top.data.replace(map.next_value()?).is_some() {
                                top.repeated.get_or_insert("data");
                            }
                        }
                        Key::Other(key) => {
                            let value = map.next_value()?;
                            top.extra.insert(key, value);
                        }
                        Key::Skipped => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(top)
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

/// What the parse reads of `event`: `events_id` and `object_id`; the other keys are
/// skipped unread.
struct Ids {
    events_id: Option<Value>,
    object_id: Option<Value>,
    /// The first of the two found twice.
    repeated: Option<&'static str>,
}

impl<'de> serde::Deserialize<'de> for Ids {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Ids;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Ids, A::Error> {
                let mut ids = Ids {
                    events_id: None,
                    object_id: None,
                    repeated: None,
                };
                let keys = KeySeed {
                    known: &["events_id", "object_id"],
                    keep: false,
                };
                while let Some(key) = map.next_key_seed(keys)? {
                    match key {
                        Key::Known(0) => {
                            if ids.events_id.replace(map.next_value()?).is_some() {
                                ids.repeated.get_or_insert("event.events_id");
                            }
                        }
                        Key::Known(_) => {
                            if ids.object_id.replace(map.next_value()?).is_some() {
                                ids.repeated.get_or_insert("event.object_id");
                            }
                        }
                        Key::Other(_) | Key::Skipped => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(ids)
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

/// JSON nesting deeper than this is refused before parsing.
pub const DEFAULT_MAX_DEPTH: usize = 64;

impl Envelope {
    /// Parses a request body. Aliases in `event.events_id` are normalised in `name` only;
    /// `event` keeps what the billing sent.
    pub fn parse(body: &[u8], max_depth: usize) -> Result<Self, EnvelopeError> {
        check_body(body, max_depth)?;
        // The common case: an object whose `event` and `data` are objects, which stay
        // bytes; only `event`'s two ids are read from them.
        if let Ok(Top {
            event: Some(event),
            data: Some(data),
            extra,
            repeated,
        }) = serde_json::from_slice::<Top>(body)
            && event.get().starts_with('{')
            && data.get().starts_with('{')
            && let Ok(ids) = serde_json::from_str::<Ids>(event.get())
        {
            if let Some(field) = repeated.or(ids.repeated) {
                return Err(EnvelopeError::Repeated(field));
            }
            let (name, object_id) = check_event(ids.events_id.as_ref(), ids.object_id.as_ref())?;
            return Ok(Self {
                name,
                event: Object::raw(event),
                data: Object::raw(data),
                extra,
                object_id,
            });
        }
        // Anything else is parsed whole, for the errors it has always had.
        let value: Value =
            serde_json::from_slice(body).map_err(|e| EnvelopeError::Json(e.to_string()))?;
        Self::from_value(value)
    }

    /// Builds an envelope from an already parsed JSON value.
    pub fn from_value(value: Value) -> Result<Self, EnvelopeError> {
        let Value::Object(mut body) = value else {
            return Err(EnvelopeError::NotAnObject(type_name(&value)));
        };
        let event = match body.remove("event") {
            None => return Err(EnvelopeError::MissingEvent),
            Some(Value::Object(event)) => event,
            Some(other) => return Err(EnvelopeError::EventNotAnObject(type_name(&other))),
        };
        let (name, object_id) = check_event(event.get("events_id"), event.get("object_id"))?;
        let data = match body.remove("data") {
            None => return Err(EnvelopeError::MissingData),
            Some(Value::Object(data)) => Object::from(data),
            Some(other) => return Err(EnvelopeError::DataNotAnObject(type_name(&other))),
        };
        Ok(Self {
            name,
            event: Object::from(event),
            data,
            extra: body,
            object_id,
        })
    }

    /// `event.object_id` as text (`""` when absent or null).
    pub fn object_id(&self) -> String {
        self.object_id.clone()
    }

    /// The entity this event is about, then the object id: see [`entity_kind`]
    /// (`clients/12`, `clients.accounts/7`).
    pub fn entity(&self) -> String {
        format!("{}/{}", entity_kind(&self.name), self.object_id)
    }

    /// The envelope as JSON: `event`, then `data`, then any other keys the billing sent.
    pub fn to_value(&self) -> Value {
        let mut body = Map::with_capacity(2 + self.extra.len());
        body.insert("event".into(), Value::Object(self.event.map().clone()));
        body.insert("data".into(), Value::Object(self.data.map().clone()));
        for (k, v) in &self.extra {
            body.insert(k.clone(), v.clone());
        }
        Value::Object(body)
    }

    /// The envelope serialised as JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct Ref<'a> {
            event: &'a Object,
            data: &'a Object,
            #[serde(flatten)]
            extra: &'a Map<String, Value>,
        }
        serde_json::to_vec(&Ref {
            event: &self.event,
            data: &self.data,
            extra: &self.extra,
        })
        .expect("a JSON map always serialises")
    }
}

/// The `event` object's two ids, checked: its normalised name, and the object id as
/// text (`""` when absent or null; a number's own digits, as the billing sent them).
fn check_event(
    events_id: Option<&Value>,
    object_id: Option<&Value>,
) -> Result<(String, String), EnvelopeError> {
    let name = match events_id {
        None | Some(Value::Null) => return Err(EnvelopeError::MissingEventsId),
        Some(Value::String(s)) if !s.is_empty() => {
            check_id("event.events_id", s)?;
            normalize(s).into_owned()
        }
        Some(Value::String(_)) => return Err(EnvelopeError::BadEventsId("an empty string")),
        Some(other) => return Err(EnvelopeError::BadEventsId(type_name(other))),
    };
    let object_id = match object_id {
        None | Some(Value::Null) => String::new(),
        Some(Value::Number(n)) => n.as_str().to_owned(),
        Some(Value::String(s)) => {
            check_id("event.object_id", s)?;
            s.clone()
        }
        Some(other) => return Err(EnvelopeError::BadObjectId(type_name(other))),
    };
    Ok((name, object_id))
}

/// Refuses an event name or object id that could not reach a script whole: a script
/// gets both in its environment, which cannot hold a NUL, and a value longer than the
/// kernel's limit for one variable makes the script fail to start. Control characters
/// (newlines included) and over-long values are refused for every handler alike, so
/// that the answer never depends on which handlers would run.
fn check_id(field: &'static str, value: &str) -> Result<(), EnvelopeError> {
    if value.len() > MAX_ID_LEN {
        return Err(EnvelopeError::TooLong {
            field,
            len: value.len(),
        });
    }
    match value.chars().enumerate().find(|(_, c)| c.is_control()) {
        Some((at, c)) => Err(EnvelopeError::ControlCharacter {
            field,
            code: u32::from(c),
            at: at + 1,
        }),
        None => Ok(()),
    }
}

/// Refuses, without building it, JSON nested deeper than `max` (brackets inside strings
/// do not count) and a string holding a lone UTF-16 surrogate (`"\ud800"`): valid JSON
/// syntax, but not a character, so no map of the body can hold it. Kept as bytes, such
/// an object would read as empty to a filter, and to the caller of a modifying handler.
fn check_body(body: &[u8], max: usize) -> Result<(), EnvelopeError> {
    // Most bodies settle in two vectorised scans: with no backslash there is no escape,
    // and with no more opening brackets than `max` (in strings or not) no nesting can
    // be deeper. Only the others are walked byte by byte.
    if memchr::memchr(b'\\', body).is_none()
        && memchr::memchr2_iter(b'{', b'[', body).nth(max).is_none()
    {
        return Ok(());
    }
    let mut depth = 0usize;
    let mut in_string = false;
    let mut at = 0;
    while let Some(&b) = body.get(at) {
        at += 1;
        if in_string {
            match b {
                b'"' => in_string = false,
                b'\\' if body.get(at) == Some(&b'u') => at = unicode_escape(body, at - 1)?,
                b'\\' => at += 1,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return Err(EnvelopeError::TooDeep(max));
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Checks the `\uXXXX` escape at `at` (and the low half after a high surrogate); returns
/// where the string goes on. A malformed escape is left to the JSON parser to name.
fn unicode_escape(body: &[u8], at: usize) -> Result<usize, EnvelopeError> {
    let hex = |from: usize| {
        let digits = std::str::from_utf8(body.get(from..from + 4)?).ok()?;
        u16::from_str_radix(digits, 16).ok()
    };
    let Some(code) = hex(at + 2) else {
        return Ok(at + 2);
    };
    let low = |next: usize| {
        body.get(next..next + 2) == Some(b"\\u")
            && hex(next + 2).is_some_and(|c| (0xDC00..=0xDFFF).contains(&c))
    };
    match code {
        0xD800..=0xDBFF if low(at + 6) => Ok(at + 12),
        0xD800..=0xDFFF => {
            let before = &body[..at];
            let line = 1 + before.iter().filter(|&&b| b == b'\n').count();
            let column = 1 + before.iter().rev().take_while(|&&b| b != b'\n').count();
            Err(EnvelopeError::LoneSurrogate { code, line, column })
        }
        _ => Ok(at + 6),
    }
}

/// The JSON type of a value, for error messages.
pub fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_the_prefix_and_24_hex_digits_and_never_repeat() {
        let ids: Vec<String> = (0..1000).map(|_| new_id("evt")).collect();
        for id in &ids {
            let hex = id.strip_prefix("evt_").unwrap();
            assert_eq!(hex.len(), 24, "{id}");
            assert!(
                hex.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
                "{id}"
            );
            // The first 16 digits are the process's start, the same in every id.
            assert_eq!(hex[..16], ids[0]["evt_".len().."evt_".len() + 16], "{id}");
        }
        let unique: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
    }

    #[test]
    fn hex_digits_are_what_format_writes() {
        for n in [
            0,
            1,
            0xf,
            0x10,
            0xdead_beef,
            0xffff_ffff,
            0x1_0000_0000,
            u64::MAX,
        ] {
            for width in [0, 8, 16] {
                let mut out = String::new();
                push_hex(&mut out, n, width);
                assert_eq!(out, format!("{n:0w$x}", w = width as usize), "{n} {width}");
            }
        }
    }

    #[test]
    fn aliases_normalise() {
        assert_eq!(
            normalize("clients.custom_fields_update"),
            "clients.custom_fields.update"
        );
        assert_eq!(
            normalize("clients_packages.activate"),
            "clients.subscriptions.activate"
        );
        assert_eq!(normalize("clients.create"), "clients.create");
    }

    #[test]
    fn patterns_match() {
        let any = EventPattern::parse("*").unwrap();
        let clients = EventPattern::parse("clients.*").unwrap();
        let exact = EventPattern::parse("clients_packages.renew").unwrap();
        assert!(any.matches("whatever.new"));
        assert!(clients.matches("clients.accounts.create"));
        assert!(!clients.matches("clientsx.create"));
        assert!(exact.matches("clients.subscriptions.renew"));
        assert!(EventPattern::parse("Clients.Create").is_err());
        assert!(EventPattern::parse("clients..x").is_err());
    }

    #[test]
    fn suggests_close_names() {
        assert_eq!(
            suggest("clients.crate", CATALOGUE.iter().copied()),
            Some("clients.create")
        );
        assert_eq!(suggest("zzzzzzzz", CATALOGUE.iter().copied()), None);
    }

    #[test]
    fn envelope_errors_name_the_problem() {
        let parse = |s: &str| Envelope::parse(s.as_bytes(), DEFAULT_MAX_DEPTH);
        assert!(matches!(parse("nope"), Err(EnvelopeError::Json(_))));
        assert_eq!(parse("[]"), Err(EnvelopeError::NotAnObject("an array")));
        assert_eq!(parse(r#"{"data":{}}"#), Err(EnvelopeError::MissingEvent));
        assert_eq!(
            parse(r#"{"event":{},"data":{}}"#),
            Err(EnvelopeError::MissingEventsId)
        );
        assert_eq!(
            parse(r#"{"event":{"events_id":"clients.create"},"data":[]}"#),
            Err(EnvelopeError::DataNotAnObject("an array"))
        );
        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert_eq!(parse(&deep), Err(EnvelopeError::TooDeep(DEFAULT_MAX_DEPTH)));
        let in_string = r#"{"event":{"events_id":"a.b"},"data":{"x":"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}}"#;
        assert!(parse(in_string).is_ok());
    }

    #[test]
    fn the_depth_limit_holds_with_and_without_escapes_in_the_body() {
        // `max` brackets deep passes and one more is refused, whether or not the body
        // has a backslash (which sends the check the long way) or spare brackets in a
        // string (which do too, and do not count).
        let max = 5;
        for extra in ["", r#","s":"a\\b""#, r#","s":"[[[[[[""#] {
            let body = |depth: usize| {
                let inner = format!("{}{}", "[".repeat(depth - 2), "]".repeat(depth - 2));
                format!(r#"{{"event":{{"events_id":"a.b"}},"data":{{"x":{inner}{extra}}}}}"#)
            };
            for depth in [max - 1, max] {
                assert!(
                    Envelope::parse(body(depth).as_bytes(), max).is_ok(),
                    "{depth} {extra}"
                );
            }
            assert_eq!(
                Envelope::parse(body(max + 1).as_bytes(), max),
                Err(EnvelopeError::TooDeep(max)),
                "{extra}"
            );
        }
    }

    #[test]
    fn a_lone_surrogate_is_refused_where_it_stands_and_pairs_pass() {
        let parse = |data: &str| {
            let body = format!("{{\"event\":{{\"events_id\":\"a.b\"}},\n\"data\":{data}}}");
            Envelope::parse(body.as_bytes(), DEFAULT_MAX_DEPTH)
        };
        for (data, code, column) in [
            (r#"{"x":"\ud800"}"#, 0xd800, 14),
            (r#"{"x":"ok \uDC00"}"#, 0xdc00, 17),
            (r#"{"x":"\ud83d\u0041"}"#, 0xd83d, 14),
            (r#"{"\udbff":1}"#, 0xdbff, 10),
            (r#"{"x":["\\", "\ud800\\ude00"]}"#, 0xd800, 21),
        ] {
            assert_eq!(
                parse(data),
                Err(EnvelopeError::LoneSurrogate {
                    code,
                    line: 2,
                    column
                }),
                "{data}"
            );
        }
        let e = parse(r#"{"x":"\ud800"}"#).unwrap_err().to_string();
        assert_eq!(
            e,
            "body is not valid JSON: \\ud800 at line 2 column 14 is half of a UTF-16 \
             surrogate pair, not a character"
        );
        // A pair is one character; an escaped backslash before `u` is no escape.
        for data in [
            r#"{"x":"\ud83d\ude00"}"#,
            r#"{"x":"\\ud800"}"#,
            r#"{"x":"\u00e9\"\ud800\udc00"}"#,
        ] {
            let envelope = parse(data).unwrap();
            assert!(envelope.data.map().contains_key("x"), "{data}");
        }
    }

    #[test]
    fn the_deepest_body_accepted_is_read_whole() {
        // Kept as bytes, `data` must still read as what it is when a filter reads it
        // (`server.max_depth` is at most serde_json's own limit).
        let max = crate::config::defaults::MAX_DEPTH_LIMIT as usize;
        let nested = format!("{}1{}", "[".repeat(max - 2), "]".repeat(max - 2));
        let body = format!(r#"{{"event":{{"events_id":"a.b"}},"data":{{"x":{nested}}}}}"#);
        let envelope = Envelope::parse(body.as_bytes(), max).unwrap();
        assert!(envelope.data.map().contains_key("x"));
    }

    #[test]
    fn catalogue_events_take_their_entity_from_the_catalogue() {
        let entity = |name: &str, id: &str| {
            let body =
                format!(r#"{{"event":{{"events_id":"{name}","object_id":"{id}"}},"data":{{}}}}"#);
            Envelope::parse(body.as_bytes(), DEFAULT_MAX_DEPTH)
                .unwrap()
                .entity()
        };
        // Everything about the client itself is the client, custom fields included.
        for name in [
            "clients.create",
            "clients.update",
            "clients.delete",
            "clients.archive",
            "clients.custom_fields.update",
            "clients.custom_fields_update",
            "clients.balance_zero",
            "clients.balance_notzero",
        ] {
            assert_eq!(entity(name, "12"), "clients/12", "{name}");
        }
        for name in [
            "clients.accounts.create",
            "clients.accounts.update",
            "clients.accounts.delete",
        ] {
            assert_eq!(entity(name, "7"), "clients.accounts/7", "{name}");
        }
        for action in ["assign", "activate", "deactivate", "renew", "close"] {
            assert_eq!(
                entity(&format!("clients.subscriptions.{action}"), "3"),
                "clients.subscriptions/3"
            );
            assert_eq!(
                entity(&format!("clients_packages.{action}"), "3"),
                "clients.subscriptions/3"
            );
        }
        assert_eq!(entity("importd.process_failed", "5"), "importd/5");
        assert_eq!(
            entity("email_rates_manager.import", "5"),
            "email_rates_manager/5"
        );
        // Outside the catalogue: the name without its last part, then the object id.
        assert_eq!(
            entity("clients.custom_fields.delete", "12"),
            "clients.custom_fields/12"
        );
        assert_eq!(entity("invoices.paid", "9"), "invoices/9");
        assert_eq!(entity("ping", "1"), "ping/1");
    }

    #[test]
    fn every_catalogue_event_has_its_entity_listed() {
        let listed: Vec<&str> = ENTITIES.iter().map(|(event, _)| *event).collect();
        assert_eq!(listed, CATALOGUE);
    }

    #[test]
    fn ids_a_script_could_not_be_given_are_refused_naming_the_field() {
        let parse = |id: Value, name: &str| {
            let body =
                serde_json::json!({"event": {"events_id": name, "object_id": id}, "data": {}});
            Envelope::parse(body.to_string().as_bytes(), DEFAULT_MAX_DEPTH)
        };
        for (id, name, field) in [
            (Value::from("12\u{0}"), "clients.update", "event.object_id"),
            (Value::from("1\n2"), "clients.update", "event.object_id"),
            (
                Value::from("x".repeat(200_000)),
                "clients.update",
                "event.object_id",
            ),
            (Value::from(12), "clients.update\u{0}", "event.events_id"),
            (Value::from(12), "clients.\u{7f}update", "event.events_id"),
            (Value::from(12), &"a".repeat(200_000), "event.events_id"),
        ] {
            let error = parse(id, name).expect_err("refused").to_string();
            assert!(error.contains(&format!("`{field}`")), "{error}");
        }
        // At the limit, and any printable text, are fine.
        let longest = "9".repeat(MAX_ID_LEN);
        assert_eq!(
            parse(Value::from(longest.as_str()), "clients.update")
                .unwrap()
                .object_id(),
            longest
        );
        assert!(parse(Value::from("x".repeat(MAX_ID_LEN + 1)), "clients.update").is_err());
        assert!(parse(Value::from("Zürich-12 / ünïcode"), "clients.update").is_ok());
        assert!(parse(Value::from(12), &"a".repeat(MAX_ID_LEN)).is_ok());
    }

    #[test]
    fn data_kept_as_bytes_reads_as_a_whole_parse_would() {
        for body in [
            r#"{"event":{"events_id":"clients.update","object_id":12},"data":{"b":1,"a":[1.50,{"x":null}],"n":123456789012345678901234567890}}"#,
            r#"{ "data" : { } , "event" : {"events_id":"a.b"}, "x": 1, "y": [2] }"#,
            r#"{"event":{"events_id":"a.b"},"data":{"a":1,"a":2}}"#,
        ] {
            let lazy = Envelope::parse(body.as_bytes(), DEFAULT_MAX_DEPTH).unwrap();
            assert!(lazy.data.map.get().is_none(), "data parsed at once: {body}");
            assert!(
                lazy.event.map.get().is_none(),
                "event parsed at once: {body}"
            );
            let whole = Envelope::from_value(serde_json::from_str::<Value>(body).unwrap()).unwrap();
            assert_eq!(lazy.name, whole.name);
            assert_eq!(lazy.event, whole.event);
            assert_eq!(lazy.data.map(), whole.data.map(), "{body}");
            let keys = |e: &Envelope| e.extra.keys().cloned().collect::<Vec<_>>();
            let mut sorted = keys(&whole);
            sorted.sort();
            assert_eq!(keys(&lazy), sorted, "extra keys in the order sent");
        }
        // The billing's objects are written as they came, read (by a filter) or not;
        // data a handler replaced, as its map.
        let body = r#"{"event":{ "events_id" : "a.b" },"data":{ "z" : 1.0 }}"#;
        let mut env = Envelope::parse(body.as_bytes(), DEFAULT_MAX_DEPTH).unwrap();
        assert_eq!(String::from_utf8(env.to_json()).unwrap(), body);
        let _ = (env.event.map(), env.data.map());
        assert_eq!(String::from_utf8(env.to_json()).unwrap(), body);
        env.data = Object::from(env.data.map().clone());
        assert_eq!(
            String::from_utf8(env.to_json()).unwrap(),
            r#"{"event":{ "events_id" : "a.b" },"data":{"z":1.0}}"#
        );
    }

    #[test]
    fn event_kept_as_bytes_gives_the_ids_a_whole_parse_would() {
        for (body, name, object_id) in [
            // Other keys may repeat: they are the handlers' business.
            (
                r#"{"event":{"dt":1,"events_id":"clients.update","dt":2},"data":{"a":1,"a":2}}"#,
                "clients.update",
                "",
            ),
            // An escaped key is the key it spells.
            (
                r#"{"event":{"events\u005fid":"clients.create","object\u005fid":"7"},"data":{}}"#,
                "clients.create",
                "7",
            ),
            // A number keeps the digits the billing sent.
            (
                r#"{"event":{"object_id":123456789012345678901234567890,"events_id":"a.b","more":{"x":[1,2]}},"data":{"a":1}}"#,
                "a.b",
                "123456789012345678901234567890",
            ),
            (
                r#"{"event":{"events_id":"a.b","object_id":null},"data":{}}"#,
                "a.b",
                "",
            ),
            (r#"{"event":{"events_id":"a.b"},"data":{}}"#, "a.b", ""),
        ] {
            let lazy = Envelope::parse(body.as_bytes(), DEFAULT_MAX_DEPTH).unwrap();
            assert!(
                lazy.event.map.get().is_none(),
                "event parsed at once: {body}"
            );
            let whole = Envelope::from_value(serde_json::from_str::<Value>(body).unwrap()).unwrap();
            assert_eq!(
                (lazy.name.as_str(), lazy.object_id.as_str()),
                (name, object_id)
            );
            assert_eq!(
                (&whole.name, &whole.object_id),
                (&lazy.name, &lazy.object_id)
            );
            assert_eq!(lazy.event.map(), whole.event.map(), "{body}");
        }
        // The errors of a whole parse, whichever way the event came.
        for (body, error) in [
            (
                r#"{"event":{"object_id":1},"data":{}}"#,
                "missing `event.events_id`",
            ),
            (
                r#"{"event":{"events_id":"a.b","object_id":[1]},"data":{}}"#,
                "`event.object_id` must be a number, a string or null, got an array",
            ),
            (
                r#"{"event":{"events_id":7},"data":{}}"#,
                "`event.events_id` must be a non-empty string, got a number",
            ),
            (
                r#"{"event":{"events_id":""},"data":{}}"#,
                "`event.events_id` must be a non-empty string, got an empty string",
            ),
            (
                r#"{"event":[],"data":{}}"#,
                "`event` must be an object, got an array",
            ),
            (
                r#"{"event":{"events_id":"x.y","object_id":1,"events_id":"clients.update"},"data":{}}"#,
                "`event.events_id` is given more than once; send it once (a handler could \
                 read another one than provisiond went by)",
            ),
            (
                r#"{"event":{"object\u005fid":1,"events_id":"a.b","object_id":2},"data":{}}"#,
                "`event.object_id` is given more than once; send it once (a handler could \
                 read another one than provisiond went by)",
            ),
            (
                r#"{"event":{"events_id":"a.b"},"data":{},"event":{"events_id":"c.d"}}"#,
                "`event` is given more than once; send it once (a handler could read \
                 another one than provisiond went by)",
            ),
            (
                r#"{"data":{"x":1},"event":{"events_id":"a.b"},"data":{}}"#,
                "`data` is given more than once; send it once (a handler could read \
                 another one than provisiond went by)",
            ),
        ] {
            let e = Envelope::parse(body.as_bytes(), DEFAULT_MAX_DEPTH).unwrap_err();
            assert_eq!(e.to_string(), error, "{body}");
        }
    }

    #[test]
    fn envelope_keeps_what_was_sent() {
        let body = r#"{"event":{"dt":"2026-11-26T10:00:00+00:00","events_id":"clients_packages.close","object_id":12,"x":1},"data":{"b":1,"a":2}}"#;
        let env = Envelope::parse(body.as_bytes(), DEFAULT_MAX_DEPTH).unwrap();
        assert_eq!(env.name, "clients.subscriptions.close");
        assert_eq!(env.entity(), "clients.subscriptions/12");
        assert_eq!(String::from_utf8(env.to_json()).unwrap(), body);
    }
}
