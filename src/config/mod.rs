//! The configuration file: raw serde types (`RawConfig`, unknown keys rejected) compiled into
//! a validated [`Config`] where durations, addresses and CIDRs are parsed, names resolved and
//! every check lives. Every problem is collected, not just the first, and each names the file,
//! the key path and the line. `compile` turns each section into its compiled form (`jails`:
//! response and log jails; `services`: fleet, ACME, firewall), `values` holds the defaults,
//! `report` the problems, and [`schema`] the JSON Schema generated from the raw types.
//!
//! Uses: [`crate::normalize`] (route and jail paths are kept in the form requests are
//! matched in).

mod challenge;
mod compile;
mod feed;
mod geo;
mod jails;
mod raw;
mod report;
mod services;
#[cfg(test)]
mod tests;
pub mod values;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use challenge::{ChallengeMode, ChallengeSettings};
pub use feed::{copies_dir, feed_origin, is_loopback, Feed};
pub use geo::Geo;
pub use raw::RawConfig;
pub use report::{Errors, Problem, Report};
pub use values::{canonical, parse_duration, parse_target};

/// A validated configuration. Paths are absolute or relative to the config file's directory.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was loaded from (for reload and error messages).
    pub source: PathBuf,
    pub gateway: Gateway,
    pub listeners: Vec<Listener>,
    pub tls: Tls,
    /// `[admin]`; absent: no admin API.
    pub admin: Option<Admin>,
    pub privacy: Privacy,
    /// The default rate limit (`[rate_limit]`); sites and routes may have their own.
    pub rate_limit: RateLimit,
    pub limits: Limits,
    /// Static lists, in file order.
    pub lists: Vec<List>,
    pub jails: Vec<Jail>,
    pub sites: Vec<Site>,
    /// `log.access = "stdout"`.
    pub access_log: bool,
    /// The built-in demo page's address, for the quick start.
    pub demo_upstream: Option<SocketAddr>,
    /// `[fleet]`; absent: this gateway keeps its entries to itself.
    pub fleet: Option<Fleet>,
    /// `[acme]`; absent: certificates come from files only.
    pub acme: Option<Acme>,
    /// `[firewall]`; absent: ipgate touches no firewall. Restart-only.
    pub firewall: Option<Firewall>,
    /// `[challenge]`: the proof-of-work page and its passes.
    pub challenge: ChallengeSettings,
    /// `[geo]`: the databases lists by ASN and country are looked up in.
    pub geo: Geo,
}

/// The nftables mirror of the entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firewall {
    /// The one table (family inet) ipgate owns.
    pub table: String,
    /// TCP ports whose new connections from blocked clients are dropped.
    pub ports: Vec<u16>,
    /// Leave the table in place at stop (its timeouts still run out).
    pub keep_at_stop: bool,
    /// What the kernel does with a blocked client's new connection.
    pub verdict: Verdict,
    /// `firewall.connection_cap`: a client (IPv6: per `rate_limit.ipv6_prefix`) that holds
    /// `limits.max_connections_per_client` connections to `ports` has its new SYNs dropped by
    /// the kernel (allow-listed clients and trusted proxies exempt, as at accept).
    pub connection_cap: bool,
    /// The `nft` program.
    pub nft: PathBuf,
}

/// `firewall.verdict`: a blocked client's SYN is dropped (it waits and retries, as against a
/// host that is not there) or rejected with a TCP reset (it learns at once, as from ipgate's
/// own refusal at accept, and spends nothing waiting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Drop,
    Reject,
}

/// Where ACME certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acme {
    /// The directory URL (https).
    pub directory: String,
    /// `mailto:` addresses for the account.
    pub contact: Vec<String>,
    /// A CA to trust for the directory instead of the system's (a test CA).
    pub ca_file: Option<PathBuf>,
    pub challenge: Challenge,
}

/// How ipgate proves it holds a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenge {
    /// Answered on a plain listener (port 80).
    Http01,
    /// Answered in the TLS handshake on a TLS listener (port 443).
    TlsAlpn01,
}

/// The fleet's shared store. Restart-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fleet {
    /// `redis://` or `rediss://` URL (Redis or Valkey).
    pub redis: String,
    pub password_file: Option<PathBuf>,
    /// For `rediss://`: a CA to trust instead of the system's (PEM).
    pub ca_file: Option<PathBuf>,
    /// This gateway's name in the fleet: letters, digits, `-`, `_` and `.`.
    pub gateway_id: String,
}

