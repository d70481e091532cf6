//! The file as serde reads it: every key optional where the compiled config has a default,
//! unknown keys rejected (a misspelt key in a security gateway must fail loudly).

use std::collections::BTreeMap;

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    pub gateway: RawGateway,
    #[serde(rename = "listener")]
    pub listeners: Vec<RawListener>,
    pub tls: Option<RawTls>,
    pub admin: Option<RawAdmin>,
    pub privacy: RawPrivacy,
    pub rate_limit: Option<RawRateLimit>,
    pub lists: BTreeMap<String, RawList>,
    #[serde(rename = "jail")]
    pub jails: Vec<RawJail>,
    #[serde(rename = "site")]
    pub sites: Vec<RawSite>,
    pub limits: RawLimits,
    pub log: RawLog,
    pub demo_upstream: Option<RawDemoUpstream>,
    pub fleet: Option<RawFleet>,
    pub acme: Option<RawAcme>,
    pub firewall: Option<RawFirewall>,
    pub challenge: Option<RawChallenge>,
    pub geo: Option<RawGeo>,
}

/// `[geo]`: MaxMind-format databases for lists by ASN and country.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RawGeo {
    /// An ASN database (GeoLite2-ASN, DB-IP ASN Lite).
    pub asn_database: Option<String>,
    /// A country database (GeoLite2-Country, DB-IP Country Lite).
    pub country_database: Option<String>,
}

/// `[challenge]`: the proof-of-work page and the passes it makes.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RawChallenge {
    /// Leading zero bits of SHA-256 the page must find.
    pub difficulty: Option<u8>,
    /// How long a solved challenge spares the client.
    pub pass_ttl: Option<String>,
    /// How long one page's puzzle may be solved.
    pub puzzle_ttl: Option<String>,
    /// The key that signs puzzles (64 hex digits); default: `state_dir/challenge.key`.
    pub secret_file: Option<String>,
    /// Auto mode: requests waiting for the upstream's answer that make it saturated.
    pub auto_in_flight: Option<u32>,
    /// Auto mode: the upstream's answer time (moving average) that makes it saturated.
    pub auto_response_time: Option<String>,
    /// Auto mode: how long the upstream must stay unsaturated before challenging stops.
    pub auto_calm: Option<String>,
    /// Passes held at most (all sites); at the cap, no new pass is made until some expire.
    pub max_passes: Option<usize>,
}

/// `[firewall]`: the nftables table that mirrors the block and allow entries.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawFirewall {
    pub ports: Vec<u16>,
    pub table: Option<String>,
    #[serde(default)]
    pub keep_at_stop: bool,
    pub nft: Option<String>,
    /// `drop` (default) or `reject` (a TCP reset at once).
    pub verdict: Option<String>,
    /// `limits.max_connections_per_client` enforced by the kernel on `ports` too.
    #[serde(default)]
    pub connection_cap: bool,
}

/// `[acme]`: the ACME CA certificates come from for sites with `acme = true`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAcme {
    pub directory: String,
    #[serde(default)]
    pub contact: Vec<String>,
    pub ca_file: Option<String>,
    /// "http-01" or "tls-alpn-01" (default: http-01 when a plain listener exists).
    pub challenge: Option<String>,
}

/// `[fleet]`: the shared store (Redis or Valkey) and this gateway's name in it.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawFleet {
    pub redis: String,
    pub password_file: Option<String>,
    pub gateway_id: Option<String>,
    pub ca_file: Option<String>,
}

/// `[gateway]`: state directory, trusted proxies, default ban, workers.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RawGateway {
    pub state_dir: Option<String>,
    pub trusted_proxies: Vec<String>,
    pub default_ban: Option<String>,
    /// Threads serving client connections, each with its own event loop and upstream pool.
    pub workers: Option<usize>,
}

