use super::*;

fn env(name: &str) -> Option<String> {
    (name == "CRM_TOKEN").then(|| "t0ken".to_owned())
}

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::parse_with_env(text, "p.toml", Path::new("/etc/p"), &env)
}

#[test]
fn many_mistakes_are_reported_together() {
    let text = r#"
[server]
listen = "127.0.0.1:8600"
colour = "blue"

[[handler]]
name = "a"
events = ["clients.crate"]
stage = "before"
url = "http://127.0.0.1:1/x"
timeout = "5 parsecs"

[[handler]]
name = "a"
events = ["clients.create"]
stage = "before"
url = "http://127.0.0.1:1/x"
command = ["/bin/true"]

[[handler]]
name = "c"
events = ["*"]
stage = "after"
url = "http://h/${MISSING}"
match = { "data.name" = { regex = "(" } }
when = "data.x =="
priority = "high"
"#;
    let errors = parse(text).unwrap_err();
    let text = errors.to_string();
    println!("{text}");
    for want in [
        "p.toml:4:1: server.colour: unknown key `colour`",
        "p.toml:8:11: handler[0].events[0]: unknown event \"clients.crate\" (did you mean \"clients.create\"?)",
        "p.toml:11:11: handler[0].timeout: invalid duration",
        "p.toml:14:8: handler[1].name: duplicate handler name \"a\"",
        "handler[1].command: a handler has either `url` (HTTP) or `command` (script), not both",
        "p.toml:24:7: handler[2].url: environment variable `MISSING` is not set",
        "handler[2].match.\"data.name\".regex: invalid regex",
        "handler[2].when: invalid CEL expression",
        "p.toml:27:12: handler[2].priority: invalid type",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

#[test]
fn a_good_file_compiles() {
    let text = r#"
[defaults]
timeout = "2s"
on_error = "deny"

[events]
extra = ["clients.custom_event"]

[[handler]]
name = "crm"
events = ["clients.*", "clients.custom_event", "clients_packages.renew"]
stage = "before"
priority = 5
url = "https://user:${CRM_TOKEN}@crm.example/hook?x=1"
modifies = true
[handler.match]
data.balance = { lt = 0 }
"event.object_id" = 3

[[handler]]
name = "script"
events = ["*"]
stage = "after"
command = ["./hooks/block.sh", "--token", "${CRM_TOKEN}"]
retry = { attempts = 3, backoff = "100ms", max_backoff = "1s" }
"#;
    let config = parse(text).unwrap();
    let crm = config.handler("crm").unwrap();
    assert_eq!(crm.timeout, Duration::from_secs(2));
    assert_eq!(crm.on_error, OnError::Deny);
    assert_eq!(crm.filter.conditions.len(), 2);
    assert!(crm.takes("clients.subscriptions.renew"));
    assert_eq!(
        crm.describe_target(),
        "POST https://user:***@crm.example/hook?x=1"
    );
    let Target::Http(http) = &crm.target else {
        panic!()
    };
    assert_eq!(http.url.password(), Some("t0ken"));
    let script = config.handler("script").unwrap();
    assert_eq!(
        script.describe_target(),
        "./hooks/block.sh --token ${CRM_TOKEN}"
    );
    let Target::Script(s) = &script.target else {
        panic!()
    };
    assert_eq!(s.argv[0], "/etc/p/./hooks/block.sh");
    assert_eq!(s.argv[2], "t0ken");
    assert_eq!(script.retry.attempts, 3);
    assert!(!format!("{config:?}").contains("t0ken"), "{config:?}");
}

#[test]
fn targets_are_shown_as_written_with_the_password_masked() {
    let text = "[[handler]]\nname = \"a\"\nevents = [\"*\"]\nstage = \"before\"\n\
                url = \"http://user:${CRM_TOKEN}@crm/${PATHX:-def}/$${literal}\"\n";
    let config = parse(text).unwrap();
    assert_eq!(
        config.handler("a").unwrap().describe_target(),
        "POST http://user:***@crm/${PATHX:-def}/$${literal}"
    );
}

#[test]
fn messages_say_what_is_wrong_in_the_users_words() {
    let text = r#"[[handler]]
name = "a"
events = ["Clients.Create", "CLIENTS.*", "Clients.Crate", "Foo.Bar"]
stage = "before"
url = "${CRM_TOKEN}"
timeout = "-1s"
on_error = 1
"#;
    assert_eq!(
        error_lines(text),
        [
            "p.toml:3:11: handler[0].events[0]: `Clients.Create` is not a valid event name: \
             event names are lower-case (did you mean \"clients.create\"?)",
            "p.toml:3:29: handler[0].events[1]: `CLIENTS.*` is not a valid event name: \
             event names are lower-case (did you mean \"clients.*\"?)",
            "p.toml:3:42: handler[0].events[2]: `Clients.Crate` is not a valid event name: \
             event names are lower-case (did you mean \"clients.create\"?)",
            "p.toml:3:59: handler[0].events[3]: `Foo.Bar` is not a valid event name: event \
             names are lower-case",
            "p.toml:5:7: handler[0].url: invalid URL: relative URL without a base (the value \
             came from the environment variable `CRM_TOKEN`)",
            "p.toml:6:11: handler[0].timeout: invalid duration \"-1s\": durations cannot be \
             negative",
            "p.toml:7:12: handler[0].on_error: invalid type: expected a string",
        ]
    );
}

#[test]
fn a_prefix_that_matches_no_known_event_points_at_events_extra() {
    let text = r#"[[handler]]
name = "a"
events = ["invoices.*", "client.*"]
stage = "after"
url = "http://a/"
"#;
    let extra = "list events the billing's catalogue lacks in [events] extra";
    assert_eq!(
        error_lines(text),
        [
            format!(
                "p.toml:3:11: handler[0].events[0]: \"invoices.*\" matches no known event; {extra}"
            ),
            format!(
                "p.toml:3:25: handler[0].events[1]: \"client.*\" matches no known event (did \
                 you mean \"clients.*\"?); {extra}"
            ),
        ]
    );
    let listed =
        format!("[events]\nextra = [\"invoices.paid\"]\n\n{text}").replace(", \"client.*\"", "");
    assert!(parse(&listed).is_ok());
}

#[test]
fn a_bare_program_name_is_found_in_path_once_and_keeps_its_name_as_argv0() {
    let text = r#"
[[handler]]
name = "sh"
events = ["*"]
stage = "before"
command = ["sh", "-c", "cat"]

[[handler]]
name = "nowhere"
events = ["*"]
stage = "before"
command = ["no-such-program-anywhere"]

[[handler]]
name = "path"
events = ["*"]
stage = "before"
command = ["hooks/a.sh"]
"#;
    fn script<'a>(config: &'a Config, name: &str) -> &'a ScriptTarget {
        match &config.handler(name).unwrap().target {
            Target::Script(s) => s,
            Target::Http(_) => panic!("{name} is a script"),
        }
    }
    let config = parse(text).unwrap();
    let sh = script(&config, "sh");
    assert!(sh.program.is_absolute(), "{:?}", sh.program);
    assert!(
        sh.program.ends_with("sh") && sh.program.is_file(),
        "{:?}",
        sh.program
    );
    assert_eq!(sh.argv[0], "sh", "the script sees its name as written");
    // Not found: left as written, and the call fails as it did.
    assert_eq!(
        script(&config, "nowhere").program,
        PathBuf::from("no-such-program-anywhere")
    );
    let path = script(&config, "path");
    assert_eq!(path.program, PathBuf::from("/etc/p/hooks/a.sh"));
    assert_eq!(path.argv[0], "/etc/p/hooks/a.sh");
}

