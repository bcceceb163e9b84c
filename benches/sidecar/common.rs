//! Shared bench parts: a loopback handler server, a provisiond process, load generators
//! and latency statistics.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write as _};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde::Serialize;

/// One line of the results table.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    pub scenario: String,
    pub target: String,
    pub requests: usize,
    pub errors: usize,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub note: String,
}

/// One row of issue 11's table: provisiond's figure beside its baseline from the same
/// run, their ratio, and the target.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Summary {
    /// The row's number in the table.
    pub row: usize,
    pub figure: String,
    pub unit: String,
    pub measured: f64,
    pub baseline: String,
    pub baseline_value: f64,
    pub ratio: f64,
    pub target: String,
    pub note: String,
}

impl Summary {
    /// A row with its ratio, measured / baseline, and no note.
    pub(crate) fn new(
        row: usize,
        figure: &str,
        unit: &str,
        measured: f64,
        baseline: &str,
        baseline_value: f64,
        target: &str,
    ) -> Self {
        Self {
            row,
            figure: figure.into(),
            unit: unit.into(),
            measured,
            baseline: baseline.into(),
            baseline_value,
            ratio: measured / baseline_value,
            target: target.into(),
            note: String::new(),
        }
    }
}

/// `count` times the run's scale (`--quick` is a tenth), at least `min`.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "counts of a few million at most, scaled by a positive factor"
)]
pub(crate) fn scaled(count: usize, scale: f64, min: usize) -> usize {
    ((count as f64 * scale) as usize).max(min)
}

/// Latencies of one load run.
pub(crate) struct Stats {
    pub latencies: Vec<Duration>,
    pub errors: usize,
    pub elapsed: Duration,
}

impl Stats {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "q is in [0, 1], so the index is in [0, len - 1]"
    )]
    pub(crate) fn quantile(&self, q: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
        sorted[index]
    }

    pub(crate) fn rps(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    pub(crate) fn row(&self, scenario: &str, target: &str, note: impl Into<String>) -> Row {
        Row {
            scenario: scenario.into(),
            target: target.into(),
            requests: self.latencies.len() + self.errors,
            errors: self.errors,
            rps: self.rps(),
            p50_ms: ms(self.quantile(0.5)),
            p99_ms: ms(self.quantile(0.99)),
            note: note.into(),
        }
    }
}

/// Repeated runs of one target, interleaved by the caller with the runs of its baselines,
/// so that a burst of noise on the machine hits one round of each rather than all of
/// one target. Figures are medians over the rounds.
#[derive(Default)]
pub(crate) struct Rounds {
    pub runs: Vec<Stats>,
}

impl Rounds {
    pub(crate) fn push(&mut self, stats: Stats) {
        self.runs.push(stats);
    }

    pub(crate) fn median(&self, f: impl Fn(&Stats) -> f64) -> f64 {
        median(self.runs.iter().map(f).collect())
    }

    /// The median, over rounds, of this target's p-quantile minus the baseline's in the
    /// same round, in ms.
    pub(crate) fn added(&self, baseline: &Rounds, q: f64) -> f64 {
        median(
            self.runs
                .iter()
                .zip(&baseline.runs)
                .map(|(a, b)| ms(a.quantile(q)) - ms(b.quantile(q)))
                .collect(),
        )
    }

    pub(crate) fn row(&self, scenario: &str, target: &str, note: impl Into<String>) -> Row {
        Row {
            scenario: scenario.into(),
            target: target.into(),
            requests: self.runs.iter().map(|s| s.latencies.len() + s.errors).sum(),
            errors: self.runs.iter().map(|s| s.errors).sum(),
            rps: self.median(Stats::rps),
            p50_ms: self.median(|s| ms(s.quantile(0.5))),
            p99_ms: self.median(|s| ms(s.quantile(0.99))),
            note: note.into(),
        }
    }
}

pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A loopback HTTP server answering every request with `answer`, on a thread and a
/// one-worker runtime of its own, so that it does not share the load generator's
/// threads. Returns its address.
pub(crate) fn start_server<F, Fut>(answer: F) -> SocketAddr
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let answer = answer.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let reply = answer(request);
                        async move { Ok::<_, std::convert::Infallible>(reply.await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
    rx.recv().unwrap()
}

/// The billing docs' echo handler: the request body back.
pub(crate) fn start_echo() -> SocketAddr {
    start_server(|request: Request<hyper::body::Incoming>| async move {
        let body = request
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Response::new(Full::new(body))
    })
}

/// A reply with a status and a body.
pub(crate) fn reply(status: hyper::StatusCode, body: &'static [u8]) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body)));
    *response.status_mut() = status;
    response
}

/// A provisiond process serving `config`, started from the release binary cargo built.
pub(crate) struct Sidecar {
    pub child: Child,
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    pub(crate) fn start(config: &str) -> Self {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("provisioning.toml");
        std::fs::write(&path, config).unwrap();
        Self::start_in(dir, &path)
    }

    pub(crate) fn start_in(dir: tempfile::TempDir, config: &Path) -> Self {
        Self::spawn(dir, config, false, &[])
    }

    /// As `start`, with more arguments to `run` (e.g. `--threads 1`).
    pub(crate) fn start_with(config: &str, args: &[&str]) -> Self {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("provisioning.toml");
        std::fs::write(&path, config).unwrap();
        Self::spawn(dir, &path, false, args)
    }

    /// As `start`, its stderr read slowly: 1 KiB every 100 ms, about 10 KiB/s.
    pub(crate) fn start_slow_stderr(config: &str) -> Self {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("provisioning.toml");
        std::fs::write(&path, config).unwrap();
        Self::spawn(dir, &path, true, &[])
    }

    fn spawn(dir: tempfile::TempDir, config: &Path, slow_stderr: bool, args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_provisiond"))
            .args([
                "run",
                "--log-format",
                "json",
                "--log-level",
                "warn,provisiond=info",
            ])
            .args(args)
            .arg("-c")
            .arg(config)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("provisiond starts");
        let stderr = child.stderr.take().unwrap();
        let stderr: Box<dyn Read + Send> = if slow_stderr {
            Box::new(SlowReader(stderr))
        } else {
            Box::new(stderr)
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if !sent
                    && let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && v["message"] == "listening"
                {
                    let _ = tx.send(v["addr"].as_str().unwrap_or_default().to_owned());
                    sent = true;
                }
                // Keep draining (slowly or not) until the sidecar exits.
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("provisiond listens");
        Self {
            child,
            addr,
            _dir: dir,
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The directory holding the config (and the working directory).
    pub(crate) fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// Resident memory in KiB, from /proc.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn rss_kib(&self) -> Option<u64> {
        rss_of(self.child.id())
    }

    /// The peak resident memory of the process's whole life (`VmHWM`), in KiB.
    pub(crate) fn peak_kib(&self) -> Option<u64> {
        status_kib(self.child.id(), "VmHWM:")
    }

    /// A counter or gauge from its `/metrics` (0 when absent).
    pub(crate) async fn metric(&self, name: &str) -> f64 {
        let text = match client().get(self.url("/metrics")).send().await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        text.lines()
            .find(|l| l.split([' ', '{']).next() == Some(name))
            .and_then(|l| l.split_whitespace().last()?.parse().ok())
            .unwrap_or(0.0)
    }
}

/// A reader that takes at most 1 KiB every 100 ms: a slow consumer of stderr.
struct SlowReader<R>(R);

impl<R: Read> Read for SlowReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        std::thread::sleep(Duration::from_millis(100));
        let len = buf.len().min(1024);
        self.0.read(&mut buf[..len])
    }
}

/// Samples a process's resident memory every 10 ms until stopped; keeps the peak.
pub(crate) struct RssSampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    pub(crate) fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

impl Sidecar {
    pub(crate) fn sample_rss(&self) -> RssSampler {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pid = self.child.id();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(kib) = rss_of(pid) {
                    peak = peak.max(kib);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        });
        RssSampler { stop, thread }
    }
}

/// CPU time (user + system) a process has used so far, from /proc.
pub(crate) fn cpu_time(pid: u32) -> Duration {
    stat_cpu(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default())
}

/// The CPU time of each of a process's threads so far, summed by thread name
/// (`tokio-rt-worker`, `log-writer`, `store-writer`...), sorted by name.
pub(crate) fn cpu_by_thread(pid: u32) -> Vec<(String, Duration)> {
    let mut by_name = std::collections::BTreeMap::<String, Duration>::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    for task in tasks.flatten() {
        let path = task.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
        *by_name.entry(name.trim().to_owned()).or_default() += stat_cpu(&stat);
    }
    by_name.into_iter().collect()
}

