//! Changed list and certificate files take effect without a signal.

mod common;

use std::time::Duration;

use common::*;

/// A gateway that has switched (by one reload) to a config with the block list
/// `lists/drop.txt` in its dir, and `client` not blocked yet. The reload into the list is on
/// purpose: it also checks that the watcher picks up a set of files changed by a reload.
async fn gateway_with_drop_list(client: &str) -> (TestGateway, std::path::PathBuf) {
    let extra = "[lists.drop]\naction = \"block\"\nfiles = [\"lists/drop.txt\"]\n";
    // Start without the list, create it in the gateway's dir, then reload once into it.
    let gw = GatewayBuilder::new().spawn().await;
    let lists = gw.path().join("lists");
    std::fs::create_dir_all(&lists).unwrap();
    std::fs::write(lists.join("drop.txt"), "; test list\n192.0.2.0/24 ; SBL1\n").unwrap();
    assert_eq!(gw.reload_with(extra).await, 200);
    assert_eq!(https_get_from(&gw, client, "/").await.0, 200);
    (gw, lists)
}

fn append_line(path: &std::path::Path, line: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    writeln!(f, "{line}").unwrap();
}

/// The append comes right after the reload that named the list, before the watcher has
/// watched its directory (it resyncs every 2 s): no event can tell, so the watcher compares the
/// file with what the reload read (regression: this was caught only by an endless loop of
/// re-reads, set off by the re-read's own opens).
#[tokio::test]
async fn appending_to_a_list_file_blocks_within_5_seconds_without_a_signal() {
    let (gw, lists) = gateway_with_drop_list("127.0.0.30").await;

    // Append, as an operator or a list updater would.
    append_line(&lists.join("drop.txt"), "127.0.0.30/32 ; appended");
    let start = std::time::Instant::now();
    assert!(
        eventually(Duration::from_secs(5), || async {
            refused("127.0.0.30", gw.plain).await
        })
        .await,
        "the appended address was not blocked within 5 s"
    );
    println!("blocked {:?} after the append", start.elapsed());
    // A broken line is refused and the previous list stays in force. Wait until the watcher
    // has really read the broken file (a failed re-read is counted): a dead watcher would
    // otherwise pass this step by never reading it.
    let failed = r#"ipgate_config_reloads_total{result="failure"}"#;
    let before = metric(&gw.metrics().await, failed).unwrap_or(0.0);
    append_line(&lists.join("drop.txt"), "not-an-address");
    assert!(
        eventually(Duration::from_secs(5), || async {
            metric(&gw.metrics().await, failed).unwrap_or(0.0) > before
        })
        .await,
        "the list with a broken line was not re-read within 5 s"
    );
    assert!(
        refused("127.0.0.30", gw.plain).await,
        "the previous list was dropped"
    );
    // The watcher lives on: the repaired file applies, with a new address in it.
    std::fs::write(
        lists.join("drop.txt"),
        "192.0.2.0/24\n127.0.0.30/32\n127.0.0.32/32 ; after the repair\n",
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            refused("127.0.0.32", gw.plain).await
        })
        .await,
        "the repaired list was not applied within 5 s: the watcher stopped after the broken one"
    );
    // Emptied by a truncating open with no write (`: > drop.txt`): notify reports an open and
    // a close, which are dropped, and the truncation itself, which must not be.
    std::fs::File::create(lists.join("drop.txt")).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            served_from("127.0.0.32", gw.plain).await
        })
        .await,
        "the emptied list was not applied within 5 s"
    );
    gw.shutdown().await;
}

/// Regression: notify reports opening a file, and the re-read opens every list, so one change
/// (or anyone reading the list) set off a re-read about every second, forever.
#[tokio::test]
async fn reading_a_list_file_is_no_change_and_an_idle_gateway_reads_nothing_again() {
    let (gw, lists) = gateway_with_drop_list("127.0.0.33").await;
    let reloads = r#"ipgate_config_reloads_total{result="success"}"#;
    let count = || async { metric(&gw.metrics().await, reloads).unwrap_or(0.0) };
    // One change: re-read once.
    let before = count().await;
    append_line(&lists.join("drop.txt"), "127.0.0.33/32");
    assert!(
        eventually(Duration::from_secs(5), || async { count().await > before }).await,
        "the change was not re-read"
    );
    // Then quiet: nothing more within 3 s (the debounce is 0.3 s), though others read it.
    let settled = count().await;
    for _ in 0..6 {
        std::fs::read(lists.join("drop.txt")).unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(count().await, settled, "re-read without a change");
    assert!(refused("127.0.0.33", gw.plain).await);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_busy_file_beside_a_list_does_not_hold_off_the_lists_change() {
    let (gw, lists) = gateway_with_drop_list("127.0.0.31").await;
    // A log written every 50 ms in the list's directory: its events come faster than the
    // 300 ms debounce, so they must not count as changes to wait out.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, log) = (stop.clone(), lists.join("busy.log"));
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            std::fs::write(&log, "").unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && std::time::Instant::now() < deadline
            {
                append_line(&log, "a log line");
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    append_line(&lists.join("drop.txt"), "127.0.0.31/32 ; appended");
    let blocked = eventually(Duration::from_secs(5), || async {
        refused("127.0.0.31", gw.plain).await
    })
    .await;
    let writer_was_running = !writer.is_finished();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    assert!(writer_was_running, "the busy writer had stopped early");
    assert!(blocked, "the appended address was not blocked within 5 s while a file beside the list kept changing");
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
