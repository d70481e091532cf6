//! Jails: count matching responses per client (IPv6 per prefix) within a window; at
//! `hits` the client earns a temporary block entry named after the jail, for
//! `ban × ban_factor^(earlier offenses)`, capped by `max_ban` and `privacy.max_retention`.
//! Counters live in a `BoundedMap`, so rotating addresses cannot exhaust memory; the
//! offense history lives in the state store.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use http::Method;
use prometheus::IntCounter;

use crate::config;
use crate::decide::clients::{BoundedMap, ClientKey, Touched};
use crate::decide::clock::now_ms;

/// A client's failures within the last `window`: their times (ms since the epoch), oldest
/// first, at most `hits` of them, so the window slides: `hits` failures within any
/// `window`-long span ban.
#[derive(Debug, Default, Clone)]
pub struct Counter {
    pub times: Vec<u64>,
}

impl Counter {
    /// Failures counted now.
    pub fn hits(&self) -> u32 {
        self.times.len() as u32
    }

    /// When the oldest counted failure was.
    pub fn start_ms(&self) -> u64 {
        self.times.first().copied().unwrap_or(0)
    }
}

impl Touched for Counter {
    fn last_ms(&self) -> u64 {
        self.times.last().copied().unwrap_or(0)
    }
}

/// Longest a client is marked as being banned, should the ban's write never end.
pub const BANNING_AT_MOST: Duration = Duration::from_secs(10);

pub struct Jail {
    pub config: config::Jail,
    counters: BoundedMap<Counter>,
    /// Watched requests of each client in flight now (`jail.concurrency`); a client is in
    /// the map only while it has one, so it holds no more entries than requests in flight.
    in_flight: Arc<DashMap<ClientKey, u32, foldhash::fast::RandomState>>,
    /// Clients whose ban is being made (the offense history read, the entry written): their
    /// watched requests are refused meanwhile, and their failures are not counted again.
    /// Each mark ends when the ban is in force, or after [`BANNING_AT_MOST`].
    banning: DashMap<ClientKey, u64, foldhash::fast::RandomState>,
    /// `ipgate_would_block_total{rule=NAME}` when the jail is a dry run.
    pub would_block: Option<IntCounter>,
}

