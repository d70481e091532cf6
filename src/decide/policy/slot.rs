//! Which temporary list an entry is in ([`Slot`]), and where a scoped one holds
//! ([`Scope`]): the names the store, the outbox, the fleet and the admin API give them.

use crate::config::Action;

/// Where a scoped block entry holds (`jail.scope`): on one site, or on the sites that
/// name a jail.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Site(Box<str>),
    Jail(Box<str>),
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Site(s) => write!(f, "site:{s}"),
            Scope::Jail(j) => write!(f, "jail:{j}"),
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Scope, String> {
        match s.split_once(':') {
            Some(("site", name)) if !name.is_empty() => Ok(Scope::Site(name.into())),
            Some(("jail", name)) if !name.is_empty() => Ok(Scope::Jail(name.into())),
            _ => Err(format!("'{s}': a scope is site:NAME or jail:NAME")),
        }
    }
}

/// Which temporary list an entry is in: allow, block (everywhere), block on some sites, or
/// a site's passes (solved challenges).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    Allow,
    Block,
    Scoped(Scope),
    /// Passes on one site (always a `Scope::Site`).
    Pass(Scope),
}

impl Slot {
    pub fn action(&self) -> Action {
        match self {
            Slot::Allow => Action::Allow,
            Slot::Block | Slot::Scoped(_) => Action::Block,
            Slot::Pass(_) => Action::Pass,
        }
    }

    pub fn scope(&self) -> Option<&Scope> {
        match self {
            Slot::Scoped(s) | Slot::Pass(s) => Some(s),
            _ => None,
        }
    }

    /// The unscoped slot of an action (block for the actions that have none).
    pub fn of(action: Action) -> Slot {
        match action {
            Action::Allow => Slot::Allow,
            Action::Block | Action::Challenge | Action::Pass => Slot::Block,
        }
    }

    /// The slot an entry shown with this action and scope is in.
    pub fn from_parts(action: Action, scope: Option<Scope>) -> Option<Slot> {
        match (action, scope) {
            (Action::Allow, None) => Some(Slot::Allow),
            (Action::Block, None) => Some(Slot::Block),
            (Action::Block, Some(s)) => Some(Slot::Scoped(s)),
            (Action::Pass, Some(s @ Scope::Site(_))) => Some(Slot::Pass(s)),
            _ => None,
        }
    }

    /// The pass slot of a site.
    pub fn pass(site: &str) -> Slot {
        Slot::Pass(Scope::Site(site.into()))
    }
}

impl From<Action> for Slot {
    fn from(a: Action) -> Slot {
        Slot::of(a)
    }
}

/// `allow`, `block`, `block@site:NAME` / `block@jail:NAME`, or `pass@site:NAME`: how the
/// store, the outbox and the fleet name a slot.
impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Slot::Scoped(s) => write!(f, "block@{s}"),
            Slot::Pass(s) => write!(f, "pass@{s}"),
            other => f.write_str(other.action().as_str()),
        }
    }
}

impl std::str::FromStr for Slot {
    type Err = String;

    fn from_str(s: &str) -> Result<Slot, String> {
        match s.split_once('@') {
            Some(("block", scope)) => Ok(Slot::Scoped(scope.parse()?)),
            Some(("pass", scope)) => match scope.parse()? {
                site @ Scope::Site(_) => Ok(Slot::Pass(site)),
                Scope::Jail(_) => Err(format!("'{s}': a pass holds on a site")),
            },
            Some(_) => Err(format!("'{s}': only block and pass entries have a scope")),
            None => match s.parse::<Action>()? {
                a @ (Action::Allow | Action::Block) => Ok(Slot::of(a)),
                _ => Err(format!("'{s}': this entry needs a scope")),
            },
        }
    }
}

impl serde::Serialize for Slot {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Slot {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Slot, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}
