//! Handler filters: `match` conditions and `when` CEL expressions, compiled at load and
//! evaluated against the envelope as the chain has left it.
//!
//! Comparisons are loose in one way the billing needs: it sends many numbers as strings
//! (`"companies_id": "3"`), so a number and a string that reads as that number are equal,
//! and order comparisons between them are numeric.

use std::cmp::Ordering;
use std::fmt;
use std::sync::{Arc, OnceLock};

use regex::Regex;
use serde_json::{Map, Value};

use crate::events::{Envelope, type_name};
use crate::keypath::KeyPath;

/// The operators of a `match` table.
pub const OPERATORS: &[&str] = &[
    "eq", "ne", "in", "not_in", "lt", "le", "gt", "ge", "exists", "regex",
];

/// A handler's compiled filters; all of them must hold.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub conditions: Vec<Condition>,
    pub when: Option<When>,
    /// Whether `match` or `when` hold values substituted from the environment. Then
    /// [`Filter::evaluate`] never shows them: a false condition is named by its path
    /// only, and failures come without details.
    pub from_env: bool,
}

/// Which part of the envelope a path starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Root {
    Event,
    Data,
}

/// One `match` condition: a path and an operator.
#[derive(Debug, Clone)]
pub struct Condition {
    /// The dot path as the docs write it, e.g. `data.balance`.
    pub path: String,
    root: Root,
    segments: Vec<String>,
    pub op: Op,
}

#[derive(Debug, Clone)]
pub enum Op {
    Eq(Value),
    Ne(Value),
    In(Vec<Value>),
    NotIn(Vec<Value>),
    Lt(Value),
    Le(Value),
    Gt(Value),
    Ge(Value),
    Exists(bool),
    Regex(Regex),
}

/// A compiled `when` expression.
#[derive(Clone)]
pub struct When {
    pub source: String,
    program: Arc<cel::Program>,
    /// Which variables the expression reads: only those are converted for it.
    reads_event: bool,
    reads_data: bool,
}

impl fmt::Debug for When {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("When").field(&self.source).finish()
    }
}

/// A filter that could not be evaluated: it counts as a handler error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filter failed: {0}")]
pub struct FilterError(pub String);

/// Why a filter did not pass, for `explain` and debug logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// The `match` condition (as written) that was false.
    ConditionFalse(String),
    /// `when` was false.
    WhenFalse,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.conditions.is_empty() && self.when.is_none()
    }

    /// Equalities whose last key looks like a misspelt operator (`regx`, `Regex`, `gte`):
    /// a table with no operator in it is a nested path, so `{ regx = "^A" }` compares
    /// field `regx` rather than matching a pattern. Each with the operator meant.
    pub fn suspect_operators(&self) -> Vec<(&str, &'static str)> {
        self.conditions
            .iter()
            .filter(|c| matches!(c.op, Op::Eq(_)))
            .filter_map(|c| {
                let key = c.segments.last()?;
                meant_operator(key).map(|op| (c.path.as_str(), op))
            })
            .collect()
    }

    /// Compiles `match` and `when`. Errors come with the key path, relative to the
    /// handler, of what is wrong.
    pub fn compile(
        matches: Option<&Map<String, Value>>,
        when: Option<&str>,
    ) -> Result<Self, Vec<(KeyPath, String)>> {
        let mut errors = Vec::new();
        let mut conditions = Vec::new();
        if let Some(matches) = matches {
            let base = KeyPath::root().key("match");
            for (key, value) in matches {
                let segments: Vec<String> = key.split('.').map(str::to_owned).collect();
                flatten(
                    segments,
                    value,
                    &base.key(key.as_str()),
                    &mut conditions,
                    &mut errors,
                );
            }
        }
        let when = match when {
            None => None,
            Some(source) => match When::compile(source) {
                Ok(w) => Some(w),
                Err(e) => {
                    errors.push((KeyPath::root().key("when"), e));
                    None
                }
            },
        };
        if errors.is_empty() {
            Ok(Self {
                conditions,
                when,
                from_env: false,
            })
        } else {
            Err(errors)
        }
    }

    /// Evaluates every condition, then `when`, stopping at the first that is false.
    pub fn evaluate(&self, envelope: &Envelope) -> Result<Verdict, FilterError> {
        self.evaluate_with(envelope, &mut CelInput::default())
    }

    /// As [`Filter::evaluate`], reusing the CEL form of the envelope in `cel` (built on
    /// first use). Keep one `CelInput` per version of the data: a handler's filters after
    /// another's see the same conversion, and it must be dropped when the data changes.
    pub fn evaluate_with(
        &self,
        envelope: &Envelope,
        cel: &mut CelInput,
    ) -> Result<Verdict, FilterError> {
        for condition in &self.conditions {
            let holds = condition
                .evaluate(envelope)
                .map_err(|e| self.hide(e, &condition.path))?;
            if !holds {
                return Ok(Verdict::ConditionFalse(if self.from_env {
                    format!(
                        "a condition on {} (its value comes from the environment, not shown)",
                        condition.path
                    )
                } else {
                    condition.to_string()
                }));
            }
        }
        if let Some(when) = &self.when
            && !when
                .evaluate_with(envelope, cel)
                .map_err(|e| self.hide(e, "when"))?
        {
            return Ok(Verdict::WhenFalse);
        }
        Ok(Verdict::Pass)
    }

    /// `error`, or only where it happened when the filter holds values from the
    /// environment (a comparison's message names the value it compared with).
    fn hide(&self, error: FilterError, place: &str) -> FilterError {
        if self.from_env {
            FilterError(format!(
                "{place}: details not shown, the filter holds values from the environment"
            ))
        } else {
            error
        }
    }
}

