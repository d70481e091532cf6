//! `[[jail]]`: response jails and log jails (files or the journal, tags, patterns), checked
//! and compiled.

use std::path::Path;

use super::compile::host_key;
use super::raw::*;
use super::report::Report;
use super::values::*;
use super::*;

pub(super) fn jails(r: &mut Report, base: &Path, raw: &[RawJail], privacy: &Privacy) -> Vec<Jail> {
    let mut jails: Vec<Jail> = Vec::new();
    for (i, j) in raw.iter().enumerate() {
        let key = format!("jail[{i}]");
        let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if j.name.is_empty() || !j.name.chars().all(plain) {
            // It names metrics, store keys and fleet keys (`ipgate:offense:JAIL:TARGET`).
            r.key(
                &format!("{key}.name"),
                format!("'{}': letters, digits, '-', '_' and '.' only", j.name),
            );
        }
        if jails.iter().any(|o| o.name == j.name) {
            r.key(
                &format!("{key}.name"),
                format!("jail '{}' is defined twice", j.name),
            );
        }
        let mut jail = jail(r, &key, j, privacy);
        jail.log = j.log.as_ref().map(|l| log_source(r, &key, base, j, l));
        if j.challenge {
            challenge_keys(r, &key, j);
        }
        if j.log.is_none() && j.journal.is_some() {
            r.key(
                &format!("{key}.journal"),
                "a journal is read by a log jail: give log = { match = ... } beside it",
            );
        }
        jails.push(jail);
    }
    jails
}

fn jail(r: &mut Report, key: &str, j: &RawJail, privacy: &Privacy) -> Jail {
    let method = j.method.as_deref().and_then(|m| {
        http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
            .map_err(|_| r.key(&format!("{key}.method"), format!("'{m}' is not a method")))
            .ok()
    });
    if j.hits == 0 || j.hits > MAX_HITS {
        r.key(
            &format!("{key}.hits"),
            format!("must be between 1 and {MAX_HITS}"),
        );
    }
    // A login form (a method other than GET or HEAD) gets one attempt in flight per client;
    // a jail on page views has no cap unless it asks for one.
    let login = method
        .as_ref()
        .is_some_and(|m| *m != http::Method::GET && *m != http::Method::HEAD);
    let concurrency = match j.concurrency {
        Some(0) => u32::MAX,
        Some(n) => n,
        None if login => 1,
        None => u32::MAX,
    };
    for (k, s) in j.status.iter().enumerate() {
        if !(100..=599).contains(s) {
            r.key(
                &format!("{key}.status[{k}]"),
                format!("{s} is not an HTTP status"),
            );
        }
    }
    let ban_factor = j.ban_factor.unwrap_or(BAN_FACTOR);
    if !(1.0..=100.0).contains(&ban_factor) {
        r.key(
            &format!("{key}.ban_factor"),
            "must be between 1.0 and 100.0",
        );
    }
    let window = required_dur(r, &format!("{key}.window"), &j.window);
    if window > privacy.max_retention {
        r.key(
            &format!("{key}.window"),
            "longer than privacy.max_retention: counters would outlive the retention promise",
        );
    }
    Jail {
        name: j.name.clone(),
        method,
        path: match_path(r, &format!("{key}.path"), j.path.as_deref().unwrap_or("/")),
        hosts: j.hosts.iter().map(|h| host_key(h)).collect(),
        location: j.location.clone(),
        status: j.status.clone(),
        hits: j.hits,
        window,
        ban: required_dur(r, &format!("{key}.ban"), &j.ban),
        ban_factor,
        max_ban: dur(r, &format!("{key}.max_ban"), j.max_ban.as_deref(), MAX_BAN),
        dry_run: j.dry_run,
        site_scoped: match j.scope.as_deref() {
            None | Some("global") => false,
            Some("site") => true,
            Some(other) => {
                r.key(
                    &format!("{key}.scope"),
                    format!("'{other}': \"global\" or \"site\""),
                );
                false
            }
        },
        concurrency,
        log: None,
        challenge: j.challenge,
    }
}

/// A challenge jail counts challenges, not responses or lines: it has no keys of either.
fn challenge_keys(r: &mut Report, key: &str, j: &RawJail) {
    let other_keys = [
        ("method", j.method.is_some()),
        ("path", j.path.is_some()),
        ("hosts", !j.hosts.is_empty()),
        ("status", !j.status.is_empty()),
        ("location", j.location.is_some()),
        ("concurrency", j.concurrency.is_some()),
        ("log", j.log.is_some()),
    ];
    for (name, set) in other_keys {
        if set {
            r.key(
                &format!("{key}.{name}"),
                "a jail with challenge = true counts unsolved challenges: leave this out",
            );
        }
    }
}

