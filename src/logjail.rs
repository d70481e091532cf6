//! Log jails (SPEC 20): a `[[jail]]` with `log` follows its files and counts the lines its
//! `match` pattern finds, per client (IPv6 per prefix), like a response jail counts
//! responses; its bans are ordinary temporary entries (durable, shared with the fleet, in
//! `lookup`, erased by `forget`).
//!
//! Each file is followed from its end at start (a file that appears later, from its start),
//! through rename rotation (the old file is read to its end, then the new one from its start)
//! and copytruncate (a file that got shorter, or whose first bytes changed, is read again from
//! its start). Files are polled every [`TICK`] on the blocking pool, at most [`BUDGET`] bytes
//! per file per turn, in lines of at most [`MAX_LINE`] bytes (a longer line is skipped), so
//! neither a huge line nor a burst of lines holds the proxy's threads or grows memory.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::config::LogSource;
use crate::policy::Verdict;
use crate::state::AppState;

/// How often the files are looked at.
pub const TICK: Duration = Duration::from_millis(250);
/// Bytes read from one file per turn.
pub const BUDGET: usize = 4 << 20;
/// Longest line counted; longer ones are skipped whole.
pub const MAX_LINE: usize = 16 << 10;
/// Bytes of a file's start remembered to tell a rewritten file (copytruncate) from a grown one.
const HEAD: usize = 256;

/// One followed file.
struct Follower {
    path: PathBuf,
    file: Option<File>,
    /// (device, inode) of the open file.
    id: (u64, u64),
    offset: u64,
    head: Vec<u8>,
    /// An incomplete last line, waiting for its end.
    partial: Vec<u8>,
    /// Inside a line longer than `MAX_LINE`: dropped up to its newline.
    skipping: bool,
    /// Whether the file was looked at once: a file there at the first look is followed from
    /// its end; one that appears later, from its start.
    seen: bool,
}

impl Follower {
    fn new(path: PathBuf) -> Follower {
        Follower {
            path,
            file: None,
            id: (0, 0),
            offset: 0,
            head: Vec::new(),
            partial: Vec::new(),
            skipping: false,
            seen: false,
        }
    }

    /// Reads what was written since the last turn: complete lines into `lines`. Returns
    /// whether the budget ran out (more is waiting).
    fn poll(&mut self, lines: &mut Vec<String>) -> bool {
        let first_look = !self.seen;
        self.seen = true;
        let current = std::fs::metadata(&self.path).ok();
        if let (Some(_), Some(meta)) = (&self.file, &current) {
            if (meta.dev(), meta.ino()) != self.id {
                // Renamed away and a new file made: finish the old one, then the new.
                let more = self.read(lines);
                if more {
                    return true;
                }
                self.flush_partial(lines);
                self.file = None;
            } else if meta.len() < self.offset || !self.same_head() {
                // Truncated (copytruncate) or rewritten: from the start again.
                self.offset = 0;
                self.head.clear();
                self.partial.clear();
                self.skipping = false;
            }
        }
        if self.file.is_none() {
            if current.is_none() {
                return false;
            }
            let Ok(mut file) = File::open(&self.path) else {
                return false;
            };
            // What was opened, not what the path named a moment before (a rotation between
            // the two would count the new file twice).
            let Ok(meta) = file.metadata() else {
                return false;
            };
            self.id = (meta.dev(), meta.ino());
            self.offset = if first_look { meta.len() } else { 0 };
            // Its first bytes now, so a rewrite is seen even of a file followed from its end.
            self.head = vec![0u8; HEAD.min(self.offset as usize)];
            if file.read_exact(&mut self.head).is_err() {
                self.head.clear();
            }
            self.file = Some(file);
            self.partial.clear();
            self.skipping = false;
        }
        self.read(lines)
    }

    /// Whether the file still starts with the bytes it started with.
    fn same_head(&mut self) -> bool {
        let Some(file) = &mut self.file else {
            return true;
        };
        if self.head.is_empty() {
            return true;
        }
        let mut now = vec![0u8; self.head.len()];
        let read = file
            .seek(SeekFrom::Start(0))
            .and_then(|_| file.read_exact(&mut now));
        read.is_err() || now == self.head
    }

