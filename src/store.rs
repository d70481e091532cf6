//! The state store behind one interface ([`Store`]): temporary entries and offense history,
//! put, deleted, loaded, counted, forgotten and pruned. Today one implementation, the
//! embedded database ([`Redb`]: ACID, under `gateway.state_dir`): entries are committed
//! (fsync) before the admin API acknowledges them, loaded at start with expired ones dropped,
//! and deleted when they expire, so nothing about an address stays on disk longer than in
//! memory. `Store` runs the blocking database calls on tokio's blocking pool itself.

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ipnet::IpNet;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::config::Action;
use crate::policy::temporary::Entry;

/// `"block 10.0.0.0/24"` → the entry as JSON.
const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entries");
/// `"JAIL TARGET"` → JSON list of offense times (ms), none older than `max_retention`.
const OFFENSES: TableDefinition<&str, &[u8]> = TableDefinition::new("offenses");

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
}

fn err(e: impl Into<redb::Error>) -> Error {
    Error::Db(e.into())
}

/// A temporary entry as the store returns it.
pub type Loaded = (Action, IpNet, Entry);

/// An offense record: jail, target, offense times (ms).
pub type Offenses = (String, IpNet, Vec<u64>);

/// The state store, whatever keeps it. Every method may wait on disk: never call it from a
/// request's decision, only from the tasks that change state.
#[derive(Clone)]
pub enum Store {
    /// The embedded database under `gateway.state_dir`.
    Local(Arc<Local>),
}

