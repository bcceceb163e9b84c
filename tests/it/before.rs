//! The synchronous path: the billing posts to a real provisiond process, which calls real
//! HTTP handler servers and real scripts, and answers.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{Value, json};

/// An HTTP handler that appends `tag` to `data.trail` and returns the envelope.
async fn appender(tag: &'static str) -> HandlerServer {
    HandlerServer::start(move |call| async move {
        let mut envelope = call.json();
        let trail = envelope["data"]["trail"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        envelope["data"]["trail"] = Value::String(trail + tag);
        reply(200, envelope.to_string())
    })
    .await
}

/// A script that appends `tag` to `data.trail`, run through python3.
fn appender_script(dir: &std::path::Path, tag: &str) -> String {
    let path = script(
        dir,
        &format!("append-{tag}.py"),
        &format!(
            "#!/usr/bin/env python3\nimport json, sys\n\
             env = json.load(sys.stdin)\n\
             env['data']['trail'] = env['data'].get('trail', '') + '{tag}'\n\
             json.dump(env, sys.stdout)\n"
        ),
    );
    path.display().to_string()
}

fn http_handler(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[handler]]\nname = \"{name}\"\nevents = [\"*\"]\nstage = \"before\"\nurl = {}\n{extra}\n",
        toml_str(url)
    )
}

