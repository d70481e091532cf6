//! Test harness: a real upstream on port 0, the real gateway on port 0 in front of it,
//! certificates from a throwaway CA, and real TLS, HTTP/1.1, HTTP/2 and raw clients.
#![allow(dead_code)]

pub mod cdp;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ipgate::config::Config;
use ipgate::Gateway;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_rustls::client::TlsStream;

pub type TestBody = BoxBody<Bytes, std::io::Error>;

// ------------------------------------------------------------------ certificates

/// A throwaway CA and leaf certificates signed by it, written as PEM files into `dir`.
pub struct TestCa {
    pub ca_der: CertificateDer<'static>,
    ca_cert: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl TestCa {
    pub fn new() -> TestCa {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ipgate test CA");
        let ca_cert = params.self_signed(&ca_key).unwrap();
        TestCa {
            ca_der: ca_cert.der().clone(),
            ca_cert,
            ca_key,
        }
    }

    /// The CA certificate, PEM.
    #[allow(dead_code)]
    pub fn ca_pem(&self) -> String {
        self.ca_cert.pem()
    }

    /// Writes `NAME.crt` (leaf + CA, like certbot's fullchain.pem) and `NAME.key`; returns
    /// the leaf's DER.
    pub fn issue(&self, dir: &Path, file: &str, names: &[&str]) -> CertificateDer<'static> {
        self.issue_until(dir, file, names, None)
    }

    /// `issue`, valid until `not_after` (year, month, day; midnight UTC) when given.
    pub fn issue_until(
        &self,
        dir: &Path,
        file: &str,
        names: &[&str],
        not_after: Option<(i32, u8, u8)>,
    ) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        if let Some((y, m, d)) = not_after {
            params.not_before = rcgen::date_time_ymd(2024, 1, 1);
            params.not_after = rcgen::date_time_ymd(y, m, d);
        }
        let cert = params.signed_by(&key, &self.ca_cert, &self.ca_key).unwrap();
        let chain = format!("{}{}", cert.pem(), self.ca_cert.pem());
        std::fs::write(dir.join(format!("{file}.crt")), chain).unwrap();
        std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
        cert.der().clone()
    }
}

// ------------------------------------------------------------------ upstream

/// A real HTTP/1.1 upstream on 127.0.0.1:0. Paths:
/// - `/big?n=BYTES`: streams BYTES of the pattern `i % 251`, in 64 KiB chunks;
/// - `/upload`: reads the whole body, answers `LEN SUM` (sum of bytes mod 2^32);
/// - `/slow?ms=N`: waits N ms, then echoes;
/// - `/drip`: sends `first`, waits 1.5 s, sends `second`;
/// - `/hop`: answers with hop-by-hop headers set;
/// - `/ws`: WebSocket echo;
/// - anything else: a JSON echo of method, path, version and headers.
pub struct Upstream {
    pub addr: SocketAddr,
    /// `METHOD target` of every request received, in order.
    pub seen: Arc<std::sync::Mutex<Vec<String>>>,
    /// Requests being handled now (from the head until the answer's head), and the most
    /// at once.
    pub busy: Arc<Busy>,
}

/// Requests an upstream is handling now, and the most it handled at once; the same for its
/// open connections.
#[derive(Default)]
pub struct Busy {
    now: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
    conns: Arc<Busy2>,
}

#[derive(Default)]
struct Busy2 {
    now: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
}

struct BusyGuard(Arc<Busy>);

