//! `provisiond explain`: which handlers an envelope would go to, in which order, and why
//! every other handler would not; worked out from the config alone, calling nothing.
//!
//! It runs dispatch's own chain ([`crate::dispatch`]): the same plan, the same filters,
//! the same `on_error` rules, so the two cannot disagree. What it cannot know is what
//! handlers answer: its caller has each before-stage handler allow and leave the data as
//! it was, so filters are evaluated on the data given. `provisiond test` ([`crate::cases`]) checks its
//! answers against expectations.

use std::fmt::{self, Write as _};
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::config::{Config, Handler, Stage};
use crate::dispatch::{CallRecord, Calls, Outcome, Plan, Trace, run_before, select_after};
use crate::events::{Envelope, EnvelopeError};
use crate::filter::Verdict;
use crate::handlers::{Call, CallError, Reply};

/// What dispatch would do with one envelope.
#[derive(Debug)]
pub(crate) struct Explanation {
    /// The event name, normalised.
    pub event: String,
    /// `event.object_id` as text.
    pub object_id: String,
    /// Whether the name is in the catalogue or `[events] extra`.
    pub known: bool,
    /// For a name that is not: the closest one that is, if any is close.
    pub suggestion: Option<String>,
    /// Before-stage handlers that would be called, in order.
    pub before: Vec<Arc<Handler>>,
    /// After-stage handlers that would get a delivery, in order.
    pub after: Vec<Arc<Handler>>,
    /// The before-stage handler whose failing filter would deny the event
    /// (`on_error = "deny"`), with the failure.
    pub denied: Option<(String, String)>,
    /// Every other handler, in file order, with the reason.
    pub not_run: Vec<(Arc<Handler>, Reason)>,
}

/// Why a handler would not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reason {
    /// `enabled = false`.
    Disabled,
    /// None of its `events` patterns matches.
    Events,
    /// A `match` condition is false: shown as written, or only its path when its value
    /// comes from the environment.
    Condition(String),
    /// Its `when` expression is false: shown, unless it holds values from the
    /// environment.
    When(Option<String>),
    /// Its filter fails on this data; for a before-stage handler with
    /// `on_error = "allow"` that means it is skipped, for an after-stage one no delivery.
    FilterError(String),
    /// An earlier before-stage handler denies the event first.
    NotReached(String),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Disabled => f.write_str("disabled (enabled = false)"),
            Self::Events => f.write_str("its events do not match"),
            Self::Condition(c) => write!(f, "match condition false: {c}"),
            Self::When(Some(source)) => write!(f, "when is false: {source}"),
            Self::When(None) => f.write_str(
                "when is false (the expression holds values from the environment, not shown)",
            ),
            Self::FilterError(e) => write!(f, "{e}"),
            Self::NotReached(by) => write!(f, "not reached: {by} denies the event first"),
        }
    }
}

/// The envelope `explain EVENT --data ... --object-id ...` stands for.
pub(crate) fn envelope(
    event: &str,
    object_id: Value,
    data: Value,
) -> Result<Envelope, EnvelopeError> {
    let dt = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    Envelope::from_value(json!({
        "event": {"dt": dt, "events_id": event, "object_id": object_id},
        "data": data,
    }))
}

