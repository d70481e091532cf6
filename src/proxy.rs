//! Forwarding one request: pick the site by Host, rewrite the headers (forwarding headers
//! added, hop-by-hop ones stripped), stream the bodies both ways, splice upgraded
//! connections (WebSocket), and turn upstream failures into 502 or 504 (SPEC 9, 10).

use std::borrow::Cow;
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
use crate::admission::{self, Client, Refusal};
use crate::metrics::outcome;
use crate::request::{self, Invalid};
use crate::state::{AppState, SiteEntry, Snapshot};
use crate::upstream;

/// Response bodies: the upstream's, streamed, or a short one of ipgate's own.
pub type Body = Either<Incoming, Full<Bytes>>;

/// What one worker thread's requests share: the gateway state and the thread's own upstream
/// pool (see [`crate::worker`]).
pub struct Context {
    pub state: Arc<AppState>,
    pub upstream: Arc<upstream::Pool>,
}

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

/// Why a request was not proxied; each maps to one status, one outcome and one answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is ambiguous or malformed (400), or a method not forwarded (405).
    #[error("{0}")]
    Invalid(#[from] Invalid),
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

impl From<Refusal> for Error {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Blocked => Error::Blocked,
            Refusal::Denied => Error::Denied,
            Refusal::RateLimited(secs) => Error::RateLimited(secs),
        }
    }
}

impl Error {
    pub fn status(&self) -> StatusCode {
        match self {
            Error::Invalid(Invalid::Connect) => StatusCode::METHOD_NOT_ALLOWED,
            Error::Invalid(_) => StatusCode::BAD_REQUEST,
            Error::NoSite => StatusCode::MISDIRECTED_REQUEST,
            Error::Blocked | Error::Denied => StatusCode::FORBIDDEN,
            Error::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::UpstreamConnect(_) | Error::UpstreamProtocol(_) => StatusCode::BAD_GATEWAY,
            Error::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    fn outcome(&self) -> &'static str {
        match self {
            Error::Invalid(_) => outcome::BAD_REQUEST,
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
            Error::Invalid(Invalid::Connect) => "405 method not allowed\n",
            Error::Invalid(_) => "400 bad request\n",
            Error::NoSite => "421 no site is configured for this host\n",
            Error::Blocked | Error::Denied => "403 forbidden\n",
            Error::RateLimited(_) => "429 too many requests\n",
            Error::UpstreamConnect(_) | Error::UpstreamProtocol(_) => "502 bad gateway\n",
            Error::UpstreamTimeout => "504 gateway timeout\n",
        };
        let mut resp = plain(status, text);
        match e {
            Error::RateLimited(secs) => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*secs));
            }
            Error::Invalid(Invalid::Connect) => {
                resp.headers_mut().insert(
                    header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"),
                );
            }
            _ => {}
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

/// Headers that name a client, which an untrusted peer may not set (SPEC 15): many PHP
/// applications believe the first one they find.
static CLIENT_HEADERS: [HeaderName; 5] = [
    HeaderName::from_static("forwarded"),
    HeaderName::from_static("x-client-ip"),
    HeaderName::from_static("true-client-ip"),
    HeaderName::from_static("cf-connecting-ip"),
    HeaderName::from_static("x-cluster-client-ip"),
];

/// A checked request, as forwarding needs it.
struct Checked<'a> {
    client: Client,
    /// The believable X-Forwarded-For chain, when the peer is a trusted proxy.
    chain: Option<Vec<IpAddr>>,
    host: Option<&'a HeaderValue>,
    /// The normalized path (borrowed from the request's URI when it already was normal).
    path: &'a str,
    path_changed: bool,
}

