//! The config in force, compiled for the request path ([`Snapshot`]): TLS settings, sites
//! with their limiters and jails, the static policy and the host table. Built by
//! [`Snapshot::build`] at start and on every reload, and swapped in whole
//! ([`crate::state::AppState`]); rules whose settings did not change are kept, with their
//! client state.

use std::collections::HashMap;
use std::sync::Arc;

use hyper_util::rt::TokioExecutor;
use tokio_rustls::TlsAcceptor;

use crate::config::{ChallengeMode, Config, Errors, Report, Site};
use crate::decide::jail::Jail;
use crate::decide::policy::table::CidrTable;
use crate::decide::policy::temporary::Scope;
use crate::decide::policy::Policy;
use crate::decide::ratelimit::Limiter;
use crate::observe::metrics::{Metrics, SiteMetrics};
use crate::state::tls;

/// The config in force, compiled for the request path.
pub struct Snapshot {
    pub config: Config,
    /// Each watched file as it was just before it was read (`None`: not there): a file that
    /// differs now has changed since, and this snapshot may not have the change.
    pub stamps: Vec<(std::path::PathBuf, Option<FileStamp>)>,
    /// `None` when no listener needs TLS and no certificate is configured.
    pub tls: Option<TlsAcceptor>,
    /// Every certificate `tls` serves.
    pub certificates: Vec<tls::CertInfo>,
    pub sites: Vec<SiteEntry>,
    /// The static block and allow lists.
    pub policy: Policy,
    /// `gateway.trusted_proxies`.
    pub trusted: CidrTable,
    /// Every rate limit by rule name (`global`, `site:NAME`, `site:NAME:PATH`), kept across
    /// reloads while its settings stay the same, so client state survives a reload.
    pub limiters: HashMap<String, Arc<Limiter>>,
    /// Every jail by name, kept across reloads the same way.
    pub jails: HashMap<String, Arc<Jail>>,
    /// HTTP server settings from `limits` for new client connections.
    pub http: Arc<hyper_util::server::conn::auto::Builder<TokioExecutor>>,
    /// Signs and checks the challenge's puzzles.
    pub puzzles: Arc<crate::decide::challenge::Puzzles>,
    /// Exact host (lower case) to index in `sites`.
    hosts: HashMap<String, usize>,
    /// The `"*"` site.
    default_site: Option<usize>,
}

/// A site with its metric children, rate limits and jails resolved.
pub struct SiteEntry {
    pub site: Site,
    pub metrics: SiteMetrics,
    /// The site's rate limit (its own, or the global one).
    pub limiter: Arc<Limiter>,
    /// Routes with a rate limit of their own: (path prefix, limiter), longest first.
    pub route_limiters: Vec<(String, Arc<Limiter>)>,
    pub jails: Vec<Arc<Jail>>,
    /// `host:port` of `site.upstream` (config validation guarantees one).
    pub upstream: http::uri::Authority,
    /// `site.max_upstream_connections` as permits; kept across a reload that keeps the cap,
    /// so requests in flight stay counted.
    pub upstream_slots: Option<Arc<tokio::sync::Semaphore>>,
    /// `site.hsts` as the Strict-Transport-Security value for its TLS responses.
    pub hsts: Option<http::HeaderValue>,
    /// The scopes whose block entries hold here: the site's own, and each of its jails with
    /// `scope = "site"`.
    pub scopes: Vec<crate::decide::policy::temporary::Scope>,
    /// The site's load for auto mode and the operator's forced mode: kept across reloads.
    pub load: Arc<crate::decide::load::Load>,
    /// The scope of the site's passes.
    pub pass_scope: crate::decide::policy::temporary::Scope,
    /// The config challenges somewhere on this site (its own mode, or a route's).
    pub may_challenge: bool,
    /// The config has auto mode somewhere on this site: its upstream's load is measured.
    pub may_auto: bool,
}

/// What tells one version of a file from the next without reading it: which file a path
/// leads to (a rename or a symlink swap changes it), its size, and its change times. A write
/// changes the size or the times; only a same-size rewrite within one tick of the file
/// system's clock could pass unseen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    pub fn of(path: &std::path::Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// Each watched file as it is now, before it is read.
fn stamps(config: &Config) -> Vec<(std::path::PathBuf, Option<FileStamp>)> {
    config
        .watched_files()
        .map(|f| (f.to_path_buf(), FileStamp::of(f)))
        .collect()
}

