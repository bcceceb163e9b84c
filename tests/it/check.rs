//! `provisiond check` and `schema`, the shipped configs, and the default config serving.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;
use serde_json::{Value, json};

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

/// A handler whose `stage` is missing or misspelt is still checked through: one run of
/// `check` shows everything to fix.
#[test]
fn check_reports_the_other_mistakes_of_a_handler_with_a_bad_required_key() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("provisioning.toml");
    std::fs::write(
        &path,
        r#"[[handler]]
name = "b c"
events = ["clients*"]
url = "http://127.0.0.1:5001/"

[[handler]]
name = "b"
events = ["clients.create"]
stage = "Before"
priority = "high"
url = "http://127.0.0.1:5001/"
retry = { attempts = 3, backoff = "1s" }
"#,
    )
    .unwrap();
    let (code, _, stderr) = check(&path, &[]);
    assert_eq!(code, 1, "{stderr}");
    let file = path.display().to_string();
    let expected = [
        format!("{file}:1:1: handler[0]: missing `stage`"),
        format!("{file}:2:8: handler[0].name: \"b c\" is not a valid handler name"),
        format!("{file}:3:11: handler[0].events[0]: `clients*` is not a valid event name"),
        format!("{file}:9:9: handler[1].stage: unknown value `Before`"),
        format!("{file}:10:12: handler[1].priority: invalid type"),
        format!("{file}:12:9: handler[1].retry: only applies to the after stage"),
    ];
    for want in &expected {
        assert!(
            stderr.lines().any(|l| l.starts_with(want.as_str())),
            "missing {want:?} in:\n{stderr}"
        );
    }
    // Nothing about the placeholders put in for the missing stage.
    assert!(stderr.contains(&format!("{file}: 6 errors")), "{stderr}");
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
fn an_empty_file_is_refused_alike_by_check_and_run() {
    let dir = tempfile::TempDir::new().unwrap();
    for text in ["", "\n  \n"] {
        let path = dir.path().join("provisioning.toml");
        std::fs::write(&path, text).unwrap();
        let (code, stdout, stderr) = check(&path, &[]);
        assert_eq!(code, 1, "check passed an empty file: {stdout}");
        let file = path.display().to_string();
        assert!(
            stderr.starts_with(&format!("{file}: the file is empty")),
            "{stderr}"
        );
        let out = Command::new(binary())
            .args(["run", "--log-format", "json", "-c"])
            .arg(&path)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "run started on an empty file");
        let logged = String::from_utf8_lossy(&out.stderr);
        assert!(
            logged.contains(&format!("{file}: the file is empty")),
            "{logged}"
        );
    }
    // A comment is a config without handlers, for whoever wants one.
    let path = dir.path().join("comment.toml");
    std::fs::write(&path, "# no handlers yet\n").unwrap();
    let (code, stdout, stderr) = check(&path, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("0 handlers"), "{stdout}");
}

/// Every duration key with a value past the upper bound, and the key path each names.
const TOO_LONG: &[(&str, &str)] = &[
    ("[server]\ndeadline = \"500000000000y\"", "server.deadline"),
    (
        "[server]\nheader_timeout = \"400y\"",
        "server.header_timeout",
    ),
    (
        "[server]\nshutdown_grace = \"367d\"",
        "server.shutdown_grace",
    ),
    ("[store]\ndedupe_window = \"2y\"", "store.dedupe_window"),
    (
        "[store]\nkeep_executions = { age = \"5000y\" }",
        "store.keep_executions.age",
    ),
    ("[defaults]\ntimeout = \"9999999h\"", "defaults.timeout"),
    (
        "[defaults]\nretry = { backoff = \"2y\", max_backoff = \"3y\" }",
        "defaults.retry.backoff",
    ),
    (
        "[[handler]]\nname = \"h\"\nevents = [\"*\"]\nstage = \"after\"\nurl = \"http://127.0.0.1:1/\"\n\
         timeout = \"100y\"",
        "handler[0].timeout",
    ),
    (
        "[[handler]]\nname = \"h\"\nevents = [\"*\"]\nstage = \"after\"\nurl = \"http://127.0.0.1:1/\"\n\
         retry = { max_backoff = \"1000000000y\" }",
        "handler[0].retry.max_backoff",
    ),
];

