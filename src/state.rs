//! The application state shared by every task: the compiled config in force (`Snapshot`,
//! swapped atomically on reload so readers never lock), the metrics, the upstream client
//! pool and the access log.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::access_log::AccessLog;
use crate::config::{Config, Errors, Report, Site};
use crate::metrics::{Metrics, SiteMetrics};
use crate::tls;

/// The config in force, compiled for the request path.
pub struct Snapshot {
    pub config: Config,
    /// `None` when no listener needs TLS and no certificate is configured.
    pub tls: Option<TlsAcceptor>,
    pub sites: Vec<SiteEntry>,
    /// Exact host (lower case) to index in `sites`.
    hosts: HashMap<String, usize>,
    /// The `"*"` site.
    default_site: Option<usize>,
}

/// A site with its metric children resolved.
pub struct SiteEntry {
    pub site: Site,
    pub metrics: SiteMetrics,
}

impl Snapshot {
    /// Loads what the config names (certificates) and compiles the lookup tables. Every
    /// problem is reported, so `ipgate check` and a refused reload can name them all.
    pub fn build(config: Config, metrics: &Metrics) -> Result<Snapshot, Errors> {
        let mut report = Report::new(&config.source, "");
        let tls = tls::server_config(&config.tls, &mut report).map(TlsAcceptor::from);
        if !report.is_empty() {
            return Err(report.into_errors());
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
            sites.push(SiteEntry {
                metrics: SiteMetrics::new(metrics, &site.name),
                site: site.clone(),
            });
        }
        Ok(Snapshot {
            config,
            tls,
            sites,
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

pub type UpstreamClient = Client<HttpConnector, Incoming>;

pub struct AppState {
    pub snapshot: ArcSwap<Snapshot>,
    pub metrics: Arc<Metrics>,
    pub client: UpstreamClient,
    pub access_log: AccessLog,
    /// One permit per open client connection (`limits.max_connections`).
    pub connections: Arc<Semaphore>,
    /// Set once shutdown starts: `/healthz` answers 503 so balancers stop sending.
    pub draining: AtomicBool,
    pub admin_token: Option<String>,
}

impl AppState {
    pub fn new(snapshot: Snapshot, metrics: Arc<Metrics>, admin_token: Option<String>) -> Self {
        let access_log = AccessLog::stdout(
            snapshot.config.access_log,
            metrics.access_log_dropped.clone(),
        );
        let connections = Arc::new(Semaphore::new(snapshot.config.limits.max_connections));
        AppState {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics,
            client: upstream_client(),
            access_log,
            connections,
            draining: AtomicBool::new(false),
            admin_token,
        }
    }
}

impl AppState {
    /// Re-reads the config file the running one came from, with the certificates it names,
    /// and swaps it in atomically. A config that does not validate is refused whole and the
    /// old one stays in force. Listener and admin addresses are bound once: a change to
    /// them needs a restart and is reported, not applied.
    pub fn reload(&self) -> Result<(), Errors> {
        let current = self.snapshot.load();
        let result = Config::load(&current.config.source)
            .and_then(|config| Snapshot::build(config, &self.metrics));
        let next = match result {
            Ok(next) => next,
            Err(errors) => {
                self.metrics
                    .config_reloads
                    .with_label_values(&["failure"])
                    .inc();
                return Err(errors);
            }
        };
        if next.config.listeners != current.config.listeners
            || next.config.admin.as_ref().map(|a| a.addr)
                != current.config.admin.as_ref().map(|a| a.addr)
        {
            tracing::warn!("listener or admin addresses changed: they take effect at restart");
        }
        self.snapshot.store(Arc::new(next));
        self.metrics
            .config_reloads
            .with_label_values(&["success"])
            .inc();
        Ok(())
    }
}

/// A pooled keep-alive HTTP/1.1 client for the upstreams.
fn upstream_client() -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}
