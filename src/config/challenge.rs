//! `[challenge]` and the `challenge` keys of sites and routes: their compiled forms and
//! their checks.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::raw::RawChallenge;
use super::report::Report;
use super::values::*;
use super::Privacy;

/// `[challenge]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ChallengeSettings {
    /// Leading zero bits of SHA-256 a solution must have.
    pub difficulty: u8,
    /// How long a pass lasts (already capped by `privacy.max_retention`).
    pub pass_ttl: Duration,
    /// How long a puzzle may be solved after its page was served.
    pub puzzle_ttl: Duration,
    /// The key file; `None`: `state_dir/challenge.key`, made at first start.
    pub secret_file: Option<PathBuf>,
    /// Auto mode: saturated when this many requests wait for the upstream's answer head.
    pub auto_in_flight: u32,
    /// Auto mode: saturated when the upstream's answer time (moving average) reaches this.
    pub auto_response_time: Duration,
    /// Auto mode: challenging stops after this long without saturation.
    pub auto_calm: Duration,
    /// Passes held at most, all sites together.
    pub max_passes: usize,
}

/// When a site or route challenges clients without a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChallengeMode {
    Off,
    Always,
    /// While the site's upstream is saturated.
    Auto,
}

impl ChallengeMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ChallengeMode::Off => "off",
            ChallengeMode::Always => "always",
            ChallengeMode::Auto => "auto",
        }
    }
}

impl std::str::FromStr for ChallengeMode {
    type Err = String;

    fn from_str(s: &str) -> Result<ChallengeMode, String> {
        match s {
            "off" => Ok(ChallengeMode::Off),
            "always" | "on" => Ok(ChallengeMode::Always),
            "auto" => Ok(ChallengeMode::Auto),
            other => Err(format!("'{other}': \"off\", \"always\" or \"auto\"")),
        }
    }
}

/// `[challenge]`, with its defaults.
pub(super) fn compile(
    r: &mut Report,
    base: &Path,
    raw: Option<&RawChallenge>,
    privacy: &Privacy,
) -> ChallengeSettings {
    let default = RawChallenge::default();
    let c = raw.unwrap_or(&default);
    let difficulty = c.difficulty.unwrap_or(CHALLENGE_DIFFICULTY);
    if !(1..=MAX_CHALLENGE_DIFFICULTY).contains(&difficulty) {
        r.key(
            "challenge.difficulty",
            format!("must be between 1 and {MAX_CHALLENGE_DIFFICULTY} (bits)"),
        );
    }
    let pass_ttl = dur(r, "challenge.pass_ttl", c.pass_ttl.as_deref(), PASS_TTL);
    let puzzle_ttl = dur(
        r,
        "challenge.puzzle_ttl",
        c.puzzle_ttl.as_deref(),
        PUZZLE_TTL,
    );
    if puzzle_ttl < Duration::from_secs(1) {
        r.key(
            "challenge.puzzle_ttl",
            "at least 1s (a slow phone needs several)",
        );
    }
    let auto_in_flight = c.auto_in_flight.unwrap_or(AUTO_IN_FLIGHT);
    if auto_in_flight == 0 {
        r.key("challenge.auto_in_flight", "must be at least 1");
    }
    ChallengeSettings {
        difficulty,
        // No datum outlives privacy.max_retention.
        pass_ttl: pass_ttl.min(privacy.max_retention),
        puzzle_ttl,
        secret_file: c
            .secret_file
            .as_deref()
            .filter(|f| !f.is_empty())
            .map(|f| resolve(base, f)),
        auto_in_flight,
        auto_response_time: dur(
            r,
            "challenge.auto_response_time",
            c.auto_response_time.as_deref(),
            AUTO_RESPONSE_TIME,
        ),
        auto_calm: dur(r, "challenge.auto_calm", c.auto_calm.as_deref(), AUTO_CALM),
        max_passes: c.max_passes.unwrap_or(MAX_PASSES),
    }
}

impl super::Site {
    /// The challenge modes the config gives the site: its own, and its routes'.
    pub fn challenge_modes(&self) -> impl Iterator<Item = ChallengeMode> + '_ {
        std::iter::once(self.challenge).chain(self.routes.iter().filter_map(|r| r.challenge))
    }
}

/// A `challenge` key of a site or route.
pub(super) fn mode(r: &mut Report, key: &str, raw: Option<&str>) -> Option<ChallengeMode> {
    raw.and_then(|m| m.parse().map_err(|e: String| r.key(key, e)).ok())
}
