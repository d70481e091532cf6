//! The access log: one JSON line per request on stdout, with the client address written the
//! way `privacy.log_ip` says. Lines go through a bounded channel to a writer thread that
//! writes them in batches every 50 ms, so the request path never blocks on stdout nor pays a
//! system call; when the writer falls behind, lines are dropped and counted rather than
//! delaying traffic.

use std::fmt;
use std::io::Write;
use std::net::IpAddr;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::SystemTime;

use prometheus::IntCounter;

use crate::config::LogIp;

/// An address as the privacy setting allows it to be written: in full, reduced to its
/// network (IPv4 /24, IPv6 /48), or not at all (`-`). Formats without allocating.
#[derive(Clone, Copy)]
pub struct LoggedIp(pub IpAddr, pub LogIp);

impl fmt::Display for LoggedIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.1, self.0) {
            (LogIp::None, _) => f.write_str("-"),
            (LogIp::Full, ip) => write!(f, "{ip}"),
            (LogIp::Anonymized, IpAddr::V4(v4)) => {
                let o = v4.octets();
                write!(f, "{}.{}.{}.0", o[0], o[1], o[2])
            }
            (LogIp::Anonymized, IpAddr::V6(v6)) => {
                let s = v6.segments();
                write!(
                    f,
                    "{}",
                    std::net::Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0)
                )
            }
        }
    }
}

impl LoggedIp {
    /// Appends the address as the setting allows (IPv4 without the formatting machinery:
    /// this runs once per request).
    fn write_to(&self, out: &mut Vec<u8>) {
        match (self.1, self.0) {
            (LogIp::None, _) => out.push(b'-'),
            (mode, IpAddr::V4(v4)) => {
                let o = v4.octets();
                let mut buf = itoa::Buffer::new();
                out.extend_from_slice(buf.format(o[0]).as_bytes());
                for (i, octet) in o[1..].iter().enumerate() {
                    out.push(b'.');
                    let octet = if mode == LogIp::Anonymized && i == 2 {
                        0
                    } else {
                        *octet
                    };
                    out.extend_from_slice(buf.format(octet).as_bytes());
                }
            }
            (_, IpAddr::V6(_)) => {
                let _ = write!(out, "{self}");
            }
        }
    }
}

/// One request's line.
pub struct Entry<'a> {
    pub ts: SystemTime,
    pub client: LoggedIp,
    pub method: &'a str,
    pub host: &'a str,
    /// Path without the query string: queries often carry personal data.
    pub path: &'a str,
    pub proto: &'a str,
    pub status: u16,
    pub site: &'a str,
    pub outcome: &'a str,
    pub duration: std::time::Duration,
}

impl Entry<'_> {
    /// The entry as one JSON object (no newline).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"ts\":\"");
        push_ts(out, self.ts);
        out.extend_from_slice(b"\",\"client\":\"");
        self.client.write_to(out);
        out.push(b'"');
        for (key, value) in [
            ("method", self.method),
            ("host", self.host),
            ("path", self.path),
            ("proto", self.proto),
        ] {
            push_key(out, key);
            push_str(out, value);
        }
        push_key(out, "status");
        out.extend_from_slice(itoa::Buffer::new().format(self.status).as_bytes());
        push_key(out, "site");
        push_str(out, self.site);
        push_key(out, "outcome");
        push_str(out, self.outcome);
        // Milliseconds with microsecond precision, from integers.
        push_key(out, "duration_ms");
        let us = self.duration.as_micros();
        let mut buf = itoa::Buffer::new();
        out.extend_from_slice(buf.format(us / 1000).as_bytes());
        let frac = (us % 1000) as u16;
        out.extend_from_slice(&[
            b'.',
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ]);
        out.push(b'}');
    }
}

thread_local! {
    /// The last second formatted on this thread, as `YYYY-MM-DDTHH:MM:SS`.
    static SECOND: std::cell::RefCell<(u64, [u8; 19])> = const {
        std::cell::RefCell::new((u64::MAX, [0; 19]))
    };
}

/// RFC 3339 UTC with milliseconds; the date and time of day are formatted once a second.
fn push_ts(out: &mut Vec<u8>, ts: SystemTime) {
    let since = ts.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs {
            let text = humantime::format_rfc3339_seconds(ts).to_string();
            if let Some(prefix) = text.as_bytes().get(..19) {
                cached.1.copy_from_slice(prefix);
                cached.0 = secs;
            }
        }
        out.extend_from_slice(&cached.1);
    });
    let ms = since.subsec_millis();
    out.extend_from_slice(&[
        b'.',
        b'0' + (ms / 100) as u8,
        b'0' + (ms / 10 % 10) as u8,
        b'0' + (ms % 10) as u8,
        b'Z',
    ]);
}