impl Busy {
    fn enter(self: &Arc<Self>) -> BusyGuard {
        use std::sync::atomic::Ordering::SeqCst;
        let n = self.now.fetch_add(1, SeqCst) + 1;
        self.most.fetch_max(n, SeqCst);
        BusyGuard(self.clone())
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let busy: Arc<Busy> = Arc::default();
        let log = seen.clone();
        let counted = busy.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let log = log.clone();
                let counted = counted.clone();
                let conns = counted.conns.clone();
                {
                    use std::sync::atomic::Ordering::SeqCst;
                    let n = conns.now.fetch_add(1, SeqCst) + 1;
                    conns.most.fetch_max(n, SeqCst);
                }
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        log.lock()
                            .unwrap()
                            .push(format!("{} {}", req.method(), req.uri()));
                        let guard = counted.enter();
                        async move {
                            let resp = upstream_handle(req).await;
                            drop(guard);
                            resp
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .with_upgrades()
                        .await;
                    conns.now.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                });
            }
        });
        Upstream { addr, seen, busy }
    }

    /// Requests being handled now.
    pub fn in_flight(&self) -> usize {
        self.busy.now.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The most requests handled at once so far.
    pub fn most_in_flight(&self) -> usize {
        self.busy.most.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The most connections open to it at once so far.
    pub fn most_connections(&self) -> usize {
        self.busy
            .conns
            .most
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How many requests the upstream has received.
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// The last request the upstream received (`METHOD target`).
    pub fn last(&self) -> Option<String> {
        self.seen.lock().unwrap().last().cloned()
    }
}

fn full(body: impl Into<Bytes>) -> TestBody {
    Full::new(body.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn query_num(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

pub fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((offset + i) % 251) as u8)
        .collect()
}

async fn upstream_handle(mut req: Request<Incoming>) -> Result<Response<TestBody>, Infallible> {
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/big" => {
            let total = query_num(&req, "n").unwrap_or(1 << 20);
            let chunk = 64 * 1024u64;
            let stream = futures_util::stream::iter((0..total.div_ceil(chunk)).map(move |k| {
                let off = k * chunk;
                let len = chunk.min(total - off) as usize;
                Ok::<_, std::io::Error>(Frame::data(Bytes::from(pattern(off, len))))
            }));
            let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            resp.headers_mut()
                .insert("content-length", total.to_string().parse().unwrap());
            Ok(resp)
        }
        "/upload" => {
            let mut body = req.into_body();
            let (mut len, mut sum) = (0u64, 0u32);
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { break };
                if let Some(data) = frame.data_ref() {
                    len += data.len() as u64;
                    for b in data.iter() {
                        sum = sum.wrapping_add(*b as u32);
                    }
                }
            }
            Ok(Response::new(full(format!("{len} {sum}"))))
        }
        "/drip" => {
            let stream = futures_util::stream::unfold(0u8, |step| async move {
                match step {
                    0 => Some((Ok(Frame::data(Bytes::from_static(b"first"))), 1)),
                    1 => {
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                        Some((Ok(Frame::data(Bytes::from_static(b"second"))), 2))
                    }
                    _ => None,
                }
            });
            Ok(Response::new(BodyExt::boxed(StreamBody::new(stream))))
        }
        "/hop" => {
            let mut resp = Response::new(full("hop"));
            let h = resp.headers_mut();
            h.insert("connection", "x-up-hop".parse().unwrap());
            h.insert("x-up-hop", "secret".parse().unwrap());
            h.insert("keep-alive", "timeout=5".parse().unwrap());
            h.insert("x-up-end", "kept".parse().unwrap());
            Ok(resp)
        }
        "/ws" => {
            let key = req
                .headers()
                .get("sec-websocket-key")
                .cloned()
                .unwrap_or_else(|| "".parse().unwrap());
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(upgraded) = on_upgrade.await else {
                    return;
                };
                let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    tokio_tungstenite::tungstenite::protocol::Role::Server,
                    None,
                )
                .await;
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
            let accept =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            let resp = Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("upgrade", "websocket")
                .header("connection", "upgrade")
                .header("sec-websocket-accept", accept)
                .body(full(""))
                .unwrap();
            Ok(resp)
        }
        _ => {
            if path == "/slow" {
                let ms = query_num(&req, "ms").unwrap_or(1000);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let mut headers = serde_json::Map::new();
            for (name, value) in req.headers() {
                let entry = headers
                    .entry(name.as_str().to_string())
                    .or_insert_with(|| serde_json::Value::Array(vec![]));
                if let serde_json::Value::Array(a) = entry {
                    a.push(value.to_str().unwrap_or("?").into());
                }
            }
            let echo = serde_json::json!({
                "method": req.method().as_str(),
                "uri": req.uri().to_string(),
                "version": format!("{:?}", req.version()),
                "headers": headers,
            });
            Ok(Response::new(full(echo.to_string())))
        }
    }
}

// ------------------------------------------------------------------ gateway

