//! `ipgate upgrade`: the binary on disk takes over the listening sockets and the state store
//! while clients keep coming. No request fails, no ban is lost, requests in flight (a
//! WebSocket, a long download) finish on the old process, the state file is never open in
//! two processes, and a new process that cannot start leaves the old one serving.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// `POST /v1/upgrade`; the new pid.
async fn upgrade(admin: SocketAddr, token: &str) -> Result<u32, String> {
    let (status, body) = admin_call(admin, "POST", "/v1/upgrade", None, Some(token)).await;
    match (status, body["pid"].as_u64()) {
        (200, Some(pid)) => Ok(pid as u32),
        _ => Err(format!("{status} {body}")),
    }
}

async fn ban(admin: SocketAddr, token: &str, who: &str) {
    let body = serde_json::json!({"target": who, "action": "block", "ttl": "1h"});
    let (status, v) = admin_call(admin, "POST", "/v1/entries", Some(body), Some(token)).await;
    assert_eq!(status, 201, "{v}");
}

async fn exited(pid: u32, limit: Duration) -> bool {
    eventually(limit, || async move { !running(pid) }).await
}

fn token(files: &GatewayFiles) -> String {
    std::fs::read_to_string(files.token_file())
        .unwrap()
        .trim()
        .to_string()
}

/// The pause between one client's requests: 6 clients make a steady ~2,500 requests/s.
const PACE: Duration = Duration::from_millis(2);

/// Requests that went wrong, with what went wrong.
#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    failed: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failed.lock().unwrap().push(what);
    }

    /// Counts one request's outcome, then paces the client (steady, not flat out: the
    /// upgrades need the CPUs too). False when the client should take a new connection: a
    /// request the server refused unprocessed (above its GOAWAY's last stream, or never
    /// sent) is sent again there, as browsers do; anything else that is not a 200 fails.
    async fn count(
        &self,
        proto: &str,
        got: Result<http::Response<hyper::body::Incoming>, hyper::Error>,
    ) -> bool {
        match got {
            Ok(resp) if resp.status() == 200 => {
                let _ = resp.into_body().collect().await;
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(resp) => self.fail(format!("{proto} status {}", resp.status())),
            Err(e) if proto == "h2" && refused_unprocessed(&e) => return false,
            Err(e) => self.fail(format!("{proto} request: {e:?}")),
        }
        tokio::time::sleep(PACE).await;
        true
    }
}

/// HTTP/1.1 keep-alive GETs in a loop, a new connection whenever the gateway closes one
/// (a draining process answers `Connection: close`). A request that was sent and got no
/// 200 is a failure; so is a connection refused or reset.
async fn h1_client(addr: SocketAddr, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let tcp = match TcpStream::connect(addr).await {
            Ok(t) => t,
            Err(e) => {
                tally.fail(format!("h1 connect: {e}"));
                continue;
            }
        };
        let (mut sender, conn) =
            match hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await {
                Ok(s) => s,
                Err(e) => {
                    tally.fail(format!("h1 handshake: {e}"));
                    continue;
                }
            };
        tokio::spawn(conn);
        while !stop.load(Ordering::Relaxed) && sender.ready().await.is_ok() {
            let got = sender.send_request(get("/", "a.test")).await;
            if !tally.count("h1", got).await {
                break;
            }
        }
    }
}

/// HTTP/2 GETs in a loop on one connection over TLS, a new one after a GOAWAY.
async fn h2_client(
    files: &GatewayFiles,
    tls: SocketAddr,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    let cfg = Arc::new(client_config(&files.ca.ca_der, &[b"h2"]));
    while !stop.load(Ordering::Relaxed) {
        let tcp = match TcpStream::connect(tls).await {
            Ok(t) => t,
            Err(e) => {
                tally.fail(format!("h2 connect: {e}"));
                continue;
            }
        };
        let name = rustls::pki_types::ServerName::try_from("a.test").unwrap();
        let tls = match tokio_rustls::TlsConnector::from(cfg.clone())
            .connect(name, tcp)
            .await
        {
            Ok(t) => t,
            Err(e) => {
                tally.fail(format!("h2 tls: {e}"));
                continue;
            }
        };
        let handshake =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await;
        let (mut sender, conn) = match handshake {
            Ok(s) => s,
            Err(e) => {
                tally.fail(format!("h2 handshake: {e}"));
                continue;
            }
        };
        tokio::spawn(conn);
        while !stop.load(Ordering::Relaxed) && sender.ready().await.is_ok() {
            let got = sender.send_request(get("/", "a.test")).await;
            if !tally.count("h2", got).await {
                break;
            }
        }
    }
}

/// Whether the request was never sent, or the server answered its stream with a GOAWAY that did not include it (the
/// stream is above the GOAWAY's last stream id) or with REFUSED_STREAM: either way it was
/// not processed and may be sent again (RFC 9113, 6.8 and 8.7).
fn refused_unprocessed(e: &hyper::Error) -> bool {
    // Canceled: queued in the client, never sent, when the connection closed.
    let text = format!("{e:?}");
    e.is_canceled() || text.contains("GoAway(") || text.contains("REFUSED_STREAM")
}

