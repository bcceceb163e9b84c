//! A backlog left in the store: 1,000,000 deliveries for 100,000 entities, written with
//! the library (as a long outage of a handler would leave them), then a sidecar started
//! on the file. Its resident memory while it resumes and drains is measured against the
//! same sidecar on an empty store, and so is how fast it delivers from the backlog.
//! Not in the default set (it writes a file of some 300 MB): `cargo bench --bench
//! sidecar -- backlog`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use provisiond::store::{NewDelivery, Store};

use crate::common::{Row, Sidecar, reply, start_server};

const ENTITIES: usize = 100_000;
const PER_ENTITY: usize = 10;
/// How long the draining sidecar is watched.
const WATCH: Duration = Duration::from_secs(20);

pub(crate) async fn run(scale: f64) -> Vec<Row> {
    let entities = crate::common::scaled(ENTITIES, scale, 1000);
    let total = entities * PER_ENTITY;
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    let handler = start_server(move |_| {
        counter.fetch_add(1, Ordering::Relaxed);
        async { reply(hyper::StatusCode::NO_CONTENT, b"") }
    });
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[handler]]\nname = \"crm\"\n\
         events = [\"*\"]\nstage = \"after\"\nurl = \"http://{handler}/\"\n"
    );

    // Baseline: the same sidecar on an empty store, watched as long.
    let empty = Sidecar::start(&config);
    let sampler = empty.sample_rss();
    tokio::time::sleep(WATCH).await;
    let empty_peak = sampler.stop();
    drop(empty);

    let dir = tempfile::TempDir::new().unwrap();
    let written = Instant::now();
    write_backlog(&dir.path().join("provisiond.db"), entities).await;
    eprintln!(
        "   {total} deliveries written in {:.1} s",
        written.elapsed().as_secs_f64()
    );
    let path = dir.path().join("provisioning.toml");
    std::fs::write(&path, &config).unwrap();
    let started = Instant::now();
    let sidecar = Sidecar::start_in(dir, &path);
    let listening = started.elapsed();
    let sampler = sidecar.sample_rss();
    let before = count.load(Ordering::Relaxed);
    tokio::time::sleep(WATCH).await;
    let delivered = count.load(Ordering::Relaxed) - before;
    let peak = sampler.stop();
    let rate = delivered as f64 / WATCH.as_secs_f64();
    let scenario = "9. backlog resumed";
    vec![
        Row {
            scenario: scenario.into(),
            target: "empty store".into(),
            requests: 0,
            errors: 0,
            rps: 0.0,
            p50_ms: 0.0,
            p99_ms: 0.0,
            note: format!(
                "peak RSS {:.1} MiB over {} s",
                empty_peak as f64 / 1024.0,
                WATCH.as_secs()
            ),
        },
        Row {
            scenario: scenario.into(),
            target: format!("{total} stored, {entities} entities"),
            requests: delivered,
            errors: 0,
            rps: rate,
            p50_ms: 0.0,
            p99_ms: 0.0,
            note: format!(
                "peak RSS {:.1} MiB; listening {:.1} s after start; {delivered} \
                 delivered in the next {} s",
                peak as f64 / 1024.0,
                listening.as_secs_f64(),
                WATCH.as_secs()
            ),
        },
    ]
}

/// Stores `PER_ENTITY` deliveries for each of `entities`, interleaved as events of many
/// clients arrive, a thousand per commit.
async fn write_backlog(path: &std::path::Path, entities: usize) {
    let store = Store::open_file(path).unwrap();
    let mut batch = Vec::with_capacity(1000);
    for round in 0..PER_ENTITY {
        for entity in 0..entities {
            let body = format!(
                r#"{{"event":{{"dt":"2026-11-26T10:00:00+00:00","events_id":"clients.update","object_id":{entity}}},"data":{{"seq":{round}}}}}"#
            );
            batch.push(NewDelivery {
                handler: "crm".into(),
                event: "clients.update".into(),
                object_id: entity.to_string(),
                entity: format!("clients/{entity}"),
                message_id: format!("msg_{round}_{entity}"),
                body,
                dedupe: None,
                event_id: None,
            });
            if batch.len() == 1000 {
                store
                    .enqueue(std::mem::take(&mut batch), Duration::ZERO)
                    .await
                    .unwrap();
            }
        }
    }
    if !batch.is_empty() {
        store.enqueue(batch, Duration::ZERO).await.unwrap();
    }
    store.close().await;
}
