//! A log line read as the daemon wrote it: the syslog prefix (a traditional or
//! RFC 3339 time stamp, the host, the tag and PID) is parsed, and a jail's `match` sees only
//! the message, of the tags it names. A failure line quoted inside another message (a HELO,
//! a Message-ID, a file name) is then text in the middle of a message, which an anchored
//! pattern never takes for the start of one.

use std::net::IpAddr;
use std::sync::LazyLock;

use regex::Regex;

use crate::config::{LogFormat, LogSource};

/// A syslog line's parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Syslog<'a> {
    pub host: &'a str,
    pub tag: &'a str,
    pub pid: Option<u32>,
    pub message: &'a str,
}

/// `Dec  1 08:00:05 host tag[pid]: message` (rsyslog's traditional format, journalctl's
/// `short`) or `2026-12-01T08:00:05.123456+01:00 host tag[pid]: message` (Debian 12's rsyslog
/// default, journalctl's `short-iso`). The tag is a program name, possibly with `/` (Postfix's
/// `postfix/submission/smtpd`); the PID is optional (Dovecot's and Pure-FTPd's lines have
/// none in rsyslog's files).
static SYSLOG: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(concat!(
        r"^(?:[A-Z][a-z]{2} [ 0-3]?\d \d{2}:\d{2}:\d{2}",
        r"|\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:Z|[+-]\d{2}:?\d{2}))",
        r" (?P<host>[^\s\[\]]{1,255}) (?P<tag>[^\s\[\]:]{1,64})(?:\[(?P<pid>\d{1,10})\])?: ",
        r"(?P<msg>.*)$",
    ))
    .expect("the syslog prefix pattern is valid")
});

/// Parses a syslog line; `None` for a line without a syslog prefix.
pub fn syslog(line: &str) -> Option<Syslog<'_>> {
    let caps = SYSLOG.captures(line)?;
    Some(Syslog {
        host: caps.name("host")?.as_str(),
        tag: caps.name("tag")?.as_str(),
        pid: caps.name("pid").and_then(|p| p.as_str().parse().ok()),
        message: caps.name("msg")?.as_str(),
    })
}

/// What a jail makes of one line or journal entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// A failure of this client.
    Counted(IpAddr),
    /// `match` found it, and so did `ignore`.
    Ignored,
    /// `match` did not find it (or its `<ADDR>` is not an address).
    NotMatched,
    /// A tag the jail does not read.
    OtherTag,
    /// Not a syslog line, where the jail reads only those.
    Unparsed,
    /// Its `<PROXY>` is neither this host nor a trusted proxy: the `<ADDR>` next to it came
    /// from a header anyone could send.
    NotThroughProxy,
}

/// A log jail's patterns, compiled.
pub struct Matcher {
    pattern: Regex,
    ignore: Option<Regex>,
    tags: Option<Regex>,
    format: LogFormat,
}

impl Matcher {
    pub fn new(source: &LogSource) -> Result<Matcher, String> {
        Ok(Matcher {
            pattern: source.regex()?,
            ignore: source.ignore_regex()?,
            tags: source.tags_regex(),
            format: source.format,
        })
    }

    /// A line of a followed file. `through` tells whether a `<PROXY>` address is this host
    /// or a trusted proxy.
    pub fn line(&self, line: &str, through: &dyn Fn(IpAddr) -> bool) -> Seen {
        // A log written with CRLF line ends (a Windows-made or network-written file).
        let line = line.strip_suffix('\r').unwrap_or(line);
        let legacy = self.format == LogFormat::Auto && self.tags.is_none();
        let (tag, message) = match self.format {
            LogFormat::Plain => (None, line),
            _ => match syslog(line) {
                Some(s) => (Some(s.tag), s.message),
                None if legacy => (None, line),
                None => return Seen::Unparsed,
            },
        };
        match self.message(tag, message, through) {
            // A pattern written for whole lines (the tag in it, as before lines were parsed)
            // still finds them in a jail that names no tags; `ipgate check` says so.
            Seen::NotMatched if legacy && message.len() != line.len() => {
                self.message(None, line, through)
            }
            seen => seen,
        }
    }

