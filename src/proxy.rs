//! Forwarding one request: pick the site by Host, rewrite the headers (forwarding headers
//! added, hop-by-hop ones stripped), stream the bodies both ways, splice upgraded
//! connections (WebSocket), and turn upstream failures into 502 or 504 (SPEC 9, 10).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::debug;

use crate::access_log::{Entry, LoggedIp};
use crate::client_addr;
use crate::metrics::outcome;
use crate::policy::Verdict;
use crate::ratelimit::{client_key, key_target};
use crate::state::{AppState, SiteEntry, Snapshot};
use crate::upstream;
use crate::worker::Worker;

/// Response bodies: the upstream's, streamed, or a short one of ipgate's own.
pub type Body = Either<Incoming, Full<Bytes>>;

/// What the request path knows about the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The TCP peer.
    pub peer: SocketAddr,
    /// The client at connection level: the peer, or the PROXY header's source.
    pub client: IpAddr,
    pub tls: bool,
    /// `client` as a header value, formatted once per connection (cloning it per request
    /// is a reference count, not an allocation).
    pub client_value: HeaderValue,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, client: IpAddr, tls: bool) -> ConnInfo {
        let mut buf = [0u8; 64];
        let client_value = HeaderValue::from_str(format_ip(client, &mut buf))
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        ConnInfo {
            peer,
            client,
            tls,
            client_value,
        }
    }
}

/// Why a request was not proxied; each maps to one status (see `status`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no site for this host")]
    NoSite,
    #[error("client is blocked")]
    Blocked,
    #[error("client is not in the allow lists of this site or route")]
    Denied,
    /// Over the rate limit; the client may retry after this many seconds.
    #[error("rate limited")]
    RateLimited(u64),
    #[error("upstream unreachable: {0}")]
    UpstreamConnect(#[source] std::io::Error),
    #[error("upstream failed: {0}")]
    UpstreamProtocol(#[source] hyper::Error),
    #[error("upstream sent no response head in time")]
    UpstreamTimeout,
}

impl Error {
    pub fn status(&self) -> StatusCode {
        match self {
            Error::NoSite => StatusCode::MISDIRECTED_REQUEST,
            Error::Blocked | Error::Denied => StatusCode::FORBIDDEN,
            Error::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::UpstreamConnect(_) | Error::UpstreamProtocol(_) => StatusCode::BAD_GATEWAY,
            Error::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    fn outcome(&self) -> &'static str {
        match self {
            Error::NoSite => outcome::MISDIRECTED,
            Error::Blocked => outcome::BLOCKED,
            Error::Denied => outcome::DENIED,
            Error::RateLimited(_) => outcome::RATE_LIMITED,
            _ => outcome::UPSTREAM_ERROR,
        }
    }
}

impl From<&Error> for Response<Body> {
    fn from(e: &Error) -> Self {
        let status = e.status();
        let text = match e {
            Error::NoSite => "421 no site is configured for this host\n",
            Error::Blocked | Error::Denied => "403 forbidden\n",
            Error::RateLimited(_) => "429 too many requests\n",
            Error::UpstreamConnect(_) | Error::UpstreamProtocol(_) => "502 bad gateway\n",
            Error::UpstreamTimeout => "504 gateway timeout\n",
        };
        let mut resp = plain(status, text);
        if let Error::RateLimited(secs) = e {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*secs));
        }
        resp
    }
}

/// A short text response of ipgate's own.
pub fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from_static(
        text.as_bytes(),
    ))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Hop-by-hop headers (RFC 9110 7.6.1, plus the legacy ones proxies still see).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Serves one request from a client connection.
