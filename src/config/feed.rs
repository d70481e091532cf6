//! A list's feed keys (`url`, `refresh`, `ca_file`, `max_shrink`, `max_prefix`,
//! `max_prefix_v6`, `except`): where a list's entries are fetched from and what a new copy
//! must look like to be taken.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use super::raw::{RawList, RawPercent, RawPrefix};
use super::report::Report;
use super::values::{cidr, dur, resolve};

/// Default `refresh`.
pub const FEED_REFRESH: Duration = Duration::from_secs(3600);
/// Default `max_shrink`, a fraction of the entries held.
pub const FEED_MAX_SHRINK: f64 = 0.5;
/// Default `max_coverage`: a copy covers at most as many IPv4 addresses as a /4 (FireHOL
/// level1 without its bogons covers about a third of that).
pub const FEED_MAX_COVERAGE: u8 = 4;
/// Default `max_prefix` (IPv4) and `max_prefix_v6`.
pub const FEED_MAX_PREFIX: (u8, u8) = (8, 16);

/// A list fetched from a URL.
#[derive(Debug, Clone, PartialEq)]
pub struct Feed {
    pub url: http::Uri,
    pub refresh: Duration,
    /// The only CA certificates trusted for the feed; `None`: the system's.
    pub ca_file: Option<PathBuf>,
    /// The largest drop in entries a new copy may show (0.5: half of them).
    pub max_shrink: f64,
    /// The widest prefixes a copy may hold: IPv4, IPv6.
    pub max_prefix: (u8, u8),
    /// The IPv4 addresses a whole copy may cover: as many as a /`max_coverage` holds.
    pub max_coverage: u8,
    /// Entries inside these networks are dropped from every copy.
    pub except: Vec<IpNet>,
    /// The last good copy: `state_dir/feeds/NAME.list`.
    pub copy: PathBuf,
}

/// The folder of `state_dir` that holds the feeds' last good copies.
pub fn copies_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("feeds")
}

/// A list's feed, if it names a `url`; the other feed keys without one are refused.
pub(super) fn compile(
    r: &mut Report,
    key: &str,
    name: &str,
    l: &RawList,
    base: &Path,
    state_dir: &Path,
) -> Option<Feed> {
    let Some(url) = &l.url else {
        stray_keys(r, key, l);
        return None;
    };
    let url = feed_url(r, &format!("{key}.url"), url);
    if l.action.eq_ignore_ascii_case("allow") {
        // A list from elsewhere would decide who passes every block, limit and jail here.
        r.key(
            &format!("{key}.url"),
            "a feed fills block and challenge lists only: an allow list's entries come from \
             the config or its files",
        );
    }
    let safe_name = !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !safe_name {
        r.key(
            &format!("{key}.url"),
            format!(
                "a feed's list name names its copy's file: '{name}' may hold letters, digits, \
                 '-', '_' and '.' only"
            ),
        );
    }
    let refresh = dur(
        r,
        &format!("{key}.refresh"),
        l.refresh.as_deref(),
        FEED_REFRESH,
    );
    if refresh < Duration::from_secs(1) {
        r.key(&format!("{key}.refresh"), "at least 1s");
    }
    let ca_file = l.ca_file.as_deref().map(|f| resolve(base, f));
    if let Some(f) = &ca_file {
        if let Err(e) = std::fs::metadata(f) {
            r.other(
                f,
                None,
                &format!("{key}.ca_file"),
                format!("cannot read: {e}"),
            );
        }
    }
    let max_shrink = l.max_shrink.as_ref().map_or(FEED_MAX_SHRINK, |p| {
        percent(p).unwrap_or_else(|e| {
            r.key(&format!("{key}.max_shrink"), e);
            FEED_MAX_SHRINK
        })
    });
    let mut prefix = |k: &str, raw: &Option<RawPrefix>, max: u8, default: u8| {
        raw.as_ref().map_or(default, |p| {
            prefix_len(p, max).unwrap_or_else(|e| {
                r.key(&format!("{key}.{k}"), e);
                default
            })
        })
    };
    let max_prefix = (
        prefix("max_prefix", &l.max_prefix, 32, FEED_MAX_PREFIX.0),
        prefix("max_prefix_v6", &l.max_prefix_v6, 128, FEED_MAX_PREFIX.1),
    );
    let max_coverage = prefix("max_coverage", &l.max_coverage, 32, FEED_MAX_COVERAGE);
    let except = l
        .except
        .iter()
        .enumerate()
        .filter_map(|(i, s)| cidr(r, &format!("{key}.except[{i}]"), s))
        .collect();
    Some(Feed {
        url,
        refresh,
        ca_file,
        max_shrink,
        max_prefix,
        max_coverage,
        except,
        copy: copies_dir(state_dir).join(format!("{name}.list")),
    })
}

