//! Who a client is for the per-client state (rate limits, jails, connection slots): an IPv4
//! address or an IPv6 prefix ([`ClientKey`], SPEC 6), and [`BoundedMap`], the per-client map
//! with a hard cap that rotating addresses cannot grow.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use prometheus::IntCounter;

use crate::clock::now_ms;

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

/// What an open client connection holds, released when the connection (and any upgrade
/// spliced from it) ends: its place under `limits.max_connections`, and its client's.
pub struct ConnSlot {
    pub _permit: tokio::sync::OwnedSemaphorePermit,
    pub client: Option<ClientSlot>,
}

impl std::fmt::Debug for ConnSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnSlot")
    }
}

/// Per client ([`ClientKey`]): open connections, for `limits.max_connections_per_client`, and
/// requests in flight, for `limits.max_requests_per_client`. A client is in the map only
/// while it holds a slot, so the map never holds more entries than there are slots.
#[derive(Default)]
pub struct ConnCounts {
    map: DashMap<ClientKey, Held, foldhash::fast::RandomState>,
}

struct Held {
    slots: u32,
    /// Shared by the client's slots, so a request takes its place with one atomic add and
    /// no map lookup.
    in_flight: Arc<AtomicU32>,
}

/// One slot of a client; the count goes down when it is dropped.
pub struct ClientSlot {
    counts: Arc<ConnCounts>,
    key: ClientKey,
    in_flight: Arc<AtomicU32>,
}

/// A request's place among its client's requests in flight, given back on drop.
pub enum InFlight {
    /// Counted on the client's connection slot.
    Counted(Arc<AtomicU32>),
    /// Counted in a map of its own (a client named by X-Forwarded-For: no connection is its).
    Slot(ClientSlot),
}

impl ConnCounts {
    /// A slot for `key`, or `None` when the client holds `cap` slots already.
    pub fn acquire(self: &Arc<Self>, key: ClientKey, cap: u32) -> Option<ClientSlot> {
        let mut held = self.map.entry(key).or_insert_with(|| Held {
            slots: 0,
            in_flight: Arc::default(),
        });
        if held.slots >= cap {
            return None;
        }
        held.slots += 1;
        let in_flight = held.in_flight.clone();
        drop(held);
        Some(ClientSlot {
            counts: self.clone(),
            key,
            in_flight,
        })
    }

    /// Slots `key` holds.
    pub fn count(&self, key: ClientKey) -> u32 {
        self.map.get(&key).map_or(0, |h| h.slots)
    }

    /// Clients holding a slot.
    pub fn clients(&self) -> usize {
        self.map.len()
    }
}

impl ClientSlot {
    /// A place among the client's requests in flight, or `None` when `cap` are.
    pub fn enter(&self, cap: u32) -> Option<InFlight> {
        if self.in_flight.fetch_add(1, Ordering::Relaxed) >= cap {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(InFlight::Counted(self.in_flight.clone()))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if let dashmap::Entry::Occupied(mut e) = self.counts.map.entry(self.key) {
            e.get_mut().slots -= 1;
            if e.get().slots == 0 {
                e.remove();
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let InFlight::Counted(n) = self {
            n.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_slots_are_capped_per_client_and_released_on_drop() {
        let counts = Arc::new(ConnCounts::default());
        let (a, b) = (client_key("192.0.2.1".parse().unwrap(), 64), 7);
        let first = counts.acquire(a, 2).unwrap();
        let second = counts.acquire(a, 2).unwrap();
        assert!(counts.acquire(a, 2).is_none());
        let other = counts.acquire(b, 2);
        assert!(other.is_some(), "another client is not affected");
        drop(first);
        let third = counts.acquire(a, 2).unwrap();
        drop((second, third, other));
        assert_eq!(counts.count(a), 0);
        assert_eq!(
            counts.clients(),
            0,
            "a client without connections leaves the map"
        );
    }

    #[test]
    fn requests_in_flight_are_counted_across_a_clients_connections() {
        let counts = Arc::new(ConnCounts::default());
        let a = client_key("192.0.2.1".parse().unwrap(), 64);
        let (one, two) = (counts.acquire(a, 9).unwrap(), counts.acquire(a, 9).unwrap());
        let first = one.enter(2).unwrap();
        let second = two.enter(2).unwrap();
        assert!(one.enter(2).is_none() && two.enter(2).is_none());
        drop(first);
        assert!(two.enter(2).is_some());
        drop(second);
    }
}
