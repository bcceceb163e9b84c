//! Reload: one path from the config file to a new live snapshot, fed by three triggers.
//!
//! The file watcher ([`watch`]), SIGHUP and `POST /v1/reload` all call
//! [`Reloader::reload`], one reload at a time. It reads and validates the whole file with
//! the same code as start-up ([`load`]), builds the new snapshot off to the side, and
//! swaps it in with [`Live::publish`] only when it is complete and different. A file that
//! fails validation changes nothing live: its errors are logged, counted and kept for
//! `GET /v1/config` until a good file loads.
//!
//! Settings the listener reads once at start ([`Fixed`]) cannot change while running:
//! a reload that changes them applies everything else, keeps their running values, and
//! reports them as needing a restart.

mod diff;
pub(crate) mod watch;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Backend, Config, ConfigErrors, Listen};
use crate::dispatch::{Live, Snapshot};

pub(crate) use diff::Changes;

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The file watcher saw the file change.
    Watch,
    /// SIGHUP.
    Signal,
    /// `POST /v1/reload`.
    Api,
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Watch => "watch",
            Self::Signal => "signal",
            Self::Api => "api",
        })
    }
}

/// What a reload did.
#[derive(Debug)]
pub enum Outcome {
    /// A new snapshot is live.
    Applied {
        generation: u64,
        changes: Changes,
        restart_needed: Vec<Pending>,
    },
    /// The file holds the config already live (perhaps with other comments or layout):
    /// nothing was swapped.
    Unchanged {
        generation: u64,
        restart_needed: Vec<Pending>,
    },
    /// The file is not a valid config: the live one stays.
    Rejected {
        generation: u64,
        errors: ConfigErrors,
    },
}

impl Outcome {
    /// `applied`, `unchanged` or `rejected`.
    pub fn result(&self) -> &'static str {
        match self {
            Self::Applied { .. } => "applied",
            Self::Unchanged { .. } => "unchanged",
            Self::Rejected { .. } => "rejected",
        }
    }
}

/// A setting whose new value waits for a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// The key, e.g. `server.listen`.
    pub setting: &'static str,
    /// The value in the file.
    pub file: String,
    /// The value in use.
    pub running: String,
}

/// The last reload that was rejected, kept until a good file loads.
#[derive(Debug, Clone)]
pub struct LastError {
    pub at: SystemTime,
    pub trigger: Trigger,
    /// Each error as `file:line:col: key.path: message`.
    pub errors: Vec<String>,
}

/// Reloads so far, for `/v1/config` and metrics.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub applied: u64,
    pub unchanged: u64,
    pub rejected: u64,
    pub last_error: Option<LastError>,
    /// Settings changed in the file that keep their running values until a restart.
    pub restart_needed: Vec<Pending>,
    /// SHA-256 (hex) of the file the live config was last read from: the file at start,
    /// then at each reload that was applied or found unchanged (a comment-only change
    /// swaps nothing, but the file on disk is that one). A rejected file leaves it.
    pub hash: String,
}

/// Settings read once at start: the listener, its limits, the store file.
#[derive(Debug, Clone)]
pub(crate) struct Fixed {
    listen: Listen,
    max_in_flight: usize,
    max_connections: usize,
    header_timeout: Duration,
    shutdown_grace: Duration,
    store_path: PathBuf,
    store_backend: Backend,
}

impl Fixed {
    pub(crate) fn of(config: &Config) -> Self {
        Self {
            listen: config.server.listen.clone(),
            max_in_flight: config.server.max_in_flight,
            max_connections: config.server.max_connections,
            header_timeout: config.server.header_timeout,
            shutdown_grace: config.server.shutdown_grace,
            store_path: config.store.path.clone(),
            store_backend: config.store.backend.clone(),
        }
    }

