//! Request paths as the upstream will understand them: percent-encoded unreserved
//! characters decoded, hex digits in upper case, repeated slashes merged and dot segments
//! removed (RFC 3986 6.2.2, 5.2.4), so that routes, `allow_only`, jails and rate limits match
//! what Apache or PHP will serve, and the path matched is the path forwarded. A path that
//! cannot be normalized safely is refused instead.

use std::borrow::Cow;

/// Why a path was refused (answered 400, never forwarded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("the path does not start with '/'")]
    NotAbsolute,
    #[error("the path holds an encoded '/', '\\' or NUL")]
    EncodedSeparator,
    #[error("the path holds a malformed percent-encoding")]
    BadEncoding,
    #[error("the path holds an overlong UTF-8 encoding")]
    Overlong,
    #[error("a dot segment climbs above the root")]
    AboveRoot,
}

/// The normalized form of `path` (the path only, without the query). Borrowed, with no
/// allocation, when the path has no `%`, no `//` and no `/.`: then it is already normal.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, Error> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(Error::NotAbsolute);
    }
    if !needs_work(bytes) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode(bytes)?;
    let out = remove_dot_segments(&decoded)?;
    // Only ASCII comes out: non-ASCII bytes stay percent-encoded, literal ones are kept as
    // they came (a valid `&str` in, so valid UTF-8 out).
    Ok(Cow::Owned(
        String::from_utf8(out).map_err(|_| Error::BadEncoding)?,
    ))
}

/// Whether there is anything to do: a `%` to look at, or a slash followed by a slash or a
/// dot.
fn needs_work(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().any(|(i, &b)| match b {
        b'%' => true,
        b'/' => matches!(bytes.get(i + 1), Some(b'/' | b'.')),
        _ => false,
    })
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// Decodes unreserved characters, upper-cases the hex of the rest, and refuses encoded
/// separators, NUL and overlong UTF-8 (the `%c0%ae` of directory-traversal scanners). A
/// literal `\` is kept as it is: Apache on Linux serves it as part of a file name.
fn decode(bytes: &[u8]) -> Result<Vec<u8>, Error> {
    let mut out = Vec::with_capacity(bytes.len());
    // The previous byte an escape decoded to, for the overlong check across escapes.
    let mut prev_escaped: Option<u8> = None;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            out.push(b);
            prev_escaped = None;
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(Error::BadEncoding);
        };
        let v = hi << 4 | lo;
        match v {
            b'/' | b'\\' | 0 => return Err(Error::EncodedSeparator),
            // A lead byte that can only start an overlong form, or a continuation byte after
            // a lead that makes one (E0 80..9F, F0 80..8F).
            0xC0 | 0xC1 => return Err(Error::Overlong),
            0x80..=0x9F if prev_escaped == Some(0xE0) => return Err(Error::Overlong),
            0x80..=0x8F if prev_escaped == Some(0xF0) => return Err(Error::Overlong),
            _ => {}
        }
        if is_unreserved(v) {
            out.push(v);
        } else {
            out.extend_from_slice(&[
                b'%',
                HEX_UPPER[(v >> 4) as usize],
                HEX_UPPER[(v & 15) as usize],
            ]);
        }
        prev_escaped = Some(v);
        i += 3;
    }
    Ok(out)
}

