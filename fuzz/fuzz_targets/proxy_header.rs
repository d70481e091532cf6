//! The first bytes of a connection on a `proxy_protocol` listener.
#![no_main]
use ipgate::serve::client_addr::{parse_proxy_header, ProxyHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    match parse_proxy_header(bytes) {
        ProxyHeader::Complete { len, .. } => {
            // The header is within what was read, and reading more does not change it.
            assert!(len > 0 && len <= bytes.len(), "{len} of {}", bytes.len());
            let mut longer = bytes.to_vec();
            longer.extend_from_slice(b"GET / HTTP/1.1\r\n");
            assert!(matches!(
                parse_proxy_header(&longer),
                ProxyHeader::Complete { len: l, .. } if l == len
            ));
        }
        ProxyHeader::Incomplete | ProxyHeader::Invalid(_) => {}
    }
});
