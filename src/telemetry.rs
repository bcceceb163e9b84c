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
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

/// Most bytes of log lines waiting for stderr (the writer may hold as many again while
/// it writes them).
pub const LOG_BUFFER: usize = 1 << 20;
/// How long dropping the [`LogGuard`] waits for stderr to take what is queued.
const FLUSH_WAIT: Duration = Duration::from_secs(2);
/// How long the writer thread lets lines gather after each write: a line reaches
/// stderr at most this much later, and a full [`LOG_BUFFER`] each time still moves
/// about 100 MB/s, several times what the busiest sidecar logs. At 2,000 events/s a
/// millisecond's linger woke the thread (and whatever reads stderr) 750 times a second.
const LINGER: Duration = Duration::from_millis(10);

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
    // A bad RUST_LOG is said once logging is up, as a log line in the chosen format.
    let mut ignored = None;
    let filter = match level {
        Some(level) => EnvFilter::try_new(scoped(level))
            .map_err(|e| anyhow::anyhow!("invalid --log-level {level:?}: {e}"))?,
        None => match std::env::var("RUST_LOG") {
            Ok(value) if !value.trim().is_empty() => EnvFilter::try_new(scoped(&value))
                .unwrap_or_else(|e| {
                    ignored = Some((value, e.to_string()));
                    EnvFilter::new(scoped("info"))
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
        // The same lines as tracing-subscriber's own JSON format (flattened fields, the
        // current span), written directly: its formatter costs more than the event.
        builder
            .fmt_fields(SpanFields)
            .event_format(JsonLine)
            .try_init()
    } else {
        builder.with_ansi(terminal).with_target(false).try_init()
    };
    result.map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))?;
    if let Some((value, error)) = ignored {
        tracing::warn!(rust_log = %value, %error, "ignoring RUST_LOG; logging at info");
    }
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
    /// The writer waits on `wake`: only then is a notification worth its system call.
    waiting: bool,
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
                waiting: false,
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
                            state.waiting = true;
                            state = shared.wake.wait(state).unwrap_or_else(|e| e.into_inner());
                            state.waiting = false;
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
                    // Let lines gather: one wake-up and one write for every line of the
                    // next LINGER, instead of one for each line or two. The loggers
                    // wake the thread only while it waits on the queue (`waiting`), not
                    // while it sleeps here, so under load they make no system call.
                    std::thread::sleep(LINGER);
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
        state.buf.extend_from_slice(line);
        let waiting = std::mem::take(&mut state.waiting);
        drop(state);
        if waiting {
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

/// One JSON object per line: `timestamp`, `level`, the event's fields (`message` first),
/// `target`, and the current span's fields and name under `span`, as
/// tracing-subscriber's JSON format with `flatten_event` writes them, without building
/// a map per line.
struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        // RFC 3339 in UTC to the microsecond, as tracing-subscriber's `SystemTime` writes
        // it; humantime's formatter works on a fixed buffer, a fifth of the cost.
        write!(
            writer,
            "{{\"timestamp\":\"{}\",\"level\":\"{}\"",
            humantime::format_rfc3339_micros(std::time::SystemTime::now()),
            meta.level()
        )?;
        let mut fields = JsonFieldsOut {
            out: &mut writer,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_str(",\"target\":")?;
        json_str(&mut writer, meta.target())?;
        let span = event
            .parent()
            .and_then(|id| ctx.span(id))
            .or_else(|| ctx.lookup_current());
        if let Some(span) = span {
            writer.write_str(",\"span\":{")?;
            let extensions = span.extensions();
            // `SpanFields` keeps a span's fields as `,"name":value` each.
            if let Some(formatted) = extensions.get::<FormattedFields<N>>()
                && let Some(fields) = formatted.fields.strip_prefix(',')
            {
                writer.write_str(fields)?;
                writer.write_char(',')?;
            }
            writer.write_str("\"name\":")?;
            json_str(&mut writer, span.name())?;
            writer.write_char('}')?;
        }
        writer.write_str("}\n")
    }
}

/// How a span's fields are kept for the lines written inside it: `,"name":value` each,
/// as [`JsonLine`] puts them under `span`. (tracing-subscriber's JSON field formatter
/// builds a map for each span; an event's span costs as much as its line then.)
struct SpanFields;

impl<'w> FormatFields<'w> for SpanFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: Writer<'w>,
        fields: R,
    ) -> std::fmt::Result {
        let mut out = JsonFieldsOut {
            out: &mut writer,
            result: Ok(()),
        };
        fields.record(&mut out);
        out.result
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> std::fmt::Result {
        // Fields recorded later follow those the span was made with; a field recorded
        // again keeps only its new value, so that the span's keys stay unique.
        let mut added = String::new();
        self.format_fields(Writer::new(&mut added), fields)?;
        for (name, _) in span_entries(&added) {
            let old = span_entries(&current.fields)
                .find(|(n, _)| *n == name)
                .map(|(_, at)| at);
            if let Some(at) = old {
                current.fields.replace_range(at, "");
            }
        }
        current.fields.push_str(&added);
        Ok(())
    }
}

