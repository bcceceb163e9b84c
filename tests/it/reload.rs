//! Hot reload against a real provisiond process: real files changed the ways operators
//! and tools change them, real signals, `GET /v1/config` and `POST /v1/reload`.
//!
//! Handlers are [`stamper`]s: a reply's `data.stamps` shows which config's handlers ran.
//! Nothing here asserts how long a reload takes; outcomes are polled with generous
//! timeouts.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::common::*;
use serde_json::{Value, json};

/// How long "eventually" may take on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(30);

/// A config with one before-stage handler that stamps `/{tag}`.
fn tagged(stamper: &HandlerServer, tag: &str) -> String {
    format!(
        "{SERVER}\n[[handler]]\nname = \"stamp\"\nevents = [\"*\"]\nstage = \"before\"\n\
         modifies = true\nurl = {}\n",
        toml_str(stamper.url(&format!("/{tag}")))
    )
}

fn generation(config: &Value) -> u64 {
    config["generation"].as_u64().unwrap()
}

fn reloads(config: &Value, result: &str) -> u64 {
    config["reloads"][result].as_u64().unwrap()
}

async fn served_by(sidecar: &Sidecar) -> Vec<String> {
    let (status, body) = sidecar
        .send("clients.update", 7, json!({"name": "x"}))
        .await;
    assert_eq!(status, 200, "{body}");
    stamps(&body)
}

/// Starts a sidecar on config "one", changes the file to config "two" with `change`, and
/// checks that exactly one reload happened and the next event is served by "two".
async fn one_reload_per_change(
    setup: impl FnOnce(&Path, &str) -> std::path::PathBuf,
    change: impl FnOnce(&Path, &str),
) {
    let stamper = stamper().await;
    let dir = tempfile::TempDir::new().unwrap();
    let config_path = setup(dir.path(), &tagged(&stamper, "one"));
    let sidecar = Sidecar::spawn(dir, config_path.clone(), &[]);
    assert_eq!(served_by(&sidecar).await, ["/one"]);

    change(sidecar.dir.path(), &tagged(&stamper, "two"));
    sidecar
        .wait_for_config(PATIENCE, |c| generation(c) == 2)
        .await;
    assert_eq!(
        served_by(&sidecar).await,
        ["/two"],
        "the next event uses the new handler"
    );

    // A last write, a comment added: its reload comes after any the change caused, and
    // shows as the new file's hash. Then the counts are final.
    let config = last_write(&sidecar, &tagged(&stamper, "two")).await;
    assert_eq!(generation(&config), 2, "{config:#}");
    assert_eq!(
        reloads(&config, "applied"),
        1,
        "exactly one reload: {config:#}"
    );
    assert_eq!(
        reloads(&config, "unchanged"),
        1,
        "only the last write's: {config:#}"
    );
    assert_eq!(reloads(&config, "rejected"), 0, "{config:#}");
    assert!(config["last_error"].is_null(), "{config:#}");
    let summary = sidecar
        .wait_for_log(PATIENCE, |r| r["message"] == "config reloaded")
        .unwrap();
    assert_eq!(summary["changed"], "stamp", "{summary}");
    assert_eq!(summary["trigger"], "watch", "{summary}");
}

/// Writes `text` with a comment of its own over the config (rename-save) and waits until
/// `/v1/config` shows that file's hash: the reload of this write is done, and with it
/// every reload an earlier change could cause (the watcher handles changes in order).
async fn last_write(sidecar: &Sidecar, text: &str) -> Value {
    let text = format!("# last write\n{text}");
    write_atomic(&sidecar.config_path, &text);
    let hash = sha256_hex(&text);
    sidecar
        .wait_for_config(PATIENCE, |c| c["hash"] == hash)
        .await
}

