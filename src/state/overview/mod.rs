//! The published security overview: what ipgate stores about visitors' addresses, why, for
//! how long and where, and how a visitor asks to see, correct or erase it, written from the
//! config in force (`ipgate overview`, and `privacy.overview_path` on every site). Every
//! figure comes from the config, so the text changes when the config does. Dutch and English
//! are written as two texts (`overview.nl.md`, `overview.en.md`), not glued from phrases;
//! HTML is the same Markdown rendered by pulldown-cmark into a page with no script, no
//! external asset and a CSP that allows its one inline style by hash.

use std::sync::OnceLock;
use std::time::Duration;

use serde::Serialize;

use crate::config::{Action, ChallengeMode, Config, LogIp, RateLimit};

const EN: &str = include_str!("overview.en.md");
const NL: &str = include_str!("overview.nl.md");
const PAGE: &str = include_str!("page.html");

/// The overview's language.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    En,
    Nl,
}

impl Lang {
    pub fn parse(text: &str) -> Option<Lang> {
        match text {
            "en" => Some(Lang::En),
            "nl" => Some(Lang::Nl),
            _ => None,
        }
    }

    fn code(self) -> &'static str {
        match self {
            Lang::En => "en",
            Lang::Nl => "nl",
        }
    }
}

/// Whether the gateway answers a request with the overview: a GET or HEAD of
/// `privacy.overview_path`, on a listener that does not redirect to HTTPS.
pub fn served_at(config: &Config, method: &http::Method, path: &str, redirect: bool) -> bool {
    config.privacy.overview_path.as_deref() == Some(path)
        && (method == http::Method::GET || method == http::Method::HEAD)
        && !redirect
}

/// A duration as people say it: "1 hour", "30 dagen", "90 seconds".
pub fn spoken(d: Duration, lang: Lang) -> String {
    let secs = d.as_secs();
    let nl = lang == Lang::Nl;
    let (n, one, many) = if secs >= 86_400 && secs % 86_400 == 0 {
        (
            secs / 86_400,
            if nl { "dag" } else { "day" },
            if nl { "dagen" } else { "days" },
        )
    } else if secs >= 3_600 && secs % 3_600 == 0 {
        (
            secs / 3_600,
            if nl { "uur" } else { "hour" },
            if nl { "uur" } else { "hours" },
        )
    } else if secs >= 60 && secs % 60 == 0 {
        (
            secs / 60,
            if nl { "minuut" } else { "minute" },
            if nl { "minuten" } else { "minutes" },
        )
    } else {
        let s = secs.max(1);
        (
            s,
            if nl { "seconde" } else { "second" },
            if nl { "seconden" } else { "seconds" },
        )
    };
    format!("{n} {}", if n == 1 { one } else { many })
}

#[derive(Serialize)]
struct Facts {
    operator: Option<String>,
    contact: Option<String>,
    retention: String,
    log_ip: &'static str,
    access_log: bool,
    default_ban: String,
    limits: Vec<LimitFact>,
    jails: Vec<JailFact>,
    lists: Vec<ListFact>,
    passes: Option<PassFact>,
    state_dir: String,
    fleet: bool,
    firewall: bool,
}

#[derive(Serialize)]
struct LimitFact {
    /// `None`: every site; else the site (and route) it applies to.
    site: Option<String>,
    route: Option<String>,
    rate: String,
    burst: u32,
    kept: String,
    network: Option<String>,
}

#[derive(Serialize)]
struct JailFact {
    name: String,
    /// From a log (a daemon's failures) rather than web responses.
    log: bool,
    challenge: bool,
    hits: u32,
    window: String,
    ban: String,
    max_ban: String,
    grows: bool,
}

#[derive(Serialize)]
struct ListFact {
    name: String,
    action: &'static str,
    feed: Option<String>,
    by_network: bool,
}

#[derive(Serialize)]
struct PassFact {
    ttl: String,
    sites: Vec<String>,
}

