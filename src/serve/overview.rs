//! `privacy.overview_path`: every site answers it with the security overview, in Dutch or
//! English by Accept-Language. With `privacy.self_service`, the page adds what is held about
//! the visitor's own address: categories and expiry, never a counter or threshold that would
//! help someone pace an attack.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use http::{header, HeaderMap, HeaderValue, Response, StatusCode};

use crate::decide::clock::now_ms;
use crate::decide::policy::temporary::{Scope, Slot};
use crate::serve::answer::Body;
use crate::state::overview::{html, spoken, Lang};
use crate::state::{AppState, Snapshot};

/// Whether the request is for the overview: a GET or HEAD of its path, on a listener that
/// does not redirect to HTTPS (there the redirect comes first, so the visitor's own data
/// never travels in clear).
pub fn at(snap: &Snapshot, method: &http::Method, path: &str, redirect: bool) -> bool {
    crate::state::overview::served_at(&snap.config, method, path, redirect)
}

/// The overview page for this visitor.
pub async fn answer(
    state: &Arc<AppState>,
    snap: &Snapshot,
    headers: &HeaderMap,
    client: IpAddr,
) -> Response<Body> {
    let lang = match crate::serve::challenge::language(headers) {
        "nl" => Lang::Nl,
        _ => Lang::En,
    };
    let own = if snap.config.privacy.self_service {
        Some(visitor(state, snap, client, lang).await)
    } else {
        None
    };
    let page = html(&snap.config, lang, own.as_deref());
    let mut resp = Response::new(http_body_util::Either::Right(http_body_util::Full::new(
        bytes::Bytes::from(page),
    )));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(crate::state::overview::csp()) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    // The visitor's own part is theirs alone: no cache keeps it.
    let cache = if own.is_some() {
        "private, no-store"
    } else {
        "no-cache"
    };
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(header::VARY, HeaderValue::from_static("Accept-Language"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    *resp.status_mut() = StatusCode::OK;
    resp
}

fn when(ms: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms);
    let text = humantime::format_rfc3339_seconds(t).to_string();
    // 2026-12-07T05:00:00Z -> 2026-12-07 05:00 UTC
    format!("{} {} UTC", &text[..10], &text[11..16])
}

/// The visitor's own section, as Markdown.
async fn visitor(state: &AppState, snap: &Snapshot, ip: IpAddr, lang: Lang) -> String {
    let nl = lang == Lang::Nl;
    let now = now_ms();
    let mut lines = Vec::new();
    for slot in state.temp.slots() {
        for (_, entry) in state.temp.table(&slot).covering(ip, now) {
            let until = when(entry.expires_at);
            lines.push(match (&slot, nl) {
                (Slot::Block | Slot::Scoped(_), false) => format!("A ban, until {until}."),
                (Slot::Block | Slot::Scoped(_), true) => format!("Een blokkade, tot {until}."),
                (Slot::Allow, false) => format!("An entry that lets you through, until {until}."),
                (Slot::Allow, true) => format!("Een vermelding die u doorlaat, tot {until}."),
                (Slot::Pass(scope), false) => {
                    format!("A challenge pass for {}, until {until}.", site_of(scope))
                }
                (Slot::Pass(scope), true) => {
                    format!("Een toegangsbewijs voor {}, tot {until}.", site_of(scope))
                }
            });
        }
    }
    let limited = snap
        .limiters
        .iter()
        .any(|(_, l)| !l.is_network() && l.is_tracked(l.key_for(ip)));
    if limited {
        lines.push(if nl {
            "Een teller voor de snelheidslimiet, in het werkgeheugen; die verdwijnt na korte stilte.".into()
        } else {
            "A rate-limit counter, in memory; it goes after a short quiet time.".into()
        });
    }
    let key = crate::decide::clients::client_key(ip, snap.config.rate_limit.ipv6_prefix);
    for (name, j) in &snap.jails {
        if j.counter(key).is_some() {
            let window = spoken(j.config.window, lang);
            lines.push(if nl {
                format!("Een telling van mislukte pogingen (`{name}`), in het werkgeheugen, hooguit {window}.")
            } else {
                format!("A count of failed attempts (`{name}`), in memory, for {window} at most.")
            });
        }
    }
    if state.refusals.of(key, now).is_some() {
        lines.push(if nl {
            "Een telling van geweigerde verzoeken, in het werkgeheugen, tot een uur na de laatste weigering.".into()
        } else {
            "A count of refused requests, in memory, until an hour after the last refusal.".into()
        });
    }
    let retention = snap.config.privacy.max_retention.as_millis() as u64;
    let own = crate::decide::clients::client_targets(ip, snap.config.rate_limit.ipv6_prefix);
    for b in state.bans.of(ip, &own) {
        let until = when(b.at_ms + retention);
        lines.push(if nl {
            format!(
                "Een vermelding van een blokkade in de lijst van recente blokkades, tot {until}."
            )
        } else {
            format!("A record of a ban in the list of recent bans, until {until}.")
        });
    }
    let targets = crate::decide::clients::client_targets(ip, snap.config.rate_limit.ipv6_prefix);
    if let Ok(held) = state.offenses(ip, targets).await {
        if let Some(last) = held.iter().flat_map(|(_, _, times)| times.iter()).max() {
            let until = when(last + retention);
            lines.push(if nl {
                format!("Een geschiedenis van eerdere blokkades, tot {until}.")
            } else {
                format!("A history of earlier bans, until {until}.")
            });
        }
    }
    let mut md = if nl {
        format!("## Wat we nu over uw adres bewaren\n\nUw adres zoals wij het zien: `{ip}`.\n\n")
    } else {
        format!("## What we hold about your address now\n\nYour address as we see it: `{ip}`.\n\n")
    };
    if lines.is_empty() {
        md.push_str(if nl {
            "Er is nu niets over uw adres opgeslagen.\n"
        } else {
            "Nothing is held about your address right now.\n"
        });
    }
    for l in lines {
        md.push_str("- ");
        md.push_str(&l);
        md.push('\n');
    }
    md
}

fn site_of(scope: &Scope) -> String {
    match scope {
        Scope::Site(s) | Scope::Jail(s) => s
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;"),
    }
}
