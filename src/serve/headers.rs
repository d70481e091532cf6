//! What the upstream is told about a request: forwarding headers set from what
//! the gateway decided, client-address headers an untrusted peer may not set removed,
//! hop-by-hop headers stripped both ways, and HTTP/2 cookies joined for HTTP/1.1.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::serve::admission::Client;

const HOPS: usize = 9;
/// Hop-by-hop headers (RFC 9110 7.6.1, plus the legacy ones proxies still see).
/// `Connection` first: [`strip_hop_by_hop`] reads the names it lists.
const HOP_BY_HOP: [HeaderName; HOPS] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// A field named `close`, which a `Connection: close` makes hop-by-hop like any other.
const CLOSE: HeaderName = HeaderName::from_static("close");

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Headers that name a client, which an untrusted peer may not set: many PHP
/// applications believe the first one they find (the common "real IP" snippet reads
/// `HTTP_CLIENT_IP` first), so a hosted app's own address checks and logs could be forged.
pub static CLIENT_HEADERS: [HeaderName; 13] = [
    HeaderName::from_static("forwarded"),
    HeaderName::from_static("x-client-ip"),
    HeaderName::from_static("true-client-ip"),
    HeaderName::from_static("cf-connecting-ip"),
    HeaderName::from_static("x-cluster-client-ip"),
    HeaderName::from_static("client-ip"),
    HeaderName::from_static("x-forwarded"),
    HeaderName::from_static("forwarded-for"),
    HeaderName::from_static("x-originating-ip"),
    HeaderName::from_static("x-remote-ip"),
    HeaderName::from_static("x-remote-addr"),
    HeaderName::from_static("fastly-client-ip"),
    HeaderName::from_static("x-proxyuser-ip"),
];

/// Headers that override the request path in some PHP frameworks (Symfony, Zend, old
/// IIS rewrites): they could carry a request past `allow_only`, which judges the path
/// itself, so they are removed from every peer, trusted or not.
pub static PATH_OVERRIDE_HEADERS: [HeaderName; 2] = [
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
];

/// Whether a header names a client or overrides the path, or has an `_` in its name (see
/// [`remove_underscore_twins`]): one match on the name, so the common request (none of
/// them) costs a length test and a byte search per header.
fn is_untrusted_header(name: &HeaderName) -> bool {
    is_untrusted_name(name.as_str()) || name.as_str().contains('_')
}

fn is_untrusted_name(name: &str) -> bool {
    matches!(
        name,
        "forwarded"
            | "x-client-ip"
            | "true-client-ip"
            | "cf-connecting-ip"
            | "x-cluster-client-ip"
            | "client-ip"
            | "x-forwarded"
            | "forwarded-for"
            | "x-originating-ip"
            | "x-remote-ip"
            | "x-remote-addr"
            | "fastly-client-ip"
            | "x-proxyuser-ip"
            | "x-original-url"
            | "x-rewrite-url"
    )
}

/// Removes the headers whose name, with `_` read as `-`, is a client-address or path-override
/// header or one the gateway sets: CGI gateways such as PHP's read `Client_IP` and
/// `X_Forwarded_For` as `HTTP_CLIENT_IP` and `HTTP_X_FORWARDED_FOR`, the names of the real
/// ones. (Apache 2.4 drops such headers itself; other web servers do not.)
fn remove_underscore_twins(headers: &mut HeaderMap) {
    let twins: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().contains('_'))
        .filter(|k| {
            let dashed = k.as_str().replace('_', "-");
            is_untrusted_name(&dashed)
                || [
                    &X_FORWARDED_FOR,
                    &X_REAL_IP,
                    &X_FORWARDED_PROTO,
                    &X_FORWARDED_HOST,
                ]
                .iter()
                .any(|n| n.as_str() == dashed)
        })
        .cloned()
        .collect();
    for name in twins {
        headers.remove(name);
    }
}

/// What the forwarding headers are made from.
pub struct Forwarding<'a> {
    /// The client as decided.
    pub client: Client,
    /// The believable X-Forwarded-For chain, when the peer is a trusted proxy.
    pub chain: Option<&'a [IpAddr]>,
    /// The connection's client (the peer, or the PROXY header's source), formatted once.
    pub conn_client: IpAddr,
    pub conn_client_value: &'a HeaderValue,
    pub tls: bool,
    /// The Host to forward (`None`: HTTP/1.0 without one).
    pub host: Option<&'a HeaderValue>,
}

/// HTTP/2 may split cookies into several fields (RFC 9113 8.2.3); an HTTP/1.1 upstream
/// expects one, joined with `; `.
pub fn join_cookies(headers: &mut HeaderMap) {
    if headers.get_all(header::COOKIE).iter().nth(1).is_none() {
        return;
    }
    let joined: Vec<&[u8]> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        headers.insert(header::COOKIE, v);
    }
}

