//! Reload by SIGHUP: a valid config is swapped in; a broken one is refused whole while the
//! old one keeps serving.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn sighup_applies_a_valid_config_and_refuses_a_broken_one() {
    let upstream = Upstream::start().await;
    let site =
        |hosts: &str| format!("[[site]]\nhosts = [{hosts}]\nupstream = \"http://{{upstream}}\"\n");
    let b = GatewayBuilder::new().upstream(upstream.addr);
    let files = b.clone().sites(&site("\"a.test\"")).files().await;
    let gw = files.start("info");
    assert_eq!(plain_get(gw.plain, "/", "a.test").await.0, 200);
    assert_eq!(plain_get(gw.plain, "/", "b.test").await.0, 421);

    std::fs::write(
        &files.config,
        b.clone().sites(&site("\"a.test\", \"b.test\"")).text(),
    )
    .unwrap();
    gw.signal("HUP");
    assert!(
        eventually(Duration::from_secs(5), || async {
            plain_get(gw.plain, "/", "b.test").await.0 == 200
        })
        .await,
        "reloaded site never served"
    );

    // Broken: a bad duration and a certificate that does not exist.
    let broken = b
        .clone()
        .sites(&site("\"c.test\""))
        .gateway_keys("default_ban = \"never\"")
        .text()
        .replace("b.crt", "gone.crt");
    std::fs::write(&files.config, broken).unwrap();
    gw.signal("HUP");
    assert!(
        eventually(Duration::from_secs(5), || async {
            let (_, m) = plain_get(gw.admin, "/metrics", "localhost").await;
            metric(&m, r#"ipgate_config_reloads_total{result="failure"}"#) == Some(1.0)
        })
        .await,
        "failed reload not counted"
    );
    // The old config is still in force: b.test served, c.test not.
    assert_eq!(plain_get(gw.plain, "/", "b.test").await.0, 200);
    assert_eq!(plain_get(gw.plain, "/", "c.test").await.0, 421);
    let (_, m) = plain_get(gw.admin, "/metrics", "localhost").await;
    assert_eq!(
        metric(&m, r#"ipgate_config_reloads_total{result="success"}"#),
        Some(1.0)
    );

    gw.signal("TERM");
    assert_eq!(gw.wait().await.code(), Some(0));
}