/// One `[[listener]]`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub addr: String,
    #[serde(default)]
    pub tls: bool,
    #[serde(default)]
    pub proxy_protocol: bool,
    #[serde(default)]
    pub redirect_https: bool,
    /// Also serve HTTP/3 (QUIC) on the same UDP port (a TLS listener only).
    #[serde(default)]
    pub http3: bool,
    /// When a QUIC client's address is checked with a Retry before any state is kept:
    /// `under_load` (default) or `always`.
    #[serde(default)]
    pub http3_retry: Option<String>,
}

/// `[tls]`: certificate files, or a self-signed fallback for testing.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RawTls {
    pub certificates: Vec<RawCertificate>,
    pub self_signed: bool,
}

/// One `[[tls.certificate]]` (PEM chain and key).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    pub cert: String,
    pub key: String,
}

/// `[admin]`: the API address (loopback) and its token file.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub addr: String,
    pub token_file: Option<String>,
    /// Host names the admin listener answers to besides its own address and `localhost`.
    #[serde(default)]
    pub hosts: Vec<String>,
}

/// `[privacy]`: the retention cap on IP-keyed data and how logs show addresses.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RawPrivacy {
    pub max_retention: Option<String>,
    pub log_ip: Option<String>,
    /// Who runs the sites, as the security overview names them.
    pub operator: Option<String>,
    /// Where visitors ask to see, correct or erase what is held (an e-mail address or URL).
    pub contact: Option<String>,
    /// A path every site answers with the security overview (e.g. "/security-overview").
    pub overview_path: Option<String>,
    /// The overview page also shows the visitor what is held about their own address.
    #[serde(default)]
    pub self_service: bool,
}

/// `[rate_limit]`, or a site's or route's own `rate_limit` table.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub requests_per_second: Option<f64>,
    pub burst: Option<u32>,
    pub ipv6_prefix: Option<u8>,
    #[serde(default)]
    pub dry_run: bool,
    /// A limit per network besides the one per client.
    pub network: Option<RawNetworkLimit>,
}

/// `rate_limit.network`: every network of this size shares one bucket.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawNetworkLimit {
    pub ipv4_prefix: Option<u8>,
    pub ipv6_prefix: Option<u8>,
    /// Requests per second the whole network may sustain.
    pub rate: f64,
    pub burst: Option<u32>,
}

/// One `[[list]]`: static CIDRs, inline or from files.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawList {
    /// "block", "allow" or "challenge".
    pub action: String,
    #[serde(default)]
    pub dry_run: bool,
    /// CIDRs or addresses written in the config.
    #[serde(default)]
    pub entries: Vec<String>,
    /// Files with one CIDR per line, watched for changes.
    #[serde(default)]
    pub files: Vec<String>,
    /// Autonomous system numbers (needs `geo.asn_database`).
    #[serde(default)]
    pub asn: Vec<u32>,
    /// ISO 3166-1 alpha-2 country codes (needs `geo.country_database`).
    #[serde(default)]
    pub country: Vec<String>,
    /// A feed: entries fetched from this URL (HTTPS, or plain HTTP to a loopback address).
    pub url: Option<String>,
    /// How often the feed is fetched (default 1h).
    pub refresh: Option<String>,
    /// PEM file of the CA certificates trusted for the feed, instead of the system's.
    pub ca_file: Option<String>,
    /// The largest drop in entries a new copy may show, in percent (default 50).
    pub max_shrink: Option<RawPercent>,
    /// The widest IPv4 prefix a feed may hold (default 8: nothing wider than a /8).
    pub max_prefix: Option<RawPrefix>,
    /// The widest IPv6 prefix a feed may hold (default 16).
    pub max_prefix_v6: Option<RawPrefix>,
    /// The most IPv4 addresses a whole copy may cover, as a prefix length: 4 (default) is
    /// as many as one /4 holds, a sixteenth of IPv4.
    pub max_coverage: Option<RawPrefix>,
    /// Networks whose feed entries are dropped (private ranges, your own).
    #[serde(default)]
    pub except: Vec<String>,
}

/// A share: `50` (percent), `"50%"` or `0.5`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum RawPercent {
    Number(f64),
    Text(String),
}