/// Removes the hop-by-hop headers and every header the `Connection` header names.
///
/// One pass over the message's few names finds which hop-by-hop headers are there; only
/// those are removed (a removal hashes the name, and most messages carry none or one).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut present = [false; HOPS];
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
        }
    }
    if !present.contains(&true) {
        return;
    }
    if present[0] {
        // The usual tokens are looked at apart, which keeps the common message free of an
        // allocation here: `keep-alive` and `upgrade` name headers removed below anyway.
        let mut close = false;
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|t| {
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                    return false;
                }
                !t.eq_ignore_ascii_case(b"keep-alive") && !t.eq_ignore_ascii_case(b"upgrade")
            })
            .filter_map(|t| HeaderName::from_bytes(t).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
        if close {
            headers.remove(CLOSE);
        }
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(name);
    }
}

/// A request's header fields as the upstream gets them: hop-by-hop ones stripped (a
/// WebSocket upgrade's `upgrade` token put back), the forwarding headers set, a Host for an
/// HTTP/1.0 request without one (`default_host`, the upstream's), and HTTP/2 cookies joined
/// for HTTP/1.1.
pub fn for_upstream(
    headers: &mut HeaderMap,
    version: http::Version,
    upgrade: Option<HeaderValue>,
    default_host: &str,
    f: &Forwarding<'_>,
) {
    strip_hop_by_hop(headers);
    if let Some(token) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, token);
    }
    add_forwarding_headers(headers, f);
    if f.host.is_none() {
        if let Ok(v) = HeaderValue::from_str(default_host) {
            headers.insert(header::HOST, v);
        }
    }
    if version == http::Version::HTTP_2 {
        join_cookies(headers);
    }
}

/// Sets X-Forwarded-For: from an untrusted peer, the peer alone, and the other
/// client-address headers removed; from a trusted one, the believable chain (the client and
/// the trusted proxies after it) with the peer appended. Sets X-Real-IP to the client as
/// decided, X-Forwarded-Proto and X-Forwarded-Host, and Host to what the client asked for.
pub fn add_forwarding_headers(headers: &mut HeaderMap, f: &Forwarding<'_>) {
    let xff = match f.chain {
        None => {
            // One pass over the request's few names, rather than a lookup per name.
            if headers.keys().any(is_untrusted_header) {
                for name in CLIENT_HEADERS.iter().chain(&PATH_OVERRIDE_HEADERS) {
                    headers.remove(name);
                }
                remove_underscore_twins(headers);
            }
            Ok(f.conn_client_value.clone())
        }
        Some(chain) => {
            if headers.keys().any(is_untrusted_header) {
                for name in &PATH_OVERRIDE_HEADERS {
                    headers.remove(name);
                }
                remove_underscore_twins(headers);
            }
            let mut text = String::with_capacity(16 * (chain.len() + 1));
            let mut buf = [0u8; 64];
            for ip in chain {
                text.push_str(format_ip(*ip, &mut buf));
                text.push_str(", ");
            }
            text.push_str(f.conn_client_value.to_str().unwrap_or(""));
            HeaderValue::from_str(&text)
        }
    };
    if let Ok(v) = xff {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    let real_ip = if f.client.ip == f.conn_client {
        Ok(f.conn_client_value.clone())
    } else {
        let mut buf = [0u8; 64];
        HeaderValue::from_str(format_ip(f.client.ip, &mut buf))
    };
    if let Ok(v) = real_ip {
        headers.insert(X_REAL_IP.clone(), v);
    }
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if f.tls { "https" } else { "http" }),
    );
    if let Some(host) = f.host {
        headers.insert(X_FORWARDED_HOST.clone(), host.clone());
        // The upstream's virtual hosts see the name the client asked for.
        headers.insert(header::HOST, host.clone());
    } else {
        headers.remove(&X_FORWARDED_HOST);
    }
}

