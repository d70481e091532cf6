//! Watches the list files and certificate files the config in force names: when one changes,
//! they are all re-read with that config (not the config file, which changes only by reload)
//! and swapped in, so appending to a list or renewing a certificate needs no signal. Parent
//! directories are watched, so rename-replace and certbot's symlink swaps are seen; events for
//! other files there are dropped on notify's thread, and bursts of events are debounced.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::state::AppState;

/// Quiet time after the last event before files are re-read.
const DEBOUNCE: Duration = Duration::from_millis(300);
/// How often the set of watched files is compared with the config in force.
const RESYNC: Duration = Duration::from_secs(2);

/// File names to watch, by their (canonical) directory.
type Watched = HashMap<PathBuf, HashSet<OsString>>;

/// The files the config in force names, by directory.
fn watched_files(state: &AppState) -> Watched {
    let snap = state.snapshot.load();
    let mut by_dir = Watched::new();
    for f in snap.config.watched_files() {
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
    // The files watched now, shared with notify's thread, which filters there: events for
    // other files in a watched directory (a log written beside a list) neither queue up nor
    // keep the debounce below from ever ending.
    let watched: Arc<Mutex<Watched>> = Arc::default();
    // One pending signal is enough: a full channel means a re-read is already due.
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let watcher = notify::recommended_watcher(event_handler(watched.clone(), tx));
    let mut watcher: RecommendedWatcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, "cannot watch list and certificate files; changes need a reload");
            return;
        }
    };
    let mut dirs: HashSet<PathBuf> = HashSet::new();
    loop {
        // Keep the watches in line with the config in force (reloads change it).
        let wanted = watched_files(&state);
        let wanted_dirs: HashSet<PathBuf> = wanted.keys().cloned().collect();
        let before = std::mem::replace(
            &mut *watched.lock().unwrap_or_else(|p| p.into_inner()),
            wanted.clone(),
        );
        for dir in dirs.difference(&wanted_dirs) {
            let _ = watcher.unwatch(dir);
        }
        for dir in wanted_dirs.difference(&dirs) {
            if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
                warn!(dir = %dir.display(), error = %e, "cannot watch directory");
            }
        }
        dirs = wanted_dirs;
        // A file newly watched (a reload named it up to RESYNC ago) may have changed between
        // its read and its watch, when no event could tell: compare it with its read.
        let missed = before != wanted && state.snapshot.load().files_changed();
        if !missed {
            tokio::select! {
                r = rx.recv() => if r.is_none() { return },
                _ = tokio::time::sleep(RESYNC) => continue,
            }
        }
        // Debounce: wait until the watched files have been quiet for a moment.
        loop {
            match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                Ok(Some(())) => {}
                Ok(None) => return,
                Err(_) => break,
            }
        }
        match state.refresh_files() {
            Ok(()) => info!("list or certificate files changed: re-read"),
            Err(errors) => warn!(
                "list or certificate files changed but do not load; the previous ones stay:\n{errors}"
            ),
        }
    }
}

/// What notify's thread runs for each event: asks for a re-read when the event calls for one
/// (one pending signal is enough: a full channel means a re-read is already due).
fn event_handler(
    watched: Arc<Mutex<Watched>>,
    tx: mpsc::Sender<()>,
) -> impl FnMut(notify::Result<notify::Event>) + Send + 'static {
    move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        if calls_for_reread(&watched, &event) {
            let _ = tx.try_send(());
        }
    }
}

/// A change to a watched file, or a rescan notice: events were lost (the kernel's queue
/// overflowed), so any file may have changed and a re-read is due though the notice names no
/// file. Events for other files are dropped here, on notify's thread, and so are accesses
/// (notify reports opens and closes without a write): the re-read itself opens every file, so
/// counting those would re-read again and again, and so would any other reader's (a backup,
/// a second gateway on the same lists).
fn calls_for_reread(watched: &Mutex<Watched>, event: &notify::Event) -> bool {
    event.need_rescan()
        || (!matches!(event.kind, notify::EventKind::Access(_)) && {
            let w = watched.lock().unwrap_or_else(|p| p.into_inner());
            event.paths.iter().any(|p| is_watched(&w, p))
        })
}

fn is_watched(watched: &Watched, path: &Path) -> bool {
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => watched.get(dir).is_some_and(|names| names.contains(name)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{DataChange, Flag, ModifyKind};
    use notify::{Event, EventKind};

    fn watching(dir: &str, names: &[&str]) -> Arc<Mutex<Watched>> {
        let mut w = Watched::new();
        w.insert(
            PathBuf::from(dir),
            names.iter().map(|n| OsString::from(*n)).collect(),
        );
        Arc::new(Mutex::new(w))
    }

    /// What notify's inotify backend sends on IN_Q_OVERFLOW: no path, the Rescan flag.
    fn rescan() -> Event {
        Event::new(EventKind::Other).set_flag(Flag::Rescan)
    }

    /// Regression (27253e6): a rescan notice names no file, so the path filter alone dropped it
    /// and the events lost in the overflow were never made up for.
    #[test]
    fn a_rescan_notice_asks_for_a_reread_though_it_names_no_file() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut handle = event_handler(watching("/srv/lists", &["drop.txt"]), tx);
        let ev = rescan();
        assert!(ev.paths.is_empty() && ev.need_rescan());
        handle(Ok(ev));
        assert!(
            rx.try_recv().is_ok(),
            "a rescan notice (events lost) did not ask for a re-read"
        );
    }

    #[test]
    fn only_watched_files_and_rescans_ask_for_a_reread() {
        let w = watching("/srv/lists", &["drop.txt"]);
        let modify = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        let on = |p: &str| Event::new(modify).add_path(PathBuf::from(p));
        assert!(calls_for_reread(&w, &on("/srv/lists/drop.txt")));
        assert!(!calls_for_reread(&w, &on("/srv/lists/busy.log")));
        assert!(!calls_for_reread(&w, &on("/srv/other/drop.txt")));
        assert!(
            !calls_for_reread(&w, &Event::new(EventKind::Other)),
            "pathless, no flag"
        );
        assert!(calls_for_reread(&w, &rescan()));
        // Reading the list (ipgate's own re-read, or anyone's) is no change.
        use notify::event::{AccessKind, AccessMode};
        for access in [
            AccessKind::Open(AccessMode::Any),
            AccessKind::Close(AccessMode::Read),
            AccessKind::Read,
        ] {
            let ev = Event::new(EventKind::Access(access)).add_path("/srv/lists/drop.txt".into());
            assert!(!calls_for_reread(&w, &ev), "{access:?}");
        }
        let written = EventKind::Access(AccessKind::Close(AccessMode::Write));
        let ev = Event::new(written).add_path("/srv/lists/drop.txt".into());
        assert!(
            !calls_for_reread(&w, &ev),
            "a close after writing comes with a Modify"
        );
        // Before the first resync nothing is watched yet; a rescan still asks.
        assert!(calls_for_reread(&Mutex::new(Watched::new()), &rescan()));
    }

    #[test]
    fn a_handler_with_a_reread_already_due_drops_the_signal() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut handle = event_handler(watching("/srv/lists", &["drop.txt"]), tx);
        let modify = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        handle(Ok(
            Event::new(modify).add_path(PathBuf::from("/srv/lists/drop.txt"))
        ));
        handle(Ok(rescan()));
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_err(), "one pending signal is enough");
    }
}
