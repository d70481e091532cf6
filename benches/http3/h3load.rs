//! A bounded HTTP/3 load client for benches/http3/run.sh (Debian's h2load has no QUIC):
//! `h3load ADDR N CONNECTIONS STREAMS` sends N GETs for `/` (Host a.test) over CONNECTIONS
//! QUIC connections, STREAMS at a time on each, with quinn and h3. The server's certificate
//! is not checked (loopback, the gateway's self-signed one). Prints `succeeded N failed M`.
//! Loopback only; it ends when the N requests are done (each within 10 s).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Buf;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn endpoint() -> quinn::Endpoint {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS");
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("bind");
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    endpoint
}

async fn get(send: &mut h3::client::SendRequest<h3_quinn::OpenStreams, bytes::Bytes>) -> bool {
    let req = http::Request::get("https://a.test/").body(()).unwrap();
    let Ok(mut stream) = send.send_request(req).await else {
        return false;
    };
    if stream.finish().await.is_err() {
        return false;
    }
    let Ok(resp) = stream.recv_response().await else {
        return false;
    };
    while let Ok(Some(mut chunk)) = stream.recv_data().await {
        chunk.advance(chunk.remaining());
    }
    resp.status() == 200
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: h3load ADDR N CONNECTIONS STREAMS";
    let addr: SocketAddr = args.get(1).and_then(|a| a.parse().ok()).expect(usage);
    assert!(addr.ip().is_loopback(), "loopback only");
    let n: usize = args.get(2).and_then(|a| a.parse().ok()).expect(usage);
    let conns: usize = args.get(3).and_then(|a| a.parse().ok()).expect(usage);
    let streams: usize = args.get(4).and_then(|a| a.parse().ok()).expect(usage);
    let endpoint = endpoint();
    let left = Arc::new(AtomicUsize::new(n));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut tasks = Vec::new();
    for _ in 0..conns.max(1) {
        let conn = endpoint
            .connect(addr, "a.test")
            .expect("connect")
            .await
            .expect("handshake");
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn))
            .await
            .expect("h3");
        tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });
        for _ in 0..streams.max(1) {
            let (mut send, left, ok, failed) =
                (send.clone(), left.clone(), ok.clone(), failed.clone());
            tasks.push(tokio::spawn(async move {
                while left
                    .fetch_update(Relaxed, Relaxed, |l| l.checked_sub(1))
                    .is_ok()
                {
                    let done = tokio::time::timeout(Duration::from_secs(10), get(&mut send)).await;
                    let counter = if done == Ok(true) { &ok } else { &failed };
                    counter.fetch_add(1, Relaxed);
                }
            }));
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    println!(
        "succeeded {} failed {}",
        ok.load(Relaxed),
        failed.load(Relaxed)
    );
}
