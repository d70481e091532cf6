//! The host a request is for: a Host header or `:authority` is a valid
//! `host[:port]` or the request is refused; sites match the name without its port, in any
//! case and with one trailing dot ignored, so `B.test.` is the site `b.test`.

use std::net::Ipv6Addr;

/// A validated `host[:port]`, borrowed from the header it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host<'a> {
    /// The name as sent, without port: a DNS name, an IPv4 address or `[IPv6]`.
    pub name: &'a str,
    pub port: Option<u16>,
}

impl<'a> Host<'a> {
    /// Parses a Host value. `None` for anything that is not a `host[:port]`: empty, a
    /// character outside a DNS name, user info, a bad port, a bad IPv6 literal, two dots.
    pub fn parse(value: &'a str) -> Option<Host<'a>> {
        let (name, port) = if let Some(rest) = value.strip_prefix('[') {
            let end = rest.find(']')?;
            rest[..end].parse::<Ipv6Addr>().ok()?;
            let name = &value[..end + 2];
            (name, &value[end + 2..])
        } else {
            match value.find(':') {
                Some(p) => (&value[..p], &value[p..]),
                None => (value, ""),
            }
        };
        let port = match port.strip_prefix(':') {
            None if port.is_empty() => None,
            None => return None,
            Some(digits) => {
                if digits.is_empty() || digits.len() > 5 {
                    return None;
                }
                let mut n: u32 = 0;
                for b in digits.bytes() {
                    if !b.is_ascii_digit() {
                        return None;
                    }
                    n = n * 10 + u32::from(b - b'0');
                }
                Some(u16::try_from(n).ok()?)
            }
        };
        if !name.starts_with('[') && !valid_name(name) {
            return None;
        }
        Some(Host { name, port })
    }

    /// The name sites are matched against: one trailing dot removed (case is left to the
    /// matcher, which ignores it).
    pub fn key(&self) -> &'a str {
        self.name.strip_suffix('.').unwrap_or(self.name)
    }

    /// Whether two hosts name the same thing (`:authority` against Host on HTTP/2).
    pub fn same_as(&self, other: &Host<'_>) -> bool {
        self.key().eq_ignore_ascii_case(other.key()) && self.port == other.port
    }
}

/// A DNS name or IPv4 address: labels of letters, digits, `-` and `_`, separated by single
/// dots, with at most one trailing dot, 253 characters at most. One pass over the bytes: it
/// runs on every request.
fn valid_name(name: &str) -> bool {
    let bytes = name.strip_suffix('.').unwrap_or(name).as_bytes();
    if bytes.is_empty() || bytes.len() > 253 {
        return false;
    }
    let mut label = 0usize;
    for &b in bytes {
        if b == b'.' {
            if label == 0 {
                return false;
            }
            label = 0;
        } else if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            label += 1;
            if label > 63 {
                return false;
            }
        } else {
            return false;
        }
    }
    label > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_names_addresses_and_ports() {
        let ok = |v: &str, name: &str, port: Option<u16>| {
            assert_eq!(Host::parse(v), Some(Host { name, port }), "{v}");
        };
        ok("example.nl", "example.nl", None);
        ok("Example.NL:8443", "Example.NL", Some(8443));
        ok("b.test.", "b.test.", None);
        ok("b.test.:443", "b.test.", Some(443));
        ok("192.0.2.1:80", "192.0.2.1", Some(80));
        ok("[2001:db8::1]", "[2001:db8::1]", None);
        ok("[2001:db8::1]:443", "[2001:db8::1]", Some(443));
        ok("localhost", "localhost", None);
        ok("my_host.local", "my_host.local", None);
    }

    #[test]
    fn refuses_what_is_not_a_host() {
        for v in [
            "",
            ":80",
            "a.test:",
            "a.test:99999",
            "a.test:8a",
            "a.test:80:80",
            "user@a.test",
            "a.test/x",
            "a test",
            "a..test",
            ".a.test",
            "a.test..",
            "a.test, b.test",
            "[2001:db8::1",
            "[not-v6]",
            "[2001:db8::1]x",
            "2001:db8::1",
            "a.test\\",
        ] {
            assert_eq!(Host::parse(v), None, "{v}");
        }
    }

    #[test]
    fn matching_ignores_case_and_one_trailing_dot() {
        let a = Host::parse("B.Test.").unwrap();
        assert_eq!(a.key(), "B.Test");
        assert!(a.same_as(&Host::parse("b.test").unwrap()));
        assert!(!a.same_as(&Host::parse("b.test:444").unwrap()));
        assert!(!a.same_as(&Host::parse("c.test").unwrap()));
    }
}
