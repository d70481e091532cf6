//! Certificates from a real ACME CA: Debian's Pebble, with pebble-challtestsrv as its DNS,
//! validating through ipgate's own listeners.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

/// Pebble and its DNS server, on free ports; both killed on drop.
struct Pebble {
    processes: Vec<Child>,
    _dir: tempfile::TempDir,
    /// The ACME directory URL.
    directory: String,
    /// Pebble's own listener certificate (what ipgate's `acme.ca_file` trusts).
    ca_file: PathBuf,
    management: u16,
}

impl Pebble {
    /// Validates HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port` (ipgate's listeners);
    /// certificates live `validity` seconds when given (Pebble's default: 5 years).
    fn start(http_port: u16, tls_port: u16, validity: Option<u64>) -> Pebble {
        for bin in ["pebble", "pebble-challtestsrv"] {
            assert!(
                Command::new("sh")
                    .args(["-c", &format!("command -v {bin}")])
                    .stdout(Stdio::null())
                    .status()
                    .unwrap()
                    .success(),
                "{bin} is not installed: scripts/test installs Debian's pebble package"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        let ca_file = dir.path().join("pebble.crt");
        std::fs::write(&ca_file, ck.cert.pem()).unwrap();
        std::fs::write(dir.path().join("pebble.key"), ck.key_pair.serialize_pem()).unwrap();
        let (acme, management, dns, dns_management) =
            (free_port(), free_port(), free_port(), free_port());
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{acme}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": ca_file,
            "privateKey": dir.path().join("pebble.key"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "certificateValidityPeriod": validity.unwrap_or(0),
        }});
        let config_file = dir.path().join("pebble.json");
        std::fs::write(&config_file, config.to_string()).unwrap();
        let log = |name: &str| std::fs::File::create(dir.path().join(name)).unwrap();
        // Every name resolves to 127.0.0.1, and to no IPv6 address (Pebble dials only the
        // first address it gets).
        let dns_server = Command::new("pebble-challtestsrv")
            .args(["-management", &format!("127.0.0.1:{dns_management}")])
            .args(["-dns01", &format!("127.0.0.1:{dns}")])
            .args([
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-defaultIPv6",
                "",
            ])
            .stdout(log("challtestsrv.log"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(&config_file)
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(log("pebble.log"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", acme)).is_err() {
            assert!(Instant::now() < deadline, "pebble did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Pebble {
            processes: vec![pebble, dns_server],
            _dir: dir,
            directory: format!("https://127.0.0.1:{acme}/dir"),
            ca_file,
            management,
        }
    }

    /// Pebble's issuing root (it makes a new one at every start).
    async fn root(&self) -> CertificateDer<'static> {
        let pem = std::fs::read(&self.ca_file).unwrap();
        let listener_cert = rustls_pemfile_first(&pem);
        let tcp = TcpStream::connect(("127.0.0.1", self.management))
            .await
            .unwrap();
        let connector =
            tokio_rustls::TlsConnector::from(Arc::new(client_config(&listener_cert, &[])));
        let tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let resp = sender
            .send_request(get("/roots/0", "localhost"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        rustls_pemfile_first(&body)
    }
}

impl Pebble {
    /// Kills Pebble and its DNS server (their files stay until drop).
    fn stop(&mut self) {
        for p in &mut self.processes {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
    }
}

fn rustls_pemfile_first(pem: &[u8]) -> CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .next()
        .expect("a certificate")
        .unwrap()
}

/// The config of a site with `acme = true` for acme.test and www.acme.test.
fn acme_site(pebble: &Pebble, challenge: &str) -> String {
    format!(
        r#"
[acme]
directory = "{dir}"
contact = ["mailto:hostmaster@acme.test"]
ca_file = "{ca}"
challenge = "{challenge}"

[[site]]
hosts = ["acme.test", "www.acme.test"]
upstream = "http://{{upstream}}"
acme = true

[[site]]
hosts = ["*"]
upstream = "http://{{upstream}}"
"#,
        dir = pebble.directory,
        ca = pebble.ca_file.display(),
    )
}

/// The certificate chain served for `name`, and whether a client trusting only `root` accepts
/// it for that name.
async fn served(tls: SocketAddr, name: &str, root: &CertificateDer<'static>) -> Option<Vec<u8>> {
    let stream = tls_to(tls, name, root).await?;
    let leaf = stream.get_ref().1.peer_certificates()?.first()?.to_vec();
    Some(leaf)
}

/// A TLS connection to `name` (SNI) trusting only `root`; `None` when it is refused.
async fn tls_to(
    tls: SocketAddr,
    name: &str,
    root: &CertificateDer<'static>,
) -> Option<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(tls).await.ok()?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(root, &[b"http/1.1"])));
    connector
        .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
        .await
        .ok()
}

/// Waits until `name` is served a certificate that chains to `root`; returns its leaf.
async fn wait_for_pebble_certificate(
    tls: SocketAddr,
    name: &str,
    root: &CertificateDer<'static>,
    within: Duration,
    log: &Output,
) -> Vec<u8> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(leaf) = served(tls, name, root).await {
            return leaf;
        }
        assert!(
            Instant::now() < deadline,
            "no certificate from Pebble for {name} within {within:?}; ipgate said:\n{}",
            log.text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// GET over HTTPS to `name`, trusting only `root`.
async fn https_status(tls: SocketAddr, name: &str, root: &CertificateDer<'static>) -> u16 {
    let stream = tls_to(tls, name, root).await.expect("a TLS connection");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sender.send_request(get("/", name)).await.unwrap();
    resp.status().as_u16()
}

/// Pebble, and a gateway whose ACME site has its first certificate from it.
struct Started {
    pebble: Pebble,
    files: GatewayFiles,
    gw: BinaryGateway,
    tls_addr: SocketAddr,
    /// Pebble's issuing root.
    root: CertificateDer<'static>,
    /// The first certificate served for acme.test (DER).
    leaf: Vec<u8>,
}

async fn start(validity: Option<u64>, challenge: &str) -> Started {
    let (plain, tls) = (free_port(), free_port());
    let pebble = Pebble::start(plain, tls, validity);
    let files = GatewayBuilder::new()
        .ports(plain, tls)
        .sites(&acme_site(&pebble, challenge))
        .files()
        .await;
    let gw = files.start("info");
    let tls_addr: SocketAddr = ([127, 0, 0, 1], tls).into();
    let root = pebble.root().await;
    let leaf = wait_for_pebble_certificate(
        tls_addr,
        "acme.test",
        &root,
        Duration::from_secs(60),
        &gw.output,
    )
    .await;
    Started {
        pebble,
        files,
        gw,
        tls_addr,
        root,
        leaf,
    }
}

#[tokio::test]
async fn a_site_gets_a_certificate_from_pebble_over_http01_and_keeps_it_across_a_restart() {
    let Started {
        mut pebble,
        files,
        gw,
        tls_addr,
        root,
        leaf,
    } = start(None, "http-01").await;
    // One certificate for both hosts, issued by Pebble.
    let mut names = ipgate::state::tls::dns_names(&CertificateDer::from(leaf.clone())).unwrap();
    names.sort();
    assert_eq!(names, vec!["acme.test", "www.acme.test"]);
    assert_eq!(
        served(tls_addr, "www.acme.test", &root).await.as_deref(),
        Some(leaf.as_slice())
    );
    assert_eq!(https_status(tls_addr, "www.acme.test", &root).await, 200);
    assert!(gw
        .output
        .text()
        .contains("waiting for its first ACME certificate"));

    // Listed with its source and next renewal; state_dir/acme is private.
    let (status, certs) = admin_call(
        gw.admin,
        "GET",
        "/v1/certificates",
        None,
        Some(std::fs::read_to_string(files.token_file()).unwrap().trim()),
    )
    .await;
    assert_eq!(status, 200);
    let acme: Vec<_> = certs
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["source"] == "acme")
        .collect();
    assert_eq!(acme.len(), 1, "{certs}");
    assert!(acme[0]["next_renewal"].is_string());
    use std::os::unix::fs::PermissionsExt;
    let acme_dir = files.dir.path().join("state/acme");
    let mode = std::fs::metadata(&acme_dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    let key = std::fs::metadata(acme_dir.join("acme.test/key.pem")).unwrap();
    assert_eq!(key.permissions().mode() & 0o777, 0o600);

    // Restart with Pebble gone: the same certificate, from state_dir, no new order.
    gw.signal("TERM");
    assert!(gw.wait().await.success());
    pebble.stop();
    let gw = files.start("info");
    assert_eq!(
        served(tls_addr, "acme.test", &root).await.as_deref(),
        Some(leaf.as_slice())
    );
    assert_eq!(https_status(tls_addr, "acme.test", &root).await, 200);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let log = gw.output.text();
    assert!(!log.contains("ACME order failed"), "{log}");
    assert!(!log.contains("waiting for its first"), "{log}");
    gw.signal("TERM");
    assert!(gw.wait().await.success());
}

#[tokio::test]
async fn a_short_lived_certificate_is_renewed_over_tls_alpn01_under_a_keepalive_client() {
    // 24 s certificates: renewed 16 s after issue (a third of the lifetime left).
    let Started {
        pebble: _pebble,
        files: _files,
        gw,
        tls_addr,
        root,
        leaf: first,
    } = start(Some(24), "tls-alpn-01").await;

    // One keep-alive connection, a request every 100 ms, across the swap.
    let stream = tls_to(tls_addr, "acme.test", &root).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let deadline = Instant::now() + Duration::from_secs(45);
    let mut requests = 0;
    let renewed = loop {
        let resp = sender
            .send_request(get("/", "acme.test"))
            .await
            .expect("the keep-alive connection failed during renewal");
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
        requests += 1;
        if let Some(now) = served(tls_addr, "acme.test", &root).await {
            if now != first {
                break now;
            }
        }
        assert!(Instant::now() < deadline, "not renewed within 45 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(requests > 10);
    // The old connection goes on after the swap.
    for _ in 0..3 {
        let resp = sender.send_request(get("/", "acme.test")).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
    }
    // Renewed with a third of the lifetime left (16 s of 24), not at expiry.
    let (_, first_expiry) =
        ipgate::state::tls::validity(&CertificateDer::from(first.clone())).unwrap();
    let renewed = CertificateDer::from(renewed);
    let (renewed_at, _) = ipgate::state::tls::validity(&renewed).unwrap();
    assert!(
        renewed_at <= first_expiry - 5,
        "renewed at {renewed_at}, the first expired at {first_expiry}"
    );
    let mut names = ipgate::state::tls::dns_names(&renewed).unwrap();
    names.sort();
    assert_eq!(names, vec!["acme.test", "www.acme.test"]);
    gw.signal("TERM");
    assert!(gw.wait().await.success());
}