/// The operator `key` was probably meant to be: the same in another case, a spelling
/// one letter off a long one, or another filter language's name for it.
fn meant_operator(key: &str) -> Option<&'static str> {
    const ELSEWHERE: &[(&str, &str)] = &[
        ("gte", "ge"),
        ("lte", "le"),
        ("neq", "ne"),
        ("nin", "not_in"),
        ("notin", "not_in"),
        ("not-in", "not_in"),
        ("match", "regex"),
        ("regexp", "regex"),
    ];
    let lower = key.to_lowercase();
    if let Some(&op) = OPERATORS.iter().find(|op| **op == lower) {
        return (op != key).then_some(op);
    }
    if let Some(&(_, op)) = ELSEWHERE.iter().find(|(alias, _)| *alias == lower) {
        return Some(op);
    }
    OPERATORS
        .iter()
        .copied()
        .find(|op| op.len() >= 5 && strsim::levenshtein(op, &lower) == 1)
}

/// Walks a `match` value: operator tables become conditions, other tables are nested
/// paths, anything else is an equality.
fn flatten(
    segments: Vec<String>,
    value: &Value,
    path: &KeyPath,
    out: &mut Vec<Condition>,
    errors: &mut Vec<(KeyPath, String)>,
) {
    if let Value::Object(table) = value {
        let ops = table
            .keys()
            .filter(|k| OPERATORS.contains(&k.as_str()))
            .count();
        if table.is_empty() {
            errors.push((path.clone(), "empty condition table".into()));
            return;
        }
        if ops == 0 {
            for (key, inner) in table {
                let mut segments = segments.clone();
                segments.extend(key.split('.').map(str::to_owned));
                flatten(segments, inner, &path.key(key.as_str()), out, errors);
            }
            return;
        }
        if ops != table.len() {
            let others: Vec<&str> = table
                .keys()
                .filter(|k| !OPERATORS.contains(&k.as_str()))
                .map(String::as_str)
                .collect();
            errors.push((
                path.clone(),
                format!(
                    "mixes operators with other keys ({}); operators are {}",
                    others.join(", "),
                    OPERATORS.join(" ")
                ),
            ));
            return;
        }
        for (op, operand) in table {
            match Condition::new(&segments, op, operand) {
                Ok(c) => out.push(c),
                Err(e) => errors.push((path.key(op.as_str()), e)),
            }
        }
        return;
    }
    match Condition::new(&segments, "eq", value) {
        Ok(c) => out.push(c),
        Err(e) => errors.push((path.clone(), e)),
    }
}

