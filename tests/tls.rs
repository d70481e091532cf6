//! TLS termination: SNI certificate choice, protocol versions and suites.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

#[tokio::test]
async fn sni_picks_the_certificate_for_the_name() {
    let gw = spawn_gateway(DEFAULT_SITES, "").await;
    for (sni, expected) in [
        ("a.test", &gw.cert_a),
        ("b.test", &gw.cert_b),
        ("x.wild.test", &gw.cert_b),
        ("localhost", &gw.cert_a),
    ] {
        // The client verifies the chain against the test CA and the name.
        let tls = connect_tls(gw.tls, &gw.ca.ca_der, sni, &[b"http/1.1"]).await;
        let presented = &tls.get_ref().1.peer_certificates().unwrap()[0];
        assert_eq!(presented, expected, "wrong certificate for {sni}");
    }
    gw.shutdown().await;
}

/// A ClientHello record offering `version` and `suites`, with the given extensions.
fn client_hello(version: [u8; 2], suites: &[u16], extensions: &[u8]) -> Vec<u8> {
    let mut body = version.to_vec();
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        body.extend_from_slice(&s.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // compression: null
    body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
    body.extend_from_slice(extensions);
    let mut hs = vec![1u8];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

/// supported_groups (x25519, secp256r1), ec_point_formats, signature_algorithms.
const TLS12_EXTENSIONS: &[u8] = &[
    0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17, // groups
    0x00, 0x0b, 0x00, 0x02, 0x01, 0x00, // point formats
    0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x03, 0x08, 0x04, // sig algs
];

fn assert_alert(reply: &[u8], description: u8, what: &str) {
    assert!(reply.len() >= 7, "{what}: no alert, got {reply:?}");
    assert_eq!(
        reply[0], 0x15,
        "{what}: expected an alert record, got {reply:?}"
    );
    assert_eq!(reply[6], description, "{what}: alert {reply:?}");
}

#[tokio::test]
async fn tls_1_1_and_1_0_clients_are_refused() {
    let gw = spawn_gateway(DEFAULT_SITES, "").await;
    // ECDHE-RSA-AES256-SHA and AES128-SHA: what a TLS 1.0/1.1 client offers.
    for version in [[3, 2], [3, 1]] {
        let hello = client_hello(version, &[0xc014, 0x002f], TLS12_EXTENSIONS);
        let reply = raw_exchange(gw.tls, &hello, Duration::from_secs(3)).await;
        assert_alert(&reply, 70, "TLS 1.x < 1.2"); // protocol_version
    }
    assert_eq!(
        gw.metric_settled("ipgate_tls_handshake_errors_total", 2.0)
            .await,
        Some(2.0)
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn tls_1_2_without_aead_forward_secret_suites_is_refused() {
    let gw = spawn_gateway(DEFAULT_SITES, "").await;
    // Only CBC (ECDHE-ECDSA-AES256-SHA) and static-RSA GCM (AES256-GCM-SHA384).
    let hello = client_hello([3, 3], &[0xc00a, 0x009d], TLS12_EXTENSIONS);
    let reply = raw_exchange(gw.tls, &hello, Duration::from_secs(3)).await;
    assert_alert(&reply, 40, "non-AEAD or non-FS suites"); // handshake_failure
    gw.shutdown().await;
}

async fn negotiated(
    gw: &TestGateway,
    version: &'static rustls::SupportedProtocolVersion,
) -> String {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(gw.ca.ca_der.clone()).unwrap();
    // A client preferring AES-128 first: the server's order must win.
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites.sort_by_key(|s| {
        let name = format!("{:?}", s.suite());
        (!name.contains("128"), name)
    });
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(gw.tls).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("a.test").unwrap(), tcp)
        .await
        .unwrap();
    format!(
        "{:?}",
        tls.get_ref().1.negotiated_cipher_suite().unwrap().suite()
    )
}

#[tokio::test]
async fn tls_1_2_and_1_3_negotiate_256_bit_suites_first() {
    let gw = spawn_gateway(DEFAULT_SITES, "").await;
    assert_eq!(
        negotiated(&gw, &rustls::version::TLS13).await,
        "TLS13_AES_256_GCM_SHA384"
    );
    assert_eq!(
        negotiated(&gw, &rustls::version::TLS12).await,
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"
    );
    gw.shutdown().await;
}
