//! The shared store (`store.backend = "postgres"`), against the redb backend in the
//! same run: durable accepts and deliveries per second with redb, with one sidecar on
//! PostgreSQL and with three sidecars on one PostgreSQL (the load spread over the
//! three); the latency the commit adds at 500 events/s on both backends; the time a
//! survivor takes to deliver a `kill -9`ed sidecar's lanes; and this disk's fdatasync
//! rate, the physical bound of every durable commit.
//!
//! The PostgreSQL server is the tests' throwaway one (`tests/common/pg.rs`: `initdb` in
//! a temp dir under `/tmp`, `fsync = on`), with what an operator of a real database
//! would set on top ([`OPERATOR_SETTINGS`]); `synchronous_commit` stays `on`, since
//! durability is what is measured. Not in the default set (it needs PostgreSQL, and it
//! keeps the disk busy): `cargo bench --bench sidecar -- shared`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt as _;

use crate::common::{
    Rounds, Row, Sidecar, Stats, client, closed_loop_over, cpu_time, fdatasync_rate, one, paced,
    reply, scaled,
};

// The tests' harness, as it is: it needs a `free_addr` in its parent module (below).
#[path = "../../tests/common/pg.rs"]
#[allow(dead_code, reason = "the bench uses a part of the tests' harness")]
mod pg;

use pg::PgServer;

/// What an operator sets on a dedicated database server that differs from the
/// defaults (and from the tests' 16 MB of shared buffers): shared buffers sized for the
/// data, and room for WAL between checkpoints, so that no checkpoint is forced in the
/// middle of a burst. `synchronous_commit = on` is the default, said again.
const OPERATOR_SETTINGS: &[(&str, &str)] = &[
    ("shared_buffers", "1GB"),
    ("max_wal_size", "4GB"),
    ("synchronous_commit", "on"),
];
/// Connections of the saturated runs, spread evenly over the sidecars of a run.
const CONNECTIONS: usize = 48;
/// Distinct entities (client ids) the events are about.
const ENTITIES: usize = 10_000;
/// The steady rate of the latency runs.
const RATE: f64 = 500.0;
/// The takeover run's lease.
const LEASE: &str = "5s";
const LEASE_SECS: f64 = 5.0;

/// Sockets bound, never listening, that hold the ports the harness hands out (what
/// `tests/common/mod.rs` does for the tests).
static RESERVED: Mutex<Vec<tokio::net::TcpSocket>> = Mutex::new(Vec::new());

/// A loopback address whose port stays reserved for this process (`pg.rs` takes its
/// servers' ports from here).
fn free_addr() -> SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    RESERVED.lock().unwrap().push(socket);
    addr
}

static BASE: LazyLock<Instant> = LazyLock::new(Instant::now);

#[allow(
    clippy::cast_possible_truncation,
    reason = "nanoseconds since the bench started fit 64 bits for 584 years"
)]
fn now_ns() -> u64 {
    BASE.elapsed().as_nanos() as u64
}

fn at_ns(ns: u64) -> Instant {
    *BASE + Duration::from_nanos(ns)
}

/// A distinct `clients.update` envelope: `seq` makes it unique (the after stage dedupes
/// identical ones), and the events are spread over [`ENTITIES`] clients.
fn envelope(seq: usize) -> Bytes {
    envelope_about(seq, seq % ENTITIES)
}

/// A distinct `clients.update` envelope about client `id`.
fn envelope_about(seq: usize, id: usize) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "event": {"dt": "2026-11-26T10:00:00+00:00", "events_id": "clients.update", "object_id": id},
            "data": {"id": id, "name": "My changed name", "balance": "12.50", "companies_id": 3,
                     "email": "ops@acme.example", "seq": seq},
        })
        .to_string(),
    )
}

/// Sequence numbers of warm-up requests: never those of a measured run.
const WARM_SEQ: usize = 1_000_000_000;

fn config(handler: SocketAddr, events: &str, store: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n{store}\n[[handler]]\nname = \"crm\"\n\
         events = [\"{events}\"]\nstage = \"after\"\nurl = \"http://{handler}/\"\n"
    )
}

fn pg_store(server: &PgServer, db: &str, lease: Option<&str>) -> String {
    let lease = lease.map_or(String::new(), |l| format!("lease = \"{l}\"\n"));
    format!(
        "[store]\nbackend = \"postgres\"\nurl = \"{}\"\n{lease}",
        server.url(db)
    )
}

/// A handler answering 200 at once that counts, and notes when it was last called.
struct Counter {
    addr: SocketAddr,
    count: Arc<AtomicUsize>,
    last: Arc<AtomicU64>,
}