#[test]
fn check_refuses_durations_past_the_upper_bound_naming_the_place() {
    let dir = tempfile::TempDir::new().unwrap();
    for (text, key) in TOO_LONG {
        let path = dir.path().join("provisioning.toml");
        std::fs::write(&path, format!("{text}\n")).unwrap();
        let (code, stdout, stderr) = check(&path, &[]);
        assert_eq!(code, 1, "{key}: check passed: {stdout}");
        // file:line:col: key: message
        let line = stderr.lines().next().unwrap();
        let (place, message) = line.split_once(&format!(": {key}: ")).unwrap_or_else(|| {
            panic!("{key} not named: {stderr}");
        });
        let place: Vec<&str> = place.rsplitn(3, ':').collect();
        assert_eq!(place[2], path.display().to_string(), "{line}");
        let (row, col): (usize, usize) = (place[1].parse().unwrap(), place[0].parse().unwrap());
        let value_line = text.lines().nth(row - 1).unwrap();
        assert!(
            value_line[col - 1..].starts_with('"'),
            "{line} points at {value_line:?}"
        );
        assert!(message.contains("at most 1 year"), "{line}");
    }
    // The bound itself is fine.
    let path = dir.path().join("provisioning.toml");
    std::fs::write(
        &path,
        "[server]\ndeadline = \"1y\"\n[store]\nkeep_executions = { age = \"365d\" }\n",
    )
    .unwrap();
    let (code, _, stderr) = check(&path, &[]);
    assert_eq!(code, 0, "{stderr}");
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

/// One `]` left out is one error, at the line after it, with a hint; not the parser's
/// cascade of errors while it recovers.
#[test]
fn check_reports_a_missing_bracket_once_with_a_hint() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("provisioning.toml");
    let mut text = String::from(
        "[[handler]]\nname = \"a\"\nevents = [\"clients.create\", \"clients.update\"\n\
         stage = \"before\"\nurl = \"http://127.0.0.1:5001/\"\n",
    );
    for i in 0..5 {
        text.push_str(&format!(
            "\n[[handler]]\nname = \"h{i}\"\nevents = [\"*\"]\nstage = \"after\"\n\
             url = \"http://127.0.0.1:5001/\"\n"
        ));
    }
    std::fs::write(&path, text).unwrap();
    let (code, _, stderr) = check(&path, &[]);
    assert_eq!(code, 1, "{stderr}");
    let file = path.display().to_string();
    assert_eq!(
        stderr,
        format!(
            "{file}:4:1: invalid TOML: missing comma between array elements, expected `,` \
             (is a `]` missing on an earlier line?)\n{file}: 1 error\n"
        )
    );
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

/// The summary shows a URL as written in the file, `${...}` and all, with only the
/// password masked; not percent-encoded by a round trip through a URL parser.
#[test]
fn check_shows_urls_as_written_with_the_password_masked() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        r#"[[handler]]
name = "crm"
events = ["clients.*"]
stage = "before"
url = "http://user:${PW}@crm/${PATHX:-def}/$${literal}"
"#,
    )
    .unwrap();
    let (code, stdout, stderr) = check(&path, &[("PW", "pw-789")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("  POST http://user:***@crm/${PATHX:-def}/$${literal}\n"),
        "{stdout}"
    );
    assert!(!stdout.contains("pw-789"), "{stdout}");
}

