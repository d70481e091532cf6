//! Feeds: lists whose entries are fetched from a URL (`[lists.NAME] url`), every `refresh`.
//!
//! A fetch is a conditional GET (the copy's ETag and Last-Modified). A 304 only confirms the
//! copy held. A 200 is parsed whole ([`parse`]), then checked: `except` dropped, nothing wider
//! than `max_prefix`, no shrink beyond `max_shrink`. A body that passes becomes the last good
//! copy in `state_dir/feeds` ([`copy`]), and the policy is rebuilt from it: one atomic swap,
//! which the firewall mirrors in one transaction. Anything else is counted
//! (`ipgate_feed_errors_total{list,reason}`), logged, and changes nothing; the copy keeps
//! serving, at start too, without the network. Feed entries are static entries: a late
//! refresh never makes them expire.
//!
//! One task fetches the feeds one after the other and follows the config in force: a list
//! that appears is fetched at once (or when its copy is due), one that goes has its copy
//! deleted.

pub mod copy;
mod fetch;
pub mod parse;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::config::{copies_dir, Feed};
use crate::state::AppState;
use copy::Meta;
use fetch::Answer;
use parse::Refusal;

/// How often the feeds in force are looked at.
const TICK: Duration = Duration::from_secs(1);
/// After a refusal or a failure the next try comes after the refresh, or this if sooner.
const RETRY: Duration = Duration::from_secs(300);

/// What the task knows of one feed.
struct Tracked {
    feed: Feed,
    /// The header of the copy held, if any.
    meta: Option<Meta>,
    next: Instant,
}

impl Tracked {
    /// From the copy on disk: due when the copy's refresh is up (now if there is none, or it
    /// is of another URL).
    fn new(feed: Feed) -> Tracked {
        let meta = copy::read_meta(&feed.copy);
        let due_in = meta
            .as_ref()
            .filter(|m| m.url == feed.url.to_string())
            .map_or(Duration::ZERO, |m| {
                // A copy stamped in the future (a clock that was ahead) waits one refresh at
                // most.
                let due = m.checked.saturating_add(feed.refresh.as_secs());
                Duration::from_secs(due.saturating_sub(unix_now())).min(feed.refresh)
            });
        Tracked {
            feed,
            meta,
            next: Instant::now() + due_in,
        }
    }

    /// The copy held, if it is of the feed's URL now (validators and the shrink check).
    fn same(&self) -> Option<&Meta> {
        self.meta
            .as_ref()
            .filter(|m| m.url == self.feed.url.to_string())
    }
}

fn unix_now() -> u64 {
    crate::decide::clock::now_ms() / 1000
}

/// Runs until the gateway stops (the task is dropped then; a copy is written whole or not).
pub async fn run(state: Arc<AppState>) {
    let started = unix_now();
    let mut tracked: HashMap<String, Tracked> = HashMap::new();
    let mut swept = false;
    loop {
        let snap = state.snapshot.load_full();
        let feeds: Vec<(&str, &Feed)> = snap
            .config
            .lists
            .iter()
            .filter_map(|l| l.feed.as_ref().map(|f| (l.name.as_str(), f)))
            .collect();
        tracked.retain(|name, t| {
            let keep = feeds.iter().any(|(n, _)| n == name);
            if !keep {
                let _ = std::fs::remove_file(&t.feed.copy);
                state.metrics.feed.forget(name);
            }
            keep
        });
        if !swept {
            sweep_copies(&snap.config.gateway.state_dir, &feeds);
            swept = true;
        }
        for (name, feed) in &feeds {
            let t = tracked
                .entry(name.to_string())
                .or_insert_with(|| Tracked::new((*feed).clone()));
            if t.feed != **feed {
                // New keys (except, limits, URL): the next copy is asked for whole, so it is
                // checked under them, not confirmed by a 304.
                t.next = Instant::now();
                if let Some(m) = &mut t.meta {
                    m.etag = None;
                    m.last_modified = None;
                }
            }
            t.feed = (*feed).clone();
            if Instant::now() >= t.next {
                let wait = fetch_one(&state, name, t).await;
                t.next = Instant::now() + wait;
            }
            // A stamp in the future counts from the start: never younger than it can be.
            let checked = t
                .same()
                .map_or(started, |m| m.checked)
                .min(unix_now().max(started));
            let m = &state.metrics.feed;
            m.age
                .with_label_values(&[name])
                .set(unix_now().saturating_sub(checked) as i64);
            m.refresh
                .with_label_values(&[name])
                .set(feed.refresh.as_secs() as i64);
        }
        drop(feeds);
        drop(snap);
        tokio::time::sleep(TICK).await;
    }
}