fn script_handler(name: &str, path: &str, extra: &str) -> String {
    format!(
        "[[handler]]\nname = \"{name}\"\nevents = [\"*\"]\nstage = \"before\"\ncommand = [{}]\n{extra}\n",
        toml_str(path)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn echo_handler_returns_exactly_what_the_billing_sent() {
    let echo = HandlerServer::echo().await;
    let config = format!(
        "{SERVER}{}",
        http_handler("echo", &echo.url("/echo"), "modifies = true")
    );
    let sidecar = Sidecar::start(&config);
    let sent = r#"{"event":{"dt":"2026-11-26T10:00:00+00:00","events_id":"clients.update","object_id":12},"data":{"id":12,"name":"My changed name","balance":"-3.50","tags":["a","b"],"nested":{"z":1,"a":[1.5,null,true]}}}"#;
    let response = http_client()
        .post(sidecar.url("/events"))
        .body(sent)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "the billing gets JSON back"
    );
    assert_eq!(response.text().await.unwrap(), sent);

    let calls = echo.calls();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(call.method, "POST");
    assert_eq!(call.path, "/echo");
    assert_eq!(call.header("content-type"), Some("application/json"));
    assert_eq!(call.header("x-provisioning-event"), Some("clients.update"));
    assert_eq!(call.header("x-provisioning-handler"), Some("echo"));
    assert_eq!(call.header("x-provisioning-attempt"), Some("1"));
    assert_eq!(String::from_utf8_lossy(&call.body), sent);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_header_provisiond_sets_on_a_call_is_one_the_config_refuses() {
    let handler = HandlerServer::fixed(200, "").await;
    let config = format!(
        "{SERVER}{}",
        http_handler(
            "crm",
            &handler.url("/"),
            "secret = \"whsec_c2VjcmV0\"\nheaders = { X-Tenant = \"acme\" }"
        )
    );
    let sidecar = Sidecar::start(&config);
    let (status, _) = sidecar.send("clients.create", 1, json!({})).await;
    assert_eq!(status, 200);
    let calls = handler.calls();
    let names: Vec<&str> = calls[0].headers.keys().map(|n| n.as_str()).collect();
    for name in &names {
        // The file's own, and reqwest's defaults that `headers` replaces.
        let configurable = ["x-tenant", "user-agent", "accept"].contains(name);
        let refused = provisiond::config::SET_BY_PROVISIOND
            .iter()
            .any(|(set, _)| set == name);
        assert!(
            configurable || refused,
            "{name} is set on calls but may be set in `headers` too: {names:?}"
        );
    }
    assert!(names.contains(&"webhook-signature"), "{names:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn chain_runs_in_priority_order_each_seeing_the_previous_data() {
    let first = appender("1").await;
    let third = appender("3").await;
    let dir = tempfile::TempDir::new().unwrap();
    let second = appender_script(dir.path(), "2");
    // Declared out of order; a tie on priority keeps file order (4 before 5).
    let tie_a = appender("4").await;
    let tie_b = appender("5").await;
    let config = format!(
        "{SERVER}{}{}{}{}{}",
        http_handler("third", &third.url("/"), "priority = 30\nmodifies = true"),
        http_handler("tie-a", &tie_a.url("/"), "priority = 40\nmodifies = true"),
        script_handler("second", &second, "priority = 20\nmodifies = true"),
        http_handler("tie-b", &tie_b.url("/"), "priority = 40\nmodifies = true"),
        http_handler("first", &first.url("/"), "priority = 10\nmodifies = true"),
    );
    let sidecar = Sidecar::start_in(dir, &config, &[]);
    let (status, body) = sidecar
        .send("clients.create", 7, json!({"name": "ACME"}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["trail"], "12345");
    assert_eq!(body["data"]["name"], "ACME");
    assert_eq!(first.calls()[0].json()["data"].get("trail"), None);
    assert_eq!(third.calls()[0].json()["data"]["trail"], "12");
    assert_eq!(tie_a.calls()[0].json()["data"]["trail"], "123");
    assert_eq!(tie_b.calls()[0].json()["data"]["trail"], "1234");
}

#[tokio::test(flavor = "multi_thread")]
async fn http_forbid_stops_the_chain_with_the_handlers_message() {
    let guard =
        HandlerServer::fixed(403, r#"{"message": "client name must start with ACME"}"#).await;
    let later = HandlerServer::echo().await;
    let config = format!(
        "{SERVER}{}{}",
        http_handler("check-name", &guard.url("/"), "priority = 1"),
        http_handler("later", &later.url("/"), "priority = 2"),
    );
    let sidecar = Sidecar::start(&config);
    let (status, body) = sidecar
        .send("clients.create", 1, json!({"name": "x"}))
        .await;
    assert_eq!(status, 403);
    assert_eq!(
        body,
        json!({"error": {"handler": "check-name", "message": "client name must start with ACME"}})
    );
    assert!(
        later.calls().is_empty(),
        "a later handler must not run after a deny"
    );
    let line = sidecar
        .wait_for_log(Duration::from_secs(5), |v| {
            v["message"] == "event" && v["outcome"] == "denied"
        })
        .expect("the event's log line keeps its message and says why");
    assert_eq!(line["handler"], "check-name");
    assert_eq!(line["reason"], "client name must start with ACME");

    // 409 and 422 forbid too; the message may be plain text.
    for status_code in [409u16, 422] {
        let guard =
            HandlerServer::start(move |_| async move { reply(status_code, "no such plan\n") })
                .await;
        let sidecar = Sidecar::start(&format!(
            "{SERVER}{}",
            http_handler("g", &guard.url("/"), "")
        ));
        let (status, body) = sidecar.send("clients.create", 1, json!({})).await;
        assert_eq!(status, 403);
        assert_eq!(body["error"]["message"], "no such plan");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn script_forbid_carries_the_last_lines_of_stderr() {
    let dir = tempfile::TempDir::new().unwrap();
    let deny = script(
        dir.path(),
        "deny.sh",
        "#!/bin/sh\ncat >/dev/null\necho 'noise' >&2\necho 'balance too low' >&2\necho 'for client 9' >&2\nexit 1\n",
    );
    let silent = script(dir.path(), "silent.sh", "#!/bin/sh\nexit 3\n");
    let later = HandlerServer::echo().await;
    let config = format!(
        "{SERVER}{}{}",
        script_handler("deny-script", &deny.display().to_string(), "priority = 1"),
        http_handler("later", &later.url("/"), "priority = 2"),
    );
    let config_silent = format!(
        "{SERVER}{}",
        script_handler("silent", &silent.display().to_string(), "")
    );
    let sidecar = Sidecar::start_in(dir, &config, &[]);
    let (status, body) = sidecar.send("clients.balance_zero", 9, json!({})).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["handler"], "deny-script");
    assert_eq!(
        body["error"]["message"],
        "noise\nbalance too low\nfor client 9"
    );
    assert!(later.calls().is_empty());

    let sidecar = Sidecar::start(&config_silent);
    let (status, body) = sidecar.send("clients.balance_zero", 9, json!({})).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["message"], "exited with status 3");
}

#[tokio::test(flavor = "multi_thread")]
async fn script_gets_the_envelope_and_its_environment() {
    let dir = tempfile::TempDir::new().unwrap();
    let out = dir.path().join("seen");
    let path = script(
        dir.path(),
        "env.sh",
        &format!(
            "#!/bin/sh\ncat > {out}.stdin\nenv | sort > {out}.env\npwd > {out}.pwd\n",
            out = out.display()
        ),
    );
    let config = format!(
        "{SERVER}{}",
        script_handler(
            "envy",
            &path.display().to_string(),
            "env = { SWITCH_API = \"http://switch:8080\" }"
        )
    );
    let sidecar = Sidecar::start_in(dir, &config, &[("PROVISIOND_SECRET_THING", "hush")]);
    let sent = envelope("clients_packages.activate", 77, json!({"plan": "gold"}));
    let (status, _) = sidecar.post(sent.to_string()).await;
    assert_eq!(status, 200);
    let stdin: Value =
        serde_json::from_slice(&std::fs::read(format!("{}.stdin", out.display())).unwrap())
            .unwrap();
    assert_eq!(stdin, sent, "the script reads the envelope on stdin");
    let env = std::fs::read_to_string(format!("{}.env", out.display())).unwrap();
    for line in [
        "PROVISIONING_EVENT=clients.subscriptions.activate",
        "PROVISIONING_OBJECT_ID=77",
        "PROVISIONING_HANDLER=envy",
        "PROVISIONING_ATTEMPT=1",
        "SWITCH_API=http://switch:8080",
    ] {
        assert!(
            env.lines().any(|l| l == line),
            "{line} missing from:\n{env}"
        );
    }
    assert!(env.lines().any(|l| l.starts_with("PATH=")));
    assert!(
        !env.contains("PROVISIOND_SECRET_THING"),
        "the sidecar's own environment does not leak into scripts"
    );
    let pwd = std::fs::read_to_string(format!("{}.pwd", out.display())).unwrap();
    assert_eq!(
        std::fs::canonicalize(pwd.trim()).unwrap(),
        std::fs::canonicalize(sidecar.dir.path()).unwrap(),
        "scripts run in the config file's directory"
    );
}

/// The three ways a handler fails, each under both `on_error` settings.
#[tokio::test(flavor = "multi_thread")]
async fn handler_failures_follow_on_error() {
    let slow = HandlerServer::start(|call| async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        reply(200, call.body)
    })
    .await;
    let garbage = HandlerServer::fixed(200, "<html>not json</html>").await;
    // Valid JSON syntax, but `\ud800` is half a character: no map can hold the data.
    let surrogate = HandlerServer::fixed(
        200,
        r#"{"event":{"events_id":"clients.update"},"data":{"s":"\ud800","t":"ok"}}"#,
    )
    .await;
    let refused = refused_url();
    // The host and port it could not reach, not the URL's path.
    let refused_at = refused
        .trim_start_matches("http://")
        .trim_end_matches("/hook");
    let failures = [
        ("timeout", slow.url("/"), "timed out after 300ms".to_owned()),
        (
            "refused",
            refused.clone(),
            format!("cannot connect to {refused_at}: "),
        ),
        (
            "garbage",
            garbage.url("/"),
            "reply is not an envelope".to_owned(),
        ),
        (
            "surrogate",
            surrogate.url("/"),
            "reply is not an envelope (body is not valid JSON: \\ud800 at line 1 column 54 \
             is half of a UTF-16 surrogate pair"
                .to_owned(),
        ),
    ];
    for (kind, url, expected) in failures {
        for on_error in ["allow", "deny"] {
            let after = HandlerServer::echo().await;
            let config = format!(
                "{SERVER}{}{}",
                http_handler(
                    "flaky",
                    &url,
                    &format!(
                        "priority = 1\nmodifies = true\ntimeout = \"300ms\"\non_error = \"{on_error}\""
                    )
                ),
                http_handler("after", &after.url("/"), "priority = 2"),
            );
            let sidecar = Sidecar::start(&config);
            let (status, body) = sidecar.send("clients.update", 3, json!({"a": 1})).await;
            if on_error == "allow" {
                assert_eq!(status, 200, "{kind} under allow: {body}");
                assert_eq!(body["data"], json!({"a": 1}), "{kind}: data unchanged");
                assert_eq!(after.calls().len(), 1, "{kind}: the chain goes on");
            } else {
                assert_eq!(status, 403, "{kind} under deny: {body}");
                assert_eq!(body["error"]["handler"], "flaky");
                let message = body["error"]["message"].as_str().unwrap();
                assert!(message.starts_with("handler failed: "), "{message}");
                assert!(message.contains(&expected), "{kind}: {message}");
                assert!(after.calls().is_empty(), "{kind}: the chain stops");
            }
            // Either way the sidecar keeps serving.
            let (status, _) = sidecar.send("clients.update", 3, json!({})).await;
            assert!(status == 200 || status == 403);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn other_statuses_are_errors_not_denials() {
    let broken = HandlerServer::fixed(500, "database down").await;
    let config = format!(
        "{SERVER}{}",
        http_handler("b", &broken.url("/"), "on_error = \"deny\"")
    );
    let sidecar = Sidecar::start(&config);
    let (status, body) = sidecar.send("clients.update", 3, json!({})).await;
    assert_eq!(status, 403);
    assert_eq!(
        body["error"]["message"],
        "handler failed: unexpected HTTP status 500: database down"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn deadline_cuts_a_slow_chain_short() {
    let slow = HandlerServer::start(|call| async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        reply(200, call.body)
    })
    .await;
    let never = HandlerServer::echo().await;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndeadline = \"1s\"\n{}{}{}{}",
        http_handler("s1", &slow.url("/1"), "priority = 1"),
        http_handler("s2", &slow.url("/2"), "priority = 2"),
        http_handler("s3", &slow.url("/3"), "priority = 3"),
        http_handler(
            "fail-closed",
            &never.url("/"),
            "priority = 4\non_error = \"deny\""
        ),
    );
    let sidecar = Sidecar::start(&config);
    let started = Instant::now();
    let (status, body) = sidecar.send("clients.update", 3, json!({})).await;
    let took = started.elapsed();
    // s1 and s2 finish (0.8s), s3 is cut at the deadline, fail-closed never runs.
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["handler"], "fail-closed");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("server.deadline (1s) ran out"),
        "{body}"
    );
    assert!(never.calls().is_empty());
    assert_eq!(slow.calls().len(), 3);
    assert!(
        took < Duration::from_secs(3),
        "the chain stopped at the deadline ({took:?})"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn filters_select_handlers_on_the_current_data() {
    let dir = tempfile::TempDir::new().unwrap();
    // Sets data.tier = "gold" for clients of company 3.
    let tierer = HandlerServer::start(|call| async move {
        let mut envelope = call.json();
        envelope["data"]["tier"] = json!("gold");
        reply(200, envelope.to_string())
    })
    .await;
    let on_gold = HandlerServer::echo().await;
    let on_negative = HandlerServer::echo().await;
    let on_acme_mail = HandlerServer::echo().await;
    let disabled = HandlerServer::echo().await;
    let on_regex = HandlerServer::echo().await;
    let config = format!(
        "{SERVER}{}{}{}{}{}{}",
        http_handler(
            "tierer",
            &tierer.url("/"),
            "priority = 1\nmodifies = true\nmatch = { \"data.companies_id\" = 3 }"
        ),
        http_handler(
            "on-gold",
            &on_gold.url("/"),
            "priority = 2\nmatch = { \"data.tier\" = { in = [\"gold\", \"platinum\"] } }"
        ),
        http_handler(
            "on-negative",
            &on_negative.url("/"),
            "priority = 3\n[handler.match]\ndata.balance = { lt = 0 }\nevent.object_id = { ne = 1 }"
        ),
        http_handler(
            "on-acme-mail",
            &on_acme_mail.url("/"),
            "priority = 4\nwhen = 'has(data.email) && data.email.endsWith(\"@acme.example\")'"
        ),
        http_handler(
            "disabled",
            &disabled.url("/"),
            "priority = 5\nenabled = false"
        ),
        http_handler(
            "on-regex",
            &on_regex.url("/"),
            "priority = 6\nmatch = { \"data.name\" = { regex = \"^ACME\" }, \"data.phone\" = { exists = false } }"
        ),
    );
    let sidecar = Sidecar::start_in(dir, &config, &[]);

    let (status, body) = sidecar
        .send(
            "clients.update",
            5,
            json!({"companies_id": "3", "balance": -2, "email": "a@acme.example", "name": "ACME Ltd"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["data"]["tier"], "gold");
    assert_eq!(
        on_gold.calls().len(),
        1,
        "matches data an earlier handler added"
    );
    assert_eq!(on_negative.calls().len(), 1);
    assert_eq!(on_acme_mail.calls().len(), 1);
    assert_eq!(on_regex.calls().len(), 1);

    let (status, _) = sidecar
        .send(
            "clients.update",
            1,
            json!({"companies_id": 4, "balance": 5, "email": "b@other.example", "name": "Other", "phone": "1"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(tierer.calls().len(), 1, "companies_id 4 does not match");
    assert_eq!(on_gold.calls().len(), 1, "no tier without the tierer");
    assert_eq!(on_negative.calls().len(), 1);
    assert_eq!(on_acme_mail.calls().len(), 1);
    assert_eq!(on_regex.calls().len(), 1);
    assert!(
        disabled.calls().is_empty(),
        "a disabled handler is never called"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_filter_that_fails_at_run_time_is_a_handler_error() {
    let guarded = HandlerServer::echo().await;
    let config = format!(
        "{SERVER}{}",
        http_handler(
            "strict",
            &guarded.url("/"),
            "on_error = \"deny\"\nwhen = 'data.email.endsWith(\"@x\")'"
        ),
    );
    let sidecar = Sidecar::start(&config);
    let (status, body) = sidecar.send("clients.update", 1, json!({})).await;
    assert_eq!(status, 403);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("handler failed: filter failed"),
        "{body}"
    );
    assert!(guarded.calls().is_empty());
}

/// An after-stage handler has no `on_error`: a filter of its that fails costs the event
/// that delivery only, and says so in the log, the execution log and the metrics.
#[tokio::test(flavor = "multi_thread")]
async fn an_after_stage_filter_that_fails_is_an_error_row_and_no_delivery() {
    let crm = HandlerServer::echo().await;
    let other = HandlerServer::echo().await;
    let config = format!(
        "{SERVER}{}{}",
        after_handler("crm", &crm.url("/"), "match = { \"data.n\" = { lt = 5 } }"),
        after_handler("other", &other.url("/"), ""),
    );
    let sidecar = Sidecar::start(&config);
    let (status, body) = sidecar
        .send("clients.update", 9, json!({"n": {"a": 1}}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        eventually(Duration::from_secs(10), || other.calls().len() == 1).await,
        "the other handler is delivered"
    );
    let rows = eventually_rows(&sidecar, "/v1/executions?handler=crm", 1).await;
    assert_eq!(rows[0]["stage"], "after", "{rows:?}");
    assert_eq!(rows[0]["attempt"], 0, "{rows:?}");
    assert_eq!(rows[0]["outcome"], "error", "{rows:?}");
    assert!(
        rows[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("data.n")),
        "{rows:?}"
    );
    let metrics = sidecar.metrics_text().await;
    assert!(
        metrics.contains(
            "provisiond_handler_calls_total{handler=\"crm\",stage=\"after\",outcome=\"error\"} 1"
        ),
        "{metrics}"
    );
    assert!(crm.calls().is_empty(), "no delivery for a failed filter");
}

#[tokio::test(flavor = "multi_thread")]
async fn events_outside_the_catalogue_reach_wildcard_handlers_only() {
    let any = HandlerServer::echo().await;
    let clients = HandlerServer::echo().await;
    let exact = HandlerServer::echo().await;
    let config = format!(
        "{SERVER}{}{}{}",
        http_handler("any", &any.url("/"), ""),
        http_handler("clients", &clients.url("/"), "").replace("[\"*\"]", "[\"clients.*\"]"),
        http_handler("exact", &exact.url("/"), "").replace("[\"*\"]", "[\"clients.create\"]"),
    );
    let sidecar = Sidecar::start(&config);
    let (status, body) = sidecar
        .send("clients.loyalty.upgrade", 4, json!({"x": 1}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"], json!({"x": 1}));
    assert_eq!(any.calls().len(), 1);
    assert_eq!(clients.calls().len(), 1);
    assert!(exact.calls().is_empty());
    let (status, _) = sidecar.send("billing.new_thing", 4, json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(any.calls().len(), 2);
    assert_eq!(clients.calls().len(), 1);
    // Aliases on the wire reach the handlers of the catalogue name.
    let (status, _) = sidecar
        .send("clients.custom_fields_update", 4, json!({}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        clients
            .calls()
            .last()
            .unwrap()
            .header("x-provisioning-event"),
        Some("clients.custom_fields.update")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_a_clear_4xx_and_the_sidecar_keeps_serving() {
    let echo = HandlerServer::echo().await;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_body = \"1KiB\"\n{}",
        http_handler("echo", &echo.url("/"), "")
    );
    let sidecar = Sidecar::start(&config);
    let big = envelope("clients.update", 1, json!({"blob": "x".repeat(2000)})).to_string();
    let cases: Vec<(String, u16, &str)> = vec![
        ("{not json".into(), 400, "body is not valid JSON"),
        (
            "[1, 2]".into(),
            400,
            "must be a JSON object with `event` and `data`, got an array",
        ),
        (
            r#"{"event": {"events_id": "clients.update"}, "data": [1]}"#.into(),
            400,
            "`data` must be an object, got an array",
        ),
        (
            r#"{"event": {"object_id": 1}, "data": {}}"#.into(),
            400,
            "missing `event.events_id`",
        ),
        (
            r#"{"event": {"events_id": 5}, "data": {}}"#.into(),
            400,
            "`event.events_id` must be a non-empty string",
        ),
        (
            r#"{"event": {"events_id": ""}, "data": {}}"#.into(),
            400,
            "`event.events_id` must be a non-empty string, got an empty string",
        ),
        (
            r#"{"event": {"events_id": "clients.update", "object_id": true}, "data": {}}"#.into(),
            400,
            "`event.object_id` must be a number, a string or null, got a boolean",
        ),
        (
            r#"{"event": {"events_id": "clients.update"}, "data": {"x": "\udc00"}}"#.into(),
            400,
            "body is not valid JSON: \\udc00 at line 1 column 59 is half of a UTF-16 \
             surrogate pair, not a character",
        ),
        (
            r#"{"event": {"events_id": "clients.update", "events_id": "clients.delete"}, "data": {}}"#
                .into(),
            400,
            "`event.events_id` is given more than once",
        ),
        (r#"{"data": {}}"#.into(), 400, "missing `event` object"),
        (
            r#"{"event": {"events_id": "clients.update"}}"#.into(),
            400,
            "missing `data` object",
        ),
        (big, 413, "larger than server.max_body (1024 bytes)"),
    ];
    let n = cases.len();
    for (body, want_status, want_message) in cases {
        let (status, reply) = sidecar.post(body.clone()).await;
        assert_eq!(status, want_status, "{body:.60}: {reply}");
        let message = reply["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(want_message), "{body:.60}: {message}");
        let (status, _) = sidecar.send("clients.update", 1, json!({})).await;
        assert_eq!(status, 200, "still serving after {body:.60}");
    }
    assert_eq!(echo.calls().len(), n, "no bad request reached a handler");

    // A chunked body, with no Content-Length, that streams past the limit is cut off too.
    let mut request =
        b"POST /events HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..20 {
        request.extend_from_slice(b"64\r\n");
        request.extend_from_slice(&[b' '; 100]);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let response = raw_request(&sidecar.addr, &request).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");

    // A body in a content coding is not the envelope's bytes: 415, saying so, whatever
    // the bytes are; `identity` is no coding at all.
    let body = envelope("clients.update", 1, json!({})).to_string();
    for (coding, want) in [("gzip", 415), ("identity, br", 415), ("identity", 200)] {
        let response = reqwest::Client::new()
            .post(sidecar.url("/events"))
            .header("content-encoding", coding)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), want, "{coding}");
        if want == 415 {
            assert_eq!(response.headers()["accept-encoding"], "identity");
            let reply: serde_json::Value = response.json().await.unwrap();
            let coding = coding.trim_start_matches("identity, ");
            assert_eq!(
                reply["error"]["message"],
                format!(
                    "the body is sent with Content-Encoding: {coding}; provisiond takes the \
                     envelope uncompressed, with no Content-Encoding"
                )
            );
        }
    }
    assert_eq!(
        echo.calls().len(),
        n + 1,
        "no encoded body reached a handler"
    );

    let (status, reply) = sidecar.get("/events").await;
    assert_eq!(status, 405, "{reply}");
    let (status, _) = sidecar.get("/nope").await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_script_timeout_kills_its_whole_process_group() {
    let dir = tempfile::TempDir::new().unwrap();
    let pids = dir.path().join("pids");
    // The script starts a grandchild that would outlive it, then hangs.
    let path = script(
        dir.path(),
        "hang.sh",
        &format!(
            "#!/bin/sh\nsleep 30 &\necho $! > {p}\necho $$ >> {p}\nsleep 30\n",
            p = pids.display()
        ),
    );
    let config = format!(
        "{SERVER}{}",
        script_handler(
            "hang",
            &path.display().to_string(),
            "timeout = \"500ms\"\non_error = \"deny\""
        )
    );
    let sidecar = Sidecar::start_in(dir, &config, &[]);
    let (status, body) = sidecar.send("clients.update", 1, json!({})).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        body["error"]["message"],
        "handler failed: timed out after 500ms"
    );
    let pids: Vec<i32> = std::fs::read_to_string(&pids)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2);
    for pid in pids {
        let gone = (0..100).any(|_| {
            let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| !s.contains(") Z "));
            if alive {
                std::thread::sleep(Duration::from_millis(20));
            }
            !alive
        });
        assert!(
            gone,
            "process {pid} of the timed-out script is still running"
        );
    }
}

/// Whether process `pid` is gone (or a zombie waiting to be reaped), within 5 s.
fn gone_soon(pid: i32) -> bool {
    (0..250).any(|_| {
        let alive =
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "));
        if alive {
            std::thread::sleep(Duration::from_millis(20));
        }
        !alive
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_script_whose_caller_hangs_up_has_its_whole_process_group_killed() {
    let dir = tempfile::TempDir::new().unwrap();
    let pids = dir.path().join("pids");
    // A grandchild that would outlive the script, then a long wait: only the billing
    // hanging up ends this call (timeout and deadline are 60 s).
    let path = script(
        dir.path(),
        "hang.sh",
        &format!(
            "#!/bin/sh\nsleep 60 &\necho \"$! $$\" > {p}.tmp\nmv {p}.tmp {p}\nsleep 60\n",
            p = pids.display()
        ),
    );
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndeadline = \"60s\"\n{}",
        script_handler(
            "hang",
            &path.display().to_string(),
            "timeout = \"60s\"\non_error = \"deny\""
        )
    );
    let sidecar = Sidecar::start_in(dir, &config, &[]);
    let billing = post_and_wait(&sidecar, envelope("clients.update", 1, json!({}))).await;
    assert!(
        eventually(Duration::from_secs(10), || pids.exists()).await,
        "the script never started"
    );
    let pids: Vec<i32> = std::fs::read_to_string(&pids)
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2);
    drop(billing); // the billing hangs up
    for pid in pids {
        assert!(
            gone_soon(pid),
            "process {pid} of the abandoned script call is still running"
        );
    }
    // The sidecar itself carries on.
    let (status, _) = sidecar.get("/healthz").await;
    assert_eq!(status, 200);
}

/// A billing that hangs up mid-chain (its own timeout shorter than `server.deadline`)
/// still leaves the event in the log, the execution log and the metrics.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_whose_caller_hangs_up_is_logged_as_abandoned() {
    let quick = HandlerServer::echo().await;
    let slow = HandlerServer::start(|call| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        reply(200, call.body)
    })
    .await;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndeadline = \"60s\"\n{}{}",
        http_handler("quick", &quick.url("/"), "priority = 1"),
        http_handler("slow", &slow.url("/"), "priority = 2\ntimeout = \"60s\""),
    );
    let sidecar = Sidecar::start(&config);
    let billing = post_and_wait(&sidecar, envelope("clients.update", 77, json!({}))).await;
    assert!(
        eventually(Duration::from_secs(10), || !slow.calls().is_empty()).await,
        "the slow handler was never called"
    );
    drop(billing); // the billing hangs up

    let line = sidecar
        .wait_for_log(Duration::from_secs(10), |v| {
            v["message"] == "event" && v["outcome"] == "abandoned"
        })
        .expect("the abandoned event's log line");
    assert_eq!(line["level"], "WARN", "{line}");
    assert_eq!(line["object_id"], "77", "{line}");
    assert_eq!(line["calls"], 2, "{line}");
    let event_id = line["span"]["id"].as_str().unwrap().to_owned();

    let rows = eventually_rows(&sidecar, &format!("/v1/executions?event_id={event_id}"), 2).await;
    let by_handler = |name: &str| {
        rows.iter()
            .find(|r| r["handler"] == name)
            .unwrap_or_else(|| panic!("no row for {name}: {rows:?}"))
            .clone()
    };
    assert_eq!(by_handler("quick")["outcome"], "allowed");
    let cut = by_handler("slow");
    assert_eq!(cut["outcome"], "error", "{cut}");
    assert!(
        cut["error"]
            .as_str()
            .is_some_and(|e| e.contains("the billing hung up")),
        "{cut}"
    );
    let metrics = sidecar.metrics_text().await;
    assert!(
        metrics
            .contains("provisiond_events_total{event=\"clients.update\",outcome=\"abandoned\"} 1"),
        "{metrics}"
    );
    // The sidecar carries on.
    let (status, _) = sidecar.get("/healthz").await;
    assert_eq!(status, 200);
}

/// A billing that posts `envelope` and waits for the answer on the connection it
/// returns: dropping it hangs up.
async fn post_and_wait(sidecar: &Sidecar, envelope: Value) -> tokio::net::TcpStream {
    let body = envelope.to_string();
    let request = format!(
        "POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut billing = tokio::net::TcpStream::connect(&sidecar.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut billing, request.as_bytes())
        .await
        .unwrap();
    billing
}

/// The rows `path` lists, once there are at least `n` (the execution log is written a
/// little after the calls).
async fn eventually_rows(sidecar: &Sidecar, path: &str, n: usize) -> Vec<Value> {
    for _ in 0..100 {
        let (status, reply) = sidecar.get(path).await;
        assert_eq!(status, 200, "{reply}");
        let rows = reply["executions"].as_array().cloned().unwrap_or_default();
        if rows.len() >= n {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("fewer than {n} rows at {path}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ids_no_script_could_be_given_get_a_400_naming_the_field_never_a_skipped_check() {
    let dir = tempfile::TempDir::new().unwrap();
    let ran = dir.path().join("ran");
    // A validating script that forbids everything, under the default on_error = "allow":
    // were it skipped (a spawn failure), the event would get 200.
    let path = script(
        dir.path(),
        "validate.sh",
        &format!(
            "#!/bin/sh\necho \"$PROVISIONING_OBJECT_ID\" >> {}\necho 'not allowed' >&2\nexit 1\n",
            ran.display()
        ),
    );
    let config = format!(
        "{SERVER}{}",
        script_handler("validate", &path.display().to_string(), "")
    );
    let sidecar = Sidecar::start_in(dir, &config, &[]);
    let long = "7".repeat(200_000);
    for (events_id, object_id, field) in [
        ("clients.update", json!("12\u{0}"), "event.object_id"),
        ("clients.update", json!(long), "event.object_id"),
        ("clients.update\u{0}", json!(12), "event.events_id"),
        (long.as_str(), json!(12), "event.events_id"),
    ] {
        let body = json!({"event": {"events_id": events_id, "object_id": object_id}, "data": {}});
        let (status, reply) = sidecar.post(body.to_string()).await;
        assert_eq!(status, 400, "{field}: {reply}");
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("`{field}`")), "{message}");
        assert!(
            message.len() < 300,
            "the message does not quote the value: {message}"
        );
    }
    // An ordinary id still meets the script, which forbids it.
    let (status, reply) = sidecar.send("clients.update", 12, json!({})).await;
    assert_eq!(status, 403, "{reply}");
    assert_eq!(reply["error"]["message"], "not allowed");
    assert_eq!(std::fs::read_to_string(&ran).unwrap(), "12\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn max_concurrency_bounds_calls_of_one_handler() {
    let dir = tempfile::TempDir::new().unwrap();
    let lock = dir.path().join("lock");
    // Fails (exit 2) if another copy holds the lock: overlapping runs would be denied.
    let path = script(
        dir.path(),
        "exclusive.sh",
        &format!(
            "#!/bin/sh\ncat >/dev/null\nmkdir {l} 2>/dev/null || {{ echo overlap >&2; exit 2; }}\nsleep 0.2\nrmdir {l}\n",
            l = lock.display()
        ),
    );
    let config = format!(
        "{SERVER}{}",
        script_handler(
            "exclusive",
            &path.display().to_string(),
            "max_concurrency = 1\ntimeout = \"5s\""
        )
    );
    let sidecar = std::sync::Arc::new(Sidecar::start_in(dir, &config, &[]));
    let mut tasks = Vec::new();
    for i in 0..4 {
        let sidecar = sidecar.clone();
        tasks.push(tokio::spawn(async move {
            sidecar.send("clients.update", i, json!({})).await
        }));
    }
    for task in tasks {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, 200, "{body}");
    }

    // Waiting for a slot counts against the handler's timeout, and the error says so:
    // with three calls at once and room for one, the first runs, the others wait.
    let dir = tempfile::TempDir::new().unwrap();
    let slow = script(dir.path(), "slow.sh", "#!/bin/sh\nsleep 1\n");
    let config = format!(
        "{SERVER}{}",
        script_handler(
            "slow",
            &slow.display().to_string(),
            "max_concurrency = 1\ntimeout = \"1500ms\"\non_error = \"deny\""
        )
    );
    let sidecar = std::sync::Arc::new(Sidecar::start_in(dir, &config, &[]));
    let (a, b, c) = tokio::join!(
        sidecar.send("clients.update", 1, json!({})),
        sidecar.send("clients.update", 2, json!({})),
        sidecar.send("clients.update", 3, json!({}))
    );
    let mut outcomes: Vec<String> = [a, b, c]
        .into_iter()
        .map(|(status, body)| match status {
            200 => "allowed".to_owned(),
            _ => body["error"]["message"].as_str().unwrap().to_owned(),
        })
        .collect();
    outcomes.sort();
    assert_eq!(outcomes[0], "allowed", "{outcomes:?}");
    for denied in &outcomes[1..] {
        assert!(
            denied.starts_with("handler failed: ")
                && denied.contains("free slot")
                && denied.contains("(max_concurrency = 1)"),
            "{outcomes:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_script_output_is_an_error() {
    let dir = tempfile::TempDir::new().unwrap();
    let huge = script(
        dir.path(),
        "huge.sh",
        "#!/bin/sh\ncat >/dev/null\nhead -c 5000000 /dev/zero | tr '\\0' 'x'\n",
    );
    let garbage = script(dir.path(), "garbage.sh", "#!/bin/sh\necho 'ok then'\n");
    let missing = dir.path().join("does-not-exist.sh");
    let config = format!(
        "{SERVER}{}",
        script_handler("out", "PLACEHOLDER", "modifies = true\non_error = \"deny\"")
    );
    for (path, expected) in [
        (
            huge.display().to_string(),
            "stdout is larger than 4194304 bytes",
        ),
        (
            garbage.display().to_string(),
            "reply is not an envelope (body is not valid JSON",
        ),
        (missing.display().to_string(), "cannot start"),
    ] {
        let sidecar = Sidecar::start(&config.replace("PLACEHOLDER", &path));
        let (status, body) = sidecar.send("clients.update", 1, json!({})).await;
        assert_eq!(status, 403, "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{message}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_log_line_per_event_with_outcome_and_duration() {
    let echo = HandlerServer::echo().await;
    let config = format!("{SERVER}{}", http_handler("echo", &echo.url("/"), ""));
    let sidecar = Sidecar::start(&config);
    let (status, _) = sidecar.send("clients.update", 42, json!({})).await;
    assert_eq!(status, 200);
    let line = sidecar
        .wait_for_log(Duration::from_secs(5), |v| v["message"] == "event")
        .expect("an event log line");
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["event"], "clients.update");
    assert_eq!(line["object_id"], "42");
    assert_eq!(line["outcome"], "allowed");
    assert!(line["duration_ms"].as_f64().is_some(), "{line}");
    let call = sidecar
        .wait_for_log(Duration::from_secs(5), |v| {
            v["message"] == "handler allowed"
        })
        .expect("a debug line per handler call");
    assert_eq!(call["level"], "DEBUG");
    assert_eq!(call["handler"], "echo");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_the_event_in_flight_finish() {
    let slow = HandlerServer::start(|call| async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        reply(200, call.body)
    })
    .await;
    let config = format!("{SERVER}{}", http_handler("slow", &slow.url("/"), ""));
    let mut sidecar = Sidecar::start(&config);
    let client = http_client();
    let url = sidecar.url("/events");
    let body = envelope("clients.update", 1, json!({"k": "v"})).to_string();
    let in_flight = tokio::spawn(async move { client.post(url).body(body).send().await });
    // Signal once the handler has the request.
    for _ in 0..200 {
        if !slow.calls().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(slow.calls().len(), 1);
    sidecar.signal(nix::sys::signal::Signal::SIGTERM);
    // While it drains, a new event hears "not now", and readiness says so too.
    let mut refused = None;
    for _ in 0..100 {
        let response = http_client()
            .post(sidecar.url("/events"))
            .body(envelope("clients.update", 2, json!({})).to_string())
            .send()
            .await
            .unwrap();
        if response.status() == 503 {
            refused = Some(response);
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let refused = refused.expect("a new event during the drain gets 503");
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(refused.headers()["connection"], "close");
    let (status, _) = sidecar.get("/readyz").await;
    assert_eq!(status, 503, "not ready while draining");
    assert_eq!(
        slow.calls().len(),
        1,
        "the refused event reached no handler"
    );

    let response = in_flight
        .await
        .unwrap()
        .expect("the in-flight event is answered");
    assert_eq!(response.status(), 200);
    let status = sidecar
        .wait_exit(Duration::from_secs(10))
        .expect("provisiond exits after draining");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_quits_at_once() {
    let slow = HandlerServer::start(|call| async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        reply(200, call.body)
    })
    .await;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"30s\"\n{}",
        http_handler("slow", &slow.url("/"), "")
    );
    let mut sidecar = Sidecar::start(&config);
    let client = http_client();
    let url = sidecar.url("/events");
    let body = envelope("clients.update", 1, json!({})).to_string();
    let _in_flight = tokio::spawn(async move { client.post(url).body(body).send().await });
    for _ in 0..200 {
        if !slow.calls().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sidecar.signal(nix::sys::signal::Signal::SIGTERM);
    // The first signal drains (30 s grace): it says so, and new events hear "not now".
    sidecar
        .wait_for_log(Duration::from_secs(10), |r| {
            r["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("draining"))
        })
        .expect("the first signal starts draining");
    let (status, _) = sidecar.send("clients.update", 2, json!({})).await;
    assert_eq!(status, 503, "draining");
    assert!(sidecar.is_running(), "the first signal drains (30 s grace)");
    sidecar.signal(nix::sys::signal::Signal::SIGTERM);
    let status = sidecar
        .wait_exit(Duration::from_secs(5))
        .expect("the second signal quits at once");
    assert_eq!(status.code(), Some(143), "{status:?}");
}

/// A script named relative to the config file runs when the config itself is given by a
/// relative path (`-c sub/provisioning.toml`), as with an absolute one: the script runs
/// in the config's directory, where a path relative to provisiond's own directory names
/// no file.
#[tokio::test(flavor = "multi_thread")]
async fn a_relative_script_runs_under_a_config_given_by_a_relative_path() {
    let dir = tempfile::TempDir::new().unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir_all(sub.join("hooks")).unwrap();
    script(
        &sub.join("hooks"),
        "deny.sh",
        "#!/bin/sh\necho \"ran in $(basename \"$PWD\")\" >&2\nexit 1\n",
    );
    std::fs::write(
        sub.join("provisioning.toml"),
        format!(
            "{SERVER}[[handler]]\nname = \"deny\"\nevents = [\"*\"]\nstage = \"before\"\n\
             command = [\"hooks/deny.sh\"]\n"
        ),
    )
    .unwrap();
    let sidecar = Sidecar::spawn(dir, PathBuf::from("sub/provisioning.toml"), &[]);
    let (status, body) = sidecar.send("clients.update", 1, json!({})).await;
    assert_eq!(status, 403, "the script ran and refused: {body}");
    assert_eq!(body["error"]["message"], "ran in sub", "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bare_command_is_looked_up_in_the_path_of_the_handlers_env() {
    let dir = tempfile::TempDir::new().unwrap();
    for which in ["a", "b"] {
        let bin = dir.path().join(which);
        std::fs::create_dir_all(&bin).unwrap();
        script(
            &bin,
            "which-hook",
            &format!("#!/bin/sh\necho \"from {which}\" >&2\nexit 1\n"),
        );
    }
    let path_of = |first: &str| {
        format!(
            "{}:{}",
            dir.path().join(first).display(),
            std::env::var("PATH").unwrap()
        )
    };
    let handler = |env: &str| {
        format!(
            "{SERVER}[[handler]]\nname = \"which\"\nevents = [\"*\"]\nstage = \"before\"\n\
             command = [\"which-hook\"]\n{env}"
        )
    };
    let provisiond_path = path_of("a");
    // The script's own PATH, set in its env, is where its program is found.
    let own = format!("env = {{ PATH = {} }}\n", toml_str(path_of("b")));
    let sidecar = Sidecar::start_in(
        tempfile::TempDir::new().unwrap(),
        &handler(&own),
        &[("PATH", &provisiond_path)],
    );
    let (status, body) = sidecar.send("clients.update", 1, json!({})).await;
    assert_eq!(
        (status, &body["error"]["message"]),
        (403, &json!("from b")),
        "{body}"
    );
    // Without one, provisiond's.
    let sidecar = Sidecar::start_in(
        tempfile::TempDir::new().unwrap(),
        &handler(""),
        &[("PATH", &provisiond_path)],
    );
    let (status, body) = sidecar.send("clients.update", 1, json!({})).await;
    assert_eq!(
        (status, &body["error"]["message"]),
        (403, &json!("from a")),
        "{body}"
    );
}