/// A script whose `#!` names an interpreter that is not there exits 126 or 127, which
/// refuses the event like any non-zero exit: `check` says so beforehand.
#[test]
fn warns_about_a_script_whose_interpreter_is_not_there() {
    use std::os::unix::fs::PermissionsExt as _;

    let dir = tempfile::TempDir::new().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    write("sh.sh", "#!/bin/sh\nexit 0\n");
    write("env.sh", "#!/usr/bin/env sh\nexit 0\n");
    write("env-s.sh", "#!/usr/bin/env -S sh -e\nexit 0\n");
    write("binary.sh", "\u{7f}ELF");
    write("gone.py", "#!/usr/bin/python4417 -u\n");
    write("env-gone.py", "#!/usr/bin/env python4417\n");
    write("own-path.py", "#!/usr/bin/env python4417\n");
    let handler = |file: &str, extra: &str| {
        let name = file.replace('.', "-");
        format!(
            "[[handler]]\nname = \"{name}\"\nevents = [\"*\"]\nstage = \"before\"\n\
             command = [\"./{file}\"]\n{extra}"
        )
    };
    let text = [
        handler("sh.sh", ""),
        handler("env.sh", ""),
        handler("env-s.sh", ""),
        handler("binary.sh", ""),
        handler("gone.py", ""),
        handler("env-gone.py", ""),
        handler("own-path.py", "env = { PATH = \"/opt/py/bin\" }\n"),
    ]
    .concat();
    let env = |_: &str| None;
    let config = Config::parse_with_env(&text, "p.toml", dir.path(), &env).unwrap();
    assert_eq!(
        config.warnings(),
        [
            "handler \"gone-py\": command \"./gone.py\": its interpreter \
             /usr/bin/python4417 (#!/usr/bin/python4417 -u) is not found; the script cannot \
             start, an error that follows on_error (before stage) or is retried (after stage)",
            "handler \"env-gone-py\": command \"./env-gone.py\": its interpreter python4417 \
             (#!/usr/bin/env python4417) is not in provisiond's PATH; `env` would exit 127, \
             which refuses the event (before stage) or is retried (after stage)",
        ]
    );
}

