//! What the gateway shows of itself: Prometheus [`metrics`] (no label ever holds a client
//! address) and the JSON `access_log` (addresses full, anonymized or left out, as
//! `privacy.log_ip` says); the [`history`] of requests per site behind the console's charts.
//!
//! Uses: [`crate::config`].

pub(crate) mod access_log;
pub mod history;
pub mod metrics;
