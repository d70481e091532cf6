//! Forwarding one request: pick the site by Host, rewrite the headers (forwarding headers
//! added, hop-by-hop ones stripped), stream the bodies both ways, splice upgraded
//! connections (WebSocket), and turn upstream failures into 502 or 504.

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::Either;
use tokio::sync::OwnedSemaphorePermit;
use tracing::debug;

use crate::decide::clients::{InFlight, Upload};
use crate::decide::jail::Watched;
use crate::observe::access_log::{Entry, LoggedIp};
use crate::observe::metrics::outcome;
use crate::serve::admission::{self, Client};
pub use crate::serve::answer::{Body, Error};
use crate::serve::body::{ClientBody, UpstreamBody};
use crate::serve::challenge;
use crate::serve::conn::ConnInfo;
use crate::serve::headers::{self, Forwarding};
use crate::serve::https;
use crate::serve::overview;
use crate::serve::request::{self, Invalid};
use crate::serve::upstream;
use crate::state::{AppState, SiteEntry, Snapshot};

/// What one worker thread's requests share: the gateway state and the thread's own upstream
/// pool (see [`crate::serve::worker`]).
pub struct Context {
    pub state: Arc<AppState>,
    pub upstream: Arc<upstream::Pool>,
    /// Turns true when shutdown starts: upgraded connections close after the grace period.
    pub stop: tokio::sync::watch::Receiver<bool>,
    /// The thread's upgraded connections, which shutdown waits for (up to the grace period).
    pub upgrades: tokio_util::task::TaskTracker,
}

/// What a response holds until its body ends (or, for an upgrade, what the spliced
/// connection holds until it closes).
#[derive(Default)]
pub struct Held {
    /// The request's place among its client's requests in flight.
    pub in_flight: Option<InFlight>,
    /// One of the site's `max_upstream_connections`.
    pub upstream: Option<OwnedSemaphorePermit>,
    /// A streaming upload's place among its client's `limits.max_uploads_per_client`.
    pub upload: Option<Upload>,
    /// Its places among the watched requests of the jails that watch it.
    pub watched: Vec<Watched>,
}

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
    conn: Arc<ConnInfo>,
    req: Request<ClientBody>,
) -> Result<(Response<Body>, Held), Infallible> {
    let state = &worker.state;
    let start = Instant::now();
    let snap = state.snapshot.load_full();
    let method = req.method().clone();
    let version = conn.version(req.version());
    let uri = req.uri().clone();

    let host_value = request::host(&req);
    let host = host_value
        .as_ref()
        .ok()
        .and_then(Option::as_ref)
        .map_or("", request::HostValue::key);
    let logged = Logged {
        method: &method,
        version,
        host,
        uri: &uri,
        start,
    };
    let checked = (|| {
        let host_value = host_value.as_ref().map_err(|e| *e)?;
        let path = request::path(&method, &uri)?;
        let (client, chain) = request::client(&snap.trusted, conn.client, req.headers())?;
        Ok::<_, Invalid>((host_value.as_ref().map(|h| &h.value), path, client, chain))
    })();
    let (host_ref, path, client, chain) = match checked {
        Ok(c) => c,
        Err(e) => {
            debug!(error = %e, "request refused");
            let (resp, site, outcome) = refuse(state, None, Error::Invalid(e));
            logged.log(state, &snap, conn.client, &resp, site, outcome);
            return Ok((for_method(&method, resp), Held::default()));
        }
    };

    if let Some(resp) = https::http01_answer(conn.tls, &path) {
        logged.log(state, &snap, client.ip, &resp, "none", outcome::ACME);
        return Ok((for_method(&method, resp), Held::default()));
    }
    let site = snap.site_for(host);
    let asked = (&method, host, path.as_ref(), uri.query().is_some());
    let admitted = match admit(state, &snap, site, &conn, client, asked) {
        // Boxed: the wait is rare, and its timer would grow every request's future.
        Ok(a) if a.queued.is_some() => Box::pin(take_place(a, &snap.config.limits)).await,
        other => other,
    };
    let mut held = Held::default();
    let (resp, site_name, outcome) = match (site, admitted) {
        (Some(site), Err(admission::Refusal::Challenge { transient })) => {
            let asked = (&method, req.headers(), &uri);
            let resp = challenge::answer(state, &snap, site, asked, client.ip, transient);
            (resp, site.site.name.as_str(), outcome::CHALLENGED)
        }
        (site, Err(refusal)) => refuse(state, site, Error::from(refusal)),
        (None, Ok(_)) => refuse(state, None, Error::NoSite),
        (Some(site), Ok(_)) if overview::at(&snap, &method, &path, conn.redirect) => {
            site.metrics.overview.inc();
            // Boxed (as the challenge's page): rare, it would size every request's future.
            let resp = Box::pin(overview::answer(state, &snap, req.headers(), client.ip)).await;
            (resp, site.site.name.as_str(), outcome::OVERVIEW)
        }
        (Some(site), Ok(_)) if path.starts_with(challenge::PREFIX) => {
            let resp = Box::pin(challenge::own(state, &snap, site, &path, &uri, client.ip)).await;
            (resp, site.site.name.as_str(), outcome::CHALLENGED)
        }
        (Some(site), Ok(_)) if conn.redirect && !path.starts_with(https::ACME_CHALLENGE) => {
            site.metrics.redirected.inc();
            let resp = https::redirect(&method, host, state.https_port, &uri);
            (resp, site.site.name.as_str(), outcome::REDIRECTED)
        }
        (Some(site), Ok(admitted)) => {
            (held.in_flight, held.watched) = (admitted.in_flight, admitted.watched);
            let checked = Checked {
                client,
                chain,
                host: host_ref,
                path_changed: matches!(path, Cow::Owned(_)),
                path: &path,
            };
            // Boxed, never held in a local (that can keep its size in this future's state).
            let result = Box::pin(forward(
                &worker, &snap, site, &conn, &checked, req, &mut held,
            ))
            .await;
            site.metrics.duration.observe(start.elapsed().as_secs_f64());
            let request = (&method, host, path.as_ref());
            let seen = (!admitted.exempt).then_some((client.ip, request));
            forwarded(state, &snap, site, conn.tls, seen, result)
        }
    };
    logged.log(state, &snap, client.ip, &resp, site_name, outcome);
    let resp = crate::serve::conn::finish(state, &conn, version, for_method(&method, resp));
    Ok((resp, held))
}

