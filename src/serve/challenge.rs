//! The challenge on the request path: the page a challenged browser gets (self-contained: an
//! inline proof-of-work script, no external asset, no cookie, no storage), the plain refusal
//! for a request that cannot show a page, and the check of a solution, which makes a pass.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode, Uri};
use http_body_util::{Either, Full};

use crate::decide::challenge::Failure;
use crate::decide::clients::{client_key, key_target};
use crate::decide::clock::now_ms;
use crate::observe::access_log::LoggedIp;
use crate::serve::admission;
use crate::serve::answer::Body;
use crate::state::csp::inline_hash;
use crate::state::{AppState, SiteEntry, Snapshot};

pub use crate::decide::challenge::{PREFIX, VERIFY};

/// The page's one template.
const PAGE: &str = include_str!("challenge.html");

/// What the page may do: run its own inline script and style (named by their SHA-256, so
/// nothing injected could run), and nothing else: no request, no frame, no form.
fn csp() -> &'static HeaderValue {
    static CSP: OnceLock<HeaderValue> = OnceLock::new();
    CSP.get_or_init(|| {
        let policy = format!(
            "default-src 'none'; script-src '{}'; style-src '{}'; img-src 'none'; \
             connect-src 'none'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
            inline_hash(PAGE, "<script>"),
            inline_hash(PAGE, "<style>"),
        );
        HeaderValue::from_str(&policy).unwrap_or(HeaderValue::from_static("default-src 'none'"))
    })
}

fn templates() -> &'static minijinja::Environment<'static> {
    static ENV: OnceLock<minijinja::Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = minijinja::Environment::new();
        // A constant template: checked by the tests, so this cannot fail at run time.
        let _ = env.add_template("challenge.html", PAGE);
        env
    })
}

/// The words of the page, in one language.
#[derive(serde::Serialize)]
struct Words {
    title: &'static str,
    heading: &'static str,
    why: &'static str,
    working: &'static str,
    done: &'static str,
    noscript: &'static str,
    kept: String,
}

/// Dutch or English, by the client's Accept-Language (highest weight wins; English when
/// neither is named).
pub fn language(headers: &HeaderMap) -> &'static str {
    let Some(value) = headers
        .get(header::ACCEPT_LANGUAGE)
        .and_then(|v| v.to_str().ok())
    else {
        return "en";
    };
    let mut best = ("en", -1.0f32);
    for part in value.split(',').take(16) {
        let mut fields = part.split(';');
        let tag = fields.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = fields
            .find_map(|f| f.trim().strip_prefix("q="))
            .and_then(|q| q.parse::<f32>().ok())
            .unwrap_or(1.0);
        let lang = match tag.split('-').next() {
            Some("nl") => "nl",
            Some("en") => "en",
            _ => continue,
        };
        if q > best.1 {
            best = (lang, q);
        }
    }
    best.0
}

/// A duration as people say it: "24 hours", "2 dagen".
fn spoken(d: std::time::Duration, lang: &str) -> String {
    let secs = d.as_secs();
    let (n, unit) = if secs >= 86_400 && secs % 86_400 == 0 {
        (
            secs / 86_400,
            if lang == "nl" {
                ("dag", "dagen")
            } else {
                ("day", "days")
            },
        )
    } else if secs >= 3_600 && secs % 3_600 == 0 {
        (
            secs / 3_600,
            if lang == "nl" {
                ("uur", "uur")
            } else {
                ("hour", "hours")
            },
        )
    } else {
        let m = secs.div_ceil(60).max(1);
        (
            m,
            if lang == "nl" {
                ("minuut", "minuten")
            } else {
                ("minute", "minutes")
            },
        )
    };
    format!("{n} {}", if n == 1 { unit.0 } else { unit.1 })
}

fn words(lang: &str, pass_ttl: std::time::Duration) -> Words {
    let ttl = spoken(pass_ttl, lang);
    if lang == "nl" {
        Words {
            title: "Een ogenblik…",
            heading: "We controleren of u met een browser komt",
            why: "Deze site vraagt bezoekers om een korte controle, om zich te beschermen tegen \
                  geautomatiseerd verkeer. Uw browser lost nu een kleine rekenpuzzel op. Dat duurt \
                  meestal een paar seconden; daarna gaat u vanzelf door naar de pagina die u opvroeg.",
            working: "Bezig…",
            done: "Klaar, een ogenblik…",
            noscript: "Voor deze controle is JavaScript nodig. Zet JavaScript aan voor deze site en \
                       laad de pagina opnieuw.",
            kept: format!(
                "Is de puzzel opgelost, dan bewaren we uw IP-adres {ttl} als toegelaten bezoeker van \
                 deze site, zodat u niet opnieuw een controle krijgt. Daarna wordt het gewist. Er \
                 wordt geen cookie geplaatst en niets in uw browser opgeslagen."
            ),
        }
    } else {
        Words {
            title: "One moment…",
            heading: "Checking that you are visiting with a browser",
            why: "This site asks visitors for a short check, to protect itself from automated \
                  traffic. Your browser is now solving a small puzzle. This usually takes a few \
                  seconds; then you go on to the page you asked for.",
            working: "Working…",
            done: "Done, one moment…",
            noscript: "This check needs JavaScript. Turn JavaScript on for this site and reload \
                       the page.",
            kept: format!(
                "Once the puzzle is solved, your IP address is kept for {ttl} as an allowed visitor \
                 of this site, so you are not checked again; then it is erased. No cookie is set \
                 and nothing is stored in your browser."
            ),
        }
    }
}

