//! The read side, for the product's dashboard: the caller's usage this period
//! (`endpoints.usage`) and its daily counts (`endpoints.history`), each answered by the
//! filter from one Redis call (a read-only function), never forwarded and never counted.
//!
//! Numbers follow the 429's: `used` counts successes, `in_flight` the units held by requests
//! not settled yet, `remaining` what is left of the limit after both, `percentage` is both (the
//! write-up's `current`) of the limit in whole percent, rounded down, at most 100.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, Days, NaiveDate, Utc};
use serde_json::{json, Map, Value};

use crate::config::Gauge;
use crate::keys::UserKeys;
use crate::period::{self, BillingPeriod};
use crate::plans::{FeatureAccess, Plan, Plans};
use crate::redis::{RedisCommand, RedisReply, TransportError};
use crate::responses::{self, LocalResponse};
use crate::routes;

use crate::redis::functions::{HISTORY, PERIOD, USAGE};

/// The most days one history answer covers: a longer range is read a page at a time (each
/// answer names the page before).
pub const HISTORY_PAGE_DAYS: u64 = 92;

/// What is asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportKind {
    Usage,
    /// A past period's usage (the one starting in `month` of `year`), as its summary kept it.
    Period {
        year: i32,
        month: u32,
    },
    /// Days `from` to `to`, both included; one action's counts, or every action's; with
    /// `by_kind`, each action with a kind also by kind.
    History {
        from: NaiveDate,
        to: NaiveDate,
        action: Option<String>,
        by_kind: bool,
    },
}

/// A report asked for by a verified caller.
#[derive(Debug, Clone)]
pub struct Report {
    kind: ReportKind,
    user: String,
    /// The plan its token claims (billing's record, in Redis, wins over it).
    claimed_plan: Option<String>,
    /// The anchor day its token names, and the one the period was computed with.
    claimed_anchor: u32,
    anchor: u32,
    reanchored: bool,
    keys: UserKeys,
    period: BillingPeriod,
}

