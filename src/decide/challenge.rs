//! The proof-of-work challenge's decisions, without any I/O: puzzles that cost the gateway
//! no memory ([`Puzzles`]: each is signed with the gateway's key and bound to the client key,
//! the site, the way back and an expiry), the check of a solution, the puzzles already used
//! ([`Used`], bounded). Each site's load for auto mode is [`crate::decide::load`].

use std::sync::atomic::{AtomicU64, Ordering};

use aws_lc_rs::{digest, hmac};
use dashmap::DashMap;

/// Paths under this are the challenge's own (answered by the gateway, never proxied).
pub const PREFIX: &str = "/.well-known/ipgate/";
/// Where a solution is sent.
pub const VERIFY: &str = "/.well-known/ipgate/challenge";

/// Longest way back kept in a puzzle; a longer one returns to `/`.
pub const MAX_RETURN: usize = 2048;

/// Puzzles for one key and difficulty.
pub struct Puzzles {
    key: hmac::Key,
    /// The key's bytes, for [`Puzzles::with`].
    secret: Vec<u8>,
    pub difficulty: u8,
    pub ttl_ms: u64,
}

/// What a puzzle says, as signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Puzzle {
    /// Expiry (ms since the epoch).
    pub expires: u64,
    /// Random, so two pages never carry the same puzzle; names it in the used set.
    pub id: String,
    pub site: String,
    /// The client key's target (`192.0.2.7/32`, `2001:db8:1:2::/64`).
    pub target: String,
    /// Path and query to go back to.
    pub back: String,
    pub difficulty: u8,
}

/// Why a solution is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("not a puzzle")]
    Malformed,
    #[error("the signature does not match")]
    Forged,
    #[error("the puzzle expired")]
    Expired,
    #[error("the puzzle was made for another client")]
    OtherClient,
    #[error("the puzzle was made for another site")]
    OtherSite,
    #[error("the proof of work is wrong")]
    Unsolved,
    #[error("the puzzle was used before")]
    Replayed,
}

impl Puzzle {
    /// The signed text: the fields in a fixed order, URL-encoded (which is also the query
    /// the page sends back).
    fn text(&self) -> String {
        form_urlencoded::Serializer::new(String::new())
            .append_pair("e", &self.expires.to_string())
            .append_pair("i", &self.id)
            .append_pair("d", &self.difficulty.to_string())
            .append_pair("s", &self.site)
            .append_pair("t", &self.target)
            .append_pair("r", &self.back)
            .finish()
    }

    /// When its page was served.
    pub fn issued_at(&self, ttl_ms: u64) -> u64 {
        self.expires.saturating_sub(ttl_ms)
    }
}

/// A puzzle as the page carries it: the query to send back (signature included), the
/// signature the work is done on, and the difficulty.
pub struct Issued {
    pub query: String,
    pub sig: String,
    pub difficulty: u8,
}

impl Puzzles {
    /// Puzzles signed with `secret` (at least 32 bytes).
    pub fn new(secret: &[u8], difficulty: u8, ttl_ms: u64) -> Puzzles {
        Puzzles {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            secret: secret.to_vec(),
            difficulty,
            ttl_ms,
        }
    }

    /// The same key with other settings.
    pub fn with(&self, difficulty: u8, ttl_ms: u64) -> Puzzles {
        Puzzles::new(&self.secret, difficulty, ttl_ms)
    }

