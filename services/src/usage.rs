//! Reads what the filter wrote to Redis: monthly summaries (hashes), reservations in flight
//! and usage events.

use std::collections::BTreeMap;

use plan_limits_core::{Gauge, RedisSettings, UsageKeys, UserKeys};

/// The key prefix and event stream of the repository's plans.json.
pub fn prefix() -> String {
    RedisSettings::default().key_prefix
}

pub fn events_stream() -> String {
    RedisSettings::default().events_stream
}

/// The current UTC month's id (`2026-11`), as the filter names it.
pub fn this_period() -> String {
    plan_limits_core::BillingPeriod::calendar_month(chrono::Utc::now()).id
}

/// The summary of `user` in `period`: counters per action plus `plan`, `limits`, `updated_at`.
pub fn summary(
    conn: &mut dyn redis::ConnectionLike,
    user: &str,
    period: &str,
) -> BTreeMap<String, String> {
    summary_with_prefix(conn, &prefix(), user, period)
}

pub fn summary_with_prefix(
    conn: &mut dyn redis::ConnectionLike,
    prefix: &str,
    user: &str,
    period: &str,
) -> BTreeMap<String, String> {
    let keys = UsageKeys::new(prefix, user, period, "-");
    redis::cmd("HGETALL")
        .arg(&keys.summary)
        .query(conn)
        .unwrap_or_else(|e| panic!("HGETALL {}: {e}", keys.summary))
}

/// The counter of `action` for `user` in `period` (0 when nothing was counted).
pub fn counter(
    conn: &mut dyn redis::ConnectionLike,
    user: &str,
    action: &str,
    period: &str,
) -> u64 {
    summary(conn, user, period)
        .get(action)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Reservations still held for `user`'s `action` in `period`.
pub fn pending(
    conn: &mut dyn redis::ConnectionLike,
    user: &str,
    action: &str,
    period: &str,
) -> u64 {
    let keys = UsageKeys::new(&prefix(), user, period, action);
    redis::cmd("ZCARD")
        .arg(&keys.pending)
        .query(conn)
        .unwrap_or_else(|e| panic!("ZCARD {}: {e}", keys.pending))
}

/// Every usage event, oldest first, as field maps.
pub fn events(conn: &mut dyn redis::ConnectionLike) -> Vec<BTreeMap<String, String>> {
    let raw: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(events_stream())
        .arg("-")
        .arg("+")
        .query(conn)
        .unwrap_or_else(|e| panic!("XRANGE events: {e}"));
    raw.into_iter()
        .map(|(_, fields)| {
            fields
                .chunks(2)
                .map(|kv| {
                    let value = kv.get(1).cloned().unwrap_or_default();
                    (kv.first().cloned().unwrap_or_default(), value)
                })
                .collect()
        })
        .collect()
}

/// Usage events of one user (not the operator's `admin` events about them).
pub fn events_of(
    conn: &mut dyn redis::ConnectionLike,
    user: &str,
) -> Vec<BTreeMap<String, String>> {
    events(conn)
        .into_iter()
        .filter(|e| e.get("user").map(String::as_str) == Some(user))
        .filter(|e| e.get("event").map(String::as_str) == Some("usage"))
        .collect()
}

/// Records `plan` as billing's for `user` (what `plan-limits set-plan` does).
pub fn set_plan(conn: &mut dyn redis::ConnectionLike, user: &str, plan: &str) {
    let key = plan_limits_core::entitlement_key(&prefix(), plan_limits_core::encoded_user(user));
    redis::cmd("HSET")
        .arg(&key)
        .arg("plan")
        .arg(plan)
        .exec(conn)
        .unwrap_or_else(|e| panic!("HSET {key}: {e}"));
}

/// Records `day` as the anchor day of `user`'s billing periods (what `plan-limits set-plan
/// --anchor-day` does).
pub fn set_anchor(conn: &mut dyn redis::ConnectionLike, user: &str, day: u32) {
    let key = plan_limits_core::entitlement_key(&prefix(), plan_limits_core::encoded_user(user));
    redis::cmd("HSET")
        .arg(&key)
        .arg("anchor_day")
        .arg(day)
        .exec(conn)
        .unwrap_or_else(|e| panic!("HSET {key}: {e}"));
}

/// `user`'s running total of `gauge` (bytes stored, members invited).
pub fn gauge_total(conn: &mut dyn redis::ConnectionLike, user: &str, gauge: Gauge) -> u64 {
    let key = UserKeys::new(&prefix(), user).gauge(gauge);
    redis::cmd("GET")
        .arg(&key)
        .query::<Option<u64>>(conn)
        .unwrap_or_else(|e| panic!("GET {key}: {e}"))
        .unwrap_or(0)
}

/// Sets `user`'s running total of `gauge` (as if they had uploaded or invited that much).
pub fn set_gauge_total(conn: &mut dyn redis::ConnectionLike, user: &str, gauge: Gauge, total: u64) {
    let key = UserKeys::new(&prefix(), user).gauge(gauge);
    redis::cmd("SET")
        .arg(&key)
        .arg(total)
        .exec(conn)
        .unwrap_or_else(|e| panic!("SET {key}: {e}"));
}

/// Every key in Redis, sorted.
pub fn keys(conn: &mut dyn redis::ConnectionLike) -> Vec<String> {
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query(conn)
        .unwrap_or_else(|e| panic!("KEYS: {e}"));
    keys.sort();
    keys
}

/// Waits (up to 5 s) until `f` holds: settlements reach Redis a few milliseconds after the
/// response, from the worker's batch (at once in the harness).
pub fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    f()
}
