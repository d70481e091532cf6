//! A feed's body to entries, whole or not at all, and the checks a new copy must pass
//! before it replaces the last good one.
//!
//! Formats, told apart by the first character that is not blank:
//! - `{`: Spamhaus DROP JSON, one object per line, `{"cidr": ...}` for each entry and a last
//!   `{"type": "metadata", "records": N}` line. A download cut short misses that line, or
//!   ends in half an object, or has fewer records than the metadata says: refused.
//! - anything else: one address or CIDR per line, `#` and `;` starting a comment (plain
//!   lists, Spamhaus DROP text, FireHOL netsets). One line that is not an address refuses the
//!   whole body: an error page served with 200 never becomes a list.

use ipnet::IpNet;

use crate::config::{parse_target, Feed};

/// Why a body or a fetch was not taken: `reason` is the metric's label.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub reason: &'static str,
    pub detail: String,
}

impl Refusal {
    pub fn new(reason: &'static str, detail: impl Into<String>) -> Refusal {
        Refusal {
            reason,
            detail: detail.into(),
        }
    }
}

/// The entries a body holds, in its order.
pub fn entries(body: &[u8], content_type: Option<&str>) -> Result<Vec<IpNet>, Refusal> {
    if content_type.is_some_and(|t| t.trim_start().to_ascii_lowercase().starts_with("text/html")) {
        return Err(Refusal::new(
            "parse",
            "an HTML page (Content-Type text/html), not a list",
        ));
    }
    let text = std::str::from_utf8(body)
        .map_err(|e| Refusal::new("parse", format!("not UTF-8 text ({e})")))?;
    let out = match text.trim_start().as_bytes().first() {
        Some(b'{') => spamhaus_json(text)?,
        Some(b'<') => return Err(Refusal::new("parse", "an HTML or XML page, not a list")),
        _ => lines(text)?,
    };
    if out.is_empty() {
        return Err(Refusal::new("empty", "the body holds no entry"));
    }
    Ok(out)
}

/// A line as it is quoted in a refusal: short, printable.
fn quoted(line: &str) -> String {
    let mut q: String = line.chars().take(60).filter(|c| !c.is_control()).collect();
    if line.chars().count() > 60 {
        q.push('…');
    }
    q
}

fn lines(text: &str) -> Result<Vec<IpNet>, Refusal> {
    crate::decide::policy::entry_lines(text)
        .map(|(n, line)| {
            parse_target(line).map_err(|_| {
                Refusal::new(
                    "parse",
                    format!("line {n}: '{}' is not an address or CIDR", quoted(line)),
                )
            })
        })
        .collect()
}

fn spamhaus_json(text: &str) -> Result<Vec<IpNet>, Refusal> {
    let mut out = Vec::new();
    let mut records = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |what: &str| Refusal::new("parse", format!("line {}: {what}", n + 1));
        if records.is_some() {
            return Err(bad("more after the metadata line"));
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|_| bad(&format!("'{}' is not one JSON object", quoted(line))))?;
        if let Some(cidr) = value.get("cidr").and_then(|c| c.as_str()) {
            out.push(parse_target(cidr).map_err(|e| bad(&e))?);
        } else if value.get("type").and_then(|t| t.as_str()) == Some("metadata") {
            records = Some(value.get("records").and_then(|r| r.as_u64()));
        } else {
            return Err(bad("neither an entry (\"cidr\") nor the metadata line"));
        }
    }
    match records {
        None => Err(Refusal::new(
            "parse",
            "no metadata line at the end: the download is incomplete",
        )),
        Some(None) => Err(Refusal::new(
            "parse",
            "the metadata line has no record count (\"records\")",
        )),
        Some(Some(n)) if n != out.len() as u64 => Err(Refusal::new(
            "parse",
            format!("the metadata says {n} records, {} came", out.len()),
        )),
        Some(Some(_)) => Ok(out),
    }
}

