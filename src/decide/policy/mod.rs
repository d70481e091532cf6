//! Who may pass. Static lists from the config (entries and list files, compiled into
//! [`table::CidrTable`]s and swapped with the config snapshot), temporary entries
//! ([`temporary::TempEntries`], expiring, persisted by the store), and the decision that
//! combines them: allow wins over block.

pub mod slot;
pub mod table;
pub mod temporary;

use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use prometheus::IntCounter;

use crate::config::{self, Action, Report};
use crate::decide::geo::{Geo, Seen};
use crate::observe::metrics::Metrics;
use table::CidrTable;
use temporary::TempEntries;

/// One `[lists.NAME]`, compiled.
pub struct StaticList {
    pub name: String,
    pub action: Action,
    pub dry_run: bool,
    pub table: CidrTable,
    /// Autonomous systems it holds (sorted).
    pub asns: Vec<u32>,
    /// Countries it holds.
    pub countries: Vec<[u8; 2]>,
    /// Whether its entries come from a feed (a URL) as well.
    pub feed: bool,
    /// `ipgate_would_block_total{rule=NAME}` for a dry-run block list.
    would_block: Option<IntCounter>,
}

/// The static lists of one config.
#[derive(Default)]
pub struct Policy {
    pub allow: Vec<StaticList>,
    pub block: Vec<StaticList>,
    /// Lists whose members are challenged.
    pub challenge: Vec<StaticList>,
    /// The ASN and country databases, when `[geo]` names them.
    pub geo: Option<Geo>,
}

impl StaticList {
    /// Whether the list holds `ip`: by address, by autonomous system or by country.
    #[inline]
    pub fn holds(&self, ip: IpAddr, seen: &mut Seen) -> bool {
        self.table.contains(ip)
            || (!self.asns.is_empty()
                && seen
                    .asn(ip)
                    .is_some_and(|a| self.asns.binary_search(&a).is_ok()))
            || (!self.countries.is_empty()
                && seen
                    .country(ip)
                    .is_some_and(|c| self.countries.contains(&c)))
    }

    /// What about `ip` the list holds it by (admin path): `asn 64500`, `country NL`.
    pub fn geo_reason(&self, place: &crate::decide::geo::Place) -> Option<String> {
        if let Some(a) = place.asn.filter(|a| self.asns.binary_search(a).is_ok()) {
            return Some(format!("asn {a}"));
        }
        let c = place.country.filter(|c| self.countries.contains(c))?;
        Some(format!("country {}", String::from_utf8_lossy(&c)))
    }
}

/// What decided a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Index into `Policy::allow` or `Policy::block`.
    Static(usize),
    Temporary,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow(Rule),
    Block(Rule),
    Pass,
}

impl Policy {
    /// Compiles the lists, reading their files. A bad line is reported with its file and line.
    pub fn build(lists: &[config::List], report: &mut Report, metrics: &Metrics) -> Policy {
        let mut policy = Policy::default();
        for list in lists {
            let mut cidrs = list.entries.clone();
            for (i, file) in list.files.iter().enumerate() {
                let key = format!("lists.{}.files[{i}]", list.name);
                load_list_file(file, &key, &mut cidrs, report);
            }
            if let Some(feed) = &list.feed {
                load_feed_copy(feed, &list.name, &mut cidrs);
            }
            let compiled = StaticList {
                name: list.name.clone(),
                action: list.action,
                dry_run: list.dry_run,
                table: CidrTable::new(cidrs),
                asns: list.asns.clone(),
                countries: list.countries.clone(),
                feed: list.feed.is_some(),
                would_block: list
                    .dry_run
                    .then(|| metrics.would_block.with_label_values(&[&list.name])),
            };
            match list.action {
                Action::Allow => policy.allow.push(compiled),
                Action::Block => policy.block.push(compiled),
                Action::Challenge => policy.challenge.push(compiled),
                // Refused by the config check.
                Action::Pass => {}
            }
        }
        policy
    }

    /// The allow list named `name`.
    pub fn allow_list(&self, name: &str) -> Option<&StaticList> {
        self.allow.iter().find(|l| l.name == name)
    }

    /// The list a static rule points at.
    pub fn list(&self, verdict: Verdict) -> Option<&StaticList> {
        match verdict {
            Verdict::Allow(Rule::Static(i)) => self.allow.get(i),
            Verdict::Block(Rule::Static(i)) => self.block.get(i),
            _ => None,
        }
    }

    /// The decision for a client: any allow entry, static or temporary, wins; then
    /// any block entry; dry-run block lists are counted and passed over.
    #[inline]
    pub fn decide(&self, temp: &TempEntries, ip: IpAddr) -> Verdict {
        let seen = &mut Seen::new(self.geo.as_ref());
        // An allow list's ASNs and countries admit through `allow_only` only: a whole country
        // or provider is never exempt from bans, limits and jails everywhere.
        for (i, l) in self.allow.iter().enumerate() {
            if l.table.contains(ip) {
                return Verdict::Allow(Rule::Static(i));
            }
        }
        if !temp.allow.is_empty() && temp.allow.contains(ip) {
            return Verdict::Allow(Rule::Temporary);
        }
        for (i, l) in self.block.iter().enumerate() {
            if l.holds(ip, seen) {
                if let Some(c) = &l.would_block {
                    c.inc();
                    continue;
                }
                return Verdict::Block(Rule::Static(i));
            }
        }
        if temp.block.contains(ip) {
            return Verdict::Block(Rule::Temporary);
        }
        Verdict::Pass
    }

