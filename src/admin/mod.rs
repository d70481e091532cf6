//! The admin side: this module is the admin listener. `GET /healthz` and `GET /metrics`
//! answer without a token; everything under `/v1/` needs `Authorization: Bearer TOKEN` with
//! the token from `admin.token_file` (`token`): temporary entries, per-address lookup and
//! erasure, reload. JSON everywhere. [`api`]: the bodies the server and the command line
//! ([`cli`]) both speak; `demo`: the quick start's demo upstream.
//!
//! Uses: every layer below it ([`crate::background`] for nothing but the types it reports).

pub mod api;
pub mod cli;
mod console;
pub(crate) mod demo;
mod ips;
mod sites;
pub(crate) mod token;
mod upgrade;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use std::net::IpAddr;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use ipnet::IpNet;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::debug;

use crate::admin::api::{
    ApiError, CounterView, Decision, EntryView, Forgotten, GeoRuleView, Kept, LimitView, Lookup,
    NewEntry, OffenseView, ProblemView, ReloadRefused, Reloaded, RuleView,
};
use crate::background::upgrade::Upgrader;
use crate::config::{self, Action};
use crate::decide::clock::now_ms;
use crate::decide::policy::temporary::Entry;
use crate::decide::policy::temporary::{Scope, Slot};
use crate::decide::policy::StaticList;
use crate::decide::policy::{Rule, Verdict};
use crate::state::AppState;

/// Serves the admin API until `stop` turns true.
pub async fn serve(
    state: Arc<AppState>,
    listener: TcpListener,
    stop: watch::Receiver<bool>,
    upgrader: Arc<Upgrader>,
) {
    serve_http1(listener, stop, move |req| {
        let state = state.clone();
        let upgrader = upgrader.clone();
        async move { route(&state, &upgrader, req).await }
    })
    .await
}

