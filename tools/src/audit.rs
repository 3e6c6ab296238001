//! `plan-limits audit`: the counts recomputed from the events, against what Redis holds.
//!
//! The event stream is the record of what was counted (each usage event written by the same
//! atomic call as its counters) and of what an operator changed (`admin` events: a reset sets
//! counters back to zero). Replayed in order, it says what every monthly counter, every day's
//! counter and every running total (storage: uploaded bytes minus freed; team: invites minus
//! removals) must be; any difference is drift. Losses are listed apart: what the gateway
//! recorded as given up (`lost`, `settle_refused`), reservations that expired unsettled (their
//! Envoy died with the request in flight) and were never committed after, and those still
//! pending past their expiry that no later call has found.
//!
//! Events are trimmed by age: what began before the oldest event kept (a period, a day, a
//! running total) cannot be recomputed, and is left out, saying so.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use plan_limits_core::{user_key_parts, Gauge, Plans};

use crate::operator::{self, Redis};

/// One event: its id (`<ms>-<seq>`) and fields.
#[derive(Debug, Clone, Default)]
pub struct Event {
    pub id: String,
    pub fields: BTreeMap<String, String>,
}

impl Event {
    fn get(&self, name: &str) -> &str {
        self.fields.get(name).map_or("", String::as_str)
    }
}

/// `(user, period or day, action)`.
type Counter = (String, String, String);

/// What the events say Redis must hold.
#[derive(Debug, Default)]
pub struct Expected {
    pub counts: BTreeMap<Counter, u64>,
    pub days: BTreeMap<Counter, u64>,
    pub totals: BTreeMap<(String, Gauge), u64>,
    /// Counted as of unknown outcome (the request's answer never came), per user and action.
    pub unknown: BTreeMap<(String, String), u64>,
    pub lost: Vec<Loss>,
}

/// A loss on record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loss {
    pub user: String,
    pub action: String,
    pub units: u64,
    pub why: String,
}

/// Replays `events` (in the order they were written): what every counter must be.
pub fn replay(events: &[Event], plans: &Plans) -> Expected {
    let adds_to = |action: &str| {
        plans
            .actions()
            .iter()
            .find(|a| a.key == action)
            .and_then(|a| a.adds_to)
    };
    let mut out = Expected::default();
    let mut expired: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut committed: BTreeSet<String> = BTreeSet::new();
    for e in events {
        let (user, action) = (e.get("user").to_string(), e.get("action").to_string());
        match e.get("event") {
            "usage" => {
                let day = e.get("at").get(..10).unwrap_or_default().to_string();
                *out.counts
                    .entry((user.clone(), e.get("period").into(), action.clone()))
                    .or_default() += 1;
                // The day's count by kind too (`ai_analysis:vision`), as settle keeps it.
                if !e.get("kind").is_empty() {
                    let by_kind = format!("{action}:{}", e.get("kind"));
                    *out.days
                        .entry((user.clone(), day.clone(), by_kind))
                        .or_default() += 1;
                }
                *out.days
                    .entry((user.clone(), day, action.clone()))
                    .or_default() += 1;
                match adds_to(&action) {
                    Some(Gauge::Storage) => {
                        let bytes: u64 = e.get("bytes").parse().unwrap_or(0);
                        *out.totals
                            .entry((user.clone(), Gauge::Storage))
                            .or_default() += bytes;
                    }
                    Some(Gauge::Team) => {
                        *out.totals.entry((user.clone(), Gauge::Team)).or_default() += 1;
                    }
                    None => {}
                }
                if e.get("outcome") == "unknown" {
                    *out.unknown.entry((user, action)).or_default() += 1;
                }
                committed.insert(e.get("reservation").to_string());
            }
            "given_back" => {
                let gauge = match e.get("gauge") {
                    "storage" => Gauge::Storage,
                    _ => Gauge::Team,
                };
                let amount: u64 = e.get("amount").parse().unwrap_or(0);
                let total = out.totals.entry((user, gauge)).or_default();
                *total = total.saturating_sub(amount);
            }
            "admin" if e.get("op") == "reset" => {
                let period = e.get("period");
                let every = e.get("action").is_empty();
                for ((u, p, a), n) in out.counts.iter_mut() {
                    if *u == user && p == period && (every || *a == action) {
                        *n = 0;
                    }
                }
            }
            "lost" => out.lost.push(Loss {
                units: e.get("units").parse().unwrap_or(0),
                why: format!("given up by the gateway ({})", e.get("reason")),
                user,
                action,
            }),
            "settle_refused" => out.lost.push(Loss {
                units: 1,
                why: format!("refused by Redis: {}", e.get("reason")),
                user,
                action,
            }),
            "reservation_expired" | "hold_expired" => {
                expired.insert(e.get("reservation").to_string(), (user, action));
            }
            _ => {}
        }
    }
    for (reservation, (user, action)) in expired {
        if !committed.contains(&reservation) {
            out.lost.push(Loss {
                user,
                action,
                units: 1,
                why: format!("reservation {reservation} expired unsettled (its Envoy died with the request in flight?)"),
            });
        }
    }
    out
}