#[test]
fn warns_about_scripts_that_are_not_there_or_not_executable() {
    use std::os::unix::fs::PermissionsExt as _;

    let dir = tempfile::TempDir::new().unwrap();
    let write = |name: &str, mode: u32| {
        let path = dir.path().join(name);
        std::fs::write(&path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    write("ok.sh", 0o755);
    write("plain.sh", 0o644);
    std::fs::create_dir(dir.path().join("hooks")).unwrap();
    let handler = |name: &str, program: &str| {
        format!(
            "[[handler]]\nname = \"{name}\"\nevents = [\"*\"]\nstage = \"after\"\n\
             command = [\"{program}\"]\n"
        )
    };
    let text = [
        handler("ok", "./ok.sh"),
        handler("on-path", "true"),
        handler("missing", "./nope.sh"),
        handler("plain", "./plain.sh"),
        handler("dir", "hooks/"),
        handler("from-env", "${CRM_TOKEN}/x.sh"),
    ]
    .concat();
    let config = Config::parse_with_env(&text, "p.toml", dir.path(), &env).unwrap();
    let base = dir.path().display();
    assert_eq!(
        config.warnings(),
        [
            format!(
                "handler \"missing\": command \"./nope.sh\" not found at {base}/nope.sh \
                 (fine if it is deployed separately)"
            ),
            format!(
                "handler \"plain\": command \"./plain.sh\" is not executable at \
                 {base}/plain.sh (fine if it is deployed separately)"
            ),
            format!(
                "handler \"dir\": command \"hooks/\" is not a file at {base}/hooks/ (fine \
                 if it is deployed separately)"
            ),
            "handler \"from-env\": command \"${CRM_TOKEN}/x.sh\" not found (fine if it is \
             deployed separately)"
                .to_owned(),
        ]
    );
}

#[test]
fn a_secret_from_an_unset_variable_is_to_be_set_not_given_a_default() {
    let text = r#"[server]
token = "${PROVISIOND_TOKEN}"

[store]
backend = "postgres"
url = "${PG_URL}"

[[handler]]
name = "a"
events = ["*"]
stage = "after"
url = "http://crm/${CRM_PATH}"
headers = { Authorization = "Bearer ${CRM_KEY}" }
secret = "${HOOK_SECRET}"
"#;
    let set_it = |name: &str| {
        format!(
            "environment variable `{name}` is not set; set it in provisiond's environment \
             (this is a secret: give it no default in the file)"
        )
    };
    let errors = error_lines(text);
    for want in [
        format!("p.toml:2:9: server.token: {}", set_it("PROVISIOND_TOKEN")),
        format!("p.toml:6:7: store.url: {}", set_it("PG_URL")),
        "p.toml:12:7: handler[0].url: environment variable `CRM_PATH` is not set (write \
         ${CRM_PATH:-default} to give a default)"
            .to_owned(),
        format!(
            "p.toml:13:29: handler[0].headers.Authorization: {}",
            set_it("CRM_KEY")
        ),
        format!("p.toml:14:10: handler[0].secret: {}", set_it("HOOK_SECRET")),
    ] {
        assert!(errors.contains(&want), "missing {want:?} in {errors:#?}");
    }
}

#[test]
fn a_value_with_an_unset_variable_gets_that_error_alone() {
    let text = r#"[server]
listen = "${LISTEN}"

[[handler]]
name = "a"
events = ["*"]
stage = "after"
url = "${CRM_URL}"
secret = "${HOOK_SECRET}"
"#;
    let errors = error_lines(text);
    assert_eq!(errors.len(), 3, "{errors:#?}");
    for (error, path) in errors
        .iter()
        .zip(["server.listen", "handler[0].url", "handler[0].secret"])
    {
        assert!(
            error.contains(&format!("{path}: environment variable `")),
            "{errors:#?}"
        );
    }
}

#[test]
fn an_empty_value_from_a_variable_set_but_empty_says_so() {
    let env = |name: &str| match name {
        "EMPTY" | "ALSO_EMPTY" => Some(String::new()),
        "HOST" => Some("crm".to_owned()),
        _ => None,
    };
    let text = r#"[server]
token = "${EMPTY}"

[store]
backend = "postgres"
url = "${EMPTY}"

[[handler]]
name = "a"
events = ["*"]
stage = "after"
url = "${EMPTY}${ALSO_EMPTY}"
secret = "${EMPTY}"

[[handler]]
name = "b"
events = ["*"]
stage = "after"
url = "${HOST}${EMPTY}"

[[handler]]
name = "c"
events = ["*"]
stage = "after"
command = ["${EMPTY}"]
"#;
    let errors = Config::parse_with_env(text, "p.toml", Path::new("."), &env).unwrap_err();
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        [
            "p.toml:2:9: server.token: is empty (the value came from the environment variable \
             `EMPTY`, which is set but empty); give the variable the token, or remove the \
             key to turn authentication off",
            "p.toml:6:7: store.url: is empty (the value came from the environment variable \
             `EMPTY`, which is set but empty)",
            "p.toml:12:7: handler[0].url: invalid URL: relative URL without a base (the \
             value came from the environment variables `EMPTY`, `ALSO_EMPTY`; `EMPTY`, \
             `ALSO_EMPTY` are set but empty)",
            "p.toml:13:10: handler[0].secret: must be \"whsec_\" followed by base64 (a \
             Standard Webhooks secret) (the value came from the environment variable \
             `EMPTY`, which is set but empty)",
            "p.toml:19:7: handler[1].url: invalid URL: relative URL without a base (the \
             value came from the environment variables `HOST`, `EMPTY`; `EMPTY` is set but \
             empty)",
            "p.toml:25:11: handler[2].command: must name a program (the value came from the \
             environment variable `EMPTY`, which is set but empty): command = \
             [\"/path/to/script\", \"arg\"...]",
        ]
    );
    // Set but empty with a default: the default, as the README says.
    let text = "[server]\ntoken = \"${EMPTY:-s3cret-token}\"\n";
    let config = Config::parse_with_env(text, "p.toml", Path::new("."), &env).unwrap();
    assert_eq!(config.server.token.unwrap().expose(), "s3cret-token");
}

#[test]
fn headers_that_provisiond_sets_are_refused_in_any_case() {
    let text = r#"[[handler]]
name = "a"
events = ["*"]
stage = "before"
url = "http://127.0.0.1:1/"
secret = "whsec_c2VjcmV0"

[handler.headers]
Authorization = "Bearer x"
Content-Type = "text/plain"
X-Provisioning-Handler = "spoof"
host = "evil"
CONTENT-LENGTH = "1"
Webhook-Signature = "v1,forged"
User-Agent = "crm-client/2"
"#;
    assert_eq!(
        error_lines(text),
        [
            "p.toml:10:16: handler[0].headers.Content-Type: \"Content-Type\" is set by \
             provisiond (application/json: the body is the envelope); remove it from `headers`",
            "p.toml:11:26: handler[0].headers.X-Provisioning-Handler: \"X-Provisioning-Handler\" \
             is set by provisiond (the handler's name); remove it from `headers`",
            "p.toml:12:8: handler[0].headers.host: \"host\" is set by provisiond (from `url`); \
             remove it from `headers`",
            "p.toml:13:18: handler[0].headers.CONTENT-LENGTH: \"CONTENT-LENGTH\" is set by \
             provisiond (from the body); remove it from `headers`",
            "p.toml:14:21: handler[0].headers.Webhook-Signature: \"Webhook-Signature\" is set \
             by provisiond (Standard Webhooks signing, with `secret`); remove it from `headers`",
        ]
    );
    // Others (User-Agent replaces provisiond's) are sent as given.
    let config = parse(
        &text
            .replace("Content-Type", "X-Type")
            .replace("X-Provisioning-Handler", "X-Tenant")
            .replace("host", "X-Host")
            .replace("CONTENT-LENGTH", "X-Length")
            .replace("Webhook-Signature", "X-Sig"),
    )
    .unwrap();
    let Target::Http(http) = &config.handler("a").unwrap().target else {
        panic!("an HTTP handler")
    };
    assert_eq!(http.headers["user-agent"], "crm-client/2");
    assert_eq!(http.headers.len(), 7);
}

#[test]
fn error_messages_never_quote_values_from_the_environment() {
    let errors = parse(
        "[[handler]]\nname = \"a\"\nevents = [\"*\"]\nstage = \"before\"\n\
         url = \"ftp://u:${CRM_TOKEN}@crm.example/\"\nmatch = { \"data.x\" = { regex = \"(${CRM_TOKEN}\" } }\n",
    )
    .unwrap_err();
    let text = errors.to_string();
    assert_eq!(errors.len(), 2, "{text}");
    assert!(!text.contains("t0ken"), "{text}");
    assert!(
        text.contains(
            "handler[0].url: \"ftp://u:***@crm.example/\" must be an http:// or https:// \
             URL (the value came from the environment variable `CRM_TOKEN`)"
        ),
        "{text}"
    );
}

/// The lines of the errors `text` gives, to compare whole.
fn error_lines(text: &str) -> Vec<String> {
    let errors = parse(text).unwrap_err();
    errors.iter().map(ToString::to_string).collect()
}

#[test]
fn a_handler_with_a_missing_or_wrong_required_key_is_still_checked() {
    let text = r#"[[handler]]
name = "b c"
events = ["clients*"]
url = "http://127.0.0.1:1/x"

[[handler]]
name = "b"
events = ["clients.create"]
stage = "Before"
priority = "high"
url = "http://127.0.0.1:1/x"
retry = { attempts = 3 }
"#;
    assert_eq!(
        error_lines(text),
        [
            "p.toml:1:1: handler[0]: missing `stage`: say \"before\" (may modify, allow or \
             forbid) or \"after\" (notified durably)",
            "p.toml:2:8: handler[0].name: \"b c\" is not a valid handler name: use letters, \
             digits, '-' and '_'",
            "p.toml:3:11: handler[0].events[0]: `clients*` is not a valid event name \
             (dot-separated lower-case words, a prefix such as \"clients.*\", or \"*\")",
            "p.toml:9:9: handler[1].stage: unknown value `Before`, expected `before` or `after`",
            "p.toml:10:12: handler[1].priority: invalid type: string \"high\", expected an \
             integer",
            "p.toml:12:9: handler[1].retry: only applies to the after stage; a before-stage \
             handler is called once, see `on_error`",
        ]
    );
}

#[test]
fn a_url_or_command_of_the_wrong_type_is_one_error_not_a_missing_target() {
    let handler = |name: &str, target: &str| {
        format!("[[handler]]\nname = \"{name}\"\nevents = [\"*\"]\nstage = \"after\"\n{target}\n")
    };
    let text = [
        handler("a", "url = 3"),
        handler("b", "command = \"/bin/true\""),
        handler("c", "url = [\"http://a/\"]"),
        handler("d", "timeout = \"1s\""),
    ]
    .concat();
    assert_eq!(
        error_lines(&text),
        [
            "p.toml:5:7: handler[0].url: invalid type: integer `3`, expected a string",
            "p.toml:10:11: handler[1].command: invalid type: string \"/bin/true\", expected \
             an array",
            "p.toml:15:7: handler[2].url: invalid type: sequence, expected a string",
            "p.toml:16:1: handler[3]: a handler needs `url` (HTTP) or `command` (script)",
        ]
    );
}

#[test]
fn placeholders_for_missing_keys_cause_no_errors_of_their_own() {
    // Two handlers without a name are no duplicates (of each other or of a real
    // handler with the placeholder's name), one without events does not "name no
    // event", and one without a stage may have after-stage keys.
    let text = "[[handler]]\nevents = [\"*\"]\nstage = \"after\"\nurl = \"http://a/\"\n\
                [[handler]]\nstage = \"before\"\nurl = \"http://a/\"\n\
                [[handler]]\nname = \"c\"\nevents = [\"*\"]\nurl = \"http://a/\"\n\
                retry = { attempts = 2 }\nmodifies = true\n\
                [[handler]]\nname = \"\"\nevents = [\"*\"]\nstage = \"after\"\n\
                url = \"http://a/\"\n";
    assert_eq!(
        error_lines(text),
        [
            "p.toml:1:1: handler[0]: missing `name`",
            "p.toml:5:1: handler[1]: missing `name`",
            "p.toml:5:1: handler[1]: missing `events`",
            "p.toml:8:1: handler[2]: missing `stage`: say \"before\" (may modify, allow or \
             forbid) or \"after\" (notified durably)",
            "p.toml:15:8: handler[3].name: \"\" is not a valid handler name: use letters, \
             digits, '-' and '_'",
        ]
    );
}

#[test]
fn a_mistake_in_a_header_table_is_pinned_to_its_key() {
    // The span of `[handler.retry]` does not cover its keys; the error must still
    // name the key, and the handler's other problems must still be found.
    let text = "[[handler]]\nevents = [\"*\"]\nstage = \"after\"\nurl = \"http://a/\"\n\
                [handler.retry]\natempts = 3\n";
    assert_eq!(
        error_lines(text),
        [
            "p.toml:1:1: handler[0]: missing `name`",
            "p.toml:6:1: handler[0].retry.atempts: unknown key `atempts`, expected one of \
             `attempts`, `backoff`, `max_backoff`",
        ]
    );
}

#[test]
fn a_missing_bracket_is_one_syntax_error_with_a_hint() {
    let text = "[[handler]]\nname = \"a\"\nevents = [\"clients.create\", \"clients.update\"\n\
                stage = \"before\"\nurl = \"http://a/\"\n\n\
                [[handler]]\nname = \"b\"\nevents = [\"*\"]\nstage = \"after\"\n";
    assert_eq!(
        error_lines(text),
        [
            "p.toml:4:1: invalid TOML: missing comma between array elements, expected `,` \
          (is a `]` missing on an earlier line?)"
        ]
    );
    // With a trailing comma the parser stops at the next line's `=`: the same hint.
    let text = "[[handler]]\nname = \"a\"\nevents = [\"clients.create\",\n\
                stage = \"before\"\nurl = \"http://a/\"\n";
    let lines = error_lines(text);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("p.toml:4:7: invalid TOML: ")
            && lines[0].ends_with("(is a `]` missing on an earlier line?)"),
        "{lines:?}"
    );
    // A bracket left open on the same line needs no hint beyond the parser's.
    assert_eq!(
        error_lines("[server\nlisten = 1\n"),
        ["p.toml:1:8: invalid TOML: unclosed table, expected `]`"]
    );
}