/// The feed keys a list without `url` must not have.
fn stray_keys(r: &mut Report, key: &str, l: &RawList) {
    let stray = [
        ("refresh", l.refresh.is_some()),
        ("ca_file", l.ca_file.is_some()),
        ("max_shrink", l.max_shrink.is_some()),
        ("max_prefix", l.max_prefix.is_some()),
        ("max_prefix_v6", l.max_prefix_v6.is_some()),
        ("max_coverage", l.max_coverage.is_some()),
        ("except", !l.except.is_empty()),
    ];
    for (k, _) in stray.iter().filter(|(_, set)| *set) {
        r.key(&format!("{key}.{k}"), "applies to a feed only: set url too");
    }
}

/// `https://...`, or `http://` to a loopback address (a feed served on the machine itself).
fn feed_url(r: &mut Report, key: &str, text: &str) -> http::Uri {
    let fallback = http::Uri::from_static("https://invalid.invalid/");
    let url = match text.parse::<http::Uri>() {
        Ok(u) if u.host().is_some() => u,
        _ => {
            r.key(key, format!("'{text}' is not a URL like https://host/path"));
            return fallback;
        }
    };
    match url.scheme_str() {
        Some("https") => {}
        Some("http") if is_loopback(url.host().unwrap_or("")) => {}
        Some("http") => r.key(
            key,
            "plain HTTP is allowed to a loopback address only (anyone on the path could change \
             the list): use https://",
        ),
        _ => r.key(
            key,
            format!("'{text}': expected https:// (or http:// to loopback)"),
        ),
    }
    url
}

/// A feed's URL as logs and pages name it: scheme, host and path, without a query (paid
/// feeds put their key there) or user info.
pub fn feed_origin(url: &http::Uri) -> String {
    format!(
        "{}://{}{}{}",
        url.scheme_str().unwrap_or("https"),
        url.host().unwrap_or(""),
        url.port_u16().map(|p| format!(":{p}")).unwrap_or_default(),
        url.path()
    )
}

/// Whether a URL's host is the machine itself: `localhost`, 127.0.0.0/8 or `[::1]`.
pub fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `50`, `"50%"` (percent) or `0.5` (a fraction below 1) as a fraction.
fn percent(p: &RawPercent) -> Result<f64, String> {
    let n = match p {
        RawPercent::Number(n) if *n > 0.0 && *n < 1.0 => return Ok(*n),
        RawPercent::Number(n) => *n,
        RawPercent::Text(t) => t
            .trim()
            .strip_suffix('%')
            .and_then(|n| n.trim().parse::<f64>().ok())
            .ok_or_else(|| format!("'{t}': expected a percentage like 50 or \"50%\""))?,
    };
    if (0.0..=100.0).contains(&n) {
        Ok(n / 100.0)
    } else {
        Err(format!("{n}: expected 0 to 100 (percent)"))
    }
}

/// `8` or `"/8"`, at most `max`.
fn prefix_len(p: &RawPrefix, max: u8) -> Result<u8, String> {
    let n = match p {
        RawPrefix::Number(n) => *n,
        RawPrefix::Text(t) => t
            .trim()
            .trim_start_matches('/')
            .parse::<i64>()
            .map_err(|_| format!("'{t}': expected a prefix length like 8 or \"/8\""))?,
    };
    u8::try_from(n)
        .ok()
        .filter(|n| *n <= max)
        .ok_or_else(|| format!("{n}: expected a prefix length from 0 to {max}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_and_prefixes_in_every_spelling() {
        assert_eq!(percent(&RawPercent::Number(50.0)), Ok(0.5));
        assert_eq!(percent(&RawPercent::Number(0.5)), Ok(0.5));
        assert_eq!(percent(&RawPercent::Text("90%".into())), Ok(0.9));
        assert_eq!(percent(&RawPercent::Number(0.0)), Ok(0.0));
        assert!(percent(&RawPercent::Number(150.0)).is_err());
        assert!(percent(&RawPercent::Text("half".into())).is_err());
        assert_eq!(prefix_len(&RawPrefix::Number(8), 32), Ok(8));
        assert_eq!(prefix_len(&RawPrefix::Text("/12".into()), 32), Ok(12));
        assert!(prefix_len(&RawPrefix::Number(33), 32).is_err());
        assert!(prefix_len(&RawPrefix::Number(-1), 32).is_err());
    }

    #[test]
    fn loopback_hosts() {
        for h in ["localhost", "127.0.0.1", "127.9.9.9", "[::1]", "LOCALHOST"] {
            assert!(is_loopback(h), "{h}");
        }
        for h in ["example.org", "10.0.0.1", "[::2]", "localhost.example.org"] {
            assert!(!is_loopback(h), "{h}");
        }
        let url: http::Uri = "https://feeds.test:8443/drop.txt?key=secret"
            .parse()
            .unwrap();
        assert_eq!(feed_origin(&url), "https://feeds.test:8443/drop.txt");
    }
}
