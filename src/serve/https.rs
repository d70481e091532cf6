//! What a plain listener says about HTTPS: the redirect of `redirect_https` listeners
//! (except ACME's HTTP-01 challenges, which are proxied or answered by [`crate::background::acme`]), the
//! HTTP-01 answers themselves, and `site.hsts` on TLS responses.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode, Uri};
use http_body_util::{Either, Full};

use crate::serve::answer::{plain, Body};
use crate::state::SiteEntry;

/// Where ACME's HTTP-01 challenges are asked (RFC 8555 §8.3): never redirected.
pub use crate::state::challenges::ACME_CHALLENGE;

/// Over plain HTTP, the answer to a pending HTTP-01 challenge at `path`, if it is one.
pub fn http01_answer(tls: bool, path: &str) -> Option<Response<Body>> {
    if tls {
        return None;
    }
    let token = path.strip_prefix(ACME_CHALLENGE)?;
    crate::state::challenges::CHALLENGES
        .http01(token)
        .map(acme_answer)
}

/// An HTTP-01 challenge's answer (RFC 8555 §8.3): the key authorization.
fn acme_answer(key_authorization: String) -> Response<Body> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(key_authorization))));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    resp
}

/// The redirect of a `redirect_https` listener: 301 for GET and HEAD, 308 (method and body
/// kept) for the others, to the same host, path and query over HTTPS; the port only when it
/// is not 443.
pub fn redirect(method: &http::Method, host: &str, port: u16, uri: &Uri) -> Response<Body> {
    if host.is_empty() {
        return plain(
            StatusCode::BAD_REQUEST,
            "400 bad request: a Host is needed to redirect to HTTPS\n",
        );
    }
    let target = uri
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    let target = if target.starts_with('/') { target } else { "/" };
    let location = if port == 443 {
        format!("https://{host}{target}")
    } else {
        format!("https://{host}:{port}{target}")
    };
    let status = if method == http::Method::GET || method == http::Method::HEAD {
        StatusCode::MOVED_PERMANENTLY
    } else {
        StatusCode::PERMANENT_REDIRECT
    };
    let mut resp = plain(status, "redirecting to HTTPS\n");
    match HeaderValue::try_from(location) {
        Ok(v) => {
            resp.headers_mut().insert(header::LOCATION, v);
            resp
        }
        Err(_) => plain(StatusCode::BAD_REQUEST, "400 bad request\n"),
    }
}

/// Adds the site's Strict-Transport-Security to a TLS response, unless the upstream set its
/// own.
pub fn add_hsts(resp: &mut Response<Body>, site: &SiteEntry) {
    if let Some(hsts) = &site.hsts {
        resp.headers_mut()
            .entry(header::STRICT_TRANSPORT_SECURITY)
            .or_insert_with(|| hsts.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_https_redirect_names_the_port_only_when_it_is_not_443() {
        let uri: Uri = "/a/b?c=d".parse().unwrap();
        let at = |port| {
            redirect(&http::Method::GET, "example.nl", port, &uri)
                .headers()
                .get(header::LOCATION)
                .unwrap()
                .clone()
        };
        assert_eq!(at(443), "https://example.nl/a/b?c=d");
        assert_eq!(at(8443), "https://example.nl:8443/a/b?c=d");
        let absolute: Uri = "http://example.nl/x?y".parse().unwrap();
        let resp = redirect(&http::Method::POST, "example.nl", 443, &absolute);
        assert_eq!(resp.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(resp.headers()[header::LOCATION], "https://example.nl/x?y");
        // No Host (HTTP/1.0): nowhere to send the client.
        let resp = redirect(&http::Method::GET, "", 443, &uri);
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    }
}