#[test]
fn a_repeated_key_or_table_names_itself_and_where_it_was_first_set() {
    let handler = "[[handler]]\nname = \"a\"\nevents = [\"*\"]\nstage = \"after\"\n\
                   url = \"http://a/\"\n";
    for (text, want) in [
        (
            "[server]\nlisten = \"127.0.0.1:1\"\nmax_body = \"1MiB\"\nlisten = \"127.0.0.1:2\"\n"
                .to_owned(),
            "p.toml:4:1: server.listen: invalid TOML: duplicate key `listen` (first set on \
             line 2)",
        ),
        (
            "[server]\nlisten = \"127.0.0.1:1\"\n\n[server]\nmax_body = \"1MiB\"\n".to_owned(),
            "p.toml:4:2: server: invalid TOML: duplicate table [server] (first defined on \
             line 1)",
        ),
        (
            format!("{handler}{handler}name = \"b\"\n"),
            "p.toml:11:1: handler[1].name: invalid TOML: duplicate key `name` (first set on \
             line 7)",
        ),
        (
            format!("{handler}[handler.retry]\nattempts = 2\n[handler.retry]\nattempts = 3\n"),
            "p.toml:8:10: handler[0].retry: invalid TOML: duplicate table [handler.retry] \
             (first defined on line 6)",
        ),
        (
            format!("{handler}headers = {{ X-A = \"1\", 'X-A' = \"2\" }}\n"),
            "p.toml:6:24: handler[0].headers.X-A: invalid TOML: duplicate key `X-A` (first \
             set on line 6, column 13)",
        ),
        (
            format!("{handler}match.data.id = 1\nmatch.data.id = 2\n"),
            "p.toml:7:12: handler[0].match.data.id: invalid TOML: duplicate key `id` (first \
             set on line 6)",
        ),
    ] {
        assert_eq!(error_lines(&text), [want], "{text}");
    }
}