/// Counts and finishes a forwarded request's answer: the response (HSTS added, shown to the
/// jails when `seen` names its client and request), or the error's own answer.
fn forwarded<'s>(
    state: &Arc<AppState>,
    snap: &Snapshot,
    site: &'s SiteEntry,
    tls: bool,
    seen: Option<(IpAddr, (&Method, &str, &str))>,
    result: Result<Response<Body>, Error>,
) -> (Response<Body>, &'s str, &'static str) {
    match result {
        Ok(mut resp) => {
            site.metrics.proxied.inc();
            if tls {
                https::add_hsts(&mut resp, site);
            }
            if let Some((client, request)) = seen {
                observe_response(state, snap, site, client, request, &resp);
            }
            (resp, site.site.name.as_str(), outcome::PROXIED)
        }
        // The client's fault, not the upstream's.
        Err(e @ (Error::BodyIdle | Error::BodyFailed)) => refuse(state, None, e),
        // Over the client's uploads: its own limit, not the upstream's failure.
        Err(e @ Error::RateLimited(_)) => refuse(state, Some(site), e),
        Err(e) => upstream_failed(site, e),
    }
}

/// The answer as the method allows it: no body for HEAD.
fn for_method(method: &Method, resp: Response<Body>) -> Response<Body> {
    if method == Method::HEAD {
        without_body(resp)
    } else {
        resp
    }
}

/// A HEAD answer of the gateway's own carries no body on either protocol (an HTTP/2 client
/// takes DATA on a HEAD stream as a protocol error); its Content-Length stays that of GET.
fn without_body(resp: Response<Body>) -> Response<Body> {
    use http_body_util::Full;
    let (mut parts, body) = resp.into_parts();
    let body = match body {
        Either::Right(full) => {
            let len = hyper::body::Body::size_hint(&full).exact().unwrap_or(0);
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            Either::Right(Full::new(Bytes::new()))
        }
        upstream => upstream,
    };
    Response::from_parts(parts, body)
}

