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
