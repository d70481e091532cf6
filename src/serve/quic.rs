//! HTTP/3: QUIC on a TLS listener's UDP port (`http3 = true`), through `quinn` and `h3`.
//!
//! The policy comes before the handshake: an Initial from a blocked source is dropped
//! unanswered (`Incoming::ignore`) and counted as a rejected connection; a client over its
//! connection cap likewise; under load (or always, `http3_retry = "always"`) the address is
//! validated with a Retry before any state is kept. 0-RTT is refused (no early data), and
//! migration is off: a connection is judged on the one address it was admitted from.
//!
//! Each request then takes the same path as on HTTP/2, whole: it is carried over an
//! in-memory HTTP/2 connection, one per QUIC connection, into `listener::serve` with the
//! QUIC connection's client, so the request checks, admission, rate limits, jails, the
//! challenge, the access log (`proto` `HTTP/3`) and the metrics are the ones TCP has.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::sync::watch;
use tracing::{debug, error, warn};

use crate::config;
use crate::decide::clients::ConnSlot;
use crate::serve::conn::ConnInfo;
use crate::serve::listener;
use crate::serve::proxy::Context;

type Bridge = hyper::client::conn::http2::SendRequest<Body>;
type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

/// The QUIC side of a TLS listener's config: its certificates (the TLS listeners'), ALPN
/// `h3`, no early data; the idle timeout and stream limits of HTTP/2; no migration.
fn server_config(worker: &Context) -> Option<quinn::ServerConfig> {
    let snap = worker.state.snapshot.load();
    let tls = quic_tls(snap.tls.as_ref()?.config());
    let crypto = match quinn::crypto::rustls::QuicServerConfig::try_from(tls) {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, "the TLS config cannot serve QUIC: HTTP/3 is off");
            return None;
        }
    };
    let limits = &snap.config.limits;
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(limits.http2_idle_timeout.try_into().ok())
        .max_concurrent_bidi_streams(limits.http2_max_streams.into())
        .max_concurrent_uni_streams(8u32.into());
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server
        .transport_config(Arc::new(transport))
        .migration(false);
    Some(server)
}

/// The TLS listeners' config for QUIC: ALPN `h3` only, and no early data (0-RTT would let
/// a request in before the client's address is proven, and could be replayed).
fn quic_tls(tls: &rustls::ServerConfig) -> rustls::ServerConfig {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    tls.max_early_data_size = 0;
    tls
}

/// Serves HTTP/3 on `socket` until `stop` turns true. At a shutdown each connection is
/// asked to finish (GOAWAY) within `limits.shutdown_grace`; after a handover to an upgraded
/// process the endpoint closes at once, since the new process reads the same socket.
pub async fn serve(
    worker: Arc<Context>,
    socket: std::net::UdpSocket,
    conf: config::Listener,
    graceful: &GracefulShutdown,
    mut stop: watch::Receiver<bool>,
) {
    let mut tls_in_use = tls_ptr(&worker);
    let Some(server) = server_config(&worker) else {
        return;
    };
    let runtime = Arc::new(quinn::TokioRuntime);
    let endpoint = match quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        runtime,
    ) {
        Ok(e) => e,
        Err(e) => {
            error!(addr = %conf.addr, error = %e, "cannot serve HTTP/3");
            return;
        }
    };
    loop {
        let incoming = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        // A reload or a renewal gave the TLS listeners new certificates: QUIC takes them too
        // (the connections open keep theirs).
        let tls_now = tls_ptr(&worker);
        if tls_now != tls_in_use {
            tls_in_use = tls_now;
            if let Some(server) = server_config(&worker) {
                endpoint.set_server_config(Some(server));
            }
        }
        admit(&worker, incoming, &conf, graceful);
    }
    if worker
        .state
        .handed_over
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        endpoint.close(0u32.into(), b"upgraded");
    } else {
        // No new connection; those open finish their requests (each got a GOAWAY) within
        // the grace the worker gives its connections.
        endpoint.set_server_config(None);
    }
}

/// Which TLS config the snapshot holds (it changes with a reload or a new certificate).
fn tls_ptr(worker: &Context) -> usize {
    let snap = worker.state.snapshot.load();
    snap.tls
        .as_ref()
        .map_or(0, |t| Arc::as_ptr(t.config()) as usize)
}

/// Before the handshake: a blocked client or one over its cap gets no answer; an
/// unvalidated address is sent a Retry when asked for or under load.
fn admit(
    worker: &Arc<Context>,
    incoming: quinn::Incoming,
    conf: &config::Listener,
    graceful: &GracefulShutdown,
) {
    let state = &worker.state;
    let client = incoming.remote_address().ip().to_canonical();
    if let crate::decide::policy::Verdict::Block(_) =
        state.snapshot.load().policy.decide(&state.temp, client)
    {
        state.metrics.rejected.blocked.inc();
        incoming.ignore();
        return;
    }
    if !incoming.remote_address_validated() && (conf.http3_retry_always || under_load(worker)) {
        match incoming.retry() {
            Ok(()) => state.metrics.quic_retries.inc(),
            Err(e) => e.into_incoming().ignore(),
        }
        return;
    }
    let client_slot = match listener::admit_client(state, client) {
        Ok(slot) => slot,
        Err(reason) => {
            reason.inc();
            incoming.ignore();
            return;
        }
    };
    let Ok(permit) = state.connections.clone().try_acquire_owned() else {
        state.metrics.rejected.max_connections.inc();
        incoming.refuse();
        return;
    };
    let slot = Arc::new(ConnSlot {
        _permit: permit,
        client: client_slot,
    });
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            debug!(error = %e, "QUIC connection not accepted");
            return;
        }
    };
    let (worker, watcher) = (worker.clone(), graceful.watcher());
    tokio::spawn(async move {
        let state = &worker.state;
        let timeout = state.snapshot.load().config.limits.tls_handshake_timeout;
        let conn = match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(c)) => c,
            _ => {
                state.metrics.tls_handshake_errors.inc();
                return;
            }
        };
        state.metrics.connections_open.inc();
        connection(&worker, conn, client, slot, watcher).await;
        state.metrics.connections_open.dec();
    });
}

