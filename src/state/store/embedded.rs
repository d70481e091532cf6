//! The embedded database (redb) under `gateway.state_dir`: entries, offense history and, with
//! a fleet, the outbox of changes not yet sent (written in the same transaction as the
//! change, so a crash loses neither).

use std::net::IpAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use ipnet::IpNet;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::{err, Change, Error, Stored};
use crate::decide::policy::temporary::Entry;
use crate::decide::policy::temporary::Slot;

/// `"block 10.0.0.0/24"` → the entry as JSON.
const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entries");
/// `"JAIL TARGET"` → JSON list of offense times (ms), none older than `max_retention`.
const OFFENSES: TableDefinition<&str, &[u8]> = TableDefinition::new("offenses");
/// Sequence number → a [`Change`] not yet sent to the fleet (only with `[fleet]`).
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// Small facts about the store itself (the fleet epoch last seen); nothing about an address.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

type Txn = redb::WriteTransaction;

/// The embedded database. Every call blocks.
pub struct Redb {
    db: Database,
    /// Every local change also goes into the outbox (a fleet is configured).
    outbox: bool,
}

fn key(action: &Slot, target: IpNet) -> String {
    format!("{action} {target}")
}

fn offense_key(jail: &str, target: IpNet) -> String {
    format!("{jail} {target}")
}

/// Appends changes to the outbox, inside `txn`.
fn enqueue(txn: &Txn, changes: &[Change]) -> Result<(), Error> {
    let mut t = txn.open_table(OUTBOX).map_err(err)?;
    let first = t.last().map_err(err)?.map_or(0, |(k, _)| k.value() + 1);
    for (seq, c) in (first..).zip(changes) {
        t.insert(seq, serde_json::to_vec(c)?.as_slice())
            .map_err(err)?;
    }
    Ok(())
}

fn put_in(txn: &Txn, action: &Slot, target: IpNet, entry: &Stored) -> Result<(), Error> {
    let mut t = txn.open_table(ENTRIES).map_err(err)?;
    t.insert(
        key(action, target).as_str(),
        serde_json::to_vec(entry)?.as_slice(),
    )
    .map_err(err)?;
    Ok(())
}

fn delete_in(txn: &Txn, targets: &[(Slot, IpNet)]) -> Result<usize, Error> {
    let mut t = txn.open_table(ENTRIES).map_err(err)?;
    let mut n = 0;
    for (action, target) in targets {
        if t.remove(key(action, *target).as_str())
            .map_err(err)?
            .is_some()
        {
            n += 1;
        }
    }
    Ok(n)
}

fn offense_times(txn: &Txn, key: &str) -> Result<Vec<u64>, Error> {
    let t = txn.open_table(OFFENSES).map_err(err)?;
    let times = t
        .get(key)
        .map_err(err)?
        .and_then(|v| serde_json::from_slice(v.value()).ok())
        .unwrap_or_default();
    Ok(times)
}

fn set_offenses(txn: &Txn, key: &str, times: &[u64]) -> Result<(), Error> {
    let mut t = txn.open_table(OFFENSES).map_err(err)?;
    if times.is_empty() {
        t.remove(key).map_err(err)?;
    } else {
        t.insert(key, serde_json::to_vec(times)?.as_slice())
            .map_err(err)?;
    }
    Ok(())
}

fn forget_in(txn: &Txn, targets: &[IpNet]) -> Result<usize, Error> {
    let mut t = txn.open_table(OFFENSES).map_err(err)?;
    let doomed: Vec<String> = t
        .iter()
        .map_err(err)?
        .filter_map(|row| row.ok())
        .map(|(k, _)| k.value().to_string())
        .filter(|k| parse_offense_key(k).is_some_and(|(_, t)| targets.contains(&t)))
        .collect();
    for k in &doomed {
        t.remove(k.as_str()).map_err(err)?;
    }
    Ok(doomed.len())
}