impl Condition {
    fn new(segments: &[String], op: &str, operand: &Value) -> Result<Self, String> {
        let joined = segments.join(".");
        let (root, rest) = match segments.split_first() {
            Some((first, rest)) if first == "event" => (Root::Event, rest),
            Some((first, rest)) if first == "data" => (Root::Data, rest),
            _ => {
                return Err(format!("`{joined}` must start with `event.` or `data.`"));
            }
        };
        if rest.is_empty() || rest.iter().any(String::is_empty) {
            return Err(format!("`{joined}` is not a path into the envelope"));
        }
        let scalar = |v: &Value| -> Result<Value, String> {
            match v {
                Value::Array(_) | Value::Object(_) => {
                    Err(format!("`{op}` takes a single value, got {}", type_name(v)))
                }
                other => Ok(other.clone()),
            }
        };
        let ordered = |v: &Value| -> Result<Value, String> {
            match v {
                Value::Number(_) | Value::String(_) => Ok(v.clone()),
                other => Err(format!(
                    "`{op}` compares with a number or a string, got {}",
                    type_name(other)
                )),
            }
        };
        let list = |v: &Value| -> Result<Vec<Value>, String> {
            match v {
                Value::Array(items) => items.iter().map(scalar).collect(),
                other => Err(format!("`{op}` takes an array, got {}", type_name(other))),
            }
        };
        let op = match op {
            "eq" => Op::Eq(scalar(operand)?),
            "ne" => Op::Ne(scalar(operand)?),
            "in" => Op::In(list(operand)?),
            "not_in" => Op::NotIn(list(operand)?),
            "lt" => Op::Lt(ordered(operand)?),
            "le" => Op::Le(ordered(operand)?),
            "gt" => Op::Gt(ordered(operand)?),
            "ge" => Op::Ge(ordered(operand)?),
            "exists" => match operand {
                Value::Bool(b) => Op::Exists(*b),
                other => {
                    return Err(format!(
                        "`exists` takes true or false, got {}",
                        type_name(other)
                    ));
                }
            },
            "regex" => match operand {
                Value::String(pattern) => Op::Regex(Regex::new(pattern).map_err(|e| {
                    let text = e.to_string();
                    let last = text.lines().last().unwrap_or_default();
                    format!(
                        "invalid regex {pattern:?}: {}",
                        last.trim_start_matches("error: ")
                    )
                })?),
                other => {
                    return Err(format!("`regex` takes a string, got {}", type_name(other)));
                }
            },
            other => return Err(format!("unknown operator `{other}`")),
        };
        Ok(Self {
            path: joined,
            root,
            segments: rest.to_vec(),
            op,
        })
    }

    /// The value at this condition's path, if there is one.
    fn lookup<'a>(&self, envelope: &'a Envelope) -> Option<&'a Value> {
        let map = match self.root {
            Root::Event => envelope.event.map(),
            Root::Data => envelope.data.map(),
        };
        let (first, rest) = self.segments.split_first()?;
        let mut value = map.get(first)?;
        for seg in rest {
            value = match value {
                Value::Object(m) => m.get(seg)?,
                Value::Array(items) => items.get(seg.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(value)
    }

    pub fn evaluate(&self, envelope: &Envelope) -> Result<bool, FilterError> {
        let actual = self.lookup(envelope).filter(|v| !v.is_null());
        let compare = |want: &Value, accept: fn(Ordering) -> bool| match actual {
            None => Ok(false),
            Some(have) => match order(have, want) {
                Some(o) => Ok(accept(o)),
                None => Err(FilterError(format!(
                    "{} is {}, which cannot be compared with {want}",
                    self.path,
                    type_name(have)
                ))),
            },
        };
        match &self.op {
            Op::Eq(want) => Ok(actual.is_some_and(|have| loose_eq(have, want))),
            Op::Ne(want) => Ok(!actual.is_some_and(|have| loose_eq(have, want))),
            Op::In(list) => Ok(actual.is_some_and(|have| list.iter().any(|w| loose_eq(have, w)))),
            Op::NotIn(list) => {
                Ok(!actual.is_some_and(|have| list.iter().any(|w| loose_eq(have, w))))
            }
            Op::Lt(want) => compare(want, Ordering::is_lt),
            Op::Le(want) => compare(want, Ordering::is_le),
            Op::Gt(want) => compare(want, Ordering::is_gt),
            Op::Ge(want) => compare(want, Ordering::is_ge),
            Op::Exists(want) => Ok(actual.is_some() == *want),
            Op::Regex(re) => match actual {
                None => Ok(false),
                Some(Value::String(s)) => Ok(re.is_match(s)),
                Some(Value::Number(n)) => Ok(re.is_match(&n.to_string())),
                Some(other) => Err(FilterError(format!(
                    "{} is {}, which a regex cannot match",
                    self.path,
                    type_name(other)
                ))),
            },
        }
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = &self.path;
        let list = |items: &[Value]| {
            items
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match &self.op {
            Op::Eq(v) => write!(f, "{path} = {v}"),
            Op::Ne(v) => write!(f, "{path} ne {v}"),
            Op::In(vs) => write!(f, "{path} in [{}]", list(vs)),
            Op::NotIn(vs) => write!(f, "{path} not_in [{}]", list(vs)),
            Op::Lt(v) => write!(f, "{path} lt {v}"),
            Op::Le(v) => write!(f, "{path} le {v}"),
            Op::Gt(v) => write!(f, "{path} gt {v}"),
            Op::Ge(v) => write!(f, "{path} ge {v}"),
            Op::Exists(b) => write!(f, "{path} exists = {b}"),
            Op::Regex(re) => write!(f, "{path} regex {:?}", re.as_str()),
        }
    }
}

/// A number, also when it is written as a string.
fn as_number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite()),
        _ => None,
    }
}

