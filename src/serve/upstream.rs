//! The upstream side of a request: keep-alive HTTP/1.1 connections to the sites' web servers,
//! one pool per worker thread, on hyper's connection API.
//!
//! Why not hyper-util's pooled client: each worker has its own pool anyway, so the shared
//! pool's machinery (checkout futures, connect racing, per-request URI rebuilding) is pure
//! cost (docs/benchmarks.md). The HTTP work stays hyper's; this module only keeps idle
//! connections.
//!
//! Rules: a connection goes back to the pool once its response has been read to the end
//! (`ready`); at most [`MAX_IDLE`] idle connections per upstream and worker; one idle for
//! longer than [`IDLE_TIMEOUT`] is closed instead of reused; a request that an idle connection
//! refused before writing a byte (the upstream had closed it) is retried on another one.
//!
//! The keep-alive race: an upstream closes an idle connection (Apache after its 5 s
//! `KeepAliveTimeout`) just as a request is written to it, before this worker has read the
//! close. The request then fails with no response byte. Like nginx and HAProxy, an idempotent
//! request whose body is all here is then sent once more on a new connection. Only a
//! connection idle for at least [`RACE_IDLE`] can meet that race, so only then is the request
//! head copied for it: busy connections cost nothing extra.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;

use crate::serve::body::UpstreamBody;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

/// Idle connections kept per upstream and worker thread.
pub const MAX_IDLE: usize = 512;

/// Read buffer of an upstream connection.
const UPSTREAM_BUFFER: usize = 64 * 1024;
/// An idle connection older than this is closed rather than reused.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A connection idle for less than this is not closed by an upstream's keep-alive timeout
/// (Apache's shortest in practice is 1 s), so a request sent on it keeps no copy for a retry.
pub const RACE_IDLE: Duration = Duration::from_millis(250);
/// Time allowed for the TCP connect to an upstream.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an upstream request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("{0}")]
    Protocol(#[source] hyper::Error),
}

struct Idle {
    sender: http1::SendRequest<UpstreamBody>,
    since: Instant,
}

/// One worker's idle upstream connections, by upstream authority.
#[derive(Default)]
pub struct Pool {
    // Locked by this worker's thread only (the futures must be `Send`, so no `RefCell`):
    // never contended, held for a push or a pop. Keyed by the authority's text: `Authority`
    // hashes case-insensitively a byte at a time, which cost ~600 instructions a lookup.
    idle: Mutex<HashMap<Box<str>, Vec<Idle>, foldhash::fast::RandomState>>,
}

impl Pool {
    /// Sends `req` (origin-form URI, Host set) to `upstream` on an idle connection or a new one.
    pub async fn send(
        self: &Arc<Self>,
        upstream: &Authority,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, Error> {
        while let Some((mut sender, idle_for)) = self.checkout(upstream) {
            // Boxed: rarely made, and inline it would add a request's size to every
            // request's future.
            let again = (idle_for >= RACE_IDLE).then(|| replay(&req)).flatten();
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    self.give_back(upstream, sender);
                    return Ok(resp);
                }
                Err(mut e) => match (e.take_message(), again) {
                    // Not a byte was written: the upstream had closed this connection.
                    (Some(unsent), _) => req = unsent,
                    // Closed before a response byte: the keep-alive race (module docs).
                    (None, Some(again)) if e.error().is_incomplete_message() => {
                        debug!("upstream closed an idle connection as it was reused: sent again");
                        req = *again;
                    }
                    (None, _) => return Err(Error::Protocol(e.into_error())),
                },
            }
        }
        // Boxed: the connect future (DNS, TCP, handshake) is large and rarely needed; kept
        // inline it would be copied with every request's future.
        let mut sender = Box::pin(connect(upstream)).await?;
        let resp = sender.send_request(req).await.map_err(Error::Protocol)?;
        self.give_back(upstream, sender);
        Ok(resp)
    }

    /// The most recently used idle connection that is still open and fresh, and how long it
    /// was idle.
    fn checkout(&self, key: &Authority) -> Option<(http1::SendRequest<UpstreamBody>, Duration)> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(key.as_str())?;
        while let Some(c) = list.pop() {
            let idle_for = c.since.elapsed();
            if c.sender.is_ready() && idle_for < IDLE_TIMEOUT {
                return Some((c.sender, idle_for));
            }
        }
        None
    }

    /// Returns the connection to the pool once the response has been read to its end; a
    /// connection that ends instead (closed, upgraded, body abandoned) is dropped.
    fn give_back(
        self: &Arc<Self>,
        upstream: &Authority,
        mut sender: http1::SendRequest<UpstreamBody>,
    ) {
        if sender.is_ready() {
            self.put(upstream, sender);
            return;
        }
        let (pool, key) = (self.clone(), upstream.clone());
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                pool.put(&key, sender);
            }
        });
    }

    fn put(&self, key: &Authority, sender: http1::SendRequest<UpstreamBody>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = match idle.get_mut(key.as_str()) {
            Some(l) => l,
            None => idle.entry(key.as_str().into()).or_default(),
        };
        if list.len() < MAX_IDLE {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }
}

