//! The ledger invariant, checked after a run for every user and action, from what the demo
//! upstream did (its ledger) and what Redis holds (counters, usage, `lost` and
//! `reservation_expired` events):
//!
//! - (a) never count what was not done: every usage event of outcome `success` names a
//!   request the upstream did, for that user and action, and no request is counted twice;
//!   events of outcome `unknown` whose request was not done are allowed, listed and counted;
//! - (b) nothing done uncounted unless lost on record: done <= counted + units of `lost`
//!   events + `reservation_expired` events (these only in a run where Envoy was killed); in a
//!   run where Envoy was killed, what its queue held without a reservation in Redis is lost
//!   without a record of whose (docs/guarantees.md's bound): noted, not failed;
//! - (c) for a limited action, done <= limit + the fail-open allowance in a run without
//!   faults (with faults the overshoot is reported, not failed);
//! - (d) the counter equals the number of usage events.

use std::collections::{BTreeMap, BTreeSet};

use plan_limits_core::Plans;

use super::plan::USERS;

/// An event as Redis holds it (field -> value).
pub type Event = BTreeMap<String, String>;

/// What the run left behind, read once the gateway was quiet.
#[derive(Debug, Clone)]
pub struct Observation {
    /// The demo upstream's ledger (`done`, `requests`).
    pub ledger: serde_json::Value,
    /// Every event of the stream, oldest first.
    pub events: Vec<Event>,
    /// Counters per (user, action), summed over the periods of the run.
    pub counters: BTreeMap<(String, String), u64>,
}

/// What the faults of the run allow.
#[derive(Debug, Clone, Copy)]
pub struct Facts {
    pub faults_ran: bool,
    pub envoy_killed: bool,
    /// Envoy processes that served the run (each has its own fail-open allowance).
    pub envoys: usize,
}

/// One user's and action's numbers.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub user: String,
    pub action: String,
    pub done: u64,
    pub counted: u64,
    pub usage_events: u64,
    pub unknown_events: u64,
    pub unknown_not_done: u64,
    pub lost: u64,
    pub expired: u64,
    pub limit: Option<u64>,
    /// Requests the upstream did (by the ledger) that no usage event names.
    pub uncounted: Vec<String>,
    /// Each usage event as `request id (outcome, at)`, oldest first.
    pub counted_requests: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Violation {
    /// `a`, `b`, `c` or `d`.
    pub invariant: char,
    pub user: String,
    pub action: String,
    pub detail: String,
}

/// The invariant's answer for one run.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    pub rows: Vec<Row>,
    pub violations: Vec<Violation>,
    /// What is allowed but worth reading: unknown outcomes not done, overshoots in runs with
    /// faults, refused settlements.
    pub notes: Vec<String>,
}

/// The terms the run's plans.json sets: limits per plan and action, and which actions fail
/// open with how much allowance.
pub struct Terms {
    pub plans: Plans,
    pub json: serde_json::Value,
}

impl Terms {
    pub fn new(plans_json: &str) -> Self {
        let plans = Plans::from_json(plans_json.as_bytes())
            .unwrap_or_else(|e| panic!("the run's plans.json: {e:?}"));
        let json = serde_json::from_str(plans_json)
            .unwrap_or_else(|e| panic!("the run's plans.json: {e}"));
        Self { plans, json }
    }

    /// Every action's name.
    pub fn actions(&self) -> Vec<String> {
        self.plans.actions().iter().map(|a| a.key.clone()).collect()
    }

    /// The monthly limit of `action` on `plan` (`None`: unlimited).
    pub fn limit(&self, plan: &str, action: &str) -> Option<u64> {
        self.json["plans"][plan]["limits"][action].as_u64()
    }

    /// How far past its limit a user may get while Redis is unreachable.
    pub fn fail_open_allowance(&self, action: &str) -> u64 {
        let mode = self.json["actions"][action]["on_redis_error"]
            .as_str()
            .unwrap_or("fail_open");
        if mode == "fail_open" {
            self.json["redis"]["fail_open_allowance"]
                .as_u64()
                .unwrap_or(1)
        } else {
            0
        }
    }

    /// The action a handler of the demo upstream (`"POST /api/upload"`) did, if metered.
    pub fn action_of_handler(&self, handler: &str) -> Option<String> {
        let (method, path) = handler.split_once(' ')?;
        self.plans.route(method, path).map(|a| a.key.clone())
    }
}

fn field<'a>(event: &'a Event, name: &str) -> &'a str {
    event.get(name).map(String::as_str).unwrap_or("")
}

