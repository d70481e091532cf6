//! The ACME folder under `state_dir` (mode 0700): `account.json`, then `SITE/cert.pem` and
//! `SITE/key.pem` for each site with `acme = true`, written by [`crate::background::acme`], and what those
//! sites serve from it when a snapshot is built.

use std::path::{Path, PathBuf};

use tracing::warn;

use crate::config::Config;
use crate::state::tls::{self, Served, Source};

/// Where the ACME state lives.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("acme")
}

/// A site's certificate folder: its name, with anything but letters, digits, `.`, `-` and
/// `_` replaced.
pub fn site_dir(state_dir: &Path, site: &str) -> PathBuf {
    let safe: String = site
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir(state_dir).join(safe)
}

/// What the ACME sites serve: each one's certificate from `state_dir`, or, until it has one,
/// a self-signed certificate for its hosts.
pub fn served(config: &Config) -> Vec<Served> {
    if config.acme.is_none() {
        return Vec::new();
    }
    let provider = tls::crypto_provider();
    let mut out = Vec::new();
    for site in config.sites.iter().filter(|s| s.acme) {
        let folder = site_dir(&config.gateway.state_dir, &site.name);
        let cert = folder.join("cert.pem");
        let loaded = tls::load_pair(&cert, &folder.join("key.pem"), &provider)
            .map_err(|e| e.message)
            .and_then(|ck| Served::new(ck, Source::Acme, Some(&cert)));
        match loaded {
            Ok(served) => out.push(served),
            Err(why) => {
                if cert.exists() {
                    warn!(site = %site.name, file = %cert.display(), error = %why,
                          "the site's ACME certificate cannot be used; a new one is ordered");
                } else {
                    warn!(site = %site.name, "the site is waiting for its first ACME \
                          certificate; it is served a self-signed one until then");
                }
                match tls::self_signed(&site.hosts, &provider)
                    .and_then(|ck| Served::new(ck, Source::SelfSigned, None))
                {
                    Ok(s) => out.push(s),
                    Err(e) => warn!(site = %site.name, error = %e, "no stand-in certificate"),
                }
            }
        }
    }
    out
}
