//! The command line's shape: which options each command takes and shows, the forms of
//! `run`, the client commands' defaults, warnings and empty answers, and output to a
//! pipe closed early or a full disk.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;
use serde_json::{Value, json};

const RUN_OPTIONS: [&str; 4] = ["--log-format", "--log-level", "--no-watch", "--threads"];

#[test]
fn only_run_shows_the_log_options() {
    for args in [&["--help"][..], &["run", "--help"]] {
        let (code, out, err) = cli(args, &[], "");
        assert_eq!(code, 0, "{err}");
        for option in RUN_OPTIONS.iter().chain(&["--config"]) {
            assert!(out.contains(option), "{args:?} lacks {option}:\n{out}");
        }
        for value in ["auto", "json", "pretty"] {
            assert!(out.contains(value), "{args:?} lacks {value}:\n{out}");
        }
    }
    for args in [
        &["check", "--help"][..],
        &["explain", "--help"],
        &["test", "--help"],
        &["schema", "--help"],
        &["send", "--help"],
        &["executions", "--help"],
        &["deadletters", "--help"],
        &["deadletters", "list", "--help"],
        &["deadletters", "replay", "--help"],
    ] {
        let (code, out, err) = cli(args, &[], "");
        assert_eq!(code, 0, "{err}");
        for option in RUN_OPTIONS {
            assert!(!out.contains(option), "{args:?} shows {option}:\n{out}");
        }
        let config = args[0] != "schema";
        assert_eq!(out.contains("--config"), config, "{args:?}:\n{out}");
    }
    // `-c` is still accepted by `schema`, before or after it, and ignored.
    let (code, out, _) = cli(&["-c", "nowhere.toml", "schema"], &[], "");
    assert_eq!(code, 0);
    assert!(out.contains("\"title\": \"provisioning.toml\""));
    let (code, _, _) = cli(&["schema", "-c", "nowhere.toml"], &[], "");
    assert_eq!(code, 0);

    // The log options given to another command are an error, not silently ignored.
    let (code, _, err) = cli(&["--log-format", "json", "check"], &[], "");
    assert_eq!(code, 2);
    assert!(err.contains("options of `run` only"), "{err}");
    let (code, _, err) = cli(&["check", "--log-level", "debug"], &[], "");
    assert_eq!(code, 2);
    assert!(err.contains("--log-level"), "{err}");
}

/// A directory holding `p.toml`, a config with a server only, and that file's path.
fn server_file() -> (tempfile::TempDir, String) {
    let dir = tempfile::TempDir::new().unwrap();
    let config = dir.path().join("p.toml");
    std::fs::write(&config, SERVER).unwrap();
    let config = config.to_str().unwrap().to_owned();
    (dir, config)
}

/// Starts `provisiond ARGS` in `dir` and returns it with its "listening" log line.
fn serve(dir: &Path, args: &[&str]) -> (Child, String) {
    serve_env(dir, args, &[])
}

/// As `serve`, with more environment.
fn serve_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (Child, String) {
    let mut child = Command::new(binary())
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .env_remove("PROVISIOND_CONFIG")
        .env_remove("PROVISIOND_THREADS")
        .env_remove("TOKIO_WORKER_THREADS")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains("listening") {
                let _ = tx.send(line);
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(line) => (child, line),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("provisiond {args:?} did not start");
        }
    }
}

/// The names of a running process's threads that serve events (tokio's workers).
fn runtime_threads(child: &Child) -> usize {
    let tasks = std::fs::read_dir(format!("/proc/{}/task", child.id())).unwrap();
    tasks
        .filter_map(|task| std::fs::read_to_string(task.unwrap().path().join("comm")).ok())
        .filter(|name| name.trim() == "tokio-rt-worker")
        .count()
}

