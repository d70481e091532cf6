//! Temporary entries: targets (address or CIDR) with an expiry, in sharded concurrent maps
//! keyed by (prefix length, masked address). A lookup probes once per prefix length in use,
//! longest first; which lengths are in use is a bitmask read without locking. Expiry is
//! checked on every read, so an entry never matches after it expires; `sweep` frees them.

use crate::decide::clock::now_ms;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

pub use super::slot::{Scope, Slot};

/// One temporary entry: 24 bytes, so a million fit in well under 128 MB. Who made it and
/// why live behind one pointer, shared by the clones of an entry (each ban has its own).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub created_at: u64,
    pub expires_at: u64,
    pub about: Arc<About>,
}

#[derive(Debug, PartialEq)]
pub struct About {
    /// `api`, or the name of the jail that made it.
    pub source: Box<str>,
    pub reason: Option<Box<str>>,
    /// The fleet gateway that made it (`fleet.gateway_id`); `None`: this gateway.
    pub origin: Option<Box<str>>,
}

impl Entry {
    pub fn new(created_at: u64, expires_at: u64, source: &str, reason: Option<&str>) -> Entry {
        Entry {
            created_at,
            expires_at,
            about: Arc::new(About {
                source: source.into(),
                reason: reason.map(Into::into),
                origin: None,
            }),
        }
    }

    /// The same entry, made by the fleet gateway `origin` (`None`: this one).
    pub fn with_origin(self, origin: Option<&str>) -> Entry {
        Entry {
            about: Arc::new(About {
                source: self.about.source.clone(),
                reason: self.about.reason.clone(),
                origin: origin.map(Into::into),
            }),
            ..self
        }
    }

    pub fn origin(&self) -> Option<&str> {
        self.about.origin.as_deref()
    }

    pub fn source(&self) -> &str {
        &self.about.source
    }

    pub fn reason(&self) -> Option<&str> {
        self.about.reason.as_deref()
    }
}

type Hasher = foldhash::fast::RandomState;

/// Entries of one action (block or allow).
pub struct TempTable {
    v4: DashMap<(u8, u32), Entry, Hasher>,
    v6: DashMap<(u8, u128), Entry, Hasher>,
    /// Entries per prefix length (0..=32 for IPv4, 33..=161 for IPv6), under a lock that
    /// only writers take; readers see `v4_lens` / `v6_lens`.
    counts: Mutex<[u32; 33 + 129]>,
    v4_lens: AtomicU64,
    v6_lens: [AtomicU64; 3],
    /// Bumped by every change: lets a mirror (the firewall) tell that nothing changed.
    generation: AtomicU64,
}

impl Default for TempTable {
    fn default() -> Self {
        TempTable {
            v4: DashMap::with_hasher(Hasher::default()),
            v6: DashMap::with_hasher(Hasher::default()),
            counts: Mutex::new([0; 33 + 129]),
            v4_lens: AtomicU64::new(0),
            v6_lens: Default::default(),
            generation: AtomicU64::new(0),
        }
    }
}

#[inline]
fn mask4(ip: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        ip & (u32::MAX << (32 - len as u32))
    }
}

#[inline]
fn mask6(ip: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        ip & (u128::MAX << (128 - len as u32))
    }
}

