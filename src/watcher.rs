//! Watches the list files and certificate files the config in force names: when one changes,
//! they are all re-read with that config (not the config file, which changes only by reload)
//! and swapped in, so appending to a list or renewing a certificate needs no signal. Parent
//! directories are watched, so rename-replace and certbot's symlink swaps are seen; bursts of
//! events are debounced.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::state::AppState;

/// Quiet time after the last event before files are re-read.
const DEBOUNCE: Duration = Duration::from_millis(300);
/// How often the set of watched files is compared with the config in force.
const RESYNC: Duration = Duration::from_secs(2);

/// Files to watch, by their (canonical) directory.
fn watched_files(state: &AppState) -> HashMap<PathBuf, HashSet<OsString>> {
    let snap = state.snapshot.load();
    let c = &snap.config;
    let files = c
        .lists
        .iter()
        .flat_map(|l| l.files.iter())
        .chain(c.tls.certificates.iter().flat_map(|p| [&p.cert, &p.key]));
    let mut by_dir: HashMap<PathBuf, HashSet<OsString>> = HashMap::new();
    for f in files {
        let (Some(dir), Some(name)) = (f.parent(), f.file_name()) else {
            continue;
        };
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(dir) = dir.canonicalize() {
            by_dir.entry(dir).or_default().insert(name.to_os_string());
        }
    }
    by_dir
}

/// Runs until the process ends: watches, debounces, re-reads.
pub async fn run(state: Arc<AppState>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<PathBuf>();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(event) = res {
            for p in event.paths {
                let _ = tx.send(p);
            }
        }
    });
    let mut watcher: RecommendedWatcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, "cannot watch list and certificate files; changes need a reload");
            return;
        }
    };
    let mut watched: HashMap<PathBuf, HashSet<OsString>> = HashMap::new();
    loop {
        // Keep the watches in line with the config in force (reloads change it).
        let wanted = watched_files(&state);
        for dir in watched.keys().filter(|d| !wanted.contains_key(*d)) {
            let _ = watcher.unwatch(dir);
        }
        for dir in wanted.keys().filter(|d| !watched.contains_key(*d)) {
            if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
                warn!(dir = %dir.display(), error = %e, "cannot watch directory");
            }
        }
        watched = wanted;

        let first = tokio::select! {
            p = rx.recv() => match p {
                Some(p) => p,
                None => return,
            },
            _ = tokio::time::sleep(RESYNC) => continue,
        };
        let mut relevant = is_watched(&watched, &first);
        // Debounce: wait for a quiet moment, taking what else arrives.
        loop {
            match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                Ok(Some(p)) => relevant |= is_watched(&watched, &p),
                Ok(None) => return,
                Err(_) => break,
            }
        }
        if relevant {
            match state.refresh_files() {
                Ok(()) => info!("list or certificate files changed: re-read"),
                Err(errors) => warn!(
                    "list or certificate files changed but do not load; the previous ones stay:\n{errors}"
                ),
            }
        }
    }
}

fn is_watched(watched: &HashMap<PathBuf, HashSet<OsString>>, path: &Path) -> bool {
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => watched.get(dir).is_some_and(|names| names.contains(name)),
        _ => false,
    }
}