/// A running gateway with its upstream and files.
pub struct TestGateway {
    /// Every client listener in config order (`plain` and `tls` are the first two).
    pub listeners: Vec<SocketAddr>,
    pub plain: SocketAddr,
    pub tls: SocketAddr,
    pub admin: SocketAddr,
    pub upstream: SocketAddr,
    /// The upstream the builder started, if it did (`seen`, `count()`).
    pub origin: Option<Upstream>,
    pub dir: tempfile::TempDir,
    pub ca: Arc<TestCa>,
    /// DER of the certificates for `a.test` and `b.test`.
    pub cert_a: CertificateDer<'static>,
    pub cert_b: CertificateDer<'static>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// The default sites: everything to the upstream.
/// WordPress's login jail with a short ban, escalating fast (2 s, then 10 s).
pub const WP_JAIL: &str = r#"
[[jail]]
name = "wp-login"
method = "POST"
path = "/wp-login.php"
status = [200]
hits = 3
window = "10m"
ban = "2s"
ban_factor = 5.0
max_ban = "1h"
"#;

/// One site for every host, watched by `WP_JAIL`.
pub const WP_SITE: &str = r#"
[[site]]
hosts = ["*"]
upstream = "http://{upstream}"
jails = ["wp-login"]
"#;

pub const DEFAULT_SITES: &str = r#"
[[site]]
hosts = ["*"]
upstream = "http://{upstream}"
"#;

/// A third client listener that expects a PROXY header (`listeners[2]`).
pub const PROXY_LISTENER: &str = "\n[[listener]]\naddr = \"127.0.0.1:0\"\nproxy_protocol = true\n";

// ------------------------------------------------------------------ building a gateway

/// The one way tests configure a gateway: in process (`spawn`) or as the binary
/// (`files().await`, then `GatewayFiles::start`). The base config has a plain and a TLS
/// listener, certificates for a.test (+localhost) and b.test (+*.wild.test), the admin
/// listener and the access log off. Defaults: DEFAULT_SITES, an `Upstream` started for it,
/// `workers` unset (one per CPU).
#[derive(Clone, Default)]
pub struct GatewayBuilder {
    gateway_keys: String,
    admin_keys: String,
    sites: Option<String>,
    extra: String,
    upstream: Option<SocketAddr>,
    workers: Option<usize>,
    access_log: bool,
    redirect_https: bool,
    cert_a_until: Option<(i32, u8, u8)>,
    ports: Option<(u16, u16)>,
    files: Vec<(PathBuf, Vec<u8>)>,
}

impl GatewayBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// `[[site]]` tables; `{upstream}` is replaced by the upstream's address.
    pub fn sites(mut self, sites: &str) -> Self {
        self.sites = Some(sites.to_string());
        self
    }

    /// More tables (lists, jails, limits, listeners), appended; `{upstream}` replaced too.
    pub fn extra(mut self, tables: &str) -> Self {
        self.extra.push_str(tables);
        self.extra.push('\n');
        self
    }

    /// More `[gateway]` keys (`trusted_proxies = [...]`, `default_ban = ...`), appended.
    /// More keys in `[admin]`.
    pub fn admin_keys(mut self, keys: &str) -> Self {
        self.admin_keys.push_str(keys);
        self.admin_keys.push('\n');
        self
    }

    pub fn gateway_keys(mut self, keys: &str) -> Self {
        self.gateway_keys.push_str(keys);
        self.gateway_keys.push('\n');
        self
    }

    /// An upstream the test started itself (a counting upstream, an app).
    pub fn upstream(mut self, addr: SocketAddr) -> Self {
        self.upstream = Some(addr);
        self
    }