fn loose_eq(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Number(a), Value::Number(b)) => {
            a == b || matches!((a.as_f64(), b.as_f64()), (Some(x), Some(y)) if x == y)
        }
        (Value::String(_), Value::Number(_)) | (Value::Number(_), Value::String(_)) => {
            matches!((as_number(have), as_number(want)), (Some(x), Some(y)) if x == y)
        }
        (Value::Bool(a), Value::String(s)) | (Value::String(s), Value::Bool(a)) => {
            s == if *a { "true" } else { "false" }
        }
        _ => have == want,
    }
}

fn order(have: &Value, want: &Value) -> Option<Ordering> {
    if let (Some(a), Some(b)) = (as_number(have), as_number(want))
        && (have.is_number() || want.is_number())
    {
        return a.partial_cmp(&b);
    }
    match (have, want) {
        (Value::String(a), Value::String(b)) => Some(a.cmp(b)),
        _ => None,
    }
}

/// The envelope's `event` and `data` in CEL's own representation, converted once and
/// lent to every `when` evaluated on the same data. (Binding a variable to a context by
/// value converts the whole map again on every evaluation: that costs more than the
/// expression.)
#[derive(Debug, Default)]
pub struct CelInput {
    event: Option<Box<dyn cel::common::value::Val>>,
    data: Option<Box<dyn cel::common::value::Val>>,
}

impl CelInput {
    /// Converts what `when` reads and has not been converted yet.
    fn prepare(&mut self, envelope: &Envelope, when: &When) -> Result<(), FilterError> {
        fn convert(
            map: &Map<String, Value>,
        ) -> Result<Box<dyn cel::common::value::Val>, FilterError> {
            cel_map(map)
                .try_into()
                .map_err(|e: cel::ExecutionError| FilterError(format!("when: {e}")))
        }
        if when.reads_event && self.event.is_none() {
            self.event = Some(convert(envelope.event.map())?);
        }
        if when.reads_data && self.data.is_none() {
            self.data = Some(convert(envelope.data.map())?);
        }
        Ok(())
    }
}

/// A JSON object as a CEL map. Numbers become what their text reads as: `int` for an
/// integer (`uint` only past `int`'s range), else `double`. An integer is an `int`
/// whatever its sign, as CEL's own literals are, so that `data.balance + 100` works for
/// 5 as for -5 (CEL does no arithmetic between `int` and `uint`). Done by hand because
/// numbers keep their text (`arbitrary_precision`), which serde would hand CEL as a map.
fn cel_map(map: &Map<String, Value>) -> cel::Value {
    let entries: std::collections::HashMap<cel::objects::Key, cel::Value> = map
        .iter()
        .map(|(k, v)| (cel::objects::Key::String(Arc::new(k.clone())), cel_value(v)))
        .collect();
    cel::Value::Map(entries.into())
}

