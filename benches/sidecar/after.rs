//! After stage, one HTTP handler: events accepted per second when each is committed to
//! the store before its 200, against the same sidecar whose handler does not take the
//! event (nothing to store); the latency the commit adds at a steady rate; and how fast
//! the stored deliveries then drain to the handler; and this disk's fdatasync rate, the
//! physical bound of one durable commit at a time, beside the stored accepts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::{
    Row, Sidecar, Summary, closed_loop, cpu_by_thread, cpu_split, fdatasync_rate, ms, open_loop,
    reply, start_server,
};

fn config(handler: SocketAddr, events: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[handler]]\nname = \"crm\"\n\
         events = [\"{events}\"]\nstage = \"after\"\nurl = \"http://{handler}/\"\n"
    )
}

pub(crate) async fn run(scale: f64, summary: &mut Vec<Summary>) -> Vec<Row> {
    let (handler, delivered) = start_counter();
    // The baseline's handler takes another event: same process, no store write.
    let baseline = Sidecar::start(&config(handler, "clients.create"));
    let stored = Sidecar::start(&config(handler, "clients.update"));
    let n = |x: usize| crate::common::scaled(x, scale, 100);
    let mut rows = Vec::new();

    // Latency at a steady 2,000 events/s: what the commit adds to the reply.
    let total_open = n(10_000);
    let plain = open_loop(&baseline.url("/events"), 2000.0, total_open).await;
    let durable = open_loop(&stored.url("/events"), 2000.0, total_open).await;
    let added_p50 = durable.quantile(0.5).saturating_sub(plain.quantile(0.5));
    let added_p99 = durable.quantile(0.99).saturating_sub(plain.quantile(0.99));
    let scenario = "4. after, 1 HTTP handler, 2000/s";
    rows.push(plain.row(scenario, "no delivery", ""));
    rows.push(durable.row(
        scenario,
        "stored",
        format!(
            "commit adds p50 {:.3} ms, p99 {:.3} ms",
            ms(added_p50),
            ms(added_p99)
        ),
    ));
    wait_for(&delivered, durable.latencies.len(), Duration::from_secs(60)).await;

    // Saturated: 32 connections back to back. A fresh store, so that no envelope of the
    // run above counts as a duplicate.
    drop(stored);
    let stored = Sidecar::start(&config(handler, "clients.update"));
    let total = n(20_000);
    let plain = closed_loop(&baseline.url("/events"), 32, total).await;
    let before = delivered.load(Ordering::Relaxed);
    let threads_before = cpu_by_thread(stored.pid());
    let started = Instant::now();
    let durable = closed_loop(&stored.url("/events"), 32, total).await;
    let accepted = durable.latencies.len();
    let drained = wait_for(&delivered, before + accepted, Duration::from_secs(120)).await;
    // What the store's writer did for them: its commits (from the sidecar's metrics) and
    // its thread's CPU, accepts and deliveries together.
    let threads = cpu_by_thread(stored.pid());
    let commits = Commits::of(&stored).await;
    let scenario = "4. after, 1 HTTP handler, saturated";
    rows.push(plain.row(scenario, "no delivery", ""));
    let drain = match drained {
        Some(at) => format!(
            "all {accepted} delivered {:.1} s after the first send ({:.0} deliveries/s)",
            (at - started).as_secs_f64(),
            accepted as f64 / (at - started).as_secs_f64()
        ),
        None => format!(
            "only {} of {accepted} delivered within 120 s",
            delivered.load(Ordering::Relaxed) - before
        ),
    };
    rows.push(durable.row(
        scenario,
        "stored",
        format!(
            "{:.2} x no-delivery throughput; {drain}",
            durable.rps() / plain.rps()
        ),
    ));

    // The disk, after the drain: how many commits of one small write it allows a second.
    let disk = fdatasync_rate(scale);
    let writer_us = cpu_split(&threads_before, &threads, accepted);
    let commits_note = format!(
        "{:.1} accepts per durable commit, {:.0} durable commits/s ({:.2} x the disk's \
         fdatasyncs/s), {:.3} ms each on average; threads, us per stored event: {writer_us}",
        accepted as f64 / commits.durable.max(1.0),
        commits.durable / durable.elapsed.as_secs_f64(),
        commits.durable / durable.elapsed.as_secs_f64() / disk.rps(),
        commits.durable_ms()
    );
    rows.push(disk.row("4. after, disk", "fdatasync of 8 KiB", commits_note.clone()));
    summary.push(Summary {
        note: format!("disk: {:.0} fdatasyncs/s; {commits_note}", disk.rps()),
        ..Summary::new(
            6,
            "durable after-stage accepts, distinct envelopes, 32 connections / no after-stage handler",
            "accepts/s",
            durable.rps(),
            "no after-stage handler",
            plain.rps(),
            ">= 0.4",
        )
    });
    rows
}

/// The store writer's commits so far, from a sidecar's `/metrics`
/// (`provisiond_store_commit_duration_seconds`).
struct Commits {
    durable: f64,
    durable_seconds: f64,
}

impl Commits {
    async fn of(sidecar: &Sidecar) -> Self {
        let text = crate::common::client()
            .get(sidecar.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        Self {
            durable: value("provisiond_store_commit_duration_seconds_count{durable=\"true\"}"),
            durable_seconds: value(
                "provisiond_store_commit_duration_seconds_sum{durable=\"true\"}",
            ),
        }
    }

    fn durable_ms(&self) -> f64 {
        self.durable_seconds * 1e3 / self.durable.max(1.0)
    }
}

/// Waits until `count` reaches `target`; when it did, or `None` after `limit`.
async fn wait_for(count: &AtomicUsize, target: usize, limit: Duration) -> Option<Instant> {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if count.load(Ordering::Relaxed) >= target {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

/// A handler that answers 204 and counts, on a runtime thread of its own.
fn start_counter() -> (SocketAddr, Arc<AtomicUsize>) {
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    let addr = start_server(move |_| {
        counter.fetch_add(1, Ordering::Relaxed);
        async { reply(hyper::StatusCode::NO_CONTENT, b"") }
    });
    (addr, count)
}
