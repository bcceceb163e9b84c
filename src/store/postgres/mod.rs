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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::mpsc;
use tokio_postgres::NoTls;
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

mod group;

use super::records::{
    DeadLetter, DeadLetterFilter, Delivery, Execution, ExecutionFilter, NewDelivery, Queued,
    Replayed, Retention, Settle, now_ms,
};
use super::{LOG_BYTES, LOG_CAPACITY, PRUNE_LIMIT, Release, StoreError};
use crate::config;

/// The steps from each older layout to the next: the first takes version 1 to 2.
const MIGRATIONS: &[&str] = &[include_str!("migrations/2.sql")];
/// The layout this build reads and writes (the `meta` table's `schema_version`).
#[expect(clippy::cast_possible_wrap, reason = "a handful of steps")]
pub(super) const SCHEMA_VERSION: i64 = 1 + MIGRATIONS.len() as i64;
/// The tables at [`SCHEMA_VERSION`], for a schema created afresh.
const SCHEMA_SQL: &str = include_str!("schema.sql");
/// The functions at [`SCHEMA_VERSION`], created afresh or replaced after a migration.
const FUNCTIONS_SQL: &str = include_str!("functions.sql");
/// The longest any one database operation may take before it counts as failed.
pub(super) const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Queued deliveries a lane takes into memory at once.
const LANE_BATCH: i64 = 1000;
/// Execution log rows written in one statement at most.
const LOG_BATCH: usize = 2000;
/// How often a handler's claims look for lanes whose lease ran out, at most.
const EXPIRED_EVERY: Duration = Duration::from_millis(500);
/// Group commits of accepts in flight at once, at most (each takes one of the pool's
/// connections; at most half of them).
const ACCEPT_WORKERS: usize = 4;
/// Groups of settlements in flight at once, at most (at most a quarter of the pool).
const SETTLE_WORKERS: usize = 2;
/// The advisory lock key's first half: "provisiond" spelt in the lock's namespace.
const LOCK_CLASS: i32 = 0x7072_6f76;

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

#[derive(Debug, Clone, Copy)]
struct Held {
    token: i64,
    /// When the claim, or the last renewal of this lane, was sent: the lease runs
    /// from no earlier.
    since: Instant,
}

/// One event's fan-out waiting for its group commit.
struct Accept {
    items: Vec<NewDelivery>,
    window: Duration,
}

/// Runs this sidecar's accepts in groups ([`group`]).
struct Accepts(Postgres);

impl group::Run for Accepts {
    type Request = Accept;
    type Answer = Vec<Option<u64>>;

    async fn run(&self, requests: &[Accept]) -> Result<Vec<Vec<Option<u64>>>, StoreError> {
        self.0.enqueue_group(requests).await
    }
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

/// One attempt's settlement waiting for its group.
struct Settlement {
    id: i64,
    handler: String,
    entity: String,
    token: i64,
    /// 0 delivered, 1 retry, 2 dead (`settle`'s `p_kind`).
    kind: i32,
    attempts: i32,
    next_at: i64,
    error: Option<String>,
    reason: Option<String>,
    /// The execution log row's columns, when there is one.
    at: Option<i64>,
    event: Option<String>,
    object: Option<String>,
    outcome: Option<String>,
    event_id: Option<String>,
    row: Option<String>,
}

/// Runs this sidecar's settlements in groups ([`group`]).
struct Settlements(Postgres);

impl group::Run for Settlements {
    type Request = Settlement;
    type Answer = i32;

