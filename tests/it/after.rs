//! The after stage: a real provisiond process stores deliveries before it answers, and
//! delivers them to real HTTP handlers and scripts, in order per entity, with retries,
//! dead letters, dedupe, and an execution log; across kill -9 and SIGTERM. Compiled
//! twice: `after` on the redb file, `after_pg` on a throwaway PostgreSQL server.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use serde_json::{Value, json};

/// This module's store: `after` runs on the redb file, `after_pg` (this same file) on
/// PostgreSQL.
fn db() -> Db {
    Db::for_module(module_path!())
}

/// Fast retries, so that tests never wait long.
const FAST: &str = "retry = { attempts = 1000, backoff = \"10ms\", max_backoff = \"100ms\" }";

/// `(object_id, data.seq)` of a call.
pub(crate) fn key(call: &Recorded) -> (i64, i64) {
    let v = call.json();
    (
        v["event"]["object_id"].as_i64().unwrap(),
        v["data"]["seq"].as_i64().unwrap(),
    )
}

/// Per entity, the seqs in the order they arrived.
fn by_entity(keys: impl IntoIterator<Item = (i64, i64)>) -> HashMap<i64, Vec<i64>> {
    let mut map: HashMap<i64, Vec<i64>> = HashMap::new();
    for (entity, seq) in keys {
        map.entry(entity).or_default().push(seq);
    }
    map
}

/// Sends `per_entity` events to each entity, one entity per task, each entity's in order;
/// returns the (object_id, seq) that got a 200. A task stops at its first failure.
async fn send_all(url: String, entities: Vec<i64>, per_entity: i64) -> Vec<(i64, i64)> {
    send_counting(url, entities, per_entity, Arc::default()).await
}

