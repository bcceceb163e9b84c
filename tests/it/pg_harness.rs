//! The PostgreSQL test harness itself (tests/common/pg.rs): a throwaway server starts and
//! answers, survives a kill -9 and a restart on its port, and a primary with a
//! synchronous standby fails over to it through a multi-host URL.

use std::time::{Duration, Instant};

use crate::common::pg::{self, PgServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_starts_and_a_database_answers_a_query() {
    if !pg::installed() {
        return;
    }
    let started = Instant::now();
    let server = tokio::task::spawn_blocking(PgServer::start).await.unwrap();
    eprintln!("a server started in {:?}", started.elapsed());
    let url = server.create_database("harness");
    assert_eq!(
        url,
        format!("postgres://postgres@127.0.0.1:{}/harness", server.port)
    );

    let client = pg::connect(&url).await;
    client
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'one')",
        )
        .await
        .unwrap();
    let row = client
        .query_one("SELECT v FROM t WHERE id = 1", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "one");
    assert_eq!(
        server.psql("harness", "SHOW fsync"),
        "on",
        "durability is what we test"
    );
    assert_eq!(server.psql("harness", "SHOW server_encoding"), "UTF8");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_restarts_on_its_port_with_its_committed_data() {
    if !pg::installed() {
        return;
    }
    let mut server = tokio::task::spawn_blocking(PgServer::start).await.unwrap();
    let url = server.create_database("harness");
    let client = pg::connect(&url).await;
    client
        .batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();

    server.kill_9();
    assert!(!server.port_open(), "nothing listens once it is killed");
    assert!(client.query_one("SELECT 1", &[]).await.is_err());
    assert!(pg::try_connect(&url).await.is_err());

    server.stop(); // a no-op on a server that is not running
    server.restart();
    let client = pg::connect(&url).await;
    let row = client
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1, "a committed row survives kill -9");

    // A clean stop and start on the same port too.
    server.stop();
    assert!(pg::try_connect(&url).await.is_err());
    server.restart();
    pg::connect(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sync_standby_takes_over_through_the_multi_host_url() {
    if !pg::installed() {
        return;
    }
    let started = Instant::now();
    let (mut primary, standby) =
        tokio::task::spawn_blocking(PgServer::start_primary_with_sync_standby)
            .await
            .unwrap();
    eprintln!(
        "a primary and a sync standby started in {:?}",
        started.elapsed()
    );
    primary.create_database("billing");
    let url = pg::multi_host_url(&[&primary, &standby], "billing");
    assert_eq!(
        url,
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/billing\
             ?target_session_attrs=read-write&connect_timeout=5",
            primary.port, standby.port
        )
    );

    // Through the multi-host URL: the primary (the standby is read-only).
    let client = pg::connect(&url).await;
    client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    // Synchronous: acknowledged means flushed on the standby too; visible to a read
    // there (the database itself, even) a moment later, once replayed.
    let until = Instant::now() + Duration::from_secs(10);
    let on_standby = loop {
        if let Ok(client) = pg::try_connect(&standby.url("billing")).await {
            let rows = client.query("SELECT id FROM t WHERE id = 1", &[]).await;
            if rows.is_ok_and(|r| r.len() == 1) {
                break client;
            }
        }
        assert!(Instant::now() < until, "the row never reached the standby");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        on_standby
            .batch_execute("INSERT INTO t VALUES (99)")
            .await
            .is_err(),
        "the standby is read-only"
    );

    primary.kill_9();
    assert!(
        pg::try_connect(&url).await.is_err(),
        "no read-write server until promotion"
    );
    standby.promote();

    let client = pg::connect(&url).await;
    client
        .batch_execute("INSERT INTO t VALUES (2)")
        .await
        .unwrap();
    let rows = client
        .query("SELECT id FROM t ORDER BY id", &[])
        .await
        .unwrap();
    let ids: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        ids,
        [1, 2],
        "the acknowledged row survived, and the new primary takes writes"
    );
}
