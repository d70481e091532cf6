//! One conditional GET of a feed: HTTPS through rustls (the system's CA certificates, or only
//! the feed's `ca_file`), plain HTTP to loopback only, a few redirects under the same rule,
//! a time limit on the whole exchange and a cap on the body.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::parse::Refusal;
use crate::config::is_loopback;

/// The whole exchange, redirects included.
const TIME_LIMIT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest body taken (FireHOL level1 is ~100 kB, Spamhaus DROP ~80 kB).
pub const MAX_BODY: usize = 32 << 20;
const MAX_REDIRECTS: usize = 3;

/// A 200's body and validators, or a 304.
#[derive(Debug)]
pub enum Answer {
    Changed {
        body: Bytes,
        content_type: Option<String>,
        etag: Option<String>,
        last_modified: Option<String>,
    },
    NotModified,
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

fn client(ca_file: Option<&Path>) -> Result<HttpsClient, Refusal> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(f) => {
            let certs = CertificateDer::pem_file_iter(f)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| Refusal::new("tls", format!("ca_file {}: {e}", f.display())))?;
            roots.add_parsable_certificates(certs);
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    if roots.is_empty() {
        return Err(Refusal::new(
            "tls",
            "no CA certificate to trust (install ca-certificates, or set ca_file)",
        ));
    }
    let tls =
        rustls::ClientConfig::builder_with_provider(Arc::new(crate::state::tls::crypto_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| Refusal::new("tls", e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(https))
}

/// Whether ipgate may fetch `url`: HTTPS anywhere, HTTP to the machine itself.
fn allowed(url: &Uri) -> bool {
    match url.scheme_str() {
        Some("https") => url.host().is_some(),
        Some("http") => url.host().is_some_and(is_loopback),
        _ => false,
    }
}

/// GETs `url`, sending the validators of the copy held.
pub async fn get(
    url: &Uri,
    ca_file: Option<&Path>,
    etag: Option<&str>,
    last_modified: Option<&str>,
) -> Result<Answer, Refusal> {
    let client = client(ca_file)?;
    tokio::time::timeout(TIME_LIMIT, follow(&client, url, etag, last_modified))
        .await
        .unwrap_or_else(|_| {
            Err(Refusal::new(
                "timeout",
                format!("no whole answer within {}s", TIME_LIMIT.as_secs()),
            ))
        })
}

async fn follow(
    client: &HttpsClient,
    url: &Uri,
    etag: Option<&str>,
    last_modified: Option<&str>,
) -> Result<Answer, Refusal> {
    let first_https = url.scheme_str() == Some("https");
    let mut url = url.clone();
    for _ in 0..=MAX_REDIRECTS {
        // A redirect never leaves HTTPS: an HTTPS feed's server cannot send the fetch to a
        // service on this machine's loopback.
        let downgraded = first_https && url.scheme_str() != Some("https");
        if !allowed(&url) || downgraded {
            return Err(Refusal::new(
                "status",
                format!("{url}: only https://, or http:// to a loopback address"),
            ));
        }
        let mut req = Request::get(url.clone())
            .header(
                header::USER_AGENT,
                concat!("ipgate/", env!("CARGO_PKG_VERSION")),
            )
            .header(header::ACCEPT_ENCODING, "identity");
        if let Some(e) = etag {
            req = req.header(header::IF_NONE_MATCH, e);
        }
        if let Some(l) = last_modified {
            req = req.header(header::IF_MODIFIED_SINCE, l);
        }
        let req = req
            .body(Empty::new())
            .map_err(|e| Refusal::new("status", e.to_string()))?;
        let resp = client.request(req).await.map_err(|e| {
            let text = error_chain(&e);
            // A certificate the trusted CAs do not vouch for is a TLS refusal, not an outage.
            let reason = if text.contains("certificate") {
                "tls"
            } else {
                "connect"
            };
            Refusal::new(reason, text)
        })?;
        let status = resp.status();
        let text = |name: header::HeaderName| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        match status {
            StatusCode::NOT_MODIFIED => return Ok(Answer::NotModified),
            StatusCode::OK => {
                let (content_type, etag, last_modified) = (
                    text(header::CONTENT_TYPE),
                    text(header::ETAG),
                    text(header::LAST_MODIFIED),
                );
                let body = Limited::new(resp.into_body(), MAX_BODY)
                    .collect()
                    .await
                    .map_err(|e| {
                        if e.is::<http_body_util::LengthLimitError>() {
                            Refusal::new("too_large", format!("larger than {MAX_BODY} bytes"))
                        } else {
                            Refusal::new("connect", format!("the body broke off: {e}"))
                        }
                    })?
                    .to_bytes();
                return Ok(Answer::Changed {
                    body,
                    content_type,
                    etag,
                    last_modified,
                });
            }
            s if s.is_redirection() => {
                let to = text(header::LOCATION)
                    .ok_or_else(|| Refusal::new("status", format!("{s} without a Location")))?;
                url = resolve(&url, &to)
                    .ok_or_else(|| Refusal::new("status", format!("{s} to '{to}'")))?;
            }
            s => return Err(Refusal::new("status", format!("answered {s}"))),
        }
    }
    Err(Refusal::new(
        "status",
        format!("more than {MAX_REDIRECTS} redirects"),
    ))
}

/// A Location against the URL that answered it (absolute, or a path on the same origin).
fn resolve(base: &Uri, location: &str) -> Option<Uri> {
    if location.starts_with('/') && !location.starts_with("//") {
        let mut parts = base.clone().into_parts();
        parts.path_and_query = Some(location.parse().ok()?);
        return Uri::from_parts(parts).ok();
    }
    location
        .parse::<Uri>()
        .ok()
        .filter(|u| u.scheme().is_some())
}

/// An error and its causes, for the log (hyper's top error alone says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_resolve_and_keep_to_the_rule() {
        let base: Uri = "https://feeds.test/a/drop.txt".parse().unwrap();
        assert_eq!(
            resolve(&base, "/b/drop.txt").unwrap().to_string(),
            "https://feeds.test/b/drop.txt"
        );
        assert_eq!(
            resolve(&base, "https://mirror.test/drop.txt")
                .unwrap()
                .to_string(),
            "https://mirror.test/drop.txt"
        );
        assert!(resolve(&base, "drop.txt").is_none());
        assert!(allowed(&"http://127.0.0.1:8080/x".parse().unwrap()));
        assert!(!allowed(&"http://feeds.test/x".parse().unwrap()));
        assert!(allowed(&"https://feeds.test/x".parse().unwrap()));
        assert!(!allowed(&"ftp://feeds.test/x".parse().unwrap()));
    }
}
