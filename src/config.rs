//! The configuration file: raw serde types (`RawConfig`, unknown keys rejected) compiled into
//! a validated [`Config`] where durations, addresses and CIDRs are parsed, names resolved and
//! every check lives. Every problem is collected, not just the first, and each names the file,
//! the key path and the line.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// One problem in a config file, list file or certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file the problem is in (the config file, or a list or certificate file it names).
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// Key path in the config, like `site[0].upstream`; empty for a whole-file problem.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found while loading a config; never empty.
#[derive(Debug, Clone, thiserror::Error)]
pub struct Errors(pub Vec<Problem>);

impl fmt::Display for Errors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Collects problems against one source file, resolving key paths to line numbers.
pub struct Report<'a> {
    file: &'a Path,
    doc: Option<toml_edit::ImDocument<&'a str>>,
    text: &'a str,
    problems: Vec<Problem>,
}

impl<'a> Report<'a> {
    pub fn new(file: &'a Path, text: &'a str) -> Self {
        let doc = toml_edit::ImDocument::parse(text).ok();
        Report {
            file,
            doc,
            text,
            problems: Vec::new(),
        }
    }

    /// Records a problem at a config key path such as `site[0].route[1].path`.
    pub fn key(&mut self, key: &str, message: impl Into<String>) {
        let line = self
            .doc
            .as_ref()
            .and_then(|d| span_of(d, key))
            .map(|offset| line_of(self.text, offset));
        self.problems.push(Problem {
            file: self.file.to_path_buf(),
            line,
            key: key.to_string(),
            message: message.into(),
        });
    }

    /// Records a problem in another file (a list or certificate file) named by a config key.
    pub fn other(&mut self, file: &Path, line: Option<usize>, key: &str, message: String) {
        self.problems.push(Problem {
            file: file.to_path_buf(),
            line,
            key: key.to_string(),
            message,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }

    pub fn finish<T>(self, value: T) -> Result<T, Errors> {
        if self.problems.is_empty() {
            Ok(value)
        } else {
            Err(Errors(self.problems))
        }
    }

    pub fn into_errors(self) -> Errors {
        Errors(self.problems)
    }
}

// ------------------------------------------------------------------ raw layer

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

/// A validated configuration. Paths are absolute or relative to the config file's directory.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was loaded from (for reload and error messages).
    pub source: PathBuf,
    pub gateway: Gateway,
    pub listeners: Vec<Listener>,
    pub tls: Tls,
    pub admin: Option<Admin>,
    pub privacy: Privacy,
    pub rate_limit: RateLimit,
    pub lists: Vec<List>,
    pub jails: Vec<Jail>,
    pub sites: Vec<Site>,
    pub limits: Limits,
    pub access_log: bool,
    pub demo_upstream: Option<SocketAddr>,
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
}

#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    pub requests_per_second: f64,
    pub burst: u32,
    pub ipv6_prefix: u8,
    pub dry_run: bool,
}

/// What an entry or list does: the one place its names are parsed and written (config,
/// store, admin API and CLI all use these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Block,
}

impl Action {
    pub const ALL: [Action; 2] = [Action::Block, Action::Allow];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Block => "block",
            Action::Allow => "allow",
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
            other => Err(format!("'{other}': action is \"block\" or \"allow\"")),
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
    pub status: Vec<u16>,
    pub hits: u32,
    pub window: Duration,
    pub ban: Duration,
    pub ban_factor: f64,
    pub max_ban: Duration,
    pub dry_run: bool,
}

#[derive(Debug, Clone)]
pub struct Site {
    /// Label in metrics and logs: `name`, or the first host.
    pub name: String,
    pub hosts: Vec<String>,
    pub upstream: http::Uri,
    pub upstream_timeout: Duration,
    pub rate_limit: Option<RateLimit>,
    pub jails: Vec<String>,
    pub allow_only: Vec<String>,
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub path: String,
    pub allow_only: Vec<String>,
    pub rate_limit: Option<RateLimit>,
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
}

pub const DEFAULT_CONFIG_PATH: &str = "config/ipgate.toml";