    async fn run(&self, requests: &[Settlement]) -> Result<Vec<i32>, StoreError> {
        self.0.settle_group(requests).await
    }
}

/// The SQL with `{s}` replaced by the schema.
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

/// A database error as the log and the requester see it: the server's message when it
/// sent one, else what went wrong with the connection.
/// A pool's error: the database's own when it gave one (a wrong password, a database
/// that does not exist), not only the pool's "error occurred while creating a new object".
fn pool_error(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_error(e),
        other => other.to_string(),
    }
}

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
            pg.url.expose().parse().map_err(|e| StoreError::Open {
                path: "store.url".into(),
                reason: format!("not a PostgreSQL connection string ({e})"),
            })?;
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(OP_TIMEOUT);
        }
        if cfg.get_application_name().is_none() {
            cfg.application_name("provisiond");
        }
        let shown = describe(&cfg, &pg.schema);
        let manager = Manager::from_config(
            cfg,
            NoTls,
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
                warn!(store = %this.inner.shown, error = %e, "cannot reach the database yet; not ready until it answers");
                this.inner.tasks.spawn(this.clone().migrate_until_done());
            }
        }
        this.inner.tasks.spawn(this.clone().keep_leases());
        this.inner.tasks.spawn(this.clone().write_logs(logs_rx));
        Ok(this)
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
            return Err(StoreError::Write(format!(
                "the database {} is not reachable yet",
                self.inner.shown
            )));
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
        let attempt = async {
            let mut client = self.client().await.map_err(|e| match e {
                // A read that finds no connection is a failed read, not a write.
                StoreError::Write(text) if what == "read" => StoreError::Read(text),
                other => other,
            })?;
            op(&mut client).await.map_err(|e| {
                let text = pg_error(&e);
                if e.is_closed() || e.as_db_error().is_none() {
                    self.inner.healthy.store(false, Ordering::Relaxed);
                }
                if what == "read" {
                    StoreError::Read(text)
                } else {
                    StoreError::Write(text)
                }
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
                Err(StoreError::Write(format!(
                    "the database {} did not answer within {}s",
                    self.inner.shown,
                    OP_TIMEOUT.as_secs()
                )))
            }
        }
    }

    /// Stores one event's fan-out, in the next group commit of this sidecar's accepts.
    pub(super) async fn enqueue(
        &self,
        items: Vec<NewDelivery>,
        window: Duration,
    ) -> Result<Vec<Option<u64>>, StoreError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let accepts = self.inner.accepts.get().ok_or(StoreError::Closed)?;
        accepts.submit(Accept { items, window }).await
    }

    /// Stores the fan-outs of a group of accepts in one `enqueue` call (one
    /// transaction): for each accept, the id of each of its items, `None` for one
    /// skipped as a duplicate.
    async fn enqueue_group(&self, accepts: &[Accept]) -> Result<Vec<Vec<Option<u64>>>, StoreError> {
        // Sorted by lane, so that concurrent accepts lock lanes in one order.
        let mut order: Vec<(usize, usize)> = accepts
            .iter()
            .enumerate()
            .flat_map(|(a, accept)| (0..accept.items.len()).map(move |i| (a, i)))
            .collect();
        let item = |&(a, i): &(usize, usize)| &accepts[a].items[i];
        order.sort_by(|x, y| {
            let (x, y) = (item(x), item(y));
            (&x.handler, &x.entity).cmp(&(&y.handler, &y.entity))
        });
        let n = order.len();
        let mut cols: [Vec<&str>; 6] = Default::default();
        let mut keys: Vec<Option<&[u8]>> = Vec::with_capacity(n);
        let mut event_ids: Vec<Option<&str>> = Vec::with_capacity(n);
        let mut windows: Vec<i64> = Vec::with_capacity(n);
        for at in &order {
            let d = item(at);
            for (col, value) in cols.iter_mut().zip([
                &d.handler,
                &d.entity,
                &d.event,
                &d.object_id,
                &d.message_id,
                &d.body,
            ]) {
                col.push(value);
            }
            keys.push(d.dedupe.as_ref().map(|k| &k[..]));
            event_ids.push(d.event_id.as_deref());
            windows.push(ms(accepts[at.0].window));
        }
        let query = self
            .sql("SELECT item, delivery FROM {s}.enqueue($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)");
        let now = to_i64(now_ms());
        let rows = self
            .run("write", async |c| {
                c.query(
                    &c.prepare_cached(&query).await?,
                    &[
                        &cols[0], &cols[1], &cols[2], &cols[3], &cols[4], &cols[5], &keys,
                        &event_ids, &windows, &now,
                    ],
                )
                .await
            })
            .await?;
        let mut out: Vec<Vec<Option<u64>>> =
            accepts.iter().map(|a| vec![None; a.items.len()]).collect();
        for row in rows {
            let k: i32 = row.get(0);
            let id: i64 = row.get(1);
            if let Some(&(a, i)) = usize::try_from(k - 1).ok().and_then(|k| order.get(k)) {
                out[a][i] = Some(to_u64(id));
            }
        }
        Ok(out)
    }

    fn token(&self, lane: (&str, &str)) -> Option<Held> {
        let held = self.inner.held.lock().expect("not poisoned");
        held.get(&(lane.0.to_owned(), lane.1.to_owned())).copied()
    }

    fn forget(&self, lane: (&str, &str)) {
        let mut held = self.inner.held.lock().expect("not poisoned");
        held.remove(&(lane.0.to_owned(), lane.1.to_owned()));
    }

    /// Settles one attempt, in the next group of this sidecar's settlements.
    pub(super) async fn settle(
        &self,
        id: u64,
        lane: (&str, &str),
        settle: Settle,
        record: Option<Execution>,
    ) -> Result<(), StoreError> {
        let Some(held) = self.token(lane) else {
            return Err(StoreError::Lost);
        };
        let (kind, attempts, next_at, error, reason) = match settle {
            Settle::Delivered => (0, 0, 0, None, None),
            Settle::Retry {
                attempts,
                next_at,
                error,
            } => (1, attempts, next_at, Some(error), None),
            Settle::Dead {
                attempts,
                reason,
                error,
            } => (2, attempts, 0, error, Some(reason)),
        };
        let row = match &record {
            Some(r) => Some(serde_json::to_string(r).map_err(StoreError::write)?),
            None => None,
        };
        let settlement = Settlement {
            id: to_i64(id),
            handler: lane.0.to_owned(),
            entity: lane.1.to_owned(),
            token: held.token,
            kind,
            attempts: i32::try_from(attempts).unwrap_or(i32::MAX),
            next_at: to_i64(next_at),
            error,
            reason,
            at: record.as_ref().map(|r| to_i64(r.at)),
            event: record.as_ref().map(|r| r.event.clone()),
            object: record.as_ref().map(|r| r.object_id.clone()),
            outcome: record.as_ref().map(|r| r.outcome.clone()),
            event_id: record.and_then(|r| r.event_id),
            row,
        };
        let settles = self.inner.settles.get().ok_or(StoreError::Closed)?;
        match settles.submit(settlement).await? {
            1 => Ok(()),
            2 => {
                // Nothing left in the lane: the database freed it with the settlement.
                self.forget(lane);
                Ok(())
            }
            _ => {
                self.forget(lane);
                Err(StoreError::Lost)
            }
        }
    }

    /// Runs a group of settlements in one statement (one transaction, committed without
    /// waiting for its WAL flush, as each `settle` asks): for each, what `settle`
    /// answered.
    async fn settle_group(&self, group: &[Settlement]) -> Result<Vec<i32>, StoreError> {
        // In lane order, as every transaction that locks several lanes takes them.
        let mut order: Vec<usize> = (0..group.len()).collect();
        order.sort_by(|&x, &y| {
            let (x, y) = (&group[x], &group[y]);
            (&x.handler, &x.entity).cmp(&(&y.handler, &y.entity))
        });
        let pick = |f: fn(&Settlement) -> i64| -> Vec<i64> {
            order.iter().map(|&i| f(&group[i])).collect()
        };
        let (ids, tokens, next_at) = (pick(|s| s.id), pick(|s| s.token), pick(|s| s.next_at));
        let at: Vec<Option<i64>> = order.iter().map(|&i| group[i].at).collect();
        let small = |f: fn(&Settlement) -> i32| -> Vec<i32> {
            order.iter().map(|&i| f(&group[i])).collect()
        };
        let (kinds, attempts) = (small(|s| s.kind), small(|s| s.attempts));
        let text = |f: fn(&Settlement) -> &str| -> Vec<&str> {
            order.iter().map(|&i| f(&group[i])).collect()
        };
        let (handlers, entities) = (text(|s| &s.handler), text(|s| &s.entity));
        let maybe = |f: fn(&Settlement) -> Option<&str>| -> Vec<Option<&str>> {
            order.iter().map(|&i| f(&group[i])).collect()
        };
        let (errors, reasons, events, objects, outcomes, event_ids, rows) = (
            maybe(|s| s.error.as_deref()),
            maybe(|s| s.reason.as_deref()),
            maybe(|s| s.event.as_deref()),
            maybe(|s| s.object.as_deref()),
            maybe(|s| s.outcome.as_deref()),
            maybe(|s| s.event_id.as_deref()),
            maybe(|s| s.row.as_deref()),
        );
        let query = self.sql(
            "SELECT u.i, {s}.settle(u.id, u.handler, u.entity, $1, u.token, u.kind, u.attempts, \
             u.next_at, u.error, u.reason, $2, u.at, u.event, u.object, u.outcome, u.event_id, \
             u.row) FROM unnest($3::bigint[], $4::text[], $5::text[], $6::bigint[], $7::int[], \
             $8::int[], $9::bigint[], $10::text[], $11::text[], $12::bigint[], $13::text[], \
             $14::text[], $15::text[], $16::text[], $17::text[]) WITH ORDINALITY AS u(id, \
             handler, entity, token, kind, attempts, next_at, error, reason, at, event, object, \
             outcome, event_id, row, i)",
        );
        let owner = &self.inner.owner;
        let now = to_i64(now_ms());
        let answers = self
            .run("write", async |c| {
                c.query(
                    &c.prepare_cached(&query).await?,
                    &[
                        owner, &now, &ids, &handlers, &entities, &tokens, &kinds, &attempts,
                        &next_at, &errors, &reasons, &at, &events, &objects, &outcomes, &event_ids,
                        &rows,
                    ],
                )
                .await
            })
            .await?;
        let mut out = vec![0; group.len()];
        for answer in answers {
            let k: i64 = answer.get(0);
            if let Some(&slot) = usize::try_from(k - 1).ok().and_then(|k| order.get(k)) {
                out[slot] = answer.get(1);
            }
        }
        Ok(out)
    }

    pub(super) async fn replay(&self, id: u64) -> Result<Option<u64>, StoreError> {
        let query = self.sql("SELECT {s}.replay($1, $2)");
        let (id, now) = (to_i64(id), to_i64(now_ms()));
        let fresh: Option<i64> = self
            .run("write", async |c| {
                Ok(c.query_one(&c.prepare_cached(&query).await?, &[&id, &now])
                    .await?
                    .get(0))
            })
            .await?;
        Ok(fresh.map(to_u64))
    }

    pub(super) async fn drop_dead_letter(&self, id: u64) -> Result<bool, StoreError> {
        let query = self.sql("DELETE FROM {s}.dead_letters WHERE id = $1");
        let id = to_i64(id);
        let n = self
            .run("write", async |c| {
                c.execute(&c.prepare_cached(&query).await?, &[&id]).await
            })
            .await?;
        Ok(n > 0)
    }

    /// The dead letters a filter takes, as a `WHERE` clause on parameters $1 to $6.
    const MATCHING: &'static str = "($1::text IS NULL OR handler = $1) \
         AND ($2::text IS NULL OR event = $2) AND ($3::text IS NULL OR object_id = $3) \
         AND ($4::text IS NULL OR entity = $4) AND ($5::bigint IS NULL OR died_at >= $5) \
         AND ($6::bigint IS NULL OR died_at < $6)";

    /// The parameters `$1` to `$6` of [`Self::MATCHING`] for `filter`, its times as
    /// `times` holds them (`[since, until]`, from [`Self::matching_times`]).
    fn matching<'a>(
        filter: &'a DeadLetterFilter,
        times: &'a [Option<i64>; 2],
    ) -> [&'a (dyn ToSql + Sync); 6] {
        [
            &filter.handler,
            &filter.event,
            &filter.object_id,
            &filter.entity,
            &times[0],
            &times[1],
        ]
    }

    fn matching_times(filter: &DeadLetterFilter) -> [Option<i64>; 2] {
        [filter.since.map(to_i64), filter.until.map(to_i64)]
    }

    pub(super) async fn replay_matching(
        &self,
        filter: DeadLetterFilter,
        handlers: Vec<String>,
    ) -> Result<Replayed, StoreError> {
        let select = self.sql(&format!(
            "SELECT id, handler, entity FROM {{s}}.dead_letters WHERE {} ORDER BY id FOR UPDATE",
            Self::MATCHING
        ));
        let replay = self.sql("SELECT {s}.replay($1, $2)");
        let now = to_i64(now_ms());
        let times = Self::matching_times(&filter);
        self.run("write", async |c| {
            let txn = c.transaction().await?;
            let rows = txn.query(&select, &Self::matching(&filter, &times)).await?;
            let mut out = Replayed::default();
            let mut chosen: Vec<(String, String, i64)> = Vec::with_capacity(rows.len());
            for row in rows {
                let handler: String = row.get(1);
                if !handlers.contains(&handler) {
                    out.skipped += 1;
                    out.skipped_handlers.insert(handler);
                    continue;
                }
                chosen.push((handler, row.get(2), row.get(0)));
            }
            // `replay` locks each dead letter's lane: take them in lane order, as every
            // transaction that locks several lanes does, so that no accept or settlement
            // waits on this one in a ring. Within a lane, the dead letters keep their
            // order, and so their new ids.
            chosen.sort();
            for (_, _, id) in chosen {
                let fresh: Option<i64> = txn.query_one(&replay, &[&id, &now]).await?.get(0);
                out.ids.extend(fresh.map(to_u64));
            }
            out.ids.sort_unstable();
            txn.commit().await?;
            Ok(out)
        })
        .await
    }

    pub(super) async fn drop_matching(
        &self,
        filter: DeadLetterFilter,
    ) -> Result<usize, StoreError> {
        let query = self.sql(&format!(
            "DELETE FROM {{s}}.dead_letters WHERE {}",
            Self::MATCHING
        ));
        let times = Self::matching_times(&filter);
        let n = self
            .run("write", async |c| {
                c.execute(
                    &c.prepare_cached(&query).await?,
                    &Self::matching(&filter, &times),
                )
                .await
            })
            .await?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
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

    /// As the file's: dropped, and counted, when the writer is that far behind.
    pub(super) fn log(&self, rows: Vec<Execution>) {
        if rows.is_empty() {
            return;
        }
        let inner = &*self.inner;
        super::offer_log(
            rows,
            &inner.logs,
            &inner.log_bytes,
            LOG_BYTES,
            &inner.dropped,
        );
    }

    pub(super) fn dropped_log_rows(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Writes the execution log rows as they come, in batches of what has gathered.
    async fn write_logs(self, mut rx: mpsc::Receiver<Vec<Execution>>) {
        let query = self.sql(
            "INSERT INTO {s}.executions (at, handler, event, object_id, outcome, event_id, row) \
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::text[], $7::text[])",
        );
        let mut batch: Vec<Execution> = Vec::new();
        loop {
            let Some(rows) = rx.recv().await else { return };
            batch.extend(rows);
            while batch.len() < LOG_BATCH
                && let Ok(rows) = rx.try_recv()
            {
                batch.extend(rows);
            }
            let weight: usize = batch.iter().map(Execution::weight).sum();
            let mut at: Vec<i64> = Vec::with_capacity(batch.len());
            let mut text: [Vec<String>; 5] = Default::default();
            let mut event_id: Vec<Option<String>> = Vec::with_capacity(batch.len());
            for r in &batch {
                at.push(to_i64(r.at));
                text[0].push(r.handler.clone());
                text[1].push(r.event.clone());
                text[2].push(r.object_id.clone());
                text[3].push(r.outcome.clone());
                text[4].push(serde_json::to_string(r).unwrap_or_default());
                event_id.push(r.event_id.clone());
            }
            let mut tries = 0;
            loop {
                let written = self
                    .run("write", async |c| {
                        c.execute(
                            &c.prepare_cached(&query).await?,
                            &[
                                &at, &text[0], &text[1], &text[2], &text[3], &event_id, &text[4],
                            ],
                        )
                        .await
                    })
                    .await;
                match written {
                    Ok(_) => break,
                    Err(e) if tries < 5 && !self.inner.stop.is_cancelled() => {
                        tries += 1;
                        debug!(error = %e, "cannot write execution log rows yet");
                        tokio::time::sleep(Duration::from_millis(200 << tries)).await;
                    }
                    Err(e) => {
                        let n = batch.len() as u64;
                        self.inner.dropped.fetch_add(n, Ordering::Relaxed);
                        crate::metrics::execution_log_dropped(n);
                        warn!(rows = n, error = %e, "execution log rows dropped: the database did not take them");
                        break;
                    }
                }
            }
            self.inner.log_bytes.fetch_sub(weight, Ordering::Relaxed);
            batch.clear();
        }
    }

    pub(super) async fn close(&self) {
        // Rows still in the channel are written first: closing the sender ends the
        // writer once it has drained them.
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
        let _ = tokio::time::timeout(OP_TIMEOUT, self.inner.tasks.wait()).await;
        self.inner.pool.close();
    }

    pub(super) async fn delivery(&self, id: u64) -> Result<Option<Delivery>, StoreError> {
        let query = self.sql(
            "SELECT id, handler, entity, event, object_id, message_id, body, attempts, \
             next_at, enqueued_at, last_error, event_id FROM {s}.deliveries WHERE id = $1",
        );
        let id = to_i64(id);
        let row = self
            .run("read", async |c| {
                c.query_opt(&c.prepare_cached(&query).await?, &[&id]).await
            })
            .await?;
        Ok(row.map(|r| delivery_of(&r)))
    }

    pub(super) async fn queue_depths(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let query = self.sql(
            "SELECT handler, sum(pending)::bigint FROM {s}.lanes WHERE pending > 0 GROUP BY handler",
        );
        let rows = self
            .run("read", async |c| {
                c.query(&c.prepare_cached(&query).await?, &[]).await
            })
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, String>(0), to_u64(r.get(1))))
            .collect())
    }

    pub(super) async fn queue_depth(&self) -> Result<u64, StoreError> {
        let query = self.sql("SELECT count(*) FROM {s}.deliveries");
        let n: i64 = self
            .run("read", async |c| {
                Ok(c.query_one(&c.prepare_cached(&query).await?, &[])
                    .await?
                    .get(0))
            })
            .await?;
        Ok(to_u64(n))
    }

    pub(super) async fn oldest_enqueued(&self) -> Result<Option<u64>, StoreError> {
        let query = self.sql("SELECT enqueued_at FROM {s}.deliveries ORDER BY id LIMIT 1");
        let at: Option<i64> = self
            .run("read", async |c| {
                Ok(c.query_opt(&c.prepare_cached(&query).await?, &[])
                    .await?
                    .map(|r| r.get(0)))
            })
            .await?;
        Ok(at.map(to_u64))
    }

    pub(super) async fn dead_letter_count(&self) -> Result<u64, StoreError> {
        let query = self.sql("SELECT count(*) FROM {s}.dead_letters");
        let n: i64 = self
            .run("read", async |c| {
                Ok(c.query_one(&c.prepare_cached(&query).await?, &[])
                    .await?
                    .get(0))
            })
            .await?;
        Ok(to_u64(n))
    }

    pub(super) async fn executions(
        &self,
        filter: &ExecutionFilter,
    ) -> Result<Vec<Execution>, StoreError> {
        let query = self.sql(
            "SELECT id, row FROM {s}.executions WHERE ($1::text IS NULL OR event = $1) \
             AND ($2::text IS NULL OR handler = $2) AND ($3::text IS NULL OR object_id = $3) \
             AND ($4::text IS NULL OR outcome = $4) AND ($5::text IS NULL OR event_id = $5) \
             AND ($6::bigint IS NULL OR id > $6) AND ($7::bigint IS NULL OR at >= $7) \
             ORDER BY id DESC LIMIT $8",
        );
        let after = filter.after.map(to_i64);
        let since = filter.since.map(to_i64);
        let limit = i64::try_from(filter.limit).unwrap_or(i64::MAX);
        let rows = self
            .run("read", async |c| {
                c.query(
                    &c.prepare_cached(&query).await?,
                    &[
                        &filter.event,
                        &filter.handler,
                        &filter.object_id,
                        &filter.outcome,
                        &filter.event_id,
                        &after,
                        &since,
                        &limit,
                    ],
                )
                .await
            })
            .await?;
        rows.iter()
            .map(|r| {
                let text: &str = r.get(1);
                let mut row: Execution = serde_json::from_str(text)
                    .map_err(|e| StoreError::Corrupt(format!("execution log row: {e}")))?;
                row.id = to_u64(r.get(0));
                Ok(row)
            })
            .collect()
    }

    pub(super) async fn dead_letters(
        &self,
        filter: &DeadLetterFilter,
        after: u64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let query = self.sql(&format!(
            "SELECT id, handler, entity, event, object_id, message_id, body, attempts, \
             next_at, enqueued_at, last_error, event_id, reason, died_at FROM {{s}}.dead_letters \
             WHERE {} AND id > $7 ORDER BY id LIMIT $8",
            Self::MATCHING
        ));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let after = to_i64(after);
        let times = Self::matching_times(filter);
        let mut params = Self::matching(filter, &times).to_vec();
        params.extend([&after as &(dyn ToSql + Sync), &limit]);
        let rows = self
            .run("read", async |c| {
                c.query(&c.prepare_cached(&query).await?, &params).await
            })
            .await?;
        Ok(rows.iter().map(dead_letter_of).collect())
    }

    pub(super) async fn dead_letter(&self, id: u64) -> Result<Option<DeadLetter>, StoreError> {
        let query = self.sql(
            "SELECT id, handler, entity, event, object_id, message_id, body, attempts, \
             next_at, enqueued_at, last_error, event_id, reason, died_at FROM {s}.dead_letters \
             WHERE id = $1",
        );
        let id = to_i64(id);
        let row = self
            .run("read", async |c| {
                c.query_opt(&c.prepare_cached(&query).await?, &[&id]).await
            })
            .await?;
        Ok(row.as_ref().map(dead_letter_of))
    }

    /// Claims up to `room` free lanes of `handler`, and reads their first queued
    /// deliveries.
    pub(super) async fn claim(
        &self,
        handler: &str,
        room: usize,
    ) -> Result<Vec<Queued>, StoreError> {
        if room == 0 || !self.is_open() && !self.inner.ready.load(Ordering::Relaxed) {
            return Ok(Vec::new());
        }
        // Free lanes come from their own index (`lanes_waiting`), which holds no lane
        // that anyone holds: a claim does not walk past the lanes other sidecars are
        // working. Lanes whose lease ran out (their sidecar died) are looked for at most
        // every EXPIRED_EVERY, among the lanes held; they have waited since their lease
        // ran out. The lanes that have waited longest go first.
        let claim = self.sql(
            "WITH free AS (SELECT handler, entity, waiting_since AS since FROM {s}.lanes \
             WHERE handler = $1 AND pending > 0 AND owner IS NULL ORDER BY waiting_since \
             LIMIT $2 FOR UPDATE SKIP LOCKED), \
             expired AS (SELECT handler, entity, lease_until AS since FROM {s}.lanes \
             WHERE $5::boolean AND handler = $1 AND pending > 0 AND owner IS NOT NULL \
             AND lease_until < now() ORDER BY lease_until LIMIT $2 FOR UPDATE SKIP LOCKED), \
             taken AS (SELECT handler, entity FROM (SELECT * FROM free UNION ALL \
             SELECT * FROM expired) w ORDER BY since LIMIT $2) \
             UPDATE {s}.lanes l SET owner = $3, token = l.token + 1, \
             lease_until = now() + $4::bigint * interval '1 millisecond' FROM taken \
             WHERE l.handler = taken.handler AND l.entity = taken.entity \
             RETURNING l.entity, l.token",
        );
        let expired = self.expired_due(handler);
        let room = i64::try_from(room).unwrap_or(i64::MAX);
        let lease = ms(self.inner.lease);
        let owner = &self.inner.owner;
        let since = Instant::now();
        let claimed = self
            .run("write", async |c| {
                c.query(
                    &c.prepare_cached(&claim).await?,
                    &[&handler, &room, owner, &lease, &expired],
                )
                .await
            })
            .await?;
        if claimed.is_empty() {
            return Ok(Vec::new());
        }
        let mut entities = Vec::with_capacity(claimed.len());
        {
            let mut held = self.inner.held.lock().expect("not poisoned");
            for row in &claimed {
                let entity: String = row.get(0);
                let token: i64 = row.get(1);
                held.insert((handler.to_owned(), entity.clone()), Held { token, since });
                entities.push(entity);
            }
        }
        debug!(handler, lanes = entities.len(), "lanes claimed");
        let read = self.sql(
            "SELECT d.id, d.entity FROM unnest($2::text[]) AS e(entity) CROSS JOIN LATERAL \
             (SELECT id, entity FROM {s}.deliveries WHERE handler = $1 AND entity = e.entity \
             ORDER BY id LIMIT $3) d ORDER BY d.id",
        );
        let rows = self
            .run("read", async |c| {
                c.query(
                    &c.prepare_cached(&read).await?,
                    &[&handler, &entities, &LANE_BATCH],
                )
                .await
            })
            .await;
        match rows {
            Ok(rows) => Ok(rows
                .iter()
                .map(|r| Queued {
                    id: to_u64(r.get(0)),
                    handler: handler.to_owned(),
                    entity: r.get(1),
                })
                .collect()),
            Err(e) => {
                // Held but unread: give them back rather than sit on them.
                for entity in &entities {
                    let _ = self.abandon((handler, entity)).await;
                }
                Err(e)
            }
        }
    }

    pub(super) async fn waiting(&self, handler: &str, limit: usize) -> Result<usize, StoreError> {
        if limit == 0 || !self.is_open() && !self.inner.ready.load(Ordering::Relaxed) {
            return Ok(0);
        }
        // Free lanes with work first, from their own index; lanes whose lease ran out
        // only when there are none, and at most every EXPIRED_EVERY: finding those walks
        // every lane of the handler with work, which a large backlog makes long.
        let free = self.sql(
            "SELECT count(*) FROM (SELECT 1 FROM {s}.lanes WHERE handler = $1 \
             AND pending > 0 AND owner IS NULL LIMIT $2) f",
        );
        let expired = self.sql(
            "SELECT count(*) FROM (SELECT 1 FROM {s}.lanes WHERE handler = $1 \
             AND pending > 0 AND owner IS NOT NULL AND lease_until < now() LIMIT $2) e",
        );
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let count = async |query: &str| -> Result<usize, StoreError> {
            let n: i64 = self
                .run("read", async |c| {
                    Ok(
                        c.query_one(&c.prepare_cached(query).await?, &[&handler, &limit])
                            .await?
                            .get(0),
                    )
                })
                .await?;
            Ok(usize::try_from(n).unwrap_or(0))
        };
        let waiting = count(&free).await?;
        if waiting > 0 || !self.expired_due(&format!("waiting {handler}")) {
            return Ok(waiting);
        }
        count(&expired).await
    }

    /// Whether lanes whose lease ran out may be looked for now, for `what` (a handler's
    /// claims, or its question whether lanes wait): at most every [`EXPIRED_EVERY`].
    fn expired_due(&self, what: &str) -> bool {
        let mut looked = self.inner.expired_at.lock().expect("not poisoned");
        match looked.get(what) {
            Some(at) if at.elapsed() < EXPIRED_EVERY => false,
            _ => {
                looked.insert(what.to_owned(), Instant::now());
                true
            }
        }
    }

    /// The lane's queued deliveries, oldest first, at most [`LANE_BATCH`].
    async fn lane_rows(&self, lane: (&str, &str)) -> Result<Vec<Queued>, StoreError> {
        let read = self.sql(
            "SELECT id FROM {s}.deliveries WHERE handler = $1 AND entity = $2 ORDER BY id LIMIT $3",
        );
        let rows = self
            .run("read", async |c| {
                c.query(
                    &c.prepare_cached(&read).await?,
                    &[&lane.0, &lane.1, &LANE_BATCH],
                )
                .await
            })
            .await?;
        Ok(rows
            .iter()
            .map(|r| Queued {
                id: to_u64(r.get(0)),
                handler: lane.0.to_owned(),
                entity: lane.1.to_owned(),
            })
            .collect())
    }

    pub(super) async fn release(
        &self,
        lane: (&str, &str),
        _last: u64,
    ) -> Result<Release, StoreError> {
        let Some(held) = self.token(lane) else {
            return Ok(Release::Lost);
        };
        let free = self.sql(
            "UPDATE {s}.lanes SET owner = CASE WHEN pending > 0 THEN owner END, \
             lease_until = CASE WHEN pending > 0 THEN lease_until END \
             WHERE handler = $1 AND entity = $2 AND owner = $3 AND token = $4 RETURNING pending",
        );
        let owner = &self.inner.owner;
        let pending: Option<i64> = self
            .run("write", async |c| {
                Ok(c.query_opt(
                    &c.prepare_cached(&free).await?,
                    &[&lane.0, &lane.1, owner, &held.token],
                )
                .await?
                .map(|r| r.get(0)))
            })
            .await?;
        match pending {
            None => {
                self.forget(lane);
                Ok(Release::Lost)
            }
            Some(p) if p <= 0 => {
                self.forget(lane);
                Ok(Release::Free)
            }
            Some(_) => {
                let rows = self.lane_rows(lane).await?;
                if rows.is_empty() {
                    // The count ran ahead of the rows (it cannot, but if it ever does, the
                    // lane must not stay held with nothing to do): set it right, free it.
                    let fix = self.sql(
                        "UPDATE {s}.lanes l SET pending = (SELECT count(*) FROM {s}.deliveries d \
                         WHERE d.handler = l.handler AND d.entity = l.entity), owner = NULL, \
                         lease_until = NULL, waiting_since = now() WHERE handler = $1 \
                         AND entity = $2 AND owner = $3 AND token = $4",
                    );
                    self.run("write", async |c| {
                        c.execute(
                            &c.prepare_cached(&fix).await?,
                            &[&lane.0, &lane.1, owner, &held.token],
                        )
                        .await
                    })
                    .await?;
                    self.forget(lane);
                    return Ok(Release::Free);
                }
                Ok(Release::More(rows))
            }
        }
    }

    pub(super) async fn abandon(&self, lane: (&str, &str)) -> Result<(), StoreError> {
        let Some(held) = self.token(lane) else {
            return Ok(());
        };
        let free = self.sql(
            "UPDATE {s}.lanes SET owner = NULL, lease_until = NULL, waiting_since = now() \
             WHERE handler = $1 AND entity = $2 AND owner = $3 AND token = $4",
        );
        let owner = &self.inner.owner;
        self.forget(lane);
        let freed = self
            .run("write", async |c| {
                c.execute(
                    &c.prepare_cached(&free).await?,
                    &[&lane.0, &lane.1, owner, &held.token],
                )
                .await
            })
            .await;
        if freed.is_err() {
            // Not renewed from now on (only held lanes are), so its lease runs out
            // anyway; the next renewal that gets through frees it at once.
            let mut unfreed = self.inner.unfreed.lock().expect("not poisoned");
            unfreed.push((lane.0.to_owned(), lane.1.to_owned(), held.token));
        }
        freed.map(|_| ())
    }

    /// Held, with time to spare: a fifth of the lease (at least a second) before it
    /// would run out, counted from when the claim or the last renewal was sent.
    pub(super) fn holds(&self, lane: (&str, &str)) -> bool {
        let Some(held) = self.token(lane) else {
            return false;
        };
        let lease = self.inner.lease;
        let spare = (lease / 5).max(Duration::from_secs(1)).min(lease / 2);
        held.since.elapsed() + spare < lease
    }

    pub(super) fn set_handlers(&self, mut handlers: Vec<String>) {
        handlers.sort();
        *self.inner.handlers.lock().expect("not poisoned") = handlers;
    }

    pub(super) async fn handler_elsewhere(&self, name: &str) -> Result<bool, StoreError> {
        let query = self.sql(
            "SELECT EXISTS (SELECT 1 FROM {s}.sidecars WHERE id <> $1 AND $2 = ANY(handlers) \
             AND seen_at > now() - $3::bigint * interval '1 millisecond')",
        );
        let owner = &self.inner.owner;
        let lease = ms(self.inner.lease);
        self.run("read", async |c| {
            Ok(
                c.query_one(&c.prepare_cached(&query).await?, &[owner, &name, &lease])
                    .await?
                    .get(0),
            )
        })
        .await
    }

    pub(super) async fn orphans(&self) -> Result<Vec<String>, StoreError> {
        // Only handlers whose work has waited a whole lease: a sidecar that has just
        // added a handler by a reload has then told the others for sure.
        let query = self.sql(
            "SELECT DISTINCT l.handler FROM {s}.lanes l WHERE l.pending > 0 \
             AND NOT EXISTS (SELECT 1 FROM {s}.sidecars s WHERE l.handler = ANY(s.handlers) \
             AND s.seen_at > now() - $1::bigint * interval '1 millisecond') \
             AND EXISTS (SELECT 1 FROM {s}.deliveries d WHERE d.handler = l.handler \
             AND d.entity = l.entity AND d.enqueued_at < $2)",
        );
        let lease = ms(self.inner.lease);
        let before = to_i64(now_ms()).saturating_sub(lease);
        let rows = self
            .run("read", async |c| {
                c.query(&c.prepare_cached(&query).await?, &[&lease, &before])
                    .await
            })
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Renews this sidecar's leases and its entry among the live sidecars every third
    /// of the lease; a lane the renewal does not return is lost.
    async fn keep_leases(self) {
        let every = (self.inner.lease / 3).max(Duration::from_millis(200));
        // Only the lanes held here, each with its token: a lane this sidecar gave up (or
        // lost) is never renewed, whatever its row still says.
        // Both lock their lanes in lane order, as accepts and settlements do.
        let renew = self.sql(&format!(
            "{MINE_IN_ORDER} UPDATE {{s}}.lanes l \
             SET lease_until = now() + $5::bigint * interval '1 millisecond' FROM mine \
             WHERE l.handler = mine.handler AND l.entity = mine.entity \
             RETURNING l.handler, l.entity, l.token"
        ));
        let free = self.sql(&format!(
            "{MINE_IN_ORDER} UPDATE {{s}}.lanes l SET owner = NULL, lease_until = NULL, \
             waiting_since = now() FROM mine \
             WHERE l.handler = mine.handler AND l.entity = mine.entity"
        ));
        let beat = self.sql(
            "INSERT INTO {s}.sidecars (id, handlers, seen_at) VALUES ($1, $2, now()) \
             ON CONFLICT (id) DO UPDATE SET handlers = excluded.handlers, seen_at = now()",
        );
        let owner = self.inner.owner.clone();
        let lease = ms(self.inner.lease);
        loop {
            if self.inner.ready.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let handlers = self.inner.handlers.lock().expect("not poisoned").clone();
                let mut lanes: [Vec<String>; 2] = Default::default();
                let mut tokens: Vec<i64> = Vec::new();
                // What this renewal asks for: a lane claimed from now on is not in it, and
                // must not be taken for lost when the answer lacks it.
                let asked: HashMap<(String, String), i64> = self
                    .inner
                    .held
                    .lock()
                    .expect("not poisoned")
                    .iter()
                    .map(|(lane, h)| (lane.clone(), h.token))
                    .collect();
                for ((handler, entity), token) in &asked {
                    lanes[0].push(handler.clone());
                    lanes[1].push(entity.clone());
                    tokens.push(*token);
                }
                let unfreed =
                    std::mem::take(&mut *self.inner.unfreed.lock().expect("not poisoned"));
                let mut gone: [Vec<String>; 2] = Default::default();
                let mut gone_tokens: Vec<i64> = Vec::new();
                for (handler, entity, token) in &unfreed {
                    gone[0].push(handler.clone());
                    gone[1].push(entity.clone());
                    gone_tokens.push(*token);
                }
                let renewed = self
                    .run("write", async |c| {
                        c.execute(&c.prepare_cached(&beat).await?, &[&owner, &handlers])
                            .await?;
                        if !gone_tokens.is_empty() {
                            c.execute(
                                &c.prepare_cached(&free).await?,
                                &[&owner, &gone[0], &gone[1], &gone_tokens],
                            )
                            .await?;
                        }
                        c.query(
                            &c.prepare_cached(&renew).await?,
                            &[&owner, &lanes[0], &lanes[1], &tokens, &lease],
                        )
                        .await
                    })
                    .await;
                if renewed.is_err() {
                    self.inner
                        .unfreed
                        .lock()
                        .expect("not poisoned")
                        .extend(unfreed);
                }
                match renewed {
                    Ok(rows) => {
                        let ours: HashMap<(String, String), i64> = rows
                            .iter()
                            .map(|r| ((r.get(0), r.get(1)), r.get(2)))
                            .collect();
                        let mut held = self.inner.held.lock().expect("not poisoned");
                        // Lost: asked for with this token and not renewed. A lane claimed
                        // (or claimed again) since the question stays.
                        held.retain(|lane, h| {
                            if ours.get(lane) == Some(&h.token) {
                                h.since = h.since.max(sent);
                                return true;
                            }
                            asked.get(lane) != Some(&h.token)
                        });
                    }
                    Err(e) => warn!(error = %e, "cannot renew the lanes' leases"),
                }
            }
            tokio::select! {
                () = self.inner.stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    /// Tells the other sidecars about this one (its handlers) at once.
    pub(super) async fn announce(&self) -> Result<(), StoreError> {
        let beat = self.sql(
            "INSERT INTO {s}.sidecars (id, handlers, seen_at) VALUES ($1, $2, now()) \
             ON CONFLICT (id) DO UPDATE SET handlers = excluded.handlers, seen_at = now()",
        );
        let owner = &self.inner.owner;
        let handlers = self.inner.handlers.lock().expect("not poisoned").clone();
        self.run("write", async |c| {
            c.execute(&c.prepare_cached(&beat).await?, &[owner, &handlers])
                .await
        })
        .await?;
        Ok(())
    }

    async fn migrate_until_done(self) {
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
                Err(Migrate::Failed(e)) => debug!(error = %e, "database still unreachable"),
            }
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    }

    /// Creates the schema, or checks its version, under an advisory lock held by the
    /// transaction: sidecars starting together migrate one after the other.
    async fn migrate(&self) -> Result<(), Migrate> {
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
            txn.batch_execute(&sql(
                schema,
                "CREATE SCHEMA IF NOT EXISTS {s}; CREATE TABLE IF NOT EXISTS {s}.meta \
                 (key text PRIMARY KEY, value bigint NOT NULL);",
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
            txn.commit().await.map_err(failed)?;
            Ok(())
        };
        let done = tokio::time::timeout(OP_TIMEOUT * 2, work)
            .await
            .unwrap_or_else(|_| Err(Migrate::Failed("the database did not answer".into())));
        if done.is_ok() {
            self.inner.ready.store(true, Ordering::Relaxed);
            if let Err(e) = self.announce().await {
                warn!(error = %e, "cannot tell the other sidecars about this one yet");
            }
            info!(store = %self.inner.shown, "database ready");
        }
        done
    }
}

enum Migrate {
    /// Try again later.
    Failed(String),
    /// Never: the schema is not one this build may use.
    Refused(String),
}

/// The database as logs show it, without user or password.
fn describe(cfg: &tokio_postgres::Config, schema: &str) -> String {
    let ports = cfg.get_ports();
    let hosts: Vec<String> = cfg
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let host = match h {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            };
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            format!("{host}:{port}")
        })
        .collect();
    format!(
        "postgres://{}/{} (schema {schema})",
        hosts.join(","),
        cfg.get_dbname().unwrap_or("")
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
    /// Adds deliveries, dead letters and dedupe keys read from elsewhere (a redb file),
    /// in one transaction: deliveries in their order, behind what their lanes hold, with
    /// their attempts and times; dead letters under new ids; a dedupe key the database
    /// has already keeps the later of its two times.
    pub(super) async fn import(
        &self,
        deliveries: Vec<Delivery>,
        dead: Vec<DeadLetter>,
        dedupe: Vec<([u8; 32], u64)>,
    ) -> Result<super::Copied, StoreError> {
        let lane = self.sql(
            "INSERT INTO {s}.lanes AS l (handler, entity, pending, waiting_since) \
             VALUES ($1, $2, 1, now()) ON CONFLICT (handler, entity) DO UPDATE SET \
             pending = l.pending + 1, \
             waiting_since = CASE WHEN l.pending = 0 THEN now() ELSE l.waiting_since END",
        );
        let queue = self.sql(
            "INSERT INTO {s}.deliveries (handler, entity, event, object_id, message_id, body, \
             attempts, next_at, enqueued_at, last_error, event_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        );
        let letter = self.sql(
            "INSERT INTO {s}.dead_letters VALUES (nextval(pg_get_serial_sequence('{s}.deliveries', 'id')), \
             $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        );
        let keys = self.sql(
            "INSERT INTO {s}.dedupe AS d (key, stored_at) \
             SELECT * FROM unnest($1::bytea[], $2::bigint[]) \
             ON CONFLICT (key) DO UPDATE SET stored_at = greatest(d.stored_at, excluded.stored_at)",
        );
        let mut client = self.client().await?;
        let work = async {
            let txn = client.transaction().await?;
            for chunk in dedupe.chunks(10_000) {
                let hashes: Vec<&[u8]> = chunk.iter().map(|(k, _)| &k[..]).collect();
                let times: Vec<i64> = chunk.iter().map(|(_, at)| to_i64(*at)).collect();
                txn.execute(&keys, &[&hashes, &times]).await?;
            }
            for d in &deliveries {
                let numbers = Numbers::of(d);
                txn.execute(&lane, &[&d.handler, &d.entity]).await?;
                txn.execute(&queue, &delivery_params(d, &numbers)).await?;
            }
            for l in &dead {
                let numbers = Numbers::of(&l.delivery);
                let died = to_i64(l.died_at);
                let mut params = delivery_params(&l.delivery, &numbers);
                params.extend([&l.reason as &(dyn ToSql + Sync), &died]);
                txn.execute(&letter, &params).await?;
            }
            txn.commit().await
        };
        work.await.map_err(|e| StoreError::Write(pg_error(&e)))?;
        Ok(super::Copied {
            queued: deliveries.len(),
            dead: dead.len(),
            dedupe: dedupe.len(),
        })
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