    /// The first challenge list holding `ip`: no challenge list at all costs nothing.
    #[inline]
    pub fn challenged(&self, ip: IpAddr) -> Option<&StaticList> {
        let seen = &mut Seen::new(self.geo.as_ref());
        self.challenge.iter().find(|l| l.holds(ip, seen))
    }

    /// Every static list: allow, block, challenge.
    pub fn all(&self) -> impl Iterator<Item = &StaticList> {
        self.allow.iter().chain(&self.block).chain(&self.challenge)
    }

    /// Whether the allow list named `name` holds `ip` (`allow_only`).
    pub fn allows(&self, name: &str, ip: IpAddr) -> bool {
        self.allow_list(name)
            .is_some_and(|l| l.holds(ip, &mut Seen::new(self.geo.as_ref())))
    }

    /// The lists (name, action) holding `ip`, with the matching CIDRs (admin path).
    pub fn matching(&self, ip: IpAddr) -> Vec<(&StaticList, Vec<IpNet>)> {
        self.all()
            .filter_map(|l| {
                let m: Vec<IpNet> = l.table.matching(ip).copied().collect();
                (!m.is_empty()).then_some((l, m))
            })
            .collect()
    }
}

/// Reads a list file: one address or CIDR per line; `#` and `;` start a comment anywhere on
/// a line; blank lines are skipped. Spamhaus DROP and FireHOL netsets load as they are.
pub fn load_list_file(path: &Path, key: &str, out: &mut Vec<IpNet>, report: &mut Report) {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            report.other(path, None, key, format!("cannot read list file: {e}"));
            return;
        }
    };
    parse_list(&text, path, key, out, report);
}

/// A feed's last good copy (a list file ipgate wrote), if there is one and it is of the
/// feed's URL. The feed's `except` and prefix limits hold at load too (they may have changed
/// since the copy was taken, or the file been edited). A copy that does not read, or holds a
/// prefix the limits refuse, is logged and left out until the next fetch: a state file never
/// stops a start or a reload.
fn load_feed_copy(feed: &config::Feed, list: &str, out: &mut Vec<IpNet>) {
    let path = feed.copy.as_path();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::warn!(list, path = %path.display(), error = %e, "cannot read the feed's last good copy");
            return;
        }
    };
    let url = feed.url.to_string();
    if !text
        .lines()
        .any(|l| l.strip_prefix("# url: ") == Some(url.as_str()))
    {
        tracing::info!(
            list,
            "the feed's copy is of another URL: left out until the new one is fetched"
        );
        return;
    }
    let mut report = Report::new(path, "");
    let mut cidrs = Vec::new();
    parse_list(&text, path, "copy", &mut cidrs, &mut report);
    let wide = cidrs.iter().any(|e| {
        let max = if e.addr().is_ipv4() {
            feed.max_prefix.0
        } else {
            feed.max_prefix.1
        };
        e.prefix_len() < max
    });
    if !report.is_empty() || wide {
        tracing::warn!(list, path = %path.display(), "the feed's last good copy does not read or breaks max_prefix; left out until the next fetch");
        return;
    }
    cidrs.retain(|e| !feed.except.iter().any(|x| x.contains(e) || e.contains(x)));
    out.append(&mut cidrs);
}

/// The entries of a list text with their line numbers (from 1): `#` and `;` start a comment
/// anywhere on a line, blank lines are skipped. List files and feeds read lines this way.
pub fn entry_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().filter_map(|(n, line)| {
        let line = line.find(['#', ';']).map_or(line, |p| &line[..p]).trim();
        (!line.is_empty()).then_some((n + 1, line))
    })
}

