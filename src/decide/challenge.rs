//! The proof-of-work challenge's decisions, without any I/O: puzzles that cost the gateway
//! no memory ([`Puzzles`]: each is signed with the gateway's key and bound to the client key,
//! the site, the way back and an expiry), the check of a solution, the puzzles already used
//! ([`Used`], bounded), and each site's load for auto mode ([`Load`]).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};

use aws_lc_rs::{digest, hmac};
use dashmap::DashMap;

use crate::config::ChallengeMode;

/// Longest way back kept in a puzzle; a longer one returns to `/`.
pub const MAX_RETURN: usize = 2048;

/// Puzzles for one key and difficulty.
pub struct Puzzles {
    key: hmac::Key,
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
            difficulty,
            ttl_ms,
        }
    }

    /// A new puzzle for `target` on `site`, to return to `back`.
    pub fn issue(&self, target: &str, site: &str, back: &str, now: u64) -> Issued {
        let mut id = [0u8; 8];
        // A failed read leaves zeros: the puzzle is still signed and bound, only less unique.
        let _ = getrandom::fill(&mut id);
        let back = if back.len() <= MAX_RETURN && back.starts_with('/') && !back.starts_with("//") {
            back
        } else {
            "/"
        };
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
        if n.len() > 20
            || !n.bytes().all(|b| b.is_ascii_digit())
            || !solves(&h, &n, puzzle.difficulty)
        {
            return Err(Failure::Unsolved);
        }
        Ok(puzzle)
    }
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

