//! Before stage, one HTTP handler: provisiond in front of the echo handler against the
//! echo handler called directly, at a fixed rate and saturated.

use crate::common::{Row, Sidecar, closed_loop, open_loop, start_echo};

pub async fn run(scale: f64) -> Vec<Row> {
    let echo = start_echo();
    let handler_url = format!("http://{echo}/");
    let sidecar = Sidecar::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[handler]]\nname = \"echo\"\nevents = [\"*\"]\n\
         stage = \"before\"\nurl = \"{handler_url}\"\nmodifies = true\n"
    ));
    let via = sidecar.url("/events");
    let idle_kib = sidecar.rss_kib().unwrap_or_default();
    let n = |x: f64| ((x * scale) as usize).max(100);
    let mut rows = Vec::new();

    // Latency at a steady 2,000 events/s, the rate the goals are set at.
    let direct = open_loop(&handler_url, 2000.0, n(10_000.0)).await;
    let through = open_loop(&via, 2000.0, n(10_000.0)).await;
    let added_p50 = through.quantile(0.5).saturating_sub(direct.quantile(0.5));
    let added_p99 = through.quantile(0.99).saturating_sub(direct.quantile(0.99));
    rows.push(direct.row("before, 1 HTTP handler, 2000/s", "direct", ""));
    rows.push(through.row(
        "before, 1 HTTP handler, 2000/s",
        "provisiond",
        format!(
            "adds p50 {:.3} ms, p99 {:.3} ms",
            crate::common::ms(added_p50),
            crate::common::ms(added_p99)
        ),
    ));

    // Saturated: 32 connections sending back to back.
    let direct = closed_loop(&handler_url, 32, n(20_000.0)).await;
    let sampler = sidecar.sample_rss();
    let through = closed_loop(&via, 32, n(20_000.0)).await;
    let peak_kib = sampler.stop();
    let ratio = through.rps() / direct.rps();
    rows.push(direct.row("before, 1 HTTP handler, saturated", "direct", ""));
    rows.push(through.row(
        "before, 1 HTTP handler, saturated",
        "provisiond",
        format!(
            "{ratio:.2} x direct throughput; RSS idle {:.1} MiB, peak {:.1} MiB",
            idle_kib as f64 / 1024.0,
            peak_kib as f64 / 1024.0
        ),
    ));
    rows
}