pub async fn handle(
    worker: Arc<Worker>,
    conn: ConnInfo,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let state = &worker.state;
    let start = Instant::now();
    let snap = state.snapshot.load_full();
    let method = req.method().clone();
    let version = req.version();
    let uri = req.uri().clone();
    let host_value = request_host(&req);
    let host = host_value
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .map(strip_port)
        .unwrap_or("");

    // From a trusted proxy, the client is the rightmost untrusted X-Forwarded-For address.
    let client = if !snap.trusted.is_empty() && snap.trusted.contains(conn.client) {
        client_addr::from_forwarded_for(req.headers(), &snap.trusted).unwrap_or(conn.client)
    } else {
        conn.client
    };

    let site = snap.site_for(host);
    let verdict = snap.policy.decide(&state.temp, client);
    // Allow-listed clients are exempt from rate limits and jails (SPEC 2).
    let exempt = matches!(verdict, Verdict::Allow(_));
    let refused = match verdict {
        Verdict::Block(_) => Some(Error::Blocked),
        _ if site.is_some_and(|s| !admitted(&snap, s, uri.path(), client)) => Some(Error::Denied),
        _ if exempt => None,
        _ => site.and_then(|s| rate_limited(state, s, uri.path(), client)),
    };
    let (resp, site_name, outcome) = match (site, refused) {
        (site, Some(e)) => {
            let name = match site {
                Some(s) => {
                    match e {
                        Error::Blocked => s.metrics.blocked.inc(),
                        Error::RateLimited(_) => s.metrics.rate_limited.inc(),
                        _ => s.metrics.denied.inc(),
                    }
                    s.site.name.as_str()
                }
                None => {
                    state
                        .metrics
                        .requests
                        .with_label_values(&["none", e.outcome()])
                        .inc();
                    "none"
                }
            };
            (Response::from(&e), name, e.outcome())
        }
        (None, None) => {
            state
                .metrics
                .requests
                .with_label_values(&["none", outcome::MISDIRECTED])
                .inc();
            (Response::from(&Error::NoSite), "none", outcome::MISDIRECTED)
        }
        (Some(site), None) => {
            // Boxed: the forwarding future is ~2.5 KiB, and hyper moves the request future
            // (into its dispatcher, into a task per HTTP/2 stream); one allocation is cheaper.
            let result = Box::pin(forward(
                &worker,
                site,
                &conn,
                client,
                req,
                host_value.as_ref(),
            ))
            .await;
            site.metrics.duration.observe(start.elapsed().as_secs_f64());
            match result {
                Ok(resp) => {
                    site.metrics.proxied.inc();
                    if !exempt && !site.jails.is_empty() {
                        observe_jails(state, &snap, site, &method, host, &uri, &resp, client);
                    }
                    (resp, site.site.name.as_str(), outcome::PROXIED)
                }
                Err(e) => {
                    site.metrics.upstream_error.inc();
                    match &e {
                        Error::UpstreamConnect(_) => site.metrics.connect_errors.inc(),
                        Error::UpstreamTimeout => site.metrics.timeouts.inc(),
                        _ => site.metrics.protocol_errors.inc(),
                    }
                    debug!(site = %site.site.name, error = %e, "upstream error");
                    (Response::from(&e), site.site.name.as_str(), e.outcome())
                }
            }
        }
    };

    if state.access_log.is_enabled() {
        state.access_log.log(&Entry {
            ts: SystemTime::now(),
            client: LoggedIp(client, snap.config.privacy.log_ip),
            method: method.as_str(),
            host,
            path: uri.path(),
            proto: version_str(version),
            status: resp.status().as_u16(),
            site: site_name,
            outcome,
            duration: start.elapsed(),
        });
    }
    Ok(resp)
}

/// Checks the rate limit for the path (SPEC 4); `Some` when over it and not a dry run.
fn rate_limited(state: &AppState, site: &SiteEntry, path: &str, client: IpAddr) -> Option<Error> {
    let limiter = site.limiter_for(path);
    let key = client_key(client, limiter.settings.ipv6_prefix);
    let wait = limiter.check(key).err()?;
    if limiter.settings.dry_run {
        state.metrics.would_block_rate_limit.inc();
        return None;
    }
    // Whole seconds, rounded up: retrying earlier would be refused again.
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    Some(Error::RateLimited(secs.max(1)))
}

