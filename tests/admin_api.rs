//! The admin API's answers to questions it cannot answer well: filters no row can match,
//! and settings that do not apply to a handler's stage.

mod common;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn executions_refuse_an_outcome_the_log_cannot_hold_and_a_limit_over_1000() {
    let sidecar = Sidecar::start(SERVER);
    let (status, body) = sidecar.get("/v1/executions?outcome=bogus").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["error"]["message"],
        "unknown outcome \"bogus\"; use allowed, denied or error (before stage), delivered, \
         failed or dead (after stage)"
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
    let (status, body) = sidecar.get("/v1/deadletters?limit=1001").await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 1000")
    );
    assert_eq!(sidecar.get("/v1/executions?limit=1000").await.0, 200);

    // The command line passes the server's word on.
    let url = format!("http://{}", sidecar.addr);
    let (code, out, err) = run_binary(
        sidecar.dir.path(),
        &["executions", "--outcome", "bogus", "--url", &url],
    );
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(
        err.starts_with("provisiond: unknown outcome \"bogus\"; use allowed")
            && err.trim_end().ends_with("(HTTP 400)"),
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
