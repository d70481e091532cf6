//! The data path end to end: real gateway, real upstream, real TLS (SPEC 9, 10).

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
    // Appended to what the client sent; the client's own X-Real-IP and proto are replaced.
    assert_eq!(
        echoed(&echo, "x-forwarded-for"),
        Some("198.51.100.9, 127.0.0.1")
    );
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
