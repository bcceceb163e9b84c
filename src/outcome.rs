//! Outcomes, named once: what became of one handler call ([`CallOutcome`]: the execution
//! log, `/v1/executions?outcome=`, the handler metrics) and of one event at the ingress
//! ([`EventOutcome`]: `provisiond_events_total`, the event's log line). A leaf: it
//! imports nothing of the crate, so every layer (the store too) may use it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What became of one handler call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallOutcome {
    /// Before stage: the handler allowed the event.
    Allowed,
    /// Before stage: the handler forbade it.
    Denied,
    /// The handler failed (before stage), or its filter did (either stage).
    Error,
    /// After stage: the handler took the delivery.
    Delivered,
    /// After stage: the attempt failed and will be retried.
    Failed,
    /// After stage: the delivery went to the dead letters.
    Dead,
}

impl CallOutcome {
    /// Every outcome the execution log holds: the before stage's, then the after stage's.
    pub const ALL: [Self; 6] = [
        Self::Allowed,
        Self::Denied,
        Self::Error,
        Self::Delivered,
        Self::Failed,
        Self::Dead,
    ];
    /// A before-stage call's outcomes.
    pub const BEFORE: [Self; 3] = [Self::Allowed, Self::Denied, Self::Error];
    /// An after-stage call's outcomes (`error`: a filter that failed, no delivery).
    pub const AFTER: [Self; 4] = [Self::Delivered, Self::Failed, Self::Dead, Self::Error];

    /// The name the log, the API and the metrics use.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Denied => "denied",
            Self::Error => "error",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
            Self::Dead => "dead",
        }
    }
}

impl fmt::Display for CallOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CallOutcome {
    type Err = UnknownOutcome;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|o| o.as_str() == text)
            .ok_or(UnknownOutcome)
    }
}

/// A name that is no [`CallOutcome`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownOutcome;

/// What became of one event at the ingress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventOutcome {
    /// Every before-stage handler allowed it (200).
    Allowed,
    /// A before-stage handler denied it (403).
    Denied,
    /// Not an envelope (400), or not readable as one: sent in a content coding (415).
    BadRequest,
    /// The body did not arrive within `server.deadline` (408).
    Timeout,
    /// The body is over the limit (413).
    TooLarge,
    /// Draining, over the in-flight cap, or the store cannot take the deliveries (503).
    Unavailable,
    /// The billing hung up during the before stage, before it had an answer.
    Abandoned,
    /// No token, or a wrong one, where `server.token` is set (401).
    Unauthorized,
}

impl EventOutcome {
    /// The `outcome` label of `provisiond_events_total` and of the event's log line.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Denied => "denied",
            Self::BadRequest => "bad_request",
            Self::Timeout => "timeout",
            Self::TooLarge => "too_large",
            Self::Unavailable => "unavailable",
            Self::Abandoned => "abandoned",
            Self::Unauthorized => "unauthorized",
        }
    }
}

impl fmt::Display for EventOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_outcomes_read_back_and_serialise_to_their_names() {
        for outcome in CallOutcome::ALL {
            assert_eq!(outcome.as_str().parse(), Ok(outcome));
            assert_eq!(
                serde_json::to_value(outcome).unwrap(),
                serde_json::Value::from(outcome.as_str())
            );
        }
        assert_eq!("bogus".parse::<CallOutcome>(), Err(UnknownOutcome));
        for stage in [&CallOutcome::BEFORE[..], &CallOutcome::AFTER[..]] {
            assert!(stage.iter().all(|o| CallOutcome::ALL.contains(o)));
        }
    }
}
