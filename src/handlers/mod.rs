//! Calling handlers: HTTP webhooks ([`http`]) and local scripts ([`exec`]).
//!
//! This module only makes the call and reports what came back ([`Reply`]) or why nothing
//! usable did ([`CallError`]). What a reply *means* (allow, deny, retry, dead letter)
//! depends on the stage and is decided by the caller: [`crate::dispatch`] for the before
//! stage, the delivery workers for the after stage.

pub(crate) mod exec;
pub(crate) mod http;
mod tls;

use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::config::{Handler, Target};

/// Largest HTTP reply body or script stdout read; the rest is discarded.
pub(crate) const REPLY_CAP: usize = 4 << 20;
/// How much of a script's stderr is kept (its end).
pub(crate) const STDERR_CAP: usize = 64 << 10;
/// Length of reply excerpts in messages and the execution log.
pub(crate) const EXCERPT: usize = 1024;

/// One call of one handler.
pub struct Call<'a> {
    pub handler: &'a Handler,
    /// The normalised event name.
    pub event: &'a str,
    /// `event.object_id` as text.
    pub object_id: &'a str,
    /// The envelope, serialised.
    pub body: Bytes,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Stable id of this message (`webhook-id`): the same across retries of a delivery.
    pub message_id: &'a str,
    /// Time allowed for this call, waiting for a free slot included.
    pub timeout: Duration,
}

/// What came back from a handler that answered.
#[derive(Debug, Clone)]
pub enum Reply {
    Http {
        status: u16,
        body: Bytes,
        /// The body was longer than [`REPLY_CAP`] and was cut.
        truncated: bool,
        /// `Retry-After`, when the reply had one.
        retry_after: Option<Duration>,
    },
    Script {
        /// Exit code; `None` when the process was killed by a signal.
        code: Option<i32>,
        signal: Option<i32>,
        stdout: Bytes,
        truncated: bool,
        /// The end of stderr, lossily decoded.
        stderr: String,
    },
}

impl Reply {
    /// The reply body or stdout.
    pub fn body(&self) -> &Bytes {
        match self {
            Reply::Http { body, .. } => body,
            Reply::Script { stdout, .. } => stdout,
        }
    }

    /// Status code or exit code, for logs (`-signal` for a killed script).
    pub fn code(&self) -> i64 {
        match self {
            Reply::Http { status, .. } => i64::from(*status),
            Reply::Script { code: Some(c), .. } => i64::from(*c),
            Reply::Script { signal, .. } => -i64::from(signal.unwrap_or(0)),
        }
    }

    /// The first [`EXCERPT`] bytes of the body (HTTP) or of stderr, else stdout (script).
    pub fn excerpt(&self) -> String {
        match self {
            Reply::Http { body, .. } => excerpt(body),
            Reply::Script { stderr, stdout, .. } if stderr.trim().is_empty() => excerpt(stdout),
            Reply::Script { stderr, .. } => excerpt(stderr.as_bytes()),
        }
    }
}

/// Why a call produced no reply. [`CallError::retryable`] tells the after stage whether
/// another attempt may help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("timed out after {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("no free slot within {} (max_concurrency = {})", humantime::format_duration(*.0), .1)]
    Busy(Duration, usize),
    #[error(
        "timed out after {}, {} of it waiting for a free slot (max_concurrency = {max_concurrency})",
        humantime::format_duration(*timeout),
        humantime::format_duration(*waited)
    )]
    QueuedTimeout {
        timeout: Duration,
        waited: Duration,
        max_concurrency: usize,
    },
    /// No connection to the handler's host: `to` is its `host:port`, never the whole URL
    /// (its path or query may hold a key).
    #[error("cannot connect to {to}: {cause}")]
    Connect { to: String, cause: String },
    #[error("request failed: {0}")]
    Request(String),
    /// The handler answered a status, then its reply broke off before the body was
    /// complete (the connection closed or was reset).
    #[error("reply cut short after HTTP status {status}: {cause}")]
    CutShort { status: u16, cause: String },
    #[error("cannot start {program}: {error}")]
    Spawn { program: String, error: String },
    #[error("{0}")]
    Io(String),
}

