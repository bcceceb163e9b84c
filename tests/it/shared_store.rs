//! The PostgreSQL backend's own promises, beyond the after-stage suite that runs on
//! both backends (`after_pg`): a handler removed by one sidecar's reload but kept by
//! another is not dead-lettered, and one disabled on one sidecar is delivered by another; `store copy` moves a redb file's queue and dead letters
//! in; a schema newer than the build is refused, one older is migrated at start, and
//! sidecars started together create it once; the URL's password is never shown; retention prunes the shared log; a bulk
//! replay takes its lanes in the order accepts do.

use std::sync::Arc;
use std::time::Duration;

use crate::common::pg::{self, PgServer};
use crate::common::*;
use serde_json::json;

/// Fast retries, so that tests never wait long.
const FAST: &str = "retry = { attempts = 1000, backoff = \"10ms\", max_backoff = \"200ms\" }";

fn server() -> Option<PgServer> {
    if !pg::installed() {
        return None;
    }
    let server = PgServer::start();
    server.create_database("provisiond");
    Some(server)
}

/// The shared store on `server`. A lease of 5 s: a sidecar whose last heartbeat is
/// older than the lease counts as gone, and on a loaded machine 2 s was not enough for
/// a live one's heartbeats (every third of the lease) to always arrive in time.
fn store(server: &PgServer) -> String {
    format!(
        "[store]\nbackend = \"postgres\"\nurl = {}\nlease = \"5s\"\n",
        toml_str(server.url("provisiond"))
    )
}

/// A sidecar's config on `server`'s database with one after-stage handler, `crm`.
fn with_crm(server: &PgServer, url: &str, extra: &str) -> String {
    format!(
        "{SERVER}{}{}",
        store(server),
        after_handler("crm", url, extra)
    )
}

