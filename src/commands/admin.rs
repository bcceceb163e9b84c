//! `provisiond executions`, `provisiond deadletters list|replay|drop` and `provisiond
//! health`: the admin routes from the command line, through [`crate::remote::Remote`].

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::api::{self, DeadLetters, ExecutionRow, Executions};
use crate::remote::{Remote, Target};
use crate::{errln, outln};

/// Sends a request; the JSON reply, or an error with the server's message for a
/// non-2xx reply.
async fn call(
    remote: &Remote,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let body = body.map(|b| bytes::Bytes::from(b.to_string()));
    let (status, text) = remote.request(method, path, body).await?;
    reply_of(remote, status, text)
}

/// A reply's JSON, or an error with the server's message for a non-2xx status.
fn reply_of(remote: &Remote, status: u16, text: String) -> anyhow::Result<Value> {
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if (200..300).contains(&status) {
        return Ok(value);
    }
    let message = match serde_json::from_value::<api::ErrorReply>(value.clone()) {
        Ok(reply) => reply.error.message,
        Err(_) => value.to_string(),
    };
    if status == 401 {
        anyhow::bail!("{message} (HTTP 401): {}", remote.token_hint())
    }
    anyhow::bail!("{message} (HTTP {status})")
}

/// How a command prints what it got.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns under a header row.
    #[default]
    Table,
    /// The reply as JSON (`executions --follow`: one row per line).
    Json,
}

/// `provisiond executions`: filters as the endpoint takes them.
#[derive(Debug, Default, Clone)]
pub struct ExecutionQuery {
    pub event: Option<String>,
    pub handler: Option<String>,
    pub object_id: Option<String>,
    pub outcome: Option<String>,
    pub since: Option<String>,
    /// The event id the billing got back in `X-Provisioning-Event-Id`.
    pub event_id: Option<String>,
    pub limit: Option<usize>,
    /// Keep printing new rows as they come.
    pub follow: bool,
    pub output: Output,
}

/// Which dead letters `deadletters replay|drop` takes: one id, a filter, or `--all`.
#[derive(Debug, Default, Clone)]
pub struct Selection {
    pub id: Option<u64>,
    pub handler: Option<String>,
    pub event: Option<String>,
    pub object_id: Option<String>,
    pub entity: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub all: bool,
}

impl Selection {
    /// The filter body of `POST /v1/deadletters/replay|drop`.
    fn body(&self) -> Value {
        let body = api::Selection {
            handler: self.handler.clone(),
            event: self.event.clone(),
            object_id: self.object_id.clone(),
            entity: self.entity.clone(),
            since: self.since.clone(),
            until: self.until.clone(),
            all: self.all,
        };
        serde_json::to_value(body).expect("a selection serialises")
    }
}

/// `provisiond deadletters ...`
#[derive(Debug, Clone)]
pub enum DeadLetterCommand {
    List {
        /// The filters (`id` and `all` unused).
        filters: Selection,
        after: Option<u64>,
        limit: Option<usize>,
        output: Output,
    },
    Replay(Selection),
    Drop(Selection),
}

fn query_string(pairs: &[(&str, Option<String>)]) -> String {
    let mut url = reqwest::Url::parse("http://x/").expect("a valid URL");
    {
        let mut q = url.query_pairs_mut();
        for (k, v) in pairs {
            if let Some(v) = v {
                q.append_pair(k, v);
            }
        }
    }
    match url.query() {
        Some(q) if !q.is_empty() => format!("?{q}"),
        _ => String::new(),
    }
}

/// How often `executions --follow` asks for new rows.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);
/// Rows `--follow` starts with when `--limit` does not say.
const FOLLOW_FIRST: usize = 20;
/// How late a row may show up behind rows with higher ids and still be printed by
/// `--follow`. On PostgreSQL a row's id is taken when it is written and the row is seen
/// when its transaction commits, so another sidecar's row can appear after newer ones.
const FOLLOW_LATE: Duration = Duration::from_secs(5);