/// The `[geo]` databases, opened and checked (a damaged one is a problem of `ipgate check` and
/// refuses a reload, so the ones in force keep serving).
fn geo(
    config: &Config,
    report: &mut Report,
    previous: Option<&Snapshot>,
) -> Option<crate::decide::geo::Geo> {
    use crate::decide::geo::{self, Kind};
    let g = &config.geo;
    if g.asn_database.is_none() && g.country_database.is_none() {
        return None;
    }
    // A file that has not changed since the snapshot in force read it is not read again.
    let unchanged = |path: &std::path::Path| {
        previous.is_some_and(|p| {
            p.stamps
                .iter()
                .any(|(f, s)| f == path && *s == FileStamp::of(path))
                && p.config.geo == config.geo
        })
    };
    let kept = |kind: Kind| {
        let old = previous.and_then(|p| p.policy.geo.as_ref())?;
        match kind {
            Kind::Asn => old.asn.clone(),
            Kind::Country => old.country.clone(),
        }
    };
    let mut open = |path: &Option<std::path::PathBuf>, key: &str, kind: Kind| {
        let path = path.as_ref()?;
        if unchanged(path) {
            if let Some(db) = kept(kind) {
                return Some(db);
            }
        }
        geo::open(path, kind)
            .map_err(|e| report.other(path, None, key, e))
            .ok()
    };
    let asn = open(&g.asn_database, "geo.asn_database", Kind::Asn);
    let country = open(&g.country_database, "geo.country_database", Kind::Country);
    Some(geo::Geo::new(asn, country))
}

/// The file the challenge key is kept in when `challenge.secret_file` is not set.
pub const CHALLENGE_KEY: &str = "challenge.key";

