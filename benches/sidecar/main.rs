//! The bench harness: `cargo bench --bench sidecar -- [SCENARIO...] [--quick]`.
//!
//! Every scenario runs its baseline in the same run, so the figures are ratios that hold
//! on a noisy machine. Results go to stdout as a table, then issue 11's rows each beside
//! its baseline, and to `bench-results.json` (`rows` and `summary`).
//! Load is always bounded (a fixed number of requests). Everything binds loopback.

mod after;
mod backlog;
mod before;
mod chain;
mod common;
mod hop;
mod reload;
mod scripts;
mod select;
mod shared;

use std::time::Duration;

use common::{Row, Summary};

const SCENARIOS: &[&str] = &["before", "chain", "select", "scripts", "after", "reload"];
/// Run only when named: heavy on the disk (`shared` also needs PostgreSQL's programs).
const ON_REQUEST: &[&str] = &["backlog", "shared"];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, upstream, via @ ..] = args.as_slice()
        && flag == "--serve-hop"
    {
        hop::serve(
            upstream,
            hop::Via::from_arg(via.first().map(String::as_str)),
        );
    }
    if args.first().is_some_and(|a| a == "--serve-echo") {
        // For profiling by hand: an echo handler that prints its address and runs on.
        println!("{}", common::start_echo());
        loop {
            std::thread::park();
        }
    }
    if let [flag, url, concurrency, total, ..] = args.as_slice()
        && flag == "--load"
    {
        // For profiling by hand: a bounded closed loop against a running sidecar.
        let (concurrency, total) = (concurrency.parse().unwrap(), total.parse().unwrap());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let stats = runtime.block_on(common::closed_loop(url, concurrency, total));
        println!(
            "{} ok, {} errors, {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms",
            stats.latencies.len(),
            stats.errors,
            stats.rps(),
            common::ms(stats.quantile(0.5)),
            common::ms(stats.quantile(0.99))
        );
        return;
    }
    if let [flag, rate, total, rounds, urls @ ..] = args.as_slice()
        && flag == "--open"
    {
        // For profiling by hand: row 3's measurement against running targets, the
        // first URL (the handler called directly) the baseline, in alternating rounds.
        let (rate, total, rounds): (f64, usize, usize) = (
            rate.parse().unwrap(),
            total.parse().unwrap(),
            rounds.parse().unwrap(),
        );
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut all: Vec<common::Rounds> = urls.iter().map(|_| common::Rounds::default()).collect();
        for _ in 0..rounds {
            for (url, r) in urls.iter().zip(&mut all) {
                r.push(runtime.block_on(common::open_loop(url, rate, total)));
            }
        }
        for (url, r) in urls.iter().zip(&all) {
            println!(
                "{url}: p50 {:.3} ms, p99 {:.3} ms; adds p50 {:.3}, p99 {:.3} ms",
                r.median(|s| common::ms(s.quantile(0.5))),
                r.median(|s| common::ms(s.quantile(0.99))),
                r.added(&all[0], 0.5),
                r.added(&all[0], 0.99)
            );
        }
        return;
    }
    // `cargo bench` passes `--bench`; ignore flags we do not know.
    let quick = args.iter().any(|a| a == "--quick");
    let mut chosen: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with("--"))
        .map(String::as_str)
        .collect();
    if chosen.is_empty() {
        chosen = SCENARIOS.to_vec();
    }
    for name in &chosen {
        if !SCENARIOS.contains(name) && !ON_REQUEST.contains(name) {
            eprintln!(
                "unknown scenario {name:?}; known: {}, {}",
                SCENARIOS.join(", "),
                ON_REQUEST.join(", ")
            );
            std::process::exit(2);
        }
    }
    if cfg!(debug_assertions) {
        eprintln!(
            "built without optimisation (`--profile test`?): a smoke run, its figures compare with nothing"
        );
    }
    let scale = if quick { 0.1 } else { 1.0 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rows: Vec<Row> = Vec::new();
    let mut summary: Vec<Summary> = Vec::new();
    for name in chosen {
        eprintln!("== {name}");
        let scenario_rows = match name {
            "before" => runtime.block_on(before::run(scale, &mut summary)),
            "chain" => runtime.block_on(chain::run(scale)),
            "select" => select::run(scale),
            "scripts" => runtime.block_on(scripts::run(scale, &mut summary)),
            "after" => runtime.block_on(after::run(scale, &mut summary)),
            "reload" => runtime.block_on(reload::run(scale)),
            "backlog" => runtime.block_on(backlog::run(scale)),
            "shared" => runtime.block_on(shared::run(scale)),
            _ => unreachable!(),
        };
        rows.extend(scenario_rows);
        // Let the last scenario's processes exit and their files settle first.
        std::thread::sleep(Duration::from_secs(2));
    }
    common::print_table(&rows);
    common::print_summary(&mut summary);
    let path = "bench-results.json";
    let results = serde_json::json!({"rows": rows, "summary": summary});
    std::fs::write(path, serde_json::to_string_pretty(&results).unwrap()).unwrap();
    eprintln!("wrote {path}");
    // Figures with failed requests behind them are not figures: say so by the exit
    // status too, so that a smoke run (`--quick`, in CI) fails on them.
    let failed: Vec<String> = rows
        .iter()
        .filter(|r| r.errors > 0)
        .map(|r| {
            format!(
                "{} / {}: {} of {}",
                r.scenario, r.target, r.errors, r.requests
            )
        })
        .collect();
    if !failed.is_empty() {
        eprintln!("requests failed in {} rows:", failed.len());
        for row in &failed {
            eprintln!("  {row}");
        }
        std::process::exit(1);
    }
}
