//! The ledger invariant, held against what the simulated upstreams did, per request and per
//! user and action:
//!
//! - never count what was not done: a request counted as a success (`outcome: success`) was
//!   done by its upstream; one counted as of unknown outcome (its answer never came) may not
//!   have been, and is tallied; nothing is counted twice;
//! - nothing done goes uncounted without a record: a request the upstream did is counted, or
//!   its loss is on record in Redis (a `lost` event for its user and action, or — its Envoy
//!   killed — its reservation expired unsettled); only an unlimited action's success whose
//!   Envoy was killed before sending its settlement may go unrecorded (tallied);
//! - the limit holds: what the upstream did for a user within a period's limit, beyond it
//!   only what fail-open let through and what a killed Envoy's expired reservations gave back;
//! - every counter equals its usage events.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::Request;

/// What a seed ran and found, when the invariant held.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub requests: u64,
    pub done: u64,
    pub counted: u64,
    /// Counted as of unknown outcome though the upstream had not done it.
    pub unknown_not_done: u64,
    /// Done, not counted, the loss on record (lost events, expired reservations).
    pub lost_on_record: u64,
    /// Done by an unlimited action whose Envoy was killed before sending its settlement.
    pub lost_with_killed_envoy: u64,
    pub fail_open: u64,
    /// Units `plan-limits audit` lists as lost on record.
    pub audited_losses: u64,
    /// Successes held until Redis counted them (read-your-writes), each checked counted then.
    pub awaited_commits: u64,
    /// Workers the audit found gone silent without stopping (each a killed one).
    pub silent_workers: u64,
    /// Requests admitted from a lease's units (seeds with leases on).
    pub leased: u64,
}

#[derive(Debug, Clone)]
pub struct Violation(pub String);

/// One event of the seed's stream: its fields.
type Event = HashMap<String, String>;

