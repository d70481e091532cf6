//! The state and its store. [`AppState`], shared by every task, is the one door every change
//! goes through: the compiled config in force ([`snapshot::Snapshot`], swapped atomically on
//! reload so readers never lock), the metrics, the temporary entries and the access log.
//! (Each worker thread owns its upstream pool: see [`crate::serve::worker`].)
//! - `snapshot`: compiles the config into policy tables, limiters, jails and TLS;
//! - `store`: the state store interface and its embedded implementation (redb), with the
//!   outbox of changes for the fleet;
//! - [`tls`]: the certificates served and the TLS settings; `acme_dir`: the ACME sites'
//!   certificates on disk; `challenges`: the ACME challenges being answered now.
//!
//! Uses: [`crate::decide`], [`crate::observe`], [`crate::config`], [`crate::normalize`].

pub(crate) mod acme_dir;
pub mod bans;
pub(crate) mod challenges;
pub mod csp;
pub mod overview;
pub mod refusals;
pub(crate) mod snapshot;
pub(crate) mod store;
pub mod tls;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;

use crate::config::{Action, Config, Errors};
use crate::decide::clock::now_ms;
use crate::decide::jail::Jail;
use crate::decide::policy::temporary::{Entry, Slot, TempEntries};
use crate::observe::access_log::AccessLog;
use crate::observe::metrics::Metrics;
use crate::state::store::Store;

pub use crate::state::snapshot::{http_builder, SiteEntry, Snapshot};

/// Whose turn it is to serve HTTP/3 on the UDP sockets an upgrade passes on: a QUIC
/// connection's packets must all reach the process that holds it, so the old process
/// finishes (or closes) its QUIC connections before the new one starts reading.
pub struct QuicTurn {
    /// This process's QUIC endpoints still open.
    pub open: std::sync::atomic::AtomicUsize,
    /// Whether this process may start its own (false in an upgrade's new process until
    /// the old one has closed its endpoints, or exited).
    pub ours: tokio::sync::watch::Sender<bool>,
}

impl Default for QuicTurn {
    fn default() -> Self {
        QuicTurn {
            open: Default::default(),
            ours: tokio::sync::watch::Sender::new(true),
        }
    }
}

/// What every task shares: the snapshot in force, metrics, connection counts, the temporary
/// entries and their store.
pub struct AppState {
    pub snapshot: ArcSwap<Snapshot>,
    pub metrics: Arc<Metrics>,
    pub access_log: AccessLog,
    /// One permit per open client connection (`limits.max_connections`).
    pub connections: Arc<Semaphore>,
    /// Open connections per client (`limits.max_connections_per_client`).
    pub conn_counts: Arc<crate::decide::clients::ConnCounts>,
    /// Requests in flight per client (`limits.max_requests_per_client`).
    pub in_flight: Arc<crate::decide::clients::ConnCounts>,
    /// Set once shutdown starts: `/healthz` answers 503 so balancers stop sending.
    pub draining: AtomicBool,
    /// Set when an upgrade's successor serves: the workers give their keep-alive
    /// connections a last call (each closes after its next response) before closing them.
    pub handed_over: AtomicBool,
    /// HTTP/3 across an upgrade (one UDP socket, read by one process at a time).
    pub quic: QuicTurn,
    pub admin_token: Option<String>,
    pub temp: TempEntries,
    /// Durable home of the temporary entries and the offense history.
    pub store: Store,
    /// `fleet.gateway_id` when a fleet is configured.
    pub fleet_id: Option<String>,
    /// The port `redirect_https` listeners send clients to: the first TLS listener's (as
    /// bound), else 443. Set once at start.
    pub https_port: u16,
    /// Challenge puzzles solved already, until they expire.
    pub used: crate::decide::challenge::Used,
    /// Requests by site and outcome over the last hour (the console's charts).
    pub history: crate::observe::history::History,
    /// The last bans made here (the console's recent bans).
    pub bans: bans::BanLog,
    /// Requests refused per client in the last hour (the console's "refused most").
    pub refusals: refusals::Refusals,
}