/// Deletes copies (and half-written files) of feeds the config no longer names.
fn sweep_copies(state_dir: &std::path::Path, feeds: &[(&str, &Feed)]) {
    let Ok(dir) = std::fs::read_dir(copies_dir(state_dir)) else {
        return;
    };
    for entry in dir.flatten() {
        let path = entry.path();
        if !feeds.iter().any(|(_, f)| f.copy == path) {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Fetches one feed and applies what came; returns the wait before the next fetch.
async fn fetch_one(state: &AppState, name: &str, t: &mut Tracked) -> Duration {
    let feed = t.feed.clone();
    let retry = feed.refresh.min(RETRY);
    let same = t.same().cloned();
    let answer = fetch::get(
        &feed.url,
        feed.ca_file.as_deref(),
        same.as_ref().and_then(|m| m.etag.as_deref()),
        same.as_ref().and_then(|m| m.last_modified.as_deref()),
    )
    .await;
    let fetches = &state.metrics.feed.fetches;
    let taken = match answer {
        Ok(Answer::NotModified) => {
            let Some(mut meta) = same else {
                refused(
                    state,
                    name,
                    &feed,
                    Refusal::new("status", "304 with no copy held"),
                );
                return retry;
            };
            meta.checked = unix_now();
            if let Err(e) = copy::confirm(&feed.copy, &meta) {
                // The copy is gone or damaged: the next fetch asks for the whole list.
                t.meta = None;
                refused(state, name, &feed, Refusal::new("write", e.to_string()));
                return retry;
            }
            t.meta = Some(meta);
            fetches.with_label_values(&[name, "not_modified"]).inc();
            return feed.refresh;
        }
        Ok(Answer::Changed {
            body,
            content_type,
            etag,
            last_modified,
        }) => parse::entries(&body, content_type.as_deref())
            .and_then(|e| parse::checked(e, &feed, same.as_ref().map(|m| m.entries)))
            .map(|entries| (entries, etag, last_modified)),
        Err(r) => Err(r),
    };
    let (entries, etag, last_modified) = match taken {
        Ok(t) => t,
        Err(r) => {
            refused(state, name, &feed, r);
            return retry;
        }
    };
    let meta = Meta {
        url: feed.url.to_string(),
        etag,
        last_modified,
        checked: unix_now(),
        entries: entries.len(),
    };
    if let Err(e) = copy::write(&feed.copy, &meta, &entries) {
        refused(state, name, &feed, Refusal::new("write", e.to_string()));
        return retry;
    }
    t.meta = Some(meta);
    fetches.with_label_values(&[name, "updated"]).inc();
    match state.refresh_files() {
        Ok(()) => info!(list = name, entries = entries.len(), "feed updated"),
        Err(errors) => warn!(
            list = name,
            "feed saved but the lists do not load; the ones in force stay:\n{errors}"
        ),
    }
    feed.refresh
}

fn refused(state: &AppState, name: &str, feed: &Feed, r: Refusal) {
    state
        .metrics
        .feed
        .errors
        .with_label_values(&[name, r.reason])
        .inc();
    state
        .metrics
        .feed
        .fetches
        .with_label_values(&[name, "refused"])
        .inc();
    warn!(
        list = name,
        url = %crate::config::feed_origin(&feed.url),
        reason = r.reason,
        "feed not taken, the last good copy stays: {}",
        r.detail
    );
}
