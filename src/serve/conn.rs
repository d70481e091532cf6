//! What the request path knows about the connection a request came on.

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderValue, Version};

use crate::decide::clients::ConnSlot;
use crate::serve::headers::format_ip;

/// A client connection as the request path sees it.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client at connection level: the peer, or the PROXY header's source.
    pub client: IpAddr,
    pub tls: bool,
    /// The listener answers with redirects to HTTPS (`redirect_https`).
    pub redirect: bool,
    /// `client` as a header value, formatted once per connection (cloning it per request
    /// is a reference count, not an allocation).
    pub client_value: HeaderValue,
    /// The connection's slots; an upgrade spliced from it holds them too.
    pub slot: Arc<ConnSlot>,
    /// The `Alt-Svc` a TLS listener with `http3 = true` adds to its responses.
    pub alt_svc: Option<HeaderValue>,
    /// The requests came over HTTP/3 (see `serve::quic`).
    pub h3: bool,
}

impl ConnInfo {
    pub fn new(client: IpAddr, tls: bool, redirect: bool, slot: Arc<ConnSlot>) -> ConnInfo {
        let mut buf = [0u8; 64];
        let client_value = HeaderValue::from_str(format_ip(client, &mut buf))
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        ConnInfo {
            client,
            tls,
            redirect,
            client_value,
            slot,
            alt_svc: None,
            h3: false,
        }
    }

    /// The version the client spoke: the request's own, or HTTP/3.
    pub fn version(&self, seen: Version) -> Version {
        if self.h3 {
            Version::HTTP_3
        } else {
            seen
        }
    }
}

/// The last touches to a response: while the gateway drains (shutting down or handing over
/// to an upgrade), an HTTP/1 response closes its connection, so the client's next request
/// goes to a new connection and the process that serves on (HTTP/2 connections get a GOAWAY
/// instead, and a 101 keeps its `Connection: upgrade`); a TLS listener with HTTP/3
/// advertises it (`Alt-Svc`).
pub fn finish<B>(
    state: &crate::state::AppState,
    conn: &ConnInfo,
    version: http::Version,
    mut resp: http::Response<B>,
) -> http::Response<B> {
    if state.draining.load(std::sync::atomic::Ordering::Relaxed)
        && version < http::Version::HTTP_2
        && resp.status() != http::StatusCode::SWITCHING_PROTOCOLS
    {
        resp.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    if let Some(alt_svc) = &conn.alt_svc {
        resp.headers_mut()
            .insert(http::header::ALT_SVC, alt_svc.clone());
    }
    resp
}
