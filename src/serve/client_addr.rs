//! The client address: the TCP peer; on a `proxy_protocol` listener, the source in
//! the PROXY header (v1 or v2, parsed by `ppp`) sent by a trusted peer; at request level, from
//! a trusted peer, the rightmost X-Forwarded-For address that is not itself trusted.
//! IPv4-mapped IPv6 is IPv4 everywhere.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::HeaderMap;
use ppp::{HeaderResult, PartialResult};
use tokio::net::TcpStream;

use crate::decide::policy::table::CidrTable;

/// An address with IPv4-mapped IPv6 turned into IPv4.
#[inline]
pub fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

pub fn peer(addr: SocketAddr) -> IpAddr {
    normalize(addr.ip())
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("no valid PROXY header: {0}")]
    Invalid(String),
    #[error("connection closed before the PROXY header was complete")]
    Closed,
    #[error("PROXY header incomplete after the handshake timeout")]
    Timeout,
    #[error("read error: {0}")]
    Io(#[from] std::io::Error),
}

/// Longest PROXY header read: v1 is at most 107 bytes; v2 is 16 + addresses + TLVs, and
/// TLVs beyond this are not something a front proxy of a hosting box sends.
const MAX_HEADER: usize = 1024;

/// Reads and consumes the PROXY header at the start of `tcp`, leaving the bytes after it
/// unread. Returns the source address it carries, or `None` for a v2 LOCAL command or a v1
/// UNKNOWN (health checks by the proxy itself: use the peer).
pub async fn read_proxy_header(
    tcp: &mut TcpStream,
    timeout: Duration,
) -> Result<Option<IpAddr>, ProxyHeaderError> {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; MAX_HEADER];
    let mut last = 0;
    loop {
        // Peek, so that nothing past the header is taken from the socket.
        let n = tokio::time::timeout_at(deadline, tcp.peek(&mut buf))
            .await
            .map_err(|_| ProxyHeaderError::Timeout)??;
        if n == 0 {
            return Err(ProxyHeaderError::Closed);
        }
        let (len, source) = match parse_proxy_header(&buf[..n]) {
            ProxyHeader::Incomplete => {
                if n >= MAX_HEADER {
                    return Err(ProxyHeaderError::Invalid("header too long".into()));
                }
                if n == last {
                    // peek returns at once while data is buffered: wait for more to arrive.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    if tokio::time::Instant::now() >= deadline {
                        return Err(ProxyHeaderError::Timeout);
                    }
                }
                last = n;
                continue;
            }
            ProxyHeader::Invalid(why) => return Err(ProxyHeaderError::Invalid(why)),
            ProxyHeader::Complete { len, source } => (len, source),
        };
        // Take exactly the header off the socket; what follows is TLS or HTTP.
        tcp.read_exact(&mut buf[..len.min(MAX_HEADER)]).await?;
        return Ok(source.map(normalize));
    }
}

/// What the first bytes of a connection say as a PROXY header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyHeader {
    /// More bytes are needed.
    Incomplete,
    Invalid(String),
    /// A header of `len` bytes; `source` is `None` for a v2 LOCAL or a v1 UNKNOWN.
    Complete {
        len: usize,
        source: Option<IpAddr>,
    },
}

