//! Before stage, one HTTP handler: provisiond in front of the echo handler, against the
//! echo handler called directly, against a bare forwarding hop and against the same hop
//! forwarding through provisiond's reqwest client, at 2,000 events/s and saturated; and provisiond's memory, idle and at its peak under that load, and at its
//! peak under a longer saturated run with its stderr read slowly, against the same with
//! stderr read at once.
//!
//! Each measurement runs in rounds, the three targets one after the other in each round;
//! the figures are medians over the rounds (see `common::Rounds`).

use std::time::Duration;

use crate::common::{
    Rounds, Row, Sidecar, Stats, Summary, closed_loop, cpu_by_thread, cpu_split, cpu_time,
    open_loop, start_echo, status_kib,
};
use crate::hop::{Hop, Via};

const ROUNDS: usize = 5;

pub(crate) async fn run(scale: f64, summary: &mut Vec<Summary>) -> Vec<Row> {
    let echo = start_echo();
    let direct_url = format!("http://{echo}/");
    let hop = Hop::start(&echo.to_string(), Via::Hyper);
    let hop_url = format!("http://{}/", hop.addr);
    let reqwest_hop = Hop::start(&echo.to_string(), Via::Reqwest);
    let reqwest_url = format!("http://{}/", reqwest_hop.addr);
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[handler]]\nname = \"echo\"\nevents = [\"*\"]\n\
         stage = \"before\"\nurl = \"{direct_url}\"\nmodifies = true\n"
    );
    let sidecar = Sidecar::start(&config);
    let via = sidecar.url("/events");
    // The same with one runtime thread (`run --threads 1`), beside the default.
    let single = Sidecar::start_with(&config, &["--threads", "1"]);
    let via_single = single.url("/events");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let idle_kib = sidecar.rss_kib().unwrap_or_default();
    let hop_idle_kib = status_kib(hop.pid(), "VmRSS:").unwrap_or_default();
    let n = |x: usize| crate::common::scaled(x, scale, 100);
    let mut rows = Vec::new();

    // Latency at a steady 2,000 events/s, the rate the goals are set at.
    let scenario = "1. before, 1 HTTP handler, 2000/s";
    let (mut direct, mut hopped, mut reqwested, mut through, mut through_single) = (
        Rounds::default(),
        Rounds::default(),
        Rounds::default(),
        Rounds::default(),
        Rounds::default(),
    );
    for _ in 0..ROUNDS {
        direct.push(open_loop(&direct_url, 2000.0, n(4000)).await);
        hopped.push(open_loop(&hop_url, 2000.0, n(4000)).await);
        reqwested.push(open_loop(&reqwest_url, 2000.0, n(4000)).await);
        through.push(open_loop(&via, 2000.0, n(4000)).await);
        through_single.push(open_loop(&via_single, 2000.0, n(4000)).await);
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
    rows.push(reqwested.row(scenario, "hop via reqwest", added(&reqwested)));
    rows.push(through.row(scenario, "provisiond", added(&through)));
    rows.push(through_single.row(scenario, "provisiond --threads 1", added(&through_single)));
    summary.push(Summary {
        note: format!(
            "p99 median over rounds: direct {:.3} ms, provisiond {:.3} ms; \
             the hop via reqwest adds {:.3} ms; provisiond --threads 1 adds {:.3} ms",
            direct.median(|s| crate::common::ms(s.quantile(0.99))),
            through.median(|s| crate::common::ms(s.quantile(0.99))),
            reqwested.added(&direct, 0.99),
            through_single.added(&direct, 0.99)
        ),
        ..Summary::new(
            3,
            "p99 added over calling the handler directly, at 2,000 events/s",
            "ms",
            through.added(&direct, 0.99),
            "added by the bare hop",
            hopped.added(&direct, 0.99),
            "< 0.5 ms",
        )
    });

    // Saturated: 32 connections sending back to back.
    let scenario = "1. before, 1 HTTP handler, saturated";
    let (mut direct, mut hopped, mut reqwested, mut through, mut through_single) = (
        Rounds::default(),
        Rounds::default(),
        Rounds::default(),
        Rounds::default(),
        Rounds::default(),
    );
    let sampler = sidecar.sample_rss();
    let (mut hop_cpu, mut reqwest_cpu, mut sidecar_cpu, mut single_cpu) = (
        Duration::ZERO,
        Duration::ZERO,
        Duration::ZERO,
        Duration::ZERO,
    );
    let threads_before = cpu_by_thread(sidecar.pid());
    for _ in 0..ROUNDS {
        direct.push(closed_loop(&direct_url, 32, n(8000)).await);
        let before = cpu_time(hop.pid());
        hopped.push(closed_loop(&hop_url, 32, n(8000)).await);
        hop_cpu += cpu_time(hop.pid()) - before;
        let before = cpu_time(reqwest_hop.pid());
        reqwested.push(closed_loop(&reqwest_url, 32, n(8000)).await);
        reqwest_cpu += cpu_time(reqwest_hop.pid()) - before;
        let before = cpu_time(sidecar.pid());
        through.push(closed_loop(&via, 32, n(8000)).await);
        sidecar_cpu += cpu_time(sidecar.pid()) - before;
        let before = cpu_time(single.pid());
        through_single.push(closed_loop(&via_single, 32, n(8000)).await);
        single_cpu += cpu_time(single.pid()) - before;
    }
    let peak_kib = sampler.stop();
    let threads = cpu_by_thread(sidecar.pid());
    // CPU per event: what each process spends, whatever else the machine is doing.
    let per_event = |cpu: Duration, r: &Rounds| {
        let events: usize = r.runs.iter().map(|s| s.latencies.len()).sum();
        cpu.as_secs_f64() * 1e6 / events.max(1) as f64
    };
    let (hop_us, reqwest_us, sidecar_us, single_us) = (
        per_event(hop_cpu, &hopped),
        per_event(reqwest_cpu, &reqwested),
        per_event(sidecar_cpu, &through),
        per_event(single_cpu, &through_single),
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
    let against = |r: &Rounds, us: f64| {
        format!(
            "{:.2} x direct, {:.2} x the bare hop; {us:.0} us CPU per event",
            rps(r) / rps(&direct),
            rps(r) / rps(&hopped)
        )
    };
    rows.push(reqwested.row(scenario, "hop via reqwest", against(&reqwested, reqwest_us)));
    rows.push(through.row(scenario, "provisiond", against(&through, sidecar_us)));
    rows.push(through_single.row(
        scenario,
        "provisiond --threads 1",
        against(&through_single, single_us),
    ));
    // What keeping reqwest costs by itself: the floor of rows 1 and 2.
    summary.push(Summary {
        note: format!(
            "the hop via reqwest: {:.0} req/s, {:.2} x the bare hop; provisiond --threads 1: \
             {:.0} req/s, {:.2} x",
            rps(&reqwested),
            rps(&reqwested) / rps(&hopped),
            rps(&through_single),
            rps(&through_single) / rps(&hopped)
        ),
        ..Summary::new(
            1,
            "saturated throughput, provisiond / bare hop",
            "req/s",
            rps(&through),
            "bare hop",
            rps(&hopped),
            ">= 0.8",
        )
    });
    let events: usize = through.runs.iter().map(|s| s.latencies.len()).sum();
    summary.push(Summary {
        note: format!(
            "the hop via reqwest: {reqwest_us:.1} us, {:.2} x the bare hop; provisiond \
             --threads 1: {single_us:.1} us, {:.2} x; provisiond's threads, us per event: {}",
            reqwest_us / hop_us,
            single_us / hop_us,
            cpu_split(&threads_before, &threads, events)
        ),
        ..Summary::new(
            2,
            "CPU per event, provisiond / bare hop",
            "us",
            sidecar_us,
            "bare hop",
            hop_us,
            "<= 1.5 x",
        )
    });
    summary.push(Summary::new(
        5,
        "resident memory idle",
        "MiB",
        mib(idle_kib),
        "bare hop",
        mib(hop_idle_kib),
        "< 12 MiB",
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
            mib(idle_kib),
            mib(peak_kib)
        ),
    });
    drop(sidecar);
    drop(single);

    // The peak under a longer saturated run on a fresh process, its stderr a pipe read
    // slowly (the log writer's buffer must stay bounded), against stderr read at once.
    let scenario = "6. provisiond peak memory, saturated, distinct envelopes";
    let total = n(80_000);
    let (at_once, at_once_kib, at_once_dropped) = saturated_peak(&config, false, total).await;
    let (slow, slow_kib, slow_dropped) = saturated_peak(&config, true, total).await;
    let note = |kib: u64, dropped: f64| {
        format!(
            "peak {:.1} MiB (VmHWM); {dropped:.0} log lines dropped",
            mib(kib)
        )
    };
    rows.push(at_once.row(
        scenario,
        "stderr read at once",
        note(at_once_kib, at_once_dropped),
    ));
    rows.push(slow.row(
        scenario,
        "stderr read at 10 KiB/s",
        note(slow_kib, slow_dropped),
    ));
    summary.push(Summary {
        note: format!(
            "{total} envelopes from 32 connections; log lines dropped: {slow_dropped:.0} \
             (stderr read at once: {at_once_dropped:.0})"
        ),
        ..Summary::new(
            4,
            "resident memory at the peak of a saturated run, stderr a pipe read at 10 KiB/s",
            "MiB",
            mib(slow_kib),
            "stderr read at once",
            mib(at_once_kib),
            "< 64 MiB",
        )
    });
    rows
}

/// A fresh provisiond serving `config` under `total` distinct envelopes from 32
/// connections back to back, its stderr read slowly or at once: the run, the process's
/// peak resident memory in KiB and the log lines it dropped.
async fn saturated_peak(config: &str, slow_stderr: bool, total: usize) -> (Stats, u64, f64) {
    let sidecar = if slow_stderr {
        Sidecar::start_slow_stderr(config)
    } else {
        Sidecar::start(config)
    };
    let stats = closed_loop(&sidecar.url("/events"), 32, total).await;
    let peak_kib = sidecar.peak_kib().unwrap_or_default();
    let dropped = sidecar.metric("provisiond_log_lines_dropped_total").await;
    (stats, peak_kib, dropped)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