/// Asks admission for the request's client, counting its requests in flight on the
/// connection's slot when the connection is that client's.
fn admit(
    state: &AppState,
    snap: &Snapshot,
    site: Option<&SiteEntry>,
    conn: &ConnInfo,
    client: Client,
    (method, host, path, query): (&Method, &str, &str, bool),
) -> Result<admission::Admitted, admission::Refusal> {
    // The connection's client slot counts its requests in flight, unless X-Forwarded-For
    // named someone else.
    let conn_slot = conn
        .slot
        .client
        .as_ref()
        .filter(|_| client.ip == conn.client);
    let asked = admission::Asked {
        method,
        host,
        path,
        query,
        redirect: conn.redirect,
    };
    admission::admit(state, snap, site, (client, conn_slot), &asked)
        .inspect_err(|_| state.count_refusal(client.ip))
}

/// Waits for the client's place among its requests in flight when admission found them all
/// taken: up to `limits.upstream_queue_timeout`, then 429.
async fn take_place(
    mut admitted: admission::Admitted,
    limits: &crate::config::Limits,
) -> Result<admission::Admitted, admission::Refusal> {
    let Some((gate, slot)) = admitted.queued.take() else {
        return Ok(admitted);
    };
    let cap = limits.max_requests_per_client;
    match gate.enter(cap, limits.upstream_queue_timeout, slot).await {
        Some(place) => {
            admitted.in_flight = Some(place);
            Ok(admitted)
        }
        None => Err(admission::Refusal::Busy),
    }
}

/// Shows a proxied response, with the request it answers, to the site's jails.
fn observe_response(
    state: &Arc<AppState>,
    snap: &Snapshot,
    site: &SiteEntry,
    client: std::net::IpAddr,
    (method, host, path): (&Method, &str, &str),
    resp: &Response<Body>,
) {
    if site.jails.is_empty() {
        return;
    }
    let seen = admission::Seen {
        method,
        host,
        path,
        status: resp.status().as_u16(),
        location: location(resp),
    };
    admission::observe(state, snap, site, client, &seen);
}

/// Counts an upstream failure and makes its answer.
fn upstream_failed(site: &SiteEntry, e: Error) -> (Response<Body>, &str, &'static str) {
    site.metrics.upstream_error.inc();
    match &e {
        Error::UpstreamConnect(_) => site.metrics.connect_errors.inc(),
        Error::UpstreamTimeout => site.metrics.timeouts.inc(),
        Error::UpstreamBusy => site.metrics.busy.inc(),
        _ => site.metrics.protocol_errors.inc(),
    }
    debug!(site = %site.site.name, error = %e, "upstream error");
    (Response::from(&e), site.site.name.as_str(), e.outcome())
}

fn location(resp: &Response<Body>) -> Option<&str> {
    resp.headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
}

/// Counts a request answered by the gateway itself and makes its answer.
fn refuse<'s>(
    state: &AppState,
    site: Option<&'s SiteEntry>,
    e: Error,
) -> (Response<Body>, &'s str, &'static str) {
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

/// What the access log says of a request, gathered as it arrives.
struct Logged<'a> {
    method: &'a http::Method,
    version: Version,
    host: &'a str,
    uri: &'a Uri,
    start: Instant,
}

impl Logged<'_> {
    /// One access-log line, when the log is on.
    fn log(
        &self,
        state: &AppState,
        snap: &Snapshot,
        client: IpAddr,
        resp: &Response<Body>,
        site: &str,
        outcome: &'static str,
    ) {
        if !state.access_log.is_enabled() {
            return;
        }
        state.access_log.log(&Entry {
            ts: SystemTime::now(),
            client: LoggedIp(client, snap.config.privacy.log_ip),
            method: self.method.as_str(),
            host: self.host,
            path: self.uri.path(),
            proto: version_str(self.version),
            status: resp.status().as_u16(),
            site,
            outcome,
            duration: self.start.elapsed(),
        });
    }
}

