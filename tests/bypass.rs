//! Hostile requests cannot get past the policy. Every way of writing a
//! protected path that the upstream (Apache, PHP) reads as that path is matched as it, by
//! `allow_only`, a jail and a route rate limit, over HTTP/1.1 and HTTP/2; the upstream
//! receives the normalized path; what cannot be normalized safely is 400 and never reaches
//! it. Then one regression test per hole that was found, and the Host and client-address
//! rules.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;

const SITES: &str = r#"
[lists.office]
action = "allow"
entries = ["127.2.0.0/16"]

[[jail]]
name = "wp-login"
method = "POST"
path = "/wp-login.php"
status = [200]
hits = 3
window = "10m"
ban = "1h"

[[site]]
name = "b"
hosts = ["b.test"]
upstream = "http://{upstream}"
allow_only = ["office"]

[[site]]
hosts = ["*"]
upstream = "http://{upstream}"
jails = ["wp-login"]

[[site.route]]
path = "/phpmyadmin"
allow_only = ["office"]

[[site.route]]
path = "/xmlrpc.php"
rate_limit = { requests_per_second = 1, burst = 1 }
"#;

/// The three protected paths: behind `allow_only`, jailed, rate-limited.
const PMA: &str = "/phpmyadmin/index.php";
const WP: &str = "/wp-login.php";
const RPC: &str = "/xmlrpc.php";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Proto {
    H1,
    H2,
}

/// One way of writing a path: its name, the request target, and what the upstream must
/// receive (`None`: refused with 400).
struct Variant {
    name: &'static str,
    target: String,
    want: Option<String>,
}

fn enc(b: u8, upper: bool) -> String {
    if upper {
        format!("%{b:02X}")
    } else {
        format!("%{b:02x}")
    }
}

/// Percent-encodes the bytes of `p` that `which` selects (never the slashes).
fn encode(p: &str, upper: bool, which: impl Fn(usize, u8) -> bool) -> String {
    p.bytes()
        .enumerate()
        .map(|(i, b)| {
            if b != b'/' && which(i, b) {
                enc(b, upper)
            } else {
                (b as char).to_string()
            }
        })
        .collect()
}