/// A worker's record in Redis (`<prefix>:applied:<worker>`): when it was last heard of, what
/// it had queued then, whether it stopped cleanly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRecord {
    pub worker: String,
    pub at_ms: u64,
    pub queued: u64,
    pub stopped: bool,
}

/// Workers silent for four heartbeats without a goodbye: killed (or cut off from Redis).
pub fn silent_workers(records: &[WorkerRecord], now_ms: u64) -> Vec<WorkerRecord> {
    let silence = 4 * plan_limits_core::HEARTBEAT_MS;
    // (On a cluster a worker has one record per slot: the latest speaks for it.)
    let mut latest: BTreeMap<&str, &WorkerRecord> = BTreeMap::new();
    for r in records {
        let entry = latest.entry(&r.worker).or_insert(r);
        if r.at_ms > entry.at_ms || r.stopped {
            *entry = r;
        }
    }
    latest
        .into_values()
        .filter(|r| !r.stopped && now_ms.saturating_sub(r.at_ms) >= silence)
        .cloned()
        .collect()
}

/// What Redis holds.
#[derive(Debug, Default)]
pub struct Found {
    pub counts: BTreeMap<Counter, u64>,
    pub days: BTreeMap<Counter, u64>,
    pub totals: BTreeMap<(String, Gauge), u64>,
    /// Reservations still pending past their expiry (no later call found them), per user and
    /// action.
    pub unsettled: BTreeMap<(String, String), u64>,
    pub workers: Vec<WorkerRecord>,
}

/// A counter that disagrees with the events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    pub user: String,
    pub what: String,
    pub found: u64,
    pub expected: u64,
}

/// What the audit found.
#[derive(Debug, Default)]
pub struct Audit {
    pub events: usize,
    pub drift: Vec<Drift>,
    pub lost: Vec<Loss>,
    /// Workers that went silent without stopping: what they had queued since they were last
    /// heard of (unlimited successes, fail-open passes) is lost without a record of whose.
    pub silent: Vec<WorkerRecord>,
    pub unknown: BTreeMap<(String, String), u64>,
    /// What could not be recomputed: events before this were trimmed (unix ms).
    pub trimmed_before_ms: Option<u64>,
    pub skipped: usize,
}

/// The scope of an audit: one period (`2026-11`, or `2026-11-15` from an anchor day), or all.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub period: Option<String>,
}

impl Scope {
    fn takes_period(&self, period: &str) -> bool {
        self.period.as_deref().is_none_or(|p| p == period)
    }

    /// A day belongs to the period's month(s): the month a calendar period names, or the
    /// month from an anchor day.
    fn takes_day(&self, day: &str) -> bool {
        match self.period.as_deref() {
            None => true,
            Some(p) if p.len() == 7 => day.starts_with(p),
            Some(p) => {
                let end = next_month(p);
                day >= p && day < end.as_str()
            }
        }
    }
}

/// `2026-11-15` → `2026-12-15`.
fn next_month(day: &str) -> String {
    let (y, m) = (
        day.get(..4)
            .and_then(|y| y.parse::<u32>().ok())
            .unwrap_or(0),
        day.get(5..7)
            .and_then(|m| m.parse::<u32>().ok())
            .unwrap_or(0),
    );
    let (y, m) = if m >= 12 { (y + 1, 1) } else { (y, m + 1) };
    format!("{y:04}-{m:02}{}", day.get(7..).unwrap_or_default())
}

