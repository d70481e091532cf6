//! Fleet mode: temporary entries, their removal, offense history and `forget`
//! shared by every gateway through Redis or Valkey.
//!
//! Local first: a change is acknowledged once it is durable here (redb), where it is written
//! together with its record in the outbox ([`crate::state::store`]). This module sends the outbox
//! when the store is reachable and applies what the others send, so the request path never
//! waits on the network: decisions read memory only.
//!
//! In the store, everything about an address expires within `privacy.max_retention`:
//! - `ipgate:entry:ACTION:TARGET`: the entry (JSON), `PXAT` its expiry, the source of truth;
//! - `ipgate:offense:JAIL:TARGET`: a sorted set of offense times, expiring with the last;
//! - `ipgate:changes`: a stream of changes (`XADD` trimmed by `MINID` to the retention, the
//!   key itself with a TTL), read with `XREAD BLOCK` on a connection of its own;
//! - `ipgate:epoch`: a random name for this life of the store (not about anyone).
//!
//! A gateway resyncs (SCAN) at start, on reconnect, and when entries it had not read were
//! trimmed or deleted. If the epoch is the one it saw last, the store is right about what
//! happened while this gateway was away (entries it holds that the store lacks were removed
//! elsewhere); if not, the store was emptied, and this gateway publishes its live entries and
//! offenses again, so the fleet converges.

mod sync;

use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;
use tokio::sync::{watch, Mutex};
use tracing::{info, warn};

use crate::config;
use crate::decide::clock::now_ms;
use crate::decide::policy::temporary::Slot;
use crate::state::store::{self, Change};
use crate::state::AppState;

const STREAM: &str = "ipgate:changes";
const EPOCH: &str = "ipgate:epoch";
/// Changes sent in one round trip.
const BATCH: usize = 512;
/// How long `XREAD` blocks before the reader checks for trimmed entries.
const BLOCK: Duration = Duration::from_secs(2);
/// Commands that take longer than this count as an outage.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// A `forget` record stays in the stream this long, for the gateways connected to read it
/// (the others learn it by resync), and is then deleted.
const FORGET_LINGER: Duration = Duration::from_secs(3);

/// Why the fleet's store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("fleet store: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("fleet: the local store: {0}")]
    Local(#[from] store::Error),
    #[error("fleet: cannot read fleet.{key} {}: {source}", path.display())]
    File {
        key: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("fleet: a record cannot be encoded: {0}")]
    Encode(#[from] serde_json::Error),
}

/// `ipgate:entry:SLOT:TARGET`; a scoped slot (`block@site:NAME`) is percent-encoded, so
/// the first `:` after the slot still ends it (an IPv6 target has more).
fn entry_key(action: &Slot, target: IpNet) -> String {
    let slot: String = form_urlencoded::byte_serialize(action.to_string().as_bytes()).collect();
    format!("ipgate:entry:{slot}:{target}")
}

fn offense_key(jail: &str, target: IpNet) -> String {
    format!("ipgate:offense:{jail}:{target}")
}

/// A stream ID as (milliseconds, sequence), for comparing.
fn stream_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// The client for `[fleet]`, with the password from `password_file`.
pub fn client(conf: &config::Fleet) -> Result<redis::Client, Error> {
    use redis::IntoConnectionInfo;
    let mut info = conf.redis.as_str().into_connection_info()?;
    if let Some(path) = &conf.password_file {
        let password = std::fs::read_to_string(path).map_err(|source| Error::File {
            key: "password_file",
            path: path.clone(),
            source,
        })?;
        let settings = info.redis_settings().clone().set_password(password.trim());
        info = info.set_redis_settings(settings);
    }
    match &conf.ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|source| Error::File {
                key: "ca_file",
                path: path.clone(),
                source,
            })?;
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            };
            Ok(redis::Client::build_with_tls(info, certs)?)
        }
        None => Ok(redis::Client::open(info)?),
    }
}

/// One gateway's link to the fleet.
pub struct Fleet {
    state: Arc<AppState>,
    client: redis::Client,
    id: String,
    /// One flush at a time (the sender's loop and a resync both flush).
    flushing: Mutex<()>,
}

impl Fleet {
    pub fn new(state: Arc<AppState>, conf: &config::Fleet) -> Result<Arc<Fleet>, Error> {
        Ok(Arc::new(Fleet {
            client: client(conf)?,
            id: conf.gateway_id.clone(),
            state,
            flushing: Mutex::new(()),
        }))
    }