/// Counts the response against the site's jails; a jail that reaches its `hits` bans the
/// client (or, in a dry run, counts what it would have done).
#[allow(clippy::too_many_arguments)]
fn observe_jails(
    state: &Arc<AppState>,
    snap: &Snapshot,
    site: &SiteEntry,
    method: &http::Method,
    host: &str,
    uri: &Uri,
    resp: &Response<Body>,
    client: IpAddr,
) {
    let prefix = snap.config.rate_limit.ipv6_prefix;
    let key = client_key(client, prefix);
    let status = resp.status().as_u16();
    let location = resp
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok());
    for jail in &site.jails {
        if !jail.matches(method, host, uri.path(), status, location) || !jail.observe(key) {
            continue;
        }
        let target = key_target(key, prefix);
        if let Some(counter) = &jail.would_block {
            counter.inc();
            tracing::info!(
                jail = %jail.config.name,
                client = %LoggedIp(client, snap.config.privacy.log_ip),
                "dry run: a jail would ban this client"
            );
            continue;
        }
        let state = state.clone();
        let jail = jail.clone();
        tokio::spawn(async move { state.jail_ban(&jail, target).await });
    }
}

/// Whether `allow_only` admits the client: the longest matching route's list if it has one,
/// else the site's; no list means everyone (SPEC 5). Membership is in the named static allow
/// lists only.
fn admitted(snap: &Snapshot, site: &SiteEntry, path: &str, client: IpAddr) -> bool {
    let route = site
        .site
        .routes
        .iter()
        .filter(|r| path.starts_with(r.path.as_str()) && !r.allow_only.is_empty())
        .max_by_key(|r| r.path.len());
    let names = route.map_or(&site.site.allow_only, |r| &r.allow_only);
    names.is_empty()
        || names.iter().any(|n| {
            snap.policy
                .allow_list(n)
                .is_some_and(|l| l.table.contains(client))
        })
}

async fn forward(
    worker: &Worker,
    site: &SiteEntry,
    conn: &ConnInfo,
    client: IpAddr,
    mut req: Request<Incoming>,
    host: Option<&HeaderValue>,
) -> Result<Response<Body>, Error> {
    let upgrade = upgrade_token(&req);
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();

    strip_hop_by_hop(&mut parts.headers);
    if let Some(token) = upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, token);
    }
    add_forwarding_headers(&mut parts.headers, client, conn, host);
    if host.is_none() {
        // HTTP/1.0 without Host: HTTP/1.1 upstreams need one.
        if let Ok(v) = HeaderValue::from_str(site.upstream.as_str()) {
            parts.headers.insert(header::HOST, v);
        }
    }

    // Origin-form to the upstream: the request's path and query, nothing else.
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        parts.uri = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"))
            .into();
    }
    // Upstreams speak HTTP/1.1 whatever the client spoke.
    parts.version = Version::HTTP_11;
    let upstream_req = Request::from_parts(parts, body);

    let mut resp = match tokio::time::timeout(
        site.site.upstream_timeout,
        worker.upstream.send(&site.upstream, upstream_req),
    )
    .await
    {
        Err(_) => return Err(Error::UpstreamTimeout),
        Ok(Err(upstream::Error::Connect(e))) => return Err(Error::UpstreamConnect(e)),
        Ok(Err(upstream::Error::Protocol(e))) => return Err(Error::UpstreamProtocol(e)),
        Ok(Ok(resp)) => resp,
    };

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((client, upstream)) => {
                        let mut client = TokioIo::new(client);
                        let mut upstream = TokioIo::new(upstream);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                    Err(e) => debug!(error = %e, "upgrade failed"),
                }
            });
            return Ok(resp.map(Either::Left));
        }
    }
    strip_hop_by_hop(resp.headers_mut());
    Ok(resp.map(Either::Left))
}

/// The Host header, or the authority of an HTTP/2 (or absolute-form) request.
fn request_host<B>(req: &Request<B>) -> Option<HeaderValue> {
    if let Some(authority) = req.uri().authority() {
        return HeaderValue::from_str(authority.as_str()).ok();
    }
    req.headers().get(header::HOST).cloned()
}

/// `example.nl:8443` → `example.nl`; `[2001:db8::1]:8443` → `[2001:db8::1]`.
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rfind(':') {
        Some(p) if host[p + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..p],
        _ => host,
    }
}

/// The `Upgrade` value of an HTTP/1.1 upgrade request (`Connection: upgrade`).
fn upgrade_token<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let wants = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !wants {
        return None;
    }
    req.headers().get(header::UPGRADE).cloned()
}