fn start_counter() -> Counter {
    let count = Arc::new(AtomicUsize::new(0));
    let last = Arc::new(AtomicU64::new(0));
    let (c, l) = (count.clone(), last.clone());
    let addr = crate::common::start_server(move |_| {
        c.fetch_add(1, Ordering::Relaxed);
        l.fetch_max(now_ns(), Ordering::Relaxed);
        async { reply(hyper::StatusCode::OK, b"") }
    });
    Counter { addr, count, last }
}

/// One delivery as a recording handler saw it.
#[derive(Clone, Copy)]
struct Seen {
    at: Instant,
    entity: u64,
    seq: u64,
}

/// A handler that answers 200 after `delay` and records every call.
fn start_recorder(delay: Duration) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let addr = crate::common::start_server(move |request: hyper::Request<_>| {
        let log = log.clone();
        async move {
            let at = Instant::now();
            let body = request
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            log.lock().unwrap().push(Seen {
                at,
                entity: v["event"]["object_id"].as_u64().unwrap_or(u64::MAX),
                seq: v["data"]["seq"].as_u64().unwrap_or(u64::MAX),
            });
            tokio::time::sleep(delay).await;
            reply(hyper::StatusCode::OK, b"")
        }
    });
    (addr, seen)
}

/// Waits until every sidecar says it is ready (its store open).
async fn ready(sidecars: &[&Sidecar]) {
    let client = client();
    for sidecar in sidecars {
        let url = sidecar.url("/readyz");
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = client
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                break;
            }
            assert!(Instant::now() < until, "{url} never got ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Fills the client's pools to every sidecar (and theirs to the handler) with
/// `width` connections in all, with envelopes no measured run sends; how many were
/// accepted.
async fn warm(client: &reqwest::Client, urls: &[String], width: usize, seq: &mut usize) -> usize {
    let mut accepted = 0;
    for _ in 0..3 {
        let tasks: Vec<_> = (0..width)
            .map(|i| {
                let (client, url) = (client.clone(), urls[i % urls.len()].clone());
                let body = envelope(*seq + i);
                tokio::spawn(async move { one(&client, &url, body).await })
            })
            .collect();
        *seq += width;
        for task in tasks {
            accepted += usize::from(task.await.unwrap().is_some());
        }
    }
    accepted
}

/// Waits until `count` reaches `target`, at most `limit`; whether it did.
async fn wait_for(count: &AtomicUsize, target: usize, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    while count.load(Ordering::Relaxed) < target {
        if Instant::now() > until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    true
}

/// Busy and total CPU time of the machine so far, in clock ticks, from /proc/stat.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let values: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// CPU time of the postmaster and every process it started, from /proc.
fn server_cpu(server: &PgServer) -> Duration {
    let Some(postmaster) = server.pid() else {
        return Duration::ZERO;
    };
    let postmaster = u32::try_from(postmaster).unwrap_or(0);
    let mut total = cpu_time(postmaster);
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(postmaster) {
            total += cpu_time(pid);
        }
    }
    total
}

/// Transaction ids assigned so far (one per transaction that writes, in the whole
/// cluster: only the bench's databases are in it) and bytes of WAL written so far. Both
/// exact at once, unlike the statistics views, which backends update lazily.
fn pg_counters(server: &PgServer) -> (u64, u64) {
    let row = server.psql(
        "postgres",
        "SELECT txid_current(), pg_current_wal_lsn() - '0/0'::pg_lsn",
    );
    let (xid, lsn) = row.split_once('|').unwrap_or_default();
    (
        xid.trim().parse().unwrap_or(0),
        lsn.trim()
            .split('.')
            .next()
            .unwrap_or_default()
            .parse()
            .unwrap_or(0),
    )
}

/// The CPU spent by the sidecars, the database and the whole machine over a run.
struct Cpu {
    sidecars: Duration,
    server: Duration,
    machine: (u64, u64),
}

fn cpu_now(sidecars: &[Sidecar], server: Option<&PgServer>) -> Cpu {
    Cpu {
        sidecars: sidecars.iter().map(|s| cpu_time(s.pid())).sum(),
        server: server.map_or(Duration::ZERO, server_cpu),
        machine: machine_ticks(),
    }
}

/// "sidecars X us, postgres Y us per event; Z% of the 2 cores busy".
#[allow(
    clippy::cast_precision_loss,
    reason = "tick counts and event counts far below 2^52"
)]
fn cpu_note(before: &Cpu, after: &Cpu, events: usize, server: bool) -> String {
    let per = |d: Duration| d.as_secs_f64() * 1e6 / events.max(1) as f64;
    let busy = (after.machine.0 - before.machine.0) as f64
        / (after.machine.1 - before.machine.1).max(1) as f64;
    let mut note = format!(
        "CPU per event (its accept and its delivery), first send to last delivery: \
         sidecars {:.0} us",
        per(after.sidecars - before.sidecars)
    );
    if server {
        note += &format!(", postgres {:.0} us", per(after.server - before.server));
    }
    note + &format!("; machine {:.0}% busy", busy * 100.0)
}

