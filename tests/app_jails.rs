//! The ready jails in config/jails/ against an upstream that answers logins the way each
//! hosted app does: failures reach `hits` and ban; where the app's answer tells success
//! apart, successes never ban.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// Answers a login POST like the app would; `?good` in the query makes it a good login.
async fn app(req: Request<Incoming>) -> Result<Response<Full<bytes::Bytes>>, Infallible> {
    let good = req.uri().query().is_some_and(|q| q.contains("good"));
    let path = req.uri().path().to_string();
    let (status, location) = match (path.as_str(), good) {
        // WordPress: the form again (200), or a redirect to wp-admin.
        ("/wp-login.php", false) => (200, None),
        ("/wp-login.php", true) => (302, Some("/wp-admin/")),
        // XML-RPC: 200 whatever happened.
        ("/xmlrpc.php", _) => (200, None),
        // Joomla: 303 to the same return URL either way.
        ("/administrator/index.php", _) => (303, Some("/administrator/index.php")),
        // Roundcube 1.4+: 401 while not logged in, 302 to the mailbox once logged in.
        ("/", false) => (401, None),
        ("/", true) => (302, Some("/?_task=mail")),
        // Nextcloud: 303 back to the login form, or to the app.
        ("/login", false) => (303, Some("/login?user=admin&direct=1")),
        ("/login", true) => (303, Some("/apps/dashboard/")),
        // phpMyAdmin and ISPConfig: the form again (200), or a redirect.
        ("/phpmyadmin/index.php" | "/login/index.php", false) => (200, None),
        ("/phpmyadmin/index.php" | "/login/index.php", true) => (302, Some("/")),
        _ => (404, None),
    };
    let _ = req.into_body().collect().await;
    let mut resp = Response::new(Full::new(bytes::Bytes::from_static(b"app")));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
    if let Some(l) = location {
        resp.headers_mut().insert("location", l.parse().unwrap());
    }
    Ok(resp)
}

async fn start_app() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(app))
                    .await;
            });
        }
    });
    addr
}

fn snippets() -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/jails");
    let mut all = String::new();
    for name in [
        "wordpress",
        "joomla",
        "roundcube",
        "nextcloud",
        "phpmyadmin",
        "ispconfig",
    ] {
        all.push_str(&std::fs::read_to_string(dir.join(format!("{name}.toml"))).unwrap());
        all.push('\n');
    }
    all
}

#[tokio::test]
async fn each_app_jail_bans_on_its_failure_signature() {
    let upstream = start_app().await;
    let sites = r#"
[[site]]
hosts = ["wordpress.test"]
upstream = "http://{upstream}"
jails = ["wp-login", "wp-xmlrpc"]
[[site]]
hosts = ["joomla.test"]
upstream = "http://{upstream}"
jails = ["joomla-admin"]
[[site]]
hosts = ["webmail.test"]
upstream = "http://{upstream}"
jails = ["roundcube"]
[[site]]
hosts = ["cloud.test"]
upstream = "http://{upstream}"
jails = ["nextcloud"]
[[site]]
hosts = ["pma.test"]
upstream = "http://{upstream}"
jails = ["phpmyadmin"]
[[site]]
hosts = ["panel.test"]
upstream = "http://{upstream}"
jails = ["ispconfig"]
"#;
    let gw = GatewayBuilder::new()
        .upstream(upstream)
        .sites(sites)
        .extra(&snippets())
        .spawn()
        .await;
    // (client, host, path, hits, whether a good login is told apart)
    let cases = [
        ("127.0.1.1", "wordpress.test", "/wp-login.php", 5, true),
        ("127.0.1.2", "wordpress.test", "/xmlrpc.php", 10, false),
        (
            "127.0.1.3",
            "joomla.test",
            "/administrator/index.php",
            10,
            false,
        ),
        ("127.0.1.4", "webmail.test", "/?_task=login", 5, true),
        ("127.0.1.5", "cloud.test", "/login", 5, true),
        (
            "127.0.1.6",
            "pma.test",
            "/phpmyadmin/index.php?route=/",
            10,
            true,
        ),
        ("127.0.1.7", "panel.test", "/login/index.php", 5, true),
    ];
    for (i, (client, host, path, hits, tells_success)) in cases.into_iter().enumerate() {
        for _ in 0..hits - 1 {
            assert!(
                post_from(gw.plain, client, path, host).await.is_some(),
                "{host}{path}"
            );
        }
        // One short of `hits`: still served.
        assert!(post_from(gw.plain, "127.0.1.200", "/other", host)
            .await
            .is_some());
        assert!(post_from(gw.plain, client, path, host).await.is_some());
        assert!(
            eventually(Duration::from_secs(3), || async {
                post_from(gw.plain, client, path, host).await.is_none()
            })
            .await,
            "{host}{path}: no ban after {hits} failures"
        );
        if tells_success {
            // Good logins from another client, more than `hits` of them, ban nobody.
            let other = format!("127.0.2.{}", i + 1);
            let sep = if path.contains('?') { '&' } else { '?' };
            let good = format!("{path}{sep}good");
            for _ in 0..hits + 2 {
                assert!(
                    post_from(gw.plain, &other, &good, host).await.is_some(),
                    "{host}{good}"
                );
            }
            // A ban is written asynchronously: give one time to land, then look.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (_, v) = admin_call(
                gw.admin,
                "GET",
                &format!("/v1/ips/{other}"),
                None,
                Some(&gw.token()),
            )
            .await;
            assert_eq!(
                v["decision"], "pass",
                "{host}{good}: good logins were counted: {v}"
            );
        }
    }
    let (_, v) = admin_call(
        gw.admin,
        "GET",
        "/v1/entries?list=block",
        None,
        Some(&gw.token()),
    )
    .await;
    let sources: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["source"].as_str().unwrap())
        .collect();
    for jail in [
        "wp-login",
        "wp-xmlrpc",
        "joomla-admin",
        "roundcube",
        "nextcloud",
        "phpmyadmin",
        "ispconfig",
    ] {
        assert!(sources.contains(&jail), "{jail} made no ban: {sources:?}");
    }
    gw.shutdown().await;
}
