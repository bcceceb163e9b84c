//! `provisiond test`: config test cases for CI. Each `[[case]]` gives an envelope and
//! the before- and after-stage handlers expected to run for it, in order; [`explain`]
//! says which would.
//!
//! ```toml
//! [[case]]
//! name = "a client without a name is refused first"
//! event = "clients.create"           # with `data` (default {}) and `object_id` (default 1),
//! data = { name = "" }               # or a whole `envelope = { event = {...}, data = {...} }`
//! before = ["require-client-name", "normalize-name"]
//! after = []
//! ```
//!
//! `before` and `after` are required (`[]` for none): an omitted list would leave a
//! stage unchecked without anyone noticing. An event name outside the catalogue and
//! `[events] extra` fails the case as a likely typo, with a "did you mean" hint, unless
//! the case says `unknown_event = true`. A handler whose filter fails on the case's data
//! (skipped under `on_error = "allow"`, no delivery in the after stage) does not fail
//! the case, but is said under it: a case can pass only because a filter errored. A
//! mistake in the file itself is an error, not a failed case: every one is reported,
//! one line each, as `file:line:column: message` (two cases of one name are one).

use std::fmt::{self, Write as _};
use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value, json};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::config::{Config, Recover, StandIn, line_col};
use crate::events::Envelope;
use crate::explain::{self, Explanation};

/// One `[[case]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    /// What the case is about, printed with its result.
    name: String,
    /// The event name; or give `envelope`.
    event: Option<String>,
    /// The event's `object_id` (1 by default).
    object_id: Option<Value>,
    /// The event's data ({} by default).
    data: Option<Map<String, Value>>,
    /// A whole envelope, as the billing sends it.
    envelope: Option<Value>,
    /// The before-stage handlers expected to be called, in order.
    before: Vec<String>,
    /// The after-stage handlers expected to get a delivery, in order.
    after: Vec<String>,
    /// The event is outside the catalogue and `[events] extra` on purpose (to test what
    /// the wildcard handlers do with it). Without it, such a name fails the case as a
    /// likely typo.
    #[serde(default)]
    unknown_event: bool,
}

/// The keys a case takes, and what to say when a required one is missing.
const KEYS: &[&str] = &[
    "name",
    "event",
    "object_id",
    "data",
    "envelope",
    "before",
    "after",
    "unknown_event",
];
const REQUIRED: &[(&str, &str)] = &[
    ("name", "what the case is about, printed with its result"),
    (
        "before",
        "list the before-stage handlers expected, in order, [] for none",
    ),
    (
        "after",
        "list the after-stage handlers expected, in order, [] for none",
    ),
];

/// What is wrong with a cases file: every problem found, one line each, as
/// `file:line:column: message`, in file order. Shown as `check` shows config errors:
/// the lines, then `file: N errors`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CasesError {
    pub file: String,
    pub problems: Vec<String>,
}

impl CasesError {
    fn one(file: &str, message: impl fmt::Display) -> Self {
        Self {
            file: file.to_owned(),
            problems: vec![format!("{file}: {message}")],
        }
    }
}

impl fmt::Display for CasesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.problems {
            writeln!(f, "{p}")?;
        }
        let n = self.problems.len();
        write!(
            f,
            "{}: {n} error{}",
            self.file,
            if n == 1 { "" } else { "s" }
        )
    }
}

impl std::error::Error for CasesError {}

/// How one case went.
#[derive(Debug)]
pub(crate) struct CaseResult {
    pub name: String,
    /// Empty when the case passed; else what differs, one line each.
    pub problems: Vec<String>,
    /// What the report says under the case whatever its result: the handlers whose
    /// filter failed on its data.
    pub notes: Vec<String>,
}

impl CaseResult {
    pub(crate) fn passed(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Reads the cases file and runs every case against `config`. An error means the file
/// itself is wrong (not TOML, unknown or missing keys, a case without an event); it
/// lists every such problem.
pub(crate) fn run(config: &Config, path: &Path) -> Result<Vec<CaseResult>, CasesError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| CasesError::one(&file, format_args!("cannot read the file: {e}")))?;
    let cases = parse(&text, &file)?;
    Ok(cases
        .into_iter()
        .map(|(case, envelope)| run_case(config, case, &envelope))
        .collect())
}

