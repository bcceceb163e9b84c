//! Script handlers: provisiond running a script per event against adnanh/webhook
//! (Debian package `webhook`) running the same script on the same events.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::{Row, Sidecar, Summary, closed_loop};

const SCRIPT: &str =
    "#!/bin/sh\n# Reads whatever it is given and answers.\ncat >/dev/null\necho ok\n";

pub(crate) async fn run(scale: f64, summary: &mut Vec<Summary>) -> Vec<Row> {
    let dir = tempfile::TempDir::new().unwrap();
    let script = dir.path().join("hook.sh");
    std::fs::write(&script, SCRIPT).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();

    let n = crate::common::scaled(3000, scale, 100);
    let concurrency = 8;
    let mut rows = Vec::new();

    let Some(webhook) = Webhook::start(&script, dir.path()) else {
        eprintln!("webhook did not start (apt-get install webhook); skipping this scenario");
        return rows;
    };
    let baseline = closed_loop(&webhook.url, concurrency, n).await;
    drop(webhook);

    let sidecar = Sidecar::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[[handler]]\nname = \"hook\"\nevents = [\"*\"]\n\
         stage = \"before\"\ncommand = [\"{}\"]\nmax_concurrency = {concurrency}\n",
        script.display()
    ));
    let through = closed_loop(&sidecar.url("/events"), concurrency, n).await;
    let ratio = through.rps() / baseline.rps();
    rows.push(baseline.row("5. script handler, 8 at once", "webhook 2.8", ""));
    rows.push(through.row(
        "5. script handler, 8 at once",
        "provisiond",
        format!("{ratio:.2} x webhook"),
    ));
    summary.push(Summary::new(
        7,
        "script handlers, provisiond / adnanh/webhook on the same script",
        "events/s",
        through.rps(),
        "webhook 2.8",
        baseline.rps(),
        ">= 1.5 x",
    ));
    rows
}

/// adnanh/webhook serving one hook that runs the script and answers with its output
/// (so that, like provisiond's before stage, it answers after the script exits).
struct Webhook {
    child: Child,
    url: String,
}

impl Webhook {
    fn start(script: &std::path::Path, dir: &std::path::Path) -> Option<Self> {
        let hooks = dir.join("hooks.json");
        std::fs::write(
            &hooks,
            serde_json::json!([{
                "id": "hook",
                "execute-command": script,
                "command-working-directory": dir,
                "include-command-output-in-response": true,
                "pass-arguments-to-command": [{"source": "entire-payload"}],
            }])
            .to_string(),
        )
        .unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let child = Command::new("webhook")
            .args(["-hooks"])
            .arg(&hooks)
            .args(["-ip", "127.0.0.1", "-port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        // It says nothing when it listens unless -verbose (which logs every request):
        // wait for the port instead.
        let listening = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        if !listening {
            return None;
        }
        Some(Self {
            child,
            url: format!("http://127.0.0.1:{port}/hooks/hook"),
        })
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
