//! Raw config to [`Config`]: one function per section, every check in them, every problem
//! reported against its key. Defaults are the typed constants of [`super::values`].

use std::collections::HashSet;
use std::path::Path;

use super::raw::*;
use super::report::Report;
use super::services;
use super::values::*;
use super::*;

pub(super) fn compile(raw: RawConfig, source: &Path, base: &Path, r: &mut Report) -> Config {
    // In file order, so problems are reported in the order a person reads them.
    let privacy = privacy(r, &raw.privacy);
    let gateway = gateway(r, base, &raw.gateway);
    let listeners = listeners(r, &raw.listeners);
    let tls = tls(r, base, &raw);
    let admin = raw.admin.as_ref().map(|a| admin(r, base, a));
    let rate_limit = compile_rate_limit(r, "rate_limit", raw.rate_limit.as_ref(), None);
    let geo = super::geo::compile(r, base, raw.geo.as_ref());
    let lists = lists(r, base, &raw, &geo, &gateway.state_dir);
    let jails = super::jails::jails(r, base, &raw.jails, &privacy);
    let sites = sites(r, &raw.sites, &lists, &jails, &rate_limit);
    let acme = services::acme(r, base, &raw, &listeners);
    let challenge = super::challenge::compile(r, base, raw.challenge.as_ref(), &privacy);
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
        limits: limits(r, &raw.limits),
        access_log: access_log(r, &raw.log),
        demo_upstream: raw
            .demo_upstream
            .as_ref()
            .and_then(|d| socket_addr(r, "demo_upstream.addr", &d.addr)),
        fleet: raw.fleet.as_ref().map(|f| services::fleet(r, base, f)),
        acme,
        firewall: raw.firewall.as_ref().map(|f| services::firewall(r, f)),
        challenge,
        geo,
    }
}

fn privacy(r: &mut Report, raw: &RawPrivacy) -> Privacy {
    let log_ip = match raw.log_ip.as_deref().unwrap_or("anonymized") {
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
    };
    Privacy {
        max_retention: dur(
            r,
            "privacy.max_retention",
            raw.max_retention.as_deref(),
            MAX_RETENTION,
        ),
        log_ip,
        operator: text(&raw.operator),
        contact: text(&raw.contact),
        overview_path: overview_path(r, raw),
        self_service: raw.self_service,
    }
}

/// A text key: trimmed, none when empty.
fn text(value: &Option<String>) -> Option<String> {
    value
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
}

/// `privacy.overview_path`: a plain absolute path, not one of ipgate's own; `self_service`
/// needs it.
fn overview_path(r: &mut Report, raw: &RawPrivacy) -> Option<String> {
    let path = text(&raw.overview_path);
    if raw.self_service && path.is_none() {
        r.key(
            "privacy.self_service",
            "needs privacy.overview_path (the page it is shown on)",
        );
    }
    let p = path?;
    let plain = p.starts_with('/')
        && !p.starts_with("//")
        && p.bytes()
            .all(|b| b.is_ascii_graphic() && !b"?#%\\".contains(&b));
    if !plain {
        r.key(
            "privacy.overview_path",
            format!("'{p}': expected a plain path like /security-overview (no query, no %)"),
        );
        return None;
    }
    // The challenge's folder (decide::challenge::PREFIX).
    if p.starts_with("/.well-known/ipgate/") {
        r.key(
            "privacy.overview_path",
            format!("'{p}' is under /.well-known/ipgate/, which ipgate keeps for its own pages"),
        );
        return None;
    }
    Some(p)
}

