//! SIGINT and SIGTERM: the first starts a graceful drain, the second quits at once.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Cancels `token` on the first SIGINT or SIGTERM; exits the process on the second.
pub fn watch(token: CancellationToken) -> std::io::Result<()> {
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
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        warn!(signal = name, "second signal, quitting now");
        std::process::exit(130);
    });
    Ok(())
}
