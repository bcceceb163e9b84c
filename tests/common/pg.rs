//! Throwaway PostgreSQL servers for the tests: `initdb` in a temp dir under `/tmp`, a
//! postmaster on a loopback port, removed again when the [`PgServer`] is dropped.
//!
//! The binaries come from `PROVISIOND_PG_BIN` when set, else from the highest
//! `/usr/lib/postgresql/*/bin` (Debian's `postgresql` package; `.ci/run` installs it).
//! Without them [`installed`] says so and returns `false` (the test then passes without
//! running), except under CI (`CI` set), where it panics.
//!
//! The server refuses to run as root, and the tests do run as root in CI: every server
//! program then runs as the `postgres` OS user, and the temp dir is handed to it.
//!
//! The postmaster is started directly as a child of the test process (`postgres -D`,
//! with its output in `postgres.log`), not through `pg_ctl start`, which leaves it to be
//! reaped by PID 1: in some containers PID 1 reaps nothing, and a zombie postmaster's
//! pid in `postmaster.pid` would keep a restart on the same data dir from starting.
//! Readiness is waited for the way `pg_ctl -w` does it: `postmaster.pid` says `ready`.
//!
//! Every test starts its own servers: one takes about half a second to start (`initdb
//! --no-sync` and the first start), and a shared server would be one that a test
//! killing or stopping it takes from the others, and that no static is ever dropped to
//! stop. `fsync` stays on (the default), since durability is what the tests are about;
//! only `initdb`'s own final sync is skipped (the machine does not crash in a test).
//!
//! The helpers block (they run programs and wait); from an async test, call the slow
//! ones (start, kill, restart, promote) through `tokio::task::spawn_blocking` when
//! other tasks of the test must keep running meanwhile, e.g. under load.

use std::fs;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a server may take to start, stop or promote on a busy machine.
const WAIT: Duration = Duration::from_secs(60);

/// The directory of the PostgreSQL programs: `PROVISIOND_PG_BIN`, else the highest
/// version under `/usr/lib/postgresql/`; `None` when there is none.
pub(crate) fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PROVISIOND_PG_BIN") {
        let dir = PathBuf::from(dir);
        return dir.join("initdb").exists().then_some(dir);
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry
                .file_name()
                .to_str()?
                .split('.')
                .map(|part| part.parse().ok())
                .collect::<Option<Vec<u32>>>()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// Whether PostgreSQL is installed. When it is not: under CI (`CI` set) a panic, else a
/// note on stderr and `false`, and the calling test should return (pass) at once.
pub(crate) fn installed() -> bool {
    if bin_dir().is_some() {
        return true;
    }
    let message = "the PostgreSQL tests need PostgreSQL's programs (apt-get install \
                   postgresql, or PROVISIOND_PG_BIN set to the directory of initdb)";
    if std::env::var_os("CI").is_some() {
        panic!("{message}; .ci/run installs them");
    }
    // Past the test harness's capture, so that the note shows in `cargo test`.
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "note: {message}; skipping this test");
    false
}

/// The uid and gid the server programs run as: the `postgres` OS user when this process
/// is root, `None` (run as ourselves) otherwise.
fn server_user() -> Option<(u32, u32)> {
    let euid = fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0);
    if euid != 0 {
        return None;
    }
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let ids = passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&"postgres") && fields.len() > 3)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    });
    Some(ids.expect(
        "the tests run as root and PostgreSQL refuses root: they need a `postgres` OS \
         user to run it as (Debian's postgresql package creates one)",
    ))
}

/// A command for a PostgreSQL program, run as the server's user, with no `PG*`
/// variables of ours leaking into it.
fn command(bin: &Path, program: &str, cwd: &Path) -> Command {
    let mut command = Command::new(bin.join(program));
    command.current_dir(cwd).stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            command.env_remove(key);
        }
    }
    if let Some((uid, gid)) = server_user() {
        command.uid(uid).gid(gid);
    }
    command
}

/// Runs a command to the end; its stdout, or a panic showing what it printed.
fn run(mut command: Command, what: &str) -> String {
    let output = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run it: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Hands a path to the server's user.
fn give(path: &Path) {
    if let Some((uid, gid)) = server_user() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    }
}

/// Whether a process is gone (or a zombie, which holds nothing but its pid).
fn gone(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// The pids of the live children of `pid`.
fn children(pid: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&child| {
            fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    let (_, rest) = stat.rsplit_once(')')?;
                    let mut fields = rest.split_whitespace();
                    let state = fields.next()?;
                    let ppid: i32 = fields.next()?.parse().ok()?;
                    Some(ppid == pid && state != "Z")
                })
                .unwrap_or(false)
        })
        .collect()
}

fn signal(pid: i32, signal: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
}

