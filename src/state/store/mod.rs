//! The state store behind one interface ([`Store`]): temporary entries and offense history,
//! put, deleted, loaded, counted, forgotten and pruned. Today one implementation, the
//! embedded database ([`Redb`]: ACID, under `gateway.state_dir`): entries are committed
//! (fsync) before the admin API acknowledges them, loaded at start with expired ones dropped,
//! and deleted when they expire, so nothing about an address stays on disk longer than in
//! memory. `Store` runs the blocking database calls on tokio's blocking pool itself.

mod change;
mod embedded;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ipnet::IpNet;

pub use change::{Change, Stored};
pub use embedded::Redb;

use crate::decide::policy::temporary::Entry;
use crate::decide::policy::temporary::Slot;

/// Why the store could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open {}: {source}", path.display())]
    Open { path: PathBuf, source: redb::Error },
    #[error("{}: another ipgate holds this state store", .0.display())]
    InUse(PathBuf),
    #[error("state store: {0}")]
    Db(#[from] redb::Error),
    #[error("state store: cannot encode a record: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("state store: the writer task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("state store: handed over to the upgraded process; retry there")]
    HandedOver,
}

fn err(e: impl Into<redb::Error>) -> Error {
    Error::Db(e.into())
}

/// A temporary entry as the store returns it.
pub type Loaded = (Slot, IpNet, Entry);

/// An offense record: jail, target, offense times (ms).
pub type Offenses = (String, IpNet, Vec<u64>);

/// The state store, whatever keeps it. Every method may wait on disk: never call it from a
/// request's decision, only from the tasks that change state.
#[derive(Clone)]
pub enum Store {
    /// The embedded database under `gateway.state_dir`.
    Local(Arc<Local>),
}

/// The embedded store with what keeps it going through disk faults: the database is
/// reopened after any failed call (redb refuses every write after an I/O error until then),
/// and an entry the disk refused is kept here and written as soon as the disk takes it.
pub struct Local {
    dir: PathBuf,
    /// `None` after a failure: the next call reopens. Calls are serialized by this lock, so
    /// a retried write and a delete of the same entry cannot cross.
    db: Mutex<Option<Redb>>,
    /// Entries enforced but not yet durable.
    pending: Mutex<HashMap<(Slot, IpNet), Entry>>,
    /// Local changes also go into the outbox, for the fleet.
    outbox: bool,
    /// Woken when a change has been queued in the outbox.
    pub queued: tokio::sync::Notify,
    /// Set while the file is closed for the successor of an upgrade: every call fails with
    /// [`Error::HandedOver`] instead of reopening it, and entries are kept in `pending`.
    handed_over: std::sync::atomic::AtomicBool,
}

