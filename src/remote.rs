//! Talking to a running sidecar from the command line (`send`, and the admin commands):
//! where it listens and its token come from the config file unless `--url` says.

use std::path::Path;

use anyhow::Context as _;
use bytes::Bytes;

use crate::config::{Config, ConfigErrors, Listen};

/// Where a client command looks for the sidecar when neither `--url` nor a config says:
/// the default `server.listen`.
fn fallback() -> String {
    format!("http://{}", crate::config::DEFAULT_LISTEN)
}

/// "cannot load the config: FILE:LINE:COL: ...", the first error on one line, and how
/// many more there are.
fn not_loaded(errors: &ConfigErrors) -> String {
    let first = errors
        .iter()
        .next()
        .map_or_else(String::new, |e| e.to_string().replace('\n', " "));
    let more = match errors.len() {
        0 | 1 => String::new(),
        n => format!(" (and {} more; `provisiond check` lists them)", n - 1),
    };
    format!("cannot load the config: {first}{more}")
}

/// A client for one running provisiond.
pub struct Remote {
    client: reqwest::Client,
    /// `http://host:port`, no trailing slash.
    base: String,
    token: Option<String>,
}

impl Remote {
    /// Uses `url` (`http://host:port` or `unix:/path.sock`) when given, else the listen
    /// address of the config at `config_path`. The token comes from that config.
    ///
    /// A config that does not load is not fatal (the sidecar may be elsewhere, or the
    /// file not at hand), but it is said, on one line of stderr: without `--url`, with
    /// the address used instead (the default listen address); with `--url`, when the file exists, as
    /// the request then goes without a token.
    pub fn new(config_path: &Path, url: Option<&str>) -> anyhow::Result<Self> {
        let config = match Config::load(config_path) {
            Ok(config) => Some(config),
            Err(errors) => {
                if url.is_none() {
                    eprintln!(
                        "provisiond: warning: {}; trying {} (give --url to choose the \
                         sidecar)",
                        not_loaded(&errors),
                        fallback()
                    );
                } else if config_path.exists() {
                    eprintln!(
                        "provisiond: warning: {}; sending no token",
                        not_loaded(&errors)
                    );
                }
                None
            }
        };
        let token = config
            .as_ref()
            .and_then(|c| c.server.token.as_ref())
            .map(|t| t.expose().to_owned());
        let target = match url {
            Some(url) => url.to_owned(),
            None => match config.as_ref().map(|c| &c.server.listen) {
                Some(Listen::Unix(path)) => format!("unix:{}", path.display()),
                Some(Listen::Tcp(addr)) => format!("http://{addr}"),
                None => fallback(),
            },
        };
        let _ = rustls::crypto::ring::default_provider().install_default();
        let builder = reqwest::Client::builder().no_proxy();
        let (builder, base) = match target.strip_prefix("unix:") {
            Some(path) => (
                builder.unix_socket(std::path::PathBuf::from(path)),
                "http://localhost".to_owned(),
            ),
            None => (builder, target.trim_end_matches('/').to_owned()),
        };
        Ok(Self {
            client: builder.build().context("cannot build the HTTP client")?,
            base,
            token,
        })
    }

    /// Sends a request; returns the status and the body text.
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Bytes>,
    ) -> anyhow::Result<(u16, String)> {
        let url = format!("{}{path}", self.base);
        let mut request = self.client.request(method, &url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach provisiond at {}", self.base))?;
        let status = response.status().as_u16();
        let text = response.text().await.context("cannot read the reply")?;
        Ok((status, text))
    }
}

/// An envelope as the billing would send it, dated now.
pub fn envelope(event: &str, object_id: i64, data: serde_json::Value) -> serde_json::Value {
    let dt = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    serde_json::json!({
        "event": {"dt": dt, "events_id": event, "object_id": object_id},
        "data": data,
    })
}

/// Reads JSON from a file, or from stdin for `-`.
pub fn read_json(source: &str) -> anyhow::Result<serde_json::Value> {
    let text = if source == "-" {
        std::io::read_to_string(std::io::stdin()).context("cannot read stdin")?
    } else {
        std::fs::read_to_string(source).with_context(|| format!("cannot read {source}"))?
    };
    serde_json::from_str(&text).with_context(|| format!("{source} is not JSON"))
}
