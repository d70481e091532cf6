//! No burst outruns a jail, and one client holds a bounded share of the upstream, tried as
//! an attacker would: many HTTP/2 streams at once on one connection, slow uploads, forged client-address and path-override headers, a DNS-rebinding Host on the
//! admin listener, and a HEAD answered by the gateway itself.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Body as _, Frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The login jail with a ban of an hour that would double on a second offense.
fn wp_login() -> String {
    WP_JAIL
        .replace("ban = \"2s\"", "ban = \"1h\"")
        .replace("ban_factor = 5.0", "ban_factor = 2.0")
        .replace("max_ban = \"1h\"", "max_ban = \"7d\"")
}

fn login() -> Request<TestBody> {
    Request::builder()
        .method("POST")
        .uri("/wp-login.php")
        .header("host", "a.test")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(
            http_body_util::Full::new(Bytes::from_static(b"log=admin&pwd=guess"))
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap()
}

/// 40 password guesses sent at once as HTTP/2 streams on one connection, wave after wave:
/// at most `hits + concurrency` (3 + 1) reach WordPress before the ban, and the burst is one
/// offense (the first ban's length, not an escalated one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_streams_at_once_reach_the_upstream_at_most_hits_plus_concurrency_times() {
    let gw = GatewayBuilder::new()
        .sites(WP_SITE)
        .extra(&wp_login())
        .spawn()
        .await;
    let upstream = gw.origin.as_ref().unwrap();
    let sender = h2_sender(&gw).await;
    let mut statuses = Vec::new();
    for _wave in 0..10 {
        let mut streams = Vec::new();
        for _ in 0..40 {
            let mut s = sender.clone();
            streams.push(tokio::spawn(async move {
                s.ready().await.unwrap();
                s.send_request(login()).await.map(|r| r.status().as_u16())
            }));
        }
        for s in streams {
            statuses.push(s.await.unwrap().unwrap_or(0));
        }
        if statuses.iter().rev().take(40).all(|&s| s == 403) {
            break;
        }
    }
    let reached = upstream
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.starts_with("POST /wp-login.php"))
        .count();
    assert!(reached <= 3 + 1, "{reached} guesses reached the upstream");
    assert!(reached >= 3, "the jail needs its 3 failures: {reached}");
    assert!(statuses.contains(&403), "never banned: {statuses:?}");
    let (_, l) = admin_call(
        gw.admin,
        "GET",
        "/v1/ips/127.0.0.1",
        None,
        Some(&gw.token()),
    )
    .await;
    let offenses = l["offenses"][0]["at"].as_array().map_or(0, Vec::len);
    assert_eq!(offenses, 1, "one burst, one offense: {l}");
    let expires = l["entries"][0]["expires_at"].as_str().unwrap().to_string();
    let left = humantime::parse_rfc3339(&expires)
        .unwrap()
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(
        left <= Duration::from_secs(3600),
        "escalated: {left:?} ({l})"
    );
    gw.shutdown().await;
}

/// Another client, meanwhile, gets its page within a second.
async fn another_client_is_served_at_once(gw: &TestGateway) {
    let c = connect_from("127.0.0.2", gw.plain).await;
    let start = Instant::now();
    assert_eq!(get_on(c, "/", "a.test", &[]).await.0, 200);
    assert!(start.elapsed() < Duration::from_secs(1));
}

/// A body that sends one byte a second, forever (until the connection goes).
fn trickle() -> TestBody {
    let stream = futures_util::stream::unfold((), |()| async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        Some((
            Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"x"))),
            (),
        ))
    });
    BodyExt::boxed(StreamBody::new(stream))
}

