//! The console's views, rendered from the state in force: sites (requests per minute over
//! the last hour), entries (filtered, sorted, capped), jails and recent bans, health.

use std::sync::OnceLock;

use serde::Serialize;

use super::{left, now, shown, Row};
use crate::config::ChallengeMode;
use crate::state::AppState;

/// Rows of temporary entries shown at most (the count of all is said).
const MAX_ROWS: usize = 500;
/// Recent bans shown at most.
const MAX_BANS: usize = 300;
/// Clients refused most, shown at most.
const MAX_REFUSED: usize = 20;

fn env() -> &'static minijinja::Environment<'static> {
    static ENV: OnceLock<minijinja::Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        // Written in this folder: a broken one fails the tests.
        let _ = env.add_template("sites.html", include_str!("sites.html"));
        let _ = env.add_template("entries.html", include_str!("entries.html"));
        let _ = env.add_template("lookup.html", include_str!("lookup.html"));
        let _ = env.add_template("jails.html", include_str!("jails.html"));
        let _ = env.add_template("health.html", include_str!("health.html"));
        env
    })
}

pub(super) fn render(name: &str, ctx: minijinja::Value) -> Result<String, minijinja::Error> {
    env().get_template(name)?.render(ctx)
}

fn when(ms: u64) -> String {
    super::super::rfc3339(ms)
}

#[derive(Serialize)]
struct SiteView {
    name: String,
    served: u64,
    refused: u64,
    /// The hour's requests by outcome: blocked, denied, rate limited, challenged.
    outcomes: [u64; 4],
    /// SVG rects, made here from numbers only.
    served_bars: String,
    refused_bars: String,
    challenging: bool,
}

pub(super) fn sites(state: &AppState) -> Result<String, minijinja::Error> {
    let now = now();
    let snap = state.snapshot.load();
    let per_site = state.history.per_minute(&state.metrics, now);
    let peak = per_site
        .iter()
        .flat_map(|(_, m)| m.iter().map(|m| m.counts.iter().sum::<u64>()))
        .max()
        .unwrap_or(0)
        .max(1);
    // One bar per minute, 4 px wide: proxied from the bottom, refused stacked on top.
    let bars = |values: &[u64], under: &[u64]| {
        values
            .iter()
            .zip(under.iter().chain(std::iter::repeat(&0)))
            .enumerate()
            .map(|(i, (v, u))| {
                let h = 56.0 * *v as f64 / peak as f64;
                let below = 56.0 * *u as f64 / peak as f64;
                format!(
                    "<rect x=\"{}\" y=\"{:.1}\" width=\"3\" height=\"{h:.1}\"/>",
                    i * 4,
                    58.0 - below - h
                )
            })
            .collect::<String>()
    };
    let sites: Vec<SiteView> = per_site
        .into_iter()
        .map(|(name, minutes)| {
            let served: Vec<u64> = minutes.iter().map(|m| m.counts[0]).collect();
            let refused: Vec<u64> = minutes.iter().map(|m| m.counts[1..].iter().sum()).collect();
            let challenging = snap.sites.iter().any(|s| {
                s.site.name == name && s.load.mode(s.site.challenge) == ChallengeMode::Always
            });
            let mut outcomes = [0u64; 4];
            for m in &minutes {
                for (i, n) in m.counts[1..].iter().enumerate() {
                    outcomes[i] += n;
                }
            }
            SiteView {
                outcomes,
                served: served.iter().sum(),
                refused: refused.iter().sum(),
                served_bars: bars(&served, &[]),
                refused_bars: bars(&refused, &served),
                challenging,
                name,
            }
        })
        .collect();
    render("sites.html", minijinja::context! { sites, peak })
}

/// Every temporary entry in force, as rows.
fn rows(state: &AppState) -> Vec<Row> {
    let now = now();
    let mut rows = Vec::new();
    for slot in state.temp.slots() {
        for (target, e) in state.temp.table(&slot).all(now) {
            rows.push(Row {
                target: target.to_string(),
                action: slot.action().as_str(),
                scope: slot.scope().map(|s| s.to_string()),
                source: e.source().to_string(),
                reason: e.reason().map(str::to_string),
                origin: e.origin().map(str::to_string),
                created: when(e.created_at),
                left: left(e.expires_at, now),
                expires_ms: e.expires_at,
                created_ms: e.created_at,
                host: target.prefix_len() == target.max_prefix_len(),
            });
        }
    }
    rows
}

#[derive(Serialize)]
struct ListView {
    name: String,
    action: &'static str,
    entries: usize,
    from: String,
}