#[derive(Debug, Clone)]
pub struct Gateway {
    pub state_dir: PathBuf,
    pub trusted_proxies: Vec<IpNet>,
    pub default_ban: Duration,
    /// Worker threads (`gateway.workers`; default: one per CPU). Restart-only.
    pub workers: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub addr: SocketAddr,
    pub tls: bool,
    pub proxy_protocol: bool,
    /// `tls = false` only: answer every request (but ACME's HTTP-01 challenges) with a
    /// redirect to HTTPS.
    pub redirect_https: bool,
    /// `tls = true` only: HTTP/3 on the same UDP port.
    pub http3: bool,
    /// Every QUIC client's address is validated with a Retry, not only under load.
    pub http3_retry_always: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Tls {
    pub certificates: Vec<CertificateFiles>,
    pub self_signed: bool,
}

#[derive(Debug, Clone)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Admin {
    pub addr: SocketAddr,
    pub token_file: PathBuf,
    /// Names (lower case, no trailing dot) the listener answers to besides its own address
    /// and `localhost`: any other Host gets 421, so a DNS-rebinding page in the operator's
    /// browser cannot read the listener.
    pub hosts: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogIp {
    Full,
    /// IPv4 to its /24, IPv6 to its /48.
    Anonymized,
    None,
}

#[derive(Debug, Clone)]
pub struct Privacy {
    pub max_retention: Duration,
    pub log_ip: LogIp,
    pub operator: Option<String>,
    pub contact: Option<String>,
    /// The path every site answers with the security overview.
    pub overview_path: Option<String>,
    pub self_service: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    pub requests_per_second: f64,
    pub burst: u32,
    pub ipv6_prefix: u8,
    pub dry_run: bool,
    /// `network`: a bucket per network as well (IPv4 /`ipv4_prefix`, IPv6 /`ipv6_prefix`).
    pub network: Option<NetworkLimit>,
}

/// `rate_limit.network`.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkLimit {
    pub ipv4_prefix: u8,
    pub ipv6_prefix: u8,
    pub rate: f64,
    pub burst: u32,
}