impl TempTable {
    /// Inserts or replaces the entry for `target`.
    pub fn insert(&self, target: IpNet, entry: Entry) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let new = match target {
            IpNet::V4(n) => self
                .v4
                .insert((n.prefix_len(), u32::from(n.network())), entry)
                .is_none(),
            IpNet::V6(n) => self
                .v6
                .insert((n.prefix_len(), u128::from(n.network())), entry)
                .is_none(),
        };
        if new {
            self.count(target, 1);
        }
    }

    /// Removes the entry for exactly `target`.
    pub fn remove(&self, target: IpNet) -> Option<Entry> {
        let removed = match target {
            IpNet::V4(n) => self
                .v4
                .remove(&(n.prefix_len(), u32::from(n.network())))
                .map(|(_, e)| e),
            IpNet::V6(n) => self
                .v6
                .remove(&(n.prefix_len(), u128::from(n.network())))
                .map(|(_, e)| e),
        };
        if removed.is_some() {
            self.count(target, -1);
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        removed
    }

    /// Changes so far (inserts, removals, sweeps that removed something).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn count(&self, target: IpNet, delta: i32) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let slot = match target {
            IpNet::V4(n) => n.prefix_len() as usize,
            IpNet::V6(n) => 33 + n.prefix_len() as usize,
        };
        counts[slot] = counts[slot].saturating_add_signed(delta);
        self.publish(&counts);
    }

    fn publish(&self, counts: &[u32; 33 + 129]) {
        let mut v4 = 0u64;
        let mut v6 = [0u64; 3];
        for (len, &c) in counts[..33].iter().enumerate() {
            if c > 0 {
                v4 |= 1 << len;
            }
        }
        for (len, &c) in counts[33..].iter().enumerate() {
            if c > 0 {
                v6[len / 64] |= 1 << (len % 64);
            }
        }
        self.v4_lens.store(v4, Ordering::Release);
        for (slot, bits) in self.v6_lens.iter().zip(v6) {
            slot.store(bits, Ordering::Release);
        }
    }

    /// Whether a live entry covers `ip`: one probe per prefix length in use, longest first.
    /// The clock is read only when a probe hits.
    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        let mut now = None;
        self.probe(ip, |e| e.expires_at > *now.get_or_insert_with(now_ms))
            .is_some()
    }

    /// Probes each prefix length in use, longest first, until `hit` accepts an entry;
    /// returns the key's length and masked address.
    #[inline]
    fn probe(&self, ip: IpAddr, mut hit: impl FnMut(&Entry) -> bool) -> Option<(u8, u128)> {
        match ip {
            IpAddr::V4(v4) => {
                let ip = u32::from(v4);
                let mut lens = self.v4_lens.load(Ordering::Acquire);
                while lens != 0 {
                    let len = 63 - lens.leading_zeros() as u8;
                    lens &= !(1u64 << len);
                    let key = (len, mask4(ip, len));
                    if self.v4.get(&key).is_some_and(|e| hit(&e)) {
                        return Some((len, key.1 as u128));
                    }
                }
                None
            }
            IpAddr::V6(v6) => {
                let ip = u128::from(v6);
                for word in (0..3).rev() {
                    let mut lens = self.v6_lens[word].load(Ordering::Acquire);
                    while lens != 0 {
                        let bit = 63 - lens.leading_zeros();
                        lens &= !(1u64 << bit);
                        let len = (word as u32 * 64 + bit) as u8;
                        let key = (len, mask6(ip, len));
                        if self.v6.get(&key).is_some_and(|e| hit(&e)) {
                            return Some(key);
                        }
                    }
                }
                None
            }
        }
    }

    /// The most specific live entry covering `ip`.
    pub fn find(&self, ip: IpAddr, now: Option<u64>) -> Option<(IpNet, Entry)> {
        let now = now.unwrap_or_else(now_ms);
        let mut found = None;
        let (len, addr) = self.probe(ip, |e| {
            let live = e.expires_at > now;
            if live {
                found = Some(e.clone());
            }
            live
        })?;
        let net = match ip {
            IpAddr::V4(_) => IpNet::V4(Ipv4Net::new((addr as u32).into(), len).ok()?),
            IpAddr::V6(_) => IpNet::V6(Ipv6Net::new(addr.into(), len).ok()?),
        };
        Some((net, found?))
    }

    /// Every live entry covering `ip` (admin path).
    pub fn covering(&self, ip: IpAddr, now: u64) -> Vec<(IpNet, Entry)> {
        self.all(now)
            .into_iter()
            .filter(|(net, _)| net.contains(&ip))
            .collect()
    }

    /// Every live entry (admin path).
    pub fn all(&self, now: u64) -> Vec<(IpNet, Entry)> {
        let mut out = Vec::new();
        for r in self.v4.iter() {
            if r.expires_at > now {
                if let Ok(n) = Ipv4Net::new(r.key().1.into(), r.key().0) {
                    out.push((IpNet::V4(n), r.value().clone()));
                }
            }
        }
        for r in self.v6.iter() {
            if r.expires_at > now {
                if let Ok(n) = Ipv6Net::new(r.key().1.into(), r.key().0) {
                    out.push((IpNet::V6(n), r.value().clone()));
                }
            }
        }
        out.sort_by_key(|e| e.0);
        out
    }

    /// Drops every entry expired at `now`; returns their targets.
    pub fn sweep(&self, now: u64) -> Vec<IpNet> {
        let mut gone = Vec::new();
        let v4 = |len, net: u32| Ipv4Net::new(net.into(), len).ok().map(IpNet::V4);
        let v6 = |len, net: u128| Ipv6Net::new(net.into(), len).ok().map(IpNet::V6);
        sweep_map(&self.v4, now, v4, &mut gone);
        sweep_map(&self.v6, now, v6, &mut gone);
        if !gone.is_empty() {
            self.generation.fetch_add(1, Ordering::AcqRel);
            let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            for t in &gone {
                let slot = match t {
                    IpNet::V4(n) => n.prefix_len() as usize,
                    IpNet::V6(n) => 33 + n.prefix_len() as usize,
                };
                counts[slot] = counts[slot].saturating_sub(1);
            }
            self.publish(&counts);
        }
        gone
    }

    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// No entry at all: read from the prefix-length bitmask, without touching the maps.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.v4_lens.load(Ordering::Acquire) == 0
            && self.v6_lens.iter().all(|w| w.load(Ordering::Acquire) == 0)
    }
}

