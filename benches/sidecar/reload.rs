//! Reload: the time from the config file's rename to the new config serving events,
//! over 50 reloads; and, for comparison, `POST /v1/reload` (the reload without the
//! watcher's settle time).
//!
//! Each config generation `i` has a before-stage handler named `gen-i` that answers 403,
//! so an event's reply names the generation that served it. Beside it sit 30 handlers
//! with regex and CEL filters for another event, so that each reload compiles a
//! realistic file. After each rename, events are sent back to back until one is served
//! by the new generation.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::StatusCode;

use crate::common::{Row, Sidecar, Stats, client, ms, reply, start_server};

const RELOADS: usize = 50;
/// Longer than the watcher's settle time, so that two renames never merge into one
/// reload.
const PAUSE: Duration = Duration::from_millis(400);
/// Give up on one reload after this long (counted as an error).
const GIVE_UP: Duration = Duration::from_secs(5);

pub(crate) async fn run(scale: f64) -> Vec<Row> {
    let reloads = crate::common::scaled(RELOADS, scale, 10);
    let denier = start_denier();
    let sidecar = Sidecar::start(&config(denier, 0));
    let config_path = sidecar.dir().join("provisioning.toml");
    let events = sidecar.url("/events");
    let client = client();
    assert_eq!(served_by(&client, &events).await.as_deref(), Some("gen-0"));

    let mut watched = Stats {
        latencies: Vec::new(),
        errors: 0,
        elapsed: Duration::ZERO,
    };
    let started = Instant::now();
    for i in 1..=reloads {
        let want = format!("gen-{i}");
        let tmp = config_path.with_file_name(".provisioning.toml.tmp");
        std::fs::write(&tmp, config(denier, i)).unwrap();
        std::fs::rename(&tmp, &config_path).unwrap();
        // From the moment the new file is in place: the rename itself can stall on a
        // busy disk (the journal), which is the filesystem's time, not provisiond's.
        let renamed = Instant::now();
        loop {
            if served_by(&client, &events).await.as_deref() == Some(want.as_str()) {
                watched.latencies.push(renamed.elapsed());
                break;
            }
            if renamed.elapsed() > GIVE_UP {
                watched.errors += 1;
                break;
            }
            // About one event a millisecond: a steady stream, not a CPU hog competing
            // with the sidecar on a small machine.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(PAUSE).await;
    }
    watched.elapsed = started.elapsed();

    // The same reloads through the admin API: no settle time, so this is the reload
    // itself (read, validate, diff, publish) plus one HTTP round trip.
    let mut api = Stats {
        latencies: Vec::new(),
        errors: 0,
        elapsed: Duration::ZERO,
    };
    let reload = sidecar.url("/v1/reload");
    let started = Instant::now();
    for i in (reloads + 1)..=(2 * reloads) {
        std::fs::write(&config_path, config(denier, i)).unwrap();
        let sent = Instant::now();
        let ok = client
            .post(&reload)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        let took = sent.elapsed();
        if ok && served_by(&client, &events).await == Some(format!("gen-{i}")) {
            api.latencies.push(took);
        } else {
            api.errors += 1;
        }
    }
    api.elapsed = started.elapsed();

    let in_order: Vec<f64> = watched.latencies.iter().map(|d| ms(*d)).collect();
    eprintln!("rename to serving, ms, in order: {in_order:.1?}");
    let max = watched.latencies.iter().max().copied().unwrap_or_default();
    vec![
        watched.row(
            "7. reload, rename to serving (31 handlers)",
            "file watcher",
            format!(
                "{} reloads; includes the 200 ms settle time; max {:.1} ms",
                watched.latencies.len(),
                ms(max)
            ),
        ),
        api.row(
            "7. reload, POST /v1/reload (31 handlers)",
            "admin API",
            "read + validate + swap, one round trip",
        ),
    ]
}

/// Generation `i`: `gen-i` first for `clients.create`, 30 filtered handlers for
/// `clients.update`.
fn config(denier: SocketAddr, i: usize) -> String {
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[handler]]\nname = \"gen-{i}\"\n\
         events = [\"clients.create\"]\nstage = \"before\"\npriority = 1\n\
         url = \"http://{denier}/\"\n"
    );
    for h in 0..30 {
        text.push_str(&format!(
            "\n[[handler]]\nname = \"crm-{h}\"\nevents = [\"clients.update\", \"clients.accounts.*\"]\n\
             stage = \"before\"\npriority = {h}\nurl = \"http://127.0.0.1:9/hook/{h}\"\n\
             match = {{ \"data.companies_id\" = {h}, \"data.name\" = {{ regex = \"^ACME-{h}\" }} }}\n\
             when = 'has(data.email) && data.email.endsWith(\"@acme{h}.example\")'\n"
        ));
    }
    text
}

/// The name of the handler that served a `clients.create` event (it denies).
async fn served_by(client: &reqwest::Client, url: &str) -> Option<String> {
    let body = Bytes::from_static(
        br#"{"event":{"dt":"2026-11-26T10:00:00+00:00","events_id":"clients.create","object_id":1},"data":{}}"#,
    );
    let response = client.post(url).body(body).send().await.ok()?;
    let value: serde_json::Value = response.json().await.ok()?;
    value["error"]["handler"].as_str().map(str::to_owned)
}

/// A handler that forbids everything, on its own thread and runtime.
fn start_denier() -> SocketAddr {
    start_server(|_| async { reply(StatusCode::FORBIDDEN, b"{\"message\":\"no\"}") })
}
