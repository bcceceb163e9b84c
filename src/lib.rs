//! provisiond: a sidecar that dispatches JeraSoft Billing's provisioning events to the
//! handlers declared in `provisioning.toml`.
//!
//! # Layout
//!
//! In the order an event flows through them:
//!
//! - [`keypath`]: where a value sits in the file (shared by `config` and `filter`).
//! - [`config`]: `provisioning.toml` from text to an immutable, validated [`config::Config`].
//! - [`events`]: the event catalogue, aliases, patterns, and the billing's envelope.
//! - [`server`]: the listener; `POST /events` ([`server::ingress`]), the admin routes and
//!   the web console (`/ui`).
//! - [`dispatch`]: the config snapshot and its plan (handlers by event, in order), and
//!   the before-stage chain.
//! - [`filter`]: `match` conditions and `when` CEL expressions.
//! - [`handlers`]: calling HTTP handlers and scripts.
//! - [`store`]: a redb file, or a PostgreSQL database shared by several sidecars: the
//!   after stage's durable queue (written before the
//!   billing hears 200), the dead letters, the execution log, the dedupe keys.
//! - [`delivery`]: the after stage's workers: stored deliveries out to their handlers,
//!   in order per entity, with retries, to the dead letters when they give up.
//! - [`reload`]: the file watcher, SIGHUP and `POST /v1/reload`, one path to a new
//!   snapshot.
//! - [`explain`], [`cases`]: what dispatch would do with an envelope, worked out from the
//!   config alone; `provisiond explain` and `provisiond test`.
//! - [`telemetry`], [`metrics`], [`shutdown`]: logs, Prometheus metrics, signals;
//!   [`outcome`]: the names of what became of a call or an event.
//! - [`commands`]: the subcommands the binary runs; [`remote`]: the client they use to
//!   talk to a running sidecar; [`api`]: the admin API's JSON, shared by the server's
//!   routes and the client commands; [`stdio`]: their printing, which a closed pipe
//!   ends quietly rather than with a panic.
#![forbid(unsafe_code)]

pub(crate) mod api;
pub(crate) mod cases;
pub mod commands;
pub mod config;
pub mod delivery;
pub mod dispatch;
pub mod events;
pub(crate) mod explain;
pub mod filter;
pub(crate) mod handlers;
pub(crate) mod keypath;
pub(crate) mod metrics;

/// The process's metrics recorder (installed on first call): what `server::App::new`
/// renders at `/metrics`.
pub use metrics::install as install_metrics;
pub mod outcome;
pub(crate) mod reload;
pub mod remote;
pub mod server;
pub(crate) mod shutdown;
pub mod stdio;
pub mod store;
pub mod telemetry;

/// The HTTP client every handler call goes through, built as the sidecar builds it: for
/// the benchmark's hop through reqwest, which measures what this client costs alone.
#[doc(hidden)]
pub fn handler_client() -> reqwest::Client {
    handlers::http::client()
}