    /// Puts the running values back into `config`; returns the settings whose file
    /// value differed.
    fn pin(&self, config: &mut Config) -> Vec<Pending> {
        let mut pending = Vec::new();
        let server = &mut config.server;
        let store = &mut config.store;
        keep(
            &mut pending,
            "server.listen",
            &mut server.listen,
            &self.listen,
            Listen::to_string,
        );
        keep(
            &mut pending,
            "server.max_in_flight",
            &mut server.max_in_flight,
            &self.max_in_flight,
            usize::to_string,
        );
        keep(
            &mut pending,
            "server.max_connections",
            &mut server.max_connections,
            &self.max_connections,
            usize::to_string,
        );
        keep(
            &mut pending,
            "server.header_timeout",
            &mut server.header_timeout,
            &self.header_timeout,
            |d| crate::config::fmt_duration(*d),
        );
        keep(
            &mut pending,
            "server.shutdown_grace",
            &mut server.shutdown_grace,
            &self.shutdown_grace,
            |d| crate::config::fmt_duration(*d),
        );
        keep(
            &mut pending,
            "store.path",
            &mut store.path,
            &self.store_path,
            |p| p.display().to_string(),
        );
        keep_backend(&mut pending, &mut store.backend, &self.store_backend);
        pending
    }
}

/// `store.backend` and its keys: each key that differs is named (the URL with its
/// password masked), and the running backend is put back whole.
fn keep_backend(pending: &mut Vec<Pending>, value: &mut Backend, running: &Backend) {
    if value == running {
        return;
    }
    let mut differs = |setting: &'static str, file: String, running: String| {
        if file != running {
            pending.push(Pending {
                setting,
                file,
                running,
            });
        }
    };
    match (&*value, running) {
        (Backend::Postgres(a), Backend::Postgres(b)) => {
            // Two URLs that differ only in the password show alike; still say so.
            let (file_url, running_url) = match (a.shown_url(), b.shown_url()) {
                (x, y) if x == y && a.url != b.url => (format!("{x} (another password)"), y),
                pair => pair,
            };
            differs("store.url", file_url, running_url);
            differs("store.schema", a.schema.clone(), b.schema.clone());
            differs("store.pool", a.pool.to_string(), b.pool.to_string());
            let duration = crate::config::fmt_duration;
            differs("store.lease", duration(a.lease), duration(b.lease));
        }
        (file, running) => {
            let name = |b: &Backend| match b {
                Backend::Redb => "redb".to_owned(),
                Backend::Postgres(pg) => format!("postgres {}", pg.shown_url()),
            };
            differs("store.backend", name(file), name(running));
        }
    }
    *value = running.clone();
}

fn keep<T: PartialEq + Clone>(
    pending: &mut Vec<Pending>,
    setting: &'static str,
    value: &mut T,
    running: &T,
    show: impl Fn(&T) -> String,
) {
    if value != running {
        pending.push(Pending {
            setting,
            file: show(value),
            running: show(running),
        });
        *value = running.clone();
    }
}

/// Reads and validates the config file: what start-up and every reload run.
pub(crate) fn load(path: &Path) -> Result<Config, ConfigErrors> {
    Config::load(path)
}

/// The one reload path, shared by the file watcher, SIGHUP and `POST /v1/reload`: see
/// [`Reloader::reload`].
#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    fixed: Fixed,
    /// Held for the whole of a reload: reloads run one at a time.
    running: tokio::sync::Mutex<()>,
    status: Mutex<Status>,
    /// What a reload replaces.
    live: std::sync::Arc<Live>,
}

impl Reloader {
    /// A reloader for the file `path`, which `config` (generation 1) was loaded from,
    /// publishing to `live`.
    pub fn new(path: PathBuf, config: &Config, live: std::sync::Arc<Live>) -> Self {
        Self {
            live,
            path,
            fixed: Fixed::of(config),
            running: tokio::sync::Mutex::new(()),
            status: Mutex::new(Status {
                hash: config.hash.clone(),
                ..Status::default()
            }),
        }
    }

