//! `https://` handlers: a real TLS server with the self-signed certificate of
//! `tests/fixtures/`, and the CA roots provisiond reads (`SSL_CERT_FILE`, `SSL_CERT_DIR`)
//! at the first handshake, not at start.

use serde_json::json;
use tempfile::TempDir;

use crate::common::*;

fn before_handler(name: &str, url: &str) -> String {
    format!(
        "[[handler]]\nname = \"{name}\"\nevents = [\"*\"]\nstage = \"before\"\nurl = {}\n\
         modifies = true\non_error = \"deny\"\ntimeout = \"5s\"\n",
        toml_str(url)
    )
}

/// Lines in which the platform verifier reports a root it could not read.
/// A TLS echo handler that closes each connection after its reply.
async fn tls_echo() -> HandlerServer {
    HandlerServer::start_tls(|call| async move {
        let mut reply = reply(200, call.body);
        reply.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
        reply
    })
    .await
}

fn root_warnings(sidecar: &Sidecar) -> usize {
    sidecar
        .logs()
        .iter()
        .filter(|line| line.contains("Error loading CA root certificate"))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_https_handler_is_verified_against_roots_read_once_at_the_first_handshake() {
    let server = tls_echo().await;
    let cert = tls_fixture("localhost-cert.pem");
    let dir = TempDir::new().unwrap();
    // The bundle trusts the test certificate; the directory does not exist, which the
    // verifier reports (once) when it reads the roots: that line shows when they are read.
    let missing = dir.path().join("no-such-dir");
    let config = format!("{SERVER}{}", before_handler("tls", &server.url("/")));
    let sidecar = Sidecar::start_in(
        dir,
        &config,
        &[
            ("SSL_CERT_FILE", cert.to_str().unwrap()),
            ("SSL_CERT_DIR", missing.to_str().unwrap()),
        ],
    );
    assert_eq!(root_warnings(&sidecar), 0, "roots read at start");

    let (status, body) = sidecar.send("clients.update", 1, json!({"a": 1})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"], json!({"a": 1}));
    assert_eq!(server.calls().len(), 1);
    assert!(
        eventually(std::time::Duration::from_secs(5), || root_warnings(
            &sidecar
        ) == 1)
        .await,
        "the roots are read at the first handshake: {:?}",
        sidecar.logs()
    );

    // The server closes every connection after its reply, so each call is a new
    // handshake: the roots are not read again.
    for object_id in 2..5 {
        let (status, body) = sidecar.send("clients.update", object_id, json!({})).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(server.calls().len(), 4);
    assert_eq!(root_warnings(&sidecar), 1, "roots read once");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_https_handler_with_an_untrusted_certificate_fails_with_the_reason() {
    let server = tls_echo().await;
    let dir = TempDir::new().unwrap();
    // Roots that do not include the test certificate.
    let other = dir.path().join("other.pem");
    std::fs::write(&other, include_str!("../fixtures/other-ca.pem")).unwrap();
    let config = format!("{SERVER}{}", before_handler("tls", &server.url("/")));
    let sidecar = Sidecar::start_in(
        dir,
        &config,
        &[
            ("SSL_CERT_FILE", other.to_str().unwrap()),
            ("SSL_CERT_DIR", other.to_str().unwrap()),
        ],
    );
    let (status, body) = sidecar.send("clients.update", 1, json!({})).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["handler"], "tls");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("certificate"), "{message}");
    assert!(message.contains("UnknownIssuer"), "{message}");
    assert!(server.calls().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_without_ca_roots_runs_http_handlers_and_fails_https_calls_with_the_reason() {
    let plain = HandlerServer::echo().await;
    let tls = tls_echo().await;
    let dir = TempDir::new().unwrap();
    let missing = dir.path().join("nothing-here");
    let config = format!(
        "{SERVER}{}{}",
        before_handler("plain", &plain.url("/")).replace("\"*\"", "\"clients.update\""),
        before_handler("tls", &tls.url("/")).replace("\"*\"", "\"clients.delete\""),
    );
    // A bare container: no bundle, no directory of certificates.
    let sidecar = Sidecar::start_in(
        dir,
        &config,
        &[
            ("SSL_CERT_FILE", missing.to_str().unwrap()),
            ("SSL_CERT_DIR", missing.to_str().unwrap()),
        ],
    );
    let (status, body) = sidecar.send("clients.update", 1, json!({"a": 1})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(plain.calls().len(), 1);

    let (status, body) = sidecar.send("clients.delete", 2, json!({})).await;
    assert_eq!(status, 403, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("No CA certificates"), "{message}");
    assert!(tls.calls().is_empty());
    // And the sidecar keeps serving.
    let (status, _) = sidecar.send("clients.update", 3, json!({})).await;
    assert_eq!(status, 200);
}
