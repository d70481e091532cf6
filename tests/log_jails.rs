//! Log jails: real-format log lines written to files the gateway follows, through
//! rotation and truncation; the ready jails in config/jails/ against their daemons' lines.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// An sshd jail on `logs/auth.log` (and `logs/later.log`, which does not exist at start).
const SSHD: &str = r#"
[[jail]]
name = "sshd"
log = { files = ["logs/auth.log", "logs/later.log"], match = 'sshd\[\d+\]: Failed password for .* from <ADDR> port \d+', ignore = 'for invalid user ' }
hits = 3
window = "10m"
ban = "1h"
"#;

fn failed(ip: &str) -> String {
    format!("Dec  1 10:00:00 web1 sshd[812]: Failed password for root from {ip} port 51234 ssh2\n")
}

fn append(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

async fn lines_read(gw: &TestGateway, jail: &str) -> f64 {
    let m = gw.metrics().await;
    metric(&m, &format!("ipgate_log_lines_total{{jail=\"{jail}\"}}")).unwrap_or(0.0)
}

/// Waits until the jail has read `n` lines in all; panics after 10 s.
async fn wait_lines(gw: &TestGateway, jail: &str, n: f64) {
    let ok = eventually(Duration::from_secs(10), || async {
        lines_read(gw, jail).await == n
    })
    .await;
    assert!(ok, "read {} lines, not {n}", lines_read(gw, jail).await);
}

async fn lookup(gw: &TestGateway, ip: &str) -> serde_json::Value {
    lookup_at(gw.admin, gw.dir.path(), ip).await
}

/// `GET /v1/ips/IP` on the admin listener at `admin`, with the token in `dir`.
async fn lookup_at(admin: std::net::SocketAddr, dir: &Path, ip: &str) -> serde_json::Value {
    let token = std::fs::read_to_string(dir.join("admin.token")).unwrap();
    admin_call(
        admin,
        "GET",
        &format!("/v1/ips/{ip}"),
        None,
        Some(token.trim()),
    )
    .await
    .1
}

fn banned_by(lookup: &serde_json::Value, jail: &str) -> bool {
    lookup["entries"].as_array().is_some_and(|e| {
        e.iter()
            .any(|e| e["source"] == jail && e["action"] == "block")
    })
}

async fn log_gateway(jails: &str) -> (TestGateway, PathBuf) {
    let gw = GatewayBuilder::new()
        .file("logs/auth.log", &failed("127.0.0.50").repeat(5))
        .extra(jails)
        .spawn()
        .await;
    let log = gw.dir.path().join("logs/auth.log");
    (gw, log)
}

#[tokio::test]
async fn a_log_jail_bans_after_hits_lines_and_starts_at_the_end_of_its_files() {
    let (gw, log) = log_gateway(SSHD).await;
    // Give the follower its first look (it takes the file from its end).
    tokio::time::sleep(Duration::from_millis(600)).await;
    append(
        &log,
        "Dec  1 10:00:01 web1 sshd[812]: Accepted password for ops from 127.0.0.51 port 2 ssh2\n",
    );
    append(&log, &failed("127.0.0.51").repeat(2));
    wait_lines(&gw, "sshd", 3.0).await;
    assert!(served_from("127.0.0.51", gw.plain).await);
    append(&log, &failed("127.0.0.51"));
    assert!(
        eventually(Duration::from_secs(3), || async {
            refused("127.0.0.51", gw.plain).await
        })
        .await
    );
    let l = lookup(&gw, "127.0.0.51").await;
    assert!(banned_by(&l, "sshd"), "{l}");
    // The five lines there before start were not counted.
    let l = lookup(&gw, "127.0.0.50").await;
    assert!(!banned_by(&l, "sshd"), "{l}");
    assert!(served_from("127.0.0.50", gw.plain).await);
}

#[tokio::test]
async fn rename_rotation_and_copytruncate_lose_no_line_and_count_none_twice() {
    let (gw, log) = log_gateway(SSHD).await;
    tokio::time::sleep(Duration::from_millis(600)).await;

    // The daemon keeps its file open: one line before the rename, one after (into the
    // rotated file), then logrotate's new file.
    let mut daemon = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    daemon.write_all(failed("127.0.0.52").as_bytes()).unwrap();
    wait_lines(&gw, "sshd", 1.0).await;
    // All within one look of the follower: it finds a new file while the rotated one still
    // has an unread line.
    std::fs::rename(&log, log.with_extension("log.1")).unwrap();
    daemon.write_all(failed("127.0.0.53").as_bytes()).unwrap();
    drop(daemon);
    append(&log, &failed("127.0.0.52"));
    append(&log, &failed("127.0.0.53"));
    wait_lines(&gw, "sshd", 4.0).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(lines_read(&gw, "sshd").await, 4.0, "a line counted twice");
    // Two each so far: one more bans.
    assert!(served_from("127.0.0.52", gw.plain).await);
    append(&log, &failed("127.0.0.52"));
    assert!(
        eventually(Duration::from_secs(3), || async {
            refused("127.0.0.52", gw.plain).await
        })
        .await
    );

    // copytruncate: the file is copied, then emptied in place, and written again (less than
    // before, then more than before).
    wait_lines(&gw, "sshd", 5.0).await;
    std::fs::copy(&log, log.with_extension("log.2")).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)
        .unwrap()
        .set_len(0)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    append(&log, &failed("127.0.0.53"));
    wait_lines(&gw, "sshd", 6.0).await;
    assert!(
        eventually(Duration::from_secs(3), || async {
            refused("127.0.0.53", gw.plain).await
        })
        .await
    );
    // Truncated and at once written past the old length: told apart by its first bytes.
    std::fs::write(&log, failed("127.0.0.54").repeat(8)).unwrap();
    wait_lines(&gw, "sshd", 14.0).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(lines_read(&gw, "sshd").await, 14.0);
}

