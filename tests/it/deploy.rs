//! Deploying provisiond: safe defaults off loopback, `health` for probes, systemd
//! readiness and the unit file, the container and Kubernetes examples, completions and
//! the man page, and the install story the README tells.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;
use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    let path = root().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The image's build stage copies everything the binary is built from: the manifest,
/// the sources, the bench target the manifest names, and every file the sources include
/// (`include_str!`, `include_bytes!`: the web console's assets, the SQL). A directory
/// left out fails `docker build` at compile time, which no test here runs.
#[test]
fn the_image_copies_every_file_the_binary_is_built_from() {
    let dockerfile = read("Dockerfile");
    let build_stage = dockerfile
        .split("\nFROM ")
        .nth(1)
        .expect("a build stage after the comments");
    let copied: Vec<&str> = build_stage
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .flat_map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            parts[..parts.len() - 1].to_vec()
        })
        .collect();
    let mut needed = std::collections::BTreeSet::from([
        "Cargo.toml".to_owned(),
        "Cargo.lock".to_owned(),
        // Cargo's build settings: how the binary is linked.
        ".cargo".to_owned(),
        "src".to_owned(),
        "benches".to_owned(),
    ]);
    let mut dirs = vec![root().join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let macros = ["include_str!(\"", "include_bytes!(\""];
            for piece in macros.iter().flat_map(|m| text.split(m).skip(1)) {
                let included = piece.split('"').next().unwrap_or_default();
                let file = std::fs::canonicalize(path.parent().unwrap().join(included))
                    .unwrap_or_else(|e| panic!("{}: {included}: {e}", path.display()));
                let top = file
                    .strip_prefix(std::fs::canonicalize(root()).unwrap())
                    .unwrap()
                    .components()
                    .next()
                    .unwrap();
                needed.insert(top.as_os_str().to_string_lossy().into_owned());
            }
        }
    }
    assert!(needed.contains("assets"), "the console's files: {needed:?}");
    for top in &needed {
        assert!(
            copied.iter().any(|c| c.trim_end_matches('/') == top),
            "the Dockerfile's build stage does not COPY {top} (it copies {copied:?})"
        );
    }
}

/// The first line of a check of `config` written to a temporary file.
fn check_text(config: &str, env: &[(&str, &str)]) -> (i32, String, String) {
    let dir = tempfile::TempDir::new().unwrap();
    std::fs::write(dir.path().join("provisioning.toml"), config).unwrap();
    let mut args = vec!["check", "-c"];
    let path = dir.path().join("provisioning.toml");
    args.push(path.to_str().unwrap());
    cli(&args, env, "")
}

const OFF_LOOPBACK: &str = "is reachable from other hosts and server.token is not set, so \
    anyone who reaches it could post events and use /v1/reload and the dead-letter routes; \
    set server.token = \"${PROVISIOND_TOKEN}\" (and give PROVISIOND_TOKEN), listen on \
    127.0.0.1 or a unix socket, or set server.allow_insecure = true if something else \
    guards the port";

