//! Lanes held by leases: claims (those that have waited longest first), renewals, the
//! hand-back when others wait, release, and what the other sidecars can do (`handlers`,
//! `orphans`). [`crate::delivery`] decides when; this module says it to the database.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::{MINE_IN_ORDER, Postgres, ms, to_i64, to_u64};
use crate::store::records::{Queued, now_ms};
use crate::store::{Release, StoreError};

/// Queued deliveries a lane takes into memory at once.
const LANE_BATCH: i64 = 1000;
/// How often a handler's claims look for lanes whose lease ran out, at most.
const EXPIRED_EVERY: Duration = Duration::from_millis(500);

/// A lane this sidecar holds: the token its claim got, which its settlements name.
#[derive(Debug, Clone, Copy)]
pub(super) struct Held {
    pub(super) token: i64,
    /// When the claim, or the last renewal of this lane, was sent: the lease runs
    /// from no earlier.
    since: Instant,
}

impl Postgres {
    pub(super) fn token(&self, lane: (&str, &str)) -> Option<Held> {
        let held = self.inner.held.lock().expect("not poisoned");
        held.get(&(lane.0.to_owned(), lane.1.to_owned())).copied()
    }

    pub(super) fn forget(&self, lane: (&str, &str)) {
        let mut held = self.inner.held.lock().expect("not poisoned");
        held.remove(&(lane.0.to_owned(), lane.1.to_owned()));
    }

    /// Claims up to `room` free lanes of `handler`, and reads their first queued
    /// deliveries.
    pub(in crate::store) async fn claim(
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

    pub(in crate::store) async fn waiting(
        &self,
        handler: &str,
        limit: usize,
    ) -> Result<usize, StoreError> {
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

    pub(in crate::store) async fn release(
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

    pub(in crate::store) async fn abandon(&self, lane: (&str, &str)) -> Result<(), StoreError> {
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
    pub(in crate::store) fn holds(&self, lane: (&str, &str)) -> bool {
        let Some(held) = self.token(lane) else {
            return false;
        };
        let lease = self.inner.lease;
        let spare = (lease / 5).max(Duration::from_secs(1)).min(lease / 2);
        held.since.elapsed() + spare < lease
    }

    pub(in crate::store) fn set_handlers(&self, mut handlers: Vec<String>) {
        handlers.sort();
        *self.inner.handlers.lock().expect("not poisoned") = handlers;
    }

    pub(in crate::store) async fn handler_elsewhere(&self, name: &str) -> Result<bool, StoreError> {
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

    pub(in crate::store) async fn orphans(&self) -> Result<Vec<String>, StoreError> {
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
    pub(super) async fn keep_leases(self) {
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
    pub(in crate::store) async fn announce(&self) -> Result<(), StoreError> {
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
}
