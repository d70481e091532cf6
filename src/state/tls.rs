//! TLS termination settings: TLS 1.2 and 1.3 only, forward-secret AEAD suites with 256-bit
//! ones first, ALPN `h2` and `http/1.1`, and an SNI resolver over many
//! certificates (exact name, then wildcard, then the first certificate as default).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::aws_lc_rs as provider;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{self, Report};

/// Where a served certificate comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `tls.certificates`.
    File,
    /// Obtained through `[acme]` for a site with `acme = true`.
    Acme,
    /// Made at start: `tls.self_signed`, or an ACME site's fallback until its first
    /// certificate arrives.
    SelfSigned,
}

/// One certificate served, as `ipgate certs` and the expiry metric show it.
#[derive(Debug, Clone, PartialEq)]
pub struct CertInfo {
    /// The DNS names of its subjectAltName.
    pub names: Vec<String>,
    pub source: Source,
    /// The chain's file (`tls.certificates`, or the ACME site's file in `state_dir`).
    pub file: Option<std::path::PathBuf>,
    /// Validity, in seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// For ACME: when renewal starts (a third of the lifetime left).
    pub renew_at: Option<i64>,
}

impl CertInfo {
    /// The metric's `name` label: the first name, or the file when it names none.
    pub fn label(&self) -> String {
        self.names.first().cloned().unwrap_or_else(|| {
            self.file
                .as_ref()
                .map_or_else(String::new, |f| f.display().to_string())
        })
    }
}

