//! Talking to a running sidecar from the command line (`send`, and the admin commands):
//! where it listens and its token come from the config file unless `--url` says.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use anyhow::Context as _;
use bytes::Bytes;

use crate::config::{Config, ConfigErrors, Listen};
use crate::errln;

/// Where a client command looks for the sidecar when neither `--url` nor a config says:
/// the default `server.listen`.
fn fallback() -> String {
    format!("http://{}", crate::config::defaults::LISTEN)
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

/// Where a client command sends its request: `--url` and `--token`, each optional.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// `http://host:port` or `unix:/path.sock`; the config's `server.listen` when absent.
    pub url: Option<String>,
    /// Sent as `Authorization: Bearer`; the config's `server.token` when absent, but only
    /// to the config's own listener.
    pub token: Option<String>,
    /// Longest a request may take, connecting included; none when absent.
    pub timeout: Option<std::time::Duration>,
    /// The requests need no token (`health`'s `/healthz` and `/readyz`): the config's
    /// is not sent, and nothing is said about not sending it. `token` still goes.
    pub no_token_needed: bool,
}

/// Where the token sent came from, for the hint after a 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenFrom {
    None,
    /// `--token` or `PROVISIOND_CLIENT_TOKEN`.
    Given,
    /// The config's `server.token`.
    Config,
}

/// A client for one running provisiond.
pub struct Remote {
    client: reqwest::Client,
    /// `http://host:port`, no trailing slash.
    base: String,
    /// The address as the user would write it, for messages.
    shown: String,
    token: Option<String>,
    token_from: TokenFrom,
    config: Option<Config>,
    /// The config file whose `server.listen` gave the address (no `--url`).
    listen_of: Option<std::path::PathBuf>,
}

impl Remote {
    /// Uses `target.url` (`http://host:port` or `unix:/path.sock`) when given, else the
    /// listen address of the config at `config_path`. The token is `target.token`, else
    /// the config's, which goes only to the config's own listener: a `--url` elsewhere
    /// gets no token unless `--token` gives one.
    ///
    /// A config that does not load is not fatal (the sidecar may be elsewhere, or the
    /// file not at hand), but it is said, on one line of stderr: without `--url`, with
    /// the address used instead (the default listen address); with `--url`, when the
    /// file exists, as the request then goes without a token.
    pub fn new(config_path: &Path, target: &Target) -> anyhow::Result<Self> {
        let url = target.url.as_deref();
        if let Some(url) = url {
            check_url(url)?;
        }
        // Where the file says the sidecar listens, when the rest of it does not load.
        let mut written = None;
        // A probe given the address takes nothing from the file: not its address, not
        // its token (`health` sends none), so a broken file is none of its business.
        let loaded = if url.is_some() && target.no_token_needed {
            Ok(None)
        } else {
            Config::load(config_path).map(Some)
        };
        let config = match loaded {
            Ok(config) => config,
            Err(errors) => {
                if url.is_none() {
                    written = std::fs::read_to_string(config_path)
                        .ok()
                        .and_then(|text| Listen::written_in(&text))
                        .map(|listen| listener_url(&listen));
                    let (tried, why) = match &written {
                        Some(at) => (at.clone(), "its server.listen, with no token"),
                        None => (fallback(), "the default address"),
                    };
                    errln!(
                        "provisiond: warning: {}; trying {tried}, {why} (give --url to \
                         choose the sidecar)",
                        not_loaded(&errors),
                    );
                } else if config_path.exists() && target.token.is_none() {
                    errln!(
                        "provisiond: warning: {}; sending no token",
                        not_loaded(&errors)
                    );
                }
                None
            }
        };
        let listen = config.as_ref().map(|c| &c.server.listen);
        let configured = config
            .as_ref()
            .and_then(|c| c.server.token.as_ref())
            .map(|t| t.expose().to_owned());
        let from_file = url.is_none() && (listen.is_some() || written.is_some());
        let target_url = match (url, listen) {
            (Some(url), _) => url.to_owned(),
            (None, Some(listen)) => listener_url(listen),
            (None, None) => written.unwrap_or_else(fallback),
        };
        let token = match (&target.token, configured) {
            (Some(given), _) => Some(given.clone()),
            (None, Some(_)) if target.no_token_needed => None,
            (None, Some(token)) => match (url, listen) {
                (None, _) => Some(token),
                (Some(url), Some(listen)) if same_listener(listen, url) => Some(token),
                (Some(url), Some(listen)) => {
                    errln!(
                        "provisiond: note: not sending the config's server.token to {url}: \
                         it is not the config's listener ({listen}); give --token to \
                         authenticate there"
                    );
                    None
                }
                (Some(_), None) => None,
            },
            (None, None) => None,
        };
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder().no_proxy();
        if let Some(timeout) = target.timeout {
            builder = builder.timeout(timeout);
        }
        let (builder, base) = match target_url.strip_prefix("unix:") {
            Some(path) => (
                builder.unix_socket(std::path::PathBuf::from(path)),
                "http://localhost".to_owned(),
            ),
            None => (builder, target_url.trim_end_matches('/').to_owned()),
        };
        Ok(Self {
            client: builder.build().context("cannot build the HTTP client")?,
            base,
            shown: target_url,
            token_from: match (&target.token, &token) {
                (Some(_), _) => TokenFrom::Given,
                (None, Some(_)) => TokenFrom::Config,
                (None, None) => TokenFrom::None,
            },
            token,
            listen_of: from_file.then(|| config_path.to_owned()),
            config,
        })
    }

