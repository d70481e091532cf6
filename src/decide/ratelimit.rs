//! Per-client rate limits: governor's GCRA over a bounded state store of our own
//! (`BoundedMap`), because governor's keyed stores grow without bound under rotating source
//! addresses (boinkor-net/governor#171).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::{Quota, RateLimiter};
use prometheus::IntCounter;

use crate::config;
use crate::decide::clients::{BoundedMap, ClientKey, Touched};
use crate::decide::clock::now_ms;

/// One client's bucket: governor's theoretical arrival time, and when it was last used.
#[derive(Debug, Default, Clone)]
pub struct Bucket {
    tat: u64,
    last_ms: u64,
}

impl Touched for Bucket {
    fn last_ms(&self) -> u64 {
        self.last_ms
    }
}

/// governor's state store on a `BoundedMap` (shared: the limiter keeps a second handle,
/// since governor lends no access to its store).
pub struct BucketStore(Arc<BoundedMap<Bucket>>);

impl StateStore for BucketStore {
    type Key = ClientKey;

    fn measure_and_replace<T, F, E>(&self, key: &ClientKey, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        // The map's entry lock makes read-decide-write atomic per client.
        self.0.with(*key, |b| {
            let prev = (b.last_ms != 0).then(|| Nanos::new(b.tat));
            b.last_ms = now_ms();
            f(prev).map(|(t, tat)| {
                b.tat = tat.as_u64();
                t
            })
        })
    }
}

/// One rate limit (`[rate_limit]`, a site's or a route's), per client; or, as its
/// `network`, per network.
pub struct Limiter {
    pub settings: config::RateLimit,
    limiter: RateLimiter<ClientKey, BucketStore, DefaultClock>,
    buckets: Arc<BoundedMap<Bucket>>,
    /// The limit per network that goes with this one (`rate_limit.network`).
    pub network: Option<Arc<Limiter>>,
    /// For a network limit: its IPv4 and IPv6 prefix lengths.
    prefixes: Option<(u8, u8)>,
}

impl Limiter {
    /// A limit per client, with its limit per network when the settings have one.
    pub fn new(settings: config::RateLimit, cap: usize, evictions: IntCounter) -> Limiter {
        let network = settings.network.as_ref().map(|n| {
            let per_network = config::RateLimit {
                requests_per_second: n.rate,
                burst: n.burst,
                ipv6_prefix: n.ipv6_prefix,
                dry_run: settings.dry_run,
                network: None,
            };
            let mut l = Limiter::new(per_network, cap, evictions.clone());
            l.prefixes = Some((n.ipv4_prefix, n.ipv6_prefix));
            Arc::new(l)
        });
        let burst = NonZeroU32::new(settings.burst.max(1)).unwrap_or(NonZeroU32::MIN);
        let period = Duration::from_secs_f64(1.0 / settings.requests_per_second.max(1e-6));
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(burst);
        // A bucket untouched for the time a full burst takes to refill is as good as new.
        let idle = quota
            .burst_size_replenished_in()
            .max(Duration::from_secs(1));
        let buckets = Arc::new(BoundedMap::new(cap, idle, evictions));
        Limiter {
            settings,
            limiter: RateLimiter::new(quota, BucketStore(buckets.clone()), DefaultClock::default()),
            buckets,
            network,
            prefixes: None,
        }
    }

    /// Whether this is a limit per network (its buckets are about a network, not a client).
    pub fn is_network(&self) -> bool {
        self.prefixes.is_some()
    }

    /// The key this limit counts `ip` under: its client key, or its network's.
    #[inline]
    pub fn key_for(&self, ip: std::net::IpAddr) -> ClientKey {
        match self.prefixes {
            None => crate::decide::clients::client_key(ip, self.settings.ipv6_prefix),
            Some((v4, v6)) => crate::decide::clients::network_key(ip, v4, v6),
        }
    }

    /// `Ok`, or how long the client must wait.
    pub fn check(&self, key: ClientKey) -> Result<(), Duration> {
        self.limiter
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(self.limiter.clock().now()))
    }

    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }

    pub fn cap(&self) -> usize {
        self.buckets.cap()
    }

    pub fn sweep(&self, now: u64) {
        self.buckets.sweep(now)
    }

    pub fn forget(&self, key: ClientKey) -> bool {
        self.buckets.remove(key)
    }

    pub fn is_tracked(&self, key: ClientKey) -> bool {
        self.buckets.get(key).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::clients::{client_key, key_target};

    fn limiter(rps: f64, burst: u32, cap: usize) -> Limiter {
        let settings = config::RateLimit {
            requests_per_second: rps,
            burst,
            ipv6_prefix: 64,
            dry_run: false,
            network: None,
        };
        Limiter::new(settings, cap, IntCounter::new("e", "e").unwrap())
    }

    #[test]
    fn a_burst_passes_then_the_client_waits() {
        let l = limiter(1.0, 3, 100);
        let k = client_key("192.0.2.1".parse().unwrap(), 64);
        for _ in 0..3 {
            assert!(l.check(k).is_ok());
        }
        let wait = l.check(k).unwrap_err();
        assert!(wait > Duration::from_millis(500) && wait <= Duration::from_secs(1));
        // Another client is unaffected.
        assert!(l
            .check(client_key("192.0.2.2".parse().unwrap(), 64))
            .is_ok());
    }

    #[test]
    fn ipv6_clients_share_their_prefix() {
        let a = client_key("2001:db8:1:2::1".parse().unwrap(), 64);
        let b = client_key("2001:db8:1:2:ffff::9".parse().unwrap(), 64);
        let c = client_key("2001:db8:1:3::1".parse().unwrap(), 64);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(key_target(a, 64).to_string(), "2001:db8:1:2::/64");
        let v4 = client_key("192.0.2.1".parse().unwrap(), 64);
        assert_eq!(key_target(v4, 64).to_string(), "192.0.2.1/32");
    }

    #[test]
    fn idle_state_is_swept_and_live_state_kept() {
        #[derive(Default, Clone)]
        struct S(u64);
        impl Touched for S {
            fn last_ms(&self) -> u64 {
                self.0
            }
        }
        let m: BoundedMap<S> = BoundedMap::new(
            100,
            Duration::from_secs(10),
            IntCounter::new("e", "e").unwrap(),
        );
        let now = now_ms();
        m.with(1, |s| s.0 = now - 60_000);
        m.with(2, |s| s.0 = now);
        m.sweep(now);
        assert!(m.get(1).is_none(), "idle state was kept");
        assert!(m.get(2).is_some(), "live state was dropped");
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn state_stays_within_the_cap_under_rotating_clients() {
        let evictions = IntCounter::new("e", "e").unwrap();
        let settings = config::RateLimit {
            requests_per_second: 10.0,
            burst: 20,
            ipv6_prefix: 64,
            dry_run: false,
            network: None,
        };
        let l = Limiter::new(settings, 1000, evictions.clone());
        for i in 0..50_000u128 {
            let _ = l.check((0x2001_0db8u128 << 96) | (i << 64));
            assert!(l.tracked() <= 1000);
        }
        assert!(evictions.get() > 40_000, "{}", evictions.get());
    }
}