impl Report {
    /// `anchor`: the anchor day the token names (0: none).
    pub fn new(
        kind: ReportKind,
        user: String,
        claimed_plan: Option<String>,
        anchor: u32,
        plans: &Plans,
        now: DateTime<Utc>,
    ) -> Self {
        let keys = UserKeys::new(&plans.redis.key_prefix, &user);
        let mut report = Self {
            kind,
            user,
            claimed_plan,
            claimed_anchor: anchor,
            anchor,
            reanchored: false,
            keys,
            period: BillingPeriod::anchored(now, anchor),
        };
        report.reanchor(anchor, now);
        report
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// The plan its token claims, if any.
    pub fn claimed_plan(&self) -> Option<&str> {
        self.claimed_plan.as_deref()
    }

    pub fn anchor(&self) -> u32 {
        self.anchor
    }

    /// Computes the period from another anchor day (billing's record names one). A past
    /// period asked for that is the current one is answered as the current one.
    pub fn reanchor(&mut self, anchor: u32, now: DateTime<Utc>) {
        self.anchor = anchor;
        self.period = BillingPeriod::anchored(now, anchor);
        if let ReportKind::Period { year, month } = self.kind {
            match BillingPeriod::starting_in(year, month, anchor) {
                Some(current) if current == self.period => self.kind = ReportKind::Usage,
                Some(past) => self.period = past,
                None => {}
            }
        }
    }

    /// The anchor day in force, when Redis's answer says the period was computed from a stale
    /// one (asked again once).
    pub fn stale_anchor(&mut self, reply: &RedisReply) -> Option<u32> {
        let reads_the_record = matches!(self.kind, ReportKind::Usage | ReportKind::Period { .. });
        if self.reanchored || !reads_the_record {
            return None;
        }
        let RedisReply::Array(items) = reply else {
            return None;
        };
        let recorded = match items.get(1) {
            Some(RedisReply::Bulk(day)) => std::str::from_utf8(day).ok()?.parse().ok(),
            _ => None,
        };
        let in_force = recorded.unwrap_or(self.claimed_anchor);
        (in_force != self.anchor).then(|| {
            self.reanchored = true;
            in_force
        })
    }

    /// The one Redis call that answers it.
    pub fn command(&self, plans: &Plans, now_ms: u64) -> RedisCommand {
        match &self.kind {
            ReportKind::Usage => {
                let actions = plans.actions();
                let mut cmd = RedisCommand::new("FCALL")
                    .arg(USAGE)
                    .arg((6 + actions.len()).to_string())
                    .arg(self.keys.summary(&self.period.id))
                    .arg(self.keys.entitlement());
                for gauge in [Gauge::Storage, Gauge::Team] {
                    cmd = cmd
                        .arg(self.keys.gauge(gauge))
                        .arg(self.keys.gauge_held(gauge));
                }
                for action in actions {
                    cmd = cmd.arg(self.keys.pending(&self.period.id, &action.key));
                }
                cmd = cmd.arg(now_ms.to_string());
                for action in actions {
                    cmd = cmd.arg(&action.key);
                }
                cmd
            }
            ReportKind::Period { .. } => {
                let mut cmd = RedisCommand::new("FCALL")
                    .arg(PERIOD)
                    .arg("2")
                    .arg(self.keys.summary(&self.period.id))
                    .arg(self.keys.entitlement());
                for action in plans.actions() {
                    cmd = cmd.arg(&action.key);
                }
                cmd
            }
            ReportKind::History {
                from,
                to,
                action,
                by_kind,
            } => {
                let days = days(*from, *to);
                let mut cmd = RedisCommand::new("FCALL")
                    .arg(HISTORY)
                    .arg((1 + days.len()).to_string())
                    .arg(self.keys.entitlement());
                for day in &days {
                    cmd = cmd.arg(self.keys.day(&day.to_string()));
                }
                for field in history_fields(plans, action.as_deref(), *by_kind) {
                    cmd = cmd.arg(field.to_string());
                }
                cmd
            }
        }
    }

    /// The answer to the caller: the report (200), or 503 when Redis did not answer.
    pub fn answer(
        &self,
        reply: Result<RedisReply, TransportError>,
        plans: &Plans,
        now: DateTime<Utc>,
    ) -> LocalResponse {
        let body = match &self.kind {
            ReportKind::Usage => reply.and_then(|r| self.usage(r, plans, now)),
            ReportKind::Period { .. } if self.period.start > now => {
                return responses::bad_request("period", "has not started");
            }
            ReportKind::Period { .. } => reply.and_then(|r| self.past(r, plans)),
            ReportKind::History {
                from,
                to,
                action,
                by_kind,
            } => reply.and_then(|r| {
                let fields = history_fields(plans, action.as_deref(), *by_kind);
                let mut answer = self.history(r, *from, *to, &fields)?;
                // Older days still kept: the page before, as long as this one.
                answer.insert(
                    "previous".into(),
                    page_before(plans, *from, *to, now).map_or(
                        Value::Null,
                        |(from, to)| json!({"from": from.to_string(), "to": to.to_string()}),
                    ),
                );
                Ok(Value::Object(answer))
            }),
        };
        match body {
            Ok(body) => responses::report(body),
            Err(_) => responses::usage_unavailable("usage"),
        }
    }

    /// The plan in force: billing's record, else the token's claim, else the default plan
    /// (also for a name plans.json does not know).
    fn plan<'p>(&self, plans: &'p Plans, recorded: Option<String>) -> &'p Plan {
        recorded
            .as_deref()
            .and_then(|name| plans.plan(name))
            .or_else(|| self.claimed_plan.as_deref().and_then(|n| plans.plan(n)))
            .unwrap_or(plans.default_plan())
    }

    fn usage(
        &self,
        reply: RedisReply,
        plans: &Plans,
        now: DateTime<Utc>,
    ) -> Result<Value, TransportError> {
        let (recorded, numbers) = split(reply, 3, 4 + 3 * plans.actions().len())
            .ok_or_else(|| TransportError::BadReply("plan_limits_usage".into()))?;
        // The period's last uses that recorded metadata, newest first.
        let recent: Value = recorded
            .get(2)
            .cloned()
            .flatten()
            .and_then(|json| serde_json::from_str(&json).ok())
            .filter(Value::is_array)
            .unwrap_or_else(|| json!([]));
        let plan = self.plan(plans, recorded.into_iter().next().flatten());
        let (gauges, numbers) = numbers.split_at(4);
        let (stored, held, invited, inviting) = match gauges {
            [stored, held, invited, inviting] => (*stored, *held, *invited, *inviting),
            _ => (0, 0, 0, 0),
        };
        // The subscriber is one of the team's members.
        let members = invited.saturating_add(1);
        let mut actions = Map::new();
        for (action, counts) in plans.actions().iter().zip(numbers.chunks(3)) {
            let (used, in_flight, granted) = match counts {
                [used, in_flight, granted] => (*used, *in_flight, *granted),
                _ => (0, 0, 0),
            };
            let terms = action.terms(Some(&plan.key));
            // The plan's limit plus what an operator granted this period.
            let limit = terms.limit.map(|l| l.saturating_add(granted));
            let mut entry = json!({
                    "label": action.label,
                    "unit": action.unit,
                    "available": terms.feature == FeatureAccess::Included,
                    "used": used,
                    "in_flight": in_flight,
                    "limit": limit,
                    "granted": granted,
                    "remaining": limit.map(|l| l.saturating_sub(used.saturating_add(in_flight))),
                    "percentage": limit.map(|l| responses::percentage(used.saturating_add(in_flight), l)),
            });
            // Successes the plan allows past the limit, and how many of them are taken.
            if let (Some(limit), Value::Object(fields)) =
                (limit.filter(|_| terms.grace > 0), &mut entry)
            {
                let taken = used.saturating_add(in_flight).saturating_sub(limit);
                fields.insert(
                    "grace".into(),
                    json!({"units": terms.grace, "used": taken.min(terms.grace)}),
                );
            }
            actions.insert(action.key.clone(), entry);
        }
        let upgrade = plan
            .upgrade_path
            .first()
            .and_then(|step| plans.plan(&step.key))
            .map(|next| offer(next));
        Ok(json!({
            "user": self.user,
            "plan": {"key": plan.key, "name": plan.name},
            "period": {
                "id": self.period.id,
                "start": period::rfc3339(self.period.start, false),
                "end": period::rfc3339(self.period.end, false),
                "resets_at": self.period.resets_at(),
                "seconds_to_reset": self.period.seconds_until_end(now),
            },
            "actions": actions,
            "files": {"max_file_size_bytes": plan.max_file_size_bytes},
            "storage": {
                "used_bytes": stored,
                "in_flight_bytes": held,
                "limit_bytes": plan.storage_bytes,
                "remaining_bytes": plan
                    .storage_bytes
                    .map(|room| room.saturating_sub(stored.saturating_add(held))),
            },
            "team": {
                "members": members,
                "in_flight": inviting,
                "limit": plan.team_members,
                "remaining": plan
                    .team_members
                    .map(|room| room.saturating_sub(members.saturating_add(inviting))),
            },
            "features": plan.features,
            "upgrade": upgrade,
            "upgrade_url": plan.upgrade_url,
            "recent": recent,
        }))
    }

    /// A past period as its summary kept it: the counts, and the plan and limits of its last
    /// count (not today's plan).
    fn past(&self, reply: RedisReply, plans: &Plans) -> Result<Value, TransportError> {
        let bad = || TransportError::BadReply("plan_limits_period".into());
        let RedisReply::Array(items) = reply else {
            return Err(bad());
        };
        let text = |item: &RedisReply| match item {
            RedisReply::Bulk(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
            _ => None,
        };
        // (Billing's plan and anchor, then the summary's fields in the order asked.)
        let mut names = vec!["plan".to_string(), "limits".into(), "updated_at".into()];
        for action in plans.actions() {
            let key = &action.key;
            names.extend([key.clone(), format!("grant:{key}"), format!("lost:{key}")]);
        }
        let values = items
            .get(2..)
            .filter(|v| v.len() == names.len())
            .ok_or_else(bad)?;
        let summary: BTreeMap<String, String> = names
            .into_iter()
            .zip(values)
            .filter_map(|(name, value)| Some((name, text(value)?)))
            .collect();
        let number =
            |field: &str| -> u64 { summary.get(field).and_then(|v| v.parse().ok()).unwrap_or(0) };
        let limits: Map<String, Value> = summary
            .get("limits")
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_default();
        let mut actions = Map::new();
        for action in plans.actions() {
            let (used, granted) = (
                number(&action.key),
                number(&format!("grant:{}", action.key)),
            );
            let limit = limits
                .get(&action.key)
                .and_then(Value::as_u64)
                .map(|l| l.saturating_add(granted));
            let mut entry = json!({
                "label": action.label,
                "unit": action.unit,
                "used": used,
                "limit": limit,
                "granted": granted,
                "remaining": limit.map(|l| l.saturating_sub(used)),
                "percentage": limit.map(|l| responses::percentage(used, l)),
            });
            let lost = number(&format!("lost:{}", action.key));
            if let (true, Value::Object(fields)) = (lost > 0, &mut entry) {
                fields.insert("lost".into(), lost.into());
            }
            actions.insert(action.key.clone(), entry);
        }
        let plan = summary.get("plan").map(|key| {
            let name = plans.plan(key).map_or(key.as_str(), |p| p.name.as_str());
            json!({"key": key, "name": name})
        });
        Ok(json!({
            "user": self.user,
            "plan": plan,
            "period": {
                "id": self.period.id,
                "start": period::rfc3339(self.period.start, false),
                "end": period::rfc3339(self.period.end, false),
                "current": false,
            },
            // When its summary was last written (its last count); none: nothing was counted.
            "updated_at": summary.get("updated_at"),
            "actions": actions,
        }))
    }

    fn history(
        &self,
        reply: RedisReply,
        from: NaiveDate,
        to: NaiveDate,
        fields: &[HistoryField],
    ) -> Result<Map<String, Value>, TransportError> {
        let dates = days(from, to);
        let (_, numbers) = split(reply, 1, dates.len() * fields.len())
            .ok_or_else(|| TransportError::BadReply("plan_limits_history".into()))?;
        let actions: Vec<&str> = fields
            .iter()
            .filter(|f| f.kind.is_none())
            .map(|f| f.action)
            .collect();
        let mut totals: BTreeMap<&str, u64> = actions.iter().map(|a| (*a, 0)).collect();
        let mut kind_totals: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
        let mut out = Vec::with_capacity(dates.len());
        for (date, counts) in dates.iter().zip(numbers.chunks(fields.len().max(1))) {
            let mut day = Map::new();
            let mut kinds: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
            let mut total = 0u64;
            for (field, n) in fields.iter().zip(counts) {
                match field.kind {
                    None => {
                        total = total.saturating_add(*n);
                        if let Some(sum) = totals.get_mut(field.action) {
                            *sum = sum.saturating_add(*n);
                        }
                        day.insert(field.action.to_string(), (*n).into());
                    }
                    Some(kind) => {
                        kinds.entry(field.action).or_default().insert(kind, *n);
                        let sum = kind_totals.entry(field.action).or_default();
                        *sum.entry(kind).or_default() += *n;
                    }
                }
            }
            let mut entry = Map::new();
            entry.insert("date".into(), date.to_string().into());
            entry.insert("counts".into(), day.into());
            entry.insert("total".into(), total.into());
            if !kinds.is_empty() {
                entry.insert("by_kind".into(), json!(kinds));
            }
            out.push(Value::Object(entry));
        }
        let mut answer = Map::new();
        answer.insert("user".into(), self.user.clone().into());
        answer.insert("from".into(), from.to_string().into());
        answer.insert("to".into(), to.to_string().into());
        answer.insert("actions".into(), json!(actions));
        answer.insert("days".into(), out.into());
        answer.insert("totals".into(), json!(totals));
        if !kind_totals.is_empty() {
            answer.insert("totals_by_kind".into(), json!(kind_totals));
        }
        Ok(answer)
    }
}