fn cel_value(value: &Value) -> cel::Value {
    match value {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                cel::Value::Int(i)
            } else if let Some(u) = n.as_u64() {
                cel::Value::UInt(u)
            } else {
                // `as_f64` refuses what overflows a double (`1e400`); CEL gets infinity.
                let f = n
                    .as_f64()
                    .unwrap_or_else(|| n.as_str().parse::<f64>().unwrap_or(f64::NAN));
                cel::Value::Float(f)
            }
        }
        Value::String(s) => cel::Value::String(Arc::new(s.clone())),
        Value::Array(items) => cel::Value::List(Arc::new(items.iter().map(cel_value).collect())),
        Value::Object(map) => cel_map(map),
    }
}

impl cel::context::VariableResolver for CelInput {
    fn resolve<'b>(&'b self, variable: &str) -> Option<cel::common::value::CowVal<'b, 'b>> {
        let value = match variable {
            "event" => self.event.as_ref()?,
            "data" => self.data.as_ref()?,
            _ => return None,
        };
        Some(cel::common::value::CowVal::Borrowed(value.as_ref()))
    }
}

/// The first name in `expr` that is not `event`, `data`, a type (`int`, `string`, ...)
/// nor a variable of a macro around it (`x` in `data.items.exists(x, x > 1)`, in
/// `bound`).
fn unknown_name<'e>(
    expr: &'e cel::parser::Expression,
    bound: &mut Vec<&'e str>,
) -> Option<&'e str> {
    use cel::common::ast::{EntryExpr, Expr};
    let known = |name: &str| {
        name == "event"
            || name == "data"
            || name.starts_with('@')
            || bound.contains(&name)
            || cel_env().types().find_type(name).is_some()
    };
    match &expr.expr {
        Expr::Ident(name) => (!known(name)).then_some(name.as_str()),
        // A dotted name may be a type's (`google.protobuf.Timestamp`).
        Expr::Select(select) => {
            let mut segments = vec![select.field.as_str()];
            let mut operand = &*select.operand;
            while let Expr::Select(inner) = &operand.expr {
                segments.push(&inner.field);
                operand = &inner.operand;
            }
            if let Expr::Ident(root) = &operand.expr {
                segments.push(root);
                segments.reverse();
                let is_type = |n: usize| {
                    cel_env()
                        .types()
                        .find_type(&segments[..n].join("."))
                        .is_some()
                };
                if (1..=segments.len()).any(is_type) {
                    return None;
                }
            }
            unknown_name(&select.operand, bound)
        }
        Expr::Call(call) => call
            .target
            .iter()
            .map(|t| &**t)
            .chain(&call.args)
            .find_map(|e| unknown_name(e, bound)),
        Expr::Comprehension(c) => {
            if let Some(name) =
                unknown_name(&c.iter_range, bound).or_else(|| unknown_name(&c.accu_init, bound))
            {
                return Some(name);
            }
            let outer = bound.len();
            bound.extend([c.iter_var.as_str(), c.accu_var.as_str()]);
            bound.extend(c.iter_var2.as_deref());
            let found = [&c.loop_cond, &c.loop_step, &c.result]
                .into_iter()
                .find_map(|e| unknown_name(e, bound));
            bound.truncate(outer);
            found
        }
        Expr::List(list) => list.elements.iter().find_map(|e| unknown_name(e, bound)),
        Expr::Map(map) => map.entries.iter().find_map(|entry| match &entry.expr {
            EntryExpr::StructField(field) => unknown_name(&field.value, bound),
            EntryExpr::MapEntry(entry) => {
                unknown_name(&entry.key, bound).or_else(|| unknown_name(&entry.value, bound))
            }
        }),
        Expr::Struct(_) | Expr::Literal(_) | Expr::Unspecified => None,
    }
}