/// A certificate's validity (seconds since the Unix epoch).
pub fn validity(der: &CertificateDer<'_>) -> Result<(i64, i64), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("not a usable X.509 certificate: {e}"))?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// When an ACME certificate is renewed: once a third of its lifetime is left.
pub fn renew_at(not_before: i64, not_after: i64) -> i64 {
    not_after - (not_after - not_before).max(0) / 3
}

/// A certificate ready to serve, with what is shown about it.
pub struct Served {
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
}

impl Served {
    /// Describes `key` (its leaf's names and validity).
    pub fn new(key: CertifiedKey, source: Source, file: Option<&Path>) -> Result<Served, String> {
        let leaf = key.cert.first().ok_or("an empty chain")?;
        let names = dns_names(leaf)?;
        let (not_before, not_after) = validity(leaf)?;
        Ok(Served {
            info: CertInfo {
                names,
                source,
                file: file.map(Path::to_path_buf),
                not_before,
                not_after,
                renew_at: (source == Source::Acme).then(|| renew_at(not_before, not_after)),
            },
            key: Arc::new(key),
        })
    }
}

/// What a TLS listener serves: the settings and the certificates in them.
#[derive(Default)]
pub struct Loaded {
    pub config: Option<Arc<ServerConfig>>,
    pub certificates: Vec<CertInfo>,
}

/// Certificates by the DNS names they are valid for.
#[derive(Debug, Default)]
pub struct Certificates {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.nl` stored under `example.nl`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
    /// TLS-ALPN-01 is on: a ClientHello asking for `acme-tls/1` gets the challenge certificate.
    alpn: bool,
}

impl Certificates {
    /// Adds a certificate for every DNS name in its subjectAltName; the first one added is
    /// the default for clients that send no SNI or a name no certificate carries. A name
    /// carried by two certificates goes to the first, unless `over` (an ACME certificate
    /// takes its names from files that carry them too).
    pub fn add(&mut self, key: Arc<CertifiedKey>, names: &[String], over: bool) {
        for name in names {
            let name = name.to_ascii_lowercase();
            let slot = match name.strip_prefix("*.") {
                Some(parent) => self.wildcard.entry(parent.to_string()),
                None => self.exact.entry(name),
            };
            match slot {
                std::collections::hash_map::Entry::Occupied(mut e) if over => {
                    e.insert(key.clone());
                }
                std::collections::hash_map::Entry::Occupied(_) => {}
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(key.clone());
                }
            }
        }
        if self.default.is_none() {
            self.default = Some(key);
        }
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }

    pub fn is_empty(&self) -> bool {
        self.default.is_none()
    }

    /// The certificate for an SNI name (DNS names are case-insensitive).
    pub fn lookup(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let lower;
        let name = match name {
            Some(n) if n.bytes().any(|b| b.is_ascii_uppercase()) => {
                lower = n.to_ascii_lowercase();
                Some(lower.as_str())
            }
            other => other,
        };
        if let Some(name) = name {
            if let Some(k) = self.exact.get(name) {
                return Some(k.clone());
            }
            if let Some((_, parent)) = name.split_once('.') {
                if let Some(k) = self.wildcard.get(parent) {
                    return Some(k.clone());
                }
            }
        }
        self.default.clone()
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if self.alpn
            && hello
                .alpn()
                .is_some_and(|mut a| a.any(|p| p == crate::state::challenges::ALPN))
        {
            // A validation (RFC 8737): the challenge certificate, or nothing.
            return crate::state::challenges::CHALLENGES.alpn(hello.server_name()?);
        }
        self.lookup(hello.server_name())
    }
}

/// The crypto provider with only forward-secret AEAD suites, 256-bit first.
pub fn crypto_provider() -> CryptoProvider {
    let mut p = provider::default_provider();
    p.cipher_suites = vec![
        provider::cipher_suite::TLS13_AES_256_GCM_SHA384,
        provider::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        provider::cipher_suite::TLS13_AES_128_GCM_SHA256,
        provider::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        provider::cipher_suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        provider::cipher_suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        provider::cipher_suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        provider::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        provider::cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    ];
    p
}

/// Loads every configured certificate (and makes the self-signed one if asked) into a
/// server config, with the ACME sites' certificates (`extra`). Problems go to `report`,
/// naming the file and the config key.
pub fn server_config(
    tls: &config::Tls,
    acme: Option<&config::Acme>,
    extra: Vec<Served>,
    report: &mut Report,
) -> Loaded {
    let provider = Arc::new(crypto_provider());
    let mut certs = Certificates {
        alpn: acme.is_some_and(|a| a.challenge == config::Challenge::TlsAlpn01),
        ..Certificates::default()
    };
    let mut shown = Vec::new();
    let mut serve = |served: Served, certs: &mut Certificates| {
        // An ACME certificate is served for its names even where a file names them too
        // (moving a site from certbot to ACME); a stand-in only where nothing else does.
        let over = served.info.source == Source::Acme;
        certs.add(served.key, &served.info.names, over);
        shown.push(served.info);
    };
    for (i, files) in tls.certificates.iter().enumerate() {
        let key = format!("tls.certificates[{i}]");
        let loaded = load_pair(&files.cert, &files.key, &provider).and_then(|ck| {
            Served::new(ck, Source::File, Some(&files.cert)).map_err(|message| LoadError {
                part: Part::Cert,
                message,
            })
        });
        match loaded {
            Ok(served) => serve(served, &mut certs),
            Err(e) => {
                let (file, field) = match e.part {
                    Part::Key => (&files.key, "key"),
                    Part::Cert => (&files.cert, "cert"),
                };
                report.other(file, None, &format!("{key}.{field}"), e.message);
            }
        }
    }
    for served in extra {
        serve(served, &mut certs);
    }
    if tls.self_signed {
        let names = ["localhost".to_string(), "127.0.0.1".to_string()];
        match self_signed(&names, &provider)
            .and_then(|ck| Served::new(ck, Source::SelfSigned, None))
        {
            Ok(served) => serve(served, &mut certs),
            Err(e) => report.key("tls.self_signed", e),
        }
    }
    if certs.is_empty() {
        return Loaded::default();
    }
    let builder = match ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    {
        Ok(b) => b,
        Err(e) => {
            report.key("tls", format!("TLS settings rejected: {e}"));
            return Loaded::default();
        }
    };
    let certs_alpn = certs.alpn;
    let mut cfg = builder
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(certs));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if certs_alpn {
        cfg.alpn_protocols
            .push(crate::state::challenges::ALPN.to_vec());
    }
    // Our suite order (256-bit first) rather than the client's.
    cfg.ignore_client_order = true;
    // Stateless TLS 1.3 resumption: tickets under a rotating in-memory key.
    if let Ok(ticketer) = provider::Ticketer::new() {
        cfg.ticketer = ticketer;
    }
    Loaded {
        config: Some(Arc::new(cfg)),
        certificates: shown,
    }
}

/// Which file of a certificate pair is at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Cert,
    Key,
}

/// Why a certificate pair could not be loaded, and which of its files is at fault.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct LoadError {
    pub part: Part,
    pub message: String,
}

/// Reads a PEM chain (certbot's `fullchain.pem`) and its key (`privkey.pem`), checks that
/// they belong together, and returns them as one key.
pub(crate) fn load_pair(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, LoadError> {
    let err = |part: Part, message: String| LoadError { part, message };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| err(Part::Cert, pem_error(&e)))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(Part::Cert, pem_error(&e)))?;
    if chain.is_empty() {
        return Err(err(Part::Cert, "no CERTIFICATE block in the file".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| err(Part::Key, pem_error(&e)))?;
    let ck = CertifiedKey::from_der(chain, key_der, provider).map_err(|e| {
        err(
            Part::Key,
            format!("key does not match the certificate or is unsupported: {e}"),
        )
    })?;
    Ok(ck)
}

fn pem_error(e: &rustls_pki_types::pem::Error) -> String {
    match e {
        rustls_pki_types::pem::Error::Io(io) => format!("cannot read: {io}"),
        rustls_pki_types::pem::Error::NoItemsFound => "no PEM block of the right kind".into(),
        other => format!("not valid PEM: {other:?}"),
    }
}

/// DNS names in a certificate's subjectAltName.
pub fn dns_names(der: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let cert = ::webpki::EndEntityCert::try_from(der)
        .map_err(|e| format!("not a usable X.509 certificate: {e:?}"))?;
    Ok(cert.valid_dns_names().map(str::to_string).collect())
}

/// A throwaway certificate for `names`, made at start (`tls.self_signed`: `localhost` and
/// `127.0.0.1`; an ACME site's hosts until its first certificate arrives).
pub fn self_signed(names: &[String], provider: &CryptoProvider) -> Result<CertifiedKey, String> {
    let ck = rcgen::generate_simple_self_signed(names.to_vec())
        .map_err(|e| format!("cannot make a self-signed certificate: {e}"))?;
    let key = PrivateKeyDer::try_from(ck.key_pair.serialize_der())
        .map_err(|e| format!("self-signed key: {e}"))?;
    CertifiedKey::from_der(vec![ck.cert.der().clone()], key, provider)
        .map_err(|e| format!("self-signed certificate: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_for(names: &[&str]) -> (Arc<CertifiedKey>, Vec<String>) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let ck = rcgen::generate_simple_self_signed(names.clone()).unwrap();
        let key = PrivateKeyDer::try_from(ck.key_pair.serialize_der()).unwrap();
        let certified =
            CertifiedKey::from_der(vec![ck.cert.der().clone()], key, &crypto_provider()).unwrap();
        let found = dns_names(&certified.cert[0]).unwrap();
        (Arc::new(certified), found)
    }

    #[test]
    fn every_certificate_served_is_listed_with_its_source_and_expiry() {
        let tls = config::Tls {
            certificates: vec![],
            self_signed: true,
        };
        let acme_key = rcgen::generate_simple_self_signed(vec!["shop.test".into()]).unwrap();
        let acme = CertifiedKey::from_der(
            vec![acme_key.cert.der().clone()],
            PrivateKeyDer::try_from(acme_key.key_pair.serialize_der()).unwrap(),
            &crypto_provider(),
        )
        .unwrap();
        let served = Served::new(acme, Source::Acme, Some(Path::new("/s/acme/shop/cert.pem")));
        let mut report = Report::new(Path::new("x.toml"), "");
        let loaded = server_config(&tls, None, vec![served.unwrap()], &mut report);
        assert!(loaded.config.is_some());
        let c = &loaded.certificates;
        assert_eq!(c.len(), 2);
        assert_eq!(
            (c[0].source, c[0].names.clone()),
            (Source::Acme, vec!["shop.test".into()])
        );
        // rcgen's default validity: 1975-01-01 to 4096-01-01; renewal a third before the end.
        assert_eq!(
            (c[0].not_before, c[0].not_after),
            (157_766_400, 67_090_118_400)
        );
        assert_eq!(c[0].renew_at, Some(renew_at(157_766_400, 67_090_118_400)));
        assert_eq!(c[1].source, Source::SelfSigned);
        // Its DNS names (the 127.0.0.1 SAN is an address; no client sends it as SNI).
        assert_eq!(c[1].names, vec!["localhost"]);
        assert_eq!(c[1].renew_at, None);
        assert_eq!(renew_at(0, 90), 60);
    }

    #[test]
    fn sni_prefers_exact_then_wildcard_then_default() {
        let mut certs = Certificates::default();
        let (a, a_names) = key_for(&["a.test"]);
        let (w, w_names) = key_for(&["*.b.test", "b.test"]);
        assert_eq!(w_names, vec!["*.b.test", "b.test"]);
        certs.add(a.clone(), &a_names, false);
        certs.add(w.clone(), &w_names, false);
        assert!(Arc::ptr_eq(&certs.lookup(Some("a.test")).unwrap(), &a));
        assert!(Arc::ptr_eq(&certs.lookup(Some("X.B.Test")).unwrap(), &w));
        assert!(Arc::ptr_eq(&certs.lookup(Some("x.b.test")).unwrap(), &w));
        assert!(Arc::ptr_eq(&certs.lookup(Some("b.test")).unwrap(), &w));
        // A wildcard covers one label only.
        assert!(Arc::ptr_eq(&certs.lookup(Some("y.x.b.test")).unwrap(), &a));
        assert!(Arc::ptr_eq(&certs.lookup(None).unwrap(), &a));
    }
}
