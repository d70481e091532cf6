//! The data path end to end: real gateway, real upstream, real TLS.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

#[tokio::test]
async fn https_get_reaches_upstream_with_forwarding_headers() {
    let gw = spawn_gateway(DEFAULT_SITES, "").await;
    let req = Request::builder()
        .uri("/hello?x=1")
        .header("host", "a.test:8443")
        .header("x-forwarded-for", "198.51.100.9")
        .header("x-real-ip", "6.6.6.6")
        .header("x-forwarded-proto", "gopher")
        .body(http_body_util::Empty::new().map_err(|e| match e {}).boxed())
        .unwrap();
    let (parts, body) = https_request(&gw, req).await;
    assert_eq!(parts.status, 200);
    let echo = json(std::str::from_utf8(&body).unwrap());
    assert_eq!(echo["uri"], "/hello?x=1");
    assert_eq!(echo["version"], "HTTP/1.1");
    // An untrusted client's X-Forwarded-For, X-Real-IP and proto are replaced.
    assert_eq!(echoed(&echo, "x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(echoed(&echo, "x-real-ip"), Some("127.0.0.1"));
    assert_eq!(echoed(&echo, "x-forwarded-proto"), Some("https"));
    assert_eq!(echoed(&echo, "x-forwarded-host"), Some("a.test:8443"));
    assert_eq!(echoed(&echo, "host"), Some("a.test:8443"));
    assert_eq!(echo["headers"]["x-real-ip"].as_array().unwrap().len(), 1);

    // Plain listener: proto http.
    let (status, body) = plain_get(gw.plain, "/", "a.test").await;
    assert_eq!(status, 200);
    assert_eq!(echoed(&json(&body), "x-forwarded-proto"), Some("http"));
    gw.shutdown().await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_both_ways() {
    let gw = spawn_gateway(DEFAULT_SITES, "").await;
    let req = Request::builder()
        .uri("/echo")
        .header("host", "a.test")
        .header("connection", "keep-alive, x-client-hop")
        .header("x-client-hop", "secret")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("proxy-connection", "keep-alive")
        .header("x-end-to-end", "kept")
        .body(http_body_util::Empty::new().map_err(|e| match e {}).boxed())
        .unwrap();
    let (_, body) = https_request(&gw, req).await;
    let echo = json(std::str::from_utf8(&body).unwrap());
    for name in [
        "x-client-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert_eq!(echoed(&echo, name), None, "{name} reached the upstream");
    }
    assert_eq!(echoed(&echo, "x-end-to-end"), Some("kept"));

    let (parts, _) = https_request(&gw, get("/hop", "a.test")).await;
    assert_eq!(parts.headers.get("x-up-end").unwrap(), "kept");
    assert!(parts.headers.get("x-up-hop").is_none());
    assert!(parts.headers.get("keep-alive").is_none());
    gw.shutdown().await;
}

#[tokio::test]
async fn a_20_mib_response_streams_whole() {
    let gw = spawn_gateway(DEFAULT_SITES, "").await;
    let n: usize = 20 << 20;
    let (parts, body) = https_request(&gw, get(&format!("/big?n={n}"), "a.test")).await;
    assert_eq!(parts.status, 200);
    assert_eq!(body.len(), n);
    assert!(body[..] == pattern(0, n)[..], "content differs");
    gw.shutdown().await;
}

/// Refused connections are reset (zero linger, inherited from the listening socket); an
/// admitted one must close normally, or the end of a response still queued in the send
/// buffer when the gateway closes would be dropped by the reset.
#[tokio::test]
async fn a_closing_connection_delivers_its_whole_response_to_a_slow_reader() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = spawn_gateway(DEFAULT_SITES, "").await;
    let n: usize = 32 << 20;
    let mut tcp = tokio::net::TcpStream::connect(gw.plain).await.unwrap();
    let req = format!("GET /big?n={n} HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    // Let the gateway fill the socket buffers and reach the end of the body (and its close)
    // with megabytes still queued.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut out = Vec::with_capacity(n + 1024);
    let read = tokio::time::timeout(Duration::from_secs(20), tcp.read_to_end(&mut out))
        .await
        .expect("the response did not end within 20 s");
    let head_end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no response head")
        + 4;
    assert!(out.starts_with(b"HTTP/1.1 200"));
    assert!(
        read.is_ok(),
        "the connection was reset after {} of {n} body bytes: {read:?}",
        out.len() - head_end
    );
    assert_eq!(out.len() - head_end, n);
    assert!(out[head_end..] == pattern(0, n)[..], "content differs");
    gw.shutdown().await;
}

#[tokio::test]
async fn an_8_mib_request_body_streams_whole() {
    let gw = spawn_gateway(DEFAULT_SITES, "").await;
    let n: usize = 8 << 20;
    let data = pattern(0, n);
    let sum = data.iter().fold(0u32, |s, b| s.wrapping_add(*b as u32));
    // Sent in chunks without a length: chunked transfer, the gateway cannot know the size.
    let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = data
        .chunks(100_000)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let body = BodyExt::boxed(StreamBody::new(futures_util::stream::iter(chunks)));
    let req = Request::builder()
        .method("POST")
        .uri("/upload")
        .header("host", "a.test")
        .body(body)
        .unwrap();
    let (parts, body) = https_request(&gw, req).await;
    assert_eq!(parts.status, 200);
    assert_eq!(std::str::from_utf8(&body).unwrap(), format!("{n} {sum}"));
    gw.shutdown().await;
}

#[tokio::test]
async fn response_bytes_flow_before_the_upstream_finishes() {
    let gw = spawn_gateway(DEFAULT_SITES, "").await;
    let tls = connect_tls(gw.tls, &gw.ca.ca_der, "a.test", &[b"http/1.1"]).await;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let start = Instant::now();
    let resp = sender.send_request(get("/drip", "a.test")).await.unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    let first_at = start.elapsed();
    assert_eq!(&first[..], b"first");
    // The upstream holds the second chunk back 1.5 s; a buffering proxy would deliver
    // nothing before then.
    assert!(
        first_at < Duration::from_millis(1200),
        "first chunk after {first_at:?}"
    );
    let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&second[..], b"second");
    gw.shutdown().await;
}

#[tokio::test]
async fn http2_over_alpn_is_served_and_forwarded_as_http11() {
    let gw = spawn_gateway(DEFAULT_SITES, "").await;
    let mut sender = h2_sender(&gw).await;
    // Several concurrent streams on one connection.
    let mut tasks = Vec::new();
    for i in 0..5 {
        let req = Request::builder()
            .uri(format!("https://a.test/h2/{i}"))
            .body(http_body_util::Empty::new().map_err(|e| match e {}).boxed())
            .unwrap();
        tasks.push(sender.send_request(req));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let resp = t.await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let echo = json(std::str::from_utf8(&body).unwrap());
        assert_eq!(echo["uri"], format!("/h2/{i}"));
        assert_eq!(echo["version"], "HTTP/1.1");
        assert_eq!(echoed(&echo, "host"), Some("a.test"));
        assert_eq!(echoed(&echo, "x-forwarded-proto"), Some("https"));
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn websocket_echo_passes_through() {
    let gw = spawn_gateway(DEFAULT_SITES, "").await;
    let tls = connect_tls(gw.tls, &gw.ca.ca_der, "a.test", &[b"http/1.1"]).await;
    let (mut ws, resp) = tokio_tungstenite::client_async("wss://a.test/ws", tls)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    for text in ["hello", "through", "ipgate"] {
        ws.send(tokio_tungstenite::tungstenite::Message::text(text))
            .await
            .unwrap();
        let back = ws.next().await.unwrap().unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), text);
    }
    ws.close(None).await.unwrap();
    gw.shutdown().await;
}

#[tokio::test]
async fn unreachable_upstream_is_502() {
    let dead = closed_port().await;
    let sites = format!("[[site]]\nhosts = [\"*\"]\nupstream = \"http://{dead}\"\n");
    let gw = spawn_gateway(&sites, "").await;
    let (status, _) = https_get(&gw, "/").await;
    assert_eq!(status, 502);
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"ipgate_upstream_errors_total{kind="connect",site="*"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"ipgate_requests_total{outcome="upstream_error",site="*"}"#
        ),
        Some(1.0)
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn slow_upstream_is_504_after_upstream_timeout() {
    let sites = r#"
[[site]]
hosts = ["*"]
upstream = "http://{upstream}"
upstream_timeout = "300ms"
"#;
    let gw = spawn_gateway(sites, "").await;
    let start = Instant::now();
    let (status, _) = https_get(&gw, "/slow?ms=3000").await;
    assert_eq!(status, 504);
    assert!(start.elapsed() < Duration::from_millis(2500));
    // A fast request on the same site still passes.
    assert_eq!(https_get(&gw, "/slow?ms=10").await.0, 200);
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"ipgate_upstream_errors_total{kind="timeout",site="*"}"#
        ),
        Some(1.0)
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn unknown_host_is_421_and_sites_match_without_port() {
    let sites = r#"
[[site]]
name = "a"
hosts = ["a.test"]
upstream = "http://{upstream}"
"#;
    let gw = spawn_gateway(sites, "").await;
    assert_eq!(plain_get(gw.plain, "/", "a.test:8080").await.0, 200);
    assert_eq!(plain_get(gw.plain, "/", "A.Test").await.0, 200);
    assert_eq!(plain_get(gw.plain, "/", "other.test").await.0, 421);
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, r#"ipgate_requests_total{outcome="proxied",site="a"}"#),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"ipgate_requests_total{outcome="misdirected",site="none"}"#
        ),
        Some(1.0)
    );
    assert!(m.contains("ipgate_request_duration_seconds_bucket{site=\"a\""));
    // ipgate's own answers set no cookie (the privacy promise).
    let reply = raw_exchange(
        gw.plain,
        b"GET / HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    let head = String::from_utf8_lossy(&reply).to_ascii_lowercase();
    assert!(
        head.starts_with("http/1.1 421") && !head.contains("set-cookie"),
        "{head}"
    );
    gw.shutdown().await;
}

/// A bare HTTP/1.1 upstream that counts the connections it accepts, answers every GET on a
/// connection with `200 ok`, and closes a connection idle for `idle_close` (as Apache's
/// KeepAliveTimeout does), without telling anyone. It records the Host header it saw last.
async fn counting_upstream(
    idle_close: Duration,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<std::sync::Mutex<String>>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let host = Arc::new(Mutex::new(String::new()));
    let (count, seen) = (accepted.clone(), host.clone());
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    let n = match tokio::time::timeout(idle_close, tcp.read(&mut chunk)).await {
                        Ok(Ok(n)) if n > 0 => n,
                        _ => return, // idle too long, or the peer closed: close
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        if let Some(h) = head.lines().find_map(|l| l.strip_prefix("host: ")) {
                            *seen.lock().unwrap() = h.to_string();
                        }
                        buf.drain(..end + 4);
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if tcp.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, accepted, host)
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_one_closed_while_idle_is_not_a_502() {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (upstream, accepted, _) = counting_upstream(Duration::from_millis(300)).await;
    // One worker: one upstream pool, so every request below meets the pooled connection.
    let gw = GatewayBuilder::new()
        .upstream(upstream)
        .workers(1)
        .spawn()
        .await;
    // Twenty requests on one client connection share one upstream connection.
    let mut tcp = tokio::net::TcpStream::connect(gw.plain).await.unwrap();
    for _ in 0..20 {
        tcp.write_all(b"GET / HTTP/1.1\r\nhost: a.test\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        while !got.ends_with(b"ok") {
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut chunk))
                .await
                .expect("no answer")
                .unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&chunk[..n]);
        }
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&got)
        );
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    // The upstream drops the idle connection after 300 ms. Each request after that meets the
    // closed pooled connection: it must be answered, on exactly one new connection.
    tokio::time::sleep(Duration::from_millis(600)).await;
    for k in 0..3 {
        assert_eq!(
            plain_get(gw.plain, "/", "a.test").await.0,
            200,
            "request {k} after idle"
        );
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2 + k,
            "request {k}: a closed connection was reused, or more than one was opened"
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn an_http10_request_without_host_gets_one_upstream() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (upstream, _, host) = counting_upstream(Duration::from_secs(5)).await;
    let gw = GatewayBuilder::new().upstream(upstream).spawn().await;
    let mut tcp = tokio::net::TcpStream::connect(gw.plain).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut got)).await;
    assert!(
        got.starts_with(b"HTTP/1.0 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(*host.lock().unwrap(), upstream.to_string());
    gw.shutdown().await;
}
