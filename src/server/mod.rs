//! The HTTP listener: TCP or unix socket, hyper http1, connection cap, header timeout,
//! graceful drain. Routes live in [`ingress`] (`POST /events`) and [`admin`] (the rest).

pub mod admin;
mod auth;
mod config_api;
pub mod ingress;
mod reply;
mod store_api;

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Listen;
use crate::delivery::Deliveries;
use crate::dispatch::{Live, Snapshot};
use crate::handlers::Caller;
use crate::reload::Reloader;
use crate::store::Store;

pub use reply::Body;

/// Everything a request needs, shared by all connections. Assembled once, in
/// [`App::new`]; the parts that run on their own (the delivery workers, the reloader)
/// get only the handles they use, never the `App`.
pub struct App {
    /// The live config. Each event loads it once and keeps that snapshot to the end.
    pub live: Arc<Live>,
    pub caller: Caller,
    /// Events being handled; over `server.max_in_flight` the billing gets 503.
    pub in_flight: Semaphore,
    max_in_flight: usize,
    /// Set when shutdown begins: new events get 503 with Retry-After.
    pub draining: AtomicBool,
    /// The durable queue, dead letters and execution log.
    pub store: Store,
    /// The after stage's workers.
    pub deliveries: Arc<Deliveries>,
    /// Renders `/metrics`.
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// Reloads the live config from the file; the one reload path.
    pub reloader: Arc<Reloader>,
}

impl App {
    /// An app serving `snapshot` (loaded from the file `config_path`) with `store`;
    /// `/metrics` renders `metrics` (the process's recorder, installed by its caller).
    pub fn new(
        snapshot: Snapshot,
        store: Store,
        config_path: PathBuf,
        metrics: metrics_exporter_prometheus::PrometheusHandle,
    ) -> Arc<Self> {
        let max_in_flight = snapshot.config.server.max_in_flight;
        crate::metrics::store_unreadable_rows(store.quarantined() as u64);
        if !store.is_shared() {
            // A store file is this sidecar's alone: the host and the file name it. (A
            // shared database names itself once it is reached: `store::postgres`.)
            let host = nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default();
            let path = std::fs::canonicalize(store.path())
                .map_or_else(|_| store.path().to_owned(), |p| p.display().to_string());
            crate::metrics::store_info("file", &format!("{host}:{path}"));
        }
        let live = Live::new(snapshot);
        let reloader = Reloader::new(config_path, &live.load().config, live.clone());
        let caller = Caller::new();
        let deliveries = Deliveries::new(live.clone(), store.clone(), caller.clone());
        Deliveries::attach(&deliveries);
        Arc::new(Self {
            reloader: Arc::new(reloader),
            live,
            caller,
            in_flight: Semaphore::new(max_in_flight),
            max_in_flight,
            draining: AtomicBool::new(false),
            store,
            deliveries,
            metrics,
        })
    }

    /// Events between arrival and reply right now.
    pub fn events_in_flight(&self) -> usize {
        self.max_in_flight
            .saturating_sub(self.in_flight.available_permits())
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// A bound listener: TCP, or a unix socket.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, UnixPath),
}

/// The path of a unix socket this process created, and the file it created there
/// (device and inode): on drop, only that file is removed.
pub struct UnixPath {
    path: PathBuf,
    created: (u64, u64),
}

impl Listener {
    /// Binds `listen`. A unix socket gets mode 0660. A socket file already at the path is
    /// replaced only when it is stale (connecting to it is refused); when another process
    /// answers on it, binding fails and the file is left alone.
    pub async fn bind(listen: &Listen) -> std::io::Result<Self> {
        match listen {
            Listen::Tcp(addr) => Ok(Self::Tcp(TcpListener::bind(addr).await?)),
            Listen::Unix(path) => {
                use std::os::unix::fs::MetadataExt as _;
                remove_stale_socket(path).await?;
                let listener = bind_unix(path)?;
                let meta = std::fs::symlink_metadata(path)?;
                let path = UnixPath {
                    path: path.clone(),
                    created: (meta.dev(), meta.ino()),
                };
                Ok(Self::Unix(listener, path))
            }
        }
    }