/// A shared store's URL holds a password: `check` shows where the database is, never
/// the password, whether it is in the file or comes from the environment.
#[test]
fn check_shows_a_postgres_store_without_its_password() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("p.toml");
    for (url, env, shown) in [
        (
            "${PROVISIOND_PG_URL}",
            vec![(
                "PROVISIOND_PG_URL",
                "postgres://app:pw-4417@db1,db2/billing?target_session_attrs=read-write",
            )],
            "postgres://app:***@db1,db2/billing?target_session_attrs=read-write",
        ),
        (
            "postgres://app:pw%40-4417@db1/billing?application_name=hooks",
            vec![],
            "postgres://app:***@db1/billing?application_name=hooks",
        ),
        (
            "host=db1 user=app password='pw 4417'",
            vec![],
            "host=db1 user=app password=***",
        ),
    ] {
        std::fs::write(
            &path,
            format!("[store]\nbackend = \"postgres\"\nurl = \"{url}\"\nschema = \"hooks\"\n"),
        )
        .unwrap();
        let (code, stdout, stderr) = check(&path, &env);
        assert_eq!(code, 0, "{stderr}");
        assert!(
            stdout.contains(&format!(", store postgres {shown} (schema hooks)")),
            "{stdout}"
        );
        assert!(
            !stdout.contains("4417") && !stderr.contains("4417"),
            "{stdout}{stderr}"
        );
    }
}

/// A bad URL that came from the environment: the message says so and shows the URL as
/// written, never the value.
#[test]
fn check_never_prints_a_bad_url_from_the_environment() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        "[[handler]]\nname = \"crm\"\nevents = [\"Clients.Create\"]\nstage = \"before\"\n\
         url = \"${CRM_URL}\"\ntimeout = \"-5s\"\n",
    )
    .unwrap();
    let (code, _, stderr) = check(&path, &[("CRM_URL", "ftp://token-9871@crm/")]);
    assert_eq!(code, 1, "{stderr}");
    let file = path.display().to_string();
    for want in [
        format!(
            "{file}:3:11: handler[0].events[0]: `Clients.Create` is not a valid event name: \
             event names are lower-case (did you mean \"clients.create\"?)"
        ),
        format!(
            "{file}:5:7: handler[0].url: \"${{CRM_URL}}\" must be an http:// or https:// URL \
             (the value came from the environment variable `CRM_URL`)"
        ),
        format!(
            "{file}:6:11: handler[0].timeout: invalid duration \"-5s\": durations cannot be negative"
        ),
    ] {
        assert!(
            stderr.lines().any(|l| l == want),
            "missing {want:?} in:\n{stderr}"
        );
    }
    assert!(!stderr.contains("token-9871"), "{stderr}");
}

/// A script that is not there (yet) is a warning, not an error: it may be deployed
/// separately from the config.
#[test]
fn check_warns_about_a_missing_script_and_still_passes() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        "[[handler]]\nname = \"x\"\nevents = [\"*\"]\nstage = \"after\"\n\
         command = [\"./nope.sh\", \"--flag\"]\n\n\
         [[handler]]\nname = \"y\"\nevents = [\"*\"]\nstage = \"after\"\ncommand = [\"true\"]\n",
    )
    .unwrap();
    let (code, stdout, stderr) = check(&path, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(": ok, 2 handlers"), "{stdout}");
    let script = dir.path().join("nope.sh");
    assert_eq!(
        stderr,
        format!(
            "warning: handler \"x\": command \"./nope.sh\" not found at {} (fine if it is \
             deployed separately)\n",
            script.display()
        )
    );
}