#[test]
fn threads_sets_how_many_threads_serve_and_the_start_line_says_it() {
    let (dir, config) = server_file();
    let config = config.as_str();
    let threads_of = |line: &str| {
        let record: Value = serde_json::from_str(line).expect("a JSON log line");
        let threads = record["threads"].as_u64();
        threads
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or_else(|| panic!("no threads: {line}"))
    };

    // The default: one per CPU, as many as the system lets this process use; tokio's own
    // variable is not read.
    let cpus = std::thread::available_parallelism().unwrap().get();
    for env in [
        &[][..],
        &[("TOKIO_WORKER_THREADS", "5")],
        &[("TOKIO_WORKER_THREADS", "x")],
    ] {
        let (child, line) = serve_env(dir.path(), &["--log-format", "json", "-c", config], env);
        let running = runtime_threads(&child);
        stop(child);
        assert_eq!(threads_of(&line), cpus, "{env:?}: {line}");
        assert_eq!(running, cpus, "{env:?}");
    }

    // More or fewer than the CPUs, by the option or by the environment; the option wins.
    for (args, env, want) in [
        (&["--threads", "1"][..], &[][..], 1_usize),
        (&["--threads", "3"], &[], 3),
        (&[], &[("PROVISIOND_THREADS", "2")], 2),
        (&["--threads", "1"], &[("PROVISIOND_THREADS", "2")], 1),
        // Empty is unset, as a unit's `Environment=PROVISIOND_THREADS=` line means.
        (&[], &[("PROVISIOND_THREADS", " ")], cpus),
    ] {
        let mut all = vec!["run", "--log-format", "json", "-c", config];
        all.extend_from_slice(args);
        let (child, line) = serve_env(dir.path(), &all, env);
        let running = runtime_threads(&child);
        stop(child);
        assert_eq!(threads_of(&line), want, "{args:?} {env:?}: {line}");
        assert_eq!(running, want, "{args:?} {env:?}");
    }

    // A number out of range is refused before anything starts, and says which option.
    for bad in ["0", "-1", "many", "5000"] {
        let option = format!("--threads={bad}");
        let (code, _, err) = cli(&["run", "-c", config, &option], &[], "");
        assert_eq!(code, 2, "--threads {bad}: {err}");
        assert!(err.contains("--threads"), "--threads {bad}: {err}");
    }
    for bad in ["0", "two"] {
        let (code, _, err) = cli(&["run", "-c", config], &[("PROVISIOND_THREADS", bad)], "");
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains(&format!(
                "PROVISIOND_THREADS={bad}: not a number of threads"
            )),
            "{err}"
        );
    }

    // The environment's is for `run`: another command ignores it, even a bad one (a
    // unit's `Environment=` line must not break `check`), but refuses the option.
    for value in ["2", "0"] {
        let (code, out, err) = cli(
            &["check", "-c", config],
            &[("PROVISIOND_THREADS", value)],
            "",
        );
        assert_eq!(code, 0, "PROVISIOND_THREADS={value}: {out}{err}");
    }
    let (code, _, err) = cli(&["--threads", "2", "check", "-c", config], &[], "");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("options of `run` only"), "{err}");
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn run_takes_its_options_with_or_without_the_subcommand() {
    let (dir, config) = server_file();
    let config = config.as_str();

    let (child, line) = serve(
        dir.path(),
        &["--log-format", "json", "--no-watch", "-c", config],
    );
    stop(child);
    let record: Value = serde_json::from_str(&line).expect("a JSON log line");
    assert_eq!(record["message"], "listening");
    assert_eq!(record["watching"], false, "{line}");

    let (child, line) = serve(dir.path(), &["run", "--log-format", "json", "-c", config]);
    stop(child);
    let record: Value = serde_json::from_str(&line).expect("a JSON log line");
    assert_eq!(record["watching"], true, "{line}");

    let (child, line) = serve(dir.path(), &["-c", config, "run", "--log-format", "pretty"]);
    stop(child);
    assert!(serde_json::from_str::<Value>(&line).is_err(), "{line}");
    assert!(
        line.contains("INFO") && line.contains("listening"),
        "{line}"
    );

    // Given before and after `run`, the one after wins; the others still apply.
    let (child, line) = serve(
        dir.path(),
        &[
            "--log-format",
            "pretty",
            "--no-watch",
            "run",
            "--log-format",
            "json",
            "-c",
            config,
        ],
    );
    stop(child);
    let record: Value = serde_json::from_str(&line).expect("a JSON log line");
    assert_eq!(record["watching"], false, "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn send_defaults_the_object_id_to_1_and_wants_an_integer() {
    let echo = HandlerServer::echo().await;
    let config = format!(
        "{SERVER}[[handler]]\nname = \"echo\"\nevents = [\"*\"]\nstage = \"before\"\nurl = {}\n",
        toml_str(echo.url("/"))
    );
    let sidecar = Sidecar::start(&config);
    let url = format!("http://{}", sidecar.addr);
    let dir = sidecar.dir.path();

    let (code, out, err) = run_binary(dir, &["send", "clients.update", "--url", &url]);
    assert_eq!(code, 0, "{err}");
    let reply: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(reply["event"]["object_id"], 1, "{reply}");
    assert_eq!(echo.calls()[0].json()["event"]["object_id"], 1);
    // The status and the event's id on stderr: the id the execution log has its calls
    // under, as the README's "execution log" looks it up.
    let id = err
        .strip_prefix("HTTP 200, event evt_")
        .and_then(|rest| rest.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("{err}"));
    let mut rows = Vec::new();
    for _ in 0..100 {
        let (_, body) = sidecar
            .get(&format!("/v1/executions?event_id=evt_{id}"))
            .await;
        rows = body["executions"].as_array().unwrap().clone();
        if !rows.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["handler"], "echo");

    let (code, out, err) = run_binary(
        dir,
        &["send", "clients.update", "--object-id", "12", "--url", &url],
    );
    assert_eq!(code, 0, "{err}");
    let reply: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(reply["event"]["object_id"], 12);

    let (code, _, err) = run_binary(
        dir,
        &[
            "send",
            "clients.update",
            "--object-id",
            "C-12",
            "--url",
            &url,
        ],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains(
            "invalid value 'C-12' for '--object-id <N>': must be an integer, as the billing's \
             object ids are"
        ),
        "{err}"
    );
    assert_eq!(echo.calls().len(), 2, "nothing is sent for a bad id");
}

#[tokio::test(flavor = "multi_thread")]
async fn client_commands_say_when_the_config_does_not_load_and_when_nothing_matches() {
    let sidecar = Sidecar::start(SERVER);
    let url = format!("http://{}", sidecar.addr);

    // The config names the sidecar but does not load (a variable is unset): without
    // --url the commands still go to the server.listen it names, without a token, and
    // say so, rather than asking whatever answers on the default address.
    let dir = tempfile::TempDir::new().unwrap();
    std::fs::write(
        dir.path().join("provisioning.toml"),
        format!(
            "[server]\nlisten = \"{}\"\ntoken = \"${{PROVISIOND_CLI_TEST_UNSET}}\"\n",
            sidecar.addr
        ),
    )
    .unwrap();
    for (args, said) in [
        (&["executions"][..], "no executions match"),
        (&["deadletters", "list"], "no dead letters"),
    ] {
        let (code, out, err) = run_binary(dir.path(), args);
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!((code, out.as_str()), (0, ""), "{args:?}: {err}");
        assert_eq!(lines.len(), 2, "{args:?}: {err}");
        assert!(
            lines[0].starts_with(
                "provisiond: warning: cannot load the config: provisioning.toml:3:9: \
                 server.token: environment variable `PROVISIOND_CLI_TEST_UNSET` is not set"
            ) && lines[0].ends_with(&format!(
                "; trying {url}, its server.listen, with no token (give --url to choose the \
                 sidecar)"
            )),
            "{args:?}: {err}"
        );
        assert_eq!(
            lines[1], said,
            "{args:?}: the sidecar the file names answered"
        );
    }
    // A file that is not TOML names no address: the default one is tried, and said so.
    let broken = tempfile::TempDir::new().unwrap();
    std::fs::write(broken.path().join("provisioning.toml"), "[server\n").unwrap();
    let (_, _, err) = run_binary(broken.path(), &["executions"]);
    let first = err.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("provisiond: warning: cannot load the config: provisioning.toml:1:")
            && first.ends_with(
                "; trying http://127.0.0.1:8600, the default address (give --url to choose \
                 the sidecar)"
            ),
        "{err}"
    );

    // With --url it goes there, and warns that no token is sent.
    let (code, out, err) = run_binary(dir.path(), &["executions", "--url", &url]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(lines[0].ends_with("; sending no token"), "{err}");
    assert_eq!(lines[1], "no executions match");

    // No config file at all and --url: nothing to warn about. Empty answers are said.
    let empty = tempfile::TempDir::new().unwrap();
    for (args, said) in [
        (&["executions", "--url", &url][..], "no executions match\n"),
        (
            &["executions", "--handler", "crm", "--url", &url],
            "no executions match\n",
        ),
        (&["deadletters", "list", "--url", &url], "no dead letters\n"),
        (
            &["deadletters", "list", "--handler", "crm", "--url", &url],
            "no dead letters match\n",
        ),
    ] {
        let (code, out, err) = run_binary(empty.path(), args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert_eq!(out, "", "{args:?}: stdout holds rows only");
        assert_eq!(err, said, "{args:?}");
    }
    // --json prints the reply as it is.
    let (code, out, err) = run_binary(empty.path(), &["executions", "--json", "--url", &url]);
    assert_eq!((code, err.as_str()), (0, ""));
    let reply: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(reply["count"], 0);
}

/// A stand-in sidecar whose execution log and dead letters hold `rows` rows each, with
/// long details: 1000 rows are some 300 KiB, more than a pipe buffers.
async fn full_of_rows(rows: u64) -> HandlerServer {
    let detail = "x".repeat(200);
    let executions: Vec<Value> = (1..=rows)
        .map(|id| {
            json!({"id": id, "time": "2026-11-26T10:00:00.000Z", "stage": "after",
                "handler": "crm", "event": "clients.create", "object_id": "12",
                "attempt": 1, "outcome": "failed", "code": 503, "duration_ms": 1.5,
                "excerpt": "", "error": detail})
        })
        .collect();
    let letters: Vec<Value> = (1..=rows)
        .map(|id| {
            json!({"id": id, "handler": "crm", "event": "clients.create",
                "object_id": "12", "entity": "clients/12", "attempts": 25, "reason": detail,
                "enqueued_at": "2026-11-26T09:00:00.000Z",
                "died_at": "2026-11-26T10:00:00.000Z", "message_id": "msg_1",
                "envelope": {}})
        })
        .collect();
    let executions = json!({"count": rows, "executions": executions}).to_string();
    let letters = json!({"count": rows, "deadletters": letters}).to_string();
    HandlerServer::start(move |call| {
        let body = match call.path.as_str() {
            "/v1/executions" => executions.clone(),
            "/v1/deadletters" => letters.clone(),
            "/healthz" => r#"{"status": "ok"}"#.to_owned(),
            _ => r#"{"event": {}, "data": {}}"#.to_owned(),
        };
        async move { reply(200, body) }
    })
    .await
}

/// A pipe whose reader has gone: every write to it fails with EPIPE.
fn closed_pipe() -> std::io::PipeWriter {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    writer
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pipe_closed_early_ends_the_output_quietly_and_a_full_disk_fails_in_one_line() {
    let sidecar = full_of_rows(1000).await;
    let url = sidecar.url("");
    let dir = tempfile::TempDir::new().unwrap();
    std::fs::write(dir.path().join("good.toml"), "# no handlers\n").unwrap();
    // Errors enough for many lines: `check` prints them on stderr.
    let bad: String = (0..2000).map(|i| format!("key{i} = 1\n")).collect();
    std::fs::write(dir.path().join("bad.toml"), format!("[server]\n{bad}")).unwrap();

    // `provisiond executions --limit 1000 | head -c 100`: the reader goes after 100 bytes
    // of some 300 KiB, with the rest still to write.
    let mut child = Command::new(binary())
        .args(["executions", "--limit", "1000", "--url", &url])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut head = [0; 100];
    child.stdout.take().unwrap().read_exact(&mut head).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!((out.status.code(), err.as_ref()), (Some(0), ""));
    assert!(String::from_utf8_lossy(&head).starts_with("TIME "));

    // Every command that prints, to a pipe closed before it starts: no panic, no
    // message, and the exit code it has otherwise (`--follow` stops too).
    let commands: &[&[&str]] = &[
        &["executions", "--url", &url],
        &["executions", "--json", "--url", &url],
        &["executions", "--follow", "--url", &url],
        &["executions", "--follow", "--json", "--url", &url],
        &["deadletters", "list", "--url", &url],
        &["send", "clients.create", "--url", &url],
        &["health", "--url", &url],
        &["check", "-c", "good.toml"],
        &["explain", "clients.create", "-c", "good.toml"],
        &["schema"],
        &["man"],
        &["completions", "bash"],
    ];
    for args in commands {
        let (code, _, err) = run_binary_to(dir.path(), args, closed_pipe().into(), Stdio::piped());
        assert_eq!(code, 0, "{args:?}: {err}");
        // `send` says the reply's status on stderr, and nothing else.
        let said = if args[0] == "send" { "HTTP 200" } else { "" };
        assert_eq!(err.lines().next().unwrap_or_default(), said, "{args:?}");
    }
    // `check 2>&1 | head -1` on a bad file: its errors go to the closed pipe too, and it
    // still fails as a check (1), not as a panic (101).
    let pipe = closed_pipe();
    let stderr = pipe.try_clone().unwrap();
    let (code, _, _) = run_binary_to(
        dir.path(),
        &["check", "-c", "bad.toml"],
        pipe.into(),
        stderr.into(),
    );
    assert_eq!(code, 1);

    // `>/dev/full`: one line on stderr, however many writes failed, and exit 1.
    for args in commands {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let (code, _, err) = run_binary_to(dir.path(), args, full.into(), Stdio::piped());
        assert_eq!(code, 1, "{args:?}: {err}");
        let err = err.trim_start_matches("HTTP 200\n");
        assert_eq!(
            err, "provisiond: cannot write to stdout: No space left on device (os error 28)\n",
            "{args:?}"
        );
    }
}