impl AppState {
    pub fn new(
        snapshot: Snapshot,
        metrics: Arc<Metrics>,
        admin_token: Option<String>,
        store: Store,
    ) -> Self {
        let fleet_id = snapshot.config.fleet.as_ref().map(|f| f.gateway_id.clone());
        let refusals = refusals::Refusals::new(metrics.client_evictions.clone());
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
            handed_over: AtomicBool::new(false),
            quic: QuicTurn::default(),
            admin_token,
            temp: TempEntries::default(),
            fleet_id,
            store,
            https_port: 443,
            used: crate::decide::challenge::Used::new(USED_PUZZLES),
            history: Default::default(),
            bans: Default::default(),
            refusals,
        }
    }

    /// Adds or replaces a temporary entry: enforced at once, then written to the
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
            self.bans.record(bans::BanEvent {
                at_ms: entry.created_at,
                target,
                source: entry.source().into(),
                until_ms: entry.expires_at,
            });
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

    /// Counts a request refused for `ip` (the console's "refused most"); a request that
    /// passes never comes here.
    pub fn count_refusal(&self, ip: std::net::IpAddr) {
        let prefix = self.snapshot.load().config.rate_limit.ipv6_prefix;
        let key = crate::decide::clients::client_key(ip, prefix);
        self.refusals.count(key, now_ms());
    }

    /// Removes temporary entries from memory and the store; returns those that existed.
    pub async fn remove_entries(
        &self,
        targets: Vec<(Slot, ipnet::IpNet)>,
    ) -> Result<Vec<(Slot, ipnet::IpNet, Entry)>, store::Error> {
        // Written before it is applied: a removal the disk refuses changes nothing,
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

    /// The slot a jail's bans go to: the global block list, or its own scope.
    fn jail_slot(jail: &Jail) -> Slot {
        if jail.config.site_scoped {
            Slot::Scoped(crate::decide::policy::temporary::Scope::Jail(
                jail.config.name.as_str().into(),
            ))
        } else {
            Slot::Block
        }
    }

    /// Whether a jail's ban holds `ip` now: its failures change nothing then, so one burst
    /// is one offense, never several.
    pub fn banned_by_jail(&self, jail: &Jail, ip: std::net::IpAddr) -> bool {
        match Self::jail_slot(jail) {
            Slot::Scoped(scope) => self.temp.blocked_in(std::slice::from_ref(&scope), ip),
            slot => self.temp.table(&slot).contains(ip),
        }
    }

    /// Records the offense and makes the jail's ban, escalated by the earlier offenses
    ///, durable.
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
        let reason = jail_reason(jail);
        let entry = Entry::new(
            now,
            now + ban.as_millis() as u64,
            &jail.config.name,
            Some(&reason),
        );
        match self.add_entry(Self::jail_slot(jail), target, entry).await {
            Ok(()) => tracing::info!(
                jail = %jail.config.name,
                client = %crate::observe::access_log::LoggedIp(target.addr(), log_ip),
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
        for l in snap.limiters.values().filter(|l| !l.is_network()) {
            l.forget(l.key_for(ip));
        }
        let key = crate::decide::clients::client_key(ip, snap.config.rate_limit.ipv6_prefix);
        for j in snap.jails.values() {
            j.forget(key);
        }
        self.refusals.forget(key);
        let prefix = snap.config.rate_limit.ipv6_prefix;
        self.bans
            .forget(ip, &crate::decide::clients::client_targets(ip, prefix));
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
        self.refusals.sweep(now);
        self.bans
            .prune(now, snap.config.privacy.max_retention.as_millis() as u64);
        self.metrics.tracked_clients.set(tracked as i64);
    }

    /// Frees expired entries, in memory and on disk, and writes the entries the
    /// disk refused before.
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
        self.used.sweep(now);
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
        for l in snap.policy.all() {
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
        let passes = self.temp.passes_len() as i64;
        self.metrics
            .list_entries
            .with_label_values(&["pass", "temporary"])
            .set(passes);
        self.metrics.challenge.passes.set(passes);
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

impl AppState {
    /// One look at every site's challenge mode (twice a second): auto mode enters and leaves
    /// by the upstream's load, each logged once; `ipgate_challenge_mode` follows.
    pub fn tick_challenge(&self) {
        use crate::decide::load::Change;
        let snap = self.snapshot.load();
        let c = &snap.config.challenge;
        let now = now_ms();
        for site in &snap.sites {
            let mode = site.load.mode(site.site.challenge);
            if site.tracks_load() {
                let calm = c.auto_calm.as_millis() as u64;
                match site
                    .load
                    .tick(now, c.auto_in_flight, c.auto_response_time, calm)
                {
                    Change::Entered => tracing::warn!(
                        site = %site.site.name,
                        answer_ms = site.load.answer_us() / 1000,
                        "upstream saturated: auto mode challenges every client without a pass"
                    ),
                    Change::Left => tracing::info!(
                        site = %site.site.name,
                        calm_secs = c.auto_calm.as_secs(),
                        "upstream calm again: auto mode stops challenging"
                    ),
                    Change::None => {}
                }
            }
            site.metrics
                .challenge_mode
                .set(i64::from(site.load.challenging(mode)));
        }
    }
}

/// Solved puzzles remembered at most (until each expires).
const USED_PUZZLES: usize = 100_000;

/// What a pass says of the puzzle that made it: a replay of the same puzzle on another
/// gateway of the fleet finds it.
fn pass_reason(puzzle: &str) -> String {
    format!("solved a challenge (puzzle {puzzle})")
}

impl AppState {
    /// Makes a pass for `target` on `site`, durable and shared like any temporary entry.
    pub async fn make_pass(
        &self,
        site: &str,
        target: ipnet::IpNet,
        puzzle: &str,
        ttl: std::time::Duration,
    ) -> Result<(), store::Error> {
        let now = now_ms();
        let entry = Entry::new(
            now,
            now + ttl.as_millis() as u64,
            "challenge",
            Some(&pass_reason(puzzle)),
        );
        self.add_entry(Slot::pass(site), target, entry).await
    }

    /// Whether a live pass of `target` on the site was made by this puzzle.
    pub fn pass_made_by(
        &self,
        scope: &crate::decide::policy::temporary::Scope,
        target: ipnet::IpNet,
        puzzle: &str,
    ) -> bool {
        let reason = pass_reason(puzzle);
        self.temp
            .table(&Slot::Pass(scope.clone()))
            .find(target.addr(), None)
            .is_some_and(|(_, e)| e.reason() == Some(reason.as_str()))
    }
}

/// Why a jail banned: its name, hits and window.
fn jail_reason(jail: &Jail) -> String {
    format!(
        "jail {}: {} failures within {}",
        jail.config.name,
        jail.config.hits,
        humantime::format_duration(jail.config.window)
    )
}
