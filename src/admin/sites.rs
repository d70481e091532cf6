//! `/v1/sites/{name}/challenge`: a site's challenge mode as configured, as forced by the
//! operator, and whether it challenges now; `PUT` forces it (`on`, `off`, `auto`) or hands it
//! back to the config (`config`). A forced mode holds across reloads, not restarts.

use http::{Response, StatusCode};

use super::*;
use crate::admin::api::{ChallengeView, SetChallenge};
use crate::config::ChallengeMode;
use crate::state::SiteEntry;

fn view(site: &SiteEntry) -> ChallengeView {
    let mode = site.load.mode(site.site.challenge);
    ChallengeView {
        site: site.site.name.clone(),
        mode,
        configured: site.site.challenge,
        forced: site.load.forced(),
        challenging: site.load.challenging(mode),
    }
}

/// `GET` or `PUT /v1/sites/{name}/challenge` (`rest` is what follows `/v1/sites/`).
pub(super) async fn challenge(
    state: &AppState,
    method: &Method,
    rest: &str,
    body: Bytes,
) -> Response<AdminBody> {
    let Some(name) = rest.strip_suffix("/challenge") else {
        return json_error(StatusCode::NOT_FOUND, "no such endpoint");
    };
    let name: String = form_urlencoded::parse(format!("x={name}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let snap = state.snapshot.load();
    let Some(site) = snap.sites.iter().find(|s| s.site.name == name) else {
        return json_error(StatusCode::NOT_FOUND, &format!("no site is named '{name}'"));
    };
    if method == Method::PUT {
        let set: SetChallenge = match serde_json::from_slice(&body) {
            Ok(s) => s,
            Err(e) => return json_error(StatusCode::BAD_REQUEST, &format!("malformed body: {e}")),
        };
        let forced = match set.mode.as_str() {
            "config" => None,
            m => match m.parse::<ChallengeMode>() {
                Ok(mode) => Some(mode),
                Err(_) => {
                    return json_error(
                        StatusCode::BAD_REQUEST,
                        &format!("mode: '{m}': \"on\", \"off\", \"auto\" or \"config\""),
                    )
                }
            },
        };
        site.load.force(forced);
        tracing::info!(
            site = %name,
            mode = forced.map_or("config", |m| m.as_str()),
            "challenge mode set by the operator"
        );
        state.tick_challenge();
    }
    json(StatusCode::OK, &view(site))
}