/// `provisiond executions`.
pub async fn executions(
    config: &Path,
    target: &Target,
    query: ExecutionQuery,
) -> anyhow::Result<ExitCode> {
    let remote = Remote::new(config, target)?;
    let path = |limit: Option<usize>, after: Option<u64>| {
        let q = query_string(&[
            ("event", query.event.clone()),
            ("handler", query.handler.clone()),
            ("object_id", query.object_id.clone()),
            ("outcome", query.outcome.clone()),
            ("event_id", query.event_id.clone()),
            ("since", query.since.clone()),
            ("after", after.map(|n| n.to_string())),
            ("limit", limit.map(|n| n.to_string())),
        ]);
        format!("/v1/executions{q}")
    };
    let first_limit = match (query.limit, query.follow) {
        (None, true) => Some(FOLLOW_FIRST),
        (limit, _) => limit,
    };
    let reply = call(
        &remote,
        reqwest::Method::GET,
        &path(first_limit, None),
        None,
    )
    .await?;
    if !query.follow && query.output == Output::Json {
        outln!("{reply:#}");
        return Ok(ExitCode::SUCCESS);
    }
    let rows = read::<Executions>(reply)?.executions;
    if !query.follow {
        if rows.is_empty() {
            // On stderr, like the warnings: stdout holds rows only, for scripts.
            errln!("no executions match");
        } else {
            outln!("{}", execution_header());
        }
        for row in &rows {
            outln!("{}", execution_line(row));
        }
        return Ok(ExitCode::SUCCESS);
    }
    // Following: oldest first, like `tail -f`, then whatever comes after the last row.
    let mut window = Window::start(&rows);
    let mut printer = Follower::new(query.output);
    printer.print(&rows);
    // A sidecar that goes away (a restart, a deploy) is waited for, said once; a request
    // it refuses (a bad filter, a wrong token) ends the command, as does a stdout that is
    // gone (`| head` has read enough): seen at the first rows printed after it went.
    let mut away = false;
    while !crate::stdio::stdout_gone() {
        tokio::time::sleep(FOLLOW_EVERY).await;
        // Back from away, ask for the newest rows, not those after the last id: after a
        // crash the store restarts from its last durable commit, so row ids seen before
        // may be given again to new rows. The printer skips the rows it has printed.
        let after = (!away).then_some(window.after);
        let asked = remote
            .request(reqwest::Method::GET, &path(Some(1000), after), None)
            .await;
        let reply = match asked {
            Ok((503, _)) | Err(_) if away => continue,
            Ok((503, _)) => {
                errln!(
                    "provisiond: {} answers 503; still following",
                    remote.address()
                );
                away = true;
                continue;
            }
            Err(e) => {
                errln!("provisiond: {e:#}; still following");
                away = true;
                continue;
            }
            Ok((status, text)) => reply_of(&remote, status, text)?,
        };
        let rows = read::<Executions>(reply)?.executions;
        if away {
            errln!("provisiond: {} answers again", remote.address());
            away = false;
            // The newest rows there are now are where to go on from, even if they are
            // older than the last one printed (which the crash took); of them, only
            // those written since the last one printed are new to the reader.
            window = Window::start(&rows);
            printer.skip_older_than_the_last_printed();
        } else {
            window.polled(&rows);
        }
        printer.print(&rows);
    }
    Ok(ExitCode::SUCCESS)
}

/// Which rows `--follow` asks for: those after the newest id it had seen
/// [`FOLLOW_LATE`] ago, not after the newest it has seen, so that a row committed late
/// with a lower id is still found. The rows asked for again are skipped by the printer.
struct Window {
    /// The `after` of the next poll.
    after: u64,
    /// The newest id seen at each poll of the last [`FOLLOW_LATE`], oldest first.
    newest: std::collections::VecDeque<(std::time::Instant, u64)>,
}

impl Window {
    /// From the first rows (newest first): they are asked for again until they are
    /// [`FOLLOW_LATE`] old, as is anything between them.
    fn start(rows: &[ExecutionRow]) -> Self {
        let mut window = Self {
            after: rows.last().map_or(0, |r| r.id.saturating_sub(1)),
            newest: Default::default(),
        };
        window.polled(rows);
        window
    }

    /// After a poll: remembers its newest id, and moves `after` up to the newest id of
    /// the polls older than [`FOLLOW_LATE`].
    fn polled(&mut self, rows: &[ExecutionRow]) {
        let now = std::time::Instant::now();
        let seen = self.newest.back().map_or(0, |&(_, id)| id);
        let newest = rows.first().map_or(seen, |r| r.id.max(seen));
        if newest > self.after {
            self.newest.push_back((now, newest));
        }
        while let Some(&(at, id)) = self.newest.front()
            && now.duration_since(at) >= FOLLOW_LATE
        {
            self.after = self.after.max(id);
            self.newest.pop_front();
        }
    }
}

