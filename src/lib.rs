//! ipgate: a TLS-terminating reverse proxy that puts a hosting company's IP privacy promise
//! into practice on the hot path.
//!
//! # Layout
//! One folder per layer. Each layer uses only the layers below it, never one above (no
//! cycle); each layer's `mod.rs` says what it owns and what it uses.
//!
//! ```text
//!   admin       the admin listener, the /v1 API's bodies, the CLI, the token, the demo page
//!   background  fleet, firewall, log jails, ACME, file watcher, signals
//!   serve       worker -> listener -> client address -> request checks -> admission
//!               -> proxy -> upstream
//!   state       AppState (the one door every change goes through), the snapshot of the
//!               config in force, the store, TLS certificates
//!   decide      policy lists and entries, rate limits, jails, client keys, the clock
//!   observe     metrics, access log
//!   config      the config file, checked and compiled
//!   normalize   the host and the path in normal form
//! ```
//!
//! A request flows down [`serve`]: a [`serve::worker`] thread's `serve::listener` accepts a
//! connection, decides who the client is ([`serve::client_addr`]), closes a blocked client
//! before TLS, and serves HTTP/1.1 or HTTP/2; `serve::proxy` checks each request
//! ([`serve::request`]), asks `serve::admission` (allow wins, block entries,
//! `allow_only`, rate limits, the jails' watched requests, the client's requests in flight)
//! and forwards it to the upstream (`serve::upstream`). The response goes back through the
//! jails ([`decide::jail`]), whose bans are made through [`state::AppState`] and kept in the
//! store (`state::store`), local or shared by the fleet (`background::fleet`).