/// What `cpu_by_thread` says each thread spent between `before` and `after`, in us per
/// event: `tokio-rt-worker 40.1, log-writer 1.8, ...`.
pub(crate) fn cpu_split(
    before: &[(String, Duration)],
    after: &[(String, Duration)],
    events: usize,
) -> String {
    after
        .iter()
        .map(|(name, spent)| {
            let earlier = before
                .iter()
                .find(|(n, _)| n == name)
                .map_or(Duration::ZERO, |(_, d)| *d);
            let us = spent.saturating_sub(earlier).as_secs_f64() * 1e6 / events.max(1) as f64;
            format!("{name} {us:.1}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// utime + stime of one `/proc/.../stat` line.
fn stat_cpu(stat: &str) -> Duration {
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name, in clock
    // ticks: USER_HZ, which Linux fixes at 100 for everything it shows user space.
    Duration::from_secs_f64((ticks(11) + ticks(12)) as f64 / 100.0)
}

/// This disk's fdatasync rate: 8 KiB written in place in a preallocated 16 MiB file
/// (as PostgreSQL writes its WAL segments) and `fdatasync`ed, in a loop; under `/tmp`,
/// the file system of the PostgreSQL data and of the redb files.
pub(crate) fn fdatasync_rate(scale: f64) -> Stats {
    let dir = tempfile::Builder::new()
        .prefix("provisiond-fsync-")
        .tempdir_in("/tmp")
        .unwrap();
    let mut file = std::fs::File::create(dir.path().join("probe")).unwrap();
    const SIZE: u64 = 16 << 20;
    file.write_all(&vec![0; 16 << 20]).unwrap();
    file.sync_all().unwrap();
    let block = vec![7u8; 8192];
    let watch = Duration::from_secs_f64(5.0 * scale.max(0.2));
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut offset = 0;
    while started.elapsed() < watch {
        let one = Instant::now();
        file.seek(SeekFrom::Start(offset)).unwrap();
        file.write_all(&block).unwrap();
        file.sync_data().unwrap();
        latencies.push(one.elapsed());
        offset = (offset + 8192) % SIZE;
    }
    Stats {
        latencies,
        errors: 0,
        elapsed: started.elapsed(),
    }
}

fn rss_of(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// A field of `/proc/<pid>/status` given in kB, such as `VmRSS:`.
pub(crate) fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1024)
        .tcp_nodelay(true)
        .build()
        .unwrap()
}

/// An envelope as the billing sends it; `seq` makes each one unique (the after stage
/// would otherwise dedupe repeats).
pub(crate) fn envelope(i: usize) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "event": {"dt": "2026-11-26T10:00:00+00:00", "events_id": "clients.update", "object_id": i % 1000},
            "data": {"id": i % 1000, "name": "My changed name", "balance": "12.50", "companies_id": 3,
                     "email": "ops@acme.example", "seq": i},
        })
        .to_string(),
    )
}

pub(crate) async fn one(client: &reqwest::Client, url: &str, body: Bytes) -> Option<Duration> {
    let started = Instant::now();
    let response = client.post(url).body(body).send().await.ok()?;
    let ok = response.status().is_success();
    let _ = response.bytes().await.ok()?;
    ok.then(|| started.elapsed())
}

