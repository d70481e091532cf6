//! Certificates from an ACME CA (RFC 8555), through the `instant-acme` crate.
//!
//! A site with `acme = true` gets one certificate for all its hosts. The account and each
//! site's certificate live under `state_dir/acme` (mode 0700: `account.json`, then
//! `SITE/cert.pem` and `SITE/key.pem`), so a restart serves the same certificate without a new
//! order. [`run`] orders a certificate for a site that has none (or whose hosts changed), and
//! renews one when a third of its lifetime is left, backing off on failure. A new certificate
//! is swapped in like a renewed certificate file ([`AppState::refresh_files`]): connections
//! open keep theirs, new handshakes get the new one. Until a site has its first certificate,
//! it is served a self-signed one for its hosts ([`crate::state::acme_dir::served`]), and the log says so.
//!
//! Challenges are answered by ipgate itself: HTTP-01 on a plain listener
//! (asked by [`crate::serve::https`]), or TLS-ALPN-01 in the handshake of a TLS listener (asked by
//! [`crate::state::tls`]'s resolver), both through [`crate::state::challenges`].

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::PrivateKeyDer;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::{Acme, Challenge, Site};
use crate::state::acme_dir::{dir, site_dir};
use crate::state::challenges::Published;
use crate::state::tls::{self, Source};
use crate::state::AppState;

/// The first retry after a failed order; each further failure doubles it, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(6 * 3600);
/// How often the sites are looked at when nothing is due (a reload adding a site is seen
/// within this).
const LOOK_AGAIN: Duration = Duration::from_secs(30);

/// Why an order failed.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("{0}")]
    Acme(#[from] instant_acme::Error),
    #[error("cannot write {0}: {1}")]
    Write(PathBuf, std::io::Error),
    #[error("{0}")]
    Refused(String),
}

/// The account as kept in `account.json`: its directory and credentials (with its key).
#[derive(Serialize, Deserialize)]
struct Saved {
    directory: String,
    credentials: AccountCredentials,
}

/// Orders and renews until the process ends.
pub async fn run(state: Arc<AppState>) {
    let mut manager = Manager::default();
    loop {
        let snap = state.snapshot.load_full();
        let wait = match &snap.config.acme {
            Some(conf) => manager.round(&state, &snap, conf).await,
            None => LOOK_AGAIN,
        };
        tokio::time::sleep(wait).await;
    }
}

#[derive(Default)]
struct Manager {
    account: Option<(String, Account)>,
    /// Per site: failures in a row, and when the next attempt is due (Unix seconds).
    failures: HashMap<String, (u32, i64)>,
}

impl Manager {
    /// Orders what is due; returns how long until something may be due.
    async fn round(
        &mut self,
        state: &AppState,
        snap: &crate::state::Snapshot,
        conf: &Acme,
    ) -> Duration {
        let now = unix_now();
        let mut next = now + LOOK_AGAIN.as_secs() as i64;
        let state_dir = &snap.config.gateway.state_dir;
        for site in snap.config.sites.iter().filter(|s| s.acme) {
            let file = site_dir(state_dir, &site.name).join("cert.pem");
            let current = snap
                .certificates
                .iter()
                .find(|c| c.source == Source::Acme && c.file.as_deref() == Some(&file));
            let covers = |names: &[String]| {
                site.hosts
                    .iter()
                    .all(|h| names.iter().any(|n| n.eq_ignore_ascii_case(h)))
            };
            let due = match current {
                Some(c) if covers(&c.names) => c.renew_at.unwrap_or(now),
                _ => now,
            };
            let due = due.max(self.failures.get(&site.name).map_or(0, |f| f.1));
            if due > now {
                next = next.min(due);
                continue;
            }
            match self.order(state_dir, conf, site).await {
                Ok(()) => {
                    self.failures.remove(&site.name);
                    info!(site = %site.name, hosts = ?site.hosts, "ACME certificate obtained");
                    if let Err(e) = state.refresh_files() {
                        warn!(error = %e, "the new certificate could not be put in force");
                    }
                    // Look again at once: the new certificate's renewal is scheduled from the
                    // snapshot that now holds it.
                    next = now;
                }
                Err(e) => {
                    let f = self.failures.entry(site.name.clone()).or_insert((0, 0));
                    f.0 += 1;
                    let backoff = backoff(f.0);
                    f.1 = now + backoff.as_secs() as i64;
                    next = next.min(f.1);
                    warn!(site = %site.name, error = %e, retry_in = ?backoff,
                          "ACME order failed");
                }
            }
        }
        Duration::from_secs((next - unix_now()).clamp(1, LOOK_AGAIN.as_secs() as i64) as u64)
    }

    /// One order for a site, with a new account if the CA no longer knows ours.
    async fn order(&mut self, state_dir: &Path, conf: &Acme, site: &Site) -> Result<(), Error> {
        let account = self.account(state_dir, conf).await?;
        let result = obtain(&account, &site.hosts, conf.challenge).await;
        let (chain, key) = match result {
            Err(Error::Acme(instant_acme::Error::Api(p)))
                if p.r#type.as_deref()
                    == Some("urn:ietf:params:acme:error:accountDoesNotExist") =>
            {
                warn!("the ACME CA no longer knows the account; making a new one");
                self.account = None;
                let _ = std::fs::remove_file(dir(state_dir).join("account.json"));
                let account = self.account(state_dir, conf).await?;
                obtain(&account, &site.hosts, conf.challenge).await?
            }
            other => other?,
        };
        let folder = site_dir(state_dir, &site.name);
        // Key first: a chain never sits beside a key it does not match for long.
        write_private(&folder.join("key.pem"), key.as_bytes())?;
        write_private(&folder.join("cert.pem"), chain.as_bytes())?;
        Ok(())
    }