#[test]
fn a_listener_off_loopback_needs_a_token_or_the_explicit_opt_out() {
    for listen in ["0.0.0.0:8600", "[::]:8600", "192.0.2.10:8600"] {
        let (code, _, err) = check_text(&format!("[server]\nlisten = \"{listen}\"\n"), &[]);
        assert_eq!(code, 1, "{listen}: {err}");
        let shown = listen.to_owned();
        assert!(
            err.contains(&format!(
                "provisioning.toml:2:10: server.listen: {shown} {OFF_LOOPBACK}"
            )),
            "{listen}: {err}"
        );
    }
    // A token, or the documented opt-out, or loopback or a unix socket: fine.
    for config in [
        "[server]\nlisten = \"0.0.0.0:8600\"\ntoken = \"${T}\"\n",
        "[server]\nlisten = \"0.0.0.0:8600\"\nallow_insecure = true\n",
        "[server]\nlisten = \"127.0.0.1:8600\"\n",
        "[server]\nlisten = \"[::1]:8600\"\n",
        "[server]\nlisten = \"unix:/run/provisiond/provisiond.sock\"\n",
        "# the default listen address\n",
    ] {
        let (code, out, err) = check_text(config, &[("T", "secret-1")]);
        assert_eq!(code, 0, "{config}: {err}");
        assert!(out.contains(": ok"), "{out}");
    }
    // `allow_insecure = false` is the default, said out loud.
    let (code, _, err) = check_text(
        "[server]\nlisten = \"0.0.0.0:8600\"\nallow_insecure = false\n",
        &[],
    );
    assert_eq!(code, 1, "{err}");

    // `run` refuses the file with the same words, and does not listen.
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("provisioning.toml");
    std::fs::write(&path, "[server]\nlisten = \"0.0.0.0:0\"\n").unwrap();
    let (code, _, err) = run_binary(
        dir.path(),
        &["run", "-c", path.to_str().unwrap(), "--log-format", "json"],
    );
    assert_eq!(code, 1, "{err}");
    let records: Vec<Value> = err
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        records.iter().any(|r| r["message"] == "invalid config"
            && r["error"]
                .as_str()
                .is_some_and(|e| e.ends_with(&format!("server.listen: 0.0.0.0:0 {OFF_LOOPBACK}")))),
        "{err}"
    );
    assert!(!err.contains("\"listening\""), "{err}");
}

#[test]
fn the_container_config_does_not_start_without_its_token() {
    let config = root().join("examples/container/provisioning.toml");
    let (code, _, err) = cli(&["check", "-c", config.to_str().unwrap()], &[], "");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("server.token: environment variable `PROVISIOND_TOKEN` is not set"),
        "{err}"
    );
    let (code, out, err) = cli(
        &["check", "-c", config.to_str().unwrap()],
        &[("PROVISIOND_TOKEN", "t-1")],
        "",
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("listen 0.0.0.0:8600"), "{out}");
}