impl Config {
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
            let line = e.span().map(|s| line_of(text, s.start));
            Errors(vec![Problem {
                file: path.to_path_buf(),
                line,
                key: String::new(),
                message: e.message().to_string(),
            }])
        })?;
        let mut report = Report::new(path, text);
        let base = path.parent().unwrap_or(Path::new("."));
        let config = compile(raw, path, base, &mut report);
        report.finish(config)
    }
}

fn compile(raw: RawConfig, source: &Path, base: &Path, r: &mut Report) -> Config {
    let privacy = Privacy {
        max_retention: dur(r, "privacy.max_retention", raw.privacy.max_retention, "30d"),
        log_ip: match raw.privacy.log_ip.as_deref().unwrap_or("anonymized") {
            "full" => LogIp::Full,
            "anonymized" => LogIp::Anonymized,
            "none" => LogIp::None,
            other => {
                r.key(
                    "privacy.log_ip",
                    format!("'{other}': expected \"full\", \"anonymized\" or \"none\""),
                );
                LogIp::Anonymized
            }
        },
    };

    let gateway = Gateway {
        state_dir: resolve(
            base,
            raw.gateway
                .state_dir
                .as_deref()
                .unwrap_or("/var/lib/ipgate"),
        ),
        trusted_proxies: raw
            .gateway
            .trusted_proxies
            .iter()
            .enumerate()
            .filter_map(|(i, s)| cidr(r, &format!("gateway.trusted_proxies[{i}]"), s))
            .collect(),
        default_ban: dur(r, "gateway.default_ban", raw.gateway.default_ban, "1h"),
        workers: match raw.gateway.workers {
            None => std::thread::available_parallelism().map_or(1, usize::from),
            Some(n @ 1..=1024) => n,
            Some(n) => {
                r.key("gateway.workers", format!("{n}: expected 1 to 1024"));
                1
            }
        },
    };

    if raw.listeners.is_empty() {
        r.key("listener", "at least one [[listener]] is needed");
    }
    let mut listeners = Vec::new();
    for (i, l) in raw.listeners.iter().enumerate() {
        if let Some(addr) = socket_addr(r, &format!("listener[{i}].addr"), &l.addr) {
            if addr.port() != 0 && listeners.iter().any(|o: &Listener| o.addr == addr) {
                r.key(
                    &format!("listener[{i}].addr"),
                    format!("{addr} is used by another listener"),
                );
            }
            listeners.push(Listener {
                addr,
                tls: l.tls,
                proxy_protocol: l.proxy_protocol,
            });
        }
    }

    let raw_tls = raw.tls.unwrap_or_default();
    let tls = Tls {
        certificates: raw_tls
            .certificates
            .iter()
            .map(|c| CertificateFiles {
                cert: resolve(base, &c.cert),
                key: resolve(base, &c.key),
            })
            .collect(),
        self_signed: raw_tls.self_signed,
    };
    if raw.listeners.iter().any(|l| l.tls) && tls.certificates.is_empty() && !tls.self_signed {
        r.key(
            "tls.certificates",
            "a listener has tls = true but no certificate is configured (or set self_signed = true)",
        );
    }

    let admin = raw.admin.map(|a| Admin {
        addr: socket_addr(r, "admin.addr", &a.addr)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9191))),
        token_file: resolve(base, a.token_file.as_deref().unwrap_or("admin.token")),
    });

    let rate_limit = compile_rate_limit(r, "rate_limit", raw.rate_limit.as_ref(), None);

    let mut lists = Vec::new();
    for (name, l) in &raw.lists {
        let key = format!("lists.{name}");
        let action = match l.action.parse::<Action>() {
            Ok(a) => a,
            Err(e) => {
                r.key(&format!("{key}.action"), e);
                Action::Block
            }
        };
        let entries = l
            .entries
            .iter()
            .enumerate()
            .filter_map(|(i, s)| cidr(r, &format!("{key}.entries[{i}]"), s))
            .collect();
        let files = l.files.iter().map(|f| resolve(base, f)).collect();
        if l.dry_run && action == Action::Allow {
            r.key(
                &format!("{key}.dry_run"),
                "dry_run applies to block lists only",
            );
        }
        lists.push(List {
            name: name.clone(),
            action,
            entries,
            files,
            dry_run: l.dry_run,
        });
    }

    let mut jails: Vec<Jail> = Vec::new();
    for (i, j) in raw.jails.iter().enumerate() {
        let key = format!("jail[{i}]");
        if jails.iter().any(|o| o.name == j.name) {
            r.key(
                &format!("{key}.name"),
                format!("jail '{}' is defined twice", j.name),
            );
        }
        let method = j.method.as_deref().and_then(|m| {
            http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| r.key(&format!("{key}.method"), format!("'{m}' is not a method")))
                .ok()
        });
        if j.hits == 0 {
            r.key(&format!("{key}.hits"), "must be at least 1");
        }
        for (k, s) in j.status.iter().enumerate() {
            if !(100..=599).contains(s) {
                r.key(
                    &format!("{key}.status[{k}]"),
                    format!("{s} is not an HTTP status"),
                );
            }
        }
        let ban_factor = j.ban_factor.unwrap_or(2.0);
        if !(1.0..=100.0).contains(&ban_factor) {
            r.key(
                &format!("{key}.ban_factor"),
                "must be between 1.0 and 100.0",
            );
        }
        let window = dur(r, &format!("{key}.window"), Some(j.window.clone()), "");
        if window > privacy.max_retention {
            r.key(
                &format!("{key}.window"),
                "longer than privacy.max_retention: counters would outlive the retention promise",
            );
        }
        jails.push(Jail {
            name: j.name.clone(),
            method,
            path: match_path(r, &format!("{key}.path"), j.path.as_deref().unwrap_or("/")),
            hosts: j.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
            location: j.location.clone(),
            status: j.status.clone(),
            hits: j.hits,
            window,
            ban: dur(r, &format!("{key}.ban"), Some(j.ban.clone()), ""),
            ban_factor,
            max_ban: dur(r, &format!("{key}.max_ban"), j.max_ban.clone(), "7d"),
            dry_run: j.dry_run,
        });
    }

    let allow_lists: HashSet<&str> = lists
        .iter()
        .filter(|l| l.action == Action::Allow)
        .map(|l| l.name.as_str())
        .collect();
    let check_allow_only = |r: &mut Report, key: &str, names: &[String]| {
        for (k, n) in names.iter().enumerate() {
            if !allow_lists.contains(n.as_str()) {
                r.key(
                    &format!("{key}.allow_only[{k}]"),
                    format!("'{n}' is not a [lists.NAME] with action = \"allow\""),
                );
            }
        }
    };

    if raw.sites.is_empty() {
        r.key("site", "at least one [[site]] is needed");
    }
    let mut sites = Vec::new();
    let mut seen_hosts: HashSet<String> = HashSet::new();
    for (i, s) in raw.sites.iter().enumerate() {
        let key = format!("site[{i}]");
        if s.hosts.is_empty() {
            r.key(&format!("{key}.hosts"), "at least one host is needed");
        }
        let mut hosts = Vec::new();
        for (k, h) in s.hosts.iter().enumerate() {
            // Requests match without one trailing dot (SPEC 14): so does the config.
            let h = h.to_ascii_lowercase();
            let h = h.strip_suffix('.').map(str::to_string).unwrap_or(h);
            if h != "*" && (h.is_empty() || h.contains([':', '/', ' '])) {
                r.key(
                    &format!("{key}.hosts[{k}]"),
                    format!("'{h}' is not a host name (no port, no scheme)"),
                );
            } else if !seen_hosts.insert(h.clone()) {
                r.key(
                    &format!("{key}.hosts[{k}]"),
                    format!("'{h}' belongs to another site already"),
                );
            }
            hosts.push(h);
        }
        let upstream = upstream_uri(r, &format!("{key}.upstream"), &s.upstream);
        for (k, n) in s.jails.iter().enumerate() {
            if !jails.iter().any(|j| &j.name == n) {
                r.key(
                    &format!("{key}.jails[{k}]"),
                    format!("no [[jail]] is named '{n}'"),
                );
            }
        }
        check_allow_only(r, &key, &s.allow_only);
        let site_limit = s.rate_limit.as_ref().map(|rl| {
            compile_rate_limit(r, &format!("{key}.rate_limit"), Some(rl), Some(&rate_limit))
        });
        let mut routes = Vec::new();
        for (k, rt) in s.routes.iter().enumerate() {
            let rkey = format!("{key}.route[{k}]");
            let path = match_path(r, &format!("{rkey}.path"), &rt.path);
            check_allow_only(r, &rkey, &rt.allow_only);
            routes.push(Route {
                path,
                allow_only: rt.allow_only.clone(),
                rate_limit: rt.rate_limit.as_ref().map(|rl| {
                    compile_rate_limit(
                        r,
                        &format!("{rkey}.rate_limit"),
                        Some(rl),
                        Some(site_limit.as_ref().unwrap_or(&rate_limit)),
                    )
                }),
            });
        }
        sites.push(Site {
            name: s
                .name
                .clone()
                .or_else(|| hosts.first().cloned())
                .unwrap_or_default(),
            hosts,
            upstream,
            upstream_timeout: dur(
                r,
                &format!("{key}.upstream_timeout"),
                s.upstream_timeout.clone(),
                "60s",
            ),
            rate_limit: site_limit,
            jails: s.jails.clone(),
            allow_only: s.allow_only.clone(),
            routes,
        });
    }

    let l = &raw.limits;
    let max_header_bytes = l.max_header_bytes.unwrap_or(64 * 1024);
    if max_header_bytes < 8192 {
        r.key("limits.max_header_bytes", "must be at least 8192");
    }
    let max_connections = l.max_connections.unwrap_or(20_000);
    if max_connections == 0 {
        r.key("limits.max_connections", "must be at least 1");
    }
    let limits = Limits {
        max_connections,
        tls_handshake_timeout: dur(
            r,
            "limits.tls_handshake_timeout",
            l.tls_handshake_timeout.clone(),
            "10s",
        ),
        header_read_timeout: dur(
            r,
            "limits.header_read_timeout",
            l.header_read_timeout.clone(),
            "15s",
        ),
        max_header_bytes,
        http2_max_streams: l.http2_max_streams.unwrap_or(128),
        max_tracked_clients: l.max_tracked_clients.unwrap_or(100_000).max(2),
        shutdown_grace: dur(r, "limits.shutdown_grace", l.shutdown_grace.clone(), "30s"),
    };

    let access_log = match raw.log.access.as_deref().unwrap_or("stdout") {
        "stdout" => true,
        "off" => false,
        other => {
            r.key(
                "log.access",
                format!("'{other}': expected \"stdout\" or \"off\""),
            );
            true
        }
    };

    let demo_upstream = raw
        .demo_upstream
        .as_ref()
        .and_then(|d| socket_addr(r, "demo_upstream.addr", &d.addr));

    Config {
        source: source.to_path_buf(),
        gateway,
        listeners,
        tls,
        admin,
        privacy,
        rate_limit,
        lists,
        jails,
        sites,
        limits,
        access_log,
        demo_upstream,
    }
}