/// Under load: more than half the connection slots taken.
fn under_load(worker: &Context) -> bool {
    let state = &worker.state;
    let max = state.snapshot.load().config.limits.max_connections;
    state.connections.available_permits() < max / 2
}

/// One QUIC connection: its requests, each carried into the HTTP/2 path.
async fn connection(
    worker: &Arc<Context>,
    conn: quinn::Connection,
    client: IpAddr,
    slot: Arc<ConnSlot>,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let state = &worker.state;
    let (max_header, head_by) = {
        let limits = &state.snapshot.load().config.limits;
        let head_by = tokio::time::Instant::now() + limits.header_read_timeout;
        (limits.max_header_bytes as u64, head_by)
    };
    let quic = conn.clone();
    let mut h3 = match h3::server::builder()
        .max_field_section_size(max_header)
        .build::<_, Bytes>(h3_quinn::Connection::new(conn))
        .await
    {
        Ok(c) => c,
        Err(e) => {
            debug!(error = %e, "HTTP/3 connection setup failed");
            return;
        }
    };
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    let mut info = ConnInfo::new(client, true, false, slot);
    info.h3 = true;
    let builder = state.snapshot.load().http.clone();
    let inner = worker.clone();
    let mut request_path = tokio::spawn(async move {
        listener::serve(
            &inner,
            &builder,
            TokioIo::new(theirs),
            info,
            watcher,
            head_by,
        )
        .await;
    });
    let bridge =
        match hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(ours)).await
        {
            Ok((sender, conn)) => {
                tokio::spawn(conn);
                sender
            }
            Err(e) => {
                warn!(error = %e, "HTTP/3: cannot reach the request path");
                return;
            }
        };
    let mut stop = worker.stop.clone();
    let mut open = true;
    loop {
        let resolver = tokio::select! {
            r = h3.accept() => r,
            // The request path closed its side (no first request in time, idle, a stalled
            // write): so does the QUIC connection, and its slots go.
            _ = &mut request_path => {
                quic.close(0u32.into(), b"");
                break;
            }
            () = stopped(&mut stop), if open => {
                // GOAWAY: the requests under way finish, no new one starts.
                open = false;
                let _ = h3.shutdown(0).await;
                continue;
            }
        };
        match resolver {
            Ok(Some(resolver)) => {
                tokio::spawn(request(resolver, bridge.clone()));
            }
            Ok(None) | Err(_) => break,
        }
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// One request: its head and body into the bridge, the response back.
async fn request(
    resolver: h3::server::RequestResolver<h3_quinn::Connection, Bytes>,
    mut bridge: Bridge,
) {
    let Ok((req, stream)) = resolver.resolve_request().await else {
        return;
    };
    let (mut send, recv) = stream.split();
    let body = futures_util::stream::unfold(recv, |mut recv| async move {
        match recv.recv_data().await {
            Ok(Some(mut data)) => {
                let bytes = data.copy_to_bytes(data.remaining());
                Some((Ok(Frame::data(bytes)), recv))
            }
            Ok(None) => None,
            Err(e) => Some((Err(std::io::Error::other(e.to_string())), recv)),
        }
    });
    let (mut parts, ()) = req.into_parts();
    parts.version = http::Version::HTTP_2;
    let req = http::Request::from_parts(parts, StreamBody::new(body).boxed_unsync());
    let resp = match bridge.ready().await {
        Ok(()) => bridge.send_request(req).await,
        Err(e) => Err(e),
    };
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            debug!(error = %e, "HTTP/3 request lost on the way to the request path");
            let mut r = http::Response::new(());
            *r.status_mut() = http::StatusCode::BAD_GATEWAY;
            let _ = send.send_response(r).await;
            let _ = send.finish().await;
            return;
        }
    };
    let (mut parts, mut body) = resp.into_parts();
    parts.version = http::Version::HTTP_3;
    if send
        .send_response(http::Response::from_parts(parts, ()))
        .await
        .is_err()
    {
        return;
    }
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    if send.send_data(data).await.is_err() {
                        return;
                    }
                }
            }
            Err(_) => return,
        }
    }
    let _ = send.finish().await;
}

/// The UDP socket of an `http3` listener, on the TCP socket's address (its port, when the
/// config says 0).
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quic_takes_h3_only_and_no_early_data() {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(rustls::server::ResolvesServerCertUsingSni::new()));
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        tls.max_early_data_size = u32::MAX;
        let quic = quic_tls(&tls);
        assert_eq!(quic.alpn_protocols, vec![b"h3".to_vec()]);
        assert_eq!(quic.max_early_data_size, 0);
        assert!(quinn::crypto::rustls::QuicServerConfig::try_from(quic).is_ok());
    }
}