/// What `expr` gives when that can never be a boolean: a literal other than `true` or
/// `false`, arithmetic, a list or a map, a conversion, `size()`.
fn never_bool(expr: &cel::parser::Expression) -> Option<&'static str> {
    use cel::common::ast::{Expr, LiteralValue, operators};
    match &expr.expr {
        Expr::Literal(LiteralValue::Boolean(_)) => None,
        Expr::Literal(LiteralValue::Null) => Some("null"),
        Expr::Literal(LiteralValue::String(_)) => Some("a string"),
        Expr::Literal(LiteralValue::Bytes(_)) => Some("bytes"),
        Expr::Literal(_) => Some("a number"),
        Expr::List(_) => Some("a list"),
        Expr::Map(_) | Expr::Struct(_) => Some("a map"),
        Expr::Call(call) => match call.func_name.as_str() {
            operators::ADD
            | operators::SUBSTRACT
            | operators::MULTIPLY
            | operators::DIVIDE
            | operators::MODULO
            | operators::NEGATE => Some("a number (or a string or list)"),
            "size" | "int" | "uint" | "double" => Some("a number"),
            "string" => Some("a string"),
            "bytes" => Some("bytes"),
            "type" => Some("a type"),
            operators::CONDITIONAL => call.args.get(1..).and_then(|branches| {
                let kinds: Vec<_> = branches.iter().map(never_bool).collect();
                kinds
                    .iter()
                    .all(Option::is_some)
                    .then(|| kinds[0])
                    .flatten()
            }),
            _ => None,
        },
        _ => None,
    }
}

/// The CEL environment, built once: building it registers the whole standard library.
fn cel_env() -> &'static Arc<cel::Env> {
    static ENV: OnceLock<Arc<cel::Env>> = OnceLock::new();
    ENV.get_or_init(|| Arc::new(cel::Env::stdlib()))
}

impl When {
    pub fn compile(source: &str) -> Result<Self, String> {
        let program = cel_env().compile(source).map_err(|e| {
            let text = e
                .errors
                .iter()
                .map(|e| format!("{}:{}: {}", e.pos.0, e.pos.1, e.msg))
                .collect::<Vec<_>>()
                .join("; ");
            format!("invalid CEL expression: {text}")
        })?;
        // What CEL would only find out on every event: a name that is neither `event`,
        // `data` nor a type, and an expression that cannot be true or false.
        let expression = program.expression();
        if let Some(name) = unknown_name(expression, &mut Vec::new()) {
            return Err(format!(
                "unknown name `{name}`: an expression reads `event` and `data` (e.g. \
                 data.{name} or event.{name})"
            ));
        }
        if let Some(kind) = never_bool(expression) {
            return Err(format!(
                "the expression gives {kind}, never true or false (compare it: data.x == 1, \
                 size(data.items) > 0)"
            ));
        }
        let references = program.references();
        let (reads_event, reads_data) = (
            references.has_variable("event"),
            references.has_variable("data"),
        );
        Ok(Self {
            source: source.to_owned(),
            program: Arc::new(program),
            reads_event,
            reads_data,
        })
    }

    pub fn evaluate(&self, envelope: &Envelope) -> Result<bool, FilterError> {
        self.evaluate_with(envelope, &mut CelInput::default())
    }