/// The `,"name":value` entries of a span's fields as [`SpanFields`] writes them: each
/// name, and the range of its whole entry. (Names are tracing's field names, which hold
/// no quote; a value is JSON, read to its end.)
fn span_entries(fields: &str) -> impl Iterator<Item = (&str, std::ops::Range<usize>)> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let start = at;
        let rest = fields.get(start..)?.strip_prefix(",\"")?;
        let (name, after) = rest.split_once("\":")?;
        let value_at = fields.len() - after.len();
        let mut values =
            serde_json::Deserializer::from_str(after).into_iter::<serde::de::IgnoredAny>();
        values.next()?.ok()?;
        at = value_at + values.byte_offset();
        Some((name, start..at))
    })
}

/// Writes each field of an event as `,"name":value`.
struct JsonFieldsOut<'a, 'w> {
    out: &'a mut Writer<'w>,
    result: std::fmt::Result,
}

impl JsonFieldsOut<'_, '_> {
    fn key(&mut self, field: &tracing::field::Field) -> std::fmt::Result {
        self.out.write_str(",\"")?;
        self.out.write_str(field.name())?;
        self.out.write_str("\":")
    }

    fn put(
        &mut self,
        f: impl FnOnce(&mut Writer<'_>) -> std::fmt::Result,
        field: &tracing::field::Field,
    ) {
        if self.result.is_ok() {
            self.result = self.key(field).and_then(|()| f(self.out));
        }
    }
}

impl tracing::field::Visit for JsonFieldsOut<'_, '_> {
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        if value.is_finite() {
            self.put(|w| write!(w, "{value}"), field);
        } else {
            self.put(|w| write!(w, "\"{value}\""), field);
        }
    }

    // Integers by `itoa`: a few of them on every event's line, where `write!` goes
    // through the formatting machinery for each.
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.put(|w| w.write_str(itoa::Buffer::new().format(value)), field);
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.put(|w| w.write_str(itoa::Buffer::new().format(value)), field);
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.put(|w| w.write_str(if value { "true" } else { "false" }), field);
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.put(|w| json_str(w, value), field);
    }

    fn record_error(
        &mut self,
        field: &tracing::field::Field,
        value: &(dyn std::error::Error + 'static),
    ) {
        self.put(|w| json_display(w, format_args!("{value}")), field);
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        // `%x` fields come here too, their Debug being their Display.
        self.put(|w| json_display(w, format_args!("{value:?}")), field);
    }
}

/// `text` as a JSON string.
fn json_str(out: &mut Writer<'_>, text: &str) -> std::fmt::Result {
    use std::fmt::Write as _;
    out.write_char('"')?;
    Escaped(out).write_str(text)?;
    out.write_char('"')
}

