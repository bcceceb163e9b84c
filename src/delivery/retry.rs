//! What an after-stage reply means, and how long to wait before the next attempt.
//!
//! Pure functions: the schedule is tested without clocks.

use std::time::Duration;

use crate::config::Retry;
use crate::handlers::{CallError, EXCERPT, Reply, excerpt, exec};

/// What one attempt of a delivery came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// Worth another attempt; `retry_after` when the handler asked for a wait (429, 503).
    Retry {
        error: String,
        retry_after: Option<Duration>,
    },
    /// Never worth another attempt: straight to the dead letters.
    Gone {
        reason: String,
    },
}

impl Verdict {
    /// With the config's values from the environment masked in what the handler said.
    #[must_use]
    pub fn masked(self, hidden: &crate::config::Hidden) -> Self {
        match self {
            Self::Delivered => Self::Delivered,
            Self::Retry { error, retry_after } => Self::Retry {
                error: hidden.mask(error),
                retry_after,
            },
            Self::Gone { reason } => Self::Gone {
                reason: hidden.mask(reason),
            },
        }
    }
}

/// HTTP: 2xx delivered, 410 gone, anything else retried (with `Retry-After` on 429 and
/// 503). Scripts: exit 0 delivered, anything else retried.
pub fn judge(result: &Result<Reply, CallError>) -> Verdict {
    let reply = match result {
        Ok(reply) => reply,
        Err(e) => {
            return Verdict::Retry {
                error: e.to_string(),
                retry_after: None,
            };
        }
    };
    match reply {
        Reply::Http { status, .. } if (200..300).contains(status) => Verdict::Delivered,
        Reply::Http {
            status: 410, body, ..
        } => Verdict::Gone {
            reason: with_excerpt("handler answered 410 Gone".into(), body),
        },
        Reply::Http {
            status,
            body,
            retry_after,
            ..
        } => Verdict::Retry {
            error: with_excerpt(format!("HTTP status {status}"), body),
            retry_after: retry_after.filter(|_| matches!(status, 429 | 503)),
        },
        Reply::Script { code: Some(0), .. } => Verdict::Delivered,
        Reply::Script {
            code: Some(code),
            stderr,
            ..
        } => {
            let last = exec::last_lines(stderr, 5, EXCERPT);
            Verdict::Retry {
                error: if last.is_empty() {
                    format!("exited with status {code}")
                } else {
                    format!("exited with status {code}: {last}")
                },
                retry_after: None,
            }
        }
        Reply::Script { signal, .. } => Verdict::Retry {
            error: format!("script was killed by signal {}", signal.unwrap_or_default()),
            retry_after: None,
        },
    }
}

fn with_excerpt(head: String, body: &[u8]) -> String {
    let text = excerpt(body);
    if text.is_empty() {
        head
    } else {
        format!("{head}: {text}")
    }
}

/// The wait after failed attempt number `attempt` (1 for the first): full jitter over
/// `backoff * 2^(attempt-1)` capped at `max_backoff`, i.e. `cap * jitter` with `jitter`
/// drawn from [0, 1). A `Retry-After` longer than that wins, but no wait is ever longer
/// than `max_backoff`: the config bounds how stale a delivery can get.
pub fn delay(retry: &Retry, attempt: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
    let doublings = attempt.saturating_sub(1).min(32);
    let cap = retry
        .backoff
        .saturating_mul(1u32 << doublings.min(31))
        .min(retry.max_backoff);
    let jittered = cap.mul_f64(jitter.clamp(0.0, 1.0));
    match retry_after {
        Some(asked) => jittered.max(asked).min(retry.max_backoff),
        None => jittered,
    }
}

/// Whether attempt number `attempt` was the last one allowed.
pub fn exhausted(retry: &Retry, attempt: u32) -> bool {
    attempt >= retry.attempts
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    const RETRY: Retry = Retry {
        attempts: 5,
        backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(10),
    };

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let top = |attempt| delay(&RETRY, attempt, None, 1.0);
        let waits: Vec<u64> = (1..=6).map(|a| top(a).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 10, 10]);
        assert_eq!(top(1000), Duration::from_secs(10), "no overflow");
    }

    #[test]
    fn jitter_spreads_the_wait_over_zero_to_the_cap() {
        assert_eq!(delay(&RETRY, 3, None, 0.0), Duration::ZERO);
        assert_eq!(delay(&RETRY, 3, None, 0.5), Duration::from_secs(2));
        for _ in 0..1000 {
            let d = delay(&RETRY, 4, None, fastrand::f64());
            assert!(d <= Duration::from_secs(8), "{d:?}");
        }
    }

    #[test]
    fn retry_after_is_honoured_up_to_max_backoff() {
        let asked = Some(Duration::from_secs(7));
        assert_eq!(delay(&RETRY, 1, asked, 0.3), Duration::from_secs(7));
        // A longer jittered wait is kept.
        assert_eq!(
            delay(&RETRY, 5, Some(Duration::from_secs(2)), 0.9),
            Duration::from_secs(9)
        );
        // Never past max_backoff.
        assert_eq!(
            delay(&RETRY, 1, Some(Duration::from_secs(3600)), 0.0),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn attempts_count_the_first_one() {
        assert!(!exhausted(&RETRY, 4));
        assert!(exhausted(&RETRY, 5));
    }

    fn http(status: u16, retry_after: Option<u64>) -> Result<Reply, CallError> {
        Ok(Reply::Http {
            status,
            body: Bytes::from_static(b"busy"),
            truncated: false,
            retry_after: retry_after.map(Duration::from_secs),
        })
    }

    #[test]
    fn replies_are_judged_by_the_design() {
        assert_eq!(judge(&http(204, None)), Verdict::Delivered);
        assert_eq!(
            judge(&http(410, None)),
            Verdict::Gone {
                reason: "handler answered 410 Gone: busy".into()
            }
        );
        assert_eq!(
            judge(&http(503, Some(4))),
            Verdict::Retry {
                error: "HTTP status 503: busy".into(),
                retry_after: Some(Duration::from_secs(4))
            }
        );
        assert_eq!(
            judge(&http(429, Some(4))),
            Verdict::Retry {
                error: "HTTP status 429: busy".into(),
                retry_after: Some(Duration::from_secs(4))
            }
        );
        // Retry-After only counts on 429 and 503.
        assert!(matches!(
            judge(&http(500, Some(4))),
            Verdict::Retry {
                retry_after: None,
                ..
            }
        ));
        assert!(matches!(
            judge(&Err(CallError::Connect {
                to: "127.0.0.1:9".into(),
                cause: "refused".into()
            })),
            Verdict::Retry { .. }
        ));
        let script = |code| {
            Ok(Reply::Script {
                code: Some(code),
                signal: None,
                stdout: Bytes::new(),
                truncated: false,
                stderr: "switch unreachable\n".into(),
            })
        };
        assert_eq!(judge(&script(0)), Verdict::Delivered);
        assert_eq!(
            judge(&script(2)),
            Verdict::Retry {
                error: "exited with status 2: switch unreachable".into(),
                retry_after: None
            }
        );
        // Worded as the before stage words it.
        let killed = Ok(Reply::Script {
            code: None,
            signal: Some(9),
            stdout: Bytes::new(),
            truncated: false,
            stderr: String::new(),
        });
        assert_eq!(
            judge(&killed),
            Verdict::Retry {
                error: "script was killed by signal 9".into(),
                retry_after: None
            }
        );
    }
}