impl Local {
    fn is_handed_over(&self) -> bool {
        self.handed_over.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// What opening the store at start found.
pub enum Opened {
    Fresh,
    /// The file could not be opened; it was moved to this path and a new one started.
    MovedAside(PathBuf, Error),
}

impl Store {
    /// Opens the embedded store under `dir`. A state file that cannot be opened (corrupt,
    /// unreadable, from an unknown version) does not keep the gateway down: it is moved
    /// aside (`state.redb.bad-TIMESTAMP`) and a new one is started. A store held by another
    /// running ipgate is an error. An upgrade's new process passes `keep_bad` (the old
    /// process then takes its store back rather than losing what it holds).
    pub fn open(dir: &Path, outbox: bool, keep_bad: bool) -> Result<(Store, Opened), Error> {
        let (db, opened) = match Redb::open(dir, outbox) {
            Ok(db) => (db, Opened::Fresh),
            Err(e @ Error::CreateDir { .. }) | Err(e @ Error::InUse(_)) => return Err(e),
            Err(e) if keep_bad => return Err(e),
            Err(e) => {
                let file = dir.join("state.redb");
                let aside = dir.join(format!("state.redb.bad-{}", crate::decide::clock::now_ms()));
                std::fs::rename(&file, &aside).map_err(|source| Error::CreateDir {
                    path: aside.clone(),
                    source,
                })?;
                (Redb::open(dir, outbox)?, Opened::MovedAside(aside, e))
            }
        };
        let local = Local {
            dir: dir.to_path_buf(),
            db: Mutex::new(Some(db)),
            pending: Mutex::default(),
            outbox,
            queued: tokio::sync::Notify::new(),
            handed_over: Default::default(),
        };
        Ok((Store::Local(Arc::new(local)), opened))
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Redb, &mut HashMap<(Slot, IpNet), Entry>) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let Store::Local(local) = self;
        let local = local.clone();
        tokio::task::spawn_blocking(move || {
            let mut db = local.db.lock().unwrap_or_else(|p| p.into_inner());
            if local.is_handed_over() {
                return Err(Error::HandedOver);
            }
            if db.is_none() {
                *db = Some(Redb::open(&local.dir, local.outbox)?);
            }
            let mut pending = local.pending.lock().unwrap_or_else(|p| p.into_inner());
            let result = f(db.as_ref().expect("opened above"), &mut pending);
            if result.is_err() {
                // Reopen before the next call: after an I/O error redb refuses every write.
                *db = None;
            }
            result
        })
        .await?
    }

    /// Writes an entry durably (returns once it is on disk). When the disk refuses, the
    /// entry is kept and written by [`Store::retry`] as soon as the disk takes it.
    pub async fn put(&self, action: Slot, target: IpNet, entry: Entry) -> Result<(), Error> {
        let Store::Local(local) = self;
        let local = local.clone();
        tokio::task::spawn_blocking(move || {
            let mut db = local.db.lock().unwrap_or_else(|p| p.into_inner());
            let mut pending = local.pending.lock().unwrap_or_else(|p| p.into_inner());
            let written = match db.as_ref() {
                _ if local.is_handed_over() => Err(Error::HandedOver),
                Some(open) => open.put(&action, target, &entry),
                None => Redb::open(&local.dir, local.outbox).and_then(|open| {
                    let r = open.put(&action, target, &entry);
                    *db = Some(open);
                    r
                }),
            };
            match written {
                Ok(()) => {
                    pending.remove(&(action, target));
                    Ok(())
                }
                Err(e) => {
                    // Under the same lock as delete: a later unban cannot be undone by a retry.
                    pending.insert((action, target), entry);
                    *db = None;
                    Err(e)
                }
            }
        })
        .await??;
        self.notify_queued();
        Ok(())
    }

    /// Writes the entries the disk refused before; returns how many are still not durable.
    /// Expired ones are dropped.
    pub async fn retry(&self, now: u64) -> Result<usize, Error> {
        if self.pending() == 0 {
            return Ok(0);
        }
        self.run(move |db, pending| {
            pending.retain(|_, e| e.expires_at > now);
            let due: Vec<_> = pending
                .iter()
                .map(|(k, e)| (k.clone(), e.clone()))
                .collect();
            for ((action, target), entry) in due {
                db.put(&action, target, &entry)?;
                pending.remove(&(action, target));
            }
            Ok(pending.len())
        })
        .await
        .inspect(|_| self.notify_queued())
    }

    /// Closes the file for an upgrade's successor, after every call in progress: from now
    /// on nothing is written here (see [`Error::HandedOver`]) until [`Store::take_back`].
    pub async fn hand_over(&self) -> Result<(), Error> {
        let local = self.local().clone();
        tokio::task::spawn_blocking(move || {
            let mut db = local.db.lock().unwrap_or_else(|p| p.into_inner());
            local
                .handed_over
                .store(true, std::sync::atomic::Ordering::SeqCst);
            // Dropping the database closes the file and releases its lock.
            *db = None;
        })
        .await?;
        Ok(())
    }

    /// Whether the file is closed for an upgrade's successor.
    pub fn is_handed_over(&self) -> bool {
        self.local().is_handed_over()
    }

    /// The successor failed: the file is opened again at the next call.
    pub fn take_back(&self) {
        self.local()
            .handed_over
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// The entries enforced here but never written (made while the file was handed over),
    /// taken out to be passed to the successor.
    pub fn take_pending(&self) -> Vec<(Slot, IpNet, Entry)> {
        let mut pending = self
            .local()
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        pending.drain().map(|((a, t), e)| (a, t, e)).collect()
    }

    /// Entries enforced but not yet durable.
    pub fn pending(&self) -> usize {
        let Store::Local(local) = self;
        local.pending.lock().map_or(0, |p| p.len())
    }

    /// Deletes entries durably; returns how many existed on disk.
    pub async fn delete(&self, targets: Vec<(Slot, IpNet)>) -> Result<usize, Error> {
        self.run(move |db, pending| {
            let n = db.delete(&targets)?;
            for t in &targets {
                pending.remove(t);
            }
            Ok(n)
        })
        .await
        .inspect(|_| self.notify_queued())
    }

    /// Every entry still live at `now`; expired ones are deleted on the way.
    pub async fn load(&self, now: u64) -> Result<Vec<Loaded>, Error> {
        self.run(move |db, _| db.load(now)).await
    }

    /// Records an offense; returns the number of earlier ones within `retention` ms.
    pub async fn record_offense(
        &self,
        jail: String,
        target: IpNet,
        now: u64,
        retention: u64,
    ) -> Result<usize, Error> {
        self.run(move |db, _| db.record_offense(&jail, target, now, retention))
            .await
            .inspect(|_| self.notify_queued())
    }

    /// The offense history held under exactly these targets.
    pub async fn offenses(&self, ip: IpAddr, targets: Vec<IpNet>) -> Result<Vec<Offenses>, Error> {
        let held = self.run(move |db, _| db.offenses(Some(ip))).await?;
        Ok(held
            .into_iter()
            .filter(|(_, t, _)| targets.contains(t))
            .collect())
    }

    /// Erases the offense history of these targets; returns how many records went.
    pub async fn forget(&self, targets: Vec<IpNet>) -> Result<usize, Error> {
        self.run(move |db, _| db.forget_offenses(&targets))
            .await
            .inspect(|_| self.notify_queued())
    }

    /// Every offense record.
    pub async fn all_offenses(&self) -> Result<Vec<Offenses>, Error> {
        self.run(move |db, _| db.offenses(None)).await
    }

    /// Applies changes from the fleet (not queued again).
    pub async fn apply(&self, changes: Vec<Change>) -> Result<(), Error> {
        self.run(move |db, _| db.apply(&changes)).await
    }

    /// Queues changes for the fleet.
    pub async fn enqueue(&self, changes: Vec<Change>) -> Result<(), Error> {
        self.run(move |db, _| db.enqueue(&changes)).await?;
        self.local().queued.notify_one();
        Ok(())
    }

    /// The oldest changes not sent yet.
    pub async fn outbox(&self, limit: usize) -> Result<Vec<(u64, Change)>, Error> {
        self.run(move |db, _| db.outbox(limit)).await
    }

    /// Drops the changes sent, up to sequence number `last`.
    pub async fn outbox_done(&self, last: u64) -> Result<(), Error> {
        self.run(move |db, _| db.outbox_done(last)).await
    }

    /// The entries whose latest change waits in the outbox.
    pub async fn outbox_targets(&self) -> Result<std::collections::HashSet<(Slot, IpNet)>, Error> {
        let waiting = self.run(move |db, _| db.outbox(usize::MAX)).await?;
        Ok(waiting
            .into_iter()
            .filter_map(|(_, c)| match c {
                Change::Put { action, target, .. } | Change::Delete { action, target } => {
                    Some((action, target))
                }
                _ => None,
            })
            .collect())
    }

    /// Every target some change in the outbox is about.
    pub async fn outbox_concerns(&self) -> Result<std::collections::HashSet<IpNet>, Error> {
        let waiting = self.run(move |db, _| db.outbox(usize::MAX)).await?;
        let mut out = std::collections::HashSet::new();
        for (_, c) in waiting {
            match c {
                Change::Put { target, .. }
                | Change::Delete { target, .. }
                | Change::Offense { target, .. } => {
                    out.insert(target);
                }
                Change::Forget { targets } => out.extend(targets),
            }
        }
        Ok(out)
    }

    pub async fn outbox_len(&self) -> Result<u64, Error> {
        self.run(move |db, _| db.outbox_len()).await
    }

    pub async fn meta(&self, name: &'static str) -> Result<Option<String>, Error> {
        self.run(move |db, _| db.meta(name)).await
    }

    pub async fn set_meta(&self, name: &'static str, value: String) -> Result<(), Error> {
        self.run(move |db, _| db.set_meta(name, &value)).await
    }

    /// Waits until a local change has been queued for the fleet.
    pub async fn queued(&self) {
        self.local().queued.notified().await
    }

    fn local(&self) -> &Arc<Local> {
        let Store::Local(local) = self;
        local
    }

    fn notify_queued(&self) {
        let local = self.local();
        if local.outbox {
            local.queued.notify_one();
        }
    }

    /// Drops offense times older than `retention` ms.
    pub async fn prune(&self, now: u64, retention: u64) -> Result<(), Error> {
        self.run(move |db, _| db.prune_offenses(now, retention))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upgrade's handover: once handed over, the file can be opened by another store
    /// (the successor's), nothing is written here any more, and an entry enforced meanwhile
    /// is kept to be passed on; taken back, the store writes again.
    #[tokio::test]
    async fn a_handed_over_store_releases_the_file_and_keeps_what_it_could_not_write() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), false, false).unwrap();
        let entry = |n| Entry::new(1, u64::MAX / 2, "api", None).with_origin(n);
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        store
            .put(Slot::Block, net("10.0.0.1/32"), entry(None))
            .await
            .unwrap();
        assert!(matches!(
            Store::open(dir.path(), false, false),
            Err(Error::InUse(_))
        ));

        store.hand_over().await.unwrap();
        let (successor, _) = Store::open(dir.path(), false, false).unwrap();
        assert_eq!(successor.load(2).await.unwrap().len(), 1);
        let late = store
            .put(Slot::Block, net("10.0.0.2/32"), entry(None))
            .await;
        assert!(matches!(late, Err(Error::HandedOver)), "{late:?}");
        assert!(matches!(store.load(2).await, Err(Error::HandedOver)));
        let passed = store.take_pending();
        assert_eq!(passed.len(), 1);
        assert_eq!(passed[0].1, net("10.0.0.2/32"));
        drop(successor);

        store.take_back();
        store
            .put(Slot::Block, net("10.0.0.3/32"), entry(None))
            .await
            .unwrap();
        assert_eq!(store.load(2).await.unwrap().len(), 2);
    }
}
