//! The per-request decision, in one place and in this order: allow wins, then
//! block entries (3), `allow_only` (5), the rate limit (4); and once the response is known,
//! the jails (6). It sees the request as [`crate::serve::request`] checked it: the normalized path
//! and the client behind trusted proxies.

use std::net::IpAddr;
use std::sync::Arc;

use http::Method;

use crate::decide::clients::{client_key, key_target, ClientSlot, Gate, InFlight};
use crate::decide::jail::{Jail, Watched};
use crate::decide::policy::Verdict;
use crate::observe::access_log::LoggedIp;
use crate::state::{AppState, SiteEntry, Snapshot};

/// Why a request is refused by the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A block entry holds the client (403).
    Blocked,
    /// Not in the `allow_only` lists of the site or route (403).
    Denied,
    /// Over the rate limit; may retry after this many seconds (429).
    RateLimited(u64),
    /// As many requests of this client in flight as `limits.max_requests_per_client` for
    /// `limits.upstream_queue_timeout`, as many streaming uploads as
    /// `limits.max_uploads_per_client`, or as many watched requests as a jail's
    /// `concurrency` (429).
    Busy,
    /// Challenged: the client has no pass for this site. `transient`: because the site is
    /// under load or the client's network over its limit (429 with Retry-After), else 403.
    Challenge { transient: bool },
}

/// The client a decision is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client {
    pub ip: IpAddr,
    /// A trusted proxy standing for itself (no X-Forwarded-For, or only trusted addresses
    /// in it): never rate-limited or jailed on behalf of the clients behind it.
    pub is_proxy: bool,
}

/// What an admitted request is spared, and what it holds.
pub struct Admitted {
    /// Allow-listed, or a trusted proxy: jails do not count its responses.
    pub exempt: bool,
    /// Its place among the client's requests in flight, until its response ends.
    pub in_flight: Option<InFlight>,
    /// All the client's places were taken: the request waits at this gate for one (up to
    /// `limits.upstream_queue_timeout`) before it is forwarded.
    pub queued: Option<(Arc<Gate>, Option<ClientSlot>)>,
    /// Its places among the watched requests of the jails that watch it.
    pub watched: Vec<Watched>,
}

/// The request as admission sees it.
pub struct Asked<'a> {
    pub method: &'a Method,
    /// The host without port or trailing dot.
    pub host: &'a str,
    /// The normalized path.
    pub path: &'a str,
    /// The request target has a query.
    pub query: bool,
    /// The listener redirects to HTTPS: the challenge waits for the HTTPS request.
    pub redirect: bool,
}

/// Decides whether a request for `path` on `site` may be forwarded. `conn` is the slot of
/// the connection's client, when that is the request's client too.
pub fn admit(
    state: &AppState,
    snap: &Snapshot,
    site: Option<&SiteEntry>,
    (client, conn): (Client, Option<&ClientSlot>),
    asked: &Asked,
) -> Result<Admitted, Refusal> {
    let path = asked.path;
    let verdict = snap.policy.decide(&state.temp, client.ip);
    if let Verdict::Block(_) = verdict {
        return Err(Refusal::Blocked);
    }
    let Some(site) = site else {
        // No site: 421, decided by the caller.
        return Ok(Admitted::exempt());
    };
    // Scoped block entries hold on their sites only, at request level (allow still wins).
    if !matches!(verdict, Verdict::Allow(_)) && state.temp.blocked_in(&site.scopes, client.ip) {
        return Err(Refusal::Blocked);
    }
    if !allowed_only(snap, site, path, client.ip) {
        return Err(Refusal::Denied);
    }
    let exempt = matches!(verdict, Verdict::Allow(_)) || client.is_proxy;
    if exempt {
        return Ok(Admitted::exempt());
    }
    rate_limit(state, site, asked, client.ip)?;
    if !asked.redirect {
        challenge(state, snap, site, asked, client.ip)?;
    }
    let key = client_key(client.ip, snap.config.rate_limit.ipv6_prefix);
    // No burst outruns a jail: a few watched requests per client at a time, and none while
    // the client's ban is being made.
    let mut watched = Vec::new();
    for jail in &site.jails {
        if !jail.watches(asked.method, asked.host, path) {
            continue;
        }
        if jail.is_banning(key) {
            return Err(Refusal::Blocked);
        }
        if jail.config.concurrency != u32::MAX {
            watched.push(jail.enter(key).ok_or(Refusal::Busy)?);
        }
    }
    // Bounds the upstream work one client holds, whatever its rate.
    let cap = snap.config.limits.max_requests_per_client;
    let (in_flight, queued) = match conn {
        Some(slot) => match slot.enter(cap) {
            Some(f) => (Some(f), None),
            None => (None, Some((slot.gate().clone(), None))),
        },
        None => {
            // A client named by X-Forwarded-For: its entry lives while its requests do.
            let slot = state
                .in_flight
                .acquire(key, u32::MAX)
                .map_err(|_| Refusal::Busy)?;
            match slot.enter(cap) {
                Some(f) => (Some(f.keeping(slot)), None),
                None => (None, Some((slot.gate().clone(), Some(slot)))),
            }
        }
    };
    Ok(Admitted {
        exempt,
        in_flight,
        queued,
        watched,
    })
}