/// A `rate_limit` table; keys it leaves out come from `inherit` (site from global, route
/// from site) or the defaults.
fn compile_rate_limit(
    r: &mut Report,
    key: &str,
    raw: Option<&RawRateLimit>,
    inherit: Option<&RateLimit>,
) -> RateLimit {
    let base = inherit.cloned().unwrap_or(RateLimit {
        requests_per_second: 50.0,
        burst: 100,
        ipv6_prefix: 64,
        dry_run: false,
    });
    let Some(raw) = raw else { return base };
    let rl = RateLimit {
        requests_per_second: raw.requests_per_second.unwrap_or(base.requests_per_second),
        burst: raw.burst.unwrap_or(base.burst),
        ipv6_prefix: raw.ipv6_prefix.unwrap_or(base.ipv6_prefix),
        dry_run: raw.dry_run || base.dry_run,
    };
    if !(rl.requests_per_second > 0.0 && rl.requests_per_second.is_finite()) {
        r.key(
            &format!("{key}.requests_per_second"),
            "must be a positive number",
        );
    }
    if rl.burst == 0 {
        r.key(&format!("{key}.burst"), "must be at least 1");
    }
    if !(1..=128).contains(&rl.ipv6_prefix) {
        r.key(&format!("{key}.ipv6_prefix"), "must be between 1 and 128");
    }
    rl
}