pub(super) fn entries(state: &AppState, q: &str, sort: &str) -> Result<String, minijinja::Error> {
    let mut rows = rows(state);
    let total = rows.len();
    let q = q.trim().to_ascii_lowercase();
    if !q.is_empty() {
        rows.retain(|r| {
            [
                Some(&r.target),
                Some(&r.source),
                r.reason.as_ref(),
                r.scope.as_ref(),
            ]
            .into_iter()
            .flatten()
            .any(|t| t.to_ascii_lowercase().contains(&q))
                || r.action.contains(q.as_str())
        });
    }
    match sort {
        "target" => rows.sort_by(|a, b| a.target.cmp(&b.target)),
        "list" => rows.sort_by(|a, b| (a.action, &a.scope).cmp(&(b.action, &b.scope))),
        "created" => rows.sort_by_key(|r| std::cmp::Reverse(r.created_ms)),
        _ => rows.sort_by_key(|r| r.expires_ms),
    }
    let matching = rows.len();
    rows.truncate(MAX_ROWS);
    let snap = state.snapshot.load();
    let lists: Vec<ListView> = snap
        .policy
        .all()
        .map(|l| ListView {
            name: l.name.clone(),
            action: l.action.as_str(),
            entries: l.table.len(),
            from: if l.feed { "a feed" } else { "the config" }.to_string(),
        })
        .collect();
    let shown = rows.len();
    render(
        "entries.html",
        minijinja::context! { rows, total, matching, shown, q, lists },
    )
}

#[derive(Serialize)]
struct JailView {
    name: String,
    hits: u32,
    window: String,
    ban: String,
    max_ban: String,
    dry_run: bool,
    in_force: usize,
}

#[derive(Serialize)]
struct BanView {
    created: String,
    target: String,
    source: String,
    left: String,
}

pub(super) fn jails(state: &AppState) -> Result<String, minijinja::Error> {
    let snap = state.snapshot.load();
    let privacy = &snap.config.privacy;
    let now = now();
    let in_force: Vec<Row> = rows(state)
        .into_iter()
        .filter(|r| r.action == "block")
        .collect();
    let jails: Vec<JailView> = snap
        .config
        .jails
        .iter()
        .map(|j| JailView {
            name: j.name.clone(),
            hits: j.hits,
            window: humantime::format_duration(j.window).to_string(),
            ban: humantime::format_duration(j.ban).to_string(),
            max_ban: humantime::format_duration(j.max_ban).to_string(),
            dry_run: j.dry_run,
            in_force: in_force.iter().filter(|b| b.source == j.name).count(),
        })
        .collect();
    // Shown only, never acted on here: as privacy.log_ip says.
    let bans: Vec<BanView> = state
        .bans
        .recent(now, privacy.max_retention.as_millis() as u64)
        .into_iter()
        .take(MAX_BANS)
        .map(|b| BanView {
            target: shown(b.target, privacy.log_ip),
            created: when(b.at_ms),
            source: b.source.to_string(),
            left: if b.until_ms > now {
                left(b.until_ms, now)
            } else {
                "over".into()
            },
        })
        .collect();
    let prefix = snap.config.rate_limit.ipv6_prefix;
    let refused: Vec<(String, u32)> = state
        .refusals
        .top(MAX_REFUSED, now)
        .into_iter()
        .map(|(key, n)| {
            let t = crate::decide::clients::key_target(key, prefix);
            (shown(t, privacy.log_ip), n)
        })
        .collect();
    render("jails.html", minijinja::context! { jails, bans, refused })
}

#[derive(Serialize)]
struct HealthView {
    part: String,
    state: String,
    good: bool,
}

pub(super) fn health(state: &AppState) -> Result<String, minijinja::Error> {
    let snap = state.snapshot.load();
    let m = &state.metrics;
    let mut health = Vec::new();
    let mut add = |part: String, state: String, good: bool| {
        health.push(HealthView { part, state, good });
    };
    let pending = m.store_pending.get();
    add(
        "store".into(),
        format!(
            "{pending} entries waiting for the disk, {} errors",
            m.store_errors.get()
        ),
        pending == 0,
    );
    if snap.config.fleet.is_some() {
        let up = m.fleet.connected.get() == 1;
        let text = if up { "connected" } else { "not connected" };
        add(
            "fleet".into(),
            format!("{text}, {} changes waiting", m.fleet.outbox.get()),
            up,
        );
    }
    if snap.config.firewall.is_some() {
        let errors = m.firewall_errors.get();
        add(
            "firewall".into(),
            format!("{errors} failed updates"),
            errors == 0,
        );
    }
    for l in snap.config.lists.iter().filter(|l| l.feed.is_some()) {
        let age = m.feed.age.with_label_values(&[&l.name]).get();
        let refresh = l.feed.as_ref().map_or(0, |f| f.refresh.as_secs() as i64);
        add(
            format!("feed {}", l.name),
            format!("confirmed {age}s ago (refresh {refresh}s)"),
            age <= refresh.saturating_mul(3),
        );
    }
    for s in &snap.sites {
        let mode = s.load.mode(s.site.challenge);
        if mode != ChallengeMode::Off || s.load.forced().is_some() {
            add(
                format!("challenge on {}", s.site.name),
                format!("{mode:?}").to_lowercase(),
                mode != ChallengeMode::Always,
            );
        }
    }
    let certs = super::super::certificates(state);
    render("health.html", minijinja::context! { health, certs })
}