fn events(admin: &mut redis::Connection, prefix: &str) -> Vec<Event> {
    let raw: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(format!("{prefix}:events"))
        .arg("-")
        .arg("+")
        .query(admin)
        .unwrap_or_else(|e| panic!("XRANGE: {e}"));
    raw.into_iter()
        .map(|(_, fields)| {
            fields
                .chunks(2)
                .filter_map(|kv| match kv {
                    [k, v] => Some((k.clone(), v.clone())),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

/// The request ids Redis has a usage event for.
pub fn counted_request_ids(admin: &mut redis::Connection, prefix: &str) -> HashSet<String> {
    events(admin, prefix)
        .into_iter()
        .filter(|e| e.get("event").map(String::as_str) == Some("usage"))
        .filter_map(|e| e.get("request_id").cloned())
        .collect()
}

/// Reservations (and holds of storage or team) still pending in Redis, per user and action
/// (unsettled: after the drain, only a killed Envoy's). Keys name them:
/// `<prefix>:{<user>}:<period>:pending:<action>`, `<prefix>:{<user>}:storage:held`.
fn pending_reservations(
    admin: &mut redis::Connection,
    prefix: &str,
) -> BTreeMap<(String, String), u64> {
    let mut out = BTreeMap::new();
    for (pattern, action_of) in [
        ("*:pending:*", None),
        ("*:storage:held", Some("upload")),
        ("*:team:held", Some("team_invite")),
    ] {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:{pattern}"))
            .query(admin)
            .unwrap_or_default();
        for key in keys {
            let n: u64 = redis::cmd("ZCARD").arg(&key).query(admin).unwrap_or(0);
            let user = key
                .split_once('{')
                .and_then(|(_, rest)| rest.split_once('}'))
                .map(|(user, _)| user.to_string())
                .unwrap_or_default();
            let action = action_of
                .map(String::from)
                .unwrap_or_else(|| key.rsplit(':').next().unwrap_or_default().to_string());
            *out.entry((user, action)).or_default() += n;
        }
    }
    out
}

fn limit_of(plans: &serde_json::Value, plan: &str, action: &str) -> Option<u64> {
    plans["plans"][plan]["limits"][action].as_u64()
}

pub fn check(
    admin: &mut redis::Connection,
    prefix: &str,
    requests: &[Request],
    crossed_a_period: bool,
) -> Result<Report, Vec<Violation>> {
    let plans: serde_json::Value =
        serde_json::from_str(&plan_limits_services::plans_json()).expect("plans.json");
    let all = events(admin, prefix);
    let pending = pending_reservations(admin, prefix);
    let mut violations = Vec::new();
    let mut report = Report {
        requests: requests.len() as u64,
        ..Report::default()
    };
    let by_id: HashMap<&str, &Request> = requests.iter().map(|r| (r.id.as_str(), r)).collect();
    let kind = |e: &Event| e.get("event").cloned().unwrap_or_default();
    let field = |e: &Event, f: &str| e.get(f).cloned().unwrap_or_default();

    // Counted, per request.
    let mut counted: HashMap<String, u32> = HashMap::new();
    for e in all.iter().filter(|e| kind(e) == "usage") {
        let id = field(e, "request_id");
        *counted.entry(id.clone()).or_default() += 1;
        report.counted += 1;
        let Some(req) = by_id.get(id.as_str()) else {
            violations.push(Violation(format!("a count of no request: {e:?}")));
            continue;
        };
        if (field(e, "user"), field(e, "action"))
            != (req.user.clone(), req.action.unwrap_or("").into())
        {
            violations.push(Violation(format!("{id} counted as another's: {e:?}")));
        }
        match (field(e, "outcome").as_str(), req.done) {
            (_, true) => {}
            // Its answer never came after it reached the upstream whole: it may have been done.
            ("unknown", false) if req.at_upstream => report.unknown_not_done += 1,
            (outcome, false) => violations.push(Violation(format!(
                "{id} ({} {:?}) counted as `{outcome}` but its upstream did not do it: {req:?}",
                req.user, req.action
            ))),
        }
    }
    for (id, n) in &counted {
        if *n > 1 {
            violations.push(Violation(format!("{id} counted {n} times")));
        }
    }

    // Done, per request: counted, or its loss on record.
    let mut lost_units: BTreeMap<(String, String), u64> = BTreeMap::new();
    for e in all.iter().filter(|e| kind(e) == "lost") {
        let units: u64 = field(e, "units").parse().unwrap_or(0);
        *lost_units
            .entry((field(e, "user"), field(e, "action")))
            .or_default() += units;
    }
    // Reservations (and holds) a killed Envoy left unsettled, per user and action: expired on
    // record, or still pending; but those committed after all.
    let committed: HashSet<String> = all
        .iter()
        .filter(|e| kind(e) == "usage")
        .map(|e| field(e, "reservation"))
        .collect();
    let mut unsettled: BTreeMap<(String, String), u64> = BTreeMap::new();
    for e in all
        .iter()
        .filter(|e| matches!(kind(e).as_str(), "reservation_expired" | "hold_expired"))
        .filter(|e| !committed.contains(&field(e, "reservation")))
    {
        *unsettled
            .entry((field(e, "user"), field(e, "action")))
            .or_default() += 1;
    }
    for ((user, action), n) in pending {
        *unsettled.entry((user, action)).or_default() += n;
    }
    // (Requests a live worker settled first: a `lost` record can only be theirs; a killed
    // Envoy's may also be excused by what outlived it.)
    let mut done: Vec<&Request> = requests.iter().filter(|r| r.done).collect();
    done.sort_by_key(|r| r.lost_with_worker);
    for req in done {
        report.done += 1;
        let Some(action) = req.action else { continue };
        if counted.contains_key(&req.id) {
            continue;
        }
        let key = (req.user.clone(), action.to_string());
        if let Some(n) = lost_units.get_mut(&key).filter(|n| **n > 0) {
            *n -= 1;
            report.lost_on_record += 1;
            continue;
        }
        // Its Envoy was killed before its settlement reached Redis: a reservation (or a hold)
        // outlives it, expiring unsettled, on record. What went on without one (an unlimited
        // action, or fail-open) had only the Envoy's queue.
        let held_in_redis = limit_of(&plans, req.plan, action).is_some() && !req.fail_open;
        if req.lost_with_worker {
            match unsettled.get_mut(&key).filter(|n| **n > 0) {
                Some(n) => {
                    *n -= 1;
                    report.lost_on_record += 1;
                    continue;
                }
                None if !held_in_redis => {
                    report.lost_with_killed_envoy += 1;
                    continue;
                }
                None => {}
            }
        }
        violations.push(Violation(format!(
            "{} ({} {action}) done by its upstream, not counted, no loss on record: {req:?}",
            req.id, req.user
        )));
    }

    // The limit, per user and action.
    let mut done_by: BTreeMap<(String, &str), (u64, u64, &str)> = BTreeMap::new();
    for req in requests.iter().filter(|r| r.done) {
        let Some(action) = req.action else { continue };
        let entry = done_by
            .entry((req.user.clone(), action))
            .or_insert((0, 0, req.plan));
        entry.0 += 1;
        if req.fail_open || req.lost_with_worker {
            entry.1 += 1;
        }
    }
    report.fail_open = requests.iter().filter(|r| r.fail_open).count() as u64;
    for ((user, action), (done, excused, plan)) in &done_by {
        let Some(limit) = limit_of(&plans, plan, action) else {
            continue;
        };
        let periods = if crossed_a_period { 2 } else { 1 };
        if *done > limit * periods + excused {
            violations.push(Violation(format!(
                "{user} {action}: the upstream did {done}, limit {limit} x {periods} period(s), {excused} let through fail-open or lost with a killed Envoy"
            )));
        }
    }

    // Every counter equals its usage events.
    let mut by_counter: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    for e in all.iter().filter(|e| kind(e) == "usage") {
        *by_counter
            .entry((field(e, "user"), field(e, "period"), field(e, "action")))
            .or_default() += 1;
    }
    for ((user, period, action), events) in &by_counter {
        let key = plan_limits_core::UsageKeys::new(prefix, user, period, action).summary;
        let counter: u64 = redis::cmd("HGET")
            .arg(&key)
            .arg(action)
            .query::<Option<u64>>(admin)
            .ok()
            .flatten()
            .unwrap_or(0);
        if counter != *events {
            violations.push(Violation(format!(
                "{user} {action} {period}: counter {counter}, usage events {events}"
            )));
        }
    }

    if violations.is_empty() {
        Ok(report)
    } else {
        Err(violations)
    }
}
