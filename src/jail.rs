//! Jails (SPEC 6): count matching responses per client (IPv6 per prefix) within a window; at
//! `hits` the client earns a temporary block entry named after the jail, for
//! `ban × ban_factor^(earlier offenses)`, capped by `max_ban` and `privacy.max_retention`.
//! Counters live in a [`BoundedMap`], so rotating addresses cannot exhaust memory; the
//! offense history lives in the state store.

use std::time::Duration;

use http::Method;
use prometheus::IntCounter;

use crate::clients::{BoundedMap, ClientKey, Touched};
use crate::clock::now_ms;
use crate::config;

/// A client's failures in its current window.
#[derive(Debug, Default, Clone)]
pub struct Counter {
    /// Start of the window (ms since the epoch): the first counted failure.
    pub start_ms: u64,
    pub hits: u32,
}

impl Touched for Counter {
    fn last_ms(&self) -> u64 {
        self.start_ms
    }
}

pub struct Jail {
    pub config: config::Jail,
    counters: BoundedMap<Counter>,
    /// `ipgate_would_block_total{rule=NAME}` when the jail is a dry run.
    pub would_block: Option<IntCounter>,
}

impl Jail {
    pub fn new(
        config: config::Jail,
        cap: usize,
        evictions: IntCounter,
        would_block: Option<IntCounter>,
    ) -> Jail {
        // A window that started `window` ago counts nothing any more.
        let counters = BoundedMap::new(cap, config.window, evictions);
        Jail {
            config,
            counters,
            would_block,
        }
    }

    /// Whether a response counts as a failure for this jail.
    pub fn matches(
        &self,
        method: &Method,
        host: &str,
        path: &str,
        status: u16,
        location: Option<&str>,
    ) -> bool {
        let c = &self.config;
        c.method.as_ref().is_none_or(|m| m == method)
            && path.starts_with(c.path.as_str())
            && (c.status.is_empty() || c.status.contains(&status))
            && (c.hosts.is_empty() || c.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)))
            && c.location
                .as_deref()
                .is_none_or(|want| location.is_some_and(|l| l.contains(want)))
    }

    /// Counts a failure; true when it makes `hits` within the window (the count restarts).
    pub fn observe(&self, key: ClientKey) -> bool {
        let now = now_ms();
        let window = self.config.window.as_millis() as u64;
        let hits = self.config.hits;
        self.counters.with(key, |c| {
            if c.hits == 0 || now.saturating_sub(c.start_ms) >= window {
                c.start_ms = now;
                c.hits = 0;
            }
            c.hits += 1;
            if c.hits >= hits {
                c.hits = 0;
                true
            } else {
                false
            }
        })
    }

    /// The ban for a client with `earlier` offenses: `ban × ban_factor^earlier`, capped.
    pub fn ban_for(&self, earlier: usize, max_retention: Duration) -> Duration {
        let c = &self.config;
        let factor = c.ban_factor.powi(earlier.min(64) as i32);
        let secs = (c.ban.as_secs_f64() * factor).min(c.max_ban.as_secs_f64());
        Duration::from_secs_f64(secs.max(1.0)).min(max_retention)
    }

    pub fn counter(&self, key: ClientKey) -> Option<Counter> {
        self.counters
            .get(key)
            .filter(|c| now_ms().saturating_sub(c.start_ms) < self.config.window.as_millis() as u64)
    }

    pub fn forget(&self, key: ClientKey) -> bool {
        self.counters.remove(key)
    }

    pub fn tracked(&self) -> usize {
        self.counters.len()
    }

    pub fn cap(&self) -> usize {
        self.counters.cap()
    }

    pub fn sweep(&self, now: u64) {
        self.counters.sweep(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jail(hits: u32) -> Jail {
        let c = config::Jail {
            name: "wp-login".into(),
            method: Some(Method::POST),
            path: "/wp-login.php".into(),
            hosts: vec![],
            location: None,
            status: vec![200],
            hits,
            window: Duration::from_secs(600),
            ban: Duration::from_secs(3600),
            ban_factor: 2.0,
            max_ban: Duration::from_secs(7 * 86400),
            dry_run: false,
            site_scoped: false,
            log: None,
        };
        Jail::new(c, 1000, IntCounter::new("e", "e").unwrap(), None)
    }

    #[test]
    fn matches_method_path_prefix_and_status() {
        let j = jail(3);
        let m = |method: &Method, path: &str, status: u16| {
            j.matches(method, "a.test", path, status, None)
        };
        assert!(m(&Method::POST, "/wp-login.php", 200));
        assert!(!m(&Method::GET, "/wp-login.php", 200));
        assert!(!m(&Method::POST, "/wp-login.php", 302));
        assert!(!m(&Method::POST, "/index.php", 200));
    }

    #[test]
    fn bans_at_hits_and_longer_for_repeat_offenders() {
        let j = jail(3);
        assert!(!j.observe(7));
        assert!(!j.observe(7));
        assert!(!j.observe(8));
        assert!(j.observe(7));
        assert!(!j.observe(7), "the count restarts after a ban");
        let year = Duration::from_secs(365 * 86400);
        assert_eq!(j.ban_for(0, year), Duration::from_secs(3600));
        assert_eq!(j.ban_for(1, year), Duration::from_secs(7200));
        assert_eq!(j.ban_for(3, year), Duration::from_secs(28800));
        assert_eq!(j.ban_for(20, year), Duration::from_secs(7 * 86400));
        assert_eq!(
            j.ban_for(20, Duration::from_secs(86400)),
            Duration::from_secs(86400)
        );
    }
}