    /// A new puzzle for `target` on `site`, to return to `back`.
    pub fn issue(&self, target: &str, site: &str, back: &str, now: u64) -> Issued {
        let mut id = [0u8; 8];
        if getrandom::fill(&mut id).is_err() {
            // No randomness: a counter still keeps ids apart (the used set is keyed by them).
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed) ^ now.rotate_left(20);
            id = n.to_le_bytes();
        }
        let back = if safe_back(back) { back } else { "/" };
        let puzzle = Puzzle {
            expires: now + self.ttl_ms,
            id: hex(&id),
            site: site.to_string(),
            target: target.to_string(),
            back: back.to_string(),
            difficulty: self.difficulty,
        };
        let text = puzzle.text();
        let sig = hex(hmac::sign(&self.key, text.as_bytes()).as_ref());
        Issued {
            query: format!("{text}&h={sig}"),
            sig,
            difficulty: self.difficulty,
        }
    }

    /// Checks a solution sent back as a query (`...&h=SIG&n=NONCE`) by the client `target`
    /// on `site`; returns the puzzle it solves. Whether it was used before is [`Used`]'s
    /// question.
    pub fn verify(
        &self,
        query: &str,
        target: &str,
        site: &str,
        now: u64,
    ) -> Result<Puzzle, Failure> {
        let mut fields: [Option<String>; 8] = Default::default();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            let slot = match k.as_ref() {
                "e" => 0,
                "i" => 1,
                "d" => 2,
                "s" => 3,
                "t" => 4,
                "r" => 5,
                "h" => 6,
                "n" => 7,
                _ => continue,
            };
            // A field given twice is not a puzzle this gateway made.
            if fields[slot].replace(v.into_owned()).is_some() {
                return Err(Failure::Malformed);
            }
        }
        let [Some(e), Some(i), Some(d), Some(s), Some(t), Some(r), Some(h), Some(n)] = fields
        else {
            return Err(Failure::Malformed);
        };
        let puzzle = Puzzle {
            expires: e.parse().map_err(|_| Failure::Malformed)?,
            id: i,
            site: s,
            target: t,
            back: r,
            difficulty: d.parse().map_err(|_| Failure::Malformed)?,
        };
        // One spelling only: 64 lower-case hex digits (the work is done on this text).
        if h.len() != 64 || !h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(Failure::Malformed);
        }
        let sig = unhex(&h).ok_or(Failure::Malformed)?;
        hmac::verify(&self.key, puzzle.text().as_bytes(), &sig).map_err(|_| Failure::Forged)?;
        if puzzle.expires <= now {
            return Err(Failure::Expired);
        }
        if puzzle.site != site {
            return Err(Failure::OtherSite);
        }
        if puzzle.target != target {
            return Err(Failure::OtherClient);
        }
        if !safe_back(&puzzle.back) {
            return Err(Failure::Malformed);
        }
        if n.len() > 20
            || !n.bytes().all(|b| b.is_ascii_digit())
            || !solves(&h, &n, puzzle.difficulty)
        {
            return Err(Failure::Unsolved);
        }
        Ok(puzzle)
    }
}

/// Whether a way back stays on this site: a path (not `//host` nor `/\\host`, which browsers
/// read as another host), printable ASCII, and not too long.
fn safe_back(back: &str) -> bool {
    back.len() <= MAX_RETURN
        && back.starts_with('/')
        && !back.starts_with("//")
        && !back.contains('\\')
        && back.bytes().all(|b| b.is_ascii_graphic())
}

/// Whether SHA-256 of `SIG:NONCE` starts with `bits` zero bits.
pub fn solves(sig: &str, nonce: &str, bits: u8) -> bool {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(sig.as_bytes());
    ctx.update(b":");
    ctx.update(nonce.as_bytes());
    leading_zero_bits(ctx.finish().as_ref()) >= u32::from(bits)
}

fn leading_zero_bits(hash: &[u8]) -> u32 {
    let mut n = 0;
    for &b in hash {
        if b == 0 {
            n += 8;
        } else {
            return n + b.leading_zeros();
        }
    }
    n
}

/// The smallest nonce that solves a puzzle (what the page computes; for tests and tools).
pub fn solve(sig: &str, bits: u8) -> u64 {
    (0u64..)
        .find(|n| solves(sig, &n.to_string(), bits))
        .unwrap_or(0)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Hex digits to bytes (`None` when not hex).
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A new random secret as hex (for `state_dir/challenge.key`).
pub fn new_secret() -> Result<String, getrandom::Error> {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key)?;
    Ok(hex(&key))
}

/// Puzzles solved already, until they expire: a solution is good once. It holds random ids
/// and expiry times only, no address. Bounded: when full, expired ones are dropped, and if
/// that is not enough, a tenth of the rest: a filler can then replay one of its own puzzles
/// (made for its own address), which gains it nothing it could not get by solving, while
/// real visitors' solutions are never refused for want of room.
pub struct Used {
    ids: DashMap<String, u64, foldhash::fast::RandomState>,
    cap: usize,
}

impl Used {
    pub fn new(cap: usize) -> Used {
        Used {
            ids: DashMap::with_hasher(Default::default()),
            cap,
        }
    }

    /// Marks a puzzle used; `false` when it was used before (or no room is left).
    pub fn first_use(&self, puzzle: &Puzzle, now: u64) -> bool {
        if self.ids.contains_key(&puzzle.id) {
            return false;
        }
        if self.ids.len() >= self.cap {
            self.ids.retain(|_, expires| *expires > now);
            if self.ids.len() >= self.cap {
                let mut n = 0usize;
                let drop = self.cap / 10 + 1;
                self.ids.retain(|_, _| {
                    n += 1;
                    n > drop
                });
            }
        }
        match self.ids.entry(puzzle.id.clone()) {
            dashmap::Entry::Occupied(_) => false,
            dashmap::Entry::Vacant(v) => {
                v.insert(puzzle.expires);
                true
            }
        }
    }

