//! The client commands (`send`, `executions`, `deadletters`, `health`): `--url` and
//! `--token` on each, and the config's token never sent anywhere but the config's own
//! listener.

use std::process::Stdio;

use crate::common::*;

/// Every client command, as argv after `provisiond`.
const COMMANDS: &[&[&str]] = &[
    &["send", "clients.create"],
    &["executions"],
    &["deadletters", "list"],
    &["deadletters", "replay", "--all"],
    &["deadletters", "drop", "7"],
    &["health", "--ready"],
];

/// A stand-in for "somewhere else": records what it is sent, answers like a sidecar.
async fn elsewhere() -> HandlerServer {
    HandlerServer::start(|call| async move {
        let body = match call.path.as_str() {
            "/v1/executions" => r#"{"count": 0, "executions": []}"#,
            "/v1/deadletters" => r#"{"count": 0, "deadletters": []}"#,
            "/v1/deadletters/replay" => r#"{"replayed": 0, "skipped": 0}"#,
            "/readyz" => r#"{"status": "ready", "generation": 1, "store": "x"}"#,
            _ => r#"{"event": {}, "data": {}}"#,
        };
        reply(200, body)
    })
    .await
}

fn with(args: &[&str], more: &[&str]) -> Vec<String> {
    args.iter().chain(more).map(|s| (*s).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_configs_token_goes_to_its_own_listener_only() {
    let sidecar = Sidecar::start(&format!("{SERVER}token = \"tok-listener\"\n"));
    // The client's config names the sidecar's real address (its own says port 0).
    let dir = tempfile::TempDir::new().unwrap();
    std::fs::write(
        dir.path().join("provisioning.toml"),
        format!(
            "[server]\nlisten = \"{}\"\ntoken = \"tok-listener\"\n",
            sidecar.addr
        ),
    )
    .unwrap();
    let other = elsewhere().await;
    let url = other.url("");

    for command in COMMANDS {
        let before = other.calls().len();
        let args = with(command, &["--url", &url]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = run_binary(dir.path(), &args);
        assert_eq!(code, 0, "{args:?}: {err}");
        if command[0] == "health" {
            // Its probes take no token: nothing to say about not sending one.
            assert_eq!(err, "", "{args:?}");
        } else {
            assert!(
                err.contains(&format!(
                    "provisiond: note: not sending the config's server.token to {url}: it \
                     is not the config's listener ({}); give --token to authenticate there",
                    sidecar.addr
                )),
                "{args:?}: {err}"
            );
        }
        let calls = other.calls();
        assert_eq!(calls.len(), before + 1, "{args:?}");
        let call = calls.last().unwrap();
        assert_eq!(
            call.header("authorization"),
            None,
            "{args:?} leaked the token"
        );

        // --token says what to send there.
        let args = with(command, &["--url", &url, "--token", "tok-other"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = run_binary(dir.path(), &args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(!err.contains("note:"), "{err}");
        let call = other.calls().last().unwrap().clone();
        assert_eq!(call.header("authorization"), Some("Bearer tok-other"));
    }
    assert!(
        other
            .calls()
            .iter()
            .all(|c| !String::from_utf8_lossy(&c.body).contains("tok-listener"))
    );

    // The listener itself, by the config or by a --url that names it, gets the token.
    let port = sidecar.addr.rsplit(':').next().unwrap();
    for extra in [
        &[][..],
        &["--url", &format!("http://{}", sidecar.addr)],
        &["--url", &format!("http://localhost:{port}/")],
    ] {
        let args = with(&["executions"], extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = run_binary(dir.path(), &args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert_eq!(err, "no executions match\n", "{args:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sidecar_that_wants_a_token_says_so_and_takes_one_given_with_token() {
    let sidecar = Sidecar::start(&format!("{SERVER}token = \"tok-9\"\n"));
    let url = format!("http://{}", sidecar.addr);
    let empty = tempfile::TempDir::new().unwrap();
    let (code, out, err) = run_binary(empty.path(), &["executions", "--url", &url]);
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(
        err.contains(&format!(
            "(HTTP 401): the sidecar at {url} wants its server.token; give --token (or \
             PROVISIOND_CLIENT_TOKEN), or -c with its config"
        )),
        "{err}"
    );
    let (code, _, err) = run_binary(
        empty.path(),
        &["executions", "--url", &url, "--token", "tok-9"],
    );
    assert_eq!(code, 0, "{err}");
    // The same token from the environment, out of `ps`; --token still wins over it.
    let from_env = |args: &[&str]| {
        let env = [("PROVISIOND_CLIENT_TOKEN", "tok-9")];
        run_binary_env(empty.path(), args, &env, Stdio::piped(), Stdio::piped())
    };
    let (code, _, err) = from_env(&["executions", "--url", &url]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = from_env(&["executions", "--url", &url, "--token", "wrong"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "(HTTP 401): the sidecar at {url} refused the token given (--token or \
             PROVISIOND_CLIENT_TOKEN): it is not its server.token"
        )),
        "{err}"
    );
    // The config's own token, refused: the file and the sidecar disagree.
    std::fs::write(
        empty.path().join("provisioning.toml"),
        format!(
            "[server]\nlisten = \"{}\"\ntoken = \"tok-old\"\n",
            sidecar.addr
        ),
    )
    .unwrap();
    let (code, _, err) = run_binary(empty.path(), &["executions"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "(HTTP 401): the sidecar at {url} refused the server.token of \
             provisioning.toml: it runs with another"
        )),
        "{err}"
    );
    // `send` says the status and the same hint on stderr; the reply's body is on stdout.
    let (code, out, err) = run_binary(
        empty.path(),
        &["send", "clients.create", "--url", &url, "--token", "wrong"],
    );
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err,
        format!(
            "HTTP 401: the sidecar at {url} refused the token given (--token or \
             PROVISIOND_CLIENT_TOKEN): it is not its server.token\n"
        )
    );
    let reply: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(reply["error"]["message"].is_string(), "{reply}");
}

#[tokio::test(flavor = "multi_thread")]
async fn send_warns_about_an_event_outside_the_catalogue_and_sends_it_anyway() {
    let other = elsewhere().await;
    let url = other.url("");
    let dir = tempfile::TempDir::new().unwrap();
    let (code, _, err) = run_binary(dir.path(), &["send", "clients.crate", "--url", &url]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.starts_with(
            "provisiond: warning: \"clients.crate\" is not in the billing's catalogue nor \
             [events] extra (did you mean \"clients.create\"?); sending it anyway: the \
             sidecar gives it to the handlers matching \"*\" or a prefix only\n"
        ),
        "{err}"
    );
    assert_eq!(
        other.calls().last().unwrap().json()["event"]["events_id"],
        "clients.crate"
    );
    // Catalogue names, aliases and the config's [events] extra are not warned about.
    std::fs::write(
        dir.path().join("provisioning.toml"),
        "[events]\nextra = [\"billing.custom_thing\"]\n",
    )
    .unwrap();
    for event in [
        "clients.create",
        "clients_packages.activate",
        "billing.custom_thing",
    ] {
        let (code, _, err) = run_binary(dir.path(), &["send", event, "--url", &url]);
        assert_eq!(code, 0, "{err}");
        assert!(!err.contains("warning"), "{event}: {err}");
    }
    let before = other.calls().len();
    let (code, _, err) = run_binary(dir.path(), &["send", "zzz.qqq", "--url", &url]);
    assert_eq!(code, 0);
    assert!(
        err.starts_with("provisiond: warning: \"zzz.qqq\" is not in the billing's catalogue nor [events] extra; sending it anyway"),
        "{err}"
    );
    assert_eq!(other.calls().len(), before + 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_listen_change_waiting_for_a_restart_the_client_says_to_give_url() {
    // The sidecar runs on `old`; the file now says `new`, which needs a restart.
    let (old, new) = (free_addr(), free_addr());
    let sidecar = Sidecar::start(&format!("[server]\nlisten = \"{old}\"\n"));
    write_atomic(
        &sidecar.config_path,
        &format!("[server]\nlisten = \"{new}\"\n"),
    );
    sidecar
        .wait_for_config(std::time::Duration::from_secs(30), |c| {
            c["restart_needed"][0]["setting"] == "server.listen"
        })
        .await;
    let dir = sidecar.dir.path();
    let (code, out, err) = run_binary(dir, &["executions", "-c", "provisioning.toml"]);
    assert_eq!((code, out.as_str()), (1, ""), "{err}");
    assert!(
        err.starts_with(&format!(
            "provisiond: cannot reach provisiond at http://{new}: "
        )),
        "{err}"
    );
    assert!(
        err.ends_with(
            " (the server.listen of provisioning.toml: is provisiond running? A changed \
             listen applies at restart; until then give --url with the address it runs on)\n"
        ),
        "{err}"
    );
    // As the hint says.
    let url = format!("http://{old}");
    let (code, _, err) = run_binary(dir, &["executions", "--url", &url]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(err, "no executions match\n");
    // A --url that reaches nothing gets no such hint: it did not come from the file.
    let nobody = format!("http://{}", free_addr());
    let (code, _, err) = run_binary(dir, &["executions", "--url", &nobody]);
    assert_eq!(code, 1);
    assert!(!err.contains("server.listen"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_with_url_is_not_concerned_by_a_broken_config() {
    // A Kubernetes probe during a bad push: the image's PROVISIOND_CONFIG names a file
    // that does not load, the probe gives the address. It says nothing of the file.
    let sidecar = Sidecar::start(SERVER);
    let dir = tempfile::TempDir::new().unwrap();
    let broken = dir.path().join("provisioning.toml");
    std::fs::write(&broken, "[server\nlisten = \"127.0.0.1:1\"\n").unwrap();
    let url = format!("http://{}", sidecar.addr);
    let env = [("PROVISIOND_CONFIG", broken.to_str().unwrap())];
    for args in [
        &["health", "--url", &url][..],
        &["health", "--ready", "--url", &url],
    ] {
        let (code, out, err) =
            run_binary_env(dir.path(), args, &env, Stdio::piped(), Stdio::piped());
        assert_eq!((code, err.as_str()), (0, ""), "{args:?}: {out}");
    }
    // Another client command still says why the file's token is not sent.
    let (code, _, err) = run_binary_env(
        dir.path(),
        &["executions", "--url", &url],
        &env,
        Stdio::piped(),
        Stdio::piped(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("cannot load the config"), "{err}");
}