impl Admitted {
    fn exempt() -> Admitted {
        Admitted {
            exempt: true,
            in_flight: None,
            queued: None,
            watched: Vec::new(),
        }
    }
}

/// A forwarded request and its response, as the jails see them.
pub struct Seen<'a> {
    pub method: &'a Method,
    /// The host without port or trailing dot.
    pub host: &'a str,
    /// The normalized path.
    pub path: &'a str,
    pub status: u16,
    pub location: Option<&'a str>,
}

/// Counts a response against the site's jails; a jail that reaches its `hits` bans the
/// client (in a dry run, counts what it would have done). Exempt clients are not counted.
pub fn observe(
    state: &Arc<AppState>,
    snap: &Snapshot,
    site: &SiteEntry,
    client: IpAddr,
    seen: &Seen,
) {
    for jail in &site.jails {
        if jail.matches(
            seen.method,
            seen.host,
            seen.path,
            seen.status,
            seen.location,
        ) {
            count_offense(state, snap, jail, client);
        }
    }
}

/// Counts one offense of `client` against `jail` (a response or a log line); at the jail's
/// `hits` the client is banned at once (in a dry run, counted as what it would have done).
/// A client the jail has banned already is not counted again: the answers to requests it
/// had in flight when the ban came are one burst, and one burst is one offense.
pub fn count_offense(state: &Arc<AppState>, snap: &Snapshot, jail: &Arc<Jail>, client: IpAddr) {
    let prefix = snap.config.rate_limit.ipv6_prefix;
    let key = client_key(client, prefix);
    if jail.is_banning(key) || state.banned_by_jail(jail, client) {
        return;
    }
    if !jail.observe(key) {
        return;
    }
    let target = key_target(key, prefix);
    if let Some(counter) = &jail.would_block {
        counter.inc();
        tracing::info!(
            jail = %jail.config.name,
            client = %LoggedIp(client, snap.config.privacy.log_ip),
            "dry run: a jail would ban this client"
        );
        return;
    }
    // From now until the ban is in force, the client's watched requests are refused.
    jail.banning(key);
    let state = state.clone();
    let jail = jail.clone();
    tokio::spawn(async move {
        state.jail_ban(&jail, target).await;
        jail.banned(key);
    });
}

/// Whether `allow_only` admits the client: the longest matching route's list if it has one,
/// else the site's; no list means everyone. Membership is in the named static allow
/// lists only.
fn allowed_only(snap: &Snapshot, site: &SiteEntry, path: &str, client: IpAddr) -> bool {
    let route = site
        .site
        .routes
        .iter()
        .filter(|r| path.starts_with(r.path.as_str()) && !r.allow_only.is_empty())
        .max_by_key(|r| r.path.len());
    let names = route.map_or(&site.site.allow_only, |r| &r.allow_only);
    names.is_empty() || names.iter().any(|n| snap.policy.allows(n, client))
}