    /// The config file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn status(&self) -> Status {
        self.status.lock().expect("status lock").clone()
    }

    /// Reads the file and makes it live if it is valid and different. Events in flight
    /// keep the snapshot they started with.
    pub async fn reload(&self, trigger: Trigger) -> Outcome {
        let _one_at_a_time = self.running.lock().await;
        let path = self.path.clone();
        let loaded = tokio::task::spawn_blocking(move || load(&path))
            .await
            .unwrap_or_else(|e| Err(ConfigErrors::file("config", format!("reload failed: {e}"))));
        let live = self.live.load_full();
        let mut read_hash = None;
        let outcome = match loaded {
            Err(errors) => Outcome::Rejected {
                generation: live.generation,
                errors,
            },
            Ok(mut config) => {
                read_hash = Some(config.hash.clone());
                let restart_needed = self.fixed.pin(&mut config);
                let changes = Changes::between(&live.config, &config);
                // The file was checked with its own `listen`; the sidecar goes on serving
                // the running one, which must not lose its token either.
                if let Some(message) = config.server.unguarded() {
                    Outcome::Rejected {
                        generation: live.generation,
                        errors: ConfigErrors::file(
                            &self.path.display().to_string(),
                            format!(
                                "server.token: the running listener {message} (server.listen \
                                 keeps its running value until a restart)"
                            ),
                        ),
                    }
                } else if changes.is_empty() {
                    Outcome::Unchanged {
                        generation: live.generation,
                        restart_needed,
                    }
                } else {
                    diff::keep_unchanged_handlers(&live.config, &mut config);
                    let generation = live.generation + 1;
                    for warning in config.warnings() {
                        warn!(%warning, "config warning");
                    }
                    self.live.publish(Snapshot::new(config, generation));
                    Outcome::Applied {
                        generation,
                        changes,
                        restart_needed,
                    }
                }
            }
        };
        // The hash of the file the sidecar runs (applied, or unchanged but for settings
        // that wait for a restart); a rejected file leaves it.
        if let Some(hash) = read_hash
            && !matches!(outcome, Outcome::Rejected { .. })
        {
            self.status.lock().expect("status lock").hash = hash;
        }
        self.record(&outcome, trigger);
        outcome
    }

    /// Counts the outcome, keeps or clears the last error, and logs it.
    fn record(&self, outcome: &Outcome, trigger: Trigger) {
        crate::metrics::reload(outcome.result());
        let mut status = self.status.lock().expect("status lock");
        match outcome {
            Outcome::Applied {
                generation,
                changes,
                restart_needed,
            } => {
                status.applied += 1;
                status.last_error = None;
                status.restart_needed.clone_from(restart_needed);
                info!(
                    %trigger, generation, added = %changes.added.join(", "),
                    removed = %changes.removed.join(", "), changed = %changes.changed.join(", "),
                    settings = %changes.settings.join(", "), "config reloaded"
                );
                log_pending(restart_needed);
            }
            Outcome::Unchanged {
                generation,
                restart_needed,
            } => {
                status.unchanged += 1;
                status.last_error = None;
                status.restart_needed.clone_from(restart_needed);
                if restart_needed.is_empty() {
                    info!(%trigger, generation, "config unchanged");
                } else {
                    let settings: Vec<&str> = restart_needed.iter().map(|p| p.setting).collect();
                    info!(
                        %trigger, generation, restart_needed = %settings.join(", "),
                        "config unchanged but for settings that need a restart"
                    );
                }
                log_pending(restart_needed);
            }
            Outcome::Rejected { generation, errors } => {
                status.rejected += 1;
                for e in errors.iter() {
                    error!(%trigger, error = %e, "config error");
                }
                error!(
                    %trigger, generation, errors = errors.len(),
                    "config rejected, keeping the running one"
                );
                status.last_error = Some(LastError {
                    at: SystemTime::now(),
                    trigger,
                    errors: errors.iter().map(ToString::to_string).collect(),
                });
            }
        }
    }
}