/// What the next plan up gives.
fn offer(plan: &Plan) -> Value {
    json!({
        "plan": plan.key,
        "name": plan.name,
        "limits": plan.limits,
        "max_file_size_bytes": plan.max_file_size_bytes,
        "storage_bytes": plan.storage_bytes,
        "team_members": plan.team_members,
        "features": plan.features,
    })
}

/// Every day from `from` to `to`, both included.
fn days(from: NaiveDate, to: NaiveDate) -> Vec<NaiveDate> {
    from.iter_days().take_while(|d| *d <= to).collect()
}

/// One counter of a day a history reads: an action's, or an action's of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HistoryField<'p> {
    action: &'p str,
    kind: Option<&'p str>,
}

impl std::fmt::Display for HistoryField<'_> {
    /// Its field in the day's hash (`plan_limits_settle` names them so).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            None => f.write_str(self.action),
            Some(kind) => write!(f, "{}:{kind}", self.action),
        }
    }
}

/// The counters a history covers: the action asked for, or all; with `by_kind`, then each
/// kind (and `other`) of the actions that record one.
fn history_fields<'p>(
    plans: &'p Plans,
    only: Option<&str>,
    by_kind: bool,
) -> Vec<HistoryField<'p>> {
    let actions = plans
        .actions()
        .iter()
        .filter(|a| only.is_none_or(|o| o == a.key));
    let mut fields: Vec<HistoryField> = actions
        .clone()
        .map(|a| HistoryField {
            action: &a.key,
            kind: None,
        })
        .collect();
    if by_kind {
        for action in actions {
            let kinds = action.kind.iter().flat_map(|k| k.allowed.iter());
            for kind in kinds
                .map(String::as_str)
                .chain(action.kind.as_ref().map(|_| "other"))
            {
                fields.push(HistoryField {
                    action: &action.key,
                    kind: Some(kind),
                });
            }
        }
    }
    fields
}

