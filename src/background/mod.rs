//! Tasks beside the request path, each changing things only through the state:
//! - `fleet`: sends the outbox to the shared store (Redis or Valkey) and applies the other
//!   gateways' changes;
//! - [`firewall`]: mirrors the block set into nftables;
//! - [`logjail`]: jails fed by log files or the journal, read as their daemons wrote them;
//! - `acme`: orders and renews certificates;
//! - `feed`: fetches the lists that come from a URL and keeps their last good copies;
//! - `watcher`: re-reads changed list and certificate files;
//! - [`shutdown`]: the signals (SIGHUP reloads, SIGTERM stops);
//! - `systemd`: readiness, watchdog and stopping notices to systemd;
//! - [`upgrade`]: hands the listening sockets and the store to the binary on disk.
//!
//! Uses: [`crate::serve`] (a log jail counts offenses as the request path does),
//! [`crate::state`], [`crate::decide`], [`crate::observe`], [`crate::config`].

pub(crate) mod acme;
pub mod feed;
pub mod firewall;
pub(crate) mod fleet;
pub mod logjail;
pub mod shutdown;
pub(crate) mod systemd;
pub mod upgrade;
pub(crate) mod watcher;
