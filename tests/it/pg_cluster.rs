//! Several sidecars sharing the after stage on PostgreSQL (`[store] backend =
//! "postgres"`): real provisiond processes, real handler servers, real throwaway
//! PostgreSQL servers (tests/common/pg.rs).
//!
//! - three sidecars on one database under load, one killed with `kill -9`: every
//!   acknowledged delivery delivered, per-entity order kept, work done by all three;
//! - a steady stream for more entities than the sidecars hold lanes of: every entity
//!   has its turn while it goes on, and a killed sidecar's lanes move after the lease;
//! - an identical envelope sent to two sidecars is delivered once;
//! - the PostgreSQL primary killed under load and its synchronous standby promoted: the
//!   sidecars find it through the multi-host URL, the billing sees 503s, never a 200 for
//!   something lost;
//! - PostgreSQL unreachable at start and mid-run: 503s with `Retry-After`, `/readyz` 503,
//!   and recovery without a restart;
//! - a sidecar frozen (SIGSTOP) mid-call loses its lane after the lease, and once thawed
//!   does not go on with it (fencing);
//! - a lane a sidecar leaves while the database is down (it cannot renew its lease) is
//!   delivered once the database is back.
//!
//! Each event of the load carries its entity's sequence number (`data.seq`), and the
//! events of one entity go round-robin to the sidecars, so that per-entity order is
//! checked across sidecars, not only within one. A client sends an entity's next event
//! only once the previous one was answered 200; on anything else it sends the same bytes
//! again (to the next sidecar), as the billing retries.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::pg::{self, PgServer};
use crate::common::*;
use serde_json::json;

/// A Standard Webhooks secret: every delivery then carries its `webhook-id`, the same on
/// every attempt of one delivery (whichever sidecar makes it), so that a repeat can be
/// told from a second delivery of the same event.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// Fast retries, so that tests never wait long.
const FAST: &str = "retry = { attempts = 1000, backoff = \"10ms\", max_backoff = \"200ms\" }";
/// The lease of the tests' configs: a dead sidecar's lanes are taken over after it.
const LEASE: Duration = Duration::from_secs(3);
/// A client gives up on one event after this long (it then counts as not acknowledged).
const GIVE_UP: Duration = Duration::from_secs(30);
/// How long everything acknowledged may take to arrive once the load stops.
const DRAIN: Duration = Duration::from_secs(90);

/// The `max_concurrency` of the tests' handler, but where a test says otherwise.
const SLOTS: usize = 4;

/// A sidecar's config: the postgres store at `url`, one after-stage handler `crm` with
/// `slots` for its `max_concurrency`, that tells the handler which sidecar called
/// (`X-Sidecar: NAME`).
fn config(url: &str, handler: &str, name: &str, slots: usize) -> String {
    format!(
        "{SERVER}[store]\nbackend = \"postgres\"\nurl = {}\nlease = \"3s\"\n{}",
        toml_str(url),
        after_handler(
            "crm",
            handler,
            &format!(
                "{FAST}\ntimeout = \"5s\"\nmax_concurrency = {slots}\nsecret = {}\n\
                 headers = {{ \"X-Sidecar\" = {} }}",
                toml_str(SECRET),
                toml_str(name)
            )
        )
    )
}

/// Starts sidecars `names` on `url` all at once (their schema migrations race: the
/// advisory lock must sort them out).
async fn start_sidecars(url: &str, handler: &str, names: &[&str]) -> Vec<Sidecar> {
    start_sidecars_with(url, handler, names, SLOTS).await
}

/// [`start_sidecars`], the handler's `max_concurrency` being `slots`.
async fn start_sidecars_with(
    url: &str,
    handler: &str,
    names: &[&str],
    slots: usize,
) -> Vec<Sidecar> {
    let starting: Vec<_> = names
        .iter()
        .map(|name| {
            let config = config(url, handler, name, slots);
            tokio::task::spawn_blocking(move || Sidecar::start(&config))
        })
        .collect();
    let mut sidecars = Vec::new();
    for s in starting {
        sidecars.push(s.await.expect("a sidecar starts"));
    }
    sidecars
}

/// A throwaway PostgreSQL with the database `billing`, the load's handler, and sidecars
/// on it (started at once, the handler's `max_concurrency` being `slots`), each with
/// its `/events` URL, in `names`' order.
struct Cluster {
    server: PgServer,
    recorder: Recorder,
    /// `None` once a test has taken one away (to kill it).
    sidecars: Vec<Option<Sidecar>>,
    urls: Vec<String>,
}

/// Starts a [`Cluster`] of sidecars `names`; `None` where PostgreSQL is not installed.
async fn cluster(names: &[&str], slots: usize) -> Option<Cluster> {
    if !pg::installed() {
        return None;
    }
    let server = tokio::task::spawn_blocking(PgServer::start).await.unwrap();
    let url = server.create_database("billing");
    let recorder = Recorder::start().await;
    let sidecars: Vec<Option<Sidecar>> = start_sidecars_with(&url, &recorder.url(), names, slots)
        .await
        .into_iter()
        .map(Some)
        .collect();
    let urls = sidecars
        .iter()
        .map(|s| s.as_ref().unwrap().url("/events"))
        .collect();
    Some(Cluster {
        server,
        recorder,
        sidecars,
        urls,
    })
}

