//! HTTP/3: QUIC on a TLS listener's UDP port (`http3 = true`), through `quinn` and `h3`.
//!
//! The policy comes before the handshake: an Initial from a blocked source is dropped
//! unanswered (`Incoming::ignore`) and counted as a rejected connection; a client over its
//! connection cap likewise; under load (or always, `http3_retry = "always"`), and for a
//! client that has a connection open already, the address is validated with a Retry before
//! any state is kept, so forged Initials cannot take a client's connection slots. 0-RTT is refused (no early data), and
//! migration is off: a connection is judged on the one address it was admitted from.
//!
//! Each request then takes the same path as an HTTP/2 request, whole: `proxy::handle` with
//! the QUIC connection's client, its body read from the stream (held to its
//! `Content-Length`), so the request checks, admission, rate limits, jails, the challenge,
//! the access log (`proto` `HTTP/3`) and the metrics are the ones TCP has.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, error};

use crate::config;
use crate::decide::clients::ConnSlot;
use crate::serve::body::{ClientBody, H3Body};
use crate::serve::conn::ConnInfo;
use crate::serve::headers;
use crate::serve::listener;
use crate::serve::proxy::{self, Context};

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
        // Past the request path's own idle close (`connection`), which is counted and
        // tells the client; this one only ends a connection whose client went away.
        .max_idle_timeout((limits.http2_idle_timeout * 3 / 2).try_into().ok())
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
/// asked to finish (GOAWAY) within `limits.shutdown_grace`. An upgrade's new process
/// starts once the old one has closed its QUIC connections; the old one, after the
/// handover, gives its connections up to [`HANDOVER`] to finish, then closes them.
pub async fn serve(
    worker: Arc<Context>,
    socket: std::net::UdpSocket,
    conf: config::Listener,
    graceful: &GracefulShutdown,
    mut stop: watch::Receiver<bool>,
) {
    let turn = &worker.state.quic;
    let mut ours = turn.ours.subscribe();
    tokio::select! {
        _ = stop.wait_for(|s| *s) => return,
        // Bounded: an old process that never says so has exited long before.
        _ = tokio::time::timeout(HANDOVER * 5, ours.wait_for(|o| *o)) => {}
    }
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
    turn.open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
    // No new connection; those open finish their requests (each got a GOAWAY).
    endpoint.set_server_config(None);
    if worker.state.handed_over.load(Ordering::Relaxed) {
        // The new process serves HTTP/3 once these are closed.
        let grace = worker.state.snapshot.load().config.limits.shutdown_grace;
        let finished = async {
            while endpoint.open_connections() > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        };
        let _ = tokio::time::timeout(HANDOVER.min(grace), finished).await;
        endpoint.close(NO_ERROR, b"upgraded");
        let _ = tokio::time::timeout(HANDOVER, endpoint.wait_idle()).await;
    }
    // Otherwise those open finish within the grace the worker gives its connections.
    turn.open.fetch_sub(1, Ordering::Relaxed);
}