/// A prefix length: `8` or `"/8"`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum RawPrefix {
    Number(i64),
    Text(String),
}

/// One `[[jail]]`: what counts as an offense and how long it bans.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawJail {
    pub name: String,
    /// Counts challenge pages served to a client and bad solutions, not responses.
    #[serde(default)]
    pub challenge: bool,
    pub method: Option<String>,
    pub path: Option<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub status: Vec<u16>,
    pub location: Option<String>,
    pub hits: u32,
    pub window: String,
    pub ban: String,
    pub ban_factor: Option<f64>,
    pub max_ban: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
    /// "global" (default) or "site".
    pub scope: Option<String>,
    /// Watched requests per client in flight (0: no cap).
    pub concurrency: Option<u32>,
    /// A jail fed by log files instead of responses.
    pub log: Option<RawLogSource>,
    /// `journal` beside `log` (rather than inside it) means the same.
    pub journal: Option<RawJournal>,
}

/// `jail.log`: the files a log jail follows and the line that counts.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawLogSource {
    #[serde(default)]
    pub files: Vec<String>,
    /// The systemd journal instead of files.
    pub journal: Option<RawJournal>,
    /// The syslog tags (program names) whose messages count; empty: any.
    #[serde(default)]
    pub tags: Vec<String>,
    /// "auto" (default), "syslog" or "plain".
    pub format: Option<String>,
    /// A regex with one `<ADDR>` where the client address is.
    #[serde(rename = "match")]
    pub pattern: String,
    /// A regex: matching lines that also match this one do not count.
    pub ignore: Option<String>,
}

/// `jail.log.journal`: which journal entries a log jail follows.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawJournal {
    #[serde(default)]
    pub units: Vec<String>,
    #[serde(default)]
    pub identifiers: Vec<String>,
    pub directory: Option<String>,
}

/// One `[[site]]`: its hosts, upstream and policy.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSite {
    pub name: Option<String>,
    pub hosts: Vec<String>,
    pub upstream: String,
    pub upstream_timeout: Option<String>,
    pub max_upstream_connections: Option<usize>,
    pub hsts: Option<String>,
    #[serde(default)]
    pub acme: bool,
    pub rate_limit: Option<RawRateLimit>,
    #[serde(default)]
    pub jails: Vec<String>,
    #[serde(default)]
    pub allow_only: Vec<String>,
    /// "off", "always" or "auto".
    pub challenge: Option<String>,
    #[serde(default, rename = "route")]
    pub routes: Vec<RawRoute>,
}

/// One `[[site.route]]`: a path prefix with a stricter policy.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub path: String,
    #[serde(default)]
    pub allow_only: Vec<String>,
    pub rate_limit: Option<RawRateLimit>,
    /// "off", "always" or "auto": overrides the site's for this path prefix.
    pub challenge: Option<String>,
}

/// `[limits]`: every cap and timeout that bounds a client.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RawLimits {
    pub max_connections: Option<usize>,
    pub tls_handshake_timeout: Option<String>,
    pub header_read_timeout: Option<String>,
    pub max_header_bytes: Option<usize>,
    pub http2_max_streams: Option<u32>,
    pub max_tracked_clients: Option<usize>,
    pub shutdown_grace: Option<String>,
    pub max_connections_per_client: Option<u32>,
    pub http2_idle_timeout: Option<String>,
    pub upgrade_idle_timeout: Option<String>,
    pub write_idle_timeout: Option<String>,
    pub max_requests_per_client: Option<u32>,
    pub max_uploads_per_client: Option<u32>,
    pub body_idle_timeout: Option<String>,
    pub request_buffer_bytes: Option<usize>,
    pub upstream_queue_timeout: Option<String>,
}

/// `[log]`.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RawLog {
    pub access: Option<String>,
}

/// `[demo_upstream]`: the built-in page for the quick start.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawDemoUpstream {
    pub addr: String,
}

// ------------------------------------------------------------------ compiled layer
