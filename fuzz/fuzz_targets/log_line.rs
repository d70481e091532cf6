//! Log lines and journal entries as a log jail reads them: the syslog prefix parser, a ready
//! jail's patterns and the journal's JSON never panic, and an address a jail counts is one
//! that stands in the line.
#![no_main]
use std::sync::LazyLock;

use ipgate::background::logjail::journal;
use ipgate::background::logjail::line::{self, Matcher, Seen};
use ipgate::config::{LogFormat, LogSource};
use libfuzzer_sys::fuzz_target;

static SSHD: LazyLock<Matcher> = LazyLock::new(|| {
    Matcher::new(&LogSource {
        files: vec![],
        journal: None,
        tags: vec!["sshd".into(), "sshd-session".into()],
        format: LogFormat::Syslog,
        pattern: r"^(?:Failed (?:password|publickey) for|Invalid user) .* from <ADDR> port \d+(?: ssh2(?:: .*)?)?$".into(),
        ignore: Some(r"^Failed \S+ for invalid user ".into()),
    })
    .expect("the pattern compiles")
});

static PLAIN: LazyLock<Matcher> = LazyLock::new(|| {
    Matcher::new(&LogSource {
        files: vec![],
        journal: None,
        tags: vec![],
        format: LogFormat::Auto,
        pattern: r"from <PROXY> \(X-Real-IP: <ADDR>\)".into(),
        ignore: None,
    })
    .expect("the pattern compiles")
});

fuzz_target!(|text: &str| {
    if let Some(parsed) = line::syslog(text) {
        assert!(text.ends_with(parsed.message));
        assert!(!parsed.tag.is_empty() && !parsed.tag.contains(' '));
    }
    for m in [&*SSHD, &*PLAIN] {
        if let Seen::Counted(ip) = m.line(text, &|ip| ip.is_loopback()) {
            // The address is one written in the line (in any of its spellings: case, zeros,
            // IPv4-mapped IPv6 counted as IPv4).
            let written = text
                .split(|c: char| !(c.is_ascii_hexdigit() || c == ':' || c == '.'))
                .filter_map(|t| t.parse::<std::net::IpAddr>().ok())
                .any(|t| t.to_canonical() == ip);
            assert!(written, "{ip} is not written in {text:?}");
        }
    }
    if let Some(entry) = journal::parse(text) {
        let _ = SSHD.message(entry.tag.as_deref(), &entry.message, &|_| false);
    }
});
