//! What `plan-limits` does against a running gateway's Redis (as an admin): read a user's
//! usage and history (the same JSON the gateway's endpoints answer, built by the same code),
//! change what a user may do (each change one transaction with its `admin` event), and export
//! the event stream for billing.

use std::io::Write;

use chrono::{DateTime, NaiveDate, Utc};
use plan_limits_core::admin::{self, AdminOp};
use plan_limits_core::keys::UserKeys;
use plan_limits_core::plans::Plans;
use plan_limits_core::reports::{self, Report, ReportKind};
use plan_limits_core::responses::LocalResponse;
use plan_limits_services::redis_exec;

/// `GET /api/usage`'s JSON for `user`.
pub fn usage(
    conn: &mut redis::Connection,
    plans: &Plans,
    user: &str,
    now: DateTime<Utc>,
) -> Result<String, String> {
    report(conn, plans, ReportKind::Usage, user, now)
}

/// `GET /api/usage/history`'s JSON for `user` (`from`/`to` default as the endpoint's).
pub fn history(
    conn: &mut redis::Connection,
    plans: &Plans,
    user: &str,
    from: Option<&str>,
    to: Option<&str>,
    action: Option<&str>,
    now: DateTime<Utc>,
) -> Result<String, String> {
    let query: Vec<String> = [("from", from), ("to", to), ("action", action)]
        .iter()
        .filter_map(|(name, value)| value.map(|v| format!("{name}={v}")))
        .collect();
    let path = format!("/?{}", query.join("&"));
    let kind = reports::history_query(plans, &path, now).map_err(|r| refusal(&r))?;
    report(conn, plans, kind, user, now)
}

/// The anchor day billing recorded for `user` (0: none, the calendar month).
fn recorded_anchor(conn: &mut redis::Connection, plans: &Plans, user: &str) -> Result<u32, String> {
    let key = UserKeys::new(&plans.redis.key_prefix, user).entitlement();
    let day: Option<u32> = redis::cmd("HGET")
        .arg(&key)
        .arg("anchor_day")
        .query(conn)
        .map_err(|e| format!("HGET {key}: {e}"))?;
    Ok(day.unwrap_or(0))
}

fn report(
    conn: &mut redis::Connection,
    plans: &Plans,
    kind: ReportKind,
    user: &str,
    now: DateTime<Utc>,
) -> Result<String, String> {
    let anchor = recorded_anchor(conn, plans, user)?;
    let report = Report::new(kind, user.to_string(), None, anchor, plans, now);
    let now_ms = u64::try_from(now.timestamp_millis()).unwrap_or(0);
    let reply = redis_exec::run(conn, &report.command(plans, now_ms));
    let answer = report.answer(Ok(reply), plans, now);
    if answer.status == 200 {
        Ok(answer.body)
    } else {
        Err(refusal(&answer))
    }
}

/// An answer's JSON `message`, for the terminal.
fn refusal(response: &LocalResponse) -> String {
    serde_json::from_str::<serde_json::Value>(&response.body)
        .ok()
        .and_then(|v| v["message"].as_str().map(String::from))
        .unwrap_or_else(|| response.body.clone())
}

/// Applies `op` to `user`, with its admin event, in one transaction.
pub fn apply(
    conn: &mut redis::Connection,
    plans: &Plans,
    user: &str,
    op: &AdminOp,
    operator: &str,
    now: DateTime<Utc>,
) -> Result<(), String> {
    let anchor = match op {
        AdminOp::SetPlan {
            anchor_day: Some(day),
            ..
        } => *day,
        _ => recorded_anchor(conn, plans, user)?,
    };
    let commands = admin::transaction(plans, user, op, operator, anchor, now)?;
    redis_exec::run_atomically(conn, &commands)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
}

/// The columns of a CSV export: the stream id, then every field an event may have.
const COLUMNS: [&str; 18] = [
    "id",
    "event",
    "op",
    "user",
    "action",
    "kind",
    "bytes",
    "status",
    "at",
    "request_id",
    "plan",
    "period",
    "units",
    "operator",
    "idempotency_key",
    "threshold",
    "used",
    "limit",
];

/// Writes the events recorded on days `from` to `to` (UTC, both included) to `out`; returns
/// how many.
pub fn export(
    conn: &mut redis::Connection,
    plans: &Plans,
    from: NaiveDate,
    to: NaiveDate,
    format: Format,
    out: &mut dyn Write,
) -> Result<u64, String> {
    let start = day_start_ms(from)?;
    let end = day_start_ms(to.succ_opt().ok_or("--to is too late")?)? - 1;
    let mut csv = (format == Format::Csv).then(|| csv::Writer::from_writer(Vec::new()));
    if let Some(w) = &mut csv {
        w.write_record(COLUMNS).map_err(|e| e.to_string())?;
    }
    let mut after = format!("{start}-0");
    let mut first = true;
    let mut written = 0u64;
    loop {
        // The first page starts at `start`; the next ones after the last id read.
        let from_id = if first {
            after.clone()
        } else {
            format!("({after}")
        };
        first = false;
        let page: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
            .arg(&plans.redis.events_stream)
            .arg(&from_id)
            .arg(end.to_string())
            .arg("COUNT")
            .arg(1000)
            .query(conn)
            .map_err(|e| format!("XRANGE: {e}"))?;
        let Some((last, _)) = page.last() else { break };
        after = last.clone();
        for (id, fields) in &page {
            let field = |name: &str| {
                fields
                    .chunks(2)
                    .find(|kv| kv.first().map(String::as_str) == Some(name))
                    .and_then(|kv| kv.get(1).cloned())
                    .unwrap_or_default()
            };
            match &mut csv {
                Some(w) => {
                    let row = COLUMNS.map(|c| if c == "id" { id.clone() } else { field(c) });
                    w.write_record(&row).map_err(|e| e.to_string())?;
                }
                None => {
                    let mut object = serde_json::Map::new();
                    object.insert("id".into(), id.clone().into());
                    for kv in fields.chunks(2) {
                        if let [k, v] = kv {
                            object.insert(k.clone(), v.clone().into());
                        }
                    }
                    writeln!(out, "{}", serde_json::Value::Object(object))
                        .map_err(|e| e.to_string())?;
                }
            }
            written += 1;
        }
        if page.len() < 1000 {
            break;
        }
    }
    if let Some(w) = csv {
        let bytes = w.into_inner().map_err(|e| e.to_string())?;
        out.write_all(&bytes).map_err(|e| e.to_string())?;
    }
    Ok(written)
}

fn day_start_ms(day: NaiveDate) -> Result<u64, String> {
    let start = day
        .and_hms_opt(0, 0, 0)
        .ok_or("not a day")?
        .and_utc()
        .timestamp_millis();
    u64::try_from(start).map_err(|_| format!("{day}: before 1970"))
}