/// Requests never challenged: the challenge's own paths (answered by the gateway, never
/// proxied), and a GET or HEAD of robots.txt (no query) or of one ACME HTTP-01 token. Any
/// other form of those paths is challenged like the rest: an upstream that routes unknown
/// paths to its application must not be reachable around the challenge.
fn never_challenged(asked: &Asked) -> bool {
    let path = asked.path;
    if path.starts_with(crate::decide::challenge::PREFIX) {
        return true;
    }
    if *asked.method != Method::GET && *asked.method != Method::HEAD || asked.query {
        return false;
    }
    let token = path.strip_prefix(crate::state::challenges::ACME_CHALLENGE);
    path == "/robots.txt"
        || token.is_some_and(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Challenges a client without a pass when the site or route asks for it (always, or auto
/// under load) or a challenge list holds it. Costs one atomic read on a site that never
/// challenges and has no challenge list.
fn challenge(
    state: &AppState,
    snap: &Snapshot,
    site: &SiteEntry,
    asked: &Asked,
    client: IpAddr,
) -> Result<(), Refusal> {
    let path = asked.path;
    let forced = site.load.forced().is_some();
    if !site.may_challenge && !forced && snap.policy.challenge.is_empty() {
        return Ok(());
    }
    let mode = site.challenge_mode(path);
    let by_mode = site.load.challenging(mode);
    // A route or the operator saying off holds for challenge lists too.
    let by_list =
        !by_mode && mode_allows_lists(site, path, mode) && snap.policy.challenged(client).is_some();
    // Only what the gateway answers itself (GET or HEAD, not on a redirecting listener):
    // another method on that path is the upstream's, and challenged like any.
    let overview =
        crate::state::overview::served_at(&snap.config, asked.method, path, asked.redirect);
    if !(by_mode || by_list) || never_challenged(asked) || overview {
        return Ok(());
    }
    if state.temp.passed(&site.pass_scope, client) {
        return Ok(());
    }
    Err(Refusal::Challenge {
        transient: by_mode && mode == crate::config::ChallengeMode::Auto,
    })
}

/// Whether challenge lists apply under this mode: not where a route or the operator turned
/// the challenge off.
fn mode_allows_lists(site: &SiteEntry, path: &str, mode: crate::config::ChallengeMode) -> bool {
    use crate::config::ChallengeMode;
    if mode != ChallengeMode::Off {
        return true;
    }
    // Off by the config's site mode only: lists still apply. Off by a route or forced: not.
    site.load.forced().is_none() && site.route_challenge(path) != Some(ChallengeMode::Off)
}

/// Checks the rate limit for the path, and its limit per network; refused when over either
/// and not a dry run.
fn rate_limit(
    state: &AppState,
    site: &SiteEntry,
    asked: &Asked,
    client: IpAddr,
) -> Result<(), Refusal> {
    let limiter = site.limiter_for(asked.path);
    if let Err(wait) = limiter.check(limiter.key_for(client)) {
        if limiter.settings.dry_run {
            state.metrics.would_block_rate_limit.inc();
        } else {
            return Err(Refusal::RateLimited(retry_secs(wait)));
        }
    }
    match &limiter.network {
        Some(network) => network_limit(state, site, asked, client, network),
        None => Ok(()),
    }
}

/// A network over its limit has its clients challenged where the challenge is on for the
/// path, else refused (429). A client with a pass is not counted: it has shown it is a
/// browser.
fn network_limit(
    state: &AppState,
    site: &SiteEntry,
    asked: &Asked,
    client: IpAddr,
    network: &crate::decide::ratelimit::Limiter,
) -> Result<(), Refusal> {
    // A solution is never counted against the network: a visitor in a busy network must be
    // able to hand it in (its own limit still counts it).
    if asked.path.starts_with(crate::decide::challenge::PREFIX)
        || state.temp.passed(&site.pass_scope, client)
    {
        return Ok(());
    }
    let Err(wait) = network.check(network.key_for(client)) else {
        return Ok(());
    };
    if network.settings.dry_run {
        state.metrics.would_block_rate_limit.inc();
        return Ok(());
    }
    let mode = site.challenge_mode(asked.path);
    if mode != crate::config::ChallengeMode::Off && !asked.redirect && !never_challenged(asked) {
        return Err(Refusal::Challenge { transient: true });
    }
    Err(Refusal::RateLimited(retry_secs(wait)))
}

/// Whole seconds, rounded up: retrying earlier would be refused again.
fn retry_secs(wait: std::time::Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}
