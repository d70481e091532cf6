//! Lists fetched from a URL (feeds), against a real HTTP server this test runs on loopback:
//! a list taken, a 304 that keeps it (the validators sent), a truncated JSON body, a list
//! shrunk by 90 % and an HTML error page served with 200, each refused with the last good
//! copy serving, then a new list taken; a restart with the feed server gone serves the last
//! good copy. Over HTTPS: the feed's own CA (`ca_file`), a FireHOL-like netset with its
//! private and reserved ranges dropped (`except`), a prefix wider than `max_prefix` refused.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What the feed server answers on a path: status, content type, ETag, body. A request
/// whose If-None-Match is the ETag gets a 304.
#[derive(Clone)]
struct Answer {
    status: u16,
    content_type: &'static str,
    etag: String,
    body: String,
}

#[derive(Default)]
struct Script {
    answers: HashMap<String, Answer>,
    /// Every request's path and headers, in order.
    seen: Vec<(String, HeaderMap)>,
}

/// A real HTTP/1.1 server (over TLS when given a config) serving the script.
struct FeedServer {
    addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    task: tokio::task::JoinHandle<()>,
}

const LAST_MODIFIED: &str = "Mon, 07 Dec 2026 03:00:00 GMT";

impl FeedServer {
    async fn start(tls: Option<Arc<rustls::ServerConfig>>) -> FeedServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let script: Arc<Mutex<Script>> = Arc::default();
        let shared = script.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let script = shared.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let resp = answer(&script, &req);
                        async move { Ok::<_, std::convert::Infallible>(resp) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        Some(cfg) => {
                            let Ok(stream) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await
                            else {
                                return;
                            };
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(tcp), service).await;
                        }
                    }
                });
            }
        });
        FeedServer { addr, script, task }
    }

    fn serve(&self, path: &str, status: u16, content_type: &'static str, etag: &str, body: &str) {
        self.script.lock().unwrap().answers.insert(
            path.to_string(),
            Answer {
                status,
                content_type,
                etag: format!("\"{etag}\""),
                body: body.to_string(),
            },
        );
    }

    fn requests(&self) -> usize {
        self.script.lock().unwrap().seen.len()
    }

    fn last_request(&self) -> HeaderMap {
        self.script.lock().unwrap().seen.last().unwrap().1.clone()
    }
}

impl Drop for FeedServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(script: &Mutex<Script>, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let mut s = script.lock().unwrap();
    let path = req.uri().path().to_string();
    s.seen.push((path.clone(), req.headers().clone()));
    let Some(a) = s.answers.get(&path).cloned() else {
        return Response::builder()
            .status(404)
            .body(Full::default())
            .unwrap();
    };
    let unchanged = req
        .headers()
        .get("if-none-match")
        .is_some_and(|v| v.as_bytes() == a.etag.as_bytes());
    let resp = Response::builder()
        .header("etag", &a.etag)
        .header("last-modified", LAST_MODIFIED);
    if unchanged && a.status == 200 {
        return resp.status(304).body(Full::default()).unwrap();
    }
    if (300..400).contains(&a.status) {
        return resp
            .status(a.status)
            .header("location", a.body)
            .body(Full::default())
            .unwrap();
    }
    resp.status(a.status)
        .header("content-type", a.content_type)
        .body(Full::new(Bytes::from(a.body)))
        .unwrap()
}

/// `first` and 19 more single addresses in 127.0.30.0/24: twenty entries.
fn list_of_twenty(first: &str) -> String {
    let mut text = format!("# a test feed\n{first}\n");
    for i in 1..20 {
        text.push_str(&format!("127.0.30.{i} ; entry {i}\n"));
    }
    text
}

async fn metric_of(admin: SocketAddr, sample: &str) -> f64 {
    let (_, text) = plain_get(admin, "/metrics", &admin.to_string()).await;
    metric(&text, sample).unwrap_or(0.0)
}

/// Waits until the sample reaches `at_least` (the fetch loop runs every second).
async fn reaches(admin: SocketAddr, sample: &str, at_least: f64) {
    let ok = eventually(Duration::from_secs(15), || async {
        metric_of(admin, sample).await >= at_least
    })
    .await;
    assert!(ok, "{sample} did not reach {at_least}");
}

