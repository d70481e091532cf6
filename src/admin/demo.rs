//! A demo upstream built into ipgate (`[demo_upstream]`), so the quick start runs with
//! nothing else installed: it answers every request with a short page showing what it
//! received through the gateway. Not for production use.

use std::fmt::Write;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Serves the demo page until `stop` turns true.
pub async fn serve(listener: TcpListener, stop: watch::Receiver<bool>) {
    crate::admin::serve_http1(listener, stop, |req| async move { page(&req) }).await
}

fn page(req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let mut body = String::from(
        "Hello from the ipgate demo upstream.\n\
         This request reached it through ipgate, which added:\n\n",
    );
    for name in [
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-real-ip",
    ] {
        let value = req
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        let _ = writeln!(body, "  {name}: {value}");
    }
    let _ = writeln!(body, "\n  {} {}", req.method(), req.uri());
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
