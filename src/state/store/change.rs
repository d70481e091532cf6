//! One change to the state, as the outbox keeps it and the fleet carries it.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::decide::policy::temporary::{Entry, Slot};

/// An entry as it is written down (on disk, in the outbox, in the fleet's store).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    pub created_at: u64,
    pub expires_at: u64,
    pub source: String,
    pub reason: Option<String>,
    /// The fleet gateway that made it; absent: this gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

impl Stored {
    pub fn of(entry: &Entry) -> Stored {
        Stored {
            created_at: entry.created_at,
            expires_at: entry.expires_at,
            source: entry.source().to_string(),
            reason: entry.reason().map(str::to_string),
            origin: entry.origin().map(str::to_string),
        }
    }

    pub fn entry(&self) -> Entry {
        Entry::new(
            self.created_at,
            self.expires_at,
            &self.source,
            self.reason.as_deref(),
        )
        .with_origin(self.origin.as_deref())
    }
}

/// A change to the temporary entries or the offense history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Change {
    /// An entry made or replaced.
    Put {
        /// `block`, `allow`, or a scoped `block@site:NAME`.
        action: Slot,
        target: IpNet,
        entry: Stored,
    },
    /// An entry removed (unban, or forget).
    Delete { action: Slot, target: IpNet },
    /// The offense times of `target` in `jail` (every one within retention).
    Offense {
        jail: String,
        target: IpNet,
        times: Vec<u64>,
    },
    /// The offense history of these targets erased (`forget`).
    Forget { targets: Vec<IpNet> },
}

impl Change {
    /// Whether the change is about `target` (what `forget` must erase from the fleet).
    pub fn concerns(&self, net: &IpNet) -> bool {
        match self {
            Change::Put { target, .. }
            | Change::Delete { target, .. }
            | Change::Offense { target, .. } => target == net,
            Change::Forget { targets } => targets.contains(net),
        }
    }
}
