//! What the gateway answers itself when a request is not proxied: one status, one outcome
//! (the `ipgate_requests_total` label) and one short text per reason.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::observe::metrics::outcome;
use crate::serve::admission::Refusal;
use crate::serve::request::Invalid;

/// Response bodies: the upstream's, streamed, or a short one of ipgate's own.
pub type Body = Either<Incoming, Full<Bytes>>;

/// Why a request was not proxied; each maps to one status, one outcome and one answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is ambiguous or malformed (400), or a method not forwarded (405).
    #[error("{0}")]
    Invalid(#[from] Invalid),
    #[error("no site for this host")]
    NoSite,
    #[error("client is blocked")]
    Blocked,
    #[error("client is not in the allow lists of this site or route")]
    Denied,
    /// Over the rate limit; the client may retry after this many seconds.
    #[error("rate limited")]
    RateLimited(u64),
    #[error("upstream unreachable: {0}")]
    UpstreamConnect(#[source] std::io::Error),
    #[error("upstream failed: {0}")]
    UpstreamProtocol(#[source] hyper::Error),
    #[error("upstream sent no response head in time")]
    UpstreamTimeout,
    /// The client stopped sending its request body (408).
    #[error("the request body stopped coming")]
    BodyIdle,
    /// The client's request body broke off (it closed, or sent a malformed chunk): 400.
    #[error("the request body broke off")]
    BodyFailed,
    /// Every one of the site's `max_upstream_connections` stayed busy for
    /// `limits.upstream_queue_timeout` (503).
    #[error("every upstream connection of the site is busy")]
    UpstreamBusy,
}

impl From<Refusal> for Error {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Blocked => Error::Blocked,
            Refusal::Denied => Error::Denied,
            Refusal::RateLimited(secs) => Error::RateLimited(secs),
            Refusal::Busy => Error::RateLimited(1),
            // Answered by the challenge's page before it comes to this; 403 otherwise.
            Refusal::Challenge { .. } => Error::Denied,
        }
    }
}

impl Error {
    pub fn status(&self) -> StatusCode {
        match self {
            Error::Invalid(Invalid::Connect) => StatusCode::METHOD_NOT_ALLOWED,
            Error::Invalid(_) => StatusCode::BAD_REQUEST,
            Error::NoSite => StatusCode::MISDIRECTED_REQUEST,
            Error::Blocked | Error::Denied => StatusCode::FORBIDDEN,
            Error::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::UpstreamConnect(_) | Error::UpstreamProtocol(_) => StatusCode::BAD_GATEWAY,
            Error::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Error::BodyIdle => StatusCode::REQUEST_TIMEOUT,
            Error::BodyFailed => StatusCode::BAD_REQUEST,
            Error::UpstreamBusy => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn outcome(&self) -> &'static str {
        match self {
            Error::Invalid(_) | Error::BodyIdle | Error::BodyFailed => outcome::BAD_REQUEST,
            Error::NoSite => outcome::MISDIRECTED,
            Error::Blocked => outcome::BLOCKED,
            Error::Denied => outcome::DENIED,
            Error::RateLimited(_) => outcome::RATE_LIMITED,
            _ => outcome::UPSTREAM_ERROR,
        }
    }
}

impl From<&Error> for Response<Body> {
    fn from(e: &Error) -> Self {
        let status = e.status();
        let text = match e {
            Error::Invalid(Invalid::Connect) => "405 method not allowed\n",
            Error::Invalid(_) | Error::BodyFailed => "400 bad request\n",
            Error::NoSite => "421 no site is configured for this host\n",
            Error::Blocked | Error::Denied => "403 forbidden\n",
            Error::RateLimited(_) => "429 too many requests\n",
            Error::UpstreamConnect(_) | Error::UpstreamProtocol(_) => "502 bad gateway\n",
            Error::UpstreamTimeout => "504 gateway timeout\n",
            Error::BodyIdle => "408 request timeout: the request body stopped coming\n",
            Error::UpstreamBusy => "503 service unavailable: the site is busy\n",
        };
        let mut resp = plain(status, text);
        match e {
            Error::RateLimited(secs) => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*secs));
            }
            Error::UpstreamBusy => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Error::Invalid(Invalid::Connect) => {
                resp.headers_mut().insert(
                    header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"),
                );
            }
            _ => {}
        }
        resp
    }
}

/// A short text response of ipgate's own.
pub fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from_static(
        text.as_bytes(),
    ))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
