//! 1,000 handlers in the config, 10 of them for the event: the time to select and order
//! them and evaluate their filters, in-process, against a config of those 10 alone.

use std::hint::black_box;
use std::time::{Duration, Instant};

use provisiond::config::Config;
use provisiond::dispatch::{Snapshot, select_after};
use provisiond::events::{CATALOGUE, Envelope};
use provisiond::filter::CelInput;

use crate::common::Row;

fn config(noise: usize) -> String {
    let mut text = String::new();
    // The 10 that take clients.update: 5 before, 5 after, with filters that pass.
    for i in 0..10 {
        let stage = if i % 2 == 0 { "before" } else { "after" };
        text.push_str(&format!(
            "[[handler]]\nname = \"match-{i}\"\nevents = [\"clients.update\"]\nstage = \"{stage}\"\n\
             priority = {}\nurl = \"http://127.0.0.1:9/{i}\"\n\
             match = {{ \"data.companies_id\" = 3 }}\nwhen = 'data.balance != \"0\"'\n\n",
            1000 - i
        ));
    }
    // The rest take other events.
    let others: Vec<&str> = CATALOGUE
        .iter()
        .copied()
        .filter(|e| *e != "clients.update")
        .collect();
    for i in 0..noise {
        text.push_str(&format!(
            "[[handler]]\nname = \"other-{i}\"\nevents = [\"{}\"]\nstage = \"before\"\n\
             url = \"http://127.0.0.1:9/o{i}\"\nmatch = {{ \"data.companies_id\" = 3 }}\n\n",
            others[i % others.len()]
        ));
    }
    text
}

/// Nanoseconds per event to route, order and filter.
fn measure(snapshot: &Snapshot, envelope: &Envelope, rounds: usize) -> Duration {
    let started = Instant::now();
    for _ in 0..rounds {
        let route = snapshot.plan.route(black_box(&envelope.name));
        let mut passed = 0;
        let mut cel = CelInput::default();
        for handler in &route.before {
            if handler.filter.evaluate_with(envelope, &mut cel).is_ok() {
                passed += 1;
            }
        }
        let mut records = Vec::new();
        passed += select_after(&route, envelope, &mut cel, &mut records).len();
        black_box(passed);
    }
    started.elapsed() / u32::try_from(rounds).expect("rounds fit u32")
}

pub(crate) fn run(scale: f64) -> Vec<Row> {
    let envelope = Envelope::from_value(serde_json::json!({
        "event": {"dt": "2026-11-26T10:00:00+00:00", "events_id": "clients.update", "object_id": 7},
        "data": {"companies_id": "3", "balance": "12.5", "name": "ACME"},
    }))
    .unwrap();
    let rounds = crate::common::scaled(20_000, scale, 1000);
    let big = Snapshot::new(Config::parse(&config(990), "bench").unwrap(), 1);
    let small = Snapshot::new(Config::parse(&config(0), "bench").unwrap(), 1);
    assert_eq!(big.config.handlers.len(), 1000);
    let route = big.plan.route("clients.update");
    assert_eq!(route.before.len() + route.after.len(), 10);
    // Warm up, then measure each twice, interleaved.
    measure(&big, &envelope, rounds / 10);
    let small_1 = measure(&small, &envelope, rounds);
    let big_1 = measure(&big, &envelope, rounds);
    let small_2 = measure(&small, &envelope, rounds);
    let big_2 = measure(&big, &envelope, rounds);
    let per_event = |d: Duration| d.as_secs_f64() * 1e6;
    let row = |target: &str, d: Duration, note: String| Row {
        scenario: "3. select 10 of 1,000 handlers".into(),
        target: target.into(),
        requests: rounds * 2,
        errors: 0,
        rps: 1.0 / d.as_secs_f64(),
        p50_ms: d.as_secs_f64() * 1000.0,
        p99_ms: f64::NAN,
        note,
    };
    let small_avg = (small_1 + small_2) / 2;
    let big_avg = (big_1 + big_2) / 2;
    vec![
        row(
            "10 handlers in the config",
            small_avg,
            format!("{:.2} us per event", per_event(small_avg)),
        ),
        row(
            "1,000 handlers in the config",
            big_avg,
            format!(
                "{:.2} us per event (route, order, 10 filters)",
                per_event(big_avg)
            ),
        ),
    ]
}