    /// The bound address, as `listen` would write it (with the real port for `:0`).
    pub fn local_addr(&self) -> String {
        match self {
            Self::Tcp(l) => l
                .local_addr()
                .map_or_else(|e| format!("?({e})"), |a| a.to_string()),
            Self::Unix(_, path) => format!("unix:{}", path.path.display()),
        }
    }

    async fn accept(
        &self,
    ) -> std::io::Result<Either<tokio::net::TcpStream, tokio::net::UnixStream>> {
        match self {
            Self::Tcp(l) => {
                let (stream, _) = l.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok(Either::Left(stream))
            }
            Self::Unix(l, _) => Ok(Either::Right(l.accept().await?.0)),
        }
    }
}

impl Drop for Listener {
    /// Removes the socket file this listener created, if it is still the one at the
    /// path: a socket another instance bound there since (after someone removed ours)
    /// is not ours to remove.
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt as _;
        if let Self::Unix(_, path) = self
            && std::fs::symlink_metadata(&path.path)
                .is_ok_and(|m| (m.dev(), m.ino()) == path.created)
        {
            let _ = std::fs::remove_file(&path.path);
        }
    }
}

/// Binds a unix socket whose file has mode 0660 from the moment it exists. bind(2)
/// creates the file with 0777 less the umask, so a chmod afterwards would leave a window
/// in which, under a permissive umask (000, 002), another local user could connect. The
/// umask is the process's: this runs at start-up, before anything else creates files.
fn bind_unix(path: &std::path::Path) -> std::io::Result<UnixListener> {
    use nix::sys::stat::{Mode, umask};
    let before = umask(Mode::from_bits_truncate(0o117));
    let bound = UnixListener::bind(path);
    umask(before);
    bound
}

/// Makes room for a unix socket at `path`: nothing there is fine; a socket nobody
/// answers on (left by a process that was killed) is removed; a socket that accepts a
/// connection, or whose backlog is full, belongs to a live process and is an error, as
/// is anything not a socket.
async fn remove_stale_socket(path: &std::path::Path) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    use std::os::unix::fs::FileTypeExt as _;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(Error::new(
            ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    // A non-blocking connect: a live listener with a full backlog answers at once
    // (`WouldBlock`) instead of holding this start-up until it has room.
    match tokio::net::UnixStream::connect(path).await {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => std::fs::remove_file(path),
        Ok(_) => Err(in_use(path)),
        Err(e) if e.kind() == ErrorKind::WouldBlock => Err(in_use(path)),
        Err(e) => Err(Error::new(
            e.kind(),
            format!(
                "{} exists and cannot be checked for a live listener: {e}",
                path.display()
            ),
        )),
    }
}

fn in_use(path: &std::path::Path) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!(
            "another provisiond is listening on {} (stop it, or give this one another \
             server.listen)",
            path.display()
        ),
    )
}

/// Serves until `shutdown` is cancelled, then stops accepting and gives open connections
/// up to `grace` to finish the requests they are in.
pub async fn serve(
    listener: Listener,
    app: Arc<App>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let server = app.live.load().config.server.clone();
    let connections = Arc::new(Semaphore::new(server.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_timeout)
        .keep_alive(true);

    // The connections' tasks: those still open when the grace runs out are ended here,
    // so that what they leave (an abandoned event's log line and execution log rows) is
    // written before the store closes, not at the runtime's end.
    let mut tasks = tokio::task::JoinSet::new();
    let spawn = |tasks: &mut tokio::task::JoinSet<()>,
                 stream,
                 permit: Option<tokio::sync::OwnedSemaphorePermit>| {
        let app = app.clone();
        let service = service_fn(move |request| {
            let app = app.clone();
            async move { Ok::<_, Infallible>(route(&app, request).await) }
        });
        // A client that stops taking its replies is cut off after `header_timeout`, as
        // one that stops sending its headers is.
        let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
        stream.set_write_timeout(Some(server.header_timeout));
        let stream = TokioIo::new(Box::pin(stream));
        let connection = graceful.watch(builder.serve_connection(stream, service));
        tasks.spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
        // Forget those that have ended.
        while tasks.try_join_next().is_some() {}
    };

    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => permit.expect("never closed"),
            () = shutdown.cancelled() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(stream) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        spawn(&mut tasks, stream, Some(permit));
    }

    // Draining: the events in flight finish; new ones, on new connections or kept-alive
    // ones, are answered 503 with Retry-After (and the connection closed), so the billing
    // hears "not now" rather than a refused connection. Then the listener closes.
    app.draining.store(true, Ordering::Relaxed);
    let until = tokio::time::Instant::now() + grace;
    info!(
        grace = %crate::config::fmt_duration(grace), in_flight = app.events_in_flight(),
        "draining: new events get 503 while those in flight finish"
    );
    while app.events_in_flight() > 0 {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok(stream) = accepted {
                    spawn(&mut tasks, stream, None);
                }
            }
            () = tokio::time::sleep(Duration::from_millis(10)) => {}
            () = tokio::time::sleep_until(until) => break,
        }
    }
    drop(listener);
    let left = until
        .saturating_duration_since(tokio::time::Instant::now())
        .max(Duration::from_millis(100));
    if tokio::time::timeout(left, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("grace period over, closing the remaining connections");
    }
    tasks.abort_all();
    let ended = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(1), ended)
        .await
        .is_err()
    {
        warn!("connections still ending a second after they were closed");
    }
}