/// Parses a duration like `90s`, `10m`, `1h`, `7d`; `default` when absent.
/// A route or jail path prefix, in the normal form request paths are matched in (SPEC 13).
fn match_path(r: &mut Report, key: &str, text: &str) -> String {
    match crate::path::normalize(text) {
        Ok(p) => p.into_owned(),
        Err(crate::path::Error::NotAbsolute) => {
            r.key(key, "must start with '/'");
            text.to_string()
        }
        Err(e) => {
            r.key(key, format!("'{text}': {e}"));
            text.to_string()
        }
    }
}

fn dur(r: &mut Report, key: &str, value: Option<String>, default: &str) -> Duration {
    let text = value.as_deref().unwrap_or(default);
    match parse_duration(text) {
        Ok(d) => d,
        Err(e) => {
            r.key(key, e);
            Duration::from_secs(1)
        }
    }
}

/// Parses the SPEC's DUR strings (`90s`, `10m`, `1h`, `7d`, or combinations like `1h30m`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| format!("'{text}' is not a duration like 90s, 10m, 1h or 7d ({e})"))?;
    if d.is_zero() {
        return Err(format!("'{text}': a duration must be longer than zero"));
    }
    Ok(d)
}

/// Parses an address or CIDR; a bare address is its /32 or /128. IPv4-mapped IPv6 becomes IPv4.
pub fn parse_target(text: &str) -> Result<IpNet, String> {
    let t = text.trim();
    let net = if t.contains('/') {
        t.parse::<IpNet>()
            .map_err(|_| format!("'{t}' is not an IP address or CIDR"))?
    } else {
        let ip: std::net::IpAddr = t
            .parse()
            .map_err(|_| format!("'{t}' is not an IP address or CIDR"))?;
        IpNet::from(ip)
    };
    Ok(canonical(net))
}