    fn retention_ms(&self) -> u64 {
        let snap = self.state.snapshot.load();
        snap.config.privacy.max_retention.as_millis() as u64
    }

    /// Runs the sender and the reader until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        info!(gateway = %self.id, "fleet: connecting to the shared store");
        let sender = tokio::spawn(self.clone().send_loop());
        let reader = tokio::spawn(self.clone().read_loop());
        let _ = stop.wait_for(|s| *s).await;
        sender.abort();
        reader.abort();
        self.state.metrics.fleet.connected.set(0);
    }

    /// Sends the outbox whenever a change is queued, and every second (after an outage).
    async fn send_loop(self: Arc<Self>) {
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_max_delay(Duration::from_secs(2));
        let mut con = loop {
            match ConnectionManager::new_lazy_with_config(self.client.clone(), config.clone()) {
                Ok(c) => break c,
                Err(e) => {
                    warn!(error = %e, "fleet: cannot set up the store connection");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        loop {
            if let Err(e) = self.flush(&mut con).await {
                warn!(error = %e, "fleet: changes kept in the outbox until the store is back");
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), self.state.store.queued()).await;
        }
    }

    /// Sends every queued change, oldest first; a change leaves the outbox once the store
    /// has it.
    async fn flush<C: redis::aio::ConnectionLike + Send + Sync>(
        &self,
        con: &mut C,
    ) -> Result<(), Error> {
        let _one = self.flushing.lock().await;
        let store = &self.state.store;
        loop {
            let batch = store.outbox(BATCH).await?;
            let Some(&(last, _)) = batch.last() else {
                self.state.metrics.fleet.outbox.set(0);
                return Ok(());
            };
            // A forget goes alone: it scans and deletes what the store holds about it.
            let cut = batch
                .iter()
                .position(|(_, c)| matches!(c, Change::Forget { .. }));
            let (batch, last) = match cut {
                Some(0) => (&batch[..1], batch[0].0),
                Some(n) => (&batch[..n], batch[n - 1].0),
                None => (&batch[..], last),
            };
            match &batch[0].1 {
                Change::Forget { targets } => self.send_forget(con, targets).await?,
                _ => self.send(con, batch.iter().map(|(_, c)| c)).await?,
            }
            store.outbox_done(last).await?;
            self.state.metrics.fleet.sent.inc_by(batch.len() as u64);
            let left = store.outbox_len().await.unwrap_or(0);
            self.state.metrics.fleet.outbox.set(left as i64);
        }
    }

    /// Writes changes to the store and the stream, in one atomic round trip.
    async fn send<'a, C: redis::aio::ConnectionLike + Send + Sync>(
        &self,
        con: &mut C,
        changes: impl Iterator<Item = &'a Change>,
    ) -> Result<(), Error> {
        let now = now_ms();
        let retention = self.retention_ms();
        let oldest = now.saturating_sub(retention);
        let mut pipe = redis::pipe();
        pipe.atomic();
        for change in changes {
            let mut change = change.clone();
            match &mut change {
                Change::Put {
                    action,
                    target,
                    entry,
                } => {
                    entry.origin.get_or_insert_with(|| self.id.clone());
                    let until = entry.expires_at.min(now + retention);
                    if until <= now {
                        continue;
                    }
                    pipe.cmd("SET")
                        .arg(entry_key(action, *target))
                        .arg(serde_json::to_vec(entry)?)
                        .arg("PXAT")
                        .arg(until)
                        .ignore();
                }
                Change::Delete { action, target } => {
                    pipe.del(entry_key(action, *target)).ignore();
                }
                Change::Offense {
                    jail,
                    target,
                    times,
                } => {
                    times.retain(|&t| t > oldest);
                    let Some(&newest) = times.iter().max() else {
                        continue;
                    };
                    let key = offense_key(jail, *target);
                    let mut zadd = redis::cmd("ZADD");
                    zadd.arg(&key);
                    for t in times.iter() {
                        zadd.arg(*t).arg(*t);
                    }
                    pipe.add_command(zadd).ignore();
                    pipe.cmd("ZREMRANGEBYSCORE")
                        .arg(&key)
                        .arg("-inf")
                        .arg(oldest)
                        .ignore();
                    pipe.cmd("PEXPIREAT")
                        .arg(&key)
                        .arg(newest + retention)
                        .ignore();
                }
                Change::Forget { .. } => {}
            }
            pipe.cmd("XADD")
                .arg(STREAM)
                .arg("MINID")
                .arg("~")
                .arg(oldest)
                .arg("*")
                .arg("origin")
                .arg(&self.id)
                .arg("change")
                .arg(serde_json::to_vec(&change)?)
                .ignore();
        }
        pipe.cmd("PEXPIRE").arg(STREAM).arg(retention).ignore();
        pipe.query_async::<()>(con).await?;
        Ok(())
    }

    /// A `forget`: the store's offense history and stream records about these targets are
    /// deleted (the entries went before, as deletes), then the others are told.
    async fn send_forget<C: redis::aio::ConnectionLike + Send + Sync>(
        &self,
        con: &mut C,
        targets: &[IpNet],
    ) -> Result<(), Error> {
        for target in targets {
            let keys = scan(con, &format!("ipgate:offense:*:{target}")).await?;
            if !keys.is_empty() {
                con.del::<_, ()>(keys).await?;
            }
        }
        let mut doomed = Vec::new();
        let mut from = "-".to_string();
        loop {
            let page: redis::streams::StreamRangeReply =
                con.xrange_count(STREAM, &from, "+", 1000).await?;
            let Some(last) = page.ids.last().map(|e| e.id.clone()) else {
                break;
            };
            for e in &page.ids {
                let change: Option<Change> = e
                    .get::<Vec<u8>>("change")
                    .and_then(|c| serde_json::from_slice(&c).ok());
                if change.is_some_and(|c| targets.iter().any(|t| c.concerns(t))) {
                    doomed.push(e.id.clone());
                }
            }
            if page.ids.len() < 1000 {
                break;
            }
            from = format!("({last}");
        }
        for ids in doomed.chunks(500) {
            con.xdel::<_, _, ()>(STREAM, ids).await?;
        }
        let change = serde_json::to_vec(&Change::Forget {
            targets: targets.to_vec(),
        })?;
        let id: String = redis::cmd("XADD")
            .arg(STREAM)
            .arg("*")
            .arg("origin")
            .arg(&self.id)
            .arg("change")
            .arg(change)
            .query_async(con)
            .await?;
        let _: () = redis::cmd("PEXPIRE")
            .arg(STREAM)
            .arg(self.retention_ms())
            .query_async(con)
            .await?;
        // The forget record itself goes too, once the connected gateways have read it.
        let client = self.client.clone();
        tokio::spawn(async move {
            tokio::time::sleep(FORGET_LINGER).await;
            if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                let _ = c.xdel::<_, _, ()>(STREAM, &[id]).await;
            }
        });
        Ok(())
    }
}

