//! What the commands print, on stdout and stderr, without the panic of `println!` when a
//! stream is gone. Rust ignores SIGPIPE, so a reader that stops early (`provisiond
//! executions | head`) is an EPIPE error on the next write: the output ends there,
//! quietly, as it ends other Unix tools, and the command's exit code stays what it would
//! have been (`check` on a bad file still fails). Any other write error on stdout (a
//! full disk) is said once on stderr and fails the command ([`exit_code`]). A failed
//! write to stderr, where only diagnostics go, just ends them. `run` logs through
//! `telemetry` and does not print this way.

use std::fmt;
use std::io::{self, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU8, Ordering};

/// A stream still written to.
const OPEN: u8 = 0;
/// A stream whose reader has gone (EPIPE): nothing more is written to it.
const CLOSED: u8 = 1;
/// A stream a write failed on otherwise: nothing more is written, and the command fails.
const FAILED: u8 = 2;

static STDOUT: AtomicU8 = AtomicU8::new(OPEN);
static STDERR: AtomicU8 = AtomicU8::new(OPEN);

/// Like `println!`, without the panic: see the module's doc.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::stdio::out(::std::format_args!("{}\n", ::std::format_args!($($arg)*)))
    };
}

/// Like `print!`, without the panic: see the module's doc.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::stdio::out(::std::format_args!($($arg)*))
    };
}

/// Like `eprintln!`, without the panic: see the module's doc.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::stdio::err(::std::format_args!("{}\n", ::std::format_args!($($arg)*)))
    };
}

/// Writes to stdout, unless it is gone; what [`outln!`] and [`out!`] call.
pub fn out(args: fmt::Arguments<'_>) {
    if let Err(e) = write(&STDOUT, &mut io::stdout().lock(), args) {
        errln!("provisiond: cannot write to stdout: {e}");
    }
}

/// Writes to stderr, unless it is gone; what [`errln!`] calls.
pub fn err(args: fmt::Arguments<'_>) {
    // Nowhere left to say that stderr failed: the exit code does not depend on it.
    let _ = write(&STDERR, &mut io::stderr().lock(), args);
}

/// Writes `args` and flushes (an error must show now, not at exit where std drops
/// it); the error when the stream has just failed for a reason other than EPIPE.
fn write(state: &AtomicU8, stream: &mut impl Write, args: fmt::Arguments<'_>) -> io::Result<()> {
    if state.load(Ordering::Relaxed) != OPEN {
        return Ok(());
    }
    match stream.write_fmt(args).and_then(|()| stream.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
            state.store(CLOSED, Ordering::Relaxed);
            Ok(())
        }
        Err(e) => {
            state.store(FAILED, Ordering::Relaxed);
            Err(e)
        }
    }
}

/// Whether stdout is gone (closed by its reader, or failed): a command that would print
/// on and on (`executions --follow`) stops.
pub fn stdout_gone() -> bool {
    STDOUT.load(Ordering::Relaxed) != OPEN
}

/// A command's exit code: `code`, or failure when a write to stdout failed for another
/// reason than its reader going away.
pub fn exit_code(code: ExitCode) -> ExitCode {
    if STDOUT.load(Ordering::Relaxed) == FAILED {
        ExitCode::FAILURE
    } else {
        code
    }
}