#[test]
fn stage_is_required_and_syntax_errors_have_positions() {
    let errors =
        parse("[[handler]]\nname = \"x\"\nevents = [\"*\"]\nurl = \"http://a/\"\n").unwrap_err();
    assert!(
        errors
            .to_string()
            .contains("p.toml:1:1: handler[0]: missing `stage`"),
        "{errors}"
    );
    let errors = parse("[server\nlisten = 1\n").unwrap_err();
    assert!(errors.to_string().starts_with("p.toml:1:"), "{errors}");
}

#[test]
fn a_postgres_store_compiles_with_its_url_from_the_environment() {
    let text = "[store]\nbackend = \"postgres\"\n\
                url = \"postgres://app:${CRM_TOKEN}@db1,db2/billing?target_session_attrs=read-write\"\n\
                schema = \"billing_hooks\"\npool = 64\nlease = \"1s\"\n";
    let config = parse(text).unwrap();
    let Backend::Postgres(pg) = &config.store.backend else {
        panic!("a postgres store")
    };
    assert_eq!(
        pg.url.expose(),
        "postgres://app:t0ken@db1,db2/billing?target_session_attrs=read-write"
    );
    assert_eq!(
        pg.shown_url(),
        "postgres://app:***@db1,db2/billing?target_session_attrs=read-write"
    );
    assert_eq!(
        (pg.schema.as_str(), pg.pool, pg.lease),
        ("billing_hooks", 64, Duration::from_secs(1))
    );
    assert!(config.summary().contains(
        ", store postgres postgres://app:***@db1,db2/billing?target_session_attrs=read-write \
         (schema billing_hooks)"
    ));
    for shown in [format!("{config:?}"), config.summary()] {
        assert!(!shown.contains("t0ken"), "{shown}");
    }
    // The key=value form.
    let config = parse(
        "[store]\nbackend = \"postgres\"\nurl = \"host=db1 user=app password=${CRM_TOKEN}\"\n",
    )
    .unwrap();
    let Backend::Postgres(pg) = &config.store.backend else {
        panic!("a postgres store")
    };
    assert_eq!(pg.shown_url(), "host=db1 user=app password=***");
}

#[test]
fn the_keys_of_the_other_backend_are_refused_naming_their_lines() {
    assert_eq!(
        error_lines(
            "[store]\nbackend = \"postgres\"\npath = \"a.db\"\nurl = \"postgres://db/billing\"\n"
        ),
        [
            "p.toml:3:8: store.path: only applies to backend = \"redb\"; with \"postgres\" the \
          data lives in the database at store.url: remove the key"
        ]
    );
    let redb = "only applies to backend = \"postgres\"; this store's backend is \"redb\" \
                (the default): set store.backend = \"postgres\" or remove the key";
    assert_eq!(
        error_lines(
            "[store]\nurl = \"postgres://db/billing\"\nschema = \"x\"\npool = 2\nlease = \"5s\"\n"
        ),
        [
            format!("p.toml:2:7: store.url: {redb}"),
            format!("p.toml:3:10: store.schema: {redb}"),
            format!("p.toml:4:8: store.pool: {redb}"),
            format!("p.toml:5:9: store.lease: {redb}"),
        ]
    );
    assert_eq!(
        error_lines("[store]\nbackend = \"redb\"\nurl = \"postgres://db/billing\"\n"),
        [
            "p.toml:3:7: store.url: only applies to backend = \"postgres\"; this store's backend \
          is \"redb\": set store.backend = \"postgres\" or remove the key"
        ]
    );
}

