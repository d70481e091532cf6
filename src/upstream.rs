//! The upstream side of a request: keep-alive HTTP/1.1 connections to the sites' web servers,
//! one pool per worker thread, on hyper's connection API.
//!
//! Why not hyper-util's pooled client: each worker has its own pool anyway, so the shared
//! pool's machinery (checkout futures, connect racing, per-request URI rebuilding) is pure
//! cost (README, Performance). The HTTP work stays hyper's; this module only keeps idle
//! connections.
//!
//! Rules: a connection goes back to the pool once its response has been read to the end
//! (`ready`); at most [`MAX_IDLE`] idle connections per upstream and worker; one idle for
//! longer than [`IDLE_TIMEOUT`] is closed instead of reused; a request that an idle connection
//! refused before writing a byte (the upstream had closed it) is retried on another one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;

use crate::body::UpstreamBody;
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
    // never contended, held for a push or a pop.
    idle: Mutex<HashMap<Authority, Vec<Idle>, foldhash::fast::RandomState>>,
}

impl Pool {
    /// Sends `req` (origin-form URI, Host set) to `upstream` on an idle connection or a new one.
    pub async fn send(
        self: &Arc<Self>,
        upstream: &Authority,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, Error> {
        while let Some(mut sender) = self.checkout(upstream) {
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    self.give_back(upstream, sender);
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    // Not a byte was written: the upstream had closed this connection.
                    Some(unsent) => req = unsent,
                    None => return Err(Error::Protocol(e.into_error())),
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

    /// The most recently used idle connection that is still open and fresh.
    fn checkout(&self, key: &Authority) -> Option<http1::SendRequest<UpstreamBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(key)?;
        while let Some(c) = list.pop() {
            if c.sender.is_ready() && c.since.elapsed() < IDLE_TIMEOUT {
                return Some(c.sender);
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
        let list = match idle.get_mut(key) {
            Some(l) => l,
            None => idle.entry(key.clone()).or_default(),
        };
        if list.len() < MAX_IDLE {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }
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