fn facts(c: &Config, lang: Lang, html: bool) -> Facts {
    let escape = |t: &str| if html { escape(t) } else { t.to_string() };
    let say = |d: Duration| spoken(d.min(c.privacy.max_retention), lang);
    let limit = |site: Option<&str>, route: Option<&str>, l: &RateLimit| LimitFact {
        site: site.map(escape),
        route: route.map(escape),
        rate: format_rate(l.requests_per_second),
        burst: l.burst,
        kept: spoken(
            Duration::from_secs_f64(f64::from(l.burst.max(1)) / l.requests_per_second.max(1e-6))
                .max(Duration::from_secs(1)),
            lang,
        ),
        network: l
            .network
            .as_ref()
            .map(|n| format!("IPv4 /{}, IPv6 /{}", n.ipv4_prefix, n.ipv6_prefix)),
    };
    let mut limits = vec![limit(None, None, &c.rate_limit)];
    for s in &c.sites {
        if let Some(l) = &s.rate_limit {
            limits.push(limit(Some(&s.name), None, l));
        }
        for r in &s.routes {
            if let Some(l) = &r.rate_limit {
                limits.push(limit(Some(&s.name), Some(&r.path), l));
            }
        }
    }
    let challenged: Vec<String> = c
        .sites
        .iter()
        .filter(|s| {
            s.challenge != ChallengeMode::Off
                || s.routes
                    .iter()
                    .any(|r| r.challenge.is_some_and(|m| m != ChallengeMode::Off))
        })
        .map(|s| escape(&s.name))
        .collect();
    let challenge_lists = c.lists.iter().any(|l| l.action == Action::Challenge);
    Facts {
        operator: c.privacy.operator.as_deref().map(escape),
        contact: c.privacy.contact.as_deref().map(escape),
        retention: spoken(c.privacy.max_retention, lang),
        log_ip: match c.privacy.log_ip {
            LogIp::Full => "full",
            LogIp::Anonymized => "anonymized",
            LogIp::None => "none",
        },
        access_log: c.access_log,
        default_ban: say(c.gateway.default_ban),
        limits,
        jails: c
            .jails
            .iter()
            .map(|j| JailFact {
                name: escape(&j.name),
                log: j.log.is_some(),
                challenge: j.challenge,
                hits: j.hits,
                window: spoken(j.window, lang),
                ban: say(j.ban),
                max_ban: say(j.max_ban),
                grows: j.ban_factor > 1.0 && j.max_ban.min(c.privacy.max_retention) > j.ban,
            })
            .collect(),
        lists: c
            .lists
            .iter()
            .map(|l| ListFact {
                name: escape(&l.name),
                action: l.action.as_str(),
                // The publisher's host only: a feed's path or query may hold a key.
                feed: l.feed.as_ref().map(|f| escape(f.url.host().unwrap_or(""))),
                by_network: !l.asns.is_empty() || !l.countries.is_empty(),
            })
            .collect(),
        passes: (!challenged.is_empty() || challenge_lists).then(|| PassFact {
            ttl: say(c.challenge.pass_ttl),
            sites: challenged,
        }),
        state_dir: escape(&c.gateway.state_dir.display().to_string()),
        fleet: c.fleet.is_some(),
        firewall: c.firewall.is_some(),
    }
}

fn format_rate(rps: f64) -> String {
    if rps.fract() == 0.0 {
        format!("{rps:.0}")
    } else {
        format!("{rps:.2}")
    }
}

fn templates() -> &'static minijinja::Environment<'static> {
    static ENV: OnceLock<minijinja::Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Templates written in this file's folder: a broken one fails the unit tests.
        let _ = env.add_template("en", EN);
        let _ = env.add_template("nl", NL);
        env
    })
}

/// The overview as Markdown.
pub fn markdown(config: &Config, lang: Lang) -> String {
    render(config, lang, false)
}

/// The Markdown, with the config's text escaped when it becomes HTML.
fn render(config: &Config, lang: Lang, html: bool) -> String {
    let facts = facts(config, lang, html);
    templates()
        .get_template(lang.code())
        .and_then(|t| t.render(&facts))
        .map(|md| tidy(&md))
        .unwrap_or_else(|e| format!("(the overview could not be written: {e})\n"))
}

/// Blank lines where Markdown needs them: one between blocks (a list ends before the next
/// paragraph, a heading stands apart), never two.
fn tidy(md: &str) -> String {
    let mut out = String::with_capacity(md.len() + 64);
    let mut prev = "";
    for line in md.lines() {
        let blank = line.trim().is_empty();
        let item = line.starts_with("- ");
        let breaks = !blank
            && !prev.trim().is_empty()
            && (line.starts_with('#') || prev.starts_with('#') || (prev.starts_with("- ") != item));
        if breaks {
            out.push('\n');
        }
        if blank && (prev.trim().is_empty() || out.is_empty()) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
        prev = line;
    }
    out
}

/// Markdown to an HTML page titled by its first heading; `extra` is Markdown appended (the
/// visitor's own section).
pub fn html(config: &Config, lang: Lang, extra: Option<&str>) -> String {
    let mut md = render(config, lang, true);
    if let Some(x) = extra {
        md.push('\n');
        md.push_str(x);
    }
    page(&md, lang)
}

fn page(md: &str, lang: Lang) -> String {
    let mut body = String::with_capacity(md.len() * 2);
    pulldown_cmark::html::push_html(&mut body, pulldown_cmark::Parser::new(md));
    let title = md
        .lines()
        .find_map(|l| l.strip_prefix("# "))
        .unwrap_or("ipgate");
    PAGE.replace("{lang}", lang.code())
        .replace("{title}", &escape(title))
        .replace("{body}", &body)
}

/// Text from the config, safe inside Markdown rendered to HTML (which passes raw HTML on).
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The page's Content-Security-Policy: its one inline style, by hash; nothing else.
pub fn csp() -> &'static str {
    static CSP: OnceLock<String> = OnceLock::new();
    CSP.get_or_init(|| {
        format!(
            "default-src 'none'; style-src '{}'; img-src 'none'; form-action 'none'; \
             base-uri 'none'; frame-ancestors 'none'",
            super::csp::inline_hash(PAGE, "<style>")
        )
    })
}

#[cfg(test)]
mod tests;