/// The start of a period or day (`2026-11`, `2026-11-15`) in unix ms.
fn start_ms(period: &str) -> u64 {
    let day = if period.len() == 7 {
        format!("{period}-01")
    } else {
        period.to_string()
    };
    chrono::NaiveDate::parse_from_str(&day, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map_or(0, |t| {
            u64::try_from(t.and_utc().timestamp_millis()).unwrap_or(0)
        })
}

/// Compares what Redis holds with what the events say, within `scope`; `trimmed_before_ms`:
/// the stream no longer holds events before then.
pub fn compare(
    events: usize,
    expected: Expected,
    found: Found,
    scope: &Scope,
    trimmed_before_ms: Option<u64>,
    now_ms: u64,
) -> Audit {
    let mut audit = Audit {
        events,
        trimmed_before_ms,
        unknown: expected.unknown,
        ..Audit::default()
    };
    let complete = |since: &str| trimmed_before_ms.is_none_or(|t| start_ms(since) >= t);
    for (counters, found_counters, label, in_scope) in [
        (
            &expected.counts,
            &found.counts,
            "period",
            &(|p: &str| scope.takes_period(p)) as &dyn Fn(&str) -> bool,
        ),
        (&expected.days, &found.days, "day", &|d: &str| {
            scope.takes_day(d)
        }),
    ] {
        let all: BTreeSet<&Counter> = counters.keys().chain(found_counters.keys()).collect();
        for key @ (user, when, action) in all {
            if !in_scope(when) {
                continue;
            }
            if !complete(when) {
                audit.skipped += 1;
                continue;
            }
            let (f, e) = (
                found_counters.get(key).copied().unwrap_or(0),
                counters.get(key).copied().unwrap_or(0),
            );
            if f != e {
                audit.drift.push(Drift {
                    user: user.clone(),
                    what: format!("{action} in {label} {when}"),
                    found: f,
                    expected: e,
                });
            }
        }
    }
    if trimmed_before_ms.is_none() {
        let all: BTreeSet<&(String, Gauge)> =
            expected.totals.keys().chain(found.totals.keys()).collect();
        for key @ (user, gauge) in all {
            let (f, e) = (
                found.totals.get(key).copied().unwrap_or(0),
                expected.totals.get(key).copied().unwrap_or(0),
            );
            if f != e {
                audit.drift.push(Drift {
                    user: user.clone(),
                    what: match gauge {
                        Gauge::Storage => "storage (bytes uploaded minus freed)".into(),
                        Gauge::Team => "team (members invited minus removed)".into(),
                    },
                    found: f,
                    expected: e,
                });
            }
        }
    } else {
        audit.skipped += expected.totals.len();
    }
    audit.lost = expected.lost;
    audit.silent = silent_workers(&found.workers, now_ms);
    for ((user, action), n) in found.unsettled {
        audit.lost.push(Loss {
            user,
            action,
            units: n,
            why: "reservations pending past their expiry, unsettled (their Envoy died?)".into(),
        });
    }
    audit
}

impl fmt::Display for Audit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} events replayed", self.events)?;
        if let Some(ms) = self.trimmed_before_ms {
            let at = chrono::DateTime::from_timestamp_millis(ms as i64)
                .map(|t| t.to_rfc3339())
                .unwrap_or_default();
            writeln!(
                f,
                "events before {at} were trimmed: {} counters and totals that began earlier are not checked",
                self.skipped
            )?;
        }
        if self.drift.is_empty() {
            writeln!(
                f,
                "no drift: every counter and total is what its events say"
            )?;
        } else {
            writeln!(f, "drift ({}):", self.drift.len())?;
            for d in &self.drift {
                writeln!(
                    f,
                    "  {:?} {}: Redis holds {}, the events say {} ({:+})",
                    d.user,
                    d.what,
                    d.found,
                    d.expected,
                    d.found as i128 - d.expected as i128
                )?;
            }
        }
        if !self.lost.is_empty() {
            writeln!(f, "lost, on record ({}):", self.lost.len())?;
            for l in &self.lost {
                writeln!(f, "  {:?} {} x{}: {}", l.user, l.action, l.units, l.why)?;
            }
        }
        if !self.silent.is_empty() {
            writeln!(
                f,
                "workers gone silent without stopping ({}): killed, or cut off from Redis; the unlimited successes and fail-open passes each had queued after it was last heard of are lost, without a record of whose:",
                self.silent.len()
            )?;
            for w in &self.silent {
                let at = chrono::DateTime::from_timestamp_millis(w.at_ms as i64)
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_default();
                writeln!(
                    f,
                    "  worker {} last heard of at {at}, with {} settlements queued",
                    w.worker, w.queued
                )?;
            }
        }
        let unknown: u64 = self.unknown.values().sum();
        if unknown > 0 {
            writeln!(
                f,
                "counted as of unknown outcome (forwarded whole, no answer: the client left or Envoy gave up): {unknown}"
            )?;
            for ((user, action), n) in &self.unknown {
                writeln!(f, "  {user:?} {action}: {n}")?;
            }
        }
        Ok(())
    }
}