/// What `executions --follow` prints: each row once (by id, time and handler), oldest
/// first, under one header.
struct Follower {
    output: Output,
    header: bool,
    printed: std::collections::HashSet<String>,
    order: std::collections::VecDeque<String>,
    /// The time of the newest row printed.
    latest: Option<String>,
    /// Rows older than this are not printed: set when the sidecar is back from away,
    /// so that the history before the rows first printed (`--limit`) stays unprinted.
    floor: Option<String>,
}

impl Follower {
    /// Rows remembered, to skip those a poll brings again: those of the last
    /// [`FOLLOW_LATE`] (at most 1,000 a poll), and those a poll after a restart brings.
    const REMEMBER: usize = 16_384;

    fn new(output: Output) -> Self {
        Self {
            output,
            header: false,
            printed: Default::default(),
            order: Default::default(),
            latest: None,
            floor: None,
        }
    }

    /// From now on, prints no row older than the newest printed so far. Times are the
    /// API's RFC 3339 in UTC with milliseconds, so they compare as text.
    fn skip_older_than_the_last_printed(&mut self) {
        self.floor = self.latest.clone().or(self.floor.take());
    }

    /// Prints `rows` (newest first, as the endpoint gives them) oldest first.
    fn print(&mut self, rows: &[ExecutionRow]) {
        for row in rows.iter().rev() {
            if self.floor.as_ref().is_some_and(|floor| row.time < *floor) {
                continue;
            }
            if self.latest.as_ref().is_none_or(|latest| row.time > *latest) {
                self.latest = Some(row.time.clone());
            }
            let key = format!("{}|{}|{}", row.id, row.time, row.handler);
            if !self.printed.insert(key.clone()) {
                continue;
            }
            self.order.push_back(key);
            if self.order.len() > Self::REMEMBER
                && let Some(old) = self.order.pop_front()
            {
                self.printed.remove(&old);
            }
            if self.output == Output::Json {
                outln!("{}", serde_json::to_string(row).expect("a row serialises"));
                continue;
            }
            if !self.header {
                outln!("{}", execution_header());
                self.header = true;
            }
            outln!("{}", execution_line(row));
        }
    }
}

/// A reply read as the API's type.
fn read<T: DeserializeOwned>(reply: Value) -> anyhow::Result<T> {
    serde_json::from_value(reply).map_err(|e| anyhow::anyhow!("unexpected reply: {e}"))
}

/// The names of [`execution_line`]'s columns, aligned with them.
fn execution_header() -> String {
    format!(
        "{:<24}  {:<6} {:<20} {:<30} {:<8} {:<4} {:<9} {:>4} {:>10}  {}",
        "TIME",
        "STAGE",
        "HANDLER",
        "EVENT",
        "OBJECT",
        "TRY",
        "OUTCOME",
        "CODE",
        "DURATION",
        "DETAIL"
    )
}

/// One execution log row on one line.
fn execution_line(row: &ExecutionRow) -> String {
    let code = row.code.map_or("-".into(), |c| c.to_string());
    let stage = row.stage.as_str();
    let detail = one_line(
        row.error
            .as_deref()
            .or_else(|| Some(row.excerpt.as_str()).filter(|e| !e.is_empty()))
            .unwrap_or(""),
    );
    format!(
        "{:<24}  {:<6} {:<20} {:<30} {:<8} #{:<3} {:<9} {:>4} {:>8.1}ms  {}",
        row.time,
        stage,
        row.handler,
        row.event,
        row.object_id,
        row.attempt,
        row.outcome,
        code,
        row.duration_ms,
        detail
    )
    .trim_end()
    .to_owned()
}

/// A handler's text (a reply, a script's stderr) for one line of a table: line breaks
/// and tabs become spaces, other control characters are shown escaped (`\u{1b}`), so
/// that a CR cannot overwrite the row, nor an escape sequence reach the terminal.
fn one_line(text: &str) -> String {
    let mut line = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' | '\r' | '\t' => line.push(' '),
            c if c.is_control() => line.extend(c.escape_unicode()),
            c => line.push(c),
        }
    }
    line
}