/// The temporary block and allow entries, and the scoped block entries by scope.
#[derive(Default)]
pub struct TempEntries {
    pub block: TempTable,
    pub allow: TempTable,
    /// Scoped block entries; a table per scope in use, made on first use (scopes come from
    /// the config and the API, never from a client).
    scoped: DashMap<Scope, Arc<TempTable>, Hasher>,
    /// Whether any scoped table exists (read on every request of a site with scopes).
    any_scoped: std::sync::atomic::AtomicBool,
    /// Passes, a table per site (made when a pass is first made there).
    passes: DashMap<Scope, Arc<TempTable>, Hasher>,
}

/// A table of [`TempEntries`], borrowed or shared.
pub enum TableRef<'a> {
    Fixed(&'a TempTable),
    Scoped(Arc<TempTable>),
}

impl std::ops::Deref for TableRef<'_> {
    type Target = TempTable;

    fn deref(&self) -> &TempTable {
        match self {
            TableRef::Fixed(t) => t,
            TableRef::Scoped(t) => t,
        }
    }
}

impl TempEntries {
    /// The table of a slot (a scoped one is made when first asked for).
    pub fn table(&self, slot: &Slot) -> TableRef<'_> {
        match slot {
            Slot::Block => TableRef::Fixed(&self.block),
            Slot::Allow => TableRef::Fixed(&self.allow),
            Slot::Scoped(scope) => {
                if let Some(t) = self.scoped.get(scope) {
                    return TableRef::Scoped(t.clone());
                }
                let t = self.scoped.entry(scope.clone()).or_default().clone();
                self.any_scoped.store(true, Ordering::Release);
                TableRef::Scoped(t)
            }
            Slot::Pass(scope) => {
                if let Some(t) = self.passes.get(scope) {
                    return TableRef::Scoped(t.clone());
                }
                TableRef::Scoped(self.passes.entry(scope.clone()).or_default().clone())
            }
        }
    }

    /// Whether a live pass of the site `scope` covers `ip` (asked only of a request that
    /// would be challenged).
    pub fn passed(&self, scope: &Scope, ip: IpAddr) -> bool {
        self.passes
            .get(scope)
            .is_some_and(|t| !t.is_empty() && t.contains(ip))
    }

    /// Passes in all.
    pub fn passes_len(&self) -> usize {
        self.passes.iter().map(|t| t.len()).sum()
    }

    /// Every slot with a table: block, allow, then the scopes in use.
    pub fn slots(&self) -> Vec<Slot> {
        let mut slots = vec![Slot::Block, Slot::Allow];
        let mut scoped: Vec<Slot> = self
            .scoped
            .iter()
            .map(|r| Slot::Scoped(r.key().clone()))
            .collect();
        scoped.extend(self.passes.iter().map(|r| Slot::Pass(r.key().clone())));
        scoped.sort();
        slots.extend(scoped);
        slots
    }

    /// Whether a live scoped entry of one of `scopes` covers `ip` (the request path: no
    /// scoped entry at all is one atomic read).
    #[inline]
    pub fn blocked_in(&self, scopes: &[Scope], ip: IpAddr) -> bool {
        if scopes.is_empty() || !self.any_scoped.load(Ordering::Acquire) {
            return false;
        }
        scopes.iter().any(|s| {
            self.scoped
                .get(s)
                .is_some_and(|t| !t.is_empty() && t.contains(ip))
        })
    }

    /// Changes to the block and allow tables so far.
    pub fn generation(&self) -> u64 {
        self.block
            .generation()
            .wrapping_add(self.allow.generation())
    }

    /// Scoped entries in all.
    pub fn scoped_len(&self) -> usize {
        self.scoped.iter().map(|t| t.len()).sum()
    }
}

