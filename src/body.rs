//! The request body sent upstream, with an idle timeout (SPEC 16): a client that stops
//! sending its body mid-way holds an upstream connection (an Apache worker) for no longer than
//! `limits.body_idle_timeout`. The timer is made only when the body first has to wait, so a
//! body that streams, or a request without one, costs no allocation.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Sleep;

/// Why a request body ended early.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the client sent no body data for {0:?}")]
    Idle(Duration),
    #[error("{0}")]
    Client(#[from] hyper::Error),
}

/// A client's request body on its way to the upstream.
pub struct UpstreamBody {
    inner: Incoming,
    idle: Duration,
    timer: Option<Pin<Box<Sleep>>>,
}

impl UpstreamBody {
    pub fn new(inner: Incoming, idle: Duration) -> UpstreamBody {
        UpstreamBody {
            inner,
            idle,
            timer: None,
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
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                self.timer = None;
                Poll::Ready(frame.map(|f| f.map_err(Error::from)))
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

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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