/// Every key matching `pattern`.
async fn scan<C: redis::aio::ConnectionLike + Send + Sync>(
    con: &mut C,
    pattern: &str,
) -> Result<Vec<String>, Error> {
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let (next, page): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(con)
            .await?;
        keys.extend(page);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

fn parse_entry_key(key: &str) -> Option<(Slot, IpNet)> {
    let rest = key.strip_prefix("ipgate:entry:")?;
    let (slot, target) = rest.split_once(':')?;
    let slot: String = form_urlencoded::parse(format!("s={slot}").as_bytes())
        .next()?
        .1
        .into_owned();
    Some((slot.parse().ok()?, target.parse().ok()?))
}

fn parse_offense_key(key: &str) -> Option<(String, IpNet)> {
    let rest = key.strip_prefix("ipgate:offense:")?;
    // Jail names have no ':' (config check); the target may (IPv6).
    let (jail, target) = rest.split_once(':')?;
    Some((jail.to_string(), target.parse().ok()?))
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ms());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::policy::temporary::Scope;

    #[test]
    fn keys_round_trip() {
        let t: IpNet = "2001:db8::/64".parse().unwrap();
        assert_eq!(
            parse_entry_key(&entry_key(&Slot::Block, t)),
            Some((Slot::Block, t))
        );
        let scoped = Slot::Scoped(Scope::Site("Klant: Jansen & Zn+".into()));
        assert_eq!(parse_entry_key(&entry_key(&scoped, t)), Some((scoped, t)));
        assert_eq!(
            parse_offense_key(&offense_key("wp-login", t)),
            Some(("wp-login".to_string(), t))
        );
        assert!(stream_id("1700000000000-5") > stream_id("1700000000000-4"));
        assert!(stream_id("") < stream_id("0-1"));
    }
}
