//! Before stage, one HTTP handler: provisiond in front of the echo handler, against the
//! echo handler called directly and against a bare forwarding hop, at 2,000 events/s and
//! saturated; and provisiond's memory, idle and at its peak under that load.
//!
//! Each measurement runs in rounds, the three targets one after the other in each round;
//! the figures are medians over the rounds (see `common::Rounds`).

use std::time::Duration;

use crate::common::{Rounds, Row, Sidecar, closed_loop, cpu_time, open_loop, start_echo};
use crate::hop::Hop;

const ROUNDS: usize = 5;

pub(crate) async fn run(scale: f64) -> Vec<Row> {
    let echo = start_echo();
    let direct_url = format!("http://{echo}/");
    let hop = Hop::start(&echo.to_string());
    let hop_url = format!("http://{}/", hop.addr);
    let sidecar = Sidecar::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[handler]]\nname = \"echo\"\nevents = [\"*\"]\n\
         stage = \"before\"\nurl = \"{direct_url}\"\nmodifies = true\n"
    ));
    let via = sidecar.url("/events");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let idle_kib = sidecar.rss_kib().unwrap_or_default();
    let n = |x: usize| crate::common::scaled(x, scale, 100);
    let mut rows = Vec::new();

    // Latency at a steady 2,000 events/s, the rate the goals are set at.
    let scenario = "1. before, 1 HTTP handler, 2000/s";
    let (mut direct, mut hopped, mut through) =
        (Rounds::default(), Rounds::default(), Rounds::default());
    for _ in 0..ROUNDS {
        direct.push(open_loop(&direct_url, 2000.0, n(4000)).await);
        hopped.push(open_loop(&hop_url, 2000.0, n(4000)).await);
        through.push(open_loop(&via, 2000.0, n(4000)).await);
    }
    let added = |s: &Rounds| {
        format!(
            "adds p50 {:.3} ms, p99 {:.3} ms over direct",
            s.added(&direct, 0.5),
            s.added(&direct, 0.99)
        )
    };
    rows.push(direct.row(scenario, "direct", ""));
    rows.push(hopped.row(scenario, "bare hop", added(&hopped)));
    rows.push(through.row(scenario, "provisiond", added(&through)));

    // Saturated: 32 connections sending back to back.
    let scenario = "1. before, 1 HTTP handler, saturated";
    let (mut direct, mut hopped, mut through) =
        (Rounds::default(), Rounds::default(), Rounds::default());
    let sampler = sidecar.sample_rss();
    let (mut hop_cpu, mut sidecar_cpu) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..ROUNDS {
        direct.push(closed_loop(&direct_url, 32, n(8000)).await);
        let before = cpu_time(hop.pid());
        hopped.push(closed_loop(&hop_url, 32, n(8000)).await);
        hop_cpu += cpu_time(hop.pid()) - before;
        let before = cpu_time(sidecar.pid());
        through.push(closed_loop(&via, 32, n(8000)).await);
        sidecar_cpu += cpu_time(sidecar.pid()) - before;
    }
    let peak_kib = sampler.stop();
    // CPU per event: what each process spends, whatever else the machine is doing.
    let per_event = |cpu: Duration, r: &Rounds| {
        let events: usize = r.runs.iter().map(|s| s.latencies.len()).sum();
        cpu.as_secs_f64() * 1e6 / events.max(1) as f64
    };
    let (hop_us, sidecar_us) = (
        per_event(hop_cpu, &hopped),
        per_event(sidecar_cpu, &through),
    );
    let rps = |r: &Rounds| r.median(crate::common::Stats::rps);
    rows.push(direct.row(scenario, "direct", ""));
    rows.push(hopped.row(
        scenario,
        "bare hop",
        format!(
            "{:.2} x direct; {hop_us:.0} us CPU per event",
            rps(&hopped) / rps(&direct)
        ),
    ));
    rows.push(through.row(
        scenario,
        "provisiond",
        format!(
            "{:.2} x direct, {:.2} x the bare hop; {sidecar_us:.0} us CPU per event",
            rps(&through) / rps(&direct),
            rps(&through) / rps(&hopped)
        ),
    ));
    rows.push(Row {
        scenario: "6. provisiond resident memory".into(),
        target: "provisiond".into(),
        requests: 0,
        errors: 0,
        rps: f64::NAN,
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        note: format!(
            "idle {:.1} MiB, peak {:.1} MiB under the saturated runs",
            idle_kib as f64 / 1024.0,
            peak_kib as f64 / 1024.0
        ),
    });
    rows
}
