//! systemd's service notifications (`Type=notify`, `WatchdogSec=`): READY=1 once the gateway
//! has its lists loaded and its workers serving, WATCHDOG=1 from the runtime at half the
//! watchdog interval (a stuck runtime misses it, and systemd restarts the service), and
//! STOPPING=1 when shutdown begins; after an upgrade, MAINPID= names the new process. Without
//! `NOTIFY_SOCKET` each is a no-op.

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

/// After an upgrade: the service's main process is now `pid` (the unit needs
/// `NotifyAccess=all` for the new process's own notices).
pub fn main_pid(pid: u32) {
    send(NotifyState::MainPid(pid));
}

/// The watchdog interval, when systemd watches this process: `WATCHDOG_PID` names it, or
/// names the process this one upgraded (which set it, not knowing the new pid). Decided at
/// the first call, at start: the process this one upgraded exits soon after.
fn watchdog_usec() -> Option<u64> {
    static DECIDED: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *DECIDED.get_or_init(|| {
        let usec = std::env::var("WATCHDOG_USEC").ok()?.parse::<u64>().ok()?;
        let pid = std::env::var("WATCHDOG_PID").ok()?.parse::<u32>().ok()?;
        let ours = pid == std::process::id() || Some(pid) == crate::serve::worker::upgrading_from();
        (ours && usec > 0).then_some(usec)
    })
}

/// Whether systemd's watchdog watches this process (an upgrade's new process then takes it
/// over: `WATCHDOG_PID` names its parent, this one).
pub fn watched() -> bool {
    watchdog_usec().is_some()
}

/// Keeps systemd's watchdog fed while the runtime runs (returns at once without one).
pub async fn watchdog() {
    let Some(usec) = watchdog_usec() else {
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_micros(usec / 2));
    loop {
        tick.tick().await;
        send(NotifyState::Watchdog);
    }
}
