//! `ipgate upgrade` (`POST /v1/upgrade`, or SIGUSR2): the binary on disk takes over the
//! listening sockets without refusing a connection, and the state store without two
//! processes ever holding it.
//!
//! The old process starts the new one with every listening socket (systemd's convention,
//! `spawn`) and a control socket. Then, in order:
//! 1. the new process loads config, lists and certificates while the old one serves, and
//!    says `loaded` (or `error WHY`, and exits: the old one serves on);
//! 2. the old process stops its fleet task, closes the store (a change made after this is
//!    refused with 503 by the admin API; a jail ban is kept in memory) and says `closed`;
//! 3. the new process opens the store, starts its workers on the same sockets and says
//!    `serving PID`; both accept for a moment, and a queued connection waits in the
//!    socket's backlog, never refused;
//! 4. the old process stops accepting, finishes its requests in flight within the shutdown
//!    grace, passes the entries it enforced after closing the store (one JSON line each)
//!    and exits; the new process writes them to the store.
//!
//! HTTP/3 takes turns instead: all the packets of a QUIC connection must reach the process
//! that holds it, and both would read the one UDP socket. The old process sends its QUIC
//! connections a GOAWAY, takes no new one, lets their requests finish for up to 2 s (within
//! the shutdown grace), closes them and says `quic released`; only then (or when it has
//! exited) does the new process serve HTTP/3. A client that starts a QUIC connection in
//! between has its Initial go unanswered and sends it again (or uses TCP meanwhile).
//!
//! If the new process fails before `serving`, the old one takes the store back, restarts
//! its fleet task and serves on; the command says why.

mod spawn;
pub mod successor;

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;
use tracing::{info, warn};

pub use successor::Successor;

use crate::background::fleet::Fleet;
use crate::decide::policy::temporary::Slot;
use crate::state::store::Stored;
use crate::state::AppState;

const LOADED: &str = "loaded";
const CLOSED: &str = "closed";
const SERVING: &str = "serving";
const ERROR: &str = "error";
/// Said by the old process once its QUIC endpoints are closed: HTTP/3 is the new one's.
const QUIC_RELEASED: &str = "quic released";

/// The longest the new process may take to load config, lists and certificates.
const LOAD_WAIT: Duration = Duration::from_secs(120);
/// The longest it may take from the store closed to serving.
const SERVE_WAIT: Duration = Duration::from_secs(60);

/// An entry the old process enforced after closing the store, passed to the new one.
#[derive(Serialize, Deserialize)]
struct Gap {
    action: Slot,
    target: IpNet,
    entry: Stored,
}

/// Why an upgrade did not happen; the old process serves on in every case.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("an upgrade is already under way")]
    Busy,
    #[error("this process has handed over to pid {0} already")]
    HandedOver(u32),
    #[error("the new process did not take over: {0}")]
    Failed(String),
}

impl From<std::io::Error> for UpgradeError {
    fn from(e: std::io::Error) -> Self {
        UpgradeError::Failed(e.to_string())
    }
}

/// The old process's side: what it hands over, and the fleet task it stops first.
pub struct Upgrader {
    state: Arc<AppState>,
    /// Copies of every listening socket (each worker's, and the admin listener), named;
    /// dropped when the gateway stops accepting, so that a stopped listener refuses.
    sockets: std::sync::Mutex<Vec<(OwnedFd, String)>>,
    fleet: Option<Arc<Fleet>>,
    fleet_task: Mutex<Option<(watch::Sender<bool>, JoinHandle<()>)>>,
    one_at_a_time: Mutex<()>,
    /// The successor's pid once it serves: the gateway then stops accepting and drains.
    handed: watch::Sender<Option<u32>>,
    /// The line to the successor, kept to pass it the entries made after the handover.
    control: Mutex<Option<OwnedWriteHalf>>,
}

impl Upgrader {
    pub fn new(
        state: Arc<AppState>,
        sockets: Vec<(OwnedFd, String)>,
        fleet: Option<Arc<Fleet>>,
    ) -> Upgrader {
        Upgrader {
            state,
            sockets: std::sync::Mutex::new(sockets),
            fleet,
            fleet_task: Mutex::new(None),
            one_at_a_time: Mutex::new(()),
            handed: watch::Sender::new(None),
            control: Mutex::new(None),
        }
    }

