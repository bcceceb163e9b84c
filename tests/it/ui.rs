//! The web console (`GET /ui`) in a real browser: Debian's chromium, driven through
//! chromedriver (WebDriver) with fantoccini, against the real provisiond binary and real
//! handler servers. Each test writes screenshots of the pages it saw to
//! `target/ui-screenshots/` and checks that they are not blank.
//!
//! Without chromium and chromedriver installed the tests say so and pass, except under
//! CI (`CI` set), where they fail: `.ci/run` installs both.

use std::future::Future;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Long enough for a live refresh (3 s) and the execution log's lag (1 s) on a busy
/// machine.
const WAIT: Duration = Duration::from_secs(30);

/// One browser at a time: the machine has two cores, and four chromium processes at
/// once would only make every test slower.
/// The browser's time zone (`TZ`): not UTC, so that local times are local.
const BROWSER_ZONE: &str = "Europe/Berlin";
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Where the screenshots go.
fn screenshot_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target tmp dir is inside the target dir")
        .join("ui-screenshots")
}

/// A chromedriver on a loopback port, with a headless chromium session of its own.
struct Browser {
    client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// `None` (after a note) when chromium or chromedriver is not installed, outside CI.
    async fn start() -> Option<Self> {
        let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
            .into_iter()
            .filter(|p| !Path::new(p).exists())
            .collect();
        if !missing.is_empty() {
            let message = format!(
                "the web console's browser tests need {} (apt-get install chromium \
                 chromium-driver)",
                missing.join(" and ")
            );
            if std::env::var_os("CI").is_some() {
                panic!("{message}; .ci/run installs them");
            }
            // Past the test harness's capture, so that the note shows in `cargo test`.
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "note: {message}; skipping this test");
            return None;
        }
        let port = free_addr().port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            // A zone that is not UTC, so that the page's local times are tested as such.
            .env("TZ", BROWSER_ZONE)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // A group of its own, so that dropping the browser also ends the chromium
            // processes chromedriver started, even when a test fails midway.
            .process_group(0)
            .spawn()
            .expect("chromedriver starts");
        let mut browser_driver = DriverGuard(Some(driver));
        let up = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < up,
                "chromedriver did not listen on port {port}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile = tempfile::TempDir::new().unwrap();
        let args = [
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--no-default-browser-check".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-extensions".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--window-size=1280,900".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("chromedriver starts a chromium session");
        client.set_window_size(1280, 900).await.unwrap();
        Some(Self {
            client,
            driver: browser_driver.0.take().unwrap(),
            _profile: profile,
        })
    }

    async fn open(&self, sidecar: &Sidecar, page: &str) {
        self.client
            .goto(&sidecar.url(&format!("/ui#/{page}")))
            .await
            .unwrap();
    }

    /// The text of the first element matching `css`, if there is one.
    async fn text(&self, css: &str) -> Option<String> {
        let element = self.client.find(Locator::Css(css)).await.ok()?;
        element.text().await.ok()
    }

    /// Waits until the element matching `css` shows `needle`; its text.
    async fn wait_text(&self, css: &str, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = self.text(css).await;
            if let Some(text) = text.as_ref().filter(|t| t.contains(needle)) {
                return text.clone();
            }
            assert!(
                Instant::now() < deadline,
                "waited {WAIT:?} for {css} to show {needle:?}; it shows {text:?}; the page:\n{}",
                self.text("body").await.unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until an element matching `css` is displayed.
    async fn wait_shown(&self, css: &str) -> fantoccini::elements::Element {
        until(&format!("{css} to be displayed"), || async {
            let element = self.client.find(Locator::Css(css)).await.ok()?;
            element
                .is_displayed()
                .await
                .ok()
                .filter(|shown| *shown)
                .map(|_| element)
        })
        .await
    }

    /// Whether an element matching `css` is displayed now.
    async fn shown(&self, css: &str) -> bool {
        match self.client.find(Locator::Css(css)).await {
            Ok(element) => element.is_displayed().await.unwrap_or(false),
            Err(_) => false,
        }
    }

    async fn click(&self, css: &str) {
        self.wait_shown(css).await.click().await.unwrap();
    }

    async fn type_into(&self, css: &str, text: &str) {
        let input = self.wait_shown(css).await;
        input.clear().await.unwrap();
        input.send_keys(text).await.unwrap();
    }

    /// Texts of every element matching `css`.
    async fn texts(&self, css: &str) -> Vec<String> {
        let mut out = Vec::new();
        for element in self
            .client
            .find_all(Locator::Css(css))
            .await
            .unwrap_or_default()
        {
            out.push(element.text().await.unwrap_or_default());
        }
        out
    }

    /// Writes a screenshot of the window to `target/ui-screenshots/NAME.png` and checks
    /// that it shows something: a 1280 px wide picture with more than a few colours.
    async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self.client.screenshot().await.unwrap();
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, &png).unwrap();
        let (width, colours) = picture(&png);
        assert_eq!(width, 1280, "{}: not the window's width", path.display());
        assert!(
            colours > 8,
            "{} looks blank: {colours} distinct colours",
            path.display()
        );
        eprintln!("screenshot: {}", path.display());
        path
    }