fn run_case(config: &Config, case: Case, envelope: &Envelope) -> CaseResult {
    let explanation = explain::explain(config, envelope);
    let mut problems = Vec::new();
    match (explanation.known, case.unknown_event) {
        (false, false) => problems.push(format!(
            "unknown event {:?}{}: neither in the catalogue nor in [events] extra; fix the \
             name, or set unknown_event = true to test an event outside them",
            explanation.event,
            explanation.hint(),
        )),
        (true, true) => problems.push(format!(
            "unknown_event = true, but {:?} is a known event",
            explanation.event
        )),
        _ => {}
    }
    for name in case.before.iter().chain(&case.after) {
        if config.handler(name).is_none() {
            problems.push(format!("no handler is named {name:?} in {}", config.file));
        }
    }
    compare(
        "before",
        &case.before,
        &explanation.before_names(),
        &explanation,
        &mut problems,
    );
    compare(
        "after",
        &case.after,
        &explanation.after_names(),
        &explanation,
        &mut problems,
    );
    let notes = explanation
        .not_run
        .iter()
        .filter_map(|(handler, reason)| match reason {
            explain::Reason::FilterError(e) => Some(format!(
                "note: {}'s filter failed on this data: {e}",
                handler.name
            )),
            _ => None,
        })
        .collect();
    CaseResult {
        name: case.name,
        problems,
        notes,
    }
}

/// The cases in `text`, each with its envelope; or every problem in the file.
fn parse(text: &str, file: &str) -> Result<Vec<(Case, Envelope)>, CasesError> {
    // Problems with the byte offset they are at.
    let mut problems: Vec<(usize, String)> = Vec::new();
    let (root, syntax) = DeTable::parse_recoverable(text);
    for e in &syntax {
        let at = e.span().map_or(0, |s| s.start);
        problems.push((at, format!("invalid TOML: {}", one_line(e.message()))));
    }
    let mut cases: Vec<(Case, Envelope)> = Vec::new();
    // Each case's name, with where it was first given.
    let mut named: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    if syntax.is_empty() {
        for (key, value) in root.get_ref().iter() {
            let name: &str = key.get_ref().as_ref();
            if name != "case" {
                let hint = crate::events::suggest(name, ["case"])
                    .map(|s| format!(" (did you mean `{s}`?)"))
                    .unwrap_or_default();
                problems.push((
                    key.span().start,
                    format!("unknown key `{name}`{hint}; a cases file holds [[case]] tables"),
                ));
                continue;
            }
            let Some(items) = value.get_ref().as_array() else {
                problems.push((
                    value.span().start,
                    "`case` must be an array of tables: write each case as [[case]]".into(),
                ));
                continue;
            };
            for (i, item) in items.iter().enumerate() {
                match parse_case(i, item) {
                    Ok(case) => {
                        let at = item.span().start;
                        if let Some(&first) = named.get(&case.0.name) {
                            let (line, _) = line_col(text, first);
                            problems.push((
                                at,
                                format!(
                                    "case {:?}: the name of an earlier case (line {line}); \
                                     give each case its own, the report tells them apart by it",
                                    case.0.name
                                ),
                            ));
                        } else {
                            named.insert(case.0.name.clone(), at);
                        }
                        cases.push(case);
                    }
                    Err(found) => problems.extend(found),
                }
            }
        }
    }
    if problems.is_empty() && cases.is_empty() {
        return Err(CasesError::one(file, "no [[case]] in the file"));
    }
    if problems.is_empty() {
        return Ok(cases);
    }
    problems.sort_by_key(|(at, _)| *at);
    Err(CasesError {
        file: file.to_owned(),
        problems: problems
            .into_iter()
            .map(|(at, message)| {
                let (line, column) = line_col(text, at);
                format!("{file}:{line}:{column}: {message}")
            })
            .collect(),
    })
}

/// One `[[case]]` table, checked key by key so that all its problems are reported.
fn parse_case(
    i: usize,
    item: &Spanned<DeValue<'_>>,
) -> Result<(Case, Envelope), Vec<(usize, String)>> {
    let at = item.span().start;
    let Some(table) = item.get_ref().as_table() else {
        return Err(vec![(at, format!("case #{}: must be a table", i + 1))]);
    };
    let label = match table.get("name").and_then(|v| v.get_ref().as_str()) {
        Some(name) => format!("case {name:?}"),
        None => format!("case #{}", i + 1),
    };
    let (case, diags, _) = crate::config::recover::<Case>(item);
    let problems: Vec<(usize, String)> = diags
        .into_iter()
        .map(|d| {
            let at = d.span.map_or(at, |s| s.start);
            (at, format!("{label}: {}", d.message))
        })
        .collect();
    let case = match case {
        Some(case) if problems.is_empty() => case,
        _ => return Err(problems),
    };
    let envelope = envelope(&case).map_err(|e| vec![(at, format!("{label}: {e}"))])?;
    Ok((case, envelope))
}

impl Recover for Case {
    /// Empty stand-ins for the required keys, so that the case's other keys are checked.
    fn stand_in(field: &str, _written: Option<&DeValue<'_>>) -> Option<StandIn> {
        match field {
            "name" => Some(StandIn::Placeholder(DeValue::String("".into()))),
            "before" | "after" => Some(StandIn::Placeholder(DeValue::Array(Default::default()))),
            _ => None,
        }
    }