/// Waits until `GET /readyz` answers `status` on `sidecar`; whether it did in `timeout`.
async fn wait_ready(sidecar: &Sidecar, status: u16, timeout: Duration) -> bool {
    let until = Instant::now() + timeout;
    loop {
        if sidecar.get("/readyz").await.0 == status {
            return true;
        }
        if Instant::now() > until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One event of the load: an entity and its sequence number.
type Key = (i64, i64);

/// A call the handler answered 200.
#[derive(Debug, Clone)]
struct Delivered {
    key: Key,
    /// The sidecar that made the call (`X-Sidecar`).
    sidecar: String,
    /// Its `webhook-id`.
    message: String,
    /// When the handler answered it.
    at: Instant,
}

/// The after-stage handler of the load: answers 200 after a few milliseconds (one call
/// in 20 gets a 500 instead, to be retried), records what it accepted, and counts two
/// calls of one entity in flight at once (which per-entity order forbids).
struct Recorder {
    server: HandlerServer,
    delivered: Arc<Mutex<Vec<Delivered>>>,
    overlaps: Arc<Mutex<Vec<String>>>,
    /// How long it takes to answer, in milliseconds.
    delay: Arc<AtomicU64>,
}

/// A call in flight at the handler, per entity. A guard: a call whose connection
/// closes midway (its sidecar was killed) is dropped, and counts no more.
struct InFlight {
    map: Arc<Mutex<HashMap<i64, usize>>>,
    entity: i64,
    /// Calls of the entity that were already in flight when this one came.
    others: usize,
}

impl InFlight {
    fn enter(map: &Arc<Mutex<HashMap<i64, usize>>>, entity: i64) -> Self {
        let mut counts = map.lock().unwrap();
        let n = counts.entry(entity).or_insert(0);
        let others = *n;
        *n += 1;
        Self {
            map: map.clone(),
            entity,
            others,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(n) = self.map.lock().unwrap().get_mut(&self.entity) {
            *n -= 1;
        }
    }
}

impl Recorder {
    async fn start() -> Self {
        let delivered = Arc::new(Mutex::new(Vec::new()));
        let overlaps = Arc::new(Mutex::new(Vec::new()));
        let in_flight: Arc<Mutex<HashMap<i64, usize>>> = Arc::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let delay = Arc::new(AtomicU64::new(3));
        let server = {
            let (delivered, overlaps, delay) = (delivered.clone(), overlaps.clone(), delay.clone());
            HandlerServer::start(move |call| {
                let (delivered, overlaps, in_flight, calls, delay) = (
                    delivered.clone(),
                    overlaps.clone(),
                    in_flight.clone(),
                    calls.clone(),
                    delay.clone(),
                );
                async move {
                    let envelope = call.json();
                    let key = (
                        envelope["event"]["object_id"].as_i64().unwrap(),
                        envelope["data"]["seq"].as_i64().unwrap(),
                    );
                    let sidecar = call.header("x-sidecar").unwrap_or("?").to_owned();
                    let calling = InFlight::enter(&in_flight, key.0);
                    if calling.others > 0 {
                        overlaps.lock().unwrap().push(format!(
                            "entity {}: seq {} called (by {sidecar}) while another call of \
                             the entity was in flight",
                            key.0, key.1
                        ));
                    }
                    let delay = delay.load(Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    drop(calling);
                    if calls.fetch_add(1, Ordering::SeqCst) % 20 == 19 {
                        return reply(500, "try again");
                    }
                    delivered.lock().unwrap().push(Delivered {
                        key,
                        sidecar,
                        message: call.header("webhook-id").unwrap_or_default().to_owned(),
                        at: Instant::now(),
                    });
                    reply(200, "")
                }
            })
            .await
        };
        Self {
            server,
            delivered,
            overlaps,
            delay,
        }
    }

    /// Answers each call after `delay` from now on.
    fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap();
        self.delay.store(ms, Ordering::SeqCst);
    }

    fn url(&self) -> String {
        self.server.url("/hook")
    }

    fn delivered(&self) -> Vec<Delivered> {
        self.delivered.lock().unwrap().clone()
    }

    /// Waits until every key in `acked` was delivered; whether it was within [`DRAIN`].
    async fn wait_for(&self, acked: &[Key]) -> bool {
        eventually(DRAIN, || {
            let got: HashSet<Key> = self.delivered().iter().map(|d| d.key).collect();
            acked.iter().all(|k| got.contains(k))
        })
        .await
    }
}

/// What the billing side of the load saw.
#[derive(Debug, Default)]
struct Billing {
    /// Events answered 200.
    acked: Vec<Key>,
    /// 503s, and how many of them lacked `Retry-After`.
    unavailable: usize,
    without_retry_after: usize,
    /// Connections refused or broken (a sidecar killed).
    unreachable: usize,
    /// Any other answer: status and body.
    unexpected: Vec<String>,
    /// 200s per sidecar URL.
    acked_by: HashMap<String, usize>,
}

/// Sends events for `entities` (one task each, each entity's in order, round-robin over
/// `urls`) until `stop`; each event until it is answered 200 (the same bytes again, to the
/// next sidecar, after anything else) or [`GIVE_UP`]. `progress` counts the 200s.
async fn load(
    urls: Vec<String>,
    entities: std::ops::RangeInclusive<i64>,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicUsize>,
) -> Billing {
    paced_load(urls, entities, stop, progress, Duration::ZERO).await
}

/// [`load`], each entity's next event sent `pace` after the last one's 200.
async fn paced_load(
    urls: Vec<String>,
    entities: std::ops::RangeInclusive<i64>,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicUsize>,
    pace: Duration,
) -> Billing {
    let billing = Arc::new(Mutex::new(Billing::default()));
    let mut tasks = Vec::new();
    for entity in entities {
        let (urls, stop, progress, billing) = (
            urls.clone(),
            stop.clone(),
            progress.clone(),
            billing.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let http = http_client();
            let mut turn = usize::try_from(entity).unwrap();
            for seq in 1.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let body = envelope("clients.update", entity, json!({"seq": seq})).to_string();
                let until = Instant::now() + GIVE_UP;
                while Instant::now() < until {
                    turn += 1;
                    let url = &urls[turn % urls.len()];
                    let sent = http
                        .post(url)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .timeout(Duration::from_secs(20))
                        .send()
                        .await;
                    let acked = {
                        let mut billing = billing.lock().unwrap();
                        match sent {
                            Ok(r) if r.status() == 200 => {
                                billing.acked.push((entity, seq));
                                *billing.acked_by.entry(url.clone()).or_default() += 1;
                                progress.fetch_add(1, Ordering::SeqCst);
                                true
                            }
                            Ok(r) if r.status() == 503 => {
                                billing.unavailable += 1;
                                if r.headers().get("retry-after").is_none() {
                                    billing.without_retry_after += 1;
                                }
                                false
                            }
                            Ok(r) => {
                                billing
                                    .unexpected
                                    .push(format!("{url}: {} for {body}", r.status()));
                                false
                            }
                            Err(_) => {
                                billing.unreachable += 1;
                                false
                            }
                        }
                    };
                    if acked {
                        if !pace.is_zero() {
                            tokio::time::sleep(pace).await;
                        }
                        break;
                    }
                    // The billing's retry, a little later (not a storm of 503s).
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    Arc::try_unwrap(billing).unwrap().into_inner().unwrap()
}

/// Checks what arrived against what was acknowledged: nothing acknowledged lost, per
/// entity the first deliveries in sequence order (a repeat, at least once, is allowed),
/// no event delivered as two different deliveries (two `webhook-id`s: a dedupe miss), no
/// two calls of one entity at once.
fn check_deliveries(acked: &[Key], recorder: &Recorder) {
    let delivered = recorder.delivered();
    let mut first: HashSet<Key> = HashSet::new();
    let mut last: HashMap<i64, i64> = HashMap::new();
    let mut disorder = Vec::new();
    let mut messages: HashMap<Key, HashSet<String>> = HashMap::new();
    for d in &delivered {
        messages.entry(d.key).or_default().insert(d.message.clone());
        if !first.insert(d.key) {
            continue;
        }
        let previous = last.entry(d.key.0).or_insert(0);
        if d.key.1 < *previous {
            disorder.push(format!(
                "entity {}: seq {} first delivered (by {}) after seq {}",
                d.key.0, d.key.1, d.sidecar, previous
            ));
        }
        *previous = (*previous).max(d.key.1);
    }
    let lost: Vec<&Key> = acked.iter().filter(|k| !first.contains(k)).collect();
    let doubled: Vec<(&Key, &HashSet<String>)> =
        messages.iter().filter(|(_, ids)| ids.len() > 1).collect();
    let repeats = delivered.len() - first.len();
    println!(
        "acknowledged {}, delivered {} ({} repeats), lost {}, order violations {}, \
         doubled {}",
        acked.len(),
        first.len(),
        repeats,
        lost.len(),
        disorder.len(),
        doubled.len()
    );
    assert!(
        lost.is_empty(),
        "acknowledged and never delivered: {:?}",
        &lost[..lost.len().min(20)]
    );
    assert!(
        disorder.is_empty(),
        "per-entity order violated: {:?}",
        &disorder[..disorder.len().min(20)]
    );
    assert!(
        doubled.is_empty(),
        "one event delivered as two deliveries: {:?}",
        &doubled[..doubled.len().min(20)]
    );
    let overlaps = recorder.overlaps.lock().unwrap().clone();
    assert!(
        overlaps.is_empty(),
        "two deliveries of one lane in flight at once: {:?}",
        &overlaps[..overlaps.len().min(20)]
    );
}

/// Deliveries per sidecar (`X-Sidecar`), in name order.
fn tally_by_sidecar(delivered: &[Delivered]) -> std::collections::BTreeMap<String, usize> {
    let mut by = std::collections::BTreeMap::new();
    for d in delivered {
        *by.entry(d.sidecar.clone()).or_default() += 1;
    }
    by
}

/// The shared store's lanes that still have work, and the live sidecars, as text: what
/// a failed drain leaves behind.
fn lanes_with_work(server: &PgServer) -> String {
    let lanes = server.psql(
        "billing",
        "SELECT handler, entity, pending, owner, token, lease_until > now() AS leased, \
         (SELECT count(*) FROM provisiond.deliveries d WHERE d.handler = l.handler \
         AND d.entity = l.entity) AS rows FROM provisiond.lanes l WHERE pending > 0 \
         ORDER BY entity",
    );
    let sidecars = server.psql(
        "billing",
        "SELECT id, handlers, now() - seen_at FROM provisiond.sidecars",
    );
    format!("{lanes}\nsidecars:\n{sidecars}")
}

/// The number of dead letters, as a sidecar reports them (the shared data).
async fn dead_letters(sidecar: &Sidecar) -> serde_json::Value {
    let (status, letters) = sidecar.get("/v1/deadletters").await;
    assert_eq!(status, 200, "{letters}");
    letters["count"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_sidecars_share_the_work_and_a_kill_9_of_one_loses_nothing() {
    let Some(Cluster {
        server,
        recorder,
        mut sidecars,
        urls,
    }) = cluster(&["a", "b", "c"], SLOTS).await
    else {
        return;
    };

    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicUsize::new(0));
    let billing = tokio::spawn(load(urls.clone(), 1..=24, stop.clone(), progress.clone()));
    // Every sidecar delivering (a lane per entity, 24 entities, 4 at a time on each):
    // then kill one mid-delivery.
    let warmed = eventually(Duration::from_secs(60), || {
        let by = tally_by_sidecar(&recorder.delivered());
        progress.load(Ordering::SeqCst) >= 300
            && ["a", "b", "c"].iter().all(|s| by.contains_key(*s))
    })
    .await;
    assert!(
        warmed,
        "only {} accepted, delivered by sidecar: {:?}",
        progress.load(Ordering::SeqCst),
        tally_by_sidecar(&recorder.delivered())
    );
    let killed = sidecars[1].take().unwrap();
    let before_kill = tally_by_sidecar(&recorder.delivered());
    let _ = killed.kill_9();
    let killed_at = progress.load(Ordering::SeqCst);
    // The load goes on on the other two, past the lease (the killed one's lanes wait
    // for it), then stops.
    let more = eventually(Duration::from_secs(60), || {
        progress.load(Ordering::SeqCst) >= killed_at + 300
    })
    .await;
    tokio::time::sleep(LEASE).await;
    stop.store(true, Ordering::SeqCst);
    let billing = billing.await.unwrap();
    assert!(more, "the load stalled after the kill: {billing:?}");
    assert!(billing.unexpected.is_empty(), "{:?}", billing.unexpected);
    assert_eq!(billing.without_retry_after, 0, "a 503 without Retry-After");
    for url in &urls {
        assert!(
            billing.acked_by.get(url).copied().unwrap_or(0) > 0,
            "{url} acknowledged nothing: {:?}",
            billing.acked_by
        );
    }

    let arrived = recorder.wait_for(&billing.acked).await;
    let by = tally_by_sidecar(&recorder.delivered());
    println!(
        "deliveries by sidecar: {by:?}; before b was killed: {before_kill:?}; \
         accepted by sidecar: {:?}",
        billing.acked_by
    );
    println!("all acknowledged arrived: {arrived}");
    check_deliveries(&billing.acked, &recorder);
    for name in ["a", "b", "c"] {
        assert!(
            by.get(name).copied().unwrap_or(0) > 0,
            "sidecar {name} delivered nothing: {by:?}"
        );
    }
    // The two left shared the work: neither hoarded lanes it could not work (a sidecar
    // holds two lanes per slot of max_concurrency at most).
    let total: usize = by.values().sum();
    for name in ["a", "c"] {
        assert!(
            by.get(name).copied().unwrap_or(0) * 10 >= total,
            "sidecar {name} did less than a tenth of the work: {by:?}"
        );
    }
    // The two left saw it all: the queue is empty, nothing dead-lettered.
    let survivor = sidecars[0].as_ref().unwrap();
    assert_eq!(dead_letters(survivor).await, 0);
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let text = survivor.metrics_text().await;
        let depth = metric(&text, "provisiond_after_queue_depth{handler=\"crm\"}");
        if depth == Some(0.0) {
            break;
        }
        assert!(
            Instant::now() < until,
            "the queue never drained: {depth:?}\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(sidecars);
    drop(server);
}

/// More entities with a steady stream each than the sidecars may hold lanes of (three
/// sidecars, `max_concurrency = 1`: two lanes each, six in all, for twelve entities whose
/// events come faster than a lane is worked, so that no lane ever empties): every entity
/// is delivered while the stream goes on, because a sidecar with no room hands back the
/// lanes whose turn is over when others wait; and a killed sidecar's lanes go to the
/// others once its lease runs out, not when the load ends. Order per entity, nothing
/// lost, no two calls of one entity at once, as in every test here.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_a_steady_stream_for_more_entities_than_lanes_every_entity_gets_its_turn() {
    let Some(Cluster {
        server,
        recorder,
        mut sidecars,
        urls,
    }) = cluster(&["a", "b", "c"], 1).await
    else {
        return;
    };
    // 100 ms a call: a sidecar delivers 10 a second; each entity sends about 15.
    recorder.set_delay(Duration::from_millis(100));
    let entities = 1..=12;
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let billing = tokio::spawn(paced_load(
        urls.clone(),
        entities.clone(),
        stop.clone(),
        progress.clone(),
        Duration::from_millis(50),
    ));
    let served = |since: Instant, by: &[&str]| -> HashSet<i64> {
        recorder
            .delivered()
            .iter()
            .filter(|d| d.at >= since && by.contains(&d.sidecar.as_str()))
            .map(|d| d.key.0)
            .collect()
    };
    let everyone = eventually(Duration::from_secs(40), || {
        served(started, &["a", "b", "c"]).len() == entities.clone().count()
    })
    .await;
    let first_round = started.elapsed();
    let mut seen: Vec<i64> = served(started, &["a", "b", "c"]).into_iter().collect();
    seen.sort_unstable();
    assert!(
        everyone,
        "under the stream, only entities {seen:?} were delivered in {first_round:?}\n{}",
        lanes_with_work(&server)
    );

    // Kill b with its lanes held: the two left must take them over while the stream
    // goes on.
    let killed = sidecars[1].take().unwrap();
    let _ = killed.kill_9();
    let killed_at = Instant::now();
    let taken_over = eventually(Duration::from_secs(40), || {
        served(killed_at, &["a", "c"]).len() == entities.clone().count()
    })
    .await;
    let takeover = killed_at.elapsed();
    let mut after: Vec<i64> = served(killed_at, &["a", "c"]).into_iter().collect();
    after.sort_unstable();
    let lanes = lanes_with_work(&server);
    stop.store(true, Ordering::SeqCst);
    let billing = billing.await.unwrap();
    println!(
        "every entity delivered {first_round:?} into the stream; after the kill, every \
         entity delivered by the two left within {takeover:?} (lease {LEASE:?}); \
         accepted {}",
        billing.acked.len()
    );
    assert!(
        taken_over,
        "after the kill, the two left delivered only entities {after:?} in {takeover:?}\n{lanes}"
    );
    assert!(billing.unexpected.is_empty(), "{:?}", billing.unexpected);

    // The backlog drains (quickly now), complete and in order.
    recorder.set_delay(Duration::ZERO);
    let arrived = recorder.wait_for(&billing.acked).await;
    println!("all acknowledged arrived: {arrived}");
    check_deliveries(&billing.acked, &recorder);
    drop(sidecars);
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_identical_envelope_sent_to_two_sidecars_is_delivered_once() {
    if !pg::installed() {
        return;
    }
    let server = tokio::task::spawn_blocking(PgServer::start).await.unwrap();
    let url = server.create_database("billing");
    let handler = HandlerServer::fixed(200, "").await;
    let sidecars = start_sidecars(&url, &handler.url("/hook"), &["a", "b"]).await;
    let (a, b) = (&sidecars[0], &sidecars[1]);

    // One after the other.
    let same = envelope("clients.update", 7, json!({"name": "x"})).to_string();
    let response = a
        .client()
        .post(a.url("/events"))
        .body(same.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let event_id = response.headers()["x-provisioning-event-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let (status, body) = b.post(same.clone()).await;
    assert_eq!(status, 200, "a duplicate still gets its 200: {body}");
    // At the same moment, to both.
    let twin = envelope("clients.update", 8, json!({"name": "twin"})).to_string();
    let (first, second) = tokio::join!(a.post(twin.clone()), b.post(twin.clone()));
    assert_eq!((first.0, second.0), (200, 200), "{first:?} {second:?}");
    // The next event of each entity: were a duplicate queued, it would arrive first.
    a.send("clients.update", 7, json!({"name": "after"})).await;
    b.send("clients.update", 8, json!({"name": "after"})).await;
    let done = eventually(Duration::from_secs(20), || {
        handler
            .calls()
            .iter()
            .filter(|c| c.json()["data"]["name"] == "after")
            .count()
            == 2
    })
    .await;
    // A moment more, for a late duplicate from the other sidecar.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let names: Vec<(i64, String)> = handler
        .calls()
        .iter()
        .map(|c| {
            let v = c.json();
            (
                v["event"]["object_id"].as_i64().unwrap(),
                v["data"]["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(done, "{names:?}");
    let count = |name: &str| names.iter().filter(|(_, n)| n == name).count();
    assert_eq!(count("x"), 1, "sent to a then b: {names:?}");
    assert_eq!(count("twin"), 1, "sent to both at once: {names:?}");
    // The execution log is shared: both sidecars' admin APIs show the delivery of the
    // event that a accepted (written a moment after the call).
    for sidecar in [a, b] {
        let path = format!("/v1/executions?event_id={event_id}");
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body) = sidecar.get(&path).await;
            assert_eq!(status, 200, "{body}");
            let rows = body["executions"].as_array().cloned().unwrap_or_default();
            if rows.iter().any(|r| r["handler"] == "crm") {
                assert_eq!(rows.len(), 1, "{body}");
                break;
            }
            assert!(
                Instant::now() < until,
                "{} does not show the execution: {body}",
                sidecar.addr
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_to_the_sync_standby_loses_nothing_acknowledged() {
    if !pg::installed() {
        return;
    }
    let (mut primary, standby) =
        tokio::task::spawn_blocking(PgServer::start_primary_with_sync_standby)
            .await
            .unwrap();
    primary.create_database("billing");
    let url = pg::multi_host_url(&[&primary, &standby], "billing");
    let recorder = Recorder::start().await;
    let sidecars = start_sidecars(&url, &recorder.url(), &["a", "b"]).await;
    for s in &sidecars {
        assert!(wait_ready(s, 200, Duration::from_secs(30)).await);
    }
    let urls: Vec<String> = sidecars.iter().map(|s| s.url("/events")).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicUsize::new(0));
    let billing = tokio::spawn(load(urls, 1..=16, stop.clone(), progress.clone()));
    let warmed = eventually(Duration::from_secs(60), || {
        progress.load(Ordering::SeqCst) >= 200
    })
    .await;
    assert!(warmed, "only {} accepted", progress.load(Ordering::SeqCst));

    // The primary's machine is lost, mid-load; a while with no primary at all (the
    // billing gets 503s), then the standby is promoted.
    tokio::task::block_in_place(|| primary.kill_9());
    let at_kill = progress.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = progress.load(Ordering::SeqCst) - at_kill;
    tokio::task::block_in_place(|| standby.promote());
    let promoted = Instant::now();
    // The sidecars find the new primary by themselves.
    for s in &sidecars {
        assert!(
            wait_ready(s, 200, Duration::from_secs(30)).await,
            "not ready again 30 s after the promotion; logs:\n{}",
            s.logs().join("\n")
        );
    }
    let back = eventually(Duration::from_secs(60), || {
        progress.load(Ordering::SeqCst) >= at_kill + during + 200
    })
    .await;
    println!(
        "{during} answered 200 after the kill (committed before it); ready again {:?} after the promotion",
        promoted.elapsed()
    );
    stop.store(true, Ordering::SeqCst);
    let billing = tokio::time::timeout(GIVE_UP * 2, billing)
        .await
        .expect("the load ends")
        .unwrap();
    println!(
        "billing: {} acknowledged, {} 503s, {} unreachable",
        billing.acked.len(),
        billing.unavailable,
        billing.unreachable
    );
    assert!(back, "the load did not recover: {billing:?}");
    assert!(billing.unexpected.is_empty(), "{:?}", billing.unexpected);
    assert!(billing.unavailable > 0, "no 503 while there was no primary");
    assert_eq!(billing.without_retry_after, 0, "a 503 without Retry-After");
    assert_eq!(billing.unreachable, 0, "a sidecar stopped answering");

    let arrived = recorder.wait_for(&billing.acked).await;
    println!("all acknowledged arrived: {arrived}");
    check_deliveries(&billing.acked, &recorder);
    assert_eq!(dead_letters(&sidecars[0]).await, 0);
    drop(sidecars);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_unreachable_at_start_and_mid_run_is_503_then_recovers_without_a_restart() {
    if !pg::installed() {
        return;
    }
    let mut server = tokio::task::spawn_blocking(PgServer::start).await.unwrap();
    server.create_database("billing");
    // A password in the URL (trust auth ignores it): it must never show.
    let password = "pw-never-shown-4711";
    let url = format!(
        "postgres://postgres:{password}@127.0.0.1:{}/billing",
        server.port
    );
    tokio::task::block_in_place(|| server.stop());

    let recorder = Recorder::start().await;
    let sidecar = tokio::task::spawn_blocking({
        let config = config(&url, &recorder.url(), "a", SLOTS);
        move || Sidecar::start(&config)
    })
    .await
    .expect("the sidecar starts with its database down");
    // Down at start: not ready, events refused with Retry-After.
    assert!(
        wait_ready(&sidecar, 503, Duration::from_secs(10)).await,
        "ready with no database"
    );
    let first = envelope("clients.update", 1, json!({"seq": 1})).to_string();
    let refused = sidecar
        .client()
        .post(sidecar.url("/events"))
        .body(first.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let text = refused.text().await.unwrap();
    assert!(!text.is_empty(), "a 503 says why");
    assert!(!text.contains(password), "{text}");

    // Back: ready and accepting, with no restart of the sidecar.
    tokio::task::block_in_place(|| server.restart());
    assert!(
        wait_ready(&sidecar, 200, Duration::from_secs(30)).await,
        "not ready 30 s after the database came back; logs:\n{}",
        sidecar.logs().join("\n")
    );
    let (status, body) = sidecar.post(first).await;
    assert_eq!(status, 200, "{body}");

    // Down mid-run, with the load on: 503s (never a 200 that is lost), not ready.
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicUsize::new(0));
    let billing = tokio::spawn(load(
        vec![sidecar.url("/events")],
        2..=9,
        stop.clone(),
        progress.clone(),
    ));
    assert!(
        eventually(Duration::from_secs(30), || progress.load(Ordering::SeqCst)
            >= 50)
        .await
    );
    tokio::task::block_in_place(|| server.stop());
    assert!(
        wait_ready(&sidecar, 503, Duration::from_secs(15)).await,
        "still ready with the database down"
    );
    let at_stop = progress.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, _) = sidecar.send("clients.update", 100, json!({"seq": 1})).await;
    assert_eq!(status, 503, "an event accepted with the database down");
    let during = progress.load(Ordering::SeqCst) - at_stop;
    tokio::task::block_in_place(|| server.restart());
    assert!(
        wait_ready(&sidecar, 200, Duration::from_secs(30)).await,
        "not ready 30 s after the database came back; logs:\n{}",
        sidecar.logs().join("\n")
    );
    assert!(
        eventually(Duration::from_secs(30), || {
            progress.load(Ordering::SeqCst) >= at_stop + during + 50
        })
        .await,
        "the load did not recover"
    );
    stop.store(true, Ordering::SeqCst);
    let billing = billing.await.unwrap();
    assert!(billing.unexpected.is_empty(), "{:?}", billing.unexpected);
    assert_eq!(billing.without_retry_after, 0, "a 503 without Retry-After");
    assert!(billing.unavailable > 0);
    let mut acked = billing.acked.clone();
    acked.push((1, 1));
    if !recorder.wait_for(&acked).await {
        println!(
            "not drained; the lanes with work:\n{}",
            lanes_with_work(&server)
        );
    }
    check_deliveries(&acked, &recorder);

    // Clear errors in the log, and no password in it, nor in the config the API shows.
    let logs = sidecar.logs().join("\n");
    assert!(!logs.contains(password), "the password is in the logs");
    let records = sidecar.log_records();
    assert!(
        records.iter().any(|r| {
            let level = r["level"].as_str().unwrap_or_default();
            (level == "WARN" || level == "ERROR")
                && r.to_string().to_lowercase().contains("postgres")
        }),
        "no warning or error naming PostgreSQL in the logs:\n{logs}"
    );
    let live = sidecar.live_config().await.to_string();
    assert!(!live.contains(password), "{live}");
    let path = sidecar.config_path.to_string_lossy().into_owned();
    let (code, out, err) = run_binary(sidecar.dir.path(), &["check", "-c", &path]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        !out.contains(password) && !err.contains(password),
        "check shows the password:\n{out}{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_sidecar_loses_its_lane_and_does_not_go_on_with_it_when_it_thaws() {
    if !pg::installed() {
        return;
    }
    let server = tokio::task::spawn_blocking(PgServer::start).await.unwrap();
    let url = server.create_database("billing");
    // The first call of seq 1 hangs for a while: the sidecar making it is then frozen
    // (SIGSTOP) mid-call, a zombie that renews nothing.
    let stalled = Arc::new(AtomicBool::new(false));
    let handler = {
        let stalled = stalled.clone();
        HandlerServer::start(move |call| {
            let stalled = stalled.clone();
            async move {
                if call.json()["data"]["seq"] == 1 && !stalled.swap(true, Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_secs(6)).await;
                }
                reply(200, "")
            }
        })
        .await
    };
    let sidecars = start_sidecars(&url, &handler.url("/hook"), &["a", "b"]).await;
    for seq in 1..=3 {
        let (status, body) = sidecars[1]
            .send("clients.update", 1, json!({"seq": seq}))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    assert!(
        eventually(Duration::from_secs(20), || !handler.calls().is_empty()).await,
        "seq 1 was never delivered"
    );
    let sidecar_of = |call: &Recorded| call.header("x-sidecar").unwrap_or("?").to_owned();
    let zombie_name = sidecar_of(&handler.calls()[0]);
    let (zombie, live) = match zombie_name.as_str() {
        "a" => (&sidecars[0], &sidecars[1]),
        "b" => (&sidecars[1], &sidecars[0]),
        other => panic!("a call from {other}"),
    };
    zombie.signal(nix::sys::signal::Signal::SIGSTOP);
    let frozen = Instant::now();

    // Its lease runs out; the other sidecar takes the lane over and delivers it all,
    // the hanging seq 1 again (at least once) and what came after.
    let seqs_by = |name: &str| -> Vec<i64> {
        handler
            .calls()
            .iter()
            .filter(|c| sidecar_of(c) == name)
            .map(|c| c.json()["data"]["seq"].as_i64().unwrap())
            .collect()
    };
    let live_name = if zombie_name == "a" { "b" } else { "a" };
    let taken_over = eventually(Duration::from_secs(20), || seqs_by(live_name) == [1, 2, 3]).await;
    let takeover = frozen.elapsed();
    assert!(taken_over, "not taken over: {:?}", seqs_by(live_name));
    println!("taken over {takeover:?} after the freeze (lease {LEASE:?})");
    assert!(
        takeover >= LEASE - Duration::from_millis(500),
        "taken over before the lease ran out"
    );
    for seq in 4..=5 {
        let (status, body) = live.send("clients.update", 1, json!({"seq": seq})).await;
        assert_eq!(status, 200, "{body}");
    }
    assert!(eventually(Duration::from_secs(10), || seqs_by(live_name).len() == 5).await);

    // It thaws: its hanging call ends, its settlement is refused (the lane was claimed
    // since), and it goes on with nothing of that lane.
    zombie.signal(nix::sys::signal::Signal::SIGCONT);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        seqs_by(&zombie_name),
        [1],
        "the thawed sidecar called the lane it had lost again; all calls: {:?}",
        handler
            .calls()
            .iter()
            .map(|c| (sidecar_of(c), c.json()["data"]["seq"].clone()))
            .collect::<Vec<_>>()
    );
    // And it works again: an event it accepts now is delivered after the rest.
    let (status, body) = zombie.send("clients.update", 1, json!({"seq": 6})).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        eventually(Duration::from_secs(15), || handler
            .calls()
            .iter()
            .any(|c| c.json()["data"]["seq"] == 6))
        .await
    );
    let all: Vec<i64> = handler
        .calls()
        .iter()
        .map(|c| c.json()["data"]["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(all, [1, 1, 2, 3, 4, 5, 6], "calls in the order they came");
    assert_eq!(dead_letters(live).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lane_left_while_the_database_is_down_is_delivered_once_it_is_back() {
    if !pg::installed() {
        return;
    }
    let mut server = tokio::task::spawn_blocking(PgServer::start).await.unwrap();
    let url = server.create_database("billing");
    // The first call asks for 3 s: the retry comes due while the database is down, when
    // the sidecar can no longer be sure of its lease, and leaves the lane.
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = calls.clone();
        HandlerServer::start(move |_| {
            let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    let mut r = reply(503, "busy");
                    r.headers_mut()
                        .insert("retry-after", hyper::header::HeaderValue::from_static("3"));
                    r
                } else {
                    reply(200, "")
                }
            }
        })
        .await
    };
    let config = format!(
        "{SERVER}[store]\nbackend = \"postgres\"\nurl = {}\nlease = \"3s\"\n{}",
        toml_str(&url),
        after_handler(
            "crm",
            &handler.url("/hook"),
            "retry = { attempts = 100, backoff = \"10ms\", max_backoff = \"10s\" }"
        )
    );
    let sidecar = tokio::task::spawn_blocking(move || Sidecar::start(&config))
        .await
        .unwrap();
    let (status, body) = sidecar.send("clients.update", 1, json!({"seq": 1})).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        eventually(Duration::from_secs(10), || calls.load(Ordering::SeqCst)
            == 1)
        .await
    );
    // The retry's settlement is committed a moment after the call.
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| server.stop());
    // The retry comes due with the database down: the lease is not surely the sidecar's
    // any more, it leaves the lane, and cannot tell the database so.
    let left = tokio::task::block_in_place(|| {
        sidecar.wait_for_log(Duration::from_secs(15), |r| {
            r["message"]
                .as_str()
                .is_some_and(|m| m.contains("lease not renewed in time"))
        })
    });
    assert!(left.is_some(), "the sidecar never gave the lane up");
    tokio::task::block_in_place(|| server.restart());
    // Once the database is back, the sidecar's lease renewal and its claims race for the
    // lane it gave up. Make the renewal come first, as it does about every other time:
    // hold the lane's row until the renewal waits for it (a claim skips a locked row).
    let mut db = pg::connect(&url).await;
    let txn = db.transaction().await.unwrap();
    txn.execute(
        "SELECT 1 FROM provisiond.lanes WHERE handler = 'crm' AND entity = 'clients/1' FOR UPDATE",
        &[],
    )
    .await
    .unwrap();
    // (Watched from another session: a transaction sees one snapshot of the activity.)
    let watch = pg::connect(&url).await;
    let until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < until {
        let waiting = watch
            .query(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND query LIKE '%lease_until = now()%'",
                &[],
            )
            .await
            .unwrap();
        if !waiting.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    txn.commit().await.unwrap();
    assert!(wait_ready(&sidecar, 200, Duration::from_secs(30)).await);
    let delivered = eventually(Duration::from_secs(20), || {
        calls.load(Ordering::SeqCst) >= 2
    })
    .await;
    assert!(
        delivered,
        "the acknowledged delivery never came, 20 s after the database came back; \
         lanes:\n{}\nlogs:\n{}",
        lanes_with_work(&server),
        sidecar
            .logs()
            .iter()
            .filter(|l| l.contains("lane") || l.contains("WARN"))
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
