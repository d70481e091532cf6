//! The reading side of the fleet: the others' changes from the stream, and the resync that
//! brings this gateway and the store together (at start, on reconnect, after lost records).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;
use redis::AsyncCommands;
use tracing::{info, warn};

use super::{parse_entry_key, parse_offense_key, rand_u64, scan, stream_id, Error, Fleet};
use super::{BATCH, BLOCK, EPOCH, RESPONSE_TIMEOUT, STREAM};
use crate::config::Action;
use crate::decide::clock::now_ms;
use crate::decide::policy::temporary::Slot;
use crate::state::store::{Change, Stored};

/// What a resync found in the store.
struct Held {
    entries: HashSet<(Slot, IpNet)>,
    offenses: HashSet<(String, IpNet)>,
    /// Entries and offense times this gateway lacks.
    changes: Vec<Change>,
}

impl Fleet {
    /// Reads the others' changes; (re)connects and resyncs after any failure.
    pub(super) async fn read_loop(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.read(&mut backoff).await {
                Ok(()) => {}
                Err(e) => {
                    if self.state.metrics.fleet.connected.get() == 1 {
                        warn!(error = %e, "fleet: the shared store is unreachable; entries stay local until it is back");
                    }
                }
            }
            self.state.metrics.fleet.connected.set(0);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn read(&self, backoff: &mut Duration) -> Result<(), Error> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_response_timeout(Some(BLOCK + RESPONSE_TIMEOUT));
        let mut con = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let (mut last, mut base) = self.resync(&mut con).await?;
        // Records read since the resync, own ones included: with `base`, what the stream's
        // `entries-added` must be when nothing was lost.
        let mut seen: u64 = 0;
        *backoff = Duration::from_millis(100);
        if self.state.metrics.fleet.connected.get() == 0 {
            info!(gateway = %self.id, "fleet: connected and in sync");
        }
        self.state.metrics.fleet.connected.set(1);
        loop {
            let opts = redis::streams::StreamReadOptions::default()
                .block(BLOCK.as_millis() as usize)
                .count(BATCH);
            let reply: Option<StreamReadReply> =
                con.xread_options(&[STREAM], &[&last], &opts).await?;
            let entries = reply
                .and_then(|r| r.keys.into_iter().next())
                .map(|k| k.ids)
                .unwrap_or_default();
            if entries.is_empty() {
                // Idle: were records this gateway had not read trimmed or deleted?
                if self.missed(&mut con, &last, base + seen).await? {
                    info!(
                        "fleet: changes were trimmed or deleted before they were read: resyncing"
                    );
                    (last, base) = self.resync(&mut con).await?;
                    seen = 0;
                }
                continue;
            }
            seen += entries.len() as u64;
            let mut changes = Vec::with_capacity(entries.len());
            for e in &entries {
                let origin: Option<String> = e.get("origin");
                if origin.as_deref() == Some(self.id.as_str()) {
                    continue;
                }
                if let Some(c) = e
                    .get::<Vec<u8>>("change")
                    .and_then(|c| serde_json::from_slice::<Change>(&c).ok())
                {
                    changes.push(c);
                }
            }
            if let Some(e) = entries.last() {
                last = e.id.clone();
            }
            self.apply(changes).await?;
        }
    }