/// Waits until `n` sidecars have said they have `handler`, or 20 s: whether they have.
async fn announced(db: &PgServer, n: i64, handler: &str) -> bool {
    let client = db.connect("provisiond").await;
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < until {
        let row = client
            .query_one(
                "SELECT count(*) FROM provisiond.sidecars WHERE $1 = ANY(handlers)",
                &[&handler],
            )
            .await;
        if row.is_ok_and(|r| r.get::<_, i64>(0) >= n) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The object ids `handler` was called for, each once, in order.
fn delivered_objects(handler: &HandlerServer) -> Vec<i64> {
    let mut objects: Vec<i64> = handler
        .calls()
        .iter()
        .map(|c| c.json()["event"]["object_id"].as_i64().unwrap())
        .collect();
    objects.sort_unstable();
    objects.dedup();
    objects
}

/// Waits until `n` dead letters are stored, or 30 s (orphaned lanes are looked for every
/// 5 s, and a loaded CI machine stretches that); what `/v1/deadletters` says then.
async fn dead_letters(sidecar: &Sidecar, n: usize) -> Vec<serde_json::Value> {
    let until = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = sidecar.get("/v1/deadletters").await;
        let letters = body["deadletters"].as_array().cloned().unwrap_or_default();
        if letters.len() >= n || std::time::Instant::now() > until {
            return letters;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_one_sidecar_removes_is_delivered_by_another_that_still_has_it() {
    let Some(db) = server() else { return };
    let down = refused_url();
    let handler = HandlerServer::echo().await;
    let with = |url: &str| with_crm(&db, url, FAST);
    // A queues crm's deliveries while crm is down; B has crm too.
    let a = Sidecar::start(&with(&down));
    for i in 0..5 {
        let (code, _) = a.send("clients.update", i, json!({"seq": i})).await;
        assert_eq!(code, 200);
    }
    let b = Sidecar::start(&with(&handler.url("/")));
    // B has told the others it has crm (its first act once its store is open; on a
    // loaded machine, after it listens), before A's reload asks.
    assert!(announced(&db, 2, "crm").await, "B never said it has crm");
    // A's reload removes crm: while B lives and has crm, A must leave its lanes to B.
    write_atomic(&a.config_path, &format!("{SERVER}{}", store(&db)));
    a.wait_for_config(Duration::from_secs(10), |c| {
        c["handlers"].as_array().is_some_and(|h| h.is_empty())
    })
    .await;
    assert!(
        eventually(Duration::from_secs(20), || handler.calls().len() >= 5).await,
        "B delivered crm's deliveries: {} calls",
        handler.calls().len()
    );
    assert!(
        dead_letters(&a, 0).await.is_empty(),
        "nothing dead-lettered while B has crm"
    );
    assert_eq!(delivered_objects(&handler), [0, 1, 2, 3, 4]);

    // Once no live sidecar has crm, its queue goes to the dead letters, as on one node:
    // B queues one more (its handler now gone), stops, and A dead-letters it.
    drop(handler);
    let (code, _) = b.send("clients.update", 10, json!({"seq": 10})).await;
    assert_eq!(code, 200);
    let (_dir, _path, status) = b.terminate();
    assert!(status.success());
    let letters = dead_letters(&a, 1).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["handler"], "crm");
    assert_eq!(letters[0]["object_id"], "10");
    assert_eq!(letters[0]["reason"], "handler removed by a config reload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_disabled_on_one_sidecar_is_delivered_by_another_that_has_it_enabled() {
    let Some(db) = server() else { return };
    let down = refused_url();
    let handler = HandlerServer::echo().await;
    let with = |url: &str, extra: &str| with_crm(&db, url, &format!("{FAST}\n{extra}"));
    // A queues crm's deliveries while crm is down: it holds their lanes, retrying.
    let a = Sidecar::start(&with(&down, ""));
    for i in 0..5 {
        let (code, _) = a.send("clients.update", i, json!({"seq": i})).await;
        assert_eq!(code, 200);
    }
    // A's reload disables crm; B, with crm enabled, starts after.
    write_atomic(&a.config_path, &with(&down, "enabled = false"));
    a.wait_for_config(Duration::from_secs(10), |c| {
        c["handlers"][0]["enabled"] == false
    })
    .await;
    let _b = Sidecar::start(&with(&handler.url("/"), ""));
    assert!(
        eventually(Duration::from_secs(20), || handler.calls().len() >= 5).await,
        "B delivered {} of crm's 5 deliveries",
        handler.calls().len()
    );
    assert_eq!(delivered_objects(&handler), [0, 1, 2, 3, 4]);
    assert!(dead_letters(&a, 0).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dead_letters_list_takes_the_bulk_filters_and_pages() {
    let Some(db) = server() else { return };
    crate::deadletters::the_list_takes_the_bulk_filters(&store(&db)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_copy_moves_a_files_queue_and_dead_letters_into_postgres_once() {
    let Some(db) = server() else { return };
    // A single node on its redb file, its handler down: deliveries wait; one handler
    // answers 410, so its delivery is a dead letter.
    let down = refused_url();
    let gone = HandlerServer::fixed(410, "gone").await;
    let file_config = format!(
        "{SERVER}{}{}",
        after_handler("crm", &down, FAST),
        after_handler("erp", &gone.url("/"), FAST)
    );
    let node = Sidecar::start(&file_config);
    for i in 0..3 {
        let (code, _) = node.send("clients.update", i, json!({"seq": i})).await;
        assert_eq!(code, 200);
    }
    assert_eq!(
        dead_letters(&node, 3).await.len(),
        3,
        "erp's three are dead letters"
    );
    let (dir, _, status) = node.terminate();
    assert!(status.success());

    // Switched to postgres: copy what the file holds, then run on the database.
    let handler = HandlerServer::echo().await;
    let pg_config = format!(
        "{SERVER}{}{}{}",
        store(&db),
        after_handler("crm", &handler.url("/"), FAST),
        after_handler("erp", &gone.url("/"), FAST)
    );
    std::fs::write(dir.path().join("pg.toml"), &pg_config).unwrap();
    let copy = |dir: &std::path::Path, config: &str, from: &str| {
        run_binary(dir, &["store", "copy", "-c", config, "--from", from])
    };
    let (code, stdout, stderr) = copy(dir.path(), "pg.toml", "provisiond.db");
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("copied 3 queued deliveries, 3 dead letters and 6 dedupe keys"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("postgres@"),
        "no credentials shown: {stdout}"
    );
    // Twice copies nothing twice: the file no longer holds its queue or dead letters,
    // and its dedupe keys, copied again, change nothing.
    let (code, stdout, _) = copy(dir.path(), "pg.toml", "provisiond.db");
    assert_eq!(code, 0);
    assert!(
        stdout.contains("copied 0 queued deliveries, 0 dead letters and 6 dedupe keys"),
        "{stdout}"
    );

    let sidecar = Sidecar::start(&pg_config);
    assert!(
        eventually(Duration::from_secs(15), || handler.calls().len() >= 3).await,
        "the copied deliveries are delivered from the database"
    );
    let delivered = || -> Vec<i64> {
        handler
            .calls()
            .iter()
            .map(|c| c.json()["data"]["seq"].as_i64().unwrap())
            .collect()
    };
    let seqs = delivered();
    assert_eq!(seqs.len(), 3, "each once: {seqs:?}");
    let letters = dead_letters(&sidecar, 3).await;
    assert_eq!(letters.len(), 3, "{letters:?}");
    assert!(letters.iter().all(|l| l["handler"] == "erp"));

    // The billing's retry of an envelope the file's node accepted is deduped by the
    // database: a new event of the same lane, sent after it, is delivered, and the
    // retry is not.
    let (code, _) = sidecar.send("clients.update", 0, json!({"seq": 0})).await;
    assert_eq!(code, 200);
    let (code, _) = sidecar.send("clients.update", 0, json!({"seq": 100})).await;
    assert_eq!(code, 200);
    assert!(
        eventually(Duration::from_secs(15), || handler.calls().len() >= 4).await,
        "the new event is delivered"
    );
    let seqs = delivered();
    assert_eq!(seqs.len(), 4, "the retry is not delivered: {seqs:?}");
    assert_eq!(seqs[3], 100, "{seqs:?}");
    // erp answers 410: the new event is its fourth dead letter, and the retry, queued
    // before it on the same lane had it been stored, is not a fifth.
    let letters = dead_letters(&sidecar, 4).await;
    let seqs: Vec<i64> = letters
        .iter()
        .map(|l| l["envelope"]["data"]["seq"].as_i64().unwrap())
        .collect();
    assert!(seqs.contains(&100), "{seqs:?}");
    assert_eq!(
        seqs.len(),
        4,
        "the retry is not dead-lettered again: {seqs:?}"
    );

    // Refused plainly: a missing file, and a config whose store is the file itself.
    let (code, _, stderr) = copy(dir.path(), "pg.toml", "missing.db");
    assert_eq!(code, 1);
    assert!(
        stderr.contains("missing.db: no such store file"),
        "{stderr}"
    );
    std::fs::write(dir.path().join("file.toml"), &file_config).unwrap();
    let (code, _, stderr) = copy(dir.path(), "file.toml", "provisiond.db");
    assert_eq!(code, 1);
    assert!(
        stderr.contains("needs store.backend = \"postgres\""),
        "{stderr}"
    );
    // Refused before the store is opened: no store file is made for it.
    let empty = tempfile::TempDir::new().unwrap();
    std::fs::write(empty.path().join("file.toml"), &file_config).unwrap();
    let from = dir.path().join("provisiond.db");
    let (code, _, stderr) = copy(empty.path(), "file.toml", from.to_str().unwrap());
    assert_eq!(code, 1, "{stderr}");
    let files: Vec<_> = std::fs::read_dir(empty.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files, ["file.toml"], "{stderr}");

    // A database that refuses the user: its own words, not a timeout.
    let refused = pg_config.replace("postgres@", "nobody@");
    std::fs::write(dir.path().join("nobody.toml"), &refused).unwrap();
    let (code, _, stderr) = copy(dir.path(), "nobody.toml", "provisiond.db");
    assert_eq!(code, 1);
    assert!(
        stderr.contains("not usable within 10s: 28000: role \"nobody\" does not exist"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schema_newer_than_the_build_is_refused_in_one_sentence() {
    let Some(db) = server() else { return };
    let config = format!("{SERVER}{}", store(&db));
    // A first start creates the schema; a later release's would carry a higher number.
    let sidecar = Sidecar::start(&config);
    let (code, _) = sidecar.get("/readyz").await;
    assert_eq!(code, 200);
    drop(sidecar);
    db.psql(
        "provisiond",
        "UPDATE provisiond.meta SET value = 99 WHERE key = 'schema_version'",
    );
    let dir = tempfile::TempDir::new().unwrap();
    std::fs::write(dir.path().join("p.toml"), &config).unwrap();
    let (code, _, stderr) = run_binary(dir.path(), &["run", "-c", "p.toml"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("the schema provisiond is at version 99, newer than this provisiond knows"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schema_of_an_older_version_is_migrated_at_start_and_its_queue_delivered() {
    let Some(db) = server() else { return };
    // The schema as the first build with a shared store wrote it (version 1), with
    // deliveries queued by its own `enqueue`: two for one entity, one for another.
    let v1 = include_str!("../fixtures/pg_schema_v1.sql").replace("{s}", "provisiond");
    db.psql(
        "provisiond",
        &format!(
            "CREATE SCHEMA provisiond; CREATE TABLE provisiond.meta \
             (key text PRIMARY KEY, value bigint NOT NULL); \
             INSERT INTO provisiond.meta VALUES ('schema_version', 1); {v1}"
        ),
    );
    let bodies: Vec<String> = [(1, 1), (1, 2), (2, 1)]
        .iter()
        .map(|(entity, seq)| {
            let body = envelope("clients.update", *entity, json!({"seq": seq}));
            format!("$j${body}$j$")
        })
        .collect();
    db.psql(
        "provisiond",
        &format!(
            "SELECT * FROM provisiond.enqueue(ARRAY['crm','crm','crm'], \
             ARRAY['clients/1','clients/1','clients/2'], \
             ARRAY['clients.update','clients.update','clients.update'], ARRAY['1','1','2'], \
             ARRAY['msg_1','msg_2','msg_3'], ARRAY[{}], ARRAY[NULL,NULL,NULL]::bytea[], \
             ARRAY['evt_1','evt_2','evt_3'], ARRAY[0,0,0]::bigint[], \
             (extract(epoch from now()) * 1000)::bigint)",
            bodies.join(",")
        ),
    );
    let handler = HandlerServer::fixed(200, "").await;
    let sidecar = Sidecar::start(&with_crm(&db, &handler.url("/"), FAST));
    let migrated = sidecar.wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "database schema migrated"
    });
    let migrated = migrated.expect("the migration is logged");
    assert_eq!(
        (migrated["from"].as_i64(), migrated["to"].as_i64()),
        (Some(1), Some(2))
    );
    assert!(
        eventually(Duration::from_secs(20), || handler.calls().len() >= 3).await,
        "{} calls",
        handler.calls().len()
    );
    let delivered: Vec<(i64, i64)> = handler
        .calls()
        .iter()
        .map(|c| {
            let v = c.json();
            (
                v["event"]["object_id"].as_i64().unwrap(),
                v["data"]["seq"].as_i64().unwrap(),
            )
        })
        .collect();
    let first: Vec<_> = delivered.iter().filter(|(e, _)| *e == 1).collect();
    assert_eq!(first, [&(1, 1), &(1, 2)], "{delivered:?}");
    assert!(delivered.contains(&(2, 1)), "{delivered:?}");
    assert_eq!(
        db.psql(
            "provisiond",
            "SELECT value FROM provisiond.meta WHERE key = 'schema_version'"
        ),
        "2"
    );
    // The migrated schema is the one a fresh start creates: same columns, same indexes.
    let fresh = format!(
        "{SERVER}{}schema = \"fresh\"\n{}",
        store(&db),
        after_handler("crm", &handler.url("/"), FAST)
    );
    let other = Sidecar::start(&fresh);
    assert_eq!(other.get("/readyz").await.0, 200);
    let layout = |schema: &str| {
        db.psql(
            "provisiond",
            &format!(
                "SELECT table_name, column_name, data_type, is_nullable, column_default \
                 FROM information_schema.columns WHERE table_schema = '{schema}' \
                 ORDER BY table_name, ordinal_position; \
                 SELECT indexname, replace(indexdef, '{schema}.', '') FROM pg_indexes \
                 WHERE schemaname = '{schema}' ORDER BY indexname"
            ),
        )
        .replace(&format!("{schema}."), "")
    };
    let migrated = layout("provisiond");
    assert!(
        migrated.contains("lanes|waiting_since") && migrated.contains("lanes_waiting|"),
        "{migrated}"
    );
    assert_eq!(migrated, layout("fresh"));
    drop(other);
    // A sidecar started on the migrated schema finds nothing to do.
    drop(sidecar);
    let again = Sidecar::start(&with_crm(&db, &handler.url("/"), FAST));
    let (code, _) = again.get("/readyz").await;
    assert_eq!(code, 200);
    assert!(
        again
            .log_records()
            .iter()
            .all(|v| v["message"] != "database schema migrated"),
        "migrated twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sidecars_started_together_on_an_empty_database_create_the_schema_once() {
    let Some(db) = server() else { return };
    let handler = HandlerServer::fixed(200, "").await;
    let config = with_crm(&db, &handler.url("/"), FAST);
    // All at once, each process on a thread of its own.
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let config = config.clone();
            tokio::task::spawn_blocking(move || Sidecar::start(&config))
        })
        .collect();
    let mut sidecars = Vec::new();
    for start in starts {
        sidecars.push(start.await.unwrap());
    }
    for (i, sidecar) in sidecars.iter().enumerate() {
        let (code, ready) = sidecar.get("/readyz").await;
        assert_eq!(code, 200, "sidecar {i}: {ready}");
        let (code, _) = sidecar
            .send("clients.update", i64::try_from(i).unwrap(), json!({}))
            .await;
        assert_eq!(code, 200, "sidecar {i}");
    }
    assert!(eventually(Duration::from_secs(10), || handler.calls().len() >= 4).await);
    let created: usize = sidecars
        .iter()
        .map(|s| {
            s.logs()
                .iter()
                .filter(|l| l.contains("database schema created"))
                .count()
        })
        .sum();
    assert_eq!(created, 1, "the schema is created by exactly one sidecar");
    // The others waited for the lock and found it made: none failed on the way.
    for (i, sidecar) in sidecars.iter().enumerate() {
        let logs = sidecar.logs().join("\n");
        assert!(
            !logs.contains("cannot reach the database"),
            "sidecar {i}: {logs}"
        );
        assert!(!logs.contains("\"level\":\"ERROR\""), "sidecar {i}: {logs}");
    }
    assert_eq!(
        db.psql(
            "provisiond",
            "SELECT value FROM provisiond.meta WHERE key = 'schema_version'"
        ),
        "2"
    );
}

/// A schema named like an SQL keyword is a name like another (the store quotes it), and
/// a database that refuses the connection says why, in the database's own words.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_keyword_schema_works_and_a_refused_connection_says_why() {
    let Some(db) = server() else { return };
    let crm = HandlerServer::echo().await;
    let config = format!(
        "{SERVER}{}schema = \"select\"\n{}",
        store(&db),
        after_handler("crm", &crm.url("/"), FAST)
    );
    let sidecar = Sidecar::start(&config);
    let (code, body) = sidecar.send("clients.update", 1, json!({"n": 1})).await;
    assert_eq!(code, 200, "{body}");
    assert!(
        eventually(Duration::from_secs(10), || crm.calls().len() == 1).await,
        "delivered from the schema \"select\""
    );
    let tables = db.psql(
        "provisiond",
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'select'",
    );
    assert_ne!(tables.trim(), "0", "{tables}");

    // No such database: the server's reason, not only the pool's.
    let missing = format!(
        "{SERVER}[store]\nbackend = \"postgres\"\nurl = {}\n",
        toml_str(db.url("nope"))
    );
    let sidecar = Sidecar::start(&missing);
    let line = sidecar
        .wait_for_log(Duration::from_secs(10), |v| {
            v["message"] == "cannot use the database yet; not ready until it can"
        })
        .expect("the warning");
    let error = line["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("3D000") && error.contains("\"nope\" does not exist"),
        "{line}"
    );
    // ... and so do the requests that need the store meanwhile.
    let (status, body) = sidecar.get("/v1/executions").await;
    assert_eq!(status, 503, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("yet: 3D000") && message.contains("\"nope\" does not exist"),
        "{body}"
    );
}

/// While the database is down, the queue's depth keeps its last figure: a backlog must
/// not read as nothing waiting on a dashboard or to an alert. (The backlog here is a
/// killed sidecar's, not yet in the other's memory.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_queue_depth_keeps_its_last_figure_while_the_database_is_down() {
    let Some(mut db) = server() else { return };
    let crm = HandlerServer::fixed(503, "busy").await;
    let first = Sidecar::start(&with_crm(&db, &crm.url("/"), FAST));
    for id in 1..=3 {
        let (code, body) = first.send("clients.update", id, json!({})).await;
        assert_eq!(code, 200, "{body}");
    }
    drop(first.kill_9());
    let sidecar = Sidecar::start(&with_crm(&db, &crm.url("/"), FAST));
    let depth = "provisiond_after_queue_depth{handler=\"crm\"} 3";
    let mut seen = false;
    for _ in 0..100 {
        if sidecar.metrics_text().await.contains(depth) {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen, "{}", sidecar.metrics_text().await);
    let oldest = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("provisiond_after_queue_oldest_age_seconds "))
            .and_then(|v| v.parse::<f64>().ok())
    };
    tokio::task::block_in_place(|| db.stop());
    let metrics = sidecar.metrics_text().await;
    assert!(metrics.contains(depth), "{metrics}");
    // The oldest waiting delivery ages on while the database cannot be read.
    let down = oldest(&metrics).expect("an oldest age");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = sidecar.metrics_text().await;
    assert!(later.contains(depth), "{later}");
    let aged = oldest(&later).expect("an oldest age");
    assert!(aged >= down + 1.0, "{down} then {aged}");
    // A read that cannot be made says so, not that a write failed.
    let (status, body) = sidecar.get("/v1/deadletters").await;
    assert_eq!(status, 503, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("store read failed: "), "{body}");
    tokio::task::block_in_place(|| db.restart());
    // Back: said once in the log.
    let back = sidecar.wait_for_log(Duration::from_secs(30), |v| {
        v["message"] == "the database answers again"
    });
    assert!(back.is_some(), "no line says the database is back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_that_stops_answering_fails_reads_as_reads_keeps_metrics_scrapes_quick_and_is_used_again()
 {
    let Some(db) = server() else { return };
    let crm = HandlerServer::echo().await;
    let sidecar = Sidecar::start(&with_crm(&db, &crm.url("/"), FAST));
    let (status, body) = sidecar.get("/v1/deadletters").await;
    assert_eq!(status, 200, "{body}");
    let (_, _) = sidecar.send("clients.update", 1, json!({})).await;
    let depth = "provisiond_after_queue_depth{handler=\"crm\"}";
    assert!(sidecar.metrics_text().await.contains(depth));
    tokio::task::block_in_place(|| db.freeze());
    // A billing that hangs up while its event's deliveries wait for the database: the
    // event still has its line and its count, as abandoned.
    {
        use tokio::io::AsyncWriteExt as _;
        let body = envelope("clients.update", 9, json!({})).to_string();
        let mut stream = tokio::net::TcpStream::connect(&sidecar.addr).await.unwrap();
        let request = format!(
            "POST /events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        stream.set_zero_linger().unwrap();
        drop(stream);
    }
    let abandoned = sidecar.wait_for_log(Duration::from_secs(10), |v| {
        v["message"] == "event" && v["object_id"] == "9"
    });
    let abandoned = abandoned.expect("the hung-up event has its line");
    assert_eq!(abandoned["outcome"], "abandoned", "{abandoned}");
    assert!(
        sidecar
            .metrics_text()
            .await
            .contains("provisiond_events_total{event=\"clients.update\",outcome=\"abandoned\"} 1"),
        "the hung-up event is counted"
    );
    // Connections stay open and nothing answers: each operation gives up after 5 s.
    let (status, body) = sidecar.get("/v1/deadletters").await;
    // A scrape does not wait for them (Prometheus gives up on a scrape after its
    // scrape_timeout, and the sidecar would read as down): it shows the figures last
    // read, and answers well before one operation's 5 s.
    let scraper = reqwest::Client::builder()
        .timeout(Duration::from_secs(4))
        .build()
        .unwrap();
    let scrape = scraper.get(sidecar.url("/metrics")).send().await;
    let metrics = match scrape {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(e) => panic!("a scrape while the database hangs: {e}"),
    };
    assert!(metrics.contains(depth), "{metrics}");
    let (accepted, _) = sidecar.send("clients.update", 2, json!({})).await;
    // The store now knows the database does not answer, and says so.
    let writable = sidecar.metrics_text().await;
    tokio::task::block_in_place(|| db.thaw());
    assert!(
        writable.contains("provisiond_store_writable 0"),
        "{writable}"
    );
    assert_eq!(status, 503, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    // "did not answer within 5s", or the pool's "cannot connect" when the read needed a
    // new connection: a read either way, naming the database.
    assert!(
        message.starts_with("store read failed: ") && message.contains("postgres://127.0.0.1:"),
        "{body}"
    );
    assert_eq!(accepted, 503, "an accept that cannot be stored is refused");
    let back = sidecar.wait_for_log(Duration::from_secs(30), |v| {
        v["message"] == "the database answers again"
    });
    assert!(back.is_some(), "no line says the database is back");
    let (status, body) = sidecar.send("clients.update", 3, json!({})).await;
    assert_eq!(status, 200, "{body}");
    let delivered = eventually(Duration::from_secs(20), || crm.calls().len() >= 2).await;
    assert!(delivered, "delivered once the database answers");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_database_password_never_shows_in_logs_config_or_readyz() {
    let Some(db) = server() else { return };
    db.psql("provisiond", "ALTER USER postgres PASSWORD 's3cret-pw'");
    let url = format!(
        "postgres://postgres:s3cret-pw@127.0.0.1:{}/provisiond",
        db.port
    );
    let config = format!(
        "{SERVER}[store]\nbackend = \"postgres\"\nurl = \"${{PG_URL}}\"\n{}",
        after_handler("crm", &refused_url(), FAST)
    );
    let dir = tempfile::TempDir::new().unwrap();
    let sidecar = Sidecar::start_in(dir, &config, &[("PG_URL", &url)]);
    let (code, ready) = sidecar.get("/readyz").await;
    assert_eq!(code, 200, "{ready}");
    let (code, _) = sidecar.send("clients.update", 1, json!({})).await;
    assert_eq!(code, 200);
    let (_, live) = sidecar.get("/v1/config").await;
    let metrics = sidecar.metrics_text().await;
    let logs = sidecar.logs().join("\n");
    for (what, text) in [
        ("/readyz", ready.to_string()),
        ("/v1/config", live.to_string()),
        ("/metrics", metrics),
        ("the log", logs),
    ] {
        assert!(
            !text.contains("s3cret-pw"),
            "{what} shows the password: {text}"
        );
    }
    assert!(
        ready["store"].as_str().unwrap().contains("127.0.0.1"),
        "{ready}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shared_examples_run_on_a_real_database() {
    let Some(db) = server() else { return };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for example in [
        "examples/configs/shared.toml",
        "examples/kubernetes/shared/provisioning.toml",
    ] {
        let text = std::fs::read_to_string(root.join(example)).unwrap();
        assert!(text.contains("backend = \"postgres\""), "{example}");
        assert!(text.contains("url = \"${PROVISIOND_PG_URL}\""), "{example}");
        // On a port of its own, so that tests running together do not collide.
        let config = text.replace("listen = \"127.0.0.1:8600\"", "listen = \"127.0.0.1:0\"");
        let url = db.url("provisiond");
        let sidecar = Sidecar::start_in(
            tempfile::TempDir::new().unwrap(),
            &config,
            &[("PROVISIOND_PG_URL", &url)],
        );
        let (code, ready) = sidecar.get("/readyz").await;
        assert_eq!(code, 200, "{example}: {ready}");
        assert!(
            ready["store"]
                .as_str()
                .unwrap()
                .starts_with("postgres://127.0.0.1:"),
            "{example}: {ready}"
        );
        let (code, _) = sidecar.send("clients.balance_zero", 1, json!({})).await;
        assert_eq!(
            code, 200,
            "{example}: the fan-out is stored in the database"
        );
    }

    // The Deployment: several replicas, no volume for the store, the URL from a Secret,
    // probes that are `provisiond health` against the listener.
    let deployment =
        std::fs::read_to_string(root.join("examples/kubernetes/shared/deployment.yaml")).unwrap();
    let replicas: u32 = deployment
        .lines()
        .find_map(|l| l.trim().strip_prefix("replicas: "))
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(replicas >= 2, "{replicas}");
    assert!(
        !deployment.contains("persistentVolumeClaim"),
        "{deployment}"
    );
    assert!(
        deployment.contains(
            "- name: PROVISIOND_PG_URL\n              valueFrom:\n                secretKeyRef:"
        ),
        "{deployment}"
    );
    for probe in ["startupProbe:", "livenessProbe:", "readinessProbe:"] {
        assert!(deployment.contains(probe), "no {probe}");
    }
    assert_eq!(
        deployment
            .matches("command: [\"provisiond\", \"health\"")
            .count(),
        3
    );
    let kustomization =
        std::fs::read_to_string(root.join("examples/kubernetes/shared/kustomization.yaml"))
            .unwrap();
    assert!(
        kustomization.contains("- provisioning.toml"),
        "{kustomization}"
    );
    // A generated ConfigMap keeps its name: a changed config is hot-reloaded, not rolled
    // out as new billing pods (README, "On Kubernetes").
    assert!(
        kustomization.contains("disableNameSuffixHash: true"),
        "{kustomization}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_prunes_the_shared_execution_log_and_dedupe_keys() {
    let Some(db) = server() else { return };
    let handler = HandlerServer::echo().await;
    let config = format!(
        "{SERVER}{}dedupe_window = \"1s\"\nkeep_executions = {{ age = \"7d\", rows = 5 }}\n{}",
        store(&db),
        after_handler("crm", &handler.url("/"), FAST)
    );
    let sidecar = Sidecar::start(&config);
    for i in 0..20 {
        let (code, _) = sidecar.send("clients.update", i, json!({"seq": i})).await;
        assert_eq!(code, 200);
    }
    assert!(eventually(Duration::from_secs(15), || handler.calls().len() >= 20).await);
    let count = |sql: &str| db.psql("provisiond", sql).trim().to_owned();
    // Pruning runs every 5 s: the newest 5 rows stay, and the keys older than the window go.
    let until = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let rows = count("SELECT count(*) FROM provisiond.executions");
        let keys = count("SELECT count(*) FROM provisiond.dedupe");
        if rows == "5" && keys == "0" {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "not pruned: {rows} execution rows, {keys} dedupe keys"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, body) = sidecar.get("/v1/executions?limit=100").await;
    assert_eq!(body["count"], 5, "{body}");
}

/// A bulk replay locks each dead letter's lane; it takes them in lane order, as an
/// accept's group does, so that the two never wait on each other in a ring. Here a
/// transaction that locks lanes as an accept's group does (`clients/1`, then
/// `clients/2`) holds the first while the replay runs, and the dead letters' id order
/// is the other way round.
#[tokio::test(flavor = "multi_thread")]
async fn a_bulk_replay_takes_the_lanes_in_the_order_accepts_do() {
    let Some(db) = server() else { return };
    let handler = HandlerServer::fixed(410, "gone").await;
    let config = with_crm(&db, &handler.url("/"), "");
    let sidecar = Arc::new(Sidecar::start(&config));
    for object in [2, 1] {
        let (code, _) = sidecar.send("clients.update", object, json!({})).await;
        assert_eq!(code, 200);
    }
    assert_eq!(dead_letters(&sidecar, 2).await.len(), 2);
    let entities = db.psql(
        "provisiond",
        "SELECT entity FROM provisiond.dead_letters ORDER BY id",
    );
    assert_eq!(entities.trim(), "clients/2\nclients/1");

    let lock = |entity: &str| {
        format!(
            "INSERT INTO provisiond.lanes AS l (handler, entity, pending) \
             VALUES ('crm', '{entity}', 0) \
             ON CONFLICT (handler, entity) DO UPDATE SET pending = l.pending"
        )
    };
    let accept = db.connect("provisiond").await;
    // This session finds a ring at once, so a ring fails it rather than the replay.
    accept
        .batch_execute("SET deadlock_timeout = '100ms'; BEGIN")
        .await
        .unwrap();
    accept.batch_execute(&lock("clients/1")).await.unwrap();
    let replay = {
        let sidecar = sidecar.clone();
        tokio::spawn(async move {
            sidecar
                .post_to("/v1/deadletters/replay", r#"{"handler": "crm"}"#)
                .await
        })
    };
    // The replay is waiting for a lane this transaction holds.
    let waiting = eventually(Duration::from_secs(20), || {
        db.psql(
            "provisiond",
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
        )
        .trim()
            == "1"
    })
    .await;
    assert!(waiting, "the replay never waited for clients/1");
    // The next lane is free: the replay has not taken it out of order.
    let second = accept.batch_execute(&lock("clients/2")).await;
    let _ = accept.batch_execute("COMMIT").await;
    if let Err(e) = &second {
        panic!("clients/2 was held by the replay: {}", pg::describe(e));
    }
    let (status, body) = replay.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"replayed": 2, "skipped": 0}));
}

/// A stop on PostgreSQL ends the store's tasks at once (the execution log's writer
/// waited out its 5 s for a channel that never closed), and the execution log keeps
/// the delivery's row.
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_ends_the_stores_tasks_and_keeps_the_execution_log() {
    let Some(db) = server() else { return };
    let handler = HandlerServer::echo().await;
    let config = with_crm(&db, &handler.url("/"), FAST);
    let mut node = Sidecar::start(&config);
    let (code, _) = node.send("clients.update", 7, json!({})).await;
    assert_eq!(code, 200);
    assert!(eventually(Duration::from_secs(20), || handler.calls().len() == 1).await);

    node.signal(nix::sys::signal::Signal::SIGTERM);
    let status = node.wait_exit(Duration::from_secs(30)).expect("it stops");
    assert!(status.success(), "{status}");
    assert!(
        eventually(Duration::from_secs(5), || node
            .logs()
            .iter()
            .any(|l| l.contains("\"stopped\"")))
        .await,
        "{:?}",
        node.logs()
    );
    let logs = node.logs();
    assert!(
        !logs.iter().any(|l| l.contains("did not end")),
        "the store's tasks were waited out: {logs:?}"
    );
    assert!(
        !logs.iter().any(|l| l.contains("answers again")),
        "the database never went away: {logs:?}"
    );

    // The delivery's row, there for the next sidecar to show.
    let next = Sidecar::start(&config);
    let rows = next
        .get_until("/v1/executions?object_id=7", Duration::from_secs(10), |v| {
            v["count"] == 1
        })
        .await;
    assert_eq!(rows["executions"][0]["outcome"], "delivered", "{rows}");
}

/// Two reloads at the same moment: the only sidecar that has a handler removes it as
/// another adds it. The queued deliveries go to the second, none is dead-lettered: a
/// handler that no live sidecar has is waited out for a lease before its deliveries
/// die, and the second says it has the handler within that.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_moved_by_two_reloads_at_once_is_delivered_not_dead_lettered() {
    let Some(db) = server() else { return };
    let down = refused_url();
    let handler = HandlerServer::echo().await;
    let without = format!("{SERVER}{}", store(&db));
    let a = Sidecar::start(&without);
    let b = Sidecar::start(&with_crm(&db, &down, FAST));
    for i in 0..4 {
        let (code, _) = b.send("clients.update", i, json!({"seq": i})).await;
        assert_eq!(code, 200);
    }
    // Each lane has failed once at least, and keeps trying every 10 to 200 ms.
    let rows = b
        .get_until(
            "/v1/executions?outcome=failed&limit=1000",
            Duration::from_secs(20),
            |v| {
                let objects: std::collections::BTreeSet<&str> = v["executions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|r| r["object_id"].as_str())
                    .collect();
                objects.len() == 4
            },
        )
        .await;
    assert!(rows["count"].as_u64().unwrap() >= 4, "{rows}");

    // B gives crm up first, then A takes it: B sees no sidecar with crm for a moment.
    write_atomic(&b.config_path, &without);
    write_atomic(&a.config_path, &with_crm(&db, &handler.url("/"), FAST));
    let delivered = || delivered_objects(&handler);
    assert!(
        eventually(Duration::from_secs(30), || delivered() == [0, 1, 2, 3]).await,
        "delivered {:?}; dead letters {:?}",
        delivered(),
        dead_letters(&a, 0).await
    );
    assert_eq!(dead_letters(&a, 0).await, Vec::<serde_json::Value>::new());
}

/// The only sidecar with a handler is killed: once its lease has run out, another
/// dead-letters the handler's deliveries, with a reason that says no live sidecar has
/// it (not that a reload removed it: none did here).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_deliveries_of_a_handler_only_a_dead_sidecar_had_are_dead_lettered_as_orphaned() {
    let Some(db) = server() else { return };
    let a = Sidecar::start(&format!("{SERVER}{}", store(&db)));
    let b = Sidecar::start(&with_crm(&db, &refused_url(), FAST));
    for i in 0..3 {
        let (code, _) = b.send("clients.update", i, json!({"seq": i})).await;
        assert_eq!(code, 200);
    }
    let _ = b.kill_9();
    let letters = dead_letters(&a, 3).await;
    assert_eq!(letters.len(), 3, "{letters:?}");
    for letter in &letters {
        assert_eq!(
            letter["reason"],
            "no live sidecar has the handler: a config reload removed it, or the sidecars \
             that had it stopped",
            "{letter}"
        );
    }
}

/// A user without `CREATE` on the database runs on a schema made for it beforehand, as
/// the README says: the schema is not created again (`CREATE SCHEMA IF NOT EXISTS`
/// asks for the database's `CREATE` even when the schema exists).
#[tokio::test(flavor = "multi_thread")]
async fn a_user_without_create_on_the_database_runs_on_a_schema_made_for_it() {
    let Some(db) = server() else { return };
    db.psql(
        "provisiond",
        "CREATE ROLE limited LOGIN; CREATE SCHEMA pre AUTHORIZATION limited;",
    );
    let url = db.url("provisiond").replace("postgres@", "limited@");
    let handler = HandlerServer::echo().await;
    let node = Sidecar::start(&format!(
        "{SERVER}[store]\nbackend = \"postgres\"\nurl = {}\nschema = \"pre\"\n{}",
        toml_str(&url),
        after_handler("crm", &handler.url("/"), FAST)
    ));
    let ready = node
        .get_until("/readyz", Duration::from_secs(20), |v| {
            v["status"] == "ready"
        })
        .await;
    assert_eq!(
        ready["status"],
        "ready",
        "{ready}\n{}",
        node.logs().join("\n")
    );
    let (code, _) = node.send("clients.update", 1, json!({})).await;
    assert_eq!(code, 200);
    assert!(eventually(Duration::from_secs(20), || handler.calls().len() == 1).await);
    assert_eq!(
        db.psql(
            "provisiond",
            "SELECT value FROM pre.meta WHERE key = 'schema_version'"
        ),
        "2"
    );
}

/// The `store` label of this sidecar's `provisiond_store_info` at 1, once the store is
/// reached (or 20 s), with its `backend`.
async fn store_info(sidecar: &Sidecar) -> Option<(String, String)> {
    let re =
        regex::Regex::new(r#"(?m)^provisiond_store_info\{backend="([a-z]+)",store="([^"]+)"\} 1$"#)
            .unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = sidecar.metrics_text().await;
        if let Some(c) = re.captures(&text) {
            return Some((c[1].to_owned(), c[2].to_owned()));
        }
        if std::time::Instant::now() > until {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sidecars_sharing_a_database_name_one_store_in_their_metrics() {
    // A dashboard counts a shared queue once by this label: the same for two sidecars
    // on one schema and after a restart, another for another schema, and a store file's
    // its host and path.
    let Some(db) = server() else { return };
    let a = Sidecar::start(&format!("{SERVER}{}", store(&db)));
    let b = Sidecar::start(&format!("{SERVER}{}", store(&db)));
    let (backend, shared) = store_info(&a).await.expect("a names its store");
    assert_eq!(backend, "postgres");
    assert_eq!(store_info(&b).await.unwrap().1, shared);
    let id: i64 = db
        .connect("provisiond")
        .await
        .query_one(
            "SELECT value FROM provisiond.meta WHERE key = 'store_id'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(shared, format!("provisiond@{id:016x}"));
    let (dir, path, status) = b.terminate();
    assert!(status.success());
    let b = Sidecar::spawn(dir, path, &[]);
    assert_eq!(store_info(&b).await.unwrap().1, shared, "after a restart");

    let other = Sidecar::start(&format!("{SERVER}{}schema = \"other\"\n", store(&db)));
    let (_, elsewhere) = store_info(&other).await.unwrap();
    assert!(elsewhere.starts_with("other@"), "{elsewhere}");
    assert_ne!(elsewhere, shared.replacen("provisiond@", "other@", 1));

    let file = Sidecar::start(SERVER);
    let (backend, named) = store_info(&file).await.unwrap();
    assert_eq!(backend, "file");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let expected = std::fs::canonicalize(file.dir.path()).unwrap();
    assert!(
        named.starts_with(&format!("{}:{}/", host.trim(), expected.display())),
        "{named}"
    );
}
