//! The application state shared by every task: the compiled config in force (`Snapshot`,
//! swapped atomically on reload so readers never lock), the metrics, the temporary entries
//! and the access log. (Each worker thread owns its upstream pool: see [`crate::worker`].)

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::access_log::AccessLog;
use crate::clock::now_ms;
use crate::config::{Action, Config, Errors, Report, Site};
use crate::jail::Jail;
use crate::metrics::{Metrics, SiteMetrics};
use crate::policy::table::CidrTable;
use crate::policy::temporary::{Entry, Slot, TempEntries};
use crate::policy::Policy;
use crate::ratelimit::Limiter;
use crate::store::{self, Store};
use crate::tls;

/// The config in force, compiled for the request path.
pub struct Snapshot {
    pub config: Config,
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
    pub scopes: Vec<crate::policy::temporary::Scope>,
}

impl SiteEntry {
    /// The rate limit for a path: the longest matching route's, else the site's.
    pub fn limiter_for(&self, path: &str) -> &Arc<Limiter> {
        self.route_limiters
            .iter()
            .find(|(p, _)| path.starts_with(p.as_str()))
            .map_or(&self.limiter, |(_, l)| l)
    }
}

impl Snapshot {
    /// Loads what the config names (certificates) and compiles the lookup tables. Every
    /// problem is reported, so `ipgate check` and a refused reload can name them all.
    pub fn build(
        config: Config,
        metrics: &Metrics,
        previous: Option<&Snapshot>,
    ) -> Result<Snapshot, Errors> {
        let mut report = Report::new(&config.source, "");
        let loaded = tls::server_config(
            &config.tls,
            config.acme.as_ref(),
            crate::acme::served(&config),
            &mut report,
        );
        let tls = loaded.config.map(TlsAcceptor::from);
        let policy = Policy::build(&config.lists, &mut report, metrics);
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
            limiters.insert(name, l.clone());
            l
        };
        let global = limiter("global".into(), &config.rate_limit);
        let mut jails: HashMap<String, Arc<Jail>> = HashMap::new();
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
                upstream_slots: upstream_slots(previous, site),
                scopes: std::iter::once(crate::policy::temporary::Scope::Site(
                    site.name.as_str().into(),
                ))
                .chain(
                    config
                        .jails
                        .iter()
                        .filter(|j| j.site_scoped && site.jails.contains(&j.name))
                        .map(|j| crate::policy::temporary::Scope::Jail(j.name.as_str().into())),
                )
                .collect(),
                hsts: site.hsts.and_then(|d| {
                    http::HeaderValue::try_from(format!("max-age={}", d.as_secs())).ok()
                }),
                upstream: site
                    .upstream
                    .authority()
                    .cloned()
                    .unwrap_or_else(|| http::uri::Authority::from_static("127.0.0.1:80")),
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

/// The rule of the previous snapshot named `name`, if `same` says its settings are unchanged:
/// kept, client state and all, across a reload; otherwise a new one from `make`.
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

pub struct AppState {
    pub snapshot: ArcSwap<Snapshot>,
    pub metrics: Arc<Metrics>,
    pub access_log: AccessLog,
    /// One permit per open client connection (`limits.max_connections`).
    pub connections: Arc<Semaphore>,
    /// Open connections per client (`limits.max_connections_per_client`).
    pub conn_counts: Arc<crate::clients::ConnCounts>,
    /// Requests in flight per client (`limits.max_requests_per_client`).
    pub in_flight: Arc<crate::clients::ConnCounts>,
    /// Set once shutdown starts: `/healthz` answers 503 so balancers stop sending.
    pub draining: AtomicBool,
    pub admin_token: Option<String>,
    pub temp: TempEntries,
    /// Durable home of the temporary entries and the offense history.
    pub store: Store,
    /// `fleet.gateway_id` when a fleet is configured.
    pub fleet_id: Option<String>,
    /// The port `redirect_https` listeners send clients to: the first TLS listener's (as
    /// bound), else 443. Set once at start.
    pub https_port: u16,
}

impl AppState {
    pub fn new(
        snapshot: Snapshot,
        metrics: Arc<Metrics>,
        admin_token: Option<String>,
        store: Store,
    ) -> Self {
        let fleet_id = snapshot.config.fleet.as_ref().map(|f| f.gateway_id.clone());
        let access_log = AccessLog::stdout(
            snapshot.config.access_log,
            metrics.access_log_dropped.clone(),
        );
        let connections = Arc::new(Semaphore::new(snapshot.config.limits.max_connections));
        AppState {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics,
            access_log,
            connections,
            conn_counts: Arc::default(),
            in_flight: Arc::default(),
            draining: AtomicBool::new(false),
            admin_token,
            temp: TempEntries::default(),
            fleet_id,
            store,
            https_port: 443,
        }
    }

