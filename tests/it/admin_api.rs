//! The admin API's answers to questions it cannot answer well: filters no row can match,
//! and settings that do not apply to a handler's stage.

use crate::common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn executions_refuse_an_outcome_the_log_cannot_hold_and_a_limit_over_1000() {
    let sidecar = Sidecar::start(SERVER);
    let (status, body) = sidecar.get("/v1/executions?outcome=bogus").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["error"]["message"],
        "unknown outcome \"bogus\"; use allowed, denied or error (before stage), delivered, \
         failed, dead or error (after stage; error there is a filter that failed)"
    );
    for outcome in ["allowed", "denied", "error", "delivered", "failed", "dead"] {
        let (status, body) = sidecar
            .get(&format!("/v1/executions?outcome={outcome}"))
            .await;
        assert_eq!(status, 200, "{outcome}: {body}");
        assert_eq!(body["count"], 0);
    }
    let (status, body) = sidecar.get("/v1/executions?limit=5000").await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("at most 1000"), "{message}");
    assert!(message.ends_with("; narrow the query with since or the other filters"));
    // The dead letters' list pages with `after` too.
    let (status, body) = sidecar.get("/v1/deadletters?limit=1001").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["error"]["message"],
        "limit is at most 1000, got 1001; narrow the query with the filters or after"
    );
    assert_eq!(sidecar.get("/v1/deadletters?since=2h").await.0, 200);
    assert_eq!(sidecar.get("/v1/executions?limit=1000").await.0, 200);

    // The command line passes the server's word on.
    let url = format!("http://{}", sidecar.addr);
    let (code, out, err) = run_binary(
        sidecar.dir.path(),
        &["executions", "--since", "yesterday", "--url", &url],
    );
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(
        err.starts_with("provisiond: since must be a time (")
            && err.trim_end().ends_with("(HTTP 400)"),
        "{err}"
    );
    // An outcome the command line knows to be none is refused before any request, with
    // the six (which its shell completions offer too).
    let (code, _, err) = run_binary(
        sidecar.dir.path(),
        &["executions", "--outcome", "bogus", "--url", &url],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("invalid value 'bogus' for '--outcome <OUTCOME>'")
            && err.contains("[possible values: allowed, denied, error, delivered, failed, dead]"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn v1_config_shows_each_handler_the_settings_of_its_stage_and_no_secret() {
    let config = format!(
        r#"{SERVER}
[defaults]
timeout = "3s"

[[handler]]
name = "check"
events = ["clients.create"]
stage = "before"
url = "http://127.0.0.1:1/check"
headers = {{ Authorization = "Bearer ${{API_KEY}}" }}
secret = "whsec_c2VjcmV0LXNpZ25pbmcta2V5"
modifies = true
on_error = "deny"
max_concurrency = 2

[[handler]]
name = "crm"
events = ["clients.*"]
stage = "after"
command = ["/bin/true", "--key", "${{API_KEY}}"]
env = {{ KEY = "${{API_KEY}}" }}
timeout = "10s"
max_concurrency = 4
retry = {{ attempts = 12, backoff = "1s", max_backoff = "10m" }}
"#
    );
    let sidecar = Sidecar::start_in(
        tempfile::TempDir::new().unwrap(),
        &config,
        &[("API_KEY", "key-SECRET-7")],
    );
    let body = sidecar.live_config().await;
    let shown = body.to_string();
    for secret in ["SECRET", "c2VjcmV0", "whsec_", "Bearer"] {
        assert!(!shown.contains(secret), "{secret} in {body:#}");
    }
    assert_eq!(
        body["handlers"][0],
        json!({
            "name": "check",
            "stage": "before",
            "priority": 100,
            "enabled": true,
            "events": ["clients.create"],
            "target": "POST http://127.0.0.1:1/check",
            "modifies": true,
            "on_error": "deny",
            "timeout": "3s",
            "max_concurrency": 2,
        })
    );
    assert_eq!(
        body["handlers"][1],
        json!({
            "name": "crm",
            "stage": "after",
            "priority": 100,
            "enabled": true,
            "events": ["clients.*"],
            "target": "/bin/true --key ${API_KEY}",
            "retry": {"attempts": 12, "backoff": "1s", "max_backoff": "10m"},
            "timeout": "10s",
            "max_concurrency": 4,
        })
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn v1_explain_says_what_the_explain_command_says_and_names_what_is_wrong_in_a_body() {
    let config = format!(
        r#"{SERVER}token = "s3cret"
max_body = "4KiB"

[[handler]]
name = "vip"
events = ["clients.update"]
stage = "before"
priority = 5
url = "http://127.0.0.1:1/vip"
match = {{ "data.vip" = true }}

[[handler]]
name = "strict"
events = ["clients.update"]
stage = "before"
priority = 1
url = "http://127.0.0.1:1/strict"
modifies = true

[[handler]]
name = "crm"
events = ["clients.*"]
stage = "after"
command = ["/bin/true", "--key", "${{API_KEY}}"]

[[handler]]
name = "balance"
events = ["clients.balance_zero"]
stage = "before"
url = "http://127.0.0.1:1/balance"
"#
    );
    let sidecar = Sidecar::start_in(
        tempfile::TempDir::new().unwrap(),
        &config,
        &[("API_KEY", "key-SECRET-7")],
    );
    let explain = |body: String, token: Option<&'static str>| {
        let mut request = sidecar.client().post(sidecar.url("/v1/explain")).body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move { status_and_json(request.send().await.unwrap()).await }
    };
    let body =
        json!({"event": "clients.update", "data": {"vip": false}, "object_id": 2}).to_string();

    // Like every /v1 route, it needs the token.
    let (status, _) = explain(body.clone(), None).await;
    assert_eq!(status, 401);

    let (status, answer) = explain(body, Some("s3cret")).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["event"], "clients.update");
    assert_eq!(answer["object_id"], "2");
    assert_eq!(answer["known"], true);
    assert_eq!(
        answer["before"],
        json!([{"name": "strict", "priority": 1, "target": "POST http://127.0.0.1:1/strict", "modifies": true}])
    );
    assert_eq!(
        answer["after"],
        json!([{"name": "crm", "priority": 100, "target": "/bin/true --key ${API_KEY}"}])
    );
    assert_eq!(
        answer["not_run"],
        json!([
            {"name": "vip", "stage": "before", "reason": "match condition false: data.vip = true"},
            {"name": "balance", "stage": "before",
             "reason": "its events do not match: events = [\"clients.balance_zero\"]"},
        ])
    );
    assert_eq!(answer["denied"], json!(null));
    assert!(!answer.to_string().contains("SECRET"), "{answer}");

    // `text` is the command's output, word for word, from the same config file.
    let config_path = sidecar.config_path.to_str().unwrap();
    let (code, out, err) = cli(
        &[
            "explain",
            "clients.update",
            "--data",
            "-",
            "--object-id",
            "2",
            "-c",
            config_path,
        ],
        &[("API_KEY", "key-SECRET-7")],
        r#"{"vip": false}"#,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(answer["text"], out);

    // An unknown event is explained, with a hint, as the command does.
    let (status, answer) = explain(
        json!({"event": "clients.updte"}).to_string(),
        Some("s3cret"),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (answer["known"].clone(), answer["suggestion"].clone()),
        (json!(false), json!("clients.update"))
    );

    // A null object id is the empty one, as in an envelope; absent, 1.
    for (body, id) in [
        (json!({"event": "clients.create", "object_id": null}), ""),
        (json!({"event": "clients.create"}), "1"),
    ] {
        let (status, answer) = explain(body.to_string(), Some("s3cret")).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["object_id"], id, "{body}: {answer}");
    }

    // Bad bodies are 400s that say what is wrong.
    for (body, message) in [
        ("{\"event\": ", "the body is not valid JSON"),
        (
            "[1]",
            "the body must be a JSON object with event, data, object_id, got",
        ),
        (
            r#"{"data": {}}"#,
            "missing `event`: the event name, e.g. \"clients.create\"",
        ),
        (
            r#"{"event": 12}"#,
            "`event` must be a string (the event name), got",
        ),
        (
            r#"{"event": "clients.create", "data": [1]}"#,
            "`data` must be a JSON object, got",
        ),
        (
            r#"{"event": "clients.create", "object_id": [1]}"#,
            "`object_id` must be a number, a string or null, got",
        ),
        (
            r#"{"event": "clients.create", "obj_id": 1}"#,
            "unknown key \"obj_id\"; the body takes event, data, object_id",
        ),
        // The envelope's own checks, named as this body's keys.
        (
            r#"{"event": "clients.create", "object_id": "a\u0007b"}"#,
            "`object_id` must not hold control characters",
        ),
    ] {
        let (status, answer) = explain(body.to_owned(), Some("s3cret")).await;
        assert_eq!(status, 400, "{body}: {answer}");
        let got = answer["error"]["message"].as_str().unwrap();
        assert!(got.starts_with(message), "{body}: {got}");
    }
    // A body over server.max_body is refused unread, as on /events.
    let big = json!({"event": "clients.create", "data": {"note": "x".repeat(5000)}}).to_string();
    let (status, answer) = explain(big, Some("s3cret")).await;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(
        answer["error"]["message"],
        "body is larger than server.max_body (4096 bytes)"
    );
    let response = sidecar
        .client()
        .get(sidecar.url("/v1/explain"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_admin_body_is_cut_at_the_deadline_and_frees_its_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // One connection allowed: a client that stalls its upload on an admin route must not
    // keep it, or the billing's events wait in the backlog for good.
    let sidecar = Sidecar::start(&format!("{SERVER}max_connections = 1\ndeadline = \"1s\"\n"));
    for path in [
        "/v1/explain",
        "/v1/deadletters/replay",
        "/v1/deadletters/drop",
    ] {
        let mut stalled = tokio::net::TcpStream::connect(&sidecar.addr).await.unwrap();
        stalled
            .write_all(
                format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{")
                    .as_bytes(),
            )
            .await
            .unwrap();
        let mut reply = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            stalled.read_to_end(&mut reply),
        )
        .await;
        assert!(
            read.is_ok(),
            "{path}: the stalled upload still holds its connection"
        );
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.starts_with("HTTP/1.1 408"), "{path}: {reply}");
        assert!(
            reply.contains("did not arrive within server.deadline (1s)"),
            "{path}: {reply}"
        );
        // The one connection is free again.
        let healthz = healthz_on_a_new_connection(&sidecar.addr, std::time::Duration::from_secs(5))
            .await
            .expect("a new connection is accepted");
        assert!(healthz.starts_with("HTTP/1.1 200"), "{path}: {healthz}");
    }
}
