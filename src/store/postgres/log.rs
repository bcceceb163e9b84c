//! The execution log: rows offered without waiting (dropped and counted when the
//! writer is that far behind), written in batches by a task of their own; and read back.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{Postgres, to_i64, to_u64};
use crate::store::records::{Execution, ExecutionFilter};
use crate::store::{LOG_BYTES, StoreError};

/// Execution log rows written in one statement at most.
const LOG_BATCH: usize = 2000;

impl Postgres {
    /// As the file's: dropped, and counted, when the writer is that far behind.
    pub(in crate::store) fn log(&self, rows: Vec<Execution>) {
        if rows.is_empty() {
            return;
        }
        let inner = &*self.inner;
        crate::store::offer_log(
            rows,
            &inner.logs,
            &inner.log_bytes,
            LOG_BYTES,
            &inner.dropped,
        );
    }

    pub(in crate::store) fn dropped_log_rows(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Writes the execution log rows as they come, in batches of what has gathered.
    pub(super) async fn write_logs(self, mut rx: mpsc::Receiver<Vec<Execution>>) {
        let query = self.sql(
            "INSERT INTO {s}.executions (at, handler, event, object_id, outcome, event_id, row) \
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::text[], $7::text[])",
        );
        let mut batch: Vec<Execution> = Vec::new();
        loop {
            // The sender lives as long as the store, so a stop ends the task: once what
            // is queued has been written (`recv` first, while it has rows).
            let rows = tokio::select! {
                biased;
                rows = rx.recv() => rows,
                () = self.inner.stop.cancelled() => rx.try_recv().ok(),
            };
            let Some(rows) = rows else { return };
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

    pub(in crate::store) async fn executions(
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
}