#[test]
fn a_postgres_store_needs_a_url() {
    assert_eq!(
        error_lines("[store]\nbackend = \"postgres\"\n"),
        [
            "p.toml:2:11: store.backend: backend \"postgres\" needs store.url, the database to \
          use: give it through the environment, url = \"${PROVISIOND_PG_URL}\""
        ]
    );
    assert_eq!(
        error_lines("[store]\nbackend = \"postgres\"\nurl = \" \"\n"),
        ["p.toml:3:7: store.url: is empty"]
    );
    assert_eq!(
        error_lines("[store]\nbackend = \"postgres\"\nurl = \"${EMPTY_PG_URL:-}\"\n"),
        [
            "p.toml:3:7: store.url: is empty (the value came from the environment variable \
          `EMPTY_PG_URL`)"
        ]
    );
    assert_eq!(
        error_lines("[store]\nbackend = \"postgres\"\nurl = \"host=db hots=x\"\n"),
        [
            "p.toml:3:7: store.url: not a PostgreSQL URL or key=value string: unknown option \
          `hots`"
        ]
    );
    assert_eq!(
        error_lines("[store]\nbackend = \"postgres\"\nurl = \"postgres://db:x/billing\"\n"),
        [
            "p.toml:3:7: store.url: not a PostgreSQL URL or key=value string: invalid value \
          for option `port`"
        ]
    );
    for (url, problem) in [
        (
            "http://db1/billing",
            "a URL must start with postgres:// or postgresql://, not http://",
        ),
        (
            "db1:5432/billing",
            "neither a URL (postgres://user@host:5432/db) nor key=value pairs (host=... \
             dbname=...)",
        ),
    ] {
        assert_eq!(
            error_lines(&format!(
                "[store]\nbackend = \"postgres\"\nurl = \"{url}\"\n"
            )),
            [format!(
                "p.toml:3:7: store.url: not a PostgreSQL URL or key=value string: {problem}"
            )]
        );
    }
    // TLS settings libpq would refuse, or a CA file that cannot be used: said at check,
    // not found out as a sidecar never ready.
    let store = |url: &str| format!("[store]\nbackend = \"postgres\"\nurl = \"{url}\"\n");
    let dir = tempfile::TempDir::new().unwrap();
    let missing = dir.path().join("ca.pem");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let fixture = |name: &str| format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let (client_cert, other_key) = (fixture("pg-client-cert.pem"), fixture("pg-other-key.pem"));
    let damaged = dir.path().join("damaged.pem");
    std::fs::write(
        &damaged,
        "-----BEGIN CERTIFICATE-----\nAAAAAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    for (url, error) in [
        (
            "host=db sslmode=verify".to_owned(),
            "sslmode=verify is not one of disable, prefer, require, verify-ca, verify-full"
                .to_owned(),
        ),
        (
            format!(
                "host=db sslmode=verify-full sslrootcert={}",
                missing.display()
            ),
            format!(
                "sslrootcert: cannot read {}: No such file or directory (os error 2)",
                missing.display()
            ),
        ),
        (
            "host=db sslmode=disable sslrootcert=/etc/ca.pem".to_owned(),
            "sslmode=disable with sslrootcert, sslcert or sslkey: without TLS they would not \
             be used"
                .to_owned(),
        ),
        (
            "host=db sslmode=verify-full sslrootcert=/etc/my ca.pem".to_owned(),
            "not a key=value string libpq could read: a value with a space must be in single \
             quotes (key='a value')"
                .to_owned(),
        ),
        (
            format!("postgres://db/billing?sslrootcert={}", damaged.display()),
            format!(
                "sslrootcert: certificate 1 of {} cannot be used as a CA (BadEncoding)",
                damaged.display()
            ),
        ),
        (
            "host=db sslpassword=x".to_owned(),
            "sslpassword is not supported: give sslkey a key that is not encrypted".to_owned(),
        ),
        (
            "host=db sslmode=allow".to_owned(),
            "sslmode=allow is not supported (TLS only when the server insists on it): use \
             prefer, or disable"
                .to_owned(),
        ),
        (
            "postgres:///billing?host=/run/postgresql&sslmode=require".to_owned(),
            "sslmode=require: PostgreSQL has no TLS on a unix socket; use a TCP host, or \
             sslmode=prefer or disable"
                .to_owned(),
        ),
        (
            "hostaddr=10.0.0.1 sslmode=verify-ca".to_owned(),
            "sslmode=verify-ca: TLS needs a host name to check the server's certificate \
             against; give host (hostaddr alone names no host)"
                .to_owned(),
        ),
        (
            "host='' hostaddr=10.0.0.1 sslmode=verify-full".to_owned(),
            "sslmode=verify-full: TLS needs a host name to check the server's certificate \
             against; give host (hostaddr alone names no host)"
                .to_owned(),
        ),
        (
            format!("host=db sslcert={client_cert} sslkey={other_key}"),
            format!("sslkey: {other_key} is not the key of the certificate in {client_cert}"),
        ),
        (
            "host=db sslcert=/etc/c.pem".to_owned(),
            "sslcert needs sslkey, the certificate's key".to_owned(),
        ),
        (
            format!(
                "host=db sslcert={} sslkey={}",
                concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests/fixtures/pg-client-cert.pem"
                ),
                empty.display()
            ),
            format!(
                "sslkey: {} holds no usable private key (PEM, not encrypted): no items found",
                empty.display()
            ),
        ),
        (
            format!("postgres://db/billing?sslrootcert={}", empty.display()),
            format!(
                "sslrootcert: {} holds no certificate (-----BEGIN CERTIFICATE-----)",
                empty.display()
            ),
        ),
    ] {
        assert_eq!(
            error_lines(&store(&url)),
            [format!("p.toml:3:7: store.url: {error}")],
            "{url}"
        );
    }
    for url in [
        "postgres://db/billing?sslmode=require",
        "host=db sslmode=verify-full",
        "host=db sslmode=verify-ca sslrootcert=system sslmode=verify-full",
        "host=db sslmode=disable",
        // Empty is unset, as in libpq.
        "host=db sslmode=require sslrootcert='' sslcert='' sslkey=''",
        // A unix socket with prefer: no TLS, as libpq.
        "host=/run/postgresql",
    ] {
        assert!(parse(&store(url)).is_ok(), "{url}");
    }
    // An X.509 v1 client certificate (what `openssl x509 -req` makes by default) is the
    // server's to judge, as with libpq.
    let v1 = format!(
        "host=db sslcert={} sslkey={}",
        fixture("pg-client-v1-cert.pem"),
        fixture("pg-client-key.pem")
    );
    assert!(parse(&store(&v1)).is_ok(), "{v1}");
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/localhost-cert.pem"
    );
    let config = parse(&store(&format!(
        "host=db sslmode=verify-ca sslrootcert={fixture}"
    )))
    .unwrap();
    let crate::config::Backend::Postgres(pg) = &config.store.backend else {
        panic!("a postgres store")
    };
    assert_eq!(pg.connect.expose(), "host=db sslmode=require");
    assert_eq!(pg.tls.mode, crate::config::SslMode::VerifyCa);
    assert_eq!(pg.tls.root, Some(crate::config::Root::File(fixture.into())));
    // What is shown is what was written.
    assert!(pg.shown_url().contains("sslmode=verify-ca"));
    assert!(parse("[store]\nbackend = \"postgres\"\nurl = \"host=db sslmode=prefer\"\n").is_ok());
    // An unquoted password with a space reads as an unknown option: not named, and
    // nothing of the value shown.
    let errors = error_lines(
        "[store]\nbackend = \"postgres\"\nurl = \"host=db password=${CRM_TOKEN} sec4417=x\"\n",
    );
    assert_eq!(
        errors,
        [
            "p.toml:3:7: store.url: not a PostgreSQL URL or key=value string: an unknown option \
          (a password with spaces must be quoted: password='...') (the value came from the \
          environment variable `CRM_TOKEN`)"
        ]
    );
}

#[test]
fn max_depth_is_at_most_what_the_json_parser_reads() {
    for depth in ["0", "129"] {
        assert_eq!(
            error_lines(&format!("[server]\nmax_depth = {depth}\n")),
            [
                "p.toml:2:13: server.max_depth: must be between 1 and 128 (the deepest JSON \
              provisiond reads)"
            ],
            "{depth}"
        );
    }
    assert!(parse("[server]\nmax_depth = 128\n").is_ok());
}

