//! Shared test helpers: a real provisiond process, real handler servers, real scripts.
#![allow(dead_code)]

pub(crate) mod pg;

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tempfile::TempDir;

/// A `[server]` section that listens on a free loopback port.
pub(crate) const SERVER: &str = "[server]\nlisten = \"127.0.0.1:0\"\n";

/// The provisiond binary under test.
pub(crate) fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_provisiond")
}

/// A running provisiond process with its own directory and config file.
pub(crate) struct Sidecar {
    pub child: Child,
    /// `host:port` it listens on.
    pub addr: String,
    pub dir: TempDir,
    pub config_path: PathBuf,
    logs: Arc<Mutex<Vec<String>>>,
    client: reqwest::Client,
}

impl Sidecar {
    /// Writes `config` to a fresh directory and starts provisiond on it.
    pub(crate) fn start(config: &str) -> Self {
        Self::start_in(TempDir::new().unwrap(), config, &[])
    }

    /// Starts provisiond in `dir` (its working directory) with `config` and extra env.
    pub(crate) fn start_in(dir: TempDir, config: &str, env: &[(&str, &str)]) -> Self {
        let config_path = dir.path().join("provisioning.toml");
        std::fs::write(&config_path, config).unwrap();
        Self::spawn(dir, config_path, env)
    }

    /// Starts provisiond on an existing config file.
    pub(crate) fn spawn(dir: TempDir, config_path: PathBuf, env: &[(&str, &str)]) -> Self {
        Self::spawn_with(dir, config_path, env, &[])
    }

    /// Starts provisiond on an existing config file, with more `run` arguments (e.g.
    /// `--no-watch`).
    pub(crate) fn spawn_with(
        dir: TempDir,
        config_path: PathBuf,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Self {
        // Before the process exists: nothing after the spawn may panic and leave it
        // running (a struct that was never built is never dropped).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut command = Command::new(binary());
        command
            .arg("run")
            .args(args)
            .arg("-c")
            .arg(&config_path)
            .args(["--log-format", "json", "--log-level", "debug"])
            .current_dir(dir.path())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("provisiond starts");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(v) = serde_json::from_str::<Value>(&line)
                        && v["message"] == "listening"
                    {
                        let _ = tx.send(v["addr"].as_str().unwrap_or_default().to_owned());
                    }
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "provisiond did not start; its output:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
        };
        let client = match addr.strip_prefix("unix:") {
            Some(path) => {
                let _ = rustls::crypto::ring::default_provider().install_default();
                reqwest::Client::builder()
                    .unix_socket(PathBuf::from(path))
                    .build()
                    .unwrap()
            }
            None => http_client(),
        };
        Self {
            child,
            addr,
            dir,
            config_path,
            logs,
            client,
        }
    }

    /// A URL on the sidecar (over its unix socket when it listens on one).
    pub(crate) fn url(&self, path: &str) -> String {
        if self.addr.starts_with("unix:") {
            format!("http://localhost{path}")
        } else {
            format!("http://{}{path}", self.addr)
        }
    }

