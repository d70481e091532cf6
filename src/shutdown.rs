//! Process signals: SIGTERM and SIGINT (ctrl-c) start a graceful shutdown.

use tokio::signal::unix::{signal, SignalKind};

/// Completes when the process is asked to stop.
pub async fn terminate() {
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
