//! A real browser through the gateway: Debian's Chromium, headless (`scripts/test`
//! installs it), opens a challenged page over TLS, solves the challenge with the page's own
//! script at the default difficulty, and lands on the upstream's answer.

mod common;

use std::time::Duration;

use common::*;

/// Chromium's flags for a sandboxed test run: no network of its own, a fresh profile, and
/// QUIC off unless asked for.
fn chromium(profile: &std::path::Path, port: u16, quic: bool) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("chromium");
    if !quic {
        c.arg("--disable-quic");
    }
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--ignore-certificate-errors",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .arg(format!(
        "--host-resolver-rules=MAP a.test:{port} 127.0.0.1:{port}"
    ))
    .kill_on_drop(true);
    c
}

/// Chromium's DOM of `url` once loaded (and its scripts run), with its whole output.
async fn dump_dom(c: &mut tokio::process::Command, url: &str) -> (String, std::process::Output) {
    let run = c.arg("--dump-dom").arg(url).output();
    let out = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("chromium did not finish in 90 s")
        .expect("chromium is not installed: run scripts/test, which installs it");
    (String::from_utf8_lossy(&out.stdout).into_owned(), out)
}

#[tokio::test]
async fn chromium_solves_the_challenge_and_lands_on_the_page_it_asked_for() {
    let sites = r#"
[[site]]
hosts = ["a.test"]
upstream = "http://{upstream}"
challenge = "always"
"#;
    let gw = GatewayBuilder::new().sites(sites).spawn().await;
    let profile = tempfile::tempdir().unwrap();
    let port = gw.tls.port();
    let url = format!("https://a.test:{port}/welcome?from=browser");
    let mut c = chromium(profile.path(), port, false);
    let (dom, out) = dump_dom(c.arg("--virtual-time-budget=30000"), &url).await;
    // The upstream echoes the request it got: the page the browser first asked for.
    assert!(
        dom.contains(r#""uri":"/welcome?from=browser""#),
        "the browser did not land on the upstream's page:\n{dom}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = gw.metrics().await;
    let passed = r#"ipgate_challenges_total{result="passed",site="a.test"}"#;
    assert_eq!(metric(&text, passed), Some(1.0));
    let solve = r#"ipgate_challenge_solve_seconds_sum{site="a.test"}"#;
    let secs = metric(&text, solve).unwrap();
    // For the note and docs/challenge.md: the default difficulty on this machine.
    eprintln!("chromium solved the default challenge in {secs:.2} s (page served to solution)");
    let token = gw.token();
    let (_, passes) =
        admin_call(gw.admin, "GET", "/v1/entries?list=pass", None, Some(&token)).await;
    assert_eq!(passes[0]["target"], "127.0.0.1/32");
    gw.shutdown().await;
}

/// Chromium loads a page over HTTP/3 (QUIC forced on for the gateway's origin): Chromium's
/// own net log shows a QUIC session to the gateway and the page's request sent over it, the
/// gateway's access log says `HTTP/3` for it, and the upstream's answer is the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_loads_a_page_over_http3() {
    let port = free_port();
    let h3 = format!("[[listener]]\naddr = \"127.0.0.1:{port}\"\ntls = true\nhttp3 = true\n");
    let files = GatewayBuilder::new()
        .extra(&h3)
        .access_log(true)
        .files()
        .await;
    let gw = files.start("info");
    let profile = tempfile::tempdir().unwrap();
    let url = format!("https://a.test:{port}/over-h3");
    // Chromium's QUIC does not honour --ignore-certificate-errors: the leaf's key is trusted
    // by its SPKI hash instead (openssl: the public key, DER, SHA-256, base64).
    let spki = std::process::Command::new("sh")
        .arg("-c")
        .arg("openssl x509 -in \"$0\" -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64")
        .arg(files.dir.path().join("a.crt"))
        .output()
        .expect("openssl");
    let spki = String::from_utf8_lossy(&spki.stdout).trim().to_string();
    let net_log = profile.path().join("net-log.json");
    let mut c = chromium(profile.path(), port, true);
    c.arg(format!("--log-net-log={}", net_log.display()))
        .arg(format!("--ignore-certificate-errors-spki-list={spki}"))
        .arg("--enable-quic")
        .arg(format!("--origin-to-force-quic-on=a.test:{port}"))
        .arg("--virtual-time-budget=10000");
    let (dom, out) = dump_dom(&mut c, &url).await;
    assert!(
        dom.contains(r#""uri":"/over-h3""#),
        "the page did not load:\n{dom}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = gw.output.text();
    assert!(
        log.lines()
            .any(|l| l.contains("/over-h3") && l.contains("\"proto\":\"HTTP/3\"")),
        "not over HTTP/3:\n{log}"
    );
    // Chromium's net log: a QUIC session to the gateway, and the page's request headers
    // sent over QUIC (events are numbered; their names are in the log's constants).
    let net: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&net_log).unwrap()).unwrap();
    let kind = |name: &str| net["constants"]["logEventTypes"][name].as_u64().unwrap();
    let (session, sent) = (
        kind("QUIC_SESSION"),
        kind("HTTP_TRANSACTION_QUIC_SEND_REQUEST_HEADERS"),
    );
    let events = net["events"].as_array().unwrap();
    let to_gateway = events.iter().any(|e| {
        e["type"].as_u64() == Some(session)
            && e["params"]["host"] == "a.test"
            && e["params"]["port"].as_u64() == Some(u64::from(port))
    });
    let page_over_quic = events.iter().any(|e| {
        e["type"].as_u64() == Some(sent)
            && e["params"]["headers"]
                .as_array()
                .is_some_and(|h| h.iter().any(|h| h == ":path: /over-h3"))
    });
    assert!(
        to_gateway,
        "no QUIC session to the gateway in Chromium's net log"
    );
    assert!(
        page_over_quic,
        "the page was not asked for over QUIC (HTTP/3)"
    );
}