/// Watches every process started with `config` and records the most that had `state.redb`
/// open at once, sampling until `stop`.
fn watch_state_file(
    config: PathBuf,
    file: PathBuf,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(usize, usize)> {
    std::thread::spawn(move || {
        let (mut most, mut samples) = (0, 0);
        let needle = config.to_string_lossy().into_owned();
        while !stop.load(Ordering::Relaxed) {
            let holders = holders_of(&needle, &file);
            most = most.max(holders);
            samples += usize::from(holders > 0);
            std::thread::sleep(Duration::from_millis(1));
        }
        (most, samples)
    })
}

/// The processes started with `config` that hold `file` open, not counting a copy of one
/// between fork and exec: a process forks its successor with every descriptor and the exec
/// closes them (close-on-exec), so for that moment the child shares the parent's open
/// file, having opened nothing. Such a child still has its parent's environment: it names
/// its parent in `IPGATE_UPGRADE_FROM` only once it runs the new program.
fn holders_of(config: &str, file: &Path) -> usize {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let holders: Vec<(u32, u32, Option<u32>)> = procs
        .flatten()
        .filter_map(|p| {
            Some((
                p.file_name().to_string_lossy().parse::<u32>().ok()?,
                p.path(),
            ))
        })
        .filter(|(_, path)| {
            std::fs::read(path.join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(config))
        })
        .filter(|(pid, _)| holds(*pid, file))
        .map(|(pid, path)| {
            let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
            let ppid = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().nth(1))
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            let env = std::fs::read(path.join("environ")).unwrap_or_default();
            let from = env
                .split(|&b| b == 0)
                .find_map(|v| v.strip_prefix(b"IPGATE_UPGRADE_FROM="))
                .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok());
            (pid, ppid, from)
        })
        .collect();
    let counted: Vec<u32> = holders
        .iter()
        .filter(|(_, ppid, from)| {
            let forked = holders.iter().any(|(p, _, _)| p == ppid) && *from != Some(*ppid);
            !forked
        })
        .map(|(pid, _, _)| *pid)
        .collect();
    // The processes were read one after the other: an old process that closed the file just
    // after it was read, and a new one that opened it just before, would look like both at
    // once. Those read first are read again: still open now, with the last one seen open
    // before now, is both at once.
    match counted.split_last() {
        Some((_, earlier)) if !earlier.is_empty() => {
            1 + earlier.iter().filter(|&&pid| holds(pid, file)).count()
        }
        _ => counted.len(),
    }
}

fn holds(pid: u32, file: &Path) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
        fds.flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == file))
    })
}

/// The main evidence: under steady HTTP/1.1 and HTTP/2 load, 20 upgrades in a row
/// fail no request; a ban made 100 ms before each upgrade holds after it; the state file is
/// never open in two processes; each old process exits once its requests are done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_upgrades_under_load_fail_no_request_and_lose_no_ban() {
    let (plain, tls) = (free_port(), free_port());
    // All the load comes from 127.0.0.1: no rate limit for it.
    let files = GatewayBuilder::new()
        .ports(plain, tls)
        .extra("[rate_limit]\nrequests_per_second = 100000\nburst = 100000\n")
        .files()
        .await;
    let gw = files.start("info");
    let token = token(&files);
    let mut pid = KillOnDrop(gw.pid());
    let plain: SocketAddr = ([127, 0, 0, 1], plain).into();
    let tls: SocketAddr = ([127, 0, 0, 1], tls).into();

    let stop = Arc::new(AtomicBool::new(false));
    let state_file = files.dir.path().join("state").join("state.redb");
    let watcher = watch_state_file(files.config.clone(), state_file, stop.clone());
    let tally = Arc::new(Tally::default());
    let files = Arc::new(files);
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(tokio::spawn(h1_client(plain, tally.clone(), stop.clone())));
        let files = files.clone();
        let (tally, stop) = (tally.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            h2_client(&files, tls, tally, stop).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    for i in 0..20 {
        let who = format!("127.0.3.{}", i + 1);
        ban(gw.admin, &token, &who).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = tally.ok.load(Ordering::Relaxed);
        let new = upgrade(gw.admin, &token)
            .await
            .unwrap_or_else(|e| panic!("upgrade {i} failed: {e}\n{}", gw.output.text()));
        assert_ne!(new, pid.0);
        let old = std::mem::replace(&mut pid, KillOnDrop(new));
        assert!(
            exited(old.0, Duration::from_secs(10)).await,
            "the old process {} did not exit\n{}",
            old.0,
            gw.output.text()
        );
        std::mem::forget(old);
        assert!(
            refused(&who, plain).await,
            "the ban on {who} was lost by upgrade {i}"
        );
        assert!(
            eventually(Duration::from_secs(5), || async {
                tally.ok.load(Ordering::Relaxed) > before + 50
            })
            .await,
            "no load got through after upgrade {i}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = tokio::time::timeout(Duration::from_secs(5), c).await;
    }
    let (most, samples) = watcher.join().unwrap();
    let failed = tally.failed.lock().unwrap().clone();
    let ok = tally.ok.load(Ordering::Relaxed);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed, first: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(20)]
    );
    assert!(ok > 2000, "too little load to show anything: {ok} requests");
    assert!(
        samples > 0,
        "the state file was never seen open: the watcher is broken"
    );
    assert_eq!(
        most, 1,
        "the state file was open in {most} processes at once"
    );
    for i in 0..20 {
        assert!(refused(&format!("127.0.3.{}", i + 1), plain).await);
    }
    let metrics = plain_get_admin(gw.admin).await;
    assert_eq!(
        metric(&metrics, "ipgate_upgrades_total{result=\"ok\"}"),
        Some(1.0),
        "{metrics}"
    );
    drop(pid);
}