    /// The config the target came from, when it loaded.
    pub fn config(&self) -> Option<&Config> {
        self.config.as_ref()
    }

    /// The sidecar's address, as given or taken from the config.
    pub fn address(&self) -> &str {
        &self.shown
    }

    /// What to do about a 401 from this sidecar.
    pub fn token_hint(&self) -> String {
        let at = &self.shown;
        match self.token_from {
            TokenFrom::None => format!(
                "the sidecar at {at} wants its server.token; give --token (or \
                 PROVISIOND_CLIENT_TOKEN), or -c with its config"
            ),
            TokenFrom::Given => format!(
                "the sidecar at {at} refused the token given (--token or \
                 PROVISIOND_CLIENT_TOKEN): it is not its server.token"
            ),
            TokenFrom::Config => {
                let file = self
                    .listen_of
                    .as_deref()
                    .map_or_else(String::new, |p| format!(" of {}", p.display()));
                format!(
                    "the sidecar at {at} refused the server.token{file}: it runs with \
                     another (the variable the token comes from differs between its \
                     environment and this shell's, or it has not reloaded the file)"
                )
            }
        }
    }

    /// Sends a request; returns the status and the body text.
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Bytes>,
    ) -> anyhow::Result<(u16, String)> {
        let response = self.response(method, path, body).await?;
        let status = response.status().as_u16();
        let text = response.text().await.context("cannot read the reply")?;
        Ok((status, text))
    }

    /// Sends a request; the reply with its body still to read, for a caller that wants
    /// its headers.
    pub async fn response(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Bytes>,
    ) -> anyhow::Result<reqwest::Response> {
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
        let response = request.send().await.map_err(|e| {
            // Nobody at the file's address: the sidecar may still run on the address
            // it started with, as a changed listen waits for a restart.
            let hint = match &self.listen_of {
                Some(path) if e.is_connect() => format!(
                    " (the server.listen of {}: is provisiond running? A changed \
                     listen applies at restart; until then give --url with the address it \
                     runs on)",
                    path.display()
                ),
                _ => String::new(),
            };
            let why = if e.is_timeout() {
                "no answer in time".to_owned()
            } else {
                format!("{:#}", anyhow::Error::from(e))
            };
            anyhow::anyhow!("cannot reach provisiond at {}: {why}{hint}", self.shown)
        })?;
        Ok(response)
    }
}

/// `--url`: a form the client can use, else an error saying which forms are.
fn check_url(url: &str) -> anyhow::Result<()> {
    if let Some(path) = url.strip_prefix("unix:") {
        if path.is_empty() {
            anyhow::bail!("--url \"unix:\" needs a socket path, e.g. unix:/run/provisiond.sock");
        }
        return Ok(());
    }
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => Ok(()),
        _ => anyhow::bail!(
            "--url {url:?} is not a sidecar address; write http://host:port (e.g. \
             http://127.0.0.1:8600) or unix:/path.sock"
        ),
    }
}

