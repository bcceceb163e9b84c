//! Crash and chaos: the real binary under load from several clients, killed with
//! `kill -9` at a random moment and restarted on the same store, cycle after cycle,
//! delivering to a real HTTP handler that is sometimes slow and sometimes fails.
//!
//! At the end, once everything has drained, it prints what was acknowledged (answered
//! 200), delivered, lost (acknowledged, never delivered), duplicated (delivered more than
//! once: allowed, deliveries are at least once) and the per-entity order violations
//! (two events of one entity, answered one after the other to the same client,
//! delivered the other way round). Lost and order violations must be 0.
//!
//! `cargo test --test it chaos::` runs a short version (4 cycles of up to 1.5 s of load).
//! For minutes of it:
//!
//! ```sh
//! PROVISIOND_CHAOS_CYCLES=100 cargo test --release --test it chaos:: -- --nocapture
//! ```
//!
//! `PROVISIOND_CHAOS_CYCLE_MS` sets the longest a cycle runs before its kill (1500),
//! `PROVISIOND_CHAOS_SEED` the random seed (printed on every run, so a failure can be
//! replayed).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::json;

/// Clients sending at once.
const CLIENTS: u64 = 6;
/// Entities the clients share: client 12, 13... (every event below is about a client).
const ENTITIES: u64 = 24;
/// Events of the `clients/<id>` entity: they must all be ordered together.
const EVENTS: &[&str] = &[
    "clients.update",
    "clients.custom_fields.update",
    "clients.balance_zero",
    "clients.balance_notzero",
];
/// A client gives up on one event after this long (the event then counts as not
/// acknowledged, and its client goes on with the next).
const GIVE_UP: Duration = Duration::from_secs(30);
/// At most this many events per client, whatever the env says: loops stay bounded.
const MAX_EVENTS: u64 = 1_000_000;