/// Sorts a user's key (as `user_key_parts` took it apart) into what the audit reads:
/// a monthly summary, a day's counters, a running total, or a pending set.
pub enum UserKey<'k> {
    Summary { period: &'k str },
    Day { day: &'k str },
    Total(Gauge),
    Pending { action: &'k str },
    Held(Gauge),
}

pub fn user_key(rest: &str) -> Option<UserKey<'_>> {
    let is_period = |p: &str| {
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        let parts: Vec<&str> = p.split('-').collect();
        matches!(parts.len(), 2 | 3) && parts.iter().all(|d| digits(d))
    };
    match rest.split(':').collect::<Vec<_>>().as_slice() {
        [period] if is_period(period) => Some(UserKey::Summary { period }),
        ["day", day] => Some(UserKey::Day { day }),
        ["storage"] => Some(UserKey::Total(Gauge::Storage)),
        ["team"] => Some(UserKey::Total(Gauge::Team)),
        ["storage", "held"] => Some(UserKey::Held(Gauge::Storage)),
        ["team", "held"] => Some(UserKey::Held(Gauge::Team)),
        [period, "pending", action] if is_period(period) => Some(UserKey::Pending { action }),
        _ => None,
    }
}

/// The user and kind of `key`, a key of `prefix`'s users.
pub fn parse_key<'k>(prefix: &str, key: &'k str) -> Option<(String, UserKey<'k>)> {
    let (user, rest) = user_key_parts(prefix, key)?;
    Some((user, user_key(rest)?))
}

/// Reads every event and every user's counters, totals and pending sets from `redis` (on a
/// cluster, every master), and audits them within `scope` at `now_ms`.
pub fn run(redis: &mut Redis, plans: &Plans, scope: &Scope, now_ms: u64) -> Result<Audit, String> {
    let streams = operator::events_streams(redis, plans)?;
    let mut trimmed_before_ms = None;
    for stream in &streams {
        if let Some(first_kept) = trimmed_since(redis, stream)? {
            trimmed_before_ms = trimmed_before_ms.max(Some(first_kept));
        }
    }
    let mut raw = operator::read_range(redis, &streams, 0, u64::MAX)?;
    // (Each user's events are in one stream, in order; across streams, by time.)
    raw.sort_by_key(|(_, id, _)| operator::id_order(id));
    let events: Vec<Event> = raw
        .into_iter()
        .map(|(_, id, fields)| Event {
            id,
            fields: fields
                .chunks(2)
                .filter_map(|kv| match kv {
                    [k, v] => Some((k.clone(), v.clone())),
                    _ => None,
                })
                .collect(),
        })
        .collect();
    let expected = replay(&events, plans);
    let found = read_found(redis, plans, now_ms)?;
    Ok(compare(
        events.len(),
        expected,
        found,
        scope,
        trimmed_before_ms,
        now_ms,
    ))
}