#[test]
fn an_integer_out_of_range_says_the_range_of_its_key() {
    let text = r#"[server]
max_connections = 99999999999
max_in_flight = -1
max_depth = 99999999999

[store]
keep_executions = { rows = -3 }

[defaults]
max_concurrency = 0
retry = { attempts = 4294967296 }

[[handler]]
name = "a"
events = ["*"]
stage = "after"
url = "http://a/"
priority = 99999999999999999999
max_concurrency = -1
retry = { attempts = 0 }
"#;
    let u32_max = "must be between 1 and 4294967295";
    assert_eq!(
        error_lines(text),
        [
            format!("p.toml:2:19: server.max_connections: {u32_max}"),
            format!("p.toml:3:17: server.max_in_flight: {u32_max}"),
            "p.toml:4:13: server.max_depth: must be between 1 and 128 (the deepest JSON \
             provisiond reads)"
                .to_owned(),
            "p.toml:7:28: store.keep_executions.rows: must be between 1 and \
             18446744073709551615"
                .to_owned(),
            format!("p.toml:10:19: defaults.max_concurrency: {u32_max}"),
            format!("p.toml:11:22: defaults.retry.attempts: {u32_max}"),
            "p.toml:18:12: handler[0].priority: must be between -9223372036854775808 and \
             9223372036854775807"
                .to_owned(),
            format!("p.toml:19:19: handler[0].max_concurrency: {u32_max}"),
            format!("p.toml:20:22: handler[0].retry.attempts: {u32_max}"),
        ]
    );
    // A float is no whole number, whatever its size.
    assert_eq!(
        error_lines("[server]\nmax_connections = 1.5\n"),
        [
            "p.toml:2:19: server.max_connections: invalid type: floating point `1.5`, \
             expected a whole number"
        ]
    );
    for pool in ["0", "65", "-1", "99999999999"] {
        let text = format!(
            "[store]\nbackend = \"postgres\"\nurl = \"postgres://db/billing\"\npool = {pool}\n"
        );
        assert_eq!(
            error_lines(&text),
            ["p.toml:4:8: store.pool: must be between 1 and 64"],
            "{pool}"
        );
    }
}

#[test]
fn schema_pool_and_lease_are_checked_naming_their_lines() {
    let text = |schema: &str, pool: &str, lease: &str| {
        format!(
            "[store]\nbackend = \"postgres\"\nurl = \"postgres://db/billing\"\n\
             schema = \"{schema}\"\npool = {pool}\nlease = \"{lease}\"\n"
        )
    };
    let identifier = "is not a plain lower-case SQL identifier: use a-z, 0-9 and '_', not \
                      starting with a digit, at most 63 characters";
    assert_eq!(
        error_lines(&text("Billing", "0", "999ms")),
        [
            format!("p.toml:4:10: store.schema: \"Billing\" {identifier}"),
            "p.toml:5:8: store.pool: must be between 1 and 64".to_owned(),
            "p.toml:6:9: store.lease: must be at least 1s".to_owned(),
        ]
    );
    assert_eq!(
        error_lines(&text("pg_queue", "8", "30s")),
        [
            "p.toml:4:10: store.schema: \"pg_queue\" starts with \"pg_\", which PostgreSQL keeps for \
          itself"
        ]
    );
    // A keyword is a name like another: the store quotes it.
    assert!(parse(&text("select", "8", "30s")).is_ok());
    let long = "a".repeat(64);
    assert_eq!(
        error_lines(&text(&long, "65", "2y")),
        [
            format!("p.toml:4:10: store.schema: {long:?} {identifier}"),
            "p.toml:5:8: store.pool: must be between 1 and 64".to_owned(),
            "p.toml:6:9: store.lease: duration \"2y\" is too long: at most 1 year (\"1y\", \
             \"365d\") is accepted"
                .to_owned(),
        ]
    );
    for bad in ["1abc", "a-b", "a b", "", "bílling", "public.x", "\"x\""] {
        let errors = error_lines(&text(&bad.replace('"', "\\\""), "8", "30s"));
        assert_eq!(errors.len(), 1, "{bad}: {errors:?}");
        assert!(errors[0].contains("store.schema:"), "{bad}: {errors:?}");
    }
    for good in ["_", "a", "provisiond_2", &"a".repeat(63)] {
        parse(&text(good, "1", "1s")).unwrap();
    }
}

#[test]
fn a_size_needs_a_unit_and_must_fit_in_64_bits() {
    let max_body = |text: &str| format!("[server]\nmax_body = \"{text}\"\n");
    for (text, bytes) in [
        ("1MiB", 1 << 20),
        ("512KiB", 512 << 10),
        ("1.5KiB", 1536),
        ("100B", 100),
        ("2 KB", 2000),
        ("15EiB", 15 << 60),
        ("18446744073709551615B", u64::MAX),
    ] {
        assert_eq!(
            parse(&max_body(text)).unwrap().server.max_body,
            bytes,
            "{text}"
        );
    }
    // A bare number is an error, as it is for a duration, not a count of bytes.
    assert_eq!(
        error_lines(&max_body("10")),
        [
            "p.toml:2:12: server.max_body: invalid size \"10\": size unit needed, e.g. \"10B\" \
             or \"10KiB\""
        ]
    );
    assert_eq!(
        error_lines("[server]\ndeadline = \"10\"\n"),
        [
            "p.toml:2:12: server.deadline: invalid duration \"10\": time unit needed, for \
             example 10sec or 10ms; write a number with a unit, e.g. \"250ms\", \"5s\", \"10m\""
        ]
    );
    // Past u64::MAX bytes is an error, not u64::MAX (no limit) as bytesize reads it.
    for text in [
        "18446744073709551616B",
        "99999999999999999999999999GiB",
        "17EiB",
        "16EiB",
        "16384PiB",
        "15.99999999999999999EiB",
    ] {
        assert_eq!(
            error_lines(&max_body(text)),
            [format!(
                "p.toml:2:12: server.max_body: size \"{text}\" is too large: at most 16 EiB \
                 less one byte (\"18446744073709551615B\") is accepted"
            )],
        );
    }
    for (text, message) in [
        ("0B", "must be larger than zero"),
        ("1 parsec", "invalid size \"1 parsec\"; write a number"),
        ("MiB", "invalid size \"MiB\"; write a number with a unit"),
        ("", "invalid size \"\"; write a number with a unit"),
    ] {
        let errors = error_lines(&max_body(text));
        assert_eq!(errors.len(), 1, "{text}: {errors:?}");
        assert!(errors[0].contains(message), "{text}: {errors:?}");
    }
}

#[test]
fn an_unknown_backend_says_which_are_accepted() {
    // And says nothing about the keys of either backend: which was meant is unknown.
    assert_eq!(
        error_lines("[store]\nbackend = \"postgresql\"\nurl = \"postgres://db/billing\"\n"),
        [
            "p.toml:2:11: store.backend: unknown backend \"postgresql\"; expected \"redb\" (one \
          file, for this sidecar alone) or \"postgres\" (a database shared by several \
          sidecars)"
        ]
    );
}