/// Host bits cleared, IPv4-mapped IPv6 (`::ffff:a.b.c.d/96+n`) turned into IPv4.
pub fn canonical(net: IpNet) -> IpNet {
    let net = net.trunc();
    if let IpNet::V6(v6) = net {
        if let Some(v4) = v6.addr().to_ipv4_mapped() {
            if v6.prefix_len() >= 96 {
                if let Ok(n) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96) {
                    return IpNet::V4(n.trunc());
                }
            }
        }
    }
    net
}

fn cidr(r: &mut Report, key: &str, text: &str) -> Option<IpNet> {
    parse_target(text).map_err(|e| r.key(key, e)).ok()
}

fn socket_addr(r: &mut Report, key: &str, text: &str) -> Option<SocketAddr> {
    text.parse()
        .map_err(|_| {
            r.key(
                key,
                format!("'{text}' is not an address with port, like 127.0.0.1:8443 or [::1]:8443"),
            )
        })
        .ok()
}

fn upstream_uri(r: &mut Report, key: &str, text: &str) -> http::Uri {
    let fallback = http::Uri::from_static("http://127.0.0.1");
    let uri: http::Uri = match text.parse() {
        Ok(u) => u,
        Err(e) => {
            r.key(key, format!("'{text}' is not a URL: {e}"));
            return fallback;
        }
    };
    if uri.scheme_str() != Some("http") {
        r.key(
            key,
            format!("'{text}': only http:// upstreams are supported (TLS ends at ipgate)"),
        );
        return fallback;
    }
    if uri.authority().is_none() {
        r.key(key, format!("'{text}' has no host"));
        return fallback;
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        r.key(
            key,
            format!("'{text}': an upstream is scheme://host:port, without a path"),
        );
    }
    uri
}

