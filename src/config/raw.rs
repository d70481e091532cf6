//! The file as serde reads it: every key optional where the compiled config has a default,
//! unknown keys rejected (a misspelt key in a security gateway must fail loudly).

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub gateway: RawGateway,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<RawListener>,
    pub tls: Option<RawTls>,
    pub admin: Option<RawAdmin>,
    #[serde(default)]
    pub privacy: RawPrivacy,
    pub rate_limit: Option<RawRateLimit>,
    #[serde(default)]
    pub lists: BTreeMap<String, RawList>,
    #[serde(default, rename = "jail")]
    pub jails: Vec<RawJail>,
    #[serde(default, rename = "site")]
    pub sites: Vec<RawSite>,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub log: RawLog,
    pub demo_upstream: Option<RawDemoUpstream>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    pub state_dir: Option<String>,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    pub default_ban: Option<String>,
    /// Threads serving client connections, each with its own event loop and upstream pool.
    pub workers: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub addr: String,
    #[serde(default)]
    pub tls: bool,
    #[serde(default)]
    pub proxy_protocol: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    #[serde(default)]
    pub certificates: Vec<RawCertificate>,
    #[serde(default)]
    pub self_signed: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub addr: String,
    pub token_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrivacy {
    pub max_retention: Option<String>,
    pub log_ip: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub requests_per_second: Option<f64>,
    pub burst: Option<u32>,
    pub ipv6_prefix: Option<u8>,
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawList {
    pub action: String,
    #[serde(default)]
    pub entries: Vec<String>,
    #[serde(default)]
    pub files: Vec<String>,
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJail {
    pub name: String,
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSite {
    pub name: Option<String>,
    pub hosts: Vec<String>,
    pub upstream: String,
    pub upstream_timeout: Option<String>,
    pub rate_limit: Option<RawRateLimit>,
    #[serde(default)]
    pub jails: Vec<String>,
    #[serde(default)]
    pub allow_only: Vec<String>,
    #[serde(default, rename = "route")]
    pub routes: Vec<RawRoute>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub path: String,
    #[serde(default)]
    pub allow_only: Vec<String>,
    pub rate_limit: Option<RawRateLimit>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
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
    pub body_idle_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub access: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDemoUpstream {
    pub addr: String,
}

// ------------------------------------------------------------------ compiled layer