/// Saturated: `connections` back to back over `sidecars`, `total` distinct envelopes;
/// then the drain, timed from the first send to the last delivery.
#[allow(
    clippy::cast_precision_loss,
    reason = "counts of a few hundred thousand at most"
)]
async fn saturated(
    target: &str,
    configs: &[String],
    handler: &Counter,
    server: Option<&PgServer>,
    total: usize,
) -> (Row, f64) {
    let sidecars: Vec<Sidecar> = configs.iter().map(|c| Sidecar::start(c)).collect();
    ready(&sidecars.iter().collect::<Vec<_>>()).await;
    let urls: Vec<String> = sidecars.iter().map(|s| s.url("/events")).collect();
    let client = client();
    let mut seq = WARM_SEQ;
    let base = handler.count.load(Ordering::Relaxed);
    let warmed = warm(&client, &urls, CONNECTIONS, &mut seq).await;
    wait_for(&handler.count, base + warmed, Duration::from_secs(60)).await;
    let base = handler.count.load(Ordering::Relaxed);
    let counters = server.map_or((0, 0), pg_counters);
    let before = cpu_now(&sidecars, server);
    let started = Instant::now();
    let stats = closed_loop_over(&client, &urls, CONNECTIONS, total, envelope).await;
    let during = handler.count.load(Ordering::Relaxed) - base;
    let accepted = stats.latencies.len();
    let drained = wait_for(&handler.count, base + accepted, Duration::from_secs(300)).await;
    let after = cpu_now(&sidecars, server);
    // The last delivery's settlement and its lane's release commit just after it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let wal = server.map(|s| {
        let (xids, bytes) = pg_counters(s);
        format!(
            "; per event {:.1} writing transactions and {:.1} KiB of WAL",
            (xids - counters.0) as f64 / accepted.max(1) as f64,
            (bytes - counters.1) as f64 / 1024.0 / accepted.max(1) as f64
        )
    });
    let delivered = handler.count.load(Ordering::Relaxed) - base;
    let span = (at_ns(handler.last.load(Ordering::Relaxed)) - started).as_secs_f64();
    let rate = delivered as f64 / span;
    let drain = if drained {
        format!(
            "all {accepted} delivered {span:.1} s after the first send: {rate:.0} deliveries/s \
             ({:.0}/s while the load ran)",
            during as f64 / stats.elapsed.as_secs_f64()
        )
    } else {
        format!("only {delivered} of {accepted} delivered within 300 s")
    };
    let note = format!(
        "{CONNECTIONS} connections; {drain}; {}",
        cpu_note(&before, &after, accepted, server.is_some())
    ) + &wal.unwrap_or_default();
    (stats.row("10. shared store, saturated", target, note), rate)
}

/// At [`RATE`] events/s: `total` distinct envelopes, timed from their own sends.
async fn steady(url: &str, total: usize, seq0: usize) -> Stats {
    let client = client();
    let mut seq = WARM_SEQ + seq0;
    warm(&client, &[url.to_owned()], 16, &mut seq).await;
    let url = url.to_owned();
    paced(RATE, total, move |i| {
        let (client, url) = (client.clone(), url.clone());
        async move { one(&client, &url, envelope(seq0 + i)).await }
    })
    .await
}