/// Works out what dispatch would do with `envelope` under `config`: the real chain
/// ([`run_before`], [`select_after`]) with a caller that allows every call and leaves the
/// data as it was.
pub(crate) fn explain(config: &Config, envelope: &Envelope) -> Explanation {
    let plan = Plan::new(config);
    let route = plan.route(&envelope.name);
    let known = plan.is_known(&envelope.name);
    let suggestion = if known {
        None
    } else {
        crate::events::suggest(&envelope.name, config.known_events()).map(str::to_owned)
    };
    let mut out = Explanation {
        event: envelope.name.clone(),
        object_id: envelope.object_id(),
        known,
        suggestion,
        before: Vec::new(),
        after: Vec::new(),
        denied: None,
        not_run: Vec::new(),
    };
    let mut trace = DryTrace::default();
    let started = Instant::now();
    let outcome = at_once(run_before(
        &DryRun,
        &route,
        envelope.clone(),
        Bytes::from(envelope.to_json()),
        started + DRY_DEADLINE,
        DRY_DEADLINE,
        &mut trace,
    ));
    match outcome {
        Outcome::Allowed {
            envelope, mut cel, ..
        } => {
            out.after = select_after(&route, &envelope, &mut cel, &mut trace);
        }
        Outcome::Denied { handler, message } => {
            // A dry run denies only through a filter that fails under
            // `on_error = "deny"`: its record holds the failure.
            let failure = trace
                .failed
                .iter()
                .rposition(|(h, _)| h.name == handler)
                .map_or(message, |i| trace.failed.swap_remove(i).1);
            out.denied = Some((handler, failure));
        }
    }
    out.before = trace.called;
    let mut skipped = trace.skipped;
    for (handler, failure) in trace.failed {
        let reason = match handler.stage {
            Stage::Before => format!("{failure}; a handler error, skipped (on_error = \"allow\")"),
            Stage::After => format!("{failure}; no delivery"),
        };
        skipped.push((handler, Reason::FilterError(reason)));
    }

    let in_route = |handler: &Arc<Handler>| {
        route
            .before
            .iter()
            .chain(&route.after)
            .any(|h| Arc::ptr_eq(h, handler))
    };
    for handler in &config.handlers {
        let denier = out
            .denied
            .as_ref()
            .is_some_and(|(by, _)| *by == handler.name);
        let runs = out
            .before
            .iter()
            .chain(&out.after)
            .any(|h| Arc::ptr_eq(h, handler));
        if runs || denier {
            continue;
        }
        let reason = if !handler.enabled {
            Reason::Disabled
        } else if let Some(i) = skipped.iter().position(|(h, _)| Arc::ptr_eq(h, handler)) {
            skipped.swap_remove(i).1
        } else if let Some((by, _)) = out.denied.as_ref().filter(|_| in_route(handler)) {
            Reason::NotReached(by.clone())
        } else {
            Reason::Events
        };
        out.not_run.push((handler.clone(), reason));
    }
    out
}

/// Longer than any dry run takes: `explain` never runs out of time.
const DRY_DEADLINE: Duration = Duration::from_secs(3600);

/// The dry run's caller: every handler allows and leaves the data as it was (a 200 with
/// an empty body, which a modifying handler may answer too).
struct DryRun;

impl Calls for DryRun {
    fn call(&self, _call: Call<'_>) -> impl Future<Output = Result<Reply, CallError>> + Send {
        std::future::ready(Ok(Reply::Http {
            status: 200,
            body: Bytes::new(),
            truncated: false,
            retry_after: None,
        }))
    }
}

/// What the dry run did: who was called, who failed (a filter that could not be
/// evaluated), who a filter passed over and why.
#[derive(Default)]
struct DryTrace {
    called: Vec<Arc<Handler>>,
    failed: Vec<(Arc<Handler>, String)>,
    skipped: Vec<(Arc<Handler>, Reason)>,
}

impl Trace for DryTrace {
    fn record(&mut self, handler: &Arc<Handler>, record: CallRecord) {
        match record.error {
            Some(error) => self.failed.push((handler.clone(), error)),
            None => self.called.push(handler.clone()),
        }
    }

    fn passed_over(&mut self, handler: &Arc<Handler>, verdict: Verdict) {
        self.skipped
            .push((handler.clone(), why_not(handler, verdict)));
    }
}

/// Runs a future that never waits (the dry run's caller answers at once) to its end.
fn at_once<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => unreachable!("the dry run's caller never waits"),
    }
}

fn why_not(handler: &Handler, verdict: Verdict) -> Reason {
    // `Filter::evaluate` already leaves out values from the environment, in conditions
    // and in failures.
    match verdict {
        Verdict::ConditionFalse(shown) => Reason::Condition(shown),
        Verdict::WhenFalse if handler.filter.from_env => Reason::When(None),
        Verdict::WhenFalse => Reason::When(handler.filter.when.as_ref().map(|w| w.source.clone())),
        Verdict::Pass => unreachable!("a passing filter is no reason"),
    }
}

impl Explanation {
    /// ` (did you mean "clients.create"?)` for an unknown name close to a known one;
    /// else empty.
    pub(crate) fn hint(&self) -> String {
        self.suggestion
            .as_ref()
            .map(|s| format!(" (did you mean {s:?}?)"))
            .unwrap_or_default()
    }

    /// The before-stage handler names that would be called, in order.
    pub(crate) fn before_names(&self) -> Vec<String> {
        self.before.iter().map(|h| h.name.clone()).collect()
    }

    /// The after-stage handler names that would get a delivery, in order.
    pub(crate) fn after_names(&self) -> Vec<String> {
        self.after.iter().map(|h| h.name.clone()).collect()
    }

    /// Why `name` would not run, if it is a handler that would not.
    pub(crate) fn reason(&self, name: &str) -> Option<String> {
        if let Some((by, failure)) = &self.denied
            && by == name
        {
            return Some(format!("denies the event: {failure} (on_error = \"deny\")"));
        }
        self.not_run
            .iter()
            .find(|(h, _)| h.name == name)
            .map(|(h, r)| match r {
                Reason::Events => format!("{r}: {}", patterns(h)),
                _ => r.to_string(),
            })
    }

