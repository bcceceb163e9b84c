//! The PostgreSQL backend: the after stage's data in one schema that any number of
//! sidecars share (`store.backend = "postgres"`).
//!
//! - **Accepts** run one function call ([`functions.sql`](functions.sql) `enqueue`) in one
//!   transaction: the dedupe keys, the lanes' rows (locked, so that a lane's ids follow
//!   commit order) and the deliveries. The 200 follows its commit.
//! - **Lanes** are held by leases: a sidecar claims free lanes, those that have waited
//!   longest first (`FOR UPDATE SKIP LOCKED`, so sidecars never wait on each other's
//!   claims), renews all it holds every third of `store.lease`, and frees a lane when
//!   it has delivered all of it, or gives it back when its turn is over and others wait
//!   (`crate::delivery`). Every claim raises the lane's token; a settlement names the
//!   token it holds, and the database refuses it when the lane has been claimed since
//!   (fencing).
//! - **Waking**: the sidecar that accepted an event claims at once; the others look for
//!   free lanes with a backoff (50 ms up to 1 s while nothing is found), which is also
//!   how a dead sidecar's lanes are found once their leases have run out. No
//!   LISTEN/NOTIFY: a NOTIFY takes a database-wide lock at every commit that sends one.
//! - **Unreachable database**: the store is not open (`/readyz` 503, accepts 503) until
//!   it answers again; every operation is bounded by [`OP_TIMEOUT`].
//!
//! This file holds the handle (connection, the pool, the background tasks) and what every
//! part shares; [`queue`] the accepts and settlements, [`lanes`] the leases, [`log`] the
//! execution log, [`dead_letters`] the dead letters, [`schema`] creation and migrations.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::mpsc;
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

mod dead_letters;
mod group;
mod lanes;
mod log;
mod queue;
mod schema;
mod tls;

use lanes::Held;
use queue::{Accepts, Settlements};
use schema::Migrate;

use super::records::{DeadLetter, Delivery, Execution, Retention, now_ms};
use super::{LOG_CAPACITY, PRUNE_LIMIT, StoreError};
use crate::config;
use crate::config::SslMode;

/// The longest any one database operation may take before it counts as failed.
pub(super) const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Group commits of accepts in flight at once, at most (each takes one of the pool's
/// connections; at most half of them).
const ACCEPT_WORKERS: usize = 4;
/// Groups of settlements in flight at once, at most (at most a quarter of the pool).
const SETTLE_WORKERS: usize = 2;

/// A handle on the shared database; clones share it.
#[derive(Clone)]
pub(super) struct Postgres {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    /// The schema's name, checked to be a plain identifier by the config.
    schema: String,
    /// The database as logs may show it: hosts, ports, database, schema.
    shown: String,
    /// This sidecar's name in the `lanes.owner` and `sidecars.id` columns.
    owner: String,
    lease: Duration,
    /// The schema is there and of our version.
    ready: AtomicBool,
    /// Why it is not yet: the last failure to create or check the schema (the
    /// database down, a wrong password, a missing privilege).
    not_ready: Mutex<Option<String>>,
    /// The last operation succeeded.
    healthy: AtomicBool,
    /// The lanes this sidecar holds: their tokens, and when each was claimed.
    held: Mutex<HashMap<(String, String), Held>>,
    /// Lanes given up while the database did not answer: still ours there, never
    /// renewed, freed by the next renewal that gets through.
    unfreed: Mutex<Vec<(String, String, i64)>>,
    /// This sidecar's after-stage handlers, as the other sidecars should see them.
    handlers: Mutex<Vec<String>>,
    /// When each handler's claims last looked for lanes whose lease ran out.
    expired_at: Mutex<HashMap<String, Instant>>,
    /// Accepts waiting for their group commit.
    accepts: OnceLock<group::Group<Accepts>>,
    /// Settlements waiting for their group.
    settles: OnceLock<group::Group<Settlements>>,
    logs: mpsc::Sender<Vec<Execution>>,
    log_bytes: Arc<AtomicUsize>,
    dropped: AtomicU64,
    stop: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
}

/// The lanes of `$2` (handlers), `$3` (entities) and `$4` (tokens) that owner `$1` still
/// holds with those tokens, locked one after the other in lane order (`COLLATE "C"`:
/// byte order, as Rust sorts the lanes of accepts and settlements), as `mine`.
/// Transactions that lock several lanes all take them in this order, so none waits on
/// another in a ring.
const MINE_IN_ORDER: &str = "WITH mine AS (SELECT l.handler, l.entity FROM {s}.lanes l \
     JOIN unnest($2::text[], $3::text[], $4::bigint[]) AS h(handler, entity, token) \
     ON l.handler = h.handler AND l.entity = h.entity AND l.token = h.token \
     WHERE l.owner = $1 ORDER BY l.handler COLLATE \"C\", l.entity COLLATE \"C\" FOR UPDATE OF l)";

/// `text` with `{s}` the schema, quoted: a plain lower-case name is the same quoted or
/// not, and quoted a keyword (`select`, `user`) is a name too.
fn sql(schema: &str, text: &str) -> String {
    text.replace("{s}", &format!("\"{schema}\""))
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// A pool's error: the database's own when it gave one (a wrong password, a database
/// that does not exist), not only the pool's "error occurred while creating a new object".
fn pool_error(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_error(e),
        other => other.to_string(),
    }
}

/// A database error as the log and the requester see it: the server's message when it
/// sent one, else what went wrong with the connection.
fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        }
    }
}