fn push_key(out: &mut Vec<u8>, key: &str) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
}

/// A JSON string: copied as it is when nothing in it needs escaping (the usual case),
/// otherwise escaped by serde_json.
fn push_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// Sends lines to the writer thread.
pub struct AccessLog {
    tx: Option<SyncSender<Vec<u8>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    dropped: IntCounter,
}

/// Lines buffered between request tasks and the writer before lines are dropped: 50 ms of
/// 650k requests per second.
const QUEUE: usize = 32 * 1024;

impl AccessLog {
    /// A log writing to stdout, or one that discards everything when `enabled` is false.
    pub fn stdout(enabled: bool, dropped: IntCounter) -> AccessLog {
        if !enabled {
            return AccessLog {
                tx: None,
                writer: Mutex::new(None),
                dropped,
            };
        }
        let (tx, rx) = sync_channel(QUEUE);
        let writer = std::thread::Builder::new()
            .name("ipgate-access-log".into())
            .spawn(move || write_lines(rx, std::io::stdout().lock()))
            .ok();
        AccessLog {
            tx: Some(tx),
            writer: Mutex::new(writer),
            dropped,
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn log(&self, entry: &Entry<'_>) {
        let Some(tx) = &self.tx else { return };
        let mut line = Vec::with_capacity(256);
        entry.write_json(&mut line);
        line.push(b'\n');
        match tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }

    /// Writes out what is queued and stops the writer (at shutdown).
    pub fn flush(&self) {
        let handle = self.writer.lock().ok().and_then(|mut w| w.take());
        if let (Some(handle), Some(tx)) = (handle, self.tx.as_ref()) {
            // An empty line asks the writer to stop after the queue drains.
            let _ = tx.send(Vec::new());
            let _ = handle.join();
        }
    }
}

/// How often the writer wakes to write what has queued. Waking per line would cost every
/// request a futex wake-up and a write system call; this way one write carries a batch, and a
/// line reaches stdout within this time.
const BATCH: std::time::Duration = std::time::Duration::from_millis(50);

fn write_lines(rx: Receiver<Vec<u8>>, out: impl Write) {
    use std::sync::mpsc::TryRecvError;
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, out);
    loop {
        std::thread::sleep(BATCH);
        loop {
            match rx.try_recv() {
                // An empty line asks the writer to stop: flush what came before it.
                Ok(line) if line.is_empty() => {
                    let _ = out.flush();
                    return;
                }
                Ok(line) => {
                    let _ = out.write_all(&line);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    let _ = out.flush();
                    return;
                }
            }
        }
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_json_and_escape_what_needs_it() {
        let e = Entry {
            ts: std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123),
            client: LoggedIp("203.0.113.77".parse().unwrap(), LogIp::Anonymized),
            method: "GET",
            host: "a.test",
            path: "/we\"ird\\path\u{1}é",
            proto: "HTTP/1.1",
            status: 200,
            site: "*",
            outcome: "proxied",
            duration: std::time::Duration::from_micros(12_034),
        };
        let mut out = Vec::new();
        e.write_json(&mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["ts"], "2023-11-14T22:13:20.123Z");
        // The same second again (from the cache), and the next one.
        let mut again = Vec::new();
        push_ts(&mut again, e.ts + std::time::Duration::from_millis(5));
        assert_eq!(again, b"2023-11-14T22:13:20.128Z");
        let mut next = Vec::new();
        push_ts(&mut next, e.ts + std::time::Duration::from_millis(900));
        assert_eq!(next, b"2023-11-14T22:13:21.023Z");
        assert_eq!(v["client"], "203.0.113.0");
        assert_eq!(v["path"], "/we\"ird\\path\u{1}é");
        assert_eq!(v["status"], 200);
        assert_eq!(v["duration_ms"], 12.034);
        assert_eq!(v.as_object().unwrap().len(), 10);
        let mut out = Vec::new();
        LoggedIp("198.51.100.7".parse().unwrap(), LogIp::Full).write_to(&mut out);
        assert_eq!(out, b"198.51.100.7");
    }

    #[test]
    fn anonymizes_to_24_and_48() {
        let v4: IpAddr = "203.0.113.77".parse().unwrap();
        let v6: IpAddr = "2001:db8:1:2:3:4:5:6".parse().unwrap();
        assert_eq!(LoggedIp(v4, LogIp::Anonymized).to_string(), "203.0.113.0");
        assert_eq!(LoggedIp(v6, LogIp::Anonymized).to_string(), "2001:db8:1::");
        assert_eq!(LoggedIp(v4, LogIp::Full).to_string(), "203.0.113.77");
        assert_eq!(LoggedIp(v6, LogIp::None).to_string(), "-");
    }
}
