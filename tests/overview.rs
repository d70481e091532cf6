//! The security overview: `ipgate overview` writes it from the config (its figures follow
//! the config, in Dutch and English, as Markdown or HTML), and `privacy.overview_path` serves
//! it on every site, with the visitor's own data (categories and expiry, no counter) when
//! `privacy.self_service` is on.

mod common;

use std::time::Duration;

use common::*;

fn overview(config: &std::path::Path, lang: &str, format: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ipgate"))
        .args(["overview", "-c"])
        .arg(config)
        .args(["--lang", lang, "--format", format])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

const SITES: &str = r#"
[privacy]
max_retention = "30d"
operator = "Voorbeeld Hosting B.V."
contact = "privacy@voorbeeld.nl"
overview_path = "/security-overview"
self_service = true

[challenge]
difficulty = 8

[[jail]]
name = "wp-login"
method = "POST"
path = "/wp-login.php"
status = [200]
hits = 3
window = "10m"
ban = "1h"
ban_factor = 2.0
max_ban = "7d"

[[site]]
name = "shop"
hosts = ["a.test"]
upstream = "http://{upstream}"
challenge = "always"
jails = ["wp-login"]

[[site]]
name = "blog"
hosts = ["b.test"]
upstream = "http://{upstream}"
"#;

#[tokio::test]
async fn the_cli_writes_the_figures_in_force_in_both_languages_and_formats() {
    let files = GatewayBuilder::new().sites(SITES).files().await;
    let en = overview(&files.config, "en", "md");
    assert!(
        en.contains("Voorbeeld Hosting B.V. protects these websites"),
        "{en}"
    );
    assert!(en.contains("3 failed attempts within 10 minutes lead to a ban of 1 hour; repeat bans grow, up to 7 days"), "{en}");
    assert!(en.contains("Nothing is kept longer than 30 days"), "{en}");
    let nl = overview(&files.config, "nl", "html");
    assert!(
        nl.starts_with("<!DOCTYPE html>\n<html lang=\"nl\">"),
        "{nl}"
    );
    assert!(nl.contains("leiden tot een blokkade van 1 uur"), "{nl}");
    assert!(nl.contains("Schrijf naar privacy@voorbeeld.nl"), "{nl}");

    // Another ban and retention in the file: other figures (max_ban capped by the retention).
    let text = std::fs::read_to_string(&files.config)
        .unwrap()
        .replace("ban = \"1h\"", "ban = \"2h\"")
        .replace("max_retention = \"30d\"", "max_retention = \"3d\"");
    std::fs::write(&files.config, text).unwrap();
    let en = overview(&files.config, "en", "md");
    assert!(
        en.contains("lead to a ban of 2 hours; repeat bans grow, up to 3 days"),
        "{en}"
    );
    assert!(en.contains("Nothing is kept longer than 3 days"), "{en}");
    let nl = overview(&files.config, "nl", "md");
    assert!(
        nl.contains("een blokkade van 2 uur; een volgende blokkade duurt langer, tot 3 dagen"),
        "{nl}"
    );
    assert!(
        nl.contains("Niets wordt langer bewaard dan 3 dagen"),
        "{nl}"
    );
}

async fn get(
    gw: &TestGateway,
    local: &str,
    host: &str,
    path: &str,
    lang: &str,
) -> (u16, http::HeaderMap, String) {
    use http_body_util::BodyExt;
    let tcp = connect_from(local, gw.plain).await;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", host)
        .header("accept", "text/html")
        .header("accept-language", lang)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
        .await
        .unwrap()
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status.as_u16(),
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test]
async fn every_site_serves_it_and_a_visitor_sees_their_own_data_without_counters() {
    let gw = GatewayBuilder::new().sites(SITES).spawn().await;
    let me = "127.0.71.1";
    // On every site, even one that challenges every visitor; in the visitor's language.
    let (code, headers, page) =
        get(&gw, me, "a.test", "/security-overview", "nl-NL,nl;q=0.9").await;
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("<h1>Beveiligingsoverzicht"), "{page}");
    assert!(headers["content-security-policy"]
        .to_str()
        .unwrap()
        .starts_with("default-src 'none'; style-src 'sha256-"));
    assert_eq!(headers["cache-control"], "private, no-store");
    assert!(
        page.contains("Een teller voor de snelheidslimiet, in het werkgeheugen"),
        "{page}"
    );
    let (code, _, page) = get(&gw, me, "b.test", "/security-overview", "en").await;
    assert_eq!(code, 200);
    assert!(
        page.contains("A rate-limit counter") && !page.contains("A ban"),
        "{page}"
    );
    assert!(page.contains(&format!("<code>{me}</code>")), "{page}");

    // Only GET and HEAD are the gateway's: a POST to the path is the upstream's, and on a
    // site that challenges every visitor it is challenged like any, never forwarded.
    let origin = gw.origin.as_ref().unwrap();
    let before = origin.count();
    let posted = post_from(gw.plain, "127.0.71.9", "/security-overview", "a.test").await;
    assert_eq!(posted, Some(403));
    assert_eq!(
        origin.count(),
        before,
        "a POST to the overview path reached the upstream"
    );

    // A pass (the challenge solved on shop), a failed login counted, a ban on blog only.
    let (code, _, challenge) = get(&gw, me, "a.test", "/", "en").await;
    assert_eq!(code, 403);
    let (code, _, _) = get(&gw, me, "a.test", &solution(&challenge), "en").await;
    assert_eq!(code, 303);
    assert_eq!(
        post_from(gw.plain, me, "/wp-login.php", "a.test").await,
        Some(200)
    );
    let out = gw
        .cli(&[
            "ban", me, "--ttl", "2h", "--site", "blog", "--reason", "test",
        ])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (code, _, page) = get(&gw, me, "a.test", "/security-overview", "en").await;
    assert_eq!(code, 200);
    let own = &page[page
        .find("What we hold about your address now")
        .expect("the visitor's part")..];
    assert!(own.contains("A challenge pass for shop, until 20"), "{own}");
    assert!(own.contains("A ban, until 20"), "{own}");
    assert!(own.contains("A count of failed attempts (<code>wp-login</code>), in memory, for 10 minutes at most."), "{own}");
    assert!(own.contains("A rate-limit counter, in memory"), "{own}");
    // Categories and expiry only: no count of failures, no threshold, no reason.
    assert!(
        !own.contains("1 of 3") && !own.contains("hits") && !own.contains("test"),
        "{own}"
    );
    // Another visitor sees nothing of this one.
    let (_, _, other) = get(&gw, "127.0.71.2", "a.test", "/security-overview", "en").await;
    assert!(
        other.contains("A rate-limit counter")
            && !other.contains("A ban")
            && !other.contains("A challenge pass")
            && !other.contains("failed attempts ("),
        "{other}"
    );
    assert!(!other.contains(me));
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "ipgate_requests_total{outcome=\"overview\",site=\"shop\"}"
        ),
        Some(3.0)
    );
}

#[test]
fn overview_keys_are_checked() {
    let check = |privacy: &str| {
        let text = format!("[[listener]]\naddr = \"127.0.0.1:0\"\n[[site]]\nhosts = [\"*\"]\nupstream = \"http://127.0.0.1:9\"\n[privacy]\n{privacy}");
        match ipgate::config::Config::parse(std::path::Path::new("ipgate.toml"), &text) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    };
    assert_eq!(
        check("overview_path = \"/privacy/ipgate\"\nself_service = true"),
        ""
    );
    assert!(check("self_service = true").contains("privacy.self_service"));
    assert!(check("overview_path = \"privacy\"").contains("privacy.overview_path"));
    assert!(check("overview_path = \"/x?y=1\"").contains("privacy.overview_path"));
    assert!(
        check("overview_path = \"/.well-known/ipgate/privacy\"").contains("privacy.overview_path")
    );
}