impl Redb {
    /// Opens (or creates) `DIR/state.redb`, creating the directory (mode 0700) if needed.
    /// With `outbox`, every change is also queued for the fleet.
    pub fn open(dir: &Path, outbox: bool) -> Result<Redb, Error> {
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
        txn.open_table(OUTBOX).map_err(err)?;
        txn.open_table(META).map_err(err)?;
        txn.commit().map_err(err)?;
        Ok(Redb { db, outbox })
    }

    /// Writes an entry durably (returns once it is on disk).
    pub fn put(&self, action: &Slot, target: IpNet, entry: &Entry) -> Result<(), Error> {
        let stored = Stored::of(entry);
        let txn = self.db.begin_write().map_err(err)?;
        put_in(&txn, action, target, &stored)?;
        if self.outbox {
            let entry = stored;
            enqueue(
                &txn,
                &[Change::Put {
                    action: action.clone(),
                    target,
                    entry,
                }],
            )?;
        }
        txn.commit().map_err(err)
    }

    /// Deletes entries durably; returns how many existed.
    pub fn delete(&self, targets: &[(Slot, IpNet)]) -> Result<usize, Error> {
        self.delete_and_queue(targets, self.outbox)
    }

    fn delete_and_queue(&self, targets: &[(Slot, IpNet)], queue: bool) -> Result<usize, Error> {
        if targets.is_empty() {
            return Ok(0);
        }
        let txn = self.db.begin_write().map_err(err)?;
        let n = delete_in(&txn, targets)?;
        if queue {
            let changes: Vec<Change> = targets
                .iter()
                .map(|(action, target)| Change::Delete {
                    action: action.clone(),
                    target: *target,
                })
                .collect();
            enqueue(&txn, &changes)?;
        }
        txn.commit().map_err(err)?;
        Ok(n)
    }