/// A small HTTP/1.1 server for local endpoints (admin, demo): one task per connection, a
/// 10 s request-head timeout, until `stop` turns true.
pub(crate) async fn serve_http1<F, Fut>(
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    handler: F,
) where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<AdminBody>> + Send + 'static,
{
    loop {
        let (tcp, _) = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        let handler = handler.clone();
        let local = tcp.local_addr().ok();
        tokio::spawn(async move {
            let service = service_fn(move |mut req: Request<Incoming>| {
                if let Some(local) = local {
                    req.extensions_mut().insert(LocalAddr(local));
                }
                let fut = handler(req);
                async move { Ok::<_, std::convert::Infallible>(fut.await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service);
            if let Err(e) = conn.await {
                debug!(error = %e, "local http connection error");
            }
        });
    }
}

pub(crate) type AdminBody = Full<Bytes>;

/// The address a local connection was accepted on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LocalAddr(pub std::net::SocketAddr);

/// Whether the request names the admin listener itself: no Host (HTTP/1.0), `localhost`,
/// the address it was accepted on (any loopback address when that is loopback), or a name in
/// `admin.hosts`. A page that rebinds its own name to 127.0.0.1 sends its own name.
fn own_host(state: &AppState, req: &Request<Incoming>) -> bool {
    let Some(value) = req.headers().get(header::HOST) else {
        return req.version() < http::Version::HTTP_11;
    };
    let Ok(text) = value.to_str() else {
        return false;
    };
    let Some(host) = crate::normalize::host::Host::parse(text) else {
        return false;
    };
    let name = host.name.trim_end_matches('.').to_ascii_lowercase();
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    if name == "localhost" {
        return true;
    }
    if let Ok(ip) = bare.parse::<IpAddr>() {
        let local = req.extensions().get::<LocalAddr>().map(|l| l.0.ip());
        return local.is_some_and(|l| {
            let l = l.to_canonical();
            let ip = ip.to_canonical();
            ip == l || (l.is_loopback() && ip.is_loopback())
        });
    }
    let snap = state.snapshot.load();
    snap.config
        .admin
        .as_ref()
        .is_some_and(|a| a.hosts.contains(&name))
}

async fn route(
    state: &AppState,
    upgrader: &Arc<Upgrader>,
    req: Request<Incoming>,
) -> Response<AdminBody> {
    if !own_host(state, &req) {
        return text(
            StatusCode::MISDIRECTED_REQUEST,
            "421 this is the admin listener: the Host must be its own address, localhost or a \
             name in admin.hosts\n",
        );
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => {
            // After a handover the new process serves: only a stopping gateway is unhealthy.
            if state.draining.load(Ordering::Relaxed) && !state.handed_over.load(Ordering::Relaxed)
            {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else {
                text(StatusCode::OK, "ok")
            }
        }
        (&Method::GET, "/") => console::page(),
        (&Method::GET, "/metrics") => {
            let mut resp = Response::new(Full::new(Bytes::from(state.metrics.render())));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            resp
        }
        (_, path) if path.starts_with("/v1/") => {
            if !authorized(state, &req) {
                return json_error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
            }
            if path == "/v1/upgrade" && req.method() == Method::POST {
                return upgrade::answer(upgrader).await;
            }
            v1(state, req).await
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// A temporary entry as the API shows it.
pub(super) fn temporary_view(slot: &Slot, target: IpNet, e: &Entry) -> EntryView {
    let action = slot.action();
    EntryView {
        target: target.to_string(),
        action,
        list: action.to_string(),
        scope: slot.scope().map(ToString::to_string),
        source: e.source().to_string(),
        reason: e.reason().map(str::to_string),
        expires_at: Some(rfc3339(e.expires_at)),
        origin: e.origin().map(str::to_string),
        shared: None,
    }
}

/// With a fleet: who made each temporary entry and whether the fleet has it yet.
pub(super) async fn mark_fleet(state: &AppState, views: &mut [EntryView]) {
    let Some(me) = &state.fleet_id else { return };
    let waiting = state.store.outbox_targets().await.unwrap_or_default();
    for v in views.iter_mut().filter(|v| v.expires_at.is_some()) {
        let own = v.origin.is_none();
        v.origin.get_or_insert_with(|| me.clone());
        let scope = v.scope.as_deref().and_then(|s| s.parse::<Scope>().ok());
        let slot = Slot::from_parts(v.action, scope).unwrap_or(Slot::of(v.action));
        let key = v.target.parse().ok().map(|t| (slot, t));
        v.shared = Some(!own || key.is_none_or(|k| !waiting.contains(&k)));
    }
}

/// A static list's entry as the API shows it.
/// A static list's entry: `source` is `feed` for a list fetched from a URL, else `config`.
pub(super) fn config_view(list: &StaticList, target: IpNet) -> EntryView {
    EntryView {
        target: target.to_string(),
        action: list.action,
        list: list.name.clone(),
        source: if list.feed { "feed" } else { "config" }.into(),
        scope: None,
        reason: None,
        expires_at: None,
        origin: None,
        shared: None,
    }
}

/// Every certificate the TLS listeners serve, soonest expiry first.
fn certificates(state: &AppState) -> Vec<crate::admin::api::CertificateView> {
    let secs = |s: i64| rfc3339(u64::try_from(s).unwrap_or(0).saturating_mul(1000));
    let mut certs = state.snapshot.load().certificates.clone();
    certs.sort_by_key(|c| c.not_after);
    certs
        .into_iter()
        .map(|c| crate::admin::api::CertificateView {
            file: c.file.map(|f| f.display().to_string()),
            not_before: secs(c.not_before),
            not_after: secs(c.not_after),
            next_renewal: c.renew_at.map(secs),
            names: c.names,
            source: c.source,
        })
        .collect()
}

pub(super) fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Longest `reason` kept; longer ones are refused rather than stored.
const MAX_REASON: usize = 512;

async fn v1(state: &AppState, req: Request<Incoming>) -> Response<AdminBody> {
    let path = req.uri().path().to_string();
    let query: Vec<(String, String)> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let param = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let method = req.method().clone();
    match (method, path.as_str()) {
        (Method::GET, "/v1/entries") => {
            let action = match param("list") {
                None => None,
                Some(a) => match parse_action(a) {
                    Ok(a) => Some(a),
                    Err(e) => return json_error(StatusCode::BAD_REQUEST, &e),
                },
            };
            json(StatusCode::OK, &list_entries(state, action, param("kind")))
        }
        (Method::POST, "/v1/entries") => {
            let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return json_error(StatusCode::BAD_REQUEST, "body unreadable or over 64 KiB")
                }
            };
            add_entry(state, &body).await
        }
        (Method::DELETE, "/v1/entries") => delete_entries(state, &query).await,
        (Method::GET, p) if p.starts_with("/v1/ips/") => match parse_ip(&p[8..]) {
            Ok(ip) => ips::lookup(state, ip).await,
            Err(e) => json_error(StatusCode::BAD_REQUEST, &e),
        },
        (Method::DELETE, p) if p.starts_with("/v1/ips/") => match parse_ip(&p[8..]) {
            Ok(ip) => ips::forget(state, ip).await,
            Err(e) => json_error(StatusCode::BAD_REQUEST, &e),
        },
        (Method::GET, "/v1/certificates") => json(StatusCode::OK, &certificates(state)),
        (Method::GET, p) if p.starts_with("/v1/console/") => {
            console::view(state, &p["/v1/console/".len()..], |k| {
                param(k).map(str::to_string)
            })
            .await
        }
        (m @ (Method::GET | Method::PUT), p) if p.starts_with("/v1/sites/") => {
            let body = match Limited::new(req.into_body(), 4 * 1024).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return json_error(StatusCode::BAD_REQUEST, "body unreadable or over 4 KiB")
                }
            };
            sites::challenge(state, &m, &p["/v1/sites/".len()..], body).await
        }
        (Method::POST, "/v1/reload") => match state.reload() {
            Ok(restart) => json(StatusCode::OK, &reloaded(state, &restart)),
            Err(errors) => {
                let errors = errors
                    .0
                    .iter()
                    .map(|p| ProblemView {
                        file: p.file.display().to_string(),
                        line: p.line,
                        key: p.key.clone(),
                        message: p.message.clone(),
                        text: p.to_string(),
                    })
                    .collect();
                let refused = ReloadRefused {
                    result: "refused".into(),
                    errors,
                };
                json(StatusCode::UNPROCESSABLE_ENTITY, &refused)
            }
        },
        _ => json_error(StatusCode::NOT_FOUND, "no such endpoint"),
    }
}

/// `DELETE /v1/entries?target=…[&action=…][&scope=…|&site=…]`: written before it is applied.
async fn delete_entries(state: &AppState, query: &[(String, String)]) -> Response<AdminBody> {
    let param = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let Some(target) = param("target") else {
        return json_error(StatusCode::BAD_REQUEST, "target is required");
    };
    let target = match config::parse_target(target) {
        Ok(t) => t,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &e),
    };
    let action = match param("action").map(parse_action).transpose() {
        Ok(a) => a,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &e),
    };
    // `scope=site:NAME` (or `site=NAME`): that scoped entry only; none: the entries
    // for the target in every scope.
    let scope = match (param("scope"), param("site")) {
        (Some(s), _) => s.parse::<Scope>().map(Some),
        (None, Some(site)) => Ok(Some(Scope::Site(site.into()))),
        (None, None) => Ok(None),
    };
    let scope = match scope {
        Ok(s) => s,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &e),
    };
    let targets = state
        .temp
        .slots()
        .into_iter()
        .filter(|s| action.is_none_or(|a| s.action() == a))
        .filter(|s| scope.is_none() || s.scope() == scope.as_ref())
        .map(|s| (s, target))
        .collect();
    match state.remove_entries(targets).await {
        Ok(removed) if removed.is_empty() => {
            json_error(StatusCode::NOT_FOUND, "no such temporary entry")
        }
        Ok(_) => empty(StatusCode::NO_CONTENT),
        Err(e) => json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("not removed: the disk refused the change, the entry stays: {e}"),
        ),
    }
}