/// What an entry or list does: the one place its names are parsed and written (config,
/// store, admin API and CLI all use these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Block,
    /// A list's members are challenged (lists only).
    Challenge,
    /// A solved challenge: spares the client the challenge on one site (entries only).
    Pass,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Block => "block",
            Action::Allow => "allow",
            Action::Challenge => "challenge",
            Action::Pass => "pass",
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Action {
    type Err = String;

    fn from_str(s: &str) -> Result<Action, String> {
        match s {
            "block" => Ok(Action::Block),
            "allow" => Ok(Action::Allow),
            "challenge" => Ok(Action::Challenge),
            "pass" => Ok(Action::Pass),
            other => Err(format!(
                "'{other}': action is \"block\", \"allow\", \"challenge\" or \"pass\""
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct List {
    pub name: String,
    pub action: Action,
    pub entries: Vec<IpNet>,
    pub files: Vec<PathBuf>,
    pub dry_run: bool,
    /// Autonomous systems whose addresses the list holds.
    pub asns: Vec<u32>,
    /// Countries (upper-case ISO codes) whose addresses the list holds.
    pub countries: Vec<[u8; 2]>,
    /// Where the list's entries are fetched from, besides `entries` and `files`.
    pub feed: Option<Feed>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Jail {
    pub name: String,
    pub method: Option<http::Method>,
    /// Path prefix the request must have.
    pub path: String,
    /// Hosts the jail watches (empty: every host of the sites that name it).
    pub hosts: Vec<String>,
    /// Text the response's Location header must contain (tells a failed login's redirect
    /// from a successful one's).
    pub location: Option<String>,
    /// Response statuses that count (empty: any).
    pub status: Vec<u16>,
    /// Offenses within `window` that earn a ban.
    pub hits: u32,
    pub window: Duration,
    /// The first ban; each repeat multiplies it by `ban_factor`, up to `max_ban`.
    pub ban: Duration,
    pub ban_factor: f64,
    pub max_ban: Duration,
    /// Log and count the ban without enforcing it.
    pub dry_run: bool,
    /// `scope = "site"`: its bans hold only on the sites that name the jail.
    pub site_scoped: bool,
    /// Requests it watches that one client may have in flight at once; more get
    /// 429 at once. `u32::MAX`: no cap.
    pub concurrency: u32,
    /// `log`: the jail counts lines of these files instead of responses.
    pub log: Option<LogSource>,
    /// `challenge = true`: counts challenge pages served to a client without a pass, and
    /// bad solutions, instead of responses.
    pub challenge: bool,
}

/// What a log jail follows and counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSource {
    pub files: Vec<PathBuf>,
    /// The systemd journal instead of files.
    pub journal: Option<Journal>,
    /// Syslog tags whose messages count (`*` stands for any run of characters but `/`);
    /// empty: any tag, and any line.
    pub tags: Vec<String>,
    pub format: LogFormat,
    /// The `match` regex as written, `<ADDR>` and all.
    pub pattern: String,
    pub ignore: Option<String>,
}

/// How the lines of a followed file are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// A syslog line's prefix (traditional or RFC 3339 time stamp, host, tag, PID) is parsed
    /// and `match` sees the message; a line without one is seen whole, unless `tags` are set.
    Auto,
    /// Only syslog lines count; `match` sees their message.
    Syslog,
    /// The whole line is the message (an application's own log, like Roundcube's).
    Plain,
}

/// `jail.log.journal`: the systemd journal entries a log jail follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Journal {
    /// Units (`ssh.service`): entries of their processes (the journal's trusted
    /// `_SYSTEMD_UNIT`).
    pub units: Vec<String>,
    /// Syslog identifiers (`sshd`, `postfix/smtpd`).
    pub identifiers: Vec<String>,
    /// A journal folder other than the system's (`journalctl --directory`).
    pub directory: Option<PathBuf>,
}

/// What stands for the client address in a log jail's `match` pattern.
pub const ADDR: &str = "<ADDR>";
/// What stands for the address a line says the client came through (Roundcube's direct
/// peer): it must be this host, or a trusted proxy, or the line does not count.
pub const PROXY: &str = "<PROXY>";

#[derive(Debug, Clone)]
pub struct Site {
    /// Label in metrics and logs: `name`, or the first host.
    pub name: String,
    pub hosts: Vec<String>,
    pub upstream: http::Uri,
    pub upstream_timeout: Duration,
    /// Requests this gateway has at the upstream at once (each holds one upstream
    /// connection); more wait up to `limits.upstream_queue_timeout`, then get 503. None: no
    /// cap.
    pub max_upstream_connections: Option<usize>,
    /// `site.hsts`: the Strict-Transport-Security max-age added to its TLS responses.
    pub hsts: Option<Duration>,
    /// `site.acme`: its certificate comes from `[acme]`.
    pub acme: bool,
    pub rate_limit: Option<RateLimit>,
    pub jails: Vec<String>,
    pub allow_only: Vec<String>,
    pub routes: Vec<Route>,
    /// `site.challenge`.
    pub challenge: ChallengeMode,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub path: String,
    pub allow_only: Vec<String>,
    pub rate_limit: Option<RateLimit>,
    /// `route.challenge`: overrides the site's under this prefix.
    pub challenge: Option<ChallengeMode>,
}

/// Self-protection limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open client connections across all listeners; more are closed right after accept.
    pub max_connections: usize,
    pub tls_handshake_timeout: Duration,
    /// Time a client gets to send a complete request head, counted from connection start or
    /// from the end of the previous response: the slowloris guard and the HTTP/1.1 idle
    /// keep-alive timeout in one.
    pub header_read_timeout: Duration,
    /// Largest request head (HTTP/1.1 buffer, HTTP/2 header list); larger gets 431.
    pub max_header_bytes: usize,
    pub http2_max_streams: u32,
    /// Clients (IPv6: prefixes) each rate limit and each jail keeps state for; beyond it the
    /// longest idle are dropped (`ipgate_client_evictions_total`).
    pub max_tracked_clients: usize,
    /// How long requests in flight get to finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// Open connections of one client (IPv6: per `rate_limit.ipv6_prefix`), upgraded ones
    /// included; more are reset at accept. Allow-listed clients and trusted proxies are
    /// exempt.
    pub max_connections_per_client: u32,
    /// An HTTP/2 connection with no stream open for this long is closed.
    pub http2_idle_timeout: Duration,
    /// An upgraded connection (WebSocket) with no byte either way for this long is closed.
    pub upgrade_idle_timeout: Duration,
    /// A response the client stops reading (while the upstream has more) for this long is
    /// given up and its connection closed.
    pub write_idle_timeout: Duration,
    /// Requests of one client in flight at once (IPv6: per prefix), across its connections,
    /// each holding at most one upstream connection; more wait for a place up to
    /// `upstream_queue_timeout`, then get 429. Allow-listed clients and trusted proxies are
    /// exempt.
    pub max_requests_per_client: u32,
    /// Of those, requests whose body is too large to read ahead (`request_buffer_bytes`)
    /// and so streams to the upstream as slowly as the client sends it; more get 429.
    pub max_uploads_per_client: u32,
    /// A request body with no data from the client for this long is abandoned (the upstream
    /// request ends with an error), so a slow body holds no upstream worker for long.
    pub body_idle_timeout: Duration,
    /// A request body of at most this many bytes is read whole before an upstream
    /// connection is taken for it (0: never read ahead).
    pub request_buffer_bytes: usize,
    /// How long a request waits for one of its site's `max_upstream_connections` before
    /// it is answered 503.
    pub upstream_queue_timeout: Duration,
}

pub const DEFAULT_CONFIG_PATH: &str = "config/ipgate.toml";

/// The JSON Schema of the config file, generated from the types serde reads it into (so it
/// cannot drift from what `ipgate check` accepts): for editors such as taplo.
pub fn schema() -> String {
    let mut schema = schemars::schema_for!(raw::RawConfig);
    schema.insert("title".into(), "ipgate config".into());
    serde_json::to_string_pretty(&schema).unwrap_or_default()
}

impl Config {
    /// What `ipgate check` says of a config that loads but may not do what its author
    /// meant: log patterns not anchored at both ends, syslog jails that take any program's
    /// messages. Each names the jail's key.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        for (i, j) in self.jails.iter().enumerate() {
            let Some(log) = &j.log else { continue };
            if !log.anchored() {
                notes.push(format!(
                    "jail[{i}].log.match ('{}'): not anchored at both ends of the message \
                     (^...$), so it also finds a failure line quoted inside another message \
                     (a user name, a HELO, a file name)",
                    j.name
                ));
            }
            if log.tags.is_empty() && log.format != LogFormat::Plain && log.journal.is_none() {
                notes.push(format!(
                    "jail[{i}].log.tags ('{}'): none, so the messages of every program in the \
                     file count; name the daemon's tags (tags = [\"sshd\", \"sshd-session\"])",
                    j.name
                ));
            }
        }
        notes
    }

    /// The files this config reads besides itself, re-read when they change: list files,
    /// certificate chains and keys.
    pub fn watched_files(&self) -> impl Iterator<Item = &Path> {
        let lists = self.lists.iter().flat_map(|l| l.files.iter());
        let certs = self.tls.certificates.iter().flat_map(|p| [&p.cert, &p.key]);
        let geo = [&self.geo.asn_database, &self.geo.country_database];
        let geo = geo.into_iter().flatten();
        lists.chain(certs).chain(geo).map(PathBuf::as_path)
    }

    /// The keys whose change needs a restart and that differ in `next`. Everything else a
    /// reload applies: sites, lists, jails, rate limits, trusted proxies, privacy, TLS
    /// certificates, timeouts and header limits. These are bound or sized once at start:
    /// sockets, threads, the store, the connection semaphore, the access-log writer.
    pub fn restart_changes(&self, next: &Config) -> Vec<&'static str> {
        let admin = |c: &Config| c.admin.as_ref().map(|a| (a.addr, a.token_file.clone()));
        let mut changed = Vec::new();
        let mut check = |key: &'static str, differs: bool| {
            if differs {
                changed.push(key);
            }
        };
        check("listener", self.listeners != next.listeners);
        check(
            "admin.addr",
            admin(self).map(|a| a.0) != admin(next).map(|a| a.0),
        );
        check(
            "admin.token_file",
            admin(self).map(|a| a.1) != admin(next).map(|a| a.1),
        );
        check(
            "gateway.workers",
            self.gateway.workers != next.gateway.workers,
        );
        check(
            "gateway.state_dir",
            self.gateway.state_dir != next.gateway.state_dir,
        );
        check(
            "limits.max_connections",
            self.limits.max_connections != next.limits.max_connections,
        );
        check("log.access", self.access_log != next.access_log);
        check("demo_upstream", self.demo_upstream != next.demo_upstream);
        check("fleet", self.fleet != next.fleet);
        check("firewall", self.firewall != next.firewall);
        changed
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, Errors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Errors(vec![Problem {
                file: path.to_path_buf(),
                line: None,
                key: String::new(),
                message: format!("cannot read: {e}"),
            }])
        })?;
        Config::parse(path, &text)
    }

    /// Validates config text; `path` names it in errors and anchors relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Config, Errors> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| report::line_of(text, s.start));
            Errors(vec![Problem {
                file: path.to_path_buf(),
                line,
                key: String::new(),
                message: e.message().to_string(),
            }])
        })?;
        let mut report = Report::new(path, text);
        let base = path.parent().unwrap_or(Path::new("."));
        let config = compile::compile(raw, path, base, &mut report);
        report.finish(config)
    }
}
