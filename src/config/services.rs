//! The sections that connect ipgate to services outside it: the fleet's shared store,
//! the ACME CA and the kernel's firewall. Each is optional and checked here.

use std::path::Path;

use super::raw::*;
use super::report::Report;
use super::values::*;
use super::*;

/// `[firewall]`: the ports, the table's name and what happens at stop.
pub(super) fn firewall(r: &mut Report, raw: &RawFirewall) -> Firewall {
    if raw.ports.is_empty() {
        r.key("firewall.ports", "at least one port is needed");
    }
    if raw.ports.contains(&0) {
        r.key("firewall.ports", "0 is not a port");
    }
    let table = raw.table.clone().unwrap_or_else(|| "ipgate".into());
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-');
    if table.is_empty() || table.len() > 32 || !table.chars().all(plain) {
        r.key(
            "firewall.table",
            format!("'{table}': 1 to 32 letters, digits, '_' or '-'"),
        );
    }
    let verdict = match raw.verdict.as_deref() {
        None | Some("drop") => Verdict::Drop,
        Some("reject") => Verdict::Reject,
        Some(other) => {
            r.key(
                "firewall.verdict",
                format!("'{other}': \"drop\" or \"reject\""),
            );
            Verdict::Drop
        }
    };
    let mut ports = raw.ports.clone();
    ports.sort_unstable();
    ports.dedup();
    Firewall {
        table,
        ports,
        keep_at_stop: raw.keep_at_stop,
        verdict,
        connection_cap: raw.connection_cap,
        nft: raw.nft.as_deref().unwrap_or("nft").into(),
    }
}

/// `[acme]`, and the sites that use it: every host a DNS name (no `*`).
pub(super) fn acme(
    r: &mut Report,
    base: &Path,
    raw: &RawConfig,
    listeners: &[Listener],
) -> Option<Acme> {
    for (i, s) in raw.sites.iter().enumerate().filter(|(_, s)| s.acme) {
        if raw.acme.is_none() {
            r.key(&format!("site[{i}].acme"), "needs an [acme] table");
        }
        for (k, h) in s.hosts.iter().enumerate() {
            if h.contains('*') || h.parse::<std::net::IpAddr>().is_ok() {
                r.key(
                    &format!("site[{i}].hosts[{k}]"),
                    format!("'{h}': an ACME site's hosts are DNS names (no '*', no address)"),
                );
            }
        }
    }
    let a = raw.acme.as_ref()?;
    if !a.directory.starts_with("https://") || a.directory.parse::<http::Uri>().is_err() {
        r.key(
            "acme.directory",
            format!("'{}' is not an https:// URL", a.directory),
        );
    }
    for (k, c) in a.contact.iter().enumerate() {
        if !c.starts_with("mailto:") || !c.contains('@') {
            r.key(
                &format!("acme.contact[{k}]"),
                format!("'{c}': a contact is mailto:someone@example.nl"),
            );
        }
    }
    let plain = listeners.iter().any(|l| !l.tls && !l.proxy_protocol);
    let challenge = match a.challenge.as_deref() {
        None if plain => Challenge::Http01,
        None => Challenge::TlsAlpn01,
        Some("http-01") => Challenge::Http01,
        Some("tls-alpn-01") => Challenge::TlsAlpn01,
        Some(other) => {
            r.key(
                "acme.challenge",
                format!("'{other}': \"http-01\" or \"tls-alpn-01\""),
            );
            Challenge::Http01
        }
    };
    if challenge == Challenge::Http01 && !plain {
        r.key(
            "acme.challenge",
            "http-01 needs a tls = false listener without proxy_protocol (port 80)",
        );
    }
    if challenge == Challenge::TlsAlpn01 && !listeners.iter().any(|l| l.tls) {
        r.key(
            "acme.challenge",
            "tls-alpn-01 needs a tls = true listener (port 443)",
        );
    }
    let ca_file = a
        .ca_file
        .as_deref()
        .filter(|p| !p.is_empty())
        .map(|p| resolve(base, p));
    if let Some(f) = &ca_file {
        if let Err(e) = std::fs::metadata(f) {
            r.other(f, None, "acme.ca_file", format!("cannot read: {e}"));
        }
    }
    Some(Acme {
        directory: a.directory.clone(),
        contact: a.contact.clone(),
        ca_file,
        challenge,
    })
}

pub(super) fn fleet(r: &mut Report, base: &Path, raw: &RawFleet) -> Fleet {
    if !(raw.redis.starts_with("redis://") || raw.redis.starts_with("rediss://")) {
        r.key("fleet.redis", "must be a redis:// or rediss:// URL");
    } else if let Err(e) = redis::Client::open(raw.redis.as_str()) {
        r.key("fleet.redis", format!("'{}': {e}", raw.redis));
    }
    let gateway_id = match &raw.gateway_id {
        Some(id) => id.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default(),
    };
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if gateway_id.is_empty() || gateway_id.len() > 64 || !gateway_id.chars().all(valid) {
        r.key(
            "fleet.gateway_id",
            format!("'{gateway_id}': 1 to 64 letters, digits, '-', '_' or '.'"),
        );
    }
    Fleet {
        redis: raw.redis.clone(),
        password_file: raw
            .password_file
            .as_deref()
            .filter(|p| !p.is_empty())
            .map(|p| resolve(base, p)),
        ca_file: raw
            .ca_file
            .as_deref()
            .filter(|p| !p.is_empty())
            .map(|p| resolve(base, p)),
        gateway_id,
    }
}