/// Reads a PROXY v1 or v2 header at the start of `bytes` (with ppp). Pure, so it is fuzzed
/// (`fuzz/fuzz_targets/proxy_header.rs`).
pub fn parse_proxy_header(bytes: &[u8]) -> ProxyHeader {
    let parsed = HeaderResult::parse(bytes);
    if parsed.is_incomplete() {
        // A v1 header ends at its CRLF: with the CRLF here, "incomplete" means malformed.
        if bytes.starts_with(b"PROXY ") && bytes.windows(2).any(|w| w == b"\r\n") {
            return ProxyHeader::Invalid("malformed v1 header".into());
        }
        return ProxyHeader::Incomplete;
    }
    let (len, source) = match parsed {
        // ppp takes a bare LF as the end when nothing follows it, though it refuses the same
        // header with bytes after it: the answer must not depend on how TCP split the bytes
        // (found by fuzz/fuzz_targets/proxy_header.rs).
        HeaderResult::V1(Ok(h)) if !h.header.ends_with("\r\n") => {
            return ProxyHeader::Invalid("a v1 header ends in CRLF".into())
        }
        HeaderResult::V1(Ok(h)) => {
            let source = match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => Some(IpAddr::V4(a.source_address)),
                ppp::v1::Addresses::Tcp6(a) => Some(IpAddr::V6(a.source_address)),
                ppp::v1::Addresses::Unknown => None,
            };
            (h.header.len(), source)
        }
        HeaderResult::V2(Ok(h)) => {
            let source = match (h.command, h.addresses) {
                (ppp::v2::Command::Local, _) => None,
                (_, ppp::v2::Addresses::IPv4(a)) => Some(IpAddr::V4(a.source_address)),
                (_, ppp::v2::Addresses::IPv6(a)) => Some(IpAddr::V6(a.source_address)),
                (_, other) => {
                    return ProxyHeader::Invalid(format!("unsupported address family {other:?}"))
                }
            };
            (h.len(), source)
        }
        HeaderResult::V1(Err(e)) => return ProxyHeader::Invalid(e.to_string()),
        HeaderResult::V2(Err(e)) => return ProxyHeader::Invalid(e.to_string()),
    };
    ProxyHeader::Complete { len, source }
}

/// An X-Forwarded-For element that is neither an address nor `address:port`:
/// the request is refused rather than blamed on the proxy that sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed X-Forwarded-For element")]
pub struct Malformed;

/// What X-Forwarded-For says, read from the right through trusted proxies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    /// The first address from the right that is not trusted; `None` when there is no
    /// header or every address in it is trusted (then the peer stands).
    pub client: Option<IpAddr>,
    /// The part of the header that can be believed, left to right: the client and the
    /// trusted proxies after it. What is left of the client is the client's own say.
    pub chain: Vec<IpAddr>,
}

/// The client behind trusted proxies: walking X-Forwarded-For from the right, the first
/// address that is not trusted. Elements may carry a port (`192.0.2.1:5678`,
/// `[2001:db8::1]:443`, as some load balancers send); one that cannot be read before the
/// client is found is [`Malformed`]. Elements left of the client are never read.
pub fn from_forwarded_for(
    headers: &HeaderMap,
    trusted: &CidrTable,
) -> Result<Forwarded, Malformed> {
    let mut chain = Vec::new();
    // Later header lines are to the right of earlier ones.
    for value in headers.get_all("x-forwarded-for").iter().rev() {
        let text = value.to_str().map_err(|_| Malformed)?;
        for part in text.rsplit(',') {
            let ip = parse_element(part).ok_or(Malformed)?;
            chain.push(ip);
            if !trusted.contains(ip) {
                chain.reverse();
                return Ok(Forwarded {
                    client: Some(ip),
                    chain,
                });
            }
        }
    }
    chain.reverse();
    Ok(Forwarded {
        client: None,
        chain,
    })
}

/// One X-Forwarded-For element: `ip`, `ip:port`, `[v6]` or `[v6]:port`.
pub fn parse_element(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    let ip = if let Some(rest) = text.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        IpAddr::V6(v6.parse().ok()?)
    } else if let Ok(ip) = text.parse::<IpAddr>() {
        ip
    } else {
        let (v4, port) = text.split_once(':')?;
        if !is_port(port) {
            return None;
        }
        IpAddr::V4(v4.parse().ok()?)
    };
    Some(normalize(ip))
}

