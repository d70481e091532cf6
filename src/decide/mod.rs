//! The rules a decision is made of, and the per-client counters behind them:
//! - [`policy`]: static lists and temporary entries (block, allow, scoped), and the
//!   allow-wins verdict for an address;
//! - [`ratelimit`]: token buckets per client and route;
//! - [`jail`]: failures per client in a sliding window, and the watched requests in flight;
//! - `clients`: the client key (an IPv4 address or an IPv6 prefix), the bounded per-client
//!   map, and a client's connections, requests in flight and uploads;
//! - [`challenge`]: signed proof-of-work puzzles and the ones used; [`load`]: each site's
//!   upstream load for the challenge's auto mode;
//! - [`geo`]: the ASN and country databases lists may name;
//! - [`clock`]: the clock every expiry is measured on.
//!
//! Lock-free for reads; nothing here waits on disk or network. The request path's admission
//! (`crate::serve::admission`) puts them together, through the state.
//!
//! Uses: [`crate::config`], [`crate::observe`].

pub mod challenge;
pub(crate) mod clients;
pub mod clock;
pub mod geo;
pub mod jail;
pub mod load;
pub mod policy;
pub mod ratelimit;
