//! The admin API's request and response bodies, one set of types for the
//! server ([`crate::admin`]) and the CLI ([`crate::admin::cli`]), so the two cannot drift apart.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::Action;

/// An entry as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EntryView {
    pub target: String,
    pub action: Action,
    /// The list's name for config entries; `block` or `allow` for temporary ones.
    pub list: String,
    /// `config` (a static list), `feed` (a list fetched from a URL), `api`, or the jail's
    /// name.
    pub source: String,
    pub reason: Option<String>,
    /// RFC 3339, UTC; `null` for config entries.
    pub expires_at: Option<String>,
    /// A block entry that holds on some sites only: `site:NAME` (one site) or `jail:NAME`
    /// (the sites that name a jail with `scope = "site"`); absent: everywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// With a fleet: the gateway that made the entry (`fleet.gateway_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// With a fleet: whether the fleet has it (false while it waits in the outbox).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared: Option<bool>,
}

/// A certificate served (`GET /v1/certificates`, `ipgate certs`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CertificateView {
    pub names: Vec<String>,
    /// `file`, `acme` or `self_signed`.
    pub source: crate::state::tls::Source,
    /// The PEM chain's file, if it has one.
    pub file: Option<String>,
    /// RFC 3339, UTC.
    pub not_before: String,
    pub not_after: String,
    /// For ACME: when renewal starts (a third of the lifetime left).
    pub next_renewal: Option<String>,
}

/// `POST /v1/entries`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewEntry {
    pub target: String,
    pub action: Action,
    /// A DUR string (`90s`, `1h`, `7d`); the default ban when absent.
    pub ttl: Option<String>,
    pub reason: Option<String>,
    /// A block entry for this site only (`ipgate ban --site NAME`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
}

/// Any refusal: 400, 401, 404, 5xx.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

/// What the policy decides for an address at connection level.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// No list or entry covers it: served under the sites' own rules.
    Pass,
    Allow,
    Block,
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Decision::Pass => "pass",
            Decision::Allow => "allow",
            Decision::Block => "block",
        })
    }
}

/// The rule that made a decision.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum RuleView {
    Static {
        list: Option<String>,
        targets: Vec<String>,
    },
    Temporary {
        entry: EntryView,
    },
}

/// A rate limit that holds a bucket for the address.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LimitView {
    pub rule: String,
}

/// A jail's counter for the address.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CounterView {
    pub jail: String,
    pub hits: u32,
    pub window_started: String,
}

/// Offense history of the address (or its IPv6 prefix) against one jail.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OffenseView {
    pub jail: String,
    pub target: String,
    pub at: Vec<String>,
}

/// `GET /v1/ips/{ip}`: the decision, its rule, and every datum held about the address.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lookup {
    pub ip: String,
    pub decision: Decision,
    pub rule: Option<RuleView>,
    /// Temporary entries covering the address.
    pub entries: Vec<EntryView>,
    pub config_entries: Vec<EntryView>,
    pub rate_limits: Vec<LimitView>,
    pub jail_counters: Vec<CounterView>,
    pub offenses: Vec<OffenseView>,
    /// The address's autonomous system, from `geo.asn_database`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asn: Option<u32>,
    /// The address's country, from `geo.country_database`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    /// The lists that hold the address by its ASN or country.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub geo_rules: Vec<GeoRuleView>,
    /// Requests refused for the address (its client key) in the last hour, if any: a count
    /// kept for an hour without a refusal, erased by forget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused_last_hour: Option<u32>,
    /// Records of bans made on this gateway on the address (or its IPv6 prefix), newest
    /// first: RFC 3339 times, kept for `privacy.max_retention`, erased by forget.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ban_records: Vec<String>,
}

/// A list that holds an address by its ASN or country.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GeoRuleView {
    pub list: String,
    pub action: Action,
    /// `asn 64500` or `country NL`.
    pub matched: String,
}

/// What `forget` left in place: entries about a wider network, and configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Kept {
    pub entries: Vec<EntryView>,
    pub config_entries: Vec<EntryView>,
}

/// `DELETE /v1/ips/{ip}`: everything erased, and what was kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Forgotten {
    pub ip: String,
    pub erased: Vec<EntryView>,
    pub erased_rate_limits: Vec<LimitView>,
    pub erased_jail_counters: Vec<CounterView>,
    pub erased_offenses: Vec<OffenseView>,
    /// Records of bans on the address erased from this gateway's recent-ban list.
    #[serde(default)]
    pub erased_ban_records: usize,
    /// Whether a count of refused requests was erased.
    #[serde(default)]
    pub erased_refusals: bool,
    pub kept: Kept,
}

/// `POST /v1/reload`, 200.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reloaded {
    /// `ok`.
    pub result: String,
    pub sites: usize,
    /// Static entries per list.
    pub lists: BTreeMap<String, usize>,
    /// Changed keys that take effect only at restart.
    pub restart_required: Vec<String>,
}

/// One problem of a refused reload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProblemView {
    pub file: String,
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
    /// The whole problem as one line, as `ipgate check` prints it.
    pub text: String,
}

/// `POST /v1/reload`, 422.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadRefused {
    /// `refused`.
    pub result: String,
    pub errors: Vec<ProblemView>,
}

/// `GET`/`PUT /v1/sites/{name}/challenge`: a site's challenge mode.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChallengeView {
    pub site: String,
    /// The mode in force: the forced one, else the configured one.
    pub mode: crate::config::ChallengeMode,
    /// `site.challenge` in the config.
    pub configured: crate::config::ChallengeMode,
    /// What the operator forced (`ipgate challenge`), if anything.
    pub forced: Option<crate::config::ChallengeMode>,
    /// Whether the site challenges every client without a pass now.
    pub challenging: bool,
}

/// `PUT /v1/sites/{name}/challenge` body: `on`, `off`, `auto` or `config`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SetChallenge {
    pub mode: String,
}
