//! The table's contents: the sets wanted from the entries in force, and the nftables
//! objects (sets, rules, elements) of a rebuild or an update, built with the crate's types.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};

use ipnet::IpNet;
use nftables::batch::Batch;
use nftables::expr::{
    BinaryOperation, Elem, Expression, NamedExpression, Payload, PayloadField, Prefix, SetItem, CT,
};
use nftables::schema::{
    Chain, Element, NfListObject, Nftables, Rule, Set, SetFlag, SetType, SetTypeValue, Table,
};
use nftables::stmt::{CTCount, Counter, Match, Meter, Operator, Reject, RejectType, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use crate::config;
use crate::state::AppState;

/// The four sets: (name, family label, block?).
pub(super) const SETS: [(&str, &str, bool); 4] = [
    ("block4", "ipv4", true),
    ("block6", "ipv6", true),
    ("allow4", "ipv4", false),
    ("allow6", "ipv6", false),
];

/// Element targets and their expiry (ms; `None`: no timeout), per set, in `SETS` order.
pub(super) type Sets = [BTreeMap<IpNet, Option<u64>>; 4];

/// The entries in force as the four sets: nested targets folded into the widest, expired
/// ones left out.
pub(super) fn desired(state: &AppState, now: u64) -> Sets {
    let snap = state.snapshot.load();
    let mut raw: [Vec<(IpNet, Option<u64>)>; 4] = Default::default();
    let mut put = |net: IpNet, block: bool, expires: Option<u64>| {
        let i = match (block, net) {
            (true, IpNet::V4(_)) => 0,
            (true, IpNet::V6(_)) => 1,
            (false, IpNet::V4(_)) => 2,
            (false, IpNet::V6(_)) => 3,
        };
        raw[i].push((net.trunc(), expires));
    };
    for l in &snap.policy.block {
        if !l.dry_run {
            for &n in l.table.cidrs() {
                put(n, true, None);
            }
        }
    }
    for l in &snap.policy.allow {
        for &n in l.table.cidrs() {
            put(n, false, None);
        }
    }
    for (net, e) in state.temp.block.all(now) {
        put(net, true, Some(e.expires_at));
    }
    for (net, e) in state.temp.allow.all(now) {
        put(net, false, Some(e.expires_at));
    }
    raw.map(fold)
}

/// Keeps the widest of nested targets (interval sets refuse overlaps); of two equal targets,
/// the one that lasts longer.
fn fold(mut nets: Vec<(IpNet, Option<u64>)>) -> BTreeMap<IpNet, Option<u64>> {
    let lasts = |e: Option<u64>| e.unwrap_or(u64::MAX);
    nets.sort_by(|a, b| {
        (
            a.0.network(),
            a.0.prefix_len(),
            std::cmp::Reverse(lasts(a.1)),
        )
            .cmp(&(
                b.0.network(),
                b.0.prefix_len(),
                std::cmp::Reverse(lasts(b.1)),
            ))
    });
    let mut out = BTreeMap::new();
    let mut wider: Option<IpNet> = None;
    for (net, expires) in nets {
        if wider.is_some_and(|w| w.contains(&net)) {
            continue;
        }
        wider = Some(net);
        out.insert(net, expires);
    }
    out
}

fn s(x: &str) -> Cow<'static, str> {
    Cow::Owned(x.to_owned())
}

pub(super) fn table(name: &str) -> Table<'static> {
    Table {
        family: NfFamily::INet,
        name: s(name),
        handle: None,
    }
}

fn set(t: &str, name: &str) -> Set<'static> {
    Set {
        family: NfFamily::INet,
        table: s(t),
        name: s(name),
        handle: None,
        set_type: SetTypeValue::Single(if name.ends_with('4') {
            SetType::Ipv4Addr
        } else {
            SetType::Ipv6Addr
        }),
        policy: None,
        flags: Some(HashSet::from([SetFlag::Interval, SetFlag::Timeout])),
        elem: None,
        timeout: None,
        gc_interval: None,
        size: None,
        comment: None,
    }
}

fn payload(protocol: &str, field: &str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: s(protocol),
            field: s(field),
        },
    )))
}

fn matches(
    left: Expression<'static>,
    right: Expression<'static>,
    op: Operator,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn rule(t: &str, statements: Vec<Statement<'static>>) -> Rule<'static> {
    Rule {
        family: NfFamily::INet,
        table: s(t),
        chain: s("input"),
        expr: statements.into(),
        handle: None,
        index: None,
        comment: None,
    }
}

/// `ADDRESS/LENGTH`.
fn prefix(net: IpNet) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(Expression::String(Cow::Owned(net.network().to_string()))),
        len: u32::from(net.prefix_len()),
    }))
}

