//! Process signals: SIGTERM and SIGINT (ctrl-c) start a graceful shutdown; SIGHUP reloads
//! the config.

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

/// Reloads the config on every SIGHUP, for as long as the process runs.
pub async fn reload_on_hangup(state: std::sync::Arc<crate::state::AppState>) {
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        match state.reload() {
            Ok(restart) if restart.is_empty() => tracing::info!("config reloaded"),
            Ok(restart) => tracing::info!(
                restart_required = %restart.join(", "),
                "config reloaded; some changes take effect only at restart"
            ),
            Err(errors) => {
                tracing::error!("reload refused, the previous config stays in force:\n{errors}")
            }
        }
    }
}

/// Upgrades on every SIGUSR2, as nginx does (`ipgate upgrade` says why one failed; this
/// logs it).
pub async fn upgrade_on_signal(upgrader: std::sync::Arc<crate::background::upgrade::Upgrader>) {
    let Ok(mut usr2) = signal(SignalKind::user_defined2()) else {
        return;
    };
    while usr2.recv().await.is_some() {
        // The upgrader logs the outcome.
        let _ = upgrader.upgrade().await;
    }
}
