//! The ACME challenges being answered now: HTTP-01 key authorizations, answered on
//! plain listeners by [`crate::serve::https`], and TLS-ALPN-01 certificates, answered in the handshake
//! by [`crate::state::tls`]'s resolver. [`crate::background::acme`] publishes them while an order waits for its
//! validation ([`Published`]).

use std::sync::{Arc, LazyLock};

use dashmap::DashMap;
use rustls::sign::CertifiedKey;

/// Where HTTP-01 challenges are asked for (RFC 8555 8.3).
pub const ACME_CHALLENGE: &str = "/.well-known/acme-challenge/";

/// The ALPN protocol of TLS-ALPN-01 (RFC 8737).
pub const ALPN: &[u8] = b"acme-tls/1";

/// The challenges being answered now, for the listeners to find.
#[derive(Default)]
pub struct Challenges {
    /// HTTP-01: token to key authorization.
    http: DashMap<String, String>,
    /// TLS-ALPN-01: name (lower case) to its challenge certificate.
    alpn: DashMap<String, Arc<CertifiedKey>>,
}

/// The process's challenges (the listeners and the ordering task share them).
pub static CHALLENGES: LazyLock<Challenges> = LazyLock::new(Challenges::default);

impl Challenges {
    /// The key authorization for an HTTP-01 token being validated now.
    pub fn http01(&self, token: &str) -> Option<String> {
        self.http.get(token).map(|v| v.clone())
    }

    /// The TLS-ALPN-01 certificate for `name` while it is being validated.
    pub fn alpn(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.alpn.get(&name.to_ascii_lowercase()).map(|v| v.clone())
    }
}

/// The challenges one order has published; they are withdrawn when it is dropped, whatever
/// way the order ends.
#[derive(Default)]
pub struct Published {
    tokens: Vec<String>,
    names: Vec<String>,
}

impl Published {
    /// Answers HTTP-01 for `token` with `key_authorization`.
    pub fn http01(&mut self, token: &str, key_authorization: &str) {
        CHALLENGES
            .http
            .insert(token.to_string(), key_authorization.to_string());
        self.tokens.push(token.to_string());
    }

    /// Answers TLS-ALPN-01 for `name` with `cert`.
    pub fn alpn(&mut self, name: &str, cert: CertifiedKey) {
        let name = name.to_ascii_lowercase();
        CHALLENGES.alpn.insert(name.clone(), Arc::new(cert));
        self.names.push(name);
    }
}

impl Drop for Published {
    fn drop(&mut self) {
        for t in &self.tokens {
            CHALLENGES.http.remove(t);
        }
        for n in &self.names {
            CHALLENGES.alpn.remove(n);
        }
    }
}
