//! SIGINT and SIGTERM: the first starts a graceful drain, the second quits at once
//! (exit status 130 or 143, as if killed by the signal), killing the script handlers
//! still running.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Cancels `token` on the first SIGINT or SIGTERM; exits the process on the second.
pub(crate) fn watch(token: CancellationToken) -> std::io::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        info!(
            signal = name,
            "shutting down; a second signal quits at once"
        );
        token.cancel();
        let (name, code) = tokio::select! {
            _ = interrupt.recv() => ("SIGINT", 130),
            _ = terminate.recv() => ("SIGTERM", 143),
        };
        warn!(
            signal = name,
            "second signal, quitting now; scripts running are killed"
        );
        // No destructor runs on the way out: the scripts' guards would not kill them.
        crate::handlers::exec::kill_running();
        // 128 + the signal's number, as a shell reports a process killed by it.
        std::process::exit(code);
    });
    Ok(())
}