/// [`send_all`], counting the 200s in `progress` as they come.
async fn send_counting(
    url: String,
    entities: Vec<i64>,
    per_entity: i64,
    progress: Arc<AtomicUsize>,
) -> Vec<(i64, i64)> {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for entity in entities {
        let (url, acked, progress) = (url.clone(), acked.clone(), progress.clone());
        tasks.push(tokio::spawn(async move {
            let client = http_client();
            for seq in 0..per_entity {
                let body = envelope("clients.update", entity, json!({"seq": seq}));
                let sent = client
                    .post(&url)
                    .body(body.to_string())
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == 200 => {
                        acked.lock().unwrap().push((entity, seq));
                        progress.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => return,
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    Arc::try_unwrap(acked).unwrap().into_inner().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_that_got_200_survives_kill_9_and_arrives_in_order_per_entity() {
    let addr = free_addr();
    let config = format!(
        "{SERVER}{}",
        after_handler("crm", &format!("http://{addr}/hook"), FAST)
    );
    let db = db();
    let sidecar = Sidecar::start(&db.config(&config));
    let url = sidecar.url("/events");
    let progress = Arc::new(AtomicUsize::new(0));
    let sending = tokio::spawn(send_counting(url, (1..=50).collect(), 20, progress.clone()));
    // Kill it mid-way: some events answered, others not yet sent.
    let halfway = eventually(Duration::from_secs(60), || {
        progress.load(Ordering::SeqCst) >= 500
    })
    .await;
    assert!(
        halfway,
        "only {} events accepted",
        progress.load(Ordering::SeqCst)
    );
    let (dir, config_path) = sidecar.kill_9();
    let acked = sending.await.unwrap();
    assert!(
        acked.len() >= 500 && acked.len() < 1000,
        "{} acked",
        acked.len()
    );

    // Restart; the handler is still down, then comes up.
    let sidecar = Sidecar::spawn(dir, config_path, &[]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let handler = HandlerServer::start_on(addr, |_| async { reply(200, "") }).await;
    let all_there = eventually(Duration::from_secs(90), || {
        let got: std::collections::HashSet<(i64, i64)> = handler.calls().iter().map(key).collect();
        acked.iter().all(|k| got.contains(k))
    })
    .await;
    let calls: Vec<(i64, i64)> = handler.calls().iter().map(key).collect();
    assert!(
        all_there,
        "{} of {} acknowledged events arrived",
        calls.len(),
        acked.len()
    );
    for (entity, seqs) in by_entity(calls) {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "entity {entity} out of order or repeated: {seqs:?}"
        );
    }
    drop(sidecar);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flaky_handler_keeps_order_per_entity_and_entities_do_not_block_each_other() {
    let counter = Arc::new(AtomicUsize::new(0));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let delivered = Arc::new(Mutex::new(Vec::new()));
    let handler = {
        let (counter, in_flight, most, delivered) = (
            counter.clone(),
            in_flight.clone(),
            most.clone(),
            delivered.clone(),
        );
        HandlerServer::start(move |call| {
            let (counter, in_flight, most, delivered) = (
                counter.clone(),
                in_flight.clone(),
                most.clone(),
                delivered.clone(),
            );
            async move {
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                let k = key(&call);
                if k.0 == 999 {
                    // One entity whose handler side is broken for good.
                    return reply(503, "down for this client");
                }
                if counter.fetch_add(1, Ordering::SeqCst) % 2 == 0 {
                    return reply(500, "flaky");
                }
                delivered.lock().unwrap().push(k);
                reply(200, "")
            }
        })
        .await
    };
    let config = format!(
        "{SERVER}{}",
        after_handler(
            "crm",
            &handler.url("/"),
            &format!("{FAST}\nmax_concurrency = 4")
        )
    );
    let db = db();
    let sidecar = Sidecar::start(&db.config(&config));
    let mut entities: Vec<i64> = (1..=50).collect();
    entities.push(999);
    let acked = send_all(sidecar.url("/events"), entities, 10).await;
    assert_eq!(acked.len(), 510);

    let done = eventually(Duration::from_secs(60), || {
        delivered.lock().unwrap().len() >= 500
    })
    .await;
    assert!(done, "{} delivered", delivered.lock().unwrap().len());
    let delivered = by_entity(delivered.lock().unwrap().clone());
    assert_eq!(delivered.len(), 50);
    for (entity, seqs) in &delivered {
        assert_eq!(seqs, &(0..10).collect::<Vec<_>>(), "entity {entity}");
    }
    // Every call, failed ones included, went out in order per entity: a later event was
    // never tried while an earlier one waited for its retry.
    let all = by_entity(handler.calls().iter().map(key));
    for (entity, seqs) in &all {
        assert!(
            seqs.windows(2).all(|w| w[0] <= w[1]),
            "entity {entity}: {seqs:?}"
        );
    }
    // Entity 999 is still stuck on its first event; everyone else got through.
    assert!(all[&999].iter().all(|&s| s == 0), "{:?}", all[&999]);
    let most = most.load(Ordering::SeqCst);
    assert!(most <= 4, "{most} calls at once, max_concurrency is 4");
    assert!(most >= 2, "entities went one at a time");
    drop(sidecar);
}

#[tokio::test(flavor = "multi_thread")]
async fn gone_goes_to_the_dead_letters_replay_delivers_and_delete_removes() {
    let gone = Arc::new(AtomicBool::new(true));
    let handler = {
        let gone = gone.clone();
        HandlerServer::start(move |_| {
            let gone = gone.load(Ordering::SeqCst);
            async move {
                if gone {
                    reply(410, r#"{"message": "client unknown"}"#)
                } else {
                    reply(204, "")
                }
            }
        })
        .await
    };
    let config = format!("{SERVER}{}", after_handler("crm", &handler.url("/"), FAST));
    let db = db();
    let sidecar = Sidecar::start(&db.config(&config));
    let (status, _) = sidecar
        .send("clients.create", 12, json!({"name": "ACME"}))
        .await;
    assert_eq!(status, 200);

    let letters = wait_dead_letters(&sidecar, 1).await;
    let letter = &letters[0];
    assert_eq!(
        letter["reason"],
        r#"handler answered 410 Gone: {"message": "client unknown"}"#
    );
    assert_eq!(letter["handler"], "crm");
    assert_eq!(letter["event"], "clients.create");
    assert_eq!(letter["object_id"], "12");
    assert_eq!(letter["entity"], "clients/12");
    assert_eq!(letter["attempts"], 1, "410 is not retried");
    assert_eq!(letter["envelope"]["data"]["name"], "ACME");
    assert_eq!(handler.calls().len(), 1);
    let id = letter["id"].as_u64().unwrap();

    // Replay: delivered, and gone from the dead letters.
    gone.store(false, Ordering::SeqCst);
    let (status, body) = sidecar
        .request(
            reqwest::Method::POST,
            &format!("/v1/deadletters/{id}/replay"),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["replayed"], id);
    assert!(body["delivery"].as_u64().unwrap() > id);
    assert!(eventually(Duration::from_secs(10), || handler.calls().len() == 2).await);
    assert_eq!(handler.calls()[1].json()["data"]["name"], "ACME");
    // Both delivery lines carry the event's id, as the event's own line does: one grep
    // finds the event's whole story.
    let event_line = sidecar
        .wait_for_log(Duration::from_secs(10), |v| {
            v["message"] == "event" && v["object_id"] == "12"
        })
        .expect("the event's line");
    let event_id = event_line["span"]["id"].as_str().unwrap().to_owned();
    assert!(event_id.starts_with("evt_"), "{event_line}");
    for message in ["delivery dead-lettered", "delivered"] {
        let line = sidecar
            .wait_for_log(Duration::from_secs(10), |v| v["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} line"));
        assert_eq!(line["event_id"], event_id.as_str(), "{line}");
    }
    assert_eq!(wait_dead_letters(&sidecar, 0).await.len(), 0);
    let (status, _) = sidecar
        .request(
            reqwest::Method::POST,
            &format!("/v1/deadletters/{id}/replay"),
        )
        .await;
    assert_eq!(status, 404, "a replayed dead letter is no longer one");

    // Delete.
    gone.store(true, Ordering::SeqCst);
    sidecar.send("clients.create", 13, json!({})).await;
    let letters = wait_dead_letters(&sidecar, 1).await;
    let id = letters[0]["id"].as_u64().unwrap();
    let path = format!("/v1/deadletters/{id}");
    let (status, body) = sidecar.request(reqwest::Method::GET, &path).await;
    assert_eq!((status, &body["object_id"]), (200, &json!("13")));
    let (status, body) = sidecar.request(reqwest::Method::DELETE, &path).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"dropped": id}));
    assert_eq!(wait_dead_letters(&sidecar, 0).await.len(), 0);
    let (status, body) = sidecar.request(reqwest::Method::DELETE, &path).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["message"], format!("no dead letter {id}"));
    let (status, _) = sidecar
        .request(reqwest::Method::GET, "/v1/deadletters/nope")
        .await;
    assert_eq!(status, 404);
}

/// Polls `GET /v1/deadletters` until it lists `n`; the list.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_survives_a_kill_9_right_after_it_is_shown() {
    let crm = HandlerServer::fixed(410, "no such client").await;
    let config = format!("{SERVER}{}", after_handler("crm", &crm.url("/"), FAST));
    let db = db();
    let sidecar = Sidecar::start(&db.config(&config));
    let (code, _) = sidecar.send("clients.update", 7, json!({})).await;
    assert_eq!(code, 200);
    // The operator sees it; the sidecar dies at once.
    assert_eq!(wait_dead_letters(&sidecar, 1).await.len(), 1);
    let (dir, config_path) = sidecar.kill_9();
    let sidecar = Sidecar::spawn(dir, config_path, &[]);
    // It is still a dead letter: not queued again, its handler not called a second time.
    let letters = wait_dead_letters(&sidecar, 1).await;
    assert_eq!(letters[0]["object_id"], "7");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(crm.calls().len(), 1, "called again after the restart");
    assert_eq!(wait_dead_letters(&sidecar, 1).await.len(), 1);
}

async fn wait_dead_letters(sidecar: &Sidecar, n: usize) -> Vec<Value> {
    let mut last = Vec::new();
    for _ in 0..500 {
        let (status, body) = sidecar.get("/v1/deadletters").await;
        assert_eq!(status, 200, "{body}");
        last = body["deadletters"].as_array().unwrap().clone();
        if last.len() == n {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("expected {n} dead letters, have {last:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_after_is_honoured_and_exhausted_deliveries_keep_their_last_error() {
    let handler = HandlerServer::start(|_| async {
        let mut r = reply(503, "busy");
        r.headers_mut()
            .insert("retry-after", hyper::header::HeaderValue::from_static("1"));
        r
    })
    .await;
    let config = format!(
        "{SERVER}{}",
        after_handler(
            "crm",
            &handler.url("/"),
            "retry = { attempts = 3, backoff = \"10ms\", max_backoff = \"5s\" }"
        )
    );
    let db = db();
    let sidecar = Sidecar::start(&db.config(&config));
    sidecar.send("clients.update", 5, json!({})).await;
    let letters = wait_dead_letters(&sidecar, 1).await;
    assert_eq!(
        letters[0]["reason"],
        "gave up after 3 attempts; last error: HTTP status 503: busy"
    );
    assert_eq!(letters[0]["last_error"], "HTTP status 503: busy");
    assert_eq!(letters[0]["attempts"], 3);
    let calls = handler.calls();
    assert_eq!(calls.len(), 3);
    for pair in calls.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(
            gap >= Duration::from_millis(950),
            "retried after {gap:?} despite Retry-After: 1"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_that_lowers_max_backoff_shortens_a_wait_already_begun() {
    let n = Arc::new(AtomicUsize::new(0));
    let handler = {
        let n = n.clone();
        HandlerServer::start(move |_| {
            let first = n.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if !first {
                    return reply(200, "");
                }
                let mut r = reply(503, "maintenance");
                r.headers_mut().insert(
                    "retry-after",
                    hyper::header::HeaderValue::from_static("3600"),
                );
                r
            }
        })
        .await
    };
    let config = |max_backoff: &str| {
        format!(
            "{SERVER}{}",
            after_handler(
                "crm",
                &handler.url("/"),
                &format!(
                    "retry = {{ attempts = 5, backoff = \"1s\", max_backoff = \"{max_backoff}\" }}"
                )
            )
        )
    };
    let db = db();
    let sidecar = Sidecar::start(&db.config(&config("1h")));
    sidecar.send("clients.update", 5, json!({})).await;
    assert!(eventually(Duration::from_secs(10), || handler.calls().len() == 1).await);

    // The handler asked for an hour, and got it: max_backoff was 1h. The operator
    // lowers it; the wait begun under the old config is held to the new one.
    write_atomic(&sidecar.config_path, &db.config(&config("1s")));
    sidecar
        .wait_for_config(Duration::from_secs(30), |c| c["generation"] == 2)
        .await;
    assert!(
        eventually(Duration::from_secs(10), || handler.calls().len() == 2).await,
        "still waiting for the Retry-After of the old config, past max_backoff = 1s"
    );
    let rows = wait_executions(&sidecar, "handler=crm", 2).await;
    assert_eq!(rows[0]["outcome"], "delivered", "{rows:?}");
    assert_eq!(rows[0]["attempt"], 2, "{rows:?}");
    drop(sidecar);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reply_cut_short_is_retried_and_says_so_with_its_status() {
    // A handler that answers 200 with a Content-Length of 100, sends 10 bytes of it and
    // closes the connection: not delivered, and the error says what happened.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let calls = Arc::new(AtomicUsize::new(0));
    let answering = {
        let calls = calls.clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut request = vec![0u8; 64 << 10];
                let _ = socket.read(&mut request).await;
                calls.fetch_add(1, Ordering::SeqCst);
                let _ = socket
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
                    .await;
            }
        })
    };
    let config = format!(
        "{SERVER}{}",
        after_handler(
            "crm",
            &url,
            "retry = { attempts = 2, backoff = \"10ms\", max_backoff = \"10ms\" }"
        )
    );
    let db = db();
    let sidecar = Sidecar::start(&db.config(&config));
    sidecar.send("clients.update", 5, json!({})).await;
    let letters = wait_dead_letters(&sidecar, 1).await;
    answering.abort();
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "retried, as a failed attempt"
    );
    let error = letters[0]["last_error"].as_str().unwrap();
    assert!(
        error.starts_with("reply cut short after HTTP status 200: "),
        "{error}"
    );
    let rows = wait_executions(&sidecar, "handler=crm", 2).await;
    assert_eq!(rows[1]["outcome"], "failed", "{rows:?}");
    assert_eq!(rows[1]["error"], error, "{rows:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delivery_keeps_its_webhook_id_across_retries_and_numbers_its_attempts() {
    let n = Arc::new(AtomicUsize::new(0));
    let handler = {
        let n = n.clone();
        HandlerServer::start(move |_| {
            let first_two = n.fetch_add(1, Ordering::SeqCst) < 2;
            async move { reply(if first_two { 500 } else { 200 }, "") }
        })
        .await
    };
    let config = format!(
        "{SERVER}{}",
        after_handler(
            "crm",
            &handler.url("/"),
            &format!("{FAST}\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"")
        )
    );
    let db = db();
    let sidecar = Sidecar::start(&db.config(&config));
    sidecar.send("clients.update", 5, json!({})).await;
    assert!(eventually(Duration::from_secs(10), || handler.calls().len() == 3).await);
    let ids: Vec<String> = handler
        .calls()
        .iter()
        .map(|c| c.header("webhook-id").unwrap().to_owned())
        .collect();
    assert!(ids[0].starts_with("msg_"), "{ids:?}");
    assert!(ids.iter().all(|id| id == &ids[0]), "{ids:?}");
    let attempts: Vec<_> = handler
        .calls()
        .iter()
        .map(|c| c.header("x-provisioning-attempt").map(str::to_owned))
        .collect();
    assert_eq!(
        attempts,
        [Some("1".into()), Some("2".into()), Some("3".into())]
    );
    // Delivered once, then left alone: the next event of the entity, which waits behind
    // the first until it is settled, comes next, with an id of its own.
    sidecar.send("clients.update", 5, json!({"next": 1})).await;
    assert!(eventually(Duration::from_secs(10), || handler.calls().len() >= 4).await);
    let calls = handler.calls();
    assert_eq!(calls.len(), 4, "delivered once, then left alone");
    assert_eq!(calls[3].json()["data"]["next"], 1);
    assert_ne!(calls[3].header("webhook-id"), Some(ids[0].as_str()));
    drop(sidecar);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_envelope_twice_is_delivered_once_even_across_a_restart() {
    let handler = HandlerServer::fixed(200, "").await;
    let config = format!("{SERVER}{}", after_handler("crm", &handler.url("/"), FAST));
    let db = db();
    let sidecar = Sidecar::start(&db.config(&config));
    let same = envelope("clients.update", 3, json!({"name": "x"})).to_string();
    for _ in 0..2 {
        let (status, body) = sidecar.post(same.clone()).await;
        assert_eq!(status, 200, "a duplicate still gets its 200");
        assert_eq!(body["data"]["name"], "x");
    }
    // A different envelope for the same entity is delivered.
    sidecar
        .send("clients.update", 3, json!({"name": "y"}))
        .await;
    assert!(eventually(Duration::from_secs(10), || handler.calls().len() == 2).await);
    // The dedupe key was committed with the delivery, before the 200: it survives kill -9.
    let (dir, path) = sidecar.kill_9();
    let sidecar = Sidecar::spawn(dir, path, &[]);
    let (status, _) = sidecar.post(same.clone()).await;
    assert_eq!(status, 200);
    // The next event of the entity: were the duplicate queued, it would arrive first.
    sidecar
        .send("clients.update", 3, json!({"name": "z"}))
        .await;
    assert!(
        eventually(Duration::from_secs(10), || handler
            .calls()
            .iter()
            .any(|c| c.json()["data"]["name"] == "z"))
        .await
    );
    let calls: Vec<(Value, String)> = handler
        .calls()
        .iter()
        .map(|c| {
            let id = c.header("webhook-id").unwrap_or_default().to_owned();
            (c.json()["data"]["name"].clone(), id)
        })
        .collect();
    // A delivery may be repeated after kill -9 when its settlement was not yet durable
    // (at least once), but a repeat carries the same webhook-id. The duplicate envelope
    // posted after the restart must not have become a delivery of its own.
    let mut x_ids: Vec<&String> = calls
        .iter()
        .filter(|(name, _)| name == "x")
        .map(|(_, id)| id)
        .collect();
    x_ids.sort();
    x_ids.dedup();
    assert_eq!(x_ids.len(), 1, "{calls:?}");
    assert!(calls.iter().any(|(name, _)| name == "y"));
}

#[tokio::test(flavor = "multi_thread")]
async fn copies_of_one_envelope_sent_at_once_are_delivered_once_beside_other_events() {
    // Sent together, they are stored together (one group commit, or one batch of the
    // redb writer): the copies dedupe within it, and the other events are stored.
    let handler = HandlerServer::fixed(200, "").await;
    let config = format!("{SERVER}{}", after_handler("crm", &handler.url("/"), FAST));
    let db = db();
    let sidecar = Arc::new(Sidecar::start(&db.config(&config)));
    let same = envelope("clients.update", 1, json!({"seq": 0})).to_string();
    let mut sends = Vec::new();
    for i in 0..24 {
        let body = if i % 2 == 0 {
            same.clone()
        } else {
            envelope("clients.update", 100 + i, json!({"seq": i})).to_string()
        };
        let sidecar = sidecar.clone();
        sends.push(tokio::spawn(async move { sidecar.post(body).await.0 }));
    }
    for send in sends {
        assert_eq!(send.await.unwrap(), 200);
    }
    // The next event of entity 1: were a copy queued, it would arrive before this one.
    sidecar.send("clients.update", 1, json!({"seq": 1})).await;
    assert!(
        eventually(Duration::from_secs(20), || handler
            .calls()
            .iter()
            .any(|c| key(c) == (1, 1)))
        .await
    );
    assert!(eventually(Duration::from_secs(20), || handler.calls().len() >= 14).await);
    let mut keys: Vec<(i64, i64)> = handler.calls().iter().map(key).collect();
    keys.sort_unstable();
    keys.dedup();
    let mut expected: Vec<(i64, i64)> = (0..24)
        .filter(|i| i % 2 == 1)
        .map(|i| (100 + i, i))
        .chain([(1, 0), (1, 1)])
        .collect();
    expected.sort_unstable();
    assert_eq!(keys, expected);
    let copies = handler
        .calls()
        .iter()
        .filter(|c| key(c) == (1, 0))
        .map(|c| c.header("webhook-id").unwrap_or_default().to_owned())
        .collect::<Vec<_>>();
    assert_eq!(
        copies.len(),
        1,
        "the envelope was delivered {} times",
        copies.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_no_dedupe_window_the_same_envelope_is_delivered_again() {
    let handler = HandlerServer::fixed(200, "").await;
    let config = format!(
        "{SERVER}[store]\ndedupe_window = \"0s\"\n{}",
        after_handler("crm", &handler.url("/"), FAST)
    );
    let db = db();
    let sidecar = Sidecar::start(&db.config(&config));
    let same = envelope("clients.update", 3, json!({})).to_string();
    sidecar.post(same.clone()).await;
    sidecar.post(same).await;
    assert!(eventually(Duration::from_secs(10), || handler.calls().len() == 2).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_denied_event_gets_no_after_stage_delivery() {
    let guard = HandlerServer::start(|call| async move {
        if call.json()["data"]["name"] == "bad" {
            reply(403, r#"{"message": "no"}"#)
        } else {
            reply(200, "")
        }
    })
    .await;
    let after = HandlerServer::fixed(200, "").await;
    let config = format!(
        "{SERVER}[[handler]]\nname = \"guard\"\nevents = [\"*\"]\nstage = \"before\"\nurl = {}\n{}",
        toml_str(guard.url("/")),
        after_handler("crm", &after.url("/"), FAST)
    );
    let db = db();
    let sidecar = Sidecar::start(&db.config(&config));
    let (status, _) = sidecar
        .send("clients.create", 1, json!({"name": "bad"}))
        .await;
    assert_eq!(status, 403);
    // The same entity: had the denied event been queued, it would be delivered first.
    let (status, _) = sidecar
        .send("clients.create", 1, json!({"name": "good"}))
        .await;
    assert_eq!(status, 200);
    assert!(eventually(Duration::from_secs(10), || !after.calls().is_empty()).await);
    let calls = after.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].json()["data"]["name"], "good");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_after_stage_gets_the_data_as_the_before_stage_left_it() {
    let upper = HandlerServer::start(|call| async move {
        let mut v = call.json();
        v["data"]["name"] = json!(v["data"]["name"].as_str().unwrap().to_uppercase());
        reply(200, v.to_string())
    })
    .await;
    let after = HandlerServer::fixed(200, "").await;
    let config = format!(
        "{SERVER}[[handler]]\nname = \"upper\"\nevents = [\"*\"]\nstage = \"before\"\nmodifies = true\nurl = {}\n{}",
        toml_str(upper.url("/")),
        after_handler("crm", &after.url("/"), FAST)
    );
    let db = db();
    let sidecar = Sidecar::start(&db.config(&config));
    let (status, body) = sidecar
        .send("clients.create", 1, json!({"name": "acme"}))
        .await;
    assert_eq!((status, &body["data"]["name"]), (200, &json!("ACME")));
    assert!(eventually(Duration::from_secs(10), || after.calls().len() == 1).await);
    assert_eq!(after.calls()[0].json(), body);
    assert_eq!(
        after.calls()[0].header("x-provisioning-handler"),
        Some("crm")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_script_is_delivered_on_exit_0_and_retried_otherwise() {
    let dir = tempfile::TempDir::new().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let path = script(
        dir.path(),
        "block.sh",
        &format!(
            "#!/bin/sh\ncat > {out}/attempt-$PROVISIONING_ATTEMPT\n\
             if [ \"$PROVISIONING_ATTEMPT\" -lt 3 ]; then echo \"switch busy\" >&2; exit 1; fi\n",
            out = out.display()
        ),
    );
    let config = format!(
        "{SERVER}[[handler]]\nname = \"block\"\nevents = [\"clients.balance_zero\"]\nstage = \"after\"\ncommand = [{}]\n{FAST}\n",
        toml_str(path.display().to_string())
    );
    let db = db();
    let sidecar = Sidecar::start_in(dir, &db.config(&config), &[]);
    sidecar.send("clients.balance_zero", 9, json!({})).await;
    let done = out.join("attempt-3");
    assert!(eventually(Duration::from_secs(10), || done.exists()).await);
    let rows = wait_executions(&sidecar, "handler=block", 3).await;
    let outcomes: Vec<(&str, i64)> = rows
        .iter()
        .map(|r| (r["outcome"].as_str().unwrap(), r["code"].as_i64().unwrap()))
        .collect();
    assert_eq!(outcomes, [("delivered", 0), ("failed", 1), ("failed", 1)]);
    assert_eq!(rows[1]["error"], "exited with status 1: switch busy");
    let body: Value =
        serde_json::from_slice(&std::fs::read(out.join("attempt-1")).unwrap()).unwrap();
    assert_eq!(body["event"]["events_id"], "clients.balance_zero");
}

/// Polls `GET /v1/executions?QUERY` until it has `n` rows; the rows.
async fn wait_executions(sidecar: &Sidecar, query: &str, n: usize) -> Vec<Value> {
    let mut last = Vec::new();
    for _ in 0..500 {
        let (status, body) = sidecar.get(&format!("/v1/executions?{query}")).await;
        assert_eq!(status, 200, "{body}");
        last = body["executions"].as_array().unwrap().clone();
        if last.len() == n {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("expected {n} rows for {query:?}, have {last:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_execution_log_records_both_stages_with_their_fields_and_filters() {
    let check = HandlerServer::fixed(200, "fine").await;
    let n = Arc::new(AtomicUsize::new(0));
    let crm = {
        let n = n.clone();
        HandlerServer::start(move |_| {
            let first = n.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                if first {
                    reply(500, "try later")
                } else {
                    reply(200, "ok")
                }
            }
        })
        .await
    };
    let config = format!(
        "{SERVER}[[handler]]\nname = \"check\"\nevents = [\"clients.*\"]\nstage = \"before\"\nurl = {}\n{}",
        toml_str(check.url("/")),
        after_handler("crm", &crm.url("/"), FAST)
    );
    let db = db();
    let sidecar = Sidecar::start(&db.config(&config));
    let before_send = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    sidecar.send("clients.create", 12, json!({})).await;
    sidecar.send("clients.update", 13, json!({})).await;
    // 2 before-stage calls, and for crm: 500 then 200 for one event, 200 for the other.
    let rows = wait_executions(&sidecar, "", 5).await;

    let before: Vec<&Value> = rows.iter().filter(|r| r["stage"] == "before").collect();
    assert_eq!(before.len(), 2);
    let row = before.iter().find(|r| r["object_id"] == "12").unwrap();
    assert_eq!(row["handler"], "check");
    assert_eq!(row["event"], "clients.create");
    assert_eq!(row["attempt"], 1);
    assert_eq!(row["outcome"], "allowed");
    assert_eq!(row["code"], 200);
    assert_eq!(row["excerpt"], "fine");
    assert_eq!(row["error"], Value::Null);
    assert_eq!(row["delivery"], Value::Null);
    assert!(row["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(
        row["time"].as_str().unwrap() >= before_send.as_str(),
        "{row}"
    );
    assert!(row["id"].as_u64().is_some());

    let failed = wait_executions(&sidecar, "outcome=failed", 1).await;
    let failed = &failed[0];
    assert_eq!(failed["stage"], "after");
    assert_eq!(failed["handler"], "crm");
    assert_eq!(failed["attempt"], 1);
    assert_eq!(failed["code"], 500);
    assert_eq!(failed["error"], "HTTP status 500: try later");
    let delivery = failed["delivery"].as_u64().unwrap();
    let delivered = wait_executions(&sidecar, "outcome=delivered", 2).await;
    let retried = delivered
        .iter()
        .find(|r| r["delivery"] == delivery)
        .expect("the failed delivery was delivered later");
    assert_eq!(retried["attempt"], 2);
    assert_eq!(retried["object_id"], failed["object_id"]);

    // Filters.
    assert_eq!(wait_executions(&sidecar, "handler=check", 2).await.len(), 2);
    let twelve = rows.iter().filter(|r| r["object_id"] == "12").count();
    let on_12 = wait_executions(&sidecar, "object_id=12", twelve).await;
    assert!(on_12.iter().all(|r| r["object_id"] == "12"));
    let creates = wait_executions(&sidecar, "event=clients.create&handler=check", 1).await;
    assert_eq!(creates[0]["object_id"], "12");
    let newest = wait_executions(&sidecar, "limit=1", 1).await;
    assert_eq!(newest[0]["id"], rows[0]["id"]);
    wait_executions(&sidecar, "since=2999-01-01T00:00:00Z", 0).await;
    assert_eq!(wait_executions(&sidecar, "since=1h", 5).await.len(), 5);
    let (status, body) = sidecar.get("/v1/executions?colour=blue").await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown filter \"colour\""),
        "{body}"
    );
    let (status, _) = sidecar.get("/v1/executions?limit=0").await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_the_attempt_in_flight_finish_and_keeps_the_rest() {
    let slow = Arc::new(AtomicBool::new(true));
    let handler = {
        let slow = slow.clone();
        HandlerServer::start(move |_| {
            let slow = slow.load(Ordering::SeqCst);
            async move {
                if slow {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                }
                reply(200, "")
            }
        })
        .await
    };
    let config = format!(
        "{SERVER}{}",
        after_handler(
            "crm",
            &handler.url("/"),
            &format!("{FAST}\ntimeout = \"10s\"")
        )
    );
    let db = db();
    let sidecar = Sidecar::start(&db.config(&config));
    for seq in 0..3 {
        let (status, _) = sidecar.send("clients.update", 1, json!({"seq": seq})).await;
        assert_eq!(status, 200);
    }
    assert!(eventually(Duration::from_secs(10), || handler.calls().len() == 1).await);
    let (dir, path, status) = sidecar.terminate();
    assert!(status.success(), "{status:?}");
    assert_eq!(
        handler.calls().len(),
        1,
        "nothing new started after SIGTERM"
    );

    slow.store(false, Ordering::SeqCst);
    let sidecar = Sidecar::spawn(dir, path, &[]);
    // One more event of the entity, delivered behind the stored ones: once it is there,
    // a repeat of the finished attempt would have come before it.
    let (status, _) = sidecar.send("clients.update", 1, json!({"seq": 3})).await;
    assert_eq!(status, 200);
    assert!(
        eventually(Duration::from_secs(10), || handler
            .calls()
            .iter()
            .any(|c| key(c).1 == 3))
        .await
    );
    let seqs: Vec<i64> = handler.calls().iter().map(|c| key(c).1).collect();
    assert_eq!(
        seqs,
        [0, 1, 2, 3],
        "the finished attempt was recorded, not repeated"
    );
    drop(sidecar);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_lists_replays_and_drops_dead_letters_of_a_running_sidecar() {
    let handler = HandlerServer::fixed(410, "no such client").await;
    let config = format!("{SERVER}{}", after_handler("crm", &handler.url("/"), FAST));
    let db = db();
    let sidecar = Sidecar::start(&db.config(&config));
    sidecar.send("clients.create", 12, json!({})).await;
    sidecar.send("clients.create", 13, json!({})).await;
    let letters = wait_dead_letters(&sidecar, 2).await;
    let first = letters[0]["id"].as_u64().unwrap().to_string();
    let second = letters[1]["id"].as_u64().unwrap().to_string();
    let url = format!("http://{}", sidecar.addr);
    let dir = sidecar.dir.path();

    let (code, out, err) = run_binary(dir, &["deadletters", "list", "--url", &url]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].starts_with("ID     DIED"), "a header first: {out}");
    assert!(lines[1].starts_with(&first), "{out}");
    assert!(
        lines[1].contains("crm") && lines[1].contains("handler answered 410 Gone: no such client"),
        "{out}"
    );
    let (code, out, _) = run_binary(dir, &["deadletters", "list", "--url", &url, "--json"]);
    assert_eq!(code, 0);
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed["count"], 2);

    let (code, out, err) = run_binary(dir, &["executions", "--url", &url, "--object-id", "13"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 2, "a header and the row: {out}");
    assert!(
        out.contains("after") && out.contains("dead") && out.contains("410"),
        "{out}"
    );

    let (code, out, err) = run_binary(dir, &["deadletters", "drop", &second, "--url", &url]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), format!("dead letter {second} dropped"));
    let (code, _, err) = run_binary(dir, &["deadletters", "drop", &second, "--url", &url]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("no dead letter {second} (HTTP 404)")),
        "{err}"
    );

    let (code, out, err) = run_binary(dir, &["deadletters", "replay", &first, "--url", &url]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(&format!("dead letter {first} replayed as delivery ")),
        "{out}"
    );
    assert!(eventually(Duration::from_secs(10), || handler.calls().len() == 3).await);

    // Without --url, the address comes from the config file.
    let other = tempfile::TempDir::new().unwrap();
    std::fs::write(
        other.path().join("provisioning.toml"),
        format!("[server]\nlisten = \"{}\"\n", sidecar.addr),
    )
    .unwrap();
    let listed = wait_dead_letters(&sidecar, 1).await;
    let (code, out, err) = run_binary(other.path(), &["deadletters", "list"]);
    assert_eq!(code, 0, "{err}");
    let id = listed[0]["id"].as_u64().unwrap().to_string();
    assert!(
        out.lines().nth(1).unwrap_or_default().starts_with(&id),
        "{out}"
    );

    // Nothing listening: a clear error.
    let (code, _, err) = run_binary(
        other.path(),
        &["executions", "--url", &format!("http://{}", free_addr())],
    );
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach provisiond at"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_tables_keep_a_reply_with_control_characters_on_its_line() {
    // CRLF line ends (a Windows script, a proxy's error page) and an escape sequence
    // that would clear the operator's screen.
    let handler = HandlerServer::fixed(410, "no such client\r\nsee\x1b[2J the log").await;
    let config = format!("{SERVER}{}", after_handler("crm", &handler.url("/"), FAST));
    let db = db();
    let sidecar = Sidecar::start(&db.config(&config));
    sidecar.send("clients.create", 12, json!({})).await;
    wait_dead_letters(&sidecar, 1).await;
    wait_executions(&sidecar, "handler=crm", 1).await;
    let url = format!("http://{}", sidecar.addr);
    let dir = sidecar.dir.path();
    for args in [
        &["deadletters", "list", "--url", &url][..],
        &["executions", "--url", &url, "--handler", "crm"][..],
    ] {
        let (code, out, err) = run_binary(dir, args);
        assert_eq!(code, 0, "{err}");
        assert!(
            !out.chars().any(|c| c.is_control() && c != '\n'),
            "{args:?} printed control characters: {out:?}"
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "a header and one line: {out}");
        assert!(
            lines[1].contains("410 Gone: no such client see\\u{1b}[2J the log"),
            "{out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_show_the_queue_the_dead_letters_and_after_stage_calls() {
    let gone = HandlerServer::fixed(410, "").await;
    let config = format!(
        "{SERVER}{}{}",
        after_handler("down", &refused_url(), FAST),
        after_handler("gone", &gone.url("/"), FAST)
    );
    let db = db();
    let sidecar = Sidecar::start(&db.config(&config));
    sidecar.send("clients.update", 1, json!({"n": 1})).await;
    sidecar.send("clients.update", 1, json!({"n": 2})).await;
    sidecar.send("clients.update", 2, json!({"n": 3})).await;
    wait_dead_letters(&sidecar, 3).await;
    let (status, text) = sidecar.get("/metrics").await;
    assert_eq!(status, 200);
    let text = text.as_str().unwrap().to_owned();
    assert_eq!(
        metric(&text, "provisiond_after_queue_depth{handler=\"down\"}"),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "provisiond_after_queue_depth{handler=\"gone\"}"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "provisiond_dead_letters"),
        Some(3.0),
        "{text}"
    );
    assert!(metric(&text, "provisiond_after_queue_oldest_age_seconds").is_some_and(|a| a >= 0.0));
    // The down handler's oldest delivery is waiting, and ages; the other has nothing.
    let mut age = None;
    for _ in 0..100 {
        let (_, text) = sidecar.get("/metrics").await;
        age = metric(
            text.as_str().unwrap(),
            "provisiond_after_handler_oldest_age_seconds{handler=\"down\"}",
        );
        if age.is_some_and(|a| a > 0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(age.is_some_and(|a| a > 0.0), "{age:?}");
    assert_eq!(
        metric(
            &text,
            "provisiond_after_handler_oldest_age_seconds{handler=\"gone\"}"
        ),
        Some(0.0),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("provisiond_handler_calls_total")
                && l.contains("handler=\"down\"")
                && l.contains("stage=\"after\"")
                && l.contains("outcome=\"failed\"")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("provisiond_handler_calls_total")
                && l.contains("handler=\"gone\"")
                && l.contains("outcome=\"dead\"")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clients_custom_fields_update_waits_behind_the_clients_update_before_it() {
    // clients.update fails until the custom fields event has arrived, or for 2 s: were
    // the two events different entities, the custom fields one would be delivered first.
    let first_seen = Arc::new(Mutex::new(None::<std::time::Instant>));
    let delivered = Arc::new(Mutex::new(Vec::<String>::new()));
    let handler = {
        let (first_seen, delivered) = (first_seen.clone(), delivered.clone());
        HandlerServer::start(move |call| {
            let (first_seen, delivered) = (first_seen.clone(), delivered.clone());
            async move {
                let event = call.json()["event"]["events_id"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                let mut delivered = delivered.lock().unwrap();
                let custom_seen = delivered.iter().any(|e| e != "clients.update");
                let first = *first_seen.lock().unwrap().get_or_insert(call.at);
                if event == "clients.update"
                    && !custom_seen
                    && first.elapsed() < Duration::from_secs(2)
                {
                    return reply(500, "not yet");
                }
                delivered.push(event);
                reply(200, "")
            }
        })
        .await
    };
    let config = format!("{SERVER}{}", after_handler("crm", &handler.url("/"), FAST));
    let db = db();
    let sidecar = Sidecar::start(&db.config(&config));
    let (status, _) = sidecar
        .send("clients.update", 12, json!({"name": "x"}))
        .await;
    assert_eq!(status, 200);
    assert!(eventually(Duration::from_secs(10), || !handler.calls().is_empty()).await);
    let (status, _) = sidecar
        .send("clients.custom_fields.update", 12, json!({"vip": true}))
        .await;
    assert_eq!(status, 200);
    assert!(
        eventually(Duration::from_secs(20), || delivered.lock().unwrap().len()
            == 2)
        .await,
        "{:?}",
        delivered.lock().unwrap()
    );
    assert_eq!(
        *delivered.lock().unwrap(),
        ["clients.update", "clients.custom_fields.update"],
        "both are about client 12: delivered in the order they arrived"
    );
}

/// Sends `body` as a POST to `/events` over a raw connection and resets the connection
/// at once, without reading the reply: a billing that hangs up.
async fn post_and_hang_up(addr: &str, body: &str) {
    use tokio::io::AsyncWriteExt as _;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    // An RST, not a FIN: the server sees the connection gone while it works.
    stream.set_zero_linger().unwrap();
    drop(stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hang_ups_at_any_moment_then_retries_lose_no_delivery() {
    let crm = HandlerServer::echo().await;
    let config = format!("{SERVER}{}", after_handler("crm", &crm.url("/"), FAST));
    let db = db();
    let sidecar = Sidecar::start(&db.config(&config));
    const N: i64 = 300;
    let bodies: Vec<String> = (0..N)
        .map(|i| envelope("clients.update", i, json!({"seq": i})).to_string())
        .collect();
    // Each envelope once with a hang-up, 30 at a time, so that hang-ups land while
    // commits are in progress.
    for chunk in bodies.chunks(30) {
        let mut tasks = Vec::new();
        for body in chunk {
            let (addr, body) = (sidecar.addr.clone(), body.clone());
            tasks.push(tokio::spawn(
                async move { post_and_hang_up(&addr, &body).await },
            ));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
    // The billing's retries: the same bytes, answered 200 (stored now or deduped).
    for body in &bodies {
        let (status, reply) = sidecar.post(body.clone()).await;
        assert_eq!(status, 200, "{reply}");
    }
    let all_delivered = eventually(Duration::from_secs(30), || {
        let seen: std::collections::HashSet<i64> = crm.calls().iter().map(|c| key(c).0).collect();
        seen.len() == usize::try_from(N).unwrap()
    })
    .await;
    let seen: std::collections::HashSet<i64> = crm.calls().iter().map(|c| key(c).0).collect();
    assert!(
        all_delivered,
        "{} of {N} envelopes answered 200 reached the handler",
        seen.len()
    );
    // A hang-up is no reason to deliver twice: the retry was deduped.
    assert_eq!(
        crm.calls().len(),
        usize::try_from(N).unwrap(),
        "duplicates delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_events_of_one_entity_are_attempted_in_store_order() {
    let crm = HandlerServer::echo().await;
    let config = format!("{SERVER}{}", after_handler("crm", &crm.url("/"), FAST));
    let db = db();
    let sidecar = Sidecar::start(&db.config(&config));
    const CLIENTS: i64 = 8;
    const EACH: i64 = 40;
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let url = sidecar.url("/events");
        tasks.push(tokio::spawn(async move {
            let http = http_client();
            for n in 0..EACH {
                let seq = client * 1000 + n;
                let body = envelope("clients.update", 7, json!({"seq": seq}));
                let r = http.post(&url).body(body.to_string()).send().await.unwrap();
                assert_eq!(r.status(), 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = usize::try_from(CLIENTS * EACH).unwrap();
    assert!(eventually(Duration::from_secs(30), || crm.calls().len() >= total).await);
    // The handler's order is the store's: delivery ids only grow, in the execution log
    // (which lists newest first) as at the handler.
    let mut rows = Vec::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            let fetched = std::thread::scope(|s| {
                s.spawn(|| {
                    let rt = tokio::runtime::Runtime::new().unwrap();
                    rt.block_on(sidecar.get("/v1/executions?handler=crm&limit=1000"))
                })
                .join()
                .unwrap()
            });
            rows = fetched.1["executions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            rows.len() >= total
        })
        .await,
        "the execution log has {} of {total} attempts",
        rows.len()
    );
    let ids: Vec<u64> = rows
        .iter()
        .rev()
        .map(|r| r["delivery"].as_u64().unwrap())
        .collect();
    let out_of_order = ids.windows(2).filter(|w| w[0] >= w[1]).count();
    assert_eq!(out_of_order, 0, "attempts out of store order: {ids:?}");
    // Each client's events, answered one after another, arrive in its order; nothing
    // arrives twice.
    let seqs: Vec<i64> = crm.calls().iter().map(|c| key(c).1).collect();
    assert_eq!(seqs.len(), total, "duplicates delivered");
    for client in 0..CLIENTS {
        let mine: Vec<i64> = seqs
            .iter()
            .copied()
            .filter(|s| s / 1000 == client)
            .collect();
        let mut sorted = mine.clone();
        sorted.sort_unstable();
        assert_eq!(mine, sorted, "client {client}'s events out of order");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_upload_is_cut_at_the_deadline_and_frees_its_slot() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let config = "[server]\nlisten = \"127.0.0.1:0\"\ndeadline = \"300ms\"\nmax_in_flight = 1\n";
    let db = db();
    let sidecar = Sidecar::start(&db.config(config));
    let mut stream = tokio::net::TcpStream::connect(&sidecar.addr).await.unwrap();
    stream
        .write_all(b"POST /events HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"event\":")
        .await
        .unwrap();
    // The rest never comes: the sidecar answers by itself.
    let mut reply = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut reply)).await;
    assert!(read.is_ok(), "no answer to a stalled upload");
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("server.deadline"), "{reply}");
    // Its in-flight slot (the only one) is free again.
    let (status, body) = sidecar.send("clients.create", 1, json!({})).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_up_event_leaves_the_in_flight_gauge() {
    let slow = HandlerServer::start(|_| async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        reply(200, "")
    })
    .await;
    let config = format!(
        "{SERVER}[[handler]]\nname = \"slow\"\nevents = [\"*\"]\nstage = \"before\"\nurl = \"{}\"\n",
        slow.url("/")
    );
    let db = db();
    let sidecar = Sidecar::start(&db.config(&config));
    let mut streams = Vec::new();
    for i in 0..5 {
        use tokio::io::AsyncWriteExt as _;
        let body = envelope("clients.update", i, json!({})).to_string();
        let mut stream = tokio::net::TcpStream::connect(&sidecar.addr).await.unwrap();
        let request = format!(
            "POST /events HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        streams.push(stream);
    }
    // Every event reached the handler, so each is in flight; then the billing hangs up.
    assert!(eventually(Duration::from_secs(10), || slow.calls().len() == 5).await);
    for stream in streams {
        stream.set_zero_linger().unwrap();
    }
    // None is in flight any more, once the handler has answered them.
    let mut last = None;
    for _ in 0..100 {
        let (_, text) = sidecar.get("/metrics").await;
        last = metric(text.as_str().unwrap(), "provisiond_events_in_flight");
        if last == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last, Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_of_more_lanes_than_memory_holds_is_delivered_in_order() {
    // More entities than a handler keeps lanes in memory: most wait in the store only,
    // and come in as lanes finish.
    let cap = provisiond::delivery::LANES_PER_HANDLER;
    let entities = i64::try_from(cap).unwrap() + 500;
    // The handler holds every call until the gate opens: meanwhile all lanes wait.
    let (gate, opened) = tokio::sync::watch::channel(false);
    let crm = HandlerServer::start(move |call| {
        let mut opened = opened.clone();
        async move {
            let _ = opened.wait_for(|open| *open).await;
            reply(200, call.body)
        }
    })
    .await;
    let config = format!(
        "{SERVER}{}",
        after_handler("crm", &crm.url("/"), &format!("{FAST}\ntimeout = \"120s\""))
    );
    let db = db();
    let sidecar = Sidecar::start(&db.config(&config));
    let mut acked = Vec::new();
    let all: Vec<i64> = (0..entities).collect();
    for chunk in all.chunks(64) {
        acked.extend(send_all(sidecar.url("/events"), chunk.to_vec(), 2).await);
    }
    assert_eq!(acked.len(), usize::try_from(entities).unwrap() * 2);
    let (_, text) = sidecar.get("/metrics").await;
    let text = text.as_str().unwrap().to_owned();
    assert_eq!(
        metric(&text, "provisiond_after_queue_depth{handler=\"crm\"}"),
        Some(acked.len() as f64),
        "{text}"
    );
    let lanes = metric(&text, "provisiond_after_lanes_in_memory").unwrap();
    assert!(lanes <= cap as f64, "{lanes} lanes in memory");
    gate.send_replace(true);
    let all = eventually(Duration::from_secs(120), || {
        crm.calls().len() >= acked.len()
    })
    .await;
    assert!(all, "{} of {} delivered", crm.calls().len(), acked.len());
    let calls = crm.calls();
    assert_eq!(calls.len(), acked.len(), "duplicates delivered");
    for (entity, seqs) in by_entity(calls.iter().map(key)) {
        assert_eq!(seqs, vec![0, 1], "entity {entity} out of order");
    }
}
