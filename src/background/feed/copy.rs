//! A feed's last good copy in `state_dir/feeds/NAME.list`: a list file (one CIDR per line)
//! under a header of `# key: value` lines saying where it came from, its validators for the
//! next conditional GET, and when it was last confirmed. The policy reads it as a list file;
//! this module reads the header. Written to a temporary file, synced and renamed over the
//! old copy, so a crash leaves one whole copy or the other.

use std::io::Write;
use std::path::Path;

use ipnet::IpNet;

/// What the header of a copy says, and how many entries follow it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Meta {
    pub url: String,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    /// When the feed last confirmed this copy (a 200 taken, or a 304), Unix seconds.
    pub checked: u64,
    pub entries: usize,
}

/// The header of the copy at `path`, if one is there and reads whole (a damaged copy is
/// none: the feed is then fetched at once, without validators).
pub fn read_meta(path: &Path) -> Option<Meta> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut meta = Meta::default();
    for line in text.lines() {
        match line.strip_prefix("# ").and_then(|l| l.split_once(": ")) {
            Some(("url", v)) => meta.url = v.to_string(),
            Some(("etag", v)) => meta.etag = Some(v.to_string()),
            Some(("last-modified", v)) => meta.last_modified = Some(v.to_string()),
            Some(("checked", v)) => meta.checked = v.parse().ok()?,
            _ if line.starts_with('#') || line.trim().is_empty() => {}
            _ => {
                line.trim().parse::<IpNet>().ok()?;
                meta.entries += 1;
            }
        }
    }
    (!meta.url.is_empty()).then_some(meta)
}

/// Writes a copy whole: header, then one entry per line.
pub fn write(path: &Path, meta: &Meta, entries: &[IpNet]) -> std::io::Result<()> {
    let mut text = String::with_capacity(64 + entries.len() * 20);
    text.push_str("# ipgate: the last good copy of a feed (rewritten at each fetch)\n");
    text.push_str(&format!("# url: {}\n", meta.url));
    if let Some(e) = &meta.etag {
        text.push_str(&format!("# etag: {e}\n"));
    }
    if let Some(l) = &meta.last_modified {
        text.push_str(&format!("# last-modified: {l}\n"));
    }
    text.push_str(&format!("# checked: {}\n", meta.checked));
    for e in entries {
        text.push_str(&e.to_string());
        text.push('\n');
    }
    write_whole(path, text.as_bytes())
}

/// The copy's entries with a new header (a 304 confirmed them).
pub fn confirm(path: &Path, meta: &Meta) -> std::io::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let entries = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.trim().parse::<IpNet>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    write(path, meta, &entries)
}

fn write_whole(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("list.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    // The rename itself is durable once the folder is synced.
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_reads_back_and_is_a_list_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("feeds/drop.list");
        let meta = Meta {
            url: "https://feeds.test/drop.txt".into(),
            etag: Some("\"v1\"".into()),
            last_modified: Some("Mon, 07 Dec 2026 03:00:00 GMT".into()),
            checked: 1_796_000_000,
            entries: 2,
        };
        let nets: Vec<IpNet> = vec![
            "192.0.2.0/24".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ];
        write(&path, &meta, &nets).unwrap();
        assert_eq!(read_meta(&path), Some(meta.clone()));
        let later = Meta {
            checked: meta.checked + 60,
            ..meta.clone()
        };
        confirm(&path, &later).unwrap();
        assert_eq!(read_meta(&path), Some(later.clone()));
        assert!(!dir.path().join("feeds/drop.list.tmp").exists());
        // A damaged copy is no copy: fetched again whole, never confirmed by a 304.
        let damaged = dir.path().join("feeds/damaged.list");
        std::fs::write(
            &damaged,
            "# url: https://feeds.test/x\n# checked: 1\n192.0.2.0/24\n192.0.\n",
        )
        .unwrap();
        assert_eq!(read_meta(&damaged), None);
        assert!(confirm(&damaged, &later).is_err());
        // The policy reads it as any list file.
        let mut out = Vec::new();
        let mut report = crate::config::Report::new(&path, "");
        let text = std::fs::read_to_string(&path).unwrap();
        crate::decide::policy::parse_list(&text, &path, "copy", &mut out, &mut report);
        assert!(report.is_empty());
        assert_eq!(out, nets);
    }
}