    fn word(_path: &crate::config::KeyPath, message: &str) -> String {
        if let Some(rest) = message.strip_prefix("unknown field `") {
            let key = rest.split('`').next().unwrap_or_default();
            let hint = crate::events::suggest(key, KEYS.iter().copied())
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            return format!(
                "unknown key `{key}`{hint}; a case takes {}",
                KEYS.join(", ")
            );
        }
        if let Some(rest) = message.strip_prefix("missing field `") {
            let key = rest.split('`').next().unwrap_or_default();
            let what = REQUIRED.iter().find(|(k, _)| *k == key).map(|(_, w)| *w);
            return match what {
                Some(what) => format!("missing `{key}` ({what})"),
                None => format!("missing `{key}`"),
            };
        }
        one_line(message)
    }
}

/// A toml message on one line.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn envelope(case: &Case) -> Result<Envelope, String> {
    match (&case.event, &case.envelope) {
        (Some(event), None) => explain::envelope(
            event,
            case.object_id.clone().unwrap_or(json!(1)),
            Value::Object(case.data.clone().unwrap_or_default()),
        )
        .map_err(|e| e.to_string()),
        (None, Some(envelope)) if case.data.is_none() && case.object_id.is_none() => {
            Envelope::from_value(envelope.clone()).map_err(|e| format!("envelope: {e}"))
        }
        (None, Some(_)) => {
            Err("`data` and `object_id` go with `event`; put them in the envelope".into())
        }
        (Some(_), Some(_)) => Err("give either `event` or `envelope`, not both".into()),
        (None, None) => Err("give `event` (and `data`) or `envelope`".into()),
    }
}

/// Adds what differs between the expected and the actual handlers of a stage.
fn compare(
    stage: &str,
    expected: &[String],
    actual: &[String],
    explanation: &Explanation,
    problems: &mut Vec<String>,
) {
    if expected == actual {
        return;
    }
    problems.push(format!(
        "{stage}: expected [{}], got [{}]",
        expected.join(", "),
        actual.join(", ")
    ));
    for name in expected.iter().filter(|n| !actual.contains(n)) {
        let why = explanation
            .reason(name)
            .unwrap_or_else(|| "not in this stage".to_owned());
        problems.push(format!("  - {name}: {why}"));
    }
    for name in actual.iter().filter(|n| !expected.contains(n)) {
        problems.push(format!("  + {name}: runs, and the case does not expect it"));
    }
    let common_expected: Vec<&String> = expected.iter().filter(|n| actual.contains(n)).collect();
    let common_actual: Vec<&String> = actual.iter().filter(|n| expected.contains(n)).collect();
    if common_expected != common_actual {
        problems.push("  order differs (priority, then file order)".to_owned());
    }
}

