//! What the gateway shows of itself: Prometheus [`metrics`] (no label ever holds a client
//! address) and the JSON `access_log` (addresses full, anonymized or left out, as
//! `privacy.log_ip` says).
//!
//! Uses: [`crate::config`].

pub(crate) mod access_log;
pub mod metrics;
