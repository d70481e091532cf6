//! Upgraded connections (WebSocket) spliced to their upstream, under the limits an upgrade
//! keeps: the client's connection slots, an idle timeout, and shutdown's grace.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::decide::clients::ConnSlot;
use crate::decide::clock::now_ms;

/// An upgraded connection (WebSocket) spliced to its upstream: it keeps the client's
/// connection slots, is closed after `limits.upgrade_idle_timeout` without a byte either
/// way, and at shutdown once the grace period is over.
pub struct Splice {
    pub slot: Arc<ConnSlot>,
    /// One of the site's `max_upstream_connections`, held while the splice lasts.
    pub upstream_slot: Option<tokio::sync::OwnedSemaphorePermit>,
    pub idle: std::time::Duration,
    pub grace: std::time::Duration,
    pub stop: tokio::sync::watch::Receiver<bool>,
    pub timed_out: prometheus::IntCounter,
}

impl Splice {
    pub async fn run(self, client: hyper::upgrade::Upgraded, upstream: hyper::upgrade::Upgraded) {
        let Splice {
            slot: _slot,
            upstream_slot: _upstream_slot,
            idle,
            grace,
            mut stop,
            timed_out,
        } = self;
        let last = Arc::new(AtomicU64::new(now_ms()));
        let mut client = Touched::new(TokioIo::new(client), last.clone());
        let mut upstream = Touched::new(TokioIo::new(upstream), last.clone());
        let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
        tokio::pin!(copy);
        let stopping = async {
            let _ = stop.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        };
        tokio::pin!(stopping);
        loop {
            tokio::select! {
                _ = &mut copy => return,
                _ = &mut stopping => return,
                _ = tokio::time::sleep(idle / 4) => {}
            }
            let quiet = now_ms().saturating_sub(last.load(Ordering::Relaxed));
            if quiet >= idle.as_millis() as u64 {
                timed_out.inc();
                return;
            }
        }
    }
}

/// An I/O that notes when it last read a byte.
struct Touched<T> {
    io: T,
    last: Arc<AtomicU64>,
}

impl<T> Touched<T> {
    fn new(io: T, last: Arc<AtomicU64>) -> Self {
        Touched { io, last }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Touched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.last.store(now_ms(), Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Touched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
