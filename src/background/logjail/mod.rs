//! Log jails: a `[[jail]]` with `log` follows its files (`follow`) or the
//! systemd journal ([`journal`]) and counts the messages its `match` pattern finds, per
//! client (IPv6 per prefix), like a response jail counts responses; its bans are ordinary
//! temporary entries (durable, shared with the fleet, in `lookup`, erased by `forget`).
//!
//! Lines are read as the daemon wrote them ([`mod@line`]): the syslog prefix is parsed, `tags`
//! names the daemons whose messages count, and `match` sees the message alone. [`dry`] runs a
//! jail over a log without banning (`ipgate jail test`).
//!
//! Each file is followed from its end at start (a file that appears later, from its start),
//! polled every [`TICK`] on the blocking pool, at most [`BUDGET`] bytes per file per turn, in
//! lines of at most [`MAX_LINE`] bytes (a longer line is skipped), so neither a huge line nor
//! a burst of lines holds the proxy's threads or grows memory.

pub mod dry;
mod follow;
pub mod journal;
pub mod line;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::config::{Listener, LogSource};
use crate::decide::policy::table::CidrTable;
use crate::decide::policy::Verdict;
use crate::state::AppState;
use follow::Follower;
use line::{Matcher, Seen};

/// How often the files are looked at.
pub const TICK: Duration = Duration::from_millis(250);
/// Bytes read from one file per turn.
pub const BUDGET: usize = 4 << 20;
/// Longest line counted; longer ones are skipped whole.
pub const MAX_LINE: usize = 16 << 10;

/// One log jail's files and patterns.
struct Followed {
    matcher: Matcher,
    files: Vec<Follower>,
}

/// What one turn found for one jail.
struct Found {
    jail: String,
    lines: u64,
    /// What the jail made of each line that names a client.
    seen: Vec<Seen>,
    more: bool,
}

impl Followed {
    /// Reads what the files gained and matches it, on the blocking pool.
    fn poll(&mut self, jail: &str, through: &dyn Fn(IpAddr) -> bool) -> Found {
        let mut lines = Vec::new();
        let mut more = false;
        for f in &mut self.files {
            more |= f.poll(&mut lines);
        }
        let seen = lines
            .iter()
            .map(|line| self.matcher.line(line, through))
            .filter(|s| matches!(s, Seen::Counted(_)))
            .collect();
        Found {
            jail: jail.to_string(),
            lines: lines.len() as u64,
            seen,
            more,
        }
    }
}

/// The jails being followed: files, polled by [`run`]; journals, each in a task of its own
/// (journalctl is killed with it when the task is dropped).
#[derive(Default)]
struct Following {
    files: HashMap<String, (LogSource, Followed)>,
    journals: HashMap<String, (LogSource, Journaled)>,
}

struct Journaled(tokio::task::JoinHandle<()>);

impl Drop for Journaled {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Follows every log jail's files and journals until the process ends.
pub async fn run(state: Arc<AppState>) {
    let mut following = Following::default();
    loop {
        sync(&state, &mut following);
        if following.files.is_empty() {
            tokio::time::sleep(TICK * 4).await;
            continue;
        }
        let work = std::mem::take(&mut following.files);
        let snap = state.snapshot.load_full();
        let (back, found) = match tokio::task::spawn_blocking(move || {
            let mut work = work;
            let through = |ip: IpAddr| through_us(&snap.trusted, &snap.config.listeners, ip);
            let found: Vec<Found> = work
                .iter_mut()
                .map(|(name, (_, f))| f.poll(name, &through))
                .collect();
            (work, found)
        })
        .await
        {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "log jails: a turn failed");
                tokio::time::sleep(TICK).await;
                continue;
            }
        };
        following.files = back;
        let more = found.iter().any(|f| f.more);
        for f in found {
            count_all(&state, &f.jail, f.lines, f.seen);
        }
        if !more {
            tokio::time::sleep(TICK).await;
        }
    }
}

