//! TLS to PostgreSQL, as libpq reads `sslmode` and `sslrootcert`: a real server with
//! `ssl = on` and the test fixtures' certificate (self-signed, for `127.0.0.1`), and
//! what `pg_stat_ssl` says of provisiond's connections.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::pg::{self, PgServer};
use crate::common::*;

fn tls_server() -> Option<PgServer> {
    if !pg::installed() {
        return None;
    }
    let server = PgServer::start_with_tls();
    server.create_database("provisiond");
    Some(server)
}

/// A sidecar on `url` with one after-stage handler.
fn config(url: &str, crm: &str) -> String {
    format!(
        "{SERVER}[store]\nbackend = \"postgres\"\nurl = {}\nlease = \"5s\"\n{}",
        toml_str(url),
        after_handler("crm", crm, "")
    )
}

/// provisiond's connections to `db`: how many with TLS, how many without.
fn connections(db: &PgServer) -> (u32, u32) {
    let row = db.psql(
        "provisiond",
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
         FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = 'provisiond'",
    );
    let (with, without) = row.split_once('|').expect("two columns");
    (with.parse().unwrap(), without.parse().unwrap())
}

/// An event through the after stage: the store works.
async fn delivered_through(sidecar: &Sidecar, crm: &HandlerServer) {
    let (status, body) = sidecar.send("clients.update", 1, json!({"n": 1})).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        eventually(Duration::from_secs(10), || crm.calls().len() == 1).await,
        "delivered"
    );
}

/// The error of the line saying the database cannot be used yet.
fn refusal(sidecar: &Sidecar) -> String {
    let line: Value = sidecar
        .wait_for_log(Duration::from_secs(15), |v| {
            v["message"] == "cannot use the database yet; not ready until it can"
        })
        .expect("the sidecar says why it cannot use the database");
    line["error"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_full_checks_the_certificate_against_sslrootcert_and_every_connection_is_encrypted()
{
    let Some(db) = tls_server() else { return };
    let crm = HandlerServer::echo().await;
    let root = tls_fixture("localhost-cert.pem");
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/provisiond?sslmode=verify-full&sslrootcert={}",
        db.port,
        root.display()
    );
    let sidecar = Sidecar::start(&config(&url, &crm.url("/")));
    delivered_through(&sidecar, &crm).await;
    // What an operator sees of it, without looking in the database.
    let (status, ready) = sidecar.get("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(
        ready["store"],
        format!(
            "postgres://127.0.0.1:{}/provisiond (schema provisiond, sslmode verify-full)",
            db.port
        ),
        "{ready}"
    );
    let (with, without) = connections(&db);
    assert!(with > 0, "no connection with TLS");
    assert_eq!(without, 0, "a connection without TLS");

    // The check reads the same file: a bad one is an error at `check`, not a sidecar
    // that never gets ready.
    let dir = tempfile::TempDir::new().unwrap();
    let file = dir.path().join("provisioning.toml");
    let missing = dir.path().join("ca.pem");
    std::fs::write(
        &file,
        config(
            &url.replace(&root.display().to_string(), &missing.display().to_string()),
            &crm.url("/"),
        ),
    )
    .unwrap();
    let out = std::process::Command::new(binary())
        .args(["check", "-c"])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "store.url: sslrootcert: cannot read {}",
            missing.display()
        )),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_certificate_from_another_ca_or_for_another_name_is_refused_saying_so_and_verify_ca_takes_any_name()
 {
    let Some(db) = tls_server() else { return };
    let crm = HandlerServer::echo().await;
    let url = |host: &str, mode: &str, root: &str| {
        format!(
            "postgres://postgres@{host}:{}/provisiond?sslmode={mode}&sslrootcert={}",
            db.port,
            tls_fixture(root).display()
        )
    };

    let untrusted = Sidecar::start(&config(
        &url("127.0.0.1", "verify-full", "other-ca.pem"),
        &crm.url("/"),
    ));
    let error = refusal(&untrusted);
    assert!(error.contains("UnknownIssuer"), "{error}");
    let (status, _) = untrusted.get("/readyz").await;
    assert_eq!(status, 503);

    // The certificate is for 127.0.0.1, not for `localhost`.
    let misnamed = Sidecar::start(&config(
        &url("localhost", "verify-full", "localhost-cert.pem"),
        &crm.url("/"),
    ));
    let error = refusal(&misnamed);
    assert!(
        error.contains("certificate not valid for name \"localhost\""),
        "{error}"
    );

    // verify-ca: the CA is checked, the name is not.
    drop((untrusted, misnamed));
    let by_ca = Sidecar::start(&config(
        &url("localhost", "verify-ca", "localhost-cert.pem"),
        &crm.url("/"),
    ));
    delivered_through(&by_ca, &crm).await;
    assert_eq!(connections(&db).1, 0, "a connection without TLS");
}