/// The key that signs puzzles: `challenge.secret_file`, else `state_dir/challenge.key` (made
/// at the first start). Before that (`ipgate check` on a new install) a throwaway key; on a
/// reload that finds the file gone, the key in force.
fn puzzles(
    config: &Config,
    report: &mut Report,
    previous: Option<&Snapshot>,
) -> Arc<crate::decide::challenge::Puzzles> {
    let c = &config.challenge;
    let path = c
        .secret_file
        .clone()
        .unwrap_or_else(|| config.gateway.state_dir.join(CHALLENGE_KEY));
    let secret = match std::fs::read_to_string(&path) {
        Ok(text) if text.trim().len() >= 32 => text.trim().as_bytes().to_vec(),
        Ok(_) => {
            report.other(
                &path,
                None,
                "challenge.secret_file",
                "the challenge key must be at least 32 characters (openssl rand -hex 32)".into(),
            );
            Vec::new()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && c.secret_file.is_none() => {
            if let Some(p) = previous {
                let ttl = c.puzzle_ttl.as_millis() as u64;
                return Arc::new(p.puzzles.with(c.difficulty, ttl));
            }
            match crate::decide::challenge::new_secret() {
                Ok(key) => key.into_bytes(),
                Err(e) => {
                    report.other(
                        &path,
                        None,
                        "challenge.secret_file",
                        format!("no randomness for a challenge key: {e}"),
                    );
                    Vec::new()
                }
            }
        }
        Err(e) => {
            report.other(
                &path,
                None,
                "challenge.secret_file",
                format!("cannot read the challenge key: {e}"),
            );
            Vec::new()
        }
    };
    Arc::new(crate::decide::challenge::Puzzles::new(
        &secret,
        c.difficulty,
        c.puzzle_ttl.as_millis() as u64,
    ))
}

impl SiteEntry {
    /// Whether the upstream's load is measured now (auto mode by config or forced).
    #[inline]
    pub fn tracks_load(&self) -> bool {
        self.may_auto || self.load.forced() == Some(crate::config::ChallengeMode::Auto)
    }

    /// The challenge mode for a path: a route's `challenge` (the longest matching route that
    /// has one) or the site's; the operator's forced mode over the site's; a route's "off"
    /// holds whatever the operator forced, and a forced "off" holds everywhere.
    pub fn challenge_mode(&self, path: &str) -> crate::config::ChallengeMode {
        use crate::config::ChallengeMode;
        let site = self.load.mode(self.site.challenge);
        if site == ChallengeMode::Off && self.load.forced().is_some() {
            return ChallengeMode::Off;
        }
        match self.route_challenge(path) {
            Some(ChallengeMode::Off) => ChallengeMode::Off,
            Some(mode) if self.load.forced().is_none() => mode,
            _ => site,
        }
    }

    /// The `challenge` of the longest matching route that sets one.
    pub fn route_challenge(&self, path: &str) -> Option<crate::config::ChallengeMode> {
        self.site
            .routes
            .iter()
            .filter(|r| r.challenge.is_some() && path.starts_with(r.path.as_str()))
            .max_by_key(|r| r.path.len())
            .and_then(|r| r.challenge)
    }

    /// The rate limit for a path: the longest matching route's, else the site's.
    pub fn limiter_for(&self, path: &str) -> &Arc<Limiter> {
        self.route_limiters
            .iter()
            .find(|(p, _)| path.starts_with(p.as_str()))
            .map_or(&self.limiter, |(_, l)| l)
    }
}

impl Snapshot {
    /// Whether a file this snapshot read has changed since.
    pub fn files_changed(&self) -> bool {
        self.stamps.iter().any(|(f, s)| FileStamp::of(f) != *s)
    }

    /// Loads what the config names (certificates) and compiles the lookup tables. Every
    /// problem is reported, so `ipgate check` and a refused reload can name them all.
    pub fn build(
        config: Config,
        metrics: &Metrics,
        previous: Option<&Snapshot>,
    ) -> Result<Snapshot, Errors> {
        let stamps = stamps(&config);
        let mut report = Report::new(&config.source, "");
        let loaded = tls::server_config(
            &config.tls,
            config.acme.as_ref(),
            crate::state::acme_dir::served(&config),
            &mut report,
        );
        let tls = loaded.config.map(TlsAcceptor::from);
        let mut policy = Policy::build(&config.lists, &mut report, metrics);
        policy.geo = geo(&config, &mut report, previous);
        let puzzles = puzzles(&config, &mut report, previous);
        if !report.is_empty() {
            return Err(report.into_errors());
        }
        let cap = config.limits.max_tracked_clients;
        let mut limiters: HashMap<String, Arc<Limiter>> = HashMap::new();
        let mut limiter = |name: String, settings: &crate::config::RateLimit| {
            let l = kept_or(
                previous.map(|p| &p.limiters),
                &name,
                |l| &l.settings == settings && l.cap() == cap,
                || Limiter::new(settings.clone(), cap, metrics.client_evictions.clone()),
            );
            limiters.extend(l.network.clone().map(|n| (format!("network:{name}"), n)));
            limiters.insert(name, l.clone());
            l
        };
        let global = limiter("global".into(), &config.rate_limit);
        let jails = build_jails(&config, metrics, previous);
        let mut hosts = HashMap::new();
        let mut default_site = None;
        let mut sites = Vec::with_capacity(config.sites.len());
        for (i, site) in config.sites.iter().enumerate() {
            for h in &site.hosts {
                if h == "*" {
                    default_site = Some(i);
                } else {
                    hosts.insert(h.clone(), i);
                }
            }
            let site_limiter = match &site.rate_limit {
                Some(rl) => limiter(format!("site:{}", site.name), rl),
                None => global.clone(),
            };
            let mut route_limiters: Vec<(String, Arc<Limiter>)> = site
                .routes
                .iter()
                .filter_map(|r| {
                    let rl = r.rate_limit.as_ref()?;
                    Some((
                        r.path.clone(),
                        limiter(format!("site:{}:{}", site.name, r.path), rl),
                    ))
                })
                .collect();
            route_limiters.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
            sites.push(SiteEntry {
                load: kept_load(previous, site),
                pass_scope: Scope::Site(site.name.as_str().into()),
                may_auto: site.challenge_modes().any(|m| m == ChallengeMode::Auto),
                may_challenge: site.challenge_modes().any(|m| m != ChallengeMode::Off),
                upstream_slots: upstream_slots(previous, site),
                scopes: scopes(&config, site),
                hsts: hsts_value(site),
                upstream: upstream_authority(site),
                metrics: SiteMetrics::new(metrics, &site.name),
                limiter: site_limiter,
                route_limiters,
                jails: site
                    .jails
                    .iter()
                    .filter_map(|n| jails.get(n).cloned())
                    .collect(),
                site: site.clone(),
            });
        }
        Ok(Snapshot {
            puzzles,
            stamps,
            http: Arc::new(http_builder(&config.limits)),
            trusted: CidrTable::new(config.gateway.trusted_proxies.clone()),
            limiters,
            jails,
            config,
            tls,
            certificates: loaded.certificates,
            sites,
            policy,
            hosts,
            default_site,
        })
    }

    /// The site serving `host` (port already removed), or the `"*"` site, or none (421).
    pub fn site_for(&self, host: &str) -> Option<&SiteEntry> {
        let exact = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            self.hosts.get(&host.to_ascii_lowercase())
        } else {
            self.hosts.get(host)
        };
        exact
            .or(self.default_site.as_ref())
            .and_then(|&i| self.sites.get(i))
    }
}