/// A misspelt operator in `match` is read as a field name; `check` passes the file and
/// says which operator was probably meant, in the words the README shows. The sidecar
/// then compares the field, as the warning says: a name matching `^A` is not enough.
#[tokio::test(flavor = "multi_thread")]
async fn check_warns_about_a_match_key_like_a_misspelt_operator() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("p.toml");
    let handler = HandlerServer::echo().await;
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[handler]]\nname = \"vip\"\n\
         events = [\"clients.create\"]\nstage = \"before\"\nurl = \"{}\"\n\
         match = {{ \"data.name\" = {{ regx = \"^A\" }} }}\n",
        handler.url("/")
    );
    std::fs::write(&path, &text).unwrap();
    let (code, stdout, stderr) = check(&path, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(": ok, 1 handler"), "{stdout}");
    let readme = readme();
    assert!(
        readme.contains(&format!("```\n{stderr}```\n")),
        "the README does not show this warning:\n{stderr}"
    );

    let sidecar = Sidecar::start(&text);
    let (status, _) = sidecar
        .send("clients.create", 1, json!({"name": "Acme"}))
        .await;
    assert_eq!(status, 200);
    let (status, _) = sidecar
        .send("clients.create", 2, json!({"name": {"regx": "^A"}}))
        .await;
    assert_eq!(status, 200);
    let calls = handler.calls();
    assert_eq!(calls.len(), 1, "only the event with a field data.name.regx");
    assert_eq!(calls[0].json()["event"]["object_id"], 2);
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
        // The examples take their tokens from the environment.
        let (code, stdout, stderr) = check(
            &path,
            &[
                ("CRM_TOKEN", "ci-dummy"),
                ("PROVISIOND_TOKEN", "ci-dummy"),
                (
                    "PROVISIOND_PG_URL",
                    "postgres://provisiond:ci-dummy@127.0.0.1/billing",
                ),
            ],
        );
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
    let handler = &schema["$defs"]["RawHandler"]["properties"];
    assert_eq!(handler["stage"]["$ref"], "#/$defs/Stage");
    // What an editor can check and complete beyond types.
    assert_eq!(handler["name"]["pattern"], "^[A-Za-z0-9_-]+$");
    assert_eq!(handler["events"]["minItems"], 1);
    assert_eq!(
        handler["method"]["enum"],
        json!(["POST", "PUT", "PATCH", "post", "put", "patch"])
    );
    assert_eq!(handler["method"]["default"], "POST");
    assert_eq!(handler["priority"]["default"], 100);
    assert_eq!(handler["enabled"]["default"], true);
    assert_eq!(handler["modifies"]["default"], false);
    assert_eq!(handler["max_concurrency"]["minimum"], 1);
    let server = &schema["$defs"]["RawServer"]["properties"];
    assert_eq!(server["listen"]["default"], "127.0.0.1:8600");
    // The bounds `check` holds the values to, where the schema can say them.
    assert_eq!(server["max_depth"]["maximum"], 128);
    let store = &schema["$defs"]["RawStore"]["properties"];
    assert_eq!(store["pool"]["maximum"], 64);
    assert!(
        store["schema"]["pattern"]
            .as_str()
            .unwrap()
            .starts_with("^(?!pg_)"),
        "names starting with pg_ are PostgreSQL's own"
    );
    assert_eq!(
        schema["$defs"]["RawDefaults"]["properties"]["timeout"]["default"],
        "5s"
    );
}

/// `check` on the repository's own `provisioning.toml` prints the summary the README
/// shows, line for line.
#[test]
fn check_prints_the_summary_the_readme_shows() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(binary())
        .args(["check", "-c", "provisioning.toml"])
        .current_dir(root)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.starts_with("provisioning.toml: ok, 4 handlers"),
        "{stdout}"
    );
    let readme = readme();
    assert!(
        readme.contains(&format!("```\n{stdout}```\n")),
        "the README's summary of provisioning.toml is not what check prints:\n{stdout}"
    );
}

