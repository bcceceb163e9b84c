//! The command line's shape: which options each command takes and shows, the forms of
//! `run`, and the client commands' defaults, warnings and empty answers.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;
use serde_json::Value;

const RUN_OPTIONS: [&str; 3] = ["--log-format", "--log-level", "--no-watch"];

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

/// Starts `provisiond ARGS` in `dir` and returns it with its "listening" log line.
fn serve(dir: &Path, args: &[&str]) -> (Child, String) {
    let mut child = Command::new(binary())
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .env_remove("PROVISIOND_CONFIG")
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

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn run_takes_its_options_with_or_without_the_subcommand() {
    let dir = tempfile::TempDir::new().unwrap();
    let config = dir.path().join("p.toml");
    std::fs::write(&config, SERVER).unwrap();
    let config = config.to_str().unwrap();

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