/// When `stream` was trimmed (events were deleted from it), the time of the oldest event it
/// still holds (now, if none).
fn trimmed_since(redis: &mut Redis, stream: &str) -> Result<Option<u64>, String> {
    use redis::Value;
    let info: Value = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(stream)
        .query(redis.as_dyn())
        .map_err(|e| format!("XINFO STREAM {stream}: {e}"))?;
    let pairs: Vec<(String, Value)> = match info {
        Value::Array(items) => items
            .chunks(2)
            .filter_map(|kv| match kv {
                [k, v] => redis::from_redis_value_ref::<String>(k)
                    .ok()
                    .map(|k| (k, v.clone())),
                _ => None,
            })
            .collect(),
        Value::Map(items) => items
            .into_iter()
            .filter_map(|(k, v)| redis::from_redis_value::<String>(k).ok().map(|k| (k, v)))
            .collect(),
        _ => Vec::new(),
    };
    let number = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| redis::from_redis_value_ref::<u64>(v).ok())
    };
    let (Some(added), Some(length)) = (number("entries-added"), number("length")) else {
        return Ok(None);
    };
    if added <= length {
        return Ok(None);
    }
    let first = pairs
        .iter()
        .find(|(k, _)| k == "first-entry")
        .and_then(|(_, v)| match v {
            Value::Array(entry) => entry.first().cloned(),
            _ => None,
        })
        .and_then(|id| redis::from_redis_value::<String>(id).ok());
    let now = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
    Ok(Some(first.map_or(now, |id| operator::id_order(&id).0)))
}