/// `TARGET timeout SECONDS` (no timeout for config entries and those without an expiry).
fn element(net: IpNet, expires: Option<u64>, now: u64) -> Expression<'static> {
    let val = prefix(net);
    match expires {
        Some(at) => {
            let secs = at
                .saturating_sub(now)
                .div_ceil(1000)
                .clamp(1, u64::from(u32::MAX));
            Expression::Named(NamedExpression::Elem(Elem {
                val: Box::new(val),
                timeout: Some(secs as u32),
                expires: None,
                comment: None,
                counter: None,
            }))
        }
        None => val,
    }
}

fn elements(t: &str, set: &str, elems: Vec<Expression<'static>>) -> NfListObject<'static> {
    NfListObject::Element(Element {
        family: NfFamily::INet,
        table: s(t),
        name: s(set),
        elem: elems.into(),
    })
}

/// `tcp dport { PORTS }`.
fn to_ports(conf: &config::Firewall) -> Statement<'static> {
    let ports = conf
        .ports
        .iter()
        .map(|&p| SetItem::Element(Expression::Number(u32::from(p))))
        .collect();
    matches(
        payload("tcp", "dport"),
        Expression::Named(NamedExpression::Set(ports)),
        Operator::EQ,
    )
}

/// `ct state new`.
fn new_connection() -> Statement<'static> {
    matches(
        Expression::Named(NamedExpression::CT(CT {
            key: s("state"),
            family: None,
            dir: None,
        })),
        Expression::String(s("new")),
        Operator::IN,
    )
}

/// What the connection-cap rules are made of, from the config in force: a change rebuilds
/// the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Cap {
    per_client: u32,
    ipv6_prefix: u8,
    /// `gateway.trusted_proxies`: exempt, as at accept.
    trusted: Vec<IpNet>,
}

impl Cap {
    pub(super) fn of(state: &AppState) -> Cap {
        let snap = state.snapshot.load();
        Cap {
            per_client: snap.config.limits.max_connections_per_client,
            ipv6_prefix: snap.config.rate_limit.ipv6_prefix,
            trusted: snap.config.gateway.trusted_proxies.clone(),
        }
    }
}

/// Per family: `[saddr != { TRUSTED }] meter capN { KEY ct count over CAP } counter drop`,
/// where KEY is the address (IPv6: masked to the client prefix). A dropped SYN is what a full
/// accept queue does: the client's kernel tries again (1 s, 3 s, ...), where a reset would
/// invite it to reconnect at once.
fn cap_rules(t: &str, conf: &config::Firewall, cap: &Cap) -> Vec<Rule<'static>> {
    let mask = ipnet::Ipv6Net::new(std::net::Ipv6Addr::UNSPECIFIED, cap.ipv6_prefix)
        .map(|n| n.netmask())
        .unwrap_or(std::net::Ipv6Addr::from(u128::MAX));
    let key6 = Expression::BinaryOperation(Box::new(BinaryOperation::AND(
        payload("ip6", "saddr"),
        Expression::String(Cow::Owned(mask.to_string())),
    )));
    [
        ("ip", "cap4", payload("ip", "saddr")),
        ("ip6", "cap6", key6),
    ]
    .into_iter()
    .map(|(l3, name, key)| {
        let mut stmts = vec![to_ports(conf), new_connection()];
        let trusted: Vec<SetItem<'static>> = cap
            .trusted
            .iter()
            .filter(|n| matches!(n, IpNet::V4(_)) == (l3 == "ip"))
            .map(|&n| SetItem::Element(prefix(n.trunc())))
            .collect();
        if !trusted.is_empty() {
            stmts.push(matches(
                payload(l3, "saddr"),
                Expression::Named(NamedExpression::Set(trusted)),
                Operator::NEQ,
            ));
        }
        stmts.push(Statement::Meter(Meter {
            name: s(name),
            key,
            stmt: Box::new(Statement::CTCount(CTCount {
                val: Expression::Number(cap.per_client),
                inv: Some(true),
            })),
        }));
        stmts.push(Statement::Counter(Counter::Anonymous(None)));
        stmts.push(Statement::Drop(None));
        rule(t, stmts)
    })
    .collect()
}

