//! HTTP/3 (`http3 = true` on a TLS listener): QUIC clients (quinn's, with h3's HTTP/3 client,
//! and aioquic's from PyPI) through the real gateway to a real upstream. The policy holds
//! before the handshake: a blocked source's Initial gets no answer, the per-client cap
//! counts QUIC connections, a Retry checks the address when asked for; 0-RTT is refused;
//! the rate limit and the jails see HTTP/3 requests as any others; the access log says
//! `HTTP/3`; TCP responses advertise it (`Alt-Svc`).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Buf;
use common::*;

const H3: &str = r#"
[[listener]]
addr = "127.0.0.1:0"
tls = true
http3 = true
"#;

/// A gateway whose third listener is TLS with HTTP/3; its TCP address (the UDP port is
/// the same).
async fn gateway(extra: &str, sites: &str) -> (TestGateway, SocketAddr) {
    let gw = GatewayBuilder::new()
        .extra(&format!("{H3}\n{extra}"))
        .sites(sites)
        .spawn()
        .await;
    let addr = gw.listeners[2];
    (gw, addr)
}

/// What an HTTP/3 exchange gave: the status, the response headers and the body.
type Got = (u16, http::HeaderMap, String);

/// A QUIC endpoint on `local` (a loopback address of the test's choice) that trusts the
/// test CA; `wait` bounds the handshake (a client that gets no answer times out).
fn client(gw: &TestGateway, local: &str, wait: Duration, early_data: bool) -> quinn::Endpoint {
    client_with(&gw.ca.ca_der, local, wait, early_data)
}