    /// Starts the fleet task (at start, and again after a failed upgrade).
    pub async fn start_fleet(&self) {
        if let Some(fleet) = &self.fleet {
            let (tx, rx) = watch::channel(false);
            let task = tokio::spawn(fleet.clone().run(rx));
            *self.fleet_task.lock().await = Some((tx, task));
        }
    }

    /// Stops the fleet task and waits until it has stopped.
    pub async fn stop_fleet(&self) {
        if let Some((tx, task)) = self.fleet_task.lock().await.take() {
            let _ = tx.send(true);
            let _ = task.await;
        }
    }

    /// Closes the copies of the listening sockets: the gateway stops accepting, and a
    /// listener whose sockets no process holds any more refuses new connections.
    pub fn release_sockets(&self) {
        self.sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Completes once a successor serves; its pid.
    pub async fn handed_over(&self) -> u32 {
        let mut rx = self.handed.subscribe();
        let pid = rx.wait_for(Option::is_some).await.ok().and_then(|p| *p);
        match pid {
            Some(pid) => pid,
            None => std::future::pending().await,
        }
    }

    /// Starts the binary on disk and hands over to it; the successor's pid once it serves.
    /// Runs in a task of its own: a client that goes away does not stop a handover half done.
    pub async fn upgrade(self: &Arc<Self>) -> Result<u32, UpgradeError> {
        let this = self.clone();
        match tokio::spawn(async move { this.upgrade_now().await }).await {
            Ok(result) => result,
            Err(e) => Err(UpgradeError::Failed(e.to_string())),
        }
    }

    async fn upgrade_now(self: Arc<Self>) -> Result<u32, UpgradeError> {
        let Ok(_one) = self.one_at_a_time.try_lock() else {
            return Err(UpgradeError::Busy);
        };
        if let Some(pid) = *self.handed.borrow() {
            return Err(UpgradeError::HandedOver(pid));
        }
        info!("upgrade: starting the binary on disk");
        let result = self.hand_over().await;
        match &result {
            Ok(pid) => info!(
                pid,
                "upgrade: the new process serves; finishing the requests in flight"
            ),
            Err(e) => {
                self.state
                    .metrics
                    .upgrades
                    .with_label_values(&["failed"])
                    .inc();
                warn!(error = %e, "upgrade failed; this process serves on");
            }
        }
        result
    }

    async fn hand_over(self: &Arc<Self>) -> Result<u32, UpgradeError> {
        if std::process::id() == 1 {
            // The container would end with this process: restart the container instead.
            return Err(UpgradeError::Failed(
                "ipgate runs as pid 1 (a container's first process), which cannot hand over".into(),
            ));
        }
        let exe = spawn::binary()?;
        let sockets = {
            let held = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
            held.iter()
                .map(|(fd, name)| Ok((fd.try_clone()?, name.clone())))
                .collect::<std::io::Result<Vec<_>>>()?
        };
        if sockets.is_empty() {
            return Err(UpgradeError::Failed("this process is stopping".into()));
        }
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let mut child = spawn::successor(&exe, sockets, OwnedFd::from(theirs))
            .map_err(|e| UpgradeError::Failed(format!("cannot start {}: {e}", exe.display())))?;
        ours.set_nonblocking(true)?;
        let (read, mut write) = tokio::net::UnixStream::from_std(ours)?.into_split();
        let mut lines = tokio::io::BufReader::new(read).lines();

        let said = tokio::time::timeout(LOAD_WAIT, lines.next_line()).await;
        if !matches!(&said, Ok(Ok(Some(l))) if l == LOADED) {
            return Err(failure(&mut child, said).await);
        }
        self.stop_fleet().await;
        let closed = match self.state.store.hand_over().await {
            Ok(()) => write.write_all(format!("{CLOSED}\n").as_bytes()).await,
            Err(e) => Err(std::io::Error::other(e.to_string())),
        };
        let said = match closed {
            Ok(()) => tokio::time::timeout(SERVE_WAIT, lines.next_line()).await,
            Err(e) => Ok(Err(e)),
        };
        let pid = match &said {
            Ok(Ok(Some(l))) => l
                .strip_prefix(SERVING)
                .and_then(|p| p.trim().parse::<u32>().ok()),
            _ => None,
        };
        let Some(pid) = pid else {
            // Gone or killed before the store is reopened here: never two holders.
            let why = failure(&mut child, said).await;
            self.state.store.take_back();
            self.start_fleet().await;
            return Err(why);
        };
        *self.control.lock().await = Some(write);
        crate::background::systemd::main_pid(pid);
        self.handed.send_replace(Some(pid));
        tokio::spawn(self.clone().pass_gap_now_and_then());
        Ok(pid)
    }

    /// Passes the entries enforced here since the store was closed (jail bans of requests
    /// still in flight) as they come, every 50 ms, so the new process enforces them too,
    /// and a later change there (an unban) is not undone by them.
    /// Also says when this process's QUIC endpoints have closed, so the new one serves
    /// HTTP/3 from then on.
    async fn pass_gap_now_and_then(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut quic_open = true;
        loop {
            tick.tick().await;
            let mut control = self.control.lock().await;
            let Some(w) = control.as_mut() else { return };
            let mut said = self.send_gap(w).await.map(drop);
            if quic_open && self.quic_released() {
                quic_open = false;
                let line = format!("{QUIC_RELEASED}\n");
                said = said.and(w.write_all(line.as_bytes()).await);
            }
            if said.is_err() {
                *control = None;
                return;
            }
        }
    }

    /// Whether this process is done with HTTP/3 after a handover: its QUIC endpoints are
    /// closed, and it had its turn (a process upgraded again before its predecessor released
    /// the socket has none open, yet the predecessor may still serve on it).
    fn quic_released(&self) -> bool {
        let quic = &self.state.quic;
        self.state.handed_over.load(Ordering::Relaxed)
            && *quic.ours.borrow()
            && quic.open.load(Ordering::Relaxed) == 0
    }

    /// Writes the entries not written here, one JSON line each; how many.
    async fn send_gap(&self, control: &mut OwnedWriteHalf) -> std::io::Result<usize> {
        let gap = self.state.store.take_pending();
        let n = gap.len();
        for (action, target, entry) in gap {
            let line = Gap {
                action,
                target,
                entry: Stored::of(&entry),
            };
            let mut text = serde_json::to_string(&line).map_err(std::io::Error::other)?;
            text.push('\n');
            control.write_all(text.as_bytes()).await?;
        }
        if n > 0 {
            info!(
                entries = n,
                "upgrade: passed entries made after the handover"
            );
        }
        Ok(n)
    }

    /// At exit: passes what is left of the gap, then closes the line.
    pub async fn pass_gap(&self) {
        // The line's end tells the new process it may serve HTTP/3: not before this one had
        // its turn (bounded, as the new process's own wait is).
        let mut ours = self.state.quic.ours.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(10), ours.wait_for(|o| *o)).await;
        let Some(mut control) = self.control.lock().await.take() else {
            return;
        };
        let passing = async {
            if let Err(e) = self.send_gap(&mut control).await {
                warn!(error = %e, "upgrade: cannot pass entries to the new process");
            }
            let _ = control.shutdown().await;
        };
        if tokio::time::timeout(Duration::from_secs(5), passing)
            .await
            .is_err()
        {
            warn!("upgrade: the new process did not take the last entries within 5 s");
        }
    }
}

/// Why the successor did not get on (its own words when it said them), once it has exited.
async fn failure(
    child: &mut tokio::process::Child,
    said: Result<std::io::Result<Option<String>>, tokio::time::error::Elapsed>,
) -> UpgradeError {
    let why = match said {
        Ok(Ok(Some(line))) => match line.strip_prefix(ERROR) {
            Some(why) => why.trim().to_string(),
            None => format!("unexpected message {line:?}"),
        },
        Ok(Ok(None)) => String::new(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "it did not answer in time".into(),
    };
    let status = match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
        Ok(Ok(status)) => Some(status),
        _ => {
            let _ = child.kill().await;
            None
        }
    };
    UpgradeError::Failed(match (why.is_empty(), status) {
        (false, _) => why,
        (true, Some(status)) => format!("it exited ({status})"),
        (true, None) => "it stopped answering and was killed".into(),
    })
}