/// The whole table, replaced in one transaction (whether or not it exists).
pub(super) fn rebuild(
    conf: &config::Firewall,
    sets: &Sets,
    cap: Option<&Cap>,
    now: u64,
) -> Nftables<'static> {
    let t = conf.table.as_str();
    let mut b = Batch::new();
    b.add(NfListObject::Table(table(t)));
    b.delete(NfListObject::Table(table(t)));
    b.add(NfListObject::Table(table(t)));
    for (name, _, _) in SETS {
        b.add(NfListObject::Set(Box::new(set(t, name))));
    }
    b.add(NfListObject::Chain(Chain {
        family: NfFamily::INet,
        table: s(t),
        name: s("input"),
        newname: None,
        handle: None,
        _type: Some(NfChainType::Filter),
        hook: Some(NfHook::Input),
        prio: Some(-10),
        dev: None,
        policy: Some(NfChainPolicy::Accept),
    }));
    // Allow wins: accepted before the block rules look.
    for (l3, set) in [
        ("ip", "@allow4"),
        ("ip6", "@allow6"),
        ("ip", "@block4"),
        ("ip6", "@block6"),
    ] {
        let verdict = if set.starts_with("@allow") {
            Statement::Accept(None)
        } else if conf.verdict == config::Verdict::Reject {
            Statement::Reject(Some(Reject::new(Some(RejectType::TCPReset), None)))
        } else {
            Statement::Drop(None)
        };
        b.add(NfListObject::Rule(rule(
            t,
            vec![
                to_ports(conf),
                new_connection(),
                matches(
                    payload(l3, "saddr"),
                    Expression::String(s(set)),
                    Operator::EQ,
                ),
                verdict,
            ],
        )));
    }
    for r in cap.map(|c| cap_rules(t, conf, c)).unwrap_or_default() {
        b.add(NfListObject::Rule(r));
    }
    for ((name, _, _), elems) in SETS.iter().zip(sets) {
        if !elems.is_empty() {
            let e = elems.iter().map(|(&n, &x)| element(n, x, now)).collect();
            b.add(elements(t, name, e));
        }
    }
    b.to_nftables()
}

/// The changes from `sent` to `want`: removals (of elements the kernel still holds), then
/// additions; a changed expiry is a removal and an addition. `None`: nothing to do.
pub(super) fn update(
    conf: &config::Firewall,
    sent: &Sets,
    want: &Sets,
    now: u64,
) -> Option<Nftables<'static>> {
    let t = conf.table.as_str();
    let mut b = Batch::new();
    let mut any = false;
    // Elements about to time out are left to the kernel: removing one it already dropped
    // would fail the whole transaction.
    let alive = |e: &Option<u64>| e.is_none_or(|at| at > now + 2000);
    for ((name, _, _), (old, new)) in SETS.iter().zip(sent.iter().zip(want)) {
        let gone: Vec<Expression<'static>> = old
            .iter()
            .filter(|(n, e)| new.get(n) != Some(e) && alive(e))
            .map(|(&n, _)| element(n, None, now))
            .collect();
        if !gone.is_empty() {
            b.delete(elements(t, name, gone));
            any = true;
        }
    }
    for ((name, _, _), (old, new)) in SETS.iter().zip(sent.iter().zip(want)) {
        let added: Vec<Expression<'static>> = new
            .iter()
            .filter(|(n, e)| old.get(n) != Some(e))
            .map(|(&n, &e)| element(n, e, now))
            .collect();
        if !added.is_empty() {
            b.add(elements(t, name, added));
            any = true;
        }
    }
    any.then(|| b.to_nftables())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn nested_targets_fold_into_the_widest() {
        let folded = fold(vec![
            (n("10.1.2.3/32"), Some(5)),
            (n("10.1.0.0/16"), Some(1)),
            (n("10.2.0.0/16"), None),
            (n("10.2.0.0/16"), Some(9)),
            (n("192.0.2.1/32"), Some(3)),
        ]);
        let got: Vec<(String, Option<u64>)> = folded
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(
            got,
            vec![
                ("10.1.0.0/16".to_string(), Some(1)),
                ("10.2.0.0/16".to_string(), None),
                ("192.0.2.1/32".to_string(), Some(3)),
            ]
        );
    }

    #[test]
    fn updates_send_only_the_difference() {
        let conf = config::Firewall {
            table: "ipgate".into(),
            ports: vec![22],
            keep_at_stop: false,
            verdict: config::Verdict::Drop,
            connection_cap: false,
            nft: "nft".into(),
        };
        let now = 1_000_000;
        let mut old: Sets = Default::default();
        old[0].insert(n("192.0.2.1/32"), Some(now + 60_000));
        old[0].insert(n("192.0.2.2/32"), Some(now + 1_000));
        let mut new: Sets = Default::default();
        new[0].insert(n("192.0.2.3/32"), Some(now + 60_000));
        assert!(update(&conf, &old, &old, now).is_none());
        let json = serde_json::to_string(&update(&conf, &old, &new, now).unwrap()).unwrap();
        // .1 removed; .2 is left to time out in the kernel; .3 added with its 60 s.
        assert!(json.contains(r#"{"delete":{"element""#), "{json}");
        assert!(json.contains("192.0.2.1"), "{json}");
        assert!(!json.contains("192.0.2.2"), "{json}");
        assert!(json.contains(r#""timeout":60"#), "{json}");
    }
}