/// The list and targets that `lookup` says block `ip`.
async fn lookup_block(admin: SocketAddr, token: &str, ip: &str) -> Option<String> {
    let (code, v) = admin_call(admin, "GET", &format!("/v1/ips/{ip}"), None, Some(token)).await;
    assert_eq!(code, 200, "{v}");
    (v["decision"] == "block").then(|| v["rule"]["list"].as_str().unwrap_or("").to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_is_taken_whole_or_refused_and_the_last_good_copy_serves_across_a_restart() {
    let server = FeedServer::start(None).await;
    let lists = format!(
        "[lists.drop]\naction = \"block\"\nurl = \"http://{}/drop.txt\"\nrefresh = \"1s\"\n",
        server.addr
    );
    let files = GatewayBuilder::new().extra(&lists).files().await;
    let token_file = files.token_file();
    let gw = files.start("info");
    let token = std::fs::read_to_string(&token_file).unwrap();
    let token = token.trim();
    let (admin, plain) = (gw.admin, gw.plain);
    let fetches =
        |result: &str| format!("ipgate_feed_fetches_total{{list=\"drop\",result=\"{result}\"}}");
    let errors =
        |reason: &str| format!("ipgate_feed_errors_total{{list=\"drop\",reason=\"{reason}\"}}");

    // 1. A list: its addresses are refused at accept; others are served.
    server.serve(
        "/drop.txt",
        200,
        "text/plain",
        "v1",
        &list_of_twenty("127.0.20.0/24"),
    );
    assert!(
        eventually(Duration::from_secs(15), || refused("127.0.20.5", plain)).await,
        "the feed's list was not taken"
    );
    assert_eq!(
        lookup_block(admin, token, "127.0.20.5").await.as_deref(),
        Some("drop")
    );
    let (_, v) = admin_call(admin, "GET", "/v1/ips/127.0.20.5", None, Some(token)).await;
    assert_eq!(v["config_entries"][0]["target"], "127.0.20.0/24", "{v}");
    assert_eq!(v["config_entries"][0]["source"], "feed", "{v}");
    assert!(served_from("127.0.40.1", plain).await);

    // 2. Unchanged: the server answers 304 to the validators; nothing is parsed again.
    reaches(admin, &fetches("not_modified"), 1.0).await;
    let asked = server.last_request();
    assert_eq!(asked["if-none-match"], "\"v1\"");
    assert_eq!(asked["if-modified-since"], LAST_MODIFIED);
    assert_eq!(metric_of(admin, &fetches("updated")).await, 1.0);
    assert!(refused("127.0.20.5", plain).await);

    // 3. Truncated Spamhaus JSON: refused, the copy stays.
    let json =
        "{\"cidr\":\"127.0.22.0/24\",\"sblid\":\"SBL1\",\"rir\":\"ripencc\"}\n{\"cidr\":\"127.0.2";
    server.serve("/drop.txt", 200, "application/json", "v2", json);
    reaches(admin, &errors("parse"), 1.0).await;
    assert!(refused("127.0.20.5", plain).await);
    assert!(served_from("127.0.22.5", plain).await);

    // 4. Shrunk by 90 % (2 entries of 20): refused.
    server.serve(
        "/drop.txt",
        200,
        "text/plain",
        "v3",
        "127.0.30.1\n127.0.30.2\n",
    );
    reaches(admin, &errors("shrink"), 1.0).await;
    assert!(refused("127.0.20.5", plain).await);
    assert!(refused("127.0.30.3", plain).await);

    // 5. An error page served with 200: refused.
    let page = "<!DOCTYPE html><html><body><h1>Service Unavailable</h1></body></html>\n";
    server.serve("/drop.txt", 200, "text/html; charset=utf-8", "v4", page);
    reaches(admin, &errors("parse"), 2.0).await;
    assert!(refused("127.0.20.5", plain).await);
    assert_eq!(
        lookup_block(admin, token, "127.0.20.5").await.as_deref(),
        Some("drop")
    );

    // 6. A new valid list replaces the copy in one swap.
    server.serve(
        "/drop.txt",
        200,
        "text/plain",
        "v5",
        &list_of_twenty("127.0.21.0/24"),
    );
    assert!(
        eventually(Duration::from_secs(15), || refused("127.0.21.5", plain)).await,
        "the new list was not taken"
    );
    assert!(served_from("127.0.20.5", plain).await);
    assert_eq!(lookup_block(admin, token, "127.0.20.5").await, None);
    assert_eq!(
        lookup_block(admin, token, "127.0.21.5").await.as_deref(),
        Some("drop")
    );
    assert_eq!(metric_of(admin, &fetches("updated")).await, 2.0);
    assert!(metric_of(admin, "ipgate_feed_age_seconds{list=\"drop\"}").await < 5.0);

    // A restart with the feed server gone: the last good copy serves from the start.
    gw.signal("TERM");
    assert!(gw.wait().await.success());
    drop(server);
    let gw = files.start("info");
    assert!(
        refused("127.0.21.5", gw.plain).await,
        "the last good copy did not serve"
    );
    reaches(gw.admin, &errors("connect"), 1.0).await;
    assert!(refused("127.0.21.5", gw.plain).await);
    assert!(served_from("127.0.20.5", gw.plain).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_feed_trusts_its_ca_file_drops_except_and_refuses_wide_prefixes() {
    let ca = TestCa::new();
    let certs = tempfile::tempdir().unwrap();
    ca.issue(certs.path(), "feed", &["localhost"]);
    let tls = {
        use rustls::pki_types::pem::PemObject;
        let chain = rustls::pki_types::CertificateDer::pem_file_iter(certs.path().join("feed.crt"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_file(certs.path().join("feed.key")).unwrap();
        rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap()
    };
    let server = FeedServer::start(Some(Arc::new(tls))).await;
    // FireHOL level1 holds private, multicast and reserved ranges; 224.0.0.0/3 is wider than
    // /8. 127.0.0.0/9 plays the operator's own network, and 127.0.0.0/8 a wider entry that
    // covers it (dropped whole, or it would block the operator).
    let level1 =
        "#\n# firehol_level1\n#\n10.0.0.0/8\n127.0.0.0/8\n127.0.0.0/9\n127.200.0.0/24\n224.0.0.0/3\n";
    server.serve("/level1.netset", 200, "text/plain", "n1", level1);
    server.serve(
        "/wide.txt",
        200,
        "text/plain",
        "w1",
        "0.0.0.0/1\n127.210.0.0/24\n",
    );
    // An HTTPS feed that redirects to plain HTTP on this machine: never followed.
    let plain = FeedServer::start(None).await;
    plain.serve("/drop.txt", 200, "text/plain", "p1", "127.220.0.0/24\n");
    let to_plain = format!("http://{}/drop.txt", plain.addr);
    server.serve("/moved", 302, "text/plain", "m1", &to_plain);
    let port = server.addr.port();
    let lists = format!(
        r#"
[lists.level1]
action = "block"
url = "https://localhost:{port}/level1.netset"
ca_file = "feed-ca.pem"
refresh = "1s"
except = ["10.0.0.0/8", "127.0.0.0/9", "224.0.0.0/3"]

[lists.untrusted]
action = "block"
url = "https://localhost:{port}/level1.netset"
refresh = "1s"

[lists.wide]
action = "block"
url = "https://localhost:{port}/wide.txt"
ca_file = "feed-ca.pem"
refresh = "1s"

[lists.moved]
action = "block"
url = "https://localhost:{port}/moved"
ca_file = "feed-ca.pem"
refresh = "1s"
"#
    );
    let gw = GatewayBuilder::new()
        .extra(&lists)
        .file("feed-ca.pem", &ca.ca_pem())
        .spawn()
        .await;
    assert!(
        eventually(Duration::from_secs(15), || refused("127.200.0.5", gw.plain)).await,
        "the HTTPS feed was not taken"
    );
    // The dropped ranges block nobody: without `except` this client would be refused.
    assert!(served_from("127.0.60.1", gw.plain).await);
    let lookup = gw.cli(&["lookup", "127.0.60.1", "--json"]).await;
    assert!(!String::from_utf8_lossy(&lookup.stdout).contains("level1"));
    // Without ca_file the system's CAs do not know the test CA: refused, nothing taken.
    reaches(
        gw.admin,
        "ipgate_feed_errors_total{list=\"untrusted\",reason=\"tls\"}",
        1.0,
    )
    .await;
    // The redirect from HTTPS to plain HTTP is refused; the plain server is never asked.
    reaches(
        gw.admin,
        "ipgate_feed_errors_total{list=\"moved\",reason=\"status\"}",
        1.0,
    )
    .await;
    assert_eq!(plain.requests(), 0);
    assert!(served_from("127.220.0.5", gw.plain).await);
    // A /1 is wider than max_prefix (/8): the whole feed is refused.
    reaches(
        gw.admin,
        "ipgate_feed_errors_total{list=\"wide\",reason=\"prefix\"}",
        1.0,
    )
    .await;
    assert!(served_from("127.210.0.5", gw.plain).await);
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "ipgate_list_entries{kind=\"static\",list=\"level1\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "ipgate_list_entries{kind=\"static\",list=\"untrusted\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(&m, "ipgate_feed_refresh_seconds{list=\"level1\"}"),
        Some(1.0)
    );
    assert!(server.requests() >= 2);
}

#[test]
fn feed_keys_are_checked_by_name() {
    let check = |list: &str| {
        let text = format!(
            "[[listener]]\naddr = \"127.0.0.1:0\"\n[[site]]\nhosts = [\"*\"]\nupstream = \"http://127.0.0.1:9\"\n{list}"
        );
        match ipgate::config::Config::parse(std::path::Path::new("ipgate.toml"), &text) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    };
    assert_eq!(check("[lists.a]\naction = \"block\"\nurl = \"https://feeds.test/a.txt\"\nmax_shrink = \"20%\"\nmax_prefix = \"/12\""), "");
    let allow = check("[lists.a]\naction = \"allow\"\nurl = \"https://feeds.test/a.txt\"");
    assert!(
        allow.contains("lists.a.url") && allow.contains("allow list"),
        "{allow}"
    );
    let plain = check("[lists.a]\naction = \"block\"\nurl = \"http://feeds.test/a.txt\"");
    assert!(
        plain.contains("lists.a.url") && plain.contains("loopback"),
        "{plain}"
    );
    let stray = check("[lists.a]\naction = \"block\"\nentries = [\"192.0.2.1\"]\nrefresh = \"1h\"");
    assert!(stray.contains("lists.a.refresh"), "{stray}");
    let shrink =
        check("[lists.a]\naction = \"block\"\nurl = \"https://feeds.test/a\"\nmax_shrink = 150");
    assert!(shrink.contains("lists.a.max_shrink"), "{shrink}");
    let name = check("[lists.\"../x\"]\naction = \"block\"\nurl = \"https://feeds.test/a\"");
    assert!(name.contains("file"), "{name}");
}
