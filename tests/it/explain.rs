//! `provisiond explain` and `provisiond test` on a config with filters, priorities, a
//! disabled handler and both stages; and the example cases files.

use std::path::Path;

use crate::common::*;

const CONFIG: &str = r#"
[[handler]]
name = "crm-check"
events = ["clients.create", "clients.update"]
stage = "before"
priority = 20
url = "http://127.0.0.1:5001/check?key=${CRM_KEY}"
on_error = "deny"

[[handler]]
name = "tidy-name"
events = ["clients.*"]
stage = "before"
priority = 10
command = ["hooks/tidy.py", "--token", "${CRM_KEY}"]
modifies = true
match = { "data.name" = { exists = true } }

[[handler]]
name = "vip"
events = ["clients.create"]
stage = "before"
priority = 5
url = "http://127.0.0.1:5002/vip"
match = { "data.companies_id" = 3 }

[[handler]]
name = "acme"
events = ["clients.create"]
stage = "before"
url = "http://127.0.0.1:5003/acme"
when = 'has(data.email) && data.email.endsWith("@acme.example")'

[[handler]]
name = "paused"
events = ["*"]
stage = "before"
priority = 1
url = "http://127.0.0.1:5004/"
enabled = false

[[handler]]
name = "block-on-switch"
events = ["clients.balance_zero"]
stage = "after"
command = ["hooks/block.sh"]

[[handler]]
name = "crm-sync"
events = ["clients.*"]
stage = "after"
priority = 50
url = "http://crm.example/sync"
match = { "data.balance" = { lt = 0 } }
"#;

const ENV: &[(&str, &str)] = &[("CRM_KEY", "key-SECRET-9")];

fn config_file(dir: &Path) -> String {
    let path = dir.join("provisioning.toml");
    std::fs::write(&path, CONFIG).unwrap();
    path.display().to_string()
}

