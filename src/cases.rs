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

use std::fmt::Write as _;
use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::config::Config;
use crate::events::Envelope;
use crate::explain::{self, Explanation};

/// A cases file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CasesFile {
    #[serde(default)]
    case: Vec<Case>,
}

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
}

/// How one case went.
#[derive(Debug)]
pub struct CaseResult {
    pub name: String,
    /// Empty when the case passed; else what differs, one line each.
    pub problems: Vec<String>,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Reads the cases file and runs every case against `config`. An error means the file
/// itself is wrong (not TOML, unknown keys, a case without an event).
pub fn run(config: &Config, path: &Path) -> Result<Vec<CaseResult>, String> {
    let file = path.display();
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("{file}: cannot read the file: {e}"))?;
    let cases: CasesFile =
        toml::from_str(&text).map_err(|e| format!("{file}: {}", e.to_string().trim_end()))?;
    if cases.case.is_empty() {
        return Err(format!("{file}: no [[case]] in the file"));
    }
    let mut results = Vec::new();
    for (i, case) in cases.case.into_iter().enumerate() {
        let envelope =
            envelope(&case).map_err(|e| format!("{file}: case[{i}] {:?}: {e}", case.name))?;
        let explanation = explain::explain(config, &envelope);
        let mut problems = Vec::new();
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
        results.push(CaseResult {
            name: case.name,
            problems,
        });
    }
    Ok(results)
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
pub fn render(results: &[CaseResult]) -> String {
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

    fn run_cases(cases: &str) -> Result<Vec<CaseResult>, String> {
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
        let e = run_cases("[[case]]\nname = \"x\"\nbefore = []\nafter = []\n").unwrap_err();
        assert!(e.contains("case[0] \"x\": give `event`"), "{e}");
        let e = run_cases("[[case]]\nname = \"x\"\nevent = \"a.b\"\nbefre = []\n").unwrap_err();
        assert!(e.contains("unknown field `befre`"), "{e}");
        let e = run_cases("# nothing\n").unwrap_err();
        assert!(e.contains("no [[case]]"), "{e}");
    }
}