/// Fills the client's pool (and, behind a sidecar, the sidecar's own pool to its
/// handler) with `width` connections, so that runs measure the steady state rather than
/// connection set-up: three waves of `width` requests at once.
pub(crate) async fn warm(client: &reqwest::Client, url: &str, width: usize) {
    // Envelopes no run sends (runs count from 0), so that none of a run's is a duplicate
    // of the warm-up's, deduped by an after stage instead of stored.
    let first = 1 << 40;
    for wave in 0..3 {
        let tasks: Vec<_> = (0..width)
            .map(|i| {
                let client = client.clone();
                let url = url.to_owned();
                tokio::spawn(
                    async move { one(&client, &url, envelope(first + wave * width + i)).await },
                )
            })
            .collect();
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// `concurrency` workers send `total` requests back to back, as fast as answers come.
pub(crate) async fn closed_loop(url: &str, concurrency: usize, total: usize) -> Stats {
    let client = client();
    warm(&client, url, concurrency).await;
    closed_loop_over(&client, &[url.to_owned()], concurrency, total, envelope).await
}

/// `concurrency` workers, spread evenly over `urls`, send `body(0)` to `body(total - 1)`
/// back to back, as fast as answers come.
pub(crate) async fn closed_loop_over(
    client: &reqwest::Client,
    urls: &[String],
    concurrency: usize,
    total: usize,
    body: fn(usize) -> Bytes,
) -> Stats {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let (client, url, next) = (client.clone(), urls[w % urls.len()].clone(), next.clone());
            tokio::spawn(async move {
                let (mut latencies, mut errors) = (Vec::new(), 0);
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    match one(&client, &url, body(i)).await {
                        Some(l) => latencies.push(l),
                        None => errors += 1,
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    gather(workers, started, total).await
}

/// One run's figures from its workers' latencies and error counts, timed from `started`.
pub(crate) async fn gather(
    workers: Vec<tokio::task::JoinHandle<(Vec<Duration>, usize)>>,
    started: Instant,
    total: usize,
) -> Stats {
    let mut stats = Stats {
        latencies: Vec::with_capacity(total),
        errors: 0,
        elapsed: Duration::ZERO,
    };
    for worker in workers {
        let (latencies, errors) = worker.await.unwrap();
        stats.latencies.extend(latencies);
        stats.errors += errors;
    }
    stats.elapsed = started.elapsed();
    stats
}

/// `total` requests at a fixed `rate` per second, each timed from its scheduled start,
/// whatever the previous ones are doing (an open loop, as the billing sends).
pub(crate) async fn open_loop(url: &str, rate: f64, total: usize) -> Stats {
    let client = client();
    warm(&client, url, 16).await;
    let url = url.to_owned();
    paced(rate, total, move |i| {
        let client = client.clone();
        let url = url.clone();
        async move { one(&client, &url, envelope(i)).await }
    })
    .await
}

/// Starts `send(i)` for `i` in `0..total` at `rate` per second, each on schedule
/// whatever the earlier ones are doing, and collects the latencies they report (`None`
/// is an error). Each send times itself from its actual start: tokio's timer has a 1 ms
/// grain, and timing from the due instant would add that grain to every sample.
pub(crate) async fn paced<F, Fut>(rate: f64, total: usize, send: F) -> Stats
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Option<Duration>> + Send + 'static,
{
    let interval = Duration::from_secs_f64(1.0 / rate);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        tokio::time::sleep_until((started + interval.mul_f64(i as f64)).into()).await;
        tasks.push(tokio::spawn(send(i)));
    }
    let mut stats = Stats {
        latencies: Vec::with_capacity(total),
        errors: 0,
        elapsed: Duration::ZERO,
    };
    for task in tasks {
        match task.await.unwrap() {
            Some(l) => stats.latencies.push(l),
            None => stats.errors += 1,
        }
    }
    stats.elapsed = started.elapsed();
    stats
}

pub(crate) fn print_table(rows: &[Row]) {
    println!(
        "| scenario | target | requests | errors | req/s | p50 ms | p99 ms | note |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    let num = |v: f64, decimals: usize| {
        if v.is_finite() {
            format!("{v:.decimals$}")
        } else {
            "-".to_owned()
        }
    };
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.scenario,
            r.target,
            r.requests,
            r.errors,
            num(r.rps, 0),
            num(r.p50_ms, 3),
            num(r.p99_ms, 3),
            r.note
        );
    }
}

/// Issue 11's table, in the order, for the scenarios that ran.
pub(crate) fn print_summary(summary: &mut [Summary]) {
    if summary.is_empty() {
        return;
    }
    summary.sort_by_key(|s| s.row);
    println!(
        "\nissue 11\n\n| # | figure | provisiond | baseline | ratio | target | note |\n\
         | ---: | --- | ---: | --- | ---: | --- | --- |"
    );
    for s in summary.iter() {
        println!(
            "| {} | {} | {} {} | {} {}, {} | {:.2} | {} | {} |",
            s.row,
            s.figure,
            figure(s.measured),
            s.unit,
            figure(s.baseline_value),
            s.unit,
            s.baseline,
            s.ratio,
            s.target,
            s.note
        );
    }
}

/// A figure with the decimals its size calls for: 21139 req/s, 43.2 MiB, 0.552 ms.
fn figure(v: f64) -> String {
    match v.abs() {
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 10.0 => format!("{v:.1}"),
        _ => format!("{v:.3}"),
    }
}
