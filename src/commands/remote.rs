//! Subcommands that talk to a running sidecar's admin API: `executions` and
//! `deadletters list|replay|drop`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use serde_json::Value;

use crate::config::Config;

/// Where the sidecar is, and how to talk to it.
pub struct Remote {
    client: reqwest::Client,
    /// `http://host:port`, no trailing slash.
    base: String,
    token: Option<String>,
}

impl Remote {
    /// `url` (`http://host:port` or `unix:/path.sock`) when given, else the listen address
    /// of the config at `config` (the default address when that file does not exist).
    /// `token` when given, else the config's `server.token`.
    pub fn new(url: Option<&str>, config: &Path, token: Option<String>) -> anyhow::Result<Self> {
        let (listen, config_token) = match url {
            Some(url) => (url.to_owned(), None),
            None => match Config::load(config) {
                Ok(c) => (
                    c.server.listen.to_string(),
                    c.server.token.map(|t| t.expose().to_owned()),
                ),
                Err(_) if !config.exists() => (crate::config::DEFAULT_LISTEN.to_owned(), None),
                Err(errors) => anyhow::bail!(
                    "cannot read the listen address from {}: {}; pass --url",
                    config.display(),
                    errors
                        .iter()
                        .next()
                        .map(ToString::to_string)
                        .unwrap_or_default()
                ),
            },
        };
        let _ = rustls::crypto::ring::default_provider().install_default();
        let builder = reqwest::Client::builder()
            .no_proxy()
            .timeout(std::time::Duration::from_secs(30));
        let (builder, base) = match listen.strip_prefix("unix:") {
            Some(path) => (
                builder.unix_socket(Path::new(path)),
                "http://localhost".to_owned(),
            ),
            None if listen.contains("://") => (builder, listen.trim_end_matches('/').to_owned()),
            None => (builder, format!("http://{listen}")),
        };
        Ok(Self {
            client: builder.build().context("cannot build the HTTP client")?,
            base,
            token: token.or(config_token),
        })
    }

    /// Sends a request; the status and the JSON reply.
    async fn send(&self, method: reqwest::Method, path: &str) -> anyhow::Result<(u16, Value)> {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach provisiond at {}: {}; is it running? (see --url)",
                self.base,
                crate::handlers::root_cause(&e)
            )
        })?;
        let status = response.status().as_u16();
        let text = response.text().await.context("cannot read the reply")?;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, value))
    }

    /// Like [`Self::send`], but a non-2xx reply is an error with the reply's message.
    async fn call(&self, method: reqwest::Method, path: &str) -> anyhow::Result<Value> {
        let (status, value) = self.send(method, path).await?;
        if (200..300).contains(&status) {
            return Ok(value);
        }
        let message = value["error"]["message"]
            .as_str()
            .map_or_else(|| value.to_string(), str::to_owned);
        anyhow::bail!("{message} (HTTP {status})")
    }
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

/// Runs a remote subcommand to completion on a small runtime of its own.
fn block_on(work: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("provisiond: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("provisiond: {e:#}");
            ExitCode::FAILURE
        }
    }
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
pub fn executions(remote: anyhow::Result<Remote>, query: ExecutionQuery) -> ExitCode {
    block_on(async move {
        let remote = remote?;
        let q = query_string(&[
            ("event", query.event),
            ("handler", query.handler),
            ("object_id", query.object_id),
            ("outcome", query.outcome),
            ("since", query.since),
            ("limit", query.limit.map(|n| n.to_string())),
        ]);
        let reply = remote
            .call(reqwest::Method::GET, &format!("/v1/executions{q}"))
            .await?;
        if query.json {
            println!("{reply:#}");
            return Ok(());
        }
        for row in reply["executions"].as_array().into_iter().flatten() {
            println!("{}", execution_line(row));
        }
        Ok(())
    })
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
pub fn dead_letters(remote: anyhow::Result<Remote>, command: DeadLetterCommand) -> ExitCode {
    block_on(async move {
        let remote = remote?;
        match command {
            DeadLetterCommand::List {
                handler,
                limit,
                json,
            } => {
                let q = query_string(&[
                    ("handler", handler),
                    ("limit", limit.map(|n| n.to_string())),
                ]);
                let reply = remote
                    .call(reqwest::Method::GET, &format!("/v1/deadletters{q}"))
                    .await?;
                if json {
                    println!("{reply:#}");
                    return Ok(());
                }
                for letter in reply["deadletters"].as_array().into_iter().flatten() {
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
                let reply = remote
                    .call(
                        reqwest::Method::POST,
                        &format!("/v1/deadletters/{id}/replay"),
                    )
                    .await?;
                println!(
                    "dead letter {id} replayed as delivery {}",
                    reply["delivery"].as_u64().unwrap_or(0)
                );
            }
            DeadLetterCommand::Drop { id } => {
                remote
                    .call(reqwest::Method::DELETE, &format!("/v1/deadletters/{id}"))
                    .await?;
                println!("dead letter {id} dropped");
            }
        }
        Ok(())
    })
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