#[tokio::test]
async fn a_file_there_at_start_rewritten_longer_at_once_is_read_from_its_start() {
    // Followed from its end (five lines there before start); then truncated and written past
    // its old length between two looks: told apart by its first bytes.
    let (gw, log) = log_gateway(SSHD).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    std::fs::write(&log, failed("127.0.0.61").repeat(7)).unwrap();
    wait_lines(&gw, "sshd", 7.0).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(lines_read(&gw, "sshd").await, 7.0);
}

#[tokio::test]
async fn a_file_created_after_start_is_read_from_its_start() {
    let (gw, _) = log_gateway(SSHD).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let later = gw.dir.path().join("logs/later.log");
    append(&later, &failed("127.0.0.55").repeat(3));
    assert!(
        eventually(Duration::from_secs(3), || async {
            refused("127.0.0.55", gw.plain).await
        })
        .await
    );
}

#[tokio::test]
async fn ipv6_clients_count_per_prefix_and_allow_listed_ones_never() {
    let lists = "[lists.office]\naction = \"allow\"\nentries = [\"127.0.0.56\"]\n";
    let (gw, log) = log_gateway(&format!("{SSHD}\n{lists}")).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Three addresses of one /64: one client.
    append(&log, &failed("2001:db8:7:1::5"));
    append(&log, &failed("2001:db8:7:1::6"));
    append(&log, &failed("2001:db8:7:1:ffff::1"));
    append(&log, &failed("127.0.0.56").repeat(5));
    wait_lines(&gw, "sshd", 8.0).await;
    assert!(
        eventually(Duration::from_secs(3), || async {
            banned_by(&lookup(&gw, "2001:db8:7:1::77").await, "sshd")
        })
        .await
    );
    let l = lookup(&gw, "2001:db8:7:1::77").await;
    assert_eq!(l["entries"][0]["target"], "2001:db8:7:1::/64", "{l}");
    let l = lookup(&gw, "127.0.0.56").await;
    assert!(!banned_by(&l, "sshd"), "{l}");
    assert_eq!(l["jail_counters"].as_array().map_or(0, Vec::len), 0, "{l}");
    assert!(served_from("127.0.0.56", gw.plain).await);
}