/// Follows what the config in force names: new jails and files start at the end of their
/// files (a journal after its saved cursor), changed patterns apply at once, jails no longer
/// named are let go.
fn sync(state: &Arc<AppState>, following: &mut Following) {
    let snap = state.snapshot.load();
    let wanted: HashMap<&str, &LogSource> = snap
        .config
        .jails
        .iter()
        .filter_map(|j| j.log.as_ref().map(|l| (j.name.as_str(), l)))
        .collect();
    let same = |name: &String, s: &LogSource| wanted.get(name.as_str()).is_some_and(|w| *w == s);
    following.journals.retain(|name, (s, _)| same(name, s));
    // A jail whose source changed keeps the files it still follows, where they were.
    let changed: Vec<String> = following
        .files
        .iter()
        .filter(|(name, (s, _))| !same(name, s))
        .map(|(name, _)| name.clone())
        .collect();
    let mut old: HashMap<String, Followed> = changed
        .into_iter()
        .filter_map(|name| following.files.remove(&name).map(|(_, f)| (name, f)))
        .collect();
    for (name, source) in wanted {
        if following.files.contains_key(name) || following.journals.contains_key(name) {
            continue;
        }
        let Ok(matcher) = Matcher::new(source) else {
            // The config check refuses these; nothing to follow.
            continue;
        };
        if let Some(journal) = &source.journal {
            let task = tokio::spawn(journal::follow(
                state.clone(),
                name.to_string(),
                journal.clone(),
                matcher,
            ));
            following
                .journals
                .insert(name.to_string(), (source.clone(), Journaled(task)));
            continue;
        }
        let mut kept = old.remove(name).map(|f| f.files).unwrap_or_default();
        let files = source
            .files
            .iter()
            .map(|p| match kept.iter().position(|f| &f.path == p) {
                Some(i) => kept.swap_remove(i),
                None => Follower::new(p.clone()),
            })
            .collect();
        info!(jail = name, files = ?source.files, "following log files");
        following.files.insert(
            name.to_string(),
            (source.clone(), Followed { matcher, files }),
        );
    }
}

/// Whether an address a line names as the client's way in (`<PROXY>`) is this host or a
/// trusted proxy: loopback, a listener's own address, or `gateway.trusted_proxies`.
pub fn through_us(trusted: &CidrTable, listeners: &[Listener], ip: IpAddr) -> bool {
    ip.is_loopback() || trusted.contains(ip) || listeners.iter().any(|l| l.addr.ip() == ip)
}

fn count_all(state: &Arc<AppState>, jail: &str, lines: u64, seen: Vec<Seen>) {
    state
        .metrics
        .log_lines
        .with_label_values(&[jail])
        .inc_by(lines);
    for s in seen {
        count_one(state, jail, s);
    }
}

/// Counts one failure against the jail (allow wins, an already-blocked client changes
/// nothing, a trusted proxy is never jailed for its clients).
fn count_one(state: &Arc<AppState>, jail: &str, seen: Seen) {
    let Seen::Counted(ip) = seen else { return };
    let snap = state.snapshot.load();
    let Some(jail) = snap.jails.get(jail) else {
        return;
    };
    match snap.policy.decide(&state.temp, ip) {
        Verdict::Allow(_) | Verdict::Block(_) => return,
        Verdict::Pass => {}
    }
    if snap.trusted.contains(ip) {
        return;
    }
    crate::serve::admission::count_offense(state, &snap, jail, ip);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LogFormat;

    fn source(pattern: &str) -> LogSource {
        LogSource {
            files: vec![],
            journal: None,
            tags: vec![],
            format: LogFormat::Auto,
            pattern: pattern.into(),
            ignore: None,
        }
    }

    fn address(m: &Matcher, line: &str) -> Option<IpAddr> {
        match m.line(line, &|_| false) {
            Seen::Counted(ip) => Some(ip),
            _ => None,
        }
    }

    #[test]
    fn the_address_is_taken_from_where_addr_stands() {
        let m = Matcher::new(&source(r"Failed password for .* from <ADDR> port \d+")).unwrap();
        let line = "Dec  1 10:00:00 web1 sshd[812]: Failed password for root from 203.0.113.7 port 51234 ssh2";
        assert_eq!(address(&m, line), Some("203.0.113.7".parse().unwrap()));
        let v6 = "sshd[9]: Failed password for x from 2001:db8::17 port 2 ssh2";
        assert_eq!(address(&m, v6), Some("2001:db8::17".parse().unwrap()));
        let mapped = "sshd[9]: Failed password for x from ::ffff:198.51.100.4 port 2 ssh2";
        assert_eq!(address(&m, mapped), Some("198.51.100.4".parse().unwrap()));
        assert_eq!(
            address(&m, "sshd[9]: Failed password for x from 999.1.1.1 port 2"),
            None
        );
        assert_eq!(
            address(&m, "sshd[9]: Accepted password for x from 10.0.0.1 port 2"),
            None
        );
        let mut s = source(r"Failed password for .* from <ADDR> port \d+");
        s.ignore = Some("for invalid user".into());
        let m = Matcher::new(&s).unwrap();
        let line = "sshd[9]: Failed password for invalid user a from 10.0.0.1 port 2 ssh2";
        assert_eq!(m.line(line, &|_| false), Seen::Ignored);
    }

    #[test]
    fn a_pattern_needs_one_addr() {
        assert!(source("Failed password").regex().is_err());
        assert!(source("<ADDR> and <ADDR>").regex().is_err());
        assert!(source("from <ADDR> (").regex().is_err());
        assert!(source("<PROXY> <PROXY> <ADDR>").regex().is_err());
    }

    #[test]
    fn anchored_means_both_ends() {
        assert!(source("^a <ADDR>$").anchored());
        assert!(!source("a <ADDR>$").anchored());
        assert!(!source("^a <ADDR>").anchored());
        assert!(!source(r"^a <ADDR>\$").anchored());
    }
}
