//! Client listeners: accept, enforce the connection cap, run the TLS handshake under its
//! timeout, and serve HTTP/1.1 and HTTP/2 with hyper under the configured limits. Each
//! connection is watched by the graceful-shutdown tracker so SIGTERM lets it finish.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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

use crate::config;
use crate::decide::clients::{client_key, ClientSlot, ConnSlot};
use crate::decide::policy::Verdict;
use crate::observe::access_log::LoggedIp;
use crate::serve::body::ClientBody;
use crate::serve::client_addr;
use crate::serve::conn::ConnInfo;
use crate::serve::proxy::{self, Context};
use crate::serve::tarpit::{self, Tarpit};
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
    let port = listener.local_addr().map(|a| a.port()).ok();
    let listener = match Acceptor::new(listener) {
        Ok(l) => l,
        Err(e) => {
            error!(addr = %conf.addr, error = %e, "cannot use a listening socket");
            return;
        }
    };
    // `h3=":PORT"`: HTTP/3 on this listener's port, for a day.
    let alt_svc =
        conf.http3.then_some(port).flatten().and_then(|port| {
            http::HeaderValue::from_str(&format!("h3=\":{port}\"; ma=86400")).ok()
        });
    let mut tarpit = Tarpit::new(tarpit::CAPACITY, state.metrics.rejected.tarpit.clone());
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return,
            () = tarpit.due(), if tarpit.holds() => {
                tarpit.expire();
                continue;
            }
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
        // The address is known now (unless a PROXY header will name it): a blocked client is
        // closed before a byte is read, and a client over its connection cap too
        //, before either can take a connection slot.
        let client_slot = if conf.proxy_protocol {
            None
        } else {
            match admit_client(state, client) {
                Ok(slot) => slot,
                Err(rejected) => {
                    rejected.reason.inc();
                    if rejected.repeated {
                        tarpit.hold(tcp);
                    } else {
                        reset(tcp);
                    }
                    continue;
                }
            }
        };
        let Ok(permit) = state.connections.clone().try_acquire_owned() else {
            state.metrics.rejected.max_connections.inc();
            reset(tcp);
            continue;
        };
        let Some(tcp) = register(tcp) else {
            continue;
        };
        start(
            &worker,
            &conf,
            tcp,
            client,
            client_slot,
            permit,
            &alt_svc,
            graceful,
        );
    }
}

/// Serves an admitted connection in a task of its own.
#[allow(clippy::too_many_arguments)]
fn start(
    worker: &Arc<Context>,
    conf: &config::Listener,
    tcp: TcpStream,
    client: std::net::IpAddr,
    client_slot: Option<ClientSlot>,
    permit: tokio::sync::OwnedSemaphorePermit,
    alt_svc: &Option<http::HeaderValue>,
    graceful: &GracefulShutdown,
) {
    let state = &worker.state;
    let watcher = graceful.watcher();
    let worker = worker.clone();
    // Per connection, so a reload's limits apply to the next connection.
    let builder = state.snapshot.load().http.clone();
    let tls = conf.tls;
    let redirect = conf.redirect_https;
    let proxy_protocol = conf.proxy_protocol;
    let conn_alt_svc = alt_svc.clone();
    // The first request head is due this long after accept, TLS and PROXY header included.
    let head_by =
        tokio::time::Instant::now() + state.snapshot.load().config.limits.header_read_timeout;
    tokio::spawn(async move {
        let state = &worker.state;
        let mut tcp = tcp;
        let mut client = client;
        let mut client_slot = client_slot;
        if proxy_protocol {
            match proxied_client(state, &mut tcp, client).await {
                Some((c, slot)) => (client, client_slot) = (c, slot),
                None => return,
            }
        }
        // Held for as long as the connection, or its upgrade, lives.
        let slot = Arc::new(ConnSlot {
            _permit: permit,
            client: client_slot,
        });
        state.metrics.connections_open.inc();
        let mut info = ConnInfo::new(client, tls, redirect, slot);
        info.alt_svc = conn_alt_svc;
        if tls {
            serve_tls(&worker, &builder, tcp, info, watcher, head_by).await;
        } else {
            serve(&worker, &builder, TokioIo::new(tcp), info, watcher, head_by).await;
        }
        state.metrics.connections_open.dec();
    });
}

/// An admitted connection: a normal close again (a reset would drop a response still in the
/// send buffer), and on this worker's event loop. TCP_NODELAY is inherited.
fn register(tcp: mio::net::TcpStream) -> Option<TcpStream> {
    if let Err(e) = socket2::SockRef::from(&tcp).set_linger(None) {
        warn!(error = %e, "cannot set up a connection");
        return None;
    }
    TcpStream::from_std(std::net::TcpStream::from(tcp))
        .map_err(|e| warn!(error = %e, "cannot register a connection"))
        .ok()
}

