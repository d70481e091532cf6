//! The last few hundred bans made on this gateway (by a jail, the API or the console), for
//! the console: a bounded ring of IP-keyed records, so each one goes after
//! `privacy.max_retention` at the latest, and `forget` erases the address's.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Mutex;

use ipnet::IpNet;

/// Bans kept at most.
pub const KEPT: usize = 300;

/// One ban as it was made.
#[derive(Debug, Clone, PartialEq)]
pub struct BanEvent {
    pub at_ms: u64,
    pub target: IpNet,
    /// The jail's name, or `api`.
    pub source: Box<str>,
    pub until_ms: u64,
}

#[derive(Default)]
pub struct BanLog {
    ring: Mutex<VecDeque<BanEvent>>,
}

impl BanLog {
    pub fn record(&self, event: BanEvent) {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.len() == KEPT {
            ring.pop_front();
        }
        ring.push_back(event);
    }

    /// The bans made within `retention_ms` of `now`, newest first; older ones are dropped.
    pub fn recent(&self, now: u64, retention_ms: u64) -> Vec<BanEvent> {
        self.prune(now, retention_ms);
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.iter().rev().cloned().collect()
    }

    /// Drops the records older than `retention_ms` (the sweeper calls it, so they go on
    /// time whether or not anyone looks).
    pub fn prune(&self, now: u64, retention_ms: u64) {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.retain(|e| now.saturating_sub(e.at_ms) < retention_ms);
    }

    /// The records of bans on `ip` or one of `targets`, newest first (lookup).
    pub fn of(&self, ip: IpAddr, targets: &[IpNet]) -> Vec<BanEvent> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.iter()
            .rev()
            .filter(|e| targets.contains(&e.target) || e.target == IpNet::from(ip))
            .cloned()
            .collect()
    }

    /// Erases the records of bans on `ip` itself or on one of `targets` (its own prefix);
    /// returns how many went.
    pub fn forget(&self, ip: IpAddr, targets: &[IpNet]) -> usize {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let before = ring.len();
        ring.retain(|e| !(targets.contains(&e.target) || e.target == IpNet::from(ip)));
        before - ring.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ban(at_ms: u64, target: &str) -> BanEvent {
        BanEvent {
            at_ms,
            target: target.parse().unwrap(),
            source: "wp-login".into(),
            until_ms: at_ms + 3_600_000,
        }
    }

    #[test]
    fn bounded_newest_first_within_retention_and_forgotten() {
        let log = BanLog::default();
        for i in 0..(KEPT as u64 + 50) {
            log.record(ban(i, "192.0.2.1/32"));
        }
        let all = log.recent(1_000, 10_000);
        assert_eq!(all.len(), KEPT);
        assert_eq!(all[0].at_ms, KEPT as u64 + 49);
        log.record(ban(5_000, "192.0.2.2/32"));
        // Past the retention, the old ones go.
        assert_eq!(log.recent(12_000, 10_000).len(), 1);
        log.record(ban(6_000, "192.0.2.3/32"));
        let ip: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(log.forget(ip, &[IpNet::from(ip)]), 1);
        let left = log.recent(12_000, 10_000);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].target.to_string(), "192.0.2.3/32");
    }
}