    /// The stream's `XINFO`: (last ID, entries ever added, largest deleted ID); zeros when
    /// there is no stream yet.
    async fn stream_info(con: &mut MultiplexedConnection) -> Result<(String, u64, String), Error> {
        let info: HashMap<String, redis::Value> = match redis::cmd("XINFO")
            .arg("STREAM")
            .arg(STREAM)
            .query_async(con)
            .await
        {
            Ok(i) => i,
            Err(e)
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) =>
            {
                return Ok(("0-0".into(), 0, "0-0".into()))
            }
            Err(e) => return Err(e.into()),
        };
        let text = |k: &str| {
            info.get(k)
                .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
                .unwrap_or_else(|| "0-0".into())
        };
        let added = info
            .get("entries-added")
            .and_then(|v| redis::from_redis_value_ref::<u64>(v).ok())
            .unwrap_or(0);
        Ok((
            text("last-generated-id"),
            added,
            text("max-deleted-entry-id"),
        ))
    }

    /// Whether the stream lost records this gateway had not read: trimmed (more were added
    /// than `expected`, though nothing is left to read) or deleted after `last`.
    async fn missed(
        &self,
        con: &mut MultiplexedConnection,
        last: &str,
        expected: u64,
    ) -> Result<bool, Error> {
        let (_, added, deleted) = Self::stream_info(con).await?;
        Ok(added > expected || stream_id(&deleted) > stream_id(last))
    }

    /// What the store holds: its entries and offense records, and the changes that would
    /// bring this gateway up to them.
    async fn read_store(&self, con: &mut MultiplexedConnection, now: u64) -> Result<Held, Error> {
        let mut entries: HashSet<(Slot, IpNet)> = HashSet::new();
        let mut changes = Vec::new();
        for keys in scan(con, "ipgate:entry:*").await?.chunks(256) {
            let values: Vec<Option<Vec<u8>>> = con.mget(keys).await?;
            for (key, value) in keys.iter().zip(values) {
                let Some((action, target)) = parse_entry_key(key) else {
                    continue;
                };
                let Some(entry) = value.and_then(|v| serde_json::from_slice::<Stored>(&v).ok())
                else {
                    continue;
                };
                entries.insert((action.clone(), target));
                let held = self.state.temp.table(&action).find(target.addr(), None);
                let same =
                    held.is_some_and(|(net, e)| net == target && e.expires_at == entry.expires_at);
                if !same && entry.expires_at > now {
                    changes.push(Change::Put {
                        action,
                        target,
                        entry,
                    });
                }
            }
        }
        let mut offenses: HashSet<(String, IpNet)> = HashSet::new();
        for key in scan(con, "ipgate:offense:*").await? {
            let Some((jail, target)) = parse_offense_key(&key) else {
                continue;
            };
            let times: Vec<u64> = con.zrange(&key, 0, -1).await?;
            offenses.insert((jail.clone(), target));
            changes.push(Change::Offense {
                jail,
                target,
                times,
            });
        }

        Ok(Held {
            entries,
            offenses,
            changes,
        })
    }

    /// Brings this gateway and the store together; returns the stream ID to read from and
    /// the stream's `entries-added` at that ID.
    async fn resync(&self, con: &mut MultiplexedConnection) -> Result<(String, u64), Error> {
        let retention = self.retention_ms();
        let fresh = format!("{:016x}", rand_u64());
        let _: Option<String> = redis::cmd("SET")
            .arg(EPOCH)
            .arg(&fresh)
            .arg("NX")
            .arg("PX")
            .arg(retention)
            .query_async(con)
            .await?;
        let epoch: String = con.get(EPOCH).await?;
        let _: () = con.pexpire(EPOCH, retention as i64).await?;
        // What this gateway did while away goes first.
        self.flush(con).await?;
        let (last, added, _) = Self::stream_info(con).await?;

        let now = now_ms();
        let started = now;
        let held = self.read_store(con, now).await?;
        let (in_store, offenses_in_store, mut changes) =
            (held.entries, held.offenses, held.changes);

        let store = &self.state.store;
        let seen = store.meta("fleet_epoch").await?;
        let local = store.load(now).await?;
        let local_offenses = store.all_offenses().await?;
        if seen.as_deref() == Some(epoch.as_str()) {
            // The store knows what happened while this gateway was away: what it lacks was
            // removed (or forgotten) elsewhere. Not what was made here meanwhile (still in
            // the outbox, or made after the scan began).
            let busy = store.outbox_concerns().await?;
            for (action, target, entry) in &local {
                let fresh = entry.created_at >= started || busy.contains(target);
                if !fresh && !in_store.contains(&(action.clone(), *target)) {
                    changes.push(Change::Delete {
                        action: action.clone(),
                        target: *target,
                    });
                }
            }
            let mut forgotten: Vec<IpNet> = Vec::new();
            for (jail, target, _) in &local_offenses {
                let gone = !offenses_in_store.contains(&(jail.clone(), *target));
                if gone && !busy.contains(target) && !forgotten.contains(target) {
                    forgotten.push(*target);
                }
            }
            if !forgotten.is_empty() {
                changes.push(Change::Forget { targets: forgotten });
            }
        } else {
            // A new store (first contact, or it restarted empty): publish what is live here.
            let again: Vec<Change> =
                local
                    .iter()
                    .filter(|(a, t, _)| !in_store.contains(&(a.clone(), *t)))
                    .map(|(action, target, entry)| Change::Put {
                        action: action.clone(),
                        target: *target,
                        entry: Stored::of(entry),
                    })
                    .chain(local_offenses.into_iter().map(|(jail, target, times)| {
                        Change::Offense {
                            jail,
                            target,
                            times,
                        }
                    }))
                    .collect();
            if !again.is_empty() {
                info!(
                    changes = again.len(),
                    "fleet: a new store: publishing this gateway's entries again"
                );
                store.enqueue(again).await?;
                self.flush(con).await?;
            }
            store.set_meta("fleet_epoch", epoch).await?;
        }
        self.apply(changes).await?;
        Ok((last, added))
    }

    /// Applies the others' changes: memory first (enforced at once), then the local store.
    async fn apply(&self, mut changes: Vec<Change>) -> Result<(), Error> {
        if changes.is_empty() {
            return Ok(());
        }
        let state = &self.state;
        let now = now_ms();
        // Whatever the store says, nothing is kept here past privacy.max_retention.
        let cap = now + self.retention_ms();
        for c in &mut changes {
            match c {
                Change::Put { entry, .. } => entry.expires_at = entry.expires_at.min(cap),
                Change::Offense { times, .. } => times.retain(|&t| t + self.retention_ms() > now),
                _ => {}
            }
        }
        state.metrics.fleet.applied.inc_by(changes.len() as u64);
        for c in &changes {
            match c {
                Change::Put {
                    action,
                    target,
                    entry,
                } if entry.expires_at > now => {
                    if action.action() == Action::Block {
                        state.metrics.bans.with_label_values(&["fleet"]).inc();
                    }
                    state.temp.table(action).insert(*target, entry.entry());
                }
                Change::Put { .. } => {}
                Change::Delete { action, target } => {
                    state.temp.table(action).remove(*target);
                }
                Change::Offense { .. } => {}
                Change::Forget { targets } => {
                    for t in targets {
                        state.erase_counters(t.addr());
                    }
                }
            }
        }
        state.publish_temporary_gauges();
        if let Err(e) = state.store.apply(changes).await {
            state.metrics.store_errors.inc();
            return Err(e.into());
        }
        Ok(())
    }
}