/// A read-side reply: `texts` of billing's record (each nil when absent), then exactly `n`
/// counts.
fn split(reply: RedisReply, texts: usize, n: usize) -> Option<(Vec<Option<String>>, Vec<u64>)> {
    let RedisReply::Array(items) = reply else {
        return None;
    };
    if items.len() != texts + n {
        return None;
    }
    let (head, rest) = items.split_at(texts);
    let head = head
        .iter()
        .map(|item| match item {
            RedisReply::Bulk(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
            _ => None,
        })
        .collect();
    let counts = rest
        .iter()
        .map(|item| match item {
            RedisReply::Int(n) => u64::try_from(*n).ok(),
            _ => None,
        })
        .collect::<Option<Vec<u64>>>()?;
    Some((head, counts))
}

/// The history's query (`?from=YYYY-MM-DD&to=YYYY-MM-DD[&action=A][&by=kind]`): by default the 30
/// days to today; at most `HISTORY_PAGE_DAYS` days, none before the retention
/// (`history_retention_days`); 400 naming the parameter otherwise.
pub fn history_query(
    plans: &Plans,
    path: &str,
    now: DateTime<Utc>,
) -> Result<ReportKind, LocalResponse> {
    let param = |name: &str| routes::query_param(path, name);
    let date = |name: &str| -> Result<Option<NaiveDate>, LocalResponse> {
        match param(name) {
            None => Ok(None),
            Some(raw) => parse_date(&raw)
                .map(Some)
                .ok_or_else(|| responses::bad_request(name, "not a date (YYYY-MM-DD)")),
        }
    };
    let first_kept = first_day_kept(plans, now);
    let to = date("to")?.unwrap_or_else(|| now.date_naive());
    let from = match date("from")? {
        Some(from) => from,
        None => to
            .checked_sub_days(Days::new(29))
            .unwrap_or(to)
            .max(first_kept),
    };
    if from > to {
        return Err(responses::bad_request("from", "is after to"));
    }
    if from < first_kept {
        let days = plans.redis.history_retention_days;
        return Err(responses::bad_request(
            "from",
            &format!("is before {first_kept}: days are kept {days} days (history_retention_days)"),
        ));
    }
    let span = u64::try_from((to - from).num_days())
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    if span > HISTORY_PAGE_DAYS {
        return Err(responses::bad_request(
            "from",
            &format!(
                "the range is {span} days; at most {HISTORY_PAGE_DAYS} a page (each answer names the page before)"
            ),
        ));
    }
    let action = param("action");
    if let Some(name) = &action {
        if !plans.actions().iter().any(|a| &a.key == name) {
            return Err(responses::bad_request("action", "no such action"));
        }
    }
    let by_kind = match param("by").as_deref() {
        None => false,
        Some("kind") => true,
        Some(_) => return Err(responses::bad_request("by", "only `kind` is known")),
    };
    Ok(ReportKind::History {
        from,
        to,
        action,
        by_kind,
    })
}

/// The usage endpoint's query: none (the current period), or `?period=YYYY-MM` (the period
/// starting in that month, while its summary is kept); 400 naming the parameter otherwise.
pub fn usage_query(
    plans: &Plans,
    path: &str,
    now: DateTime<Utc>,
) -> Result<ReportKind, LocalResponse> {
    let Some(raw) = routes::query_param(path, "period") else {
        return Ok(ReportKind::Usage);
    };
    // (An anchored period's own id, `YYYY-MM-DD`, names its month too.)
    let month = raw.get(..7).filter(|_| raw.len() == 7 || raw.len() == 10);
    let Some((year, month)) = month.and_then(|m| {
        let date = parse_date(&format!("{m}-01"))?;
        Some((date.year(), date.month()))
    }) else {
        return Err(responses::bad_request("period", "not a period (YYYY-MM)"));
    };
    let this_month = (now.year(), now.month());
    if (year, month) > this_month {
        return Err(responses::bad_request("period", "has not started"));
    }
    // Its summary is kept `summary_retention_days` after the period ends (a month after it
    // starts, at the latest two).
    let kept = i64::from(plans.redis.summary_retention_days);
    let ends_by = BillingPeriod::starting_in(year, month, 31).map(|p| p.end);
    if ends_by.is_some_and(|end| end + chrono::Duration::days(kept) < now) {
        return Err(responses::bad_request(
            "period",
            &format!("is no longer kept: summaries are kept {kept} days after their period ends (summary_retention_days)"),
        ));
    }
    Ok(ReportKind::Period { year, month })
}

/// The oldest day whose counters are still kept.
fn first_day_kept(plans: &Plans, now: DateTime<Utc>) -> NaiveDate {
    let kept = u64::from(plans.redis.history_retention_days.max(1));
    let today = now.date_naive();
    today.checked_sub_days(Days::new(kept - 1)).unwrap_or(today)
}

/// The page of days before `from` (as long as the one answered, within the retention), if
/// any is kept.
fn page_before(
    plans: &Plans,
    from: NaiveDate,
    to: NaiveDate,
    now: DateTime<Utc>,
) -> Option<(NaiveDate, NaiveDate)> {
    let first_kept = first_day_kept(plans, now);
    let last = from.pred_opt().filter(|d| *d >= first_kept)?;
    let span = u64::try_from((to - from).num_days()).unwrap_or(0);
    let first = last.checked_sub_days(Days::new(span))?.max(first_kept);
    Some((first, last))
}

/// `YYYY-MM-DD`, digits only.
fn parse_date(raw: &str) -> Option<NaiveDate> {
    let bytes = raw.as_bytes();
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = bytes.get(r)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    if bytes.len() != 10 || bytes.get(4) != Some(&b'-') || bytes.get(7) != Some(&b'-') {
        return None;
    }
    let year = i32::try_from(digits(0..4)?).ok()?;
    NaiveDate::from_ymd_opt(year, digits(5..7)?, digits(8..10)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{now, plans};

    fn bulk(s: &str) -> RedisReply {
        RedisReply::Bulk(s.as_bytes().to_vec())
    }

    /// `report`'s Redis call as text, argument by argument.
    fn command_text(report: &Report, p: &Plans, now_ms: u64) -> Vec<String> {
        let command = report.command(p, now_ms);
        let args = command.args.iter();
        args.map(|a| String::from_utf8_lossy(a).into()).collect()
    }

    fn status_of(r: &Result<ReportKind, LocalResponse>) -> Option<(u32, Value)> {
        r.as_ref()
            .err()
            .map(|e| (e.status, serde_json::from_str(&e.body).unwrap()))
    }

    #[test]
    fn dates_are_strict() {
        assert_eq!(
            parse_date("2026-11-29"),
            NaiveDate::from_ymd_opt(2026, 11, 29)
        );
        for bad in [
            "2026-11-31",
            "2026-1-29",
            "26-11-29",
            "2026-11-29x",
            "",
            "2026/11/29",
            "+026-11-29",
        ] {
            assert_eq!(parse_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_history_query_is_checked_and_names_the_parameter() {
        let p = plans();
        let ok = history_query(&p, "/h?from=2026-11-01&to=2026-11-29&action=upload", now());
        assert_eq!(
            ok.unwrap(),
            ReportKind::History {
                from: NaiveDate::from_ymd_opt(2026, 11, 1).unwrap(),
                to: NaiveDate::from_ymd_opt(2026, 11, 29).unwrap(),
                action: Some("upload".into()),
                by_kind: false,
            }
        );
        // By default the 30 days to today.
        let Ok(ReportKind::History { from, to, .. }) = history_query(&p, "/h", now()) else {
            panic!()
        };
        assert_eq!(
            (from.to_string(), to.to_string()),
            ("2026-10-29".into(), "2026-11-27".into())
        );
        for (query, field) in [
            ("?from=2026-13-01", "from"),
            ("?to=yesterday", "to"),
            ("?from=2026-11-29&to=2026-11-01", "from"),
            ("?from=2026-01-01&to=2026-11-01", "from"),
            ("?action=teleport", "action"),
            ("?by=plan", "by"),
        ] {
            let r = history_query(&p, &format!("/h{query}"), now());
            let (status, body) = status_of(&r).unwrap_or_else(|| panic!("{query} accepted"));
            assert_eq!(
                (status, body["field"].as_str()),
                (400, Some(field)),
                "{query}"
            );
        }
        // 92 days a page, back through the retention (400 days) and no further.
        assert!(history_query(&p, "/h?from=2026-08-28&to=2026-11-27", now()).is_ok());
        assert!(history_query(&p, "/h?from=2026-08-27&to=2026-11-27", now()).is_err());
        assert!(history_query(&p, "/h?from=2025-10-24&to=2025-11-30", now()).is_ok());
        let r = history_query(&p, "/h?from=2025-10-23&to=2025-11-30", now());
        let (_, body) = status_of(&r).unwrap();
        assert!(body["message"]
            .as_str()
            .unwrap()
            .contains("history_retention_days"));
    }

    #[test]
    fn a_history_names_the_page_before_until_the_retention_ends() {
        let p = plans();
        // (now() is 2026-11-27; days are kept from 2025-10-24.)
        let page = |from: &str, to: &str| {
            page_before(
                &p,
                parse_date(from).unwrap(),
                parse_date(to).unwrap(),
                now(),
            )
            .map(|(f, t)| (f.to_string(), t.to_string()))
        };
        assert_eq!(
            page("2026-10-29", "2026-11-27"),
            Some(("2026-09-29".into(), "2026-10-28".into()))
        );
        assert_eq!(
            page("2025-11-01", "2025-11-30"),
            Some(("2025-10-24".into(), "2025-10-31".into())),
            "cut at the retention"
        );
        assert_eq!(page("2025-10-24", "2025-10-31"), None);
    }

    #[test]
    fn a_past_period_is_read_from_its_summary_with_the_limits_it_kept() {
        let p = plans();
        assert_eq!(usage_query(&p, "/u", now()).unwrap(), ReportKind::Usage);
        let kind = usage_query(&p, "/u?period=2026-10", now()).unwrap();
        assert_eq!(
            kind,
            ReportKind::Period {
                year: 2026,
                month: 10
            }
        );
        // The current period asked for by name is the current one, live.
        let current = Report::new(
            usage_query(&p, "/u?period=2026-11", now()).unwrap(),
            "u".into(),
            None,
            0,
            &p,
            now(),
        );
        assert_eq!(current.kind, ReportKind::Usage);
        // Anchored on the 15th: October's period is 2026-10-15 to 2026-11-15.
        let report = Report::new(kind, "u".into(), Some("professional".into()), 15, &p, now());
        let args = command_text(&report, &p, 0);
        assert_eq!(
            args[..5],
            [
                "FCALL",
                "plan_limits_period",
                "2",
                "plan-limits:{u}:2026-10-15",
                "plan-limits:{u}:entitlement"
            ]
        );
        assert_eq!(args.len(), 5 + p.actions().len(), "and the actions");
        let bulk = |s: &str| RedisReply::Bulk(s.as_bytes().to_vec());
        // Billing's plan and anchor, the summary's plan, limits and updated_at, then per
        // action its count, grant and loss.
        let mut items = vec![
            RedisReply::Nil,
            bulk("15"),
            bulk("free"),
            bulk(r#"{"upload":5,"ai_analysis":null}"#),
            bulk("2026-10-30T10:00:00.000Z"),
        ];
        for action in p.actions() {
            let of_upload = ["5", "2", "1"].map(bulk);
            items.extend(match action.key.as_str() {
                "upload" => of_upload.to_vec(),
                _ => vec![RedisReply::Nil; 3],
            });
        }
        let reply = RedisReply::Array(items);
        let r = report.answer(Ok(reply), &p, now());
        assert_eq!(r.status, 200, "{}", r.body);
        let body: Value = serde_json::from_str(&r.body).unwrap();
        // The plan it was on then (free), not the token's (professional).
        assert_eq!(body["plan"], json!({"key": "free", "name": "Free"}));
        assert_eq!(body["period"]["id"], "2026-10-15");
        assert_eq!(body["period"]["current"], false);
        assert_eq!(
            body["actions"]["upload"],
            json!({"label": "upload", "unit": "diagrams", "used": 5, "limit": 7, "granted": 2,
                "remaining": 2, "percentage": 71, "lost": 1})
        );
        assert_eq!(body["actions"]["ai_analysis"]["limit"], Value::Null);
        for (query, reason) in [
            ("/u?period=2026-12", "has not started"),
            ("/u?period=2026-13", "not a period"),
            ("/u?period=last", "not a period"),
            ("/u?period=2025-08", "no longer kept"),
        ] {
            let r = usage_query(&p, query, now());
            let (status, body) = status_of(&r).unwrap_or_else(|| panic!("{query} accepted"));
            assert_eq!((status, &body["field"]), (400, &json!("period")), "{query}");
            assert!(
                body["message"].as_str().unwrap().contains(reason),
                "{query}: {body}"
            );
        }
    }

    #[test]
    fn usage_reads_one_call_and_prefers_billings_plan() {
        let p = plans();
        let report = Report::new(
            ReportKind::Usage,
            "u".into(),
            Some("free".into()),
            0,
            &p,
            now(),
        );
        let text = command_text(&report, &p, 1000);
        assert_eq!(
            &text[..5],
            [
                "FCALL",
                "plan_limits_usage",
                "13",
                "plan-limits:{u}:2026-11",
                "plan-limits:{u}:entitlement"
            ]
        );
        // Actions in plans.json's order: ai_analysis, api_call, dxf_export, pdf_export,
        // procedure_view, team_invite, upload.
        assert_eq!(
            &text[text.len() - 8..text.len() - 6],
            ["1000", "ai_analysis"]
        );
        // Billing's plan and anchor, the recent uses, stored and held bytes, members invited
        // and invites in flight, then per action its count, what is in flight and what was
        // granted.
        let recent = r#"[{"at":"2026-11-27T10:00:00.000Z","action":"upload","kind":"","metadata":{"file_name":"pump.pdf"}}]"#;
        let reply = |plan: RedisReply| {
            let mut items = vec![plan, RedisReply::Nil, RedisReply::Bulk(recent.into())];
            items.extend([1024, 0, 0, 0].map(RedisReply::Int));
            items.extend([0; 18].map(RedisReply::Int));
            items.extend([2, 2, 1].map(RedisReply::Int));
            RedisReply::Array(items)
        };
        let r = report.answer(Ok(reply(RedisReply::Nil)), &p, now());
        assert_eq!(r.status, 200);
        let body: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(body["plan"]["key"], "free");
        assert_eq!(body["recent"][0]["metadata"]["file_name"], "pump.pdf");
        assert_eq!(
            body["actions"]["upload"],
            json!({"label": "upload", "unit": "diagrams", "available": true, "used": 2,
                   "in_flight": 2, "limit": 6, "granted": 1, "remaining": 2, "percentage": 66})
        );
        assert_eq!(body["actions"]["dxf_export"]["available"], false);
        assert_eq!(body["actions"]["procedure_view"]["limit"], Value::Null);
        assert_eq!(body["actions"]["procedure_view"]["percentage"], Value::Null);
        assert_eq!(body["upgrade"]["plan"], "professional");
        assert_eq!(body["upgrade"]["limits"]["upload"], Value::Null);
        assert_eq!(body["period"]["resets_at"], "2026-12-01T00:00:00Z");
        assert_eq!(body["files"]["max_file_size_bytes"], 10 * 1024 * 1024);
        assert_eq!(body["storage"]["used_bytes"], 1024);
        assert_eq!(body["storage"]["remaining_bytes"], (1u64 << 30) - 1024);
        assert_eq!(
            body["team"],
            json!({"members": 1, "in_flight": 0, "limit": 1, "remaining": 0}),
            "the subscriber is the team's one member"
        );
        // Billing's record wins over the claim.
        let r = report.answer(Ok(reply(bulk("enterprise"))), &p, now());
        let body: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(body["plan"]["key"], "enterprise");
        assert_eq!(body["upgrade"], Value::Null);
        // Redis did not answer (or not as the function does): 503.
        let r = report.answer(Err(TransportError::Unknown("timeout".into())), &p, now());
        assert_eq!(r.status, 503);
        let short = RedisReply::Array(vec![RedisReply::Nil, RedisReply::Int(1)]);
        assert_eq!(report.answer(Ok(short), &p, now()).status, 503);
    }

    #[test]
    fn history_has_every_day_and_totals() {
        let p = plans();
        let query = "/h?from=2026-11-25&to=2026-11-27&action=upload";
        let kind = history_query(&p, query, now()).unwrap();
        let report = Report::new(kind, "u".into(), None, 0, &p, now());
        let text = command_text(&report, &p, 0);
        assert_eq!(
            text,
            [
                "FCALL",
                "plan_limits_history",
                "4",
                "plan-limits:{u}:entitlement",
                "plan-limits:{u}:day:2026-11-25",
                "plan-limits:{u}:day:2026-11-26",
                "plan-limits:{u}:day:2026-11-27",
                "upload"
            ]
        );
        let reply = RedisReply::Array(vec![
            RedisReply::Nil,
            RedisReply::Int(1),
            RedisReply::Int(0),
            RedisReply::Int(2),
        ]);
        let body: Value = serde_json::from_str(&report.answer(Ok(reply), &p, now()).body).unwrap();
        assert_eq!(body["actions"], json!(["upload"]));
        assert_eq!(
            body["days"][1],
            json!({"date": "2026-11-26", "counts": {"upload": 0}, "total": 0})
        );
        assert_eq!(body["totals"], json!({"upload": 3}));
    }

    #[test]
    fn history_by_kind_reads_each_kind_and_other_and_keeps_the_total_whole() {
        let p = plans();
        let query = "/h?from=2026-11-27&to=2026-11-27&action=ai_analysis&by=kind";
        let kind = history_query(&p, query, now()).unwrap();
        let report = Report::new(kind, "u".into(), None, 0, &p, now());
        let fields = command_text(&report, &p, 0)[5..].to_vec();
        assert_eq!(
            fields,
            [
                "ai_analysis",
                "ai_analysis:chat",
                "ai_analysis:vision",
                "ai_analysis:photo",
                "ai_analysis:explain",
                "ai_analysis:reassess",
                "ai_analysis:other"
            ]
        );
        let counts = [3, 1, 2, 0, 0, 0, 0].map(RedisReply::Int);
        let reply = RedisReply::Array([vec![RedisReply::Nil], counts.to_vec()].concat());
        let body: Value = serde_json::from_str(&report.answer(Ok(reply), &p, now()).body).unwrap();
        assert_eq!(body["days"][0]["total"], 3);
        assert_eq!(body["days"][0]["by_kind"]["ai_analysis"]["vision"], 2);
        assert_eq!(
            body["totals_by_kind"]["ai_analysis"],
            json!({"chat": 1, "vision": 2, "photo": 0, "explain": 0, "reassess": 0, "other": 0})
        );
    }
}