/// Whether a request can show the page: a GET or HEAD navigation that accepts HTML.
fn shows_page(method: &Method, headers: &HeaderMap) -> bool {
    let accepts_html = headers
        .get_all(header::ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|s| s.contains("text/html")));
    let document = headers
        .get("sec-fetch-dest")
        .is_none_or(|v| v.as_bytes().eq_ignore_ascii_case(b"document"));
    (method == Method::GET || method == Method::HEAD) && accepts_html && document
}

/// The answer to a challenged request: the page, or a plain refusal for a request that
/// cannot show one. `transient`: the site is under load, or the client's network over its
/// limit (429 with Retry-After), else 403.
pub fn answer(
    state: &Arc<AppState>,
    snap: &Snapshot,
    site: &SiteEntry,
    (method, headers, uri): (&Method, &HeaderMap, &Uri),
    client: IpAddr,
    transient: bool,
) -> Response<Body> {
    site.metrics.challenged.inc();
    let status = if transient {
        StatusCode::TOO_MANY_REQUESTS
    } else {
        StatusCode::FORBIDDEN
    };
    if !shows_page(method, headers) {
        let mut resp = crate::serve::answer::plain(
            status,
            "This site asks visitors to pass a short browser check first. Open the page in a \
             web browser with JavaScript on; after the check, this request works too.\n",
        );
        no_store(&mut resp, transient);
        return resp;
    }
    let prefix = snap.config.rate_limit.ipv6_prefix;
    let target = key_target(client_key(client, prefix), prefix).to_string();
    let back = uri.path_and_query().map_or("/", |p| p.as_str());
    let issued = snap.puzzles.issue(&target, &site.site.name, back, now_ms());
    site.metrics.challenges_issued.inc();
    count_against_jails(state, snap, site, client);
    let lang = language(headers);
    let t = words(lang, snap.config.challenge.pass_ttl);
    let puzzle = serde_json::json!({
        "c": issued.query,
        "h": issued.sig,
        "d": issued.difficulty,
        "v": VERIFY,
        "working": t.working,
        "done": t.done,
    })
    .to_string()
    // Inside <script>: nothing may close the element or open a comment.
    .replace('<', "\\u003c")
    .replace('>', "\\u003e")
    .replace('&', "\\u0026");
    let ctx = minijinja::context! {
        lang => lang,
        t => t,
        puzzle => puzzle,
    };
    let html = templates()
        .get_template("challenge.html")
        .and_then(|t| t.render(ctx))
        .unwrap_or_default();
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(html))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CONTENT_SECURITY_POLICY, csp().clone());
    h.insert(
        header::CONTENT_LANGUAGE,
        HeaderValue::from_static(if lang == "nl" { "nl" } else { "en" }),
    );
    h.insert(header::VARY, HeaderValue::from_static("Accept-Language"));
    no_store(&mut resp, transient);
    resp
}