/// Sends a request to its route.
async fn route(app: &Arc<App>, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_owned();
    // One snapshot for the token check and the whole event, whatever reloads meanwhile.
    let snapshot = app.live.load_full();
    if auth::protected(&path)
        && let Some(token) = &snapshot.config.server.token
        && !auth::authorized(token, request.headers())
    {
        if path == "/events" {
            // A billing with a wrong token fails every event: say so where it is seen.
            warn!("an event refused: missing or wrong token (401)");
            crate::metrics::event(
                "unparsed".into(),
                crate::outcome::EventOutcome::Unauthorized,
            );
        }
        return reply::unauthorized();
    }
    let mut response = match (request.method(), path.as_str()) {
        (&Method::POST, "/events") => ingress::events(app, snapshot, request).await,
        (_, "/events") => reply::method_not_allowed("POST"),
        _ => admin::route(app, request).await,
    };
    if app.is_draining() {
        // Ask the client to reconnect, to whoever serves after us.
        response.headers_mut().insert(
            hyper::header::CONNECTION,
            hyper::header::HeaderValue::from_static("close"),
        );
    }
    response
}

/// A fixed body, as every route answers.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_unix_socket_is_0660_from_the_moment_it_exists_whatever_the_umask() {
        use nix::sys::stat::{Mode, umask};
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::TempDir::new().unwrap();
        for (i, permissive) in [0o000, 0o002, 0o022, 0o077].into_iter().enumerate() {
            let path = dir.path().join(format!("{i}.sock"));
            let before = umask(Mode::from_bits_truncate(permissive));
            let bound = bind_unix(&path);
            umask(before);
            let _listener = bound.unwrap();
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o660, "umask {permissive:03o}: {mode:03o}");
        }
    }

    #[tokio::test]
    async fn only_a_stale_socket_is_removed() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("p.sock");
        assert!(remove_stale_socket(&path).await.is_ok(), "nothing there");

        // Bound and gone (a killed process): removed.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        remove_stale_socket(&path).await.unwrap();
        assert!(!path.exists());

        // Alive, even with its backlog full: refused at once, and left alone.
        let _live = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut held = Vec::new();
        let full = tokio::time::timeout(Duration::from_secs(10), async {
            for _ in 0..100_000 {
                match tokio::net::UnixStream::connect(&path).await {
                    Ok(stream) => held.push(stream),
                    Err(e) => return e.kind(),
                }
            }
            std::io::ErrorKind::Other
        })
        .await
        .expect("connecting to a full backlog does not wait");
        assert_eq!(full, std::io::ErrorKind::WouldBlock);
        let error = tokio::time::timeout(Duration::from_secs(5), remove_stale_socket(&path))
            .await
            .expect("no wait for room in the backlog")
            .unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse);
        assert!(
            error
                .to_string()
                .contains("another provisiond is listening")
        );
        assert!(path.exists());

        // Not a socket: left alone.
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(remove_stale_socket(&file).await.is_err());
        assert!(file.exists());
    }
}