async fn forward(
    worker: &Context,
    snap: &Snapshot,
    site: &SiteEntry,
    conn: &ConnInfo,
    checked: &Checked<'_>,
    mut req: Request<ClientBody>,
    held: &mut Held,
) -> Result<Response<Body>, Error> {
    let limits = &snap.config.limits;
    let upgrade = request::websocket_upgrade(&req);
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let is_upgrade = upgrade.is_some();
    // The request is made ready in a block of its own: its parts and the upstream request are
    // then gone from this future's state while the answer is awaited.
    let (sending, measured) = {
        let (mut parts, body) = req.into_parts();

        headers::for_upstream(
            &mut parts.headers,
            parts.version,
            upgrade,
            site.upstream.as_str(),
            &Forwarding {
                client: checked.client,
                chain: checked.chain.as_deref(),
                conn_client: conn.client,
                conn_client_value: &conn.client_value,
                tls: conn.tls,
                host: checked.host,
            },
        );
        // Origin-form to the upstream, with the path that was matched.
        if checked.path_changed || parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            parts.uri = origin_form(checked.path, parts.uri.query());
        }
        // Upstreams speak HTTP/1.1 whatever the client spoke.
        parts.version = Version::HTTP_11;
        let body = ready_to_send(body, limits, site, held).await?;
        // Auto mode measures the upstream: answers awaited at once, and how long they take
        // (not for a body that streams as slowly as its client sends it, nor an upgrade).
        let timed = !body.is_streaming() && !is_upgrade;
        let upstream_req = Request::from_parts(parts, body);
        let measured = site.tracks_load().then(|| site.load.sent(timed));
        let sending = tokio::time::timeout(
            site.site.upstream_timeout,
            worker.upstream.send(&site.upstream, upstream_req),
        );
        (sending, measured)
    };
    let sent = sending.await;

    if let (Some(m), Ok(Ok(_))) = (measured, &sent) {
        m.answered();
    }
    let mut resp = match sent {
        Err(_) => return Err(Error::UpstreamTimeout),
        Ok(Err(upstream::Error::Connect(e))) => return Err(Error::UpstreamConnect(e)),
        Ok(Err(upstream::Error::Protocol(e))) if crate::serve::body::went_idle(&e) => {
            return Err(Error::BodyIdle)
        }
        Ok(Err(upstream::Error::Protocol(e))) => return Err(Error::UpstreamProtocol(e)),
        Ok(Ok(resp)) => resp,
    };

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            let splice = crate::serve::splice::Splice {
                slot: conn.slot.clone(),
                upstream_slot: held.upstream.take(),
                idle: limits.upgrade_idle_timeout,
                grace: limits.shutdown_grace,
                stop: worker.stop.clone(),
                timed_out: worker
                    .state
                    .metrics
                    .timed_out
                    .with_label_values(&["upgrade_idle"]),
            };
            worker.upgrades.spawn(async move {
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((client, upstream)) => splice.run(client, upstream).await,
                    Err(e) => debug!(error = %e, "upgrade failed"),
                }
            });
            return Ok(resp.map(Either::Left));
        }
    }
    headers::strip_hop_by_hop(resp.headers_mut());
    Ok(resp.map(Either::Left))
}

/// What comes before a request takes an upstream connection: a small body is read
/// whole, then one of the site's `max_upstream_connections` is waited for (bounded).
async fn ready_to_send(
    body: ClientBody,
    limits: &crate::config::Limits,
    site: &SiteEntry,
    held: &mut Held,
) -> Result<UpstreamBody, Error> {
    let body =
        UpstreamBody::read_small(body, limits.request_buffer_bytes, limits.body_idle_timeout)
            .await
            .map_err(|e| match e {
                crate::serve::body::Error::Idle(_) => Error::BodyIdle,
                _ => Error::BodyFailed,
            })?;
    // A body too large to read ahead holds an upstream connection for as long as the
    // client takes to send it: a few per client (exempt clients hold no place).
    if body.is_streaming() {
        if let Some(place) = &held.in_flight {
            let upload = place.gate().upload(limits.max_uploads_per_client);
            held.upload = Some(upload.ok_or(Error::RateLimited(1))?);
        }
    }
    if let Some(slots) = &site.upstream_slots {
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                site.load.waited();
                tokio::time::timeout(limits.upstream_queue_timeout, slots.clone().acquire_owned())
                    .await
                    .map_err(|_| Error::UpstreamBusy)?
                    .map_err(|_| Error::UpstreamBusy)?
            }
        };
        held.upstream = Some(permit);
    }
    Ok(body)
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

    /// Every request's future is boxed and held while it is in flight: a rarely taken path's
    /// future kept inline, or one held in a local across an `.await`, grows it (it was 2,048
    /// bytes with the overview's and the challenge page's futures inline).
    #[test]
    fn the_request_future_stays_small() {
        const LIMIT: usize = 1600;
        fn size<A, B, C, F>(_: fn(A, B, C) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let handle_size = size(handle);
        assert!(handle_size <= LIMIT, "{handle_size} bytes");
    }

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
