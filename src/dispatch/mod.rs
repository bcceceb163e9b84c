//! Dispatch: which handlers an event goes to, in which order, and the before-stage chain.
//!
//! A [`Snapshot`] is a config plus its [`Plan`], built once at load: handlers indexed by
//! event name and sorted by priority, so that selecting them costs one hash lookup per
//! event. Events outside the catalogue are matched against the wildcard handlers only.

mod chain;
mod live;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

pub use chain::{CallRecord, Calls, Outcome, Trace, run_before, select_after};
pub use live::Live;

use crate::config::{Config, Handler, Stage};
use crate::events::EventPattern;

/// One generation of the config, as every event in flight sees it.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub plan: Plan,
    /// 1 for the config loaded at start, then one more for every applied reload.
    pub generation: u64,
    pub loaded_at: SystemTime,
}

impl Snapshot {
    pub fn new(config: Config, generation: u64) -> Self {
        let config = Arc::new(config);
        Self {
            plan: Plan::new(&config),
            config,
            generation,
            loaded_at: SystemTime::now(),
        }
    }
}

/// The enabled handlers for one event, in dispatch order.
#[derive(Debug, Clone, Default)]
pub struct Route {
    pub before: Vec<Arc<Handler>>,
    pub after: Vec<Arc<Handler>>,
}

/// Handlers indexed by event name.
#[derive(Debug, Default)]
pub struct Plan {
    by_event: HashMap<String, Arc<Route>>,
    /// Enabled handlers with a `*` or `prefix.*` pattern, in dispatch order: the only
    /// ones an event outside the catalogue can reach.
    wildcards: Vec<Arc<Handler>>,
}

impl Plan {
    pub fn new(config: &Config) -> Self {
        let mut enabled: Vec<Arc<Handler>> = config
            .handlers
            .iter()
            .filter(|h| h.enabled)
            .cloned()
            .collect();
        enabled.sort_by_key(|h| (h.priority, h.position));
        let by_event = config
            .known_events()
            .map(|name| (name.to_owned(), Arc::new(route(&enabled, name))))
            .collect();
        let wildcards = enabled
            .into_iter()
            .filter(|h| {
                h.events
                    .iter()
                    .any(|p| !matches!(p, EventPattern::Exact(_)))
            })
            .collect();
        Self {
            by_event,
            wildcards,
        }
    }

    /// The handlers for an event (normalised name).
    pub fn route(&self, name: &str) -> Arc<Route> {
        match self.by_event.get(name) {
            Some(route) => route.clone(),
            None => Arc::new(route(&self.wildcards, name)),
        }
    }

    /// Whether the name is in the catalogue or `[events] extra`.
    pub fn is_known(&self, name: &str) -> bool {
        self.by_event.contains_key(name)
    }
}

fn route(sorted: &[Arc<Handler>], name: &str) -> Route {
    let pick = |stage| {
        sorted
            .iter()
            .filter(|h| h.stage == stage && h.takes(name))
            .cloned()
            .collect()
    };
    Route {
        before: pick(Stage::Before),
        after: pick(Stage::After),
    }
}
