//! An immutable CIDR set for one static list: the CIDRs merged into disjoint address ranges
//! sorted by start, per family, so membership is one binary search. The CIDRs as written are
//! kept beside it for listing and lookups on the admin path.

use std::net::IpAddr;

use ipnet::IpNet;

/// Disjoint inclusive ranges `[starts[i], ends[i]]`, sorted, with an index by the top 16
/// address bits: `index[b]` is the first range starting in bucket `b` or later, so a lookup
/// searches only the ranges of its bucket (and the one before, which may reach into it).
#[derive(Debug, Default, Clone)]
struct Ranges<T> {
    starts: Vec<T>,
    ends: Vec<T>,
    /// 65,537 entries, or empty for small sets where a plain binary search is as fast.
    index: Vec<u32>,
}

/// Below this many ranges, no bucket index (it costs 256 KiB).
const INDEX_FROM: usize = 4096;

impl<T: Copy + Ord + Bounded> Ranges<T> {
    fn build(mut ranges: Vec<(T, T)>) -> Self {
        ranges.sort_unstable();
        let mut out = Ranges {
            starts: Vec::with_capacity(ranges.len()),
            ends: Vec::with_capacity(ranges.len()),
            index: Vec::new(),
        };
        for (start, end) in ranges {
            if let Some(last) = out.ends.last_mut() {
                // Overlapping or adjacent: extend the previous range.
                if start <= *last || last.next() == Some(start) {
                    if end > *last {
                        *last = end;
                    }
                    continue;
                }
            }
            out.starts.push(start);
            out.ends.push(end);
        }
        out.starts.shrink_to_fit();
        out.ends.shrink_to_fit();
        if out.starts.len() >= INDEX_FROM {
            let mut index = Vec::with_capacity(65_537);
            let mut i = 0;
            for bucket in 0..=65_536usize {
                while i < out.starts.len() && out.starts[i].bucket() < bucket {
                    i += 1;
                }
                index.push(i as u32);
            }
            out.index = index;
        }
        out
    }

    #[inline]
    fn contains(&self, x: T) -> bool {
        let (lo, hi) = if self.index.is_empty() {
            (0, self.starts.len())
        } else {
            let b = x.bucket();
            // The range holding x starts in x's bucket or is the last one before it.
            (
                (self.index[b] as usize).saturating_sub(1),
                self.index[b + 1] as usize,
            )
        };
        // First range (within lo..hi) starting after x; the one before it may hold x.
        let i = lo + self.starts[lo..hi].partition_point(|&s| s <= x);
        i > 0 && x <= self.ends[i - 1]
    }

    fn len(&self) -> usize {
        self.starts.len()
    }
}

trait Bounded: Sized {
    fn next(self) -> Option<Self>;
    /// The top 16 bits.
    fn bucket(self) -> usize;
}

impl Bounded for u32 {
    fn next(self) -> Option<u32> {
        self.checked_add(1)
    }
    fn bucket(self) -> usize {
        (self >> 16) as usize
    }
}

impl Bounded for u128 {
    fn next(self) -> Option<u128> {
        self.checked_add(1)
    }
    fn bucket(self) -> usize {
        (self >> 112) as usize
    }
}

/// A set of IPv4 and IPv6 CIDRs.
#[derive(Debug, Default, Clone)]
pub struct CidrTable {
    v4: Ranges<u32>,
    v6: Ranges<u128>,
    /// The CIDRs as loaded (canonical, deduplicated, sorted).
    cidrs: Vec<IpNet>,
}

impl CidrTable {
    pub fn new(mut cidrs: Vec<IpNet>) -> CidrTable {
        cidrs.sort_unstable();
        cidrs.dedup();
        cidrs.shrink_to_fit();
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for net in &cidrs {
            match net {
                IpNet::V4(n) => v4.push((u32::from(n.network()), u32::from(n.broadcast()))),
                IpNet::V6(n) => v6.push((u128::from(n.network()), u128::from(n.broadcast()))),
            }
        }
        CidrTable {
            v4: Ranges::build(v4),
            v6: Ranges::build(v6),
            cidrs,
        }
    }

    /// Whether `ip` is in the set. IPv4-mapped IPv6 must already be turned into IPv4.
    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => self.v4.contains(u32::from(v4)),
            IpAddr::V6(v6) => self.v6.contains(u128::from(v6)),
        }
    }

    /// The CIDRs of the set that contain `ip` (admin path: a linear scan).
    pub fn matching(&self, ip: IpAddr) -> impl Iterator<Item = &IpNet> {
        let hit = self.contains(ip);
        self.cidrs.iter().filter(move |n| hit && n.contains(&ip))
    }

    /// Number of CIDRs as loaded.
    pub fn len(&self) -> usize {
        self.cidrs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cidrs.is_empty()
    }

    /// Number of disjoint ranges after merging.
    pub fn ranges(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn cidrs(&self) -> &[IpNet] {
        &self.cidrs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(nets: &[&str]) -> CidrTable {
        CidrTable::new(nets.iter().map(|s| s.parse().unwrap()).collect())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn finds_members_and_only_members() {
        let t = table(&[
            "10.0.0.0/8",
            "10.1.0.0/16",
            "192.0.2.7/32",
            "192.0.2.8/31",
            "2001:db8::/32",
            "0.0.0.0/32",
            "255.255.255.255/32",
        ]);
        for yes in [
            "10.0.0.0",
            "10.255.255.255",
            "10.1.2.3",
            "192.0.2.7",
            "192.0.2.8",
            "192.0.2.9",
            "2001:db8:ffff::1",
            "0.0.0.0",
            "255.255.255.255",
        ] {
            assert!(t.contains(ip(yes)), "{yes}");
        }
        for no in [
            "9.255.255.255",
            "11.0.0.0",
            "192.0.2.6",
            "192.0.2.10",
            "2001:db9::",
            "0.0.0.1",
            "::",
        ] {
            assert!(!t.contains(ip(no)), "{no}");
        }
        // 10/8 swallows 10.1/16; .7 and .8/31 are adjacent and merge.
        assert_eq!(t.ranges(), 5);
        assert_eq!(t.len(), 7);
        let m: Vec<String> = t.matching(ip("10.1.2.3")).map(|n| n.to_string()).collect();
        assert_eq!(m, vec!["10.0.0.0/8", "10.1.0.0/16"]);
    }

    #[test]
    fn agrees_with_a_linear_scan() {
        // Deterministic pseudo-random CIDRs and probes.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let nets: Vec<IpNet> = (0..20_000)
            .map(|_| {
                let addr = std::net::Ipv4Addr::from(next() as u32 & 0x0FFF_FFFF);
                let len = 20 + (next() % 13) as u8;
                IpNet::V4(ipnet::Ipv4Net::new(addr, len).unwrap().trunc())
            })
            .collect();
        let t = CidrTable::new(nets.clone());
        assert!(!t.v4.index.is_empty(), "the indexed path is not tested");
        for k in 0..3_000 {
            // Half the probes inside a listed network (hits), half anywhere (mostly misses).
            let raw = if k % 2 == 0 {
                match nets[(next() % nets.len() as u64) as usize] {
                    IpNet::V4(n) => {
                        u32::from(n.network()) | (next() as u32 & !u32::from(n.netmask()))
                    }
                    IpNet::V6(_) => unreachable!(),
                }
            } else {
                next() as u32 & 0x0FFF_FFFF
            };
            let probe = IpAddr::V4(std::net::Ipv4Addr::from(raw));
            assert_eq!(
                t.contains(probe),
                nets.iter().any(|n| n.contains(&probe)),
                "{probe}"
            );
        }
    }
}