/// SHA-256 of `text`, hex.
fn sha256_hex(text: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A plain file in the directory.
fn plain(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("provisioning.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn an_in_place_write_reloads_once() {
    one_reload_per_change(plain, |dir, text| {
        use std::io::Write;
        // Same inode, truncated and written in two pieces, as some editors do.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(dir.join("provisioning.toml"))
            .unwrap();
        let (head, tail) = text.split_at(text.len() / 2);
        file.write_all(head.as_bytes()).unwrap();
        file.flush().unwrap();
        file.write_all(tail.as_bytes()).unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_editor_rename_save_reloads_once() {
    one_reload_per_change(plain, |dir, text| {
        // What vim and most editors do: write a swap/backup file, then rename over.
        std::fs::write(dir.join(".provisioning.toml.swp"), "swap").unwrap();
        write_atomic(&dir.join("provisioning.toml"), text);
        std::fs::remove_file(dir.join(".provisioning.toml.swp")).unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sed_in_place_reloads_once() {
    one_reload_per_change(plain, |dir, _| {
        let status = std::process::Command::new("sed")
            .args(["-i", "s#/one\"#/two\"#"])
            .arg(dir.join("provisioning.toml"))
            .status()
            .unwrap();
        assert!(status.success());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_and_create_again_reloads_once() {
    one_reload_per_change(plain, |dir, text| {
        let path = dir.join("provisioning.toml");
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, text).unwrap();
    })
    .await;
}

/// The layout of a Kubernetes ConfigMap volume: `provisioning.toml` ->
/// `..data/provisioning.toml`, `..data` -> `..<timestamp>`.
fn configmap(dir: &Path, text: &str) -> std::path::PathBuf {
    let stamped = "..2026_11_26_10_00_00.000000001";
    std::fs::create_dir(dir.join(stamped)).unwrap();
    std::fs::write(dir.join(stamped).join("provisioning.toml"), text).unwrap();
    std::os::unix::fs::symlink(stamped, dir.join("..data")).unwrap();
    let path = dir.join("provisioning.toml");
    std::os::unix::fs::symlink("..data/provisioning.toml", &path).unwrap();
    path
}

/// An update as the kubelet makes it: a new timestamped directory, a `..data_tmp`
/// symlink to it renamed over `..data`, the old directory removed.
fn configmap_update(dir: &Path, text: &str) {
    let old = std::fs::read_link(dir.join("..data")).unwrap();
    let stamped = "..2026_11_26_10_05_00.000000002";
    std::fs::create_dir(dir.join(stamped)).unwrap();
    std::fs::write(dir.join(stamped).join("provisioning.toml"), text).unwrap();
    std::os::unix::fs::symlink(stamped, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(dir.join(old)).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configmap_update_reloads_once() {
    one_reload_per_change(configmap, configmap_update).await;
}

/// `provisioning.toml` a symlink to the file in a checkout beside it.
fn symlinked(dir: &Path, text: &str) -> std::path::PathBuf {
    std::fs::create_dir(dir.join("checkout")).unwrap();
    std::fs::write(dir.join("checkout/provisioning.toml"), text).unwrap();
    let path = dir.join("provisioning.toml");
    std::os::unix::fs::symlink("checkout/provisioning.toml", &path).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn writing_the_file_a_symlink_points_to_reloads_once() {
    one_reload_per_change(symlinked, |dir, text| {
        std::fs::write(dir.join("checkout/provisioning.toml"), text).unwrap();
    })
    .await;
}

/// A release layout: the config read as `current/provisioning.toml`, `current` ->
/// `releases/1`.
fn released(dir: &Path, text: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir.join("releases/1")).unwrap();
    std::fs::write(dir.join("releases/1/provisioning.toml"), text).unwrap();
    std::os::unix::fs::symlink("releases/1", dir.join("current")).unwrap();
    dir.join("current/provisioning.toml")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_release_directory_symlink_swap_reloads_once() {
    one_reload_per_change(released, |dir, text| {
        // A deploy: a new release beside the old one (kept), `current` renamed over.
        std::fs::create_dir_all(dir.join("releases/2")).unwrap();
        std::fs::write(dir.join("releases/2/provisioning.toml"), text).unwrap();
        std::os::unix::fs::symlink("releases/2", dir.join("current.tmp")).unwrap();
        std::fs::rename(dir.join("current.tmp"), dir.join("current")).unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_that_do_not_touch_the_config_do_not_reload() {
    let stamper = stamper().await;
    let text = tagged(&stamper, "one");
    let sidecar = Sidecar::start(&text);
    let dir = sidecar.dir.path();

    // Other files in the directory, a backup beside it, attributes of the file itself.
    std::fs::write(dir.join("notes.txt"), "x").unwrap();
    std::fs::write(dir.join("provisioning.toml.bak"), "not toml [").unwrap();
    write_atomic(&dir.join("other.toml"), "x = 1");
    let _ = std::fs::read_to_string(&sidecar.config_path).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&sidecar.config_path, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A comment added: read, and found unchanged. Its reload comes after any the writes
    // above could have caused; by then the watcher has judged every one of their events.
    let config = last_write(&sidecar, &text).await;
    assert_eq!(generation(&config), 1, "{config:#}");
    assert_eq!(
        reloads(&config, "unchanged"),
        1,
        "only the comment's: {config:#}"
    );
    assert_eq!(reloads(&config, "applied"), 0, "{config:#}");
    assert_eq!(reloads(&config, "rejected"), 0, "{config:#}");
    let file = sidecar.config_path.file_name().unwrap().to_str().unwrap();
    let judged: Vec<Value> = sidecar
        .log_records()
        .into_iter()
        .filter(|r| r["message"] == "config may have changed")
        .collect();
    assert!(
        !judged.is_empty(),
        "the last write was not seen as a change"
    );
    for seen in &judged {
        let paths = seen["paths"].as_str().unwrap_or_default();
        let kind = seen["kind"].as_str().unwrap_or_default();
        assert!(
            paths.contains(file) && !paths.contains("notes.txt") && !paths.contains("other.toml"),
            "an unrelated file counted as a change: {seen}"
        );
        assert!(
            !kind.contains("Metadata") && !kind.contains("Access"),
            "reading or chmod counted as a change: {seen}"
        );
    }

    // The same text written again, in place: read, and found unchanged.
    std::fs::write(&sidecar.config_path, &text).unwrap();
    let config = sidecar
        .wait_for_config(PATIENCE, |c| reloads(c, "unchanged") == 2)
        .await;
    assert_eq!(generation(&config), 1, "{config:#}");
    assert_eq!(reloads(&config, "applied"), 0);
    assert_eq!(served_by(&sidecar).await, ["/one"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_file_keeps_the_old_config_until_it_is_fixed() {
    let stamper = stamper().await;
    let sidecar = Sidecar::start(&tagged(&stamper, "one"));
    let broken = format!(
        "{}timeout = \"soon\"\ncolour = \"red\"\n",
        tagged(&stamper, "two")
    );
    let bad_line = broken.lines().count() - 1;
    write_atomic(&sidecar.config_path, &broken);

    let config = sidecar
        .wait_for_config(PATIENCE, |c| !c["last_error"].is_null())
        .await;
    assert_eq!(generation(&config), 1, "{config:#}");
    assert_eq!(reloads(&config, "rejected"), 1);
    let errors: Vec<&str> = config["last_error"]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    let file = sidecar.config_path.display().to_string();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].starts_with(&format!(
            "{file}:{bad_line}:11: handler[0].timeout: invalid duration"
        )),
        "{errors:?}"
    );
    assert!(
        errors[1].starts_with(&format!(
            "{file}:{}:1: handler[0].colour: unknown key",
            bad_line + 1
        )),
        "{errors:?}"
    );
    assert_eq!(config["last_error"]["trigger"], "watch");
    assert!(
        config["handlers"][0]["target"]
            .as_str()
            .unwrap()
            .ends_with("/one"),
        "/v1/config shows the config still live: {config:#}"
    );
    assert_eq!(
        served_by(&sidecar).await,
        ["/one"],
        "the old config still serves"
    );
    let logged = sidecar
        .wait_for_log(PATIENCE, |r| r["message"] == "config error")
        .unwrap();
    assert_eq!(logged["error"], errors[0], "the log names file:line:col");
    assert!(
        sidecar
            .wait_for_log(PATIENCE, |r| r["message"]
                == "config rejected, keeping the running one"
                && r["errors"] == 2)
            .is_some()
    );

    // A file emptied, as an in-place write does for a moment, is refused too.
    std::fs::write(&sidecar.config_path, "").unwrap();
    let config = sidecar
        .wait_for_config(PATIENCE, |c| reloads(c, "rejected") == 2)
        .await;
    assert!(
        config["last_error"]["errors"][0]
            .as_str()
            .unwrap()
            .contains("the file is empty"),
        "{config:#}"
    );
    assert_eq!(served_by(&sidecar).await, ["/one"]);

    write_atomic(&sidecar.config_path, &tagged(&stamper, "two"));
    let config = sidecar
        .wait_for_config(PATIENCE, |c| generation(c) == 2)
        .await;
    assert!(
        config["last_error"].is_null(),
        "a good file clears the error: {config:#}"
    );
    assert_eq!(reloads(&config, "rejected"), 2);
    assert_eq!(served_by(&sidecar).await, ["/two"]);
}

/// A config whose two before-stage handlers both stamp `generation`; the first answers
/// slowly, so that reloads land while events are between the two.
fn stamped_twice(stamper: &HandlerServer, generation: usize) -> String {
    format!(
        "{SERVER}\n\
         [[handler]]\nname = \"second\"\nevents = [\"*\"]\nstage = \"before\"\npriority = 20\n\
         modifies = true\non_error = \"deny\"\nurl = {}\n\n\
         [[handler]]\nname = \"first\"\nevents = [\"*\"]\nstage = \"before\"\npriority = 10\n\
         modifies = true\non_error = \"deny\"\nurl = {}\n",
        toml_str(stamper.url(&format!("/{generation}/b"))),
        toml_str(stamper.url(&format!("/{generation}/slow"))),
    )
}

/// The generation both stamps of a reply name; panics on a mix.
fn one_generation(body: &Value) -> usize {
    let stamps = stamps(body);
    let numbers: Vec<usize> = stamps
        .iter()
        .map(|s| s.split('/').nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(stamps.len(), 2, "both handlers ran: {body}");
    assert!(
        stamps[0].ends_with("/slow") && stamps[1].ends_with("/b"),
        "{body}"
    );
    assert_eq!(numbers[0], numbers[1], "one event saw two configs: {body}");
    numbers[0]
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_rewrites_under_load_never_mix_configs_or_fail_a_request() {
    const WRITES: usize = 50;
    const SENDERS: usize = 4;
    const MAX_EVENTS: usize = 4000;
    let stamper = stamper().await;
    let sidecar = Arc::new(Sidecar::start(&stamped_twice(&stamper, 1)));
    let done = Arc::new(AtomicBool::new(false));

    let mut senders = Vec::new();
    for sender in 0..SENDERS {
        let sidecar = sidecar.clone();
        let done = done.clone();
        senders.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for i in 0..MAX_EVENTS {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                let (status, body) = sidecar
                    .send(
                        "clients.update",
                        i64::try_from(sender * MAX_EVENTS + i).unwrap(),
                        json!({}),
                    )
                    .await;
                assert_eq!(status, 200, "no request fails: {body}");
                seen.push(one_generation(&body));
            }
            seen
        }));
    }

    // Valid configs 2, 3, ... alternate with broken ones.
    let mut last_valid = 1;
    for write in 0..WRITES {
        if write % 2 == 0 {
            last_valid += 1;
            write_atomic(&sidecar.config_path, &stamped_twice(&stamper, last_valid));
        } else {
            let broken = stamped_twice(&stamper, 999).replace("priority = 10", "priority = \"x\"");
            write_atomic(&sidecar.config_path, &broken);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The last write is a broken one: the last valid config is what serves.
    let config = sidecar
        .wait_for_config(PATIENCE, |c| {
            !c["last_error"].is_null()
                && c["handlers"][1]["target"]
                    .as_str()
                    .unwrap()
                    .ends_with(&format!("/{last_valid}/slow"))
        })
        .await;
    done.store(true, Ordering::Relaxed);

    let mut all = Vec::new();
    for sender in senders {
        let seen = sender.await.unwrap();
        assert!(
            seen.windows(2).all(|w| w[0] <= w[1]),
            "an event never sees an older config than the one before it: {seen:?}"
        );
        all.extend(seen);
    }
    let mut distinct = all.clone();
    distinct.dedup();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(all.len() >= 100, "a steady stream: {} events", all.len());
    assert!(
        distinct.len() >= 5,
        "events were served across many generations: {distinct:?}"
    );
    assert!(distinct.iter().all(|g| *g <= last_valid), "{distinct:?}");
    assert!(reloads(&config, "applied") >= 5, "{config:#}");
    assert!(reloads(&config, "rejected") >= 5, "{config:#}");
    let (status, body) = sidecar.send("clients.create", 1, json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(one_generation(&body), last_valid);
}

#[tokio::test(flavor = "multi_thread")]
async fn removing_an_after_stage_handler_in_the_file_dead_letters_its_queue() {
    let down = refused_url();
    let retry = "retry = { attempts = 1000, backoff = \"50ms\", max_backoff = \"200ms\" }";
    let kept = HandlerServer::fixed(200, "").await;
    let with = format!(
        "{SERVER}{}{}",
        after_handler("crm", &down, retry),
        after_handler("audit", &kept.url("/audit"), "")
    );
    let sidecar = Sidecar::start(&with);
    for id in 1..=3 {
        let (status, body) = sidecar.send("clients.create", id, json!({})).await;
        assert_eq!(status, 200, "{body}");
    }
    let without = format!(
        "{SERVER}{}",
        after_handler("audit", &kept.url("/audit"), "")
    );
    write_atomic(&sidecar.config_path, &without);
    let config = sidecar
        .wait_for_config(PATIENCE, |c| generation(c) == 2)
        .await;
    assert_eq!(config["handlers"].as_array().unwrap().len(), 1);

    let mut letters = Vec::new();
    for _ in 0..1500 {
        let (status, body) = sidecar.get("/v1/deadletters").await;
        assert_eq!(status, 200, "{body}");
        letters = body["deadletters"].as_array().unwrap().clone();
        if letters.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(letters.len(), 3, "{letters:?}");
    for letter in &letters {
        assert_eq!(letter["handler"], "crm", "{letter}");
        assert_eq!(
            letter["reason"], "handler removed by a config reload",
            "{letter}"
        );
    }
    assert!(
        eventually(PATIENCE, || kept.calls().len() == 3).await,
        "the handler kept still gets its deliveries"
    );
}

/// An after-stage handler with one slot, whose calls take `hold`: a second delivery
/// waits for the slot while the first is in it.
async fn one_slow_slot(hold: Duration) -> (HandlerServer, impl Fn(&str) -> String) {
    let slow = HandlerServer::start(move |_| async move {
        tokio::time::sleep(hold).await;
        reply(200, "")
    })
    .await;
    let url = slow.url("/slow");
    let config = move |extra: &str| {
        format!(
            "{SERVER}{}",
            after_handler("slow", &url, &format!("max_concurrency = 1\n{extra}"))
        )
    };
    (slow, config)
}

/// A sidecar on [`one_slow_slot`] (calls of 1.5 s) that got objects 1 and 2: 1's call
/// holds the slot, 2 waits for it.
async fn the_second_waiting_for_the_slot() -> (HandlerServer, impl Fn(&str) -> String, Sidecar) {
    let (slow, config) = one_slow_slot(Duration::from_millis(1500)).await;
    let sidecar = Sidecar::start(&config(""));
    for id in [1, 2] {
        let (status, body) = sidecar.send("clients.create", id, json!({})).await;
        assert_eq!(status, 200, "{body}");
    }
    assert!(eventually(PATIENCE, || slow.calls().len() == 1).await);
    (slow, config, sidecar)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delivery_waiting_for_a_slot_sees_a_reload_that_removes_its_handler() {
    let (slow, _, sidecar) = the_second_waiting_for_the_slot().await;
    // Object 2 waits for the slot that object 1's call holds; the handler goes.
    write_atomic(&sidecar.config_path, &format!("{SERVER}\n"));
    sidecar
        .wait_for_config(PATIENCE, |c| generation(c) == 2)
        .await;
    let mut letters = Vec::new();
    for _ in 0..500 {
        let (_, body) = sidecar.get("/v1/deadletters").await;
        letters = body["deadletters"].as_array().unwrap().clone();
        if !letters.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["object_id"], "2", "{letters:?}");
    assert_eq!(letters[0]["reason"], "handler removed by a config reload");
    // The call in the slot ends as it would have; nothing more reaches the handler.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(slow.calls().len(), 1, "a removed handler was called");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delivery_waiting_for_a_slot_waits_while_its_handler_is_disabled() {
    let (slow, config, sidecar) = the_second_waiting_for_the_slot().await;
    write_atomic(&sidecar.config_path, &config("enabled = false"));
    sidecar
        .wait_for_config(PATIENCE, |c| generation(c) == 2)
        .await;
    // Past the end of object 1's call: object 2 is not sent while the handler is off.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(slow.calls().len(), 1, "a disabled handler was called");
    write_atomic(&sidecar.config_path, &config(""));
    sidecar
        .wait_for_config(PATIENCE, |c| generation(c) == 3)
        .await;
    assert!(
        eventually(PATIENCE, || slow.calls().len() == 2).await,
        "delivered once the handler is enabled again"
    );
    let objects: Vec<i64> = slow
        .calls()
        .iter()
        .map(|c| c.json()["event"]["object_id"].as_i64().unwrap())
        .collect();
    assert_eq!(objects, [1, 2]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_listen_change_is_reported_and_not_applied() {
    let stamper = stamper().await;
    let sidecar = Sidecar::start(&tagged(&stamper, "one"));
    let moved =
        |tag| tagged(&stamper, tag).replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"");

    // Only the listener differs: nothing to swap, a restart to ask for.
    write_atomic(&sidecar.config_path, &moved("one"));
    let config = sidecar
        .wait_for_config(PATIENCE, |c| reloads(c, "unchanged") == 1)
        .await;
    assert_eq!(generation(&config), 1);
    assert_eq!(
        config["restart_needed"],
        json!([{"setting": "server.listen", "file": "127.0.0.1:1", "running": "127.0.0.1:0"}])
    );
    let warned = sidecar
        .wait_for_log(PATIENCE, |r| {
            r["message"] == "setting needs a restart, keeping the running value"
        })
        .unwrap();
    assert_eq!(warned["setting"], "server.listen");

    // With a handler change too: the handler applies, the listener stays.
    write_atomic(&sidecar.config_path, &moved("two"));
    let config = sidecar
        .wait_for_config(PATIENCE, |c| generation(c) == 2)
        .await;
    assert_eq!(config["restart_needed"][0]["setting"], "server.listen");
    assert_eq!(
        served_by(&sidecar).await,
        ["/two"],
        "still served on the old address"
    );

    // Back to the running value: nothing pending any more.
    write_atomic(&sidecar.config_path, &tagged(&stamper, "two"));
    sidecar
        .wait_for_config(PATIENCE, |c| {
            reloads(c, "unchanged") == 2 && c["restart_needed"] == json!([])
        })
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads() {
    let stamper = stamper().await;
    let dir = tempfile::TempDir::new().unwrap();
    let path = plain(dir.path(), &tagged(&stamper, "one"));
    let sidecar = Sidecar::spawn_with(dir, path, &[], &["--no-watch"]);

    let listening = sidecar
        .wait_for_log(PATIENCE, |r| r["message"] == "listening")
        .unwrap();
    assert_eq!(listening["watching"], false, "--no-watch does not watch");
    write_atomic(&sidecar.config_path, &tagged(&stamper, "two"));
    assert_eq!(generation(&sidecar.live_config().await), 1);
    assert_eq!(served_by(&sidecar).await, ["/one"]);

    sidecar.signal(nix::sys::signal::Signal::SIGHUP);
    sidecar
        .wait_for_config(PATIENCE, |c| generation(c) == 2)
        .await;
    assert_eq!(served_by(&sidecar).await, ["/two"]);
    let logged = sidecar
        .wait_for_log(PATIENCE, |r| r["message"] == "config reloaded")
        .unwrap();
    assert_eq!(logged["trigger"], "signal");

    sidecar.signal(nix::sys::signal::Signal::SIGHUP);
    let config = sidecar
        .wait_for_config(PATIENCE, |c| reloads(c, "unchanged") == 1)
        .await;
    assert_eq!(generation(&config), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn post_reload_answers_applied_unchanged_or_rejected() {
    let stamper = stamper().await;
    let dir = tempfile::TempDir::new().unwrap();
    let path = plain(dir.path(), &tagged(&stamper, "one"));
    let sidecar = Sidecar::spawn_with(dir, path, &[], &["--no-watch"]);

    let (status, body) = sidecar.post_to("/v1/reload", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"result": "unchanged", "generation": 1, "restart_needed": []})
    );

    let added = format!(
        "{}\n[[handler]]\nname = \"audit\"\nevents = [\"clients.delete\"]\nstage = \"before\"\n\
         url = {}\n",
        tagged(&stamper, "two"),
        toml_str(stamper.url("/audit"))
    );
    write_atomic(&sidecar.config_path, &added);
    let (status, body) = sidecar.post_to("/v1/reload", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"result": "applied", "generation": 2, "added": ["audit"], "removed": [],
               "changed": ["stamp"], "settings": [], "restart_needed": []})
    );
    assert_eq!(served_by(&sidecar).await, ["/two"]);

    let no_stage = added.replace("stage = \"before\"\nurl", "url");
    // The `[[handler]]` line above `name = "audit"`, 1-based.
    let line = no_stage
        .lines()
        .position(|l| l.contains("\"audit\""))
        .unwrap();
    write_atomic(&sidecar.config_path, &no_stage);
    let (status, body) = sidecar.post_to("/v1/reload", "").await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["result"], "rejected");
    assert_eq!(body["generation"], 2);
    let file = sidecar.config_path.display().to_string();
    let errors = body["error"]["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{body}");
    assert!(
        errors[0]
            .as_str()
            .unwrap()
            .starts_with(&format!("{file}:{line}:1: handler[1]: missing `stage`")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("running config stays")
    );
    let config = sidecar.live_config().await;
    assert_eq!(config["last_error"]["trigger"], "api");
    assert_eq!(config["last_error"]["errors"], json!(errors));
    assert_eq!(
        config["reloads"],
        json!({"applied": 1, "unchanged": 1, "rejected": 1})
    );

    let (status, metrics) = sidecar.get("/metrics").await;
    assert_eq!(status, 200);
    let metrics = metrics.as_str().unwrap();
    for result in ["applied", "unchanged", "rejected"] {
        let line = format!("provisiond_reloads_total{{result=\"{result}\"}} 1");
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in:\n{metrics}"
        );
    }
    assert!(
        metrics
            .lines()
            .any(|l| l == "provisiond_config_generation 2"),
        "{metrics}"
    );

    let (status, _) = sidecar.get("/v1/reload").await;
    assert_eq!(status, 405);
}

/// `sha256sum FILE`, as an operator would compare it.
fn sha256sum(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn v1_config_hash_is_the_file_on_disk_after_an_unchanged_reload() {
    let stamper = stamper().await;
    let dir = tempfile::TempDir::new().unwrap();
    let path = plain(dir.path(), &tagged(&stamper, "one"));
    let sidecar = Sidecar::spawn_with(dir, path, &[], &["--no-watch"]);
    let config = sidecar.live_config().await;
    assert_eq!(config["hash"], sha256sum(&sidecar.config_path));

    // Only a comment differs: unchanged, same generation, the new file's hash.
    write_atomic(
        &sidecar.config_path,
        &format!("# reviewed in #42\n{}", tagged(&stamper, "one")),
    );
    let (status, body) = sidecar.post_to("/v1/reload", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"], "unchanged", "{body}");
    let config = sidecar.live_config().await;
    assert_eq!(generation(&config), 1, "{config:#}");
    assert_eq!(
        config["hash"],
        sha256sum(&sidecar.config_path),
        "{config:#}"
    );

    // A rejected file leaves the hash of the file the live config came from.
    let live = config["hash"].clone();
    write_atomic(&sidecar.config_path, "[server\n");
    let (status, _) = sidecar.post_to("/v1/reload", "").await;
    assert_eq!(status, 422);
    assert_eq!(sidecar.live_config().await["hash"], live);

    // Applied: the new file's hash, a new generation.
    write_atomic(&sidecar.config_path, &tagged(&stamper, "two"));
    let (status, _) = sidecar.post_to("/v1/reload", "").await;
    assert_eq!(status, 200);
    let config = sidecar.live_config().await;
    assert_eq!(generation(&config), 2);
    assert_eq!(config["hash"], sha256sum(&sidecar.config_path));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_that_changes_only_restart_settings_says_so() {
    let stamper = stamper().await;
    let dir = tempfile::TempDir::new().unwrap();
    let path = plain(dir.path(), &tagged(&stamper, "one"));
    let sidecar = Sidecar::spawn_with(dir, path, &[], &["--no-watch"]);
    write_atomic(
        &sidecar.config_path,
        &tagged(&stamper, "one").replace(
            "listen = \"127.0.0.1:0\"",
            "listen = \"127.0.0.1:1\"\nmax_in_flight = 7",
        ),
    );
    let (status, body) = sidecar.post_to("/v1/reload", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"], "unchanged", "{body}");
    let logged = sidecar
        .wait_for_log(PATIENCE, |r| {
            r["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("config unchanged"))
        })
        .unwrap();
    assert_eq!(
        logged["message"], "config unchanged but for settings that need a restart",
        "{logged}"
    );
    assert_eq!(
        logged["restart_needed"], "server.listen, server.max_in_flight",
        "{logged}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_duration_past_the_bound_is_a_rejected_reload_and_events_go_on() {
    let stamper = stamper().await;
    let dir = tempfile::TempDir::new().unwrap();
    let path = plain(dir.path(), &tagged(&stamper, "one"));
    let sidecar = Sidecar::spawn_with(dir, path, &[], &["--no-watch"]);
    let text = tagged(&stamper, "two").replace(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:0\"\ndeadline = \"500000000000y\"",
    );
    let line = text
        .lines()
        .position(|l| l.starts_with("deadline"))
        .unwrap()
        + 1;
    write_atomic(&sidecar.config_path, &text);
    let (status, body) = sidecar.post_to("/v1/reload", "").await;
    assert_eq!(status, 422, "{body}");
    let file = sidecar.config_path.display().to_string();
    let error = body["error"]["errors"][0].as_str().unwrap();
    assert!(
        error.starts_with(&format!("{file}:{line}:12: server.deadline: ")),
        "{error}"
    );
    assert!(error.contains("at most 1 year"), "{error}");
    assert_eq!(
        served_by(&sidecar).await,
        ["/one"],
        "the running config serves"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn v1_config_shows_dispatch_order_and_no_secret() {
    let dir = tempfile::TempDir::new().unwrap();
    let text = format!(
        r#"{SERVER}
[[handler]]
name = "late"
events = ["clients.*"]
stage = "before"
priority = 50
url = "http://crm.example/hook?key=${{CRM_KEY}}"
headers = {{ Authorization = "Bearer ${{CRM_KEY}}" }}
secret = "whsec_c2VjcmV0LXNpZ25pbmcta2V5"

[[handler]]
name = "early"
events = ["clients.create"]
stage = "before"
priority = 5
command = ["/bin/true", "${{CRM_KEY}}"]
env = {{ API_KEY = "${{CRM_KEY}}" }}

[[handler]]
name = "off"
events = ["*"]
stage = "before"
enabled = false
url = "http://127.0.0.1:1/off"
"#
    );
    let path = plain(dir.path(), &text);
    let sidecar = Sidecar::spawn(dir, path, &[("CRM_KEY", "key-SECRET-2")]);
    let (status, raw) = sidecar.get("/v1/config").await;
    assert_eq!(status, 200);
    let shown = raw.to_string();
    for secret in ["SECRET", "c2VjcmV0", "whsec_", "Bearer"] {
        assert!(!shown.contains(secret), "{secret} in {raw:#}");
    }
    assert_eq!(raw["generation"], 1);
    assert_eq!(raw["hash"].as_str().unwrap().len(), 64);
    assert!(raw["loaded_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        raw["events"]["clients.create"],
        json!({"before": ["early", "late"], "after": []})
    );
    assert_eq!(
        raw["events"]["clients.update"],
        json!({"before": ["late"], "after": []})
    );
    assert_eq!(
        raw["events"]["importd.process_failed"],
        json!({"before": [], "after": []})
    );
    assert_eq!(
        raw["handlers"][0]["target"],
        "POST http://crm.example/hook?key=${CRM_KEY}"
    );
    assert_eq!(raw["handlers"][1]["target"], "/bin/true ${CRM_KEY}");
    assert_eq!(raw["handlers"][2]["enabled"], false);
    assert_eq!(raw["handlers"][2]["name"], "off");
    assert!(raw["last_error"].is_null());
    let logs = sidecar.logs().join("\n");
    assert!(!logs.contains("SECRET"), "{logs}");
}

/// The README's `GET /v1/config` sample is what a sidecar shows for the three handlers
/// in it: the same handlers with the same settings, the same dispatch of the two events
/// it shows, and the same keys.
#[tokio::test(flavor = "multi_thread")]
async fn the_readmes_config_sample_is_what_the_sidecar_shows() {
    let readme = readme();
    let section = readme.split("\n### `GET /v1/config`\n").nth(1).unwrap();
    let block = code_blocks(section, "json").next().unwrap();
    let sample: Value = serde_json::from_str(block).expect("the sample is JSON");
    let sidecar = Sidecar::start(
        r#"[server]
listen = "127.0.0.1:0"

[[handler]]
name = "crm-validate"
events = ["clients.create", "clients.update"]
stage = "before"
priority = 10
url = "http://crm.crm.svc.cluster.local:8080/provisioning/validate"
timeout = "3s"
on_error = "deny"

[[handler]]
name = "reseller-defaults"
events = ["clients.create"]
stage = "before"
priority = 20
url = "http://reseller-hooks.billing.svc.cluster.local:8080/defaults"
modifies = true

[[handler]]
name = "crm-sync"
events = ["clients.*"]
stage = "after"
url = "http://crm.example/sync"
"#,
    );
    let (status, live) = sidecar.get("/v1/config").await;
    assert_eq!(status, 200);
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&sample), keys(&live));
    assert_eq!(sample["handlers"], live["handlers"]);
    assert_eq!(sample["store"], live["store"]);
    let shown = sample["events"].as_object().unwrap();
    assert_eq!(shown.len(), 2);
    for (event, handlers) in shown {
        assert_eq!(handlers, &live["events"][event], "{event}");
    }
    assert_eq!(keys(&sample["reloads"]), keys(&live["reloads"]));
}

/// The pid of the process whose command line holds `needle`.
fn pid_with_argument(needle: &str) -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|line| String::from_utf8_lossy(&line).contains(needle))
        })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sighup_during_the_start_reloads_once_started_instead_of_killing_it() {
    let stamper = stamper().await;
    let dir = tempfile::TempDir::new().unwrap();
    // A start held in the middle: the config is a FIFO, which the sidecar reads only
    // once something writes it (as a slow start would hold it in the store's check).
    let path = dir.path().join("provisioning.toml");
    let made = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .unwrap();
    assert!(made.success());
    let text = tagged(&stamper, "one");
    let real = dir.path().join("real.toml");
    std::fs::write(&real, &text).unwrap();
    let starting = {
        let path = path.clone();
        std::thread::spawn(move || {
            // Opens once the sidecar opened it to read: it is starting.
            let mut fifo = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            let pid = pid_with_argument(path.to_str().unwrap()).expect("the sidecar's pid");
            // The file a reload reads, from now on.
            std::fs::rename(&real, &path).unwrap();
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGHUP,
            )
            .unwrap();
            std::thread::sleep(Duration::from_millis(200));
            use std::io::Write as _;
            let _ = fifo.write_all(text.as_bytes());
        })
    };
    let sidecar = Sidecar::spawn_with(dir, path, &[], &["--no-watch"]);
    starting.join().unwrap();
    let config = sidecar
        .wait_for_config(PATIENCE, |c| reloads(c, "unchanged") == 1)
        .await;
    assert_eq!(generation(&config), 1);
    let logged = sidecar
        .wait_for_log(PATIENCE, |r| r["message"] == "config unchanged")
        .unwrap();
    assert_eq!(logged["trigger"], "signal");
    assert_eq!(served_by(&sidecar).await, ["/one"]);
}
