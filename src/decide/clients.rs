//! Who a client is for the per-client state (rate limits, jails, connection slots): an IPv4
//! address or an IPv6 prefix ([`ClientKey`]), and [`BoundedMap`], the per-client map
//! with a hard cap that rotating addresses cannot grow.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use prometheus::IntCounter;

use crate::decide::clock::now_ms;

/// A client as limits and jails count it: an IPv4 address, or an IPv6 prefix.
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

/// The key of the network `ip` is in: IPv4 masked to `v4_prefix` bits (as `::ffff:a.b.c.0`),
/// IPv6 to `v6_prefix`.
pub fn network_key(ip: std::net::IpAddr, v4_prefix: u8, v6_prefix: u8) -> ClientKey {
    match ip.to_canonical() {
        std::net::IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let masked = match v4_prefix {
                0 => 0,
                p if p >= 32 => bits,
                p => bits & (u32::MAX << (32 - p as u32)),
            };
            u128::from(std::net::Ipv4Addr::from(masked).to_ipv6_mapped())
        }
        v6 => client_key(v6, v6_prefix),
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

    /// Every client's state (both generations; the admin's views, not the request path).
    pub fn entries(&self) -> Vec<(ClientKey, V)>
    where
        V: Clone,
    {
        let gens = self.gens.load();
        let mut out: Vec<(ClientKey, V)> = gens
            .young
            .iter()
            .map(|e| (*e.key(), e.value().clone()))
            .collect();
        out.extend(
            gens.old
                .iter()
                .filter(|e| !gens.young.contains_key(e.key()))
                .map(|e| (*e.key(), e.value().clone())),
        );
        out
    }

    /// Clients with state.
    pub fn len(&self) -> usize {
        let gens = self.gens.load();
        gens.young.len() + gens.old.len()
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
/// its [`Gate`] of requests in flight. A client is in the map only while it holds a slot, so
/// the map never holds more entries than there are slots.
#[derive(Default)]
pub struct ConnCounts {
    map: DashMap<ClientKey, Held, foldhash::fast::RandomState>,
}

struct Held {
    slots: u32,
    /// Connections refused over the cap in the second `refused_in` (seconds since the
    /// epoch, truncated): a client that keeps reconnecting is told apart.
    refused: u32,
    refused_in: u32,
    /// The count of the second before `refused_in`, when that was the one just before: a
    /// client that goes on reconnecting stays told apart across a second's turn.
    refused_before: u32,
    /// Shared by the client's slots, so a request takes its place with one atomic add and
    /// no map lookup.
    gate: Arc<Gate>,
}

/// A client's upstream work: its requests in flight, each of which holds an
/// upstream connection, capped by `limits.max_requests_per_client` with a short queue (as a
/// server's `maxconn` with its queue in HAProxy), and its streaming uploads, capped by
/// `limits.max_uploads_per_client`.
#[derive(Default)]
pub struct Gate {
    in_flight: AtomicU32,
    uploads: AtomicU32,
    /// Requests waiting for a place; a release wakes one only when there are some.
    waiting: AtomicU32,
    freed: tokio::sync::Notify,
}

impl Gate {
    fn try_enter(self: &Arc<Self>, cap: u32) -> bool {
        if self.in_flight.fetch_add(1, Ordering::Relaxed) >= cap {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// A place among the client's requests in flight, waiting up to `wait` for one when
    /// `cap` are taken; `None` when none came free in time.
    pub async fn enter(
        self: &Arc<Self>,
        cap: u32,
        wait: std::time::Duration,
        slot: Option<ClientSlot>,
    ) -> Option<InFlight> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let entered = self.try_enter(cap);
            if !entered {
                let _ = tokio::time::timeout_at(deadline, notified).await;
            }
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            if entered || self.try_enter(cap) {
                return Some(InFlight {
                    gate: self.clone(),
                    _slot: slot,
                });
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
        }
    }

    /// A place among the client's streaming uploads, or `None` when `cap` are taken.
    pub fn upload(self: &Arc<Self>, cap: u32) -> Option<Upload> {
        if self.uploads.fetch_add(1, Ordering::Relaxed) >= cap {
            self.uploads.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Upload(self.clone()))
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// One slot of a client; the count goes down when it is dropped.
pub struct ClientSlot {
    counts: Arc<ConnCounts>,
    key: ClientKey,
    gate: Arc<Gate>,
}

/// A request's place among its client's requests in flight, given back on drop.
pub struct InFlight {
    gate: Arc<Gate>,
    /// For a client named by X-Forwarded-For (no connection is its): its entry in the map,
    /// kept while the request is in flight.
    _slot: Option<ClientSlot>,
}

impl InFlight {
    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    /// The same place, keeping the slot that holds the client's entry in the map.
    pub fn keeping(mut self, slot: ClientSlot) -> InFlight {
        self._slot = Some(slot);
        self
    }
}

/// A streaming upload's place among its client's, given back on drop.
pub struct Upload(Arc<Gate>);

impl Drop for Upload {
    fn drop(&mut self) {
        self.0.uploads.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnCounts {
    /// A slot for `key`; when the client holds `cap` slots already, how many times it has
    /// been refused this second (this time included), or in the second before if more.
    pub fn acquire(self: &Arc<Self>, key: ClientKey, cap: u32) -> Result<ClientSlot, u32> {
        let mut held = self.map.entry(key).or_insert_with(|| Held {
            slots: 0,
            refused: 0,
            refused_in: 0,
            refused_before: 0,
            gate: Arc::default(),
        });
        if held.slots >= cap {
            let second = (crate::decide::clock::now_ms() / 1000) as u32;
            if held.refused_in != second {
                let last = held.refused_in.wrapping_add(1) == second;
                held.refused_before = if last { held.refused } else { 0 };
                held.refused_in = second;
                held.refused = 0;
            }
            held.refused = held.refused.saturating_add(1);
            return Err(held.refused.max(held.refused_before));
        }
        held.slots += 1;
        let gate = held.gate.clone();
        drop(held);
        Ok(ClientSlot {
            counts: self.clone(),
            key,
            gate,
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
        self.gate.try_enter(cap).then(|| InFlight {
            gate: self.gate.clone(),
            _slot: None,
        })
    }

    /// The client's gate, to wait at when [`ClientSlot::enter`] found it full.
    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
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
        self.gate.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.gate.waiting.load(Ordering::SeqCst) > 0 {
            self.gate.freed.notify_one();
        }
    }
}

/// The targets a client's own state is kept under: the address, and for IPv6 the prefix it
/// is counted as (`rate_limit.ipv6_prefix`).
pub fn client_targets(ip: std::net::IpAddr, ipv6_prefix: u8) -> Vec<ipnet::IpNet> {
    let mut targets = vec![ipnet::IpNet::from(ip)];
    if let std::net::IpAddr::V6(v6) = ip {
        if let Ok(net) = ipnet::Ipv6Net::new(v6, ipv6_prefix) {
            targets.push(ipnet::IpNet::V6(net.trunc()));
        }
    }
    targets
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
        assert_eq!(counts.acquire(a, 2).err(), Some(1));
        assert_eq!(counts.acquire(a, 2).err(), Some(2), "refusals are counted");
        let other = counts.acquire(b, 2);
        assert!(other.is_ok(), "another client is not affected");
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

    /// Over the cap a request waits for a place (a browser's burst is served in turn), and
    /// gives up when none comes free in time.
    #[tokio::test]
    async fn a_request_over_the_cap_waits_for_a_place_then_gives_up() {
        let counts = Arc::new(ConnCounts::default());
        let slot = counts.acquire(7, 9).unwrap();
        let first = slot.enter(1).unwrap();
        let gate = slot.gate().clone();
        let waiter = {
            let gate = gate.clone();
            tokio::spawn(async move { gate.enter(1, Duration::from_secs(5), None).await.is_some() })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "waits while the place is taken");
        drop(first);
        assert!(
            waiter.await.unwrap(),
            "the freed place goes to the waiting request"
        );
        let held = slot.enter(1).unwrap();
        let start = std::time::Instant::now();
        assert!(gate
            .enter(1, Duration::from_millis(100), None)
            .await
            .is_none());
        assert!(start.elapsed() >= Duration::from_millis(100));
        drop(held);
        assert_eq!(gate.in_flight(), 0);
    }

    #[test]
    fn uploads_are_capped_per_client() {
        let gate = Arc::new(Gate::default());
        let a = gate.upload(2).unwrap();
        let _b = gate.upload(2).unwrap();
        assert!(gate.upload(2).is_none());
        drop(a);
        assert!(gate.upload(2).is_some());
    }
}