#[test]
fn the_summary_lines_up_its_columns() {
    let config = parse(
        r#"
[[handler]]
name = "require-client-name"
events = ["clients.create"]
stage = "before"
priority = 10
command = ["/bin/true"]

[[handler]]
name = "echo"
events = ["clients.*", "clients.update"]
stage = "before"
priority = 300
url = "http://127.0.0.1:5001/"
enabled = false

[[handler]]
name = "crm"
events = ["*"]
stage = "after"
url = "http://127.0.0.1:5002/hook"
"#,
    )
    .unwrap();
    let summary = config.summary();
    let lines: Vec<&str> = summary.lines().skip(1).collect();
    assert_eq!(
        lines,
        [
            "  before   10  require-client-name  [clients.create]             /bin/true",
            "  before  300  echo (disabled)      [clients.*, clients.update]  POST http://127.0.0.1:5001/",
            "  after   100  crm                  [*]                          POST http://127.0.0.1:5002/hook",
        ],
        "{summary}"
    );
}

#[test]
fn warns_about_match_keys_that_look_like_misspelt_operators() {
    let text = r#"
[[handler]]
name = "typos"
events = ["*"]
stage = "after"
url = "http://127.0.0.1:9/h"
match = { "data.name" = { regx = "^A" }, "data.balance" = { gte = 0 }, data = { tag = { Exists = true } } }

[[handler]]
name = "fields"
events = ["*"]
stage = "after"
url = "http://127.0.0.1:9/h"
match = { data = { id = 5, ids = "x", name = "Acme", region = "eu", ex = 1 }, "data.balance" = { ge = 0 } }
"#;
    let config = Config::parse_with_env(text, "p.toml", Path::new("."), &env).unwrap();
    assert_eq!(
        config.warnings(),
        [
            "handler \"typos\": match compares field data.tag.Exists for equality; if `Exists` \
             is meant as an operator, it is `exists` (\"data.tag\" = { exists = ... })",
            "handler \"typos\": match compares field data.balance.gte for equality; if `gte` \
             is meant as an operator, it is `ge` (\"data.balance\" = { ge = ... })",
            "handler \"typos\": match compares field data.name.regx for equality; if `regx` \
             is meant as an operator, it is `regex` (\"data.name\" = { regex = ... })",
        ]
    );
}

#[test]
fn warns_about_a_before_stage_timeout_longer_than_the_deadline() {
    let handler = |name: &str, stage: &str, timeout: &str| {
        format!(
            "[[handler]]\nname = \"{name}\"\nevents = [\"*\"]\nstage = \"{stage}\"\n\
             url = \"http://127.0.0.1:9/h\"\n{timeout}\n"
        )
    };
    let text = [
        "[server]\ndeadline = \"8s\"\n[defaults]\ntimeout = \"9s\"\n".to_owned(),
        handler("slow", "before", "timeout = \"1m\""),
        handler("inherits", "before", ""),
        handler("at-deadline", "before", "timeout = \"8s\""),
        handler("quick", "before", "timeout = \"2s\""),
        handler("after", "after", "timeout = \"1m\""),
    ]
    .concat();
    let config = parse(&text).unwrap();
    let cut = "the before stage is cut at the deadline, so the handler never has its whole \
               timeout; keep the timeout below the deadline";
    assert_eq!(
        config.warnings(),
        [
            format!("handler \"slow\": timeout 1m is longer than server.deadline 8s: {cut}"),
            format!(
                "handler \"inherits\": timeout 9s (from [defaults]) is longer than \
                 server.deadline 8s: {cut}"
            ),
        ]
    );
    assert!(
        parse(&text.replace("deadline = \"8s\"", "deadline = \"2m\""))
            .unwrap()
            .warnings()
            .is_empty()
    );
}

#[test]
fn a_header_made_with_a_variable_set_but_empty_is_a_warning() {
    let env = |name: &str| match name {
        "EMPTY" | "ALSO_EMPTY" => Some(String::new()),
        "TOKEN" => Some("s3cret-token".to_owned()),
        _ => None,
    };
    let text = r#"[[handler]]
name = "crm"
events = ["*"]
stage = "after"
url = "http://crm.example/"
headers = { Authorization = "Bearer ${EMPTY}", X-Both = "${EMPTY}${ALSO_EMPTY}", X-Set = "${TOKEN}", X-Plain = "v" }
"#;
    let config = Config::parse_with_env(text, "p.toml", Path::new("."), &env).unwrap();
    assert_eq!(
        config.warnings(),
        [
            "handler \"crm\": header Authorization: the environment variable `EMPTY` is set \
             but empty, so it adds nothing to the value sent",
            "handler \"crm\": header X-Both: the environment variables `EMPTY`, `ALSO_EMPTY` \
             are set but empty, so they add nothing to the value sent",
        ]
    );
    // The value itself is never in the warning.
    assert!(config.warnings().iter().all(|w| !w.contains("s3cret")));
    let set = |name: &str| Some(format!("{name}-value"));
    let config = Config::parse_with_env(text, "p.toml", Path::new("."), &set).unwrap();
    assert!(config.warnings().is_empty(), "{:?}", config.warnings());
}

#[test]
fn the_listen_address_is_read_from_a_file_that_does_not_load() {
    let tcp = |a: &str| Some(Listen::Tcp(a.parse().unwrap()));
    let unset = "[server]\nlisten = \"127.0.0.1:9\"\ntoken = \"${UNSET}\"\n";
    assert!(Config::parse_with_env(unset, "p.toml", Path::new("."), &env).is_err());
    assert_eq!(Listen::written_in(unset), tcp("127.0.0.1:9"));
    assert_eq!(
        Listen::written_in("[[handler]]\nname = 1\n"),
        tcp(defaults::LISTEN)
    );
    assert_eq!(
        Listen::written_in("[server]\nlisten = \"unix:/run/p.sock\"\n"),
        Some(Listen::Unix("/run/p.sock".into()))
    );
    for text in [
        "[server\n",
        "[server]\nlisten = 8600\n",
        "[server]\nlisten = \"${LISTEN}\"\n",
        "[server]\nlisten = \"localhost\"\n",
    ] {
        assert_eq!(Listen::written_in(text), None, "{text}");
    }
}

#[test]
fn a_section_written_as_something_else_than_one_table_says_how_to_write_it() {
    assert_eq!(
        error_lines("[[server]]\nlisten = \"127.0.0.1:1\"\n"),
        ["p.toml:1:1: server: must be one table: write [server], not [[server]]"]
    );
    assert_eq!(
        error_lines("events = [\"clients.create\"]\n"),
        [
            "p.toml:1:10: events: must be a table: `[events]` with `extra = [...]` lists the \
             events beyond the catalogue; the events a handler takes go in its own `events`, \
             under [[handler]]"
        ]
    );
    assert_eq!(
        error_lines("defaults = 5\n"),
        [
            "p.toml:1:12: defaults: must be a table: write [defaults], with its keys on the lines below"
        ]
    );
}
