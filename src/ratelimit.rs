//! Per-client rate limits (SPEC 4): governor's GCRA over a bounded state store of our own,
//! because governor's keyed stores grow without bound under rotating source addresses
//! (boinkor-net/governor#171). Clients are keyed by address, IPv6 by prefix (`ClientKey`).
//! [`BoundedMap`] also holds the jails' counters.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::{Quota, RateLimiter};
use prometheus::IntCounter;

use crate::config;
use crate::policy::temporary::now_ms;

/// A client as limits and jails count it: an IPv4 address, or an IPv6 prefix (SPEC 6).
pub type ClientKey = u128;

/// The key for `ip`: IPv4 as `::ffff:a.b.c.d`, IPv6 masked to `v6_prefix` bits.
pub fn client_key(ip: std::net::IpAddr, v6_prefix: u8) -> ClientKey {
    match ip {
        std::net::IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        std::net::IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            match v6_prefix {
                0 => 0,
                p if p >= 128 => bits,
                p => bits & (u128::MAX << (128 - p as u32)),
            }
        }
    }
}

/// The network a key stands for: `a.b.c.d/32`, or the IPv6 prefix.
pub fn key_target(key: ClientKey, v6_prefix: u8) -> ipnet::IpNet {
    let v6 = std::net::Ipv6Addr::from(key);
    match v6.to_ipv4_mapped() {
        Some(v4) => ipnet::IpNet::V4(ipnet::Ipv4Net::new(v4, 32).expect("32 is a valid length")),
        None => ipnet::IpNet::V6(
            ipnet::Ipv6Net::new(v6, v6_prefix.min(128))
                .expect("length capped at 128")
                .trunc(),
        ),
    }
}

/// State that knows when it was last touched (ms since the epoch).
pub trait Touched {
    fn last_ms(&self) -> u64;
}

type Map<V> = DashMap<ClientKey, V, foldhash::fast::RandomState>;

struct Generations<V> {
    young: Arc<Map<V>>,
    old: Arc<Map<V>>,
}

/// Per-client state capped at `cap` clients, in two generations: new state goes to the
/// young map; when it holds `cap / 2`, it becomes the old map and the previous old one is
/// dropped. State touched in the old generation moves back to the young one, so what gets
/// dropped is what was idle longest. Work per operation is O(1) amortized whatever the
/// addresses. State idle for `idle_ms` is equivalent to none (a refilled bucket, an elapsed
/// window) and `sweep` drops it early.
pub struct BoundedMap<V> {
    gens: ArcSwap<Generations<V>>,
    young_len: AtomicUsize,
    cap: usize,
    half: usize,
    idle_ms: u64,
    rotating: Mutex<()>,
    evictions: IntCounter,
}

impl<V: Touched + Default> BoundedMap<V> {
    pub fn new(cap: usize, idle: Duration, evictions: IntCounter) -> Self {
        BoundedMap {
            gens: ArcSwap::from_pointee(Generations {
                young: Arc::new(Map::default()),
                old: Arc::new(Map::default()),
            }),
            young_len: AtomicUsize::new(0),
            cap,
            half: (cap / 2).max(1),
            idle_ms: idle.as_millis() as u64,
            rotating: Mutex::new(()),
            evictions,
        }
    }

    /// Runs `f` on the client's state, creating it (or bringing it back from the old
    /// generation) as needed.
    pub fn with<R>(&self, key: ClientKey, f: impl FnOnce(&mut V) -> R) -> R {
        let gens = self.gens.load();
        if let Some(mut v) = gens.young.get_mut(&key) {
            return f(&mut v);
        }
        let start = gens.old.remove(&key).map(|(_, v)| v).unwrap_or_default();
        let mut inserted = false;
        let r = {
            let mut v = gens.young.entry(key).or_insert_with(|| {
                inserted = true;
                start
            });
            f(&mut v)
        };
        if inserted && self.young_len.fetch_add(1, Ordering::Relaxed) + 1 >= self.half {
            self.rotate();
        }
        r
    }

    fn rotate(&self) {
        // One rotation at a time; others carry on with the maps they have.
        let Ok(_guard) = self.rotating.try_lock() else {
            return;
        };
        if self.young_len.load(Ordering::Relaxed) < self.half {
            return;
        }
        let gens = self.gens.load_full();
        self.gens.store(Arc::new(Generations {
            young: Arc::new(Map::default()),
            old: gens.young.clone(),
        }));
        self.young_len.store(0, Ordering::Relaxed);
        // What the dropped generation held that was not idle is an eviction.
        let now = now_ms();
        let evicted = gens
            .old
            .iter()
            .filter(|e| now.saturating_sub(e.last_ms()) < self.idle_ms)
            .count();
        self.evictions.inc_by(evicted as u64);
    }

    /// A copy of the client's state, if any.
    pub fn get(&self, key: ClientKey) -> Option<V>
    where
        V: Clone,
    {
        let gens = self.gens.load();
        gens.young
            .get(&key)
            .map(|v| v.clone())
            .or_else(|| gens.old.get(&key).map(|v| v.clone()))
    }

    /// Forgets a client.
    pub fn remove(&self, key: ClientKey) -> bool {
        let gens = self.gens.load();
        let young = gens.young.remove(&key).is_some();
        if young {
            self.young_len.fetch_sub(1, Ordering::Relaxed);
        }
        gens.old.remove(&key).is_some() || young
    }

    /// Drops idle state.
    pub fn sweep(&self, now: u64) {
        let gens = self.gens.load();
        let keep = |v: &V| now.saturating_sub(v.last_ms()) < self.idle_ms;
        let before = gens.young.len();
        gens.young.retain(|_, v| keep(v));
        let dropped = before.saturating_sub(gens.young.len());
        let _ = self
            .young_len
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(dropped))
            });
        gens.old.retain(|_, v| keep(v));
    }

    /// The most clients this map holds.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Clients with state.
    pub fn len(&self) -> usize {
        let gens = self.gens.load();
        gens.young.len() + gens.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

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

/// governor's state store on a [`BoundedMap`] (shared: the limiter keeps a second handle,
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

/// One rate limit (`[rate_limit]`, a site's or a route's).
pub struct Limiter {
    pub settings: config::RateLimit,
    limiter: RateLimiter<ClientKey, BucketStore, DefaultClock>,
    buckets: Arc<BoundedMap<Bucket>>,
}

impl Limiter {
    pub fn new(settings: config::RateLimit, cap: usize, evictions: IntCounter) -> Limiter {
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

    fn limiter(rps: f64, burst: u32, cap: usize) -> Limiter {
        let settings = config::RateLimit {
            requests_per_second: rps,
            burst,
            ipv6_prefix: 64,
            dry_run: false,
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
        };
        let l = Limiter::new(settings, 1000, evictions.clone());
        for i in 0..50_000u128 {
            let _ = l.check((0x2001_0db8u128 << 96) | (i << 64));
            assert!(l.tracked() <= 1000);
        }
        assert!(evictions.get() > 40_000, "{}", evictions.get());
    }
}