/// The URL that reaches `listen` from this host: an unspecified address (`0.0.0.0`,
/// `[::]`) is reached on loopback.
fn listener_url(listen: &Listen) -> String {
    match listen {
        Listen::Unix(path) => format!("unix:{}", path.display()),
        Listen::Tcp(addr) => {
            let mut addr = *addr;
            match addr.ip() {
                IpAddr::V4(ip) if ip.is_unspecified() => addr.set_ip(Ipv4Addr::LOCALHOST.into()),
                IpAddr::V6(ip) if ip.is_unspecified() => addr.set_ip(Ipv6Addr::LOCALHOST.into()),
                _ => {}
            }
            format!("http://{addr}")
        }
    }
}

/// Whether `url` reaches the listener `listen` of this host: the same socket path, or
/// plain HTTP to the same port on the same address (loopback, or `localhost`, for a
/// listener on an unspecified address).
fn same_listener(listen: &Listen, url: &str) -> bool {
    match listen {
        Listen::Unix(path) => url
            .strip_prefix("unix:")
            .is_some_and(|p| Path::new(p) == path),
        Listen::Tcp(addr) => {
            let Ok(parsed) = reqwest::Url::parse(url) else {
                return false;
            };
            if parsed.scheme() != "http" || parsed.port_or_known_default() != Some(addr.port()) {
                return false;
            }
            let listening = addr.ip();
            let Some(host) = parsed.host_str() else {
                return false;
            };
            if host == "localhost" {
                return listening.is_loopback() || listening.is_unspecified();
            }
            let host = host.trim_start_matches('[').trim_end_matches(']');
            host.parse::<IpAddr>()
                .is_ok_and(|ip| ip == listening || (listening.is_unspecified() && ip.is_loopback()))
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(text: &str) -> Listen {
        Listen::Tcp(text.parse().unwrap())
    }

    #[test]
    fn the_configs_listener_is_recognised_and_nothing_else() {
        let local = tcp("127.0.0.1:8600");
        for url in [
            "http://127.0.0.1:8600",
            "http://127.0.0.1:8600/",
            "http://localhost:8600",
        ] {
            assert!(same_listener(&local, url), "{url}");
        }
        for url in [
            "http://127.0.0.1:8601",
            "https://127.0.0.1:8600",
            "http://10.0.0.5:8600",
            "http://127.0.0.1.evil.example:8600",
            "http://crm.example:8600",
            "http://127.0.0.1",
            "unix:/run/provisiond.sock",
        ] {
            assert!(!same_listener(&local, url), "{url}");
        }
        let any = tcp("0.0.0.0:8600");
        assert!(same_listener(&any, "http://127.0.0.1:8600"));
        assert!(!same_listener(&any, "http://192.0.2.7:8600"));
        let v6 = tcp("[::]:8600");
        assert!(same_listener(&v6, "http://[::1]:8600"));
        let unix = Listen::Unix("/run/p.sock".into());
        assert!(same_listener(&unix, "unix:/run/p.sock"));
        assert!(!same_listener(&unix, "unix:/tmp/p.sock"));
        assert!(!same_listener(&unix, "http://127.0.0.1:8600"));
    }

    #[test]
    fn an_unspecified_listener_is_reached_on_loopback() {
        assert_eq!(listener_url(&tcp("0.0.0.0:8600")), "http://127.0.0.1:8600");
        assert_eq!(listener_url(&tcp("[::]:8600")), "http://[::1]:8600");
        assert_eq!(listener_url(&tcp("10.1.2.3:80")), "http://10.1.2.3:80");
    }

    #[test]
    fn urls_are_checked() {
        assert!(check_url("http://127.0.0.1:8600").is_ok());
        assert!(check_url("unix:/run/p.sock").is_ok());
        let e = check_url("127.0.0.1:8600").unwrap_err().to_string();
        assert!(e.contains("write http://host:port"), "{e}");
        assert!(check_url("unix:").is_err());
    }
}