fn gateway(r: &mut Report, base: &Path, raw: &RawGateway) -> Gateway {
    Gateway {
        state_dir: resolve(base, raw.state_dir.as_deref().unwrap_or(STATE_DIR)),
        trusted_proxies: raw
            .trusted_proxies
            .iter()
            .enumerate()
            .filter_map(|(i, s)| cidr(r, &format!("gateway.trusted_proxies[{i}]"), s))
            .collect(),
        default_ban: dur(
            r,
            "gateway.default_ban",
            raw.default_ban.as_deref(),
            DEFAULT_BAN,
        ),
        workers: match raw.workers {
            None => std::thread::available_parallelism().map_or(1, usize::from),
            Some(n @ 1..=1024) => n,
            Some(n) => {
                r.key("gateway.workers", format!("{n}: expected 1 to 1024"));
                1
            }
        },
    }
}

fn listeners(r: &mut Report, raw: &[RawListener]) -> Vec<Listener> {
    if raw.is_empty() {
        r.key("listener", "at least one [[listener]] is needed");
    }
    let mut listeners: Vec<Listener> = Vec::new();
    for (i, l) in raw.iter().enumerate() {
        let key = format!("listener[{i}].addr");
        let Some(addr) = socket_addr(r, &key, &l.addr) else {
            continue;
        };
        if addr.port() != 0 && listeners.iter().any(|o| o.addr == addr) {
            r.key(&key, format!("{addr} is used by another listener"));
        }
        if l.redirect_https && l.tls {
            r.key(
                &format!("listener[{i}].redirect_https"),
                "only a tls = false listener redirects to HTTPS",
            );
        }
        if l.http3 && (!l.tls || l.proxy_protocol) {
            r.key(
                &format!("listener[{i}].http3"),
                "only a tls = true listener without proxy_protocol serves HTTP/3",
            );
        }
        let retry = l.http3_retry.as_deref().unwrap_or("under_load");
        if !matches!(retry, "under_load" | "always") {
            r.key(
                &format!("listener[{i}].http3_retry"),
                format!("'{retry}': expected \"under_load\" or \"always\""),
            );
        }
        listeners.push(Listener {
            addr,
            tls: l.tls,
            proxy_protocol: l.proxy_protocol,
            redirect_https: l.redirect_https,
            http3: l.http3,
            http3_retry_always: retry == "always",
        });
    }
    listeners
}

fn tls(r: &mut Report, base: &Path, raw: &RawConfig) -> Tls {
    let empty = RawTls::default();
    let t = raw.tls.as_ref().unwrap_or(&empty);
    let tls = Tls {
        certificates: t
            .certificates
            .iter()
            .map(|c| CertificateFiles {
                cert: resolve(base, &c.cert),
                key: resolve(base, &c.key),
            })
            .collect(),
        self_signed: t.self_signed,
    };
    let acme = raw.acme.is_some() && raw.sites.iter().any(|s| s.acme);
    if raw.listeners.iter().any(|l| l.tls)
        && tls.certificates.is_empty()
        && !tls.self_signed
        && !acme
    {
        r.key(
            "tls.certificates",
            "a listener has tls = true but no certificate is configured (or set self_signed = true)",
        );
    }
    tls
}

fn admin(r: &mut Report, base: &Path, raw: &RawAdmin) -> Admin {
    Admin {
        addr: socket_addr(r, "admin.addr", &raw.addr).unwrap_or(ADMIN_ADDR),
        token_file: resolve(base, raw.token_file.as_deref().unwrap_or(ADMIN_TOKEN_FILE)),
        hosts: raw.hosts.iter().map(|h| host_key(h)).collect(),
    }
}