/// Formats an address into a stack buffer (no allocation on the request path; IPv4, the
/// usual case, without the `fmt` machinery).
pub fn format_ip(ip: IpAddr, buf: &mut [u8; 64]) -> &str {
    let len = match ip {
        IpAddr::V4(v4) => {
            let mut n = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                let mut digits = itoa::Buffer::new();
                let d = digits.format(octet).as_bytes();
                buf[n..n + d.len()].copy_from_slice(d);
                n += d.len();
            }
            n
        }
        IpAddr::V6(v6) => {
            use std::io::Write;
            let mut cursor = std::io::Cursor::new(&mut buf[..]);
            let _ = write!(cursor, "{v6}");
            cursor.position() as usize
        }
    };
    std::str::from_utf8(&buf[..len]).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_addresses() {
        let mut buf = [0u8; 64];
        for ip in [
            "0.0.0.0",
            "255.255.255.255",
            "10.2.30.104",
            "2001:db8::1",
            "::ffff:1.2.3.4",
        ] {
            let parsed: IpAddr = ip.parse().unwrap();
            assert_eq!(format_ip(parsed, &mut buf), parsed.to_string());
        }
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-end-to-end", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-end-to-end"));
    }

    /// Each hop-by-hop header is removed whatever else the message holds: alone, repeated,
    /// or beside a `Connection` whose value has a byte outside ASCII (the names it lists are
    /// still removed, `close` among them), and a message with none keeps all its fields.
    #[test]
    fn strips_each_hop_by_hop_header_in_any_company() {
        for name in HOP_BY_HOP.iter() {
            let mut h = HeaderMap::new();
            h.append(name, HeaderValue::from_static("1"));
            h.append(name, HeaderValue::from_static("2"));
            h.insert("x-end-to-end", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h);
            assert!(!h.contains_key(name), "{name}");
            assert_eq!(h.len(), 1, "{name}");
        }
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_bytes(b"x-hop,\xe9t\xe9, Close").unwrap(),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("close", HeaderValue::from_static("listed by Connection"));
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty(), "{h:?}");
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a.test"));
        h.insert("x-end-to-end", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
    }

    /// The headers forwarded for a request that arrived with every client-address header
    /// spoofed, from connection peer `conn`, judged to come from `client` through `chain`.
    fn forward_spoofed(client: &str, conn: &str, chain: Option<&[IpAddr]>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        for name in CLIENT_HEADERS.iter().chain(&PATH_OVERRIDE_HEADERS) {
            h.insert(name, HeaderValue::from_static("6.6.6.6"));
        }
        let host = HeaderValue::from_static("a.test");
        let conn_client_value = HeaderValue::from_str(conn).unwrap();
        let forwarding = Forwarding {
            client: Client {
                ip: client.parse().unwrap(),
                is_proxy: false,
            },
            chain,
            conn_client: conn.parse().unwrap(),
            conn_client_value: &conn_client_value,
            tls: true,
            host: Some(&host),
        };
        add_forwarding_headers(&mut h, &forwarding);
        h
    }

    #[test]
    fn an_untrusted_peer_cannot_name_a_client() {
        let h = forward_spoofed("192.0.2.7", "192.0.2.7", None);
        assert_eq!(h[&X_FORWARDED_FOR], "192.0.2.7");
        assert_eq!(h[&X_REAL_IP], "192.0.2.7");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert_eq!(h[&X_FORWARDED_HOST], "a.test");
        for name in CLIENT_HEADERS.iter().chain(&PATH_OVERRIDE_HEADERS) {
            assert!(!h.contains_key(name), "{name}");
        }
    }

    #[test]
    fn a_trusted_peer_forwards_the_believable_chain() {
        let chain: Vec<IpAddr> = vec!["198.51.100.1".parse().unwrap(), "10.0.0.2".parse().unwrap()];
        let h = forward_spoofed("198.51.100.1", "10.0.0.1", Some(&chain));
        assert_eq!(h[&X_FORWARDED_FOR], "198.51.100.1, 10.0.0.2, 10.0.0.1");
        assert_eq!(h[&X_REAL_IP], "198.51.100.1");
        // A trusted front proxy may set these (a CDN's CF-Connecting-IP): passed on.
        assert!(h.contains_key("cf-connecting-ip"));
        // A path override is never passed on, whoever sent it.
        for name in &PATH_OVERRIDE_HEADERS {
            assert!(!h.contains_key(name), "{name}");
        }
    }

    #[test]
    fn the_quick_name_test_knows_every_listed_header() {
        for name in CLIENT_HEADERS.iter().chain(&PATH_OVERRIDE_HEADERS) {
            assert!(is_untrusted_header(name), "{name}");
        }
        let listed = CLIENT_HEADERS.len() + PATH_OVERRIDE_HEADERS.len();
        assert_eq!(
            listed, 15,
            "a name added to a list is added to the match too"
        );
        for name in ["host", "x-forwarded-for", "cookie", "x-real-ip", "accept"] {
            assert!(!is_untrusted_header(&HeaderName::from_static(name)));
        }
        assert!(is_untrusted_header(&HeaderName::from_static("client_ip")));
    }

    #[test]
    fn underscore_twins_of_the_headers_that_name_a_client_are_removed() {
        let mut h = HeaderMap::new();
        for name in [
            "client_ip",
            "x_forwarded_for",
            "x_real_ip",
            "x_original_url",
            "my_app",
        ] {
            h.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static("6.6.6.6"),
            );
        }
        remove_underscore_twins(&mut h);
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(
            left,
            ["my_app"],
            "an app's own header with an underscore stays"
        );
    }

    #[test]
    fn http2_cookies_are_joined() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        join_cookies(&mut h);
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(h[header::COOKIE], "a=1; b=2");
    }
}