#[tokio::test]
async fn forget_erases_a_log_jails_counters_and_offenses() {
    let (gw, log) = log_gateway(SSHD).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    append(&log, &failed("127.0.0.57").repeat(3));
    append(&log, &failed("127.0.0.58").repeat(2));
    wait_lines(&gw, "sshd", 5.0).await;
    assert!(
        eventually(Duration::from_secs(3), || async {
            banned_by(&lookup(&gw, "127.0.0.57").await, "sshd")
        })
        .await
    );
    let token = std::fs::read_to_string(gw.dir.path().join("admin.token")).unwrap();
    let token = token.trim();
    let before = lookup(&gw, "127.0.0.58").await;
    assert_eq!(before["jail_counters"][0]["jail"], "sshd", "{before}");
    for ip in ["127.0.0.57", "127.0.0.58"] {
        let (status, erased) = admin_call(
            gw.admin,
            "DELETE",
            &format!("/v1/ips/{ip}"),
            None,
            Some(token),
        )
        .await;
        assert_eq!(status, 200, "{erased}");
        let after = lookup(&gw, ip).await;
        assert_eq!(
            after["entries"].as_array().map_or(0, Vec::len),
            0,
            "{after}"
        );
        assert_eq!(
            after["jail_counters"].as_array().map_or(0, Vec::len),
            0,
            "{after}"
        );
        assert_eq!(
            after["offenses"].as_array().map_or(0, Vec::len),
            0,
            "{after}"
        );
    }
    let (_, erased) = admin_call(gw.admin, "GET", "/v1/ips/127.0.0.57", None, Some(token)).await;
    assert_eq!(erased["decision"], "pass");
}