/// A config beside the sidecar's that names the address it really listens on (the
/// sidecar's own says port 0), for the client commands' `-c`.
fn client_config(sidecar: &Sidecar, server: &str) -> String {
    let path = sidecar.dir.path().join("client.toml");
    std::fs::write(
        &path,
        format!("[server]\nlisten = \"{}\"\n{server}", sidecar.addr),
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn health_answers_on_tcp_and_unix_sockets_and_fails_when_nothing_answers() {
    let sidecar = Sidecar::start(&format!("{SERVER}token = \"secret-7\"\n"));
    let config = client_config(&sidecar, "token = \"secret-7\"\n");
    let dir = sidecar.dir.path();
    let (code, out, err) = run_binary(dir, &["health", "-c", &config]);
    assert_eq!((code, out.as_str(), err.as_str()), (0, "ok\n", ""));
    let (code, out, err) = run_binary(dir, &["health", "--ready", "-c", &config]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("ready: config generation 1, store "),
        "{out}"
    );

    let socket_dir = tempfile::TempDir::new().unwrap();
    let socket = socket_dir.path().join("p.sock");
    let unix = Sidecar::start(&format!(
        "[server]\nlisten = \"unix:{}\"\n",
        socket.display()
    ));
    let config = unix.config_path.to_str().unwrap().to_owned();
    let (code, out, err) = run_binary(unix.dir.path(), &["health", "--ready", "-c", &config]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ready: "), "{out}");
    let url = format!("unix:{}", socket.display());
    let (code, out, _) = run_binary(unix.dir.path(), &["health", "--url", &url]);
    assert_eq!((code, out.as_str()), (0, "ok\n"));

    // Nothing there: exit 1, saying where it looked.
    let nobody = format!("http://{}", free_addr());
    let empty = tempfile::TempDir::new().unwrap();
    let (code, out, err) = run_binary(empty.path(), &["health", "--url", &nobody]);
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(
        err.starts_with(&format!(
            "provisiond: cannot reach provisiond at {nobody}: "
        )),
        "{err}"
    );
    // A bad --url and a bad --timeout are named.
    let (code, _, err) = run_binary(dir, &["health", "--url", "127.0.0.1:8600"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("--url \"127.0.0.1:8600\" is not a sidecar address; write http://host:port"),
        "{err}"
    );
    let (code, _, err) = run_binary(dir, &["health", "--timeout", "soon"]);
    assert_eq!(code, 2);
    assert!(err.contains("invalid value 'soon' for '--timeout"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_fails_when_the_sidecar_is_not_ready_or_does_not_answer_in_time() {
    // Stand-ins for a sidecar that is draining, and one that hangs.
    let draining = HandlerServer::start(|call| async move {
        if call.path == "/readyz" {
            reply(503, r#"{"error": {"message": "shutting down"}}"#)
        } else {
            reply(200, r#"{"status": "ok"}"#)
        }
    })
    .await;
    let url = draining.url("");
    let dir = tempfile::TempDir::new().unwrap();
    let (code, out, _) = run_binary(dir.path(), &["health", "--url", &url]);
    assert_eq!((code, out.as_str()), (0, "ok\n"));
    let (code, out, err) = run_binary(dir.path(), &["health", "--ready", "--url", &url]);
    assert_eq!((code, out.as_str()), (1, ""));
    assert_eq!(
        err,
        format!("provisiond: not ready at {url}: shutting down (HTTP 503)\n")
    );

    let hanging = HandlerServer::start(|_| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        reply(200, "")
    })
    .await;
    let started = std::time::Instant::now();
    let (code, _, err) = run_binary(
        dir.path(),
        &["health", "--url", &hanging.url(""), "--timeout", "300ms"],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.ends_with(": no answer in time\n"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A fake systemd: the datagram socket `NOTIFY_SOCKET` names.
struct Notify {
    socket: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Notify {
    fn new() -> Self {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Self {
            socket,
            path,
            _dir: dir,
        }
    }

    fn next(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_and_stopping_are_notified_to_systemd() {
    let notify = Notify::new();
    let env = [("NOTIFY_SOCKET", notify.path.to_str().unwrap())];
    let sidecar = Sidecar::start_in(tempfile::TempDir::new().unwrap(), SERVER, &env);
    let ready = notify.next();
    let lines: Vec<&str> = ready.lines().collect();
    assert_eq!(
        lines,
        ["READY=1", &format!("STATUS=listening on {}", sidecar.addr)],
        "{ready}"
    );
    // Ready means ready: the config is loaded and the store open.
    let (status, body) = sidecar.get("/readyz").await;
    assert_eq!(status, 200, "{body}");

    let (_, _, exit) = sidecar.terminate();
    assert!(exit.success());
    assert_eq!(notify.next(), "STOPPING=1\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_systemd_watchdog_is_pinged_while_the_sidecar_runs() {
    let notify = Notify::new();
    let env = [
        ("NOTIFY_SOCKET", notify.path.to_str().unwrap()),
        // 200 ms: a ping every 100 ms.
        ("WATCHDOG_USEC", "200000"),
    ];
    let sidecar = Sidecar::start_in(tempfile::TempDir::new().unwrap(), SERVER, &env);
    assert!(notify.next().starts_with("READY=1\n"));
    for _ in 0..3 {
        assert_eq!(notify.next(), "WATCHDOG=1\n");
    }
    // For another process (WATCHDOG_PID), the watchdog is not ours: no pings, as
    // without WATCHDOG_USEC (readiness_and_stopping_are_notified_to_systemd).
    drop(sidecar);
    let notify = Notify::new();
    let env = [
        ("NOTIFY_SOCKET", notify.path.to_str().unwrap()),
        ("WATCHDOG_USEC", "200000"),
        ("WATCHDOG_PID", "1"),
    ];
    let sidecar = Sidecar::start_in(tempfile::TempDir::new().unwrap(), SERVER, &env);
    assert!(notify.next().starts_with("READY=1\n"));
    let (_, _, exit) = sidecar.terminate();
    assert!(exit.success());
    assert_eq!(notify.next(), "STOPPING=1\n");
}

#[test]
fn a_config_that_does_not_load_notifies_nothing() {
    let notify = Notify::new();
    notify
        .socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("provisioning.toml");
    std::fs::write(&path, "[server]\nlisten = 1\n").unwrap();
    let (code, _, _) = cli(
        &["run", "-c", path.to_str().unwrap()],
        &[("NOTIFY_SOCKET", notify.path.to_str().unwrap())],
        "",
    );
    assert_eq!(code, 1);
    // The process has exited: anything it sent is already in the socket.
    let mut buf = [0u8; 64];
    assert!(
        notify.socket.recv(&mut buf).is_err(),
        "a failed start notified"
    );
}

/// `examples/systemd/provisiond.service`, with `ExecStart` pointing at the binary under
/// test (`systemd-analyze verify` checks that it exists).
fn unit_under_test(dir: &Path) -> PathBuf {
    let unit =
        read("examples/systemd/provisiond.service").replace("/usr/local/bin/provisiond", binary());
    let path = dir.join("provisiond.service");
    std::fs::write(&path, unit).unwrap();
    path
}

#[test]
fn the_systemd_unit_verifies() {
    let Ok(analyze) = which("systemd-analyze") else {
        println!("note: systemd-analyze is not installed; skipping `systemd-analyze verify`");
        return;
    };
    let dir = tempfile::TempDir::new().unwrap();
    let unit = unit_under_test(dir.path());
    let out = std::process::Command::new(analyze)
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {err}");
    assert!(!err.contains("provisiond.service"), "{err}");

    // The check can fail: a broken unit is reported.
    std::fs::write(
        &unit,
        std::fs::read_to_string(&unit)
            .unwrap()
            .replace("Type=notify", "Type=notifyy"),
    )
    .unwrap();
    let out = std::process::Command::new(which("systemd-analyze").unwrap())
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("notifyy"),
        "a bad Type= passed"
    );
}

fn which(program: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or(())
}

#[test]
fn the_systemd_unit_runs_a_notifying_hardened_service_with_its_store_in_its_state_directory() {
    let unit = read("examples/systemd/provisiond.service");
    let settings: Vec<&str> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    for want in [
        "Type=notify",
        "ExecStart=/usr/local/bin/provisiond run -c /etc/provisiond/provisioning.toml --log-format json",
        "ExecReload=/usr/local/bin/provisiond check -c /etc/provisiond/provisioning.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "WatchdogSec=30",
        "StateDirectory=provisiond",
        "WorkingDirectory=/var/lib/provisiond",
        "User=provisiond",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
    ] {
        assert!(settings.contains(&want), "the unit lacks {want}");
    }
    // The default store.path is relative to the working directory: with the unit's,
    // the store lands in the state directory, which ProtectSystem=strict leaves writable.
    let config = provisiond::config::Config::parse("", "provisioning.toml").unwrap();
    assert_eq!(
        Path::new("/var/lib/provisiond").join(&config.store.path),
        Path::new("/var/lib/provisiond/provisiond.db")
    );
}

/// The live descendants of `pid` (children, their children...).
fn descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let (_, rest) = stat.rsplit_once(')')?;
            let mut fields = rest.split_whitespace();
            let state = fields.next()?;
            let ppid = fields.next()?.parse().ok()?;
            (state != "Z").then_some((p, ppid))
        })
        .collect();
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    found.split_off(1)
}

/// The billing's request for a `clients.create` that a test cuts short (by stopping
/// provisiond): its result, an error when it was cut.
fn cut_short(
    sidecar: &Sidecar,
) -> impl std::future::Future<Output = reqwest::Result<reqwest::Response>> {
    sidecar
        .client()
        .post(sidecar.url("/events"))
        .body(envelope("clients.create", 12, serde_json::json!({"name": "acme"})).to_string())
        .send()
}

/// Sends SIGTERM to process `pid`.
fn sigterm(pid: u32) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
}

/// Waits (5 s at most) until `pid` has at least `n` descendants: the script handlers it
/// started, and theirs; those.
async fn started(pid: u32, n: usize) -> Vec<u32> {
    let mut found = Vec::new();
    for _ in 0..250 {
        found = descendants(pid);
        if found.len() >= n {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the script did not start: {found:?}");
}

/// `systemctl stop` as the unit has it: SIGTERM to the main process, and with
/// `KillMode=control-group` (systemd's default) to every other process of the unit too,
/// the script handlers running at that moment included.
#[tokio::test(flavor = "multi_thread")]
async fn a_systemctl_stop_lets_the_script_handlers_in_flight_finish() {
    let unit = read("examples/systemd/provisiond.service");
    let kill_mode = unit
        .lines()
        .filter_map(|l| l.trim().strip_prefix("KillMode="))
        .next_back()
        .unwrap_or("control-group")
        .to_owned();
    let dir = tempfile::TempDir::new().unwrap();
    script(
        dir.path(),
        "slow.sh",
        "#!/bin/sh\ncat >/dev/null\nsleep 1\ntouch finished\n",
    );
    let finished = dir.path().join("finished");
    let config = format!(
        "{SERVER}\n[[handler]]\nname = \"provision\"\nevents = [\"clients.create\"]\n\
         stage = \"before\"\ncommand = [\"./slow.sh\"]\ntimeout = \"8s\"\non_error = \"deny\"\n"
    );
    let mut sidecar = Sidecar::start_in(dir, &config, &[]);
    let main = sidecar.child.id();
    let stop = async {
        let scripts = started(main, 1).await;
        let mut targets = vec![main];
        if kill_mode == "control-group" {
            targets.extend(scripts);
        }
        for pid in targets {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
    };
    let ((status, body), ()) = tokio::join!(
        sidecar.send("clients.create", 12, serde_json::json!({"name": "acme"})),
        stop
    );
    // The drain promised: the event in flight is answered as if nothing had happened.
    assert_eq!(status, 200, "KillMode={kill_mode}: {body}");
    assert!(finished.exists(), "the script was cut short");
    let exit = sidecar
        .wait_exit(Duration::from_secs(20))
        .expect("it exits");
    assert!(exit.success(), "{exit:?}");
}

/// The install steps in the unit's header are the README's (its systemd section, without
/// `sudo`): an operator following either one gets the same files in place.
#[test]
fn the_units_install_steps_are_the_readmes() {
    fn steps<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<String> {
        lines
            .map(|l| l.split(" #").next().unwrap().trim())
            .filter(|l| {
                ["cargo install ", "install ", "cp "]
                    .iter()
                    .any(|p| l.starts_with(p))
            })
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    }
    let readme = readme();
    let section = readme
        .split("\n### systemd\n")
        .nth(1)
        .expect("the README has a systemd section");
    let block = code_blocks(section, "sh").next().unwrap();
    let from_readme = steps(block.lines().filter_map(|l| l.strip_prefix("sudo ")));
    let unit = read("examples/systemd/provisiond.service");
    let from_unit = steps(unit.lines().filter_map(|l| l.strip_prefix("#   ")));
    assert_eq!(from_readme.len(), 4, "{block}");
    let mut sorted = (from_readme.clone(), from_unit.clone());
    sorted.0.sort();
    sorted.1.sort();
    assert_eq!(
        sorted.0, sorted.1,
        "README {from_readme:#?}\nunit {from_unit:#?}"
    );
}

/// The `command: [...]` arrays of a YAML file, as argv.
fn yaml_commands(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("command: "))
        .map(|array| serde_json::from_str(array).expect("a JSON-style array"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_container_and_kubernetes_probes_run_provisiond_health_as_written() {
    let sidecar = Sidecar::start(SERVER);
    let url = format!("http://{}", sidecar.addr);
    let dir = sidecar.dir.path();

    // Docker: HEALTHCHECK CMD ["/usr/local/bin/provisiond", "health", ...], with the
    // image's PROVISIOND_CONFIG; here, the sidecar's config.
    let dockerfile = read("Dockerfile");
    let healthcheck = dockerfile
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("CMD [\"/usr/local/bin/provisiond\", \"health\"")
        })
        .expect("a HEALTHCHECK running provisiond health");
    let mut args: Vec<String> = serde_json::from_str(&format!("[\"health\"{healthcheck}")).unwrap();
    assert!(args.contains(&"--ready".to_owned()), "{args:?}");
    assert!(dockerfile.contains("HEALTHCHECK "), "{dockerfile}");
    args.extend(["-c".into(), client_config(&sidecar, "")]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = run_binary(dir, &args);
    assert_eq!(code, 0, "{args:?}: {err}");

    // Kubernetes: every probe is `provisiond health` against the config's listener.
    let deployment = read("examples/kubernetes/deployment.yaml");
    let probes = yaml_commands(&deployment);
    assert_eq!(probes.len(), 3, "startup, liveness, readiness: {probes:?}");
    for probe in probes {
        assert_eq!(probe[..2], ["provisiond", "health"], "{probe:?}");
        assert!(
            probe.contains(&"http://127.0.0.1:8600".to_owned()),
            "{probe:?}"
        );
        let args: Vec<&str> = probe[1..]
            .iter()
            .map(|a| {
                if a == "http://127.0.0.1:8600" {
                    &url
                } else {
                    a
                }
            })
            .map(String::as_str)
            .collect();
        let (code, _, err) = run_binary(dir, &args);
        assert_eq!(code, 0, "{probe:?}: {err}");
    }
    for probe in ["startupProbe:", "livenessProbe:", "readinessProbe:"] {
        assert!(deployment.contains(probe), "no {probe}");
    }
    // The token comes from a Secret.
    assert!(
        deployment.contains(
            "- name: PROVISIOND_TOKEN\n              valueFrom:\n                secretKeyRef:"
        ),
        "{deployment}"
    );
    assert!(
        read("examples/kubernetes/provisioning.toml").contains("token = \"${PROVISIOND_TOKEN}\"")
    );
}

#[test]
fn completions_and_the_man_page_cover_every_command() {
    for (shell, marker) in [
        ("bash", "_provisiond()"),
        ("zsh", "#compdef provisiond"),
        ("fish", "complete -c provisiond"),
    ] {
        let (code, out, err) = cli(&["completions", shell], &[], "");
        assert_eq!(code, 0, "{shell}: {err}");
        assert!(out.contains(marker), "{shell}:\n{out}");
        for command in ["deadletters", "executions", "health", "send", "check"] {
            assert!(out.contains(command), "{shell} lacks {command}");
        }
    }
    let (code, _, err) = cli(&["completions", "tcsh"], &[], "");
    assert_eq!(code, 2);
    assert!(
        err.contains("invalid value 'tcsh'") && err.contains("bash, zsh, fish"),
        "{err}"
    );

    let (code, man, err) = cli(&["man"], &[], "");
    assert_eq!(code, 0, "{err}");
    assert!(man.starts_with(".ie \\n(.g .ds Aq"), "{man}");
    assert!(man.contains(".TH provisiond 1"), "{man}");
    assert!(
        man.contains(".SH NAME") && man.contains(".SH COMMANDS"),
        "{man}"
    );
    // Every command is in this one page, with its options: no page of its own
    // (`provisiond-health(1)`) is referred to, as none is installed.
    for command in [
        ".SS \"provisiond health\"",
        ".SS \"provisiond deadletters replay\"",
        ".SS \"provisiond store copy\"",
        "\\fB\\-\\-follow\\fR",
        "\\fB\\-\\-ready\\fR",
    ] {
        assert!(man.contains(command), "the man page lacks {command}");
    }
    assert!(!man.contains("provisiond\\-health(1)"), "{man}");
    assert_eq!(man.matches(".ds Aq \\(aq").count(), 1, "one preamble");
}

#[test]
fn the_readme_installs_and_the_release_profile_is_tuned_for_a_daemon() {
    let readme = read("README.md");
    for want in [
        "cargo install --locked --path .",
        "~/.cargo/bin/provisiond",
        "cargo run --release",
        "cargo test --locked",
    ] {
        assert!(readme.contains(want), "the README lacks {want}");
    }
    let manifest: toml::Table = read("Cargo.toml").parse().unwrap();
    let release = &manifest["profile"]["release"];
    assert_eq!(release["lto"].as_str(), Some("fat"), "{release}");
    assert_eq!(release["codegen-units"].as_integer(), Some(1), "{release}");
    assert_eq!(release["strip"].as_str(), Some("symbols"), "{release}");
    assert_eq!(
        manifest["package"]["license"].as_str(),
        Some("MIT OR Apache-2.0")
    );
    for file in ["LICENSE-MIT", "LICENSE-APACHE", "CHANGELOG.md"] {
        assert!(root().join(file).is_file(), "{file} is missing");
    }
    let apache = read("LICENSE-APACHE");
    assert!(apache.contains("Apache License") && apache.contains("Version 2.0, January 2004"));
    assert!(read("LICENSE-MIT").contains("Permission is hereby granted, free of charge"));
    let changelog = read("CHANGELOG.md");
    let version = manifest["package"]["version"].as_str().unwrap();
    assert!(
        changelog.contains(&format!("## [{version}]")),
        "CHANGELOG.md has no entry for {version}"
    );
}

/// The (Secret, key) pairs a Kubernetes manifest reads through `secretKeyRef`.
fn secret_refs(yaml: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = yaml.lines().map(str::trim).collect();
    lines
        .iter()
        .enumerate()
        .filter(|(_, l)| **l == "secretKeyRef:")
        .map(|(i, _)| {
            let field = |name: &str| {
                lines[i + 1..i + 3]
                    .iter()
                    .find_map(|l| l.strip_prefix(name))
                    .unwrap_or_else(|| panic!("{name} under secretKeyRef"))
                    .to_owned()
            };
            (field("name: "), field("key: "))
        })
        .collect()
}

/// `kubectl create secret generic NAME --from-literal=KEY=...` commands in `text`
/// (shell lines, continued with `\`, possibly behind `# `), as (NAME, KEY) pairs.
fn created_secrets(text: &str) -> Vec<(String, String)> {
    let shell: String = text
        .lines()
        .map(|l| l.trim().trim_start_matches('#').trim())
        .collect::<Vec<_>>()
        .join(" ")
        .replace("\\ ", " ");
    let mut pairs = Vec::new();
    for command in shell.split("kubectl create secret generic ").skip(1) {
        let mut words = command.split_whitespace();
        let name = words.next().unwrap().to_owned();
        for word in words.take_while(|w| w.starts_with("--from-literal=")) {
            let key = word["--from-literal=".len()..].split('=').next().unwrap();
            pairs.push((name.clone(), key.to_owned()));
        }
    }
    pairs
}

#[test]
fn the_kubernetes_secrets_the_manifests_read_are_the_ones_the_docs_say_to_create() {
    let readme = readme();
    let section = readme
        .split("\n### On Kubernetes\n")
        .nth(1)
        .expect("the README has a Kubernetes section");
    let block = code_blocks(section, "sh").next().unwrap();
    assert!(
        block.find("kubectl create secret") < block.find("kubectl apply -k"),
        "the README creates the Secret after applying: {block}"
    );
    for (manifest, docs) in [
        (
            "examples/kubernetes/deployment.yaml",
            vec![
                block.to_owned(),
                read("examples/kubernetes/kustomization.yaml"),
            ],
        ),
        (
            "examples/kubernetes/shared/deployment.yaml",
            vec![read("examples/kubernetes/shared/kustomization.yaml")],
        ),
    ] {
        let mut wanted = secret_refs(&read(manifest));
        wanted.sort();
        assert!(!wanted.is_empty(), "{manifest} reads no Secret");
        for doc in docs {
            let mut created = created_secrets(&doc);
            created.sort();
            assert_eq!(created, wanted, "{manifest}: {doc}");
        }
    }
}

/// A second SIGTERM quits at once (143): the script handlers still running go with it,
/// and what they started, instead of running on as orphans.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_sigterm_quits_at_once_and_takes_the_running_scripts_with_it() {
    let dir = tempfile::TempDir::new().unwrap();
    script(
        dir.path(),
        "stuck.sh",
        "#!/bin/sh\ncat >/dev/null\nsleep 30 &\nsleep 30\ntouch finished\n",
    );
    // A drain long enough that only the second signal can end it.
    let config = "[server]\nlisten = \"127.0.0.1:0\"\ndeadline = \"60s\"\n\
                  shutdown_grace = \"60s\"\n\n[[handler]]\nname = \"provision\"\n\
                  events = [\"clients.create\"]\nstage = \"before\"\n\
                  command = [\"./stuck.sh\"]\ntimeout = \"60s\"\n";
    let mut sidecar = Sidecar::start_in(dir, config, &[]);
    let main = sidecar.child.id();
    let sending = cut_short(&sidecar);
    let kill = async {
        // The script and the two sleeps.
        let scripts = started(main, 3).await;
        for _ in 0..2 {
            sigterm(main);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        scripts
    };
    let (cut, scripts) = tokio::join!(sending, kill);
    assert!(cut.is_err(), "answered: {cut:?}");
    let exit = sidecar
        .wait_exit(Duration::from_secs(10))
        .expect("it quits");
    assert_eq!(exit.code(), Some(143), "{exit:?}");
    let alive = |pid: &u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let (_, rest) = stat.rsplit_once(')')?;
                rest.split_whitespace().next().map(|s| s != "Z")
            })
            .unwrap_or(false)
    };
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while scripts.iter().any(alive) && std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left: Vec<&u32> = scripts.iter().filter(|p| alive(p)).collect();
    assert!(left.is_empty(), "still running after the quit: {left:?}");
}

/// An event still in flight when the drain's grace runs out is cut, and leaves its
/// trace before provisiond says `stopped`: its `abandoned` log line and its execution
/// log rows, in the store that a restart reads (they used to come after `stopped`,
/// with the store already closed: "execution log is behind, rows dropped").
#[tokio::test(flavor = "multi_thread")]
async fn an_event_cut_by_the_end_of_the_grace_is_logged_before_stopped() {
    let dir = tempfile::TempDir::new().unwrap();
    script(
        dir.path(),
        "slow.sh",
        "#!/bin/sh\ncat >/dev/null\nsleep 10\n",
    );
    let config = "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"1s\"\n\n\
                  [[handler]]\nname = \"slow\"\nevents = [\"clients.create\"]\n\
                  stage = \"before\"\ncommand = [\"./slow.sh\"]\ntimeout = \"9s\"\n";
    let mut sidecar = Sidecar::start_in(dir, config, &[]);
    let main = sidecar.child.id();
    let sending = cut_short(&sidecar);
    let stop = async {
        started(main, 1).await;
        sigterm(main);
    };
    let (cut, ()) = tokio::join!(sending, stop);
    assert!(cut.is_err(), "answered: {cut:?}");
    let exit = sidecar
        .wait_exit(Duration::from_secs(20))
        .expect("it exits");
    assert!(exit.success(), "{exit:?}");
    let messages: Vec<String> = sidecar
        .log_records()
        .iter()
        .map(|r| format!("{} {}", r["message"], r["outcome"]))
        .collect();
    let at = |m: &str| messages.iter().position(|x| x.starts_with(m));
    let abandoned = at("\"event\" \"abandoned\"").expect("the cut event is logged");
    let stopped = at("\"stopped\"").expect("stopped is logged");
    assert!(abandoned < stopped, "{messages:#?}");
    assert!(
        !messages.iter().any(|m| m.contains("rows dropped")),
        "{messages:#?}"
    );
    // The store has its row: a restart on the same directory shows it.
    let dir = std::mem::replace(&mut sidecar.dir, tempfile::TempDir::new().unwrap());
    let again = Sidecar::spawn(dir, sidecar.config_path.clone(), &[]);
    let (status, body) = again.get("/v1/executions?handler=slow").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["count"], 1, "{body}");
    assert_eq!(body["executions"][0]["outcome"], "error", "{body}");
}