fn log_pending(pending: &[Pending]) {
    for p in pending {
        warn!(
            setting = p.setting, file = %p.file, running = %p.running,
            "setting needs a restart, keeping the running value"
        );
    }
}

/// Starts the triggers: the watcher's settle-then-reload loop (unless `watcher` is
/// `None`) and SIGHUP. Both end when `shutdown` is cancelled.
pub(crate) fn spawn(
    reloader: std::sync::Arc<Reloader>,
    watcher: Option<watch::Watcher>,
    hangup: Signal,
    shutdown: CancellationToken,
) {
    if let Some(watcher) = watcher {
        tokio::spawn(watcher.run(reloader.clone(), shutdown.clone()));
    }
    tokio::spawn(on_hangup(reloader, hangup, shutdown));
}

/// Registers SIGHUP. Call it before the listener is announced: until then the signal's
/// default action ends the process.
pub(crate) fn hangup() -> std::io::Result<Signal> {
    signal(SignalKind::hangup())
}

async fn on_hangup(
    reloader: std::sync::Arc<Reloader>,
    mut hangup: Signal,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            received = hangup.recv() => {
                if received.is_none() {
                    return;
                }
                info!(signal = "SIGHUP", "reloading the config");
                reloader.reload(Trigger::Signal).await;
            }
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text, "p.toml").unwrap()
    }

    /// An in-place writer truncates the file and writes it again, over and over, while
    /// the file is read: no read may ever take the emptied file for a config.
    #[test]
    fn a_file_emptied_while_it_is_read_is_never_loaded_as_empty() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("p.toml");
        // Every shorter prefix of this text fails to load, so a read that is not of
        // the whole text is an error, never a config with fewer handlers.
        let text = "[[handler]]\nname = \"a\"\nevents = [\"*\"]\nurl = \"http://127.0.0.1:1/\"\n\
                    stage = \"after\"";
        std::fs::write(&path, text).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || {
                use std::io::Write as _;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut file = std::fs::File::create(&path).unwrap(); // truncates
                    std::thread::yield_now();
                    file.write_all(text.as_bytes()).unwrap();
                }
            })
        };
        // At least 20,000 reads, and on until both outcomes were seen (the race was run),
        // for 20 s at most: a starved writer thread makes the test slower, not wrong.
        let (mut loaded, mut refused, mut reads) = (0, 0, 0);
        let until = std::time::Instant::now() + Duration::from_secs(20);
        while reads < 20_000 || ((loaded == 0 || refused == 0) && std::time::Instant::now() < until)
        {
            reads += 1;
            match load(&path) {
                Ok(config) => {
                    assert_eq!(config.handlers.len(), 1, "an emptied file was loaded");
                    loaded += 1;
                }
                Err(_) => refused += 1,
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
        assert!(
            loaded > 0 && refused > 0,
            "{loaded} loaded, {refused} refused"
        );
    }

    #[test]
    fn fixed_settings_keep_their_running_values() {
        let running = config("[server]\nlisten = \"127.0.0.1:1\"\n[store]\npath = \"a.db\"\n");
        let mut new = config(
            "[server]\nlisten = \"127.0.0.1:2\"\nmax_in_flight = 3\ndeadline = \"1s\"\n\
             [store]\npath = \"b.db\"\n",
        );
        let pending = Fixed::of(&running).pin(&mut new);
        let settings: Vec<&str> = pending.iter().map(|p| p.setting).collect();
        assert_eq!(
            settings,
            ["server.listen", "server.max_in_flight", "store.path"]
        );
        assert_eq!(pending[0].file, "127.0.0.1:2");
        assert_eq!(pending[0].running, "127.0.0.1:1");
        assert_eq!(new.server.listen, running.server.listen);
        assert_eq!(new.store.path, running.store.path);
        assert_eq!(
            new.server.deadline,
            Duration::from_secs(1),
            "the rest applies"
        );
    }

    /// A reload cannot take the token off a listener other hosts can reach, even with a
    /// file whose own `listen` is loopback: the running listener is the one kept.
    #[tokio::test]
    async fn a_reload_keeps_the_token_of_a_listener_other_hosts_reach() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("p.toml");
        let running = || config("[server]\nlisten = \"0.0.0.0:8600\"\ntoken = \"t0ken\"\n");
        let live = Live::new(Snapshot::new(running(), 1));
        let reloader = Reloader::new(path.clone(), &running(), live.clone());

        std::fs::write(&path, "[server]\nlisten = \"127.0.0.1:8600\"\n").unwrap();
        let Outcome::Rejected { generation, errors } = reloader.reload(Trigger::Api).await else {
            panic!("the token was taken off 0.0.0.0:8600");
        };
        assert_eq!(generation, 1);
        let message = errors.to_string();
        assert!(
            message.contains(
                "server.token: the running listener 0.0.0.0:8600 is reachable from other hosts \
                 and server.token is not set"
            ) && message.contains("(server.listen keeps its running value until a restart)"),
            "{message}"
        );
        assert!(live.load().config.server.token.is_some());
        assert!(reloader.status().last_error.is_some());
        // The hash shown stays the running file's: the rejected one is not running.
        assert_eq!(reloader.status().hash, running().hash);

        // Said out loud, it applies; so does a new token.
        for text in [
            "[server]\nlisten = \"127.0.0.1:8600\"\nallow_insecure = true\n",
            "[server]\nlisten = \"0.0.0.0:8600\"\ntoken = \"other\"\n",
        ] {
            std::fs::write(&path, text).unwrap();
            let outcome = reloader.reload(Trigger::Api).await;
            assert!(
                matches!(outcome, Outcome::Applied { .. }),
                "{text}: {outcome:?}"
            );
        }
    }

    const PG: &str = "[store]\nbackend = \"postgres\"\n\
                      url = \"postgres://app:pw-1@db1/billing\"\n";

    #[test]
    fn the_store_backend_and_its_keys_need_a_restart() {
        let running = config(PG);
        let mut new = config(&format!(
            "{}schema = \"other\"\npool = 2\nlease = \"1m\"\n",
            PG.replace("pw-1@db1", "pw-2@db2")
        ));
        let pending = Fixed::of(&running).pin(&mut new);
        let settings: Vec<&str> = pending.iter().map(|p| p.setting).collect();
        assert_eq!(
            settings,
            ["store.url", "store.schema", "store.pool", "store.lease"]
        );
        assert_eq!(pending[0].file, "postgres://app:***@db2/billing");
        assert_eq!(pending[0].running, "postgres://app:***@db1/billing");
        assert_eq!(new.store.backend, running.store.backend);
        assert!(!format!("{pending:?}").contains("pw-"), "{pending:?}");

        // Only the password changed: named, never shown.
        let mut new = config(&PG.replace("pw-1", "pw-2"));
        let pending = Fixed::of(&running).pin(&mut new);
        assert_eq!(pending.len(), 1, "{pending:?}");
        assert_eq!(
            pending[0].file,
            "postgres://app:***@db1/billing (another password)"
        );

        // From redb to postgres and back.
        let redb = config("");
        let mut new = config(PG);
        let pending = Fixed::of(&redb).pin(&mut new);
        assert_eq!(pending.len(), 1, "{pending:?}");
        assert_eq!(pending[0].setting, "store.backend");
        assert_eq!(pending[0].file, "postgres postgres://app:***@db1/billing");
        assert_eq!(pending[0].running, "redb");
        assert_eq!(new.store.backend, Backend::Redb);
        let mut new = config("");
        let pending = Fixed::of(&running).pin(&mut new);
        assert_eq!(pending[0].setting, "store.backend");
        assert_eq!(new.store.backend, running.store.backend);

        let mut same = config(PG);
        assert!(Fixed::of(&running).pin(&mut same).is_empty());
    }
}