/// A throwaway PostgreSQL server on `127.0.0.1`, superuser `postgres` with trust auth.
pub(crate) struct PgServer {
    /// The TCP port it listens on; it stays the same across [`Self::restart`].
    pub port: u16,
    bin: PathBuf,
    /// The data directory.
    pub data: PathBuf,
    /// The server's log (all its runs, appended).
    pub log: PathBuf,
    postmaster: Option<Child>,
    dir: TempDir,
}

impl PgServer {
    /// A fresh cluster (`initdb`), started. Panics when PostgreSQL is not installed:
    /// check [`installed`] first.
    pub(crate) fn start() -> Self {
        let mut server = Self::init("");
        server.start_postmaster();
        server
    }

    /// A fresh cluster with TLS on (`ssl = on`), its certificate and key the test
    /// fixtures' (`tests/fixtures/localhost-*.pem`: self-signed, for `127.0.0.1`), and
    /// client certificates signed by `pg-client-ca.pem` trusted (asked for only where
    /// pg_hba.conf says `cert`, see [`Self::hba_first`]), started.
    pub(crate) fn start_with_tls() -> Self {
        Self::start_with_tls_serving("localhost-cert.pem", "localhost-key.pem")
    }

    /// [`Self::start_with_tls`] with another certificate and key of the fixtures.
    pub(crate) fn start_with_tls_serving(cert: &str, key: &str) -> Self {
        let mut server = Self::init(
            "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
             ssl_ca_file = 'client-ca.crt'",
        );
        for (fixture, name) in [
            (cert, "server.crt"),
            (key, "server.key"),
            ("pg-client-ca.pem", "client-ca.crt"),
        ] {
            let to = server.data.join(name);
            let from = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures")
                .join(fixture);
            fs::copy(from, &to).unwrap();
            // The server refuses a key others can read.
            fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
            give(&to);
        }
        server.start_postmaster();
        server
    }

    /// A fresh, not yet started cluster with `extra` appended to its postgresql.conf.
    fn init(extra: &str) -> Self {
        let server = Self::empty();
        let mut initdb = command(&server.bin, "initdb", server.dir.path());
        initdb
            .arg("-D")
            .arg(&server.data)
            .args([
                "--auth=trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-locale",
            ])
            .arg("--no-sync");
        run(initdb, "initdb");
        server.configure(extra);
        server
    }

    /// A temp dir for a server (owned by the server's user), a port, no cluster yet.
    fn empty() -> Self {
        let bin = bin_dir().expect("PostgreSQL is installed (check pg::installed() first)");
        // Under /tmp (sticky, world-traversable) whatever TMPDIR says: the server's
        // user must reach it.
        let dir = tempfile::Builder::new()
            .prefix("provisiond-pg-")
            .tempdir_in("/tmp")
            .unwrap();
        give(dir.path());
        let socket = dir.path().join("socket");
        fs::create_dir(&socket).unwrap();
        give(&socket);
        // Held for the life of the test process (see `free_addr`): no other test or
        // connection is given this port, and a restart can bind it again.
        let port = super::free_addr().port();
        Self {
            port,
            bin,
            data: dir.path().join("data"),
            log: dir.path().join("postgres.log"),
            postmaster: None,
            dir,
        }
    }

    /// The settings every server gets, then `extra`, appended to postgresql.conf.
    fn configure(&self, extra: &str) {
        let conf = format!(
            "\n# provisiond tests\nlisten_addresses = '127.0.0.1'\nport = {}\n\
             unix_socket_directories = '{}'\nshared_buffers = 16MB\nmax_connections = 100\n\
             fsync = on\nlogging_collector = off\nlog_min_messages = warning\n{extra}\n",
            self.port,
            self.dir.path().join("socket").display(),
        );
        let path = self.data.join("postgresql.conf");
        let mut text = fs::read_to_string(&path).unwrap();
        text.push_str(&conf);
        fs::write(&path, text).unwrap();
    }

    /// Starts the postmaster and waits until it accepts connections.
    fn start_postmaster(&mut self) {
        assert!(self.postmaster.is_none(), "the server is already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        give(&self.log);
        let mut postgres = command(&self.bin, "postgres", self.dir.path());
        postgres
            .arg("-D")
            .arg(&self.data)
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let mut child = postgres.spawn().expect("postgres starts");
        let until = Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "postgres exited ({status}) instead of starting; its log:\n{}",
                    self.log_text()
                );
            }
            // What `pg_ctl -w start` waits for: the 8th line of postmaster.pid.
            let pid_file = fs::read_to_string(self.data.join("postmaster.pid")).unwrap_or_default();
            let mine = pid_file.lines().next() == Some(&child.id().to_string());
            if mine && pid_file.lines().nth(7).map(str::trim) == Some("ready") {
                break;
            }
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                panic!("postgres did not get ready; its log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.postmaster = Some(child);
    }