/// The lines of a list file (see [`load_list_file`]); problems are reported against `path`.
pub fn parse_list(text: &str, path: &Path, key: &str, out: &mut Vec<IpNet>, report: &mut Report) {
    let mut bad = 0;
    for (n, line) in entry_lines(text) {
        match config::parse_target(line) {
            Ok(net) => out.push(net),
            Err(e) => {
                bad += 1;
                // Name the first few; a wrong file format would otherwise flood the report.
                if bad <= 10 {
                    report.other(path, Some(n), key, e);
                }
            }
        }
    }
    if bad > 10 {
        report.other(
            path,
            None,
            key,
            format!("{} more bad lines not shown", bad - 10),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::clock::now_ms;
    use crate::decide::policy::temporary::Entry;

    fn policy(lists: &str) -> Policy {
        let text = format!("[[listener]]\naddr = \"127.0.0.1:0\"\n[[site]]\nhosts = [\"*\"]\nupstream = \"http://127.0.0.1:9\"\n{lists}");
        let path = Path::new("/tmp/ipgate-policy-test.toml");
        let config = config::Config::parse(path, &text).unwrap();
        let mut report = Report::new(path, "");
        let p = Policy::build(&config.lists, &mut report, &Metrics::new());
        assert!(report.is_empty());
        p
    }

    #[test]
    fn allow_wins_over_block() {
        let p = policy(
            r#"
[lists.office]
action = "allow"
entries = ["203.0.113.0/24"]
[lists.deny]
action = "block"
entries = ["203.0.0.0/16", "198.51.100.0/24"]
"#,
        );
        let temp = TempEntries::default();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            p.decide(&temp, ip("203.0.113.9")),
            Verdict::Allow(Rule::Static(0))
        );
        assert_eq!(
            p.decide(&temp, ip("203.0.1.1")),
            Verdict::Block(Rule::Static(0))
        );
        assert_eq!(p.decide(&temp, ip("192.0.2.1")), Verdict::Pass);
        let e = Entry::new(0, now_ms() + 60_000, "api", None);
        temp.block
            .insert("192.0.2.1/32".parse().unwrap(), e.clone());
        assert_eq!(
            p.decide(&temp, ip("192.0.2.1")),
            Verdict::Block(Rule::Temporary)
        );
        temp.allow.insert("198.51.100.7/32".parse().unwrap(), e);
        assert_eq!(
            p.decide(&temp, ip("198.51.100.7")),
            Verdict::Allow(Rule::Temporary)
        );
    }

    #[test]
    fn dry_run_lists_count_and_pass() {
        let trial =
            "[lists.trial]\naction = \"block\"\ndry_run = true\nentries = [\"192.0.2.0/24\"]\n";
        let p = policy(trial);
        let temp = TempEntries::default();
        assert_eq!(p.decide(&temp, "192.0.2.1".parse().unwrap()), Verdict::Pass);
        assert_eq!(p.block[0].would_block.as_ref().unwrap().get(), 1);
    }

    #[test]
    fn a_feed_copy_loads_only_for_its_url_and_under_the_feeds_limits() {
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("drop.list");
        let feed = |url: &str, except: &[&str]| config::Feed {
            url: url.parse().unwrap(),
            refresh: std::time::Duration::from_secs(3600),
            ca_file: None,
            max_shrink: 0.5,
            max_prefix: (8, 16),
            max_coverage: 4,
            except: except.iter().map(|e| e.parse().unwrap()).collect(),
            copy: copy.clone(),
        };
        let load = |f: &config::Feed| {
            let mut out = Vec::new();
            load_feed_copy(f, "drop", &mut out);
            out
        };
        let a = "https://feeds.test/a.txt";
        std::fs::write(
            &copy,
            format!("# url: {a}\n# checked: 1\n198.51.0.0/16\n192.0.2.0/24\n"),
        )
        .unwrap();
        assert_eq!(load(&feed(a, &[])).len(), 2);
        // An except added since: dropped at load, also where an entry covers it.
        let kept = load(&feed(a, &["198.51.100.0/24"]));
        assert_eq!(kept, vec!["192.0.2.0/24".parse::<IpNet>().unwrap()]);
        // The copy of another URL: left out.
        assert!(load(&feed("https://feeds.test/b.txt", &[])).is_empty());
        // An edited copy past max_prefix: left out whole.
        std::fs::write(&copy, format!("# url: {a}\n0.0.0.0/1\n192.0.2.0/24\n")).unwrap();
        assert!(load(&feed(a, &[])).is_empty());
    }

    #[test]
    fn list_files_take_drop_and_netset_formats() {
        let dir = tempfile::tempdir().unwrap();
        let drop_file = dir.path().join("drop.txt");
        std::fs::write(
            &drop_file,
            "; Spamhaus DROP List 2026/11/23\n; Expires: ...\n1.10.16.0/20 ; SBL256894\n2.56.192.0/22 ; SBL459831\n",
        )
        .unwrap();
        let netset = dir.path().join("firehol.netset");
        std::fs::write(
            &netset,
            "#\n# firehol_level1\n#\n0.0.0.0/8\n5.134.128.0/19\n\n192.0.2.1   # single\n2001:db8::/32\n",
        )
        .unwrap();
        let bad = dir.path().join("bad.txt");
        std::fs::write(&bad, "10.0.0.0/8\nnot-an-ip\n10.0.0.0/40 ; nope\n").unwrap();
        let path = dir.path().join("x.toml");
        let mut report = Report::new(&path, "");
        let mut out = Vec::new();
        load_list_file(&drop_file, "lists.drop.files[0]", &mut out, &mut report);
        load_list_file(&netset, "lists.fh.files[0]", &mut out, &mut report);
        assert!(report.is_empty());
        assert_eq!(out.len(), 6);
        load_list_file(&bad, "lists.b.files[0]", &mut out, &mut report);
        let errors = report.into_errors().0;
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[0].file, bad);
        assert_eq!(errors[0].line, Some(2));
        assert_eq!(errors[0].key, "lists.b.files[0]");
        assert_eq!(errors[1].line, Some(3));
    }
}
