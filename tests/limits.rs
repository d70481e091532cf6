//! Self-protection: slow and half-open clients, oversized heads, the connection cap.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn half_open_connections_do_not_block_a_normal_request() {
    let gw = spawn_gateway(DEFAULT_SITES, "").await;
    let open = "ipgate_connections_open";
    let mut idle = Vec::new();
    // From 150 addresses, two each: one client may hold only
    // `limits.max_connections_per_client` (tests/connections.rs).
    for i in 0..300 {
        let from = format!("127.0.3.{}", i / 2 + 1);
        if i % 2 == 0 {
            // A request head that never ends (slowloris).
            let mut tcp = connect_from(&from, gw.plain).await;
            tcp.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Slow: 1\r\n")
                .await
                .unwrap();
            idle.push(tcp);
        } else {
            // A TLS connection that never sends its ClientHello.
            idle.push(connect_from(&from, gw.tls).await);
        }
    }
    // All 300 are accepted and held by the gateway, not waiting in the kernel's backlog.
    let held = eventually(Duration::from_secs(5), || async {
        metric(&gw.metrics().await, open) == Some(300.0)
    })
    .await;
    let now = metric(&gw.metrics().await, open);
    assert!(
        held,
        "the gateway did not take up the 300 hanging connections: {open} = {now:?}"
    );
    // Both listeners answer at once while they hang...
    let start = Instant::now();
    let (status, _) = tokio::time::timeout(Duration::from_secs(2), https_get(&gw, "/"))
        .await
        .expect("no HTTPS answer within 2 s while 300 connections hang");
    assert_eq!(status, 200);
    let (status, _) =
        tokio::time::timeout(Duration::from_secs(2), plain_get(gw.plain, "/", "a.test"))
            .await
            .expect("no plain answer within 2 s while 300 connections hang");
    assert_eq!(status, 200);
    println!("answered in {:?}", start.elapsed());
    // ...and none of them was dropped to make room (the default timeouts are 10 s for the
    // TLS handshake and 15 s for a request head: far off).
    assert_eq!(gw.metric_settled(open, 300.0).await, Some(300.0));
    for tcp in &idle {
        let mut b = [0u8; 1];
        assert!(
            matches!(tcp.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a hanging connection was closed or answered"
        );
    }
    drop(idle);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_100_kib_header_gets_431() {
    let gw = spawn_gateway(DEFAULT_SITES, "").await;
    let mut req = b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Big: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 100 * 1024));
    req.extend_from_slice(b"\r\n\r\n");
    let reply = raw_exchange(gw.plain, &req, Duration::from_secs(3)).await;
    let text = String::from_utf8_lossy(&reply);
    assert!(text.starts_with("HTTP/1.1 431"), "got {text:?}");
    // A normal request still passes.
    assert_eq!(plain_get(gw.plain, "/", "a.test").await.0, 200);
    gw.shutdown().await;
}

/// Reads until the server closes `tcp`; panics unless that happens between 3/4 of `timeout`
/// and `timeout` + 1 s after `since` (an instant close is no timeout, a late one is none
/// either).
async fn assert_closed_near(tcp: &mut TcpStream, since: Instant, timeout: Duration, what: &str) {
    let limit = timeout + Duration::from_secs(1);
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit.saturating_sub(since.elapsed()), tcp.read(&mut buf)).await
        {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => continue,
            Err(_) => panic!("{what}: still open {limit:?} after it started"),
        }
    }
    let took = since.elapsed();
    assert!(
        took >= timeout * 3 / 4,
        "{what}: closed after {took:?}, before the {timeout:?} timeout"
    );
    println!("{what}: closed after {took:?}");
}

#[tokio::test]
async fn slow_heads_idle_keepalives_and_stalled_handshakes_are_closed() {
    let timeout = Duration::from_millis(400);
    let extra = r#"
[limits]
header_read_timeout = "400ms"
tls_handshake_timeout = "400ms"
"#;
    let gw = spawn_gateway(DEFAULT_SITES, extra).await;
    // Slow head; a line dripped in halfway does not restart the clock.
    let since = Instant::now();
    let mut slow = TcpStream::connect(gw.plain).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n")
        .await
        .unwrap();
    tokio::time::sleep(timeout / 2).await;
    let _ = slow.write_all(b"X-Drip: 1\r\n").await;
    assert_closed_near(&mut slow, since, timeout, "slow head").await;
    // Idle keep-alive after a complete exchange: the clock starts at the end of the response.
    let mut ka = TcpStream::connect(gw.plain).await.unwrap();
    ka.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = ka.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    assert_closed_near(&mut ka, Instant::now(), timeout, "idle keep-alive").await;
    // Stalled TLS handshake.
    let since = Instant::now();
    let mut stalled = TcpStream::connect(gw.tls).await.unwrap();
    assert_closed_near(&mut stalled, since, timeout, "stalled handshake").await;
    assert_eq!(
        gw.metric_settled("ipgate_tls_handshake_errors_total", 1.0)
            .await,
        Some(1.0)
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_at_accept() {
    let extra = "[limits]\nmax_connections = 3\n";
    let gw = spawn_gateway(DEFAULT_SITES, extra).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut tcp = TcpStream::connect(gw.plain).await.unwrap();
        // A complete request proves the connection is being served (holds a slot).
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(tcp);
    }
    let mut buf = vec![0u8; 64];
    // Refused connections are reset: that may fail the connect itself.
    match TcpStream::connect(gw.plain).await {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        Ok(mut extra_conn) => {
            let _ = extra_conn
                .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
                .await;
            let n = tokio::time::timeout(Duration::from_secs(3), extra_conn.read(&mut buf))
                .await
                .expect("over-cap connection left open")
                .unwrap_or(0);
            assert_eq!(n, 0, "over-cap connection was served");
        }
    }
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"ipgate_connections_rejected_total{reason="max_connections"}"#
        ),
        Some(1.0)
    );
    // Freeing a slot lets the next client in.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let Ok(mut tcp) = TcpStream::connect(gw.plain).await else {
            assert!(Instant::now() < deadline, "slot never freed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = tcp
            .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await;
        let n = tcp.read(&mut buf).await.unwrap_or(0);
        if n > 0 {
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw.shutdown().await;
}