fn lists(r: &mut Report, base: &Path, raw: &RawConfig, geo: &Geo, state_dir: &Path) -> Vec<List> {
    let mut lists = Vec::new();
    for (name, l) in &raw.lists {
        let key = format!("lists.{name}");
        let action = l.action.parse::<Action>().unwrap_or_else(|e| {
            r.key(&format!("{key}.action"), e);
            Action::Block
        });
        let entries = l
            .entries
            .iter()
            .enumerate()
            .filter_map(|(i, s)| cidr(r, &format!("{key}.entries[{i}]"), s))
            .collect();
        if action == Action::Pass {
            r.key(
                &format!("{key}.action"),
                "a pass is made by solving the challenge: a list's action is \"block\", \"allow\" or \"challenge\"",
            );
        }
        if l.dry_run && action != Action::Block {
            r.key(
                &format!("{key}.dry_run"),
                "dry_run applies to block lists only",
            );
        }
        let (asns, countries) = super::geo::list_keys(r, &key, l, geo);
        let feed = super::feed::compile(r, &key, name, l, base, state_dir);
        lists.push(List {
            name: name.clone(),
            action,
            entries,
            files: l.files.iter().map(|f| resolve(base, f)).collect(),
            dry_run: l.dry_run,
            asns,
            countries,
            feed,
        });
    }
    lists
}

/// What a site needs to check its references against.
struct Known<'a> {
    allow_lists: HashSet<&'a str>,
    jails: &'a [Jail],
    rate_limit: &'a RateLimit,
}

impl Known<'_> {
    fn check_allow_only(&self, r: &mut Report, key: &str, names: &[String]) {
        for (k, n) in names.iter().enumerate() {
            if !self.allow_lists.contains(n.as_str()) {
                r.key(
                    &format!("{key}.allow_only[{k}]"),
                    format!("'{n}' is not a [lists.NAME] with action = \"allow\""),
                );
            }
        }
    }
}

fn sites(
    r: &mut Report,
    raw: &[RawSite],
    lists: &[List],
    jails: &[Jail],
    rate_limit: &RateLimit,
) -> Vec<Site> {
    let known = Known {
        allow_lists: lists
            .iter()
            .filter(|l| l.action == Action::Allow)
            .map(|l| l.name.as_str())
            .collect(),
        jails,
        rate_limit,
    };
    if raw.is_empty() {
        r.key("site", "at least one [[site]] is needed");
    }
    let mut seen_hosts: HashSet<String> = HashSet::new();
    raw.iter()
        .enumerate()
        .map(|(i, s)| site(r, &format!("site[{i}]"), s, &known, &mut seen_hosts))
        .collect()
}

