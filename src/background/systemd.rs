//! systemd's service notifications (`Type=notify`, `WatchdogSec=`): READY=1 once the gateway
//! has its lists loaded and its workers serving, WATCHDOG=1 from the runtime at half the
//! watchdog interval (a stuck runtime misses it, and systemd restarts the service), and
//! STOPPING=1 when shutdown begins. Without `NOTIFY_SOCKET` each is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::debug;

fn send(state: NotifyState) {
    if let Err(e) = sd_notify::notify(false, &[state]) {
        debug!(error = %e, "cannot notify systemd");
    }
}

/// The gateway serves.
pub fn ready() {
    send(NotifyState::Ready);
}

/// Shutdown has begun.
pub fn stopping() {
    send(NotifyState::Stopping);
}

/// Keeps systemd's watchdog fed while the runtime runs (returns at once without one).
pub async fn watchdog() {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_micros(usec / 2));
    loop {
        tick.tick().await;
        send(NotifyState::Watchdog);
    }
}
