//! The request path, top to bottom:
//! - [`worker`]: one thread per CPU, each with its own event loop, listening sockets and
//!   upstream pool; a connection never leaves the thread that accepted it.
//! - `listener`: accepts, enforces the connection caps, closes blocked clients before TLS
//!   ([`client_addr`]: the peer or the PROXY header's source), runs the TLS handshake and
//!   serves HTTP/1.1 and HTTP/2 under the limits; `tarpit` holds the over-cap connections
//!   of a client that keeps reconnecting; `quic`: HTTP/3.
//! - `proxy`: one request: checks it ([`request`]: one valid host, the path in normal form,
//!   the client behind trusted proxies), picks the site, asks `admission`, rewrites the
//!   headers (`headers`), reads small bodies ahead and times idle ones (`body`), forwards
//!   through `upstream`, splices WebSocket upgrades (`splice`); `answer`: the
//!   gateway's own answers; `https`: the redirect of `redirect_https` listeners, HTTP-01
//!   answers and HSTS; `challenge`: the proof-of-work page, and the check of a solution that
//!   makes a pass; `overview`: the security overview at `privacy.overview_path`.
//! - `admission`: the per-request decision, in order: allow wins, block entries,
//!   `allow_only`, the rate limit, the challenge (unless the client has a pass), the jails'
//!   watched requests and the client's requests in flight (a short queue); then the jails
//!   see the response and ban through the state.
//!
//! Uses: [`crate::state`], [`crate::decide`], [`crate::observe`], [`crate::config`],
//! [`crate::normalize`].

pub(crate) mod admission;
pub(crate) mod answer;
pub(crate) mod body;
pub(crate) mod challenge;
pub mod client_addr;
pub(crate) mod conn;
pub(crate) mod headers;
pub(crate) mod https;
pub(crate) mod listener;
pub(crate) mod overview;
pub(crate) mod proxy;
pub(crate) mod quic;
pub mod request;
pub(crate) mod splice;
pub(crate) mod tarpit;
pub(crate) mod upstream;
pub mod worker;