    /// Reads from the offset, at most `BUDGET` bytes; returns whether more is waiting.
    fn read(&mut self, lines: &mut Vec<String>) -> bool {
        let Some(mut file) = self.file.take() else {
            return false;
        };
        let more = self.read_from(&mut file, lines);
        self.file = Some(file);
        more
    }

    fn read_from(&mut self, file: &mut File, lines: &mut Vec<String>) -> bool {
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return false;
        }
        let mut buf = vec![0u8; 64 << 10];
        let mut total = 0;
        while total < BUDGET {
            let n = match file.read(&mut buf) {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            if self.offset < HEAD as u64 && self.head.len() as u64 == self.offset {
                let take = (HEAD as u64 - self.offset).min(n as u64) as usize;
                self.head.extend_from_slice(&buf[..take]);
            }
            self.offset += n as u64;
            total += n;
            self.split(&buf[..n], lines);
        }
        true
    }

    /// Splits bytes into lines, keeping an unfinished one and skipping overlong ones.
    fn split(&mut self, mut bytes: &[u8], lines: &mut Vec<String>) {
        while let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            let (line, rest) = bytes.split_at(nl);
            bytes = &rest[1..];
            if self.skipping {
                self.skipping = false;
                continue;
            }
            if self.partial.len() + line.len() > MAX_LINE {
                self.partial.clear();
                continue;
            }
            self.partial.extend_from_slice(line);
            lines.push(String::from_utf8_lossy(&self.partial).into_owned());
            self.partial.clear();
        }
        if self.skipping {
            return;
        }
        if self.partial.len() + bytes.len() > MAX_LINE {
            self.partial.clear();
            self.skipping = true;
        } else {
            self.partial.extend_from_slice(bytes);
        }
    }

    /// A rotated file's last line without a newline still counts.
    fn flush_partial(&mut self, lines: &mut Vec<String>) {
        if !self.partial.is_empty() && !self.skipping {
            lines.push(String::from_utf8_lossy(&self.partial).into_owned());
        }
        self.partial.clear();
        self.skipping = false;
    }
}

/// One log jail's files and patterns.
struct Followed {
    source: LogSource,
    matcher: regex::Regex,
    ignore: Option<regex::Regex>,
    files: Vec<Follower>,
}

/// What one turn found for one jail.
struct Found {
    jail: String,
    lines: u64,
    addresses: Vec<IpAddr>,
    more: bool,
}

impl Followed {
    fn poll(&mut self, jail: &str) -> Found {
        let mut found = Found {
            jail: jail.to_string(),
            lines: 0,
            addresses: Vec::new(),
            more: false,
        };
        let mut lines = Vec::new();
        for f in &mut self.files {
            found.more |= f.poll(&mut lines);
        }
        found.lines = lines.len() as u64;
        for line in &lines {
            if let Some(ip) = address(&self.matcher, self.ignore.as_ref(), line) {
                found.addresses.push(ip);
            }
        }
        found
    }
}

/// The client address a counted line names: the pattern matches, `ignore` does not, and the
/// `<ADDR>` part is an address (an IPv4-mapped IPv6 one counts as IPv4).
pub fn address(
    matcher: &regex::Regex,
    ignore: Option<&regex::Regex>,
    line: &str,
) -> Option<IpAddr> {
    let caps = matcher.captures(line)?;
    if ignore.is_some_and(|i| i.is_match(line)) {
        return None;
    }
    let text = caps.name("addr")?.as_str();
    let ip: IpAddr = text.parse().ok()?;
    Some(ip.to_canonical())
}