    /// `[gateway] workers = n` (each worker has its own upstream pool).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = Some(n);
        self
    }

    /// Adds the `proxy_protocol` listener (`listeners[2]`).
    pub fn proxy_listener(self) -> Self {
        self.extra(PROXY_LISTENER)
    }

    /// The a.test certificate expires at midnight UTC of this day (default: year 4096).
    pub fn cert_a_until(mut self, day: (i32, u8, u8)) -> Self {
        self.cert_a_until = Some(day);
        self
    }

    /// The plain and TLS listeners on these loopback ports instead of free ones.
    pub fn ports(mut self, plain: u16, tls: u16) -> Self {
        self.ports = Some((plain, tls));
        self
    }

    /// `redirect_https = true` on the plain listener.
    pub fn redirect_https(mut self) -> Self {
        self.redirect_https = true;
        self
    }

    /// `[log] access = "stdout"` instead of "off".
    pub fn access_log(mut self, on: bool) -> Self {
        self.access_log = on;
        self
    }

    /// A file written into the gateway's dir before it starts (`lists/drop.txt`).
    pub fn file(mut self, relative: &str, text: &str) -> Self {
        self.files
            .push((PathBuf::from(relative), text.as_bytes().to_vec()));
        self
    }

    /// A copy of the file `from` (a test fixture) in the gateway's dir.
    pub fn copy(mut self, relative: &str, from: &Path) -> Self {
        let bytes = std::fs::read(from).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
        self.files.push((PathBuf::from(relative), bytes));
        self
    }

    /// The config text. Needs `.upstream(addr)`; `files()` sets it when it starts one.
    pub fn text(&self) -> String {
        let upstream = self
            .upstream
            .expect("GatewayBuilder::text needs .upstream(addr)");
        let workers = self
            .workers
            .map(|n| format!("workers = {n}\n"))
            .unwrap_or_default();
        let access = if self.access_log { "stdout" } else { "off" };
        let sites = self.sites.as_deref().unwrap_or(DEFAULT_SITES);
        format!(
            r#"
[gateway]
state_dir = "state"
{workers}{keys}
[[listener]]
addr = "127.0.0.1:{plain_port}"
tls = false
redirect_https = {redirect}

[[listener]]
addr = "127.0.0.1:{tls_port}"
tls = true

[tls]
certificates = [{{ cert = "a.crt", key = "a.key" }}, {{ cert = "b.crt", key = "b.key" }}]

[admin]
addr = "127.0.0.1:0"
token_file = "admin.token"
{admin_keys}
[log]
access = "{access}"

{extra}
{sites}
"#,
            keys = self.gateway_keys,
            admin_keys = self.admin_keys,
            extra = self.extra,
            redirect = self.redirect_https,
            plain_port = self.ports.map_or(0, |p| p.0),
            tls_port = self.ports.map_or(0, |p| p.1),
        )
        .replace("{upstream}", &upstream.to_string())
    }

    /// A temp dir with the CA's certificates for a.test (+localhost) and b.test
    /// (+*.wild.test), the extra files and `ipgate.toml`. Starts an `Upstream` when none was
    /// given.
    pub async fn files(mut self) -> GatewayFiles {
        let origin = match self.upstream {
            Some(_) => None,
            None => {
                let u = Upstream::start().await;
                self.upstream = Some(u.addr);
                Some(u)
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(TestCa::new());
        let cert_a = ca.issue_until(dir.path(), "a", &["a.test", "localhost"], self.cert_a_until);
        let cert_b = ca.issue(dir.path(), "b", &["b.test", "*.wild.test"]);
        for (relative, text) in &self.files {
            let p = dir.path().join(relative);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, text).unwrap();
        }
        let config = dir.path().join("ipgate.toml");
        std::fs::write(&config, self.text()).unwrap();
        GatewayFiles {
            upstream: self.upstream.unwrap(),
            dir,
            config,
            ca,
            cert_a,
            cert_b,
            origin,
        }
    }

    /// Starts the gateway in this process.
    pub async fn spawn(self) -> TestGateway {
        let f = self.files().await;
        let config =
            Config::load(&f.config).unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
        let gateway = Gateway::bind(config).await.unwrap();
        let addrs = gateway.listener_addrs();
        let admin = gateway.admin_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(gateway.run(async {
            let _ = stopped.await;
        }));
        TestGateway {
            listeners: addrs.clone(),
            plain: addrs[0],
            tls: addrs[1],
            admin,
            upstream: f.upstream,
            origin: f.origin,
            dir: f.dir,
            ca: f.ca,
            cert_a: f.cert_a,
            cert_b: f.cert_b,
            stop: Some(stop),
            task: Some(task),
        }
    }
}

/// The directory a gateway runs from (for the binary, or to edit and reload).
pub struct GatewayFiles {
    pub dir: tempfile::TempDir,
    /// `ipgate.toml` in `dir`.
    pub config: PathBuf,
    pub ca: Arc<TestCa>,
    pub cert_a: CertificateDer<'static>,
    pub cert_b: CertificateDer<'static>,
    pub upstream: SocketAddr,
    /// The upstream the builder started, if it did (`seen`, `count()`).
    pub origin: Option<Upstream>,
}

impl GatewayFiles {
    /// `ipgate run -c FILE` at log level `level`; it can be started again on the same files.
    pub fn start(&self, level: &str) -> BinaryGateway {
        self.start_with(level, None)
    }