/// The names of [`dead_letter_line`]'s columns, aligned with them.
fn dead_letter_header() -> String {
    format!(
        "{:<6} {:<24}  {:<20} {:<30} {:<8} {:>8}  {}",
        "ID", "DIED", "HANDLER", "EVENT", "OBJECT", "ATTEMPTS", "REASON"
    )
}

/// One dead letter on one line.
fn dead_letter_line(letter: &api::DeadLetterRow) -> String {
    format!(
        "{:<6} {:<24}  {:<20} {:<30} {:<8} {:>8}  {}",
        letter.id,
        letter.died_at,
        letter.handler,
        letter.event,
        letter.object_id,
        letter.attempts,
        one_line(&letter.reason)
    )
    .trim_end()
    .to_owned()
}

/// `provisiond deadletters list|replay|drop`.
pub async fn dead_letters(
    config: &Path,
    target: &Target,
    command: DeadLetterCommand,
) -> anyhow::Result<ExitCode> {
    let remote = Remote::new(config, target)?;
    match command {
        DeadLetterCommand::List {
            filters,
            after,
            limit,
            output,
        } => {
            let filtered = filters.handler.is_some()
                || filters.event.is_some()
                || filters.object_id.is_some()
                || filters.entity.is_some()
                || filters.since.is_some()
                || filters.until.is_some()
                || after.is_some();
            let q = query_string(&[
                ("handler", filters.handler),
                ("event", filters.event),
                ("object_id", filters.object_id),
                ("entity", filters.entity),
                ("since", filters.since),
                ("until", filters.until),
                ("after", after.map(|n| n.to_string())),
                ("limit", limit.map(|n| n.to_string())),
            ]);
            let path = format!("/v1/deadletters{q}");
            let reply = call(&remote, reqwest::Method::GET, &path, None).await?;
            if output == Output::Json {
                outln!("{reply:#}");
                return Ok(ExitCode::SUCCESS);
            }
            let page = read::<DeadLetters>(reply)?;
            let letters = page.deadletters;
            if letters.is_empty() {
                errln!(
                    "{}",
                    if filtered {
                        "no dead letters match"
                    } else {
                        "no dead letters"
                    }
                );
            }
            if !letters.is_empty() {
                outln!("{}", dead_letter_header());
            }
            for letter in &letters {
                outln!("{}", dead_letter_line(letter));
            }
            if let Some(last) = letters.last().filter(|_| page.more) {
                errln!(
                    "more dead letters match: --after {} for the next ones",
                    last.id
                );
            }
        }
        DeadLetterCommand::Replay(Selection { id: Some(id), .. }) => {
            let path = format!("/v1/deadletters/{id}/replay");
            let reply = call(&remote, reqwest::Method::POST, &path, None).await?;
            let replayed = read::<api::ReplayedOne>(reply)?;
            outln!(
                "dead letter {id} replayed as delivery {}",
                replayed.delivery
            );
        }
        DeadLetterCommand::Drop(Selection { id: Some(id), .. }) => {
            let path = format!("/v1/deadletters/{id}");
            call(&remote, reqwest::Method::DELETE, &path, None).await?;
            outln!("dead letter {id} dropped");
        }
        DeadLetterCommand::Replay(selection) => {
            let path = "/v1/deadletters/replay";
            let reply = call(&remote, reqwest::Method::POST, path, Some(selection.body())).await?;
            let reply = read::<api::ReplayedMatching>(reply)?;
            let n = reply.replayed;
            outln!("{n} dead letter{} replayed", plural(n));
            if let Some(message) = reply.message {
                errln!("provisiond: {message}");
            }
            // Some of what the filters took was left in place: not all done, as a
            // script running this must be able to tell.
            if reply.skipped > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        DeadLetterCommand::Drop(selection) => {
            let path = "/v1/deadletters/drop";
            let reply = call(&remote, reqwest::Method::POST, path, Some(selection.body())).await?;
            let reply = read::<api::DroppedMatching>(reply)?;
            let n = reply.dropped;
            outln!("{n} dead letter{} dropped", plural(n));
            if let Some(message) = reply.message {
                errln!("provisiond: {message}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// `provisiond health [--ready]`: exit 0 when the sidecar answers `/healthz` (with
/// `--ready`, `/readyz`) with 200, else 1 with the reason on stderr.
pub async fn health(config: &Path, target: &Target, ready: bool) -> anyhow::Result<ExitCode> {
    let remote = Remote::new(config, target)?;
    let path = if ready { "/readyz" } else { "/healthz" };
    let (status, text) = remote.request(reqwest::Method::GET, path, None).await?;
    if status == 200 {
        match serde_json::from_str::<api::Ready>(&text) {
            Ok(reply) if ready => outln!(
                "ready: config generation {}, store {}",
                reply.generation,
                reply.store
            ),
            _ => outln!("ok"),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let why = serde_json::from_str::<api::ErrorReply>(&text)
        .map_or_else(|_| text.trim().to_owned(), |reply| reply.error.message);
    errln!(
        "provisiond: {} at {}: {why} (HTTP {status})",
        if ready { "not ready" } else { "not healthy" },
        remote.address()
    );
    Ok(ExitCode::FAILURE)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn query_strings_skip_missing_filters_and_encode() {
        assert_eq!(query_string(&[("a", None)]), "");
        assert_eq!(
            query_string(&[("since", Some("2026-11-26T10:00:00Z".into())), ("x", None)]),
            "?since=2026-11-26T10%3A00%3A00Z"
        );
    }

    #[test]
    fn a_row_reads_on_one_line_under_its_header() {
        let row = json!({"id": 7, "time": "2026-11-26T10:00:00.000Z", "stage": "after",
            "handler": "crm", "event": "clients.create", "object_id": "12", "attempt": 2,
            "outcome": "failed", "code": 503, "duration_ms": 1.25, "error": "HTTP status 503"});
        let line = execution_line(&serde_json::from_value(row).unwrap());
        assert!(
            line.starts_with("2026-11-26T10:00:00.000Z  after  crm"),
            "{line}"
        );
        assert!(line.ends_with("503      1.2ms  HTTP status 503"), "{line}");
        let header = execution_header();
        for (column, value) in [
            ("STAGE", "after"),
            ("HANDLER", "crm"),
            ("EVENT", "clients.create"),
            ("TRY", "#2"),
            ("OUTCOME", "failed"),
            ("DETAIL", "HTTP status 503"),
        ] {
            assert_eq!(
                header.find(column),
                line.find(value),
                "{column}\n{header}\n{line}"
            );
        }
    }

    #[test]
    fn a_dead_letter_reads_on_one_line_under_its_header() {
        let letter = json!({"id": 41, "handler": "crm", "event": "clients.create",
            "object_id": "12", "entity": "clients/12", "attempts": 25,
            "reason": "handler answered 410 Gone:\nno such client",
            "enqueued_at": "2026-11-26T09:00:00.000Z", "died_at": "2026-11-26T10:00:00.000Z",
            "message_id": "msg_1", "envelope": {}});
        let line = dead_letter_line(&serde_json::from_value(letter).unwrap());
        assert!(
            line.starts_with("41     2026-11-26T10:00:00.000Z  crm"),
            "{line}"
        );
        assert!(line.ends_with("410 Gone: no such client"), "{line}");
        let header = dead_letter_header();
        for (column, value) in [
            ("DIED", "2026-11-26"),
            ("HANDLER", "crm"),
            ("EVENT", "clients.create"),
            ("OBJECT", "12 "),
            ("REASON", "handler answered"),
        ] {
            assert_eq!(
                header.find(column),
                line.find(value),
                "{column}\n{header}\n{line}"
            );
        }
        // ATTEMPTS is right-aligned, as the numbers under it.
        let end = |text: &str, what: &str| text.find(what).map(|at| at + what.len());
        assert_eq!(
            end(&header, "ATTEMPTS"),
            end(&line, "25"),
            "{header}\n{line}"
        );
    }

    #[test]
    fn a_selection_sends_only_what_was_given() {
        let all = Selection {
            all: true,
            ..Default::default()
        };
        assert_eq!(all.body(), json!({"all": true}));
        let some = Selection {
            handler: Some("crm".into()),
            since: Some("1h".into()),
            ..Default::default()
        };
        assert_eq!(some.body(), json!({"handler": "crm", "since": "1h"}));
    }
}