/// RFC 3986 5.2.4 on an absolute path, with empty segments (`//`) merged, except that a
/// `..` above the root is refused rather than dropped: such a path is an attack, not a
/// typo.
fn remove_dot_segments(path: &[u8]) -> Result<Vec<u8>, Error> {
    let mut out: Vec<u8> = Vec::with_capacity(path.len());
    // Segments after the leading '/'; a trailing empty one means the path ends in '/'.
    let mut segments = path[1..].split(|&b| b == b'/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        match seg {
            b"." | b"" => {
                // `/a/.` and `/a/` both mean the directory: keep its trailing slash.
                if last && !out.ends_with(b"/") {
                    out.push(b'/');
                }
            }
            b".." => {
                if out.is_empty() {
                    return Err(Error::AboveRoot);
                }
                // Drop the last segment (out is "/s1/s2" or "/s1/s2/").
                if out.ends_with(b"/") {
                    out.pop();
                }
                let cut = out.iter().rposition(|&b| b == b'/').unwrap_or(0);
                out.truncate(cut);
                if last {
                    out.push(b'/');
                }
            }
            _ => {
                if !out.ends_with(b"/") {
                    out.push(b'/');
                }
                out.extend_from_slice(seg);
            }
        }
    }
    if out.is_empty() {
        out.push(b'/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, Error> {
        normalize(p).map(Cow::into_owned)
    }

    #[test]
    fn ordinary_paths_are_borrowed_unchanged() {
        for p in [
            "/",
            "/index.php",
            "/a/b/c/",
            "/wp-login.php",
            "/a.b/c..d/e.",
            "/~user",
        ] {
            assert!(
                matches!(normalize(p), Ok(Cow::Borrowed(q)) if q == p),
                "{p}"
            );
        }
    }

    #[test]
    fn ordinary_encodings_pass_unchanged() {
        for p in ["/caf%C3%A9", "/a%20b", "/%E2%82%AC", "/a%25b", "/q%3F"] {
            assert_eq!(norm(p).as_deref(), Ok(p), "{p}");
        }
    }

    #[test]
    fn decodes_unreserved_and_upper_cases_hex() {
        assert_eq!(norm("/%70hpmyadmin/").as_deref(), Ok("/phpmyadmin/"));
        assert_eq!(norm("/wp-login%2ephp").as_deref(), Ok("/wp-login.php"));
        assert_eq!(norm("/wp-login%2Ephp").as_deref(), Ok("/wp-login.php"));
        assert_eq!(norm("/caf%c3%a9").as_deref(), Ok("/caf%C3%A9"));
        assert_eq!(norm("/%7e%41%5f%2D").as_deref(), Ok("/~A_-"));
    }

    #[test]
    fn merges_slashes_and_removes_dot_segments() {
        let cases = [
            ("//phpmyadmin/", "/phpmyadmin/"),
            ("/./phpmyadmin/", "/phpmyadmin/"),
            ("/a/./b", "/a/b"),
            ("/a/b/..", "/a/"),
            ("/a/b/../", "/a/"),
            ("/a/b/../c", "/a/c"),
            ("/a/.", "/a/"),
            ("/a//b///c", "/a/b/c"),
            ("/a/%2e%2e/b", "/b"),
            ("/a/.%2E/b", "/b"),
            ("/..a/b..", "/..a/b.."),
            ("/.../", "/.../"),
            ("/.", "/"),
            ("//", "/"),
            ("/a/..", "/"),
        ];
        for (input, want) in cases {
            assert_eq!(norm(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn unsafe_paths_are_refused() {
        let cases = [
            ("/a%2fb", Error::EncodedSeparator),
            ("/a%2Fb", Error::EncodedSeparator),
            ("/a%5cb", Error::EncodedSeparator),
            ("/a%00b", Error::EncodedSeparator),
            ("/%c0%ae%c0%ae/etc", Error::Overlong),
            ("/%C1%9C", Error::Overlong),
            ("/%e0%80%ae", Error::Overlong),
            ("/%f0%80%80%ae", Error::Overlong),
            ("/..", Error::AboveRoot),
            ("/../etc/passwd", Error::AboveRoot),
            ("/a/../../b", Error::AboveRoot),
            ("/%2e%2e/x", Error::AboveRoot),
            ("/a%", Error::BadEncoding),
            ("/a%g1", Error::BadEncoding),
            ("/a%1", Error::BadEncoding),
            ("a/b", Error::NotAbsolute),
            ("", Error::NotAbsolute),
        ];
        for (input, want) in cases {
            assert_eq!(norm(input), Err(want), "{input}");
        }
    }

    /// RFC 3986 5.4: each reference merged with the base path `/b/c/d;p`, then normalized,
    /// gives the path of the RFC's result. Its "abnormal" ones that climb above the root
    /// (`../../../g`) are refused here, by decision.
    #[test]
    fn rfc3986_section_5_4_examples() {
        let merge = |r: &str| format!("/b/c/{r}");
        let normal = [
            ("g", "/b/c/g"),
            ("./g", "/b/c/g"),
            ("g/", "/b/c/g/"),
            (";x", "/b/c/;x"),
            ("g;x", "/b/c/g;x"),
            ("", "/b/c/"),
            (".", "/b/c/"),
            ("./", "/b/c/"),
            ("..", "/b/"),
            ("../", "/b/"),
            ("../g", "/b/g"),
            ("../..", "/"),
            ("../../", "/"),
            ("../../g", "/g"),
            // 5.4.2, abnormal but within the root:
            ("g.", "/b/c/g."),
            (".g", "/b/c/.g"),
            ("g..", "/b/c/g.."),
            ("..g", "/b/c/..g"),
            ("./../g", "/b/g"),
            ("./g/.", "/b/c/g/"),
            ("g/./h", "/b/c/g/h"),
            ("g/../h", "/b/c/h"),
            ("g;x=1/./y", "/b/c/g;x=1/y"),
            ("g;x=1/../y", "/b/c/y"),
        ];
        for (reference, want) in normal {
            assert_eq!(norm(&merge(reference)).as_deref(), Ok(want), "{reference}");
        }
        // RFC results "/g" by dropping the extra "..": refused instead.
        for reference in ["../../../g", "../../../../g"] {
            assert_eq!(
                norm(&merge(reference)),
                Err(Error::AboveRoot),
                "{reference}"
            );
        }
        // Absolute references with dot segments (RFC: "/g" for both).
        assert_eq!(norm("/./g").as_deref(), Ok("/g"));
        assert_eq!(norm("/../g"), Err(Error::AboveRoot));
    }

    /// RFC 3986 6.2.2: case (6.2.2.1), percent-encoding (6.2.2.2) and path segment (6.2.2.3)
    /// normalization, with the section's own example.
    #[test]
    fn rfc3986_section_6_2_2_examples() {
        assert_eq!(norm("/%3a").as_deref(), Ok("/%3A"));
        assert_eq!(norm("/%41%7E").as_deref(), Ok("/A~"));
        // "eXAMPLE://a/./b/../b/%63/%7bfoo%7d" is equivalent to "example://a/b/c/%7Bfoo%7D".
        assert_eq!(
            norm("/./b/../b/%63/%7bfoo%7d").as_deref(),
            Ok("/b/c/%7Bfoo%7D")
        );
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        /// Paths built from the pieces that matter to a normalizer.
        fn path() -> impl Strategy<Value = String> {
            let piece = prop::sample::select(vec![
                "/", "//", ".", "..", "...", "%2e", "%2E", "%2e%2e", "a", "B", "%41", "%7e", "%7E",
                "%20", "%c3%a9", "%C3%A9", "%25", "%2f", "%5C", "%00", "%c0%ae", "%", "%zz", "\\",
                ";x", "-", "~",
            ]);
            prop::collection::vec(piece, 0..16).prop_map(|v| format!("/{}", v.concat()))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(20_000))]
            #[test]
            fn normalizing_is_idempotent_and_leaves_no_dot_or_empty_segment(p in path()) {
                if let Ok(once) = normalize(&p) {
                    let twice = normalize(&once).expect("a normal path normalizes");
                    prop_assert_eq!(&*twice, &*once);
                    for bad in ["//", "/./", "/../"] {
                        prop_assert!(!once.contains(bad), "{} in {}", bad, once);
                    }
                    prop_assert!(!once.ends_with("/.") && !once.ends_with("/.."));
                    prop_assert!(once.starts_with('/'));
                }
            }
        }
    }
}
