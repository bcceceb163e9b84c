//! A chain of five before-stage handlers, each with `match` and `when` filters that pass,
//! against the client calling the same five handlers one after another itself.

use std::time::Instant;

use crate::common::{Rounds, Row, Sidecar, Stats, client, envelope, open_loop, paced, start_echo};

pub(crate) async fn run(scale: f64) -> Vec<Row> {
    let echo = start_echo();
    let mut config = String::from("[server]\nlisten = \"127.0.0.1:0\"\n");
    for i in 1..=5 {
        config.push_str(&format!(
            "\n[[handler]]\nname = \"h{i}\"\nevents = [\"clients.*\"]\nstage = \"before\"\n\
             priority = {i}\nurl = \"http://{echo}/h{i}\"\nmodifies = {}\n\
             match = {{ \"data.companies_id\" = 3, \"data.balance\" = {{ gt = 0 }} }}\n\
             when = 'has(data.email) && data.email.endsWith(\"@acme.example\")'\n",
            i % 2 == 1
        ));
    }
    let sidecar = Sidecar::start(&config);
    let n = crate::common::scaled(1000, scale, 100);
    let rate = 500.0;

    let (mut direct, mut through) = (Rounds::default(), Rounds::default());
    for _ in 0..5 {
        direct.push(five_in_a_row(&format!("http://{echo}"), rate, n).await);
        through.push(open_loop(&sidecar.url("/events"), rate, n).await);
    }
    let scenario = "2. chain of 5 filtered handlers, 500/s";
    vec![
        direct.row(scenario, "direct, 5 calls in a row", ""),
        through.row(
            scenario,
            "provisiond",
            format!(
                "adds p50 {:.3} ms, p99 {:.3} ms",
                through.added(&direct, 0.5),
                through.added(&direct, 0.99)
            ),
        ),
    ]
}

/// The baseline: each event is five sequential calls from the client, one per handler.
async fn five_in_a_row(base: &str, rate: f64, total: usize) -> Stats {
    let client = client();
    crate::common::warm(&client, &format!("{base}/h1"), 16).await;
    let base = base.to_owned();
    paced(rate, total, move |i| {
        let client = client.clone();
        let base = base.clone();
        async move {
            let begun = Instant::now();
            for h in 1..=5 {
                let response = client
                    .post(format!("{base}/h{h}"))
                    .body(envelope(i))
                    .send()
                    .await
                    .ok()?;
                response.bytes().await.ok()?;
            }
            Some(begun.elapsed())
        }
    })
    .await
}
