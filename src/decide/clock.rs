//! The one clock every expiry is measured on: wall-clock milliseconds since the Unix epoch,
//! because entries carry absolute expiry times across restarts (and, in a fleet, hosts).

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
