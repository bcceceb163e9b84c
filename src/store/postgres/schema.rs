//! The schema: created afresh at [`SCHEMA_VERSION`], or migrated from an older layout
//! step by step ([`MIGRATIONS`]), under an advisory lock so that sidecars starting
//! together do it once; its functions replaced whole after either.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::{debug, info, warn};

use super::{OP_TIMEOUT, Postgres, pg_error, pool_error, sql};

/// The steps from each older layout to the next: the first takes version 1 to 2.
const MIGRATIONS: &[&str] = &[include_str!("migrations/2.sql")];
/// The layout this build reads and writes (the `meta` table's `schema_version`).
#[expect(clippy::cast_possible_wrap, reason = "a handful of steps")]
const SCHEMA_VERSION: i64 = 1 + MIGRATIONS.len() as i64;
/// The tables at [`SCHEMA_VERSION`], for a schema created afresh.
const SCHEMA_SQL: &str = include_str!("schema.sql");
/// The functions at [`SCHEMA_VERSION`], created afresh or replaced after a migration.
const FUNCTIONS_SQL: &str = include_str!("functions.sql");

/// The advisory lock key's first half: "provisiond" spelt in the lock's namespace.
const LOCK_CLASS: i32 = 0x7072_6f76;

/// Why the schema is not ready.
pub(super) enum Migrate {
    /// Try again later.
    Failed(String),
    /// Never: the schema is not one this build may use.
    Refused(String),
}

impl Postgres {
    pub(super) async fn migrate_until_done(self) {
        let mut wait = Duration::from_millis(250);
        loop {
            tokio::select! {
                () = self.inner.stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            match self.migrate().await {
                Ok(()) => return,
                Err(Migrate::Refused(reason)) => {
                    tracing::error!(store = %self.inner.shown, %reason, "cannot use the database");
                }
                Err(Migrate::Failed(e)) => debug!(error = %e, "database still not usable"),
            }
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    }

    /// Creates the schema, or checks its version, under an advisory lock held by the
    /// transaction: sidecars starting together migrate one after the other.
    pub(super) async fn migrate(&self) -> Result<(), Migrate> {
        let schema = &self.inner.schema;
        let work = async {
            let mut client = self
                .inner
                .pool
                .get()
                .await
                .map_err(|e| Migrate::Failed(pool_error(&e)))?;
            let failed = |e: tokio_postgres::Error| Migrate::Failed(pg_error(&e));
            let txn = client.transaction().await.map_err(failed)?;
            txn.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                &[&LOCK_CLASS, schema],
            )
            .await
            .map_err(failed)?;
            // `CREATE SCHEMA IF NOT EXISTS` asks for `CREATE` on the database even when
            // the schema exists: a user given only a schema made for it beforehand (as
            // the README says to do) would be refused. So it is created only if absent.
            let exists = txn
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
                    &[schema],
                )
                .await
                .map_err(failed)?
                .get::<_, bool>(0);
            if !exists {
                txn.batch_execute(&sql(schema, "CREATE SCHEMA IF NOT EXISTS {s};"))
                    .await
                    .map_err(failed)?;
            }
            txn.batch_execute(&sql(
                schema,
                "CREATE TABLE IF NOT EXISTS {s}.meta (key text PRIMARY KEY, value bigint NOT NULL);",
            ))
            .await
            .map_err(failed)?;
            let version: Option<i64> = txn
                .query_opt(
                    &sql(
                        schema,
                        "SELECT value FROM {s}.meta WHERE key = 'schema_version'",
                    ),
                    &[],
                )
                .await
                .map_err(failed)?
                .map(|r| r.get(0));
            // A new schema is the newest tables; an older one, the steps from its
            // version on: either way followed by the functions, all in this transaction,
            // so that a sidecar that fails midway leaves the schema as it was.
            let (steps, record) = match version {
                None => (
                    vec![SCHEMA_SQL],
                    "INSERT INTO {s}.meta VALUES ('schema_version', $1)",
                ),
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(Migrate::Refused(format!(
                        "the schema {schema} is at version {v}, newer than this provisiond \
                         knows (up to {SCHEMA_VERSION}); run the newer release, or set \
                         store.schema to another schema"
                    )));
                }
                Some(v) if v < SCHEMA_VERSION => (
                    MIGRATIONS[usize::try_from(v.max(1) - 1).unwrap_or(0)..].to_vec(),
                    "UPDATE {s}.meta SET value = $1 WHERE key = 'schema_version'",
                ),
                Some(_) => (Vec::new(), ""),
            };
            if !steps.is_empty() {
                for step in steps.iter().chain([&FUNCTIONS_SQL]) {
                    txn.batch_execute(&sql(schema, step))
                        .await
                        .map_err(failed)?;
                }
                txn.execute(&sql(schema, record), &[&SCHEMA_VERSION])
                    .await
                    .map_err(failed)?;
                match version {
                    None => {
                        info!(schema = %schema, schema_version = SCHEMA_VERSION, "database schema created");
                    }
                    Some(from) => {
                        info!(schema = %schema, from, to = SCHEMA_VERSION, "database schema migrated");
                    }
                }
            }
            // The database's own name for this store, the same for every sidecar that
            // shares it (and on a standby promoted after a failover): metrics name it, so
            // that a dashboard counts the shared queue once.
            txn.execute(
                &sql(
                    schema,
                    "INSERT INTO {s}.meta VALUES \
                     ('store_id', floor(random() * 9007199254740992)::bigint) \
                     ON CONFLICT (key) DO NOTHING",
                ),
                &[],
            )
            .await
            .map_err(failed)?;
            let id: i64 = txn
                .query_one(
                    &sql(schema, "SELECT value FROM {s}.meta WHERE key = 'store_id'"),
                    &[],
                )
                .await
                .map_err(failed)?
                .get(0);
            txn.commit().await.map_err(failed)?;
            Ok(id)
        };
        let done = tokio::time::timeout(OP_TIMEOUT * 2, work)
            .await
            .unwrap_or_else(|_| Err(Migrate::Failed("the database did not answer".into())));
        *self.inner.not_ready.lock().expect("not poisoned") = match &done {
            Ok(_) => None,
            Err(Migrate::Failed(why) | Migrate::Refused(why)) => Some(why.clone()),
        };
        if let Ok(id) = done {
            crate::metrics::store_info("postgres", &format!("{schema}@{id:016x}"));
            // It answered: the first request after this is no "answers again".
            self.inner.healthy.store(true, Ordering::Relaxed);
            self.inner.ready.store(true, Ordering::Relaxed);
            if let Err(e) = self.announce().await {
                warn!(error = %e, "cannot tell the other sidecars about this one yet");
            }
            info!(store = %self.inner.shown, "database ready");
        }
        done.map(|_| ())
    }
}