/// Checks the invariant on what a run left behind.
pub fn check(terms: &Terms, observed: &Observation, facts: Facts) -> Verdict {
    let mut verdict = Verdict::default();
    let done = done_by_user_and_action(terms, observed, &mut verdict);
    check_usage_events(terms, observed, &mut verdict);
    let actions = terms.actions();
    for (user, plan) in USERS {
        for action in &actions {
            let row = row(terms, observed, &done, user, plan, action);
            check_row(terms, &row, facts, &mut verdict);
            if row.done + row.counted + row.usage_events + row.lost + row.expired > 0 {
                verdict.rows.push(row);
            }
        }
    }
    for event in observed
        .events
        .iter()
        .filter(|e| field(e, "event") == "settle_refused")
    {
        verdict
            .notes
            .push(format!("settle_refused event: {event:?}"));
    }
    verdict
}

/// Work the upstream did per (user, action); work for no user of the run is a violation.
fn done_by_user_and_action(
    terms: &Terms,
    observed: &Observation,
    verdict: &mut Verdict,
) -> BTreeMap<(String, String), u64> {
    let known: BTreeSet<&str> = USERS.iter().map(|(u, _)| *u).collect();
    let mut done = BTreeMap::new();
    let users = observed.ledger["done"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    for (user, handlers) in users {
        for (handler, n) in handlers.as_object().cloned().unwrap_or_default() {
            let Some(action) = terms.action_of_handler(&handler) else {
                continue;
            };
            let n = n.as_u64().unwrap_or(0);
            if !known.contains(user.as_str()) {
                verdict.violations.push(Violation {
                    invariant: 'b',
                    user: user.clone(),
                    action: action.clone(),
                    detail: format!(
                        "the upstream ran {handler} {n} time(s) for user {user:?}, whom no \
                         token of the run names: metered work with nobody to count it for"
                    ),
                });
                continue;
            }
            *done.entry((user.clone(), action)).or_default() += n;
        }
    }
    done
}

/// (a): each usage event names a request done by that user and action, counted once.
fn check_usage_events(terms: &Terms, observed: &Observation, verdict: &mut Verdict) {
    let requests = &observed.ledger["requests"];
    let mut seen: BTreeMap<&str, u64> = BTreeMap::new();
    for event in observed
        .events
        .iter()
        .filter(|e| field(e, "event") == "usage")
    {
        let (user, action) = (field(event, "user"), field(event, "action"));
        let request_id = field(event, "request_id");
        let outcome = match field(event, "outcome") {
            "" => "success",
            other => other,
        };
        let mut violation = |detail: String| {
            verdict.violations.push(Violation {
                invariant: 'a',
                user: user.into(),
                action: action.into(),
                detail,
            })
        };
        if request_id.is_empty() {
            if outcome == "success" {
                violation(format!("a success counted without a request id: {event:?}"));
            }
            continue;
        }
        *seen.entry(request_id).or_default() += 1;
        let entry = &requests[request_id];
        let did = entry["outcome"].as_str() == Some("done")
            && entry["user"].as_str() == Some(user)
            && entry["handler"]
                .as_str()
                .and_then(|h| terms.action_of_handler(h))
                .as_deref()
                == Some(action);
        if did {
            continue;
        }
        let ledger_says = if entry.is_null() {
            "never reached a handler".to_string()
        } else {
            format!("ledger: {entry}")
        };
        if outcome == "success" {
            violation(format!(
                "counted as a success, but request {request_id} was not done ({ledger_says}); \
                 event {event:?}"
            ));
        } else {
            verdict.notes.push(format!(
                "{user}/{action}: counted with outcome {outcome}, request {request_id} not done \
                 ({ledger_says})"
            ));
        }
    }
    for (request_id, n) in seen.into_iter().filter(|(_, n)| *n > 1) {
        let event = observed
            .events
            .iter()
            .find(|e| field(e, "event") == "usage" && field(e, "request_id") == request_id);
        let (user, action) = event
            .map(|e| (field(e, "user"), field(e, "action")))
            .unwrap_or(("?", "?"));
        verdict.violations.push(Violation {
            invariant: 'a',
            user: user.into(),
            action: action.into(),
            detail: format!("request {request_id} counted {n} times"),
        });
    }
}

fn row(
    terms: &Terms,
    observed: &Observation,
    done: &BTreeMap<(String, String), u64>,
    user: &str,
    plan: &str,
    action: &str,
) -> Row {
    let key = (user.to_string(), action.to_string());
    let of_this = |e: &&Event| field(e, "user") == user && field(e, "action") == action;
    let events: Vec<&Event> = observed.events.iter().filter(of_this).collect();
    let requests = &observed.ledger["requests"];
    let usage: Vec<&&Event> = events
        .iter()
        .filter(|e| field(e, "event") == "usage")
        .collect();
    let unknown: Vec<&&Event> = usage
        .iter()
        .copied()
        .filter(|e| field(e, "outcome") == "unknown")
        .collect();
    let unknown_not_done = unknown
        .iter()
        .filter(|e| requests[field(e, "request_id")]["outcome"].as_str() != Some("done"))
        .count() as u64;
    let counted_ids: BTreeSet<&str> = usage.iter().map(|e| field(e, "request_id")).collect();
    let uncounted = requests
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(id, r)| {
            r["user"].as_str() == Some(user)
                && r["outcome"].as_str() == Some("done")
                && r["handler"]
                    .as_str()
                    .and_then(|h| terms.action_of_handler(h))
                    .as_deref()
                    == Some(action)
                && !counted_ids.contains(id.as_str())
        })
        .map(|(id, _)| id.clone())
        .collect();
    Row {
        user: user.into(),
        action: action.into(),
        done: done.get(&key).copied().unwrap_or(0),
        counted: observed.counters.get(&key).copied().unwrap_or(0),
        usage_events: usage.len() as u64,
        unknown_events: unknown.len() as u64,
        unknown_not_done,
        lost: events
            .iter()
            .filter(|e| field(e, "event") == "lost")
            .map(|e| field(e, "units").parse::<u64>().unwrap_or(0))
            .sum(),
        expired: events
            .iter()
            .filter(|e| field(e, "event") == "reservation_expired")
            .count() as u64,
        limit: terms.limit(plan, action),
        uncounted,
        counted_requests: usage
            .iter()
            .map(|e| {
                format!(
                    "{} ({}, {})",
                    field(e, "request_id"),
                    field(e, "outcome"),
                    field(e, "at")
                )
            })
            .collect(),
    }
}

