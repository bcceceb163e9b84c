//! `provisiond check` and `schema`, the shipped configs, and the default config serving.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::json;

fn check(path: &Path, env: &[(&str, &str)]) -> (i32, String, String) {
    let mut command = Command::new(binary());
    command.arg("check").arg("-c").arg(path);
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const MISTAKES: &str = r#"[server]
listen = "127.0.0.1:8600"
colour = "blue"

[[handler]]
name = "crm"
events = ["clients.crate"]
stage = "before"
url = "http://127.0.0.1:5001/"
timeout = "5 parsecs"

[[handler]]
name = "crm"
events = ["clients.create"]
stage = "before"
url = "http://127.0.0.1:5001/"
command = ["/bin/true"]

[[handler]]
name = "switch"
events = ["clients.balance_zero"]
stage = "after"
url = "http://switch/${SWITCH_TOKEN_MISSING}"
match = { "data.name" = { regex = "([a-z" } }
when = "data.balance <"
"#;

#[test]
fn check_reports_every_mistake_with_its_line_and_column() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("provisioning.toml");
    std::fs::write(&path, MISTAKES).unwrap();
    let (code, stdout, stderr) = check(&path, &[]);
    assert_eq!(code, 1, "check exits 1 on errors; stdout: {stdout}");
    let file = path.display().to_string();
    let expected = [
        format!("{file}:3:1: server.colour: unknown key `colour`"),
        format!(
            "{file}:7:11: handler[0].events[0]: unknown event \"clients.crate\" (did you mean \"clients.create\"?)"
        ),
        format!("{file}:10:11: handler[0].timeout: invalid duration \"5 parsecs\""),
        format!("{file}:13:8: handler[1].name: duplicate handler name \"crm\""),
        format!(
            "{file}:17:11: handler[1].command: a handler has either `url` (HTTP) or `command` (script), not both"
        ),
        format!(
            "{file}:23:7: handler[2].url: environment variable `SWITCH_TOKEN_MISSING` is not set"
        ),
        format!("{file}:24:35: handler[2].match.\"data.name\".regex: invalid regex \"([a-z\""),
        format!("{file}:25:8: handler[2].when: invalid CEL expression"),
    ];
    for want in &expected {
        assert!(
            stderr.lines().any(|l| l.starts_with(want.as_str())),
            "missing {want:?} in:\n{stderr}"
        );
    }
    assert!(stderr.contains(&format!("{file}: 8 errors")), "{stderr}");
}

/// A bad file at start-up is an error exit with the same messages as `check`, in the
/// log's format.
#[test]
fn run_refuses_a_bad_file_with_the_messages_of_check() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("provisioning.toml");
    std::fs::write(&path, MISTAKES).unwrap();
    let (_, _, checked) = check(&path, &[]);
    let out = Command::new(binary())
        .args(["run", "--log-format", "json", "-c"])
        .arg(&path)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let errors: Vec<&str> = lines
        .iter()
        .filter(|l| l["message"] == "invalid config")
        .map(|l| l["error"].as_str().unwrap())
        .collect();
    let expected: Vec<&str> = checked
        .lines()
        .filter(|l| !l.ends_with(" errors"))
        .collect();
    assert_eq!(errors, expected);
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "not started, fix the config first")
    );
}

#[test]
fn check_names_syntax_errors_and_missing_files() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(&path, "[server]\nlisten = \"127.0.0.1:8600\n").unwrap();
    let (code, _, stderr) = check(&path, &[]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains(&format!("{}:2:", path.display())),
        "{stderr}"
    );
    assert!(stderr.contains("invalid TOML"), "{stderr}");

    let (code, _, stderr) = check(&dir.path().join("absent.toml"), &[]);
    assert_eq!(code, 1);
    assert!(stderr.contains("cannot read the file"), "{stderr}");
}

#[test]
fn check_summarises_a_good_file_and_hides_secrets() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        r#"
[server]
token = "${TOKEN}"
[[handler]]
name = "crm"
events = ["clients.*"]
stage = "before"
url = "https://crm.example/hook?key=${CRM_KEY}"
headers = { Authorization = "Bearer ${CRM_KEY}" }
"#,
    )
    .unwrap();
    let (code, stdout, stderr) = check(&path, &[("TOKEN", "tok-123"), ("CRM_KEY", "key-456")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("ok, 1 handler (1 before, 0 after)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("https://crm.example/hook?key=${CRM_KEY}"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("tok-123") && !stdout.contains("key-456"),
        "{stdout}"
    );
}

/// Every config the project ships, and the default one.
fn shipped_configs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = vec![root.join("provisioning.toml")];
    let mut stack = vec![root.join("examples")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "toml") && !is_test_cases(&path) {
                found.push(path);
            }
        }
    }
    found
}

/// `provisiond test` case files live beside the configs; they are not configs.
fn is_test_cases(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| t.contains("[[case]]"))
}

#[test]
fn the_default_config_and_every_example_pass_check() {
    let configs = shipped_configs();
    assert!(configs.len() >= 3, "{configs:?}");
    for path in configs {
        // examples/kubernetes takes its CRM token from the environment.
        let (code, stdout, stderr) = check(&path, &[("CRM_TOKEN", "ci-dummy")]);
        assert_eq!(code, 0, "{}: {stderr}", path.display());
        assert!(stdout.contains(": ok"), "{stdout}");
    }
}

#[test]
fn the_checked_in_schema_is_current() {
    let out = Command::new(binary()).arg("schema").output().unwrap();
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schema/provisioning.schema.json");
    let checked_in = std::fs::read_to_string(&path).unwrap();
    assert!(
        generated == checked_in,
        "schema/provisioning.schema.json is stale; regenerate it with\n  \
         cargo run -- schema > schema/provisioning.schema.json"
    );
    let schema: serde_json::Value = serde_json::from_str(&generated).unwrap();
    assert_eq!(schema["additionalProperties"], false);
    assert_eq!(
        schema["$defs"]["RawHandler"]["properties"]["stage"]["$ref"],
        "#/$defs/Stage"
    );
}

/// The README's first command serves the default config: the two script handlers in it
/// work as documented.
#[tokio::test(flavor = "multi_thread")]
async fn the_default_config_serves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::TempDir::new().unwrap();
    let text = std::fs::read_to_string(root.join("provisioning.toml"))
        .unwrap()
        .replace("listen = \"127.0.0.1:8600\"", "listen = \"127.0.0.1:0\"");
    std::os::unix::fs::symlink(root.join("examples"), dir.path().join("examples")).unwrap();
    let sidecar = Sidecar::start_in(dir, &text, &[]);

    let (status, body) = sidecar.send("clients.create", 1, json!({"name": ""})).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        body,
        json!({"error": {"handler": "require-client-name", "message": "a client needs a name"}})
    );
    let (status, body) = sidecar
        .send("clients.create", 2, json!({"name": "  acme ltd"}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["name"], "Acme ltd");

    // The after-stage script is delivered to, durably, and the execution log says so.
    let (status, _) = sidecar.send("clients.balance_zero", 2, json!({})).await;
    assert_eq!(status, 200);
    let mut delivered = false;
    for _ in 0..100 {
        let (_, log) = sidecar
            .get("/v1/executions?handler=block-on-switch&outcome=delivered")
            .await;
        if log["count"].as_u64() == Some(1) {
            delivered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(delivered, "block-on-switch was not delivered to");
}