/// A copy of an idempotent request (RFC 9110 9.2.2) whose body is all here, to send again.
fn replay(req: &Request<UpstreamBody>) -> Option<Box<Request<UpstreamBody>>> {
    if !req.method().is_idempotent() {
        return None;
    }
    let mut again = Request::new(req.body().replay()?);
    *again.method_mut() = req.method().clone();
    *again.uri_mut() = req.uri().clone();
    *again.version_mut() = req.version();
    *again.headers_mut() = req.headers().clone();
    Some(Box::new(again))
}

async fn connect(upstream: &Authority) -> Result<http1::SendRequest<UpstreamBody>, Error> {
    let host = upstream.host();
    // `[2001:db8::1]` in a URI; the socket wants the bare address.
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port = upstream.port_u16().unwrap_or(80);
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port)))
        .await
        .map_err(|_| Error::Connect(std::io::ErrorKind::TimedOut.into()))?
        .map_err(Error::Connect)?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = http1::Builder::new()
        .writev(false)
        // What is read ahead of a client that reads slowly: 64 KiB, not hyper's ~400 KiB
        // (nginx's proxy buffers hold 32 to 64 KiB).
        .max_buf_size(UPSTREAM_BUFFER)
        .handshake(TokioIo::new(tcp))
        .await
        .map_err(Error::Protocol)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An upstream on plain threads: answers each request with "ok", and closes its first
    /// connection when told to.
    fn upstream() -> (Authority, Arc<AtomicUsize>, std::sync::mpsc::Sender<()>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (close_first, told) = std::sync::mpsc::channel::<()>();
        let count = accepted.clone();
        std::thread::spawn(move || {
            let mut told = Some(told);
            for tcp in listener.incoming() {
                let Ok(mut tcp) = tcp else { return };
                count.fetch_add(1, Ordering::SeqCst);
                let close_when = told.take();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let n = tcp.read(&mut buf).unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    let _ = tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                    match close_when {
                        // Idle until told, then closed: a keep-alive timeout on the upstream.
                        Some(told) => {
                            let _ = told.recv();
                            let _ = tcp.shutdown(std::net::Shutdown::Both);
                        }
                        None => while tcp.read(&mut buf).unwrap_or(0) > 0 {},
                    }
                });
            }
        });
        (addr.to_string().parse().unwrap(), accepted, close_first)
    }

    fn request(method: &str, upstream: &Authority) -> Request<UpstreamBody> {
        Request::builder()
            .method(method)
            .uri("/")
            .header("host", upstream.as_str())
            .body(UpstreamBody::whole(bytes::Bytes::from_static(b"x=1")))
            .unwrap()
    }

    /// The upstream closes an idle pooled connection, and the gateway sends its next request
    /// (`method`) before it has noticed (its worker was busy). Deterministic: the test's
    /// single-threaded runtime does not run the connection task while the test blocks.
    /// Returns the second request's outcome and the connections the upstream accepted.
    async fn race(method: &str) -> (Result<Response<Incoming>, Error>, usize) {
        let (upstream, accepted, close_first) = upstream();
        let pool = Arc::new(Pool::default());
        let resp = pool
            .send(&upstream, request("GET", &upstream))
            .await
            .unwrap();
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
        // Back in the pool once the response has ended.
        for _ in 0..100 {
            if pool
                .idle
                .lock()
                .unwrap()
                .get(upstream.as_str())
                .map_or(0, Vec::len)
                == 1
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(pool.idle.lock().unwrap()[upstream.as_str()].len(), 1);
        // Closed by the upstream while this runtime is blocked: the pooled connection still
        // looks ready when the next request takes it.
        close_first.send(()).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let result = pool.send(&upstream, request(method, &upstream)).await;
        (result, accepted.load(Ordering::SeqCst))
    }

    /// The keep-alive race: an idempotent request goes out again on a new connection,
    /// instead of failing as a 502.
    #[tokio::test(flavor = "current_thread")]
    async fn an_idempotent_request_that_meets_a_connection_closed_while_idle_is_sent_again() {
        for method in ["GET", "PUT", "DELETE"] {
            let (result, accepted) = race(method).await;
            let resp = result.unwrap_or_else(|e| panic!("{method}: {e}"));
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
            assert_eq!(accepted, 2, "{method}");
        }
    }

    /// A POST may have been acted on: it is not sent twice (502, as nginx and HAProxy do).
    #[tokio::test(flavor = "current_thread")]
    async fn a_post_that_meets_a_connection_closed_while_idle_is_not_sent_again() {
        let (result, accepted) = race("POST").await;
        match result {
            Err(Error::Protocol(e)) => assert!(e.is_incomplete_message(), "{e}"),
            other => panic!("{:?}", other.map(|r| r.status())),
        }
        assert_eq!(accepted, 1);
    }
}