    /// Drops the expired ones.
    pub fn sweep(&self, now: u64) {
        self.ids.retain(|_, expires| *expires > now);
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn puzzles(bits: u8) -> Puzzles {
        Puzzles::new(&[7u8; 32], bits, 60_000)
    }

    fn solved(issued: &Issued) -> String {
        format!(
            "{}&n={}",
            issued.query,
            solve(&issued.sig, issued.difficulty)
        )
    }

    #[test]
    fn a_solved_puzzle_verifies_once_for_its_client_and_site() {
        let p = puzzles(8);
        let issued = p.issue("192.0.2.7/32", "shop", "/cart?x=1", 1_000);
        let answer = solved(&issued);
        let puzzle = p.verify(&answer, "192.0.2.7/32", "shop", 2_000).unwrap();
        assert_eq!(puzzle.back, "/cart?x=1");
        let used = Used::new(10);
        assert!(used.first_use(&puzzle, 2_000));
        assert!(!used.first_use(&puzzle, 2_000));
        assert_eq!(
            p.verify(&answer, "192.0.2.8/32", "shop", 2_000),
            Err(Failure::OtherClient)
        );
        assert_eq!(
            p.verify(&answer, "192.0.2.7/32", "blog", 2_000),
            Err(Failure::OtherSite)
        );
        assert_eq!(
            p.verify(&answer, "192.0.2.7/32", "shop", 61_000),
            Err(Failure::Expired)
        );
    }

    #[test]
    fn forged_and_unsolved_puzzles_are_refused() {
        let p = puzzles(8);
        let issued = p.issue("192.0.2.7/32", "shop", "/", 1_000);
        // Another key signs another puzzle.
        let other = Puzzles::new(&[8u8; 32], 8, 60_000).issue("192.0.2.7/32", "shop", "/", 1_000);
        assert_eq!(
            p.verify(&solved(&other), "192.0.2.7/32", "shop", 2_000),
            Err(Failure::Forged)
        );
        // A field changed after signing (a longer expiry).
        let stretched = solved(&issued).replacen("e=61000", "e=99999999", 1);
        assert_eq!(
            p.verify(&stretched, "192.0.2.7/32", "shop", 2_000),
            Err(Failure::Forged)
        );
        let wrong = (0u64..)
            .find(|n| !solves(&issued.sig, &n.to_string(), 8))
            .unwrap();
        assert_eq!(
            p.verify(
                &format!("{}&n={wrong}", issued.query),
                "192.0.2.7/32",
                "shop",
                2_000
            ),
            Err(Failure::Unsolved)
        );
        assert_eq!(
            p.verify("e=1&h=zz", "192.0.2.7/32", "shop", 2_000),
            Err(Failure::Malformed)
        );
        // The signature in capitals is the same bytes, but not the text the work is on.
        let upper = issued
            .query
            .replace(&issued.sig, &issued.sig.to_uppercase());
        let n = solve(&issued.sig, 8);
        assert_eq!(
            p.verify(&format!("{upper}&n={n}"), "192.0.2.7/32", "shop", 2_000),
            Err(Failure::Malformed)
        );
        let twice = format!("{}&n=1&n=2", issued.query);
        assert_eq!(
            p.verify(&twice, "192.0.2.7/32", "shop", 2_000),
            Err(Failure::Malformed)
        );
    }

    #[test]
    fn the_way_back_stays_on_the_site() {
        let p = puzzles(1);
        for (asked, back) in [
            ("//evil.example/", "/"),
            ("/\\evil.example/", "/"),
            ("https://evil/", "/"),
            ("/a\u{7f}b", "/"),
            ("/a?b", "/a?b"),
        ] {
            let issued = p.issue("192.0.2.7/32", "s", asked, 0);
            let puzzle = p.verify(&solved(&issued), "192.0.2.7/32", "s", 1);
            let puzzle = puzzle.unwrap_or_else(|e| panic!("{asked:?}: {e}"));
            assert_eq!(puzzle.back, back);
        }
    }

    #[test]
    fn the_used_set_is_bounded() {
        let used = Used::new(2);
        let puzzle = |id: &str, expires| Puzzle {
            expires,
            id: id.into(),
            site: String::new(),
            target: String::new(),
            back: String::new(),
            difficulty: 1,
        };
        assert!(used.first_use(&puzzle("a", 10), 0));
        assert!(used.first_use(&puzzle("b", 100), 0));
        assert!(!used.first_use(&puzzle("b", 100), 0));
        // Full, "a" expired: it makes room.
        assert!(used.first_use(&puzzle("c", 100), 20));
        assert_eq!(used.len(), 2);
        // Full, nothing expired: some make room, and a new solution is taken.
        assert!(used.first_use(&puzzle("d", 100), 30));
        assert!(used.len() <= 2);
    }
}
