//! The bare forwarding hop: the least any sidecar can cost. A few lines of hyper that
//! take the request, forward the body to the handler over a pooled keep-alive client
//! and return the reply, nothing else. It runs in a process of its own (this bench
//! binary started again with `--serve-hop`), as provisiond does.
//!
//! The same hop can forward through reqwest instead, with the very client provisiond's
//! handler calls use (`--serve-hop ADDR reqwest`): the least a sidecar that keeps
//! reqwest, as issue 11 asks, can cost.

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// How the hop forwards.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    /// hyper-util's pooled client: the bare hop.
    Hyper,
    /// provisiond's own reqwest client, one POST per request.
    Reqwest,
}

impl Via {
    fn arg(self) -> &'static str {
        match self {
            Self::Hyper => "hyper",
            Self::Reqwest => "reqwest",
        }
    }

    pub(crate) fn from_arg(arg: Option<&str>) -> Self {
        match arg {
            Some("reqwest") => Self::Reqwest,
            _ => Self::Hyper,
        }
    }
}

/// Serves the hop on a free port, printing it, forwarding to `upstream` (`host:port`).
/// Never returns.
pub(crate) fn serve(upstream: &str, via: Via) -> ! {
    let upstream = format!("http://{upstream}/");
    match via {
        Via::Hyper => {
            let mut connector = HttpConnector::new();
            connector.set_nodelay(true);
            let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(1024)
                .build(connector);
            listen(move |body| {
                let forward = Request::post(upstream.as_str())
                    .header("content-type", "application/json")
                    .body(Full::new(body))
                    .unwrap();
                let reply = client.request(forward);
                async move {
                    let (parts, body) = reply.await.unwrap().into_parts();
                    let body = body.collect().await.unwrap().to_bytes();
                    Response::from_parts(parts, Full::new(body))
                }
            })
        }
        // provisiond's handler client, the body POSTed as JSON with a timeout, the
        // reply's status and bytes returned.
        Via::Reqwest => {
            let client = provisiond::handler_client();
            let upstream = reqwest::Url::parse(&upstream).unwrap();
            listen(move |body| {
                let reply = client
                    .post(upstream.clone())
                    .timeout(std::time::Duration::from_secs(5))
                    .header("content-type", "application/json")
                    .body(body)
                    .send();
                async move {
                    let reply = reply.await.unwrap();
                    let status = reply.status();
                    let mut response = Response::new(Full::new(reply.bytes().await.unwrap()));
                    *response.status_mut() = status;
                    response
                }
            })
        }
    }
}

/// Accepts connections on a free port of loopback, printing it, and answers each
/// request with what `forward` makes of its body. Never returns.
fn listen<F, Fut>(forward: F) -> !
where
    F: Fn(Bytes) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", listener.local_addr().unwrap());
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let _ = stream.set_nodelay(true);
            let forward = forward.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let forward = forward.clone();
                    async move {
                        let body = request.into_body().collect().await.unwrap().to_bytes();
                        Ok::<_, Infallible>(forward(body).await)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

/// A hop process forwarding to `upstream`; killed on drop.
pub(crate) struct Hop {
    child: Child,
    pub addr: String,
}

impl Hop {
    pub(crate) fn start(upstream: &str, via: Via) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--serve-hop", upstream, via.arg()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        Self {
            child,
            addr: line.trim().to_owned(),
        }
    }
}

impl Hop {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Hop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