/// The report `provisiond test` prints.
pub(crate) fn render(results: &[CaseResult]) -> String {
    let mut out = String::new();
    for r in results {
        if r.passed() {
            let _ = writeln!(out, "ok    {}", r.name);
        } else {
            let _ = writeln!(out, "FAIL  {}", r.name);
            for p in &r.problems {
                let _ = writeln!(out, "        {p}");
            }
        }
        for note in &r.notes {
            let _ = writeln!(out, "        {note}");
        }
    }
    let failed = results.iter().filter(|r| !r.passed()).count();
    let _ = writeln!(
        out,
        "{} case{}: {} passed, {failed} failed",
        results.len(),
        if results.len() == 1 { "" } else { "s" },
        results.len() - failed,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[[handler]]
name = "b"
events = ["clients.create"]
stage = "before"
priority = 2
url = "http://127.0.0.1:1/b"
[[handler]]
name = "a"
events = ["clients.create"]
stage = "before"
priority = 1
url = "http://127.0.0.1:1/a"
match = { "data.name" = { exists = true } }
"#;

    fn run_cases(cases: &str) -> Result<Vec<CaseResult>, CasesError> {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("cases.toml");
        std::fs::write(&path, cases).unwrap();
        run(&Config::parse(CONFIG, "p.toml").unwrap(), &path)
    }

    #[test]
    fn differences_are_spelled_out() {
        let results = run_cases(
            r#"
[[case]]
name = "named"
event = "clients.create"
data = { name = "x" }
before = ["a", "b"]
after = []
[[case]]
name = "order"
envelope = { event = { events_id = "clients.create", object_id = 3 }, data = { name = "x" } }
before = ["b", "a"]
after = []
[[case]]
name = "unnamed"
event = "clients.create"
before = ["a", "b", "c"]
after = []
"#,
        )
        .unwrap();
        assert!(results[0].passed(), "{:?}", results[0]);
        assert_eq!(
            results[1].problems,
            [
                "before: expected [b, a], got [a, b]",
                "  order differs (priority, then file order)"
            ]
        );
        assert_eq!(
            results[2].problems,
            [
                "no handler is named \"c\" in p.toml",
                "before: expected [a, b, c], got [b]",
                "  - a: match condition false: data.name exists = true",
                "  - c: not in this stage",
            ]
        );
        assert!(render(&results).ends_with("3 cases: 1 passed, 2 failed\n"));
    }

    #[test]
    fn bad_cases_files_are_errors() {
        let problems = |text| run_cases(text).unwrap_err().problems;
        let file = |e: &[String]| e[0].split(':').next().unwrap().to_owned();
        let e = problems("[[case]]\nname = \"x\"\nbefore = []\nafter = []\n");
        assert!(
            e[0].ends_with(":1:1: case \"x\": give `event` (and `data`) or `envelope`"),
            "{e:?}"
        );
        assert!(file(&e).ends_with("cases.toml"), "{e:?}");
        let e = problems("[[case]]\nname = \"x\"\nevent = \"a.b\"\nbefre = []\n");
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(e[0].ends_with(":1:1: case \"x\": missing `before` (list the before-stage handlers expected, in order, [] for none)"), "{e:?}");
        assert!(e[1].ends_with(":1:1: case \"x\": missing `after` (list the after-stage handlers expected, in order, [] for none)"), "{e:?}");
        assert!(
            e[2].contains(":4:1: case \"x\": unknown key `befre` (did you mean `before`?)"),
            "{e:?}"
        );
        let e = problems("[[case]]\nname = \"x\"\nevent = \"a.b\"\nbefore = \"a\"\nafter = []\n");
        assert!(
            e[0].contains(":4:10: case \"x\": invalid type: string \"a\", expected a sequence"),
            "{e:?}"
        );
        let e = problems("[[case]]\nname = \"x\n");
        assert!(e[0].contains(":2:10: invalid TOML: "), "{e:?}");
        assert!(!e[0].contains('\n'), "{e:?}");
        let e = run_cases("# nothing\n").unwrap_err();
        assert!(
            e.problems[0].ends_with("cases.toml: no [[case]] in the file"),
            "{e:?}"
        );
        assert!(e.to_string().ends_with("cases.toml: 1 error"), "{e}");
        let twice = "[[case]]\nname = \"x\"\nevent = \"clients.create\"\nbefore = []\nafter = []\n";
        let e = problems(&format!("{twice}{twice}"));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].ends_with(
                ":6:1: case \"x\": the name of an earlier case (line 1); give each case its \
                 own, the report tells them apart by it"
            ),
            "{e:?}"
        );
    }

    #[test]
    fn a_filter_that_fails_on_the_data_is_said_under_the_case() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("cases.toml");
        std::fs::write(
            &path,
            "[[case]]\nname = \"email as a number\"\nevent = \"clients.create\"\n\
             data = { email = 5 }\nbefore = [\"b\"]\nafter = []\n",
        )
        .unwrap();
        let config = format!(
            "{CONFIG}[[handler]]\nname = \"acme\"\nevents = [\"clients.create\"]\n\
             stage = \"before\"\nurl = \"http://127.0.0.1:1/c\"\n\
             when = 'data.email.endsWith(\"@acme.example\")'\n"
        );
        let results = run(&Config::parse(&config, "p.toml").unwrap(), &path).unwrap();
        assert!(results[0].passed(), "{:?}", results[0]);
        assert_eq!(results[0].notes.len(), 1, "{:?}", results[0]);
        assert!(
            results[0].notes[0].starts_with("note: acme's filter failed on this data: "),
            "{:?}",
            results[0].notes
        );
        let report = render(&results);
        assert!(
            report.starts_with("ok    email as a number\n        note: acme's filter failed"),
            "{report}"
        );
    }

    #[test]
    fn a_case_on_an_unknown_event_fails_unless_it_says_so() {
        let results = run_cases(
            r#"
[[case]]
name = "typo"
event = "clients.crate"
before = []
after = []
[[case]]
name = "on purpose"
event = "clients.loyalty.upgrade"
unknown_event = true
before = []
after = []
[[case]]
name = "an alias of a known name"
event = "clients_packages.renew"
unknown_event = true
before = []
after = []
"#,
        )
        .unwrap();
        assert_eq!(
            results[0].problems,
            [
                "unknown event \"clients.crate\" (did you mean \"clients.create\"?): neither in \
              the catalogue nor in [events] extra; fix the name, or set unknown_event = true \
              to test an event outside them"
            ]
        );
        assert!(results[1].passed(), "{:?}", results[1]);
        assert_eq!(
            results[2].problems,
            ["unknown_event = true, but \"clients.subscriptions.renew\" is a known event"]
        );
    }
}