/// Every user's counters, totals and expired pending entries, by scanning each master for
/// the users' keys.
fn read_found(redis: &mut Redis, plans: &Plans, now_ms: u64) -> Result<Found, String> {
    let prefix = &plans.redis.key_prefix;
    let mut keys = Vec::new();
    for master in redis.masters()? {
        let mut own;
        let conn: &mut dyn redis::ConnectionLike = match (&master.node, &mut *redis) {
            (None, Redis::One(conn)) => conn,
            (node, _) => {
                own = redis.connect_master(node.as_ref())?;
                &mut own
            }
        };
        let mut cursor = 0u64;
        loop {
            let (next, page): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}:*"))
                .arg("COUNT")
                .arg(1000)
                .query(conn)
                .map_err(|e| format!("SCAN: {e}"))?;
            keys.extend(page);
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    let mut found = Found::default();
    let conn = redis.as_dyn();
    let failed = |key: &str, e: redis::RedisError| format!("{key}: {e}");
    let records = format!("{prefix}:applied:");
    for key in keys.iter().filter(|k| k.starts_with(&records)) {
        let fields: BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(key)
            .query(conn)
            .map_err(|e| failed(key, e))?;
        let number = |name: &str| fields.get(name).and_then(|v| v.parse().ok()).unwrap_or(0);
        let rest = key.strip_prefix(&records).unwrap_or(key);
        found.workers.push(WorkerRecord {
            worker: rest.split(':').next().unwrap_or(rest).to_string(),
            at_ms: number("at"),
            queued: number("queued"),
            stopped: fields.get("stopped").is_some_and(|s| s == "1"),
        });
    }
    for key in &keys {
        let Some((user, kind)) = parse_key(prefix, key) else {
            continue;
        };
        match kind {
            UserKey::Summary { period } => {
                let fields: BTreeMap<String, String> = redis::cmd("HGETALL")
                    .arg(key)
                    .query(conn)
                    .map_err(|e| failed(key, e))?;
                for (field, value) in fields {
                    let counter = !field.contains(':')
                        && !matches!(field.as_str(), "plan" | "limits" | "updated_at" | "recent");
                    if let (true, Ok(n)) = (counter, value.parse::<u64>()) {
                        found
                            .counts
                            .insert((user.clone(), period.to_string(), field), n);
                    }
                }
            }
            UserKey::Day { day } => {
                let fields: BTreeMap<String, u64> = redis::cmd("HGETALL")
                    .arg(key)
                    .query(conn)
                    .map_err(|e| failed(key, e))?;
                for (action, n) in fields {
                    found
                        .days
                        .insert((user.clone(), day.to_string(), action), n);
                }
            }
            UserKey::Total(gauge) => {
                let n: Option<u64> = redis::cmd("GET")
                    .arg(key)
                    .query(conn)
                    .map_err(|e| failed(key, e))?;
                found.totals.insert((user, gauge), n.unwrap_or(0));
            }
            UserKey::Pending { .. } | UserKey::Held(_) => {
                let action = match kind {
                    UserKey::Pending { action } => action.to_string(),
                    UserKey::Held(gauge) => gauge.name().to_string(),
                    _ => String::new(),
                };
                let expired: u64 = redis::cmd("ZCOUNT")
                    .arg(key)
                    .arg("-inf")
                    .arg(format!("({now_ms}"))
                    .query(conn)
                    .map_err(|e| failed(key, e))?;
                if expired > 0 {
                    *found.unsettled.entry((user, action)).or_default() += expired;
                }
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plans() -> Plans {
        Plans::from_json(plan_limits_services::plans_json().as_bytes()).unwrap()
    }

    fn event(fields: &[(&str, &str)]) -> Event {
        Event {
            id: "1795000000000-0".into(),
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn usage(user: &str, action: &str, bytes: &str, outcome: &str) -> Event {
        event(&[
            ("event", "usage"),
            ("user", user),
            ("action", action),
            ("period", "2026-11"),
            ("at", "2026-11-27T12:00:00.000Z"),
            ("bytes", bytes),
            ("outcome", outcome),
            ("reservation", "r1"),
        ])
    }

    #[test]
    fn a_days_counts_by_kind_are_recomputed_from_the_events_kind() {
        let with_kind = |kind: &str| {
            let mut e = usage("a", "ai_analysis", "0", "success");
            e.fields.insert("kind".into(), kind.into());
            e
        };
        let e = replay(
            &[with_kind("vision"), with_kind("vision"), with_kind("")],
            &plans(),
        );
        let day = |a: &str| ("a".to_string(), "2026-11-27".to_string(), a.to_string());
        assert_eq!(e.days[&day("ai_analysis")], 3);
        assert_eq!(e.days[&day("ai_analysis:vision")], 2);
        assert_eq!(e.days.len(), 2, "no count for an empty kind");
    }

    #[test]
    fn counts_days_and_totals_are_recomputed_with_resets_and_give_backs() {
        let events = vec![
            usage("a", "upload", "100", "success"),
            usage("a", "upload", "50", "unknown"),
            usage("a", "ai_analysis", "0", "success"),
            event(&[
                ("event", "given_back"),
                ("user", "a"),
                ("gauge", "storage"),
                ("amount", "500"),
            ]),
            usage("a", "upload", "7", "success"),
            event(&[
                ("event", "admin"),
                ("op", "reset"),
                ("user", "a"),
                ("action", "ai_analysis"),
                ("period", "2026-11"),
            ]),
        ];
        let e = replay(&events, &plans());
        let key = |a: &str| ("a".to_string(), "2026-11".to_string(), a.to_string());
        assert_eq!(e.counts[&key("upload")], 3);
        assert_eq!(e.counts[&key("ai_analysis")], 0, "reset");
        let day = |a: &str| ("a".to_string(), "2026-11-27".to_string(), a.to_string());
        assert_eq!(e.days[&day("ai_analysis")], 1, "a reset leaves the history");
        assert_eq!(
            e.totals[&("a".into(), Gauge::Storage)],
            7,
            "never below zero"
        );
        assert_eq!(e.unknown[&("a".into(), "upload".into())], 1);
    }

    #[test]
    fn drift_is_every_counter_that_differs_and_losses_are_listed_apart() {
        let events = vec![
            usage("a", "upload", "10", "success"),
            event(&[
                ("event", "lost"),
                ("user", "b"),
                ("action", "upload"),
                ("units", "3"),
                ("reason", "queue_full"),
            ]),
            event(&[
                ("event", "reservation_expired"),
                ("user", "c"),
                ("action", "upload"),
                ("reservation", "gone"),
            ]),
            event(&[
                ("event", "reservation_expired"),
                ("user", "a"),
                ("action", "upload"),
                ("reservation", "r1"),
            ]),
        ];
        let expected = replay(&events, &plans());
        let mut found = Found::default();
        let key = |u: &str, a: &str| (u.to_string(), "2026-11".to_string(), a.to_string());
        found.counts.insert(key("a", "upload"), 2);
        found.counts.insert(key("z", "upload"), 1);
        found
            .days
            .insert(("a".into(), "2026-11-27".into(), "upload".into()), 1);
        found.totals.insert(("a".into(), Gauge::Storage), 10);
        found.unsettled.insert(("d".into(), "upload".into()), 2);
        let audit = compare(events.len(), expected, found, &Scope::default(), None, 0);
        let drift: Vec<(&str, &str, u64, u64)> = audit
            .drift
            .iter()
            .map(|d| (d.user.as_str(), d.what.as_str(), d.found, d.expected))
            .collect();
        assert_eq!(
            drift,
            [
                ("a", "upload in period 2026-11", 2, 1),
                ("z", "upload in period 2026-11", 1, 0),
            ]
        );
        let lost: Vec<(&str, u64)> = audit
            .lost
            .iter()
            .map(|l| (l.user.as_str(), l.units))
            .collect();
        // b's lost units; c's expired reservation (a's was committed after all); d's pending.
        assert_eq!(lost, [("b", 3), ("c", 1), ("d", 2)]);
        let text = audit.to_string();
        assert!(
            text.contains("Redis holds 2, the events say 1 (+1)"),
            "{text}"
        );
    }

    #[test]
    fn what_began_before_the_oldest_event_kept_is_not_checked() {
        let events = vec![usage("a", "upload", "10", "success")];
        let expected = replay(&events, &plans());
        let mut found = Found::default();
        found
            .counts
            .insert(("a".into(), "2026-10".into(), "upload".into()), 9);
        found.totals.insert(("a".into(), Gauge::Storage), 999);
        let trimmed = start_ms("2026-11-01");
        let audit = compare(1, expected, found, &Scope::default(), Some(trimmed), 0);
        assert!(audit.drift.iter().all(|d| !d.what.contains("2026-10")));
        assert!(audit.drift.iter().all(|d| !d.what.contains("storage")));
        assert!(audit.skipped >= 2);
        assert!(audit.to_string().contains("were trimmed"));
    }

    #[test]
    fn a_worker_silent_for_four_heartbeats_without_a_goodbye_is_taken_for_killed() {
        let heartbeat = plan_limits_core::HEARTBEAT_MS;
        let record = |worker: &str, at_ms, stopped| WorkerRecord {
            worker: worker.into(),
            at_ms,
            queued: 3,
            stopped,
        };
        let now = 10 * heartbeat;
        let records = [
            record("alive", now - heartbeat, false),
            record("stopped", 0, true),
            record("killed", now - 4 * heartbeat, false),
            // On a cluster: one slot's record is old, another's recent.
            record("busy", 0, false),
            record("busy", now - 1, false),
        ];
        let silent = silent_workers(&records, now);
        assert_eq!(silent, [record("killed", now - 4 * heartbeat, false)]);
    }

    #[test]
    fn a_scope_is_one_period_and_its_days() {
        let scope = Scope {
            period: Some("2026-11-15".into()),
        };
        assert!(scope.takes_period("2026-11-15") && !scope.takes_period("2026-11"));
        assert!(scope.takes_day("2026-12-14") && !scope.takes_day("2026-12-15"));
        let month = Scope {
            period: Some("2026-12".into()),
        };
        assert!(month.takes_day("2026-12-31") && !month.takes_day("2027-01-01"));
        assert_eq!(next_month("2026-12-31"), "2027-01-31");
    }

    #[test]
    fn keys_are_sorted_into_what_the_audit_reads() {
        let k = |rest| {
            user_key(rest).map(|k| match k {
                UserKey::Summary { period } => format!("summary {period}"),
                UserKey::Day { day } => format!("day {day}"),
                UserKey::Total(g) => format!("total {}", g.name()),
                UserKey::Pending { action } => format!("pending {action}"),
                UserKey::Held(g) => format!("held {}", g.name()),
            })
        };
        assert_eq!(k("2026-11").as_deref(), Some("summary 2026-11"));
        assert_eq!(k("2026-11-15").as_deref(), Some("summary 2026-11-15"));
        assert_eq!(k("day:2026-11-27").as_deref(), Some("day 2026-11-27"));
        assert_eq!(k("storage").as_deref(), Some("total storage"));
        assert_eq!(k("team:held").as_deref(), Some("held team"));
        assert_eq!(
            k("2026-11:pending:upload").as_deref(),
            Some("pending upload")
        );
        assert_eq!(k("2026-11:commits:upload"), None);
        assert_eq!(k("entitlement"), None);
        assert_eq!(k("idem:upload:k"), None);
    }
}
