//! An operator's everyday needs: the HTTPS redirect and HSTS.

mod common;

use std::time::Duration;

use common::*;

/// One raw HTTP/1.1 exchange on the plain listener (`Connection: close`): the status, the
/// Location header, and whether the upstream was reached.
async fn exchange(gw: &TestGateway, head: &str) -> (u16, Option<String>, String) {
    let bytes = raw_exchange(gw.plain, head.as_bytes(), Duration::from_secs(3)).await;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let location = text
        .lines()
        .find_map(|l| l.strip_prefix("location: "))
        .map(str::to_string);
    (status, location, text)
}

#[tokio::test]
async fn redirect_https_sends_get_and_head_301_and_other_methods_308_with_path_and_query() {
    let gw = GatewayBuilder::new().redirect_https().spawn().await;
    let port = gw.tls.port();
    let origin = gw.origin.as_ref().unwrap();

    let (status, location, _) = exchange(
        &gw,
        "GET /shop/cart.php?item=7&q=a%20b HTTP/1.1\r\nHost: A.Test:80\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 301);
    // The host as the client named it, without its port; the TLS listener's port, which
    // is not 443 here; path and query unchanged.
    assert_eq!(
        location.as_deref(),
        Some(format!("https://A.Test:{port}/shop/cart.php?item=7&q=a%20b").as_str())
    );

    let (status, location, _) = exchange(
        &gw,
        "HEAD / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 301);
    assert_eq!(
        location.as_deref(),
        Some(format!("https://a.test:{port}/").as_str())
    );

    for method in ["POST", "PUT", "DELETE"] {
        let head = format!(
            "{method} /wp-login.php?redirect_to=x HTTP/1.1\r\nHost: a.test\r\n\
             Content-Length: 5\r\nConnection: close\r\n\r\nlog=1"
        );
        let (status, location, _) = exchange(&gw, &head).await;
        assert_eq!(status, 308, "{method}");
        assert_eq!(
            location.as_deref(),
            Some(format!("https://a.test:{port}/wp-login.php?redirect_to=x").as_str())
        );
    }
    // Nothing reached the site over plain HTTP; the TLS listener still proxies.
    assert_eq!(origin.count(), 0);
    let (status, _) = https_get(&gw, "/").await;
    assert_eq!(status, 200);
    assert_eq!(origin.count(), 1);

    let metrics = gw.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"ipgate_requests_total{outcome="redirected",site="*"}"#
        ),
        Some(5.0)
    );
}