impl Postgres {
    /// Connects, and creates or upgrades the schema. An unreachable database is not an
    /// error: the store starts closed and keeps trying in the background. A schema newer
    /// than this build is.
    pub(super) async fn open(pg: &config::Postgres) -> Result<Self, StoreError> {
        let mut cfg: tokio_postgres::Config =
            pg.connect.expose().parse().map_err(|e| StoreError::Open {
                path: "store.url".into(),
                reason: format!("not a PostgreSQL connection string ({e})"),
            })?;
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(OP_TIMEOUT);
        }
        if cfg.get_application_name().is_none() {
            cfg.application_name("provisiond");
        }
        let shown = describe(&cfg, &pg.schema, pg.tls.mode);
        let tls = tls::connector(&pg.tls).map_err(|reason| StoreError::Open {
            path: shown.clone(),
            reason,
        })?;
        let manager = Manager::from_config(
            cfg,
            tls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pg.pool)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(OP_TIMEOUT))
            .create_timeout(Some(OP_TIMEOUT))
            .recycle_timeout(Some(OP_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Open {
                path: shown.clone(),
                reason: e.to_string(),
            })?;
        let host = std::env::var("HOSTNAME").unwrap_or_default();
        let owner = format!("{host}/{}/{:08x}", std::process::id(), fastrand::u32(..));
        let (logs_tx, logs_rx) = mpsc::channel(LOG_CAPACITY);
        let this = Self {
            inner: Arc::new(Inner {
                pool,
                schema: pg.schema.clone(),
                shown,
                owner,
                lease: pg.lease,
                ready: AtomicBool::new(false),
                healthy: AtomicBool::new(false),
                held: Mutex::default(),
                unfreed: Mutex::default(),
                handlers: Mutex::default(),
                expired_at: Mutex::default(),
                not_ready: Mutex::default(),
                accepts: OnceLock::new(),
                settles: OnceLock::new(),
                logs: logs_tx,
                log_bytes: Arc::new(AtomicUsize::new(0)),
                dropped: AtomicU64::new(0),
                stop: CancellationToken::new(),
                tasks: tokio_util::task::TaskTracker::new(),
            }),
        };
        let accepts = group::Group::start(
            Accepts(this.clone()),
            (pg.pool / 2).clamp(1, ACCEPT_WORKERS),
            &this.inner.tasks,
            &this.inner.stop,
        );
        let _ = this.inner.accepts.set(accepts);
        let settles = group::Group::start(
            Settlements(this.clone()),
            (pg.pool / 4).clamp(1, SETTLE_WORKERS),
            &this.inner.tasks,
            &this.inner.stop,
        );
        let _ = this.inner.settles.set(settles);
        match this.migrate().await {
            Ok(()) => {}
            Err(Migrate::Refused(reason)) => {
                return Err(StoreError::Open {
                    path: this.inner.shown.clone(),
                    reason,
                });
            }
            Err(Migrate::Failed(e)) => {
                warn!(store = %this.inner.shown, error = %e, "cannot use the database yet; not ready until it can");
                this.inner.tasks.spawn(this.clone().migrate_until_done());
            }
        }
        this.inner.tasks.spawn(this.clone().keep_leases());
        this.inner.tasks.spawn(this.clone().write_logs(logs_rx));
        Ok(this)
    }

    pub(super) fn lease(&self) -> Duration {
        self.inner.lease
    }

    pub(super) fn shown(&self) -> &str {
        &self.inner.shown
    }

    pub(super) fn is_open(&self) -> bool {
        let inner = &*self.inner;
        inner.ready.load(Ordering::Relaxed)
            && inner.healthy.load(Ordering::Relaxed)
            && !inner.stop.is_cancelled()
    }

    fn sql(&self, text: &str) -> String {
        sql(&self.inner.schema, text)
    }

    /// A pooled connection, once the schema is ready.
    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        if self.inner.stop.is_cancelled() {
            return Err(StoreError::Closed);
        }
        if !self.inner.ready.load(Ordering::Relaxed) {
            return Err(StoreError::Write(self.not_ready()));
        }
        self.inner.pool.get().await.map_err(|e| {
            self.inner.healthy.store(false, Ordering::Relaxed);
            StoreError::Write(format!(
                "cannot connect to {}: {}",
                self.inner.shown,
                pool_error(&e)
            ))
        })
    }

    /// Runs `op` on a pooled connection within [`OP_TIMEOUT`], noting whether the
    /// database answered.
    async fn run<T, F>(&self, what: &'static str, op: F) -> Result<T, StoreError>
    where
        F: AsyncFnOnce(&mut deadpool_postgres::Object) -> Result<T, tokio_postgres::Error>,
    {
        // What failed is said as what was asked: a read that finds no connection, or
        // no answer, is a failed read.
        let failed = |text| {
            if what == "read" {
                StoreError::Read(text)
            } else {
                StoreError::Write(text)
            }
        };
        let attempt = async {
            let mut client = self.client().await.map_err(|e| match e {
                StoreError::Write(text) => failed(text),
                other => other,
            })?;
            op(&mut client).await.map_err(|e| {
                if e.is_closed() || e.as_db_error().is_none() {
                    self.inner.healthy.store(false, Ordering::Relaxed);
                }
                failed(pg_error(&e))
            })
        };
        match tokio::time::timeout(OP_TIMEOUT, attempt).await {
            Ok(Ok(v)) => {
                if !self.inner.healthy.load(Ordering::Relaxed)
                    && !self.inner.healthy.swap(true, Ordering::Relaxed)
                {
                    info!(store = %self.inner.shown, "the database answers again");
                }
                Ok(v)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => {
                self.inner.healthy.store(false, Ordering::Relaxed);
                Err(failed(format!(
                    "the database {} did not answer within {}s",
                    self.inner.shown,
                    OP_TIMEOUT.as_secs()
                )))
            }
        }
    }

    /// The rows of one of the schema's tables.
    async fn count(&self, table: &str) -> Result<u64, StoreError> {
        let query = self.sql(&format!("SELECT count(*) FROM {{s}}.{table}"));
        let n: i64 = self
            .run("read", async |c| {
                Ok(c.query_one(&c.prepare_cached(&query).await?, &[])
                    .await?
                    .get(0))
            })
            .await?;
        Ok(to_u64(n))
    }

    pub(super) async fn prune(&self, retention: Retention) -> Result<usize, StoreError> {
        let limit = i64::try_from(PRUNE_LIMIT).unwrap_or(i64::MAX);
        let now = to_i64(now_ms());
        let cut = now.saturating_sub(ms(retention.keep_age));
        let dedupe_cut = now.saturating_sub(ms(retention.dedupe_window));
        let rows = to_i64(retention.keep_rows);
        let old = self.sql(
            "DELETE FROM {s}.executions WHERE id IN \
             (SELECT id FROM {s}.executions WHERE at < $1 ORDER BY id LIMIT $2)",
        );
        let beyond = self.sql(
            "DELETE FROM {s}.executions WHERE id IN (SELECT id FROM {s}.executions \
             WHERE id <= (SELECT id FROM {s}.executions ORDER BY id DESC OFFSET $1 LIMIT 1) \
             ORDER BY id LIMIT $2)",
        );
        let dedupe = self.sql(
            "DELETE FROM {s}.dedupe WHERE key IN \
             (SELECT key FROM {s}.dedupe WHERE stored_at < $1 ORDER BY stored_at LIMIT $2)",
        );
        let lanes = self.sql(
            "DELETE FROM {s}.lanes WHERE (handler, entity) IN (SELECT handler, entity \
             FROM {s}.lanes WHERE pending <= 0 AND owner IS NULL LIMIT $1 FOR UPDATE SKIP LOCKED) \
             AND pending <= 0 AND owner IS NULL",
        );
        let sidecars =
            self.sql("DELETE FROM {s}.sidecars WHERE seen_at < now() - interval '1 day'");
        let n = self
            .run("write", async |c| {
                let a = c
                    .execute(&c.prepare_cached(&old).await?, &[&cut, &limit])
                    .await?;
                let b = c
                    .execute(&c.prepare_cached(&beyond).await?, &[&rows, &limit])
                    .await?;
                let d = c
                    .execute(&c.prepare_cached(&dedupe).await?, &[&dedupe_cut, &limit])
                    .await?;
                let l = c
                    .execute(&c.prepare_cached(&lanes).await?, &[&limit])
                    .await?;
                c.execute(&c.prepare_cached(&sidecars).await?, &[]).await?;
                Ok(a.max(b).max(d).max(l))
            })
            .await?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    pub(super) async fn close(&self) {
        // Every task ends at `stop`; the execution log's writer once it has written the
        // rows still in its channel.
        self.inner.stop.cancel();
        let release = self.sql(
            "WITH mine AS (SELECT handler, entity FROM {s}.lanes WHERE owner = $1 \
             ORDER BY handler COLLATE \"C\", entity COLLATE \"C\" FOR UPDATE) \
             UPDATE {s}.lanes l SET owner = NULL, lease_until = NULL, waiting_since = now() \
             FROM mine WHERE l.handler = mine.handler AND l.entity = mine.entity \
             AND l.owner = $1",
        );
        let gone = self.sql("DELETE FROM {s}.sidecars WHERE id = $1");
        let owner = self.inner.owner.clone();
        if self.inner.ready.load(Ordering::Relaxed)
            && let Ok(client) = self.inner.pool.get().await
        {
            let freed = tokio::time::timeout(OP_TIMEOUT, async {
                client.execute(&release, &[&owner]).await?;
                client.execute(&gone, &[&owner]).await
            })
            .await;
            if let Ok(Err(e)) = freed {
                warn!(error = %pg_error(&e), "cannot give the lanes back; they are free once their leases run out");
            }
        }
        self.inner.held.lock().expect("not poisoned").clear();
        self.inner.tasks.close();
        if tokio::time::timeout(OP_TIMEOUT, self.inner.tasks.wait())
            .await
            .is_err()
        {
            warn!(store = %self.inner.shown, "the store's tasks did not end within 5s of the stop; stopping without them");
        }
        self.inner.pool.close();
    }
}

/// The database as logs show it, without user or password, with the schema and the
/// `sslmode` (as written: `verify-full` is not `require`).
fn describe(cfg: &tokio_postgres::Config, schema: &str, sslmode: SslMode) -> String {
    let ports = cfg.get_ports();
    let addrs = cfg.get_hostaddrs();
    // A host's name, else its `hostaddr` (the only address of a URL that has no host).
    let names: Vec<String> = if cfg.get_hosts().is_empty() {
        addrs.iter().map(ToString::to_string).collect()
    } else {
        cfg.get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| match h {
                tokio_postgres::config::Host::Tcp(name) if name.is_empty() => {
                    addrs.get(i).map(ToString::to_string).unwrap_or_default()
                }
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect()
    };
    let hosts: Vec<String> = names
        .into_iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            format!("{host}:{port}")
        })
        .collect();
    format!(
        "postgres://{}/{} (schema {schema}, sslmode {})",
        hosts.join(","),
        cfg.get_dbname().unwrap_or(""),
        sslmode.as_str()
    )
}

/// A delivery's numbers as the columns take them.
struct Numbers {
    attempts: i32,
    next_at: i64,
    enqueued_at: i64,
}

impl Numbers {
    fn of(d: &Delivery) -> Self {
        Self {
            attempts: i32::try_from(d.attempts).unwrap_or(i32::MAX),
            next_at: to_i64(d.next_at),
            enqueued_at: to_i64(d.enqueued_at),
        }
    }
}

/// A delivery's columns in the order `deliveries` and `dead_letters` list them, after
/// the id.
fn delivery_params<'a>(d: &'a Delivery, n: &'a Numbers) -> Vec<&'a (dyn ToSql + Sync)> {
    vec![
        &d.handler,
        &d.entity,
        &d.event,
        &d.object_id,
        &d.message_id,
        &d.body,
        &n.attempts,
        &n.next_at,
        &n.enqueued_at,
        &d.last_error,
        &d.event_id,
    ]
}

fn delivery_of(r: &tokio_postgres::Row) -> Delivery {
    Delivery {
        id: to_u64(r.get(0)),
        handler: r.get(1),
        entity: r.get(2),
        event: r.get(3),
        object_id: r.get(4),
        message_id: r.get(5),
        body: r.get(6),
        attempts: u32::try_from(r.get::<_, i32>(7)).unwrap_or(0),
        next_at: to_u64(r.get(8)),
        enqueued_at: to_u64(r.get(9)),
        last_error: r.get(10),
        event_id: r.get(11),
    }
}

fn dead_letter_of(r: &tokio_postgres::Row) -> DeadLetter {
    DeadLetter {
        delivery: delivery_of(r),
        reason: r.get(12),
        died_at: to_u64(r.get(13)),
    }
}

impl Postgres {
    /// The last failure to create or check the schema, while the store is not ready.
    pub(super) fn why_not_ready(&self) -> Option<String> {
        self.inner.not_ready.lock().expect("not poisoned").clone()
    }

    /// Why the store takes no requests yet, with the last failure when there was one.
    fn not_ready(&self) -> String {
        match self.why_not_ready() {
            Some(why) => format!("cannot use the database {} yet: {why}", self.inner.shown),
            None => format!("the database {} is not ready yet", self.inner.shown),
        }
    }

    /// Waits until the database is ready (or `within` has passed): whether it is.
    pub(super) async fn wait_open(&self, within: Duration) -> bool {
        let until = Instant::now() + within;
        while Instant::now() < until {
            if self.inner.ready.load(Ordering::Relaxed) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.inner.ready.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::describe;
    use crate::config::SslMode;

    #[test]
    fn the_database_is_shown_by_its_hosts_or_its_addresses_without_credentials() {
        let shown = |url: &str| describe(&url.parse().unwrap(), "provisiond", SslMode::Prefer);
        assert_eq!(
            shown("postgres://app:secret@db1,db2:5433/billing"),
            "postgres://db1:5432,db2:5433/billing (schema provisiond, sslmode prefer)"
        );
        assert_eq!(
            shown("hostaddr=10.0.0.7 port=6432 user=app password=secret dbname=billing"),
            "postgres://10.0.0.7:6432/billing (schema provisiond, sslmode prefer)"
        );
        assert_eq!(
            shown("postgres:///billing?host=/run/postgresql"),
            "postgres:///run/postgresql:5432/billing (schema provisiond, sslmode prefer)"
        );
    }
}