/// The HTTP server settings every client connection gets.
pub fn http_builder(
    limits: &crate::config::Limits,
) -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        // One flat buffer per write: send(2) instead of writev(2), cheaper on the kernel side.
        .writev(false)
        .keep_alive(true);
    b.http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(limits.http2_max_streams)
        // Peers that stop answering pings are dropped.
        .keep_alive_interval(Some(std::time::Duration::from_secs(30)))
        .keep_alive_timeout(std::time::Duration::from_secs(20));
    b
}

/// The jails of `config`, each kept from `previous` while its config and the tracking cap are
/// unchanged (its counters with it).
fn build_jails(
    config: &Config,
    metrics: &Metrics,
    previous: Option<&Snapshot>,
) -> HashMap<String, Arc<Jail>> {
    let cap = config.limits.max_tracked_clients;
    let mut jails = HashMap::new();
    for j in &config.jails {
        let would_block = || metrics.would_block.with_label_values(&[&j.name]);
        let jail = kept_or(
            previous.map(|p| &p.jails),
            &j.name,
            |old| &old.config == j && old.cap() == cap,
            || {
                Jail::new(
                    j.clone(),
                    cap,
                    metrics.client_evictions.clone(),
                    j.dry_run.then(would_block),
                )
            },
        );
        jails.insert(j.name.clone(), jail);
    }
    jails
}

/// The scopes whose bans hold on `site`: the site itself, and the site-scoped jails it names.
fn scopes(
    config: &Config,
    site: &crate::config::Site,
) -> Vec<crate::decide::policy::temporary::Scope> {
    use crate::decide::policy::temporary::Scope;
    std::iter::once(Scope::Site(site.name.as_str().into()))
        .chain(
            config
                .jails
                .iter()
                .filter(|j| j.site_scoped && site.jails.contains(&j.name))
                .map(|j| Scope::Jail(j.name.as_str().into())),
        )
        .collect()
}

/// `site.hsts` as the Strict-Transport-Security header's value.
fn hsts_value(site: &Site) -> Option<http::HeaderValue> {
    site.hsts
        .and_then(|d| http::HeaderValue::try_from(format!("max-age={}", d.as_secs())).ok())
}

/// `host:port` of `site.upstream` (the config check guarantees one).
fn upstream_authority(site: &Site) -> http::uri::Authority {
    site.upstream
        .authority()
        .cloned()
        .unwrap_or_else(|| http::uri::Authority::from_static("127.0.0.1:80"))
}

/// A site's load and forced challenge mode: the previous snapshot's for the same name.
fn kept_load(
    previous: Option<&Snapshot>,
    site: &crate::config::Site,
) -> Arc<crate::decide::load::Load> {
    previous
        .and_then(|p| p.sites.iter().find(|s| s.site.name == site.name))
        .map(|s| s.load.clone())
        .unwrap_or_default()
}

/// A site's `max_upstream_connections` permits: the previous snapshot's when the cap is the
/// same, so requests in flight stay counted across a reload.
fn upstream_slots(
    previous: Option<&Snapshot>,
    site: &crate::config::Site,
) -> Option<Arc<tokio::sync::Semaphore>> {
    let cap = site.max_upstream_connections?;
    let kept = previous
        .and_then(|p| p.sites.iter().find(|s| s.site.name == site.name))
        .filter(|s| s.site.max_upstream_connections == Some(cap))
        .and_then(|s| s.upstream_slots.clone());
    Some(kept.unwrap_or_else(|| Arc::new(tokio::sync::Semaphore::new(cap))))
}

/// The rule of the previous snapshot named `name`, if `same` says its settings are unchanged:
/// kept, client state and all, across a reload; otherwise a new one from `make`.
fn kept_or<T>(
    previous: Option<&HashMap<String, Arc<T>>>,
    name: &str,
    same: impl Fn(&T) -> bool,
    make: impl FnOnce() -> T,
) -> Arc<T> {
    previous
        .and_then(|p| p.get(name))
        .filter(|t| same(t))
        .cloned()
        .unwrap_or_else(|| Arc::new(make()))
}