fn site(
    r: &mut Report,
    key: &str,
    s: &RawSite,
    known: &Known,
    seen_hosts: &mut HashSet<String>,
) -> Site {
    if s.hosts.is_empty() {
        r.key(&format!("{key}.hosts"), "at least one host is needed");
    }
    let mut hosts = Vec::new();
    for (k, h) in s.hosts.iter().enumerate() {
        let h = host_key(h);
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
    for (k, n) in s.jails.iter().enumerate() {
        match known.jails.iter().find(|j| &j.name == n) {
            None => r.key(
                &format!("{key}.jails[{k}]"),
                format!("no [[jail]] is named '{n}'"),
            ),
            Some(j) if j.log.is_some() => r.key(
                &format!("{key}.jails[{k}]"),
                format!("jail '{n}' reads a log: sites do not name it"),
            ),
            Some(_) => {}
        }
    }
    known.check_allow_only(r, key, &s.allow_only);
    let rate_limit = s.rate_limit.as_ref().map(|rl| {
        compile_rate_limit(
            r,
            &format!("{key}.rate_limit"),
            Some(rl),
            Some(known.rate_limit),
        )
    });
    let inherited = rate_limit.as_ref().unwrap_or(known.rate_limit);
    let routes = s
        .routes
        .iter()
        .enumerate()
        .map(|(k, rt)| route(r, &format!("{key}.route[{k}]"), rt, known, inherited))
        .collect();
    Site {
        name: s
            .name
            .clone()
            .or_else(|| hosts.first().cloned())
            .unwrap_or_default(),
        hosts,
        upstream: upstream_uri(r, &format!("{key}.upstream"), &s.upstream),
        upstream_timeout: dur(
            r,
            &format!("{key}.upstream_timeout"),
            s.upstream_timeout.as_deref(),
            UPSTREAM_TIMEOUT,
        ),
        max_upstream_connections: match s.max_upstream_connections {
            Some(0) => {
                r.key(
                    &format!("{key}.max_upstream_connections"),
                    "must be at least 1 (leave it out for no cap)",
                );
                None
            }
            n => n,
        },
        hsts: s.hsts.as_deref().map(|h| {
            let key = format!("{key}.hsts");
            let d = required_dur(r, &key, h);
            if d < Duration::from_secs(1) {
                r.key(
                    &key,
                    "a max-age of at least 1s is needed (leave hsts out for none)",
                );
            }
            d
        }),
        acme: s.acme,
        rate_limit,
        jails: s.jails.clone(),
        allow_only: s.allow_only.clone(),
        routes,
        challenge: super::challenge::mode(r, &format!("{key}.challenge"), s.challenge.as_deref())
            .unwrap_or(ChallengeMode::Off),
    }
}

fn route(r: &mut Report, key: &str, rt: &RawRoute, known: &Known, inherit: &RateLimit) -> Route {
    let path = match_path(r, &format!("{key}.path"), &rt.path);
    known.check_allow_only(r, key, &rt.allow_only);
    Route {
        path,
        allow_only: rt.allow_only.clone(),
        rate_limit: rt
            .rate_limit
            .as_ref()
            .map(|rl| compile_rate_limit(r, &format!("{key}.rate_limit"), Some(rl), Some(inherit))),
        challenge: super::challenge::mode(r, &format!("{key}.challenge"), rt.challenge.as_deref()),
    }
}

fn limits(r: &mut Report, l: &RawLimits) -> Limits {
    let max_header_bytes = l.max_header_bytes.unwrap_or(MAX_HEADER_BYTES);
    if max_header_bytes < 8192 {
        r.key("limits.max_header_bytes", "must be at least 8192");
    }
    let max_connections = l.max_connections.unwrap_or(MAX_CONNECTIONS);
    if max_connections == 0 {
        r.key("limits.max_connections", "must be at least 1");
    }
    let max_connections_per_client = l
        .max_connections_per_client
        .unwrap_or(MAX_CONNECTIONS_PER_CLIENT);
    if max_connections_per_client == 0 {
        r.key("limits.max_connections_per_client", "must be at least 1");
    }
    let request_buffer_bytes = l.request_buffer_bytes.unwrap_or(REQUEST_BUFFER_BYTES);
    if request_buffer_bytes > MAX_REQUEST_BUFFER_BYTES {
        r.key(
            "limits.request_buffer_bytes",
            format!("must be at most {MAX_REQUEST_BUFFER_BYTES} (16 MiB)"),
        );
    }
    let mut d = |key: &str, value: &Option<String>, default| {
        dur(r, &format!("limits.{key}"), value.as_deref(), default)
    };
    Limits {
        max_connections,
        tls_handshake_timeout: d(
            "tls_handshake_timeout",
            &l.tls_handshake_timeout,
            TLS_HANDSHAKE_TIMEOUT,
        ),
        header_read_timeout: d(
            "header_read_timeout",
            &l.header_read_timeout,
            HEADER_READ_TIMEOUT,
        ),
        shutdown_grace: d("shutdown_grace", &l.shutdown_grace, SHUTDOWN_GRACE),
        http2_idle_timeout: d(
            "http2_idle_timeout",
            &l.http2_idle_timeout,
            HTTP2_IDLE_TIMEOUT,
        ),
        upgrade_idle_timeout: d(
            "upgrade_idle_timeout",
            &l.upgrade_idle_timeout,
            UPGRADE_IDLE_TIMEOUT,
        ),
        body_idle_timeout: d("body_idle_timeout", &l.body_idle_timeout, BODY_IDLE_TIMEOUT),
        upstream_queue_timeout: d(
            "upstream_queue_timeout",
            &l.upstream_queue_timeout,
            UPSTREAM_QUEUE_TIMEOUT,
        ),
        request_buffer_bytes,
        write_idle_timeout: d(
            "write_idle_timeout",
            &l.write_idle_timeout,
            WRITE_IDLE_TIMEOUT,
        ),
        max_connections_per_client,
        max_requests_per_client: l
            .max_requests_per_client
            .unwrap_or(MAX_REQUESTS_PER_CLIENT)
            .max(1),
        max_uploads_per_client: l
            .max_uploads_per_client
            .unwrap_or(MAX_UPLOADS_PER_CLIENT)
            .max(1),
        max_header_bytes,
        http2_max_streams: l.http2_max_streams.unwrap_or(HTTP2_MAX_STREAMS),
        max_tracked_clients: l.max_tracked_clients.unwrap_or(MAX_TRACKED_CLIENTS).max(2),
    }
}

fn access_log(r: &mut Report, raw: &RawLog) -> bool {
    match raw.access.as_deref().unwrap_or("stdout") {
        "stdout" => true,
        "off" => false,
        other => {
            r.key(
                "log.access",
                format!("'{other}': expected \"stdout\" or \"off\""),
            );
            true
        }
    }
}

/// A configured host as requests are matched with it: lower case, without one
/// trailing dot. Sites and jails both use it.
pub(super) fn host_key(h: &str) -> String {
    let h = h.to_ascii_lowercase();
    h.strip_suffix('.').map(str::to_string).unwrap_or(h)
}

/// `rate_limit.network`, checked.
fn network_limit(r: &mut Report, key: &str, n: &RawNetworkLimit) -> NetworkLimit {
    let limit = NetworkLimit {
        ipv4_prefix: n.ipv4_prefix.unwrap_or(NETWORK_IPV4_PREFIX),
        ipv6_prefix: n.ipv6_prefix.unwrap_or(NETWORK_IPV6_PREFIX),
        rate: n.rate,
        // Two seconds of the rate by default: a page and its assets from a few clients.
        burst: n
            .burst
            .unwrap_or((n.rate * 2.0).ceil().clamp(1.0, u32::MAX as f64) as u32),
    };
    if !(1..=32).contains(&limit.ipv4_prefix) {
        r.key(&format!("{key}.ipv4_prefix"), "must be between 1 and 32");
    }
    if !(1..=128).contains(&limit.ipv6_prefix) {
        r.key(&format!("{key}.ipv6_prefix"), "must be between 1 and 128");
    }
    if !(limit.rate > 0.0 && limit.rate.is_finite()) {
        r.key(&format!("{key}.rate"), "must be a positive number");
    }
    if limit.burst == 0 {
        r.key(&format!("{key}.burst"), "must be at least 1");
    }
    limit
}

/// A `rate_limit` table; keys it leaves out come from `inherit` (site from global, route
/// from site) or the defaults.
pub(super) fn compile_rate_limit(
    r: &mut Report,
    key: &str,
    raw: Option<&RawRateLimit>,
    inherit: Option<&RateLimit>,
) -> RateLimit {
    let base = inherit.cloned().unwrap_or(RateLimit {
        requests_per_second: REQUESTS_PER_SECOND,
        burst: BURST,
        ipv6_prefix: IPV6_PREFIX,
        dry_run: false,
        network: None,
    });
    let Some(raw) = raw else { return base };
    let rl = RateLimit {
        requests_per_second: raw.requests_per_second.unwrap_or(base.requests_per_second),
        burst: raw.burst.unwrap_or(base.burst),
        ipv6_prefix: raw.ipv6_prefix.unwrap_or(base.ipv6_prefix),
        dry_run: raw.dry_run || base.dry_run,
        network: match &raw.network {
            Some(n) => Some(network_limit(r, &format!("{key}.network"), n)),
            None => base.network.clone(),
        },
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