/// Puzzles solved already, until they expire: a solution is good once. Bounded: when full,
/// expired ones are dropped, and if none had expired, new solutions are refused until some
/// do (only solved puzzles enter, so filling it costs the filler the work of each).
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
        if self.ids.len() >= self.cap {
            self.ids.retain(|_, expires| *expires > now);
            if self.ids.len() >= self.cap {
                return false;
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

/// The operator's mode for a site, over the config's (`ipgate challenge SITE ...`).
const FORCED_NONE: u8 = 0;

/// One site's load as auto mode reads it, and the mode the operator forced: kept across
/// reloads while the site keeps its name. Every field is an atomic: the request path only
/// reads `challenging` and, on sites that may go into auto mode, counts.
#[derive(Default)]
pub struct Load {
    /// Requests sent to the upstream and waiting for its answer head.
    in_flight: AtomicU32,
    /// The most in flight since the last tick.
    peak: AtomicU32,
    /// Answer time's moving average, µs.
    answer_us: AtomicU64,
    /// A request waited for one of `max_upstream_connections` since the last tick.
    waited: AtomicBool,
    /// Auto mode finds the upstream saturated (or did within `auto_calm`).
    pub under_load: AtomicBool,
    /// When the upstream was last found saturated (ms).
    last_saturated: AtomicU64,
    /// `FORCED_NONE`, or 1 + the forced mode's index.
    forced: AtomicU8,
}

/// What one tick saw and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Entered,
    Left,
    None,
}

impl Load {
    /// The site's mode now: the operator's if forced, else `configured`.
    pub fn mode(&self, configured: ChallengeMode) -> ChallengeMode {
        match self.forced.load(Ordering::Relaxed) {
            1 => ChallengeMode::Off,
            2 => ChallengeMode::Always,
            3 => ChallengeMode::Auto,
            _ => configured,
        }
    }

    pub fn forced(&self) -> Option<ChallengeMode> {
        match self.forced.load(Ordering::Relaxed) {
            FORCED_NONE => None,
            _ => Some(self.mode(ChallengeMode::Off)),
        }
    }

    /// Forces a mode (`None`: back to the config's).
    pub fn force(&self, mode: Option<ChallengeMode>) {
        let v = match mode {
            None => FORCED_NONE,
            Some(ChallengeMode::Off) => 1,
            Some(ChallengeMode::Always) => 2,
            Some(ChallengeMode::Auto) => 3,
        };
        self.forced.store(v, Ordering::Relaxed);
    }

    /// Whether the site challenges every client without a pass now, in `mode`.
    #[inline]
    pub fn challenging(&self, mode: ChallengeMode) -> bool {
        match mode {
            ChallengeMode::Off => false,
            ChallengeMode::Always => true,
            ChallengeMode::Auto => self.under_load.load(Ordering::Relaxed),
        }
    }

    /// A request goes to the upstream.
    pub fn sent(&self) {
        let n = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(n, Ordering::Relaxed);
    }

    /// Its answer head came (or it failed) after `us` microseconds.
    pub fn answered(&self, us: u64) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        // An average over about the last eight answers; a lost race loses one sample.
        let old = self.answer_us.load(Ordering::Relaxed);
        let new = if old == 0 { us } else { old - old / 8 + us / 8 };
        self.answer_us.store(new, Ordering::Relaxed);
    }

    /// A request had to wait for one of the site's upstream connections.
    pub fn waited(&self) {
        self.waited.store(true, Ordering::Relaxed);
    }

    /// One look at the load (twice a second): saturated when `in_flight` requests wait for
    /// their answer head at once, when the average answer takes `answer` or longer, or when
    /// a request waited for an upstream connection; challenging stops after `calm` without.
    pub fn tick(&self, now: u64, in_flight: u32, answer: std::time::Duration, calm: u64) -> Change {
        let peak = self
            .peak
            .swap(self.in_flight.load(Ordering::Relaxed), Ordering::Relaxed);
        let waited = self.waited.swap(false, Ordering::Relaxed);
        let slow = self.answer_us.load(Ordering::Relaxed) >= answer.as_micros() as u64;
        if peak >= in_flight || waited || slow {
            self.last_saturated.store(now, Ordering::Relaxed);
            if !self.under_load.swap(true, Ordering::Relaxed) {
                return Change::Entered;
            }
        } else if self.under_load.load(Ordering::Relaxed)
            && now.saturating_sub(self.last_saturated.load(Ordering::Relaxed)) >= calm
        {
            self.under_load.store(false, Ordering::Relaxed);
            // A quiet site starts its next average afresh.
            self.answer_us.store(0, Ordering::Relaxed);
            return Change::Left;
        }
        Change::None
    }

    /// Answer-time average now (µs).
    pub fn answer_us(&self) -> u64 {
        self.answer_us.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
            ("https://evil/", "/"),
            ("/a?b", "/a?b"),
        ] {
            let issued = p.issue("192.0.2.7/32", "s", asked, 0);
            let puzzle = p.verify(&solved(&issued), "192.0.2.7/32", "s", 1).unwrap();
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
        // Full, nothing expired: refused rather than forgotten.
        assert!(!used.first_use(&puzzle("c", 100), 5));
        // "a" expired: room again.
        assert!(used.first_use(&puzzle("c", 100), 20));
        assert_eq!(used.len(), 2);
    }

    #[test]
    fn auto_mode_enters_on_load_and_leaves_after_calm() {
        let load = Load::default();
        let answer = Duration::from_secs(2);
        assert_eq!(load.tick(0, 3, answer, 1_000), Change::None);
        for _ in 0..3 {
            load.sent();
        }
        assert_eq!(load.tick(100, 3, answer, 1_000), Change::Entered);
        assert!(load.challenging(ChallengeMode::Auto));
        for _ in 0..3 {
            load.answered(1_000);
        }
        // They were in flight until just now: still saturated at this tick.
        assert_eq!(load.tick(600, 3, answer, 1_000), Change::None);
        // Quiet, but not for long enough yet.
        assert_eq!(load.tick(1_100, 3, answer, 1_000), Change::None);
        assert!(load.challenging(ChallengeMode::Auto));
        assert_eq!(load.tick(1_600, 3, answer, 1_000), Change::Left);
        assert!(!load.challenging(ChallengeMode::Auto));
        // Slow answers saturate too, and a wait for a connection.
        load.sent();
        load.answered(3_000_000);
        assert_eq!(load.tick(2_600, 3, answer, 1_000), Change::Entered);
        let calm = Load::default();
        calm.waited();
        assert_eq!(calm.tick(0, 3, answer, 1_000), Change::Entered);
        // The operator's mode wins over the config's.
        calm.force(Some(ChallengeMode::Off));
        assert_eq!(calm.mode(ChallengeMode::Auto), ChallengeMode::Off);
        assert_eq!(calm.forced(), Some(ChallengeMode::Off));
        calm.force(None);
        assert_eq!(calm.mode(ChallengeMode::Auto), ChallengeMode::Auto);
    }
}
