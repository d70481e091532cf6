//! Requests refused per client over the last hour (blocked, denied, rate limited or
//! challenged at request level), for the console's "refused most" view: a bounded map of
//! IP-keyed counters that each go after an hour without a refusal, that `forget` erases and
//! `lookup` shows. Counted only on a refusal, never on a request that passes.

use std::time::Duration;

use prometheus::IntCounter;

use crate::decide::clients::{BoundedMap, ClientKey, Touched};

/// Clients counted at most.
pub const CAP: usize = 10_000;
/// A count covers an hour: older refusals start it again.
pub const HOUR_MS: u64 = 3_600_000;

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Refused {
    pub count: u32,
    pub first_ms: u64,
    pub last_ms: u64,
}

impl Touched for Refused {
    fn last_ms(&self) -> u64 {
        self.last_ms
    }
}

pub struct Refusals {
    map: BoundedMap<Refused>,
}

impl Refusals {
    pub fn new(evictions: IntCounter) -> Refusals {
        Refusals {
            map: BoundedMap::new(CAP, Duration::from_millis(HOUR_MS), evictions),
        }
    }

    pub fn count(&self, key: ClientKey, now: u64) {
        self.map.with(key, |r| {
            if now.saturating_sub(r.first_ms) >= HOUR_MS {
                *r = Refused {
                    count: 0,
                    first_ms: now,
                    last_ms: now,
                };
            }
            r.count = r.count.saturating_add(1);
            r.last_ms = now;
        });
    }

    /// The client's refusals in the last hour, if any.
    pub fn of(&self, key: ClientKey, now: u64) -> Option<u32> {
        self.map
            .get(key)
            .filter(|r| now.saturating_sub(r.first_ms) < HOUR_MS)
            .map(|r| r.count)
    }

    /// The `n` clients refused most in the last hour, most first.
    pub fn top(&self, n: usize, now: u64) -> Vec<(ClientKey, u32)> {
        let mut all: Vec<(ClientKey, u32)> = self
            .map
            .entries()
            .into_iter()
            .filter(|(_, r)| now.saturating_sub(r.first_ms) < HOUR_MS)
            .map(|(k, r)| (k, r.count))
            .collect();
        all.sort_by_key(|(_, c)| std::cmp::Reverse(*c));
        all.truncate(n);
        all
    }

    pub fn forget(&self, key: ClientKey) -> bool {
        self.map.remove(key)
    }

    pub fn sweep(&self, now: u64) {
        self.map.sweep(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::clients::client_key;

    #[test]
    fn counted_per_client_for_an_hour_topped_and_forgotten() {
        let r = Refusals::new(IntCounter::new("x", "x").unwrap());
        let a = client_key("192.0.2.1".parse().unwrap(), 64);
        let b = client_key("192.0.2.2".parse().unwrap(), 64);
        for _ in 0..5 {
            r.count(a, 1_000);
        }
        r.count(b, 1_000);
        assert_eq!(r.top(10, 2_000), vec![(a, 5), (b, 1)]);
        assert_eq!(r.top(1, 2_000), vec![(a, 5)]);
        // An hour on, the count starts again.
        r.count(a, 1_000 + HOUR_MS);
        assert_eq!(r.of(a, 2_000 + HOUR_MS), Some(1));
        assert_eq!(r.of(b, 2_000 + HOUR_MS), None);
        assert!(r.forget(a));
        assert_eq!(r.of(a, 2_000 + HOUR_MS), None);
    }
}
