//! Disk faults lose no ban: an entry is enforced the moment it is made, even when
//! the disk refuses it (503, counted), and is written as soon as the disk takes it again,
//! without being made again; an unban the disk refuses changes nothing; a state file that
//! cannot be opened is moved aside and the gateway starts.
//!
//! The full disk is a real one: a small tmpfs mounted under `state_dir` (the tests run as
//! root, as CI does) and filled during the test.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// A tmpfs mounted at a path for as long as this lives.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .expect("mount (the fault tests run as root)");
        assert!(status.success(), "cannot mount a tmpfs at {}", at.display());
        Tmpfs(at.to_path_buf())
    }

    /// Writes a filler file until the filesystem is full.
    fn fill(&self) {
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).and_then(|_| f.flush()).is_ok() {}
        let _ = f.sync_all();
    }

    fn free(&self) {
        std::fs::remove_file(self.0.join("filler")).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

fn ban_body(target: &str) -> serde_json::Value {
    serde_json::json!({ "target": target, "action": "block", "ttl": "1h", "reason": "disk" })
}

#[tokio::test]
async fn a_ban_the_disk_refuses_is_enforced_and_written_once_space_returns() {
    let files = GatewayBuilder::new().files().await;
    let disk = Tmpfs::mount(&files.dir.path().join("state"), "512k");
    let gw = files.start("info");
    let token = std::fs::read_to_string(files.token_file()).unwrap();
    let token = token.trim();

    // Make the store grow past what the disk will have, then fill the disk.
    for i in 0..50 {
        let (status, v) = admin_call(
            gw.admin,
            "POST",
            "/v1/entries",
            Some(ban_body(&format!("198.51.100.{i}"))),
            Some(token),
        )
        .await;
        assert_eq!(status, 201, "{v}");
    }
    disk.fill();

    // Refused by the disk: 503, yet enforced at once.
    let mut refused_by_disk = Vec::new();
    let mut accepted = Vec::new();
    for i in 1..=20 {
        let target = format!("127.0.9.{i}");
        let (status, v) = admin_call(
            gw.admin,
            "POST",
            "/v1/entries",
            Some(ban_body(&target)),
            Some(token),
        )
        .await;
        assert!(status == 201 || status == 503, "{status} {v}");
        if status == 503 {
            assert!(v["error"].as_str().unwrap().contains("not durable"), "{v}");
            refused_by_disk.push(target);
        } else {
            accepted.push(target);
        }
    }
    assert!(
        !refused_by_disk.is_empty(),
        "the full disk refused nothing: the test did not fill it"
    );
    for target in accepted.iter().chain(&refused_by_disk) {
        assert!(refused(target, gw.plain).await, "{target}: not enforced");
    }
    let (_, m) = plain_get(gw.admin, "/metrics", "localhost").await;
    assert!(metric(&m, "ipgate_store_errors_total").unwrap_or(0.0) >= 1.0);
    assert_eq!(
        metric(&m, "ipgate_store_pending_writes"),
        Some(refused_by_disk.len() as f64)
    );
    // An unban the disk refuses changes nothing: the entry stays, enforced. Asked of an
    // entry on disk when there is one (its delete needs new pages); a delete may still fit
    // in the pages the store has free: then it is simply done, and must stay done.
    let first = accepted.first().unwrap_or(&refused_by_disk[0]).clone();
    let mut unbanned = None;
    let (status, _) = admin_call(
        gw.admin,
        "DELETE",
        &format!("/v1/entries?target={first}&action=block"),
        None,
        Some(token),
    )
    .await;
    match status {
        503 => assert!(
            refused(&first, gw.plain).await,
            "a refused unban was applied"
        ),
        204 => {
            assert!(
                served_from(&first, gw.plain).await,
                "an unban was not applied"
            );
            accepted.retain(|t| *t != first);
            refused_by_disk.retain(|t| *t != first);
            unbanned = Some(first.clone());
        }
        other => panic!("unban answered {other}"),
    }

    // Space returns: the entries are written without being made again.
    disk.free();
    assert!(
        eventually(Duration::from_secs(10), || async {
            let (_, m) = plain_get(gw.admin, "/metrics", "localhost").await;
            metric(&m, "ipgate_store_pending_writes") == Some(0.0)
        })
        .await,
        "the refused entries were never written"
    );
    // Durable now: kill -9, restart, still banned.
    gw.signal("KILL");
    let _ = gw.wait().await;
    let gw = files.start("info");
    for target in accepted.iter().chain(&refused_by_disk) {
        assert!(refused(target, gw.plain).await, "{target}: lost at restart");
    }
    if let Some(u) = &unbanned {
        assert!(served_from(u, gw.plain).await, "{u}: the unban was undone");
    }
    assert!(served_from("127.0.9.200", gw.plain).await);
    gw.signal("TERM");
    assert_eq!(gw.wait().await.code(), Some(0));
    drop(disk);
}

#[tokio::test]
async fn a_corrupt_state_file_is_moved_aside_and_the_sites_stay_up() {
    let files = GatewayBuilder::new().files().await;
    let state = files.dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(
        state.join("state.redb"),
        b"this is not a redb file, it is garbage\n",
    )
    .unwrap();
    let gw = files.start("info");
    assert!(
        served_from("127.0.0.1", gw.plain).await,
        "the sites are down"
    );
    let aside: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("state.redb.bad-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(
        std::fs::read(state.join(&aside[0])).unwrap(),
        b"this is not a redb file, it is garbage\n",
        "the bad file was not kept as it was"
    );
    // One error naming the file and what to do.
    assert!(
        eventually(Duration::from_secs(3), || async {
            let log = gw.output.text();
            log.contains(&aside[0]) && log.contains("move it back")
        })
        .await,
        "{}",
        gw.output.text()
    );
    // The new store works.
    let token = std::fs::read_to_string(files.token_file()).unwrap();
    let (status, v) = admin_call(
        gw.admin,
        "POST",
        "/v1/entries",
        Some(ban_body("127.0.0.9")),
        Some(token.trim()),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    gw.signal("TERM");
    assert_eq!(gw.wait().await.code(), Some(0));
}