/// 120 HTTP/2 streams on one connection, each declaring a 100 kB upload and sending a byte
/// a second: the upstream never holds more of them than `limits.max_uploads_per_client` (8),
/// and another client is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_uploads_hold_at_most_their_cap_of_upstream_connections() {
    let gw = GatewayBuilder::new().spawn().await;
    let upstream = gw.origin.as_ref().unwrap();
    let sender = h2_sender(&gw).await;
    let mut streams = Vec::new();
    for _ in 0..120 {
        let mut s = sender.clone();
        streams.push(tokio::spawn(async move {
            let req = Request::builder()
                .method("POST")
                .uri("/upload")
                .header("host", "a.test")
                .header("content-length", "100000")
                .body(trickle())
                .unwrap();
            s.ready().await.ok()?;
            s.send_request(req).await.ok().map(|r| r.status().as_u16())
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let most = upstream.most_in_flight();
    assert!(
        most <= 8,
        "{most} slow uploads held upstream connections at once"
    );
    assert!(most >= 1, "no upload reached the upstream");
    another_client_is_served_at_once(&gw).await;
    let refused = streams.iter().filter(|s| s.is_finished()).count();
    assert!(refused >= 100, "only {refused} of 120 were refused");
    for s in streams {
        s.abort();
    }
    drop(sender);
    gw.shutdown().await;
}

/// Headers a PHP application may take for the client's address or for the path, sent by an
/// untrusted client, as the upstream received them on its socket: none of them.
#[tokio::test]
async fn forged_client_address_and_path_override_headers_never_reach_the_upstream() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let received = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(n > 0);
            head.extend_from_slice(&buf[..n]);
        }
        tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .unwrap();
        String::from_utf8(head).unwrap()
    });
    let gw = GatewayBuilder::new().upstream(upstream).spawn().await;
    let forged = [
        "Client-IP",
        "X-Forwarded",
        "Forwarded-For",
        "X-Originating-IP",
        "X-Remote-IP",
        "X-Remote-Addr",
        "Fastly-Client-IP",
        "X-Client-IP",
        "X-Cluster-Client-IP",
        "CF-Connecting-IP",
        "X-ProxyUser-Ip",
        "True-Client-IP",
        "Forwarded",
    ];
    let mut head = String::from("GET /index.php HTTP/1.1\r\nHost: a.test\r\n");
    for name in forged {
        head.push_str(&format!("{name}: 192.0.2.66\r\n"));
    }
    // Case and repetition do not matter to PHP ($_SERVER['HTTP_CLIENT_IP']).
    head.push_str("client-ip: 192.0.2.67\r\nCLIENT-IP: 192.0.2.68\r\n");
    // Read by PHP as HTTP_CLIENT_IP and HTTP_X_FORWARDED_FOR too.
    head.push_str("Client_IP: 192.0.2.69\r\nX_Forwarded_For: 192.0.2.69\r\n");
    head.push_str("X-Original-URL: /wp-admin/\r\nX-Rewrite-URL: /phpmyadmin/\r\n");
    head.push_str("Connection: close\r\n\r\n");
    let mut tcp = connect_from("127.0.0.3", gw.plain).await;
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let seen = received.await.unwrap().to_ascii_lowercase();
    for name in forged
        .iter()
        .map(|n| n.to_ascii_lowercase())
        .chain(["x-original-url".into(), "x-rewrite-url".into()])
    {
        assert!(
            !seen.contains(&format!("\r\n{name}:")),
            "{name} reached the upstream:\n{seen}"
        );
    }
    assert!(!seen.contains("192.0.2.6"), "{seen}");
    assert!(
        !seen.contains("/wp-admin/") && !seen.contains("/phpmyadmin/"),
        "{seen}"
    );
    assert!(seen.contains("\r\nx-real-ip: 127.0.0.3\r\n"), "{seen}");
    gw.shutdown().await;
}

