//! Byte fidelity: handlers and the billing get the billing's bytes unchanged while no
//! handler modified the data, and numbers keep their exact value when the data is
//! written again (a `modifies = true` handler).

use std::time::Duration;

use crate::common::*;

/// Whitespace, key order, numbers no double holds, `-0`, unicode escapes, a duplicate-free
/// but unsorted object: everything a re-serialisation would change.
const ODD: &str = "{ \"data\" : {\"z\":1, \"big\": 123456789012345678901234567890,\n\
  \"neg_zero\": -0, \"huge\": 1e400, \"exp\": 1.50E+3, \"float\": 0.10000000000000000001,\n\
  \"esc\": \"caf\\u00e9 \\u2603 \\/ \\ud83d\\ude00\", \"a\": [ ]},\n\
  \"event\": {\"object_id\": 12, \"events_id\": \"clients.update\",\n\
  \"dt\": \"2026-11-26T10:00:00+00:00\"}, \"extra\": 1.0 }";

/// The numbers of [`ODD`] as a re-serialisation writes them: the same digits, the same
/// value (serde_json only spells an exponent `e+`).
const NUMBERS: &[&str] = &[
    "123456789012345678901234567890",
    "-0",
    "1e+400",
    "1.50e+3",
    "0.10000000000000000001",
    "1.0",
];

fn before(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[handler]]\nname = \"{name}\"\nevents = [\"*\"]\nstage = \"before\"\nurl = {}\n{extra}\n",
        toml_str(url)
    )
}

async fn post_raw(sidecar: &Sidecar, body: &str) -> (u16, String) {
    let response = sidecar
        .client()
        .post(sidecar.url("/events"))
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

async fn delivered(handler: &HandlerServer) -> Recorded {
    assert!(
        eventually(Duration::from_secs(10), || !handler.calls().is_empty()).await,
        "the after-stage handler was called"
    );
    handler.calls().remove(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn unmodified_data_reaches_every_handler_and_the_billing_byte_for_byte() {
    let dir = tempfile::TempDir::new().unwrap();
    let seen = dir.path().join("stdin.json");
    let copy = script(
        dir.path(),
        "copy.sh",
        &format!(
            "#!/bin/sh\ncat > {}\n",
            toml_str(seen.display().to_string())
        ),
    );
    let plain = HandlerServer::fixed(200, "").await;
    let after = HandlerServer::fixed(200, "").await;
    let config = format!(
        "{SERVER}{}{}[[handler]]\nname = \"script\"\nevents = [\"*\"]\nstage = \"before\"\n\
         priority = 200\ncommand = [{}]\n\n{}",
        before(
            "filtered",
            &plain.url("/plain"),
            "match = { \"data.z\" = 1 }\nwhen = 'data.big > 1.0e29'"
        ),
        before("empty-reply", &plain.url("/empty"), "modifies = true"),
        toml_str(copy.display().to_string()),
        after_handler("after", &after.url("/after"), ""),
    );
    // An empty reply from a modifying handler keeps the data as it was.
    let sidecar = Sidecar::start_in(dir, &config, &[]);
    let (status, reply) = post_raw(&sidecar, ODD).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply, ODD, "the billing gets its own bytes back");

    let calls = plain.calls();
    assert_eq!(calls.len(), 2, "the filters passed on the big number");
    for call in &calls {
        assert_eq!(String::from_utf8_lossy(&call.body), ODD, "{}", call.path);
    }
    assert_eq!(std::fs::read_to_string(&seen).unwrap(), ODD, "the script");
    let delivery = delivered(&after).await;
    assert_eq!(
        String::from_utf8_lossy(&delivery.body),
        ODD,
        "the after stage"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_echo_changes_nothing() {
    let echo = HandlerServer::echo().await;
    let next = HandlerServer::fixed(200, "").await;
    let config = format!(
        "{SERVER}{}{}",
        before("echo", &echo.url("/echo"), "modifies = true\npriority = 1"),
        before("next", &next.url("/next"), "priority = 2"),
    );
    let sidecar = Sidecar::start(&config);
    let (status, reply) = post_raw(&sidecar, ODD).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply, ODD);
    assert_eq!(String::from_utf8_lossy(&next.calls()[0].body), ODD);
    let line = sidecar
        .wait_for_log(Duration::from_secs(5), |l| l["message"] == "event")
        .expect("the event's log line");
    assert_eq!(line["modified"], false, "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn rewritten_data_keeps_every_number_exactly() {
    // Not byte for byte an echo (that would change nothing): the same envelope after a
    // newline, which must be parsed and written again.
    let echo = HandlerServer::start(|call| async move {
        let mut body = b"\n".to_vec();
        body.extend_from_slice(&call.body);
        reply(200, body)
    })
    .await;
    let next = HandlerServer::fixed(200, "").await;
    let after = HandlerServer::fixed(200, "").await;
    let config = format!(
        "{SERVER}{}{}{}",
        before("echo", &echo.url("/echo"), "modifies = true\npriority = 1"),
        before("next", &next.url("/next"), "priority = 2"),
        after_handler("after", &after.url("/after"), ""),
    );
    let sidecar = Sidecar::start(&config);
    let (status, reply) = post_raw(&sidecar, ODD).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(String::from_utf8_lossy(&echo.calls()[0].body), ODD);

    // The data is written again; `event`, which no handler changes, is not.
    let start = ODD.find("{\"object_id\"").unwrap();
    let end = ODD.find("+00:00\"}").unwrap() + "+00:00\"}".len();
    let event = &ODD[start..end];
    assert!(event.contains('\n'), "{event}");
    let next_body = String::from_utf8_lossy(&next.calls()[0].body).into_owned();
    let delivery = delivered(&after).await;
    let after_body = String::from_utf8_lossy(&delivery.body).into_owned();
    for (whose, text) in [
        ("the reply", &reply),
        ("the next handler", &next_body),
        ("the after stage", &after_body),
    ] {
        for number in NUMBERS {
            assert!(
                text.contains(&format!(": {number}")) || text.contains(&format!(":{number}")),
                "{whose} lost {number}: {text}"
            );
        }
        assert!(
            text.contains(event),
            "{whose} has the billing's `event` bytes: {text}"
        );
        let value: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(value["data"]["esc"], "café ☃ / 😀", "{whose}");
        assert_eq!(value["data"]["z"], 1, "{whose}");
    }
}
