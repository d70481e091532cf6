//! Lists by ASN and country against small MaxMind-format databases (`tests/data/geo`, written
//! by `make.py` there with Python's mmdb-writer, checked here with Debian's `mmdblookup`):
//! block, allow (`allow_only`, per site and route), challenge, `lookup`, a damaged file or one
//! of the wrong kind refused at reload with the old one serving, and a swap under load without
//! a failed request.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

fn data(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/geo")
        .join(file)
}

/// Debian's reader of the format, as an independent check of the fixtures.
fn mmdblookup(file: &str, ip: &str, path: &[&str]) -> String {
    let out = std::process::Command::new("mmdblookup")
        .arg("--file")
        .arg(data(file))
        .args(["--ip", ip])
        .args(path)
        .output()
        .expect("mmdblookup is not installed: run scripts/test, which installs mmdb-bin");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const GEO: &str = r#"
[geo]
asn_database = "asn.mmdb"
country_database = "country.mmdb"

[challenge]
difficulty = 8

[rate_limit]
requests_per_second = 10000
burst = 10000

[lists.cloud]
action = "block"
asn = [64500]

[lists.crawlers]
action = "challenge"
asn = [64502]

[lists.nl]
action = "allow"
country = ["nl"]

[[site]]
hosts = ["a.test"]
upstream = "http://{upstream}"
[[site.route]]
path = "/admin"
allow_only = ["nl"]

[[site]]
name = "shop"
hosts = ["b.test"]
upstream = "http://{upstream}"
allow_only = ["nl"]
"#;

async fn gateway() -> TestGateway {
    GatewayBuilder::new()
        .sites(GEO)
        .copy("asn.mmdb", &data("asn.mmdb"))
        .copy("country.mmdb", &data("country.mmdb"))
        .spawn()
        .await
}

async fn status(gw: &TestGateway, local: &str, path: &str, host: &str) -> Option<u16> {
    let tcp = try_connect_from(local, gw.plain).await.ok()?;
    let headers = [("accept", "text/html")];
    let get = get_on(tcp, path, host, &headers);
    tokio::time::timeout(Duration::from_secs(3), get)
        .await
        .ok()
        .map(|r| r.0)
}

#[tokio::test]
async fn the_fixtures_say_what_the_tests_expect() {
    assert!(mmdblookup("asn.mmdb", "127.0.10.5", &["autonomous_system_number"]).contains("64500"));
    assert!(mmdblookup("asn.mmdb", "127.0.13.1", &["autonomous_system_number"]).contains("64502"));
    assert!(mmdblookup("country.mmdb", "127.0.11.9", &["country", "iso_code"]).contains("\"NL\""));
    assert!(
        mmdblookup("asn-next.mmdb", "127.0.15.3", &["autonomous_system_number"]).contains("64500")
    );
}

#[tokio::test]
async fn lists_by_asn_and_country_block_allow_and_challenge() {
    let gw = gateway().await;
    // Blocked by ASN: closed at accept, before any byte.
    assert!(refused("127.0.10.5", gw.plain).await);
    assert_eq!(status(&gw, "127.0.14.1", "/", "a.test").await, Some(200));
    // allow_only by country, on a route and on a whole site.
    assert_eq!(
        status(&gw, "127.0.11.9", "/admin", "a.test").await,
        Some(200)
    );
    assert_eq!(
        status(&gw, "127.0.12.9", "/admin", "a.test").await,
        Some(403)
    );
    assert_eq!(status(&gw, "127.0.11.9", "/", "b.test").await, Some(200));
    assert_eq!(status(&gw, "127.0.14.1", "/", "b.test").await, Some(403));
    // Challenged by ASN.
    let tcp = connect_from("127.0.13.1", gw.plain).await;
    let (code, page) = get_on(tcp, "/", "a.test", &[("accept", "text/html")]).await;
    assert_eq!(code, 403);
    assert!(page.contains("ipgate-puzzle"), "{page}");
    // lookup names the ASN, the country and the rule.
    let out = gw.cli(&["lookup", "127.0.10.5", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["asn"], 64500, "{v}");
    assert_eq!(v["decision"], "block");
    assert_eq!(v["geo_rules"][0]["list"], "cloud");
    assert_eq!(v["geo_rules"][0]["matched"], "asn 64500");
    let out = gw.cli(&["lookup", "127.0.11.9", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["country"], "NL", "{v}");
    // Allowed by country through allow_only only: not exempt from a ban.
    assert_eq!(v["decision"], "pass", "{v}");
    assert!(gw.cli(&["ban", "127.0.11.9"]).await.status.success());
    assert!(refused("127.0.11.9", gw.plain).await);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_damaged_database_is_refused_and_a_new_one_is_swapped_in_under_load() {
    let gw = gateway().await;
    let dir = gw.path();
    // Steady requests from an address no rule holds.
    let plain = gw.plain;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let tcp = connect_from("127.0.14.2", plain).await;
                match get_on(tcp, "/", "a.test", &[]).await.0 {
                    200 => ok += 1,
                    _ => failed += 1,
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (ok, failed)
        })
    };
    // Truncated, or whole but with its search tree damaged: check and reload refuse it;
    // the old database keeps serving.
    let whole = std::fs::read(data("asn-next.mmdb")).unwrap();
    let mut damaged = whole.clone();
    damaged[..240].fill(0xff);
    // And a sound database of the wrong kind (country data where ASNs are asked for).
    let country = std::fs::read(data("country.mmdb")).unwrap();
    let token = gw.token();
    for bad in [&whole[..whole.len() / 2], &damaged[..], &country[..]] {
        std::fs::write(dir.join("asn.mmdb"), bad).unwrap();
        let (code, body) = admin_call(gw.admin, "POST", "/v1/reload", None, Some(&token)).await;
        assert_eq!(code, 422, "{body}");
        assert!(body.to_string().contains("geo.asn_database"), "{body}");
        assert!(
            refused("127.0.10.5", gw.plain).await,
            "the old database serves"
        );
    }
    // The next version, written whole and renamed into place: the watcher swaps it in.
    let next = dir.join("asn.mmdb.new");
    std::fs::write(&next, &whole).unwrap();
    std::fs::rename(&next, dir.join("asn.mmdb")).unwrap();
    let swapped = eventually(Duration::from_secs(5), || async {
        refused("127.0.15.3", gw.plain).await
    })
    .await;
    assert!(swapped, "the new database's cloud range is not blocked");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    assert!(ok > 10, "{ok} requests");
    assert_eq!(failed, 0, "requests failed during the swap");
    gw.shutdown().await;
}
