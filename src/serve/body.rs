//! The request body sent upstream. A small body is read whole before an upstream
//! connection is taken (`limits.request_buffer_bytes`), so a slow client holds no Apache
//! worker while it types; a larger one streams, and a client that stops sending it mid-way
//! holds its upstream connection for no longer than `limits.body_idle_timeout`. The timer is
//! made only when the body first has to wait, so a body that streams, or a request without
//! one, costs no allocation.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Sleep;

/// Why a request body ended early.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the client sent no body data for {0:?}")]
    Idle(Duration),
    #[error("{0}")]
    Client(#[from] hyper::Error),
    #[error("HTTP/3: {0}")]
    Http3(#[from] h3::error::StreamError),
    #[error("the body is not as long as its Content-Length")]
    Length,
}

/// A client's request body as it arrives: hyper's (HTTP/1.1, HTTP/2), or an HTTP/3 stream's
/// (see `serve::quic`).
pub enum ClientBody {
    Hyper(Incoming),
    /// Boxed: it is larger than hyper's, and would grow every request's future.
    Http3(Box<H3Body>),
}

/// An HTTP/3 request's body as the request path reads it: the stream's data, held to the
/// request's `Content-Length` when it has one.
pub struct H3Body {
    stream: h3::server::RequestStream<h3_quinn::RecvStream, Bytes>,
    /// What `Content-Length` declared that has not come yet.
    left: Option<u64>,
    ended: bool,
    /// What the first look at the stream found, not yet handed on.
    first: Option<Result<Frame<Bytes>, Error>>,
}

impl H3Body {
    /// The body of a request whose head just came. Its stream is looked at once, without
    /// waiting: a client usually ends a request without a body in the packet of its head,
    /// and a body known to be empty is not mistaken for an upload.
    pub fn new(
        stream: h3::server::RequestStream<h3_quinn::RecvStream, Bytes>,
        left: Option<u64>,
    ) -> H3Body {
        let mut body = H3Body {
            stream,
            left,
            ended: false,
            first: None,
        };
        let mut look = Context::from_waker(std::task::Waker::noop());
        if let Poll::Ready(Some(frame)) = body.poll_stream(&mut look) {
            body.first = Some(frame);
        }
        body
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        match self.first.take() {
            Some(frame) => Poll::Ready(Some(frame)),
            None => self.poll_stream(cx),
        }
    }

    fn poll_stream(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match std::task::ready!(self.stream.poll_recv_data(cx)) {
            Ok(Some(mut data)) => {
                let bytes = data.copy_to_bytes(data.remaining());
                if let Some(left) = self.left.as_mut() {
                    match left.checked_sub(bytes.len() as u64) {
                        Some(l) => *left = l,
                        None => return Poll::Ready(Some(Err(Error::Length))),
                    }
                }
                Poll::Ready(Some(Ok(Frame::data(bytes))))
            }
            Ok(None) => {
                self.ended = true;
                if self.left.is_some_and(|l| l > 0) {
                    return Poll::Ready(Some(Err(Error::Length)));
                }
                Poll::Ready(None)
            }
            Err(e) => Poll::Ready(Some(Err(Error::from(e)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.first.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let first = match &self.first {
            Some(Ok(frame)) => frame.data_ref().map_or(0, |d| d.len() as u64),
            _ => 0,
        };
        match self.left {
            Some(left) if !self.ended => SizeHint::with_exact(left + first),
            Some(_) => SizeHint::with_exact(first),
            None => {
                let mut hint = SizeHint::default();
                hint.set_lower(first);
                hint
            }
        }
    }
}

impl ClientBody {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        match self {
            ClientBody::Hyper(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(Error::from))),
            ClientBody::Http3(b) => b.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Hyper(b) => b.is_end_stream(),
            ClientBody::Http3(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Hyper(b) => b.size_hint(),
            ClientBody::Http3(b) => b.size_hint(),
        }
    }
}

/// A client's request body on its way to the upstream: what [`UpstreamBody::read_small`]
/// read ahead, then the rest as the client sends it.
pub struct UpstreamBody {
    /// Frames read before the upstream connection was taken, in order.
    read: VecDeque<Frame<Bytes>>,
    /// The client's body still to come; `None` once it has ended.
    inner: Option<ClientBody>,
    idle: Duration,
    timer: Option<Pin<Box<Sleep>>>,
}

impl UpstreamBody {
    /// The client's body, streamed as it comes.
    pub fn new(inner: ClientBody, idle: Duration) -> UpstreamBody {
        UpstreamBody {
            read: VecDeque::new(),
            inner: Some(inner),
            idle,
            timer: None,
        }
    }

    /// A body that is all here already.
    #[cfg(test)]
    pub fn whole(data: Bytes) -> UpstreamBody {
        UpstreamBody {
            read: VecDeque::from([Frame::data(data)]),
            inner: None,
            idle: Duration::ZERO,
            timer: None,
        }
    }

    /// Whether more of the body is still to come from the client.
    pub fn is_streaming(&self) -> bool {
        self.inner.as_ref().is_some_and(|b| !b.is_end_stream())
    }

    /// A copy to send again, when the body is all here (read whole, or empty).
    pub fn replay(&self) -> Option<UpstreamBody> {
        if self.inner.as_ref().is_some_and(|b| !b.is_end_stream()) {
            return None;
        }
        let mut read = VecDeque::with_capacity(self.read.len());
        for frame in &self.read {
            read.push_back(Frame::data(frame.data_ref()?.clone()));
        }
        Some(UpstreamBody {
            read,
            inner: None,
            idle: self.idle,
            timer: None,
        })
    }

    /// Reads the client's body ahead while it stays within `limit` bytes, so a small body
    /// (a login form) is whole before an upstream connection is taken for it, however
    /// slowly it comes (as nginx's request buffering). A body declared larger is
    /// not read ahead; one that turns out larger is sent on as it comes, after what was
    /// read. Each wait for data is bounded by `idle`.
    pub async fn read_small(
        inner: ClientBody,
        limit: usize,
        idle: Duration,
    ) -> Result<UpstreamBody, Error> {
        let mut body = UpstreamBody::new(inner, idle);
        let declared = body.size_hint().upper().unwrap_or(0);
        if limit == 0 || declared > limit as u64 || body.is_end_stream() {
            return Ok(body);
        }
        // Coalesced into one buffer: a client sending its body a byte per chunk holds
        // `limit` bytes, not a frame (and an allocation) per byte.
        let mut data = bytes::BytesMut::new();
        let mut rest = None;
        while data.len() <= limit {
            let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_inner(cx)).await
            else {
                break;
            };
            match frame?.into_data() {
                Ok(chunk) => data.extend_from_slice(&chunk),
                // Trailers: the body ends with them.
                Err(trailers) => {
                    rest = Some(trailers);
                    break;
                }
            }
        }
        if !data.is_empty() {
            body.read.push_back(Frame::data(data.freeze()));
        }
        body.read.extend(rest);
        Ok(body)
    }

    /// The next frame from the client, with the idle timer.
    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                self.timer = None;
                if frame.is_none() {
                    self.inner = None;
                }
                Poll::Ready(frame)
            }
            Poll::Pending => {
                let idle = self.idle;
                let timer = self
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Error::Idle(idle)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        if let Some(frame) = self.read.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        self.poll_inner(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty() && self.inner.as_ref().is_none_or(ClientBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let read: u64 = self
            .read
            .iter()
            .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
            .sum();
        match &self.inner {
            None => SizeHint::with_exact(read),
            Some(inner) => {
                let rest = inner.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + read);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + read);
                }
                hint
            }
        }
    }
}

/// Whether an upstream request failed because the client's body went idle.
pub fn went_idle(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(Error::Idle(_)) = s.downcast_ref::<Error>() {
            return true;
        }
        source = s.source();
    }
    false
}
