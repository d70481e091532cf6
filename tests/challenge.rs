//! The proof-of-work challenge through the real gateway: the page, solutions good and bad,
//! the pass it makes (scope, expiry, IPv6 prefix, list, lookup, forget), what a pass does
//! not spare, opted-out routes, challenge lists, auto mode under a slowed upstream, the
//! operator's command, and the challenge-fail jail. Each client is its own loopback address.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// A request as a browser's navigation sends it, from `local`, on a fresh plain connection:
/// status, headers, body. `None` when the gateway closed the connection unanswered.
async fn visit(
    gw: &TestGateway,
    local: &str,
    asked: (&str, &str, &str),
    headers: &[(&str, &str)],
) -> Option<(u16, http::HeaderMap, String)> {
    visit_at(gw.plain, local, asked, headers).await
}

/// `visit` on any plain listener (a gateway process's).
async fn visit_at(
    plain: std::net::SocketAddr,
    local: &str,
    (method, path, host): (&str, &str, &str),
    headers: &[(&str, &str)],
) -> Option<(u16, http::HeaderMap, String)> {
    use http_body_util::BodyExt;
    let tcp = try_connect_from(local, plain).await.ok()?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .ok()?;
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    if !headers.iter().any(|(k, _)| *k == "accept") {
        req = req.header("accept", "text/html,application/xhtml+xml;q=0.9,*/*;q=0.8");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = http_body_util::Empty::<bytes::Bytes>::new();
    let resp = sender.send_request(req.body(body).unwrap()).await.ok()?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.ok()?.to_bytes();
    Some((
        parts.status.as_u16(),
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

/// GET of a page on a.test from `local`.
async fn page(gw: &TestGateway, local: &str, path: &str) -> (u16, http::HeaderMap, String) {
    visit(gw, local, ("GET", path, "a.test"), &[])
        .await
        .expect("answered")
}

/// Solves the challenge `html` as `local` on `host`; the status and Location of the answer.
async fn solve(gw: &TestGateway, local: &str, host: &str, html: &str) -> (u16, String) {
    let (status, headers, _) = visit(gw, local, ("GET", &solution(html), host), &[])
        .await
        .unwrap();
    let location = headers
        .get("location")
        .map(|l| l.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, location)
}

const TWO_SITES: &str = r#"
[challenge]
difficulty = 8
pass_ttl = "3s"

[[site]]
hosts = ["a.test"]
upstream = "http://{upstream}"
challenge = "always"

[[site]]
name = "blog"
hosts = ["b.test"]
upstream = "http://{upstream}"
challenge = "always"
"#;

#[tokio::test]
async fn a_solved_challenge_is_a_pass_for_its_address_and_site_until_it_expires() {
    let gw = GatewayBuilder::new().sites(TWO_SITES).spawn().await;
    let origin = gw.origin.as_ref().unwrap();
    let (status, headers, html) = page(&gw, "127.0.3.1", "/shop?item=7").await;
    assert_eq!(status, 403);
    assert_eq!(origin.count(), 0, "nothing reached the upstream");
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(headers["x-robots-tag"], "noindex, nofollow");
    assert!(headers["content-security-policy"]
        .to_str()
        .unwrap()
        .starts_with("default-src 'none'"));
    assert!(!headers.contains_key("set-cookie"));
    assert!(html.contains("<noscript>"));
    assert!(
        html.contains("kept for 1 minute"),
        "the pass's lifetime: {html}"
    );
    assert!(!html.contains("src=\"http") && !html.contains("localStorage"));

    let (status, location) = solve(&gw, "127.0.3.1", "a.test", &html).await;
    assert_eq!((status, location.as_str()), (303, "/shop?item=7"));
    let (status, _, body) = page(&gw, "127.0.3.1", "/shop?item=7").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(origin.last().as_deref(), Some("GET /shop?item=7"));
    // The pass holds on its site only, and for its address only.
    assert_eq!(
        visit(&gw, "127.0.3.1", ("GET", "/", "b.test"), &[])
            .await
            .unwrap()
            .0,
        403
    );
    assert_eq!(page(&gw, "127.0.3.2", "/").await.0, 403);

    // Listed, looked up, capped: an entry like any other.
    let token = gw.token();
    let (_, list) = admin_call(gw.admin, "GET", "/v1/entries?list=pass", None, Some(&token)).await;
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["target"], "127.0.3.1/32");
    assert_eq!(list[0]["action"], "pass");
    assert_eq!(list[0]["scope"], "site:a.test");
    assert_eq!(list[0]["source"], "challenge");
    let text = gw.metrics().await;
    assert_eq!(metric(&text, "ipgate_passes"), Some(1.0));
    assert_eq!(
        metric(
            &text,
            r#"ipgate_challenges_total{result="passed",site="a.test"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            r#"ipgate_requests_total{outcome="challenged",site="blog"}"#
        ),
        Some(1.0)
    );

    // It expires with pass_ttl: challenged again.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert_eq!(page(&gw, "127.0.3.1", "/").await.0, 403);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_pass_is_shown_by_lookup_and_erased_by_forget() {
    let sites = TWO_SITES.replace("pass_ttl = \"3s\"", "pass_ttl = \"1h\"");
    let gw = GatewayBuilder::new().sites(&sites).spawn().await;
    let (_, _, html) = page(&gw, "127.0.3.11", "/").await;
    assert_eq!(solve(&gw, "127.0.3.11", "a.test", &html).await.0, 303);
    assert_eq!(page(&gw, "127.0.3.11", "/").await.0, 200);

    let out = gw.cli(&["lookup", "127.0.3.11", "--json"]).await;
    let lookup: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entries = lookup["entries"].as_array().unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e["action"] == "pass" && e["scope"] == "site:a.test"),
        "{lookup}"
    );
    let out = gw.cli(&["list", "--pass"]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("127.0.3.11"));

    let out = gw.cli(&["forget", "127.0.3.11"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        page(&gw, "127.0.3.11", "/").await.0,
        403,
        "challenged again"
    );
    let token = gw.token();
    let (_, list) = admin_call(gw.admin, "GET", "/v1/entries?list=pass", None, Some(&token)).await;
    assert_eq!(list, json!([]));
    gw.shutdown().await;
}

#[tokio::test]
async fn forged_replayed_expired_and_other_clients_solutions_are_refused() {
    let sites = TWO_SITES.replace("[challenge]", "[challenge]\npuzzle_ttl = \"1s\"");
    let gw = GatewayBuilder::new().sites(&sites).spawn().await;
    let (_, _, html) = page(&gw, "127.0.3.21", "/").await;
    let good = solution(&html);
    let refused = |answer: Option<(u16, http::HeaderMap, String)>| {
        let (status, headers, body) = answer.unwrap();
        status == 403 && !headers.contains_key("location") && body.contains("could not be verified")
    };
    // Forged: the way back changed after signing.
    let forged = good.replacen("r=%2F", "r=%2Fadmin", 1);
    assert_ne!(forged, good);
    assert!(refused(
        visit(&gw, "127.0.3.21", ("GET", &forged, "a.test"), &[]).await
    ));
    // Another client's solution, and another site's.
    assert!(refused(
        visit(&gw, "127.0.3.22", ("GET", &good, "a.test"), &[]).await
    ));
    assert!(refused(
        visit(&gw, "127.0.3.21", ("GET", &good, "b.test"), &[]).await
    ));
    // A nonce that does not solve it.
    let (url, sig, bits) = puzzle(&html);
    let wrong = (0u64..)
        .find(|n| !ipgate::decide::challenge::solves(&sig, &n.to_string(), bits))
        .unwrap();
    let unsolved = format!("{url}&n={wrong}");
    assert!(refused(
        visit(&gw, "127.0.3.21", ("GET", &unsolved, "a.test"), &[]).await
    ));
    // Good once, then a replay.
    assert_eq!(solve(&gw, "127.0.3.21", "a.test", &html).await.0, 303);
    assert!(refused(
        visit(&gw, "127.0.3.21", ("GET", &good, "a.test"), &[]).await
    ));
    // Expired: puzzle_ttl is 1 s here.
    let (_, _, html) = page(&gw, "127.0.3.23", "/").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(refused(
        visit(&gw, "127.0.3.23", ("GET", &solution(&html), "a.test"), &[]).await
    ));
    assert_eq!(
        page(&gw, "127.0.3.23", "/").await.0,
        403,
        "no pass was made"
    );
    let text = gw.metrics().await;
    assert_eq!(
        metric(
            &text,
            r#"ipgate_challenges_total{result="failed",site="a.test"}"#
        ),
        Some(5.0)
    );
    // No panic, no 5xx on garbage.
    for junk in [
        "",
        "e=1",
        "h=zz&n=1",
        "e=99999999999999&i=&d=99&s=&t=&r=&h=00&n=1",
    ] {
        let path = format!("/.well-known/ipgate/challenge?{junk}");
        let status = visit(&gw, "127.0.3.24", ("GET", &path, "a.test"), &[])
            .await
            .unwrap()
            .0;
        assert_eq!(status, 403);
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn requests_that_cannot_show_a_page_get_a_plain_refusal_in_either_language() {
    let gw = GatewayBuilder::new().sites(TWO_SITES).spawn().await;
    let origin = gw.origin.as_ref().unwrap();
    let local = "127.0.3.31";
    for (method, headers) in [
        ("POST", vec![]),
        ("GET", vec![("sec-fetch-dest", "image")]),
        ("GET", vec![("accept", "application/json")]),
    ] {
        let (status, h, body) = visit(&gw, local, (method, "/api", "a.test"), &headers)
            .await
            .unwrap();
        assert_eq!(status, 403, "{method} {headers:?}");
        assert!(h["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
        assert!(body.contains("browser check"), "{body}");
    }
    // HEAD gets the page's head, no body.
    let (status, _, body) = visit(&gw, local, ("HEAD", "/", "a.test"), &[])
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (403, ""));
    // Dutch when asked for.
    let nl = [("accept-language", "nl-NL,nl;q=0.9,en;q=0.5")];
    let (_, h, html) = visit(&gw, local, ("GET", "/", "a.test"), &nl)
        .await
        .unwrap();
    assert_eq!(h["content-language"], "nl");
    assert!(
        html.contains("Voor deze controle is JavaScript nodig"),
        "{html}"
    );
    // Never challenged: robots.txt, ACME's HTTP-01.
    for path in ["/robots.txt", "/.well-known/acme-challenge/tok"] {
        assert_eq!(page(&gw, local, path).await.0, 200, "{path}");
    }
    assert_eq!(origin.count(), 2);
    gw.shutdown().await;
}

#[tokio::test]
async fn ipv6_clients_of_one_prefix_share_a_pass() {
    // Behind a trusted proxy, the client is the X-Forwarded-For address.
    let gw = GatewayBuilder::new()
        .gateway_keys(r#"trusted_proxies = ["127.0.0.0/8"]"#)
        .sites(TWO_SITES)
        .spawn()
        .await;
    async fn as_client(gw: &TestGateway, ip: &str, path: &str) -> (u16, String) {
        let xff = [("x-forwarded-for", ip)];
        let (status, _, body) = visit(gw, "127.0.3.41", ("GET", path, "a.test"), &xff)
            .await
            .unwrap();
        (status, body)
    }
    let (status, html) = as_client(&gw, "2001:db8:1:2::5", "/").await;
    assert_eq!(status, 403);
    let verify = solution(&html);
    assert_eq!(as_client(&gw, "2001:db8:1:2::5", &verify).await.0, 303);
    assert_eq!(as_client(&gw, "2001:db8:1:2::5", "/").await.0, 200);
    let same = as_client(&gw, "2001:db8:1:2:ffff::9", "/").await.0;
    assert_eq!(same, 200, "same /64");
    assert_eq!(
        as_client(&gw, "2001:db8:1:3::5", "/").await.0,
        403,
        "another /64"
    );
    let token = gw.token();
    let (_, list) = admin_call(gw.admin, "GET", "/v1/entries?list=pass", None, Some(&token)).await;
    assert_eq!(list[0]["target"], "2001:db8:1:2::/64");
    // The proxy itself is never challenged.
    assert_eq!(page(&gw, "127.0.3.41", "/").await.0, 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_pass_spares_the_challenge_only_not_a_ban_a_rate_limit_or_a_jail() {
    let sites = r#"
[challenge]
difficulty = 8

[[jail]]
name = "wp-login"
method = "POST"
path = "/wp-login.php"
status = [200]
hits = 2
window = "10m"
ban = "1h"

[[site]]
hosts = ["a.test"]
upstream = "http://{upstream}"
challenge = "always"
jails = ["wp-login"]
rate_limit = { requests_per_second = 1, burst = 8 }
"#;
    let gw = GatewayBuilder::new().sites(sites).spawn().await;
    let passed = |local: &'static str| {
        let gw = &gw;
        async move {
            let (_, _, html) = page(gw, local, "/").await;
            assert_eq!(solve(gw, local, "a.test", &html).await.0, 303);
            assert_eq!(page(gw, local, "/").await.0, 200);
        }
    };
    // A ban.
    passed("127.0.3.51").await;
    let out = gw.cli(&["ban", "127.0.3.51"]).await;
    assert!(out.status.success());
    assert_eq!(
        visit(&gw, "127.0.3.51", ("GET", "/", "a.test"), &[]).await,
        None
    );
    // The rate limit (burst 8: two requests went for the pass).
    passed("127.0.3.52").await;
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(page(&gw, "127.0.3.52", "/").await.0);
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    // A jail: two failed logins ban.
    passed("127.0.3.53").await;
    for _ in 0..2 {
        let r = visit(&gw, "127.0.3.53", ("POST", "/wp-login.php", "a.test"), &[]).await;
        assert_eq!(r.unwrap().0, 200);
    }
    let banned = eventually(Duration::from_secs(3), || async {
        visit(&gw, "127.0.3.53", ("GET", "/", "a.test"), &[])
            .await
            .is_none()
    })
    .await;
    assert!(banned, "the jail banned the client despite its pass");
    gw.shutdown().await;
}

#[tokio::test]
async fn opted_out_routes_allowed_clients_and_challenge_lists() {
    let sites = r#"
[challenge]
difficulty = 8

[lists.office]
action = "allow"
entries = ["127.0.3.61"]

[lists.cloud]
action = "challenge"
entries = ["127.0.3.70/31"]

[[site]]
hosts = ["a.test"]
upstream = "http://{upstream}"
challenge = "always"
[[site.route]]
path = "/remote.php/dav"
challenge = "off"

[[site]]
name = "blog"
hosts = ["b.test"]
upstream = "http://{upstream}"
[[site.route]]
path = "/xmlrpc.php"
challenge = "off"
"#;
    let gw = GatewayBuilder::new().sites(sites).spawn().await;
    let get = |local, path, host| visit(&gw, local, ("GET", path, host), &[]);
    assert_eq!(
        get("127.0.3.62", "/remote.php/dav/files/x", "a.test")
            .await
            .unwrap()
            .0,
        200
    );
    assert_eq!(
        get("127.0.3.62", "/remote.php/davx", "a.test")
            .await
            .unwrap()
            .0,
        200
    );
    assert_eq!(get("127.0.3.62", "/", "a.test").await.unwrap().0, 403);
    assert_eq!(
        get("127.0.3.61", "/", "a.test").await.unwrap().0,
        200,
        "allow-listed"
    );
    // A challenge list: its members are challenged where the site is not, except on
    // opted-out routes; others are not.
    assert_eq!(get("127.0.3.70", "/", "b.test").await.unwrap().0, 403);
    assert_eq!(get("127.0.3.71", "/", "b.test").await.unwrap().0, 403);
    assert_eq!(
        get("127.0.3.70", "/xmlrpc.php", "b.test").await.unwrap().0,
        200
    );
    assert_eq!(get("127.0.3.72", "/", "b.test").await.unwrap().0, 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn the_operator_forces_a_sites_mode() {
    let gw = GatewayBuilder::new()
        .sites(&TWO_SITES.replace("always", "off"))
        .spawn()
        .await;
    assert_eq!(page(&gw, "127.0.3.81", "/").await.0, 200);
    let out = gw.cli(&["challenge", "a.test", "on"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("challenging every client"));
    assert_eq!(page(&gw, "127.0.3.81", "/").await.0, 403);
    assert_eq!(
        gw.metric_settled(r#"ipgate_challenge_mode{site="a.test"}"#, 1.0)
            .await,
        Some(1.0)
    );
    // Survives a reload.
    assert_eq!(gw.reload_with("").await, 200);
    assert_eq!(page(&gw, "127.0.3.81", "/").await.0, 403);
    let token = gw.token();
    let (status, view) = admin_call(
        gw.admin,
        "PUT",
        "/v1/sites/a.test/challenge",
        Some(json!({"mode": "config"})),
        Some(&token),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(view["mode"], "off");
    assert_eq!(view["forced"], serde_json::Value::Null);
    assert_eq!(page(&gw, "127.0.3.81", "/").await.0, 200);
    let bad = Some(json!({"mode": "sometimes"}));
    let path = "/v1/sites/a.test/challenge";
    assert_eq!(
        admin_call(gw.admin, "PUT", path, bad, Some(&token)).await.0,
        400
    );
    let path = "/v1/sites/nope/challenge";
    assert_eq!(
        admin_call(gw.admin, "GET", path, None, Some(&token))
            .await
            .0,
        404
    );
    assert_eq!(admin_call(gw.admin, "GET", path, None, None).await.0, 401);
    let out = gw.cli(&["challenge", "nope", "off"]).await;
    assert!(!out.status.success());
    gw.shutdown().await;
}

#[tokio::test]
async fn a_client_that_keeps_fetching_challenges_is_jailed() {
    let sites = r#"
[challenge]
difficulty = 8

[[jail]]
name = "challenge-fail"
challenge = true
hits = 4
window = "10m"
ban = "1h"

[[site]]
hosts = ["a.test"]
upstream = "http://{upstream}"
challenge = "always"
jails = ["challenge-fail"]
"#;
    let gw = GatewayBuilder::new().sites(sites).spawn().await;
    // Three pages and one bad solution: banned.
    let mut html = String::new();
    for _ in 0..3 {
        html = page(&gw, "127.0.3.91", "/").await.2;
    }
    let (url, _, _) = puzzle(&html);
    let bad = visit(
        &gw,
        "127.0.3.91",
        ("GET", &format!("{url}&n=x"), "a.test"),
        &[],
    )
    .await;
    assert_eq!(bad.unwrap().0, 403);
    let banned = eventually(Duration::from_secs(3), || async {
        visit(&gw, "127.0.3.91", ("GET", "/", "a.test"), &[])
            .await
            .is_none()
    })
    .await;
    assert!(banned);
    // One who solves is not counted on: three pages, a solution, then browsing.
    for _ in 0..3 {
        html = page(&gw, "127.0.3.92", "/").await.2;
    }
    assert_eq!(solve(&gw, "127.0.3.92", "a.test", &html).await.0, 303);
    for _ in 0..5 {
        assert_eq!(page(&gw, "127.0.3.92", "/").await.0, 200);
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn auto_mode_challenges_while_the_upstream_is_saturated_and_stops_after_calm() {
    let sites = r#"
[challenge]
difficulty = 8
auto_in_flight = 4
auto_response_time = "1h"
auto_calm = "2s"

[[site]]
hosts = ["a.test"]
upstream = "http://{upstream}"
challenge = "auto"
# The load comes through an opted-out route (every route's requests are measured), so the
# slow requests are never challenged themselves, however late they arrive.
[[site.route]]
path = "/slow"
challenge = "off"
"#;
    let files = GatewayBuilder::new().sites(sites).files().await;
    let bin = files.start("info");
    // A thin wrapper so the helpers above can be used on the binary gateway.
    let gw = BinaryTarget(bin.plain);
    assert_eq!(gw.get("127.0.4.1", "/").await.0, 200);
    // Six slow requests from six clients saturate the upstream.
    let slow: Vec<_> = (0..6)
        .map(|i| {
            let local = format!("127.0.4.{}", 10 + i);
            let plain = bin.plain;
            tokio::spawn(async move { BinaryTarget(plain).get(&local, "/slow?ms=2500").await })
        })
        .collect();
    let entered = eventually(Duration::from_secs(2), || async {
        gw.get("127.0.4.2", "/").await.0 == 429
    })
    .await;
    assert!(entered, "auto mode did not start under load");
    let (status, headers, html) = gw.get("127.0.4.3", "/").await;
    assert_eq!(status, 429);
    assert_eq!(headers["retry-after"], "30");
    // A visitor who solves passes even under load.
    let verify = solution(&html);
    assert_eq!(gw.get("127.0.4.3", &verify).await.0, 303);
    assert_eq!(gw.get("127.0.4.3", "/").await.0, 200);
    for s in slow {
        assert_eq!(s.await.unwrap().0, 200, "requests in flight finish");
    }
    let calm_from = Instant::now();
    // Hysteresis: still challenging a second after the load ended.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(gw.get("127.0.4.4", "/").await.0, 429);
    let left = eventually(Duration::from_secs(4), || async {
        gw.get("127.0.4.5", "/").await.0 == 200
    })
    .await;
    assert!(left, "auto mode did not end after calm");
    assert!(calm_from.elapsed() >= Duration::from_millis(1500));
    let log = bin.output.text();
    assert_eq!(log.matches("upstream saturated").count(), 1, "{log}");
    assert_eq!(log.matches("upstream calm again").count(), 1, "{log}");
}

/// A plain listener of a gateway process.
struct BinaryTarget(std::net::SocketAddr);

impl BinaryTarget {
    async fn get(&self, local: &str, path: &str) -> (u16, http::HeaderMap, String) {
        let accept = [("accept", "text/html")];
        visit_at(self.0, local, ("GET", path, "a.test"), &accept)
            .await
            .expect("answered")
    }
}

#[tokio::test]
async fn a_pass_and_the_puzzle_key_survive_a_crash_and_the_pass_is_capped_by_retention() {
    let sites = r#"
[privacy]
max_retention = "1h"

[challenge]
difficulty = 8
pass_ttl = "30d"

[[site]]
hosts = ["a.test"]
upstream = "http://{upstream}"
challenge = "always"
"#;
    let files = GatewayBuilder::new().sites(sites).files().await;
    let bin = files.start("info");
    let gw = BinaryTarget(bin.plain);
    let (_, _, html) = gw.get("127.0.6.1", "/").await;
    assert_eq!(gw.get("127.0.6.1", &solution(&html)).await.0, 303);
    // A page served before the crash, solved after it.
    let (_, _, pending) = gw.get("127.0.6.2", "/").await;
    bin.signal("KILL");
    let _ = bin.wait().await;
    let bin = files.start("info");
    let gw = BinaryTarget(bin.plain);
    assert_eq!(
        gw.get("127.0.6.1", "/").await.0,
        200,
        "the pass survived kill -9"
    );
    assert_eq!(gw.get("127.0.6.2", &solution(&pending)).await.0, 303);
    assert_eq!(gw.get("127.0.6.2", "/").await.0, 200);
    let token = std::fs::read_to_string(files.token_file()).unwrap();
    let (_, list) = admin_call(
        bin.admin,
        "GET",
        "/v1/entries?list=pass",
        None,
        Some(token.trim()),
    )
    .await;
    assert_eq!(list.as_array().unwrap().len(), 2);
    for e in list.as_array().unwrap() {
        let expires = humantime::parse_rfc3339(e["expires_at"].as_str().unwrap()).unwrap();
        let left = expires
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        assert!(
            left <= Duration::from_secs(3600),
            "pass_ttl capped by max_retention: {e}"
        );
    }
}

#[tokio::test]
async fn the_challenges_own_paths_are_never_proxied_and_exemptions_are_exact() {
    let gw = GatewayBuilder::new().sites(TWO_SITES).spawn().await;
    let origin = gw.origin.as_ref().unwrap();
    async fn status(gw: &TestGateway, method: &str, path: &str) -> u16 {
        let asked = (method, path, "a.test");
        visit(gw, "127.0.3.101", asked, &[]).await.unwrap().0
    }
    assert_eq!(status(&gw, "GET", "/.well-known/ipgate/other").await, 404);
    assert_eq!(
        status(&gw, "POST", "/.well-known/ipgate/challenge/x").await,
        404
    );
    // Only the exact forms are exempt: an upstream may route anything else to PHP.
    assert_eq!(
        status(&gw, "GET", "/.well-known/acme-challenge/a/b").await,
        403
    );
    assert_eq!(
        status(&gw, "POST", "/.well-known/acme-challenge/tok").await,
        403
    );
    assert_eq!(status(&gw, "GET", "/robots.txt?x=1").await, 403);
    assert_eq!(status(&gw, "POST", "/robots.txt").await, 403);
    assert_eq!(status(&gw, "GET", "/robots.txt.php").await, 403);
    assert_eq!(origin.count(), 0, "nothing reached the upstream");
    assert_eq!(
        status(&gw, "GET", "/.well-known/acme-challenge/tok_en-1").await,
        200
    );
    assert_eq!(status(&gw, "HEAD", "/robots.txt").await, 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_redirecting_listener_redirects_before_it_would_challenge() {
    let gw = GatewayBuilder::new()
        .redirect_https()
        .sites(TWO_SITES)
        .spawn()
        .await;
    let (status, headers, _) = page(&gw, "127.0.3.111", "/shop").await;
    assert_eq!(status, 301);
    assert!(headers["location"]
        .to_str()
        .unwrap()
        .starts_with("https://a.test"));
    gw.shutdown().await;
}

#[tokio::test]
async fn requests_whose_clients_went_away_do_not_hold_auto_mode() {
    let sites = r#"
[challenge]
difficulty = 8
auto_in_flight = 4
auto_response_time = "1h"
auto_calm = "1s"

[[site]]
hosts = ["a.test"]
upstream = "http://{upstream}"
challenge = "auto"
"#;
    let gw = GatewayBuilder::new().sites(sites).spawn().await;
    // Five clients ask for a slow page and go away before it comes.
    for i in 0..5 {
        let mut tcp = connect_from(&format!("127.0.3.{}", 120 + i), gw.plain).await;
        use tokio::io::AsyncWriteExt;
        let head = "GET /slow?ms=20000 HTTP/1.1\r\nHost: a.test\r\nAccept: text/html\r\n\r\n";
        tcp.write_all(head.as_bytes()).await.unwrap();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(700)).await;
            drop(tcp);
        });
    }
    let mode = r#"ipgate_challenge_mode{site="a.test"}"#;
    assert_eq!(gw.metric_settled(mode, 1.0).await, Some(1.0), "entered");
    // Gone at 0.7 s; calm for 1 s after: auto mode ends long before the 20 s answers.
    let left = eventually(Duration::from_secs(5), || async {
        metric(&gw.metrics().await, mode) == Some(0.0)
    })
    .await;
    assert!(left, "requests dropped by their clients kept auto mode on");
    assert_eq!(page(&gw, "127.0.3.130", "/").await.0, 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_second_tabs_solution_goes_back_without_a_new_pass_and_passes_are_capped() {
    let sites = TWO_SITES.replace("pass_ttl = \"3s\"", "pass_ttl = \"1h\"\nmax_passes = 1");
    let gw = GatewayBuilder::new().sites(&sites).spawn().await;
    let (_, _, first) = page(&gw, "127.0.3.141", "/one").await;
    let (_, _, second) = page(&gw, "127.0.3.141", "/two").await;
    assert_eq!(
        solve(&gw, "127.0.3.141", "a.test", &first).await,
        (303, "/one".into())
    );
    assert_eq!(
        solve(&gw, "127.0.3.141", "a.test", &second).await,
        (303, "/two".into())
    );
    let text = gw.metrics().await;
    assert_eq!(metric(&text, "ipgate_passes"), Some(1.0));
    let passed = r#"ipgate_challenges_total{result="passed",site="a.test"}"#;
    assert_eq!(metric(&text, passed), Some(1.0));
    // max_passes = 1: another client's solution makes none until that one expires.
    let (_, _, html) = page(&gw, "127.0.3.142", "/").await;
    let (status, _, body) = visit(&gw, "127.0.3.142", ("GET", &solution(&html), "a.test"), &[])
        .await
        .unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(page(&gw, "127.0.3.142", "/").await.0, 403);
    gw.shutdown().await;
}

#[tokio::test]
async fn auto_mode_starts_when_requests_wait_for_an_upstream_connection() {
    let sites = r#"
[challenge]
difficulty = 8
auto_in_flight = 100
auto_response_time = "1h"
auto_calm = "1s"

[[site]]
hosts = ["a.test"]
upstream = "http://{upstream}"
challenge = "auto"
max_upstream_connections = 1
[[site.route]]
path = "/slow"
challenge = "off"
"#;
    let gw = GatewayBuilder::new().sites(sites).spawn().await;
    // Two slow requests, one connection: the second waits for it.
    let plain = gw.plain;
    let slow: Vec<_> = (0..2)
        .map(|i| {
            tokio::spawn(async move {
                let tcp = connect_from(&format!("127.0.3.{}", 150 + i), plain).await;
                get_on(tcp, "/slow?ms=1500", "a.test", &[]).await.0
            })
        })
        .collect();
    let mode = r#"ipgate_challenge_mode{site="a.test"}"#;
    assert_eq!(
        gw.metric_settled(mode, 1.0).await,
        Some(1.0),
        "a wait saturates"
    );
    assert_eq!(page(&gw, "127.0.3.152", "/").await.0, 429);
    for s in slow {
        assert_eq!(s.await.unwrap(), 200);
    }
    gw.shutdown().await;
}