    /// The text `explain` prints.
    pub(crate) fn render(&self, config: &Config) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{}, object_id {}, config {}",
            self.event, self.object_id, config.file
        );
        if !self.known {
            let _ = writeln!(
                out,
                "note: {} is neither in the catalogue nor in [events] extra{}; only handlers \
                 with a \"*\" or prefix pattern take it",
                self.event,
                self.hint(),
            );
        }
        let width = config
            .handlers
            .iter()
            .map(|h| h.name.len())
            .max()
            .unwrap_or(0);

        let _ = writeln!(out, "\nbefore stage, in this order:");
        for (i, h) in self.before.iter().enumerate() {
            let _ = writeln!(
                out,
                "  {}. {:<width$}  priority {:<4}  {}{}",
                i + 1,
                h.name,
                h.priority,
                h.describe_target(),
                if h.modifies {
                    "  (may change the data)"
                } else {
                    ""
                },
            );
        }
        if let Some((by, failure)) = &self.denied {
            let _ = writeln!(
                out,
                "  {}. {by:<width$}  its filter fails, and on_error = \"deny\": the event is \
                 denied ({failure})",
                self.before.len() + 1,
            );
        } else if self.before.is_empty() {
            let _ = writeln!(out, "  (none)");
        }

        let _ = writeln!(out, "\nafter stage, once the event is allowed:");
        for (i, h) in self.after.iter().enumerate() {
            let _ = writeln!(
                out,
                "  {}. {:<width$}  priority {:<4}  {}",
                i + 1,
                h.name,
                h.priority,
                h.describe_target(),
            );
        }
        if self.after.is_empty() {
            let _ = writeln!(
                out,
                "  (none{})",
                if self.denied.is_some() {
                    ": denied"
                } else {
                    ""
                }
            );
        }

        if !self.not_run.is_empty() {
            let _ = writeln!(out, "\nnot run:");
            for (h, reason) in &self.not_run {
                let reason = match reason {
                    Reason::Events => format!("{reason}: {}", patterns(h)),
                    _ => reason.to_string(),
                };
                let stage = h.stage.as_str();
                let _ = writeln!(out, "  {:<width$}  {stage:<6}  {reason}", h.name);
            }
        }

        out.push_str(
            "\nexplain calls no handler: filters were evaluated on the data given, as if\n\
             every before-stage handler allowed the event and left the data unchanged. A\n\
             handler may deny the event, and one marked \"may change the data\" may change\n\
             what the filters after it see.\n",
        );
        out
    }
}

fn patterns(h: &Handler) -> String {
    let list: Vec<String> = h
        .events
        .iter()
        .map(|p| format!("{:?}", p.to_string()))
        .collect();
    format!("events = [{}]", list.join(", "))
}

/// What to say when `--data` holds a whole envelope (`event` and `data`, objects both: a
/// dead letter's stored envelope pasted, say) where the billing's `data` is meant: it is
/// taken as given, as the data, which is rarely what was meant.
fn whole_envelope(data: &Map<String, Value>) -> Option<String> {
    (data.get("event").is_some_and(Value::is_object)
        && data.get("data").is_some_and(Value::is_object))
    .then(|| {
        "the data given has `event` and `data` objects, like a whole envelope; it is \
             taken as the event's data as it is. Give only the envelope's data \
             (jq .data envelope.json | provisiond ... --data -)"
            .to_owned()
    })
}