/// Serves one request from a client connection.
pub async fn handle(
    worker: Arc<Context>,
    conn: ConnInfo,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let state = &worker.state;
    let start = Instant::now();
    let snap = state.snapshot.load_full();
    let method = req.method().clone();
    let version = req.version();
    let uri = req.uri().clone();

    let host_value = request::host(&req);
    let host = request::host_key(host_value.as_ref().ok().and_then(Option::as_ref));
    let checked = (|| {
        let host_value = host_value.as_ref().map_err(|e| *e)?;
        let path = request::path(&method, &uri)?;
        let (client, chain) = request::client(&snap.trusted, conn.client, req.headers())?;
        Ok::<_, Invalid>((host_value.as_ref(), path, client, chain))
    })();
    let (host_ref, path, client, chain) = match checked {
        Ok(c) => c,
        Err(e) => {
            let e = Error::Invalid(e);
            let resp = Response::from(&e);
            state
                .metrics
                .requests
                .with_label_values(&["none", e.outcome()])
                .inc();
            debug!(error = %e, "request refused");
            log_access(
                state,
                &snap,
                &conn,
                &method,
                version,
                host,
                &uri,
                &resp,
                "none",
                e.outcome(),
                start,
            );
            return Ok(resp);
        }
    };

    let site = snap.site_for(host);
    let admitted = admission::admit(state, &snap, site, client, &path);
    let (resp, site_name, outcome) = match (site, admitted) {
        (site, Err(refusal)) => {
            let e = Error::from(refusal);
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
        (None, Ok(_)) => {
            state
                .metrics
                .requests
                .with_label_values(&["none", outcome::MISDIRECTED])
                .inc();
            (Response::from(&Error::NoSite), "none", outcome::MISDIRECTED)
        }
        (Some(site), Ok(admitted)) => {
            let checked = Checked {
                client,
                chain,
                host: host_ref,
                path_changed: matches!(path, Cow::Owned(_)),
                path: &path,
            };
            // Boxed: the forwarding future is ~2.5 KiB, and hyper moves the request future
            // (into its dispatcher, into a task per HTTP/2 stream); one allocation is cheaper.
            let result = Box::pin(forward(&worker, site, &conn, &checked, req)).await;
            site.metrics.duration.observe(start.elapsed().as_secs_f64());
            match result {
                Ok(resp) => {
                    site.metrics.proxied.inc();
                    if !admitted.exempt && !site.jails.is_empty() {
                        let seen = admission::Seen {
                            method: &method,
                            host,
                            path: &path,
                            status: resp.status().as_u16(),
                            location: resp
                                .headers()
                                .get(header::LOCATION)
                                .and_then(|v| v.to_str().ok()),
                        };
                        admission::observe(state, &snap, site, client.ip, &seen);
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
    let conn_client = ConnInfo {
        client: client.ip,
        ..conn
    };
    log_access(
        state,
        &snap,
        &conn_client,
        &method,
        version,
        host,
        &uri,
        &resp,
        site_name,
        outcome,
        start,
    );
    Ok(resp)
}

/// One access-log line, when the log is on.
#[allow(clippy::too_many_arguments)]
fn log_access(
    state: &AppState,
    snap: &Snapshot,
    conn: &ConnInfo,
    method: &http::Method,
    version: Version,
    host: &str,
    uri: &Uri,
    resp: &Response<Body>,
    site: &str,
    outcome: &'static str,
    start: Instant,
) {
    if !state.access_log.is_enabled() {
        return;
    }
    state.access_log.log(&Entry {
        ts: SystemTime::now(),
        client: LoggedIp(conn.client, snap.config.privacy.log_ip),
        method: method.as_str(),
        host,
        path: uri.path(),
        proto: version_str(version),
        status: resp.status().as_u16(),
        site,
        outcome,
        duration: start.elapsed(),
    });
}

async fn forward(
    worker: &Context,
    site: &SiteEntry,
    conn: &ConnInfo,
    checked: &Checked<'_>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Error> {
    let upgrade = request::websocket_upgrade(&req);
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();

    strip_hop_by_hop(&mut parts.headers);
    if let Some(token) = upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, token);
    }
    add_forwarding_headers(&mut parts.headers, checked, conn);
    if checked.host.is_none() {
        // HTTP/1.0 without Host: HTTP/1.1 upstreams need one.
        if let Ok(v) = HeaderValue::from_str(site.upstream.as_str()) {
            parts.headers.insert(header::HOST, v);
        }
    }
    if parts.version == Version::HTTP_2 {
        join_cookies(&mut parts.headers);
    }

    // Origin-form to the upstream, with the path that was matched (SPEC 13).
    if checked.path_changed || parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        parts.uri = origin_form(checked.path, parts.uri.query());
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

/// `path?query` as a request target.
fn origin_form(path: &str, query: Option<&str>) -> Uri {
    let text = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    http::uri::PathAndQuery::from_maybe_shared(Bytes::from(text))
        .unwrap_or_else(|_| http::uri::PathAndQuery::from_static("/"))
        .into()
}

/// HTTP/2 may split cookies into several fields (RFC 9113 8.2.3); an HTTP/1.1 upstream
/// expects one, joined with `; `.
fn join_cookies(headers: &mut HeaderMap) {
    if headers.get_all(header::COOKIE).iter().nth(1).is_none() {
        return;
    }
    let joined: Vec<&[u8]> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        headers.insert(header::COOKIE, v);
    }
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

/// Sets X-Forwarded-For (SPEC 10, 15): from an untrusted peer, the peer alone, and the other
/// client-address headers removed; from a trusted one, the believable chain (the client and
/// the trusted proxies after it) with the peer appended. Sets X-Real-IP to the client as
/// decided, X-Forwarded-Proto and X-Forwarded-Host, and Host to what the client asked for.
fn add_forwarding_headers(headers: &mut HeaderMap, checked: &Checked<'_>, conn: &ConnInfo) {
    let xff = match &checked.chain {
        None => {
            for name in &CLIENT_HEADERS {
                headers.remove(name);
            }
            Ok(conn.client_value.clone())
        }
        Some(chain) => {
            let mut text = String::with_capacity(16 * (chain.len() + 1));
            let mut buf = [0u8; 64];
            for ip in chain {
                text.push_str(format_ip(*ip, &mut buf));
                text.push_str(", ");
            }
            text.push_str(conn.client_value.to_str().unwrap_or(""));
            HeaderValue::from_str(&text)
        }
    };
    if let Ok(v) = xff {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    let real_ip = if checked.client.ip == conn.client {
        Ok(conn.client_value.clone())
    } else {
        let mut buf = [0u8; 64];
        HeaderValue::from_str(format_ip(checked.client.ip, &mut buf))
    };
    if let Ok(v) = real_ip {
        headers.insert(X_REAL_IP.clone(), v);
    }
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
    );
    if let Some(host) = checked.host {
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

    fn checked<'a>(client: &str, chain: Option<Vec<IpAddr>>, host: &'a HeaderValue) -> Checked<'a> {
        Checked {
            client: Client {
                ip: client.parse().unwrap(),
                is_proxy: false,
            },
            chain,
            host: Some(host),
            path: "/",
            path_changed: false,
        }
    }

    fn spoofed() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        for name in &CLIENT_HEADERS {
            h.insert(name, HeaderValue::from_static("6.6.6.6"));
        }
        h
    }

    #[test]
    fn an_untrusted_peer_cannot_name_a_client() {
        let mut h = spoofed();
        let conn = ConnInfo::new(
            "192.0.2.7:5555".parse().unwrap(),
            "192.0.2.7".parse().unwrap(),
            true,
        );
        let host = HeaderValue::from_static("a.test");
        add_forwarding_headers(&mut h, &checked("192.0.2.7", None, &host), &conn);
        assert_eq!(h[&X_FORWARDED_FOR], "192.0.2.7");
        assert_eq!(h[&X_REAL_IP], "192.0.2.7");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert_eq!(h[&X_FORWARDED_HOST], "a.test");
        for name in &CLIENT_HEADERS {
            assert!(!h.contains_key(name), "{name}");
        }
    }

    #[test]
    fn a_trusted_peer_forwards_the_believable_chain() {
        let mut h = spoofed();
        let conn = ConnInfo::new(
            "10.0.0.1:5555".parse().unwrap(),
            "10.0.0.1".parse().unwrap(),
            false,
        );
        let host = HeaderValue::from_static("a.test");
        let chain = vec!["198.51.100.1".parse().unwrap(), "10.0.0.2".parse().unwrap()];
        add_forwarding_headers(&mut h, &checked("198.51.100.1", Some(chain), &host), &conn);
        assert_eq!(h[&X_FORWARDED_FOR], "198.51.100.1, 10.0.0.2, 10.0.0.1");
        assert_eq!(h[&X_REAL_IP], "198.51.100.1");
        // A trusted front proxy may set these (a CDN's CF-Connecting-IP): passed on.
        assert!(h.contains_key("cf-connecting-ip"));
    }

    #[test]
    fn http2_cookies_are_joined() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        join_cookies(&mut h);
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(h[header::COOKIE], "a=1; b=2");
    }

    #[test]
    fn invalid_requests_map_to_400_and_connect_to_405() {
        let bad = Error::Invalid(Invalid::BadHost);
        assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
        assert_eq!(bad.outcome(), outcome::BAD_REQUEST);
        let connect = Error::Invalid(Invalid::Connect);
        assert_eq!(
            Response::from(&connect).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert!(Response::from(&connect)
            .headers()
            .contains_key(header::ALLOW));
    }
}