/// Every variant of the canonical path `p` (which starts with '/').
fn variants(p: &str) -> Vec<Variant> {
    let rest = &p[1..];
    let same = |name, target: String| Variant {
        name,
        target,
        want: Some(p.to_string()),
    };
    let dir = |name, target: String| Variant {
        name,
        target,
        want: Some(format!("{p}/")),
    };
    let refused = |name, target: String| Variant {
        name,
        target,
        want: None,
    };
    vec![
        same("as is", p.to_string()),
        same("first letter %xx", encode(p, false, |i, _| i == 1)),
        same(
            "letters, lower-case hex",
            encode(p, false, |_, b| b.is_ascii_alphabetic()),
        ),
        same(
            "letters, upper-case hex",
            encode(p, true, |_, b| b.is_ascii_alphabetic()),
        ),
        same("everything, mixed-case hex", {
            let lower = encode(p, false, |_, _| true);
            lower
                .char_indices()
                .map(|(i, c)| {
                    if i % 2 == 0 {
                        c.to_ascii_uppercase()
                    } else {
                        c
                    }
                })
                .collect()
        }),
        same("dot as %2e", p.replace('.', "%2e")),
        same("dot as %2E", p.replace('.', "%2E")),
        same(
            "hyphen and underscore encoded",
            p.replace('-', "%2d").replace('_', "%5F"),
        ),
        same("leading //", format!("/{p}")),
        same("leading ///", format!("//{p}")),
        same("every slash doubled", p.replace('/', "//")),
        same("/./ before", format!("/.{p}")),
        same("/././ before", format!("/./.{p}")),
        same("/.// before", format!("/./{p}")),
        same("/%2e/ before", format!("/%2e{p}")),
        same("/%2E/ before", format!("/%2E{p}")),
        same("x/.. before", format!("/x/..{p}")),
        same("x/%2e%2e before", format!("/x/%2e%2e{p}")),
        same("x/%2E%2E before", format!("/x/%2E%2E{p}")),
        same("x/.%2e before", format!("/x/.%2e{p}")),
        same("x/%2E. before", format!("/x/%2E.{p}")),
        same("x/y/../.. before", format!("/x/y/../..{p}")),
        same("x//..// before", format!("/x//..//{rest}")),
        same("x/./.. before", format!("/x/./..{p}")),
        same("x/../. before", format!("/x/../.{p}")),
        same("repeated dot segments", format!("/./././.{p}")),
        Variant {
            name: "encoded query kept as sent",
            target: format!("/.{p}?q=%2e%2e/x&r=%2F"),
            want: Some(format!("{p}?q=%2e%2e/x&r=%2F")),
        },
        dir("trailing /.", format!("{p}/.")),
        dir("trailing /./", format!("{p}/./")),
        dir("trailing //", format!("{p}//")),
        dir("trailing x/..", format!("{p}/x/..")),
        dir("trailing x/%2e%2e", format!("{p}/x/%2e%2e")),
        refused("encoded / (%2f)", format!("/x%2f..%2f{rest}")),
        refused("encoded / (%2F)", format!("/x%2F{rest}")),
        refused("encoded \\ (%5c)", format!("/x%5c..%5c{rest}")),
        refused("encoded \\ (%5C)", format!("/x%5C{rest}")),
        refused("encoded NUL", format!("{p}%00")),
        refused("overlong dot %c0%ae", format!("/x/%c0%ae%c0%ae{p}")),
        refused("overlong dot %C0%AE", format!("/%C0%AE{p}")),
        refused("overlong slash %c0%af", format!("/x%c0%af{rest}")),
        refused("above the root /..", format!("/..{p}")),
        refused("above the root /%2e%2e", format!("/%2e%2e{p}")),
        refused("above the root /%2E%2E", format!("/%2E%2E{p}")),
        refused("above the root x/../..", format!("/x/../..{p}")),
        refused("bad escape %zz", format!("{p}%zz")),
        refused("truncated escape", format!("{p}%2")),
    ]
}

/// A connection from `local` speaking `proto`; `None` when the gateway refuses it.
async fn sender(gw: &TestGateway, proto: Proto, local: &str) -> Option<Sender> {
    match proto {
        Proto::H1 => {
            let tcp = try_connect_from(local, gw.plain).await.ok()?;
            let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .ok()?;
            tokio::spawn(conn);
            Some(Sender::H1(s))
        }
        Proto::H2 => {
            let tcp = try_connect_from(local, gw.tls).await.ok()?;
            let connector =
                tokio_rustls::TlsConnector::from(Arc::new(client_config(&gw.ca.ca_der, &[b"h2"])));
            let tls = connector
                .connect(ServerName::try_from("a.test").unwrap(), tcp)
                .await
                .ok()?;
            let (s, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .ok()?;
            tokio::spawn(conn);
            Some(Sender::H2(s))
        }
    }
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<TestBody>),
    H2(hyper::client::conn::http2::SendRequest<TestBody>),
}

/// Sends `method target` for host `a.test` on a fresh connection from `local`; the status,
/// or `None` when the connection was refused.
async fn send(
    gw: &TestGateway,
    proto: Proto,
    local: &str,
    method: &str,
    target: &str,
) -> Option<u16> {
    let mut s = sender(gw, proto, local).await?;
    let empty = || Empty::new().map_err(|e| match e {}).boxed();
    let resp = match &mut s {
        Sender::H1(s) => {
            let req = Request::builder()
                .method(method)
                .uri(target)
                .header("host", "a.test")
                .body(empty())
                .unwrap();
            s.send_request(req).await.ok()?
        }
        Sender::H2(s) => {
            let uri = Uri::builder()
                .scheme("https")
                .authority("a.test")
                .path_and_query(target)
                .build()
                .unwrap();
            let req = Request::builder()
                .method(method)
                .uri(uri)
                .body(empty())
                .unwrap();
            s.send_request(req).await.ok()?
        }
    };
    Some(resp.status().as_u16())
}

