//! Accepts and settlements, each run in groups ([`super::group`]): an accept stores an
//! event's deliveries and their dedupe keys in one transaction, a settlement records an
//! attempt's outcome on a lane the sidecar still holds (fenced by the lane's token). Also
//! the queue's figures, and `store copy`'s import.

use std::time::Duration;

use tokio_postgres::types::ToSql;

use super::{Numbers, Postgres, delivery_of, delivery_params, group, ms, pg_error, to_i64, to_u64};
use crate::store::StoreError;
use crate::store::records::{DeadLetter, Delivery, Execution, NewDelivery, Settle, now_ms};

/// One event's fan-out waiting for its group commit.
pub(super) struct Accept {
    items: Vec<NewDelivery>,
    window: Duration,
}

/// Runs this sidecar's accepts in groups ([`group`]).
pub(super) struct Accepts(pub(super) Postgres);

impl group::Run for Accepts {
    type Request = Accept;
    type Answer = Vec<Option<u64>>;

    async fn run(&self, requests: &[Accept]) -> Result<Vec<Vec<Option<u64>>>, StoreError> {
        self.0.enqueue_group(requests).await
    }
}

/// One attempt's settlement waiting for its group.
pub(super) struct Settlement {
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
pub(super) struct Settlements(pub(super) Postgres);

impl group::Run for Settlements {
    type Request = Settlement;
    type Answer = i32;

    async fn run(&self, requests: &[Settlement]) -> Result<Vec<i32>, StoreError> {
        self.0.settle_group(requests).await
    }
}

impl Postgres {
    /// Stores one event's fan-out, in the next group commit of this sidecar's accepts.
    pub(in crate::store) async fn enqueue(
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

    /// Settles one attempt, in the next group of this sidecar's settlements.
    pub(in crate::store) async fn settle(
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

    pub(in crate::store) async fn delivery(&self, id: u64) -> Result<Option<Delivery>, StoreError> {
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

    pub(in crate::store) async fn queue_depths(&self) -> Result<Vec<(String, u64)>, StoreError> {
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

    pub(in crate::store) async fn queue_depth(&self) -> Result<u64, StoreError> {
        self.count("deliveries").await
    }

    pub(in crate::store) async fn oldest_enqueued(&self) -> Result<Option<u64>, StoreError> {
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

    /// Adds deliveries, dead letters and dedupe keys read from elsewhere (a redb file),
    /// in one transaction: deliveries in their order, behind what their lanes hold, with
    /// their attempts and times; dead letters under new ids; a dedupe key the database
    /// has already keeps the later of its two times.
    pub(in crate::store) async fn import(
        &self,
        deliveries: Vec<Delivery>,
        dead: Vec<DeadLetter>,
        dedupe: Vec<([u8; 32], u64)>,
    ) -> Result<crate::store::Copied, StoreError> {
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
        Ok(crate::store::Copied {
            queued: deliveries.len(),
            dead: dead.len(),
            dedupe: dedupe.len(),
        })
    }
}