    /// Every entry still live at `now`; expired ones are deleted on the way (not sent to
    /// the fleet: its copies expire by themselves).
    pub fn load(&self, now: u64) -> Result<Vec<(Slot, IpNet, Entry)>, Error> {
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
                live.push((action, target, s.entry()));
            }
        }
        self.delete_and_queue(&expired, false)?;
        Ok(live)
    }

    /// Records an offense of `target` against `jail` at `now`; returns how many earlier
    /// offenses within `retention` there were. Older ones are dropped on the way.
    pub fn record_offense(
        &self,
        jail: &str,
        target: IpNet,
        now: u64,
        retention: u64,
    ) -> Result<usize, Error> {
        let key = offense_key(jail, target);
        let txn = self.db.begin_write().map_err(err)?;
        let mut times = offense_times(&txn, &key)?;
        times.retain(|&at| now.saturating_sub(at) < retention);
        let earlier = times.len();
        times.push(now);
        set_offenses(&txn, &key, &times)?;
        if self.outbox {
            let jail = jail.to_string();
            enqueue(
                &txn,
                &[Change::Offense {
                    jail,
                    target,
                    times,
                }],
            )?;
        }
        txn.commit().map_err(err)?;
        Ok(earlier)
    }

    /// The offense history of every target containing `ip` (every target: `None`).
    pub fn offenses(&self, ip: Option<IpAddr>) -> Result<Vec<(String, IpNet, Vec<u64>)>, Error> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(OFFENSES).map_err(err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            let Some((jail, target)) = parse_offense_key(k.value()) else {
                continue;
            };
            if ip.is_none_or(|ip| target.contains(&ip)) {
                let times = serde_json::from_slice(v.value()).unwrap_or_default();
                out.push((jail.to_string(), target, times));
            }
        }
        Ok(out)
    }

    /// Deletes the offense history of these targets; returns how many records went.
    pub fn forget_offenses(&self, targets: &[IpNet]) -> Result<usize, Error> {
        let txn = self.db.begin_write().map_err(err)?;
        let n = forget_in(&txn, targets)?;
        if self.outbox {
            let targets = targets.to_vec();
            enqueue(&txn, &[Change::Forget { targets }])?;
        }
        txn.commit().map_err(err)?;
        Ok(n)
    }

    /// Drops offense times older than `retention` (privacy.max_retention). Each side of a
    /// fleet prunes its own; the fleet's copies expire by themselves.
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

    /// Applies changes that came from the fleet, in one transaction and without queueing
    /// them again. Offense times are merged (a union), not replaced.
    pub fn apply(&self, changes: &[Change]) -> Result<(), Error> {
        let txn = self.db.begin_write().map_err(err)?;
        for c in changes {
            match c {
                Change::Put {
                    action,
                    target,
                    entry,
                } => put_in(&txn, action, *target, entry)?,
                Change::Delete { action, target } => {
                    delete_in(&txn, &[(action.clone(), *target)])?;
                }
                Change::Offense {
                    jail,
                    target,
                    times,
                } => {
                    let key = offense_key(jail, *target);
                    let mut held = offense_times(&txn, &key)?;
                    held.extend_from_slice(times);
                    held.sort_unstable();
                    held.dedup();
                    set_offenses(&txn, &key, &held)?;
                }
                Change::Forget { targets } => {
                    forget_in(&txn, targets)?;
                }
            }
        }
        txn.commit().map_err(err)
    }

    /// Queues changes for the fleet (entries published again after the store lost them).
    pub fn enqueue(&self, changes: &[Change]) -> Result<(), Error> {
        let txn = self.db.begin_write().map_err(err)?;
        enqueue(&txn, changes)?;
        txn.commit().map_err(err)
    }

    /// The oldest changes not yet sent, at most `limit`, with their sequence numbers.
    pub fn outbox(&self, limit: usize) -> Result<Vec<(u64, Change)>, Error> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(OUTBOX).map_err(err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(err)?.take(limit) {
            let (k, v) = row.map_err(err)?;
            // A record this version cannot read is dropped rather than blocking the rest.
            if let Ok(c) = serde_json::from_slice(v.value()) {
                out.push((k.value(), c));
            }
        }
        Ok(out)
    }

    /// Removes the sent changes, up to and including sequence number `last`.
    pub fn outbox_done(&self, last: u64) -> Result<(), Error> {
        let txn = self.db.begin_write().map_err(err)?;
        {
            let mut t = txn.open_table(OUTBOX).map_err(err)?;
            t.retain_in(..=last, |_, _| false).map_err(err)?;
        }
        txn.commit().map_err(err)
    }

    /// Changes not yet sent.
    pub fn outbox_len(&self) -> Result<u64, Error> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(OUTBOX).map_err(err)?;
        t.len().map_err(err)
    }

    pub fn meta(&self, name: &str) -> Result<Option<String>, Error> {
        let txn = self.db.begin_read().map_err(err)?;
        let t = txn.open_table(META).map_err(err)?;
        let v = t.get(name).map_err(err)?;
        Ok(v.map(|v| String::from_utf8_lossy(v.value()).into_owned()))
    }

    pub fn set_meta(&self, name: &str, value: &str) -> Result<(), Error> {
        let txn = self.db.begin_write().map_err(err)?;
        {
            let mut t = txn.open_table(META).map_err(err)?;
            t.insert(name, value.as_bytes()).map_err(err)?;
        }
        txn.commit().map_err(err)
    }
}

/// `SLOT TARGET`, the target last (a site's name in a scope may have spaces; a target not).
fn parse_key(k: &str) -> Option<(Slot, IpNet)> {
    let (action, target) = k.rsplit_once(' ')?;
    Some((action.parse().ok()?, target.parse().ok()?))
}

