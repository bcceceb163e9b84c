//! Logs: `tracing` to stderr, human-readable on a terminal, JSON otherwise or when asked.
//!
//! Lines are formatted where they happen and appended to a buffer of at most
//! [`LOG_BUFFER`] bytes; a thread of its own takes the whole buffer at once (swapping in
//! an empty one) and writes it to stderr. So an event never waits on stderr, and a slow
//! or blocked stderr costs at most two buffers of memory: a line that does not fit is
//! dropped and counted (`provisiond_log_lines_dropped_total`).

use std::io::IsTerminal as _;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Most bytes of log lines waiting for stderr (the writer may hold as many again while
/// it writes them).
pub const LOG_BUFFER: usize = 1 << 20;
/// How long dropping the [`LogGuard`] waits for stderr to take what is queued.
const FLUSH_WAIT: Duration = Duration::from_secs(2);

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Pretty on a terminal, JSON otherwise.
    #[default]
    Auto,
    /// One JSON object per line, fields at the top level.
    Json,
    /// Human-readable lines.
    Pretty,
}

/// Installs the global subscriber. The level comes from `level` (`--log-level`), else
/// `RUST_LOG`, else `info`. A bare level (`debug`) applies to provisiond's own lines, with
/// the libraries it uses kept at `warn`; a filter (`info,hyper=debug`) is used as given.
///
/// Lines are formatted where they happen but written by a thread of their own, in
/// batches: an event's path never waits on stderr. Keep the returned guard until exit;
/// dropping it flushes what is queued. If stderr cannot keep up (over [`LOG_BUFFER`]
/// bytes behind), lines are dropped and counted rather than slowing the billing down.
pub fn init(format: LogFormat, level: Option<&str>) -> anyhow::Result<LogGuard> {
    let filter = match level {
        Some(level) => EnvFilter::try_new(scoped(level))
            .map_err(|e| anyhow::anyhow!("invalid --log-level {level:?}: {e}"))?,
        None => match std::env::var("RUST_LOG") {
            Ok(value) if !value.trim().is_empty() => EnvFilter::try_new(scoped(&value))
                .unwrap_or_else(|e| {
                    eprintln!("provisiond: ignoring RUST_LOG={value:?}: {e}; logging at info");
                    EnvFilter::new("info")
                }),
            _ => EnvFilter::new(scoped("info")),
        },
    };
    let terminal = std::io::stderr().is_terminal();
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !terminal,
    };
    let (writer, guard) = Lines::start(std::io::stderr(), LOG_BUFFER)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let result = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init()
    } else {
        builder.with_ansi(terminal).with_target(false).try_init()
    };
    result.map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))?;
    Ok(guard)
}

/// The log lines waiting for the writer thread, shared by every thread that logs.
struct Queue {
    state: Mutex<Queued>,
    /// The writer waits on it while the buffer is empty.
    wake: Condvar,
    cap: usize,
}

struct Queued {
    buf: Vec<u8>,
    closed: bool,
}

/// The subscriber's writer: appends each formatted line to the queue, or drops it when
/// the queue is full.
#[derive(Clone)]
pub struct Lines(Arc<Queue>);

impl Lines {
    /// Starts the writer thread that moves queued lines to `out`.
    fn start<W: std::io::Write + Send + 'static>(
        mut out: W,
        cap: usize,
    ) -> anyhow::Result<(Self, LogGuard)> {
        let queue = Arc::new(Queue {
            state: Mutex::new(Queued {
                buf: Vec::new(),
                closed: false,
            }),
            wake: Condvar::new(),
            cap,
        });
        let (done_tx, done) = std::sync::mpsc::channel();
        let shared = queue.clone();
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || {
                let mut taken = Vec::new();
                loop {
                    {
                        let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
                        while state.buf.is_empty() && !state.closed {
                            state = shared.wake.wait(state).unwrap_or_else(|e| e.into_inner());
                        }
                        if state.buf.is_empty() {
                            break;
                        }
                        std::mem::swap(&mut state.buf, &mut taken);
                    }
                    // Nowhere to report a failing stderr: the lines are lost.
                    let _ = out.write_all(&taken).and_then(|()| out.flush());
                    taken.clear();
                    // A burst's buffer is not kept for good.
                    taken.shrink_to(64 << 10);
                }
                let _ = done_tx.send(());
            })
            .map_err(|e| anyhow::anyhow!("cannot start the log writer thread: {e}"))?;
        Ok((Self(queue.clone()), LogGuard { queue, done }))
    }
}

impl std::io::Write for &Lines {
    /// Takes a whole formatted line (the subscriber writes each line in one call).
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let queue = &self.0;
        let mut state = queue.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.buf.len() + line.len() > queue.cap {
            drop(state);
            crate::metrics::log_lines_dropped(1);
            return Ok(line.len());
        }
        let was_empty = state.buf.is_empty();
        state.buf.extend_from_slice(line);
        drop(state);
        if was_empty {
            queue.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Lines {
    type Writer = &'a Lines;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

/// Keep it until exit: dropping it writes what is queued (waiting at most a couple of
/// seconds for stderr) and stops the writer thread.
pub struct LogGuard {
    queue: Arc<Queue>,
    done: std::sync::mpsc::Receiver<()>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.queue
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed = true;
        self.queue.wake.notify_one();
        let _ = self.done.recv_timeout(FLUSH_WAIT);
    }
}

/// `debug` means provisiond's debug lines, not every dependency's: a bare level becomes
/// `warn,provisiond=<level>` (or stays as it is when it is at most `warn`).
fn scoped(filter: &str) -> String {
    let level = filter.trim().to_ascii_lowercase();
    match level.as_str() {
        "debug" | "trace" | "info" => format!("warn,provisiond={level}"),
        _ => filter.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::{Lines, scoped};

    /// A writer that blocks until told to go on, like a pipe nobody reads.
    struct Stuck(
        std::sync::mpsc::Receiver<()>,
        std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    );

    impl std::io::Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.recv();
            self.1.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_blocked_stderr_costs_dropped_lines_not_memory() {
        let (go, gate) = std::sync::mpsc::channel();
        let written = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (lines, guard) = Lines::start(Stuck(gate, written.clone()), 1000).unwrap();
        let line = [b'x'; 99];
        let mut w = &lines;
        // The first line may already be with the (blocked) writer thread.
        for _ in 0..10_000 {
            w.write_all(&line).unwrap();
            w.write_all(b"\n").unwrap();
        }
        let queued = lines.0.state.lock().unwrap().buf.len();
        assert!(queued <= 1000, "{queued} bytes queued");
        for _ in 0..100 {
            let _ = go.send(());
        }
        drop(go);
        drop(guard);
        let written = written.lock().unwrap().len();
        assert!(written > 0 && written <= 2000, "{written} bytes written");
    }

    #[test]
    fn bare_levels_scope_to_provisiond() {
        assert_eq!(scoped("debug"), "warn,provisiond=debug");
        assert_eq!(scoped("INFO"), "warn,provisiond=info");
        assert_eq!(scoped("warn"), "warn");
        assert_eq!(scoped("info,hyper=debug"), "info,hyper=debug");
    }
}