/// One event a client sent: who sent it, about which entity, its place in that
/// client's sequence for the entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Sent {
    client: u64,
    entity: u64,
    seq: u64,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Sends events until `stop`, each until it is answered 200 (the same bytes again on a
/// failure, as the billing retries) or [`GIVE_UP`]; records what was acknowledged.
async fn client(
    client: u64,
    socket: PathBuf,
    seed: u64,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Sent>>>,
) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // No short timeout: a client never hangs up on a sidecar that is alive (a request
    // ends when the sidecar answers or dies), so what is measured is crashes, not
    // hang-ups.
    let http = reqwest::Client::builder()
        .unix_socket(socket)
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let mut rng = fastrand::Rng::with_seed(seed ^ (client << 32));
    let mut seqs: HashMap<u64, u64> = HashMap::new();
    for _ in 0..MAX_EVENTS {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let entity = 12 + rng.u64(0..ENTITIES);
        let seq = {
            let next = seqs.entry(entity).or_insert(0);
            *next += 1;
            *next
        };
        let event = EVENTS[rng.usize(0..EVENTS.len())];
        let body = json!({
            "event": {"dt": "2026-11-26T10:00:00+00:00", "events_id": event, "object_id": entity},
            "data": {"client": client, "seq": seq},
        })
        .to_string();
        let until = Instant::now() + GIVE_UP;
        while Instant::now() < until {
            match http
                .post("http://localhost/events")
                .body(body.clone())
                .send()
                .await
            {
                Ok(r) if r.status() == 200 => {
                    acked.lock().unwrap().push(Sent {
                        client,
                        entity,
                        seq,
                    });
                    break;
                }
                // Down, restarting, or 503: try again shortly.
                Ok(r) if r.status().is_server_error() => {}
                Err(_) => {}
                Ok(r) => panic!("{body} answered {}", r.status()),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The after-stage handler: now and then slow, now and then a 500; records every
/// delivery it accepts (answers 200), in order.
async fn flaky_handler(seed: u64, delivered: Arc<Mutex<Vec<Sent>>>) -> HandlerServer {
    let rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(seed)));
    HandlerServer::start(move |call| {
        let (rng, delivered) = (rng.clone(), delivered.clone());
        async move {
            let (roll, pause) = {
                let mut rng = rng.lock().unwrap();
                (rng.u32(0..100), rng.u64(20..150))
            };
            if roll < 10 {
                return reply(500, "try again");
            }
            if roll < 20 {
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            let envelope = call.json();
            delivered.lock().unwrap().push(Sent {
                client: envelope["data"]["client"].as_u64().unwrap(),
                entity: envelope["event"]["object_id"].as_u64().unwrap(),
                seq: envelope["data"]["seq"].as_u64().unwrap(),
            });
            reply(200, "")
        }
    })
    .await
}

/// `provisiond_after_queue_depth{handler="crm"}`, when the sidecar answers.
async fn queue_depth(sidecar: &Sidecar) -> Option<f64> {
    let (status, text) = sidecar.get("/metrics").await;
    if status != 200 {
        return None;
    }
    text.as_str()?
        .lines()
        .find(|l| l.starts_with("provisiond_after_queue_depth{handler=\"crm\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// What the run adds up to.
#[derive(Debug)]
struct Tally {
    acknowledged: usize,
    delivered: usize,
    lost: Vec<Sent>,
    duplicated: usize,
    order_violations: Vec<String>,
}

fn tally(acked: &[Sent], delivered: &[Sent]) -> Tally {
    let acked_set: HashSet<Sent> = acked.iter().copied().collect();
    let mut first_seen: HashSet<Sent> = HashSet::new();
    let mut duplicated = 0;
    // Per entity and client: the last seq delivered (first deliveries of acknowledged
    // events only; a repeat after a crash is at least once, not disorder).
    let mut last: HashMap<(u64, u64), u64> = HashMap::new();
    let mut order_violations = Vec::new();
    for d in delivered {
        if !first_seen.insert(*d) {
            duplicated += 1;
            continue;
        }
        if !acked_set.contains(d) {
            continue;
        }
        let previous = last.entry((d.entity, d.client)).or_insert(0);
        if d.seq < *previous {
            order_violations.push(format!(
                "client {} entity {}: seq {} delivered after seq {}",
                d.client, d.entity, d.seq, previous
            ));
        }
        *previous = (*previous).max(d.seq);
    }
    let lost: Vec<Sent> = acked
        .iter()
        .filter(|a| !first_seen.contains(a))
        .copied()
        .collect();
    Tally {
        acknowledged: acked_set.len(),
        delivered: first_seen.len(),
        lost,
        duplicated,
        order_violations,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_load_loses_nothing_acknowledged_and_keeps_entity_order() {
    let cycles = env_u64("PROVISIOND_CHAOS_CYCLES", 4);
    let cycle_ms = env_u64("PROVISIOND_CHAOS_CYCLE_MS", 1500).max(300);
    let seed = env_u64("PROVISIOND_CHAOS_SEED", fastrand::u64(..));
    println!("chaos: {cycles} cycles of up to {cycle_ms} ms, seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);

    let delivered = Arc::new(Mutex::new(Vec::new()));
    let handler = flaky_handler(seed, delivered.clone()).await;
    let dir = tempfile::TempDir::new().unwrap();
    let socket = dir.path().join("provisiond.sock");
    let config = format!(
        "[server]\nlisten = \"unix:{}\"\n{}",
        socket.display(),
        after_handler(
            "crm",
            &handler.url("/hook"),
            "timeout = \"2s\"\nretry = { attempts = 1000, backoff = \"10ms\", max_backoff = \"200ms\" }"
        )
    );
    let mut sidecar = Sidecar::start_in(dir, &config, &[]);

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| tokio::spawn(client(c, socket.clone(), seed, stop.clone(), acked.clone())))
        .collect();

    for cycle in 1..=cycles {
        let run_for = Duration::from_millis(rng.u64(200..=cycle_ms));
        tokio::time::sleep(run_for).await;
        let (dir, config_path) = sidecar.kill_9();
        println!(
            "cycle {cycle}: killed after {} ms; {} acknowledged, {} delivered so far",
            run_for.as_millis(),
            acked.lock().unwrap().len(),
            delivered.lock().unwrap().len()
        );
        sidecar = Sidecar::spawn(dir, config_path, &[]);
    }

    // Stop the load; every client finishes the event it is on.
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    // Drain: everything acknowledged delivered, and the queue empty. A release build's
    // clients outrun the flaky handler by far (300,000 events in 60 cycles), so the
    // drain is given as long as deliveries go on, and ends when none came for a while.
    let patience = Duration::from_secs(30);
    let mut last = (0, Instant::now());
    loop {
        let (all_there, count) = {
            let delivered = delivered.lock().unwrap();
            let got: HashSet<Sent> = delivered.iter().copied().collect();
            (acked.iter().all(|a| got.contains(a)), delivered.len())
        };
        if all_there && queue_depth(&sidecar).await == Some(0.0) {
            break;
        }
        if count != last.0 {
            last = (count, Instant::now());
        } else if last.1.elapsed() > patience {
            println!("not drained: no delivery for {patience:?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, letters) = sidecar.get("/v1/deadletters").await;
    assert_eq!(status, 200);
    // The execution log, written in blocks by commits that the kills cut short, reads
    // back: each row once, newest first.
    let (status, log) = sidecar.get("/v1/executions?limit=1000").await;
    assert_eq!(status, 200, "{log}");
    let ids: Vec<u64> = log["executions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["id"].as_u64().unwrap())
        .collect();
    assert!(!ids.is_empty(), "no execution log rows after the run");
    assert!(
        ids.windows(2).all(|w| w[0] > w[1]),
        "execution log ids not unique and newest first"
    );

    let t = tally(&acked, &delivered.lock().unwrap());
    println!(
        "chaos: {} cycles: acknowledged {}, delivered {}, lost {}, duplicated {}, \
         order violations {}, dead letters {}",
        cycles,
        t.acknowledged,
        t.delivered,
        t.lost.len(),
        t.duplicated,
        t.order_violations.len(),
        letters["count"]
    );
    assert!(t.acknowledged > 0, "nothing was acknowledged");
    assert_eq!(
        t.acknowledged,
        acked.len(),
        "an event was acknowledged twice"
    );
    assert!(
        t.lost.is_empty(),
        "acknowledged and never delivered (seed {seed}): {:?}",
        &t.lost[..t.lost.len().min(20)]
    );
    assert!(
        t.order_violations.is_empty(),
        "order violations (seed {seed}): {:?}",
        &t.order_violations[..t.order_violations.len().min(20)]
    );
    assert_eq!(letters["count"], 0, "{letters}");
}

/// The tally itself: a lost event, a repeat, and disorder are each seen.
#[test]
fn the_tally_sees_loss_duplicates_and_disorder() {
    let s = |client, entity, seq| Sent {
        client,
        entity,
        seq,
    };
    let acked = [s(0, 1, 1), s(0, 1, 2), s(0, 1, 3), s(1, 1, 1), s(0, 2, 1)];
    // Entity 1, client 0: 2 before 1 (disorder); 3 twice (a repeat); client 1's own
    // sequence is independent; entity 2 never delivered (lost).
    let delivered = [
        s(0, 1, 2),
        s(1, 1, 1),
        s(0, 1, 1),
        s(0, 1, 3),
        s(0, 1, 3),
        s(9, 9, 9),
    ];
    let t = tally(&acked, &delivered);
    assert_eq!(t.acknowledged, 5);
    assert_eq!(
        t.delivered, 5,
        "first deliveries, the unacknowledged one included"
    );
    assert_eq!(t.lost, [s(0, 2, 1)]);
    assert_eq!(t.duplicated, 1);
    assert_eq!(
        t.order_violations,
        ["client 0 entity 1: seq 1 delivered after seq 2"]
    );
    // A repeat of an earlier event after later ones (at least once) is no disorder.
    let t = tally(
        &acked[..2],
        &[s(0, 1, 1), s(0, 1, 2), s(0, 1, 1), s(0, 1, 2)],
    );
    assert!(t.order_violations.is_empty(), "{:?}", t.order_violations);
    assert_eq!(t.duplicated, 2);
}
