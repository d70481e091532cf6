//! A real browser through the gateway: Debian's Chromium, headless (`scripts/test`
//! installs it), opens a challenged page over TLS, solves the challenge with the page's own
//! script at the default difficulty, and lands on the upstream's answer.

mod common;

use std::time::Duration;

use common::*;

/// Chromium's flags for a sandboxed test run: no network of its own, a fresh profile.
fn chromium(profile: &std::path::Path, port: u16) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("chromium");
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
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
    let run = chromium(profile.path(), port)
        .args(["--virtual-time-budget=30000", "--dump-dom"])
        .arg(&url)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("chromium did not finish in 90 s")
        .expect("chromium is not installed: run scripts/test, which installs it");
    let dom = String::from_utf8_lossy(&out.stdout);
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
