//! Reads what the filter wrote to Redis: counters and summaries (hashes) and usage events.

use std::collections::BTreeMap;

use plan_limits_core::keys::UsageKeys;

pub const PREFIX: &str = "plan-limits";
pub const EVENTS: &str = "plan-limits:events";

/// The current UTC month's id (`2026-11`).
pub fn this_period() -> String {
    chrono::Utc::now().format("%Y-%m").to_string()
}

/// The monthly summary of `user`: counters per action plus `plan`, `limits`, `updated_at`.
pub fn summary(conn: &mut redis::Connection, user: &str, period: &str) -> BTreeMap<String, String> {
    summary_with_prefix(conn, PREFIX, user, period)
}

pub fn summary_with_prefix(
    conn: &mut redis::Connection,
    prefix: &str,
    user: &str,
    period: &str,
) -> BTreeMap<String, String> {
    let keys = UsageKeys::new(prefix, user, period, "-");
    redis::cmd("HGETALL")
        .arg(&keys.summary)
        .query(conn)
        .expect("HGETALL summary")
}

/// The counter of `action` for `user` this period (0 when nothing was counted).
pub fn counter(conn: &mut redis::Connection, user: &str, action: &str) -> u64 {
    summary(conn, user, &this_period())
        .get(action)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Reservations still held for `user`'s `action` this period.
pub fn pending(conn: &mut redis::Connection, user: &str, action: &str) -> u64 {
    let keys = UsageKeys::new(PREFIX, user, &this_period(), action);
    redis::cmd("ZCARD")
        .arg(&keys.pending)
        .query(conn)
        .expect("ZCARD pending")
}

/// Every usage event, oldest first, as field maps.
pub fn events(conn: &mut redis::Connection) -> Vec<BTreeMap<String, String>> {
    let raw: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(EVENTS)
        .arg("-")
        .arg("+")
        .query(conn)
        .expect("XRANGE events");
    raw.into_iter()
        .map(|(_, fields)| {
            fields
                .chunks(2)
                .map(|kv| (kv[0].clone(), kv.get(1).cloned().unwrap_or_default()))
                .collect()
        })
        .collect()
}

/// Usage events of one user.
pub fn events_of(conn: &mut redis::Connection, user: &str) -> Vec<BTreeMap<String, String>> {
    events(conn)
        .into_iter()
        .filter(|e| e.get("user").map(String::as_str) == Some(user))
        .collect()
}

/// Waits (briefly) until `f` holds: settlements reach Redis a few milliseconds after the
/// response, from the worker's batch.
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
