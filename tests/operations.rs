//! Operations: reload under load, refused reloads, retention caps, anonymized logs.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

fn deny(ip: &str) -> String {
    format!("[lists.deny]\naction = \"block\"\nentries = [\"{ip}/32\"]\n")
}

/// A keep-alive HTTP/1.1 client on one connection, from 127.0.0.1.
async fn keepalive_client(
    addr: std::net::SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    while !stop.load(Ordering::Relaxed) {
        match sender.send_request(get("/", "a.test")).await {
            Ok(resp) if resp.status() == 200 => {
                use http_body_util::BodyExt;
                let _ = resp.into_body().collect().await;
                ok.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                failed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_under_200_keepalive_clients_fail_nothing() {
    // Generous limits: this test is about reloads, not rate limiting.
    let limits = "[rate_limit]\nrequests_per_second = 100000\nburst = 100000\n";
    let gw = spawn_gateway(DEFAULT_SITES, &format!("{limits}{}", deny("127.0.5.1"))).await;
    let path = gw.config_path();
    let base = std::fs::read_to_string(&path).unwrap();
    let token = gw.token();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..200 {
        clients.push(tokio::spawn(keepalive_client(
            gw.plain,
            stop.clone(),
            ok.clone(),
            failed.clone(),
        )));
    }
    // Every client is connected, and the clients have been served (about once each).
    assert!(
        eventually(Duration::from_secs(10), || async {
            ok.load(Ordering::Relaxed) >= 200
                && metric(&gw.metrics().await, "ipgate_connections_open") == Some(200.0)
        })
        .await,
        "the 200 clients did not all get going"
    );

    for i in 0..20 {
        // Alternate which of two addresses the block list holds.
        let (blocked, passing) = if i % 2 == 0 {
            ("127.0.5.2", "127.0.5.1")
        } else {
            ("127.0.5.1", "127.0.5.2")
        };
        let text = base.replace(&deny("127.0.5.1"), &deny(blocked));
        std::fs::write(&path, text).unwrap();
        let (status, v) = admin_call(gw.admin, "POST", "/v1/reload", None, Some(&token)).await;
        assert_eq!(status, 200, "{v}");
        // The very next request sees the new list.
        assert!(
            refused(blocked, gw.plain).await,
            "reload {i}: {blocked} not blocked"
        );
        let c = connect_from(passing, gw.plain).await;
        assert_eq!(get_on(c, "/", "a.test", &[]).await.0, 200, "reload {i}");
        // Requests are served between this reload and the next: one per client, roughly.
        let served = ok.load(Ordering::Relaxed);
        assert!(
            eventually(Duration::from_secs(5), || async {
                ok.load(Ordering::Relaxed) >= served + 200
            })
            .await,
            "reload {i}: the keep-alive clients stalled"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(
        ok.load(Ordering::Relaxed) > 2000,
        "{}",
        ok.load(Ordering::Relaxed)
    );
    let m = gw.metrics().await;
    // Twenty by the API; the file watcher may add a re-read of its own, never a failure.
    let success = metric(&m, r#"ipgate_config_reloads_total{result="success"}"#).unwrap_or(0.0);
    assert!(success >= 20.0, "{success}");
    assert_eq!(
        metric(&m, r#"ipgate_config_reloads_total{result="failure"}"#).unwrap_or(0.0),
        0.0
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn an_invalid_reload_answers_422_and_the_old_config_keeps_serving() {
    let gw = spawn_gateway(DEFAULT_SITES, &deny("127.0.5.3")).await;
    let path = gw.config_path();
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        good.replace("127.0.5.3/32", "127.0.5.300/32")
            .replace("[log]", "[log]\ncolour = \"blue\""),
    )
    .unwrap();
    let (status, v) = admin_call(gw.admin, "POST", "/v1/reload", None, Some(&gw.token())).await;
    assert_eq!(status, 422);
    assert_eq!(v["result"], "refused");
    let errors = v["errors"].as_array().unwrap();
    assert!(!errors.is_empty());
    assert!(
        errors[0]["text"].as_str().unwrap().contains("colour"),
        "{v}"
    );
    // The old list still blocks, the gateway still serves.
    assert!(refused("127.0.5.3", gw.plain).await);
    assert_eq!(plain_get(gw.plain, "/", "a.test").await.0, 200);
    let out = gw.cli(&["reload"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused"));
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, r#"ipgate_config_reloads_total{result="failure"}"#),
        Some(2.0)
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn temporary_entries_and_limiter_state_survive_a_reload() {
    let sites = "[[site]]\nhosts = [\"*\"]\nupstream = \"http://{upstream}\"\nrate_limit = { requests_per_second = 0.01, burst = 2 }\n";
    let gw = spawn_gateway(sites, "").await;
    let token = gw.token();
    let (s, _) = admin_call(
        gw.admin,
        "POST",
        "/v1/entries",
        Some(serde_json::json!({"target": "127.0.0.41", "action": "block", "ttl": "1h"})),
        Some(&token),
    )
    .await;
    assert_eq!(s, 201);
    for _ in 0..2 {
        let c = connect_from("127.0.0.42", gw.plain).await;
        assert_eq!(get_on(c, "/", "a.test", &[]).await.0, 200);
    }
    let c = connect_from("127.0.0.42", gw.plain).await;
    assert_eq!(get_on(c, "/", "a.test", &[]).await.0, 429);
    // An unrelated change, then reload.
    assert_eq!(gw.reload_with("[privacy]\nlog_ip = \"none\"\n").await, 200);
    // The ban is still there, and the emptied bucket is still empty.
    assert!(refused("127.0.0.41", gw.plain).await);
    let c = connect_from("127.0.0.42", gw.plain).await;
    assert_eq!(get_on(c, "/", "a.test", &[]).await.0, 429);
    gw.shutdown().await;
}

#[tokio::test]
async fn reloaded_limits_apply_to_the_next_connection() {
    let gw = spawn_gateway(DEFAULT_SITES, "").await;
    let mut req = b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\nX-Big: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 20 * 1024));
    req.extend_from_slice(b"\r\n\r\n");
    let reply = raw_exchange(gw.plain, &req, Duration::from_secs(3)).await;
    assert!(reply.starts_with(b"HTTP/1.1 200"));
    assert_eq!(
        gw.reload_with("[limits]\nmax_header_bytes = 8192\n").await,
        200
    );
    let reply = raw_exchange(gw.plain, &req, Duration::from_secs(3)).await;
    assert!(
        reply.starts_with(b"HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn max_retention_caps_a_longer_ttl() {
    let gw = spawn_gateway(DEFAULT_SITES, "[privacy]\nmax_retention = \"1h\"\n").await;
    let (status, e) = admin_call(
        gw.admin,
        "POST",
        "/v1/entries",
        Some(serde_json::json!({"target": "192.0.2.9", "action": "block", "ttl": "30d"})),
        Some(&gw.token()),
    )
    .await;
    assert_eq!(status, 201);
    let at = humantime::parse_rfc3339(e["expires_at"].as_str().unwrap()).unwrap();
    let left = at
        .duration_since(std::time::SystemTime::now())
        .unwrap()
        .as_secs();
    assert!((3500..=3600).contains(&left), "{left}s left");
    gw.shutdown().await;
}

#[tokio::test]
async fn anonymized_logging_leaves_no_full_client_address_in_any_output() {
    use tokio::io::AsyncWriteExt;
    // A jail that bans on the second request, so a ban gets logged too.
    let jail = "[[jail]]\nname = \"probe\"\npath = \"/probe\"\nstatus = [200]\nhits = 2\nwindow = \"1m\"\nban = \"1m\"\n";
    let sites =
        "[[site]]\nhosts = [\"*\"]\nupstream = \"http://{upstream}\"\njails = [\"probe\"]\n";
    let files = GatewayBuilder::new()
        .sites(sites)
        .extra(jail)
        .access_log(true)
        .files()
        .await;
    let gw = files.start("debug");
    // Two requests from 127.0.0.77 (the jail bans on the second)...
    for _ in 0..2 {
        let mut c = connect_from("127.0.0.77", gw.plain).await;
        let _ = c
            .write_all(b"GET /probe HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
            .await;
        let mut buf = Vec::new();
        read_until_closed(&mut c, &mut buf).await;
        assert!(
            buf.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf)
        );
    }
    // ...the ban lands (written asynchronously)...
    assert!(
        eventually(Duration::from_secs(3), || async {
            let (_, m) = plain_get(gw.admin, "/metrics", "localhost").await;
            metric(&m, r#"ipgate_bans_total{source="probe"}"#) == Some(1.0)
        })
        .await,
        "the jail did not ban"
    );
    // ...and a connection the ban closes.
    assert!(refused("127.0.0.77", gw.plain).await);
    // No metric carries an address.
    let (_, metrics) = plain_get(gw.admin, "/metrics", "localhost").await;
    assert!(metrics.contains("ipgate_bans_total"), "{metrics}");
    assert!(
        !metrics.contains("127.0.0."),
        "an address in the metrics:\n{metrics}"
    );
    let output = gw.output.clone();
    gw.signal("TERM");
    assert_eq!(gw.wait().await.code(), Some(0));
    let text = output.text();
    assert!(
        text.contains("\"client\":\"127.0.0.0\""),
        "no access log line:\n{text}"
    );
    assert!(text.contains("banned"), "no ban logged:\n{text}");
    assert!(
        !text.contains("127.0.0.77"),
        "the full address was written:\n{text}"
    );
}