    /// Adds or replaces a temporary entry (SPEC 17): enforced at once, then written to the
    /// store, so an entry acknowledged with `Ok` survives a crash. `Err` means enforced but
    /// not durable yet: the store writes it as soon as the disk takes it ([`Self::sweep`]).
    pub async fn add_entry(
        &self,
        action: Slot,
        target: ipnet::IpNet,
        entry: Entry,
    ) -> Result<(), store::Error> {
        if action.action() == Action::Block {
            self.metrics.bans.with_label_values(&[entry.source()]).inc();
        }
        self.temp.table(&action).insert(target, entry.clone());
        self.publish_temporary_gauges();
        let written = self.store.put(action, target, entry).await;
        if written.is_err() {
            self.metrics.store_errors.inc();
        }
        self.metrics.store_pending.set(self.store.pending() as i64);
        written
    }

    /// Removes temporary entries from memory and the store; returns those that existed.
    pub async fn remove_entries(
        &self,
        targets: Vec<(Slot, ipnet::IpNet)>,
    ) -> Result<Vec<(Slot, ipnet::IpNet, Entry)>, store::Error> {
        // Written before it is applied (SPEC 17): a removal the disk refuses changes nothing,
        // so no entry comes back at restart after it was reported gone.
        if let Err(e) = self.store.delete(targets.clone()).await {
            self.metrics.store_errors.inc();
            return Err(e);
        }
        let now = now_ms();
        let mut removed = Vec::new();
        for (action, target) in targets {
            if let Some(e) = self.temp.table(&action).remove(target) {
                if e.expires_at > now {
                    removed.push((action, target, e));
                }
            }
        }
        self.publish_temporary_gauges();
        self.metrics.store_pending.set(self.store.pending() as i64);
        Ok(removed)
    }

    /// Bans a client a jail caught: records the offense, then adds a block entry for
    /// `ban × ban_factor^(earlier offenses)`, capped by `max_ban` and `privacy.max_retention`.
    pub async fn jail_ban(&self, jail: &Jail, target: ipnet::IpNet) {
        let (retention, log_ip) = {
            let snap = self.snapshot.load();
            (
                snap.config.privacy.max_retention,
                snap.config.privacy.log_ip,
            )
        };
        let now = now_ms();
        let ms = retention.as_millis() as u64;
        let earlier = match self
            .store
            .record_offense(jail.config.name.clone(), target, now, ms)
            .await
        {
            Ok(n) => n,
            Err(e) => {
                // The ban still holds; only its length may be too short. Said, not hidden.
                self.metrics.store_errors.inc();
                tracing::error!(
                    jail = %jail.config.name,
                    error = %e,
                    "cannot read or record the offense history: banning as a first offense"
                );
                0
            }
        };
        let ban = jail.ban_for(earlier, retention);
        let reason = format!(
            "jail {}: {} matching responses within {}",
            jail.config.name,
            jail.config.hits,
            humantime::format_duration(jail.config.window)
        );
        let entry = Entry::new(
            now,
            now + ban.as_millis() as u64,
            &jail.config.name,
            Some(&reason),
        );
        let slot = if jail.config.site_scoped {
            Slot::Scoped(crate::policy::temporary::Scope::Jail(
                jail.config.name.as_str().into(),
            ))
        } else {
            Slot::Block
        };
        match self.add_entry(slot, target, entry).await {
            Ok(()) => tracing::info!(
                jail = %jail.config.name,
                client = %crate::access_log::LoggedIp(target.addr(), log_ip),
                ban_secs = ban.as_secs(),
                earlier_offenses = earlier,
                "banned"
            ),
            Err(e) => tracing::error!(
                jail = %jail.config.name,
                error = %e,
                "ban enforced but not durable yet: written as soon as the disk takes it"
            ),
        }
    }

    /// The offense history held under exactly these targets (an address, its IPv6 prefix).
    pub async fn offenses(
        &self,
        ip: std::net::IpAddr,
        targets: Vec<ipnet::IpNet>,
    ) -> Result<Vec<store::Offenses>, store::Error> {
        self.store.offenses(ip, targets).await
    }

    /// Erases the offense history under these targets; returns how many records went.
    pub async fn forget_offenses(&self, targets: Vec<ipnet::IpNet>) -> Result<usize, store::Error> {
        self.store
            .forget(targets)
            .await
            .inspect_err(|_| self.metrics.store_errors.inc())
    }

    /// Forgets offense times older than `privacy.max_retention`.
    pub async fn prune_offenses(&self) {
        let retention = self
            .snapshot
            .load()
            .config
            .privacy
            .max_retention
            .as_millis() as u64;
        if let Err(e) = self.store.prune(now_ms(), retention).await {
            self.metrics.store_errors.inc();
            tracing::warn!(error = %e, "could not prune the offense history");
        }
    }