    /// `start`, inside the network namespace `ns` (`ip netns exec NS ipgate run ...`).
    #[allow(dead_code)]
    pub fn start_in(&self, ns: &str, level: &str) -> BinaryGateway {
        self.start_with(level, Some(ns))
    }

    fn start_with(&self, level: &str, ns: Option<&str>) -> BinaryGateway {
        let (child, addrs, output) = start_binary_logged(&self.config, level, ns);
        BinaryGateway {
            child: Some(child),
            plain: addrs.plain,
            admin: addrs.admin,
            output,
        }
    }

    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("admin.token")
    }

    /// `ipgate ARGS --admin http://ADMIN --token-file ...`, the CLI against this gateway's
    /// admin API; inside network namespace `ns` when given.
    #[allow(dead_code)]
    pub fn cli(&self, admin: SocketAddr, ns: Option<&str>, args: &[&str]) -> std::process::Command {
        let mut c = match ns {
            Some(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_ipgate")]);
                c
            }
            None => std::process::Command::new(env!("CARGO_BIN_EXE_ipgate")),
        };
        c.args(args)
            .arg("--admin")
            .arg(format!("http://{admin}"))
            .arg("--token-file")
            .arg(self.token_file());
        c
    }
}

/// Whether the process `pid` still runs: a zombie (exited, not yet reaped by its parent)
/// has finished too.
pub fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

/// The process with this pid is killed when this is dropped: an upgraded gateway's new
/// process is not our child (it outlives the process that started it).
pub struct KillOnDrop(pub u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Only while it is still an ipgate (a pid is reused once its process is gone).
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", self.0)).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains(env!("CARGO_BIN_EXE_ipgate")) {
            return;
        }
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .status();
    }
}

/// A gateway process; killed on drop if it still runs (no orphan after a failed assert).
pub struct BinaryGateway {
    child: Option<std::process::Child>,
    pub plain: SocketAddr,
    pub admin: SocketAddr,
    /// Its stdout and stderr, together.
    pub output: Output,
}

impl BinaryGateway {
    /// The process's id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends a signal (`TERM`, `HUP`, `KILL`, ...) to the process.
    pub fn signal(&self, name: &str) {
        signal(self.child.as_ref().unwrap(), name)
    }

    /// Waits for the exit (off the runtime) and for stdout and stderr to be read to the end.
    pub async fn wait(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
            .await
            .unwrap();
        let out = self.output.clone();
        assert!(
            eventually(Duration::from_secs(5), || async { out.ended() }).await,
            "the process's output was not closed"
        );
        status
    }
}

impl Drop for BinaryGateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts an upstream and a gateway with the base config plus `sites` (with `{upstream}`
/// replaced) and `extra`: the shorthand for `GatewayBuilder::new().sites(..).extra(..)`.
pub async fn spawn_gateway(sites: &str, extra: &str) -> TestGateway {
    GatewayBuilder::new()
        .sites(sites)
        .extra(extra)
        .spawn()
        .await
}

/// The older four-argument form (`gateway`: more `[gateway]` keys), kept for tests/bypass.rs;
/// new tests use `GatewayBuilder`.
pub async fn spawn_gateway_with(
    upstream: SocketAddr,
    gateway: &str,
    sites: &str,
    extra: &str,
) -> TestGateway {
    GatewayBuilder::new()
        .upstream(upstream)
        .gateway_keys(gateway)
        .sites(sites)
        .extra(extra)
        .spawn()
        .await
}

impl TestGateway {
    /// Asks the gateway to stop and waits until it has.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// The config file the gateway was started with (`ipgate.toml` in its dir).
    pub fn config_path(&self) -> PathBuf {
        self.path().join("ipgate.toml")
    }

    pub async fn metrics(&self) -> String {
        let (status, body) = plain_get(self.admin, "/metrics", "localhost").await;
        assert_eq!(status, 200);
        body
    }

    /// Adds `tables` to the running gateway's config file (before `[log]`) and reloads it
    /// through the admin API; returns the HTTP status of the reload.
    pub async fn reload_with(&self, tables: &str) -> u16 {
        let path = self.config_path();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("[log]", &format!("{tables}\n[log]"))).unwrap();
        admin_call(self.admin, "POST", "/v1/reload", None, Some(&self.token()))
            .await
            .0
    }

    /// The value of `sample` once it equals `want`, else its last value after 5 s. For
    /// counters the gateway bumps just after the client has seen the connection end.
    pub async fn metric_settled(&self, sample: &str, want: f64) -> Option<f64> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let last = metric(&self.metrics().await, sample);
            if last == Some(want) || std::time::Instant::now() > deadline {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

// ------------------------------------------------------------------ clients

pub fn client_config(ca: &CertificateDer<'static>, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg
}

/// A verified TLS connection to `addr` for `sni`.
pub async fn connect_tls(
    addr: SocketAddr,
    ca: &CertificateDer<'static>,
    sni: &str,
    alpn: &[&[u8]],
) -> TlsStream<TcpStream> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(ca, alpn)));
    let tcp = TcpStream::connect(addr).await.unwrap();
    connector
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
        .unwrap()
}

