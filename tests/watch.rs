//! Changed list and certificate files take effect without a signal.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn appending_to_a_list_file_blocks_within_5_seconds_without_a_signal() {
    let extra = "[lists.drop]\naction = \"block\"\nfiles = [\"lists/drop.txt\"]\n";
    // The list file must exist before the gateway starts: write it into the dir it will use.
    let upstream = Upstream::start().await;
    // Start without the list, create it in the gateway's dir, then reload once into it.
    let gw = spawn_gateway_with(upstream.addr, "", DEFAULT_SITES, "").await;
    let lists = gw.path().join("lists");
    std::fs::create_dir_all(&lists).unwrap();
    std::fs::write(lists.join("drop.txt"), "; test list\n192.0.2.0/24 ; SBL1\n").unwrap();
    // Switch the running gateway to a config with the list (one reload), then leave it alone.
    assert_eq!(gw.reload_with(extra).await, 200);
    assert_eq!(https_get_from(&gw, "127.0.0.30", "/").await.0, 200);

    // Append, as an operator or a list updater would.
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(lists.join("drop.txt"))
        .unwrap();
    writeln!(f, "127.0.0.30/32 ; appended").unwrap();
    drop(f);
    let start = std::time::Instant::now();
    assert!(
        eventually(Duration::from_secs(5), || async {
            refused("127.0.0.30", gw.plain).await
        })
        .await,
        "the appended address was not blocked within 5 s"
    );
    println!("blocked {:?} after the append", start.elapsed());
    // A broken line is refused: the previous list stays in force.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(lists.join("drop.txt"))
        .unwrap();
    writeln!(f, "not-an-address").unwrap();
    drop(f);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(refused("127.0.0.30", gw.plain).await);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_replaced_certificate_is_served_to_the_next_handshake() {
    let gw = spawn_gateway(DEFAULT_SITES, "").await;
    let tls = connect_tls(gw.tls, &gw.ca.ca_der, "a.test", &[b"http/1.1"]).await;
    assert_eq!(&tls.get_ref().1.peer_certificates().unwrap()[0], &gw.cert_a);
    drop(tls);

    // Renew: write the new pair beside, then rename over the old files.
    let staging = gw.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let renewed = gw.ca.issue(&staging, "a", &["a.test", "localhost"]);
    std::fs::rename(staging.join("a.key"), gw.path().join("a.key")).unwrap();
    std::fs::rename(staging.join("a.crt"), gw.path().join("a.crt")).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            let tls = connect_tls(gw.tls, &gw.ca.ca_der, "a.test", &[b"http/1.1"]).await;
            tls.get_ref().1.peer_certificates().unwrap()[0] == renewed
        })
        .await,
        "the renewed certificate was not served within 5 s"
    );
    gw.shutdown().await;
}