    /// Erases the rate-limit and jail state kept for `ip` (a fleet's `forget`).
    pub fn erase_counters(&self, ip: std::net::IpAddr) {
        let snap = self.snapshot.load();
        for l in snap.limiters.values() {
            l.forget(crate::clients::client_key(ip, l.settings.ipv6_prefix));
        }
        let key = crate::clients::client_key(ip, snap.config.rate_limit.ipv6_prefix);
        for j in snap.jails.values() {
            j.forget(key);
        }
    }

    /// Drops idle rate-limit and jail state and publishes `ipgate_tracked_clients`.
    pub fn sweep_clients(&self) {
        let snap = self.snapshot.load();
        let now = now_ms();
        let mut tracked = 0;
        for l in snap.limiters.values() {
            l.sweep(now);
            tracked += l.tracked();
        }
        for j in snap.jails.values() {
            j.sweep(now);
            tracked += j.tracked();
        }
        self.metrics.tracked_clients.set(tracked as i64);
    }

    /// Frees expired entries, in memory and on disk (SPEC 7), and writes the entries the
    /// disk refused before (SPEC 17).
    pub async fn sweep(&self) {
        let now = now_ms();
        match self.store.retry(now).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(entries = n, "entries still not durable"),
            Err(e) => {
                self.metrics.store_errors.inc();
                tracing::warn!(error = %e, "entries still not durable; the disk refuses them")
            }
        }
        self.metrics.store_pending.set(self.store.pending() as i64);
        let mut gone: Vec<(Slot, ipnet::IpNet)> = Vec::new();
        for slot in self.temp.slots() {
            let swept = self.temp.table(&slot).sweep(now);
            gone.extend(swept.into_iter().map(|t| (slot.clone(), t)));
        }
        if gone.is_empty() {
            return;
        }
        self.publish_temporary_gauges();
        let n = gone.len();
        match self.store.delete(gone).await {
            Ok(_) => tracing::debug!(entries = n, "expired entries removed"),
            Err(e) => {
                self.metrics.store_errors.inc();
                tracing::warn!(error = %e, "could not delete expired entries")
            }
        }
    }

    /// Sets `ipgate_list_entries` for the static lists of the config in force and for the
    /// temporary entries.
    pub fn publish_list_gauges(&self) {
        let snap = self.snapshot.load();
        self.metrics.list_entries.reset();
        for l in snap.policy.allow.iter().chain(&snap.policy.block) {
            self.metrics
                .list_entries
                .with_label_values(&[&l.name, "static"])
                .set(l.table.len() as i64);
        }
        self.publish_temporary_gauges();
        self.metrics.certificate_expiry.reset();
        for c in &snap.certificates {
            self.metrics
                .certificate_expiry
                .with_label_values(&[&c.label()])
                .set(c.not_after);
        }
    }

    pub fn publish_temporary_gauges(&self) {
        for action in [Action::Block, Action::Allow] {
            self.metrics
                .list_entries
                .with_label_values(&[action.as_str(), "temporary"])
                .set(self.temp.table(&Slot::of(action)).len() as i64);
        }
        self.metrics
            .list_entries
            .with_label_values(&["block_scoped", "temporary"])
            .set(self.temp.scoped_len() as i64);
    }
}

impl AppState {
    /// Re-reads the config file the running one came from, with the certificates it names,
    /// and swaps it in atomically. A config that does not validate is refused whole and the
    /// old one stays in force. What needs a restart ([`Config::restart_changes`]) is not
    /// applied: each such key is logged and returned by name.
    pub fn reload(&self) -> Result<Vec<&'static str>, Errors> {
        let current = self.snapshot.load();
        let next = Config::load(&current.config.source)
            .and_then(|config| Snapshot::build(config, &self.metrics, Some(&current)));
        let restart = next
            .as_ref()
            .map(|n| current.config.restart_changes(&n.config))
            .unwrap_or_default();
        for key in &restart {
            tracing::warn!(key, "changed, but takes effect only at restart");
        }
        self.swap_in(next).map(|()| restart)
    }
}

impl AppState {
    /// Re-reads the list files and certificates of the config in force (not the config
    /// file) and swaps them in; on any problem the current ones stay.
    pub fn refresh_files(&self) -> Result<(), Errors> {
        let current = self.snapshot.load();
        self.swap_in(Snapshot::build(
            current.config.clone(),
            &self.metrics,
            Some(&current),
        ))
    }

    /// Puts a newly built snapshot in force, or keeps the current one; counts either.
    fn swap_in(&self, next: Result<Snapshot, Errors>) -> Result<(), Errors> {
        let result = match next {
            Ok(next) => {
                self.snapshot.store(Arc::new(next));
                self.publish_list_gauges();
                Ok(())
            }
            Err(e) => Err(e),
        };
        let label = if result.is_ok() { "success" } else { "failure" };
        self.metrics
            .config_reloads
            .with_label_values(&[label])
            .inc();
        result
    }
}