    pub fn evaluate_with(
        &self,
        envelope: &Envelope,
        cel: &mut CelInput,
    ) -> Result<bool, FilterError> {
        cel.prepare(envelope, self)?;
        let mut context = cel::Context::with_env(cel_env().clone());
        context.set_variable_resolver(&*cel);
        match self.program.execute(&context) {
            Ok(cel::Value::Bool(b)) => Ok(b),
            Ok(other) => Err(FilterError(format!(
                "when must be true or false, got a value of type {}",
                other.type_of()
            ))),
            Err(e) => Err(FilterError(format!("when: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn envelope(data: Value) -> Envelope {
        Envelope::from_value(json!({
            "event": {"events_id": "clients.update", "object_id": 12},
            "data": data,
        }))
        .unwrap()
    }

    fn filter(m: Value, when: Option<&str>) -> Filter {
        Filter::compile(m.as_object(), when).unwrap()
    }

    fn passes(f: &Filter, data: Value) -> bool {
        f.evaluate(&envelope(data)).unwrap() == Verdict::Pass
    }

    #[test]
    fn values_from_the_environment_are_not_shown() {
        let mut f = filter(json!({"data.balance": {"lt": "s3cret-42"}}), None);
        let shown = f.evaluate(&envelope(json!({}))).unwrap();
        assert_eq!(
            shown,
            Verdict::ConditionFalse("data.balance lt \"s3cret-42\"".into())
        );
        f.from_env = true;
        let hidden = f.evaluate(&envelope(json!({}))).unwrap();
        assert_eq!(
            hidden,
            Verdict::ConditionFalse(
                "a condition on data.balance (its value comes from the environment, not shown)"
                    .into()
            )
        );
        let failure = f.evaluate(&envelope(json!({"balance": [1]}))).unwrap_err();
        assert!(!failure.to_string().contains("s3cret"), "{failure}");
        assert!(failure.to_string().contains("data.balance"), "{failure}");
    }

    #[test]
    fn every_operator() {
        let cases = [
            (json!({"data.a": 3}), json!({"a": "3"}), true),
            (json!({"data.a": 3}), json!({"a": 4}), false),
            (json!({"data.a": {"eq": "x"}}), json!({"a": "x"}), true),
            (json!({"data.a": {"ne": 1}}), json!({"a": 2}), true),
            (json!({"data.a": {"ne": 1}}), json!({}), true),
            (json!({"data.a": {"in": [1, 2]}}), json!({"a": 2}), true),
            (json!({"data.a": {"in": [1, 2]}}), json!({"a": 3}), false),
            (json!({"data.a": {"not_in": [1, 2]}}), json!({"a": 3}), true),
            (json!({"data.a": {"lt": 0}}), json!({"a": -1.5}), true),
            (json!({"data.a": {"lt": 0}}), json!({"a": "0"}), false),
            (json!({"data.a": {"le": 0}}), json!({"a": 0}), true),
            (json!({"data.a": {"gt": 10}}), json!({"a": "11"}), true),
            (json!({"data.a": {"ge": "b"}}), json!({"a": "a"}), false),
            (
                json!({"data.a": {"gt": 0, "lt": 10}}),
                json!({"a": 5}),
                true,
            ),
            (json!({"data.a": {"exists": true}}), json!({"a": 0}), true),
            (
                json!({"data.a": {"exists": true}}),
                json!({"a": null}),
                false,
            ),
            (json!({"data.a": {"exists": false}}), json!({}), true),
            (
                json!({"data.a": {"regex": "^AC"}}),
                json!({"a": "ACME"}),
                true,
            ),
            (
                json!({"data.a": {"regex": "^AC"}}),
                json!({"a": "acme"}),
                false,
            ),
            (
                json!({"data": {"b": {"c": {"lt": 0}}}}),
                json!({"b": {"c": -1}}),
                true,
            ),
            (json!({"event.object_id": 12}), json!({}), true),
            (json!({"data.l.1": "y"}), json!({"l": ["x", "y"]}), true),
        ];
        for (m, data, want) in cases {
            let f = filter(m.clone(), None);
            assert_eq!(passes(&f, data.clone()), want, "{m} on {data}");
        }
    }

    #[test]
    fn bad_filters_are_load_errors() {
        let errs = |m: Value| Filter::compile(m.as_object(), None).unwrap_err();
        assert!(
            errs(json!({"data.a": {"regex": "("}}))[0]
                .1
                .contains("invalid regex")
        );
        assert!(errs(json!({"name": 1}))[0].1.contains("must start with"));
        assert!(
            errs(json!({"data.a": {"in": 1}}))[0]
                .1
                .contains("takes an array")
        );
        assert!(
            errs(json!({"data.a": {"lt": 1, "x": 2}}))[0]
                .1
                .contains("mixes")
        );
        let e = Filter::compile(None, Some("data.a ==")).unwrap_err();
        assert!(e[0].1.contains("invalid CEL"), "{e:?}");
    }

    #[test]
    fn cel_when() {
        let f = filter(
            json!({}),
            Some(r#"has(data.email) && data.email.endsWith("@acme.example")"#),
        );
        assert!(passes(&f, json!({"email": "a@acme.example"})));
        assert!(!passes(&f, json!({"email": "a@other.example"})));
        assert!(!passes(&f, json!({})));
        let f = filter(json!({}), Some("data.missing > 1"));
        assert!(f.evaluate(&envelope(json!({}))).is_err());
        let f = filter(json!({}), Some("data.name"));
        assert_eq!(
            f.evaluate(&envelope(json!({"name": "bob"}))).unwrap_err().0,
            "when must be true or false, got a value of type string"
        );
        let f = filter(
            json!({}),
            Some("event.object_id == 12 && data.n.exists(x, x > 2)"),
        );
        assert!(passes(&f, json!({"n": [1, 3]})));
    }

    #[test]
    fn a_when_that_would_fail_on_every_event_is_refused_at_load() {
        let error = |source: &str| When::compile(source).err().unwrap_or_default();
        assert_eq!(
            error("dat.x == 1"),
            "unknown name `dat`: an expression reads `event` and `data` (e.g. data.dat or \
             event.dat)"
        );
        assert!(error("data.items.exists(x, x > y)").contains("unknown name `y`"));
        assert!(error("[1].map(x, x + 1).size() > 0 && x == 1").contains("unknown name `x`"));
        let never = "never true or false (compare it: data.x == 1, size(data.items) > 0)";
        for (source, kind) in [
            ("1 + 1", "a number (or a string or list)"),
            ("'yes'", "a string"),
            ("42", "a number"),
            ("null", "null"),
            ("[data.a]", "a list"),
            ("{'a': data.a}", "a map"),
            ("size(data.items)", "a number"),
            ("string(data.n)", "a string"),
            ("data.a ? 1 : 2", "a number"),
        ] {
            assert_eq!(
                error(source),
                format!("the expression gives {kind}, {never}"),
                "{source}"
            );
        }
        // What may be true or false is taken: fields, macros with their own names,
        // types, and a conditional with a boolean branch.
        for source in [
            "data.active",
            "true",
            "data.items.exists(x, x > 1) && data.m.all(k, k != '')",
            "data.items.filter(i, i > 1).size() > 0",
            "type(data.n) == int || type(data.n) == string",
            "data.a ? data.b : false",
            "has(event.object_id) && event.object_id != ''",
            "google.protobuf.Timestamp == type(data.t) || true",
        ] {
            assert!(When::compile(source).is_ok(), "{source}: {}", error(source));
        }
    }

    #[test]
    fn numbers_keep_their_text_and_compare_by_value() {
        let parse = |text: &str| -> Value { serde_json::from_str(text).unwrap() };
        let data = parse(r#"{"big": 123456789012345678901234567890, "z": -0, "f": 2.50, "u": 7}"#);
        assert!(passes(&filter(json!({"data.z": 0}), None), data.clone()));
        assert!(passes(&filter(json!({"data.f": 2.5}), None), data.clone()));
        assert!(passes(
            &filter(json!({"data.f": "2.5"}), None),
            data.clone()
        ));
        assert!(passes(
            &filter(json!({"data.big": {"gt": 1e29}}), None),
            data.clone()
        ));
        assert!(passes(
            &filter(json!({"data.big": {"regex": "^1234.*890$"}}), None),
            data.clone()
        ));
        let when = |source: &str| filter(json!({}), Some(source));
        assert!(passes(&when("data.big > 1.0e29"), data.clone()));
        assert!(passes(&when("data.u == 7u && data.u == 7"), data.clone()));
        assert!(passes(&when("data.f == 2.5 && data.z == 0"), data.clone()));
        assert!(passes(&when("event.object_id == 12"), data));
    }

    #[test]
    fn arithmetic_on_an_integer_works_whatever_its_sign() {
        let when = |source: &str| filter(json!({}), Some(source));
        let low = when("data.balance + 100 < 0");
        assert!(passes(&low, json!({"balance": -500})));
        for balance in [json!(-5), json!(5)] {
            assert_eq!(
                low.evaluate(&envelope(json!({ "balance": balance }))),
                Ok(Verdict::WhenFalse),
                "{balance}"
            );
        }
        // Past int's range, a uint; a fraction is a double, and takes a double.
        let big = json!({"n": 18_446_744_073_709_551_615_u64});
        assert!(passes(
            &when("data.n == 18446744073709551615u"),
            big.clone()
        ));
        assert!(passes(&when("data.n > 1"), big));
        let fraction = json!({"balance": 5.5});
        assert!(
            when("data.balance + 100 > 0")
                .evaluate(&envelope(fraction.clone()))
                .is_err()
        );
        let converted = when("double(data.balance) + 100.0 > 0.0");
        assert!(passes(&converted, fraction));
        assert!(passes(&converted, json!({"balance": -5})));
        // Comparisons mix the two.
        assert!(passes(&when("data.balance < 0"), json!({"balance": -5.5})));
        assert!(passes(&when("data.balance < 0"), json!({"balance": -5})));
    }

    #[test]
    fn mismatched_types_are_runtime_errors() {
        let f = filter(json!({"data.a": {"lt": 0}}), None);
        assert!(f.evaluate(&envelope(json!({"a": true}))).is_err());
    }
}
