//! Before stage, one HTTP handler: provisiond in front of the echo handler, against the
//! echo handler called directly and against a bare forwarding hop, at 2,000 events/s and
//! saturated; and provisiond's memory, idle and at its peak under that load.

use crate::common::{Row, Sidecar, closed_loop, ms, open_loop, start_echo};
use crate::hop::Hop;

pub async fn run(scale: f64) -> Vec<Row> {
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
    let n = |x: f64| ((x * scale) as usize).max(100);
    let mut rows = Vec::new();

    // Latency at a steady 2,000 events/s, the rate the goals are set at.
    let scenario = "1. before, 1 HTTP handler, 2000/s";
    let direct = open_loop(&direct_url, 2000.0, n(10_000.0)).await;
    let hopped = open_loop(&hop_url, 2000.0, n(10_000.0)).await;
    let through = open_loop(&via, 2000.0, n(10_000.0)).await;
    let added = |s: &crate::common::Stats| {
        format!(
            "adds p50 {:.3} ms, p99 {:.3} ms over direct",
            ms(s.quantile(0.5).saturating_sub(direct.quantile(0.5))),
            ms(s.quantile(0.99).saturating_sub(direct.quantile(0.99)))
        )
    };
    rows.push(direct.row(scenario, "direct", ""));
    rows.push(hopped.row(scenario, "bare hop", added(&hopped)));
    rows.push(through.row(scenario, "provisiond", added(&through)));

    // Saturated: 32 connections sending back to back.
    let scenario = "1. before, 1 HTTP handler, saturated";
    let direct = closed_loop(&direct_url, 32, n(20_000.0)).await;
    let hopped = closed_loop(&hop_url, 32, n(20_000.0)).await;
    let sampler = sidecar.sample_rss();
    let through = closed_loop(&via, 32, n(20_000.0)).await;
    let peak_kib = sampler.stop();
    rows.push(direct.row(scenario, "direct", ""));
    rows.push(hopped.row(
        scenario,
        "bare hop",
        format!("{:.2} x direct", hopped.rps() / direct.rps()),
    ));
    rows.push(through.row(
        scenario,
        "provisiond",
        format!(
            "{:.2} x direct, {:.2} x the bare hop",
            through.rps() / direct.rps(),
            through.rps() / hopped.rps()
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
            "idle {:.1} MiB, peak {:.1} MiB under the saturated run",
            idle_kib as f64 / 1024.0,
            peak_kib as f64 / 1024.0
        ),
    });
    rows
}