/// Sends one request over a fresh HTTP/1.1-over-TLS connection; returns the response with
/// its body read whole.
pub async fn https_request(
    gw: &TestGateway,
    req: Request<TestBody>,
) -> (http::response::Parts, Bytes) {
    let tls = connect_tls(gw.tls, &gw.ca.ca_der, "a.test", &[b"http/1.1"]).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts, body)
}

pub fn get(uri: &str, host: &str) -> Request<TestBody> {
    Request::builder()
        .uri(uri)
        .header("host", host)
        .body(full(""))
        .unwrap()
}

/// GET over HTTPS with Host `a.test`; status and body as text.
pub async fn https_get(gw: &TestGateway, path: &str) -> (u16, String) {
    let (parts, body) = https_request(gw, get(path, "a.test")).await;
    (
        parts.status.as_u16(),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// GET over plain HTTP/1.1; status and body as text.
pub async fn plain_get(addr: SocketAddr, path: &str, host: &str) -> (u16, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sender.send_request(get(path, host)).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// An HTTP/2 connection over TLS (ALPN h2).
pub async fn h2_sender(gw: &TestGateway) -> hyper::client::conn::http2::SendRequest<TestBody> {
    let tls = connect_tls(gw.tls, &gw.ca.ca_der, "a.test", &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

/// Writes raw bytes, then reads until the server closes or `wait` passes.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], wait: Duration) -> Vec<u8> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let _ = tcp.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, tcp.read_to_end(&mut out)).await;
    out
}

pub fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// The first value of a header in an upstream echo.
pub fn echoed<'a>(echo: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    echo["headers"][name][0].as_str()
}

/// A free loopback port nobody listens on (bound, then released).
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

/// The value of a sample line in a Prometheus exposition, e.g.
/// `ipgate_requests_total{outcome="proxied",site="*"}`.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
}

// ------------------------------------------------------------------ the binary

/// Addresses a gateway process reported in its log.
struct ProcessAddrs {
    plain: SocketAddr,
    admin: SocketAddr,
}

/// Everything a gateway process wrote, line by line, as it runs.
#[derive(Clone, Default)]
pub struct Output(
    Arc<std::sync::Mutex<String>>,
    Arc<std::sync::atomic::AtomicUsize>,
);

impl Output {
    pub fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }

    /// Whether stdout and stderr have both been read to their end (the process closed them).
    pub fn ended(&self) -> bool {
        self.1.load(std::sync::atomic::Ordering::SeqCst) == 2
    }

    fn push(&self, line: &str) {
        let mut s = self.0.lock().unwrap();
        s.push_str(line);
        s.push('\n');
    }

    fn end(&self) {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Starts `ipgate run -c FILE` at log level `level`, keeping stdout and stderr (together);
/// returns the child and the addresses of its plain listener and admin listener, read from
/// its log lines. Used by `GatewayFiles::start`.
fn start_binary_logged(
    config: &Path,
    level: &str,
    ns: Option<&str>,
) -> (std::process::Child, ProcessAddrs, Output) {
    use std::io::{BufRead, BufReader};
    let mut command = match ns {
        Some(ns) => {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_ipgate")]);
            c
        }
        None => std::process::Command::new(env!("CARGO_BIN_EXE_ipgate")),
    };
    let mut child = command
        .args(["run", "-c"])
        .arg(config)
        .env("RUST_LOG", level)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let output = Output::default();
    let stdout = child.stdout.take().unwrap();
    let out = output.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            out.push(&line);
        }
        out.end();
    });
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let out = output.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            out.push(&line);
            let addr = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .and_then(|a| a.parse::<SocketAddr>().ok());
            if let Some(addr) = addr {
                if line.contains("admin listening") {
                    let _ = tx.send(("admin", addr));
                } else if line.contains("listening") && line.contains("tls=false") {
                    let _ = tx.send(("plain", addr));
                }
            }
        }
        out.end();
    });
    let (mut plain, mut admin) = (None, None);
    while plain.is_none() || admin.is_none() {
        let (kind, addr) = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|e| {
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "gateway did not report its addresses ({e}):\n{}",
                    output.text()
                )
            });
        if kind == "plain" {
            plain = Some(addr);
        } else {
            admin = Some(addr);
        }
    }
    (
        child,
        ProcessAddrs {
            plain: plain.unwrap(),
            admin: admin.unwrap(),
        },
        output,
    )
}