#[tokio::test]
async fn acme_challenges_are_proxied_through_a_redirect_listener() {
    let gw = GatewayBuilder::new().redirect_https().spawn().await;
    let origin = gw.origin.as_ref().unwrap();
    // certbot's webroot mode: the challenge reaches the site over plain HTTP, in each form
    // that names the same path.
    for path in [
        "/.well-known/acme-challenge/tok3n",
        "/.well-known/./acme-challenge/tok3n",
        "/%2Ewell-known/acme-challenge/tok3n",
    ] {
        let (status, body) = plain_get(gw.plain, path, "a.test").await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(
            json(&body)["uri"],
            "/.well-known/acme-challenge/tok3n",
            "{path}"
        );
    }
    assert_eq!(origin.count(), 3);
    // Next to it, but not under it: redirected.
    let (status, location, _) = exchange(
        &gw,
        "GET /.well-known/acme-challenge HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 301);
    assert!(location.unwrap().starts_with("https://a.test:"));
    assert_eq!(origin.count(), 3);
}

#[tokio::test]
async fn a_blocked_client_is_refused_not_redirected() {
    let gw = GatewayBuilder::new()
        .redirect_https()
        .extra("[lists.bad]\naction = \"block\"\nentries = [\"127.0.0.9\"]\n")
        .spawn()
        .await;
    // Refused at accept: a blocked client gets no redirect either.
    assert!(refused("127.0.0.9", gw.plain).await);
    let (status, _, _) = exchange(
        &gw,
        "GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 301);
}

#[tokio::test]
async fn hsts_is_added_to_tls_responses_of_its_site_only() {
    let gw = GatewayBuilder::new()
        .sites(
            r#"
[[site]]
hosts = ["a.test"]
upstream = "http://{upstream}"
hsts = "1y"

[[site]]
hosts = ["b.test"]
upstream = "http://{upstream}"
"#,
        )
        .spawn()
        .await;
    let (parts, _) = https_request(&gw, get("/", "a.test")).await;
    assert_eq!(parts.status, 200);
    // humantime's year: 365.25 days.
    assert_eq!(
        parts.headers.get("strict-transport-security").unwrap(),
        "max-age=31557600"
    );
    let (parts, _) = https_request(&gw, get("/", "b.test")).await;
    assert!(!parts.headers.contains_key("strict-transport-security"));
    // Never over plain HTTP (RFC 6797 §7.2).
    let bytes = raw_exchange(
        gw.plain,
        b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    let text = String::from_utf8_lossy(&bytes).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(!text.contains("strict-transport-security"), "{text}");
}

#[tokio::test]
async fn certificate_expiry_is_a_metric_and_listed_by_ipgate_certs() {
    let files = GatewayBuilder::new()
        .cert_a_until((2031, 5, 17))
        .files()
        .await;
    let gw = files.start("info");
    // 2031-05-17T00:00:00Z.
    let a_expiry = 1_936_742_400;
    let (_, metrics) = plain_get(gw.admin, "/metrics", "localhost").await;
    assert_eq!(
        metric(
            &metrics,
            r#"ipgate_certificate_expiry_timestamp_seconds{name="a.test"}"#
        ),
        Some(a_expiry as f64)
    );
    // b.test's certificate is rcgen's default: until 4096-01-01.
    assert_eq!(
        metric(
            &metrics,
            r#"ipgate_certificate_expiry_timestamp_seconds{name="b.test"}"#
        ),
        Some(67_090_118_400.0)
    );

    let cli = |args: &[&str]| files.cli(gw.admin, None, args).output().unwrap();
    let out = cli(&["certs", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let certs = json(&String::from_utf8_lossy(&out.stdout));
    let certs = certs.as_array().unwrap();
    assert_eq!(certs.len(), 2);
    // Soonest expiry first.
    assert_eq!(
        certs[0]["names"],
        serde_json::json!(["a.test", "localhost"])
    );
    assert_eq!(certs[0]["source"], "file");
    assert_eq!(certs[0]["not_after"], "2031-05-17T00:00:00Z");
    assert_eq!(certs[0]["not_before"], "2024-01-01T00:00:00Z");
    assert!(certs[0]["file"].as_str().unwrap().ends_with("a.crt"));
    assert_eq!(certs[0]["next_renewal"], serde_json::Value::Null);
    assert_eq!(
        certs[1]["names"],
        serde_json::json!(["b.test", "*.wild.test"])
    );

    let out = cli(&["certs"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.lines().nth(1).is_some_and(
            |l| l.starts_with("2031-05-17T00:00:00Z") && l.contains("a.test,localhost")
        ),
        "{text}"
    );
    gw.signal("TERM");
    assert!(gw.wait().await.success());
}

/// GET over plain HTTP from a chosen loopback address, with a Host.
async fn get_from(local: &str, addr: std::net::SocketAddr, path: &str, host: &str) -> u16 {
    get_on(connect_from(local, addr).await, path, host, &[])
        .await
        .0
}

const SCOPED_SITES: &str = r#"
[[jail]]
name = "shop-login"
path = "/login"
status = [200]
hits = 2
window = "1m"
ban = "1h"
scope = "site"

[[jail]]
name = "everywhere"
path = "/xmlrpc.php"
hits = 2
window = "1m"
ban = "1h"

[[site]]
name = "shop"
hosts = ["a.test"]
upstream = "http://{upstream}"
jails = ["shop-login", "everywhere"]

[[site]]
name = "blog"
hosts = ["b.test"]
upstream = "http://{upstream}"
"#;

#[tokio::test]
async fn a_site_scoped_jail_bans_on_its_sites_only_and_the_scope_survives_a_restart() {
    let files = GatewayBuilder::new().sites(SCOPED_SITES).files().await;
    let gw = files.start("info");
    let token = std::fs::read_to_string(files.token_file()).unwrap();
    let token = token.trim();
    let plain = gw.plain;

    // Two failed logins on the shop: banned there, served on the blog.
    for _ in 0..2 {
        assert_eq!(get_from("127.0.0.21", plain, "/login", "a.test").await, 200);
    }
    assert!(
        eventually(Duration::from_secs(3), || async {
            get_from("127.0.0.21", plain, "/", "a.test").await == 403
        })
        .await
    );
    assert_eq!(get_from("127.0.0.21", plain, "/", "b.test").await, 200);
    assert_eq!(get_from("127.0.0.22", plain, "/", "a.test").await, 200);
    // The same site however its host is written.
    for host in ["A.Test", "a.test.", "a.test:8080", "a.test.:80"] {
        assert_eq!(
            get_from("127.0.0.21", plain, "/", host).await,
            403,
            "{host}"
        );
    }

    // By hand, with the CLI: one site only.
    let out = files
        .cli(
            gw.admin,
            None,
            &["ban", "127.0.0.23", "--ttl", "1h", "--site", "blog"],
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, listed) =
        admin_call(gw.admin, "GET", "/v1/entries?list=block", None, Some(token)).await;
    let made = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["target"] == "127.0.0.23/32")
        .cloned()
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(made["scope"], "site:blog");
    assert_eq!(get_from("127.0.0.23", plain, "/", "b.test").await, 403);
    assert_eq!(get_from("127.0.0.23", plain, "/", "a.test").await, 200);
    let (status, _) = admin_call(
        gw.admin,
        "POST",
        "/v1/entries",
        Some(serde_json::json!({"target": "127.0.0.24", "action": "block", "site": "nosuch"})),
        Some(token),
    )
    .await;
    assert_eq!(status, 400);

    // Lookup shows each scope; the escalation history is the jail's, as for any jail.
    let scopes = |lookup: &serde_json::Value| -> Vec<String> {
        lookup["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["scope"].as_str().unwrap_or("everywhere").to_string())
            .collect()
    };
    let (_, lookup) = admin_call(gw.admin, "GET", "/v1/ips/127.0.0.21", None, Some(token)).await;
    assert_eq!(scopes(&lookup), vec!["jail:shop-login"], "{lookup}");
    assert_eq!(lookup["decision"], "pass", "{lookup}");
    assert_eq!(lookup["offenses"][0]["jail"], "shop-login", "{lookup}");

    // Restart: both scoped bans come back from the store, scope and all.
    gw.signal("TERM");
    assert!(gw.wait().await.success());
    let gw = files.start("info");
    let plain = gw.plain;
    assert_eq!(get_from("127.0.0.21", plain, "/", "a.test").await, 403);
    assert_eq!(get_from("127.0.0.21", plain, "/", "b.test").await, 200);
    assert_eq!(get_from("127.0.0.23", plain, "/", "b.test").await, 403);
    assert_eq!(get_from("127.0.0.23", plain, "/", "a.test").await, 200);
    let (_, lookup) = admin_call(gw.admin, "GET", "/v1/ips/127.0.0.23", None, Some(token)).await;
    assert_eq!(scopes(&lookup), vec!["site:blog"], "{lookup}");

    // A global jail on the same site still bans everywhere.
    for _ in 0..2 {
        get_from("127.0.0.25", plain, "/xmlrpc.php", "a.test").await;
    }
    assert!(
        eventually(Duration::from_secs(3), || async {
            match try_connect_from("127.0.0.25", plain).await {
                // Refused at accept, before a byte is read: banned everywhere.
                Ok(tcp) => {
                    closed_without_a_byte(tcp, b"GET / HTTP/1.1\r\nHost: b.test\r\n\r\n").await
                }
                Err(_) => true,
            }
        })
        .await
    );

    // Unban of the scoped entry: served again on the shop.
    let (status, _) = admin_call(
        gw.admin,
        "DELETE",
        "/v1/entries?target=127.0.0.21&action=block&scope=jail:shop-login",
        None,
        Some(token),
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(get_from("127.0.0.21", plain, "/", "a.test").await, 200);
    gw.signal("TERM");
    assert!(gw.wait().await.success());
}
