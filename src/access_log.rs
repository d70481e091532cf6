//! The access log: one JSON line per request on stdout, with the client address written the
//! way `privacy.log_ip` says. Lines go through a bounded channel to a writer thread, so the
//! request path never blocks on stdout; when the writer falls behind, lines are dropped and
//! counted rather than delaying traffic.

use std::fmt;
use std::io::Write;
use std::net::IpAddr;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::SystemTime;

use prometheus::IntCounter;
use serde::Serialize;

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

impl Serialize for LoggedIp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One request's line.
#[derive(Serialize)]
pub struct Entry<'a> {
    #[serde(serialize_with = "rfc3339")]
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
    pub duration_ms: f64,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

/// Sends lines to the writer thread.
pub struct AccessLog {
    tx: Option<SyncSender<Vec<u8>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    dropped: IntCounter,
}

/// Lines buffered between request tasks and the writer before lines are dropped.
const QUEUE: usize = 16 * 1024;

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
        if serde_json::to_writer(&mut line, entry).is_err() {
            return;
        }
        line.push(b'\n');
        match tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }

    /// Writes out what is queued and stops the writer (at shutdown).
    pub fn flush(&self) {
        // Dropping every sender ends the writer's loop; this one is the last outside tasks
        // that have finished by now.
        let handle = self.writer.lock().ok().and_then(|mut w| w.take());
        if let (Some(handle), Some(tx)) = (handle, self.tx.as_ref()) {
            // An empty line asks the writer to stop after the queue drains.
            let _ = tx.send(Vec::new());
            let _ = handle.join();
        }
    }
}

fn write_lines(rx: Receiver<Vec<u8>>, out: impl Write) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    while let Ok(line) = rx.recv() {
        if line.is_empty() {
            break;
        }
        let _ = out.write_all(&line);
        // Batch what is already queued, then flush so lines appear promptly.
        while let Ok(more) = rx.try_recv() {
            if more.is_empty() {
                let _ = out.flush();
                return;
            }
            let _ = out.write_all(&more);
        }
        let _ = out.flush();
    }
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

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