/// The embedded store with what keeps it going through disk faults (SPEC 17): the database is
/// reopened after any failed call (redb refuses every write after an I/O error until then),
/// and an entry the disk refused is kept here and written as soon as the disk takes it.
pub struct Local {
    dir: PathBuf,
    /// `None` after a failure: the next call reopens. Calls are serialized by this lock, so
    /// a retried write and a delete of the same entry cannot cross.
    db: Mutex<Option<Redb>>,
    /// Entries enforced but not yet durable.
    pending: Mutex<HashMap<(Action, IpNet), Entry>>,
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
    /// running ipgate is an error.
    pub fn open(dir: &Path) -> Result<(Store, Opened), Error> {
        let (db, opened) = match Redb::open(dir) {
            Ok(db) => (db, Opened::Fresh),
            Err(e @ Error::CreateDir { .. }) | Err(e @ Error::InUse(_)) => return Err(e),
            Err(e) => {
                let file = dir.join("state.redb");
                let aside = dir.join(format!("state.redb.bad-{}", crate::clock::now_ms()));
                std::fs::rename(&file, &aside).map_err(|source| Error::CreateDir {
                    path: aside.clone(),
                    source,
                })?;
                (Redb::open(dir)?, Opened::MovedAside(aside, e))
            }
        };
        let local = Local {
            dir: dir.to_path_buf(),
            db: Mutex::new(Some(db)),
            pending: Mutex::default(),
        };
        Ok((Store::Local(Arc::new(local)), opened))
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Redb, &mut HashMap<(Action, IpNet), Entry>) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let Store::Local(local) = self;
        let local = local.clone();
        tokio::task::spawn_blocking(move || {
            let mut db = local.db.lock().unwrap_or_else(|p| p.into_inner());
            if db.is_none() {
                *db = Some(Redb::open(&local.dir)?);
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
    pub async fn put(&self, action: Action, target: IpNet, entry: Entry) -> Result<(), Error> {
        let Store::Local(local) = self;
        let local = local.clone();
        tokio::task::spawn_blocking(move || {
            let mut db = local.db.lock().unwrap_or_else(|p| p.into_inner());
            let mut pending = local.pending.lock().unwrap_or_else(|p| p.into_inner());
            let written = match db.as_ref() {
                Some(open) => open.put(action, target, &entry),
                None => Redb::open(&local.dir).and_then(|open| {
                    let r = open.put(action, target, &entry);
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
        .await?
    }

    /// Writes the entries the disk refused before; returns how many are still not durable.
    /// Expired ones are dropped.
    pub async fn retry(&self, now: u64) -> Result<usize, Error> {
        if self.pending() == 0 {
            return Ok(0);
        }
        self.run(move |db, pending| {
            pending.retain(|_, e| e.expires_at > now);
            let due: Vec<_> = pending.iter().map(|(k, e)| (*k, e.clone())).collect();
            for ((action, target), entry) in due {
                db.put(action, target, &entry)?;
                pending.remove(&(action, target));
            }
            Ok(pending.len())
        })
        .await
    }

    /// Entries enforced but not yet durable.
    pub fn pending(&self) -> usize {
        let Store::Local(local) = self;
        local.pending.lock().map_or(0, |p| p.len())
    }

    /// Deletes entries durably; returns how many existed on disk.
    pub async fn delete(&self, targets: Vec<(Action, IpNet)>) -> Result<usize, Error> {
        self.run(move |db, pending| {
            let n = db.delete(&targets)?;
            for t in &targets {
                pending.remove(t);
            }
            Ok(n)
        })
        .await
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
    }

    /// The offense history held under exactly these targets.
    pub async fn offenses(&self, ip: IpAddr, targets: Vec<IpNet>) -> Result<Vec<Offenses>, Error> {
        let held = self.run(move |db, _| db.offenses(ip)).await?;
        Ok(held
            .into_iter()
            .filter(|(_, t, _)| targets.contains(t))
            .collect())
    }

    /// Erases the offense history of these targets; returns how many records went.
    pub async fn forget(&self, targets: Vec<IpNet>) -> Result<usize, Error> {
        self.run(move |db, _| db.forget_offenses(&targets)).await
    }

    /// Drops offense times older than `retention` ms.
    pub async fn prune(&self, now: u64, retention: u64) -> Result<(), Error> {
        self.run(move |db, _| db.prune_offenses(now, retention))
            .await
    }
}

/// The embedded database. Every call blocks.
pub struct Redb {
    db: Database,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    created_at: u64,
    expires_at: u64,
    source: String,
    reason: Option<String>,
}

fn key(action: Action, target: IpNet) -> String {
    format!("{action} {target}")
}

impl Redb {
    /// Opens (or creates) `DIR/state.redb`, creating the directory (mode 0700) if needed.
    pub fn open(dir: &Path) -> Result<Redb, Error> {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| Error::CreateDir {
                    path: dir.to_path_buf(),
                    source,
                })?;
        }
        let path = dir.join("state.redb");
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => Error::InUse(path.clone()),
            e => Error::Open {
                path: path.clone(),
                source: e.into(),
            },
        })?;
        let txn = db.begin_write().map_err(err)?;
        txn.open_table(ENTRIES).map_err(err)?;
        txn.open_table(OFFENSES).map_err(err)?;
        txn.commit().map_err(err)?;
        Ok(Redb { db })
    }

    /// Writes an entry durably (returns once it is on disk).
    pub fn put(&self, action: Action, target: IpNet, entry: &Entry) -> Result<(), Error> {
        let value = serde_json::to_vec(&Stored {
            created_at: entry.created_at,
            expires_at: entry.expires_at,
            source: entry.source().to_string(),
            reason: entry.reason().map(str::to_string),
        })?;
        let txn = self.db.begin_write().map_err(err)?;
        {
            let mut t = txn.open_table(ENTRIES).map_err(err)?;
            t.insert(key(action, target).as_str(), value.as_slice())
                .map_err(err)?;
        }
        txn.commit().map_err(err)
    }

    /// Deletes entries durably; returns how many existed.
    pub fn delete(&self, targets: &[(Action, IpNet)]) -> Result<usize, Error> {
        if targets.is_empty() {
            return Ok(0);
        }
        let txn = self.db.begin_write().map_err(err)?;
        let mut n = 0;
        {
            let mut t = txn.open_table(ENTRIES).map_err(err)?;
            for (action, target) in targets {
                if t.remove(key(*action, *target).as_str())
                    .map_err(err)?
                    .is_some()
                {
                    n += 1;
                }
            }
        }
        txn.commit().map_err(err)?;
        Ok(n)
    }

    /// Every entry still live at `now`; expired ones are deleted on the way.
    pub fn load(&self, now: u64) -> Result<Vec<(Action, IpNet, Entry)>, Error> {
        let mut live = Vec::new();
        let mut expired = Vec::new();
        {
            let txn = self.db.begin_read().map_err(err)?;
            let t = txn.open_table(ENTRIES).map_err(err)?;
            for row in t.iter().map_err(err)? {
                let (k, v) = row.map_err(err)?;
                let Some((action, target)) = parse_key(k.value()) else {
                    continue;
                };
                let Ok(s) = serde_json::from_slice::<Stored>(v.value()) else {
                    continue;
                };
                if s.expires_at <= now {
                    expired.push((action, target));
                    continue;
                }
                live.push((
                    action,
                    target,
                    Entry::new(s.created_at, s.expires_at, &s.source, s.reason.as_deref()),
                ));
            }
        }
        self.delete(&expired)?;
        Ok(live)
    }
}

impl Redb {
    /// Records an offense of `target` against `jail` at `now`; returns how many earlier
    /// offenses within `retention` there were. Older ones are dropped on the way.
    pub fn record_offense(
        &self,
        jail: &str,
        target: IpNet,
        now: u64,
        retention: u64,
    ) -> Result<usize, Error> {
        let key = format!("{jail} {target}");
        let txn = self.db.begin_write().map_err(err)?;
        let earlier;
        {
            let mut t = txn.open_table(OFFENSES).map_err(err)?;
            let mut times: Vec<u64> = t
                .get(key.as_str())
                .map_err(err)?
                .and_then(|v| serde_json::from_slice(v.value()).ok())
                .unwrap_or_default();
            times.retain(|&at| now.saturating_sub(at) < retention);
            earlier = times.len();
            times.push(now);
            let value = serde_json::to_vec(&times)?;
            t.insert(key.as_str(), value.as_slice()).map_err(err)?;
        }
        txn.commit().map_err(err)?;
        Ok(earlier)
    }

    /// The offense history of every target containing `ip`: (jail, target, times).
    pub fn offenses(&self, ip: IpAddr) -> Result<Vec<(String, IpNet, Vec<u64>)>, Error> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(OFFENSES).map_err(err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            let Some((jail, target)) = k.value().rsplit_once(' ') else {
                continue;
            };
            let Ok(target) = target.parse::<IpNet>() else {
                continue;
            };
            if target.contains(&ip) {
                let times = serde_json::from_slice(v.value()).unwrap_or_default();
                out.push((jail.to_string(), target, times));
            }
        }
        Ok(out)
    }

    /// Deletes the offense history of these targets; returns how many records went.
    pub fn forget_offenses(&self, targets: &[IpNet]) -> Result<usize, Error> {
        let txn = self.db.begin_write().map_err(err)?;
        let mut n = 0;
        {
            let mut t = txn.open_table(OFFENSES).map_err(err)?;
            let doomed: Vec<String> = t
                .iter()
                .map_err(err)?
                .filter_map(|row| row.ok())
                .map(|(k, _)| k.value().to_string())
                .filter(|k| {
                    k.rsplit_once(' ')
                        .and_then(|(_, t)| t.parse::<IpNet>().ok())
                        .is_some_and(|t| targets.contains(&t))
                })
                .collect();
            for k in doomed {
                t.remove(k.as_str()).map_err(err)?;
                n += 1;
            }
        }
        txn.commit().map_err(err)?;
        Ok(n)
    }

    /// Drops offense times older than `retention` (privacy.max_retention).
    pub fn prune_offenses(&self, now: u64, retention: u64) -> Result<(), Error> {
        let txn = self.db.begin_write().map_err(err)?;
        {
            let mut t = txn.open_table(OFFENSES).map_err(err)?;
            let rows: Vec<(String, Vec<u64>)> = t
                .iter()
                .map_err(err)?
                .filter_map(|row| row.ok())
                .map(|(k, v)| {
                    (
                        k.value().to_string(),
                        serde_json::from_slice(v.value()).unwrap_or_default(),
                    )
                })
                .collect();
            for (k, mut times) in rows {
                let before = times.len();
                times.retain(|&at| now.saturating_sub(at) < retention);
                if times.is_empty() {
                    t.remove(k.as_str()).map_err(err)?;
                } else if times.len() != before {
                    let value = serde_json::to_vec(&times)?;
                    t.insert(k.as_str(), value.as_slice()).map_err(err)?;
                }
            }
        }
        txn.commit().map_err(err)
    }
}

fn parse_key(k: &str) -> Option<(Action, IpNet)> {
    let (action, target) = k.split_once(' ')?;
    Some((action.parse().ok()?, target.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_reopening_and_expired_ones_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let e = |expires_at| Entry::new(1, expires_at, "api", Some("test"));
        {
            let s = Redb::open(dir.path()).unwrap();
            s.put(Action::Block, "10.0.0.0/24".parse().unwrap(), &e(1000))
                .unwrap();
            s.put(Action::Allow, "2001:db8::/64".parse().unwrap(), &e(1000))
                .unwrap();
            s.put(Action::Block, "192.0.2.1/32".parse().unwrap(), &e(10))
                .unwrap();
        }
        let s = Redb::open(dir.path()).unwrap();
        let live = s.load(500).unwrap();
        assert_eq!(live.len(), 2);
        assert_eq!(live[0].2, e(1000));
        // The expired one is gone from disk too.
        assert_eq!(
            s.delete(&[(Action::Block, "192.0.2.1/32".parse().unwrap())])
                .unwrap(),
            0
        );
        assert_eq!(
            s.delete(&[(Action::Block, "10.0.0.0/24".parse().unwrap())])
                .unwrap(),
            1
        );
        assert_eq!(s.load(500).unwrap().len(), 1);
    }

    #[test]
    fn offenses_count_within_retention_and_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let s = Redb::open(dir.path()).unwrap();
        let t: IpNet = "2001:db8:1:2::/64".parse().unwrap();
        assert_eq!(s.record_offense("wp", t, 1_000, 10_000).unwrap(), 0);
        assert_eq!(s.record_offense("wp", t, 2_000, 10_000).unwrap(), 1);
        // The first is older than the retention by now.
        assert_eq!(s.record_offense("wp", t, 11_500, 10_000).unwrap(), 1);
        let held = s.offenses("2001:db8:1:2::7".parse().unwrap()).unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].2, vec![2_000, 11_500]);
        s.prune_offenses(20_000, 10_000).unwrap();
        assert_eq!(
            s.offenses("2001:db8:1:2::7".parse().unwrap()).unwrap()[0].2,
            vec![11_500]
        );
        assert_eq!(s.forget_offenses(&[t]).unwrap(), 1);
        assert!(s
            .offenses("2001:db8:1:2::7".parse().unwrap())
            .unwrap()
            .is_empty());
    }
}