    /// The client `post`, `send` and `get` use: it reaches a unix socket too.
    pub(crate) fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// `GET /metrics`, as text.
    pub(crate) async fn metrics_text(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// POSTs a body to `/events`; returns the status and the body parsed as JSON
    /// (`Value::String` with the text when it is not JSON).
    pub(crate) async fn post(&self, body: impl Into<String>) -> (u16, Value) {
        let response = self
            .client
            .post(self.url("/events"))
            .header("content-type", "application/json")
            .body(body.into())
            .send()
            .await
            .expect("provisiond answers");
        status_and_json(response).await
    }

    /// POSTs an event built from a name and data.
    pub(crate) async fn send(&self, event: &str, object_id: i64, data: Value) -> (u16, Value) {
        self.post(envelope(event, object_id, data).to_string())
            .await
    }

    /// POSTs `body` to an admin path such as `/v1/reload`.
    pub(crate) async fn post_to(&self, path: &str, body: impl Into<String>) -> (u16, Value) {
        let response = self
            .client
            .post(self.url(path))
            .body(body.into())
            .send()
            .await
            .unwrap();
        status_and_json(response).await
    }

    /// `GET /v1/config`.
    pub(crate) async fn live_config(&self) -> Value {
        let (status, body) = self.get("/v1/config").await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Polls `GET /v1/config` until `pred` holds; the last body seen, or a panic after
    /// `timeout`.
    pub(crate) async fn wait_for_config(
        &self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let until = Instant::now() + timeout;
        loop {
            let config = self.live_config().await;
            if pred(&config) {
                return config;
            }
            if Instant::now() > until {
                panic!(
                    "/v1/config never got there; last:\n{config:#}\nlogs:\n{}",
                    self.logs().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.client.get(self.url(path)).send().await.unwrap();
        status_and_json(response).await
    }

    /// `GET path` until its JSON satisfies `pred`, for up to `timeout`: that JSON, or the
    /// last one read.
    pub(crate) async fn get_until(
        &self,
        path: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let until = Instant::now() + timeout;
        loop {
            let (_, body) = self.get(path).await;
            if pred(&body) || Instant::now() > until {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every log line so far.
    pub(crate) fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Log lines parsed as JSON.
    pub(crate) fn log_records(&self) -> Vec<Value> {
        self.logs()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until a log record satisfies `pred`.
    pub(crate) fn wait_for_log(
        &self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if let Some(v) = self.log_records().into_iter().find(|v| pred(v)) {
                return Some(v);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Sends a signal to the process.
    pub(crate) fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid =
            nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("a pid fits i32"));
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    /// Waits for the process to exit; its status, or `None` on timeout.
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Whether the process is still running.
    pub(crate) fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Kills the process with SIGKILL (no chance to clean up) and hands back its
    /// directory, so that a new process can start on the same config and store.
    pub(crate) fn kill_9(mut self) -> (TempDir, PathBuf) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
        let dir = std::mem::replace(&mut self.dir, TempDir::new().unwrap());
        (dir, self.config_path.clone())
    }

    /// Waits for a clean exit after SIGTERM and hands back the directory.
    pub(crate) fn terminate(mut self) -> (TempDir, PathBuf, std::process::ExitStatus) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let status = self
            .wait_exit(Duration::from_secs(30))
            .expect("provisiond exits after SIGTERM");
        let dir = std::mem::replace(&mut self.dir, TempDir::new().unwrap());
        (dir, self.config_path.clone(), status)
    }

    /// Sends a request with any method to the admin API.
    pub(crate) async fn request(&self, method: reqwest::Method, path: &str) -> (u16, Value) {
        let response = self
            .client
            .request(method, self.url(path))
            .send()
            .await
            .unwrap();
        status_and_json(response).await
    }
}

/// Runs `provisiond ARGS` in `dir` and waits (30 s at most) for it to exit; its exit
/// code, stdout and stderr.
pub(crate) fn run_binary(dir: &Path, args: &[&str]) -> (i32, String, String) {
    run_binary_to(dir, args, Stdio::piped(), Stdio::piped())
}

/// [`run_binary`] with its stdout and stderr going where the test says (a pipe closed by
/// its reader, `/dev/full`); those not piped come back empty.
pub(crate) fn run_binary_to(
    dir: &Path,
    args: &[&str],
    stdout: Stdio,
    stderr: Stdio,
) -> (i32, String, String) {
    run_binary_env(dir, args, &[], stdout, stderr)
}

/// [`run_binary_to`] with these environment variables set.
pub(crate) fn run_binary_env(
    dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    stdout: Stdio,
    stderr: Stdio,
) -> (i32, String, String) {
    let mut child = Command::new(binary())
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .env_remove("PROVISIOND_CONFIG")
        .env_remove("PROVISIOND_TOKEN")
        .env_remove("PROVISIOND_CLIENT_TOKEN")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .expect("provisiond runs");
    let until = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > until {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "provisiond {args:?} did not exit; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// provisiond in this test process: the library's `App` and `serve` on a loopback port,
/// with a store in memory, for tests that must reach inside (publish a snapshot, close
/// the store).
pub(crate) struct InProcess {
    pub app: Arc<provisiond::server::App>,
    pub addr: String,
    shutdown: tokio_util::sync::CancellationToken,
}

impl InProcess {
    pub(crate) async fn start(config: &str) -> Self {
        use provisiond::server::{App, Listener, serve};
        let config = provisiond::config::Config::parse(config, "provisioning.toml").unwrap();
        let listener = Listener::bind(&config.server.listen).await.unwrap();
        let addr = listener.local_addr();
        let store = provisiond::store::Store::memory().unwrap();
        let file = std::path::PathBuf::from(&config.file);
        let app = App::new(
            provisiond::dispatch::Snapshot::new(config, 1),
            store,
            file,
            provisiond::install_metrics(),
        );
        app.deliveries.resume().unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        tokio::spawn(serve(
            listener,
            app.clone(),
            shutdown.clone(),
            Duration::from_secs(1),
        ));
        Self {
            app,
            addr,
            shutdown,
        }
    }

    /// Makes `config` the live config, as a reload does.
    pub(crate) fn publish(&self, config: &str, generation: u64) {
        let config = provisiond::config::Config::parse(config, "provisioning.toml").unwrap();
        self.app
            .live
            .publish(provisiond::dispatch::Snapshot::new(config, generation));
    }

    pub(crate) async fn send(&self, event: &str, object_id: i64, data: Value) -> reqwest::Response {
        http_client()
            .post(format!("http://{}/events", self.addr))
            .body(envelope(event, object_id, data).to_string())
            .send()
            .await
            .unwrap()
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Polls `check` until it holds or `timeout` passes; whether it held.
pub(crate) async fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An after-stage HTTP handler for every event.
pub(crate) fn after_handler(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[handler]]\nname = \"{name}\"\nevents = [\"*\"]\nstage = \"after\"\nurl = {}\n{extra}\n",
        toml_str(url)
    )
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a provisiond command to the end: exit code, stdout, stderr. `stdin` is written to
/// its standard input.
pub(crate) fn cli(args: &[&str], env: &[(&str, &str)], stdin: &str) -> (i32, String, String) {
    use std::io::Write;
    let mut command = Command::new(binary());
    command
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("provisiond starts");
    // A command that does not read its input may close it first.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A plain HTTP client for tests (reqwest is built without a default TLS provider).
pub(crate) fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// A reply's status, and its body as JSON (`Value::String` with the text when it is not
/// JSON).
pub(crate) async fn status_and_json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// An envelope as the billing sends it.
pub(crate) fn envelope(event: &str, object_id: i64, data: Value) -> Value {
    serde_json::json!({
        "event": {"dt": "2026-11-26T10:00:00+00:00", "events_id": event, "object_id": object_id},
        "data": data,
    })
}

/// A request a handler server received.
#[derive(Debug, Clone)]
pub(crate) struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

impl Recorded {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("handler got JSON")
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A file of `tests/fixtures/`.
pub(crate) fn tls_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A real HTTP handler on `127.0.0.1:0`, answering with a closure and recording calls.
pub(crate) struct HandlerServer {
    pub addr: SocketAddr,
    scheme: &'static str,
    calls: Arc<Mutex<Vec<Recorded>>>,
    task: tokio::task::JoinHandle<()>,
}

pub(crate) type Reply = Response<Full<Bytes>>;

/// A reply with a status and a body.
pub(crate) fn reply(status: u16, body: impl Into<Bytes>) -> Reply {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    response
}

impl HandlerServer {
    pub(crate) async fn start<F, Fut>(answer: F) -> Self
    where
        F: Fn(Recorded) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Reply> + Send + 'static,
    {
        Self::start_on("127.0.0.1:0".parse().unwrap(), answer).await
    }

    /// Like [`Self::start`], over TLS with `tests/fixtures/localhost-cert.pem`, a
    /// self-signed certificate for 127.0.0.1; [`Self::url`] gives an `https://` URL.
    pub(crate) async fn start_tls<F, Fut>(answer: F) -> Self
    where
        F: Fn(Recorded) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Reply> + Send + 'static,
    {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cert = CertificateDer::from_pem_file(tls_fixture("localhost-cert.pem")).unwrap();
        let key = PrivateKeyDer::from_pem_file(tls_fixture("localhost-key.pem")).unwrap();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, Some(acceptor), answer)
    }

    /// Like [`Self::start`], on a given address: a handler that comes up where one was
    /// down.
    pub(crate) async fn start_on<F, Fut>(addr: SocketAddr, answer: F) -> Self
    where
        F: Fn(Recorded) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Reply> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        Self::serve(listener, None, answer)
    }

    fn serve<F, Fut>(
        listener: tokio::net::TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        answer: F,
    ) -> Self
    where
        F: Fn(Recorded) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Reply> + Send + 'static,
    {
        let addr = listener.local_addr().unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let calls = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(answer);
        let recorded = calls.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                let answer = answer.clone();
                let recorded = recorded.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                        let answer = answer.clone();
                        let recorded = recorded.clone();
                        async move {
                            let (parts, body) = request.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let call = Recorded {
                                method: parts.method.to_string(),
                                path: parts.uri.path().to_owned(),
                                headers: parts.headers,
                                body,
                                at: Instant::now(),
                            };
                            recorded.lock().unwrap().push(call.clone());
                            Ok::<_, std::convert::Infallible>(answer(call).await)
                        }
                    });
                    let connection = http1::Builder::new();
                    match &tls {
                        None => {
                            let _ = connection
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                        // A handshake the client gives up on ends the connection.
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(stream).await {
                                let _ = connection
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            }
                        }
                    }
                });
            }
        });
        Self {
            addr,
            scheme,
            calls,
            task,
        }
    }

    /// The billing docs' echo handler: returns the request body unchanged.
    pub(crate) async fn echo() -> Self {
        Self::start(|call| async move { reply(200, call.body) }).await
    }

    /// Always answers `status` with `body`.
    pub(crate) async fn fixed(status: u16, body: &'static str) -> Self {
        Self::start(move |_| async move { reply(status, body) }).await
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.addr)
    }

    pub(crate) fn calls(&self) -> Vec<Recorded> {
        self.calls.lock().unwrap().clone()
    }
}

impl Drop for HandlerServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A handler that stamps the path it was called on into `data.stamps` and returns the
/// envelope (use it with `modifies = true`): the reply shows which handlers ran, in order.
/// Paths containing `/slow` answer after 20 ms.
pub(crate) async fn stamper() -> HandlerServer {
    HandlerServer::start(|call| async move {
        if call.path.contains("/slow") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut envelope = call.json();
        let mut stamps = envelope["data"]["stamps"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        stamps.push(Value::String(call.path.clone()));
        envelope["data"]["stamps"] = Value::Array(stamps);
        reply(200, envelope.to_string())
    })
    .await
}

/// The `data.stamps` of a reply from handlers built with [`stamper`].
pub(crate) fn stamps(body: &Value) -> Vec<String> {
    body["data"]["stamps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| v.as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Replaces a file the way editors and GitOps tools do: a temporary file beside it,
/// renamed over it.
pub(crate) fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A loopback URL nothing listens on, and nothing else will: its port stays reserved
/// (see [`free_addr`]), so connecting is refused for as long as the tests run.
pub(crate) fn refused_url() -> String {
    format!("http://{}/hook", free_addr())
}

/// Sockets bound, never listening, to hold ports for the life of the test process.
static RESERVED: Mutex<Vec<tokio::net::TcpSocket>> = Mutex::new(Vec::new());

/// A loopback address nothing listens on, whose port no other process or test can be
/// given: a socket stays bound to it (with `SO_REUSEADDR`, not listening) until the
/// test process exits. The kernel hands out neither ephemeral ports for `:0` binds nor
/// source ports for connections from a bound port, so a connection to it is refused,
/// and [`HandlerServer::start_on`] (which binds with `SO_REUSEADDR`, as every tokio
/// listener does) can still start a handler exactly there later.
pub(crate) fn free_addr() -> SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    RESERVED.lock().unwrap().push(socket);
    addr
}

/// Writes an executable script.
pub(crate) fn script(dir: &Path, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A TOML string literal.
pub(crate) fn toml_str(s: impl AsRef<str>) -> String {
    Value::String(s.as_ref().to_owned()).to_string()
}

/// Writes raw bytes to `addr` and reads the reply until the server closes or 2 s pass.
/// `GET /healthz` on a connection of its own, if it is answered within `within`: whether
/// the sidecar takes a new connection (one held by a misbehaving client was freed).
pub(crate) async fn healthz_on_a_new_connection(addr: &str, within: Duration) -> Option<String> {
    tokio::time::timeout(
        within,
        raw_request(
            addr,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        ),
    )
    .await
    .ok()
}

pub(crate) async fn raw_request(addr: &str, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        match tokio::time::timeout_at(until, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                out.extend_from_slice(&buf[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of a metric line starting with `prefix` in Prometheus text.
pub(crate) fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The store a test's sidecars use: the redb file (the default), or a database on a
/// throwaway PostgreSQL server that lives as long as this value. The after-stage suite
/// runs on both: `tests/it/after.rs` is compiled twice, as `after` and `after_pg`.
pub(crate) enum Db {
    File,
    Pg(pg::PgServer),
}

impl Db {
    /// The store of a test in `module` (its `module_path!()`): PostgreSQL when the
    /// module's name ends in `_pg` (and PostgreSQL is installed; outside CI, without it,
    /// the file, saying so).
    pub(crate) fn for_module(module: &str) -> Self {
        if module.ends_with("_pg") && pg::installed() {
            let server = pg::PgServer::start();
            server.create_database("provisiond");
            Self::Pg(server)
        } else {
            Self::File
        }
    }

    /// `config` on this store: for PostgreSQL, `[store]` gets the backend, the URL and a
    /// short lease (tests that kill a sidecar wait for it).
    pub(crate) fn config(&self, config: &str) -> String {
        let Self::Pg(server) = self else {
            return config.to_owned();
        };
        let keys = format!(
            "backend = \"postgres\"\nurl = \"{}\"\nlease = \"3s\"\n",
            server.url("provisiond")
        );
        match config.find("[store]\n") {
            Some(at) => {
                let at = at + "[store]\n".len();
                format!("{}{keys}{}", &config[..at], &config[at..])
            }
            None => format!("{config}\n[store]\n{keys}"),
        }
    }
}

/// The repository's README.
pub(crate) fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap()
}

/// The fenced code blocks of `lang` in `markdown` (in a README section, say), in order,
/// each without its fences.
pub(crate) fn code_blocks<'a>(markdown: &'a str, lang: &str) -> impl Iterator<Item = &'a str> {
    let fence = format!("```{lang}\n");
    let blocks: Vec<&'a str> = markdown
        .split(fence.as_str())
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    blocks.into_iter()
}
