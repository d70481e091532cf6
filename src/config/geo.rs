//! `[geo]` (the ASN and country databases) and the `asn` and `country` keys of lists.

use std::path::{Path, PathBuf};

use super::raw::{RawGeo, RawList};
use super::report::Report;
use super::values::resolve;

/// `[geo]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Geo {
    pub asn_database: Option<PathBuf>,
    pub country_database: Option<PathBuf>,
}

/// `[geo]`: database paths.
pub(super) fn compile(_r: &mut Report, base: &Path, raw: Option<&RawGeo>) -> Geo {
    let path = |p: &Option<String>| {
        p.as_deref()
            .filter(|p| !p.is_empty())
            .map(|p| resolve(base, p))
    };
    raw.map_or_else(Geo::default, |g| Geo {
        asn_database: path(&g.asn_database),
        country_database: path(&g.country_database),
    })
}

/// A list's `asn` and `country`, checked against the databases that answer them.
pub(super) fn list_keys(
    r: &mut Report,
    key: &str,
    l: &RawList,
    geo: &Geo,
) -> (Vec<u32>, Vec<[u8; 2]>) {
    if !l.asn.is_empty() && geo.asn_database.is_none() {
        r.key(&format!("{key}.asn"), "needs geo.asn_database");
    }
    if !l.country.is_empty() && geo.country_database.is_none() {
        r.key(&format!("{key}.country"), "needs geo.country_database");
    }
    let mut asns = l.asn.clone();
    asns.sort_unstable();
    asns.dedup();
    let countries = l
        .country
        .iter()
        .enumerate()
        .filter_map(|(i, c)| match c.as_bytes() {
            [a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => {
                Some([a.to_ascii_uppercase(), b.to_ascii_uppercase()])
            }
            _ => {
                r.key(
                    &format!("{key}.country[{i}]"),
                    format!("'{c}' is not a two-letter country code (ISO 3166-1: NL, DE)"),
                );
                None
            }
        })
        .collect();
    (asns, countries)
}