/// Drops the entries of one family's map expired at `now`, noting their targets.
fn sweep_map<K: Copy + Eq + std::hash::Hash>(
    map: &DashMap<(u8, K), Entry, Hasher>,
    now: u64,
    target: impl Fn(u8, K) -> Option<IpNet>,
    gone: &mut Vec<IpNet>,
) {
    map.retain(|&(len, net), e| {
        let keep = e.expires_at > now;
        if !keep {
            gone.extend(target(len, net));
        }
        keep
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(expires_at: u64) -> Entry {
        Entry::new(0, expires_at, "api", None)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A table holding each (network, milliseconds left) pair; also returns "now".
    fn table(entries: &[(&str, i64)]) -> (TempTable, u64) {
        let t = TempTable::default();
        let now = now_ms();
        for &(net, left) in entries {
            t.insert(net.parse().unwrap(), entry(now.saturating_add_signed(left)));
        }
        (t, now)
    }

    #[test]
    fn matches_by_prefix_until_expiry() {
        let (t, now) = table(&[
            ("10.0.0.0/24", 60_000),
            ("192.0.2.7/32", 60_000),
            ("2001:db8:1:2::/64", 60_000),
            ("198.51.100.1/32", -1),
        ]);
        assert!(t.contains(ip("10.0.0.255")));
        assert!(!t.contains(ip("10.0.1.0")));
        assert!(t.contains(ip("192.0.2.7")));
        assert!(!t.contains(ip("192.0.2.6")));
        assert!(t.contains(ip("2001:db8:1:2:ffff::1")));
        assert!(!t.contains(ip("2001:db8:1:3::1")));
        // Expired but not swept: never matches.
        assert!(!t.contains(ip("198.51.100.1")));
        assert_eq!(t.len(), 4);
        assert_eq!(
            t.sweep(now),
            vec!["198.51.100.1/32".parse::<IpNet>().unwrap()]
        );
        assert_eq!(t.len(), 3);
        assert!(t.remove("10.0.0.0/24".parse().unwrap()).is_some());
        assert!(!t.contains(ip("10.0.0.1")));
        // The /24 length is no longer probed.
        assert_eq!(t.v4_lens.load(Ordering::Relaxed), 1 << 32);
    }

    #[test]
    fn prefers_the_most_specific_entry() {
        let (t, now) = table(&[("10.0.0.0/8", 1000), ("10.1.2.3/32", 2000)]);
        let (net, e) = t.find(ip("10.1.2.3"), None).unwrap();
        assert_eq!(net.to_string(), "10.1.2.3/32");
        assert_eq!(e.expires_at, now + 2000);
        assert_eq!(t.covering(ip("10.1.2.3"), now).len(), 2);
    }
}
