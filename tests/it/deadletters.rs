//! Bulk dead letters: after a handler's outage, replay (or drop) everything that matches
//! a filter at once, through the admin API and the command line, in each entity's order.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::common::*;
use serde_json::{Value, json};

/// The `provisiond_dead_letters` gauge.
async fn dead_letter_count(sidecar: &Sidecar) -> u64 {
    let text = sidecar.metrics_text().await;
    text.lines()
        .find_map(|l| l.strip_prefix("provisiond_dead_letters "))
        .map_or(0, |v| v.trim().parse::<u64>().unwrap())
}

async fn wait_dead(sidecar: &Sidecar, n: u64) {
    let until = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let have = dead_letter_count(sidecar).await;
        if have == n {
            return;
        }
        assert!(
            std::time::Instant::now() < until,
            "expected {n} dead letters, have {have}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A CRM that answers 410 while it is "down" (every delivery goes straight to the dead
/// letters), 200 once it is back.
async fn crm(down: Arc<AtomicBool>) -> HandlerServer {
    HandlerServer::start(move |_| {
        let down = down.clone();
        async move {
            if down.load(Ordering::SeqCst) {
                reply(410, "down")
            } else {
                reply(200, "")
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bulk_replay_of_thousands_keeps_each_entitys_order() {
    const ENTITIES: i64 = 20;
    const PER_ENTITY: i64 = 100;
    const TOTAL: u64 = (ENTITIES * PER_ENTITY) as u64;
    let down = Arc::new(AtomicBool::new(true));
    let handler = crm(down.clone()).await;
    let config = format!(
        "{SERVER}{}",
        after_handler("crm", &handler.url("/sync"), "max_concurrency = 8")
    );
    let sidecar = Arc::new(Sidecar::start(&config));

    // Each entity's events in order, the entities in parallel.
    let mut senders = tokio::task::JoinSet::new();
    for entity in 1..=ENTITIES {
        let sidecar = sidecar.clone();
        senders.spawn(async move {
            for seq in 0..PER_ENTITY {
                let (status, body) = sidecar
                    .send("clients.update", entity, json!({"seq": seq}))
                    .await;
                assert_eq!(status, 200, "{body}");
            }
        });
    }
    while let Some(done) = senders.join_next().await {
        done.unwrap();
    }
    wait_dead(&sidecar, TOTAL).await;
    let outage = handler.calls().len();
    assert_eq!(
        outage as u64, TOTAL,
        "one attempt each, then the dead letters"
    );

    // The CRM is back: one request puts them all back, in order.
    down.store(false, Ordering::SeqCst);
    let (status, body) = sidecar
        .post_to("/v1/deadletters/replay", r#"{"handler": "crm"}"#)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"replayed": TOTAL, "skipped": 0}));
    assert!(
        eventually(Duration::from_secs(120), || handler.calls().len() as u64
            == 2 * TOTAL)
        .await,
        "replayed {} of {TOTAL}",
        handler.calls().len() - outage
    );
    wait_dead(&sidecar, 0).await;

    // The handler's own record: per entity, the replayed calls came in arrival order.
    let calls = handler.calls();
    let mut seen: std::collections::HashMap<i64, Vec<i64>> = Default::default();
    for call in &calls[outage..] {
        let envelope = call.json();
        seen.entry(envelope["event"]["object_id"].as_i64().unwrap())
            .or_default()
            .push(envelope["data"]["seq"].as_i64().unwrap());
    }
    assert_eq!(i64::try_from(seen.len()).unwrap(), ENTITIES);
    let in_order: Vec<i64> = (0..PER_ENTITY).collect();
    for (entity, seqs) in &seen {
        assert_eq!(seqs, &in_order, "clients/{entity} out of order");
    }
    // Nothing left to replay.
    let (_, body) = sidecar
        .post_to("/v1/deadletters/replay", r#"{"all": true}"#)
        .await;
    assert_eq!(body["replayed"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn filters_choose_what_is_replayed_or_dropped_and_an_empty_filter_is_refused() {
    let down = Arc::new(AtomicBool::new(true));
    let crm_server = crm(down.clone()).await;
    let erp_server = crm(Arc::new(AtomicBool::new(true))).await;
    let handlers = format!(
        "{}{}",
        after_handler("crm", &crm_server.url("/crm"), ""),
        after_handler("erp", &erp_server.url("/erp"), "")
    );
    let sidecar = Sidecar::start(&format!("{SERVER}{handlers}"));
    for (event, id) in [
        ("clients.create", 1),
        ("clients.update", 1),
        ("clients.update", 2),
        ("clients.accounts.create", 7),
    ] {
        let (status, _) = sidecar.send(event, id, json!({})).await;
        assert_eq!(status, 200);
    }
    wait_dead(&sidecar, 8).await;

    // Bad filters are refused, naming the fix; nothing moves.
    for (body, message) in [
        (
            "{}",
            "no filter given; give one or more of handler, event, object_id, entity, since, \
             until, or all: \"all\": true to take every dead letter",
        ),
        (
            "",
            "no filter given; give one or more of handler, event, object_id, entity, since, \
             until, or all: \"all\": true to take every dead letter",
        ),
        (
            r#"{"hander": "crm"}"#,
            "unknown filter \"hander\"; use handler, event, object_id, entity, since, until, \
             or all",
        ),
        (
            r#"{"all": true, "handler": "crm"}"#,
            "\"all\": true takes every dead letter; leave it out to take only those the \
             filters match",
        ),
        (
            r#"{"since": "yesterday"}"#,
            "since must be a time (\"2026-11-26T10:00:00Z\", \"2026-11-26T12:00:00+02:00\"; \
             without a zone, UTC) or a duration back from now (\"15m\"), got \"yesterday\"",
        ),
        (
            r#"{"until": "soon"}"#,
            "until must be a time (\"2026-11-26T10:00:00Z\", \"2026-11-26T12:00:00+02:00\"; \
             without a zone, UTC) or a duration back from now (\"15m\"), got \"soon\"",
        ),
        (
            r#"{"handler": ["crm"]}"#,
            "handler must be a string or a number, got an array",
        ),
        (
            r#"{"all": "yes"}"#,
            "all must be true or false, got a string",
        ),
        (
            "[1]",
            "the body must be a JSON object of filters (handler, event, object_id, entity, since, until, or all)",
        ),
    ] {
        for route in ["/v1/deadletters/replay", "/v1/deadletters/drop"] {
            let (status, reply) = sidecar.post_to(route, body).await;
            assert_eq!(status, 400, "{route} {body}: {reply}");
            assert_eq!(reply["error"]["message"], message, "{route} {body}");
        }
    }
    // A window that cannot hold anything (since is the earlier end) is refused, not
    // answered with 0; the list says the same.
    let (status, reply) = sidecar
        .post_to("/v1/deadletters/drop", r#"{"since": "1h", "until": "2h"}"#)
        .await;
    assert_eq!(status, 400, "{reply}");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("since ("), "{message}");
    assert!(message.contains("is not before until"), "{message}");
    let (status, reply) = sidecar.get("/v1/deadletters?since=1h&until=2h").await;
    assert_eq!(status, 400, "{reply}");
    // A filter naming what the config does not know matches nothing, and says so.
    let (status, reply) = sidecar
        .post_to("/v1/deadletters/drop", r#"{"event": "clients.creat"}"#)
        .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["dropped"], 0);
    assert_eq!(
        reply["message"],
        "\"clients.creat\" is neither in the catalogue nor in [events] extra (did you mean \
         \"clients.create\"?)"
    );
    let (_, reply) = sidecar
        .post_to("/v1/deadletters/replay", r#"{"handler": "crn"}"#)
        .await;
    assert_eq!(reply["replayed"], 0);
    assert_eq!(
        reply["message"],
        "the config has no handler \"crn\" (did you mean \"crm\"?)"
    );
    // A time with an offset is that instant.
    let (status, reply) = sidecar
        .get("/v1/deadletters?until=2000-01-01T02:00:00%2B02:00")
        .await;
    assert_eq!((status, &reply["count"]), (200, &json!(0)), "{reply}");
    let (status, _) = sidecar.get("/v1/deadletters/replay").await;
    assert_eq!(status, 405);
    assert_eq!(dead_letter_count(&sidecar).await, 8);

    // Drop by event and object id: the erp's copy and the crm's of clients.update #2.
    let (status, body) = sidecar
        .post_to(
            "/v1/deadletters/drop",
            r#"{"event": "clients.update", "object_id": 2}"#,
        )
        .await;
    assert_eq!((status, body), (200, json!({"dropped": 2})));
    // Replay by entity and handler, from the command line: crm's two for clients/1.
    down.store(false, Ordering::SeqCst);
    let url = format!("http://{}", sidecar.addr);
    let dir = sidecar.dir.path();
    let (code, out, err) = run_binary(
        dir,
        &[
            "deadletters",
            "replay",
            "--handler",
            "crm",
            "--entity",
            "clients/1",
            "--url",
            &url,
        ],
    );
    assert_eq!(
        (code, out.as_str()),
        (0, "2 dead letters replayed\n"),
        "{err}"
    );
    assert!(eventually(Duration::from_secs(10), || crm_server.calls().len() == 6).await);
    wait_dead(&sidecar, 4).await;

    // A time window that holds nothing takes nothing.
    let (code, out, _) = run_binary(
        dir,
        &["deadletters", "drop", "--until", "1h", "--url", &url],
    );
    assert_eq!((code, out.as_str()), (0, "0 dead letters dropped\n"));

    // A handler the config no longer has: its letters stay, and the reply says why.
    std::fs::write(
        &sidecar.config_path,
        format!(
            "{SERVER}{}",
            after_handler("crm", &crm_server.url("/crm"), "")
        ),
    )
    .unwrap();
    let (status, body) = sidecar.post_to("/v1/reload", "").await;
    assert_eq!(status, 200, "{body}");
    // Exit 1: not all that the filters took was replayed.
    let (code, out, err) = run_binary(dir, &["deadletters", "replay", "--all", "--url", &url]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(out, "1 dead letter replayed\n");
    assert_eq!(
        err,
        "provisiond: 3 matching dead letters left in place: the config has no after-stage \
         handler erp; add it back, or drop them\n"
    );
    wait_dead(&sidecar, 3).await;
    let (code, out, _) = run_binary(
        dir,
        &[
            "deadletters",
            "drop",
            "--handler",
            "erp",
            "--since",
            "1h",
            "--url",
            &url,
        ],
    );
    assert_eq!((code, out.as_str()), (0, "3 dead letters dropped\n"));
    wait_dead(&sidecar, 0).await;

    // The command line wants one id, a filter or --all, and not an id with a filter.
    let (code, _, err) = run_binary(dir, &["deadletters", "replay", "--url", &url]);
    assert_eq!(code, 2);
    assert!(err.contains("<ID|--handler <HANDLER>|"), "{err}");
    assert!(err.contains("|--all>"), "{err}");
    let (code, _, err) = run_binary(dir, &["deadletters", "drop", "3", "--handler", "crm"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("the argument '[ID]' cannot be used with '--handler <HANDLER>'"),
        "{err}"
    );
    let (code, _, err) = run_binary(dir, &["deadletters", "drop", "--all", "--event", "x"]);
    assert_eq!(code, 2, "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn replayed_deliveries_show_in_the_log_under_their_event_id() {
    let down = Arc::new(AtomicBool::new(true));
    let handler = crm(down.clone()).await;
    let sidecar = Sidecar::start(&format!(
        "{SERVER}{}",
        after_handler("crm", &handler.url("/"), "")
    ));
    let response = sidecar
        .client()
        .post(sidecar.url("/events"))
        .body(envelope("clients.create", 5, json!({})).to_string())
        .send()
        .await
        .unwrap();
    let event_id = response.headers()["x-provisioning-event-id"]
        .to_str()
        .unwrap()
        .to_owned();
    wait_dead(&sidecar, 1).await;
    down.store(false, Ordering::SeqCst);
    let (_, body) = sidecar
        .post_to("/v1/deadletters/replay", r#"{"object_id": "5"}"#)
        .await;
    assert_eq!(body["replayed"], 1, "{body}");
    let mut rows: Vec<Value> = Vec::new();
    for _ in 0..200 {
        let (_, body) = sidecar
            .get(&format!("/v1/executions?event_id={event_id}"))
            .await;
        rows = body["executions"].as_array().unwrap().clone();
        if rows.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let outcomes: Vec<&str> = rows
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["delivered", "dead"], "{rows:?}");
    assert!(rows.iter().all(|r| r["event_id"] == event_id.as_str()));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_list_takes_the_bulk_filters_shows_what_a_drop_takes_and_pages() {
    the_list_takes_the_bulk_filters("").await;
}

/// The dead letters' list, on the store `store` says (`[store]` TOML; the default's
/// when empty): the bulk filters, what a drop with them takes, pages, bad filters, the
/// command line.
pub(crate) async fn the_list_takes_the_bulk_filters(store: &str) {
    let down = Arc::new(AtomicBool::new(true));
    let crm_server = crm(down.clone()).await;
    let erp_server = crm(down).await;
    let handlers = format!(
        "{}{}",
        after_handler("crm", &crm_server.url("/crm"), ""),
        after_handler("erp", &erp_server.url("/erp"), "")
    );
    let sidecar = Sidecar::start(&format!("{SERVER}{store}{handlers}"));
    for (event, id) in [
        ("clients.create", 1),
        ("clients.update", 1),
        ("clients.update", 2),
        ("clients.create", 3),
    ] {
        let (status, _) = sidecar.send(event, id, json!({})).await;
        assert_eq!(status, 200);
    }
    wait_dead(&sidecar, 8).await;
    let list = |query: &'static str| {
        let sidecar = &sidecar;
        async move {
            let (status, body) = sidecar.get(&format!("/v1/deadletters{query}")).await;
            assert_eq!(status, 200, "{query}: {body}");
            let rows = body["deadletters"].as_array().unwrap().clone();
            assert_eq!(body["count"], rows.len(), "{query}");
            let ids: Vec<u64> = rows.iter().map(|r| r["id"].as_u64().unwrap()).collect();
            (ids, rows, body["more"].as_bool().unwrap())
        }
    };
    let (all, _, more) = list("").await;
    assert_eq!((all.len(), more), (8, false));
    assert!(all.windows(2).all(|w| w[0] < w[1]), "oldest first: {all:?}");

    // The bulk routes' filters, each alone and together.
    let (_, rows, _) = list("?event=clients.update").await;
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|r| r["event"] == "clients.update"));
    let (_, rows, _) = list("?event=clients.update&handler=crm&object_id=2").await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (&rows[0]["handler"], &rows[0]["object_id"]),
        (&json!("crm"), &json!("2"))
    );
    let (_, rows, _) = list("?entity=clients/1").await;
    assert_eq!(rows.len(), 4);
    assert_eq!(list("?since=1h").await.0.len(), 8);
    assert!(list("?until=1h").await.0.is_empty());

    // What the list shows is what a drop with the same filters takes.
    let (shown, _, _) = list("?event=clients.create&object_id=3").await;
    assert_eq!(shown.len(), 2);
    let (status, reply) = sidecar
        .post_to(
            "/v1/deadletters/drop",
            r#"{"event": "clients.create", "object_id": "3"}"#,
        )
        .await;
    assert_eq!((status, &reply["dropped"]), (200, &json!(2)), "{reply}");
    let (left, _, _) = list("").await;
    assert!(
        shown.iter().all(|id| !left.contains(id)),
        "{shown:?} {left:?}"
    );
    assert_eq!(left.len(), 6);

    // Pages: `after` the last id shown, `more` until the last page.
    let mut paged: Vec<u64> = Vec::new();
    let mut after = 0;
    loop {
        let (status, body) = sidecar
            .get(&format!("/v1/deadletters?limit=4&after={after}"))
            .await;
        assert_eq!(status, 200, "{body}");
        let ids: Vec<u64> = body["deadletters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_u64().unwrap())
            .collect();
        paged.extend(&ids);
        if body["more"] == false {
            break;
        }
        after = *ids.last().unwrap();
    }
    assert_eq!(paged, left, "the pages, end to end, are the whole list");

    // Bad filters name the fix.
    for (query, message) in [
        (
            "?hander=crm",
            "unknown filter \"hander\"; use handler, event, object_id, entity, since, until, \
             after, limit",
        ),
        (
            "?since=yesterday",
            "since must be a time (\"2026-11-26T10:00:00Z\", \"2026-11-26T12:00:00+02:00\"; \
             without a zone, UTC) or a duration back from now (\"15m\"), got \"yesterday\"",
        ),
        (
            "?until=soon",
            "until must be a time (\"2026-11-26T10:00:00Z\", \"2026-11-26T12:00:00+02:00\"; \
             without a zone, UTC) or a duration back from now (\"15m\"), got \"soon\"",
        ),
        (
            "?after=last",
            "after must be a row id (a whole number), got \"last\"",
        ),
        (
            "?limit=1001",
            "limit is at most 1000, got 1001; narrow the query with the filters or after",
        ),
    ] {
        let (status, body) = sidecar.get(&format!("/v1/deadletters{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"]["message"], message, "{query}");
    }

    // The command line: the same filters, and the next page named.
    let url = format!("http://{}", sidecar.addr);
    let dir = sidecar.dir.path();
    let (code, out, err) = run_binary(
        dir,
        &[
            "deadletters",
            "list",
            "--event",
            "clients.update",
            "--limit",
            "1",
            "--url",
            &url,
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 2, "a header and one row: {out}");
    let (first, _, _) = list("?event=clients.update&limit=1").await;
    assert_eq!(
        err,
        format!(
            "more dead letters match: --after {} for the next ones\n",
            first[0]
        )
    );
}