fn client_with(
    ca: &rustls::pki_types::CertificateDer<'static>,
    local: &str,
    wait: Duration,
    early_data: bool,
) -> quinn::Endpoint {
    let mut tls = client_config(ca, &[b"h3"]);
    tls.enable_early_data = early_data;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(wait.try_into().unwrap()));
    config.transport_config(Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client(format!("{local}:0").parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    endpoint
}

async fn connect(
    endpoint: &quinn::Endpoint,
    server: SocketAddr,
    wait: Duration,
) -> Result<quinn::Connection, String> {
    let connecting = endpoint
        .connect(server, "a.test")
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(wait, connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer".into()),
    }
}

/// An HTTP/3 client on `conn`, its connection driven in the background; the connection
/// stays open while the returned sender lives.
async fn h3_client(
    conn: quinn::Connection,
) -> Result<h3::client::SendRequest<h3_quinn::OpenStreams, bytes::Bytes>, String> {
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
    Ok(send)
}

/// One request over an HTTP/3 connection.
async fn exchange(conn: quinn::Connection, method: &str, path: &str) -> Result<Got, String> {
    let mut send = h3_client(conn).await?;
    let req = http::Request::builder()
        .method(method)
        .uri(format!("https://a.test{path}"))
        .body(())
        .unwrap();
    let mut stream = send.send_request(req).await.map_err(|e| e.to_string())?;
    if method == "POST" {
        stream
            .send_data(bytes::Bytes::from_static(b"log=admin"))
            .await
            .map_err(|e| e.to_string())?;
    }
    stream.finish().await.map_err(|e| e.to_string())?;
    let resp = stream.recv_response().await.map_err(|e| e.to_string())?;
    let mut body = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await.map_err(|e| e.to_string())? {
        body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
    }
    Ok((
        resp.status().as_u16(),
        resp.headers().clone(),
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

/// A GET on a new connection from `local`.
async fn h3_get(
    gw: &TestGateway,
    server: SocketAddr,
    local: &str,
    path: &str,
) -> Result<Got, String> {
    let wait = Duration::from_secs(2);
    let endpoint = client(gw, local, wait, false);
    let conn = connect(&endpoint, server, wait).await?;
    exchange(conn, "GET", path).await
}

async fn rejected(gw: &TestGateway, reason: &str) -> f64 {
    let text = gw.metrics().await;
    metric(
        &text,
        &format!("ipgate_connections_rejected_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_takes_the_same_path_is_logged_and_is_advertised() {
    let port = free_port();
    let h3 = H3.replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let files = GatewayBuilder::new()
        .extra(&h3)
        .access_log(true)
        .files()
        .await;
    let gw = files.start("info");
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let wait = Duration::from_secs(2);
    let endpoint = client_with(&files.ca.ca_der, "127.0.0.1", wait, false);
    let conn = connect(&endpoint, addr, wait).await.unwrap();
    let (status, headers, body) = exchange(conn, "GET", "/hello?x=1").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let echo = json(&body);
    assert_eq!(echo["uri"], "/hello?x=1", "{echo}");
    // Forwarded as any request, with the client named.
    assert_eq!(
        echoed(&echo, "x-forwarded-for"),
        Some("127.0.0.1"),
        "{echo}"
    );
    assert!(headers.get("content-length").is_some(), "{headers:?}");
    // The access log says HTTP/3.
    assert!(
        eventually(Duration::from_secs(3), || async {
            gw.output
                .text()
                .lines()
                .any(|l| l.contains("\"proto\":\"HTTP/3\"") && l.contains("/hello"))
        })
        .await,
        "{}",
        gw.output.text()
    );
    // A TCP response on that listener advertises HTTP/3 on the same port.
    let tls = connect_tls(addr, &files.ca.ca_der, "a.test", &[b"http/1.1"]).await;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = sender.send_request(get("/", "a.test")).await.unwrap();
    let alt = resp
        .headers()
        .get("alt-svc")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(alt, format!("h3=\":{port}\"; ma=86400"));
    // The plain listener has no HTTP/3, and says nothing of it.
    let tcp = tokio::net::TcpStream::connect(gw.plain).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = sender.send_request(get("/", "a.test")).await.unwrap();
    assert!(resp.headers().get("alt-svc").is_none());

    // An upgrade passes the UDP socket on: the new process answers HTTP/3 on the same port.
    // A request under way on the old process's QUIC connection finishes there first.
    let held = connect(&endpoint, addr, wait).await.unwrap();
    let under_way = tokio::spawn(exchange(held, "GET", "/slow?ms=700"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let token = std::fs::read_to_string(files.token_file()).unwrap();
    let (status, v) = admin_call(gw.admin, "POST", "/v1/upgrade", None, Some(token.trim())).await;
    assert_eq!(status, 200, "{v}\n{}", gw.output.text());
    // The new process is stopped however the test ends.
    let _new = KillOnDrop(v["pid"].as_u64().unwrap() as u32);
    let finished = under_way.await.unwrap();
    assert_eq!(finished.map(|g| g.0), Ok(200), "{}", gw.output.text());
    let old = gw.pid();
    let gone = eventually(Duration::from_secs(10), || async move { !running(old) }).await;
    assert!(gone, "the old process did not exit");
    let endpoint = client_with(&files.ca.ca_der, "127.0.0.1", wait, false);
    let served = eventually(Duration::from_secs(5), || async {
        match connect(&endpoint, addr, wait).await {
            Ok(conn) => exchange(conn, "GET", "/").await.is_ok_and(|g| g.0 == 200),
            Err(_) => false,
        }
    })
    .await;
    assert!(served, "no HTTP/3 after the upgrade\n{}", gw.output.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_source_gets_no_answer_and_the_cap_counts_quic_connections() {
    let extra = "[limits]\nmax_connections_per_client = 2\n[lists.bad]\naction = \"block\"\nentries = [\"127.0.4.9\"]\n";
    let (gw, addr) = gateway(extra, DEFAULT_SITES).await;
    let before = rejected(&gw, "blocked").await;
    let got = h3_get(&gw, addr, "127.0.4.9", "/").await;
    assert_eq!(
        got.err().as_deref(),
        Some("no answer"),
        "a blocked source was answered"
    );
    assert!(rejected(&gw, "blocked").await > before);
    // Another address of the same machine is served.
    assert_eq!(h3_get(&gw, addr, "127.0.4.10", "/").await.unwrap().0, 200);

    // Two QUIC connections from one client are its cap: the third gets no answer.
    let wait = Duration::from_secs(2);
    let endpoint = client(&gw, "127.0.4.11", wait, false);
    let one = connect(&endpoint, addr, wait).await.unwrap();
    let two = connect(&endpoint, addr, wait).await.unwrap();
    let capped = rejected(&gw, "per_client").await;
    let three = connect(&endpoint, addr, wait).await;
    assert_eq!(three.err().as_deref(), Some("no answer"));
    assert!(rejected(&gw, "per_client").await > capped);
    drop((one, two));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_and_jails_hold_over_http3() {
    let extra = "[rate_limit]\nrequests_per_second = 1\nburst = 3\n";
    let (gw, addr) = gateway(&format!("{extra}{WP_JAIL}"), WP_SITE).await;
    let wait = Duration::from_secs(2);
    // The rate limit: one connection, requests in a row.
    let endpoint = client(&gw, "127.0.4.20", wait, false);
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let conn = connect(&endpoint, addr, wait).await.unwrap();
        statuses.push(exchange(conn, "GET", "/").await.unwrap().0);
    }
    assert!(statuses.contains(&429), "never limited: {statuses:?}");

    // The jail: three failed logins over HTTP/3, then the client is banned: its next
    // QUIC connection gets no answer.
    let endpoint = client(&gw, "127.0.4.21", wait, false);
    for _ in 0..3 {
        let conn = connect(&endpoint, addr, wait).await.unwrap();
        let _ = exchange(conn, "POST", "/wp-login.php").await;
    }
    assert!(
        eventually(Duration::from_secs(3), || async {
            connect(&endpoint, addr, Duration::from_millis(500))
                .await
                .is_err()
        })
        .await,
        "the jail did not ban an HTTP/3 client"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_checks_the_address_when_asked_for_and_0rtt_is_refused() {
    let h3_always = H3.replace("http3 = true", "http3 = true\nhttp3_retry = \"always\"");
    let gw = GatewayBuilder::new().extra(&h3_always).spawn().await;
    let addr = gw.listeners[2];
    let retries =
        || async { metric(&gw.metrics().await, "ipgate_quic_retries_total").unwrap_or(0.0) };
    let before = retries().await;
    assert_eq!(h3_get(&gw, addr, "127.0.4.30", "/").await.unwrap().0, 200);
    assert!(retries().await > before, "no Retry was sent");

    // 0-RTT: a client that resumes a session and would send early data is never taken up on
    // it (the server's config allows none: `quic_takes_h3_only_and_no_early_data`).
    let wait = Duration::from_secs(2);
    let endpoint = client(&gw, "127.0.4.31", wait, true);
    let first = connect(&endpoint, addr, wait).await.unwrap();
    assert_eq!(exchange(first.clone(), "GET", "/").await.unwrap().0, 200);
    first.close(0u32.into(), b"done");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let again = endpoint.connect(addr, "a.test").unwrap();
    match again.into_0rtt() {
        Ok((conn, accepted)) => {
            // Offered: the server must refuse it.
            assert!(!accepted.await, "the server accepted 0-RTT data");
            drop(conn);
        }
        // Not even offered: the server's tickets allow no early data.
        Err(connecting) => {
            let conn = tokio::time::timeout(wait, connecting)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(exchange(conn, "GET", "/").await.unwrap().0, 200);
        }
    }
}

/// A client that has a QUIC connection open proves its address with a Retry before its
/// next one takes a connection slot (forged Initials cannot use up a client's slots); its
/// first connection needs none, and both serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_a_connection_open_is_sent_a_retry_for_its_next() {
    let (gw, addr) = gateway("", DEFAULT_SITES).await;
    let retries =
        || async { metric(&gw.metrics().await, "ipgate_quic_retries_total").unwrap_or(0.0) };
    let wait = Duration::from_secs(2);
    let endpoint = client(&gw, "127.0.4.32", wait, false);
    let before = retries().await;
    let first = connect(&endpoint, addr, wait).await.unwrap();
    assert_eq!(retries().await, before, "a first connection needs no Retry");
    let second = connect(&endpoint, addr, wait).await.unwrap();
    assert_eq!(
        retries().await,
        before + 1.0,
        "no Retry for the second connection"
    );
    assert_eq!(exchange(second, "GET", "/").await.unwrap().0, 200);
    assert_eq!(exchange(first, "GET", "/").await.unwrap().0, 200);
}

/// aioquic's client (PyPI), a QUIC stack other than the gateway's own: `tests/data/h3_get.py`.
fn aioquic_get(gw: &TestGateway, addr: SocketAddr, path: &str) -> std::process::Output {
    let ca = gw.dir.path().join("ca-for-aioquic.pem");
    std::fs::write(&ca, gw.ca.ca_pem()).unwrap();
    std::process::Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/h3_get.py"))
        .arg(addr.to_string())
        .arg("a.test")
        .arg(path)
        .arg(&ca)
        .output()
        .expect("python3 with aioquic (pip install aioquic; scripts/test installs it)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aioquic_gets_200_and_a_blocked_source_gets_no_answer() {
    let (gw, addr) = gateway("", DEFAULT_SITES).await;
    let out = tokio::task::block_in_place(|| aioquic_get(&gw, addr, "/from-aioquic"));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && said.starts_with("200"),
        "{said}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(gw
        .origin
        .as_ref()
        .unwrap()
        .last()
        .unwrap()
        .contains("/from-aioquic"));

    let blocked = "[lists.bad]\naction = \"block\"\nentries = [\"127.0.0.1\"]\n";
    let (gw, addr) = gateway(blocked, DEFAULT_SITES).await;
    let before = rejected(&gw, "blocked").await;
    let out = tokio::task::block_in_place(|| aioquic_get(&gw, addr, "/"));
    assert_eq!(
        out.status.code(),
        Some(2),
        "a blocked source was answered: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(rejected(&gw, "blocked").await > before);
}

/// A QUIC connection that sends no request is closed when the request path's first-request
/// timeout closes its side, as a silent TCP connection is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_quic_connection_is_closed_by_the_first_request_timeout() {
    let (gw, addr) = gateway("[limits]\nheader_read_timeout = \"1s\"\n", DEFAULT_SITES).await;
    let wait = Duration::from_secs(10);
    let endpoint = client(&gw, "127.0.4.40", wait, false);
    let conn = connect(&endpoint, addr, wait).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    assert!(
        matches!(closed, Ok(quinn::ConnectionError::ApplicationClosed(_))),
        "{closed:?}"
    );
}

/// A POST over an HTTP/3 connection, its body sent in 16 KiB pieces, with `length` as its
/// `Content-Length` when given: the status and the body of the answer.
async fn post(
    conn: quinn::Connection,
    path: &str,
    length: Option<&str>,
    body: &[u8],
) -> Result<(u16, String), String> {
    let mut send = h3_client(conn).await?;
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("https://a.test{path}"));
    if let Some(length) = length {
        req = req.header("content-length", length);
    }
    let mut stream = send
        .send_request(req.body(()).unwrap())
        .await
        .map_err(|e| e.to_string())?;
    for piece in body.chunks(16 * 1024) {
        if stream
            .send_data(bytes::Bytes::copy_from_slice(piece))
            .await
            .is_err()
        {
            break; // refused mid-way: the answer says why
        }
    }
    let _ = stream.finish().await;
    let resp = stream.recv_response().await.map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    while let Ok(Some(mut chunk)) = stream.recv_data().await {
        got.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
    }
    Ok((
        resp.status().as_u16(),
        String::from_utf8_lossy(&got).into_owned(),
    ))
}

/// What the test upstream's `/upload` answers for `body`: its length and byte sum.
fn upload_answer(body: &[u8]) -> String {
    let sum = body.iter().fold(0u32, |s, b| s.wrapping_add(*b as u32));
    format!("{} {sum}", body.len())
}

/// A body to send: its `Content-Length`, its bytes, and the upstream's answer or the status.
type Case<'a> = (Option<&'a str>, &'a [u8], Result<String, u16>);

/// Request bodies over HTTP/3 reach the upstream whole, small (read ahead) or large
/// (streamed); a body longer or shorter than its `Content-Length`, or a malformed one, is
/// refused with 400 rather than sent on as declared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_http3_reach_the_upstream_whole_and_held_to_their_length() {
    let (gw, addr) = gateway("", DEFAULT_SITES).await;
    let wait = Duration::from_secs(5);
    let endpoint = client(&gw, "127.0.4.50", wait, false);
    let big: Vec<u8> = (0..300 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let small = &big[..1000];
    let cases: [Case; 6] = [
        (None, &big, Ok(upload_answer(&big))),
        (Some("1000"), small, Ok(upload_answer(small))),
        (Some("307200"), &big, Ok(upload_answer(&big))),
        (Some("10"), &small[..20], Err(400)),
        (Some("10"), &small[..5], Err(400)),
        (Some("1x"), &small[..2], Err(400)),
    ];
    for (length, body, want) in cases {
        let conn = connect(&endpoint, addr, wait).await.unwrap();
        let (status, text) = post(conn, "/upload", length, body).await.unwrap();
        match want {
            Ok(answer) => {
                assert_eq!(
                    (status, text.as_str()),
                    (200, answer.as_str()),
                    "{length:?}"
                )
            }
            Err(code) => assert_eq!(status, code, "{length:?}: {text}"),
        }
    }
    // A streamed body that runs past its length: the upstream gets no more than declared
    // (its answer says 100000 bytes), or the request fails.
    let conn = connect(&endpoint, addr, wait).await.unwrap();
    let (status, text) = post(conn, "/upload", Some("100000"), &big).await.unwrap();
    if status == 200 {
        assert_eq!(text, upload_answer(&big[..100_000]));
    } else {
        assert!(status >= 400, "{status} {text}");
    }
}

/// An HTTP/3 connection with no request open for `limits.http2_idle_timeout` is closed and
/// counted, as an idle HTTP/2 connection is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_quic_connection_is_closed_as_an_idle_http2_one() {
    let (gw, addr) = gateway("[limits]\nhttp2_idle_timeout = \"1s\"\n", DEFAULT_SITES).await;
    let idle = "ipgate_connections_timed_out_total{reason=\"http2_idle\"}";
    let before = metric(&gw.metrics().await, idle).unwrap_or(0.0);
    let wait = Duration::from_secs(10);
    let endpoint = client(&gw, "127.0.4.51", wait, false);
    let conn = connect(&endpoint, addr, wait).await.unwrap();
    // The client keeps its side open (h3's client closes when its last sender goes).
    let mut send = h3_client(conn.clone()).await.unwrap();
    let req = http::Request::get("https://a.test/").body(()).unwrap();
    let mut stream = send.send_request(req).await.unwrap();
    stream.finish().await.unwrap();
    assert_eq!(stream.recv_response().await.unwrap().status(), 200);
    while let Ok(Some(_)) = stream.recv_data().await {}
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    assert!(
        matches!(closed, Ok(quinn::ConnectionError::ApplicationClosed(_))),
        "{closed:?}"
    );
    assert_eq!(metric(&gw.metrics().await, idle), Some(before + 1.0));
    drop(send);
}

/// `limits.max_header_bytes` holds over HTTP/3: the gateway announces it in its SETTINGS
/// (RFC 9114 §4.2.2), so h3's client refuses to send a larger header section, and answers
/// one sent anyway with 431; a small one is served on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_size_limit_is_announced_and_held() {
    let (gw, addr) = gateway("[limits]\nmax_header_bytes = 8192\n", DEFAULT_SITES).await;
    let wait = Duration::from_secs(2);
    let endpoint = client(&gw, "127.0.4.52", wait, false);
    let conn = connect(&endpoint, addr, wait).await.unwrap();
    let mut send = h3_client(conn).await.unwrap();
    let req = |big: usize| {
        http::Request::get("https://a.test/")
            .header("x-big", "a".repeat(big))
            .body(())
            .unwrap()
    };
    let mut stream = send.send_request(req(100)).await.unwrap();
    stream.finish().await.unwrap();
    assert_eq!(stream.recv_response().await.unwrap().status(), 200);
    // The client holds it back once it has the gateway's SETTINGS; before, the gateway
    // answers 431 itself.
    match send.send_request(req(16384)).await {
        Err(h3::error::StreamError::HeaderTooBig { max_size, .. }) => assert_eq!(max_size, 8192),
        Ok(mut stream) => {
            let _ = stream.finish().await;
            let status = stream.recv_response().await.map(|r| r.status().as_u16());
            assert_eq!(status.ok(), Some(431), "a 16 KiB header section was taken");
        }
        Err(e) => panic!("{e}"),
    }
}

/// At a stop (SIGTERM) an HTTP/3 request under way finishes, a connection with no request
/// open is closed at once, no new QUIC connection is taken, and the process exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_a_stop_a_request_under_way_finishes_and_no_new_connection_is_taken() {
    let port = free_port();
    let h3 = H3.replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let files = GatewayBuilder::new().extra(&h3).files().await;
    let gw = files.start("info");
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let wait = Duration::from_secs(1);
    let endpoint = client_with(&files.ca.ca_der, "127.0.0.1", wait, false);
    let served = eventually(Duration::from_secs(5), || async {
        connect(&endpoint, addr, wait).await.is_ok()
    })
    .await;
    assert!(served, "{}", gw.output.text());
    let conn = connect(&endpoint, addr, wait).await.unwrap();
    let under_way = tokio::spawn(exchange(conn, "GET", "/slow?ms=1000"));
    // A connection with no request open, whose client keeps it.
    let idle = connect(&endpoint, addr, wait).await.unwrap();
    let _keep = h3_client(idle.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    gw.signal("TERM");
    // It is closed at once, not at the end of the grace.
    let closed = tokio::time::timeout(Duration::from_millis(500), idle.closed()).await;
    assert!(
        matches!(closed, Ok(quinn::ConnectionError::ApplicationClosed(_))),
        "{closed:?}"
    );
    assert!(
        connect(&endpoint, addr, wait).await.is_err(),
        "a new QUIC connection was taken after SIGTERM"
    );
    let finished = under_way.await.unwrap();
    assert_eq!(finished.map(|g| g.0), Ok(200), "{}", gw.output.text());
    assert!(gw.wait().await.success());
}

/// A client whose address changes mid-connection is not followed there (migration is off):
/// its packets from the new address are dropped, so the connection serves no more; a new
/// connection from the new address is judged afresh (here: it is blocked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_moves_to_another_address_is_not_followed() {
    let extra = "[lists.bad]\naction = \"block\"\nentries = [\"127.0.4.71\"]\n";
    let (gw, addr) = gateway(extra, DEFAULT_SITES).await;
    let wait = Duration::from_secs(2);
    let endpoint = client(&gw, "127.0.4.70", wait, false);
    let conn = connect(&endpoint, addr, wait).await.unwrap();
    let mut send = h3_client(conn.clone()).await.unwrap();
    let req = || http::Request::get("https://a.test/").body(()).unwrap();
    let mut stream = send.send_request(req()).await.unwrap();
    stream.finish().await.unwrap();
    assert_eq!(stream.recv_response().await.unwrap().status(), 200);
    while let Ok(Some(_)) = stream.recv_data().await {}
    // The client moves to a blocked address.
    endpoint
        .rebind(std::net::UdpSocket::bind("127.0.4.71:0").unwrap())
        .unwrap();
    let moved = async {
        let mut stream = send.send_request(req()).await.map_err(|e| e.to_string())?;
        stream.finish().await.map_err(|e| e.to_string())?;
        stream
            .recv_response()
            .await
            .map(|r| r.status())
            .map_err(|e| e.to_string())
    };
    let got = tokio::time::timeout(Duration::from_secs(4), moved).await;
    assert!(
        !matches!(got, Ok(Ok(_))),
        "a request from the new address was served: {got:?}"
    );
    // A new connection from there is judged on that address.
    let there = client(&gw, "127.0.4.71", wait, false);
    assert!(connect(&there, addr, wait).await.is_err());
}

/// With `limits.request_buffer_bytes = 0` (no read-ahead), an HTTP/3 GET that ended with its
/// head is not taken for a streaming upload: two at once pass a cap of one upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_without_a_body_is_not_an_upload() {
    let extra = "[limits]\nrequest_buffer_bytes = 0\nmax_uploads_per_client = 1\n";
    let (gw, addr) = gateway(extra, DEFAULT_SITES).await;
    let wait = Duration::from_secs(5);
    let endpoint = client(&gw, "127.0.4.80", wait, false);
    let (a, b) = (
        connect(&endpoint, addr, wait).await.unwrap(),
        connect(&endpoint, addr, wait).await.unwrap(),
    );
    let (a, b) = tokio::join!(
        exchange(a, "GET", "/slow?ms=500"),
        exchange(b, "GET", "/slow?ms=500")
    );
    assert_eq!((a.unwrap().0, b.unwrap().0), (200, 200));
}