/// How long, after a handover, the old process's QUIC connections have to finish.
pub const HANDOVER: std::time::Duration = std::time::Duration::from_secs(2);

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
    if !incoming.remote_address_validated()
        && (conf.http3_retry_always || under_load(worker) || holds_a_connection(state, client))
    {
        match incoming.retry() {
            Ok(()) => state.metrics.quic_retries.inc(),
            Err(e) => e.into_incoming().ignore(),
        }
        return;
    }
    let client_slot = match listener::admit_client(state, client) {
        Ok(slot) => slot,
        Err(rejected) => {
            rejected.reason.inc();
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

/// Whether `client` has a connection open already. Its next one proves its address with a
/// Retry first: otherwise Initials with its address forged by someone else could take its
/// per-client connection slots for the length of a handshake timeout.
fn holds_a_connection(state: &crate::state::AppState, client: IpAddr) -> bool {
    let prefix = state.snapshot.load().config.rate_limit.ipv6_prefix;
    let key = crate::decide::clients::client_key(client, prefix);
    state.conn_counts.count(key) > 0
}

/// Under load: more than half the connection slots taken.
fn under_load(worker: &Context) -> bool {
    let state = &worker.state;
    let max = state.snapshot.load().config.limits.max_connections;
    state.connections.available_permits() < max / 2
}

/// One QUIC connection: each request goes to the request path as an HTTP/2 request would.
/// As on HTTP/2, the first request must come by `head_by`, and a connection with no
/// request open for `limits.http2_idle_timeout` is closed; at a stop it gets a GOAWAY, and
/// is closed once its requests under way are done.
async fn connection(
    worker: &Arc<Context>,
    conn: quinn::Connection,
    client: IpAddr,
    slot: Arc<ConnSlot>,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let state = &worker.state;
    let (max_header, head_by, idle) = {
        let limits = &state.snapshot.load().config.limits;
        let head_by = Instant::now() + limits.header_read_timeout;
        let idle = limits.http2_idle_timeout;
        (limits.max_header_bytes as u64, head_by, idle)
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
    let mut info = ConnInfo::new(client, true, false, slot);
    info.h3 = true;
    let info = Arc::new(info);
    let requests = tokio_util::task::TaskTracker::new();
    let mut stop = worker.stop.clone();
    let mut open = true;
    // Checked a few times per timeout, with no timer per request.
    let tick = (idle / 4).max(std::time::Duration::from_millis(1));
    let (mut started, mut seen, mut quiet) = (0u64, 0u64, 0u32);
    let timer = tokio::time::sleep_until(head_by.min(Instant::now() + tick));
    tokio::pin!(timer);
    loop {
        tokio::select! {
            r = h3.accept() => match r {
                Ok(Some(resolver)) => {
                    started += 1;
                    requests.spawn(request(worker.clone(), info.clone(), resolver));
                }
                Ok(None) | Err(_) => break,
            },
            () = &mut timer => {
                let now = Instant::now();
                if !open {
                    // Stopping: closed as soon as the requests under way are done (the client
                    // need not answer the GOAWAY).
                    if requests.is_empty() {
                        quic.close(NO_ERROR, b"");
                        break;
                    }
                    timer.as_mut().reset(now + DRAIN_CHECK);
                    continue;
                }
                let reason = if started == 0 {
                    (now >= head_by).then_some("first_request")
                } else {
                    quiet = if requests.is_empty() && started == seen { quiet + 1 } else { 0 };
                    seen = started;
                    (tick * quiet >= idle).then_some("http2_idle")
                };
                if let Some(reason) = reason {
                    state.metrics.timed_out.with_label_values(&[reason]).inc();
                    quic.close(NO_ERROR, b"");
                    break;
                }
                let next = now + tick;
                timer.as_mut().reset(if started == 0 { next.min(head_by) } else { next });
            }
            () = stopped(&mut stop), if open => {
                // GOAWAY: the requests under way finish, no new one starts.
                open = false;
                let _ = h3.shutdown(0).await;
                timer.as_mut().reset(Instant::now());
            }
        }
    }
    requests.close();
    requests.wait().await;
    drop(watcher);
}

/// How often a stopping connection checks whether its requests are done.
const DRAIN_CHECK: std::time::Duration = std::time::Duration::from_millis(50);

/// HTTP/3's "no error" (RFC 9114 §8.1), to close a connection with.
const NO_ERROR: quinn::VarInt = quinn::VarInt::from_u32(0x100);

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// One write to the client (the head, data, the end) within `limits.write_idle_timeout`,
/// so a client that grants no flow-control credit holds nothing for longer: true when done;
/// false when it failed or stalled (a stall resets the stream and is counted).
macro_rules! in_time {
    ($worker:expr, $write_idle:expr, $send:ident, $write:expr) => {{
        match tokio::time::timeout($write_idle, $write).await {
            Ok(Ok(())) => true,
            Ok(Err(_)) => false,
            Err(_) => {
                let timed_out = &$worker.state.metrics.timed_out;
                timed_out.with_label_values(&["write_idle"]).inc();
                $send.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
                false
            }
        }
    }};
}

/// One request: its head (within `limits.header_read_timeout`) and body into the request
/// path, the response back, each write within `limits.write_idle_timeout` (`in_time!`).
async fn request(
    worker: Arc<Context>,
    conn: Arc<ConnInfo>,
    resolver: h3::server::RequestResolver<h3_quinn::Connection, Bytes>,
) {
    let (head_timeout, write_idle) = {
        let limits = &worker.state.snapshot.load().config.limits;
        (limits.header_read_timeout, limits.write_idle_timeout)
    };
    let Ok(Ok((req, stream))) =
        tokio::time::timeout(head_timeout, resolver.resolve_request()).await
    else {
        return;
    };
    let (mut send, recv) = stream.split();
    let (mut parts, ()) = req.into_parts();
    let Ok(left) = content_length(&parts.headers) else {
        let mut r = http::Response::new(());
        *r.status_mut() = http::StatusCode::BAD_REQUEST;
        if in_time!(worker, write_idle, send, send.send_response(r)) {
            in_time!(worker, write_idle, send, send.finish());
        }
        return;
    };
    // Framed as HTTP/2 is (pseudo-headers, split cookies); logged as HTTP/3.
    parts.version = http::Version::HTTP_2;
    let body = ClientBody::Http3(Box::new(H3Body::new(recv, left)));
    let (resp, held) =
        match proxy::handle(worker.clone(), conn, Request::from_parts(parts, body)).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
    let (mut parts, mut body) = resp.into_parts();
    // HTTP/3 forbids connection-specific fields (RFC 9114 §4.2): the upstream's are gone
    // already, the gateway's own answers may carry one.
    headers::strip_hop_by_hop(&mut parts.headers);
    let head = http::Response::from_parts(parts, ());
    if !in_time!(worker, write_idle, send, send.send_response(head)) {
        return;
    }
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            send.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
            return;
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if !in_time!(worker, write_idle, send, send.send_data(data)) {
            return;
        }
    }
    in_time!(worker, write_idle, send, send.finish());
    drop(held);
}

/// The request's `Content-Length`, if it has one; more than one, or one that is not a
/// number, is malformed (RFC 9114 §4.1.2).
fn content_length(headers: &http::HeaderMap) -> Result<Option<u64>, ()> {
    let mut values = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(());
    }
    let digits = value.as_bytes();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(());
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse().ok())
        .map(Some)
        .ok_or(())
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