/// Not cached, not indexed, no referrer; a retry hint under load.
fn no_store(resp: &mut Response<Body>, transient: bool) {
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "x-robots-tag",
        HeaderValue::from_static("noindex, nofollow"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if transient {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
    }
}

/// Counts a challenge served, or a bad solution, against the site's challenge jails.
fn count_against_jails(state: &Arc<AppState>, snap: &Snapshot, site: &SiteEntry, client: IpAddr) {
    for jail in site.jails.iter().filter(|j| j.config.challenge) {
        admission::count_offense(state, snap, jail, client);
    }
}

/// Answers a request for one of the challenge's own paths: a solution, or 404 (nothing under
/// them is ever proxied).
pub async fn own(
    state: &Arc<AppState>,
    snap: &Snapshot,
    site: &SiteEntry,
    path: &str,
    uri: &Uri,
    client: IpAddr,
) -> Response<Body> {
    site.metrics.challenged.inc();
    if path == VERIFY {
        verify(state, snap, site, uri, client).await
    } else {
        crate::serve::answer::plain(StatusCode::NOT_FOUND, "404 not found\n")
    }
}

/// Checks a solution (`GET /.well-known/ipgate/challenge?...`): a good one makes a pass for
/// the client on this site and sends it back where it was going (303); a bad one is 403.
async fn verify(
    state: &Arc<AppState>,
    snap: &Snapshot,
    site: &SiteEntry,
    uri: &Uri,
    client: IpAddr,
) -> Response<Body> {
    let prefix = snap.config.rate_limit.ipv6_prefix;
    let key = client_key(client, prefix);
    let target = key_target(key, prefix);
    let now = now_ms();
    let checked = snap
        .puzzles
        .verify(
            uri.query().unwrap_or(""),
            &target.to_string(),
            &site.site.name,
            now,
        )
        .and_then(|puzzle| {
            let replayed = !state.used.first_use(&puzzle, now)
                || state.pass_made_by(&site.pass_scope, target, &puzzle.id);
            if replayed {
                Err(Failure::Replayed)
            } else {
                Ok(puzzle)
            }
        });
    let puzzle = match checked {
        Ok(p) => p,
        Err(why) => {
            site.metrics.challenges_failed.inc();
            count_against_jails(state, snap, site, client);
            tracing::info!(
                site = %site.site.name,
                client = %LoggedIp(client, snap.config.privacy.log_ip),
                why = %why,
                "challenge solution refused"
            );
            let mut resp = crate::serve::answer::plain(
                StatusCode::FORBIDDEN,
                "The browser check could not be verified: it was changed, expired, used \
                 before, or made for another address. Go back and reload the page to get a new \
                 one.\n",
            );
            no_store(&mut resp, false);
            return resp;
        }
    };
    let back = HeaderValue::from_str(&puzzle.back).unwrap_or(HeaderValue::from_static("/"));
    // Another tab's puzzle, solved after the first made the pass: nothing to make.
    if state.temp.passed(&site.pass_scope, client) {
        return see_other(back);
    }
    if state.temp.passes_len() >= snap.config.challenge.max_passes {
        tracing::warn!(
            max = snap.config.challenge.max_passes,
            "challenge.max_passes reached: no pass is made until some expire"
        );
        let mut resp = crate::serve::answer::plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "503 too many visitors are being checked right now; try again in a few minutes\n",
        );
        no_store(&mut resp, false);
        return resp;
    }
    let ttl = snap.config.challenge.pass_ttl;
    site.metrics.challenges_passed.inc();
    site.metrics
        .challenge_solve
        .observe(now.saturating_sub(puzzle.issued_at(snap.puzzles.ttl_ms)) as f64 / 1000.0);
    for jail in site.jails.iter().filter(|j| j.config.challenge) {
        jail.forget(key);
    }
    if let Err(e) = state
        .make_pass(&site.site.name, target, &puzzle.id, ttl)
        .await
    {
        // Enforced already; written as soon as the disk takes it.
        tracing::warn!(error = %e, "pass made but not durable yet");
    }
    see_other(back)
}

/// 303 to the way back.
fn see_other(back: HeaderValue) -> Response<Body> {
    let mut resp = crate::serve::answer::plain(StatusCode::SEE_OTHER, "303 see other\n");
    resp.headers_mut().insert(header::LOCATION, back);
    no_store(&mut resp, false);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept_language(v: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_LANGUAGE, HeaderValue::from_static(v));
        h
    }

    #[test]
    fn the_language_follows_accept_language() {
        assert_eq!(language(&HeaderMap::new()), "en");
        assert_eq!(language(&accept_language("nl-NL,nl;q=0.9,en;q=0.8")), "nl");
        assert_eq!(language(&accept_language("en-GB,en;q=0.9,nl;q=0.5")), "en");
        assert_eq!(language(&accept_language("de-DE,nl;q=0.7")), "nl");
        assert_eq!(language(&accept_language("fr")), "en");
    }

    #[test]
    fn durations_are_spoken() {
        use std::time::Duration;
        assert_eq!(spoken(Duration::from_secs(86_400), "en"), "1 day");
        assert_eq!(spoken(Duration::from_secs(3 * 86_400), "nl"), "3 dagen");
        assert_eq!(spoken(Duration::from_secs(7_200), "en"), "2 hours");
        assert_eq!(spoken(Duration::from_secs(3_600), "nl"), "1 uur");
        assert_eq!(spoken(Duration::from_secs(90), "nl"), "2 minuten");
    }

    #[test]
    fn the_template_renders_in_both_languages() {
        for lang in ["en", "nl"] {
            let html = templates()
                .get_template("challenge.html")
                .unwrap()
                .render(minijinja::context! {
                    lang => lang,
                    t => words(lang, std::time::Duration::from_secs(86_400)),
                    puzzle => "{}",
                })
                .unwrap();
            assert!(html.contains("<noscript>"), "{html}");
            assert!(html.contains(if lang == "nl" { "1 dag" } else { "1 day" }));
            assert!(!html.contains("cookie=") && !html.contains("localStorage"));
        }
    }

    #[test]
    fn the_policy_names_the_inline_script_and_style_by_hash() {
        let policy = csp().to_str().unwrap();
        assert!(policy.contains("script-src 'sha256-"), "{policy}");
        assert!(!policy.contains("unsafe-inline"));
        assert_ne!(inline_hash(PAGE, "<script>"), inline_hash(PAGE, "<style>"));
        // The script found is the solver, whole.
        assert!(PAGE
            .split_once("<script>")
            .unwrap()
            .1
            .contains("location.replace"));
    }
}