/// Reads `--data`: a JSON object, from a file or `-` (stdin); `{}` when not given.
pub(crate) fn read_data(source: Option<&str>) -> Result<Map<String, Value>, String> {
    let text = match source {
        None => return Ok(Map::new()),
        Some("-") => std::io::read_to_string(std::io::stdin())
            .map_err(|e| format!("cannot read the data from stdin: {e}"))?,
        Some(path) => std::fs::read_to_string(path).map_err(|e| {
            let inline = path.trim_start().starts_with(['{', '[']);
            if inline && e.kind() == std::io::ErrorKind::NotFound {
                format!(
                    "--data takes a file, or - for stdin, not the JSON itself: \
                     echo '{path}' | provisiond ... --data -"
                )
            } else {
                format!("cannot read the data from {path}: {e}")
            }
        })?,
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(map)) => {
            if let Some(warning) = whole_envelope(&map) {
                crate::errln!("provisiond: warning: {warning}");
            }
            Ok(map)
        }
        Ok(other) => Err(format!(
            "the data must be a JSON object, got {}",
            crate::events::type_name(&other)
        )),
        Err(e) => Err(format!("the data is not valid JSON: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[[handler]]
name = "late"
events = ["clients.*"]
stage = "before"
priority = 50
url = "http://127.0.0.1:1/late"

[[handler]]
name = "early"
events = ["clients.create"]
stage = "before"
priority = 5
url = "http://127.0.0.1:1/early"
modifies = true

[[handler]]
name = "vip"
events = ["clients.create"]
stage = "before"
url = "http://127.0.0.1:1/vip"
match = { "data.vip" = true }

[[handler]]
name = "acme"
events = ["clients.create"]
stage = "before"
url = "http://127.0.0.1:1/acme"
when = 'data.name.startsWith("ACME")'

[[handler]]
name = "off"
events = ["*"]
stage = "before"
enabled = false
url = "http://127.0.0.1:1/off"

[[handler]]
name = "balance"
events = ["clients.balance_zero"]
stage = "before"
url = "http://127.0.0.1:1/balance"

[[handler]]
name = "strict"
events = ["clients.update"]
stage = "before"
url = "http://127.0.0.1:1/strict"
priority = 1
on_error = "deny"
match = { "data.balance" = { lt = 0 } }
"#;

    fn config() -> Config {
        Config::parse(CONFIG, "p.toml").unwrap()
    }

    fn explained(event: &str, data: Value) -> Explanation {
        explain(&config(), &envelope(event, json!(1), data).unwrap())
    }

    #[test]
    fn runs_in_priority_order_and_says_why_not() {
        let e = explained("clients.create", json!({"name": "ACME ltd", "vip": false}));
        assert_eq!(e.before_names(), ["early", "late", "acme"]);
        assert_eq!(
            e.reason("vip").unwrap(),
            "match condition false: data.vip = true"
        );
        assert_eq!(e.reason("off").unwrap(), "disabled (enabled = false)");
        assert_eq!(
            e.reason("balance").unwrap(),
            "its events do not match: events = [\"clients.balance_zero\"]"
        );
        let e = explained("clients.create", json!({"name": "Other"}));
        assert_eq!(
            e.reason("acme").unwrap(),
            "when is false: data.name.startsWith(\"ACME\")"
        );
    }

    #[test]
    fn an_event_outside_the_catalogue_goes_to_wildcard_handlers() {
        let e = explained("clients.loyalty.upgrade", json!({}));
        assert!(!e.known);
        assert_eq!(e.suggestion, None);
        assert_eq!(e.before_names(), ["late"]);
        assert!(
            e.render(&config())
                .contains("neither in the catalogue nor in [events] extra; only")
        );
        let e = explained("clients.crate", json!({}));
        assert_eq!(e.suggestion.as_deref(), Some("clients.create"));
        assert!(e.render(&config()).contains(
            "clients.crate is neither in the catalogue nor in [events] extra \
                 (did you mean \"clients.create\"?)"
        ));
    }

    #[test]
    fn a_failing_filter_with_on_error_deny_stops_the_chain() {
        let e = explained("clients.update", json!({"balance": {"not": "a number"}}));
        assert_eq!(e.before_names(), Vec::<String>::new());
        let (by, failure) = e.denied.clone().unwrap();
        assert_eq!(by, "strict");
        assert!(failure.contains("cannot be compared"), "{failure}");
        assert_eq!(
            e.reason("late").unwrap(),
            "not reached: strict denies the event first"
        );
        let text = e.render(&config());
        assert!(text.contains("the event is denied"), "{text}");
    }

    #[test]
    fn filters_from_the_environment_are_not_shown() {
        let text = r#"
[[handler]]
name = "company"
events = ["clients.create"]
stage = "before"
url = "http://127.0.0.1:1/c"
match = { "data.companies_id" = { lt = "${COMPANY}" } }
[[handler]]
name = "keyed"
events = ["clients.create"]
stage = "before"
url = "http://127.0.0.1:1/k"
when = 'data.key == "${COMPANY}"'
"#;
        let config = Config::parse_with_env(text, "p.toml", std::path::Path::new("."), &|_| {
            Some("hidden-42".into())
        })
        .unwrap();
        let e = explain(
            &config,
            &envelope("clients.create", json!(1), json!({"key": "k"})).unwrap(),
        );
        let rendered = e.render(&config);
        assert!(!rendered.contains("hidden-42"), "{rendered}");
        assert!(
            rendered.contains("a condition on data.companies_id"),
            "{rendered}"
        );
        assert!(
            rendered.contains("when is false (the expression"),
            "{rendered}"
        );
    }
}