/// libpq's default, `prefer`: TLS when the server has it (the certificate unchecked),
/// none when it has not; `require` refuses a server without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefer_takes_tls_when_the_server_offers_it_and_require_refuses_a_server_without() {
    let Some(db) = tls_server() else { return };
    let crm = HandlerServer::echo().await;
    let sidecar = Sidecar::start(&config(&db.url("provisiond"), &crm.url("/")));
    delivered_through(&sidecar, &crm).await;
    let (with, without) = connections(&db);
    assert!(
        with > 0 && without == 0,
        "{with} with TLS, {without} without"
    );

    let plain = PgServer::start();
    plain.create_database("provisiond");
    let url = format!("{}?sslmode=require", plain.url("provisiond"));
    let refused = Sidecar::start(&config(&url, &crm.url("/")));
    let error = refusal(&refused);
    assert!(error.contains("server does not support TLS"), "{error}");
}

/// A database that admits only clients with a certificate (`hostssl ... cert`: signed
/// by the CA the server trusts, its CN the user's name): `sslcert` and `sslkey` get a
/// sidecar in; without them the server's refusal is what the log says.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_certificate_is_shown_to_a_server_that_asks_for_one() {
    let Some(db) = tls_server() else { return };
    db.create_database("certified");
    db.hba_first("hostssl certified all 127.0.0.1/32 cert");
    let crm = HandlerServer::echo().await;
    let url = |extra: &str| {
        format!(
            "postgres://postgres@127.0.0.1:{}/certified?sslmode=verify-full&sslrootcert={}{extra}",
            db.port,
            tls_fixture("localhost-cert.pem").display()
        )
    };

    let without = Sidecar::start(&config(&url(""), &crm.url("/")));
    let error = refusal(&without);
    assert!(error.contains("28000"), "{error}");
    drop(without);

    // A v3 certificate, and a v1 one (what `openssl x509 -req` makes by default),
    // which the server takes as libpq's clients can show it.
    for (n, cert) in (1..).zip(["pg-client-cert.pem", "pg-client-v1-cert.pem"]) {
        let with = format!(
            "&sslcert={}&sslkey={}",
            tls_fixture(cert).display(),
            tls_fixture("pg-client-key.pem").display()
        );
        let sidecar = Sidecar::start(&config(&url(&with), &crm.url("/")));
        let (status, body) = sidecar.send("clients.update", n, json!({"n": n})).await;
        assert_eq!(status, 200, "{cert}: {body}");
        assert!(
            eventually(Duration::from_secs(10), || i64::try_from(crm.calls().len())
                == Ok(n))
            .await,
            "{cert}: delivered"
        );
        let row = db.psql(
            "postgres",
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'provisiond' AND a.datname = 'certified' \
             AND s.client_dn = '/CN=postgres'",
        );
        assert_ne!(
            row, "0",
            "{cert}: no connection showed the client certificate"
        );
    }
}

/// A unix socket has no TLS, whatever the `sslmode` short of `require`: the connector
/// asked for with no host name must not fail the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_unix_socket_connects_without_tls_by_default_and_with_disable() {
    let Some(db) = tls_server() else { return };
    let crm = HandlerServer::echo().await;
    for (n, url) in (1_i64..).zip([
        db.socket_url("provisiond"),
        format!("{}&sslmode=disable", db.socket_url("provisiond")),
    ]) {
        let sidecar = Sidecar::start(&config(&url, &crm.url("/")));
        let (status, body) = sidecar.send("clients.update", n, json!({"n": n})).await;
        assert_eq!(status, 200, "{url}: {body}");
        assert!(
            eventually(Duration::from_secs(10), || i64::try_from(crm.calls().len())
                == Ok(n))
            .await,
            "{url}: delivered"
        );
    }
}

/// A self-signed server certificate made as PostgreSQL's documentation makes it
/// (`openssl req -x509 -subj /CN=host`: a CA certificate, no subjectAltName) and given
/// as `sslrootcert` passes `verify-full` as it does with libpq, for its host only.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_self_signed_certificate_in_sslrootcert_is_trusted_for_the_host_its_common_name_names() {
    if !pg::installed() {
        return;
    }
    let db =
        PgServer::start_with_tls_serving("pg-selfsigned-cn-cert.pem", "pg-selfsigned-cn-key.pem");
    db.create_database("provisiond");
    let crm = HandlerServer::echo().await;
    let url = |host: &str| {
        format!(
            "postgres://postgres@{host}:{}/provisiond?sslmode=verify-full&sslrootcert={}",
            db.port,
            tls_fixture("pg-selfsigned-cn-cert.pem").display()
        )
    };
    // Its common name is 127.0.0.1, not localhost.
    let misnamed = Sidecar::start(&config(&url("localhost"), &crm.url("/")));
    let error = refusal(&misnamed);
    assert!(
        error.contains(
            "certificate not valid for name \"localhost\"; certificate is only valid for \
             CN=127.0.0.1"
        ),
        "{error}"
    );
    drop(misnamed);

    let sidecar = Sidecar::start(&config(&url("127.0.0.1"), &crm.url("/")));
    delivered_through(&sidecar, &crm).await;
    assert_eq!(connections(&db).1, 0, "a connection without TLS");
}