fn resolve(base: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Byte offset of the value at a key path like `site[0].route[1].path`, or failing that of
/// the nearest parent that exists.
fn span_of(doc: &toml_edit::ImDocument<&str>, key: &str) -> Option<usize> {
    use toml_edit::TableLike;
    let segments: Vec<&str> = key.split('.').collect();
    let mut table: &dyn TableLike = doc.as_table();
    let mut best = None;
    for (n, segment) in segments.iter().enumerate() {
        let (name, index) = match segment.split_once('[') {
            Some((name, rest)) => (name, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (*segment, None),
        };
        let Some(item) = table.get(name) else {
            return best;
        };
        best = item.span().map(|s| s.start).or(best);
        let next: Option<&dyn TableLike> = match index {
            None => item.as_table_like(),
            Some(i) => {
                if let Some(tables) = item.as_array_of_tables() {
                    let Some(t) = tables.get(i) else { return best };
                    best = t.span().map(|s| s.start).or(best);
                    Some(t as &dyn TableLike)
                } else {
                    let Some(v) = item.as_array().and_then(|a| a.get(i)) else {
                        return best;
                    };
                    best = v.span().map(|s| s.start).or(best);
                    v.as_inline_table().map(|t| t as &dyn TableLike)
                }
            }
        };
        if n + 1 == segments.len() {
            break;
        }
        match next {
            Some(t) => table = t,
            None => break,
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::state::Snapshot;

    const MINIMAL: &str = r#"
[[listener]]
addr = "127.0.0.1:0"

[[site]]
hosts = ["*"]
upstream = "http://127.0.0.1:9"
"#;

    fn problems(text: &str) -> Vec<Problem> {
        let dir = std::env::temp_dir();
        let path = dir.join("ipgate-test.toml");
        match Config::parse(&path, text) {
            Ok(c) => match Snapshot::build(c, &Metrics::new(), None) {
                Ok(_) => vec![],
                Err(e) => e.0,
            },
            Err(e) => e.0,
        }
    }

    #[test]
    fn every_shipped_config_passes_check() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            Snapshot::build(config, &Metrics::new(), None).unwrap_or_else(|e| panic!("{e}"));
            checked += 1;
        }
        assert!(checked >= 1);
    }

    #[test]
    fn minimal_config_is_valid_with_defaults() {
        let c = Config::parse(Path::new("x.toml"), MINIMAL).unwrap();
        assert_eq!(c.privacy.log_ip, LogIp::Anonymized);
        assert_eq!(c.privacy.max_retention, Duration::from_secs(30 * 86400));
        assert_eq!(c.gateway.default_ban, Duration::from_secs(3600));
        assert_eq!(c.sites[0].upstream_timeout, Duration::from_secs(60));
    }

    /// Each broken config names the key (and, where the key is in the file, its line).
    #[test]
    fn broken_configs_name_the_key_and_line() {
        let cases: &[(&str, &str, &str, Option<usize>)] = &[
            // (addition to MINIMAL, expected key, text in the message, expected line)
            ("[gateway]\nstat_dir = \"/x\"\n", "", "stat_dir", Some(9)),
            ("[gateway]\ndefault_ban = \"1 fortnight\"\n", "gateway.default_ban", "duration", Some(9)),
            ("[gateway]\nworkers = 0\n", "gateway.workers", "1 to 1024", Some(9)),
            ("[privacy]\nlog_ip = \"some\"\n", "privacy.log_ip", "anonymized", Some(9)),
            (
                "[lists.office]\naction = \"allow\"\nentries = [\"10.0.0.0/8\", \"10.0.0.300\"]\n",
                "lists.office.entries[1]",
                "10.0.0.300",
                Some(10),
            ),
            (
                "[[site]]\nhosts = [\"a.test\"]\nupstream = \"https://127.0.0.1:9\"\n",
                "site[1].upstream",
                "http://",
                Some(10),
            ),
            (
                "[[site]]\nhosts = [\"b.test\"]\nupstream = \"http://127.0.0.1:9\"\njails = [\"nope\"]\n",
                "site[1].jails[0]",
                "nope",
                Some(11),
            ),
            (
                "[lists.bad]\naction = \"block\"\n[[site]]\nhosts = [\"c.test\"]\nupstream = \"http://127.0.0.1:9\"\n[[site.route]]\npath = \"/pma\"\nallow_only = [\"bad\"]\n",
                "site[1].route[0].allow_only[0]",
                "allow",
                Some(15),
            ),
            (
                "[[site]]\nhosts = [\"*\"]\nupstream = \"http://127.0.0.1:9\"\n",
                "site[1].hosts[0]",
                "another site",
                Some(9),
            ),
            ("[limits]\nmax_header_bytes = 100\n", "limits.max_header_bytes", "8192", Some(9)),
            (
                "[privacy]\nmax_retention = \"1d\"\n[[jail]]\nname = \"j\"\nhits = 1\nwindow = \"2d\"\nban = \"1h\"\n",
                "jail[0].window",
                "max_retention",
                Some(13),
            ),
        ];
        for (add, key, text, line) in cases {
            let p = problems(&format!("{MINIMAL}{add}"));
            assert_eq!(p.len(), 1, "{add}: {p:?}");
            assert_eq!(p[0].key, *key, "{add}");
            assert!(p[0].message.contains(text), "{add}: {}", p[0].message);
            assert_eq!(p[0].line, *line, "{add}: {}", p[0]);
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
[[listener]]
addr = "nowhere"
tls = true

[privacy]
max_retention = "forever"

[[site]]
hosts = ["a.test"]
upstream = "ftp://x"
"#;
        let p = problems(text);
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "privacy.max_retention",
                "listener[0].addr",
                "tls.certificates",
                "site[0].upstream"
            ]
        );
        assert_eq!(p[1].line, Some(3));
        let shown = Errors(p).to_string();
        assert!(
            shown.contains("ipgate-test.toml:3: listener[0].addr:"),
            "{shown}"
        );
    }

    #[test]
    fn certificate_problems_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b.test".into()]).unwrap();
        std::fs::write(dir.path().join("a.crt"), a.cert.pem()).unwrap();
        std::fs::write(dir.path().join("b.key"), b.key_pair.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("junk.crt"), "not pem").unwrap();
        let text = format!(
            "{MINIMAL}[tls]\ncertificates = [{{ cert = \"a.crt\", key = \"b.key\" }}, \
             {{ cert = \"missing.crt\", key = \"b.key\" }}, {{ cert = \"junk.crt\", key = \"b.key\" }}]\n"
        );
        let path = dir.path().join("ipgate.toml");
        let config = Config::parse(&path, &text).unwrap();
        let p = Snapshot::build(config, &Metrics::new(), None)
            .err()
            .unwrap()
            .0;
        assert_eq!(p.len(), 3, "{p:?}");
        assert_eq!(p[0].key, "tls.certificates[0].key");
        assert!(p[0].message.contains("does not match"), "{}", p[0].message);
        assert_eq!(p[0].file, dir.path().join("b.key"));
        assert_eq!(p[1].key, "tls.certificates[1].cert");
        assert_eq!(p[1].file, dir.path().join("missing.crt"));
        assert!(p[1].message.contains("cannot read"), "{}", p[1].message);
        assert_eq!(p[2].key, "tls.certificates[2].cert");
    }

    #[test]
    fn targets_are_canonical() {
        assert_eq!(parse_target("10.1.2.3").unwrap().to_string(), "10.1.2.3/32");
        assert_eq!(
            parse_target("10.1.2.3/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            parse_target("::ffff:10.1.2.3").unwrap().to_string(),
            "10.1.2.3/32"
        );
        assert_eq!(
            parse_target("2001:db8::1/48").unwrap().to_string(),
            "2001:db8::/48"
        );
        assert!(parse_target("10.0.0.0/33").is_err());
        assert!(parse_target("example.nl").is_err());
    }

    #[test]
    fn durations_follow_the_spec() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