/// Follows every log jail's files until the process ends.
pub async fn run(state: Arc<AppState>) {
    let mut followed: HashMap<String, Followed> = HashMap::new();
    loop {
        sync(&state, &mut followed);
        if followed.is_empty() {
            tokio::time::sleep(TICK * 4).await;
            continue;
        }
        let mut work = std::mem::take(&mut followed);
        let (back, found) = match tokio::task::spawn_blocking(move || {
            let found: Vec<Found> = work.iter_mut().map(|(name, f)| f.poll(name)).collect();
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
        followed = back;
        let more = found.iter().any(|f| f.more);
        for f in found {
            count(&state, f);
        }
        if !more {
            tokio::time::sleep(TICK).await;
        }
    }
}

/// Follows what the config in force names: new jails and files start at the end of their
/// files, changed patterns apply at once, files no longer named are let go.
fn sync(state: &AppState, followed: &mut HashMap<String, Followed>) {
    let snap = state.snapshot.load();
    let wanted: HashMap<&str, &LogSource> = snap
        .config
        .jails
        .iter()
        .filter_map(|j| j.log.as_ref().map(|l| (j.name.as_str(), l)))
        .collect();
    followed.retain(|name, _| wanted.contains_key(name.as_str()));
    for (name, source) in wanted {
        if followed.get(name).is_some_and(|f| &f.source == source) {
            continue;
        }
        let (Ok(matcher), Ok(ignore)) = (source.regex(), source.ignore_regex()) else {
            // The config check refuses these; nothing to follow.
            continue;
        };
        let mut old = followed.remove(name).map(|f| f.files).unwrap_or_default();
        let files = source
            .files
            .iter()
            .map(|p| match old.iter().position(|f| &f.path == p) {
                Some(i) => old.swap_remove(i),
                None => Follower::new(p.clone()),
            })
            .collect();
        info!(jail = name, files = ?source.files, "following log files");
        followed.insert(
            name.to_string(),
            Followed {
                source: source.clone(),
                matcher,
                ignore,
                files,
            },
        );
    }
}

/// Counts one turn's lines and the addresses they name against the jail.
fn count(state: &Arc<AppState>, found: Found) {
    let snap = state.snapshot.load();
    state
        .metrics
        .log_lines
        .with_label_values(&[&found.jail])
        .inc_by(found.lines);
    let Some(jail) = snap.jails.get(&found.jail) else {
        return;
    };
    for ip in found.addresses {
        match snap.policy.decide(&state.temp, ip) {
            // Allow wins: never counted. Already blocked: the line changes nothing.
            Verdict::Allow(_) | Verdict::Block(_) => continue,
            Verdict::Pass => {}
        }
        if snap.trusted.contains(ip) {
            continue;
        }
        crate::admission::count_offense(state, &snap, jail, ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(pattern: &str) -> LogSource {
        LogSource {
            files: vec![],
            pattern: pattern.into(),
            ignore: None,
        }
    }

    #[test]
    fn the_address_is_taken_from_where_addr_stands() {
        let re = source(r"Failed password for .* from <ADDR> port \d+")
            .regex()
            .unwrap();
        let line = "Dec  1 10:00:00 web1 sshd[812]: Failed password for root from 203.0.113.7 port 51234 ssh2";
        assert_eq!(
            address(&re, None, line),
            Some("203.0.113.7".parse().unwrap())
        );
        let v6 = "sshd[9]: Failed password for x from 2001:db8::17 port 2 ssh2";
        assert_eq!(
            address(&re, None, v6),
            Some("2001:db8::17".parse().unwrap())
        );
        let mapped = "sshd[9]: Failed password for x from ::ffff:198.51.100.4 port 2 ssh2";
        assert_eq!(
            address(&re, None, mapped),
            Some("198.51.100.4".parse().unwrap())
        );
        assert_eq!(
            address(
                &re,
                None,
                "sshd[9]: Failed password for x from 999.1.1.1 port 2"
            ),
            None
        );
        assert_eq!(
            address(
                &re,
                None,
                "sshd[9]: Accepted password for x from 10.0.0.1 port 2"
            ),
            None
        );
        let ignore = regex::Regex::new("for invalid user").unwrap();
        let line = "sshd[9]: Failed password for invalid user a from 10.0.0.1 port 2 ssh2";
        assert_eq!(address(&re, Some(&ignore), line), None);
    }

    #[test]
    fn a_pattern_needs_one_addr() {
        assert!(source("Failed password").regex().is_err());
        assert!(source("<ADDR> and <ADDR>").regex().is_err());
        assert!(source("from <ADDR> (").regex().is_err());
    }

    #[test]
    fn lines_are_split_with_overlong_ones_skipped() {
        let mut f = Follower::new(PathBuf::new());
        let mut lines = Vec::new();
        f.split(b"one\ntw", &mut lines);
        f.split(b"o\n", &mut lines);
        f.split(&vec![b'x'; MAX_LINE + 1], &mut lines);
        f.split(b"xx\nthree\n", &mut lines);
        assert_eq!(lines, vec!["one", "two", "three"]);
    }
}