impl CallError {
    /// Whether trying again later may succeed. Only a program that cannot be started is
    /// hopeless until the config or the host changes, and even that is retried: an
    /// operator may be deploying the script right now.
    pub fn retryable(&self) -> bool {
        true
    }
}

/// Makes calls. One per process: it owns the pooled HTTP client every handler shares.
#[derive(Clone)]
pub struct Caller {
    http: reqwest::Client,
}

impl Caller {
    pub fn new() -> Self {
        Self {
            http: http::client(),
        }
    }

    /// Calls a handler, waiting for one of its `max_concurrency` slots first. The whole
    /// call, the wait included, takes at most `call.timeout`.
    pub async fn call(&self, call: Call<'_>) -> Result<Reply, CallError> {
        let started = Instant::now();
        let handler = call.handler;
        let _permit = tokio::time::timeout(call.timeout, handler.slots.acquire())
            .await
            .map_err(|_| CallError::Busy(call.timeout, handler.max_concurrency))?
            .expect("handler semaphores are never closed");
        let waited = started.elapsed();
        let remaining = call.timeout.saturating_sub(waited);
        if remaining.is_zero() {
            return Err(CallError::Busy(call.timeout, handler.max_concurrency));
        }
        let allowed = call.timeout;
        let call = Call {
            timeout: remaining,
            ..call
        };
        let result = self.call_in_slot(call).await;
        // Report the time the call was given, not what was left of it after the wait,
        // and the wait when it was long enough to matter.
        result.map_err(|e| match e {
            CallError::Timeout(_) if waited >= Duration::from_millis(10) => {
                CallError::QueuedTimeout {
                    timeout: allowed,
                    waited: Duration::from_millis(
                        u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
                    ),
                    max_concurrency: handler.max_concurrency,
                }
            }
            CallError::Timeout(_) => CallError::Timeout(allowed),
            other => other,
        })
    }

    /// Calls a handler whose slot the caller already holds: the after stage waits for a
    /// slot as long as it takes, since waiting is not a failed attempt.
    pub async fn call_in_slot(&self, call: Call<'_>) -> Result<Reply, CallError> {
        match &call.handler.target {
            Target::Http(target) => http::call(&self.http, target, &call).await,
            Target::Script(target) => exec::call(target, &call).await,
        }
    }
}

impl Default for Caller {
    fn default() -> Self {
        Self::new()
    }
}

/// A fresh message id for a call that is not a stored delivery (`msg_...`).
pub(crate) fn new_message_id() -> String {
    crate::events::new_id("msg")
}

/// At most [`EXCERPT`] bytes of `bytes` as text, cut at a character boundary: a
/// character cut in two by the limit is left out, and bytes that are not UTF-8 become
/// U+FFFD (3 bytes each) within the same limit.
pub(crate) fn excerpt(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(EXCERPT)];
    let valid = match std::str::from_utf8(head) {
        Ok(text) => text,
        // Cut inside a character at the limit: keep what is before it.
        Err(e) if e.error_len().is_none() => {
            std::str::from_utf8(&head[..e.valid_up_to()]).expect("valid up to here")
        }
        Err(_) => return cap(String::from_utf8_lossy(head).trim(), EXCERPT),
    };
    valid.trim().to_owned()
}

/// `text` cut to at most `max` bytes, at a character boundary.
fn cap(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].trim_end().to_owned()
}

/// The innermost message of an error chain: "Connection refused (os error 111)" rather
/// than "error sending request".
pub(crate) fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_excerpt_never_exceeds_its_limit() {
        let ascii_then_wide = format!("{}é and more", "x".repeat(EXCERPT - 1));
        let invalid = vec![0xffu8; 2 * EXCERPT];
        let wide = "日本".repeat(EXCERPT);
        for bytes in [ascii_then_wide.as_bytes(), &invalid, wide.as_bytes()] {
            let text = excerpt(bytes);
            assert!(text.len() <= EXCERPT, "{} bytes", text.len());
            assert!(!text.is_empty());
        }
        // A cut keeps whole characters: the é that does not fit is left out, not mangled.
        assert_eq!(excerpt(ascii_then_wide.as_bytes()), "x".repeat(EXCERPT - 1));
        assert_eq!(excerpt(b"  short  "), "short");
    }
}
