//! The integration tests, one crate: each module is one part of the design, run
//! against the real binary (`tests/common` starts it, and the handler servers), so
//! the helpers compile once. `cargo test --test it chaos::` runs one module.

// `after.rs` is compiled twice, once per store backend (below).
#![allow(clippy::duplicate_mod)]

#[path = "../common/mod.rs"]
mod common;

mod admin_api;
mod after;
mod after_file;
// The same after-stage suite on PostgreSQL: `after.rs` picks its store by its module's
// name (`Db::for_module`).
#[path = "after.rs"]
mod after_pg;
mod before;
mod chaos;
mod check;
mod cli;
mod client;
mod deadletters;
mod deploy;
mod executions;
mod explain;
mod fidelity;
mod gitops;
mod monitoring;
mod ops;
mod pg_cluster;
mod pg_harness;
mod pg_tls;
mod reload;
mod robustness;
mod shared_store;
mod tls;
mod ui;
