//! The web console in a real browser: Debian's Chromium, headless, driven through the
//! DevTools protocol. Sign-in with the admin token and a wrong token refused; a ban made with
//! the CLI appears; unban and forget from the page, checked through the gateway; no request
//! to anything but the admin listener; a phone-width screenshot. And without a browser: a
//! view asked for from another origin without the token is refused, and the page's headers.

mod common;

use std::time::Duration;

use common::cdp::Browser;
use common::*;

const SITES: &str = r#"
[[jail]]
name = "wp-login"
method = "POST"
path = "/wp-login.php"
status = [200]
hits = 3
window = "10m"
ban = "1h"

[[site]]
name = "shop"
hosts = ["*"]
upstream = "http://{upstream}"
jails = ["wp-login"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_signs_in_shows_a_ban_and_unbans_and_forgets_through_the_api() {
    let gw = GatewayBuilder::new().sites(SITES).spawn().await;
    let url = format!("http://{}/", gw.admin);
    let mut b = Browser::start().await;
    b.open(&url).await;

    // A wrong token: the API's 401, said plainly; the views stay hidden.
    b.eval("document.querySelector('#token').value = 'wrong'; document.querySelector('#signin-form').requestSubmit(); true").await;
    assert!(
        b.until("document.querySelector('#message').textContent.includes('401')")
            .await,
        "{}",
        b.text("#message").await
    );
    assert_eq!(
        b.eval("document.querySelector('#views').classList.contains('hidden')")
            .await,
        true
    );

    // The right one, by keyboard only: focus, type, Enter.
    let token = gw.token();
    b.eval("document.querySelector('#token').focus(); true")
        .await;
    b.call("Input.insertText", serde_json::json!({ "text": token }))
        .await;
    for kind in ["keyDown", "keyUp"] {
        let key = serde_json::json!({ "type": kind, "key": "Enter", "code": "Enter",
            "windowsVirtualKeyCode": 13, "text": "\r" });
        b.call("Input.dispatchKeyEvent", key).await;
    }
    assert!(
        b.until("document.querySelector('#message').textContent === 'Signed in.'")
            .await,
        "{}",
        b.text("#message").await
    );
    assert!(
        b.until("document.querySelector('[data-view=sites]').textContent.includes('shop')")
            .await
    );

    // A ban made with the CLI appears in the entries.
    let banned = "127.0.80.1";
    assert!(!refused(banned, gw.plain).await);
    let out = gw
        .cli(&["ban", banned, "--ttl", "1h", "--reason", "cli ban"])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(refused(banned, gw.plain).await);
    b.eval("refresh().then(() => true)").await;
    let entries = b.text("[data-view=entries]").await;
    assert!(
        entries.contains("127.0.80.1/32") && entries.contains("cli ban"),
        "{entries}"
    );
    // Recent bans only show the address, so as privacy.log_ip says (anonymized: its /24).
    let jails = b.text("[data-view=jails]").await;
    assert!(
        jails.contains("127.0.80.0") && !jails.contains("127.0.80.1"),
        "{jails}"
    );
    // The chart: a bar per minute.
    let bars = "document.querySelectorAll('[data-view=sites] svg rect').length > 1";
    assert_eq!(b.eval(bars).await, true);

    // Unban from the page: the gateway serves the client again.
    b.eval("document.querySelector('button[data-act=unban][data-target=\"127.0.80.1/32\"]').click(); true").await;
    assert!(
        b.until(
            "document.querySelector('#message').textContent.startsWith('Unbanned 127.0.80.1/32')"
        )
        .await,
        "{}",
        b.text("#message").await
    );
    assert!(eventually(Duration::from_secs(5), || served_from(banned, gw.plain)).await);
    let gone =
        "!document.querySelector('[data-view=entries]').textContent.includes('127.0.80.1/32')";
    assert!(b.until(gone).await);

    // A forget erases the address's ban record too.
    let path = format!("/v1/ips/{banned}");
    let (code, _) = admin_call(gw.admin, "DELETE", &path, None, Some(&token)).await;
    assert_eq!(code, 200);
    b.eval("refresh().then(() => true)").await;
    assert!(!b.text("[data-view=jails]").await.contains("127.0.80.0"));

    // Refused at request level (a ban on this site only): counted for the last hour, shown
    // as privacy.log_ip says, held in lookup, erased by forget.
    let scoped = "127.0.81.3";
    let out = gw
        .cli(&["ban", scoped, "--ttl", "1h", "--site", "shop"])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for _ in 0..3 {
        assert_eq!(
            raw_status(
                gw.plain,
                scoped,
                "GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
            )
            .await,
            Some(403)
        );
    }
    b.eval("refresh().then(() => true)").await;
    let jails = b.text("[data-view=jails]").await;
    let most = &jails[jails.find("Refused most").expect("the refused-most table")..];
    assert!(most.contains("127.0.81.0") && most.contains('3'), "{most}");
    let path = format!("/v1/ips/{scoped}");
    let (_, held) = admin_call(gw.admin, "GET", &path, None, Some(&token)).await;
    assert_eq!(held["refused_last_hour"], 3, "{held}");
    admin_call(gw.admin, "DELETE", &path, None, Some(&token)).await;
    let (_, held) = admin_call(gw.admin, "GET", &path, None, Some(&token)).await;
    assert!(held.get("refused_last_hour").is_none(), "{held}");

    // Forget from the lookup: a failed login counted and an allow entry, then nothing held.
    let other = "127.0.80.2";
    assert_eq!(
        post_from(gw.plain, other, "/wp-login.php", "a.test").await,
        Some(200)
    );
    assert!(gw
        .cli(&["allow", other, "--ttl", "1h"])
        .await
        .status
        .success());
    b.eval(&format!("document.querySelector('#ip').value = {other:?}; document.querySelector('#lookup-form').requestSubmit(); true")).await;
    assert!(
        b.until(
            "document.querySelector('[data-view=lookup]').textContent.includes('jail counter')"
        )
        .await,
        "{}",
        b.text("[data-view=lookup]").await
    );
    b.eval("document.querySelector('button[data-act=forget]').click(); true")
        .await;
    assert!(b.until("document.querySelector('#message').textContent.startsWith('Forgot everything held about 127.0.80.2')").await, "{}", b.text("#message").await);
    let (code, held) = admin_call(
        gw.admin,
        "GET",
        &format!("/v1/ips/{other}"),
        None,
        Some(&token),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(held["entries"], serde_json::json!([]), "{held}");
    assert_eq!(held["jail_counters"], serde_json::json!([]), "{held}");

    // Nothing but the admin listener was asked for.
    let foreign: Vec<&String> = b
        .requests
        .iter()
        .filter(|u| !u.starts_with(&url) && !u.starts_with("about:") && !u.starts_with("data:"))
        .collect();
    assert!(foreign.is_empty(), "requests elsewhere: {foreign:?}");
    assert!(b.requests.iter().any(|u| u.contains("/v1/console/entries")));

    // At a phone's width, for the docs.
    b.call(
        "Emulation.setDeviceMetricsOverride",
        serde_json::json!({ "width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": true }),
    )
    .await;
    let shot = b
        .call(
            "Page.captureScreenshot",
            serde_json::json!({ "format": "png" }),
        )
        .await;
    use base64::Engine;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000);
    std::fs::write(
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-phone.png"),
        png,
    )
    .unwrap();
    let wide = b.eval("document.documentElement.scrollWidth <= 400").await;
    assert_eq!(wide, true, "the page is wider than the phone");
}

#[tokio::test]
async fn a_view_without_the_token_is_refused_from_any_origin_and_the_page_is_locked_down() {
    let gw = GatewayBuilder::new().spawn().await;
    let tcp = tokio::net::TcpStream::connect(gw.admin).await.unwrap();
    let head = format!(
        "GET /v1/console/entries HTTP/1.1\r\nHost: {}\r\nOrigin: http://evil.test\r\nConnection: close\r\n\r\n",
        gw.admin
    );
    let mut tcp = tcp;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    assert!(
        !out.to_ascii_lowercase()
            .contains("access-control-allow-origin"),
        "{out}"
    );
    assert!(!out.to_ascii_lowercase().contains("set-cookie"));
    // The page itself: no data, no cookie, its CSP.
    let (code, page) = plain_get(gw.admin, "/", &gw.admin.to_string()).await;
    assert_eq!(code, 200);
    assert!(
        page.contains("Sign in") && !page.contains("http://") && !page.contains("https://"),
        "{page}"
    );
    let (code, _) = admin_call(gw.admin, "GET", "/v1/console/entries", None, Some("wrong")).await;
    assert_eq!(code, 401);
    let (code, _) = admin_call(
        gw.admin,
        "GET",
        "/v1/console/entries",
        None,
        Some(&gw.token()),
    )
    .await;
    assert_eq!(code, 200);
}