    /// Puts `line` first in pg_hba.conf (it then decides for the connections it
    /// matches) and reloads the server's configuration.
    pub(crate) fn hba_first(&self, line: &str) {
        let path = self.data.join("pg_hba.conf");
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, format!("{line}\n{text}")).unwrap();
        self.psql("postgres", "SELECT pg_reload_conf()");
    }

    /// The server's log so far.
    pub(crate) fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The postmaster's pid, while it runs.
    pub(crate) fn pid(&self) -> Option<i32> {
        self.postmaster
            .as_ref()
            .map(|c| i32::try_from(c.id()).expect("a pid fits i32"))
    }

    /// Whether the server is running (as far as this harness knows).
    pub(crate) fn is_running(&self) -> bool {
        self.postmaster.is_some()
    }

    /// `host:port` of the server.
    pub(crate) fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A URL for database `db` as the superuser `postgres`, over the unix socket.
    pub(crate) fn socket_url(&self, db: &str) -> String {
        format!(
            "postgres:///{db}?host={}&port={}&user=postgres",
            self.dir.path().join("socket").display(),
            self.port
        )
    }

    /// A URL for database `db` as the superuser `postgres`.
    pub(crate) fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs SQL with `psql` on database `db` (stops at the first error); the rows it
    /// printed, unaligned, `|` between columns, one per line.
    pub(crate) fn psql(&self, db: &str, sql: &str) -> String {
        let mut psql = Command::new(self.bin.join("psql"));
        psql.stdin(Stdio::null())
            .env("PGCONNECT_TIMEOUT", "10")
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-U", "postgres"])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-d")
            .arg(db)
            .arg("-c")
            .arg(sql);
        run(psql, &format!("psql on port {} ({sql})", self.port))
            .trim_end()
            .to_owned()
    }

    /// Creates database `name` (UTF8); its URL.
    pub(crate) fn create_database(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
        self.url(name)
    }

    /// A tokio-postgres client on database `db` (its connection runs on a task).
    pub(crate) async fn connect(&self, db: &str) -> tokio_postgres::Client {
        connect(&self.url(db)).await
    }

    /// Kills the server the way a crashed machine loses it: SIGKILL to the postmaster
    /// and every process it started (stopped first, so that it forks no more), no
    /// shutdown checkpoint; returns once all are gone and the port is closed. The data
    /// dir stays as it was: [`Self::restart`] runs crash recovery on it.
    pub(crate) fn kill_9(&mut self) {
        let Some(mut postmaster) = self.postmaster.take() else {
            panic!("kill_9: the server is not running");
        };
        let pid = i32::try_from(postmaster.id()).expect("a pid fits i32");
        use nix::sys::signal::Signal;
        signal(pid, Signal::SIGSTOP);
        let children = children(pid);
        signal(pid, Signal::SIGKILL);
        for &child in &children {
            signal(child, Signal::SIGKILL);
        }
        let _ = postmaster.wait();
        let until = Instant::now() + WAIT;
        while !children.iter().all(|&c| gone(c)) || self.port_open() {
            assert!(
                Instant::now() < until,
                "the killed server's processes did not go away"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Freezes the server (SIGSTOP to the postmaster and every process it started), as
    /// a hung machine or a network that drops packets looks: connections stay open and
    /// nothing answers. [`Self::thaw`] lets it go on.
    pub(crate) fn freeze(&self) {
        for pid in self.processes() {
            signal(pid, nix::sys::signal::Signal::SIGSTOP);
        }
    }

    pub(crate) fn thaw(&self) {
        for pid in self.processes() {
            signal(pid, nix::sys::signal::Signal::SIGCONT);
        }
    }

    /// The postmaster and the processes it started.
    fn processes(&self) -> Vec<i32> {
        let postmaster = self.postmaster.as_ref().expect("the server is running");
        let pid = i32::try_from(postmaster.id()).expect("a pid fits i32");
        std::iter::once(pid).chain(children(pid)).collect()
    }

    /// Whether something accepts connections on the server's port.
    pub(crate) fn port_open(&self) -> bool {
        std::net::TcpStream::connect_timeout(
            &([127, 0, 0, 1], self.port).into(),
            Duration::from_millis(200),
        )
        .is_ok()
    }

    /// Stops the server cleanly (fast shutdown: sessions are ended, a checkpoint is
    /// written) and waits for it to exit.
    pub(crate) fn stop(&mut self) {
        self.shut_down(nix::sys::signal::Signal::SIGINT);
    }

    /// Stops the server with `signal` (SIGTERM smart, SIGINT fast, SIGQUIT immediate)
    /// and waits; then kills what is left.
    fn shut_down(&mut self, how: nix::sys::signal::Signal) {
        let Some(mut postmaster) = self.postmaster.take() else {
            return;
        };
        let pid = i32::try_from(postmaster.id()).expect("a pid fits i32");
        signal(pid, how);
        let until = Instant::now() + WAIT;
        while postmaster.try_wait().ok().flatten().is_none() {
            if Instant::now() > until {
                self.postmaster = Some(postmaster);
                self.kill_9();
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the server again on the same data dir and port (after [`Self::stop`] or
    /// [`Self::kill_9`]).
    pub(crate) fn restart(&mut self) {
        self.start_postmaster();
    }

    /// A primary with one synchronous streaming standby (`standby1`, made with
    /// `pg_basebackup -R`), both running; returns once the primary reports the standby
    /// `sync` in `pg_stat_replication`, so that every commit acknowledged from now on is
    /// on both.
    pub(crate) fn start_primary_with_sync_standby() -> (Self, Self) {
        let mut primary = Self::init(
            "wal_level = replica\nmax_wal_senders = 5\nmax_replication_slots = 5\n\
             synchronous_standby_names = 'standby1'\nsynchronous_commit = on\n\
             wal_keep_size = 256MB\nhot_standby = on",
        );
        // initdb's pg_hba.conf allows replication from 127.0.0.1 already; said again so
        // that the harness does not depend on it.
        let hba = primary.data.join("pg_hba.conf");
        let mut text = fs::read_to_string(&hba).unwrap();
        text.push_str("\nhost replication postgres 127.0.0.1/32 trust\n");
        fs::write(&hba, text).unwrap();
        primary.start_postmaster();

        let mut standby = Self::empty();
        let mut basebackup = command(&standby.bin, "pg_basebackup", standby.dir.path());
        basebackup
            .arg("-D")
            .arg(&standby.data)
            .args([
                "-R",
                "-X",
                "stream",
                "--no-sync",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
            ])
            .arg("-p")
            .arg(primary.port.to_string());
        run(basebackup, "pg_basebackup");
        // The copied postgresql.conf is the primary's: the standby's own port and socket
        // dir override it (later settings win), and it waits for no standby of its own
        // once promoted.
        standby.configure("synchronous_standby_names = ''");
        // postgresql.auto.conf, read last, has the primary_conninfo `-R` wrote: this one,
        // after it, names the standby standby1.
        let auto = standby.data.join("postgresql.auto.conf");
        let mut text = fs::read_to_string(&auto).unwrap();
        text.push_str(&format!(
            "primary_conninfo = 'host=127.0.0.1 port={} user=postgres application_name=standby1'\n",
            primary.port
        ));
        fs::write(&auto, text).unwrap();
        standby.start_postmaster();

        let until = Instant::now() + WAIT;
        loop {
            let state = primary.psql(
                "postgres",
                "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby1'",
            );
            if state == "sync" {
                break;
            }
            assert!(
                Instant::now() < until,
                "the standby never became synchronous (sync_state {state:?}); its log:\n{}",
                standby.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        (primary, standby)
    }

    /// Promotes a standby to primary (`pg_ctl promote -w`): it returns once the server
    /// accepts writes.
    pub(crate) fn promote(&self) {
        assert!(self.is_running(), "promote: the standby is not running");
        let mut promote = command(&self.bin, "pg_ctl", self.dir.path());
        promote
            .arg("promote")
            .arg("-w")
            .args(["-t", "60"])
            .arg("-D")
            .arg(&self.data);
        run(promote, "pg_ctl promote");
        let until = Instant::now() + WAIT;
        while self.psql("postgres", "SELECT pg_is_in_recovery()") != "f" {
            assert!(
                Instant::now() < until,
                "the promoted standby stays in recovery"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The multi-host URL for database `db` on `servers`, tried in order, that only
/// settles for a server that takes writes: after a failover it finds the promoted
/// standby.
pub(crate) fn multi_host_url(servers: &[&PgServer], db: &str) -> String {
    let hosts: Vec<String> = servers.iter().map(|s| s.addr()).collect();
    format!(
        "postgres://postgres@{}/{db}?target_session_attrs=read-write&connect_timeout=5",
        hosts.join(",")
    )
}

/// A tokio-postgres client for `url` (its connection runs on a task); panics when it
/// cannot connect.
pub(crate) async fn connect(url: &str) -> tokio_postgres::Client {
    try_connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {}", describe(&e)))
}

/// A tokio-postgres error with the server's message, which its `Display` leaves out
/// ("db error").
pub(crate) fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{error}: {} ({})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}

/// A tokio-postgres client for `url`, or the error.
pub(crate) async fn try_connect(
    url: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // Immediate shutdown: nothing of a throwaway server is worth a checkpoint.
        self.shut_down(nix::sys::signal::Signal::SIGQUIT);
        // The TempDir goes next (root may remove the server user's files).
    }
}
