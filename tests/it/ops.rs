//! Operations and security: auth, unix socket, signing, limits, logs, secrets, `send`.

use std::time::Duration;

use crate::common::*;
use serde_json::{Value, json};

fn http_handler(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[handler]]\nname = \"{name}\"\nevents = [\"*\"]\nstage = \"before\"\nurl = {}\n{extra}\n",
        toml_str(url)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_token_guards_events_and_the_admin_api_but_not_health() {
    let echo = HandlerServer::echo().await;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ntoken = \"${{PROVISIOND_TOKEN}}\"\n{}",
        http_handler("echo", &echo.url("/"), "")
    );
    let sidecar = Sidecar::start_in(
        tempfile::TempDir::new().unwrap(),
        &config,
        &[("PROVISIOND_TOKEN", "t-0123456789")],
    );
    let body = envelope("clients.update", 1, json!({})).to_string();
    let client = http_client();
    let post = |auth: Option<&str>| {
        let mut request = client.post(sidecar.url("/events")).body(body.clone());
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        request.send()
    };
    let response = post(None).await.unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let reply: Value = response.json().await.unwrap();
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("token")
    );
    assert_eq!(post(Some("Bearer wrong")).await.unwrap().status(), 401);
    assert_eq!(
        post(Some("Bearer t-012345678")).await.unwrap().status(),
        401
    );
    assert_eq!(post(Some("t-0123456789")).await.unwrap().status(), 401);
    assert!(
        echo.calls().is_empty(),
        "no handler runs for a refused request"
    );
    assert_eq!(
        post(Some("Bearer t-0123456789")).await.unwrap().status(),
        200
    );
    assert_eq!(echo.calls().len(), 1);

    let (status, _) = sidecar.get("/v1/config").await;
    assert_eq!(status, 401, "the admin API needs the token");
    let (status, _) = sidecar.get("/healthz").await;
    assert_eq!(status, 200, "health stays open");
    let (status, ready) = sidecar.get("/readyz").await;
    assert_eq!(status, 200, "readiness stays open: {ready}");
    assert_eq!(ready["generation"], 1);
    let (status, _) = sidecar.get("/metrics").await;
    assert_eq!(status, 200, "metrics stay open");
    // The four refused events are counted and logged (a billing with a wrong token
    // fails every event); the admin API's refusal is no event.
    let counted = scrape(&sidecar).await;
    assert_eq!(
        sample(
            &counted,
            "provisiond_events_total",
            &[("event", "unparsed"), ("outcome", "unauthorized")]
        ),
        4.0
    );
    let refused = || {
        sidecar
            .logs()
            .iter()
            .filter(|l| l.contains("an event refused: missing or wrong token (401)"))
            .count()
    };
    assert!(
        eventually(Duration::from_secs(10), || refused() == 4).await,
        "{:#?}",
        sidecar.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_full_flow_over_a_unix_socket() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let dir = tempfile::TempDir::new().unwrap();
    let socket = dir.path().join("provisiond.sock");
    // A stale socket file from an earlier run is replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let echo = HandlerServer::echo().await;
    let config = format!(
        "[server]\nlisten = \"unix:{}\"\n{}",
        socket.display(),
        http_handler("echo", &echo.url("/"), "modifies = true")
    );
    let sidecar = Sidecar::start_in(dir, &config, &[]);
    assert_eq!(sidecar.addr, format!("unix:{}", socket.display()));
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);

    let (status, body) = sidecar
        .send("clients.create", 5, json!({"name": "x"}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["name"], "x");
    assert_eq!(echo.calls().len(), 1);
    let (status, _) = sidecar.get("/healthz").await;
    assert_eq!(status, 200);

    // `send` reaches it through the config's listen address.
    let out = std::process::Command::new(binary())
        .args(["send", "clients.update", "--object-id", "6", "-c"])
        .arg(&sidecar.config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["event"]["object_id"], 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_store_file_is_readable_by_its_owner_only_and_one_open_to_all_gets_a_warning() {
    use std::os::unix::fs::PermissionsExt;
    // It holds the billing's envelopes and the handlers' replies: no other local user
    // may read them, whatever the umask (0022 as a rule) would give.
    let dir = tempfile::TempDir::new().unwrap();
    let store = dir.path().join("state.redb");
    let sidecar = Sidecar::start_in(
        dir,
        &format!(
            "{SERVER}[store]\npath = {}\n",
            toml_str(store.display().to_string())
        ),
        &[],
    );
    let (status, _) = sidecar.get("/readyz").await;
    assert_eq!(status, 200);
    let mode = std::fs::metadata(&store).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "store file mode {:o}", mode & 0o777);
    assert!(
        !sidecar.logs().iter().any(|l| l.contains("chmod 600")),
        "no warning for a file of its own making"
    );

    // A file another version or an operator left readable by all keeps its mode (it may
    // be deliberate) and gets a warning that names it.
    let (dir, config, _) = sidecar.terminate();
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o644)).unwrap();
    let sidecar = Sidecar::spawn(dir, config, &[]);
    let (status, _) = sidecar.get("/readyz").await;
    assert_eq!(status, 200);
    let warning = sidecar
        .wait_for_log(Duration::from_secs(5), |l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("chmod 600"))
        })
        .expect("a warning about the store file's mode");
    assert_eq!(warning["level"], "WARN", "{warning}");
    assert_eq!(warning["mode"], "0644", "{warning}");
    assert_eq!(warning["store"], store.display().to_string(), "{warning}");
    let mode = std::fs::metadata(&store).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o644, "an existing file keeps its mode");
}