/// A watched request's place among its client's, given back when its response is seen.
pub struct Watched {
    map: Arc<DashMap<ClientKey, u32, foldhash::fast::RandomState>>,
    key: ClientKey,
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let dashmap::Entry::Occupied(mut e) = self.map.entry(self.key) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
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
            in_flight: Arc::default(),
            banning: DashMap::default(),
            would_block,
        }
    }

    /// Whether a request is one this jail watches (its method, host and path), before its
    /// response is known.
    pub fn watches(&self, method: &Method, host: &str, path: &str) -> bool {
        let c = &self.config;
        c.log.is_none()
            && !c.challenge
            && c.method
                .as_ref()
                .is_none_or(|m| m.as_str().eq_ignore_ascii_case(method.as_str()))
            && path.starts_with(c.path.as_str())
            && (c.hosts.is_empty() || c.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)))
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
        self.watches(method, host, path)
            && (c.status.is_empty() || c.status.contains(&status))
            && c.location
                .as_deref()
                .is_none_or(|want| location.is_some_and(|l| l.contains(want)))
    }

    /// A place for a watched request of `key` among its `jail.concurrency` in flight, or
    /// `None` when they are all taken: then no burst outruns the jail, since at most
    /// `hits + concurrency` attempts reach the upstream before a ban.
    pub fn enter(&self, key: ClientKey) -> Option<Watched> {
        let mut n = self.in_flight.entry(key).or_insert(0);
        if *n >= self.config.concurrency {
            return None;
        }
        *n += 1;
        drop(n);
        Some(Watched {
            map: self.in_flight.clone(),
            key,
        })
    }

    /// Marks `key` as being banned, from the failure that earned the ban until the ban is in
    /// force ([`Jail::banned`]).
    pub fn banning(&self, key: ClientKey) {
        self.banning
            .insert(key, now_ms() + BANNING_AT_MOST.as_millis() as u64);
    }

    /// The ban of `key` is in force (or could not be made): the mark is lifted.
    pub fn banned(&self, key: ClientKey) {
        self.banning.remove(&key);
    }

    /// Whether `key`'s ban is being made now.
    pub fn is_banning(&self, key: ClientKey) -> bool {
        // One shard's read lock; the clock is read only for a marked client.
        match self.banning.get(&key).map(|until| *until) {
            Some(until) if until > now_ms() => true,
            Some(_) => {
                self.banning.remove(&key);
                false
            }
            None => false,
        }
    }

    /// Counts a failure; true when it makes `hits` within the last `window` (the count
    /// restarts).
    pub fn observe(&self, key: ClientKey) -> bool {
        self.observe_at(key, now_ms())
    }

    fn observe_at(&self, key: ClientKey, now: u64) -> bool {
        let window = self.config.window.as_millis() as u64;
        let hits = self.config.hits as usize;
        self.counters.with(key, |c| {
            c.times.retain(|&t| now.saturating_sub(t) < window);
            if c.times.len() >= hits {
                // Only when `hits` shrank on reload: keep the newest.
                c.times.drain(..=c.times.len() - hits);
            }
            c.times.push(now);
            if c.times.len() >= hits {
                c.times = Vec::new();
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

    /// The client's failures still inside the window, if any.
    pub fn counter(&self, key: ClientKey) -> Option<Counter> {
        let now = now_ms();
        let window = self.config.window.as_millis() as u64;
        let mut c = self.counters.get(key)?;
        c.times.retain(|&t| now.saturating_sub(t) < window);
        (!c.times.is_empty()).then_some(c)
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
            concurrency: 1,
            log: None,
            challenge: false,
        };
        Jail::new(c, 1000, IntCounter::new("e", "e").unwrap(), None)
    }

    /// "hits within window" slides: with hits = 3 and a 3 s window, failures at
    /// 0, 2.75, 3.15 and 3.15 s hold three within 0.4 s, which bans; a window fixed at the
    /// first failure restarted at 3 s and banned nobody.
    #[test]
    fn the_window_slides() {
        let mut j = jail(3);
        j.config.window = Duration::from_secs(3);
        let t0 = 1_000_000;
        assert!(!j.observe_at(7, t0));
        assert!(!j.observe_at(7, t0 + 2_750));
        assert!(!j.observe_at(7, t0 + 3_150), "0 s has left the window");
        assert!(
            j.observe_at(7, t0 + 3_150),
            "2.75, 3.15, 3.15 are within 3 s"
        );
        // Spread out, no three fall within 3 s: no ban.
        for k in 0..10 {
            assert!(!j.observe_at(8, t0 + k * 1_600), "failure {k}");
        }
    }

    #[test]
    fn watched_requests_are_capped_per_client_and_given_back() {
        let j = jail(3);
        let first = j.enter(7).expect("one in flight");
        assert!(
            j.enter(7).is_none(),
            "concurrency 1: a second waits its turn"
        );
        let other = j.enter(8);
        assert!(other.is_some(), "another client is not affected");
        drop(first);
        let again = j.enter(7);
        assert!(again.is_some());
        drop((again, other));
        assert!(
            j.in_flight.is_empty(),
            "no client is kept without a request"
        );
    }

    #[test]
    fn a_client_being_banned_is_marked_until_the_ban_is_in_force() {
        let j = jail(3);
        assert!(!j.is_banning(7));
        j.banning(7);
        assert!(j.is_banning(7) && !j.is_banning(8));
        j.banned(7);
        assert!(!j.is_banning(7));
        // A mark whose ban never came ends by itself.
        j.banning.insert(9, now_ms().saturating_sub(1));
        assert!(!j.is_banning(9));
        assert!(j.banning.is_empty(), "an ended mark is not kept");
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