/// `127.{10 + proto}.{variant}.{role}`: a client of its own for each check.
fn client(proto: Proto, variant: usize, role: u8) -> String {
    let p = if proto == Proto::H1 { 10 } else { 11 };
    format!("127.{p}.{variant}.{role}")
}

fn office(proto: Proto, variant: usize) -> String {
    let p = if proto == Proto::H1 { 1 } else { 2 };
    format!("127.2.{p}.{variant}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_way_of_writing_a_protected_path_is_matched_as_the_upstream_reads_it() {
    let upstream = Upstream::start().await;
    let gw = spawn_gateway_with(upstream.addr, "", SITES, "").await;
    let up = &upstream;
    // Every variant rewrites at least one of the three paths (else it is "as is" again).
    let all = variants(PMA)
        .into_iter()
        .zip(variants(WP))
        .zip(variants(RPC));
    for ((pma, wp), rpc) in all.skip(1) {
        let changes = pma.target != PMA || wp.target != WP || rpc.target != RPC;
        assert!(changes, "variant {:?} changes nothing", pma.name);
    }
    assert!(variants(PMA).len() >= 30);
    for proto in [Proto::H1, Proto::H2] {
        for (i, _) in variants(PMA).iter().enumerate() {
            let (pma, wp, rpc) = (&variants(PMA)[i], &variants(WP)[i], &variants(RPC)[i]);
            let label = format!("{proto:?} {}", pma.name);
            let Some(want) = &pma.want else {
                // Refused: 400 for each, and the upstream never sees one.
                let before = up.count();
                for v in [pma, wp, rpc] {
                    let status = send(&gw, proto, &client(proto, i, 1), "GET", &v.target).await;
                    assert_eq!(status, Some(400), "{label}: {}", v.target);
                    let status = send(&gw, proto, &client(proto, i, 1), "POST", &v.target).await;
                    assert_eq!(status, Some(400), "{label}: POST {}", v.target);
                }
                assert_eq!(
                    up.count(),
                    before,
                    "{label}: a refused path reached the upstream"
                );
                continue;
            };

            // allow_only: outside the office 403 and nothing forwarded; inside, the
            // normalized path is what the upstream gets.
            let before = up.count();
            let status = send(&gw, proto, &client(proto, i, 1), "GET", &pma.target).await;
            assert_eq!(
                status,
                Some(403),
                "{label}: allow_only bypassed by {}",
                pma.target
            );
            assert_eq!(up.count(), before, "{label}: {}", pma.target);
            let status = send(&gw, proto, &office(proto, i), "GET", &pma.target).await;
            assert_eq!(status, Some(200), "{label}: {}", pma.target);
            assert_eq!(up.last(), Some(format!("GET {want}")), "{label}");

            // The jail: three failed logins, this way and the plain way mixed (one count for
            // the path however written), then the client is banned.
            let jailed = client(proto, i, 2);
            let wp_want = wp.want.as_deref().unwrap();
            for (target, want) in [
                (wp.target.as_str(), wp_want),
                (WP, WP),
                (wp.target.as_str(), wp_want),
            ] {
                let status = send(&gw, proto, &jailed, "POST", target).await;
                assert_eq!(status, Some(200), "{label}: {target}");
                assert_eq!(up.last(), Some(format!("POST {want}")), "{label}: {target}");
            }
            assert!(
                eventually(Duration::from_secs(3), || refused(&jailed, gw.plain)).await,
                "{label}: no ban after 3 POSTs to {}",
                wp.target
            );

            // The route rate limit (1/s, burst 1): the second request is 429.
            let limited = client(proto, i, 3);
            let status = send(&gw, proto, &limited, "GET", &rpc.target).await;
            assert_eq!(status, Some(200), "{label}: {}", rpc.target);
            assert_eq!(
                up.last(),
                Some(format!("GET {}", rpc.want.as_ref().unwrap()))
            );
            let before = up.count();
            // One bucket for the route however the path is written: the plain form and this
            // one are both 429 now.
            for target in [RPC, rpc.target.as_str()] {
                let status = send(&gw, proto, &limited, "GET", target).await;
                assert_eq!(
                    status,
                    Some(429),
                    "{label}: rate limit bypassed by {target}"
                );
            }
            assert_eq!(up.count(), before);
        }
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn ordinary_encoded_paths_and_queries_pass_unchanged() {
    let upstream = Upstream::start().await;
    let gw = spawn_gateway_with(upstream.addr, "", DEFAULT_SITES, "").await;
    for proto in [Proto::H1, Proto::H2] {
        for target in [
            "/caf%C3%A9",
            "/a%20b",
            "/search?q=%2e%2e%2f&x=%00",
            "/a%25b/",
            "/~user/",
        ] {
            let status = send(&gw, proto, "127.0.0.1", "GET", target).await;
            assert_eq!(status, Some(200), "{proto:?} {target}");
            assert_eq!(upstream.last(), Some(format!("GET {target}")), "{proto:?}");
        }
    }
    gw.shutdown().await;
}

async fn gateway() -> (Upstream, TestGateway) {
    let upstream = Upstream::start().await;
    let gw = spawn_gateway_with(
        upstream.addr,
        r#"trusted_proxies = ["127.9.0.0/16"]"#,
        SITES,
        "",
    )
    .await;
    (upstream, gw)
}

// Regression: `GET /%70hpmyadmin/` from outside the office list reached phpMyAdmin.
#[tokio::test]
async fn regression_percent_encoded_letter_does_not_pass_allow_only() {
    let (up, gw) = gateway().await;
    let head = "GET /%70hpmyadmin/ HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n";
    assert_eq!(raw_status(gw.plain, "127.0.0.5", head).await, Some(403));
    assert_eq!(up.count(), 0);
    gw.shutdown().await;
}

// Regression: `GET //phpmyadmin/` from outside the office list reached phpMyAdmin.
#[tokio::test]
async fn regression_double_slash_does_not_pass_allow_only() {
    let (up, gw) = gateway().await;
    let head = "GET //phpmyadmin/ HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n";
    assert_eq!(raw_status(gw.plain, "127.0.0.5", head).await, Some(403));
    assert_eq!(up.count(), 0);
    gw.shutdown().await;
}

// Regression: `GET /./phpmyadmin/` from outside the office list reached phpMyAdmin.
#[tokio::test]
async fn regression_dot_segment_does_not_pass_allow_only() {
    let (up, gw) = gateway().await;
    let head = "GET /./phpmyadmin/ HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n";
    assert_eq!(raw_status(gw.plain, "127.0.0.5", head).await, Some(403));
    assert_eq!(up.count(), 0);
    gw.shutdown().await;
}

// Regression: three `POST /wp-login%2ephp` answered like failed logins earned no ban.
#[tokio::test]
async fn regression_encoded_dot_in_a_jailed_path_is_counted() {
    let (up, gw) = gateway().await;
    for _ in 0..3 {
        assert_eq!(
            post_from(gw.plain, "127.0.0.6", "/wp-login%2ephp", "a.test").await,
            Some(200)
        );
    }
    assert_eq!(up.last().as_deref(), Some("POST /wp-login.php"));
    assert!(eventually(Duration::from_secs(3), || refused("127.0.0.6", gw.plain)).await);
    gw.shutdown().await;
}

// Regression: `Host: b.test.` (trailing dot) missed the allow_only site b.test and fell to `*`.
#[tokio::test]
async fn regression_trailing_dot_host_matches_its_site() {
    let (up, gw) = gateway().await;
    for host in ["b.test.", "B.TEST.", "b.test.:80"] {
        let head = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        assert_eq!(
            raw_status(gw.plain, "127.0.0.5", &head).await,
            Some(403),
            "{host}"
        );
    }
    assert_eq!(up.count(), 0);
    let head = "GET / HTTP/1.1\r\nHost: b.test.\r\nConnection: close\r\n\r\n";
    assert_eq!(raw_status(gw.plain, "127.2.0.5", head).await, Some(200));
    gw.shutdown().await;
}

// Regression: an HTTP/1.1 request without Host was forwarded with the upstream's Host.
#[tokio::test]
async fn regression_http11_without_host_is_400() {
    let (up, gw) = gateway().await;
    let head = "GET / HTTP/1.1\r\nConnection: close\r\n\r\n";
    assert_eq!(raw_status(gw.plain, "127.0.0.5", head).await, Some(400));
    // HTTP/1.0 may go without: it gets the upstream's.
    let head = "GET / HTTP/1.0\r\n\r\n";
    assert_eq!(raw_status(gw.plain, "127.0.0.5", head).await, Some(200));
    assert_eq!(up.count(), 1);
    gw.shutdown().await;
}

// Regression: two Host headers were accepted.
#[tokio::test]
async fn regression_two_host_headers_are_400() {
    let (up, gw) = gateway().await;
    let head = "GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n";
    assert_eq!(raw_status(gw.plain, "127.0.0.5", head).await, Some(400));
    assert_eq!(up.count(), 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn invalid_hosts_are_400() {
    let (up, gw) = gateway().await;
    for host in [
        "a.test:99999",
        "a..test",
        "user@a.test",
        "a.test, b.test",
        "[::1",
        "",
    ] {
        let head = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        assert_eq!(
            raw_status(gw.plain, "127.0.0.5", &head).await,
            Some(400),
            "{host:?}"
        );
    }
    // An absolute-form target and a Host that disagrees.
    let head = "GET http://b.test/ HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n";
    assert_eq!(raw_status(gw.plain, "127.0.0.5", head).await, Some(400));
    assert_eq!(up.count(), 0);
    gw.shutdown().await;
}

#[tokio::test]
async fn http2_authority_and_host_must_agree_and_paths_must_be_absolute() {
    let (up, gw) = gateway().await;
    let mut s = h2_sender(&gw).await;
    let req = |uri: Uri, host: Option<&str>| {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        b.body(Empty::new().map_err(|e| match e {}).boxed())
            .unwrap()
    };
    let uri: Uri = "https://a.test/".parse().unwrap();
    let resp = s
        .send_request(req(uri.clone(), Some("b.test")))
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = s.send_request(req(uri, Some("A.test."))).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(up.count(), 1);
    // A `:path` without its leading '/' (http::Uri cannot even build one: raw frames).
    let answer = raw_h2_answer(&gw, "phpmyadmin/").await;
    assert!(
        answer == RawH2::Status(400) || answer == RawH2::Reset(PROTOCOL_ERROR),
        "{answer:?}"
    );
    // The same frames with a proper path are served: the raw client itself works.
    assert_eq!(raw_h2_answer(&gw, "/").await, RawH2::Status(200));
    assert_eq!(up.count(), 2);
    gw.shutdown().await;
}

const PROTOCOL_ERROR: u32 = 1;

#[derive(Debug, PartialEq)]
enum RawH2 {
    Status(u16),
    Reset(u32),
    Nothing,
}

/// Sends one GET with the given `:path` as hand-made HTTP/2 frames (HPACK literals, no
/// Huffman) and reads the first answer on stream 1: the response status (read from the
/// static-table index the server uses for 200 and 400) or a RST_STREAM code.
async fn raw_h2_answer(gw: &TestGateway, path: &str) -> RawH2 {
    use tokio::io::AsyncReadExt;
    let mut tls = connect_tls(gw.tls, &gw.ca.ca_der, "a.test", &[b"h2"]).await;
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", "a.test"),
        (":path", path),
    ] {
        block.push(0x00);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS, empty
    let len = block.len() as u32;
    out.extend_from_slice(&[
        (len >> 16) as u8,
        (len >> 8) as u8,
        len as u8,
        1,
        0x5,
        0,
        0,
        0,
        1,
    ]);
    out.extend_from_slice(&block);
    tls.write_all(&out).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let mut head = [0u8; 9];
        let read = tokio::time::timeout_at(deadline, tls.read_exact(&mut head)).await;
        let Ok(Ok(_)) = read else {
            return RawH2::Nothing;
        };
        let len = (head[0] as usize) << 16 | (head[1] as usize) << 8 | head[2] as usize;
        let mut payload = vec![0u8; len];
        if tls.read_exact(&mut payload).await.is_err() {
            return RawH2::Nothing;
        }
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        match (head[3], stream) {
            (1, 1) => {
                // `:status` from the static table: index 8 is 200, 12 is 400.
                return match payload.first() {
                    Some(0x88) => RawH2::Status(200),
                    Some(0x8c) => RawH2::Status(400),
                    other => panic!("unexpected first header byte {other:?}"),
                };
            }
            (3, 1) => {
                return RawH2::Reset(u32::from_be_bytes([
                    payload[0], payload[1], payload[2], payload[3],
                ]))
            }
            (7, _) => {
                return RawH2::Reset(u32::from_be_bytes([
                    payload[4], payload[5], payload[6], payload[7],
                ]))
            }
            _ => {}
        }
    }
}

// Regression: an untrusted peer's `X-Forwarded-For: 6.6.6.6` was passed on with the peer
// appended, and Forwarded, True-Client-IP, CF-Connecting-IP and X-Client-IP untouched.
#[tokio::test]
async fn regression_an_untrusted_peer_cannot_name_itself_anyone() {
    let (_up, gw) = gateway().await;
    let spoofed = [
        ("x-forwarded-for", "6.6.6.6"),
        ("forwarded", "for=6.6.6.6"),
        ("true-client-ip", "6.6.6.6"),
        ("cf-connecting-ip", "6.6.6.6"),
        ("x-client-ip", "6.6.6.6"),
        ("x-cluster-client-ip", "6.6.6.6"),
        ("x-real-ip", "6.6.6.6"),
    ];
    let c = connect_from("127.0.0.7", gw.plain).await;
    let (status, body) = get_on(c, "/", "a.test", &spoofed).await;
    assert_eq!(status, 200);
    let echo = json(&body);
    assert_eq!(echoed(&echo, "x-forwarded-for"), Some("127.0.0.7"));
    assert_eq!(echoed(&echo, "x-real-ip"), Some("127.0.0.7"));
    for (name, _) in &spoofed[1..6] {
        assert_eq!(echoed(&echo, name), None, "{name} passed through");
    }
    assert!(!body.contains("6.6.6.6"), "{body}");
    gw.shutdown().await;
}

// Regression: from a trusted proxy, `X-Forwarded-For: 192.0.2.1:5678` was not understood,
// and the proxy itself became the client.
#[tokio::test]
async fn regression_forwarded_for_elements_with_ports_name_the_client() {
    let (_up, gw) = gateway().await;
    for (xff, client, passed) in [
        ("192.0.2.1:5678", "192.0.2.1", "192.0.2.1, 127.9.0.1"),
        ("[2001:db8::1]:443", "2001:db8::1", "2001:db8::1, 127.9.0.1"),
        (
            "6.6.6.6, 192.0.2.2:80, 127.9.0.2",
            "192.0.2.2",
            "192.0.2.2, 127.9.0.2, 127.9.0.1",
        ),
        ("::ffff:192.0.2.3", "192.0.2.3", "192.0.2.3, 127.9.0.1"),
    ] {
        let c = connect_from("127.9.0.1", gw.plain).await;
        let (status, body) = get_on(c, "/", "a.test", &[("x-forwarded-for", xff)]).await;
        assert_eq!(status, 200, "{xff}");
        let echo = json(&body);
        assert_eq!(echoed(&echo, "x-real-ip"), Some(client), "{xff}");
        // The believable part only, without ports: the client's own say is not passed on.
        assert_eq!(echoed(&echo, "x-forwarded-for"), Some(passed), "{xff}");
    }
    // A malformed element is 400: the proxy never becomes the client.
    for xff in [
        "unknown",
        "192.0.2.1:",
        "garbage, 127.9.0.2",
        "[2001:db8::1",
    ] {
        let head = format!(
            "GET / HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-For: {xff}\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(
            raw_status(gw.plain, "127.9.0.1", &head).await,
            Some(400),
            "{xff}"
        );
    }
    gw.shutdown().await;
}

// Regression: a trusted front proxy that named no client became the client: its users
// shared one rate-limit bucket, and one jail hit banned it for everybody.
#[tokio::test]
async fn regression_a_trusted_proxy_is_never_limited_or_jailed_for_its_clients() {
    let (_up, gw) = gateway().await;
    // No X-Forwarded-For from the proxy: many requests to the 1/s route, all served.
    for _ in 0..5 {
        let c = connect_from("127.9.0.1", gw.plain).await;
        let (status, _) = get_on(c, RPC, "a.test", &[]).await;
        assert_eq!(status, 200);
    }
    // And failed logins do not ban it.
    for _ in 0..4 {
        assert_eq!(
            post_from(gw.plain, "127.9.0.1", WP, "a.test").await,
            Some(200)
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        post_from(gw.plain, "127.9.0.1", WP, "a.test").await,
        Some(200)
    );
    // A client named through it is limited as itself.
    let through = |n| async move {
        let c = connect_from("127.9.0.1", gw.plain).await;
        get_on(c, RPC, "a.test", &[("x-forwarded-for", n)]).await.0
    };
    assert_eq!(through("192.0.2.50").await, 200);
    assert_eq!(through("192.0.2.50").await, 429);
    assert_eq!(through("192.0.2.51").await, 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn only_websocket_upgrades_pass_and_connect_is_405() {
    let (up, gw) = gateway().await;
    // h2c is dropped: the request is served as a plain request, without Upgrade.
    let c = connect_from("127.0.0.8", gw.plain).await;
    let (status, body) = get_on(
        c,
        "/",
        "a.test",
        &[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQAAP__"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    let echo = json(&body);
    assert_eq!(echoed(&echo, "upgrade"), None);
    assert_eq!(echoed(&echo, "http2-settings"), None);
    let before = up.count();
    let head = "CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\nConnection: close\r\n\r\n";
    assert_eq!(raw_status(gw.plain, "127.0.0.8", head).await, Some(405));
    assert_eq!(up.count(), before);
    gw.shutdown().await;
}

#[tokio::test]
async fn http2_cookies_reach_an_http11_upstream_as_one_header() {
    let (_up, gw) = gateway().await;
    let mut s = h2_sender(&gw).await;
    let req = Request::builder()
        .uri("https://a.test/")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(Empty::new().map_err(|e| match e {}).boxed())
        .unwrap();
    let resp = s.send_request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let echo = json(std::str::from_utf8(&body).unwrap());
    let cookies = echo["headers"]["cookie"].as_array().unwrap();
    assert_eq!(cookies.len(), 1, "{echo}");
    assert_eq!(cookies[0], "a=1; b=2");
    gw.shutdown().await;
}
