//! The web console on the admin listener: `/` is one page with its style and a small plain
//! script (no external asset, no cookie, a CSP naming both by hash). The operator signs in
//! with the admin token, which the page keeps in `sessionStorage` and sends as the
//! Authorization header, so a request from another site carries none. Each view is HTML
//! rendered here (minijinja, escaped) and fetched from `/v1/console/VIEW` with that header;
//! the buttons act through the ordinary `/v1` API.

use std::net::IpAddr;
use std::sync::OnceLock;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde::Serialize;

use super::api::Lookup;
use super::AdminBody;
use crate::config::LogIp;
use crate::decide::clock::now_ms;
use crate::observe::access_log::LoggedIp;
use crate::state::csp::inline_hash;
use crate::state::AppState;

mod views;

const PAGE: &str = include_str!("page.html");

/// Its own script and style, calls to its own origin; nothing else.
pub fn csp() -> &'static str {
    static CSP: OnceLock<String> = OnceLock::new();
    CSP.get_or_init(|| {
        format!(
            "default-src 'none'; script-src '{}'; style-src '{}'; connect-src 'self'; \
             img-src 'none'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
            inline_hash(PAGE, "<script>"),
            inline_hash(PAGE, "<style>"),
        )
    })
}

fn with_headers(mut resp: Response<AdminBody>, content_type: &'static str) -> Response<AdminBody> {
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if let Ok(v) = HeaderValue::from_str(csp()) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    resp
}

/// `GET /`: the page (it holds no data; the views need the token).
pub(super) fn page() -> Response<AdminBody> {
    with_headers(
        Response::new(Full::new(Bytes::from_static(PAGE.as_bytes()))),
        "text/html; charset=utf-8",
    )
}

/// `GET /v1/console/VIEW` (the token already checked): one view's HTML.
pub(super) async fn view(
    state: &AppState,
    name: &str,
    param: impl Fn(&str) -> Option<String>,
) -> Response<AdminBody> {
    let html = match name {
        "sites" => views::sites(state),
        "entries" => views::entries(
            state,
            param("q").as_deref().unwrap_or(""),
            param("sort").as_deref().unwrap_or("expires"),
        ),
        "lookup" => match param("ip").as_deref().map(str::trim).map(super::parse_ip) {
            Some(Ok(ip)) => lookup(state, ip).await,
            _ => Ok("<p class=\"bad\">Give an IPv4 or IPv6 address.</p>".to_string()),
        },
        "jails" => views::jails(state),
        "health" => views::health(state),
        _ => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"not found\n")));
            *r.status_mut() = StatusCode::NOT_FOUND;
            return r;
        }
    };
    let html = html.unwrap_or_else(|e| format!("<p class=\"bad\">This view failed: {e}</p>"));
    with_headers(
        Response::new(Full::new(Bytes::from(html))),
        "text/html; charset=utf-8",
    )
}

/// The lookup view: the API's own answer, rendered.
async fn lookup(state: &AppState, ip: IpAddr) -> Result<String, minijinja::Error> {
    let resp = super::ips::lookup(state, ip).await;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if !status.is_success() {
        return Ok(format!(
            "<p class=\"bad\">Lookup failed: {}</p>",
            String::from_utf8_lossy(&bytes)
                .replace('&', "&amp;")
                .replace('<', "&lt;")
        ));
    }
    let lookup: Option<Lookup> = serde_json::from_slice(&bytes).ok();
    views::render(
        "lookup.html",
        minijinja::context! { l => lookup, ip => ip.to_string() },
    )
}

/// A client (an address or a network) as the console shows it where it is only shown, not
/// acted on: as `privacy.log_ip` says. Anonymized, nothing narrower than an IPv4 /24 or an
/// IPv6 /48 is shown.
fn shown(target: ipnet::IpNet, log_ip: LogIp) -> String {
    let widest = match target {
        ipnet::IpNet::V4(_) => 24,
        ipnet::IpNet::V6(_) => 48,
    };
    match log_ip {
        LogIp::None => "-".into(),
        LogIp::Full => target.to_string(),
        LogIp::Anonymized if target.prefix_len() == target.max_prefix_len() => {
            LoggedIp(target.addr(), log_ip).to_string()
        }
        LogIp::Anonymized if target.prefix_len() > widest => {
            ipnet::IpNet::new(target.addr(), widest)
                .map(|n| n.trunc().to_string())
                .unwrap_or_default()
        }
        LogIp::Anonymized => target.to_string(),
    }
}

/// Milliseconds left until `at`, spoken short: "59m", "3h 5m", "2d 4h".
fn left(at: u64, now: u64) -> String {
    let s = at.saturating_sub(now) / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[derive(Serialize)]
struct Row {
    target: String,
    action: &'static str,
    scope: Option<String>,
    source: String,
    reason: Option<String>,
    origin: Option<String>,
    created: String,
    left: String,
    expires_ms: u64,
    created_ms: u64,
    host: bool,
}

fn now() -> u64 {
    now_ms()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_csp_names_the_page_script_and_style_by_hash() {
        let csp = super::csp();
        assert!(csp.contains("script-src 'sha256-"), "{csp}");
        assert!(csp.contains("style-src 'sha256-"), "{csp}");
        assert!(!csp.contains("unsafe"));
        assert_eq!(super::left(90_000, 0), "1m");
        assert_eq!(super::left(3 * 3_600_000 + 300_000, 0), "3h 5m");
        use crate::config::LogIp;
        let net = |t: &str| t.parse::<ipnet::IpNet>().unwrap();
        let anon = |t: &str| super::shown(net(t), LogIp::Anonymized);
        assert_eq!(anon("2001:db8:1:2::/64"), "2001:db8:1::/48");
        assert_eq!(anon("192.0.2.128/25"), "192.0.2.0/24");
        assert_eq!(anon("192.0.2.7/32"), "192.0.2.0");
        assert_eq!(anon("10.0.0.0/8"), "10.0.0.0/8");
        assert_eq!(super::shown(net("192.0.2.7/32"), LogIp::None), "-");
        assert_eq!(
            super::shown(net("192.0.2.7/32"), LogIp::Full),
            "192.0.2.7/32"
        );
    }
}
