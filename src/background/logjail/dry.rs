//! `ipgate jail test NAME [FILE|-]`, the counterpart of `fail2ban-regex`: runs a configured
//! log jail's parsing and patterns over a log (a file, standard input, or, with neither, the
//! jail's own files or journal read from their start) and says what it would count. Nothing
//! is banned and nothing is sent to a running gateway.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read;
use std::net::IpAddr;

use super::follow::Lines;
use super::journal;
use super::line::{Matcher, Seen};
use crate::config::{Config, Jail};
use crate::decide::policy::table::CidrTable;

/// How many lines that did not parse are shown.
const SHOWN: usize = 10;

/// What a jail made of a log.
#[derive(Debug, Default)]
pub struct Report {
    pub read: u64,
    pub matched: u64,
    pub ignored: u64,
    pub other_tag: u64,
    pub not_through_proxy: u64,
    pub unparsed: u64,
    /// Each address it would count, and how often.
    pub addresses: BTreeMap<IpAddr, u64>,
    /// The first lines that did not parse, with their numbers.
    pub first_unparsed: Vec<(u64, String)>,
}

impl Report {
    /// Takes one line (a syslog or plain line, or a journal entry as `journalctl
    /// --output=json` prints it).
    pub fn take(&mut self, matcher: &Matcher, through: &dyn Fn(IpAddr) -> bool, line: &str) {
        self.read += 1;
        let seen = if line.starts_with('{') {
            match journal::parse(line) {
                Some(e) => matcher.message(e.tag.as_deref(), &e.message, through),
                None => Seen::Unparsed,
            }
        } else {
            matcher.line(line, through)
        };
        match seen {
            Seen::Counted(ip) => {
                self.matched += 1;
                *self.addresses.entry(ip).or_default() += 1;
            }
            Seen::Ignored => self.ignored += 1,
            Seen::OtherTag => self.other_tag += 1,
            Seen::NotThroughProxy => self.not_through_proxy += 1,
            Seen::Unparsed => {
                self.unparsed += 1;
                if self.first_unparsed.len() < SHOWN {
                    self.first_unparsed.push((self.read, line.to_string()));
                }
            }
            Seen::NotMatched => {}
        }
    }

    /// The report as printed.
    pub fn render(&self, jail: &Jail) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "jail {}", jail.name);
        let _ = writeln!(out, "lines read: {}", self.read);
        let _ = writeln!(out, "lines matched: {}", self.matched);
        let _ = writeln!(out, "lines ignored: {}", self.ignored);
        let _ = writeln!(out, "lines of other tags: {}", self.other_tag);
        let _ = writeln!(out, "lines not through a proxy: {}", self.not_through_proxy);
        let _ = writeln!(out, "lines not parsed: {}", self.unparsed);
        let _ = writeln!(
            out,
            "addresses it would count: {} (a ban at {} within {})",
            self.addresses.len(),
            jail.hits,
            humantime::format_duration(jail.window)
        );
        let mut by_count: Vec<(&IpAddr, &u64)> = self.addresses.iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (ip, n) in by_count {
            let _ = writeln!(out, "  {ip} {n}");
        }
        if !self.first_unparsed.is_empty() {
            let _ = writeln!(out, "first lines not parsed:");
            for (n, line) in &self.first_unparsed {
                let _ = writeln!(out, "  {n}: {line}");
            }
        }
        out
    }
}

/// Runs jail `name` of `config` over `input` (`Some("-")`: standard input; `None`: the
/// jail's own source).
pub fn run(config: &Config, name: &str, input: Option<&str>) -> anyhow::Result<String> {
    let jail = config
        .jails
        .iter()
        .find(|j| j.name == name)
        .ok_or_else(|| anyhow::anyhow!("no jail named '{name}' in the config"))?;
    let source = jail.log.as_ref().ok_or_else(|| {
        anyhow::anyhow!("jail '{name}' counts responses, not log lines: nothing to test")
    })?;
    let matcher = Matcher::new(source).map_err(|e| anyhow::anyhow!("jail '{name}': {e}"))?;
    // Only the config's own addresses: no list, certificate or store is read.
    let trusted = CidrTable::new(config.gateway.trusted_proxies.clone());
    let through = |ip: IpAddr| super::through_us(&trusted, &config.listeners, ip);
    let mut report = Report::default();
    let mut take = |line: &str| report.take(&matcher, &through, line);
    match input {
        Some("-") => read_lines(std::io::stdin().lock(), &mut take)?,
        Some(path) => read_lines(open(path)?, &mut take)?,
        None => match &source.journal {
            Some(j) => {
                let output = journal::command(j, false, None)
                    .into_std()
                    .output()
                    .map_err(|e| anyhow::anyhow!("cannot run journalctl: {e}"))?;
                if !output.status.success() {
                    anyhow::bail!(
                        "journalctl failed: {}",
                        String::from_utf8_lossy(&output.stderr).trim()
                    );
                }
                read_lines(&output.stdout[..], &mut take)?;
            }
            None => {
                for f in &source.files {
                    read_lines(open(&f.to_string_lossy())?, &mut take)?;
                }
            }
        },
    }
    Ok(report.render(jail))
}

fn open(path: &str) -> anyhow::Result<std::fs::File> {
    std::fs::File::open(path).map_err(|e| anyhow::anyhow!("cannot read {path}: {e}"))
}

/// Feeds every line to `take`, cut as a followed file is ([`Lines`]: a line longer than
/// `MAX_LINE` is skipped).
fn read_lines(mut input: impl Read, take: &mut dyn FnMut(&str)) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    let mut split = Lines::default();
    let mut lines = Vec::new();
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            split.flush(&mut lines);
        } else {
            split.split(&buf[..n], &mut lines);
        }
        for line in lines.drain(..) {
            take(&line);
        }
        if n == 0 {
            return Ok(());
        }
    }
}
