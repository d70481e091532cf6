//! ASN and country databases (MaxMind format, read with the `maxminddb` crate), loaded whole
//! into memory and checked at load, so a truncated or corrupt file is refused and the one in
//! force keeps serving. A lookup walks the database's tree in memory: no lock, no I/O.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use maxminddb::{PathElement, Reader};

/// A database as loaded, shared by the snapshots that keep it.
pub type Db = Arc<Reader<Vec<u8>>>;

/// Largest database file read: ASN and country databases are under 20 MiB; a city database
/// given by mistake is refused rather than held twice over during a swap.
pub const MAX_DB_BYTES: u64 = 128 << 20;

/// Which database a file must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Asn,
    Country,
}

/// The databases of `[geo]`.
#[derive(Default)]
pub struct Geo {
    pub asn: Option<Db>,
    pub country: Option<Db>,
}

/// What the databases say of one address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Place {
    pub asn: Option<u32>,
    pub country: Option<[u8; 2]>,
}

impl Place {
    /// The country as text (`NL`).
    pub fn country_code(&self) -> Option<String> {
        self.country
            .map(|c| String::from_utf8_lossy(&c).into_owned())
    }
}

/// Opens and checks one database file: its size, its format, the whole of its tree and data
/// (`verify`), and that it is the kind asked for. The error names what is wrong.
pub fn open(path: &Path, kind: Kind) -> Result<Db, String> {
    let len = std::fs::metadata(path)
        .map_err(|e| format!("cannot read: {e}"))?
        .len();
    if len > MAX_DB_BYTES {
        return Err(format!(
            "{len} bytes: larger than any ASN or country database (a city database?)"
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    // The crate trusts a file's header while it opens it: a damaged one may panic there.
    let opened = std::panic::catch_unwind(|| Reader::from_source(bytes))
        .map_err(|_| "the database is damaged (unreadable header)".to_string())?;
    let reader = opened.map_err(|e| format!("not a MaxMind database: {e}"))?;
    reader
        .verify()
        .map_err(|e| format!("the database is damaged: {e}"))?;
    let kind_of = reader.metadata.database_type.to_ascii_lowercase();
    let fits = match kind {
        Kind::Asn => kind_of.contains("asn") || kind_of.contains("isp"),
        Kind::Country => kind_of.contains("country") || kind_of.contains("city"),
    };
    if !fits {
        return Err(format!(
            "a database of type '{}', not {} database",
            reader.metadata.database_type,
            if kind == Kind::Asn {
                "an ASN"
            } else {
                "a country"
            }
        ));
    }
    Ok(Arc::new(reader))
}

impl Geo {
    pub fn new(asn: Option<Db>, country: Option<Db>) -> Geo {
        Geo { asn, country }
    }

    /// The autonomous system of `ip`, if the ASN database knows it.
    pub fn asn(&self, ip: IpAddr) -> Option<u32> {
        let result = self.asn.as_ref()?.lookup(ip).ok()?;
        result
            .decode_path::<u32>(&[PathElement::Key("autonomous_system_number")])
            .ok()
            .flatten()
    }

    /// The country of `ip` (upper-case ISO code), if the country database knows it.
    pub fn country(&self, ip: IpAddr) -> Option<[u8; 2]> {
        let result = self.country.as_ref()?.lookup(ip).ok()?;
        let code = result
            .decode_path::<&str>(&[PathElement::Key("country"), PathElement::Key("iso_code")])
            .ok()
            .flatten()?;
        match code.as_bytes() {
            [a, b] => Some([a.to_ascii_uppercase(), b.to_ascii_uppercase()]),
            _ => None,
        }
    }

    /// Both, for the admin path.
    pub fn place(&self, ip: IpAddr) -> Place {
        Place {
            asn: self.asn(ip),
            country: self.country(ip),
        }
    }
}

/// What a request's decision has looked up so far: each database is asked at most once per
/// decision, and only when a list needs it.
pub struct Seen<'a> {
    geo: Option<&'a Geo>,
    asn: Option<Option<u32>>,
    country: Option<Option<[u8; 2]>>,
}

impl<'a> Seen<'a> {
    pub fn new(geo: Option<&'a Geo>) -> Seen<'a> {
        Seen {
            geo,
            asn: None,
            country: None,
        }
    }

    pub fn asn(&mut self, ip: IpAddr) -> Option<u32> {
        let geo = self.geo;
        *self.asn.get_or_insert_with(|| geo.and_then(|g| g.asn(ip)))
    }

    pub fn country(&mut self, ip: IpAddr) -> Option<[u8; 2]> {
        let geo = self.geo;
        *self
            .country
            .get_or_insert_with(|| geo.and_then(|g| g.country(ip)))
    }
}