fn parse_action(a: &str) -> Result<Action, String> {
    a.parse()
}

fn parse_ip(text: &str) -> Result<IpAddr, String> {
    let decoded: String = form_urlencoded::parse(format!("x={text}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    decoded
        .parse::<IpAddr>()
        .map(crate::serve::client_addr::normalize)
        .map_err(|_| format!("'{decoded}' is not an IP address"))
}

fn list_entries(state: &AppState, action: Option<Action>, kind: Option<&str>) -> Vec<EntryView> {
    let snap = state.snapshot.load();
    let mut out = Vec::new();
    if kind != Some("temporary") {
        for l in snap.policy.all() {
            if action.is_none_or(|a| a == l.action) {
                out.extend(l.table.cidrs().iter().map(|&t| config_view(l, t)));
            }
        }
    }
    if kind != Some("static") {
        let now = now_ms();
        for slot in state.temp.slots() {
            if action.is_none_or(|x| x == slot.action()) {
                out.extend(
                    state
                        .temp
                        .table(&slot)
                        .all(now)
                        .iter()
                        .map(|(t, e)| temporary_view(&slot, *t, e)),
                );
            }
        }
    }
    out
}

/// A `POST /v1/entries` body, checked: what to enforce, on what, for how long (capped at
/// `max_retention`), and why. Pure, so it is fuzzed (`fuzz/fuzz_targets/admin_json.rs`).
pub fn parse_new_entry(
    body: &[u8],
    default_ttl: Duration,
    max_retention: Duration,
) -> Result<(Slot, IpNet, Duration, Option<String>), String> {
    let new: NewEntry = serde_json::from_slice(body).map_err(|e| format!("malformed body: {e}"))?;
    let slot = match (&new.site, new.action) {
        (_, Action::Pass) => {
            return Err("action: a pass is made by solving the challenge, not by the API".into())
        }
        (_, Action::Challenge) => {
            return Err("action: \"block\" or \"allow\" (\"challenge\" is for lists)".into())
        }
        (None, action) => Slot::of(action),
        (Some(site), Action::Block) if !site.is_empty() && site.len() <= 253 => {
            Slot::Scoped(Scope::Site(site.as_str().into()))
        }
        (Some(_), Action::Block) => return Err("site: a site's name is needed".into()),
        (Some(_), Action::Allow) => {
            return Err("site: only block entries hold on one site".into());
        }
    };
    let target = config::parse_target(&new.target)?;
    let ttl = match new.ttl.as_deref() {
        None => default_ttl,
        Some(t) => config::parse_duration(t).map_err(|e| format!("ttl: {e}"))?,
    };
    if new.reason.as_ref().is_some_and(|r| r.len() > MAX_REASON) {
        return Err(format!("reason is longer than {MAX_REASON} bytes"));
    }
    // No datum outlives privacy.max_retention.
    let reason = new.reason.filter(|r| !r.is_empty());
    Ok((slot, target, ttl.min(max_retention), reason))
}

async fn add_entry(state: &AppState, body: &[u8]) -> Response<AdminBody> {
    if state.store.is_handed_over() {
        // Refused before it is enforced: the new process takes it when asked again.
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this process has handed over to an upgraded one; send the request again",
        );
    }
    let (default_ttl, max_retention) = {
        let c = &state.snapshot.load().config;
        (c.gateway.default_ban, c.privacy.max_retention)
    };
    let (action, target, ttl, reason) = match parse_new_entry(body, default_ttl, max_retention) {
        Ok(parsed) => parsed,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &e),
    };
    if let Some(Scope::Site(site)) = action.scope() {
        if !state
            .snapshot
            .load()
            .sites
            .iter()
            .any(|s| *s.site.name == **site)
        {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("site: no site is named '{site}'"),
            );
        }
    }
    let now = now_ms();
    let entry = Entry::new(now, now + ttl.as_millis() as u64, "api", reason.as_deref());
    match state.add_entry(action.clone(), target, entry.clone()).await {
        Ok(()) => json(StatusCode::CREATED, &temporary_view(&action, target, &entry)),
        // Enforced now, written as soon as the disk takes it.
        Err(e) => json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("the entry is enforced but not durable yet (it is written as soon as the disk takes it): {e}"),
        ),
    }
}

fn reloaded(state: &AppState, restart: &[&str]) -> Reloaded {
    let snap = state.snapshot.load();
    Reloaded {
        result: "ok".into(),
        sites: snap.sites.len(),
        lists: snap
            .policy
            .all()
            .map(|l| (l.name.clone(), l.table.len()))
            .collect(),
        restart_required: restart.iter().map(|k| k.to_string()).collect(),
    }
}

pub(super) fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<AdminBody> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn empty(status: StatusCode) -> Response<AdminBody> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = status;
    resp
}

/// Bearer token check in constant time over the token's length.
fn authorized(state: &AppState, req: &Request<Incoming>) -> bool {
    let Some(expected) = state.admin_token.as_deref() else {
        return false;
    };
    let Some(given) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    constant_time_eq(given.trim().as_bytes(), expected.as_bytes())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn text(status: StatusCode, body: &'static str) -> Response<AdminBody> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

pub(super) fn json_error(status: StatusCode, message: &str) -> Response<AdminBody> {
    json(
        status,
        &ApiError {
            error: message.to_string(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_tokens() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
