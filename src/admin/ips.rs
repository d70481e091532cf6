//! `/v1/ips/{ip}`: the decision for one address and every datum held about it (`lookup`),
//! and its erasure (`forget`): temporary entries, rate-limit and jail state, offense history.

use std::net::IpAddr;

use http::{Response, StatusCode};
use ipnet::IpNet;

use super::*;

/// The targets an address's client state is kept under: the address, and for IPv6 the
/// prefix it is counted as.
fn own_targets(state: &AppState, ip: IpAddr) -> Vec<IpNet> {
    let prefix = state.snapshot.load().config.rate_limit.ipv6_prefix;
    crate::decide::clients::client_targets(ip, prefix)
}

/// Rate-limit and jail state held for `ip` (erased first when `erase`).
fn client_state(state: &AppState, ip: IpAddr, erase: bool) -> (Vec<LimitView>, Vec<CounterView>) {
    let snap = state.snapshot.load();
    let mut limits = Vec::new();
    for (rule, l) in &snap.limiters {
        // A network's bucket is about the network: shown by lookup, not erased by forget.
        if erase && l.is_network() {
            continue;
        }
        let key = l.key_for(ip);
        if l.is_tracked(key) {
            limits.push(LimitView { rule: rule.clone() });
            if erase {
                l.forget(key);
            }
        }
    }
    let key = crate::decide::clients::client_key(ip, snap.config.rate_limit.ipv6_prefix);
    let mut jails = Vec::new();
    for (name, j) in &snap.jails {
        if let Some(c) = j.counter(key) {
            jails.push(CounterView {
                jail: name.clone(),
                hits: c.hits(),
                window_started: rfc3339(c.start_ms()),
            });
        }
        if erase {
            j.forget(key);
        }
    }
    (limits, jails)
}

/// Offense history held for `ip` (its address or IPv6 prefix).
async fn offenses(
    state: &AppState,
    ip: IpAddr,
) -> Result<Vec<OffenseView>, crate::state::store::Error> {
    let held = state.offenses(ip, own_targets(state, ip)).await?;
    Ok(held
        .into_iter()
        .map(|(jail, target, times)| OffenseView {
            jail,
            target: target.to_string(),
            at: times.into_iter().map(rfc3339).collect(),
        })
        .collect())
}

