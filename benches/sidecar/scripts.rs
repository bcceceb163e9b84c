//! Script handlers: provisiond running a script per event against adnanh/webhook
//! (Debian package `webhook`) running the same script on the same events, and against a
//! plain program doing only the spawning: 8 threads of this process running the script
//! with std's `Command` (envelope on stdin, output read, exit waited for), no HTTP. It
//! shows how much of each side's rate is the process start itself.
//!
//! All three give the script the same environment: provisiond's (`PATH`, `HOME` and
//! `LANG` from its own, the rest cleared). Inherited from `cargo bench`, the script would
//! also get cargo's `LD_LIBRARY_PATH`, which makes every program it starts look for its
//! libraries in the toolchain's directories first: 12% of webhook's rate on this machine.
//!
//! `PROVISIOND_BENCH_SCRIPT=FILE` runs another script instead (copied into the run's
//! directory): a script's own start cost decides how much the spawner's shows.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::{Row, Sidecar, Stats, Summary, closed_loop, envelope};

const SCRIPT: &str =
    "#!/bin/sh\n# Reads whatever it is given and answers.\ncat >/dev/null\necho ok\n";

pub(crate) async fn run(scale: f64, summary: &mut Vec<Summary>) -> Vec<Row> {
    let dir = tempfile::TempDir::new().unwrap();
    let script = dir.path().join("hook.sh");
    match std::env::var_os("PROVISIOND_BENCH_SCRIPT") {
        Some(other) => std::fs::copy(&other, &script)
            .map(drop)
            .unwrap_or_else(|e| panic!("PROVISIOND_BENCH_SCRIPT={}: {e}", other.display())),
        None => std::fs::write(&script, SCRIPT).unwrap(),
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();

    let n = crate::common::scaled(3000, scale, 100);
    let concurrency = 8;
    let mut rows = Vec::new();

    let Some(webhook) = Webhook::start(&script, dir.path()) else {
        eprintln!("webhook did not start (apt-get install webhook); skipping this scenario");
        return rows;
    };
    let baseline = closed_loop(&webhook.url, concurrency, n).await;
    drop(webhook);

    let sidecar = Sidecar::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[handler]]\nname = \"hook\"\nevents = [\"*\"]\n\
         stage = \"before\"\ncommand = [\"{}\"]\nmax_concurrency = {concurrency}\n",
        script.display()
    ));
    let cpu = crate::common::cpu_time(sidecar.pid());
    let through = closed_loop(&sidecar.url("/events"), concurrency, n).await;
    let cpu = crate::common::cpu_time(sidecar.pid()) - cpu;
    drop(sidecar);
    let own = crate::common::cpu_time(std::process::id());
    let direct = spawned_directly(&script, concurrency, n);
    let own = crate::common::cpu_time(std::process::id()) - own;
    let per_event = |cpu: Duration| cpu.as_secs_f64() * 1e6 / n as f64;
    let ratio = through.rps() / baseline.rps();
    let scenario = "5. script handler, 8 at once";
    rows.push(direct.row(
        scenario,
        "spawned directly",
        format!(
            "8 threads, no HTTP; {:.0} us CPU per run, the script's not counted",
            per_event(own)
        ),
    ));
    rows.push(baseline.row(
        scenario,
        "webhook 2.8",
        format!("{:.2} x spawned directly", baseline.rps() / direct.rps()),
    ));
    rows.push(through.row(
        scenario,
        "provisiond",
        format!(
            "{ratio:.2} x webhook, {:.2} x spawned directly; {:.0} us CPU per event, the script's not counted",
            through.rps() / direct.rps(),
            per_event(cpu)
        ),
    ));
    let mut row = Summary::new(
        7,
        "script handlers, provisiond / adnanh/webhook on the same script",
        "events/s",
        through.rps(),
        "webhook 2.8",
        baseline.rps(),
        ">= 1.5 x",
    );
    row.note = format!(
        "the script spawned by a plain program, no HTTP: {:.0}/s ({:.2} x webhook); provisiond {:.2} x that",
        direct.rps(),
        direct.rps() / baseline.rps(),
        through.rps() / direct.rps()
    );
    summary.push(row);
    rows
}

/// `concurrency` threads running the script `total` times in all, as a handler call does
/// it (the envelope on stdin, stdout read to the end, the exit waited for), timed per run.
fn spawned_directly(script: &std::path::Path, concurrency: usize, total: usize) -> Stats {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..concurrency)
        .map(|_| {
            let (next, script) = (next.clone(), script.to_owned());
            std::thread::spawn(move || {
                let (mut latencies, mut errors) = (Vec::new(), 0);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        break (latencies, errors);
                    }
                    let at = Instant::now();
                    match run_once(&script, &envelope(i)) {
                        Ok(()) => latencies.push(at.elapsed()),
                        Err(_) => errors += 1,
                    }
                }
            })
        })
        .collect();
    let mut stats = Stats {
        latencies: Vec::new(),
        errors: 0,
        elapsed: Duration::ZERO,
    };
    for thread in threads {
        let (latencies, errors) = thread.join().unwrap();
        stats.latencies.extend(latencies);
        stats.errors += errors;
    }
    stats.elapsed = started.elapsed();
    stats
}

/// The environment provisiond gives a script (`handlers::exec`'s `PASSED_THROUGH`).
fn scripts_env(command: &mut Command) -> &mut Command {
    command.env_clear();
    for name in ["PATH", "HOME", "LANG"] {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    command
}

fn run_once(script: &std::path::Path, input: &[u8]) -> std::io::Result<()> {
    let mut child = scripts_env(&mut Command::new(script))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    child.stdin.take().expect("piped").write_all(input)?;
    let mut out = Vec::new();
    child.stdout.take().expect("piped").read_to_end(&mut out)?;
    if child.wait()?.success() && out == b"ok\n" {
        Ok(())
    } else {
        Err(std::io::Error::other("the script failed"))
    }
}

/// adnanh/webhook serving one hook that runs the script and answers with its output
/// (so that, like provisiond's before stage, it answers after the script exits).
struct Webhook {
    child: Child,
    url: String,
}

impl Webhook {
    fn start(script: &std::path::Path, dir: &std::path::Path) -> Option<Self> {
        let hooks = dir.join("hooks.json");
        std::fs::write(
            &hooks,
            serde_json::json!([{
                "id": "hook",
                "execute-command": script,
                "command-working-directory": dir,
                "include-command-output-in-response": true,
                "pass-arguments-to-command": [{"source": "entire-payload"}],
            }])
            .to_string(),
        )
        .unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let child = scripts_env(&mut Command::new("webhook"))
            .args(["-hooks"])
            .arg(&hooks)
            .args(["-ip", "127.0.0.1", "-port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        // It says nothing when it listens unless -verbose (which logs every request):
        // wait for the port instead.
        let listening = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        if !listening {
            return None;
        }
        Some(Self {
            child,
            url: format!("http://127.0.0.1:{port}/hooks/hook"),
        })
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