/// The README's CI job, run as written on the Kubernetes example it names: its commands,
/// with only the environment variables it passes (`-e NAME=VALUE`).
#[test]
fn the_readme_ci_job_passes_on_the_kubernetes_example() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = readme();
    let job = code_blocks(&readme, "yaml")
        .find(|b| b.contains(".github/workflows/provisioning.yml"))
        .expect("the README has the CI job");
    let words: Vec<&str> = job.split_whitespace().collect();
    let env: Vec<(&str, &str)> = words
        .windows(2)
        .filter(|w| w[0] == "-e")
        .map(|w| w[1].split_once('=').expect("-e NAME=VALUE"))
        .collect();
    let commands: Vec<&str> = job
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|c| c.starts_with("check ") || c.starts_with("test "))
        .collect();
    assert!(!env.is_empty(), "{job}");
    assert_eq!(commands.len(), 2, "{job}");
    for command in commands {
        let out = Command::new(binary())
            .args(command.split_whitespace())
            .current_dir(root.join("examples/kubernetes"))
            .env_clear()
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "`provisiond {command}` with {env:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
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

/// The example echo handler (the billing docs' one) behind the default config, as its
/// comment says to run it: the billing gets its envelope back, in Python's spelling of
/// numbers, as the README warns.
#[tokio::test(flavor = "multi_thread")]
async fn the_example_echo_handler_works_behind_the_default_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut echo = KillOnDrop(
        Command::new("python3")
            .arg(root.join("examples/handlers/echo.py"))
            .arg(port.to_string())
            .spawn()
            .expect("python3 runs the example"),
    );
    let listening = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(listening, "echo.py never listened: {:?}", echo.0.try_wait());
    let text = std::fs::read_to_string(root.join("provisioning.toml")).unwrap();
    let (head, echo_block) = text.split_once("name = \"echo\"").unwrap();
    let text = format!(
        "{head}name = \"echo\"{}",
        echo_block
            .replacen("enabled = false", "enabled = true", 1)
            .replacen("127.0.0.1:5001", &format!("127.0.0.1:{port}"), 1)
    )
    .replace("listen = \"127.0.0.1:8600\"", "listen = \"127.0.0.1:0\"");
    let dir = tempfile::TempDir::new().unwrap();
    std::os::unix::fs::symlink(root.join("examples"), dir.path().join("examples")).unwrap();
    let sidecar = Sidecar::start_in(dir, &text, &[]);
    let (status, body) = sidecar
        .post(
            r#"{"event":{"dt":"2026-11-26T10:00:00+00:00","events_id":"clients.update","object_id":7},"data":{"id":7,"balance":1.50,"limit":-0}}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["event"]["object_id"], 7);
    assert_eq!(body["data"]["id"], 7);
    assert_eq!(body["data"]["balance"].to_string(), "1.5");
    assert_eq!(body["data"]["limit"].to_string(), "0");
    // The execution log is written off the event's path, within a second.
    let mut log = Value::Null;
    for _ in 0..100 {
        log = sidecar.get("/v1/executions?handler=echo").await.1;
        if log["count"] == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(log["executions"][0]["outcome"], "allowed", "{log}");
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn warnings_are_printed_by_check_and_logged_by_run_at_start_and_reload() {
    let config = format!(
        "{SERVER}{}",
        after_handler(
            "crm",
            "http://127.0.0.1:9/",
            "headers = { Authorization = \"Bearer ${CRM_TOKEN}\" }"
        )
    );
    let warning = "handler \"crm\": header Authorization: the environment variable \
                   `CRM_TOKEN` is set but empty, so it adds nothing to the value sent";
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("provisioning.toml");
    std::fs::write(&path, &config).unwrap();
    let (code, _, err) = check(&path, &[("CRM_TOKEN", "")]);
    assert_eq!(
        (code, err.as_str()),
        (0, format!("warning: {warning}\n").as_str())
    );

    let sidecar = Sidecar::start_in(dir, &config, &[("CRM_TOKEN", "")]);
    let logged = sidecar.wait_for_log(std::time::Duration::from_secs(10), |v| {
        v["message"] == "config warning"
    });
    assert_eq!(logged.expect("logged at start")["warning"], warning);
    // A reload that brings another warning logs it.
    write_atomic(
        &sidecar.config_path,
        &format!(
            "{SERVER}deadline = \"2s\"\n{}",
            "[[handler]]\nname = \"slow\"\nevents = [\"*\"]\nstage = \"before\"\n\
             url = \"http://127.0.0.1:9/\"\ntimeout = \"5s\"\n"
        ),
    );
    let logged = sidecar.wait_for_log(std::time::Duration::from_secs(30), |v| {
        v["message"] == "config warning"
            && v["warning"]
                .as_str()
                .is_some_and(|w| w.starts_with("handler \"slow\": timeout 5s is longer"))
    });
    assert!(logged.is_some(), "{:?}", sidecar.logs());
}
