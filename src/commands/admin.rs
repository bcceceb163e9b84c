//! `provisiond executions` and `provisiond deadletters list|replay|drop`: the store's
//! admin routes from the command line, through [`crate::remote::Remote`].

use std::path::Path;
use std::process::ExitCode;

use serde_json::Value;

use crate::remote::Remote;

/// Sends a request; the JSON reply, or an error with the server's message for a
/// non-2xx reply.
async fn call(remote: &Remote, method: reqwest::Method, path: &str) -> anyhow::Result<Value> {
    let (status, text) = remote.request(method, path, None).await?;
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if (200..300).contains(&status) {
        return Ok(value);
    }
    let message = value["error"]["message"]
        .as_str()
        .map_or_else(|| value.to_string(), str::to_owned);
    anyhow::bail!("{message} (HTTP {status})")
}

/// `provisiond executions`: filters as the endpoint takes them.
#[derive(Debug, Default, Clone)]
pub struct ExecutionQuery {
    pub event: Option<String>,
    pub handler: Option<String>,
    pub object_id: Option<String>,
    pub outcome: Option<String>,
    pub since: Option<String>,
    pub limit: Option<usize>,
    /// Print the reply as JSON instead of lines.
    pub json: bool,
}

/// `provisiond deadletters ...`
#[derive(Debug, Clone)]
pub enum DeadLetterCommand {
    List {
        handler: Option<String>,
        limit: Option<usize>,
        json: bool,
    },
    Replay {
        id: u64,
    },
    Drop {
        id: u64,
    },
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

/// `provisiond executions`.
pub async fn executions(
    config: &Path,
    url: Option<&str>,
    query: ExecutionQuery,
) -> anyhow::Result<ExitCode> {
    let remote = Remote::new(config, url)?;
    {
        let q = query_string(&[
            ("event", query.event),
            ("handler", query.handler),
            ("object_id", query.object_id),
            ("outcome", query.outcome),
            ("since", query.since),
            ("limit", query.limit.map(|n| n.to_string())),
        ]);
        let reply = call(&remote, reqwest::Method::GET, &format!("/v1/executions{q}")).await?;
        if query.json {
            println!("{reply:#}");
            return Ok(ExitCode::SUCCESS);
        }
        let rows = reply["executions"]
            .as_array()
            .map_or(&[][..], Vec::as_slice);
        if rows.is_empty() {
            // On stderr, like the warnings: stdout holds rows only, for scripts.
            eprintln!("no executions match");
        }
        for row in rows {
            println!("{}", execution_line(row));
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// One execution log row on one line.
fn execution_line(row: &Value) -> String {
    let s = |k: &str| row[k].as_str().unwrap_or("-").to_owned();
    let code = row["code"].as_i64().map_or("-".into(), |c| c.to_string());
    let detail = row["error"]
        .as_str()
        .or_else(|| row["excerpt"].as_str().filter(|e| !e.is_empty()))
        .unwrap_or("")
        .replace('\n', " ");
    format!(
        "{}  {:<6} {:<20} {:<30} {:<8} #{:<3} {:<9} {:>4} {:>8.1}ms  {}",
        s("time"),
        s("stage"),
        s("handler"),
        s("event"),
        s("object_id"),
        row["attempt"].as_u64().unwrap_or(0),
        s("outcome"),
        code,
        row["duration_ms"].as_f64().unwrap_or(0.0),
        detail
    )
    .trim_end()
    .to_owned()
}

/// `provisiond deadletters list|replay|drop`.
pub async fn dead_letters(
    config: &Path,
    url: Option<&str>,
    command: DeadLetterCommand,
) -> anyhow::Result<ExitCode> {
    let remote = Remote::new(config, url)?;
    {
        match command {
            DeadLetterCommand::List {
                handler,
                limit,
                json,
            } => {
                let filtered = handler.is_some();
                let q = query_string(&[
                    ("handler", handler),
                    ("limit", limit.map(|n| n.to_string())),
                ]);
                let reply = call(
                    &remote,
                    reqwest::Method::GET,
                    &format!("/v1/deadletters{q}"),
                )
                .await?;
                if json {
                    println!("{reply:#}");
                    return Ok(ExitCode::SUCCESS);
                }
                let letters = reply["deadletters"]
                    .as_array()
                    .map_or(&[][..], Vec::as_slice);
                if letters.is_empty() {
                    eprintln!(
                        "{}",
                        if filtered {
                            "no dead letters match"
                        } else {
                            "no dead letters"
                        }
                    );
                }
                for letter in letters {
                    let s = |k: &str| letter[k].as_str().unwrap_or("-").to_owned();
                    println!(
                        "{:<6} {}  {:<20} {:<30} {:<8} attempts {:<3} {}",
                        letter["id"].as_u64().unwrap_or(0),
                        s("died_at"),
                        s("handler"),
                        s("event"),
                        s("object_id"),
                        letter["attempts"].as_u64().unwrap_or(0),
                        s("reason").replace('\n', " ")
                    );
                }
            }
            DeadLetterCommand::Replay { id } => {
                let path = format!("/v1/deadletters/{id}/replay");
                let reply = call(&remote, reqwest::Method::POST, &path).await?;
                println!(
                    "dead letter {id} replayed as delivery {}",
                    reply["delivery"].as_u64().unwrap_or(0)
                );
            }
            DeadLetterCommand::Drop { id } => {
                let path = format!("/v1/deadletters/{id}");
                call(&remote, reqwest::Method::DELETE, &path).await?;
                println!("dead letter {id} dropped");
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

#[cfg(test)]
mod tests {
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
    fn a_row_reads_on_one_line() {
        let row = serde_json::json!({"time": "2026-11-26T10:00:00.000Z", "stage": "after",
            "handler": "crm", "event": "clients.create", "object_id": "12", "attempt": 2,
            "outcome": "failed", "code": 503, "duration_ms": 1.25, "error": "HTTP status 503"});
        let line = execution_line(&row);
        assert!(
            line.starts_with("2026-11-26T10:00:00.000Z  after  crm"),
            "{line}"
        );
        assert!(line.ends_with("503      1.2ms  HTTP status 503"), "{line}");
    }
}