    /// The account: kept in memory, else read from `account.json`, else made (and kept).
    async fn account(&mut self, state_dir: &Path, conf: &Acme) -> Result<Account, Error> {
        if let Some((directory, account)) = &self.account {
            if directory == &conf.directory {
                return Ok(account.clone());
            }
        }
        let path = dir(state_dir).join("account.json");
        let saved = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Saved>(&b).ok())
            .filter(|s| s.directory == conf.directory);
        let account = match saved {
            Some(s) => builder(conf)?.from_credentials(s.credentials).await?,
            None => {
                let contact: Vec<&str> = conf.contact.iter().map(String::as_str).collect();
                let new = NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                };
                let (account, credentials) = builder(conf)?
                    .create(&new, conf.directory.clone(), None)
                    .await?;
                let saved = Saved {
                    directory: conf.directory.clone(),
                    credentials,
                };
                let json = serde_json::to_vec(&saved)
                    .map_err(|e| Error::Refused(format!("account: {e}")))?;
                write_private(&path, &json)?;
                info!(directory = %conf.directory, "ACME account made");
                account
            }
        };
        self.account = Some((conf.directory.clone(), account.clone()));
        Ok(account)
    }
}

/// How long after the `failures`-th failure in a row an order is tried again: 1 minute,
/// doubling, at most 6 hours.
fn backoff(failures: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(MAX_BACKOFF)
}

fn builder(conf: &Acme) -> Result<instant_acme::AccountBuilder, Error> {
    Ok(match &conf.ca_file {
        Some(ca) => Account::builder_with_root(ca)?,
        None => Account::builder()?,
    })
}

/// Orders a certificate for `names`: answers each authorization's challenge, waits for the
/// order, finalizes it with a new key. Returns the PEM chain and the key.
async fn obtain(
    account: &Account,
    names: &[String],
    challenge: Challenge,
) -> Result<(String, String), Error> {
    let ids: Vec<Identifier> = names.iter().map(|n| Identifier::Dns(n.clone())).collect();
    let mut order = account.new_order(&NewOrder::new(&ids)).await?;
    let mut published = Published::default();
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz?;
        match authz.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => return Err(Error::Refused(format!("authorization is {other:?}"))),
        }
        let kind = match challenge {
            Challenge::Http01 => ChallengeType::Http01,
            Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
        };
        let mut ch = authz
            .challenge(kind.clone())
            .ok_or_else(|| Error::Refused(format!("the CA offers no {kind:?} challenge")))?;
        let key_auth = ch.key_authorization();
        match challenge {
            Challenge::Http01 => {
                published.http01(&ch.token, key_auth.as_str());
            }
            Challenge::TlsAlpn01 => {
                let name = ch.identifier().to_string().to_ascii_lowercase();
                published.alpn(&name, alpn_certificate(&name, key_auth.digest().as_ref())?);
            }
        }
        ch.set_ready().await?;
    }
    let patience = RetryPolicy::new().timeout(Duration::from_secs(90));
    let status = order.poll_ready(&patience).await?;
    if status != OrderStatus::Ready {
        return Err(Error::Refused(format!("the order is {status:?}")));
    }
    let key = order.finalize().await?;
    let chain = order.poll_certificate(&patience).await?;
    drop(published);
    Ok((chain, key))
}

/// The self-signed certificate of TLS-ALPN-01 (RFC 8737 §3): the one name, and the digest of
/// the key authorization in the critical acmeIdentifier extension.
fn alpn_certificate(name: &str, digest: &[u8]) -> Result<CertifiedKey, Error> {
    let refused = |e: rcgen::Error| Error::Refused(format!("challenge certificate: {e}"));
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).map_err(refused)?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate().map_err(refused)?;
    let cert = params.self_signed(&key).map_err(refused)?;
    let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    // Not `from_der`: its check of the certificate refuses the critical acmeIdentifier
    // extension, which is the point of this one.
    let signing = tls::crypto_provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| Error::Refused(format!("challenge key: {e}")))?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signing))
}

/// Writes a file only the owner may read, in a folder only the owner may enter (0700), by
/// rename so a reader never sees half of it.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let err = |e| Error::Write(path.to_path_buf(), e);
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(err)?;
        // Both levels: `acme` and the site's folder.
        for d in [Some(parent), parent.parent()].into_iter().flatten() {
            if d.file_name().is_some_and(|n| n == "acme") || d == parent {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
            }
        }
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_orders_back_off_from_a_minute_to_six_hours() {
        let mins = |n| backoff(n).as_secs() / 60;
        assert_eq!([1, 2, 3, 4, 9].map(mins), [1, 2, 4, 8, 256]);
        assert_eq!(backoff(10), MAX_BACKOFF);
        assert_eq!(backoff(1000), MAX_BACKOFF);
    }

    #[test]
    fn site_folders_are_plain_names() {
        let d = site_dir(Path::new("/var/lib/ipgate"), "Klant/../x y");
        assert_eq!(d, Path::new("/var/lib/ipgate/acme/Klant_.._x_y"));
    }
}
