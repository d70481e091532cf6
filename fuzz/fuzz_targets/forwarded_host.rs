//! X-Forwarded-For from a trusted peer, and Host (header, absolute-form target), as the
//! request path reads them. The input is split on '\n': the first line is the Host value,
//! the second the request target, the rest X-Forwarded-For lines.
#![no_main]
use std::net::IpAddr;

use ipgate::decide::policy::table::CidrTable;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let mut lines = bytes.split(|&b| b == b'\n');
    let host = lines.next().unwrap_or_default();
    let target = lines.next().unwrap_or_default();
    let mut req = http::Request::builder();
    if let Ok(uri) = http::Uri::try_from(target) {
        req = req.uri(uri);
    }
    let Ok(mut req) = req.body(()) else { return };
    if let Ok(v) = http::HeaderValue::from_bytes(host) {
        req.headers_mut().insert(http::header::HOST, v);
    }
    for line in lines {
        if let Ok(v) = http::HeaderValue::from_bytes(line) {
            req.headers_mut().append("x-forwarded-for", v);
        }
    }
    if let Ok(Some(h)) = ipgate::serve::request::host(&req) {
        // The name sites match: the start of the value forwarded, without port or trailing
        // dot, and itself a valid host (case is left to the matcher).
        let key = h.key();
        assert!(h.value.to_str().unwrap().starts_with(key));
        assert!(!key.ends_with('.'), "{key}");
        let again = ipgate::normalize::host::Host::parse(key).expect("a key is a host");
        assert_eq!(again.port, None);
        assert_eq!(again.key(), key);
    }
    let trusted = CidrTable::new(vec!["10.0.0.0/8".parse().unwrap()]);
    let peer: IpAddr = "10.1.2.3".parse().unwrap();
    if let Ok((client, chain)) = ipgate::serve::request::client(&trusted, peer, req.headers()) {
        let chain = chain.expect("a trusted peer's chain");
        // The client is untrusted, or it is the proxy itself; the chain after it is trusted.
        if !client.is_proxy {
            assert!(!trusted.contains(client.ip));
            assert_eq!(chain.first(), Some(&client.ip));
            assert!(chain[1..].iter().all(|ip| trusted.contains(*ip)));
        }
    }
});