/// What `args` formats to, as a JSON string, escaped on the way.
fn json_display(out: &mut Writer<'_>, args: std::fmt::Arguments<'_>) -> std::fmt::Result {
    use std::fmt::Write as _;
    out.write_char('"')?;
    Escaped(out).write_fmt(args)?;
    out.write_char('"')
}

/// Escapes what is written to it for the inside of a JSON string.
struct Escaped<'a, 'w>(&'a mut Writer<'w>);

impl std::fmt::Write for Escaped<'_, '_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        // Most text needs no escape: one pass without early exit (which the compiler
        // can do many bytes at a time) says so, and it is copied whole.
        let plain = s.bytes().fold(true, |plain, b| {
            plain & (b >= 0x20) & (b != b'"') & (b != b'\\')
        });
        if plain {
            return self.0.write_str(s);
        }
        let mut start = 0;
        for (i, b) in s.bytes().enumerate() {
            let escape = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..0x20 => "",
                _ => continue,
            };
            self.0.write_str(&s[start..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            start = i + 1;
        }
        self.0.write_str(&s[start..])
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
    fn json_lines_escape_and_carry_the_span() {
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || Sink(sink.clone()))
            .fmt_fields(super::SpanFields)
            .event_format(super::JsonLine)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("event", id = %"evt_1", late = tracing::field::Empty);
            span.record("late", "first, \"then\",\"x\":");
            span.record("late", "a \"b\"");
            let _entered = span.enter();
            tracing::info!(text = "a \"q\" \\ \n\u{1}é", n = 3u64, f = 0.5, b = true, shown = %"x\ty", "hi");
        });
        let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        // Recorded twice, kept once: the last value.
        assert_eq!(text.matches("\"late\":").count(), 1, "{text}");
        let line: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(line["message"], "hi");
        assert_eq!(line["text"], "a \"q\" \\ \n\u{1}é");
        assert_eq!(
            (line["n"].clone(), line["f"].clone(), line["b"].clone()),
            (3.into(), 0.5.into(), true.into())
        );
        assert_eq!(line["shown"], "x\ty");
        assert_eq!(line["level"], "INFO");
        assert_eq!(
            line["span"],
            serde_json::json!({"id": "evt_1", "late": "a \"b\"", "name": "event"})
        );
        // UTC to the microsecond, as tracing-subscriber's JSON lines have it.
        let stamp = line["timestamp"].as_str().unwrap();
        assert_eq!(stamp.len(), "2026-12-01T19:45:00.123456Z".len(), "{line}");
        assert!(stamp.ends_with('Z'), "{line}");
        let at = humantime::parse_rfc3339(stamp).unwrap();
        let off = std::time::SystemTime::now()
            .duration_since(at)
            .unwrap_or_default();
        assert!(off < std::time::Duration::from_secs(60), "{line}");
    }

    struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
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
    fn a_line_logged_while_the_writer_waits_wakes_it() {
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (lines, _guard) = Lines::start(Sink(buf.clone()), 1000).unwrap();
        let mut w = &lines;
        for round in 1..=3 {
            // Long enough for the writer to be waiting on the queue again.
            std::thread::sleep(super::LINGER * 5);
            w.write_all(format!("line {round}\n").as_bytes()).unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while buf.lock().unwrap().len() < 7 * round {
                assert!(
                    std::time::Instant::now() < deadline,
                    "line {round} not written: {:?}",
                    String::from_utf8_lossy(&buf.lock().unwrap())
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        assert_eq!(&*buf.lock().unwrap(), b"line 1\nline 2\nline 3\n");
    }

    #[test]
    fn bare_levels_scope_to_provisiond() {
        assert_eq!(scoped("debug"), "warn,provisiond=debug");
        assert_eq!(scoped("INFO"), "warn,provisiond=info");
        assert_eq!(scoped("warn"), "warn");
        assert_eq!(scoped("info,hyper=debug"), "info,hyper=debug");
    }
}