#[tokio::test]
async fn a_dry_run_log_jail_counts_and_bans_nobody() {
    let (gw, log) =
        log_gateway(&SSHD.replace("ban = \"1h\"", "ban = \"1h\"\ndry_run = true")).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    append(&log, &failed("127.0.0.60").repeat(3));
    wait_lines(&gw, "sshd", 3.0).await;
    assert_eq!(
        gw.metric_settled(r#"ipgate_would_block_total{rule="sshd"}"#, 1.0)
            .await,
        Some(1.0)
    );
    assert!(served_from("127.0.0.60", gw.plain).await);
    assert!(!banned_by(&lookup(&gw, "127.0.0.60").await, "sshd"));
}

#[tokio::test]
async fn a_huge_line_and_a_burst_of_100000_lines_do_not_stall_the_proxy() {
    let (gw, log) = log_gateway(SSHD).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    // One 1 MiB line (skipped whole), then a counted one.
    append(&log, &format!("{}\n", "x".repeat(1 << 20)));
    append(&log, &failed("127.0.0.59"));
    wait_lines(&gw, "sshd", 1.0).await;

    let mut burst = String::with_capacity(100_000 * 90);
    for i in 0..100_000u32 {
        if i % 1000 == 999 {
            burst.push_str(&failed(&format!(
                "10.9.{}.{}",
                (i / 1000) % 250,
                1 + i % 250
            )));
        } else {
            burst.push_str(&format!("Dec  1 10:00:00 web1 CRON[{i}]: pam_unix(cron:session): session closed for user root\n"));
        }
    }
    let start = Instant::now();
    append(&log, &burst);
    // The proxy answers while the lines are read.
    let mut slowest = Duration::ZERO;
    while lines_read(&gw, "sshd").await < 100_001.0 {
        let t = Instant::now();
        let (status, _) = plain_get(gw.plain, "/", "a.test").await;
        assert_eq!(status, 200);
        slowest = slowest.max(t.elapsed());
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the burst was not read in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "100,000 lines read in {:?}; slowest request meanwhile {:?}",
        start.elapsed(),
        slowest
    );
    assert!(
        slowest < Duration::from_secs(1),
        "a request took {slowest:?}"
    );
}

#[tokio::test]
async fn log_jail_patterns_are_checked() {
    let check = |jail: &str| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipgate.toml");
        std::fs::write(
            &path,
            format!(
                "[[listener]]\naddr = \"127.0.0.1:0\"\n[[site]]\nhosts = [\"*\"]\nupstream = \"http://127.0.0.1:9\"\n{jail}"
            ),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ipgate"))
            .args(["check", "-c"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let jail = |log: &str| {
        format!("[[jail]]\nname = \"j\"\nlog = {log}\nhits = 1\nwindow = \"1m\"\nban = \"1m\"\n")
    };
    let (ok, _) = check(&jail(
        r#"{ files = ["a.log"], match = 'from <ADDR> port' }"#,
    ));
    assert!(ok);
    let (ok, err) = check(&jail(r#"{ files = ["a.log"], match = 'Failed password' }"#));
    assert!(
        !ok && err.contains("jail[0].log.match") && err.contains("<ADDR>"),
        "{err}"
    );
    let (ok, err) = check(&jail(
        r#"{ files = ["a.log"], match = 'from <ADDR> (port' }"#,
    ));
    assert!(!ok && err.contains("jail[0].log.match"), "{err}");
    let (ok, err) = check(&jail(
        r#"{ files = ["a.log"], match = '<ADDR>', ignore = '[' }"#,
    ));
    assert!(!ok && err.contains("jail[0].log.ignore"), "{err}");
    let (ok, err) = check(&format!(
        "{}path = \"/login\"\n",
        jail(r#"{ files = ["a.log"], match = '<ADDR>' }"#)
    ));
    assert!(!ok && err.contains("jail[0].path"), "{err}");
}

/// A ready jail from config/jails/, following `file` instead of the daemon's journal.
fn ready_jail(name: &str, file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("config/jails/{name}.toml"));
    let text = std::fs::read_to_string(path).unwrap();
    let source = text
        .lines()
        .find(|l| l.starts_with("journal = ") || l.starts_with("files = "))
        .unwrap();
    text.replace(source, &format!("files = [\"{file}\"]"))
}

/// Lines that must count and lines that must not, for each ready log jail. The lines that
/// must not count carry a forged copy of a failure line for `{ip}` in every field a client
/// controls (user names, HELO, Message-ID, file names, headers), written as the daemon would
/// write them; `{ip}` is never counted, while each jail bans a client after its `hits` real
/// failures.
#[tokio::test]
async fn the_ready_log_jails_match_their_daemons_lines_and_cannot_be_aimed() {
    let cases: [(&str, Vec<String>, Vec<String>); 5] = [
        (
            "sshd",
            vec![
                "Dec  1 10:00:00 web1 sshd[812]: Failed password for root from {ip} port 51234 ssh2".into(),
                "2026-12-01T10:00:00.123456+01:00 web1 sshd-session[812]: Failed publickey for git from {ip} port 40022 ssh2: RSA SHA256:AAAA".into(),
                "2026-12-01T10:00:00.123456+01:00 web1 sshd-session[812]: Invalid user admin from {ip} port 51234".into(),
                "Dec 01 10:00:00 web1 sshd-session[9]: Failed password for a b c from {ip} port 2 ssh2".into(),
            ],
            vec![
                "Dec  1 10:00:00 web1 sshd[812]: Accepted password for ops from {ip} port 2 ssh2".into(),
                // Counted once, as the "Invalid user" line before it.
                "Dec  1 10:00:00 web1 sshd[812]: Failed password for invalid user admin from {ip} port 51234 ssh2".into(),
                // A user name naming another address: the last one of the line counts.
                "Dec  1 10:00:00 web1 sshd[812]: Invalid user x from {ip} port 22 from 192.0.2.99 port 5".into(),
                "2026-12-01T10:00:00.1+01:00 web1 sshd-session[9]: Failed password for x from {ip} port 22 ssh2 from 198.51.100.1 port 5 ssh2".into(),
                // Another program quoting a failure line in its message.
                "Dec  1 10:00:00 web1 CRON[77]: (root) CMD (echo Failed password for root from {ip} port 22 ssh2)".into(),
                "Dec  1 10:00:00 web1 sudo[5]: Failed password for root from {ip} port 22 ssh2".into(),
                // Not a syslog line at all.
                "Failed password for root from {ip} port 22 ssh2".into(),
            ],
        ),
        (
            "postfix-sasl",
            vec![
                "Dec  1 10:00:00 mx postfix/submission/smtpd[2211]: warning: unknown[{ip}]: SASL LOGIN authentication failed: UGFzc3dvcmQ6".into(),
                "2026-12-01T10:00:00.5+01:00 mx postfix/smtpd[2211]: warning: mail.example.com[{ip}]: SASL PLAIN authentication failed: (reason unavailable), sasl_username=admin".into(),
                "Dec  1 10:00:00 mx postfix/smtps/smtpd[2211]: warning: unknown[{ip}]: SASL CRAM-MD5 authentication failed: Invalid authentication mechanism: 'CRAM-MD5', sasl_username=(unavailable)".into(),
            ],
            vec![
                "Dec  1 10:00:00 mx postfix/smtpd[2211]: connect from unknown[{ip}]".into(),
                "Dec  1 10:00:00 mx postfix/smtpd[2211]: NOQUEUE: reject: RCPT from unknown[{ip}]: 554 5.7.1 Relay access denied".into(),
                // The HELO name, the Message-ID and the SASL user name are the client's.
                "Dec  1 10:00:00 mx postfix/smtpd[2211]: NOQUEUE: reject: RCPT from unknown[198.51.100.9]: 554 5.7.1 <a@b.c>: Relay access denied; from=<a@b.c> to=<c@d.e> proto=ESMTP helo=<postfix/smtpd[1]: warning: x[{ip}]: SASL LOGIN authentication failed: UGFzc3dvcmQ6>".into(),
                "Dec  1 10:00:00 mx postfix/cleanup[7]: 4XyZ1: message-id=<postfix/smtpd[1]: warning: x[{ip}]: SASL LOGIN authentication failed: UGFzc3dvcmQ6>".into(),
                "Dec  1 10:00:00 mx postfix/smtpd[2211]: warning: unknown[198.51.100.9]: SASL LOGIN authentication failed: (reason unavailable), sasl_username=x warning: x[{ip}]: SASL LOGIN authentication failed: UGFzc3dvcmQ6".into(),
                // The SASL server's fault, not the client's.
                "Dec  1 10:00:00 mx postfix/smtpd[2211]: warning: unknown[{ip}]: SASL LOGIN authentication failed: Connection lost to authentication server, sasl_username=(unavailable)".into(),
            ],
        ),
        (
            "dovecot",
            vec![
                "Dec  1 10:00:00 mx dovecot: imap-login: Disconnected: Connection closed (auth failed, 3 attempts in 12 secs): user=<info@example.nl>, method=PLAIN, rip={ip}, lip=192.0.2.10, TLS, session=<abc>".into(),
                "Dec  1 10:00:00 mx dovecot: pop3-login: Aborted login (auth failed, 1 attempts in 2 secs): user=<x>, method=PLAIN, rip={ip}, lip=192.0.2.10, session=<def>".into(),
                "2026-12-01T10:00:00.5+01:00 mx dovecot: imap-login: Login aborted: Connection closed (auth failed, 3 attempts in 16 secs) (auth_failed): user=<test>, method=PLAIN, rip={ip}, lip=192.0.2.10, TLS, session=<9ZHq02g3J8S60fan>".into(),
            ],
            vec![
                "Dec  1 10:00:00 mx dovecot: imap-login: Login: user=<info@example.nl>, method=PLAIN, rip={ip}, lip=192.0.2.10, mpid=1, TLS, session=<x>".into(),
                "Dec  1 10:00:00 mx dovecot: imap-login: Disconnected: Connection closed (no auth attempts in 0 secs): user=<>, rip={ip}, lip=192.0.2.10, session=<y>".into(),
                // A Message-ID delivered by LMTP, and user names holding forged fields.
                "Dec  1 10:00:00 mx dovecot: lmtp(info@example.nl)<1234><abc>: msgid=<dovecot: imap-login: Disconnected: Connection closed (auth failed, 1 attempts in 1 secs): user=<x>, method=PLAIN, rip={ip}, lip=1.1.1.1, session=<a>>: saved mail to INBOX".into(),
                "Dec  1 10:00:00 mx dovecot: imap-login: Disconnected: Connection closed (auth failed, 1 attempts in 2 secs): user=<a>, method=PLAIN, rip={ip}, lip=1.1.1.1, session=<x>>, method=PLAIN, rip=198.51.100.9, lip=192.0.2.10, TLS, session=<def>".into(),
                "Dec  1 10:00:00 mx dovecot: imap-login: Disconnected: Too many invalid commands (tried to use disallowed plaintext auth): user=<z (auth failed, 1 attempts in 1 secs): user=<y>, method=PLAIN, rip={ip}, lip=1.1.1.1, x>, rip=198.51.100.9, lip=192.0.2.10, session=<q>".into(),
            ],
        ),
        (
            "pure-ftpd",
            vec![
                "Dec  1 10:00:00 web1 pure-ftpd: (?@{ip}) [WARNING] Authentication failed for user [admin]".into(),
            ],
            vec![
                "Dec  1 10:00:00 web1 pure-ftpd: (?@{ip}) [INFO] New connection from {ip}".into(),
                "Dec  1 10:00:00 web1 pure-ftpd: (web1@{ip}) [INFO] web1 is now logged in".into(),
                // A customer's file name, and a user name.
                "Dec  1 10:00:00 web1 pure-ftpd: (web1@198.51.100.9) [NOTICE] /var/www/(?@{ip}) [WARNING] Authentication failed for user [x]  uploaded  (12 bytes, 1.00KB/sec)".into(),
                "Dec  1 10:00:00 web1 pure-ftpd: (?@198.51.100.9) [WARNING] Authentication failed for user [x] (?@{ip}) [WARNING] Authentication failed for user [y]".into(),
            ],
        ),
        (
            "roundcube-log",
            vec![
                "[01-Dec-2026 14:03:11 +0100]: <k3v1s0> Failed login for admin from 127.0.0.1 (X-Real-IP: {ip},X-Forwarded-For: {ip}) in session k3v1s0ab (error: 0)".into(),
                "[01-Dec-2026 14:03:11 +0100]: <k3v1s0> Failed login for a b from 127.0.0.1 (X-Real-IP: {ip}) in session k3v1s0ab (error: -1)".into(),
            ],
            vec![
                "[01-Dec-2026 14:03:11 +0100]: <k3v1s0> Successful login for admin (ID: 1) from 127.0.0.1 (X-Real-IP: {ip}) in session k3v1s0".into(),
                // A user name naming another client: the last one, which Roundcube writes, counts.
                "[01-Dec-2026 14:03:11 +0100]: <k3v1s0> Failed login for x from 127.0.0.1 (X-Real-IP: {ip}) in session y (error: 0) from 127.0.0.1 (X-Real-IP: 198.51.100.9,X-Forwarded-For: 198.51.100.9) in session k3v1s0ab (error: 0)".into(),
                "[01-Dec-2026 14:03:11 +0100]: <k3v1s0> Failed login for x from {ip} in session y from 127.0.0.1 (X-Real-IP: 198.51.100.9) in session k3v1s0ab (error: 0)".into(),
                // Roundcube reached directly, not through ipgate: X-Real-IP is anyone's.
                "[01-Dec-2026 14:03:11 +0100]: <k3v1s0> Failed login for admin from 198.51.100.9 (X-Real-IP: {ip}) in session k3v1s0 (error: 0)".into(),
            ],
        ),
    ];
    let mut extra = String::new();
    for (file, _, _) in &cases {
        extra.push_str(&ready_jail(file, &format!("logs/{file}.log")));
        extra.push('\n');
    }
    let gw = GatewayBuilder::new()
        .file("logs/.keep", "")
        .extra(&extra)
        .spawn()
        .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    for (n, (jail, counted, not)) in cases.iter().enumerate() {
        let hits: usize = {
            let text = ready_jail(jail, "x");
            let line = text.lines().find(|l| l.starts_with("hits")).unwrap();
            line.split('=').nth(1).unwrap().trim().parse().unwrap()
        };
        let log = gw.dir.path().join(format!("logs/{jail}.log"));
        // Lines that must not count, many times over, naming one address: no ban, no counter.
        let aimed = format!("127.0.1.{}", 10 + n);
        for line in not {
            append(
                &log,
                &format!("{}\n", line.replace("{ip}", &aimed)).repeat(hits + 1),
            );
        }
        // Each counted form once from its own address, then `hits` from one address.
        let loud = format!("127.0.2.{}", 10 + n);
        for (k, line) in counted.iter().enumerate() {
            let ip = format!("2001:db8:{n}:{k}::9");
            append(&log, &format!("{}\n", line.replace("{ip}", &ip)));
        }
        for k in 0..hits {
            let line = &counted[k % counted.len()];
            append(&log, &format!("{}\n", line.replace("{ip}", &loud)));
        }
        let ok = eventually(Duration::from_secs(5), || async {
            banned_by(&lookup(&gw, &loud).await, jail)
        })
        .await;
        assert!(ok, "{jail}: {loud} not banned after {hits} lines");
        let l = lookup(&gw, &aimed).await;
        assert!(!banned_by(&l, jail), "{jail}: a forged line banned: {l}");
        assert_eq!(
            l["jail_counters"].as_array().map_or(0, Vec::len),
            0,
            "{jail}: a line that must not count did: {l}"
        );
        for k in 0..counted.len() {
            let l = lookup(&gw, &format!("2001:db8:{n}:{k}::9")).await;
            assert_eq!(
                l["jail_counters"][0]["jail"], *jail,
                "{jail}: form {k} not counted: {l}"
            );
        }
    }
}

/// The journal's export format for one entry of `unit` with `identifier`, written now.
fn journal_entry(unit: &str, identifier: &str, message: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros();
    format!(
        "__REALTIME_TIMESTAMP={now}\n__MONOTONIC_TIMESTAMP={now}\n\
         _BOOT_ID=0123456789abcdef0123456789abcdef\n_HOSTNAME=web1\n_PID=812\n\
         _COMM={identifier}\n_SYSTEMD_UNIT={unit}\nSYSLOG_IDENTIFIER={identifier}\n\
         MESSAGE={message}\n\n"
    )
}

/// Writes entries into `file` with systemd-journal-remote (Debian package
/// systemd-journal-remote), as journald would have.
fn write_journal(file: &Path, entries: &str) {
    let tool = [
        "/lib/systemd/systemd-journal-remote",
        "/usr/lib/systemd/systemd-journal-remote",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect(
        "systemd-journal-remote is missing: apt install systemd-journal-remote (scripts/test does)",
    );
    let mut child = std::process::Command::new(tool)
        .arg(format!("--output={}", file.display()))
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(entries.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
}

/// The ready sshd jail on a real journal folder, written by systemd-journal-remote: it
/// follows new entries of its unit (not another unit's, whatever their identifier says),
/// through a rotation, and after a restart resumes where it stopped, so entries written
/// while it was down still count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_jail_follows_the_journal_through_rotation_and_resumes_after_a_restart() {
    let ready = ready_jail("sshd", "x");
    let jail = ready.replace(
        r#"files = ["x"]"#,
        r#"journal = { units = ["ssh.service"], directory = "journal" }"#,
    );
    let files = GatewayBuilder::new()
        .file("journal/.keep", "")
        .extra(&jail)
        .files()
        .await;
    let dir = files.dir.path().join("journal");
    let active = dir.join("system.journal");
    let failed = |ip: &str| {
        journal_entry(
            "ssh.service",
            "sshd-session",
            &format!("Failed password for root from {ip} port 22 ssh2"),
        )
    };
    // One entry before the gateway starts: it follows from the end, so this never counts.
    write_journal(&active, &failed("127.0.0.80").repeat(4));
    let gw = files.start("info");
    let home = files.dir.path();
    let banned = |ip: &'static str| {
        let admin = gw.admin;
        async move { banned_by(&lookup_at(admin, home, ip).await, "sshd") }
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Five failures of ssh.service from .77; the same message from another unit names .78.
    let mut entries = failed("127.0.0.77").repeat(5);
    entries.push_str(
        &journal_entry(
            "cron.service",
            "sshd-session",
            "Failed password for root from 127.0.0.78 port 22 ssh2",
        )
        .repeat(6),
    );
    write_journal(&active, &entries);
    assert!(eventually(Duration::from_secs(5), || banned("127.0.0.77")).await);
    assert!(!banned("127.0.0.78").await, "another unit's entry counted");
    // Journald's rotation: the active file archived, a new one started.
    std::fs::rename(
        &active,
        dir.join("system@0000000000000001-0000000000000001.journal~"),
    )
    .unwrap();
    write_journal(&active, &failed("127.0.0.79").repeat(5));
    assert!(eventually(Duration::from_secs(5), || banned("127.0.0.79")).await);
    // Down, three failures of .81 are written; after the restart two more ban it: the three
    // were read from the saved cursor. (.80's four entries from before the first start were
    // skipped and stay so.)
    gw.signal("TERM");
    gw.wait().await;
    write_journal(&active, &failed("127.0.0.81").repeat(3));
    let gw = files.start("info");
    let lookup2 = |ip: &'static str| lookup_at(gw.admin, home, ip);
    let counted = eventually(Duration::from_secs(5), || async {
        lookup2("127.0.0.81").await["jail_counters"][0]["hits"] == 3
    })
    .await;
    assert!(counted, "{}", lookup2("127.0.0.81").await);
    write_journal(&active, &failed("127.0.0.81").repeat(2));
    assert!(
        eventually(Duration::from_secs(5), || async {
            banned_by(&lookup2("127.0.0.81").await, "sshd")
        })
        .await
    );
    assert!(!banned_by(&lookup2("127.0.0.80").await, "sshd"));
    gw.signal("TERM");
    gw.wait().await;
}

/// `ipgate jail test` reads a log as the jail would, bans nobody, and says what it found,
/// line by line of its report.
#[test]
fn jail_test_reports_what_a_log_jail_would_count() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ipgate.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nstate_dir = \"state\"\n[[listener]]\naddr = \"127.0.0.1:0\"\ntls = false\n\
             [[site]]\nhosts = [\"*\"]\nupstream = \"http://127.0.0.1:9\"\n{}",
            ready_jail("sshd", "auth.log")
        ),
    )
    .unwrap();
    let log = [
        "Dec  1 10:00:00 web1 sshd[812]: Failed password for root from 192.0.2.7 port 1 ssh2",
        "2026-12-01T10:00:01.5+01:00 web1 sshd-session[813]: Failed password for root from 192.0.2.7 port 2 ssh2",
        "Dec  1 10:00:02 web1 sshd[814]: Invalid user x from 2001:db8::5 port 3",
        "Dec  1 10:00:02 web1 sshd[814]: Failed password for invalid user x from 2001:db8::5 port 3 ssh2",
        "Dec  1 10:00:03 web1 CRON[9]: Failed password for root from 192.0.2.99 port 4 ssh2",
        "Dec  1 10:00:04 web1 sshd[815]: Accepted password for ops from 192.0.2.8 port 5 ssh2",
        "garbage without a prefix",
        r#"{"MESSAGE":"Failed password for root from 192.0.2.7 port 6 ssh2","SYSLOG_IDENTIFIER":"sshd-session","__CURSOR":"c"}"#,
    ]
    .join("\n");
    std::fs::write(dir.path().join("auth.log"), &log).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ipgate"))
        .args(["jail", "test", "sshd", "-c"])
        .arg(&config)
        .arg(dir.path().join("auth.log"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let want = [
        "jail sshd",
        "lines read: 8",
        "lines matched: 4",
        "lines ignored: 1",
        "lines of other tags: 1",
        "lines not through a proxy: 0",
        "lines not parsed: 1",
        "addresses it would count: 2 (a ban at 5 within 10m)",
        "  192.0.2.7 3",
        "  2001:db8::5 1",
        "first lines not parsed:",
        "  7: garbage without a prefix",
    ];
    assert_eq!(text.lines().collect::<Vec<_>>(), want, "{text}");
    // Standard input, and a jail that reads responses.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ipgate"))
        .args(["jail", "test", "sshd", "-", "-c"])
        .arg(&config)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(log.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("lines matched: 4"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ipgate"))
        .args(["jail", "test", "nosuch", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no jail named 'nosuch'"));
}