/// The decision for `ip`, the rule that made it, and every datum held about it.
pub(super) async fn lookup(state: &AppState, ip: IpAddr) -> Response<AdminBody> {
    let (rate_limits, jail_counters) = client_state(state, ip, false);
    let offenses = match offenses(state, ip).await {
        Ok(o) => o,
        Err(e) => return json_error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    let (decision, rule) = decision(state, ip);
    let (mut entries, config_entries) = held(state, ip);
    mark_fleet(state, &mut entries).await;
    let (place, geo_rules) = geo_rules(state, ip);
    let key =
        crate::decide::clients::client_key(ip, state.snapshot.load().config.rate_limit.ipv6_prefix);
    let lookup = Lookup {
        refused_last_hour: state.refusals.of(key, now_ms()),
        ban_records: state
            .bans
            .of(ip, &own_targets(state, ip))
            .into_iter()
            .map(|b| rfc3339(b.at_ms))
            .collect(),
        asn: place.asn,
        country: place.country_code(),
        geo_rules,
        ip: ip.to_string(),
        decision,
        rule,
        entries,
        config_entries,
        rate_limits,
        jail_counters,
        offenses,
    };
    json(StatusCode::OK, &lookup)
}

/// What the `[geo]` databases say of `ip`, and the lists that hold it by that.
fn geo_rules(state: &AppState, ip: IpAddr) -> (crate::decide::geo::Place, Vec<GeoRuleView>) {
    let snap = state.snapshot.load();
    let Some(geo) = &snap.policy.geo else {
        return Default::default();
    };
    let place = geo.place(ip);
    let rules = snap
        .policy
        .all()
        .filter_map(|l| {
            l.geo_reason(&place).map(|matched| GeoRuleView {
                list: l.name.clone(),
                action: l.action,
                matched,
            })
        })
        .collect();
    (place, rules)
}

/// The decision for `ip` and the rule that made it.
fn decision(state: &AppState, ip: IpAddr) -> (Decision, Option<RuleView>) {
    let snap = state.snapshot.load();
    let verdict = snap.policy.decide(&state.temp, ip);
    let (action, r) = match verdict {
        Verdict::Pass => return (Decision::Pass, None),
        Verdict::Allow(r) => (Action::Allow, r),
        Verdict::Block(r) => (Action::Block, r),
    };
    let rule = match r {
        Rule::Static(_) => {
            let l = snap.policy.list(verdict);
            Some(RuleView::Static {
                list: l.map(|l| l.name.clone()),
                targets: l
                    .map(|l| l.table.matching(ip).map(|n| n.to_string()).collect())
                    .unwrap_or_default(),
            })
        }
        Rule::Temporary => state
            .temp
            .table(&Slot::of(action))
            .find(ip, Some(now_ms()))
            .map(|(t, e)| RuleView::Temporary {
                entry: temporary_view(&Slot::of(action), t, &e),
            }),
    };
    let decision = match action {
        Action::Allow => Decision::Allow,
        _ => Decision::Block,
    };
    (decision, rule)
}

/// The temporary and the config entries that cover `ip`.
fn held(state: &AppState, ip: IpAddr) -> (Vec<EntryView>, Vec<EntryView>) {
    let snap = state.snapshot.load();
    let now = now_ms();
    let temporary = state
        .temp
        .slots()
        .into_iter()
        .flat_map(|slot| {
            state
                .temp
                .table(&slot)
                .covering(ip, now)
                .into_iter()
                .map(move |(t, e)| temporary_view(&slot, t, &e))
        })
        .collect();
    let config = snap
        .policy
        .matching(ip)
        .into_iter()
        .flat_map(|(l, nets)| nets.into_iter().map(|n| config_view(l, n)))
        .collect();
    (temporary, config)
}

/// Erases what is held about `ip`: temporary entries whose target is the address itself or,
/// for IPv6, the prefix it is counted as; its rate-limit and jail state; its offense history.
/// Entries for wider networks and config entries are reported, not erased: they are about a
/// network or are configuration.
pub(super) async fn forget(state: &AppState, ip: IpAddr) -> Response<AdminBody> {
    let targets = own_targets(state, ip);
    let (erased_rate_limits, erased_jail_counters) = client_state(state, ip, true);
    // Read, then erase: an erasure the store refused is reported as a failure, never as done.
    let erased_offenses = match offenses(state, ip).await {
        Ok(o) => o,
        Err(e) => return json_error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    let slots = state.temp.slots();
    let pairs: Vec<(Slot, IpNet)> = targets
        .iter()
        .flat_map(|&t| slots.iter().map(move |s| (s.clone(), t)))
        .collect();
    let erased = match state.remove_entries(pairs).await {
        Ok(r) => r,
        Err(e) => return json_error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    let erased_ban_records = state.bans.forget(ip, &targets);
    let prefix = state.snapshot.load().config.rate_limit.ipv6_prefix;
    let erased_refusals = state
        .refusals
        .forget(crate::decide::clients::client_key(ip, prefix));
    // Last: with a fleet, the forget also erases the records of the removals just made.
    if let Err(e) = state.forget_offenses(targets.clone()).await {
        return json_error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
    }
    let (entries, config_entries) = held(state, ip);
    let forgotten = Forgotten {
        ip: ip.to_string(),
        erased: erased
            .iter()
            .map(|(a, t, e)| temporary_view(a, *t, e))
            .collect(),
        erased_rate_limits,
        erased_jail_counters,
        erased_offenses,
        erased_ban_records,
        erased_refusals,
        kept: Kept {
            entries,
            config_entries,
        },
    };
    json(StatusCode::OK, &forgotten)
}