    async fn close(mut self) {
        let client = self.client.clone();
        let _ = client.close().await;
        stop(&mut self.driver);
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        stop(&mut self.driver);
    }
}

/// Holds chromedriver until the session is up, so that a failed start does not leave
/// it running.
struct DriverGuard(Option<Child>);

impl Drop for DriverGuard {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            stop(child);
        }
    }
}

/// Ends chromedriver's process group (it, and the chromium it started).
fn stop(child: &mut Child) {
    let group = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("a pid fits i32"));
    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
}

/// A PNG's width and how many distinct colours it has.
fn picture(png: &[u8]) -> (u32, usize) {
    let decoder = png::Decoder::new(std::io::Cursor::new(png));
    let mut reader = decoder.read_info().expect("the screenshot is a PNG");
    let mut pixels = vec![0; reader.output_buffer_size().expect("a sane size")];
    let info = reader.next_frame(&mut pixels).expect("the PNG decodes");
    let channels = info.color_type.samples();
    let colours: std::collections::HashSet<&[u8]> = pixels[..info.buffer_size()]
        .chunks_exact(channels)
        .collect();
    (info.width, colours.len())
}

/// Polls `check` until it gives a value; panics naming `what` after [`WAIT`].
async fn until<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "waited {WAIT:?} for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `[server]` section on a port of its own, that a sidecar stopped there can start on
/// again (see [`restart`]).
fn server_on_its_own_port() -> String {
    format!("[server]\nlisten = \"{}\"\n", free_addr())
}

/// Starts provisiond again, on the directory and config a stopped one handed back and on
/// its address `addr` (the config's `listen`), once the port can be bound again: as
/// provisiond binds it (tokio sets `SO_REUSEADDR`), which a socket still listening there
/// refuses and the port's reservation or a connection in `TIME_WAIT` does not.
async fn restart(addr: &str, dir: tempfile::TempDir, config_path: PathBuf) -> Sidecar {
    let at: std::net::SocketAddr = addr.parse().unwrap();
    until(&format!("{addr} to be free to listen on again"), || async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(at).ok()
    })
    .await;
    let sidecar = Sidecar::spawn(dir, config_path, &[]);
    assert_eq!(sidecar.addr, addr, "provisiond started on another address");
    sidecar
}

