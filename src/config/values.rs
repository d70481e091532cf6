//! Defaults, as typed constants, and the parsers of single values (durations, targets,
//! addresses, upstream URLs, match paths) that the compiler and the admin API share.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use super::report::Report;

const DAY: u64 = 24 * 3600;
pub const MAX_RETENTION: Duration = Duration::from_secs(30 * DAY);
pub const DEFAULT_BAN: Duration = Duration::from_secs(3600);
pub const MAX_BAN: Duration = Duration::from_secs(7 * DAY);
pub const BAN_FACTOR: f64 = 2.0;
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(15);
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
pub const MAX_CONNECTIONS: usize = 20_000;
pub const MAX_CONNECTIONS_PER_CLIENT: u32 = 256;
pub const HTTP2_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const UPGRADE_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
pub const WRITE_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A quarter of Apache's default 150 workers (37), rounded down to a power of two: one
/// address cannot hold a hosted site's PHP pool, while a browser's burst (6 HTTP/1.1
/// connections, or 100 HTTP/2 streams of small requests) waits its turn in the queue.
pub const MAX_REQUESTS_PER_CLIENT: u32 = 32;
/// Streaming uploads of one client at once (Nextcloud's desktop client sends 6 files in
/// parallel).
pub const MAX_UPLOADS_PER_CLIENT: u32 = 8;
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(20);
pub const REQUEST_BUFFER_BYTES: usize = 64 * 1024;
/// Largest `limits.request_buffer_bytes`: memory a client can hold per request in flight.
pub const MAX_REQUEST_BUFFER_BYTES: usize = 16 * 1024 * 1024;
pub const UPSTREAM_QUEUE_TIMEOUT: Duration = Duration::from_secs(5);
pub const HTTP2_MAX_STREAMS: u32 = 128;
pub const MAX_TRACKED_CLIENTS: usize = 100_000;
pub const STATE_DIR: &str = "/var/lib/ipgate";
pub const ADMIN_ADDR: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    9191,
));
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
pub const REQUESTS_PER_SECOND: f64 = 50.0;
pub const BURST: u32 = 100;
pub const IPV6_PREFIX: u8 = 64;
/// `rate_limit.network`'s default network sizes: an IPv4 /24, an IPv6 /48 (a site's
/// allocation).
pub const NETWORK_IPV4_PREFIX: u8 = 24;
pub const NETWORK_IPV6_PREFIX: u8 = 48;
/// Largest `jail.hits`: a client's counter keeps the time of each failure in the window.
pub const MAX_HITS: u32 = 1000;
/// 2^18 SHA-256 hashes on average: about a second on a mid-range phone (docs/challenge.md).
pub const CHALLENGE_DIFFICULTY: u8 = 18;
pub const MAX_CHALLENGE_DIFFICULTY: u8 = 28;
pub const PASS_TTL: Duration = Duration::from_secs(DAY);
pub const PUZZLE_TTL: Duration = Duration::from_secs(300);
pub const AUTO_IN_FLIGHT: u32 = 64;
pub const AUTO_RESPONSE_TIME: Duration = Duration::from_secs(2);
pub const AUTO_CALM: Duration = Duration::from_secs(30);
/// About 20 MB of passes.
pub const MAX_PASSES: usize = 100_000;

/// A route or jail path prefix, in the normal form request paths are matched in.
pub(super) fn match_path(r: &mut Report, key: &str, text: &str) -> String {
    match crate::normalize::path::normalize(text) {
        Ok(p) => p.into_owned(),
        Err(crate::normalize::path::Error::NotAbsolute) => {
            r.key(key, "must start with '/'");
            text.to_string()
        }
        Err(e) => {
            r.key(key, format!("'{text}': {e}"));
            text.to_string()
        }
    }
}

/// An optional duration key: its value, or `default` when absent.
pub(super) fn dur(r: &mut Report, key: &str, value: Option<&str>, default: Duration) -> Duration {
    value.map_or(default, |text| required_dur(r, key, text))
}

/// A duration key that must be given.
pub(super) fn required_dur(r: &mut Report, key: &str, text: &str) -> Duration {
    parse_duration(text).unwrap_or_else(|e| {
        r.key(key, e);
        Duration::from_secs(1)
    })
}

/// Parses durations (`90s`, `10m`, `1h`, `7d`, or combinations like `1h30m`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| format!("'{text}' is not a duration like 90s, 10m, 1h or 7d ({e})"))?;
    if d.is_zero() {
        return Err(format!("'{text}': a duration must be longer than zero"));
    }
    Ok(d)
}

/// Parses an address or CIDR; a bare address is its /32 or /128. IPv4-mapped IPv6 becomes IPv4.
pub fn parse_target(text: &str) -> Result<IpNet, String> {
    let t = text.trim();
    let net = if t.contains('/') {
        t.parse::<IpNet>()
            .map_err(|_| format!("'{t}' is not an IP address or CIDR"))?
    } else {
        let ip: std::net::IpAddr = t
            .parse()
            .map_err(|_| format!("'{t}' is not an IP address or CIDR"))?;
        IpNet::from(ip)
    };
    Ok(canonical(net))
}

/// Host bits cleared, IPv4-mapped IPv6 (`::ffff:a.b.c.d/96+n`) turned into IPv4.
pub fn canonical(net: IpNet) -> IpNet {
    let net = net.trunc();
    if let IpNet::V6(v6) = net {
        if let Some(v4) = v6.addr().to_ipv4_mapped() {
            if v6.prefix_len() >= 96 {
                if let Ok(n) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96) {
                    return IpNet::V4(n.trunc());
                }
            }
        }
    }
    net
}

pub(super) fn cidr(r: &mut Report, key: &str, text: &str) -> Option<IpNet> {
    parse_target(text).map_err(|e| r.key(key, e)).ok()
}

pub(super) fn socket_addr(r: &mut Report, key: &str, text: &str) -> Option<SocketAddr> {
    text.parse()
        .map_err(|_| {
            r.key(
                key,
                format!("'{text}' is not an address with port, like 127.0.0.1:8443 or [::1]:8443"),
            )
        })
        .ok()
}

pub(super) fn upstream_uri(r: &mut Report, key: &str, text: &str) -> http::Uri {
    let fallback = http::Uri::from_static("http://127.0.0.1");
    let uri: http::Uri = match text.parse() {
        Ok(u) => u,
        Err(e) => {
            r.key(key, format!("'{text}' is not a URL: {e}"));
            return fallback;
        }
    };
    if uri.scheme_str() != Some("http") {
        r.key(
            key,
            format!("'{text}': only http:// upstreams are supported (TLS ends at ipgate)"),
        );
        return fallback;
    }
    if uri.authority().is_none() {
        r.key(key, format!("'{text}' has no host"));
        return fallback;
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        r.key(
            key,
            format!("'{text}': an upstream is scheme://host:port, without a path"),
        );
    }
    uri
}

pub(super) fn resolve(base: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}