/// 2 sidecars with `lease = 5s`, a handler that takes 100 ms, the load on one of them;
/// that one is killed (SIGKILL) while it holds lanes with queued work. The time from
/// the kill to the survivor's first delivery of one of those lanes.
#[allow(
    clippy::cast_precision_loss,
    reason = "counts of a few hundred at most"
)]
async fn takeover(server: &PgServer) -> Row {
    const LANES: usize = 12;
    const PER_LANE: usize = 30;
    let db = "takeover";
    server.create_database(db);
    // One handler server per sidecar, so that each delivery says who made it.
    let (victim_handler, victim_seen) = start_recorder(Duration::from_millis(100));
    let (survivor_handler, survivor_seen) = start_recorder(Duration::from_millis(100));
    let store = pg_store(server, db, Some(LEASE));
    let mut victim = Sidecar::start(&config(victim_handler, "clients.update", &store));
    let survivor = Sidecar::start(&config(survivor_handler, "clients.update", &store));
    ready(&[&victim, &survivor]).await;

    // Each lane's events in order, the lanes at once, all to the victim.
    let client = client();
    let url = victim.url("/events");
    let senders: Vec<_> = (0..LANES)
        .map(|lane| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let mut accepted = 0;
                for k in 0..PER_LANE {
                    let body = envelope_about(lane * PER_LANE + k, lane);
                    accepted += usize::from(one(&client, &url, body).await.is_some());
                }
                accepted
            })
        })
        .collect();
    let mut accepted = 0;
    for sender in senders {
        accepted += sender.await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The lanes the victim holds with work queued, and how long their leases have left.
    let held = server.psql(
        db,
        &format!(
            "SELECT entity, pending, EXTRACT(EPOCH FROM lease_until - now()) FROM provisiond.lanes \
             WHERE owner LIKE '%/{}/%' AND pending > 0",
            victim.pid()
        ),
    );
    let mut lanes: HashSet<u64> = HashSet::new();
    let (mut queued, mut left) = (0, f64::INFINITY);
    for line in held.lines() {
        let fields: Vec<&str> = line.split('|').collect();
        if let [entity, pending, remaining] = fields.as_slice() {
            if let Some(id) = entity.strip_prefix("clients/").and_then(|i| i.parse().ok()) {
                lanes.insert(id);
            }
            queued += pending.parse::<u64>().unwrap_or(0);
            left = left.min(remaining.parse().unwrap_or(f64::NAN));
        }
    }
    victim.child.kill().unwrap();
    let killed = Instant::now();
    let _ = victim.child.wait();
    let victim_count = victim_seen.lock().unwrap().len();

    let first = loop {
        let found = survivor_seen
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.at > killed && lanes.contains(&s.entity))
            .map(|s| s.at);
        if let Some(at) = found {
            break Some(at - killed);
        }
        if killed.elapsed() > Duration::from_secs(60) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    // Then every accepted envelope must arrive, once at least, at one of the two.
    let until = Instant::now() + Duration::from_secs(60);
    let (distinct, calls) = loop {
        let all: Vec<Seen> = victim_seen
            .lock()
            .unwrap()
            .iter()
            .chain(survivor_seen.lock().unwrap().iter())
            .copied()
            .collect();
        let distinct = all.iter().map(|s| s.seq).collect::<HashSet<_>>().len();
        if distinct >= accepted || Instant::now() > until {
            break (distinct, all.len());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    drop(survivor);
    let took = first.map_or(f64::NAN, |d| d.as_secs_f64());
    let verdict = if took <= LEASE_SECS + 1.0 {
        "met"
    } else {
        "not met"
    };
    let took_text = first.map_or("no takeover within 60 s".to_owned(), |d| {
        format!("{:.2} s", d.as_secs_f64())
    });
    Row {
        scenario: "10. shared store, takeover".into(),
        target: format!("2 sidecars, lease {LEASE}, kill -9"),
        requests: accepted,
        errors: LANES * PER_LANE - accepted,
        rps: f64::NAN,
        p50_ms: took * 1000.0,
        p99_ms: f64::NAN,
        note: format!(
            "kill to the survivor's first delivery of the victim's lanes: {took_text} \
             (target lease + 1 s: {verdict}); the victim held {} lanes with {queued} queued, \
             its leases had {left:.2} s left at the kill; it had made {victim_count} calls; \
             {distinct} of {accepted} accepted delivered, {} calls in all",
            lanes.len(),
            calls
        ),
    }
}

pub(crate) async fn run(scale: f64) -> Vec<Row> {
    if !pg::installed() {
        return Vec::new();
    }
    let mut rows = Vec::new();
    let disk = fdatasync_rate(scale);
    let fsyncs = disk.rps();
    rows.push(disk.row(
        "10. shared store, disk",
        "fdatasync of 8 KiB",
        "the physical bound of one durable commit at a time: the figures below are \
         multiples of this rate",
    ));

    let mut server = tokio::task::block_in_place(PgServer::start);
    for (key, value) in OPERATOR_SETTINGS {
        server.psql("postgres", &format!("ALTER SYSTEM SET {key} = '{value}'"));
    }
    let statements = std::env::var_os("PROVISIOND_BENCH_STATEMENTS").is_some();
    if statements {
        server.psql(
            "postgres",
            "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'",
        );
    }
    server.stop();
    server.restart();
    if statements {
        // Statements inside `enqueue` and `settle` too.
        server.psql(
            "postgres",
            "ALTER SYSTEM SET pg_stat_statements.track = 'all'",
        );
        server.psql("postgres", "SELECT pg_reload_conf()");
    }
    let settings = server.psql(
        "postgres",
        "SELECT string_agg(name || ' = ' || current_setting(name), ', ' ORDER BY name) \
         FROM pg_settings WHERE name IN ('shared_buffers', 'max_wal_size', \
         'synchronous_commit', 'fsync', 'wal_sync_method', 'commit_delay', 'server_version')",
    );
    eprintln!("   postgres: {settings}");

    // 1 and 2: saturated, each run on a fresh store (nothing deduped, no backlog).
    let handler = start_counter();
    let total = scaled(30_000, scale, 1000);
    let mut runs: Vec<(&str, Vec<String>)> = vec![(
        "redb, 1 sidecar",
        vec![config(handler.addr, "clients.update", "")],
    )];
    server.create_database("one");
    runs.push((
        "postgres, 1 sidecar",
        vec![config(
            handler.addr,
            "clients.update",
            &pg_store(&server, "one", None),
        )],
    ));
    server.create_database("three");
    let three = config(
        handler.addr,
        "clients.update",
        &pg_store(&server, "three", None),
    );
    runs.push((
        "postgres, 3 sidecars",
        vec![three.clone(), three.clone(), three],
    ));
    for (target, configs) in &runs {
        eprintln!("   saturated: {target}");
        let pg = target.starts_with("postgres").then_some(&server);
        if let Some(server) = pg.filter(|_| statements) {
            server.psql(
                "postgres",
                "CREATE EXTENSION IF NOT EXISTS pg_stat_statements; \
                 SELECT pg_stat_statements_reset()",
            );
        }
        let (mut row, deliveries) = saturated(target, configs, &handler, pg, total).await;
        if let Some(server) = pg.filter(|_| statements) {
            eprintln!("   statements of {target}, by total time (ms, calls, ms per call):");
            eprintln!(
                "{}",
                server.psql(
                    "postgres",
                    "SELECT round(total_exec_time) || ' | ' || calls || ' | ' || \
                     round((total_exec_time / calls)::numeric, 3) || ' | ' || \
                     left(regexp_replace(query, '\\s+', ' ', 'g'), 110) \
                     FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 14",
                )
            );
        }
        row.note = format!(
            "{:.1} x the disk's fdatasync rate ({:.1} x for deliveries); {}",
            row.rps / fsyncs,
            deliveries / fsyncs,
            row.note
        );
        rows.push(row);
    }

    // 3: the commit's latency at a steady 500/s, against the same sidecar whose handler
    // takes another event (no after-stage delivery: nothing to store).
    server.create_database("steady");
    let pg = pg_store(&server, "steady", None);
    let targets = [
        (
            "redb, no after-stage delivery",
            config(handler.addr, "clients.create", ""),
        ),
        ("redb, stored", config(handler.addr, "clients.update", "")),
        (
            "postgres, no after-stage delivery",
            config(handler.addr, "clients.create", &pg),
        ),
        (
            "postgres, stored",
            config(handler.addr, "clients.update", &pg),
        ),
    ];
    let sidecars: Vec<Sidecar> = targets.iter().map(|(_, c)| Sidecar::start(c)).collect();
    ready(&sidecars.iter().collect::<Vec<_>>()).await;
    let mut rounds: Vec<Rounds> = targets.iter().map(|_| Rounds::default()).collect();
    let steady_total = scaled(3000, scale, 300);
    let round_count = if scale < 1.0 { 1 } else { 3 };
    for round in 0..round_count {
        for (k, sidecar) in sidecars.iter().enumerate() {
            eprintln!("   {RATE}/s round {round}: {}", targets[k].0);
            let stats = steady(&sidecar.url("/events"), steady_total, round * 10_000_000).await;
            rounds[k].push(stats);
            // Let the stored deliveries drain before the next target.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let scenario = "10. shared store, 500/s";
    for (k, (target, _)) in targets.iter().enumerate() {
        let note = if k % 2 == 1 {
            let base = &rounds[k - 1];
            format!(
                "commit adds p50 {:.3} ms, p99 {:.3} ms ({round_count} rounds, medians)",
                rounds[k].added(base, 0.5),
                rounds[k].added(base, 0.99)
            )
        } else {
            String::new()
        };
        rows.push(rounds[k].row(scenario, target, note));
    }
    drop(sidecars);

    // 4: takeover.
    eprintln!("   takeover");
    rows.push(takeover(&server).await);
    drop(server);
    rows
}
