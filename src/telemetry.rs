//! Logs: `tracing` to stderr, human-readable on a terminal, JSON otherwise or when asked.

use std::io::IsTerminal as _;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

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
/// dropping it flushes what is queued. If stderr cannot keep up at all (over 128k lines
/// behind), lines are dropped rather than slowing the billing down.
pub fn init(format: LogFormat, level: Option<&str>) -> anyhow::Result<WorkerGuard> {
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
    let (writer, guard) =
        tracing_appender::non_blocking(std::io::BufWriter::new(std::io::stderr()));
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
    use super::scoped;

    #[test]
    fn bare_levels_scope_to_provisiond() {
        assert_eq!(scoped("debug"), "warn,provisiond=debug");
        assert_eq!(scoped("INFO"), "warn,provisiond=info");
        assert_eq!(scoped("warn"), "warn");
        assert_eq!(scoped("info,hyper=debug"), "info,hyper=debug");
    }
}