/// A config listening on the unix socket `socket`, with its store at `store`.
fn on_socket(socket: &std::path::Path, store: &str) -> String {
    format!(
        "[server]\nlisten = \"unix:{}\"\n[store]\npath = {}\n",
        socket.display(),
        toml_str(store)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_instance_never_removes_the_socket_of_a_live_one() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::TempDir::new().unwrap();
    let socket = dir.path().join("provisiond.sock");
    let first = Sidecar::start_in(dir, &on_socket(&socket, "first.db"), &[]);
    let inode = std::fs::metadata(&socket).unwrap().ino();

    // The same file again: same socket, same store. It must not start, and must leave
    // the first one's socket alone.
    let (code, _, stderr) = run_binary(
        first.dir.path(),
        &[
            "run",
            "--log-format",
            "json",
            "-c",
            first.config_path.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "another provisiond is listening on {}",
            socket.display()
        )),
        "{stderr}"
    );
    // Another store, same socket: refused the same way, before its store is opened.
    let other = first.dir.path().join("other.toml");
    std::fs::write(&other, on_socket(&socket, "other.db")).unwrap();
    let (code, _, stderr) = run_binary(
        first.dir.path(),
        &["run", "--log-format", "json", "-c", other.to_str().unwrap()],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("another provisiond is listening"),
        "{stderr}"
    );
    assert!(
        !first.dir.path().join("other.db").exists(),
        "it opened its store"
    );

    assert_eq!(std::fs::metadata(&socket).unwrap().ino(), inode);
    let (status, _) = first.get("/healthz").await;
    assert_eq!(status, 200, "the first instance is still reachable");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopping_instance_removes_only_the_socket_it_created() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::TempDir::new().unwrap();
    let socket = dir.path().join("provisiond.sock");
    let first = Sidecar::start_in(dir, &on_socket(&socket, "first.db"), &[]);
    // Someone removes the first one's socket, and a second instance (its own store)
    // takes the path.
    std::fs::remove_file(&socket).unwrap();
    let second_dir = tempfile::TempDir::new().unwrap();
    let second = Sidecar::start_in(second_dir, &on_socket(&socket, "second.db"), &[]);
    let inode = std::fs::metadata(&socket).unwrap().ino();

    let (first_dir, _, status) = first.terminate();
    assert!(status.success(), "{status:?}");
    assert_eq!(
        std::fs::metadata(&socket).map(|m| m.ino()).ok(),
        Some(inode),
        "the first instance removed the second one's socket"
    );
    let (status, _) = second.get("/healthz").await;
    assert_eq!(status, 200);

    // Its own socket it removes when it stops.
    let (_second_dir, _, status) = second.terminate();
    assert!(status.success(), "{status:?}");
    assert!(!socket.exists());
    drop(first_dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn signed_requests_verify_with_an_independent_verifier() {
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let echo = HandlerServer::echo().await;
    let config = format!(
        "{SERVER}{}",
        http_handler("signed", &echo.url("/"), "secret = \"${HOOK_SECRET}\"")
    );
    let sidecar = Sidecar::start_in(
        tempfile::TempDir::new().unwrap(),
        &config,
        &[("HOOK_SECRET", secret)],
    );
    let (status, _) = sidecar.send("clients.update", 1, json!({"a": 1})).await;
    assert_eq!(status, 200);
    let (status, _) = sidecar.send("clients.update", 1, json!({"a": 1})).await;
    assert_eq!(status, 200);
    let calls = echo.calls();
    let verifier = standardwebhooks::Webhook::new(secret).unwrap();
    for call in &calls {
        verifier
            .verify(&call.body, &call.headers)
            .expect("the signature verifies");
        assert!(call.header("webhook-signature").unwrap().starts_with("v1,"));
    }
    assert_ne!(
        calls[0].header("webhook-id"),
        calls[1].header("webhook-id"),
        "two events are two messages"
    );
    // A tampered body, or a signature for another key, does not verify.
    let mut tampered = calls[0].body.to_vec();
    tampered[10] ^= 1;
    assert!(verifier.verify(&tampered, &calls[0].headers).is_err());
    let other = standardwebhooks::Webhook::new("whsec_QUJDREVGR0hJSktMTU5PUFFSU1RVVldY").unwrap();
    assert!(other.verify(&calls[0].body, &calls[0].headers).is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_from_the_environment_never_reach_the_logs() {
    let failing = HandlerServer::fixed(500, "boom").await;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ntoken = \"${{TOKEN}}\"\n{}{}",
        http_handler(
            "crm",
            &format!("{}?key=${{CRM_KEY}}", failing.url("/hook")),
            "headers = { Authorization = \"Bearer ${CRM_KEY}\" }\nsecret = \"${HOOK_SECRET}\""
        ),
        http_handler("down", "http://user:${CRM_PASS}@127.0.0.1:1/x", "")
    );
    let secrets = [
        ("TOKEN", "tok-AAAA1111"),
        ("CRM_KEY", "key-BBBB2222"),
        ("CRM_PASS", "pass-CCCC3333"),
        ("HOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
    ];
    let sidecar = Sidecar::start_in(tempfile::TempDir::new().unwrap(), &config, &secrets);
    let response = http_client()
        .post(sidecar.url("/events"))
        .bearer_auth("tok-AAAA1111")
        .body(envelope("clients.update", 1, json!({})).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "both handlers fail under on_error = allow"
    );
    assert_eq!(failing.calls().len(), 1);
    assert_eq!(
        failing.calls()[0].header("authorization"),
        Some("Bearer key-BBBB2222"),
        "the handler does get the secret"
    );
    let logs = sidecar
        .wait_for_log(Duration::from_secs(5), |v| v["message"] == "event")
        .map(|_| sidecar.logs().join("\n"))
        .unwrap();
    assert!(logs.contains("handler failed"), "{logs}");
    for (_, value) in secrets {
        assert!(
            !logs.contains(value),
            "{value} leaked into the logs:\n{logs}"
        );
    }
}

/// What a handler answers is kept (execution log excerpts and errors, dead letters, log
/// lines); a handler that echoes its request, or a script that prints its environment,
/// would put the config's secrets there. They are masked.
#[tokio::test(flavor = "multi_thread")]
async fn secrets_a_handler_echoes_back_are_masked_in_what_is_kept_of_its_reply() {
    use std::os::unix::fs::PermissionsExt as _;
    let secrets = [
        ("CRM_KEY", "key-BBBB2222"),
        ("SCRIPT_PASS", "pass-CCCC3333"),
    ];
    // Answers with the request's headers: 500 in the before stage, 410 in the after.
    let echo_headers = |status: u16| {
        HandlerServer::start(move |call| async move {
            let headers: Vec<String> = call
                .headers
                .iter()
                .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
                .collect();
            reply(status, headers.join("\n"))
        })
    };
    let before = echo_headers(500).await;
    let after = echo_headers(410).await;
    let dir = tempfile::TempDir::new().unwrap();
    let script = dir.path().join("show-env.sh");
    std::fs::write(&script, "#!/bin/sh\nenv >&2\nexit 1\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let auth = "headers = { Authorization = \"Bearer ${CRM_KEY}\" }";
    let config = format!(
        "{SERVER}{}{}[[handler]]\nname = \"show-env\"\nevents = [\"clients.delete\"]\nstage = \"before\"\n\
         command = [{}]\nenv = {{ PASS = \"${{SCRIPT_PASS}}\" }}\n",
        http_handler("crm", &before.url("/"), auth),
        after_handler("crm-after", &after.url("/"), auth),
        toml_str(script.display().to_string()),
    );
    let sidecar = Sidecar::start_in(dir, &config, &secrets);
    let (status, _) = sidecar.send("clients.update", 7, json!({})).await;
    assert_eq!(status, 200, "crm fails under on_error = allow");
    // A script that exits non-zero forbids, its stderr the message the billing shows.
    let (status, denied) = sidecar.send("clients.delete", 7, json!({})).await;
    assert_eq!(status, 403, "{denied}");
    let message = denied["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("PASS=***"), "{denied}");
    assert_eq!(
        before.calls()[0].header("authorization"),
        Some("Bearer key-BBBB2222"),
        "the handler does get the secret"
    );

    let letters = eventually(Duration::from_secs(10), || after.calls().len() == 1).await;
    assert!(letters, "the after-stage handler was called");
    let dead = sidecar
        .get_until("/v1/deadletters", Duration::from_secs(5), |body| {
            body["deadletters"]
                .as_array()
                .is_some_and(|l| !l.is_empty())
        })
        .await;
    let reason = dead["deadletters"][0]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains("authorization: Bearer ***"), "{dead}");

    let rows = sidecar
        .get_until("/v1/executions", Duration::from_secs(5), |body| {
            body["executions"].as_array().is_some_and(|r| r.len() >= 4)
        })
        .await;
    let by = |handler: &str| {
        rows["executions"]
            .as_array()
            .and_then(|r| r.iter().find(|row| row["handler"] == handler))
            .cloned()
            .unwrap_or_else(|| panic!("no row of {handler}: {rows}"))
    };
    let crm = by("crm");
    assert!(
        crm["excerpt"]
            .as_str()
            .unwrap()
            .contains("authorization: Bearer ***"),
        "{crm}"
    );
    assert!(
        crm["error"].as_str().unwrap().contains("Bearer ***"),
        "{crm}"
    );
    let script = by("show-env");
    assert!(
        script["excerpt"].as_str().unwrap().contains("PASS=***"),
        "{script}"
    );
    let crm_after = by("crm-after");
    assert!(
        crm_after["excerpt"]
            .as_str()
            .unwrap()
            .contains("Bearer ***"),
        "{crm_after}"
    );

    let kept = format!("{denied}\n{dead}\n{rows}\n{}", sidecar.logs().join("\n"));
    for (_, value) in secrets {
        assert!(!kept.contains(value), "{value} was kept:\n{kept}");
    }
}

/// A RUST_LOG that does not parse is said in the log's own format (not as plain text
/// before it), and logging goes on at info.
#[test]
fn a_bad_rust_log_is_a_log_line_and_logging_goes_on_at_info() {
    use std::io::BufRead as _;
    let dir = tempfile::TempDir::new().unwrap();
    std::fs::write(dir.path().join("p.toml"), SERVER).unwrap();
    let mut child = std::process::Command::new(binary())
        .args(["run", "-c", "p.toml", "--no-watch", "--log-format", "json"])
        .current_dir(dir.path())
        .env("RUST_LOG", "foo=[[")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    // The first lines: the warning, then info lines (the listener's) as usual.
    let lines: Vec<Value> = stderr
        .lines()
        .take_while(|line| line.as_ref().is_ok_and(|l| !l.contains("\"listening\"")))
        .map(|line| serde_json::from_str(&line.unwrap()).expect("every line is JSON"))
        .collect();
    child.kill().unwrap();
    child.wait().unwrap();
    let warning = &lines[0];
    assert_eq!(
        warning["message"], "ignoring RUST_LOG; logging at info",
        "{lines:?}"
    );
    assert_eq!(warning["level"], "WARN");
    assert_eq!(warning["rust_log"], "foo=[[");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_log_line_of_an_event_carries_its_id() {
    let echo = HandlerServer::echo().await;
    let config = format!("{SERVER}{}", http_handler("echo", &echo.url("/"), ""));
    let sidecar = Sidecar::start(&config);
    let response = sidecar
        .client()
        .post(sidecar.url("/events"))
        .body(envelope("clients.update", 1, json!({})).to_string())
        .send()
        .await
        .unwrap();
    let id = response.headers()["x-provisioning-event-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(id.starts_with("evt_"), "{id}");
    sidecar
        .wait_for_log(Duration::from_secs(5), |v| v["message"] == "event")
        .unwrap();
    let lines: Vec<Value> = sidecar
        .log_records()
        .into_iter()
        .filter(|v| v["message"] == "event" || v["message"] == "handler allowed")
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    for line in lines {
        assert_eq!(line["span"]["id"], id.as_str(), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_reads_its_replies_is_cut_off() {
    use tokio::io::AsyncWriteExt;
    // One connection allowed: a client that pipelines requests and never reads the
    // replies must not keep it, or the billing's events wait in the backlog for good.
    let sidecar = Sidecar::start(&format!(
        "{SERVER}max_connections = 1\nheader_timeout = \"1s\"\n"
    ));
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut greedy = socket.connect(sidecar.addr.parse().unwrap()).await.unwrap();
    // Far more reply (the console's script, 500 times) than the sockets' buffers hold.
    let requests = b"GET /ui/console.js HTTP/1.1\r\nHost: x\r\n\r\n".repeat(500);
    let writer = tokio::spawn(async move {
        let _ = greedy.write_all(&requests).await;
        // Held open, never read.
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(greedy);
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The greedy client holds its connection for 30 s unless it is cut off.
    let healthz = healthz_on_a_new_connection(&sidecar.addr, Duration::from_secs(10))
        .await
        .expect("the connection a client holds by not reading is freed");
    assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");
    writer.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_header_client_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sidecar = Sidecar::start("[server]\nlisten = \"127.0.0.1:0\"\nheader_timeout = \"1s\"\n");
    let mut stream = tokio::net::TcpStream::connect(&sidecar.addr).await.unwrap();
    stream
        .write_all(b"POST /events HTTP/1.1\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    // One header byte every 200 ms: never finishing the headers.
    let mut closed = false;
    for _ in 0..40 {
        if stream.write_all(b"X").await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => {
                // A 408 reply before the close is fine.
            }
            Err(_) => {}
        }
    }
    assert!(closed, "the connection is still open after 8 s");
    assert!(started.elapsed() < Duration::from_secs(5));
    let (status, _) = sidecar.get("/healthz").await;
    assert_eq!(status, 200, "still serving others");
}

#[tokio::test(flavor = "multi_thread")]
async fn over_the_in_flight_cap_the_billing_gets_503_and_the_sidecar_recovers() {
    let slow = HandlerServer::start(|call| async move {
        tokio::time::sleep(Duration::from_millis(600)).await;
        reply(200, call.body)
    })
    .await;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_in_flight = 2\n{}",
        http_handler("slow", &slow.url("/"), "")
    );
    let sidecar = std::sync::Arc::new(Sidecar::start(&config));
    let mut tasks = Vec::new();
    for i in 0..6 {
        let sidecar = sidecar.clone();
        tasks.push(tokio::spawn(async move {
            let response = sidecar
                .client()
                .post(sidecar.url("/events"))
                .body(envelope("clients.update", i, json!({})).to_string())
                .send()
                .await
                .unwrap();
            let retry_after = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            (response.status().as_u16(), retry_after)
        }));
    }
    let mut ok = 0;
    let mut busy = 0;
    for task in tasks {
        match task.await.unwrap() {
            (200, _) => ok += 1,
            (503, Some(retry_after)) => {
                assert_eq!(retry_after, "1");
                busy += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(ok + busy, 6);
    assert!(ok >= 2 && busy >= 1, "ok {ok}, busy {busy}");
    assert!(
        slow.calls().len() <= ok,
        "a refused event reaches no handler"
    );
    let (status, _) = sidecar.send("clients.update", 9, json!({})).await;
    assert_eq!(status, 200, "recovers once the events in flight are done");
}

#[tokio::test(flavor = "multi_thread")]
async fn deeply_nested_json_is_refused_before_parsing() {
    let config = "[server]\nlisten = \"127.0.0.1:0\"\nmax_depth = 8\n";
    let sidecar = Sidecar::start(config);
    let nested = format!(
        r#"{{"event": {{"events_id": "clients.update"}}, "data": {{"x": {}1{}}}}}"#,
        "[".repeat(10),
        "]".repeat(10)
    );
    let (status, body) = sidecar.post(nested).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["message"], "body nests deeper than 8 levels");
    let (status, _) = sidecar.send("clients.update", 1, json!({"x": [[1]]})).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn send_posts_an_envelope_and_prints_the_reply() {
    let guard = HandlerServer::start(|call| async move {
        let envelope = call.json();
        if envelope["data"]["name"] == "blocked" {
            reply(403, r#"{"message": "name is blocked"}"#)
        } else {
            reply(200, call.body)
        }
    })
    .await;
    let config = format!("{SERVER}{}", http_handler("guard", &guard.url("/"), ""));
    let sidecar = Sidecar::start(&config);
    let data = sidecar.dir.path().join("data.json");
    std::fs::write(&data, r#"{"name": "ok"}"#).unwrap();
    let run = |data_arg: &str, stdin: Option<&str>| {
        use std::io::Write;
        let mut child = std::process::Command::new(binary())
            .args([
                "send",
                "clients.create",
                "--object-id",
                "12",
                "--data",
                data_arg,
            ])
            .args(["--url", &format!("http://{}", sidecar.addr)])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    };
    let out = run(&data.display().to_string(), None);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 200"));
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["event"]["events_id"], "clients.create");
    assert_eq!(reply["event"]["object_id"], 12);
    assert!(reply["event"]["dt"].as_str().unwrap().starts_with("20"));
    assert_eq!(reply["data"], json!({"name": "ok"}));

    let out = run("-", Some(r#"{"name": "blocked"}"#));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("HTTP 403"));
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["error"]["message"], "name is blocked");

    let out = run("-", Some("[1]"));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the data must be a JSON object, got an array"),
        "{stderr}"
    );

    // The JSON itself where a file is expected: said so, with what to write instead.
    let out = run(r#"{"name": "x"}"#, None);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--data takes a file, or - for stdin, not the JSON itself")
            && stderr.contains(r#"echo '{"name": "x"}' | provisiond ... --data -"#),
        "{stderr}"
    );
    let out = run("/nonexistent/client.json", None);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read the data from /nonexistent/client.json: No such file"),
        "{stderr}"
    );
}

/// Parses `/metrics` with an independent Prometheus text parser.
async fn scrape(sidecar: &Sidecar) -> prometheus_parse::Scrape {
    let response = sidecar
        .client()
        .get(sidecar.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = response.text().await.unwrap();
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines).unwrap_or_else(|e| panic!("{e}:\n{text}"))
}

/// The value of one sample, 0 when absent.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(ref buckets) => {
                buckets.last().map_or(0.0, |b| b.count)
            }
            _ => 0.0,
        })
        .sum()
}

/// A handler that was not called (its filter failed, or the event's deadline ran out
/// before its turn) counts an `error` call, and no time in its latency histogram: a
/// 0 s there would read as the fastest calls of all.
#[tokio::test(flavor = "multi_thread")]
async fn a_handler_not_called_counts_its_error_but_no_time() {
    let slow = HandlerServer::start(|call| async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        reply(200, call.body)
    })
    .await;
    let echo = HandlerServer::echo().await;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndeadline = \"500ms\"\n{}{}{}",
        http_handler(
            "strict",
            &echo.url("/strict"),
            "priority = 1\nwhen = 'data.email.endsWith(\"@x\")'"
        ),
        http_handler("slow", &slow.url("/"), "priority = 2\ntimeout = \"10s\""),
        http_handler("late", &echo.url("/late"), "priority = 3"),
    );
    let sidecar = Sidecar::start(&config);
    let (status, body) = sidecar.send("clients.update", 1, json!({})).await;
    // Both failures are skipped (on_error = "allow", the default): the event goes on.
    assert_eq!(status, 200, "{body}");
    assert!(
        echo.calls().is_empty(),
        "neither strict nor late was called"
    );
    let metrics = scrape(&sidecar).await;
    let count = |handler: &str, outcome: &str| {
        sample(
            &metrics,
            "provisiond_handler_calls_total",
            &[("handler", handler), ("outcome", outcome)],
        )
    };
    let timed = |handler: &str| {
        sample(
            &metrics,
            "provisiond_handler_duration_seconds",
            &[("handler", handler)],
        )
    };
    assert_eq!(count("strict", "error"), 1.0);
    assert_eq!(count("slow", "error"), 1.0, "the deadline cut it");
    assert_eq!(count("late", "error"), 1.0);
    assert_eq!(
        timed("slow"),
        1.0,
        "a call made is timed, even one cut short"
    );
    assert_eq!(timed("strict"), 0.0, "a failed filter calls nothing");
    assert_eq!(
        timed("late"),
        0.0,
        "out of time before its turn, it was not called"
    );
    // The execution log still has a row for each, with what went wrong.
    let rows = sidecar
        .get_until("/v1/executions", Duration::from_secs(5), |body| {
            body["executions"].as_array().is_some_and(|r| r.len() >= 3)
        })
        .await;
    let errors: Vec<String> = rows["executions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{}: {}", r["handler"], r["error"]))
        .collect();
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("\"late\"") && e.contains("ran out before this handler")),
        "{errors:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_parse_as_prometheus_text_and_move_with_events() {
    let echo = HandlerServer::echo().await;
    let guard = HandlerServer::fixed(403, "no").await;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ntoken = \"t\"\n{}{}",
        http_handler("echo", &echo.url("/"), "priority = 1"),
        http_handler(
            "guard",
            &guard.url("/"),
            "priority = 2\nmatch = { \"data.block\" = true }"
        ),
    );
    let sidecar = Sidecar::start(&config);
    let before = scrape(&sidecar).await;
    assert_eq!(sample(&before, "provisiond_config_generation", &[]), 1.0);
    // What an operator alerts on exists from the start, at 0.
    for result in ["applied", "unchanged", "rejected"] {
        assert!(
            before
                .samples
                .iter()
                .any(|s| s.metric == "provisiond_reloads_total"
                    && s.labels.get("result") == Some(result)),
            "provisiond_reloads_total{{result={result:?}}} is missing at start"
        );
    }
    assert!(
        before
            .samples
            .iter()
            .any(|s| s.metric == "provisiond_execution_log_dropped_total")
    );
    assert_eq!(sample(&before, "provisiond_events_in_flight", &[]), 0.0);
    assert!(
        before
            .samples
            .iter()
            .any(|s| s.metric == "provisiond_before_chain_duration_seconds"),
        "the before-stage latency has a series before the first event"
    );
    for outcome in ["unauthorized", "unavailable"] {
        assert!(
            before
                .samples
                .iter()
                .any(|s| s.metric == "provisiond_events_total"
                    && s.labels.get("event") == Some("unparsed")
                    && s.labels.get("outcome") == Some(outcome)),
            "provisiond_events_total{{event=\"unparsed\",outcome={outcome:?}}} is missing at start"
        );
    }

    let client = sidecar.client();
    let post = |body: String| {
        client
            .post(sidecar.url("/events"))
            .bearer_auth("t")
            .body(body)
            .send()
    };
    for _ in 0..3 {
        let r = post(envelope("clients.update", 1, json!({})).to_string())
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = post(envelope("clients.update", 1, json!({"block": true})).to_string())
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = post(envelope("brand.new", 1, json!({})).to_string())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = post("nope".into()).await.unwrap();
    assert_eq!(r.status(), 400);

    let after = scrape(&sidecar).await;
    let events = |event, outcome| {
        sample(
            &after,
            "provisiond_events_total",
            &[("event", event), ("outcome", outcome)],
        )
    };
    assert_eq!(events("clients.update", "allowed"), 3.0);
    assert_eq!(events("clients.update", "denied"), 1.0);
    assert_eq!(
        events("other", "allowed"),
        1.0,
        "unknown names share one label"
    );
    assert_eq!(events("unparsed", "bad_request"), 1.0);
    let calls = |handler, outcome| {
        sample(
            &after,
            "provisiond_handler_calls_total",
            &[
                ("handler", handler),
                ("stage", "before"),
                ("outcome", outcome),
            ],
        )
    };
    assert_eq!(calls("echo", "allowed"), 5.0);
    assert_eq!(calls("guard", "denied"), 1.0);
    assert!(
        after
            .samples
            .iter()
            .any(|s| s.metric == "provisiond_handler_duration_seconds"
                && s.labels.get("handler") == Some("echo")),
        "a latency histogram per handler"
    );
    assert!(
        after
            .samples
            .iter()
            .any(|s| s.metric == "provisiond_before_chain_duration_seconds")
    );
}

/// The call series of each `(handler, stage)` in `scrape`, by outcome.
fn call_series(scrape: &prometheus_parse::Scrape, handler: &str, stage: &str) -> Vec<String> {
    let mut outcomes: Vec<String> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "provisiond_handler_calls_total")
        .filter(|s| {
            s.labels.get("handler") == Some(handler) && s.labels.get("stage") == Some(stage)
        })
        .map(|s| s.labels.get("outcome").unwrap_or_default().to_owned())
        .collect();
    outcomes.sort();
    outcomes
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handlers_call_series_exist_at_zero_before_its_first_call_and_after_a_reload_adds_it() {
    // An alert on `increase(provisiond_handler_calls_total{outcome="failed"}[5m]) > 0`
    // misses a first failure whose series appears already at 1.
    let down = HandlerServer::fixed(503, "busy").await;
    let config = format!("{SERVER}{}", http_handler("guard", &down.url("/"), ""));
    let sidecar = Sidecar::start(&config);
    let at_start = scrape(&sidecar).await;
    assert_eq!(
        call_series(&at_start, "guard", "before"),
        ["allowed", "denied", "error"],
        "before the first event"
    );
    assert_eq!(
        sample(
            &at_start,
            "provisiond_handler_calls_total",
            &[("handler", "guard")]
        ),
        0.0
    );

    let after = format!(
        "\n[[handler]]\nname = \"crm\"\nevents = [\"*\"]\nstage = \"after\"\nurl = {}\n",
        toml_str(down.url("/crm"))
    );
    std::fs::write(&sidecar.config_path, format!("{config}{after}")).unwrap();
    let (status, body) = sidecar.post_to("/v1/reload", "").await;
    assert_eq!(status, 200, "{body}");
    let reloaded = scrape(&sidecar).await;
    assert_eq!(sample(&reloaded, "provisiond_config_generation", &[]), 2.0);
    assert_eq!(
        call_series(&reloaded, "crm", "after"),
        ["dead", "delivered", "error", "failed"],
        "the handler the reload added, before its first call"
    );
    assert_eq!(
        sample(
            &reloaded,
            "provisiond_handler_calls_total",
            &[("handler", "crm")]
        ),
        0.0
    );

    // The first failure then moves a series that was at 0 (the before stage's default
    // `on_error` is "allow": the event goes on).
    let (status, body) = sidecar.send("clients.update", 1, json!({})).await;
    assert_eq!(status, 200, "{body}");
    let first = scrape(&sidecar).await;
    let calls = |handler, stage, outcome| {
        sample(
            &first,
            "provisiond_handler_calls_total",
            &[("handler", handler), ("stage", stage), ("outcome", outcome)],
        )
    };
    assert_eq!(calls("guard", "before", "error"), 1.0);
    assert_eq!(calls("guard", "before", "allowed"), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_billing_that_hangs_up_mid_body_is_counted_abandoned_and_logged_and_bad_chunks_are_bad_requests()
 {
    use tokio::io::AsyncWriteExt;
    let sidecar = Sidecar::start(SERVER);
    // 9 bytes of a declared 100, then the connection closes.
    let mut hung_up = tokio::net::TcpStream::connect(&sidecar.addr).await.unwrap();
    hung_up
        .write_all(b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"event\":")
        .await
        .unwrap();
    drop(hung_up);
    let line = sidecar.wait_for_log(Duration::from_secs(10), |l| {
        l["message"] == "the client hung up before the request body was complete"
    });
    assert!(line.is_some(), "{:#?}", sidecar.logs());
    // A chunk size that is no number: the request itself is bad.
    let mut bad = tokio::net::TcpStream::connect(&sidecar.addr).await.unwrap();
    bad.write_all(
        b"POST /events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut bad, &mut reply),
    )
    .await;
    let counted = scrape(&sidecar).await;
    let events = |outcome| {
        sample(
            &counted,
            "provisiond_events_total",
            &[("event", "unparsed"), ("outcome", outcome)],
        )
    };
    assert_eq!(events("abandoned"), 1.0);
    assert_eq!(
        events("bad_request"),
        1.0,
        "{}",
        String::from_utf8_lossy(&reply)
    );
    // The sidecar goes on.
    let (status, body) = sidecar.send("clients.update", 1, json!({})).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_over_the_cap_wait_until_one_closes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sidecar = Sidecar::start("[server]\nlisten = \"127.0.0.1:0\"\nmax_connections = 2\n");
    // Two clients hold their connections open without a request.
    let first = tokio::net::TcpStream::connect(&sidecar.addr).await.unwrap();
    let _second = tokio::net::TcpStream::connect(&sidecar.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A third connects (the kernel's backlog takes it) but is not served meanwhile.
    let mut third = tokio::net::TcpStream::connect(&sidecar.addr).await.unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let early = tokio::time::timeout(Duration::from_millis(700), third.read(&mut buf)).await;
    assert!(early.is_err(), "served over the cap: {early:?}");
    // One of the first two goes away: the third is served.
    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("served once a connection closed")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
}

/// The helpers that tests use for "nothing listens there" hold their ports: connecting
/// is refused, and a handler can still start there later.
#[tokio::test(flavor = "multi_thread")]
async fn reserved_test_ports_refuse_connections_and_can_host_a_handler_later() {
    let addr = free_addr();
    let refused = tokio::net::TcpStream::connect(addr).await.unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    let handler = HandlerServer::start_on(addr, |_| async { reply(200, "up") }).await;
    let answer = http_client().get(handler.url("/")).send().await.unwrap();
    assert_eq!(answer.text().await.unwrap(), "up");
}