    /// A message with its tag (a parsed syslog line, or a journal entry).
    pub fn message(
        &self,
        tag: Option<&str>,
        message: &str,
        through: &dyn Fn(IpAddr) -> bool,
    ) -> Seen {
        if let Some(tags) = &self.tags {
            if !tag.is_some_and(|t| tags.is_match(t)) {
                return Seen::OtherTag;
            }
        }
        let Some(caps) = self.pattern.captures(message) else {
            return Seen::NotMatched;
        };
        if self.ignore.as_ref().is_some_and(|i| i.is_match(message)) {
            return Seen::Ignored;
        }
        let Some(ip) = caps
            .name("addr")
            .and_then(|a| a.as_str().parse::<IpAddr>().ok())
        else {
            return Seen::NotMatched;
        };
        if let Some(proxy) = caps.name("proxy") {
            let ok = proxy
                .as_str()
                .parse::<IpAddr>()
                .is_ok_and(|p| through(p.to_canonical()));
            if !ok {
                return Seen::NotThroughProxy;
            }
        }
        Seen::Counted(ip.to_canonical())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traditional_rfc3339_and_journal_short_prefixes_are_parsed() {
        let t = syslog(
            "Dec  1 08:00:05 web1 sshd[812]: Failed password for root from 192.0.2.1 port 22 ssh2",
        )
        .unwrap();
        assert_eq!((t.host, t.tag, t.pid), ("web1", "sshd", Some(812)));
        assert_eq!(
            t.message,
            "Failed password for root from 192.0.2.1 port 22 ssh2"
        );
        let r = syslog("2026-12-01T08:00:05.123456+01:00 mx postfix/submission/smtpd[2211]: warning: unknown[192.0.2.1]: SASL LOGIN authentication failed: UGFzc3dvcmQ6").unwrap();
        assert_eq!(
            (r.host, r.tag, r.pid),
            ("mx", "postfix/submission/smtpd", Some(2211))
        );
        assert!(r.message.starts_with("warning: unknown["));
        let j =
            syslog("Dec 01 08:00:05 web1 sshd-session[9]: Invalid user x from 2001:db8::1 port 2")
                .unwrap();
        assert_eq!((j.tag, j.pid), ("sshd-session", Some(9)));
        let iso =
            syslog("2026-12-01T08:00:05+0100 mx dovecot: imap-login: Login: user=<a>").unwrap();
        assert_eq!(
            (iso.tag, iso.pid, iso.message),
            ("dovecot", None, "imap-login: Login: user=<a>")
        );
        for not in [
            "sshd[812]: Failed password for root from 192.0.2.1 port 22 ssh2",
            "[01-Dec-2026 14:03:11 +0100]: <k3v1s0> Failed login for a from 192.0.2.1",
            "Dec  1 08:00:05 web1",
            "",
        ] {
            assert_eq!(syslog(not), None, "{not}");
        }
    }

    fn source(pattern: &str, tags: &[&str], format: LogFormat) -> LogSource {
        LogSource {
            files: vec![],
            journal: None,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            format,
            pattern: pattern.into(),
            ignore: None,
        }
    }

    /// A failure line quoted inside another daemon's message, or another message of the
    /// same daemon, is not a failure: the pattern sees the message alone, from its start.
    #[test]
    fn a_quoted_failure_line_is_not_a_failure() {
        let m = Matcher::new(&source(
            r"^warning: [\w.-]+\[<ADDR>\]: SASL [A-Z0-9-]+ authentication failed(?:: .*)?$",
            &["postfix/smtpd", "postfix/*/smtpd"],
            LogFormat::Syslog,
        ))
        .unwrap();
        let none = |_: IpAddr| false;
        let real = "Dec  1 08:00:05 mx postfix/submission/smtpd[1]: warning: unknown[192.0.2.5]: SASL LOGIN authentication failed: UGFzc3dvcmQ6";
        assert_eq!(
            m.line(real, &none),
            Seen::Counted("192.0.2.5".parse().unwrap())
        );
        let forged = "postfix/smtpd[1]: warning: x[192.0.2.77]: SASL LOGIN authentication failed";
        let helo = format!("Dec  1 08:00:05 mx postfix/smtpd[1]: NOQUEUE: reject: RCPT from unknown[198.51.100.9]: 554 5.7.1 <a@b>: Relay access denied; from=<a@b> to=<c@d> proto=ESMTP helo=<{forged}>");
        assert_eq!(m.line(&helo, &none), Seen::NotMatched);
        let msgid = format!("Dec  1 08:00:05 mx postfix/cleanup[7]: 4Xyz: message-id=<{forged}>");
        assert_eq!(m.line(&msgid, &none), Seen::OtherTag);
        assert_eq!(m.line(forged, &none), Seen::Unparsed, "no syslog prefix");
    }

    #[test]
    fn a_proxy_address_must_be_this_host_or_trusted() {
        let m = Matcher::new(&source(
            r"^Failed login for .* from <PROXY> \(X-Real-IP: <ADDR>\)$",
            &[],
            LogFormat::Plain,
        ))
        .unwrap();
        let local = |p: IpAddr| p.is_loopback();
        let line = "Failed login for a from 127.0.0.1 (X-Real-IP: 192.0.2.9)";
        assert_eq!(
            m.line(line, &local),
            Seen::Counted("192.0.2.9".parse().unwrap())
        );
        let direct = "Failed login for a from 198.51.100.1 (X-Real-IP: 192.0.2.9)";
        assert_eq!(m.line(direct, &local), Seen::NotThroughProxy);
    }
}