pub mod admin;
pub mod background;
pub mod config;
pub mod decide;
pub mod normalize;
pub mod observe;
pub mod serve;
pub mod state;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::observe::metrics::Metrics;
use crate::state::{AppState, Snapshot};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] config::Errors),
    #[error("cannot create the state directory {}: {source}", path.display())]
    StateDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Admin(#[from] admin::token::TokenError),
    #[error("{0}")]
    Store(#[from] state::store::Error),
    #[error("{0}")]
    Fleet(#[from] background::fleet::Error),
    #[error("{0}")]
    Firewall(#[from] background::firewall::Error),
    #[error("{0}")]
    Upgrade(String),
}

/// Once a second: frees expired entries; every 5 s idle client state; every minute the
/// offense history past retention.
async fn sweeper(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        state.sweep().await;
        n += 1;
        if n % 5 == 0 {
            state.sweep_clients();
        }
        if n % 60 == 1 {
            state
                .history
                .sample(&state.metrics, decide::clock::now_ms());
        }
        if n % 60 == 0 {
            state.prune_offenses().await;
        }
    }
}

/// Looks at every site's challenge mode twice a second (auto mode's load).
async fn challenge_ticker(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        state.tick_challenge();
    }
}

/// A gateway with its sockets bound, ready to [`Gateway::run`].
pub struct Gateway {
    state: Arc<AppState>,
    /// Per worker: its socket on every client listener.
    workers: Vec<serve::worker::Sockets>,
    admin: Option<TcpListener>,
    demo: Option<TcpListener>,
    fleet: Option<Arc<background::fleet::Fleet>>,
    firewall: Option<background::firewall::Firewall>,
    /// When this process was started by `ipgate upgrade`: its line to the old process.
    successor: Option<background::upgrade::Successor>,
    /// Copies of the listening sockets, for the next upgrade.
    handed: Handed,
    /// The HTTP/3 listeners' UDP sockets.
    quic: serve::worker::Quic,
}

impl Gateway {
    /// Loads what the config names, binds every socket (port 0 picks a free port).
    pub async fn bind(config: Config) -> Result<Gateway, StartError> {
        Gateway::bind_with(config, &mut None).await
    }

    /// [`Gateway::bind`], for a process started by `ipgate upgrade` too: the sockets come
    /// from the old process, and the store is opened once the old process has closed it.
    /// On an error the successor is left in place, to tell the old process why.
    pub async fn bind_with(
        config: Config,
        successor: &mut Option<background::upgrade::Successor>,
    ) -> Result<Gateway, StartError> {
        let metrics = Arc::new(Metrics::new());
        let admin_token = match &config.admin {
            Some(a) => Some(admin::token::load_or_create_token(&a.token_file)?),
            None => None,
        };
        // Sockets from systemd's socket activation, or from the process this one upgrades,
        // serve the listeners bound to their addresses or named for them; the others are
        // bound here.
        let mut inherited = serve::worker::Inherited::from_env();
        let admin = match &config.admin {
            Some(a) => Some(local(&mut inherited, "admin", a.addr).await?),
            None => None,
        };
        let demo = match config.demo_upstream {
            Some(addr) => Some(local(&mut inherited, "demo", addr).await?),
            None => None,
        };
        let (workers, mut handed, bound) = listen(&config, &mut inherited)?;
        let quic = listen_quic(&config, &bound, &mut inherited, &mut handed)?;
        for (kind, l) in [("admin", &admin), ("demo", &demo)] {
            if let (Some(l), Some(addr)) = (l, config_addr(&config, kind)) {
                hand(&mut handed, l, serve::worker::socket_name(kind, addr));
            }
        }
        for addr in inherited.unused() {
            warn!(%addr, "an inherited socket that no [[listener]] or admin.addr names: not served");
        }
        let state_dir = config.gateway.state_dir.clone();
        let fleet_conf = config.fleet.clone();
        if config.challenge.secret_file.is_none() {
            // The key that signs challenge puzzles, made once, so puzzles outlive a restart.
            let key = state_dir.join(state::snapshot::CHALLENGE_KEY);
            std::fs::create_dir_all(&state_dir).map_err(|source| StartError::StateDir {
                path: state_dir.clone(),
                source,
            })?;
            admin::token::load_or_create_token(&key)?;
        }
        let snapshot = Snapshot::build(config, &metrics, None)?;
        if let Some(s) = successor.as_mut() {
            // Loaded while the old process serves; it closes the store now.
            s.loaded().map_err(StartError::Upgrade)?;
        }
        let upgrading = successor.is_some();
        let (store, opened) =
            state::store::Store::open(&state_dir, fleet_conf.is_some(), upgrading)?;
        if let state::store::Opened::MovedAside(aside, e) = &opened {
            error!(
                file = %aside.display(),
                error = %e,
                "the state store could not be opened and was moved aside; starting with an \
                 empty one (temporary entries and offense history are lost). Inspect or delete \
                 the file; to recover, stop ipgate and move it back to state.redb"
            );
        }
        let loaded = store.load(decide::clock::now_ms()).await?;
        let mut state = AppState::new(snapshot, metrics, admin_token, store);
        state.https_port = https_port(&workers);
        if upgrading {
            // HTTP/3 waits for the old process's QUIC connections (see `QuicTurn`).
            state.quic.ours.send_replace(false);
        }
        let n = loaded.len();
        for (action, target, entry) in loaded {
            state.temp.table(&action).insert(target, entry);
        }
        state.publish_list_gauges();
        info!(entries = n, dir = %state_dir.display(), "temporary entries loaded");
        let state = Arc::new(state);
        let firewall = match state.snapshot.load().config.firewall.clone() {
            Some(conf) => Some(background::firewall::Firewall::start(&state, conf).await?),
            None => None,
        };
        let fleet = match &fleet_conf {
            Some(f) => Some(background::fleet::Fleet::new(state.clone(), f)?),
            None => None,
        };
        Ok(Gateway {
            firewall,
            fleet,
            state,
            workers,
            admin,
            demo,
            successor: successor.take(),
            handed,
            quic,
        })
    }

    /// Addresses of the client listeners, in config order.
    pub fn listener_addrs(&self) -> Vec<SocketAddr> {
        self.workers
            .first()
            .map(|sockets| {
                sockets
                    .iter()
                    .filter_map(|(l, _)| l.local_addr().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` completes (or a successor started by `ipgate upgrade`
    /// serves), then stops accepting, lets requests in flight finish within
    /// `limits.shutdown_grace`, flushes the access log and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let state = self.state;
        if let Some(sockets) = self.workers.first() {
            for (l, conf) in sockets {
                if let Ok(addr) = l.local_addr() {
                    info!(%addr, tls = conf.tls, workers = self.workers.len(), "listening");
                }
            }
        }
        let upgrader = Arc::new(background::upgrade::Upgrader::new(
            state.clone(),
            self.handed,
            self.fleet,
        ));
        upgrader.start_fleet().await;
        // Decided now, while the process this one may upgrade is still its parent.
        let _ = background::systemd::watched();
        // Tasks that change or watch state: after a handover only the new process runs them
        // (two would count a log jail's lines twice, or renew one certificate twice).
        let mut watchers = side_tasks(&state, &upgrader);
        // The table it was started with (a reload does not change [firewall]).
        let firewall = self.firewall.as_ref().map(|f| f.conf().clone());
        if let Some(fw) = self.firewall {
            watchers.push(tokio::spawn(fw.run(state.clone())));
        }
        let mut side_tasks = Vec::new();
        if let Some(admin) = self.admin {
            if let Ok(addr) = admin.local_addr() {
                info!(%addr, "admin listening");
            }
            let serving = admin::serve(state.clone(), admin, stop_rx.clone(), upgrader.clone());
            side_tasks.push(tokio::spawn(serving));
        }
        if let Some(demo) = self.demo {
            if let Ok(addr) = demo.local_addr() {
                info!(%addr, "demo upstream listening");
            }
            side_tasks.push(tokio::spawn(admin::demo::serve(demo, stop_rx.clone())));
        }

        let finished = start_workers(&state, self.workers, self.quic, &stop_rx);
        let mut upgraded = None;
        // A new process that cannot say it serves stops: the old one serves on.
        let mut told = true;
        if finished.is_empty() {
            error!("no worker thread is running");
            told = self.successor.is_none();
        } else {
            background::systemd::ready();
            side_tasks.push(tokio::spawn(background::systemd::watchdog()));
            if let Some(successor) = self.successor {
                told = successor.serving(state.clone());
            }
            if told {
                tokio::select! {
                    () = shutdown => {}
                    pid = upgrader.handed_over() => upgraded = Some(pid),
                }
            }
        }
        match upgraded {
            // systemd hears of it only from a process that was serving for it.
            None if !told => error!("the old process is gone: stopping"),
            None => {
                background::systemd::stopping();
                info!("shutting down: no new connections, finishing requests in flight");
            }
            Some(pid) => {
                state.handed_over.store(true, Ordering::Relaxed);
                for t in watchers.drain(..) {
                    t.abort();
                }
                info!(
                    pid,
                    "handed over: no new connections, finishing requests in flight"
                );
            }
        }
        state.draining.store(true, Ordering::Relaxed);
        upgrader.release_sockets();
        let _ = stop_tx.send(true);
        // Each worker stops accepting, then waits up to `limits.shutdown_grace` for its
        // connections.
        for done in finished {
            let _ = done.await;
        }
        upgrader.stop_fleet().await;
        for t in side_tasks.into_iter().chain(watchers) {
            t.abort();
        }
        match &firewall {
            // The successor keeps the table.
            Some(conf) if upgraded.is_none() => background::firewall::Firewall::stop(conf).await,
            _ => {}
        }
        upgrader.pass_gap().await;
        state.access_log.flush();
        info!("stopped");
    }
}

/// The tasks beside the workers, stopped (aborted) at the end.
fn side_tasks(
    state: &Arc<AppState>,
    upgrader: &Arc<background::upgrade::Upgrader>,
) -> Vec<tokio::task::JoinHandle<()>> {
    vec![
        tokio::spawn(background::shutdown::reload_on_hangup(state.clone())),
        tokio::spawn(background::shutdown::upgrade_on_signal(upgrader.clone())),
        tokio::spawn(sweeper(state.clone())),
        tokio::spawn(background::watcher::run(state.clone())),
        tokio::spawn(background::acme::run(state.clone())),
        tokio::spawn(background::feed::run(state.clone())),
        tokio::spawn(background::logjail::run(state.clone())),
        tokio::spawn(challenge_ticker(state.clone())),
    ]
}

/// One thread per worker; a receiver each that completes when the worker has finished.
fn start_workers(
    state: &Arc<AppState>,
    workers: Vec<serve::worker::Sockets>,
    mut quic: serve::worker::Quic,
    stop_rx: &watch::Receiver<bool>,
) -> Vec<tokio::sync::oneshot::Receiver<()>> {
    let mut finished = Vec::with_capacity(workers.len());
    for (i, sockets) in workers.into_iter().enumerate() {
        let quic = std::mem::take(&mut quic);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let (state, stop) = (state.clone(), stop_rx.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("ipgate-worker-{i}"))
            .spawn(move || {
                serve::worker::run(state, sockets, quic, stop);
                let _ = done_tx.send(());
            });
        match spawned {
            Ok(_) => finished.push(done_rx),
            Err(e) => error!(error = %e, "cannot start a worker thread; its sockets are closed"),
        }
    }
    finished
}

/// Copies of listening sockets, named as an upgrade's successor looks for them.
type Handed = Vec<(std::os::fd::OwnedFd, String)>;

/// A copy of `socket` named `name`, for an upgrade's successor.
fn hand(handed: &mut Handed, socket: &impl std::os::fd::AsFd, name: String) {
    match socket.as_fd().try_clone_to_owned() {
        Ok(fd) => handed.push((fd, name)),
        Err(e) => warn!(error = %e, "cannot copy a listening socket: an upgrade would not pass it"),
    }
}

/// Every worker's socket on every client listener: inherited ones spread over the workers,
/// the others bound here; and a named copy of each for an upgrade.
fn listen(
    config: &Config,
    inherited: &mut serve::worker::Inherited,
) -> Result<(Vec<serve::worker::Sockets>, Handed, Vec<SocketAddr>), StartError> {
    let n = config.gateway.workers;
    let mut handed = Handed::new();
    let mut bound = Vec::with_capacity(config.listeners.len());
    let mut workers: Vec<serve::worker::Sockets> = (0..n).map(|_| Vec::new()).collect();
    for (i, l) in config.listeners.iter().enumerate() {
        let name = serve::worker::socket_name(&format!("listener{i}"), l.addr);
        let taken = inherited.take(l.addr, &name);
        let per_worker = if taken.is_empty() {
            serve::worker::bind(l.addr, n).map(|v| v.into_iter().map(|s| vec![s]).collect())
        } else {
            info!(addr = %l.addr, sockets = taken.len(), "listening sockets inherited");
            serve::worker::share(taken, n)
        }
        .map_err(|source| StartError::Bind {
            addr: l.addr,
            source,
        })?;
        let first = per_worker.first().and_then(|w| w.first());
        bound.push(first.and_then(|s| s.local_addr().ok()).unwrap_or(l.addr));
        for (w, sockets) in workers.iter_mut().zip(per_worker) {
            for socket in sockets {
                hand(&mut handed, &socket, name.clone());
                w.push((socket, l.clone()));
            }
        }
    }
    Ok((workers, handed, bound))
}

/// The UDP socket of each `http3` listener, on its TCP socket's address: inherited from the
/// process this one upgrades, or bound here.
fn listen_quic(
    config: &Config,
    bound: &[SocketAddr],
    inherited: &mut serve::worker::Inherited,
    handed: &mut Handed,
) -> Result<serve::worker::Quic, StartError> {
    let mut quic = Vec::new();
    for (i, l) in config.listeners.iter().enumerate().filter(|(_, l)| l.http3) {
        // The TCP socket's address: its port when the config says 0.
        let addr = bound.get(i).copied().unwrap_or(l.addr);
        let name = serve::worker::socket_name(&format!("quic{i}"), l.addr);
        let socket = match inherited.take_udp(addr, &name) {
            Some(u) => u,
            None => serve::quic::bind(addr).map_err(|source| StartError::Bind { addr, source })?,
        };
        hand(handed, &socket, name);
        quic.push((socket, l.clone()));
    }
    Ok(quic)
}

/// The bound port of the first TLS listener, which `redirect_https` sends clients to; 443
/// when there is none (TLS ends in front of ipgate).
fn https_port(workers: &[serve::worker::Sockets]) -> u16 {
    workers
        .first()
        .and_then(|sockets| sockets.iter().find(|(_, conf)| conf.tls))
        .and_then(|(l, _)| l.local_addr().ok())
        .map_or(443, |a| a.port())
}

/// The admin listener's or the demo upstream's socket: inherited, or bound here.
async fn local(
    inherited: &mut serve::worker::Inherited,
    kind: &str,
    addr: SocketAddr,
) -> Result<TcpListener, StartError> {
    let name = serve::worker::socket_name(kind, addr);
    match inherited.take(addr, &name).into_iter().next() {
        Some(l) => from_std(addr, l),
        None => bind(addr).await,
    }
}

/// The configured address of the admin listener or the demo upstream.
fn config_addr(config: &Config, kind: &str) -> Option<SocketAddr> {
    match kind {
        "admin" => config.admin.as_ref().map(|a| a.addr),
        _ => config.demo_upstream,
    }
}

/// An inherited socket as a Tokio listener.
fn from_std(addr: SocketAddr, l: std::net::TcpListener) -> Result<TcpListener, StartError> {
    l.set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(l))
        .map_err(|source| StartError::Bind { addr, source })
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}