/// (b), (c) and (d) for one user and action.
fn check_row(terms: &Terms, row: &Row, facts: Facts, verdict: &mut Verdict) {
    let mut violation = |invariant: char, detail: String| {
        verdict.violations.push(Violation {
            invariant,
            user: row.user.clone(),
            action: row.action.clone(),
            detail,
        })
    };
    let expired = if facts.envoy_killed { row.expired } else { 0 };
    if row.done > row.counted + row.lost + expired {
        let detail = format!(
            "done {} > counted {} + lost {} + expired reservations {} (of {} recorded; \
             these count only where Envoy was killed); done but never counted: {:?}",
            row.done, row.counted, row.lost, expired, row.expired, row.uncounted
        );
        if facts.envoy_killed {
            // What a killed Envoy had queued without a reservation in Redis (unlimited
            // successes, fail-open passes) is lost without a record of whose: the bound the
            // docs/guarantees.md states; `plan-limits audit` lists the worker gone silent.
            verdict.notes.push(format!(
                "{}/{}: lost with a killed Envoy's queue: {detail}",
                row.user, row.action
            ));
        } else {
            violation('b', detail);
        }
    }
    if row.counted != row.usage_events {
        violation(
            'd',
            format!(
                "counter {} != usage events {}",
                row.counted, row.usage_events
            ),
        );
    }
    if let Some(limit) = row.limit {
        let bound = limit + terms.fail_open_allowance(&row.action);
        if row.done > bound {
            let detail = format!(
                "done {} > limit {limit} + fail-open allowance {} = {bound}; counted: {:?}",
                row.done,
                bound - limit,
                row.counted_requests
            );
            if facts.faults_ran {
                // What docs/guarantees.md bounds fail-open by: the allowance once per Envoy, and (where
                // Envoy was killed) the units its expired reservations gave back.
                let allowance = terms.fail_open_allowance(&row.action);
                let per_envoy = limit + allowance * facts.envoys as u64 + expired;
                let beyond = if row.done > per_envoy {
                    format!(
                        "; BEYOND limit + allowance × {} Envoy(s) + expired reservations = \
                         {per_envoy}",
                        facts.envoys
                    )
                } else {
                    String::new()
                };
                verdict.notes.push(format!(
                    "{}/{}: overshoot in a run with faults: {detail}{beyond}",
                    row.user, row.action
                ));
            } else {
                violation('c', detail);
            }
        }
    }
}