/// Closes a refused connection with an RST: it inherited zero linger from the listening
/// socket (`worker::bind`), so no FIN exchange and no TIME_WAIT socket is left behind per
/// attempt, which is what a flood of them would otherwise cost.
fn reset(tcp: mio::net::TcpStream) {
    drop(tcp);
}

/// Whether a client may open another connection: not blocked, and under
/// `limits.max_connections_per_client` (allow-listed clients and trusted proxies are exempt,
/// so a front proxy is never capped for its users). `Err` carries the rejection to count.
pub(super) fn admit_client(
    state: &AppState,
    client: std::net::IpAddr,
) -> Result<Option<ClientSlot>, Rejected<'_>> {
    let snap = state.snapshot.load();
    let verdict = snap.policy.decide(&state.temp, client);
    if let Verdict::Block(_) = verdict {
        return Err(Rejected {
            reason: &state.metrics.rejected.blocked,
            repeated: false,
        });
    }
    if matches!(verdict, Verdict::Allow(_)) || snap.trusted.contains(client) {
        return Ok(None);
    }
    let key = client_key(client, snap.config.rate_limit.ipv6_prefix);
    let cap = snap.config.limits.max_connections_per_client;
    match state.conn_counts.acquire(key, cap) {
        Ok(slot) => Ok(Some(slot)),
        Err(refused) => Err(Rejected {
            reason: &state.metrics.rejected.per_client,
            repeated: refused > tarpit::REPEATED,
        }),
    }
}

/// Why a connection is refused: the counter to count it in, and whether its client keeps
/// reconnecting over its cap (see [`tarpit`]).
pub(super) struct Rejected<'a> {
    pub reason: &'a prometheus::IntCounter,
    pub repeated: bool,
}

/// On a `proxy_protocol` listener: the client named by the PROXY header of a trusted peer,
/// with its connection slot, or `None` when the connection must be closed (untrusted peer,
/// bad header, blocked client, client over its connection cap).
async fn proxied_client(
    state: &AppState,
    tcp: &mut TcpStream,
    peer: std::net::IpAddr,
) -> Option<(std::net::IpAddr, Option<ClientSlot>)> {
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
    match admit_client(state, client) {
        Ok(slot) => Some((client, slot)),
        // Closed, never held: the connection is the trusted proxy's.
        Err(rejected) => {
            rejected.reason.inc();
            None
        }
    }
}

async fn serve_tls(
    worker: &Arc<Context>,
    builder: &auto::Builder<TokioExecutor>,
    tcp: TcpStream,
    info: ConnInfo,
    watcher: hyper_util::server::graceful::Watcher,
    head_by: tokio::time::Instant,
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
    let by = head_by.min(tokio::time::Instant::now() + timeout);
    match tokio::time::timeout_at(by, acceptor.accept(tcp)).await {
        Ok(Ok(stream))
            if stream.get_ref().1.alpn_protocol() == Some(crate::state::challenges::ALPN) =>
        {
            // A TLS-ALPN-01 validation ends with the handshake (RFC 8737 §3).
            debug!("acme-tls/1 handshake done");
        }
        Ok(Ok(stream)) => {
            serve(
                worker,
                builder,
                TokioIo::new(stream),
                info,
                watcher,
                head_by,
            )
            .await
        }
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

/// Serves one connection. Whatever the protocol, its first request head must arrive by
/// `head_by`, `limits.header_read_timeout` after accept: hyper's own timer covers
/// HTTP/1.1 heads once it knows the protocol, but not a connection that sends nothing, or
/// part of the HTTP/2 preface.
/// An HTTP/2 connection without an open stream for `limits.http2_idle_timeout` is closed.
pub(super) async fn serve<I>(
    worker: &Arc<Context>,
    builder: &auto::Builder<TokioExecutor>,
    io: TokioIo<I>,
    info: ConnInfo,
    watcher: hyper_util::server::graceful::Watcher,
    head_by: tokio::time::Instant,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (h2_idle, write_idle) = {
        let limits = &worker.state.snapshot.load().config.limits;
        (limits.http2_idle_timeout, limits.write_idle_timeout)
    };
    let info = Arc::new(info);
    let activity = Arc::new(Activity::default());
    let (w, a) = (worker.clone(), activity.clone());
    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let guard = Some(a.started(req.version() == http::Version::HTTP_2));
        // Boxed: the request path's future is large, and hyper moves the service's future
        // (into an HTTP/2 stream's task, say); a pointer moves cheaper than kilobytes.
        let reply = Box::pin(proxy::handle(
            w.clone(),
            info.clone(),
            req.map(ClientBody::Hyper),
        ));
        async move {
            let (resp, held) = reply.await?;
            let body = |body| Tracked {
                body,
                guard,
                _held: held,
            };
            Ok::<_, std::convert::Infallible>(resp.map(body))
        }
    });
    let conn = watcher.watch(builder.serve_connection_with_upgrades(io, service));
    tokio::pin!(conn);
    let timed_out = |reason: &str| {
        worker
            .state
            .metrics
            .timed_out
            .with_label_values(&[reason])
            .inc()
    };
    // Checked a few times per timeout, with no clock read per request: the first request
    // head by `head_by`; then an HTTP/2 connection with no stream open and none started or
    // ended; a response with a body open that is neither read by the client nor waiting on
    // the upstream.
    let tick = h2_idle.min(write_idle) / 4;
    let (mut idle, mut stalled) = (Quiet::default(), Quiet::default());
    loop {
        let first = activity.requests.load(Ordering::Relaxed) == 0;
        let next = tokio::time::Instant::now() + tick;
        tokio::select! {
            r = &mut conn => return ended(r),
            _ = tokio::time::sleep_until(if first { next.min(head_by) } else { next }) => {}
        }
        if activity.requests.load(Ordering::Relaxed) == 0 {
            if tokio::time::Instant::now() >= head_by {
                timed_out("first_request");
                return;
            }
            continue;
        }
        let h2 = activity.h2.load(Ordering::Relaxed);
        let open = activity.open.load(Ordering::Relaxed);
        if h2 && idle.still(activity.moves(), open == 0) * tick >= h2_idle {
            timed_out("http2_idle");
            return;
        }
        let unread = open > activity.waiting.load(Ordering::Relaxed);
        if stalled.still((activity.polls.load(Ordering::Relaxed), 0), unread) * tick >= write_idle {
            timed_out("write_idle");
            return;
        }
    }
}