fn parse_offense_key(k: &str) -> Option<(&str, IpNet)> {
    let (jail, target) = k.rsplit_once(' ')?;
    Some((jail, target.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_reopening_and_expired_ones_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let e = |expires_at| Entry::new(1, expires_at, "api", Some("test"));
        {
            let s = Redb::open(dir.path(), false).unwrap();
            s.put(&Slot::Block, "10.0.0.0/24".parse().unwrap(), &e(1000))
                .unwrap();
            s.put(&Slot::Allow, "2001:db8::/64".parse().unwrap(), &e(1000))
                .unwrap();
            s.put(&Slot::Block, "192.0.2.1/32".parse().unwrap(), &e(10))
                .unwrap();
        }
        let s = Redb::open(dir.path(), false).unwrap();
        let live = s.load(500).unwrap();
        assert_eq!(live.len(), 2);
        assert_eq!(live[0].2, e(1000));
        // The expired one is gone from disk too.
        assert_eq!(
            s.delete(&[(Slot::Block, "192.0.2.1/32".parse().unwrap())])
                .unwrap(),
            0
        );
        assert_eq!(
            s.delete(&[(Slot::Block, "10.0.0.0/24".parse().unwrap())])
                .unwrap(),
            1
        );
        assert_eq!(s.load(500).unwrap().len(), 1);
    }

    #[test]
    fn offenses_count_within_retention_and_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let s = Redb::open(dir.path(), false).unwrap();
        let t: IpNet = "2001:db8:1:2::/64".parse().unwrap();
        assert_eq!(s.record_offense("wp", t, 1_000, 10_000).unwrap(), 0);
        assert_eq!(s.record_offense("wp", t, 2_000, 10_000).unwrap(), 1);
        // The first is older than the retention by now.
        assert_eq!(s.record_offense("wp", t, 11_500, 10_000).unwrap(), 1);
        let held = s
            .offenses(Some("2001:db8:1:2::7".parse().unwrap()))
            .unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].2, vec![2_000, 11_500]);
        s.prune_offenses(20_000, 10_000).unwrap();
        assert_eq!(
            s.offenses(Some("2001:db8:1:2::7".parse().unwrap()))
                .unwrap()[0]
                .2,
            vec![11_500]
        );
        assert_eq!(s.forget_offenses(&[t]).unwrap(), 1);
        assert!(s
            .offenses(Some("2001:db8:1:2::7".parse().unwrap()))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn with_a_fleet_every_local_change_is_queued_and_changes_from_the_fleet_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let s = Redb::open(dir.path(), true).unwrap();
        let t: IpNet = "192.0.2.9/32".parse().unwrap();
        let e = Entry::new(1, 10_000, "api", None);
        s.put(&Slot::Block, t, &e).unwrap();
        s.record_offense("wp", t, 1_000, 100_000).unwrap();
        s.delete(&[(Slot::Block, t)]).unwrap();
        s.forget_offenses(&[t]).unwrap();
        let queued: Vec<Change> = s.outbox(100).unwrap().into_iter().map(|(_, c)| c).collect();
        assert_eq!(
            queued,
            vec![
                Change::Put {
                    action: Slot::Block,
                    target: t,
                    entry: Stored::of(&e)
                },
                Change::Offense {
                    jail: "wp".into(),
                    target: t,
                    times: vec![1_000]
                },
                Change::Delete {
                    action: Slot::Block,
                    target: t
                },
                Change::Forget { targets: vec![t] },
            ]
        );
        // Sent: gone from the outbox, which survives a reopen otherwise.
        let (second, _) = s.outbox(100).unwrap()[1];
        s.outbox_done(second).unwrap();
        drop(s);
        let s = Redb::open(dir.path(), true).unwrap();
        assert_eq!(s.outbox_len().unwrap(), 2);
        // From the fleet: applied, offense times merged, nothing queued.
        let from = e.clone().with_origin(Some("web2"));
        s.apply(&[
            Change::Put {
                action: Slot::Block,
                target: t,
                entry: Stored::of(&from),
            },
            Change::Offense {
                jail: "wp".into(),
                target: t,
                times: vec![500, 2_000],
            },
        ])
        .unwrap();
        s.record_offense("wp", t, 3_000, 100_000).unwrap();
        assert_eq!(s.load(5).unwrap()[0].2.origin(), Some("web2"));
        assert_eq!(s.offenses(None).unwrap()[0].2, vec![500, 2_000, 3_000]);
        assert_eq!(s.outbox_len().unwrap(), 3);
    }
}