/// Sends a signal (`TERM`, `HUP`, ...) to a child process we started.
pub fn signal(child: &std::process::Child, name: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

/// Polls `check` every 50 ms until it holds or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ------------------------------------------------------------------ clients by address

/// A TCP connection from a chosen loopback address (127.0.0.x plays distinct clients).
pub async fn connect_from(local: &str, addr: SocketAddr) -> TcpStream {
    try_connect_from(local, addr).await.unwrap()
}

/// Like `connect_from`, for a client the gateway may refuse (reset) at accept.
pub async fn try_connect_from(local: &str, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await
}

/// Whether the server closed the connection without sending a single byte, after we sent
/// `first` (a ClientHello or a request head).
pub async fn closed_without_a_byte(mut tcp: TcpStream, first: &[u8]) -> bool {
    let _ = tcp.write_all(first).await;
    let mut buf = [0u8; 16];
    match tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => false,
        Err(_) => false,
    }
}

/// GET over plain HTTP/1.1 on an established stream, with extra headers.
pub async fn get_on(
    tcp: TcpStream,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = get(path, host);
    for (k, v) in headers {
        req.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// GET over TLS from a chosen loopback address.
pub async fn https_get_from(gw: &TestGateway, local: &str, path: &str) -> (u16, String) {
    let tcp = connect_from(local, gw.tls).await;
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(client_config(&gw.ca.ca_der, &[b"http/1.1"])));
    let tls = connector
        .connect(ServerName::try_from("a.test").unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sender.send_request(get(path, "a.test")).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Calls the admin API; `token` None sends no Authorization header.
pub async fn admin_call(
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    let tcp = TcpStream::connect(admin).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", admin.to_string());
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req
        .body(full(body.map(|b| b.to_string()).unwrap_or_default()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, value)
}

impl TestGateway {
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("admin.token"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// Runs the `ipgate` binary's admin command against this gateway (without blocking the
    /// runtime the gateway runs on).
    pub async fn cli(&self, args: &[&str]) -> std::process::Output {
        let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_ipgate"))
            .args(args)
            .arg("--admin")
            .arg(format!("http://{}", self.admin))
            .arg("--token-file")
            .arg(self.dir.path().join("admin.token"))
            .output();
        tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("CLI did not finish")
            .unwrap()
    }
}

/// A POST with a small body on a fresh plain connection from `local`; the status, or None
/// when the gateway closed the connection (blocked).
pub async fn post_from(addr: SocketAddr, local: &str, path: &str, host: &str) -> Option<u16> {
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 9\r\nConnection: close\r\n\r\nlog=admin"
    );
    raw_status(addr, local, &req).await
}

/// Reads until the server closes the connection (FIN or reset). Panics when it neither
/// answers in full nor closes within 3 s: "closed" and "hung" must not look alike.
pub async fn read_until_closed(tcp: &mut TcpStream, out: &mut Vec<u8>) {
    let r = tokio::time::timeout(Duration::from_secs(3), tcp.read_to_end(out)).await;
    assert!(
        r.is_ok(),
        "the gateway neither answered nor closed within 3 s (got {} bytes)",
        out.len()
    );
}

/// One raw HTTP/1.x exchange on a fresh plain connection from `local`: `head` is sent and
/// the answer read until the gateway closes. Its status; `None` when the connection was
/// refused (reset at connect or on write) or closed without an answer.
pub async fn raw_status(addr: SocketAddr, local: &str, head: &str) -> Option<u16> {
    let mut tcp = try_connect_from(local, addr).await.ok()?;
    tcp.write_all(head.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    read_until_closed(&mut tcp, &mut out).await;
    status_of(&String::from_utf8_lossy(&out))
}

/// Whether a plain `GET /` for a.test from `local` is answered 200 (false when refused).
pub async fn served_from(local: &str, addr: SocketAddr) -> bool {
    let head = "GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n";
    raw_status(addr, local, head).await == Some(200)
}

/// The first bytes of a TLS ClientHello: enough for a server to start a handshake.
pub const CLIENT_HELLO_START: &[u8] = &[0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x03];

/// Whether a plain request from `local` is refused at accept (closed without a byte).
pub async fn refused(local: &str, addr: SocketAddr) -> bool {
    refused_with(local, addr, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").await
}

/// Whether a connection from `local` is closed without a byte after sending `first`. The
/// gateway resets refused connections, and the reset may already fail the connect.
pub async fn refused_with(local: &str, addr: SocketAddr, first: &[u8]) -> bool {
    match try_connect_from(local, addr).await {
        Ok(tcp) => closed_without_a_byte(tcp, first).await,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

// ------------------------------------------------------------------ PROXY protocol

/// A PROXY v1 TCP4 line naming `src` as the client.
pub fn proxy_v1(src: &str) -> Vec<u8> {
    format!("PROXY TCP4 {src} 192.0.2.1 40000 443\r\n").into_bytes()
}

/// A PROXY v2 PROXY/STREAM header from `src` to `dst` (TCP4 or TCP6 by the addresses).
pub fn proxy_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (src, dst),
    )
    .build()
    .unwrap()
}

/// A PROXY v2 LOCAL header (a health check: the peer itself is the client).
pub fn proxy_v2_local() -> Vec<u8> {
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Local,
        ppp::v2::Protocol::Unspecified,
        ppp::v2::Addresses::Unspecified,
    )
    .build()
    .unwrap()
}

/// Sends `header` then `request` on one connection from `from`; the raw answer, "" when the
/// gateway closed without a byte.
pub async fn through_proxy_request(
    from: &str,
    addr: SocketAddr,
    header: &[u8],
    request: &str,
) -> String {
    let mut tcp = connect_from(from, addr).await;
    let mut data = header.to_vec();
    data.extend_from_slice(request.as_bytes());
    let _ = tcp.write_all(&data).await;
    let mut out = Vec::new();
    read_until_closed(&mut tcp, &mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// `GET /who` for a.test behind `header`; the raw answer.
pub async fn through_proxy(from: &str, addr: SocketAddr, header: &[u8]) -> String {
    through_proxy_request(
        from,
        addr,
        header,
        "GET /who HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    )
    .await
}

/// The status code of a raw HTTP/1.x answer.
pub fn status_of(answer: &str) -> Option<u16> {
    answer.get(9..12)?.parse().ok()
}

// ------------------------------------------------------------------ the challenge

/// The puzzle a challenge page carries: (verify URL without the nonce, signature, bits).
pub fn puzzle(html: &str) -> (String, String, u8) {
    let open = r#"<script type="application/json" id="ipgate-puzzle">"#;
    let start = html.find(open).expect("a challenge page") + open.len();
    let end = start + html[start..].find("</script>").unwrap();
    let p: serde_json::Value = serde_json::from_str(&html[start..end]).unwrap();
    let url = format!("{}?{}", p["v"].as_str().unwrap(), p["c"].as_str().unwrap());
    (
        url,
        p["h"].as_str().unwrap().into(),
        p["d"].as_u64().unwrap() as u8,
    )
}

/// What the page's script computes: the verify URL with the nonce that solves the puzzle.
pub fn solution(html: &str) -> String {
    let (url, sig, bits) = puzzle(html);
    format!("{url}&n={}", ipgate::decide::challenge::solve(&sig, bits))
}

/// A free loopback port (bound, then released).
/// A free port below Linux's ephemeral range (32768-60999), for a server that must be told
/// its port before it starts (Pebble validates on it). A port from the ephemeral range could
/// be taken meanwhile as the local port of some test's outgoing connection, and the bind would
/// then fail (seen in CI).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id() ^ (ipgate::decide::clock::now_ms() as u32);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (seed.wrapping_add(n.wrapping_mul(7919)) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}