/// The watcher above can fail: two processes that hold one file are counted as two.
#[test]
fn the_state_file_watcher_counts_two_holders_as_two() {
    let dir = tempfile::tempdir().unwrap();
    let (config, file) = (
        dir.path().join("ipgate.toml"),
        dir.path().join("state.redb"),
    );
    std::fs::write(&file, b"x").unwrap();
    let holder = || {
        std::process::Command::new("sh")
            .arg("-c")
            .arg("sleep 5")
            .arg(&config)
            .stdin(std::fs::File::open(&file).unwrap())
            .spawn()
            .unwrap()
    };
    let mut one = holder();
    let needle = config.to_string_lossy().into_owned();
    let seen = |n: usize| {
        (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            holders_of(&needle, &file) == n
        })
    };
    assert!(seen(1));
    let mut two = holder();
    assert!(seen(2));
    for c in [&mut one, &mut two] {
        let _ = c.kill();
        let _ = c.wait();
    }
}

async fn plain_get_admin(admin: SocketAddr) -> String {
    plain_get(admin, "/metrics", &admin.to_string()).await.1
}

/// A WebSocket and a 20 MiB download that started before an upgrade go on, on the old
/// process, and finish whole; the old process exits when they are done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_and_a_long_download_finish_on_the_old_process() {
    let files = GatewayBuilder::new().files().await;
    let gw = files.start("info");
    let token = token(&files);
    let old = gw.pid();
    let _old = KillOnDrop(old);

    let tcp = TcpStream::connect(gw.plain).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{}/ws", gw.plain), tcp)
        .await
        .unwrap();
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("before"));

    let size: usize = 20 << 20;
    let tcp = TcpStream::connect(gw.plain).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(get(&format!("/big?n={size}"), "a.test"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = Vec::with_capacity(size);
    while got.len() < 1 << 20 {
        let frame = body.frame().await.unwrap().unwrap();
        got.extend_from_slice(frame.data_ref().unwrap());
    }

    let new = upgrade(gw.admin, &token).await.unwrap();
    let _new = KillOnDrop(new);
    // The new process serves new connections; the old one still serves these two.
    assert_eq!(plain_get(gw.plain, "/", "a.test").await.0, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        running(old),
        "the old process left before its requests were done"
    );
    ws.send(Message::text("after")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("after"));
    while let Some(frame) = body.frame().await {
        got.extend_from_slice(frame.unwrap().data_ref().unwrap());
    }
    assert_eq!(got.len(), size);
    assert!(got == pattern(0, size), "the download came back damaged");
    ws.close(None).await.unwrap();
    drop(ws);
    assert!(
        exited(old, Duration::from_secs(10)).await,
        "{}",
        gw.output.text()
    );
}

/// A new binary that cannot start (here: the config on disk is broken since) leaves the
/// old process serving, and `ipgate upgrade` fails naming why; once the config is mended,
/// the upgrade goes through (the store was given back, not left closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_that_fails_its_config_leaves_the_old_one_serving() {
    let files = GatewayBuilder::new().files().await;
    let gw = files.start("info");
    let token = token(&files);
    let old = gw.pid();
    ban(gw.admin, &token, "127.0.3.99").await;
    let good = std::fs::read_to_string(&files.config).unwrap();
    std::fs::write(&files.config, format!("{good}\n[nosuch_table]\nx = 1\n")).unwrap();

    let out = files.cli(gw.admin, None, &["upgrade"]).output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "the upgrade said it succeeded: {said}"
    );
    assert!(
        said.contains("nosuch_table"),
        "the failure does not say why: {said}"
    );
    assert!(running(old));
    assert_eq!(plain_get(gw.plain, "/", "a.test").await.0, 200);
    assert!(refused("127.0.3.99", gw.plain).await);
    let metrics = plain_get_admin(gw.admin).await;
    assert_eq!(
        metric(&metrics, "ipgate_upgrades_total{result=\"failed\"}"),
        Some(1.0),
        "{metrics}"
    );
    // The store is the old process's again: a change is written and acknowledged.
    ban(gw.admin, &token, "127.0.3.98").await;

    std::fs::write(&files.config, good).unwrap();
    let out = files.cli(gw.admin, None, &["upgrade"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    let new: u32 = said
        .split("pid ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {said:?}"));
    let _new = KillOnDrop(new);
    assert!(exited(old, Duration::from_secs(10)).await);
    assert!(refused("127.0.3.99", gw.plain).await);
    assert!(refused("127.0.3.98", gw.plain).await);
}
