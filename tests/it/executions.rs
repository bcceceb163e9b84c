//! The execution log for people: a header row, `--output json|table`, lookup by the event
//! id the billing got back, and `--follow`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use serde_json::{Value, json};

fn config(echo: &HandlerServer, after: &HandlerServer) -> String {
    format!(
        "{SERVER}[[handler]]\nname = \"echo\"\nevents = [\"*\"]\nstage = \"before\"\nurl = {}\n\n{}",
        toml_str(echo.url("/")),
        after_handler("crm", &after.url("/"), "")
    )
}

/// Posts an event; its `X-Provisioning-Event-Id`.
async fn send(sidecar: &Sidecar, event: &str, id: i64) -> String {
    let response = sidecar
        .client()
        .post(sidecar.url("/events"))
        .body(envelope(event, id, json!({})).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.headers()["x-provisioning-event-id"]
        .to_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_are_found_by_event_id_under_a_header_or_as_json() {
    let echo = HandlerServer::echo().await;
    let crm = HandlerServer::fixed(200, "").await;
    let sidecar = Sidecar::start(&config(&echo, &crm));
    let url = format!("http://{}", sidecar.addr);
    let dir = sidecar.dir.path();
    let wanted = send(&sidecar, "clients.create", 1).await;
    let _other = send(&sidecar, "clients.create", 2).await;
    // Both calls of the event (before and after stage) are in the log within a second
    // or so.
    let mut rows = Vec::new();
    for _ in 0..200 {
        let (_, body) = sidecar
            .get(&format!("/v1/executions?event_id={wanted}"))
            .await;
        rows = body["executions"].as_array().unwrap().clone();
        if rows.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // (In the order they were written: the before stage's row can come second.)
    let mut handlers: Vec<&str> = rows
        .iter()
        .map(|r| r["handler"].as_str().unwrap())
        .collect();
    handlers.sort_unstable();
    assert_eq!(handlers, ["crm", "echo"], "{rows:?}");
    assert!(
        rows.iter()
            .all(|r| r["event_id"] == wanted.as_str() && r["object_id"] == "1")
    );

    let (code, out, err) = run_binary(dir, &["executions", "--event-id", &wanted, "--url", &url]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let header = lines[0];
    assert!(header.starts_with("TIME"), "{out}");
    for column in [
        "STAGE", "HANDLER", "EVENT", "OBJECT", "OUTCOME", "CODE", "DURATION",
    ] {
        assert!(header.contains(column), "{header}");
    }
    // Values sit under their column names.
    let at = |line: &str, column: &str| line.find(column).unwrap();
    let after = lines.iter().find(|l| l.contains(" crm ")).unwrap();
    let before = lines.iter().find(|l| l.contains(" echo ")).unwrap();
    assert_eq!(at(after, "after"), at(header, "STAGE"));
    assert_eq!(at(after, "crm"), at(header, "HANDLER"));
    assert_eq!(at(after, "delivered"), at(header, "OUTCOME"));
    assert_eq!(at(before, "echo"), at(header, "HANDLER"));
    assert_eq!(at(before, "allowed"), at(header, "OUTCOME"));

    for output in [&["--output", "json"][..], &["--json"]] {
        let args: Vec<&str> = ["executions", "--event-id", &wanted, "--url", &url]
            .into_iter()
            .chain(output.iter().copied())
            .collect();
        let (code, out, err) = run_binary(dir, &args);
        assert_eq!(code, 0, "{err}");
        let reply: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(reply["count"], 2, "{reply}");
        assert_eq!(reply["executions"][0]["event_id"], wanted.as_str());
    }
    let (code, _, err) = run_binary(dir, &["executions", "--output", "yaml", "--url", &url]);
    assert_eq!(code, 2);
    assert!(err.contains("[possible values: table, json]"), "{err}");
    let (code, _, _) = run_binary(
        dir,
        &["executions", "--output", "table", "--json", "--url", &url],
    );
    assert_eq!(code, 2, "--output and --json say the same thing once");

    // An id no row has: nothing, said on stderr.
    let (code, out, err) = run_binary(
        dir,
        &["executions", "--event-id", "evt_nope", "--url", &url],
    );
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (0, "", "no executions match\n")
    );
    let (status, body) = sidecar.get("/v1/executions?after=x").await;
    assert_eq!(status, 400);
    assert_eq!(
        body["error"]["message"],
        "after must be a row id (a whole number), got \"x\""
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn follow_prints_new_rows_as_they_come_oldest_first() {
    let echo = HandlerServer::echo().await;
    let crm = HandlerServer::fixed(200, "").await;
    let sidecar = Sidecar::start(&config(&echo, &crm));
    let url = format!("http://{}", sidecar.addr);
    send(&sidecar, "clients.update", 1).await;

    let mut child = Command::new(binary())
        .args(["executions", "--follow", "--handler", "echo", "--url", &url])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    {
        let lines = lines.clone();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                lines.lock().unwrap().push(line);
            }
        });
    }
    let rows_for = |n: usize| {
        let lines = lines.clone();
        move || {
            lines
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains(" echo "))
                .count()
                >= n
        }
    };
    // The row already there first (it reaches the log within about a second).
    assert!(
        eventually(Duration::from_secs(15), rows_for(1)).await,
        "{:?}",
        lines.lock().unwrap()
    );
    for id in 2..=4 {
        send(&sidecar, "clients.update", id).await;
    }
    let arrived = eventually(Duration::from_secs(15), rows_for(4)).await;
    let _ = child.kill();
    let _ = child.wait();
    let lines = lines.lock().unwrap().clone();
    assert!(arrived, "{lines:?}");
    assert!(lines[0].starts_with("TIME"), "one header first: {lines:?}");
    assert_eq!(lines.iter().filter(|l| l.starts_with("TIME")).count(), 1);
    // Oldest first, each row once.
    let objects: Vec<&str> = lines[1..]
        .iter()
        .map(|l| l.split_whitespace().nth(4).unwrap())
        .collect();
    assert_eq!(objects, ["1", "2", "3", "4"], "{lines:?}");
}

/// Runs `provisiond ARGS` in the background, collecting its stdout and stderr lines.
struct Running {
    child: std::process::Child,
    out: Arc<Mutex<Vec<String>>>,
    err: Arc<Mutex<Vec<String>>>,
}

impl Running {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(binary())
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let collect = |stream: Box<dyn std::io::Read + Send>| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let kept = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    kept.lock().unwrap().push(line);
                }
            });
            lines
        };
        let out = collect(Box::new(child.stdout.take().unwrap()));
        let err = collect(Box::new(child.stderr.take().unwrap()));
        Self { child, out, err }
    }

    async fn wait_for(&self, lines: &Arc<Mutex<Vec<String>>>, needle: &str) -> bool {
        let lines = lines.clone();
        let needle = needle.to_owned();
        eventually(Duration::from_secs(20), move || {
            lines.lock().unwrap().iter().any(|l| l.contains(&needle))
        })
        .await
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A sidecar on `config` with one event sent, and `executions -f` following it, the
/// event's row printed; and the sidecar's URL.
async fn following(config: &str) -> (Sidecar, Running, String) {
    let sidecar = Sidecar::start(config);
    let url = format!("http://{}", sidecar.addr);
    send(&sidecar, "clients.update", 1).await;
    let follow = Running::start(&["executions", "-f", "--url", &url]);
    assert!(follow.wait_for(&follow.out, "clients.update").await);
    (sidecar, follow, url)
}

#[tokio::test(flavor = "multi_thread")]
async fn follow_waits_for_a_sidecar_that_restarts() {
    let echo = HandlerServer::echo().await;
    let config = format!(
        "[server]\nlisten = \"{}\"\n[[handler]]\nname = \"echo\"\nevents = [\"*\"]\nstage = \"before\"\nurl = {}\n",
        free_addr(),
        toml_str(echo.url("/"))
    );
    let (sidecar, follow, url) = following(&config).await;

    let (dir, config_path) = sidecar.kill_9();
    assert!(
        follow.wait_for(&follow.err, "; still following").await,
        "{:?}",
        follow.err.lock().unwrap()
    );
    let sidecar = Sidecar::spawn(dir, config_path, &[]);
    send(&sidecar, "clients.delete", 2).await;
    assert!(
        follow.wait_for(&follow.out, "clients.delete").await,
        "{:?}\n{:?}\n{}",
        follow.out.lock().unwrap(),
        follow.err.lock().unwrap(),
        sidecar.logs().join("\n")
    );
    assert!(
        follow
            .wait_for(&follow.err, &format!("{url} answers again"))
            .await
    );
    let err = follow.err.lock().unwrap().clone();
    assert_eq!(
        err.iter().filter(|l| l.contains("still following")).count(),
        1,
        "said once: {err:?}"
    );
    // Each row once.
    let out = follow.out.lock().unwrap().clone();
    assert_eq!(
        out.iter().filter(|l| l.contains("clients.update")).count(),
        1,
        "{out:?}"
    );
}

/// Back from a restart, `--follow` goes on from the rows it had printed: the older
/// history it did not print (beyond `--limit`) stays unprinted.
#[tokio::test(flavor = "multi_thread")]
async fn follow_back_from_a_restart_prints_only_what_came_after_its_last_row() {
    let echo = HandlerServer::echo().await;
    let config = format!(
        "[server]\nlisten = \"{}\"\n[[handler]]\nname = \"echo\"\nevents = [\"*\"]\nstage = \"before\"\nurl = {}\n",
        free_addr(),
        toml_str(echo.url("/"))
    );
    let sidecar = Sidecar::start(&config);
    let url = format!("http://{}", sidecar.addr);
    for id in 1..=3 {
        send(&sidecar, "clients.archive", id).await;
    }
    send(&sidecar, "clients.update", 4).await;
    // The four rows in the log, so that `--limit 1` leaves three unprinted.
    let rows = sidecar
        .get_until("/v1/executions", Duration::from_secs(10), |v| {
            v["count"] == 4
        })
        .await;
    assert_eq!(rows["count"], 4, "{rows}");
    let follow = Running::start(&["executions", "-f", "--limit", "1", "--url", &url]);
    assert!(follow.wait_for(&follow.out, "clients.update").await);

    let (dir, config_path, status) = sidecar.terminate();
    assert!(status.success(), "{status}");
    assert!(follow.wait_for(&follow.err, "; still following").await);
    let sidecar = Sidecar::spawn(dir, config_path, &[]);
    send(&sidecar, "clients.delete", 5).await;
    assert!(follow.wait_for(&follow.out, "clients.delete").await);
    assert!(
        follow
            .wait_for(&follow.err, &format!("{url} answers again"))
            .await
    );
    let out = follow.out.lock().unwrap().clone();
    assert!(
        !out.iter().any(|l| l.contains("clients.archive")),
        "rows from before the first one printed: {out:?}"
    );
    assert_eq!(
        out.iter().filter(|l| l.contains("clients.update")).count(),
        1,
        "{out:?}"
    );
}

/// On PostgreSQL a row's id is taken when the row is written and the row is seen when
/// its transaction commits: another sidecar's row can come after newer ones, with a
/// lower id. `--follow` still prints it, once.
#[tokio::test(flavor = "multi_thread")]
async fn follow_prints_a_row_committed_late_with_a_lower_id_once() {
    use crate::common::pg::{self, PgServer};
    if !pg::installed() {
        return;
    }
    let db = PgServer::start();
    db.create_database("provisiond");
    let echo = HandlerServer::echo().await;
    let config = format!(
        "{SERVER}[store]\nbackend = \"postgres\"\nurl = {}\n\n[[handler]]\nname = \"echo\"\n\
         events = [\"*\"]\nstage = \"before\"\nurl = {}\n",
        toml_str(db.url("provisiond")),
        toml_str(echo.url("/"))
    );
    let (sidecar, follow, _) = following(&config).await;

    // Another writer (as another sidecar would) takes the next id and holds its
    // transaction open: a copy of the first row, for object 777.
    let late = db.connect("provisiond").await;
    let text: String = late
        .query_one(
            "SELECT row FROM provisiond.executions ORDER BY id LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let mut row: Value = serde_json::from_str(&text).unwrap();
    row["object_id"] = json!("777");
    late.batch_execute("BEGIN").await.unwrap();
    let id: i64 = late
        .query_one(
            "INSERT INTO provisiond.executions (at, handler, event, object_id, outcome, event_id, row) \
             SELECT at, handler, event, '777', outcome, NULL, $1 FROM provisiond.executions \
             ORDER BY id LIMIT 1 RETURNING id",
            &[&row.to_string()],
        )
        .await
        .unwrap()
        .get(0);
    // A newer row, with a higher id, is committed and printed first.
    send(&sidecar, "clients.delete", 2).await;
    assert!(
        follow.wait_for(&follow.out, "clients.delete").await,
        "{:?}",
        follow.out.lock().unwrap()
    );
    let (_, body) = sidecar.get("/v1/executions?limit=1").await;
    assert!(body["executions"][0]["id"].as_i64().unwrap() > id, "{body}");
    // Then the held row commits, a second later.
    tokio::time::sleep(Duration::from_secs(1)).await;
    late.batch_execute("COMMIT").await.unwrap();
    let printed = follow.wait_for(&follow.out, " 777 ").await;
    // And nothing is printed twice while the rows are asked for again.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let out = follow.out.lock().unwrap().clone();
    assert!(printed, "the late row is printed: {out:?}");
    let objects: Vec<&str> = out[1..]
        .iter()
        .map(|l| l.split_whitespace().nth(4).unwrap())
        .collect();
    assert_eq!(objects, ["1", "2", "777"], "{out:?}");
}