/// The copy to keep: `except` dropped, duplicates gone, sorted; refused when it holds a
/// prefix wider than `max_prefix` or has shrunk by more than `max_shrink` from `previous`
/// entries.
pub fn checked(
    mut entries: Vec<IpNet>,
    feed: &Feed,
    previous: Option<usize>,
) -> Result<Vec<IpNet>, Refusal> {
    // An entry inside an except network, or covering one, is dropped whole: an except
    // network is never blocked by a feed, even through a wider entry.
    entries.retain(|e| !feed.except.iter().any(|x| x.contains(e) || e.contains(x)));
    entries.sort_unstable();
    entries.dedup();
    if let Some(wide) = entries.iter().find(|e| {
        let max = match e {
            IpNet::V4(_) => feed.max_prefix.0,
            IpNet::V6(_) => feed.max_prefix.1,
        };
        e.prefix_len() < max
    }) {
        let (key, max) = match wide {
            IpNet::V4(_) => ("max_prefix", feed.max_prefix.0),
            IpNet::V6(_) => ("max_prefix_v6", feed.max_prefix.1),
        };
        return Err(Refusal::new(
            "prefix",
            format!("holds {wide}, wider than /{max} ({key})"),
        ));
    }
    if entries.is_empty() {
        return Err(Refusal::new("empty", "no entry left after except"));
    }
    // Entries narrow enough each can still add up to everyone: the whole copy's IPv4
    // addresses, overlaps counted once, stay within max_coverage.
    let v4: Vec<ipnet::Ipv4Net> = entries
        .iter()
        .filter_map(|e| match e {
            IpNet::V4(n) => Some(*n),
            IpNet::V6(_) => None,
        })
        .collect();
    let covered: u64 = ipnet::Ipv4Net::aggregate(&v4)
        .iter()
        .map(|n| 1u64 << (32 - u32::from(n.prefix_len())))
        .sum();
    let limit = 1u64 << (32 - u32::from(feed.max_coverage.min(32)));
    if covered > limit {
        return Err(Refusal::new(
            "coverage",
            format!(
                "covers {covered} IPv4 addresses, more than a /{} holds ({limit}; max_coverage)",
                feed.max_coverage
            ),
        ));
    }
    if let Some(before) = previous.filter(|b| *b > 0) {
        let kept = entries.len() as f64 / before as f64;
        if kept < 1.0 - feed.max_shrink {
            return Err(Refusal::new(
                "shrink",
                format!(
                    "{} entries where the last good copy has {before}: {:.0} % fewer, more than \
                     max_shrink ({:.0} %)",
                    entries.len(),
                    (1.0 - kept) * 100.0,
                    feed.max_shrink * 100.0
                ),
            ));
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn feed(except: &[&str]) -> Feed {
        Feed {
            url: http::Uri::from_static("https://feeds.test/drop.txt"),
            refresh: Duration::from_secs(3600),
            ca_file: None,
            max_shrink: 0.5,
            max_prefix: (8, 16),
            max_coverage: 4,
            except: except.iter().map(|e| e.parse().unwrap()).collect(),
            copy: "/nonexistent".into(),
        }
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|e| e.parse().unwrap()).collect()
    }

    const DROP_JSON: &str = r#"{"cidr":"1.10.16.0/20","sblid":"SBL256894","rir":"apnic"}
{"cidr":"2.56.192.0/22","sblid":"SBL459831","rir":"ripencc"}
{"type":"metadata","timestamp":1716825312,"size":122,"records":2,"copyright":"(c) 2024 The Spamhaus Project SLU","terms":"https://www.spamhaus.org/drop/terms/"}
"#;

    #[test]
    fn the_three_formats_read() {
        assert_eq!(
            entries(DROP_JSON.as_bytes(), Some("application/json")).unwrap(),
            nets(&["1.10.16.0/20", "2.56.192.0/22"])
        );
        let drop_txt = "; Spamhaus DROP List 2024/05/27\n1.10.16.0/20 ; SBL256894\n";
        assert_eq!(
            entries(drop_txt.as_bytes(), None).unwrap(),
            nets(&["1.10.16.0/20"])
        );
        let netset = "#\n# firehol_level1\n#\n0.0.0.0/8\n1.10.16.0/20\n2001:db8::/32\n";
        assert_eq!(
            entries(netset.as_bytes(), Some("text/plain; charset=utf-8")).unwrap(),
            nets(&["0.0.0.0/8", "1.10.16.0/20", "2001:db8::/32"])
        );
    }

    #[test]
    fn a_damaged_body_is_refused_whole() {
        // Cut in the middle of a line, cut at a line's end (no metadata), or short of records.
        let cut = &DROP_JSON[..DROP_JSON.find("2.56").unwrap()];
        let err = entries(cut.as_bytes(), None).unwrap_err();
        assert_eq!(err.reason, "parse");
        let lines: Vec<&str> = DROP_JSON.lines().collect();
        let no_meta = lines[..2].join("\n");
        assert!(entries(no_meta.as_bytes(), None)
            .unwrap_err()
            .detail
            .contains("metadata"));
        let short = format!("{}\n{}", lines[0], lines[2]);
        assert!(entries(short.as_bytes(), None)
            .unwrap_err()
            .detail
            .contains("2 records"));
        let uncounted = format!("{}\n{{\"type\":\"metadata\"}}\n", lines[0]);
        let err = entries(uncounted.as_bytes(), None).unwrap_err();
        assert!(err.detail.contains("record count"), "{}", err.detail);
        // An error page, by its type or by its text; one bad line among good ones.
        let page = b"<!DOCTYPE html><html><body>503</body></html>";
        assert_eq!(entries(page, None).unwrap_err().reason, "parse");
        assert_eq!(
            entries(b"1.2.3.4\n", Some("text/html")).unwrap_err().reason,
            "parse"
        );
        let one_bad = "1.2.3.4\n5.6.7.8\nService Unavailable\n";
        let err = entries(one_bad.as_bytes(), None).unwrap_err();
        assert!(err.detail.starts_with("line 3:"), "{}", err.detail);
        assert_eq!(entries(b"# nothing\n\n", None).unwrap_err().reason, "empty");
        assert_eq!(entries(&[0xff, 0xfe], None).unwrap_err().reason, "parse");
    }

    #[test]
    fn except_prefix_and_shrink() {
        let f = feed(&["10.0.0.0/8", "224.0.0.0/3", "127.0.0.0/8"]);
        // FireHOL level1's private, multicast and reserved ranges go before the prefix check.
        let got = checked(
            nets(&[
                "10.0.0.0/8",
                "224.0.0.0/3",
                "127.0.0.0/8",
                "1.2.3.0/24",
                "1.2.3.0/24",
            ]),
            &f,
            None,
        )
        .unwrap();
        assert_eq!(got, nets(&["1.2.3.0/24"]));
        // A wider entry that covers an except network goes too.
        let own = feed(&["203.0.113.0/24"]);
        let got = checked(nets(&["203.0.0.0/16", "198.51.100.0/24"]), &own, None).unwrap();
        assert_eq!(got, nets(&["198.51.100.0/24"]));
        let wide = checked(nets(&["0.0.0.0/0"]), &feed(&[]), None).unwrap_err();
        assert_eq!(wide.reason, "prefix");
        assert!(wide.detail.contains("max_prefix"), "{}", wide.detail);
        assert_eq!(
            checked(nets(&["2000::/3"]), &feed(&[]), None)
                .unwrap_err()
                .reason,
            "prefix"
        );
        assert!(checked(nets(&["1.0.0.0/8", "2001::/16"]), &feed(&[]), None).is_ok());
        // Sixteen /8s are a /4's worth: taken; seventeen are refused, and so are 224 (all of
        // the unicast space) however narrow each entry is.
        let eights = |n: u32| -> Vec<IpNet> {
            (1..=n)
                .map(|i| format!("{i}.0.0.0/8").parse().unwrap())
                .collect()
        };
        assert!(checked(eights(16), &feed(&[]), None).is_ok());
        let err = checked(eights(17), &feed(&[]), None).unwrap_err();
        assert_eq!(err.reason, "coverage", "{}", err.detail);
        assert_eq!(
            checked(eights(223), &feed(&[]), None).unwrap_err().reason,
            "coverage"
        );
        let ten: Vec<IpNet> = (0..10)
            .map(|i| format!("192.0.2.{i}/32").parse().unwrap())
            .collect();
        assert!(checked(ten[..5].to_vec(), &feed(&[]), Some(10)).is_ok());
        let err = checked(ten[..4].to_vec(), &feed(&[]), Some(10)).unwrap_err();
        assert_eq!(err.reason, "shrink");
        assert!(err.detail.contains("60 % fewer"), "{}", err.detail);
        assert_eq!(
            checked(nets(&["10.1.0.0/16"]), &f, None)
                .unwrap_err()
                .reason,
            "empty"
        );
    }
}
