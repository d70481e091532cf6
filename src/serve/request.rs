//! A request checked before any decision is made about it: one valid
//! host, a path in normal form, the client behind trusted proxies, and no method or upgrade
//! the gateway does not forward. Whatever could mean one thing to the policy and another to
//! the upstream is refused here with 400 (or 405), so both see the same request.

use std::borrow::Cow;
use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Uri, Version};

use crate::decide::policy::table::CidrTable;
use crate::normalize::host::Host;
use crate::normalize::path;
use crate::serve::admission::Client;
use crate::serve::client_addr;

/// Why a request is refused before the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("HTTP/1.1 request without Host")]
    NoHost,
    #[error("more than one Host header")]
    TwoHosts,
    #[error("Host is not a valid host[:port]")]
    BadHost,
    #[error(":authority and Host disagree")]
    HostMismatch,
    #[error("{0}")]
    Path(#[from] path::Error),
    #[error("{0}")]
    ForwardedFor(#[from] client_addr::Malformed),
    #[error("CONNECT is not forwarded")]
    Connect,
}

/// A request's validated host: the value to forward, and the name sites match (its prefix
/// without port and trailing dot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostValue {
    pub value: HeaderValue,
    key_len: usize,
}

impl HostValue {
    fn new(value: HeaderValue, host: &Host<'_>) -> HostValue {
        HostValue {
            key_len: host.key().len(),
            value,
        }
    }

    /// The name sites are matched with (case is left to the matcher).
    pub fn key(&self) -> &str {
        self.value
            .to_str()
            .ok()
            .and_then(|v| v.get(..self.key_len))
            .unwrap_or("")
    }
}

/// The Host to forward: the request's authority (HTTP/2 `:authority`, or an absolute-form
/// target) or its single Host header, validated. `None` only for HTTP/1.0 without Host.
pub fn host<B>(req: &Request<B>) -> Result<Option<HostValue>, Invalid> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err(Invalid::TwoHosts);
    }
    if let Some(authority) = req.uri().authority() {
        let from_uri = Host::parse(authority.as_str()).ok_or(Invalid::BadHost)?;
        if let Some(h) = header {
            let agrees = h
                .to_str()
                .ok()
                .and_then(Host::parse)
                .is_some_and(|h| h.same_as(&from_uri));
            if !agrees {
                return Err(Invalid::HostMismatch);
            }
        }
        let value = HeaderValue::from_str(authority.as_str()).map_err(|_| Invalid::BadHost)?;
        return Ok(Some(HostValue::new(value, &from_uri)));
    }
    match header {
        Some(h) => {
            let host = h
                .to_str()
                .ok()
                .and_then(Host::parse)
                .ok_or(Invalid::BadHost)?;
            Ok(Some(HostValue::new(h.clone(), &host)))
        }
        None if req.version() <= Version::HTTP_10 => Ok(None),
        None => Err(Invalid::NoHost),
    }
}

/// The path decisions are made on and the upstream receives, normalized. CONNECT
/// is 405; `*` is only for OPTIONS.
pub fn path<'a>(method: &Method, uri: &'a Uri) -> Result<Cow<'a, str>, Invalid> {
    if method == Method::CONNECT {
        return Err(Invalid::Connect);
    }
    let p = uri.path();
    if p == "*" && method == Method::OPTIONS {
        return Ok(Cow::Borrowed(p));
    }
    Ok(path::normalize(p)?)
}

/// Who the client is at request level: from a trusted peer, the rightmost
/// untrusted X-Forwarded-For address, with the chain that can be believed; from anyone
/// else, the connection's client, and X-Forwarded-For is not read at all.
pub fn client(
    trusted: &CidrTable,
    conn_client: IpAddr,
    headers: &HeaderMap,
) -> Result<(Client, Option<Vec<IpAddr>>), Invalid> {
    if trusted.is_empty() || !trusted.contains(conn_client) {
        let client = Client {
            ip: conn_client,
            is_proxy: false,
        };
        return Ok((client, None));
    }
    let forwarded = client_addr::from_forwarded_for(headers, trusted)?;
    let client = match forwarded.client {
        Some(ip) => Client {
            ip,
            is_proxy: false,
        },
        None => Client {
            ip: conn_client,
            is_proxy: true,
        },
    };
    Ok((client, Some(forwarded.chain)))
}

/// The `Upgrade` value of an HTTP/1.1 upgrade request, when it is a WebSocket: other
/// protocols (`h2c`, anything else) are not passed on, and the request goes on without.
pub fn websocket_upgrade<B>(req: &Request<B>) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 {
        return None;
    }
    let wants = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !wants {
        return None;
    }
    req.headers()
        .get(header::UPGRADE)
        .filter(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, uri: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::builder().version(version).uri(uri);
        for h in hosts {
            b = b.header("host", *h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn one_valid_host_is_required_on_http_1_1() {
        let v11 = Version::HTTP_11;
        assert_eq!(host(&req(v11, "/", &[])), Err(Invalid::NoHost));
        assert_eq!(
            host(&req(v11, "/", &["a.test", "a.test"])),
            Err(Invalid::TwoHosts)
        );
        assert_eq!(host(&req(v11, "/", &["a test"])), Err(Invalid::BadHost));
        let h = host(&req(v11, "/", &["a.test:8443"])).unwrap().unwrap();
        assert_eq!(
            (h.value.to_str().unwrap(), h.key()),
            ("a.test:8443", "a.test")
        );
        assert_eq!(host(&req(Version::HTTP_10, "/", &[])), Ok(None));
    }

    #[test]
    fn authority_and_host_must_agree() {
        let v2 = Version::HTTP_2;
        assert_eq!(
            host(&req(v2, "https://a.test/", &["b.test"])),
            Err(Invalid::HostMismatch)
        );
        let agreed = host(&req(v2, "https://a.test/", &["A.test."]))
            .unwrap()
            .unwrap();
        assert_eq!(agreed.value, "a.test");
        let alone = host(&req(v2, "https://a.test/", &[])).unwrap().unwrap();
        assert_eq!(alone.value, "a.test");
    }

    #[test]
    fn host_keys_drop_port_and_trailing_dot() {
        let h = host(&req(Version::HTTP_11, "/", &["B.test.:8443"]))
            .unwrap()
            .unwrap();
        assert_eq!(h.key(), "B.test");
        let h = host(&req(Version::HTTP_11, "/", &["[2001:db8::1]:443"]))
            .unwrap()
            .unwrap();
        assert_eq!(h.key(), "[2001:db8::1]");
    }

    #[test]
    fn connect_is_refused_and_star_is_for_options() {
        let star: Uri = "*".parse().unwrap();
        assert_eq!(path(&Method::OPTIONS, &star).unwrap(), "*");
        assert!(path(&Method::GET, &star).is_err());
        let authority: Uri = "a.test:443".parse().unwrap();
        assert_eq!(path(&Method::CONNECT, &authority), Err(Invalid::Connect));
    }

    #[test]
    fn only_websocket_upgrades_pass() {
        let up = |token: &str| {
            let r = Request::builder()
                .header("connection", "Upgrade")
                .header("upgrade", token)
                .body(())
                .unwrap();
            websocket_upgrade(&r)
        };
        assert!(up("websocket").is_some());
        assert!(up("WebSocket").is_some());
        assert!(up("h2c").is_none());
        assert!(up("TLS/1.2").is_none());
    }
}
