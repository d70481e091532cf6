//! The normal forms a request is judged in: its host ([`host`]: one valid `host[:port]`,
//! case and a trailing dot ignored) and its path ([`path`]: percent-decoding of unreserved
//! characters, `//` merged, dot segments removed, or refused when that cannot be done
//! safely). Pure functions, used by the config (route and jail paths are stored in the form
//! requests are matched in) and by the request path.
//!
//! Uses: nothing of the crate.

pub mod host;
pub mod path;
