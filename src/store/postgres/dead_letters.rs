//! Dead letters: one by id, or every one a filter takes (list, replay, drop), each in
//! one statement or transaction.

use tokio_postgres::types::ToSql;

use super::{Postgres, dead_letter_of, to_i64, to_u64};
use crate::store::StoreError;
use crate::store::records::{DeadLetter, DeadLetterFilter, Replayed, now_ms};

impl Postgres {
    pub(in crate::store) async fn replay(&self, id: u64) -> Result<Option<u64>, StoreError> {
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

    pub(in crate::store) async fn drop_dead_letter(&self, id: u64) -> Result<bool, StoreError> {
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

    pub(in crate::store) async fn replay_matching(
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

    pub(in crate::store) async fn drop_matching(
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

    pub(in crate::store) async fn dead_letter_count(&self) -> Result<u64, StoreError> {
        self.count("dead_letters").await
    }

    pub(in crate::store) async fn dead_letters(
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

    pub(in crate::store) async fn dead_letter(
        &self,
        id: u64,
    ) -> Result<Option<DeadLetter>, StoreError> {
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
}