async fn admin_status(gw: &TestGateway, host: &str) -> String {
    let req = format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let out = raw_exchange(gw.admin, req.as_bytes(), Duration::from_secs(3)).await;
    String::from_utf8_lossy(&out)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

/// A page in the operator's browser whose name was rebound to 127.0.0.1 sends its own name
/// as Host: the admin listener does not answer it.
#[tokio::test]
async fn the_admin_listener_answers_only_its_own_host() {
    let gw = GatewayBuilder::new().spawn().await;
    let port = gw.admin.port();
    for own in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "localhost".to_string(),
        format!("LOCALHOST.:{port}"),
        "127.0.0.1".to_string(),
    ] {
        assert!(admin_status(&gw, &own).await.contains(" 200"), "{own}");
    }
    for other in [
        format!("attacker.example:{port}"),
        "attacker.example".to_string(),
        format!("localhost.attacker.example:{port}"),
        format!("192.0.2.1:{port}"),
        "".to_string(),
    ] {
        let status = admin_status(&gw, &other).await;
        assert!(!status.contains(" 200"), "{other}: {status}");
    }
    let status = admin_status(&gw, &format!("attacker.example:{port}")).await;
    assert!(status.contains(" 421"), "{status}");
    gw.shutdown().await;

    // A name of the operator's own, configured.
    let gw = GatewayBuilder::new()
        .admin_keys(r#"hosts = ["GW1.example.nl."]"#)
        .spawn()
        .await;
    assert!(admin_status(&gw, "gw1.example.nl").await.contains(" 200"));
    assert!(admin_status(&gw, "gw2.example.nl").await.contains(" 421"));
    gw.shutdown().await;
}

/// The gateway's own answer to HEAD (here a 429) carries no body over HTTP/2, where DATA on
/// a HEAD stream is a protocol error for the client, nor over HTTP/1.1.
#[tokio::test]
async fn a_head_answered_by_the_gateway_has_no_body_on_either_protocol() {
    let gw = GatewayBuilder::new()
        .extra("[rate_limit]\nrequests_per_second = 0.1\nburst = 1\n")
        .spawn()
        .await;
    let mut sender = h2_sender(&gw).await;
    let head = || {
        Request::builder()
            .method("HEAD")
            .uri("https://a.test/")
            .body(BodyExt::boxed(
                http_body_util::Empty::new().map_err(|never| match never {}),
            ))
            .unwrap()
    };
    let first = sender.send_request(head()).await.unwrap();
    assert_eq!(first.status(), 200);
    let refused = sender.send_request(head()).await.unwrap();
    assert_eq!(refused.status(), 429);
    assert!(refused.body().is_end_stream(), "DATA on a HEAD stream");
    let body = refused.into_body().collect().await.unwrap().to_bytes();
    assert!(body.is_empty());
    // The connection is still good: the client saw no protocol error.
    sender.ready().await.unwrap();
    let req = "HEAD / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n";
    let out = raw_exchange(gw.plain, req.as_bytes(), Duration::from_secs(3)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 429"), "{text}");
    assert!(
        text.ends_with("\r\n\r\n"),
        "a body after the head: {text:?}"
    );
    gw.shutdown().await;
}

/// A browser's normal use is never refused with the default limits: one HTTP/2 connection
/// with 100 streams of small requests at once (from one address), and 6 HTTP/1.1 connections
/// at once (from another), all get 200; the upstream never holds more than 32 of one
/// client's requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browsers_burst_is_served_whole_with_the_default_limits() {
    let gw = GatewayBuilder::new().spawn().await;
    let sender = h2_sender(&gw).await;
    let mut streams = Vec::new();
    for k in 0..100 {
        let mut s = sender.clone();
        streams.push(tokio::spawn(async move {
            s.ready().await.unwrap();
            let req = get(&format!("/slow?ms=20&asset={k}"), "a.test");
            s.send_request(req).await.unwrap().status().as_u16()
        }));
    }
    for s in streams {
        assert_eq!(s.await.unwrap(), 200);
    }
    let upstream = gw.origin.as_ref().unwrap();
    assert!(
        upstream.most_in_flight() <= 32,
        "{}",
        upstream.most_in_flight()
    );
    let mut pages = Vec::new();
    for _ in 0..6 {
        pages.push(tokio::spawn(async move {
            let c = connect_from("127.0.0.2", gw.plain).await;
            get_on(c, "/slow?ms=20", "a.test", &[]).await.0
        }));
    }
    for s in pages {
        assert_eq!(s.await.unwrap(), 200);
    }
    gw.shutdown().await;
}

/// 120 HTTP/2 streams on one connection, each asking for a large response the client never
/// reads: the upstream never has more of this client's connections open than
/// `limits.max_requests_per_client` (32), and another client is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_hold_at_most_their_cap_of_upstream_connections() {
    let gw = GatewayBuilder::new().spawn().await;
    let upstream = gw.origin.as_ref().unwrap();
    let sender = h2_sender(&gw).await;
    let mut streams = Vec::new();
    for _ in 0..120 {
        let mut s = sender.clone();
        streams.push(tokio::spawn(async move {
            s.ready().await.ok()?;
            let resp = s.send_request(get("/big?n=8000000", "a.test")).await.ok()?;
            // The head is read, the body never: hold it unread.
            tokio::time::sleep(Duration::from_secs(30)).await;
            Some(resp.status().as_u16())
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let most = upstream.most_connections();
    assert!(
        most <= 32,
        "{most} upstream connections held by one slow reader"
    );
    assert!(most >= 8, "the responses did not get under way: {most}");
    another_client_is_served_at_once(&gw).await;
    for s in streams {
        s.abort();
    }
    drop(sender);
    gw.shutdown().await;
}
