//! Each site's load as the challenge's auto mode reads it ([`Load`]): requests waiting for
//! the upstream's answer head, the answer time, waits for an upstream connection; and the
//! mode the operator forced. Atomics only: the request path counts without locking.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};

use crate::config::ChallengeMode;

/// The operator's mode for a site, over the config's (`ipgate challenge SITE ...`).
const FORCED_NONE: u8 = 0;

/// Answers a tick must have timed before a slow average counts as saturation.
const MIN_SAMPLES: u32 = 3;

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
    /// Answers timed since the last tick.
    samples: AtomicU32,
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

    /// A request goes to the upstream: counted in flight until the guard is dropped (its
    /// answer head came, it failed, or the client went away and the request was dropped).
    /// `timed`: its answer time counts (not for a body streamed as slowly as the client
    /// sends it, nor an upgrade).
    pub fn sent(&self, timed: bool) -> Sending<'_> {
        let n = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(n, Ordering::Relaxed);
        Sending {
            load: self,
            since: timed.then(std::time::Instant::now),
            answered: false,
        }
    }

    fn answered(&self, us: Option<u64>) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let Some(us) = us else { return };
        self.samples.fetch_add(1, Ordering::Relaxed);
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
        // A slow average counts while answers keep coming: a few of them each tick.
        let samples = self.samples.swap(0, Ordering::Relaxed);
        let slow = samples >= MIN_SAMPLES
            && self.answer_us.load(Ordering::Relaxed) >= answer.as_micros() as u64;
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

/// A request at the upstream, as auto mode counts it (see [`Load::sent`]).
pub struct Sending<'a> {
    load: &'a Load,
    since: Option<std::time::Instant>,
    answered: bool,
}

impl Sending<'_> {
    /// The answer head came: its time counts.
    pub fn answered(mut self) {
        self.answered = true;
    }
}

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        // A request dropped before its answer (the client went away) leaves the count, but
        // its time says nothing of the upstream.
        let us = self
            .since
            .filter(|_| self.answered)
            .map(|t| t.elapsed().as_micros() as u64);
        self.load.answered(us);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn auto_mode_enters_on_load_and_leaves_after_calm() {
        let load = Load::default();
        let answer = Duration::from_secs(2);
        assert_eq!(load.tick(0, 3, answer, 1_000), Change::None);
        let sending: Vec<_> = (0..3).map(|_| load.sent(true)).collect();
        assert_eq!(load.tick(100, 3, answer, 1_000), Change::Entered);
        assert!(load.challenging(ChallengeMode::Auto));
        // Answered or dropped (the client went away): out of the count either way.
        for (i, s) in sending.into_iter().enumerate() {
            if i % 2 == 0 {
                s.answered();
            }
        }
        assert_eq!(load.in_flight.load(Ordering::Relaxed), 0);
        // They were in flight until just now: still saturated at this tick.
        assert_eq!(load.tick(600, 3, answer, 1_000), Change::None);
        // Quiet, but not for long enough yet.
        assert_eq!(load.tick(1_100, 3, answer, 1_000), Change::None);
        assert!(load.challenging(ChallengeMode::Auto));
        assert_eq!(load.tick(1_600, 3, answer, 1_000), Change::Left);
        assert!(!load.challenging(ChallengeMode::Auto));
        // Slow answers saturate too, when there are a few of them; and a wait for a
        // connection.
        let slow = |load: &Load| {
            let s = load.sent(true);
            std::thread::sleep(Duration::from_millis(3));
            s.answered();
        };
        let ms = Duration::from_millis(2);
        slow(&load);
        assert_eq!(load.tick(2_600, 3, ms, 1_000), Change::None, "one sample");
        for _ in 0..3 {
            slow(&load);
        }
        assert_eq!(load.tick(2_700, 3, ms, 1_000), Change::Entered);
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
