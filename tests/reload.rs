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
    let (_dir, path) = binary_config(upstream.addr, &site("\"a.test\""), "");
    let (mut child, addrs) = start_binary(&path);
    assert_eq!(plain_get(addrs.plain, "/", "a.test").await.0, 200);
    assert_eq!(plain_get(addrs.plain, "/", "b.test").await.0, 421);

    std::fs::write(
        &path,
        base_config(&site("\"a.test\", \"b.test\""), "", upstream.addr),
    )
    .unwrap();
    signal(&child, "HUP");
    assert!(
        eventually(Duration::from_secs(5), || async {
            plain_get(addrs.plain, "/", "b.test").await.0 == 200
        })
        .await,
        "reloaded site never served"
    );

    // Broken: a bad duration and a certificate that does not exist.
    let broken = base_config(&site("\"c.test\""), "", upstream.addr)
        .replace("b.crt", "gone.crt")
        .replace("[gateway]", "[gateway]\ndefault_ban = \"never\"");
    std::fs::write(&path, broken).unwrap();
    signal(&child, "HUP");
    assert!(
        eventually(Duration::from_secs(5), || async {
            let (_, m) = plain_get(addrs.admin, "/metrics", "admin").await;
            metric(&m, r#"ipgate_config_reloads_total{result="failure"}"#) == Some(1.0)
        })
        .await,
        "failed reload not counted"
    );
    // The old config is still in force: b.test served, c.test not.
    assert_eq!(plain_get(addrs.plain, "/", "b.test").await.0, 200);
    assert_eq!(plain_get(addrs.plain, "/", "c.test").await.0, 421);
    let (_, m) = plain_get(addrs.admin, "/metrics", "admin").await;
    assert_eq!(
        metric(&m, r#"ipgate_config_reloads_total{result="success"}"#),
        Some(1.0)
    );

    signal(&child, "TERM");
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(exit.code(), Some(0));
}