/// Removes the hop-by-hop headers and every header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        // The usual tokens (keep-alive, close, upgrade) name headers removed below anyway;
        // skipping them keeps the common request free of an allocation here.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| {
                !["keep-alive", "close", "upgrade"]
                    .iter()
                    .any(|c| t.eq_ignore_ascii_case(c))
            })
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Adds X-Forwarded-For (the connection's client appended), X-Real-IP (the client as
/// decided, which differs when a trusted proxy named it in X-Forwarded-For),
/// X-Forwarded-Proto and X-Forwarded-Host, and sets Host to what the client asked for.
fn add_forwarding_headers(
    headers: &mut HeaderMap,
    client: IpAddr,
    conn: &ConnInfo,
    host: Option<&HeaderValue>,
) {
    let mut xff = String::new();
    for v in headers.get_all(&X_FORWARDED_FOR) {
        if let Ok(s) = v.to_str() {
            if !xff.is_empty() {
                xff.push_str(", ");
            }
            xff.push_str(s.trim());
        }
    }
    let xff_value = if xff.is_empty() {
        Ok(conn.client_value.clone())
    } else {
        xff.push_str(", ");
        xff.push_str(conn.client_value.to_str().unwrap_or(""));
        HeaderValue::from_str(&xff)
    };
    if let Ok(v) = xff_value {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    let real_ip = if client == conn.client {
        Ok(conn.client_value.clone())
    } else {
        let mut buf = [0u8; 64];
        HeaderValue::from_str(format_ip(client, &mut buf))
    };
    if let Ok(v) = real_ip {
        headers.insert(X_REAL_IP.clone(), v);
    }
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
    );
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST.clone(), host.clone());
        // The upstream's virtual hosts see the name the client asked for.
        headers.insert(header::HOST, host.clone());
    } else {
        headers.remove(&X_FORWARDED_HOST);
    }
}

/// Formats an address into a stack buffer (no allocation on the request path; IPv4, the
/// usual case, without the `fmt` machinery).
fn format_ip(ip: IpAddr, buf: &mut [u8; 64]) -> &str {
    let len = match ip {
        IpAddr::V4(v4) => {
            let mut n = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                let mut digits = itoa::Buffer::new();
                let d = digits.format(octet).as_bytes();
                buf[n..n + d.len()].copy_from_slice(d);
                n += d.len();
            }
            n
        }
        IpAddr::V6(v6) => {
            use std::io::Write;
            let mut cursor = std::io::Cursor::new(&mut buf[..]);
            let _ = write!(cursor, "{v6}");
            cursor.position() as usize
        }
    };
    std::str::from_utf8(&buf[..len]).unwrap_or("")
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "?",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_statuses() {
        assert_eq!(Error::NoSite.status(), StatusCode::MISDIRECTED_REQUEST);
        assert_eq!(Error::UpstreamTimeout.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            Response::from(&Error::UpstreamTimeout).status(),
            StatusCode::GATEWAY_TIMEOUT
        );
    }

    #[test]
    fn formats_addresses() {
        let mut buf = [0u8; 64];
        for ip in [
            "0.0.0.0",
            "255.255.255.255",
            "10.2.30.104",
            "2001:db8::1",
            "::ffff:1.2.3.4",
        ] {
            let parsed: IpAddr = ip.parse().unwrap();
            assert_eq!(format_ip(parsed, &mut buf), parsed.to_string());
        }
    }

    #[test]
    fn strips_ports_from_hosts() {
        assert_eq!(strip_port("example.nl:8443"), "example.nl");
        assert_eq!(strip_port("example.nl"), "example.nl");
        assert_eq!(strip_port("[2001:db8::1]:443"), "[2001:db8::1]");
        assert_eq!(strip_port("[2001:db8::1]"), "[2001:db8::1]");
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-end-to-end", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-end-to-end"));
    }

    #[test]
    fn appends_to_forwarded_for() {
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.1"));
        let conn = ConnInfo::new(
            "192.0.2.7:5555".parse().unwrap(),
            "192.0.2.7".parse().unwrap(),
            true,
        );
        add_forwarding_headers(
            &mut h,
            conn.client,
            &conn,
            Some(&HeaderValue::from_static("a.test")),
        );
        assert_eq!(h[&X_FORWARDED_FOR], "198.51.100.1, 192.0.2.7");
        assert_eq!(h[&X_REAL_IP], "192.0.2.7");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert_eq!(h[&X_FORWARDED_HOST], "a.test");
    }
}