fn handler(name: &str, events: &str, stage: &str, url: &str, extra: &str) -> String {
    format!(
        "[[handler]]\nname = \"{name}\"\nevents = [{events}]\nstage = \"{stage}\"\nurl = {}\n{extra}\n",
        toml_str(url)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_overview_shows_the_handlers_a_rejected_reload_and_settings_waiting_for_a_restart() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(browser) = Browser::start().await else {
        return;
    };
    let echo = HandlerServer::echo().await;
    let config = format!(
        "{SERVER}\n{}{}{}",
        handler(
            "check-name",
            "\"clients.create\"",
            "before",
            &echo.url("/check"),
            "priority = 10\non_error = \"deny\""
        ),
        handler(
            "vip-tagger",
            "\"clients.create\", \"clients.update\"",
            "before",
            &echo.url("/vip"),
            "priority = 20\nmodifies = true\nmatch = { \"data.vip\" = true }"
        ),
        handler("crm-sync", "\"clients.*\"", "after", &echo.url("/crm"), ""),
    );
    let sidecar = Sidecar::start(&config);
    browser.open(&sidecar, "overview").await;

    let handlers = browser.wait_text("#handlers-table", "check-name").await;
    for name in ["vip-tagger", "crm-sync", "before", "after", "on_error deny"] {
        assert!(handlers.contains(name), "{name} missing from:\n{handlers}");
    }
    let dispatch = browser.wait_text("#dispatch-table", "clients.create").await;
    assert!(
        dispatch.contains("check-name → vip-tagger"),
        "dispatch order:\n{dispatch}"
    );
    let generation = sidecar.live_config().await["generation"].to_string();
    let cards = browser.text(".cards").await.unwrap();
    assert!(
        cards.contains(&format!("GENERATION\n{generation}")),
        "{cards}"
    );
    browser.screenshot("overview").await;

    // A rejected reload is shown first, with the file's errors; the handlers stay.
    std::fs::write(
        &sidecar.config_path,
        format!("{config}\n[[handler]]\nname = \"oops\"\n"),
    )
    .unwrap();
    let (status, _) = sidecar.post_to("/v1/reload", "").await;
    assert_eq!(status, 422);
    let alert = browser
        .wait_text("#reload-error", "The last reload was rejected")
        .await;
    assert!(alert.contains("provisioning.toml"), "{alert}");
    assert!(
        browser
            .text("#handlers-table")
            .await
            .unwrap()
            .contains("check-name")
    );
    browser.screenshot("overview-reload-rejected").await;

    // A good file clears the error; a setting read only at start waits for a restart.
    let fixed = config.replacen(SERVER, &format!("{SERVER}max_in_flight = 7\n"), 1);
    std::fs::write(&sidecar.config_path, fixed).unwrap();
    let (status, body) = sidecar.post_to("/v1/reload", "").await;
    assert_eq!(status, 200, "{body}");
    browser.wait_text("#restart-needed", "max_in_flight").await;
    assert!(
        browser.text("#reload-error").await.is_none(),
        "the error is still shown"
    );
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_sent_with_send_shows_in_executions_and_its_filter_finds_it() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(browser) = Browser::start().await else {
        return;
    };
    let echo = HandlerServer::echo().await;
    let config = format!(
        "{SERVER}\n{}{}{}",
        handler(
            "check-name",
            "\"clients.create\"",
            "before",
            &echo.url("/check"),
            ""
        ),
        // Down: its calls are errors, skipped (on_error = "allow").
        handler(
            "fraud-check",
            "\"clients.*\"",
            "before",
            &refused_url(),
            "priority = 200"
        ),
        handler("crm-sync", "\"clients.*\"", "after", &echo.url("/crm"), ""),
    );
    let sidecar = Sidecar::start(&config);
    let url = format!("http://{}", sidecar.addr);
    let mut event_ids = Vec::new();
    for id in ["4242", "77"] {
        let (code, _, err) = cli(
            &[
                "send",
                "clients.create",
                "--object-id",
                id,
                "--data",
                "-",
                "--url",
                &url,
            ],
            &[],
            r#"{"name": "ACME ltd"}"#,
        );
        assert_eq!(code, 0, "{err}");
        // "HTTP 200, event evt_...": the id to look the event up by.
        event_ids.push(err.trim().rsplit(' ').next().unwrap().to_owned());
    }
    browser.open(&sidecar, "executions").await;
    // Every call of both events: the before stage's two and the after stage's.
    until("six executions on the page", || async {
        let ids = browser.texts("#executions-table a.object-link").await;
        (ids.len() == 6).then_some(())
    })
    .await;
    let table = browser.text("#executions-table").await.unwrap();
    for text in [
        "check-name",
        "crm-sync",
        "✓ allowed",
        "✓ delivered",
        "✕ error",
        "clients.create",
    ] {
        assert!(table.contains(text), "{text} missing from:\n{table}");
    }

    browser.type_into("input[name=object_id]", "4242").await;
    browser.click("#executions-apply").await;
    let ids = until("the filter to leave only object 4242", || async {
        let ids = browser.texts("#executions-table a.object-link").await;
        (!ids.is_empty() && ids.iter().all(|id| id == "4242")).then_some(ids)
    })
    .await;
    assert_eq!(ids.len(), 3, "{ids:?}");
    let address = browser.client.current_url().await.unwrap();
    assert_eq!(address.fragment(), Some("/executions?object_id=4242"));

    // A row opens to its reply excerpt (the echo handler's answer) and error.
    browser.click("#executions-table tr.row").await;
    let detail = browser
        .wait_text("#executions-table tr.detail", "Reply excerpt")
        .await;
    assert!(detail.contains("\"object_id\":4242"), "{detail}");
    assert!(detail.contains("Error\nnone"), "{detail}");
    browser.screenshot("executions").await;

    // The handler filter finds the after-stage calls only, of both objects.
    browser.open(&sidecar, "executions?handler=crm-sync").await;
    let rows = until("the handler filter", || async {
        let handlers = browser
            .texts("#executions-table tr.row td:nth-child(4)")
            .await;
        (handlers.len() == 2 && handlers.iter().all(|h| h == "crm-sync")).then_some(handlers)
    })
    .await;
    assert_eq!(rows.len(), 2);

    // The id `send` printed finds that event's three calls, and only those.
    let first = &event_ids[0];
    assert!(first.starts_with("evt_"), "{event_ids:?}");
    browser
        .open(&sidecar, &format!("executions?event_id={first}"))
        .await;
    let objects = until("the event id filter", || async {
        let ids = browser.texts("#executions-table a.object-link").await;
        (ids.len() == 3 && ids.iter().all(|id| id == "4242")).then_some(ids)
    })
    .await;
    assert_eq!(objects.len(), 3);
    let field = browser
        .client
        .find(Locator::Css("input[name=event_id]"))
        .await
        .unwrap();
    assert_eq!(
        field.prop("value").await.unwrap().as_deref(),
        Some(first.as_str())
    );

    // A time typed without a zone is the browser's local time, as the table shows times:
    // 10:00 in Berlin (UTC+1 in December) goes to the API as 09:00 UTC.
    browser.open(&sidecar, "executions").await;
    browser
        .type_into("input[name=since]", "2026-12-07 10:00")
        .await;
    browser.click("#executions-apply").await;
    until("the since filter in the address", || async {
        let address = browser.client.current_url().await.ok()?;
        (address.fragment() == Some("/executions?since=2026-12-07T09%3A00%3A00.000Z")).then_some(())
    })
    .await;
    browser
        .wait_text("#executions-status", "rows, newest first")
        .await;
    // A filter the API refuses says why, under the form.
    browser.open(&sidecar, "executions?since=yesterday").await;
    let refused = browser
        .wait_text("#filter-error", "The filters were refused")
        .await;
    assert!(refused.contains("since must be a time"), "{refused}");
    assert!(browser.text("#executions-filters").await.is_some());
    // A filter no row matches says so, and what to do.
    browser.open(&sidecar, "executions?outcome=dead").await;
    browser
        .wait_text("#executions .empty", "No executions match these filters")
        .await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_is_replayed_from_the_page_and_delivered_and_others_dropped() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(browser) = Browser::start().await else {
        return;
    };
    let healthy = Arc::new(AtomicBool::new(false));
    let delivered = Arc::new(Mutex::new(Vec::<Value>::new()));
    let crm = {
        let (healthy, delivered) = (healthy.clone(), delivered.clone());
        HandlerServer::start(move |call| {
            let (healthy, delivered) = (healthy.clone(), delivered.clone());
            async move {
                if healthy.load(Ordering::SeqCst) {
                    let envelope = call.json();
                    delivered.lock().unwrap().push(json!([
                        envelope["event"]["object_id"],
                        envelope["data"]["seq"]
                    ]));
                    reply(200, "{}")
                } else {
                    // Markup in a reply is shown as text, never run.
                    reply(
                        503,
                        "switch is down for maintenance <img src=x onerror=\"window.pwned=1\">",
                    )
                }
            }
        })
        .await
    };
    let config = format!(
        "{SERVER}\n{}",
        handler(
            "crm-sync",
            "\"clients.*\"",
            "after",
            &crm.url("/sync"),
            "retry = { attempts = 1, backoff = \"10ms\", max_backoff = \"10ms\" }"
        ),
    );
    let sidecar = Sidecar::start(&config);
    // Client 2 has two events, to be replayed in their order.
    let events = [(1, 1), (2, 1), (2, 2), (4, 1), (5, 1)];
    for (id, seq) in events {
        let (status, _) = sidecar
            .send("clients.update", id, json!({"name": "x", "seq": seq}))
            .await;
        assert_eq!(status, 200);
    }
    let letters = until("five dead letters", || async {
        let (_, body) = sidecar.get("/v1/deadletters").await;
        (body["count"] == 5).then_some(body)
    })
    .await;
    let id_of_seq = |object: &str, seq: i64| {
        letters["deadletters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["object_id"] == object && l["envelope"]["data"]["seq"] == seq)
            .unwrap()["id"]
            .clone()
    };
    let id_of = |object: &str| id_of_seq(object, 1);
    let first = id_of("1");

    browser.open(&sidecar, "deadletters").await;
    until("five rows", || async {
        (browser.texts("#deadletters-table tr.row").await.len() == 5).then_some(())
    })
    .await;
    let table = browser.text("#deadletters-table").await.unwrap();
    assert!(
        table.contains("switch is down for maintenance <img src=x onerror=\"window.pwned=1\">"),
        "{table}"
    );
    assert!(table.contains("crm-sync"), "{table}");
    // A row opens to its stored envelope.
    browser
        .click(&format!("tr[data-deadletter=\"{first}\"]"))
        .await;
    let detail = browser
        .wait_text("#deadletters-table tr.detail", "Stored envelope")
        .await;
    assert!(
        detail.contains("\"events_id\": \"clients.update\""),
        "{detail}"
    );
    browser.screenshot("deadletters").await;
    let pwned = browser
        .client
        .execute("return window.pwned === undefined;", vec![])
        .await
        .unwrap();
    assert_eq!(pwned, json!(true), "the reply's markup ran");

    // The handler is back; replay the first from the page, through the confirmation.
    healthy.store(true, Ordering::SeqCst);
    browser
        .click(&format!("button[data-action=replay][data-id=\"{first}\"]"))
        .await;
    let question = browser
        .wait_text("#confirm-dialog", "Replay 1 dead letter?")
        .await;
    assert!(
        question.contains(&format!("#{first} · crm-sync · clients.update · object 1")),
        "{question}"
    );
    browser.screenshot("deadletters-confirm").await;
    assert!(
        delivered.lock().unwrap().is_empty(),
        "nothing is replayed before the confirmation"
    );
    browser.click("#confirm-ok").await;
    until("the replayed delivery to reach the handler", || async {
        (!delivered.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    assert_eq!(*delivered.lock().unwrap(), [json!([1, 1])]);
    browser
        .wait_text("#notice", &format!("Replayed 1: #{first} → delivery"))
        .await;
    until("four rows left", || async {
        (browser.texts("#deadletters-table tr.row").await.len() == 4).then_some(())
    })
    .await;

    // Drop object 4's: select it, confirm.
    let fourth = id_of("4");
    browser
        .click(&format!("tr[data-deadletter=\"{fourth}\"] input.select"))
        .await;
    browser
        .wait_text("#drop-selected", "Drop selected (1)")
        .await;
    browser.click("#drop-selected").await;
    browser
        .wait_text("#confirm-dialog", "Drop 1 dead letter?")
        .await;
    browser.click("#confirm-ok").await;
    until("three rows left", || async {
        (browser.texts("#deadletters-table tr.row").await.len() == 3).then_some(())
    })
    .await;

    // Client 2's two, ticked newest first, are replayed oldest first: in its order.
    let (older, newer) = (id_of_seq("2", 1), id_of_seq("2", 2));
    for id in [&newer, &older] {
        browser
            .click(&format!("tr[data-deadletter=\"{id}\"] input.select"))
            .await;
    }
    browser
        .wait_text("#replay-selected", "Replay selected (2)")
        .await;
    browser.click("#replay-selected").await;
    browser
        .wait_text("#confirm-dialog", "Replay 2 dead letters?")
        .await;
    browser.click("#confirm-ok").await;
    let notice = browser.wait_text("#notice", "Replayed 2: ").await;
    let (at_older, at_newer) = (
        notice.find(&format!("#{older} →")),
        notice.find(&format!("#{newer} →")),
    );
    assert!(
        at_older.is_some() && at_older < at_newer,
        "replayed oldest first: {notice}"
    );
    until("client 2's replays to reach the handler", || async {
        (delivered.lock().unwrap().len() == 3).then_some(())
    })
    .await;
    assert_eq!(
        *delivered.lock().unwrap(),
        [json!([1, 1]), json!([2, 1]), json!([2, 2])]
    );

    // Replay the rest in one call of the bulk API, through the confirmation.
    browser.click("#replay-matching").await;
    browser
        .wait_text("#confirm-dialog", "Replay every dead letter?")
        .await;
    browser.click("#confirm-ok").await;
    browser.wait_text("#notice", "Replayed 1.").await;
    browser
        .wait_text("#deadletters .empty", "No dead letters.")
        .await;
    until("the bulk replay to reach the handler", || async {
        (delivered.lock().unwrap().len() == 4).then_some(())
    })
    .await;
    let (_, body) = sidecar.get("/v1/deadletters").await;
    assert_eq!(body["count"], 0, "{body}");
    assert_eq!(
        delivered.lock().unwrap()[3],
        json!([5, 1]),
        "the dropped dead letter is not delivered"
    );
    browser.screenshot("deadletters-empty").await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn past_a_page_of_dead_letters_the_page_says_more_match_and_a_removed_handler_is_offered() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(browser) = Browser::start().await else {
        return;
    };
    // 410: each delivery goes to the dead letters at once.
    let gone = HandlerServer::fixed(410, "gone").await;
    let echo = HandlerServer::echo().await;
    let config = |with_old: bool| {
        let old = handler("old-crm", "\"clients.*\"", "after", &gone.url("/"), "");
        let erp = handler("erp", "\"clients.create\"", "after", &echo.url("/"), "");
        format!(
            "{SERVER}\n{}{erp}",
            if with_old { old.as_str() } else { "" }
        )
    };
    let sidecar = Sidecar::start(&config(true));
    const LETTERS: i64 = 1_001;
    for id in 1..=LETTERS {
        let (status, _) = sidecar.send("clients.update", id, json!({})).await;
        assert_eq!(status, 200);
    }
    until("1,001 dead letters", || async {
        let text = sidecar.metrics_text().await;
        (metric(&text, "provisiond_dead_letters ") == Some(1_001.0)).then_some(())
    })
    .await;
    // A reload removes the handler; its dead letters stay, to be dropped.
    write_atomic(&sidecar.config_path, &config(false));
    sidecar
        .wait_for_config(Duration::from_secs(30), |c| c["generation"] == 2)
        .await;

    browser.open(&sidecar, "deadletters").await;
    let count = browser
        .wait_text(
            "#deadletters-count",
            "the oldest 1000 dead letters, and more",
        )
        .await;
    assert!(count.contains("--after"), "{count}");
    assert_eq!(browser.texts("#deadletters-table tr.row").await.len(), 1000);
    // The badge keeps the store's count, not the page's.
    assert_eq!(browser.text("#nav-dead").await.as_deref(), Some("1001"));
    // The removed handler is offered, from its letters, and its filter shows them.
    let offered = browser.texts("select[name=handler] option").await;
    assert!(offered.contains(&"old-crm".to_owned()), "{offered:?}");
    browser.open(&sidecar, "deadletters?handler=old-crm").await;
    browser
        .wait_text(
            "#deadletters-count",
            "the oldest 1000 dead letters, and more",
        )
        .await;
    let select = browser
        .client
        .find(Locator::Css("select[name=handler]"))
        .await
        .unwrap();
    assert_eq!(
        select.prop("value").await.unwrap().as_deref(),
        Some("old-crm")
    );
    // Dropping all of it says that more than the page's letters go.
    browser.click("#drop-matching").await;
    let question = browser
        .wait_text("#confirm-dialog", "Drop every dead letter of old-crm?")
        .await;
    assert!(
        question
            .contains("The 1000 listed are the oldest: more match, and all of them are dropped."),
        "{question}"
    );
    browser.click("#confirm-ok").await;
    browser.wait_text("#notice", "Dropped 1001.").await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_explain_page_says_which_handlers_would_run_and_why_not_the_others() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(browser) = Browser::start().await else {
        return;
    };
    let config = format!(
        "{SERVER}\n{}{}{}",
        handler(
            "check-name",
            "\"clients.create\"",
            "before",
            "http://127.0.0.1:1/check",
            "priority = 10"
        ),
        handler(
            "vip-tagger",
            "\"clients.create\"",
            "before",
            "http://127.0.0.1:1/vip",
            "priority = 20\nmatch = { \"data.vip\" = true }"
        ),
        handler(
            "crm-sync",
            "\"clients.*\"",
            "after",
            "http://127.0.0.1:1/crm",
            ""
        ),
    );
    let sidecar = Sidecar::start(&config);
    browser.open(&sidecar, "explain").await;
    browser.type_into("#explain-event", "clients.create").await;
    browser.type_into("#explain-object-id", "12").await;
    browser
        .type_into("#explain-data", r#"{"name": "ACME", "vip": false}"#)
        .await;
    browser.click("#explain-submit").await;
    let before = browser.wait_text("#explain-before", "check-name").await;
    assert!(!before.contains("vip-tagger"), "{before}");
    browser.wait_text("#explain-after", "crm-sync").await;
    let not_run = browser.wait_text("#explain-not-run", "vip-tagger").await;
    assert!(
        not_run.contains("match condition false: data.vip = true"),
        "{not_run}"
    );
    browser.screenshot("explain").await;

    // Data that is not JSON is refused before anything is sent.
    browser.type_into("#explain-data", "{vip: true").await;
    browser.click("#explain-submit").await;
    browser
        .wait_text("#explain-error", "The data is not valid JSON")
        .await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_token_is_refused_with_a_clear_message_and_the_right_one_is_kept_for_the_tab() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(browser) = Browser::start().await else {
        return;
    };
    let config = format!(
        "{SERVER}token = \"right-token\"\n{}",
        handler(
            "crm-sync",
            "\"clients.*\"",
            "after",
            "http://127.0.0.1:1/crm",
            ""
        ),
    );
    let sidecar = Sidecar::start(&config);
    // The page itself needs no token; its data does.
    let page = http_client().get(sidecar.url("/ui")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    browser.open(&sidecar, "overview").await;
    browser.wait_text("#token-dialog", "server.token set").await;

    browser.type_into("#token-input", "wrong-token").await;
    browser.click("#token-submit").await;
    let refused = browser
        .wait_text("#token-message", "The token was not accepted")
        .await;
    assert!(refused.contains("401"), "{refused}");
    browser.screenshot("token-refused").await;

    browser.type_into("#token-input", "right-token").await;
    browser.click("#token-submit").await;
    browser.wait_text("#handlers-table", "crm-sync").await;
    let kept = browser
        .client
        .execute(
            "return [sessionStorage.getItem('provisiond.token'), localStorage.length];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(kept, json!(["right-token", 0]));

    // The token goes to `/v1` only: not to `/metrics`, which the overview also reads.
    browser
        .client
        .execute(
            "window.sent = []; const fetch0 = window.fetch; \
             window.fetch = (path, options) => { \
               window.sent.push([String(path), \
                 Boolean(options && options.headers && options.headers.Authorization)]); \
               return fetch0(path, options); };",
            vec![],
        )
        .await
        .unwrap();
    let sent = until("the overview's next refresh", || async {
        let sent = browser
            .client
            .execute("return window.sent;", vec![])
            .await
            .unwrap();
        let paths: Vec<&str> = sent
            .as_array()?
            .iter()
            .filter_map(|s| s[0].as_str())
            .collect();
        (paths.contains(&"/metrics") && paths.iter().any(|p| p.starts_with("/v1/")))
            .then_some(sent.clone())
    })
    .await;
    for call in sent.as_array().unwrap() {
        let (path, with_token) = (call[0].as_str().unwrap(), call[1] == json!(true));
        assert_eq!(with_token, path.starts_with("/v1/"), "{path}: {sent}");
    }
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_page_opened_while_the_sidecar_is_down_loads_by_itself_once_it_is_back() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(browser) = Browser::start().await else {
        return;
    };
    let config = format!(
        "{}{}",
        server_on_its_own_port(),
        handler(
            "crm-sync",
            "\"clients.*\"",
            "after",
            "http://127.0.0.1:1/crm",
            ""
        ),
    );
    let sidecar = Sidecar::start(&config);
    let addr = sidecar.addr.clone();
    // The console is open on a page that does not refresh itself.
    browser.open(&sidecar, "explain").await;
    browser.wait_shown("#explain-form").await;

    // provisiond is down (killed; it is restarting) when the operator opens the overview.
    let (dir, config_path) = sidecar.kill_9();
    browser.click("#nav a[data-page=overview]").await;
    let error = browser
        .wait_text("#load-error", "Could not load this page")
        .await;
    assert!(error.contains("provisiond did not answer"), "{error}");
    browser.screenshot("overview-sidecar-down").await;

    // Back on the same port: the page loads by itself, without a reload.
    let _sidecar = restart(&addr, dir, config_path).await;
    browser.wait_text("#handlers-table", "crm-sync").await;
    assert!(
        browser.text("#load-error").await.is_none(),
        "the error is still shown"
    );
    assert!(!browser.shown("#notice").await, "a notice is shown");
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_refresh_is_said_until_the_sidecar_answers_again_and_other_notices_stay() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(browser) = Browser::start().await else {
        return;
    };
    // 410 Gone: every delivery is a dead letter at once.
    let crm = HandlerServer::start(|_| async { reply(410, "gone") }).await;
    let config = format!(
        "{}{}",
        server_on_its_own_port(),
        handler("crm-sync", "\"clients.*\"", "after", &crm.url("/sync"), ""),
    );
    let sidecar = Sidecar::start(&config);
    let addr = sidecar.addr.clone();
    let objects_shown = |object: &'static str| {
        let browser = &browser;
        move || async move {
            let objects = browser
                .texts("#deadletters-table tr.row td:nth-child(6)")
                .await;
            objects.iter().any(|o| o == object).then_some(())
        }
    };
    let (status, _) = sidecar
        .send("clients.update", 1, json!({"name": "x"}))
        .await;
    assert_eq!(status, 200);
    browser.open(&sidecar, "deadletters").await;
    until("object 1's dead letter on the page", objects_shown("1")).await;

    // provisiond stops (it is restarting): the page says its refresh failed.
    let (dir, config_path, _) = sidecar.terminate();
    let failed = browser.wait_text("#notice", "Refresh failed: ").await;
    assert!(failed.contains("provisiond did not answer"), "{failed}");
    browser.screenshot("deadletters-refresh-failed").await;

    // Back on the same port, with a new dead letter: the page shows it, without a
    // reload, and the failure is no longer said.
    let sidecar = restart(&addr, dir, config_path).await;
    let (status, _) = sidecar
        .send("clients.update", 2, json!({"name": "x"}))
        .await;
    assert_eq!(status, 200);
    until("object 2's dead letter on the page", objects_shown("2")).await;
    until("the failure notice to go", || async {
        (!browser.shown("#notice").await).then_some(())
    })
    .await;

    // A notice the operator's own action put up stays through the refreshes after it.
    let (_, letters) = sidecar.get("/v1/deadletters").await;
    let first = letters["deadletters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["object_id"] == "1")
        .unwrap()["id"]
        .clone();
    browser
        .click(&format!("button[data-action=drop][data-id=\"{first}\"]"))
        .await;
    browser
        .wait_text("#confirm-dialog", "Drop 1 dead letter?")
        .await;
    browser.click("#confirm-ok").await;
    let dropped = format!("Dropped 1: #{first}.");
    browser.wait_text("#notice", &dropped).await;
    let (status, _) = sidecar
        .send("clients.update", 3, json!({"name": "x"}))
        .await;
    assert_eq!(status, 200);
    until("object 3's dead letter, from a refresh", objects_shown("3")).await;
    assert!(browser.shown("#notice").await, "the operator's notice went");
    let notice = browser.text("#notice").await.unwrap();
    assert!(notice.contains(&dropped), "{notice}");
    browser.close().await;
}