#[test]
fn explain_lists_who_runs_in_order_and_why_the_others_do_not() {
    let dir = tempfile::TempDir::new().unwrap();
    let config = config_file(dir.path());
    let data = r#"{"name": "  acme", "companies_id": 4, "email": "ops@acme.example"}"#;
    let (code, stdout, stderr) = cli(
        &[
            "explain",
            "clients.create",
            "--data",
            "-",
            "--object-id",
            "12",
            "-c",
            &config,
        ],
        ENV,
        data,
    );
    assert_eq!(code, 0, "{stderr}");
    let expected = format!(
        "clients.create, object_id 12, config {config}

before stage, in this order:
  1. tidy-name        priority 10    hooks/tidy.py --token ${{CRM_KEY}}  (may change the data)
  2. crm-check        priority 20    POST http://127.0.0.1:5001/check?key=${{CRM_KEY}}
  3. acme             priority 100   POST http://127.0.0.1:5003/acme

after stage, once the event is allowed:
  (none)

not run:
  vip              before  match condition false: data.companies_id = 3
  paused           before  disabled (enabled = false)
  block-on-switch  after   its events do not match: events = [\"clients.balance_zero\"]
  crm-sync         after   match condition false: data.balance lt 0

explain calls no handler: filters were evaluated on the data given, as if
every before-stage handler allowed the event and left the data unchanged. A
handler may deny the event, and one marked \"may change the data\" may change
what the filters after it see.
"
    );
    assert_eq!(stdout, expected);
    assert!(!stdout.contains("SECRET"));

    // Another envelope: the VIP goes first, the CEL expression is false, and the after
    // stage takes the event.
    let data_file = dir.path().join("data.json");
    std::fs::write(&data_file, r#"{"companies_id": "3", "balance": -2.5}"#).unwrap();
    let (code, stdout, stderr) = cli(
        &[
            "explain",
            "clients.update",
            "--data",
            data_file.to_str().unwrap(),
            "-c",
            &config,
        ],
        ENV,
        "",
    );
    assert_eq!(code, 0, "{stderr}");
    for line in [
        "  1. crm-check        priority 20 ",
        "  1. crm-sync         priority 50    POST http://crm.example/sync",
        "  tidy-name        before  match condition false: data.name exists = true",
        "  vip              before  its events do not match: events = [\"clients.create\"]",
        "  acme             before  its events do not match",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }

    let (code, stdout, _) = cli(
        &["explain", "clients.create", "--data", "-", "-c", &config],
        ENV,
        r#"{"companies_id": 3, "email": "x@example.org"}"#,
    );
    assert_eq!(code, 0);
    assert!(stdout.contains("  1. vip "), "{stdout}");
    assert!(
        stdout.contains(
            "  acme             before  when is false: has(data.email) && data.email.endsWith(\"@acme.example\")"
        ),
        "{stdout}"
    );
}

#[test]
fn explain_refuses_bad_input() {
    let dir = tempfile::TempDir::new().unwrap();
    let config = config_file(dir.path());
    let (code, _, stderr) = cli(
        &["explain", "clients.create", "--data", "-", "-c", &config],
        ENV,
        "[1, 2]",
    );
    assert_eq!(code, 1);
    assert!(
        stderr.contains("the data must be a JSON object, got an array"),
        "{stderr}"
    );
    // A whole envelope pasted where the data goes (a dead letter's, say) is explained as
    // given, with a warning that it is taken as the data.
    let (code, stdout, stderr) = cli(
        &["explain", "clients.update", "--data", "-", "-c", &config],
        ENV,
        r#"{"event": {"events_id": "clients.update", "object_id": 4}, "data": {"balance": -1}}"#,
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with("clients.update, object_id 1"),
        "{stdout}"
    );
    assert!(
        stderr.contains(
            "provisiond: warning: the data given has `event` and `data` objects, like a whole \
             envelope; it is taken as the event's data as it is."
        ),
        "{stderr}"
    );
    let (_, _, stderr) = cli(
        &["explain", "clients.update", "--data", "-", "-c", &config],
        ENV,
        r#"{"balance": -1, "event": "x"}"#,
    );
    assert!(!stderr.contains("warning"), "{stderr}");
    let (code, _, stderr) = cli(&["explain", "clients.create", "-c", &config], &[], "");
    assert_eq!(code, 1, "a config that does not load cannot be explained");
    assert!(
        stderr.contains("environment variable `CRM_KEY` is not set"),
        "{stderr}"
    );
}

const CASES: &str = r#"
[[case]]
name = "a new ACME client is tidied, checked, then tagged"
event = "clients.create"
data = { name = "  acme", email = "ops@acme.example" }
before = ["tidy-name", "crm-check", "acme"]
after = []

[[case]]
name = "a client in debt is synced"
envelope = { event = { events_id = "clients.update", object_id = 4 }, data = { balance = -1 } }
before = ["crm-check"]
after = ["crm-sync"]

[[case]]
name = "the VIP check runs for company 3"
event = "clients.create"
data = { companies_id = 3 }
before = ["crm-check", "vip"]
after = []

[[case]]
name = "the paused handler runs for a balance drop"
event = "clients.balance_zero"
data = { name = "x" }
before = ["paused", "tidy-name"]
after = ["block-on-switch"]
"#;

#[test]
fn test_passes_and_fails_cases_with_the_reasons() {
    let dir = tempfile::TempDir::new().unwrap();
    let config = config_file(dir.path());
    let cases = dir.path().join("cases.toml");
    std::fs::write(&cases, CASES).unwrap();
    let (code, stdout, stderr) = cli(&["test", "-c", &config, cases.to_str().unwrap()], ENV, "");
    assert_eq!(code, 1, "a failing case fails the run: {stdout}{stderr}");
    assert_eq!(
        stdout,
        "ok    a new ACME client is tidied, checked, then tagged
ok    a client in debt is synced
FAIL  the VIP check runs for company 3
        before: expected [crm-check, vip], got [vip, crm-check]
          order differs (priority, then file order)
FAIL  the paused handler runs for a balance drop
        before: expected [paused, tidy-name], got [tidy-name]
          - paused: disabled (enabled = false)
4 cases: 2 passed, 2 failed
"
    );

    // Fixed expectations pass, and exit 0.
    let fixed = CASES
        .replace(
            "before = [\"crm-check\", \"vip\"]",
            "before = [\"vip\", \"crm-check\"]",
        )
        .replace(
            "before = [\"paused\", \"tidy-name\"]",
            "before = [\"tidy-name\"]",
        );
    std::fs::write(&cases, fixed).unwrap();
    let (code, stdout, stderr) = cli(&["test", "-c", &config, cases.to_str().unwrap()], ENV, "");
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.ends_with("4 cases: 4 passed, 0 failed\n"),
        "{stdout}"
    );

    // A mistake in the cases file is an error, not a pass: every one, one line each,
    // with its place in the file.
    std::fs::write(
        &cases,
        "[[case]]\nname = \"x\"\nevent = \"clients.create\"\nbefore = []\n\n\
         [[case]]\nname = \"y\"\nevent = \"clients.create\"\nbefore = []\nafter = []\n\
         outcome = \"allow\"\n",
    )
    .unwrap();
    let (code, stdout, stderr) = cli(&["test", "-c", &config, cases.to_str().unwrap()], ENV, "");
    assert_eq!(code, 1, "{stdout}");
    assert_eq!(stdout, "", "no case runs from a broken file");
    let file = cases.display();
    assert_eq!(
        stderr,
        format!(
            "{file}:1:1: case \"x\": missing `after` (list the after-stage handlers expected, \
             in order, [] for none)\n\
             {file}:11:1: case \"y\": unknown key `outcome`; a case takes name, event, \
             object_id, data, envelope, before, after, unknown_event\n\
             {file}: 2 errors\n"
        )
    );
}

#[test]
fn a_typo_in_an_event_name_is_caught_with_a_hint() {
    let dir = tempfile::TempDir::new().unwrap();
    let config = config_file(dir.path());
    let (code, stdout, stderr) = cli(&["explain", "clients.crate", "-c", &config], ENV, "");
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(
            "note: clients.crate is neither in the catalogue nor in [events] extra \
             (did you mean \"clients.create\"?)"
        ),
        "{stdout}"
    );

    // In a case it fails the case (it would pass, with nothing expected, if the name
    // were not checked), unless the case says the name is unknown on purpose.
    let cases = dir.path().join("cases.toml");
    std::fs::write(
        &cases,
        r#"
[[case]]
name = "typo"
event = "clients.crate"
before = []
after = []

[[case]]
name = "a future event goes to the wildcard handlers only"
event = "clients.loyalty.upgrade"
unknown_event = true
data = { name = "x" }
before = ["tidy-name"]
after = []
"#,
    )
    .unwrap();
    let (code, stdout, stderr) = cli(&["test", "-c", &config, cases.to_str().unwrap()], ENV, "");
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert_eq!(
        stdout,
        "FAIL  typo
        unknown event \"clients.crate\" (did you mean \"clients.create\"?): neither in the catalogue nor in [events] extra; fix the name, or set unknown_event = true to test an event outside them
ok    a future event goes to the wildcard handlers only
2 cases: 1 passed, 1 failed
"
    );
}

#[test]
fn the_example_cases_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = 0;
    for (config, cases) in [
        (
            "examples/configs/filters.toml",
            "examples/configs/filters.cases.toml",
        ),
        (
            "examples/kubernetes/provisioning.toml",
            "examples/kubernetes/provisioning.cases.toml",
        ),
    ] {
        let config = root.join(config);
        let cases = root.join(cases);
        let (code, stdout, stderr) = cli(
            &[
                "test",
                "-c",
                config.to_str().unwrap(),
                cases.to_str().unwrap(),
            ],
            &[("CRM_TOKEN", "ci-dummy"), ("PROVISIOND_TOKEN", "ci-dummy")],
            "",
        );
        assert_eq!(code, 0, "{}: {stdout}{stderr}", cases.display());
        assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
        found += 1;
    }
    assert_eq!(found, 2);
    // The case the README shows is one of the example's, word for word.
    let readme = readme();
    let shown = code_blocks(&readme, "toml")
        .find(|b| b.starts_with("[[case]]\n"))
        .expect("the README shows a case");
    let cases = std::fs::read_to_string(root.join("examples/configs/filters.cases.toml")).unwrap();
    assert!(cases.contains(shown), "not in filters.cases.toml:\n{shown}");
}
