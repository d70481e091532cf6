//! The block set in the kernel too (`[firewall]`): every block and allow entry,
//! static or temporary, mirrored into one nftables table that ipgate owns (family inet,
//! `firewall.table`), so new TCP connections from blocked, non-allowed clients to
//! `firewall.ports` (SSH, mail, FTP) are dropped by the kernel.
//!
//! The table holds four interval sets with timeouts (`block4`, `block6`, `allow4`,
//! `allow6`) and one input chain: allowed sources are accepted first, then blocked ones are
//! dropped. Each temporary entry's element carries the entry's own remaining time, so the
//! kernel forgets on time too. The rules and sets are built with the `nftables` crate's types
//! and sent to `nft -j -f -` in one transaction each time.
//!
//! At start the table is rebuilt whole from the entries in force (the store's included); after
//! that the desired sets are compared with what was sent, every [`TICK`], and only the
//! difference is sent: a ban, an unban or a `forget` reaches the kernel within a tick. Interval
//! sets refuse overlapping elements, so a set holds the widest of nested targets only (the
//! narrower one is added when the wider one goes). A failed update is counted
//! (`ipgate_firewall_errors_total`) and retried as a full rebuild. At stop the table is removed,
//! unless `firewall.keep_at_stop`.

mod rules;

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nftables::batch::Batch;
use nftables::schema::{NfListObject, Nftables};
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use crate::config;
use crate::decide::clock::now_ms;
use crate::state::AppState;
use rules::{desired, rebuild, table, update, Cap, Sets, SETS};

/// How often the sets are compared with the entries in force.
pub const TICK: Duration = Duration::from_millis(250);

/// Why the table could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "firewall: managing the nftables table needs CAP_NET_ADMIN, which this process lacks \
         (run ipgate as root, or give the service AmbientCapabilities=CAP_NET_ADMIN); \
         without [firewall] ipgate needs no such right"
    )]
    NoCapability,
    #[error("firewall: cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("firewall: nft refused the change: {0}")]
    Refused(String),
    #[error("firewall: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Whether this process holds CAP_NET_ADMIN (bit 12 of CapEff).
pub fn has_net_admin() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 12) != 0)
}

/// Whether the `nft` program is there (a path, or a name found on PATH).
pub fn nft_found(nft: &Path) -> bool {
    if nft.components().count() > 1 {
        return nft.is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(nft).is_file()))
}

/// Sends one transaction to `nft -j -f -`; nft's own message on failure.
async fn apply(nft: &Path, payload: &Nftables<'_>) -> Result<(), Error> {
    let json = serde_json::to_vec(payload)?;
    let spawn_error = |source| Error::Spawn {
        program: nft.display().to_string(),
        source,
    };
    let mut child = tokio::process::Command::new(nft)
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn_error)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(&json).await.map_err(spawn_error)?;
    }
    let out = child.wait_with_output().await.map_err(spawn_error)?;
    if out.status.success() {
        Ok(())
    } else {
        let text = String::from_utf8_lossy(&out.stderr);
        Err(Error::Refused(text.trim().chars().take(500).collect()))
    }
}

/// The mirror of the entries in force, and what was last sent.
pub struct Firewall {
    conf: config::Firewall,
    sent: Sets,
    /// (snapshot, temporary entries' generation) of the last comparison.
    seen: (usize, u64),
    /// When the next element times out (ms): a nested target may be due then.
    next_expiry: u64,
    /// The connection-cap rules sent (`firewall.connection_cap`).
    cap: Option<Cap>,
}

impl Firewall {
    /// Checks the right to manage nftables and builds the table from the entries in force
    /// (the store's among them): start fails with a clear error when either is impossible.
    pub async fn start(state: &Arc<AppState>, conf: config::Firewall) -> Result<Firewall, Error> {
        if !has_net_admin() {
            return Err(Error::NoCapability);
        }
        if !nft_found(&conf.nft) {
            return Err(Error::Spawn {
                program: conf.nft.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not found (apt install nftables)",
                ),
            });
        }
        let mut fw = Firewall {
            conf,
            sent: Default::default(),
            seen: (0, 0),
            next_expiry: u64::MAX,
            cap: None,
        };
        fw.sync(state, true).await?;
        info!(table = %fw.conf.table, ports = ?fw.conf.ports, "nftables table built");
        Ok(fw)
    }

    /// Brings the kernel's sets to the entries in force: the difference, or everything.
    async fn sync(&mut self, state: &Arc<AppState>, whole: bool) -> Result<(), Error> {
        let now = now_ms();
        let seen = (
            Arc::as_ptr(&state.snapshot.load_full()) as usize,
            state.temp.generation(),
        );
        if !whole && seen == self.seen && now < self.next_expiry {
            return Ok(());
        }
        // The cap's rules change only with a rebuild (a reload may change the cap, the
        // prefix or the trusted proxies).
        let cap = self.conf.connection_cap.then(|| Cap::of(state));
        let whole = whole || cap != self.cap;
        // Folding a large list takes a while: not on the runtime that serves the admin API.
        let from = state.clone();
        let want = tokio::task::spawn_blocking(move || desired(&from, now))
            .await
            .map_err(|e| Error::Refused(format!("computing the sets failed: {e}")))?;
        let payload = if whole {
            Some(rebuild(&self.conf, &want, cap.as_ref(), now))
        } else {
            update(&self.conf, &self.sent, &want, now)
        };
        if let Some(p) = payload {
            apply(&self.conf.nft, &p).await?;
        }
        self.next_expiry = want
            .iter()
            .flat_map(|s| s.values().filter_map(|e| *e))
            .min()
            .unwrap_or(u64::MAX);
        self.sent = want;
        self.seen = seen;
        self.cap = cap;
        for ((_, family, block), set) in SETS.iter().zip(&self.sent) {
            let kind = if *block { "block" } else { "allow" };
            state
                .metrics
                .firewall_elements
                .with_label_values(&[family, kind])
                .set(set.len() as i64);
        }
        Ok(())
    }

    pub fn conf(&self) -> &config::Firewall {
        &self.conf
    }

    /// Follows the entries until the process ends; a failed update is counted and retried
    /// as a rebuild.
    pub async fn run(mut self, state: Arc<AppState>) {
        let mut whole = false;
        loop {
            tokio::time::sleep(TICK).await;
            match self.sync(&state, whole).await {
                Ok(()) => whole = false,
                Err(e) => {
                    state.metrics.firewall_errors.inc();
                    warn!(error = %e, "firewall update failed; the table is rebuilt next");
                    whole = true;
                }
            }
        }
    }

    /// At stop: removes the table, unless `firewall.keep_at_stop`.
    pub async fn stop(conf: &config::Firewall) {
        if conf.keep_at_stop {
            info!(table = %conf.table, "nftables table kept (firewall.keep_at_stop)");
            return;
        }
        let mut b = Batch::new();
        b.add(NfListObject::Table(table(&conf.table)));
        b.delete(NfListObject::Table(table(&conf.table)));
        match apply(&conf.nft, &b.to_nftables()).await {
            Ok(()) => info!(table = %conf.table, "nftables table removed"),
            Err(e) => warn!(error = %e, "the nftables table could not be removed"),
        }
    }
}