fn is_port(digits: &str) -> bool {
    !digits.is_empty()
        && digits.len() <= 5
        && digits.bytes().all(|b| b.is_ascii_digit())
        && digits.parse::<u16>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_v1_header_ends_in_crlf_however_the_bytes_were_split() {
        let bare = b"PROXY TCP4 192.0.2.7 10.0.0.1 4 443\n";
        assert!(matches!(parse_proxy_header(bare), ProxyHeader::Invalid(_)));
        let mut more = bare.to_vec();
        more.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert!(matches!(parse_proxy_header(&more), ProxyHeader::Invalid(_)));
        let good = b"PROXY TCP4 192.0.2.7 10.0.0.1 4 443\r\nGET /";
        assert_eq!(
            parse_proxy_header(good),
            ProxyHeader::Complete {
                len: 37,
                source: Some("192.0.2.7".parse().unwrap())
            }
        );
        assert_eq!(
            parse_proxy_header(b"PROXY TCP4 192.0.2.7"),
            ProxyHeader::Incomplete
        );
    }

    fn trusted() -> CidrTable {
        CidrTable::new(vec![
            "10.0.0.0/8".parse().unwrap(),
            "192.0.2.1/32".parse().unwrap(),
        ])
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    #[test]
    fn takes_the_rightmost_untrusted_address() {
        let t = trusted();
        let got = |v: &[&str]| {
            from_forwarded_for(&xff(v), &t)
                .unwrap()
                .client
                .map(|i| i.to_string())
        };
        assert_eq!(got(&["198.51.100.1"]).as_deref(), Some("198.51.100.1"));
        // A spoofed left part is ignored: the rightmost untrusted wins.
        assert_eq!(
            got(&["6.6.6.6, 198.51.100.1, 10.1.1.1"]).as_deref(),
            Some("198.51.100.1")
        );
        assert_eq!(
            got(&["6.6.6.6", "198.51.100.2, 192.0.2.1"]).as_deref(),
            Some("198.51.100.2")
        );
        assert_eq!(
            got(&["::ffff:198.51.100.3"]).as_deref(),
            Some("198.51.100.3")
        );
        assert_eq!(got(&["10.0.0.1, 192.0.2.1"]), None);
        assert_eq!(got(&[]), None);
        // Left of the client is the client's own say: never read.
        assert_eq!(
            got(&["garbage, 198.51.100.4"]).as_deref(),
            Some("198.51.100.4")
        );
    }

    #[test]
    fn the_believable_chain_starts_at_the_client() {
        let f =
            from_forwarded_for(&xff(&["6.6.6.6, 198.51.100.1:443, 10.1.1.1"]), &trusted()).unwrap();
        let chain: Vec<String> = f.chain.iter().map(|i| i.to_string()).collect();
        assert_eq!(chain, ["198.51.100.1", "10.1.1.1"]);
    }

    #[test]
    fn elements_may_carry_ports() {
        let t = trusted();
        for (v, want) in [
            ("192.0.2.9:5678", "192.0.2.9"),
            ("[2001:db8::1]:443", "2001:db8::1"),
            ("[2001:db8::2]", "2001:db8::2"),
            ("2001:db8::3", "2001:db8::3"),
            (" 198.51.100.7:1 , 10.0.0.1:80", "198.51.100.7"),
        ] {
            let got = from_forwarded_for(&xff(&[v]), &t).unwrap().client;
            assert_eq!(got.map(|i| i.to_string()).as_deref(), Some(want), "{v}");
        }
    }

    #[test]
    fn malformed_elements_are_refused() {
        let t = trusted();
        for v in [
            "garbage",
            "unknown",
            "",
            "198.51.100.1,",
            "198.51.100.1:",
            "198.51.100.1:99999",
            "198.51.100.1:8x",
            "[2001:db8::1",
            "[2001:db8::1]443",
            "[198.51.100.1]",
            "2001:db8::1:443:x",
            "garbage, 10.0.0.1",
        ] {
            assert_eq!(from_forwarded_for(&xff(&[v]), &t), Err(Malformed), "{v:?}");
        }
    }
}
