//! A log jail on the systemd journal: Debian 12 and 13 keep their daemons' logs
//! there alone unless rsyslog is installed. The journal is read by `journalctl --follow
//! --output=json` (its own reader, not one of ours), filtered by unit (the journal's trusted
//! `_SYSTEMD_UNIT`) or syslog identifier. The jail's `match` sees `MESSAGE`, its `tags` the
//! entry's `SYSLOG_IDENTIFIER`. The cursor of the last entry read is saved in `state_dir`, so
//! a restart resumes after it (through rotation: journalctl follows the folder's files).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tracing::{info, warn};

use super::follow::Lines;
use super::line::Matcher;
use crate::config::Journal;
use crate::state::AppState;

/// How often the cursor is written while entries come in. An entry longer than
/// [`super::MAX_LINE`] (as JSON) is skipped, as a line of a file is.
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// One journal entry as a jail sees it.
pub struct Entry {
    pub tag: Option<String>,
    pub message: String,
    pub cursor: Option<String>,
}

/// Parses one line of `journalctl --output=json`. `MESSAGE` may be a string or, when it is
/// not UTF-8, an array of bytes.
pub fn parse(line: &str) -> Option<Entry> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let field = |name: &str| v.get(name).and_then(|f| f.as_str()).map(str::to_string);
    let message = match v.get("MESSAGE")? {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(bytes) => {
            let raw: Vec<u8> = bytes
                .iter()
                .filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                .collect();
            String::from_utf8_lossy(&raw).into_owned()
        }
        _ => return None,
    };
    Some(Entry {
        tag: field("SYSLOG_IDENTIFIER").or_else(|| field("_COMM")),
        message,
        cursor: field("__CURSOR"),
    })
}

/// The `journalctl` command for a jail's journal: following, or reading what is there.
pub fn command(journal: &Journal, follow: bool, after: Option<&str>) -> Command {
    let mut cmd = Command::new("journalctl");
    cmd.arg("--output=json").arg("--no-pager").arg("--quiet");
    if let Some(dir) = &journal.directory {
        cmd.arg(format!("--directory={}", dir.display()));
    }
    for u in &journal.units {
        cmd.arg(format!("--unit={u}"));
    }
    for i in &journal.identifiers {
        cmd.arg(format!("--identifier={i}"));
    }
    if follow {
        cmd.arg("--follow");
        match after {
            Some(c) => cmd.arg(format!("--after-cursor={c}")),
            // New entries only, as a followed file is read from its end at first.
            None => cmd.arg("--lines=0"),
        };
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Where a jail's journal cursor is kept.
pub fn cursor_file(state_dir: &Path, jail: &str) -> PathBuf {
    state_dir.join("journal").join(format!("{jail}.cursor"))
}

fn save_cursor(path: &Path, cursor: &str) {
    let tmp = path.with_extension("tmp");
    let written = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&tmp, cursor))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        warn!(file = %path.display(), error = %e, "cannot save the journal cursor");
    }
}

/// Follows one jail's journal until the task is dropped (on reload or stop; journalctl is
/// killed with it). A journalctl that ends (a folder not there yet, a cursor the journal no
/// longer has) is started again after a pause; a cursor it refused is dropped.
pub async fn follow(state: Arc<AppState>, jail: String, journal: Journal, matcher: Matcher) {
    let state_dir = state.snapshot.load().config.gateway.state_dir.clone();
    let cursor_path = cursor_file(&state_dir, &jail);
    let mut pause = Duration::from_secs(1);
    loop {
        let cursor = std::fs::read_to_string(&cursor_path)
            .ok()
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty());
        let mut child = match command(&journal, true, cursor.as_deref()).spawn() {
            Ok(c) => c,
            Err(e) => {
                warn!(jail, error = %e, "log jail: cannot run journalctl (apt install systemd)");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(60));
                continue;
            }
        };
        info!(jail, units = ?journal.units, identifiers = ?journal.identifiers,
              resumed = cursor.is_some(), "following the journal");
        let read = read_entries(&state, &jail, &matcher, &mut child, &cursor_path).await;
        let status = child.wait().await.ok();
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            use tokio::io::AsyncReadExt;
            let _ = (&mut e).take(4096).read_to_string(&mut stderr).await;
        }
        if read == 0 && cursor.is_some() && status.is_some_and(|s| !s.success()) {
            // The journal no longer has that entry (vacuumed): from the end again.
            warn!(
                jail,
                error = stderr.trim(),
                "the saved journal cursor was refused; following from now"
            );
            let _ = std::fs::remove_file(&cursor_path);
        } else {
            warn!(
                jail,
                error = stderr.trim(),
                "journalctl ended; starting it again"
            );
        }
        if read > 0 {
            pause = Duration::from_secs(1);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}

/// Reads entries until journalctl's output ends; returns how many were read. Each read's
/// entries are counted together, and the cursor of the last one is saved when a burst ends
/// (a read that did not fill the buffer) or at most every [`SAVE_EVERY`] during one.
async fn read_entries(
    state: &Arc<AppState>,
    jail: &str,
    matcher: &Matcher,
    child: &mut tokio::process::Child,
    cursor_path: &Path,
) -> u64 {
    let Some(mut stdout) = child.stdout.take() else {
        return 0;
    };
    let mut buf = vec![0u8; 64 << 10];
    let mut split = Lines::default();
    let mut read = 0u64;
    let mut last: Option<String> = None;
    let mut saved_at = tokio::time::Instant::now();
    loop {
        let n = match stdout.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut lines = Vec::new();
        split.split(&buf[..n], &mut lines);
        read += lines.len() as u64;
        let snap = state.snapshot.load();
        let through = |ip| super::through_us(&snap.trusted, &snap.config.listeners, ip);
        let mut seen = Vec::new();
        for entry in lines.iter().filter_map(|l| parse(l)) {
            seen.push(matcher.message(entry.tag.as_deref(), &entry.message, &through));
            last = entry.cursor.or(last);
        }
        super::count_all(state, jail, lines.len() as u64, seen);
        if n < buf.len() || saved_at.elapsed() >= SAVE_EVERY {
            if let Some(c) = last.take() {
                save_cursor(cursor_path, &c);
            }
            saved_at = tokio::time::Instant::now();
        }
    }
    if let Some(c) = last {
        save_cursor(cursor_path, &c);
    }
    read
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_gives_its_identifier_message_and_cursor() {
        let e = parse(r#"{"__CURSOR":"s=1;i=2","MESSAGE":"Failed password for root from 192.0.2.5 port 1 ssh2","SYSLOG_IDENTIFIER":"sshd-session","_COMM":"sshd-session","_PID":"812"}"#).unwrap();
        assert_eq!(e.tag.as_deref(), Some("sshd-session"));
        assert_eq!(e.cursor.as_deref(), Some("s=1;i=2"));
        assert!(e.message.starts_with("Failed password"));
        let bytes = parse(r#"{"MESSAGE":[104,105,255],"_COMM":"x"}"#).unwrap();
        assert_eq!(
            (bytes.message.as_str(), bytes.tag.as_deref()),
            ("hi\u{fffd}", Some("x"))
        );
        assert!(parse("not json").is_none());
        assert!(parse(r#"{"_COMM":"x"}"#).is_none());
    }
}