/// How many checks in a row a condition held with nothing moving.
#[derive(Default)]
struct Quiet {
    seen: (u64, u64),
    checks: u32,
}

impl Quiet {
    fn still(&mut self, now: (u64, u64), holds: bool) -> u32 {
        self.checks = if holds && now == self.seen {
            self.checks + 1
        } else {
            0
        };
        self.seen = now;
        self.checks
    }
}

fn ended(r: Result<(), Box<dyn std::error::Error + Send + Sync>>) {
    if let Err(e) = r {
        debug!(error = %e, "connection ended with an error");
    }
}

/// What a connection's requests are doing, for its timeouts.
#[derive(Default)]
struct Activity {
    /// Requests whose head has arrived.
    requests: AtomicU64,
    /// Whether they came over HTTP/2.
    h2: AtomicBool,
    /// Responses that have not ended yet.
    open: AtomicUsize,
    /// Responses that have ended.
    ended: AtomicU64,
    /// Of the open responses, those whose body waits on the upstream.
    waiting: AtomicUsize,
    /// Polls of response bodies: they stop when the client stops reading.
    polls: AtomicU64,
}

impl Activity {
    fn started(self: &Arc<Self>, h2: bool) -> StreamGuard {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if h2 {
            self.h2.store(true, Ordering::Relaxed);
        }
        self.open.fetch_add(1, Ordering::Relaxed);
        StreamGuard {
            activity: self.clone(),
            waiting: false,
        }
    }

    /// Changes whenever a stream starts or ends.
    fn moves(&self) -> (u64, u64) {
        (
            self.requests.load(Ordering::Relaxed),
            self.ended.load(Ordering::Relaxed),
        )
    }
}

/// An open response: ends when its body is done or dropped.
struct StreamGuard {
    activity: Arc<Activity>,
    /// Its body's last poll found nothing from the upstream yet.
    waiting: bool,
}

impl StreamGuard {
    fn polled(&mut self, pending: bool) {
        let a = &self.activity;
        a.polls.fetch_add(1, Ordering::Relaxed);
        if pending != self.waiting {
            self.waiting = pending;
            if pending {
                a.waiting.fetch_add(1, Ordering::Relaxed);
            } else {
                a.waiting.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.polled(false);
        self.activity.ended.fetch_add(1, Ordering::Relaxed);
        self.activity.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its response counted as open until it ends, and notes how
/// it is read.
struct Tracked {
    body: proxy::Body,
    guard: Option<StreamGuard>,
    /// The request's place among its client's requests in flight, and its upstream slot.
    _held: proxy::Held,
}

impl hyper::body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(None) => self.guard = None,
            p => {
                if let Some(g) = self.guard.as_mut() {
                    g.polled(p.is_pending());
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}