/// `jail.log`: its files or journal, tags and patterns; a log jail has no response keys.
fn log_source(r: &mut Report, key: &str, base: &Path, j: &RawJail, l: &RawLogSource) -> LogSource {
    let response_keys = [
        ("method", j.method.is_some()),
        ("path", j.path.is_some()),
        ("hosts", !j.hosts.is_empty()),
        ("status", !j.status.is_empty()),
        ("location", j.location.is_some()),
        ("scope", j.scope.is_some()),
        ("concurrency", j.concurrency.is_some()),
    ];
    for (name, set) in response_keys {
        if set {
            r.key(
                &format!("{key}.{name}"),
                "a jail with log counts log lines, not responses: leave this out",
            );
        }
    }
    let journal = match (&l.journal, &j.journal) {
        (Some(_), Some(_)) => {
            r.key(
                &format!("{key}.journal"),
                "given twice: in log and beside it",
            );
            None
        }
        (Some(raw), None) | (None, Some(raw)) => {
            Some(journal(r, &format!("{key}.log.journal"), base, raw))
        }
        (None, None) => None,
    };
    match (l.files.is_empty(), &journal) {
        (true, None) => r.key(
            &format!("{key}.log.files"),
            "a log jail follows files or the journal: give log.files or log.journal",
        ),
        (false, Some(_)) => r.key(
            &format!("{key}.log.journal"),
            "a log jail follows files or the journal, not both",
        ),
        _ => {}
    }
    let format = match l.format.as_deref() {
        None | Some("auto") => LogFormat::Auto,
        Some("syslog") => LogFormat::Syslog,
        Some("plain") => LogFormat::Plain,
        Some(other) => {
            r.key(
                &format!("{key}.log.format"),
                format!("'{other}': \"auto\", \"syslog\" or \"plain\""),
            );
            LogFormat::Auto
        }
    };
    if format == LogFormat::Plain && !l.tags.is_empty() {
        r.key(
            &format!("{key}.log.tags"),
            "a plain log's lines have no tag: leave tags out, or read it as syslog",
        );
    }
    for (k, t) in l.tags.iter().enumerate() {
        if t.is_empty()
            || t.chars()
                .any(|c| c.is_whitespace() || matches!(c, '[' | ']' | ':'))
        {
            r.key(
                &format!("{key}.log.tags[{k}]"),
                format!("'{t}' is not a syslog tag (no space, '[', ']' or ':')"),
            );
        }
    }
    let source = LogSource {
        files: l.files.iter().map(|f| resolve(base, f)).collect(),
        journal,
        tags: l.tags.clone(),
        format,
        pattern: l.pattern.clone(),
        ignore: l.ignore.clone(),
    };
    if let Err(e) = source.regex() {
        r.key(&format!("{key}.log.match"), e);
    }
    if let Err(e) = source.ignore_regex() {
        r.key(&format!("{key}.log.ignore"), e);
    }
    source
}

/// `jail.log.journal`: units or identifiers, and the folder.
fn journal(r: &mut Report, key: &str, base: &Path, raw: &RawJournal) -> Journal {
    if raw.units.is_empty() && raw.identifiers.is_empty() {
        r.key(
            key,
            "name the units (units = [\"ssh.service\"]) or syslog identifiers to follow",
        );
    }
    let plain = |s: &String| {
        !s.is_empty() && !s.starts_with('-') && !s.chars().any(|c| c.is_whitespace() || c == '=')
    };
    for (k, u) in raw.units.iter().enumerate() {
        if !plain(u) {
            r.key(
                &format!("{key}.units[{k}]"),
                format!("'{u}' is not a unit name"),
            );
        }
    }
    for (k, i) in raw.identifiers.iter().enumerate() {
        if !plain(i) {
            r.key(
                &format!("{key}.identifiers[{k}]"),
                format!("'{i}' is not a syslog identifier"),
            );
        }
    }
    Journal {
        units: raw.units.clone(),
        identifiers: raw.identifiers.clone(),
        directory: raw.directory.as_ref().map(|d| resolve(base, d)),
    }
}

impl LogSource {
    /// The `match` pattern as a regex: `<ADDR>` becomes a group named `addr` that takes an
    /// IPv4 or IPv6 address (checked again when parsed), `<PROXY>` one named `proxy`.
    /// Linear time (the regex crate).
    pub fn regex(&self) -> Result<regex::Regex, String> {
        let n = self.pattern.matches(ADDR).count();
        if n != 1 {
            return Err(format!(
                "needs exactly one {ADDR} where the client address is (found {n})"
            ));
        }
        if self.pattern.matches(PROXY).count() > 1 {
            return Err(format!("{PROXY} may stand once at most"));
        }
        let source = self
            .pattern
            .replace(ADDR, r"(?P<addr>[0-9A-Fa-f:.]{2,45})")
            .replace(PROXY, r"(?P<proxy>[0-9A-Fa-f:.]{2,45})");
        regex::RegexBuilder::new(&source)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| format!("not a valid pattern: {e}"))
    }

    /// Whether the pattern is anchored at both ends of the message (`^...$`): a pattern
    /// that is not can find a failure line quoted inside another message.
    pub fn anchored(&self) -> bool {
        let p = self.pattern.trim();
        (p.starts_with('^') || p.starts_with(r"\A"))
            && (p.ends_with('$') && !p.ends_with(r"\$") || p.ends_with(r"\z"))
    }

    /// The tags as one anchored regex, or `None` when any tag counts.
    pub fn tags_regex(&self) -> Option<regex::Regex> {
        if self.tags.is_empty() {
            return None;
        }
        let alts: Vec<String> = self
            .tags
            .iter()
            .map(|t| regex::escape(t).replace(r"\*", "[^/]*"))
            .collect();
        regex::Regex::new(&format!("^(?:{})$", alts.join("|"))).ok()
    }

    pub fn ignore_regex(&self) -> Result<Option<regex::Regex>, String> {
        self.ignore
            .as_deref()
            .map(|p| {
                regex::RegexBuilder::new(p)
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|e| format!("not a valid pattern: {e}"))
            })
            .transpose()
    }
}
