//! Client listeners: accept, enforce the connection cap, run the TLS handshake under its
//! timeout, and serve HTTP/1.1 and HTTP/2 with hyper under the configured limits. Each
//! connection is watched by the graceful-shutdown tracker so SIGTERM lets it finish.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{debug, error, warn};

use crate::access_log::LoggedIp;
use crate::client_addr;
use crate::config;
use crate::policy::Verdict;
use crate::proxy::{self, ConnInfo, Context};
use crate::state::AppState;

/// A listening socket whose accepted connections are not registered with the event loop
/// until they are admitted: refusing a client costs accept, one setsockopt and close, with
/// no epoll registration to add and remove.
struct Acceptor(AsyncFd<mio::net::TcpListener>);

impl Acceptor {
    fn new(listener: std::net::TcpListener) -> std::io::Result<Acceptor> {
        listener.set_nonblocking(true)?;
        let listener = mio::net::TcpListener::from_std(listener);
        // Deprecated because a borrowed descriptor could be closed while registered; this one
        // is owned by the AsyncFd for as long as it is registered (the replacement is `unsafe`,
        // which this crate forbids).
        #[allow(deprecated)]
        let fd = AsyncFd::with_interest(listener, Interest::READABLE)?;
        Ok(Acceptor(fd))
    }

    async fn accept(&self) -> std::io::Result<(mio::net::TcpStream, SocketAddr)> {
        loop {
            let mut ready = self.0.readable().await?;
            // Readiness is cleared, and waited for again, only on WouldBlock.
            if let Ok(accepted) = ready.try_io(|l| l.get_ref().accept()) {
                return accepted;
            }
        }
    }
}

/// Accepts on one listener until `stop` turns true.
pub async fn accept_loop(
    worker: Arc<Context>,
    listener: std::net::TcpListener,
    conf: config::Listener,
    graceful: &GracefulShutdown,
    mut stop: watch::Receiver<bool>,
) {
    let state = &worker.state;
    let listener = match Acceptor::new(listener) {
        Ok(l) => l,
        Err(e) => {
            error!(addr = %conf.addr, error = %e, "cannot use a listening socket");
            return;
        }
    };
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors and the like: back off briefly instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        let client = client_addr::peer(peer);
        // The address is known now: a blocked client is closed before a byte is read
        // (SPEC 3), and before it can take a connection slot.
        if !conf.proxy_protocol && is_blocked(state, client) {
            state.metrics.rejected.blocked.inc();
            reset(tcp);
            continue;
        }
        let Ok(permit) = state.connections.clone().try_acquire_owned() else {
            state.metrics.rejected.max_connections.inc();
            reset(tcp);
            continue;
        };
        // Admitted: a normal close again (a reset would drop a response still in the send
        // buffer), and it joins this worker's event loop. TCP_NODELAY is inherited.
        if let Err(e) = socket2::SockRef::from(&tcp).set_linger(None) {
            warn!(error = %e, "cannot set up a connection");
            continue;
        }
        let tcp = match TcpStream::from_std(std::net::TcpStream::from(tcp)) {
            Ok(t) => t,
            Err(e) => {
                warn!(error = %e, "cannot register a connection");
                continue;
            }
        };
        let watcher = graceful.watcher();
        let worker = worker.clone();
        // Per connection, so a reload's limits apply to the next connection.
        let builder = state.snapshot.load().http.clone();
        let tls = conf.tls;
        let proxy_protocol = conf.proxy_protocol;
        tokio::spawn(async move {
            let _permit = permit;
            let state = &worker.state;
            let mut tcp = tcp;
            let mut client = client;
            if proxy_protocol {
                match proxied_client(state, &mut tcp, client).await {
                    Some(c) => client = c,
                    None => return,
                }
            }
            state.metrics.connections_open.inc();
            let info = ConnInfo::new(peer, client, tls);
            if tls {
                serve_tls(&worker, &builder, tcp, info, watcher).await;
            } else {
                serve(&worker, &builder, TokioIo::new(tcp), info, watcher).await;
            }
            state.metrics.connections_open.dec();
        });
    }
}

/// Closes a refused connection with an RST: it inherited zero linger from the listening
/// socket (`worker::bind`), so no FIN exchange and no TIME_WAIT socket is left behind per
/// attempt, which is what a flood of them would otherwise cost.
fn reset(tcp: mio::net::TcpStream) {
    drop(tcp);
}

fn is_blocked(state: &AppState, client: std::net::IpAddr) -> bool {
    matches!(
        state.snapshot.load().policy.decide(&state.temp, client),
        Verdict::Block(_)
    )
}

/// On a `proxy_protocol` listener: the client named by the PROXY header of a trusted peer,
/// or `None` when the connection must be closed (untrusted peer, bad header, blocked client).
async fn proxied_client(
    state: &AppState,
    tcp: &mut TcpStream,
    peer: std::net::IpAddr,
) -> Option<std::net::IpAddr> {
    let (trusted, timeout, log_ip) = {
        let snap = state.snapshot.load();
        (
            snap.trusted.contains(peer),
            snap.config.limits.tls_handshake_timeout,
            snap.config.privacy.log_ip,
        )
    };
    if !trusted {
        state.metrics.rejected.untrusted_proxy.inc();
        debug!(peer = %LoggedIp(peer, log_ip), "PROXY header from an untrusted peer refused");
        return None;
    }
    let client = match client_addr::read_proxy_header(tcp, timeout).await {
        Ok(Some(client)) => client,
        Ok(None) => peer,
        Err(e) => {
            state.metrics.rejected.proxy_header.inc();
            debug!(peer = %LoggedIp(peer, log_ip), error = %e, "bad PROXY header");
            return None;
        }
    };
    if is_blocked(state, client) {
        state.metrics.rejected.blocked.inc();
        return None;
    }
    Some(client)
}

async fn serve_tls(
    worker: &Arc<Context>,
    builder: &auto::Builder<TokioExecutor>,
    tcp: TcpStream,
    info: ConnInfo,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let state = &worker.state;
    let (acceptor, timeout, log_ip) = {
        let snap = state.snapshot.load();
        (
            snap.tls.clone(),
            snap.config.limits.tls_handshake_timeout,
            snap.config.privacy.log_ip,
        )
    };
    let Some(acceptor) = acceptor else { return };
    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => serve(worker, builder, TokioIo::new(stream), info, watcher).await,
        Ok(Err(e)) => {
            state.metrics.tls_handshake_errors.inc();
            debug!(client = %LoggedIp(info.client, log_ip), error = %e, "tls handshake failed");
        }
        Err(_) => {
            state.metrics.tls_handshake_errors.inc();
            debug!(client = %LoggedIp(info.client, log_ip), "tls handshake timed out");
        }
    }
}

async fn serve<I>(
    worker: &Arc<Context>,
    builder: &auto::Builder<TokioExecutor>,
    io: TokioIo<I>,
    info: ConnInfo,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let w = worker.clone();
    let service = service_fn(move |req| proxy::handle(w.clone(), info.clone(), req));
    let conn = builder.serve_connection_with_upgrades(io, service);
    if let Err(e) = watcher.watch(conn).await {
        debug!(error = %e, "connection ended with an error");
    }
}
